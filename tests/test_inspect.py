"""llm-merge inspect, the compatibility check before merges, the suggestions and --dry_run, on families made here:
a toy family (base + 3 fine-tunes) and an unrelated model (a toy model of another seed)."""

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from checkpoints import write_checkpoint
from llm_merge.cli.merge import main
from llm_merge.report.inspection import geometry
from llm_merge.toy import make_family

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Base + ft1..ft3 (bf16 toy family) and ``unrelated``: a model of another seed, not derived from the base."""
    root = tmp_path_factory.mktemp("inspect")
    info = make_family(root / "fam", n_models=3)
    make_family(root / "other", n_models=1, seed=11)
    return {"root": root, "base": info["base"], "fts": info["fine_tunes"], "unrelated": str(root / "other" / "ft1")}


@pytest.fixture(scope="module")
def inspected(family):
    """The JSON report (and output directory) of ``inspect`` over ft1..ft3 and the unrelated model."""
    out = family["root"] / "report"
    models = [*family["fts"], family["unrelated"]]
    code = main(["inspect", "--base_model_path", family["base"], "--model_path_list", *models, "--output_path", str(out),
                 "--html", str("matplotlib" in _available()).lower(), "--quiet"])
    assert code == 0
    return json.loads((out / "inspect.json").read_text()), out


def _available():
    found = set()
    try:
        import matplotlib  # noqa: F401
        found.add("matplotlib")
    except ImportError:
        pass
    return found


def _load(path):
    return {name: value.astype(np.float32) for name, value in load_file(str(Path(path) / "model.safetensors")).items()}


def test_the_unrelated_model_is_flagged_by_name(inspected, family):
    report, _ = inspected
    levels = {v["model"]: v for v in report["verdict"]}
    assert [levels[m]["level"] for m in family["fts"]] == ["ok"] * 3
    flagged = levels[family["unrelated"]]
    assert flagged["level"] == "mismatch" and "unrelated_cosine" in flagged["rules"]
    assert flagged["median_weight_cosine"] < 0.1 and 1.2 < flagged["median_relative_norm"] < 1.6
    assert family["unrelated"] in flagged["message"]
    assert report["suggestions"]["excluded"] == [family["unrelated"]]
    assert report["suggestions"]["config"]["model_path_list"] == [str(Path(m).resolve()) for m in family["fts"]]


def test_figures_agree_with_an_independent_computation(inspected, family):
    report, _ = inspected
    base = _load(family["base"])
    models = [_load(m) for m in [*family["fts"], family["unrelated"]]]
    k = len(models)
    sums = {"bb": 0.0, "xx": np.zeros(k), "xb": np.zeros(k), "gram": np.zeros((k, k)), "l1": np.zeros(k), "nz": np.zeros(k),
            "top10": np.zeros(k), "tied": np.zeros(k), "dropped": np.zeros(k), "active": 0, "conflicts": 0, "n": 0}
    layer0 = np.zeros((2, k))  # ||t||^2 and ||b||^2 of layer 0
    for name, b in base.items():
        t32 = np.stack([m[name].reshape(-1) - b.reshape(-1) for m in models])  # float32, as the tool computes
        t = t32.astype(np.float64)
        b64, xs = b.reshape(-1).astype(np.float64), [m[name].reshape(-1).astype(np.float64) for m in models]
        sums["bb"] += b64 @ b64
        sums["xx"] += [x @ x for x in xs]
        sums["xb"] += [x @ b64 for x in xs]
        sums["gram"] += t @ t.T
        sums["l1"] += np.abs(t).sum(axis=1)
        sums["nz"] += (t != 0).sum(axis=1)
        keep = math.ceil(0.1 * b.size)
        sums["top10"] += [np.sort(np.abs(row))[::-1][:keep].sum() for row in t32.astype(np.float64)]
        for i, row in enumerate(np.abs(t32)):
            values, counts = np.unique(row[row != 0], return_counts=True)
            sums["tied"][i] += counts[counts > 1].sum()
        changed = (t32 > 0).sum(axis=0) + (t32 < 0).sum(axis=0)
        sums["active"] += int((changed >= 2).sum())
        sums["conflicts"] += int((((t32 > 0).sum(axis=0) > 0) & ((t32 < 0).sum(axis=0) > 0)).sum())
        elected = np.where(t32.sum(axis=0) < 0, -1.0, 1.0)  # TIES: sign of the float32 sum, 0 counted as +
        sums["dropped"] += [np.abs(row)[(row != 0) & (np.sign(row) != elected)].sum() for row in t]
        sums["n"] += b.size
        if name.startswith("model.layers.0."):
            layer0 += [(t ** 2).sum(axis=1), np.full(k, b64 @ b64)]
    got = report["summary"]
    norms = np.sqrt(np.diag(sums["gram"]))
    np.testing.assert_allclose(got["relative_norm"], norms / math.sqrt(sums["bb"]), rtol=1e-6)
    np.testing.assert_allclose(got["weight_cosine"], sums["xb"] / np.sqrt(sums["xx"] * sums["bb"]), rtol=1e-9)
    np.testing.assert_allclose(got["task_vector_cosine"], sums["gram"] / np.outer(norms, norms), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got["changed_fraction"], sums["nz"] / sums["n"], rtol=1e-12)
    np.testing.assert_allclose([m["0.1"] for m in got["top_mass"]], sums["top10"] / sums["l1"], rtol=1e-6)
    np.testing.assert_allclose(got["tied_fraction"], sums["tied"] / sums["nz"], rtol=1e-12)
    assert got["sign_conflict_rate"] == pytest.approx(sums["conflicts"] / sums["active"], rel=1e-12)
    np.testing.assert_allclose(got["ties_dropped_mass_per_model"], sums["dropped"] / sums["l1"], rtol=1e-6)
    layer = next(row for row in report["layers"] if row["layer"] == 0)
    np.testing.assert_allclose(layer["relative_norm"], np.sqrt(layer0[0] / layer0[1]), rtol=1e-6)


def test_magnitude_figures_exact_beyond_bfloat16_and_approximate_past_the_budget(monkeypatch):
    rng = np.random.default_rng(3)
    base = rng.standard_normal(5000).astype(np.float32)
    xs = [base + rng.standard_normal(5000).astype(np.float32) * 0.1 for _ in range(2)]
    xs[0][:100] = base[:100] + 0.25  # ties among float32 values
    t = np.abs(xs[0] - base).astype(np.float64)
    expected_top = np.sort(t)[::-1][:500].sum()
    stats = geometry.TensorGeometry(2, 5000)
    for start in range(0, 5000, 1234):
        stats.add([x[start:start + 1234] for x in xs], base[start:start + 1234])
    result = stats.finish()
    assert result["kept"][0][geometry.DENSITY_GRID.index(0.1)] == pytest.approx(expected_top, rel=1e-9)
    assert result["tied"][0] == 100 and result["approximate"] == [False, False]
    monkeypatch.setattr(geometry, "INEXACT_BUDGET", 1000)
    stats = geometry.TensorGeometry(2, 5000)
    stats.add(xs, base)
    result = stats.finish()
    assert result["approximate"] == [True, True]
    assert result["kept"][0][geometry.DENSITY_GRID.index(0.1)] == pytest.approx(expected_top, rel=1e-2)


def test_suggestions_run_as_given(inspected, tmp_path):
    _, out = inspected
    config = json.loads((out / "suggested_config.json").read_text())
    assert config["merge_method"] in ("ties", "dare_ties", "della", "dare_linear", "linear")
    assert main([str(out / "suggested_config.json"), "--output_path", str(tmp_path / "a"), "--quiet"]) == 0
    assert main([str(out / "suggested_recipe.yml"), str(tmp_path / "b"), "--quiet"]) == 0
    assert (tmp_path / "a" / "model.safetensors").exists() and (tmp_path / "b" / "model.safetensors").exists()


def test_merge_stops_on_an_unrelated_model_unless_forced(family, tmp_path, capsys, caplog):
    args = ["--merge_method", "ties", "--base_model_path", family["base"], "--model_path_list", family["fts"][0],
            family["unrelated"], "--quiet", "--output_path"]
    assert main(args + [str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and family["unrelated"] in err[0] and "rule unrelated_cosine" in err[0] and "--force" in err[0]
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING):
        assert main(args + [str(tmp_path / "out"), "--force"]) == 0
    assert any(family["unrelated"] in r.getMessage() and "--force" in r.getMessage() for r in caplog.records)


def test_a_doubtful_model_is_a_warning(family, tmp_path, caplog):
    base = _load(family["base"])
    rng = np.random.default_rng(0)
    far = {n: v + 0.7 * np.std(v) * rng.standard_normal(v.shape).astype(np.float32) for n, v in base.items()}
    write_checkpoint(tmp_path / "far", far, extra_files=False)
    shutil.copy(Path(family["base"]) / "config.json", tmp_path / "far")
    with caplog.at_level(logging.WARNING):
        assert main(["--base_model_path", family["base"], "--model_path_list", family["fts"][0], str(tmp_path / "far"),
                     "--output_path", str(tmp_path / "out"), "--quiet"]) == 0
    assert any("may not share the base" in r.getMessage() and "far_norm" in r.getMessage() for r in caplog.records)


def test_dry_run_expects_the_path_the_merge_takes(family, monkeypatch):
    """A toy TIES merge runs in plain NumPy (run.kernel_choice): its estimate adds NumPy's extra cost, below the
    kernels' load that forcing them (LLM_MERGE_NUMBA=1) adds."""
    from llm_merge.api import plan_merge
    from llm_merge.config.options import MergeConfig

    def expected(numba=None):
        if numba is None:
            monkeypatch.delenv("LLM_MERGE_NUMBA", raising=False)
        else:
            monkeypatch.setenv("LLM_MERGE_NUMBA", numba)
        cfg = MergeConfig(merge_method="ties", base_model_path=family["base"], model_path_list=family["fts"],
                          output_path=str(family["root"] / "unused"))
        return plan_merge(cfg)["expected_seconds"]

    assert expected() == expected("0") < expected("1")


