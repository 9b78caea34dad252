"""``--dry_run``: what a merge would do, from its plan alone (headers; no tensor data is read).

The expected time and peak memory are estimates from this project's benchmarks (benchmarks/README.md,
a 2-core VM, compiled kernels, warm page cache): input bytes over a per-method input rate, scaled by
``n_process`` ** ``WORKER_SCALING``, plus a fixed start-up; per worker ``PROCESS_BYTES`` plus the chunk
buffers and, for sparsifiers with whole-tensor statistics, at most the largest tensor's statistics. A
cold page cache or a slow disk can make a merge several times slower.
"""

from __future__ import annotations

import os
from typing import Any

from llm_merge import methods
from llm_merge.config.options import MergeConfig
from llm_merge.plan.layout import MergePlan

#: Input bytes merged per second by one worker, by sparsify type (linear / slerp-like merges for "none").
INPUT_BYTES_PER_SECOND = {"none": 2.0e9, "dare": 1.7e9, "trim": 1.0e9, "magprune": 0.55e9, "breadcrumbs": 0.5e9,
                          "magnitude": 0.8e9, "random": 1.5e9, "della_magprune": 0.5e9}
#: Input rate of sparsifiers missing from the table.
DEFAULT_INPUT_BYTES_PER_SECOND = 0.5e9
#: Speed-up of n workers: n ** WORKER_SCALING (1.6-1.8x for 2 workers on 2 cores in the benchmarks).
WORKER_SCALING = 0.75
#: Interpreter, imports and planning, seconds.
START_SECONDS = 0.5
#: Resident memory of one merging process before its tensors (peak RSS of a linear merge, one worker).
PROCESS_BYTES = 175_000_000
#: Chunk buffers per input and worker (float32 chunks of the generic path, raw chunks of the compiled one).
CHUNK_BUFFER_BYTES = 8 << 20
#: Whole-tensor statistics of one task at most (larger ones stream or run one at a time: run/engine.py).
STATISTICS_CAP_BYTES = 256 << 20


def plan_summary(cfg: MergeConfig, plan: MergePlan) -> dict[str, Any]:
    """The plan of a resolved ``cfg`` as plain values: tensors, bytes, shards, expected seconds and peak bytes."""
    tasks = plan.tasks
    merged = [t for t in tasks if t.mergeable]
    input_bytes = sum(t.in_bytes for t in tasks)
    workers = max(1, min(cfg.n_process, len(tasks), os.cpu_count() or 1))
    rate = INPUT_BYTES_PER_SECOND.get(cfg.sparsify_type, DEFAULT_INPUT_BYTES_PER_SECOND)
    seconds = START_SECONDS + input_bytes / (rate * workers ** WORKER_SCALING)
    sparsifier = methods.get("sparsify", cfg.sparsify_type)
    largest = max((t.numel for t in merged), default=0)
    statistics = min((4 + sparsifier.statistic_bytes) * largest, STATISTICS_CAP_BYTES) if sparsifier.prepare else 0
    inputs = max((len(t.inputs) + (t.base is not None) for t in tasks), default=0)
    per_worker = PROCESS_BYTES + CHUNK_BUFFER_BYTES * (inputs + 1) + statistics
    return {
        "merge_method": cfg.merge_method or f"{cfg.sparsify_type} + {cfg.merge_type}",
        "models": [str(m.path) for m in plan.models],
        "base_model_path": str(plan.base.path) if plan.base is not None else None,
        "output_path": cfg.output_path,
        "output_format": cfg.output_format,
        "tensors": len({t.name.split("[")[0] for t in tasks}),
        "tasks": len(tasks),
        "merged_tasks": len(merged),
        "copied_tasks": len(tasks) - len(merged),
        "input_bytes": input_bytes,
        "output_bytes": plan.total_size,
        "shards": [{"file": s.file, "bytes": s.size, "tensors": len(s.names)} for s in plan.shards],
        "n_process": cfg.n_process,
        "expected_seconds": round(seconds, 1),
        "expected_peak_bytes": per_worker * workers + (PROCESS_BYTES if workers > 1 else 0),
        "largest_tensor_elements": largest,
    }


def format_plan_summary(summary: dict[str, Any]) -> str:
    """The summary as a few lines for the terminal."""
    gb = 1e9
    base = f", base {summary['base_model_path']}" if summary["base_model_path"] else ""
    lines = [
        f"dry run: {summary['merge_method']} merge of {len(summary['models'])} model(s){base} into {summary['output_path']} "
        f"({summary['output_format']}); nothing was read or written",
        f"tensors: {summary['tensors']} ({summary['merged_tasks']} merged, {summary['copied_tasks']} copied"
        + (f", {summary['tasks']} tasks" if summary["tasks"] != summary["tensors"] else "") + ")",
        f"bytes: {summary['input_bytes'] / gb:.3f} GB read, {summary['output_bytes'] / gb:.3f} GB written",
        f"shards: {len(summary['shards'])}",
    ]
    lines += [f"  {s['file']}  {s['bytes'] / gb:.3f} GB  {s['tensors']} tensors" for s in summary["shards"][:20]]
    if len(summary["shards"]) > 20:
        lines.append(f"  ... and {len(summary['shards']) - 20} more")
    lines += [
        f"expected time: ~{summary['expected_seconds']:.1f} s with --n_process {summary['n_process']} "
        "(estimate from the benchmarks; warm page cache)",
        f"expected peak memory: ~{summary['expected_peak_bytes'] / 1e6:.0f} MB (all processes; estimate)",
    ]
    return "\n".join(lines)
