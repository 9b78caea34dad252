"""Options of a LoRA fold: one dataclass (field names are the flag names) and its checks."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llm_merge.config.validate import check_output_apart, parse_size
from llm_merge.errors import ConfigError
from llm_merge.io import dtypes, side_files
from llm_merge.lora.adapter import PADDLE_CONFIG, PEFT_CONFIG

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraMergeConfig:
    """Options of one fold; field names are the CLI flag names."""

    model_name_or_path: Optional[str] = None
    lora_path: Optional[str] = None
    output_path: Optional[str] = None
    merge_prefix: str = "model"
    output_dtype: Optional[str] = None
    max_shard_size: str = "5GB"
    n_process: int = 1
    allow_pickle: bool = False
    overwrite: bool = False
    quiet: bool = False


def resolve_config(cfg: LoraMergeConfig) -> LoraMergeConfig:
    """Validate flags (ConfigError, exit 2); fills model_name_or_path from the adapter config if absent."""
    if not cfg.lora_path:
        raise ConfigError("--lora_path: required (the adapter directory)")
    if not cfg.output_path:
        raise ConfigError("--output_path: required")
    if cfg.merge_prefix not in ("model", "master_weights"):
        raise ConfigError(f"--merge_prefix: {cfg.merge_prefix!r} is not one of model, master_weights")
    if cfg.output_dtype is not None and cfg.output_dtype not in dtypes.OUTPUT_DTYPES:
        raise ConfigError(f"--output_dtype: {cfg.output_dtype!r} is not one of {', '.join(dtypes.OUTPUT_DTYPES)}")
    if not isinstance(cfg.n_process, int) or isinstance(cfg.n_process, bool) or cfg.n_process < 1:
        raise ConfigError(f"--n_process: {cfg.n_process} must be an integer >= 1")
    parse_size(cfg.max_shard_size)
    base = cfg.model_name_or_path
    if not base:
        base = _base_from_adapter_config(Path(cfg.lora_path))
    resolved = dataclasses.replace(cfg, model_name_or_path=base)
    _check_output_path(resolved)
    return resolved


def _base_from_adapter_config(adapter: Path) -> str:
    for name in (PEFT_CONFIG, PADDLE_CONFIG):
        path = adapter / name
        if os.path.lexists(path):
            config = side_files.read_json(path, error=ConfigError)
            named = config.get("base_model_name_or_path") if isinstance(config, dict) else None
            if isinstance(named, str) and named and Path(named).is_dir():
                log.info("base model from %s: %s", path, named)
                return named
            raise ConfigError(
                f"--model_name_or_path: required ({path} names base model {named!r}, which is not a local directory)"
            )
    raise ConfigError("--model_name_or_path: required (the base model directory)")


def _check_output_path(cfg: LoraMergeConfig) -> None:
    check_output_apart(cfg.output_path, [("--model_name_or_path", cfg.model_name_or_path), ("--lora_path", cfg.lora_path)])

