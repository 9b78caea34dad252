#!/usr/bin/env python
"""Benchmark ``tools/extract_lora.py`` on the benchmark family (base + ft1 of bench_merge.py's toy family).

Each run extracts an adapter from ft1 against the base as a subprocess and records wall seconds,
peak RSS of the process tree (bench_merge.run_and_measure), the adapter's size and the report's
relative error. Runs alternate between the ``--n_process`` values; the fastest of ``--repeat``
runs is reported. Inputs are page-cache warm (read once before measuring). See README.md.

    python benchmarks/bench_extract.py [--params 1e8] [--rules "--rank 32" "--energy 0.5 --max_rank 64"]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from bench_merge import REPO, ensure_family, machine_info, run_and_measure, warm_page_cache, weight_files  # noqa: E402

GB = 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family_dir", type=Path, default=None,
                   help="toy family cache, shared with bench_merge.py (default: "
                        "$TMPDIR/llm_merge_bench/family_<params>)")
    p.add_argument("--params", type=float, default=1e8, help="parameters per model, Llama proportions, bf16 (default: 1e8)")
    p.add_argument("--shard_size_mb", type=float, default=200, help="max shard size of a generated family in MB (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="family seed (default: 0)")
    p.add_argument("--rules", nargs="+", default=["--rank 32"], metavar="FLAGS",
                   help="rank rules to measure, each a shell-quoted set of flags (default: '--rank 32')")
    p.add_argument("--n_process", nargs="+", type=int, default=[1, 2], help="process counts to measure (default: 1 2)")
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is reported (default: 1)")
    p.add_argument("--extra_args", default="", help="extra arguments appended to every extraction, shell-quoted")
    p.add_argument("--work_dir", type=Path, default=None, help="where adapters go (deleted after each run)")
    p.add_argument("--json", type=Path, default=None, help="also write results to this file")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    family_dir = args.family_dir or Path(tempfile.gettempdir()) / "llm_merge_bench" / f"family_{int(args.params)}"
    family = ensure_family(family_dir, args.params, args.shard_size_mb, args.seed)
    base, tuned = family.base, family.fine_tunes[0]
    inputs = weight_files(base) + weight_files(tuned)
    input_bytes = sum(f.stat().st_size for f in inputs)
    machine = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    print(f"inputs: {base} + {tuned} = {input_bytes / GB:.3f} GB; warming the page cache ...", flush=True)
    warm_page_cache(inputs)
    own_work_dir = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="llm_merge_bench_extract_")) if own_work_dir else args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, int], list[tuple[float, int, dict]]] = {}
    try:
        for rule in args.rules:
            for repeat in range(args.repeat):
                for n_process in args.n_process:  # alternate: a drift of the machine's speed hits each count alike
                    output = work_dir / "adapter"
                    cmd = [sys.executable, str(REPO / "tools" / "extract_lora.py"), "--base_model_path", str(base),
                           "--model_path", str(tuned), "--output_path", str(output), "--n_process", str(n_process),
                           "--quiet", *shlex.split(rule), *shlex.split(args.extra_args)]
                    os.sync()
                    seconds, rss = run_and_measure(cmd, work_dir / "logs")
                    report = json.loads((output / "extract_report.json").read_text())
                    shutil.rmtree(output, ignore_errors=True)
                    runs.setdefault((rule, n_process), []).append((seconds, rss, report))
                    print(f"{rule}, n_process {n_process}, run {repeat + 1}/{args.repeat}: {seconds:.2f} s, "
                          f"peak RSS {rss / 1e6:.0f} MB", flush=True)
    finally:
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    rows = [_row(rule, n_process, measured, input_bytes) for (rule, n_process), measured in runs.items()]
    print()
    print(f"{'rule':<28} {'n_process':>9} {'seconds':>8} {'peak RSS (MB)':>13} {'adapter (MB)':>12} "
          f"{'LoRA modules':>12} {'rel. error':>10}")
    for row in rows:
        print(f"{row['rule']:<28} {row['n_process']:>9} {row['seconds']:>8.2f} {row['peak_rss_bytes'] / 1e6:>13.0f} "
              f"{row['adapter_bytes'] / 1e6:>12.1f} {row['lora_modules']:>12} {row['relative_error']:>10.4f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "family": family.spec, "input_bytes": input_bytes,
                                         "rows": rows}, indent=2) + "\n")
    return 0


def _row(rule: str, n_process: int, measured: list[tuple[float, int, dict]], input_bytes: int) -> dict:
    """One bench_extract row: the fastest run's seconds, the largest peak RSS, the adapter's figures."""
    seconds, _, report = min(measured, key=lambda run: run[0])
    return {"kind": "bench_extract", "rule": rule, "n_process": n_process, "seconds": seconds,
            "peak_rss_bytes": max(run[1] for run in measured), "input_bytes": input_bytes,
            "adapter_bytes": report["adapter_bytes"], "r": report["r"],
            "lora_modules": report["summary"]["lora_modules"], "relative_error": report["summary"]["relative_error"]}


if __name__ == "__main__":
    sys.exit(main())
