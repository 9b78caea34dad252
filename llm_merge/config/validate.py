"""``resolve``: every check of a MergeConfig before any work, returning a resolved copy.

Ranges, counts, method pairings, float32-finite weights, paths kept apart from the output and
multi-rank options; nothing is modified in place and nothing touches disk.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

from llm_merge.config import types
from llm_merge.config.names import compile_layer_pattern
from llm_merge.config.options import (
    MERGEKIT_SPARSIFY, METHOD_TABLE, PER_MODEL_OPTIONS, SLICE_OPTIONS, TENSOR_OPTIONS, MergeConfig,
)
from llm_merge.config.references import reference_paths
from llm_merge.config.slices import check_slices, split_sources
from llm_merge.config.values import setting_kind, check_setting, check_types
from llm_merge.config.tokenizer_tokens import check_tokenizer_options
from llm_merge.errors import ConfigError

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes of a size such as ``5GB`` (10^9), ``2GiB`` (2^30), ``500MB`` or ``1048576``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"--max_shard_size: {text!r} is not a size like 5GB, 500MB, 2GiB or a byte count")
    number, unit = match.groups()
    size = int(float(number) * _SIZE_UNITS[(unit or "").upper()])
    if size <= 0:
        raise ConfigError(f"--max_shard_size: {text!r} must be positive")
    return size


def resolve(cfg: MergeConfig) -> MergeConfig:
    """Validate ``cfg`` and return a resolved copy (method pairing and weights filled in).

    The checks run in a fixed order, so a config with several problems always reports the same one.
    """
    check_types({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, "options")
    _check_choices(cfg)
    sparsify_type, merge_type, merge_method = _resolve_method(cfg)
    weights = _check_models(cfg, merge_type)
    _check_per_model_lists(cfg, sparsify_type)
    _check_range("gamma", cfg.gamma, 0.0, 1.0)
    _check_float32("--scale", [cfg.scale])
    _check_tensor_parameters(cfg)
    if merge_type == "linear" and cfg.normalize and sum(weights) == 0:
        raise ConfigError(f"--weight_list: {weights} sums to 0, cannot normalize; use --normalize false")
    _check_sparsify_ranges(cfg, sparsify_type)
    _check_slerp_options(cfg)
    _check_run_options(cfg)
    _check_distributed(cfg)
    _check_output_path(cfg)
    return dataclasses.replace(
        cfg,
        merge_method=merge_method,
        merge_type=merge_type,
        sparsify_type=sparsify_type,
        weight_list=weights,
        model_path_list=list(cfg.model_path_list),
    )


def _check_models(cfg: MergeConfig, merge_type: str) -> list[float]:
    """The models, their weights (returned, one per model) and the merge type's input contract."""
    n_models = len(cfg.model_path_list)
    if n_models == 0:
        raise ConfigError("--model_path_list: at least one model directory is required")
    if not cfg.output_path:
        raise ConfigError("--output_path: required")
    weights = [float(w) for w in cfg.weights]
    if len(weights) != n_models:
        raise ConfigError(f"--weight_list: {len(weights)} weight(s) given for {n_models} model(s); give one per model")
    _check_float32("--weight_list", weights)
    if merge_type in ("slerp", "nuslerp") and n_models != 2:
        raise ConfigError(f"--model_path_list: {merge_type} merges exactly 2 models, got {n_models}")
    if cfg.slices is not None:
        _check_slices(cfg)
    if merge_type == "passthrough" and (n_models != 1 or cfg.base_model_path):
        raise ConfigError(f"--merge_method passthrough: copies exactly 1 model without a base, got {n_models} model(s)"
                          + (" and a base" if cfg.base_model_path else ""))
    _check_nearswap_multislerp(cfg, merge_type, weights)
    _check_karcher_arcee_fusion(cfg, merge_type)
    _check_sce_ram(cfg, merge_type)
    if merge_type == "model_stock" and (n_models < 2 or not cfg.base_model_path):
        raise ConfigError("--merge_method model_stock: needs --base_model_path and at least 2 models")
    return weights


