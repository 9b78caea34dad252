"""mergekit's recipe parameters: their types, the llm_merge options they become, and the checks shared by
the method table (``config.recipes``): unknown keys, model references, parameters a method does not use."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, NamedTuple, Optional

from llm_merge.config.values import check_setting
from llm_merge.errors import ConfigError

log = logging.getLogger(__name__)

MODEL_KEYS = {"model", "parameters"}

class PerModelParameter(NamedTuple):
    """A mergekit parameter given per model: the model's value, else the top-level one, else ``default``."""

    option: Optional[str]  # our option when every model has the same scalar value (None: always list_option)
    list_option: str  # our option with one value per model
    default: Optional[float]  # mergekit's default; None: required


class SharedParameter(NamedTuple):
    """A mergekit parameter given once: top-level (or a slice's) ``parameters``."""

    option: Optional[str]  # our option; None: accepted and ignored, with a warning
    boolean: bool  # true/false (else a number)
    per_tensor: bool = True  # may be a gradient or filters (else one true/false for the whole merge)


PER_MODEL = {
    "weight": PerModelParameter(None, "weight_list", None),
    "density": PerModelParameter("reserve_p", "reserve_p_list", 1.0),
    "gamma": PerModelParameter("gamma", "gamma_list", 0.01),
    "epsilon": PerModelParameter("epsilon", "epsilon_list", 0.15),  # with --semantics mergekit: density ± epsilon
}


SHARED = {
    "normalize": SharedParameter("normalize", boolean=True),
    "rescale": SharedParameter("rescale", boolean=True),
    "lambda": SharedParameter("scale", boolean=False),
    "t": SharedParameter("slerp_alpha", boolean=False),
    "filter_wise": SharedParameter("model_stock_filter_wise", boolean=True, per_tensor=False),
    "nuslerp_flatten": SharedParameter("nuslerp_flatten", boolean=True, per_tensor=False),
    "nuslerp_row_wise": SharedParameter("nuslerp_row_wise", boolean=True, per_tensor=False),
    "int8_mask": SharedParameter(None, boolean=True),  # computation is always float32
    "normalize_weights": SharedParameter("multislerp_normalize_weights", boolean=True, per_tensor=False),
    "eps": SharedParameter("multislerp_eps", boolean=False),
    "max_iter": SharedParameter("karcher_max_iter", boolean=False),
    "tol": SharedParameter("karcher_tol", boolean=False),
    "select_topk": SharedParameter("sce_select_topk", boolean=False),
    "r": SharedParameter("ramplus_r", boolean=False),
    "alpha": SharedParameter("ramplus_alpha", boolean=False),
    "epsilon": SharedParameter("epsilon", boolean=False),  # ram's, once per merge (della's is per model: PER_MODEL)
}


#: passthrough's one parameter: the model's (or the top-level) factor on its tensors
PASSTHROUGH_SCALE = "scale"


#: mergekit method -> parameters it ignores silently where it does not take them although a user expects an effect
#: (sce's and ram's per-model weight, ram's per-model epsilon): an error here, unlike other unused ones (a warning)
REFUSED = {"sce": ("weight",), "ram": ("weight", "epsilon"), "ramplus_tl": ("weight", "epsilon")}


#: every parameter some mergekit method takes: others are typos (an error); these, when the method does not use them, a warning
KNOWN_PARAMETERS = {*PER_MODEL, *SHARED, PASSTHROUGH_SCALE}


#: parameters whose values are true/false (the others are numbers)
BOOL_PARAMETERS = {name for name, parameter in SHARED.items() if parameter.boolean}


_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16",
           "float32": "float32", "fp32": "float32", "float": "float32"}


def is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def map_setting(setting: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every value of a setting (scalar, gradient or filter list)."""
    if is_scalar(setting):
        return fn(setting)
    if isinstance(setting, dict) and "value" in setting:
        return {**setting, "value": map_setting(setting["value"], fn)}
    if isinstance(setting, list):
        return [map_setting(item, fn) for item in setting]
    raise ConfigError(f"recipe: unexpected parameter value {setting!r}")


def refuse_unknown_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}")


def model_path(entry: Any, where: str, lora_references: bool = True) -> str:
    if isinstance(entry, str):
        path = entry
    elif isinstance(entry, dict):
        refuse_unknown_keys(entry, MODEL_KEYS, f"recipe: {where}")
        path = entry.get("model")
    else:
        path = None
    if not isinstance(path, str):
        raise ConfigError(f"recipe: {where}: expected a model path, got {entry!r}")
    if not lora_references and "+" in path and not os.path.exists(path):
        raise ConfigError(f"recipe: {where}: model+LoRA references ({path}) are not supported here; fold the adapter "
                          "first (llm-merge-lora)")
    return path  # a merge recipe's MODEL+LORA references (``config.references``) split when the paths are resolved


def used_parameters(params: Any, where: str, method: str, allowed: set[str]) -> dict:
    """``params`` without those the method does not use (a warning, as mergekit ignores them); typos are an error,
    and so are the method's ``REFUSED`` ones."""
    if not isinstance(params, dict):
        raise ConfigError(f"recipe: {where}: expected a mapping")
    found = sorted((set(params) - allowed) & set(REFUSED.get(method, ())))
    if found:
        raise ConfigError(f"recipe: {where}: {', '.join(found)} is not taken here by merge_method {method} (mergekit's "
                          f"{method} ignores it silently); remove it")
    unknown = sorted(set(params) - KNOWN_PARAMETERS)
    if unknown:
        raise ConfigError(f"recipe: {where}: unknown parameter(s) {', '.join(unknown)}; "
                          f"merge_method {method} takes: {', '.join(sorted(allowed)) or 'none'}")
    for name, setting in params.items():
        check_setting(setting, "bool" if name in BOOL_PARAMETERS else "number", f"recipe: {where}.{name}")
    unused = sorted(set(params) - allowed)
    if unused:
        log.warning("recipe: %s: parameter(s) %s not used by merge_method %s (%s); ignored, as mergekit does",
                    where, ", ".join(unused), method, ", ".join(sorted(allowed)) or "no parameters")
    return {k: v for k, v in params.items() if k in allowed}


def output_dtype(recipe: dict) -> dict[str, str]:
    """``{"output_dtype": ...}`` from the recipe's out_dtype (or dtype), or {}."""
    dtype = recipe.get("out_dtype") or recipe.get("dtype")
    if dtype is None:
        return {}
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ConfigError(f"recipe: dtype {dtype!r} is not supported; valid: {', '.join(_DTYPES)}")
    return {"output_dtype": _DTYPES[dtype]}


#: mergekit parameter name -> llm_merge option name in a slice's or source's parameters
_SLICE_NAMES = {**{name: parameter.option or name for name, parameter in PER_MODEL.items()},
                **{name: parameter.option for name, parameter in SHARED.items() if parameter.option and parameter.per_tensor},
                PASSTHROUGH_SCALE: "scale"}


def same_path(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def renamed(params: dict) -> dict:
    """mergekit parameter settings under llm_merge's option names (values of passthrough's scale etc. as floats)."""
    out = {}
    for name, setting in params.items():
        if name in _SLICE_NAMES:
            out[_SLICE_NAMES[name]] = map_setting(setting, lambda v: v if isinstance(v, bool) else float(v))
    return out

