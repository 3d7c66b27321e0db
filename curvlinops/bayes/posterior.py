"""A Gaussian over the flat parameters, given by its mean and precision operator.

What lives here:

- :class:`GaussianPosterior`: ``N(mean, precision^{-1})`` for a precision given as any
  :class:`~curvlinops.LinearOperator`: a Laplace posterior's, or one from elsewhere
  (a variational posterior, a hand-built K-FAC plus damping). Its covariance is the
  precision's exact ``inverse()`` where the structure has one; samples use a square
  root of the covariance taken from the structure (:func:`covariance_factor`).
- :func:`covariance_factor`: an operator ``R`` with ``R R^T = A^{-1}`` for a precision
  ``A`` of a known structure (dense, diagonal, Kronecker and its eigendecomposed form,
  low rank plus damping, diagonal plus low rank, their block-diagonal, scaled, damped
  and re-laid-out compositions), exact and without forming ``A``.

May import: ``curvlinops._backend``, ``curvlinops.linalg``.
"""

from __future__ import annotations

import math
import numbers

from .._backend import (
    FactorizationError,
    array_namespace,
    as_generator,
    checked_cholesky,
    checked_eigh,
    device as array_device,
    solve_triangular,
)
from ..linalg import (
    BlockDiagonalLinearOperator,
    DampedLinearOperator,
    DenseLinearOperator,
    DiagonalLinearOperator,
    DiagonalPlusLowRankLinearOperator,
    EighLinearOperator,
    IdentityLinearOperator,
    KroneckerEighLinearOperator,
    KroneckerLinearOperator,
    LinearOperator,
    ParameterLayoutLinearOperator,
    ProductLinearOperator,
    ScaledLinearOperator,
)

__all__ = ["GaussianPosterior", "covariance_factor"]

#: the largest precision :func:`covariance_factor` densifies when it knows no structure
MAX_DENSE_FALLBACK = 4096


class GaussianPosterior:
    """``N(mean, precision^{-1})`` over the flat parameter vector.

    Parameters
    ----------
    mean : array
        ``(P,)``, e.g. the flattened MAP parameters (:func:`~curvlinops.flatten_params`).
    precision : LinearOperator
        Symmetric positive definite ``(P, P)`` operator of the mean's backend, dtype and
        device. Its exact ``inverse()`` is the covariance, and
        :func:`covariance_factor` must know its structure to sample (every structure of
        a :class:`~curvlinops.bayes.Laplace` posterior; K-FAC or EKFAC plus damping; a
        diagonal; a dense matrix).
    covariance : LinearOperator, optional
        The covariance, if known otherwise (default: ``precision.inverse()``, formed on
        first use).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import DenseLinearOperator
    >>> A = np.array([[2.0, 0.5], [0.5, 1.0]])
    >>> post = GaussianPosterior(np.zeros(2), DenseLinearOperator(A, symmetric=True))
    >>> bool(np.allclose(post.covariance.to_dense(), np.linalg.inv(A)))
    True
    >>> samples = post.sample(20000, seed=0)
    >>> samples.shape
    (20000, 2)
    >>> bool(np.allclose(np.cov(samples.T), np.linalg.inv(A), atol=0.03))
    True
    """

    def __init__(self, mean, precision, covariance=None):
        xp = array_namespace(mean)
        if getattr(mean, "ndim", None) != 1:
            raise ValueError(
                f"mean must be a flat vector (P,), got shape {tuple(getattr(mean, 'shape', ()))}."
            )
        P = int(mean.shape[0])
        for name, op in (("precision", precision), ("covariance", covariance)):
            if op is None and name == "covariance":
                continue
            if not isinstance(op, LinearOperator):
                raise TypeError(
                    f"{name} must be a curvlinops LinearOperator, got {type(op).__name__}; "
                    "wrap a dense matrix in curvlinops.DenseLinearOperator(A, symmetric=True)."
                )
            if op.shape != (P, P):
                raise ValueError(
                    f"The {name} has shape {op.shape} but the mean has {P} entries; expected "
                    f"({P}, {P})."
                )
            if op.dtype != mean.dtype:
                raise TypeError(
                    f"The {name} has dtype {op.dtype} but the mean {mean.dtype}; build both "
                    "in one dtype."
                )
        self.mean, self.precision, self.xp = mean, precision, xp
        self._covariance = covariance
        self._factor = None

    @property
    def num_params(self) -> int:
        """``P``: the dimension."""
        return int(self.mean.shape[0])

    @property
    def covariance(self) -> LinearOperator:
        """The covariance ``precision^{-1}`` (the precision's exact inverse), cached."""
        if self._covariance is None:
            self._covariance = self.precision.inverse()
        return self._covariance

    def covariance_factor(self) -> LinearOperator:
        """``R`` with ``R R^T`` the covariance (see :func:`covariance_factor`), cached."""
        if self._factor is None:
            self._factor = covariance_factor(self.precision)
        return self._factor

    def log_det_precision(self):
        """``log det(precision)`` (a float), from the precision's structure."""
        return float(self.precision.logdet())

    def sample(self, num_samples, seed=0):
        """``num_samples`` draws, ``(num_samples, P)``, reproducible from ``seed``.

        ``mean + R z`` with ``z`` standard normal and ``R`` the covariance factor: one
        product with ``num_samples`` columns.

        Parameters
        ----------
        num_samples : int
        seed : int or generator
            See :class:`~curvlinops.RandomGenerator`.
        """
        num_samples = _check_count(num_samples, "num_samples")
        xp = self.xp
        gen = as_generator(seed, xp, array_device(self.mean))
        Z = gen.normal((self.num_params, num_samples), self.mean.dtype)
        draws = self.covariance_factor() @ Z
        return xp.matrix_transpose(draws) + self.mean[None, :]


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def covariance_factor(precision, shift=0.0) -> LinearOperator:
    """``R`` with ``R R^T = (precision + shift I)^{-1}``, from the precision's structure.

    Exact for the structures of Laplace posteriors, recursively through their
    compositions:

    - dense (a Cholesky factor), diagonal, identity;
    - Kronecker products of symmetric factors and their eigendecomposed form
      (``Q diag(lam + shift)^{-1/2} Q^T``, from the factors' eigendecompositions);
    - eigendecomposed / low rank (``Q diag((lam + shift)^{-1/2} - shift^{-1/2}) Q^T +
      shift^{-1/2} I``);
    - diagonal plus low rank (``D^{-1/2} (I + W W^T)^{-1/2}`` with ``W = D^{-1/2} U S^{1/2}``,
      from a ``k x k`` eigendecomposition);
    - positive multiples, damped operators, block-diagonal operators and parameter
      layouts of these.

    Any other symmetric operator of at most 4096 rows is densified and factored by
    Cholesky; larger ones raise :class:`NotImplementedError`.

    Parameters
    ----------
    precision : LinearOperator
        Symmetric positive definite.
    shift : float
        A multiple of the identity added to it.

    Returns
    -------
    LinearOperator

    Raises
    ------
    FactorizationError
        If the (shifted) precision is not positive definite.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import KroneckerLinearOperator
    >>> A, B = np.array([[2.0, 1.0], [1.0, 2.0]]), np.diag([1.0, 3.0])
    >>> R = covariance_factor(KroneckerLinearOperator(A, B).damped(0.5))
    >>> cov = np.linalg.inv(np.kron(A, B) + 0.5 * np.eye(4))
    >>> bool(np.allclose(R.to_dense() @ R.to_dense().T, cov))
    True
    """
    shift = float(shift)
    factored = getattr(precision, "kronecker_factored", None)
    if isinstance(factored, LinearOperator):  # K-FAC, EKFAC: their blocks
        return covariance_factor(factored, shift)
    for kind, rule in _RULES:
        if isinstance(precision, kind):
            return rule(precision, shift)
    return _dense_factor(precision, shift)


