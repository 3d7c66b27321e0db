"""Checks of linear operators with random probes: symmetry, adjoint, positive semi-definiteness.

Each check draws a few random probe vectors as one ``(n, k)`` block (one batched
product), and reports an error relative to the norms involved, so that the
tolerances are about rounding, not about the operator's scale.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``._common``, ``.report``.
"""

from __future__ import annotations

import math

from .._backend import RandomGenerator, dtype_eps
from ..linalg import LinearOperator, aslinearoperator
from ._common import dot_product_error
from .report import VerificationReport

__all__ = ["check_symmetric", "check_adjoint", "check_psd"]


def check_symmetric(A, *, num_probes=3, seed=0, rtol=None):
    """Test ``x^T A y = y^T A x`` for random probes ``x``, ``y``.

    Parameters
    ----------
    A : LinearOperator or 2-D array
        Square operator (arrays are wrapped with :func:`curvlinops.aslinearoperator`).
    num_probes : int
        Number of probe pairs, applied as one matmat each side.
    seed : int
        Seed of the probes.
    rtol : float, optional
        Allowed ``|x^T A y - y^T A x| / (|x| |A y| + |y| |A x|)``; default ``sqrt(eps)``.

    Returns
    -------
    VerificationReport
        Named ``"symmetry"``.

    Examples
    --------
    >>> import numpy as np
    >>> check_symmetric(np.array([[2.0, 1.0], [1.0, 3.0]])).passed
    True
    >>> check_symmetric(np.array([[2.0, 1.0], [0.0, 3.0]])).passed
    False
    """
    A, rtol, generator = _setup(A, seed, rtol)
    n = A.shape[1]
    if A.shape[0] != n:
        return VerificationReport("symmetry", False, math.inf, rtol, f"not square: {A.shape}")
    X = generator.normal((n, num_probes), A.dtype)
    Y = generator.normal((n, num_probes), A.dtype)
    error = dot_product_error(A.xp, X, A.matmat(Y), A.matmat(X), Y)
    details = f"x^T A y = y^T A x for {num_probes} random pairs"
    return VerificationReport.from_error("symmetry", error, rtol, details)


def check_adjoint(A, *, num_probes=3, seed=0, rtol=None):
    """Dot-product test of an operator's adjoint: ``<y, A x> = <A^T y, x>``.

    Checks ``rmatmat`` against ``matmat`` with random probes.

    Parameters
    ----------
    A : LinearOperator or 2-D array
        Operator with ``matmat`` and ``rmatmat``.
    num_probes, seed
        As in :func:`check_symmetric`.
    rtol : float, optional
        Allowed ``|<y, A x> - <A^T y, x>| / (|y| |A x| + |A^T y| |x|)``; default
        ``sqrt(eps)``.

    Returns
    -------
    VerificationReport
        Named ``"adjoint"``. An operator without an adjoint product fails with a
        message saying so.

    Examples
    --------
    >>> import numpy as np
    >>> check_adjoint(np.arange(6.0).reshape(2, 3)).passed
    True
    """
    A, rtol, generator = _setup(A, seed, rtol)
    m, n = A.shape
    X = generator.normal((n, num_probes), A.dtype)
    Y = generator.normal((m, num_probes), A.dtype)
    try:
        ATY = A.rmatmat(Y)
    except NotImplementedError as err:
        return VerificationReport("adjoint", False, math.inf, rtol, f"no adjoint product: {err}")
    if tuple(ATY.shape) != (n, num_probes):
        details = f"rmatmat returned shape {tuple(ATY.shape)}, expected {(n, num_probes)}"
        return VerificationReport("adjoint", False, math.inf, rtol, details)
    error = dot_product_error(A.xp, Y, A.matmat(X), ATY, X)
    details = f"dot-product test <y, A x> = <A^T y, x>, {num_probes} random pairs"
    return VerificationReport.from_error("adjoint", error, rtol, details)