def test_dry_run_reads_no_tensor_data_and_writes_nothing(family, tmp_path, capsys, monkeypatch):
    from llm_merge.io.reader import TensorReader

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run read tensor data")

    for method in ("read_raw", "read_stored", "map_stored", "read_f32"):
        monkeypatch.setattr(TensorReader, method, refuse)
    out = tmp_path / "out"
    assert main(["--merge_method", "dare_ties", "--base_model_path", family["base"], "--model_path_list", *family["fts"],
                 "--output_path", str(out), "--dry_run", "--n_process", "2"]) == 0
    text = capsys.readouterr().out
    assert "dry run: dare_ties merge of 3 model(s)" in text and "tensors: 21 (21 merged, 0 copied)" in text
    assert "model.safetensors" in text and "expected time" in text and "expected peak memory" in text
    assert not out.exists()


def test_worker_count_changes_nothing(family, tmp_path):
    reports = []
    for n in (1, 2):
        code = main(["inspect", "--base_model_path", family["base"], "--model_path_list", *family["fts"], "--n_process", str(n),
                     "--output_path", str(tmp_path / f"n{n}"), "--html", "false", "--quiet"])
        assert code == 0
        reports.append(json.loads((tmp_path / f"n{n}" / "inspect.json").read_text()))
    assert reports[0]["tensors"] == reports[1]["tensors"] and reports[0]["suggestions"] == reports[1]["suggestions"]


