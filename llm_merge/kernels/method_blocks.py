"""Each method's compiled math, written once: the block functions of the sparsifiers (DARE, trim,
magprune) and of the merges (linear, TIES) that the fused chunk pass (``kernels.fused``) and the
drop-in twins of the NumPy methods (``kernels.twins``) both call.

Each follows the float32 operation order of its NumPy twin in ``llm_merge.methods`` (IEEE
semantics, no fastmath), so both give the same bits; ``tests/test_kernels.py`` holds them to that.
Random draws use the counter-based splitmix64 stream of ``llm_merge.kernels.counter_rng``.

A sparsifier's block function reads ``source[:count]`` and writes ``target[:count]``: the fused pass
passes one task-vector row as both (in place), a twin its input and a fresh output. A merge's reads
the models' entries from ``rows``: a 2-D array (the fused pass's rows) or a tuple of 1-D arrays
(a twin's inputs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, types
from numba.extending import overload

from llm_merge.kernels import blocks, counter_rng
from llm_merge.kernels.blocks import JIT_OPTIONS
from llm_merge.kernels.cache import configure_kernel_caches
from llm_merge.kernels.counter_rng import GAMMA, MIX1, MIX2, UNIT, keep_threshold

NONE, DARE, TRIM, MAGPRUNE = 0, 1, 2, 3
SPARSIFY_CODES = {"none": NONE, "dare": DARE, "trim": TRIM, "magprune": MAGPRUNE}
LINEAR, TIES = 0, 1


class SparsifyConstants(NamedTuple):
    """A sparsifier's constants for one tensor of k models (``sparsify_constants`` builds them)."""

    code: int  # NONE, DARE, TRIM or MAGPRUNE
    keys: np.ndarray  # uint64 per model: its stream of random draws
    dare_threshold: int  # DARE keeps an entry iff its 53-bit draw is below this
    dare_p: np.float32  # DARE's divisor of kept entries (reserve_p)
    rescale: bool  # DARE / magprune: divide kept entries by their keep probability
    trim_threshold: np.ndarray  # float32 per model: trim keeps |t| >= this
    trim_scale: np.ndarray  # float32 per model: trim's L1 scale of kept entries
    top: float  # magprune's keep probability of rank 0
    step: float  # magprune's keep probability lost per rank (ranks are midranks: halves too)


class MergeConstants(NamedTuple):
    """A merge's constants (``merge_constants`` builds them)."""

    code: int  # LINEAR or TIES
    weights: np.ndarray  # float32 per model
    normalize: bool  # linear: divide by total_weight; TIES: by the agreeing models' weights
    total_weight: np.float32
    by_count: bool  # TIES elects the sign by count of models, else by weighted sum


def magprune_line(reserve_p: float, epsilon: float, numel: int) -> tuple[float, float]:
    """(top, step) of magprune's keep probability ``top - rank * step`` over a tensor of ``numel`` elements."""
    return reserve_p + epsilon / 2, epsilon / numel


def sparsify_constants(sparsify_type: str, keys, options: dict, numel: int, stats: list[dict]) -> SparsifyConstants:
    """The constants of sparsifier ``sparsify_type`` from the options and each model's statistics."""
    p = options["reserve_p"]
    top, step = magprune_line(p, options["epsilon"], numel)
    return SparsifyConstants(
        code=SPARSIFY_CODES[sparsify_type], keys=np.asarray(keys, dtype=np.uint64), dare_threshold=keep_threshold(p),
        dare_p=np.float32(p), rescale=options["rescale"],
        trim_threshold=np.array([s.get("threshold", 0.0) for s in stats], np.float32),
        trim_scale=np.array([s.get("l1_scale", 1.0) for s in stats], np.float32), top=top, step=step)


def merge_constants(merge_type: str, weight_list, normalize: bool, ties_elect_type: str,
                    coefficients=None) -> MergeConstants:
    """The constants of merge ``merge_type``; slerp's apply pass is a linear merge with its two
    ``coefficients``, not normalized."""
    total_weight = np.float32(sum(weight_list))
    by_count = ties_elect_type == "count"
    if merge_type == "slerp":
        return MergeConstants(LINEAR, np.asarray(coefficients, np.float32), False, total_weight, by_count)
    code = LINEAR if merge_type == "linear" else TIES
    return MergeConstants(code, np.asarray(weight_list, np.float32), normalize, total_weight, by_count)


@njit(inline="always", **JIT_OPTIONS)
def _draw_state(key, index):
    """splitmix64's state for element ``index`` of stream ``key``; element index + 1's is this + GAMMA.

    Loops step the state by GAMMA instead of multiplying per element: draws ~25% faster.
    """
    return np.uint64(key) + np.uint64(index + 1) * np.uint64(GAMMA)


