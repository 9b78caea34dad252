"""Option values from files and recipes, typed: a config dict becomes a MergeConfig only when every value
already has its option's type (``config.types``), per-tensor settings included."""

from __future__ import annotations

import math
from typing import Any

from llm_merge.config import types
from llm_merge.config.options import FIELD_NAMES, FIELD_TYPES, TENSOR_OPTIONS, MergeConfig
from llm_merge.errors import ConfigError

def config_from_dict(values: dict[str, Any], source: str = "config") -> MergeConfig:
    """Build a MergeConfig from a dict, rejecting unknown keys and values of the wrong type by name."""
    unknown = sorted(set(values) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(FIELD_NAMES))}")
    check_types(values, source)
    return MergeConfig(**values)


def check_types(values: dict[str, Any], source: str) -> None:
    """Every value has its option's type (no truthiness, no numbers in strings), or ConfigError naming it."""
    for name, value in values.items():
        problem = types.type_problem(name, value, FIELD_TYPES[name])
        if problem:
            raise ConfigError(f"{source}: {problem}")
    tensor_parameters = values.get("tensor_parameters")
    if isinstance(tensor_parameters, dict):
        for option, setting in tensor_parameters.items():
            if option in TENSOR_OPTIONS:
                check_setting(setting, setting_kind(option), f"{source}: tensor_parameters.{option}",
                              per_model=option.endswith("_list"))


def setting_kind(option: str) -> str:
    """``bool`` or ``number``: the type of every value a per-tensor setting of ``option`` may hold."""
    hint = FIELD_TYPES.get(option.removesuffix("_list") if option != "weight_list" else option)
    return "bool" if hint is bool else "number"


def check_setting(setting: Any, kind: str, where: str, per_model: bool = False) -> None:
    """A per-tensor setting (scalar, gradient list, ``{filter, value}`` entries; ``per_model``: one per model)
    holds only values of ``kind`` (``bool`` or ``number``), or ConfigError naming ``where``."""
    if per_model:
        if not isinstance(setting, list):
            raise ConfigError(f"{where}: got {types.kind_of(setting)}, expected a list with one setting per model")
        for k, item in enumerate(setting):
            check_setting(item, kind, f"{where}[{k}]")
        return
    fits = isinstance(setting, bool) if kind == "bool" else types.is_number(setting)
    if fits:
        if kind == "number" and not math.isfinite(setting):
            raise ConfigError(f"{where}: {setting} is not a finite number")
        return
    if isinstance(setting, dict):
        if "value" not in setting or set(setting) - {"filter", "value"}:
            raise ConfigError(f"{where}: expected {{filter: ..., value: ...}}, got keys {', '.join(map(str, setting))}")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise ConfigError(f"{where}.filter: got {types.kind_of(setting['filter'])}, expected a string or null")
        check_setting(setting["value"], kind, f"{where}.value")
    elif isinstance(setting, list) and setting:
        for i, item in enumerate(setting):
            check_setting(item, kind, f"{where}[{i}]")
    else:
        wanted = "true or false" if kind == "bool" else "a number"
        raise ConfigError(f"{where}: got {types.kind_of(setting)}, expected {wanted}, a list of them or filter entries")

