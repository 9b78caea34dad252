"""How the engine binds a method's keyword parameters and which option values a task sees.

A parameter binds to one of three disjoint sources (the registry checks they are disjoint): a
statistic of the method or a per-chunk value (``extra``), an engine value (``ENGINE_PARAMS``), or
an option. One that is none of them is a MergeError naming it.
"""

from __future__ import annotations

from typing import Any, Callable

from llm_merge.config.options import PER_MODEL_OPTIONS
from llm_merge.errors import MergeError
from llm_merge.methods.registry import ENGINE_PARAMS, keyword_params
from llm_merge.plan.layout import TensorTask

_PARAMS: dict[Callable, tuple[str, ...]] = {}


def call(fn: Callable, first: Any, extra: dict[str, Any], engine: dict[str, Any], options: dict[str, Any]) -> Any:
    """``fn(first, ...)`` with each keyword parameter bound from ``extra``, ``engine`` or ``options``."""
    names = _PARAMS.get(fn)
    if names is None:
        names = _PARAMS[fn] = keyword_params(fn)
    kwargs = {}
    for name in names:
        if name in extra:
            kwargs[name] = extra[name]
        elif name in ENGINE_PARAMS:
            kwargs[name] = engine[name]
        elif name in options:
            kwargs[name] = options[name]
        else:
            raise MergeError(f"{fn.__qualname__}: parameter {name!r} has no value (no statistic, engine value or option)")
    return fn(first, **kwargs)


def task_options(all_options: dict[str, Any], task: TensorTask) -> dict[str, Any]:
    """The options of one task: per-tensor values (task.params) over the config's, weights of its models."""
    options = all_options
    if task.params:
        options = {**options, **task.params}
    if task.models is not None:
        options = {**options, "weight_list": [options["weight_list"][i] for i in task.models]}
        for name in PER_MODEL_OPTIONS:
            if options[f"{name}_list"] is not None:
                options[f"{name}_list"] = [options[f"{name}_list"][i] for i in task.models]
    return options


def per_model_options(options: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Options of each input's sparsifier: ``{name}_list[i]`` replaces ``name`` (per-model density, epsilon, gamma)."""
    lists = [name for name in PER_MODEL_OPTIONS if options[f"{name}_list"] is not None]
    if not lists:
        return [options] * count
    return [{**options, **{name: options[f"{name}_list"][k] for name in lists}} for k in range(count)]
