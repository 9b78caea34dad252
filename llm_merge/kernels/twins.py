"""Compiled drop-in twins of registered NumPy methods: same keyword parameters, same bits.

The sparsifiers and merges call the block functions of ``kernels.method_blocks`` that the fused
pass also runs; the statistics (trim threshold, magnitude midranks) have their own kernels here and
in ``kernels.ranks``. ``KERNELS`` maps each registered (kind, name) to its twin.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from llm_merge.kernels import blocks, mergekit_streaming, ranks, streaming
from llm_merge.kernels.blocks import JIT_OPTIONS
from llm_merge.kernels.cache import configure_kernel_caches
from llm_merge.kernels.counter_rng import keep_threshold
from llm_merge.kernels.counts import trim_count
from llm_merge.kernels.l1_sums import SLOTS
from llm_merge.kernels.mergekit_streaming import SLOT_COPIES, add_slot_sums
from llm_merge.kernels.method_blocks import (
    dare_block,
    magprune_block,
    magprune_line,
    merge_constants,
    merge_rows,
    trim_block,
)
from llm_merge.kernels.ranks import magnitude_midranks
from llm_merge.kernels.streaming import float_of_bits, kth_bucket


def dare(t, *, reserve_p, rescale, rng, ops):
    if reserve_p >= 1.0:
        return t
    out = np.empty_like(t)
    dare_block(t, out, t.size, np.uint64(rng.key), rng.offset, keep_threshold(reserve_p), np.float32(reserve_p), rescale)
    return out


def magprune(t, *, doubled_midranks, numel, reserve_p, epsilon, rescale, rng, ops):
    top, step = magprune_line(reserve_p, epsilon, numel)
    out = np.empty_like(t)
    magprune_block(t, out, t.size, doubled_midranks, np.uint64(rng.key), rng.offset, top, step, rescale,
                   np.empty(t.size, np.float64))
    return out


def trim(t, *, threshold, l1_scale, ops):
    out = np.empty_like(t)
    trim_block(t, out, t.size, np.float32(threshold), np.float32(l1_scale))
    return out


def _merge(ys, merger):
    """The merge of whole inputs (no base: an input stands in for it, unread)."""
    ys = tuple(ys)
    out = np.empty_like(ys[0])
    merge_rows(ys, ys, out.size, merger, ys[0], False, out)
    return out


def linear(ys, *, weight_list, normalize, ops):
    return _merge(ys, merge_constants("linear", weight_list, normalize, "sum"))


def ties(ys, *, weight_list, normalize, ties_elect_type, ops):
    return _merge(ys, merge_constants("ties", weight_list, normalize, ties_elect_type))


@njit(fastmath=True, **JIT_OPTIONS)
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


@njit(**JIT_OPTIONS)
def select_kth_largest_bits(t, k):
    """Bits of the k-th largest |t| (exact), by a two-level radix select on the float32 bits.

    Non-negative float32 bit patterns sort like the values: pass 1 counts per top-16-bit
    bucket, pass 2 resolves the low 16 bits inside the bucket that holds the k-th value.
    """
    bits = t.view(np.uint32)
    counts = np.zeros(65536, np.int64)
    for j in range(t.size):
        counts[(bits[j] & np.uint32(0x7FFFFFFF)) >> 16] += 1
    high, remaining = kth_bucket(counts, k)
    counts[:] = 0
    for j in range(t.size):
        magnitude_bits = bits[j] & np.uint32(0x7FFFFFFF)
        if (magnitude_bits >> 16) == high:
            counts[magnitude_bits & 0xFFFF] += 1
    low = kth_bucket(counts, remaining)[0]
    return np.uint32((high << 16) | low)


def trim_threshold(t, *, reserve_p, rescale, ops):
    """Compiled twin of ``methods.sparsify.trim_threshold`` (sums may differ in the last float64 bit)."""
    if t.size == 0:
        return {"threshold": 0.0, "l1_scale": 1.0}
    flat = np.ascontiguousarray(t.ravel())
    bits = select_kth_largest_bits(flat, trim_count(reserve_p, t.size))
    total, kept = _abs_sums(flat, bits)
    threshold = float_of_bits(bits)
    return {"threshold": threshold, "l1_scale": (total / kept if kept > 0 else 1.0) if rescale else 1.0}


def doubled_midranks(x: np.ndarray) -> np.ndarray:
    """Doubled midranks of a float32 vector's magnitudes, 0 the largest (``kernels.ranks``)."""
    return magnitude_midranks(x)


def magnitude_ranks(t, *, ops):
    """Compiled twin of ``methods.sparsify.magnitude_ranks`` (no |t| copy; bounded extra memory)."""
    return {"doubled_midranks": magnitude_midranks(t)}


def kth_largest(x: np.ndarray, k: int) -> float:
    return float_of_bits(select_kth_largest_bits(np.ascontiguousarray(x.ravel(), dtype=np.float32), k))


@njit(**JIT_OPTIONS)
def _variances(rows, out):
    """out[j] = the float32 population variance of the rows' entries j, in float64 with the
    operations and order of ``NumpyOps.variance_keys``: mean = (r_0 + r_1 + ...) / k, then
    ((r_0 − mean)² + (r_1 − mean)² + ...) / k (from +0.0), rounded to float32."""
    k = len(rows)
    for j in range(out.size):
        total = np.float64(rows[0][j])
        for i in range(1, k):
            total += np.float64(rows[i][j])
        mean = total / k
        variance = 0.0
        for i in range(k):
            deviation = np.float64(rows[i][j]) - mean
            variance += deviation * deviation
        out[j] = np.float32(variance / k)


def variance_keys(ts) -> np.ndarray:
    """Compiled ``NumpyOps.variance_keys``: the same bits."""
    out = np.empty(ts[0].size, np.float32)
    _variances(tuple(np.ascontiguousarray(t, dtype=np.float32).ravel() for t in ts), out)
    return out.view(np.uint32)


@njit(**JIT_OPTIONS)
def _add_slot_sums(bits, flags, sums):
    add_slot_sums(bits, bits.size, flags, sums)


def slot_sums(magnitude: np.ndarray, kept=None) -> np.ndarray:
    """Compiled ``kernels.l1_sums.slot_sums``: the same int64 slot sums."""
    bits = np.ascontiguousarray(magnitude, dtype=np.float32).ravel().view(np.uint32)
    flags = np.ones(bits.size, np.bool_) if kept is None else np.ascontiguousarray(kept, dtype=np.bool_).ravel()
    sums = np.zeros((SLOT_COPIES, 2 * SLOTS), np.int64)
    _add_slot_sums(bits, flags, sums)
    return sums.sum(axis=0)


#: (kind, name) -> compiled replacement of the registered NumPy function.
KERNELS = {("prepare", "trim"): trim_threshold, ("prepare", "magprune"): magnitude_ranks, ("sparsify", "dare"): dare,
           ("sparsify", "magprune"): magprune, ("sparsify", "trim"): trim, ("merge", "linear"): linear,
           ("merge", "ties"): ties}


#: Modules whose compiled code the kernels here inline or call, for their cache stamps (the block
#: functions of method_blocks are called from Python here: compiled and cached there).
KERNEL_DEPENDENCIES = tuple(dict.fromkeys((blocks, ranks, streaming, mergekit_streaming,
                                           *mergekit_streaming.KERNEL_DEPENDENCIES)))
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
