"""The :class:`LinearOperator` base class and the operators its algebra returns.

A linear operator knows its ``shape``, ``dtype``, array namespace ``xp`` and
``device``, and implements one batched product ``_matmat`` on ``(n, k)`` arrays.
Everything else (``matvec``, ``@``, adjoints, sums, scalings, products, damping,
conversion to SciPy and CuPy operators) is built on that. Structured subclasses
override the queries they can answer exactly and cheaply (``inverse``, ``trace``,
``logdet``, ``diagonal``, ``frobenius_norm``); the defaults here raise
:class:`NotImplementedError` naming the iterative alternative instead of densifying.

Every operator carries two structure tags that the matrix-free algorithms consult:
``is_symmetric`` (declared, or derived by the algebra) and ``is_psd`` (positive
semi-definite: declared, or derived from the structure, e.g. ``c * A`` with ``c >= 0``
and ``A`` PSD). ``False`` means "not known", never "known not to hold".
:meth:`LinearOperator.check_input` is the one validation of arrays handed to an
operator, shared by the products here and by the solvers (:class:`CheckedInput`).

May import: ``curvlinops._backend``, numpy/scipy/cupyx only inside the interop
methods ``to_scipy``/``to_cupyx``.
"""

from __future__ import annotations

import numbers
import weakref
from typing import Any, NamedTuple

from .._backend import (
    FactorizationError,
    assert_same_namespace,
    can_cast_losslessly,
    device as array_device,
    dtype_name,
    indefinite_article as _a,
    is_cupy_namespace,
    is_numpy_namespace,
    namespace_name,
    to_numpy,
)

__all__ = [
    "CheckedInput",
    "LinearOperator",
    "ScaledLinearOperator",
    "SumLinearOperator",
    "ProductLinearOperator",
    "AdjointLinearOperator",
    "DampedLinearOperator",
]


class CheckedInput(NamedTuple):
    """What :meth:`LinearOperator.check_input` found out about an array.

    Attributes
    ----------
    array
        The validated array, of the shape it came in (``(n,)`` or ``(n, k)``), in the
        operator's dtype (promoted losslessly if it had a lower precision).
    xp
        The array namespace (the operator's).
    is_vector : bool
        Whether the input was a single vector ``(n,)`` (else a matrix ``(n, k)``).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> checked = aslinearoperator(np.eye(3)).check_input(np.ones(3, dtype=np.float32))
    >>> checked.is_vector, checked.num_columns, checked.matrix.shape, str(checked.array.dtype)
    (True, 1, (3, 1), 'float64')
    """

    array: Any
    xp: Any
    is_vector: bool

    @property
    def num_columns(self) -> int:
        """``k``: the number of vectors (1 for a single vector)."""
        return 1 if self.is_vector else int(self.array.shape[1])

    @property
    def matrix(self):
        """The array as an ``(n, k)`` matrix (a vector as one column)."""
        return self.array[:, None] if self.is_vector else self.array

    def restore(self, Y):
        """Give an ``(m, k)`` result the input's form: ``(m,)`` for a vector input."""
        return Y[:, 0] if self.is_vector else Y


