"""Messy real-world checkpoints: missing tensors, tied embeddings, vocabulary mismatches, layer names, spawn."""

import json

import numpy as np
import pytest
import reference as ref
from checkpoints import read_checkpoint, write_checkpoint
from conftest import run_mergekit

from llm_merge.api import merge
from llm_merge.config.options import MergeConfig
from llm_merge.config.validate import resolve
from llm_merge.errors import ConfigError, MergeError
from llm_merge.config.names import layer_index

HIDDEN = 4


def rnd(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def write(dir, tensors, config=None, tokens=None):
    d = write_checkpoint(dir, tensors)
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if tokens is not None:
        (d / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokens)))
    return d


def tokenizer_json(tokens):
    """A minimal WordLevel tokenizer.json (loadable by the tokenizers package)."""
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}, "unk_token": tokens[0]},
    }


def run(tmp_path, models, base=None, name="out", **options):
    cfg = MergeConfig(model_path_list=[str(m) for m in models], base_model_path=str(base) if base else None,
                      output_path=str(tmp_path / name), **options)
    out = merge(cfg)
    return read_checkpoint(out), out


# -- 1. missing tensors ----------------------------------------------------------------------
@pytest.fixture
def gappy(tmp_path):
    """Three models; model 1 lacks "w" and the ids; the base lacks "c"."""
    full = lambda s: {"w": rnd(s, 6, HIDDEN), "b": rnd(s + 10, HIDDEN), "c": rnd(s + 20, 3), "ids": np.arange(3, dtype=np.int64) + s}
    models = []
    for i in range(3):
        tensors = full(i)
        if i == 1:
            del tensors["w"], tensors["ids"]
        models.append((write(tmp_path / f"m{i}", tensors), tensors))
    base_tensors = full(7)
    del base_tensors["c"]
    return models, (write(tmp_path / "base", base_tensors), base_tensors)


def test_missing_tensor_is_an_error_by_default(tmp_path, gappy):
    models, _ = gappy
    result = run_mergekit("--model_path_list", *(d for d, _ in models), "--output_path", tmp_path / "out")
    assert result.returncode == 1
    assert "tensor names differ" in result.stderr and "missing 2 (ids, w)" in result.stderr
    assert "--on_missing_tensor" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_tensor_skip(tmp_path, gappy):
    models, (base, _) = gappy
    out, _ = run(tmp_path, [d for d, _ in models], on_missing_tensor="skip")
    assert set(out) == {"b", "c"}
    np.testing.assert_allclose(out["b"], sum(t["b"] for _, t in models) / 3, rtol=1e-6)
    out, _ = run(tmp_path, [d for d, _ in models], base, name="out2", on_missing_tensor="skip")
    assert set(out) == {"b"}  # "c" is missing from the base


