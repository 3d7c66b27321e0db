"""The :class:`LinearOperator` base class and the operators its algebra returns.

A linear operator knows its ``shape``, ``dtype``, array namespace ``xp`` and
``device``, and implements one batched product ``_matmat`` on ``(n, k)`` arrays.
Everything else (``matvec``, ``@``, adjoints, sums, scalings, products, damping,
conversion to SciPy and CuPy operators) is built on that. Structured subclasses
override the queries they can answer exactly and cheaply (``inverse``, ``trace``,
``logdet``, ``diagonal``, ``frobenius_norm``); the defaults here raise
:class:`NotImplementedError` naming the iterative alternative instead of densifying.

May import: ``curvlinops._backend``, numpy/scipy/cupyx only inside the interop
methods ``to_scipy``/``to_cupyx``.
"""

from __future__ import annotations

import numbers

from .._backend import (
    assert_same_namespace,
    can_cast_losslessly,
    device as array_device,
    dtype_name,
    is_cupy_namespace,
    is_numpy_namespace,
    namespace_name,
)

__all__ = [
    "LinearOperator",
    "ScaledLinearOperator",
    "SumLinearOperator",
    "ProductLinearOperator",
    "AdjointLinearOperator",
    "DampedLinearOperator",
]


class LinearOperator:
    """A matrix that is only available through its products with vectors.

    Subclasses call ``super().__init__`` and implement :meth:`_matmat` (and
    :meth:`_rmatmat` unless the operator is symmetric). Inputs reaching ``_matmat``
    are already validated: a 2-D array ``(shape[1], k)`` of the operator's
    namespace, device and dtype.

    Parameters
    ----------
    shape : tuple of int
        ``(m, n)``.
    dtype
        Real floating dtype of the operator, in the namespace ``xp``.
    xp
        Array namespace (as returned by :func:`curvlinops.array_namespace`).
    device
        Device of the arrays the operator works on (``None`` to skip checks).
    symmetric : bool
        Whether the operator equals its adjoint; then ``adjoint()`` is ``self``
        and ``_rmatmat`` defaults to ``_matmat``.

    Notes
    -----
    Vectors are 1-D ``(n,)``, matrices of vectors ``(n, k)``. Results come back in
    the input's namespace and device. An input of lower precision than the
    operator (or an integer array) is promoted to the operator's dtype; an input of
    higher precision raises :class:`TypeError` rather than being downcast.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> A = aslinearoperator(np.array([[2.0, 1.0], [0.0, 3.0]]))
    >>> (A @ np.ones(2)).tolist()
    [3.0, 3.0]
    >>> ((2 * A - A.T) @ np.array([1.0, 0.0])).tolist()
    [2.0, -1.0]
    >>> A.damped(1.0).to_dense().tolist()
    [[3.0, 1.0], [0.0, 4.0]]
    """

    # Make NumPy's ``x @ A`` defer to ``A.__rmatmul__`` instead of wrapping the
    # operator in an object array.
    __array_ufunc__ = None

    def __init__(self, shape, *, dtype, xp, device=None, symmetric=False):
        shape = tuple(shape)
        if len(shape) != 2 or not all(isinstance(s, numbers.Integral) and s >= 0 for s in shape):
            raise ValueError(f"shape must be a pair of non-negative integers, got {shape}.")
        if not xp.isdtype(dtype, "real floating"):
            raise TypeError(f"Operators are real floating; got dtype {dtype_name(dtype)}.")
        if symmetric and shape[0] != shape[1]:
            raise ValueError(f"A symmetric operator must be square, got shape {shape}.")
        self._shape = (int(shape[0]), int(shape[1]))
        self._dtype = dtype
        self._xp = xp
        self._device = device
        self.is_symmetric = bool(symmetric)

    # -- attributes ----------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``: the operator maps ``(n,)`` vectors to ``(m,)`` vectors."""
        return self._shape

    @property
    def dtype(self):
        """Real floating dtype of the operator (in its namespace)."""
        return self._dtype

    @property
    def xp(self):
        """Array namespace the operator works in."""
        return self._xp

    @property
    def device(self):
        """Device of the arrays the operator works on."""
        return self._device

    @property
    def ndim(self) -> int:
        """Always 2."""
        return 2

    def __repr__(self) -> str:
        m, n = self.shape
        return (
            f"<{m}x{n} {type(self).__name__} dtype={dtype_name(self.dtype)} "
            f"namespace={namespace_name(self.xp)}>"
        )

    # -- what subclasses implement --------------------------------------------------

    def _matmat(self, X):
        """Product with a validated ``(n, k)`` array. Subclasses implement this."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _matmat.")

    def _rmatmat(self, X):
        """Adjoint product with a validated ``(m, k)`` array."""
        if self.is_symmetric:
            return self._matmat(X)
        raise NotImplementedError(
            f"{type(self).__name__} has no adjoint product (_rmatmat). Implement it, or "
            "build the operator with symmetric=True if it is symmetric."
        )

    # -- products ------------------------------------------------------------------

    def matvec(self, x):
        """``A @ x`` for ``x`` of shape ``(n,)``; a special case of :meth:`matmat`."""
        x = self._check_input(x, self.shape[1], ndim=1, what="vector")
        return self._matmat(x[:, None])[:, 0]

    def matmat(self, X):
        """``A @ X`` for ``X`` of shape ``(n, k)``, in one batched pass."""
        X = self._check_input(X, self.shape[1], ndim=2, what="matrix")
        return self._matmat(X)

    def rmatvec(self, x):
        """``A^T @ x`` for ``x`` of shape ``(m,)``."""
        x = self._check_input(x, self.shape[0], ndim=1, what="vector")
        return self._rmatmat(x[:, None])[:, 0]

    def rmatmat(self, X):
        """``A^T @ X`` for ``X`` of shape ``(m, k)``."""
        X = self._check_input(X, self.shape[0], ndim=2, what="matrix")
        return self._rmatmat(X)

    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            return ProductLinearOperator(self, other)
        ndim = getattr(other, "ndim", None)
        if ndim == 1:
            return self.matvec(other)
        if ndim == 2:
            return self.matmat(other)
        if ndim is None:
            return NotImplemented
        raise ValueError(
            f"A @ x needs x of shape ({self.shape[1]},) or ({self.shape[1]}, k); "
            f"got an array with {ndim} dimensions, shape {tuple(other.shape)}."
        )

    def __rmatmul__(self, other):
        ndim = getattr(other, "ndim", None)
        if ndim == 1:
            return self.rmatvec(other)
        if ndim == 2:
            xp = self.xp
            return xp.matrix_transpose(self.rmatmat(xp.matrix_transpose(other)))
        return NotImplemented

    def _check_input(self, X, n, *, ndim, what):
        """Validate namespace, shape, dtype and device of an input; promote its dtype."""
        xp = self.xp
        assert_same_namespace(xp, X, what=what)
        expected = f"({n},)" if ndim == 1 else f"({n}, k)"
        if X.ndim != ndim or X.shape[0] != n:
            raise ValueError(
                f"{type(self).__name__} of shape {self.shape} expected a {what} of shape "
                f"{expected}, got shape {tuple(X.shape)}."
            )
        if X.dtype != self.dtype:
            if not can_cast_losslessly(X.dtype, self.dtype, xp):
                raise TypeError(
                    f"{type(self).__name__} has dtype {dtype_name(self.dtype)} and cannot take "
                    f"a {dtype_name(X.dtype)} {what} without losing precision. Convert the "
                    f"{what} to {dtype_name(self.dtype)}, or build the operator in "
                    f"{dtype_name(X.dtype)}."
                )
            X = xp.astype(X, self.dtype)
        if self.device is not None and not _same_device(array_device(X), self.device):
            raise ValueError(
                f"The {what} is on device {array_device(X)}, the operator on {self.device}. "
                "Move it first; curvlinops never copies between devices inside a product."
            )
        return X

    # -- algebra -------------------------------------------------------------------

    def adjoint(self) -> LinearOperator:
        """The adjoint (transpose, for these real operators), lazily."""
        if self.is_symmetric:
            return self
        return AdjointLinearOperator(self)

    @property
    def T(self) -> LinearOperator:
        """The transpose, same as :meth:`adjoint`."""
        return self.adjoint()

    @property
    def H(self) -> LinearOperator:
        """The conjugate transpose, same as :meth:`adjoint` for real operators."""
        return self.adjoint()

    def __add__(self, other):
        if isinstance(other, LinearOperator):
            return SumLinearOperator(self, other)
        if isinstance(other, numbers.Number):
            raise TypeError(
                "Adding a scalar to an operator is ambiguous; use A.damped(c) for A + c*I."
            )
        return NotImplemented

    def __sub__(self, other):
        if isinstance(other, LinearOperator):
            return SumLinearOperator(self, ScaledLinearOperator(other, -1.0))
        return self.__add__(other)

    def __neg__(self):
        return ScaledLinearOperator(self, -1.0)

    def __pos__(self):
        return self

    def __mul__(self, scalar):
        if isinstance(scalar, numbers.Real) and not isinstance(scalar, bool):
            return ScaledLinearOperator(self, float(scalar))
        if isinstance(scalar, LinearOperator) or hasattr(scalar, "ndim"):
            raise TypeError("Use '@' for products of operators with operators or arrays.")
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        if isinstance(scalar, numbers.Real) and not isinstance(scalar, bool):
            if scalar == 0:
                raise ZeroDivisionError("Division of an operator by zero.")
            return ScaledLinearOperator(self, 1.0 / float(scalar))
        return NotImplemented

    def damped(self, damping: float) -> LinearOperator:
        """``A + damping * I`` (lazily; structured operators invert it exactly)."""
        return DampedLinearOperator(self, damping)

    # -- queries with cheap exact answers in structured subclasses ------------------

    def to_dense(self):
        """The operator as a dense ``(m, n)`` array of its namespace (via one matmat)."""
        xp = self.xp
        eye = xp.eye(self.shape[1], dtype=self.dtype, device=self.device)
        return self._matmat(eye)

    def inverse(self, damping: float = 0.0) -> LinearOperator:
        """``(A + damping I)^{-1}`` as an operator, where a cheap exact form exists."""
        raise NotImplementedError(
            f"{type(self).__name__} has no cheap exact inverse. Use "
            "curvlinops.CGInverseLinearOperator (symmetric PSD) or "
            "curvlinops.MINRESInverseLinearOperator (symmetric indefinite) instead."
        )

    def eigvalsh(self):
        """All eigenvalues of a symmetric operator (unsorted), where a cheap exact form exists."""
        raise NotImplementedError(
            f"{type(self).__name__} has no cheap exact spectrum. Use curvlinops.eigsh "
            "(Lanczos) for a few eigenvalues or curvlinops.spectral_density for their density."
        )

    def trace(self):
        """Trace, where a cheap exact form exists."""
        raise NotImplementedError(
            f"{type(self).__name__} has no cheap exact trace. Estimate it with "
            "curvlinops.hutchpp_trace or curvlinops.xtrace."
        )

    def diagonal(self):
        """Main diagonal as an array, where a cheap exact form exists."""
        raise NotImplementedError(
            f"{type(self).__name__} has no cheap exact diagonal. Estimate it with "
            "curvlinops.xdiag or curvlinops.hutchinson_diagonal."
        )

    def logdet(self):
        """Natural logarithm of the determinant, where a cheap exact form exists."""
        return self._logdet(0.0)

    def _logdet(self, damping: float):
        """``log det(A + damping I)``; structured subclasses override."""
        raise NotImplementedError(
            f"{type(self).__name__} has no cheap exact log-determinant. Estimate it with "
            "curvlinops.spectral_density (stochastic Lanczos quadrature)."
        )

    def frobenius_norm(self):
        """Frobenius norm, where a cheap exact form exists."""
        raise NotImplementedError(
            f"{type(self).__name__} has no cheap exact Frobenius norm. Estimate its square "
            "with curvlinops.hutchinson_squared_frobenius."
        )

    # -- interop -------------------------------------------------------------------

    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` over NumPy arrays.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import aslinearoperator
        >>> A = aslinearoperator(np.diag([1.0, 2.0])).to_scipy()
        >>> (A @ np.ones(2)).tolist()
        [1.0, 2.0]
        """
        if not is_numpy_namespace(self.xp):
            raise TypeError(
                f"to_scipy() needs a NumPy operator; this one works on "
                f"{namespace_name(self.xp)} arrays (use to_cupyx() for CuPy)."
            )
        import numpy as np
        import scipy.sparse.linalg

        return scipy.sparse.linalg.LinearOperator(
            self.shape,
            matvec=lambda x: self.matvec(np.ravel(x)),
            rmatvec=lambda x: self.rmatvec(np.ravel(x)),
            matmat=self.matmat,
            rmatmat=self.rmatmat,
            dtype=np.dtype(dtype_name(self.dtype)),
        )

    def to_cupyx(self):
        """A :class:`cupyx.scipy.sparse.linalg.LinearOperator` over CuPy arrays."""
        if not is_cupy_namespace(self.xp):
            raise TypeError(
                f"to_cupyx() needs a CuPy operator; this one works on "
                f"{namespace_name(self.xp)} arrays (use to_scipy() for NumPy)."
            )
        import cupy
        import cupyx.scipy.sparse.linalg

        return cupyx.scipy.sparse.linalg.LinearOperator(
            self.shape,
            matvec=lambda x: self.matvec(cupy.ravel(x)),
            rmatvec=lambda x: self.rmatvec(cupy.ravel(x)),
            matmat=self.matmat,
            dtype=cupy.dtype(dtype_name(self.dtype)),
        )


