"""The fused apply pass of one tensor (numba): per chunk, widen the raw inputs, take the task vectors,
sparsify, merge, add the base and narrow into the output lane, block by block (``FusedChunks.BLOCK``).
The sparsifiers' and merges' math is ``kernels.method_blocks``'s, shared with the drop-in twins.

The backend finds every compiled piece in this module: ``FusedChunks`` and the raw-bit helpers here, the
drop-in twins (``kernels.twins``) and the streamed statistics (``kernels.streaming``,
``kernels.streamed_ranks``) re-exported.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import sys
from typing import NamedTuple

import numpy as np
from numba import njit

from llm_merge.errors import MergeError
from llm_merge.kernels import blocks, counter_rng, draws, mergekit_blocks, method_blocks, ranks
from llm_merge.kernels.blocks import (  # noqa: F401 (count_nonfinite_kernel re-exported)
    JIT_OPTIONS,
    TaskVectorBuffers,
    count_nonfinite_kernel,
    narrow_block,
    prefetch_inputs,
    task_vector_block,
    widen_block,
)
from llm_merge.kernels.cache import configure_kernel_caches
from llm_merge.kernels.method_blocks import (  # noqa: F401 (SPARSIFY_CODES re-exported)
    SPARSIFY_CODES,
    KeepScratch,
    magprune_keeps_block,
    magprune_slot_probs,
    merge_constants,
    merge_rows,
    sparsify_constants,
    sparsify_rows,
)
from llm_merge.kernels.mergekit_streaming import StreamingMagnitude, StreamingRandomL1  # noqa: F401 (re-exported)
from llm_merge.kernels.ranks import RankTable, magnitude_midranks, slot_values_block  # noqa: F401 (re-exported)
from llm_merge.kernels.row_ranks import StreamingRowKeep, keep_bits  # noqa: F401 (StreamingRowKeep re-exported)
from llm_merge.kernels.streamed_ranks import StreamingRanks  # noqa: F401 (re-exported)
from llm_merge.kernels.streaming import (  # noqa: F401 (re-exported)
    StreamingGramSums,
    StreamingTrim,
    chunk_inputs,
    dot64_kernel,
    float_of_bits,
    kth_bucket,
)
from llm_merge.kernels.twins import (  # noqa: F401 (re-exported)
    KERNELS,
    dare,
    doubled_midranks,
    kth_largest,
    linear,
    magnitude_ranks,
    magprune,
    select_kth_largest_bits,
    slot_sums,
    ties,
    trim,
    trim_threshold,
    variance_keys,
)


class BlockBuffers(NamedTuple):
    """The scratch of one block of the fused pass, allocated here rather than in the kernel: a kernel that
    allocates makes every process that loads it import numba's array implementations (~0.03 s a worker)."""

    task_vectors: TaskVectorBuffers  # each model's task vector (then its sparsified one), and the base's values
    merged: np.ndarray  # (block,): the merged values before narrowing
    merged_bits: np.ndarray
    keeps: KeepScratch  # per entry: magprune's keep probabilities, the masked sparsifier's flags

    @classmethod
    def allocate(cls, k: int, block: int) -> "BlockBuffers":
        merged = np.empty(block, np.float32)
        return cls(TaskVectorBuffers.allocate(k, block), merged, merged.view(np.uint32), KeepScratch.allocate(block))


class MagnitudeRanks(NamedTuple):
    """Where magprune's doubled midranks come from: this chunk's slice of whole-tensor ranks, or rank tables."""

    chunk: tuple  # per model: its ranks of this chunk's elements (uint32; empty when tables are used)
    tables: tuple  # per model: its ``RankTable.index`` and per-slot keep probabilities; empty arrays: none


#: ``MagnitudeRanks.tables`` without rank tables (the types numba compiles ``_fused_chunk`` for).
_NO_TABLES = ((np.zeros(0, np.uint64), np.zeros(0, np.float64)),)


