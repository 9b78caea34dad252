"""Chunks: the generic passes' ranges, and for the compiled passes the lane a chunk is read in, the streamed
statistics' pass loop and the mapped chunks a task keeps from pass to pass."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import numpy as np

from llm_merge.backends.numpy_backend import HALF_LANES
from llm_merge.io import dtypes


def run_statistic(stats: Any, chunks: Callable[[], Iterable[tuple[list[np.ndarray], Optional[np.ndarray]]]]) -> Any:
    """Feed a streamed statistic (``kernels.streaming``: ``wants``, ``feed``, ``end_pass``, ``statistics``)
    every pass it wants over ``chunks()`` (raw chunks of the models, and of the base or None); a pass
    stops at the chunk where the statistic gives up. Returns its ``statistics()``."""
    pass_index = 0
    while stats.wants(pass_index):
        for raws, base in chunks():
            stats.feed(pass_index, raws, base)
            if not stats.wants(pass_index):  # gave up: the rest of the pass would be wasted
                break
        stats.end_pass(pass_index)
        pass_index += 1
    return stats.statistics()


def lane_of(infos) -> type:
    """Raw element type the fused kernel reads or writes: the stored 16-bit lane when every tensor has that
    dtype (``HALF_LANES``: bfloat16 uint16, float16 int16), else uint32 (float32 bits)."""
    lanes = {HALF_LANES.get(dtypes.stored(info.dtype), np.uint32) for info in infos}
    return lanes.pop() if len(lanes) == 1 else np.uint32


def chunk_ranges(numel: int, shape: tuple[int, ...], chunk: int, whole_rows: bool):
    """(start, count) of each chunk of the generic passes; with ``whole_rows``, chunks of whole rows (along the
    last dimension; at least one row, however long)."""
    step = max(1, chunk // shape[-1]) * shape[-1] if whole_rows and len(shape) > 0 and shape[-1] > 0 else chunk
    for start in range(0, numel, step):
        yield start, min(step, numel - start)


def slice_per_element(stats: dict[str, Any], start: int, count: int, numel: int) -> dict[str, Any]:
    return {k: (v[start : start + count] if getattr(v, "shape", None) == (numel,) else v) for k, v in stats.items()}


def reads_inputs_again(sparsifier: Any, merger: Any) -> bool:
    """Whether a method passes over a task's inputs more than once: statistics (a sparsifier's ``prepare``,
    a merge's ``reduce``), then the apply pass. Such a task may keep its chunks mapped (``KeptMappings``)."""
    return bool(sparsifier.prepare or merger.reduce)


class KeptMappings:
    """The mapped input chunks of one task, kept from one pass over its inputs to the next.

    Mapping a chunk again builds its page tables again, then tears them down: on the 0.52B family at
    n_process 2, ties took 2.55-3.31 s keeping its chunks against 2.94-3.54 s mapping them per pass,
    DELLA 4.07-4.50 against 4.38-5.49. A task that reads its inputs more than once (statistics, then the
    apply pass) and whose inputs fit a budget keeps them mapped until it ends (the engine decides which, at
    ``start``); others map each chunk per pass, as ``map`` then does.
    """

    def __init__(self) -> None:
        self._chunks: Optional[dict[tuple, np.ndarray]] = None

    def start(self, keep: bool) -> None:
        """Begin a task: keep its chunks from pass to pass, or not."""
        self._chunks = {} if keep else None

    def end(self) -> None:
        """Let the task's chunks go (their mappings go with the last view)."""
        self._chunks = None

    def map(self, reader: Any, info: Any, start: int, count: int) -> Optional[np.ndarray]:
        """``reader.map_stored(info, start, count)``, or the same chunk kept from an earlier pass."""
        if self._chunks is None:
            return reader.map_stored(info, start, count)
        key = (info.file, info.start, start, count)
        mapped = self._chunks.get(key)
        if mapped is None:
            mapped = reader.map_stored(info, start, count)
            if mapped is not None:
                self._chunks[key] = mapped
        return mapped
