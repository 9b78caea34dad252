"""Task-vector statistics of one tensor, accumulated chunk by chunk (pure math on float32 arrays).

For models x_1..x_K and base b, t_i = x_i - b. Everything a report needs is a sum over entries, so
chunks may come in any size and order, and per-layer or per-model figures are sums of per-tensor ones:

* ``bb``, ``xx[i]``, ``xb[i]``: squared norms and the dot products of each model with the base
  (weight cosine cos(x_i, b), relative task-vector norm ||t_i|| / ||b||);
* ``gram[i][j]`` = <t_i, t_j> (task-vector cosines), ``l1[i]`` = sum |t_i|, ``changed[i]`` = #(t_i != 0);
* sign conflicts: ``active`` entries have at least two non-zero t_i; a ``conflict`` is an active entry
  whose non-zero t_i do not all share one sign; ``chance`` sums, over active entries with m non-zero
  values, the conflict probability 1 - 2^(1-m) of independent random signs (so conflicts / chance is 1
  for unrelated signs and 0 for full agreement); ``dropped[i]`` is the |t_i| mass that TIES's sign
  election (sign of sum_i t_i, zero counted as +, weights 1, no trimming) discards. The sign figures
  are kept for every model together and, with three models or more, for each set leaving one model out
  (``SUBSETS``), so that suggestions can leave out a model the verdict rejects: entry s of ``active``,
  ``conflicts``, ``chance`` and ``dropped`` belongs to ``subsets(k)[s]``;
* magnitudes (per model): each |t| is counted under its float32 bit pattern's top 16 bits. A value
  whose low 16 bits are zero (every bfloat16 number: task vectors of bfloat16 checkpoints, with deltas
  small against the weights) is exactly identified by its bin; the few others are kept as values (up
  to ``INEXACT_BUDGET`` per model and tensor; past it they are summarized per bin and the tensor's
  magnitude figures are marked approximate). From these ``finish`` gives ``kept[i][g]``, the L1 mass of
  the ceil(p_g n) largest |t_i| for each density p_g of ``DENSITY_GRID`` (what a density keeps), and
  ``tied[i]``, the number of non-zero entries whose |t_i| equals another entry's of the tensor.

NaN/Inf entries (in any model or the base) are counted in ``nonfinite`` and left out of every sum.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

#: Densities (fractions of a tensor's entries kept) at which the kept L1 mass is recorded: 0.01 .. 1.00.
DENSITY_GRID = tuple(round(k / 100, 2) for k in range(1, 101))
#: Bins of the magnitude tables: the top 16 bits of a float32.
_BINS = 1 << 16
#: Magnitudes not exactly given by their bin (low 16 bits set) kept as values, per model and tensor (16 MB).
INEXACT_BUDGET = 1 << 22


class TensorGeometry:
    """Sums of one tensor's statistics over K models and their base; ``add`` chunks, then ``finish``."""

    def __init__(self, k: int, numel: int) -> None:
        self.k = k
        self.numel = numel
        self.bb = 0.0
        self.xx = np.zeros(k)
        self.xb = np.zeros(k)
        self.gram = np.zeros((k, k))
        self.l1 = np.zeros(k)
        self.changed = np.zeros(k, dtype=np.int64)
        self.nonfinite = 0
        self.subsets = subsets(k)
        self.active = np.zeros(len(self.subsets), dtype=np.int64)
        self.conflicts = np.zeros(len(self.subsets), dtype=np.int64)
        self.chance = np.zeros(len(self.subsets))
        self.dropped = np.zeros((len(self.subsets), k))
        self._exact = np.zeros((k, _BINS), dtype=np.int64)
        self._inexact: list[list[np.ndarray]] = [[] for _ in range(k)]
        self._inexact_size = np.zeros(k, dtype=np.int64)
        self._over_counts: list[Optional[np.ndarray]] = [None] * k
        self._over_sums: list[Optional[np.ndarray]] = [None] * k

    def add(self, xs: Sequence[np.ndarray], base: np.ndarray) -> None:
        """One chunk: the same entries of every model (float32) and of the base."""
        finite = np.isfinite(base)
        for x in xs:
            finite &= np.isfinite(x)
        if not finite.all():
            self.nonfinite += int(finite.size - finite.sum())
            xs, base = [x[finite] for x in xs], base[finite]
        b64 = base.astype(np.float64)
        self.bb += float(b64 @ b64)
        t = np.empty((self.k, base.size), dtype=np.float32)
        for i, x in enumerate(xs):
            x64 = x.astype(np.float64)
            self.xx[i] += x64 @ x64
            self.xb[i] += x64 @ b64
            np.subtract(x, base, out=t[i])
        t64 = t.astype(np.float64)
        for i in range(self.k):  # row by row: a (k, n) @ (n, k) product is ~20x slower here
            for j in range(i, self.k):
                self.gram[i, j] += t64[i] @ t64[j]
                self.gram[j, i] = self.gram[i, j]
        del b64
        magnitude = np.abs(t)
        l1 = magnitude.sum(axis=1, dtype=np.float64)
        self.l1 += l1
        positive, negative = t > 0, t < 0
        self.changed += positive.sum(axis=1) + negative.sum(axis=1)
        all_ups, all_downs = positive.sum(axis=0, dtype=np.int32), negative.sum(axis=0, dtype=np.int32)
        for s, members in enumerate(self.subsets):
            ups, downs = all_ups, all_downs
            for i in range(self.k):
                if i not in members:
                    ups, downs = ups - positive[i], downs - negative[i]
            nonzero = ups + downs
            self.active[s] += np.count_nonzero(nonzero >= 2)
            self.conflicts[s] += np.count_nonzero((ups > 0) & (downs > 0))
            self.chance[s] += sum(np.count_nonzero(nonzero == m) * (1.0 - 2.0 ** (1 - m)) for m in range(2, len(members) + 1))
            # TIES's election over these models: sign of their float32 sum, zero counted as +; an entry of
            # another sign loses |t| = (|t| - t * sign) / 2, zeros lose nothing
            total = t[members[0]].copy()
            for i in members[1:]:
                total += t[i]
            elected = np.where(total < 0, -1.0, 1.0)
            for i in members:
                self.dropped[s, i] += (l1[i] - t64[i] @ elected) / 2
        for i in range(self.k):
            self._count_magnitudes(i, magnitude[i])

    def _count_magnitudes(self, i: int, magnitude: np.ndarray) -> None:
        bits = magnitude.view(np.uint32)
        keys = bits >> 16
        exact = (bits & 0xFFFF) == 0
        self._exact[i] += np.bincount(keys[exact], minlength=_BINS)
        if exact.all():
            return
        inexact = ~exact
        values, value_keys = magnitude[inexact], keys[inexact]
        if self._over_counts[i] is None and self._inexact_size[i] + values.size <= INEXACT_BUDGET:
            self._inexact[i].append(values.copy())
            self._inexact_size[i] += values.size
            return
        if self._over_counts[i] is None:  # over budget: every inexact value of this model from now on by bin
            self._over_counts[i], self._over_sums[i] = np.zeros(_BINS, dtype=np.int64), np.zeros(_BINS)
            for kept in self._inexact[i]:
                self._bin_inexact(i, kept, kept.view(np.uint32) >> 16)
            self._inexact[i] = []
        self._bin_inexact(i, values, value_keys)

    def _bin_inexact(self, i: int, values: np.ndarray, keys: np.ndarray) -> None:
        self._over_counts[i] += np.bincount(keys, minlength=_BINS)
        self._over_sums[i] += np.bincount(keys, weights=values, minlength=_BINS)

    def finish(self) -> dict:
        """The sums as plain numbers and lists (JSON-ready), with ``kept`` and ``tied`` per model."""
        kept, tied, approximate = [], [], []
        for i in range(self.k):
            values, counts, exact = self._magnitude_groups(i)
            kept.append(kept_mass(values, counts, self.numel, DENSITY_GRID).tolist())
            tied.append(int(counts[exact & (counts >= 2)].sum()))
            approximate.append(self._over_counts[i] is not None)
        return {
            "numel": self.numel, "nonfinite": self.nonfinite, "bb": self.bb, "xx": self.xx.tolist(),
            "xb": self.xb.tolist(), "gram": self.gram.tolist(), "l1": self.l1.tolist(), "changed": self.changed.tolist(),
            "subsets": [list(m) for m in self.subsets], "active": self.active.tolist(), "conflicts": self.conflicts.tolist(),
            "chance": self.chance.tolist(), "dropped": self.dropped.tolist(),
            "kept": kept, "tied": tied, "approximate": approximate,
        }

    def _magnitude_groups(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distinct non-zero |t_i| (largest first), how many entries have each, and whether that is exact."""
        keys = np.flatnonzero(self._exact[i])
        keys = keys[keys > 0]  # bin 0 with low bits 0 is the value 0
        values = [(keys.astype(np.uint32) << 16).view(np.float32).astype(np.float64)]
        counts, exact = [self._exact[i][keys]], [np.ones(keys.size, dtype=bool)]
        if self._inexact[i]:
            distinct, how_many = np.unique(np.concatenate(self._inexact[i]), return_counts=True)
            values.append(distinct.astype(np.float64))
            counts.append(how_many)
            exact.append(np.ones(distinct.size, dtype=bool))
        if self._over_counts[i] is not None:
            bins = np.flatnonzero(self._over_counts[i])
            values.append(self._over_sums[i][bins] / self._over_counts[i][bins])  # the bin's mean, ties unknown
            counts.append(self._over_counts[i][bins])
            exact.append(np.zeros(bins.size, dtype=bool))
        values, counts, exact = np.concatenate(values), np.concatenate(counts), np.concatenate(exact)
        order = np.argsort(-values, kind="stable")
        return values[order], counts[order], exact[order]


def subsets(k: int) -> list[tuple[int, ...]]:
    """The model sets with sign figures: all ``k`` models, then (``k`` >= 3) each set without model i, in order."""
    every = tuple(range(k))
    return [every] + ([tuple(j for j in every if j != i) for i in every] if k >= 3 else [])


def kept_mass(values: np.ndarray, counts: np.ndarray, numel: int, densities: Sequence[float]) -> np.ndarray:
    """L1 mass of the ceil(p * numel) largest entries for each density p, from the distinct magnitudes
    ``values`` (largest first) and how many entries hold each (``counts``); zeros need not be listed."""
    keep = np.array([math.ceil(round(p * numel, 6)) for p in densities], dtype=np.int64)
    if values.size == 0:
        return np.zeros(len(keep))
    cum_counts = np.cumsum(counts)
    cum_mass = np.cumsum(values * counts)
    group = np.minimum(np.searchsorted(cum_counts, keep, side="left"), values.size - 1)
    before_counts = np.where(group > 0, cum_counts[group - 1], 0)
    before_mass = np.where(group > 0, cum_mass[group - 1], 0.0)
    partial = before_mass + np.minimum(keep - before_counts, counts[group]) * values[group]
    return np.where(keep >= cum_counts[-1], cum_mass[-1], partial)


def weight_geometry(x: np.ndarray, base: np.ndarray) -> tuple[float, float, int]:
    """(cos(x, base), ||x - base|| / ||base||, entries used) over the finite entries of two float32 vectors;
    NaN where the base is all zero."""
    finite = np.isfinite(x) & np.isfinite(base)
    x64, b64 = x[finite].astype(np.float64), base[finite].astype(np.float64)
    # plain sums, not BLAS dot products: no thread pool wakes up for a few thousand entries
    bb, xx = float(np.square(b64).sum()), float(np.square(x64).sum())
    if bb == 0.0:
        return math.nan, math.nan, int(finite.sum())
    cosine = float((x64 * b64).sum()) / math.sqrt(xx * bb) if xx > 0 else 0.0
    return cosine, math.sqrt(float(np.square(x64 - b64).sum()) / bb), int(finite.sum())
