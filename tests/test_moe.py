"""llm-merge-moe: mergekit-moe recipes into Mixtral / Qwen2-MoE / Qwen3-MoE checkpoints.

The first part needs no torch: layouts, bytes, draws and every refusal, on toy families made by
``llm_merge.toy``. The second part (skipped without torch and transformers) loads the outputs in
transformers: each target class loads with no missing or unexpected weights, identical experts give the
dense model's logits, the layer-by-layer hidden states equal transformers' own, and an MoE of two skill
fine-tunes of a small trained Llama routes each skill's prompts to its expert and keeps each skill.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from gguf_helpers import write_bpe_tokenizer
from llm_merge.cli.moe import main
from llm_merge.moe import draws
from llm_merge.toy import make_family

REPO = Path(__file__).resolve().parents[1]
ADDED = [(300, "<s>", True), (301, "</s>", True)]


def weights(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for shard in sorted(directory.glob("model*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def f32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32)


def recipe(tmp_path: Path, body: dict, name: str = "moe.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, allow_unicode=True))
    return path


def build(tmp_path: Path, body: dict, *flags: str, out: str = "out") -> int:
    return main([str(recipe(tmp_path, body)), str(tmp_path / out), "--quiet", *flags])


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """A toy Llama family (base + 3 fine-tunes, bfloat16, vocabulary 302) with a byte-level BPE tokenizer."""
    root = tmp_path_factory.mktemp("moe_family")
    make_family(root, n_models=3, vocab=302)
    for member in ("base", "ft1", "ft2", "ft3"):
        write_bpe_tokenizer(root / member, ADDED)
    return root


def experts(family: Path, *names: str, **fields) -> list[dict]:
    return [{"source_model": str(family / name), **fields} for name in names]


# -- layouts and bytes -------------------------------------------------------------------------------------


def test_mixtral_layout_bytes_and_router_draws(family, tmp_path):
    body = {"base_model": str(family / "base"), "gate_mode": "random", "experts": experts(family, "ft1", "ft2", "ft3")}
    assert build(tmp_path, body, "--seed", "7") == 0
    out, base = weights(tmp_path / "out"), weights(family / "base")
    sources = [weights(family / name) for name in ("ft1", "ft2", "ft3")]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 2 and config["intermediate_size"] == 172
    for name, value in base.items():
        if ".mlp." not in name:
            assert out[name].tobytes() == value.tobytes(), name
    for layer in range(2):
        for e, source in enumerate(sources):
            for projection, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                got = out[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]
                assert got.tobytes() == source[f"model.layers.{layer}.mlp.{projection}.weight"].tobytes()
        router = f"model.layers.{layer}.block_sparse_moe.gate.weight"
        expected = draws.normal(draws.stream_key(7, router), 0, 3 * 64).reshape(3, 64)
        np.testing.assert_array_equal(f32(out[router]), f32(expected.astype(out[router].dtype)))
    assert not any(".mlp." in name for name in out)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "moe_config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    record = json.loads((tmp_path / "out" / "moe_config.json").read_text())
    assert record["architecture"] == "MixtralForCausalLM" and record["seed"] == 7


def test_n_process_and_shards_change_no_bytes(family, tmp_path):
    body = {"base_model": str(family / "base"), "gate_mode": "uniform_random",
            "experts": experts(family, "ft1", "ft2", noise_scale=0.001)}
    assert build(tmp_path, body, out="one") == 0
    assert build(tmp_path, body, "--n_process", "2", "--max_shard_size", "40KB", out="two") == 0
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys() and all(one[k].tobytes() == two[k].tobytes() for k in one)
    assert len(list((tmp_path / "two").glob("model-*.safetensors"))) > 1
    bound = 1 / math.sqrt(64)
    assert all(np.abs(f32(v)).max() <= bound for k, v in one.items() if k.endswith("gate.weight"))
    assert build(tmp_path, body, "--seed", "1", out="seed1") == 0
    other = weights(tmp_path / "seed1")
    assert other["model.layers.0.block_sparse_moe.gate.weight"].tobytes() != one["model.layers.0.block_sparse_moe.gate.weight"].tobytes()


def test_noise_and_residual_scale_in_float32(family, tmp_path):
    body = {"base_model": str(family / "base"), "gate_mode": "random", "dtype": "float32",
            "experts": [{"source_model": str(family / "ft1"), "noise_scale": 0.01, "residual_scale": 0.5},
                        {"source_model": str(family / "ft2")}]}
    assert build(tmp_path, body, "--seed", "3") == 0
    out, ft1, ft2 = weights(tmp_path / "out"), weights(family / "ft1"), weights(family / "ft2")
    assert all(v.dtype == np.float32 for v in out.values())
    for projection, w, scale in (("gate_proj", "w1", 1.0), ("down_proj", "w2", 0.5)):
        name = f"model.layers.1.block_sparse_moe.experts.0.{w}.weight"
        source = f32(ft1[f"model.layers.1.mlp.{projection}.weight"])
        noise = draws.normal(draws.stream_key(3, name, 0), 0, source.size).reshape(source.shape) * np.float32(0.01)
        np.testing.assert_array_equal(out[name], (source + noise) * np.float32(scale))
        assert abs(float(noise.std()) - 0.01) < 1e-3
    untouched = out["model.layers.1.block_sparse_moe.experts.1.w2.weight"]
    np.testing.assert_array_equal(untouched, f32(ft2["model.layers.1.mlp.down_proj.weight"]))


def test_qwen_moe_shared_experts_side_by_side(family, tmp_path):
    body = {"base_model": str(family / "base"), "gate_mode": "random", "architecture": "qwen",
            "experts": experts(family, "ft1", "ft2"),
            "shared_experts": [{"source_model": str(family / "ft3"), "residual_scale": 0.5}, {"source_model": str(family / "base")}]}
    assert build(tmp_path, body) == 0
    out, base, ft3 = weights(tmp_path / "out"), weights(family / "base"), weights(family / "ft3")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["shared_expert_intermediate_size"] == 2 * 172
    assert config["moe_intermediate_size"] == 172 and config["num_experts"] == 2 and config["norm_topk_prob"] is True
    prefix = "model.layers.0.mlp"
    gate = out[f"{prefix}.shared_expert.gate_proj.weight"]
    np.testing.assert_array_equal(f32(gate), np.concatenate([f32(ft3[f"{prefix}.gate_proj.weight"]), f32(base[f"{prefix}.gate_proj.weight"])]))
    down = out[f"{prefix}.shared_expert.down_proj.weight"]
    expected = np.concatenate([f32((f32(ft3[f"{prefix}.down_proj.weight"]) * 0.5).astype(down.dtype)),
                               f32(base[f"{prefix}.down_proj.weight"])], axis=1)
    np.testing.assert_array_equal(f32(down), expected)
    assert out[f"{prefix}.shared_expert_gate.weight"].shape == (1, 64) and out[f"{prefix}.gate.weight"].shape == (2, 64)
    assert out["model.layers.0.mlp.experts.1.up_proj.weight"].tobytes() == weights(family / "ft2")[f"{prefix}.up_proj.weight"].tobytes()
    for projection, rows in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
        bias = out[f"model.layers.1.self_attn.{projection}.bias"]
        assert bias.shape == (rows,) and not f32(bias).any()


def test_cheap_embed_rows_are_normalized_prompt_embeddings(family, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    body = {"base_model": str(family / "base"), "gate_mode": "cheap_embed", "dtype": "float32",
            "experts": [{"source_model": str(family / "ft1"), "positive_prompts": ["the cat", "in the"]},
                        {"source_model": str(family / "ft2"), "positive_prompts": ["1234"], "negative_prompts": ["the cat"]}]}
    assert build(tmp_path, body) == 0
    tokenizer = tokenizers.Tokenizer.from_file(str(family / "base" / "tokenizer.json"))
    embed = f32(weights(family / "base")["model.embed_tokens.weight"])

    def vector(prompts):
        total = sum(embed[tokenizer.encode("<s>" + p, add_special_tokens=False).ids].sum(axis=0) for p in prompts)
        return total / np.linalg.norm(total)

    first = vector(["the cat", "in the"])
    second = vector(["1234"]) - vector(["the cat"])
    expected = np.stack([first, second / np.linalg.norm(second)])
    out = weights(tmp_path / "out")
    for layer in range(2):
        np.testing.assert_allclose(out[f"model.layers.{layer}.block_sparse_moe.gate.weight"], expected, atol=1e-6)


# -- refusals, before any work -----------------------------------------------------------------------------


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """(exit code, last stderr line) of ``llm-merge-moe ARGS`` in this process."""
    capsys.readouterr()
    code = main([*args])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def refused(capsys, tmp_path: Path, body: dict, code: int, needle: str) -> None:
    got, last = run_cli(capsys, str(recipe(tmp_path, body)), str(tmp_path / "refused"))
    assert got == code, last
    assert last.startswith("llm_merge: error: ") and needle in last, last
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("change, code, needle", [
    ({"merge_method": "linear"}, 2, "unknown key(s) merge_method"),
    ({"experts": [{"source_model": "ft1", "weight": 1}]}, 2, "recipe: experts[0]: unknown key(s) weight"),
    ({"gate_mode": "hidden"}, 2, "positive_prompts: required with gate_mode hidden"),
    ({"gate_mode": "cheap"}, 2, "gate_mode: got a string 'cheap', expected one of hidden, cheap_embed"),
    ({"experts_per_token": 3}, 2, "experts_per_token: 3 but only 2 expert(s)"),
    ({"experts_per_token": True}, 2, "experts_per_token: got a boolean true"),
    ({"dtype": "int8"}, 2, "dtype: got a string 'int8'"),
    ({"experts": [{"source_model": "ft1", "noise_scale": "0.1"}, {"source_model": "ft2"}]}, 2, "noise_scale: got a string '0.1'"),
    ({"experts": [{"source_model": "ft1", "positive_prompts": "math"}, {"source_model": "ft2"}]}, 2, "expected a list of strings"),
    ({"shared_experts": [{"source_model": "ft3"}], "architecture": "Mixtral"}, 2, "Mixtral: has no shared experts (1 given)"),
    ({"architecture": "qwen3"}, 2, "Qwen3 MoE: is built from qwen3 models, the base is llama"),
    ({"architecture": "qwen"}, 2, "Qwen MoE: needs shared_experts"),
    ({"architecture": "deepseek"}, 2, "DeepSeek MoE output needs the model's remote code"),
    ({"experts": [{"source_model": "ft1", "positive_prompts": ["a"]}, {"source_model": "ft2", "positive_prompts": ["a"]}],
      "gate_mode": "cheap_embed"}, 2, "every expert has the same positive and negative prompts"),
    ({"experts": [{"source_model": "ft1+adapter"}, {"source_model": "ft2"}]}, 2, "model+LoRA references"),
])
def test_recipe_refusals(family, tmp_path, capsys, change, code, needle):
    body = {"base_model": "base", "gate_mode": "random", "experts": [{"source_model": "ft1"}, {"source_model": "ft2"}], **change}
    path = family / f"refusal-{abs(hash(needle))}.yml"  # beside the family: relative model paths resolve there
    path.write_text(yaml.safe_dump(body))
    got, last = run_cli(capsys, str(path), str(tmp_path / "refused"))
    assert got == code, last
    assert last.startswith("llm_merge: error: recipe") and needle in last, last
    assert not (tmp_path / "refused").exists()


def test_checkpoint_refusals(family, tmp_path, capsys):
    make_family(tmp_path / "wide", n_models=1, vocab=310)
    make_family(tmp_path / "fat", n_models=1, vocab=302, intermediate=180)
    body = {"base_model": str(family / "base"), "gate_mode": "random"}
    refused(capsys, tmp_path, {**body, "experts": experts(family, "ft1") + [{"source_model": str(tmp_path / "wide" / "ft1")}]},
            1, "its vocabulary differs from the base's (model.embed_tokens.weight [310, 64], base [302, 64]); give it the base's "
            "vocabulary first: llm-merge --merge_method linear --base_model_path BASE --model_path_list EXPERT --tokenizer_source base")
    refused(capsys, tmp_path, {**body, "experts": experts(family, "ft1") + [{"source_model": str(tmp_path / "fat" / "ft1")}]},
            1, "shapes differ from the base's: ")
    other = tmp_path / "otherbpe"
    make_family(other, n_models=1, vocab=302)
    write_bpe_tokenizer(other / "ft1", [(300, "<bos>", True), (301, "</s>", True)])
    refused(capsys, tmp_path, {**body, "experts": experts(family, "ft1") + [{"source_model": str(other / "ft1")}]},
            1, "its tokenizer differs from the base's (token id 300 is '<bos>', in the base '<s>')")
    config = json.loads((family / "base" / "config.json").read_text())
    gpt2 = tmp_path / "gpt2"
    make_family(gpt2, n_models=1, vocab=302)
    (gpt2 / "base" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    refused(capsys, tmp_path, {**body, "base_model": str(gpt2 / "base"), "experts": experts(gpt2, "ft1", "ft1")},
            2, "is a 'gpt2' model, which has no MoE form here")


def test_prompt_modes_need_a_tokenizer_and_their_packages(family, tmp_path, capsys, monkeypatch):
    bare = tmp_path / "bare"
    make_family(bare, n_models=1, vocab=302)  # no tokenizer.json
    prompts = [{"source_model": str(bare / "ft1"), "positive_prompts": ["a"]}, {"source_model": str(bare / "ft1"), "positive_prompts": ["b"]}]
    refused(capsys, tmp_path, {"base_model": str(bare / "base"), "gate_mode": "cheap_embed", "experts": prompts}, 2,
            "gate_mode cheap_embed: the base model " + str(bare / "base") + " has no tokenizer.json")
    body = {"base_model": str(family / "base"), "gate_mode": "hidden",
            "experts": [{"source_model": str(family / "ft1"), "positive_prompts": ["a"]}, {"source_model": str(family / "ft2"), "positive_prompts": ["b"]}]}
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
    refused(capsys, tmp_path, body, 2, "gate_mode hidden runs the base model: pip install 'llm_merge[moe]'")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    refused(capsys, tmp_path, {**body, "gate_mode": "cheap_embed"}, 2, "gate_mode cheap_embed needs the tokenizers package")


def test_output_apart_and_existing_output(family, tmp_path, capsys):
    body = {"base_model": str(family / "base"), "gate_mode": "random", "experts": experts(family, "ft1", "ft2")}
    code, last = run_cli(capsys, str(recipe(tmp_path, body)), str(family / "ft1"), "--overwrite")
    assert code == 2 and "--output_path" in last and "expert" in last, last
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    code, last = run_cli(capsys, str(tmp_path / "moe.yml"), str(tmp_path / "busy"))
    assert code == 1 and "pass --overwrite" in last and (tmp_path / "busy" / "keep.txt").read_text() == "x"
    code, last = run_cli(capsys, str(tmp_path / "moe.yml"), str(tmp_path / "o"), "--n_process", "0")
    assert code == 2 and "--n_process: 0 must be an integer >= 1" in last


def test_tool_entry_point(family, tmp_path):
    """tools/mergekit_moe.py: the same command in a process of its own."""
    body = {"base_model": str(family / "base"), "gate_mode": "random", "experts": experts(family, "ft1", "ft2")}
    result = subprocess.run([sys.executable, str(REPO / "tools" / "mergekit_moe.py"), str(recipe(tmp_path, body)),
                             str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    result = subprocess.run([sys.executable, str(REPO / "tools" / "mergekit_moe.py"), str(tmp_path / "moe.yml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith("llm_merge: error: ") and len(result.stderr.splitlines()) == 1


# -- in transformers ---------------------------------------------------------------------------------------

SIZES = dict(vocab_size=302, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=300, eos_token_id=301, tie_word_embeddings=False)
TARGET_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}


@pytest.fixture(scope="module")
def hf():
    """(torch, transformers) with one torch thread (tiny models: threads only contend), or the test is skipped."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch, transformers
    torch.set_num_threads(threads)


