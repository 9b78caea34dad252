"""Compiled kernels give the same bits as the NumPy methods they replace."""

import numpy as np
import pytest

from llm_merge import methods
from llm_merge.backends.numpy_backend import NumpyOps
from llm_merge.run.engine import TensorMerger
from llm_merge.kernels.counter_rng import CounterRNG

kernels = pytest.importorskip("llm_merge.kernels.fused")
OPS = NumpyOps()
TABLE_BUDGET = TensorMerger.EXCLUSIVE_BYTES  # what the engine gives the rank tables


def data(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=n).astype(np.float32)
    t[::7] = 0
    ties = t[2::13]
    t[1 : 1 + 13 * ties.size : 13] = -ties  # magnitude ties with sign conflicts
    t[3] = -0.0
    return t


@pytest.mark.parametrize("reserve_p, rescale", [(0.3, True), (0.7, False), (1.0, True)])
def test_dare(reserve_p, rescale):
    t = data()
    key = 0xF234567890ABCDEF  # above 2**63
    expected = methods.get("sparsify", "dare").fn(t, reserve_p=reserve_p, rescale=rescale, rng=CounterRNG(key, 1234), ops=OPS)
    got = kernels.dare(t, reserve_p=reserve_p, rescale=rescale, rng=CounterRNG(key, 1234), ops=OPS)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("rescale", [True, False])
def test_magprune(rescale):
    t = data()
    ranks = OPS.doubled_midranks(np.abs(t))[100:1100]
    chunk = t[100:1100]
    kwargs = dict(doubled_midranks=ranks, numel=t.size, reserve_p=0.6, epsilon=0.3, rescale=rescale, ops=OPS)
    expected = methods.get("sparsify", "magprune").fn(chunk, rng=CounterRNG(0xF0000000000000F5, 100), **kwargs)
    got = kernels.magprune(chunk, rng=CounterRNG(0xF0000000000000F5, 100), **kwargs)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("l1_scale", [1.0, 1.37])
def test_trim(l1_scale):
    t = data()
    threshold = float(np.sort(np.abs(t))[-1000])
    expected = methods.get("sparsify", "trim").fn(t, threshold=threshold, l1_scale=l1_scale, ops=OPS)
    got = kernels.trim(t, threshold=threshold, l1_scale=l1_scale, ops=OPS)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("k", [1, 2, 17, 2500, 4999, 5000])
def test_kth_largest_matches_partition(k):
    magnitude = np.abs(data())
    assert kernels.kth_largest(magnitude, k) == float(np.sort(magnitude)[-k])


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.6, -0.2, 1.3]])
def test_linear(normalize, weights):
    ys = [data(seed=s) for s in range(3)]
    expected = methods.get("merge", "linear").fn(ys, weight_list=weights, normalize=normalize, ops=OPS)
    got = kernels.linear(ys, weight_list=weights, normalize=normalize, ops=OPS)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("elect", ["sum", "count"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.6, 0.2, 1.3]])
def test_ties(normalize, elect, weights):
    ys = [data(seed=s) for s in range(3)]
    expected = methods.get("merge", "ties").fn(ys, weight_list=weights, normalize=normalize, ties_elect_type=elect, ops=OPS)
    got = kernels.ties(ys, weight_list=weights, normalize=normalize, ties_elect_type=elect, ops=OPS)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("merge, elect", [("linear", "sum"), ("ties", "sum"), ("ties", "count")])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k, with_base", [(2, True), (3, True), (4, False)])
def test_fused_chunk_merges_match_numpy(merge, elect, normalize, k, with_base):
    """The fused chunk pass (float32 lanes, no sparsifier) gives the generic merge plus the base, bit for bit.

    Covers the per-element linear merge and TIES with its election specialized by type, for several
    model counts (compile-time constants there), zeros, -0.0, sign conflicts and a block tail.
    """
    n = 3000  # not a multiple of the block
    base = data(n, seed=20) if with_base else np.zeros(n, np.float32)
    models = [data(n, seed=s) + (base if with_base else 0) for s in range(k)]
    weights = [0.6, 0.2, 1.3, -0.4][:k] if merge == "linear" else [0.6, 0.2, 1.3, 0.9][:k]
    options = dict(reserve_p=1.0, epsilon=0.0, rescale=False, weight_list=weights, normalize=normalize,
                   ties_elect_type=elect)
    fused = kernels.FusedChunks(sparsify_type="none", merge_type=merge, keys=list(range(1, k + 1)), prepared=None,
                                numel=n, options=options)
    out = np.empty(n, np.uint32)
    fused.run([m.view(np.uint32) for m in models], base.view(np.uint32) if with_base else None, 0, out)
    ys = [m - base for m in models] if with_base else models
    kwargs = {"ties_elect_type": elect} if merge == "ties" else {}
    merged = methods.get("merge", merge).fn(ys, weight_list=weights, normalize=normalize, ops=NumpyOps(compiled=False),
                                            **kwargs)
    expected = merged + base if with_base else merged
    np.testing.assert_array_equal(out, expected.view(np.uint32))


