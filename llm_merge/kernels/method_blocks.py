"""Each method's compiled math, written once: the block functions of the sparsifiers (DARE, trim,
magprune; mergekit's random, magnitude and della_magprune in ``kernels.mergekit_blocks``) and of the
merges (linear, TIES) that the fused chunk pass (``kernels.fused``) and the drop-in twins of the NumPy
methods (``kernels.twins``) call.

Each follows the float32 operation order of its NumPy twin in ``llm_merge.methods`` (IEEE
semantics, no fastmath), so both give the same bits; ``tests/test_kernels.py`` holds them to that.
Random draws use the counter-based splitmix64 stream of ``llm_merge.kernels.counter_rng`` (``kernels.draws``).

A sparsifier's block function reads ``source[:count]`` and writes ``target[:count]``: the fused pass
passes one task-vector row as both (in place), a twin its input and a fresh output. A merge's reads
the models' entries from ``rows``: a 2-D array (the fused pass's rows) or a tuple of 1-D arrays
(a twin's inputs).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
from numba import njit, types
from numba.extending import overload

from llm_merge.kernels import blocks, counter_rng, draws, mergekit_blocks
from llm_merge.kernels.blocks import JIT_OPTIONS
from llm_merge.kernels.cache import configure_kernel_caches
from llm_merge.kernels.counter_rng import GAMMA, UNIT, keep_threshold
from llm_merge.kernels.draws import draw_state as _draw_state, mix53 as _mix53
from llm_merge.kernels.mergekit_blocks import band_block, masked_block, random_block

NONE, DARE, TRIM, MAGPRUNE, RANDOM, BAND, MASKED = 0, 1, 2, 3, 4, 5, 6
SPARSIFY_CODES = {"none": NONE, "dare": DARE, "trim": TRIM, "magprune": MAGPRUNE, "random": RANDOM,
                  "magnitude": BAND, "della_magprune": MASKED}
LINEAR, TIES, RAM, CLIP = 0, 1, 2, 3


class SparsifyConstants(NamedTuple):
    """A sparsifier's constants for one tensor of k models (``sparsify_constants`` builds them)."""

    code: int  # one of SPARSIFY_CODES
    keys: np.ndarray  # uint64 per model: its stream of random draws
    dare_threshold: np.ndarray  # uint64 per model: DARE / random keep an entry iff its 53-bit draw is below this
    dare_p: np.ndarray  # float32 per model: DARE's divisor of kept entries (reserve_p)
    rescale: bool  # DARE / magprune: divide kept entries by their keep probability
    trim_threshold: np.ndarray  # float32 per model: trim keeps |t| >= this
    l1_scale: np.ndarray  # float32 per model: the L1 scale of kept entries (trim, mergekit's sparsifiers)
    scaled: np.ndarray  # bool per model: mergekit's sparsifiers multiply by l1_scale (their factor is not 1)
    top: np.ndarray  # float64 per model: magprune's keep probability of rank 0
    step: np.ndarray  # float64 per model: magprune's keep probability lost per rank (midranks: halves too)
    keep_all: np.ndarray  # bool per model: magnitude / della_magprune return the task vector (density 1)
    band_bounds: np.ndarray  # (k, 2) float32: magnitude keeps low < |t| < high (``band_mask``) ...
    band_cuts: np.ndarray  # (k, 2) int64: ... and |t| == low from element low_cut, |t| == high before high_cut
    masks: tuple  # per model: della_magprune's keep bits (uint8, bit j % 8 of byte j // 8; empty elsewhere)


class MergeConstants(NamedTuple):
    """A merge's constants (``merge_constants`` builds them)."""

    code: int  # LINEAR, TIES, RAM or CLIP
    weights: np.ndarray  # float32 per model (RAM: each model's factor of the entries only it changes)
    normalize: bool  # linear: divide by total_weight; TIES: by the agreeing models' weights
    total_weight: np.float32
    by_count: bool  # TIES elects the sign by count of models, else by weighted sum
    threshold: np.float32  # RAM: an entry takes part where |t| > this; CLIP: the bound of |t| (nearswap's t)


def magprune_line(reserve_p: float, epsilon: float, numel: int) -> tuple[float, float]:
    """(top, step) of magprune's keep probability ``top - rank * step`` over a tensor of ``numel`` elements."""
    return reserve_p + epsilon / 2, epsilon / numel


#: ``SparsifyConstants.band_bounds`` / ``band_cuts`` of a model that magnitude does not select from.
_NO_BAND = ((0.0, 0.0), (0, 0))


