"""Workarounds for what the array API standard lacks.

The standard has no ``kron``, ``diag`` (building a diagonal matrix),
``solve_triangular``, ``einsum`` or functional index updates, and its
``cholesky``/``eigh`` do not report failure. Each gap is filled here once, with the
fastest native call where a library has one and a standard-only fallback otherwise,
so that the layers above stay free of library-specific code.

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
]


class FactorizationError(ValueError):
    """A Cholesky or eigendecomposition failed (singular or indefinite input).

    The message names the factor that failed and suggests damping.
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


def checked_cholesky(A, xp, *, name="matrix"):
    """Lower Cholesky factor of a symmetric positive definite matrix, or a clear error.

    Libraries disagree on failure (NumPy raises, PyTorch raises, JAX returns NaN);
    this function raises :class:`FactorizationError` in all cases.

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
        w, Q = xp.linalg.eigh(A)
    except Exception as err:
        raise FactorizationError(f"Eigendecomposition of the {name} did not converge.") from err
    return w, Q


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
