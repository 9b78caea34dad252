"""mergekit's sparsifiers (``--semantics mergekit``, the default of YAML recipes).

They differ from the PaddleNLP ones in ``sparsify.py`` as mergekit 0.1.5's ``sparsify.py`` does:

* ``magnitude`` (ties): keeps exactly k = max(1, int(density·n)) entries of largest |t|,
  not every entry >= the k-th value with k = ceil(density·n); ``breadcrumbs`` (mergekit only)
  likewise keeps exactly int(density·n) entries. Both select positions of the ascending order
  of |t| with ties in index order (torch's argsort leaves the order of ties unspecified);
* ``random`` (dare_ties, dare_linear): the same Bernoulli(density) draws as ``dare``;
* ``della_magprune`` (della, della_linear): ranks |t| within each row (dim 1; a 1-D tensor is one
  row), keep probability (density − ε) + 2ε·rank/(row length − 1) from the smallest entry to the
  largest, where PaddleNLP ranks over the whole tensor. Ranks are midranks (equal |t| share the mean
  of the ranks they span: #{smaller} + (#{equal} − 1)/2), which gives every entry exactly the keep
  probability that mergekit's arbitrary order of ties gives on average;
* with ``rescale``, all three multiply the kept entries by ‖t‖₁ / ‖kept‖₁ (skipped when either is
  below 1e-7), where PaddleNLP divides by the keep probability. Both sums are exact, then correctly
  rounded (``kernels.l1_sums``), so no summation order enters the factor.

Whole-tensor statistics are computed here on the host (NumPy) in 1M-element pieces; random draws
use the counter-based streams of ``llm_merge.kernels.counter_rng``, so results do not depend on
chunking, worker count or backend. With numba, magnitude, random and della_magprune also have
compiled statistics streamed over raw chunks (``kernels.mergekit_streaming``, ``kernels.row_ranks``)
and run in the fused apply pass, with the same bytes.
"""

from __future__ import annotations


import numpy as np

from llm_merge.kernels import l1_sums
from llm_merge.kernels.counts import magnitude_count
from llm_merge.kernels.l1_sums import l1_rescale_factor
from llm_merge.methods.registry import ANY_DTYPE, register
from llm_merge.methods.sparsify import kept_by_draws, times

#: Elements per piece of the statistics passes.
_STEP = 1 << 20


class MaskedL1:
    """Accumulates ‖t‖₁ and ‖kept‖₁ piece by piece (exactly: ``kernels.l1_sums``); ``factor()`` is
    ``l1_rescale_factor`` of the correctly rounded totals, whatever the pieces."""

    def __init__(self) -> None:
        self.sums = np.zeros(2 * l1_sums.SLOTS, np.int64)

    def add(self, magnitude: np.ndarray, keep: np.ndarray) -> None:
        """Add float32 magnitudes (up to 2^29 at a time) and which of them are kept."""
        self.sums += l1_sums.slot_sums(magnitude, keep)

    def factor(self) -> float:
        return l1_rescale_factor(*l1_sums.total_and_kept(self.sums))


def breadcrumbs_counts(reserve_p: float, gamma: float, numel: int) -> tuple[int, int]:
    """mergekit's magnitude_outliers: (n_bot, target) — keep ascending positions [n_bot, n_bot + target).

    target = int(density·n) entries are kept after dropping the int(gamma·n) largest; the outlier
    drop shrinks when needed so that target entries remain (n_bot = max(0, n − target − n_top)).
    """
    target, n_top = int(reserve_p * numel), int(gamma * numel)
    return max(0, numel - target - n_top), target


def band_selection(magnitude: np.ndarray, low_pos: int, high_pos: int, host) -> tuple[float, int, float, int]:
    """Entries at positions [low_pos, high_pos) of the ascending order of ``magnitude`` (ties: lower index first).

    Returned as (low, low_cut, high, high_cut): keep an entry iff it is above ``low`` (or equal
    with index >= low_cut) and below ``high`` (or equal with index < high_cut); see ``band_mask``.
    """
    n = magnitude.size
    low = float(host.kth_largest(magnitude, n - low_pos))  # the value at ascending position low_pos
    high = float(host.kth_largest(magnitude, n - high_pos + 1))  # ... at high_pos - 1
    below_low = below_high = 0
    for s in range(0, n, _STEP):
        piece = magnitude[s : s + _STEP]
        below_low += int(np.count_nonzero(piece < low))
        below_high += int(np.count_nonzero(piece < high))
    dropped = low_pos - below_low  # entries equal to ``low`` that come before the band
    low_cut = _nth_equal_end(magnitude, low, dropped) if dropped else 0
    high_cut = _nth_equal_end(magnitude, high, high_pos - below_high)
    return low, low_cut, high, high_cut


