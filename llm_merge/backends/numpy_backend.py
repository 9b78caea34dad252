"""NumPy implementation of the ops the methods use (CPU; no Paddle import).

Where numba is installed (the default install), hot methods run as compiled
kernels that give the same bits as the NumPy code; set ``LLM_MERGE_NUMBA=0``
to use plain NumPy.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import numpy as np

from llm_merge.io import dtypes
from llm_merge.kernels import l1_sums
from llm_merge.kernels.counter_rng import CounterRNG

log = logging.getLogger(__name__)


def _load_kernels(compiled: bool):
    if not compiled or os.environ.get("LLM_MERGE_NUMBA", "1") == "0":
        return None
    try:
        from llm_merge.kernels import fused as numba_kernels
    except ImportError as exc:  # numba missing or broken: plain NumPy still gives the same results
        log.debug("numba kernels unavailable (%s); using NumPy", exc)
        return None
    numba_kernels.initialize()
    return numba_kernels


#: Raw lanes of the compiled kernels for 16-bit floats, read and written as stored: bfloat16 bits
#: (``dtypes.stored``'s ``BFLOAT16_BITS``) as uint16, float16 bits as int16 (numba has no float16;
#: ``kernels.blocks.is_half_lane``). Other floats pass through float32 bits (uint32).
HALF_LANES = {dtypes.BFLOAT16_BITS: np.uint16, np.dtype(np.float16): np.int16}


def half_lane(dtype: np.dtype) -> Optional[type]:
    """``HALF_LANES``'s lane of a 16-bit float dtype (bfloat16 in either form: ``dtypes.is_bfloat16``), else None."""
    dtype = np.dtype(dtype)
    return np.uint16 if dtypes.is_bfloat16(dtype) else HALF_LANES.get(dtype)


#: itemsize -> (unsigned type of the bits, exponent mask); bfloat16's mask is set apart (same itemsize as float16).
_EXPONENT_BITS = {2: (np.uint16, np.uint16(0x7C00)), 4: (np.uint32, np.uint32(0x7F800000)),
                  8: (np.uint64, np.uint64(0x7FF0000000000000))}


#: Magnitude keys (float32 bits, sign cleared) by their top 15 bits; a key whose low 16 bits are 0 is
#: *plain* (most bfloat16 and float16 deltas are), any other key *mixed*.
_BUCKETS = 1 << 15
#: Keys more often mixed than this are ranked by sorting them all (float32 deltas), else plain keys by
#: their bucket counts and only the mixed ones by sorting: 7 against 283 ns per entry on bfloat16 deltas.
_MIXED_FRACTION_SORTED = 1 / 5


