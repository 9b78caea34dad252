#!/usr/bin/env python
"""Add the inputs the tokenizer and LoRA recipes of this directory use to a toy family.

    python tools/mergekit_recipes/extra_inputs.py FAMILY

FAMILY is a float32 family from ``tools/make_toy_models.py`` (one ``model.safetensors`` per model).

``FAMILY/lora_ft1``: a PEFT LoRA adapter (r 8, alpha 16) on q_proj, v_proj, up_proj and down_proj of
every layer, with random factors, for ``MODEL+FAMILY/lora_ft1`` references.

``FAMILY/tok_base``, ``tok_ft1`` and ``tok_ft2``: copies of base, ft1 and ft2 with a WordLevel
``tokenizer.json`` each, and embedding / lm_head rows that follow their tokens:

* tok_base: ``<s>``, ``t1`` .. ``t{V-1}`` (V the family's vocabulary size);
* tok_ft1: the same plus the plain tokens ``x1``, ``x2``;
* tok_ft2: the base tokens in another order, plus ``y1`` and the special token ``<x>``.

A token keeps the row its base id had (so merges stay meaningful), new tokens get small random rows.
Each model's ``tokenizer_config.json`` has its own chat template (tok_ft1 and tok_ft2 share one, so
``chat_template: auto`` has a majority). Uses only NumPy, so it runs in mergekit's venv as well.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def read_f32(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise SystemExit(f"{path}: {name} is {info['dtype']}; make the family with --dtype float32")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + start : 8 + n + end], np.float32).reshape(info["shape"])
    return out


def write_f32(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        blob = np.ascontiguousarray(tensors[name], np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def tokenizer_json(tokens: list[str], special: list[str]) -> dict:
    return {"version": "1.0", "truncation": None, "padding": None, "normalizer": None,
            "added_tokens": [{"id": tokens.index(t), "content": t, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True} for t in special],
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}, "unk_token": "<s>"}}


LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")


def write_lora(family: Path, rank: int = 8, alpha: int = 16) -> None:
    """A PEFT adapter for ft1: lora_A [r, in] and lora_B [out, r] per targeted linear layer."""
    rng = np.random.default_rng(11)
    target = family / "lora_ft1"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    weights = read_f32(family / "ft1" / "model.safetensors")
    factors = {}
    for name, w in weights.items():
        module = name.removesuffix(".weight")
        if any(module.endswith(t) for t in LORA_TARGETS):
            root = f"base_model.model.{module}"
            factors[f"{root}.lora_A.weight"] = (0.05 * rng.standard_normal((rank, w.shape[1]))).astype(np.float32)
            factors[f"{root}.lora_B.weight"] = (0.05 * rng.standard_normal((w.shape[0], rank))).astype(np.float32)
    write_f32(target / "adapter_model.safetensors", factors)
    (target / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "target_modules": [t.split(".")[1] for t in LORA_TARGETS],
        "base_model_name_or_path": str((family / "ft1").resolve())}, indent=2))


def main(family: Path) -> None:
    write_lora(family)
    rng = np.random.default_rng(7)
    size = json.loads((family / "base" / "config.json").read_text())["vocab_size"]
    base_tokens = ["<s>"] + [f"t{i}" for i in range(1, size)]
    shuffled = base_tokens[1:]
    rng.shuffle(shuffled)
    variants = {"base": (base_tokens, ["<s>"], "A"), "ft1": (base_tokens + ["x1", "x2"], ["<s>"], "B"),
                "ft2": (["<s>"] + shuffled + ["y1", "<x>"], ["<s>", "<x>"], "B")}
    for name, (tokens, special, template) in variants.items():
        source, target = family / name, family / f"tok_{name}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        tensors = read_f32(source / "model.safetensors")
        for key in VOCAB_TENSORS:
            old = tensors[key]
            tensors[key] = np.stack([old[base_tokens.index(t)] if t in base_tokens
                                     else rng.standard_normal(old.shape[1]).astype(np.float32) * 0.02 for t in tokens])
        write_f32(target / "model.safetensors", tensors)
        config = json.loads((target / "config.json").read_text())
        config["vocab_size"] = len(tokens)
        (target / "config.json").write_text(json.dumps(config, indent=2))
        (target / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokens, special)))
        (target / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
            "chat_template": f"{{{{ '{template}:' }}}}{{% for m in messages %}}{{{{ m['content'] }}}}{{% endfor %}}"}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