def test_engine_uses_kernels_unless_disabled(monkeypatch):
    assert NumpyOps().kernel("merge", "ties") is kernels.ties
    monkeypatch.setenv("LLM_MERGE_NUMBA", "0")
    assert NumpyOps().kernel("merge", "ties") is None


@pytest.mark.parametrize("n", [1, 7, 5000, 70_000])
def test_midranks_are_mean_positions_of_ties(n):
    """Doubled midrank = the first and last positions of the entry's value in descending order, summed."""
    magnitude = np.abs(data(n=max(n, 14), seed=n))[:n]
    descending = np.sort(magnitude)[::-1]
    first = np.searchsorted(-descending, -magnitude, side="left")
    last = np.searchsorted(-descending, -magnitude, side="right") - 1
    np.testing.assert_array_equal(kernels.doubled_midranks(magnitude), first + last)


def test_numpy_fallbacks_match_kernels(monkeypatch):
    monkeypatch.setenv("LLM_MERGE_NUMBA", "0")
    plain = NumpyOps()
    magnitude = np.abs(data(n=20_000, seed=3))
    np.testing.assert_array_equal(plain.doubled_midranks(magnitude), kernels.doubled_midranks(magnitude))
    for k in (1, 333, 20_000):
        assert plain.kth_largest(magnitude, k) == kernels.kth_largest(magnitude, k)


def test_dot64_matches_float64_dot():
    x, y = data(n=100_003, seed=1), data(n=100_003, seed=2)
    expected = float(np.dot(x.astype(np.float64), y.astype(np.float64)))
    assert float(kernels.dot64_kernel(x, y)) == pytest.approx(expected, rel=1e-12)


def test_bf16_conversions_match_ml_dtypes():
    import ml_dtypes

    values = np.concatenate([data(n=50_000, seed=4) * 1e3, np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 3.0e38, -1e-40, 1e-45], np.float32)])
    # Round-to-nearest-even cases: halfway between two bfloat16 values.
    values = np.concatenate([values, (np.arange(1, 200, dtype=np.uint32) << 15 | 0x3F800000).view(np.float32)])
    narrowed = NumpyOps().narrow(values, np.dtype(ml_dtypes.bfloat16))
    expected = values.astype(ml_dtypes.bfloat16)
    finite = np.isfinite(values)
    np.testing.assert_array_equal(narrowed.view(np.uint16)[finite], expected.view(np.uint16)[finite])
    assert np.isnan(narrowed[np.isnan(values)].astype(np.float32)).all()
    out = np.empty(values.size, np.float32)
    assert NumpyOps().widen(expected, out) == 3
    np.testing.assert_array_equal(out[finite], expected.astype(np.float32)[finite])


def test_float16_conversions_match_numpy_bit_for_bit():
    every_half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # NaN payloads and subnormals included
    out = np.empty(every_half.size, np.float32)
    assert NumpyOps().widen(every_half.view(np.float16), out) == 2 * 1024  # 2 signs x (Inf + 1023 NaNs)
    np.testing.assert_array_equal(out.view(np.uint32), every_half.view(np.float16).astype(np.float32).view(np.uint32))

    # every float32 exponent with the significands where rounding decides
    # (the kernel matched NumPy on all 2^32 patterns, checked once outside the suite)
    significands = np.array([0, 1, 0x7FF, 0x800, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x3001, 0x5000, 0x7FE000,
                             0x7FF000, 0x7FFFFF, 0x400000, 0x400001], np.uint32)
    exponents = np.arange(256, dtype=np.uint32) << 23
    structured = (exponents[:, None] | significands[None, :]).ravel()
    random_bits = np.random.default_rng(0).integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    bits = np.concatenate([structured, structured | np.uint32(0x80000000), random_bits])
    with np.errstate(over="ignore"):
        expected = bits.view(np.float32).astype(np.float16).view(np.uint16)
    narrowed = NumpyOps().narrow(bits.view(np.float32), np.dtype(np.float16))
    np.testing.assert_array_equal(narrowed.view(np.uint16), expected)


