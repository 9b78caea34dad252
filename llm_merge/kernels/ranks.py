"""DELLA's magnitude midranks from counts per distinct magnitude (numba).

Rank 0 is the largest |t|; entries of equal |t| share the mean of the ranks they span, so an
entry's rank depends on its magnitude alone: r = #{larger} + (#{equal} - 1) / 2. Ranks are kept
doubled, 2r = 2 #{larger} + #{equal} - 1, an integer.

Key = the 31 magnitude bits of a float32 (NaN patterns are just large keys); bucket = its top 15
bits, low = its low 16 bits. A *plain* entry has low bits 0 (bfloat16 and float16 deltas mostly
do), so its bucket alone gives its key; the other, *mixed*, keys are collected and sorted. A
``RankTable`` gives every distinct key a *slot*: bucket b's plain key slot b, the u-th distinct
mixed key slot ``BUCKETS + u`` (found through a hash index of the mixed keys); ``RankTable.ranks``
holds each slot's doubled rank.
``slot_values_block`` looks up entries' per-slot values (no state, any order), so that they (ranks, or
keep probabilities: ``kernels.method_blocks``) are computed once per distinct key.
``magnitude_midranks`` ranks a whole vector this way; ``kernels.streamed_ranks`` builds the tables chunk by
chunk instead.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from llm_merge.kernels.blocks import JIT_OPTIONS
from llm_merge.kernels.cache import configure_kernel_caches

#: Buckets of the 31-bit magnitude key by its top 15 bits.
BUCKETS = 1 << 15
_MAGNITUDE = np.uint32(0x7FFFFFFF)
#: Multiplier of the mixed-key hash (2^64 / golden ratio): a key's home is its product's bits from 32 up.
_HASH = np.uint64(0x9E3779B97F4A7C15)
#: Mixed keys of at most this many are sorted by NumPy; more by a two-pass radix sort (random 31-bit keys:
#: 0.13 against 0.11 ms at 8000, 0.75 against 0.21 ms at 34000; NumPy 2.4's sort of uint32).
_RADIX_MIN = 1 << 13


@njit(**JIT_OPTIONS)
def _start_positions(counts):
    """Each row of digit counts of a radix pass becomes each digit's first output position (in place)."""
    for p in range(counts.shape[0]):
        total = 0
        for d in range(counts.shape[1]):
            c = counts[p, d]
            counts[p, d] = total
            total += c


@njit(**JIT_OPTIONS)
def _radix_sort(keys):
    """The 31-bit keys sorted ascending: LSD radix sort, two passes of 16 bits."""
    n = keys.size
    counts = np.zeros((2, 1 << 16), np.int64)
    for j in range(n):
        counts[0, keys[j] & 0xFFFF] += 1
        counts[1, keys[j] >> 16] += 1
    _start_positions(counts)
    scratch = np.empty(n, keys.dtype)
    for j in range(n):
        digit = keys[j] & 0xFFFF
        scratch[counts[0, digit]] = keys[j]
        counts[0, digit] += 1
    out = np.empty(n, keys.dtype)
    for j in range(n):
        digit = scratch[j] >> 16
        out[counts[1, digit]] = scratch[j]
        counts[1, digit] += 1
    return out


def _sorted(keys: np.ndarray) -> np.ndarray:
    return _radix_sort(keys) if keys.size > _RADIX_MIN else np.sort(keys)


@njit(**JIT_OPTIONS)
def _mixed_index(values):
    """Open-addressing hash index of the distinct mixed keys ``values``: entries (key << 32) | u for the
    u-th key, 0 where empty (a mixed key is never 0), at most half full, probed linearly from
    ``_home(key)``. A lookup touches a cache line or two; a binary search among the bucket's keys would
    touch four or five (per-bucket starts, the keys, the table): ~20 against ~60 ns per mixed entry on
    della's apply pass."""
    size = 16
    while size < 2 * values.size:
        size *= 2
    index = np.zeros(size, np.uint64)
    for u in range(values.size):
        key = np.uint64(values[u])
        h = _home(key, size)
        while index[h] != 0:
            h = (h + 1) & (size - 1)
        index[h] = (key << np.uint64(32)) | np.uint64(u)
    return index


