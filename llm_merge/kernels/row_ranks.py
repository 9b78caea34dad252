"""mergekit della_magprune's statistics (numba): per-row midranks, keep probabilities, draws, L1 sums.

``methods.mergekit_sparsify.row_keep_probabilities`` ranks |t| within each row (dim 1; a 1-D tensor is
one row): midrank r, 0 the smallest, keep probability (density − ε) + 2ε·r/(L − 1) in float64, cast to
float32. ``row_doubled_midranks`` ranks one row without sorting it: bfloat16 and float16 task vectors
take few distinct magnitudes per row (a few hundred in a row of thousands), so it counts |t| by its top
16 bits (bucket) and sorts only the occupied buckets and the few entries with nonzero low 16 bits (all
of them for float32 deltas: then it sorts the row). ``StreamingRowKeep`` streams raw chunks of 1-D and
2-D tensors row by row (a row may straddle chunks) and keeps, per model, the draws' outcome as one bit
per element (``keep_mask``) with the L1 factor; the fused apply pass reads the bits. ``keep_bits``
draws the same bits from the NumPy method's keep probabilities.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from numba import njit

from llm_merge.kernels import blocks, counter_rng, draws, l1_sums, mergekit_streaming, streaming
from llm_merge.kernels.blocks import JIT_OPTIONS, task_vector_row, widen_block
from llm_merge.kernels.cache import configure_kernel_caches
from llm_merge.kernels.counter_rng import GAMMA, UNIT
from llm_merge.kernels.draws import draw_state, mix53
from llm_merge.kernels.l1_sums import SLOTS
from llm_merge.kernels.mergekit_streaming import SLOT_COPIES, add_block_sums, l1_factor
from llm_merge.kernels.streaming import chunk_inputs

#: Buckets of the 31-bit magnitude key by its top 15 bits; per bucket: count, nonzero-low-bits count,
#: the plain key's doubled rank (or its draw threshold), entries below the bucket's mixed keys.
_BUCKETS = 1 << 15
_COUNT, _MIXED, _PLAIN_RANK, _BELOW_MIXED = 0, 1, 2, 3
_MAGNITUDE = np.uint32(0x7FFFFFFF)


class RowScratch:
    """Scratch of ``row_doubled_midranks`` for rows of up to ``length`` entries (the bucket table and
    bitmap are left zeroed after each row)."""

    def __init__(self, length: int) -> None:
        self.table = np.zeros((_BUCKETS, 4), np.int64)
        self.occupied = np.zeros(_BUCKETS // 64, np.uint64)  # a bit per bucket of the row
        self.occupied_words = np.zeros(_BUCKETS // 64 // 64, np.uint64)  # a bit per nonzero word of ``occupied``
        self.touched = np.empty(length, np.int64)
        self.mixed = np.empty(length, np.uint64)  # (key << 32) | position of the entries with nonzero low bits
        self.sort_buffer = np.empty(length, np.uint64)
        self.digit_counts = np.empty(256, np.int64)
        self.doubled = np.empty(length, np.int64)

    @property
    def arrays(self) -> tuple:
        """What ``row_doubled_midranks`` takes; the ranks are at index ``_DOUBLED``."""
        return (self.table, self.occupied, self.occupied_words, self.touched, self.mixed, self.sort_buffer,
                self.digit_counts, self.doubled)


_DOUBLED = 7


#: De Bruijn sequence and table: the index of a 64-bit word's lowest set bit (numba has no count of
#: trailing zeros).
_DE_BRUIJN = 0x03F79D71B4CB0A89
_LOWEST_BIT = np.zeros(64, np.int64)
for _bit in range(64):
    _LOWEST_BIT[((_DE_BRUIJN << _bit) & 0xFFFFFFFFFFFFFFFF) >> 58] = _bit
@njit(inline="always", **JIT_OPTIONS)
def _lowest_bit(word):
    """Index of the lowest set bit of a nonzero uint64."""
    lowest = word & (~word + np.uint64(1))
    return _LOWEST_BIT[np.int64((lowest * np.uint64(_DE_BRUIJN)) >> np.uint64(58))]


#: Below this many entries, an insertion sort beats the radix sort (whose 4 passes clear 256 counters each).
_INSERTION_SORT_MAX = 64


@njit(**JIT_OPTIONS)
def _sort_by_key(values, count, buffer, digit_counts):
    """Sort ``values[:count]`` (uint64: key << 32 | position) by key, positions of equal keys in order:
    insertion sort when short, else an LSD radix sort on the key's bytes (bytes equal in all skipped)."""
    if count <= _INSERTION_SORT_MAX:
        for j in range(1, count):
            value = values[j]
            q = j - 1
            while q >= 0 and (values[q] >> np.uint64(32)) > (value >> np.uint64(32)):
                values[q + 1] = values[q]
                q -= 1
            values[q + 1] = value
        return
    source, target = values, buffer
    swapped = False
    for shift in range(32, 64, 8):
        for d in range(256):
            digit_counts[d] = 0
        for j in range(count):
            digit_counts[np.int64((source[j] >> np.uint64(shift)) & np.uint64(255))] += 1
        if digit_counts[np.int64((source[0] >> np.uint64(shift)) & np.uint64(255))] == count:
            continue
        total = 0
        for d in range(256):
            total, digit_counts[d] = total + digit_counts[d], total
        for j in range(count):
            value = source[j]
            d = np.int64((value >> np.uint64(shift)) & np.uint64(255))
            target[digit_counts[d]] = value
            digit_counts[d] += 1
        source, target = target, source
        swapped = not swapped
    if swapped:
        values[:count] = source[:count]


