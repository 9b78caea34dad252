"""The compiled (numba) merge path writes exactly the bytes of the plain NumPy path."""

import os

import numpy as np
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
    ("multislerp", ["--weight_list", "0.7", "0.4"]),
    ("task_arithmetic", ["--weight_list", "0.7", "-0.4"]),
    ("breadcrumbs_ties", ["--reserve_p", "0.5", "--gamma", "0.05"]),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    import ml_dtypes

    return make_llama_family(tmp_path_factory.mktemp("fam"), n_models=2, dtype=ml_dtypes.bfloat16, shards=2)


def assert_fused_equals_numpy(tmp_path, monkeypatch, **config):
    """Merge ``config`` compiled (small chunks and cache blocks, ending mid-block) and plain NumPy: the fused
    pass must run and write the NumPy bytes."""
    from llm_merge.api import merge
    from llm_merge.config.options import MergeConfig
    from llm_merge.kernels import fused as numba_kernels
    from llm_merge.run.engine import TensorMerger

    def run(out, numba):
        monkeypatch.setenv("LLM_MERGE_NUMBA", numba)
        merge(MergeConfig(output_path=str(out), quiet=True, **config))
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    monkeypatch.setattr(TensorMerger, "FUSED_CHUNK", 200)
    monkeypatch.setattr(numba_kernels.FusedChunks, "BLOCK", 48)
    fused_tensors = []
    original_run = numba_kernels.FusedChunks.run
    monkeypatch.setattr(numba_kernels.FusedChunks, "run",
                        lambda self, *args: fused_tensors.append(self) or original_run(self, *args))
    compiled = run(tmp_path / "compiled", "1")
    assert fused_tensors, f"{config['merge_method']} did not take the fused pass"
    assert compiled == run(tmp_path / "numpy", "0")


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
def test_spilled_and_multi_run_ranks_give_the_same_bytes(tmp_path, family, method, monkeypatch):
    """Whole-tensor ranks, in memory or parked on disk, write exactly the bytes of streamed rank tables."""
    from llm_merge.api import merge
    from llm_merge.kernels import fused as numba_kernels
    from llm_merge.config.options import MergeConfig
    from llm_merge.run.engine import TensorMerger

    monkeypatch.setenv("LLM_MERGE_NUMBA", "1")

    def run(out):
        merge(MergeConfig(merge_method=method, model_path_list=[str(d) for d in family.model_dirs],
                          base_model_path=str(family.base_dir), output_path=str(out), quiet=True))
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    streamed = run(tmp_path / "streamed")
    monkeypatch.setattr(numba_kernels.StreamingRanks, "MIXED_FRACTION_MAX", -1.0)  # whole-tensor ranks
    assert run(tmp_path / "whole") == streamed
    monkeypatch.setattr(TensorMerger, "SPILL_BYTES", 1)
    spilled = run(tmp_path / "spilled")
    assert spilled == streamed
    assert not list((tmp_path / "spilled").glob(".spill-*"))


@pytest.mark.parametrize("stored", ["bf16", "f16"])
@pytest.mark.parametrize("with_base", [True, False])
def test_streamed_ranks_write_the_bytes_of_whole_tensor_ranks(tmp_path, families, monkeypatch, with_base, stored):
    """bfloat16 and float16 DELLA ranks chunk by chunk from rank tables (no full-size arrays), with the same result."""
    from llm_merge.api import merge
    from llm_merge.kernels import fused as numba_kernels
    from llm_merge.config.options import MergeConfig
    from llm_merge.run.engine import TensorMerger

    monkeypatch.setenv("LLM_MERGE_NUMBA", "1")
    monkeypatch.setattr(TensorMerger, "FUSED_CHUNK", 300)
    monkeypatch.setattr(numba_kernels.FusedChunks, "BLOCK", 40)
    monkeypatch.setattr(numba_kernels.StreamingRanks, "MIXED_FRACTION_MAX", 1.0)  # this family's deltas are large
    tables = []
    real_statistics = numba_kernels.StreamingRanks.statistics
    monkeypatch.setattr(numba_kernels.StreamingRanks, "statistics",
                        lambda self: tables.append(real_statistics(self)) or tables[-1])

    def run(out):
        family = families[stored]
        merge(MergeConfig(merge_method="della", model_path_list=[str(d) for d in family.model_dirs],
                          base_model_path=str(family.base_dir) if with_base else None, output_path=str(out),
                          reserve_p=0.4, quiet=True))
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    streamed = run(tmp_path / "streamed")
    assert tables and all(t is not None for t in tables)
    monkeypatch.setattr(numba_kernels.StreamingRanks, "MIXED_FRACTION_MAX", -1.0)
    tables.clear()
    assert run(tmp_path / "whole") == streamed
    assert tables and all(t is None for t in tables)