def band_mask(magnitude: np.ndarray, start: int, selection: tuple[float, int, float, int]) -> np.ndarray:
    """Kept entries of the chunk at element offset ``start`` (see ``band_selection``)."""
    low, low_cut, high, high_cut = selection
    above = magnitude > low
    first = max(0, low_cut - start)
    if first < magnitude.size:
        above[first:] |= magnitude[first:] == low
    below = magnitude < high
    last = min(magnitude.size, high_cut - start)
    if last > 0:
        below[:last] |= magnitude[:last] == high
    return above & below


def _nth_equal_end(values: np.ndarray, target: float, nth: int) -> int:
    """One past the index of the ``nth`` (1-based) entry equal to ``target``."""
    seen = 0
    for s in range(0, values.size, _STEP):
        equal = values[s : s + _STEP] == target
        count = int(np.count_nonzero(equal))
        if seen + count >= nth:
            return s + int(np.flatnonzero(equal)[nth - seen - 1]) + 1
        seen += count
    raise AssertionError("fewer entries equal to an order statistic than counted")


def _band_stats(t, low_pos: int, high_pos: int, rescale: bool, host, ops) -> dict:
    """Band selection of |t| and its L1 rescale factor (1 without rescale)."""
    magnitude = np.abs(ops.to_numpy(t).ravel())
    selection = band_selection(magnitude, low_pos, high_pos, host)
    if not rescale:
        return {"selection": selection, "l1_scale": 1.0}
    l1 = MaskedL1()
    for s in range(0, magnitude.size, _STEP):
        piece = magnitude[s : s + _STEP]
        l1.add(piece, band_mask(piece, s, selection))
    return {"selection": selection, "l1_scale": l1.factor()}


def _apply_band(t, selection, scale, start, ops):
    if selection is None:
        return t
    x = ops.to_numpy(t)
    kept = np.where(band_mask(np.abs(x), start, selection), x, np.float32(0.0))
    if scale != 1.0:
        kept *= np.float32(scale)
    return ops.from_numpy(kept)


def magnitude_selection(t, *, reserve_p, rescale, host, ops):
    """The k largest |t| (the last k of the ascending order) and the L1 rescale factor."""
    n = t.size
    if reserve_p >= 1.0 or n == 0:
        return {"selection": None, "l1_scale": 1.0}
    return _band_stats(t, n - magnitude_count(reserve_p, n), n, rescale, host, ops)


@register("sparsify", "magnitude", prepare=magnitude_selection, produces=("selection", "l1_scale"),
          kernel="magnitude", numpy_seconds_per_gb=13.7, fused=True, streamed_dtypes=ANY_DTYPE,
          input_bytes_per_second=0.8e9)
def magnitude(t, *, selection, l1_scale, start, ops):
    """mergekit magnitude: keep the k largest |t| (k = max(1, int(density·n))), times the L1 rescale factor."""
    return _apply_band(t, selection, l1_scale, start, ops)


def breadcrumbs_selection(t, *, reserve_p, gamma, rescale, host, ops):
    """The band of |t| kept by Model Breadcrumbs and the L1 rescale factor."""
    n = t.size
    if reserve_p >= 1.0 or n == 0:
        return {"selection": None, "l1_scale": 1.0}
    n_bot, target = breadcrumbs_counts(reserve_p, gamma, n)
    if target == 0:
        return {"selection": (np.inf, 0, -np.inf, 0), "l1_scale": 1.0}
    return _band_stats(t, n_bot, n_bot + target, rescale, host, ops)


@register("sparsify", "breadcrumbs", prepare=breadcrumbs_selection, produces=("selection", "l1_scale"),
          kernel="magnitude", numpy_seconds_per_gb=8.5, fused=True, input_bytes_per_second=0.5e9)
def breadcrumbs(t, *, selection, l1_scale, start, ops):
    """Model Breadcrumbs: drop the gamma fraction of largest |t|, keep the next int(density·n), times the L1 factor."""
    return _apply_band(t, selection, l1_scale, start, ops)


