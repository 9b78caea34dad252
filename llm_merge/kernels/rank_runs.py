"""Steps 1, 2 and 4 of ``kernels.ranks``: count the buckets, choose the direct ones, cut the buckets
into runs, and per run scatter the keys into parts (step 3, ``kernels.rank_parts``, ranks them) and
hand the ranks back out in index order.

Each bucket has a route word (``_routes``) that sends its entries to a counter: a direct bucket's row
of 65536 (one per low), a part's next buffer position, or a spare one outside the run. Steps 2 and
4 make the same passes over ``t`` in the same order, so a counter gives each entry in step 4 the
position its key had in step 2.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from llm_merge.kernels import blocks, rank_parts
from llm_merge.kernels.blocks import JIT_OPTIONS
from llm_merge.kernels.cache import configure_kernel_caches
from llm_merge.kernels.rank_parts import BUCKETS, LOW, LOWS, MAGNITUDE, PartScratch, bump2, cut, rank_part

_ROW = LOWS + 16  # direct table row stride: rows start 64 bytes apart mod 4 KB (no cache set conflicts)
_DIRECT_SHARE = 2  # direct tables only when they take at least 1/2 of the entries


@njit(**JIT_OPTIONS)
def _scatter_simple(bits, route, table, buffer):
    """Step 2 of ``rank_run`` when every entry is buffered: copy each key to its part's next
    buffer position (counter ``route[bucket] >> 8``)."""
    n = bits.size
    i = 0
    while i + 2 <= n:
        k0 = np.int64(bits[i]) & MAGNITUDE
        k1 = np.int64(bits[i + 1]) & MAGNITUDE
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
        k0 = np.int64(bits[i]) & MAGNITUDE
        e0 = route[k0 >> 16] >> 8
        buffer[table[e0]] = k0


@njit(inline="always", **JIT_OPTIONS)
def _count_pair(bits, i, route, table):
    """Entries i and i+1 of a run pass: their magnitude keys, their counters' values before this
    increment (equal counters corrected) and their buffered masks (-1 buffered, 0 direct)."""
    k0 = np.int64(bits[i]) & MAGNITUDE
    k1 = np.int64(bits[i + 1]) & MAGNITUDE
    f0 = route[k0 >> 16]
    f1 = route[k1 >> 16]
    e0 = (f0 >> 8) + ((LOW - (k0 & LOW)) & -((f0 >> 1) & 1))
    e1 = (f1 >> 8) + ((LOW - (k1 & LOW)) & -((f1 >> 1) & 1))
    x0 = np.int64(table[e0])
    x1 = np.int64(table[e1]) + (e0 == e1)
    table[e0] = x0 + 1
    table[e1] = x1 + 1
    return k0, k1, x0, x1, -(f0 & 1), -(f1 & 1)


@njit(**JIT_OPTIONS)
def _scatter(bits, route, table, buffer, total):
    """Step 2 of ``rank_run``: count each direct entry in its (bucket, low) counter, copy each
    buffered key to its part's next buffer position, the others to the trash slot buffer[total]."""
    n = bits.size
    i = 0
    while i + 2 <= n:
        k0, k1, x0, x1, b0, b1 = _count_pair(bits, i, route, table)
        buffer[(x0 & b0) | (total & ~b0)] = k0
        buffer[(x1 & b1) | (total & ~b1)] = k1
        i += 2
    if i < n:
        k0 = np.int64(bits[i]) & MAGNITUDE
        f0 = route[k0 >> 16]
        e0 = (f0 >> 8) + ((LOW - (k0 & LOW)) & -((f0 >> 1) & 1))
        x0 = np.int64(table[e0])
        table[e0] = x0 + 1
        b0 = -(f0 & 1)
        buffer[(x0 & b0) | (total & ~b0)] = k0


@njit(**JIT_OPTIONS)
def _gather_some(bits, route, table, buffer, ranks):
    """Step 4 of ``rank_run`` with no direct bucket: replay ``_scatter`` (whose direct branch
    is then never taken); the entries outside the run keep their ranks."""
    n = bits.size
    i = 0
    while i + 2 <= n:
        _, _, x0, x1, b0, b1 = _count_pair(bits, i, route, table)  # no direct buckets here
        ranks[i] = (np.int64(buffer[x0 & b0]) & b0) | (np.int64(ranks[i]) & ~b0)
        ranks[i + 1] = (np.int64(buffer[x1 & b1]) & b1) | (np.int64(ranks[i + 1]) & ~b1)
        i += 2
    if i < n:
        f0 = route[(np.int64(bits[i]) & MAGNITUDE) >> 16]
        x0 = np.int64(table[f0 >> 8])
        b0 = -(f0 & 1)
        ranks[i] = (np.int64(buffer[x0 & b0]) & b0) | (np.int64(ranks[i]) & ~b0)


