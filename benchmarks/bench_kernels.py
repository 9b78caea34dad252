#!/usr/bin/env python
"""Per-pass kernel costs of the compiled backend on one tensor of the benchmark family.

Loads one tensor of the base and every fine-tune into memory (bfloat16 bits, read-only,
1M-element chunks as the engine passes them) and times, best of ``--repeat``, the
statistics passes (TIES trim threshold, DELLA rank tables; mergekit's magnitude selection,
random's L1 sums, della_magprune's row ranks and keep bits) and the fused apply pass of each
method. Prints nanoseconds per element and model: the numbers behind the "where the time goes"
notes in README.md, without the I/O, start-up and scheduling around them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
try:
    import llm_merge  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(REPO))
from llm_merge.kernels import fused  # noqa: E402
from llm_merge.run.engine import TensorMerger, run_statistic  # noqa: E402
from llm_merge.io.checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from llm_merge.io.reader import TensorReader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import ensure_family  # noqa: E402

DEFAULT_TENSOR = "model.layers.3.mlp.gate_proj.weight"
CHUNK = 1 << 20  # elements per chunk, as the engine's FUSED_CHUNK
BLOCK = fused.FusedChunks.BLOCK
#: (label, sparsify_type, merge_type, statistics pass or None)
APPLY_PASSES = [
    ("linear", "none", "linear", None),
    ("ties", "trim", "ties", "trim"),
    ("dare_linear", "dare", "linear", None),
    ("dare_ties", "dare", "ties", None),
    ("della", "magprune", "ties", "ranks"),
    ("della_linear", "magprune", "linear", "ranks"),
    ("mergekit ties", "magnitude", "ties", "magnitude"),
    ("mergekit dare_ties", "random", "ties", "random"),
    ("mergekit della", "della_magprune", "ties", "della_magprune"),
]
#: Streamed statistics timed, by the label of ``statistics``.
STATISTICS = ("trim", "ranks", "magnitude", "random", "della_magprune")


def default_tensor(checkpoint: Checkpoint) -> str:
    """``DEFAULT_TENSOR`` where the checkpoint has it, else its first MLP gate projection."""
    names = checkpoint.tensors
    return DEFAULT_TENSOR if DEFAULT_TENSOR in names else sorted(n for n in names if n.endswith("mlp.gate_proj.weight"))[0]


def load_bits(checkpoint: Checkpoint, name: str) -> np.ndarray:
    """One bfloat16 tensor of a checkpoint as read-only uint16 bits."""
    info = checkpoint.tensors[name]
    if info.dtype != "BF16":
        raise SystemExit(f"{name}: {info.dtype}; this benchmark takes bfloat16 tensors")
    reader = TensorReader()
    try:
        bits = reader.read_raw(info).view(np.uint16)
    finally:
        reader.close()
    bits.flags.writeable = False
    return bits


def chunks(raws: list[np.ndarray], base: np.ndarray):
    """(start, raw chunks, base chunk) as the engine feeds the kernels."""
    for start in range(0, base.size, CHUNK):
        yield start, [r[start:start + CHUNK] for r in raws], base[start:start + CHUNK]


def statistics(kind: str, raws: list[np.ndarray], base: np.ndarray, options: dict, shape: tuple) -> list[dict]:
    """Every pass of one streamed statistic over the tensor; the per-model results."""
    k, n = len(raws), base.size
    per_model, keys = [options] * k, list(range(1, k + 1))
    if kind == "trim":
        stats = fused.StreamingTrim(k, n, options["reserve_p"], options["rescale"], BLOCK)
    elif kind == "magnitude":
        stats = fused.StreamingMagnitude(n, per_model, options["rescale"], BLOCK)
    elif kind == "random":
        stats = fused.StreamingRandomL1(keys, per_model, options["rescale"], BLOCK)
    elif kind == "della_magprune":
        stats = fused.StreamingRowKeep.create(n, shape, keys, per_model, options["rescale"])
    else:
        stats = fused.StreamingRanks(k, n, BLOCK, TensorMerger.EXCLUSIVE_BYTES)
    return run_statistic(stats, lambda: ((chunk, base_chunk) for _, chunk, base_chunk in chunks(raws, base)))


def apply(sparsify: str, merge: str, prepared, raws, base, options: dict, out: np.ndarray) -> None:
    """The fused apply pass over the whole tensor."""
    apply_pass = fused.FusedChunks(sparsify_type=sparsify, merge_type=merge, keys=list(range(1, len(raws) + 1)),
                                   prepared=prepared, numel=base.size, options=options)
    for start, chunk, base_chunk in chunks(raws, base):
        apply_pass.run(chunk, base_chunk, start, out[start:start + base_chunk.size])


def best_ns(run: Callable[[], object], repeat: int, per: int) -> float:
    """Best-of-``repeat`` nanoseconds per ``per`` units (after one warm-up call)."""
    run()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best * 1e9 / per


def main(argv: list[str] | None = None) -> int:
    default_dir = Path(tempfile.gettempdir()) / "llm_merge_bench"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family_dir", type=Path, default=None,
                   help=f"benchmark family (default: {default_dir}/family_<params>, generated if missing)")
    p.add_argument("--params", type=float, default=5.2e8, help="parameters per model of the family (default: 5.2e8)")
    p.add_argument("--tensor", default=None,
                   help=f"tensor to time (default: {DEFAULT_TENSOR}, or the first layer's where the family is smaller)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per figure, the best is shown (default: 5)")
    args = p.parse_args(argv)
    family = ensure_family(args.family_dir or default_dir / f"family_{int(args.params)}", args.params, 200, 0)
    checkpoints = [open_checkpoint(model, "model") for model in [family.base, *family.fine_tunes]]
    name = args.tensor or default_tensor(checkpoints[0])
    base, *raws = (load_bits(checkpoint, name) for checkpoint in checkpoints)
    k, n = len(raws), base.size
    options = dict(reserve_p=0.7, rescale=True, epsilon=0.14, weight_list=[1.0] * k, normalize=True,
                   ties_elect_type="sum")
    fused.initialize()
    out = np.empty(n, np.uint16)
    print(f"{name}: {n} elements, {k} fine-tunes + base, bfloat16; ns per element and model, "
          f"best of {args.repeat}")
    print(f"{'pass':44s} {'ns':>6s}")
    statistics_ns = {}
    shape = checkpoints[0].tensors[name].shape
    for kind in STATISTICS:
        statistics_ns[kind] = best_ns(lambda: statistics(kind, raws, base, options, shape), args.repeat, n * k)
        print(f"{'statistics: ' + kind:44s} {statistics_ns[kind]:6.2f}")
    ready = {kind: statistics(kind, raws, base, options, shape) for kind in STATISTICS}
    for label, sparsify, merge, stats in APPLY_PASSES:
        ns = best_ns(lambda: apply(sparsify, merge, ready.get(stats), raws, base, options, out), args.repeat, n * k)
        print(f"{'apply: ' + label:44s} {ns:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
