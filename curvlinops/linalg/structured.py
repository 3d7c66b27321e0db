"""Structured linear operators: dense, identity, diagonal, block-diagonal, Kronecker, eigh.

Each overrides what it can do exactly and cheaply (``inverse``, ``trace``,
``logdet``, ``diagonal``, ``frobenius_norm``) and leaves the rest to the base class,
which raises :class:`NotImplementedError` instead of densifying. Every operator keeps
the namespace, dtype and device of the arrays it is built from; operators built from
several parts (blocks, Kronecker factors) check that the parts agree.

Products of Kronecker operators use reshapes and one matrix product per factor, so
they never allocate anything of the size of the full matrix.

Structure tags: each operator derives ``is_symmetric`` / ``is_psd`` from its parts
(identity: PSD; diagonal, eigendecomposed: PSD when the entries / eigenvalues are
non-negative, checked once on first access; block-diagonal and Kronecker: PSD when
every block / factor is); a dense operator carries what the user declares.

May import: ``curvlinops._backend``, ``.base``.
"""

from __future__ import annotations

import math

from .._backend import (
    FactorizationError,
    IllConditionedError,
    all_finite,
    array_namespace,
    check_invertible_spectrum,
    checked_eigh,
    checked_eigvalsh,
    device as array_device,
    diag_matrix,
    dtype_name,
    is_numerically_symmetric,
    kron,
    namespace_name,
)
from .._backend.conditioning import invert_all
from .._backend.linalg import DAMPING_HINT as _DAMPING_HINT
from .base import DampedLinearOperator, LinearOperator, ScaledLinearOperator

__all__ = [
    "DenseLinearOperator",
    "IdentityLinearOperator",
    "DiagonalLinearOperator",
    "BlockDiagonalLinearOperator",
    "KroneckerLinearOperator",
    "KroneckerEighLinearOperator",
    "EighLinearOperator",
]


# -- helpers ---------------------------------------------------------------------------


def _as_operator(part, what: str) -> LinearOperator:
    """A LinearOperator as is, a 2-D array wrapped in a :class:`DenseLinearOperator`."""
    if isinstance(part, LinearOperator):
        return part
    ndim = getattr(part, "ndim", None)
    if ndim is None:
        raise TypeError(
            f"The {what} must be a LinearOperator or a 2-D array, got a {type(part).__name__}."
        )
    if ndim != 2:
        raise ValueError(
            f"The {what} must be a 2-D array of shape (m, n), got shape {tuple(part.shape)}."
        )
    return DenseLinearOperator(part)


def _check_parts_agree(parts, what: str):
    """Check that operators share namespace and dtype; return ``(xp, dtype, device)``."""
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if namespace_name(part.xp) != namespace_name(first.xp):
            raise TypeError(
                f"{what} 0 works on {namespace_name(first.xp)} arrays but {what} {i} on "
                f"{namespace_name(part.xp)} arrays; build all of them in one library."
            )
        if part.dtype != first.dtype:
            raise TypeError(
                f"{what} 0 has dtype {dtype_name(first.dtype)} but {what} {i} has dtype "
                f"{dtype_name(part.dtype)}; convert all of them to one dtype."
            )
    return first.xp, first.dtype, first.device


def _check_arrays_agree(arrays, names):
    """Namespace and dtype of arrays that define one operator; TypeError naming both."""
    xp = array_namespace(*arrays)
    first = arrays[0]
    for name, a in zip(names[1:], arrays[1:], strict=True):
        if a.dtype != first.dtype:
            raise TypeError(
                f"The arrays {names[0]} and {name} must share one dtype, got "
                f"{dtype_name(first.dtype)} and {dtype_name(a.dtype)}; convert both to one dtype."
            )
    return xp


def _require_square(op: LinearOperator, query: str):
    if op.shape[0] != op.shape[1]:
        raise ValueError(
            f"{query} needs a square operator; {type(op).__name__} has shape {op.shape}."
        )


def _count(mask, dtype, xp) -> int:
    return int(xp.sum(xp.astype(mask, dtype)))


def _logdet_from_spectrum(values, xp, what: str, size=None, shift=0.0, checked=True):
    """``log|prod(values)|`` for a real spectrum (or diagonal) with a positive product.

    Raises :class:`~curvlinops.IllConditionedError` for a spectrum that the rule of
    :class:`~curvlinops.conditioning` refuses (``size``: the factorized dimension,
    default the number of values; ``shift``: the damping in ``values``) and
    :class:`ValueError` for a negative product (logdet is defined here for matrices of
    positive determinant only). ``checked=False``: the caller applied the rule already.
    """
    values = xp.reshape(values, (-1,))
    if checked:
        check_invertible_spectrum(
            values,
            xp,
            size=values.shape[0] if size is None else size,
            what=what,
            hint="Its log-determinant would be -inf or dominated by rounding.",
            shift=shift,
        )
    if _count(values < 0, values.dtype, xp) % 2 == 1:
        raise ValueError(
            f"The {what} has a negative determinant (it is not positive definite); logdet "
            "is defined here for matrices of positive determinant only."
        )
    return xp.sum(xp.log(xp.abs(values)))


def _check_invertible_spectrum(values, xp, what: str, size=None, shift=0.0, suggest_from=None):
    """The conditioning rule of :class:`~curvlinops.conditioning` on a spectrum.

    ``size`` is the dimension of the largest matrix factorized to obtain ``values``
    (default: the number of values, right for a diagonal or an eigendecomposed matrix);
    ``shift`` the damping already in ``values`` (for the suggested damping).
    """
    n = int(math.prod(values.shape)) if size is None else size
    check_invertible_spectrum(values, xp, size=n, what=what, shift=shift, suggest_from=suggest_from)


def _dense_spectrum(M, xp, symmetric: bool):
    """Eigenvalues of a symmetric, singular values of a general dense square matrix."""
    if symmetric:
        return xp.linalg.eigvalsh(M)
    return xp.linalg.svdvals(M)


def _kron_apply(applies, in_dims, out_dims, X, xp):
    """Apply ``F_1 x F_2 x ... x F_F`` to ``X`` of shape ``(prod(in_dims), k)``.

    ``applies[i]`` maps an ``(in_dims[i], r)`` array to ``(out_dims[i], r)``. The
    Kronecker axes are cycled: each step multiplies along the leading axis, then moves
    the new axis to the back with one 2-D transpose, so that the next factor's axis
    leads. After all factors the column axis ``k`` leads; one last transpose returns
    ``(prod(out_dims), k)``. Nothing larger than the operands is ever allocated.
    """
    k = X.shape[1]
    T = X
    for apply, n_i in zip(applies, in_dims, strict=True):
        T = xp.matrix_transpose(apply(xp.reshape(T, (n_i, -1))))
    m = math.prod(out_dims)
    return xp.matrix_transpose(xp.reshape(T, (k, m)))


