#!/usr/bin/env python
"""Benchmark `tools/mergekit.py` against the machine's I/O floor on a toy Llama family
(generated once and cached) or on a family made elsewhere (``--base_model_path`` with
``--model_path_list``, used as it is).

For each n_process it measures (a) the I/O floor: reading every input byte a merge is
given and writing one model's worth of output, split over n_process processes, and
(b) every merge method run as a subprocess: wall seconds, input GB/s, ratio to the
floor, and peak RSS of the process tree (a method's runs alternate between the
n_process values, so a drift of the machine's speed does not bias the speed-up). All
files are page-cache warm (a warm-up read precedes the measurements and nothing is
dropped from the cache), and each method first runs an untimed warm-up merge, so that
a fresh install's one-time kernel compilation is not timed. The ``startup`` row is the
fixed cost of a merge command: a linear merge of the README's toy family (a few MB). See
README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing.pool
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
try:
    import llm_merge  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(REPO))
from llm_merge.io.safetensors_format import read_header  # noqa: E402
from llm_merge.toy import family_size_for_params, make_family  # noqa: E402

ALL_METHODS = ["linear", "slerp", "ties", "della", "della_linear", "dare_linear", "dare_ties"]
#: The start-up row: a whole merge command whose merge work is ~0.01 s (``measure_startup``).
STARTUP = "startup"
#: Sizes of the start-up row's family: ``tools/make_toy_models.py``'s defaults (the README's set-up),
#: base + 3 bf16 fine-tunes of 1.3 MB each.
STARTUP_FAMILY = dict(hidden=128, intermediate=352, layers=2, vocab=1024, heads=4, kv_heads=2)
#: The method the start-up row runs: the lightest (no statistics, no random draws).
STARTUP_METHOD = "linear"
#: How a method is given the family where it differs from the default (the base and every fine-tune):
#: method -> (how many fine-tunes, None: all; whether it takes the base; extra flags).
METHOD_INPUTS = {
    "slerp": (2, True, []),
    "nuslerp": (2, True, []),
    "karcher": (None, False, []),  # every input merged alike: no base
    "nearswap": (1, True, ["--nearswap_t", "1e-3"]),
    "arcee_fusion": (1, True, []),
    "sce": (None, True, ["--sce_select_topk", "0.3"]),
}
#: How every other method is given the family.
DEFAULT_INPUTS = (None, True, [])
#: mergekit's other methods, timed only when ``--methods`` names them.
MERGEKIT_METHODS = ["task_arithmetic", "breadcrumbs_ties", "model_stock", "nuslerp", "multislerp", "karcher",
                    "nearswap", "arcee_fusion", "sce", "ram", "ramplus_tl"]
N_FINE_TUNES = 3
DTYPE = "bfloat16"
MARKER = ".bench_family.json"
CHUNK = 16 << 20
GB = 1e9
POLL_S = 0.02
FLOOR_REPEAT = 5  # the floor is cheap; best-of-5 hides writeback hiccups


@dataclass
class Row:
    """One line of the result table."""

    kind: str  # "io_floor", "merge" or "startup"
    method: str
    n_process: int
    seconds: float
    input_bytes: int
    floor_seconds: float | None  # None: no I/O floor (the start-up row)
    peak_rss_bytes: int | None
    speedup: float | None = None  # the same row's seconds at n_process 1 / these seconds

    @property
    def input_gbps(self) -> float:
        return self.input_bytes / GB / self.seconds

    @property
    def x_floor(self) -> float | None:
        return None if self.floor_seconds is None else self.seconds / self.floor_seconds

    def to_json(self) -> dict:
        return asdict(self) | {"input_gbps": self.input_gbps, "x_io_floor": self.x_floor}


# ----------------------------------------------------------------------------- setup

def machine_info() -> dict:
    """CPU, RAM and library versions of this machine."""
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import safetensors

    return {
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "ram_gb": round(psutil.virtual_memory().total / GB, 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }


@dataclass
class Family:
    """The checkpoints a benchmark merges: a base and its fine-tunes, made here or given."""

    base: Path
    fine_tunes: list[Path]
    spec: dict  # how it was made, or {"given": True}, plus its dtypes and parameter count (paths: base, fine_tunes)

    def inputs(self, method: str) -> list[Path]:
        """The model directories ``method`` is given: the base (where it takes one), then its fine-tunes."""
        base, fine_tunes = self.base_and_fine_tunes(method)
        return [*([base] if base else []), *fine_tunes]

    def base_and_fine_tunes(self, method: str) -> tuple[Optional[Path], list[Path]]:
        """(the base ``method`` is given, or None; the fine-tunes it is given)."""
        count, with_base, _ = METHOD_INPUTS.get(method, DEFAULT_INPUTS)
        return (self.base if with_base else None), self.fine_tunes[:count]

    def describe(self) -> str:
        made = "given" if self.spec.get("given") else "generated"
        return (f"{made}, {len(self.fine_tunes)} fine-tunes + base, {self.spec['params_per_model']:.3g} params/model, "
                f"{'/'.join(self.spec['dtypes'])}")


def _model_summary(model_dir: Path) -> tuple[int, set[str]]:
    """(parameter count, dtypes) of one checkpoint, from its safetensors headers."""
    tensors = [t for f in weight_files(model_dir) for t in read_header(f).tensors.values()]
    return sum(math.prod(t.shape) for t in tensors), {t.dtype for t in tensors}


def _family(base: Path, fine_tunes: list[Path], spec: dict) -> Family:
    """A Family whose spec also records what its files hold (checked: every model has weights)."""
    if len(fine_tunes) < 2:
        raise SystemExit(f"a benchmark family needs a base and at least 2 fine-tunes, got {len(fine_tunes)}")
    params, dtypes = _model_summary(base)
    for model in fine_tunes:
        dtypes |= _model_summary(model)[1]
    return Family(base, fine_tunes, spec | {"params_per_model": params, "dtypes": sorted(dtypes)})


def given_family(base: Path, fine_tunes: list[Path]) -> Family:
    """A family made elsewhere, named model by model: used as it is, never written to."""
    try:
        return _family(base, list(fine_tunes), {"given": True})
    except FileNotFoundError as exc:
        raise SystemExit(f"--base_model_path / --model_path_list: {exc}") from None


def _family_layout(family_dir: Path) -> list[Path] | None:
    """``family_dir/ft1 .. ftK`` when ``family_dir/base`` and at least ``ft1`` hold weights, else None."""
    def has_weights(model: Path) -> bool:
        return any(model.glob("*.safetensors"))

    fine_tunes = []
    while has_weights(family_dir / f"ft{len(fine_tunes) + 1}"):
        fine_tunes.append(family_dir / f"ft{len(fine_tunes) + 1}")
    return fine_tunes if fine_tunes and has_weights(family_dir / "base") else None


def ensure_family(family_dir: Path, params: float, shard_size_mb: float, seed: int) -> Family:
    """The family in ``family_dir``: this script's cached one, one made elsewhere, or a new one.

    A directory with this script's marker holds a family it generated: used when the marker matches
    these parameters, generated again otherwise. A directory without the marker that holds ``base``
    and ``ft1 .. ftK`` checkpoints was made elsewhere: used as it is and never written to. Anything
    else that is not empty is refused rather than overwritten.
    """
    spec = {"params": params, "shard_size_mb": shard_size_mb, "seed": seed,
            "dtype": DTYPE, "n_models": N_FINE_TUNES,
            "sizes": family_size_for_params(int(params))}
    marker = family_dir / MARKER
    fine_tunes = [family_dir / f"ft{k}" for k in range(1, N_FINE_TUNES + 1)]
    if marker.exists():
        if json.loads(marker.read_text()) == spec:
            print(f"using cached family in {family_dir}")
            return _family(family_dir / "base", fine_tunes, spec)
        for model in [family_dir / "base", *family_dir.glob("ft*")]:  # ours: no stale shards of other sizes
            shutil.rmtree(model, ignore_errors=True)
    elif (found := _family_layout(family_dir)) is not None:
        print(f"using the family in {family_dir} as given (made elsewhere: no {MARKER}; never regenerated)")
        return _family(family_dir / "base", found, {"given": True, "dir": str(family_dir)})
    elif family_dir.is_dir() and any(family_dir.iterdir()):
        raise SystemExit(f"{family_dir} is not empty and holds no benchmark family (base/ and ft1/ .. with "
                         f"*.safetensors): refusing to generate one into it")
    print(f"generating family in {family_dir} ({params:.3g} params/model, {DTYPE}) ...",
          flush=True)
    family_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"generating": True}) + "\n")  # ours from now on, even if interrupted
    start = time.perf_counter()
    make_family(family_dir, n_models=N_FINE_TUNES, dtype=DTYPE, seed=seed,
                max_shard_bytes=int(shard_size_mb * 1e6),
                progress=lambda msg: print(f"  {msg}", flush=True), **spec["sizes"])
    print(f"  done in {time.perf_counter() - start:.1f}s")
    marker.write_text(json.dumps(spec, indent=2) + "\n")
    return _family(family_dir / "base", fine_tunes, spec)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of one checkpoint directory."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return files


def total_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


# ----------------------------------------------------------------------------- I/O floor

def _io_worker(reads: list[str], writes: list[tuple[str, int]]) -> None:
    """Read ``reads`` completely, then write each ``(path, size)`` in ``writes``."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for path in reads:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    for path, size in writes:
        with open(path, "wb", buffering=0) as f:
            while size > 0:
                size -= f.write(view[: min(size, CHUNK)])
            os.fsync(f.fileno())  # the merge makes its output durable before publishing it


