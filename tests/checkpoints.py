"""Helpers to write / read tiny safetensors checkpoints for the tests.

The safetensors files are written by hand (8-byte little-endian header length,
JSON header, raw row-major data) so that the tests do not depend on the code
under test; they are read back with safetensors.numpy (bf16 -> ml_dtypes).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file

_ST_DTYPE = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file by hand."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    blobs = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _ST_DTYPE[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * ((8 - len(hjson) % 8) % 8)  # pad header to 8-byte alignment
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def shard_name(prefix: str, i: int, n: int) -> str:
    return f"{prefix}-{i:05d}-of-{n:05d}.safetensors"


def write_checkpoint(dir, tensors: dict, prefix: str = "model", shards: int = 1,
                     extra_files: bool = True, tag: str = "") -> Path:
    """Write `tensors` as {prefix}.safetensors or an index + `shards` shard files."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards <= 1:
        write_safetensors(d / f"{prefix}.safetensors", tensors, {"format": "np"})
    else:
        groups = np.array_split(np.arange(len(names)), shards)
        weight_map = {}
        total = 0
        for gi, idx in enumerate(groups, start=1):
            fname = shard_name(prefix, gi, shards)
            part = {names[j]: tensors[names[j]] for j in idx}
            write_safetensors(d / fname, part, {"format": "np"})
            for k, v in part.items():
                weight_map[k] = fname
                total += v.nbytes
        with open(d / f"{prefix}.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if extra_files:
        (d / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 40,
            "num_hidden_layers": 2, "vocab_size": 64, "model_tag": tag}, indent=2))
        (d / "generation_config.json").write_text(json.dumps({"max_length": 8, "model_tag": tag}))
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8, "model_tag": tag}))
        (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "model_tag": tag}))
    return d


def read_checkpoint(dir, prefix: str = "model") -> dict:
    """Read {prefix}.safetensors.index.json (+ shards) or {prefix}.safetensors."""
    d = Path(dir)
    idx = d / f"{prefix}.safetensors.index.json"
    out = {}
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        for fname in sorted(set(wm.values())):
            out.update(load_file(str(d / fname)))
        missing = set(wm) - set(out)
        assert not missing, f"tensors in weight_map but not in shards: {missing}"
    else:
        out.update(load_file(str(d / f"{prefix}.safetensors")))
    return out


# ---------------------------------------------------------------------------
# Tiny Llama-shaped family
# ---------------------------------------------------------------------------
def llama_shapes(hidden=16, inter=40, vocab=64, layers=2):
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for l in range(layers):
        p = f"model.layers.{l}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


INT_TENSOR = "model.position_ids"
# identical in every fine-tune and in the base -> all task vectors are 0
FROZEN_TENSOR = "model.layers.0.input_layernorm.weight"
# fine-tune i delta = (i+1) * delta_0 -> colinear task vectors (slerp lerp branch)
COLINEAR_TENSOR = "model.layers.1.input_layernorm.weight"


@dataclass
class Family:
    base_dir: Path
    model_dirs: list
    base: dict
    models: list
    prefix: str = "model"
    dtype: object = np.float32
    extra: dict = field(default_factory=dict)


def make_llama_family(tmp, n_models=2, dtype=np.float32, prefix="model", shards=1, seed=0,
                      base_shards=None) -> Family:
    """Base + n_models fine-tunes (base + small random deltas with exact zeros and sign
    conflicts).  Tensors are returned already cast to `dtype` (as stored on disk)."""
    tmp = Path(tmp)
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    shapes = llama_shapes()
    base32 = {}
    for name, shp in shapes.items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            base32[name] = (1.0 + 0.1 * rng.standard_normal(shp)).astype(np.float32)
        else:
            w = (0.05 * rng.standard_normal(shp)).astype(np.float32)
            w.reshape(-1)[::11] = 0.0  # exact zeros in the weights themselves
            base32[name] = w
    base = {k: v.astype(dtype) for k, v in base32.items()}
    base[INT_TENSOR] = np.arange(8, dtype=np.int64).reshape(1, 8)

    deltas0 = {name: (0.01 * rng.standard_normal(shp)).astype(np.float32) for name, shp in shapes.items()}
    models = []
    for i in range(n_models):
        m = {}
        for name, shp in shapes.items():
            if name == FROZEN_TENSOR:
                d = np.zeros(shp, np.float32)
            elif name == COLINEAR_TENSOR:
                d = (i + 1) * deltas0[name]
            else:
                d = (0.01 * rng.standard_normal(shp)).astype(np.float32)
                flat = d.reshape(-1)
                n = flat.size
                # sign conflicts: on every 5th entry, odd models take the negation of delta_0
                conflict = np.arange(n) % 5 == 1
                flat[conflict] = deltas0[name].reshape(-1)[conflict] * (1 if i % 2 == 0 else -1)
                # shared-sign, different magnitude entries
                same = np.arange(n) % 5 == 3
                flat[same] = np.abs(deltas0[name].reshape(-1)[same]) * (1 + i)
                # exact zero deltas: a model-dependent subset
                flat[(np.arange(n) + i) % 7 == 0] = 0.0
                # ties in magnitude (for trim threshold ties / magprune rank ties)
                flat[np.arange(n) % 13 == 2] = 0.015
                # exact zero weights (x == 0): on those entries the fine-tune is 0
            x = base32[name] + d
            if name not in (FROZEN_TENSOR, COLINEAR_TENSOR) and not name.endswith("norm.weight"):
                x.reshape(-1)[(np.arange(x.size) + 3 * i) % 17 == 0] = 0.0
            m[name] = x.astype(dtype)
        m[INT_TENSOR] = np.arange(8, dtype=np.int64).reshape(1, 8)
        models.append(m)

    base_dir = write_checkpoint(tmp / "base", base, prefix=prefix,
                                shards=shards if base_shards is None else base_shards, tag="base")
    model_dirs = [write_checkpoint(tmp / f"ft{i}", m, prefix=prefix, shards=shards, tag=f"ft{i}")
                  for i, m in enumerate(models)]
    # use the on-disk (possibly bf16-rounded) values as the ground truth
    return Family(base_dir=base_dir, model_dirs=model_dirs, base=base, models=models,
                  prefix=prefix, dtype=dtype)
