"""Exact magnitude ranks of a float32 vector: fast, in bounded memory.

``magnitude_ranks_fast(t)`` gives each element its position in the stable descending
order of ``t.view(uint32) & 0x7FFFFFFF`` (0 the largest magnitude, ties by lower index,
NaN patterns just large integers): the ranks of the former ``numba_kernels`` LSD sort.

Key = the 31 magnitude bits, bucket = its top 15 bits, low = its low 16 bits.

1. One pass counts the 32768 buckets; a bucket's first rank is the count of all larger
   buckets. Big buckets (at least ``RANK_DIRECT_MIN`` entries) whose lows are few in a
   strided sample are *direct* when together they hold half the entries (bf16-derived
   deltas): each gets a row of 65536 counters, one per low. The other buckets are cut
   into a few dozen *parts* of adjacent buckets.
2. One pass over ``t`` counts each direct entry in its (bucket, low) counter and copies
   each other key to its part's next slot of a 4 bytes/entry buffer (index order).
3. Each part is ranked in place, in cache (a part larger than ``RANK_GROUP_MAX`` is first
   scattered into groups of adjacent buckets): few distinct lows -> count (bucket, low)
   pairs; one big bucket -> count its 65536 lows; else a stable LSD radix sort of the
   words ``(0xFFFF - low) << 16 | position`` and a counting pass over the buckets.
   Direct counters become first ranks (prefix sums).
4. One pass over ``t`` replays step 2: ``ranks[j]`` = the next rank of j's (bucket, low)
   counter, or the rank left in j's buffer slot.

Keys enter the buffer in index order and every pass is stable, so ties keep index order.
At most ``RANK_SUPER_MAX`` keys are buffered and ``RANK_DIRECT_MAX`` rows are used at once:
a bigger tensor is done in several runs of adjacent buckets (steps 2-4 per run). Vectors
of at most ``RANK_SMALL_MAX`` entries take a plain LSD radix sort. Counter updates are
unrolled with an equality correction, so runs of one key do not serialize on one counter.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from llm_merge.kernels import blocks
from llm_merge.kernels.blocks import JIT_OPTIONS
from llm_merge.kernels.cache import configure_kernel_caches

_JIT = JIT_OPTIONS

#: Vectors of at most this many entries are ranked by a plain LSD radix sort (16 bytes/entry of scratch).
RANK_SMALL_MAX = 1 << 16
#: Most non-direct entries buffered at once (4 bytes each: 128 MB); more take several runs.
RANK_SUPER_MAX = 1 << 25
#: A bucket of at least this many entries is ranked through a table of its 65536 low values.
RANK_DIRECT_MIN = 1 << 16
#: Most direct tables at once (256 KB each).
RANK_DIRECT_MAX = 128
#: Entries sampled to tell the buckets with few distinct lows (the direct ones).
RANK_SAMPLES = 1 << 16
#: A group with at most this many distinct lows is ranked by counting (bucket, low) pairs.
RANK_FEW_MAX = 1024
#: A buffered bucket of at least this many entries is ranked by counting its 65536 lows.
RANK_COUNT_MIN = 1 << 15
#: Target number of parts of the buffer (write streams of the main scatter).
RANK_FANOUT = 32
#: Most entries of a radix-sorted group (at most 65536: positions are packed in 16 bits).
RANK_GROUP_MAX = 1 << 16

_BUCKETS = 1 << 15  # values of (bits & 0x7FFFFFFF) >> 16
_LOWS = 1 << 16
_ROW = _LOWS + 16  # direct table row stride: rows start 64 bytes apart mod 4 KB (no cache set conflicts)
_DIRECT_SHARE = 2  # direct tables only when they take at least 1/2 of the entries
_MAGNITUDE = 0x7FFFFFFF
_LOW = 0xFFFF


@njit(inline="always", **_JIT)
def _bump2(counts, s0, s1):
    """Increment two counters (the slots may be equal); returns each one's value before its own increment."""
    x0 = counts[s0]
    x1 = counts[s1] + (s0 == s1)
    counts[s0] = x0 + 1
    counts[s1] = x1 + 1
    return x0, x1


