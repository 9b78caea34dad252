"""LoRA extraction (tools/extract_lora.py): low-rank math, round trips through the fold, formats, errors.

Round trips: extract an adapter from a small float32 fine-tune, fold it back with llm-merge-lora
(``llm_merge.cli.lora``), and compare with the fine-tune: each adapted weight must miss by exactly
the relative error the report gives, saved tensors must come back bit for bit, and at full rank
the fine-tune comes back up to float32 rounding. The PEFT test loads the adapter with PEFT on the
base model (skipped when torch, transformers or peft are absent).
"""

import contextlib
import io
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from checkpoints import read_checkpoint, write_checkpoint
from llm_merge.cli import extract_lora as extract_cli
from llm_merge.cli import lora as fold_cli
from llm_merge.lora import lowrank
from llm_merge.lora.extract_options import RankRule
from llm_merge.lora.extract_layout import target_modules
from llm_merge.toy import make_family


def run(main, *args):
    """(exit code, stdout, stderr) of an in-process CLI ``main``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def extract(base, tuned, output, *flags):
    code, out, err = run(extract_cli.main, "--base_model_path", base, "--model_path", tuned, "--output_path", output, *flags)
    assert code == 0, err
    return json.loads((output / "extract_report.json").read_text()), out


def fold(base, adapter, output):
    code, _, err = run(fold_cli.main, "--model_name_or_path", base, "--lora_path", adapter, "--output_path", output, "--quiet")
    assert code == 0, err
    return read_checkpoint(output)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A float32 toy Llama (hidden 64, 2 layers, vocab 256) and one fine-tune of it."""
    root = tmp_path_factory.mktemp("family")
    made = make_family(root, n_models=1, dtype="float32", seed=3, delta_scale=0.05)
    return root / "base", root / "ft1", read_checkpoint(made["base"]), read_checkpoint(made["fine_tunes"][0])


def relative_miss(folded, tuned, base, name):
    delta = tuned[name].astype(np.float64) - base[name]
    return np.linalg.norm(folded[name].astype(np.float64) - tuned[name]) / np.linalg.norm(delta)


# -- the math --------------------------------------------------------------------------


def test_randomized_svd_is_seeded_and_near_the_exact_one():
    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((300, 6)) @ rng.standard_normal((6, 200)) + 0.01 * rng.standard_normal((300, 200))).astype(np.float32)
    u, s, vt = lowrank.randomized_svd(matrix, 6, seed=7)
    again = lowrank.randomized_svd(matrix, 6, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip((u, s, vt), again))
    exact = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[:6]
    np.testing.assert_allclose(s, exact, rtol=1e-4)
    assert u.shape == (300, 6) and vt.shape == (6, 200)
    _, _, _, used_exact = lowrank.truncated_svd(matrix, 6, seed=7)
    assert not used_exact and lowrank.truncated_svd(matrix, 150, seed=7)[3]  # exact near min(m, n)
    wide = lowrank.exact_svd(matrix.T.copy())  # a tall matrix is decomposed as its transpose
    np.testing.assert_allclose((wide[0] * wide[1]) @ wide[2], matrix.T, atol=1e-4)


def test_choose_rank_by_each_rule():
    s = np.array([4.0, 2.0, 1.0, 0.5])  # squares 16, 4, 1, 0.25: total 21.25
    total = float(np.sum(s**2))
    assert lowrank.choose_rank(s, total, rank=3) == 3
    assert lowrank.choose_rank(s, total, rank=9) == 4
    assert lowrank.choose_rank(s, total, energy=16 / total) == 1
    assert lowrank.choose_rank(s, total, energy=0.9) == 2  # 20 / 21.25 = 0.94
    assert lowrank.choose_rank(s, total, energy=1.0) == 4
    assert lowrank.choose_rank(s, total * 2, energy=0.99) == 4  # capped: all it was given
    assert lowrank.choose_rank(s, total, sv_epsilon=0.75) == 3
    assert lowrank.choose_rank(s, total, sv_epsilon=5.0) == 0
    assert lowrank.choose_rank(s, 0.0, rank=3) == 0
    assert RankRule(energy=0.5, max_rank=8).candidates((100, 6)) == 6
    assert RankRule(rank=4).candidates((100, 60)) == 4 and RankRule(energy=0.5).candidates((300, 200)) == 128
    assert lowrank.energy_kept(s, 2, total) == pytest.approx(20 / total)