class LinearOperator:
    """A matrix that is only available through its products with vectors.

    Subclasses call ``super().__init__`` and implement ``_matmat(X)`` (and
    ``_rmatmat(X)`` unless the operator is symmetric). Inputs reaching ``_matmat``
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
    symmetric : bool, optional
        Whether the operator equals its adjoint; then ``adjoint()`` is ``self``
        and ``_rmatmat`` defaults to ``_matmat``. Default: ``False``, or ``True``
        when ``psd=True``.
    psd : bool, optional
        Declare the operator symmetric positive semi-definite (not checked; it
        implies ``symmetric``, and ``psd=True`` with ``symmetric=False`` is a
        contradiction that raises :class:`ValueError`). Without a declaration,
        :attr:`is_psd` is derived from the structure (the hook ``_infer_psd()``).

    Attributes
    ----------
    is_symmetric : bool
        Whether the operator is known to equal its adjoint (declared with
        ``symmetric`` or ``psd``, or derived by the algebra); ``False`` means *not
        known*. Every operator has it, like the property :attr:`is_psd`.

    Notes
    -----
    Vectors are 1-D ``(n,)``, matrices of vectors ``(n, k)``. Results come back in
    the input's namespace and device. An input of lower precision than the
    operator (or an integer array) is promoted to the operator's dtype; an input of
    higher precision raises :class:`TypeError` rather than being downcast.

    The structure tags ``is_symmetric`` and :attr:`is_psd` tell the solvers what
    they may assume (see :doc:`the solvers' rules </api/solvers>`): ``True`` means
    declared or derived, ``False`` only "not known". Subclasses whose structure
    implies positive semi-definiteness from their data (a diagonal with non-negative
    entries, say) override ``_infer_psd()``; it runs once, on first access.

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

    Structure tags, declared and derived:

    >>> S = aslinearoperator(np.array([[2.0, 1.0], [1.0, 3.0]]), psd=True)
    >>> S.is_symmetric, S.is_psd, (2 * S).damped(0.1).is_psd, (-S).is_psd
    (True, True, True, False)
    >>> A.is_symmetric, (A.T @ A).is_psd
    (False, True)
    """

    # Make NumPy's ``x @ A`` defer to ``A.__rmatmul__`` instead of wrapping the
    # operator in an object array.
    __array_ufunc__ = None

    def __init__(self, shape, *, dtype, xp, device=None, symmetric=None, psd=None):
        shape = tuple(shape)
        if len(shape) != 2 or not all(isinstance(s, numbers.Integral) and s >= 0 for s in shape):
            raise ValueError(f"shape must be a pair of non-negative integers, got {shape}.")
        if not xp.isdtype(dtype, "real floating"):
            raise TypeError(f"Operators are real floating; got dtype {dtype_name(dtype)}.")
        psd = bool(psd)
        if symmetric is None:
            symmetric = psd
        elif psd and not symmetric:
            raise ValueError(
                f"{type(self).__name__}: psd=True with symmetric=False is a contradiction; "
                "curvlinops calls an operator positive semi-definite only if it is "
                "symmetric. Pass symmetric=True (or leave it out)."
            )
        if symmetric and shape[0] != shape[1]:
            raise ValueError(f"A symmetric operator must be square, got shape {shape}.")
        self._shape = (int(shape[0]), int(shape[1]))
        self._dtype = dtype
        self._xp = xp
        self._device = device
        self.is_symmetric = bool(symmetric)
        self._psd = True if psd else None  # None: not declared, derived on first access

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

    @property
    def is_psd(self) -> bool:
        """Whether the operator is known to be symmetric positive semi-definite.

        ``True`` if it was declared (``psd=True``) or follows from the operator's
        structure (the hook ``_infer_psd()``, evaluated once); ``False`` means *not known*
        (the operator may still be PSD). Always ``False`` for a non-symmetric operator.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import DiagonalLinearOperator
        >>> DiagonalLinearOperator(np.array([1.0, 0.0])).is_psd
        True
        >>> DiagonalLinearOperator(np.array([1.0, -1.0])).is_psd
        False
        """
        if self._psd is None:
            self._psd = bool(self.is_symmetric and self._infer_psd())
        return self._psd

    def _infer_psd(self) -> bool:
        """Whether the structure implies PSD (called once, only for symmetric operators).

        The default knows nothing and returns ``False``; structured subclasses
        override it (it may look at the operator's data, e.g. signs of eigenvalues).
        """
        return False

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
        x = self.check_input(x, ndim=1, what="vector").array
        return self._matmat(x[:, None])[:, 0]

    def matmat(self, X):
        """``A @ X`` for ``X`` of shape ``(n, k)``, in one batched pass."""
        return self._matmat(self.check_input(X, ndim=2, what="matrix").array)

    def rmatvec(self, x):
        """``A^T @ x`` for ``x`` of shape ``(m,)``."""
        x = self.check_input(x, adjoint=True, ndim=1, what="vector").array
        return self._rmatmat(x[:, None])[:, 0]

    def rmatmat(self, X):
        """``A^T @ X`` for ``X`` of shape ``(m, k)``."""
        return self._rmatmat(self.check_input(X, adjoint=True, ndim=2, what="matrix").array)

    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            return ProductLinearOperator(self, other)
        ndim = getattr(other, "ndim", None)
        if ndim == 1:
            return self.matvec(other)
        if ndim == 2:
            return self.matmat(other)
        if isinstance(other, (list, tuple)):
            raise TypeError(
                f"A @ x needs x as an array of the operator's library "
                f"({namespace_name(self.xp)}), got a Python {type(other).__name__}. Convert "
                "it first, e.g. A @ xp.asarray(x, dtype=A.dtype)."
            )
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

    def check_input(self, X, *, adjoint=False, ndim=None, what="input") -> CheckedInput:
        """Validate an array for a product with the operator (or its adjoint).

        The one check of arrays handed to an operator, used by its products and by
        every solver (right-hand sides, initial guesses, start vectors): namespace,
        shape, dtype and device. An input of lower precision than the operator (or an
        integer array) is promoted to the operator's dtype; nothing else is converted.

        Parameters
        ----------
        X
            An array ``(n,)`` or ``(n, k)`` (``n = shape[1]``; ``shape[0]`` with
            ``adjoint=True``).
        adjoint : bool
            Check for a product with the adjoint ``A^T`` instead of ``A``.
        ndim : {None, 1, 2}
            Require a vector (1) or a matrix (2); ``None`` accepts both.
        what : str
            How the array is called in error messages (``"right-hand side b"``).

        Returns
        -------
        CheckedInput
            ``(array, xp, is_vector)``: the validated array in the operator's dtype,
            the namespace, and whether it was a vector; ``.matrix`` gives it as
            ``(n, k)``, ``.restore(Y)`` turns an ``(m, k)`` result back into the input's
            form.

        Raises
        ------
        TypeError
            ``X`` is not an array, is an array of another library than the operator's,
            or has a dtype the operator cannot take without losing precision.
        ValueError
            ``X`` has the wrong shape, or lives on another device.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import aslinearoperator
        >>> A = aslinearoperator(np.ones((2, 3)))
        >>> A.check_input(np.ones((3, 4))).num_columns
        4
        >>> A.check_input(np.ones(2), adjoint=True).is_vector
        True
        >>> A.check_input(np.ones(2), what="right-hand side b")
        Traceback (most recent call last):
        ...
        ValueError: DenseLinearOperator of shape (2, 3) expected a right-hand side b of
        shape (3,) or (3, k), got shape (2,).
        """
        xp = self.xp
        if not (hasattr(X, "ndim") and hasattr(X, "shape") and hasattr(X, "dtype")):
            raise TypeError(
                f"{type(self).__name__} expected the {what} to be an array of its library "
                f"({namespace_name(xp)}), got a {type(X).__name__}."
            )
        assert_same_namespace(xp, X, what=what)
        n = self.shape[0] if adjoint else self.shape[1]
        expected = {1: f"({n},)", 2: f"({n}, k)", None: f"({n},) or ({n}, k)"}[ndim]
        allowed = (1, 2) if ndim is None else (ndim,)
        if X.ndim not in allowed or X.shape[0] != n:
            raise ValueError(
                f"{type(self).__name__} of shape {self.shape} expected {_a(what)} {what} of shape "
                f"{expected}, got shape {tuple(X.shape)}."
            )
        if X.dtype != self.dtype:
            if xp.isdtype(X.dtype, "complex floating") and not xp.isdtype(
                self.dtype, "complex floating"
            ):
                raise TypeError(
                    f"{type(self).__name__} is a real ({dtype_name(self.dtype)}) operator and "
                    f"takes real {what}s; got a {dtype_name(X.dtype)} one. Apply it to the real "
                    "and imaginary parts separately: A @ x.real + 1j * (A @ x.imag)."
                )
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
        return CheckedInput(X, xp, X.ndim == 1)

    # -- algebra -------------------------------------------------------------------

    def adjoint(self) -> LinearOperator:
        """The adjoint (transpose, for these real operators), lazily."""
        if self.is_symmetric:
            return self
        return AdjointLinearOperator(self)

    @property
    def T(self) -> LinearOperator:
        """The transpose, same as :meth:`adjoint`."""
        return _remember_adjoint(self.adjoint(), self)

    @property
    def H(self) -> LinearOperator:
        """The conjugate transpose, same as :meth:`adjoint` for real operators."""
        return _remember_adjoint(self.adjoint(), self)

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

        A NumPy operator's products run on the arrays SciPy passes. An operator on any
        other backend (PyTorch, JAX, array-api-strict, CuPy) works through **host
        copies**: each product converts SciPy's NumPy input to the operator's backend
        and device, applies the operator, and copies the result back to a NumPy array.
        That costs a transfer per product (host to device and back on a GPU): it is
        meant for SciPy interop (``eigsh``, ``cg``, ``svds``), not for hot loops, for
        which curvlinops' own solvers work on the operator's arrays directly. For a
        CuPy operator, :meth:`to_cupyx` gives a SciPy-style operator without copies.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import aslinearoperator
        >>> A = aslinearoperator(np.diag([1.0, 2.0])).to_scipy()
        >>> (A @ np.ones(2)).tolist()
        [1.0, 2.0]
        >>> import array_api_strict as xps
        >>> B = aslinearoperator(xps.asarray([[1.0, 0.0], [0.0, 2.0]])).to_scipy()
        >>> (B @ np.ones(2)).tolist()  # NumPy in and out
        [1.0, 2.0]
        """
        if not is_numpy_namespace(self.xp):
            return _host_copy_scipy_operator(self)
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


#: adjoint operator -> the operator it is the adjoint of (set by ``.T`` / ``.H``). Keyed
#: by identity and held weakly: an operator built by copying the adjoint's attributes
#: (a rewrapped inverse or adjoint of it) is not in it, and pickling or copying an
#: operator does not carry (or choke on) the mark.
_ADJOINT_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _remember_adjoint(adjoint, operator):
    """Mark ``adjoint`` as the adjoint of ``operator`` (so that ``A.T @ A`` is seen as PSD)."""
    if adjoint is not operator:
        _ADJOINT_OF[adjoint] = operator
    return adjoint


def _marked_adjoint_of(op):
    """The operator that ``op`` itself was marked the adjoint of, or None."""
    return _ADJOINT_OF.get(op)


def _are_adjoints(left, right) -> bool:
    """Whether ``left`` is known to be the adjoint of ``right`` (structurally, no data)."""
    if left is right:
        return left.is_symmetric
    return (
        _marked_adjoint_of(left) is right
        or _marked_adjoint_of(right) is left
        or (isinstance(left, AdjointLinearOperator) and left.operator is right)
        or (isinstance(right, AdjointLinearOperator) and right.operator is left)
    )


def _is_gram_product(ops) -> bool:
    """``B_1^T ... B_j^T [M] B_j ... B_1``: adjoint pairs around a symmetric middle."""
    count = len(ops)
    if not all(_are_adjoints(ops[i], ops[count - 1 - i]) for i in range(count // 2)):
        return False
    return count % 2 == 0 or ops[count // 2].is_symmetric


def _same_device(a, b) -> bool:
    if a == b:
        return True
    # Devices match by name: torch.device("cpu") != "cpu", and PyTorch reports 'cuda:0'
    # for arrays while users may say 'cuda' (or 'cpu:0' for 'cpu').
    sa, sb = str(a), str(b)
    return sa == sb or sa + ":0" == sb or sb + ":0" == sa


def _common_backend(ops, what):
    """Check that operators share namespace and dtype; return (xp, dtype, device)."""
    first = ops[0]
    for op in ops[1:]:
        if namespace_name(op.xp) != namespace_name(first.xp):
            mine, theirs = namespace_name(first.xp), namespace_name(op.xp)
            raise TypeError(
                f"Cannot form the {what} of {_a(mine)} {mine} operator and "
                f"{_a(theirs)} {theirs} operator."
            )
        if op.dtype != first.dtype:
            raise TypeError(
                f"Cannot form the {what} of operators of dtypes {dtype_name(first.dtype)} "
                f"and {dtype_name(op.dtype)}; build both in one dtype."
            )
    return first.xp, first.dtype, first.device


class ScaledLinearOperator(LinearOperator):
    """``c * A`` for a real scalar ``c``.

    Symmetric if ``A`` is; PSD if ``A`` is and ``c >= 0``.

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

    def _infer_psd(self):
        return self.scalar >= 0 and self.operator.is_psd

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
            if damping == 0:
                raise ZeroDivisionError("The operator is scaled by zero and has no inverse.")
            # (0 A + d I)^{-1} = (1/d) I
            return _ScalarLinearOperator(self.shape[0], 1.0 / float(damping), like=self)
        # (cA + dI)^{-1} = (1/c) (A + (d/c) I)^{-1}
        try:
            inner = self.operator.inverse(damping=damping / c)
        except FactorizationError as err:  # A's damping d/c is c A's damping d
            raise err.with_context(f"{c} times the operator", damping_scale=c) from err
        return ScaledLinearOperator(inner, 1.0 / c)

    def trace(self):
        return self.scalar * self.operator.trace()

    def eigvalsh(self):
        return self.scalar * self.operator.eigvalsh()

    def diagonal(self):
        return self.scalar * self.operator.diagonal()

    def _logdet(self, damping):
        c = self.scalar
        if c == 0 and damping != 0:
            return _ScalarLinearOperator(self.shape[0], float(damping), like=self)._logdet(0.0)
        # det(c A + d I) = c^n det(A + (d/c) I): for c < 0 and n even, c^n > 0, so it is
        # positive exactly when det(A + (d/c) I) is, and A's logdet decides (or raises).
        if c == 0 or (c < 0 and self.shape[0] % 2 == 1):
            raise NotImplementedError(
                "logdet of an operator of odd dimension scaled by a negative number (or by "
                "zero, undamped) needs the sign of the unscaled operator's determinant; take "
                "the logdet of the unscaled operator."
            )
        import math

        try:
            inner = self.operator._logdet(damping / c)
        except FactorizationError as err:
            raise err.with_context(f"{c} times the operator", damping_scale=c) from err
        return self.shape[0] * math.log(abs(c)) + inner

    def frobenius_norm(self):
        return abs(self.scalar) * self.operator.frobenius_norm()

    def to_dense(self):
        return self.scalar * self.operator.to_dense()


