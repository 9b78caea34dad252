"""mergekit's sparsifiers compiled (magnitude, random, della_magprune): streamed statistics and the fused
apply pass give the NumPy methods' bytes (``methods/mergekit_sparsify.py``), and their exact L1 sums."""

import functools
import math

import numpy as np
import pytest

from llm_merge.backends.numpy_backend import NumpyOps
from llm_merge.kernels import l1_sums
from llm_merge.kernels.counter_rng import CounterRNG
from llm_merge.methods import mergekit_sparsify as mk
from llm_merge.run.chunks import run_statistic

kernels = pytest.importorskip("llm_merge.kernels.fused")
from llm_merge.kernels import mergekit_streaming, row_ranks  # noqa: E402 (numba present)

PLAIN = NumpyOps(compiled=False)


def magnitudes(kind: str, n: int, seed: int) -> np.ndarray:
    """float32 values: small normal ones, every binade (subnormals to 2^127), or a coarse grid with zeros."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return (0.01 * rng.normal(size=n)).astype(np.float32)
    if kind == "binades":
        return (2.0 ** rng.uniform(-149, 127.9, size=n) * rng.choice([-1, 1], n)).astype(np.float32)
    x = (np.round(rng.normal(size=n) * 4) / 4).astype(np.float32)
    x[rng.random(n) < 0.01] = 3e38
    return x


@pytest.mark.parametrize("kind", ["normal", "binades", "grid"])
def test_l1_sums_are_correctly_rounded(kind):
    x = np.abs(magnitudes(kind, 20_000, seed=1))
    kept = np.random.default_rng(2).random(x.size) < 0.4
    total, kept_sum = l1_sums.total_and_kept(l1_sums.slot_sums(x, kept))
    assert total == math.fsum(x.astype(np.float64).tolist())
    assert kept_sum == math.fsum(x[kept].astype(np.float64).tolist())


def test_l1_sums_of_nan_and_inf_are_those_of_a_float64_sum():
    assert l1_sums.total_and_kept(l1_sums.slot_sums(np.array([1, np.inf, 2], np.float32))) == (math.inf, math.inf)
    assert all(math.isnan(v) for v in l1_sums.total_and_kept(l1_sums.slot_sums(np.array([np.inf, np.nan], np.float32))))


@pytest.mark.parametrize("kind", ["normal", "binades", "grid"])
def test_compiled_block_sums_equal_the_slot_sums(kind):
    rng = np.random.default_rng(3)
    for n in (1, 5, 1023, 1025, 4000):
        x = magnitudes(kind, n, seed=n)
        x[rng.random(n) < 0.2] = 0
        if kind == "grid" and n > 10:
            x[7] = np.inf
        flags = (rng.random(n) < 0.5).astype(np.uint8)
        sums = np.zeros((mergekit_streaming.SLOT_COPIES, 2 * l1_sums.SLOTS), np.int64)
        mergekit_streaming.add_block_sums(x.view(np.uint32), n, flags, sums)
        expected = l1_sums.slot_sums(np.abs(x), flags.astype(bool))
        assert l1_sums.total_and_kept(sums.sum(axis=0)) == l1_sums.total_and_kept(expected)


@pytest.mark.parametrize("kind", ["normal", "binades", "grid"])
@pytest.mark.parametrize("length", [1, 2, 7, 100, 1500])
def test_row_midranks_equal_numpy(kind, length):
    rows = max(1, 3000 // length)
    t = magnitudes(kind, rows * length, seed=length).reshape(rows, length)
    if kind == "normal":  # bfloat16 task vectors: few distinct magnitudes, some with nonzero low bits
        t = (t.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
        t[:, ::13] *= np.float32(1.001)
    t[0, 0] = -0.0
    expected = mk.row_midranks(np.abs(t)[..., None])[..., 0]
    scratch = row_ranks.RowScratch(length)
    for r in range(rows):
        row_ranks.row_doubled_midranks(t[r].view(np.uint32), scratch.arrays)
        np.testing.assert_array_equal(scratch.doubled[:length] / 2.0, expected[r])


def delta_family(stored: str, n: int, seed: int):
    """(base raw bits or None, raw bits of three models, their float32 task vectors): bfloat16 deltas (few
    distinct magnitudes, ties, zeros, some large), float32 ones, or float32 values on a coarse grid."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    if stored == "bf16":
        base = rng.normal(size=n).astype(ml_dtypes.bfloat16)
        models = [(base.astype(np.float32) + 0.01 * rng.normal(size=n) * (rng.random(n) < 0.8)).astype(ml_dtypes.bfloat16)
                  for _ in range(3)]
        models[2][::97] = (base[::97].astype(np.float32) * 3.1).astype(ml_dtypes.bfloat16)
        deltas = [m.astype(np.float32) - base.astype(np.float32) for m in models]
        return base.view(np.uint16), [m.view(np.uint16) for m in models], deltas
    models = [magnitudes("normal" if stored == "f32" else "grid", n, seed + i) for i in range(3)]
    return None, [m.view(np.uint32) for m in models], models


