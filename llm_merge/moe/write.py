"""Build an MoE: plan, gates, then every tensor streamed into the staged output and published atomically.

Workers (``--n_process``) take output tensors like the merge's: a tensor copied from the base or an expert is
read and written in chunks of CHUNK_ELEMENTS (its bytes as they are when the dtype does not change and no
noise or scale applies), so memory stays a few MB per worker; router rows are the gates' few KB per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import numpy as np

from llm_merge.backends.numpy_backend import NumpyOps
from llm_merge.errors import MergeError
from llm_merge.io import dtypes, writer
from llm_merge.io.reader import TensorReader
from llm_merge.io.shards import ShardWriter
from llm_merge.moe import draws
from llm_merge.moe.gates import compute_gates, encode_prompts
from llm_merge.moe.options import MoeConfig, check_options, check_output
from llm_merge.moe.plan import MoePlan, MoeTask, Piece, build_moe_plan
from llm_merge.moe.recipe import MoeRecipe
from llm_merge.run.pool import run_tasks

log = logging.getLogger(__name__)

#: Elements per chunk read, converted and written: 1 MiB of float32.
CHUNK_ELEMENTS = 1 << 18
#: The record written beside the weights: options, recipe and architecture.
RECORD_FILE = "moe_config.json"


class MoeWorker:
    """Writes MoE tasks into the staged shards of ``output_dir``; one per worker process."""

    def __init__(self, output_dir: Path, seed: int, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.seed = seed
        self.chunk = chunk_elements
        self.reader = TensorReader()
        self.writer = ShardWriter(output_dir)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()

    def run(self, task: MoeTask) -> int:
        """Write one output tensor; returns its bytes. An overflow to NaN/Inf is an error (``_check_finite``)."""
        out_dtype = dtypes.to_numpy(task.out.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            if task.values is not None:
                values = np.asarray(task.values, dtype=np.float32).reshape(-1)
                self._write(task, 0, values.astype(out_dtype), NumpyOps.count_nonfinite(values))
            elif task.columns:
                self._side_by_side(task, out_dtype)
            else:
                self._one_after_another(task, out_dtype)
        return task.out_bytes

    def _one_after_another(self, task: MoeTask, out_dtype: np.dtype) -> None:
        offset = 0
        for index, piece in enumerate(task.pieces):
            raw = piece.source is not None and piece.source.dtype == task.out.dtype and not piece.noise_scale \
                and piece.scale in (None, 1.0)
            for start in range(0, piece.numel, self.chunk):
                count = min(self.chunk, piece.numel - start)
                if raw:
                    self._write(task, offset + start, self.reader.read_raw(piece.source, start, count), 0, check=False)
                    continue
                values, before = self._values(task, index, piece, start, count)
                self._write(task, offset + start, values.astype(out_dtype), before)
            offset += piece.numel

    def _side_by_side(self, task: MoeTask, out_dtype: np.dtype) -> None:
        """Pieces [rows, c_k] placed side by side in [rows, sum c_k], a block of rows at a time."""
        rows, width = task.shape
        block = max(1, self.chunk // width)
        for first in range(0, rows, block):
            last = min(rows, first + block)
            out = np.empty((last - first, width), dtype=np.float32)
            column, before = 0, 0
            for index, piece in enumerate(task.pieces):
                cols = piece.shape[1]
                values, nonfinite = self._values(task, index, piece, first * cols, (last - first) * cols)
                out[:, column:column + cols] = values.reshape(last - first, cols)
                column += cols
                before += nonfinite
            self._write(task, first * width, out.reshape(-1).astype(out_dtype), before)

    def _values(self, task: MoeTask, index: int, piece: Piece, start: int, count: int) -> tuple[np.ndarray, int]:
        """Elements [start, start+count) of a piece in float32 with its noise and scale, and how many of its
        input values were NaN/Inf."""
        if piece.source is None:
            return np.zeros(count, dtype=np.float32), 0
        values = self.reader.read_f32(piece.source, start, np.empty(count, dtype=np.float32))
        before = NumpyOps.count_nonfinite(values)
        if piece.noise_scale:
            noise = draws.normal(draws.stream_key(self.seed, task.name, index), start, count)
            noise *= np.float32(piece.noise_scale)
            values += noise
        if piece.scale is not None and piece.scale != 1.0:
            values *= np.float32(piece.scale)
        return values, before

    def _write(self, task: MoeTask, element: int, data: np.ndarray, inputs_nonfinite: int, check: bool = True) -> None:
        if check:
            made = NumpyOps.count_nonfinite(data) - inputs_nonfinite
            if made > 0:
                raise MergeError(f"tensor {task.name}: {made} NaN/Inf value(s) from finite inputs (overflow in the "
                                 f"output dtype {task.out.dtype}: check noise_scale and residual_scale)")
        self.writer.write(task.out.file, task.out.start + element * data.dtype.itemsize, data)


def build_moe(recipe: MoeRecipe, cfg: MoeConfig) -> Path:
    """Build the MoE of ``recipe`` into ``cfg.output_path``; returns the published directory.

    Every check (options, architecture, shapes, vocabularies, prompts, the output path) runs before any work;
    the output is staged beside ``output_path`` and renamed into place only when complete.
    """
    check_options(cfg)
    plan = build_moe_plan(recipe, cfg)
    check_output(cfg, [("the base model", recipe.base_model)]
                 + [(f"expert {e.source_model}", e.source_model) for e in (*recipe.experts, *recipe.shared_experts)])
    prompts = encode_prompts(plan)
    output = Path(cfg.output_path)
    writer.check_output_path(output, cfg.overwrite)
    started = time.perf_counter()
    log.info("%s with %d experts (%d per token%s) from %s; router weights: %s", plan.target.architecture,
             len(recipe.experts), recipe.experts_per_token,
             f", {len(recipe.shared_experts)} shared" if recipe.shared_experts else "", plan.base.path, recipe.gate_mode)
    routed, shared = compute_gates(plan, prompts, cfg.seed)
    plan = plan.with_gates(routed, shared)
    log.info("router weights of %d layers in %.1f s", plan.layers, time.perf_counter() - started)
    writer.write_model_atomically(
        output, plan, overwrite=cfg.overwrite, prefix=cfg.merge_prefix, model_files_from=plan.base.path,
        fill=lambda staging: run_tasks(plan.tasks, functools.partial(MoeWorker, staging, cfg.seed), cfg.n_process,
                                       cfg.quiet, "building MoE"),
        records={"config.json": plan.config_json, RECORD_FILE: _record(plan, cfg)},
    )
    log.info("wrote %d tensors (%.2f GB) to %s in %.1f s", len(plan.tasks), plan.total_size / 1e9, output,
             time.perf_counter() - started)
    return output


def _record(plan: MoePlan, cfg: MoeConfig) -> dict:
    """moe_config.json: the options, the recipe as read, and the output architecture."""
    return {**dataclasses.asdict(cfg), "recipe_resolved": plan.recipe.as_record(), "architecture": plan.target.architecture,
            "output_dtype": plan.out_dtype, "layers": plan.layers, "hidden_size": plan.hidden}
