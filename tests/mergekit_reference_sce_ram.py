"""Line-by-line NumPy ports of mergekit's sce, ram and ramplus_tl (mergekit/merge_methods/sce.py, ram.py), in
float32 as mergekit runs them in a float32 recipe. Independent of llm_merge.

torch.var of float32 accumulates in float64 (checked against torch 2.x: bit-identical), so the port does too.
torch.topk leaves the order of tied variances unspecified; the port takes them in index order, the last kept
(a stable argsort), which is llm_merge's documented choice."""

import numpy as np


def sce_mask(tvs, density):
    if density <= 0:
        return np.zeros(tvs.shape[1:], np.float32)
    if density >= 1:
        return np.ones(tvs.shape[1:], np.float32)
    wide = tvs.astype(np.float64)
    var = ((wide - wide.mean(axis=0)) ** 2).mean(axis=0).astype(np.float32)
    nonzero = np.count_nonzero(var)
    k = int(np.float32(nonzero) * np.float32(density))
    if k == 0:
        return np.zeros(var.shape, np.float32)
    order = np.argsort(np.abs(var).ravel(), kind="stable")
    mask = np.zeros(var.size, np.float32)
    mask[order[var.size - k:]] = 1
    return mask.reshape(var.shape)


def sign_consensus_mask(delta):
    """mergekit get_mask(method="sum")."""
    sign = np.sign(delta)
    sign_weight = delta[0].copy()
    for d in delta[1:]:
        sign_weight += d
    majority_sign = (sign_weight >= 0).astype(np.float32) * 2 - 1
    return sign == majority_sign


def sce_weight(tvs):
    weights = np.asarray([np.mean(np.square(t).astype(np.float64)) for t in tvs], np.float32)
    weight_sum = float(np.sum(weights, dtype=np.float32))
    if abs(weight_sum) < 1e-6:
        return np.ones_like(weights) / np.float32(weights.shape[0])
    return weights / np.float32(weight_sum)


def sce_merge(tensors, base_tensor, select_topk=1.0):
    if not tensors:
        return base_tensor
    task_vectors = np.stack([t - base_tensor for t in tensors], axis=0).astype(np.float32)
    if select_topk < 1:
        task_vectors = task_vectors * sce_mask(task_vectors, select_topk)[None]
    erase_mask = sign_consensus_mask(task_vectors)
    tv_weights = sce_weight(task_vectors).reshape((-1,) + (1,) * (task_vectors.ndim - 1))
    erased_weights = tv_weights * erase_mask
    merged_tv = (task_vectors * erased_weights)[0].copy()
    for part in (task_vectors * erased_weights)[1:]:
        merged_tv += part
    divisor = erased_weights[0].copy()
    for part in erased_weights[1:]:
        divisor += part
    return base_tensor + merged_tv / np.maximum(divisor, np.float32(1e-6))


def _prepare_ram_vectors(tensors, base_tensor, epsilon):
    tv_flat = np.stack([t - base_tensor for t in tensors], axis=0).reshape(len(tensors), -1).astype(np.float32)
    nonzero_mask = np.abs(tv_flat) > np.float32(epsilon)
    contrib_counts = nonzero_mask.sum(axis=0, keepdims=True)
    return tv_flat, nonzero_mask, contrib_counts, contrib_counts > 1, contrib_counts == 1


def _summed(rows):
    total = rows[0].copy()
    for row in rows[1:]:
        total += row
    return total


def ram_merge(tensors, base_tensor, epsilon=1e-5):
    tv_flat, nonzero_mask, counts, overlap_mask, unique_mask = _prepare_ram_vectors(tensors, base_tensor, epsilon)
    tv_z = tv_flat * nonzero_mask
    merged = _summed((tv_z * unique_mask) + (tv_z * overlap_mask / np.maximum(counts, 1).astype(np.float32)))
    return base_tensor + merged.reshape(base_tensor.shape)


def ramplus_tl_merge(tensors, base_tensor, r=0.1, alpha=0.2, epsilon=1e-5):
    tv_flat, nonzero_mask, counts, overlap_mask, unique_mask = _prepare_ram_vectors(tensors, base_tensor, epsilon)
    shared_counts = (nonzero_mask & overlap_mask).sum(axis=1).astype(np.float32)
    unique_counts = (nonzero_mask & unique_mask).sum(axis=1).astype(np.float32)
    rho = shared_counts / np.maximum(unique_counts, np.float32(epsilon))
    lambda_ = np.float32(1) + np.float32(r) * np.clip(rho, np.float32(0), np.float32(alpha))
    tv_z = tv_flat * nonzero_mask
    merged = _summed((tv_z * unique_mask * lambda_[:, None])
                     + (tv_z * overlap_mask / np.maximum(counts, 1).astype(np.float32)))
    return base_tensor + merged.reshape(base_tensor.shape)