@njit(inline="always", **JIT_OPTIONS)
def _home(key, size):
    """A key's first probe in an index of ``size`` (a power of two) entries."""
    return np.int64((np.uint64(key) * _HASH) >> np.uint64(32)) & (size - 1)


@njit(**JIT_OPTIONS)
def _rank_table(counts, mixed, values):
    """(mixed_values, ranks): the distinct mixed keys (uint32, ascending) and every slot's doubled rank
    (int64), from the bucket counts, their mixed counts and the sorted mixed keys ``values``.

    Keys larger than bucket h's plain key: those of larger buckets and h's mixed ones. Keys larger
    than a mixed key v of bucket h: those of larger buckets and h's mixed ones above v.
    """
    buckets = counts.size
    above = np.empty(buckets, np.int64)  # entries in larger buckets
    total = 0
    for b in range(buckets - 1, -1, -1):
        above[b] = total
        total += counts[b]
    distinct = 0
    for j in range(values.size):
        distinct += j == 0 or values[j] != values[j - 1]
    mixed_values = np.empty(distinct, values.dtype)
    ranks = np.empty(buckets + distinct, np.int64)
    ranks[:buckets] = 2 * (above + mixed) + (counts - mixed) - 1  # plain keys (unused where a bucket has none)
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
        ranks[buckets + u] = 2 * (above[bucket] + (bucket_end - j)) + (j - first) - 1
        j = first
    return mixed_values, ranks


class RankTable:
    """The slots of every distinct |t| of one vector and their doubled midranks (``ranks``): slot b
    for bucket b's plain key, ``BUCKETS + u`` for the u-th distinct mixed key (``mixed_values``,
    sorted; ``index``: their hash index, ``_mixed_index``)."""

    def __init__(self, counts: np.ndarray, mixed: np.ndarray, mixed_keys: np.ndarray) -> None:
        self.mixed_values, self.ranks = _rank_table(counts, mixed, _sorted(mixed_keys))
        self.index = _mixed_index(self.mixed_values)


@njit(inline="always", **JIT_OPTIONS)
def _mixed_slot(key, index):
    """The slot of a mixed key (nonzero low 16 bits, in ``index``): ``BUCKETS`` plus its index among the
    distinct mixed keys. Returns after its probe loop: a helper that returned from inside its loop ran
    20x slower (numba 0.68)."""
    size = index.size
    h = _home(key, size)
    while index[h] >> np.uint64(32) != np.uint64(key):
        h = (h + 1) & (size - 1)
    return BUCKETS + np.int64(index[h] & np.uint64(0xFFFFFFFF))


#: Entries whose slots ``slot_values_block`` takes in one step, with one test for mixed keys among
#: them (1 in 200 bfloat16 deltas is mixed: 92% of groups of 16 hold none).
_GROUP = 16


@njit(**JIT_OPTIONS)
def slot_values_block(bits, m, index, table, out):
    """out[j] = table[slot] for the slot of the float32 bit pattern ``bits[j]`` (sign ignored) in a
    ``RankTable`` (``index``: its ``RankTable.index``), j < m: a plain key's slot is its bucket, a mixed
    key's ``_mixed_slot``. Buckets come ``_GROUP`` entries at a time; only a group holding a mixed key is
    searched entry by entry. No slot is written in between: writing the slots out and gathering from them
    in a second loop cost della's apply pass 0.6 ns more per entry and model (bfloat16 deltas)."""
    whole = m - m % _GROUP
    for g in range(0, whole, _GROUP):
        low_bits = np.uint32(0)
        for j in range(g, g + _GROUP):
            key = bits[j] & _MAGNITUDE
            out[j] = table[np.int64(key >> np.uint32(16))]
            low_bits |= key & np.uint32(0xFFFF)
        if low_bits:
            for j in range(g, g + _GROUP):
                key = np.int64(bits[j] & _MAGNITUDE)
                if key & 0xFFFF:
                    out[j] = table[_mixed_slot(key, index)]
    for j in range(whole, m):
        key = np.int64(bits[j] & _MAGNITUDE)
        out[j] = table[_mixed_slot(key, index) if key & 0xFFFF else key >> 16]


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


