"""Step 3 of ``kernels.ranks``: rank the buffered keys of a part of adjacent buckets in place, in cache.

A part's keys are ``bits & 0x7FFFFFFF`` of its entries in index order: bucket = the top 15 bits,
low = the low 16 bits. A part larger than ``RankLimits.group_max`` is first scattered into groups of
adjacent buckets. A group whose lows are few counts its (bucket, low) pairs (``_rank_few``); one big
bucket counts its 65536 lows (``_count_bucket``); any other is radix sorted (``_rank_group``).
``cut`` also cuts a run into parts; ``bump2`` / ``bump4`` are the unrolled counter updates every
step uses: runs of one key do not serialize on one counter.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from llm_merge.kernels import blocks
from llm_merge.kernels.blocks import JIT_OPTIONS
from llm_merge.kernels.cache import configure_kernel_caches

BUCKETS = 1 << 15  # values of (bits & 0x7FFFFFFF) >> 16
LOWS = 1 << 16
MAGNITUDE = 0x7FFFFFFF
LOW = 0xFFFF


class RankLimits(NamedTuple):
    """The thresholds of ``magnitude_ranks_fast`` (``kernels.ranks``'s ``RANK_*`` constants, clipped)."""

    super_max: int  # most non-direct entries buffered at once
    direct_min: int  # a bucket of at least this many entries may be ranked through a table of its lows
    direct_max: int  # most direct tables at once
    samples: int  # entries sampled to tell the buckets with few distinct lows
    fanout: int  # target number of parts of the buffer
    group_max: int  # most entries of a radix-sorted group (at most 65536)
    count_min: int  # a buffered bucket of at least this many entries is ranked by counting its lows
    max_distinct: int  # a group with at most this many distinct lows is ranked by counting (bucket, low) pairs


class PartScratch(NamedTuple):
    """Cache-sized scratch that ``rank_part`` reuses for every part of a run."""

    spill: np.ndarray  # uint32: the groups of a split part
    sub_of: np.ndarray  # int32 per bucket: its group in a split part
    work_a: np.ndarray  # uint32, the radix sort's two word arrays
    work_b: np.ndarray
    hist: np.ndarray  # int64 (2048): the radix sort's interleaved histograms
    cursor: np.ndarray  # int64 per bucket: next rank, or row of the (bucket, low) table
    counter: np.ndarray  # uint32 (65536): counters of one bucket's lows, or of (bucket, low) pairs
    seen: np.ndarray  # uint16 (65536), all zero between groups: distinct lows of a group
    ids: np.ndarray  # int64: the distinct lows of a group


@njit(inline="always", **JIT_OPTIONS)
def bump2(counts, s0, s1):
    """Increment two counters (the slots may be equal); returns each one's value before its own increment."""
    x0 = counts[s0]
    x1 = counts[s1] + (s0 == s1)
    counts[s0] = x0 + 1
    counts[s1] = x1 + 1
    return x0, x1


@njit(inline="always", **JIT_OPTIONS)
def bump4(counts, s0, s1, s2, s3):
    """Increment four counters (slots may repeat); returns each one's value before its own increment.

    All four loads come first, corrected for earlier equal slots, so runs of one slot do not
    serialize on a store-to-load chain.
    """
    x0 = counts[s0]
    x1 = counts[s1] + (s1 == s0)
    x2 = counts[s2] + (s2 == s0) + (s2 == s1)
    x3 = counts[s3] + (s3 == s0) + (s3 == s1) + (s3 == s2)
    counts[s0] = x0 + 1
    counts[s1] = x1 + 1
    counts[s2] = x2 + 1
    counts[s3] = x3 + 1
    return x0, x1, x2, x3


@njit(inline="always", **JIT_OPTIONS)
def _radix_pass(src, dst, shift, counts):
    """Stable scatter of src into dst by byte ``(v >> shift) & 255``; False (nothing done) when it is constant."""
    m = src.size
    total = 0
    for b in range(256):
        c = counts[b]
        if c == m:
            return False
        counts[b] = total
        total += c
    i = 0
    while i + 4 <= m:
        v0 = src[i]
        v1 = src[i + 1]
        v2 = src[i + 2]
        v3 = src[i + 3]
        b0 = (np.int64(v0) >> shift) & 255
        b1 = (np.int64(v1) >> shift) & 255
        b2 = (np.int64(v2) >> shift) & 255
        b3 = (np.int64(v3) >> shift) & 255
        p0, p1, p2, p3 = bump4(counts, b0, b1, b2, b3)
        dst[p0] = v0
        dst[p1] = v1
        dst[p2] = v2
        dst[p3] = v3
        i += 4
    while i < m:
        b0 = (np.int64(src[i]) >> shift) & 255
        p0 = counts[b0]
        counts[b0] = p0 + 1
        dst[p0] = src[i]
        i += 1
    return True


@njit(inline="always", **JIT_OPTIONS)
def _count_bucket(region, rank0, table):
    """Ranks from ``rank0`` of one bucket's keys (index order, overwritten): count the 65536 lows, hand out ranks."""
    m = region.size
    for d in range(LOWS):
        table[d] = 0
    i = 0
    while i + 2 <= m:
        bump2(table, LOW - (np.int64(region[i]) & LOW), LOW - (np.int64(region[i + 1]) & LOW))
        i += 2
    if i < m:
        table[LOW - (np.int64(region[i]) & LOW)] += 1
    total = rank0
    for d in range(LOWS):
        c = np.int64(table[d])
        table[d] = total
        total += c
    i = 0
    while i + 2 <= m:
        d0 = LOW - (np.int64(region[i]) & LOW)
        d1 = LOW - (np.int64(region[i + 1]) & LOW)
        r0, r1 = bump2(table, d0, d1)
        region[i] = r0
        region[i + 1] = r1
        i += 2
    if i < m:
        region[i] = table[LOW - (np.int64(region[i]) & LOW)]


@njit(**JIT_OPTIONS)
def _rank_group(region, low, high, first, work_a, work_b, hist, cursor):
    """Overwrite ``region`` (the keys of buckets [low, high], index order; at most 65536) with their ranks.

    ``first[bucket]`` is the bucket's first rank. A stable LSD radix sort of the words
    ``(0xFFFF - low) << 16 | position`` (two 8-bit passes, constant bytes skipped), then a
    stable counting pass over the buckets that writes each rank at its position.
    """
    m = region.size
    a = work_a[:m]
    b = work_b[:m]
    # Words (0xFFFF - low) << 16 | position, and the histograms of both bytes of 0xFFFF - low
    # in four interleaved copies (hist[copy * 512 + byte * 256 + value]): no chain on one counter.
    for e in range(2048):
        hist[e] = 0
    i = 0
    while i + 4 <= m:
        for c in range(4):
            d = LOW - (np.int64(region[i + c]) & LOW)
            a[i + c] = (d << 16) | (i + c)
            hist[c * 512 + (d & 255)] += 1
            hist[c * 512 + 256 + (d >> 8)] += 1
        i += 4
    while i < m:
        d = LOW - (np.int64(region[i]) & LOW)
        a[i] = (d << 16) | i
        hist[d & 255] += 1
        hist[256 + (d >> 8)] += 1
        i += 1
    for e in range(512):
        hist[e] += hist[512 + e] + hist[1024 + e] + hist[1536 + e]
    src, dst = a, b
    for byte in range(2):
        if _radix_pass(src, dst, 16 + 8 * byte, hist[256 * byte : 256 * byte + 256]):
            src, dst = dst, src
    if low == high:
        rank0 = first[low]
        for r in range(m):
            region[np.int64(src[r]) & LOW] = rank0 + r
        return
    # Stable counting pass over the buckets (the bucket of position q is still in region[q]).
    for bucket in range(low, high + 1):
        cursor[bucket] = first[bucket]
    i = 0
    while i + 2 <= m:
        q0 = np.int64(src[i]) & LOW
        q1 = np.int64(src[i + 1]) & LOW
        b0 = np.int64(region[q0]) >> 16
        b1 = np.int64(region[q1]) >> 16
        r0, r1 = bump2(cursor, b0, b1)
        region[q0] = r0
        region[q1] = r1
        i += 2
    if i < m:
        q0 = np.int64(src[i]) & LOW
        region[q0] = cursor[np.int64(region[q0]) >> 16]


@njit(inline="always", **JIT_OPTIONS)
def _bump_few(region, m, cursor, seen, table, write):
    """table[slot] += 1 for the slot of every key of region[:m] (its bucket's row + its low's id).

    Unrolled by four with an equality correction, so runs of one slot do not serialize on one
    counter. With ``write``, each key is replaced by its slot's count before the increment.
    """
    i = 0
    while i + 4 <= m:
        e0 = cursor[np.int64(region[i]) >> 16] + seen[LOW - (np.int64(region[i]) & LOW)]
        e1 = cursor[np.int64(region[i + 1]) >> 16] + seen[LOW - (np.int64(region[i + 1]) & LOW)]
        e2 = cursor[np.int64(region[i + 2]) >> 16] + seen[LOW - (np.int64(region[i + 2]) & LOW)]
        e3 = cursor[np.int64(region[i + 3]) >> 16] + seen[LOW - (np.int64(region[i + 3]) & LOW)]
        x0, x1, x2, x3 = bump4(table, e0, e1, e2, e3)
        if write:
            region[i] = x0
            region[i + 1] = x1
            region[i + 2] = x2
            region[i + 3] = x3
        i += 4
    while i < m:
        e0 = cursor[np.int64(region[i]) >> 16] + seen[LOW - (np.int64(region[i]) & LOW)]
        x0 = table[e0]
        table[e0] = x0 + 1
        if write:
            region[i] = x0
        i += 1


@njit(inline="always", **JIT_OPTIONS)
def _shell_sort(values, count):
    """Sort ``values[:count]`` in place, ascending."""
    gap = 1
    while gap < count // 3:
        gap = 3 * gap + 1
    while gap > 0:
        for i in range(gap, count):
            v = values[i]
            j = i
            while j >= gap and values[j - gap] > v:
                values[j] = values[j - gap]
                j -= gap
            values[j] = v
        gap //= 3


@njit(**JIT_OPTIONS)
def _rank_few(region, low, high, counts, first, max_distinct, seen, ids, cursor, table):
    """Rank ``region`` (the keys of buckets [low, high], index order) in place when its lows are
    few: count each (bucket, low) pair in a compact table, then hand out ranks in index order.
    Returns False (region untouched) when there are more than ``max_distinct`` distinct lows or
    the table would be too large. ``seen`` (65536 entries) is all zero on entry and on exit.
    """
    m = region.size
    distinct = 0
    for i in range(m):
        d = LOW - (np.int64(region[i]) & LOW)
        if seen[d] == 0:
            if distinct == max_distinct:
                for q in range(distinct):
                    seen[ids[q]] = 0
                return False
            seen[d] = 1
            ids[distinct] = d
            distinct += 1
    buckets = 0
    for bucket in range(high, low - 1, -1):
        if counts[bucket] > 0:
            cursor[bucket] = buckets * distinct  # row of the bucket in the table
            buckets += 1
    size = buckets * distinct
    if size > min(table.size, 2 * m + 1024):
        for q in range(distinct):
            seen[ids[q]] = 0
        return False
    _shell_sort(ids, distinct)  # ascending 0xFFFF - low: largest low first
    for q in range(distinct):
        seen[ids[q]] = q
    for e in range(size):
        table[e] = 0
    _bump_few(region, m, cursor, seen, table, False)
    for bucket in range(high, low - 1, -1):
        if counts[bucket] > 0:
            rank = first[bucket]
            row = cursor[bucket]
            for q in range(distinct):
                c = np.int64(table[row + q])
                table[row + q] = rank
                rank += c
    _bump_few(region, m, cursor, seen, table, True)
    for q in range(distinct):
        seen[ids[q]] = 0
    return True


@njit(**JIT_OPTIONS)
def cut(counts, low, high, target, part_of):
    """Cut buckets [low, high] (from the top) into parts; ``part_of[bucket]`` = part id.

    A part closes once it holds ``target`` (>= 1) entries, or before a bucket that would
    take it past ``2 * target``; so a part of several buckets has at most ``2 * target``
    entries. Returns the parts' sizes and nonempty bucket ranges [lows, highs].
    """
    sizes = np.zeros(high - low + 2, np.int64)
    lows = np.empty(high - low + 2, np.int64)
    highs = np.empty(high - low + 2, np.int64)
    parts = 0
    highs[0] = high
    for bucket in range(high, low - 1, -1):
        c = counts[bucket]
        if sizes[parts] > 0 and sizes[parts] + c > 2 * target:
            lows[parts] = bucket + 1
            parts += 1
            highs[parts] = bucket
        part_of[bucket] = parts
        sizes[parts] += c
        if sizes[parts] >= target:
            lows[parts] = bucket
            parts += 1
            highs[parts] = bucket - 1
    if sizes[parts] > 0:
        lows[parts] = low
        parts += 1
    for g in range(parts):  # tight ranges
        while counts[highs[g]] == 0:
            highs[g] -= 1
        while counts[lows[g]] == 0:
            lows[g] += 1
    return sizes[:parts], lows[:parts], highs[:parts]


@njit(**JIT_OPTIONS)
def rank_part(region, low, high, counts, first, limits, work):
    """Rank ``region`` (the keys of buckets [low, high] with ``counts``, index order) in place.

    A part of several buckets and more than ``limits.group_max`` entries is first scattered into
    ``work.spill`` by groups of adjacent buckets (at most ``group_max`` entries each) and
    gathered back at the end. Each group (or the part itself) is ranked by ``_rank_few``,
    else by counting (one big bucket), else by ``_rank_group``. ``work``: a ``PartScratch``.
    """
    group_max, scratch, sub_of, table = limits.group_max, work.spill, work.sub_of, work.counter
    m = region.size
    split = m > group_max and low < high
    if split:
        sizes, lows, highs = cut(counts, low, high, max(1, group_max // 2), sub_of)
        home = scratch
    else:
        sizes = np.full(1, m, np.int64)
        lows = np.full(1, low, np.int64)
        highs = np.full(1, high, np.int64)
        home = region
    groups = sizes.size
    starts = np.zeros(groups + 1, np.int64)
    for g in range(groups):
        starts[g + 1] = starts[g] + sizes[g]
    cur = starts[:groups].copy()
    i = 0
    while split and i + 2 <= m:
        v0 = region[i]
        v1 = region[i + 1]
        g0 = sub_of[np.int64(v0) >> 16]
        g1 = sub_of[np.int64(v1) >> 16]
        p0, p1 = bump2(cur, g0, g1)
        scratch[p0] = v0
        scratch[p1] = v1
        i += 2
    if split and i < m:
        scratch[cur[sub_of[np.int64(region[i]) >> 16]]] = region[i]
    for g in range(groups):
        group = home[starts[g] : starts[g + 1]]
        lo, hi = lows[g], highs[g]
        if group.size >= 64 and _rank_few(group, lo, hi, counts, first, limits.max_distinct, work.seen, work.ids,
                                          work.cursor, table):
            continue
        if lo == hi and (group.size >= limits.count_min or group.size > LOWS):
            _count_bucket(group, first[lo], table)
        else:
            _rank_group(group, lo, hi, first, work.work_a, work.work_b, work.hist, work.cursor)
    for g in range(groups):
        cur[g] = starts[g]
    i = 0
    while split and i + 2 <= m:
        g0 = sub_of[np.int64(region[i]) >> 16]
        g1 = sub_of[np.int64(region[i + 1]) >> 16]
        p0, p1 = bump2(cur, g0, g1)
        region[i] = scratch[p0]
        region[i + 1] = scratch[p1]
        i += 2
    if split and i < m:
        region[i] = scratch[cur[sub_of[np.int64(region[i]) >> 16]]]


#: Modules whose compiled code the kernels here inline or call, for their cache stamps.
KERNEL_DEPENDENCIES = (blocks,)
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
