"""Counter-based random draws: reproducible for any chunk, worker count or backend.

The draw for element ``j`` of model ``i`` in tensor ``T`` is a pure function of
(seed, T, i, j): ``key = blake2b-64(f"{seed}:{T}:{i}")``, then the splitmix64
output ``mix(key + (j + 1) * GAMMA)``. An entry with keep probability ``p`` is
kept iff ``(draw >> 11) < floor(p * 2**53)`` (integer comparison; p = 1 keeps all).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
UNIT = 2.0**53


def draw_key(seed: int, tensor_name: str, model_index: int) -> int:
    """64-bit stream key of one (seed, tensor, model)."""
    digest = hashlib.blake2b(f"{seed}:{tensor_name}:{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def splitmix64(key: int, start: int, count: int) -> np.ndarray:
    """Draws ``start .. start+count-1`` of stream ``key`` as uint64."""
    z = np.arange(start + 1, start + 1 + count, dtype=np.uint64)
    z *= np.uint64(GAMMA)
    z += np.uint64(key)
    tmp = np.empty_like(z)
    for shift, mult in ((30, MIX1), (27, MIX2)):
        np.right_shift(z, np.uint64(shift), out=tmp)
        z ^= tmp
        z *= np.uint64(mult)
    np.right_shift(z, np.uint64(31), out=tmp)
    z ^= tmp
    return z


def keep_threshold(prob: float) -> int:
    """Integer threshold on ``draw >> 11`` for keep probability ``prob``."""
    return min(math.floor(prob * UNIT), 1 << 53)


class CounterRNG:
    """Keep/drop draws for elements ``offset ..`` of one (seed, tensor, model) stream."""

    def __init__(self, key: int, offset: int) -> None:
        self.key = key
        self.offset = offset

    def keep(self, prob: float | np.ndarray, count: int) -> np.ndarray:
        """Boolean mask: element kept with probability ``prob`` (a scalar or one per element)."""
        bits = splitmix64(self.key, self.offset, count)
        bits >>= np.uint64(11)
        if np.ndim(prob) == 0:
            return bits < np.uint64(keep_threshold(float(prob)))
        threshold = np.floor(np.asarray(prob, dtype=np.float64) * UNIT)
        return bits < threshold.astype(np.uint64)