def _check_nearswap_multislerp(cfg: MergeConfig, merge_type: str, weights: list[float]) -> None:
    """nearswap: one model, a base and --nearswap_t > 0; multislerp: weights that can be normalized, eps >= 0."""
    n_models = len(cfg.model_path_list)
    if merge_type == "nearswap":
        if n_models != 1 or not cfg.base_model_path:
            raise ConfigError(f"--merge_method nearswap: needs --base_model_path and exactly 1 model, got {n_models}"
                              + ("" if cfg.base_model_path else " and no base"))
        t = cfg.nearswap_t
        per_tensor = "nearswap_t" in (cfg.tensor_parameters or {}) or any(
            "nearswap_t" in params for s in (check_slices(cfg.slices) if cfg.slices is not None else ())
            for params in (s.parameters, *(src.parameters for src in s.sources)))
        if t is None and not per_tensor:
            raise ConfigError("--nearswap_t: None must be a number > 0 (required by nearswap)")
        if t is not None:
            check_option("nearswap_t", t, None, cfg.epsilon)
    if merge_type == "multislerp":
        if cfg.multislerp_normalize_weights and sum(weights) == 0:
            raise ConfigError(f"--weight_list: {weights} sums to 0, cannot normalize; use --multislerp_normalize_weights false")
        if not (math.isfinite(cfg.multislerp_eps) and cfg.multislerp_eps >= 0):
            raise ConfigError(f"--multislerp_eps: {cfg.multislerp_eps} must be a finite number >= 0")


def _check_karcher_arcee_fusion(cfg: MergeConfig, merge_type: str) -> None:
    """karcher: no base (every input is merged alike), max_iter >= 0, tol >= 0; arcee_fusion: a base and 1 model."""
    n_models = len(cfg.model_path_list)
    if merge_type == "karcher":
        if cfg.base_model_path:
            raise ConfigError(f"--base_model_path: {cfg.base_model_path}: karcher takes no base (it merges every input "
                              "alike, as mergekit does with a recipe's base_model): list it in --model_path_list instead")
        if cfg.karcher_max_iter < 0:
            raise ConfigError(f"--karcher_max_iter: {cfg.karcher_max_iter} must be an integer >= 0")
        if not (math.isfinite(cfg.karcher_tol) and cfg.karcher_tol >= 0):
            raise ConfigError(f"--karcher_tol: {cfg.karcher_tol} must be a finite number >= 0")
    if merge_type == "arcee_fusion" and (n_models != 1 or not cfg.base_model_path):
        raise ConfigError(f"--merge_method arcee_fusion: needs --base_model_path and exactly 1 model, got {n_models}"
                          + ("" if cfg.base_model_path else " and no base"))


#: mergekit's sce, ram and ramplus_tl: their options (checked by check_option)
SCE_RAM_OPTIONS = {"sce": ("sce_select_topk",), "ram": ("ram_epsilon",),
                   "ramplus_tl": ("ram_epsilon", "ramplus_r", "ramplus_alpha")}


def _check_sce_ram(cfg: MergeConfig, merge_type: str) -> None:
    """sce, ram, ramplus_tl: a base and at least 1 model, no weights (mergekit's take none), options in range."""
    if merge_type not in SCE_RAM_OPTIONS:
        return
    if not cfg.base_model_path:
        raise ConfigError(f"--merge_method {merge_type}: needs --base_model_path (it merges task vectors)")
    paths = [os.path.normpath(p) for p in cfg.model_path_list]
    repeated = [p for i, p in enumerate(paths) if p in paths[:i]]
    if repeated:
        raise ConfigError(f"--model_path_list: {repeated[0]} is listed twice; {merge_type} merges each model once "
                          "(mergekit refuses duplicate inputs)")
    if any(float(w) != 1.0 for w in cfg.weights):
        raise ConfigError(f"--weight_list: {cfg.weight_list}: {merge_type} does not weight models (mergekit's takes no "
                          "per-model weight); leave it out")
    for name in SCE_RAM_OPTIONS[merge_type]:
        check_option(name, getattr(cfg, name), None, cfg.epsilon)


