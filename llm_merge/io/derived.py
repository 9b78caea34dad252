"""Tensors computed when read: a stored weight with a LoRA delta folded in, or an adapter's full tensor
in its base's dtype (a ``model+lora`` reference, ``llm_merge.lora.reference``).

A ``DerivedTensor`` is a TensorInfo, so plans, row slices and every ``TensorReader`` take it where
they take a stored tensor; its ``file`` and ``start`` locate the stored values it starts from (for
messages), ``nbytes`` is the size of its own elements. ``TensorReader`` never maps or copies its
bytes: it asks ``DerivedValues`` for them, which reads the rows of the source that cover the
requested elements as float32, adds ``scale * (left @ right)`` for those rows (or the transposed
product), and rounds to ``dtype``. That is the value ``llm-merge-lora`` writes for the folded model
in the base's dtype (the same ``low_rank_rows`` and the same rounding), and what PEFT's
``merge_and_unload`` gives: the weight in its own dtype plus a float32 delta, rounded once.

Memory: the rows of one read plus the delta's factors (read once per tensor and cached for the
few tensors read last), never a whole model.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from llm_merge.errors import MergeError
from llm_merge.io import dtypes
from llm_merge.io.safetensors_format import TensorInfo

#: A LoRA factor or a replacement tensor: in a safetensors file, or in memory (a trusted .pdparams adapter).
Stored = Union[TensorInfo, np.ndarray]


@dataclass(frozen=True, eq=False)
class LowRankDelta:
    """``scale * (left @ right)`` ([m, r] @ [r, n]) added to a weight of shape [m, n], or its transpose
    (weight [n, m]) when ``transpose``; ``label`` names it in messages (adapter and module)."""

    left: Stored
    right: Stored
    scale: float
    transpose: bool
    label: str


#: Rows of a delta computed by one matrix product, at multiples of it: a row's value then never depends on
#: which other rows a caller asked for (a BLAS product may round differently for another number of rows).
TILE_ROWS = 64


def low_rank_rows(left: np.ndarray, right: np.ndarray, scale: float, transpose: bool, first: int, last: int) -> np.ndarray:
    """Rows [first, last) of ``scale * delta`` in float32, delta = ``left @ right`` or its transpose
    (``right.T @ left.T``); ``left`` and ``right`` float32. The same bits whatever rows are asked for."""
    total = right.shape[1] if transpose else left.shape[0]
    width = left.shape[0] if transpose else right.shape[1]
    out = np.empty((last - first, width), dtype=np.float32)
    for tile in range(first - first % TILE_ROWS, last, TILE_ROWS):
        end = min(tile + TILE_ROWS, total)
        product = right[:, tile:end].T @ left.T if transpose else left[tile:end] @ right
        a, b = max(tile, first), min(end, last)
        out[a - first : b - first] = product[a - tile : b - tile]
    out *= np.float32(scale)
    return out


@dataclass(frozen=True, eq=False)
class DerivedTensor(TensorInfo):
    """``source`` (rows from ``first_row`` of the whole weight on) plus ``delta`` when given, rounded to ``dtype``.

    ``source`` is the stored weight (a TensorInfo, possibly another dtype) or an in-memory array;
    ``first_row`` places a slice of rows (``rows``) within the delta.
    """

    source: Optional[Stored] = None
    delta: Optional[LowRankDelta] = None
    first_row: int = 0

    @classmethod
    def of(cls, source: Stored, dtype: str, delta: Optional[LowRankDelta] = None, file: Any = None) -> "DerivedTensor":
        """The derived tensor of a whole ``source`` in ``dtype``; ``file`` names an in-memory source's origin."""
        shape = tuple(source.shape)
        nbytes = math.prod(shape) * dtypes.itemsize(dtype)
        if isinstance(source, TensorInfo):
            return cls(source.file, dtype, shape, source.start, nbytes, source=source, delta=delta)
        return cls(file, dtype, shape, 0, nbytes, source=np.ascontiguousarray(source), delta=delta)

    def rows(self, first: int, last: int) -> "DerivedTensor":
        source = self.source.rows(first, last) if isinstance(self.source, TensorInfo) else self.source[first:last]
        row_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
        start = source.start if isinstance(source, TensorInfo) else 0
        return dataclasses.replace(self, shape=(last - first, *self.shape[1:]), start=start, nbytes=(last - first) * row_bytes,
                                   source=source, first_row=self.first_row + first)


