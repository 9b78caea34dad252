"""Line-by-line NumPy ports of mergekit's karcher and arcee_fusion (mergekit/merge_methods/karcher.py,
arcee_fusion.py), in float32 as mergekit runs them in a float32 recipe. Independent of llm_merge.

arcee_fusion's quantiles are mergekit's exact branch (sorted[floor(q·(n−1))], tensors of at most 1,000,000
entries); mergekit samples larger ones at random."""

import numpy as np


def karcher_merge_tensors(tensors, alphas, max_iter=10, tol=1e-5):
    if len(tensors) == 1:
        return tensors[0]
    tensors = [np.asarray(t, np.float32) for t in tensors]
    norms, units = [], []
    for tensor in tensors:
        norm = np.float32(np.linalg.norm(tensor.ravel()))
        norms.append(norm)
        units.append(np.zeros_like(tensor) if norm == 0.0 else (tensor / norm).astype(np.float32))
    valid_indices = [idx for idx, norm in enumerate(norms) if norm > tol]
    if not valid_indices:
        return sum(tensor * 0 for tensor in tensors)
    valid_alphas = [alphas[idx] for idx in valid_indices]
    alpha_sum = sum(valid_alphas)
    normalized_alphas = [alpha / alpha_sum for alpha in valid_alphas]
    valid_units = [units[idx] for idx in valid_indices]
    mean = np.zeros_like(valid_units[0])
    for alpha, unit in zip(normalized_alphas, valid_units):
        mean += np.float32(alpha) * unit
    mean_norm = np.float32(np.linalg.norm(mean.ravel()))
    mean = valid_units[0].copy() if mean_norm < tol else (mean / mean_norm).astype(np.float32)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for alpha, unit in zip(normalized_alphas, valid_units):
            dot = np.clip(np.dot(mean.ravel(), unit.ravel()), -1.0, 1.0).astype(np.float32)
            theta = np.arccos(dot)
            if theta < tol:
                continue
            tangent += (np.float32(alpha) * (theta / np.sin(theta)) * (unit - dot * mean)).astype(np.float32)
        tangent_norm = np.float32(np.linalg.norm(tangent.ravel()))
        if tangent_norm < tol:
            break
        mean = (np.cos(tangent_norm) * mean + np.sin(tangent_norm) * (tangent / tangent_norm)).astype(np.float32)
        unit_norm = np.float32(np.linalg.norm(mean.ravel()))
        if unit_norm > tol:
            mean = (mean / unit_norm).astype(np.float32)
    scale = sum(np.float32(alpha) * norm for alpha, norm in zip(alphas, norms))
    return (np.float32(scale) * mean).astype(np.float32)


def karcher(tensors, max_iter=10, tol=1e-5):
    """The registered method: every entry (a recipe's base included) with weight 1/N."""
    if len(tensors) == 1:
        return tensors[0]
    return karcher_merge_tensors(tensors, [1.0 / len(tensors)] * len(tensors), max_iter, tol)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def compute_importance(params, base):
    diff = np.abs(params - base)
    eps = np.float32(1e-8)
    p = _softmax(params) + eps
    q = _softmax(base) + eps
    kl_div = np.sum(p * np.log(p / q), axis=-1, keepdims=True, dtype=np.float32)
    return (diff * kl_div).astype(np.float32)


def approximate_quantiles(tensor, q):
    flat = np.sort(tensor.reshape(-1))
    indices = (np.asarray(q, np.float32) * np.float32(flat.size - 1)).astype(np.int64)
    return flat[indices]


def arcee_fusion(base, model):
    base = np.asarray(base, np.float32)
    model = np.asarray(model, np.float32)
    importance = compute_importance(model, base)
    q1, median, q3 = approximate_quantiles(importance, [0.25, 0.5, 0.75])
    threshold = median + np.float32(1.5) * (q3 - q1)
    mask = (importance >= threshold).astype(np.float32)
    return base + (model - base) * mask
