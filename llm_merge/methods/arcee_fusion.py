"""mergekit's arcee_fusion (mergekit/merge_methods/arcee_fusion.py): keep the base except where the model's
change is important.

Base b and exactly one model x (task vector y = x − b). Per element, importance = |y| · KL_row, where
KL_row = Σ p·log(p/q) along the last dimension of the element's row, p = softmax(x) + 1e-8,
q = softmax(b) + 1e-8 (a 1-D tensor is one row). With q1, median, q3 the order statistics of rank
⌊q·(n − 1)⌋ (q = 0.25, 0.5, 0.75) of the importance over the whole tensor, threshold =
median + 1.5·(q3 − q1) (float32, as mergekit), and the result is b + y·[importance ≥ threshold].

mergekit sorts the importance of tensors of at most 1,000,000 entries and, for larger ones, a random
sample of 1,000,000 entries drawn with replacement (unseeded). Here the quantiles are always the exact
order statistics of all entries: deterministic, independent of chunks and workers, and what mergekit's
sample estimates (its ranks scatter by about ±0.05 % of n around these).

Streaming in bounded memory, with the engine's row-aligned chunks (``row_aligned``: whole rows, so the
per-row KL comes from the chunk itself): order keys are the float32 bits of the importance mapped to
uint32 in value order; pass 1 computes each row's KL (the softmaxes and logs: the costly part, done once)
and counts the keys' upper 16 bits, pass 2 the lower 16 bits of the keys in each of the three bins holding
a wanted rank, which pins the three values exactly; the apply pass computes the threshold from both
histograms. Statistics: 4 × 65536 counts and one KL per row.
"""

from __future__ import annotations

import numpy as np

from llm_merge.errors import MergeError
from llm_merge.methods.registry import register

#: mergekit's smoothing added to both softmax distributions before the log ratio
SOFTMAX_EPS = 1e-8
#: the quantiles of the importance that set the threshold: q1, median, q3
QUARTILES = (0.25, 0.5, 0.75)
#: threshold = median + IQR_FACTOR·(q3 − q1)
IQR_FACTOR = np.float32(1.5)
#: bits of an order key counted per histogram pass (two passes cover 32 bits)
HALF_KEY_BITS = 16
BINS = 1 << HALF_KEY_BITS
_SIGN = np.uint32(0x80000000)


def _row_length(shape: tuple[int, ...]) -> int:
    return shape[-1] if len(shape) > 0 else 1


def _whole_rows(size: int, start: int, shape: tuple[int, ...]) -> int:
    """The row length of a chunk of whole rows (MergeError naming the chunk otherwise)."""
    row = _row_length(shape)
    if start % row or size % row:
        raise MergeError(f"arcee_fusion: chunk [{start}, {start + size}) of a tensor of shape {shape} "
                         f"is not whole rows of {row}")
    return row


