"""Independent reference implementation of the llm_merge math.

Written only from the written spec (not from the package code) so that the
end-to-end tests can compare the CLI output against it.  Clarity over speed:
everything is float32 numpy unless the spec says float64.
"""
from __future__ import annotations

import hashlib
import math

import ml_dtypes
import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
TWO53 = 1 << 53

# merge_method -> (sparsify_type, merge_type)
METHOD_TABLE = {
    "linear": ("none", "linear"),
    "slerp": ("none", "slerp"),
    "ties": ("trim", "ties"),
    "della": ("magprune", "ties"),
    "della_linear": ("magprune", "linear"),
    "dare_linear": ("dare", "linear"),
    "dare_ties": ("dare", "ties"),
}

DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}


# ---------------------------------------------------------------------------
# Counter-based randomness
# ---------------------------------------------------------------------------
def rng_key(seed: int, tensor_name: str, model_index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{tensor_name}:{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def random_bits53(key: int, n: int) -> np.ndarray:
    """(z >> 11) for flat element indices j = 0..n-1 (vectorised, uint64 wrap-around)."""
    with np.errstate(over="ignore"):
        j1 = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(key) + j1 * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
        z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(11)


def random_bits53_scalar(key: int, j: int) -> int:
    """Plain-Python version of one element of random_bits53 (used to self-check)."""
    z = (key + (j + 1) * GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    z = z ^ (z >> 31)
    return z >> 11


def keep_threshold(keep_prob) -> np.ndarray:
    """floor(keep_prob * 2^53), clipped to [0, 2^53], as uint64 (scalar or array)."""
    kp = np.clip(np.asarray(keep_prob, dtype=np.float64), 0.0, 1.0)
    return np.floor(kp * float(TWO53)).astype(np.uint64)


def keep_mask(keep_prob, shape, *, seed: int, tensor_name: str, model_index: int) -> np.ndarray:
    """Boolean mask of kept entries; keep_prob scalar or array (flat, row-major)."""
    n = int(np.prod(shape, dtype=np.int64))
    bits = random_bits53(rng_key(seed, tensor_name, model_index), n)
    thr = keep_threshold(keep_prob)
    if thr.ndim:
        thr = thr.reshape(-1)
    return (bits < thr).reshape(shape)


# ---------------------------------------------------------------------------
# Sparsification (per tensor, per model)
# ---------------------------------------------------------------------------
def dare_mask(shape, p, *, seed, tensor_name, model_index):
    return keep_mask(float(p), shape, seed=seed, tensor_name=tensor_name, model_index=model_index)


def dare(t, p, *, rescale=True, seed=42, tensor_name="", model_index=0):
    t = np.asarray(t, dtype=np.float32)
    mask = dare_mask(t.shape, p, seed=seed, tensor_name=tensor_name, model_index=model_index)
    out = np.where(mask, t, np.float32(0))
    if rescale:
        out = np.where(mask, out / np.float32(p), np.float32(0)).astype(np.float32)
    return out.astype(np.float32)


def trim(t, p, *, rescale=True):
    t = np.asarray(t, dtype=np.float32)
    n = t.size
    k = math.ceil(round(p * n, 6))
    a = np.abs(t)
    if k <= 0 or n == 0:
        return np.zeros_like(t)
    k = min(k, n)
    threshold = np.sort(a.reshape(-1))[::-1][k - 1]  # k-th largest |t|
    mask = a >= threshold
    out = np.where(mask, t, np.float32(0)).astype(np.float32)
    if rescale:
        total = np.abs(t).astype(np.float64).sum()
        kept = np.abs(out).astype(np.float64).sum()
        factor = 1.0 if kept == 0 else total / kept
        out = (out.astype(np.float64) * factor).astype(np.float32)
    return out


def magprune_keep_probs(t, p, epsilon):
    """Per-entry keep probability keep_r (float64, same shape as t)."""
    a = np.abs(np.asarray(t, dtype=np.float32)).reshape(-1)
    n = a.size
    ascending = np.sort(a)
    above = np.searchsorted(ascending, a, side="right")  # entries <= each one
    equal = above - np.searchsorted(ascending, a, side="left")
    rank = (n - above) + (equal - 1) / 2.0  # midrank: rank 0 = largest, equal |t| share the mean rank
    q = (1.0 - p) - epsilon / 2.0 + epsilon * rank / n
    return (1.0 - q).reshape(np.shape(t))


def magprune(t, p, epsilon, *, rescale=True, seed=42, tensor_name="", model_index=0):
    t = np.asarray(t, dtype=np.float32)
    keep = magprune_keep_probs(t, p, epsilon)
    mask = keep_mask(keep, t.shape, seed=seed, tensor_name=tensor_name, model_index=model_index)
    out = np.where(mask, t, np.float32(0)).astype(np.float32)
    if rescale:
        keep32 = keep.astype(np.float32)
        safe = np.where(mask, keep32, np.float32(1))
        out = np.where(mask, out / safe, np.float32(0)).astype(np.float32)
    return out


# ---------------------------------------------------------------------------
# Merges
# ---------------------------------------------------------------------------
def linear(ys, weights, *, normalize=True):
    acc = np.zeros_like(np.asarray(ys[0], dtype=np.float32))
    for y, w in zip(ys, weights):
        acc = acc + np.float32(w) * np.asarray(y, dtype=np.float32)
    if normalize:
        acc = acc / np.float32(sum(float(w) for w in weights))
    return acc.astype(np.float32)


def slerp(y0, y1, t=0.5, *, eps=1e-8, dot_threshold=0.9995):
    y0 = np.asarray(y0, dtype=np.float32)
    y1 = np.asarray(y1, dtype=np.float32)
    n0 = math.sqrt(float(np.sum(y0.astype(np.float64) ** 2)))
    n1 = math.sqrt(float(np.sum(y1.astype(np.float64) ** 2)))
    u0 = y0.astype(np.float64) / n0 if n0 >= eps else y0.astype(np.float64)
    u1 = y1.astype(np.float64) / n1 if n1 >= eps else y1.astype(np.float64)
    d = float(np.clip(np.sum(u0 * u1), -1.0, 1.0))
    if abs(d) > dot_threshold:
        return ((1.0 - t) * y0.astype(np.float64) + t * y1.astype(np.float64)).astype(np.float32)
    theta = math.acos(d)
    s = math.sin(theta)
    c0 = math.sin((1.0 - t) * theta) / s
    c1 = math.sin(t * theta) / s
    return (c0 * y0.astype(np.float64) + c1 * y1.astype(np.float64)).astype(np.float32)


def ties(ys, weights, *, normalize=True, elect_type="sum"):
    us = [np.float32(w) * np.asarray(y, dtype=np.float32) for y, w in zip(ys, weights)]
    if elect_type == "sum":
        total = np.zeros_like(us[0])
        for u in us:
            total = total + u
    elif elect_type == "count":
        total = np.zeros_like(us[0])
        for u in us:
            total = total + np.sign(u)
    else:
        raise ValueError(elect_type)
    elected = np.where(total >= 0, np.float32(1), np.float32(-1))  # a 0 sum counts as +1
    result = np.zeros_like(us[0])
    wsum = np.zeros_like(us[0])
    for u, w in zip(us, weights):
        m = (np.sign(u) == elected) & (u != 0)
        result = result + np.where(m, u, np.float32(0))
        wsum = wsum + np.where(m, np.float32(w), np.float32(0))
    if normalize:
        result = result / np.where(wsum == 0, np.float32(1), wsum)
    return result.astype(np.float32)


# ---------------------------------------------------------------------------
# Dtype helpers
# ---------------------------------------------------------------------------
def is_float_dtype(dt) -> bool:
    dt = np.dtype(dt)
    return dt == np.dtype(ml_dtypes.bfloat16) or np.issubdtype(dt, np.floating)


def cast_output(x32: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(x32, dtype=np.float32).astype(np.dtype(dtype))


# ---------------------------------------------------------------------------
# Full merge
# ---------------------------------------------------------------------------
def merge_tensor(name, xs, b, *, merge_method, weights, normalize, reserve_p, epsilon, rescale,
                 ties_elect_type, slerp_alpha, slerp_normalize_eps, slerp_dot_threshold, seed):
    sparsify_type, merge_type = METHOD_TABLE[merge_method]
    xs32 = [np.asarray(x).astype(np.float32) for x in xs]
    if b is not None:
        b32 = np.asarray(b).astype(np.float32)
        ts = [x - b32 for x in xs32]
    else:
        b32 = None
        ts = xs32
    ys = []
    for i, t in enumerate(ts):
        if sparsify_type == "none":
            y = t
        elif sparsify_type == "dare":
            y = dare(t, reserve_p, rescale=rescale, seed=seed, tensor_name=name, model_index=i)
        elif sparsify_type == "trim":
            y = trim(t, reserve_p, rescale=rescale)
        elif sparsify_type == "magprune":
            y = magprune(t, reserve_p, epsilon, rescale=rescale, seed=seed, tensor_name=name, model_index=i)
        else:
            raise ValueError(sparsify_type)
        ys.append(y)
    if merge_type == "linear":
        m = linear(ys, weights, normalize=normalize)
    elif merge_type == "slerp":
        assert len(ys) == 2, "slerp needs exactly two models"
        m = slerp(ys[0], ys[1], slerp_alpha, eps=slerp_normalize_eps, dot_threshold=slerp_dot_threshold)
    elif merge_type == "ties":
        m = ties(ys, weights, normalize=normalize, elect_type=ties_elect_type)
    else:
        raise ValueError(merge_type)
    if b32 is not None:
        m = (b32 + m).astype(np.float32)
    return m


def reference_merge(models, base=None, *, merge_method, weight_list=None, normalize=True,
                    reserve_p=0.7, epsilon=0.14, rescale=True, ties_elect_type="sum",
                    slerp_alpha=0.5, slerp_normalize_eps=1e-8, slerp_dot_threshold=0.9995,
                    seed=42, output_dtype=None):
    """Merge a list of {name: array} dicts (plus optional base) exactly as the spec says."""
    weights = [1.0] * len(models) if weight_list is None else [float(w) for w in weight_list]
    assert len(weights) == len(models)
    out = {}
    for name, first in models[0].items():
        first = np.asarray(first)
        if not is_float_dtype(first.dtype):
            out[name] = first.copy()
            continue
        xs = [m[name] for m in models]
        b = None if base is None else base[name]
        m32 = merge_tensor(
            name, xs, b, merge_method=merge_method, weights=weights, normalize=normalize,
            reserve_p=reserve_p, epsilon=epsilon, rescale=rescale, ties_elect_type=ties_elect_type,
            slerp_alpha=slerp_alpha, slerp_normalize_eps=slerp_normalize_eps,
            slerp_dot_threshold=slerp_dot_threshold, seed=seed)
        dt = first.dtype if output_dtype is None else DTYPES[output_dtype]
        out[name] = cast_output(m32, dt)
    return out


# ---------------------------------------------------------------------------
# Comparison helper
# ---------------------------------------------------------------------------
def _ordered_int(bits: np.ndarray, nbits: int) -> np.ndarray:
    """Map IEEE bit patterns to integers that are monotone in the float value."""
    b = bits.astype(np.int64)
    sign = 1 << (nbits - 1)
    return np.where(b & sign, -(b & (sign - 1)), b)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in units-in-the-last-place between two same-dtype 16-bit float arrays."""
    assert a.dtype == b.dtype and a.dtype.itemsize == 2
    ia = _ordered_int(a.view(np.uint16), 16)
    ib = _ordered_int(b.view(np.uint16), 16)
    return np.abs(ia - ib)


def compare_tensor(name, out: np.ndarray, ref: np.ndarray):
    """Return None if `out` matches `ref` within tolerance, else a description."""
    if out.shape != ref.shape:
        return f"{name}: shape {out.shape} != {ref.shape}"
    if out.dtype != ref.dtype:
        return f"{name}: dtype {out.dtype} != {ref.dtype}"
    if not is_float_dtype(ref.dtype):
        if not np.array_equal(out, ref):
            return f"{name}: integer tensor differs"
        return None
    o32 = out.astype(np.float32)
    r32 = ref.astype(np.float32)
    maxdiff = float(np.max(np.abs(o32 - r32))) if o32.size else 0.0
    if ref.dtype.itemsize == 2:
        d = ulp_distance(out, ref)
        bad = int(np.sum(d > 1))
        if bad:
            return f"{name}: {bad}/{ref.size} entries differ by >1 ulp ({ref.dtype}), max abs diff {maxdiff:.6g}"
        return None
    if not np.allclose(o32, r32, rtol=1e-5, atol=1e-6):
        bad = int(np.sum(~np.isclose(o32, r32, rtol=1e-5, atol=1e-6)))
        return f"{name}: {bad}/{ref.size} entries outside rtol 1e-5/atol 1e-6, max abs diff {maxdiff:.6g}"
    return None
