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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from llm_merge.config.options import MergeConfig
from llm_merge.config.references import map_paths
from llm_merge.config.recipe_parameters import (
    PASSTHROUGH_SCALE, PER_MODEL, SHARED, is_scalar, map_setting, model_path, output_dtype, refuse_unknown_keys, renamed, same_path, used_parameters,
)
from llm_merge.config.tokenizer_tokens import checked_tokens
from llm_merge.config.values import config_from_dict
from llm_merge.errors import ConfigError

log = logging.getLogger(__name__)


TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "slices",
            "tokenizer", "chat_template"}




#: (path, mergekit parameters) of each model a recipe lists
Models = list[tuple[str, dict]]


# -- which checkpoints take part, and as what: (models whose parameters count, MergeConfig values)
def _task_vector_inputs(method: str, models: Models, base: Optional[str]) -> tuple[Models, dict]:
    """Task vectors against base_model, which is required."""
    if base is None:
        raise ConfigError(f"recipe: {method} needs base_model")
    return _without_base(models, base)


def _optional_base_inputs(method: str, models: Models, base: Optional[str]) -> tuple[Models, dict]:
    """nuslerp: task vectors against base_model when it is given, else the models themselves."""
    return _without_base(models, base)


def _without_base(models: Models, base: Optional[str]) -> tuple[Models, dict]:
    """The models other than the base (its task vector is zero: mergekit treats it as the base)."""
    models = [m for m in models if m[0] != base]
    values: dict[str, Any] = {"model_path_list": [m[0] for m in models]}
    if base is not None:
        values["base_model_path"] = base
    return models, values


def _base_first_inputs(method: str, models: Models, base: Optional[str]) -> tuple[Models, dict]:
    """slerp: base_model is merge input 0 (t = 0 gives it) and exactly one other model input 1."""
    if base is None:
        raise ConfigError(f"recipe: {method} needs base_model (t = 0 gives the base, 1 the other model)")
    others = [m for m in models if m[0] != base]
    if len(others) != 1:
        raise ConfigError(f"recipe: {method} merges base_model with exactly 1 other model, got {len(others)}")
    return [(base, {})] + others, {"model_path_list": [base, others[0][0]]}


def _base_and_one_inputs(method: str, models: Models, base: Optional[str]) -> tuple[Models, dict]:
    """nearswap: base_model and exactly one other model, whose task vector is merged."""
    models, values = _task_vector_inputs(method, models, base)
    if len(models) != 1:
        raise ConfigError(f"recipe: {method} merges base_model with exactly 1 other model, got {len(models)}")
    return models, values


def _base_last_inputs(method: str, models: Models, base: Optional[str]) -> tuple[Models, dict]:
    """karcher: the models, then base_model unless listed, all merged alike (mergekit appends the base)."""
    models = models + [(base, {})] if base is not None and not any(same_path(m[0], base) for m in models) else models
    return models, {"model_path_list": [m[0] for m in models]}


def _renamed_options(values: dict, renames: Mapping[str, str]) -> dict:
    """``values`` (and their tensor_parameters and slice parameters) with options renamed as the method reads them."""
    def rename(mapping: dict) -> dict:
        return {renames.get(k, k): v for k, v in mapping.items()}

    out = rename(values)
    if isinstance(out.get("tensor_parameters"), dict):
        out["tensor_parameters"] = rename(out["tensor_parameters"])
    if out.get("slices"):
        out["slices"] = [{**s, "parameters": rename(s["parameters"]),
                          "sources": [{**src, "parameters": rename(src["parameters"])} for src in s["sources"]]}
                         for s in out["slices"]]
    return out


def _single_model_inputs(method: str, models: Models, base: Optional[str]) -> tuple[Models, dict]:
    """passthrough: exactly one model, no base."""
    if base is not None or len(models) != 1:
        raise ConfigError(f"recipe: {method} copies exactly 1 model (one source per slice) without base_model")
    return models, {"model_path_list": [models[0][0]]}