def test_split_factors_share_the_singular_values():
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((20, 12)).astype(np.float32)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    left, right = lowrank.split_factors(u, s, vt, 12)
    np.testing.assert_allclose(left @ right, matrix, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(left, axis=0), np.linalg.norm(right, axis=1), rtol=1e-5)
    assert lowrank.squared_residual(matrix, left, right) < 1e-9 * lowrank.squared_norm(matrix)


# -- round trips -----------------------------------------------------------------------


def test_fixed_rank_round_trip_misses_by_the_reported_error(family, tmp_path):
    base_dir, tuned_dir, base, tuned = family
    report, table = extract(base_dir, tuned_dir, tmp_path / "adapter", "--rank", "8")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and config["rank_pattern"] == {} and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert "model.norm" in config["modules_to_save"] and "lm_head" in config["modules_to_save"]
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert weights[f"{q}.lora_A.weight"].shape == (8, 64) and weights[f"{q}.lora_B.weight"].shape == (64, 8)
    assert weights[f"{q}.lora_A.weight"].dtype == np.float32
    folded = fold(base_dir, tmp_path / "adapter", tmp_path / "folded")
    rows = {row["tensor"]: row for row in report["modules"]}
    assert {row["status"] for row in rows.values()} == {"lora", "saved"}
    for name, row in rows.items():
        if row["status"] == "saved":
            assert np.array_equal(folded[name], tuned[name]), name
        else:
            assert row["rank"] == 8 and 0 < row["relative_error"] < 1 and 0 < row["energy_kept"] < 1
            assert relative_miss(folded, tuned, base, name) == pytest.approx(row["relative_error"], rel=1e-4), name
            assert row["relative_error"] ** 2 == pytest.approx(1 - row["energy_kept"], rel=0.02)
    assert "model.layers.1.mlp.down_proj" in table and "14 LoRA modules (r=8)" in table
    assert report["summary"]["lora_modules"] == 14 and report["summary"]["saved_tensors"] == 7
    assert report["rank_rule"] == {"rank": 8, "energy": None, "sv_epsilon": None, "max_rank": 128}


def test_full_rank_gives_the_fine_tune_back_up_to_float32_rounding(family, tmp_path):
    base_dir, tuned_dir, base, tuned = family
    report, _ = extract(base_dir, tuned_dir, tmp_path / "adapter", "--rank", "64", "--embed_mode", "lora")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    embed = "base_model.model.model.embed_tokens"
    assert weights[f"{embed}.lora_embedding_A"].shape == (64, 256) and weights[f"{embed}.lora_embedding_B"].shape == (64, 64)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "embed_tokens" in config["target_modules"] and "lm_head" in config["target_modules"]
    assert config["modules_to_save"] == [f"model.layers.{i}.{n}_layernorm" for i in (0, 1) for n in ("input", "post_attention")] + ["model.norm"]
    # k_proj and v_proj are 32 x 64: their full rank is 32, which rank_pattern and alpha_pattern record
    assert config["rank_pattern"] == config["alpha_pattern"] == {
        rf"model\.layers\.{i}\.self_attn\.{p}_proj": 32 for i in (0, 1) for p in "kv"}
    folded = fold(base_dir, tmp_path / "adapter", tmp_path / "folded")
    for row in report["modules"]:
        name = row["tensor"]
        if row["status"] in ("lora", "lora_embedding"):
            assert row["svd"] == "exact" and row["relative_error"] < 1e-5 and row["energy_kept"] == pytest.approx(1)
            assert relative_miss(folded, tuned, base, name) < 1e-5
            np.testing.assert_allclose(folded[name], tuned[name], rtol=0, atol=1e-6 * np.abs(tuned[name]).max())


