"""Compiled (numba) twins of the hot NumPy paths: one fused pass per chunk.

Each kernel follows the float32 operation order of its NumPy twin in
``llm_merge.methods`` (IEEE semantics, no fastmath), so both give the same
bits; ``tests/test_kernels.py`` holds them to that. Random draws use the same
counter-based splitmix64 stream as ``llm_merge.kernels.counter_rng``. The streamed
whole-tensor statistics live in ``kernels.streaming`` and are re-exported here,
so that the backend finds every compiled piece in this module; the block helpers
both use (widening raw bits, prefetching inputs) live in ``kernels.blocks``.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import math
import sys

import numpy as np
from numba import njit

from llm_merge.kernels import blocks, counter_rng, ranks, streaming
from llm_merge.kernels.blocks import JIT_OPTIONS, float_bits_to_half, is_half_lane, prefetch_inputs, widen_block
from llm_merge.kernels.cache import configure_kernel_caches
from llm_merge.kernels.ranks import magnitude_ranks_fast
from llm_merge.kernels.streaming import (  # noqa: F401 (re-exported)
    RankTable,
    StreamingRanks,
    StreamingSlerpSums,
    StreamingTrim,
    chunk_inputs,
    dot64_kernel,
    float_of_bits,
    kth_bucket,
    rank_block,
)
from llm_merge.kernels.counter_rng import GAMMA, MIX1, MIX2, UNIT, keep_threshold
from llm_merge.kernels.counts import trim_count

_JIT = JIT_OPTIONS


@njit(inline="always", **_JIT)
def _draw_state(key, index):
    """splitmix64's state for element ``index`` of stream ``key``; element index + 1's is this + GAMMA.

    Loops step the state by GAMMA instead of multiplying per element: draws ~25% faster.
    """
    return np.uint64(key) + np.uint64(index + 1) * np.uint64(GAMMA)


@njit(inline="always", **_JIT)
def _mix53(z):
    """The 53-bit draw of splitmix64 state ``z`` (as ``llm_merge.kernels.counter_rng``)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(11)


@njit(**_JIT)
def dare_kernel(t, key, offset, threshold, divisor, rescale, out):
    """out = t (/ divisor) where the draw keeps it, else 0."""
    z = _draw_state(key, offset)
    for j in range(t.size):
        if _mix53(z) < np.uint64(threshold):
            out[j] = t[j] / divisor if rescale else t[j]
        else:
            out[j] = np.float32(0.0)
        z += np.uint64(GAMMA)
    return out


@njit(**_JIT)
def magprune_kernel(t, ranks, key, offset, top, step, rescale, out):
    """Keep rank r with probability top - r*step; divide kept entries by it when rescale."""
    z = _draw_state(key, offset)
    for j in range(t.size):
        keep_prob = top - np.float64(ranks[j]) * step
        draw = _mix53(z)
        z += np.uint64(GAMMA)
        if draw < np.uint64(math.floor(keep_prob * UNIT)):
            out[j] = t[j] / np.float32(keep_prob) if rescale else t[j]
        else:
            out[j] = np.float32(0.0)
    return out


@njit(**_JIT)
def trim_kernel(t, threshold, scale, apply_scale, out):
    """Entries with |t| >= threshold (times scale), else 0."""
    for j in range(t.size):
        if abs(t[j]) >= threshold:
            out[j] = t[j] * scale if apply_scale else t[j]
        else:
            out[j] = np.float32(0.0)
    return out


@njit(fastmath=True, **_JIT)
def _abs_sums(t, threshold_bits):
    """(Σ|t|, Σ|t| over |t| >= the value with bits threshold_bits) in float64.

    fastmath lets the sums vectorize: the order of float64 additions may differ from
    NumPy's (relative differences ~1e-16, invisible after the float32 scale).
    """
    bits = t.view(np.uint32)
    total = 0.0
    kept = 0.0
    for j in range(t.size):
        magnitude = abs(np.float64(t[j]))
        total += magnitude
        if (bits[j] & np.uint32(0x7FFFFFFF)) >= threshold_bits:
            kept += magnitude
    return total, kept