def _listed_inputs(method: str, models: Models, base: Optional[str]) -> tuple[Models, dict]:
    """linear: the listed models; base_model is not an input (as in mergekit)."""
    if base is not None:
        log.warning("recipe: %s ignores base_model (list it under models to merge it)", method)
    return models, {"model_path_list": [m[0] for m in models]}


# -- per-model parameters: (MergeConfig values, tensor_parameters)
def _per_model_settings(method: str, names: tuple[str, ...], models: Models, top: dict,
                        sliced: bool) -> tuple[dict, dict]:
    """Each model's value, else the top-level one, else mergekit's default; scalars become options
    (one value, or one per model), gradients and filters tensor_parameters."""
    values: dict[str, Any] = {}
    per_tensor: dict[str, Any] = {}
    for name in names:
        parameter = PER_MODEL[name]
        settings = []
        for i, (path, params) in enumerate(models):
            setting = params.get(name, top.get(name, parameter.default))
            if setting is None:
                if not sliced:
                    raise ConfigError(f"recipe: models[{i}] ({path}): parameter {name} is required by {method}")
                setting = 1.0  # every tensor takes its slice's value (checked by _slice_options)
            settings.append(map_setting(setting, float))
        if all(is_scalar(s) for s in settings):
            if parameter.option is not None and len(set(settings)) == 1:
                values[parameter.option] = settings[0]
            else:
                values[parameter.list_option] = settings
        else:
            per_tensor[parameter.list_option] = settings
            # defaults for tensors no filter matches: the model's scalar value, else mergekit's default
            unmatched = float(parameter.default if parameter.default is not None else 1.0)
            values[parameter.list_option] = [s if is_scalar(s) else unmatched for s in settings]
    return values, per_tensor


def _passthrough_scale(method: str, names: tuple[str, ...], models: Models, top: dict, sliced: bool) -> tuple[dict, dict]:
    """passthrough's scale: the model's value, else the top-level one, else none (the option's default)."""
    setting = models[0][1].get(PASSTHROUGH_SCALE, top.get(PASSTHROUGH_SCALE))
    if setting is None:
        return {}, {}
    if is_scalar(setting):
        return {"scale": float(setting)}, {}
    return {}, {"scale": setting}


def _shared_settings(top: dict, per_model: tuple[str, ...]) -> tuple[dict, dict]:
    """(MergeConfig values, tensor_parameters) of the top-level parameters that are not per model."""
    values: dict[str, Any] = {}
    per_tensor: dict[str, Any] = {}
    for name, setting in top.items():
        if name in per_model:
            continue
        parameter = SHARED[name]
        if parameter.option is None:
            log.warning("recipe: parameter %s is accepted and ignored (computation is always float32)", name)
        elif not parameter.per_tensor:
            if not isinstance(setting, bool):
                raise ConfigError(f"recipe: parameters.{name}: expected true or false, got {setting!r}")
            values[parameter.option] = setting
        elif is_scalar(setting):
            values[parameter.option] = setting
        else:
            per_tensor[parameter.option] = setting
    return values, per_tensor


# -- slices: (the slice's parameters, its sources) as the method needs them
def _slice_as_given(slice_params: dict, sources: list[dict], recipe_sources: list[dict],
                    base: Optional[str]) -> tuple[dict, list[dict]]:
    return slice_params, sources


def _base_source_first(slice_params: dict, sources: list[dict], recipe_sources: list[dict],
                       base: Optional[str]) -> tuple[dict, list[dict]]:
    """slerp: the base source is merge input 0."""
    return slice_params, sorted(sources, key=lambda src: base is None or not same_path(src["model"], base))


def _source_scale_to_slice(slice_params: dict, sources: list[dict], recipe_sources: list[dict],
                           base: Optional[str]) -> tuple[dict, list[dict]]:
    """passthrough: one source, whose parameters (its scale) are the slice's."""
    slice_params = {**slice_params, **{k: v for src in recipe_sources for k, v in src["parameters"].items()}}
    return slice_params, [{**src, "parameters": {}} for src in sources]