def test_paddle_format_pads_adaptive_ranks_to_one_r(family, tmp_path):
    base_dir, tuned_dir, base, tuned = family
    report, _ = extract(base_dir, tuned_dir, tmp_path / "adapter", "--energy", "0.9", "--format", "paddle",
                        "--output_dtype", "bfloat16")
    config = json.loads((tmp_path / "adapter" / "lora_config.json").read_text())
    ranks = {row["module"]: row["rank"] for row in report["modules"] if row["status"] == "lora"}
    assert len(set(ranks.values())) > 1 and config["r"] == config["lora_alpha"] == max(ranks.values()) == report["r"]
    weights = load_file(tmp_path / "adapter" / "lora_model_state.safetensors")
    smallest = min(ranks, key=ranks.get)
    a, b = weights[f"{smallest}.lora_A"].astype(np.float32), weights[f"{smallest}.lora_B"].astype(np.float32)
    assert a.shape[1] == b.shape[0] == config["r"]
    assert not a[:, ranks[smallest]:].any() and not b[ranks[smallest]:].any()  # zero padding
    assert config["target_modules"][0] == r"model\.layers\.0\.mlp\.down_proj" and r"model\.norm\.weight" in config["trainable_modules"]
    folded = fold(base_dir, tmp_path / "adapter", tmp_path / "folded")
    for row in report["modules"]:
        if row["status"] == "lora":
            assert row["energy_kept"] >= 0.9
            assert relative_miss(folded, tuned, base, row["tensor"]) == pytest.approx(row["relative_error"], rel=1e-3)


def test_sv_epsilon_and_max_rank(family, tmp_path):
    base_dir, tuned_dir, _, _ = family
    report, _ = extract(base_dir, tuned_dir, tmp_path / "capped", "--energy", "0.999", "--max_rank", "5")
    assert {row["rank"] for row in report["modules"] if row["status"] == "lora"} == {5}
    largest = sorted(row["max_singular_value"] for row in report["modules"] if row["status"] == "lora")
    threshold = (largest[3] + largest[4]) / 2  # above every singular value of the 4 weakest modules
    singular = extract(base_dir, tuned_dir, tmp_path / "eps", "--sv_epsilon", str(threshold))[0]
    statuses = {row["module"]: row["status"] for row in singular["modules"]}
    assert list(statuses.values()).count("below_sv_epsilon") == 4 and "lora" in statuses.values()
    for row in singular["modules"]:
        if row["status"] == "lora":
            assert row["max_singular_value"] > threshold and row["rank"] >= 1
    factored = [row for row in singular["modules"] if row["status"] in ("lora", "below_sv_epsilon")]
    overall = sum((row["relative_error"] * row["delta_norm"]) ** 2 for row in factored) / sum(row["delta_norm"] ** 2 for row in factored)
    assert singular["summary"]["relative_error"] == pytest.approx(overall ** 0.5)  # modules left out miss all of it
    assert singular["summary"]["below_sv_epsilon"] == [m for m, s in statuses.items() if s == "below_sv_epsilon"]


