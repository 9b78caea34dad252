"""The journal of a multi-rank merge: one line per written tensor (name, slot, crc32), read by ``--resume``
to skip tensors whose bytes still verify."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

from llm_merge.errors import MergeError

#: Test hook: a rank sleeps this many seconds after journaling its first tensor.
_SLOW_ENV = "LLM_MERGE_TEST_SLOW_SECONDS"
_CRC_BLOCK = 16 << 20


#: Test hook: ``N`` or ``N:TERM`` makes a rank kill itself (SIGKILL, or SIGTERM) after journaling N tensors.
_KILL_AFTER_ENV = "LLM_MERGE_TEST_KILL_AFTER"


def slot_crc32(fd: int, start: int, nbytes: int) -> int:
    """crc32 of ``nbytes`` bytes at ``start`` of an open file, read in 16 MiB blocks."""
    crc, done = 0, 0
    while done < nbytes:
        block = os.pread(fd, min(_CRC_BLOCK, nbytes - done), start + done)
        if not block:
            raise MergeError(f"short read at offset {start + done}")
        crc = zlib.crc32(block, crc)
        done += len(block)
    return crc


# -- the journal ---------------------------------------------------------------------------
class JournalingFactory:
    """Wraps a MergerFactory (already bound to the staging dir): every written tensor is journaled."""

    def __init__(self, factory: Any, staging: Path, rank: int) -> None:
        self.factory, self.staging, self.rank = factory, Path(staging), rank

    def __call__(self) -> "JournalingWorker":
        return JournalingWorker(self.factory(), self.staging, self.rank)


class JournalingWorker:
    def __init__(self, inner: Any, staging: Path, rank: int) -> None:
        self.inner, self.staging = inner, staging
        self.path = staging / f"journal-{rank}-{uuid.uuid4().hex[:12]}.jsonl"
        self._journal: Optional[int] = None
        self._reads: dict[str, int] = {}
        self._count = 0
        hook = os.environ.get(_KILL_AFTER_ENV, "")
        self._kill_after, _, how = hook.partition(":")
        self._kill_signal = signal.SIGTERM if how.upper() == "TERM" else signal.SIGKILL
        self._slow_seconds = float(os.environ.get(_SLOW_ENV) or 0)

    def run(self, task: Any) -> int:
        written = self.inner.run(task)
        fd = self._reads.get(task.out.file)
        if fd is None:
            fd = self._reads[task.out.file] = os.open(self.staging / task.out.file, os.O_RDONLY)
        entry = {"name": task.name, "file": task.out.file, "start": task.out.start, "nbytes": task.out_bytes,
                 "crc32": slot_crc32(fd, task.out.start, task.out_bytes)}
        if self._journal is None:
            self._journal = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(self._journal, (json.dumps(entry) + "\n").encode())
        self._count += 1
        if self._kill_after.isdigit() and self._count >= int(self._kill_after):
            os.kill(os.getpid(), self._kill_signal)
        if self._count == 1 and self._slow_seconds > 0:
            time.sleep(self._slow_seconds)
        return written

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            for fd in self._reads.values():
                os.close(fd)
            self._reads.clear()
            if self._journal is not None:
                os.fsync(self._journal)
                os.close(self._journal)
                self._journal = None


def journaled(staging: Path) -> dict[str, dict]:
    """Journal entries by tensor name (a torn last line is ignored)."""
    entries: dict[str, dict] = {}
    for path in sorted(staging.glob("journal-*.jsonl")):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                entries[entry["name"]] = entry
    return entries


def verified_tensors(staging: Path, tasks: Sequence[Any]) -> set[str]:
    """Names of ``tasks`` whose journaled slot matches the plan and whose bytes still have the journaled crc32."""
    entries = journaled(staging)
    fds: dict[str, int] = {}
    good = set()
    try:
        for task in tasks:
            entry = entries.get(task.name)
            if not entry or (entry.get("file"), entry.get("start"), entry.get("nbytes")) != (task.out.file, task.out.start, task.out_bytes):
                continue
            if task.out.file not in fds:
                fds[task.out.file] = os.open(staging / task.out.file, os.O_RDONLY)
            if slot_crc32(fds[task.out.file], task.out.start, task.out_bytes) == entry.get("crc32"):
                good.add(task.name)
    finally:
        for fd in fds.values():
            os.close(fd)
    return good

