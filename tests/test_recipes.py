"""Issue 9: mergekit methods (task_arithmetic, breadcrumbs, model_stock, nuslerp, passthrough),
parameter gradients / filters, and mergekit YAML recipes (tools/mergekit.py recipe.yml OUT)."""

import json
import math

import numpy as np
import pytest

import mergekit_reference as MK
import reference as R
from checkpoints import make_llama_family, read_checkpoint, write_checkpoint
from conftest import REPO, run_mergekit

from llm_merge.api import merge
from llm_merge.backends.numpy_backend import NumpyOps
from llm_merge.config.options import MergeConfig
from llm_merge.config.validate import resolve
from llm_merge.errors import ConfigError
from llm_merge.plan.gradients import evaluate, layer_t
from llm_merge.methods import extra
from llm_merge.methods import mergekit_sparsify as mks
from llm_merge.config.recipes import recipe_to_config

OPS = NumpyOps(False)
CONFIGS = REPO / "configs"


# --------------------------------------------------------------------------- methods, by hand
def test_task_arithmetic_is_weighted_sum_without_normalization():
    ys = [np.array([1.0, -2.0], np.float32), np.array([3.0, 4.0], np.float32)]
    out = extra.task_arithmetic(ys, weight_list=[0.5, 2.0], ops=OPS)
    np.testing.assert_array_equal(out, [6.5, 7.0])


def test_breadcrumbs_drops_top_gamma_then_keeps_density():
    t = np.array([10.0, -9.0, 8.0, -7.0, 6.0, 5.0, -4.0, 3.0, 2.0, 1.0], np.float32)
    # n=10, gamma 0.1 -> drop the 1 largest (10); density 0.5 -> keep the next 5: -9, 8, -7, 6, 5
    stats = mks.breadcrumbs_selection(t, reserve_p=0.5, gamma=0.1, rescale=False, host=OPS, ops=OPS)
    assert stats["l1_scale"] == 1.0
    out = mks.breadcrumbs(t, start=0, ops=OPS, **stats)
    np.testing.assert_array_equal(out, [0, -9, 8, -7, 6, 5, 0, 0, 0, 0])
    # rescale: L1 of all (55) over L1 kept (35)
    stats = mks.breadcrumbs_selection(t, reserve_p=0.5, gamma=0.1, rescale=True, host=OPS, ops=OPS)
    assert stats["l1_scale"] == pytest.approx(55 / 35)
    # gamma reduced so that density is met (mergekit: n_bot = max(0, n - keep - top)): keep 9 -> drop only 1
    assert mks.breadcrumbs_counts(0.9, 0.3, 10) == (0, 9)  # (n_bot, target): the 9 smallest
    # int(), as mergekit: 0.29 * 100 is 28.999999999999996 -> 28 kept
    assert mks.breadcrumbs_counts(0.29, 0.0, 100) == (72, 28)
    # ties at both ends of the band: exactly 3 kept, the later equal entries at the low end, the earlier at the high end
    tied = np.array([1, 2, 2, 2, 3, 3, 3], np.float32)
    stats = mks.breadcrumbs_selection(tied, reserve_p=3 / 7, gamma=2 / 7, rescale=False, host=OPS, ops=OPS)
    np.testing.assert_array_equal(mks.breadcrumbs(tied, start=0, ops=OPS, **stats), [0, 0, 2, 2, 3, 0, 0])
    # density 1: untouched, gamma ignored (as mergekit)
    stats = mks.breadcrumbs_selection(t, reserve_p=1.0, gamma=0.1, rescale=True, host=OPS, ops=OPS)
    np.testing.assert_array_equal(mks.breadcrumbs(t, start=0, ops=OPS, **stats), t)