def _positive_shifted(values, shift, what):
    xp = array_namespace(values)
    shifted = values + shift if shift else values
    smallest = float(xp.min(shifted))
    if not smallest > 0:
        raise FactorizationError(
            f"The {what} is not positive definite (smallest eigenvalue {smallest:.3g}); a "
            "Gaussian needs a positive definite precision."
        )
    return shifted


def _dense_factor(op, shift):
    if not op.is_symmetric or op.shape[0] > MAX_DENSE_FALLBACK:
        raise NotImplementedError(
            f"covariance_factor knows no square root for a {type(op).__name__} of shape "
            f"{op.shape}; pass a precision of a known structure (dense, diagonal, "
            "Kronecker, eigendecomposed, diagonal plus low rank, or their block-diagonal, "
            f"scaled and damped forms), or a symmetric one of at most {MAX_DENSE_FALLBACK} "
            "rows (densified)."
        )
    return _cholesky_factor(op.to_dense(), shift, op)


def _cholesky_factor(A, shift, op):
    xp = array_namespace(A)
    n = A.shape[0]
    eye = xp.eye(n, dtype=A.dtype, device=array_device(A))
    if shift:
        A = A + shift * eye
    L = checked_cholesky(0.5 * (A + xp.matrix_transpose(A)), xp, name="precision")
    # (L L^T)^{-1} = L^{-T} L^{-1}: R = L^{-T} = (L^{-1})^T
    return DenseLinearOperator(xp.matrix_transpose(solve_triangular(L, eye, xp, lower=True)))


def _dense(op, shift):
    return _cholesky_factor(op.A, shift, op)


def _diagonal(op, shift):
    d = _positive_shifted(op.diagonal(), shift, "diagonal precision")
    return DiagonalLinearOperator(1.0 / op.xp.sqrt(d))


