"""Run tensor tasks in ``n_process`` workers with one progress bar.

Workers pull task indices from a queue (largest tensors first) and write their
results at planned offsets, so the worker count changes speed, never bytes.
A worker that raises or dies stops every worker and surfaces as MergeError; a worker
never outlives the main process, even one killed with SIGKILL.
A task has ``name``, ``in_bytes``, ``out_bytes`` and ``out.file``; a worker is made in each
process by ``make_worker()`` and has ``run(task) -> bytes written`` and ``close()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

from llm_merge.errors import MergeError
from llm_merge.io.reader import InputTruncated

log = logging.getLogger(__name__)
_POLL_SECONDS = 0.2
#: How often a worker checks that its parent lives, where the kernel cannot be asked to kill it (not Linux).
PARENT_POLL_SECONDS = 0.5
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


@dataclass(frozen=True)
class PartFile:
    """A task's ``out`` where its result is a file of its own in a parts directory (the pool schedules by
    ``out.file``)."""

    file: str


class Worker(Protocol):
    def run(self, task: Any) -> int: ...

    def close(self) -> None: ...


def _exclusive(worker: Worker, task: Any) -> bool:
    """Whether ``task`` needs so much memory that it must not overlap another such task."""
    check = getattr(worker, "exclusive", None)
    return bool(check and check(task))


class _NoBar:
    """Stands in for the bar when it is off (and spares importing tqdm, ~20 ms)."""

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass


def progress_bar(total: int, quiet: bool, desc: str) -> Any:
    """Bytes-written bar on stderr; silent with --quiet or when stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr)


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Keep the objects alive now (imported libraries: numba alone has hundreds of thousands) out
    of the garbage collector's scans for the run, with the collector on (a command turns it off for its
    start-up: ``cli.merge.main_entry``); workers forked meanwhile inherit that. Afterwards the collector
    is as it was."""
    was_enabled = gc.isenabled()
    gc.freeze()
    gc.enable()
    try:
        yield
    finally:
        gc.unfreeze()
        if not was_enabled:
            gc.disable()


def schedule(tasks: Sequence[Any]) -> list[int]:
    """Task indices, largest input first (better balance across workers).

    Among tasks of one size, output files take turns, so that workers running side by side
    seldom write into the same file: a file system serializes writes to one file (ext4 holds
    the inode lock for each write), and a waiting worker spins on it.
    """
    turn: list[int] = []
    seen: Counter = Counter()
    for task in tasks:
        group = (task.in_bytes, task.out.file)
        turn.append(seen[group])
        seen[group] += 1
    return sorted(range(len(tasks)), key=lambda i: (-tasks[i].in_bytes, turn[i], i))


def run_tasks(
    tasks: Sequence[Any], make_worker: Callable[[], Worker], n_process: int, quiet: bool, desc: str,
    start_method: Optional[str] = None,
) -> None:
    """Run every task, in this process when ``n_process`` is 1, else in a pool.

    ``start_method``: fork, spawn or forkserver (None: the platform's default).
    """
    order = schedule(tasks)
    with _frozen_heap(), progress_bar(sum(t.out_bytes for t in tasks), quiet, desc) as bar:
        if n_process == 1 or len(tasks) <= 1:
            _run_inline(tasks, order, make_worker, bar.update)
        else:
            _run_pool(tasks, order, make_worker, min(n_process, len(tasks)), bar.update, start_method)


#: glibc's mallopt parameters (malloc.h) and the values ``reuse_freed_memory`` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES, _TRIM_THRESHOLD_BYTES = 16 << 20, 32 << 20


def reuse_freed_memory() -> None:
    """Make glibc's malloc keep freed blocks under 16 MB for reuse (and up to 32 MB of free heap) instead of
    unmapping them: the NumPy path allocates its chunk temporaries afresh for every chunk, and fresh pages
    cost a page fault each (sce on a 0.1B family: 2.2M faults and 4.7 s of system time, against 26K and
    1.0 s so, 14.2 against 9.0 s in all). glibc's own dynamic threshold ends near these values after the
    first frees; memory stays bounded by the 32 MB it may keep. Elsewhere (no mallopt) nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)


def _run_inline(tasks, order, make_worker, advance: Callable[[int], Any]) -> None:
    reuse_freed_memory()
    merger = make_worker()
    try:
        for index in order:
            try:
                advance(merger.run(tasks[index]))
            except InputTruncated as exc:  # the reader knows the file, not the tensor
                raise MergeError(f"failed on tensor {tasks[index].name}: {exc}") from exc
            except MergeError:
                raise
            except Exception as exc:
                raise MergeError(f"failed on tensor {tasks[index].name}: {type(exc).__name__}: {exc}") from exc
    finally:
        merger.close()


