"""DELLA's magnitude ranks streamed over raw input chunks (numba): a rank table per model, no full-size arrays.

``StreamingRanks`` builds each model's ``RankTable`` in one pass over the chunks (the magnitude
histogram of ``kernels.streaming``, plus the magnitudes of the entries with nonzero low bits); the
fused apply pass (``kernels.fused.FusedChunks``) then ranks each block as it goes (``rank_block``).
Same ranks as ``kernels.ranks.magnitude_ranks_fast`` of the whole task vector.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit

from llm_merge.kernels import blocks
from llm_merge.kernels.blocks import JIT_OPTIONS
from llm_merge.kernels.cache import configure_kernel_caches
from llm_merge.kernels.streaming import MagnitudeHistogram

_JIT = JIT_OPTIONS


@njit(**_JIT)
def rank_block(bits, m, tables, i, out):
    """out[:m] = the magnitude ranks of the next m elements of model i's task vector (float32 ``bits``).

    ``tables``: (plain_next, mixed_values, mixed_starts, mixed_next), a tuple per model each
    (``RankTable.arrays``). Elements must come in index order. A plain entry (low 16 bits zero)
    of bucket h takes rank plain_next[h], which then moves on by one (equal entries rank by
    index); a mixed one takes mixed_next[u], u its index in the sorted distinct ``mixed_values``
    (those of bucket h start at mixed_starts[h]; found by binary search). The counter updates
    chain through memory, so the loop cannot vectorize anyway: the rare mixed entries take a
    branch (20% faster than listing them branch-free and ranking them after the block).
    """
    plain_next, values, starts, mixed_next = tables[0][i], tables[1][i], tables[2][i], tables[3][i]
    for j in range(m):
        magnitude_bits = bits[j] & np.uint32(0x7FFFFFFF)
        bucket = magnitude_bits >> 16
        if magnitude_bits & np.uint32(0xFFFF):
            low, high = starts[bucket], starts[bucket + 1]
            while low < high:  # numba's np.searchsorted on a slice costs ~0.2 us a call
                middle = (low + high) >> 1
                if values[middle] < magnitude_bits:
                    low = middle + 1
                else:
                    high = middle
            out[j] = mixed_next[low]
            mixed_next[low] += 1
        else:
            rank = plain_next[bucket]
            plain_next[bucket] = rank + 1
            out[j] = rank


@njit(**_JIT)
def _rank_table(counts, mixed, values):
    """``RankTable``'s arrays in int64, in one compiled pass over the buckets and the sorted mixed ``values``."""
    buckets = counts.size
    above = np.empty(buckets, np.int64)  # entries in larger buckets
    total = 0
    for b in range(buckets - 1, -1, -1):
        above[b] = total
        total += counts[b]
    plain_next = above + mixed
    distinct = 0
    for j in range(values.size):
        distinct += j == 0 or values[j] != values[j - 1]
    mixed_values = np.empty(distinct, values.dtype)
    mixed_next = np.empty(distinct, np.int64)
    mixed_starts = np.zeros(buckets + 1, np.int64)
    u = distinct
    bucket_end = values.size  # end of the current bucket's run in ``values``, walking down
    j = values.size
    while j > 0:  # from the largest value down: each distinct value's run [first, j)
        first = j - 1
        while first > 0 and values[first - 1] == values[j - 1]:
            first -= 1
        bucket = np.int64(values[j - 1] >> 16)
        if j == values.size or np.int64(values[j] >> 16) != bucket:
            bucket_end = j
        u -= 1
        mixed_values[u] = values[j - 1]
        mixed_next[u] = above[bucket] + (bucket_end - j)  # larger buckets, then larger mixed values of this one
        mixed_starts[bucket + 1] += 1
        j = first
    for b in range(buckets):
        mixed_starts[b + 1] += mixed_starts[b]
    return plain_next, mixed_values, mixed_starts, mixed_next


class RankTable:
    """The next magnitude rank of every distinct |t| of one task vector, as a pass in index order goes.

    Built from the bucket counts and the sorted magnitudes of the mixed entries (nonzero low
    bits). Entries larger than a plain entry of bucket h: those of larger buckets and the mixed
    ones of h. Entries larger than a mixed value v of bucket h: those of larger buckets and the
    mixed ones of h above v. Equal entries rank by index: each next rank moves on as it is taken.
    """

    #: Ranks are int32 up to this many elements (smaller tables and rank blocks: ~10% faster), else int64.
    INT32_MAX_ELEMENTS = (1 << 31) - 1

    def __init__(self, counts: np.ndarray, mixed: np.ndarray, mixed_values: np.ndarray) -> None:
        rank = np.int32 if counts.sum() <= self.INT32_MAX_ELEMENTS else np.int64
        plain_next, self.mixed_values, self.mixed_starts, mixed_next = _rank_table(counts, mixed, np.sort(mixed_values))
        self.plain_next, self.mixed_next = plain_next.astype(rank), mixed_next.astype(rank)

    @property
    def arrays(self) -> tuple:
        """What ``rank_block`` reads (and moves on), in its order."""
        return self.plain_next, self.mixed_values, self.mixed_starts, self.mixed_next