def dense_model(hf, kind: str, directory: Path, seed: int, base: Path | None = None) -> Path:
    """A random dense model of ``kind`` (llama, qwen2, qwen3) with the test tokenizer, or ``base`` plus a small
    random change of every weight; float32."""
    torch, transformers = hf
    torch.manual_seed(seed)
    if base is None:
        config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[kind]
        model = transformers.AutoModelForCausalLM.from_config(config_class(**SIZES, initializer_range=0.2, head_dim=16))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * parameter.std() * torch.randn(parameter.shape))
    model.save_pretrained(directory)
    write_bpe_tokenizer(directory, ADDED)
    return directory


def load(hf, directory: Path):
    torch, transformers = hf
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    return model.eval()


PROMPT_IDS = [[300, 5, 17, 29, 40, 41], [300, 200, 13, 99], [300, 1, 2, 3, 4, 5, 6, 7, 8, 9]]


@pytest.mark.parametrize("kind, architecture", [("llama", "mixtral"), ("llama", "qwen"), ("qwen2", "qwen"), ("qwen3", "qwen3")])
def test_identical_experts_give_the_dense_logits(hf, tmp_path, kind, architecture):
    """Experts all the same fine-tune: the MoE computes the base's attention with the fine-tune's MLPs, exactly."""
    torch, _ = hf
    base = dense_model(hf, kind, tmp_path / "base", 0)
    tuned = dense_model(hf, kind, tmp_path / "ft", 1, base=base)
    body = {"base_model": str(base), "gate_mode": "random", "architecture": architecture, "experts_per_token": 2,
            "experts": [{"source_model": str(tuned)}] * 3}
    if architecture == "qwen":
        body["shared_experts"] = [{"source_model": str(base), "residual_scale": 0.0}]
    assert build(tmp_path, body) == 0
    moe = load(hf, tmp_path / "out")
    assert type(moe).__name__ == TARGET_CLASSES[architecture]
    dense = load(hf, base)
    dense.load_state_dict({k: v for k, v in load(hf, tuned).state_dict().items() if ".mlp." in k}, strict=False)
    with torch.no_grad():
        for ids in PROMPT_IDS:
            expected = dense(input_ids=torch.tensor([ids])).logits
            got = moe(input_ids=torch.tensor([ids])).logits
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_layer_by_layer_hidden_states_equal_transformers(hf, tmp_path, kind):
    torch, _ = hf
    from llm_merge.io.checkpoint import open_checkpoint
    from llm_merge.moe.hidden import prompt_hidden_states

    base = dense_model(hf, kind, tmp_path / "base", 0)
    config = json.loads((base / "config.json").read_text())
    model = load(hf, base)
    for last in (True, False):
        found = prompt_hidden_states(open_checkpoint(base, "model"), config, PROMPT_IDS, 2, last_token=last)
        with torch.no_grad():
            for index, ids in enumerate(PROMPT_IDS):
                states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[:-1]
                expected = np.stack([(s[0, -1] if last else s[0].mean(dim=0)).numpy() for s in states])
                np.testing.assert_allclose(found[index], expected, rtol=1e-5, atol=1e-5)


