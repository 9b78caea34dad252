"""Find the safetensors files of a checkpoint directory and index its tensors."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from llm_merge.errors import MergeError
from llm_merge.io import side_files
from llm_merge.io.safetensors_format import Header, TensorInfo, read_header


@dataclass(frozen=True)
class Checkpoint:
    """All tensors of one model: name -> location, in the model's own storage order (converted: its source's)."""

    path: Path
    prefix: str
    files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


def index_file(directory: Path, prefix: str) -> Path:
    return directory / f"{prefix}.safetensors.index.json"


def single_file(directory: Path, prefix: str) -> Path:
    return directory / f"{prefix}.safetensors"


def open_checkpoint(
    directory: str | Path, prefix: str, convert: Optional[Callable[[Path, str], Optional[Path]]] = None
) -> Checkpoint:
    """Index the checkpoint in ``directory`` for ``prefix`` from its headers only.

    Looks for ``{prefix}.safetensors.index.json`` (sharded) first, then
    ``{prefix}.safetensors``. Raises MergeError when the directory or files are
    missing, when the index names a missing shard or a file outside the
    directory, or when a tensor listed in the index is absent from its shard.
    Without safetensors files, ``convert(directory, prefix)`` (e.g. pdparams ->
    safetensors) may return a directory holding a converted copy, sharded with an
    index; its checkpoint is returned with ``path`` still ``directory`` and the
    tensors in the order of that index (the source's order: the safetensors
    package's writer stores tensors sorted by dtype and name).
    """
    directory = Path(directory)
    if not directory.exists():
        raise MergeError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise MergeError(f"{directory}: not a directory")
    index = index_file(directory, prefix)
    if os.path.lexists(index):
        return _open_sharded(directory, prefix, index)
    single = single_file(directory, prefix)
    if os.path.lexists(single):
        header = read_header(single)
        return Checkpoint(directory, prefix, (single,), _in_storage_order(header.tensors), header.metadata)
    converted = convert(directory, prefix) if convert is not None else None
    if converted is not None:
        return dataclasses.replace(_open_sharded(converted, prefix, index_file(converted, prefix), in_index_order=True), path=directory)
    present = sorted(p.name for p in directory.glob("*.safetensors*")) or sorted(p.name for p in directory.iterdir())[:8]
    raise MergeError(
        f"{directory}: no checkpoint for prefix {prefix!r} (expected {single.name} or {index.name}; "
        f"found: {', '.join(present) or 'nothing'}); see --merge_prefix"
    )


def _open_sharded(directory: Path, prefix: str, index: Path, in_index_order: bool = False) -> Checkpoint:
    document = side_files.read_json(index)
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise MergeError(f"{index}: not a valid safetensors index (weight_map must be an object of tensor name -> shard file name)")
    root = directory.resolve()
    headers: dict[str, Header] = {}
    for shard_name in dict.fromkeys(weight_map.values()):
        shard = (directory / str(shard_name)).resolve()
        if Path(str(shard_name)).is_absolute() or root not in shard.parents:
            raise MergeError(f"{index}: shard {shard_name!r} points outside the checkpoint directory; refused")
        if not shard.is_file():
            raise MergeError(f"{index}: names shard {shard_name!r}, which does not exist in {directory}")
        headers[shard_name] = read_header(directory / shard_name)
    tensors: dict[str, TensorInfo] = {}
    for shard_name, header in headers.items():
        for name, info in _in_storage_order(header.tensors).items():
            if weight_map.get(name) == shard_name:
                tensors[name] = info
    missing = [name for name in weight_map if name not in tensors]
    if missing:
        raise MergeError(
            f"{index}: {len(missing)} tensor(s) listed in the index are absent from their shard, "
            f"e.g. {missing[0]!r} in {weight_map[missing[0]]!r}"
        )
    if in_index_order:
        tensors = {name: tensors[name] for name in weight_map}
    first_meta = next(iter(headers.values())).metadata if headers else None
    return Checkpoint(directory, prefix, tuple(directory / s for s in headers), tensors, first_meta)


def _in_storage_order(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    return dict(sorted(tensors.items(), key=lambda item: item[1].start))
