"""Merge functions: combine the sparsified float32 chunks ``ys`` (one per model)."""

from __future__ import annotations

import math

import numpy as np

from llm_merge.methods.registry import register


def gram_entry(sums, count: int, i: int, j: int):
    """<y_i, y_j> out of ``gram_sums``' entries of ``count`` inputs (the upper triangle, row by row)."""
    i, j = min(i, j), max(i, j)
    return sums[i * count - i * (i - 1) // 2 + (j - i)]


def gram_matrix(sums, count: int) -> np.ndarray:
    """The float64 ``count`` x ``count`` Gram matrix of scalar ``gram_sums`` entries."""
    return np.array([[float(gram_entry(sums, count, i, j)) for j in range(count)] for i in range(count)])


def weighted_sum(ys, coefficients, ops):
    """Σ c_i·y_i in float32, in input order (the fused linear pass adds in the same order: same bytes)."""
    total = ys[0] * ops.float32(coefficients[0])
    for y, c in zip(ys[1:], coefficients[1:]):
        total += y * ops.float32(c)
    return total


@register("merge", "linear", kernel="linear", numpy_seconds_per_gb=0.6, fused=True, divides_by_weight_sum=True)
def linear(ys, *, weight_list, normalize, ops):
    """Weighted sum; divided by the sum of weights when normalize."""
    total = weighted_sum(ys, weight_list, ops)
    if normalize:
        total /= ops.float32(sum(weight_list))
    return total


def gram_sums(ys, *, ops):
    """Additive statistics of a chunk: the Gram entries <y_i, y_j> for every pair i <= j, row by row of the
    upper triangle (for two inputs: |y0|², y0·y1, |y1|²). Kernel ``gram`` streams the same sums."""
    return {"sums": tuple(ops.dot64(ys[i], ys[j]) for i in range(len(ys)) for j in range(i, len(ys)))}


def slerp_coefficients(sums, slerp_alpha, slerp_normalize_eps, slerp_dot_threshold) -> tuple[float, float]:
    """Coefficients (c0, c1) of y0 and y1 from the whole-tensor norms and dot product."""
    sq0, dot, sq1 = sums
    norm0, norm1 = math.sqrt(sq0), math.sqrt(sq1)
    scale0 = norm0 if norm0 >= slerp_normalize_eps else 1.0
    scale1 = norm1 if norm1 >= slerp_normalize_eps else 1.0
    cosine = min(1.0, max(-1.0, dot / (scale0 * scale1)))
    t = slerp_alpha
    if abs(cosine) > slerp_dot_threshold:
        return 1.0 - t, t
    theta = math.acos(cosine)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def _slerp_fused_coefficients(reduced: dict, options: dict) -> tuple[float, float]:
    """slerp in the fused pass: a linear merge (not normalized) of the two inputs with these coefficients."""
    return slerp_coefficients(reduced["sums"], options["slerp_alpha"], options["slerp_normalize_eps"],
                              options["slerp_dot_threshold"])


@register("merge", "slerp", reduce=gram_sums, produces=("sums",), kernel="gram", numpy_seconds_per_gb=1.1, fused=True,
          fused_coefficients=_slerp_fused_coefficients, inputs=2)
def slerp(ys, *, sums, slerp_alpha, slerp_normalize_eps, slerp_dot_threshold, ops):
    """Spherical interpolation of two tensors (linear when nearly colinear)."""
    return weighted_sum(ys, slerp_coefficients(sums, slerp_alpha, slerp_normalize_eps, slerp_dot_threshold), ops)


@register("merge", "ties", kernel="ties", numpy_seconds_per_gb=4.9, fused=True)
def ties(ys, *, weight_list, normalize, ties_elect_type, ops):
    """TIES: keep the entries whose sign agrees with the elected sign, sum (or disjoint mean)."""
    weighted = [y * ops.float32(w) for y, w in zip(ys, weight_list)]
    votes = ops.zeros_like(weighted[0])
    for u in weighted:
        votes += u if ties_elect_type == "sum" else ops.sign(u)
    positive = votes >= 0
    total = ops.zeros_like(weighted[0])
    divisor = ops.zeros_like(weighted[0]) if normalize else None
    for u, w in zip(weighted, weight_list):
        agrees = ops.where(positive, u > 0, u < 0)
        total += ops.where(agrees, u, 0.0)
        if divisor is not None:
            divisor += ops.where(agrees, ops.float32(w), ops.float32(0.0))
    if divisor is not None:
        total = ops.divide(total, ops.where(divisor == 0, ops.float32(1.0), divisor))
    return total