@njit(inline="always", **JIT_OPTIONS)
def _threshold(keep_prob):
    """The draw threshold of a float32 keep probability (``CounterRNG.keep`` of an array)."""
    return np.uint64(math.floor(np.float64(keep_prob) * UNIT))


@njit(inline="always", **JIT_OPTIONS)
def _rank_value(doubled, length, two_epsilon, low_prob, thresholds):
    """The doubled midrank itself, or (``thresholds``) the draw threshold of its keep probability:
    ``row_keep_probabilities``' float64 operations (midrank / (length − 1) · 2ε + (p − ε)), then float32."""
    if not thresholds:
        return doubled
    if length > 1:
        position = np.float64(doubled) / 2.0 / np.float64(length - 1)
    else:  # a row of one entry has no spread (mergekit: 0/0): the middle
        position = 0.5
    return np.int64(_threshold(np.float32(position * two_epsilon + low_prob)))


@njit(**JIT_OPTIONS)
def row_doubled_midranks(bits, scratch):
    """Doubled ascending midrank of every |t| (float32 bits ``bits[j]``; magnitudes compare as their bits) in
    its row, into ``scratch``'s ``doubled``: 2·#{smaller} + #{equal} − 1, as ``methods.mergekit_sparsify.
    row_midranks`` (doubled)."""
    _rank_row(bits, scratch, 0.0, 0.0, False)


@njit(**JIT_OPTIONS)
def row_keep_thresholds(bits, scratch, two_epsilon, low_prob):
    """The draw threshold of every entry's keep probability (p − ε) + 2ε · midrank / (length − 1) in its row
    (``two_epsilon`` = 2ε, ``low_prob`` = p − ε), into ``scratch``'s ``doubled``: computed once per distinct
    |t|, not per entry."""
    _rank_row(bits, scratch, two_epsilon, low_prob, True)


@njit(**JIT_OPTIONS)
def _rank_row(bits, scratch, two_epsilon, low_prob, thresholds):
    """Doubled midranks (or their thresholds: ``_rank_value``) of a row into ``scratch``'s ``doubled``.

    Counts entries per bucket (top 15 bits of the key), marking occupied buckets in a two-level bitmap;
    walks the bitmap in order to give each bucket's plain key (low bits 0, the bucket's smallest) its rank,
    and sorts the mixed keys to rank them.
    """
    table, occupied, occupied_words, touched, mixed, sort_buffer, digit_counts, doubled = scratch
    length = bits.size
    n_touched = 0
    n_mixed = 0
    for j in range(length):  # no branch on a bucket's first entry: it would be mispredicted once per bucket
        key = bits[j] & _MAGNITUDE
        bucket = np.int64(key >> np.uint32(16))
        count = table[bucket, _COUNT]
        table[bucket, _COUNT] = count + 1
        touched[n_touched] = bucket
        n_touched += count == 0
        if key & np.uint32(0xFFFF):
            table[bucket, _MIXED] += 1
            mixed[n_mixed] = (np.uint64(key) << np.uint64(32)) | np.uint64(j)
            n_mixed += 1
    for q in range(n_touched):
        bucket = touched[q]
        occupied[bucket >> 6] |= np.uint64(1) << np.uint64(bucket & 63)
        occupied_words[bucket >> 12] |= np.uint64(1) << np.uint64((bucket >> 6) & 63)
    below = 0
    for v in range(occupied_words.size):  # buckets in ascending order
        words = occupied_words[v]
        occupied_words[v] = 0
        while words:
            w = v * 64 + _lowest_bit(words)
            words &= words - np.uint64(1)
            word = occupied[w]
            occupied[w] = 0
            while word:
                bucket = w * 64 + _lowest_bit(word)
                word &= word - np.uint64(1)
                count, n_bucket_mixed = table[bucket, _COUNT], table[bucket, _MIXED]
                plain = count - n_bucket_mixed
                table[bucket, _PLAIN_RANK] = _rank_value(2 * below + plain - 1, length, two_epsilon, low_prob,
                                                         thresholds)
                table[bucket, _BELOW_MIXED] = below + plain
                below += count
    for j in range(length):
        doubled[j] = table[np.int64((bits[j] & _MAGNITUDE) >> np.uint32(16)), _PLAIN_RANK]
    _sort_by_key(mixed, n_mixed, sort_buffer, digit_counts)
    first = 0
    bucket_start = 0  # index in ``mixed`` of the first mixed key of the current bucket
    while first < n_mixed:
        key = mixed[first] >> np.uint64(32)
        if first == 0 or (mixed[first - 1] >> np.uint64(48)) != (key >> np.uint64(16)):
            bucket_start = first
        last = first
        while last + 1 < n_mixed and (mixed[last + 1] >> np.uint64(32)) == key:
            last += 1
        smaller = table[np.int64(key >> np.uint64(16)), _BELOW_MIXED] + first - bucket_start
        value = _rank_value(2 * smaller + last - first, length, two_epsilon, low_prob, thresholds)
        for q in range(first, last + 1):
            doubled[np.int64(mixed[q] & np.uint64(0xFFFFFFFF))] = value
        first = last + 1
    for q in range(n_touched):
        bucket = touched[q]
        for field in range(4):
            table[bucket, field] = 0


