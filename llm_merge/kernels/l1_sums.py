"""Exact L1 sums of float32 magnitudes, shared by the NumPy methods and the compiled kernels (a light
module: no numba).

mergekit's L1 rescale divides ‖t‖₁ by ‖kept‖₁. Summed in float64 in some order, the result depends on
that order in its last bit; here both sums are correctly rounded, so any chunking, pass structure or
backend gives the same bits. A float32 magnitude with exponent field e and 24-bit significand m
(implicit bit included) is m · 2^(max(e, 1) − 150): sums are kept per exponent field as integer sums
of m ("slot sums", int64: exact up to 2^39 entries per slot), and ``exact_sum`` turns them into the
correctly rounded float64 total. Slot ``NAN_SLOT`` counts NaN magnitudes; with one the sum is NaN,
else with an Inf (exponent field 255) it is Inf, as a float64 sum would be.
"""

from __future__ import annotations

import math

import numpy as np

#: mergekit's tolerance below which an L1 rescale is skipped (sparsify.rescaled_masked_tensor).
RESCALE_EPS = 1e-7
#: Slot of each exponent field (0 .. 255; 255 holds Inf), and NAN_SLOT for NaN magnitudes.
NAN_SLOT = 256
SLOTS = NAN_SLOT + 1
#: float32 magnitudes are whole multiples of this power of two (the smallest subnormal).
_UNIT_EXPONENT = -149


def slot_sums(magnitude: np.ndarray, kept: np.ndarray | None = None) -> np.ndarray:
    """Slot sums (int64, ``2 * SLOTS``) of non-negative float32 values: the dropped entries' in the first
    ``SLOTS``, the kept ones' in the last (all kept when ``kept`` is None). At most 2^29 values at a time
    (their float64 partial sums stay exact)."""
    key = magnitude.view(np.uint32) & np.uint32(0x7FFFFFFF)
    exponent = key >> np.uint32(23)
    slot = np.where(key > np.uint32(0x7F800000), np.uint32(NAN_SLOT), exponent)
    significand = (key & np.uint32(0x7FFFFF)) | np.where(exponent > 0, np.uint32(0x800000), np.uint32(0))
    if kept is None:
        slot += np.uint32(SLOTS)
    else:
        slot += kept.astype(np.uint32) * np.uint32(SLOTS)
    sums = np.bincount(slot, weights=significand.astype(np.float64), minlength=2 * SLOTS)
    return sums.astype(np.int64)


def exact_sum(slots: np.ndarray) -> float:
    """The correctly rounded float64 sum of the magnitudes whose slot sums are ``slots`` (``SLOTS`` int64)."""
    if slots[NAN_SLOT]:
        return math.nan
    if slots[NAN_SLOT - 1]:
        return math.inf
    units = 0
    for exponent in np.flatnonzero(slots[: NAN_SLOT - 1]).tolist():
        units += int(slots[exponent]) << (max(exponent, 1) - 1)
    return float_of_units(units)


def float_of_units(units: int) -> float:
    """``units`` multiples of 2^-149, correctly rounded to float64 (int -> float rounds to nearest even;
    the scaling by a power of two is exact)."""
    return math.ldexp(float(units), _UNIT_EXPONENT)


def total_and_kept(sums: np.ndarray) -> tuple[float, float]:
    """(Σ all, Σ kept) of ``2 * SLOTS`` slot sums as ``slot_sums`` lays them out, each correctly rounded."""
    return exact_sum(sums[:SLOTS] + sums[SLOTS:]), exact_sum(sums[SLOTS:])


def l1_rescale_factor(before: float, after: float) -> float:
    """mergekit's ``rescaled_masked_tensor`` (L1): before / after, or 1 when either is below 1e-7."""
    return 1.0 if before < RESCALE_EPS or after < RESCALE_EPS else before / after
