"""mergekit's other merge methods: task arithmetic, Model Stock, NuSLERP, passthrough.

Same contract as ``sparsify.py`` / ``merge.py``: float32 chunks in, a new chunk
out; whole-tensor statistics come from a registered ``prepare`` (one model's full
task vector) or ``reduce`` (additive sums over the chunks). Compiled, task_arithmetic
runs as the fused linear pass with its weights as coefficients, and model_stock and
nuslerp over whole tensors (not filter_wise / row-wise) with coefficients from the
streamed Gram sums (kernel ``gram``); the others run through the generic NumPy path.
"""

from __future__ import annotations

import math

import numpy as np

from llm_merge.methods.merge import gram_entry, gram_sums, weighted_sum
from llm_merge.methods.registry import register


def _task_arithmetic_coefficients(reduced: dict, options: dict) -> list[float]:
    """task_arithmetic in the fused pass: the linear merge with the weights as coefficients, never normalized."""
    return list(options["weight_list"])


@register("merge", "task_arithmetic", kernel="linear", numpy_seconds_per_gb=0.6, fused=True,
          fused_coefficients=_task_arithmetic_coefficients)
def task_arithmetic(ys, *, weight_list, ops):
    """Task arithmetic: Σ w_i·t_i, never normalized (``scale``, mergekit's lambda, is applied by the engine)."""
    return weighted_sum(ys, weight_list, ops)


def vector_groups(start: int, count: int, shape: tuple[int, ...], mode: str):
    """Which vector each element of a chunk belongs to: (ids, how many), or None for the whole tensor.

    ``mode``: "tensor" (one vector), "last" (vectors along the last dimension, one per row),
    "first" (vectors along dimension 0, as mergekit's transpose(0, -1)).
    """
    if mode == "tensor" or len(shape) < 2:
        return None
    index = np.arange(start, start + count, dtype=np.int64)
    numel = math.prod(shape)
    if mode == "last":
        return index // shape[-1], numel // shape[-1]
    inner = numel // shape[0]
    return index % inner, inner


def _pairwise(ys, groups, ops) -> tuple:
    """The inputs' Gram entries <y_i, y_j> for every pair i <= j, row by row of the upper triangle (the order of
    ``merge.gram_sums`` and kernel ``gram``): scalars, or one per vector group."""
    if groups is None:
        return gram_sums(ys, ops=ops)["sums"]
    pairs = [(i, j) for i in range(len(ys)) for j in range(i, len(ys))]
    ids, count = groups
    xs = [ops.to_numpy(y).astype(np.float64) for y in ys]
    return tuple(np.bincount(ids, weights=xs[i] * xs[j], minlength=count) for i, j in pairs)


def _combine(ys, coefficients, groups, ops):
    """Σ c_k · y_k with scalar coefficients, or one coefficient per vector group."""
    if groups is None:
        return weighted_sum(ys, coefficients, ops)
    ids, _ = groups
    xs = [ops.to_numpy(y) for y in ys]
    total = xs[0] * np.asarray(coefficients[0], np.float32)[ids]
    for x, c in zip(xs[1:], coefficients[1:]):
        total += x * np.asarray(c, np.float32)[ids]
    return ops.from_numpy(total)


def _model_stock_mode(model_stock_filter_wise: bool) -> str:
    return "last" if model_stock_filter_wise else "tensor"


def model_stock_sums(ys, *, model_stock_filter_wise, start, shape, ops):
    """The task vectors' Gram entries (``_pairwise``): whole tensor, or per row with filter_wise."""
    return {"sums": _pairwise(ys, vector_groups(start, ys[0].size, shape, _model_stock_mode(model_stock_filter_wise)), ops)}


def model_stock_ratio(sums, count: int):
    """Model Stock's t = N·cos / (1 + (N−1)·cos), cos the mean pairwise cosine of the task vectors (0 when singular),
    from their Gram entries (``_pairwise``)."""
    norms = [np.sqrt(np.asarray(gram_entry(sums, count, i, i), np.float64)) for i in range(count)]
    cosines = [np.clip(gram_entry(sums, count, i, j) / np.maximum(norms[i] * norms[j], 1e-6), -1.0, 1.0)
               for i in range(count) for j in range(i + 1, count)]
    cos = sum(cosines) / len(cosines)
    denominator = 1 + (count - 1) * cos
    singular = np.abs(denominator) < 1e-6
    return np.where(singular, 0.0, count * cos / np.where(singular, 1.0, denominator))


