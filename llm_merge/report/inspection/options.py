"""Options of ``llm-merge inspect``: one dataclass (field names are the flag names) and its checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from llm_merge.config import types
from llm_merge.config.names import DEFAULT_LAYER_PATTERN, compile_layer_pattern
from llm_merge.config.options import MergeConfig, _opt
from llm_merge.config.validate import check_output_apart
from llm_merge.errors import ConfigError

TABLES = ("layer", "tensor", "none")


@dataclass(frozen=True)
class InspectConfig:
    """Options of one inspection; field names are the CLI flag names (``llm_merge.cli.inspection``)."""

    base_model_path: Optional[str] = _opt(None, "base model directory: the model the fine-tunes started from (required)")
    model_path_list: list[str] = _opt([], "checkpoint directories of the models to inspect (and later merge), in order")
    output_path: Optional[str] = _opt(
        None, "directory for inspect.json, inspect.html, suggested_config.json and suggested_recipe.yml "
        "(default: print only)"
    )
    html: bool = _opt(True, "with --output_path: write inspect.html with plots (needs pip install 'llm_merge[report]')")
    table: str = _opt("layer", "rows of the terminal table: one per layer, one per tensor, or none", TABLES)
    density_mass: float = _opt(
        0.8, "suggested densities keep this share of each model's task-vector L1 mass (each tensor trimmed on its own), "
        "in (0, 1]"
    )
    merge_prefix: str = _opt("model", "checkpoint file prefix: {prefix}.safetensors[.index.json]", ("model", "master_weights"))
    on_missing_tensor: str = _opt(
        "error", "a tensor missing from some inputs: error, or leave it out of the inspection (base, skip)",
        ("error", "base", "skip"),
    )
    tokenizer_source: Optional[str] = _opt(
        None, "when embedding / lm_head row counts differ: the vocabulary whose rows are compared (base, union or a "
        "model directory; as for merges)"
    )
    layer_pattern: str = _opt(DEFAULT_LAYER_PATTERN, "regular expression with one group, the layer number, in tensor names")
    n_process: int = _opt(1, "worker processes; changes speed only, never the figures, >= 1")
    start_method: Optional[str] = _opt(None, "how worker processes are started (default: the platform's)", ("fork", "spawn", "forkserver"))
    overwrite: bool = _opt(False, "replace a non-empty output_path")
    quiet: bool = _opt(False, "no progress bar or log lines (the table and suggestions are still printed)")

    def merge_config(self) -> MergeConfig:
        """The MergeConfig whose plan says which tensors to compare (a linear merge of the same inputs)."""
        return MergeConfig(model_path_list=list(self.model_path_list), base_model_path=self.base_model_path,
                           output_path=self.output_path or "inspect", merge_method="linear", merge_prefix=self.merge_prefix,
                           on_missing_tensor=self.on_missing_tensor, tokenizer_source=self.tokenizer_source,
                           layer_pattern=self.layer_pattern)


FIELD_TYPES = types.hints_of(InspectConfig)


def resolve_inspect_config(cfg: InspectConfig) -> InspectConfig:
    """Check every option (ConfigError, exit 2) before any work; returns ``cfg``."""
    for field in dataclasses.fields(cfg):
        problem = types.type_problem(field.name, getattr(cfg, field.name), FIELD_TYPES[field.name])
        if problem:
            raise ConfigError(f"inspect options: {problem}")
    if not cfg.base_model_path:
        raise ConfigError("--base_model_path: required (task vectors are measured from the base)")
    if not cfg.model_path_list:
        raise ConfigError("--model_path_list: at least one model directory is required")
    for field in dataclasses.fields(cfg):
        choices = field.metadata.get("choices")
        value = getattr(cfg, field.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"--{field.name}: {value!r} is not one of {', '.join(choices)}")
    if not 0 < cfg.density_mass <= 1:
        raise ConfigError(f"--density_mass: {cfg.density_mass!r} must be a fraction in (0, 1]")
    if cfg.n_process < 1:
        raise ConfigError(f"--n_process: {cfg.n_process!r} must be an integer >= 1")
    compile_layer_pattern(cfg.layer_pattern)
    if cfg.output_path:
        check_output_apart(cfg.output_path, [("input", p) for p in [cfg.base_model_path, *cfg.model_path_list]])
    return cfg
