"""Paddle .pdparams checkpoints: inputs (only with --allow_pickle) and --output_format pdparams."""

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from checkpoints import make_llama_family, read_checkpoint
from conftest import run_mergekit

paddle = pytest.importorskip("paddle")

from llm_merge.api import merge
from llm_merge.config.options import MergeConfig
from llm_merge.errors import ConfigError, MergeError
from llm_merge.io import pdparams

STEM = {"model": "model_state", "master_weights": "master_weights"}


def to_paddle(array: np.ndarray):
    """A paddle tensor of the same dtype (bf16 via Paddle's uint16 storage)."""
    if array.dtype == ml_dtypes.bfloat16:
        tensor = paddle.to_tensor(array.view(np.uint16))
        assert tensor.dtype == paddle.bfloat16
        return tensor
    return paddle.to_tensor(array)


def write_pdparams(directory: Path, tensors: dict, prefix: str = "model", shards: int = 1) -> Path:
    """PaddleNLP layout: {stem}.pdparams, or {stem}.pdparams.index.json + {stem}-0000i-of-0000n.pdparams."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = STEM[prefix]
    names = list(tensors)
    if shards == 1:
        paddle.save({k: to_paddle(v) for k, v in tensors.items()}, str(directory / f"{stem}.pdparams"))
    else:
        weight_map = {}
        for i, idx in enumerate(np.array_split(np.arange(len(names)), shards), start=1):
            file = f"{stem}-{i:05d}-of-{shards:05d}.pdparams"
            paddle.save({names[j]: to_paddle(tensors[names[j]]) for j in idx}, str(directory / file))
            weight_map.update({names[j]: file for j in idx})
        total = sum(v.nbytes for v in tensors.values())
        (directory / f"{stem}.pdparams.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"hidden_size": 16}))
    return directory


def pd_family(tmp_path, dtype=np.float32, shards=1, prefix="model"):
    """The same family twice: safetensors (st/) and pdparams (pd/)."""
    fam = make_llama_family(tmp_path / "st", n_models=2, dtype=dtype, prefix=prefix)
    pd_base = write_pdparams(tmp_path / "pd" / "base", fam.base, prefix, shards)
    pd_models = [write_pdparams(tmp_path / "pd" / f"ft{i}", m, prefix, shards) for i, m in enumerate(fam.models)]
    return fam, pd_base, pd_models


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "llm_merge" in p.name)


def assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, expected in want.items():
        assert got[name].dtype == expected.dtype, name
        assert got[name].shape == expected.shape, name
        assert got[name].tobytes() == expected.tobytes(), name


def cfg(models, base, output, **kwargs):
    return MergeConfig(merge_method="dare_ties", model_path_list=[str(m) for m in models], base_model_path=str(base),
                       output_path=str(output), reserve_p=0.6, quiet=True, **kwargs)


@pytest.mark.parametrize("dtype,shards", [(np.float32, 1), (ml_dtypes.bfloat16, 2)], ids=["fp32-single", "bf16-sharded"])
def test_pdparams_inputs_merge_like_safetensors(tmp_path, dtype, shards):
    fam, pd_base, pd_models = pd_family(tmp_path, dtype, shards)
    out_st, out_pd = tmp_path / "out_st", tmp_path / "out_pd"
    merge(cfg(fam.model_dirs, fam.base_dir, out_st))
    merge(cfg(pd_models, pd_base, out_pd, allow_pickle=True))
    assert_same_tensors(read_checkpoint(out_pd), read_checkpoint(out_st))
    assert (out_pd / "config.json").is_file()  # the first model's files, from its own directory
    assert not any(p.suffix == ".pdparams" for p in out_pd.iterdir())
    assert leftovers(tmp_path) == []


def test_refused_without_allow_pickle(tmp_path):
    _, pd_base, pd_models = pd_family(tmp_path)
    out = tmp_path / "out"
    result = run_mergekit("--merge_method", "ties", "--base_model_path", pd_base, "--model_path_list", *pd_models,
                          "--output_path", out)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--allow_pickle" in lines[0] and "pickle" in lines[0] and "safetensors" in lines[0]
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(ConfigError, match="--allow_pickle"):
        merge(cfg(pd_models, pd_base, out))


def test_safetensors_wins_over_pdparams(tmp_path):
    fam = make_llama_family(tmp_path, n_models=2)
    for directory in [fam.base_dir, *fam.model_dirs]:
        (directory / "model_state.pdparams").write_bytes(b"not a pickle; must never be loaded")
    out = tmp_path / "out"
    merge(cfg(fam.model_dirs, fam.base_dir, out))  # no --allow_pickle needed: the pdparams are ignored
    assert (out / "model.safetensors.index.json").is_file()


def test_output_format_pdparams_cli(tmp_path):
    """pdparams in (master_weights, sharded) and out (sharded bf16); equals the safetensors output."""
    fam, pd_base, pd_models = pd_family(tmp_path, np.float32, 2, prefix="master_weights")
    common = ["--merge_method", "ties", "--merge_prefix", "master_weights", "--output_dtype", "bfloat16",
              "--max_shard_size", "5KB", "--quiet"]
    out_st, out_pd = tmp_path / "out_st", tmp_path / "out_pd"
    r = run_mergekit(*common, "--base_model_path", fam.base_dir, "--model_path_list", *fam.model_dirs, "--output_path", out_st)
    assert r.returncode == 0, r.stderr
    r = run_mergekit(*common, "--base_model_path", pd_base, "--model_path_list", *pd_models, "--output_path", out_pd,
                     "--allow_pickle", "--output_format", "pdparams", "--n_process", "2")
    assert r.returncode == 0, r.stderr
    expected = read_checkpoint(out_st, "master_weights")
    st_index = json.loads((out_st / "master_weights.safetensors.index.json").read_text())
    n = len(set(st_index["weight_map"].values()))
    assert n >= 2
    files = sorted(p.name for p in out_pd.iterdir())
    shards = [f"master_weights-{i:05d}-of-{n:05d}.pdparams" for i in range(1, n + 1)]
    # only Paddle weight files (+ index), the first model's config.json and merge_config.json
    assert files == sorted([*shards, "master_weights.pdparams.index.json", "config.json", "merge_config.json"])
    index = json.loads((out_pd / "master_weights.pdparams.index.json").read_text())
    assert index["metadata"] == st_index["metadata"]
    assert index["weight_map"] == {k: v.replace(".safetensors", ".pdparams") for k, v in st_index["weight_map"].items()}
    got = {}
    for shard in shards:
        state = paddle.load(str(out_pd / shard))
        assert set(state) == {k for k, v in index["weight_map"].items() if v == shard}
        got.update(state)
    assert set(got) == set(expected)
    for name, want in expected.items():
        tensor = got[name]
        if want.dtype == ml_dtypes.bfloat16:
            assert tensor.dtype == paddle.bfloat16, name
            assert tensor.numpy().view(np.uint16).tobytes() == want.view(np.uint16).tobytes(), name
        else:
            assert tensor.numpy().dtype == want.dtype and tensor.numpy().tobytes() == want.tobytes(), name
    assert json.loads((out_pd / "merge_config.json").read_text())["output_format"] == "pdparams"
    assert leftovers(tmp_path) == []


def test_pdparams_output_roundtrip_single(tmp_path):
    """A single-shard pdparams output is model_state.pdparams (no index) and reads back as an input."""
    fam = make_llama_family(tmp_path, n_models=1, dtype=ml_dtypes.bfloat16)
    out = tmp_path / "out"
    merge(MergeConfig(model_path_list=[str(fam.model_dirs[0])], output_path=str(out), quiet=True, output_format="pdparams"))
    assert (out / "model_state.pdparams").is_file() and not (out / "model_state.pdparams.index.json").exists()
    assert not list(out.glob("*.safetensors*"))
    again = tmp_path / "again"
    merge(MergeConfig(model_path_list=[str(out)], output_path=str(again), quiet=True, allow_pickle=True))
    assert_same_tensors(read_checkpoint(again), fam.models[0])  # linear merge of one model: the model itself


def test_failure_after_conversion_leaves_nothing(tmp_path):
    _, pd_base, pd_models = pd_family(tmp_path)
    state = paddle.load(str(pd_models[1] / "model_state.pdparams"))
    state.pop("lm_head.weight")
    paddle.save(state, str(pd_models[1] / "model_state.pdparams"))
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="tensor names differ"):
        merge(cfg(pd_models, pd_base, out, allow_pickle=True))
    assert not out.exists() and leftovers(tmp_path) == []


def test_index_outside_directory_refused(tmp_path):
    _, pd_base, pd_models = pd_family(tmp_path, shards=2)
    index = pd_models[0] / "model_state.pdparams.index.json"
    value = json.loads(index.read_text())
    first = next(iter(value["weight_map"]))
    value["weight_map"][first] = "../base/model_state-00001-of-00002.pdparams"
    index.write_text(json.dumps(value))
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="outside the checkpoint directory"):
        merge(cfg(pd_models, pd_base, out, allow_pickle=True))
    assert not out.exists() and leftovers(tmp_path) == []


def test_multi_rank_refuses_pdparams(tmp_path):
    fam, pd_base, pd_models = pd_family(tmp_path)
    with pytest.raises(ConfigError, match="multi-rank"):
        merge(cfg(pd_models, pd_base, tmp_path / "out", allow_pickle=True, rank=0, world_size=2))
    with pytest.raises(ConfigError, match="multi-rank"):
        merge(cfg(fam.model_dirs, fam.base_dir, tmp_path / "out", output_format="pdparams", rank=0, world_size=2))
    assert leftovers(tmp_path) == []


def test_missing_paddle_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "paddle", None)
    with pytest.raises(MergeError, match=r"pip install 'llm_merge\[paddle\]'"):
        pdparams.import_paddle("--output_format pdparams")


def test_killed_runs_conversion_dir_is_cleaned(tmp_path):
    """A conversion directory left by a SIGKILLed run (dead pid) is removed by the next run for that output."""
    fam = make_llama_family(tmp_path, n_models=1)
    stale = tmp_path / f".out.llm_merge-tmp-{2**22 + 7}-pdparamsabc_123"
    (stale / "0").mkdir(parents=True)
    merge(MergeConfig(model_path_list=[str(fam.model_dirs[0])], output_path=str(tmp_path / "out"), quiet=True))
    assert not stale.exists()


def test_load_state_dict_every_stored_form(tmp_path, caplog):
    """The one loader: name table dropped; bf16 from uint16 arrays, Paddle 2.1 (name, array) pairs and pickled
    Paddle tensors; entries that are not tensors skipped with a warning; the stored order kept."""
    import pickle

    rng = np.random.default_rng(0)
    want = {"w": rng.normal(size=(3, 4)).astype(ml_dtypes.bfloat16), "pair": rng.normal(size=5).astype(np.float32),
            "tensor": rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16), "ids": np.arange(4, dtype=np.int64)}
    state = {"w": want["w"].view(np.uint16), "pair": ("linear_1.w_0", want["pair"]), "tensor": to_paddle(want["tensor"]),
             "step": 7, "ids": want["ids"], pdparams.NAME_TABLE: {"w": "linear_0.w_0"}}
    path = tmp_path / "state.pdparams"
    with open(path, "wb") as handle:
        pickle.dump(state, handle, protocol=4)
    got = pdparams.load_state_dict(path)
    assert list(got) == list(want)
    assert_same_tensors(got, want)
    assert "entry 'step' is a int, not a tensor; skipped" in caplog.text


def test_load_state_dict_refusals_are_one_line(tmp_path):
    listed = tmp_path / "list.pdparams"
    paddle.save([np.ones(2, np.float32)], str(listed))
    with pytest.raises(MergeError) as info:
        pdparams.load_state_dict(listed)
    assert str(info.value) == f"{listed}: expected a state dict (name -> tensor), got list"
    garbage = tmp_path / "garbage.pdparams"
    garbage.write_bytes(b"\x80\x04not a pickle\n\nat all")
    with pytest.raises(MergeError, match="cannot load") as info:
        pdparams.load_state_dict(garbage)
    assert "\n" not in str(info.value)


def test_converted_shard_reads_back_byte_for_byte(tmp_path):
    """Converted with the safetensors package's writer (which sorts tensors by dtype and name): our reader and
    safetensors read the same bytes, the metadata is kept, and the checkpoint keeps the state dict's order."""
    from safetensors import safe_open

    from llm_merge.io.checkpoint import open_checkpoint
    from llm_merge.io.reader import TensorReader

    rng = np.random.default_rng(1)
    tensors = {"z.weight": rng.normal(size=(4, 3)).astype(ml_dtypes.bfloat16), "b.ids": np.arange(5, dtype=np.int64),
               "m.norm": rng.normal(size=7).astype(np.float32), "a.mask": rng.random(6) > 0.5,
               "h.half": rng.normal(size=(2, 3)).astype(np.float16)}
    source = write_pdparams(tmp_path / "pd", tensors)
    target = tmp_path / "converted"
    target.mkdir()
    pdparams.convert_checkpoint(source, "model", target)
    checkpoint = open_checkpoint(source, "model", convert=lambda directory, prefix: target)
    assert list(checkpoint.tensors) == list(tensors) and checkpoint.metadata == {"format": "np"}
    with TensorReader() as reader, safe_open(str(checkpoint.files[0]), "np") as theirs:
        assert sorted(theirs.keys()) == sorted(tensors) and theirs.metadata() == {"format": "np"}
        for name, want in tensors.items():
            info = checkpoint.tensors[name]
            ours = reader.read_raw(info).reshape(info.shape)
            assert ours.dtype == want.dtype and ours.tobytes() == want.tobytes(), name
            assert theirs.get_tensor(name).dtype == want.dtype and theirs.get_tensor(name).tobytes() == want.tobytes(), name