def test_model_stock_ratio_by_hand():
    # two orthogonal unit task vectors: cos 0 -> t 0; equal vectors: cos 1 -> t = 2/2 = 1
    assert extra.model_stock_ratio((1.0, 0.0, 1.0), 2) == 0.0
    assert extra.model_stock_ratio((1.0, 1.0, 1.0), 2) == pytest.approx(1.0)
    # cos 0.5: t = 2*0.5 / (1 + 0.5) = 2/3
    assert extra.model_stock_ratio((4.0, 1.0, 1.0), 2) == pytest.approx(2 / 3)  # |y0|² 4, <y0,y1> 1, |y1|² 1
    # three models: norms 1, pairwise dots 0.5, 0.5, 0.5 -> cos .5, t = 3*.5/(1+2*.5) = .75 (Gram entries
    # row by row: <0,0> <0,1> <0,2> <1,1> <1,2> <2,2>)
    assert extra.model_stock_ratio((1.0, 0.5, 0.5, 1.0, 0.5, 1.0), 3) == pytest.approx(0.75)
    # norms 1, 2, 3 and dots <0,1> = 2 (cos 1), <0,2> = 0, <1,2> = 0: mean cos 1/3, t = 1 / (1 + 2/3) = 0.6
    assert extra.model_stock_ratio((1.0, 2.0, 0.0, 4.0, 0.0, 9.0), 3) == pytest.approx(0.6)
    ys = [np.array([2.0, 0.0], np.float32), np.array([1.0, 1.0], np.float32)]
    opts = dict(model_stock_filter_wise=False, start=0, shape=(2,), ops=OPS)
    sums = extra.model_stock_sums(ys, **opts)["sums"]  # norms 4, 2, dot 2 -> cos 1/sqrt2
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    np.testing.assert_allclose(extra.model_stock(ys, sums=sums, **opts), t * np.array([1.5, 0.5]), rtol=1e-6)


def test_nuslerp_coefficients_by_hand():
    # orthogonal unit vectors, weights 1:3 -> t = 0.75, theta = pi/2: sin((1-t)pi/2), sin(t pi/2)
    c0, c1 = extra.nuslerp_coefficients((1.0, 0.0, 1.0), [1.0, 3.0])
    assert (c0, c1) == pytest.approx((math.sin(0.25 * math.pi / 2), math.sin(0.75 * math.pi / 2)))
    # colinear -> linear; weights summing to 0 -> t = 0.5
    assert extra.nuslerp_coefficients((1.0, 2.0, 4.0), [1.0, 1.0]) == pytest.approx((0.5, 0.5))  # |y0|², dot, |y1|²
    assert extra.nuslerp_coefficients((1.0, 0.0, 1.0), [1.0, -1.0]) == pytest.approx((math.sin(math.pi / 4),) * 2)


