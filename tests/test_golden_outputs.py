"""Recorded output bytes: every method x (with base, without) x (bfloat16, float32) on a tiny family,
and every ``configs/`` example on the README's toy family, hashed and compared with
``golden_outputs.json``. A change of code layout must leave every hash as it is.

Regenerate only when the math is meant to change: ``LLM_MERGE_REGENERATE_GOLDEN=1 python3 -m pytest
tests/test_golden_outputs.py``, and say why in the commit.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from checkpoints import make_llama_family
from conftest import REPO
from llm_merge.api import merge
from llm_merge.config.options import METHOD_TABLE, MergeConfig
from llm_merge.errors import MergeError

GOLDEN = Path(__file__).with_name("golden_outputs.json")
REGENERATE = os.environ.get("LLM_MERGE_REGENERATE_GOLDEN") == "1"
CONFIGS = sorted((REPO / "configs").glob("*.json")) + sorted((REPO / "configs").glob("*.yml"))
PLACEHOLDERS = {"BASE": "base", "MODEL_A": "ft1", "MODEL_B": "ft2", "MODEL_C": "ft3"}


def output_hash(directory: Path) -> str:
    """SHA-256 over the weight files and the index (in name order); records that name paths are left out."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.name.endswith((".safetensors", ".safetensors.index.json")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def golden():
    return {} if REGENERATE else json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def recorded():
    found: dict[str, str] = {}
    yield found
    if REGENERATE:
        previous = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        GOLDEN.write_text(json.dumps({**previous, **found}, indent=1, sort_keys=True) + "\n")


def check(case: str, value: str, golden: dict, recorded: dict) -> None:
    recorded[case] = value
    if not REGENERATE:
        assert value == golden[case], f"{case}: output bytes changed"


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return {name: make_llama_family(tmp_path_factory.mktemp(name), n_models=3, dtype=dtype, seed=7)
            for name, dtype in (("bf16", "bfloat16"), ("fp32", np.float32))}


def method_options(method: str, family, with_base: bool) -> dict | None:
    """The merge's inputs for one case, or None where the method does not take that input shape."""
    models = [str(d) for d in family.model_dirs]
    base = str(family.base_dir) if with_base else None
    if method in ("slerp", "nuslerp"):
        models = models[:2]
    if method == "passthrough":
        return None if with_base else {"model_path_list": models[:1]}
    if method == "model_stock" and not with_base:
        return None
    if method == "nearswap":  # a base and one model
        return {"model_path_list": models[:1], "base_model_path": base, "nearswap_t": 0.01} if with_base else None
    if method == "arcee_fusion":  # a base and one model
        return {"model_path_list": models[:1], "base_model_path": base} if with_base else None
    if method == "karcher":  # every input merged alike, no base
        return None if with_base else {"model_path_list": models}
    if method in ("sce", "ram", "ramplus_tl"):  # task vectors against a base, no per-model weights
        return {"model_path_list": models, "base_model_path": base, "sce_select_topk": 0.6, "ram_epsilon": 0.005} \
            if with_base else None
    return {"model_path_list": models, "base_model_path": base, "weight_list": [0.5, 0.3, 0.2][:len(models)],
            "reserve_p": 0.6, "epsilon": 0.1}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
@pytest.mark.parametrize("method", sorted(METHOD_TABLE))
def test_method_output_bytes(tmp_path, families, golden, recorded, method, with_base, dtype):
    if dtype == "bf16":
        pytest.importorskip("ml_dtypes")
    options = method_options(method, families[dtype], with_base)
    if options is None:
        pytest.skip(f"{method} does not take this input shape")
    out = tmp_path / "out"
    try:
        merge(MergeConfig(merge_method=method, output_path=str(out), quiet=True, **options))
    except MergeError as exc:  # the refusal itself is recorded: it must not change either
        value = f"error: {type(exc).__name__}"
    else:
        value = output_hash(out)
    check(f"{method}-{'base' if with_base else 'nobase'}-{dtype}", value, golden, recorded)


@pytest.fixture(scope="module")
def toy_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_toy_models.py"), str(root / "toy_models")], check=True,
                   capture_output=True)
    return root


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_example_output_bytes(toy_family, golden, recorded, config):
    text = config.read_text()
    for placeholder, name in PLACEHOLDERS.items():
        text = text.replace(placeholder, str(toy_family / "toy_models" / name))
    local = toy_family / config.name
    local.write_text(text)
    out = toy_family / "merged" / config.stem
    args = [str(local), str(out)] if config.suffix == ".yml" else [str(local), "--output_path", str(out)]
    result = subprocess.run([sys.executable, str(REPO / "tools" / "mergekit.py"), *args, "--overwrite", "--quiet"],
                            cwd=toy_family, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    check(f"configs/{config.name}", output_hash(out), golden, recorded)
