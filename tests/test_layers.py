"""The package's structure: imports point down the rooms of .importlinter, and modules stay a size a
newcomer can hold."""

import ast
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


#: Lines a module may have; a longer one says why in its docstring, with this phrase.
MAX_MODULE_LINES = 400
LONGER_BECAUSE = "Longer than 400 lines because"


@pytest.mark.parametrize("module", sorted((REPO / "llm_merge").rglob("*.py")), ids=lambda p: p.name)
def test_modules_are_short_or_say_why(module):
    text = module.read_text()
    if text.count("\n") > MAX_MODULE_LINES:
        docstring = ast.get_docstring(ast.parse(text)) or ""
        assert LONGER_BECAUSE in docstring, f"{module.name}: {text.count(chr(10))} lines and no reason in its docstring"
