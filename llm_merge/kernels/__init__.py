"""Compiled (numba) code that method specs name: widen/narrow and block helpers (``blocks``), the fused apply pass
(``fused``), streamed statistics (``streaming``), magnitude ranks (``ranks``), their on-disk cache (``cache``), and
the counter-based draws every backend shares (``counter_rng``)."""
