"""Merge one tensor: read inputs chunk by chunk, sparsify, merge, add the base, write.

Per tensor, up to three passes over element chunks (flat ranges of the
row-major data, so any tensor size streams in bounded memory):
1. prepare (sparsifiers needing whole-tensor statistics, e.g. trim's threshold):
   the full task vector of one model at a time;
2. reduce (merges needing whole-tensor sums, e.g. slerp's norms): additive sums, in one pass or in
   several when a later pass needs the sums of an earlier one (arcee_fusion's exact quantiles);
3. apply: per chunk, sparsify every model, merge, add the base, cast and write.

The method specs (``methods.registry``) say what runs: the ops functions, their statistics, and
which compiled pieces exist (a compiled twin, the fused apply pass, streamed statistics). The
engine asks the specs, never a method's name; parameters bind through ``run.binding``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from llm_merge import methods
from llm_merge.backends import CHUNK_ELEMENTS, get_ops
from llm_merge.backends.numpy_backend import NumpyOps
from llm_merge.config.options import MergeConfig
from llm_merge.errors import MergeError
from llm_merge.io import dtypes
from llm_merge.io.reader import TensorReader
from llm_merge.io.spill import SpilledArray
from llm_merge.io.shards import ShardWriter
from llm_merge.kernels.counter_rng import CounterRNG, draw_key
from llm_merge.plan.layout import TensorTask
from llm_merge.run.binding import call, per_model_options, task_options
from llm_merge.run.chunks import KeptMappings, chunk_ranges, lane_of, reads_inputs_again, run_statistic, slice_per_element

log = logging.getLogger(__name__)


class MergerFactory:
    """Makes a TensorMerger in each worker process (picklable: config and flags only)."""

    def __init__(self, cfg: MergeConfig, compiled: bool = True, output_dir: Optional[Path] = None,
                 make_writer: Optional[Callable[[Path], Any]] = None) -> None:
        self.cfg = cfg
        self.compiled = compiled
        self.output_dir = output_dir
        self.make_writer = make_writer  # the output's writer in a worker (None: ShardWriter; e.g. GGUF)
        if compiled and cfg.tensor_type == "np":
            get_ops("np", compiled=True)  # import the kernels before workers fork

    def bind(self, output_dir: Path, make_writer: Optional[Callable[[Path], Any]] = None) -> "MergerFactory":
        return MergerFactory(self.cfg, self.compiled, output_dir, make_writer)

    def __call__(self) -> "TensorMerger":
        ops = get_ops(self.cfg.tensor_type, self.cfg.device, compiled=self.compiled)
        writer = self.make_writer(self.output_dir) if self.make_writer is not None else None
        return TensorMerger(self.cfg, ops, self.output_dir, compiled=self.compiled, writer=writer)


class TensorMerger:
    """Merges tasks of one plan; one instance per worker process."""

    def __init__(self, cfg: MergeConfig, ops: Any, output_dir: Path, chunk_elements: int = CHUNK_ELEMENTS, compiled: bool = True,
                 writer: Any = None) -> None:
        self.cfg = cfg
        self.ops = ops
        self.host = ops if isinstance(ops, NumpyOps) else NumpyOps(compiled)
        self.chunk = chunk_elements
        self.sparsifier = methods.get("sparsify", cfg.sparsify_type)
        self.merger = methods.get("merge", cfg.merge_type)
        self.sparsify_fn = self._compiled_twin("sparsify", self.sparsifier) or self.sparsifier.fn
        self.merge_fn = self._compiled_twin("merge", self.merger) or self.merger.fn
        self.prepare_fn = self._compiled_twin("prepare", self.sparsifier) or self.sparsifier.prepare
        self.options = self._all_options = dataclasses.asdict(cfg)
        self.reader = TensorReader()
        self.writer = writer if writer is not None else ShardWriter(output_dir)  # write(file, offset, data), directory, close()
        self._buffers: dict[str, np.ndarray] = {}
        self._nonfinite: list[int] = []  # NaN/Inf values read, per input (the base last)
        self._out_nonfinite = 0  # NaN/Inf values written
        self._spilled: list[SpilledArray] = []
        self._engine_values: dict[str, Any] = {}
        self._mapped = KeptMappings()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()

    def _compiled_twin(self, kind: str, method: methods.Method):
        """The backend's compiled twin of a method's function (``kind``: sparsify, merge or prepare), or None."""
        twin = getattr(self.ops, "kernel", None)
        return twin(kind, method.kernel) if twin is not None and method.kernel is not None else None

    #: Tasks whose whole-tensor statistics need more than this run one at a time across workers.
    EXCLUSIVE_BYTES = 256 << 20
    #: Per-element statistics at least this large wait on disk between the prepare and apply passes.
    SPILL_BYTES = 32 << 20
    #: Elements per chunk of the compiled apply pass (2 MB of bfloat16 per input; the kernel blocks it for the cache).
    FUSED_CHUNK = 1 << 20
    #: Inputs of a task that reads them more than once stay mapped between passes up to this size (``KeptMappings``).
    KEEP_MAPPED_BYTES = 64 << 20

    def peak_bytes(self, task: TensorTask) -> int:
        """Estimated extra memory of a task beyond the chunk buffers (whole-tensor statistics)."""
        if not task.mergeable or self.sparsifier.prepare is None:
            return 0
        if self._streams(task, task_options(self._all_options, task)):
            return self.host.streaming_peak_bytes(self.sparsifier.kernel, k=len(task.inputs), numel=task.numel,
                                                  budget=self.EXCLUSIVE_BYTES)
        return (4 + self.sparsifier.statistic_bytes) * task.numel  # the full task vector of one model + statistics

    def exclusive(self, task: TensorTask) -> bool:
        return self.peak_bytes(task) > self.EXCLUSIVE_BYTES

    def run(self, task: TensorTask) -> int:
        """Merge (or copy) one tensor into its output slot; returns the output bytes.

        NumPy's overflow warnings are off: NaN/Inf values are counted and judged per tensor instead.
        """
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                if task.mergeable:
                    self._merge(task)
                else:
                    self._copy(task)
        finally:
            for spilled in self._spilled:
                spilled.release()
            self._spilled.clear()
            self._mapped.end()
        return task.out_bytes

    # -- non-float tensors ------------------------------------------------------------
    def _copy(self, task: TensorTask) -> None:
        if task.inputs[0].dtype != task.out.dtype:  # a float tensor taken from one input, in another dtype
            self._convert(task)
            return
        itemsize = dtypes.itemsize(task.out.dtype)
        step = max(1, (16 << 20) // max(itemsize, 1))  # 16 MB at a time, whatever the tensor size
        for start in range(0, task.numel, step):
            count = min(step, task.numel - start)
            data = self.reader.read_raw(task.inputs[0], start, count)
            for index, other in enumerate(task.inputs[1:], start=1):
                if not np.array_equal(self.reader.read_raw(other, start, count).view(np.uint8), data.view(np.uint8)):
                    raise MergeError(
                        f"tensor {task.name}: {task.out.dtype} values differ between {task.inputs[0].file.parent} "
                        f"and {other.file.parent} (model {index}); non-float tensors are copied, so they must be equal"
                    )
            self.writer.write(task.out.file, task.out.start + start * itemsize, data)

    def _convert(self, task: TensorTask) -> None:
        out_dtype = dtypes.stored(task.out.dtype)
        self._nonfinite, self._out_nonfinite = [0], 0
        for start in range(0, task.numel, self.chunk):
            count = min(self.chunk, task.numel - start)
            chunk = self._buffer("x0", count)
            self._nonfinite[0] += self._read_f32(task.inputs[0], start, chunk)
            result = self.host.narrow(chunk, out_dtype)
            self._out_nonfinite += self.host.count_nonfinite(result)
            self.writer.write(task.out.file, task.out.start + start * out_dtype.itemsize, result)
        self._check_output_finite(task)

    # -- float tensors ----------------------------------------------------------------
    def _merge(self, task: TensorTask) -> None:
        n = task.numel
        self._nonfinite = [0] * (len(task.inputs) + 1)
        # a task over some of the models (task.models): their own draw keys and weights
        indices = range(len(task.inputs)) if task.models is None else task.models
        self.options = task_options(self._all_options, task)
        self._model_options = per_model_options(self.options, len(task.inputs))
        keys = [draw_key(self.cfg.seed, task.name, i) for i in indices]
        self._engine_values = {"ops": self.ops, "host": self.host, "numel": n, "shape": task.shape}
        self._mapped.start(reads_inputs_again(self.sparsifier, self.merger) and task.in_bytes <= self.KEEP_MAPPED_BYTES)
        prepared = None
        if self.sparsifier.prepare:
            prepared = self._streamed_prepare(task, keys) or [self._prepare(task, i, keys[i]) for i in range(len(task.inputs))]
        reduced: dict[str, Any] = self._streamed_reduce(task) if self.merger.reduce else {}
        if self.merger.reduce and not reduced:
            for reduce_pass in (self.merger.reduce, *self.merger.later_reduces):  # a later pass sees the earlier sums
                sums: dict[str, Any] = {}
                for start, count in chunk_ranges(n, task.shape, self.chunk, self.merger.row_aligned):
                    ys, base = self._sparsified(task, start, count, prepared, keys)
                    for name, value in self._bind(reduce_pass, ys, {**reduced, "start": start, "base": base}).items():
                        sums[name] = tuple(np.add(sums[name], value)) if name in sums else value
                reduced.update(sums)
        out_dtype = dtypes.stored(task.out.dtype)
        self._nonfinite = [0] * (len(task.inputs) + 1)  # count the apply pass only
        self._out_nonfinite = 0
        fused = self._fused(keys, prepared, reduced, n)
        if fused is not None:
            self._apply_fused(task, fused, out_dtype)
        else:
            self._apply(task, prepared, keys, reduced, out_dtype)
        for index, count in enumerate(self._nonfinite):
            if count:
                info = task.inputs[index] if index < len(task.inputs) else task.base
                log.warning("tensor %s has %d NaN/Inf value(s) in %s", task.name, count, info.file)
        self._check_output_finite(task)

    def _check_output_finite(self, task: TensorTask) -> None:
        """MergeError when the output holds more NaN/Inf values than all the inputs together: some came from
        finite inputs (a weight or factor overflowed float32, or a value the output dtype cannot hold)."""
        made = self._out_nonfinite - sum(self._nonfinite)
        if made > 0:
            raise MergeError(
                f"tensor {task.name}: the merge made {made} NaN/Inf value(s) from finite inputs (overflow in float32 "
                f"or in the output dtype {task.out.dtype}: check --weight_list, --scale and per-tensor parameters)"
            )

    def _prepare(self, task: TensorTask, index: int, key: int) -> dict[str, Any]:
        """Whole-tensor statistics of model ``index``'s task vector (``key``: its random stream)."""
        full = np.empty(task.numel, dtype=np.float32)
        for start in range(0, task.numel, self.chunk):
            count = min(self.chunk, task.numel - start)
            self._task_vector(task, index, start, full[start : start + count])
        extra = {"rng_at": functools.partial(CounterRNG, key)}
        stats = self._bind(self.prepare_fn, self.ops.from_numpy(full), extra, self._model_options[index])
        del full
        return {name: self._spill(value, task.numel) for name, value in stats.items()}

    def _spill(self, value: Any, numel: int) -> Any:
        """Park a large per-element statistic (e.g. ranks) in the staging directory until the apply pass."""
        if isinstance(value, np.ndarray) and value.shape == (numel,) and value.nbytes >= self.SPILL_BYTES:
            spilled = SpilledArray(value, self.writer.directory)
            self._spilled.append(spilled)
            return spilled
        return value

    def _task_vector(self, task: TensorTask, index: int, start: int, out: np.ndarray) -> np.ndarray:
        """Model ``index``'s chunk minus the base chunk (or the plain chunk without a base), in ``out``."""
        self._read_f32(task.inputs[index], start, out)
        if task.base is not None:
            base = self._buffer("base-tv", out.size)
            self._read_f32(task.base, start, base)
            out -= base
        return out

    def _fused(self, keys: list[int], prepared: Optional[list[dict]], reduced: dict[str, Any], numel: int):
        """The compiled one-pass apply for this tensor, when the backend has one."""
        if not self._fusable():
            return None
        coefficients = self.merger.fused_coefficients(reduced, self.options) if self.merger.fused_coefficients else None
        return self.host.fused_chunks(
            sparsify_type=self.sparsifier.kernel, merge_type=self.merger.kernel, keys=keys, prepared=prepared,
            numel=numel, options=self.options, coefficients=coefficients, model_options=self._model_options,
        )

    def _apply(self, task: TensorTask, prepared: Optional[list[dict]], keys: list[int], reduced: dict[str, Any],
               out_dtype: np.dtype) -> None:
        """The apply pass through the registered methods, one chunk of float32 values at a time."""
        for start, count in chunk_ranges(task.numel, task.shape, self.chunk, self.merger.row_aligned):
            ys, base = self._sparsified(task, start, count, prepared, keys)
            merged = self._bind(self.merge_fn, ys, {**reduced, "start": start, "base": base})
            if self.options["scale"] != 1.0:  # mergekit's lambda, on the merged task vector
                merged *= self.ops.float32(self.options["scale"])
            if base is not None:
                merged += base
            result = self.host.narrow(self.ops.to_numpy(merged), out_dtype)
            self._out_nonfinite += self.host.count_nonfinite(result)
            self.writer.write(task.out.file, task.out.start + start * out_dtype.itemsize, result)

    def _streamed_prepare(self, task: TensorTask, keys: list[int]) -> Optional[list[dict[str, Any]]]:
        """Every model's whole-tensor statistics from passes over raw chunks of all inputs at once.

        Only where the compiled backend streams this sparsifier's statistics (``keys``: each model's random
        stream) and the fused apply pass follows; None otherwise, or where the streamed statistics give up
        or decline the tensor (the per-model ``_prepare`` runs instead).
        """
        if not self._streams(task, self.options):
            return None
        return self._stream(task, self.host.streaming_prepare(
            self.sparsifier.kernel, k=len(task.inputs), numel=task.numel, options=self.options,
            budget=self.EXCLUSIVE_BYTES, model_options=self._model_options, keys=keys, shape=task.shape))

    def _streamed_reduce(self, task: TensorTask) -> dict[str, Any]:
        """The merge's whole-tensor sums from one compiled pass over raw chunks ({} where there is none)."""
        if not self._fusable() or not self.sparsifier.passes_through:
            return {}
        return self._stream(task, self.host.streaming_reduce(self.merger.kernel, k=len(task.inputs))) or {}

    def _stream(self, task: TensorTask, stats: Any) -> Any:
        """Run a streaming statistic's passes over the raw chunks of ``task``; None when ``stats`` is None."""
        if stats is None:
            return None
        return run_statistic(stats, lambda: ((raws, base) for _, raws, base in self._raw_chunks(task)))

    def _raw_chunks(self, task: TensorTask):
        """(start, raw chunks of every model, raw chunk of the base or None), FUSED_CHUNK elements at a time.

        Raw chunks are the stored bits when every model has one 16-bit dtype (bfloat16 as uint16,
        float16 as int16), else float32 bits (uint32); the base's lane is chosen on its own. The
        buffers are reused: each chunk is valid until the next.
        """
        lane = lane_of(task.inputs)
        base_lane = lane_of([task.base]) if task.base is not None else None
        for start in range(0, task.numel, self.FUSED_CHUNK):
            count = min(self.FUSED_CHUNK, task.numel - start)
            raws = [self._read_bits(info, start, count, f"raw{index}", lane) for index, info in enumerate(task.inputs)]
            base = self._read_bits(task.base, start, count, "raw-base", base_lane) if base_lane else None
            yield start, raws, base

    def _apply_fused(self, task: TensorTask, fused: Any, out_dtype: np.dtype) -> None:
        """The apply pass through the compiled kernel: raw input bits in, raw output bits out."""
        out_lane = lane_of([task.out])
        for start, raws, base in self._raw_chunks(task):
            out = self._buffer("raw-out", raws[0].size, out_lane)
            counts = fused.run(raws, base, start, out)
            for slot in range(len(self._nonfinite)):
                self._nonfinite[slot] += int(counts[slot])
            self._out_nonfinite += int(counts[-1])
            if out_lane is np.uint32 and task.out.dtype != "F32":  # e.g. float64: the kernel wrote float32 bits
                out = self.host.narrow(out.view(np.float32), out_dtype)
            self.writer.write(task.out.file, task.out.start + start * out_dtype.itemsize, out)

    def _read_bits(self, info, start: int, count: int, buffer: str, lane: type) -> np.ndarray:
        """A read-only chunk as stored 16-bit bits (lane uint16 or int16: ``_lane``) or float32 bits
        (lane uint32, any float).

        Stored bits are mapped from the file, not copied, where they are aligned (``KeptMappings.map``).
        """
        as_stored = lane is not np.uint32 or info.dtype == "F32"  # the lane holds the stored bits unconverted
        if as_stored:
            mapped = self._mapped.map(self.reader, info, start, count)
            if mapped is not None:
                return mapped.view(lane)
        bits = self._buffer(buffer, count, lane)
        if as_stored:
            self.reader.read_stored(info, start, count, bits.view(dtypes.stored(info.dtype)))
        else:  # converted as the generic path converts (the kernel counts NaN/Inf itself)
            self.host.widen(self.reader.read_stored(info, start, count), bits.view(np.float32))
        frozen = bits.view()
        frozen.flags.writeable = False  # as mapped chunks are: one compiled signature for both
        return frozen

    def _fusable(self, options: Optional[dict[str, Any]] = None) -> bool:
        """Whether the compiled one-pass apply covers this task (methods it runs, no scale)."""
        options = self.options if options is None else options
        return (self.host is self.ops and self.sparsifier.fuses(options) and self.merger.fuses(options)
                and options["scale"] == 1.0)

    def _streams(self, task: TensorTask, options: dict[str, Any]) -> bool:
        """Whether this sparsifier's statistics are streamed (no full-size task vectors) for ``task`` with ``options``."""
        dtypes_in = {info.dtype for info in task.inputs} | ({task.base.dtype} if task.base is not None else set())
        return self._fusable(options) and self.host.compiled and self.sparsifier.streams(dtypes_in)

    def _inputs(self, task: TensorTask, start: int, count: int) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
        """Float32 chunks of every model and of the base (or None)."""
        base = self._read_checked(task.base, start, "base", count, -1) if task.base is not None else None
        xs = [self._read_checked(info, start, f"x{index}", count, index) for index, info in enumerate(task.inputs)]
        return xs, base

    def _sparsified(
        self, task: TensorTask, start: int, count: int, prepared: Optional[list[dict]], keys: list[int]
    ) -> tuple[list[Any], Optional[Any]]:
        """Sparsified task-vector chunks of every model, and the base chunk (or None)."""
        xs, base = self._inputs(task, start, count)
        ys = []
        for index, t in enumerate(xs):
            if base is not None:
                t -= base
            extra = {"rng": self.ops.rng(keys[index], start), "start": start}
            if prepared is not None:
                extra.update(slice_per_element(prepared[index], start, count, task.numel))
            ys.append(self._bind(self.sparsify_fn, self.ops.from_numpy(t), extra, self._model_options[index]))
        return ys, (self.ops.from_numpy(base) if base is not None else None)

    def _read_f32(self, info, start: int, out: np.ndarray) -> int:
        """Fill ``out`` with a chunk upcast to float32; returns its NaN/Inf count."""
        stored = self.reader.read_stored(info, start, out.size, out if info.dtype == "F32" else None)
        return self.host.widen(stored, out)

    def _read_checked(self, info, start: int, buffer: str, count: int, slot: int) -> np.ndarray:
        """Read a float32 chunk, counting NaN/Inf values for the end-of-tensor warning."""
        chunk = self._buffer(buffer, count)
        self._nonfinite[slot] += self._read_f32(info, start, chunk)
        return chunk

    def _bind(self, fn, first: Any, extra: dict[str, Any], options: Optional[dict] = None) -> Any:
        return call(fn, first, extra, self._engine_values, self.options if options is None else options)

    def _buffer(self, name: str, count: int, dtype: type = np.float32) -> np.ndarray:
        """A reusable scratch vector of ``count`` elements (float32 unless given)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.size < count or buffer.dtype != dtype:
            buffer = self._buffers[name] = np.empty(max(count, self.chunk), dtype=dtype)
        return buffer[:count]

