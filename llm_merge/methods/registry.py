"""The one registry of sparsify and merge functions.

A function is registered with ``@register(kind, name)``. Its keyword-only
parameters are bound by name by the engine from: MergeConfig fields, the
values returned by its ``prepare`` (sparsify: whole-tensor statistics such as a
threshold; arrays of one value per element are sliced to the chunk) or
``reduce`` (merge: sums over all chunks), and the engine's values: ``ops`` (the
array backend), ``host`` (NumPy ops, for statistics computed on the CPU), ``rng``
(counter-based random draws for this chunk), ``rng_at(offset)`` (host draws of the
same stream from any element offset), ``numel`` and ``shape`` (of the whole tensor)
and ``start`` (element offset of the chunk).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

from llm_merge.errors import MergeError

KINDS = ("sparsify", "merge")
#: Parameters supplied by the engine rather than by MergeConfig.
ENGINE_PARAMS = frozenset({"ops", "host", "rng", "rng_at", "numel", "start", "shape"})


@dataclass(frozen=True)
class Method:
    """A registered function with its bound-parameter names and optional passes."""

    kind: str
    name: str
    fn: Callable
    params: tuple[str, ...]
    prepare: Optional[Callable] = None
    reduce: Optional[Callable] = None

    def parameters(self) -> set[str]:
        """Every parameter name of the function and its prepare/reduce pass."""
        names = set(self.params)
        for extra in (self.prepare, self.reduce):
            if extra is not None:
                names |= set(keyword_params(extra))
        return names


_REGISTRY: dict[str, dict[str, Method]] = {kind: {} for kind in KINDS}


def keyword_params(fn: Callable) -> tuple[str, ...]:
    """Names of the keyword-only parameters of ``fn``."""
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)


def register(kind: str, name: str, *, prepare: Optional[Callable] = None, reduce: Optional[Callable] = None) -> Callable:
    """Decorator registering a sparsify or merge function under ``name``."""
    if kind not in _REGISTRY:
        raise MergeError(f"unknown method kind {kind!r}; valid: {', '.join(KINDS)}")

    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY[kind]:
            raise MergeError(f"{kind} method {name!r} is registered twice")
        _REGISTRY[kind][name] = Method(kind, name, fn, keyword_params(fn), prepare, reduce)
        return fn

    return decorate


def get(kind: str, name: str) -> Method:
    """The registered method, or MergeError listing the valid names."""
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise MergeError(f"unknown {kind} method {name!r}; valid: {', '.join(names(kind))}") from None


def names(kind: str) -> list[str]:
    """Registered names of one kind."""
    return sorted(_REGISTRY[kind])
