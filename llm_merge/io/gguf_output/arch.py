"""Architectures: a Hugging Face ``config.json`` -> the GGUF architecture, its hyperparameters and tensor names.

As llama.cpp's ``convert_hf_to_gguf.py`` does: Llama and Mistral become the ``llama``
architecture, whose Q and K projections are permuted from Hugging Face's rotary layout
(halves) back to llama.cpp's (interleaved pairs), head by head; Qwen2 and Qwen3 keep theirs.
Tensor names come from the ``gguf`` package's name map; Llama-3 rope scaling becomes a
``rope_freqs.weight`` tensor of per-frequency factors, linear and YaRN scaling become keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from llm_merge.errors import MergeError

#: Hugging Face architecture -> (gguf MODEL_ARCH member, Q/K permuted for llama.cpp's rotary layout).
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
}

#: config.json ``model_type`` -> architecture, for configs without ``architectures``.
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}

#: Tensors llama.cpp recomputes, left out of the file (as its converter does).
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")

#: Rope scaling types written as keys (``llama3`` becomes a tensor instead).
_SCALING_KEYS = {"linear": "LINEAR", "yarn": "YARN"}


@dataclass(frozen=True)
class Architecture:
    """What the GGUF file needs to know about the output model's architecture."""

    hf_name: str
    member: str  # gguf.MODEL_ARCH member name, e.g. "LLAMA"
    permute_qk: bool
    n_layers: int
    n_head: int
    n_head_kv: int
    head_dim: int
    config: dict


def architecture_of(gguf: Any, config: dict, where: str) -> Architecture:
    """The Architecture of a config.json (``where`` names it); MergeError naming the supported ones otherwise."""
    names = config.get("architectures")
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else MODEL_TYPES.get(config.get("model_type"))
    supported = ", ".join(ARCHITECTURES)
    if name not in ARCHITECTURES:
        found = name or config.get("model_type")
        raise MergeError(f"--output_format gguf: {where} architecture {found!r} is not supported; supported: {supported}")
    member, permute = ARCHITECTURES[name]
    if not hasattr(gguf.MODEL_ARCH, member):
        raise MergeError(f"--output_format gguf: {name} needs a gguf package that knows {member.lower()}; "
                         "upgrade it: pip install -U gguf")
    n_head = _int(config, "num_attention_heads", where)
    n_head_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or _int(config, "hidden_size", where) // n_head
    return Architecture(name, member, permute, _int(config, "num_hidden_layers", where), n_head, int(n_head_kv),
                        int(head_dim), config)


def _int(config: dict, key: str, where: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise MergeError(f"--output_format gguf: {where} has {key} {value!r}; a positive integer is needed")
    return value


def tensor_name_map(gguf: Any, arch: Architecture) -> Any:
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.member), arch.n_layers)


def gguf_name(name_map: Any, name: str) -> Optional[str]:
    """The GGUF name of a checkpoint tensor; None for tensors llama.cpp does not want, "" when unknown."""
    if name.endswith(SKIPPED_SUFFIXES):
        return None
    return name_map.get_name(key=name, try_suffixes=(".weight", ".bias")) or ""


def permuted_heads(arch: Architecture, name: str) -> int:
    """How many heads a tensor's rows are permuted by (llama's Q and K), 0 when it is written as is."""
    if not arch.permute_qk:
        return 0
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return arch.n_head
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return arch.n_head_kv
    return 0


def permute_rows(rows: np.ndarray, heads_in_block: int) -> np.ndarray:
    """Hugging Face's rotary halves -> llama.cpp's interleaved pairs, for whole heads of rows.

    ``rows`` holds ``heads_in_block`` heads (head_dim rows each); within each head, row a·(d/2) + b
    moves to row 2b + a: the converter's ``reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``.
    """
    shape = rows.shape
    return rows.reshape(heads_in_block, 2, shape[0] // heads_in_block // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rope_scaling(config: dict) -> dict:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    return scaling if isinstance(scaling, dict) else {}


def _rope_type(config: dict) -> str:
    scaling = _rope_scaling(config)
    return str(scaling.get("rope_type") or scaling.get("type") or "default").lower()


def check_rope(arch: Architecture, where: str) -> None:
    """MergeError for a rope scaling llama.cpp's converter does not write for this architecture."""
    kind = _rope_type(arch.config)
    allowed = ("default", *_SCALING_KEYS, *(("llama3",) if arch.member == "LLAMA" else ()))
    if kind not in allowed:
        raise MergeError(f"--output_format gguf: {where} rope scaling {kind!r} is not supported for {arch.hf_name}; "
                         f"supported: {', '.join(allowed)}")


def add_hyperparameters(writer: Any, gguf: Any, arch: Architecture, vocab_rows: int) -> None:
    """The architecture's keys: sizes, heads, rope and norm settings, from config.json."""
    config = arch.config
    writer.add_block_count(arch.n_layers)
    if isinstance(config.get("max_position_embeddings"), int):
        writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    if isinstance(config.get("intermediate_size"), int):
        writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(arch.n_head)
    writer.add_head_count_kv(arch.n_head_kv)
    scaling = _rope_scaling(config)
    writer.add_rope_freq_base(float(config.get("rope_theta") or scaling.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if config.get("head_dim"):
        writer.add_key_length(arch.head_dim)
        writer.add_value_length(arch.head_dim)
    writer.add_vocab_size(vocab_rows)
    writer.add_rope_dimension_count(arch.head_dim)
    kind = _rope_type(config)
    if kind in _SCALING_KEYS and "factor" in scaling:
        writer.add_rope_scaling_type(getattr(gguf.RopeScalingType, _SCALING_KEYS[kind]))
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if kind == "yarn" and "original_max_position_embeddings" in scaling:
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))


def generated_tensors(arch: Architecture) -> list[tuple[str, np.ndarray]]:
    """Tensors made from config.json: Llama-3's ``rope_freqs.weight`` (the converter's formula), else none."""
    if _rope_type(arch.config) != "llama3":
        return []
    scaling = _rope_scaling(arch.config)
    base = float(arch.config.get("rope_theta") or scaling.get("rope_theta") or 10000.0)
    dim = arch.head_dim
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(scaling.get("factor", 8.0))
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", arch.config.get("original_max_position_embeddings", 8192)))
    low_wavelength, high_wavelength = old_context / low_freq_factor, old_context / high_freq_factor
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < high_wavelength:
            factors.append(1.0)
        elif wavelength > low_wavelength:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", np.asarray(factors, dtype=np.float32))]