def _check_per_model_lists(cfg: MergeConfig, sparsify_type: Optional[str]) -> None:
    """``{name}_list``: one value per model, each in the option's range."""
    n_models = len(cfg.model_path_list)
    for name in PER_MODEL_OPTIONS:
        values = getattr(cfg, f"{name}_list")
        if values is not None and len(values) != n_models:
            raise ConfigError(f"--{name}_list: {len(values)} value(s) given for {n_models} model(s); give one per model")
        for value in values or []:
            check_option(name, value, sparsify_type, cfg.epsilon)


def _check_tensor_parameters(cfg: MergeConfig) -> None:
    """tensor_parameters names only options that may vary per tensor."""
    if cfg.tensor_parameters is None:
        return
    if not isinstance(cfg.tensor_parameters, dict):
        raise ConfigError("tensor_parameters: expected an object of {option: value}")
    unknown = sorted(set(cfg.tensor_parameters) - set(TENSOR_OPTIONS))
    if unknown:
        raise ConfigError(f"tensor_parameters: option(s) {', '.join(unknown)} cannot vary per tensor; valid: {', '.join(TENSOR_OPTIONS)}")


def _check_sparsify_ranges(cfg: MergeConfig, sparsify_type: Optional[str]) -> None:
    """reserve_p and epsilon, alone and together for the DELLA sparsifiers."""
    _check_range("reserve_p", cfg.reserve_p, 0.0, 1.0, low_open=True)
    _check_range("epsilon", cfg.epsilon, 0.0, 1.0, high_open=True)
    n_models = len(cfg.model_path_list)
    if sparsify_type == "della_magprune":
        check_della_models(cfg.reserve_p_list or [cfg.reserve_p] * n_models, cfg.epsilon_list or [cfg.epsilon] * n_models,
                           "--reserve_p / --epsilon")
    if sparsify_type == "magprune":
        low, high = cfg.epsilon / 2, 1 - cfg.epsilon / 2
        if not low < cfg.reserve_p <= high + 1e-12:  # 1 - 0.14/2 is 0.9299999999999999 in floats
            raise ConfigError(
                f"--reserve_p: {cfg.reserve_p} out of range ({low:g}, {high:g}] for epsilon={cfg.epsilon:g} "
                "(magprune needs every drop probability in [0, 1))"
            )


def _check_slerp_options(cfg: MergeConfig) -> None:
    _check_range("slerp_alpha", cfg.slerp_alpha, 0.0, 1.0)
    _check_range("slerp_dot_threshold", cfg.slerp_dot_threshold, 0.0, 1.0, low_open=True)
    if not (math.isfinite(cfg.slerp_normalize_eps) and cfg.slerp_normalize_eps > 0):
        raise ConfigError(f"--slerp_normalize_eps: {cfg.slerp_normalize_eps} must be > 0")


def _check_run_options(cfg: MergeConfig) -> None:
    """Workers, seed, backend and device, shard size, tokenizer source and layer pattern."""
    if not isinstance(cfg.n_process, int) or cfg.n_process < 1:
        raise ConfigError(f"--n_process: {cfg.n_process} must be an integer >= 1")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"--seed: {cfg.seed} must be a non-negative integer")
    if cfg.tensor_type == "np" and cfg.device != "cpu":
        raise ConfigError(f"--device: {cfg.device} needs --tensor_type pd (the NumPy backend runs on the CPU)")
    parse_size(cfg.max_shard_size)
    if cfg.tokenizer_source == "base" and not cfg.base_model_path:
        raise ConfigError("--tokenizer_source base: needs --base_model_path")
    check_tokenizer_options(cfg)
    if cfg.gguf_type is not None and cfg.output_format != "gguf":
        raise ConfigError(f"--gguf_type {cfg.gguf_type}: needs --output_format gguf (output_format is {cfg.output_format})")
    compile_layer_pattern(cfg.layer_pattern)


