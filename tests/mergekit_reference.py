"""mergekit 0.1.5's generalized task arithmetic, ported line by line to NumPy for the tests.

Source: mergekit/sparsify.py and mergekit/merge_methods/generalized_task_arithmetic.py
(torch -> numpy; float64 sums). Random masks are drawn with the counter-based streams
of ``reference.keep_mask`` (the spec's draws), so results are exact, not statistical.
"""
from __future__ import annotations

import numpy as np

import reference as R

EPS = 1e-7


def rescaled(t: np.ndarray, mask: np.ndarray, rescale: bool) -> np.ndarray:
    masked = t * mask
    if not rescale:
        return masked
    before, after = np.abs(t).sum(dtype=np.float64), np.abs(masked).sum(dtype=np.float64)
    if before < EPS or after < EPS:
        return masked
    return masked * np.float32(before / after)


def magnitude(t: np.ndarray, density: float, rescale: bool) -> np.ndarray:
    if density >= 1:
        return t
    k = max(1, int(density * t.size))
    order = np.argsort(np.abs(t).ravel(), kind="stable")  # ties in index order (torch leaves them unspecified)
    mask = np.zeros(t.size, np.float32)
    mask[order[t.size - k:]] = 1
    return rescaled(t, mask.reshape(t.shape), rescale)


def magnitude_outliers(t: np.ndarray, density: float, gamma: float, rescale: bool) -> np.ndarray:
    if density >= 1:
        return t
    n = t.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = np.argsort(np.abs(t).ravel(), kind="stable")
    mask = np.zeros(n, np.float32)
    mask[order[n_bot:n_bot + target]] = 1
    return rescaled(t, mask.reshape(t.shape), rescale)


def bernoulli(t, density, rescale, *, seed, name, index):
    if density >= 1:
        return t
    mask = R.keep_mask(density, t.shape, seed=seed, tensor_name=name, model_index=index).astype(np.float32)
    return rescaled(t, mask, rescale)


def della_probs(t: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """Keep probabilities: ranks of |t| along dim 1 (1-D: one row), (density - eps) + rank_norm * 2 eps."""
    x = t.reshape(1, -1, 1) if t.ndim < 2 else t.reshape(t.shape[0], t.shape[1], -1)
    size = np.abs(x)
    smaller = (size[:, None, :, :] < size[:, :, None, :]).sum(axis=2)  # per entry: smaller ones in its row
    equal = (size[:, None, :, :] == size[:, :, None, :]).sum(axis=2)
    midranks = smaller + (equal - 1) / 2.0  # ascending; equal |t| share the mean of their ranks
    length = x.shape[1]
    norm = midranks / (length - 1) if length > 1 else np.full(x.shape, 0.5)
    return ((density - epsilon) + norm * 2 * epsilon).astype(np.float32).reshape(t.shape)


def della(t, density, epsilon, rescale, *, seed, name, index):
    if density >= 1:
        return t
    probs = della_probs(t, density, epsilon)
    mask = R.keep_mask(probs, t.shape, seed=seed, tensor_name=name, model_index=index).astype(np.float32)
    return rescaled(t, mask, rescale)


SPARSIFY = {"task_arithmetic": None, "ties": "magnitude", "dare_ties": "random", "dare_linear": "random",
            "breadcrumbs": "outliers", "breadcrumbs_ties": "outliers", "della": "della", "della_linear": "della"}
CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}


def gta(name, models, base, *, method, weights, density, normalize, rescale, lam=1.0, epsilon=0.15, gamma=0.01, seed=42):
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group for one tensor (float32)."""
    base = base.astype(np.float32)
    deltas = []
    for i, m in enumerate(models):
        d = m.astype(np.float32) - base
        kind = SPARSIFY[method]
        p = density[i]
        if kind == "magnitude":
            d = magnitude(d, p, rescale)
        elif kind == "random":
            d = bernoulli(d, p, rescale, seed=seed, name=name, index=i)
        elif kind == "outliers":
            d = magnitude_outliers(d, p, gamma, rescale)
        elif kind == "della":
            d = della(d, p, epsilon, rescale, seed=seed, name=name, index=i)
        deltas.append(d * np.float32(weights[i]))
    deltas = np.stack(deltas)
    w = np.array(weights, np.float32).reshape((-1,) + (1,) * base.ndim)
    if method in CONSENSUS:
        sign = np.sign(deltas)
        majority = np.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
        mask = (sign == majority).astype(np.float32)
        mixed = (deltas * mask).sum(axis=0)
        divisor = (w * mask).sum(axis=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(axis=0)
        divisor = np.full(base.shape, w.sum(), np.float32)
        divisor[np.abs(divisor) < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * np.float32(lam)
    return base + mixed
