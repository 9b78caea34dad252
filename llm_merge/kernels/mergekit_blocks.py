"""The block functions of mergekit's sparsifiers (numba) that the fused pass runs (``kernels.method_blocks.
sparsify_rows``): random (DARE's draws, no division), magnitude (a band of |t| with index cuts) and
della_magprune (keep bits drawn by its statistics pass), each times the L1 rescale factor. Each follows
the float32 operations of its NumPy method in ``llm_merge.methods.mergekit_sparsify`` (no fastmath).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from llm_merge.kernels import counter_rng, draws
from llm_merge.kernels.blocks import JIT_OPTIONS
from llm_merge.kernels.cache import configure_kernel_caches
from llm_merge.kernels.counter_rng import GAMMA
from llm_merge.kernels.draws import draw_state, mix53


@njit(inline="always", **JIT_OPTIONS)
def _scaled(value, scale, scaled):
    """mergekit's L1 rescale of one entry (kept or 0), as ``methods.sparsify.times`` applies it."""
    return value * scale if scaled else value


@njit(inline="always", **JIT_OPTIONS)
def random_block(source, target, count, key, offset, threshold, scale, scaled):
    """mergekit random: target[j] = source[j] where draw ``offset + j`` keeps it (DARE's draws), else 0,
    times ``scale`` when ``scaled``."""
    zero = np.float32(0.0)
    z = draw_state(key, offset)
    for j in range(count):
        kept = mix53(z) < np.uint64(threshold)
        target[j] = _scaled(source[j] if kept else zero, scale, scaled)
        z += np.uint64(GAMMA)


@njit(inline="always", **JIT_OPTIONS)
def _find_low_cut(source, count, offset, low, cuts):
    """The low cut of a block while the first ``-cuts[0] - 1`` entries equal to ``low`` are still to skip:
    ``offset + count`` (none of its equal entries kept) with the count to skip lowered, or, where the
    last of them lies in this block, one past its element index, kept in ``cuts[0]`` from then on."""
    skip = -cuts[0] - 1
    equal = 0
    for j in range(count):
        equal += abs(source[j]) == low
    if equal < skip:
        cuts[0] = -1 - (skip - equal)
        return offset + count
    seen = 0
    for j in range(count):
        seen += abs(source[j]) == low
        if seen == skip:
            cuts[0] = offset + j + 1
            break
    return cuts[0]


@njit(inline="always", **JIT_OPTIONS)
def band_block(source, target, count, offset, bounds, cuts, scale, scaled):
    """mergekit magnitude (``methods.mergekit_sparsify.band_mask``): keep entry j, element ``offset + j`` of the
    tensor, where low < |t| < high, or |t| == low from element low_cut on, or |t| == high before element
    high_cut (bounds = (low, high), cuts = (low_cut, high_cut)); times ``scale`` when ``scaled``.

    A negative low_cut, -1 - s, drops the first s entries equal to low instead: blocks must then come in
    order, and the block holding the last of them sets low_cut in ``cuts`` (``_find_low_cut``). So the
    streamed statistics need no pass of their own to find where the entries equal to low start to be kept.
    """
    zero = np.float32(0.0)
    low, high = bounds[0], bounds[1]
    low_cut = _find_low_cut(source, count, offset, low, cuts) if cuts[0] < 0 else cuts[0]
    low_from = min(max(low_cut - offset, 0), count)  # entries j >= low_from: |t| == low kept
    high_until = min(max(cuts[1] - offset, 0), count)  # entries j < high_until: |t| == high kept
    if (low_from == 0 or low_from == count) and (high_until == 0 or high_until == count):
        at_low, at_high = low_from == 0, high_until == count  # the same for the whole block: no index per entry
        for j in range(count):
            t = source[j]
            size = abs(t)
            above = (size > low) | ((size == low) & at_low)
            below = (size < high) | ((size == high) & at_high)
            target[j] = _scaled(t if above & below else zero, scale, scaled)
        return
    for j in range(count):
        t = source[j]
        size = abs(t)
        above = (size > low) | ((size == low) & (j >= low_from))
        below = (size < high) | ((size == high) & (j < high_until))
        target[j] = _scaled(t if above & below else zero, scale, scaled)


@njit(inline="always", **JIT_OPTIONS)
def masked_block(source, target, count, mask, offset, scale, scaled, flags):
    """mergekit della_magprune: keep entry j where bit ``offset + j`` of ``mask`` is set (its draws, made by
    the statistics pass), times ``scale`` when ``scaled``. ``flags``: scratch of ``count + 16`` bytes.

    The bits are unpacked into bytes first: picking each entry's bit out of ``mask`` in the loop
    below keeps it from vectorizing (8 against 0.07 ns per entry).
    """
    zero = np.float32(0.0)
    first, shift = offset >> 3, offset & 7
    for b in range((shift + count + 7) >> 3):
        byte = np.uint32(mask[first + b])
        for q in range(8):
            flags[8 * b + q] = np.uint8((byte >> np.uint32(q)) & np.uint32(1))
    kept = flags[shift : shift + count]
    for j in range(count):
        target[j] = _scaled(source[j] if kept[j] else zero, scale, scaled)


#: Modules whose compiled code the kernels here inline or call, for their cache stamps.
KERNEL_DEPENDENCIES = (counter_rng, draws)
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
