"""Counter-based normal and uniform draws for router weights and expert noise.

Draw ``j`` of a stream is a pure function of (seed, tensor name, stream index, j) (``kernels.counter_rng``),
so any chunk of a tensor can be drawn on its own: results never depend on ``--n_process`` or chunking.
Uniform draw ``j`` is splitmix64 output ``j`` with 53 bits kept; normal draw ``j`` is Box-Muller of
splitmix64 outputs ``2j`` and ``2j + 1``.
"""

from __future__ import annotations

import numpy as np

from llm_merge.kernels.counter_rng import draw_key, splitmix64

_UNIT = 2.0 ** -53


def stream_key(seed: int, tensor_name: str, index: int = 0) -> int:
    """Key of one stream: the tensor written, and which of its sources (0 for a tensor drawn whole)."""
    return draw_key(seed, tensor_name, index)


def uniform(key: int, start: int, count: int) -> np.ndarray:
    """Draws ``start .. start+count-1`` of stream ``key``, uniform on [0, 1) (float64)."""
    return (splitmix64(key, start, count) >> np.uint64(11)).astype(np.float64) * _UNIT


def normal(key: int, start: int, count: int) -> np.ndarray:
    """Draws ``start .. start+count-1`` of stream ``key``, standard normal (float32)."""
    bits = splitmix64(key, 2 * start, 2 * count) >> np.uint64(11)
    radius = bits[0::2].astype(np.float64)
    radius += 1.0  # in (0, 1] after scaling: the logarithm stays finite
    radius *= _UNIT
    angle = bits[1::2].astype(np.float64) * (2.0 * np.pi * _UNIT)
    return (np.sqrt(-2.0 * np.log(radius)) * np.cos(angle)).astype(np.float32)
