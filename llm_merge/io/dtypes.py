"""Mapping between safetensors dtype strings and NumPy dtypes.

Two views of a tensor's elements. ``to_numpy`` gives the NumPy dtype that computes with them:
bfloat16 and the float8 types are ``ml_dtypes``'s, imported on first use (0.5-1 s with
ml_dtypes 0.7). ``stored`` gives the dtype that holds the stored bytes for code that only moves
them or converts them bit by bit, as the merge path does (bfloat16 -> float32 is a 16-bit shift,
float32 -> bfloat16 a rounding of the bits): bfloat16 there is ``BFLOAT16_BITS``, so a bfloat16
merge never imports ml_dtypes.
"""

from __future__ import annotations

import sys

import numpy as np

from llm_merge.errors import MergeError

#: bfloat16 elements as their bit patterns, for code that moves or bit-converts them without
#: ml_dtypes (``stored("BF16")``): a one-field record of a uint16, distinct from U16 and from
#: ``ml_dtypes.bfloat16``; view it as ``np.uint16`` to work on the bits. NumPy has no arithmetic on it.
BFLOAT16_BITS = np.dtype([("bfloat16_bits", "<u2")])

_PLAIN: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
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
#: safetensors name -> name of its type in ml_dtypes.
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
#: Every safetensors dtype string known here, in safetensors' order.
NAMES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL")
_PLAIN_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in _PLAIN.items()}
_ITEMSIZE = {**{name: dtype.itemsize for name, dtype in _PLAIN.items()}, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}

#: Float types that are merged (computed in float32); everything else is copied.
MERGEABLE = frozenset({"F64", "F32", "F16", "BF16"})

#: User-facing names accepted by ``--output_dtype``.
OUTPUT_DTYPES: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _unknown(name: str) -> MergeError:
    return MergeError(f"unsupported safetensors dtype {name!r}; known: {', '.join(NAMES)}")


def to_numpy(name: str) -> np.dtype:
    """NumPy dtype of a safetensors dtype string (``"BF16"`` -> ``ml_dtypes.bfloat16``, imported now if not yet)."""
    dtype = _PLAIN.get(name)
    if dtype is not None:
        return dtype
    if name not in _ML_DTYPES:
        raise _unknown(name)
    import ml_dtypes  # only for a tensor that computes in bfloat16 or float8 (see the module docstring)

    return np.dtype(getattr(ml_dtypes, _ML_DTYPES[name]))


def stored(name: str) -> np.dtype:
    """dtype that holds a safetensors dtype's stored bytes: ``to_numpy``'s, but bfloat16 as ``BFLOAT16_BITS``
    (no ml_dtypes import); for code that only moves the elements or converts their bits."""
    return BFLOAT16_BITS if name == "BF16" else to_numpy(name)


def is_bfloat16(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is bfloat16: ``BFLOAT16_BITS`` or ``ml_dtypes.bfloat16`` (never imports ml_dtypes)."""
    dtype = np.dtype(dtype)
    if dtype == BFLOAT16_BITS:
        return True
    ml_dtypes = sys.modules.get("ml_dtypes")  # a bfloat16 array exists only once it is imported
    return ml_dtypes is not None and dtype == ml_dtypes.bfloat16


def to_safetensors(dtype: np.dtype) -> str:
    """safetensors dtype string of a NumPy dtype (``BFLOAT16_BITS`` and ml_dtypes' types included)."""
    dtype = np.dtype(dtype)
    if dtype in _PLAIN_NAMES:
        return _PLAIN_NAMES[dtype]
    if is_bfloat16(dtype):
        return "BF16"
    ml_dtypes = sys.modules.get("ml_dtypes")
    for name, type_name in _ML_DTYPES.items():
        if ml_dtypes is not None and dtype == np.dtype(getattr(ml_dtypes, type_name)):
            return name
    raise MergeError(f"dtype {dtype} cannot be stored in safetensors")


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype string (no ml_dtypes import)."""
    try:
        return _ITEMSIZE[name]
    except KeyError:
        raise _unknown(name) from None
