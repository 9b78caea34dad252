"""Bad inputs stop the run early; failures and kills never leave a partial output."""

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from checkpoints import write_checkpoint
from conftest import REPO, run_mergekit
from llm_merge.api import merge
from llm_merge.config.options import MergeConfig
from llm_merge.errors import MergeError


def leftovers(out):
    """Anything named after the output under its parent (output dir or staging dirs)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def assert_failed_cleanly(result, out, *needles, code=1):
    assert result.returncode == code, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert leftovers(out) == []


def test_tensor_names_differ(tmp_path, pair):
    write_checkpoint(tmp_path / "odd", {"w": np.zeros((8, 4), np.float32), "extra": np.zeros(2, np.float32)})
    out = tmp_path / "out"
    result = run_mergekit("--model_path_list", pair["ft1"], tmp_path / "odd", "--output_path", out)
    assert_failed_cleanly(result, out, "tensor names differ", "missing 2 (b, ids)", "extra 1 (extra)")


def test_shapes_differ(tmp_path, pair):
    write_checkpoint(tmp_path / "odd", {"w": np.zeros((4, 8), np.float32), "b": np.zeros(4, np.float32), "ids": np.arange(4)})
    out = tmp_path / "out"
    result = run_mergekit("--model_path_list", pair["ft1"], tmp_path / "odd", "--output_path", out)
    assert_failed_cleanly(result, out, "w: [8, 4] in", "but [4, 8] in")


def test_transposed_broadcastable_shapes_are_not_merged(tmp_path):
    write_checkpoint(tmp_path / "a", {"w": np.ones((4, 1), np.float32)})
    write_checkpoint(tmp_path / "b", {"w": np.ones((1, 4), np.float32)})
    out = tmp_path / "out"
    assert_failed_cleanly(run_mergekit("--model_path_list", tmp_path / "a", tmp_path / "b", "--output_path", out), out, "[4, 1]")


def test_non_float_tensor_that_differs_fails_in_a_worker(tmp_path, pair):
    write_checkpoint(tmp_path / "odd", {"w": np.zeros((8, 4), np.float32), "b": np.zeros(4, np.float32), "ids": np.arange(1, 5)})
    out = tmp_path / "out"
    result = run_mergekit("--model_path_list", pair["ft1"], tmp_path / "odd", "--output_path", out, "--n_process", "2")
    assert_failed_cleanly(result, out, "tensor ids", "must be equal")


def test_existing_output_needs_overwrite(tmp_path, pair):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_mergekit("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", out)
    assert result.returncode == 1 and "not empty" in result.stderr and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    result = run_mergekit("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert eventually(lambda: leftovers(out) == ["out"])  # the old output is deleted in the background


def eventually(condition, seconds=10):
    """Whether ``condition()`` holds within ``seconds`` (polled)."""
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


def dead_pid():
    """The pid of a process that has exited."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def test_overwrite_moves_the_old_output_aside_and_deletes_it_in_the_background(tmp_path, pair):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = run_mergekit("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert f"replaced {out}; its previous contents are being deleted in the background" in result.stderr
    assert (out / "model.safetensors").exists() and not (out / "old.txt").exists()
    assert eventually(lambda: leftovers(out) == ["out"])