class DerivedValues:
    """Computes the elements of derived tensors for one ``TensorReader`` (its positioned reads)."""

    #: Tensors whose LoRA factors stay cached (a task reads the same few tensors chunk after chunk).
    CACHED_FACTORS = 8

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self._factors: OrderedDict[int, tuple[LowRankDelta, np.ndarray, np.ndarray, int]] = OrderedDict()

    def read(self, info: DerivedTensor, start: int, count: int) -> np.ndarray:
        """Elements ``[start, start+count)`` of ``info`` in their ``dtypes.stored`` dtype (a new array)."""
        if info.delta is None:
            if _dtype_of(info.source) == info.dtype:  # moved as stored (integer tensors always: pair_adapter checks)
                return self._source_stored(info.source, start, count)
            values, before = self._source_f32(info.source, start, count), None
        else:
            cols = math.prod(info.shape[1:])
            first, last = start // cols, -(-(start + count) // cols)
            block = self._source_f32(info.source, first * cols, (last - first) * cols).reshape(last - first, cols)
            left, right, factors_nonfinite = self._factors_of(info.delta)
            before = None if factors_nonfinite else _count_nonfinite(block)
            row = info.first_row + first
            block += low_rank_rows(left, right, info.delta.scale, info.delta.transpose, row, row + last - first)
            values = block.reshape(-1)[start - first * cols : start - first * cols + count]
        out = values.astype(dtypes.to_numpy(info.dtype), copy=False)
        if before is not None and _count_nonfinite(out) > before:  # a NaN factor spreads over whole rows: the inputs had it
            raise MergeError(f"{info.delta.label}: folding the LoRA delta made NaN/Inf values from finite inputs "
                             f"(overflow in float32 or in {info.dtype}: check lora_alpha and the patterns)")
        return out.view(dtypes.stored(info.dtype))

    def _source_stored(self, source: Stored, start: int, count: int) -> np.ndarray:
        if isinstance(source, TensorInfo):
            return self.reader.read_stored(source, start, count, np.empty(count, dtype=dtypes.stored(source.dtype)))
        return source.reshape(-1)[start : start + count].copy()

    def _source_f32(self, source: Stored, start: int, count: int) -> np.ndarray:
        if isinstance(source, TensorInfo):
            return self.reader.read_f32(source, start, np.empty(count, dtype=np.float32))
        return source.reshape(-1)[start : start + count].astype(np.float32)

    def _factors_of(self, delta: LowRankDelta) -> tuple[np.ndarray, np.ndarray, int]:
        """(left, right) as float32 matrices and their NaN/Inf count, read once per tensor."""
        cached = self._factors.get(id(delta))
        if cached is None or cached[0] is not delta:
            left, right = (self._source_f32(f, 0, math.prod(f.shape)).reshape(f.shape) for f in (delta.left, delta.right))
            cached = (delta, left, right, _count_nonfinite(left) + _count_nonfinite(right))
            self._factors[id(delta)] = cached
            while len(self._factors) > self.CACHED_FACTORS:
                self._factors.popitem(last=False)
        self._factors.move_to_end(id(delta))
        return cached[1], cached[2], cached[3]


def _dtype_of(source: Stored) -> str:
    return source.dtype if isinstance(source, TensorInfo) else dtypes.to_safetensors(source.dtype)


def _count_nonfinite(values: np.ndarray) -> int:
    return int(values.size - np.count_nonzero(np.isfinite(values)))
