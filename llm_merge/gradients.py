"""Per-tensor option values (mergekit parameter gradients and filters) -> TensorTask.params.

A setting is mergekit's ``ParameterSetting``:

* a scalar (number, bool, string): that value for every tensor;
* a list of numbers (a gradient): interpolated linearly at t = layer / (num_layers - 1)
  (t = 0 for tensors outside the layers: embeddings, final norm, lm_head, as mergekit's
  ``ConfigReader(t=0)`` for pre- and post-weights); a list of non-numbers picks
  ``values[int(t·(len-1))]``;
* a list of ``{filter: substring, value: setting}`` (or ``{"filter": null|"*"}`` for the rest):
  the first filter found in the tensor name wins; no match leaves the option unset.

Options named ``*_list`` (and ``weight_list``) take one setting per model.
"""

from __future__ import annotations

from typing import Any, Optional

from llm_merge.config import MergeConfig, _check_option
from llm_merge.errors import ConfigError
from llm_merge.names import layer_index


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


def tensor_params(cfg: MergeConfig, name: str, num_layers: int) -> Optional[dict[str, Any]]:
    """Resolved per-tensor option values of ``name`` (only those that differ from the config's), or None."""
    if not cfg.tensor_parameters:
        return None
    t = layer_t(name, num_layers, cfg.layer_pattern)
    out: dict[str, Any] = {}
    for option, setting in cfg.tensor_parameters.items():
        if option.endswith("_list"):
            if not isinstance(setting, list) or len(setting) != len(cfg.model_path_list):
                raise ConfigError(f"tensor_parameters.{option}: give one setting per model ({len(cfg.model_path_list)})")
            default = getattr(cfg, option)
            scalar = option.removesuffix("_list") if option != "weight_list" else "weight"
            values = []
            for k, s in enumerate(setting):
                value = evaluate(name, s, t)
                if value is None:
                    value = default[k] if default is not None else getattr(cfg, scalar, 1.0)
                _check_option(scalar, float(value), cfg.sparsify_type, cfg.epsilon)
                values.append(float(value))
            out[option] = values
        else:
            value = evaluate(name, setting, t)
            if value is None:
                continue
            default = getattr(cfg, option)
            if isinstance(default, bool):
                value = bool(value)
            elif isinstance(default, (int, float)):
                value = float(value)
                _check_option(option, value, cfg.sparsify_type, cfg.epsilon)
            out[option] = value
    weights = out.get("weight_list")
    normalize = out.get("normalize", cfg.normalize)
    if weights is not None and normalize and cfg.merge_type == "linear" and sum(weights) == 0:
        raise ConfigError(f"tensor_parameters: weights {weights} of tensor {name} sum to 0, cannot normalize")
    return out or None


def num_layers_of(names, config: dict, pattern: Optional[str] = None) -> int:
    """Layers of the model: config.json's num_hidden_layers (or n_layer), else 1 + the largest layer index in the names."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    indices = [i for i in (layer_index(n, pattern) for n in names) if i is not None]
    return max(indices) + 1 if indices else 1