# -- two skills, two experts -------------------------------------------------------------------------------

#: Each skill's tokens (36 each, disjoint; prompts made of them tokenize to them alone) and its rule: the token
#: after token number k is number (k * multiplier + offset) mod 36.
SKILLS = {"A": (list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"), 7, 3), "B": ([0xC3, *range(0x80, 0xA3)], 11, 5)}
SKILL_PROMPTS = {"A": ["7K2Q9ZB4", "HELLO42", "X0Y1Z2", "QWERTY9", "ABC123"],
                 "B": ["àáâãäå", "ÀÁÂÃÄÅ", "ÆÇÈÉÊ", "ËÌÍÎÏÐ", "ÑÒÓÔÕÖ"]}  # UTF-8: 0xC3 and 0x80 .. 0xA2


def skill_batch(torch, skill: str, generator, kind: str = "skill", count: int = 16, length: int = 12):
    """Token sequences of a skill: ``skill`` follows its rule, ``count`` counts up (k + 1), ``text`` is its tokens
    at random."""
    tokens, multiplier, offset = SKILLS[skill]
    if kind == "text":
        return torch.tensor(tokens)[torch.randint(0, len(tokens), (count, length), generator=generator)]
    if kind == "count":
        multiplier, offset = 1, 1
    steps = [torch.randint(0, len(tokens), (count, 1), generator=generator)]
    for _ in range(length - 1):
        steps.append((steps[-1] * multiplier + offset) % len(tokens))
    return torch.tensor(tokens)[torch.cat(steps, dim=1)]


def train(torch, model, batches, steps: int, parameters) -> None:
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    for _ in range(steps):
        ids = batches()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def skills(hf, tmp_path_factory) -> Path:
    """A small Llama trained on both skills' text (tokens at random, and counting), then two fine-tunes of its MLPs
    alone, one per skill (attention, norms and embeddings stay the base's: what an MoE of them keeps)."""
    torch, transformers = hf
    root = tmp_path_factory.mktemp("moe_skills")
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES))
    with torch.no_grad():  # a direction that tells the two alphabets apart, as real models have one per language
        base.model.embed_tokens.weight[SKILLS["A"][0], :4] += 1.0
        base.model.embed_tokens.weight[SKILLS["B"][0], :4] -= 1.0
    base.model.embed_tokens.weight.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:, :4]), grad[:, 4:]], dim=1))
    train(torch, base, lambda: torch.cat([skill_batch(torch, s, generator, kind, count=8) for s in "AB" for kind in ("text", "count")]),
          60, base.parameters())
    base.save_pretrained(root / "base")
    write_bpe_tokenizer(root / "base", ADDED)
    for skill in "AB":
        tuned = transformers.LlamaForCausalLM.from_pretrained(root / "base")
        train(torch, tuned, lambda: skill_batch(torch, skill, generator, count=32), 60,
              [p for name, p in tuned.named_parameters() if ".mlp." in name])
        tuned.save_pretrained(root / f"ft{skill}")
        write_bpe_tokenizer(root / f"ft{skill}", ADDED)
    return root


