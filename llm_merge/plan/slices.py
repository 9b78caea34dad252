"""Slices as checkpoints: the virtual inputs that stack the slices' layer ranges, and where an output
tensor sits for parameter resolution (the slice structure itself: ``config.slices``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from llm_merge.config.names import compile_layer_pattern, embed_name
from llm_merge.config.slices import Source, check_slices, split_sources
from llm_merge.errors import ConfigError
from llm_merge.io.checkpoint import Checkpoint, open_checkpoint

def slice_checkpoints(slices: Any, base: Optional[str], prefix: str, layer_pattern: str, convert: Optional[Callable] = None,
                      already_opened: Optional[Mapping[str, Checkpoint]] = None) -> tuple[tuple[Checkpoint, ...], Optional[Checkpoint]]:
    """The virtual input checkpoints (one per input position) and the virtual base (or None); ``already_opened``:
    checkpoints by source reference (``MODEL+LORA`` sources), the other sources are opened here."""
    inputs, bases = split_sources(check_slices(slices), base)
    opened: dict[str, Checkpoint] = dict(already_opened or {})

    def stack(sources: list[Source]) -> Checkpoint:
        for src in sources:
            if src.model not in opened:
                opened[src.model] = open_checkpoint(src.model, prefix, convert)
        return stacked_checkpoint([(opened[src.model], src.start, src.end) for src in sources], layer_pattern)

    models = tuple(stack([per_slice[k] for per_slice in inputs]) for k in range(len(inputs[0])))
    return models, (stack(bases) if bases is not None else None)


def stacked_checkpoint(parts: list[tuple[Checkpoint, int, int]], layer_pattern: str) -> Checkpoint:
    """One Checkpoint of layers a..b-1 of each part in turn, renumbered; embeddings from the first part, the rest from the last."""
    pattern = compile_layer_pattern(layer_pattern)
    first, last = parts[0][0], parts[-1][0]
    tensors = {}
    embed = embed_name(first.tensors)
    if embed is not None:
        tensors[embed] = first.tensors[embed]
    offset = 0
    for checkpoint, a, b in parts:
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
            raise ConfigError(f"slices: {checkpoint.path} has no layer(s) {missing[:5]} of layer_range [{a}, {b}]")
        offset += b - a
    for name, info in last.tensors.items():
        if pattern.search(name) is None and name != embed:
            tensors[name] = info
    return dataclasses.replace(first, tensors=tensors)


@dataclass(frozen=True)
class Position:
    """Where an output tensor sits for parameter resolution: gradient position and its slice's parameters."""

    t: float
    shared: dict  # slice-level settings
    per_model: list[dict]  # each input's source settings


def position_finder(slices: Any, base: Optional[str]) -> Callable[[Optional[int], bool], Position]:
    """``find(layer, is_embedding)``: an output tensor's gradient position (t over its slice's layers; 0 outside
    the layers: embeddings in the first slice, the rest in the last) and its slice's settings."""
    normal = check_slices(slices)
    inputs, _ = split_sources(normal, base)

    def find(layer: Optional[int], is_embedding: bool) -> Position:
        if layer is None:
            index, t = (0 if is_embedding else len(normal) - 1), 0.0
        else:
            index, offset = 0, layer
            while index < len(normal) - 1 and offset >= normal[index].num_layers:
                offset -= normal[index].num_layers
                index += 1
            count = normal[index].num_layers
            t = offset / (count - 1) if count > 1 else 1.0
        return Position(t, normal[index].parameters, [src.parameters for src in inputs[index]])

    return find

