"""LoRA folding (tools/merge_lora_params.py) against a direct NumPy computation.

Base checkpoints and adapters are generated here: Hugging Face PEFT
(adapter_model.safetensors, lora_A [r, in], lora_B [out, r], base [out, in]) and
PaddleNLP (lora_model.safetensors or lora_model_state.pdparams, lora_A [in, r],
lora_B [r, out], base [in, out]). Expected results are computed in float64 as
W + scale * B @ A (PEFT) or W + scale * A @ B (Paddle), transposed to the base's shape.
"""

import json
import math
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from checkpoints import read_checkpoint, write_checkpoint, write_safetensors
from conftest import REPO

H, I, V = 16, 24, 32  # hidden, intermediate, vocab
MODULES_HF = {  # module -> HF [out, in] shape
    "layers.0.self_attn.q_proj": (H, H),
    "layers.0.self_attn.v_proj": (H, H),
    "layers.0.mlp.up_proj": (I, H),
    "layers.0.mlp.down_proj": (H, I),
    "layers.1.mlp.up_proj": (I, H),
}


def run_lora(*args, timeout=120) -> subprocess.CompletedProcess:
    """``python tools/merge_lora_params.py ARGS`` from the repository root."""
    cmd = [sys.executable, str(REPO / "tools" / "merge_lora_params.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def make_base(path, layout="hf", dtype=np.float32, root="model", seed=0):
    """A tiny model; ``layout`` hf stores Linear weights [out, in], paddle stores them [in, out]."""
    rng = np.random.default_rng(seed)
    tensors = {f"{root}.embed_tokens.weight": rng.normal(size=(V, H))}
    for module, (out, inp) in MODULES_HF.items():
        tensors[f"{root}.{module}.weight"] = rng.normal(size=(out, inp) if layout == "hf" else (inp, out))
    tensors[f"{root}.layers.0.input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=(H,))
    tensors["lm_head.weight"] = rng.normal(size=(V, H) if layout == "hf" else (H, V))
    tensors = {k: (0.05 * v).astype(dtype) for k, v in tensors.items()}
    tensors[f"{root}.position_ids"] = np.arange(8, dtype=np.int64)
    write_checkpoint(path, tensors)
    return tensors


def factors(r, modules=MODULES_HF, seed=1):
    """module -> (A [r, in], B [out, r]) in HF orientation, float32."""
    rng = np.random.default_rng(seed)
    return {m: (rng.normal(size=(r, inp)).astype(np.float32), rng.normal(size=(out, r)).astype(np.float32))
            for m, (out, inp) in modules.items()}


def write_peft(path, lora, r, alpha, rslora=False, root="model", drop=None, dtype=np.float32):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"], "base_model_name_or_path": "base"}))
    tensors = {}
    for module, (a, b) in lora.items():
        stem = f"base_model.model.{root}.{module}"
        tensors[f"{stem}.lora_A.weight"] = a.astype(dtype)
        tensors[f"{stem}.lora_B.weight"] = b.astype(dtype)
    tensors.pop(drop, None)
    write_safetensors(path / "adapter_model.safetensors", tensors, {"format": "pt"})


def paddle_tensors(lora, root="llama"):
    """Paddle orientation: lora_A [in, r] = A.T, lora_B [r, out] = B.T."""
    out = {}
    for module, (a, b) in lora.items():
        out[f"{root}.{module}.lora_A"] = np.ascontiguousarray(a.T)
        out[f"{root}.{module}.lora_B"] = np.ascontiguousarray(b.T)
    return out


def write_paddle(path, lora, r, alpha, rslora=False, form="safetensors", root="llama"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "lora_config.json").write_text(json.dumps({
        "r": r, "lora_alpha": alpha, "rslora": rslora, "target_modules": [".*q_proj.*", ".*v_proj.*", ".*mlp.*"],
        "merge_weights": False, "trainable_bias": None}))
    tensors = paddle_tensors(lora, root)
    if form == "safetensors":
        write_safetensors(path / "lora_model.safetensors", tensors, {"format": "np"})
    else:
        code = ("import sys, numpy as np, paddle\n"
                "data = np.load(sys.argv[1])\n"
                "paddle.save({k: paddle.to_tensor(data[k]) for k in data.files}, sys.argv[2])\n")
        np.savez(path / "tmp.npz", **tensors)
        subprocess.run([sys.executable, "-c", code, str(path / "tmp.npz"), str(path / "lora_model_state.pdparams")],
                       check=True, capture_output=True)
        (path / "tmp.npz").unlink()


def expected(base, lora, scale, root, layout="hf"):
    """W + scale * delta in float64: delta = B @ A on an HF [out, in] base, (B @ A).T = A_pd @ B_pd on a Paddle one."""
    result = {}
    for name, w in base.items():
        module = name[len(root) + 1:].removesuffix(".weight")
        if module in lora and name.endswith(".weight"):
            a, b = lora[module]
            delta = b.astype(np.float64) @ a.astype(np.float64)
            if layout == "paddle":
                delta = delta.T
            assert delta.shape == w.shape
            w = (w.astype(np.float64) + scale * delta)
        result[name] = w
    return result


def check_outputs(out_dir, base, want, dtype, folded, exact_copy=True):
    got = read_checkpoint(out_dir)
    assert set(got) == set(base)
    for name, w in base.items():
        assert got[name].shape == w.shape, name
        if name in folded:
            assert got[name].dtype == np.dtype(dtype), name
            tol = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3, np.dtype(ml_dtypes.bfloat16): 1e-2}[np.dtype(dtype)]
            np.testing.assert_allclose(got[name].astype(np.float64), want[name], rtol=tol, atol=tol * 0.05, err_msg=name)
        elif exact_copy:
            assert got[name].dtype == w.dtype and got[name].tobytes() == w.tobytes(), name
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in got.values())
    assert (out_dir / "config.json").is_file() and (out_dir / "tokenizer_config.json").is_file()
    return got


def folded_names(root, modules=MODULES_HF):
    return {f"{root}.{m}.weight" for m in modules}


# -- formats ---------------------------------------------------------------------------


def test_peft_fold_matches_numpy(tmp_path):
    base = make_base(tmp_path / "base")
    lora = factors(4)
    write_peft(tmp_path / "adapter", lora, r=4, alpha=8)
    # PEFT embedding LoRA: lora_embedding_A [r, vocab], lora_embedding_B [hidden, r]; delta = (B @ A).T
    rng = np.random.default_rng(2)
    emb_a, emb_b = rng.normal(size=(4, V)).astype(np.float32), rng.normal(size=(H, 4)).astype(np.float32)
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = emb_a
    tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = emb_b
    write_safetensors(tmp_path / "adapter" / "adapter_model.safetensors", tensors)
    out = tmp_path / "out"
    result = run_lora("--model_name_or_path", tmp_path / "base", "--lora_path", tmp_path / "adapter",
                      "--output_path", out, "--quiet")
    assert result.returncode == 0, result.stderr
    want = expected(base, lora, 8 / 4, "model")
    emb = "model.embed_tokens.weight"
    want[emb] = base[emb].astype(np.float64) + 2.0 * (emb_b.astype(np.float64) @ emb_a).T
    check_outputs(out, base, want, np.float32, folded_names("model") | {emb})
    assert (out / "model.safetensors").is_file()
    record = json.loads((out / "lora_merge_config.json").read_text())
    assert record["adapter_format"] == "peft" and len(record["folded"]) == len(MODULES_HF) + 1
    assert [n for n, r in record["folded"].items() if r["transposed"]] == [emb]


def test_peft_rslora_bf16_sharded_two_workers(tmp_path):
    bf16 = ml_dtypes.bfloat16
    base = make_base(tmp_path / "base", dtype=bf16)
    lora = factors(4, seed=3)
    write_peft(tmp_path / "adapter", lora, r=4, alpha=16, rslora=True, dtype=bf16)
    lora = {m: (a.astype(bf16).astype(np.float32), b.astype(bf16).astype(np.float32)) for m, (a, b) in lora.items()}
    out = tmp_path / "out"
    result = run_lora("--model_name_or_path", tmp_path / "base", "--lora_path", tmp_path / "adapter",
                      "--output_path", out, "--max_shard_size", "1000", "--n_process", "2")
    assert result.returncode == 0, result.stderr
    want = expected(base, lora, 16 / math.sqrt(4), "model")
    check_outputs(out, base, want, bf16, folded_names("model"))
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    # bf16 is the float32 result rounded to nearest even, as in the merge
    got = read_checkpoint(out)
    name = "model.layers.0.mlp.down_proj.weight"
    a, b = lora["layers.0.mlp.down_proj"]
    f32 = base[name].astype(np.float32) + np.float32(8.0) * (b @ a)
    assert np.abs(got[name].astype(np.float32) - f32.astype(bf16).astype(np.float32)).max() <= np.abs(f32).max() * 2**-7


def test_paddle_safetensors_native_layout(tmp_path):
    """Paddle adapter on a Paddle [in, out] base: delta = A @ B used as is; output_dtype float16."""
    base = make_base(tmp_path / "base", layout="paddle", root="llama")
    lora = factors(2, seed=5)
    write_paddle(tmp_path / "adapter", lora, r=2, alpha=4, rslora=True)
    out = tmp_path / "out"
    result = run_lora("--model_name_or_path", tmp_path / "base", "--lora_path", tmp_path / "adapter",
                      "--output_path", out, "--output_dtype", "float16", "--quiet")
    assert result.returncode == 0, result.stderr
    want = expected(base, lora, 4 / math.sqrt(2), "llama", layout="paddle")
    got = check_outputs(out, base, want, np.float16, folded_names("llama"), exact_copy=False)
    assert got["llama.embed_tokens.weight"].dtype == np.float16
    assert got["llama.position_ids"].dtype == np.int64
    record = json.loads((out / "lora_merge_config.json").read_text())
    assert record["adapter_format"] == "paddle" and not any(r["transposed"] for r in record["folded"].values())


@pytest.mark.parametrize("fmt", ["peft", "paddle"])
def test_transposed_layout(tmp_path, fmt):
    """PEFT adapter on a Paddle-layout base, Paddle adapter on an HF-layout base: delta.T fits.

    The square q_proj/v_proj fit both ways; they follow the non-square weights (transposed)."""
    root = "model"
    base = make_base(tmp_path / "base", layout="paddle" if fmt == "peft" else "hf", root=root)
    lora = factors(4, seed=7)
    if fmt == "peft":
        write_peft(tmp_path / "adapter", lora, r=4, alpha=4)
    else:
        write_paddle(tmp_path / "adapter", lora, r=4, alpha=4, root=root)
    out = tmp_path / "out"
    result = run_lora("--model_name_or_path", tmp_path / "base", "--lora_path", tmp_path / "adapter",
                      "--output_path", out, "--quiet")
    assert result.returncode == 0, result.stderr
    want = expected(base, lora, 1.0, root, layout="paddle" if fmt == "peft" else "hf")
    check_outputs(out, base, want, np.float32, folded_names(root))
    record = json.loads((out / "lora_merge_config.json").read_text())
    assert all(r["transposed"] for r in record["folded"].values())


def test_pdparams_needs_allow_pickle(tmp_path):
    pytest.importorskip("paddle")
    base = make_base(tmp_path / "base", layout="paddle", root="llama")
    lora = factors(4, seed=9)
    write_paddle(tmp_path / "adapter", lora, r=4, alpha=8, form="pdparams")
    out = tmp_path / "out"
    args = ["--model_name_or_path", tmp_path / "base", "--lora_path", tmp_path / "adapter", "--output_path", out, "--quiet"]
    refused = run_lora(*args)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm_merge: error: ")
    assert "pickle" in lines[0] and "--allow_pickle" in lines[0] and "lora_model_state.pdparams" in lines[0]
    assert not out.exists()
    result = run_lora(*args, "--allow_pickle", "--n_process", "2")
    assert result.returncode == 0, result.stderr
    check_outputs(out, base, expected(base, lora, 2.0, "llama", layout="paddle"), np.float32, folded_names("llama"))



@pytest.mark.parametrize("entries", ["arrays", "pairs"])
def test_pdparams_with_name_table_and_bf16_folds(tmp_path, entries):
    """A PaddleNLP-style pickle: paddle.save's name table, bf16 factors stored as uint16 (arrays, or Paddle 2.1's
    (name, array) pairs), an entry that is not a tensor; folds with the bf16 factors as float32."""
    pytest.importorskip("paddle")
    import pickle

    from llm_merge.io.pdparams import NAME_TABLE
    from llm_merge.lora import fold as lora_merge
    from llm_merge.lora.options import LoraMergeConfig

    base = make_base(tmp_path / "base", layout="paddle", root="llama")
    lora = {m: (a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)) for m, (a, b) in factors(4, seed=5).items()}
    adapter = tmp_path / "adapter"
    write_paddle(adapter, lora, r=4, alpha=8)
    (adapter / "lora_model.safetensors").unlink()
    state = {}
    for i, (name, array) in enumerate(paddle_tensors(lora).items()):
        stored = array.view(np.uint16)
        state[name] = stored if entries == "arrays" else (f"linear_{i}.w_0", stored)
    state[NAME_TABLE] = {name: f"linear_{i}.w_0" for i, name in enumerate(state)}
    state["lora_step"] = "not a tensor"
    with open(adapter / "lora_model_state.pdparams", "wb") as handle:
        pickle.dump(state, handle, protocol=4)
    out = tmp_path / "out"
    lora_merge.merge_lora(LoraMergeConfig(model_name_or_path=str(tmp_path / "base"), lora_path=str(adapter),
                                          output_path=str(out), allow_pickle=True, quiet=True))
    as_f32 = {m: (a.astype(np.float32), b.astype(np.float32)) for m, (a, b) in lora.items()}
    check_outputs(out, base, expected(base, as_f32, 2.0, "llama", layout="paddle"), np.float32, folded_names("llama"))

