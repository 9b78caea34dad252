"""Options of ``llm-merge-moe``: the recipe and output, and the run's own flags (one dataclass, the flag names)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llm_merge.config.options import _opt
from llm_merge.config.types import is_integer
from llm_merge.config.validate import check_output_apart, parse_size
from llm_merge.errors import ConfigError

#: --merge_prefix: the checkpoints' file prefixes ({prefix}.safetensors[.index.json]).
MERGE_PREFIXES = ("model", "master_weights")


@dataclass(frozen=True)
class MoeConfig:
    """One MoE build; field names are the flag names of ``llm_merge.cli.moe`` (recipe and output are positional)."""

    recipe: Optional[str] = _opt(None, "mergekit-moe YAML recipe")
    output_path: Optional[str] = _opt(None, "directory to write the MoE model to")
    seed: int = _opt(42, "seed of the counter-based draws: random / uniform_random router weights and noise_scale")
    n_process: int = _opt(1, "worker processes writing tensors; changes speed only, never the output bytes")
    max_shard_size: str = _opt("5GB", "largest output shard, e.g. 5GB, 500MB, 2GiB or a byte count")
    merge_prefix: str = _opt("model", "checkpoint prefix of every input and of the output", MERGE_PREFIXES)
    overwrite: bool = _opt(False, "replace a non-empty output_path")
    quiet: bool = _opt(False, "no progress bar or summary lines")


def check_options(cfg: MoeConfig) -> None:
    """Every flag's value (ConfigError, exit 2), before the recipe is read."""
    if not cfg.recipe or not cfg.output_path:
        raise ConfigError("usage: llm-merge-moe RECIPE.yml OUTPUT_DIR [--n_process N] [--seed S] [--overwrite] ...")
    if not is_integer(cfg.n_process) or cfg.n_process < 1:
        raise ConfigError(f"--n_process: {cfg.n_process!r} must be an integer >= 1")
    if not is_integer(cfg.seed):
        raise ConfigError(f"--seed: {cfg.seed!r} must be an integer")
    if cfg.merge_prefix not in MERGE_PREFIXES:
        raise ConfigError(f"--merge_prefix: {cfg.merge_prefix!r} is not one of {', '.join(MERGE_PREFIXES)}")
    parse_size(cfg.max_shard_size)


def check_output(cfg: MoeConfig, inputs: list[tuple[str, str]]) -> None:
    """The output is none of the inputs (base, experts, the recipe), inside none and holds none."""
    check_output_apart(cfg.output_path, [("the recipe", cfg.recipe), *inputs])
