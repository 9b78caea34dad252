#!/usr/bin/env python
"""Time ``build_plan`` on 70B-sized checkpoints (Llama-3-70B shapes, bf16, ~30 shards of 5 GB each).

The checkpoints are header-only: every shard is its safetensors header followed by a
hole made with ftruncate, so no tensor data is written (sparse files, a few MB on disk).
Planning reads headers and config.json only; it must take well under a second.

    python benchmarks/bench_plan.py [--models 3] [--base] [--layers 80] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_merge.config.options import MergeConfig
from llm_merge.config.validate import resolve  # noqa: E402
from llm_merge.io.safetensors_format import encode_header  # noqa: E402
from llm_merge.plan.build import build_plan  # noqa: E402

BUDGET_S = 1.0


def llama70b_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    hidden, inter, vocab, kv = 8192, 28672, 128256, 1024
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_sparse_checkpoint(directory: Path, shapes: dict[str, tuple[int, ...]], shard_bytes: int = 5 * 10**9) -> int:
    """A sharded bf16 checkpoint of headers and holes; returns its apparent size in bytes."""
    directory.mkdir(parents=True)
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for index, names in enumerate(groups):
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        entries, offset = {}, 0
        for name in names:
            nbytes = math.prod(shapes[name]) * 2
            entries[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        header = encode_header(entries, {"format": "pt"})
        with open(directory / file, "wb") as handle:
            handle.write(header)
            handle.truncate(len(header) + offset)  # a hole: no data is written
        total += offset
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "tie_word_embeddings": False}))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=3, help="fine-tunes to merge (default 3)")
    parser.add_argument("--no_base", action="store_true", help="no base model (default: a base too)")
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    shapes = llama70b_shapes(args.layers)
    with tempfile.TemporaryDirectory(prefix="bench_plan-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        names = [f"ft{i}" for i in range(args.models)] + ([] if args.no_base else ["base"])
        apparent = sum(write_sparse_checkpoint(root / name, shapes) for name in names)
        made = time.perf_counter() - started
        cfg = resolve(MergeConfig(
            merge_method="dare_ties", model_path_list=[str(root / f"ft{i}") for i in range(args.models)],
            base_model_path=None if args.no_base else str(root / "base"), output_path=str(root / "out"),
        ))
        times, plan = [], None
        for _ in range(args.repeat):
            started = time.perf_counter()
            plan = build_plan(cfg)
            times.append(time.perf_counter() - started)
        entries = len(shapes) * len(names)
        print(f"{len(names)} checkpoint(s) of {len(shapes)} tensors ({entries} tensor entries, "
              f"{len({t.file for c in (*plan.models, *([plan.base] if plan.base else [])) for t in c.tensors.values()})} shard files, "
              f"{apparent / 1e12:.2f} TB apparent, {made:.2f} s to create)")
        print(f"build_plan: {len(plan.tasks)} tasks, {len(plan.shards)} output shards; "
              f"best {min(times):.3f} s, median {statistics.median(times):.3f} s over {args.repeat} runs")
        ok = min(times) < BUDGET_S
        print(f"{'OK' if ok else 'TOO SLOW'}: budget {BUDGET_S:.1f} s")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