@njit(**JIT_OPTIONS)
def _sorted_midranks(bits, out):
    """out = the doubled midranks of ``bits`` by sorting (key, index) pairs: an LSD radix sort of the
    31 key bits (three passes of 11, 10 and 10: the scatter's 2048 write streams stay in cache), then
    each run of equal keys hands its rank to its entries.

    For vectors whose keys are mostly distinct (float32 deltas): a table lookup per entry would miss
    the cache at every step of its search. 16 bytes per entry of pairs and scratch.
    """
    n = bits.size
    shifts = (0, 11, 21)
    masks = (0x7FF, 0x3FF, 0x3FF)
    counts = np.zeros((3, 1 << 11), np.int64)
    for j in range(n):
        key = np.int64(bits[j] & _MAGNITUDE)
        counts[0, key & 0x7FF] += 1
        counts[1, (key >> 11) & 0x3FF] += 1
        counts[2, key >> 21] += 1
    _start_positions(counts)
    pairs = np.empty(n, np.uint64)  # key << 32 | index
    scratch = np.empty(n, np.uint64)
    for j in range(n):
        key = np.uint64(bits[j] & _MAGNITUDE)
        digit = np.int64(key & np.uint64(0x7FF))
        scratch[counts[0, digit]] = (key << np.uint64(32)) | np.uint64(j)
        counts[0, digit] += 1
    for p in range(1, 3):  # stable passes: ascending keys in the end, in ``pairs``
        source, target = (scratch, pairs) if p == 1 else (pairs, scratch)
        shift, mask = np.uint64(32 + shifts[p]), np.uint64(masks[p])
        for j in range(n):
            digit = np.int64((source[j] >> shift) & mask)
            target[counts[p, digit]] = source[j]
            counts[p, digit] += 1
    start = 0
    while start < n:
        key = scratch[start] >> np.uint64(32)
        end = start + 1
        while end < n and scratch[end] >> np.uint64(32) == key:
            end += 1
        doubled = 2 * (n - end) + (end - start) - 1  # 2 #{larger} + #{equal} - 1
        for u in range(start, end):
            out[scratch[u] & np.uint64(0xFFFFFFFF)] = doubled
        start = end


#: Vectors with more mixed entries than this fraction are ranked by sorting instead of through tables.
SORTED_MIXED_FRACTION = 1 / 5


def magnitude_midranks(t: np.ndarray) -> np.ndarray:
    """Doubled midrank of every |t| (any shape, flattened): uint32 up to 2^31 elements, else int64.

    Through rank tables where few entries are mixed (extra memory: 4 bytes per mixed entry and the
    sort's buffer, 28 to 44 per distinct mixed key), else by sorting (16 bytes per entry:
    ``_sorted_midranks``).
    """
    bits = np.ascontiguousarray(t, dtype=np.float32).ravel().view(np.uint32)
    counts = np.zeros(BUCKETS, np.int64)
    mixed = np.zeros(BUCKETS, np.int64)
    n_mixed = count_keys(bits, counts, mixed, np.empty(0, np.uint32))
    out_type = np.uint32 if bits.size <= 1 << 31 else np.int64
    if n_mixed > SORTED_MIXED_FRACTION * bits.size and bits.size < 1 << 32:
        out = np.empty(bits.size, out_type)
        _sorted_midranks(bits, out)
        return out
    keys = np.empty(n_mixed, np.uint32)
    if n_mixed:
        count_keys(bits, np.zeros(BUCKETS, np.int64), np.zeros(BUCKETS, np.int64), keys)
    table = RankTable(counts, mixed, keys)
    del keys
    ranks = table.ranks.astype(out_type)
    out = np.empty(bits.size, out_type)
    slot_values_block(bits, bits.size, table.index, ranks, out)
    return out


#: Modules whose compiled code the kernels here inline or call, for their cache stamps.
KERNEL_DEPENDENCIES = ()
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
