"""``MODEL+LORA`` references: the adapter folded on the fly while merging.

The reference is the model with the adapter folded by ``llm-merge-lora`` and rounded to the model's
dtype, so every merge with ``ft+adapter`` must equal, byte for byte, the same merge of a model folded
first into a directory; and nothing the size of a model is written or held. PEFT's
``merge_and_unload`` on a tiny transformers Llama is the independent reference for the fold itself.
"""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from checkpoints import llama_shapes, make_llama_family, read_checkpoint, write_safetensors

from llm_merge.api import merge
from llm_merge.cli import recipe as recipe_cli
from llm_merge.cli.merge import main as merge_main
from llm_merge.config.options import MergeConfig
from llm_merge.config.references import ModelReference, parse_reference
from llm_merge.errors import ConfigError
from llm_merge.io import derived
from llm_merge.io.checkpoint import open_checkpoint
from llm_merge.io.reader import TensorReader
from llm_merge.lora.fold import merge_lora
from llm_merge.lora.options import LoraMergeConfig
from llm_merge.lora.reference import folded_checkpoint

R, ALPHA = 4, 8
PEFT_ROOT = "base_model.model."
#: LoRA targets: linear weights of both layers (square and not) and the input embedding
TARGETS = [f"model.layers.{l}.{m}" for l in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]
EMBED = "model.embed_tokens"
SAVED = "model.norm.weight"  # a modules_to_save-style full tensor (float32 in the adapter)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A bf16 base + 2 fine-tunes (bf16: the fold's rounding matters), a PEFT and a Paddle adapter for ft0."""
    tmp = tmp_path_factory.mktemp("refs")
    fam = make_llama_family(tmp, n_models=2, dtype=ml_dtypes.bfloat16)
    write_peft_adapter(tmp / "peft", seed=3)
    write_paddle_adapter(tmp / "paddle", seed=4)
    return fam


def _factor_pairs(seed, shapes=None):
    """module -> (A [r, in], B [out, r]) in HF orientation, float32."""
    shapes = shapes or llama_shapes()
    rng = np.random.default_rng(seed)
    return {m: ((0.03 * rng.standard_normal((R, shapes[f"{m}.weight"][1]))).astype(np.float32),
                (0.03 * rng.standard_normal((shapes[f"{m}.weight"][0], R))).astype(np.float32)) for m in TARGETS}


def write_peft_adapter(path, seed, shapes=None):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": ALPHA,
                                                          "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}))
    rng = np.random.default_rng(seed + 100)
    shapes = shapes or llama_shapes()
    tensors = {}
    for module, (a, b) in _factor_pairs(seed, shapes).items():
        tensors[f"{PEFT_ROOT}{module}.lora_A.weight"] = a
        tensors[f"{PEFT_ROOT}{module}.lora_B.weight"] = b
    vocab, hidden = shapes[f"{EMBED}.weight"]
    tensors[f"{PEFT_ROOT}{EMBED}.lora_embedding_A"] = (0.03 * rng.standard_normal((R, vocab))).astype(np.float32)
    tensors[f"{PEFT_ROOT}{EMBED}.lora_embedding_B"] = (0.03 * rng.standard_normal((hidden, R))).astype(np.float32)
    tensors[PEFT_ROOT + SAVED] = (1 + 0.1 * rng.standard_normal(shapes[SAVED])).astype(np.float32)
    write_safetensors(path / "adapter_model.safetensors", tensors, {"format": "pt"})


def write_paddle_adapter(path, seed):
    path.mkdir(parents=True)
    (path / "lora_config.json").write_text(json.dumps({"r": R, "lora_alpha": ALPHA, "rslora": True}))
    tensors = {}
    for module, (a, b) in _factor_pairs(seed).items():  # Paddle orientation: A [in, r], B [r, out]
        tensors[f"{module}.lora_A"] = np.ascontiguousarray(a.T)
        tensors[f"{module}.lora_B"] = np.ascontiguousarray(b.T)
    write_safetensors(path / "lora_model.safetensors", tensors, {"format": "np"})


def fold_first(model, adapter, out):
    """The model with the adapter folded by ``llm-merge-lora`` into a directory: the reference's meaning."""
    if not out.exists():
        merge_lora(LoraMergeConfig(model_name_or_path=str(model), lora_path=str(adapter), output_path=str(out), quiet=True))
    return out