def chunked(base, raws, chunk):
    n = raws[0].size
    return lambda: (([r[s : s + chunk] for r in raws], base[s : s + chunk] if base is not None else None)
                    for s in range(0, n, chunk))


def with_low_cut(selection: tuple, magnitude: np.ndarray) -> tuple:
    """A streamed magnitude selection with its low cut as an index: a negative one, -1 - s, drops the first
    s entries equal to low (the fused pass finds where they end as it meets them)."""
    low, low_cut, high, high_cut = selection
    if low_cut < 0:
        low_cut = int(np.flatnonzero(magnitude == low)[-low_cut - 2]) + 1
    return low, low_cut, high, high_cut


#: Per-model densities: one model kept whole (density 1), one nearly emptied.
DENSITIES = [[0.6, 0.6, 0.6], [0.3, 1.0, 0.0001]]


@pytest.mark.parametrize("stored", ["bf16", "f32", "grid"])
@pytest.mark.parametrize("densities", DENSITIES)
@pytest.mark.parametrize("rescale", [True, False])
def test_streamed_magnitude_and_random_statistics_equal_numpy(stored, densities, rescale):
    """Selections keep the same entries (ties at the threshold cut by index), L1 factors are equal."""
    n = 6000
    base, raws, deltas = delta_family(stored, n, seed=5)
    options = [{"reserve_p": p} for p in densities]
    magnitude = run_statistic(kernels.StreamingMagnitude(n, options, rescale, block=64), chunked(base, raws, 777))
    keys = [0xF234567890ABCDEF, 5, 6]
    random = run_statistic(kernels.StreamingRandomL1(keys, options, rescale, block=64), chunked(base, raws, 777))
    for i, t in enumerate(deltas):
        expected = mk.magnitude_selection(t, reserve_p=densities[i], rescale=rescale, host=PLAIN, ops=PLAIN)
        if expected["selection"] is None:
            assert magnitude[i]["selection"] is None
        else:
            streamed = with_low_cut(magnitude[i]["selection"], np.abs(t))
            np.testing.assert_array_equal(mk.band_mask(np.abs(t), 0, streamed), mk.band_mask(np.abs(t), 0, expected["selection"]))
        assert magnitude[i]["l1_scale"] == expected["l1_scale"]
        expected = mk.bernoulli_rescale(t, reserve_p=densities[i], rescale=rescale,
                                        rng_at=functools.partial(CounterRNG, keys[i]), ops=PLAIN)
        assert random[i] == expected


def test_streamed_magnitude_gives_up_on_nan():
    """NaN magnitudes: the NumPy method runs instead (and fails as it does)."""
    t = magnitudes("normal", 500, seed=6)
    t[10] = np.nan
    stats = kernels.StreamingMagnitude(500, [{"reserve_p": 0.5}], True, block=64)
    assert run_statistic(stats, chunked(None, [t.view(np.uint32)], 200)) is None


