"""Preconditioned conjugate gradients for symmetric positive (semi-)definite operators.

:func:`cg` solves ``(A + damping I) x = b`` for one right-hand side ``(n,)`` or ``k`` of
them ``(n, k)``. The ``k`` systems advance together: one ``A.matmat`` (and one
``M.matmat``) per iteration for all columns, each column with its own step sizes and
its own stopping decision. It detects non-positive curvature (what Newton-CG and
Hessian-free optimizers need) and NaN/Inf produced by the operator.

Also exports :class:`SolveInfo` (the result record shared with :func:`curvlinops.minres`),
:class:`StopReason` and :class:`ConvergenceError`.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``._common``, ``._validation``.
"""

from __future__ import annotations

from .._backend import device
from ._common import (
    BREAKDOWN,
    CONVERGED,
    NEGATIVE_CURVATURE,
    NONFINITE,
    BatchProgress,
    ConvergenceError,
    ConvergenceWarning,
    SolveInfo,
    StopReason,
    coldot,
    prepare_system,
    to_host,
)
from ._validation import PSD, AssumptionWarning, warn_assumption

__all__ = [
    "cg",
    "SolveInfo",
    "StopReason",
    "ConvergenceError",
    "ConvergenceWarning",
    "AssumptionWarning",
]


def cg(A, b, x0=None, *, rtol=1e-5, atol=0.0, maxiter=None, M=None, damping=0.0, callback=None):
    """Solve ``(A + damping I) x = b`` by (preconditioned) conjugate gradients.

    Parameters
    ----------
    A : LinearOperator or array
        Square, symmetric positive (semi-)definite operator ``(n, n)``; a 2-D array is
        wrapped with :func:`curvlinops.aslinearoperator` (its symmetry checked). CG
        consults the operator's tags ``is_symmetric`` and ``is_psd`` (see Notes).
    b : array
        Right-hand side ``(n,)``, or ``k`` right-hand sides ``(n, k)`` solved together,
        in the operator's namespace. Must be finite.
    x0 : array, optional
        Initial guess of the shape of ``b`` (default zeros).
    rtol, atol : float
        Column ``j`` has converged when ``||r_j|| <= max(rtol * ||b_j||, atol)`` (the rule
        of :func:`scipy.sparse.linalg.cg`), with ``r_j`` the recursively updated residual.
    maxiter : int, optional
        Maximum number of iterations (default ``10 * n``, like SciPy).
    M : LinearOperator or array, optional
        Symmetric positive definite preconditioner that approximates the inverse of
        ``A + damping I`` (e.g. the inverse diagonal for Jacobi preconditioning); it is
        applied as ``z = M r``, like SciPy's ``M``.
    damping : float
        Solve with ``A + damping I`` instead of ``A``. Any real number: a negative one is
        meaningful here (a Newton-CG or trust-region step asks whether ``A + damping I``
        is positive definite, and a direction of non-positive curvature is reported in
        ``info``); :class:`~curvlinops.CGInverseLinearOperator`, which must return
        inverses, refuses it.
    callback : callable, optional
        ``callback(xk)`` after each iteration, with the current iterate(s) in the shape
        of ``b``.

    Returns
    -------
    x : array
        The solution, shape and namespace of ``b``, dtype of the operator.
    info : SolveInfo
        Iteration counts, residual histories, convergence flags and stop reasons (per
        column for ``(n, k)``), and the direction of negative curvature if one was met.

    Raises
    ------
    ValueError
        Non-square operator, ``b``/``x0``/``M`` of the wrong shape, NaN or Inf in ``b``
        or ``x0``, negative ``rtol``/``atol``/``maxiter``; an operator not declared
        symmetric that a random symmetry probe shows is not symmetric.
    TypeError
        ``b`` of another array library than the operator, or of a dtype it cannot take;
        a non-integer ``maxiter``, a non-number ``rtol``/``atol``/``damping``.

    Warns
    -----
    AssumptionWarning
        If the operator is not declared symmetric (after the probe passed), or is
        declared symmetric but not PSD and ``damping <= 0``; also if it is declared
        PSD and CG still met negative curvature (the declaration is wrong, or rounding
        on a singular operator: add damping).

    Notes
    -----
    Structure: CG relies on a symmetric positive definite ``A + damping I``. An
    operator declared PSD (``is_psd``: the curvature operators GGN, Fisher, K-FAC, ...,
    or ``aslinearoperator(A, psd=True)``) runs silently. Symmetric but not known PSD
    (the Hessian) runs and warns unless ``damping > 0``; non-positive curvature is then
    reported as ``StopReason.NEGATIVE_CURVATURE``, which is what Newton-CG needs. Not
    declared symmetric: one extra product with two random vectors tests symmetry
    (error if it fails, warning if it passes).

    A system stops early with reason

    - ``"negative_curvature"`` when a search direction ``p`` has ``p^T (A + damping I) p
      <= 0``: the operator is not positive definite. ``x`` is the last iterate (before
      the step along ``p``) and ``p`` is in ``info.negative_curvature_direction``;
    - ``"nonfinite"`` when the operator or preconditioner produced NaN or Inf; ``x`` is the
      last finite iterate;
    - ``"breakdown"`` when the preconditioner gives ``r^T M r <= 0``: it is not positive
      definite.

    Each iteration copies the ``k`` column scalars to the host once (for the stopping
    decisions) and otherwise does ``O(n k)`` elementwise work besides the products.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator, cg
    >>> A = aslinearoperator(np.array([[4.0, 1.0], [1.0, 3.0]]), psd=True)
    >>> x, info = cg(A, np.array([1.0, 2.0]), rtol=1e-10)
    >>> np.round(x, 6).tolist(), info.reason, info.iterations
    ([0.090909, 0.636364], StopReason.CONVERGED, 2)

    Two right-hand sides in one batch, and a damped system:

    >>> X, info = cg(A, np.eye(2), rtol=1e-10, damping=1.0)
    >>> bool(np.allclose(X, np.linalg.inv(A.to_dense() + np.eye(2))))
    True
    >>> info.reason
    [StopReason.CONVERGED, StopReason.CONVERGED]

    Non-positive curvature is reported with its direction (and a warning that the
    operator is not declared PSD, silenced here):

    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", AssumptionWarning)
    ...     x, info = cg(np.diag([1.0, -1.0]), np.array([1.0, 1.0]))
    >>> p = info.negative_curvature_direction
    >>> info.reason, bool(p @ np.diag([1.0, -1.0]) @ p <= 0)
    (StopReason.NEGATIVE_CURVATURE, True)
    >>> info.reason.remedy.split(":")[0]
    'The operator (plus damping) is not positive definite'
    """
    return _cg(A, b, x0, rtol, atol, maxiter, M, damping, callback, assumes=PSD, who="cg")