def assert_same_tensors(got_dir, want_dir):
    got, want = read_checkpoint(got_dir), read_checkpoint(want_dir)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name


def run_both(tmp_path, family, adapter, role, method="ties", n_process=1, **options):
    """The merge with ``ft0+adapter`` (as base or as a model) and with ft0 folded first; both output dirs."""
    ft0, ft1 = family.model_dirs
    folded = fold_first(ft0, adapter, tmp_path.parent / f"folded-{adapter.name}")
    outputs = []
    for tag, first in (("ref", f"{ft0}+{adapter}"), ("pre", str(folded))):
        if role == "base":
            models, base = [str(ft1), str(family.base_dir)], first
        else:
            models, base = [first, str(ft1)], str(family.base_dir)
        out = tmp_path / tag
        merge(MergeConfig(merge_method=method, model_path_list=models, base_model_path=base, output_path=str(out),
                          n_process=n_process, quiet=True, reserve_p=0.6, **options))
        outputs.append(out)
    return outputs


# -- the reference syntax ------------------------------------------------------------------


def test_split_rule(tmp_path):
    (tmp_path / "run+2").mkdir()
    (tmp_path / "a").mkdir()
    exists = lambda p: os.path.lexists(tmp_path / p)  # noqa: E731
    assert parse_reference("a", exists=exists) == ModelReference("a")
    assert parse_reference("run+2", exists=exists) == ModelReference("run+2")  # an existing directory, '+' and all
    assert parse_reference("a+lora", exists=exists) == ModelReference("a", "lora")
    assert parse_reference("missing+lora", exists=exists) == ModelReference("missing", "lora")  # mergekit's split
    assert parse_reference("run+2+lora", exists=exists) == ModelReference("run+2", "lora")
    assert str(ModelReference("run+2", "lora")) == "run+2+lora"
    for bad in ("x+y+z", "a+", "+lora"):
        with pytest.raises(ConfigError, match="MODEL|which"):
            parse_reference(bad, exists=exists)


# -- byte-identical to folding first -----------------------------------------------------------


@pytest.mark.parametrize("role", ["model", "base"])
@pytest.mark.parametrize("adapter", ["peft", "paddle"])
def test_reference_equals_folding_first(tmp_path, family, role, adapter, monkeypatch):
    monkeypatch.setenv("LLM_MERGE_NUMBA", "0")  # the NumPy path
    ref, pre = run_both(tmp_path, family, family.base_dir.parent / adapter, role)
    assert_same_tensors(ref, pre)
    assert (ref / "config.json").read_text() == (pre / "config.json").read_text()  # the model's own config


@pytest.mark.parametrize("n_process", [1, 2])
def test_compiled_path_and_workers(tmp_path, family, n_process, monkeypatch):
    """The fused kernels take computed chunks where they would map stored ones; any number of workers."""
    monkeypatch.setenv("LLM_MERGE_NUMBA", "1")
    ref, pre = run_both(tmp_path, family, family.base_dir.parent / "peft", "model", method="dare_ties", n_process=n_process)
    assert_same_tensors(ref, pre)
    monkeypatch.setenv("LLM_MERGE_NUMBA", "0")
    numpy_out = tmp_path / "numpy"
    ft0, ft1 = family.model_dirs
    merge(MergeConfig(merge_method="dare_ties", model_path_list=[f"{ft0}+{family.base_dir.parent / 'peft'}", str(ft1)],
                      base_model_path=str(family.base_dir), output_path=str(numpy_out), quiet=True, reserve_p=0.6))
    assert_same_tensors(numpy_out, ref)


def test_flags_front_end(tmp_path, family):
    """--model_path_list / --base_model_path take MODEL+LORA like the recipe."""
    ft0, ft1 = family.model_dirs
    adapter = family.base_dir.parent / "peft"
    folded = fold_first(ft0, adapter, tmp_path.parent / "folded-peft")
    for tag, first in (("ref", f"{ft0}+{adapter}"), ("pre", folded)):
        assert merge_main(["--merge_method", "linear", "--model_path_list", str(first), str(ft1),
                           "--output_path", str(tmp_path / tag), "--quiet"]) == 0
    assert_same_tensors(tmp_path / "ref", tmp_path / "pre")
    assert merge_main(["--merge_method", "linear", "--model_path_list", f"{ft0}+{adapter}", str(ft1),
                       "--output_path", str(tmp_path / "dry"), "--dry_run", "--quiet"]) == 0


