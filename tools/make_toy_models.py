#!/usr/bin/env python
"""Generate a toy Llama-shaped checkpoint family (base + fine-tunes) for tests and benchmarks.

Examples:
    python tools/make_toy_models.py /tmp/toy                       # tiny, a few MB, < 5 s
    python tools/make_toy_models.py /tmp/toy05b --params 5e8 --shard_size_mb 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import llm_merge  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_merge.toy import DTYPES, family_size_for_params, make_family  # noqa: E402

TINY = dict(hidden=128, intermediate=352, layers=2, vocab=1024, heads=4, kv_heads=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="directory to create base/ and ft1..ftN/ in")
    p.add_argument("--n_models", type=int, default=3, help="number of fine-tunes (default: 3)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="tensor dtype (default: bfloat16)")
    p.add_argument("--prefix", default="model",
                   help="safetensors file prefix, e.g. 'model' -> model.safetensors (default: model)")
    p.add_argument("--params", type=float, default=None,
                   help="target params per model, e.g. 5e8; picks Llama-proportioned sizes "
                        "with vocab 32000 (explicit size flags below override its choices)")
    p.add_argument("--hidden", type=int, help=f"hidden size (default: {TINY['hidden']})")
    p.add_argument("--intermediate", type=int,
                   help=f"MLP intermediate size (default: {TINY['intermediate']})")
    p.add_argument("--layers", type=int, help=f"number of layers (default: {TINY['layers']})")
    p.add_argument("--vocab", type=int, help=f"vocabulary size (default: {TINY['vocab']})")
    p.add_argument("--heads", type=int, help=f"attention heads (default: {TINY['heads']})")
    p.add_argument("--kv_heads", type=int, help=f"key/value heads (default: {TINY['kv_heads']})")
    p.add_argument("--shard_size_mb", type=float, default=None,
                   help="max shard size in MB (1e6 bytes); unset = one file per model "
                        "(default: unset)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--delta_scale", type=float, default=0.01,
                   help="fine-tune delta std relative to the base tensor std (default: 0.01)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = family_size_for_params(int(args.params)) if args.params else dict(TINY)
    for key in TINY:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    max_shard = int(args.shard_size_mb * 1e6) if args.shard_size_mb else None

    start = time.perf_counter()
    info = make_family(
        args.out_dir, n_models=args.n_models, dtype=args.dtype, prefix=args.prefix,
        max_shard_bytes=max_shard, seed=args.seed, delta_scale=args.delta_scale,
        progress=lambda msg: print(f"  {msg}", flush=True), **sizes,
    )
    elapsed = time.perf_counter() - start

    size_str = ", ".join(f"{k}={v}" for k, v in sizes.items())
    n = len(info["model_dirs"])
    print(f"made {n} models ({info['n_params'] / 1e6:.2f}M params, "
          f"{info['bytes_per_model'] / 1e6:.1f} MB each, {args.dtype}, "
          f"{len(info['files'])} shard(s)) in {elapsed:.1f}s")
    print(f"  sizes: {size_str}")
    for d in info["model_dirs"]:
        print(f"  {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
