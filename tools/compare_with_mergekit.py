#!/usr/bin/env python
"""Run the real mergekit and llm_merge on one recipe and compare every output tensor.

Usage:
    python tools/compare_with_mergekit.py RECIPE.yml --family DIR [--work WORKDIR] [--seeds N]

``DIR`` is a family made by ``tools/make_toy_models.py`` (``base/`` and ``ft1`` .. ``ftN``); the
placeholders BASE, MODEL_A, MODEL_B, MODEL_C in the recipe become ``base``, ``ft1``, ``ft2``, ``ft3``.
Both tools run as subprocesses (``--mergekit``, default ``mergekit-yaml``; ``--llm_merge``, default
``python tools/mergekit.py`` with this interpreter), so this script imports neither torch nor mergekit.

Deterministic methods: per tensor, the max abs diff, that diff relative to max |mergekit|, and the
fraction of elements that differ by more than bf16 rounding (``|d| > 2**-7 * |mergekit| + atol``).
Any such element fails the run.

Random methods (dare_ties, dare_linear, della, della_linear, or ``--random``): the two outputs are
compared in distribution, via the task vector ``tv = output - base``: the fraction of nonzero
entries, its mean, and its L1 norm per element (mean |tv|), averaged over ``--seeds`` runs. A
statistic fails when the two tools differ by more than ``SIGMAS`` standard errors (from the element
count) plus a small relative slack.

Also fails on a missing/extra tensor, a shape or stored-dtype mismatch, a different
``num_hidden_layers`` in config.json, or either tool exiting non-zero. Exit status: 0 pass, 1 fail.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
PLACEHOLDERS = {"BASE": "base", "MODEL_A": "ft1", "MODEL_B": "ft2", "MODEL_C": "ft3"}
BF16_RTOL = 2.0 ** -7
SIGMAS = 6.0  # standard errors allowed for a random statistic
REL_SLACK = 0.02  # plus this fraction of the statistic's magnitude (e.g. rescale details)
ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


# ----------------------------------------------------------------------------- I/O
def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, in their stored dtype (bf16 via ml_dtypes)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def read_model(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (every *.safetensors shard)."""
    tensors: dict[str, np.ndarray] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for file in files:
        tensors.update(read_safetensors(file))
    return tensors


def num_layers(model_dir: Path) -> int | None:
    cfg = model_dir / "config.json"
    return json.loads(cfg.read_text()).get("num_hidden_layers") if cfg.exists() else None


# ----------------------------------------------------------------------------- running the tools
def substitute(text: str, family: Path) -> str:
    """Replace the BASE / MODEL_A / MODEL_B / MODEL_C placeholders with the family's model dirs."""
    for key, sub in PLACEHOLDERS.items():
        text = re.sub(rf"\b{key}\b", str((family / sub).resolve()), text)
    return text