def test_include_exclude_and_worker_count_leave_the_bytes_alone(family, tmp_path):
    base_dir, tuned_dir, _, _ = family
    one, _ = extract(base_dir, tuned_dir, tmp_path / "one", "--rank", "4", "--exclude", r"\.mlp\.", "lm_head")
    two, _ = extract(base_dir, tuned_dir, tmp_path / "two", "--rank", "4", "--exclude", r"\.mlp\.", "lm_head", "--n_process", "2")
    assert (tmp_path / "one" / "adapter_model.safetensors").read_bytes() == (tmp_path / "two" / "adapter_model.safetensors").read_bytes()
    excluded = one["summary"]["excluded_changed_tensors"]
    assert "lm_head.weight" in excluded and "model.layers.0.mlp.up_proj.weight" in excluded
    config = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"] and "lm_head" not in config["modules_to_save"]
    only, _ = extract(base_dir, tuned_dir, tmp_path / "only", "--rank", "4", "--include", r"layers\.1\.self_attn\.q_proj")
    assert json.loads((tmp_path / "only" / "adapter_config.json").read_text())["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    assert only["summary"]["saved_tensors"] == 0


def biased_pair(tmp_path, dtype=np.float32):
    """A base with biases and a fine-tune that changes: q_proj (weight, bias), k_proj (bias only), the norm."""
    rng = np.random.default_rng(5)
    base = {"model.embed_tokens.weight": rng.normal(size=(32, 16))}
    for proj in "qkv":
        base[f"model.layers.0.self_attn.{proj}_proj.weight"] = rng.normal(size=(16, 16))
        base[f"model.layers.0.self_attn.{proj}_proj.bias"] = rng.normal(size=(16,))
    base["model.norm.weight"] = 1 + 0.1 * rng.normal(size=(16,))
    base = {k: v.astype(dtype) for k, v in base.items()}
    base["model.position_ids"] = np.arange(8, dtype=np.int64)
    tuned = dict(base)
    tuned["model.layers.0.self_attn.q_proj.weight"] = (base["model.layers.0.self_attn.q_proj.weight"]
                                                        + np.outer(rng.normal(size=16), rng.normal(size=16)).astype(dtype))
    for name in ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias", "model.norm.weight"):
        tuned[name] = base[name] + dtype(0.5)
    return write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "tuned", tuned), tuned


def test_biases_and_norms_are_saved_where_peft_and_the_fold_find_them(tmp_path):
    base_dir, tuned_dir, tuned = biased_pair(tmp_path)
    report, _ = extract(base_dir, tuned_dir, tmp_path / "adapter", "--rank", "2")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj"] and config["bias"] == "lora_only"
    assert config["modules_to_save"] == ["model.layers.0.self_attn.k_proj", "model.norm"]
    assert set(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias",  # PEFT's name for an adapted layer's bias
        "base_model.model.model.layers.0.self_attn.k_proj.bias",
        "base_model.model.model.norm.weight",
    }
    statuses = {row["tensor"]: row["status"] for row in report["modules"]}
    assert statuses["model.layers.0.self_attn.v_proj.weight"] == "unchanged" and statuses["model.position_ids"] == "unchanged"
    folded = fold(base_dir, tmp_path / "adapter", tmp_path / "folded")
    for name, value in tuned.items():  # rank-1 change at rank 2: everything comes back
        np.testing.assert_allclose(folded[name], value, atol=1e-5, err_msg=name)
    paddle, _ = extract(base_dir, tuned_dir, tmp_path / "paddle", "--rank", "2", "--format", "paddle")
    paddle_config = json.loads((tmp_path / "paddle" / "lora_config.json").read_text())
    assert paddle_config["trainable_bias"] == "lora"
    assert paddle_config["trainable_modules"] == [r"model\.layers\.0\.self_attn\.k_proj\.bias", r"model\.norm\.weight"]
    folded = fold(base_dir, tmp_path / "paddle", tmp_path / "folded_paddle")
    for name, value in tuned.items():
        np.testing.assert_allclose(folded[name], value, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("embed_mode", ["save", "lora"])
def test_a_tied_head_follows_the_embedding(tmp_path, embed_mode):
    rng = np.random.default_rng(2)
    base = {"model.embed_tokens.weight": rng.normal(size=(24, 8)).astype(np.float32),
            "model.layers.0.mlp.up_proj.weight": rng.normal(size=(12, 8)).astype(np.float32)}
    tuned = {name: value + 0.1 * rng.normal(size=value.shape).astype(np.float32) for name, value in base.items()}
    for name, tensors in (("base", base), ("tuned", tuned)):
        write_checkpoint(tmp_path / name, tensors)
        (tmp_path / name / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}))
    extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "adapter", "--rank", "8", "--embed_mode", embed_mode)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert config["ensure_weight_tying"] is True  # PEFT then ties the head's copy to the embedding's
    if embed_mode == "save":
        assert np.array_equal(weights["base_model.model.lm_head.weight"], weights["base_model.model.model.embed_tokens.weight"])
    else:
        embed, head = "base_model.model.model.embed_tokens.lora_embedding_", "base_model.model.lm_head.lora_"
        assert np.array_equal(weights[f"{head}A.weight"], weights[f"{embed}B"].T)
        assert np.array_equal(weights[f"{head}B.weight"], weights[f"{embed}A"].T)
    folded = fold(tmp_path / "base", tmp_path / "adapter", tmp_path / "folded")
    assert set(folded) == set(tuned)  # still tied: no lm_head.weight
    for name, value in tuned.items():
        np.testing.assert_allclose(folded[name], value, atol=1e-5, err_msg=name)


