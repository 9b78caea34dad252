"""From per-tensor sums (``geometry.TensorGeometry.finish``) to the figures of a tensor, a layer or a model.

Sums add up over tensors, so a layer's or the whole model's figures are those of its summed sums: the
relative norm of a layer is ||t|| / ||b|| over all its entries, its conflict rate counts all its
entries, and its kept mass is what a density applied to each of its tensors keeps (densities act per
tensor). Pure functions on dicts and lists.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

from llm_merge.report.inspection.geometry import DENSITY_GRID

#: Densities shown in tables and the per-tensor JSON (the grid's full curve is in each model's summary).
SHOWN_DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
#: Sums added when tensors are grouped (everything but the flags).
_ADDED = ("numel", "nonfinite", "bb", "xx", "xb", "gram", "l1", "changed", "active", "conflicts", "chance", "dropped",
          "kept", "tied")


def add_sums(parts: Iterable[dict]) -> Optional[dict]:
    """The element-wise sum of several tensors' sums (None for none)."""
    total: Optional[dict] = None
    for part in parts:
        if total is None:
            total = {key: _copy(part[key]) for key in _ADDED}
            total["approximate"] = list(part["approximate"])
            total["subsets"] = part["subsets"]
            continue
        for key in _ADDED:
            total[key] = _added(total[key], part[key])
        total["approximate"] = [a or b for a, b in zip(total["approximate"], part["approximate"])]
    return total


def _copy(value: Any) -> Any:
    return [_copy(v) for v in value] if isinstance(value, list) else value


def _added(a: Any, b: Any) -> Any:
    return [_added(x, y) for x, y in zip(a, b)] if isinstance(a, list) else a + b


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den > 0 and math.isfinite(num) and math.isfinite(den) else None


def figures(sums: dict, subset: int = 0) -> dict:
    """Readable figures of summed statistics: per model (lists) and over all models; the sign figures
    of the models ``sums["subsets"][subset]`` (default: all of them)."""
    k = len(sums["xx"])
    n, bb, gram = sums["numel"], sums["bb"], sums["gram"]
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(k)]
    base_norm = math.sqrt(bb)
    cosines = [[_ratio(gram[i][j], norms[i] * norms[j]) if i != j else (1.0 if norms[i] > 0 else None) for j in range(k)]
               for i in range(k)]
    l1 = sums["l1"]
    nonzero = sums["changed"]
    members = sums["subsets"][subset]
    dropped = sums["dropped"][subset]
    return {
        "numel": n,
        "relative_norm": [_ratio(norms[i], base_norm) for i in range(k)],
        "weight_cosine": [_ratio(sums["xb"][i], math.sqrt(max(sums["xx"][i], 0.0)) * base_norm) for i in range(k)],
        "task_vector_norm": norms,
        "base_norm": base_norm,
        "task_vector_cosine": cosines,
        "changed_fraction": [_ratio(nonzero[i], n) for i in range(k)],
        "top_mass": [{str(p): _ratio(sums["kept"][i][DENSITY_GRID.index(p)], l1[i]) for p in SHOWN_DENSITIES} for i in range(k)],
        "tied_fraction": [_ratio(sums["tied"][i], nonzero[i]) for i in range(k)],
        "sign_models": list(members),
        "sign_conflict_rate": _ratio(sums["conflicts"][subset], sums["active"][subset]),
        "relative_sign_conflict": _ratio(sums["conflicts"][subset], sums["chance"][subset]),
        "ties_dropped_mass": _ratio(sum(dropped), sum(l1[i] for i in members)),
        "ties_dropped_mass_per_model": [_ratio(dropped[i], l1[i]) if i in members else None for i in range(k)],
        "nonfinite": sums["nonfinite"],
        "approximate_magnitudes": sums["approximate"],
    }


def subset_index(sums: dict, members: Sequence[int]) -> Optional[int]:
    """Which entry of the sign figures covers exactly the models ``members`` (None: none does)."""
    wanted = sorted(members)
    return next((s for s, subset in enumerate(sums["subsets"]) if sorted(subset) == wanted), None)


def kept_curve(sums: dict, model: int) -> list[Optional[float]]:
    """Share of model ``model``'s L1 mass kept at each density of ``DENSITY_GRID`` (each tensor trimmed on its own)."""
    return [_ratio(kept, sums["l1"][model]) for kept in sums["kept"][model]]


def mean_pairwise(matrix: Sequence[Sequence[Optional[float]]]) -> Optional[float]:
    """Mean of the off-diagonal entries that are known (None when there are none)."""
    values = [matrix[i][j] for i in range(len(matrix)) for j in range(len(matrix)) if i < j and matrix[i][j] is not None]
    return sum(values) / len(values) if values else None
