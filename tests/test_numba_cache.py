"""numba's cache goes stale when a module that compiled kernels inline changes, and only then."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llm_merge.kernels.cache import LOCK_NAME, bind_to_dependencies, content_digest

REPO = Path(__file__).resolve().parents[1]

KERNEL_MODULE = """
import dep
from numba import njit
from llm_merge.kernels.cache import bind_to_dependencies

@njit(cache=True)
def value():
    return dep.VALUE  # a global: numba compiles its value into the kernel

bind_to_dependencies(globals(), [dep.__file__])
print(value())
"""


def test_content_digest_follows_contents_not_paths(tmp_path):
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    c.write_text("x = 1\n")
    assert content_digest([a, b]) == content_digest([c, b])
    assert content_digest([a, b]) != content_digest([b, a])
    before = content_digest([a, b])
    a.write_text("x = 3\n")
    assert content_digest([a, b]) != before


def test_unreadable_dependencies_bind_nothing(tmp_path):
    assert bind_to_dependencies({"__name__": "nothing_here"}, [tmp_path / "missing.py"]) == 0


def _kernel_env(directory: Path) -> dict:
    """Environment of a subprocess that imports kernel modules from ``directory``, caching beside them and logging it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(directory), str(REPO)]), PYTHONDONTWRITEBYTECODE="1",
               NUMBA_DEBUG_CACHE="1")
    env.pop("NUMBA_CACHE_DIR", None)
    return env


