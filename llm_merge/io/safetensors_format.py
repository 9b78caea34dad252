"""Parse and validate safetensors headers without reading tensor data.

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data buffer; offsets are relative to the buffer start.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from llm_merge.errors import MergeError
from llm_merge.io import dtypes

#: Headers larger than this are refused before being read (same limit as the safetensors library).
MAX_HEADER_BYTES = 100_000_000
#: Most dimensions of a tensor (NumPy's limit).
MAX_DIMS = 64
#: A tensor's byte size (and its element count, even with a zero dimension) must stay below this (int64 offsets).
MAX_TENSOR_BYTES = 1 << 63


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

    def rows(self, first: int, last: int) -> "TensorInfo":
        """Rows [first, last) of this tensor (along its first dimension), as a tensor of their own."""
        row_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
        return TensorInfo(self.file, self.dtype, (last - first, *self.shape[1:]), self.start + first * row_bytes,
                          (last - first) * row_bytes)


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
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise MergeError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise MergeError(f"{path}: not a regular file; refused")
        file_size = status.st_size
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise MergeError(f"{path}: not a safetensors file (only {file_size} bytes, header length missing)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise MergeError(f"{path}: header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes")
        if 8 + header_len > file_size:
            raise MergeError(f"{path}: header length {header_len} runs past the end of the file ({file_size} bytes)")
        raw = os.pread(fd, header_len, 8)
        if len(raw) < header_len:
            raise MergeError(f"{path}: header cut short at {8 + len(raw)} bytes; file truncated?")
    except OSError as exc:
        raise MergeError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeError(f"{path}: header is not valid JSON ({exc})") from None
    except RecursionError:
        raise MergeError(f"{path}: header is nested too deeply to be a safetensors header") from None
    if not isinstance(parsed, dict):
        raise MergeError(f"{path}: header is a JSON {type(parsed).__name__}, expected an object")
    data_start = 8 + header_len
    buffer_size = file_size - data_start
    metadata = parsed.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise MergeError(f"{path}: __metadata__ must be an object of strings")
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
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        raise MergeError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of at most {MAX_DIMS} non-negative integers")
    if math.prod(d for d in shape if d) * size >= MAX_TENSOR_BYTES:
        raise MergeError(f"{path}: tensor {name!r}: shape {shape!r} of {dtype} does not fit in 2^63 bytes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or not offsets[0] <= offsets[1]
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


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (``true`` is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
