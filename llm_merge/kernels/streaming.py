"""Whole-tensor statistics streamed over raw input chunks (numba): no full-size copies.

``StreamingTrim`` (TIES trim threshold and L1 scale) and ``StreamingGramSums`` (the inputs' norms and
dot products: slerp, multislerp, karcher) here; ``StreamingRanks`` (DELLA's magnitude ranks) in ``kernels.streamed_ranks``, on the
magnitude histogram here. Each takes ``feed(pass_index, raws, base_raw)`` per chunk (raw bits:
bfloat16 as uint16, float16 as int16, float32 as uint32), ``wants(pass_index)``, ``end_pass(pass_index)``
and ``statistics()``. Same results as the NumPy methods in ``llm_merge.methods``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from numba import njit

from llm_merge.kernels import blocks
from llm_merge.kernels.blocks import (
    JIT_OPTIONS,
    TaskVectorBuffers,
    prefetch_inputs,
    task_vector_block,
    task_vector_row,
    widen_block,
)
from llm_merge.kernels.cache import configure_kernel_caches
from llm_merge.kernels.counts import trim_count

_JIT = JIT_OPTIONS


@njit(fastmath=True, **_JIT)
def dot64_kernel(x, y):
    """Σ x_j y_j accumulated in float64.

    fastmath lets the sum vectorize; the summation order then depends only on the length
    (the same for every run and worker count on machines with the same vector width).
    """
    total = 0.0
    for j in range(x.size):
        total += np.float64(x[j]) * np.float64(y[j])
    return total


def float_of_bits(bits) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


#: Buckets of |t| by its top 16 bits (the sign bit is clear), and low 16-bit values inside one.
_BUCKETS, _LOWS = 1 << 15, 1 << 16
#: Spare histogram slots for entries outside the refined bucket (spread, so increments do not queue on one counter).
_OUTSIDE_SLOTS = 256
#: A float32's magnitude bits (sign cleared), and the low 16 of them (nonzero: a mixed entry).
_MAGNITUDE, _LOW_BITS = np.uint32(0x7FFFFFFF), np.uint32(0xFFFF)


@njit(inline="always", **_JIT)
def _note_mixed(i, start, end, bits, row, mixed, mixed_sums, collected, n_collected):
    """``_magnitude_pass``'s bookkeeping of model i's mixed entries among ``start .. end``."""
    for j in range(start, end):
        magnitude_bits = bits[j] & _MAGNITUDE
        if magnitude_bits & _LOW_BITS:
            bucket = magnitude_bits >> 16
            mixed[i, bucket] += 1
            mixed_sums[i, bucket] += abs(np.float64(row[j]))
            if collected.shape[1] > 0:
                collected[i, n_collected[i]] = magnitude_bits
                n_collected[i] += 1


@njit(**_JIT)
def _magnitude_pass(raws, base_raw, has_base, n, buffers, refine, high, counts, odd_counts, mixed, mixed_sums,
                    collected, n_collected):
    """One trim pass over one chunk of every model's task vector t_i.

    Pass 1 (``refine`` false), per bucket b = |t_i| bits >> 16: counts[i, b] + odd_counts[i, b] entries
    (those at even and at odd positions), of which mixed[i, b] have nonzero low 16 bits, whose |t| sum
    to mixed_sums[i, b] (float64, in index order). The others are exactly the bucket's value, so no
    sum is needed for them; deltas of bfloat16 weights rarely have nonzero low bits, so they take a
    branch, tested once per pair (the counter increments go through memory: the loop cannot
    vectorize anyway). Two counters per bucket: a fifth of bfloat16 deltas can fall in one bucket,
    and neighbouring entries' increments of one counter would wait on each other (trim's pass 0.97
    against 0.88 ns per entry and model).

    When ``collected`` has columns, the mixed entries' magnitude bits are also appended to
    ``collected[i]`` (``n_collected[i]`` of them).

    Pass 2 (``refine``): counts[i, l] of the entries inside bucket high[i] with low 16 bits l,
    branch-free: entries outside the bucket count into spare slots past 65536.

    ``buffers``: a ``TaskVectorBuffers`` of one row, which each model's task vector takes in turn.
    """
    rows, rows_bits, base, base_bits = buffers
    row, bits = rows[0], rows_bits[0]
    block = row.size
    for s in range(0, n, block):
        m = min(block, n - s)
        prefetch_inputs(raws, base_raw, has_base, s, block)
        if has_base:
            widen_block(base_raw, s, m, base_bits)
        for i in range(len(raws)):
            task_vector_row(raws[i], s, m, base, has_base, row, bits)
            histogram = counts[i]
            if refine:
                h = np.int64(high[i])
                for j in range(m):
                    low = np.int64(bits[j] & _MAGNITUDE) - (h << 16)
                    histogram[low if 0 <= low < _LOWS else _LOWS + (j & (_OUTSIDE_SLOTS - 1))] += 1
                continue
            odd_histogram = odd_counts[i]
            whole = m - (m & 1)
            for pair in range(0, whole, 2):
                even_bits = bits[pair] & _MAGNITUDE
                odd_bits = bits[pair + 1] & _MAGNITUDE
                histogram[even_bits >> 16] += 1
                odd_histogram[odd_bits >> 16] += 1
                if (even_bits | odd_bits) & _LOW_BITS:
                    _note_mixed(i, pair, pair + 2, bits, row, mixed, mixed_sums, collected, n_collected)
            if m & 1:
                last_bits = bits[m - 1] & _MAGNITUDE
                histogram[last_bits >> 16] += 1
                if last_bits & _LOW_BITS:
                    _note_mixed(i, m - 1, m, bits, row, mixed, mixed_sums, collected, n_collected)


@njit(**_JIT)
def kth_bucket(counts, k):
    """(bucket, rank inside it) of the k-th largest entry, from per-bucket counts (the last bucket the largest)."""
    remaining = k
    bucket = counts.size - 1
    while counts[bucket] < remaining:
        remaining -= counts[bucket]
        bucket -= 1
    return bucket, remaining


def chunk_inputs(raws, base_raw) -> tuple:
    """Leading arguments of a streaming kernel for one chunk of raw bits: (raws, base, has_base, length).

    Without a base (``base_raw`` None) the first input stands in for it, unused.
    """
    has_base = base_raw is not None
    return tuple(raws), base_raw if has_base else raws[0], has_base, raws[0].size


def _exact_sum(*parts: np.ndarray) -> float:
    """Correctly rounded sum (math.fsum) of the nonzero entries of float64 arrays."""
    values = np.concatenate(parts)
    return math.fsum(values[values != 0].tolist())


def _bits_value(bits: np.ndarray) -> np.ndarray:
    """float64 values of float32 bit patterns."""
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


class MagnitudeHistogram:
    """Per model, counts of |t| by its top 16 bits (bucket), and of the bucket's entries with nonzero low bits."""

    def __init__(self, k: int, block: int) -> None:
        self.buffers = TaskVectorBuffers.allocate(1, block)
        self._counts = np.zeros((k, _BUCKETS), np.int64)
        self._odd_counts = np.zeros((k, _BUCKETS), np.int64)  # entries at odd positions, until ``counts`` adds them
        self._odd_pending = False
        self.mixed = np.zeros((k, _BUCKETS), np.int64)
        self.mixed_sums = np.zeros((k, _BUCKETS), np.float64)
        self._no_collection = np.zeros((k, 0), np.uint32)

    @property
    def counts(self) -> np.ndarray:
        """(k, buckets): entries per bucket, of each model (of the chunks fed so far)."""
        if self._odd_pending:
            self._counts += self._odd_counts
            self._odd_counts[:] = 0
            self._odd_pending = False
        return self._counts

    def _pass(self, raws, base_raw, refine: bool, high: np.ndarray, counts: Optional[np.ndarray] = None,
              collected: Optional[np.ndarray] = None) -> np.ndarray:
        """One ``_magnitude_pass`` over a chunk into the bucket counts (``counts``: refine's counts instead);
        returns how many mixed entries each model added to ``collected``."""
        n_collected = np.zeros(len(self.mixed), np.int64)
        self._odd_pending = self._odd_pending or not refine
        _magnitude_pass(*chunk_inputs(raws, base_raw), self.buffers, refine, high,
                        self._counts if counts is None else counts, self._odd_counts, self.mixed, self.mixed_sums,
                        self._no_collection if collected is None else collected, n_collected)
        return n_collected