@njit(inline="always", **JIT_OPTIONS)
def _set_kept_bits(flags, count, start, mask):
    """Bit ``start + j`` of ``mask`` set where ``flags[j]`` (0 or 1): whole bytes at a time but at the ends
    (setting each bit in its byte keeps the loop from vectorizing)."""
    j = 0
    while j < count and (start + j) & 7:
        mask[(start + j) >> 3] |= np.uint8(flags[j] << ((start + j) & 7))
        j += 1
    whole = (count - j) >> 3
    first = (start + j) >> 3
    for b in range(whole):
        byte = np.uint32(0)
        for q in range(8):
            byte |= np.uint32(flags[j + 8 * b + q]) << np.uint32(q)
        mask[first + b] |= np.uint8(byte)
    for q in range(j + 8 * whole, count):
        mask[(start + q) >> 3] |= np.uint8(flags[q] << ((start + q) & 7))


@njit(**JIT_OPTIONS)
def _keep_row(bits, row_start, key, two_epsilon, low_prob, scratch, flags, mask, sums, rescale):
    """One row of one model (the float32 bits of its task vector): midranks, keep probabilities
    (``row_keep_probabilities``' float64 operations, then float32), the draws of elements ``row_start ..``;
    kept entries set their bit in ``mask`` and, with ``rescale``, add to the slot sums."""
    length = bits.size
    row_keep_thresholds(bits, scratch, two_epsilon, low_prob)
    thresholds = scratch[_DOUBLED]
    z = draw_state(key, row_start)
    for j in range(length):
        flags[j] = np.uint8(mix53(z) < np.uint64(thresholds[j]))
        z += np.uint64(GAMMA)
    _set_kept_bits(flags, length, row_start, mask)
    if rescale:
        add_block_sums(bits, length, flags, sums)


@njit(**JIT_OPTIONS)
def _rows_pass(raws, base_raw, has_base, n, position, row, row_bits, filled, base, base_bits, keys, two_epsilon,
               low_prob, active, rescale, scratch, flags, masks, sums):
    """Feed one chunk of raw bits (its first element is element ``position``) to the rows: ``row[i]`` holds
    the ``filled`` task-vector values of the row it continues; every row completed is ranked and drawn
    (``_keep_row``). Returns how many values of the next row the chunk leaves in ``row``."""
    length = row.shape[1]
    s = 0
    while s < n:
        take = min(length - filled, n - s)
        if has_base:
            widen_block(base_raw, s, take, base_bits[filled : filled + take])
        for i in range(len(raws)):
            if active[i]:
                task_vector_row(raws[i], s, take, base[filled : filled + take], has_base, row[i, filled : filled + take],
                                row_bits[i, filled : filled + take])
        filled += take
        s += take
        if filled == length:
            for i in range(len(raws)):
                if active[i]:
                    _keep_row(row_bits[i], position + s - length, keys[i], two_epsilon[i], low_prob[i], scratch,
                              flags, masks[i], sums[i], rescale)
            filled = 0
    return filled


