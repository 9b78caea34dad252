"""The one registry of method specs: every sparsifier and merge declared once.

A spec is registered with ``@register(kind, name, ...)`` on its pure ops function (arrays first,
keyword-only parameters, then ``ops``; shared by the NumPy and Paddle backends) and declares:

* ``prepare`` (sparsify) / ``reduce`` (merge): the whole-tensor statistics it needs, and
  ``produces``, the names of the statistics they return;
* ``later_reduces``: further reduce passes that run after ``reduce``, in order, each seeing the statistics
  of the passes before it (e.g. a histogram refined by a second pass); ``row_aligned``: its statistics and
  apply pass need chunks of whole rows (along the last dimension);
* its parameters, bound by name from three disjoint sources: its statistics, the engine's values
  (``ENGINE_PARAMS``: ``ops``, ``host``, ``rng``, ``rng_at``, ``numel``, ``shape``, ``start``, and for
  merges ``base``, the base's chunk or None) and the
  MergeConfig options. Registration checks that every parameter is one of them and that no statistic
  shares a name with an option or an engine value, so a misspelled or ambiguous parameter fails when the
  package is imported, never inside a worker;
* ``kernel``: the id of its compiled implementation (``kernels.fused``: the drop-in twin of ``fn`` and
  ``prepare``, the fused apply pass's code, the streamed statistics), or None. ``fused`` says the fused
  apply pass covers it (``fused_if``: only for the options where this returns true, e.g. a whole-tensor
  mode); ``streamed_dtypes`` the input dtypes whose statistics stream (``ANY_DTYPE``: all);
  ``numpy_seconds_per_gb``: how much longer its plain NumPy code takes than its compiled code, in seconds
  per GB of input on one worker, measured (``run.kernel_choice`` weighs it against loading the kernels);
  ``input_bytes_per_second``: one worker's measured rate (on its kernels where it has them), for the dry
  run's estimate: every sparsifier's, and a merge's where it is slower than its sparsifier;
* what the engine and the plan need to know of it without naming it: ``statistic_bytes`` (memory per
  element its whole-tensor statistics hold beside the task vector), ``passes_through`` (returns its input),
  ``fused_coefficients`` (a merge run by the fused linear pass with coefficients from its statistics),
  ``inputs`` (an exact number of inputs) and ``divides_by_weight_sum`` (normalizing divides by the weights'
  sum, which must not be 0).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

from llm_merge.config.options import FIELD_NAMES
from llm_merge.errors import MergeError

KINDS = ("sparsify", "merge")
#: Parameters supplied by the engine rather than by MergeConfig or by the statistics.
ENGINE_PARAMS = frozenset({"ops", "host", "rng", "rng_at", "numel", "start", "shape", "base"})
#: ``streamed_dtypes`` of statistics that stream for inputs of every dtype.
ANY_DTYPE = frozenset({"*"})


@dataclass(frozen=True)
class Method:
    """A registered sparsifier or merge: its ops function, statistics and what the engine needs to run it."""

    kind: str
    name: str
    fn: Callable
    params: tuple[str, ...]
    prepare: Optional[Callable] = None
    reduce: Optional[Callable] = None
    produces: tuple[str, ...] = ()
    kernel: Optional[str] = None
    fused: bool = False
    fused_if: Optional[Callable[[dict], bool]] = None
    streamed_dtypes: frozenset[str] = frozenset()
    numpy_seconds_per_gb: float = 0.0
    input_bytes_per_second: Optional[float] = None
    statistic_bytes: int = 0
    passes_through: bool = False
    fused_coefficients: Optional[Callable[[dict, dict], tuple[float, ...]]] = None
    inputs: Optional[int] = None
    divides_by_weight_sum: bool = False
    later_reduces: tuple[Callable, ...] = ()
    row_aligned: bool = False

    def parameters(self) -> set[str]:
        """Every parameter name of the function and its prepare/reduce pass."""
        names = set(self.params)
        for extra in (self.prepare, self.reduce, *self.later_reduces):
            if extra is not None:
                names |= set(keyword_params(extra))
        return names

    def fuses(self, options: dict) -> bool:
        """Whether the fused apply pass covers it with these options."""
        return self.fused and (self.fused_if is None or self.fused_if(options))

    def streams(self, dtypes: set[str]) -> bool:
        """Whether its statistics stream (compiled) for inputs of these dtypes."""
        return self.streamed_dtypes == ANY_DTYPE or (bool(self.streamed_dtypes) and dtypes <= self.streamed_dtypes)


_REGISTRY: dict[str, dict[str, Method]] = {kind: {} for kind in KINDS}


def keyword_params(fn: Callable) -> tuple[str, ...]:
    """Names of the keyword-only parameters of ``fn``."""
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)


def register(kind: str, name: str, **spec) -> Callable:
    """Decorator registering the ops function of a sparsifier or merge under ``name`` (``spec``: Method's fields)."""
    if kind not in _REGISTRY:
        raise MergeError(f"unknown method kind {kind!r}; valid: {', '.join(KINDS)}")

    def decorate(fn: Callable) -> Callable:
        if name in _REGISTRY[kind]:
            raise MergeError(f"{kind} method {name!r} is registered twice")
        method = Method(kind, name, fn, keyword_params(fn), **spec)
        _check_parameters(method)
        if method.kernel is not None and method.numpy_seconds_per_gb <= 0 and not method.passes_through:
            raise MergeError(f"{kind} method {name!r}: a compiled kernel needs its measured numpy_seconds_per_gb, "
                             "without which no merge loads it")
        _REGISTRY[kind][name] = method
        return fn

    return decorate


def _check_parameters(method: Method) -> None:
    """Every parameter binds to exactly one source: a statistic it produces, an engine value or an option."""
    where = f"{method.kind} method {method.name!r}"
    produces = set(method.produces)
    clashing = produces & (FIELD_NAMES | ENGINE_PARAMS)
    if clashing:
        raise MergeError(f"{where}: statistic(s) {', '.join(sorted(clashing))} share a name with an option or engine value")
    unknown = set(method.params) - produces - ENGINE_PARAMS - FIELD_NAMES
    for extra in (method.prepare, method.reduce):
        if extra is not None:
            unknown |= set(keyword_params(extra)) - ENGINE_PARAMS - FIELD_NAMES
    for later in method.later_reduces:  # may read the statistics of the passes before it
        unknown |= set(keyword_params(later)) - produces - ENGINE_PARAMS - FIELD_NAMES
    if unknown:
        raise MergeError(f"{where}: parameter(s) {', '.join(sorted(unknown))} are no option, engine value or statistic of it")


def get(kind: str, name: str) -> Method:
    """The registered method, or MergeError listing the valid names."""
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise MergeError(f"unknown {kind} method {name!r}; valid: {', '.join(names(kind))}") from None


def names(kind: str) -> list[str]:
    """Registered names of one kind."""
    return sorted(_REGISTRY[kind])
