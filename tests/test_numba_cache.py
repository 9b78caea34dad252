"""numba's cache is invalidated when a module that compiled kernels inline changes."""

import os

from llm_merge.backends.numba_cache import touch_if_older


def _file(path, mtime):
    path.write_text("x = 1\n")
    os.utime(path, (mtime, mtime))
    return path


def test_source_older_than_a_dependency_is_touched(tmp_path):
    source = _file(tmp_path / "kernels.py", 1_000_000)
    dependencies = [_file(tmp_path / "a.py", 900_000), _file(tmp_path / "b.py", 1_000_500)]
    assert touch_if_older(source, dependencies)
    assert source.stat().st_mtime > 1_000_500  # now, so numba's stamp for its kernels changes
    assert not touch_if_older(source, dependencies)  # once newest, left alone


def test_source_newer_than_its_dependencies_is_left_alone(tmp_path):
    source = _file(tmp_path / "kernels.py", 1_000_000)
    assert not touch_if_older(source, [_file(tmp_path / "a.py", 999_999)])
    assert source.stat().st_mtime == 1_000_000


def test_unreadable_or_missing_files_are_skipped(tmp_path):
    source = _file(tmp_path / "kernels.py", 1_000_000)
    assert not touch_if_older(source, [tmp_path / "missing.py"])
    assert not touch_if_older(tmp_path / "missing.py", [source])
    assert not touch_if_older(source, [])
    assert source.stat().st_mtime == 1_000_000


def test_the_kernels_module_is_not_older_than_what_it_inlines():
    """After import, numba_kernels.py is at least as new as the modules its kernels inline."""
    import pytest

    kernels = pytest.importorskip("llm_merge.backends.numba_kernels")
    from llm_merge.backends import numba_ranks, numba_streaming
    from llm_merge.methods import random

    newest = max(os.stat(m.__file__).st_mtime for m in (numba_streaming, numba_ranks, random))
    if os.access(kernels.__file__, os.W_OK):
        assert os.stat(kernels.__file__).st_mtime >= newest