def _cg(A, b, x0, rtol, atol, maxiter, M, damping, callback, *, assumes, who):
    """:func:`cg` with the structure rule made optional (``assumes=None``: checked by
    the caller already, as :class:`~curvlinops.CGInverseLinearOperator` does once)."""
    system = prepare_system(
        who,
        A,
        b,
        x0,
        M=M,
        damping=damping,
        rtol=rtol,
        atol=atol,
        maxiter=maxiter,
        maxiter_per_dim=10,
        assumes=assumes,
    )
    x, info = _batched_cg(system, callback)
    _check_declared_psd(system, info, who)
    return x, info


def _check_declared_psd(system, info, who):
    """Warn when an operator declared PSD showed non-positive curvature."""
    if not (system.A.is_psd and system.damping >= 0):
        return
    reasons = info.reason if isinstance(info.reason, list) else [info.reason]
    if StopReason.NEGATIVE_CURVATURE in reasons:
        warn_assumption(
            f"{who}: the {type(system.A).__name__} is declared positive semi-definite, but CG "
            "met a direction p with p^T (A + damping I) p <= 0. Either the declaration is "
            "wrong (check it with curvlinops.verify.check_psd), or A is singular and "
            "rounding made it look indefinite: add damping > 0."
        )


def _batched_cg(system, callback):
    """The CG iteration on all columns of ``system.B`` at once."""
    xp = system.xp
    B = system.B
    zero = xp.zeros((), dtype=B.dtype, device=device(B))
    one = xp.ones((), dtype=B.dtype, device=device(B))
    preconditioned = system.M is not None

    if system.X0 is None:
        X, R = xp.zeros_like(B), B
    else:
        X = system.X0
        R = B - system.apply_A(X)
    Z = system.apply_M(R)
    rz = coldot(R, Z, xp)
    bb, rr, rz_host = to_host(xp, [coldot(B, B, xp), coldot(R, R, xp), rz])
    progress = BatchProgress(system, bnorm=(bb**0.5), r0norm=(rr**0.5))
    hxp = progress.hxp
    progress.stop(~hxp.isfinite(rz_host), NONFINITE)
    progress.stop(~(rz_host > 0), BREAKDOWN)

    P = Z
    directions = None
    found = hxp.zeros_like(progress.active)
    stopped = not bool(hxp.all(progress.active))
    keep = None  # device mask of the running columns, once some have stopped
    for _ in range(system.maxiter):
        if stopped:
            if not progress.any_active:
                break
            # Stopped columns get zero direction and residual, so that a linear operator
            # keeps their steps exactly 0; the masked update below guards their iterate
            # against an operator that produces NaN anyway.
            keep = progress.device_mask(progress.active)
            P = xp.where(keep, P, zero)
            R = xp.where(keep, R, zero)
        Q = system.apply_A(P)
        pAp = coldot(P, Q, xp)
        positive = pAp > 0
        alpha = xp.where(positive, rz / xp.where(positive, pAp, one), zero)
        X_previous = X
        X = X + alpha * P
        if keep is not None:
            X = xp.where(keep, X, X_previous)
        R = R - alpha * Q
        if preconditioned:
            Z = system.apply_M(R)
            rz_new = coldot(R, Z, xp)
            pAp_host, rr, rz_host = to_host(xp, [pAp, coldot(R, R, xp), rz_new], hxp)
        else:
            Z = R
            rz_new = coldot(R, R, xp)
            pAp_host, rr = to_host(xp, [pAp, rz_new], hxp)
            rz_host = rr

        active = progress.active
        # A good step has positive, finite curvature and a finite new residual.
        good = active & (pAp_host > 0) & hxp.isfinite(pAp_host) & hxp.isfinite(rr)
        rnorm = rr**0.5
        progress.accept(good, rnorm)
        converged = good & (rnorm <= progress.tol)
        ending = converged | (active & ~good)
        if preconditioned:
            ending = ending | (good & ~(rz_host > 0))
        stopped = bool(hxp.any(ending))
        if stopped:
            nonfinite = active & ~(hxp.isfinite(pAp_host) & hxp.isfinite(rr))
            negative = active & ~good & ~nonfinite
            if bool(hxp.any(nonfinite)):
                X = xp.where(progress.device_mask(nonfinite), X_previous, X)
            if bool(hxp.any(negative)):
                previous = zero if directions is None else directions
                directions = xp.where(progress.device_mask(negative), P, previous)
                found = found | negative
            progress.stop(nonfinite, NONFINITE)
            progress.stop(negative, NEGATIVE_CURVATURE)
            progress.stop(converged, CONVERGED)
            # A non-finite M r after a good step ends the system but keeps the step.
            progress.stop(good & ~hxp.isfinite(rz_host), NONFINITE)
            progress.stop(good & ~(rz_host > 0), BREAKDOWN)

        if callback is not None and (not stopped or bool(hxp.any(good))):
            callback(X)
        if stopped and not progress.any_active:
            break
        has_rz = rz > 0
        beta = xp.where(has_rz, rz_new / xp.where(has_rz, rz, one), zero)
        P = Z + beta * P
        rz = rz_new
    return X, progress.info(directions, found)
