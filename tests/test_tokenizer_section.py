"""mergekit's ``tokenizer:`` section and ``chat_template``: union tokenizers built, rows per token by mergekit's
rules (checked against tests/mergekit_reference_tokenizer.py and by hand), padding, chat templates."""

import json

import numpy as np
import pytest
from checkpoints import read_checkpoint, write_checkpoint
from mergekit_reference_tokenizer import permuted

from llm_merge.api import merge
from llm_merge.config.recipes import recipe_to_config
from llm_merge.errors import ConfigError

pytest.importorskip("tokenizers")
HIDDEN = 6
NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def tokenizer_json(tokens, added=()):
    """A WordLevel tokenizer.json; ``added``: tokens that are special added tokens."""
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": tokens.index(t), "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t in added],
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}, "unk_token": tokens[0]},
    }


def write_model(directory, seed, tokens, added=(), template=None):
    rng = np.random.default_rng(seed)
    tensors = {n: rng.standard_normal((len(tokens), HIDDEN)).astype(np.float32) for n in NAMES}
    tensors["model.norm.weight"] = rng.standard_normal(HIDDEN).astype(np.float32)
    d = write_checkpoint(directory, tensors)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": len(tokens),
                                               "hidden_size": HIDDEN, "tie_word_embeddings": False}))
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokens, added)))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"}
    if template:
        config["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d, tensors, {t: i for i, t in enumerate(tokens)}


@pytest.fixture
def family(tmp_path):
    """base: <s> a b c; m1: <s> a b c d; m2: <s> b a c e <x> (another order, an added special token)."""
    return {"base": write_model(tmp_path / "base", 0, ["<s>", "a", "b", "c"], ["<s>"], "{{ 'T1' }}{# one #}"),
            "m1": write_model(tmp_path / "m1", 1, ["<s>", "a", "b", "c", "d"], ["<s>"], "{{ 'T2' }}{# two #}"),
            "m2": write_model(tmp_path / "m2", 2, ["<s>", "b", "a", "c", "e", "<x>"], ["<s>", "<x>"], "{{ 'T2' }}{# two #}")}


def run(tmp_path, family, tokenizer=None, **extra):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(family["base"][0]),
              "models": [{"model": str(family["m1"][0]), "parameters": {"weight": 1.0}},
                         {"model": str(family["m2"][0]), "parameters": {"weight": 0.5}}], **extra}
    if tokenizer is not None:
        recipe["tokenizer"] = tokenizer
    out = merge(recipe_to_config(recipe, str(tmp_path / "out")))
    return read_checkpoint(out), out


def expected(family, vocab, tokens=None, pad=None):
    """Task arithmetic over mergekit's permuted tensors (the NumPy port)."""
    out = {}
    keys = {"base": "base", "m1": "m1", "m2": "m2"}
    for name in NAMES:
        p = permuted({k: family[k][1][name] for k in keys}, {k: family[k][2] for k in keys}, vocab, "base", tokens, pad)
        out[name] = p["base"] + 1.0 * (p["m1"] - p["base"]) + 0.5 * (p["m2"] - p["base"])
    return out


def test_union_builds_a_tokenizer_and_rows_follow_mergekit(tmp_path, family):
    out, path = run(tmp_path, family, {"source": "union"})
    written = json.loads((path / "tokenizer.json").read_text())
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(json.dumps(written)).get_vocab(with_added_tokens=True)
    assert vocab == {"<s>": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "<x>": 6}
    assert json.loads((path / "config.json").read_text())["vocab_size"] == 7
    want = expected(family, vocab)
    for name in NAMES:
        assert out[name].shape == (7, HIDDEN)
        np.testing.assert_allclose(out[name], want[name], rtol=1e-6, atol=1e-6)
    # by hand: 'a' is row 2 of m2; 'd' only m1 has: every input takes m1's row, so base + 1.5*(d - d) ... = d
    (_, b, _), (_, t1, _), (_, t2, _) = family["base"], family["m1"], family["m2"]
    e = "model.embed_tokens.weight"
    np.testing.assert_allclose(out[e][1], b[e][1] + (t1[e][1] - b[e][1]) + 0.5 * (t2[e][2] - b[e][1]), rtol=1e-6)
    np.testing.assert_allclose(out[e][4], t1[e][4], rtol=1e-6)
    np.testing.assert_allclose(out[e][6], t2[e][5], rtol=1e-6)