def bernoulli_rescale(t, *, reserve_p, rescale, rng_at, ops):
    """L1 rescale factor of the Bernoulli(density) mask (the mask is redrawn, identically, in the apply pass)."""
    if reserve_p >= 1.0 or not rescale:
        return {"l1_scale": 1.0}
    x = ops.to_numpy(t).ravel()
    l1 = MaskedL1()
    for s in range(0, x.size, _STEP):
        piece = np.abs(x[s : s + _STEP])
        l1.add(piece, rng_at(s).keep(reserve_p, piece.size))
    return {"l1_scale": l1.factor()}


@register("sparsify", "random", prepare=bernoulli_rescale, produces=("l1_scale",), kernel="random",
          numpy_seconds_per_gb=8.7, fused=True, streamed_dtypes=ANY_DTYPE, input_bytes_per_second=1.5e9)
def random(t, *, reserve_p, l1_scale, rng, ops):
    """mergekit random (DARE): keep each entry with probability density, times the L1 rescale factor."""
    return t if reserve_p >= 1.0 else times(kept_by_draws(t, reserve_p, rng, ops), l1_scale, ops)


def _row_view(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(rows, row length, rest) view ranked along axis 1, as mergekit's argsort(dim=1) (1-D: one row)."""
    if len(shape) < 2:
        return x.reshape(1, -1, 1)
    return x.reshape(shape[0], shape[1], -1)


def row_midranks(size: np.ndarray) -> np.ndarray:
    """float64 ascending midrank of every entry of ``size`` (non-negative float32) along axis 1: 0 the
    smallest, equal values (equal float32 bits) the mean of the ranks they span."""
    keys = size.view(np.uint32)
    order = np.argsort(keys, axis=1, kind="stable")
    ordered = np.take_along_axis(keys, order, axis=1)
    length = size.shape[1]
    position = np.arange(length).reshape(1, -1, 1)
    starts = np.ones(ordered.shape, bool)  # where a run of equal keys starts, in sorted order
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = np.ones(ordered.shape, bool)  # where one ends
    ends[:, :-1] = starts[:, 1:]
    del ordered
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, position, length - 1), axis=1), axis=1), axis=1)
    midranks = np.empty(size.shape, np.float64)
    np.put_along_axis(midranks, order, (first + last) / 2.0, axis=1)
    return midranks


def row_keep_probabilities(t, *, reserve_p, epsilon, rescale, shape, rng_at, ops):
    """Per-entry keep probability from the entry's magnitude rank in its row, and the L1 rescale factor."""
    if reserve_p >= 1.0:
        return {"keep_prob": None, "l1_scale": 1.0}
    x = ops.to_numpy(t).ravel()
    rows = _row_view(x, tuple(shape))
    length = rows.shape[1]
    per_row = length * rows.shape[2]
    block = max(1, _STEP // max(per_row, 1))
    probs = np.empty(x.size, dtype=np.float32)
    l1 = MaskedL1()
    for r in range(0, rows.shape[0], block):
        size = np.abs(rows[r : r + block])
        # rank_norm = rank / (length - 1), the smallest entry 0; a row of one entry has no spread
        # (mergekit: 0/0), use the middle
        piece = row_midranks(size) / (length - 1) if length > 1 else np.full(size.shape, 0.5)
        piece *= 2.0 * epsilon
        piece += reserve_p - epsilon
        s = r * per_row
        out = probs[s : s + piece.size]
        out[:] = piece.ravel()
        if rescale:
            l1.add(size.ravel(), rng_at(s).keep(out, out.size))
    return {"keep_prob": probs, "l1_scale": l1.factor() if rescale else 1.0}


# statistic_bytes: the keep probabilities (spilled when large); rows are sorted in 1M-element blocks. Compiled,
# 1-D and 2-D tensors stream (kernels.row_ranks): keep bits instead of probabilities
@register("sparsify", "della_magprune", prepare=row_keep_probabilities, produces=("keep_prob", "l1_scale"),
          statistic_bytes=4, kernel="della_magprune", numpy_seconds_per_gb=25.2, fused=True, streamed_dtypes=ANY_DTYPE,
          input_bytes_per_second=0.5e9)
def della_magprune(t, *, keep_prob, l1_scale, rng, ops):
    """mergekit DELLA: keep each entry with its row-rank probability, times the L1 rescale factor."""
    return t if keep_prob is None else times(kept_by_draws(t, keep_prob, rng, ops), l1_scale, ops)
