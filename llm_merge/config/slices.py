"""``slices``: output layers built from layer ranges of the inputs (mergekit slices), for any merge method.

A slice is ``{"sources": [{"model": dir, "layer_range": [a, b], "parameters": {...}}, ...],
"parameters": {...}}`` (the one-source shorthand ``{"model": dir, "layer_range": [a, b]}`` is
accepted too). Every source of a slice spans the same number of layers; the slice's output
layers are the merge of its sources, layer by layer, numbered after the previous slices'.

Each merge input is one *virtual* checkpoint stacking the k-th input source of every slice
(the source whose model is ``base_model_path`` is the base instead). Tensors outside the layers
come from the first slice's sources for the input embeddings and from the last slice's for
everything else (final norm, lm_head), as mergekit takes pre-weights from the first slice
and post-weights from the last.

``parameters`` use llm_merge's option names (weight, reserve_p, epsilon, gamma for one model;
slerp_alpha, normalize, rescale, scale, ... for all) and take precedence, source over slice,
over the config's values for the slice's layers; gradients run over each slice's own layers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from llm_merge.config.types import is_integer, kind_of
from llm_merge.errors import ConfigError

@dataclass(frozen=True)
class Source:
    model: str
    start: int
    end: int
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Slice:
    sources: tuple[Source, ...]
    parameters: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.sources[0].end - self.sources[0].start


def _source(entry: Any, where: str) -> Source:
    if not isinstance(entry, dict) or not {"model", "layer_range"} <= set(entry) or set(entry) - {"model", "layer_range", "parameters"}:
        raise ConfigError(f"{where}: expected {{model, layer_range[, parameters]}}, got {entry!r}")
    if not isinstance(entry["model"], str) or not entry["model"]:
        raise ConfigError(f"{where}.model: got {kind_of(entry['model'])}, expected a model directory")
    r = entry["layer_range"]
    if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(is_integer(v) for v in r) and 0 <= r[0] < r[1]):
        raise ConfigError(f"{where}.layer_range: {r!r} must be [start, end] with 0 <= start < end")
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ConfigError(f"{where}.parameters: expected an object of {{option: value}}")
    return Source(entry["model"], r[0], r[1], parameters)


def check_slices(slices: Any) -> list[Slice]:
    """The slices in normal form, or ConfigError naming the bad entry."""
    if not isinstance(slices, list) or not slices:
        raise ConfigError("slices: expected a non-empty list of {sources: [{model, layer_range}, ...]}")
    out = []
    for i, s in enumerate(slices):
        if isinstance(s, dict) and "sources" not in s:
            out.append(Slice((_source(s, f"slices[{i}]"),)))
            continue
        if not isinstance(s, dict) or set(s) - {"sources", "parameters"} or not isinstance(s["sources"], list) or not s["sources"]:
            raise ConfigError(f"slices[{i}]: expected {{sources: [...][, parameters]}}, got {s!r}")
        sources = tuple(_source(e, f"slices[{i}].sources[{j}]") for j, e in enumerate(s["sources"]))
        if len({src.end - src.start for src in sources}) != 1:
            raise ConfigError(f"slices[{i}]: every source must span the same number of layers, got "
                              f"{[[src.start, src.end] for src in sources]}")
        parameters = s.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ConfigError(f"slices[{i}].parameters: expected an object of {{option: value}}")
        out.append(Slice(sources, parameters))
    return out


def _same_path(a: str, b: Optional[str]) -> bool:
    return b is not None and os.path.normpath(a) == os.path.normpath(b)


def split_sources(slices: list[Slice], base: Optional[str]) -> tuple[list[list[Source]], Optional[list[Source]]]:
    """Per slice, the input sources (base removed) and the base source; ConfigError when they do not line up."""
    inputs, bases = [], []
    for i, s in enumerate(slices):
        others = [src for src in s.sources if not _same_path(src.model, base)]
        if base is not None:
            found = [src for src in s.sources if _same_path(src.model, base)]
            if len(found) != 1:
                raise ConfigError(f"slices[{i}]: needs exactly one source from the base model {base}, found {len(found)}")
            bases.append(found[0])
        if inputs and len(others) != len(inputs[0]):
            raise ConfigError(f"slices[{i}]: {len(others)} source(s) besides the base, slices[0] has {len(inputs[0])}; "
                              "every slice must merge the same number of models")
        inputs.append(others)
    if not inputs[0]:
        raise ConfigError("slices: no source besides the base model")
    return inputs, (bases if base is not None else None)


def num_layers(slices: Any) -> int:
    return sum(s.num_layers for s in check_slices(slices))

