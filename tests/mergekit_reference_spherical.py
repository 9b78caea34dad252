"""Line-by-line NumPy ports of mergekit's nearswap and multislerp (mergekit/merge_methods/nearswap.py,
multislerp.py), in float32 as mergekit runs them in a float32 recipe. Independent of llm_merge."""

import numpy as np


def nearswap(t, v0, v1):
    """v0: the base's tensor, v1: the other model's."""
    lweight = np.abs(v0 - v1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lweight = np.float32(t) / lweight
    lweight = np.nan_to_num(lweight, nan=1.0, posinf=1.0, neginf=1.0)
    lweight = np.clip(lweight, 0.0, 1.0)
    return lweight * v1 + (1 - lweight) * v0


def multislerp(tensors, weight, base_tensor=None, normalize_weights=True, eps=1e-8):
    if len(tensors) == 1:
        return tensors[0]
    tensors = np.stack(tensors, axis=0).astype(np.float32)
    if base_tensor is not None:
        tensors -= base_tensor
    tensors_flat = tensors.reshape(tensors.shape[0], -1)
    weights = np.asarray(weight, np.float32)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = np.linalg.norm(tensors_flat, axis=-1, keepdims=True).astype(np.float32)
    unit_tensors = tensors_flat / (norms + np.float32(eps))
    mean = (unit_tensors * weights.reshape(-1, 1)).sum(0)
    mean_norm = np.linalg.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] == 2:
            res = (tensors[0] * weights[0] + tensors[1] * weights[1]).reshape(tensors.shape[1:])
            return res + base_tensor if base_tensor is not None else res
        raise ValueError("The weighted sum of the input tensors is zero.")
    mean = mean / mean_norm
    dots = (unit_tensors * mean).sum(-1, keepdims=True)
    tangent_vectors = unit_tensors - dots * mean
    tangent_result = (tangent_vectors * weights.reshape(-1, 1)).sum(0)
    tangent_norm = np.linalg.norm(tangent_result) + np.float32(eps)
    result = mean * np.cos(tangent_norm) + tangent_result * (np.sin(tangent_norm) / tangent_norm)
    avg_norm = (norms.squeeze(-1) * weights).sum()
    result = (result * avg_norm).reshape(tensors.shape[1:])
    return result + base_tensor if base_tensor is not None else result