@njit(**JIT_OPTIONS)
def _gather_simple(bits, route, table, buffer, ranks):
    """Step 4 of ``rank_run`` when every entry is buffered: replay ``_scatter_simple``,
    ``ranks[j]`` = buffer[position of j]."""
    n = bits.size
    i = 0
    while i + 2 <= n:
        e0 = route[(np.int64(bits[i]) & MAGNITUDE) >> 16] >> 8
        e1 = route[(np.int64(bits[i + 1]) & MAGNITUDE) >> 16] >> 8
        x0 = np.int64(table[e0])
        x1 = np.int64(table[e1]) + (e0 == e1)
        table[e0] = x0 + 1
        table[e1] = x1 + 1
        ranks[i] = buffer[x0]
        ranks[i + 1] = buffer[x1]
        i += 2
    if i < n:
        ranks[i] = buffer[table[route[(np.int64(bits[i]) & MAGNITUDE) >> 16] >> 8]]


@njit(**JIT_OPTIONS)
def _gather(bits, route, table, buffer, ranks, everything):
    """Step 4 of ``rank_run``: replay ``_scatter``, giving each entry the next rank of its
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
        k0 = np.int64(bits[i]) & MAGNITUDE
        f0 = route[k0 >> 16]
        d0 = -((f0 >> 1) & 1)
        e0 = (f0 >> 8) + ((LOW - (k0 & LOW)) & d0)
        x0 = np.int64(table[e0])
        table[e0] = x0 + 1
        b0 = -(f0 & 1)
        ranks[i] = (np.int64(buffer[x0 & b0]) & b0) | (x0 & d0) | (np.int64(ranks[i]) & ~(b0 | d0))
        i += 1


@njit(**JIT_OPTIONS)
def _bucket_roles(counts, low, high, is_direct):
    """For the buckets of [low, high]: per bucket its count if buffered (0 if direct) and its
    direct table's slot (-1 if buffered), then the direct buckets from the top and the buffered total."""
    buffered = np.empty(BUCKETS, np.int64)
    slot = np.empty(BUCKETS, np.int64)
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
    return buffered, slot, direct_buckets[:direct], total


@njit(**JIT_OPTIONS)
def _routes(bottom, top, low, high, slot, part_of, rows, parts):
    """The route word of each bucket of [bottom, top]: its counter base << 8 | 2 if direct | 1 if buffered
    in this run. Counters: a row of 65536 per direct bucket (at slot * _ROW + 0xFFFF - low), then one
    per part (its next buffer position), then 1024 unused ones for the buckets outside the run
    (bucket % 1024: entries of different buckets do not chain on one counter)."""
    route = np.empty(BUCKETS, np.int64)
    for bucket in range(bottom, top + 1):
        if bucket < low or bucket > high:
            route[bucket] = (rows + parts + (bucket & 1023)) << 8
        elif slot[bucket] >= 0:
            route[bucket] = ((slot[bucket] * _ROW) << 8) | 2
        else:
            route[bucket] = ((rows + part_of[bucket]) << 8) | 1
    return route


@njit(**JIT_OPTIONS)
def _rank_parts(buffer, starts, lows, highs, buffered, first, total, limits):
    """Step 3 of ``rank_run``: rank each part ``buffer[starts[g]:starts[g + 1]]`` in place, all with one scratch."""
    big = 0
    for g in range(lows.size):
        size = starts[g + 1] - starts[g]
        if size > limits.group_max and lows[g] < highs[g]:
            big = max(big, size)
    work = PartScratch(
        spill=np.empty(big, np.uint32), sub_of=np.empty(BUCKETS, np.int32), work_a=np.empty(min(total, 65536), np.uint32),
        work_b=np.empty(min(total, 65536), np.uint32), hist=np.empty(2048, np.int64), cursor=np.empty(BUCKETS, np.int64),
        counter=np.empty(LOWS, np.uint32), seen=np.zeros(LOWS, np.uint16), ids=np.empty(max(1, limits.max_distinct), np.int64))
    for g in range(lows.size):
        rank_part(buffer[starts[g] : starts[g + 1]], lows[g], highs[g], buffered, first, limits, work)


