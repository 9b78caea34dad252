"""Bounded reads of the small files beside the weights: configs, recipes, indexes, tokenizer files.

Such a file is read only when it is a regular file no larger than ``MAX_SIDE_FILE_BYTES``:
a FIFO, a device (``/dev/zero``, ``/dev/stdin``) or a socket under a checkpoint's
``config.json`` name is an error at once, never a read that blocks or runs out of memory.
The file is opened non-blocking, so even a FIFO's ``open`` returns immediately.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from llm_merge.errors import MergeError

#: Largest config, recipe, index or tokenizer file read (the largest tokenizer.json files are ~35 MB).
MAX_SIDE_FILE_BYTES = 256 << 20
_READ_BLOCK_BYTES = 1 << 20
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def read_bytes(path: str | os.PathLike, label: str | None = None, *, limit: int = MAX_SIDE_FILE_BYTES,
               error: type[MergeError] = MergeError) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``error`` naming ``label`` (default: the path) otherwise."""
    label = label or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{label}: cannot read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise error(f"{label}: is {kind}, not a regular file; refused")
        blocks, total = [], 0
        while True:  # the size is checked while reading: a file may grow after fstat
            block = os.read(fd, min(_READ_BLOCK_BYTES, limit + 1 - total))
            if not block:
                return b"".join(blocks)
            blocks.append(block)
            total += len(block)
            if total > limit:
                raise error(f"{label}: larger than {limit >> 20} MiB, the limit for a config, index or tokenizer file; refused")
    except OSError as exc:
        raise error(f"{label}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike, label: str | None = None, *, limit: int = MAX_SIDE_FILE_BYTES,
              error: type[MergeError] = MergeError) -> str:
    """``read_bytes`` decoded as UTF-8 (a BOM is dropped)."""
    raw = read_bytes(path, label, limit=limit, error=error)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{label or path}: not UTF-8 text (byte {exc.start})") from None


def read_json(path: str | os.PathLike, label: str | None = None, *, error: type[MergeError] = MergeError) -> Any:
    """A JSON document from a bounded read; ``error`` naming the file when it is not valid JSON."""
    text = read_text(path, label, error=error)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise error(f"{label or path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise error(f"{label or path}: nested too deeply to be a JSON config") from None

