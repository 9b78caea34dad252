"""Counts the NumPy methods and the compiled kernels must agree on exactly (a light module: no numba)."""

from __future__ import annotations

import math


def trim_count(reserve_p: float, numel: int) -> int:
    """k = ceil(reserve_p * numel), ignoring float noise in the product (0.7 * 10 is 7)."""
    return min(numel, max(1, math.ceil(round(reserve_p * numel, 6))))


def magnitude_count(reserve_p: float, numel: int) -> int:
    """mergekit's k = max(1, int(density · n)) (truncating, as mergekit does)."""
    return max(1, int(reserve_p * numel))
