"""Issue 29: multi-document recipes (mergekit-multi): names, dependency order, reuse of intermediates, refusals."""

import json
import os
import re

import numpy as np
import pytest

from checkpoints import read_checkpoint

from llm_merge.cli.recipe import main
from llm_merge.config.recipe_documents import build_order, split_documents
from llm_merge.errors import ConfigError

TWO_STEPS = """\
name: mid
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: 1.0}}
  - model: {ft2}
    parameters: {{weight: 3.0}}
---
merge_method: linear
models:
  - model: mid
    parameters: {{weight: 1.0}}
  - model: {base}
    parameters: {{weight: 1.0}}
"""


def _write(tmp_path, text, **dirs):
    path = tmp_path / "multi.yml"
    path.write_text(text.format(**{k: str(v) for k, v in dirs.items()}))
    return path


def test_two_documents_run_in_order_and_the_intermediate_is_reused(tmp_path, pair):
    recipe = _write(tmp_path, TWO_STEPS, **pair)
    inter, out = tmp_path / "inter", tmp_path / "out"
    assert main([str(recipe), str(out), "--intermediate_dir", str(inter), "--quiet"]) == 0
    base, ft1, ft2 = (read_checkpoint(pair[k]) for k in ("base", "ft1", "ft2"))
    mid = read_checkpoint(inter / "mid")
    merged = read_checkpoint(out)
    for name in ("w", "b"):
        expected_mid = (ft1[name] + 3 * ft2[name]) / 4
        np.testing.assert_allclose(mid[name], expected_mid, rtol=1e-6)
        np.testing.assert_allclose(merged[name], (expected_mid + base[name]) / 2, rtol=1e-6, atol=1e-7)
    record = json.loads((inter / "mid" / "merge_config.json").read_text())
    assert len(record["recipe_hash"]) == 64
    stamp = os.stat(inter / "mid" / "merge_config.json").st_mtime_ns

    # same recipe and inputs: the intermediate is reused (untouched), the final rebuilt with --overwrite
    assert main([str(recipe), str(out), "--intermediate_dir", str(inter), "--overwrite"]) == 0
    assert os.stat(inter / "mid" / "merge_config.json").st_mtime_ns == stamp

    # a changed document: rebuilt
    _write(tmp_path, TWO_STEPS.replace("weight: 3.0", "weight: 1.0"), **pair)
    assert main([str(recipe), str(out), "--intermediate_dir", str(inter), "--overwrite", "--quiet"]) == 0
    np.testing.assert_allclose(read_checkpoint(inter / "mid")["w"], (ft1["w"] + ft2["w"]) / 2, rtol=1e-6)
    assert json.loads((inter / "mid" / "merge_config.json").read_text())["recipe_hash"] != record["recipe_hash"]


def _doc(name, *models):
    doc = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}
    return {"name": name, **doc} if name else doc


def test_build_order_follows_dependencies_not_file_order():
    docs = split_documents([_doc("c", "a", "b"), _doc("a", "/x"), _doc("b", "a"), _doc(None, "c", "/y")])
    assert [d.name for d in build_order(docs)] == ["a", "b", "c", None]


def test_cycles_and_duplicate_names_are_refused():
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        build_order(split_documents([_doc("a", "b"), _doc("b", "a")]))
    with pytest.raises(ConfigError, match="already the name of document 1"):
        split_documents([_doc("a", "/x"), _doc("a", "/y")])
    with pytest.raises(ConfigError, match="have no name"):
        split_documents([_doc(None, "/x"), _doc(None, "/y")])


@pytest.mark.parametrize("text, message", [
    ("name: a\nmerge_method: linear\nmodels: [{model: MISSING, parameters: {weight: 1.0}}]\n---\n"
     "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1.0}}]\n",
     "models\\[0\\] 'MISSING' is neither a document name \\(valid: a\\)"),
    ("name: a\nmerge_method: linear\nmodels: [{model: b, parameters: {weight: 1.0}}]\n---\n"
     "name: b\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1.0}}]\n", "cycle"),
    ("name: a\nmerge_method: linear\nmodels: [{model: b, parameters: {weight: 1.0}}]\n---\n"
     "name: b\nmerge_method: linear\nmodels: [{model: {ft1}, parameters: {weight: 1.0}}]\n",
     "the final document 2 \\(b\\) is used by document 1"),
    ("name: a\nmerge_method: linear\nmodels: [{model: {ft1}, parameters: {weight: 1.0}}]\n---\n"
     "merge_method: nosuch\nmodels: [{model: a}]\n", "merge_method 'nosuch' is not supported"),
])
def test_refusals_come_before_any_work(tmp_path, pair, capsys, text, message):
    recipe = tmp_path / "multi.yml"
    recipe.write_text(text.replace("{ft1}", str(pair["ft1"])))
    inter = tmp_path / "inter"
    assert main([str(recipe), str(tmp_path / "out"), "--intermediate_dir", str(inter)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and not (inter / "a").exists()


def test_intermediate_dir_is_required_and_a_foreign_directory_is_refused(tmp_path, pair, capsys):
    recipe = _write(tmp_path, TWO_STEPS, **pair)
    assert main([str(recipe), str(tmp_path / "out")]) == 2
    assert "needs --intermediate_dir" in capsys.readouterr().err
    (tmp_path / "inter" / "mid").mkdir(parents=True)
    assert main([str(recipe), str(tmp_path / "out"), "--intermediate_dir", str(tmp_path / "inter")]) == 2
    assert "is no intermediate of a recipe" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
