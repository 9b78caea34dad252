"""Self-tests of the independent reference implementation (tests/reference.py)
on small hand-computed examples."""
from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as R  # noqa: E402
from checkpoints import make_llama_family, read_checkpoint, write_checkpoint  # noqa: E402

T = np.array([[0.5, -0.2, 0.2], [0.1, 0.0, -0.9]], dtype=np.float32)


# --------------------------------------------------------------------------- RNG
def test_rng_key_matches_spec():
    d = hashlib.blake2b(b"42:model.x:1", digest_size=8).digest()
    assert R.rng_key(42, "model.x", 1) == int.from_bytes(d, "little")
    assert R.rng_key(42, "model.x", 0) != R.rng_key(42, "model.x", 1)
    assert R.rng_key(43, "model.x", 0) != R.rng_key(42, "model.x", 0)


@pytest.mark.parametrize("key", [0, 1, 2**63 + 12345, 2**64 - 1, R.rng_key(42, "lm_head.weight", 0)])
def test_vectorised_bits_match_scalar(key):
    v = R.random_bits53(key, 257)
    assert v.dtype == np.uint64
    for j in range(257):
        assert int(v[j]) == R.random_bits53_scalar(key, j)
    assert int(v.max()) < 2**53


def test_splitmix_known_value():
    # key=0, j=0 -> z = golden ratio constant -> standard splitmix64 first output from state 0
    # (splitmix64 with seed 0 yields 0xE220A8397B1DCDAF as its first value)
    assert R.random_bits53_scalar(0, 0) == 0xE220A8397B1DCDAF >> 11
    assert int(R.random_bits53(0, 1)[0]) == 0xE220A8397B1DCDAF >> 11


def test_keep_mask_rate_and_threshold():
    m = R.keep_mask(0.7, (100000,), seed=1, tensor_name="t", model_index=0)
    assert abs(m.mean() - 0.7) < 0.01
    bits = R.random_bits53(R.rng_key(1, "t", 0), 100000)
    assert np.array_equal(m, bits < np.uint64(math.floor(0.7 * 2**53)))
    assert R.keep_mask(1.0, (50,), seed=1, tensor_name="t", model_index=0).all()
    assert not R.keep_mask(0.0, (50,), seed=1, tensor_name="t", model_index=0).any()


# --------------------------------------------------------------------------- dare
def test_dare_p1_identity():
    out = R.dare(T, 1.0, rescale=True, seed=7, tensor_name="a", model_index=0)
    assert np.array_equal(out, T)


def test_dare_matches_scalar_mask_and_rescales():
    p = 0.5
    key = R.rng_key(3, "w", 1)
    thr = math.floor(p * 2**53)
    keep = np.array([R.random_bits53_scalar(key, j) < thr for j in range(6)]).reshape(2, 3)
    exp = np.where(keep, T / np.float32(p), 0).astype(np.float32)
    out = R.dare(T, p, rescale=True, seed=3, tensor_name="w", model_index=1)
    assert np.array_equal(out, exp)
    out_nr = R.dare(T, p, rescale=False, seed=3, tensor_name="w", model_index=1)
    assert np.array_equal(out_nr, np.where(keep, T, 0).astype(np.float32))


# --------------------------------------------------------------------------- trim
def test_trim_ties_at_threshold():
    # n=6, p=0.5 -> k=3; |t| sorted 0.9,0.5,0.2,0.2,0.1,0 -> threshold 0.2 keeps both 0.2s
    out = R.trim(T, 0.5, rescale=False)
    exp = np.array([[0.5, -0.2, 0.2], [0.0, 0.0, -0.9]], dtype=np.float32)
    assert np.array_equal(out, exp)
    out_r = R.trim(T, 0.5, rescale=True)
    tot = float(np.abs(T.astype(np.float64)).sum())
    kept = float(np.abs(exp.astype(np.float64)).sum())
    np.testing.assert_allclose(out_r, exp * (tot / kept), rtol=1e-7)
    assert abs(tot / kept - 1.9 / 1.8) < 1e-6


def test_trim_float_noise_in_k():
    # 0.55 * 100 = 55.00000000000001 in float64; k must be 55, not 56
    assert 0.55 * 100 > 55
    t = np.arange(100, 0, -1, dtype=np.float32).reshape(10, 10)
    out = R.trim(t, 0.55, rescale=False)
    assert int((out != 0).sum()) == 55
    assert out.min() == 0 and out[out != 0].min() == 46.0
    # 0.7*3 = 2.0999999999999996 -> ceil(2.1) = 3
    out = R.trim(np.array([3.0, 2.0, 1.0], np.float32), 0.7, rescale=False)
    assert np.array_equal(out, [3.0, 2.0, 1.0])


