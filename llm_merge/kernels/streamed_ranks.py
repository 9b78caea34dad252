"""DELLA's magnitude midranks streamed over raw input chunks: a rank table per model, no full-size arrays.

``StreamingRanks`` builds each model's ``kernels.ranks.RankTable`` in one pass over the chunks (the
magnitude histogram of ``kernels.streaming``, plus the keys of the entries with nonzero low bits);
the fused apply pass (``kernels.fused.FusedChunks``) then looks up each entry's per-slot values
(``kernels.ranks.slot_values_block``). Same ranks as ``kernels.ranks.magnitude_midranks`` of the whole task
vector.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from llm_merge.kernels.ranks import RankTable
from llm_merge.kernels.streaming import MagnitudeHistogram


class StreamingRanks(MagnitudeHistogram):
    """DELLA's magnitude midranks of k task vectors without full-size arrays: one pass builds each
    model's ``RankTable``; the apply pass (``FusedChunks``) then looks each chunk's ranks up.

    The table keeps every mixed entry (nonzero low 16 bits of |t|): few for small bfloat16 deltas
    (~0.5% in the benchmark family), more for larger ones (2.7% at 5 times its delta scale, 10% at
    20 times). Past ``mixed_fraction_limit`` of the elements the statistics are None and the engine
    ranks whole tensors, one model at a time, instead (``kernels.ranks.magnitude_midranks``).
    """

    #: Mixed entries, as a fraction of the elements, past which whole tensors are ranked: mixed keys
    #: are found by binary search, which misses the cache when they are many, where whole-tensor ranks
    #: sort them (``kernels.ranks.SORTED_MIXED_FRACTION``).
    MIXED_FRACTION_MAX = 1 / 5
    #: A large tensor's tables stay within the caller's ``budget`` (the engine's ``EXCLUSIVE_BYTES``: so that
    #: it need not run alone across workers), but may always take this fraction of its elements (a
    #: 49M-element embedding of 3 models, 256 MB: 11.4%).
    MIXED_FRACTION_MIN = 1 / 32
    #: Bytes per mixed entry and model the tables may take: 4 per collected value; per distinct one 12
    #: (value, rank) and 16 to 32 of hash index; the sort's temporaries while one model's table is built.
    #: 9.4 at the peak measured (resident memory; 24.6M elements, 3 models of bfloat16 deltas, 15.4% of the
    #: entries mixed, 3.5% of those distinct).
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
            self._buffer = np.empty((len(self.mixed), raws[0].size), np.uint32)
        added = self._pass(raws, base_raw, False, self._unused_high, collected=self._buffer)
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