def _kron2_apply(left, right, dims, X, xp):
    """``(F_1 x F_2) X`` for two factors: ``vec(F_1 V F_2^T)`` for every column ``V``.

    ``left`` maps an ``(n_1, r)`` array to ``F_1`` times it, ``(m_1, r)``; ``right`` maps
    an ``(r, n_2)`` array ``Y`` to ``Y F_2^T``, ``(r, m_2)``. ``dims`` is
    ``(n_1, n_2, m_1, m_2)``. Two matrix products for all ``k`` columns at once; a single
    vector needs no copy at all, ``k > 1`` one transpose of an ``(m_1, n_2, k)`` array
    each way (the ``k`` axis out of the second product's way and back).
    """
    n1, n2, m1, m2 = dims
    k = X.shape[1]
    T = left(xp.reshape(X, (n1, n2 * k)))  # (m1, n2 * k)
    if k == 1:
        return xp.reshape(right(T), (m1 * m2, 1))
    T = xp.reshape(xp.permute_dims(xp.reshape(T, (m1, n2, k)), (0, 2, 1)), (m1 * k, n2))
    out = xp.reshape(right(T), (m1, k, m2))
    return xp.reshape(xp.permute_dims(out, (0, 2, 1)), (m1 * m2, k))


def _right_product(factor, adjoint):
    """``Y -> Y F^T`` (``Y -> Y F`` if ``adjoint``) for a factor operator ``F``.

    A dense factor multiplies from the right directly (the result comes out in C order);
    any other goes through its (adjoint) product on ``Y^T``.
    """
    if isinstance(factor, DenseLinearOperator):
        M = factor.A
        if adjoint:
            return lambda Y: Y @ M
        Mt = factor.xp.matrix_transpose(M)
        return lambda Y: Y @ Mt
    mT = factor.xp.matrix_transpose
    apply = factor._rmatmat if adjoint else factor._matmat
    return lambda Y: mT(apply(mT(Y)))


def _outer_flat(vectors, xp):
    """Flattened (C order) outer product of 1-D arrays: the diagonal of their Kronecker."""
    out = vectors[0]
    for v in vectors[1:]:
        out = xp.reshape(out[:, None] * v[None, :], (-1,))
    return out


# -- dense -----------------------------------------------------------------------------


class DenseLinearOperator(LinearOperator):
    """A linear operator backed by a dense ``(m, n)`` array of any namespace.

    Parameters
    ----------
    A
        Real floating 2-D array (NumPy, CuPy, PyTorch, JAX, array-api-strict).
    symmetric : bool, optional
        Declare ``A`` symmetric (not checked).
    psd : bool, optional
        Declare ``A`` symmetric positive semi-definite (not checked; implies
        ``symmetric``).

    Notes
    -----
    ``inverse`` and ``logdet`` use the namespace's dense ``linalg.inv`` and
    ``linalg.slogdet`` (cubic cost): the user handed over the dense matrix.

    Examples
    --------
    >>> import numpy as np
    >>> A = DenseLinearOperator(np.array([[1.0, 2.0], [3.0, 4.0]]))
    >>> (A.T @ np.array([1.0, 0.0])).tolist()
    [1.0, 2.0]
    >>> float(A.trace())
    5.0
    >>> A.inverse().to_dense().round(6).tolist()
    [[-2.0, 1.0], [1.5, -0.5]]
    """

    def __init__(self, A, *, symmetric=None, psd=None):
        xp = array_namespace(A)
        if A.ndim != 2:
            raise ValueError(f"A dense operator needs a 2-D array, got shape {tuple(A.shape)}.")
        super().__init__(
            A.shape, dtype=A.dtype, xp=xp, device=array_device(A), symmetric=symmetric, psd=psd
        )
        self.A = A

    def _matmat(self, X):
        return self.A @ X

    def _rmatmat(self, X):
        return self.xp.matrix_transpose(self.A) @ X

    def adjoint(self):
        if self.is_symmetric:
            return self
        return DenseLinearOperator(self.xp.matrix_transpose(self.A))

    def to_dense(self):
        return self.A

    def _shifted(self, damping):
        _require_square(self, "This query")
        if damping == 0.0:
            return self.A
        xp = self.xp
        eye = xp.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return self.A + damping * eye

    def _spectrum(self, shifted, damping):
        """``(values, name)`` of ``A + damping I`` for the conditioning rule.

        Its eigenvalues if declared symmetric, else its singular values (one extra
        ``O(n^3)`` decomposition of the ``n x n`` matrix); NaN or Inf raise.
        """
        xp = self.xp
        what = f"{self.shape[0]}x{self.shape[1]} dense matrix" + _plus(damping)
        if not all_finite(shifted, xp):
            raise FactorizationError(f"The {what} contains NaN or Inf; it cannot be inverted.")
        return _dense_spectrum(shifted, xp, self.is_symmetric), what

    def inverse(self, damping=0.0):
        """``(A + damping I)^{-1}`` as a dense operator, via ``linalg.inv``.

        Raises
        ------
        FactorizationError
            (:class:`~curvlinops.IllConditionedError`) If the condition number of
            ``A + damping I`` (from its eigenvalues if symmetric, else its singular
            values) is beyond what the dtype resolves (the rule of
            :class:`~curvlinops.conditioning`); also if the result is not finite.
        """
        xp = self.xp
        shifted = self._shifted(damping)
        values, what = self._spectrum(shifted, damping)
        _check_invertible_spectrum(values, xp, what, shift=damping)
        matrix = f"The {self.shape[0]}x{self.shape[1]} dense matrix" + _plus(damping)
        try:
            inv = xp.linalg.inv(shifted)
        except Exception as err:  # each library raises its own error type
            raise FactorizationError(
                f"{matrix} is singular and has no inverse. {_DAMPING_HINT}"
            ) from err
        if not bool(xp.all(xp.isfinite(inv))):
            # a well-conditioned matrix of tiny entries passes the rule; 1 / entry overflows
            raise FactorizationError(
                f"{matrix} has no finite inverse in {dtype_name(self.dtype)}: its entries "
                f"overflow. Rescale the matrix. {_DAMPING_HINT}"
            )
        # The inverse of a PSD matrix plus damping >= 0 (when it exists) is PSD.
        return DenseLinearOperator(
            inv, symmetric=self.is_symmetric, psd=self.is_psd and damping >= 0
        )

    def trace(self):
        return self.xp.linalg.trace(self.A)

    def diagonal(self):
        return self.xp.linalg.diagonal(self.A)

    def eigh(self):
        """Eigenvalues (ascending) and eigenvectors of a matrix declared symmetric, cached.

        Computed once (``linalg.eigh``) and reused by every inverse built from it (e.g.
        the damped inverses of a Kronecker product with this factor).

        Examples
        --------
        >>> import numpy as np
        >>> w, Q = DenseLinearOperator(np.diag([3.0, 1.0]), symmetric=True).eigh()
        >>> w.tolist(), np.abs(Q).tolist()
        ([1.0, 3.0], [[0.0, 1.0], [1.0, 0.0]])
        """
        if not self.is_symmetric:
            raise NotImplementedError(
                "eigh needs a dense operator declared symmetric (symmetric=True)."
            )
        cached = getattr(self, "_eigh", None)
        if cached is None:
            cached = checked_eigh(self.A, self.xp, name="symmetric dense matrix")
            self._eigh = cached
        return cached

    def eigvalsh(self):
        """Eigenvalues (ascending) of a matrix declared symmetric, cached.

        Those of :meth:`eigh` when it has run; otherwise computed without eigenvectors
        (a fraction of the cost) and kept.
        """
        if not self.is_symmetric:
            raise NotImplementedError(
                "eigvalsh needs a dense operator declared symmetric (symmetric=True)."
            )
        cached = self._cached_eigh()
        if cached is not None:
            return cached[0]
        values = getattr(self, "_eigvalsh", None)
        if values is None:
            values = checked_eigvalsh(self.A, self.xp, name="symmetric dense matrix")
            self._eigvalsh = values
        return values

    def _cached_eigh(self):
        """The ``(eigenvalues, eigenvectors)`` of :meth:`eigh` if computed, else None."""
        return getattr(self, "_eigh", None)

    def _logdet(self, damping):
        xp = self.xp
        shifted = self._shifted(damping)
        values, what = self._spectrum(shifted, damping)
        if self.is_symmetric:  # log|det| and the rule from one eigvalsh
            return _logdet_from_spectrum(values, xp, what, shift=damping)
        _check_invertible_spectrum(values, xp, what, shift=damping)
        sign, logabsdet = xp.linalg.slogdet(shifted)
        sign = float(sign)
        if sign == 0.0:
            raise FactorizationError(
                f"The dense matrix is singular: its log-determinant is -inf. {_DAMPING_HINT}"
            )
        if sign < 0.0:
            raise ValueError(
                "The dense matrix has a negative determinant (it is not positive definite); "
                "logdet is defined here for matrices of positive determinant only."
            )
        return logabsdet

    def frobenius_norm(self):
        return self.xp.linalg.matrix_norm(self.A, ord="fro")


