"""Merge math: pure functions on float32 arrays, registered by kind and name.

Importing this package registers every built-in sparsify and merge function.
"""

from llm_merge.methods import extra, merge, mergekit_sparsify, spherical, sparsify  # noqa: F401  (registration side effect)
from llm_merge.methods import arcee_fusion, karcher  # noqa: F401  (registration side effect)
from llm_merge.methods import ram, sce  # noqa: F401  (registration side effect)
from llm_merge.methods.registry import Method, get, names

__all__ = ["Method", "get", "names"]