@njit(**JIT_OPTIONS)
def _fused_chunk(raws, base_raw, has_base, offset, sparsifier, ranks, merger, buffers, out, nonfinite):
    """One chunk, start to end: widen, task vectors, sparsify, merge, add the base, narrow into ``out``.

    ``sparsifier`` and ``merger``: the methods' constants (``SparsifyConstants``, ``MergeConstants``);
    element 0 of the chunk is element ``offset`` of the tensor. Works in blocks of
    ``buffers.task_vectors.rows.shape[1]`` elements. Magnitude ranks come from ``ranks.chunk`` or, when
    ``ranks.tables`` holds rank tables, are looked up block by block in them. ``nonfinite`` counts
    NaN/Inf values: of each model's input, of the base's (index k) and of the output (index k + 1).
    """
    rows, rows_bits, base, base_bits = buffers.task_vectors  # once per chunk: see task_vector_block
    merged, merged_bits = buffers.merged, buffers.merged_bits
    chunk_ranks, tables = ranks
    k, block = rows.shape
    n = out.size
    streamed_ranks = tables[0][1].size > 0
    keeps = buffers.keeps
    block_probs = keeps.probs
    for s in range(0, n, block):
        m = min(block, n - s)
        prefetch_inputs(raws, base_raw, has_base, s, block)
        task_vector_block(raws, base_raw, has_base, s, m, rows, rows_bits, base, base_bits, nonfinite)
        if streamed_ranks:  # magprune's keep probabilities, per distinct |t|
            for i in range(k):
                index, keep_probs = tables[i]
                slot_values_block(rows_bits[i], m, index, keep_probs, block_probs)
                magprune_keeps_block(rows[i], rows[i], m, block_probs, sparsifier.keys[i], offset + s,
                                     sparsifier.rescale)
        else:
            sparsify_rows(rows, m, sparsifier, offset + s, chunk_ranks, s, keeps)
        merge_rows(raws, rows, m, merger, base, has_base, merged)
        nonfinite[k + 1] += narrow_block(merged_bits, m, out, s)


def merge_threshold(merge_type: str, options: dict) -> float:
    """The merge's elementwise bound: ram's ε (``ram_epsilon``), nearswap's t (``nearswap_t``), else 0."""
    if merge_type == "ram":
        return options["ram_epsilon"]
    return options["nearswap_t"] if merge_type == "clip" else 0.0