def _balance(items: list[tuple[object, int]], n: int) -> list[list[object]]:
    """Split ``(item, size)`` pairs into ``n`` lists of about equal total size."""
    bins: list[list[object]] = [[] for _ in range(n)]
    loads = [0] * n
    for item, size in sorted(items, key=lambda x: -x[1]):
        i = loads.index(min(loads))
        bins[i].append(item)
        loads[i] += size
    return bins


@contextlib.contextmanager
def floor_pool(n_process: int) -> Iterator[multiprocessing.pool.Pool]:
    """Forked processes for the I/O floor, closed and joined when done (never terminated).

    Terminating sends SIGTERM, and a forked worker inherits its parent's handlers: where the parent
    had imported paddle (a test process), paddle's failure handler caught it, and a worker it hit
    inside malloc hung in that handler's own malloc (seen in a clean-clone CI run; the test process
    waited on it for good). So workers get SIGTERM's default action, and are never sent it.
    """
    pool = multiprocessing.get_context("fork").Pool(n_process, initializer=signal.signal,
                                                    initargs=(signal.SIGTERM, signal.SIG_DFL))
    try:
        yield pool
    finally:
        pool.close()
        pool.join()


def warm_page_cache(files: list[Path]) -> None:
    """Read every file once so that all later measurements are page-cache warm."""
    _io_worker([str(f) for f in files], [])