@njit(inline="always", **_JIT)
def _bump4(counts, s0, s1, s2, s3):
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


@njit(inline="always", **_JIT)
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
        p0, p1, p2, p3 = _bump4(counts, b0, b1, b2, b3)
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


@njit(inline="always", **_JIT)
def _count_bucket(region, rank0, table):
    """Ranks from ``rank0`` of one bucket's keys (index order, overwritten): count the 65536 lows, hand out ranks."""
    m = region.size
    for d in range(_LOWS):
        table[d] = 0
    i = 0
    while i + 2 <= m:
        _bump2(table, _LOW - (np.int64(region[i]) & _LOW), _LOW - (np.int64(region[i + 1]) & _LOW))
        i += 2
    if i < m:
        table[_LOW - (np.int64(region[i]) & _LOW)] += 1
    total = rank0
    for d in range(_LOWS):
        c = np.int64(table[d])
        table[d] = total
        total += c
    i = 0
    while i + 2 <= m:
        d0 = _LOW - (np.int64(region[i]) & _LOW)
        d1 = _LOW - (np.int64(region[i + 1]) & _LOW)
        r0, r1 = _bump2(table, d0, d1)
        region[i] = r0
        region[i + 1] = r1
        i += 2
    if i < m:
        region[i] = table[_LOW - (np.int64(region[i]) & _LOW)]


@njit(**_JIT)
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
            d = _LOW - (np.int64(region[i + c]) & _LOW)
            a[i + c] = (d << 16) | (i + c)
            hist[c * 512 + (d & 255)] += 1
            hist[c * 512 + 256 + (d >> 8)] += 1
        i += 4
    while i < m:
        d = _LOW - (np.int64(region[i]) & _LOW)
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
            region[np.int64(src[r]) & _LOW] = rank0 + r
        return
    # Stable counting pass over the buckets (the bucket of position q is still in region[q]).
    for bucket in range(low, high + 1):
        cursor[bucket] = first[bucket]
    i = 0
    while i + 2 <= m:
        q0 = np.int64(src[i]) & _LOW
        q1 = np.int64(src[i + 1]) & _LOW
        b0 = np.int64(region[q0]) >> 16
        b1 = np.int64(region[q1]) >> 16
        r0, r1 = _bump2(cursor, b0, b1)
        region[q0] = r0
        region[q1] = r1
        i += 2
    if i < m:
        q0 = np.int64(src[i]) & _LOW
        region[q0] = cursor[np.int64(region[q0]) >> 16]


@njit(inline="always", **_JIT)
def _bump_few(region, m, cursor, seen, table, write):
    """table[slot] += 1 for the slot of every key of region[:m] (its bucket's row + its low's id).

    Unrolled by four with an equality correction, so runs of one slot do not serialize on one
    counter. With ``write``, each key is replaced by its slot's count before the increment.
    """
    i = 0
    while i + 4 <= m:
        e0 = cursor[np.int64(region[i]) >> 16] + seen[_LOW - (np.int64(region[i]) & _LOW)]
        e1 = cursor[np.int64(region[i + 1]) >> 16] + seen[_LOW - (np.int64(region[i + 1]) & _LOW)]
        e2 = cursor[np.int64(region[i + 2]) >> 16] + seen[_LOW - (np.int64(region[i + 2]) & _LOW)]
        e3 = cursor[np.int64(region[i + 3]) >> 16] + seen[_LOW - (np.int64(region[i + 3]) & _LOW)]
        x0, x1, x2, x3 = _bump4(table, e0, e1, e2, e3)
        if write:
            region[i] = x0
            region[i + 1] = x1
            region[i + 2] = x2
            region[i + 3] = x3
        i += 4
    while i < m:
        e0 = cursor[np.int64(region[i]) >> 16] + seen[_LOW - (np.int64(region[i]) & _LOW)]
        x0 = table[e0]
        table[e0] = x0 + 1
        if write:
            region[i] = x0
        i += 1


@njit(inline="always", **_JIT)
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


