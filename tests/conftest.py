"""Shared fixtures: run the CLI in a subprocess, make a tiny two-model family."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from checkpoints import write_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run_mergekit(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """``python tools/mergekit.py ARGS`` from the repository root."""
    cmd = [sys.executable, str(REPO / "tools" / "mergekit.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def mergekit():
    return run_mergekit


@pytest.fixture
def pair(tmp_path):
    """Base + two fp32 fine-tunes with two float tensors and one int tensor."""
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(8, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32),
            "ids": np.arange(4, dtype=np.int64)}
    dirs = {"base": write_checkpoint(tmp_path / "base", base)}
    for name in ("ft1", "ft2"):
        tensors = {k: (v + 0.1 * rng.normal(size=v.shape).astype(np.float32) if v.dtype == np.float32 else v) for k, v in base.items()}
        dirs[name] = write_checkpoint(tmp_path / name, tensors)
    return dirs