def io_floor_seconds(inputs: list[Path], output_sizes: list[int], out_dir: Path,
                     pool: multiprocessing.pool.Pool, n_process: int, repeat: int) -> float:
    """Best-of-``repeat`` wall time to read ``inputs`` and write ``output_sizes`` bytes."""
    reads = _balance([(str(f), f.stat().st_size) for f in inputs], n_process)
    writes = _balance([((str(out_dir / f"out{i}.bin"), s), s)
                       for i, s in enumerate(output_sizes)], n_process)
    best = float("inf")
    for _ in range(repeat):
        out_dir.mkdir(parents=True, exist_ok=True)
        os.sync()
        start = time.perf_counter()
        pool.starmap(_io_worker, zip(reads, writes))
        best = min(best, time.perf_counter() - start)
        shutil.rmtree(out_dir)
    return best


# ----------------------------------------------------------------------------- merges

def tree_rss(proc: psutil.Process) -> int:
    """Sum of RSS (anonymous + file-backed) of ``proc`` and all its descendants."""
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


def run_and_measure(cmd: list[str], log_dir: Path) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak process-tree RSS). Exit loudly on failure."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_log, err_log = log_dir / "stdout.log", log_dir / "stderr.log"
    peak = 0
    done = threading.Event()
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        start = time.perf_counter()
        # as users run it: with Python's bytecode cache, which some environments (this one's CI
        # among them) turn off, so that every start compiles the package's modules again (~0.06 s)
        env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
        popen = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        proc = psutil.Process(popen.pid)

        def poll() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss(proc))
                done.wait(POLL_S)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        rc = popen.wait()
        seconds = time.perf_counter() - start
        done.set()
        poller.join()
    if rc != 0:
        print(f"\nFAILED (exit code {rc}): {shlex.join(cmd)}", file=sys.stderr)
        for label, log in (("stdout", out_log), ("stderr", err_log)):
            text = log.read_text(errors="replace").strip()
            if text:
                print(f"----- {label} -----\n{text}", file=sys.stderr)
        sys.exit(1)
    return seconds, peak


