"""Smoke tests of the benchmark scripts on a tiny family (their figures are not checked, their plumbing is)."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_kernels  # noqa: E402
import bench_merge  # noqa: E402


def test_bench_merge_writes_a_row_per_measurement(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_merge.main(["--family_dir", str(tmp_path / "family"), "--params", "2e6", "--methods", "linear", "della",
                             "--n_process", "1", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["warmup_seconds"]) == {"linear", "della"}
    assert all(len(times) == 1 and times[0] > 0 for times in result["warmup_seconds"].values())
    rows = result["rows"]
    assert [(r["kind"], r["method"], r["n_process"]) for r in rows] == [
        ("io_floor", "io_floor[4 models]", 1), ("merge", "linear", 1), ("merge", "della", 1),
        ("io_floor", "io_floor[4 models]", 2), ("merge", "linear", 2), ("merge", "della", 2)]
    assert all(r["seconds"] > 0 and r["input_bytes"] > 0 for r in rows)
    assert all(r["peak_rss_bytes"] > 0 for r in rows if r["kind"] == "merge")
    single = {r["method"]: r["seconds"] for r in rows if r["n_process"] == 1}
    for row in rows:
        expected = None if row["n_process"] == 1 else single[row["method"]] / row["seconds"]
        assert row["speedup"] == expected


def test_bench_kernels_times_every_pass(tmp_path, capsys):
    assert bench_kernels.main(["--family_dir", str(tmp_path / "family"), "--params", "2e6", "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    timed = {line.rsplit(None, 1)[0]: float(line.rsplit(None, 1)[1]) for line in lines
             if line.startswith(("statistics:", "apply:"))}
    assert set(timed) == {"statistics: trim", "statistics: ranks", "apply: linear", "apply: ties",
                          "apply: dare_linear", "apply: dare_ties", "apply: della (statistics subtracted)",
                          "apply: della_linear (statistics subtracted)"}
    assert all(timed[name] > 0 for name in timed if name.startswith("statistics"))


def test_bench_merge_checks_its_run_counts():
    assert bench_merge.parse_args([]).warmup_runs == 1
    assert bench_merge.parse_args(["--warmup_runs", "0"]).warmup_runs == 0
    for bad in (["--warmup_runs", "-1"], ["--repeat", "0"]):
        with pytest.raises(SystemExit):
            bench_merge.parse_args(bad)


def test_bench_merge_times_other_tools_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    other = f"{sys.executable} {BENCHMARKS.parent / 'tools' / 'mergekit.py'}"  # this tool under another name
    assert bench_merge.main(["--family_dir", str(tmp_path / "family"), "--params", "2e6", "--methods", "linear",
                             "--n_process", "1", "--warmup_runs", "0", "--compare", f"again={other}",
                             "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["kind"], r["method"]) for r in result["rows"]] == [
        ("io_floor", "io_floor[4 models]"), ("merge", "linear"), ("merge", "again:linear")]
    assert result["compare"] == {"again": [sys.executable, str(BENCHMARKS.parent / "tools" / "mergekit.py")]}
    assert result["warmup_seconds"] == {}
    with pytest.raises(SystemExit):
        bench_merge.parse_args(["--compare", "no-command"])