class StreamingRowKeep:
    """della_magprune's keep bits and L1 factors of k task vectors in one pass over raw chunks of a 1-D or
    2-D tensor (``row_keep_probabilities``' draws, bit for bit): 1 bit per element and model, and one row of
    float32 values per model (``create`` declines other tensors: the NumPy method runs instead)."""

    #: Longest row streamed (4 bytes per entry and model stay in memory while it fills).
    ROW_LIMIT = 1 << 22

    @classmethod
    def row_length(cls, shape, numel: int) -> Optional[int]:
        """The rows' length of a tensor this streams (mergekit ranks along dim 1; 1-D: one row), else None."""
        if numel == 0 or len(shape) > 2:
            return None
        length = numel if len(shape) < 2 else int(shape[1])
        return length if 0 < length <= cls.ROW_LIMIT else None

    @classmethod
    def peak_bytes(cls, k: int, numel: int) -> int:
        """Most memory the statistics of k task vectors of ``numel`` elements hold: their keep bits and a row
        of each (at most ``ROW_LIMIT`` entries)."""
        return k * ((numel + 7) // 8 + 4 * min(numel, cls.ROW_LIMIT))

    @classmethod
    def create(cls, numel: int, shape, keys, model_options: list[dict], rescale: bool) -> Optional["StreamingRowKeep"]:
        length = cls.row_length(tuple(shape), numel)
        return None if length is None else cls(numel, length, keys, model_options, rescale)

    def __init__(self, numel: int, length: int, keys, model_options: list[dict], rescale: bool) -> None:
        k = len(model_options)
        self.keys = np.asarray(keys, np.uint64)
        self.active = np.array([o["reserve_p"] < 1.0 for o in model_options], np.bool_)
        self.two_epsilon = np.array([2.0 * o["epsilon"] for o in model_options], np.float64)
        self.low_prob = np.array([o["reserve_p"] - o["epsilon"] for o in model_options], np.float64)
        self.rescale = rescale
        self.masks = np.zeros((k, (numel + 7) // 8), np.uint8)  # pages of inactive models are never touched
        self.sums = np.zeros((k, SLOT_COPIES, 2 * SLOTS), np.int64)
        self.row = np.empty((k, length), np.float32)
        self.base = np.empty(length, np.float32)
        self.scratch = RowScratch(length)
        self.flags = np.empty(length, np.uint8)
        self.filled = 0
        self.position = 0

    def wants(self, pass_index: int) -> bool:
        return pass_index == 0 and bool(self.active.any())

    def feed(self, pass_index: int, raws, base_raw) -> None:
        """Add one chunk (raw bits, as ``FusedChunks.run`` takes them); chunks come in order."""
        inputs = chunk_inputs(raws, base_raw)
        self.filled = _rows_pass(*inputs, self.position, self.row, self.row.view(np.uint32), self.filled, self.base,
                                 self.base.view(np.uint32), self.keys, self.two_epsilon, self.low_prob, self.active,
                                 self.rescale, self.scratch.arrays, self.flags, self.masks, self.sums)
        self.position += inputs[3]

    def end_pass(self, pass_index: int) -> None:
        pass

    def statistics(self) -> list[dict]:
        """Per model {"keep_mask": its keep bits (None: all kept), "l1_scale"}."""
        return [{"keep_mask": self.masks[i] if self.active[i] else None,
                 "l1_scale": l1_factor(self.sums[i]) if self.active[i] and self.rescale else 1.0}
                for i in range(len(self.active))]


@njit(**JIT_OPTIONS)
def _keep_bits(keep_prob, key, offset, mask):
    """Bit ``offset + j`` of ``mask`` set where draw ``offset + j`` keeps entry j (probability ``keep_prob[j]``)."""
    z = draw_state(key, offset)
    for j in range(keep_prob.size):
        index = offset + j
        kept = mix53(z) < _threshold(keep_prob[j])
        mask[index >> 3] |= np.uint8(np.uint8(kept) << (index & 7))
        z += np.uint64(GAMMA)


def keep_bits(stats: dict, key: int, numel: int, step: int = 1 << 20) -> Optional[np.ndarray]:
    """della_magprune's keep bits of one model: its streamed ``keep_mask``, or drawn from the NumPy method's
    ``keep_prob`` (an array or a spilled one, read ``step`` entries at a time); None where all are kept
    (and for other sparsifiers, which have neither)."""
    if "keep_mask" in stats:
        return stats["keep_mask"]
    keep_prob = stats.get("keep_prob")
    if keep_prob is None:
        return None
    mask = np.zeros((numel + 7) // 8, np.uint8)
    for start in range(0, numel, step):
        _keep_bits(np.ascontiguousarray(keep_prob[start : start + step], np.float32), np.uint64(key), start, mask)
    return mask


#: Modules whose compiled code the kernels here inline or call, for their cache stamps.
KERNEL_DEPENDENCIES = (blocks, counter_rng, draws, l1_sums, mergekit_streaming, streaming)
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
