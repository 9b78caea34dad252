"""From checkpoint headers to a checked, laid-out plan: no tensor data is read here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from llm_merge.config import MergeConfig, parse_size
from llm_merge.errors import MergeError
from llm_merge.io import dtypes
from llm_merge.io.checkpoint import Checkpoint, open_checkpoint
from llm_merge.io.safetensors_format import TensorInfo, encode_header

log = logging.getLogger(__name__)
_SHOW = 5  # mismatches listed per message


@dataclass(frozen=True)
class OutputSlot:
    """Where a merged tensor goes: shard file name, absolute byte offset, dtype string."""

    file: str
    start: int
    dtype: str


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: its inputs (one per model, and the base) and its output slot."""

    name: str
    shape: tuple[int, ...]
    inputs: tuple[TensorInfo, ...]
    base: Optional[TensorInfo]
    out: OutputSlot
    mergeable: bool

    @property
    def numel(self) -> int:
        return self.inputs[0].numel

    @property
    def out_bytes(self) -> int:
        return self.numel * dtypes.itemsize(self.out.dtype)

    @property
    def in_bytes(self) -> int:
        return sum(i.nbytes for i in self.inputs) + (self.base.nbytes if self.base else 0)


@dataclass(frozen=True)
class Shard:
    """One output file: its name, encoded header and total size in bytes."""

    file: str
    header: bytes
    size: int
    names: tuple[str, ...]


@dataclass(frozen=True)
class MergePlan:
    """Every output tensor task and the output files' layout."""

    tasks: tuple[TensorTask, ...]
    shards: tuple[Shard, ...]
    models: tuple[Checkpoint, ...]
    base: Optional[Checkpoint]

    @property
    def total_size(self) -> int:
        """Bytes of tensor data in the output (the index's total_size)."""
        return sum(t.out_bytes for t in self.tasks)

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: shard.file for shard in self.shards for name in shard.names}


def build_plan(cfg: MergeConfig, convert: Optional[Callable[[Path, str], Optional[Path]]] = None) -> MergePlan:
    """Open every checkpoint, check that they agree, and lay out the output shards.

    ``convert``: see ``open_checkpoint`` (pdparams inputs, ``llm_merge.io.pdparams.InputConverter``).
    """
    models = tuple(open_checkpoint(path, cfg.merge_prefix, convert) for path in cfg.model_path_list)
    base = open_checkpoint(cfg.base_model_path, cfg.merge_prefix, convert) if cfg.base_model_path else None
    everyone = [*models, *([base] if base else [])]
    check_same_names(everyone)
    check_same_shapes(everyone)
    reference = models[0]
    out_dtypes = {name: _output_dtype(name, everyone, cfg.output_dtype) for name in reference.tensors}
    shards, slots = layout_shards(reference, out_dtypes, parse_size(cfg.max_shard_size), cfg.merge_prefix)
    tasks = tuple(
        TensorTask(
            name=name,
            shape=info.shape,
            inputs=tuple(m.tensors[name] for m in models),
            base=base.tensors[name] if base else None,
            out=slots[name],
            mergeable=info.dtype in dtypes.MERGEABLE,
        )
        for name, info in reference.tensors.items()
    )
    return MergePlan(tasks=tasks, shards=shards, models=models, base=base)


def check_same_names(checkpoints: list[Checkpoint]) -> None:
    """Every checkpoint must hold the same tensor names as the first."""
    reference = checkpoints[0]
    names = set(reference.tensors)
    problems = []
    for other in checkpoints[1:]:
        theirs = set(other.tensors)
        missing, extra = sorted(names - theirs), sorted(theirs - names)
        if missing or extra:
            problems.append(
                f"{other.path} vs {reference.path}: "
                + "; ".join(
                    f"{label} {len(items)} ({', '.join(items[:_SHOW])}{', ...' if len(items) > _SHOW else ''})"
                    for label, items in (("missing", missing), ("extra", extra))
                    if items
                )
            )
    if problems:
        raise MergeError("tensor names differ between models: " + " | ".join(problems))


def check_same_shapes(checkpoints: list[Checkpoint]) -> None:
    """Same shapes everywhere; non-float tensors must also share their dtype."""
    reference = checkpoints[0]
    problems = []
    for name, info in reference.tensors.items():
        for other in checkpoints[1:]:
            theirs = other.tensors[name]
            if theirs.shape != info.shape:
                problems.append(f"{name}: {list(info.shape)} in {reference.path} but {list(theirs.shape)} in {other.path}")
            elif (info.dtype in dtypes.MERGEABLE) != (theirs.dtype in dtypes.MERGEABLE) or (
                info.dtype not in dtypes.MERGEABLE and info.dtype != theirs.dtype
            ):
                problems.append(f"{name}: dtype {info.dtype} in {reference.path} but {theirs.dtype} in {other.path}")
    if problems:
        more = f" (and {len(problems) - _SHOW} more)" if len(problems) > _SHOW else ""
        raise MergeError(f"tensor shapes or dtypes differ between models: {'; '.join(problems[:_SHOW])}{more}")


def _output_dtype(name: str, checkpoints: list[Checkpoint], output_dtype: Optional[str]) -> str:
    first = checkpoints[0].tensors[name].dtype
    if first not in dtypes.MERGEABLE:
        return first
    found = {c.tensors[name].dtype for c in checkpoints}
    if len(found) > 1:
        log.warning("tensor %s has mixed float dtypes %s; merged in float32, written as %s", name, sorted(found), output_dtype or first)
    return dtypes.OUTPUT_DTYPES[output_dtype] if output_dtype else first


def shard_file_name(prefix: str, index: int, count: int) -> str:
    """HF shard naming: ``{prefix}.safetensors`` alone, else ``{prefix}-00001-of-00003.safetensors``."""
    return f"{prefix}.safetensors" if count == 1 else f"{prefix}-{index + 1:05d}-of-{count:05d}.safetensors"


def layout_shards(
    reference: Checkpoint, out_dtypes: dict[str, str], max_shard_bytes: int, prefix: str
) -> tuple[tuple[Shard, ...], dict[str, OutputSlot]]:
    """Greedy HF-style sharding in the first model's storage order, with every tensor's byte offset."""
    groups: list[list[str]] = [[]]
    group_bytes = 0
    for name, info in reference.tensors.items():
        size = info.numel * dtypes.itemsize(out_dtypes[name])
        if groups[-1] and group_bytes + size > max_shard_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append(name)
        group_bytes += size
    metadata = reference.metadata if _is_str_dict(reference.metadata) else {"format": "pt"}
    shards, slots = [], {}
    for index, names in enumerate(groups):
        file = shard_file_name(prefix, index, len(groups))
        entries, offset = {}, 0
        for name in names:
            shape = reference.tensors[name].shape
            size = (reference.tensors[name].numel) * dtypes.itemsize(out_dtypes[name])
            entries[name] = {"dtype": out_dtypes[name], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header = encode_header(entries, metadata)
        for name in names:
            slots[name] = OutputSlot(file, len(header) + entries[name]["data_offsets"][0], out_dtypes[name])
        shards.append(Shard(file=file, header=header, size=len(header) + offset, names=tuple(names)))
    return tuple(shards), slots


def _is_str_dict(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
