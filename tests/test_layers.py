"""The package's structure: imports point down the rooms of .importlinter."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_imports_point_down_the_rooms():
    """``lint-imports``, in its own process (import-linter reconfigures logging)."""
    pytest.importorskip("importlinter", reason="pip install import-linter (the test extra)")
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(REPO / '.importlinter')!r}, no_cache=True))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