def test_overwrite_of_a_link_removes_the_link_never_what_it_points_to(tmp_path, pair):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("precious")
    out = tmp_path / "out"
    out.symlink_to(target)
    result = run_mergekit("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not out.is_symlink() and (out / "model.safetensors").exists()
    assert (target / "precious.txt").read_text() == "precious" and [p.name for p in target.iterdir()] == ["precious.txt"]
    assert eventually(lambda: leftovers(out) == ["out"])


def test_an_old_output_set_aside_by_a_killed_run_is_put_back(tmp_path, pair):
    """Killed between setting the old output aside and renaming the new one in: the old one returns, whole."""
    out = tmp_path / "out"
    old = tmp_path / f".out.llm_merge-old-{dead_pid()}-deadbeef"
    old.mkdir()
    (old / "keep.txt").write_text("precious")
    result = run_mergekit("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", out)
    assert result.returncode == 1 and "not empty; pass --overwrite" in result.stderr, result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    assert leftovers(out) == ["out"]


def test_old_outputs_left_by_killed_runs_are_deleted_once_replaced(tmp_path, pair):
    """Killed after the new output was in place: the old one (set aside, or partly deleted) goes."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "current.txt").write_text("current")
    for tag in ("old", "deleting"):
        stale = tmp_path / f".out.llm_merge-{tag}-{dead_pid()}-deadbeef"
        stale.mkdir()
        (stale / "stale.txt").write_text("stale")
    result = run_mergekit("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", out)
    assert result.returncode == 1 and "not empty; pass --overwrite" in result.stderr, result.stderr
    assert (out / "current.txt").read_text() == "current"
    assert eventually(lambda: leftovers(out) == ["out"])


def test_empty_existing_output_is_fine(tmp_path, pair):
    out = tmp_path / "out"
    out.mkdir()
    assert run_mergekit("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", out).returncode == 0


def test_debug_shows_traceback(tmp_path):
    result = run_mergekit("--model_path_list", tmp_path / "nope", "--output_path", tmp_path / "o", "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr
    result = run_mergekit("--model_path_list", tmp_path / "nope", "--output_path", tmp_path / "o")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_nan_and_mixed_dtype_warnings(tmp_path):
    bad = np.ones(10, np.float32)
    bad[[2, 5]] = [np.nan, np.inf]
    write_checkpoint(tmp_path / "a", {"w": bad})
    write_checkpoint(tmp_path / "b", {"w": np.ones(10, np.float16)})
    result = run_mergekit("--model_path_list", tmp_path / "a", tmp_path / "b", "--output_path", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "tensor w has 2 NaN/Inf value(s)" in result.stderr
    assert "mixed float dtypes" in result.stderr


def test_full_disk_leaves_nothing(tmp_path, pair, monkeypatch):
    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", no_space)
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="No space left on device"):
        merge(MergeConfig(model_path_list=[str(pair["ft1"]), str(pair["ft2"])], output_path=str(out), quiet=True))
    assert leftovers(out) == []


def test_a_disk_too_small_for_the_output_fails_before_merging_and_leaves_nothing(tmp_path, pair, monkeypatch):
    """The output's space is reserved when its files are created: no room fails there, before any tensor is
    merged (no write is attempted)."""
    import ctypes

    from llm_merge.io import shards

    def no_room(fd, mode, offset, length):
        ctypes.set_errno(errno.ENOSPC)
        return -1

    writes = []
    monkeypatch.setattr(shards, "_fallocate", no_room)
    monkeypatch.setattr(os, "pwrite", lambda *args: writes.append(args))
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="cannot create output shard: No space left on device"):
        merge(MergeConfig(model_path_list=[str(pair["ft1"]), str(pair["ft2"])], output_path=str(out), quiet=True))
    assert leftovers(out) == [] and writes == []


def test_stale_staging_directory_is_removed(tmp_path, pair):
    out = tmp_path / "out"
    stale = tmp_path / f".out.llm_merge-tmp-{dead_pid()}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert run_mergekit("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", out).returncode == 0
    assert leftovers(out) == ["out"]


# -- killing real runs mid-merge ------------------------------------------------------


@pytest.fixture(scope="module")
def big_family(tmp_path_factory):
    """Base + 3 fp32 models of 8 x 4M elements (128 MB each): della without numba takes seconds."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    base = {f"layer{i}.weight": rng.normal(size=(2048, 2048)).astype(np.float32) for i in range(8)}
    write_checkpoint(root / "base", base, extra_files=False)
    dirs = []
    for m in range(3):
        write_checkpoint(root / f"ft{m}", {k: v + np.float32(0.01) * (m + 1) for k, v in base.items()}, extra_files=False)
        dirs.append(root / f"ft{m}")
    return root, dirs


def start_merge(family, out, n_process, *flags):
    root, dirs = family
    cmd = [sys.executable, str(REPO / "tools" / "mergekit.py"), "--merge_method", "della", "--base_model_path", root / "base",
           "--model_path_list", *dirs, "--output_path", out, "--n_process", str(n_process), *flags]
    # plain NumPy (whole-tensor argsort ranks): seconds of work, so signals land mid-merge
    env = {**os.environ, "LLM_MERGE_NUMBA": "0"}
    return subprocess.Popen(list(map(str, cmd)), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_work(proc, out, workers):
    """Wait until the staging directory exists and the worker processes run."""
    deadline = time.time() + 60
    while time.time() < deadline:
        children = psutil.Process(proc.pid).children()
        if len(children) >= workers and any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir()):
            time.sleep(0.3)
            return children
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("merge did not start")


def test_worker_killed_with_sigkill(tmp_path, big_family):
    out = tmp_path / "out"
    proc = start_merge(big_family, out, 2)
    children = wait_for_work(proc, out, 2)
    os.kill(children[0].pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "killed by signal 9" in err
    assert leftovers(out) == []


def running(processes):
    """Those of ``processes`` still running (a zombie, waiting to be reaped, has stopped)."""
    alive = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize(
    "signum, code, message",
    [
        (signal.SIGTERM, 1, "terminated by signal SIGTERM; no output was written"),
        (signal.SIGHUP, 1, "terminated by signal SIGHUP; no output was written"),
        (signal.SIGINT, 130, "interrupted; no output was written"),
    ],
)
def test_main_process_interrupted(tmp_path, big_family, signum, code, message):
    """The run stops: one line, its exit code, workers gone, no staging directory, the old output untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = start_merge(big_family, out, 2, "--overwrite", "--quiet")
    children = wait_for_work(proc, out, 2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err == f"llm_merge: error: {message}\n"
    assert leftovers(out) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert running(children) == []


def test_workers_die_with_the_main_process(tmp_path, big_family):
    """SIGKILL gives the main process no chance to stop its workers: the kernel ends them (parent-death signal)."""
    out = tmp_path / "out"
    proc = start_merge(big_family, out, 2, "--quiet")
    children = wait_for_work(proc, out, 2)
    proc.kill()
    proc.wait()  # not communicate(): the workers hold its stderr open
    deadline = time.time() + 2  # the merge itself has seconds of work left
    while running(children) and time.time() < deadline:
        time.sleep(0.05)
    assert running(children) == []
    proc.communicate()
    assert not out.exists()


def test_a_second_stop_signal_does_not_cut_the_cleanup_short_and_nohup_is_respected():
    from llm_merge.io import signals

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with pytest.raises(signals.Terminated, match="^terminated by signal SIGTERM; no output was written$"):
            with signals.stop_signals_raise():
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # interrupted by the handler's exception
                finally:
                    os.kill(os.getpid(), signal.SIGTERM)  # while cleaning up: ignored
                    time.sleep(0.01)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_main_process_killed_leaves_only_a_staging_dir_that_the_next_run_removes(tmp_path, big_family):
    out = tmp_path / "out"
    proc = start_merge(big_family, out, 1)
    wait_for_work(proc, out, 0)
    proc.kill()
    proc.communicate()
    assert not out.exists()
    root, dirs = big_family
    result = run_mergekit("--model_path_list", dirs[0], "--output_path", out, timeout=300)
    assert result.returncode == 0, result.stderr
    assert leftovers(out) == ["out"]


# -- every bad input through the CLI: exit code, culprit named, nothing written -----------


def _corrupt(kind):
    import json as _json
    import struct as _struct

    def make(directory):
        directory.mkdir()
        path = directory / "model.safetensors"
        entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        if kind == "bad_length":
            path.write_bytes(_struct.pack("<Q", 10**6) + b"{}")
        elif kind == "bad_json":
            path.write_bytes(_struct.pack("<Q", 8) + b"{oops!!}")
        elif kind == "past_end":
            header = _json.dumps({"w": entry}).encode()
            path.write_bytes(_struct.pack("<Q", len(header)) + header + b"\0" * 4)
        elif kind == "overlap":
            header = _json.dumps({"w": entry, "v": {**entry, "data_offsets": [4, 12]}}).encode()
            path.write_bytes(_struct.pack("<Q", len(header)) + header + b"\0" * 12)
        elif kind == "huge_header":
            path.write_bytes(_struct.pack("<Q", 2 * 10**8) + b"{}")
        elif kind == "missing_shard":
            path.unlink(missing_ok=True)
            (directory / "model.safetensors.index.json").write_text(_json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
        elif kind == "outside":
            (directory / "model.safetensors.index.json").write_text(_json.dumps({"weight_map": {"w": "../x.safetensors"}}))
        elif kind == "no_checkpoint":
            (directory / "config.json").write_text("{}")
        return directory

    return make


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("bad_length", "runs past the end"),
        ("bad_json", "not valid JSON"),
        ("past_end", "past the data buffer"),
        ("overlap", "overlapping"),
        ("huge_header", "exceeds the limit"),
        ("missing_shard", "does not exist"),
        ("outside", "outside the checkpoint directory"),
        ("no_checkpoint", "no checkpoint for prefix"),
    ],
)
def test_broken_checkpoint_via_cli(tmp_path, pair, kind, needle):
    broken = _corrupt(kind)(tmp_path / "broken")
    out = tmp_path / "out"
    result = run_mergekit("--model_path_list", pair["ft1"], broken, "--output_path", out)
    assert_failed_cleanly(result, out, needle, "broken")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--weight_list", "1"], "--weight_list: 1 weight(s) given for 2 model(s)"),
        (["--weight_list", "1", "nan"], "--weight_list"),
        (["--reserve_p", "1.5"], "--reserve_p: 1.5 out of range"),
        (["--merge_method", "della", "--epsilon", "1.2"], "--epsilon: 1.2 out of range"),
        (["--merge_method", "slerp", "--slerp_alpha", "-0.1"], "--slerp_alpha: -0.1 out of range"),
        (["--merge_method", "dare_ties", "--merge_type", "linear"], "contradicts --merge_method dare_ties"),
    ],
)
def test_bad_flags_via_cli(tmp_path, pair, flags, needle):
    out = tmp_path / "out"
    result = run_mergekit("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", out, *flags)
    assert_failed_cleanly(result, out, needle, code=2)


def test_slerp_needs_two_models_via_cli(tmp_path, pair):
    out = tmp_path / "out"
    result = run_mergekit("--merge_method", "slerp", "--model_path_list", pair["ft1"], pair["ft2"], pair["base"], "--output_path", out)
    assert_failed_cleanly(result, out, "slerp merges exactly 2 models, got 3", code=2)


@pytest.mark.parametrize("inside", [False, True])
def test_output_equal_to_or_inside_an_input(tmp_path, pair, inside):
    out = pair["ft2"] / "merged" if inside else pair["ft2"]
    result = run_mergekit("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", out)
    assert result.returncode == 2 and "--output_path" in result.stderr and str(pair["ft2"]) in result.stderr
    assert not (pair["ft2"] / "merged").exists()


# -- inputs truncated before or during the run: an error naming the file and the tensor ------

#: Runs the merge (``merge ARGS``) or LoRA fold (``lora ARGS``) command line, truncating the file named by
#: $TRUNCATE_AFTER_PLAN to its header once the plan has read every header: as if another process cut it meanwhile.
TRUNCATING_CLI = """
import os, sys
from llm_merge import api
from llm_merge.lora import fold as lora_merge
from llm_merge.io.safetensors_format import read_header

def truncating(build):
    def build_then_truncate(*args, **kwargs):
        plan = build(*args, **kwargs)
        victim = os.environ["TRUNCATE_AFTER_PLAN"]
        os.truncate(victim, min(info.start for info in read_header(victim).tensors.values()))
        return plan
    return build_then_truncate

api.build_plan = truncating(api.build_plan)
lora_merge.build_fold_plan = truncating(lora_merge.build_fold_plan)
if sys.argv.pop(1) == "lora":
    from llm_merge.cli.lora import main
    sys.exit(main())
from llm_merge.cli.merge import main_entry
main_entry()
"""

#: (command, flags, LLM_MERGE_NUMBA): NumPy and compiled (mapped chunks) merges, Paddle, the LoRA fold.
READ_PATHS = {
    "numpy-1": ("merge", ["--n_process", "1"], "0"),
    "numpy-2": ("merge", ["--n_process", "2"], "0"),
    "compiled-1": ("merge", ["--n_process", "1"], "1"),
    "compiled-2": ("merge", ["--n_process", "2"], "1"),
    "paddle-1": ("merge", ["--n_process", "1", "--tensor_type", "pd"], "0"),
    "lora-1": ("lora", ["--n_process", "1"], "0"),
    "lora-2": ("lora", ["--n_process", "2"], "0"),
}


@pytest.fixture
def fold_inputs(tmp_path):
    """A base model and a PEFT adapter for it."""
    from test_lora import factors, make_base, write_peft

    make_base(tmp_path / "lora_base")
    write_peft(tmp_path / "adapter", factors(4), r=4, alpha=8)
    return tmp_path / "lora_base", tmp_path / "adapter"


def command_line(path, pair, fold_inputs, out):
    """The flags of ``path`` and the input file it reads that the test may truncate."""
    command, flags, _ = READ_PATHS[path]
    if command == "lora":
        base, adapter = fold_inputs
        return ["--model_name_or_path", base, "--lora_path", adapter, "--output_path", out, *flags], base / "model.safetensors"
    models = ["--merge_method", "dare_ties", "--base_model_path", pair["base"], "--model_path_list", pair["ft1"], pair["ft2"]]
    return [*models, "--output_path", out, *flags], pair["ft2"] / "model.safetensors"


@pytest.mark.parametrize("path", ["numpy-2", "compiled-1", "paddle-1", "lora-1"])
def test_input_truncated_before_the_run(tmp_path, pair, fold_inputs, path):
    """A header that promises more bytes than the file holds is refused at plan time, naming file and tensor."""
    out = tmp_path / "out"
    args, victim = command_line(path, pair, fold_inputs, out)
    os.truncate(victim, victim.stat().st_size - 4)
    tool = "merge_lora_params.py" if READ_PATHS[path][0] == "lora" else "mergekit.py"
    cmd = [sys.executable, str(REPO / "tools" / tool), *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "LLM_MERGE_NUMBA": READ_PATHS[path][2]})
    assert_failed_cleanly(result, out, str(victim), "tensor '", "truncated")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("path", list(READ_PATHS))
def test_input_truncated_during_the_run(tmp_path, pair, fold_inputs, path):
    """Cut after the plan read its header, the file is an error naming it and the tensor being read: never SIGBUS."""
    out = tmp_path / "out"
    args, victim = command_line(path, pair, fold_inputs, out)
    command, _, numba = READ_PATHS[path]
    cmd = [sys.executable, "-c", TRUNCATING_CLI, command, *map(str, args), "--quiet"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "LLM_MERGE_NUMBA": numba, "TRUNCATE_AFTER_PLAN": str(victim)})
    assert_failed_cleanly(result, out, "failed on tensor ", f"{victim}: unexpected end of file at byte")
    assert result.stderr.count("\n") == 1


def test_a_worker_that_cannot_start_surfaces_its_own_error_and_stops_the_others(monkeypatch):
    """Fork failing for the second worker (out of memory or processes) is the error raised, not a failure to
    stop a worker that never started, and the first worker does not outlive the call."""
    from types import SimpleNamespace

    import multiprocess.process

    from llm_merge.run.pool import run_tasks

    started = []
    real_start = multiprocess.process.BaseProcess.start

    def start(process):
        if started:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        real_start(process)
        started.append(process)

    monkeypatch.setattr(multiprocess.process.BaseProcess, "start", start)

    class Worker:
        def run(self, task):
            time.sleep(60)

        def close(self):
            pass

    tasks = [SimpleNamespace(name=f"t{i}", in_bytes=1, out_bytes=1, out=SimpleNamespace(file="f")) for i in range(3)]
    with pytest.raises(OSError, match="Resource temporarily unavailable"):
        run_tasks(tasks, Worker, 2, quiet=True, desc="test", start_method="fork")
    assert len(started) == 1 and not started[0].is_alive()
