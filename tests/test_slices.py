"""mergekit ``slices`` with several sources: per-slice merges, gradients over each slice, parameter precedence."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

import mergekit_reference as MK
import reference as R
from checkpoints import llama_shapes, read_checkpoint, write_checkpoint
from conftest import run_mergekit

from llm_merge.errors import ConfigError
from llm_merge.config.recipes import recipe_to_config

LAYERS = 4


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slices")
    rng = np.random.default_rng(3)
    shapes = llama_shapes(layers=LAYERS)
    base = {k: rng.normal(scale=0.05, size=s).astype(np.float32) for k, s in shapes.items()}
    models = [{k: v + rng.normal(scale=0.01, size=v.shape).astype(np.float32) for k, v in base.items()} for _ in range(2)]
    dirs = {}
    for label, tensors in (("base", base), ("a", models[0]), ("b", models[1])):
        dirs[label] = write_checkpoint(tmp / label, tensors)
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": LAYERS}
        (tmp / label / "config.json").write_text(json.dumps(config))
    return {"base": base, "a": models[0], "b": models[1]}, dirs


def _run(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = run_mergekit(path, out, "--quiet")
    assert result.returncode == 0, result.stderr
    return read_checkpoint(out), json.loads((out / "merge_config.json").read_text()), out


def _layer(name):
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def test_slerp_two_slices_gradient_per_slice(tmp_path, fam):
    tensors, dirs = fam
    t_setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": [1.0, 0.0]}, {"value": 0.5}]
    recipe = {"merge_method": "slerp", "base_model": str(dirs["base"]), "dtype": "float32",
              "parameters": {"t": t_setting},
              "slices": [{"sources": [{"model": str(dirs["base"]), "layer_range": [0, 3]},
                                      {"model": str(dirs["a"]), "layer_range": [0, 3]}]},
                         # the base listed second: it is still slerp's t = 0 end
                         {"sources": [{"model": str(dirs["a"]), "layer_range": [3, 4]},
                                      {"model": str(dirs["base"]), "layer_range": [3, 4]}]}]}
    got, record, out = _run(tmp_path, recipe)
    # slice 0 has 3 layers: t = 0, 0.5, 1; slice 1 has one layer: t = 1 (mergekit); outside the layers t = 0
    t_of_layer = {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.0}
    for name, b in tensors["base"].items():
        layer = _layer(name)
        t = 0.0 if layer is None else t_of_layer[layer]
        alpha = t if "self_attn" in name else 1 - t if "mlp" in name else 0.5
        assert record["resolved_tensor_parameters"][name]["slerp_alpha"] == pytest.approx(alpha), name
        np.testing.assert_allclose(got[name], R.slerp(b, tensors["a"][name], alpha), rtol=1e-5, atol=1e-6, err_msg=name)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == LAYERS
    assert "layers 3..3" in (out / "README.md").read_text()


def test_ties_slices_parameter_precedence_and_layer_mix(tmp_path, fam):
    """Source parameters beat slice parameters, which beat the top level; slices may take other layers."""
    tensors, dirs = fam
    src = lambda label, r, **p: {"model": str(dirs[label]), "layer_range": r, **({"parameters": p} if p else {})}
    recipe = {"merge_method": "ties", "base_model": str(dirs["base"]), "dtype": "float32",
              "parameters": {"weight": 1.0, "density": 0.9},
              "slices": [{"sources": [src("base", [0, 2]), src("a", [0, 2], density=0.3), src("b", [0, 2])],
                          "parameters": {"density": 0.6}},
                         {"sources": [src("base", [2, 4]), src("a", [2, 4]), src("b", [1, 3], weight=0.25)]}]}
    got, record, out = _run(tmp_path, recipe)
    for name, b in tensors["base"].items():
        layer = _layer(name)
        first = layer is None and "embed" in name or layer is not None and layer < 2
        densities = [0.3, 0.6] if first else [0.9, 0.9]
        weights = [1.0, 1.0] if first else [1.0, 0.25]
        b_name = name if first or layer is None else name.replace(f".layers.{layer}.", f".layers.{layer - 1}.")
        ref = MK.gta(name, [tensors["a"][name], tensors["b"][b_name]], b, method="ties", weights=weights,
                     density=densities, normalize=True, rescale=False)
        np.testing.assert_allclose(got[name], ref, rtol=2e-6, atol=2e-7, err_msg=name)
        assert record["resolved_tensor_parameters"][name]["reserve_p_list"] == densities


def test_slices_errors(fam):
    _, dirs = fam
    base, a, b = str(dirs["base"]), str(dirs["a"]), str(dirs["b"])
    two = lambda m1, m2, r1=(0, 2), r2=(0, 2): {"sources": [{"model": m1, "layer_range": list(r1)}, {"model": m2, "layer_range": list(r2)}]}
    cases = [
        ({"merge_method": "ties", "base_model": base, "parameters": {"weight": 1}, "slices": [two(a, b)]}, "one source from the base"),
        ({"merge_method": "ties", "base_model": base, "parameters": {"weight": 1}, "slices": [two(base, a, (0, 2), (0, 3))]}, "same number of layers"),
        ({"merge_method": "ties", "base_model": base, "slices": [two(base, a)]}, "weight is required"),
        ({"merge_method": "slerp", "base_model": base, "slices": [{"sources": [{"model": a, "layer_range": [0, 1]}], "residual_weight": 0.5}]}, "residual_weight"),
    ]
    from llm_merge.config.validate import resolve

    for recipe, match in cases:
        with pytest.raises(ConfigError, match=match):
            resolve(recipe_to_config(recipe, "/tmp/never-written"))


def test_slerp_tokenizer_source_base_is_the_base_model(fam):
    _, dirs = fam
    base, a = str(dirs["base"]), str(dirs["a"])
    recipe = {"merge_method": "slerp", "base_model": base, "tokenizer_source": "base", "parameters": {"t": 0.3},
              "slices": [{"sources": [{"model": a, "layer_range": [0, 4]}, {"model": base, "layer_range": [0, 4]}]}]}
    cfg = recipe_to_config(recipe, "/tmp/never-written")
    assert cfg.tokenizer_source == base and cfg.model_path_list == [base, a] and cfg.slerp_alpha == 0.3
