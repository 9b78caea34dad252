"""Liveness of a multi-rank merge: a rank killed with SIGKILL is noticed through its silent heartbeat.

The ranks run with a short --dist_heartbeat_timeout and the default --dist_timeout (a day), so
only the heartbeat can end a wait within these tests.
"""

import json
import time

import pytest

from conftest import run_mergekit
from llm_merge.run import heartbeat
from llm_merge.run import ranks as distributed
from llm_merge.config.options import MergeConfig
from llm_merge.config.validate import resolve
from llm_merge.errors import ConfigError
from test_distributed import clean_env, family, leftovers, merge_args, single_merge, spawn  # noqa: F401

#: --dist_heartbeat_timeout of these tests, in seconds (heartbeats every 0.5 s).
HEARTBEAT_TIMEOUT_SECONDS = 2
#: A survivor must have exited this long after the killed rank did, in seconds (startup and merge included).
SURVIVOR_EXIT_SECONDS = 10 * HEARTBEAT_TIMEOUT_SECONDS
#: The slow test's ranks sleep this long inside their merge, in seconds (longer than the timeout).
SLOW_SECONDS = 1.25 * HEARTBEAT_TIMEOUT_SECONDS

KILL_AT_START = {"LLM_MERGE_TEST_KILL_AT": "start"}  # heartbeat running, before the shards exist
KILL_MID_MERGE = {"LLM_MERGE_TEST_KILL_AFTER": "1"}  # after its first tensor
KILL_WAITING = {"LLM_MERGE_TEST_KILL_AT": "waiting"}  # after its share, while waiting


def presumed_dead(rank):
    return (f"llm_merge: error: rank {rank} sent no heartbeat for {HEARTBEAT_TIMEOUT_SECONDS} s "
            "(--dist_heartbeat_timeout); presumed dead; nothing was published")


@pytest.fixture(scope="module")
def single(family, tmp_path_factory):
    return single_merge(family, tmp_path_factory.mktemp("single"))


def live_args(family, out, *extra):
    return merge_args(family, out, "--dist_heartbeat_timeout", HEARTBEAT_TIMEOUT_SECONDS, *extra)


