"""Workarounds for what the array API standard lacks.

The standard has no ``kron``, ``diag`` (building a diagonal matrix),
``solve_triangular``, ``einsum`` or functional index updates, and its
``cholesky``/``eigh`` do not report failure. Each gap is filled here once, with the
fastest native call where a library has one and a standard-only fallback otherwise,
so that the layers above stay free of library-specific code.

It also defines :class:`~curvlinops.FactorizationError`; when a matrix is too
ill-conditioned to invert (the rule every exact inverse applies) is decided in
``.conditioning``.

May import: ``.namespace``, and lazily scipy, cupyx, torch, jax.
"""

from __future__ import annotations

from .namespace import (
    is_cupy_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
)

__all__ = [
    "FactorizationError",
    "diag_matrix",
    "kron",
    "solve_triangular",
    "checked_cholesky",
    "checked_eigh",
    "index_update",
    "all_finite",
    "is_numerically_symmetric",
]

DAMPING_HINT = "Add damping, e.g. A.inverse(damping=1e-3) or A.damped(1e-3).logdet()."


class FactorizationError(ValueError):
    """A matrix could not be inverted or factorized (singular, indefinite, or not finite).

    The message names the matrix (e.g. the factor and layer) that failed and suggests
    damping.

    Notes
    -----
    **When a matrix cannot be inverted** (one rule, for every exact ``inverse`` and
    ``logdet`` of :mod:`curvlinops.linalg` and of the curvature operators, and for
    K-FAC's factored inverse): when the condition number of its spectrum, damping
    included, is beyond what the dtype resolves, ``cond > tolerance / (sqrt(n) eps)``
    with ``tolerance = 0.1`` by default. Then the operator raises the subclass
    :class:`~curvlinops.IllConditionedError`, whose message gives the condition number
    and the damping that suffices; :class:`~curvlinops.conditioning` states the rule,
    the policy on negative damping, and how to get a warning instead. NaN or Inf raise
    this class itself, and so does a failed Cholesky factorization or an
    eigendecomposition that does not converge.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import DenseLinearOperator, FactorizationError
    >>> A = DenseLinearOperator(np.array([[1.0, 1.0], [1.0, 1.0]]), symmetric=True)
    >>> try:
    ...     A.inverse()
    ... except FactorizationError as err:
    ...     print(str(err)[:52])
    The 2x2 dense matrix is singular to working precisio
    >>> bool(np.allclose(A.inverse(0.5).to_dense() @ (A.to_dense() + 0.5 * np.eye(2)), np.eye(2)))
    True
    """

    def with_context(self, prefix: str, *, damping_scale: float = 1.0):
        """The same error with ``prefix`` before its message (``damping_scale``: see
        :meth:`IllConditionedError.with_context`; unused here).

        Examples
        --------
        >>> str(FactorizationError("not finite").with_context("Block 1"))
        'Block 1: not finite'
        """
        return FactorizationError(f"{prefix}: {self}")


def diag_matrix(v, xp):
    """Square matrix with ``v`` (shape ``(n,)``) on its diagonal.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> diag_matrix(xp.asarray([1.0, 2.0]), xp).tolist()
    [[1.0, 0.0], [0.0, 2.0]]
    """
    n = v.shape[0]
    eye = xp.eye(n, dtype=v.dtype, device=_device(v))
    return eye * v[None, :]


def kron(a, b, xp):
    """Kronecker product of two matrices by broadcasting (standard calls only).

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> a, b = np.arange(4.0).reshape(2, 2), np.arange(6.0).reshape(3, 2)
    >>> bool(np.allclose(kron(a, b, xp), np.kron(a, b)))
    True
    """
    m, n = a.shape
    p, q = b.shape
    out = a[:, None, :, None] * b[None, :, None, :]
    return xp.reshape(out, (m * p, n * q))


def solve_triangular(L, B, xp, *, lower=True):
    """Solve ``L X = B`` for triangular ``L`` of shape ``(n, n)`` and ``B`` ``(n, k)``.

    Uses the native triangular solver where the library has one (SciPy, CuPy,
    PyTorch, JAX) and a general ``linalg.solve`` otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> L = np.array([[2.0, 0.0], [1.0, 1.0]])
    >>> solve_triangular(L, np.array([[2.0], [3.0]]), xp).ravel().tolist()
    [1.0, 2.0]
    """
    if is_numpy_namespace(xp):
        import scipy.linalg

        return scipy.linalg.solve_triangular(L, B, lower=lower)
    if is_cupy_namespace(xp):
        import cupyx.scipy.linalg

        return cupyx.scipy.linalg.solve_triangular(L, B, lower=lower)
    if is_torch_namespace(xp):
        import torch

        return torch.linalg.solve_triangular(L, B, upper=not lower)
    if is_jax_namespace(xp):
        import jax.scipy.linalg

        return jax.scipy.linalg.solve_triangular(L, B, lower=lower)
    return xp.linalg.solve(L, B)


def all_finite(x, xp) -> bool:
    """Whether every entry of ``x`` is finite (one reduction, one host sync)."""
    return bool(xp.all(xp.isfinite(x)))


def is_numerically_symmetric(A, xp) -> bool:
    """Whether a square 2-D array equals its transpose up to rounding.

    ``max |A - A^T| <= 100 eps max |A|`` (``eps`` of ``A``'s dtype); an empty array is
    symmetric. The one such test of the library (solvers wrapping a dense array, the
    Kronecker product's check of a factor not declared symmetric). One pass over ``A``,
    two host syncs.
    """
    from .namespace import dtype_eps

    if A.shape[0] == 0:
        return True
    scale = float(xp.max(xp.abs(A)))
    asymmetry = float(xp.max(xp.abs(A - xp.matrix_transpose(A))))
    return asymmetry <= 100 * dtype_eps(A.dtype) * scale


