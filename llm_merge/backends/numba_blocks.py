"""Raw-bit block helpers shared by the streamed statistics and the fused chunk pass (numba).

``widen_block`` turns bfloat16 (uint16) or float32 (uint32) bits into float32 bits and counts NaN/Inf;
``prefetch_inputs`` asks the CPU for the inputs of a block a few blocks ahead.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm_binding, ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from llm_merge.backends.numba_cache import configure_kernel_caches

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
#: new page starts with cache misses (mapped chunks: linear's kernel 2.3 -> 1.9 ns per element).
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


_EXPONENT = np.uint32(0x7F800000)
#: Elements per int32 partial count in ``widen_block`` (far below 2^31).
COUNT_SPAN = 1 << 20


@njit(**JIT_OPTIONS)
def widen_block(raw, start, count, out_bits):
    """float32 bits of ``raw[start:start+count]`` into ``out_bits``; returns the NaN/Inf count.

    ``raw`` holds bfloat16 bits (uint16: a 16-bit shift) or float32 bits (uint32). Written to
    stay in 32-bit vector lanes: numba types integer arithmetic as 64-bit, and a variable shift
    or an int64 count makes the loop run on half as many lanes (2.2x slower). So the shift is
    a constant and the count an int32 partial sum per ``COUNT_SPAN`` elements.
    """
    bad = 0
    for s in range(start, start + count, COUNT_SPAN):
        m = min(COUNT_SPAN, start + count - s)
        source, target = raw[s : s + m], out_bits[s - start : s - start + m]  # indices from 0: no negative-index checks, so the loops vectorize
        part = np.int32(0)
        if raw.itemsize == 2:
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


configure_kernel_caches(globals())  # no dependencies: only the cache writes are serialized
