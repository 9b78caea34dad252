"""The GGUF file planned before any work: header bytes, every tensor's type, offset and size.

The merge's own plan lays its output out as safetensors shards (names, shapes, dtypes,
offsets); the engine writes each merged chunk at its offset there. A GGUF output keeps that
plan as a *virtual* layout: ``plan_gguf`` maps each virtual tensor to a GGUF tensor (name from
the architecture's name map, type, absolute offset in the one ``.gguf`` file), and the writer
(``writer.GGUFTensorWriter``) sends each chunk from its virtual offset to its GGUF place.

Types follow llama.cpp's converter: 1-D tensors, norms and biases in F32; the other matrices in
``--gguf_type`` (default: the merged dtype, so nothing is rounded twice); a quantized type whose
block does not divide a row falls back to F16, as the converter's does.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from llm_merge.errors import MergeError
from llm_merge.io import dtypes
from llm_merge.io.gguf_output import import_gguf
from llm_merge.io.gguf_output.arch import (Architecture, add_hyperparameters, architecture_of, check_rope, generated_tensors,
                                           gguf_name, permuted_heads, tensor_name_map)
from llm_merge.io.gguf_output.vocab import add_vocabulary, read_vocabulary

log = logging.getLogger(__name__)

#: The merged dtype's own GGUF type, the default of --gguf_type.
_DEFAULT_TYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32", "F64": "f32"}
_SHOW = 5  # names listed per message


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file and where its data comes from (the engine's virtual slot)."""

    name: str
    shape: tuple[int, ...]  # row-major, as in the checkpoint (the file stores it reversed)
    type_name: str  # GGMLQuantizationType member, e.g. "Q8_0"
    offset: int  # absolute, in the .gguf file
    nbytes: int
    heads: int  # Q/K rows permuted by this many heads; 0: written as is
    source: str  # checkpoint tensor name
    virtual_file: str
    virtual_start: int
    virtual_dtype: str

    @property
    def cols(self) -> int:
        return self.shape[-1] if len(self.shape) > 1 else 1

    @property
    def unit(self) -> int:
        """Elements converted together: whole heads when permuted, whole rows when quantized, else 1."""
        if self.heads:
            return self.shape[0] // self.heads * self.cols
        return self.cols if self.type_name not in ("F32", "F16", "BF16") else 1


@dataclass(frozen=True)
class GGUFLayout:
    """The .gguf file: its name, header, size, tensors, and the generated tensors' bytes."""

    file: str
    header: bytes
    size: int
    tensors: tuple[GGUFTensor, ...]
    generated: tuple[tuple[int, bytes], ...]  # (offset, data) written when the file is created
    skipped: frozenset[str]  # virtual tensors left out (recomputed by llama.cpp)

    @functools.cached_property
    def _by_file(self) -> dict[str, tuple[list[int], list[GGUFTensor]]]:
        found: dict[str, list[GGUFTensor]] = {}
        for tensor in self.tensors:
            found.setdefault(tensor.virtual_file, []).append(tensor)
        return {file: ([t.virtual_start for t in ordered], ordered)
                for file, ordered in ((f, sorted(ts, key=lambda t: t.virtual_start)) for f, ts in found.items())}

    def locate(self, virtual_file: str, virtual_offset: int) -> Optional[GGUFTensor]:
        """The tensor whose virtual data holds ``virtual_offset`` (None: a skipped tensor)."""
        starts, ordered = self._by_file.get(virtual_file, ([], []))
        index = bisect.bisect_right(starts, virtual_offset) - 1
        if index < 0:
            return None
        tensor = ordered[index]
        end = tensor.virtual_start + int(np.prod(tensor.shape)) * dtypes.itemsize(tensor.virtual_dtype)
        return tensor if virtual_offset < end else None


