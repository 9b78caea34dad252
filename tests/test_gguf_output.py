"""``--output_format gguf``: the file read back with the ``gguf`` package's reader.

Every tensor equals the merged safetensors tensor (same flags) after the converter's permutation and
the same rounding; the metadata keys are the ones llama.cpp reads; the vocabulary has one token per
embedding row (added tokens, union vocabularies); errors come before any work and leave nothing.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml

from checkpoints import read_checkpoint, write_safetensors
from gguf_helpers import write_bpe_tokenizer
from llm_merge.cli.lora import main as lora_main
from llm_merge.cli.merge import main
from llm_merge.cli.recipe import main as recipe_main
from llm_merge.toy import make_family

gguf = pytest.importorskip("gguf")

HEADS, KV_HEADS, HIDDEN = 4, 2, 64
ADDED = [(272, "<|begin|>", True), (273, "<|end|>", True), (274, "hello world", False)]
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """Base + 2 bf16 fine-tunes (Llama, vocabulary 300 rows) with a byte-level BPE tokenizer."""
    root = tmp_path_factory.mktemp("gguf_family")
    info = make_family(root, n_models=2, hidden=HIDDEN, intermediate=128, layers=2, vocab=300, heads=HEADS,
                       kv_heads=KV_HEADS, dtype="bfloat16")
    for directory in info["model_dirs"]:
        write_bpe_tokenizer(Path(directory), ADDED, chat_template=TEMPLATE)
    return root


def merge_args(family: Path, out: Path, *extra: str) -> list[str]:
    return ["--merge_method", "ties", "--base_model_path", str(family / "base"), "--model_path_list",
            str(family / "ft1"), str(family / "ft2"), "--output_path", str(out), "--quiet", *extra]


def permute_reference(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K order, element by element: row a*(d/2)+b of each head goes to row 2b+a."""
    out = np.empty_like(rows)
    head_dim = rows.shape[0] // heads
    for h in range(heads):
        for a in range(2):
            for b in range(head_dim // 2):
                out[h * head_dim + 2 * b + a] = rows[h * head_dim + a * head_dim // 2 + b]
    return out


def converted(values: np.ndarray, type_name: str) -> bytes:
    """The bytes of float32 ``values`` in a GGUF type, as llama.cpp's converter makes them."""
    if type_name == "F32":
        return values.astype(np.float32).tobytes()
    if type_name == "F16":
        return values.astype(np.float16).tobytes()
    if type_name == "BF16":
        return values.astype(ml_dtypes.bfloat16).tobytes()
    return gguf.quants.quantize(values, getattr(gguf.GGMLQuantizationType, type_name)).tobytes()


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
              "model.norm.weight": "output_norm.weight"}
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(name: str) -> str:
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest.rsplit('.', 1)[0]]}.weight"


def check_tensors_equal(gguf_file: Path, safetensors_dir: Path, matrix_type: str, heads=(HEADS, KV_HEADS)) -> None:
    reader = gguf.GGUFReader(gguf_file)
    found = {t.name: t for t in reader.tensors}
    merged = read_checkpoint(safetensors_dir)
    assert set(found) == {gguf_name(n) for n in merged}
    for name, value in merged.items():
        tensor = found[gguf_name(name)]
        values = value.astype(np.float32)
        if name.endswith("q_proj.weight"):
            values = permute_reference(values, heads[0])
        elif name.endswith("k_proj.weight"):
            values = permute_reference(values, heads[1])
        type_name = "F32" if values.ndim == 1 else matrix_type
        assert tensor.tensor_type.name == type_name, name
        assert [int(n) for n in tensor.shape] == list(reversed(values.shape)), name
        assert np.asarray(tensor.data).tobytes() == converted(values, type_name), name