def sparsify_constants(sparsify_type: str, keys, options: dict, numel: int, stats: list[dict],
                       model_options: Optional[list[dict]] = None, masks: Optional[list] = None) -> SparsifyConstants:
    """The constants of sparsifier ``sparsify_type`` from each model's options (``model_options``, default
    ``options`` for every model), statistics and keep bits (``masks``: della_magprune's, None where it keeps all)."""
    per_model = model_options or [options] * len(keys)
    p = [o["reserve_p"] for o in per_model]
    lines = np.array([magprune_line(o["reserve_p"], o["epsilon"], numel) for o in per_model], np.float64).reshape(-1, 2)
    l1 = [s.get("l1_scale", 1.0) for s in stats]
    selections = [s.get("selection") for s in stats]
    bands = [(sel[0::2], sel[1::2]) if sel is not None else _NO_BAND for sel in selections]
    masks = masks if masks is not None else [None] * len(keys)
    return SparsifyConstants(
        code=SPARSIFY_CODES[sparsify_type], keys=np.asarray(keys, dtype=np.uint64),
        dare_threshold=np.array([keep_threshold(v) for v in p], np.uint64), dare_p=np.array(p, np.float32),
        rescale=options["rescale"], trim_threshold=np.array([s.get("threshold", 0.0) for s in stats], np.float32),
        l1_scale=np.array(l1, np.float32), scaled=np.array([v != 1.0 for v in l1], np.bool_),
        top=np.ascontiguousarray(lines[:, 0]), step=np.ascontiguousarray(lines[:, 1]),
        keep_all=np.array([(sel is None) if sparsify_type == "magnitude" else (mask is None)
                           for sel, mask in zip(selections, masks)], np.bool_),
        band_bounds=np.array([b[0] for b in bands], np.float32).reshape(-1, 2),
        band_cuts=np.array([b[1] for b in bands], np.int64).reshape(-1, 2),
        masks=tuple(m if m is not None else _NO_MASK for m in masks))


_NO_MASK = np.zeros(0, np.uint8)


def merge_constants(merge_type: str, weight_list, normalize: bool, ties_elect_type: str,
                    coefficients=None, threshold: float = 0.0) -> MergeConstants:
    """The constants of merge ``merge_type``; a merge with ``coefficients`` from its statistics (slerp,
    multislerp, karcher: kernel ``gram``) runs as a linear merge with them, not normalized. ``ram`` takes
    its per-model factors as ``coefficients`` (all 1 without) and ε as ``threshold``; ``clip`` (nearswap)
    its bound as ``threshold``."""
    total_weight = np.float32(sum(weight_list))
    by_count = ties_elect_type == "count"
    bound = np.float32(threshold)
    if merge_type in ("ram", "clip"):
        factors = coefficients if coefficients is not None else [1.0] * len(weight_list)
        return MergeConstants(RAM if merge_type == "ram" else CLIP, np.asarray(factors, np.float32), False,
                              total_weight, by_count, bound)
    if coefficients is not None:
        return MergeConstants(LINEAR, np.asarray(coefficients, np.float32), False, total_weight, by_count, bound)
    code = LINEAR if merge_type == "linear" else TIES
    return MergeConstants(code, np.asarray(weight_list, np.float32), normalize, total_weight, by_count, bound)


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
def _keep_probability(doubled_midrank, top, step):
    """Magprune's keep probability of midrank r = ``doubled_midrank`` / 2: top - r * step (float64)."""
    return top - np.float64(doubled_midrank) * 0.5 * step


@njit(inline="always", **JIT_OPTIONS)
def magprune_keeps_block(source, target, count, keep_probs, key, offset, rescale):
    """Magprune with entry j's keep probability p = ``keep_probs[j]`` (float64) given: keep it where draw
    ``offset + j`` is below floor(p * 2^53), divided by float32(p) when rescale; the others are 0.
    Contiguous probabilities let this loop vectorize as DARE's does (0.6 against 14 ns per entry with them
    looked up inside it). Both the threshold and the divisor follow from one float64 per entry, so callers
    look up one value per entry, not two (della's apply pass: 1.58 against 1.80 ns per entry and model)."""
    zero = np.float32(0.0)
    z = _draw_state(key, offset)
    for j in range(count):
        keep_prob = keep_probs[j]
        kept = _mix53(z) < np.uint64(keep_prob * UNIT)  # truncation: the floor of a non-negative product
        z += np.uint64(GAMMA)
        target[j] = (source[j] / np.float32(keep_prob) if rescale else source[j]) if kept else zero


@njit(inline="always", **JIT_OPTIONS)
def magprune_block(source, target, count, doubled_midranks, key, offset, top, step, rescale, keep_probs):
    """Magprune: keep entry j, of magnitude midrank r = ``doubled_midranks[j]`` / 2, with probability
    top - r * step, by draw ``offset + j``; kept entries are divided by that probability when rescale,
    the others are 0. ``keep_probs``: float64 scratch of ``count`` entries."""
    for j in range(count):
        keep_probs[j] = _keep_probability(doubled_midranks[j], top, step)
    magprune_keeps_block(source, target, count, keep_probs, key, offset, rescale)


@njit(**JIT_OPTIONS)
def magprune_slot_probs(doubled_midranks, top, step):
    """Per slot of a rank table (``kernels.ranks.RankTable``): the keep probability of ``magprune_block``
    for its doubled midrank (float64), so that entries need no rank."""
    keep_probs = np.empty(doubled_midranks.size, np.float64)
    for s in range(doubled_midranks.size):
        keep_probs[s] = _keep_probability(doubled_midranks[s], top, step)
    return keep_probs