def check_psd(A, *, num_probes=10, seed=0, tol=None, lanczos_steps=20):
    """Probe positive semi-definiteness: ``v^T A v >= -tol * |A|``.

    Two sources of evidence, both lower-bounded by the smallest eigenvalue: the
    Rayleigh quotients of random probes, and the smallest Ritz value of a few
    Lanczos steps (with full reorthogonalization), which finds negative directions
    that random probes miss. A Ritz value below ``-tol * |A|`` proves ``A`` is not
    PSD; passing is evidence, not proof (a small negative eigenvalue can hide).

    Parameters
    ----------
    A : LinearOperator or 2-D array
        Symmetric operator.
    num_probes : int
        Number of random probes (one matmat).
    seed : int
        Seed of the probes and the Lanczos start vector.
    tol : float, optional
        Allowed negativity relative to ``|A|`` (estimated from the probes and the
        Ritz values); default ``sqrt(eps)``.
    lanczos_steps : int
        Lanczos steps (one matvec each); 0 disables.

    Returns
    -------
    VerificationReport
        Named ``"psd"``; its error is ``max(0, -lambda_found) / |A|``.

    Examples
    --------
    >>> import numpy as np
    >>> check_psd(np.diag([3.0, 1.0, 0.0])).passed
    True
    >>> print(check_psd(np.diag([3.0, 1.0, -0.5])))
    [FAIL] psd: error 1.667e-01 > tolerance ... (smallest Rayleigh quotient ...)
    """
    A, tol, generator = _setup(A, seed, tol)
    xp = A.xp
    n = A.shape[1]
    if A.shape[0] != n:
        return VerificationReport("psd", False, math.inf, tol, f"not square: {A.shape}")
    X = generator.normal((n, num_probes), A.dtype)
    AX = A.matmat(X)
    sq_norms = xp.sum(X * X, axis=0)
    smallest_rayleigh = float(xp.min(xp.sum(X * AX, axis=0) / sq_norms))
    scale = float(xp.max(xp.sqrt(xp.sum(AX * AX, axis=0) / sq_norms)))
    smallest = smallest_rayleigh
    details = f"smallest Rayleigh quotient {smallest_rayleigh:.3e} of {num_probes} probes"
    if lanczos_steps > 0:
        ritz_min, ritz_max = _extreme_ritz_values(A, lanczos_steps, generator)
        smallest = min(smallest, ritz_min)
        scale = max(scale, abs(ritz_min), abs(ritz_max))
        details += f", smallest Ritz value {ritz_min:.3e} after {lanczos_steps} Lanczos steps"
    details += f", |A| >= {scale:.3e}"
    error = 0.0 if scale == 0 else max(0.0, -smallest) / scale
    return VerificationReport.from_error("psd", error, tol, details)


# -- helpers -------------------------------------------------------------------------


def _setup(A, seed, tol):
    if not isinstance(A, LinearOperator):
        A = aslinearoperator(A)
    tol = math.sqrt(dtype_eps(A.dtype)) if tol is None else tol
    return A, tol, RandomGenerator(seed, A.xp, A.device)


def _extreme_ritz_values(A, steps, generator):
    """Smallest and largest Ritz values of ``steps`` Lanczos steps (full reorthogonalization).

    The loop over steps is the algorithm itself (each step needs the previous
    vector); the basis is kept to reorthogonalize, which is affordable for the few
    steps a check takes. It lives in a fixed ``(n, steps)`` array whose unused
    columns are zero, so every step has the same shapes (libraries that compile per
    shape, like JAX, compile once).
    """
    xp = A.xp
    n = A.shape[0]
    steps = min(int(steps), n)
    column_ids = xp.arange(steps, device=A.device)
    q = generator.normal((n,), A.dtype)
    q = q / xp.sqrt(xp.sum(q * q))
    Q = xp.zeros((n, steps), dtype=A.dtype, device=A.device)
    alphas, betas = [], []
    for j in range(steps):
        Q = Q + q[:, None] * xp.astype(column_ids == j, A.dtype)[None, :]
        w = A.matvec(q)
        alphas.append(float(xp.sum(w * q)))
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - Q @ (xp.matrix_transpose(Q) @ w)
        beta = float(xp.sqrt(xp.sum(w * w)))
        scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
        if j == steps - 1 or beta <= 100 * dtype_eps(A.dtype) * max(scale, 1e-300):
            break  # an invariant subspace: its Ritz values are eigenvalues
        betas.append(beta)
        q = w / beta
    k = len(alphas)
    rows = [
        [alphas[i] if i == j else (betas[min(i, j)] if abs(i - j) == 1 else 0.0) for j in range(k)]
        for i in range(k)
    ]
    T = xp.asarray(rows, dtype=A.dtype, device=A.device)
    ritz = xp.linalg.eigvalsh(T)
    return float(xp.min(ritz)), float(xp.max(ritz))