def plan_gguf(shards: Sequence[Any], config: dict, config_where: str, tokenizer_dir: Path, gguf_type: Optional[str],
              file_name: str, model_name: str) -> GGUFLayout:
    """Plan the .gguf file of a merge whose virtual output is ``shards`` (``Shard``: file, header, names).

    ``config``: the output's config.json (``config_where`` names it in messages); ``tokenizer_dir``:
    where the output's tokenizer files are. MergeError before any work for anything unsupported.
    """
    gguf = import_gguf()
    arch = architecture_of(gguf, config, config_where)
    check_rope(arch, config_where)
    entries = _virtual_entries(shards)
    names = _gguf_names(gguf, arch, entries)
    embed = next((source for source, name in names.items() if name == "token_embd.weight"), None)
    if embed is None:
        raise MergeError("--output_format gguf: the output has no token embedding (model.embed_tokens.weight)")
    rows = entries[embed][1][0]
    vocab = read_vocabulary(gguf, tokenizer_dir, rows)
    requested = gguf_type or _DEFAULT_TYPES.get(entries[embed][0], "f32")
    with _quiet_gguf_writer():  # it logs its byte order and the scratch file at INFO
        writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.member)])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_name)
    file_type = "ALL_F32" if requested == "f32" else f"MOSTLY_{requested.upper()}"
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, gguf, arch, rows)
    add_vocabulary(writer, gguf, vocab)
    planned = []
    generated = generated_tensors(arch)
    for name, values in generated:
        planned.append((name, values.shape, "F32", values.nbytes, 0, "", None))
    for source, name in names.items():
        if not name:
            continue
        dtype, shape, virtual = entries[source]
        type_name = _tensor_type(gguf, name, shape, requested)
        heads = permuted_heads(arch, source)
        if heads and shape[0] % (2 * heads):
            raise MergeError(f"--output_format gguf: tensor {source} has {shape[0]} rows, not a multiple of 2 x {heads} heads")
        planned.append((name, shape, type_name, _nbytes(gguf, shape, type_name), heads, source, (*virtual, dtype)))
    for name, shape, type_name, nbytes, *_ in planned:
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=getattr(gguf.GGMLQuantizationType, type_name))
    with _quiet_gguf_writer():
        header = _header_bytes(writer)
    offset = _pad(len(header), writer.data_alignment)
    tensors, placed = [], []
    for name, shape, type_name, nbytes, heads, source, virtual in planned:
        if virtual is None:
            placed.append((offset, generated[len(placed)][1].tobytes()))
        else:
            tensors.append(GGUFTensor(name, tuple(shape), type_name, offset, nbytes, heads, source, *virtual))
        offset += _pad(nbytes, writer.data_alignment)
    skipped = frozenset(source for source, name in names.items() if name is None)
    return GGUFLayout(file_name, header, offset, tuple(tensors), tuple(placed), skipped)


def _virtual_entries(shards: Sequence[Any]) -> dict[str, tuple[str, tuple[int, ...], tuple[str, int]]]:
    """name -> (dtype, shape, (virtual file, virtual start)) from the planned safetensors headers."""
    entries = {}
    for shard in shards:
        length = int.from_bytes(shard.header[:8], "little")
        for name, entry in json.loads(shard.header[8 : 8 + length]).items():
            if name != "__metadata__":
                entries[name] = (entry["dtype"], tuple(entry["shape"]), (shard.file, len(shard.header) + entry["data_offsets"][0]))
    return entries


def _gguf_names(gguf: Any, arch: Architecture, entries: dict) -> dict[str, Optional[str]]:
    """checkpoint name -> GGUF name (None: skipped); MergeError for tensors with no GGUF name or no float data."""
    name_map = tensor_name_map(gguf, arch)
    names = {source: gguf_name(name_map, source) for source in entries}
    unknown = [source for source, name in names.items() if name == ""]
    if unknown:
        raise MergeError(f"--output_format gguf: {len(unknown)} tensor(s) have no {arch.hf_name} GGUF name, e.g. "
                         f"{', '.join(unknown[:_SHOW])}")
    integral = [source for source, name in names.items() if name and entries[source][0] not in dtypes.MERGEABLE]
    if integral:
        raise MergeError(f"--output_format gguf: tensor {integral[0]} is {entries[integral[0]][0]}; only float tensors are written")
    return names


def _tensor_type(gguf: Any, name: str, shape: tuple[int, ...], requested: str) -> str:
    """The converter's choice: F32 for 1-D tensors, norms and biases; else ``requested`` (F16 where it cannot quantize)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "F32"
    type_name = requested.upper()
    block, _ = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, type_name)]
    if shape[-1] % block:
        log.warning("tensor %s: rows of %d are not a multiple of the %s block (%d); written as F16", name, shape[-1],
                    type_name, block)
        return "F16"
    return type_name


def _nbytes(gguf: Any, shape: tuple[int, ...], type_name: str) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, type_name)]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size if shape else type_size


def _header_bytes(writer: Any) -> bytes:
    """Magic, keys and tensor infos as the ``gguf`` package writes them (through a scratch file)."""
    with tempfile.TemporaryDirectory(prefix="llm_merge-gguf-") as scratch:
        path = Path(scratch) / "header.gguf"
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return path.read_bytes()


@contextlib.contextmanager
def _quiet_gguf_writer() -> Iterator[None]:
    logger = logging.getLogger("gguf.gguf_writer")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment
