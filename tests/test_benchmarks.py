"""Smoke tests of the benchmark scripts on a tiny family (their figures are not checked, their plumbing is)."""

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_kernel_choice  # noqa: E402
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
                          "apply: dare_linear", "apply: dare_ties", "apply: della",
                          "apply: della_linear", "statistics: magnitude", "statistics: random",
                          "statistics: della_magprune", "apply: mergekit ties", "apply: mergekit dare_ties",
                          "apply: mergekit della"}
    assert all(timed[name] > 0 for name in timed if name.startswith("statistics"))


def test_bench_kernel_choice_times_both_paths_and_names_the_pick(tmp_path, capsys):
    assert bench_kernel_choice.main(["--families", "toy", "--methods", "linear", "ties", "--repeat", "1",
                                     "--cache_dir", str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["toy", "linear"], ["toy", "ties"]]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 and row[5] == "numpy" for row in rows)  # 5 MB: NumPy


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


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*")) if f.is_file()}


def test_bench_merge_runs_on_a_family_made_elsewhere_and_leaves_it_alone(tmp_path):
    from llm_merge.toy import make_family

    made = tmp_path / "theirs"
    make_family(made, n_models=2, dtype="float16", seed=7)  # not this script's family: 2 fine-tunes, float16
    models = tmp_path / "named"
    models.mkdir()
    for old, new in (("base", "original"), ("ft1", "chat"), ("ft2", "code")):
        (made / old).rename(models / new)
    before = _snapshot(models)
    out = tmp_path / "bench.json"
    assert bench_merge.main(["--base_model_path", str(models / "original"), "--model_path_list",
                             str(models / "chat"), str(models / "code"), "--methods", "linear", "slerp",
                             "--n_process", "1", "--warmup_runs", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["family"]["given"] is True and result["family"]["dtypes"] == ["F16"]
    assert result["family"]["fine_tunes"] == [str(models / "chat"), str(models / "code")]
    # both methods merge base + the 2 fine-tunes: one floor for the 3 models
    assert [(r["kind"], r["method"]) for r in result["rows"]] == [
        ("io_floor", "io_floor[3 models]"), ("merge", "linear"), ("merge", "slerp")]
    assert _snapshot(models) == before


def test_bench_merge_uses_an_unmarked_family_dir_as_given(tmp_path):
    from llm_merge.toy import make_family

    family = tmp_path / "family"
    make_family(family, n_models=2, seed=3)  # base/, ft1/, ft2/ but no marker: made elsewhere
    before = _snapshot(family)
    out = tmp_path / "bench.json"
    assert bench_merge.main(["--family_dir", str(family), "--params", "2e6", "--methods", "linear",
                             "--n_process", "1", "--warmup_runs", "0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["family"]["fine_tunes"] == [str(family / "ft1"), str(family / "ft2")]
    assert _snapshot(family) == before  # not regenerated at 2e6 params, no marker written


def test_bench_merge_refuses_to_generate_into_a_foreign_directory(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="refusing"):
        bench_merge.main(["--family_dir", str(busy), "--params", "2e6", "--methods", "linear", "--n_process", "1"])
    assert _snapshot(busy) == {"notes.txt": b"mine"}


def test_bench_merge_regenerates_its_own_family_when_interrupted(tmp_path):
    family = tmp_path / "family"
    family.mkdir()
    (family / bench_merge.MARKER).write_text('{"generating": true}\n')  # a generation that was cut short
    (family / "base").mkdir()
    (family / "base" / "model-00001-of-00009.safetensors").write_bytes(b"stale shard of another size")
    result = bench_merge.ensure_family(family, 2e6, 200, 0)
    assert not result.spec.get("given") and len(result.fine_tunes) == 3
    assert json.loads((family / bench_merge.MARKER).read_text())["params"] == 2e6
    assert [f.name for f in bench_merge.weight_files(family / "base")] == ["model.safetensors"]


def test_bench_merge_names_a_given_model_without_weights(tmp_path):
    with pytest.raises(SystemExit, match="no \\*.safetensors"):
        bench_merge.given_family(tmp_path / "missing", [tmp_path / "a", tmp_path / "b"])


@pytest.mark.parametrize("argv", [["--base_model_path", "b"], ["--model_path_list", "a", "b"],
                                  ["--base_model_path", "b", "--model_path_list", "a"],
                                  ["--base_model_path", "b", "--model_path_list", "a", "c", "--family_dir", "f"]])
def test_bench_merge_checks_a_given_family_s_flags(argv):
    with pytest.raises(SystemExit):
        bench_merge.parse_args(argv)


def test_bench_merge_fills_in_a_compare_template(tmp_path):
    from llm_merge.toy import make_family

    make_family(tmp_path / "family", n_models=3, seed=1)
    family = bench_merge.ensure_family(tmp_path / "family", 2e6, 200, 0)  # unmarked: used as given
    tool = bench_merge.Tool("t", ["merge", "--into={output}", "{base}", "{models}", "-j", "{n_process}", "{method}"],
                            False)
    assert tool.template
    ft = [str(tmp_path / "family" / f"ft{k}") for k in (1, 2, 3)]
    assert tool.command("slerp", family, tmp_path / "o", 2, ["--ignored"]) == [
        "merge", f"--into={tmp_path / 'o'}", str(tmp_path / "family" / "base"), *ft[:2], "-j", "2", "slerp"]
    plain = bench_merge.Tool("p", ["merge"], False)
    assert not plain.template and plain.command("ties", family, tmp_path / "o", 1, ["--x"])[-1] == "--x"

    out = tmp_path / "bench.json"
    mergekit = f"{sys.executable} {BENCHMARKS.parent / 'tools' / 'mergekit.py'}"
    template = (f"{mergekit} --merge_method {{method}} --model_path_list {{models}} --base_model_path {{base}} "
                f"--output_path {{output}} --n_process {{n_process}}")
    assert bench_merge.main(["--family_dir", str(tmp_path / "family"), "--methods", "linear", "--n_process", "1",
                             "--warmup_runs", "0", "--compare", f"tmpl={template}", "--json", str(out)]) == 0
    assert [r["method"] for r in json.loads(out.read_text())["rows"]] == ["io_floor[4 models]", "linear", "tmpl:linear"]
    with pytest.raises(SystemExit):
        bench_merge.parse_args(["--compare", "t=merge {base} {models}"])  # a template must name {output}


def test_bench_merge_times_mergekit_methods_with_their_inputs(tmp_path):
    """karcher takes no base, nearswap the base and one fine-tune (and its t): each row's floor reads what it merges."""
    out = tmp_path / "bench.json"
    assert bench_merge.main(["--family_dir", str(tmp_path / "family"), "--params", "2e6", "--methods", "karcher",
                             "nearswap", "--n_process", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kind"], r["method"]) for r in rows] == [
        ("io_floor", "io_floor[3 models]"), ("io_floor", "io_floor[2 models]"), ("merge", "karcher"), ("merge", "nearswap")]
