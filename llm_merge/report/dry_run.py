"""``--dry_run``: what a merge would do, from its plan alone (headers; no tensor data is read).

The expected time and peak memory are estimates from this project's benchmarks (benchmarks/README.md,
a 2-core VM, warm page cache): input bytes over the methods' measured input rate
(``Method.input_bytes_per_second``), scaled by ``n_process`` ** ``WORKER_SCALING``, plus a fixed start-up
and either the kernels' load or, where ``run.kernel_choice`` finds them not worth loading, what plain
NumPy costs more; per worker ``PROCESS_BYTES`` (chunk buffers included) plus, for sparsifiers with
whole-tensor statistics, the largest tensor's statistics (a few MB where the compiled kernels stream
them, else the whole task vector and its statistics, capped), and for methods that read their inputs
more than once the inputs they keep mapped between passes (capped). A cold page cache or a slow disk can
make a merge several times slower.
"""

from __future__ import annotations

import math
import os
from typing import Any

from llm_merge import methods
from llm_merge.config.options import PER_MODEL_OPTIONS, MergeConfig
from llm_merge.plan.layout import MergePlan
from llm_merge.run.chunks import reads_inputs_again
from llm_merge.run.engine import TensorMerger
from llm_merge.run.kernel_choice import KERNEL_LOAD_SECONDS, numpy_extra_seconds, worth_compiling

#: Input rate of a sparsifier that declares none (``Method.input_bytes_per_second``).
DEFAULT_INPUT_BYTES_PER_SECOND = 0.5e9
#: Speed-up of n workers: n ** WORKER_SCALING (1.6-1.8x for 2 workers on 2 cores in the benchmarks).
WORKER_SCALING = 0.75
#: Interpreter, imports and planning, seconds (the benchmarks' ``startup`` row: 0.15 s); loading the compiled
#: kernels adds ``run.kernel_choice.KERNEL_LOAD_SECONDS``, a merge in plain NumPy its methods' NumPy cost.
START_SECONDS = 0.2
#: Peak resident memory per worker of a merge without whole-tensor statistics, chunk buffers included (the
#: benchmarks' linear merge: 174 MB at n_process 1, 351 MB for all processes at n_process 2).
PROCESS_BYTES = 175_000_000
#: Whole-tensor statistics of one task at most (larger ones stream or run one at a time: run/engine.py).
STATISTICS_CAP_BYTES = 256 << 20
#: Streamed statistics of one task (trim thresholds, bfloat16 rank tables: della measured 191 MB against 174).
STREAMED_STATISTICS_BYTES = 16 << 20


def plan_summary(cfg: MergeConfig, plan: MergePlan) -> dict[str, Any]:
    """The plan of a resolved ``cfg`` as plain values: tensors, bytes, shards, expected seconds and peak bytes."""
    tasks = plan.tasks
    merged = [t for t in tasks if t.mergeable]
    input_bytes = sum(t.in_bytes for t in tasks)
    workers = max(1, min(cfg.n_process, len(tasks), os.cpu_count() or 1))
    sparsifier, merge = methods.get("sparsify", cfg.sparsify_type), methods.get("merge", cfg.merge_type)
    rate = min(sparsifier.input_bytes_per_second or DEFAULT_INPUT_BYTES_PER_SECOND,
               merge.input_bytes_per_second or math.inf)
    seconds = START_SECONDS + input_bytes / (rate * workers ** WORKER_SCALING)
    compiled = cfg.tensor_type == "np" and worth_compiling(cfg, input_bytes)
    if cfg.tensor_type == "np":  # the kernels' load, or what NumPy costs more where they are not worth it
        seconds += KERNEL_LOAD_SECONDS if compiled else numpy_extra_seconds(cfg, input_bytes)
    largest = max((t.numel for t in merged), default=0)
    statistics = 0
    if sparsifier.prepare and not _streamed(cfg, sparsifier, merge, merged, compiled):
        statistics = min((4 + sparsifier.statistic_bytes) * largest, STATISTICS_CAP_BYTES)
    elif sparsifier.prepare:
        statistics = STREAMED_STATISTICS_BYTES
    per_worker = PROCESS_BYTES + statistics
    if reads_inputs_again(sparsifier, merge):  # inputs mapped from pass to pass
        per_worker += min(TensorMerger.KEEP_MAPPED_BYTES, max((t.in_bytes for t in merged), default=0))
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
        "expected_peak_bytes": per_worker * workers,
        "largest_tensor_elements": largest,
    }


def _size(nbytes: int) -> str:
    """Bytes in MB below 1 GB, else in GB (decimal units)."""
    return f"{nbytes / 1e6:.2f} MB" if nbytes < 1e9 else f"{nbytes / 1e9:.2f} GB"


def _streamed(cfg: MergeConfig, sparsifier, merge, merged: list, compiled: bool) -> bool:
    """Whether the compiled kernels stream the sparsifier's statistics (no whole task vector; run/engine.py decides
    per task: the compiled NumPy backend, fused methods, one value per option, streamed dtypes)."""
    in_dtypes = {i.dtype for t in merged for i in (*t.inputs, *([t.base] if t.base is not None else []))}
    return (compiled and sparsifier.fused and merge.fused and cfg.scale == 1.0 and not cfg.tensor_parameters
            and all(getattr(cfg, f"{name}_list") is None for name in PER_MODEL_OPTIONS) and sparsifier.streams(in_dtypes))


def format_plan_summary(summary: dict[str, Any]) -> str:
    """The summary as a few lines for the terminal."""
    base = f", base {summary['base_model_path']}" if summary["base_model_path"] else ""
    lines = [
        f"dry run: {summary['merge_method']} merge of {len(summary['models'])} model(s){base} into {summary['output_path']} "
        f"({summary['output_format']}); nothing was read or written",
        f"tensors: {summary['tensors']} ({summary['merged_tasks']} merged, {summary['copied_tasks']} copied"
        + (f", {summary['tasks']} tasks" if summary["tasks"] != summary["tensors"] else "") + ")",
        f"bytes: {_size(summary['input_bytes'])} read, {_size(summary['output_bytes'])} written",
        f"shards: {len(summary['shards'])}",
    ]
    lines += [f"  {s['file']}  {_size(s['bytes'])}  {s['tensors']} tensors" for s in summary["shards"][:20]]
    if len(summary["shards"]) > 20:
        lines.append(f"  ... and {len(summary['shards']) - 20} more")
    lines += [
        f"expected time: ~{summary['expected_seconds']:.1f} s with --n_process {summary['n_process']} "
        "(estimate from the benchmarks; warm page cache)",
        f"expected peak memory: ~{summary['expected_peak_bytes'] / 1e6:.0f} MB (all processes; estimate)",
    ]
    return "\n".join(lines)