def test_inspect_refusals(family, tmp_path, capsys):
    assert main(["inspect", "--model_path_list", family["fts"][0]]) == 2
    assert "--base_model_path" in capsys.readouterr().err
    assert main(["inspect", "--base_model_path", family["base"], "--model_path_list", family["fts"][0],
                 "--density_mass", "1.5"]) == 2
    assert "--density_mass" in capsys.readouterr().err


def test_html_needs_the_report_extra(family, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    monkeypatch.delitem(sys.modules, "llm_merge.report.inspection.html", raising=False)
    assert main(["inspect", "--base_model_path", family["base"], "--model_path_list", family["fts"][0],
                 "--output_path", str(tmp_path / "r")]) == 2
    assert "llm_merge[report]" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_html_report_renders_in_a_headless_browser(inspected, tmp_path):
    pytest.importorskip("matplotlib")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless browser (apt-get install chromium)")
    _, out = inspected
    page = (out / "inspect.html").as_uri()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run(common + ["--dump-dom", page], capture_output=True, text=True, timeout=60).stdout
    assert dom.count("data:image/png;base64,") == 4 and "mismatch" in dom
    assert "src=\"http" not in dom and "<link" not in dom and "<script" not in dom  # self-contained
    shot = tmp_path / "shot.png"
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1200,2400", page], capture_output=True, timeout=60)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    reds = ((pixels[..., 0] > 150) & (pixels[..., 1] < 120) & (pixels[..., 2] < 120)).sum()
    assert reds > 1000  # the conflict bars and the warm cells of the cosine heatmap were drawn


def test_inspect_subcommand_help_and_tool():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "mergekit.py"), "inspect", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--density_mass" in result.stdout and "--base_model_path" in result.stdout
    tool = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_models.py"), "--version"], capture_output=True,
                          text=True, timeout=60)
    assert tool.returncode == 0 and "llm_merge" in tool.stdout