class StreamingTrim(MagnitudeHistogram):
    """TIES trim statistics of k task vectors from passes over raw input chunks (no full-size copies).

    Pass 1 counts |t| by its top 16 bits (and sums the few entries with nonzero low bits). The
    k-th largest |t| lies in bucket h; unless it is one of h's entries with nonzero low bits (rare
    for bfloat16 deltas, which mostly have zero low bits) it is exactly h << 16, else pass 2
    counts the low 16 bits inside bucket h.
    The threshold is the exact k-th largest |t| (as ``select_kth_largest_bits``); the L1 sums are
    exact sums of count * value terms (math.fsum), so they are correctly rounded.
    """

    def __init__(self, k: int, numel: int, reserve_p: float | Sequence[float], rescale: bool, block: int) -> None:
        """``reserve_p``: one density, or one per model."""
        super().__init__(k, block)
        self.rescale = rescale
        densities = reserve_p if isinstance(reserve_p, (list, tuple)) else [reserve_p] * k
        self.keep = np.array([self.keep_count(p, numel) if numel else 0 for p in densities], np.int64)
        self.high = np.zeros(k, np.uint32)
        self.rank_in_high = np.zeros(k, np.int64)
        self.low_counts: Optional[np.ndarray] = None

    def wants(self, pass_index: int) -> bool:
        """Whether pass ``pass_index`` is needed (pass 2 only where a k-th value has nonzero low bits)."""
        if pass_index == 0:
            return True
        return pass_index == 1 and bool(self._refined().any())

    def _refined(self) -> np.ndarray:
        """Per model: whether the k-th largest |t| is one of its bucket's entries with nonzero low bits.

        Those are larger than the bucket's plain entries (exactly high << 16), so otherwise the
        threshold is high << 16 and pass 2 is not needed.
        """
        return (self.keep > 0) & (self.rank_in_high <= self.mixed[np.arange(len(self.high)), self.high])

    @staticmethod
    def keep_count(reserve_p: float, numel: int) -> int:
        """How many of the largest |t| are kept (0: none is selected)."""
        return trim_count(reserve_p, numel)

    def feed(self, pass_index: int, raws, base_raw) -> None:
        """Add one chunk (raw bits, as ``FusedChunks.run`` takes them) to pass ``pass_index``."""
        refine = pass_index > 0
        self._pass(raws, base_raw, refine, self.high, self.low_counts if refine else None)

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            for i, counts in enumerate(self.counts):
                if self.keep[i]:
                    self.high[i], self.rank_in_high[i] = kth_bucket(counts, self.keep[i])
            if self._refined().any():
                self.low_counts = np.zeros((len(self.high), _LOWS + _OUTSIDE_SLOTS), np.int64)

    def statistics(self) -> list[dict]:
        """Per model: {"threshold", "l1_scale"} as ``methods.sparsify.trim_threshold`` gives them.

        Works on the occupied buckets only (a few thousand for bfloat16 deltas): the fixed cost
        per tensor stays far below a millisecond, which small tensors (norms, biases) notice.
        """
        stats = []
        refined = self._refined()
        for i, high in enumerate(self.high.astype(np.int64)):
            if not self.keep[i]:
                stats.append({"threshold": 0.0, "l1_scale": 1.0})
                continue
            occupied = np.flatnonzero(self.counts[i])
            plain = self.counts[i, occupied] - self.mixed[i, occupied]  # entries equal to their bucket's value
            mass = plain * _bits_value(occupied << 16)  # count * value: products exact to float64 rounding
            mixed_sums = self.mixed_sums[i, occupied]
            above = occupied > high
            if refined[i]:
                low_counts = self.low_counts[i, :_LOWS]
                low = int(kth_bucket(low_counts, self.rank_in_high[i])[0])
                present = low + np.flatnonzero(low_counts[low:])
                bucket_kept = low_counts[present] * _bits_value((high << 16) | present)
            else:  # every entry of bucket high is kept: its plain entries and its larger mixed ones
                low = 0
                at_high = occupied == high
                bucket_kept = np.concatenate([mass[at_high], mixed_sums[at_high]])
            kept = _exact_sum(bucket_kept, mass[above], mixed_sums[above])
            total = _exact_sum(mass, mixed_sums)
            scale = (total / kept if kept > 0 else 1.0) if self.rescale else 1.0
            stats.append({"threshold": float_of_bits((int(high) << 16) | low), "l1_scale": scale})
        return stats