def _model_stock_coefficients(reduced: dict, options: dict) -> list[float]:
    """model_stock over the whole tensor in the fused pass: every task vector times t / N."""
    count = len(options["weight_list"])
    t = float(model_stock_ratio(reduced["sums"], count) / count)
    return [t] * count


@register("merge", "model_stock", reduce=model_stock_sums, produces=("sums",), kernel="gram",
          numpy_seconds_per_gb=1.6, fused=True,
          fused_if=lambda options: not options["model_stock_filter_wise"], fused_coefficients=_model_stock_coefficients)
def model_stock(ys, *, sums, model_stock_filter_wise, start, shape, ops):
    """Model Stock: t·mean(t_i) (the engine adds the base: t·mean(x_i) + (1−t)·b); t per tensor or per row."""
    t = model_stock_ratio(sums, len(ys)) / len(ys)
    groups = vector_groups(start, ys[0].size, shape, _model_stock_mode(model_stock_filter_wise))
    return _combine(ys, [t if groups is not None else float(t)] * len(ys), groups, ops)


def _nuslerp_mode(nuslerp_flatten: bool, nuslerp_row_wise: bool) -> str:
    return "tensor" if nuslerp_flatten else "first" if nuslerp_row_wise else "last"


def nuslerp_sums(ys, *, nuslerp_flatten, nuslerp_row_wise, start, shape, ops):
    """Squared norms and dot of the two inputs: whole tensor, or per row / per column."""
    return {"sums": _pairwise(ys, vector_groups(start, ys[0].size, shape, _nuslerp_mode(nuslerp_flatten, nuslerp_row_wise)), ops)}


def nuslerp_coefficients(sums, weight_list):
    """mergekit nuslerp: t = w_1/(w_0+w_1) (0.5 when that sum is ~0); coefficients of y_0 and y_1 (per vector)."""
    total = weight_list[0] + weight_list[1]
    t = 0.5 if abs(total) < 1e-6 else weight_list[1] / total
    sq0, dot, sq1 = (np.asarray(v, np.float64) for v in sums[:3])  # the Gram entries (``_pairwise``)
    cosine = np.clip(dot / (np.maximum(np.sqrt(sq0), 1e-7) * np.maximum(np.sqrt(sq1), 1e-7)), -1.0, 1.0)
    colinear = 1 - cosine * cosine <= 1e-16
    theta = np.arccos(np.where(colinear, 0.0, cosine))
    sin_theta = np.where(colinear, 1.0, np.sin(theta))
    c0 = np.where(colinear, 1.0 - t, np.sin((1.0 - t) * theta) / sin_theta)
    c1 = np.where(colinear, t, np.sin(t * theta) / sin_theta)
    return c0, c1


def _nuslerp_coefficients(reduced: dict, options: dict) -> list[float]:
    """nuslerp over the whole tensor (nuslerp_flatten) in the fused pass: the two coefficients."""
    c0, c1 = nuslerp_coefficients(reduced["sums"], options["weight_list"])
    return [float(c0), float(c1)]


@register("merge", "nuslerp", reduce=nuslerp_sums, produces=("sums",), inputs=2, kernel="gram",
          numpy_seconds_per_gb=1.3, fused=True,
          fused_if=lambda options: options["nuslerp_flatten"], fused_coefficients=_nuslerp_coefficients)
def nuslerp(ys, *, sums, weight_list, nuslerp_flatten, nuslerp_row_wise, start, shape, ops):
    """NuSLERP, t from the two weights: over the whole tensor, or per row (per column with nuslerp_row_wise)."""
    groups = vector_groups(start, ys[0].size, shape, _nuslerp_mode(nuslerp_flatten, nuslerp_row_wise))
    c0, c1 = nuslerp_coefficients(sums, weight_list)
    if groups is None:
        c0, c1 = float(c0), float(c1)
    return _combine(ys, [c0, c1], groups, ops)


@register("merge", "passthrough")
def passthrough(ys, *, ops):
    """The single model's tensor as is (times ``scale``, applied by the engine)."""
    return ys[0] * ops.float32(1.0)
