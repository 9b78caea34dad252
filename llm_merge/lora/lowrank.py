"""Truncated SVD of a weight update and the LoRA rank it gets: pure NumPy on float32 matrices.

``truncated_svd`` returns the leading singular triplets of a matrix: the exact SVD when the number
asked for comes near the smaller dimension (there a randomized one saves nothing), else a randomized
one (Halko, Martinsson & Tropp 2011): a Gaussian sketch with ``OVERSAMPLE_COLUMNS`` extra columns
and ``POWER_ITERATIONS`` re-orthonormalized power iterations. The sketch is drawn from a generator
seeded by the caller (``name_seed``: a hash of the tensor name), so a matrix always gets the same
factors, whatever the worker count or the order of the work.

``choose_rank`` applies a rank rule (a fixed rank, the energy kept, or a singular-value threshold);
``split_factors`` splits U·S·Vᵀ into left = U·√S and right = √S·Vᵀ (left @ right is the
rank-r approximation); ``squared_norm`` and ``squared_residual`` measure the update and what the
factors miss, in float64, one block of rows at a time.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

#: Extra sketch columns beyond the rank asked for (randomized SVD).
OVERSAMPLE_COLUMNS = 16
#: Power iterations of the randomized SVD: each costs two passes over the matrix and sharpens a
#: slowly decaying spectrum (fine-tune updates have one).
POWER_ITERATIONS = 2
#: The exact SVD is used once rank + oversampling reaches this fraction of the smaller dimension,
#: where the randomized one is no faster (measured on 1024 x 1024 at rank 512, 2 cores).
EXACT_FRACTION = 0.5
#: Elements per block of rows when norms and residuals are summed (1 MiB of float32).
BLOCK_ELEMENTS = 1 << 18


def name_seed(name: str) -> int:
    """A 64-bit seed from a tensor name (blake2b), for the randomized SVD's sketch."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def truncated_svd(matrix: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(U [m, k], S [k], Vt [k, n], exact) of the float32 ``matrix``: its k leading singular triplets."""
    m, n = matrix.shape
    if k + OVERSAMPLE_COLUMNS >= EXACT_FRACTION * min(m, n):
        u, s, vt = exact_svd(matrix)
        return u[:, :k], s[:k], vt[:k], True
    u, s, vt = randomized_svd(matrix, k, seed)
    return u, s, vt, False


def exact_svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thin SVD; a tall matrix is decomposed as its transpose (LAPACK is about twice as fast wide)."""
    m, n = matrix.shape
    if m > n:
        u, s, vt = np.linalg.svd(matrix.T, full_matrices=False)
        return vt.T, s, u.T
    return np.linalg.svd(matrix, full_matrices=False)


def randomized_svd(matrix: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k leading singular triplets from a seeded Gaussian sketch with power iterations (float32)."""
    m, n = matrix.shape
    columns = min(k + OVERSAMPLE_COLUMNS, m, n)
    sketch = np.random.default_rng(seed).standard_normal((n, columns), dtype=np.float32)
    basis, _ = np.linalg.qr(matrix @ sketch)
    for _ in range(POWER_ITERATIONS):  # orthonormalized each time: powers of a matrix lose small directions
        row_basis, _ = np.linalg.qr(matrix.T @ basis)
        basis, _ = np.linalg.qr(matrix @ row_basis)
    small_u, s, vt = np.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ small_u[:, :k]), s[:k], vt[:k]


def choose_rank(singular_values: np.ndarray, total_energy: float, *, rank: Optional[int] = None,
                energy: Optional[float] = None, sv_epsilon: Optional[float] = None) -> int:
    """The rank a module keeps, from its leading singular values (descending; as many as the cap allows)
    and its squared Frobenius norm, by exactly one rule: ``rank`` (that many), ``energy`` (the fewest
    whose squares sum to this fraction of the norm) or ``sv_epsilon`` (those above it). Never more
    than the singular values given; 0 when the update is zero or none passes the threshold."""
    if total_energy <= 0.0 or singular_values.size == 0:
        return 0
    if rank is not None:
        return min(rank, singular_values.size)
    if sv_epsilon is not None:
        return int(np.count_nonzero(singular_values > sv_epsilon))
    kept = np.cumsum(np.square(singular_values, dtype=np.float64))
    reached = int(np.searchsorted(kept, energy * total_energy, side="left")) + 1
    return min(reached, singular_values.size)


def energy_kept(singular_values: np.ndarray, rank: int, total_energy: float) -> float:
    """Fraction of the squared Frobenius norm that the first ``rank`` singular values hold (1 for a zero update)."""
    if total_energy <= 0.0:
        return 1.0
    return min(1.0, float(np.sum(np.square(singular_values[:rank], dtype=np.float64))) / total_energy)


def split_factors(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(left [m, r], right [r, n]) with left @ right = U_r S_r Vt_r, the singular values split evenly."""
    root = np.sqrt(s[:rank]).astype(np.float32)
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def squared_norm(matrix: np.ndarray) -> float:
    """The squared Frobenius norm, summed in float64 one block of rows at a time."""
    total = 0.0
    for rows in _row_blocks(matrix.shape):
        block = matrix[rows].astype(np.float64).ravel()
        total += float(np.dot(block, block))
    return total


def squared_residual(matrix: np.ndarray, left: np.ndarray, right: np.ndarray) -> float:
    """||matrix - left @ right||_F squared, in float64, one block of rows at a time."""
    total = 0.0
    for rows in _row_blocks(matrix.shape):
        block = (matrix[rows] - left[rows] @ right).astype(np.float64).ravel()
        total += float(np.dot(block, block))
    return total


def _row_blocks(shape: tuple[int, int]):
    rows, cols = shape
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    for first in range(0, rows, step):
        yield slice(first, min(rows, first + step))
