"""Structured linear operators: dense, identity, diagonal, block-diagonal, Kronecker, eigh.

Each overrides what it can do exactly and cheaply (``inverse``, ``trace``,
``logdet``, ``diagonal``, ``frobenius_norm``).

May import: ``curvlinops._backend``, ``.base``.
"""

from __future__ import annotations

from .._backend import array_namespace, device as array_device
from .base import LinearOperator

__all__ = ["DenseLinearOperator"]


class DenseLinearOperator(LinearOperator):
    """A linear operator backed by a dense ``(m, n)`` array of any namespace.

    Parameters
    ----------
    A
        Real floating 2-D array (NumPy, CuPy, PyTorch, JAX, array-api-strict).
    symmetric : bool
        Declare ``A`` symmetric (not checked).

    Examples
    --------
    >>> import numpy as np
    >>> A = DenseLinearOperator(np.array([[1.0, 2.0], [3.0, 4.0]]))
    >>> (A.T @ np.array([1.0, 0.0])).tolist()
    [1.0, 2.0]
    >>> float(A.trace())
    5.0
    """

    def __init__(self, A, *, symmetric=False):
        xp = array_namespace(A)
        if A.ndim != 2:
            raise ValueError(f"A dense operator needs a 2-D array, got shape {tuple(A.shape)}.")
        super().__init__(
            A.shape, dtype=A.dtype, xp=xp, device=array_device(A), symmetric=symmetric
        )
        self.A = A

    def _matmat(self, X):
        return self.A @ X

    def _rmatmat(self, X):
        return self.xp.matrix_transpose(self.A) @ X

    def to_dense(self):
        return self.A

    def trace(self):
        return self.xp.linalg.trace(self.A)

    def diagonal(self):
        return self.xp.linalg.diagonal(self.A)

    def frobenius_norm(self):
        return self.xp.linalg.matrix_norm(self.A, ord="fro")
