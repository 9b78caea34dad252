"""Compiled (numba) twins of the hot NumPy paths: one fused pass per chunk.

Each kernel follows the float32 operation order of its NumPy twin in
``llm_merge.methods`` (IEEE semantics, no fastmath), so both give the same
bits; ``tests/test_kernels.py`` holds them to that. Random draws use the same
counter-based splitmix64 stream as ``llm_merge.methods.random``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from llm_merge.methods.random import GAMMA, MIX1, MIX2, UNIT, keep_threshold
from llm_merge.methods.sparsify import trim_count

_JIT = dict(cache=True, nogil=True, error_model="numpy")


@njit(**_JIT)
def _draw53(key, index):
    z = np.uint64(key) + np.uint64(index + 1) * np.uint64(GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(11)


@njit(**_JIT)
def dare_kernel(t, key, offset, threshold, divisor, rescale, out):
    """out = t (/ divisor) where the draw keeps it, else 0."""
    for j in range(t.size):
        if _draw53(key, offset + j) < np.uint64(threshold):
            out[j] = t[j] / divisor if rescale else t[j]
        else:
            out[j] = np.float32(0.0)
    return out


@njit(**_JIT)
def magprune_kernel(t, ranks, key, offset, top, step, rescale, out):
    """Keep rank r with probability top - r*step; divide kept entries by it when rescale."""
    for j in range(t.size):
        keep_prob = top - np.float64(ranks[j]) * step
        if _draw53(key, offset + j) < np.uint64(math.floor(keep_prob * UNIT)):
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
def descending_ranks_kernel(magnitude):
    """Rank of each float32 value by magnitude (the sign bit is ignored), 0 the largest, ties by lower index.

    A stable LSD radix sort (3 passes of 11 bits) of the inverted bit patterns:
    stability keeps equal values in index order. Peak memory 16 bytes/element;
    the returned ranks reuse the first pass's key buffer.
    """
    n = magnitude.size
    bits = magnitude.view(np.uint32)
    starts = np.zeros((3, 2048), np.int64)
    for j in range(n):
        key = ~np.uint32(bits[j] & np.uint32(0x7FFFFFFF))
        starts[0, key & 2047] += 1
        starts[1, (key >> 11) & 2047] += 1
        starts[2, key >> 22] += 1
    for digit in range(3):
        total = 0
        for bucket in range(2048):
            count = starts[digit, bucket]
            starts[digit, bucket] = total
            total += count
    keys_a = np.empty(n, np.uint32)
    index_a = np.empty(n, np.uint32)
    for j in range(n):
        key = ~np.uint32(bits[j] & np.uint32(0x7FFFFFFF))
        bucket = key & 2047
        pos = starts[0, bucket]
        starts[0, bucket] = pos + 1
        keys_a[pos] = key
        index_a[pos] = j
    keys_b = np.empty(n, np.uint32)
    index_b = np.empty(n, np.uint32)
    for j in range(n):
        key = keys_a[j]
        bucket = (key >> 11) & 2047
        pos = starts[1, bucket]
        starts[1, bucket] = pos + 1
        keys_b[pos] = key
        index_b[pos] = index_a[j]
    ranks = keys_a
    for j in range(n):
        bucket = keys_b[j] >> 22
        pos = starts[2, bucket]
        starts[2, bucket] = pos + 1
        ranks[index_b[j]] = pos
    return ranks


@njit(**_JIT)
def dot64_kernel(x, y):
    """Σ x_j y_j accumulated in float64 (4 interleaved partial sums)."""
    partial = np.zeros(4, np.float64)
    n4 = x.size - x.size % 4
    for j in range(0, n4, 4):
        for lane in range(4):
            partial[lane] += np.float64(x[j + lane]) * np.float64(y[j + lane])
    for j in range(n4, x.size):
        partial[0] += np.float64(x[j]) * np.float64(y[j])
    return (partial[0] + partial[1]) + (partial[2] + partial[3])


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
def widen_bf16_kernel(raw, out):
    """bfloat16 bits -> float32 (a 16-bit shift); returns the number of NaN/Inf values."""
    bad = 0
    for j in range(raw.size):
        bits = np.uint32(raw[j])
        out[j] = bits << np.uint32(16)
        bad += (bits & np.uint32(0x7F80)) == np.uint32(0x7F80)
    return bad


@njit(**_JIT)
def count_nonfinite_kernel(bits):
    """Number of NaN/Inf among float32 values given as their uint32 bits."""
    bad = 0
    for j in range(bits.size):
        bad += (bits[j] & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    return bad


@njit(**_JIT)
def narrow_bf16_kernel(bits, out):
    """float32 bits -> bfloat16 bits, round to nearest even (NaN stays a quiet NaN)."""
    for j in range(bits.size):
        b = bits[j]
        if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            out[j] = np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
        else:
            out[j] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return out


NONE, DARE, TRIM, MAGPRUNE = 0, 1, 2, 3
SPARSIFY_CODES = {"none": NONE, "dare": DARE, "trim": TRIM, "magprune": MAGPRUNE}
LINEAR, TIES = 0, 1


@njit(**_JIT)
def _sparsify_rows(xs, base, has_base, sparsify, keys, offset, dare_threshold, dare_p, rescale, trim_threshold,
                   trim_scale, ranks, top, step, rows):
    """rows[i] = sparsify(x_i - base): one simple (vectorizable) loop per model."""
    zero = np.float32(0.0)
    for i in range(len(xs)):
        x = xs[i]
        row = rows[i]
        if has_base:
            for j in range(row.size):
                row[j] = x[j] - base[j]
        else:
            row[:] = x
        if sparsify == DARE:
            key = keys[i]
            for j in range(row.size):
                kept = _draw53(key, offset + j) < np.uint64(dare_threshold)
                row[j] = (row[j] / dare_p if rescale else row[j]) if kept else zero
        elif sparsify == TRIM:
            threshold, scale = trim_threshold[i], trim_scale[i]
            for j in range(row.size):
                t = row[j]
                row[j] = (t * scale if scale != np.float32(1.0) else t) if abs(t) >= threshold else zero
        elif sparsify == MAGPRUNE:
            key, rank = keys[i], ranks[i]
            for j in range(row.size):
                keep_prob = top - np.float64(rank[j]) * step
                kept = _draw53(key, offset + j) < np.uint64(math.floor(keep_prob * UNIT))
                row[j] = (row[j] / np.float32(keep_prob) if rescale else row[j]) if kept else zero


@njit(**_JIT)
def _merge_rows(rows, base, has_base, merge, weights, normalize, total_weight, by_count, scratch, out):
    """out = merge(rows) (+ base), as whole-row loops in the generic path's operation order."""
    k = rows.shape[0]
    zero = np.float32(0.0)
    if merge == LINEAR:
        for j in range(out.size):
            out[j] = rows[0, j] * weights[0]
        for i in range(1, k):
            for j in range(out.size):
                out[j] += rows[i, j] * weights[i]
        if normalize:
            for j in range(out.size):
                out[j] /= total_weight
    else:
        votes, divisor = scratch[0], scratch[1]
        votes[:] = zero
        for i in range(k):
            w = weights[i]
            for j in range(out.size):
                u = rows[i, j] * w
                votes[j] += ((np.float32(1.0) if u > 0 else (np.float32(-1.0) if u < 0 else zero)) if by_count else u)
        out[:] = zero
        divisor[:] = zero
        for i in range(k):
            w = weights[i]
            for j in range(out.size):
                u = rows[i, j] * w
                agrees = (u > 0) if votes[j] >= 0 else (u < 0)
                out[j] += u if agrees else zero
                divisor[j] += w if agrees else zero
        if normalize:
            for j in range(out.size):
                out[j] /= divisor[j] if divisor[j] != 0 else np.float32(1.0)
    if has_base:
        for j in range(out.size):
            out[j] += base[j]
    return out