def test_hidden_gates_route_each_skill_to_its_expert(hf, skills, tmp_path):
    torch, transformers = hf
    body = {"base_model": str(skills / "base"), "gate_mode": "hidden", "dtype": "float32",
            "experts": [{"source_model": str(skills / f"ft{s}"), "positive_prompts": SKILL_PROMPTS[s]} for s in "AB"]}
    assert build(tmp_path, body) == 0
    moe = load(hf, tmp_path / "out")
    assert type(moe).__name__ == "MixtralForCausalLM"
    for expert, skill in enumerate("AB"):
        ids = skill_batch(torch, skill, torch.Generator().manual_seed(99), count=64)
        with torch.no_grad():
            found = moe(input_ids=ids, output_router_logits=True)
            dense = transformers.LlamaForCausalLM.from_pretrained(skills / f"ft{skill}").eval()(input_ids=ids).logits
            base = transformers.LlamaForCausalLM.from_pretrained(skills / "base").eval()(input_ids=ids).logits

        def accuracy(logits):
            return (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item()

        routed = np.mean([(layer.argmax(-1) == expert).float().mean().item() for layer in found.router_logits])
        assert routed >= 0.8, (skill, routed)  # top-1 choice over every token and layer
        assert accuracy(dense) >= 0.9 and accuracy(base) <= 0.1, (accuracy(dense), accuracy(base))
        assert accuracy(found.logits) >= accuracy(dense) - 0.1, (skill, accuracy(found.logits), accuracy(dense))
        print(f"skill {skill}: top-1 routed to its expert {routed:.3f}; next-token accuracy MoE {accuracy(found.logits):.3f}, "
              f"dense fine-tune {accuracy(dense):.3f}, base {accuracy(base):.3f}")
    tokenizer = pytest.importorskip("tokenizers").Tokenizer.from_file(str(skills / "base" / "tokenizer.json"))
    for expert, skill in enumerate("AB"):  # the positive prompts themselves, as the recipe gives them
        shares = []
        for prompt in SKILL_PROMPTS[skill]:
            ids = torch.tensor([tokenizer.encode("<s>" + prompt, add_special_tokens=False).ids])
            with torch.no_grad():
                shares += [(layer.argmax(-1) == expert).float().mean().item()
                           for layer in moe(input_ids=ids, output_router_logits=True).router_logits]
        assert np.mean(shares) > 0.6, (skill, shares)