class _ScalarLinearOperator(LinearOperator):
    """``c I`` on the backend of ``like`` (what ``(0 A + d I)^{-1}`` is: ``(1/d) I``)."""

    def __init__(self, n, scalar, *, like):
        super().__init__((n, n), dtype=like.dtype, xp=like.xp, device=like.device, symmetric=True)
        self.scalar = float(scalar)

    def _infer_psd(self):
        return self.scalar >= 0

    def _matmat(self, X):
        return self.scalar * X

    def inverse(self, damping=0.0):
        shifted = self.scalar + float(damping)
        if shifted == 0:
            raise FactorizationError(
                f"{self.scalar} I plus {damping} I is the zero matrix and has no inverse."
            )
        return _ScalarLinearOperator(self.shape[0], 1.0 / shifted, like=self)

    def _eye(self):
        return self.xp.eye(self.shape[0], dtype=self.dtype, device=self.device)

    def trace(self):
        return self.xp.sum(self.diagonal())

    def diagonal(self):
        return self.xp.full((self.shape[0],), self.scalar, dtype=self.dtype, device=self.device)

    def eigvalsh(self):
        return self.diagonal()

    def _logdet(self, damping):
        # as IdentityLinearOperator: singular raises, a negative determinant too
        shifted = self.scalar + float(damping)
        if shifted == 0:
            raise FactorizationError(f"{self.scalar} I plus {damping} I is singular.")
        if shifted < 0 and self.shape[0] % 2 == 1:
            raise ValueError(
                f"{shifted} I has a negative determinant; logdet is defined here for "
                "matrices of positive determinant only."
            )
        import math

        value = self.shape[0] * math.log(abs(shifted))
        return self.xp.asarray(value, dtype=self.dtype, device=self.device)

    def frobenius_norm(self):
        return self.xp.linalg.vector_norm(self.diagonal())

    def to_dense(self):
        return self.scalar * self._eye()