# -- identity and diagonal ---------------------------------------------------------------


class IdentityLinearOperator(LinearOperator):
    """The ``n x n`` identity.

    Parameters
    ----------
    n : int
        Dimension.
    xp
        Array namespace.
    dtype
        Real floating dtype of ``xp``.
    device
        Device (``None``: the namespace's default).

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> eye = IdentityLinearOperator(3, xp=xp, dtype=xp.float64)
    >>> (eye @ xp.asarray([1.0, 2.0, 3.0])).tolist()
    [1.0, 2.0, 3.0]
    >>> float(eye.inverse(damping=1.0).trace())
    1.5
    """

    def __init__(self, n, *, xp, dtype, device=None):
        super().__init__((n, n), dtype=dtype, xp=xp, device=device, psd=True)

    def _matmat(self, X):
        return self.xp.asarray(X, copy=True)

    def _scalar(self, value):
        return self.xp.asarray(value, dtype=self.dtype, device=self.device)

    def to_dense(self):
        return self.xp.eye(self.shape[0], dtype=self.dtype, device=self.device)

    def inverse(self, damping=0.0):
        value = 1.0 + damping
        if value == 0.0:
            raise FactorizationError(
                "The identity plus damping -1 is the zero matrix and has no inverse."
            )
        return ScaledLinearOperator(self, 1.0 / value)

    def trace(self):
        return self._scalar(float(self.shape[0]))

    def diagonal(self):
        return self.xp.ones(self.shape[0], dtype=self.dtype, device=self.device)

    def _logdet(self, damping):
        value = 1.0 + damping
        if value == 0.0:
            raise FactorizationError("The identity plus damping -1 is singular.")
        if value < 0.0 and self.shape[0] % 2 == 1:
            raise ValueError(
                "The damped identity has a negative determinant; logdet is defined here "
                "for matrices of positive determinant only."
            )
        return self._scalar(self.shape[0] * math.log(abs(value)))

    def frobenius_norm(self):
        return self._scalar(math.sqrt(self.shape[0]))


class DiagonalLinearOperator(LinearOperator):
    """``diag(d)`` for a 1-D array ``d`` of any namespace.

    Parameters
    ----------
    diagonal
        Real floating array of shape ``(n,)``.
    psd : bool, optional
        Declare the entries non-negative (not checked). Without it, ``is_psd`` looks
        at the entries once, on first access.

    Examples
    --------
    >>> import numpy as np
    >>> D = DiagonalLinearOperator(np.array([1.0, 2.0, 4.0]))
    >>> (D @ np.ones(3)).tolist()
    [1.0, 2.0, 4.0]
    >>> D.inverse(damping=1.0).diagonal().tolist()
    [0.5, 0.3333333333333333, 0.2]
    >>> round(float(D.logdet()), 12) == round(float(np.log(8.0)), 12)
    True
    """

    def __init__(self, diagonal, *, psd=None):
        xp = array_namespace(diagonal)
        if diagonal.ndim != 1:
            raise ValueError(
                f"A diagonal operator needs a 1-D array of shape (n,), got shape "
                f"{tuple(diagonal.shape)}."
            )
        n = diagonal.shape[0]
        super().__init__(
            (n, n),
            dtype=diagonal.dtype,
            xp=xp,
            device=array_device(diagonal),
            symmetric=True,
            psd=psd,
        )
        self._diag = diagonal

    def _infer_psd(self):
        return _all_nonnegative(self._diag, self.xp)

    def _matmat(self, X):
        return self._diag[:, None] * X

    def to_dense(self):
        return diag_matrix(self._diag, self.xp)

    def inverse(self, damping=0.0):
        shifted = self._diag + damping if damping else self._diag
        _check_invertible_spectrum(
            shifted, self.xp, "diagonal matrix" + _plus(damping), shift=damping
        )
        return DiagonalLinearOperator(1.0 / shifted)

    def trace(self):
        return self.xp.sum(self._diag)

    def eigvalsh(self):
        """The diagonal entries (the eigenvalues, unsorted)."""
        return self._diag

    def diagonal(self):
        return self._diag

    def _logdet(self, damping):
        shifted = self._diag + damping if damping else self._diag
        return _logdet_from_spectrum(
            shifted, self.xp, "diagonal matrix" + _plus(damping), shift=damping
        )

    def frobenius_norm(self):
        return self.xp.linalg.vector_norm(self._diag)


