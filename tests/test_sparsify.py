"""Sparsifiers: hand-computed cases and statistical properties of the random ones."""

import numpy as np
import pytest

from llm_merge import methods
from llm_merge.backends.numpy_backend import NumpyOps
from llm_merge.kernels.counter_rng import CounterRNG, draw_key, splitmix64
from llm_merge.methods.sparsify import trim_count

OPS = NumpyOps()
T = np.array([0.1, -0.5, 0.3, -0.3, 0.05], dtype=np.float32)


def sparsify(name, t, key=1, offset=0, **params):
    method = methods.get("sparsify", name)
    t = np.asarray(t, dtype=np.float32)
    extra = {}
    if method.prepare:
        prepare_params = {k: params[k] for k in ("reserve_p", "rescale") if k in methods.registry.keyword_params(method.prepare)}
        extra = method.prepare(t, ops=OPS, **prepare_params)
    names = method.params
    kwargs = {k: v for k, v in {**params, **extra, "rng": CounterRNG(key, offset), "numel": t.size}.items() if k in names}
    return method.fn(t, ops=OPS, **kwargs)


def f32(values):
    return np.array(values, dtype=np.float32)


def test_trim_keeps_k_largest_and_ties_at_threshold():
    np.testing.assert_array_equal(sparsify("trim", T, reserve_p=0.6, rescale=False), f32([0, -0.5, 0.3, -0.3, 0]))
    # k = 2, but both 0.3 entries tie at the threshold: both kept.
    np.testing.assert_array_equal(sparsify("trim", T, reserve_p=0.4, rescale=False), f32([0, -0.5, 0.3, -0.3, 0]))
    np.testing.assert_array_equal(sparsify("trim", T, reserve_p=0.2, rescale=False), f32([0, -0.5, 0, 0, 0]))


def test_trim_rescale_keeps_l1_mass():
    out = sparsify("trim", T, reserve_p=0.6, rescale=True)
    np.testing.assert_allclose(out, np.array([0, -0.5, 0.3, -0.3, 0]) * (1.25 / 1.1), rtol=1e-6)
    assert np.abs(out).sum() == pytest.approx(np.abs(T).sum(), rel=1e-6)


def test_trim_count_ignores_float_noise():
    assert trim_count(0.7, 10) == 7  # 0.7 * 10 == 7.000000000000001 in float64
    assert trim_count(0.3, 10) == 3
    assert trim_count(0.01, 10) == 1
    assert trim_count(1.0, 10) == 10


def test_dare_reserve_one_is_identity():
    t = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    np.testing.assert_array_equal(sparsify("dare", t, reserve_p=1.0, rescale=True), t)


def test_dare_keeps_fraction_and_rescales_kept_entries():
    t = np.random.default_rng(0).normal(size=200_000).astype(np.float32) + 3
    out = sparsify("dare", t, reserve_p=0.3, rescale=True)
    kept = out != 0
    assert kept.mean() == pytest.approx(0.3, abs=0.005)
    np.testing.assert_array_equal(out[kept], t[kept] / np.float32(0.3))
    raw = sparsify("dare", t, reserve_p=0.3, rescale=False)
    np.testing.assert_array_equal(raw[kept], t[kept])
    np.testing.assert_array_equal(raw != 0, kept)


def test_dare_is_unbiased_over_seeds():
    t = np.linspace(-1, 1, 50, dtype=np.float32)
    mean = np.mean([sparsify("dare", t, key=draw_key(seed, "w", 0), reserve_p=0.4, rescale=True) for seed in range(4000)], axis=0)
    np.testing.assert_allclose(mean, t, atol=0.06)


def test_dare_draws_do_not_depend_on_chunking():
    t = np.random.default_rng(3).normal(size=1000).astype(np.float32)
    whole = sparsify("dare", t, key=7, reserve_p=0.5, rescale=True)
    parts = [sparsify("dare", t[s : s + 300], key=7, offset=s, reserve_p=0.5, rescale=True) for s in range(0, 1000, 300)]
    np.testing.assert_array_equal(whole, np.concatenate(parts))


def test_splitmix64_matches_reference_values():
    # splitmix64 seeded with 0 yields these first outputs (published test vector).
    np.testing.assert_array_equal(
        splitmix64(0, 0, 3), np.array([0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F], dtype=np.uint64)
    )


def test_draw_key_depends_on_seed_tensor_and_model():
    keys = {draw_key(s, n, i) for s in (0, 1) for n in ("a", "b") for i in (0, 1)}
    assert len(keys) == 8


def test_magnitude_midranks_share_ties():
    """|T| = 0.1, 0.5, 0.3, 0.3, 0.05: ranks 3, 0, 1.5, 1.5, 4 (the two 0.3 span ranks 1 and 2), doubled."""
    np.testing.assert_array_equal(OPS.doubled_midranks(np.abs(T)), [6, 0, 3, 3, 8])
    np.testing.assert_array_equal(NumpyOps(compiled=False).doubled_midranks(T), [6, 0, 3, 3, 8])


def _counted_midranks(x):
    """Doubled midranks by binary search in the sorted magnitude keys (float32 bits, sign cleared)."""
    keys = np.asarray(x, np.float32).ravel().view(np.uint32) & np.uint32(0x7FFFFFFF)
    ascending = np.sort(keys)
    below = np.searchsorted(ascending, keys, side="left")
    not_above = np.searchsorted(ascending, keys, side="right")
    return 2 * (keys.size - not_above) + (not_above - below) - 1