@pytest.mark.parametrize("gguf_type, n_process", [(None, 1), ("f32", 1), ("f16", 2), ("q8_0", 1), ("q4_0", 1)])
def test_tensors_equal_merged_safetensors(family, tmp_path, gguf_type, n_process):
    assert main(merge_args(family, tmp_path / "st")) == 0
    extra = ["--output_format", "gguf", "--n_process", str(n_process)] + (["--gguf_type", gguf_type] if gguf_type else [])
    assert main(merge_args(family, tmp_path / "gg", *extra)) == 0
    assert sorted(p.name for p in (tmp_path / "gg").iterdir()) == ["merge_config.json", "model.gguf"]
    check_tensors_equal(tmp_path / "gg" / "model.gguf", tmp_path / "st", (gguf_type or "bf16").upper())


def test_workers_write_the_same_bytes(family, tmp_path):
    for n in (1, 2):  # same output name: general.name is the output directory's
        assert main(merge_args(family, tmp_path / f"n{n}" / "gg", "--output_format", "gguf", "--gguf_type", "q8_0",
                               "--n_process", str(n))) == 0
    assert (tmp_path / "n1" / "gg" / "model.gguf").read_bytes() == (tmp_path / "n2" / "gg" / "model.gguf").read_bytes()


def test_chunks_of_any_size_give_the_same_file(family, tmp_path, monkeypatch):
    """Writes split at arbitrary elements (mid-row, mid-head) and small conversion blocks change no byte."""
    from llm_merge.io.gguf_output import writer

    args = ("--output_format", "gguf", "--gguf_type", "q4_1")
    assert main(merge_args(family, tmp_path / "a" / "gg", *args)) == 0
    whole = writer.GGUFTensorWriter.write
    rng = np.random.default_rng(0)

    def split(self, file, offset, data):
        raw = np.ascontiguousarray(data).reshape(-1)
        cuts = np.sort(rng.choice(np.arange(1, raw.size), size=min(5, raw.size - 1), replace=False)) if raw.size > 1 else []
        for piece, start in zip(np.split(raw, cuts), [0, *cuts]):
            whole(self, file, offset + int(start) * raw.itemsize, piece)

    monkeypatch.setattr(writer.GGUFTensorWriter, "write", split)
    monkeypatch.setattr(writer, "BLOCK_ELEMENTS", 100)
    assert main(merge_args(family, tmp_path / "b" / "gg", *args)) == 0
    assert (tmp_path / "a" / "gg" / "model.gguf").read_bytes() == (tmp_path / "b" / "gg" / "model.gguf").read_bytes()


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def test_metadata(family, tmp_path):
    assert main(merge_args(family, tmp_path / "gg", "--output_format", "gguf", "--gguf_type", "f16")) == 0
    keys = fields(tmp_path / "gg" / "model.gguf")
    vocab = write_bpe_tokenizer(tmp_path, ADDED)
    expected = {
        "general.architecture": "llama", "general.type": "model", "general.name": "gg", "general.file_type": 1,
        "general.quantization_version": 2, "llama.block_count": 2, "llama.context_length": 2048,
        "llama.embedding_length": HIDDEN, "llama.feed_forward_length": 128, "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS, "llama.rope.freq_base": 10000.0, "llama.vocab_size": 300,
        "llama.rope.dimension_count": HIDDEN // HEADS, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 272, "tokenizer.ggml.eos_token_id": 273, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": TEMPLATE,
    }
    assert {k: keys[k] for k in expected} == expected
    assert keys["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    by_id = {i: text for text, i in vocab.items()}
    assert keys["tokenizer.ggml.tokens"] == [by_id.get(i, f"[PAD{i}]") for i in range(300)]
    types = keys["tokenizer.ggml.token_type"]
    assert types[:272] == [1] * 272 and types[272:275] == [3, 3, 4] and types[275:] == [5] * 25
    assert keys["tokenizer.ggml.merges"][:2] == ["Ġ t", "h e"]


def test_union_vocabulary_matches_embedding_rows(family, tmp_path):
    """ft2 has 4 more rows and 3 more added tokens: the GGUF vocabulary is the union's, one token per row."""
    pytest.importorskip("tokenizers")
    wide = make_family(tmp_path / "wide", n_models=2, hidden=HIDDEN, intermediate=128, layers=2, vocab=304,
                       heads=HEADS, kv_heads=KV_HEADS, dtype="bfloat16")
    more = ADDED + [(275, "<|tool|>", True), (276, "<|user|>", True), (277, "again", False)]
    write_bpe_tokenizer(Path(wide["fine_tunes"][1]), more)
    args = ["--merge_method", "linear", "--model_path_list", str(family / "ft1"), wide["fine_tunes"][1],
            "--tokenizer_source", "union", "--quiet"]
    assert main(args + ["--output_path", str(tmp_path / "st")]) == 0
    assert main(args + ["--output_path", str(tmp_path / "gg"), "--output_format", "gguf", "--gguf_type", "f32"]) == 0
    path = tmp_path / "gg" / "model.gguf"
    keys = fields(path)
    embed = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    assert len(keys["tokenizer.ggml.tokens"]) == int(embed.shape[1]) == 304 == keys["llama.vocab_size"]
    assert keys["tokenizer.ggml.tokens"][272:279] == ["<|begin|>", "<|end|>", "hello world", "<|tool|>", "<|user|>", "again", "[PAD278]"]
    assert keys["tokenizer.ggml.token_type"][272:279] == [3, 3, 4, 3, 3, 4, 5]
    check_tensors_equal(path, tmp_path / "st", "F32")


def test_sentencepiece_tokenizer_model(family, tmp_path):
    """A tokenizer.model (Llama-2 / Mistral style): pieces, scores and types from sentencepiece, padded to the rows."""
    spm = pytest.importorskip("sentencepiece")
    import io

    words = ["the", "cat", "sat", "on", "mat", "where", "is", "it", "rats", "there", "hello", "world", "merge"]
    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(words, size=8)) for _ in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=290, model_type="bpe",
                                   byte_fallback=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    models = []
    for name in ("ft1", "ft2"):
        directory = tmp_path / name
        directory.mkdir()
        for item in (family / name).iterdir():
            if not item.name.startswith("tokenizer"):
                (directory / item.name).write_bytes(item.read_bytes())
        (directory / "tokenizer.model").write_bytes(model.getvalue())
        models.append(str(directory))
    assert main(["--model_path_list", *models, "--output_path", str(tmp_path / "gg"), "--quiet", "--output_format", "gguf"]) == 0
    keys = fields(tmp_path / "gg" / "model.gguf")
    assert keys["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in keys
    assert keys["tokenizer.ggml.tokens"] == [sp.IdToPiece(i) for i in range(290)] + [f"[PAD{i}]" for i in range(290, 300)]
    np.testing.assert_allclose(keys["tokenizer.ggml.scores"][:290], [sp.GetScore(i) for i in range(290)])
    kinds = [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 1 for i in range(290)]
    assert keys["tokenizer.ggml.token_type"] == kinds + [5] * 10


def test_llama3_rope_scaling_becomes_rope_freqs(family, tmp_path):
    base = tmp_path / "m"
    base.mkdir()
    for item in (family / "ft1").iterdir():
        (base / item.name).write_bytes(item.read_bytes())
    config = json.loads((base / "config.json").read_text())
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    config.pop("rope_theta")
    config["rope_parameters"] = {"rope_theta": 500000.0, **scaling}  # transformers 5's form
    (base / "config.json").write_text(json.dumps(config))
    assert main(["--model_path_list", str(base), str(base), "--output_path", str(tmp_path / "gg"), "--quiet",
                 "--output_format", "gguf"]) == 0
    reader = gguf.GGUFReader(tmp_path / "gg" / "model.gguf")
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    head_dim = HIDDEN // HEADS
    wavelengths = 2 * np.pi * 500000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (64 / wavelengths - 1.0) / (4.0 - 1.0)
    want = np.where(wavelengths < 64 / 4.0, 1.0, np.where(wavelengths > 64 / 1.0, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))
    np.testing.assert_allclose(np.asarray(freqs.data), want, rtol=1e-5)
    assert fields(tmp_path / "gg" / "model.gguf")["llama.rope.freq_base"] == 500000.0


def write_qwen(directory: Path, seed: int, architecture: str = "Qwen2ForCausalLM") -> dict:
    """A tiny Qwen2 (float32, q/k/v biases) or Qwen3 (q/k norms) checkpoint with the test tokenizer."""
    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": rng.normal(size=(300, 32)), "model.norm.weight": rng.normal(size=32),
               "lm_head.weight": rng.normal(size=(300, 32))}
    for part, rows in (("q", 32), ("k", 16), ("v", 16)):
        tensors[f"model.layers.0.self_attn.{part}_proj.weight"] = rng.normal(size=(rows, 32))
        if architecture == "Qwen2ForCausalLM":
            tensors[f"model.layers.0.self_attn.{part}_proj.bias"] = rng.normal(size=rows)
        elif part != "v":
            tensors[f"model.layers.0.self_attn.{part}_norm.weight"] = rng.normal(size=8)
    tensors.update({"model.layers.0.self_attn.o_proj.weight": rng.normal(size=(32, 32)),
                    "model.layers.0.mlp.gate_proj.weight": rng.normal(size=(64, 32)),
                    "model.layers.0.mlp.up_proj.weight": rng.normal(size=(64, 32)),
                    "model.layers.0.mlp.down_proj.weight": rng.normal(size=(32, 64)),
                    "model.layers.0.input_layernorm.weight": rng.normal(size=32),
                    "model.layers.0.post_attention_layernorm.weight": rng.normal(size=32)})
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    directory.mkdir()
    write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})
    (directory / "config.json").write_text(json.dumps({
        "architectures": [architecture], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 512}))
    write_bpe_tokenizer(directory, ADDED)
    return tensors