def test_missing_tensor_base(tmp_path, gappy):
    models, (base, base_tensors) = gappy
    out, _ = run(tmp_path, [d for d, _ in models], base, on_missing_tensor="base", weight_list=[1, 2, 3])
    assert set(out) == {"w", "b", "c", "ids"}
    assert out["w"].tobytes() == base_tensors["w"].tobytes()  # from the base, unchanged
    np.testing.assert_array_equal(out["ids"], models[0][1]["ids"])  # non-float: first model that has it
    # "c": the base lacks it, merged over all models without a base
    np.testing.assert_allclose(out["c"], sum((i + 1) * t["c"] for i, (_, t) in enumerate(models)) / 6, rtol=1e-6)
    expected_b = base_tensors["b"] + sum((i + 1) * (t["b"] - base_tensors["b"]) for i, (_, t) in enumerate(models)) / 6
    np.testing.assert_allclose(out["b"], expected_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("numba", ["0", "1"])
def test_missing_tensor_without_base_keeps_model_indices(tmp_path, gappy, monkeypatch, numba):
    """Merged over models 0 and 2: their weights and their draw keys (index in --model_path_list)."""
    monkeypatch.setenv("LLM_MERGE_NUMBA", numba)
    models, _ = gappy
    out, _ = run(tmp_path, [d for d, _ in models], on_missing_tensor="base", merge_method="dare_linear",
                 reserve_p=0.5, weight_list=[1, 5, 3], seed=3)
    ys = [ref.dare(models[i][1]["w"], 0.5, seed=3, tensor_name="w", model_index=i) for i in (0, 2)]
    np.testing.assert_allclose(out["w"], ref.linear(ys, [1, 3]), rtol=1e-6)
    wrong = [ref.dare(models[i][1]["w"], 0.5, seed=3, tensor_name="w", model_index=k) for k, i in enumerate((0, 2))]
    assert not np.allclose(out["w"], ref.linear(wrong, [1, 3]))


def test_compiled_and_numpy_agree_on_subsets(tmp_path, gappy, monkeypatch):
    models, _ = gappy
    outputs = []
    for numba in ("0", "1"):
        monkeypatch.setenv("LLM_MERGE_NUMBA", numba)
        _, path = run(tmp_path, [d for d, _ in models], name=f"o{numba}", on_missing_tensor="base", merge_method="dare_ties")
        outputs.append((path / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]


def test_copied_float_tensor_takes_the_output_dtype(tmp_path, gappy):
    models, (base, base_tensors) = gappy
    out, _ = run(tmp_path, [d for d, _ in models], base, on_missing_tensor="base", output_dtype="float16")
    assert out["w"].dtype == np.float16
    np.testing.assert_array_equal(out["w"], base_tensors["w"].astype(np.float16))


# -- 2. tied embeddings ------------------------------------------------------------------------
def llama(seed, vocab=8, tied=False):
    tensors = {"model.embed_tokens.weight": rnd(seed, vocab, HIDDEN), "model.norm.weight": rnd(seed + 1, HIDDEN)}
    if not tied:
        tensors["lm_head.weight"] = rnd(seed + 2, vocab, HIDDEN)
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "tie_word_embeddings": tied, "hidden_size": HIDDEN}
    return tensors, config


def test_tied_model_merged_with_untied_uses_its_embedding_as_head(tmp_path):
    (ta, ca), (tb, cb) = llama(0, tied=True), llama(10)
    a, b = write(tmp_path / "a", ta, ca), write(tmp_path / "b", tb, cb)
    out, path = run(tmp_path, [a, b])
    np.testing.assert_allclose(out["lm_head.weight"], (ta["model.embed_tokens.weight"] + tb["lm_head.weight"]) / 2, rtol=1e-6)
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False
    # the untied model first: same output, its config already says untied
    out2, path2 = run(tmp_path, [b, a], name="out2")
    np.testing.assert_allclose(out2["lm_head.weight"], out["lm_head.weight"], rtol=1e-6)
    assert json.loads((path2 / "config.json").read_text())["tie_word_embeddings"] is False


def test_all_tied_stays_tied(tmp_path):
    (ta, ca), (tb, cb) = llama(0, tied=True), llama(10, tied=True)
    out, path = run(tmp_path, [write(tmp_path / "a", ta, ca), write(tmp_path / "b", tb, cb)])
    assert "lm_head.weight" not in out
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True


# -- 3. vocabulary mismatch ----------------------------------------------------------------------
@pytest.fixture
def vocabs(tmp_path):
    """Model a: 8 tokens; model b: the same 8 plus 2 (10 rows); base: 10 rows."""
    words = [f"w{i}" for i in range(10)]
    (ta, ca), (tb, cb), (tbase, cbase) = llama(0, 8), llama(10, 10), llama(20, 10)
    cb["bos_token_id"] = 9
    a = write(tmp_path / "a", ta, ca, words[:8])
    b = write(tmp_path / "b", tb, cb, words)
    base = write(tmp_path / "base", tbase, cbase, words)
    return (a, ta), (b, tb), (base, tbase), words


def test_vocab_mismatch_is_an_error_naming_tensors(tmp_path, vocabs):
    (a, _), (b, _), _, _ = vocabs
    result = run_mergekit("--model_path_list", a, b, "--output_path", tmp_path / "out")
    assert result.returncode == 1
    assert "vocabulary sizes differ" in result.stderr
    assert "model.embed_tokens.weight: [8, 4]" in result.stderr and "[10, 4]" in result.stderr and "lm_head.weight" in result.stderr
    assert "--tokenizer_source" in result.stderr


@pytest.mark.parametrize("source", ["model", "union"])
def test_vocab_from_larger_model(tmp_path, vocabs, source):
    if source == "union":
        pytest.importorskip("tokenizers")
    (a, ta), (b, tb), _, words = vocabs
    out, path = run(tmp_path, [a, b], tokenizer_source=str(b) if source == "model" else "union")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (10, HIDDEN)
        np.testing.assert_allclose(out[name][:8], (ta[name] + tb[name][:8]) / 2, rtol=1e-6)
        assert out[name][8:].tobytes() == tb[name][8:].tobytes()  # only b has them
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == 10 and config["bos_token_id"] == 9
    assert list(json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]) == words