def test_float32_nonfinite_count():
    x = data(n=1000)
    x[[3, 9, 11]] = [np.nan, np.inf, -np.inf]
    out = np.empty_like(x)
    assert NumpyOps().widen(x, out) == 3
    monkeypatch_free = NumpyOps(compiled=False)
    assert monkeypatch_free.widen(x, out) == 3


def delta_family(stored: str, n: int, seed: int):
    """(base, three fine-tunes, raw lane) stored as bfloat16 or float32: small deltas, zero deltas
    (ties at the bottom) and large ones (nonzero low 16 bits in bfloat16 too)."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    dtype, lane = (ml_dtypes.bfloat16, np.uint16) if stored == "bf16" else (np.float32, np.uint32)
    base = rng.normal(size=n).astype(dtype)
    models = [(base.astype(np.float32) + 0.01 * data(n, s)).astype(dtype) for s in (1, 2, 3)]
    models[1][:500] = base[:500]
    models[2][::97] = (base[::97].astype(np.float32) * 3.1).astype(dtype)
    return base, models, lane


@pytest.mark.parametrize("reserve_p", [0.0001, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("rescale", [True, False])
def test_trim_statistics_match_numpy(reserve_p, rescale):
    t = data(n=30_000, seed=7)
    expected = methods.get("sparsify", "trim").prepare(t, reserve_p=reserve_p, rescale=rescale, ops=NumpyOps(compiled=False))
    got = kernels.trim_threshold(t, reserve_p=reserve_p, rescale=rescale, ops=OPS)
    assert got["threshold"] == expected["threshold"]
    assert got["l1_scale"] == pytest.approx(expected["l1_scale"], rel=1e-13)


def test_magnitude_ranks_of_signed_values():
    t = data(n=10_000, seed=8)
    expected = methods.get("sparsify", "magprune").prepare(t, ops=NumpyOps(compiled=False))["doubled_midranks"]
    np.testing.assert_array_equal(kernels.magnitude_ranks(t, ops=OPS)["doubled_midranks"], expected)


@pytest.mark.parametrize("reserve_p", [0.0001, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("stored", ["bf16", "f32"])
def test_streaming_trim_matches_numpy(reserve_p, rescale, with_base, stored):
    """Passes over raw chunks give every model's exact threshold and its L1 scale.

    bfloat16 weights give deltas with zero low bits (one pass suffices); float32 ones need pass 2.
    Odd chunk and block lengths: the histogram counts entries in pairs, and a block may end on half a pair.
    """
    n, chunk = 30_000, 7_001
    base, models, lane = delta_family(stored, n, seed=11)
    stream = kernels.StreamingTrim(3, n, reserve_p, rescale, block=97)
    passes = 0
    while stream.wants(passes):
        for start in range(0, n, chunk):
            raws = [m[start : start + chunk].view(lane) for m in models]
            stream.feed(passes, raws, base[start : start + chunk].view(lane) if with_base else None)
        stream.end_pass(passes)
        passes += 1
    if stored == "f32" and reserve_p < 1:
        assert passes == 2
    plain = NumpyOps(compiled=False)
    for model, got in zip(models, stream.statistics()):
        t = model.astype(np.float32) - (base.astype(np.float32) if with_base else 0)
        expected = methods.get("sparsify", "trim").prepare(t, reserve_p=reserve_p, rescale=rescale, ops=plain)
        assert got["threshold"] == expected["threshold"]
        assert got["l1_scale"] == pytest.approx(expected["l1_scale"], rel=1e-13)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("stored", ["bf16", "f32"])
def test_streamed_ranks_match_whole_tensor_ranks(with_base, stored, monkeypatch):
    """MAGPRUNE with ranks counted from rank tables, chunk by chunk, equals it with whole-tensor ranks.

    Output in float32 with rescale: a rank off by a half changes the kept entries' divisor, visibly.
    Covers plain entries (zero low bits, bfloat16 deltas), mixed ones (nonzero low bits: large
    bfloat16 deltas, every float32 delta), repeated mixed values, zero deltas and NaN (a large key),
    and blocks that straddle chunks. Whole float32 task vectors are ranked by sorting: the two
    implementations check each other.
    """
    monkeypatch.setattr(kernels.StreamingRanks, "MIXED_FRACTION_MAX", 1.0)
    monkeypatch.setattr(kernels.FusedChunks, "BLOCK", 96)
    n, chunk = 30_000, 7_000
    base, models, lane = delta_family(stored, n, seed=13)
    models[2][5::97] = models[2][::97]  # some large deltas repeated
    models[0][[3, 4000]] = np.nan

    def chunks():
        for start in range(0, n, chunk):
            raws = [m[start : start + chunk].view(lane) for m in models]
            yield start, raws, base[start : start + chunk].view(lane) if with_base else None

    stream = kernels.StreamingRanks(3, n, block=97, budget=TABLE_BUDGET)  # odd: blocks end on half a pair
    for _, raws, base_raw in chunks():
        stream.feed(0, raws, base_raw)
    task_vectors = [m.astype(np.float32) - (base.astype(np.float32) if with_base else 0) for m in models]
    options = dict(reserve_p=0.5, epsilon=0.4, rescale=True, weight_list=[1.0] * 3, normalize=True,
                   ties_elect_type="sum")
    outputs = []
    for prepared in (stream.statistics(), [{"doubled_midranks": kernels.magnitude_midranks(t)} for t in task_vectors]):
        fused = kernels.FusedChunks(sparsify_type="magprune", merge_type="linear", keys=[1, 2, 3], prepared=prepared,
                                    numel=n, options=options)
        out = np.empty(n, np.uint32)  # float32 bits
        for start, raws, base_raw in chunks():
            fused.run(raws, base_raw, start, out[start : start + chunk])
        outputs.append(out)
    assert prepared and fused.tables[0][1].size == 0  # the second run ranked whole tensors
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_streamed_ranks_give_up_when_most_entries_are_mixed():
    """Float32 deltas are all mixed: past the limit the statistics are None (whole-tensor ranks instead)."""
    rng = np.random.default_rng(14)
    models = [rng.normal(size=5000).astype(np.float32) for _ in range(2)]
    stream = kernels.StreamingRanks(2, 5000, block=64, budget=TABLE_BUDGET)
    stream.feed(0, [m.view(np.uint32) for m in models], None)
    assert stream.statistics() is None


def test_streamed_ranks_take_larger_bfloat16_deltas_within_a_memory_budget():
    """Up to MIXED_FRACTION_MAX of the entries may be mixed, less where the tables would outgrow the budget."""
    import ml_dtypes

    ranks, budget = kernels.StreamingRanks, TABLE_BUDGET
    assert ranks.mixed_fraction_limit(3, 6_291_456, budget) == ranks.MIXED_FRACTION_MAX  # a 6.3M-element projection
    assert ranks.mixed_fraction_limit(3, 1 << 40, budget) == ranks.MIXED_FRACTION_MIN
    middle = ranks.mixed_fraction_limit(3, 49_152_000, budget)  # a 49M-element embedding
    assert ranks.MIXED_FRACTION_MIN < middle < ranks.MIXED_FRACTION_MAX
    assert ranks.peak_bytes(3, 49_152_000, budget) == int(ranks.BYTES_PER_MIXED * middle * 3 * 49_152_000)
    assert ranks.peak_bytes(3, 49_152_000, budget) <= budget

    rng = np.random.default_rng(15)
    n = 20_000
    base = rng.normal(size=n).astype(ml_dtypes.bfloat16)
    for scale, streams in ((0.2, True), (1.0, False)):  # about 10% and 37% of the deltas are mixed
        model = (base.astype(np.float32) + scale * rng.normal(size=n)).astype(ml_dtypes.bfloat16)
        delta = model.astype(np.float32) - base.astype(np.float32)
        mixed = np.mean(delta.view(np.uint32) & 0xFFFF != 0)
        assert (mixed < ranks.MIXED_FRACTION_MAX) == streams and mixed > 1 / 32
        stream = ranks(1, n, block=64, budget=budget)
        stream.feed(0, [model.view(np.uint16)], base.view(np.uint16))
        assert (stream.statistics() is not None) == streams


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("with_base", [True, False])
def test_streaming_gram_sums_match_numpy(with_base, k):
    import ml_dtypes

    rng = np.random.default_rng(12)
    n, chunk = 20_000, 3_000
    base = rng.normal(size=n).astype(ml_dtypes.bfloat16)
    models = [(base.astype(np.float32) + 0.01 * data(n, seed)).astype(ml_dtypes.bfloat16) for seed in (4, 5, 6)[:k]]
    stream = kernels.StreamingGramSums(k, block=64)
    for start in range(0, n, chunk):
        stream.feed(0, [m[start : start + chunk].view(np.uint16) for m in models],
                    base[start : start + chunk].view(np.uint16) if with_base else None)
    stream.end_pass(0)
    ys = [m.astype(np.float32) - (base.astype(np.float32) if with_base else 0) for m in models]
    expected = methods.get("merge", "multislerp").reduce(ys, ops=NumpyOps(compiled=False))["sums"]
    np.testing.assert_allclose(stream.statistics()["sums"], expected, rtol=1e-12)
