"""One merge across several ranks (--rank/--world_size, paddle.distributed.launch): byte-identical, fail-safe, resumable."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import pytest

from checkpoints import make_llama_family
from conftest import REPO, run_mergekit
from llm_merge.run import heartbeat
from llm_merge.run import ranks as distributed
from llm_merge.config.options import MergeConfig

SCRIPT = str(REPO / "tools" / "mergekit.py")


def clean_env(**extra):
    """The environment without any launcher's rank variables (the tests set ranks themselves)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "SLURM_", "LLM_MERGE_TEST_"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_llama_family(tmp_path_factory.mktemp("family"), n_models=3, dtype=ml_dtypes.bfloat16)


def merge_args(family, out, *extra):
    # 3000-byte shards: 7 output files, so ranks share files and tensors from many files
    return ["--merge_method", "dare_ties", "--base_model_path", family.base_dir, "--model_path_list", *family.model_dirs,
            "--output_path", out, "--max_shard_size", "3000", *extra]


def single_merge(family, tmp_path, *extra):
    """The single-process merge, written to out/ and moved to single/ (merge_config.json records output_path and n_process)."""
    result = run_mergekit(*merge_args(family, tmp_path / "out", *extra), env=clean_env())
    assert result.returncode == 0, result.stderr
    (tmp_path / "out").rename(tmp_path / "single")
    return tmp_path / "single"


@pytest.fixture
def single(family, tmp_path):
    return single_merge(family, tmp_path)


def spawn(args, rank, world, **env):
    cmd = [sys.executable, SCRIPT, *map(str, args), "--rank", str(rank), "--world_size", str(world)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(**env))


def finish(procs, timeout=60):
    return [(p.wait(timeout=timeout), p.communicate()[1]) for p in procs]


def assert_same_files(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))



@pytest.mark.parametrize("world,n_process", [(1, 1), (2, 1), (3, 1), (2, 2)])
def test_ranks_byte_identical_to_single_process(tmp_path, family, world, n_process):
    single = single_merge(family, tmp_path, "--n_process", n_process)
    out = tmp_path / "out"
    args = merge_args(family, out, "--n_process", n_process)
    results = finish([spawn(args, rank, world) for rank in reversed(range(world))])  # rank 0 last: others wait for it
    assert all(code == 0 for code, _ in results), results
    assert_same_files(single, out)
    assert leftovers(out) == ["out"]


@pytest.mark.skipif(importlib.util.find_spec("paddle") is None, reason="paddle not installed")
def test_paddle_distributed_launch(tmp_path, family, single):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "log"),
           SCRIPT, *map(str, merge_args(family, out))]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=clean_env())
    logs = "".join(p.read_text() for p in sorted((tmp_path / "log").glob("workerlog.*")))
    assert result.returncode == 0, result.stderr + logs
    assert "rank 1 of 2 (PADDLE_TRAINER_ID/PADDLE_TRAINERS_NUM)" in logs
    assert_same_files(single, out)


def test_failed_rank_publishes_nothing(tmp_path, family):
    """Rank 1 gets SIGTERM after its first tensor: it leaves a failed marker, rank 0 aborts; both exit 1."""
    out = tmp_path / "out"
    args = merge_args(family, out)
    follower = spawn(args, 1, 2, LLM_MERGE_TEST_KILL_AFTER="1:TERM")
    (code1, err1), (code0, err0) = finish([follower, spawn(args, 0, 2)])
    assert code1 == 1 and "terminated by signal" in err1, err1
    assert code0 == 1 and "rank 1 failed: terminated by signal" in err0, err0
    assert leftovers(out) == []


def test_killed_rank_times_out_and_publishes_nothing(tmp_path, family):
    """Rank 1 is SIGKILLed (no marker): rank 0 gives up after --dist_timeout, removes the staging dir, exits 1."""
    out = tmp_path / "out"
    args = merge_args(family, out, "--dist_timeout", "2")
    (code1, _), (code0, err0) = finish([spawn(args, 1, 2, LLM_MERGE_TEST_KILL_AFTER="2"), spawn(args, 0, 2)])
    assert code1 == -9
    assert code0 == 1 and "timed out after 2 s (--dist_timeout) waiting for rank(s) 1" in err0, err0
    assert leftovers(out) == []


