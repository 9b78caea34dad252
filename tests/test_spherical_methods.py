"""Issue 29: mergekit's nearswap and multislerp: by hand, against a NumPy port of mergekit, via recipes and flags."""

import numpy as np
import pytest

import mergekit_reference_spherical as MK
from checkpoints import read_checkpoint, write_checkpoint

from llm_merge.api import merge
from llm_merge.backends.numpy_backend import NumpyOps
from llm_merge.cli.recipe import main as recipe_main
from llm_merge.config.options import MergeConfig
from llm_merge.config.validate import resolve
from llm_merge.errors import ConfigError, MergeError
from llm_merge.methods import merge as merge_methods, spherical

OPS = NumpyOps(False)


def _multislerp(ys, weights, normalize=True, eps=1e-8):
    """The registered merge on flat chunks, as the engine calls it."""
    shape = ys[0].shape
    ys = [y.ravel() for y in ys]
    gram = merge_methods.gram_sums(ys, ops=OPS)["sums"]
    return spherical.multislerp(ys, sums=gram, weight_list=weights, multislerp_normalize_weights=normalize,
                                multislerp_eps=eps, ops=OPS).reshape(shape)


def test_nearswap_by_hand_is_a_clip_of_the_task_vector():
    y = np.array([0.0, 0.05, -0.05, 0.2, -3.0, 0.1], np.float32)
    out = spherical.nearswap([y], nearswap_t=0.1, ops=OPS)
    np.testing.assert_array_equal(out, np.array([0.0, 0.05, -0.05, 0.1, -0.1, 0.1], np.float32))
    base = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], np.float32)
    np.testing.assert_allclose(base + out, MK.nearswap(0.1, base, base + y), rtol=1e-6)


def test_multislerp_by_hand():
    # orthogonal unit vectors, equal weights: the unit mean direction times the mean norm 1
    ys = [np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)]
    np.testing.assert_allclose(_multislerp(ys, [1.0, 1.0]), [np.sqrt(0.5)] * 2, rtol=1e-6)
    # norms 2 and 4 on the same axes, weights 1:3 -> direction (1/4, 3/4)/|.|, length 1/4*2 + 3/4*4 = 3.5
    ys = [np.array([2.0, 0.0], np.float32), np.array([0.0, 4.0], np.float32)]
    direction = np.array([0.25, 0.75]) / np.hypot(0.25, 0.75)
    np.testing.assert_allclose(_multislerp(ys, [1.0, 3.0]), 3.5 * direction, rtol=1e-6)
    # antipodal pair with equal weights: linear fallback; three balanced: an error
    ys = [np.array([1.0, 0.0], np.float32), np.array([-1.0, 0.0], np.float32)]
    np.testing.assert_allclose(_multislerp(ys, [1.0, 1.0]), [0.0, 0.0], atol=1e-7)
    with pytest.raises(MergeError, match="weighted sum"):
        _multislerp(ys + [np.array([0.0, 0.0], np.float32)], [1.0, 1.0, 1.0])
    # one input: itself
    np.testing.assert_array_equal(_multislerp(ys[:1], [2.0]), ys[0])


@pytest.mark.parametrize("k, normalize, eps", [(2, True, 1e-8), (3, True, 1e-8), (4, False, 1e-3)])
def test_multislerp_matches_the_mergekit_port(k, normalize, eps):
    rng = np.random.default_rng(k)
    base = rng.normal(size=(6, 5)).astype(np.float32)
    xs = [base + rng.normal(size=base.shape).astype(np.float32) * (i + 1) for i in range(k)]
    weights = list(rng.uniform(0.2, 2.0, size=k))
    ours = base + _multislerp([x - base for x in xs], weights, normalize, eps)
    np.testing.assert_allclose(ours, MK.multislerp(xs, weights, base, normalize, eps), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_multislerp(xs, weights, normalize, eps), MK.multislerp(xs, weights, None, normalize, eps),
                               rtol=1e-5, atol=1e-6)