SLICES = """\
merge_method: slerp
base_model: {base}
parameters: {{t: 0.3}}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 1]}}
      - {{model: {first}, layer_range: [0, 1]}}
  - sources:
      - {{model: {base}, layer_range: [1, 2]}}
      - {{model: {first}, layer_range: [1, 2]}}
"""

MULTI = """\
name: mid
merge_method: linear
models:
  - model: {first}
    parameters: {{weight: 1.0}}
  - model: {ft1}
    parameters: {{weight: 3.0}}
---
merge_method: task_arithmetic
base_model: {base}
models:
  - model: mid
    parameters: {{weight: 0.5}}
  - model: {first}
    parameters: {{weight: 0.5}}
"""


@pytest.mark.parametrize("template", [SLICES, MULTI], ids=["slices", "multi-document"])
def test_recipes(tmp_path, family, template):
    ft0, ft1 = family.model_dirs
    adapter = family.base_dir.parent / "peft"
    folded = fold_first(ft0, adapter, tmp_path.parent / "folded-peft")
    for tag, first in (("ref", f"{ft0}+{adapter}"), ("pre", folded)):
        path = tmp_path / f"{tag}.yml"
        path.write_text(template.format(base=family.base_dir, first=first, ft1=ft1))
        argv = [str(path), str(tmp_path / tag), "--quiet"] + (["--intermediate_dir", str(tmp_path / f"{tag}-mid")] if "---" in template else [])
        assert recipe_cli.main(argv) == 0
    assert_same_tensors(tmp_path / "ref", tmp_path / "pre")


def test_relative_reference_read_beside_the_recipe(tmp_path, family):
    ft0, ft1 = family.model_dirs
    root = family.base_dir.parent
    recipe = "merge_method: linear\nmodels:\n  - {{model: {}, parameters: {{weight: 1}}}}\n  - {{model: {}, parameters: {{weight: 2}}}}\n"
    (root / "rel.yml").write_text(recipe.format(f"{ft0.name}+peft", ft1.name))
    (root / "abs.yml").write_text(recipe.format(f"{ft0}+{root / 'peft'}", ft1))
    for name in ("rel", "abs"):
        assert recipe_cli.main([str(root / f"{name}.yml"), str(tmp_path / name), "--quiet"]) == 0
    assert_same_tensors(tmp_path / "rel", tmp_path / "abs")


# -- bounded memory, nothing written ----------------------------------------------------------


def test_nothing_written_and_reads_stay_chunk_sized(tmp_path, family, monkeypatch):
    ft0, ft1 = family.model_dirs
    adapter = family.base_dir.parent / "peft"
    root = family.base_dir.parent
    before = sorted(p for p in root.rglob("*"))
    sizes = []
    read = derived.DerivedValues.read

    def recording(self, info, start, count):
        sizes.append(count)
        return read(self, info, start, count)

    monkeypatch.setattr(derived.DerivedValues, "read", recording)
    monkeypatch.setattr("llm_merge.lora.fold.merge_lora", lambda *a, **k: pytest.fail("a folded model was written"))
    monkeypatch.setattr("llm_merge.api.check_models", lambda *a: [])  # its sampled rows are the engine's business here
    from llm_merge.run.engine import TensorMerger
    monkeypatch.setattr(TensorMerger.__init__, "__defaults__", (64, True, None))  # chunk_elements=64
    merge(MergeConfig(merge_method="ties", model_path_list=[f"{ft0}+{adapter}", str(ft1)], base_model_path=str(family.base_dir),
                      output_path=str(tmp_path / "out"), quiet=True, reserve_p=0.5))
    assert sorted(p for p in root.rglob("*")) == before  # no temporary model beside the inputs
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sizes and max(sizes) <= 64  # never a whole tensor (the biggest has 1024 elements)


# -- errors before any work ------------------------------------------------------------------


