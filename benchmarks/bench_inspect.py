#!/usr/bin/env python
"""Cost of the compatibility check every merge runs, and of ``llm-merge inspect``, on the benchmark family.

* check: ``report.inspection.merge_check.check_models`` on a dare_ties plan of the family, in this
  process, page cache warm (best of ``--repeat``), against the wall time of the same merge as a
  subprocess (best of ``--repeat``, ``--n_process``): the check's share of the merge.
* inspect: ``tools/inspect_models.py`` over the family as a subprocess (wall seconds, peak RSS).

    python benchmarks/bench_inspect.py [--params 1e8] [--n_process 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the command line sets it for a merge
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from bench_merge import REPO, ensure_family, run_and_measure, warm_page_cache, weight_files  # noqa: E402

sys.path.insert(0, str(REPO))
from llm_merge.config.options import MergeConfig  # noqa: E402
from llm_merge.config.validate import resolve  # noqa: E402
from llm_merge.plan.build import build_plan  # noqa: E402
from llm_merge.report.inspection.merge_check import check_models  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=1e8, help="parameters per model (default: 1e8)")
    p.add_argument("--family_dir", type=Path, default=None, help="default: $TMPDIR/llm_merge_bench/family_<params>")
    p.add_argument("--n_process", type=int, default=2, help="workers of the merge and of inspect (default: 2)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement, best reported (default: 3)")
    args = p.parse_args(argv)
    family_dir = args.family_dir or Path(tempfile.gettempdir()) / "llm_merge_bench" / f"family_{int(args.params)}"
    family = ensure_family(family_dir, args.params, 200, 0)
    models = [str(m) for m in family.fine_tunes]
    warm_page_cache([f for d in [family.base, *family.fine_tunes] for f in weight_files(d)])
    work = Path(tempfile.mkdtemp(prefix="bench_inspect-"))
    try:
        cfg = resolve(MergeConfig(merge_method="dare_ties", base_model_path=str(family.base), model_path_list=models,
                                  output_path=str(work / "out"), n_process=args.n_process, quiet=True, overwrite=True))
        plan = build_plan(cfg)
        check = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            check_models(plan.tasks, models, True, False)
            check.append(time.perf_counter() - started)
        merge_cmd = [sys.executable, str(REPO / "tools" / "mergekit.py"), "--merge_method", "dare_ties", "--base_model_path",
                     str(family.base), "--model_path_list", *models, "--output_path", str(work / "out"), "--overwrite",
                     "--quiet", "--n_process", str(args.n_process)]
        merge = min(run_and_measure(merge_cmd, work / "logs")[0] for _ in range(args.repeat))
        inspect_cmd = [sys.executable, str(REPO / "tools" / "inspect_models.py"), "--base_model_path", str(family.base),
                       "--model_path_list", *models, "--n_process", str(args.n_process), "--quiet", "--table", "none"]
        inspect_seconds, inspect_rss = min(run_and_measure(inspect_cmd, work / "logs") for _ in range(args.repeat))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"family {family_dir} ({len(models)} fine-tunes + base), n_process {args.n_process}")
    print(f"compatibility check: {min(check) * 1e3:.1f} ms (runs: {', '.join(f'{c * 1e3:.1f}' for c in check)} ms); "
          f"dare_ties merge {merge:.2f} s: the check is {min(check) / merge:.2%} of it")
    print(f"inspect: {inspect_seconds:.2f} s, peak RSS {inspect_rss / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