@njit(**_JIT)
def _rank_few(region, low, high, counts, first, max_distinct, seen, ids, cursor, table):
    """Rank ``region`` (the keys of buckets [low, high], index order) in place when its lows are
    few: count each (bucket, low) pair in a compact table, then hand out ranks in index order.
    Returns False (region untouched) when there are more than ``max_distinct`` distinct lows or
    the table would be too large. ``seen`` (65536 entries) is all zero on entry and on exit.
    """
    m = region.size
    distinct = 0
    for i in range(m):
        d = _LOW - (np.int64(region[i]) & _LOW)
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


@njit(**_JIT)
def _cut(counts, low, high, target, part_of):
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


@njit(**_JIT)
def _rank_part(region, low, high, counts, first, group_max, count_min, max_distinct, scratch, sub_of, work_a, work_b,
               hist, cursor, table, seen, ids):
    """Rank ``region`` (the keys of buckets [low, high] with ``counts``, index order) in place.

    A part of several buckets and more than ``group_max`` entries is first scattered into
    ``scratch`` by groups of adjacent buckets (at most ``group_max`` entries each) and
    gathered back at the end. Each group (or the part itself) is ranked by ``_rank_few``,
    else by counting (one big bucket), else by ``_rank_group``.
    """
    m = region.size
    split = m > group_max and low < high
    if split:
        sizes, lows, highs = _cut(counts, low, high, max(1, group_max // 2), sub_of)
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
        p0, p1 = _bump2(cur, g0, g1)
        scratch[p0] = v0
        scratch[p1] = v1
        i += 2
    if split and i < m:
        scratch[cur[sub_of[np.int64(region[i]) >> 16]]] = region[i]
    for g in range(groups):
        group = home[starts[g] : starts[g + 1]]
        lo, hi = lows[g], highs[g]
        if group.size >= 64 and _rank_few(group, lo, hi, counts, first, max_distinct, seen, ids, cursor, table):
            continue
        if lo == hi and (group.size >= count_min or group.size > _LOWS):
            _count_bucket(group, first[lo], table)
        else:
            _rank_group(group, lo, hi, first, work_a, work_b, hist, cursor)
    for g in range(groups):
        cur[g] = starts[g]
    i = 0
    while split and i + 2 <= m:
        g0 = sub_of[np.int64(region[i]) >> 16]
        g1 = sub_of[np.int64(region[i + 1]) >> 16]
        p0, p1 = _bump2(cur, g0, g1)
        region[i] = scratch[p0]
        region[i + 1] = scratch[p1]
        i += 2
    if split and i < m:
        region[i] = scratch[cur[sub_of[np.int64(region[i]) >> 16]]]


@njit(**_JIT)
def _scatter_simple(bits, route, table, buffer):
    """Step 2 of ``_rank_run`` when every entry is buffered: copy each key to its part's next
    buffer position (counter ``route[bucket] >> 8``)."""
    n = bits.size
    i = 0
    while i + 2 <= n:
        k0 = np.int64(bits[i]) & _MAGNITUDE
        k1 = np.int64(bits[i + 1]) & _MAGNITUDE
        e0 = route[k0 >> 16] >> 8
        e1 = route[k1 >> 16] >> 8
        x0 = np.int64(table[e0])
        x1 = np.int64(table[e1]) + (e0 == e1)
        table[e0] = x0 + 1
        table[e1] = x1 + 1
        buffer[x0] = k0
        buffer[x1] = k1
        i += 2
    if i < n:
        k0 = np.int64(bits[i]) & _MAGNITUDE
        e0 = route[k0 >> 16] >> 8
        buffer[table[e0]] = k0


@njit(inline="always", **_JIT)
def _count_pair(bits, i, route, table):
    """Entries i and i+1 of a run pass: their magnitude keys, their counters' values before this
    increment (equal counters corrected) and their buffered masks (-1 buffered, 0 direct)."""
    k0 = np.int64(bits[i]) & _MAGNITUDE
    k1 = np.int64(bits[i + 1]) & _MAGNITUDE
    f0 = route[k0 >> 16]
    f1 = route[k1 >> 16]
    e0 = (f0 >> 8) + ((_LOW - (k0 & _LOW)) & -((f0 >> 1) & 1))
    e1 = (f1 >> 8) + ((_LOW - (k1 & _LOW)) & -((f1 >> 1) & 1))
    x0 = np.int64(table[e0])
    x1 = np.int64(table[e1]) + (e0 == e1)
    table[e0] = x0 + 1
    table[e1] = x1 + 1
    return k0, k1, x0, x1, -(f0 & 1), -(f1 & 1)


@njit(**_JIT)
def _scatter(bits, route, table, buffer, total):
    """Step 2 of ``_rank_run``: count each direct entry in its (bucket, low) counter, copy each
    buffered key to its part's next buffer position, the others to the trash slot buffer[total]."""
    n = bits.size
    i = 0
    while i + 2 <= n:
        k0, k1, x0, x1, b0, b1 = _count_pair(bits, i, route, table)
        buffer[(x0 & b0) | (total & ~b0)] = k0
        buffer[(x1 & b1) | (total & ~b1)] = k1
        i += 2
    if i < n:
        k0 = np.int64(bits[i]) & _MAGNITUDE
        f0 = route[k0 >> 16]
        e0 = (f0 >> 8) + ((_LOW - (k0 & _LOW)) & -((f0 >> 1) & 1))
        x0 = np.int64(table[e0])
        table[e0] = x0 + 1
        b0 = -(f0 & 1)
        buffer[(x0 & b0) | (total & ~b0)] = k0


@njit(**_JIT)
def _gather_some(bits, route, table, buffer, ranks):
    """Step 4 of ``_rank_run`` with no direct bucket: replay ``_scatter`` (whose direct branch
    is then never taken); the entries outside the run keep their ranks."""
    n = bits.size
    i = 0
    while i + 2 <= n:
        _, _, x0, x1, b0, b1 = _count_pair(bits, i, route, table)  # no direct buckets here
        ranks[i] = (np.int64(buffer[x0 & b0]) & b0) | (np.int64(ranks[i]) & ~b0)
        ranks[i + 1] = (np.int64(buffer[x1 & b1]) & b1) | (np.int64(ranks[i + 1]) & ~b1)
        i += 2
    if i < n:
        f0 = route[(np.int64(bits[i]) & _MAGNITUDE) >> 16]
        x0 = np.int64(table[f0 >> 8])
        b0 = -(f0 & 1)
        ranks[i] = (np.int64(buffer[x0 & b0]) & b0) | (np.int64(ranks[i]) & ~b0)


@njit(**_JIT)
def _gather_simple(bits, route, table, buffer, ranks):
    """Step 4 of ``_rank_run`` when every entry is buffered: replay ``_scatter_simple``,
    ``ranks[j]`` = buffer[position of j]."""
    n = bits.size
    i = 0
    while i + 2 <= n:
        e0 = route[(np.int64(bits[i]) & _MAGNITUDE) >> 16] >> 8
        e1 = route[(np.int64(bits[i + 1]) & _MAGNITUDE) >> 16] >> 8
        x0 = np.int64(table[e0])
        x1 = np.int64(table[e1]) + (e0 == e1)
        table[e0] = x0 + 1
        table[e1] = x1 + 1
        ranks[i] = buffer[x0]
        ranks[i + 1] = buffer[x1]
        i += 2
    if i < n:
        ranks[i] = buffer[table[route[(np.int64(bits[i]) & _MAGNITUDE) >> 16] >> 8]]


@njit(**_JIT)
def _gather(bits, route, table, buffer, ranks, everything):
    """Step 4 of ``_rank_run``: replay ``_scatter``, giving each entry the next rank of its
    (bucket, low) counter (direct) or buffer[its position] (buffered); entries outside the run
    keep their ranks unless ``everything``."""
    n = bits.size
    i = 0
    while everything and i + 2 <= n:
        k0, k1, x0, x1, b0, b1 = _count_pair(bits, i, route, table)
        ranks[i] = (np.int64(buffer[x0 & b0]) & b0) | (x0 & ~b0)
        ranks[i + 1] = (np.int64(buffer[x1 & b1]) & b1) | (x1 & ~b1)
        i += 2
    while i < n:
        k0 = np.int64(bits[i]) & _MAGNITUDE
        f0 = route[k0 >> 16]
        d0 = -((f0 >> 1) & 1)
        e0 = (f0 >> 8) + ((_LOW - (k0 & _LOW)) & d0)
        x0 = np.int64(table[e0])
        table[e0] = x0 + 1
        b0 = -(f0 & 1)
        ranks[i] = (np.int64(buffer[x0 & b0]) & b0) | (x0 & d0) | (np.int64(ranks[i]) & ~(b0 | d0))
        i += 1


@njit(**_JIT)
def _rank_run(bits, counts, first, bottom, top, low, high, everything, is_direct, fanout, group_max, count_min,
              max_distinct, buffer, ranks):
    """Ranks of the entries of buckets [low, high] (every entry when ``everything``).

    All entries lie in buckets [bottom, top]. The ``is_direct`` buckets count in tables; the
    others go through ``buffer``. Per-bucket arrays are only set on the ranges that are read.
    """
    n = bits.size
    buffered = np.empty(_BUCKETS, np.int64)  # counts of the buffered buckets
    slot = np.empty(_BUCKETS, np.int64)  # table of each direct bucket, or -1
    direct_buckets = np.empty(high - low + 1, np.int64)
    direct = 0
    total = 0
    for bucket in range(high, low - 1, -1):
        if is_direct[bucket]:
            slot[bucket] = direct
            direct_buckets[direct] = bucket
            buffered[bucket] = 0
            direct += 1
        else:
            slot[bucket] = -1
            buffered[bucket] = counts[bucket]
            total += counts[bucket]
    part_of = np.empty(_BUCKETS, np.int32)
    half = max(1, group_max // 2)  # parts of at most group_max entries when that makes few enough of them
    sizes, lows, highs = _cut(buffered, low, high, half if total <= fanout * half else -(-total // fanout), part_of)
    parts = sizes.size
    starts = np.zeros(parts + 1, np.int64)
    for g in range(parts):
        starts[g + 1] = starts[g] + sizes[g]
    # One table of counters: a row of 65536 per direct bucket (at slot * _ROW + 0xFFFF - low),
    # then one per part (its next buffer position), then 1024 unused ones for the buckets
    # outside the run (bucket % 1024: entries of different buckets do not chain on one counter).
    # Each bucket has a route word: its counter base << 8 | 2 if direct | 1 if buffered here.
    # Entries that are not buffered write their key to the trash slot buffer[total].
    rows = direct * _ROW
    table = np.zeros(rows + parts + 1024, np.uint32)
    route = np.empty(_BUCKETS, np.int64)
    for bucket in range(bottom, top + 1):
        if bucket < low or bucket > high:
            route[bucket] = (rows + parts + (bucket & 1023)) << 8
        elif slot[bucket] >= 0:
            route[bucket] = ((slot[bucket] * _ROW) << 8) | 2
        else:
            route[bucket] = ((rows + part_of[bucket]) << 8) | 1
    for g in range(parts):
        table[rows + g] = starts[g]

    # Step 2: one pass over t: count direct entries, copy buffered keys to their part.
    if everything and direct == 0:
        _scatter_simple(bits, route, table, buffer)
    else:
        _scatter(bits, route, table, buffer, total)

    # Step 3: rank the parts in place; direct tables become first ranks.
    if parts > 0:
        big = 0
        for g in range(parts):
            if sizes[g] > group_max and lows[g] < highs[g]:
                big = max(big, sizes[g])
        scratch = np.empty(big, np.uint32)
        sub_of = np.empty(_BUCKETS, np.int32)
        work_a = np.empty(min(total, 65536), np.uint32)
        work_b = np.empty(min(total, 65536), np.uint32)
        hist = np.empty(2048, np.int64)
        cursor = np.empty(_BUCKETS, np.int64)
        counter = np.empty(_LOWS, np.uint32)
        seen = np.zeros(_LOWS, np.uint16)
        ids = np.empty(max(1, max_distinct), np.int64)
        for g in range(parts):
            _rank_part(buffer[starts[g] : starts[g + 1]], lows[g], highs[g], buffered, first, group_max, count_min,
                       max_distinct, scratch, sub_of, work_a, work_b, hist, cursor, counter, seen, ids)
    for k in range(direct):
        row = table[k * _ROW : k * _ROW + _LOWS]
        rank = first[direct_buckets[k]]
        for d in range(_LOWS):
            c = np.int64(row[d])
            row[d] = rank
            rank += c

    # Step 4: replay step 2, handing out ranks (entries outside the run keep theirs).
    for g in range(parts):
        table[rows + g] = starts[g]
    if everything and direct == 0:
        _gather_simple(bits, route, table, buffer, ranks)
    elif direct == 0:
        _gather_some(bits, route, table, buffer, ranks)
    else:
        _gather(bits, route, table, buffer, ranks, everything)


@njit(inline="always", **_JIT)
def _choose_direct(bits, counts, bottom, top, super_max, direct_min, samples):
    """Buckets ranked through a table of their 65536 lows: those too big to buffer, and those of
    at least ``direct_min`` entries whose lows are few (in a strided sample of about ``samples``
    entries, at most 1/8 of a bucket's sampled lows are new), so that their tables stay in cache.
    """
    n = bits.size
    is_direct = np.zeros(_BUCKETS, np.bool_)
    share = 0
    for bucket in range(bottom, top + 1):
        if counts[bucket] > super_max:
            is_direct[bucket] = True
        elif counts[bucket] >= direct_min:
            share += counts[bucket]
    if share * _DIRECT_SHARE < n:  # tables slow both passes over t down: worth it when they hold enough entries
        return is_direct
    stride = max(32, n // max(1, samples))
    size = 16
    while size < 2 * (n // stride + 1):
        size *= 2
    seen = np.empty(size, np.int64)  # open addressing set of sampled keys
    for h in range(size):
        seen[h] = -1
    sampled = np.zeros(_BUCKETS, np.int64)
    distinct = np.zeros(_BUCKETS, np.int64)
    for j in range(0, n, stride):
        key = np.int64(bits[j]) & _MAGNITUDE
        bucket = key >> 16
        if counts[bucket] >= direct_min:
            sampled[bucket] += 1
            h = ((key * 2654435761) >> 7) & (size - 1)
            while seen[h] != -1 and seen[h] != key:
                h = (h + 1) & (size - 1)
            if seen[h] == -1:
                seen[h] = key
                distinct[bucket] += 1
    share = 0
    for bucket in range(bottom, top + 1):
        if counts[bucket] >= direct_min and 8 * distinct[bucket] <= sampled[bucket]:
            share += counts[bucket]
    if share * _DIRECT_SHARE < n:
        return is_direct
    for bucket in range(bottom, top + 1):
        if counts[bucket] >= direct_min and 8 * distinct[bucket] <= sampled[bucket]:
            is_direct[bucket] = True
    return is_direct


@njit(**_JIT)
def _small_ranks(bits, ranks):
    """Ranks of a small vector: a stable LSD radix sort (3 passes of 11 bits) of ``0x7FFFFFFF - key``
    with the indices, the last pass handing out ranks."""
    n = bits.size
    counts = np.zeros((3, 2048), np.int64)
    for j in range(n):
        key = _MAGNITUDE - (np.int64(bits[j]) & _MAGNITUDE)
        counts[0, key & 2047] += 1
        counts[1, (key >> 11) & 2047] += 1
        counts[2, key >> 22] += 1
    for p in range(3):
        total = 0
        for b in range(2048):
            c = counts[p, b]
            counts[p, b] = total
            total += c
    keys_a = np.empty(n, np.uint32)
    index_a = np.empty(n, np.uint32)
    for j in range(n):
        key = _MAGNITUDE - (np.int64(bits[j]) & _MAGNITUDE)
        q = counts[0, key & 2047]
        counts[0, key & 2047] = q + 1
        keys_a[q] = key
        index_a[q] = j
    keys_b = np.empty(n, np.uint32)
    index_b = np.empty(n, np.uint32)
    for j in range(n):
        key = np.int64(keys_a[j])
        q = counts[1, (key >> 11) & 2047]
        counts[1, (key >> 11) & 2047] = q + 1
        keys_b[q] = key
        index_b[q] = index_a[j]
    for j in range(n):
        key = np.int64(keys_b[j])
        q = counts[2, key >> 22]
        counts[2, key >> 22] = q + 1
        ranks[index_b[j]] = q
    return ranks


@njit(**_JIT)
def _plan(bits, super_max, direct_min, direct_max, samples):
    """Bucket counts and first ranks, the direct buckets, and the runs of adjacent buckets
    (from the top, each with at most ``super_max`` buffered entries and ``direct_max`` direct
    buckets). Returns counts, first, is_direct, bottom, top (nonempty buckets lie in [bottom,
    top]), run_low, run_high (bucket ranges of the runs) and the most buffered entries of a run.
    """
    n = bits.size
    counts = np.zeros(_BUCKETS, np.int64)
    i = 0
    while i + 2 <= n:
        _bump2(counts, (np.int64(bits[i]) & _MAGNITUDE) >> 16, (np.int64(bits[i + 1]) & _MAGNITUDE) >> 16)
        i += 2
    if i < n:
        counts[(np.int64(bits[i]) & _MAGNITUDE) >> 16] += 1
    first = np.empty(_BUCKETS, np.int64)
    rank = 0
    top = -1
    bottom = 0
    for bucket in range(_BUCKETS - 1, -1, -1):
        first[bucket] = rank
        rank += counts[bucket]
        if counts[bucket] > 0:
            top = max(top, bucket)
            bottom = bucket
    is_direct = _choose_direct(bits, counts, bottom, top, super_max, direct_min, samples)
    run_low = np.empty(max(0, top - bottom + 1), np.int64)
    run_high = np.empty(max(0, top - bottom + 1), np.int64)
    runs = 0
    longest = 0
    high = top
    while high >= bottom:
        low = high
        buffered = 0
        direct = 0
        while low >= bottom:
            c = counts[low]
            if is_direct[low]:
                if direct == direct_max:
                    break
                direct += 1
            else:
                if buffered + c > super_max:
                    break
                buffered += c
            low -= 1
        run_low[runs] = low + 1
        run_high[runs] = high
        runs += 1
        longest = max(longest, buffered)
        high = low
    return counts, first, is_direct, bottom, top, run_low[:runs], run_high[:runs], longest


def magnitude_ranks_fast(t: np.ndarray) -> np.ndarray:
    """uint32 rank of each float32 by magnitude (sign bit ignored): 0 the largest, ties by lower index.

    Same output as ``kernels.fused.magnitude_ranks`` (any shape is flattened). Extra memory:
    16 bytes/entry up to ``RANK_SMALL_MAX`` entries; above, 4 bytes per entry of non-direct
    buckets (at most ``RANK_SUPER_MAX`` of them), at most ``RANK_DIRECT_MAX`` tables of 256 KB,
    and a few MB of cache-sized scratch.
    """
    flat = np.ascontiguousarray(t, dtype=np.float32).ravel()
    bits = flat.view(np.uint32)
    ranks = np.empty(flat.size, np.uint32)
    if flat.size <= RANK_SMALL_MAX:
        return _small_ranks(bits, ranks)
    super_max = max(1, RANK_SUPER_MAX)
    direct_max = max(1, RANK_DIRECT_MAX)
    counts, first, is_direct, bottom, top, run_low, run_high, longest = _plan(
        bits, super_max, max(1, RANK_DIRECT_MIN), direct_max, RANK_SAMPLES)
    buffer = np.empty(longest + 1, np.uint32)  # + the trash slot of _scatter
    for low, high in zip(run_low.tolist(), run_high.tolist()):
        if first[low] - first[high] + counts[low] > 0:  # entries in [low, high]
            _rank_run(bits, counts, first, bottom, top, low, high, run_low.size == 1, is_direct, RANK_FANOUT,
                      max(1, min(RANK_GROUP_MAX, _LOWS)), RANK_COUNT_MIN, min(max(0, RANK_FEW_MAX), _LOWS - 1),
                      buffer, ranks)
    return ranks


configure_kernel_caches(globals(), [blocks.__file__])  # the kernels above take blocks' JIT options