def test_trim_all_zero_factor_one():
    z = np.zeros((2, 3), np.float32)
    assert np.array_equal(R.trim(z, 0.5, rescale=True), z)


# --------------------------------------------------------------------------- magprune
def test_magprune_keep_probs_ranks_and_ties():
    t = np.array([[0.5, -0.2, 0.2], [0.1, 0.0, -0.9]], dtype=np.float32)
    # midranks by |t| desc, ties share the mean: 0.9(5)=0, 0.5(0)=1, 0.2(1)=0.2(2)=2.5, 0.1(3)=4, 0(4)=5
    ranks = np.array([1, 2.5, 2.5, 4, 5, 0])
    q = (1 - 0.7) - 0.14 / 2 + 0.14 * ranks / 6
    exp = (1 - q).reshape(2, 3)
    np.testing.assert_array_equal(R.magprune_keep_probs(t, 0.7, 0.14), exp)
    assert abs(exp[1, 2] - 0.77) < 1e-12 and abs(exp[1, 1] - (0.77 - 0.14 * 5 / 6)) < 1e-12


def test_magprune_mask_and_rescale():
    keep = R.magprune_keep_probs(T, 0.7, 0.14).reshape(-1)
    key = R.rng_key(42, "m", 2)
    kept = np.array([R.random_bits53_scalar(key, j) < math.floor(keep[j] * 2**53) for j in range(6)])
    exp = np.where(kept, T.reshape(-1) / keep.astype(np.float32), 0).astype(np.float32).reshape(2, 3)
    out = R.magprune(T, 0.7, 0.14, rescale=True, seed=42, tensor_name="m", model_index=2)
    assert np.array_equal(out, exp)
    out = R.magprune(T, 0.7, 0.14, rescale=False, seed=42, tensor_name="m", model_index=2)
    assert np.array_equal(out, np.where(kept.reshape(2, 3), T, 0))


def test_magprune_eps0_p1_identity():
    out = R.magprune(T, 1.0, 0.0, rescale=True, seed=1, tensor_name="m", model_index=0)
    assert np.array_equal(out, T)


# --------------------------------------------------------------------------- linear
def test_linear():
    a = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    b = np.array([[-1, 0, 1], [2, 2, 2]], np.float32)
    np.testing.assert_allclose(R.linear([a, b], [0.6, 0.4], normalize=False),
                               [[0.2, 1.2, 2.2], [3.2, 3.8, 4.4]], rtol=1e-6)
    np.testing.assert_allclose(R.linear([a, b], [3, 1], normalize=True),
                               [[0.5, 1.5, 2.5], [3.5, 4.25, 5.0]], rtol=1e-6)


# --------------------------------------------------------------------------- slerp
def test_slerp_colinear_branch():
    a = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    np.testing.assert_allclose(R.slerp(a, 2 * a, 0.5), 1.5 * a, rtol=1e-6)
    np.testing.assert_allclose(R.slerp(a, -a, 0.25), 0.5 * a, rtol=1e-6)  # anti-parallel -> lerp


def test_slerp_orthogonal():
    a = np.array([[1, 0, 0], [0, 0, 0]], np.float32)
    b = np.array([[0, 2, 0], [0, 0, 0]], np.float32)
    c = math.sin(math.pi / 4)
    np.testing.assert_allclose(R.slerp(a, b, 0.5), [[c, 2 * c, 0], [0, 0, 0]], rtol=1e-6)
    # t = 0.25: sin(3/4 * pi/2), sin(1/4 * pi/2)
    np.testing.assert_allclose(R.slerp(a, b, 0.25),
                               [[math.sin(3 * math.pi / 8), 2 * math.sin(math.pi / 8), 0], [0, 0, 0]],
                               rtol=1e-6)


def test_slerp_zero_norm():
    z = np.zeros((2, 3), np.float32)
    b = np.array([[0, 2, 0], [0, 0, 0]], np.float32)
    # u0 = 0 (unnormalised) -> d = 0 -> theta = pi/2
    np.testing.assert_allclose(R.slerp(z, b, 0.5), math.sin(math.pi / 4) * b, rtol=1e-6)
    np.testing.assert_array_equal(R.slerp(z, z, 0.3), z)