@njit(**_JIT)
def select_kth_largest_bits(t, k):
    """Bits of the k-th largest |t| (exact), by a two-level radix select on the float32 bits.

    Non-negative float32 bit patterns sort like the values: pass 1 counts per top-16-bit
    bucket, pass 2 resolves the low 16 bits inside the bucket that holds the k-th value.
    """
    bits = t.view(np.uint32)
    counts = np.zeros(65536, np.int64)
    for j in range(t.size):
        counts[(bits[j] & np.uint32(0x7FFFFFFF)) >> 16] += 1
    remaining = k
    high = 65535
    while counts[high] < remaining:
        remaining -= counts[high]
        high -= 1
    counts[:] = 0
    for j in range(t.size):
        magnitude_bits = bits[j] & np.uint32(0x7FFFFFFF)
        if (magnitude_bits >> 16) == high:
            counts[magnitude_bits & 0xFFFF] += 1
    low = 65535
    while counts[low] < remaining:
        remaining -= counts[low]
        low -= 1
    return np.uint32((high << 16) | low)


@njit(**_JIT)
def linear_kernel(ys, weights, normalize, total_weight, out):
    """Σ w_i y_i (in model order), divided by Σ w when normalize."""
    for j in range(out.size):
        acc = ys[0][j] * weights[0]
        for i in range(1, len(ys)):
            acc += ys[i][j] * weights[i]
        out[j] = acc / total_weight if normalize else acc
    return out


@njit(**_JIT)
def ties_kernel(ys, weights, normalize, by_count, out):
    """TIES sign election and disjoint (weighted) sum or mean, per element."""
    zero = np.float32(0.0)
    for j in range(out.size):
        votes = zero
        for i in range(len(ys)):
            u = ys[i][j] * weights[i]
            if by_count:
                votes += np.float32(1.0) if u > 0 else (np.float32(-1.0) if u < 0 else zero)
            else:
                votes += u
        positive = votes >= 0
        total = zero
        divisor = zero
        for i in range(len(ys)):
            u = ys[i][j] * weights[i]
            if (u > 0) if positive else (u < 0):
                total += u
                divisor += weights[i]
        if normalize:
            total /= divisor if divisor != 0 else np.float32(1.0)
        out[j] = total
    return out


