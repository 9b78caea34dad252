"""``numba_ranks.magnitude_ranks_fast`` gives the exact stable descending magnitude ranks.

Reference: order by ``bits & 0x7FFFFFFF`` (the sign bit ignored, NaN patterns just large
integers), largest first, ties by lower index. The internal thresholds are monkeypatched
small so that every path (small sort, direct tables, several runs, split parts, counting,
few distinct lows, radix groups) runs on small inputs.
"""

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")
ranks_module = pytest.importorskip("llm_merge.kernels.ranks")

magnitude_ranks_fast = ranks_module.magnitude_ranks_fast


def expected_ranks(x: np.ndarray) -> np.ndarray:
    key = np.ascontiguousarray(x, dtype=np.float32).ravel().view(np.uint32) & np.uint32(0x7FFFFFFF)
    order = np.argsort(~key, kind="stable")  # ~key ascending = key descending
    ranks = np.empty(key.size, np.uint32)
    ranks[order] = np.arange(key.size, dtype=np.uint32)
    return ranks


def bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def make(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "few":  # a few distinct values, signs mixed, zeros of both signs
        return rng.choice(np.array([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-30], np.float32), n)
    if kind == "bf16":
        return bf16(rng.standard_normal(n) * 0.02)
    if kind == "delta":  # a bf16 fine-tune minus its bf16 base, in float32: many ties
        base = bf16(rng.standard_normal(n) * 0.02)
        return bf16(base + rng.standard_normal(n).astype(np.float32) * 0.001) - base
    if kind == "bits":  # any bit pattern: NaNs, infinities, denormals
        return rng.integers(0, 2**32, n, dtype=np.uint32).view(np.float32)
    if kind == "equal":
        return np.full(n, -3.0, np.float32)
    if kind == "zeros":
        x = np.zeros(n, np.float32)
        x[rng.random(n) < 0.5] = -0.0
        return x
    if kind == "buckets":  # keys spread over three top-16-bit buckets, few low values each
        high = rng.integers(0, 3, n).astype(np.uint32) << 16
        return (high | rng.integers(0, 4, n).astype(np.uint32)).view(np.float32)
    if kind == "special":
        values = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3e38], np.float32)
        values = np.concatenate([values, (np.array([0x7FC00001, 0xFFFFFFFF, 0x7F800001], np.uint32)).view(np.float32)])
        return rng.choice(values, n)
    raise ValueError(kind)


KINDS = ["normal", "few", "bf16", "delta", "bits", "equal", "zeros", "buckets", "special"]

# (small_max, super_max, direct_min, direct_max, samples, fanout, group_max, count_min, few_max)
CONFIGS = {
    "default": None,
    "main": (0, 1 << 25, 1 << 16, 128, 1 << 16, 32, 1 << 16, 1 << 15, 1024),
    "direct": (0, 1 << 25, 8, 128, 1 << 16, 32, 1 << 16, 1 << 15, 1024),
    "direct_runs": (0, 1 << 25, 8, 1, 7, 2, 16, 1 << 20, 0),
    "runs": (0, 40, 1 << 20, 2, 1, 3, 8, 4, 3),
    "tiny_runs": (0, 1, 1, 1, 1, 1, 1, 1, 1),
    "split": (0, 1 << 25, 1 << 20, 128, 1 << 16, 2, 8, 1 << 20, 0),
    "split_count": (0, 1 << 25, 1 << 20, 128, 1 << 16, 3, 32, 16, 0),
    "split_few": (0, 1 << 25, 1 << 20, 128, 1 << 16, 3, 32, 1 << 20, 65535),
    "mixed": (16, 300, 50, 3, 100, 4, 64, 40, 2),
}
NAMES = ("RANK_SMALL_MAX", "RANK_SUPER_MAX", "RANK_DIRECT_MIN", "RANK_DIRECT_MAX", "RANK_SAMPLES",
         "RANK_FANOUT", "RANK_GROUP_MAX", "RANK_COUNT_MIN", "RANK_FEW_MAX")


def configure(monkeypatch, config):
    if CONFIGS[config] is not None:
        for name, value in zip(NAMES, CONFIGS[config]):
            monkeypatch.setattr(ranks_module, name, value)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_stable_argsort(monkeypatch, config, kind):
    configure(monkeypatch, config)
    for n, seed in ((0, 0), (1, 1), (2, 2), (3, 3), (17, 4), (1000, 5), (4099, 6)):
        x = make(kind, n, seed)
        got = magnitude_ranks_fast(x)
        assert got.dtype == np.uint32 and got.shape == (n,)
        np.testing.assert_array_equal(got, expected_ranks(x), err_msg=f"{kind} n={n}")


@pytest.mark.parametrize("config", ["default", "main", "direct", "runs", "mixed"])
def test_larger_inputs_match_stable_argsort(monkeypatch, config):
    configure(monkeypatch, config)
    for kind in ("delta", "normal", "few", "special"):
        x = make(kind, 30_011, seed=11)
        np.testing.assert_array_equal(magnitude_ranks_fast(x), expected_ranks(x), err_msg=kind)


@pytest.mark.parametrize("n", [(1 << 16) - 1, 1 << 16, (1 << 16) + 1])
def test_sizes_around_the_small_threshold(n):
    for kind in ("delta", "normal"):
        x = make(kind, n, seed=n)
        np.testing.assert_array_equal(magnitude_ranks_fast(x), expected_ranks(x))


def test_large_groups_and_big_buckets():
    """Default thresholds on 300k entries: direct tables, counted buckets, radix groups, few lows."""
    rng = np.random.default_rng(12)
    n = 300_000
    x = make("delta", n, seed=12)
    x[rng.random(n) < 0.3] = 0.0  # a huge bucket of one key
    x[:5000] = rng.standard_normal(5000).astype(np.float32)
    np.testing.assert_array_equal(magnitude_ranks_fast(x), expected_ranks(x))
    y = make("normal", n, seed=13) * np.float32(1e-3)
    np.testing.assert_array_equal(magnitude_ranks_fast(y), expected_ranks(y))


def test_multidimensional_and_noncontiguous_input():
    x = make("delta", 6000, seed=14).reshape(60, 100)
    np.testing.assert_array_equal(magnitude_ranks_fast(x), expected_ranks(x))
    np.testing.assert_array_equal(magnitude_ranks_fast(x[:, ::3]), expected_ranks(x[:, ::3]))