def _bfloat16_deltas(n, mixed_fraction, seed):
    """Differences of bfloat16 values (mostly exact in bfloat16: plain keys), with ``mixed_fraction`` of
    the entries given low mantissa bits, and zeros, -0, subnormals, infinities and NaN among them."""
    rng = np.random.default_rng(seed)
    t = (rng.normal(scale=1e-3, size=n).astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    mixed = rng.random(n) < mixed_fraction
    t[mixed] = (t[mixed].view(np.uint32) | rng.integers(1, 4, mixed.sum(), dtype=np.uint32)).view(np.float32)
    t[::97] = 0.0
    t[1::101] = -0.0
    t[2:40:3] = [1e-41, -1e-41, np.inf, -np.inf, np.nan, -np.nan, 3e38, 1e-45, -1e-45, 5e-39, 5e-39, 7.0, -7.0]
    return t


@pytest.mark.parametrize("mixed_fraction", [0.0, 0.01, 0.5, 1.0])
def test_numpy_midranks_match_counted_ones(mixed_fraction):
    """Plain NumPy ranks plain keys by bucket counts and sorts the mixed ones, or sorts every key where
    most are mixed: the same ranks either way, mixed keys tying with each other and sharing buckets with
    plain ones."""
    t = _bfloat16_deltas(30_011, mixed_fraction, seed=int(mixed_fraction * 100))
    np.testing.assert_array_equal(NumpyOps(compiled=False).doubled_midranks(t), _counted_midranks(t))


@pytest.mark.parametrize("compiled", [True, False])
def test_magprune_keeps_tied_rows_at_one_rate(compiled):
    """All |t| equal (bf16 deltas tie massively): the first and the last rows keep entries at the same rate,
    p on average, where ranks by index would keep the first rows at p + eps/2 and the last at p - eps/2."""
    ops = NumpyOps(compiled=compiled)
    rows, cols, p, eps = 64, 256, 0.5, 0.4
    t = np.where(np.random.default_rng(3).random((rows, cols)) < 0.5, 0.01, -0.01).astype(np.float32).ravel()
    prepared = methods.get("sparsify", "magprune").prepare(t, ops=ops)
    magprune = ops.kernel("sparsify", "magprune") or methods.get("sparsify", "magprune").fn
    kept = np.zeros(rows * cols)
    draws = 200
    for seed in range(draws):
        out = magprune(t, **prepared, numel=t.size, reserve_p=p, epsilon=eps, rescale=False, rng=CounterRNG(seed, 0),
                       ops=ops)
        kept += out != 0
    by_row = kept.reshape(rows, cols).mean(axis=1) / draws
    first, last = by_row[:8].mean(), by_row[-8:].mean()  # 8 x 256 x 200 draws each: sd ~0.0025
    assert abs(first - last) < 0.015 and abs(first - p) < 0.015 and abs(last - p) < 0.015, (first, last)


def test_magprune_expected_kept_count_is_unchanged_by_midranks():
    """Midranks sum like 0..n-1, so the keep probabilities sum to n p + eps / 2, as with any order of ties."""
    t = np.round(np.random.default_rng(4).normal(size=10_001), 1).astype(np.float32)  # heavy ties
    t[t == 0] = 0.1  # a kept entry shows as nonzero
    n, p, eps = t.size, 0.4, 0.3
    ranks = OPS.doubled_midranks(np.abs(t)).astype(np.float64) * 0.5
    keep = (p + eps / 2) - ranks * (eps / n)
    assert keep.sum() == pytest.approx(n * p + eps / 2, rel=1e-12)
    kept = np.mean([np.count_nonzero(sparsify("magprune", t, key=seed, reserve_p=p, epsilon=eps, rescale=False))
                    for seed in range(40)])
    assert kept == pytest.approx(n * p + eps / 2, abs=4 * np.sqrt(n * p * (1 - p) / 40))


def test_magprune_epsilon_zero_is_dare_like():
    t = np.random.default_rng(1).normal(size=100_000).astype(np.float32)
    out = sparsify("magprune", t, reserve_p=0.6, epsilon=0.0, rescale=True)
    kept = out != 0
    assert kept.mean() == pytest.approx(0.6, abs=0.01)
    np.testing.assert_allclose(out[kept], t[kept] / np.float32(0.6), rtol=1e-6)


def test_magprune_keep_rate_follows_rank():
    n = 20
    t = np.arange(n, 0, -1, dtype=np.float32)  # rank r at index r
    p, eps = 0.5, 0.4
    kept = np.mean([sparsify("magprune", t, key=draw_key(s, "w", 0), reserve_p=p, epsilon=eps, rescale=False) != 0 for s in range(6000)], axis=0)
    expected = 1 - ((1 - p) - eps / 2 + eps * np.arange(n) / n)
    np.testing.assert_allclose(kept, expected, atol=0.03)


def test_magprune_rescale_is_unbiased():
    t = np.linspace(0.1, 2, 16, dtype=np.float32)
    mean = np.mean([sparsify("magprune", t, key=draw_key(s, "w", 1), reserve_p=0.5, epsilon=0.3, rescale=True) for s in range(6000)], axis=0)
    np.testing.assert_allclose(mean, t, rtol=0.08)


def test_sparsifiers_do_not_modify_input():
    t = T.copy()
    for name, params in (("dare", dict(reserve_p=0.5, rescale=True)), ("trim", dict(reserve_p=0.5, rescale=True)),
                         ("magprune", dict(reserve_p=0.5, epsilon=0.2, rescale=True))):
        sparsify(name, t, **params)
        np.testing.assert_array_equal(t, T)