def _identity(op, shift):
    if not 1.0 + shift > 0:
        raise FactorizationError("The identity plus the shift is not positive definite.")
    return IdentityLinearOperator(op.shape[0], xp=op.xp, dtype=op.dtype, device=op.device) * (
        1.0 / math.sqrt(1.0 + shift)
    )


def _kronecker(op, shift):
    try:
        eigh = op.factor_eigh()
    except NotImplementedError as err:
        raise NotImplementedError(
            f"covariance_factor needs a Kronecker product of symmetric factors: {err}"
        ) from err
    values = op.eigvalsh()
    shifted = _positive_shifted(values, shift, "Kronecker-factored precision")
    return KroneckerEighLinearOperator(1.0 / op.xp.sqrt(shifted), [Q for _, Q in eigh])


def _kronecker_eigh(op, shift):
    shifted = _positive_shifted(op.eigenvalues, shift, "Kronecker-eigendecomposed precision")
    return KroneckerEighLinearOperator(1.0 / op.xp.sqrt(shifted), op.eigenvectors)


def _eigh(op, shift):
    xp, lam, Q = op.xp, op.eigenvalues, op.eigenvectors
    shifted = _positive_shifted(lam, shift, "eigendecomposed precision")
    if op.rank == op.shape[0]:
        return EighLinearOperator(1.0 / xp.sqrt(shifted), Q)
    if not shift > 0:
        raise FactorizationError(
            f"The rank-{op.rank} precision of dimension {op.shape[0]} is singular; add a "
            "prior precision (damping)."
        )
    rest = 1.0 / math.sqrt(shift)  # the eigenvalue shift of the complement of range(Q)
    return EighLinearOperator(1.0 / xp.sqrt(shifted) - rest, Q).damped(rest)


def _diagonal_plus_low_rank(op, shift):
    # (D + U S U^T)^{-1} = D^{-1/2} (I + W W^T)^{-1} D^{-1/2}, W = D^{-1/2} U S^{1/2};
    # with W = Z diag(m)^{1/2} V^T (eigh of W^T W), (I + W W^T)^{-1/2} is
    # I + Z diag((1 + m)^{-1/2} - 1) Z^T, Z = W V diag(m)^{-1/2} orthonormal.
    xp = op.xp
    d = _positive_shifted(op.diagonal_values, shift, "diagonal part of the precision")
    s = op.low_rank_values
    if not bool(xp.all(s > 0)):
        raise FactorizationError(
            "The low-rank part of the precision has non-positive values; covariance_factor "
            "needs D + U diag(s) U^T with s > 0."
        )
    d_root = 1.0 / xp.sqrt(d)
    W = d_root[:, None] * op.low_rank_vectors * xp.sqrt(s)[None, :]
    m, V = checked_eigh(xp.matrix_transpose(W) @ W, xp, name="Gram matrix of the low-rank part")
    zeros, ones = xp.zeros_like(m), xp.ones_like(m)
    keep = m > 0  # directions of W W^T's null space need no correction
    m = xp.where(keep, m, zeros)
    Z = (W @ V) * xp.where(keep, 1.0 / xp.sqrt(xp.where(keep, m, ones)), zeros)[None, :]
    inner = EighLinearOperator(xp.where(keep, 1.0 / xp.sqrt(1.0 + m) - 1.0, zeros), Z)
    inner = inner.damped(1.0)
    return ProductLinearOperator(DiagonalLinearOperator(d_root), inner)


def _scaled(op, shift):
    c = op.scalar
    if not c > 0:
        raise FactorizationError(
            f"A precision scaled by {c} is not positive definite; covariance_factor needs a "
            "positive scale."
        )
    # (c A + s I)^{-1} = (1/c) (A + (s/c) I)^{-1}
    return covariance_factor(op.operator, shift / c) * (1.0 / math.sqrt(c))


def _damped(op, shift):
    return covariance_factor(op.operator, op.damping + shift)


def _block_diagonal(op, shift):
    return BlockDiagonalLinearOperator([covariance_factor(b, shift) for b in op.blocks])


def _layout(op, shift):
    # P^T A P + s I = P^T (A + s I) P with P orthogonal: R = P^T R_A P
    inner = covariance_factor(op.operator, shift)
    segments = [[(s, (r, c)) for s, r, c in block] for block in op.blocks]
    return ParameterLayoutLinearOperator(inner, segments)


#: structure -> its rule (subclasses first: a KroneckerFactoredLinearOperator is a layout)
_RULES = (
    (ParameterLayoutLinearOperator, _layout),
    (BlockDiagonalLinearOperator, _block_diagonal),
    (DampedLinearOperator, _damped),
    (ScaledLinearOperator, _scaled),
    (KroneckerLinearOperator, _kronecker),
    (KroneckerEighLinearOperator, _kronecker_eigh),
    (EighLinearOperator, _eigh),
    (DiagonalPlusLowRankLinearOperator, _diagonal_plus_low_rank),
    (DiagonalLinearOperator, _diagonal),
    (IdentityLinearOperator, _identity),
    (DenseLinearOperator, _dense),
)