DTYPES = {"bf16": "bfloat16", "f16": np.float16, "f32": np.float32}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """The same family (same seed) stored as bfloat16, float16 and float32."""
    import ml_dtypes

    made = {}
    for name, dtype in DTYPES.items():
        dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
        made[name] = make_llama_family(tmp_path_factory.mktemp(name), n_models=3, dtype=dtype, shards=2)
    return made


@pytest.mark.parametrize("models, base, output_dtype", [
    ("bf16", "bf16", None), ("f32", "f32", None), ("f16", "f16", None), ("bf16", "f32", "float16"),
    ("f16", "bf16", "float32"), ("f32", "bf16", "bfloat16"), ("f16", None, "bfloat16"), ("bf16", None, None),
])
# multislerp and task_arithmetic run slerp's and linear's fused code (coefficients), checked over every mix by those
@pytest.mark.parametrize("method", ["linear", "ties", "della", "dare_ties", "slerp"])
def test_fused_pass_is_byte_identical_across_chunks_blocks_and_dtypes(tmp_path, families, monkeypatch, method, models,
                                                                     base, output_dtype):
    """Chunks and cache blocks smaller than a tensor (and ending mid-block), any mix of input and output dtypes."""
    model_dirs = [str(d) for d in families[models].model_dirs[: 2 if method == "slerp" else 3]]
    assert_fused_equals_numpy(tmp_path, monkeypatch, merge_method=method, model_path_list=model_dirs,
                              base_model_path=str(families[base].base_dir) if base else None,
                              output_dtype=output_dtype, reserve_p=0.6)


@pytest.mark.parametrize("method, models, base", [("breadcrumbs", "bf16", "bf16"), ("breadcrumbs_ties", "f16", "bf16")])
def test_breadcrumbs_fused_apply_is_byte_identical(tmp_path, families, monkeypatch, method, models, base):
    """breadcrumbs' band (whole-tensor NumPy statistics) applied by the fused pass's magnitude band."""
    assert_fused_equals_numpy(tmp_path, monkeypatch, merge_method=method,
                              model_path_list=[str(d) for d in families[models].model_dirs],
                              base_model_path=str(families[base].base_dir), reserve_p=0.6, gamma=0.05)


@pytest.mark.parametrize("models", ["bf16", "f32"])
@pytest.mark.parametrize("method, options", [("model_stock", {}), ("nuslerp", {"weight_list": [0.3, 0.9]})])
def test_whole_tensor_model_stock_and_nuslerp_fused(tmp_path, families, monkeypatch, method, options, models):
    """model_stock and nuslerp over whole tensors: Gram sums streamed, the fused linear pass with their coefficients."""
    dirs = [str(d) for d in families[models].model_dirs[: 2 if method == "nuslerp" else 3]]
    assert_fused_equals_numpy(tmp_path, monkeypatch, merge_method=method, model_path_list=dirs,
                              base_model_path=str(families[models].base_dir), **options)


@pytest.mark.parametrize("method, options", [("model_stock", {"model_stock_filter_wise": True}),
                                             ("nuslerp", {"nuslerp_flatten": False}),
                                             ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True})])
