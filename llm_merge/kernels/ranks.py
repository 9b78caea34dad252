"""DELLA's magnitude midranks from counts per distinct magnitude (numba).

Rank 0 is the largest |t|; entries of equal |t| share the mean of the ranks they span, so an
entry's rank depends on its magnitude alone: r = #{larger} + (#{equal} - 1) / 2. Ranks are kept
doubled, 2r = 2 #{larger} + #{equal} - 1, an integer.

Key = the 31 magnitude bits of a float32 (NaN patterns are just large keys); bucket = its top 15
bits, low = its low 16 bits. A *plain* entry has low bits 0 (bfloat16 and float16 deltas mostly
do), so its bucket alone gives its key; the other, *mixed*, keys are collected and sorted. A
``RankTable`` holds the doubled rank of each bucket's plain key and of each distinct mixed key;
``rank_block`` looks them up (no state, any order). ``magnitude_midranks`` ranks a whole vector
this way; ``kernels.streamed_ranks`` builds the tables chunk by chunk instead.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from llm_merge.kernels.blocks import JIT_OPTIONS
from llm_merge.kernels.cache import configure_kernel_caches

#: Buckets of the 31-bit magnitude key by its top 15 bits.
BUCKETS = 1 << 15
_MAGNITUDE = np.uint32(0x7FFFFFFF)


@njit(**JIT_OPTIONS)
def _rank_table(counts, mixed, values):
    """(plain, mixed_values, mixed_starts, mixed_ranks), all int64 but the uint32 values, from the
    bucket counts, their mixed counts and the sorted mixed keys ``values``.

    Keys larger than bucket h's plain key: those of larger buckets and h's mixed ones. Keys larger
    than a mixed key v of bucket h: those of larger buckets and h's mixed ones above v.
    """
    buckets = counts.size
    above = np.empty(buckets, np.int64)  # entries in larger buckets
    total = 0
    for b in range(buckets - 1, -1, -1):
        above[b] = total
        total += counts[b]
    plain = 2 * (above + mixed) + (counts - mixed) - 1
    distinct = 0
    for j in range(values.size):
        distinct += j == 0 or values[j] != values[j - 1]
    mixed_values = np.empty(distinct, values.dtype)
    mixed_ranks = np.empty(distinct, np.int64)
    mixed_starts = np.zeros(buckets + 1, np.int64)
    u = distinct
    bucket_end = values.size  # end of the current bucket's run in ``values``, walking down
    j = values.size
    while j > 0:  # from the largest key down: each distinct key's run [first, j)
        first = j - 1
        while first > 0 and values[first - 1] == values[j - 1]:
            first -= 1
        bucket = np.int64(values[j - 1] >> 16)
        if j == values.size or np.int64(values[j] >> 16) != bucket:
            bucket_end = j
        u -= 1
        mixed_values[u] = values[j - 1]
        mixed_ranks[u] = 2 * (above[bucket] + (bucket_end - j)) + (j - first) - 1
        mixed_starts[bucket + 1] += 1
        j = first
    for b in range(buckets):
        mixed_starts[b + 1] += mixed_starts[b]
    return plain, mixed_values, mixed_starts, mixed_ranks


class RankTable:
    """The doubled midrank of every distinct |t| of one vector: per bucket for plain keys, per
    distinct key for mixed ones (sorted, with each bucket's start)."""

    def __init__(self, counts: np.ndarray, mixed: np.ndarray, mixed_keys: np.ndarray) -> None:
        self.plain, self.mixed_values, self.mixed_starts, self.mixed_ranks = _rank_table(
            counts, mixed, np.sort(mixed_keys))

    @property
    def arrays(self) -> tuple:
        """What ``rank_block`` reads, in its order."""
        return self.plain, self.mixed_values, self.mixed_starts, self.mixed_ranks


@njit(**JIT_OPTIONS)
def rank_block(bits, m, table, out):
    """out[:m] = the doubled midranks of the float32 bit patterns ``bits[:m]`` (sign ignored) from
    ``table`` (``RankTable.arrays``): a plain key's is its bucket's, a mixed key's is found by binary
    search among its bucket's distinct mixed keys.

    Written as one loop: the same lookup as an inlined helper function that returns from inside its
    search loop ran 20x slower (33 against 1.8 ns per plain entry, numba 0.68).
    """
    plain, values, starts, ranks = table
    for j in range(m):
        key = np.int64(bits[j] & _MAGNITUDE)
        bucket = key >> 16
        if key & 0xFFFF:
            low, high = starts[bucket], starts[bucket + 1]
            while low < high:  # numba's np.searchsorted on a slice costs ~0.2 us a call
                middle = (low + high) >> 1
                if values[middle] < key:
                    low = middle + 1
                else:
                    high = middle
            out[j] = ranks[low]
        else:
            out[j] = plain[bucket]


@njit(**JIT_OPTIONS)
def count_keys(bits, counts, mixed, collected):
    """Count |t| keys per bucket (``counts``) and mixed ones (``mixed``); when ``collected`` has room,
    also copy the mixed keys there, in order. Returns how many mixed keys were seen."""
    collect = collected.size > 0
    n_mixed = 0
    for j in range(bits.size):
        key = bits[j] & _MAGNITUDE
        bucket = key >> 16
        counts[bucket] += 1
        if key & 0xFFFF:
            mixed[bucket] += 1
            if collect:
                collected[n_mixed] = key
            n_mixed += 1
    return n_mixed


def magnitude_midranks(t: np.ndarray) -> np.ndarray:
    """Doubled midrank of every |t| (any shape, flattened): uint32 up to 2^31 elements, else int64.

    Extra memory: 4 bytes per mixed entry (all of them for most float32 deltas) and the sort's
    buffer, and 12 bytes per distinct mixed key.
    """
    bits = np.ascontiguousarray(t, dtype=np.float32).ravel().view(np.uint32)
    counts = np.zeros(BUCKETS, np.int64)
    mixed = np.zeros(BUCKETS, np.int64)
    n_mixed = count_keys(bits, counts, mixed, np.empty(0, np.uint32))
    keys = np.empty(n_mixed, np.uint32)
    if n_mixed:
        count_keys(bits, np.zeros(BUCKETS, np.int64), np.zeros(BUCKETS, np.int64), keys)
    table = RankTable(counts, mixed, keys)
    del keys
    out = np.empty(bits.size, np.uint32 if bits.size <= 1 << 31 else np.int64)
    rank_block(bits, bits.size, table.arrays, out)
    return out


#: Modules whose compiled code the kernels here inline or call, for their cache stamps.
KERNEL_DEPENDENCIES = ()
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