def test_errors_before_any_work(tmp_path, family):
    ft0, ft1 = family.model_dirs
    root = family.base_dir.parent
    other = {k: (v[:8] if k.endswith("embed_tokens.weight") else v) for k, v in llama_shapes(hidden=8).items()}
    write_peft_adapter(tmp_path / "other", seed=9, shapes=other)  # made for a model with hidden size 8
    cases = [(f"{ft0}+{tmp_path / 'missing'}", "missing: no such directory"),
             (f"{ft0}+{tmp_path / 'other'}", "does not fit base"),
             (f"{tmp_path / 'nomodel'}+{root / 'peft'}", "nomodel: no such directory")]
    for i, (reference, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        for role in ("model", "base"):
            models, base = ([reference, str(ft1)], str(family.base_dir)) if role == "model" else ([str(ft1), str(family.base_dir)], reference)
            code = merge_main(["--merge_method", "ties", "--model_path_list", *models, "--base_model_path", base,
                               "--output_path", str(out), "--quiet"])
            assert code == 1 and not out.exists()
        with pytest.raises(Exception, match=message):
            merge(MergeConfig(merge_method="linear", model_path_list=[reference, str(ft1)], output_path=str(out), quiet=True))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory either


def test_output_may_not_be_inside_the_adapter(tmp_path, family):
    ft0, ft1 = family.model_dirs
    adapter = family.base_dir.parent / "peft"
    with pytest.raises(ConfigError, match="--output_path"):
        merge(MergeConfig(merge_method="linear", model_path_list=[f"{ft0}+{adapter}", str(ft1)],
                          output_path=str(adapter / "out"), quiet=True))


# -- the fold itself against PEFT --------------------------------------------------------------


def test_folded_view_matches_peft_merge_and_unload(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    lora = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "embed_tokens"],
                           init_lora_weights=False, modules_to_save=["lm_head"])
    tuned = peft.get_peft_model(model, lora)
    with torch.no_grad():
        tuned.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    tuned.save_pretrained(tmp_path / "adapter", safe_serialization=True, save_embedding_layers=False)
    merged = {k: v.float().numpy() for k, v in tuned.merge_and_unload().state_dict().items()}

    view = folded_checkpoint(open_checkpoint(tmp_path / "model", "model"), str(tmp_path / "adapter"))
    assert any(isinstance(info, derived.DerivedTensor) for info in view.tensors.values())
    worst = 0.0
    with TensorReader() as reader:
        for name, info in view.tensors.items():
            got = reader.read_f32(info, 0, np.empty(info.numel, np.float32)).reshape(info.shape)
            want = merged[name]
            ulp = np.maximum(np.abs(want), np.abs(got)) * 2.0 ** -7 + 1e-30  # at least one bf16 ulp of the value
            worst = max(worst, float(np.max(np.abs(got - want) / ulp)))
            if name != "model.embed_tokens.weight":  # bf16(W + float32 delta), as PEFT's Linear merge
                assert np.mean(got != want) < 0.01, name  # a rare 1-ulp tie from another summation order
            # PEFT's Embedding merge rounds the delta to bf16 before adding it (two roundings); we round once
    assert worst <= 1.0


# -- derived tensors: any element range, any row slice ---------------------------------------------


@pytest.mark.parametrize("transpose", [False, True])
def test_derived_tensor_reads_any_range_and_row_slice(tmp_path, transpose):
    """Factors in memory (a .pdparams adapter's), bf16 weight: every range and row slice reads the whole's bits."""
    rng = np.random.default_rng(0)
    rows, cols, r = 150, 24, 3  # more rows than one TILE_ROWS tile
    weight = rng.standard_normal((rows, cols)).astype(ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "w.safetensors", {"w": weight, "ids": np.arange(6, dtype=np.int64)})
    header = open_checkpoint(tmp_path, "w").tensors
    left = rng.standard_normal((cols, r) if transpose else (rows, r)).astype(np.float32)
    right = rng.standard_normal((r, rows) if transpose else (r, cols)).astype(np.float32)
    delta = derived.LowRankDelta(left, right, 0.75, transpose, "test")
    info = derived.DerivedTensor.of(header["w"], "BF16", delta)
    product = (left.astype(np.float64) @ right.astype(np.float64)) * 0.75
    want = (weight.astype(np.float32) + (product.T if transpose else product).astype(np.float32)).astype(ml_dtypes.bfloat16)
    with TensorReader() as reader:
        whole = reader.read_raw(info).reshape(rows, cols)
        assert np.abs(whole.astype(np.float32) - want.astype(np.float32)).max() <= np.abs(want.astype(np.float32)).max() * 2 ** -7
        flat = whole.reshape(-1)
        for start, count in ((0, 1), (5, 7), (23, 50), (cols * 63, cols * 3), (rows * cols - 9, 9)):
            assert reader.read_raw(info, start, count).tobytes() == flat[start : start + count].tobytes()
            assert reader.map_stored(info, start, count) is None  # computed, never mapped
        part = info.rows(60, 140)
        assert isinstance(part, derived.DerivedTensor) and part.shape == (80, cols)
        assert reader.read_raw(part).tobytes() == whole[60:140].tobytes()
        assert reader.read_raw(part.rows(10, 20)).tobytes() == whole[70:80].tobytes()
        buffer = np.empty(cols, np.float32)
        assert reader.read_f32(part, cols * 5, buffer).tobytes() == whole[65].astype(np.float32).tobytes()
        ids = derived.DerivedTensor.of(np.arange(6, dtype=np.int64) * 7, "I64")  # a replacement moved as it is
        assert reader.read_raw(ids, 2, 3).tolist() == [14, 21, 28]


