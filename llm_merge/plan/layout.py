"""The plan's data: output tensor tasks, shards and their byte layout (``layout_shards``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llm_merge.io import dtypes
from llm_merge.io.checkpoint import Checkpoint
from llm_merge.io.safetensors_format import TensorInfo, encode_header

@dataclass(frozen=True)
class OutputSlot:
    """Where a merged tensor goes: shard file name, absolute byte offset, dtype string."""

    file: str
    start: int
    dtype: str


@dataclass(frozen=True)
class TensorTask:
    """One output tensor (or a row range of one): its inputs (one per model, and the base) and its output slot.

    ``models``: the index in --model_path_list of each input (its draw key and weight), when
    not every model takes part in order (missing tensors, vocabulary rows); None: all models.
    A task that is not ``mergeable`` copies ``inputs[0]`` (converting a float to the output dtype).
    """

    name: str
    shape: tuple[int, ...]
    inputs: tuple[TensorInfo, ...]
    base: Optional[TensorInfo]
    out: OutputSlot
    mergeable: bool
    models: Optional[tuple[int, ...]] = None
    #: per-tensor option values (``tensor_parameters``: gradients, filters) that override the config's
    params: Optional[dict] = dataclasses.field(default=None, compare=False)

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


class ShardedOutput:
    """For plans with ``tasks`` (each with ``out_bytes``) and output ``shards``: index values."""

    @property
    def total_size(self) -> int:
        """Bytes of tensor data in the output (the index's total_size)."""
        return sum(t.out_bytes for t in self.tasks)

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: shard.file for shard in self.shards for name in shard.names}


@dataclass(frozen=True)
class MergePlan(ShardedOutput):
    """Every output tensor task and the output files' layout."""

    tasks: tuple[TensorTask, ...]
    shards: tuple[Shard, ...]
    models: tuple[Checkpoint, ...]
    base: Optional[Checkpoint]
    #: the output config.json when it must differ from the first model's (tied head, vocabulary size)
    config_json: Optional[dict] = None
    #: directory whose tokenizer files the output gets (--tokenizer_source), when not the first model
    tokenizer_from: Optional[Path] = None
    #: resolved per-tensor option values {tensor: {option: value}} (``tensor_parameters``), recorded in merge_config.json
    tensor_parameters: Optional[dict] = None
    #: tokenizer files written over the copied ones (mergekit's tokenizer merge, --chat_template): name -> JSON or text
    tokenizer_records: Optional[dict] = None
    #: virtual vocabulary rows to build before the merge (``plan.mergekit_vocab.RowJob``; ``run.vocab_rows``)
    row_jobs: tuple = ()

    @property
    def records(self) -> dict[str, object]:
        """JSON files written over the copied model files."""
        config = {"config.json": self.config_json} if self.config_json is not None else {}
        return {**(self.tokenizer_records or {}), **config}


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