class FusedChunks:
    """The fused apply pass of one tensor: constants bound once, then ``run`` per chunk.

    Covers every sparsifier with the linear and ties merges, and slerp's apply
    pass (a linear merge with its two coefficients, not normalized).
    """

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
        self.trim_scale = np.array([s.get("scale", 1.0) for s in stats], np.float32)
        self.ranks = [s.get("ranks") for s in stats]
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
        self._rows = np.empty((k, 0), np.float32)
        self._scratch = np.empty((2, 0), np.float32)

    def run(self, xs, base, start):
        """The merged float32 chunk of inputs ``xs`` (and ``base``) starting at element ``start``."""
        count = xs[0].size
        ranks = tuple(r[start : start + count] if r is not None else self._no_ranks for r in self.ranks)
        has_base = base is not None
        base = base if has_base else xs[0]
        if self._rows.shape[1] != count:  # contiguous buffers keep the loops vectorized
            self._rows = np.empty((len(xs), count), np.float32)
            self._scratch = np.empty((2, count), np.float32)
        rows, scratch = self._rows, self._scratch
        _sparsify_rows(
            tuple(xs), base, has_base, self.sparsify, self.keys, start, self.dare_threshold, self.dare_p, self.rescale,
            self.trim_threshold, self.trim_scale, ranks, self.top, self.step, rows,
        )
        return _merge_rows(
            rows, base, has_base, self.merge, self.weights, self.normalize, self.total_weight, self.by_count,
            scratch, np.empty(count, np.float32),
        )


# -- drop-in replacements for registered methods (same keyword parameters) --------------


def dare(t, *, reserve_p, rescale, rng, ops):
    if reserve_p >= 1.0:
        return t
    return dare_kernel(t, np.uint64(rng.key), rng.offset, keep_threshold(reserve_p), np.float32(reserve_p), rescale, np.empty_like(t))


def magprune(t, *, ranks, numel, reserve_p, epsilon, rescale, rng, ops):
    top, step = reserve_p + epsilon / 2, epsilon / numel
    return magprune_kernel(t, ranks, np.uint64(rng.key), rng.offset, top, step, rescale, np.empty_like(t))


def trim(t, *, threshold, scale, ops):
    return trim_kernel(t, np.float32(threshold), np.float32(scale), scale != 1.0, np.empty_like(t))


def linear(ys, *, weight_list, normalize, ops):
    weights = np.asarray(weight_list, dtype=np.float32)
    return linear_kernel(tuple(ys), weights, normalize, np.float32(sum(weight_list)), np.empty_like(ys[0]))


def ties(ys, *, weight_list, normalize, ties_elect_type, ops):
    weights = np.asarray(weight_list, dtype=np.float32)
    return ties_kernel(tuple(ys), weights, normalize, ties_elect_type == "count", np.empty_like(ys[0]))


def trim_threshold(t, *, reserve_p, rescale, ops):
    """Compiled twin of ``methods.sparsify.trim_threshold`` (sums may differ in the last float64 bit)."""
    if t.size == 0:
        return {"threshold": 0.0, "scale": 1.0}
    flat = np.ascontiguousarray(t.ravel())
    bits = select_kth_largest_bits(flat, trim_count(reserve_p, t.size))
    total, kept = _abs_sums(flat, bits)
    threshold = _float_of_bits(bits)
    return {"threshold": threshold, "scale": (total / kept if kept > 0 else 1.0) if rescale else 1.0}


@njit(**_JIT)
def _bucket_counts(t):
    """Count of each top-16-bit bucket of |t|'s float32 bits."""
    bits = t.view(np.uint32)
    counts = np.zeros(65536, np.int64)
    for j in range(t.size):
        counts[(bits[j] & np.uint32(0x7FFFFFFF)) >> 16] += 1
    return counts


@njit(**_JIT)
def _gather_group(t, low_bucket, high_bucket, keys):
    """Sort keys ``(~|t| bits) << 32 | index`` of the entries whose bucket is in [low, high]; returns their count."""
    bits = t.view(np.uint32)
    filled = 0
    for j in range(t.size):
        magnitude_bits = bits[j] & np.uint32(0x7FFFFFFF)
        bucket = magnitude_bits >> 16
        if low_bucket <= bucket <= high_bucket:
            keys[filled] = (np.uint64(~magnitude_bits & np.uint32(0x7FFFFFFF)) << np.uint64(32)) | np.uint64(j)
            filled += 1
    return filled


@njit(**_JIT)
def _scatter_ranks(keys, first_rank, ranks):
    for r in range(keys.size):
        ranks[keys[r] & np.uint64(0xFFFFFFFF)] = first_rank + r


#: Entries sorted at once by ``grouped_ranks`` (128 MB of sort keys).
RANK_GROUP = 1 << 24


def grouped_ranks(t: np.ndarray, group: int | None = None) -> np.ndarray:
    """Magnitude ranks (0 the largest, ties by lower index) in 4 bytes/element plus one small group.

    Buckets of the top 16 bits of |t|, from the largest, are grouped into runs of at most
    ``group`` entries; each run is gathered by one pass over ``t`` (in index order), sorted
    with NumPy, and its ranks scattered. Same result as ``descending_ranks_kernel``, without
    its 16 bytes/element of buffers; used for large tensors.
    """
    group = RANK_GROUP if group is None else group
    flat = np.ascontiguousarray(t.ravel())
    counts = _bucket_counts(flat)
    ranks = np.empty(flat.size, np.uint32)
    keys = np.empty(max(group, int(counts.max(initial=0))), np.uint64)
    first_rank = 0
    high = 65535
    while high >= 0:
        low, size = high, int(counts[high])
        while low > 0 and size + counts[low - 1] <= group:
            low -= 1
            size += int(counts[low])
        if size:
            filled = _gather_group(flat, low, high, keys)
            run = keys[:filled]
            run.sort()
            _scatter_ranks(run, first_rank, ranks)
            first_rank += filled
        high = low - 1
    return ranks


#: Tensors at least this large get their ranks from ``grouped_ranks`` (bounded memory).
GROUPED_RANKS_MIN = 1 << 24


def magnitude_ranks(t, *, ops):
    """Compiled twin of ``methods.sparsify.magnitude_ranks`` (no |t| copy; bounded memory when large)."""
    flat = np.ascontiguousarray(t.ravel())
    return {"ranks": grouped_ranks(flat) if flat.size >= GROUPED_RANKS_MIN else descending_ranks_kernel(flat)}


def descending_ranks(x: np.ndarray) -> np.ndarray:
    return descending_ranks_kernel(np.ascontiguousarray(x.ravel(), dtype=np.float32))


def kth_largest(x: np.ndarray, k: int) -> float:
    return _float_of_bits(select_kth_largest_bits(np.ascontiguousarray(x.ravel(), dtype=np.float32), k))


def _float_of_bits(bits) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


#: (kind, name) -> compiled replacement of the registered NumPy function.
KERNELS = {("prepare", "trim"): trim_threshold, ("prepare", "magprune"): magnitude_ranks, ("sparsify", "dare"): dare, ("sparsify", "magprune"): magprune, ("sparsify", "trim"): trim,
           ("merge", "linear"): linear, ("merge", "ties"): ties}
