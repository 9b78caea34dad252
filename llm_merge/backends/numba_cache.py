"""Keep numba's on-disk cache honest about kernels that inline other modules' kernels.

numba's cache checks the timestamp of each kernel's own source file only, so a kernel that
inlines kernels or constants of another module keeps its stale machine code when only that
module changes (an edit, or a ``git pull`` into an editable install).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)


def touch_if_older(source: str | os.PathLike, dependencies: Iterable[str | os.PathLike]) -> bool:
    """Set ``source``'s modification time to now if a dependency was modified after it.

    numba then recompiles the kernels of ``source`` instead of loading them from its cache.
    Returns whether the file was touched; a file that cannot be read or touched (a read-only
    install, whose files are all written together) is left as it is.
    """
    try:
        newest = max(Path(dependency).stat().st_mtime for dependency in dependencies)
        if newest <= Path(source).stat().st_mtime:
            return False
        os.utime(source)
    except (OSError, ValueError) as exc:  # ValueError: no dependencies
        log.debug("numba cache check of %s skipped: %s", source, exc)
        return False
    log.debug("%s is older than a module its kernels inline: touched, so numba recompiles them", source)
    return True
