"""``kernels.ranks.magnitude_midranks`` and ``NumpyOps.doubled_midranks`` give the exact doubled midranks.

Reference: by ``bits & 0x7FFFFFFF`` (the sign bit ignored, NaN patterns just large integers),
2 #{larger} + #{equal} - 1, counted by sorting (independent of the table code).
"""

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")
ranks_module = pytest.importorskip("llm_merge.kernels.ranks")

magnitude_midranks = ranks_module.magnitude_midranks


def expected_ranks(x: np.ndarray) -> np.ndarray:
    key = np.ascontiguousarray(x, dtype=np.float32).ravel().view(np.uint32) & np.uint32(0x7FFFFFFF)
    ascending = np.sort(key)
    at_most = np.searchsorted(ascending, key, side="right")
    equal = at_most - np.searchsorted(ascending, key, side="left")
    return (2 * (key.size - at_most) + equal - 1).astype(np.uint32)


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
    if kind == "dense":  # one bucket with thousands of distinct low values
        return ((np.uint32(0x3F80) << 16) | rng.integers(1, 1 << 16, n).astype(np.uint32)).view(np.float32)
    if kind == "special":
        values = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3e38], np.float32)
        values = np.concatenate([values, (np.array([0x7FC00001, 0xFFFFFFFF, 0x7F800001], np.uint32)).view(np.float32)])
        return rng.choice(values, n)
    raise ValueError(kind)


KINDS = ["normal", "few", "bf16", "delta", "bits", "equal", "zeros", "buckets", "dense", "special"]


@pytest.mark.parametrize("path", ["tables", "sorted", "either"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_counted_midranks(kind, path, monkeypatch):
    """Both ways to rank (rank tables; sorting when most entries are mixed) against the reference."""
    from llm_merge.backends.numpy_backend import NumpyOps

    if path != "either":
        monkeypatch.setattr(ranks_module, "SORTED_MIXED_FRACTION", 2.0 if path == "tables" else -1.0)
    plain = NumpyOps(compiled=False)
    for n, seed in ((0, 0), (1, 1), (2, 2), (3, 3), (17, 4), (1000, 5), (70_001, 6)):
        x = make(kind, n, seed)
        expected = expected_ranks(x)
        got = magnitude_midranks(x)
        assert got.dtype == np.uint32 and got.shape == (n,)
        np.testing.assert_array_equal(got, expected, err_msg=f"{kind} n={n}")
        np.testing.assert_array_equal(plain.doubled_midranks(x), expected, err_msg=f"NumPy {kind} n={n}")


def test_ties_share_one_rank_and_ranks_sum_as_a_permutation():
    """Equal magnitudes (any sign) get one rank; the ranks add up to those of 0..n-1 (doubled)."""
    x = make("delta", 50_000, seed=7)
    got = magnitude_midranks(x).astype(np.int64)
    key = x.view(np.uint32) & np.uint32(0x7FFFFFFF)
    for value in np.unique(key)[:50]:
        assert np.unique(got[key == value]).size == 1
    assert got.sum() == x.size * (x.size - 1)
    assert magnitude_midranks(np.full(9, -2.0, np.float32)).tolist() == [8] * 9  # all tie: rank (n-1)/2


def test_multidimensional_and_noncontiguous_input():
    x = make("delta", 6000, seed=14).reshape(60, 100)
    np.testing.assert_array_equal(magnitude_midranks(x), expected_ranks(x))
    np.testing.assert_array_equal(magnitude_midranks(x[:, ::3]), expected_ranks(x[:, ::3]))


@pytest.mark.parametrize("kind", ["normal", "delta", "bits", "buckets", "dense", "special"])
@pytest.mark.parametrize("m", [1000, 1003, 5])
def test_slot_values_are_the_tables_values_at_each_entrys_slot(kind, m):
    """``slot_values_block`` gives each entry's table value at its slot (found through an identity table), in
    whole groups of 16 entries with mixed keys anywhere and in a tail of fewer, and its ranks are the midranks."""
    x = make(kind, 4000, seed=3)
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    counts, mixed = np.zeros(ranks_module.BUCKETS, np.int64), np.zeros(ranks_module.BUCKETS, np.int64)
    n_mixed = ranks_module.count_keys(bits, counts, mixed, np.zeros(0, np.uint32))
    keys = np.zeros(n_mixed, np.uint32)
    ranks_module.count_keys(bits, np.zeros(ranks_module.BUCKETS, np.int64), np.zeros(ranks_module.BUCKETS, np.int64), keys)
    table = ranks_module.RankTable(counts, mixed, keys)
    slots, ranks = np.empty(m, np.int64), np.empty(m, np.int64)
    ranks_module.slot_values_block(bits, m, table.index, np.arange(table.ranks.size), slots)
    ranks_module.slot_values_block(bits, m, table.index, table.ranks, ranks)
    np.testing.assert_array_equal(ranks, expected_ranks(x)[:m])
    keep_probs = np.random.default_rng(1).random(table.ranks.size)  # float64, as magprune's tables
    out = np.empty(m, np.float64)
    ranks_module.slot_values_block(bits, m, table.index, keep_probs, out)
    np.testing.assert_array_equal(out, keep_probs[slots])