@njit(**JIT_OPTIONS)
def rank_run(bits, counts, first, bottom, top, low, high, everything, is_direct, limits, buffer, ranks):
    """Ranks of the entries of buckets [low, high] (every entry when ``everything``).

    All entries lie in buckets [bottom, top]. The ``is_direct`` buckets count in tables; the
    others go through ``buffer``. Per-bucket arrays are only set on the ranges that are read.
    """
    buffered, slot, direct_buckets, total = _bucket_roles(counts, low, high, is_direct)
    direct = direct_buckets.size
    part_of = np.empty(BUCKETS, np.int32)
    half = max(1, limits.group_max // 2)  # parts of at most group_max entries when that makes few enough of them
    fanout = limits.fanout
    sizes, lows, highs = cut(buffered, low, high, half if total <= fanout * half else -(-total // fanout), part_of)
    parts = sizes.size
    starts = np.zeros(parts + 1, np.int64)
    for g in range(parts):
        starts[g + 1] = starts[g] + sizes[g]
    # One table of all counters (``_routes``); entries that are not buffered write their key to the
    # trash slot buffer[total].
    rows = direct * _ROW
    table = np.zeros(rows + parts + 1024, np.uint32)
    route = _routes(bottom, top, low, high, slot, part_of, rows, parts)
    for g in range(parts):
        table[rows + g] = starts[g]

    # Step 2: one pass over t: count direct entries, copy buffered keys to their part.
    if everything and direct == 0:
        _scatter_simple(bits, route, table, buffer)
    else:
        _scatter(bits, route, table, buffer, total)

    # Step 3: rank the parts in place; direct tables become first ranks.
    if parts > 0:
        _rank_parts(buffer, starts, lows, highs, buffered, first, total, limits)
    for k in range(direct):
        row = table[k * _ROW : k * _ROW + LOWS]
        rank = first[direct_buckets[k]]
        for d in range(LOWS):
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


@njit(inline="always", **JIT_OPTIONS)
def _choose_direct(bits, counts, bottom, top, super_max, direct_min, samples):
    """Buckets ranked through a table of their 65536 lows: those too big to buffer, and those of
    at least ``direct_min`` entries whose lows are few (in a strided sample of about ``samples``
    entries, at most 1/8 of a bucket's sampled lows are new), so that their tables stay in cache.
    """
    n = bits.size
    is_direct = np.zeros(BUCKETS, np.bool_)
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
    sampled = np.zeros(BUCKETS, np.int64)
    distinct = np.zeros(BUCKETS, np.int64)
    for j in range(0, n, stride):
        key = np.int64(bits[j]) & MAGNITUDE
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


@njit(**JIT_OPTIONS)
def plan_runs(bits, limits):
    """Bucket counts and first ranks, the direct buckets, and the runs of adjacent buckets
    (from the top, each with at most ``limits.super_max`` buffered entries and ``limits.direct_max``
    direct buckets). Returns counts, first, is_direct, bottom, top (nonempty buckets lie in [bottom,
    top]), run_low, run_high (bucket ranges of the runs) and the most buffered entries of a run.
    """
    n = bits.size
    counts = np.zeros(BUCKETS, np.int64)
    i = 0
    while i + 2 <= n:
        bump2(counts, (np.int64(bits[i]) & MAGNITUDE) >> 16, (np.int64(bits[i + 1]) & MAGNITUDE) >> 16)
        i += 2
    if i < n:
        counts[(np.int64(bits[i]) & MAGNITUDE) >> 16] += 1
    first = np.empty(BUCKETS, np.int64)
    rank = 0
    top = -1
    bottom = 0
    for bucket in range(BUCKETS - 1, -1, -1):
        first[bucket] = rank
        rank += counts[bucket]
        if counts[bucket] > 0:
            top = max(top, bucket)
            bottom = bucket
    is_direct = _choose_direct(bits, counts, bottom, top, limits.super_max, limits.direct_min, limits.samples)
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
                if direct == limits.direct_max:
                    break
                direct += 1
            else:
                if buffered + c > limits.super_max:
                    break
                buffered += c
            low -= 1
        run_low[runs] = low + 1
        run_high[runs] = high
        runs += 1
        longest = max(longest, buffered)
        high = low
    return counts, first, is_direct, bottom, top, run_low[:runs], run_high[:runs], longest


#: Modules whose compiled code the kernels here inline or call, for their cache stamps.
KERNEL_DEPENDENCIES = (blocks, rank_parts)
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