class KeepScratch(NamedTuple):
    """Per-entry scratch of ``sparsify_rows`` for blocks of up to ``block`` entries."""

    probs: np.ndarray  # float64: magprune's keep probabilities
    flags: np.ndarray  # uint8, 16 spare: the masked sparsifier's keep flags

    @classmethod
    def allocate(cls, block: int) -> "KeepScratch":
        return cls(np.empty(block, np.float64), np.empty(block + 16, np.uint8))


@njit(**JIT_OPTIONS)
def sparsify_rows(rows, count, sparsifier, offset, ranks, rank_offset, scratch):
    """rows[i, :count] = sparsify(rows[i, :count]) in place: one simple (vectorizable) loop per model.

    Element j of the block is element ``offset + j`` of the tensor (its random draw) and
    ``rank_offset + j`` of ``ranks[i]``. ``scratch``: a ``KeepScratch`` of at least ``count`` entries.
    """
    c = sparsifier
    if c.code == DARE:
        # each field taken from the tuple costs a reference count update: once per block
        keys, thresholds, divisors = c.keys, c.dare_threshold, c.dare_p
        for i in range(rows.shape[0]):
            row = rows[i]
            dare_block(row, row, count, keys[i], offset, thresholds[i], divisors[i], c.rescale)
    elif c.code == TRIM:
        thresholds, scales = c.trim_threshold, c.l1_scale
        for i in range(rows.shape[0]):
            row = rows[i]
            trim_block(row, row, count, thresholds[i], scales[i])
    elif c.code == MAGPRUNE:
        keys, keep_probs = c.keys, scratch.probs
        for i in range(rows.shape[0]):
            row = rows[i]
            magprune_block(row, row, count, ranks[i][rank_offset : rank_offset + count], keys[i], offset, c.top[i],
                           c.step[i], c.rescale, keep_probs)
    elif c.code == RANDOM:
        keys, thresholds, scales, scaled = c.keys, c.dare_threshold, c.l1_scale, c.scaled
        for i in range(rows.shape[0]):
            row = rows[i]
            random_block(row, row, count, keys[i], offset, thresholds[i], scales[i], scaled[i])
    elif c.code == BAND:
        bounds, cuts, scales, scaled, keep_all = c.band_bounds, c.band_cuts, c.l1_scale, c.scaled, c.keep_all
        for i in range(rows.shape[0]):
            if not keep_all[i]:
                row = rows[i]
                band_block(row, row, count, offset, bounds[i], cuts[i], scales[i], scaled[i])
    elif c.code == MASKED:
        masks, scales, scaled, keep_all, flags = c.masks, c.l1_scale, c.scaled, c.keep_all, scratch.flags
        for i in range(rows.shape[0]):
            if not keep_all[i]:
                row = rows[i]
                masked_block(row, row, count, masks[i], offset, scales[i], scaled[i], flags)


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
def ram_elements(models, rows, count, factors, threshold, base, has_base, out):
    """RAM per element j < count (``methods.ram``): the models with |t| > threshold take part; one alone keeps
    t times its factor, several each add t / their count, in model order from +0.0 (+ base[j])."""
    zero = np.float32(0.0)
    for j in range(count):
        taking = 0
        for i in range(len(models)):
            taking += abs(model_entry(rows, i, j)) > threshold
        divisor = np.float32(max(taking, 1))
        total = zero
        for i in range(len(models)):
            t = model_entry(rows, i, j)
            total += (t * factors[i] if taking == 1 else t / divisor) if abs(t) > threshold else zero
        out[j] = total + base[j] if has_base else total


@njit(inline="always", **JIT_OPTIONS)
def clip_elements(rows, count, bound, base, has_base, out):
    """nearswap per element j < count (``methods.spherical.nearswap``): the one task vector clipped to
    [-bound, bound] (+ base[j])."""
    for j in range(count):
        t = model_entry(rows, 0, j)
        clipped = bound if t > bound else (-bound if t < -bound else t)
        out[j] = clipped + base[j] if has_base else clipped


@njit(**JIT_OPTIONS)
def merge_rows(models, rows, count, merger, base, has_base, out):
    """out[:count] = merge(rows[:, :count]) (+ base), element by element in the NumPy method's operation order.

    ``base`` must not overlap ``out``, even when ``has_base`` is false: the loops vectorize only where
    the compiler can tell the arrays apart.
    """
    if merger.code == LINEAR:
        linear_elements(models, rows, count, merger, base, has_base, out)
    elif merger.code == RAM:
        ram_elements(models, rows, count, merger.weights, merger.threshold, base, has_base, out)
    elif merger.code == CLIP:
        clip_elements(rows, count, merger.threshold, base, has_base, out)
    elif merger.by_count:  # constant elections: where the call is inlined, each loop is compiled for its own (a run-time choice in the loop defeats vectorization)
        ties_elements(models, rows, count, merger.weights, merger.normalize, True, base, has_base, out)
    else:
        ties_elements(models, rows, count, merger.weights, merger.normalize, False, base, has_base, out)


#: Modules whose compiled code the kernels here inline or call, for their cache stamps.
KERNEL_DEPENDENCIES = (blocks, counter_rng, draws, mergekit_blocks)
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
