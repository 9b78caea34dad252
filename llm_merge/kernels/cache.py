"""Keep numba's on-disk kernel cache honest: stale when a module a kernel inlines changes, and
safe when several worker processes write it at once.

numba checks a cached kernel against its own source file only: the file's modification time in
older releases, a hash of its content in newer ones (0.68 here). A kernel that inlines or calls
kernels, or uses constants, of another module therefore keeps its stale machine code when only that
module changes: after an edit, a ``git pull`` into an editable install, or an upgrade that leaves the
old cache files behind (pip does not remove them). Touching the kernel's file does not help where
the stamp is a content hash.

``bind_to_dependencies`` adds a digest of the dependencies' contents to the freshness stamp of
every cached kernel of a module, so numba compiles them afresh whenever one of those modules
changes, and loads them from its cache otherwise.

numba also updates a kernel's cache index by reading it, adding the new entry and writing it
back, with no lock: worker processes that compile two signatures of one kernel at the same time
(a cold cache, tensors of two dtypes) can drop an entry (compiled again by the next run) or
give both entries one data file, so that the index maps a signature to another signature's
machine code (shown: ``twice(0.25)`` returning 0). ``serialize_cache_writes`` holds an exclusive
``flock`` on a lock file in the cache directory around each such update (POSIX; elsewhere
numba's own behaviour stays).
Loading a cached kernel, numba first refreshes its whole target context: it imports and registers
the implementation of every NumPy function and Python type it can compile (~0.2 s, once per
process), though a cached kernel is machine code that needs none of them. ``load_without_refresh``
makes a kernel's cache load skip that refresh and set up only numba's runtime (NRT), which the
machine code links against (without it, the load crashes); compiling (a cache miss) still refreshes the
context, in numba's compiler. What numba's loader needs is its internals, so this is done only on the
numba releases it was checked on (``REFRESH_SKIP_RELEASES``); elsewhere numba loads as it always does.

``configure_kernel_caches`` applies all three to a module's kernels. Each kernel module lists, in
``KERNEL_DEPENDENCIES``, every module whose compiled code or constants end up in its kernels, those
of its dependencies included (``tests/test_numba_cache.py`` checks that the lists are closed).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: numba's unlocked index updates stay
    fcntl = None

log = logging.getLogger(__name__)


def content_digest(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 of the files' contents, in the order given (their paths do not enter it)."""
    digest = hashlib.sha256()
    for path in paths:
        content = Path(path).read_bytes()
        digest.update(len(content).to_bytes(8, "little"))
        digest.update(content)
    return digest.hexdigest()


def _function_caches(namespace: dict) -> Iterator[Any]:
    """numba's cache (``FunctionCache``) of every cached kernel defined in ``namespace``."""
    module = namespace["__name__"]
    for value in list(namespace.values()):
        py_func = getattr(value, "py_func", None)
        cache = getattr(value, "_cache", None)
        if py_func is not None and py_func.__module__ == module and hasattr(cache, "_cache_file"):
            yield cache


def _cache_files(namespace: dict) -> Iterator[Any]:
    """The on-disk cache (numba's ``IndexDataCacheFile``) of every cached kernel defined in ``namespace``."""
    for cache in _function_caches(namespace):
        if hasattr(cache._cache_file, "_source_stamp"):
            yield cache._cache_file


def bind_to_dependencies(namespace: dict, dependencies: Iterable[str | os.PathLike]) -> int:
    """Make the cached kernels defined in ``namespace`` (a module's ``globals()``) depend on ``dependencies``.

    Call it once, after the module's kernels are decorated and before any is called: each
    kernel's cache stamp becomes (numba's stamp, digest of the dependencies), so a cache
    written against other dependency contents is not fresh and numba compiles the kernel
    again (and overwrites that cache). Returns how many kernels were bound; kernels without
    an on-disk cache are skipped, and so is everything when a dependency cannot be read
    (an install numba itself cannot cache from).
    """
    try:
        digest = content_digest(dependencies)
    except OSError as exc:
        log.debug("numba cache of %s not bound to its dependencies: %s", namespace["__name__"], exc)
        return 0
    bound = 0
    for cache_file in _cache_files(namespace):
        cache_file._source_stamp = (cache_file._source_stamp, digest)
        bound += 1
    return bound