def test_token_entries_and_padding(tmp_path, family):
    m1, m2 = str(family["m1"][0]), str(family["m2"][0])
    tokens = {"d": {"source": {"kind": "zero"}}, "a": {"source": m2, "force": True},
              "new": {"source": {"kind": "model_token", "model": m1, "token": "c"}},
              "e": {"source": {"kind": "model_token", "model": m2, "token_id": 0}}}
    out, path = run(tmp_path, family, {"source": "union", "tokens": tokens, "pad_to_multiple_of": 4})
    vocab = {"<s>": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "<x>": 6, "new": 7}
    ref_tokens = {"d": {"source": {"kind": "zero"}, "force": False}, "a": {"source": "m2", "force": True},
                  "new": {"source": {"kind": "model_token", "model": "m1", "token": "c"}, "force": False},
                  "e": {"source": {"kind": "model_token", "model": "m2", "token_id": 0}, "force": False}}
    want = expected(family, vocab, ref_tokens, 4)
    for name in NAMES:
        assert out[name].shape == (8, HIDDEN)
        np.testing.assert_allclose(out[name], want[name], rtol=1e-5, atol=1e-6)
    e = "model.embed_tokens.weight"
    # 'd': zero for base and m2, which lack it; m1 keeps its own row: 0 + (d - 0) + 0.5 * (0 - 0)
    np.testing.assert_allclose(out[e][4], family["m1"][1][e][4], rtol=1e-6)
    np.testing.assert_allclose(out[e][1], family["m2"][1][e][2], rtol=1e-6)  # forced: m2's 'a' everywhere
    np.testing.assert_allclose(out[e][7], family["m1"][1][e][3], rtol=1e-6)  # m1's 'c'


def test_padding_rows_are_each_inputs_mean(tmp_path, family):
    out, _ = run(tmp_path, family, {"source": "base", "pad_to_multiple_of": 6})
    vocab = {"<s>": 0, "a": 1, "b": 2, "c": 3}
    want = expected(family, vocab, None, 6)
    for name in NAMES:
        assert out[name].shape == (6, HIDDEN)
        np.testing.assert_allclose(out[name], want[name], rtol=1e-5, atol=1e-6)


def test_written_tokenizer_loads_and_encodes_to_the_rows(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    out, path = run(tmp_path, family, {"source": "union"})
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    ids = tok("a d e <x>", add_special_tokens=False)["input_ids"]
    assert ids == [1, 4, 5, 6]
    assert len(tok) == out["lm_head.weight"].shape[0]


@pytest.mark.parametrize("template, rendered", [("auto", "T2"), ("chatml", "<|im_start|>user\nhi<|im_end|>\n"),
                                                ("{{ 'literal: ' + messages[0]['content'] }}", "literal: hi")])
def test_chat_templates(tmp_path, family, template, rendered):
    transformers = pytest.importorskip("transformers")
    _, path = run(tmp_path, family, {"source": "union"}, chat_template=template)
    assert "chat_template" not in json.loads((path / "tokenizer_config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == rendered


def test_bad_entries_are_config_errors(tmp_path, family):
    with pytest.raises(ConfigError, match="chat_template"):
        run(tmp_path, family, {"source": "union"}, chat_template="nosuch")
    with pytest.raises(ConfigError, match="pad_to_multiple_of"):
        run(tmp_path, family, {"source": "union", "pad_to_multiple_of": 0})
    with pytest.raises(ConfigError, match="token_id and token"):
        run(tmp_path, family, {"tokens": {"q": {"source": {"kind": "model_token", "model": str(family["m1"][0])}}}})
    with pytest.raises(ConfigError, match="not both"):
        run(tmp_path, family, {"source": "union"}, tokenizer_source="union")


def test_document_names_in_the_tokenizer_section_are_references():
    from llm_merge.config.recipe_documents import model_references, with_outputs

    recipe = {"merge_method": "linear", "models": [{"model": "first"}, {"model": "b"}],
              "tokenizer": {"source": "first", "tokens": {"x": {"source": "first"},
                                                          "y": {"source": {"kind": "model_token", "model": "first", "token": "a"}},
                                                          "z": {"source": {"kind": "zero"}}}}}
    refs = model_references(recipe)
    assert refs["tokenizer_source"] == "first" and refs["tokenizer.tokens['x'].source"] == "first"
    out = with_outputs(recipe, {"first": "/out/first"})
    assert out["tokenizer"]["source"] == "/out/first"
    assert out["tokenizer"]["tokens"]["x"]["source"] == "/out/first"
    assert out["tokenizer"]["tokens"]["y"]["source"]["model"] == "/out/first"
    assert out["tokenizer"]["tokens"]["z"]["source"] == {"kind": "zero"}
    assert with_outputs({**recipe, "tokenizer": {"source": "union"}}, {"first": "/o"})["tokenizer"]["source"] == "union"


def test_scratch_rows_file_is_removed_and_a_killed_runs_is_cleaned(tmp_path, family):
    """The virtual rows' scratch file beside the output is gone after the run; one a killed run left (its pid
    dead) is removed by the next run for that output."""
    import subprocess
    import sys

    from llm_merge.io.writer import STAGING_TAG

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = tmp_path / f".out{STAGING_TAG}{dead}-vocab-rows"
    stale.write_bytes(b"\0" * 4096)
    run(tmp_path, family, {"source": "union"})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