@njit(**_JIT)
def _gram_sums(raws, base_raw, has_base, n, buffers, sums, nonfinite):
    """One chunk's Gram entries: sums += <y_i, y_j> of the task vectors for every pair i <= j, row by row
    of the upper triangle (the order ``methods.merge.gram_sums`` gives). ``nonfinite``: k + 1 counters of
    scratch (the apply pass reports NaN/Inf)."""
    rows, rows_bits, base, base_bits = buffers
    k, block = rows.shape
    for s in range(0, n, block):
        m = min(block, n - s)
        prefetch_inputs(raws, base_raw, has_base, s, block)
        task_vector_block(raws, base_raw, has_base, s, m, rows, rows_bits, base, base_bits, nonfinite)
        entry = 0
        for i in range(k):
            for j in range(i, k):
                sums[entry] += dot64_kernel(rows[i][:m], rows[j][:m])
                entry += 1


class StreamingGramSums:
    """The whole-tensor Gram matrix of k task vectors (slerp's norms and dot, multislerp's and karcher's
    sums) from one pass over raw chunks of every input."""

    def __init__(self, k: int, block: int) -> None:
        self.buffers = TaskVectorBuffers.allocate(k, block)
        self.sums = np.zeros(k * (k + 1) // 2, np.float64)
        self._nonfinite = np.zeros(k + 1, np.int64)  # allocated here: see fused.BlockBuffers

    def feed(self, pass_index: int, raws, base_raw) -> None:
        """Add one chunk (raw bits, as ``FusedChunks.run`` takes them)."""
        _gram_sums(*chunk_inputs(raws, base_raw), self.buffers, self.sums, self._nonfinite)

    def wants(self, pass_index: int) -> bool:
        return pass_index == 0

    def end_pass(self, pass_index: int) -> None:
        pass

    def statistics(self) -> dict:
        """{"sums": the upper triangle row by row} as ``methods.merge.gram_sums`` gives it, over the tensor."""
        return {"sums": tuple(float(v) for v in self.sums)}


#: Modules whose compiled code the kernels here inline or call, for their cache stamps.
KERNEL_DEPENDENCIES = (blocks,)
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
