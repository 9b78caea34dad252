"""mergekit's SCE merge: Select, Calculate, Erase (mergekit/merge_methods/sce.py).

Task vectors t_i of K models (a base is required), with s = ``sce_select_topk``:

1. **Select** (s < 1): per entry, the population variance of the K values, v = Σ (t_i − mean)² / K
   (in float64, rounded to float32, as torch.var computes it); k = int(float32(#{v ≠ 0})·float32(s));
   the k entries of largest v over the whole tensor are kept in every t_i, the others set to 0.
   Entries of equal v at the threshold are taken in index order, the later ones first, as the
   ``magnitude`` sparsifier does (positions of the ascending order, equal values in index order);
   mergekit's torch.topk leaves which of them win unspecified.
2. **Calculate**: w_i = mean(t_i²) / Σ_j mean(t_j²) over the whole (selected) tensor; 1/K each when
   that sum is below 1e-6.
3. **Erase**: the TIES sign election by sum, s_e = +1 where Σ_i t_i ≥ 0 else −1; m_i = (sign(t_i) = s_e)
   (zeros never count); result b + Σ_i w_i·m_i·t_i / max(Σ_i w_i·m_i, 1e-6).

mergekit's per-model ``weight`` plays no part (its sce takes none: the w_i come from the data).

Streaming in bounded memory: order keys are the float32 bits of v (v ≥ 0, so they sort as the
values). Reduce passes, each over every chunk, with additive results only:
pass 1 counts the nonzero v and the keys' upper 16 bits; pass 2 the lower 16 bits of the keys in the
bin holding the k-th largest, which pins the threshold key; pass 3 counts the threshold's ties per
block of ``tie_block`` elements (at most 65536 blocks); pass 4 sums the squares of the kept entries
exactly (``kernels.l1_sums`` slots, so no chunking or worker count changes a bit) and, for the one
block where the tied entries are cut, each tied entry's position and squares. The apply pass
recomputes v per chunk (``host.variance_keys``: compiled where numba is) and keeps an entry when its
key is above the threshold key, or equal at an index at or past the cut. Statistics: a few
65536-entry histograms per tensor. Host NumPy (``ops.to_numpy``), so the Paddle backend gives the
same bits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from llm_merge.kernels import l1_sums
from llm_merge.methods.registry import register

#: bits of an order key counted per histogram pass (two passes cover 32 bits)
HALF_KEY_BITS = 16
BINS = 1 << HALF_KEY_BITS
_LOW_MASK = np.uint32(BINS - 1)
#: mergekit's floor of the summed mean squares below which the weights are uniform
WEIGHT_SUM_EPS = 1e-6
#: mergekit's floor of Σ w_i·m_i, the divisor of the merged task vector
DIVISOR_EPS = np.float32(1e-6)
#: an empty statistic (a pass that has nothing to count for this tensor)
_NONE = np.zeros((1, 0), np.int64)


class Selection(NamedTuple):
    """Keep an entry iff its key is above ``threshold``, or equal to it at an index >= ``cut``."""

    threshold: int
    cut: int


def _row(counts: np.ndarray) -> np.ndarray:
    """A vector statistic as one (1, n) row: the engine adds the chunks' values with np.add and makes the sum
    a tuple, which for one row is a 1-tuple holding an array, so the sums stay vectorized."""
    return counts.reshape(1, -1)


def _flat(statistic, dtype=np.int64) -> np.ndarray:
    """A summed (1, n) statistic (an array or a 1-tuple of one) as a flat vector."""
    return np.asarray(statistic, dtype).reshape(-1)


def _same_statistics(fn):
    """``fn`` remembering its last result: every chunk of a tensor passes the very same statistic objects, so
    the threshold and weights are worked out once per tensor, not once per chunk (the cache holds the
    arguments, so an identity it compares cannot be reused by other objects meanwhile)."""
    last: list = []

    def cached(*args):
        if last and len(last[0]) == len(args) and all(a is b for a, b in zip(last[0], args)):
            return last[1]
        result = fn(*args)
        last[:] = [args, result]
        return result

    return cached


def _selecting(sce_select_topk: float) -> bool:
    return sce_select_topk < 1.0


def _kept_count(variance_nonzero, sce_select_topk: float) -> int:
    """mergekit's k = int(count_nonzero(v) · select_topk), a float32 product as torch computes it."""
    return int(np.float32(int(np.sum(variance_nonzero))) * np.float32(sce_select_topk))


def _bin_of_kth_largest(histogram, k: int) -> tuple[int, int]:
    """(the bin holding the k-th largest key, how many keys lie in higher bins)."""
    from_top = np.cumsum(_flat(histogram)[::-1])
    position = int(np.searchsorted(from_top, k))
    above = int(from_top[position - 1]) if position else 0
    return BINS - 1 - position, above