def test_multi_document_intermediate_rebuilt_when_its_adapter_changes(tmp_path, family):
    ft0, ft1 = family.model_dirs
    adapter = tmp_path / "adapter"
    write_peft_adapter(adapter, seed=3)
    recipe = tmp_path / "multi.yml"
    recipe.write_text(MULTI.format(base=family.base_dir, first=f"{ft0}+{adapter}", ft1=ft1))
    argv = [str(recipe), str(tmp_path / "out"), "--intermediate_dir", str(tmp_path / "mid"), "--quiet", "--overwrite"]

    def recorded_hash():
        return json.loads((tmp_path / "mid" / "mid" / "merge_config.json").read_text())["recipe_hash"]

    assert recipe_cli.main(argv) == 0
    first = recorded_hash()
    assert recipe_cli.main(argv) == 0 and recorded_hash() == first  # same inputs: reused
    os.utime(adapter / "adapter_model.safetensors", ns=(1, 1))  # the adapter changed
    assert recipe_cli.main(argv) == 0 and recorded_hash() != first


def test_document_name_with_an_adapter(tmp_path, family):
    """``mid+LORA`` in a later document: the adapter folded into document mid's output, byte for byte the
    merge of that output folded first."""
    ft0, ft1 = family.model_dirs
    adapter = tmp_path / "adapter"
    write_peft_adapter(adapter, seed=5)
    recipe = tmp_path / "multi.yml"
    recipe.write_text(f"name: mid\nmerge_method: linear\nmodels:\n  - model: {ft0}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {ft1}\n    parameters: {{weight: 3.0}}\n---\n"
                      f"merge_method: task_arithmetic\nbase_model: {family.base_dir}\nmodels:\n"
                      f"  - model: mid+{adapter}\n    parameters: {{weight: 0.5}}\n")
    assert recipe_cli.main([str(recipe), str(tmp_path / "out"), "--intermediate_dir", str(tmp_path / "i"), "--quiet"]) == 0
    folded = fold_first(tmp_path / "i" / "mid", adapter, tmp_path / "mid_folded")
    merge(MergeConfig(merge_method="task_arithmetic", model_path_list=[str(folded)], weight_list=[0.5],
                      base_model_path=str(family.base_dir), output_path=str(tmp_path / "want"), quiet=True))
    assert_same_tensors(tmp_path / "out", tmp_path / "want")


def test_inspect_reads_a_reference_as_the_folded_model(tmp_path, family):
    """``llm-merge inspect`` takes MODEL+LORA too: the same figures as for the model folded first."""
    from llm_merge.report.inspection.inspect_models import inspect_models
    from llm_merge.report.inspection.options import InspectConfig

    ft0, ft1 = family.model_dirs
    adapter = tmp_path / "adapter"
    write_peft_adapter(adapter, seed=6)
    folded = fold_first(ft0, adapter, tmp_path / "folded")
    reports = [inspect_models(InspectConfig(base_model_path=str(family.base_dir), model_path_list=[first, str(ft1)],
                                            quiet=True))
               for first in (f"{ft0}+{adapter}", str(folded), str(ft0))]
    assert reports[0]["tensors"] == reports[1]["tensors"]
    assert reports[0]["tensors"] != reports[2]["tensors"]  # the adapter does change the figures