def test_target_modules_use_bare_names_only_where_they_match_exactly_the_adapted_modules():
    tensors = ["a.0.q.weight", "a.1.q.weight", "a.0.k.weight", "a.1.k.weight", "head.q.weight"]
    assert target_modules({"a.0.q", "a.1.q", "head.q", "a.0.k"}, tensors) == ["a.0.k", "q"]
    assert target_modules({"a.0.q", "a.1.q"}, tensors) == ["a.0.q", "a.1.q"]


def test_bfloat16_models_and_factors(tmp_path):
    make_family(tmp_path / "fam", n_models=1, dtype="bfloat16", hidden=32, intermediate=64, vocab=64, seed=1)
    report, _ = extract(tmp_path / "fam" / "base", tmp_path / "fam" / "ft1", tmp_path / "adapter", "--rank", "4",
                        "--output_dtype", "bfloat16")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {str(v.dtype) for k, v in weights.items() if ".lora_" in k} == {"bfloat16"}
    assert {str(v.dtype) for k, v in weights.items() if ".lora_" not in k} == {"bfloat16"}  # saved whole as they are
    assert all(0 < row["relative_error"] < 1 for row in report["modules"] if row["status"] == "lora")


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("flags, code, message", [
    ([], 2, "--rank, --energy or --sv_epsilon: give one"),
    (["--rank", "4", "--energy", "0.5"], 2, "--rank and --energy: give only one"),
    (["--rank", "0"], 2, "--rank: 0 must be an integer >= 1"),
    (["--energy", "1.5"], 2, "--energy: 1.5 must be a fraction in (0, 1]"),
    (["--sv_epsilon", "-1"], 2, "--sv_epsilon: -1.0 must be a finite number >= 0"),
    (["--rank", "4", "--max_rank", "8"], 2, "--max_rank: caps --energy and --sv_epsilon only"),
    (["--rank", "4", "--include", "("], 2, "--include: '(' is not a valid regular expression"),
    (["--rank", "4", "--format", "paddle", "--embed_mode", "lora"], 2, "PaddleNLP has no LoRA layer for embeddings"),
    (["--rank", "4", "--format", "gguf"], 2, "argument --format: invalid choice"),
    (["--rank", "4", "--exclude", "weight$"], 1, "no LoRA module to extract"),
])
def test_flag_errors(family, tmp_path, flags, code, message):
    base_dir, tuned_dir, _, _ = family
    status, _, err = run(extract_cli.main, "--base_model_path", base_dir, "--model_path", tuned_dir,
                         "--output_path", tmp_path / "out", *flags)
    lines = err.strip().splitlines()
    assert status == code and message in lines[-1] and lines[-1].startswith("llm_merge: error: "), err
    assert not (tmp_path / "out").exists()


