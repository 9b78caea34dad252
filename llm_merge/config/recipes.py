"""mergekit YAML recipes -> MergeConfig, with mergekit's semantics (defaults, per-model parameters, gradients).

``python tools/mergekit.py recipe.yml OUT`` (or ``--config recipe.yml OUT``). Supported:
``merge_method``, ``base_model``, ``models`` (``model`` + ``parameters``), top-level ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source``. Parameter values may be scalars, gradients
(lists interpolated over the layers) or ``[{filter: ..., value: ...}]`` (see ``llm_merge.plan.gradients``).
Anything else is an error naming it; ``int8_mask`` is accepted and ignored (with a warning).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

from llm_merge.config.files import parse_mapping
from llm_merge.config.options import MergeConfig
from llm_merge.config.values import check_setting, config_from_dict
from llm_merge.errors import ConfigError
from llm_merge.io import side_files

log = logging.getLogger(__name__)

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "slices"}
MODEL_KEYS = {"model", "parameters"}

#: mergekit's generalized task arithmetic methods: (our merge_method, normalize default, rescale default, per-model params)
_GTA = {
    "task_arithmetic": ("task_arithmetic", False, False, ("weight",)),
    "ties": ("ties", True, False, ("weight", "density")),
    "dare_ties": ("dare_ties", False, True, ("weight", "density")),
    "dare_linear": ("dare_linear", False, True, ("weight", "density")),
    "breadcrumbs": ("breadcrumbs", False, False, ("weight", "density", "gamma")),
    "breadcrumbs_ties": ("breadcrumbs_ties", False, False, ("weight", "density", "gamma")),
    "della": ("della", True, True, ("weight", "density", "epsilon")),
    "della_linear": ("della_linear", False, True, ("weight", "density", "epsilon")),
}
#: per-model parameter -> (our scalar option, our per-model option, mergekit default, value map)
_PER_MODEL = {
    "weight": (None, "weight_list", None, float),
    "density": ("reserve_p", "reserve_p_list", 1.0, float),
    "gamma": ("gamma", "gamma_list", 0.01, float),
    "epsilon": ("epsilon", "epsilon_list", 0.15, float),  # with --semantics mergekit: density ± epsilon
}
_SHARED = {"normalize": "normalize", "rescale": "rescale", "lambda": "scale", "t": "slerp_alpha"}
_IGNORED = {"int8_mask"}
#: every parameter some mergekit method takes: others are typos (an error); these, when the method does not use them, a warning
KNOWN_PARAMETERS = {"weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t",
                    "filter_wise", "nuslerp_flatten", "nuslerp_row_wise", "scale"}
#: parameters whose values are true/false (the others are numbers)
BOOL_PARAMETERS = {"normalize", "rescale", "int8_mask", "filter_wise", "nuslerp_flatten", "nuslerp_row_wise"}
SUPPORTED_METHODS = ("linear", "slerp", "nuslerp", "model_stock", "passthrough", *_GTA)

_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16",
           "float32": "float32", "fp32": "float32", "float": "float32"}


#: YAML nodes a recipe may hold once its aliases are expanded (a real recipe has a few hundred).
MAX_RECIPE_NODES = 100_000


def load_recipe(path: str | os.PathLike) -> dict:
    """Read a YAML recipe into a dict (bounded read; alias expansion bounded by MAX_RECIPE_NODES)."""
    return read_recipe(path)[1]


def read_recipe(path: str | os.PathLike) -> tuple[str, dict]:
    """A YAML recipe's text and its mapping (one bounded read)."""
    import yaml

    label = f"recipe {path}"
    text = side_files.read_text(path, label, error=ConfigError)
    recipe = parse_mapping(text, parse_yaml, yaml.YAMLError, label, "YAML", "a mapping with merge_method, models, ...")
    return text, recipe


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load``, refusing recursive aliases and documents whose aliases expand past MAX_RECIPE_NODES.

    PyYAML shares an aliased node instead of copying it, so a few hundred bytes of nested aliases
    (a "billion laughs") load quickly but expand exponentially in whatever walks the result.
    """
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: Any, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes under ``node`` with every alias expanded; ConfigError past MAX_RECIPE_NODES or on a cycle."""
    import yaml

    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ConfigError(f"recipe: a YAML alias refers to itself (line {node.start_mark.line + 1}); refused")
    open_nodes.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes, open_nodes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, open_nodes) + _expanded_size(v, sizes, open_nodes) for k, v in node.value)
    open_nodes.discard(key)
    if size > MAX_RECIPE_NODES:
        raise ConfigError(f"recipe: its YAML aliases expand to more than {MAX_RECIPE_NODES} nodes; refused")
    sizes[key] = size
    return size


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _map_setting(setting: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every value of a setting (scalar, gradient or filter list)."""
    if _is_scalar(setting):
        return fn(setting)
    if isinstance(setting, dict) and "value" in setting:
        return {**setting, "value": _map_setting(setting["value"], fn)}
    if isinstance(setting, list):
        return [_map_setting(item, fn) for item in setting]
    raise ConfigError(f"recipe: unexpected parameter value {setting!r}")


def _model_path(entry: Any, where: str) -> str:
    if isinstance(entry, str):
        path = entry
    elif isinstance(entry, dict):
        unknown = sorted(set(entry) - MODEL_KEYS)
        if unknown:
            raise ConfigError(f"recipe: {where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(MODEL_KEYS))}")
        path = entry.get("model")
    else:
        path = None
    if not isinstance(path, str):
        raise ConfigError(f"recipe: {where}: expected a model path, got {entry!r}")
    if "+" in path and not os.path.exists(path):
        raise ConfigError(f"recipe: {where}: model+LoRA references ({path}) are not supported; fold the adapter first (llm-merge-lora)")
    return path


def recipe_to_config(recipe: dict, output_path: str, base_dir: Optional[Path] = None, **options: Any) -> MergeConfig:
    """Translate a mergekit recipe into an (unresolved) MergeConfig; ``options``: extra MergeConfig fields."""
    unknown = sorted(set(recipe) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"recipe: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(TOP_KEYS))}")
    method = recipe.get("merge_method")
    if method not in SUPPORTED_METHODS:
        raise ConfigError(f"recipe: merge_method {method!r} is not supported; valid: {', '.join(SUPPORTED_METHODS)}")

    def resolve_path(path: Optional[str]) -> Optional[str]:
        """A relative model path is read beside the recipe, never in the current directory."""
        if path is None or base_dir is None or os.path.isabs(path):
            return path
        candidate = base_dir / path
        if not os.path.lexists(candidate) and os.path.lexists(path):
            raise ConfigError(f"recipe: model {path} is read beside the recipe, as {candidate}, which does not exist "
                              f"(there is a {path} in the current directory: give its absolute path to use it)")
        return str(candidate)

    base = resolve_path(_model_path(recipe["base_model"], "base_model")) if recipe.get("base_model") is not None else None
    slices = None
    if "slices" in recipe:
        if recipe.get("models"):
            raise ConfigError("recipe: give either models or slices, not both")
        slices = _recipe_slices(recipe["slices"], resolve_path)
        # the models flow below sees the first slice's sources; every slice's parameters go into cfg.slices
        models = [(src["model"], {}) for src in slices[0]["sources"]]
    else:
        entries = recipe.get("models") or []
        if not isinstance(entries, list):
            raise ConfigError("recipe: models: expected a list of {model: ..., parameters: ...}")
        models = [(resolve_path(_model_path(e, f"models[{i}]")), (e.get("parameters") or {}) if isinstance(e, dict) else {})
                  for i, e in enumerate(entries)]
    top = recipe.get("parameters") or {}
    if not isinstance(top, dict):
        raise ConfigError("recipe: parameters: expected a mapping")
    values: dict[str, Any] = {"output_path": output_path, "semantics": "mergekit"}
    tensor_parameters: dict[str, Any] = {}
    # which parameters the method takes: shared (top-level) and per model
    if method in _GTA:
        ours, normalize_default, rescale_default, per_model = _GTA[method]
        shared = {"normalize", "rescale", "lambda", "int8_mask"}
        values.update(merge_method=ours, normalize=normalize_default, rescale=rescale_default)
    elif method == "linear":
        per_model, shared = ("weight",), {"normalize"}
        values.update(merge_method="linear", normalize=True)
    elif method == "slerp":
        per_model, shared = (), {"t"}
        values.update(merge_method="slerp")
    elif method == "nuslerp":
        per_model, shared = ("weight",), {"nuslerp_flatten", "nuslerp_row_wise"}
        values.update(merge_method="nuslerp")
    elif method == "model_stock":
        per_model, shared = (), {"filter_wise"}
        values.update(merge_method="model_stock")
    else:  # passthrough
        per_model, shared = ("scale",), set()
        values.update(merge_method="passthrough")

    top = _used_parameters(top, "parameters", method, set(per_model) | shared)
    models = [(path, _used_parameters(p, f"models[{i}].parameters", method, set(per_model)))
              for i, (path, p) in enumerate(models)]
    if slices is not None:
        values["slices"] = _slice_options(slices, method, base, set(per_model), shared, top)

    # -- which checkpoints take part, and how
    if method == "slerp":
        if base is None:
            raise ConfigError("recipe: slerp needs base_model (t = 0 gives the base, 1 the other model)")
        others = [m for m in models if m[0] != base]
        if len(others) != 1:
            raise ConfigError(f"recipe: slerp merges base_model with exactly 1 other model, got {len(others)}")
        values["model_path_list"] = [base, others[0][0]]
        models = [(base, {})] + others
    elif method == "passthrough":
        if base is not None or len(models) != 1:
            raise ConfigError("recipe: passthrough copies exactly 1 model (one source per slice) without base_model")
        values["model_path_list"] = [models[0][0]]
    elif method == "linear":
        if base is not None:
            log.warning("recipe: linear ignores base_model (list it under models to merge it)")
        values["model_path_list"] = [m[0] for m in models]
    else:
        if base is None and method != "nuslerp":
            raise ConfigError(f"recipe: {method} needs base_model")
        models = [m for m in models if m[0] != base]  # the base's task vector is zero (mergekit treats it as the base)
        values["model_path_list"] = [m[0] for m in models]
        if base is not None:
            values["base_model_path"] = base
    if not models:
        raise ConfigError("recipe: models: no models to merge")

    # -- shared parameters
    for name, setting in top.items():
        if name in per_model:
            continue
        if name in _IGNORED:
            log.warning("recipe: parameter %s is accepted and ignored (computation is always float32)", name)
        elif name in ("filter_wise", "nuslerp_flatten", "nuslerp_row_wise"):
            if not isinstance(setting, bool):
                raise ConfigError(f"recipe: parameters.{name}: expected true or false, got {setting!r}")
            values["model_stock_filter_wise" if name == "filter_wise" else name] = setting
        else:
            option = _SHARED[name]
            if _is_scalar(setting):
                values[option] = setting
            else:
                tensor_parameters[option] = setting

    # -- per-model parameters: model value, else top-level value, else mergekit's default
    for name in per_model:
        if name == "scale":  # passthrough
            setting = models[0][1].get("scale", top.get("scale"))
            if setting is not None:
                if _is_scalar(setting):
                    values["scale"] = float(setting)
                else:
                    tensor_parameters["scale"] = setting
            continue
        scalar, listed, default, fn = _PER_MODEL[name]
        settings = []
        for i, (path, params) in enumerate(models):
            setting = params.get(name, top.get(name, default))
            if setting is None:
                if slices is not None:
                    setting = 1.0  # every tensor takes its slice's value (checked by _slice_options)
                else:
                    raise ConfigError(f"recipe: models[{i}] ({path}): parameter {name} is required by {method}")
            settings.append(_map_setting(setting, fn))
        if all(_is_scalar(s) for s in settings):
            if scalar is not None and len(set(settings)) == 1:
                values[scalar] = settings[0]
            else:
                values[listed] = settings
        else:
            tensor_parameters[listed] = settings
            # defaults for tensors no filter matches: the model's scalar value, else mergekit's default
            values[listed] = [s if _is_scalar(s) else fn(default if default is not None else 1.0) for s in settings]

    if method == "nuslerp" and "weight_list" not in values:
        values["weight_list"] = [1.0, 1.0]
    values.update(_output_dtype(recipe))
    if recipe.get("tokenizer_source") is not None:
        source = recipe["tokenizer_source"]
        if source == "base" and "base_model_path" not in values and base is not None:
            source = base  # slerp: the base is merge input 0, not --base_model_path
        values["tokenizer_source"] = source if source in ("base", "union") else resolve_path(_model_path(source, "tokenizer_source"))
    if tensor_parameters:
        values["tensor_parameters"] = tensor_parameters
    values.update(options)
    return config_from_dict(values, source="recipe")


def _used_parameters(params: Any, where: str, method: str, allowed: set[str]) -> dict:
    """``params`` without those the method does not use (a warning, as mergekit ignores them); typos are an error."""
    if not isinstance(params, dict):
        raise ConfigError(f"recipe: {where}: expected a mapping")
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


def _output_dtype(recipe: dict) -> dict[str, str]:
    """``{"output_dtype": ...}`` from the recipe's out_dtype (or dtype), or {}."""
    dtype = recipe.get("out_dtype") or recipe.get("dtype")
    if dtype is None:
        return {}
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ConfigError(f"recipe: dtype {dtype!r} is not supported; valid: {', '.join(_DTYPES)}")
    return {"output_dtype": _DTYPES[dtype]}


def _recipe_slices(slices: Any, resolve_path: Callable[[Optional[str]], Optional[str]]) -> list[dict]:
    """The recipe's slices with model paths resolved (mergekit names for parameters still)."""
    if not isinstance(slices, list) or not slices:
        raise ConfigError("recipe: slices: expected a list of {sources: [{model, layer_range}, ...]}")
    out = []
    for i, s in enumerate(slices):
        if not isinstance(s, dict) or "sources" not in s or set(s) - {"sources", "parameters"}:
            bad = sorted(set(s) - {"sources", "parameters"}) if isinstance(s, dict) else [repr(s)]
            raise ConfigError(f"recipe: slices[{i}]: expected {{sources: [...], parameters: ...}}"
                              + (f"; unsupported key(s) {', '.join(bad)}" if bad else ""))
        if not isinstance(s["sources"], list) or not s["sources"]:
            raise ConfigError(f"recipe: slices[{i}].sources: expected a non-empty list of {{model, layer_range}}")
        sources = []
        for j, src in enumerate(s["sources"]):
            where = f"slices[{i}].sources[{j}]"
            bad = sorted(set(src) - {"model", "layer_range", "parameters"}) if isinstance(src, dict) else ["?"]
            if bad:
                raise ConfigError(f"recipe: {where}: unsupported key(s) {', '.join(bad)}; valid: layer_range, model, parameters")
            sources.append({"model": resolve_path(_model_path({"model": src.get("model")}, where)),
                            "layer_range": src.get("layer_range"), "parameters": src.get("parameters") or {}})
        out.append({"sources": sources, "parameters": s.get("parameters") or {}})
    return out


#: mergekit parameter name -> llm_merge option name in a slice's or source's parameters
_SLICE_NAMES = {**{name: scalar or name for name, (scalar, *_) in _PER_MODEL.items()}, **_SHARED, "scale": "scale"}


def _slice_options(slices: list[dict], method: str, base: Optional[str], per_model: set[str], shared: set[str],
                   top: dict) -> list[dict]:
    """cfg.slices: parameters renamed to llm_merge's; for slerp the base source first (it is input 0)."""
    out = []
    for i, s in enumerate(slices):
        slice_params = _used_parameters(s["parameters"], f"slices[{i}].parameters", method, per_model | shared)
        sources = []
        for j, src in enumerate(s["sources"]):
            own = _used_parameters(src["parameters"], f"slices[{i}].sources[{j}].parameters", method, per_model)
            is_base = base is not None and os.path.normpath(src["model"]) == os.path.normpath(base)
            if "weight" in per_model and method != "nuslerp" and not is_base and not any("weight" in p for p in (own, slice_params, top)):
                raise ConfigError(f"recipe: slices[{i}].sources[{j}] ({src['model']}): parameter weight is required by {method}")
            sources.append({"model": src["model"], "layer_range": src["layer_range"], "parameters": _renamed(own)})
        if method == "passthrough":  # one source: its scale is the slice's
            slice_params = {**slice_params, **{k: v for src in s["sources"] for k, v in src["parameters"].items()}}
            sources = [{**src, "parameters": {}} for src in sources]
        if method == "slerp":
            sources.sort(key=lambda src: base is None or os.path.normpath(src["model"]) != os.path.normpath(base))
        out.append({"sources": sources, "parameters": _renamed({k: v for k, v in slice_params.items() if k not in _IGNORED})})
    return out


def _renamed(params: dict) -> dict:
    """mergekit parameter settings under llm_merge's option names (values of passthrough's scale etc. as floats)."""
    out = {}
    for name, setting in params.items():
        if name in _SLICE_NAMES:
            out[_SLICE_NAMES[name]] = _map_setting(setting, lambda v: v if isinstance(v, bool) else float(v))
    return out
