"""The small files ranks coordinate through: JSON markers written atomically, directory identities, removal."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Sequence

from llm_merge.io import writer

# -- small file helpers --------------------------------------------------------------------
def write_json_atomically(path: Path, value: object) -> None:
    """Write JSON to a temporary name, fsync, and rename it into place (readers never see half a file)."""
    temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, (json.dumps(value) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)


def read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def identity(path: Path) -> Optional[tuple[int, int]]:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def fsync_files(paths: Sequence[Path]) -> None:
    for path in paths:
        writer.fsync_path(path)


def remove_directory(staging: Path) -> None:
    """Rename the staging directory away (atomic: late markers of other ranks cannot land in it), then delete it."""
    trash = staging.parent / f"{staging.name}-aborted-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(staging, trash)
    except OSError:
        trash = staging
    shutil.rmtree(trash, ignore_errors=True)