@pytest.mark.parametrize("stored", ["bf16", "f32", "grid"])
@pytest.mark.parametrize("shape", [(6000,), (40, 150), (6000, 1), (2, 3000)])
@pytest.mark.parametrize("rescale", [True, False])
def test_streamed_della_keep_bits_equal_numpy_draws(stored, shape, rescale):
    """Row midranks, keep probabilities and draws as the NumPy method's, rows straddling chunks."""
    n = 6000
    base, raws, deltas = delta_family(stored, n, seed=7)
    options = [{"reserve_p": 0.5, "epsilon": 0.2}, {"reserve_p": 1.0, "epsilon": 0.1}, {"reserve_p": 0.3, "epsilon": 0.25}]
    keys = [11, 0xF0000000000000F5, 13]
    stats = kernels.StreamingRowKeep.create(n, shape, keys, options, rescale)
    streamed = run_statistic(stats, chunked(base, raws, 1111))
    for i, t in enumerate(deltas):
        expected = mk.row_keep_probabilities(t, reserve_p=options[i]["reserve_p"], epsilon=options[i]["epsilon"],
                                             rescale=rescale, shape=shape, rng_at=functools.partial(CounterRNG, keys[i]),
                                             ops=PLAIN)
        assert streamed[i]["l1_scale"] == expected["l1_scale"]
        drawn = row_ranks.keep_bits(expected, keys[i], n)  # the NumPy method's keep probabilities, drawn
        if drawn is None:
            assert streamed[i]["keep_mask"] is None
        else:
            np.testing.assert_array_equal(streamed[i]["keep_mask"], drawn)
            kept = np.unpackbits(drawn, bitorder="little")[:n].astype(bool)
            np.testing.assert_array_equal(kept, CounterRNG(keys[i], 0).keep(expected["keep_prob"], n))


def test_della_declines_tensors_it_does_not_stream():
    options = [{"reserve_p": 0.5, "epsilon": 0.1}]
    assert kernels.StreamingRowKeep.create(24, (2, 3, 4), [1], options, True) is None  # ranks along a strided dim
    assert kernels.StreamingRowKeep.create(0, (0, 8), [1], options, True) is None
    assert kernels.StreamingRowKeep.create(8, (8,), [1], options, True) is not None


