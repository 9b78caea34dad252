"""Per-element statistics parked in a scratch file and read back by slices.

DELLA's magnitude ranks (4 bytes per element, per model) are needed chunk by
chunk in the apply pass; for large tensors they wait in the staging
directory instead of memory (page cache is not process memory).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

from llm_merge.io.reader import read_into


class SpilledArray:
    """A 1-D array written to ``directory``; ``spilled[a:b]`` reads that slice back."""

    def __init__(self, array: np.ndarray, directory: Path) -> None:
        self.dtype = array.dtype
        self.shape = array.shape
        self.path = Path(directory) / f".spill-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        with open(self.path, "wb") as handle:
            array.tofile(handle)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __getitem__(self, window: slice) -> np.ndarray:
        start, stop, _ = window.indices(self.shape[0])
        out = np.empty(max(0, stop - start), dtype=self.dtype)
        read_into(self._fd, memoryview(out.view(np.uint8)), start * self.dtype.itemsize, self.path)
        return out

    def release(self) -> None:
        """Close and delete the scratch file."""
        os.close(self._fd)
        self.path.unlink(missing_ok=True)
