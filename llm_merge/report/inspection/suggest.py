"""Data-free suggestions from task-vector statistics: weights, a density per model, methods (pure).

* **Weights** (rule ``equal_say``): w_i ∝ (mean_j ||t_j|| / ||t_i||) / (1 + Σ_{j≠i} max(0, cos(t_i, t_j))),
  normalized to sum 1. The first factor gives every model the same say (a model whose task vector is
  three times longer would otherwise pull the merge three times as hard; clipped to [1/4, 4]); the
  second discounts models whose direction others already bring, so that two near-copies count about
  as one.
* **Density** (per model): the smallest density whose trimmed task vector (each tensor on its own,
  largest magnitudes first) keeps ``density_mass`` of the model's L1 mass, within [0.1, 0.9]. A model
  that changed few entries or whose changes are concentrated gets a low density.
* **Methods**: sign conflicts relative to chance (``HIGH_CONFLICT``) pick the TIES family, which elects a
  sign per entry; among those a concentrated magnitude profile (the top 20% of entries holding at least
  ``CONCENTRATED_MASS`` of the mass) favours magnitude trimming (ties), a flat one or many tied
  magnitudes (``MANY_TIES``) random dropping (dare_ties). Without many conflicts, agreeing task vectors
  (mean cosine >= ``AGREEING_COSINE``) merge well linearly, near-orthogonal ones with DARE's drop.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from llm_merge.report.inspection.geometry import DENSITY_GRID

HIGH_CONFLICT = 0.5
CONCENTRATED_MASS = 0.6
MANY_TIES = 0.3
AGREEING_COSINE = 0.5
MIN_DENSITY, MAX_DENSITY = 0.1, 0.9
#: Bounds of the equal-say factor mean ||t|| / ||t_i||.
NORM_FACTOR_BOUNDS = (0.25, 4.0)
#: Methods whose config takes one density per model (reserve_p_list / mergekit density).
SPARSIFYING = ("ties", "dare_ties", "della", "dare_linear", "della_linear")
#: Where a suggested config writes its merge.
SUGGESTED_OUTPUT = "merged"


def suggest_weights(norms: Sequence[float], cosines: Sequence[Sequence[Optional[float]]]) -> tuple[list[float], list[dict]]:
    """The ``equal_say`` weights (sum 1, 3 decimals) and, per model, the factors behind them."""
    k = len(norms)
    mean_norm = sum(norms) / k if k else 0.0
    raw, factors = [], []
    for i in range(k):
        low, high = NORM_FACTOR_BOUNDS
        say = min(max(mean_norm / norms[i], low), high) if norms[i] > 0 else high
        redundancy = sum(max(0.0, cosines[i][j] or 0.0) for j in range(k) if j != i)
        raw.append(say / (1.0 + redundancy))
        factors.append({"task_vector_norm": norms[i], "norm_factor": say, "redundancy": redundancy})
    total = sum(raw)
    weights = [round(w / total, 3) if total > 0 else round(1 / k, 3) for w in raw]
    for factor, weight in zip(factors, weights):
        factor["weight"] = weight
    return weights, factors


def suggest_density(curve: Sequence[Optional[float]], density_mass: float) -> float:
    """The smallest grid density keeping ``density_mass`` of the L1 mass, within [MIN_DENSITY, MAX_DENSITY]."""
    chosen = next((p for p, kept in zip(DENSITY_GRID, curve) if kept is not None and kept >= density_mass - 1e-12), 1.0)
    return round(min(max(chosen, MIN_DENSITY), MAX_DENSITY), 2)


def suggest_methods(k: int, relative_conflict: Optional[float], conflict_rate: Optional[float], mean_cosine: Optional[float],
                    top20_mass: Optional[float], tied_fraction: Optional[float]) -> tuple[str, list[dict]]:
    """(the evidence in words, the methods the statistics favour, best first, each with its reason)."""
    evidence = ["no entry changed by two models" if conflict_rate is None else
                f"{conflict_rate:.0%} of the entries changed by two or more models disagree in sign "
                f"({relative_conflict:.2f} of what independent signs give)"]
    if mean_cosine is not None:
        evidence.append(f"mean task-vector cosine {mean_cosine:.2f}")
    if top20_mass is not None:
        evidence.append(f"the top 20% of each tensor's entries hold {top20_mass:.0%} of the task-vector mass")
    if tied_fraction is not None:
        evidence.append(f"{tied_fraction:.0%} of the non-zero magnitudes tie")
    concentrated = top20_mass is not None and top20_mass >= CONCENTRATED_MASS
    many_ties = tied_fraction is not None and tied_fraction >= MANY_TIES
    if relative_conflict is not None and relative_conflict >= HIGH_CONFLICT:
        sign = "high sign conflict: TIES elects one sign per entry and drops the others"
        if many_ties:
            ranked = [("dare_ties", f"{sign}; with many tied magnitudes, random drops keep the density exactly"),
                      ("della", f"{sign}; DELLA's midranks treat tied magnitudes alike"),
                      ("ties", f"{sign}; trimming keeps every magnitude tied at its threshold, more than the density")]
        elif concentrated:
            ranked = [("ties", f"{sign}; concentrated magnitudes: trimming by magnitude keeps most of the mass"),
                      ("della", f"{sign}; magnitude-aware random drops"), ("dare_ties", sign)]
        else:
            ranked = [("dare_ties", f"{sign}; a flat magnitude profile: random drop-and-rescale keeps the expected "
                                    "task vector"), ("ties", sign), ("della", sign)]
    else:
        few = "few sign conflicts"
        if mean_cosine is not None and mean_cosine >= AGREEING_COSINE:
            ranked = [("linear", f"{few} and agreeing task vectors: averaging loses little"),
                      ("dare_linear", f"{few}; dropping redundant entries first")]
        else:
            ranked = [("dare_linear", f"{few}; near-orthogonal task vectors: DARE's random drop lowers their interference"),
                      ("linear", few)]
        ranked.append(("ties", "resolves the sign conflicts there are"))
    if k == 2:
        ranked.append(("slerp", "two models: spherical interpolation between them"))
    return "; ".join(evidence), [{"method": m, "why": w} for m, w in ranked]


def suggested_config(method: str, base: str, models: Sequence[str], weights: Sequence[float],
                     densities: Sequence[float]) -> dict:
    """A ready-to-run JSON config (``llm-merge CONFIG.json``) of the suggestion; absolute paths."""
    config = {"merge_method": method, "base_model_path": os.path.abspath(base),
              "model_path_list": [os.path.abspath(m) for m in models], "output_path": SUGGESTED_OUTPUT}
    if method != "slerp":
        config["weight_list"] = list(weights)
    if method in SPARSIFYING:
        config["reserve_p_list"] = list(densities)
    return config


def suggested_recipe(method: str, base: str, models: Sequence[str], weights: Sequence[float], densities: Sequence[float],
                     why: str) -> str:
    """The same suggestion as a mergekit YAML recipe (``llm-merge RECIPE.yml OUT``); absolute paths."""
    import yaml  # a dependency; imported here to keep the merge path's imports small

    entries = []
    for model, weight, density in zip(models, weights, densities):
        parameters = {"weight": weight, **({"density": density} if method in SPARSIFYING else {})}
        entries.append({"model": os.path.abspath(model), "parameters": parameters})
    recipe = {"merge_method": method, "base_model": os.path.abspath(base), "models": entries,
              "parameters": {"normalize": True}}
    comment = "".join(f"# {line}\n" for line in _wrap(f"suggested by llm-merge inspect: {why}"))
    return comment + yaml.safe_dump(recipe, sort_keys=False)


def _wrap(text: str, width: int = 100) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])