def check_della_models(reserve_ps: list[float], epsilons: list[float], where: str) -> None:
    """mergekit's della range (density ± epsilon in (0, 1)) for every model, or ConfigError naming the model."""
    for k, (p, eps) in enumerate(zip(reserve_ps, epsilons)):
        problem = check_della_range(p, eps)
        if problem:
            raise ConfigError(f"{where} (model {k}): {problem}")


def _check_slices(cfg: MergeConfig) -> None:
    """slices agree with model_path_list (the first slice's input sources) and name known options."""
    slices = check_slices(cfg.slices)
    inputs, _ = split_sources(slices, cfg.base_model_path)
    first = [src.model for src in inputs[0]]
    if [os.path.normpath(p) for p in cfg.model_path_list] != [os.path.normpath(p) for p in first]:
        raise ConfigError(f"slices: --model_path_list must list the first slice's sources besides the base, in order: {first}")
    for i, s in enumerate(slices):
        for where, params in [(f"slices[{i}].parameters", s.parameters)] + [
                (f"slices[{i}].sources[{j}].parameters", src.parameters) for j, src in enumerate(s.sources)]:
            unknown = sorted(set(params) - set(SLICE_OPTIONS))
            if unknown:
                raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(SLICE_OPTIONS)}")
            for option, setting in params.items():
                check_setting(setting, setting_kind(option), f"{where}.{option}")


def check_option(name: str, value: Any, sparsify_type: Optional[str], epsilon: float) -> None:
    """Range check of one (per-model or per-tensor) option value."""
    if name == "reserve_p":
        _check_range(name, value, 0.0, 1.0, low_open=True)
    elif name == "epsilon":
        _check_range(name, value, 0.0, 1.0, high_open=True)
    elif name in ("gamma", "slerp_alpha"):
        _check_range(name, value, 0.0, 1.0)
    elif name in ("scale", "weight"):
        _check_float32(name, [value])
    elif name == "sce_select_topk":
        _check_range(name, value, 0.0, 1.0, low_open=True)
    elif name in ("ram_epsilon", "ramplus_r", "ramplus_alpha"):
        _check_float32(name, [value])
        _check_range(name, value, 0.0, math.inf)
    elif name == "nearswap_t" and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--nearswap_t: {value} must be a number > 0 (required by nearswap)")


def _check_float32(flag: str, values: list[float]) -> None:
    """Weights and factors stay finite in float32, where merges use them, and so does their absolute sum
    (a linear or TIES merge adds weighted values: 1e38 + 1e38 overflows)."""
    for value in values:
        if not types.finite_float32(value):
            raise ConfigError(f"--{flag.lstrip('-')}: {value} is non-finite in float32, where merges use it "
                              f"(|value| must be <= {types.FLOAT32_MAX:.4g})")
    if not types.finite_float32(math.fsum(abs(v) for v in values)):
        raise ConfigError(f"--{flag.lstrip('-')}: {values} sum past the float32 range ({types.FLOAT32_MAX:.4g})")


def _check_choices(cfg: MergeConfig) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"--{f.name}: {value!r} is not one of {', '.join(choices)}")


def _resolve_method(cfg: MergeConfig) -> tuple[str, str, Optional[str]]:
    if cfg.merge_method is not None:
        sparsify_type, merge_type = METHOD_TABLE[cfg.merge_method]
        if cfg.semantics == "mergekit":
            sparsify_type = MERGEKIT_SPARSIFY.get(sparsify_type, sparsify_type)
        for flag, given, implied in (("sparsify_type", cfg.sparsify_type, sparsify_type), ("merge_type", cfg.merge_type, merge_type)):
            if given is not None and given != implied:
                raise ConfigError(
                    f"--{flag}: {given!r} contradicts --merge_method {cfg.merge_method} (which uses {flag} {implied!r}); "
                    f"drop --{flag} or --merge_method"
                )
        return sparsify_type, merge_type, cfg.merge_method
    sparsify_type = cfg.sparsify_type or "none"
    merge_type = cfg.merge_type or "linear"
    named = [name for name, pair in METHOD_TABLE.items() if pair == (sparsify_type, merge_type)]
    return sparsify_type, merge_type, (named[0] if named else None)