def checked_cholesky(A, xp, *, name="matrix"):
    """Lower Cholesky factor of a symmetric positive definite matrix, or a clear error.

    Libraries disagree on failure (NumPy raises, PyTorch raises, JAX returns NaN);
    this function raises :class:`~curvlinops.FactorizationError` in all cases.

    Parameters
    ----------
    A
        Symmetric matrix ``(n, n)``.
    xp
        Its namespace.
    name
        Name of the factor, used in the message.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> checked_cholesky(np.array([[4.0, 0.0], [0.0, 9.0]]), xp).tolist()
    [[2.0, 0.0], [0.0, 3.0]]
    """
    try:
        L = xp.linalg.cholesky(A)
    except Exception as err:  # each library raises its own error type
        raise FactorizationError(
            f"Cholesky factorization of the {name} failed: it is not positive definite "
            "(singular or indefinite). Add damping (e.g. inverse(damping=1e-3))."
        ) from err
    if not all_finite(L, xp):
        raise FactorizationError(
            f"Cholesky factorization of the {name} failed: it is not positive definite "
            "(singular or indefinite). Add damping (e.g. inverse(damping=1e-3))."
        )
    return L


def checked_eigh(A, xp, *, name="matrix"):
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix, or a clear error.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> w, _ = checked_eigh(np.array([[2.0, 0.0], [0.0, 1.0]]), xp)
    >>> w.tolist()
    [1.0, 2.0]
    """
    if not all_finite(A, xp):
        raise FactorizationError(f"The {name} contains NaN or Inf; cannot eigendecompose it.")
    try:
        if is_numpy_namespace(xp) and A.ndim == 2:
            # SciPy's divide-and-conquer driver (LAPACK syevd) takes about half of
            # numpy.linalg.eigh's time on K-FAC-sized factors.
            import scipy.linalg

            w, Q = scipy.linalg.eigh(A, driver="evd", check_finite=False)
        else:
            w, Q = xp.linalg.eigh(A)
    except Exception as err:
        raise FactorizationError(f"Eigendecomposition of the {name} did not converge.") from err
    return w, Q


def checked_eigvalsh(A, xp, *, name="matrix"):
    """Eigenvalues (ascending) of a symmetric matrix, or a clear error.

    Without eigenvectors: on NumPy, SciPy's LAPACK ``syevd`` without vectors (the
    tridiagonal reduction alone, about 40 % of :func:`checked_eigh` on K-FAC-sized
    factors).

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> checked_eigvalsh(np.array([[2.0, 1.0], [1.0, 2.0]]), xp).tolist()
    [1.0, 3.0]
    """
    if not all_finite(A, xp):
        raise FactorizationError(f"The {name} contains NaN or Inf; cannot eigendecompose it.")
    try:
        if is_numpy_namespace(xp) and A.ndim == 2:
            import scipy.linalg

            return scipy.linalg.eigh(A, eigvals_only=True, driver="evd", check_finite=False)
        return xp.linalg.eigvalsh(A)
    except Exception as err:
        raise FactorizationError(f"Eigendecomposition of the {name} did not converge.") from err


def spd_inverse(A, xp, *, name="matrix"):
    """Inverse of a symmetric positive definite matrix, exactly symmetric, or a clear error.

    From its Cholesky factor: on NumPy LAPACK's ``potrf`` and ``potri`` (about a sixth
    of an eigendecomposition's time); elsewhere ``L^{-T} L^{-1}``, symmetrized. The caller
    judges the conditioning (the inverse itself does not).

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> spd_inverse(np.array([[4.0, 2.0], [2.0, 2.0]]), xp).tolist()
    [[0.5, -0.5], [-0.5, 1.0]]
    """
    failed = (
        f"Cholesky factorization of the {name} failed: it is not positive definite "
        "(singular or indefinite). Add damping (e.g. inverse(damping=1e-3))."
    )
    if is_numpy_namespace(xp) and A.ndim == 2:
        import numpy as np
        from scipy.linalg import lapack

        potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (A,))
        # A is symmetric: its transpose is the Fortran-ordered array LAPACK takes uncopied
        factor, info = potrf(np.array(A.T, order="F"), lower=True, overwrite_a=True)
        if info != 0:
            raise FactorizationError(failed)
        inv, info = potri(factor, lower=True, overwrite_c=True)
        if info != 0:
            raise FactorizationError(failed)
        lower = np.tril(inv)  # potri fills one triangle
        return lower + np.tril(inv, -1).T
    L = checked_cholesky(A, xp, name=name)
    eye = xp.eye(A.shape[0], dtype=A.dtype, device=_device(A))
    L_inv = solve_triangular(L, eye, xp, lower=True)
    inv = xp.matrix_transpose(L_inv) @ L_inv
    return 0.5 * (inv + xp.matrix_transpose(inv))


def index_update(x, index, value, xp):
    """Return a copy of ``x`` with ``x[index] = value`` (works on immutable JAX arrays).

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> x = np.zeros(3)
    >>> index_update(x, 1, 5.0, xp).tolist(), x.tolist()
    ([0.0, 5.0, 0.0], [0.0, 0.0, 0.0])
    """
    if is_jax_namespace(xp):
        return x.at[index].set(value)
    out = xp.asarray(x, copy=True)
    out[index] = value
    return out


def _device(x):
    from .namespace import device

    return device(x)
