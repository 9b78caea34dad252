"""Sparsifiers: act on one model's task vector (or weights, without a base).

Each takes a float32 chunk ``t`` and returns the sparsified chunk as a new
array; inputs are never modified. Whole-tensor statistics (trim threshold,
magprune ranks) come from the ``prepare`` function registered with it.
"""

from __future__ import annotations


from llm_merge.kernels.counts import trim_count
from llm_merge.methods.registry import ANY_DTYPE, register


@register("sparsify", "none", kernel="none", fused=True, passes_through=True, input_bytes_per_second=2.0e9)
def keep_all(t, *, ops):
    """No sparsification."""
    return t


def kept_by_draws(t, keep_prob, rng, ops):
    """``t`` where the counter-based draw keeps the entry (probability ``keep_prob``: scalar or per entry), else 0.

    The draws of DARE and DELLA, in PaddleNLP's and mergekit's semantics alike.
    """
    return ops.where(rng.keep(keep_prob, t.size), t, 0.0)


def times(kept, factor, ops):
    """``kept`` times a rescale factor (the array itself when the factor is 1)."""
    return kept * ops.float32(factor) if factor != 1.0 else kept


@register("sparsify", "dare", kernel="dare", numpy_seconds_per_gb=2.6, fused=True, input_bytes_per_second=1.7e9)
def dare(t, *, reserve_p, rescale, rng, ops):
    """DARE: keep each entry with probability reserve_p; divide kept entries by reserve_p if rescale."""
    if reserve_p >= 1.0:
        return t
    kept = kept_by_draws(t, reserve_p, rng, ops)
    return kept / ops.float32(reserve_p) if rescale else kept


def trim_threshold(t, *, reserve_p, rescale, ops):
    """Magnitude threshold of the k largest |t| and the L1 rescale factor."""
    magnitude = ops.abs(t)
    if t.size == 0:
        return {"threshold": 0.0, "l1_scale": 1.0}
    threshold = ops.kth_largest(magnitude, trim_count(reserve_p, t.size))
    l1_scale = 1.0
    if rescale:
        kept_mass = ops.sum64(ops.where(magnitude >= threshold, magnitude, 0.0))
        l1_scale = ops.sum64(magnitude) / kept_mass if kept_mass > 0 else 1.0
    return {"threshold": threshold, "l1_scale": l1_scale}


@register("sparsify", "trim", prepare=trim_threshold, produces=("threshold", "l1_scale"), kernel="trim",
          numpy_seconds_per_gb=8.1, fused=True, streamed_dtypes=ANY_DTYPE, input_bytes_per_second=1.0e9)
def trim(t, *, threshold, l1_scale, ops):
    """TIES trim: keep entries with |t| >= threshold (ties kept), times the L1 rescale factor."""
    return times(ops.where(ops.abs(t) >= threshold, t, 0.0), l1_scale, ops)


def magnitude_ranks(t, *, ops):
    """Doubled midrank of every entry by |t|, 0 the largest: 2 #{larger} + #{equal} - 1 (equal |t| share
    the mean of the ranks they span)."""
    return {"doubled_midranks": ops.doubled_midranks(ops.abs(t))}


#: Magnitude ranks stream (compiled rank tables) for 16-bit float inputs: their deltas have few significant
#: bits, so most have zero low 16 bits, which keeps the tables small (where too many do not, the streamed
#: statistics give up early and whole-tensor ranks follow); float32 deltas almost never do.
_RANKS_STREAM_FOR = frozenset({"BF16", "F16"})


# statistic_bytes: the ranks, and the (key, index) pairs and scratch that sort mostly distinct magnitudes
# (earlier models' ranks are spilled when large)
@register("sparsify", "magprune", prepare=magnitude_ranks, produces=("doubled_midranks",), kernel="magprune",
          numpy_seconds_per_gb=5.6, fused=True,
          streamed_dtypes=_RANKS_STREAM_FOR, statistic_bytes=20, input_bytes_per_second=0.55e9)
def magprune(t, *, doubled_midranks, numel, reserve_p, epsilon, rescale, rng, ops):
    """DELLA MAGPRUNE: drop midrank r with probability (1-p) - eps/2 + eps*r/n; divide kept by 1 - that."""
    keep_prob = (reserve_p + epsilon / 2) - ops.float64(doubled_midranks) * 0.5 * (epsilon / numel)
    kept = kept_by_draws(t, keep_prob, rng, ops)
    return ops.divide(kept, ops.float32(keep_prob)) if rescale else kept