def test_recipes_and_flags_merge_like_the_port(tmp_path, pair):
    base, ft1, ft2 = (read_checkpoint(pair[k]) for k in ("base", "ft1", "ft2"))
    recipe = tmp_path / "ns.yml"
    recipe.write_text(f"merge_method: nearswap\nbase_model: {pair['base']}\nmodels: [{{model: {pair['ft1']}}}]\n"
                      "parameters: {t: 0.05}\n")
    assert recipe_main([str(recipe), str(tmp_path / "ns"), "--quiet"]) == 0
    out = read_checkpoint(tmp_path / "ns")
    for name in ("w", "b"):
        np.testing.assert_allclose(out[name], MK.nearswap(0.05, base[name], ft1[name]), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out["ids"], base["ids"])

    recipe = tmp_path / "ms.yml"
    recipe.write_text(f"merge_method: multislerp\nbase_model: {pair['base']}\nmodels:\n"
                      f"  - {{model: {pair['ft1']}, parameters: {{weight: 1.0}}}}\n"
                      f"  - {{model: {pair['ft2']}, parameters: {{weight: 2.0}}}}\n")
    assert recipe_main([str(recipe), str(tmp_path / "ms"), "--quiet"]) == 0
    flags = resolve(MergeConfig(merge_method="multislerp", model_path_list=[str(pair["ft1"]), str(pair["ft2"])],
                                weight_list=[1.0, 2.0], base_model_path=str(pair["base"]), output_path=str(tmp_path / "f")))
    merge(flags)
    for out in (read_checkpoint(tmp_path / "ms"), read_checkpoint(tmp_path / "f")):
        for name in ("w", "b"):
            expected = MK.multislerp([ft1[name], ft2[name]], [1.0, 2.0], base[name])
            np.testing.assert_allclose(out[name], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("values, message", [
    ({"merge_method": "nearswap", "nearswap_t": 0.1}, "needs --base_model_path and exactly 1 model"),
    ({"merge_method": "nearswap", "base": True}, "--nearswap_t: None must be a number > 0"),
    ({"merge_method": "nearswap", "base": True, "nearswap_t": -1.0}, "--nearswap_t: -1.0"),
    ({"merge_method": "multislerp", "two": True, "weight_list": [1.0, -1.0]}, "sums to 0"),
])
def test_refusals(tmp_path, pair, values, message):
    values = dict(values)
    models = [str(pair["ft1"]), str(pair["ft2"])] if values.pop("two", False) or "base" not in values else [str(pair["ft1"])]
    if values.pop("base", False):
        values["base_model_path"] = str(pair["base"])
    with pytest.raises(ConfigError, match=message):
        resolve(MergeConfig(model_path_list=models, output_path=str(tmp_path / "o"), **values))


def test_multislerp_of_unchanged_tensors_is_the_base():
    """Every task vector zero (a tensor no fine-tune changed): the merged task vector is zero, not an error."""
    from llm_merge.methods.spherical import multislerp_coefficients

    assert multislerp_coefficients([0.0] * 6, [0.5, 0.3, 0.2], True, 1e-8) == [0.0, 0.0, 0.0]


def test_nearswap_t_gradient_over_layers(tmp_path):
    """A gradient of t gives each layer its own clip: t = interp(layer / (layers - 1)) as mergekit's gradients."""
    rng = np.random.default_rng(9)
    layers, ts = 3, [0.01, 0.05, 0.2]  # layer 0, 1, 2 of 3: t at 0, 0.5, 1 of the gradient [0.01, 0.2] -> .01 .105 .2
    base = {f"model.layers.{i}.w": rng.normal(size=(8, 5)).astype(np.float32) for i in range(layers)}
    base["lm_head.weight"] = rng.normal(size=(4, 5)).astype(np.float32)
    model = {k: (v + 0.2 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
    write_checkpoint(tmp_path / "base", base, extra_files=False)
    write_checkpoint(tmp_path / "ft", model, extra_files=False)
    recipe = tmp_path / "ns.yml"
    recipe.write_text(f"merge_method: nearswap\nbase_model: {tmp_path / 'base'}\nmodels: [{{model: {tmp_path / 'ft'}}}]\n"
                      f"parameters:\n  t:\n    - filter: layers\n      value: [{ts[0]}, {ts[2]}]\n    - value: {ts[1]}\n")
    assert recipe_main([str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    out = read_checkpoint(tmp_path / "out")
    expected_t = {"model.layers.0.w": 0.01, "model.layers.1.w": 0.105, "model.layers.2.w": 0.2, "lm_head.weight": ts[1]}
    for name, t in expected_t.items():
        np.testing.assert_allclose(out[name], MK.nearswap(t, base[name], model[name]), rtol=1e-6, atol=1e-7)
        assert not np.allclose(out[name], MK.nearswap(ts[1] if t != ts[1] else ts[0], base[name], model[name]))


def test_nearswap_gradient_without_default_names_the_tensor(tmp_path, capsys):
    rng = np.random.default_rng(2)
    base = {"model.layers.0.w": rng.normal(size=(4, 3)).astype(np.float32), "lm_head.weight": np.ones((2, 3), np.float32)}
    write_checkpoint(tmp_path / "base", base, extra_files=False)
    write_checkpoint(tmp_path / "ft", {k: v + 0.1 for k, v in base.items()}, extra_files=False)
    recipe = tmp_path / "ns.yml"
    recipe.write_text(f"merge_method: nearswap\nbase_model: {tmp_path / 'base'}\nmodels: [{{model: {tmp_path / 'ft'}}}]\n"
                      "parameters:\n  t:\n    - filter: layers\n      value: [0.01, 0.2]\n")
    assert recipe_main([str(recipe), str(tmp_path / "out"), "--quiet"]) == 2
    assert "no t for tensor lm_head.weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