def row_kl(y: np.ndarray, base: np.ndarray, start: int, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 KL(softmax(x) ‖ softmax(b)) of each row of a chunk of whole rows (y = x − b, both flat float32)."""
    row = _whole_rows(y.size, start, shape)
    b = base.reshape(-1, row).astype(np.float64)
    x = (base + y).reshape(-1, row).astype(np.float64)  # the model's values (float32 round trip, as read)
    p = _softmax(x) + SOFTMAX_EPS
    q = _softmax(b) + SOFTMAX_EPS
    return np.sum(p * np.log(p / q), axis=-1).astype(np.float32)


def importance(y: np.ndarray, kl: np.ndarray, start: int, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 importance |y|·KL_row of a chunk of whole rows, ``kl`` the KL of its rows."""
    row = _whole_rows(y.size, start, shape)
    return (np.abs(y).reshape(-1, row) * kl.reshape(-1, 1)).ravel()


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def order_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys ordered as the float32 ``values`` are (negative values bit-flipped, positive sign-set)."""
    bits = values.view(np.uint32)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_value(key: int) -> np.float32:
    """The float32 whose order key is ``key``."""
    key = np.uint32(key)
    bits = key ^ _SIGN if key & _SIGN else ~key
    return np.array([bits], np.uint32).view(np.float32)[0]


def quartile_ranks(numel: int) -> tuple[int, ...]:
    """mergekit's sorted-index ⌊q·(n − 1)⌋ of each quartile (exact integer arithmetic)."""
    return tuple(int(q * 4) * (numel - 1) // 4 for q in QUARTILES)


def _wanted_bins(coarse_counts: np.ndarray, numel: int) -> tuple[np.ndarray, np.ndarray]:
    """(upper-16-bit bin of each wanted rank, that rank among the keys of its bin)."""
    cumulative = np.cumsum(coarse_counts)
    ranks = np.array(quartile_ranks(numel), np.int64)
    bins = np.searchsorted(cumulative, ranks, side="right")
    return bins, ranks - (cumulative[bins] - coarse_counts[bins])


def _rows_of(kl_bits, start: int, size: int, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 KL of a chunk's rows, out of pass 1's ``row_kl_bits``."""
    row = _row_length(shape)
    bits = np.asarray(kl_bits[0][start // row : (start + size) // row], np.int64).astype(np.uint32)
    return bits.view(np.float32)


def arcee_fusion_coarse(ys, *, base, start, shape, numel, ops):
    """Pass 1: each row's KL (as float32 bits at its row index: rows are in one chunk each, so the chunks'
    sums put every row's bits in place exactly) and counts of the importance keys' upper 16 bits."""
    y = ops.to_numpy(ys[0])
    kl = row_kl(y, ops.to_numpy(base), start, shape)
    keys = order_keys(importance(y, kl, start, shape))
    row = _row_length(shape)
    kl_bits = np.zeros(numel // row, np.int64)
    kl_bits[start // row : start // row + kl.size] = kl.view(np.uint32)
    return {"coarse_counts": (np.bincount(keys >> HALF_KEY_BITS, minlength=BINS),), "row_kl_bits": (kl_bits,)}


def arcee_fusion_fine(ys, *, coarse_counts, row_kl_bits, start, shape, numel, ops):
    """Pass 2: counts of the lower 16 bits of the keys in each bin that holds a wanted rank (one row per rank)."""
    y = ops.to_numpy(ys[0])
    keys = order_keys(importance(y, _rows_of(row_kl_bits, start, y.size, shape), start, shape))
    bins, _ = _wanted_bins(coarse_counts[0], numel)
    upper = keys >> HALF_KEY_BITS
    lower = keys & np.uint32(BINS - 1)
    return {"fine_counts": (np.stack([np.bincount(lower[upper == b], minlength=BINS) for b in bins]),)}


def fusion_threshold(coarse_counts: np.ndarray, fine_counts: np.ndarray, numel: int) -> np.float32:
    """median + 1.5·(q3 − q1) in float32, from the two histograms."""
    bins, within = _wanted_bins(coarse_counts, numel)
    q1, median, q3 = (key_value((int(b) << HALF_KEY_BITS) | int(np.searchsorted(np.cumsum(counts), r, side="right")))
                      for b, r, counts in zip(bins, within, fine_counts))
    return median + IQR_FACTOR * (q3 - q1)


@register("merge", "arcee_fusion", reduce=arcee_fusion_coarse, later_reduces=(arcee_fusion_fine,),
          produces=("coarse_counts", "row_kl_bits", "fine_counts"), inputs=1, row_aligned=True,
          input_bytes_per_second=0.15e9)
def arcee_fusion(ys, *, base, coarse_counts, row_kl_bits, fine_counts, start, shape, numel, ops):
    """mergekit arcee_fusion on the task vector: y where its importance reaches the threshold, else 0
    (the engine adds the base)."""
    if base is None:
        raise MergeError("arcee_fusion: needs the base model's tensor (--base_model_path)")
    y = ops.to_numpy(ys[0])
    threshold = fusion_threshold(coarse_counts[0], fine_counts[0], numel)
    keep = importance(y, _rows_of(row_kl_bits, start, y.size, shape), start, shape) >= threshold
    return ops.from_numpy(y * keep.astype(np.float32))
