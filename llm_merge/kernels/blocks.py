"""Raw-bit block helpers shared by the streamed statistics and the fused chunk pass (numba).

Raw lanes: bfloat16 bits as uint16, float16 bits as int16 (numba has no float16 arrays; the
signedness only tells the two apart, ``is_half_lane``), float32 bits as uint32.
``widen_block`` turns any of them into float32 bits and counts NaN/Inf, ``task_vector_row`` and
``task_vector_block`` also subtract the base (into ``TaskVectorBuffers``), ``narrow_block`` rounds
float32 bits back into a lane; ``half_to_float_bits`` and ``float_bits_to_half`` convert one float16
value exactly as NumPy does; ``prefetch_inputs`` asks the CPU for the inputs of a block a few blocks
ahead.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import binding as llvm_binding, ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from llm_merge.kernels.cache import configure_kernel_caches

#: The options of every compiled kernel: cached on disk, GIL released, NumPy's division semantics.
JIT_OPTIONS = dict(cache=True, nogil=True, error_model="numpy")


#: llvm.prefetch's name for an i8 pointer: LLVM 17 and later have opaque pointers only (and read
#: ``i8*`` as ``ptr``); earlier LLVMs, as numba's llvmlite builds them, have typed pointers.
_PREFETCH = "llvm.prefetch.p0" if llvm_binding.llvm_version_info[0] >= 17 else "llvm.prefetch.p0i8"


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the CPU to fetch the cache line of ``array[index]`` (llvm.prefetch: read, all cache levels)."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]), _PREFETCH)
        builder.call(function, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


#: How far ahead of the block being processed its inputs are prefetched, in blocks. Mapped page-cache
#: pages are 4 KB and the hardware prefetchers stop at each page's end; without this hint every
#: new page starts with cache misses (mapped chunks: linear's kernel takes 2.3 ns per element
#: without it, 1.9 with it).
PREFETCH_BLOCKS = 4


@njit(**JIT_OPTIONS)
def _prefetch_range(raw, start, count):
    """Prefetch the cache lines of ``raw[start:start+count]`` (clipped to the array)."""
    end = min(start + count, raw.size)
    for j in range(start, end, 64 // raw.itemsize):
        _prefetch(raw, j)


@njit(**JIT_OPTIONS)
def prefetch_inputs(raws, base_raw, has_base, s, block):
    """Prefetch the inputs of the block ``PREFETCH_BLOCKS`` blocks after the one at element ``s``."""
    ahead = s + PREFETCH_BLOCKS * block
    for i in range(len(raws)):
        _prefetch_range(raws[i], ahead, block)
    if has_base:
        _prefetch_range(base_raw, ahead, block)


def is_half_lane(raw: np.ndarray) -> bool:
    """Whether a raw lane holds float16 bits (int16); in a kernel, a compile-time constant."""
    return raw.dtype == np.int16


@overload(is_half_lane)
def _is_half_lane(raw):
    half = isinstance(raw, types.Array) and raw.dtype == types.int16
    return lambda raw: half


@njit(inline="always", **JIT_OPTIONS)
def half_to_float_bits(h):
    """float32 bits (uint32) of the float16 bits ``h`` (int16 or uint16): exact, NaN payloads kept, as NumPy.

    Branch-free, so loops over it vectorize: normal halves rebias their exponent, subnormal ones
    are their significand times 2^-24 (exact in float32), Inf/NaN keep their payload.
    """
    h = np.uint32(np.uint16(h))
    sign = np.uint32(np.uint32(h & np.uint32(0x8000)) << 16)
    exponent = np.uint32(h & np.uint32(0x7C00))
    significand = np.uint32(h & np.uint32(0x03FF))
    normal = np.uint32(np.uint32(np.uint32(h & np.uint32(0x7FFF)) + np.uint32(0x1C000)) << 13)
    special = np.uint32(np.uint32(0x7F800000) | np.uint32(significand << 13))
    tiny = np.float32(np.float32(np.int32(significand)) * np.float32(2.0**-24)).view(np.uint32)
    bits = special if exponent == np.uint32(0x7C00) else (tiny if exponent == np.uint32(0) else normal)
    return np.uint32(bits | sign)


@njit(inline="always", **JIT_OPTIONS)
def float_bits_to_half(f):
    """float16 bits (uint32, low 16 bits) of the float32 bits ``f``, rounded to nearest even: NumPy's
    ``astype(float16)`` bit for bit (checked on all 2^32 patterns: NaN payloads, subnormals, overflow).

    Each case is computed and one selected, so loops over it vectorize.
    """
    sign = np.uint32(np.uint32(f & np.uint32(0x80000000)) >> 16)
    f_exp = np.uint32(f & np.uint32(0x7F800000))
    f_sig = np.uint32(f & np.uint32(0x007FFFFF))
    # NaN keeps the top of its payload (and stays a NaN); Inf and overflow give Inf
    nan = np.uint32(np.uint32(0x7C00) + np.uint32(f_sig >> 13))
    nan = np.uint32(nan + np.uint32(nan == np.uint32(0x7C00)))
    huge = nan if (f_exp == np.uint32(0x7F800000)) & (f_sig != np.uint32(0)) else np.uint32(0x7C00)
    # subnormal half: the significand with its implicit bit shifted right by 1 to 11 places, rounded;
    # below 2^-25 (exponent field under 0x33000000) a signed zero
    shift = min(np.uint32(np.uint32(113) - min(np.uint32(f_exp >> 23), np.uint32(112))), np.uint32(31))
    sub = np.uint32(np.uint32(np.uint32(0x00800000) + f_sig) >> shift)
    not_tie = np.uint32(sub & np.uint32(0x3FFF)) != np.uint32(0x1000)  # not exactly halfway to an even half
    round_up = not_tie | (np.uint32(f & np.uint32(0x7FF)) != np.uint32(0))  # or nonzero bits shifted out below
    sub = np.uint32(np.uint32(sub + (np.uint32(0x1000) if round_up else np.uint32(0))) >> 13)
    sub = sub if f_exp >= np.uint32(0x33000000) else np.uint32(0)
    # normal half: rebiased exponent plus the rounded significand (a carry moves into the exponent, up to Inf)
    not_tie = np.uint32(f_sig & np.uint32(0x3FFF)) != np.uint32(0x1000)
    rounded = np.uint32(f_sig + (np.uint32(0x1000) if not_tie else np.uint32(0)))
    normal = np.uint32(np.uint32(np.uint32(f_exp - np.uint32(0x38000000)) >> 13) + np.uint32(rounded >> 13))
    half = huge if f_exp >= np.uint32(0x47800000) else (sub if f_exp <= np.uint32(0x38000000) else normal)
    return np.uint32(sign + half)


_EXPONENT = np.uint32(0x7F800000)
#: Elements per int32 partial count in ``widen_block`` (far below 2^31).
_COUNT_SPAN = 1 << 20


@njit(**JIT_OPTIONS)
def widen_block(raw, start, count, out_bits):
    """float32 bits of ``raw[start:start+count]`` into ``out_bits``; returns the NaN/Inf count.

    ``raw`` holds bfloat16 bits (uint16: a 16-bit shift), float16 bits (int16: ``half_to_float_bits``)
    or float32 bits (uint32). Written to
    stay in 32-bit vector lanes: numba types integer arithmetic as 64-bit, and a variable shift
    or an int64 count makes the loop run on half as many lanes (2.2x slower). So the shift is
    a constant and the count an int32 partial sum per ``_COUNT_SPAN`` elements.
    """
    bad = 0
    for s in range(start, start + count, _COUNT_SPAN):
        m = min(_COUNT_SPAN, start + count - s)
        source, target = raw[s : s + m], out_bits[s - start : s - start + m]  # indices from 0: no negative-index checks, so the loops vectorize
        part = np.int32(0)
        if is_half_lane(raw):
            for j in range(m):
                bits = half_to_float_bits(source[j])
                target[j] = bits
                part = np.int32(part + np.int32((bits & _EXPONENT) == _EXPONENT))
        elif raw.itemsize == 2:
            for j in range(m):
                bits = np.uint32(np.uint32(source[j]) << 16)
                target[j] = bits
                part = np.int32(part + np.int32((bits & _EXPONENT) == _EXPONENT))
        else:
            for j in range(m):
                bits = np.uint32(source[j])
                target[j] = bits
                part = np.int32(part + np.int32((bits & _EXPONENT) == _EXPONENT))
        bad += part
    return bad


class TaskVectorBuffers(NamedTuple):
    """Float32 scratch for one block of task vectors: a row per model and the base's values, each with
    its uint32 view (made here, once: a view in compiled code costs compile time). Kernels take its
    fields out once per chunk, not per block."""

    rows: np.ndarray  # (k, block)
    rows_bits: np.ndarray
    base: np.ndarray  # (block,)
    base_bits: np.ndarray

    @classmethod
    def allocate(cls, k: int, block: int) -> "TaskVectorBuffers":
        rows, base = np.empty((k, block), np.float32), np.empty(block, np.float32)
        return cls(rows, rows.view(np.uint32), base, base.view(np.uint32))


@njit(inline="always", **JIT_OPTIONS)
def task_vector_row(raw, s, m, base, has_base, out, out_bits):
    """out[:m] = the float32 task vector of ``raw[s:s+m]`` (raw bits, as ``widen_block`` takes them) against
    ``base``; ``out_bits`` is ``out`` viewed as uint32. Returns the NaN/Inf count of the raw values."""
    bad = widen_block(raw, s, m, out_bits)
    if has_base:
        for j in range(m):
            out[j] -= base[j]
    return bad


@njit(**JIT_OPTIONS)
def task_vector_block(raws, base_raw, has_base, s, m, rows, rows_bits, base, base_bits, nonfinite):
    """rows[i, :m] = model i's elements s .. s+m as float32, minus the base's (kept in ``base``).

    The arrays are a ``TaskVectorBuffers``' fields, passed one by one: this runs per block, and each
    field taken from a tuple inside compiled code costs a reference count update. ``nonfinite[i]``
    counts the NaN/Inf inputs of model i, ``nonfinite[k]`` those of the base.
    """
    k = len(raws)
    if has_base:
        nonfinite[k] += widen_block(base_raw, s, m, base_bits)
    for i in range(k):
        nonfinite[i] += task_vector_row(raws[i], s, m, base, has_base, rows[i], rows_bits[i])


@njit(**JIT_OPTIONS)
def narrow_block(bits, count, out, start):
    """float32 ``bits[:count]`` into ``out[start:]``, rounded to nearest even: bfloat16 bits when ``out`` is
    uint16, float16 bits when it is int16 (``float_bits_to_half``), else the float32 bits.
    Returns how many written values are NaN/Inf (rounding may overflow a finite float32).

    Every step is cast back to uint32 (numba would compute in 64 bits: half the vector lanes);
    no step overflows 32 bits, so the result is the same.
    """
    target = out[start : start + count]
    bad = 0
    if is_half_lane(out):
        for j in range(count):
            half = np.uint16(float_bits_to_half(bits[j]))
            target[j] = np.int16(half)
            bad += np.uint16(half & np.uint16(0x7C00)) == np.uint16(0x7C00)
    elif out.itemsize == 2:
        for j in range(count):
            b = bits[j]
            odd = np.uint32(np.uint32(b >> 16) & np.uint32(1))
            rounded = np.uint32(np.uint32(b + np.uint32(0x7FFF)) + odd)
            quiet = np.uint32(np.uint32(b >> 16) | np.uint32(0x40))
            nan = np.uint32(b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            value = np.uint16(quiet if nan else np.uint32(rounded >> 16))
            target[j] = value
            bad += np.uint16(value & np.uint16(0x7F80)) == np.uint16(0x7F80)
    else:
        for j in range(count):
            b = bits[j]
            target[j] = b
            bad += np.uint32(b & _EXPONENT) == _EXPONENT
    return bad


@njit(**JIT_OPTIONS)
def count_nonfinite_kernel(bits):
    """Number of NaN/Inf among float32 values given as their uint32 bits."""
    bad = 0
    for j in range(bits.size):
        bad += (bits[j] & _EXPONENT) == _EXPONENT
    return bad


#: Modules whose compiled code the kernels here inline or call (none), for their cache stamps.
KERNEL_DEPENDENCIES = ()
configure_kernel_caches(globals())  # no dependencies: only the cache writes are serialized
