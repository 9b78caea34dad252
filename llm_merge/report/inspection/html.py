"""The inspection report as one self-contained HTML page: tables, the suggestions and plots drawn with
matplotlib (``pip install 'llm_merge[report]'``), embedded as PNG data URIs; no script, no external file.

Plots: the task-vector cosine of every model pair per layer (heatmap), the relative task-vector norm
of every model per layer, the sign-conflict rate per layer (and its ratio to chance), and the L1 mass
each density keeps per model.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any, Optional, Sequence

from llm_merge.errors import ConfigError
from llm_merge.report.inspection.text import conflict_line, short_names

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError:  # the [report] extra; refused by name before any work (inspect_models imports this module first)
    raise ConfigError("--html: the HTML report needs matplotlib: pip install 'llm_merge[report]' (or pass --html false)") from None

_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #bbb;padding:3px 8px;text-align:right;font-size:13px}th{background:#eee}td.name{text-align:left}
.ok{background:#dfd}.doubtful{background:#ffd}.mismatch{background:#fcc}.unknown{background:#eee}pre{background:#f6f6f6;
padding:8px;overflow-x:auto}img{max-width:100%;border:1px solid #ddd;margin:8px 0}"""


def render_html(report: dict[str, Any]) -> str:
    """The page for an inspection report (``assemble.build_report``)."""
    labels = short_names(report["models"])
    esc = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>llm-merge inspect</title>"
             f"<style>{_STYLE}</style></head><body><h1>llm-merge inspect</h1>",
             f"<p>Base: <code>{esc(report['base_model_path'])}</code>; {len(report['tensors'])} tensors inspected "
             f"({report.get('bytes_read', 0) / 1e9:.3f} GB read in {report.get('seconds', 0):.1f} s), "
             f"llm_merge {esc(report['llm_merge_version'])}.</p>", "<h2>Compatibility</h2>", _verdict_table(report, labels)]
    summary = report["summary"]
    if summary is not None:
        parts += ["<h2>Models</h2>", _model_table(report, labels), "<h2>Task-vector cosine</h2>",
                  _matrix_table(summary["task_vector_cosine"], labels),
                  f"<p>{esc(_conflict_words(summary))}</p>", "<h2>Plots</h2>",
                  *(f"<img alt='{esc(alt)}' src='data:image/png;base64,{png}'>" for alt, png in _plots(report, labels))]
    parts += _suggestions(report.get("suggestions"))
    if report["layers"]:
        parts += ["<h2>Layers</h2>", _rows_table(report["layers"], "layer", labels)]
    parts += ["<details><summary>Tensors</summary>", _rows_table(report["tensors"], "name", labels), "</details>"]
    if report["skipped"]:
        parts.append("<h2>Not inspected</h2><ul>" + "".join(
            f"<li><code>{esc(s['tensor'])}</code>: {esc(s['reason'])}</li>" for s in report["skipped"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _num(value: Optional[float], spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _verdict_table(report: dict, labels: list[str]) -> str:
    rows = "".join(f"<tr class='{v['level']}'><td class='name'>{html.escape(label)}</td><td>{v['level']}</td>"
                   f"<td>{_num(v['median_weight_cosine'])}</td><td>{_num(v['median_relative_norm'])}</td>"
                   f"<td class='name'>{html.escape(v['message'])}</td></tr>" for label, v in zip(labels, report["verdict"]))
    return ("<table><tr><th>model</th><th>verdict</th><th>median cos(x, b)</th><th>median ||x-b||/||b||</th>"
            f"<th>why</th></tr>{rows}</table>")


def _model_table(report: dict, labels: list[str]) -> str:
    s = report["summary"]
    head = "".join(f"<th>{h}</th>" for h in ("model", "||x-b||/||b||", "cos(x, b)", "changed", "top 10% mass",
                                            "top 30% mass", "tied magnitudes", "TIES-dropped mass"))
    rows = "".join(
        f"<tr><td class='name'>{html.escape(label)}</td><td>{_num(s['relative_norm'][i])}</td><td>{_num(s['weight_cosine'][i], '.5f')}</td>"
        f"<td>{_num(s['changed_fraction'][i], '.3f')}</td><td>{_num(s['top_mass'][i]['0.1'], '.3f')}</td>"
        f"<td>{_num(s['top_mass'][i]['0.3'], '.3f')}</td><td>{_num(s['tied_fraction'][i], '.3f')}</td>"
        f"<td>{_num(s['ties_dropped_mass_per_model'][i], '.3f')}</td></tr>" for i, label in enumerate(labels))
    return f"<table><tr>{head}</tr>{rows}</table>"


def _matrix_table(matrix: Sequence[Sequence[Optional[float]]], labels: list[str]) -> str:
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(label)}</th>" for label in labels) + "</tr>"
    rows = "".join(f"<tr><th>{html.escape(label)}</th>" + "".join(f"<td>{_num(c, '.3f')}</td>" for c in row) + "</tr>"
                   for label, row in zip(labels, matrix))
    return f"<table>{head}{rows}</table>"


def _rows_table(rows: list[dict], key: str, labels: list[str]) -> str:
    head = f"<tr><th>{key}</th>" + "".join(f"<th>||t||/||b|| {html.escape(label)}</th>" for label in labels) + \
           "<th>mean pair cosine</th><th>sign conflict</th><th>vs. chance</th><th>TIES-dropped mass</th></tr>"
    body = []
    for row in rows:
        k = len(labels)
        pairs = [row["task_vector_cosine"][i][j] for i in range(k) for j in range(i + 1, k)]
        known = [p for p in pairs if p is not None]
        body.append(f"<tr><td class='name'>{html.escape(str(row[key]))}</td>"
                    + "".join(f"<td>{_num(v)}</td>" for v in row["relative_norm"])
                    + f"<td>{_num(sum(known) / len(known) if known else None, '.3f')}</td><td>{_num(row['sign_conflict_rate'], '.3f')}</td>"
                    f"<td>{_num(row['relative_sign_conflict'], '.3f')}</td><td>{_num(row['ties_dropped_mass'], '.3f')}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _conflict_words(summary: dict) -> str:
    """The terminal report's sign-conflict line as a sentence."""
    line = conflict_line(summary)
    return line[0].upper() + line[1:] + "."


def _suggestions(suggestions: Optional[dict]) -> list[str]:
    if not suggestions:
        return []
    esc = html.escape
    parts = ["<h2>Suggestions</h2>"]
    if suggestions["excluded"]:
        parts.append(f"<p>Left out (they do not share the base): {esc(', '.join(suggestions['excluded']))}</p>")
    if "note" in suggestions:
        return parts + [f"<p>{esc(suggestions['note'])}</p>"]
    parts += [f"<p>From: {esc(suggestions['evidence'])}.</p><ol>"]
    parts += [f"<li><b>{esc(m['method'])}</b>: {esc(m['why'])}</li>" for m in suggestions["methods"]]
    parts += ["</ol>", f"<p>Weights: {esc(suggestions['weight_rule'])}.<br>Densities: {esc(suggestions['density_rule'])}.</p>",
              "<table><tr><th>model</th><th>||t||</th><th>redundancy</th><th>weight</th><th>density</th><th>mass kept</th></tr>"]
    parts += [f"<tr><td class='name'>{esc(r['model'])}</td><td>{r['task_vector_norm']:.4g}</td><td>{r['redundancy']:.2f}</td>"
              f"<td>{r['weight']:.3f}</td><td>{r['density']:.2f}</td><td>{_num(r['kept_mass_at_density'], '.3f')}</td></tr>"
              for r in suggestions["per_model"]]
    parts += ["</table>", "<h3>JSON config</h3>", f"<pre>{esc(json.dumps(suggestions['config'], indent=2))}</pre>",
              "<h3>mergekit YAML recipe</h3>", f"<pre>{esc(suggestions['recipe'])}</pre>"]
    return parts


def _plots(report: dict, labels: list[str]) -> list[tuple[str, str]]:
    """(alt text, base64 PNG) of each plot."""
    layers = [row for row in report["layers"] if row["layer"] != "other"] or report["layers"]
    names = [str(row["layer"]) for row in layers]
    k = len(labels)
    plots = []
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    if pairs:
        figure = Figure(figsize=(max(6, 0.35 * len(names) + 3), 0.45 * len(pairs) + 2))
        axes = figure.subplots()
        values = [[_nan(row["task_vector_cosine"][i][j]) for row in layers] for i, j in pairs]
        image = axes.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        axes.set_yticks(range(len(pairs)), [f"{labels[i]} · {labels[j]}" for i, j in pairs])
        axes.set_xticks(range(len(names)), names, rotation=90 if len(names) > 20 else 0)
        axes.set_xlabel("layer")
        axes.set_title("task-vector cosine per layer")
        figure.colorbar(image, ax=axes)
        plots.append(("task-vector cosine per layer", _png(figure)))
    figure = Figure(figsize=(8, 4))
    axes = figure.subplots()
    for i, label in enumerate(labels):
        axes.plot(range(len(names)), [_nan(row["relative_norm"][i]) for row in layers], marker="o", label=label)
    axes.set_xticks(range(len(names)), names, rotation=90 if len(names) > 20 else 0)
    axes.set_xlabel("layer")
    axes.set_ylabel("||x - b|| / ||b||")
    axes.set_yscale("log")
    axes.set_title("relative task-vector norm per layer")
    axes.legend(fontsize=8)
    plots.append(("relative task-vector norm per layer", _png(figure)))
    if k >= 2:
        figure = Figure(figsize=(8, 4))
        axes = figure.subplots()
        axes.bar(range(len(names)), [_nan(row["sign_conflict_rate"]) for row in layers], color="#c44", label="conflict rate")
        axes.plot(range(len(names)), [_nan(row["relative_sign_conflict"]) for row in layers], color="k", marker="o",
                  label="conflicts / chance")
        axes.set_xticks(range(len(names)), names, rotation=90 if len(names) > 20 else 0)
        axes.set_xlabel("layer")
        axes.set_ylim(0, 1.05)
        axes.set_title("TIES sign conflicts per layer")
        axes.legend(fontsize=8)
        plots.append(("TIES sign conflicts per layer", _png(figure)))
    curves = report["kept_mass_curves"]
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for label, curve in zip(labels, curves["per_model"]):
        axes.plot(curves["densities"], [_nan(v) for v in curve], label=label)
    axes.set_xlabel("density (fraction of each tensor's entries kept)")
    axes.set_ylabel("share of the L1 mass kept")
    axes.set_title("what a density keeps")
    axes.legend(fontsize=8)
    plots.append(("what a density keeps", _png(figure)))
    return plots


def _nan(value: Optional[float]) -> float:
    return float("nan") if value is None else value


def _png(figure: Figure) -> str:
    figure.tight_layout()
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
