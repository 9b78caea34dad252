"""``llm-merge inspect``: plan the tensors as a merge would, stream them through the worker pool, and
write the report.

The plan is a linear merge's of the same inputs (``plan.build``: names, shapes, vocabularies and
tied heads reconciled from headers); every merged tensor that all models and the base have becomes
one task (``worker``); the others are listed as skipped. With ``--output_path`` the files are
written in a staging directory beside it and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

from llm_merge.io import side_files, writer
from llm_merge.io.signals import stop_signals_raise
from llm_merge.lora.reference import open_references
from llm_merge.plan.build import build_plan
from llm_merge.report.inspection.assemble import build_report
from llm_merge.report.inspection.options import InspectConfig, resolve_inspect_config
from llm_merge.report.inspection.worker import InspectTask, InspectWorker
from llm_merge.run.pool import PartFile, run_tasks

log = logging.getLogger(__name__)

REPORT_FILE = "inspect.json"
HTML_FILE = "inspect.html"
CONFIG_FILE = "suggested_config.json"
RECIPE_FILE = "suggested_recipe.yml"
_PARTS = ".parts"


def inspect_models(cfg: InspectConfig) -> dict:
    """Inspect the models of ``cfg`` against their base; returns the report (and writes it with ``output_path``)."""
    cfg = resolve_inspect_config(cfg)
    render_html = None
    if cfg.output_path and cfg.html:
        from llm_merge.report.inspection.html import render_html  # fails now, naming the extra, without matplotlib
    merge_cfg = cfg.merge_config()
    plan = build_plan(merge_cfg, None, open_references(merge_cfg))  # MODEL+LORA: the adapter folded on the fly
    tasks, skipped = inspection_tasks(plan)
    output = Path(cfg.output_path) if cfg.output_path else None
    if output is not None:
        writer.check_output_path(output, cfg.overwrite)
    started = time.perf_counter()
    with stop_signals_raise(), _work_directory(output) as work:
        parts = work / _PARTS
        parts.mkdir()
        run_tasks(tasks, functools.partial(InspectWorker, parts), cfg.n_process, cfg.quiet, "inspecting", cfg.start_method)
        sums = {task.name: side_files.read_json(parts / task.out.file) for task in tasks}
        shutil.rmtree(parts)
        report = build_report(dataclasses.asdict(cfg), cfg.base_model_path, list(cfg.model_path_list), tasks, sums,
                              skipped, cfg.layer_pattern, cfg.density_mass)
        report["seconds"] = round(time.perf_counter() - started, 3)
        report["bytes_read"] = sum(t.in_bytes for t in tasks)
        if output is not None:
            _write_files(work, report, render_html)
            writer.fsync_directory(work)
            writer.publish(work, output, cfg.overwrite)
    log.info("inspected %d tensors of %d model(s) (%.2f GB read) in %.1f s", len(tasks), len(cfg.model_path_list),
             report["bytes_read"] / 1e9, report["seconds"])
    return report


def inspection_tasks(plan) -> tuple[list[InspectTask], list[dict]]:
    """One task per merged tensor (or row range) that every model and the base have; the rest, with the reason."""
    tasks, skipped = [], []
    for task in plan.tasks:
        reason = _skip_reason(task, len(plan.models))
        if reason:
            skipped.append({"tensor": task.name, "reason": reason})
            continue
        tasks.append(InspectTask(len(tasks), task.name, task.shape, task.inputs, task.base, PartFile(f"{len(tasks):06d}.json")))
    return tasks, skipped


def _skip_reason(task, n_models: int) -> Optional[str]:
    if not task.mergeable:
        return "not a float tensor, or copied from one input"
    if task.base is None:
        return "the base lacks it"
    if task.models is not None or len(task.inputs) != n_models:
        return "only some models have it"
    if task.numel == 0:
        return "empty"
    return None


@contextlib.contextmanager
def _work_directory(output: Optional[Path]) -> Iterator[Path]:
    """The staging directory beside ``output``, or a temporary directory when nothing is written."""
    if output is not None:
        with writer.staging_directory(output) as staging:
            yield staging
    else:
        with tempfile.TemporaryDirectory(prefix="llm_merge-inspect-") as temporary:
            yield Path(temporary)


def _write_files(directory: Path, report: dict, render_html) -> None:
    writer.write_json(directory / REPORT_FILE, report)
    suggestions = report.get("suggestions") or {}
    if "config" in suggestions:
        writer.write_json(directory / CONFIG_FILE, suggestions["config"])
        (directory / RECIPE_FILE).write_text(suggestions["recipe"])
    if render_html is not None:
        (directory / HTML_FILE).write_text(render_html(report), encoding="utf-8")