def test_qwen2_keeps_q_k_order_and_biases_in_f32(tmp_path):
    write_qwen(tmp_path / "a", 0)
    write_qwen(tmp_path / "b", 1)
    args = ["--model_path_list", str(tmp_path / "a"), str(tmp_path / "b"), "--quiet"]
    assert main(args + ["--output_path", str(tmp_path / "st")]) == 0
    assert main(args + ["--output_path", str(tmp_path / "gg"), "--output_format", "gguf", "--gguf_type", "f16"]) == 0
    reader = gguf.GGUFReader(tmp_path / "gg" / "model.gguf")
    found = {t.name: t for t in reader.tensors}
    merged = read_checkpoint(tmp_path / "st")
    assert fields(tmp_path / "gg" / "model.gguf")["general.architecture"] == "qwen2"
    for part in ("q", "k", "v"):
        bias = found[f"blk.0.attn_{part}.bias"]
        assert bias.tensor_type.name == "F32"
        assert np.asarray(bias.data).tobytes() == merged[f"model.layers.0.self_attn.{part}_proj.bias"].tobytes()
        weight = found[f"blk.0.attn_{part}.weight"]  # not permuted
        assert np.asarray(weight.data).tobytes() == converted(merged[f"model.layers.0.self_attn.{part}_proj.weight"], "F16")


