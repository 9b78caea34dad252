"""Parse and validate safetensors headers without reading tensor data.

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data buffer; offsets are relative to the buffer start.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from llm_merge.errors import MergeError
from llm_merge.io import dtypes

#: Headers larger than this are refused before being read (same limit as the safetensors library).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: dtype string, shape and absolute byte range in its file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of a safetensors file.

    Raises MergeError naming the file when the header is truncated, too large,
    not JSON, or describes tensors whose byte ranges are inconsistent with
    their dtype and shape, overlap, or run past the end of the file.
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise MergeError(f"{path}: not a safetensors file (only {file_size} bytes, header length missing)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise MergeError(f"{path}: header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes")
            if 8 + header_len > file_size:
                raise MergeError(f"{path}: header length {header_len} runs past the end of the file ({file_size} bytes)")
            raw = handle.read(header_len)
    except OSError as exc:
        raise MergeError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise MergeError(f"{path}: header is a JSON {type(parsed).__name__}, expected an object")
    data_start = 8 + header_len
    buffer_size = file_size - data_start
    metadata = parsed.pop("__metadata__", None)
    tensors = {name: _tensor_info(path, name, entry, data_start, buffer_size) for name, entry in parsed.items()}
    _check_no_overlap(path, tensors)
    return Header(path=path, tensors=tensors, metadata=metadata)


def _tensor_info(path: Path, name: str, entry: object, data_start: int, buffer_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise MergeError(f"{path}: tensor {name!r}: header entry must have dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise MergeError(f"{path}: tensor {name!r}: dtype {dtype!r} is not a string")
    try:
        size = dtypes.itemsize(dtype)
    except MergeError as exc:
        raise MergeError(f"{path}: tensor {name!r}: {exc}") from None
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise MergeError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise MergeError(f"{path}: tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    expected = math.prod(shape) * size
    if end - begin != expected:
        raise MergeError(
            f"{path}: tensor {name!r}: data_offsets span {end - begin} bytes, "
            f"expected {expected} for {dtype} {tuple(shape)}"
        )
    if end > buffer_size:
        raise MergeError(f"{path}: tensor {name!r}: data ends at byte {end} past the data buffer ({buffer_size} bytes); file truncated?")
    return TensorInfo(file=path, dtype=dtype, shape=tuple(shape), start=data_start + begin, nbytes=expected)


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    ranges = sorted((info.start, info.start + info.nbytes, name) for name, info in tensors.items() if info.nbytes)
    for (_, prev_end, prev_name), (start, _, name) in zip(ranges, ranges[1:]):
        if start < prev_end:
            raise MergeError(f"{path}: tensors {prev_name!r} and {name!r} have overlapping data_offsets")


def encode_header(entries: dict[str, dict], metadata: dict[str, str] | None) -> bytes:
    """Serialize a header (length prefix + JSON padded with spaces to 8 bytes)."""
    header = dict(entries)
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
