"""Exact magnitude ranks of a float32 vector: fast, in bounded memory.

``magnitude_ranks_fast(t)`` gives each element its position in the stable descending
order of ``t.view(uint32) & 0x7FFFFFFF`` (0 the largest magnitude, ties by lower index,
NaN patterns just large integers), as a stable sort of those keys would.

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

Steps 1, 2 and 4 are in ``kernels.rank_runs``, step 3 in ``kernels.rank_parts``.

Keys enter the buffer in index order and every pass is stable, so ties keep index order.
At most ``RANK_SUPER_MAX`` keys are buffered and ``RANK_DIRECT_MAX`` rows are used at once:
a bigger tensor is done in several runs of adjacent buckets (steps 2-4 per run). Vectors
of at most ``RANK_SMALL_MAX`` entries take a plain LSD radix sort. Counter updates are
unrolled with an equality correction, so runs of one key do not serialize on one counter.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from llm_merge.kernels import blocks, rank_parts
from llm_merge.kernels.blocks import JIT_OPTIONS
from llm_merge.kernels.cache import configure_kernel_caches
from llm_merge.kernels.rank_parts import LOWS, MAGNITUDE, RankLimits
from llm_merge.kernels.rank_runs import plan_runs, rank_run

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


@njit(**JIT_OPTIONS)
def _small_ranks(bits, ranks):
    """Ranks of a small vector: a stable LSD radix sort (3 passes of 11 bits) of ``0x7FFFFFFF - key``
    with the indices, the last pass handing out ranks."""
    n = bits.size
    counts = np.zeros((3, 2048), np.int64)
    for j in range(n):
        key = MAGNITUDE - (np.int64(bits[j]) & MAGNITUDE)
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
        key = MAGNITUDE - (np.int64(bits[j]) & MAGNITUDE)
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
    limits = RankLimits(
        super_max=max(1, RANK_SUPER_MAX), direct_min=max(1, RANK_DIRECT_MIN), direct_max=max(1, RANK_DIRECT_MAX),
        samples=RANK_SAMPLES, fanout=RANK_FANOUT, group_max=max(1, min(RANK_GROUP_MAX, LOWS)),
        count_min=RANK_COUNT_MIN, max_distinct=min(max(0, RANK_FEW_MAX), LOWS - 1))
    counts, first, is_direct, bottom, top, run_low, run_high, longest = plan_runs(bits, limits)
    buffer = np.empty(longest + 1, np.uint32)  # + the trash slot of the scatter
    for low, high in zip(run_low.tolist(), run_high.tolist()):
        if first[low] - first[high] + counts[low] > 0:  # entries in [low, high]
            rank_run(bits, counts, first, bottom, top, low, high, run_low.size == 1, is_direct, limits, buffer, ranks)
    return ranks


#: Modules whose compiled code the kernels here inline or call, for their cache stamps.
KERNEL_DEPENDENCIES = (blocks, rank_parts)
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