def test_per_row_model_stock_and_nuslerp_keep_the_numpy_path(tmp_path, families, monkeypatch, method, options):
    """Per row or column (``fused_if`` false), they take the per-chunk path, compiled or not: the same bytes."""
    from llm_merge.api import merge
    from llm_merge.config.options import MergeConfig
    from llm_merge.kernels import fused as numba_kernels

    dirs = [str(d) for d in families["bf16"].model_dirs[: 2 if method == "nuslerp" else 3]]
    monkeypatch.setattr(numba_kernels.FusedChunks, "run", lambda *args: pytest.fail("the fused pass ran"))
    outputs = []
    for numba in ("1", "0"):
        monkeypatch.setenv("LLM_MERGE_NUMBA", numba)
        out = tmp_path / numba
        merge(MergeConfig(merge_method=method, model_path_list=dirs, base_model_path=str(families["bf16"].base_dir),
                          output_path=str(out), quiet=True, **options))
        outputs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))})
    assert outputs[0] == outputs[1]


def test_karcher_fused_pass_is_byte_identical(tmp_path, families, monkeypatch):
    """karcher (no base: every input merged alike) streams its Gram sums and runs the fused linear pass."""
    assert_fused_equals_numpy(tmp_path, monkeypatch, merge_method="karcher",
                              model_path_list=[str(d) for d in families["bf16"].model_dirs[:3]])


DTYPE_MIXES = [("bf16", "bf16", None), ("f32", "f32", None), ("f16", "bf16", "float32"), ("bf16", "f32", "bfloat16")]


# nearswap merges one model: each dtype mix compiles a signature of its own (~3 s each on a cold cache), so it
# runs on one; the clip is the same code whatever the lanes, which the other methods cover
@pytest.mark.parametrize("method, options, models, base, output_dtype", [
    *[("ram", {"ram_epsilon": 2e-3}, *mix) for mix in DTYPE_MIXES],
    *[("ramplus_tl", {"ram_epsilon": 2e-3, "ramplus_r": 0.5, "ramplus_alpha": 0.4}, *mix) for mix in DTYPE_MIXES],
    ("nearswap", {"nearswap_t": 4e-3}, "bf16", "bf16", None),
])
def test_ram_and_nearswap_fused_pass_is_byte_identical(tmp_path, families, monkeypatch, method, options, models, base,
                                                       output_dtype):
    """ram / ramplus_tl (kernel ram) and nearswap (kernel clip) in the fused pass: the NumPy method's bytes."""
    model_dirs = [str(d) for d in families[models].model_dirs[: 1 if method == "nearswap" else 3]]
    assert_fused_equals_numpy(tmp_path, monkeypatch, merge_method=method, model_path_list=model_dirs,
                              base_model_path=str(families[base].base_dir), output_dtype=output_dtype, **options)


def test_fused_pass_counts_nonfinite_inputs(tmp_path, monkeypatch):
    """NaN/Inf inputs are reported by the compiled pass as by the NumPy one, per input file."""
    import ml_dtypes

    from checkpoints import write_checkpoint

    bad = np.full(300, 0.5, np.float32)
    bad[[2, 150, 299]] = [np.nan, np.inf, -np.inf]
    write_checkpoint(tmp_path / "a", {"w": bad.astype(ml_dtypes.bfloat16)})
    write_checkpoint(tmp_path / "b", {"w": np.ones(300, ml_dtypes.bfloat16)})
    base = np.ones(300, np.float32)
    base[7] = np.nan
    write_checkpoint(tmp_path / "base", {"w": base})
    for numba in ("1", "0"):
        result = run_mergekit("--model_path_list", tmp_path / "a", tmp_path / "b", "--base_model_path", tmp_path / "base",
                              "--output_path", tmp_path / f"out{numba}", env={**os.environ, "LLM_MERGE_NUMBA": numba})
        assert result.returncode == 0, result.stderr
        assert f"tensor w has 3 NaN/Inf value(s) in {tmp_path / 'a'}" in result.stderr
        assert f"tensor w has 1 NaN/Inf value(s) in {tmp_path / 'base'}" in result.stderr
    assert (tmp_path / "out1" / "model.safetensors").read_bytes() == (tmp_path / "out0" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method", ["ties", "della", "dare_ties", "slerp", "multislerp"])
def test_compiled_path_is_byte_identical_across_n_process(tmp_path, family, method):
    outputs = []
    for n in ("1", "2", "3"):
        out = tmp_path / f"out{n}"
        result = run_mergekit("--merge_method", method, "--model_path_list", *family.model_dirs, "--base_model_path",
                              family.base_dir, "--output_path", out, "--n_process", n,
                              env={**os.environ, "LLM_MERGE_NUMBA": "1"})
        assert result.returncode == 0, result.stderr
        outputs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))})
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize("models, method, per_element", [
    ("bf16", "della", "rank tables"),  # streamed: the rank tables of 2 models, at their largest
    ("f32", "della", 24),  # whole-tensor ranks: task vector + ranks + sorted (key, index) pairs and scratch
    ("bf16", "ties", 0),  # streamed trim: histograms only
    ("f32", "ties", 0),
    ("bf16", "linear", 0),
])
def test_memory_estimate_of_whole_tensor_statistics(tmp_path, families, family, models, method, per_element):
    """What decides that a task runs alone across workers (``exclusive``) follows the statistics' real footprint."""
    from llm_merge.kernels import fused as numba_kernels
    from llm_merge.config.options import MergeConfig
    from llm_merge.config.validate import resolve
    from llm_merge.run.engine import MergerFactory
    from llm_merge.plan.build import build_plan


    source = family if models == "bf16" else families["f32"]
    cfg = resolve(MergeConfig(merge_method=method, model_path_list=[str(d) for d in source.model_dirs[:2]],
                              base_model_path=str(source.base_dir), output_path=str(tmp_path / "out")))
    merger = MergerFactory(cfg, compiled=True).bind(tmp_path)()
    for task in build_plan(cfg).tasks:
        if task.mergeable:
            expected = (numba_kernels.StreamingRanks.peak_bytes(2, task.numel, merger.EXCLUSIVE_BYTES) if per_element == "rank tables"
                        else int(per_element * task.numel))
            assert merger.peak_bytes(task) == expected


