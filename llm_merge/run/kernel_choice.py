"""Whether a merge runs on the compiled (numba) kernels or in plain NumPy: the faster of the two.

Loading the kernels costs a fixed ``KERNEL_LOAD_SECONDS`` (numba's import and the cached machine code);
plain NumPy costs its sparsifier's and merge's ``numpy_seconds_per_gb`` more per GB of input, shared by
the worker processes. The kernels load where they save more than they cost to load.
"""

from __future__ import annotations

import os

from llm_merge import methods
from llm_merge.config.options import MergeConfig

#: Wall time a merge spends loading the compiled kernels before merging anything (import numba, load the
#: cached kernels): a toy family's merge takes 0.22 s in NumPy against 0.43 s compiled (2-vCPU AMD EPYC).
KERNEL_LOAD_SECONDS = 0.2


def numpy_extra_seconds(cfg: MergeConfig, input_bytes: int) -> float:
    """How much longer the merge would take in plain NumPy than on loaded kernels (estimated)."""
    per_gb = sum(methods.get(kind, name).numpy_seconds_per_gb
                 for kind, name in (("sparsify", cfg.sparsify_type), ("merge", cfg.merge_type)))
    workers = max(1, min(cfg.n_process, os.cpu_count() or 1))
    return input_bytes / 1e9 * per_gb / workers


def worth_compiling(cfg: MergeConfig, input_bytes: int) -> bool:
    """Use the numba kernels where they save more than loading them costs (``LLM_MERGE_NUMBA=1/0`` forces
    the choice)."""
    forced = os.environ.get("LLM_MERGE_NUMBA")
    if forced in ("0", "1"):
        return forced == "1"
    return numpy_extra_seconds(cfg, input_bytes) > KERNEL_LOAD_SECONDS
