"""Liveness across ranks: each rank rewrites its heartbeat file from a thread, observers time its silence.

A rank silent for ``--dist_heartbeat_timeout`` is presumed dead. Silence is judged by the
observer's own monotonic clock, never by timestamps of other nodes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from llm_merge.run.rank_files import identity, remove_directory

#: Longest interval between two heartbeats of a rank, in seconds.
HEARTBEAT_SECONDS = 2.0


#: At least this many heartbeats fit in --dist_heartbeat_timeout (a short timeout beats faster).
HEARTBEATS_PER_TIMEOUT = 4


#: Shortest interval between two heartbeats, in seconds (bounds the thread's work for tiny timeouts).
HEARTBEAT_MIN_SECONDS = 0.05


#: How long stopping waits for the heartbeat thread to finish a write in progress, in seconds.
HEARTBEAT_JOIN_SECONDS = 5.0


# -- liveness ------------------------------------------------------------------------------
def heartbeat_period(timeout: float) -> float:
    """Seconds between two heartbeats: HEARTBEAT_SECONDS, or less so that HEARTBEATS_PER_TIMEOUT fit in ``timeout``."""
    return max(HEARTBEAT_MIN_SECONDS, min(HEARTBEAT_SECONDS, timeout / HEARTBEATS_PER_TIMEOUT))


class Heartbeat:
    """Rewrites ``rank-{rank}`` in ``directory`` every ``period`` seconds from a daemon thread.

    The file holds a nonce of this process and a counter of fixed width, overwritten in
    place; observers compare its bytes, never a timestamp. The thread does no merge work and
    holds the GIL only for a few system calls (the numba kernels run without the GIL, a pool
    is waited on in C), so it beats however long the main thread is busy. It writes only by
    path and only while that path is still the directory it started in (same device and
    inode): a directory renamed away or replaced by another run is never written into.
    Write errors are ignored; the observers judge the silence.
    """

    def __init__(self, directory: Path, rank: int, period: float) -> None:
        self.directory, self.period = Path(directory), period
        self.path = self.directory / f"rank-{rank}"
        self.identity = identity(self.directory)
        self._nonce = uuid.uuid4().hex[:12]
        self._count = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"llm_merge heartbeat of rank {rank}", daemon=True)

    def start(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(HEARTBEAT_JOIN_SECONDS)

    def _run(self) -> None:
        while not self._stopped.wait(self.period):
            self.beat()

    def beat(self) -> None:
        self._count += 1
        payload = f"{self._nonce} {self._count:020d}\n".encode()
        try:
            if self.identity is None or identity(self.directory) != self.identity:
                return
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, payload, 0)
            finally:
                os.close(fd)
        except OSError:
            pass


class Silence:
    """How long each watched rank's heartbeat has not changed, by this process's monotonic clock.

    The clock of a rank starts when the watch is made (a rank that has not beaten yet gets
    the full ``timeout`` from then) and restarts whenever its file reads differently from
    the last look. A file that cannot be read counts as unchanged. Each look reads the file
    before reading the clock, so a pause of this process is never mistaken for silence.
    """

    def __init__(self, directory: Path, ranks: Iterable[int], timeout: float) -> None:
        self.directory, self.timeout = Path(directory), timeout
        now = time.monotonic()
        self._seen = {rank: (self._read(rank), now) for rank in ranks}

    def _read(self, rank: int) -> Optional[bytes]:
        try:
            return (self.directory / f"rank-{rank}").read_bytes()
        except OSError:
            return None

    def dead(self, ranks: Iterable[int]) -> list[int]:
        """The ranks among ``ranks`` whose heartbeat has not changed for more than ``timeout`` seconds."""
        silent = []
        for rank in ranks:
            value = self._read(rank)
            now = time.monotonic()
            last, since = self._seen[rank]
            if value is not None and value != last:
                self._seen[rank] = (value, now)
            elif now - since > self.timeout:
                silent.append(rank)
        return silent


@contextlib.contextmanager
def beating(directory: Path, rank: int, world_size: int, timeout: float) -> Iterator[None]:
    """This rank heartbeats while the block runs; rank 0 then removes the heartbeat directory.

    A world of one has nobody to watch it and beats not at all.
    """
    if world_size == 1:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    heartbeat = Heartbeat(directory, rank, heartbeat_period(timeout)).start()
    try:
        yield
    finally:
        heartbeat.stop()
        if rank == 0:
            remove_directory(directory)


def presumed_dead(ranks: Sequence[int], timeout: float) -> str:
    who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
    return f"{who} sent no heartbeat for {timeout:g} s (--dist_heartbeat_timeout); presumed dead; nothing was published"