def merge_command(prefix: list[str], method: str, family: Family, out_dir: Path,
                  n_process: int, extra: list[str], quiet: bool = True) -> list[str]:
    """The mergekit command line for one benchmark run (``--quiet`` only where ``quiet``: other tools lack it)."""
    base, fine_tunes = family.base_and_fine_tunes(method)
    flags = METHOD_INPUTS.get(method, DEFAULT_INPUTS)[2]
    return [*prefix, "--merge_method", method, "--model_path_list", *map(str, fine_tunes),
            *(["--base_model_path", str(base)] if base else []), "--output_path", str(out_dir),
            "--n_process", str(n_process), *(["--quiet"] if quiet else []), *flags, *extra]


#: What a ``--compare`` command template may name; ``{models}`` as a whole word becomes one word per fine-tune.
PLACEHOLDERS = ("method", "base", "models", "output", "n_process")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


@dataclass
class Tool:
    """A merge command the benchmark times: this project's, or one given with ``--compare``.

    Either a prefix that takes PaddleNLP mergekit's flags (they are appended), or, when the command
    names a placeholder such as ``{output}``, a template filled in for each run with nothing appended.
    """

    label: str  # prefix of its rows' method names ("" for this project's)
    prefix: list[str]
    quiet: bool

    @property
    def template(self) -> bool:
        return any(_PLACEHOLDER.search(word) for word in self.prefix)

    def row_name(self, method: str) -> str:
        return f"{self.label}:{method}" if self.label else method

    def command(self, method: str, family: Family, out_dir: Path, n_process: int, extra: list[str]) -> list[str]:
        """The command line of one run."""
        if not self.template:
            return merge_command(self.prefix, method, family, out_dir, n_process, extra, self.quiet)
        base, fine_tunes = family.base_and_fine_tunes(method)
        values = {"method": method, "base": str(base or ""), "models": " ".join(map(str, fine_tunes)),
                  "output": str(out_dir), "n_process": str(n_process)}
        words: list[str] = []
        for word in self.prefix:
            words += (list(map(str, fine_tunes)) if word == "{models}"
                      else [_PLACEHOLDER.sub(lambda m: values[m.group(1)], word)])
        return words