@_same_statistics
def _threshold(variance_nonzero, variance_high, variance_low, sce_select_topk: float) -> tuple[int, int]:
    """(threshold key, how many entries equal to it are kept); key -1 when k = 0 (nothing is kept)."""
    k = _kept_count(variance_nonzero, sce_select_topk)
    if k == 0:
        return -1, 0
    high, above_high = _bin_of_kth_largest(variance_high, k)
    low, above_low = _bin_of_kth_largest(variance_low, k - above_high)
    return (high << HALF_KEY_BITS) | low, k - above_high - above_low


def _tie_block(numel: int) -> int:
    """Elements per block of the tie counts: at most BINS blocks per tensor."""
    return max(1, -(-numel // BINS))


def _cut_block(tie_blocks, kept_ties: int) -> tuple[int, int]:
    """(the block where the dropped ties end, how many ties of that block are dropped); (-1, 0) when no
    tie is dropped. The first ties in index order are dropped, the last ``kept_ties`` kept."""
    counts = _flat(tie_blocks)
    dropped = int(counts.sum()) - kept_ties
    if dropped == 0:
        return -1, 0
    running = np.cumsum(counts)
    block = int(np.searchsorted(running, dropped))  # the dropped-th tie lies in this block
    return block, dropped - (int(running[block - 1]) if block else 0)


# -- the reduce passes ------------------------------------------------------------------------------
def sce_variance_bins(ys, *, sce_select_topk, host, ops):
    """Pass 1: how many entries have v ≠ 0, and a histogram of the keys' upper 16 bits."""
    if not _selecting(sce_select_topk):
        return {"variance_nonzero": (0,), "variance_high": _NONE}
    keys = host.variance_keys([ops.to_numpy(y) for y in ys])
    return {"variance_nonzero": (int(np.count_nonzero(keys)),),
            "variance_high": _row(np.bincount(keys >> np.uint32(HALF_KEY_BITS), minlength=BINS))}


def sce_variance_low_bins(ys, *, sce_select_topk, variance_nonzero, variance_high, host, ops):
    """Pass 2: a histogram of the lower 16 bits of the keys in the bin of the k-th largest."""
    k = _kept_count(variance_nonzero, sce_select_topk) if _selecting(sce_select_topk) else 0
    if k == 0:
        return {"variance_low": _NONE}
    high, _ = _bin_of_kth_largest(variance_high, k)
    keys = host.variance_keys([ops.to_numpy(y) for y in ys])
    in_bin = keys[(keys >> np.uint32(HALF_KEY_BITS)) == high]
    return {"variance_low": _row(np.bincount(in_bin & _LOW_MASK, minlength=BINS))}


def _selected_threshold(sce_select_topk, variance_nonzero, variance_high, variance_low) -> tuple[int, int]:
    """``_threshold``, or (-1, 0) without selection."""
    if not _selecting(sce_select_topk):
        return -1, 0
    return _threshold(variance_nonzero, variance_high, variance_low, sce_select_topk)


def sce_tie_blocks(ys, *, sce_select_topk, variance_nonzero, variance_high, variance_low, start, numel, host, ops):
    """Pass 3: how many entries per block have the threshold key."""
    threshold, _ = _selected_threshold(sce_select_topk, variance_nonzero, variance_high, variance_low)
    if threshold < 0:
        return {"tie_blocks": _NONE}
    keys = host.variance_keys([ops.to_numpy(y) for y in ys])
    tied = start + np.flatnonzero(keys == np.uint32(threshold))
    block = _tie_block(numel)
    return {"tie_blocks": _row(np.bincount(tied // block, minlength=-(-numel // block)))}


def sce_square_sums(ys, *, sce_select_topk, variance_nonzero, variance_high, variance_low, tie_blocks, start, numel,
                    host, ops):
    """Pass 4: exact slot sums of t_i² over the kept entries outside the cut block, and for the cut block each
    tied entry's count and t_i² by its offset in the block."""
    ts = [ops.to_numpy(y) for y in ys]
    block = _tie_block(numel)
    kept = None  # kept entries outside the cut block (None: all)
    offsets = np.zeros(0, np.int64)  # of the cut block's tied entries in this chunk
    at_offsets = np.zeros(0, bool)
    if _selecting(sce_select_topk):
        threshold, kept_ties = _threshold(variance_nonzero, variance_high, variance_low, sce_select_topk)
        keys = host.variance_keys(ts)
        if threshold < 0:
            kept = np.zeros(keys.shape, bool)
        else:
            cut_block, _ = _cut_block(tie_blocks, kept_ties)
            blocks = np.arange(start, start + keys.size, dtype=np.int64) // block
            tied = keys == np.uint32(threshold)
            kept = (keys > np.uint32(threshold)) | (tied & (blocks > cut_block))
            at_offsets = tied & (blocks == cut_block)
            offsets = np.flatnonzero(at_offsets) + (start - cut_block * block)
    squares = [t * t for t in ts]
    result = {"square_slots": _row(np.concatenate([host.slot_sums(sq, kept)[l1_sums.SLOTS:] for sq in squares]))}
    if offsets.size or start == 0:  # every statistic appears at least once
        result["tie_offsets"] = _row(np.bincount(offsets, minlength=block))
        tied_squares = [sq[at_offsets].astype(np.float64) if offsets.size else np.zeros(0) for sq in squares]
        result["tie_squares"] = _row(np.concatenate(
            [np.bincount(offsets, weights=values, minlength=block) for values in tied_squares]))
    return result


@_same_statistics
def sce_plan(count: int, numel: int, sce_select_topk, variance_nonzero, variance_high, variance_low, tie_blocks,
             square_slots, tie_offsets, tie_squares) -> tuple[Selection, np.ndarray]:
    """The selection and the float32 weights w_i of ``count`` models, from the four passes' statistics."""
    block = _tie_block(numel)
    selection, kept_from = Selection(-1, 0), block  # kept_from: the cut block's first kept offset
    threshold, kept_ties = _selected_threshold(sce_select_topk, variance_nonzero, variance_high, variance_low)
    if _selecting(sce_select_topk):
        if threshold < 0:
            selection = Selection(0xFFFFFFFF, numel)  # k = 0: no key is above the largest, no index reaches the cut
        else:
            cut_block, dropped = _cut_block(tie_blocks, kept_ties)
            if cut_block < 0:
                selection = Selection(threshold, 0)
            else:  # the first kept tie comes after the dropped-th one
                kept_from = int(np.searchsorted(np.cumsum(_flat(tie_offsets)), dropped)) + 1
                selection = Selection(threshold, cut_block * block + kept_from)
    slots = _flat(square_slots).reshape(count, l1_sums.SLOTS)
    tied = _flat(tie_squares, np.float64).reshape(count, block)
    means = [np.float32((l1_sums.exact_sum(slots[i]) + math.fsum(tied[i, kept_from:])) / numel) for i in range(count)]
    total = np.float32(0.0)
    for mean in means:
        total += mean
    if abs(float(total)) < WEIGHT_SUM_EPS:
        return selection, np.full(count, np.float32(1.0) / np.float32(count), np.float32)
    return selection, np.asarray(means, np.float32) / total


def kept_entries(keys: np.ndarray, start: int, selection: Selection) -> np.ndarray:
    """Which entries of a chunk at element offset ``start`` the selection keeps."""
    threshold = np.uint32(selection.threshold)
    kept = keys > threshold
    first = max(0, selection.cut - start)
    if first < keys.size:
        kept[first:] |= keys[first:] == threshold
    return kept


@register("merge", "sce", reduce=sce_variance_bins, later_reduces=(sce_variance_low_bins, sce_tie_blocks, sce_square_sums),
          produces=("variance_nonzero", "variance_high", "variance_low", "tie_blocks", "square_slots", "tie_offsets",
                    "tie_squares"), input_bytes_per_second=0.2e9)
def sce(ys, *, sce_select_topk, variance_nonzero, variance_high, variance_low, tie_blocks, square_slots, tie_offsets,
        tie_squares, start, numel, host, ops):
    """SCE: the top-variance entries, TIES sign election, weights from the mean squares of the task vectors."""
    ts = [ops.to_numpy(y) for y in ys]
    selection, weights = sce_plan(len(ts), numel, sce_select_topk, variance_nonzero, variance_high, variance_low,
                                  tie_blocks, square_slots, tie_offsets, tie_squares)
    if _selecting(sce_select_topk):
        mask = kept_entries(host.variance_keys(ts), start, selection).astype(np.float32)
        ts = [t * mask for t in ts]  # mergekit multiplies by the mask: a dropped negative entry is -0, sign 0
    total = ts[0].copy()
    for t in ts[1:]:
        total += t
    elected = np.where(total >= 0, np.float32(1.0), np.float32(-1.0))
    numerator = np.zeros(total.shape, np.float32)
    divisor = np.zeros(total.shape, np.float32)
    for t, weight in zip(ts, weights):
        erased = np.where(np.sign(t) == elected, weight, np.float32(0.0))
        numerator += t * erased
        divisor += erased
    return ops.from_numpy(numerator / np.maximum(divisor, DIVISOR_EPS))
