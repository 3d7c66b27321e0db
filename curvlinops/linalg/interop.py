"""Conversion of foreign objects into curvlinops operators: :func:`aslinearoperator`.

Wrapped objects carry only the structure the user declares (``symmetric=``,
``psd=``): nothing here inspects a callable or a SciPy operator to guess it.

May import: ``curvlinops._backend``, ``.base``, ``.structured``; scipy lazily.
"""

from __future__ import annotations

from .._backend import default_float_dtype
from .base import LinearOperator
from .structured import DenseLinearOperator

__all__ = ["aslinearoperator", "CallableLinearOperator", "ScipyLinearOperator"]


class CallableLinearOperator(LinearOperator):
    """An operator from user functions ``matmat`` (preferred) or ``matvec``.

    Parameters
    ----------
    shape : tuple of int
    matvec, matmat : callable, optional
        ``matmat(X)`` maps ``(n, k)`` to ``(m, k)`` in one pass. If only
        ``matvec`` is given, a matmat applies it column by column (slow: give a
        ``matmat`` for batched work).
    rmatvec, rmatmat : callable, optional
        The adjoint products.
    dtype, xp, device
        The operator's dtype, namespace and device.
    symmetric : bool, optional
        Declare the operator symmetric (not checked); then ``rmatmat`` defaults to
        ``matmat``.
    psd : bool, optional
        Declare it symmetric positive semi-definite (not checked).

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> A = CallableLinearOperator((3, 3), matmat=lambda X: 2 * X, dtype=xp.float64,
    ...                            xp=xp, symmetric=True)
    >>> (A @ np.ones(3)).tolist()
    [2.0, 2.0, 2.0]
    """

    def __init__(
        self,
        shape,
        *,
        matvec=None,
        matmat=None,
        rmatvec=None,
        rmatmat=None,
        dtype,
        xp,
        device=None,
        symmetric=None,
        psd=None,
    ):
        if matvec is None and matmat is None:
            raise ValueError("CallableLinearOperator needs matvec or matmat.")
        super().__init__(shape, dtype=dtype, xp=xp, device=device, symmetric=symmetric, psd=psd)
        self._user_matvec, self._user_matmat = matvec, matmat
        self._user_rmatvec, self._user_rmatmat = rmatvec, rmatmat

    def _apply(self, X, matmat, matvec):
        if matmat is not None:
            return matmat(X)
        # Only a user-supplied matvec is available: one call per column.
        cols = [matvec(X[:, j]) for j in range(X.shape[1])]
        return self.xp.stack(cols, axis=1)

    def _matmat(self, X):
        return self._apply(X, self._user_matmat, self._user_matvec)

    def _rmatmat(self, X):
        if self._user_rmatmat is None and self._user_rmatvec is None:
            return super()._rmatmat(X)
        return self._apply(X, self._user_rmatmat, self._user_rmatvec)


class ScipyLinearOperator(LinearOperator):
    """Wraps a :class:`scipy.sparse.linalg.LinearOperator` (NumPy arrays).

    ``symmetric`` and ``psd`` declare structure (not checked), as in
    :func:`aslinearoperator`.
    """

    def __init__(self, A, *, symmetric=None, psd=None):
        import array_api_compat.numpy as xp

        super().__init__(
            A.shape, dtype=getattr(xp, str(A.dtype)), xp=xp, symmetric=symmetric, psd=psd
        )
        self.operator = A

    def _matmat(self, X):
        return self.operator.matmat(X)

    def _rmatmat(self, X):
        return self.operator.rmatmat(X)


def aslinearoperator(A, *, shape=None, dtype=None, xp=None, device=None, symmetric=None, psd=None):
    """Make a curvlinops :class:`LinearOperator` from a dense array, a SciPy operator,
    a callable, or an operator (returned as is).

    Parameters
    ----------
    A
        A 2-D array of any supported namespace, a ``scipy.sparse.linalg.LinearOperator``,
        a callable ``matmat`` (``X (n, k) -> (m, k)``), or a LinearOperator.
    shape, dtype, xp, device
        Needed for a callable (``dtype`` defaults to the namespace's float64).
    symmetric : bool, optional
        Declare the operator symmetric (not checked).
    psd : bool, optional
        Declare it symmetric positive semi-definite (not checked; implies
        ``symmetric``). The solvers consult both declarations (see
        :doc:`/api/solvers`). An operator ``A`` is returned as is, with its own tags.

    Examples
    --------
    >>> import numpy as np
    >>> aslinearoperator(np.eye(2)).shape
    (2, 2)
    >>> import array_api_compat.numpy as xp
    >>> B = aslinearoperator(lambda X: X[::-1], shape=(2, 2), xp=xp)
    >>> (B @ np.array([1.0, 2.0])).tolist()
    [2.0, 1.0]
    >>> C = aslinearoperator(np.array([[2.0, 1.0], [1.0, 2.0]]), psd=True)
    >>> C.is_symmetric, C.is_psd
    (True, True)
    """
    if isinstance(A, LinearOperator):
        return A
    if _is_scipy_operator(A):
        return ScipyLinearOperator(A, symmetric=symmetric, psd=psd)
    if hasattr(A, "ndim") and hasattr(A, "shape"):
        return DenseLinearOperator(A, symmetric=symmetric, psd=psd)
    if callable(A):
        if shape is None or xp is None:
            raise ValueError("aslinearoperator of a callable needs shape= and xp=.")
        dtype = default_float_dtype(xp, device) if dtype is None else dtype
        return CallableLinearOperator(
            shape, matmat=A, dtype=dtype, xp=xp, device=device, symmetric=symmetric, psd=psd
        )
    raise TypeError(
        f"aslinearoperator cannot convert a {type(A).__name__}; expected an array, a scipy "
        "LinearOperator, a callable matmat, or a curvlinops LinearOperator."
    )


def _is_scipy_operator(A) -> bool:
    try:
        import scipy.sparse.linalg
    except ImportError:  # pragma: no cover - scipy is a dependency
        return False
    return isinstance(A, scipy.sparse.linalg.LinearOperator)
