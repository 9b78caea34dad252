"""A GGUF output published atomically: staged beside ``output_path``, filled, verified, renamed into place.

The output directory holds ``{prefix}.gguf`` and the run's records (``merge_config.json`` ...).
The file is created with its planned header, the generated tensors and its final size;
workers fill the rest (``fill``); the header and size are checked before the rename, and
an error, SIGTERM, SIGHUP or Ctrl-C leaves nothing under ``output_path`` (as for safetensors).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from llm_merge.errors import MergeError
from llm_merge.io.gguf_output.layout import GGUFLayout
from llm_merge.io.shards import allocate
from llm_merge.io.signals import stop_signals_raise
from llm_merge.io.writer import check_output_path, fsync_directory, publish, staging_directory, write_json


def write_gguf_atomically(output: Path, layout: GGUFLayout, *, overwrite: bool, fill: Callable[[Path], None],
                          records: dict[str, object]) -> None:
    """Stage ``layout.file`` beside ``output``, ``fill(staging)`` it, verify, add ``records`` and rename into place."""
    check_output_path(output, overwrite)
    with stop_signals_raise(), staging_directory(output) as staging:
        create_gguf(staging, layout)
        fill(staging)
        verify_gguf(staging, layout)
        for name, value in records.items():
            write_json(staging / name, value)
        fsync_directory(staging)
        publish(staging, output, overwrite)


def create_gguf(directory: Path, layout: GGUFLayout) -> None:
    """The file with its header, the generated tensors (e.g. rope_freqs) and its final size."""
    path = directory / layout.file
    try:
        with open(path, "wb") as handle:
            handle.write(layout.header)
            for offset, data in layout.generated:
                handle.seek(offset)
                handle.write(data)
            handle.flush()
            allocate(handle.fileno(), layout.size)
    except OSError as exc:
        raise MergeError(f"{path}: cannot create the GGUF file: {exc.strerror}") from exc


def verify_gguf(directory: Path, layout: GGUFLayout) -> None:
    """The written file has the planned size and header."""
    path = directory / layout.file
    size = os.path.getsize(path)
    if size != layout.size:
        raise MergeError(f"{path}: size {size} bytes, planned {layout.size}")
    with open(path, "rb") as handle:
        if handle.read(len(layout.header)) != layout.header:
            raise MergeError(f"{path}: header differs from the planned one")
