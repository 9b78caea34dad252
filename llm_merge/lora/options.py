"""Options of a LoRA fold: one dataclass (field names are the flag names) and its checks."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llm_merge.config.options import _opt
from llm_merge.config.validate import check_output_apart, parse_size
from llm_merge.errors import ConfigError
from llm_merge.io import dtypes, side_files
from llm_merge.io.gguf_output import GGUF_TYPES, import_gguf
from llm_merge.lora.adapter import PADDLE_CONFIG, PEFT_CONFIG

log = logging.getLogger(__name__)

#: the base checkpoint's file prefixes: {prefix}.safetensors[.index.json]
MERGE_PREFIXES = ("model", "master_weights")


@dataclass(frozen=True)
class LoraMergeConfig:
    """Options of one fold; field names are the CLI flag names (``llm_merge.cli.lora``), their metadata the flags' help."""

    model_name_or_path: Optional[str] = _opt(
        None, "base model directory (default: base_model_name_or_path of the adapter config, if a local directory)"
    )
    lora_path: Optional[str] = _opt(
        None, "adapter directory: adapter_config.json (PEFT) or lora_config.json (PaddleNLP) and its weights"
    )
    output_path: Optional[str] = _opt(None, "directory to write the merged model to")
    merge_prefix: str = _opt("model", "base checkpoint prefix: {prefix}.safetensors[.index.json]", MERGE_PREFIXES)
    output_dtype: Optional[str] = _opt(None, "dtype of float tensors (default: the base's)", tuple(dtypes.OUTPUT_DTYPES))
    max_shard_size: str = _opt("5GB", "largest output shard, e.g. 5GB, 500MB, 2GiB or a byte count")
    n_process: int = _opt(1, "worker processes; changes speed only, never the output bytes")
    allow_pickle: bool = _opt(
        False, "load a PaddleNLP lora_model_state.pdparams (a pickle: it can execute code; only for trusted files)"
    )
    output_format: str = _opt(
        "safetensors", "output files: {prefix}.safetensors shards, or one {prefix}.gguf file for llama.cpp (pip install 'llm_merge[gguf]')",
        ("safetensors", "gguf"),
    )
    gguf_type: Optional[str] = _opt(
        None, "--output_format gguf: type of the matrices (1-D tensors, norms and biases stay F32; default: the output dtype)",
        GGUF_TYPES,
    )
    overwrite: bool = _opt(False, "replace a non-empty output_path")
    quiet: bool = _opt(False, "no progress bar or summary lines")


def resolve_config(cfg: LoraMergeConfig) -> LoraMergeConfig:
    """Validate flags (ConfigError, exit 2); fills model_name_or_path from the adapter config if absent."""
    if not cfg.lora_path:
        raise ConfigError("--lora_path: required (the adapter directory)")
    if not cfg.output_path:
        raise ConfigError("--output_path: required")
    if cfg.merge_prefix not in MERGE_PREFIXES:
        raise ConfigError(f"--merge_prefix: {cfg.merge_prefix!r} is not one of {', '.join(MERGE_PREFIXES)}")
    if cfg.output_dtype is not None and cfg.output_dtype not in dtypes.OUTPUT_DTYPES:
        raise ConfigError(f"--output_dtype: {cfg.output_dtype!r} is not one of {', '.join(dtypes.OUTPUT_DTYPES)}")
    if not isinstance(cfg.n_process, int) or isinstance(cfg.n_process, bool) or cfg.n_process < 1:
        raise ConfigError(f"--n_process: {cfg.n_process} must be an integer >= 1")
    _check_gguf(cfg)
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


def _check_gguf(cfg: LoraMergeConfig) -> None:
    if cfg.output_format not in ("safetensors", "gguf"):
        raise ConfigError(f"--output_format: {cfg.output_format!r} is not one of safetensors, gguf")
    if cfg.gguf_type is not None and cfg.gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf_type: {cfg.gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    if cfg.gguf_type is not None and cfg.output_format != "gguf":
        raise ConfigError(f"--gguf_type {cfg.gguf_type}: needs --output_format gguf (output_format is {cfg.output_format})")
    if cfg.output_format == "gguf":
        import_gguf()


def _check_output_path(cfg: LoraMergeConfig) -> None:
    check_output_apart(cfg.output_path, [("--model_name_or_path", cfg.model_name_or_path), ("--lora_path", cfg.lora_path)])

