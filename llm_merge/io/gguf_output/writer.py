"""Merged chunks -> GGUF bytes at their planned offsets, in each worker, as the merge goes.

The engine writes every tensor in order, chunk by chunk, at offsets of the plan's virtual
safetensors layout (``write(file, offset, data)``, as to ``ShardWriter``). Each chunk is widened
to float32, joined to the rest of its conversion unit (whole heads for the permuted Q/K, whole
rows for a quantized type, single elements otherwise), permuted, converted to the tensor's GGUF
type and written at its place in the .gguf file. Only a unit's remainder (less than one unit) waits
for the next chunk; row pieces of a vocabulary tensor, merged as tasks of their own, start and end
on whole rows, so each worker's pieces convert on their own.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from llm_merge.errors import MergeError
from llm_merge.io import dtypes
from llm_merge.io.gguf_output.arch import permute_rows
from llm_merge.io.gguf_output.layout import GGUFLayout, GGUFTensor
from llm_merge.io.shards import ShardWriter

#: Converted elements per write (4 MB of float32), rounded down to whole units.
BLOCK_ELEMENTS = 1 << 20


class GGUFTensorWriter:
    """A ``ShardWriter`` stand-in: takes virtual chunks, writes converted ones into ``layout.file`` of ``directory``."""

    def __init__(self, layout: GGUFLayout, directory: Path) -> None:
        self.layout = layout
        self.directory = Path(directory)
        self._out = ShardWriter(directory)
        self._pending: dict[str, tuple[int, np.ndarray]] = {}  # tensor -> (first element, float32 values not yet converted)
        self._gguf: Any = None

    def write(self, file: str, offset: int, data: np.ndarray) -> None:
        tensor = self.layout.locate(file, offset)
        if tensor is None:
            return  # a tensor llama.cpp recomputes (rotary inv_freq ...): not in the file
        virtual = dtypes.to_numpy(tensor.virtual_dtype)
        first = (offset - tensor.virtual_start) // virtual.itemsize
        values = np.ascontiguousarray(data).reshape(-1).view(np.uint8).view(virtual).astype(np.float32)
        waiting = self._pending.pop(tensor.name, None)
        if waiting is not None:
            if waiting[0] + waiting[1].size != first:
                raise MergeError(f"tensor {tensor.source}: GGUF writer got elements from {first}, expected {waiting[0] + waiting[1].size}")
            first, values = waiting[0], np.concatenate([waiting[1], values])
        elif first % tensor.unit:
            raise MergeError(f"tensor {tensor.source}: GGUF writer got a piece at element {first}, not on a unit of {tensor.unit}")
        whole = values.size - values.size % tensor.unit
        step = max(tensor.unit, BLOCK_ELEMENTS // tensor.unit * tensor.unit)
        for start in range(0, whole, step):
            self._convert(tensor, first + start, values[start : min(whole, start + step)])
        if whole < values.size:
            self._pending[tensor.name] = (first + whole, values[whole:].copy())

    def _convert(self, tensor: GGUFTensor, first: int, values: np.ndarray) -> None:
        """Permute, convert and write elements [first, first + values.size) of ``tensor`` (whole units)."""
        cols = tensor.cols
        if tensor.heads:
            values = permute_rows(values.reshape(-1, cols), values.size // tensor.unit).reshape(-1)
        if tensor.type_name == "F32":
            out = values
        elif tensor.type_name == "F16":
            out = values.astype(np.float16)
        elif tensor.type_name == "BF16":
            out = values.astype(ml_dtypes.bfloat16)  # rounds to nearest even, as the merge's own bf16 output
        else:
            out = self._quantize(values.reshape(-1, cols), tensor.type_name)
            self._out.write(self.layout.file, tensor.offset + first // cols * out.shape[-1], out)
            return
        self._out.write(self.layout.file, tensor.offset + first * out.dtype.itemsize, out)

    def _quantize(self, rows: np.ndarray, type_name: str) -> np.ndarray:
        if self._gguf is None:
            import gguf  # the extra is installed: plan_gguf needed it

            self._gguf = gguf
        return self._gguf.quants.quantize(rows, getattr(self._gguf.GGMLQuantizationType, type_name))

    def close(self) -> None:
        """Close the file; MergeError when a tensor's last unit never arrived (unless an error is already on its way)."""
        self._out.close()
        left, self._pending = self._pending, {}
        if left and sys.exc_info()[1] is None:
            name = next(iter(left))
            raise MergeError(f"tensor {name}: {left[name][1].size} element(s) of a conversion unit never arrived")


class GGUFWriterFactory:
    """Makes the GGUF writer in each worker (picklable: the layout only)."""

    def __init__(self, layout: GGUFLayout) -> None:
        self.layout = layout

    def __call__(self, directory: Path) -> GGUFTensorWriter:
        return GGUFTensorWriter(self.layout, directory)

