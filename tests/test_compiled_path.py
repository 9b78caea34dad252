"""The compiled (numba) merge path writes exactly the bytes of the plain NumPy path."""

import os

import pytest

from checkpoints import make_llama_family
from conftest import run_mergekit

pytest.importorskip("numba")

CASES = [
    ("linear", ["--weight_list", "0.7", "0.5", "--normalize", "false"]),
    ("slerp", ["--slerp_alpha", "0.3"]),
    ("ties", ["--reserve_p", "0.4"]),
    ("ties", ["--ties_elect_type", "count", "--rescale", "false", "--weight_list", "0.4", "1.1"]),
    ("della", ["--reserve_p", "0.5", "--epsilon", "0.3"]),
    ("della_linear", ["--rescale", "false"]),
    ("dare_linear", ["--reserve_p", "0.3"]),
    ("dare_ties", ["--weight_list", "0.6", "0.4"]),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    import ml_dtypes

    return make_llama_family(tmp_path_factory.mktemp("fam"), n_models=2, dtype=ml_dtypes.bfloat16, shards=2)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("method, flags", CASES)
def test_compiled_and_numpy_paths_are_byte_identical(tmp_path, family, method, flags, with_base):
    base = ["--base_model_path", family.base_dir] if with_base else []
    outputs = {}
    for numba in ("1", "0"):
        out = tmp_path / f"out{numba}"
        result = run_mergekit("--merge_method", method, "--model_path_list", *family.model_dirs, *base,
                              "--output_path", out, *flags, env={**os.environ, "LLM_MERGE_NUMBA": numba})
        assert result.returncode == 0, result.stderr
        outputs[numba] = {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}
    assert outputs["1"] == outputs["0"]


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_spilled_and_grouped_ranks_give_the_same_bytes(tmp_path, family, method, monkeypatch):
    """Large-tensor paths (ranks parked on disk, grouped rank sort) write exactly the in-memory bytes."""
    from llm_merge.api import merge
    from llm_merge.backends import numba_kernels
    from llm_merge.config import MergeConfig
    from llm_merge.engine import TensorMerger

    monkeypatch.setenv("LLM_MERGE_NUMBA", "1")

    def run(out):
        merge(MergeConfig(merge_method=method, model_path_list=[str(d) for d in family.model_dirs],
                          base_model_path=str(family.base_dir), output_path=str(out), quiet=True))
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    plain = run(tmp_path / "plain")
    monkeypatch.setattr(TensorMerger, "SPILL_BYTES", 1)
    monkeypatch.setattr(numba_kernels, "GROUPED_RANKS_MIN", 1)
    monkeypatch.setattr(numba_kernels, "RANK_GROUP", 64)
    spilled = run(tmp_path / "spilled")
    assert spilled == plain
    assert not list((tmp_path / "spilled").glob(".spill-*"))