def test_qwen3_q_k_norms(tmp_path):
    write_qwen(tmp_path / "a", 0, "Qwen3ForCausalLM")
    assert main(["--model_path_list", str(tmp_path / "a"), str(tmp_path / "a"), "--output_path", str(tmp_path / "gg"),
                 "--quiet", "--output_format", "gguf"]) == 0
    found = {t.name: t for t in gguf.GGUFReader(tmp_path / "gg" / "model.gguf").tensors}
    assert fields(tmp_path / "gg" / "model.gguf")["general.architecture"] == "qwen3"
    assert found["blk.0.attn_q_norm.weight"].tensor_type.name == found["blk.0.attn_k_norm.weight"].tensor_type.name == "F32"
    assert found["blk.0.attn_q.weight"].tensor_type.name == "F32"  # the merged dtype


def test_lora_fold_and_recipe_write_gguf(family, tmp_path):
    rng = np.random.default_rng(3)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    write_safetensors(adapter / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.normal(size=(2, HIDDEN)).astype(np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.normal(size=(HIDDEN, 2)).astype(np.float32)})
    fold = ["--model_name_or_path", str(family / "base"), "--lora_path", str(adapter), "--quiet"]
    assert lora_main(fold + ["--output_path", str(tmp_path / "st")]) == 0
    assert lora_main(fold + ["--output_path", str(tmp_path / "gg"), "--output_format", "gguf", "--gguf_type", "q8_0"]) == 0
    assert sorted(p.name for p in (tmp_path / "gg").iterdir()) == ["lora_merge_config.json", "model.gguf"]
    check_tensors_equal(tmp_path / "gg" / "model.gguf", tmp_path / "st", "Q8_0")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(family / "ft1"), "parameters": {"weight": 1.0}}, {"model": str(family / "ft2"), "parameters": {"weight": 1.0}}]}))
    assert recipe_main([str(recipe), str(tmp_path / "rst"), "--quiet"]) == 0
    assert recipe_main([str(recipe), str(tmp_path / "rgg"), "--quiet", "--output_format", "gguf"]) == 0
    check_tensors_equal(tmp_path / "rgg" / "model.gguf", tmp_path / "rst", "F32")