class SumLinearOperator(LinearOperator):
    """``A_1 + A_2 + ...`` of operators of one shape, namespace and dtype.

    Symmetric if every term is; PSD if every term is.

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

    def _infer_psd(self):
        return all(op.is_psd for op in self.operators)

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

    A product of the form ``B^T M B`` (``B^T`` written as ``B.T``, ``B.H`` or
    ``AdjointLinearOperator(B)``, or ``B`` symmetric; nested pairs around ``M`` too) is
    symmetric when ``M`` is and PSD when ``M`` is (``B^T B``: always).

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
        super().__init__(
            (ops[0].shape[0], ops[-1].shape[1]),
            dtype=dtype,
            xp=xp,
            device=dev,
            symmetric=_is_gram_product(ops),
        )
        self.operators = tuple(ops)

    def _infer_psd(self):
        ops = self.operators
        return len(ops) % 2 == 0 or ops[len(ops) // 2].is_psd

    def _matmat(self, X):
        for op in reversed(self.operators):
            X = op._matmat(X)
        return X

    def _rmatmat(self, X):
        for op in self.operators:
            X = op._rmatmat(X)
        return X

    def adjoint(self):
        if self.is_symmetric:
            return self
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
    """``A^T`` of an operator, lazily (products swap ``_matmat`` and ``_rmatmat``).

    Has ``A``'s structure tags (``A^T = A`` when ``A`` is symmetric).
    """

    def __init__(self, operator: LinearOperator):
        m, n = operator.shape
        super().__init__(
            (n, m),
            dtype=operator.dtype,
            xp=operator.xp,
            device=operator.device,
            symmetric=operator.is_symmetric,
        )
        self.operator = operator

    def _infer_psd(self):
        return self.operator.is_psd

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

    Symmetric if ``A`` is; PSD if ``A`` is and ``damping >= 0``. Structured operators
    invert and take log-determinants of it exactly through
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

    def _infer_psd(self):
        return self.damping >= 0 and self.operator.is_psd

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


def _host_copy_scipy_operator(op: LinearOperator):
    """A SciPy operator over NumPy arrays for an operator on any other backend.

    Each product copies SciPy's input to the operator's backend and device and the
    result back to the host (:meth:`LinearOperator.to_scipy` documents the cost).
    """
    import numpy as np
    import scipy.sparse.linalg

    xp, dev = op.xp, op.device

    def to_operator(x):
        # C-contiguous and writable: PyTorch warns about read-only NumPy buffers.
        x = np.require(x, requirements=("C", "W"))
        return xp.asarray(x) if dev is None else xp.asarray(x, device=dev)

    def to_host(y):
        # Writable: NumPy views of JAX arrays are read-only.
        return np.require(to_numpy(y), requirements=("W",))

    def product(method, flat):
        def apply(x):
            x = np.ravel(x) if flat else x
            return to_host(method(to_operator(x)))

        return apply

    return scipy.sparse.linalg.LinearOperator(
        op.shape,
        matvec=product(op.matvec, True),
        rmatvec=product(op.rmatvec, True),
        matmat=product(op.matmat, False),
        rmatmat=product(op.rmatmat, False),
        dtype=np.dtype(dtype_name(op.dtype)),
    )
