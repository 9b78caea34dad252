"""Parity with the real mergekit: every configs/*.yml and tools/mergekit_recipes/*.yml recipe, run by both
tools on one toy family.

Skipped unless ``mergekit`` and ``torch`` import and the ``mergekit-yaml`` command is found (next to
this interpreter or on PATH). Uses ``tools/compare_with_mergekit.py`` in a subprocess.

The family is float32 with large fine-tune deltas (``--delta_scale 0.5``), so |delta| has no exact
ties: with bf16 checkpoints, magnitude top-k (ties, breadcrumbs) keeps tied entries in an order that
torch's argsort leaves unspecified, and element-wise parity is not defined there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("mergekit")

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yml")) + sorted((REPO / "tools" / "mergekit_recipes").glob("*.yml"))


def _mergekit_cmd() -> str:
    local = Path(sys.executable).parent / "mergekit-yaml"
    found = str(local) if local.exists() else shutil.which("mergekit-yaml")
    if not found:
        pytest.skip("mergekit-yaml not found")
    return found


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parity") / "fam"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_toy_models.py"), str(out), "--layers", "4",
                    "--dtype", "float32", "--delta_scale", "0.5", "--seed", "1"],
                   check=True, capture_output=True, cwd=REPO)
    subprocess.run([sys.executable, str(REPO / "tools" / "mergekit_recipes" / "extra_inputs.py"), str(out)],
                   check=True, capture_output=True, cwd=REPO)  # tok_*, lora_ft1
    return out


@pytest.mark.parametrize("recipe", RECIPES, ids=[f"{r.parent.name}/{r.stem}" for r in RECIPES])
def test_recipe_matches_mergekit(recipe: Path, family: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "compare_with_mergekit.py"), str(recipe), "--family", str(family),
         "--work", str(tmp_path / "work"), "--seeds", "2", "--mergekit", _mergekit_cmd(), "--failures_only"],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