def test_api_small_blocks_and_overwrite(tmp_path, monkeypatch):
    """In process, with 40-element blocks: several row blocks per weight, both layouts."""
    from llm_merge.lora import fold as lora_merge
    from llm_merge.lora.options import LoraMergeConfig

    monkeypatch.setattr(lora_merge, "CHUNK_ELEMENTS", 40)
    for layout in ("hf", "paddle"):
        base = make_base(tmp_path / f"base-{layout}", layout=layout)
        lora = factors(3, seed=11)
        write_peft(tmp_path / f"adapter-{layout}", lora, r=3, alpha=6)
        out = tmp_path / "out"
        if layout == "paddle":
            (out / "stale.txt").write_text("x")
        cfg = LoraMergeConfig(model_name_or_path=str(tmp_path / f"base-{layout}"), lora_path=str(tmp_path / f"adapter-{layout}"),
                              output_path=str(out), overwrite=True, quiet=True)
        assert lora_merge.merge_lora(cfg) == out
        want = expected(base, lora, 2.0, "model", layout=layout)
        check_outputs(out, base, want, np.float32, folded_names("model"))
        assert not (out / "stale.txt").exists()


def test_existing_output_needs_overwrite(tmp_path):
    make_base(tmp_path / "base")
    write_peft(tmp_path / "adapter", factors(2), r=2, alpha=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    result = run_lora("--model_name_or_path", tmp_path / "base", "--lora_path", tmp_path / "adapter", "--output_path", out)
    assert result.returncode == 1 and "--overwrite" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# -- errors: one line, named culprits, nothing written ----------------------------------


def _error_case(tmp_path, case):
    base = make_base(tmp_path / "base")
    lora = factors(4)
    adapter = tmp_path / "adapter"
    if case == "missing_target":
        lora["layers.0.self_attn.k_proj"] = factors(4, {"m": (H, H)})["m"]
        write_peft(adapter, lora, r=4, alpha=8)
        return ["layers.0.self_attn.k_proj", "is not a weight of"]
    if case == "unpaired":
        write_peft(adapter, lora, r=4, alpha=8, drop="base_model.model.model.layers.0.mlp.up_proj.lora_B.weight")
        return ["unpaired", "model.layers.0.mlp.up_proj.lora_A.weight", "has no lora_B"]
    if case == "wrong_shape":
        base["model.layers.0.mlp.down_proj.weight"] = np.zeros((H, I + 1), np.float32)
        write_checkpoint(tmp_path / "base", base)
        write_peft(adapter, lora, r=4, alpha=8)
        return ["model.layers.0.mlp.down_proj.weight", "[16, 24]", "[16, 25]", "lora_A [4, 24]", "lora_B [16, 4]"]
    if case == "rank":
        write_peft(adapter, lora, r=8, alpha=8)
        return ["rank 4 in the tensors but r=8"]
    if case == "no_config":
        adapter.mkdir()
        return ["adapter_config.json", "lora_config.json"]
    if case == "bad_flag":
        write_peft(adapter, lora, r=4, alpha=8)
        return ["--n_process", "0"]
    raise AssertionError(case)


@pytest.mark.parametrize("case, code", [("missing_target", 1), ("unpaired", 1), ("wrong_shape", 1), ("rank", 1),
                                        ("no_config", 1), ("bad_flag", 2)])
def test_errors(tmp_path, case, code):
    from llm_merge.cli.lora import main

    needles = _error_case(tmp_path, case)
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(tmp_path / "base"), "--lora_path", str(tmp_path / "adapter"), "--output_path", str(out)]
    if case == "bad_flag":
        args += ["--n_process", "0"]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(args) == code
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm_merge: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_bad_flags_exit_2_one_line(tmp_path):
    result = run_lora("--lora_path", tmp_path, "--output_path", tmp_path / "o", "--bogus")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["llm_merge: error: unrecognized arguments: --bogus"]
    result = run_lora("--lora_path", tmp_path, "--output_path", tmp_path / "o", "--output_dtype", "int8")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "--output_dtype" in result.stderr