def _no_tokenizer(family, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    for item in (family / "ft1").iterdir():
        if not item.name.startswith("tokenizer"):
            (model / item.name).write_bytes(item.read_bytes())
    return ["--model_path_list", str(model), str(family / "ft2"), "--output_format", "gguf"]


def _architecture(family, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    for item in (family / "ft1").iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    return ["--model_path_list", str(model), str(family / "ft2"), "--output_format", "gguf"]


@pytest.mark.parametrize("case, code, message", [
    (lambda f, t: ["--model_path_list", str(f / "ft1"), "--gguf_type", "q8_0"], 2,
     "--gguf_type q8_0: needs --output_format gguf (output_format is safetensors)"),
    (lambda f, t: ["--model_path_list", str(f / "ft1"), "--output_format", "gguf", "--gguf_type", "q3_k"], 2,
     "argument --gguf_type: invalid choice: 'q3_k' (choose from 'f32', 'f16', 'bf16', 'q8_0', 'q4_0'"),
    (_architecture, 1, "architecture 'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM, MistralForCausalLM, "
                       "Qwen2ForCausalLM, Qwen3ForCausalLM"),
    (_no_tokenizer, 1, "has no tokenizer.json or tokenizer.model; a GGUF file needs the tokenizer"),
], ids=["type-without-format", "unknown-type", "architecture", "no-tokenizer"])
def test_errors_before_any_work(family, tmp_path, capsys, case, code, message):
    out = tmp_path / "out"
    assert main(case(family, tmp_path) + ["--output_path", str(out)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_multi_rank_and_lora_flag_errors(family, tmp_path, capsys):
    from llm_merge.api import merge
    from llm_merge.config.options import MergeConfig
    from llm_merge.errors import ConfigError

    with pytest.raises(ConfigError, match="--output_format gguf: not supported in a multi-rank merge"):
        merge(MergeConfig(model_path_list=[str(family / "ft1")], output_path=str(tmp_path / "gg"), output_format="gguf",
                          rank=0, world_size=2, quiet=True))
    assert lora_main(["--model_name_or_path", str(family / "base"), "--lora_path", str(tmp_path), "--output_path",
                      str(tmp_path / "gg"), "--gguf_type", "f16"]) == 2
    assert capsys.readouterr().err.strip() == (
        "llm_merge: error: --gguf_type f16: needs --output_format gguf (output_format is safetensors)")
    assert not (tmp_path / "gg").exists()


def test_missing_gguf_package_says_how_to_install(family, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(merge_args(family, tmp_path / "gg", "--output_format", "gguf")) == 2
    assert capsys.readouterr().err.strip() == (
        "llm_merge: error: --output_format gguf: needs the gguf package; install it with: pip install 'llm_merge[gguf]'")


def test_a_failing_worker_publishes_nothing(family, tmp_path, capsys, monkeypatch):
    from llm_merge.io.gguf_output import writer

    def fail(self, tensor, first, values):
        raise OSError("disk full")

    monkeypatch.setattr(writer.GGUFTensorWriter, "_convert", fail)
    assert main(merge_args(family, tmp_path / "gg", "--output_format", "gguf")) == 1
    assert "disk full" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