def _sorted_midranks(keys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(doubled midrank per distinct key, each entry's distinct-key index), by sorting every key."""
    _, slots, equal = np.unique(keys, return_inverse=True, return_counts=True)
    larger = n - np.cumsum(equal)  # distinct keys ascending: entries above each
    return 2 * larger + equal - 1, slots.ravel()


def _bucketed_midranks(keys: np.ndarray, is_mixed: np.ndarray, n_mixed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(doubled midrank per slot, each entry's slot): slot b for bucket b's plain key, ``_BUCKETS + u`` for
    the u-th distinct mixed key. Keys above bucket b's plain key: those of larger buckets and b's mixed
    ones; above a mixed key v of bucket b: those of larger buckets and b's mixed keys above v."""
    buckets = (keys >> np.uint32(16)).astype(np.intp)
    counts = np.bincount(buckets, minlength=_BUCKETS)
    mixed_buckets = buckets[is_mixed]
    mixed_counts = np.bincount(mixed_buckets, minlength=_BUCKETS)
    above = n - np.cumsum(counts)  # entries in larger buckets
    plain = 2 * (above + mixed_counts) + (counts - mixed_counts) - 1
    if not n_mixed:
        return plain, buckets
    distinct, mixed_slots, equal = np.unique(keys[is_mixed], return_inverse=True, return_counts=True)
    of_bucket = (distinct >> np.uint32(16)).astype(np.intp)
    # mixed entries above v inside its bucket: those up to the bucket's end less those up to v's end
    larger = above[of_bucket] + np.cumsum(mixed_counts)[of_bucket] - np.cumsum(equal)
    slots = buckets
    slots[is_mixed] = _BUCKETS + mixed_slots.ravel()
    return np.concatenate((plain, 2 * larger + equal - 1)), slots


class NumpyOps:
    """Array operations on float32 NumPy arrays."""

    name = "np"

    def __init__(self, compiled: bool = True) -> None:
        self._kernels = _load_kernels(compiled)

    @property
    def compiled(self) -> bool:
        """Whether the numba kernels are loaded (compiled twins, fused pass, streamed statistics)."""
        return self._kernels is not None

    def kernel(self, kind: str, kernel: str) -> Optional[Callable]:
        """The compiled twin ``kernel`` (a method spec's kernel id) of a method's ``kind`` function
        (sparsify, merge or prepare), or None to use the method's own function."""
        return self._kernels.KERNELS.get((kind, kernel)) if self._kernels else None
    abs = staticmethod(np.abs)
    sign = staticmethod(np.sign)
    where = staticmethod(np.where)
    zeros_like = staticmethod(np.zeros_like)
    float32 = staticmethod(np.float32)
    #: Elementwise quotient, correctly rounded (IEEE); ``x / y`` is not on every backend.
    divide = staticmethod(np.divide)

    @staticmethod
    def float64(x) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    @staticmethod
    def from_numpy(x: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def to_numpy(x) -> np.ndarray:
        return np.asarray(x)

    @staticmethod
    def sum64(x: np.ndarray) -> float:
        """Sum accumulated in float64."""
        return float(np.sum(x, dtype=np.float64))

    def dot64(self, x: np.ndarray, y: np.ndarray) -> float:
        """Dot product accumulated in float64."""
        if self._kernels:
            return float(self._kernels.dot64_kernel(x.ravel(), y.ravel()))
        return float(np.dot(x.astype(np.float64, copy=False), y.astype(np.float64, copy=False)))

    def slot_sums(self, magnitude: np.ndarray, kept: Optional[np.ndarray] = None) -> np.ndarray:
        """``kernels.l1_sums.slot_sums`` (exact sums of non-negative float32 values), compiled where numba is."""
        return self._kernels.slot_sums(magnitude, kept) if self._kernels else l1_sums.slot_sums(magnitude, kept)

    def variance_keys(self, ts: list[np.ndarray]) -> np.ndarray:
        """uint32 order keys (float32 bits) of the per-entry population variance of the float32 vectors ``ts``,
        in float64: mean = (t_0 + t_1 + ...) / K, v = ((t_0 − mean)² + (t_1 − mean)² + ...) / K, in that order,
        then rounded to float32 (as torch.var computes it)."""
        if self._kernels:
            return self._kernels.variance_keys(ts)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf inputs: the engine reports them
            mean = ts[0].astype(np.float64)
            for t in ts[1:]:
                mean += t
            mean /= len(ts)
            variance = np.zeros_like(mean)
            square = np.empty_like(mean)
            for t in ts:
                np.subtract(t, mean, out=square)
                np.multiply(square, square, out=square)
                variance += square
            variance /= len(ts)
            return variance.astype(np.float32).view(np.uint32)

    def kth_largest(self, x: np.ndarray, k: int) -> float:
        """The k-th largest value of a non-negative vector (k >= 1)."""
        if self._kernels:
            return self._kernels.kth_largest(x, k)
        return float(np.partition(x.ravel(), x.size - k)[x.size - k])

    def doubled_midranks(self, x: np.ndarray) -> np.ndarray:
        """Doubled midrank of each |x| (sign ignored), 0 the largest: 2 #{larger} + #{equal} - 1; uint32 up
        to 2^31 elements, else int64. Magnitudes compare as their float32 bit patterns (NaN the largest)."""
        flat = np.ascontiguousarray(x, dtype=np.float32).ravel()
        if self._kernels:
            return self._kernels.doubled_midranks(flat)
        keys = flat.view(np.uint32) & np.uint32(0x7FFFFFFF)
        is_mixed = (keys & np.uint32(0xFFFF)) != 0
        n_mixed = int(np.count_nonzero(is_mixed))
        if n_mixed > _MIXED_FRACTION_SORTED * flat.size:
            doubled, slots = _sorted_midranks(keys, flat.size)
        else:
            doubled, slots = _bucketed_midranks(keys, is_mixed, n_mixed, flat.size)
        return doubled.astype(np.uint32 if flat.size <= 1 << 31 else np.int64)[slots]

    def streaming_peak_bytes(self, kernel: str, *, k: int, numel: int, budget: int) -> int:
        """Most memory the streamed statistics of k task vectors of ``numel`` elements take (rank tables,
        which keep within ``budget`` bytes where they can: ``StreamingRanks.mixed_fraction_limit``; della_magprune's
        keep bits)."""
        if kernel == "magprune":
            return self._kernels.StreamingRanks.peak_bytes(k, numel, budget)
        if kernel == "della_magprune":
            return self._kernels.StreamingRowKeep.peak_bytes(k, numel)
        return 0

    def streaming_prepare(self, kernel: str, *, k: int, numel: int, options: dict, budget: int,
                          model_options: Optional[list[dict]] = None, keys: Optional[list[int]] = None,
                          shape: tuple = ()):
        """Whole-tensor statistics fed raw chunks of all k inputs per pass (``kernels.streaming.StreamingTrim`` /
        ``StreamingRanks``, whose tables keep within ``budget`` bytes where they can; mergekit's
        ``StreamingMagnitude``, ``StreamingRandomL1``, ``StreamingRowKeep``), for a sparsifier whose spec streams
        them (``Method.streams``); None where they do not stream this tensor. ``model_options``: each model's
        options (default ``options``), ``keys``: each model's random stream, ``shape``: the tensor's."""
        kernels, block = self._kernels, self._kernels.FusedChunks.BLOCK
        model_options = model_options or [options] * k
        rescale = options["rescale"]
        if kernel == "magprune":
            return kernels.StreamingRanks(k, numel, block, budget)
        if kernel == "magnitude":
            return kernels.StreamingMagnitude(numel, model_options, rescale, block)
        if kernel == "random":
            return kernels.StreamingRandomL1(keys, model_options, rescale, block)
        if kernel == "della_magprune":
            return kernels.StreamingRowKeep.create(numel, shape, keys, model_options, rescale)
        return kernels.StreamingTrim(k, numel, [o["reserve_p"] for o in model_options], rescale, block)

    def streaming_reduce(self, kernel: Optional[str], *, k: int):
        """The merge's whole-tensor sums fed raw chunks of all k inputs (``kernels.streaming.StreamingGramSums``), or None."""
        if not self._kernels or kernel != "gram":
            return None
        return self._kernels.StreamingGramSums(k, self._kernels.FusedChunks.BLOCK)

    def fused_chunks(self, **constants):
        """A fused apply pass (``kernels.fused.FusedChunks``) for one tensor, or None without numba."""
        return self._kernels.FusedChunks(**constants) if self._kernels else None

    # -- host conversions (used by the engine whatever the backend) --------------------
    def widen(self, stored: np.ndarray, out: np.ndarray) -> int:
        """Upcast a chunk in its stored float dtype into the float32 ``out``; returns the NaN/Inf count."""
        lane = half_lane(stored.dtype) if self._kernels else None
        if lane is not None:
            return self._kernels.widen_bits(stored.view(lane), out.view(np.uint32))
        if stored.dtype == np.float32:
            if stored is not out:
                np.copyto(out, stored)
            if self._kernels:
                return int(self._kernels.count_nonfinite_kernel(out.view(np.uint32)))
        elif dtypes.is_bfloat16(stored.dtype):
            # bfloat16 is the top half of a float32: widening is a 16-bit shift.
            np.left_shift(stored.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            np.copyto(out, stored, casting="unsafe")
        if np.isfinite(out.sum()):  # cheap screen; exact count only when needed
            return 0
        return int(out.size - np.count_nonzero(np.isfinite(out)))

    def narrow(self, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """Cast a float32 chunk to the output dtype (round to nearest even)."""
        lane = half_lane(dtype) if self._kernels else None
        if lane is not None:
            return self._kernels.narrow_bits(x.ravel().view(np.uint32), np.empty(x.size, lane)).view(dtype)
        if dtypes.is_bfloat16(dtype):
            return narrow_bfloat16(x).reshape(x.shape).view(dtype)
        return x.astype(dtype, copy=False)

    @staticmethod
    def count_nonfinite(x: np.ndarray) -> int:
        """NaN/Inf values in an output chunk (bfloat16, float16, float32 or float64), from their exponent bits."""
        bits, exponent = _EXPONENT_BITS[np.dtype(x.dtype).itemsize]
        if dtypes.is_bfloat16(x.dtype):
            exponent = bits(0x7F80)
        masked = np.bitwise_and(x.view(bits), exponent)
        return int(np.count_nonzero(masked == exponent))

    @staticmethod
    def rng(key: int, offset: int) -> CounterRNG:
        return CounterRNG(key, offset)


def narrow_bfloat16(x: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) of float32 values, as ``x.astype(ml_dtypes.bfloat16)`` gives them: the top half
    of the bits rounded to nearest even (overflow to Inf), and NaN as 0x7FC0 / 0xFFC0 by its sign."""
    bits = x.ravel().view(np.uint32)
    rounded = (bits >> np.uint32(16)) & np.uint32(1)
    rounded += bits
    rounded += np.uint32(0x7FFF)  # finite values stay below 2^32: 0xFF7FFFFF + 0x8000 at most
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        out[nan] = np.where(bits[nan] >> np.uint32(31), np.uint16(0xFFC0), np.uint16(0x7FC0))
    return out