class StreamingRanks(MagnitudeHistogram):
    """DELLA's magnitude ranks of k task vectors without full-size arrays: one pass builds each
    model's ``RankTable``; the apply pass (``FusedChunks``) then ranks each chunk as it goes.

    The table keeps every mixed entry (nonzero low 16 bits of |t|): few for small bfloat16 deltas
    (~0.5% in the benchmark family), more for larger ones (2.7% at 5 times its delta scale, 10% at
    20 times). Past ``mixed_fraction_limit`` of the elements the statistics are None and the engine
    ranks whole tensors instead, which is as fast once about a fifth of the entries are mixed (the
    apply pass then spends most of its time searching the mixed values) and needs no tables.
    """

    #: Mixed entries, as a fraction of the elements, past which ranking whole tensors is about as fast
    #: (della at n_process 2 on bfloat16 families with 10% / 16% / 23% / 36% mixed entries ran 1.75x /
    #: 1.3x / 1.0x / 0.75x as fast with these tables as with whole-tensor ranks).
    MIXED_FRACTION_MAX = 1 / 5
    #: A large tensor's tables stay within the caller's ``budget`` (the engine's ``EXCLUSIVE_BYTES``: so that
    #: it need not run alone across workers), but may always take this fraction of its elements (a
    #: 49M-element embedding of 3 models, 256 MB: 11.4%).
    MIXED_FRACTION_MIN = 1 / 32
    #: Bytes per mixed entry and model the tables may take: 4 per collected value, 12 per distinct one
    #: (value, next rank) and the sort and unique temporaries while one model's table is built; 10.3 at
    #: the peak measured (tracemalloc; a 24.6M-element embedding, 3 models, 16.5% of the entries mixed).
    BYTES_PER_MIXED = 16

    @classmethod
    def mixed_fraction_limit(cls, k: int, numel: int, budget: int) -> float:
        """The most mixed entries of k task vectors of ``numel`` elements, as a fraction of ``numel``,
        where the tables may take ``budget`` bytes (more only up to ``MIXED_FRACTION_MIN``)."""
        within_budget = budget / (cls.BYTES_PER_MIXED * k * max(numel, 1))
        return min(cls.MIXED_FRACTION_MAX, max(cls.MIXED_FRACTION_MIN, within_budget))

    @classmethod
    def peak_bytes(cls, k: int, numel: int, budget: int) -> int:
        """Most memory the tables of k task vectors of ``numel`` elements take (``budget``: as above)."""
        return int(cls.BYTES_PER_MIXED * max(cls.mixed_fraction_limit(k, numel, budget), 0.0) * k * numel)

    def __init__(self, k: int, numel: int, block: int, budget: int) -> None:
        super().__init__(k, block)
        self.limit = int(numel * self.mixed_fraction_limit(k, numel, budget))
        self.collected: Optional[list[list[np.ndarray]]] = [[] for _ in range(k)]
        self.n_mixed = np.zeros(k, np.int64)
        self._buffer = np.empty((k, 0), np.uint32)
        self._unused_high = np.zeros(k, np.uint32)

    def wants(self, pass_index: int) -> bool:
        return pass_index == 0 and self.collected is not None  # no more chunks once given up

    def feed(self, pass_index: int, raws, base_raw) -> None:
        """Add one chunk (raw bits, as ``FusedChunks.run`` takes them)."""
        if self.collected is None:
            return
        if self._buffer.shape[1] < raws[0].size:
            self._buffer = np.empty((len(self.counts), raws[0].size), np.uint32)
        added = self._pass(raws, base_raw, False, self._unused_high, self.counts, self._buffer)
        self.n_mixed += added
        if self.n_mixed.max() > self.limit:
            self.collected = None
            return
        for i, count in enumerate(added):
            self.collected[i].append(self._buffer[i, :count].copy())

    def end_pass(self, pass_index: int) -> None:
        pass

    def statistics(self) -> Optional[list[dict]]:
        """Per model {"rank_table": RankTable}, or None where too many entries are mixed."""
        if self.collected is None:
            return None
        return [{"rank_table": RankTable(self.counts[i], self.mixed[i], np.concatenate(chunks or [self._buffer[i, :0]]))}
                for i, chunks in enumerate(self.collected)]


#: Modules whose compiled code the kernels here inline or call, for their cache stamps.
KERNEL_DEPENDENCIES = (blocks,)
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