@pytest.mark.parametrize("sparsify_type", ["random", "magnitude", "della_magprune"])
@pytest.mark.parametrize("merge_type", ["ties", "linear"])
@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "numpy-statistics"])
def test_fused_apply_equals_the_numpy_sparsifier_and_merge(sparsify_type, merge_type, streamed, monkeypatch):
    """The fused pass over raw bfloat16 chunks, cache blocks straddling chunks and the magnitude cut,
    equals the registered NumPy functions chunk by chunk, with the streamed statistics or the NumPy
    method's own."""
    from llm_merge import methods

    monkeypatch.setattr(kernels.FusedChunks, "BLOCK", 40)
    n, chunk = 3000, 700
    base, raws, deltas = delta_family("bf16", n, seed=9)
    options = dict(reserve_p=0.5, epsilon=0.2, rescale=True, weight_list=[0.7, 0.5, 0.3], normalize=True,
                   ties_elect_type="sum")
    model_options = [{**options, "reserve_p": p} for p in (0.5, 1.0, 0.3)]
    keys = [21, 22, 23]
    spec = methods.get("sparsify", sparsify_type)
    prepared = []
    for i, t in enumerate(deltas):
        values = dict(reserve_p=model_options[i]["reserve_p"], epsilon=0.2, rescale=True, shape=(30, 100), host=PLAIN,
                      ops=PLAIN, rng_at=functools.partial(CounterRNG, keys[i]))
        prepared.append(spec.prepare(t, **{k: values[k] for k in mk_params(spec.prepare)}))
    if streamed:
        statistic = NumpyOps().streaming_prepare(sparsify_type, k=3, numel=n, options=options, budget=1 << 28,
                                                 model_options=model_options, keys=keys, shape=(30, 100))
        applied = run_statistic(statistic, chunked(base, raws, chunk))
    fused = kernels.FusedChunks(sparsify_type=sparsify_type, merge_type=merge_type, keys=keys,
                                prepared=applied if streamed else prepared, numel=n, options=options,
                                model_options=model_options)
    out = np.empty(n, np.uint32)
    for start in range(0, n, chunk):
        fused.run([r[start : start + chunk] for r in raws], base[start : start + chunk], start, out[start : start + chunk])
    merge = methods.get("merge", merge_type).fn
    expected = np.empty(n, np.float32)
    for start in range(0, n, chunk):
        ys = []
        for i, t in enumerate(deltas):
            stats = {k: (v[start : start + chunk] if getattr(v, "shape", None) == (n,) else v) for k, v in prepared[i].items()}
            values = dict(stats, reserve_p=model_options[i]["reserve_p"], rng=CounterRNG(keys[i], start), start=start,
                          ops=PLAIN)
            ys.append(spec.fn(t[start : start + chunk].copy(), **{k: values[k] for k in mk_params(spec.fn)}))
        values = dict(weight_list=options["weight_list"], normalize=True, ties_elect_type="sum", ops=PLAIN)
        expected[start : start + chunk] = merge(ys, **{k: values[k] for k in mk_params(merge)})
    base_values = (base.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(out, (expected + base_values).view(np.uint32))


def mk_params(fn) -> tuple:
    from llm_merge.methods.registry import keyword_params

    return keyword_params(fn)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """One family (same seed) stored as bfloat16, float16 and float32, 3 fine-tunes each."""
    import ml_dtypes

    from checkpoints import make_llama_family

    return {name: make_llama_family(tmp_path_factory.mktemp(name), n_models=3, dtype=dtype, shards=2)
            for name, dtype in (("bf16", ml_dtypes.bfloat16), ("f16", np.float16), ("f32", np.float32))}


SPARSIFIER = {"ties": "magnitude", "dare_ties": "random", "dare_linear": "random", "della": "della_magprune",
              "della_linear": "della_magprune"}
MERGES = [  # (method, models, base, output dtype, options): mixes of dtypes, per-model densities and epsilons
    ("ties", "bf16", "bf16", None, dict(reserve_p=0.4)),
    ("ties", "f32", None, "bfloat16", dict(reserve_p_list=[0.3, 1.0, 0.7], rescale=True)),
    ("dare_ties", "bf16", "f32", None, dict(reserve_p=0.6)),
    ("dare_linear", "f16", "f16", None, dict(reserve_p_list=[0.3, 1.0, 0.7])),
    ("della", "bf16", "bf16", None, dict(reserve_p=0.5, epsilon=0.2)),
    ("della_linear", "f32", "bf16", "float16", dict(reserve_p_list=[0.4, 1.0, 0.6], epsilon_list=[0.1, 0.05, 0.3],
                                                     rescale=True)),
    ("della", "f16", None, None, dict(reserve_p=0.5, epsilon=0.1, rescale=False)),
]
#: PaddleNLP semantics with per-model densities and epsilons: on the fused path as well.
PER_MODEL_PADDLENLP = [
    ("ties", "bf16", "bf16", None, dict(reserve_p_list=[0.3, 1.0, 0.7])),
    ("dare_linear", "f32", "bf16", None, dict(reserve_p_list=[0.3, 1.0, 0.7])),
    ("della", "bf16", "bf16", None, dict(reserve_p_list=[0.4, 0.9, 0.6], epsilon_list=[0.1, 0.05, 0.3])),
]


@pytest.mark.parametrize("semantics, method, models, base, output_dtype, options",
                         [("mergekit", *case) for case in MERGES] + [("paddlenlp", *case) for case in PER_MODEL_PADDLENLP])
def test_compiled_mergekit_merges_write_the_numpy_bytes(tmp_path, families, monkeypatch, semantics, method, models, base,
                                                        output_dtype, options):
    """``--semantics mergekit`` through the fused pass (chunks and cache blocks smaller than tensors, rows
    straddling chunks) writes exactly the plain NumPy path's bytes; so do per-model densities in either
    semantics."""
    from llm_merge.api import merge
    from llm_merge.config.options import METHOD_TABLE, MergeConfig
    from llm_merge.run.engine import TensorMerger

    fused_sparsifiers = []
    real_init = kernels.FusedChunks.__init__

    def recording_init(self, **constants):
        fused_sparsifiers.append(constants["sparsify_type"])
        real_init(self, **constants)

    monkeypatch.setattr(kernels.FusedChunks, "__init__", recording_init)
    monkeypatch.setattr(TensorMerger, "FUSED_CHUNK", 300)
    monkeypatch.setattr(kernels.FusedChunks, "BLOCK", 40)

    def run(out, numba):
        monkeypatch.setenv("LLM_MERGE_NUMBA", numba)
        merge(MergeConfig(merge_method=method, model_path_list=[str(d) for d in families[models].model_dirs],
                          base_model_path=str(families[base].base_dir) if base else None, output_path=str(out),
                          output_dtype=output_dtype, semantics=semantics, quiet=True, **options))
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    compiled = run(tmp_path / "compiled", "1")
    expected = SPARSIFIER[method] if semantics == "mergekit" else METHOD_TABLE[method][0]
    assert fused_sparsifiers and set(fused_sparsifiers) == {expected}
    assert compiled == run(tmp_path / "numpy", "0")


@pytest.mark.parametrize("method", ["della", "ties"])
def test_tensors_the_statistics_do_not_stream_still_write_the_numpy_bytes(tmp_path, monkeypatch, method):
    """A 3-D tensor (della ranks along a strided dim: the NumPy keep probabilities, drawn into keep bits for
    the fused pass) and NaN inputs (magnitude's streamed selection gives up) take the NumPy statistics."""
    from checkpoints import write_checkpoint
    from llm_merge.api import merge
    from llm_merge.config.options import MergeConfig

    rng = np.random.default_rng(10)
    base = {"w3": rng.normal(size=(4, 30, 5)).astype(np.float32), "w2": rng.normal(size=(20, 6)).astype(np.float32)}
    dirs = [write_checkpoint(tmp_path / "base", base)]
    for i in range(2):
        model = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
        if method == "ties" and i == 1:
            model["w2"][3, 4] = np.nan
        dirs.append(write_checkpoint(tmp_path / f"m{i}", model))

    def run(out, numba):
        monkeypatch.setenv("LLM_MERGE_NUMBA", numba)
        cfg = MergeConfig(merge_method=method, model_path_list=[str(d) for d in dirs[1:]], base_model_path=str(dirs[0]),
                          output_path=str(out), semantics="mergekit", reserve_p=0.5, epsilon=0.2, quiet=True)
        try:
            merge(cfg)
        except Exception as exc:  # noqa: BLE001 (magnitude of NaN: whatever the NumPy method does, both do)
            return type(exc).__name__
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    assert run(tmp_path / "compiled", "1") == run(tmp_path / "numpy", "0")


def test_compiled_mergekit_merges_are_byte_identical_across_n_process(tmp_path, families):
    import os

    from conftest import run_mergekit

    outputs = []
    for n in ("1", "2"):
        out = tmp_path / f"out{n}"
        result = run_mergekit("--merge_method", "della", "--semantics", "mergekit", "--model_path_list",
                              *families["bf16"].model_dirs, "--base_model_path", families["bf16"].base_dir,
                              "--reserve_p_list", "0.4", "0.6", "0.5", "--output_path", out, "--n_process", n,
                              env={**os.environ, "LLM_MERGE_NUMBA": "1"})
        assert result.returncode == 0, result.stderr
        outputs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))})
    assert outputs[0] == outputs[1]


def test_fused_magnitude_that_counts_dropped_entries_needs_chunks_in_order():
    from llm_merge.errors import MergeError

    base, raws, _ = delta_family("bf16", 2000, seed=12)
    options = dict(reserve_p=0.5, epsilon=0.1, rescale=True, weight_list=[1.0] * 3, normalize=True, ties_elect_type="sum")
    selection = (0.0, -5, math.inf, 2000)  # the first 4 zeros dropped: counted as the pass meets them
    fused = kernels.FusedChunks(sparsify_type="magnitude", merge_type="linear", keys=[1, 2, 3], numel=2000,
                                options=options, prepared=[{"selection": selection, "l1_scale": 1.0}] * 3)
    out = np.empty(1000, np.uint16)
    with pytest.raises(MergeError, match="out of order"):
        fused.run([r[1000:] for r in raws], base[1000:], 1000, out)