def test_inputs_that_do_not_pair_up(family, tmp_path):
    base_dir, tuned_dir, _, _ = family
    cases = {
        "same": (base_dir, 2, "is the base model itself"),
        "inside": (tuned_dir, 2, "--output_path"),
    }
    for label, (model, code, message) in cases.items():
        output = tuned_dir / "adapter" if label == "inside" else tmp_path / label
        status, _, err = run(extract_cli.main, "--base_model_path", base_dir, "--model_path", model,
                             "--output_path", output, "--rank", "4")
        assert status == code and message in err, (label, err)
    rng = np.random.default_rng(0)
    small = {"model.embed_tokens.weight": rng.normal(size=(8, 4)).astype(np.float32),
             "model.layers.0.mlp.up_proj.weight": rng.normal(size=(6, 4)).astype(np.float32)}
    big = dict(small, **{"model.embed_tokens.weight": rng.normal(size=(10, 4)).astype(np.float32)})
    write_checkpoint(tmp_path / "small", small), write_checkpoint(tmp_path / "big", big)
    status, _, err = run(extract_cli.main, "--base_model_path", tmp_path / "small", "--model_path", tmp_path / "big",
                         "--output_path", tmp_path / "o", "--rank", "2")
    assert status == 1 and "vocabularies differ" in err and "--tokenizer_source" in err and "[10, 4] in the fine-tune" in err
    write_checkpoint(tmp_path / "fewer", {"model.embed_tokens.weight": small["model.embed_tokens.weight"]})
    status, _, err = run(extract_cli.main, "--base_model_path", tmp_path / "small", "--model_path", tmp_path / "fewer",
                         "--output_path", tmp_path / "o", "--rank", "2")
    assert status == 1 and "only in the base: model.layers.0.mlp.up_proj.weight" in err


def test_an_existing_output_is_kept_without_overwrite(family, tmp_path):
    base_dir, tuned_dir, _, _ = family
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    status, _, err = run(extract_cli.main, "--base_model_path", base_dir, "--model_path", tuned_dir,
                         "--output_path", tmp_path / "out", "--rank", "2")
    assert status == 1 and "--overwrite" in err and [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    extract(base_dir, tuned_dir, tmp_path / "out", "--rank", "2", "--overwrite", "--quiet")
    assert (tmp_path / "out" / "adapter_model.safetensors").exists() and not (tmp_path / "out" / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if ".llm_merge-tmp-" in p.name]  # no staging left behind


# -- PEFT ------------------------------------------------------------------------------


@pytest.mark.parametrize("tied, embed_mode", [(False, "save"), (True, "save"), (True, "lora")])
def test_peft_loads_the_adapter_on_its_base(tmp_path, tied, embed_mode):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, attention_bias=True, tie_word_embeddings=tied)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    tuned = transformers.LlamaForCausalLM(config).eval()
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():  # a fine-tune: low-rank changes of the projections and embeddings, new biases and norms
        for name, param in tuned.named_parameters():
            if name.endswith(("proj.weight", "embed_tokens.weight")):
                param += 0.05 * torch.randn(param.shape[0], 3) @ torch.randn(3, param.shape[1])
            elif name.endswith(("bias", "norm.weight")) and "layers.1" in name:
                param += 0.1 * torch.randn(param.shape)
    tuned.save_pretrained(tmp_path / "tuned", safe_serialization=True)
    report, _ = extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "adapter", "--rank", "3", "--embed_mode",
                        embed_mode, "--quiet")
    assert max(row["relative_error"] for row in report["modules"] if row["status"].startswith("lora")) < 1e-5
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        expected, got = tuned(tokens).logits, loaded(tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    folded = fold(tmp_path / "base", tmp_path / "adapter", tmp_path / "folded")
    expected_state = tuned.state_dict()
    assert ("lm_head.weight" in folded) is not tied
    for name, value in folded.items():  # the fold gives the fine-tune back
        np.testing.assert_allclose(value, expected_state[name].numpy(), atol=1e-5, err_msg=name)
    if not (tied and embed_mode == "lora"):  # PEFT's merge_and_unload adds a tied pair twice (one shared weight)
        merged = loaded.merge_and_unload().state_dict()
        for name, value in folded.items():  # PEFT and llm-merge-lora read the adapter alike
            np.testing.assert_allclose(merged[name].numpy(), value, atol=1e-6, err_msg=name)


# -- benchmark -------------------------------------------------------------------------


def test_bench_extract_writes_a_row_per_rule_and_process_count(tmp_path):
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_extract

    out = tmp_path / "bench.json"
    assert bench_extract.main(["--family_dir", str(tmp_path / "family"), "--params", "2e6", "--n_process", "1",
                               "--rules", "--rank 4", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["kind"] == "bench_extract" and row["rule"] == "--rank 4" and row["n_process"] == 1
    assert row["seconds"] > 0 and row["peak_rss_bytes"] > 0 and row["adapter_bytes"] > 0 and row["r"] == 4