def _check_range(flag: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"--{flag}: {value} out of range {interval}")


def input_paths(cfg: MergeConfig) -> list[str]:
    """Every directory a merge reads: models, base, slice sources and a tokenizer source given as a path
    (a ``MODEL+LORA`` reference: both directories)."""
    paths = [*cfg.model_path_list, *([cfg.base_model_path] if cfg.base_model_path else [])]
    if cfg.slices is not None:
        paths += [src.model for s in check_slices(cfg.slices) for src in s.sources]
    if cfg.tokenizer_source not in (None, "base", "union"):
        paths.append(cfg.tokenizer_source)
    return list(dict.fromkeys(path for given in paths for path in reference_paths(given)))


def _check_output_path(cfg: MergeConfig) -> None:
    check_output_apart(cfg.output_path, [("input", given) for given in input_paths(cfg)])


def check_output_apart(output_path: str, inputs: list[tuple[str, str]]) -> None:
    """The output is none of the inputs, inside none and holds none, and holds neither the current nor the
    home directory: ``--overwrite`` can never replace an input or the directory the user works in.
    ``inputs``: (what, path) pairs, ``what`` naming the flag or role in the message."""
    output = Path(os.path.realpath(output_path))
    for what, given in inputs:
        source = Path(os.path.realpath(given))
        if output == source or source in output.parents:
            raise ConfigError(f"--output_path: {output_path} is {'the same as' if output == source else 'inside'} {what} {given}; "
                              "choose another directory")
        if output in source.parents:
            raise ConfigError(f"--output_path: {output_path} contains {what} {given}; choose another directory")
    for what, place in (("the current directory", os.getcwd()), ("the home directory", os.path.expanduser("~"))):
        place = Path(os.path.realpath(place))
        if output == place or output in place.parents:
            raise ConfigError(f"--output_path: {output_path} is or contains {what}; choose another directory")


def _check_distributed(cfg: MergeConfig) -> None:
    if (cfg.rank is None) != (cfg.world_size is None):
        raise ConfigError("--rank and --world_size: give both or neither")
    if cfg.world_size is not None:
        if not isinstance(cfg.world_size, int) or cfg.world_size < 1:
            raise ConfigError(f"--world_size: {cfg.world_size} must be an integer >= 1")
        if not isinstance(cfg.rank, int) or not 0 <= cfg.rank < cfg.world_size:
            raise ConfigError(f"--rank: {cfg.rank} out of range [0, {cfg.world_size})")
    if not (isinstance(cfg.dist_timeout, (int, float)) and math.isfinite(cfg.dist_timeout) and cfg.dist_timeout > 0):
        raise ConfigError(f"--dist_timeout: {cfg.dist_timeout} must be > 0 seconds")
    heartbeat_timeout = cfg.dist_heartbeat_timeout
    if not (types.is_number(heartbeat_timeout) and math.isfinite(heartbeat_timeout) and heartbeat_timeout > 0):
        raise ConfigError(f"--dist_heartbeat_timeout: {heartbeat_timeout} must be a finite number of seconds > 0")



def check_della_range(reserve_p: float, epsilon: float) -> Optional[str]:
    """mergekit's condition on della's density and epsilon, as an error message (None: fine)."""
    if reserve_p >= 1.0 or (reserve_p - epsilon > 0 and reserve_p + epsilon < 1):
        return None
    return (f"density {reserve_p:g} with epsilon {epsilon:g}: mergekit's della needs density - epsilon > 0 and "
            f"density + epsilon < 1 (every keep probability in (0, 1))")
