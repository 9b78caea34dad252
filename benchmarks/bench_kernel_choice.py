#!/usr/bin/env python
"""Plain NumPy against the compiled kernels on small and mid-size merges, and which one a merge picks.

For each family size and method, times whole merge commands (`tools/mergekit.py`, best of
``--repeat``, runs alternating) with ``LLM_MERGE_NUMBA=0`` (NumPy) and ``=1`` (kernels), and prints
the path ``run.kernel_choice`` picks with no override. ``s/GB`` is the NumPy cost the measurement
implies, (NumPy - compiled + kernel load) / input GB on one worker: the figure a method's
``numpy_seconds_per_gb`` holds (its sparsifier's plus its merge's). ``slower`` marks a pick more than
``--tolerance`` seconds slower than the other path.

Families (bfloat16, base + 3 fine-tunes, generated once under ``--cache_dir``): ``toy`` is the
README's (1.3 MB a model), ``small`` 9.5 MB and ``mid`` 38 MB a model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import llm_merge  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(REPO))
from llm_merge.config.options import METHOD_TABLE, MergeConfig  # noqa: E402
from llm_merge.run.kernel_choice import KERNEL_LOAD_SECONDS, worth_compiling  # noqa: E402
from llm_merge.toy import make_family  # noqa: E402

FAMILIES = {
    "toy": dict(hidden=128, intermediate=352, layers=2, vocab=1024, heads=4, kv_heads=2),
    "small": dict(hidden=256, intermediate=688, layers=4, vocab=4000, heads=4, kv_heads=2),
    "mid": dict(hidden=512, intermediate=1376, layers=4, vocab=8000, heads=8, kv_heads=4),
}
METHODS = ["linear", "slerp", "dare_linear", "dare_ties", "ties", "della", "della_linear"]


def family_models(cache_dir: Path, name: str) -> tuple[Path, list[Path]]:
    """(base, fine-tunes) of a cached family, made on first use."""
    root = cache_dir / f"choice_{name}"
    if not (root / "ft3").is_dir():
        make_family(root, n_models=3, **FAMILIES[name])
    return root / "base", [root / f"ft{k}" for k in (1, 2, 3)]


def input_bytes(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in p.glob("*.safetensors"))


def merge_seconds(method: str, base: Path, models: list[Path], out: Path, n_process: int, numba: str) -> float:
    env = {**os.environ, "LLM_MERGE_NUMBA": numba}
    cmd = [sys.executable, str(REPO / "tools" / "mergekit.py"), "--merge_method", method, "--base_model_path", str(base),
           "--model_path_list", *map(str, models), "--output_path", str(out), "--n_process", str(n_process),
           "--overwrite", "--quiet"]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--methods", nargs="+", choices=list(METHOD_TABLE), default=METHODS)
    p.add_argument("--n_process", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each path, the best is shown (default: 3)")
    p.add_argument("--tolerance", type=float, default=0.05, help="seconds a pick may lose before it is marked")
    p.add_argument("--cache_dir", type=Path, default=Path(tempfile.gettempdir()) / "llm_merge_bench")
    args = p.parse_args(argv)
    os.environ.pop("LLM_MERGE_NUMBA", None)  # "picks" is the choice with no override
    print(f"n_process {args.n_process}; seconds, best of {args.repeat}; kernel load {KERNEL_LOAD_SECONDS} s")
    print(f"{'family':7s} {'method':13s} {'input MB':>8s} {'numpy':>6s} {'kernels':>7s} {'picks':>8s} {'s/GB':>6s}")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out"
        for family in args.families:
            base, fine_tunes = family_models(args.cache_dir, family)
            for method in args.methods:
                models = fine_tunes[:2] if method in ("slerp", "nuslerp") else fine_tunes
                size = input_bytes([base, *models])
                merge_seconds(method, base, models, out, args.n_process, "1")  # compiles the kernels once
                best = {"0": float("inf"), "1": float("inf")}
                for _ in range(args.repeat):
                    for numba in best:
                        best[numba] = min(best[numba], merge_seconds(method, base, models, out, args.n_process, numba))
                sparsify_type, merge_type = METHOD_TABLE[method]
                cfg = MergeConfig(sparsify_type=sparsify_type, merge_type=merge_type, n_process=args.n_process)
                picked = "1" if worth_compiling(cfg, size) else "0"
                implied = (best["0"] - best["1"] + KERNEL_LOAD_SECONDS) * args.n_process / (size / 1e9)
                mark = "  slower" if best[picked] > min(best.values()) + args.tolerance else ""
                print(f"{family:7s} {method:13s} {size / 1e6:8.1f} {best['0']:6.2f} {best['1']:7.2f} "
                      f"{'kernels' if picked == '1' else 'numpy':>8s} {implied:6.1f}{mark}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