def assert_same_merge(single, out):
    """Same files and bytes as the single-process merge; merge_config.json differs only in output_path."""
    names = sorted(p.name for p in single.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        if name != "merge_config.json":
            assert (single / name).read_bytes() == (out / name).read_bytes(), name
    expected, got = (json.loads((d / "merge_config.json").read_text()) for d in (single, out))
    assert got.pop("output_path") == str(out) and expected.pop("output_path") != str(out)
    assert got == expected and got["dist_heartbeat_timeout"] == 60.0  # recorded at its default, like --rank


def staging_dirs(out):
    return sorted(out.parent.glob(f".{out.name}{distributed.STAGING_TAG}*"))


def run_until_exit(processes, limit=60):
    """Poll until every process has exited (or ``limit`` seconds passed: then kill the rest).

    Returns each process's (exit code, stderr, monotonic time its exit was first seen, None if killed here).
    """
    seen = {}
    deadline = time.monotonic() + limit
    try:
        while len(seen) < len(processes) and time.monotonic() < deadline:
            for process in processes:
                if process not in seen and process.poll() is not None:
                    seen[process] = time.monotonic()
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [(process.returncode, process.communicate()[1], seen.get(process)) for process in processes]


def last_line(stderr):
    return stderr.strip().splitlines()[-1]


def side_by_side(tmp_path, family, scenarios, survivor):
    """Run each scenario (name -> {rank: test hooks}) with its own output, all at once, world size 2.

    Returns, per scenario, its output path, the survivor's exit code and stderr, and the seconds
    from the last death in it (else from the start) to the survivor's exit (None if it never exited).
    """
    started = time.monotonic()
    runs = {}
    for name, hooks in scenarios.items():
        out = tmp_path / name / "out"
        out.parent.mkdir()
        runs[name] = (out, {rank: spawn(live_args(family, out), rank, 2, **env) for rank, env in hooks.items()})
    results = run_until_exit([process for _, ranks in runs.values() for process in ranks.values()])
    by_process = dict(zip([process for _, ranks in runs.values() for process in ranks.values()], results))
    report = {}
    for name, (out, ranks) in runs.items():
        deaths = []
        for rank, process in ranks.items():
            if rank != survivor:
                code, stderr, died = by_process[process]
                assert code == -9 and died is not None, (name, rank, stderr)  # killed by its test hook
                deaths.append(died)
        code, stderr, exited = by_process[ranks[survivor]]
        report[name] = (out, code, stderr, None if exited is None else exited - max(deaths, default=started))
    return report


def test_rank_0_aborts_when_a_rank_dies(tmp_path, family):
    """Rank 1 never starts, or is SIGKILLed before the shards exist or mid-merge: rank 0 declares it dead
    after the heartbeat timeout (counted from when it began waiting), removes everything, exits 1."""
    scenarios = {"never_started": {0: {}}, "before_shards": {1: KILL_AT_START, 0: {}}, "mid_merge": {1: KILL_MID_MERGE, 0: {}}}
    for name, (out, code, stderr, seconds) in side_by_side(tmp_path, family, scenarios, survivor=0).items():
        assert code == 1 and last_line(stderr) == presumed_dead(1), (name, stderr)
        assert seconds is not None and seconds < SURVIVOR_EXIT_SECONDS, name
        assert leftovers(out) == [], name


def test_rank_exits_when_rank_0_dies(tmp_path, family):
    """Rank 0 never starts, or is SIGKILLed before creating the shards or while waiting: rank 1 declares it
    dead and exits 1 without a failed marker; nothing is published. The staging directory stays: with
    shards in it, for --resume (the next run's rank 0 discards it without --resume)."""
    scenarios = {"never_started": {1: {}}, "before_shards": {0: KILL_AT_START, 1: {}}, "waiting": {0: KILL_WAITING, 1: {}}}
    for name, (out, code, stderr, seconds) in side_by_side(tmp_path, family, scenarios, survivor=1).items():
        assert code == 1 and last_line(stderr).startswith(presumed_dead(0)), (name, stderr)
        assert seconds is not None and seconds < SURVIVOR_EXIT_SECONDS, name
        assert not out.exists(), name
        (staging,) = staging_dirs(out)
        assert not (staging / "rank-1.failed").exists(), name
        resumable = name == "waiting"  # rank 0 created the shards
        assert last_line(stderr).endswith(f"{staging} is kept for --resume") == resumable, (name, stderr)


def test_rank_that_died_after_its_share_does_not_stop_the_merge(tmp_path, family, single):
    """Rank 1 dies after writing its done marker: its part is complete, so rank 0 still publishes."""
    out = tmp_path / "out"
    args = live_args(family, out)
    (code1, _, _), (code0, err0, _) = run_until_exit([spawn(args, 1, 2, **KILL_WAITING), spawn(args, 0, 2)])
    assert code1 == -9 and code0 == 0, err0
    assert_same_merge(single, out)
    assert leftovers(out) == ["out"]


def test_resume_after_rank_0_died(tmp_path, family, single):
    """Rank 0 is SIGKILLed mid-merge and rank 1 gives up; the job resubmitted with --resume publishes."""
    out = tmp_path / "out"
    args = live_args(family, out)
    (code0, _, died), (code1, err1, exited) = run_until_exit([spawn(args, 0, 2, **KILL_MID_MERGE), spawn(args, 1, 2)])
    assert code0 == -9 and died is not None and code1 == 1 and last_line(err1).startswith(presumed_dead(0)), err1
    assert exited is not None and exited - died < SURVIVOR_EXIT_SECONDS
    (staging,) = staging_dirs(out)
    assert last_line(err1).endswith(f"{staging} is kept for --resume") and not (staging / "rank-1.failed").exists()
    (code1, err1, _), (code0, err0, _) = run_until_exit([spawn([*args, "--resume"], rank, 2) for rank in (1, 0)])
    assert code0 == 0 and code1 == 0, err0 + err1
    assert "rank 0: resuming in" in err0, err0
    assert_same_merge(single, out)
    assert leftovers(out) == ["out"]


def test_slow_ranks_are_not_declared_dead(tmp_path, family, single):
    """Ranks whose merge stalls for longer than the heartbeat timeout still beat, and the merge publishes.

    Rank 0 sleeps SLOW_SECONDS in its share while rank 2 waits for the publish; rank 1 sleeps twice
    as long, so rank 0 then waits SLOW_SECONDS on it.
    """
    out = tmp_path / "out"
    args = live_args(family, out)
    ranks = [spawn(args, 0, 3, LLM_MERGE_TEST_SLOW_SECONDS=str(SLOW_SECONDS)),
             spawn(args, 1, 3, LLM_MERGE_TEST_SLOW_SECONDS=str(2 * SLOW_SECONDS)), spawn(args, 2, 3)]
    results = run_until_exit(ranks)
    assert all(code == 0 for code, _, _ in results), results
    assert_same_merge(single, out)
    assert leftovers(out) == ["out"]


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_heartbeat_timeout_is_checked(value):
    with pytest.raises(ConfigError, match=r"^--dist_heartbeat_timeout: .* must be a finite number of seconds > 0$"):
        resolve(MergeConfig(model_path_list=["a"], output_path="o", dist_heartbeat_timeout=value))


def test_heartbeat_timeout_is_not_a_boolean():
    with pytest.raises(ConfigError, match="dist_heartbeat_timeout"):
        resolve(MergeConfig(model_path_list=["a"], output_path="o", dist_heartbeat_timeout=True))


def test_heartbeat_timeout_flag(tmp_path, family):
    out = tmp_path / "out"
    result = run_mergekit(*merge_args(family, out, "--dist_heartbeat_timeout", "0"), env=clean_env())
    assert result.returncode == 2, result.stderr
    assert last_line(result.stderr) == "llm_merge: error: --dist_heartbeat_timeout: 0.0 must be a finite number of seconds > 0"
    assert leftovers(out) == []


def test_heartbeat_period_fits_the_timeout():
    assert heartbeat.heartbeat_period(60.0) == heartbeat.HEARTBEAT_SECONDS
    assert heartbeat.heartbeat_period(2.0) * heartbeat.HEARTBEATS_PER_TIMEOUT == 2.0


def test_heartbeat_never_writes_into_a_replaced_directory(tmp_path):
    """Once its directory is renamed away (and another made at its name), the heartbeat writes nowhere."""
    directory = tmp_path / "beats"
    directory.mkdir()
    beat = heartbeat.Heartbeat(directory, 3, period=0.01).start()
    try:
        assert (directory / "rank-3").exists()
        watch = heartbeat.Silence(directory, [3], timeout=0.5)
        time.sleep(0.2)
        assert watch.dead([3]) == []
        directory.rename(tmp_path / "away")
        (tmp_path / "away" / "rank-3").unlink()
        directory.mkdir()
        time.sleep(0.2)
        assert not (directory / "rank-3").exists() and not (tmp_path / "away" / "rank-3").exists()
    finally:
        beat.stop()
    time.sleep(0.6)
    assert watch.dead([3]) == [3]
