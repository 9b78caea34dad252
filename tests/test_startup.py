"""What a merge command imports: only what its inputs and method need (start-up cost, benchmarks/README.md
"Start-up"). Each check runs the command's ``main`` in a fresh interpreter and lists ``sys.modules``."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_merge.toy import make_family

REPO = Path(__file__).resolve().parents[1]

#: Prints the exit code and the loaded modules of interest after ``main(argv)`` of ``llm_merge.cli.merge``.
_PROBE = """
import json, sys
from llm_merge.cli.merge import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exc:  # --help
    code = exc.code
watched = ("numpy", "numba", "ml_dtypes", "llm_merge.api", "llm_merge.kernels", "llm_merge.io.gguf_output.")
print(json.dumps({"code": code, "modules": sorted(m for m in sys.modules if m.startswith(watched))}))
"""


def loaded_modules(argv, numba=None):
    """(exit code, watched modules) of a merge command run in a fresh interpreter; ``numba``: LLM_MERGE_NUMBA or unset."""
    env = {name: value for name, value in os.environ.items() if name != "LLM_MERGE_NUMBA"}
    if numba is not None:
        env["LLM_MERGE_NUMBA"] = numba
    result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([str(a) for a in argv])], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    return report["code"], set(report["modules"])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A bfloat16 base and two fine-tunes, a few KB each."""
    root = tmp_path_factory.mktemp("family")
    made = make_family(root, n_models=2, hidden=32, intermediate=64, layers=1, vocab=64, heads=2, kv_heads=1)
    return made["base"], made["fine_tunes"]


def merge_argv(family, method, output):
    base, fine_tunes = family
    return ["--merge_method", method, "--base_model_path", base, "--model_path_list", *fine_tunes,
            "--output_path", output, "--quiet"]


def test_help_imports_neither_numpy_nor_the_merge(tmp_path):
    code, modules = loaded_modules(["--help"])
    assert code == 0 and not modules


@pytest.mark.parametrize("method", ["linear", "della"])
def test_a_small_merge_loads_no_compiled_kernels(family, tmp_path, method):
    """Below MergerFactory.COMPILED_MIN_BYTES the merge runs in NumPy: numba and the compiled kernels stay
    unloaded (the kernels room's light modules, shared with the NumPy methods, import no numba), and so does
    the GGUF writer.
    bfloat16 is read, widened and narrowed as bits: no ml_dtypes."""
    code, modules = loaded_modules(merge_argv(family, method, tmp_path / "out"))
    assert code == 0 and "llm_merge.api" in modules and "ml_dtypes" not in modules
    assert "numba" not in modules and "llm_merge.kernels.fused" not in modules
    assert not any(m.startswith("llm_merge.io.gguf_output.") for m in modules)


@pytest.mark.parametrize("method, input_mb, n_process, compiled", [
    ("linear", 150, 1, False),  # NumPy's linear merge runs near the kernels' speed: loading them does not pay
    ("linear", 1500, 1, True),
    ("ties", 5, 1, False),  # a toy family: loading the kernels would double the wall time
    ("ties", 25, 1, True),  # NumPy's trim and sign election cost ~0.3 s more here
    ("ties", 25, 2, False),  # ... shared by two workers
    ("della", 40, 1, True),
    ("dare_linear", 40, 1, False),
    ("sce", 5000, 1, False),  # no kernels to load
])
def test_the_kernels_load_where_they_save_more_than_loading_costs(monkeypatch, method, input_mb, n_process, compiled):
    """Measured on the 2-vCPU machine (tools/mergekit.py, LLM_MERGE_NUMBA=0 against 1, bfloat16 families):
    ties 0.82 s in NumPy against 0.51 s compiled at 38 MB, linear 0.41 against 0.52 s at 156 MB."""
    from llm_merge.config.options import METHOD_TABLE, MergeConfig
    from llm_merge.run.kernel_choice import worth_compiling

    monkeypatch.delenv("LLM_MERGE_NUMBA", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    sparsify_type, merge_type = METHOD_TABLE[method]
    cfg = MergeConfig(sparsify_type=sparsify_type, merge_type=merge_type, n_process=n_process)
    assert worth_compiling(cfg, input_mb * 10**6) is compiled
    monkeypatch.setenv("LLM_MERGE_NUMBA", "0" if compiled else "1")  # forced either way
    assert worth_compiling(cfg, input_mb * 10**6) is not compiled


@pytest.mark.parametrize("numba, code", [(None, "plain NumPy"), ("1", "compiled kernels")])
def test_the_merge_says_which_code_merged(family, tmp_path, monkeypatch, caplog, numba, code):
    from llm_merge.cli.merge import main

    caplog.set_level(logging.INFO)
    monkeypatch.delenv("LLM_MERGE_NUMBA", raising=False)
    if numba is not None:
        monkeypatch.setenv("LLM_MERGE_NUMBA", numba)
    argv = [a for a in merge_argv(family, "linear", tmp_path / "out") if a != "--quiet"]
    assert main([str(a) for a in argv] + ["--n_process", "1"]) == 0
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("merged ")][-1].endswith(f" s ({code})")


