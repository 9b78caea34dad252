"""Keep numba's on-disk cache honest about kernels that inline other modules' kernels.

numba checks a cached kernel against its own source file only: the file's modification time in
older releases, a hash of its content in newer ones (0.68 here). A kernel that inlines kernels
or constants of another module therefore keeps its stale machine code when only that module
changes: after an edit, a ``git pull`` into an editable install, or an upgrade that leaves the
old cache files behind (pip does not remove them). Touching the kernel's file, as this module
once did, no longer helps once the stamp is a content hash.

``bind_to_dependencies`` adds a digest of the dependencies' contents to the freshness stamp of
every cached kernel of a module, so numba compiles them afresh whenever one of those modules
changes, and loads them from its cache otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)


def content_digest(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 of the files' contents, in the order given (their paths do not enter it)."""
    digest = hashlib.sha256()
    for path in paths:
        content = Path(path).read_bytes()
        digest.update(len(content).to_bytes(8, "little"))
        digest.update(content)
    return digest.hexdigest()


def bind_to_dependencies(namespace: dict, dependencies: Iterable[str | os.PathLike]) -> int:
    """Make the cached kernels defined in ``namespace`` (a module's ``globals()``) depend on ``dependencies``.

    Call it once, after the module's kernels are decorated and before any is called: each
    kernel's cache stamp becomes (numba's stamp, digest of the dependencies), so a cache
    written against other dependency contents is not fresh and numba compiles the kernel
    again (and overwrites that cache). Returns how many kernels were bound; kernels without
    an on-disk cache are skipped, and so is everything when a dependency cannot be read
    (an install numba itself cannot cache from).
    """
    module = namespace["__name__"]
    try:
        digest = content_digest(dependencies)
    except OSError as exc:
        log.debug("numba cache of %s not bound to its dependencies: %s", module, exc)
        return 0
    bound = 0
    for value in list(namespace.values()):
        py_func = getattr(value, "py_func", None)
        cache_file = getattr(getattr(value, "_cache", None), "_cache_file", None)
        if py_func is None or py_func.__module__ != module or not hasattr(cache_file, "_source_stamp"):
            continue
        cache_file._source_stamp = (cache_file._source_stamp, digest)
        bound += 1
    return bound