def run_tool(name: str, cmd: list[str], out_dir: Path) -> None:
    """Run one tool; raise RuntimeError with the tail of its output when it fails."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{name} exited {proc.returncode}: {' '.join(cmd)}\n{tail}")


def run_both(recipe: Path, work: Path, seed: int, mergekit_cmd: str, llm_merge_cmd: str) -> tuple[Path, Path]:
    """Merge ``recipe`` with both tools into WORK/mergekit_sSEED and WORK/llm_merge_sSEED."""
    mk_out, lm_out = work / f"mergekit_s{seed}", work / f"llm_merge_s{seed}"
    errors = []
    for name, cmd, out in [
        ("mergekit", [*shlex.split(mergekit_cmd), str(recipe), str(mk_out), "--no-copy-tokenizer",
                      "--random-seed", str(seed), "--quiet"], mk_out),
        ("llm_merge", [*shlex.split(llm_merge_cmd), str(recipe), str(lm_out), "--overwrite",
                       "--seed", str(seed), "--quiet"], lm_out),
    ]:
        try:
            run_tool(name, cmd, out)
        except RuntimeError as exc:
            errors.append(str(exc))
    if errors:
        raise RuntimeError("\n".join(errors))
    return mk_out, lm_out


# ----------------------------------------------------------------------------- comparing
@dataclass
class Row:
    name: str
    ok: bool
    text: str


def compare_exact(name: str, exp: np.ndarray, got: np.ndarray, max_bad_frac: float = 0.0, atol: float = 1e-6) -> Row:
    """Deterministic comparison: max abs / rel diff and the fraction of elements beyond bf16 rounding,
    ``|got - exp| > 2**-7 * |exp| + atol * max|exp|``; the tensor passes when that fraction <= max_bad_frac."""
    e, g = exp.astype(np.float64), got.astype(np.float64)
    diff = np.abs(g - e)
    scale = float(np.abs(e).max()) if e.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    bad = diff > BF16_RTOL * np.abs(e) + atol * scale + 1e-30
    frac = float(bad.mean()) if bad.size else 0.0
    return Row(name, frac <= max_bad_frac, f"max_abs {max_abs:9.3e}  max_rel {rel:9.3e}  frac>bf16 {frac:8.2e}")


def stat_tol(a: np.ndarray, b: np.ndarray, estimate: float) -> float:
    """SIGMAS standard errors of the difference of the means of a and b, plus REL_SLACK * |estimate|."""
    return SIGMAS * np.sqrt((np.var(a) + np.var(b)) / max(a.size, 1)) + REL_SLACK * abs(estimate) + 1e-12


def compare_random(name: str, mk: list[np.ndarray], lm: list[np.ndarray], base: np.ndarray | None) -> Row:
    """Distributional comparison of the task vectors (output - base), pooled over all seeds."""
    if base is None or base.shape != mk[0].shape:
        return compare_exact(name, mk[0], lm[0])  # no base counterpart (e.g. renumbered layer): exact
    b = base.astype(np.float64)
    tvm = np.concatenate([(o.astype(np.float64) - b).ravel() for o in mk])
    tvl = np.concatenate([(o.astype(np.float64) - b).ravel() for o in lm])
    nz_m, nz_l = float(np.mean(tvm != 0)), float(np.mean(tvl != 0))
    l1_m, l1_l = float(np.abs(tvm).mean()), float(np.abs(tvl).mean())
    p, n = (nz_m + nz_l) / 2, tvm.size
    checks = [abs(nz_m - nz_l) <= SIGMAS * np.sqrt(2 * p * (1 - p) / n) + 1.0 / n,
              abs(tvm.mean() - tvl.mean()) <= stat_tol(tvm, tvl, 0.0) + REL_SLACK * l1_m,  # mean ~ 0: slack from L1
              abs(l1_m - l1_l) <= stat_tol(np.abs(tvm), np.abs(tvl), l1_m)]
    flags = "".join("." if c else "X" for c in checks)
    text = (f"nz {nz_m:.4f}/{nz_l:.4f}  mean {tvm.mean():+.3e}/{tvl.mean():+.3e}  "
            f"L1 {l1_m:.3e}/{l1_l:.3e}  [{flags}] (mergekit/llm_merge; flags: nz, mean, L1)")
    return Row(name, all(checks), text)


def compare_outputs(mk_dirs: list[Path], lm_dirs: list[Path], base_dir: Path | None, random: bool,
                    max_bad_frac: float = 0.0, atol: float = 1e-6) -> list[Row]:
    """Compare every tensor of the two tools' outputs (first seed, or all seeds when random)."""
    mk = [read_model(d) for d in mk_dirs]
    lm = [read_model(d) for d in lm_dirs]
    base = read_model(base_dir) if (random and base_dir is not None) else {}
    rows = []
    for name in sorted(set(mk[0]) | set(lm[0])):
        if name not in lm[0] or name not in mk[0]:
            rows.append(Row(name, False, f"only in {'mergekit' if name in mk[0] else 'llm_merge'}"))
            continue
        e, g = mk[0][name], lm[0][name]
        if e.shape != g.shape:
            rows.append(Row(name, False, f"shape {e.shape} (mergekit) vs {g.shape} (llm_merge)"))
            continue
        row = (compare_random(name, [m[name] for m in mk], [m[name] for m in lm], base.get(name)) if random
               else compare_exact(name, e, g, max_bad_frac, atol))
        if e.dtype != g.dtype:
            row = Row(name, False, f"{row.text}  DTYPE {e.dtype} (mergekit) vs {g.dtype} (llm_merge)")
        rows.append(row)
    nl_mk, nl_lm = num_layers(mk_dirs[0]), num_layers(lm_dirs[0])
    if nl_mk != nl_lm:
        rows.append(Row("config.json", False, f"num_hidden_layers {nl_mk} (mergekit) vs {nl_lm} (llm_merge)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", type=Path, help="mergekit YAML recipe (may use BASE / MODEL_A / MODEL_B / MODEL_C)")
    p.add_argument("--family", type=Path, required=True, help="toy family dir (base/, ft1/, ft2/, ...)")
    p.add_argument("--work", type=Path, help="work dir for the recipe and both outputs (default: a temp dir, removed)")
    p.add_argument("--seeds", type=int, default=1, help="runs per tool for random methods (default: 1)")
    p.add_argument("--random", action="store_true", help="compare in distribution even if the method is not random")
    p.add_argument("--mergekit", default="mergekit-yaml", help="mergekit command (default: mergekit-yaml)")
    p.add_argument("--llm_merge", default=f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO / 'tools' / 'mergekit.py'))}",
                   help="llm_merge command (default: python tools/mergekit.py)")
    p.add_argument("--atol", type=float, default=1e-6,
                   help="deterministic: absolute tolerance as a fraction of max|mergekit| per tensor (default: 1e-6); "
                        "with dtype bfloat16 mergekit rounds the inputs to bf16 and computes in it, 2**-7 absorbs that")
    p.add_argument("--max_bad_frac", type=float, default=0.0,
                   help="deterministic: fraction of elements per tensor allowed beyond bf16 rounding (default: 0); "
                        "magnitude top-k methods (ties, breadcrumbs) on bf16 checkpoints break exact ties in "
                        "|delta| in an implementation-defined order")
    p.add_argument("--failures_only", action="store_true", help="print only the failing tensors")
    args = p.parse_args(argv)

    text = substitute(args.recipe.read_text(), args.family)
    recipe = yaml.safe_load(text)
    method = str(recipe.get("merge_method", ""))
    random = args.random or method in RANDOM_METHODS
    base_dir = Path(recipe["base_model"]) if recipe.get("base_model") else None

    work = args.work or Path(tempfile.mkdtemp(prefix="mkcompare_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        recipe_path = work / args.recipe.name
        recipe_path.write_text(text)
        seeds = list(range(args.seeds if random else 1))
        try:
            outs = [run_both(recipe_path, work, s, args.mergekit, args.llm_merge) for s in seeds]
        except RuntimeError as exc:
            print(f"{args.recipe.name}: ERROR\n{exc}")
            return 1
        rows = compare_outputs([o[0] for o in outs], [o[1] for o in outs], base_dir, random, args.max_bad_frac, args.atol)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    width = max(len(r.name) for r in rows)
    for r in rows:
        if r.ok and args.failures_only:
            continue
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.name:<{width}}  {r.text}")
    n_bad = sum(not r.ok for r in rows)
    kind = f"random ({len(seeds)} seed(s))" if random else "deterministic"
    summary = ""
    if not random:
        rels = [float(m.group(1)) for r in rows if (m := re.search(r"max_rel\s+(\S+)", r.text))]
        summary = f", max rel diff {max(rels, default=0.0):.3e}"
    print(f"{args.recipe.name}: {method} {kind}: {'PASS' if n_bad == 0 else 'FAIL'} "
          f"({n_bad}/{len(rows)} failing{summary})")
    return 0 if n_bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
