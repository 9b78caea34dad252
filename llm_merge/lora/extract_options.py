"""Options of a LoRA extraction: one dataclass (field names are the flag names) and its checks."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Optional

from llm_merge.config.options import _opt
from llm_merge.config.types import is_integer, is_number
from llm_merge.config.validate import check_output_apart
from llm_merge.errors import ConfigError

# Literals rather than imports: this module is imported by the command line before NumPy, so that
# OPENBLAS_NUM_THREADS can still be set (cli.common.one_blas_thread); io.dtypes and lora.adapter import NumPy.
#: --format: lora.adapter's PEFT and PADDLE.
FORMATS = ("peft", "paddle")
#: --output_dtype: io.dtypes.OUTPUT_DTYPES.
FACTOR_DTYPES = ("bfloat16", "float16", "float32")
#: --merge_prefix: lora.options.MERGE_PREFIXES.
MERGE_PREFIXES = ("model", "master_weights")

#: --embed_mode: embeddings and output heads copied whole when changed, or given low-rank adapters.
EMBED_MODES = ("save", "lora")
#: --max_rank when --energy or --sv_epsilon picks the ranks and --max_rank is not given.
DEFAULT_MAX_RANK = 128


@dataclass(frozen=True)
class RankRule:
    """How many singular values a module keeps: exactly one of ``rank``, ``energy``, ``sv_epsilon``
    (``lora.lowrank.choose_rank``); the adaptive rules never go above ``max_rank``."""

    rank: Optional[int] = None
    energy: Optional[float] = None
    sv_epsilon: Optional[float] = None
    max_rank: int = DEFAULT_MAX_RANK

    def candidates(self, shape: tuple[int, ...]) -> int:
        """How many leading singular triplets to compute for a matrix of ``shape``."""
        return min(self.rank if self.rank is not None else self.max_rank, *shape)


@dataclass(frozen=True)
class ExtractConfig:
    """Options of one extraction; field names are the CLI flag names (``llm_merge.cli.extract_lora``)."""

    base_model_path: Optional[str] = _opt(None, "base model directory: the model the fine-tune started from")
    model_path: Optional[str] = _opt(None, "fine-tuned model directory (same tensor names and shapes as the base)")
    output_path: Optional[str] = _opt(None, "directory to write the adapter to")
    rank: Optional[int] = _opt(None, "fixed LoRA rank of every module (at most the module's smaller dimension)")
    energy: Optional[float] = _opt(
        None, "adaptive rank: per module, the smallest rank keeping this fraction of the update's squared "
        "singular values, in (0, 1]"
    )
    sv_epsilon: Optional[float] = _opt(
        None, "adaptive rank: per module, keep the singular values of the update above this value (>= 0)"
    )
    max_rank: Optional[int] = _opt(
        None, f"largest rank --energy or --sv_epsilon may choose (default {DEFAULT_MAX_RANK}); not with --rank"
    )
    include: list[str] = _opt([], "regular expressions: only tensors whose name matches one go into the adapter")
    exclude: list[str] = _opt([], "regular expressions: tensors whose name matches one are left out of the adapter")
    embed_mode: str = _opt(
        "save", "embeddings and lm_head: 'save' stores changed ones whole (modules_to_save), "
        "'lora' extracts low-rank adapters (PEFT only)", EMBED_MODES
    )
    format: str = _opt("peft", "adapter format: Hugging Face PEFT or PaddleNLP", FORMATS)
    output_dtype: str = _opt("float32", "dtype of the LoRA factors (saved tensors keep the fine-tune's)", FACTOR_DTYPES)
    merge_prefix: str = _opt("model", "checkpoint prefix of both models: {prefix}.safetensors[.index.json]", MERGE_PREFIXES)
    n_process: int = _opt(1, "worker processes (modules are shared out); changes speed only, never the output bytes")
    overwrite: bool = _opt(False, "replace a non-empty output_path")
    quiet: bool = _opt(False, "no progress bar, log lines or report table")

    def rank_rule(self) -> RankRule:
        """The resolved rank rule (call on a resolved config)."""
        return RankRule(rank=self.rank, energy=self.energy, sv_epsilon=self.sv_epsilon,
                        max_rank=self.max_rank if self.max_rank is not None else DEFAULT_MAX_RANK)


def resolve_extract_config(cfg: ExtractConfig) -> ExtractConfig:
    """Check every option (ConfigError, exit 2) before any work; returns ``cfg``."""
    for flag in ("base_model_path", "model_path", "output_path"):
        if not getattr(cfg, flag):
            raise ConfigError(f"--{flag}: required")
    _check_rank_rule(cfg)
    for flag in ("include", "exclude"):
        _check_patterns(flag, getattr(cfg, flag))
    _check_choice("embed_mode", cfg.embed_mode, EMBED_MODES)
    _check_choice("format", cfg.format, FORMATS)
    _check_choice("output_dtype", cfg.output_dtype, FACTOR_DTYPES)
    _check_choice("merge_prefix", cfg.merge_prefix, MERGE_PREFIXES)
    if cfg.format == "paddle" and cfg.embed_mode == "lora":
        raise ConfigError("--embed_mode lora: PaddleNLP has no LoRA layer for embeddings; use --embed_mode save with --format paddle")
    if not is_integer(cfg.n_process) or cfg.n_process < 1:
        raise ConfigError(f"--n_process: {cfg.n_process!r} must be an integer >= 1")
    for flag in ("overwrite", "quiet"):
        if not isinstance(getattr(cfg, flag), bool):
            raise ConfigError(f"--{flag}: {getattr(cfg, flag)!r}, expected true or false")
    if os.path.realpath(cfg.base_model_path) == os.path.realpath(cfg.model_path):
        raise ConfigError(f"--model_path: {cfg.model_path} is the base model itself; give the fine-tune")
    check_output_apart(cfg.output_path, [("--base_model_path", cfg.base_model_path), ("--model_path", cfg.model_path)])
    return cfg


def _check_rank_rule(cfg: ExtractConfig) -> None:
    given = [flag for flag in ("rank", "energy", "sv_epsilon") if getattr(cfg, flag) is not None]
    if not given:
        raise ConfigError("--rank, --energy or --sv_epsilon: give one (a fixed rank, or an adaptive rule per module)")
    if len(given) > 1:
        raise ConfigError(f"--{' and --'.join(given)}: give only one of --rank, --energy and --sv_epsilon")
    if cfg.rank is not None and not (is_integer(cfg.rank) and cfg.rank >= 1):
        raise ConfigError(f"--rank: {cfg.rank!r} must be an integer >= 1")
    if cfg.energy is not None and not (is_number(cfg.energy) and 0 < cfg.energy <= 1):
        raise ConfigError(f"--energy: {cfg.energy!r} must be a fraction in (0, 1]")
    if cfg.sv_epsilon is not None and not (is_number(cfg.sv_epsilon) and math.isfinite(cfg.sv_epsilon) and cfg.sv_epsilon >= 0):
        raise ConfigError(f"--sv_epsilon: {cfg.sv_epsilon!r} must be a finite number >= 0")
    if cfg.max_rank is not None:
        if cfg.rank is not None:
            raise ConfigError("--max_rank: caps --energy and --sv_epsilon only; with --rank it has no meaning")
        if not (is_integer(cfg.max_rank) and cfg.max_rank >= 1):
            raise ConfigError(f"--max_rank: {cfg.max_rank!r} must be an integer >= 1")


def _check_patterns(flag: str, patterns: list) -> None:
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"--{flag}: {patterns!r}, expected a list of regular expressions")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"--{flag}: {pattern!r} is not a valid regular expression ({exc})") from None


def _check_choice(flag: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"--{flag}: {value!r} is not one of {', '.join(choices)}")
