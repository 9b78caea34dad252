"""The inspection report as terminal text: models, task-vector cosines, sign conflicts, a per-layer (or
per-tensor) table, the verdict and the suggestions with their JSON config and YAML recipe (pure)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

from llm_merge.report.inspection.verdict import MISMATCH

#: Rows of the per-tensor table; the rest are counted (inspect.json has them all).
TENSOR_ROWS = 200


def _num(value: Optional[float], spec: str = ".4f") -> str:
    """``value`` in ``spec``; an unknown value as ``-``, right-aligned to the spec's width."""
    if value is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 0)
    return format(value, spec)


def short_names(paths: Sequence[str]) -> list[str]:
    """Column labels: each model's directory name (numbered when two share one)."""
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]


def format_report(report: dict, table: str = "layer") -> str:
    """Everything ``llm-merge inspect`` prints."""
    labels = short_names(report["models"])
    summary = report["summary"]
    if summary is None:
        return "nothing to inspect: no tensor is shared by every model and the base"
    width = max(len(label) for label in labels + ["model"])
    lines = [f"base: {report['base_model_path']}", "",
             f"{'model':<{width}}  {'rel.norm':>9}  {'w.cosine':>9}  {'med.rel':>8}  {'med.cos':>8}  {'changed':>8}  "
             f"{'top10%':>7}  {'top30%':>7}  {'ties':>6}  verdict"]
    for i, (label, verdict) in enumerate(zip(labels, report["verdict"])):
        top = summary["top_mass"][i]
        lines.append(f"{label:<{width}}  {_num(summary['relative_norm'][i], '9.4f')}  {_num(summary['weight_cosine'][i], '9.5f')}  "
                     f"{_num(verdict['median_relative_norm'], '8.4f')}  {_num(verdict['median_weight_cosine'], '8.4f')}  "
                     f"{_num(summary['changed_fraction'][i], '8.3f')}  {_num(top['0.1'], '7.3f')}  {_num(top['0.3'], '7.3f')}  "
                     f"{_num(summary['tied_fraction'][i], '6.3f')}  {verdict['level']}")
    lines += ["", "(rel.norm ||x-b||/||b|| and w.cosine cos(x, b) over all tensors; med.rel / med.cos: their medians over "
              "the matrices, which the verdict judges; changed: share of entries != base; top10%/top30%: share of the "
              "task-vector L1 mass in the largest 10%/30% of each tensor's entries; ties: share of non-zero magnitudes "
              "equal to another's in the same tensor)", "", "task-vector cosine:"]
    lines.append(" " * (width + 2) + "  ".join(f"{label:>{max(7, len(label))}}" for label in labels))
    for i, label in enumerate(labels):
        cells = "  ".join(f"{_num(c, '.3f'):>{max(7, len(labels[j]))}}" for j, c in enumerate(summary["task_vector_cosine"][i]))
        lines.append(f"{label:<{width}}  {cells}")
    lines += ["", conflict_line(summary)]
    if table != "none":
        lines += ["", *_rows(report, labels, table)]
    lines += ["", "compatibility:"] + [f"  {v['level'].upper():<9} {v['message']}" for v in report["verdict"]]
    if report["skipped"]:
        lines.append(f"not inspected: {len(report['skipped'])} tensor(s), e.g. {report['skipped'][0]['tensor']} "
                     f"({report['skipped'][0]['reason']})")
    lines += ["", *format_suggestions(report.get("suggestions"))]
    return "\n".join(lines)


def conflict_line(summary: dict) -> str:
    """The sign-conflict summary in one line (lower case, no final period: the table's style)."""
    if summary["sign_conflict_rate"] is None:
        return "sign conflicts: no entry changed by two or more models"
    return (f"sign conflicts: {summary['sign_conflict_rate']:.1%} of the entries changed by two or more models disagree "
            f"in sign ({summary['relative_sign_conflict']:.2f} of what independent signs give); TIES's sign election "
            f"would drop {summary['ties_dropped_mass']:.1%} of the task-vector L1 mass")


def _rows(report: dict, labels: list[str], table: str) -> list[str]:
    """The per-layer or per-tensor table: relative norm per model, mean pairwise cosine, conflicts, changed."""
    rows = report["layers"] if table == "layer" else report["tensors"][:TENSOR_ROWS]
    keys = [str(r["layer"]) if table == "layer" else r["name"] for r in rows]
    width = max([len(table)] + [len(k) for k in keys])
    head = f"{table:<{width}}  " + "  ".join(f"{('rel ' + label)[:10]:>10}" for label in labels)
    lines = [head + f"  {'cos(mean)':>9}  {'conflict':>8}  {'vs.chance':>9}  {'changed':>7}"]
    for key, row in zip(keys, rows):
        pairs = [row["task_vector_cosine"][i][j] for i in range(len(labels)) for j in range(i + 1, len(labels))]
        known = [p for p in pairs if p is not None]
        changed = [c for c in row["changed_fraction"] if c is not None]
        lines.append(f"{key:<{width}}  " + "  ".join(f"{_num(v, '10.4f')}" for v in row["relative_norm"])
                     + f"  {_num(sum(known) / len(known) if known else None, '9.3f')}  {_num(row['sign_conflict_rate'], '8.3f')}"
                     f"  {_num(row['relative_sign_conflict'], '9.3f')}  {_num(sum(changed) / len(changed) if changed else None, '7.3f')}")
    if table == "tensor" and len(report["tensors"]) > TENSOR_ROWS:
        lines.append(f"... and {len(report['tensors']) - TENSOR_ROWS} more tensors (see inspect.json)")
    return lines


def format_suggestions(suggestions: Optional[dict[str, Any]]) -> list[str]:
    """The suggestions: methods with reasons, weights and densities with their rules, the config and recipe."""
    if not suggestions:
        return []
    lines = []
    if suggestions["excluded"]:
        lines.append(f"left out of the suggestions ({MISMATCH}): {', '.join(suggestions['excluded'])}")
    if "note" in suggestions:
        return lines + [suggestions["note"]]
    lines.append(f"suggested methods (best first), from: {suggestions['evidence']}")
    lines += [f"  {m['method']}: {m['why']}" for m in suggestions["methods"]]
    lines += [f"weights ({suggestions['weight_rule']}):", f"densities ({suggestions['density_rule']}):"]
    for row in suggestions["per_model"]:
        lines.append(f"  {row['model']}: weight {row['weight']:.3f} (norm {row['task_vector_norm']:.4g}, redundancy "
                     f"{row['redundancy']:.2f}), density {row['density']:.2f} (keeps {row['kept_mass_at_density'] or 0:.0%})")
    lines += ["", "suggested JSON config (llm-merge CONFIG.json):", json.dumps(suggestions["config"], indent=2), "",
              "suggested mergekit recipe (llm-merge RECIPE.yml OUTPUT):", suggestions["recipe"].rstrip()]
    return lines
