"""Mapping between safetensors dtype strings and NumPy / ml_dtypes dtypes."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from llm_merge.errors import MergeError

_BY_NAME: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_BY_DTYPE: dict[np.dtype, str] = {dtype: name for name, dtype in _BY_NAME.items()}

#: Float types that are merged (computed in float32); everything else is copied.
MERGEABLE = frozenset({"F64", "F32", "F16", "BF16"})

#: User-facing names accepted by ``--output_dtype``.
OUTPUT_DTYPES: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def to_numpy(name: str) -> np.dtype:
    """NumPy dtype of a safetensors dtype string (``"BF16"`` -> ``ml_dtypes.bfloat16``)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise MergeError(f"unsupported safetensors dtype {name!r}; known: {', '.join(_BY_NAME)}") from None


def to_safetensors(dtype: np.dtype) -> str:
    """safetensors dtype string of a NumPy dtype."""
    try:
        return _BY_DTYPE[np.dtype(dtype)]
    except KeyError:
        raise MergeError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors") from None


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype string."""
    return to_numpy(name).itemsize