@dataclass(frozen=True)
class RecipeMethod:
    """How one mergekit merge_method translates into MergeConfig values."""

    merge_method: str  # ours
    per_model: tuple[str, ...] = ()  # parameters given per model: keys of PER_MODEL (passthrough: its scale)
    shared: tuple[str, ...] = ()  # parameters given once: keys of SHARED
    defaults: Mapping[str, Any] = field(default_factory=dict)  # mergekit's defaults where ours differ
    inputs: Callable[[str, Models, Optional[str]], tuple[Models, dict]] = _task_vector_inputs
    per_model_settings: Callable[[str, tuple[str, ...], Models, dict, bool], tuple[dict, dict]] = _per_model_settings
    arrange_slice: Callable[[dict, list[dict], list[dict], Optional[str]], tuple[dict, list[dict]]] = _slice_as_given
    unset: Mapping[str, Any] = field(default_factory=dict)  # values when no parameter sets them
    slices_need_weights: bool = True  # a slice source other than the base needs a weight (when per_model has one)
    renames: Mapping[str, str] = field(default_factory=dict)  # our option -> the one this method reads instead

    @property
    def parameters(self) -> set[str]:
        """Every mergekit parameter the method takes."""
        return {*self.per_model, *self.shared}


def _task_arithmetic_family(merge_method: str, normalize: bool, rescale: bool, *per_model: str) -> RecipeMethod:
    """mergekit's generalized task arithmetic methods: task vectors, optionally sparsified, then summed."""
    return RecipeMethod(merge_method, ("weight", *per_model), ("normalize", "rescale", "lambda", "int8_mask"),
                        {"normalize": normalize, "rescale": rescale})


#: mergekit merge_method -> how it translates
RECIPE_METHODS: dict[str, RecipeMethod] = {
    "linear": RecipeMethod("linear", ("weight",), ("normalize",), {"normalize": True}, inputs=_listed_inputs),
    "slerp": RecipeMethod("slerp", (), ("t",), inputs=_base_first_inputs, arrange_slice=_base_source_first),
    "nuslerp": RecipeMethod("nuslerp", ("weight",), ("nuslerp_flatten", "nuslerp_row_wise"), inputs=_optional_base_inputs,
                            unset={"weight_list": (1.0, 1.0)}, slices_need_weights=False),
    "model_stock": RecipeMethod("model_stock", (), ("filter_wise",)),
    "passthrough": RecipeMethod("passthrough", (PASSTHROUGH_SCALE,), inputs=_single_model_inputs,
                                per_model_settings=_passthrough_scale, arrange_slice=_source_scale_to_slice),
    "nearswap": RecipeMethod("nearswap", (), ("t",), inputs=_base_and_one_inputs, renames={"slerp_alpha": "nearswap_t"}),
    "multislerp": RecipeMethod("multislerp", ("weight",), ("normalize_weights", "eps"), inputs=_optional_base_inputs),
    "karcher": RecipeMethod("karcher", (), ("max_iter", "tol"), inputs=_base_last_inputs),
    "arcee_fusion": RecipeMethod("arcee_fusion", (), (), inputs=_base_and_one_inputs),
    "sce": RecipeMethod("sce", (), ("select_topk", "int8_mask")),
    "ram": RecipeMethod("ram", (), ("epsilon",), renames={"epsilon": "ram_epsilon"}),
    "ramplus_tl": RecipeMethod("ramplus_tl", (), ("epsilon", "r", "alpha"), renames={"epsilon": "ram_epsilon"}),
    #                          merge_method        normalize rescale  per-model parameters besides weight
    "task_arithmetic": _task_arithmetic_family("task_arithmetic", False, False),
    "ties": _task_arithmetic_family("ties", True, False, "density"),
    "dare_ties": _task_arithmetic_family("dare_ties", False, True, "density"),
    "dare_linear": _task_arithmetic_family("dare_linear", False, True, "density"),
    "breadcrumbs": _task_arithmetic_family("breadcrumbs", False, False, "density", "gamma"),
    "breadcrumbs_ties": _task_arithmetic_family("breadcrumbs_ties", False, False, "density", "gamma"),
    "della": _task_arithmetic_family("della", True, True, "density", "epsilon"),
    "della_linear": _task_arithmetic_family("della_linear", False, True, "density", "epsilon"),
}