def _plus(damping) -> str:
    return f" plus {damping} I" if damping else ""


def _declared_or(symmetric, psd, derived) -> bool:
    """The symmetry tag: as declared, else implied by ``psd=True``, else derived."""
    if symmetric is not None:
        return symmetric
    return bool(psd) or derived


def _all_nonnegative(values, xp) -> bool:
    """Whether every entry is ``>= 0`` (one reduction and one host transfer)."""
    return bool(xp.all(values >= 0))


# -- block diagonal ----------------------------------------------------------------------


class BlockDiagonalLinearOperator(LinearOperator):
    """``blockdiag(B_1, ..., B_L)`` of operators or dense 2-D arrays.

    Blocks may be rectangular; a product applies each block to its slice of the
    input's rows and concatenates the results. Symmetric (PSD) if every block is.

    Parameters
    ----------
    blocks : sequence
        LinearOperators or 2-D arrays (wrapped in :class:`DenseLinearOperator`), all
        of one namespace and dtype.
    symmetric, psd : bool, optional
        Declare the whole operator symmetric / PSD (not checked); by default derived
        from the blocks.

    Examples
    --------
    >>> import numpy as np
    >>> B = BlockDiagonalLinearOperator([np.array([[2.0]]), DiagonalLinearOperator(np.ones(2))])
    >>> (B @ np.array([1.0, 2.0, 3.0])).tolist()
    [2.0, 2.0, 3.0]
    >>> B.inverse().diagonal().tolist()
    [0.5, 1.0, 1.0]
    """

    def __init__(self, blocks, *, symmetric=None, psd=None):
        blocks = [_as_operator(b, f"block {i}") for i, b in enumerate(blocks)]
        if not blocks:
            raise ValueError("A block-diagonal operator needs at least one block, got none.")
        xp, dtype, dev = _check_parts_agree(blocks, "Block")
        rows = [b.shape[0] for b in blocks]
        cols = [b.shape[1] for b in blocks]
        super().__init__(
            (sum(rows), sum(cols)),
            dtype=dtype,
            xp=xp,
            device=dev,
            symmetric=_declared_or(symmetric, psd, all(b.is_symmetric for b in blocks)),
            psd=psd,
        )
        self.blocks = tuple(blocks)
        self._row_offsets = _offsets(rows)
        self._col_offsets = _offsets(cols)

    def _infer_psd(self):
        return all(b.is_psd for b in self.blocks)

    def _matmat(self, X):
        parts = [
            b._matmat(X[start:stop, ...])
            for b, (start, stop) in zip(self.blocks, self._col_offsets, strict=True)
        ]
        return self.xp.concat(parts, axis=0)

    def _rmatmat(self, X):
        parts = [
            b._rmatmat(X[start:stop, ...])
            for b, (start, stop) in zip(self.blocks, self._row_offsets, strict=True)
        ]
        return self.xp.concat(parts, axis=0)

    def adjoint(self):
        if self.is_symmetric:
            return self
        return BlockDiagonalLinearOperator([b.adjoint() for b in self.blocks])

    def _require_square_blocks(self, query):
        _require_square(self, query)
        for i, b in enumerate(self.blocks):
            if b.shape[0] != b.shape[1]:
                raise NotImplementedError(
                    f"{query} of a block-diagonal operator needs square blocks; block {i} "
                    f"has shape {b.shape}."
                )

    def inverse(self, damping=0.0):
        self._require_square_blocks("inverse")
        calls = [(f"Block {i}", lambda b=b: b.inverse(damping)) for i, b in enumerate(self.blocks)]
        inverses = invert_all(calls)
        return BlockDiagonalLinearOperator(inverses)

    def trace(self):
        self._require_square_blocks("trace")
        return sum(b.trace() for b in self.blocks)

    def diagonal(self):
        self._require_square_blocks("diagonal")
        return self.xp.concat([b.diagonal() for b in self.blocks], axis=0)

    def _logdet(self, damping):
        self._require_square_blocks("logdet")
        values = invert_all(
            [(f"Block {i}", lambda b=b: b._logdet(damping)) for i, b in enumerate(self.blocks)]
        )
        total = 0.0
        for value in values:
            total = total + value
        return total

    def eigvalsh(self):
        """All eigenvalues (unsorted): the blocks' ``eigvalsh()``, concatenated.

        Examples
        --------
        >>> import numpy as np
        >>> B = BlockDiagonalLinearOperator([DiagonalLinearOperator(np.array([3.0, 1.0])),
        ...                                  DenseLinearOperator(np.eye(1), symmetric=True)])
        >>> B.eigvalsh().tolist()
        [3.0, 1.0, 1.0]
        """
        self._require_square_blocks("eigvalsh")
        return self.xp.concat([b.eigvalsh() for b in self.blocks], axis=0)

    def frobenius_norm(self):
        return self.xp.sqrt(sum(b.frobenius_norm() ** 2 for b in self.blocks))

    def to_dense(self):
        xp = self.xp
        n = self.shape[1]
        rows = []
        for b, (start, stop) in zip(self.blocks, self._col_offsets, strict=True):
            m_b = b.shape[0]
            left = xp.zeros((m_b, start), dtype=self.dtype, device=self.device)
            right = xp.zeros((m_b, n - stop), dtype=self.dtype, device=self.device)
            rows.append(xp.concat([left, b.to_dense(), right], axis=1))
        return xp.concat(rows, axis=0)


def _offsets(sizes):
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return tuple(out)


# -- Kronecker ---------------------------------------------------------------------------


