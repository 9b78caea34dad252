"""Build the virtual vocabulary rows of mergekit's tokenizer merge (``plan.mergekit_vocab.RowJob``) into their
scratch file, a bounded chunk of output rows at a time; the file is removed when the merge ends."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Sequence

import numpy as np

from llm_merge.io.reader import TensorReader
from llm_merge.plan.token_rows import PADDING, SYNTHESIZED

#: float32 elements of output rows built at once
CHUNK_ELEMENTS = 1 << 22


@contextlib.contextmanager
def built_rows(jobs: Sequence) -> Iterator[None]:
    """Fill every job's rows before the block runs; remove the scratch file after it."""
    paths = {job.target.file for job in jobs}
    try:
        if jobs:
            with TensorReader() as reader:
                for path in paths:
                    with open(path, "wb") as handle:
                        handle.truncate(sum(j.target.nbytes for j in jobs if j.target.file == path))
                for job in jobs:
                    _fill(job, reader)
        yield
    finally:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _read_rows(reader: TensorReader, info, first: int, count: int, width: int) -> np.ndarray:
    out = np.empty(count * width, dtype=np.float32)
    return reader.read_f32(info, first * width, out).reshape(count, width)


def _fill(job, reader: TensorReader) -> None:
    rows = job.rows
    width = math.prod(job.target.shape[1:]) or 1
    own_info = job.sources[rows.key]
    chunk = max(1, CHUNK_ELEMENTS // width)
    total = np.zeros(width, dtype=np.float64)  # sum of the rows over the tokens, for the padding rows
    fd = os.open(job.target.file, os.O_WRONLY)
    try:
        n_out = len(rows.own)
        for a in range(0, n_out, chunk):
            b = min(n_out, a + chunk)
            own = rows.own[a:b]
            block = np.zeros((b - a, width), dtype=np.float32)
            real = np.flatnonzero(own >= 0)
            breaks = np.flatnonzero((np.diff(real) != 1) | (np.diff(own[real]) != 1)) + 1  # runs contiguous in both
            for run in np.split(real, breaks) if real.size else []:
                block[run[0] : run[-1] + 1] = _read_rows(reader, own_info, int(own[run[0]]), len(run), width)
            for j in np.flatnonzero(own == SYNTHESIZED):
                terms = rows.synthesized[a + int(j)]
                if terms:
                    parts = [_read_rows(reader, job.sources[k], r, 1, width)[0] for k, r in terms]
                    block[j] = np.sum(parts, axis=0, dtype=np.float32) / np.float32(len(terms))
            tokens = min(b, rows.n_tokens) - a
            if tokens > 0:
                total += block[:tokens].sum(axis=0, dtype=np.float64)
            pad = np.flatnonzero(own == PADDING)
            if pad.size:
                block[pad] = (total / rows.n_tokens).astype(np.float32)
            os.pwrite(fd, block.tobytes(), job.target.start + a * width * 4)
    finally:
        os.close(fd)