@njit(inline="always", **JIT_OPTIONS)
def _mix53(z):
    """The 53-bit draw of splitmix64 state ``z`` (as ``llm_merge.kernels.counter_rng``)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(11)


@njit(inline="always", **JIT_OPTIONS)
def dare_block(source, target, count, key, offset, threshold, divisor, rescale):
    """DARE: target[j] = source[j] (/ divisor when rescale) where draw ``offset + j`` keeps it, else 0."""
    zero = np.float32(0.0)
    z = _draw_state(key, offset)
    for j in range(count):
        kept = _mix53(z) < np.uint64(threshold)
        target[j] = (source[j] / divisor if rescale else source[j]) if kept else zero
        z += np.uint64(GAMMA)


@njit(inline="always", **JIT_OPTIONS)
def trim_block(source, target, count, threshold, scale):
    """Trim: target[j] = source[j] (times ``scale`` unless it is 1) where |source[j]| >= threshold, else 0."""
    zero = np.float32(0.0)
    for j in range(count):
        t = source[j]
        target[j] = (t * scale if scale != np.float32(1.0) else t) if abs(t) >= threshold else zero


@njit(inline="always", **JIT_OPTIONS)
def magprune_block(source, target, count, doubled_midranks, key, offset, top, step, rescale):
    """Magprune: keep entry j, of magnitude midrank r = ``doubled_midranks[j]`` / 2, with probability
    top - r * step, by draw ``offset + j``; kept entries are divided by that probability when rescale,
    the others are 0."""
    zero = np.float32(0.0)
    z = _draw_state(key, offset)
    for j in range(count):
        keep_prob = top - np.float64(doubled_midranks[j]) * 0.5 * step
        kept = _mix53(z) < np.uint64(math.floor(keep_prob * UNIT))
        z += np.uint64(GAMMA)
        target[j] = (source[j] / np.float32(keep_prob) if rescale else source[j]) if kept else zero


@njit(**JIT_OPTIONS)
def sparsify_rows(rows, count, sparsifier, offset, ranks, rank_offset):
    """rows[i, :count] = sparsify(rows[i, :count]) in place: one simple (vectorizable) loop per model.

    Element j of the block is element ``offset + j`` of the tensor (its random draw) and
    ``rank_offset + j`` of ``ranks[i]``.
    """
    c = sparsifier
    if c.code == DARE:
        keys = c.keys  # each field taken from the tuple costs a reference count update: once per block
        for i in range(rows.shape[0]):
            row = rows[i]
            dare_block(row, row, count, keys[i], offset, c.dare_threshold, c.dare_p, c.rescale)
    elif c.code == TRIM:
        thresholds, scales = c.trim_threshold, c.trim_scale
        for i in range(rows.shape[0]):
            row = rows[i]
            trim_block(row, row, count, thresholds[i], scales[i])
    elif c.code == MAGPRUNE:
        keys = c.keys
        for i in range(rows.shape[0]):
            row = rows[i]
            magprune_block(row, row, count, ranks[i][rank_offset : rank_offset + count], keys[i], offset, c.top, c.step,
                           c.rescale)


def model_entry(rows, i, j):
    """Entry j of model i: ``rows[i, j]`` of a 2-D array, ``rows[i][j]`` of a tuple of arrays."""
    return rows[i][j]


@overload(model_entry, inline="always")
def _model_entry(rows, i, j):
    if isinstance(rows, types.Array):
        return lambda rows, i, j: rows[i, j]  # no row view per entry
    return lambda rows, i, j: rows[i][j]


@njit(inline="always", **JIT_OPTIONS)
def linear_elements(models, rows, count, merger, base, has_base, out):
    """out[j] = Σ w_i rows_i[j] (in model order), divided by Σ w when normalize (+ base[j]), for j < count.

    ``models``: a tuple of one array per model; only its length is used, a compile-time constant,
    so the loops over models unroll and the loop over elements vectorizes with the sums in registers.
    """
    weights = merger.weights
    for j in range(count):
        total = model_entry(rows, 0, j) * weights[0]
        for i in range(1, len(models)):
            total += model_entry(rows, i, j) * weights[i]
        if merger.normalize:
            total /= merger.total_weight
        out[j] = total + base[j] if has_base else total


@njit(inline="always", **JIT_OPTIONS)
def _vote(u, by_count):
    """A model's TIES vote for a weighted entry u: its sign (count election) or u itself (sum election)."""
    zero = np.float32(0.0)
    return (np.float32(1.0) if u > 0 else (np.float32(-1.0) if u < 0 else zero)) if by_count else u


@njit(**JIT_OPTIONS)
def ties_elements(models, rows, count, weights, normalize, by_count, base, has_base, out):
    """TIES per element j < count: elected sign, agreeing entries' sum, divided by their weights when
    ``normalize`` (+ base[j]). ``models`` as in ``linear_elements``.

    Sums start from +0.0 as the NumPy method's do (0 + -0.0 is +0.0).
    """
    zero = np.float32(0.0)
    for j in range(count):
        votes = zero
        for i in range(len(models)):
            votes += _vote(model_entry(rows, i, j) * weights[i], by_count)
        total = zero
        divisor = zero
        for i in range(len(models)):
            w = weights[i]
            u = model_entry(rows, i, j) * w
            agrees = (u > 0) if votes >= 0 else (u < 0)
            total += u if agrees else zero
            divisor += w if agrees else zero
        if normalize:
            total /= divisor if divisor != 0 else np.float32(1.0)
        out[j] = total + base[j] if has_base else total


@njit(**JIT_OPTIONS)
def merge_rows(models, rows, count, merger, base, has_base, out):
    """out[:count] = merge(rows[:, :count]) (+ base), element by element in the NumPy method's operation order.

    ``base`` must not overlap ``out``, even when ``has_base`` is false: the loops vectorize only where
    the compiler can tell the arrays apart.
    """
    if merger.code == LINEAR:
        linear_elements(models, rows, count, merger, base, has_base, out)
    elif merger.by_count:  # constant elections: where the call is inlined, each loop is compiled for its own (a run-time choice in the loop defeats vectorization)
        ties_elements(models, rows, count, merger.weights, merger.normalize, True, base, has_base, out)
    else:
        ties_elements(models, rows, count, merger.weights, merger.normalize, False, base, has_base, out)


#: Modules whose compiled code the kernels here inline or call, for their cache stamps.
KERNEL_DEPENDENCIES = (blocks, counter_rng)
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
