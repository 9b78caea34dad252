#!/usr/bin/env python
"""Run other merge tools ("peers") with the flags ``bench_merge.py`` passes, so that
``bench_merge.py --compare`` can time them on the same family, method and I/O floor.

Each peer lives in a side environment of its own (see benchmarks/README.md, "Peers"); this file
imports nothing outside the standard library at start-up, so any of those interpreters can run it.

    # PaddleFormers' mergekit (run by the PaddleFormers environment's python)
    /tmp/peers/paddleformers/bin/python benchmarks/peers.py paddleformers --merge_method ties \\
        --model_path_list ft1 ft2 ft3 --base_model_path base --output_path OUT --n_process 2

    # arcee mergekit: writes the YAML recipe, then execs mergekit-yaml (found beside the python
    # that runs this file, or --mergekit_yaml)
    /tmp/peers/mergekit/bin/python benchmarks/peers.py mergekit --merge_method ties ...

    python benchmarks/peers.py recipe --merge_method dare_ties ...   # print the recipe only
    /tmp/peers/mergekit/bin/python benchmarks/peers.py versions      # the peer packages' versions
    python benchmarks/peers.py check OUT_A OUT_B [--base DIR]        # compare two outputs

The flags are PaddleNLP mergekit's (``llm_merge``'s), with ``llm_merge``'s defaults: weights all 1,
``--normalize true``, ``--reserve_p 0.7``, ``--rescale true``, ``--ties_elect_type sum``,
``--epsilon 0.14``, ``--seed 42``. What each peer makes of them:

* paddleformers: ``paddleformers.mergekit.MergeConfig`` / ``MergeModel`` with the same names and values
  (PaddleFormers' defaults are the same ones), ``tensor_type`` np (its default; ``--tensor_type pd``
  selects its Paddle path), on the CPU; ``numpy.random`` and ``paddle`` seeded with ``--seed``.
* mergekit: a recipe per method. ``density`` = reserve_p, ``weight`` = the weight, ``normalize`` and
  ``rescale`` given explicitly (mergekit's own defaults differ per method: dare_ties normalize false,
  ties rescale false); ``linear`` with ``--normalize false`` and a base becomes ``task_arithmetic``
  over the base, which is what llm_merge computes then; ``della`` epsilon = ``--epsilon`` / 2 (mergekit spreads the
  keep probability over density +- epsilon, llm_merge over reserve_p +- epsilon/2). ``--n_process P``
  becomes ``--num-threads P`` (mergekit runs one process; that sets torch's threads), and the run gets
  ``--random-seed``, ``--quiet`` and ``--no-copy-tokenizer``. ``dtype`` is ``--mergekit_dtype``
  (default bfloat16: mergekit computes in it; float32 computes in float32 like llm_merge, with
  ``out_dtype`` bfloat16).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

PEER_PACKAGES = {
    "paddleformers": ["paddleformers", "paddlepaddle", "numpy", "ml_dtypes", "safetensors"],
    "mergekit": ["mergekit", "torch", "transformers", "safetensors", "numpy"],
}
#: method -> mergekit merge_method (linear is special-cased for --normalize false)
MERGEKIT_METHODS = {"linear": "linear", "ties": "ties", "dare_ties": "dare_ties", "dare_linear": "dare_linear",
                    "della": "della", "della_linear": "della_linear"}
SPARSIFIED = {"ties", "dare_ties", "dare_linear", "della", "della_linear"}
DELLA = {"della", "della_linear"}


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def merge_parser(prog: str, peer: str) -> argparse.ArgumentParser:
    """The PaddleNLP mergekit flags bench_merge.py passes (plus the merge options it may add)."""
    p = argparse.ArgumentParser(prog=prog, description=f"run {peer} with PaddleNLP mergekit's flags")
    p.add_argument("--merge_method", required=True)
    p.add_argument("--model_path_list", nargs="+", required=True)
    p.add_argument("--base_model_path", default=None)
    p.add_argument("--output_path", required=True)
    p.add_argument("--n_process", type=int, default=1)
    p.add_argument("--weight_list", type=float, nargs="+", default=None)
    p.add_argument("--normalize", type=_bool, default=True)
    p.add_argument("--reserve_p", type=float, default=0.7)
    p.add_argument("--rescale", type=_bool, default=True)
    p.add_argument("--ties_elect_type", choices=["sum", "count"], default="sum")
    p.add_argument("--epsilon", type=float, default=0.14)
    p.add_argument("--slerp_alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--overwrite", action="store_true", help="accepted and ignored (the peers overwrite anyway)")
    p.add_argument("--quiet", action="store_true", help="accepted; mergekit always runs with --quiet")
    if peer == "paddleformers":
        p.add_argument("--tensor_type", choices=["np", "pd"], default="np",
                       help="PaddleFormers' backend: np (its default) or pd (Paddle ops)")
    else:
        p.add_argument("--mergekit_dtype", choices=["bfloat16", "float32"], default="bfloat16",
                       help="recipe dtype: what mergekit computes in (default: bfloat16)")
        p.add_argument("--mergekit_yaml", default=None,
                       help="the mergekit-yaml executable (default: the one beside this python)")
    return p


def _weights(args: argparse.Namespace) -> list[float]:
    weights = args.weight_list or [1.0] * len(args.model_path_list)
    if len(weights) != len(args.model_path_list):
        raise SystemExit(f"--weight_list: {len(weights)} weights for {len(args.model_path_list)} models")
    return weights


# ----------------------------------------------------------------------------- PaddleFormers

def run_paddleformers(argv: list[str]) -> int:
    args = merge_parser("peers.py paddleformers", "paddleformers").parse_args(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the CPU path, as llm_merge's default
    import numpy as np
    import paddle

    paddle.set_device("cpu")
    from paddleformers.mergekit import MergeConfig, MergeModel

    np.random.seed(args.seed)  # its dare / magprune draw from numpy's global generator (np path)
    paddle.seed(args.seed)  # and from paddle's (pd path)
    config = MergeConfig(
        tensor_type=args.tensor_type, n_process=args.n_process, merge_method=args.merge_method,
        model_path_list=list(args.model_path_list), base_model_path=args.base_model_path,
        output_path=args.output_path, weight_list=_weights(args), normalize=args.normalize,
        reserve_p=args.reserve_p, rescale=args.rescale, epsilon=args.epsilon,
        ties_elect_type=args.ties_elect_type, slerp_alpha=args.slerp_alpha,
        copy_file_list=["config.json", "generation_config.json"])
    MergeModel(config).merge_model()
    return 0


# ----------------------------------------------------------------------------- arcee mergekit

def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid YAML scalar, quoted as needed


def mergekit_recipe(args: argparse.Namespace) -> str:
    """The mergekit YAML recipe that computes what llm_merge computes for these flags (see the module doc)."""
    method = args.merge_method
    if method not in MERGEKIT_METHODS:
        raise SystemExit(f"peers.py mergekit: no mergekit recipe for --merge_method {method} "
                         f"(mapped: {', '.join(MERGEKIT_METHODS)})")
    if args.ties_elect_type != "sum" and method in ("ties", "dare_ties", "della"):
        raise SystemExit("peers.py mergekit: mergekit's ties methods elect by sum only (--ties_elect_type count)")
    weights = _weights(args)
    base = args.base_model_path
    # linear over task vectors: normalized, the base cancels out; not normalized, it is task arithmetic
    use_base = method != "linear" or (not args.normalize and base is not None)
    if use_base and base is None:
        raise SystemExit(f"peers.py mergekit: {method} needs --base_model_path")
    mk_method = "task_arithmetic" if method == "linear" and use_base else MERGEKIT_METHODS[method]
    lines = [f"# written by benchmarks/peers.py for llm_merge --merge_method {method}",
             f"merge_method: {mk_method}"]
    if use_base:
        lines.append(f"base_model: {_yaml_scalar(str(Path(base).resolve()))}")
    lines.append("models:")
    for model, weight in zip(args.model_path_list, weights):
        params = [f"weight: {_yaml_scalar(float(weight))}"]
        if method in SPARSIFIED:
            params.append(f"density: {_yaml_scalar(float(args.reserve_p))}")
        if method in DELLA:
            params.append(f"epsilon: {_yaml_scalar(float(args.epsilon) / 2)}")
        lines += [f"  - model: {_yaml_scalar(str(Path(model).resolve()))}",
                  "    parameters:", *(f"      {p}" for p in params)]
    shared = {}
    if mk_method != "task_arithmetic":
        shared["normalize"] = args.normalize
    if method in SPARSIFIED:
        shared["rescale"] = args.rescale
    if shared:
        lines += ["parameters:", *(f"  {k}: {_yaml_scalar(v)}" for k, v in shared.items())]
    lines.append(f"dtype: {args.mergekit_dtype}")
    if args.mergekit_dtype != "bfloat16":
        lines.append("out_dtype: bfloat16")
    return "\n".join(lines) + "\n"


def _recipe_file(text: str) -> Path:
    """The recipe written under $TMPDIR/llm_merge_peers, named by its content (reused, never piles up)."""
    folder = Path(tempfile.gettempdir()) / "llm_merge_peers"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"recipe-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yml"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def mergekit_command(args: argparse.Namespace, recipe: Path) -> list[str]:
    exe = args.mergekit_yaml or str(Path(sys.executable).parent / "mergekit-yaml")
    if not (os.path.isfile(exe) or shutil.which(exe)):
        raise SystemExit(f"peers.py mergekit: no mergekit-yaml at {exe} (run this file with the mergekit "
                         f"environment's python, or give --mergekit_yaml)")
    return [exe, str(recipe), args.output_path, "--num-threads", str(args.n_process), "--random-seed",
            str(args.seed), "--quiet", "--no-copy-tokenizer"]


def run_mergekit(argv: list[str]) -> int:
    args = merge_parser("peers.py mergekit", "mergekit").parse_args(argv)
    cmd = mergekit_command(args, _recipe_file(mergekit_recipe(args)))
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # replaces this process: the timed process tree is mergekit's alone


def print_recipe(argv: list[str]) -> int:
    args = merge_parser("peers.py recipe", "mergekit").parse_args(argv)
    sys.stdout.write(mergekit_recipe(args))
    return 0


# ----------------------------------------------------------------------------- versions, check

def print_versions(argv: list[str]) -> int:
    """The versions of the peer packages importable by this interpreter (JSON)."""
    from importlib import metadata

    p = argparse.ArgumentParser(prog="peers.py versions")
    p.add_argument("peer", nargs="?", choices=sorted(PEER_PACKAGES), help="one peer's packages (default: both)")
    args = p.parse_args(argv)
    names = PEER_PACKAGES[args.peer] if args.peer else sorted({n for v in PEER_PACKAGES.values() for n in v})
    found = {"python": sys.version.split()[0], "executable": sys.executable}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    print(json.dumps(found))
    return 0


def check_outputs(argv: list[str]) -> int:
    """Compare two merge outputs tensor by tensor (with this repository's numpy/ml_dtypes environment)."""
    p = argparse.ArgumentParser(prog="peers.py check", description=check_outputs.__doc__)
    p.add_argument("expected", type=Path, help="output directory taken as the reference (e.g. llm_merge's)")
    p.add_argument("got", type=Path, help="output directory compared with it (e.g. a peer's)")
    p.add_argument("--base", type=Path, default=None,
                   help="the base model: compare the task vectors (output - base) in distribution "
                        "(random methods), not element by element")
    p.add_argument("--names", nargs="*", default=None, help="only these tensors (default: all)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import numpy as np
    from compare_with_mergekit import compare_exact, compare_random, read_model

    exp, got = read_model(args.expected), read_model(args.got)
    base = read_model(args.base) if args.base else {}
    names = args.names or sorted(set(exp) | set(got))
    bad = 0
    for name in names:
        if name not in exp or name not in got:
            print(f"FAIL {name}: only in {args.expected if name in exp else args.got}")
            bad += 1
            continue
        e, g = exp[name], got[name]
        if e.shape != g.shape:
            print(f"FAIL {name}: shape {e.shape} vs {g.shape}")
            bad += 1
            continue
        note = ""
        if e.dtype != g.dtype:  # e.g. PaddleFormers' np path writes float32 for bf16 inputs: round it as stored
            note = f"  ({args.got.name} stored {g.dtype}, compared rounded to {e.dtype})"
            g = g.astype(np.float32).astype(e.dtype)
        row = (compare_random(name, [e], [g], base.get(name)) if args.base else compare_exact(name, e, g))
        text = row.text.replace("(mergekit/llm_merge;", "(expected/got;")
        print(f"{'ok  ' if row.ok else 'FAIL'} {name}  {text}{note}")
        bad += not row.ok
    print(f"{len(names) - bad}/{len(names)} tensors agree")
    return 0 if bad == 0 else 1


COMMANDS = {"paddleformers": run_paddleformers, "mergekit": run_mergekit, "recipe": print_recipe,
            "versions": print_versions, "check": check_outputs}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        print(f"usage: peers.py {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
