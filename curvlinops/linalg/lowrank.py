"""Diagonal plus low rank, ``D + U diag(s) U^T``, with exact Woodbury algebra.

The structure of diagonal-plus-low-rank curvature approximations (and of Laplace
posteriors built on them): products cost ``O(n k)``, and the damped inverse, the
log-determinant (matrix determinant lemma), trace and diagonal are exact at the cost
of one ``k x k`` factorization.

May import: ``curvlinops._backend``, ``.base``, ``.structured``.
"""

from __future__ import annotations

from .._backend import (
    check_invertible_spectrum,
    checked_cholesky,
    device as array_device,
    solve_triangular,
)
from .base import LinearOperator
from .structured import _check_arrays_agree, _check_invertible_spectrum, _logdet_from_spectrum

__all__ = ["DiagonalPlusLowRankLinearOperator"]


class DiagonalPlusLowRankLinearOperator(LinearOperator):
    """``diag(d) + U diag(s) U^T`` for ``d`` ``(n,)``, ``s`` ``(k,)``, ``U`` ``(n, k)``.

    Symmetric; PSD when ``d >= 0`` and ``s >= 0`` (checked once, on first access of
    ``is_psd``). ``U`` need not be orthonormal. The inverse uses the Woodbury identity
    ``(D + U S U^T)^{-1} = D^{-1} - D^{-1} U (S^{-1} + U^T D^{-1} U)^{-1} U^T D^{-1}``
    (applied matrix-free, with a Cholesky factor of the ``k x k`` capacitance matrix),
    which needs ``D + damping I`` invertible and ``s > 0``.

    Parameters
    ----------
    diagonal
        ``d``, shape ``(n,)``.
    low_rank_values
        ``s``, shape ``(k,)``.
    low_rank_vectors
        ``U``, shape ``(n, k)``.

    Examples
    --------
    >>> import numpy as np
    >>> A = DiagonalPlusLowRankLinearOperator(np.array([1.0, 2.0]), np.array([3.0]),
    ...                                       np.array([[1.0], [1.0]]))
    >>> A.to_dense().tolist()
    [[4.0, 3.0], [3.0, 5.0]]
    >>> bool(np.allclose(A.inverse().to_dense(), np.linalg.inv(A.to_dense())))
    True
    """

    def __init__(self, diagonal, low_rank_values, low_rank_vectors):
        xp = _check_arrays_agree(
            [diagonal, low_rank_values, low_rank_vectors],
            ["diagonal", "low_rank_values", "low_rank_vectors"],
        )
        n = diagonal.shape[0]
        k = low_rank_values.shape[0]
        if (
            diagonal.ndim != 1
            or low_rank_values.ndim != 1
            or tuple(low_rank_vectors.shape)
            != (
                n,
                k,
            )
        ):
            raise ValueError(
                f"Expected diagonal (n,), low_rank_values (k,) and low_rank_vectors (n, k); got "
                f"{tuple(diagonal.shape)}, {tuple(low_rank_values.shape)} and "
                f"{tuple(low_rank_vectors.shape)}."
            )
        super().__init__(
            (n, n), dtype=diagonal.dtype, xp=xp, device=array_device(diagonal), symmetric=True
        )
        self.diagonal_values = diagonal
        self.low_rank_values = low_rank_values
        self.low_rank_vectors = low_rank_vectors

    def _infer_psd(self):
        xp = self.xp
        return bool(xp.all(self.diagonal_values >= 0)) and bool(xp.all(self.low_rank_values >= 0))

    def _matmat(self, X):
        U, s = self.low_rank_vectors, self.low_rank_values
        return self.diagonal_values[:, None] * X + U @ (
            s[:, None] * (self.xp.matrix_transpose(U) @ X)
        )

    def _capacitance(self, damping):
        """Inverse shifted diagonal and the Cholesky factor of ``S^{-1} + U^T D^{-1} U``."""
        xp = self.xp
        d = self.diagonal_values + damping if damping else self.diagonal_values
        _check_invertible_spectrum(d, xp, "diagonal part (plus damping)", shift=damping)
        s = self.low_rank_values
        if not bool(xp.all(s > 0)):
            raise ValueError(
                "The Woodbury inverse needs positive low-rank values s; use an EighLinearOperator "
                "or a dense inverse for indefinite low-rank parts."
            )
        d_inv = 1.0 / d
        U = self.low_rank_vectors
        C = xp.matrix_transpose(U) @ (d_inv[:, None] * U)
        C = C + xp.eye(s.shape[0], dtype=self.dtype, device=self.device) * (1.0 / s)[None, :]
        L = checked_cholesky(C, xp, name="Woodbury capacitance matrix")
        # cond(C) >= (max L_ii / min L_ii)^2: a singular D + U S U^T makes C singular
        pivots = xp.linalg.diagonal(L)
        check_invertible_spectrum(
            pivots * pivots, xp, size=s.shape[0], what="Woodbury capacitance matrix"
        )
        return d, d_inv, L

    def inverse(self, damping=0.0):
        _, d_inv, L = self._capacitance(damping)
        xp, U = self.xp, self.low_rank_vectors
        # (D + U S U^T)^{-1} = D^{-1} - (D^{-1} U L^{-T}) (D^{-1} U L^{-T})^T
        W = xp.matrix_transpose(solve_triangular(L, xp.matrix_transpose(d_inv[:, None] * U), xp))
        from .structured import DiagonalLinearOperator

        correction = _LowRankOuter(W)
        inverse = DiagonalLinearOperator(d_inv) - correction
        if damping >= 0 and self.is_psd:
            inverse._psd = True  # the inverse of a PD matrix; the difference hides it
        return inverse

    def trace(self):
        U = self.low_rank_vectors
        return self.xp.sum(self.diagonal_values) + self.xp.sum(
            self.low_rank_values * self.xp.sum(U * U, axis=0)
        )

    def diagonal(self):
        U = self.low_rank_vectors
        return self.diagonal_values + self.xp.sum(U * U * self.low_rank_values[None, :], axis=1)

    def _logdet(self, damping):
        # det(D + U S U^T) = det(D) det(S) det(S^{-1} + U^T D^{-1} U)
        xp = self.xp
        d, _, L = self._capacitance(damping)
        logdet_d = _logdet_from_spectrum(d, xp, "diagonal part (plus damping)")
        return (
            logdet_d
            + xp.sum(xp.log(self.low_rank_values))
            + 2 * xp.sum(xp.log(xp.linalg.diagonal(L)))
        )

    def frobenius_norm(self):
        return self.xp.linalg.matrix_norm(self.to_dense(), ord="fro")

    def to_dense(self):
        xp, U = self.xp, self.low_rank_vectors
        eye = xp.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return eye * self.diagonal_values[None, :] + (U * self.low_rank_values[None, :]) @ (
            xp.matrix_transpose(U)
        )


class _LowRankOuter(LinearOperator):
    """``W W^T`` for ``W`` ``(n, k)``, applied as two thin products."""

    def __init__(self, W):
        from .._backend import array_namespace

        xp = array_namespace(W)
        n = W.shape[0]
        super().__init__((n, n), dtype=W.dtype, xp=xp, device=array_device(W), psd=True)
        self.W = W

    def _matmat(self, X):
        return self.W @ (self.xp.matrix_transpose(self.W) @ X)

    def diagonal(self):
        # the diagonal of the Woodbury inverse D^{-1} - W W^T needs it (marginal
        # likelihood gradients of a Laplace posterior)
        return self.xp.sum(self.W * self.W, axis=1)

    def trace(self):
        return self.xp.sum(self.W * self.W)

    def to_dense(self):
        return self.W @ self.xp.matrix_transpose(self.W)