class FusedChunks:
    """The fused apply pass of one tensor: constants bound once, then ``run`` per chunk.

    Covers every sparsifier with the linear, ties, ram and clip (nearswap) merges, and the
    apply pass of the merges with coefficients from Gram sums (slerp, multislerp,
    karcher: a linear merge with those coefficients, not normalized). Inputs and
    output are raw bits: bfloat16 (uint16), float16 (int16) or float32 (uint32).
    """

    #: Elements per block inside a chunk: the block functions run once per block, each with its own call,
    #: argument and loop set-up, so small blocks pay that set-up often. Measured on a 2-vCPU AMD EPYC
    #: (0.52B family, n_process 2, alternating runs): linear 1.50-1.59 s at 1024, 1.31-1.36 at 65536,
    #: 1.34-1.49 at 262144; ties 2.56-3.06, 2.30-2.46 and 2.25-2.32 s; the kernels alone (``bench_kernels.py``)
    #: linear 0.56 -> 0.39 ns per element and model, dare_ties 0.90 -> 0.71.
    BLOCK = 1 << 16

    def __init__(self, *, sparsify_type, merge_type, keys, prepared, numel, options, coefficients=None,
                 model_options=None):
        """``model_options``: each model's options (per-model densities; default ``options`` for all)."""
        stats = prepared or [{}] * len(keys)
        masks = [keep_bits(s, key, numel) for s, key in zip(stats, keys)]  # della_magprune's
        self.sparsifier = sparsify_constants(sparsify_type, keys, options, numel, stats, model_options, masks)
        self.merger = merge_constants(merge_type, options["weight_list"], options["normalize"],
                                      options["ties_elect_type"], coefficients, merge_threshold(merge_type, options))
        self.ranks = [s.get("doubled_midranks") for s in stats]
        tables = [s.get("rank_table") for s in stats]
        streamed = bool(tables) and all(t is not None for t in tables)
        self.tables = tuple((t.index, magprune_slot_probs(t.ranks, self.sparsifier.top[i], self.sparsifier.step[i]))
                            for i, t in enumerate(tables)) if streamed else _NO_TABLES
        self._no_ranks = np.zeros(0, np.uint32)
        self._next_start = 0
        self._buffers = BlockBuffers.allocate(len(keys), self.BLOCK)

    def run(self, raws, base_raw, start, out) -> np.ndarray:
        """Merge the chunk of raw inputs ``raws`` (and ``base_raw`` or None) at element ``start`` into ``out``.

        ``raws``: one uint16 (bfloat16 bits), int16 (float16 bits) or uint32 (float32 bits) array per
        model, all of one type; ``out``: a lane of the output dtype (uint16, int16 or uint32), their
        length. Returns the NaN/Inf counts of each input, of the base, then of the output. Chunks come in
        order while magnitude still counts the entries it drops (``kernels.mergekit_blocks.band_block``).
        """
        count = out.size
        if start != self._next_start and (self.sparsifier.band_cuts[:, 0] < 0).any():
            raise MergeError(f"fused pass: chunk at element {start} out of order (expected {self._next_start})")
        self._next_start = start + count
        chunk_ranks = tuple(r[start : start + count] if r is not None else self._no_ranks for r in self.ranks)
        raws, base_raw, has_base, _ = chunk_inputs(raws, base_raw)
        nonfinite = np.zeros(len(raws) + 2, np.int64)
        _fused_chunk(raws, base_raw, has_base, start, self.sparsifier, MagnitudeRanks(chunk_ranks, self.tables),
                     self.merger, self._buffers, out, nonfinite)
        return nonfinite


def widen_bits(raw: np.ndarray, out_bits: np.ndarray) -> int:
    """float32 bits of a whole chunk of raw bits (a lane: bfloat16 uint16, float16 int16 or float32 uint32)
    into ``out_bits``; the NaN/Inf count."""
    return int(widen_block(raw, 0, raw.size, out_bits))


def narrow_bits(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 bits into ``out``'s lane, rounded to nearest even: bfloat16 (uint16), float16 (int16,
    as NumPy) or float32 (uint32)."""
    narrow_block(bits, bits.size, out, 0)
    return out


class _NoScipyLinalg(importlib.abc.MetaPathFinder):
    """Makes ``import scipy.linalg...`` fail (while numba sets up its CPU target)."""

    def find_spec(self, name, path=None, target=None):
        if name == "scipy.linalg" or name.startswith("scipy.linalg."):
            raise ModuleNotFoundError(f"{name} hidden while numba starts", name=name)
        return None


@contextlib.contextmanager
def _scipy_linalg_hidden():
    finder = None if "scipy.linalg" in sys.modules else _NoScipyLinalg()
    if finder:
        sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        if finder:
            sys.meta_path.remove(finder)


def initialize() -> None:
    """Set up numba's CPU target now, once per process (before workers fork, they inherit it).

    The first call of any kernel pays it: loading cached kernels (without numba's context refresh,
    ``kernels.cache.load_without_refresh``), or compiling them on a cold cache. There numba's set-up
    imports scipy.linalg (~0.3 s) only to probe for BLAS, which no kernel here uses, so it is hidden
    meanwhile unless already loaded; numba still imports it later where jitted code needs BLAS (np.dot).
    """
    with _scipy_linalg_hidden():
        kth_bucket(np.zeros(1, np.int64), 0)


#: Modules whose compiled code the kernels here inline or call, for their cache stamps.
KERNEL_DEPENDENCIES = (blocks, counter_rng, draws, mergekit_blocks, method_blocks, ranks)
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
