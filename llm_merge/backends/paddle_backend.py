"""PaddlePaddle implementation of the ops the methods use (``--tensor_type pd``).

It imports ``paddle`` at module level (``io.pdparams`` imports it lazily for .pdparams files). It mirrors
:class:`llm_merge.backends.numpy_backend.NumpyOps` operation by operation, and
its results equal NumPy's: elementwise float32 arithmetic is the same IEEE
arithmetic, scalars are rounded to float32 exactly as ``np.float32`` does,
statistics that decide which entries survive (trim threshold, magprune ranks,
random masks) are bit-exact, and only float64 sums may differ in the last bits
(summation order).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import numpy as np

with warnings.catch_warnings():
    # paddle's import may warn about build tools (ccache) it only needs for C++ extensions.
    warnings.simplefilter("ignore")
    import paddle

from llm_merge.backends import CHUNK_ELEMENTS
from llm_merge.backends.numpy_backend import NumpyOps
from llm_merge.errors import MergeError
from llm_merge.kernels.counter_rng import GAMMA, MIX1, MIX2, UNIT, keep_threshold

DEVICES = ("cpu", "gpu", "low_gpu_mem")
_INSTALL_HINT = (
    "install a CUDA build of PaddlePaddle (pip install paddlepaddle-gpu, matching your CUDA version; "
    "see https://www.paddlepaddle.org.cn/install/quick) or use --device cpu"
)


def _signed64(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value``."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _is_tensor(x: Any) -> bool:
    return isinstance(x, paddle.Tensor)


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float, np.generic)) or (isinstance(x, np.ndarray) and x.ndim == 0)


class PaddleOps:
    """Array operations on float32 Paddle tensors, on the CPU or one GPU.

    ``device``:

    * ``"cpu"``: every tensor lives on the CPU (Paddle's CPU kernels).
    * ``"gpu"``: chunks and whole-tensor statistics are computed on GPU 0. The
      engine uploads one chunk (``CHUNK_ELEMENTS``) per input at a time, but the
      prepare pass of trim/magprune uploads a whole task vector, so the trim
      threshold and the magprune ranks (kept on the GPU, sliced per chunk) are
      computed there: GPU memory grows with the largest tensor.
    * ``"low_gpu_mem"``: as ``"gpu"``, except that arrays larger than one engine
      chunk (``max_device_elements``, default ``CHUNK_ELEMENTS``) are
      never uploaded: ``from_numpy`` returns them unchanged and the ops given a
      NumPy array compute on the host with :class:`NumpyOps`. So whole-tensor
      statistics (trim threshold and L1 scale, magprune ranks) are computed by
      NumPy in host memory, the ranks stay on the host and only each chunk's
      slice is uploaded; the GPU holds at most a small constant number of
      chunk-sized buffers per input. Results equal the ``"gpu"`` mode: the
      statistics are exact (threshold, ranks) or float64 sums. The engine's chunk
      must not exceed ``max_device_elements`` (it does not, by default).

    The device is selected lazily, on first use, so that creating the object in
    the parent process does not initialise CUDA before worker processes fork.
    """

    name = "pd"

    def __init__(self, device: str = "cpu", max_device_elements: Optional[int] = None) -> None:
        if device not in DEVICES:
            raise MergeError(f"--device: unknown device {device!r} for --tensor_type pd; valid: {', '.join(DEVICES)}")
        if device != "cpu" and not paddle.device.is_compiled_with_cuda():
            raise MergeError(
                f"--device {device}: the installed PaddlePaddle {paddle.__version__} has no GPU (CUDA) support; {_INSTALL_HINT}"
            )
        if max_device_elements is None:
            max_device_elements = CHUNK_ELEMENTS
        self.device = device
        self.low_gpu_mem = device == "low_gpu_mem"
        self.max_device_elements = max_device_elements
        self._place_name = "cpu" if device == "cpu" else "gpu:0"
        self._place = None
        self._constants: dict[Any, Any] = {}
        self._host = NumpyOps()  # whole-tensor statistics of arrays kept on the host (low_gpu_mem)

    # -- device and constants -------------------------------------------------------
    def _activate(self) -> None:
        if self._place is not None:
            return
        try:
            paddle.set_device(self._place_name)
        except Exception as exc:  # no visible GPU, driver mismatch, ...
            raise MergeError(f"--device {self.device}: Paddle cannot use {self._place_name} ({exc}); {_INSTALL_HINT}") from None
        self._place = paddle.CPUPlace() if self.device == "cpu" else paddle.CUDAPlace(0)

    def _const(self, value, dtype: str, cache: bool = True):
        """A 0-D tensor on the device, exact (built from a NumPy scalar); cached unless ``cache`` is false."""
        key = (dtype, repr(value))  # repr: keeps -0.0 apart from 0.0
        tensor = self._constants.get(key)
        if tensor is None:
            self._activate()
            tensor = paddle.to_tensor(np.array(value, dtype=dtype), place=self._place)
            if cache and len(self._constants) < 4096:
                self._constants[key] = tensor
        return tensor

    def _upload(self, x):
        if _is_tensor(x):
            return x
        self._activate()
        return paddle.to_tensor(np.ascontiguousarray(x), place=self._place)

    # -- conversions ----------------------------------------------------------------
    def from_numpy(self, x: np.ndarray):
        """The array as a tensor on the device (a copy); in low_gpu_mem mode, arrays over one chunk stay NumPy."""
        if self.low_gpu_mem and x.size > self.max_device_elements:
            return x
        return self._upload(x)

    @staticmethod
    def to_numpy(x) -> np.ndarray:
        return x.numpy() if _is_tensor(x) else np.asarray(x)

    def float32(self, x):
        """float32 of a scalar (a 0-D tensor, rounded like np.float32) or of a tensor."""
        if _is_tensor(x):
            return x if x.dtype == paddle.float32 else x.astype("float32")
        if isinstance(x, np.ndarray) and x.ndim:
            return self._upload(x.astype(np.float32, copy=False))
        return self._const(float(x), "float32")

    def float64(self, x):
        """float64 tensor of a tensor, a NumPy array (e.g. host ranks: uploaded) or a scalar."""
        if _is_tensor(x):
            return x if x.dtype == paddle.float64 else x.astype("float64")
        return self._upload(np.asarray(x, dtype=np.float64))

    # -- elementwise ----------------------------------------------------------------
    @staticmethod
    def abs(x):
        return paddle.abs(x) if _is_tensor(x) else np.abs(x)

    @staticmethod
    def sign(x):
        return paddle.sign(x) if _is_tensor(x) else np.sign(x)

    @staticmethod
    def zeros_like(x):
        return paddle.zeros_like(x) if _is_tensor(x) else np.zeros_like(x)

    def divide(self, x, y):
        """Elementwise ``x / y`` of float32 tensors, correctly rounded like NumPy's.

        Paddle's CPU kernel for same-shape float division is MKL's vsDiv/vdDiv (within 1 ulp,
        not always correctly rounded), while division by a 0-D tensor is exact. So a tensor
        divisor is divided in float64 and rounded once to float32: the float64 quotient of two
        float32 values is within 1 float64 ulp, far from any float32 rounding midpoint (a
        quotient of 24-bit significands is never one), so the result is the IEEE float32 quotient.
        """
        if not (_is_tensor(x) or _is_tensor(y)):
            return np.divide(x, y)
        if _is_scalar(y):
            y = self.float32(y) if x.dtype == paddle.float32 else self._scalar_like(y, x)
        if y.ndim == 0 or x.dtype != paddle.float32:
            return x / y
        return paddle.divide(x.astype("float64"), self._upload(y).astype("float64")).astype("float32")

    def where(self, cond, x, y):
        """``x`` where ``cond`` else ``y``; either of ``x``, ``y`` may be a scalar (cast to the other's dtype)."""
        if not any(_is_tensor(v) for v in (cond, x, y)):
            return np.where(cond, x, y)
        cond = self._upload(cond)
        x_scalar, y_scalar = _is_scalar(x), _is_scalar(y)
        if x_scalar and y_scalar:
            x, y = self.float32(x), self.float32(y)
        elif x_scalar:
            y = self._upload(y)
            x = self._scalar_like(x, y)
        elif y_scalar:
            x = self._upload(x)
            y = self._scalar_like(y, x)
        else:
            x, y = self._upload(x), self._upload(y)
        return paddle.where(cond, x, y)

    def _scalar_like(self, value, like):
        dtype = {paddle.float32: "float32", paddle.float64: "float64", paddle.bool: "bool", paddle.int64: "int64", paddle.int32: "int32"}.get(like.dtype)
        if dtype is None:
            return paddle.full([], value, dtype=like.dtype)
        return self._const(np.array(value).astype(dtype).item(), dtype)

    # -- reductions and statistics ----------------------------------------------------
    def sum64(self, x) -> float:
        """Sum accumulated in float64."""
        if not _is_tensor(x):
            return self._host.sum64(x)
        return float(paddle.sum(x.astype("float64")).item())

    def dot64(self, x, y) -> float:
        """Dot product accumulated in float64."""
        if not (_is_tensor(x) or _is_tensor(y)):
            return self._host.dot64(x, y)
        x64 = x.flatten().astype("float64")
        y64 = x64 if y is x else y.flatten().astype("float64")
        return float(paddle.dot(x64, y64).item())

    def kth_largest(self, x, k: int) -> float:
        """The k-th largest value of a vector (k >= 1)."""
        if not _is_tensor(x):
            return self._host.kth_largest(x, k)
        flat = x.flatten()
        n = flat.shape[0]
        value, _ = paddle.kthvalue(flat, n - k + 1)
        return float(value.item())

    def doubled_midranks(self, x):
        """Doubled midrank of each |x|, 0 the largest: 2 #{larger} + #{equal} - 1 (as ``NumpyOps``).

        On the device an int32 tensor (int64 from 2^30 elements); NumPy input gives NumpyOps' ranks.
        Magnitudes compare as their float32 bit patterns, NaN included (the largest), as in NumpyOps.
        """
        if not _is_tensor(x):
            return self._host.doubled_midranks(x)
        flat = x.flatten()
        n = flat.shape[0]
        keys = paddle.bitwise_and(paddle.view(flat.astype("float32"), "int32"), self._const(0x7FFFFFFF, "int32"))
        ascending = paddle.sort(keys)
        # 2 #{larger} + #{equal} - 1 = 2n - #{at most} - #{less} - 1
        at_most = paddle.searchsorted(ascending, keys, right=True)
        less = paddle.searchsorted(ascending, keys, right=False)
        del ascending, keys
        doubled = paddle.subtract(self._const(2 * n - 1, "int64"), paddle.add(at_most, less))
        return doubled.astype("int32" if n < 1 << 30 else "int64")

    # -- random draws -----------------------------------------------------------------
    def rng(self, key: int, offset: int) -> "PaddleCounterRNG":
        return PaddleCounterRNG(self, key, offset)


class PaddleCounterRNG:
    """:class:`llm_merge.kernels.counter_rng.CounterRNG` with Paddle int64 ops on the device.

    Paddle has no uint64: int64 holds the same 64 bits, multiplication and addition wrap
    modulo 2^64 in two's complement (so the low 64 bits equal the unsigned result), and the
    shifts are logical (``is_arithmetic=False``), so every draw equals the NumPy one.
    """

    def __init__(self, ops: PaddleOps, key: int, offset: int) -> None:
        self.ops = ops
        self.key = key
        self.offset = offset

    def bits(self, count: int):
        """``draw >> 11`` (53 random bits, as a non-negative int64) of draws ``offset ..``."""
        ops = self.ops
        ops._activate()

        def const(value: int):
            return ops._const(_signed64(value), "int64")

        def xorshift(z, shift: int):
            return paddle.bitwise_xor(z, paddle.bitwise_right_shift(z, const(shift), is_arithmetic=False))

        z = paddle.arange(self.offset + 1, self.offset + 1 + count, dtype="int64")
        z = paddle.multiply(z, const(GAMMA))
        z = paddle.add(z, ops._const(_signed64(self.key), "int64", cache=False))
        z = paddle.multiply(xorshift(z, 30), const(MIX1))
        z = paddle.multiply(xorshift(z, 27), const(MIX2))
        z = xorshift(z, 31)
        return paddle.bitwise_right_shift(z, const(11), is_arithmetic=False)

    def keep(self, prob, count: int):
        """Boolean tensor: element kept with probability ``prob`` (a scalar or one per element)."""
        bits = self.bits(count)
        if not _is_tensor(prob) and np.ndim(prob) == 0:
            return paddle.less_than(bits, self.ops._const(keep_threshold(float(prob)), "int64"))
        prob = self.ops.float64(prob)
        threshold = paddle.floor(paddle.multiply(prob, self.ops._const(UNIT, "float64"))).astype("int64")
        return paddle.less_than(bits, threshold)