@pytest.mark.parametrize("method, flags", [("sce", ["--sce_select_topk", "0.35"]), ("sce", []),
                                           ("arcee_fusion", [])])
def test_host_kernels_keep_the_numpy_bytes(tmp_path, family, method, flags):
    """sce's variance keys and exact sums of squares (``NumpyOps.variance_keys`` / ``slot_sums``) compiled."""
    models = family.model_dirs[:1] if method == "arcee_fusion" else family.model_dirs
    outputs = {}
    for numba in ("1", "0"):
        out = tmp_path / f"out{numba}"
        result = run_mergekit("--merge_method", method, "--model_path_list", *models, "--base_model_path",
                              family.base_dir, "--output_path", out, *flags, env={**os.environ, "LLM_MERGE_NUMBA": numba})
        assert result.returncode == 0, result.stderr
        outputs[numba] = {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}
    assert outputs["1"] == outputs["0"]


@pytest.mark.parametrize("method", ["ties", "della"])
def test_kept_mappings_map_each_chunk_once_and_write_the_same_bytes(tmp_path, family, monkeypatch, method):
    """A task that reads its inputs again keeps their mapped chunks from pass to pass (within
    ``KEEP_MAPPED_BYTES``): each chunk is mapped once, and the output bytes are those of mapping per pass."""
    from llm_merge.api import merge
    from llm_merge.config.options import MergeConfig
    from llm_merge.io.reader import TensorReader
    from llm_merge.run.engine import TensorMerger

    monkeypatch.setenv("LLM_MERGE_NUMBA", "1")
    monkeypatch.setattr(TensorMerger, "FUSED_CHUNK", 200)
    mapped = []
    original_map = TensorReader.map_stored
    monkeypatch.setattr(TensorReader, "map_stored", lambda self, info, start, count:
                        mapped.append((info.file, info.start, start)) or original_map(self, info, start, count))

    def run(out, keep_bytes):
        monkeypatch.setattr(TensorMerger, "KEEP_MAPPED_BYTES", keep_bytes)
        mapped.clear()
        merge(MergeConfig(merge_method=method, model_path_list=[str(d) for d in family.model_dirs],
                          base_model_path=str(family.base_dir), output_path=str(out), n_process=1, reserve_p=0.5,
                          quiet=True))
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}, list(mapped)

    kept, kept_maps = run(tmp_path / "kept", 1 << 40)
    again, again_maps = run(tmp_path / "again", 0)
    assert kept == again
    assert kept_maps and len(kept_maps) == len(set(kept_maps))  # every chunk mapped once
    assert len(again_maps) > len(kept_maps)  # mapped again for each pass