def test_bad_flag_on_one_rank(tmp_path, family):
    out = tmp_path / "out"
    result = run_mergekit(*merge_args(family, out), "--rank", "2", "--world_size", "2", env=clean_env())
    assert result.returncode == 2 and "--rank: 2 out of range [0, 2)" in result.stderr
    result = run_mergekit(*merge_args(family, out), "--rank", "0", env=clean_env())
    assert result.returncode == 2 and "give both or neither" in result.stderr
    assert leftovers(out) == []


def test_killed_rank_resumes(tmp_path, family, single):
    """Rank 1 dies (SIGKILL) after 2 tensors; restarted with --resume it reuses them and rank 0 publishes."""
    out = tmp_path / "out"
    args = merge_args(family, out)
    lead = spawn(args, 0, 2)
    (code1, _), = finish([spawn(args, 1, 2, LLM_MERGE_TEST_KILL_AFTER="2")])
    assert code1 == -9 and lead.poll() is None  # rank 0 still waits for rank 1
    staging = next(out.parent.glob(f".out{distributed.STAGING_TAG}*"))
    journal = [json.loads(line) for path in staging.glob("journal-1-*.jsonl") for line in path.read_text().splitlines()]
    assert len(journal) == 2
    (code1, err1), (code0, err0) = finish([spawn([*args, "--resume"], 1, 2), lead])
    assert code1 == 0 and code0 == 0, err1 + err0
    assert "rank 1: resumed 2 tensors" in err1, err1
    assert_same_files(single, out)
    assert leftovers(out) == ["out"]


def test_resume_recomputes_a_corrupted_tensor(tmp_path, family, single):
    """A journaled tensor whose bytes no longer match its crc32 is merged again."""
    out = tmp_path / "out"
    args = merge_args(family, out)
    lead = spawn(args, 0, 2)
    assert finish([spawn(args, 1, 2, LLM_MERGE_TEST_KILL_AFTER="2")])[0][0] == -9
    staging = next(out.parent.glob(f".out{distributed.STAGING_TAG}*"))
    entry = json.loads(next(staging.glob("journal-1-*.jsonl")).read_text().splitlines()[0])
    with open(staging / entry["file"], "r+b") as handle:
        handle.seek(entry["start"])
        handle.write(bytes(4))
    (code1, err1), (code0, err0) = finish([spawn([*args, "--resume"], 1, 2), lead])
    assert code1 == 0 and code0 == 0, err1 + err0
    assert "rank 1: resumed 1 tensors" in err1, err1
    assert_same_files(single, out)


def test_shares_are_balanced_and_deterministic():
    class T:
        def __init__(self, n):
            self.in_bytes, self.out_bytes = 3 * n, n

    tasks = [T(n) for n in (100, 90, 50, 40, 30, 20, 10, 10, 5, 1)]
    shares = distributed.assign(tasks, 3)
    assert shares == distributed.assign(tasks, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(tasks)))
    loads = [sum(tasks[i].out_bytes for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(t.out_bytes for t in tasks)  # greedy largest-first bound
    assert distributed.assign(tasks, 1) == [list(range(len(tasks)))]


def test_rank_from_environment(monkeypatch):
    cfg = MergeConfig(model_path_list=["a"], output_path="o")
    for var in [v for v in os.environ if v.startswith(("PADDLE_", "SLURM_"))]:
        monkeypatch.delenv(var)
    assert distributed.context(cfg) is None
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.context(cfg) is None  # a one-task Slurm job is the ordinary single-process merge
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert distributed.context(cfg) == distributed.DistContext(3, 4, "SLURM_PROCID/SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("PADDLE_TRAINER_ID", "1")
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    assert distributed.context(cfg).rank == 1
    assert distributed.context(MergeConfig(model_path_list=["a"], output_path="o", rank=0, world_size=1)).world_size == 1
