"""mergekit's other methods: task arithmetic, breadcrumbs, Model Stock, NuSLERP, passthrough.

Same contract as ``sparsify.py`` / ``merge.py``: float32 chunks in, a new chunk
out; whole-tensor statistics come from a registered ``prepare`` (one model's full
task vector) or ``reduce`` (additive sums over the chunks). No compiled kernels:
the engine runs these through the generic NumPy path.
"""

from __future__ import annotations

import math

from llm_merge.methods.registry import register

#: mergekit's tolerance below which an L1 rescale is skipped (sparsify.rescaled_masked_tensor).
RESCALE_EPS = 1e-7


@register("merge", "task_arithmetic")
def task_arithmetic(ys, *, weight_list, ops):
    """Task arithmetic: Σ w_i·t_i, never normalized (``scale``, mergekit's lambda, is applied by the engine)."""
    total = ys[0] * ops.float32(weight_list[0])
    for y, w in zip(ys[1:], weight_list[1:]):
        total += y * ops.float32(w)
    return total


def breadcrumbs_counts(reserve_p: float, gamma: float, numel: int) -> tuple[int, int]:
    """(n_top, n_keep) as mergekit's magnitude_outliers: n_keep = ⌊p·n⌋ entries kept after dropping the n_top largest.

    n_top = ⌊gamma·n⌋, reduced so that n_keep entries remain (mergekit: n_bot = max(0, n - n_keep - n_top)).
    """
    n_keep = int(round(reserve_p * numel, 6) // 1)
    n_top = int(round(gamma * numel, 6) // 1)
    n_top = min(n_top, numel - n_keep)
    return n_top, n_keep


def breadcrumbs_thresholds(t, *, reserve_p, gamma, rescale, ops):
    """Magnitude band [low, high] of the kept entries, and the L1 rescale factor."""
    n = t.size
    if reserve_p >= 1.0 or n == 0:
        return {"threshold": (0.0, math.inf), "scale": 1.0}
    n_top, n_keep = breadcrumbs_counts(reserve_p, gamma, n)
    if n_keep == 0:
        return {"threshold": (math.inf, -math.inf), "scale": 1.0}
    magnitude = ops.abs(t)
    high = ops.kth_largest(magnitude, n_top + 1)
    low = ops.kth_largest(magnitude, n_top + n_keep)
    scale = 1.0
    if rescale:
        before = ops.sum64(magnitude)
        after = ops.sum64(ops.where((magnitude >= low) & (magnitude <= high), magnitude, 0.0))
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            scale = before / after
    return {"threshold": (float(low), float(high)), "scale": scale}


@register("sparsify", "breadcrumbs", prepare=breadcrumbs_thresholds)
def breadcrumbs(t, *, threshold, scale, ops):
    """Model Breadcrumbs: drop the gamma fraction of largest |t| and keep the next reserve_p fraction (ties at a bound kept)."""
    low, high = threshold
    magnitude = ops.abs(t)
    kept = ops.where((magnitude >= low) & (magnitude <= high), t, 0.0)
    return kept * ops.float32(scale) if scale != 1.0 else kept


def pairwise_sums(ys, *, ops):
    """Squared norms of every input, then the dot products of every pair (i < j), as additive sums."""
    norms = tuple(ops.dot64(y, y) for y in ys)
    dots = tuple(ops.dot64(ys[i], ys[j]) for i in range(len(ys)) for j in range(i + 1, len(ys)))
    return {"sums": norms + dots}


def model_stock_ratio(sums, count: int) -> float:
    """Model Stock's t = N·cos / (1 + (N−1)·cos), cos the mean pairwise cosine of the task vectors (0 when singular)."""
    norms = [math.sqrt(s) for s in sums[:count]]
    cosines, k = [], count
    for i in range(count):
        for j in range(i + 1, count):
            cosine = sums[k] / max(norms[i] * norms[j], 1e-6)
            cosines.append(min(1.0, max(-1.0, cosine)))
            k += 1
    cos = sum(cosines) / len(cosines)
    denominator = 1 + (count - 1) * cos
    return 0.0 if abs(denominator) < 1e-6 else count * cos / denominator


@register("merge", "model_stock", reduce=pairwise_sums)
def model_stock(ys, *, sums, ops):
    """Model Stock: t·mean(t_i) (the engine adds the base: t·mean(x_i) + (1−t)·b)."""
    t = model_stock_ratio(sums, len(ys))
    total = ops.zeros_like(ys[0])
    for y in ys:
        total += y
    return total * ops.float32(t / len(ys))


def nuslerp_coefficients(sums, weight_list) -> tuple[float, float]:
    """mergekit nuslerp (flattened): t = w_1/(w_0+w_1) (0.5 when that sum is ~0), coefficients of y_0 and y_1."""
    total = weight_list[0] + weight_list[1]
    t = 0.5 if abs(total) < 1e-6 else weight_list[1] / total
    sq0, sq1, dot = sums[0], sums[1], sums[2]
    cosine = dot / (max(math.sqrt(sq0), 1e-7) * max(math.sqrt(sq1), 1e-7))
    cosine = min(1.0, max(-1.0, cosine))
    if 1 - cosine * cosine <= 1e-16:
        return 1.0 - t, t
    theta = math.acos(cosine)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


@register("merge", "nuslerp", reduce=pairwise_sums)
def nuslerp(ys, *, sums, weight_list, ops):
    """NuSLERP over the whole (flattened) tensor, t from the two weights."""
    c0, c1 = nuslerp_coefficients(sums, weight_list)
    total = ys[0] * ops.float32(c0)
    total += ys[1] * ops.float32(c1)
    return total


@register("merge", "passthrough")
def passthrough(ys, *, ops):
    """The single model's tensor as is (times ``scale``, applied by the engine)."""
    return ys[0] * ops.float32(1.0)