# --------------------------------------------------------------------------- ties
Y0 = np.array([[1, -2, 0], [3, 0, -1]], np.float32)
Y1 = np.array([[-2, 1, 0], [1, -1, 2]], np.float32)


def test_ties_sum_sign_conflicts():
    np.testing.assert_array_equal(R.ties([Y0, Y1], [1, 1], normalize=False), [[-2, -2, 0], [4, -1, 2]])
    np.testing.assert_array_equal(R.ties([Y0, Y1], [1, 1], normalize=True), [[-2, -2, 0], [2, -1, 2]])


def test_ties_count():
    np.testing.assert_array_equal(R.ties([Y0, Y1], [1, 1], normalize=False, elect_type="count"),
                                  [[1, 1, 0], [4, -1, 2]])
    np.testing.assert_array_equal(R.ties([Y0, Y1], [1, 1], normalize=True, elect_type="count"),
                                  [[1, 1, 0], [2, -1, 2]])


def test_ties_weighted():
    np.testing.assert_allclose(R.ties([Y0, Y1], [2, 0.5], normalize=False), [[2, -4, 0], [6.5, -0.5, -2]])
    np.testing.assert_allclose(R.ties([Y0, Y1], [2, 0.5], normalize=True), [[1, -2, 0], [2.6, -1, -1]],
                               rtol=1e-6)


# --------------------------------------------------------------------------- full merge
def test_reference_merge_linear_with_base_and_int_copy():
    base = {"w": np.array([[1, 1, 1], [1, 1, 1]], np.float32), "ids": np.arange(3)}
    m0 = {"w": base["w"] + Y0, "ids": np.arange(3)}
    m1 = {"w": base["w"] + Y1, "ids": np.arange(3) + 5}
    out = R.reference_merge([m0, m1], base, merge_method="linear", weight_list=[1, 3])
    np.testing.assert_allclose(out["w"], 1 + (Y0 + 3 * Y1) / 4, rtol=1e-6)
    np.testing.assert_array_equal(out["ids"], np.arange(3))
    out = R.reference_merge([m0, m1], base, merge_method="ties", reserve_p=1.0)
    np.testing.assert_allclose(out["w"], 1 + np.array([[-2, -2, 0], [2, -1, 2]]), rtol=1e-6)
    out = R.reference_merge([m0, m1], base, merge_method="dare_linear", reserve_p=1.0, normalize=False)
    np.testing.assert_allclose(out["w"], 1 + Y0 + Y1, rtol=1e-6)


def test_reference_merge_bf16_output():
    bf = ml_dtypes.bfloat16
    m0 = {"w": (Y0 / 3).astype(bf)}
    m1 = {"w": (Y1 / 7).astype(bf)}
    out = R.reference_merge([m0, m1], None, merge_method="linear")
    assert out["w"].dtype == np.dtype(bf)
    exp = ((m0["w"].astype(np.float32) + m1["w"].astype(np.float32)) / 2).astype(bf)
    assert np.array_equal(out["w"].view(np.uint16), exp.view(np.uint16))
    out = R.reference_merge([m0, m1], None, merge_method="linear", output_dtype="float32")
    assert out["w"].dtype == np.float32


def test_compare_tensor_ulp():
    bf = ml_dtypes.bfloat16
    a = np.array([1.0, -2.0, 0.0], np.float32).astype(bf)
    b = a.view(np.uint16).copy()
    b[0] += 1
    assert R.compare_tensor("x", b.view(bf), a) is None
    b[1] += 2
    assert R.compare_tensor("x", b.view(bf), a) is not None
    # +0 vs smallest negative subnormal: 1 ulp apart
    c = np.array([0.0], np.float32).astype(bf)
    d = np.array([0x8001], np.uint16).view(bf)
    assert R.compare_tensor("x", d, c) is None


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("shards", [1, 3])
def test_checkpoint_roundtrip(tmp_path, dtype, shards):
    fam = make_llama_family(tmp_path, n_models=2, dtype=dtype, prefix="master_weights", shards=shards)
    for d, ref in [(fam.base_dir, fam.base)] + list(zip(fam.model_dirs, fam.models)):
        got = read_checkpoint(d, prefix="master_weights")
        assert set(got) == set(ref)
        for k in ref:
            assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), k
    # also readable by safetensors' own loader with bf16 written by hand
    write_checkpoint(tmp_path / "x", {"a": np.ones((2, 3), ml_dtypes.bfloat16)}, extra_files=False)
    assert read_checkpoint(tmp_path / "x")["a"].dtype == np.dtype(ml_dtypes.bfloat16)
