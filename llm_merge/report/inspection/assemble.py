"""The inspection report (a JSON-ready dict) from the per-tensor sums: per tensor, per layer, per model,
the compatibility verdict and the suggestions (pure)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Optional, Sequence

from llm_merge import __version__
from llm_merge.config.names import layer_index
from llm_merge.report.inspection import suggest
from llm_merge.report.inspection.summary import add_sums, figures, kept_curve, mean_pairwise, subset_index
from llm_merge.report.inspection.verdict import MISMATCH, Evidence, judge, thresholds

#: Layer key of tensors outside the numbered layers (embeddings, final norm, head).
OTHER = "other"


def build_report(options: dict, base: str, models: Sequence[str], tasks: Sequence, sums: dict[str, dict],
                 skipped: Sequence[dict], layer_pattern: str, density_mass: float) -> dict[str, Any]:
    """Every figure of the inspection; ``tasks`` have name, shape, inputs and base; ``sums[name]`` their sums."""
    tensors = []
    groups: dict[Any, list[dict]] = defaultdict(list)
    for task in tasks:
        layer = layer_index(task.name.split("[")[0], layer_pattern)
        groups[OTHER if layer is None else layer].append(sums[task.name])
        tensors.append({"name": task.name, "layer": layer, "shape": list(task.shape),
                        "dtypes": sorted({i.dtype for i in (*task.inputs, task.base)}), **_clean(figures(sums[task.name]))})
    layers = [{"layer": key, "tensors": len(groups[key]), **_clean(figures(add_sums(groups[key])))}
              for key in sorted(groups, key=lambda k: (k == OTHER, k if k != OTHER else 0))]
    total = add_sums(sums[t.name] for t in tasks)
    overall = _clean(figures(total)) if total is not None else None
    verdict = [judge(name, _evidence(tensors, i)).as_dict() for i, name in enumerate(models)]
    report = {
        "llm_merge_version": __version__,
        "base_model_path": base,
        "models": list(models),
        "options": options,
        "thresholds": thresholds(),
        "summary": overall,
        "kept_mass_curves": {"densities": list(suggest.DENSITY_GRID),
                             "per_model": [_clean(kept_curve(total, i)) for i in range(len(models))] if total else []},
        "verdict": verdict,
        "layers": layers,
        "tensors": tensors,
        "skipped": list(skipped),
    }
    report["suggestions"] = suggestions(report, total, density_mass) if total is not None else None
    return report


def _evidence(tensors: list[dict], model: int) -> list[Evidence]:
    """The verdict's evidence for one model: its weight cosine and relative norm in every matrix."""
    evidence = []
    for row in tensors:
        if len(row["shape"]) >= 2:
            cosine, relative = row["weight_cosine"][model], row["relative_norm"][model]
            evidence.append(Evidence(row["name"], math.nan if cosine is None else cosine,
                                     math.nan if relative is None else relative, row["numel"]))
    return evidence


def suggestions(report: dict, total: dict, density_mass: float) -> dict[str, Any]:
    """Weights, densities and methods for the models the verdict does not reject (``total``: all tensors' sums)."""
    models, summary = report["models"], report["summary"]
    keep = [i for i, v in enumerate(report["verdict"]) if v["level"] != MISMATCH]
    excluded = [models[i] for i in range(len(models)) if i not in keep]
    result: dict[str, Any] = {"excluded": excluded}
    if len(keep) < 2:
        return {**result, "note": f"{len(keep)} model(s) share the base; a merge needs two, so there is nothing to suggest"}
    norms = [summary["task_vector_norm"][i] for i in keep]
    cosines = [[summary["task_vector_cosine"][i][j] for j in keep] for i in keep]
    weights, factors = suggest.suggest_weights(norms, cosines)
    curves = report["kept_mass_curves"]["per_model"]
    densities = [suggest.suggest_density(curves[i], density_mass) for i in keep]
    top20 = _mean(summary["top_mass"][i]["0.2"] for i in keep)
    tied = _mean(summary["tied_fraction"][i] for i in keep)
    subset = subset_index(total, keep)
    if subset is None:  # two or more models rejected: the sign figures of all of them
        result["note_sign_figures"] = "the sign-conflict figures behind the methods include the rejected models"
    signs = _clean(figures(total, subset or 0))
    evidence, methods = suggest.suggest_methods(len(keep), signs["relative_sign_conflict"], signs["sign_conflict_rate"],
                                      mean_pairwise(cosines), top20, tied)
    chosen = methods[0]
    kept_models = [models[i] for i in keep]
    for factor, i, density in zip(factors, keep, densities):
        factor.update(model=models[i], density=density, kept_mass_at_density=curves[i][suggest.DENSITY_GRID.index(density)])
    return {
        **result,
        "weight_rule": "equal_say: w_i ~ (mean ||t|| / ||t_i||, clipped to [1/4, 4]) / (1 + sum of its positive "
                       "task-vector cosines with the others), normalized to sum 1: every model gets the same say, and "
                       "models that repeat each other's direction share theirs",
        "density_rule": f"per model, the smallest density keeping {density_mass:.0%} of its task-vector L1 mass "
                        f"(each tensor trimmed on its own), within [{suggest.MIN_DENSITY}, {suggest.MAX_DENSITY}]",
        "per_model": factors,
        "evidence": evidence,
        "methods": methods,
        "config": suggest.suggested_config(chosen["method"], report["base_model_path"], kept_models, weights, densities),
        "recipe": suggest.suggested_recipe(chosen["method"], report["base_model_path"], kept_models, weights, densities,
                                           f"{chosen['method']}: {chosen['why']} ({evidence})"),
    }


def _mean(values) -> Optional[float]:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _clean(value: Any) -> Any:
    """NaN and infinities as None (the JSON report stays standard JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value