#: The lock file ``serialize_cache_writes`` takes, one per cache directory.
LOCK_NAME = "llm_merge-numba-cache.lock"


def _locked(save: Callable[[Any, Any], None], lock_path: str) -> Callable[[Any, Any], None]:
    @functools.wraps(save)
    def locked_save(key: Any, data: Any) -> None:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:  # e.g. a read-only cache directory, where numba's own save fails and says so
            log.debug("numba cache lock %s unavailable: %s", lock_path, exc)
            return save(key, data)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:  # e.g. a network file system without locks: save as numba would
                log.debug("numba cache lock %s not taken: %s", lock_path, exc)
            return save(key, data)
        finally:
            os.close(fd)  # releases the lock

    return locked_save


def serialize_cache_writes(namespace: dict) -> int:
    """Make every index update of the cached kernels defined in ``namespace`` exclusive across processes.

    numba's ``save`` (read the index, pick a free data file name, write the index, write the
    data) then runs under an exclusive ``flock`` of ``LOCK_NAME`` in the cache directory, so
    concurrent compilations in several workers keep every entry, each in its own data file.
    Returns how many kernels were guarded (none where ``fcntl`` or numba's internals are missing).
    """
    if fcntl is None:
        return 0
    guarded = 0
    for cache_file in _cache_files(namespace):
        cache_path = getattr(cache_file, "_cache_path", None)
        if cache_path is None or not callable(getattr(cache_file, "save", None)):
            continue
        cache_file.save = _locked(cache_file.save, os.path.join(cache_path, LOCK_NAME))
        guarded += 1
    return guarded


#: numba releases (major, minor) on which loading cached kernels without the context refresh was
#: checked (``tests/test_numba_cache.py``, and the whole suite on the compiled path).
REFRESH_SKIP_RELEASES = {(0, 68)}


def refresh_skip_checked() -> bool:
    """Whether the installed numba is a release ``load_without_refresh`` was checked on."""
    import numba

    return tuple(int(part) for part in numba.__version__.split(".")[:2]) in REFRESH_SKIP_RELEASES


def load_without_refresh(namespace: dict) -> int:
    """Make the cached kernels defined in ``namespace`` load without refreshing numba's target context.

    Each kernel's cache gets its own ``load_overload``: numba's, less the context refresh, with the
    runtime (NRT) the machine code links against set up first. Returns how many kernels were
    changed (none on a numba release it was not checked on, or whose internals differ).
    """
    if not refresh_skip_checked():
        return 0
    from numba.core.runtime import nrt

    changed = 0
    for cache in _function_caches(namespace):
        if not (callable(getattr(cache, "_load_overload", None))
                and callable(getattr(cache, "_guard_against_spurious_io_errors", None))):
            continue

        def load_overload(sig, target_context, cache=cache):
            nrt.rtsys.initialize(target_context)
            with cache._guard_against_spurious_io_errors():
                return cache._load_overload(sig, target_context)
            return None  # the guard swallowed a spurious I/O error: numba compiles the kernel

        cache.load_overload = load_overload
        changed += 1
    return changed


def configure_kernel_caches(namespace: dict, dependencies: Iterable[str | os.PathLike] = ()) -> None:
    """For a kernel module (its ``globals()``, after its kernels): bind their caches to the modules
    they inline (``dependencies``, if any), serialize their cache writes across processes, and load
    them without numba's context refresh."""
    dependencies = list(dependencies)
    if dependencies:
        bind_to_dependencies(namespace, dependencies)
    serialize_cache_writes(namespace)
    load_without_refresh(namespace)