# --------------------------------------------------------------------------- gradients, by hand
def test_gradient_evaluation_matches_mergekit_rules():
    assert evaluate("x", 0.3, 0.7) == 0.3
    assert evaluate("x", [0.0, 1.0], 0.25) == pytest.approx(0.25)
    assert evaluate("x", [0.0, 0.5, 0.3], 0.75) == pytest.approx(0.4)  # 1.5 -> halfway between .5 and .3
    assert evaluate("x", [0.0, 0.5, 0.3], 1.0) == pytest.approx(0.3)
    filters = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": 0.9}, {"value": 0.2}]
    assert evaluate("model.layers.1.self_attn.q_proj.weight", filters, 0.5) == pytest.approx(0.5)
    assert evaluate("model.layers.1.mlp.up_proj.weight", filters, 0.5) == 0.9
    assert evaluate("model.norm.weight", filters, 0.0) == 0.2
    assert evaluate("model.norm.weight", filters[:2], 0.0) is None
    # t: layer / (num_layers - 1); 0 outside the layers (mergekit's pre/post weights)
    assert layer_t("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert layer_t("model.layers.1.mlp.up_proj.weight", 5) == 0.25
    assert layer_t("lm_head.weight", 5) == 0.0


# --------------------------------------------------------------------------- engine, tiny checkpoints
def _tiny(tmp_path, n=2):
    rng = np.random.default_rng(5)
    base = {"model.layers.0.w": rng.normal(size=(6, 4)).astype(np.float32),
            "model.layers.1.w": rng.normal(size=(6, 4)).astype(np.float32),
            "lm_head.weight": rng.normal(size=(3, 4)).astype(np.float32)}
    dirs = [write_checkpoint(tmp_path / "base", base, extra_files=False)]
    models = []
    for i in range(n):
        m = {k: (v + 0.3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
        models.append(m)
        dirs.append(write_checkpoint(tmp_path / f"m{i}", m, extra_files=False))
    return base, models, dirs


def _run(tmp_path, dirs, **options):
    out = tmp_path / "out"
    merge(MergeConfig(model_path_list=[str(d) for d in dirs[1:]], base_model_path=str(dirs[0]), output_path=str(out),
                      quiet=True, **options))
    return read_checkpoint(out), json.loads((out / "merge_config.json").read_text())


def test_task_arithmetic_with_lambda_through_engine(tmp_path):
    base, models, dirs = _tiny(tmp_path)
    got, record = _run(tmp_path, dirs, merge_method="task_arithmetic", weight_list=[0.5, 1.5], scale=0.8)
    for name, b in base.items():
        tv = (models[0][name] - b) * np.float32(0.5) + (models[1][name] - b) * np.float32(1.5)
        np.testing.assert_allclose(got[name], b + tv * np.float32(0.8), rtol=1e-6, atol=1e-6)
    assert record["scale"] == 0.8 and "resolved_tensor_parameters" not in record


def test_per_model_density_and_slerp_gradient_recorded(tmp_path):
    base, models, dirs = _tiny(tmp_path)
    got, _ = _run(tmp_path, dirs, merge_method="ties", reserve_p_list=[0.25, 0.5], rescale=False)
    for name, b in base.items():
        ys = [R.trim(models[0][name] - b, 0.25, rescale=False), R.trim(models[1][name] - b, 0.5, rescale=False)]
        np.testing.assert_allclose(got[name], b + R.ties(ys, [1.0, 1.0]), rtol=1e-6, atol=1e-6)
    (tmp_path / "out2").mkdir()
    out = tmp_path / "out3"
    merge(MergeConfig(model_path_list=[str(d) for d in dirs[1:]], output_path=str(out), merge_method="slerp", quiet=True,
                      tensor_parameters={"slerp_alpha": [0.2, 0.8]}))
    got, record = read_checkpoint(out), json.loads((out / "merge_config.json").read_text())
    expected_t = {"model.layers.0.w": 0.2, "model.layers.1.w": 0.8, "lm_head.weight": 0.2}
    assert record["resolved_tensor_parameters"] == {k: {"slerp_alpha": pytest.approx(v)} for k, v in expected_t.items()}
    for name, t in expected_t.items():
        np.testing.assert_allclose(got[name], R.slerp(models[0][name], models[1][name], t), rtol=1e-5, atol=1e-6)


def test_passthrough_copies_bytes_and_bad_configs(tmp_path):
    base, models, dirs = _tiny(tmp_path)
    out = tmp_path / "p"
    merge(MergeConfig(model_path_list=[str(dirs[1])], output_path=str(out), merge_method="passthrough", quiet=True))
    for name, x in read_checkpoint(out).items():
        np.testing.assert_array_equal(x, models[0][name])
    with pytest.raises(ConfigError, match="passthrough"):
        resolve(MergeConfig(model_path_list=["a", "b"], output_path="o", merge_method="passthrough"))
    with pytest.raises(ConfigError, match="model_stock"):
        resolve(MergeConfig(model_path_list=["a", "b"], output_path="o", merge_method="model_stock"))
    with pytest.raises(ConfigError, match="reserve_p_list"):
        resolve(MergeConfig(model_path_list=["a", "b"], output_path="o", merge_method="ties", reserve_p_list=[0.5]))
    with pytest.raises(ConfigError, match="cannot vary per tensor"):
        resolve(MergeConfig(model_path_list=["a", "b"], output_path="o", tensor_parameters={"seed": 1}))


# --------------------------------------------------------------------------- recipe translation
def test_recipe_translation_semantics(caplog):
    recipe = {"merge_method": "ties", "base_model": "B",
              "models": [{"model": "A", "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": "C", "parameters": {"weight": [0.2, 0.8], "density": 0.7}}],
              "parameters": {"int8_mask": True, "lambda": 0.9}, "dtype": "bfloat16"}
    cfg = recipe_to_config(recipe, "OUT")
    assert cfg.merge_method == "ties" and cfg.normalize is True and cfg.rescale is False
    assert cfg.reserve_p_list == [0.5, 0.7] and cfg.scale == 0.9 and cfg.output_dtype == "bfloat16"
    assert cfg.tensor_parameters == {"weight_list": [1.0, [0.2, 0.8]]}
    dare = recipe_to_config({"merge_method": "dare_ties", "base_model": "B", "models": [
        {"model": "A", "parameters": {"weight": 1, "density": 0.5}}, {"model": "C", "parameters": {"weight": 1, "density": 0.5}}]}, "O")
    assert (dare.normalize, dare.rescale, dare.reserve_p, dare.reserve_p_list) == (False, True, 0.5, None)
    della = recipe_to_config({"merge_method": "della", "base_model": "B", "parameters": {"weight": 1, "density": 0.5, "epsilon": 0.1},
                              "models": [{"model": "A"}, {"model": "C"}]}, "O")
    assert della.epsilon == pytest.approx(0.1) and della.weight_list == [1.0, 1.0] and della.semantics == "mergekit"
    slerp = recipe_to_config({"merge_method": "slerp", "base_model": "B", "models": [{"model": "B"}, {"model": "A"}],
                              "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]}}, "O")
    assert slerp.model_path_list == ["B", "A"] and slerp.base_model_path is None and "slerp_alpha" in slerp.tensor_parameters
    with caplog.at_level("WARNING"):  # a parameter another method takes: ignored with a warning, as mergekit ignores it
        linear = recipe_to_config({"merge_method": "linear", "models": [{"model": "A", "parameters": {"weight": 1, "density": 0.5}}]}, "O")
    assert linear.weight_list == [1.0] and "density" in caplog.text
    for bad, match in [({"merge_method": "ties", "base_model": "B", "models": [{"model": "A"}], "slices": [{}]}, "slices"),
                       ({"merge_method": "not_a_method", "models": []}, "not_a_method"),
                       ({"merge_method": "ties", "base_model": "B", "models": [{"model": "A", "parameters": {"wieght": 1}}]}, "wieght"),
                       ({"merge_method": "ties", "base_model": "B", "models": [{"model": "A"}]}, "weight is required"),
                       ({"merge_method": "nuslerp", "models": [{"model": "A", "parameters": {"weight": 1}}, {"model": "C", "parameters": {"weight": 1}}],
                         "parameters": {"nuslerp_flatten": "no"}}, "nuslerp_flatten")]:
        with pytest.raises(ConfigError, match=match):
            recipe_to_config(bad, "O")


def test_recipe_method_table_is_consistent():
    """Every mergekit method maps to one of our merge methods and takes only parameters the translation knows."""
    from llm_merge.config.options import METHOD_TABLE
    from llm_merge.config.recipe_parameters import BOOL_PARAMETERS, KNOWN_PARAMETERS
    from llm_merge.config.recipes import RECIPE_METHODS

    for name, spec in RECIPE_METHODS.items():
        assert spec.merge_method in METHOD_TABLE, name
        assert spec.parameters <= KNOWN_PARAMETERS, name
        assert set(spec.defaults) <= {"normalize", "rescale"}, name
    assert BOOL_PARAMETERS == {"normalize", "rescale", "int8_mask", "filter_wise", "nuslerp_flatten", "nuslerp_row_wise",
                               "normalize_weights"}


# --------------------------------------------------------------------------- configs/*.yml end to end
@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return make_llama_family(tmp_path_factory.mktemp("recipes"), n_models=2, dtype=np.float32, seed=11)


def _recipe(tmp_path, fam, name, flag=False):
    text = (CONFIGS / f"{name}.yml").read_text()
    text = text.replace("BASE", str(fam.base_dir)).replace("MODEL_A", str(fam.model_dirs[0])).replace("MODEL_B", str(fam.model_dirs[1]))
    recipe = tmp_path / f"{name}.yml"
    recipe.write_text(text)
    out = tmp_path / f"out-{name}"
    args = ["--config", recipe, out] if flag else [recipe, out]
    result = run_mergekit(*args, "--quiet")
    assert result.returncode == 0, result.stderr
    return read_checkpoint(out), json.loads((out / "merge_config.json").read_text())


def _floats(fam):
    return [n for n, v in fam.base.items() if np.issubdtype(v.dtype, np.floating)]


def _close(got, ref, name):
    np.testing.assert_allclose(got[name], ref, rtol=2e-6, atol=2e-7, err_msg=name)


def test_recipe_slerp_gradient(tmp_path, fam):
    got, record = _recipe(tmp_path, fam, "slerp_gradient", flag=True)
    # 2 layers: layer 0 is at t=0 (first gradient value), layer 1 at t=1 (last); others take the fallback 0.5
    for name in _floats(fam):
        layer = 0 if ".layers.0." in name else 1 if ".layers.1." in name else None
        if layer is not None and "self_attn" in name:
            t = [0.0, 1.0][layer]
        elif layer is not None and "mlp" in name:
            t = [1.0, 0.0][layer]
        else:
            t = 0.5
        assert record["resolved_tensor_parameters"][name]["slerp_alpha"] == pytest.approx(t)
        _close(got, R.slerp(fam.base[name], fam.models[0][name], t), name)


def test_recipe_ties_per_model_density(tmp_path, fam):
    got, record = _recipe(tmp_path, fam, "ties")
    assert record["reserve_p_list"] == [0.5, 0.25] and record["normalize"] and not record["rescale"]
    for name in _floats(fam):  # mergekit's magnitude: int(density * n) entries kept
        ref = MK.gta(name, [m[name] for m in fam.models], fam.base[name], method="ties", weights=[1.0, 0.5],
                     density=[0.5, 0.25], normalize=True, rescale=False)
        _close(got, ref, name)


def test_recipe_dare_ties(tmp_path, fam):
    got, record = _recipe(tmp_path, fam, "dare_ties")
    assert (record["normalize"], record["rescale"], record["reserve_p"]) == (False, True, 0.5)
    for name in _floats(fam):  # mergekit's random: the L1 norm restored, not 1/density
        ref = MK.gta(name, [m[name] for m in fam.models], fam.base[name], method="dare_ties", weights=[0.6, 0.4],
                     density=[0.5, 0.5], normalize=False, rescale=True)
        _close(got, ref, name)


def test_recipe_task_arithmetic(tmp_path, fam):
    got, record = _recipe(tmp_path, fam, "task_arithmetic")
    assert record["scale"] == 0.7 and record["merge_method"] == "task_arithmetic"
    for name in _floats(fam):
        b = fam.base[name]
        tv = (fam.models[0][name] - b) * np.float32(1.0) + (fam.models[1][name] - b) * np.float32(0.5)
        _close(got, b + tv * np.float32(0.7), name)


def test_recipe_model_stock(tmp_path, fam):
    got, record = _recipe(tmp_path, fam, "model_stock")
    assert record["merge_method"] == "model_stock"
    for name in _floats(fam):
        b = fam.base[name].astype(np.float64)
        ts = [m[name].astype(np.float64).ravel() - b.ravel() for m in fam.models]
        cos = np.dot(ts[0], ts[1]) / max(np.linalg.norm(ts[0]) * np.linalg.norm(ts[1]), 1e-6)
        cos = min(1.0, max(-1.0, cos))
        t = 0.0 if abs(1 + cos) < 1e-6 else 2 * cos / (1 + cos)
        ref = t * (fam.models[0][name].astype(np.float64) + fam.models[1][name]) / 2 + (1 - t) * b
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_recipe_passthrough(tmp_path, fam):
    got, _ = _recipe(tmp_path, fam, "passthrough")
    for name, x in fam.models[1].items():
        np.testing.assert_array_equal(got[name], x)


# --------------------------------------------------------------------------- more engine runs (generic NumPy path)
def test_nuslerp_and_breadcrumbs_through_engine(tmp_path):
    base, models, dirs = _tiny(tmp_path)
    got, _ = _run(tmp_path, dirs, merge_method="nuslerp", weight_list=[1.0, 3.0])
    for name, b in base.items():
        t0, t1 = (models[0][name] - b).astype(np.float64), (models[1][name] - b).astype(np.float64)
        cos = np.sum(t0 * t1) / (np.linalg.norm(t0) * np.linalg.norm(t1))
        theta = math.acos(cos)
        ref = b + (math.sin(0.25 * theta) * t0 + math.sin(0.75 * theta) * t1) / math.sin(theta)
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)
    out = tmp_path / "bc"
    merge(MergeConfig(model_path_list=[str(d) for d in dirs[1:]], base_model_path=str(dirs[0]), output_path=str(out), quiet=True,
                      merge_method="breadcrumbs", reserve_p=0.5, gamma_list=[0.25, 0.0], normalize=False, rescale=False))
    got = read_checkpoint(out)
    for name, b in base.items():
        total = np.zeros_like(b)
        for model, gamma in zip(models, (0.25, 0.0)):
            t = (model[name] - b).ravel()
            order = np.argsort(-np.abs(t), kind="stable")  # distinct magnitudes: no ties
            n_top, n_keep = int(gamma * t.size), int(0.5 * t.size)
            kept = np.zeros_like(t)
            kept[order[n_top:n_top + n_keep]] = t[order[n_top:n_top + n_keep]]
            total += kept.reshape(b.shape)
        np.testing.assert_allclose(got[name], b + total, rtol=1e-6, atol=1e-6, err_msg=name)


def test_weight_gradient_per_model_through_engine(tmp_path):
    base, models, dirs = _tiny(tmp_path)
    got, record = _run(tmp_path, dirs, merge_method="linear", normalize=True,
                       tensor_parameters={"weight_list": [[1.0, 0.0], [{"filter": "lm_head", "value": 3.0}, {"value": [0.0, 1.0]}]]})
    # layer 0: t=0 -> weights (1, 0); layer 1: t=1 -> (0, 1); lm_head (t=0): (1, 3)
    expected = {"model.layers.0.w": (1.0, 0.0), "model.layers.1.w": (0.0, 1.0), "lm_head.weight": (1.0, 3.0)}
    for name, (w0, w1) in expected.items():
        assert record["resolved_tensor_parameters"][name]["weight_list"] == [w0, w1]
        b = base[name]
        ref = b + ((models[0][name] - b) * np.float32(w0) + (models[1][name] - b) * np.float32(w1)) / np.float32(w0 + w1)
        np.testing.assert_allclose(got[name], ref, rtol=1e-6, atol=1e-6, err_msg=name)


def test_recipe_passthrough_slices(tmp_path, fam):
    got, record = _recipe(tmp_path, fam, "passthrough_slices")
    out = tmp_path / "out-passthrough_slices"
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    a, b = fam.models
    expected = {}
    for name, x in a.items():
        if ".layers." not in name:
            expected[name] = a[name] if "embed_tokens" in name else b[name]
        else:
            expected[name] = x  # layers 0, 1 of model A
    for name, x in b.items():
        if ".layers.1." in name:
            expected[name.replace(".layers.1.", ".layers.2.")] = x  # layer 1 of model B becomes layer 2
    assert set(got) == set(expected)
    for name, x in expected.items():
        np.testing.assert_array_equal(got[name], x, err_msg=name)


def test_recipe_writes_model_card(tmp_path, fam):
    _recipe(tmp_path, fam, "task_arithmetic")
    card = (tmp_path / "out-task_arithmetic" / "README.md").read_text()
    assert "task_arithmetic" in card and str(fam.model_dirs[0]) in card and '"scale": 0.7' in card
    assert "```yaml" in card and "merge_method: task_arithmetic" in card  # the recipe itself
    from llm_merge import __version__

    assert __version__ in card


def test_no_model_card(tmp_path, fam):
    text = (CONFIGS / "task_arithmetic.yml").read_text()
    text = text.replace("BASE", str(fam.base_dir)).replace("MODEL_A", str(fam.model_dirs[0])).replace("MODEL_B", str(fam.model_dirs[1]))
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    result = run_mergekit(recipe, tmp_path / "out", "--quiet", "--no_model_card")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "out" / "README.md").exists()


def _rows_slerp(v0, v1, t, dim):
    """mergekit's nuslerp(flatten=False) by hand: vectors along the last dim (dim -1) or dim 0."""
    v0, v1 = v0.astype(np.float64), v1.astype(np.float64)
    if v0.ndim < 2:
        v0, v1 = v0[None], v1[None]
        squeeze = True
    else:
        squeeze = False
    if dim == 0:
        v0, v1 = v0.T, v1.T
    out = np.empty_like(v0)
    for r in range(v0.shape[0]):
        a, b = v0[r], v1[r]
        cos = np.clip(np.dot(a / max(np.linalg.norm(a), 1e-7), b / max(np.linalg.norm(b), 1e-7)), -1, 1)
        if 1 - cos * cos <= 1e-16:
            out[r] = (1 - t) * a + t * b
        else:
            theta = math.acos(cos)
            out[r] = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    if dim == 0:
        out = out.T
    return out[0] if squeeze else out


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_per_row_and_per_column(tmp_path, row_wise):
    base, models, dirs = _tiny(tmp_path)
    got, _ = _run(tmp_path, dirs, merge_method="nuslerp", weight_list=[1.0, 3.0], nuslerp_flatten=False, nuslerp_row_wise=row_wise)
    for name, b in base.items():
        ref = b + _rows_slerp(models[0][name] - b, models[1][name] - b, 0.75, 0 if row_wise else -1)
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_model_stock_filter_wise(tmp_path):
    base, models, dirs = _tiny(tmp_path, n=3)
    got, _ = _run(tmp_path, dirs, merge_method="model_stock", model_stock_filter_wise=True)
    for name, b in base.items():
        b2 = b.astype(np.float64).reshape(-1, b.shape[-1])
        ws = [m[name].astype(np.float64).reshape(b2.shape) for m in models]
        offsets = [w - b2 for w in ws]
        cos = []
        for i in range(3):
            for j in range(i + 1, 3):
                norm = np.linalg.norm(offsets[i], axis=-1) * np.linalg.norm(offsets[j], axis=-1)
                cos.append(np.clip((offsets[i] * offsets[j]).sum(-1) / np.maximum(norm, 1e-6), -1, 1))
        c = np.mean(cos, axis=0)[:, None]
        t = 3 * c / (1 + 2 * c)
        ref = t * sum(ws) / 3 + (1 - t) * b2
        np.testing.assert_allclose(got[name], ref.reshape(b.shape), rtol=1e-5, atol=1e-6, err_msg=name)
