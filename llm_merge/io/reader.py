"""Positioned reads of tensor data: copies into reusable buffers, or chunk-sized mappings.

``read_stored`` copies with ``os.preadv`` into caller-owned buffers. ``map_stored`` maps just
one chunk (pre-faulted, read-only) instead: no copy, and the mapping goes away with the last
array that views it, so at most a few chunks of input pages count towards resident memory.
Each file is opened once per process. A derived tensor (``io.derived``: a weight with a LoRA delta
folded in) is never mapped: its elements are computed (``DerivedValues``) and handed out as copies.

An input that is shorter than its header says (truncated after the plan read the header) is a
MergeError naming the file (InputTruncated; the runner adds the tensor): a copy sees the end of
the file, and a chunk past the end of the file is copied rather than mapped (``map_stored``
checks the size first). One window remains: a file truncated between that check and the last
access to the mapped chunk (the time to merge one chunk, about a millisecond) kills the process
with SIGBUS. A worker's death is still reported as a MergeError naming the tensor; the
single-process path dies without a message, and as after any crash nothing is published and the
next run removes the staging directory. Copying every chunk would close the window but costs
about 6 % of a compiled merge's time.
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path
from typing import Optional

import numpy as np

from llm_merge.errors import MergeError
from llm_merge.io import dtypes
from llm_merge.io.derived import DerivedTensor, DerivedValues
from llm_merge.io.safetensors_format import TensorInfo

log = logging.getLogger(__name__)

#: Pre-fault a chunk's pages in the mmap call itself (Linux): one system call instead of a fault per page.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class InputTruncated(MergeError):
    """A file ends before bytes its header (or its writer) placed in it: it shrank while the run was reading it."""


def read_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill ``buffer`` with the bytes at ``offset`` of an open file, or raise MergeError (InputTruncated at its end)."""
    done = 0
    total = buffer.nbytes
    while done < total:
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise InputTruncated(f"{path}: unexpected end of file at byte {offset + done} (file truncated?)")
        done += got


class TensorReader:
    """Reads element ranges of tensors; keeps one descriptor per file until ``close``."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._unmappable: set[Path] = set()
        self._scratch = np.empty(0, dtype=np.uint8)
        self._derived: Optional[DerivedValues] = None

    def _derived_values(self) -> DerivedValues:
        if self._derived is None:
            self._derived = DerivedValues(self)
        return self._derived

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise MergeError(f"{path}: cannot open: {exc.strerror}") from exc
            self._fds[path] = fd
        return fd

    def read_raw(self, info: TensorInfo, start: int = 0, count: int | None = None) -> np.ndarray:
        """Elements ``[start, start+count)`` of a tensor in its stored dtype (a new array)."""
        count = info.numel - start if count is None else count
        dtype = dtypes.to_numpy(info.dtype)
        if isinstance(info, DerivedTensor):
            return self._derived_values().read(info, start, count).view(dtype)
        out = np.empty(count, dtype=dtype)
        read_into(self._fd(info.file), memoryview(out.view(np.uint8)), info.start + start * dtype.itemsize, info.file)
        return out

    def read_stored(self, info: TensorInfo, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements ``[start, start+count)`` in their ``dtypes.stored`` dtype (bfloat16 as its bits), into ``out``
        or a reused scratch buffer.

        Without ``out`` the result is only valid until the next call.
        """
        stored = dtypes.stored(info.dtype)
        if isinstance(info, DerivedTensor):
            values = self._derived_values().read(info, start, count)
            if out is None:
                return values
            np.copyto(out.view(stored), values)
            return out
        if out is None:
            out = self._scratch_view(count * stored.itemsize).view(stored)
        read_into(self._fd(info.file), memoryview(out.view(np.uint8)), info.start + start * stored.itemsize, info.file)
        return out

    def map_stored(self, info: TensorInfo, start: int, count: int) -> Optional[np.ndarray]:
        """Elements ``[start, start+count)`` in their ``dtypes.stored`` dtype as a read-only view of the file (no copy).

        The view maps just these bytes (from the page below them); the mapping is released with the
        last array viewing it. None where ``read_stored`` must copy them instead: bytes not aligned
        to the element size, bytes past the end of the file (the read names the truncation), or a
        file system that refuses to map the file (then no chunk of that file is mapped again), or a derived
        tensor (computed, not stored).
        """
        stored = dtypes.stored(info.dtype)
        offset = info.start + start * stored.itemsize
        if isinstance(info, DerivedTensor) or offset % stored.itemsize or count <= 0 or info.file in self._unmappable:
            return None
        fd = self._fd(info.file)
        if os.fstat(fd).st_size < offset + count * stored.itemsize:  # truncated: the copying read names it
            return None
        page = offset - offset % mmap.ALLOCATIONGRANULARITY
        length = offset - page + count * stored.itemsize
        try:
            mapping = mmap.mmap(fd, length, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ, offset=page)
        except ValueError:  # past the end of the file
            return None
        except OSError as exc:
            log.info("%s: cannot be mapped (%s); its chunks are copied instead", info.file, exc.strerror or exc)
            self._unmappable.add(info.file)
            return None
        return np.frombuffer(mapping, dtype=stored, count=count, offset=offset - page)

    def read_f32(self, info: TensorInfo, start: int, out: np.ndarray) -> np.ndarray:
        """Fill the float32 vector ``out`` with elements ``[start, start+len(out))`` upcast to float32."""
        stored = self.read_stored(info, start, out.size, out if info.dtype == "F32" else None)
        if info.dtype == "BF16":  # the top half of a float32: a 16-bit shift
            np.left_shift(stored.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
        elif stored is not out:
            np.copyto(out, stored, casting="unsafe")
        return out

    def _scratch_view(self, nbytes: int) -> np.ndarray:
        if self._scratch.size < nbytes:
            self._scratch = np.empty(nbytes, dtype=np.uint8)
        return self._scratch[:nbytes]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
