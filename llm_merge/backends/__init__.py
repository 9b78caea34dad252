"""Array backends: the small set of operations the methods use, per library."""

from __future__ import annotations

from llm_merge.errors import MergeError

#: Elements per chunk of the generic (per-method) apply pass: 256 KiB of float32 per input keeps the whole
#: working set in L2; the Paddle backend's low_gpu_mem mode uploads at most this many elements per array.
CHUNK_ELEMENTS = 1 << 16


def get_ops(tensor_type: str, device: str = "cpu", compiled: bool = True):
    """The ops object for ``--tensor_type`` (``np`` or ``pd``) and ``--device``.

    ``compiled`` lets the NumPy backend use its numba kernels (same results, faster).
    """
    if tensor_type == "np":
        from llm_merge.backends.numpy_backend import NumpyOps

        return NumpyOps(compiled)
    if tensor_type == "pd":
        try:
            from llm_merge.backends.paddle_backend import PaddleOps
        except ImportError as exc:
            raise MergeError(
                f"--tensor_type pd needs PaddlePaddle ({exc}); install it with: pip install 'llm_merge[paddle]'"
            ) from None
        return PaddleOps(device)
    raise MergeError(f"--tensor_type: unknown backend {tensor_type!r}; valid: np, pd")