class KroneckerLinearOperator(LinearOperator):
    """``A_1 x A_2 x ... x A_F`` (Kronecker product), never materialized.

    A product reshapes the input to ``(n_1, ..., n_F, k)`` and multiplies along one
    axis per factor (one batched matmat per factor), so it costs
    ``sum_i m_i * n * k`` operations instead of ``m * n * k`` and allocates nothing of
    the size of the full matrix.

    Parameters
    ----------
    *factors
        One or more (usually two) LinearOperators or 2-D arrays (wrapped in
        :class:`DenseLinearOperator`), square or rectangular, all of one namespace
        and dtype.
    symmetric, psd : bool, optional
        Declare the product symmetric / PSD (not checked), e.g. for factors given as
        plain arrays; by default derived from the factors.
    names : sequence of str, optional
        A name per factor for error messages (e.g. ``("output factor B", "input
        factor A")``); default ``"Kronecker factor i"``.

    Notes
    -----
    Symmetric if every factor is, PSD if every factor is (declare dense factors
    with ``DenseLinearOperator(A, psd=True)``).

    The conditioning rule (:class:`~curvlinops.conditioning`) judges the undamped
    inverse and log-determinant factor by factor (each factor is inverted on its own,
    so each factor's condition number sets the accuracy), and the damped ones on the
    whole spectrum ``lam + d`` (``n``: the largest factor's dimension).

    ``inverse(damping)`` with ``damping != 0`` is exact,
    ``(A_1 x ... x A_F + d I)^{-1} = Q diag(1 / (lam + d)) Q^T`` with
    ``Q = Q_1 x ... x Q_F`` and ``lam`` the outer product of the factors'
    eigenvalues. It needs symmetric factors; their eigendecompositions (of the small
    factor matrices, built with ``to_dense`` when a factor is not dense already) are
    computed once and cached. The damped log-determinant uses the same spectrum.

    Examples
    --------
    >>> import numpy as np
    >>> A, B = np.array([[2.0, 1.0], [1.0, 2.0]]), np.diag([1.0, 3.0])
    >>> K = KroneckerLinearOperator(A, B)
    >>> x = np.arange(4.0)
    >>> bool(np.allclose(K @ x, np.kron(A, B) @ x))
    True
    >>> bool(np.allclose(K.inverse(damping=0.5).to_dense(),
    ...                  np.linalg.inv(np.kron(A, B) + 0.5 * np.eye(4))))
    True
    """

    def __init__(self, *factors, symmetric=None, psd=None, names=None):
        if not factors:
            raise ValueError("A Kronecker product needs at least one factor, got none.")
        if names is not None and len(names) != len(factors):
            raise ValueError(f"Expected {len(factors)} factor names, got {len(names)}.")
        factors = [_as_operator(f, f"Kronecker factor {i}") for i, f in enumerate(factors)]
        xp, dtype, dev = _check_parts_agree(factors, "Kronecker factor")
        super().__init__(
            (math.prod(f.shape[0] for f in factors), math.prod(f.shape[1] for f in factors)),
            dtype=dtype,
            xp=xp,
            device=dev,
            symmetric=_declared_or(symmetric, psd, all(f.is_symmetric for f in factors)),
            psd=psd,
        )
        self.factors = tuple(factors)
        self.names = tuple(names or (f"Kronecker factor {i}" for i in range(len(factors))))
        self._eigh_cache = None
        self._symmetric_cache = None

    def _infer_psd(self):
        # The eigenvalues of a Kronecker product are the products of the factors'.
        return all(f.is_psd for f in self.factors)

    def _matmat(self, X):
        fs = self.factors
        if len(fs) == 1:
            return fs[0]._matmat(X)
        if len(fs) == 2:
            (m1, n1), (m2, n2) = fs[0].shape, fs[1].shape
            right = _right_product(fs[1], adjoint=False)
            return _kron2_apply(fs[0]._matmat, right, (n1, n2, m1, m2), X, self.xp)
        return _kron_apply(
            [f._matmat for f in fs], [f.shape[1] for f in fs], [f.shape[0] for f in fs], X, self.xp
        )

    def _rmatmat(self, X):
        fs = self.factors
        if len(fs) == 1:
            return fs[0]._rmatmat(X)
        if len(fs) == 2:
            (m1, n1), (m2, n2) = fs[0].shape, fs[1].shape
            right = _right_product(fs[1], adjoint=True)
            return _kron2_apply(fs[0]._rmatmat, right, (m1, m2, n1, n2), X, self.xp)
        return _kron_apply(
            [f._rmatmat for f in fs], [f.shape[0] for f in fs], [f.shape[1] for f in fs], X, self.xp
        )

    def adjoint(self):
        if self.is_symmetric:
            return self
        return KroneckerLinearOperator(*(f.adjoint() for f in self.factors))

    def _require_square_factors(self, query):
        for i, f in enumerate(self.factors):
            if f.shape[0] != f.shape[1]:
                if self.shape[0] != self.shape[1]:
                    _require_square(self, query)
                raise NotImplementedError(
                    f"{query} of a Kronecker product needs square factors; factor {i} has "
                    f"shape {f.shape}."
                )

    @property
    def _largest_factor(self) -> int:
        return max(f.shape[0] for f in self.factors)

    def _symmetric_factors(self) -> bool:
        if self._eigh_cache is not None:
            return True
        if self._symmetric_cache is None:
            self._symmetric_cache = all(_is_symmetric_factor(f) for f in self.factors)
        return self._symmetric_cache

    def factor_eigh(self):
        """Eigendecompositions ``[(lam_i, Q_i), ...]`` of the (symmetric) factors, cached.

        A symmetric :class:`DenseLinearOperator` factor caches its own, so that
        Kronecker products sharing a factor (e.g. the weight and bias blocks of a K-FAC
        layer, which share the output factor) share its eigendecomposition. A diagonal
        or identity factor's eigenbasis is the standard one: its ``Q`` is the int ``n``
        (the identity of size ``n``, never formed, as :class:`KroneckerEighLinearOperator`
        takes it), so that such factors (an embedding's input factor) stay ``O(n)``.

        Raises
        ------
        NotImplementedError
            If a factor is not symmetric (then there is no real eigendecomposition).

        Examples
        --------
        >>> import numpy as np
        >>> K = KroneckerLinearOperator(np.diag([2.0, 1.0]), np.eye(1))
        >>> [lam.tolist() for lam, _ in K.factor_eigh()]
        [[1.0, 2.0], [1.0]]
        """
        if self._eigh_cache is None:
            self._require_square_factors("An eigendecomposition")
            self._eigh_cache = [
                _symmetric_eigh(f, name) for f, name in zip(self.factors, self.names, strict=True)
            ]
        return self._eigh_cache

    def _eigenvalues(self):
        return _outer_flat([lam for lam, _ in self.factor_eigh()], self.xp)

    def eigvalsh(self):
        """All eigenvalues (unsorted, C order over the factors' indices) of symmetric factors.

        The outer product of the factors' eigenvalues (from :meth:`factor_eigh`).

        Examples
        --------
        >>> import numpy as np
        >>> K = KroneckerLinearOperator(np.diag([1.0, 2.0]), np.diag([3.0, 5.0]))
        >>> K.eigvalsh().tolist()
        [3.0, 5.0, 6.0, 10.0]
        """
        return self._eigenvalues()

    def _check_factors(self, spectra):
        """The conditioning rule on each factor's spectrum (undamped inverse, logdet).

        The suggested damping is the one that makes the whole product well-conditioned.
        """
        xp = self.xp
        product = _outer_flat(spectra, xp)
        for name, values in zip(self.names, spectra, strict=True):
            check_invertible_spectrum(
                values, xp, size=values.shape[0], what=name, suggest_from=product
            )

    def _check_damped(self, shifted, damping, what):
        """The rule on the damped spectrum; on failure the message names the factor with
        the smallest eigenvalue relative to its largest (the one the damping must fix)."""
        xp = self.xp
        try:
            _check_invertible_spectrum(shifted, xp, what, size=self._largest_factor, shift=damping)
        except IllConditionedError as err:
            ratios = []
            for lam, _ in self.factor_eigh():
                top = float(xp.max(xp.abs(lam)))
                ratios.append(float(xp.min(xp.abs(lam))) / top if top > 0 else 0.0)
            i = min(range(len(ratios)), key=ratios.__getitem__)
            raise err.with_context(
                f"The {self.names[i]} has the smallest eigenvalue relative to its largest "
                f"({ratios[i]:.2g})"
            ) from None

    def inverse(self, damping=0.0):
        """``(A_1 x ... x A_F + damping I)^{-1}``, exact.

        Symmetric factors: from their cached eigendecompositions, as a Kronecker
        product of the factors' inverses for ``damping = 0`` and as
        ``Q diag(1 / (lam + damping)) Q^T`` otherwise. Non-symmetric factors: the
        Kronecker product of their inverses (``damping = 0`` only).

        Raises
        ------
        FactorizationError
            (:class:`~curvlinops.IllConditionedError`) If the rule of
            :class:`~curvlinops.conditioning` refuses it: undamped, each factor's
            spectrum (``n``: its dimension); damped, the whole spectrum ``lam + d``
            (``n``: the largest factor's dimension; the message names the factor with the
            smallest eigenvalue relative to its largest).
        NotImplementedError
            For ``damping != 0`` with a non-symmetric factor.
        """
        self._require_square_factors("inverse")
        xp, damping = self.xp, float(damping)
        if damping == 0.0 and not self._symmetric_factors():
            self._check_factors([xp.linalg.svdvals(f.to_dense()) for f in self.factors])
            inverses = []
            for name, f in zip(self.names, self.factors, strict=True):
                try:
                    inverses.append(f.inverse())
                except FactorizationError as err:
                    raise err.with_context(f"The {name}") from err
            return KroneckerLinearOperator(*inverses, names=self.names)
        eigh = self.factor_eigh()
        if damping == 0.0:
            self._check_factors([lam for lam, _ in eigh])
            return KroneckerLinearOperator(
                *(
                    _inverse_from_eigh(f, lam, Q)
                    for f, (lam, Q) in zip(self.factors, eigh, strict=True)
                ),
                psd=self.is_psd or None,  # the inverse of a PSD product is PSD
                names=self.names,
            )
        shifted = self._eigenvalues() + damping
        self._check_damped(shifted, damping, f"Kronecker product plus {damping} I")
        return KroneckerEighLinearOperator(1.0 / shifted, [Q for _, Q in eigh])

    def trace(self):
        self._require_square_factors("trace")
        out = self.factors[0].trace()
        for f in self.factors[1:]:
            out = out * f.trace()
        return out

    def diagonal(self):
        self._require_square_factors("diagonal")
        return _outer_flat([f.diagonal() for f in self.factors], self.xp)

    def _logdet(self, damping):
        self._require_square_factors("logdet")
        xp = self.xp
        if damping == 0.0 and not self._symmetric_factors():
            self._check_factors([xp.linalg.svdvals(f.to_dense()) for f in self.factors])
            n = self.shape[0]
            total = 0.0
            for name, f in zip(self.names, self.factors, strict=True):
                try:
                    total = total + (n // f.shape[0]) * f.logdet()
                except FactorizationError as err:
                    raise err.with_context(f"The {name}") from err
            return total
        spectrum = self._eigenvalues() + damping
        what = "Kronecker product" + _plus(damping)
        if damping == 0.0:  # judged factor by factor, as the undamped inverse
            self._check_factors([lam for lam, _ in self.factor_eigh()])
            return _logdet_from_spectrum(spectrum, xp, what, checked=False)
        self._check_damped(spectrum, damping, what)
        return _logdet_from_spectrum(spectrum, xp, what, checked=False)

    def frobenius_norm(self):
        out = self.factors[0].frobenius_norm()
        for f in self.factors[1:]:
            out = out * f.frobenius_norm()
        return out

    def to_dense(self):
        xp = self.xp
        out = self.factors[0].to_dense()
        for f in self.factors[1:]:
            out = kron(out, f.to_dense(), xp)
        return out


def _symmetric_eigh(factor: LinearOperator, name: str):
    """``(eigenvalues, eigenvectors)`` of a symmetric Kronecker factor.

    A symmetric :class:`DenseLinearOperator` caches its own (:meth:`~DenseLinearOperator.eigh`),
    so that Kronecker products sharing the factor share it.
    """
    xp = factor.xp
    if isinstance(factor, EighLinearOperator) and factor.rank == factor.shape[0]:
        return factor.eigenvalues, factor.eigenvectors
    if isinstance(factor, (DiagonalLinearOperator, IdentityLinearOperator)):
        return factor.diagonal(), int(factor.shape[0])  # the standard basis, never formed
    if isinstance(factor, DenseLinearOperator) and factor.is_symmetric:
        try:
            return factor.eigh()
        except FactorizationError as err:
            raise err.with_context(f"The {name}") from err
    if not _is_symmetric_factor(factor):
        raise NotImplementedError(
            f"The {name} is not symmetric, so the damped inverse and "
            "log-determinant of the Kronecker product have no cheap exact form. Use "
            "curvlinops.CGInverseLinearOperator (or a symmetric factor)."
        )
    return checked_eigh(factor.to_dense(), xp, name=name)


def _inverse_from_eigh(factor, lam, Q):
    """``factor^{-1}`` from its eigendecomposition (the caller checked the spectrum)."""
    if isinstance(factor, (DiagonalLinearOperator, IdentityLinearOperator, EighLinearOperator)):
        return factor.inverse()
    xp = factor.xp
    return DenseLinearOperator((Q * (1.0 / lam)[None, :]) @ xp.matrix_transpose(Q), symmetric=True)


def _is_symmetric_factor(factor) -> bool:
    """Declared symmetric, or a square factor whose dense form is symmetric."""
    if factor.is_symmetric or isinstance(factor, (DiagonalLinearOperator, IdentityLinearOperator)):
        return True
    if factor.shape[0] != factor.shape[1]:
        return False
    return is_numerically_symmetric(factor.to_dense(), factor.xp)


class KroneckerEighLinearOperator(LinearOperator):
    """``Q diag(lam) Q^T`` with ``Q = Q_1 x ... x Q_F`` Kronecker-factored, never formed.

    The eigenbasis of a Kronecker product (and the operator EKFAC uses: the K-FAC
    eigenbasis with corrected eigenvalues). ``lam`` need not be an outer product.
    Symmetric; PSD when ``lam >= 0`` (checked once, on first access of ``is_psd``).

    Parameters
    ----------
    eigenvalues
        Array of shape ``(n,)``, ``n = prod(n_i)``, ordered like the rows of
        ``Q_1 x ... x Q_F`` (C order over the factors' indices).
    eigenvectors : sequence of arrays or ints
        Square orthogonal matrices ``Q_i`` of shape ``(n_i, n_i)`` (not checked), or an
        int ``n_i`` for the identity of that size (the standard basis, never formed:
        the eigenbasis of a diagonal factor).

    Examples
    --------
    >>> import numpy as np
    >>> Q1 = np.array([[0.6, -0.8], [0.8, 0.6]])
    >>> Q2 = np.eye(2)
    >>> lam = np.array([1.0, 2.0, 3.0, 4.0])
    >>> E = KroneckerEighLinearOperator(lam, [Q1, Q2])
    >>> Q = np.kron(Q1, Q2)
    >>> bool(np.allclose(E.to_dense(), Q @ np.diag(lam) @ Q.T))
    True
    >>> bool(np.allclose(E.diagonal(), np.diag(Q @ np.diag(lam) @ Q.T)))
    True
    """

    def __init__(self, eigenvalues, eigenvectors):
        eigenvectors = list(eigenvectors)
        if not eigenvectors:
            raise ValueError("KroneckerEighLinearOperator needs at least one eigenvector factor.")
        arrays = [(i, Q) for i, Q in enumerate(eigenvectors) if not _is_identity_basis(Q)]
        names = ["eigenvalues"] + [f"eigenvectors {i}" for i, _ in arrays]
        xp = _check_arrays_agree([eigenvalues, *(Q for _, Q in arrays)], names)
        for i, Q in enumerate(eigenvectors):
            if _is_identity_basis(Q):
                if Q < 1:
                    raise ValueError(f"Eigenvector factor {i} (an identity) needs a size >= 1.")
                continue
            if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
                raise ValueError(
                    f"Eigenvector factor {i} must be a square (n_i, n_i) array, got shape "
                    f"{tuple(Q.shape)}."
                )
        dims = [_basis_size(Q) for Q in eigenvectors]
        n = math.prod(dims)
        if eigenvalues.ndim != 1 or eigenvalues.shape[0] != n:
            raise ValueError(
                f"Expected eigenvalues of shape ({n},) for eigenvector factors of sizes "
                f"{dims}, got shape "
                f"{tuple(eigenvalues.shape)}."
            )
        super().__init__(
            (n, n),
            dtype=eigenvalues.dtype,
            xp=xp,
            device=array_device(eigenvalues),
            symmetric=True,
        )
        self.eigenvalues = eigenvalues
        self.eigenvectors = tuple(eigenvectors)
        self._dims = dims

    def _infer_psd(self):
        return _all_nonnegative(self.eigenvalues, self.xp)

    def _apply_Q(self, X, transpose):
        xp = self.xp
        Qs = [None if _is_identity_basis(Q) else Q for Q in self.eigenvectors]
        if transpose:
            Qs = [None if Q is None else xp.matrix_transpose(Q) for Q in Qs]
        if len(Qs) == 1:
            return X if Qs[0] is None else Qs[0] @ X
        if len(Qs) == 2:
            Q1, Q2 = Qs  # (Q1 x Q2) X: Q1 V Q2^T
            n1, n2 = self._dims
            right = None if Q2 is None else xp.matrix_transpose(Q2)

            def left_apply(V):
                return V if Q1 is None else Q1 @ V

            def right_apply(Y):
                return Y if right is None else Y @ right

            return _kron2_apply(left_apply, right_apply, (n1, n2, n1, n2), X, xp)
        applies = [_identity_apply if Q is None else _matmul_by(Q) for Q in Qs]
        return _kron_apply(applies, self._dims, self._dims, X, xp)

    def _matmat(self, X):
        coeffs = self._apply_Q(X, transpose=True)
        return self._apply_Q(self.eigenvalues[:, None] * coeffs, transpose=False)

    def inverse(self, damping=0.0):
        shifted = self.eigenvalues + damping if damping else self.eigenvalues
        _check_invertible_spectrum(
            shifted,
            self.xp,
            "Kronecker-eigendecomposed operator" + _plus(damping),
            size=max(self._dims),
            shift=damping,
        )
        return KroneckerEighLinearOperator(1.0 / shifted, self.eigenvectors)

    def eigvalsh(self):
        """The eigenvalues ``lam`` (unsorted, in the order of the constructor)."""
        return self.eigenvalues

    def trace(self):
        return self.xp.sum(self.eigenvalues)

    def diagonal(self):
        # diag(Q diag(lam) Q^T) = (Q * Q) lam, and Q * Q = (Q_1 * Q_1) x ... x (Q_F * Q_F).
        squares = [
            _identity_apply if _is_identity_basis(Q) else _matmul_by(Q * Q)
            for Q in self.eigenvectors
        ]
        return _kron_apply(squares, self._dims, self._dims, self.eigenvalues[:, None], self.xp)[
            :, 0
        ]

    def _logdet(self, damping):
        shifted = self.eigenvalues + damping if damping else self.eigenvalues
        return _logdet_from_spectrum(
            shifted,
            self.xp,
            "Kronecker-eigendecomposed operator" + _plus(damping),
            size=max(self._dims),
            shift=damping,
        )

    def frobenius_norm(self):
        return self.xp.linalg.vector_norm(self.eigenvalues)

    def to_dense(self):
        xp = self.xp
        dense = [
            xp.eye(Q, dtype=self.dtype, device=self.device) if _is_identity_basis(Q) else Q
            for Q in self.eigenvectors
        ]
        Q = dense[0]
        for Qi in dense[1:]:
            Q = kron(Q, Qi, xp)
        return (Q * self.eigenvalues[None, :]) @ xp.matrix_transpose(Q)


def _matmul_by(M):
    return lambda X: M @ X


def _identity_apply(X):
    return X


def _is_identity_basis(Q) -> bool:
    """Whether an eigenvector factor is an int: the identity of that size."""
    return isinstance(Q, int) and not isinstance(Q, bool)


def _basis_size(Q) -> int:
    return int(Q) if _is_identity_basis(Q) else int(Q.shape[0])


# -- eigendecomposed / low rank -----------------------------------------------------------


class EighLinearOperator(LinearOperator):
    """``Q diag(lam) Q^T`` for ``Q`` of shape ``(n, k)`` with orthonormal columns.

    Symmetric; PSD when ``lam >= 0`` (checked once, on first access of ``is_psd``).
    With ``k < n`` this is a low-rank operator (e.g. from Lanczos or a randomized
    Nystrom approximation); its damped inverse
    ``Q diag(1 / (lam + d)) Q^T + (1 / d) (I - Q Q^T)`` is applied matrix-free.

    Parameters
    ----------
    eigenvalues
        Array of shape ``(k,)``.
    eigenvectors
        Array of shape ``(n, k)``, ``k <= n``, orthonormal columns (not checked; the
        exact ``inverse``, ``logdet`` and ``frobenius_norm`` rely on it).

    Examples
    --------
    >>> import numpy as np
    >>> Q = np.array([[1.0], [0.0]])
    >>> E = EighLinearOperator(np.array([3.0]), Q)
    >>> E.to_dense().tolist()
    [[3.0, 0.0], [0.0, 0.0]]
    >>> E.inverse(damping=1.0).to_dense().tolist()
    [[0.25, 0.0], [0.0, 1.0]]
    """

    def __init__(self, eigenvalues, eigenvectors):
        xp = _check_arrays_agree([eigenvalues, eigenvectors], ["eigenvalues", "eigenvectors"])
        if eigenvectors.ndim != 2 or eigenvectors.shape[1] > eigenvectors.shape[0]:
            raise ValueError(
                "Expected eigenvectors of shape (n, k) with k <= n, got shape "
                f"{tuple(eigenvectors.shape)}."
            )
        k = eigenvectors.shape[1]
        if eigenvalues.ndim != 1 or eigenvalues.shape[0] != k:
            raise ValueError(
                f"Expected eigenvalues of shape ({k},) to match eigenvectors of shape "
                f"{tuple(eigenvectors.shape)}, got shape {tuple(eigenvalues.shape)}."
            )
        n = eigenvectors.shape[0]
        super().__init__(
            (n, n),
            dtype=eigenvalues.dtype,
            xp=xp,
            device=array_device(eigenvectors),
            symmetric=True,
        )
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors

    def _infer_psd(self):
        return _all_nonnegative(self.eigenvalues, self.xp)

    def eigvalsh(self):
        """All ``n`` eigenvalues (unsorted): ``lam``, then ``n - k`` zeros when ``k < n``."""
        xp, missing = self.xp, self.shape[0] - self.rank
        if not missing:
            return self.eigenvalues
        zeros = xp.zeros((missing,), dtype=self.dtype, device=self.device)
        return xp.concat([self.eigenvalues, zeros])

    @property
    def rank(self) -> int:
        """Number ``k`` of eigenpairs (the rank when all eigenvalues are nonzero)."""
        return self.eigenvectors.shape[1]

    def _matmat(self, X):
        Q = self.eigenvectors
        return Q @ (self.eigenvalues[:, None] * (self.xp.matrix_transpose(Q) @ X))

    def inverse(self, damping=0.0):
        lam = self.eigenvalues
        shifted = lam + damping if damping else lam
        what = "eigendecomposed operator" + _plus(damping)
        if self.rank == self.shape[0]:
            _check_invertible_spectrum(shifted, self.xp, what, shift=damping)
            return EighLinearOperator(1.0 / shifted, self.eigenvectors)
        xp = self.xp
        # the n - k missing eigenvalues are 0 + damping (undamped: singular, refused)
        rest = xp.full((1,), damping, dtype=self.dtype, device=self.device)
        _check_invertible_spectrum(
            xp.concat([shifted, rest]), xp, what, size=self.shape[0], shift=damping
        )
        # Q diag(1/(lam+d)) Q^T + (1/d)(I - Q Q^T) = Q diag(1/(lam+d) - 1/d) Q^T + (1/d) I
        low_rank = EighLinearOperator(1.0 / shifted - 1.0 / damping, self.eigenvectors)
        inverse = DampedLinearOperator(low_rank, 1.0 / damping)
        if damping > 0 and self.is_psd:
            inverse._psd = True  # (A + d I)^{-1} of a PSD A; the parts alone are not PSD
        return inverse

    def trace(self):
        return self.xp.sum(self.eigenvalues)

    def diagonal(self):
        Q = self.eigenvectors
        return self.xp.sum(Q * Q * self.eigenvalues[None, :], axis=1)

    def _logdet(self, damping):
        xp = self.xp
        shifted = self.eigenvalues + damping if damping else self.eigenvalues
        missing = self.shape[0] - self.rank
        if missing:  # the missing eigenvalues are 0 + damping (undamped: refused)
            rest = xp.full((missing,), damping, dtype=self.dtype, device=self.device)
            shifted = xp.concat([shifted, rest], axis=0)
        return _logdet_from_spectrum(
            shifted, xp, "eigendecomposed operator" + _plus(damping), shift=damping
        )

    def frobenius_norm(self):
        return self.xp.linalg.vector_norm(self.eigenvalues)

    def to_dense(self):
        Q = self.eigenvectors
        return (Q * self.eigenvalues[None, :]) @ self.xp.matrix_transpose(Q)