def measure_startup(tools: list[Tool], work_dir: Path, args: argparse.Namespace, extra: list[str]) -> list[Row]:
    """The ``startup`` row of each tool: wall seconds, launch to exit, of a ``STARTUP_METHOD`` merge of a
    ``STARTUP_FAMILY`` family at n_process 1 (best of ``--repeat``, after ``--warmup_runs`` untimed runs).

    Its merge work (reading, merging and writing 4 x 1.3 MB) takes ~0.01 s, so the row is the command's
    fixed cost: interpreter start, imports, flags, planning, staging, verifying and publishing.
    """
    family_dir = work_dir / "startup_family"
    made = make_family(family_dir, n_models=N_FINE_TUNES, dtype=DTYPE, seed=args.seed, **STARTUP_FAMILY)
    family = Family(Path(made["base"]), [Path(f) for f in made["fine_tunes"]], {})
    input_bytes = sum(total_bytes(weight_files(m)) for m in family.inputs(STARTUP_METHOD))
    rows = []
    try:
        for tool in tools:
            runs = []
            for run in range(args.warmup_runs + args.repeat):
                out_dir = work_dir / "out_startup"
                try:
                    runs.append(run_and_measure(tool.command(STARTUP_METHOD, family, out_dir, 1, extra), work_dir / "logs"))
                finally:
                    shutil.rmtree(out_dir, ignore_errors=True)
                timed = "untimed warm-up" if run < args.warmup_runs else "run"
                print(f"{tool.row_name(STARTUP)} ({STARTUP_METHOD}, toy family), {timed}: {runs[-1][0]:.2f} s", flush=True)
            seconds, peaks = zip(*runs[args.warmup_runs:])
            rows.append(Row("startup", tool.row_name(STARTUP), 1, min(seconds), input_bytes, None, max(peaks)))
    finally:
        shutil.rmtree(family_dir, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------- report

def add_row(rows: list[Row], row: Row) -> None:
    """Append ``row``, with its speed-up over the same measurement at n_process 1 when that was taken."""
    single = [r for r in rows if r.method == row.method and r.n_process == 1]
    if single and row.n_process != 1:
        row.speedup = single[0].seconds / row.seconds
    rows.append(row)


def format_table(rows: list[Row]) -> str:
    header = ["method", "n_process", "seconds", "input GB/s", "x I/O floor", "speed-up", "peak RSS (MB)"]
    lines = [[r.method, str(r.n_process), f"{r.seconds:.2f}", f"{r.input_gbps:.2f}",
              "-" if r.x_floor is None else f"{r.x_floor:.2f}", "-" if r.speedup is None else f"{r.speedup:.2f}",
              "-" if r.peak_rss_bytes is None else f"{r.peak_rss_bytes / 1e6:.0f}"]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(x) for x in lines])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_dir = Path(tempfile.gettempdir()) / "llm_merge_bench"
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family_dir", type=Path, default=None,
                   help=f"toy family cache; generated once if missing or made with other "
                        f"parameters (default: {default_dir}/family_<params>). A directory "
                        f"without this script's marker that holds base/ and ft1/ .. ftK/ "
                        f"checkpoints (made elsewhere) is used as it is, never regenerated")
    p.add_argument("--base_model_path", type=Path, default=None,
                   help="with --model_path_list: benchmark this family made elsewhere instead "
                        "(checkpoint directories of any names; used as they are)")
    p.add_argument("--model_path_list", type=Path, nargs="+", default=None, metavar="PATH",
                   help="the fine-tunes of that family, 2 or more (slerp merges the first two)")
    p.add_argument("--params", type=float, default=5e8,
                   help="parameters per model, Llama proportions, bf16 (default: 5e8)")
    p.add_argument("--shard_size_mb", type=float, default=200,
                   help="max shard size of the generated family in MB (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="family seed (default: 0)")
    p.add_argument("--methods", nargs="+", default=[*ALL_METHODS, STARTUP], choices=[*ALL_METHODS, *MERGEKIT_METHODS, STARTUP],
                   metavar="METHOD", help=f"merge methods, and {STARTUP} for the start-up row (a linear merge of "
                                          f"a toy family of a few MB; default: all: {' '.join(ALL_METHODS)} {STARTUP}); "
                                          f"also mergekit's {' '.join(MERGEKIT_METHODS)} (nearswap t 1e-3, sce "
                                          "select_topk 0.3; karcher without the base)")
    p.add_argument("--n_process", nargs="+", type=int, default=[1, 2],
                   help="process counts to measure (default: 1 2)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per measurement; the fastest is reported, peak RSS is the "
                        "max over runs; a method's runs alternate between the n_process "
                        "values (default: 1; the I/O floor always uses at least 5)")
    p.add_argument("--warmup_runs", type=int, default=1,
                   help="untimed runs of each method before its timed ones, at the largest "
                        "--n_process: on a fresh install they compile the kernels into numba's "
                        "cache, a one-time cost a timed run would otherwise include (default: 1)")
    p.add_argument("--work_dir", type=Path, default=None,
                   help="where merge outputs go (each is deleted after its run; default: "
                        "a fresh temporary directory, removed at the end)")
    p.add_argument("--mergekit_cmd", default=None,
                   help=f"command prefix to run the merge, shell-quoted "
                        f"(default: '{sys.executable} {REPO / 'tools' / 'mergekit.py'}')")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=COMMAND",
                   help="another merge tool to time side by side, on the same family and I/O "
                        "floor; its rows are labelled NAME:method. Repeatable. COMMAND is a "
                        "shell-quoted command prefix taking the same flags (PaddleNLP's mergekit "
                        "names; no --quiet is added), or a template naming {output} and any of "
                        "{method} {base} {models} {n_process}, filled in for each run with nothing "
                        "added (e.g. 'mytool --out {output} {base} {models}')")
    p.add_argument("--extra_args", default="",
                   help="extra mergekit arguments appended to every run, shell-quoted "
                        "(default: none)")
    p.add_argument("--json", type=Path, default=None, help="also write results to this file")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if (args.base_model_path is None) != (args.model_path_list is None):
        p.error("--base_model_path and --model_path_list go together")
    if args.model_path_list is not None and args.family_dir is not None:
        p.error("--family_dir or --base_model_path/--model_path_list, not both")
    if args.model_path_list is not None and len(args.model_path_list) < 2:
        p.error("--model_path_list needs at least 2 fine-tunes")
    if args.warmup_runs < 0:
        p.error("--warmup_runs must be at least 0")
    for spec in args.compare:
        name, _, command = spec.partition("=")
        if not name or ":" in name or not shlex.split(command):
            p.error(f"--compare {spec!r}: expected NAME=COMMAND (a name without ':', then the command)")
        if _PLACEHOLDER.search(command) and "{output}" not in command:
            p.error(f"--compare {spec!r}: a command template must name {{output}}, where the merge goes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prefix = (shlex.split(args.mergekit_cmd) if args.mergekit_cmd
              else [sys.executable, str(REPO / "tools" / "mergekit.py")])
    extra = shlex.split(args.extra_args)
    tools = [Tool("", prefix, True)] + [Tool(name, shlex.split(command), False)
                                        for name, _, command in (c.partition("=") for c in args.compare)]

    machine = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    methods = [m for m in args.methods if m != STARTUP]
    if not methods:  # the start-up row alone: no family to set up, no floor
        family, where = Family(Path(), [], {}), "-"
    elif args.model_path_list is not None:
        family = given_family(args.base_model_path, args.model_path_list)
        where = f"{args.base_model_path} + {len(args.model_path_list)} fine-tunes"
    else:
        family_dir = args.family_dir or (Path(tempfile.gettempdir()) / "llm_merge_bench"
                                         / f"family_{int(args.params)}")
        family = ensure_family(family_dir, args.params, args.shard_size_mb, args.seed)
        where = str(family_dir)

    files = {m: weight_files(m) for m in [family.base, *family.fine_tunes]} if methods else {}
    input_sets = {tuple(family.inputs(m)) for m in methods}
    input_bytes = {s: sum(total_bytes(files[m]) for m in s) for s in input_sets}
    output_sizes = [f.stat().st_size for f in files[family.fine_tunes[0]]] if methods else []
    for s, nbytes in sorted(input_bytes.items()):
        users = [m for m in methods if tuple(family.inputs(m)) == s]
        print(f"inputs of {', '.join(users)}: {' + '.join(str(m) for m in s)} = {nbytes / GB:.3f} GB; "
              f"output ~ {sum(output_sizes) / GB:.3f} GB")

    own_work_dir = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="llm_merge_bench_")) if own_work_dir else args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    all_inputs, available = sum(total_bytes(fs) for fs in files.values()), psutil.virtual_memory().available
    if all_inputs > available:
        print(f"warning: the family's {all_inputs / GB:.1f} GB exceed the {available / GB:.1f} "
              f"GB of available memory: the page cache cannot hold them, so merges and floor read from disk",
              file=sys.stderr, flush=True)
    print("warming the page cache (all measurements below are page-cache warm) ...", flush=True)
    warm_page_cache([f for fs in files.values() for f in fs])

    rows: list[Row] = []
    try:
        floor_sets = sorted(input_sets, key=len, reverse=True)
        floors: dict[tuple[tuple[str, ...], int], float] = {}
        for n_process in args.n_process:
            with floor_pool(n_process) as pool:
                for s in floor_sets:
                    inputs = [f for m in s for f in files[m]]
                    floors[s, n_process] = io_floor_seconds(inputs, output_sizes, work_dir / "io_floor", pool,
                                                            n_process, max(FLOOR_REPEAT, args.repeat))
                    print(f"io_floor[{len(s)} models], n_process {n_process}: {floors[s, n_process]:.2f} s",
                          flush=True)
        # (seconds, peak RSS) of every run; a method's runs alternate between the process counts,
        # so a drift of the machine's speed (a shared VM) hits each count alike and spares the speed-up
        runs: dict[tuple[str, int], list[tuple[float, int]]] = {}
        warmups: dict[str, list[float]] = {}

        def run_merge(tool: Tool, method: str, n_process: int) -> tuple[float, int]:
            out_dir = work_dir / f"out_{method}_{n_process}"
            cmd = tool.command(method, family, out_dir, n_process, extra)
            os.sync()
            try:
                return run_and_measure(cmd, work_dir / "logs")
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)

        for method in methods:
            for tool in tools:
                for warmup in range(args.warmup_runs):
                    seconds, _ = run_merge(tool, method, max(args.n_process))
                    warmups.setdefault(tool.row_name(method), []).append(seconds)
                    print(f"{tool.row_name(method)}, n_process {max(args.n_process)}, warm-up "
                          f"{warmup + 1}/{args.warmup_runs} (untimed): {seconds:.2f} s", flush=True)
            for repeat in range(args.repeat):  # tools and process counts take turns: drift hits all alike
                for n_process in args.n_process:
                    for tool in tools:
                        seconds, rss = run_merge(tool, method, n_process)
                        runs.setdefault((tool.row_name(method), n_process), []).append((seconds, rss))
                        print(f"{tool.row_name(method)}, n_process {n_process}, run {repeat + 1}/{args.repeat}: "
                              f"{seconds:.2f} s, peak RSS {rss / 1e6:.0f} MB", flush=True)
        for n_process in args.n_process:
            for s in floor_sets:
                floor = floors[s, n_process]
                add_row(rows, Row("io_floor", f"io_floor[{len(s)} models]", n_process, floor, input_bytes[s],
                                  floor, None))
            for method in methods:
                s = tuple(family.inputs(method))
                for tool in tools:
                    seconds, peaks = zip(*runs[tool.row_name(method), n_process])
                    add_row(rows, Row("merge", tool.row_name(method), n_process, min(seconds), input_bytes[s],
                                      floors[s, n_process], max(peaks)))
        if STARTUP in args.methods:
            for row in measure_startup(tools, work_dir, args, extra):
                add_row(rows, row)
    finally:
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)

    notes = [
        "all input files are page-cache warm (warm-up read first; nothing dropped); "
        "os.sync() before each timed run so earlier writes' writeback does not interfere",
        "io_floor: read every input byte + write one model's bytes, files split over "
        "n_process processes, each output file fsynced (as the merge does before its rename)",
        "input GB/s = input bytes / wall seconds; x I/O floor = seconds / io_floor seconds "
        "for the same inputs and n_process; speed-up = the same row's seconds at n_process 1 / seconds "
        "(a method's runs alternate between the n_process values, so both see the machine alike)",
        "peak RSS = max over ~20 ms polls of the summed RSS (incl. file-backed pages) of the "
        "merge process tree; shared pages are counted once per process",
        f"each method ran {args.warmup_runs} untimed warm-up merge(s) at n_process {max(args.n_process)} "
        "before its timed runs (a cold numba cache compiles the kernels in the first run of a fresh install)",
        f"{STARTUP}: wall seconds, launch to exit, of a {STARTUP_METHOD} merge at n_process 1 of a toy family "
        "(tools/make_toy_models.py's defaults: base + 3 bf16 fine-tunes, 1.3 MB each; ~0.01 s of merge work): "
        "the fixed cost of a merge command",
    ]
    if methods:
        print(f"\nfamily: {where} ({family.describe()}, {len(files[family.fine_tunes[0]])} shards/model)")
    print(format_table(rows))
    print("\nnotes:\n" + "\n".join(f"  - {n}" for n in notes))
    if args.json:
        args.json.write_text(json.dumps(
            {"machine": machine, "family": family.spec | {"base": str(family.base), "fine_tunes": [str(f) for f in family.fine_tunes]} if methods else None,
             "command": prefix, "compare": {t.label: t.prefix for t in tools[1:]}, "extra_args": extra, "notes": notes,
             "warmup_seconds": warmups, "rows": [r.to_json() for r in rows]}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
