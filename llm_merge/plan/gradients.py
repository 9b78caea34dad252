"""Per-tensor option values (mergekit parameter gradients and filters) -> TensorTask.params.

A setting is mergekit's ``ParameterSetting``:

* a scalar (number, bool, string): that value for every tensor;
* a list of numbers (a gradient): interpolated linearly at t = layer / (num_layers - 1)
  (t = 0 for tensors outside the layers: embeddings, final norm, lm_head, as mergekit's
  ``ConfigReader(t=0)`` for pre- and post-weights); a list of non-numbers picks
  ``values[int(t·(len-1))]``;
* a list of ``{filter: substring, value: setting}`` (or ``{"filter": null|"*"}`` for the rest):
  the first filter found in the tensor name wins; no match leaves the option unset.

Options named ``*_list`` (and ``weight_list``) take one setting per model. With ``slices``, a
slice's and its sources' ``parameters`` come first (``plan.slices``).
"""

from __future__ import annotations

from typing import Any, Optional

from llm_merge.config.options import MergeConfig, PER_MODEL_OPTIONS
from llm_merge.config.validate import check_della_models, check_option
from llm_merge.errors import ConfigError
from llm_merge.config.types import is_number, kind_of
from llm_merge.config.names import layer_index
from llm_merge import methods


def layer_t(name: str, num_layers: int, pattern: Optional[str] = None) -> float:
    """mergekit's gradient position of a tensor: layer / (num_layers - 1), 1 for a one-layer model, 0 outside layers."""
    index = layer_index(name, pattern)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def is_filter(item: Any) -> bool:
    return isinstance(item, dict) and "value" in item and set(item) <= {"filter", "value"}


def evaluate(name: str, setting: Any, t: float) -> Any:
    """The value of ``setting`` for tensor ``name`` at gradient position ``t`` (None: unset), as mergekit."""
    if is_filter(setting):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if not isinstance(setting, list):
        raise ConfigError(f"tensor_parameters: unexpected setting {setting!r}")
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if not is_filter(cond):
            raise ConfigError(f"tensor_parameters: {cond!r} in {setting!r} is not {{filter: ..., value: ...}}")
        flt = cond.get("filter")
        if flt is None or flt == "*" or (name and flt in name):
            return evaluate(name, cond["value"], t)
    return None


#: per-model options: the scalar name (a slice's or source's ``parameters``) and the per-model list option
PER_MODEL_LISTS = {name: f"{name}_list" for name in ("weight", *PER_MODEL_OPTIONS)}


def _first_value(name: str, settings: list, t: float) -> Any:
    """The first setting that gives a value for ``name`` (mergekit's precedence: source, slice, top level)."""
    for setting in settings:
        if setting is not None:
            value = evaluate(name, setting, t)
            if value is not None:
                return value
    return None


def tensor_params(cfg: MergeConfig, name: str, t: float, shared: Optional[dict] = None,
                  per_model: Optional[list[dict]] = None) -> Optional[dict[str, Any]]:
    """Resolved per-tensor option values of ``name`` at gradient position ``t``, or None when none is set.

    ``shared`` / ``per_model``: the settings of the tensor's slice and of its sources (``plan.slices``),
    which take precedence over ``cfg.tensor_parameters``.
    """
    top = cfg.tensor_parameters or {}
    shared = shared or {}
    per_model = per_model or [{} for _ in cfg.model_path_list]
    out: dict[str, Any] = {}
    for scalar, option in PER_MODEL_LISTS.items():
        top_settings = top.get(option)
        if top_settings is None and scalar not in shared and not any(scalar in p for p in per_model):
            continue
        if top_settings is not None and (not isinstance(top_settings, list) or len(top_settings) != len(cfg.model_path_list)):
            raise ConfigError(f"tensor_parameters.{option}: give one setting per model ({len(cfg.model_path_list)})")
        default = getattr(cfg, option)
        values = []
        for k, own in enumerate(per_model):
            value = _first_value(name, [own.get(scalar), shared.get(scalar), top_settings[k] if top_settings else None], t)
            if value is None:
                value = default[k] if default is not None else getattr(cfg, scalar, 1.0)
            value = _typed(option, value, 0.0)
            check_option(scalar, value, cfg.sparsify_type, cfg.epsilon)
            values.append(value)
        out[option] = values
    for option in sorted((set(top) - set(PER_MODEL_LISTS.values())) | (set(shared) - set(PER_MODEL_LISTS))):
        value = _first_value(name, [None if option in PER_MODEL_LISTS else shared.get(option), top.get(option)], t)
        if value is None:
            continue
        default = getattr(cfg, option)
        if isinstance(default, (bool, int, float)):
            value = _typed(option, value, default)
        if isinstance(value, float):
            check_option(option, value, cfg.sparsify_type, cfg.epsilon)
        out[option] = value
    if cfg.merge_type == "nearswap" and out.get("nearswap_t", cfg.nearswap_t) is None:
        raise ConfigError(f"nearswap: no t for tensor {name}: give a default (--nearswap_t, or a gradient entry "
                          "without a filter)")
    weights = out.get("weight_list")
    normalize = out.get("normalize", cfg.normalize)
    if weights is not None and normalize and methods.get("merge", cfg.merge_type).divides_by_weight_sum and sum(weights) == 0:
        raise ConfigError(f"tensor_parameters: weights {weights} of tensor {name} sum to 0, cannot normalize")
    if cfg.sparsify_type == "della_magprune":
        n = len(cfg.model_path_list)
        check_della_models(out.get("reserve_p_list") or cfg.reserve_p_list or [out.get("reserve_p", cfg.reserve_p)] * n,
                           out.get("epsilon_list") or cfg.epsilon_list or [out.get("epsilon", cfg.epsilon)] * n,
                           f"tensor {name}")
    return out or None


def _typed(option: str, value: Any, like: Any) -> Any:
    """``value`` as the type of ``like`` (bool, or float for numbers); ConfigError when it is not of that kind."""
    if isinstance(like, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"tensor_parameters.{option}: got {kind_of(value)}, expected true or false")
        return value
    if not is_number(value):
        raise ConfigError(f"tensor_parameters.{option}: got {kind_of(value)}, expected a number")
    return float(value)


def num_layers_of(names, config: dict, pattern: Optional[str] = None) -> int:
    """Layers of the model: config.json's num_hidden_layers (or n_layer), else 1 + the largest layer index in the names."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    indices = [i for i in (layer_index(n, pattern) for n in names) if i is not None]
    return max(indices) + 1 if indices else 1
