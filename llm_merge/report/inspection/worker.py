"""One inspection task in a worker: a tensor of every model and of the base, read a chunk at a time
into ``geometry.TensorGeometry``; its sums are left in ``{parts}/{task.out.file}`` (JSON) for the main
process. Memory per worker: one chunk per input in float32 and float64, plus the magnitude tables
(1 MB per model) and at most ``geometry.INEXACT_BUDGET`` kept magnitudes per model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from llm_merge.io.reader import TensorReader
from llm_merge.io.safetensors_format import TensorInfo
from llm_merge.report.inspection.geometry import TensorGeometry
from llm_merge.run.pool import PartFile

#: Elements read per chunk and input (4 MiB of float32).
CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class InspectTask:
    """One tensor (or row range of one) of every model and the base, as planned for a merge."""

    index: int
    name: str
    shape: tuple[int, ...]
    inputs: tuple[TensorInfo, ...]
    base: TensorInfo
    out: PartFile  # where its sums go

    @property
    def numel(self) -> int:
        return self.base.numel

    @property
    def in_bytes(self) -> int:
        return sum(info.nbytes for info in self.inputs) + self.base.nbytes

    @property
    def out_bytes(self) -> int:  # the progress bar counts bytes read
        return self.in_bytes


class InspectWorker:
    """Runs inspection tasks, leaving each one's sums in ``parts``; one instance per worker process."""

    def __init__(self, parts: Path, chunk_elements: Optional[int] = None) -> None:
        self.parts = Path(parts)
        self.chunk = chunk_elements or CHUNK_ELEMENTS
        self.reader = TensorReader()

    def run(self, task: InspectTask) -> int:
        """Accumulate one tensor's statistics; returns the bytes read."""
        geometry = TensorGeometry(len(task.inputs), task.numel)
        for start in range(0, task.numel, self.chunk):
            count = min(self.chunk, task.numel - start)
            base = self.reader.read_f32(task.base, start, np.empty(count, dtype=np.float32))
            xs = [self.reader.read_f32(info, start, np.empty(count, dtype=np.float32)) for info in task.inputs]
            geometry.add(xs, base)
        (self.parts / task.out.file).write_text(json.dumps(geometry.finish()))
        return task.in_bytes

    def close(self) -> None:
        self.reader.close()