@njit(**_JIT)
def count_nonfinite_kernel(bits):
    """Number of NaN/Inf among float32 values given as their uint32 bits."""
    bad = 0
    for j in range(bits.size):
        bad += (bits[j] & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    return bad


NONE, DARE, TRIM, MAGPRUNE = 0, 1, 2, 3
SPARSIFY_CODES = {"none": NONE, "dare": DARE, "trim": TRIM, "magprune": MAGPRUNE}
LINEAR, TIES = 0, 1


@njit(**_JIT)
def _narrow_block(bits, count, out, start):
    """float32 ``bits[:count]`` into ``out[start:]``, rounded to nearest even: bfloat16 bits when ``out`` is
    uint16, float16 bits when it is int16 (``float_bits_to_half``), else the float32 bits.
    Returns how many written values are NaN/Inf (rounding may overflow a finite float32).

    Every step is cast back to uint32 (numba would compute in 64 bits: half the vector lanes);
    no step overflows 32 bits, so the result is the same.
    """
    target = out[start : start + count]
    bad = 0
    if is_half_lane(out):
        for j in range(count):
            half = np.uint16(float_bits_to_half(bits[j]))
            target[j] = np.int16(half)
            bad += np.uint16(half & np.uint16(0x7C00)) == np.uint16(0x7C00)
    elif out.itemsize == 2:
        for j in range(count):
            b = bits[j]
            odd = np.uint32(np.uint32(b >> 16) & np.uint32(1))
            rounded = np.uint32(np.uint32(b + np.uint32(0x7FFF)) + odd)
            quiet = np.uint32(np.uint32(b >> 16) | np.uint32(0x40))
            nan = np.uint32(b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            value = np.uint16(quiet if nan else np.uint32(rounded >> 16))
            target[j] = value
            bad += np.uint16(value & np.uint16(0x7F80)) == np.uint16(0x7F80)
    else:
        for j in range(count):
            b = bits[j]
            target[j] = b
            bad += np.uint32(b & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    return bad


@njit(**_JIT)
def _sparsify_rows(rows, count, sparsify, keys, offset, dare_threshold, dare_p, rescale, trim_threshold, trim_scale,
                   ranks, rank_offset, top, step):
    """rows[i, :count] = sparsify(rows[i, :count]) in place: one simple (vectorizable) loop per model.

    Element j of the block is element ``offset + j`` of the tensor (its random draw) and
    ``rank_offset + j`` of ``ranks[i]``.
    """
    zero = np.float32(0.0)
    for i in range(rows.shape[0]):
        row = rows[i]
        if sparsify == DARE:
            z = _draw_state(keys[i], offset)
            for j in range(count):
                kept = _mix53(z) < np.uint64(dare_threshold)
                row[j] = (row[j] / dare_p if rescale else row[j]) if kept else zero
                z += np.uint64(GAMMA)
        elif sparsify == TRIM:
            threshold, scale = trim_threshold[i], trim_scale[i]
            for j in range(count):
                t = row[j]
                row[j] = (t * scale if scale != np.float32(1.0) else t) if abs(t) >= threshold else zero
        elif sparsify == MAGPRUNE:
            z, rank = _draw_state(keys[i], offset), ranks[i][rank_offset : rank_offset + count]
            for j in range(count):
                keep_prob = top - np.float64(rank[j]) * step
                kept = _mix53(z) < np.uint64(math.floor(keep_prob * UNIT))
                z += np.uint64(GAMMA)
                row[j] = (row[j] / np.float32(keep_prob) if rescale else row[j]) if kept else zero


@njit(inline="always", **_JIT)
def _vote(u, by_count):
    """A model's TIES vote for a weighted entry u: its sign (count election) or u itself (sum election)."""
    zero = np.float32(0.0)
    return (np.float32(1.0) if u > 0 else (np.float32(-1.0) if u < 0 else zero)) if by_count else u


@njit(**_JIT)
def _merge_rows(models, rows, count, base, has_base, merge, weights, normalize, total_weight, by_count, out):
    """out[:count] = merge(rows[:, :count]) (+ base), element by element in the generic path's operation order.

    ``models``: the tuple of inputs; only its length is used, a compile-time constant, so the loops
    over models unroll and the loop over elements vectorizes with the sums in registers (the
    whole-row loops this replaces stored and reloaded them: chunk pass 2.5 -> 1.8-1.9 ns per element
    for TIES, 1.9 -> 1.45 for linear, on L2-resident chunks).
    """
    if merge == LINEAR:
        for j in range(count):
            total = rows[0, j] * weights[0]
            for i in range(1, len(models)):
                total += rows[i, j] * weights[i]
            if normalize:
                total /= total_weight
            out[j] = total + base[j] if has_base else total
    elif by_count:  # two call sites: each is specialized on its constant election (a run-time choice in the loop defeats vectorization)
        _ties_elements(models, rows, count, base, has_base, weights, normalize, True, out)
    else:
        _ties_elements(models, rows, count, base, has_base, weights, normalize, False, out)


@njit(**_JIT)
def _ties_elements(models, rows, count, base, has_base, weights, normalize, by_count, out):
    """The TIES merge of ``_merge_rows``: elected sign, agreeing entries' sum, divided by their weights when ``normalize``.

    Sums start from +0.0 as the generic path's do (0 + -0.0 is +0.0).
    """
    zero = np.float32(0.0)
    for j in range(count):
        votes = zero
        for i in range(len(models)):
            votes += _vote(rows[i, j] * weights[i], by_count)
        total = zero
        divisor = zero
        for i in range(len(models)):
            w = weights[i]
            u = rows[i, j] * w
            agrees = (u > 0) if votes >= 0 else (u < 0)
            total += u if agrees else zero
            divisor += w if agrees else zero
        if normalize:
            total /= divisor if divisor != 0 else np.float32(1.0)
        out[j] = total + base[j] if has_base else total


@njit(**_JIT)
def _task_vector_block(raws, base_raw, has_base, s, m, rows, rows_bits, base, base_bits, nonfinite):
    """rows[i, :m] = model i's elements s .. s+m as float32, minus the base's (kept in ``base``).

    ``nonfinite[i]`` counts the NaN/Inf inputs of model i, ``nonfinite[k]`` those of the base.
    """
    k = len(raws)
    if has_base:
        nonfinite[k] += widen_block(base_raw, s, m, base_bits)
    for i in range(k):
        nonfinite[i] += widen_block(raws[i], s, m, rows_bits[i])
        if has_base:
            row = rows[i]
            for j in range(m):
                row[j] -= base[j]


@njit(**_JIT)
def _fused_chunk(raws, base_raw, has_base, offset, sparsify, keys, dare_threshold, dare_p, rescale, trim_threshold,
                 trim_scale, ranks, tables, top, step, merge, weights, normalize, total_weight, by_count,
                 rows, rows_bits, base, base_bits, merged, merged_bits, out, nonfinite):
    """One chunk, start to end: widen, task vectors, sparsify, merge, add the base, narrow into ``out``.

    Works through the chunk in blocks of ``rows.shape[1]`` elements so the working set stays in cache.
    Magnitude ranks come from ``ranks`` (this chunk's, per model) or, when ``tables`` holds rank tables
    (``FusedChunks.tables``), are counted block by block from them. ``nonfinite`` counts NaN/Inf values:
    of each model's input, of the base's (index k) and of the output (index k + 1).
    """
    block = rows.shape[1]
    n = out.size
    streamed_ranks = tables[0][0].size > 0
    block_ranks = np.empty((rows.shape[0], block if streamed_ranks else 0), tables[0][0].dtype)
    for s in range(0, n, block):
        m = min(block, n - s)
        prefetch_inputs(raws, base_raw, has_base, s, block)
        _task_vector_block(raws, base_raw, has_base, s, m, rows, rows_bits, base, base_bits, nonfinite)
        if streamed_ranks:
            for i in range(rows.shape[0]):
                rank_block(rows_bits[i], m, tables, i, block_ranks[i])
            _sparsify_rows(rows, m, sparsify, keys, offset + s, dare_threshold, dare_p, rescale, trim_threshold,
                           trim_scale, block_ranks, 0, top, step)
        else:
            _sparsify_rows(rows, m, sparsify, keys, offset + s, dare_threshold, dare_p, rescale, trim_threshold,
                           trim_scale, ranks, s, top, step)
        _merge_rows(raws, rows, m, base, has_base, merge, weights, normalize, total_weight, by_count, merged)
        nonfinite[rows.shape[0] + 1] += _narrow_block(merged_bits, m, out, s)


class _Blocks:
    """Float32 block buffers (and their bit views) for ``k`` task vectors and the base."""

    def __init__(self, k: int, block: int) -> None:
        self.rows = np.empty((k, block), np.float32)
        self.base = np.empty(block, np.float32)

    def args(self) -> tuple:
        return self.rows, self.rows.view(np.uint32), self.base, self.base.view(np.uint32)


#: ``FusedChunks.tables`` without rank tables (the types numba compiles ``_fused_chunk`` for).
_NO_TABLES = tuple((np.zeros(0, dtype),) for dtype in (np.int32, np.uint32, np.int64, np.int32))


class FusedChunks:
    """The fused apply pass of one tensor: constants bound once, then ``run`` per chunk.

    Covers every sparsifier with the linear and ties merges, and slerp's apply
    pass (a linear merge with its two coefficients, not normalized). Inputs and
    output are raw bits: bfloat16 (uint16), float16 (int16) or float32 (uint32).
    """

    #: Elements per cache block inside a chunk: k + 4 float32 rows of it stay in L1 for up to
    #: 8 models (1024 measured fastest on a 48 KB L1: TIES 2.7 ns/element against 3.3 at 16384).
    BLOCK = 1 << 10

    def __init__(self, *, sparsify_type, merge_type, keys, prepared, numel, options, coefficients=None):
        k = len(keys)
        self.sparsify = SPARSIFY_CODES[sparsify_type]
        self.keys = np.asarray(keys, dtype=np.uint64)
        p = options["reserve_p"]
        self.dare_threshold = keep_threshold(p) if p < 1.0 else 1 << 53
        self.dare_p = np.float32(p)
        self.rescale = options["rescale"]
        stats = prepared or [{}] * k
        self.trim_threshold = np.array([s.get("threshold", 0.0) for s in stats], np.float32)
        self.trim_scale = np.array([s.get("l1_scale", 1.0) for s in stats], np.float32)
        self.ranks = [s.get("ranks") for s in stats]
        tables = [s.get("rank_table") for s in stats]
        streamed = bool(tables) and all(t is not None for t in tables)
        self.tables = tuple(zip(*(t.arrays for t in tables))) if streamed else _NO_TABLES
        self.top = p + options["epsilon"] / 2
        self.step = options["epsilon"] / numel
        if merge_type == "slerp":
            self.merge, self.weights, self.normalize = LINEAR, np.asarray(coefficients, np.float32), False
        else:
            self.merge = LINEAR if merge_type == "linear" else TIES
            self.weights, self.normalize = np.asarray(options["weight_list"], np.float32), options["normalize"]
        self.total_weight = np.float32(sum(options["weight_list"]))
        self.by_count = options["ties_elect_type"] == "count"
        self._no_ranks = np.zeros(0, np.uint32)
        self._blocks = _Blocks(k, self.BLOCK)
        self._merged = np.empty(self.BLOCK, np.float32)

    def run(self, raws, base_raw, start, out) -> np.ndarray:
        """Merge the chunk of raw inputs ``raws`` (and ``base_raw`` or None) at element ``start`` into ``out``.

        ``raws``: one uint16 (bfloat16 bits), int16 (float16 bits) or uint32 (float32 bits) array per
        model, all of one type; ``out``: a lane of the output dtype (uint16, int16 or uint32), their
        length. Returns the NaN/Inf counts of each input, of the base, then of the output.
        """
        count = out.size
        ranks = tuple(r[start : start + count] if r is not None else self._no_ranks for r in self.ranks)
        raws, base_raw, has_base, _ = chunk_inputs(raws, base_raw)
        nonfinite = np.zeros(len(raws) + 2, np.int64)
        _fused_chunk(
            raws, base_raw, has_base, start, self.sparsify, self.keys, self.dare_threshold, self.dare_p, self.rescale,
            self.trim_threshold, self.trim_scale, ranks, self.tables, self.top, self.step, self.merge, self.weights,
            self.normalize, self.total_weight, self.by_count, *self._blocks.args(),
            self._merged, self._merged.view(np.uint32), out, nonfinite,
        )
        return nonfinite


def widen_bits(raw: np.ndarray, out_bits: np.ndarray) -> int:
    """float32 bits of a whole chunk of raw bits (a lane: bfloat16 uint16, float16 int16 or float32 uint32)
    into ``out_bits``; the NaN/Inf count."""
    return int(widen_block(raw, 0, raw.size, out_bits))


def narrow_bits(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 bits into ``out``'s lane, rounded to nearest even: bfloat16 (uint16), float16 (int16,
    as NumPy) or float32 (uint32)."""
    _narrow_block(bits, bits.size, out, 0)
    return out


# -- drop-in replacements for registered methods (same keyword parameters) --------------


def dare(t, *, reserve_p, rescale, rng, ops):
    if reserve_p >= 1.0:
        return t
    return dare_kernel(t, np.uint64(rng.key), rng.offset, keep_threshold(reserve_p), np.float32(reserve_p), rescale, np.empty_like(t))


def magprune(t, *, ranks, numel, reserve_p, epsilon, rescale, rng, ops):
    top, step = reserve_p + epsilon / 2, epsilon / numel
    return magprune_kernel(t, ranks, np.uint64(rng.key), rng.offset, top, step, rescale, np.empty_like(t))


def trim(t, *, threshold, l1_scale, ops):
    return trim_kernel(t, np.float32(threshold), np.float32(l1_scale), l1_scale != 1.0, np.empty_like(t))


def linear(ys, *, weight_list, normalize, ops):
    weights = np.asarray(weight_list, dtype=np.float32)
    return linear_kernel(tuple(ys), weights, normalize, np.float32(sum(weight_list)), np.empty_like(ys[0]))


def ties(ys, *, weight_list, normalize, ties_elect_type, ops):
    weights = np.asarray(weight_list, dtype=np.float32)
    return ties_kernel(tuple(ys), weights, normalize, ties_elect_type == "count", np.empty_like(ys[0]))


def trim_threshold(t, *, reserve_p, rescale, ops):
    """Compiled twin of ``methods.sparsify.trim_threshold`` (sums may differ in the last float64 bit)."""
    if t.size == 0:
        return {"threshold": 0.0, "l1_scale": 1.0}
    flat = np.ascontiguousarray(t.ravel())
    bits = select_kth_largest_bits(flat, trim_count(reserve_p, t.size))
    total, kept = _abs_sums(flat, bits)
    threshold = float_of_bits(bits)
    return {"threshold": threshold, "l1_scale": (total / kept if kept > 0 else 1.0) if rescale else 1.0}


def magnitude_ranks(t, *, ops):
    """Compiled twin of ``methods.sparsify.magnitude_ranks`` (no |t| copy; bounded extra memory)."""
    return {"ranks": magnitude_ranks_fast(np.ascontiguousarray(t.ravel(), dtype=np.float32))}


def descending_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of a non-negative float32 vector, 0 the largest, ties by lower index."""
    return magnitude_ranks_fast(np.ascontiguousarray(x.ravel(), dtype=np.float32))


def kth_largest(x: np.ndarray, k: int) -> float:
    return float_of_bits(select_kth_largest_bits(np.ascontiguousarray(x.ravel(), dtype=np.float32), k))


#: (kind, name) -> compiled replacement of the registered NumPy function.
KERNELS = {("prepare", "trim"): trim_threshold, ("prepare", "magprune"): magnitude_ranks, ("sparsify", "dare"): dare, ("sparsify", "magprune"): magprune, ("sparsify", "trim"): trim,
           ("merge", "linear"): linear, ("merge", "ties"): ties}


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

    The first call of any kernel pays it. numba's set-up imports scipy.linalg (~0.3 s) only to
    probe for BLAS, which no kernel here uses, so it is hidden meanwhile unless already loaded;
    numba still imports it later where jitted code needs BLAS (np.dot).
    """
    with _scipy_linalg_hidden():
        kth_bucket(np.zeros(1, np.int64), 0)


# The kernels above inline kernels of blocks, streaming and ranks and the draw
# constants of kernels.counter_rng: numba's cache must go stale when any of those changes.
configure_kernel_caches(globals(), [blocks.__file__, streaming.__file__, ranks.__file__, counter_rng.__file__])
