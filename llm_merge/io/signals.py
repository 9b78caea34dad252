"""Stop signals: within ``stop_signals_raise``, SIGTERM and SIGHUP raise ``Terminated`` in the main thread.

A stop signal then unwinds the run like Ctrl-C does: the callers' cleanup (stopping workers,
removing the staging directory) runs and nothing is published.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

from llm_merge.errors import MergeError

#: Signals that stop a run as SIGTERM does: workers stopped, the staging directory removed, nothing published.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(MergeError):
    """A stop signal (SIGTERM, SIGHUP) was received: the run stops and leaves no output."""


#: The stop signal being handled (nested ``stop_signals_raise`` blocks share it), and how deep the blocks are.
_stopping: list[int] = []
_stop_depth = [0]
#: The process whose run the handler stops; a worker forked from it inherits the handler, not the run.
_owner_pid = [0]


def _raise_terminated(signum: int, frame: object) -> None:
    if os.getpid() != _owner_pid[0]:
        # A forked worker that has not set its own handlers yet: die of the signal, as its default does,
        # instead of raising in worker start-up code (which would print a traceback).
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if not _stopping:
        _stopping.append(signum)
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}; no output was written")


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise Terminated in the main thread (elsewhere: no change).

    Only the first signal raises; later ones are ignored until the outermost block exits, so that
    they cannot cut short the cleanup the first one started (stopping workers, removing the
    staging directory). A signal ignored on entry stays ignored (SIGHUP under ``nohup``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _owner_pid[0] = os.getpid()
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum, handler in previous.items():
        if signum == signal.SIGTERM or handler is not signal.SIG_IGN:
            signal.signal(signum, _raise_terminated)
    _stop_depth[0] += 1
    try:
        yield
    finally:
        _stop_depth[0] -= 1
        if not _stop_depth[0]:
            _stopping.clear()
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

