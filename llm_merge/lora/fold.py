"""Execute a fold plan: W' = W + scale * delta per adapted weight, streamed in row blocks.

Every output tensor is written at its planned offset of a staged shard, one row
block at a time (delta rows = left[rows] @ right, or the transposed block), so
memory stays bounded by a block plus the (small) LoRA factors of one weight.
Workers pull tensors from a queue like the merge's runner; a failing or dying
worker stops the run and nothing is published.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from llm_merge.backends.numpy_backend import NumpyOps
from llm_merge.errors import MergeError
from llm_merge.io import dtypes, writer
from llm_merge.io.derived import low_rank_rows
from llm_merge.io.reader import TensorReader
from llm_merge.io.safetensors_format import TensorInfo
from llm_merge.io.gguf_output.layout import plan_gguf
from llm_merge.io.gguf_output.publish import write_gguf_atomically
from llm_merge.io.gguf_output.writer import GGUFWriterFactory
from llm_merge.io.shards import ShardWriter
from llm_merge.plan.reconcile import read_model_config
from llm_merge.run.pool import run_tasks
from llm_merge.lora.adapter import AdapterTensor
from llm_merge.lora.options import LoraMergeConfig, resolve_config
from llm_merge.lora.plan import FoldPlan, FoldTask, build_fold_plan

log = logging.getLogger(__name__)

#: Elements per block (base rows x columns): 1 MiB of float32, with as much again for its delta.
CHUNK_ELEMENTS = 1 << 18
Source = Union[TensorInfo, AdapterTensor]


class TensorFolder:
    """Writes fold tasks into the staged shards of ``output_dir``; one instance per worker."""

    def __init__(self, output_dir: Path, chunk_elements: Optional[int] = None, make_writer: Optional[Callable[[Path], Any]] = None) -> None:
        self.chunk = chunk_elements or CHUNK_ELEMENTS
        self.reader = TensorReader()
        self.writer = make_writer(output_dir) if make_writer is not None else ShardWriter(output_dir)  # e.g. GGUF
        self._scratch = np.empty(0, dtype=np.float32)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()

    def run(self, task: FoldTask) -> int:
        """Fold (or copy) one tensor into its output slot; returns the output bytes.

        NumPy's overflow warnings are off: an output value that overflows is an error (``_check_finite``).
        """
        with np.errstate(over="ignore", invalid="ignore"):
            if task.lora is not None:
                self._fold(task)
            else:
                self._copy(task, task.replace if task.replace is not None else task.base)
        return task.out_bytes

    def _copy(self, task: FoldTask, source: Source) -> None:
        out_dtype = dtypes.to_numpy(task.out.dtype)
        raw = source.dtype == task.out.dtype
        for start in range(0, task.numel, self.chunk):
            count = min(self.chunk, task.numel - start)
            if raw:
                data = self._read_raw(source, start, count)
            else:
                values = self._read_f32(source, start, count)
                before = NumpyOps.count_nonfinite(values)
                data = values.astype(out_dtype)
                self._check_finite(task, data, before)
            self.writer.write(task.out.file, task.out.start + start * out_dtype.itemsize, data)

    @staticmethod
    def _check_finite(task: FoldTask, out: np.ndarray, inputs_nonfinite: int) -> None:
        """MergeError when an output block holds more NaN/Inf values than its inputs did."""
        made = NumpyOps.count_nonfinite(out) - inputs_nonfinite
        if made > 0:
            raise MergeError(f"tensor {task.name}: the fold made {made} NaN/Inf value(s) from finite inputs "
                             f"(overflow in float32 or in the output dtype {task.out.dtype}: check lora_alpha and the patterns)")

    def _fold(self, task: FoldTask) -> None:
        pair = task.lora
        left = self._read_f32(pair.left, 0, int(np.prod(pair.left.shape))).reshape(pair.left.shape).copy()
        right = self._read_f32(pair.right, 0, int(np.prod(pair.right.shape))).reshape(pair.right.shape).copy()
        rows, cols = task.shape
        out_dtype = dtypes.to_numpy(task.out.dtype)
        block = max(1, self.chunk // max(cols, 1))
        factors_nonfinite = NumpyOps.count_nonfinite(left) + NumpyOps.count_nonfinite(right)
        for first in range(0, rows, block):
            last = min(rows, first + block)
            weights = self._read_f32(task.base, first * cols, (last - first) * cols).reshape(last - first, cols)
            before = NumpyOps.count_nonfinite(weights)
            weights += low_rank_rows(left, right, pair.scale, pair.transpose, first, last)  # as a model+lora input reads it
            out = weights.astype(out_dtype, copy=False)
            if not factors_nonfinite:  # a NaN factor spreads over whole rows: the inputs had it
                self._check_finite(task, out, before)
            self.writer.write(task.out.file, task.out.start + first * cols * out_dtype.itemsize, out)

    def _read_f32(self, source: Source, start: int, count: int) -> np.ndarray:
        """Elements [start, start+count) as float32 (a reused buffer for file reads)."""
        info = source if isinstance(source, TensorInfo) else source.info
        if info is None:
            return source.array.reshape(-1)[start : start + count].astype(np.float32)
        if self._scratch.size < count:
            self._scratch = np.empty(max(count, self.chunk), dtype=np.float32)
        return self.reader.read_f32(info, start, self._scratch[:count])

    def _read_raw(self, source: Source, start: int, count: int) -> np.ndarray:
        info = source if isinstance(source, TensorInfo) else source.info
        if info is None:
            return source.array.reshape(-1)[start : start + count]
        return self.reader.read_raw(info, start, count)


# -- API -------------------------------------------------------------------------------


def merge_lora(cfg: LoraMergeConfig) -> Path:
    """Fold the adapter of ``cfg`` into its base model; returns the published output directory.

    Every check runs before anything is written; output is staged beside
    ``output_path``, verified, and renamed into place only when complete.
    """
    cfg = resolve_config(cfg)
    plan = build_fold_plan(cfg)
    output = Path(cfg.output_path)
    writer.check_output_path(output, cfg.overwrite)
    adapter = plan.adapter
    log.info(
        "folding %d LoRA pair(s) from %s (%s, r=%d, lora_alpha=%g%s) into %s",
        plan.folded, adapter.path, adapter.format, adapter.r, adapter.lora_alpha, ", rslora" if adapter.rslora else "", plan.base.path,
    )
    started = time.perf_counter()
    if cfg.output_format == "gguf":  # one .gguf file, converted tensor by tensor as it is folded
        config = read_model_config(plan.base.path)
        layout = plan_gguf(plan.shards, config, str(plan.base.path / "config.json"), plan.base.path, cfg.gguf_type,
                           f"{cfg.merge_prefix}.gguf", output.name)
        make_folder = functools.partial(TensorFolder, make_writer=GGUFWriterFactory(layout))
        write_gguf_atomically(output, layout, overwrite=cfg.overwrite, records={"lora_merge_config.json": _record(plan, cfg)},
                              fill=lambda staging: run_tasks(plan.tasks, functools.partial(make_folder, staging), cfg.n_process, cfg.quiet, "folding"))
        log.info("wrote %d tensors to %s in %.1f s", len(layout.tensors), output / layout.file, time.perf_counter() - started)
        return output
    writer.write_model_atomically(
        output,
        plan,
        overwrite=cfg.overwrite,
        prefix=cfg.merge_prefix,
        fill=lambda staging: run_tasks(plan.tasks, functools.partial(TensorFolder, staging), cfg.n_process, cfg.quiet, "folding"),
        model_files_from=plan.base.path,
        records={"lora_merge_config.json": _record(plan, cfg)},
    )
    log.info("wrote %d tensors (%.2f GB) to %s in %.1f s", len(plan.tasks), plan.total_size / 1e9, output, time.perf_counter() - started)
    return output


def _record(plan: FoldPlan, cfg: LoraMergeConfig) -> dict:
    """lora_merge_config.json: the options, the adapter's settings and what was folded."""
    adapter = plan.adapter
    return {
        **dataclasses.asdict(cfg),
        "adapter_format": adapter.format,
        "r": adapter.r,
        "lora_alpha": adapter.lora_alpha,
        "rslora": adapter.rslora,
        "folded": {t.name: {"scale": t.lora.scale, "transposed": t.lora.transpose} for t in plan.tasks if t.lora},
        "replaced": [t.name for t in plan.tasks if t.replace is not None],
    }