def test_vocab_from_base(tmp_path, vocabs):
    (a, ta), (b, tb), (base, tbase), _ = vocabs
    out, path = run(tmp_path, [a, b], base, tokenizer_source="base", weight_list=[1, 3])
    name = "model.embed_tokens.weight"
    bb = tbase[name]
    np.testing.assert_allclose(out[name][:8], bb[:8] + ((ta[name] - bb[:8]) + 3 * (tb[name][:8] - bb[:8])) / 4, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[name][8:], bb[8:] + (tb[name][8:] - bb[8:]), rtol=1e-5, atol=1e-6)  # b's weight only
    assert json.loads((path / "config.json").read_text())["vocab_size"] == 10


def test_vocab_smaller_source_truncates(tmp_path, vocabs):
    (a, _), (b, _), _, words = vocabs
    out, path = run(tmp_path, [b, a], tokenizer_source=str(a))
    assert out["lm_head.weight"].shape == (8, HIDDEN)
    assert json.loads((path / "config.json").read_text())["vocab_size"] == 8
    assert list(json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]) == words[:8]


def test_vocab_ids_that_mean_different_tokens_are_refused(tmp_path, vocabs):
    (a, _), (b, _), _, words = vocabs
    (b / "tokenizer.json").write_text(json.dumps(tokenizer_json(words[:3] + ["other"] + words[4:])))
    with pytest.raises(MergeError, match="token id 3 is 'w3'"):
        run(tmp_path, [a, b], tokenizer_source=str(b))


def test_tokenizer_source_must_be_an_input(tmp_path, vocabs):
    (a, _), (b, _), _, _ = vocabs
    with pytest.raises(ConfigError, match="tokenizer_source"):
        run(tmp_path, [a, b], tokenizer_source=str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="base_model_path"):
        run(tmp_path, [a, b], tokenizer_source="base")


# -- 4. layer names ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, index", [
    ("model.layers.12.mlp.up_proj.weight", 12),
    ("transformer.h.3.attn.c_attn.weight", 3),
    ("model.language_model.layers.0.self_attn.q_proj.weight", 0),
    ("gpt_neox.layers.31.attention.dense.weight", 31),
    ("model.embed_tokens.weight", None),
    ("lm_head.weight", None),
    ("model.layers_norm.weight", None),
])
def test_layer_index_default_pattern(name, index):
    assert layer_index(name) == index


def test_layer_pattern_option(tmp_path):
    assert layer_index("llama.layers.7.mlp.weight", r"^llama\.layers\.(\d+)\.") == 7
    cfg = MergeConfig(model_path_list=["a"], output_path=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="exactly one"):
        resolve(MergeConfig(**{**cfg.__dict__, "layer_pattern": r"layers\.\d+"}))
    with pytest.raises(ConfigError, match="not a valid"):
        resolve(MergeConfig(**{**cfg.__dict__, "layer_pattern": r"layers\.(\d+"}))


# -- 5. start method -----------------------------------------------------------------------------
def test_spawn_start_method_gives_the_same_bytes(tmp_path, pair):
    outputs = []
    for name, extra in (("inline", []), ("spawn", ["--n_process", "2", "--start_method", "spawn"])):
        result = run_mergekit("--merge_method", "dare_ties", "--base_model_path", pair["base"], "--model_path_list",
                              pair["ft1"], pair["ft2"], "--output_path", tmp_path / name, *extra)
        assert result.returncode == 0, result.stderr
        outputs.append((tmp_path / name / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]