def _die_with_parent(parent_pid: Optional[int]) -> None:
    """End this worker as soon as its parent process dies, even of SIGKILL: no worker outlives a merge.

    On Linux the kernel sends SIGKILL at the parent's death (``PR_SET_PDEATHSIG``; strictly, at the
    end of the thread that started the worker, which waits in ``_run_pool`` until the workers end);
    a parent that died before that request is caught by comparing ``os.getppid()`` with
    ``parent_pid`` (None: the parent at this call, e.g. the forkserver). Elsewhere a daemon thread
    polls ``os.getppid()``.
    """
    parent_pid = os.getppid() if parent_pid is None else parent_pid
    if _set_parent_death_signal(signal.SIGKILL):
        if os.getppid() != parent_pid:  # orphaned already
            os._exit(1)
        return
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="llm_merge-parent-watch", daemon=True).start()


def _set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux); whether it took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    prctl.restype = ctypes.c_int
    return prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def _worker(worker_id: int, parent_pid: Optional[int], tasks, make_worker, todo, results, big_task_lock) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the main process stops a worker with SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides how to stop
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # likewise (a closing terminal signals the whole group)
    _die_with_parent(parent_pid)
    reuse_freed_memory()
    merger = None
    index = None
    try:
        merger = make_worker()
        while (index := todo.get()) is not None:
            results.put(("start", worker_id, index))
            if _exclusive(merger, tasks[index]):
                with big_task_lock:  # one memory-heavy task at a time across workers
                    written = merger.run(tasks[index])
            else:
                written = merger.run(tasks[index])
            results.put(("done", worker_id, index, written))
        merger.close()  # before reporting: the main process may stop a worker once it has exited
        merger = None  # closed: the finally clause has nothing left to close
        results.put(("exit", worker_id, None))
    except BaseException as exc:  # report everything, including MemoryError
        cause = str(exc) if isinstance(exc, MergeError) else f"{type(exc).__name__}: {exc}"
        results.put(("error", worker_id, index, cause, traceback.format_exc()))
    finally:
        if merger is not None:
            merger.close()


def _run_pool(tasks, order, make_worker, n_workers: int, advance: Callable[[int], Any], start_method: Optional[str] = None) -> None:
    import multiprocess

    context = multiprocess.get_context(start_method)
    # a forkserver worker's parent is the forkserver (which exits with this process), not this process
    parent_pid = None if context.get_start_method() == "forkserver" else os.getpid()
    todo, results, big_task_lock = context.Queue(), context.Queue(), context.Lock()
    for index in order:
        todo.put(index)
    for _ in range(n_workers):
        todo.put(None)
    workers = [
        context.Process(target=_worker, args=(w, parent_pid, tasks, make_worker, todo, results, big_task_lock), name=f"llm_merge-worker-{w}", daemon=True)
        for w in range(n_workers)
    ]
    current: dict[int, int | None] = {}
    finished = set()
    started = []  # a worker that could not start is not stopped (joining it would raise, hiding the reason)
    try:
        for worker in workers:
            worker.start()
            started.append(worker)
        done = 0
        while done < len(tasks) or len(finished) < n_workers:
            try:
                message = results.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                _check_alive(workers, finished, current, tasks)
                continue
            kind, worker_id, index = message[:3]
            if kind == "start":
                current[worker_id] = index
            elif kind == "done":
                current[worker_id] = None
                done += 1
                advance(message[3])
            elif kind == "exit":
                finished.add(worker_id)
            else:
                log.debug("worker %d traceback:\n%s", worker_id, message[4])
                where = f" on tensor {tasks[index].name}" if index is not None else ""
                raise MergeError(f"worker {worker_id} failed{where}: {message[3]}")
    finally:
        for worker in started:
            if worker.is_alive():
                worker.terminate()
        for worker in started:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
                worker.join()
        todo.cancel_join_thread()
        results.cancel_join_thread()


def _check_alive(workers, finished, current, tasks) -> None:
    """Raise if a worker died without reporting (killed, out of memory, crashed)."""
    for worker_id, worker in enumerate(workers):
        code = worker.exitcode
        if code not in (None, 0):
            index = current.get(worker_id)
            where = f" while merging tensor {tasks[index].name}" if index is not None else ""
            how = f"was killed by signal {-code} ({_signal_name(-code)})" if code < 0 else f"exited with code {code}"
            raise MergeError(f"worker {worker_id} {how}{where}")


def _signal_name(signum: int) -> str:
    """SIGKILL for 9; a SIGBUS death most likely means an input file shrank while a chunk of it was mapped."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return "unknown signal"
    return f"{name}: an input file shrank while it was being read?" if name == "SIGBUS" else name