SUPPORTED_METHODS = tuple(RECIPE_METHODS)


def recipe_to_config(recipe: dict, output_path: str, base_dir: Optional[Path] = None, **options: Any) -> MergeConfig:
    """Translate a mergekit recipe into an (unresolved) MergeConfig; ``options``: extra MergeConfig fields."""
    method, spec = _recipe_method(recipe)
    resolve_path = _path_resolver(base_dir)
    base = resolve_path(model_path(recipe["base_model"], "base_model")) if recipe.get("base_model") is not None else None
    slices, models = _recipe_models(recipe, resolve_path)
    top = recipe.get("parameters") or {}
    if not isinstance(top, dict):
        raise ConfigError("recipe: parameters: expected a mapping")
    values: dict[str, Any] = {"output_path": output_path, "semantics": "mergekit", "merge_method": spec.merge_method,
                              **spec.defaults}
    top = used_parameters(top, "parameters", method, spec.parameters)
    models = [(path, used_parameters(p, f"models[{i}].parameters", method, set(spec.per_model)))
              for i, (path, p) in enumerate(models)]
    if slices is not None:
        values["slices"] = _slice_options(slices, method, spec, base, top)
    models, inputs = spec.inputs(method, models, base)
    values.update(inputs)
    if not models:
        raise ConfigError("recipe: models: no models to merge")
    shared, shared_per_tensor = _shared_settings(top, spec.per_model)
    own, own_per_tensor = spec.per_model_settings(method, spec.per_model, models, top, slices is not None)
    values.update(shared)
    values.update(own)
    for option, value in spec.unset.items():
        values.setdefault(option, list(value))
    values.update(output_dtype(recipe))
    values.update(_tokenizer_source(recipe.get("tokenizer_source"), values, base, resolve_path))
    values.update(_tokenizer_section(recipe, values, base, resolve_path))
    if recipe.get("chat_template") is not None:
        values["chat_template"] = recipe["chat_template"]
    tensor_parameters = {**shared_per_tensor, **own_per_tensor}
    if tensor_parameters:
        values["tensor_parameters"] = tensor_parameters
    values.update(options)
    return config_from_dict(_renamed_options(values, spec.renames), source="recipe")


def _recipe_method(recipe: dict) -> tuple[str, RecipeMethod]:
    """The recipe's merge_method and its translation; ConfigError on an unknown top-level key or method."""
    refuse_unknown_keys(recipe, TOP_KEYS, "recipe")
    method = recipe.get("merge_method")
    if method not in RECIPE_METHODS:
        raise ConfigError(f"recipe: merge_method {method!r} is not supported; valid: {', '.join(SUPPORTED_METHODS)}")
    return method, RECIPE_METHODS[method]


def _path_resolver(base_dir: Optional[Path]) -> Callable[[Optional[str]], Optional[str]]:
    """A function reading a relative model path (both of MODEL+LORA) beside the recipe, never in the current directory."""

    def resolve_one(path: str) -> str:
        if base_dir is None or os.path.isabs(path):
            return path
        candidate = base_dir / path
        if not os.path.lexists(candidate) and os.path.lexists(path):
            raise ConfigError(f"recipe: model {path} is read beside the recipe, as {candidate}, which does not exist "
                              f"(there is a {path} in the current directory: give its absolute path to use it)")
        return str(candidate)

    return lambda path: None if path is None else map_paths(path, resolve_one, "recipe: model", lambda p: os.path.lexists(resolve_one(p)))


