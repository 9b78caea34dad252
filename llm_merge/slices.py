"""``slices``: layer stacking (mergekit passthrough slices) as one virtual input checkpoint.

Each slice is ``{"model": dir, "layer_range": [a, b]}``: layers a..b-1 of that model, renumbered
to follow the previous slices. Tensors outside the layers come from the first slice's model for
the input embeddings and from the last slice's model for everything else (final norm, lm_head),
as mergekit takes pre-weights from the first slice and post-weights from the last.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from llm_merge.errors import ConfigError
from llm_merge.io.checkpoint import Checkpoint, open_checkpoint
from llm_merge.names import compile_layer_pattern, embed_name


def check_slices(slices: Any) -> list[tuple[str, int, int]]:
    """(model, a, b) of every slice, or ConfigError."""
    if not isinstance(slices, list) or not slices:
        raise ConfigError("slices: expected a non-empty list of {model: ..., layer_range: [start, end]}")
    out = []
    for i, s in enumerate(slices):
        if not isinstance(s, dict) or set(s) != {"model", "layer_range"}:
            raise ConfigError(f"slices[{i}]: expected exactly {{model, layer_range}}, got {s!r}")
        r = s["layer_range"]
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, int) for v in r) and 0 <= r[0] < r[1]):
            raise ConfigError(f"slices[{i}].layer_range: {r!r} must be [start, end] with 0 <= start < end")
        out.append((str(s["model"]), r[0], r[1]))
    return out


def num_layers(slices: Any) -> int:
    return sum(b - a for _, a, b in check_slices(slices))


def sliced_checkpoint(slices: Any, prefix: str, layer_pattern: str,
                      convert: Optional[Callable] = None) -> Checkpoint:
    """The stacked model as one Checkpoint whose tensor names are the output's."""
    parts = check_slices(slices)
    pattern = compile_layer_pattern(layer_pattern)
    opened: dict[str, Checkpoint] = {}
    for model, _, _ in parts:
        if model not in opened:
            opened[model] = open_checkpoint(model, prefix, convert)
    first, last = opened[parts[0][0]], opened[parts[-1][0]]
    tensors = {}
    embed = embed_name(first.tensors)
    if embed is not None:
        tensors[embed] = first.tensors[embed]
    offset = 0
    for model, a, b in parts:
        checkpoint = opened[model]
        found = set()
        for name, info in checkpoint.tensors.items():
            match = pattern.search(name)
            if match is None:
                continue
            j = int(match.group(1))
            if a <= j < b:
                found.add(j)
                start, end = match.span(1)
                tensors[f"{name[:start]}{offset + j - a}{name[end:]}"] = info
        missing = sorted(set(range(a, b)) - found)
        if missing:
            raise ConfigError(f"slices: {model} has no layer(s) {missing[:5]} of layer_range [{a}, {b}]")
        offset += b - a
    for name, info in last.tensors.items():
        if pattern.search(name) is None and name != embed:
            tensors[name] = info
    return dataclasses.replace(first, tensors=tensors)
