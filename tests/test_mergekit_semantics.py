"""``--semantics mergekit``: every GTA method against a line-by-line NumPy port of mergekit (tests/mergekit_reference.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import mergekit_reference as MK
from checkpoints import read_checkpoint, write_checkpoint

from llm_merge.api import merge
from llm_merge.config.options import MergeConfig
from llm_merge.config.validate import resolve
from llm_merge.errors import ConfigError


def _family(tmp_path, n=2, ties=False):
    rng = np.random.default_rng(7)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (12, 10), "model.layers.0.input_layernorm.weight": (10,),
              "model.layers.1.mlp.up_proj.weight": (7, 13), "lm_head.weight": (9, 10)}
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    models = []
    for i in range(n):
        delta = {k: rng.normal(scale=0.1, size=v.shape).astype(np.float32) for k, v in base.items()}
        if ties:  # magnitudes on a coarse grid: many entries tie at the selection threshold
            delta = {k: (np.round(v * 20) / 20).astype(np.float32) for k, v in delta.items()}
        models.append({k: base[k] + delta[k] for k in base})
    dirs = [write_checkpoint(tmp_path / "base", base, extra_files=False)]
    dirs += [write_checkpoint(tmp_path / f"m{i}", m, extra_files=False) for i, m in enumerate(models)]
    return base, models, dirs


CASES = [
    ("ties", dict(normalize=True, rescale=False)),
    ("ties", dict(normalize=True, rescale=True)),
    ("dare_ties", dict(normalize=False, rescale=True)),
    ("dare_linear", dict(normalize=False, rescale=True)),
    ("della", dict(normalize=True, rescale=True, epsilon=0.1)),
    ("della_linear", dict(normalize=False, rescale=True, epsilon=0.2)),
    ("della", dict(normalize=False, rescale=False, epsilon=0.05)),
    ("breadcrumbs", dict(normalize=False, rescale=False, gamma=0.1)),
    ("breadcrumbs_ties", dict(normalize=True, rescale=True, gamma=0.05)),
    ("breadcrumbs", dict(normalize=True, rescale=True, gamma=0.6)),
    ("task_arithmetic", dict(normalize=False, rescale=False, scale=0.8)),
]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied"])
@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_gta_methods_match_mergekit_port(tmp_path, method, options, ties):
    base, models, dirs = _family(tmp_path, ties=ties)
    densities, weights = [0.37, 0.61], [0.7, 0.45]
    out = tmp_path / "out"
    merge(MergeConfig(model_path_list=[str(d) for d in dirs[1:]], base_model_path=str(dirs[0]), output_path=str(out),
                      merge_method=method, semantics="mergekit", reserve_p_list=densities, weight_list=weights, quiet=True,
                      **options))
    got = read_checkpoint(out)
    for name, b in base.items():
        ref = MK.gta(name, [m[name] for m in models], b, method=method, weights=weights, density=densities,
                     normalize=options["normalize"], rescale=options["rescale"], epsilon=options.get("epsilon", 0.15),
                     gamma=options.get("gamma", 0.01), lam=options.get("scale", 1.0))
        np.testing.assert_allclose(got[name], ref, rtol=2e-6, atol=2e-7, err_msg=name)
    record = json.loads((out / "merge_config.json").read_text())
    assert record["semantics"] == "mergekit"


def test_magnitude_keeps_exactly_int_density_n_with_ties(tmp_path):
    """k = max(1, int(p*n)) entries survive even when many magnitudes tie at the threshold."""
    base = {"model.layers.0.w": np.zeros((4, 5), np.float32)}
    delta = np.array([0.5, -0.5, 0.5, 0.25, -0.5, 0.5, 0.1, 0.5, -0.5, 0.5] * 2, np.float32).reshape(4, 5)
    dirs = [write_checkpoint(tmp_path / "b", base, extra_files=False),
            write_checkpoint(tmp_path / "m", {"model.layers.0.w": delta}, extra_files=False)]
    out = tmp_path / "o"
    merge(MergeConfig(model_path_list=[str(dirs[1])], base_model_path=str(dirs[0]), output_path=str(out), quiet=True,
                      merge_method="ties", semantics="mergekit", reserve_p=0.29, rescale=False))
    got = read_checkpoint(out)["model.layers.0.w"].ravel()
    assert np.count_nonzero(got) == int(0.29 * 20) == 5  # int(5.8); PaddleNLP's trim keeps every 0.5 (16 entries)
    np.testing.assert_array_equal(np.flatnonzero(got), [14, 15, 17, 18, 19])  # the last five of the ascending order


def test_random_masks_equal_paddlenlp_dare_only_rescale_differs(tmp_path):
    base, models, dirs = _family(tmp_path, n=1)
    outs = {}
    for semantics in ("paddlenlp", "mergekit"):
        out = tmp_path / semantics
        merge(MergeConfig(model_path_list=[str(dirs[1])], base_model_path=str(dirs[0]), output_path=str(out), quiet=True,
                          merge_method="dare_linear", semantics=semantics, reserve_p=0.5, rescale=True))
        outs[semantics] = read_checkpoint(out)
    for name, b in base.items():
        pd_tv, mk_tv = outs["paddlenlp"][name] - b, outs["mergekit"][name] - b
        np.testing.assert_array_equal(pd_tv != 0, mk_tv != 0)
        t = models[0][name] - b
        l1 = np.abs(t).sum(dtype=np.float64) / np.abs(np.where(mk_tv != 0, t, 0)).sum(dtype=np.float64)
        np.testing.assert_allclose(mk_tv[mk_tv != 0], (t * np.float32(l1))[mk_tv != 0], rtol=1e-5, atol=1e-6)


def test_della_keep_rate_follows_row_ranks(tmp_path):
    """Largest entries of a row are kept with probability density + eps, the smallest with density - eps."""
    rows, cols = 400, 50
    row = np.linspace(0.01, 1.0, cols, dtype=np.float32)
    base = {"model.layers.0.w": np.zeros((rows, cols), np.float32)}
    delta = {"model.layers.0.w": np.tile(row, (rows, 1))}
    dirs = [write_checkpoint(tmp_path / "b", base, extra_files=False), write_checkpoint(tmp_path / "m", delta, extra_files=False)]
    out = tmp_path / "o"
    merge(MergeConfig(model_path_list=[str(dirs[1])], base_model_path=str(dirs[0]), output_path=str(out), quiet=True,
                      merge_method="della_linear", semantics="mergekit", reserve_p=0.5, epsilon=0.4, rescale=False))
    kept = read_checkpoint(out)["model.layers.0.w"] != 0
    rate = kept.mean(axis=0)
    expected = 0.1 + 0.8 * np.arange(cols) / (cols - 1)
    assert np.abs(rate - expected).max() < 4 * np.sqrt(0.25 / rows) + 1e-9


@pytest.mark.parametrize("p,eps", [(0.1, 0.1), (0.9, 0.15)])
def test_della_range_is_mergekits(p, eps):
    with pytest.raises(ConfigError, match="density - epsilon > 0"):
        resolve(MergeConfig(model_path_list=["a"], base_model_path="b", output_path="o", merge_method="della",
                            semantics="mergekit", reserve_p=p, epsilon=eps))


def test_semantics_selects_sparsifier():
    for method, sparsify in (("ties", "magnitude"), ("dare_ties", "random"), ("della_linear", "della_magprune"),
                             ("breadcrumbs", "breadcrumbs"), ("linear", "none")):
        cfg = resolve(MergeConfig(model_path_list=["a"], base_model_path="b", output_path="o", merge_method=method,
                                  semantics="mergekit", reserve_p=0.5, epsilon=0.1))
        assert cfg.sparsify_type == sparsify


def test_config_json_names_the_output_dtype(tmp_path):
    base, models, dirs = _family(tmp_path, n=1)
    for d in dirs:
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32", "dtype": "float32"}))
    out = tmp_path / "o"
    merge(MergeConfig(model_path_list=[str(dirs[1])], base_model_path=str(dirs[0]), output_path=str(out), quiet=True,
                      merge_method="ties", semantics="mergekit", output_dtype="bfloat16"))
    config = json.loads((out / "config.json").read_text())
    assert (config["torch_dtype"], config["dtype"], config["model_type"]) == ("bfloat16", "bfloat16", "llama")


def test_della_keeps_tied_columns_at_one_rate(tmp_path):
    """A row whose |t| all tie: every entry has midrank (cols - 1) / 2, so every column keeps at density
    (ranks by index would keep the first column at density - eps and the last at density + eps)."""
    rows, cols = 2000, 32
    signs = np.where(np.random.default_rng(5).random((rows, cols)) < 0.5, 1.0, -1.0)
    base = {"model.layers.0.w": np.zeros((rows, cols), np.float32)}
    delta = {"model.layers.0.w": (0.25 * signs).astype(np.float32)}
    dirs = [write_checkpoint(tmp_path / "b", base, extra_files=False), write_checkpoint(tmp_path / "m", delta, extra_files=False)]
    out = tmp_path / "o"
    merge(MergeConfig(model_path_list=[str(dirs[1])], base_model_path=str(dirs[0]), output_path=str(out), quiet=True,
                      merge_method="della_linear", semantics="mergekit", reserve_p=0.5, epsilon=0.4, rescale=False))
    rate = (read_checkpoint(out)["model.layers.0.w"] != 0).mean(axis=0)
    noise = 4 * np.sqrt(0.25 / rows)
    assert np.abs(rate - 0.5).max() < noise and abs(rate[0] - rate[-1]) < 2 * noise