def test_a_forced_compiled_merge_loads_the_kernels(family, tmp_path):
    code, modules = loaded_modules(merge_argv(family, "linear", tmp_path / "out"), numba="1")
    assert code == 0 and {"numba", "llm_merge.kernels.fused"} <= modules and "ml_dtypes" not in modules


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "slerp"])
def test_compiled_merges_load_no_array_implementations(family, tmp_path, method):
    """A kernel that allocates arrays makes every process that loads it import numba's array implementations
    (numba.np.arrayobj, ~0.03 s a worker), so the fused apply pass and the trim and Gram statistics take
    their scratch from their callers. The first run may compile (compiling imports them); the second loads
    the cached kernels."""
    pytest.importorskip("numba")
    from llm_merge.kernels.cache import refresh_skip_checked

    if not refresh_skip_checked():
        pytest.skip("a numba release the refresh skip was not checked on: loading imports numba's implementations")
    argv = merge_argv(family, method, tmp_path / "out") + ["--overwrite", "true", "--n_process", "1"]
    loaded_modules(argv, numba="1")
    code, modules = loaded_modules(argv, numba="1")
    assert code == 0 and "llm_merge.kernels.fused" in modules
    assert "numba.np.arrayobj" not in modules


def test_numpy_bfloat16_conversions_match_ml_dtypes_bit_for_bit():
    """The NumPy backend's bfloat16 bit operations give ml_dtypes' bytes: rounding to nearest even,
    overflow to Inf, NaN as 0x7FC0 / 0xFFC0; widening is exact."""
    import ml_dtypes
    import numpy as np

    from llm_merge.backends.numpy_backend import NumpyOps
    from llm_merge.io import dtypes

    ops = NumpyOps(compiled=False)
    exponents = np.arange(256, dtype=np.uint32) << 23
    significands = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0x17FFF, 0x18000, 0x7F8000, 0x7FFFFF, 0x400000], np.uint32)
    structured = (exponents[:, None] | significands[None, :]).ravel()
    random_bits = np.random.default_rng(0).integers(0, 1 << 32, 100_000, dtype=np.uint64).astype(np.uint32)
    bits = np.concatenate([structured, structured | np.uint32(0x80000000), random_bits])
    with np.errstate(invalid="ignore"):
        expected = bits.view(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    for dtype in (dtypes.BFLOAT16_BITS, np.dtype(ml_dtypes.bfloat16)):
        narrowed = ops.narrow(bits.view(np.float32), dtype)
        assert narrowed.dtype == dtype
        np.testing.assert_array_equal(narrowed.view(np.uint16), expected)
        widened = np.empty(bits.size, np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # the engine's setting: NaN/Inf are counted
            ops.widen(narrowed, widened)
        np.testing.assert_array_equal(widened.view(np.uint32), expected.astype(np.uint32) << 16)
        assert ops.count_nonfinite(narrowed) == np.count_nonzero(~np.isfinite(expected.view(ml_dtypes.bfloat16)))


@pytest.mark.parametrize("n_process", [1, 2])
def test_tasks_run_with_the_collector_on_and_leave_it_as_it_was(n_process):
    """A command turns garbage collection off for its start-up (``cli.merge.main_entry``); the tasks, in this
    process or in forked workers, run with it on, and it is off again afterwards."""
    import gc
    from types import SimpleNamespace

    from llm_merge.run.pool import run_tasks

    class Worker:
        def run(self, task):
            assert gc.isenabled()
            return task.out_bytes

        def close(self):
            pass

    tasks = [SimpleNamespace(name=f"t{i}", in_bytes=1, out_bytes=1, out=SimpleNamespace(file="f")) for i in range(3)]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        run_tasks(tasks, Worker, n_process, quiet=True, desc="test", start_method="fork")
        assert not gc.isenabled()
    finally:
        if was_enabled:
            gc.enable()