@pytest.mark.parametrize("n_process", [1, 2])
def test_worker_failure_leaves_no_output(tmp_path, monkeypatch, n_process):
    from llm_merge.lora import fold as lora_merge
    from llm_merge.errors import MergeError
    from llm_merge.lora.options import LoraMergeConfig

    make_base(tmp_path / "base")
    write_peft(tmp_path / "adapter", factors(2), r=2, alpha=2)

    def broken(self, task):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(lora_merge.TensorFolder, "_fold", broken)
    out = tmp_path / "out"
    cfg = LoraMergeConfig(model_name_or_path=str(tmp_path / "base"), lora_path=str(tmp_path / "adapter"),
                          output_path=str(out), n_process=n_process, quiet=True)
    with pytest.raises(MergeError, match="disk on fire"):
        lora_merge.merge_lora(cfg)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_full_tensors_in_adapter_replace_base(tmp_path):
    """Non-LoRA adapter tensors (PEFT modules_to_save, Paddle trainable bias) replace the base tensor of that name."""
    base = make_base(tmp_path / "base", layout="paddle", root="llama", dtype=ml_dtypes.bfloat16)
    lora = factors(2, seed=13)
    write_paddle(tmp_path / "adapter", lora, r=2, alpha=2)
    tensors = paddle_tensors(lora)
    norm = np.linspace(0.5, 1.5, H, dtype=np.float32)
    tensors["llama.layers.0.input_layernorm.weight"] = norm
    write_safetensors(tmp_path / "adapter" / "lora_model.safetensors", tensors)
    out = tmp_path / "out"
    result = run_lora("--model_name_or_path", tmp_path / "base", "--lora_path", tmp_path / "adapter", "--output_path", out)
    assert result.returncode == 0, result.stderr
    got = read_checkpoint(out)
    assert got["llama.layers.0.input_layernorm.weight"].tobytes() == norm.astype(ml_dtypes.bfloat16).tobytes()
    want = expected(base, lora, 1.0, "llama", layout="paddle")
    base["llama.layers.0.input_layernorm.weight"] = norm.astype(ml_dtypes.bfloat16)
    check_outputs(out, base, want, ml_dtypes.bfloat16, folded_names("llama"))
    tensors["llama.layers.0.input_layernorm.weight"] = norm[:-1]
    write_safetensors(tmp_path / "adapter" / "lora_model.safetensors", tensors)
    result = run_lora("--model_name_or_path", tmp_path / "base", "--lora_path", tmp_path / "adapter", "--output_path", tmp_path / "o2")
    assert result.returncode == 1 and "input_layernorm.weight: shape [15]" in result.stderr and not (tmp_path / "o2").exists()