def _recipe_models(recipe: dict, resolve_path: Callable[[Optional[str]], Optional[str]]) -> tuple[Optional[list[dict]], Models]:
    """(the recipe's slices or None, its models with their parameters); with slices, the first slice's sources
    (every slice's parameters go into cfg.slices)."""
    if "slices" in recipe:
        if recipe.get("models"):
            raise ConfigError("recipe: give either models or slices, not both")
        slices = _recipe_slices(recipe["slices"], resolve_path)
        return slices, [(src["model"], {}) for src in slices[0]["sources"]]
    entries = recipe.get("models") or []
    if not isinstance(entries, list):
        raise ConfigError("recipe: models: expected a list of {model: ..., parameters: ...}")
    return None, [(resolve_path(model_path(e, f"models[{i}]")), (e.get("parameters") or {}) if isinstance(e, dict) else {})
                  for i, e in enumerate(entries)]


def _tokenizer_source(source: Any, values: dict, base: Optional[str],
                      resolve_path: Callable[[Optional[str]], Optional[str]]) -> dict[str, str]:
    """``{"tokenizer_source": ...}`` from the recipe's, or {}; base is the base model's path when it is a merge input."""
    if source is None:
        return {}
    if source == "base" and "base_model_path" not in values and base is not None:
        source = base  # slerp: the base is merge input 0, not --base_model_path
    return {"tokenizer_source": source if source in ("base", "union") else resolve_path(model_path(source, "tokenizer_source"))}


def _tokenizer_section(recipe: dict, values: dict, base: Optional[str],
                       resolve_path: Callable[[Optional[str]], Optional[str]]) -> dict[str, Any]:
    """MergeConfig values of the recipe's ``tokenizer:`` section (source, tokens, pad_to_multiple_of), or {}."""
    section = recipe.get("tokenizer")
    if section is None:
        return {}
    if recipe.get("tokenizer_source") is not None:
        raise ConfigError("recipe: give either tokenizer_source or tokenizer, not both (as mergekit)")
    if not isinstance(section, dict):
        raise ConfigError("recipe: tokenizer: expected a mapping {source, tokens, pad_to_multiple_of}")
    refuse_unknown_keys(section, {"source", "tokens", "pad_to_multiple_of"}, "recipe: tokenizer")
    out: dict[str, Any] = _tokenizer_source(section.get("source", "union"), values, base, resolve_path)
    if section.get("tokens"):
        out["tokenizer_tokens"] = checked_tokens(section["tokens"], "recipe: tokenizer.tokens",
                                                 lambda ref, where: resolve_path(model_path(ref, where)))
    if section.get("pad_to_multiple_of") is not None:
        out["pad_to_multiple_of"] = section["pad_to_multiple_of"]
    return out


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
            sources.append({"model": resolve_path(model_path({"model": src.get("model")}, where)),
                            "layer_range": src.get("layer_range"), "parameters": src.get("parameters") or {}})
        out.append({"sources": sources, "parameters": s.get("parameters") or {}})
    return out


def _slice_options(slices: list[dict], method: str, spec: RecipeMethod, base: Optional[str], top: dict) -> list[dict]:
    """cfg.slices: parameters renamed to llm_merge's, sources arranged as the method needs them."""
    out = []
    weights_needed = "weight" in spec.per_model and spec.slices_need_weights
    for i, s in enumerate(slices):
        slice_params = used_parameters(s["parameters"], f"slices[{i}].parameters", method, spec.parameters)
        sources = []
        for j, src in enumerate(s["sources"]):
            own = used_parameters(src["parameters"], f"slices[{i}].sources[{j}].parameters", method, set(spec.per_model))
            is_base = base is not None and same_path(src["model"], base)
            if weights_needed and not is_base and not any("weight" in p for p in (own, slice_params, top)):
                raise ConfigError(f"recipe: slices[{i}].sources[{j}] ({src['model']}): parameter weight is required by {method}")
            sources.append({"model": src["model"], "layer_range": src["layer_range"], "parameters": renamed(own)})
        slice_params, sources = spec.arrange_slice(slice_params, sources, s["sources"], base)
        out.append({"sources": sources, "parameters": renamed(slice_params)})
    return out

