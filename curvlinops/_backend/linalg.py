"""Workarounds for what the array API standard lacks.

The standard has no ``kron``, ``diag`` (building a diagonal matrix),
``solve_triangular``, ``einsum`` or functional index updates, and its
``cholesky``/``eigh`` do not report failure. Each gap is filled here once, with the
fastest native call where a library has one and a standard-only fallback otherwise,
so that the layers above stay free of library-specific code.

It is also the one place that says when a matrix counts as singular
(:func:`check_invertible_spectrum`, the rule of :class:`~curvlinops.FactorizationError`): every
exact inverse and log-determinant of :mod:`curvlinops.linalg` and of the curvature
operators built from it applies that rule.

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
    "check_invertible_spectrum",
    "singular_tolerance",
]

DAMPING_HINT = "Add damping, e.g. A.inverse(damping=1e-3) or A.damped(1e-3).logdet()."


class FactorizationError(ValueError):
    """A matrix could not be inverted or factorized (singular, indefinite, or not finite).

    The message names the matrix (e.g. the factor and layer) that failed and suggests
    damping.

    Notes
    -----
    **When a matrix counts as singular** (one rule, for every exact ``inverse`` and
    ``logdet`` of :mod:`curvlinops.linalg` and of the curvature operators). Let
    ``v`` be the spectrum of the matrix about to be inverted, damping included: its
    eigenvalues (diagonal entries for a diagonal matrix, singular values for a
    non-symmetric dense matrix; the products of the factors' eigenvalues plus the
    damping for a Kronecker product), and let ``n`` be the dimension of the largest
    matrix that was factorized to obtain ``v`` (the matrix itself; the largest factor
    of a Kronecker product; each block of a block-diagonal operator is judged on its
    own). The matrix is singular when

    ``min |v| <= n * eps * max |v|``   (``eps``: machine epsilon of the dtype),

    i.e. when its condition number reaches ``1 / (n eps)``, the point below which a
    computed eigenvalue cannot be told apart from zero (the tolerance of
    ``numpy.linalg.matrix_rank``). A zero matrix is singular; NaN or Inf raise too.
    Then the operator raises this error ("add damping") instead of returning entries
    of the size ``1 / (n eps)``. :func:`check_invertible_spectrum` implements it. (The
    Woodbury inverse of ``DiagonalPlusLowRankLinearOperator`` applies it to its diagonal
    part and needs a positive definite ``k x k`` capacitance matrix.)
    """


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


def singular_tolerance(values, xp, *, size):
    """``size * eps * max|values|``: magnitudes at or below it count as zero.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> tol = singular_tolerance(np.array([1.0, -4.0]), xp, size=2)
    >>> bool(tol == 2 * np.finfo(float).eps * 4.0)
    True
    """
    from .namespace import dtype_eps

    magnitudes = xp.abs(xp.reshape(values, (-1,)))
    if magnitudes.shape[0] == 0:
        return xp.asarray(0.0, dtype=values.dtype, device=_device(values))
    return max(int(size), 1) * dtype_eps(values.dtype) * xp.max(magnitudes)


def check_invertible_spectrum(values, xp, *, size, what, hint=DAMPING_HINT):
    """Raise ``FactorizationError`` unless ``values`` is the spectrum of an invertible matrix.

    The rule of :class:`~curvlinops.FactorizationError`: the matrix is singular when
    ``min|values| <= size * eps * max|values|``; NaN or Inf entries raise too.

    Parameters
    ----------
    values
        Eigenvalues (or diagonal entries, or singular values) of the matrix to be
        inverted, damping included; any shape.
    xp
        Their namespace.
    size : int
        Dimension of the largest matrix factorized to obtain ``values``.
    what : str
        The matrix, as the message names it (e.g. ``"Kronecker product plus 0.1 I"``).
    hint : str
        What to do, appended to the message.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> check_invertible_spectrum(np.array([1.0, 1e-3]), xp, size=2, what="factor")
    >>> check_invertible_spectrum(np.array([1.0, 1e-17]), xp, size=2, what="factor")
    Traceback (most recent call last):
    ...
    curvlinops._backend.linalg.FactorizationError: The factor is singular: an eigenvalue ...
    """
    magnitudes = xp.abs(xp.reshape(values, (-1,)))
    if not all_finite(magnitudes, xp):
        raise FactorizationError(f"The {what} contains NaN or Inf; it cannot be inverted.")
    if magnitudes.shape[0] == 0:
        return
    tol = singular_tolerance(magnitudes, xp, size=size)
    smallest = xp.min(magnitudes)
    if bool(smallest <= tol):
        largest = float(xp.max(magnitudes))
        raise FactorizationError(
            f"The {what} is singular: an eigenvalue of magnitude {float(smallest):.3g} is "
            f"zero to working precision (at most {size} * eps * {largest:.3g}, the largest "
            f"magnitude). {hint}"
        )


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