def _run_kernel(directory: Path) -> tuple[str, str]:
    env = _kernel_env(directory)
    done = subprocess.run([sys.executable, "-c", "import kern"], cwd=directory, env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    lines = done.stdout.splitlines()
    return lines[-1], "\n".join(lines[:-1])


def test_a_changed_dependency_recompiles_and_an_unchanged_one_loads_the_cache(tmp_path):
    pytest.importorskip("numba")
    (tmp_path / "kern.py").write_text(KERNEL_MODULE)
    dependency = tmp_path / "dep.py"
    dependency.write_text("VALUE = 1\n")
    assert _run_kernel(tmp_path)[0] == "1"
    dependency.write_text("VALUE = 22\n")  # kern.py itself is unchanged: numba alone would load value() == 1
    value, log = _run_kernel(tmp_path)
    assert value == "22"
    assert "data saved" in log
    value, log = _run_kernel(tmp_path)
    assert value == "22"
    assert "data loaded" in log and "data saved" not in log


#: The modules of llm_merge.kernels that define compiled kernels.
KERNEL_MODULES = ("blocks", "method_blocks", "fused", "twins", "streaming", "ranks", "draws", "mergekit_blocks",
                  "mergekit_streaming", "row_ranks")


def _imported_from(module) -> dict:
    """Name -> module of llm_merge.kernels, for the names ``module`` imports from there."""
    import ast
    import importlib

    names = {}
    for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "llm_merge.kernels":
            for alias in node.names:
                names[alias.asname or alias.name] = importlib.import_module(f"llm_merge.kernels.{alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llm_merge.kernels."):
            for alias in node.names:
                names[alias.asname or alias.name] = importlib.import_module(node.module)
    return names


def _kernels_of(module) -> list:
    return [value for value in vars(module).values()
            if getattr(getattr(value, "py_func", None), "__module__", None) == module.__name__]


def test_the_kernel_modules_are_bound_to_what_they_inline():
    """Each module's KERNEL_DEPENDENCIES holds every kernel module whose kernels or constants its kernels
    name, and those modules' own dependencies; its cached kernels are bound to exactly that list."""
    pytest.importorskip("numba")
    import importlib

    from llm_merge.kernels import cache

    for name in KERNEL_MODULES:
        module = importlib.import_module(f"llm_merge.kernels.{name}")
        dependencies = module.KERNEL_DEPENDENCIES
        imported = _imported_from(module)
        for kernel in _kernels_of(module):
            for used in kernel.py_func.__code__.co_names:
                source = imported.get(used)
                if source is not None and source is not cache and source.__name__ != "llm_merge.kernels.counts":
                    assert source in dependencies, f"{name}.{kernel.__name__} uses {source.__name__}.{used}"
        for dependency in dependencies:
            missing = set(getattr(dependency, "KERNEL_DEPENDENCIES", ())) - set(dependencies)
            assert not missing, f"{name} lacks what {dependency.__name__} depends on: {missing}"
        for kernel in _kernels_of(module):
            stamp = getattr(getattr(kernel, "_cache", None), "_cache_file", None)
            if stamp is None:  # no on-disk cache in this environment
                continue
            if dependencies:
                assert stamp._source_stamp[1] == content_digest(m.__file__ for m in dependencies)


RACING_MODULE = """
import sys, time
from numba import njit
from llm_merge.kernels.cache import configure_kernel_caches

@njit(cache=True)
def twice(x):
    return x * 2

if GUARD:
    configure_kernel_caches(globals())
# numba's save: read the index, pick a free data file name, write the index, write the data.
# The delays make both racers read the index before either writes it, the float racer write
# the index last and the int racer its data last: unguarded, both pick one data file and the
# index maps twice(float) to the int machine code.
kind = sys.argv[1]
index_delay, data_delay = {"int": (0.5, 1.0), "float": (0.8, 0.0)}[kind]
cache_file = twice._cache._cache_file
write_index, write_data = cache_file._save_index, cache_file._save_data
cache_file._save_index = lambda overloads: (time.sleep(index_delay), write_index(overloads))
cache_file._save_data = lambda name, data: (time.sleep(data_delay), write_data(name, data))
print(repr(twice({"int": 1, "float": 1.5}[kind])))
"""


def _race_two_signatures(directory: Path, guard: bool) -> str:
    """Compile twice(int) and twice(float) in two processes at once; return what a third then logs."""
    (directory / "racing.py").write_text(RACING_MODULE.replace("GUARD", repr(guard)))
    env = _kernel_env(directory)
    racers = [subprocess.Popen([sys.executable, str(directory / "racing.py"), kind], cwd=directory, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for kind in ("int", "float")]
    outputs = [racer.communicate(timeout=300)[0].splitlines()[-1] for racer in racers]
    assert outputs == ["2", "3.0"]
    check = "import sys; sys.argv.append('int'); from racing import twice; print(repr(twice(7)), repr(twice(0.25)))"
    done = subprocess.run([sys.executable, "-c", check], cwd=directory, env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    return done.stdout


def test_concurrent_compilations_keep_every_cache_entry(tmp_path):
    pytest.importorskip("numba")
    pytest.importorskip("fcntl")
    log = _race_two_signatures(tmp_path, guard=True)
    # the third process finds both signatures in the cache, each with its own machine code
    # (unguarded: "14 0", twice(0.25) runs the int kernel)
    assert log.splitlines()[-1] == "14 0.5"
    assert log.count("data loaded") == 2 and "data saved" not in log
    assert (tmp_path / "__pycache__" / LOCK_NAME).exists()


def test_a_lock_that_cannot_be_taken_still_saves(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    from llm_merge.kernels import cache as numba_cache

    saved = []
    cache_file = SimpleNamespace(_source_stamp=1, _cache_path=str(tmp_path),
                                 save=lambda key, data: saved.append((key, data)))
    kernel = SimpleNamespace(py_func=SimpleNamespace(__module__="m"), _cache=SimpleNamespace(_cache_file=cache_file))
    assert numba_cache.serialize_cache_writes({"__name__": "m", "kernel": kernel}) == 1

    def no_locks(fd, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cache_file.save("key", "data")
    assert saved == [("key", "data")]


#: A kernel module whose cached kernel allocates (so its machine code links against numba's runtime).
ALLOCATING_KERNEL = """
import sys
import numpy as np
from numba import njit
from llm_merge.kernels.cache import configure_kernel_caches

@njit(cache=True)
def squares(n):
    out = np.empty(n, np.int64)
    for i in range(n):
        out[i] = i * i
    return out

configure_kernel_caches(globals())
print(int(squares(5).sum()), "numba.np.arraymath" in sys.modules)
"""


def test_a_cached_kernel_loads_without_the_context_refresh(tmp_path):
    pytest.importorskip("numba")
    from llm_merge.kernels.cache import refresh_skip_checked

    if not refresh_skip_checked():
        pytest.skip("a numba release the refresh skip was not checked on: numba loads as it always does")
    (tmp_path / "kern.py").write_text(ALLOCATING_KERNEL)
    assert _run_kernel(tmp_path)[0] == "30 True"  # compiled: numba's compiler refreshes the context
    result, log = _run_kernel(tmp_path)
    assert "data loaded" in log
    assert result == "30 False"  # loaded and run without importing numba's NumPy implementations