def _same_device(a, b) -> bool:
    if a == b:
        return True
    # PyTorch reports 'cuda:0' for arrays while users may say 'cuda': same device.
    sa, sb = str(a), str(b)
    return sa + ":0" == sb or sb + ":0" == sa


def _common_backend(ops, what):
    """Check that operators share namespace and dtype; return (xp, dtype, device)."""
    first = ops[0]
    for op in ops[1:]:
        if namespace_name(op.xp) != namespace_name(first.xp):
            raise TypeError(
                f"Cannot form the {what} of a {namespace_name(first.xp)} operator and a "
                f"{namespace_name(op.xp)} operator."
            )
        if op.dtype != first.dtype:
            raise TypeError(
                f"Cannot form the {what} of operators of dtypes {dtype_name(first.dtype)} "
                f"and {dtype_name(op.dtype)}; build both in one dtype."
            )
    return first.xp, first.dtype, first.device


class ScaledLinearOperator(LinearOperator):
    """``c * A`` for a real scalar ``c``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> float((3 * aslinearoperator(np.eye(2))).trace())
    6.0
    """

    def __init__(self, operator: LinearOperator, scalar: float):
        super().__init__(
            operator.shape,
            dtype=operator.dtype,
            xp=operator.xp,
            device=operator.device,
            symmetric=operator.is_symmetric,
        )
        self.operator = operator
        self.scalar = float(scalar)

    def _matmat(self, X):
        return self.scalar * self.operator._matmat(X)

    def _rmatmat(self, X):
        return self.scalar * self.operator._rmatmat(X)

    def adjoint(self):
        return (
            self
            if self.is_symmetric
            else ScaledLinearOperator(self.operator.adjoint(), self.scalar)
        )

    def __mul__(self, scalar):
        if isinstance(scalar, numbers.Real) and not isinstance(scalar, bool):
            return ScaledLinearOperator(self.operator, self.scalar * float(scalar))
        return super().__mul__(scalar)

    __rmul__ = __mul__

    def inverse(self, damping=0.0):
        c = self.scalar
        if c == 0:
            raise ZeroDivisionError("The operator is scaled by zero and has no inverse.")
        # (cA + dI)^{-1} = (1/c) (A + (d/c) I)^{-1}
        return ScaledLinearOperator(self.operator.inverse(damping=damping / c), 1.0 / c)

    def trace(self):
        return self.scalar * self.operator.trace()

    def eigvalsh(self):
        return self.scalar * self.operator.eigvalsh()

    def diagonal(self):
        return self.scalar * self.operator.diagonal()

    def _logdet(self, damping):
        c = self.scalar
        if c <= 0:
            raise NotImplementedError(
                "logdet of an operator scaled by a non-positive number is not defined in "
                "general; take the logdet of the unscaled operator."
            )
        import math

        return self.shape[0] * math.log(c) + self.operator._logdet(damping / c)

    def frobenius_norm(self):
        return abs(self.scalar) * self.operator.frobenius_norm()

    def to_dense(self):
        return self.scalar * self.operator.to_dense()


