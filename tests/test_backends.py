"""NumPy and Paddle backends agree: ops, every sparsify and merge method, and whole merges.

Deterministic methods agree within a relative error of 1e-6 (float64 sums may be
accumulated in another order); dare and magprune draw identical masks from the same
(key, offset), so their outputs are equal. GPU cases are marked ``gpu`` and skipped
unless Paddle is compiled with CUDA.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from llm_merge import methods  # noqa: E402
from llm_merge.backends.numpy_backend import NumpyOps  # noqa: E402
from llm_merge.backends.paddle_backend import PaddleOps  # noqa: E402
from llm_merge.run.chunks import slice_per_element  # noqa: E402
from llm_merge.errors import MergeError  # noqa: E402
from llm_merge.kernels.counter_rng import CounterRNG, splitmix64  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = paddle.device.is_compiled_with_cuda()
NP = NumpyOps()
METHODS = ("linear", "slerp", "ties", "della", "della_linear", "dare_linear", "dare_ties")
RANDOM_METHODS = {"della", "della_linear", "dare_linear", "dare_ties"}


def _gpu(device):
    return pytest.param(
        device, marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="Paddle is not compiled with CUDA")]
    )


DEVICES = ["cpu", _gpu("gpu"), _gpu("low_gpu_mem")]


@pytest.fixture(scope="module", params=DEVICES)
def pd(request):
    return PaddleOps(request.param)


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    scale = np.abs(b).max() if b.size else 0.0
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max())


def task_vectors(n_models=3, n=6007, seed=0) -> list[np.ndarray]:
    """float32 vectors with zeros, exact magnitude ties and sign conflicts between models."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-6, 0, n)).astype(np.float32)
    ts = []
    for i in range(n_models):
        t = (rng.standard_normal(n).astype(np.float32) * scale).astype(np.float32)
        t[rng.random(n) < 0.1] = 0.0  # zeros
        t[: n // 20] = 0.0  # a block of zeros shared by all models
        ties = rng.integers(0, n, n // 10)
        t[ties] = np.float32(0.0125) * rng.choice(np.float32([-1, 1]), ties.size)  # many equal magnitudes
        t[7::97] = -t[7::97] if i % 2 else t[7::97]  # sign conflicts between models
        ts.append(t)
    if n_models > 1:
        ts[1][n // 2 : n // 2 + 200] = -ts[0][n // 2 : n // 2 + 200]  # exact opposite values
    return ts


def sparsify(ops, name, t, *, key=11, chunk=None, **params):
    """Run a sparsifier as the engine does: prepare on the whole vector, apply chunk by chunk."""
    method = methods.get("sparsify", name)
    n = t.size
    prepared = {}
    if method.prepare:
        names = methods.registry.keyword_params(method.prepare)
        prepared = method.prepare(ops.from_numpy(t), ops=ops, **{k: v for k, v in params.items() if k in names})
    chunk = chunk or n
    out = []
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        extra = {**params, **slice_per_element(prepared, start, count, n), "rng": ops.rng(key, start), "numel": n}
        kwargs = {k: v for k, v in extra.items() if k in method.params}
        out.append(ops.to_numpy(method.fn(ops.from_numpy(t[start : start + count]), ops=ops, **kwargs)))
    return np.concatenate(out)


def merge(ops, name, ys, **params):
    method = methods.get("merge", name)
    tensors = [ops.from_numpy(y) for y in ys]
    if method.reduce:
        params["sums"] = method.reduce(tensors, ops=ops)["sums"]
    return ops.to_numpy(method.fn(tensors, ops=ops, **params))


# --------------------------------------------------------------------------- ops
@pytest.mark.parametrize("key", [0, 1, 7, 2**63 - 1, 2**63, 0x9E3779B97F4A7C15, 2**64 - 1])
@pytest.mark.parametrize("offset", [0, 1, 2**18, 2**40 + 3])
def test_rng_bits_and_masks_match_numpy(pd, key, offset):
    count = 20_000
    expected_bits = splitmix64(key, offset, count) >> np.uint64(11)
    assert np.array_equal(pd.to_numpy(pd.rng(key, offset).bits(count)).astype(np.uint64), expected_bits)
    for p in (0.0, 2.0**-53, 1e-9, 0.1, 0.5, 0.7, 1 - 2.0**-53, 1.0):
        mask = pd.rng(key, offset).keep(p, count)
        assert mask.dtype == paddle.bool
        assert np.array_equal(pd.to_numpy(mask), CounterRNG(key, offset).keep(p, count)), p
    probs = np.random.default_rng(key % 1000).uniform(0.0, 1.0, count)
    probs[:4] = [0.0, 1.0, 0.5, 2.0**-53]
    assert np.array_equal(pd.to_numpy(pd.rng(key, offset).keep(pd.float64(probs), count)), CounterRNG(key, offset).keep(probs, count))


def test_rng_streams_are_chunk_independent(pd):
    whole = pd.to_numpy(pd.rng(99, 0).keep(0.3, 1000))
    parts = [pd.to_numpy(pd.rng(99, s).keep(0.3, 250)) for s in range(0, 1000, 250)]
    assert np.array_equal(whole, np.concatenate(parts))


def test_midranks_and_kth_largest_match_numpy(pd):
    rng = np.random.default_rng(3)
    x = np.abs(rng.standard_normal(50_001).astype(np.float32))
    x[::5] = 0.0
    x[3::17] = x[4]  # ties share their mean rank
    x[11::101] = np.float32(np.inf)
    x[13] = np.nan  # NaN's bit pattern ranks above +inf
    ranks = pd.doubled_midranks(pd.from_numpy(x))
    assert np.array_equal(pd.to_numpy(ranks).astype(np.int64), NP.doubled_midranks(x).astype(np.int64))
    finite = x[np.isfinite(x)]
    for k in (1, 2, 7, 1000, finite.size // 2, finite.size - 1, finite.size):
        assert pd.kth_largest(pd.from_numpy(finite), k) == NP.kth_largest(finite, k), k


def test_reductions_and_elementwise_match_numpy(pd):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(100_003) * np.exp(rng.uniform(-20, 20, 100_003))).astype(np.float32)
    y = (rng.standard_normal(100_003) * np.exp(rng.uniform(-20, 20, 100_003))).astype(np.float32)
    px, py = pd.from_numpy(x), pd.from_numpy(y)
    assert pd.sum64(px) == pytest.approx(NP.sum64(x), rel=1e-12)
    assert pd.dot64(px, py) == pytest.approx(NP.dot64(x, y), rel=1e-12)
    assert pd.dot64(px, px) == pytest.approx(NP.dot64(x, x), rel=1e-12)
    # Paddle's same-shape CPU divide (MKL vsDiv) is not correctly rounded: ops.divide must be.
    assert np.array_equal(pd.to_numpy(pd.divide(px, py)), NP.divide(x, y))
    assert np.array_equal(pd.to_numpy(pd.divide(px, pd.float32(0.7))), NP.divide(x, NP.float32(0.7)))
    for w in (0.7, 1 / 3, 0.123456789, 3.0):
        assert np.array_equal(pd.to_numpy(px * pd.float32(w)), x * NP.float32(w))
        assert np.array_equal(pd.to_numpy(px / pd.float32(w)), x / NP.float32(w))
    assert np.array_equal(pd.to_numpy(pd.sign(px)), NP.sign(x))
    assert np.array_equal(pd.to_numpy(pd.abs(px)), NP.abs(x))
    cond = x > y
    assert np.array_equal(pd.to_numpy(pd.where(px > py, px, 0.0)), NP.where(cond, x, 0.0))
    assert np.array_equal(pd.to_numpy(pd.where(px > py, pd.float32(2.5), pd.float32(0.0))), NP.where(cond, NP.float32(2.5), NP.float32(0.0)))
    assert np.array_equal(pd.to_numpy(pd.where(px > py, px > 0, px < 0)), NP.where(cond, x > 0, x < 0))
    assert pd.to_numpy(pd.where(px > py, px, 0.0)).dtype == np.float32
    assert np.array_equal(pd.to_numpy(pd.zeros_like(px)), np.zeros_like(x))


def test_inplace_operators_work_on_tensors(pd):
    x = np.arange(5, dtype=np.float32)
    total = pd.from_numpy(x)
    total += pd.from_numpy(x)
    total /= pd.float32(4.0)
    assert np.array_equal(pd.to_numpy(total), (x + x) / np.float32(4.0))


def test_low_gpu_mem_statistics_stay_on_host_and_match():
    """The low_gpu_mem host path, exercised on the CPU: big arrays stay NumPy, results are equal."""
    ops = PaddleOps("cpu", max_device_elements=1000)
    ops.low_gpu_mem = True
    t = task_vectors(1, 5003)[0]
    assert isinstance(ops.from_numpy(t), np.ndarray)
    assert isinstance(ops.from_numpy(t[:1000]), paddle.Tensor)
    for name, params in (("trim", dict(reserve_p=0.3, rescale=True)), ("magprune", dict(reserve_p=0.5, epsilon=0.2, rescale=True))):
        host = sparsify(ops, name, t, chunk=1000, **params)
        device = sparsify(PaddleOps("cpu"), name, t, chunk=1000, **params)
        reference = sparsify(NP, name, t, chunk=1000, **params)
        assert np.array_equal(host, reference) and np.array_equal(device, reference), name


def test_gpu_without_cuda_is_a_clear_error():
    if HAS_CUDA:
        pytest.skip("Paddle has CUDA")
    for device in ("gpu", "low_gpu_mem"):
        with pytest.raises(MergeError, match="no GPU .*support.*pip install paddlepaddle-gpu"):
            PaddleOps(device)


# --------------------------------------------------------------------------- sparsifiers
SPARSIFY_CASES = [
    ("none", {}),
    ("dare", dict(reserve_p=0.7, rescale=True)),
    ("dare", dict(reserve_p=0.3, rescale=False)),
    ("dare", dict(reserve_p=1.0, rescale=True)),
    ("trim", dict(reserve_p=0.7, rescale=True)),
    ("trim", dict(reserve_p=0.2, rescale=False)),
    ("trim", dict(reserve_p=1.0, rescale=True)),
    ("magprune", dict(reserve_p=0.7, epsilon=0.14, rescale=True)),
    ("magprune", dict(reserve_p=0.5, epsilon=0.4, rescale=False)),
]


@pytest.mark.parametrize("chunk", [None, 1000])
@pytest.mark.parametrize("name,params", SPARSIFY_CASES)
def test_sparsifiers_agree(pd, name, params, chunk):
    for i, t in enumerate(task_vectors(3)):
        expected = sparsify(NP, name, t, key=100 + i, chunk=chunk, **params)
        got = sparsify(pd, name, t, key=100 + i, chunk=chunk, **params)
        assert got.dtype == np.float32
        if name in ("dare", "magprune"):
            assert np.array_equal(got != 0, expected != 0), f"{name}: masks differ"
            assert np.array_equal(got, expected), f"{name}: outputs differ"
        else:
            assert rel_err(got, expected) <= 1e-6, name


# --------------------------------------------------------------------------- merges
MERGE_CASES = [
    ("linear", dict(weight_list=[1.0, 1.0, 1.0], normalize=True)),
    ("linear", dict(weight_list=[0.3, -0.9, 1.7], normalize=False)),
    ("linear", dict(weight_list=[0.3, 0.9, 0.5], normalize=True)),
    ("ties", dict(weight_list=[1.0, 1.0, 1.0], normalize=True, ties_elect_type="sum")),
    ("ties", dict(weight_list=[0.3, 0.9, 0.5], normalize=True, ties_elect_type="sum")),
    ("ties", dict(weight_list=[0.3, 0.9, 0.5], normalize=True, ties_elect_type="count")),
    ("ties", dict(weight_list=[0.7, 1.3, 0.2], normalize=False, ties_elect_type="count")),
    ("slerp", dict(slerp_alpha=0.3, slerp_normalize_eps=1e-8, slerp_dot_threshold=0.9995)),
    ("slerp", dict(slerp_alpha=0.5, slerp_normalize_eps=1e-8, slerp_dot_threshold=0.1)),
]


@pytest.mark.parametrize("sparsifier", ["none", "trim", "dare", "magprune"])
@pytest.mark.parametrize("name,params", MERGE_CASES)
def test_merges_agree(pd, name, params, sparsifier):
    ts = task_vectors(2 if name == "slerp" else 3, seed=5)
    sparse_params = {"none": {}, "trim": dict(reserve_p=0.5, rescale=True), "dare": dict(reserve_p=0.6, rescale=True),
                     "magprune": dict(reserve_p=0.6, epsilon=0.2, rescale=True)}[sparsifier]
    ys = [sparsify(NP, sparsifier, t, key=7 + i, **sparse_params) for i, t in enumerate(ts)]
    expected = merge(NP, name, ys, **params)
    got = merge(pd, name, ys, **params)
    assert got.dtype == np.float32
    assert rel_err(got, expected) <= 1e-6, (name, sparsifier)
    if name != "slerp":  # elementwise float32 arithmetic: bit-identical
        assert np.array_equal(got, expected)


def test_slerp_identical_and_zero_inputs(pd):
    y = task_vectors(1, seed=6)[0]
    params = dict(slerp_alpha=0.25, slerp_normalize_eps=1e-8, slerp_dot_threshold=0.9995)
    for ys in ([y, y], [y, np.zeros_like(y)], [np.zeros_like(y), np.zeros_like(y)], [y, -y]):
        assert rel_err(merge(pd, "slerp", ys, **params), merge(NP, "slerp", ys, **params)) <= 1e-6


# --------------------------------------------------------------------------- whole merges (CLI)
def run_cli(*args, expect_rc=0):
    cmd = [sys.executable, "tools/mergekit.py", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect_rc, f"rc={proc.returncode} for {' '.join(cmd[1:])}\n{proc.stderr[-3000:]}"
    return proc


def read_output(out_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Base + 2 float32 fine-tunes; the embedding and lm_head span two engine chunks (288,000 > 2^18)."""
    from llm_merge.toy import make_family

    return make_family(tmp_path_factory.mktemp("family"), n_models=2, vocab=4500, hidden=64, intermediate=96, layers=1, dtype="float32")


def cli_merge(family, out: Path, method: str, tensor_type: str, *extra) -> dict[str, np.ndarray]:
    run_cli(
        "--merge_method", method, "--model_path_list", *family["fine_tunes"], "--base_model_path", family["base"],
        "--output_path", out, "--tensor_type", tensor_type, "--quiet", *extra,
    )
    return read_output(out)


def _assert_outputs_agree(got, expected, method):
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        if method in RANDOM_METHODS:
            assert np.array_equal(got[name], expected[name]), f"{method}: {name} differs"
        else:
            assert rel_err(got[name], expected[name]) <= 1e-6, f"{method}: {name}"


@pytest.mark.parametrize("method", METHODS)
def test_cli_np_and_pd_agree(family, tmp_path, method):
    extra = ("--weight_list", "0.4", "0.9") if method != "slerp" else ()
    expected = cli_merge(family, tmp_path / "np", method, "np", *extra)
    got = cli_merge(family, tmp_path / "pd", method, "pd", *extra)
    _assert_outputs_agree(got, expected, method)


def test_cli_pd_worker_processes_and_bf16_output(family, tmp_path):
    extra = ("--output_dtype", "bfloat16", "--seed", "7")
    expected = cli_merge(family, tmp_path / "np", "dare_ties", "np", *extra)
    got = cli_merge(family, tmp_path / "pd", "dare_ties", "pd", "--n_process", "2", *extra)
    _assert_outputs_agree(got, expected, "dare_ties")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="Paddle is not compiled with CUDA")
@pytest.mark.parametrize("device", ["gpu", "low_gpu_mem"])
@pytest.mark.parametrize("method", ["ties", "della", "dare_ties", "slerp"])
def test_cli_gpu_devices_agree_with_numpy(family, tmp_path, method, device):
    expected = cli_merge(family, tmp_path / "np", method, "np")
    got = cli_merge(family, tmp_path / device, method, "pd", "--device", device)
    _assert_outputs_agree(got, expected, method)


def test_cli_gpu_device_without_cuda_fails_cleanly(family, tmp_path):
    if HAS_CUDA:
        pytest.skip("Paddle has CUDA")
    proc = run_cli(
        "--merge_method", "ties", "--model_path_list", *family["fine_tunes"], "--output_path", tmp_path / "out",
        "--tensor_type", "pd", "--device", "gpu", expect_rc=1,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no GPU" in lines[0] and "pip install" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- paddle stays optional
def _run_blocked(args: list[str]) -> subprocess.CompletedProcess:
    """Run ``main(args)`` in a fresh interpreter where ``import paddle`` fails."""
    code = (
        "import sys; sys.modules['paddle'] = None\n"
        "from llm_merge.cli.merge import main\n"
        "rc = main(%r)\n"
        "loaded = sorted(m for m, v in sys.modules.items() if m.split('.')[0] == 'paddle' and v is not None)\n"
        "assert not loaded, loaded\n"
        "sys.exit(rc)\n" % (args,)
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_numpy_backend_never_imports_paddle(family, tmp_path):
    out = tmp_path / "out"
    args = ["--merge_method", "dare_ties", "--model_path_list", *map(str, family["fine_tunes"]), "--base_model_path",
            str(family["base"]), "--output_path", str(out), "--tensor_type", "np", "--quiet"]
    proc = _run_blocked(args)
    assert proc.returncode == 0, proc.stderr
    assert read_output(out)


def test_paddle_backend_without_paddle_is_a_one_line_error(family, tmp_path):
    out = tmp_path / "out"
    args = ["--merge_method", "ties", "--model_path_list", *map(str, family["fine_tunes"]), "--output_path", str(out),
            "--tensor_type", "pd", "--quiet"]
    proc = _run_blocked(args)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "pip install" in lines[0] and "--tensor_type pd" in lines[0], lines[0]
    assert not out.exists()
