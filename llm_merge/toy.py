"""Deterministic toy Llama-shaped checkpoint families (numpy + ml_dtypes, no torch).

A family is ``out_dir/base`` plus ``out_dir/ft1 .. ftN``; every member is an HF-layout
checkpoint directory (safetensors shard(s), optional index, ``config.json``,
``generation_config.json``, ``tokenizer_config.json``). Fine-tunes are ``base + delta``
where delta is a low-rank (rank 4-8) plus sparse (~1% of entries) perturbation, partly
shared between fine-tunes so that merge methods have something to agree on.

Files are produced one shard at a time: only the current shard's tensors (base and one
fine-tune) are ever in memory, so families far larger than RAM can be generated.
Every tensor is seeded from ``(seed, tensor index, model index)``, so the values do not
depend on the sharding.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

__all__ = [
    "DTYPES",
    "llama_tensor_shapes",
    "count_params",
    "family_size_for_params",
    "make_family",
]

DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}

INIT_STD = 0.02  # Llama initializer_range
NORM_STD = 0.02  # spread of the base model's RMSNorm weights around 1
SPARSE_FRACTION = 0.01
SPARSE_SCALE = 3.0  # sparse entries are spikier than the low-rank part
SHARED_RANK = 4
LOW_RANK_RANGE = (4, 8)  # inclusive range of each fine-tune's own rank
SHARED_WEIGHT = OWN_WEIGHT = math.sqrt(0.5)

Shape = tuple[int, ...]


def llama_tensor_shapes(
    *, hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int
) -> list[tuple[str, Shape]]:
    """Names and HF ``[out, in]`` shapes of a Llama checkpoint, in canonical order."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")
    kv_dim = hidden // heads * kv_heads
    shapes: list[tuple[str, Shape]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv_dim, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv_dim, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.mlp.gate_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.up_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, intermediate)),
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def count_params(
    *, hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int
) -> int:
    """Number of parameters of the Llama model described by the arguments."""
    shapes = llama_tensor_shapes(
        hidden=hidden, intermediate=intermediate, layers=layers,
        vocab=vocab, heads=heads, kv_heads=kv_heads,
    )
    return sum(math.prod(s) for _, s in shapes)


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def _dims_for_hidden(hidden: int) -> dict:
    """Llama-proportioned head counts and MLP width for a given hidden size."""
    head_dim = 128 if hidden >= 1024 else min(64, hidden)
    heads = hidden // head_dim
    kv_heads = max(1, heads // 4)
    while heads % kv_heads:
        kv_heads -= 1
    intermediate = _round_up(hidden * 8 / 3, 256 if hidden >= 1024 else 32)
    return dict(hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads)


def family_size_for_params(target_params: int, vocab: int = 32000) -> dict:
    """Llama-proportioned sizes giving about ``target_params`` parameters per model.

    Picks the widest hidden size (from a Llama-like ladder) that still leaves at least
    ``hidden / 128`` layers, then the layer count closest to the target.
    E.g. ``5e8 -> hidden 1536, intermediate 4096, layers 16, heads 12, kv_heads 3``.
    Returns a dict with keys hidden, intermediate, layers, vocab, heads, kv_heads.
    """
    target = int(target_params)
    ladder = [64, 128, 256, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192]
    best = None
    for hidden in ladder:
        dims = _dims_for_hidden(hidden)
        fixed = count_params(**dims, layers=0, vocab=vocab)
        per_layer = count_params(**dims, layers=1, vocab=vocab) - fixed
        layers = max(1, round((target - fixed) / per_layer))
        if best is None or layers >= hidden / 128:
            best = dict(dims, layers=layers, vocab=vocab)
        else:
            break
    assert best is not None
    return best


def _plan_shards(shapes: list[tuple[str, Shape]], itemsize: int,
                 max_shard_bytes: int | None) -> list[list[int]]:
    """Greedy grouping of tensor indices into shards of at most ``max_shard_bytes``."""
    if max_shard_bytes is None:
        return [list(range(len(shapes)))]
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(shapes):
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _rng(seed: int, tensor_idx: int, stream: int) -> np.random.Generator:
    """Independent generator per (tensor, stream); stream 0 = base, 1 = shared, k+1 = ftk."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(tensor_idx, stream)))


def _base_tensor(shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """Base weights: N(0, 0.02) matrices, RMSNorm vectors near 1 (float32)."""
    w = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:
        return 1.0 + np.float32(NORM_STD) * w
    return np.float32(INIT_STD) * w


def _unit_direction(shape: Shape, rng: np.random.Generator, rank: int) -> np.ndarray:
    """Unit-variance random direction: a rank-``rank`` product for matrices, dense for vectors."""
    if len(shape) == 1:
        return rng.standard_normal(shape, dtype=np.float32)
    a = rng.standard_normal((shape[0], rank), dtype=np.float32)
    b = rng.standard_normal((rank, shape[1]), dtype=np.float32)
    a *= np.float32(1.0 / math.sqrt(rank))
    return a @ b


def _delta(shape: Shape, base_std: float, shared: np.ndarray,
           rng: np.random.Generator, delta_scale: float) -> np.ndarray:
    """Fine-tuning delta: shared + own low-rank direction plus ~1% sparse spikes."""
    rank = int(rng.integers(LOW_RANK_RANGE[0], LOW_RANK_RANGE[1] + 1))
    d = _unit_direction(shape, rng, rank)
    d *= np.float32(OWN_WEIGHT)
    d += np.float32(SHARED_WEIGHT) * shared
    if len(shape) > 1:
        flat = d.reshape(-1)
        n_sparse = max(1, int(flat.size * SPARSE_FRACTION))
        idx = rng.integers(0, flat.size, n_sparse)
        flat[idx] += np.float32(SPARSE_SCALE) * rng.standard_normal(n_sparse, dtype=np.float32)
    d *= np.float32(delta_scale * base_std)
    return d


def _shard_names(prefix: str, n_shards: int) -> list[str]:
    if n_shards == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


def _save(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Write one safetensors file (world-readable, like HF checkpoints)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)


def _write_side_files(model_dir: Path, config: dict) -> None:
    """config.json, generation_config.json and tokenizer_config.json."""
    generation = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                  "pad_token_id": 0}
    tokenizer = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                 "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
                 "model_max_length": config["max_position_embeddings"],
                 "add_bos_token": True, "add_eos_token": False}
    for name, content in [("config.json", config), ("generation_config.json", generation),
                          ("tokenizer_config.json", tokenizer)]:
        (model_dir / name).write_text(json.dumps(content, indent=2) + "\n")


def make_family(
    out_dir: str | Path,
    *,
    n_models: int = 3,
    hidden: int = 64,
    intermediate: int = 172,
    layers: int = 2,
    vocab: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    dtype: str = "bfloat16",
    prefix: str = "model",
    max_shard_bytes: int | None = None,
    seed: int = 0,
    delta_scale: float = 0.01,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write a base model and ``n_models`` fine-tunes of it under ``out_dir``.

    Creates ``out_dir/base`` and ``out_dir/ft1 .. ftN`` (HF Llama layout, safetensors
    in ``dtype``; sharded with an index file when ``max_shard_bytes`` splits the model).
    Fine-tune deltas have a std of roughly ``delta_scale`` times the base tensor's std
    (times 1 for the RMSNorm vectors). ``progress`` is called with a short message
    after each shard. Deterministic in ``seed``; existing files are overwritten.

    Returns a dict with ``base`` (path), ``fine_tunes`` (paths), ``model_dirs``
    (base first), ``files`` (shard file names), ``config``, ``n_params`` and
    ``bytes_per_model`` (sum of tensor bytes of one model).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if n_models < 1:
        raise ValueError("n_models must be >= 1")
    np_dtype = DTYPES[dtype]
    shapes = llama_tensor_shapes(hidden=hidden, intermediate=intermediate, layers=layers,
                                 vocab=vocab, heads=heads, kv_heads=kv_heads)
    shards = _plan_shards(shapes, np_dtype.itemsize, max_shard_bytes)
    files = _shard_names(prefix, len(shards))

    out = Path(out_dir)
    dirs = [out / name for name in ["base"] + [f"ft{k}" for k in range(1, n_models + 1)]]
    config = _llama_config(hidden, intermediate, layers, vocab, heads, kv_heads, dtype)
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob(f"{prefix}*.safetensors*"):
            stale.unlink()
        _write_side_files(d, config)
    for shard_no, (file, idxs) in enumerate(zip(files, shards), 1):
        _write_shard(dirs, file, [shapes[i] for i in idxs], idxs, np_dtype, seed, delta_scale)
        if progress is not None:
            progress(f"shard {shard_no}/{len(shards)} written for {len(dirs)} models")

    n_params = sum(math.prod(s) for _, s in shapes)
    bytes_per_model = n_params * np_dtype.itemsize
    if len(shards) > 1:
        index = {"metadata": {"total_size": bytes_per_model},
                 "weight_map": {shapes[i][0]: file
                                for file, idxs in zip(files, shards) for i in idxs}}
        for d in dirs:
            (d / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    return {
        "base": str(dirs[0]),
        "fine_tunes": [str(d) for d in dirs[1:]],
        "model_dirs": [str(d) for d in dirs],
        "files": files,
        "config": config,
        "n_params": n_params,
        "bytes_per_model": bytes_per_model,
    }


def _llama_config(hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int, dtype: str) -> dict:
    """config.json of the toy family (Hugging Face Llama)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "initializer_range": INIT_STD, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": dtype, "dtype": dtype,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "use_cache": True,
    }


def _write_shard(dirs: list[Path], file: str, shard_shapes: list, idxs: list[int], np_dtype, seed: int,
                 delta_scale: float) -> None:
    """One shard file of the base (``dirs[0]``) and of every fine-tune: base tensors, then base + delta."""
    base: dict[str, np.ndarray] = {}
    base_std: dict[str, float] = {}
    for i, (name, shape) in zip(idxs, shard_shapes):
        w = _base_tensor(shape, _rng(seed, i, 0)).astype(np_dtype)
        base[name] = w
        base_std[name] = 1.0 if len(shape) == 1 else float(w.astype(np.float32).std())
    _save(base, dirs[0] / file)
    shared = {name: _unit_direction(shape, _rng(seed, i, 1), SHARED_RANK) for i, (name, shape) in zip(idxs, shard_shapes)}
    for k, model_dir in enumerate(dirs[1:], 1):
        ft = {}
        for i, (name, shape) in zip(idxs, shard_shapes):
            delta = _delta(shape, base_std[name], shared[name], _rng(seed, i, 1 + k), delta_scale)
            delta += base[name].astype(np.float32)
            ft[name] = delta.astype(np_dtype)
            del delta
        _save(ft, model_dir / file)
        del ft