class SumLinearOperator(LinearOperator):
    """``A_1 + A_2 + ...`` of operators of one shape, namespace and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> S = aslinearoperator(np.eye(2)) + aslinearoperator(np.ones((2, 2)))
    >>> S.to_dense().tolist()
    [[2.0, 1.0], [1.0, 2.0]]
    """

    def __init__(self, *operators: LinearOperator):
        ops = []
        for op in operators:  # flatten nested sums
            ops.extend(op.operators if isinstance(op, SumLinearOperator) else [op])
        shapes = {op.shape for op in ops}
        if len(shapes) != 1:
            raise ValueError(f"Cannot add operators of different shapes {sorted(shapes)}.")
        xp, dtype, dev = _common_backend(ops, "sum")
        super().__init__(
            ops[0].shape,
            dtype=dtype,
            xp=xp,
            device=dev,
            symmetric=all(op.is_symmetric for op in ops),
        )
        self.operators = tuple(ops)

    def _matmat(self, X):
        out = self.operators[0]._matmat(X)
        for op in self.operators[1:]:
            out = out + op._matmat(X)
        return out

    def _rmatmat(self, X):
        out = self.operators[0]._rmatmat(X)
        for op in self.operators[1:]:
            out = out + op._rmatmat(X)
        return out

    def adjoint(self):
        if self.is_symmetric:
            return self
        return SumLinearOperator(*(op.adjoint() for op in self.operators))

    def trace(self):
        return sum(op.trace() for op in self.operators)

    def diagonal(self):
        out = self.operators[0].diagonal()
        for op in self.operators[1:]:
            out = out + op.diagonal()
        return out

    def to_dense(self):
        out = self.operators[0].to_dense()
        for op in self.operators[1:]:
            out = out + op.to_dense()
        return out


class ProductLinearOperator(LinearOperator):
    """``A_1 @ A_2 @ ...``, applied right to left, never formed.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> P = aslinearoperator(np.diag([1.0, 2.0])) @ aslinearoperator(np.diag([3.0, 4.0]))
    >>> (P @ np.ones(2)).tolist()
    [3.0, 8.0]
    """

    def __init__(self, *operators: LinearOperator):
        ops = []
        for op in operators:
            ops.extend(op.operators if isinstance(op, ProductLinearOperator) else [op])
        for left, right in zip(ops[:-1], ops[1:], strict=True):
            if left.shape[1] != right.shape[0]:
                raise ValueError(
                    f"Cannot multiply operators of shapes {left.shape} and {right.shape}: "
                    f"inner dimensions {left.shape[1]} and {right.shape[0]} differ."
                )
        xp, dtype, dev = _common_backend(ops, "product")
        super().__init__((ops[0].shape[0], ops[-1].shape[1]), dtype=dtype, xp=xp, device=dev)
        self.operators = tuple(ops)

    def _matmat(self, X):
        for op in reversed(self.operators):
            X = op._matmat(X)
        return X

    def _rmatmat(self, X):
        for op in self.operators:
            X = op._rmatmat(X)
        return X

    def adjoint(self):
        return ProductLinearOperator(*(op.adjoint() for op in reversed(self.operators)))

    def inverse(self, damping=0.0):
        if damping != 0.0:
            raise NotImplementedError(
                "A damped product has no cheap exact inverse; use "
                "curvlinops.CGInverseLinearOperator on it."
            )
        if any(op.shape[0] != op.shape[1] for op in self.operators):
            raise NotImplementedError("Only products of square operators invert factorwise.")
        return ProductLinearOperator(*(op.inverse() for op in reversed(self.operators)))

    def _logdet(self, damping):
        if damping != 0.0 or any(op.shape[0] != op.shape[1] for op in self.operators):
            return super()._logdet(damping)
        return sum(op.logdet() for op in self.operators)


class AdjointLinearOperator(LinearOperator):
    """``A^T`` of an operator, lazily (products swap ``_matmat`` and ``_rmatmat``)."""

    def __init__(self, operator: LinearOperator):
        m, n = operator.shape
        super().__init__((n, m), dtype=operator.dtype, xp=operator.xp, device=operator.device)
        self.operator = operator

    def _matmat(self, X):
        return self.operator._rmatmat(X)

    def _rmatmat(self, X):
        return self.operator._matmat(X)

    def adjoint(self):
        return self.operator

    def inverse(self, damping=0.0):
        return self.operator.inverse(damping=damping).adjoint()

    def trace(self):
        return self.operator.trace()

    def diagonal(self):
        return self.operator.diagonal()

    def _logdet(self, damping):
        return self.operator._logdet(damping)

    def frobenius_norm(self):
        return self.operator.frobenius_norm()

    def to_dense(self):
        return self.xp.matrix_transpose(self.operator.to_dense())


class DampedLinearOperator(LinearOperator):
    """``A + damping * I`` for a square operator ``A``.

    Structured operators invert and take log-determinants of it exactly through
    ``A.inverse(damping=...)`` (e.g. a Kronecker product through its factors'
    eigendecompositions).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> D = aslinearoperator(np.diag([1.0, 3.0])).damped(1.0)
    >>> (D.inverse() @ np.ones(2)).tolist()
    [0.5, 0.25]
    """

    def __init__(self, operator: LinearOperator, damping: float):
        if operator.shape[0] != operator.shape[1]:
            raise ValueError(f"Only square operators can be damped; got shape {operator.shape}.")
        super().__init__(
            operator.shape,
            dtype=operator.dtype,
            xp=operator.xp,
            device=operator.device,
            symmetric=operator.is_symmetric,
        )
        self.operator = operator
        self.damping = float(damping)

    def _matmat(self, X):
        return self.operator._matmat(X) + self.damping * X

    def _rmatmat(self, X):
        return self.operator._rmatmat(X) + self.damping * X

    def adjoint(self):
        return (
            self
            if self.is_symmetric
            else DampedLinearOperator(self.operator.adjoint(), self.damping)
        )

    def damped(self, damping):
        return DampedLinearOperator(self.operator, self.damping + float(damping))

    def inverse(self, damping=0.0):
        return self.operator.inverse(damping=self.damping + damping)

    def trace(self):
        return self.operator.trace() + self.damping * self.shape[0]

    def eigvalsh(self):
        return self.operator.eigvalsh() + self.damping

    def diagonal(self):
        return self.operator.diagonal() + self.damping

    def _logdet(self, damping):
        return self.operator._logdet(self.damping + damping)

    def frobenius_norm(self):
        # ||A + dI||_F^2 = ||A||_F^2 + 2 d tr(A) + n d^2, for any square A.
        fro = self.operator.frobenius_norm()
        tr = self.operator.trace()
        d = self.damping
        return self.xp.sqrt(fro**2 + 2 * d * tr + self.shape[0] * d**2)

    def to_dense(self):
        xp = self.xp
        return self.operator.to_dense() + self.damping * xp.eye(
            self.shape[0], dtype=self.dtype, device=self.device
        )
