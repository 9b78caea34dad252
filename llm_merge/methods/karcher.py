"""mergekit's karcher merge (mergekit/merge_methods/karcher.py): the Karcher mean on the unit hypersphere.

mergekit merges every input with equal weights α = 1/N (a recipe's base_model is one more input, not a
base: karcher has no task vectors), over the whole flattened tensors: n_i = ‖x_i‖, u_i = x_i / n_i (zero
when n_i = 0); inputs with n_i ≤ tol take no part in the mean (none left: the result is zero). Starting
from the normalized mean of the u_i (the first valid u_i when that mean is shorter than tol), it iterates
at most ``karcher_max_iter`` times: tangent = Σ a_i·θ_i/sin θ_i·(u_i − cos θ_i·mean) over the inputs with
θ_i = arccos⟨mean, u_i⟩ ≥ tol (a_i the weights renormalized over the valid inputs); stop when
‖tangent‖ < tol, else mean ← cos‖tangent‖·mean + sin‖tangent‖·tangent/‖tangent‖, renormalized. The
result is (Σ α_i n_i)·mean.

Every iterate lies in the span of the u_i, so the iteration runs on coefficients: mean = Σ c_i u_i, with
the inner products from the Gram matrix G_ij = ⟨x_i, x_j⟩ (float64 sums from the reduce pass), and the
apply pass is Σ (scale·c_i / n_i)·x_i chunk by chunk (compiled: the Gram sums stream and the fused linear pass
applies the coefficients, kernel ``gram``). Memory: the chunk buffers and an N×N matrix.
mergekit's result differs by float rounding only (it iterates on float32 tensors).
"""

from __future__ import annotations

import math

import numpy as np

from llm_merge.methods.registry import register
from llm_merge.methods.merge import gram_matrix, gram_sums, weighted_sum


def karcher_coefficients(sums, count: int, karcher_max_iter: int, karcher_tol: float) -> list[float]:
    """The c_i of result = Σ c_i x_i, from the upper-triangle Gram entries ``sums`` of ``count`` inputs."""
    if count == 1:
        return [1.0]
    gram = gram_matrix(sums, count)
    tol = karcher_tol
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    alphas = np.full(count, 1.0 / count)
    valid = [i for i in range(count) if norms[i] > tol]
    if not valid:
        return [0.0] * count
    n_valid = norms[valid]
    units = gram[np.ix_(valid, valid)] / np.outer(n_valid, n_valid)  # ⟨u_i, u_j⟩ of the valid inputs
    weights = alphas[valid] / alphas[valid].sum()

    def length(c: np.ndarray) -> float:
        return math.sqrt(max(float(c @ units @ c), 0.0))

    mean = weights.copy()  # mean = Σ mean[i]·u_valid[i]
    mean_norm = length(mean)
    if mean_norm < tol:
        mean = np.zeros(len(valid))
        mean[0] = 1.0
    else:
        mean = mean / mean_norm
    for _ in range(karcher_max_iter):
        dots = np.clip(units @ mean, -1.0, 1.0)
        tangent = np.zeros(len(valid))
        for i, (weight, dot) in enumerate(zip(weights, dots)):
            theta = math.acos(dot)
            if theta < tol:
                continue
            step = weight * theta / math.sin(theta)
            tangent -= step * dot * mean
            tangent[i] += step
        tangent_norm = length(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = length(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = float(alphas @ norms)
    coefficients = [0.0] * count
    for slot, i in enumerate(valid):
        coefficients[i] = scale * float(mean[slot]) / float(norms[i])
    return coefficients


def _fused_coefficients(reduced: dict, options: dict) -> list[float]:
    """karcher in the fused pass: a linear merge (not normalized) with its coefficients."""
    count = len(options["weight_list"])
    return karcher_coefficients(reduced["sums"], count, options["karcher_max_iter"], options["karcher_tol"])


@register("merge", "karcher", reduce=gram_sums, produces=("sums",), kernel="gram", numpy_seconds_per_gb=2.5, fused=True,
          fused_coefficients=_fused_coefficients)
def karcher(ys, *, sums, karcher_max_iter, karcher_tol, ops):
    """mergekit karcher: the equal-weight Karcher mean direction of the whole tensors, times their mean norm."""
    return weighted_sum(ys, karcher_coefficients(sums, len(ys), karcher_max_iter, karcher_tol), ops)
