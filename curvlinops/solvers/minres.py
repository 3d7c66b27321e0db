"""MINRES for symmetric (possibly indefinite) operators, e.g. Hessian solves.

:func:`minres` solves ``(A + damping I) x = b`` for one right-hand side ``(n,)`` or ``k``
of them ``(n, k)`` with the Lanczos-based minimal-residual method of Paige and Saunders.
The ``k`` systems advance together with one ``A.matmat`` (and one ``M.matmat``) per
iteration; the Lanczos and Givens-rotation scalars are ``(k,)`` arrays, so each column
has its own recurrence and its own stopping decision.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``._common``, ``._validation``.
"""

from __future__ import annotations

from .._backend import device, dtype_eps
from ._common import BREAKDOWN, CONVERGED, NONFINITE, BatchProgress, coldot, prepare_system, to_host
from ._validation import SYMMETRIC

__all__ = ["minres"]

# A Lanczos coefficient beta_{j+1} below this multiple of eps * ||T_j||_F means the
# Krylov space is (numerically) invariant: the next Lanczos vector would be noise.
_BREAKDOWN_FACTOR = 10.0


def minres(A, b, x0=None, *, rtol=1e-5, atol=0.0, maxiter=None, M=None, damping=0.0, callback=None):
    """Solve ``(A + damping I) x = b`` for symmetric ``A`` by MINRES.

    Parameters
    ----------
    A : LinearOperator or array
        Square symmetric operator ``(n, n)``, possibly indefinite or singular; a 2-D
        array is wrapped with :func:`curvlinops.aslinearoperator` (its symmetry
        checked). MINRES consults the tag ``is_symmetric`` (see Notes).
    b : array
        Right-hand side ``(n,)``, or ``k`` right-hand sides ``(n, k)`` solved together,
        in the operator's namespace. Must be finite.
    x0 : array, optional
        Initial guess of the shape of ``b`` (default zeros).
    rtol, atol : float
        Column ``j`` has converged when ``||r_j|| <= max(rtol * ||b_j||, atol)`` in the
        Euclidean norm. This is *not* SciPy's rule: :func:`scipy.sparse.linalg.minres`
        stops when ``||r|| <= rtol * ||A|| ||x||`` (with an estimate of ``||A||``) or when
        ``||A r||`` is small, which is looser; for the same ``rtol`` this function may take
        more iterations and returns a smaller residual.
    maxiter : int, optional
        Maximum number of iterations (default ``5 * n``, like SciPy).
    M : LinearOperator or array, optional
        Symmetric positive definite preconditioner approximating the inverse of
        ``A + damping I``, applied as ``z = M r`` (SciPy's convention).
    damping : float
        Solve with ``A + damping I``; any real value (SciPy's ``shift=s`` is
        ``damping=-s``).
    callback : callable, optional
        ``callback(xk)`` after each iteration, with the current iterate(s).

    Returns
    -------
    x : array
        The solution, shape and namespace of ``b``, dtype of the operator.
    info : SolveInfo
        Iteration counts, residual histories, convergence flags and stop reasons (per
        column for ``(n, k)``).

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
        If the operator is not declared symmetric (and the symmetry probe passed).

    Notes
    -----
    Structure: MINRES needs a symmetric operator, definiteness is not needed. A
    declared symmetric operator (``is_symmetric``: every curvature operator but the
    Jacobians, or ``aslinearoperator(A, symmetric=True)``) runs silently; otherwise one
    extra product with two random vectors tests symmetry (error if it fails, warning if
    it passes).

    Without a preconditioner the residual norm is MINRES's recurrence ``phibar_j``, which
    equals ``||r_j||`` in exact arithmetic. With one, that recurrence gives the ``M``-norm,
    so the residual vector itself is updated alongside the iterate (``r <- r - phi A w``,
    from the product ``A v`` already computed; no extra product) and its Euclidean norm
    is tested.

    A system stops with reason ``"breakdown"`` if the preconditioner is not positive
    definite (``r^T M r < 0``) or if the Lanczos process finds an invariant subspace
    without the residual being small (a singular, inconsistent system: ``x`` is then the
    minimal-residual iterate). ``"nonfinite"`` means the operator or preconditioner
    produced NaN or Inf; ``x`` is the last finite iterate.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import minres
    >>> A = np.array([[2.0, 1.0, 0.0], [1.0, -3.0, 1.0], [0.0, 1.0, 1.0]])  # indefinite
    >>> b = np.array([1.0, 0.0, 2.0])
    >>> x, info = minres(A, b, rtol=1e-12)
    >>> bool(np.allclose(x, np.linalg.solve(A, b))), info.reason
    (True, StopReason.CONVERGED)

    Several right-hand sides in one batch, each with its own recurrence:

    >>> X, info = minres(A, np.eye(3), rtol=1e-12)
    >>> bool(np.allclose(X, np.linalg.inv(A))), info.converged.tolist()
    (True, [True, True, True])
    """
    return _minres(A, b, x0, rtol, atol, maxiter, M, damping, callback, assumes=SYMMETRIC)


def _minres(A, b, x0, rtol, atol, maxiter, M, damping, callback, *, assumes, who="minres"):
    """:func:`minres` with the structure rule made optional (``assumes=None``)."""
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
        maxiter_per_dim=5,
        assumes=assumes,
    )
    return _batched_minres(system, callback)


def _safe_divide(numerator, denominator, xp, zero, one):
    """``numerator / denominator`` where the denominator is positive, else 0."""
    positive = denominator > 0
    return xp.where(positive, numerator / xp.where(positive, denominator, one), zero)


def _batched_minres(system, callback):
    """The MINRES iteration on all columns of ``system.B`` at once."""
    xp = system.xp
    B = system.B
    zero = xp.zeros((), dtype=B.dtype, device=device(B))
    one = xp.ones((), dtype=B.dtype, device=device(B))
    eps = dtype_eps(B.dtype)
    least_squares_tol = eps**0.5
    preconditioned = system.M is not None

    if system.X0 is None:
        X, R1 = xp.zeros_like(B), B
    else:
        X = system.X0
        R1 = B - system.apply_A(X)
    Y = system.apply_M(R1)
    beta1_squared = coldot(R1, Y, xp)
    bb, rr, beta1_host = to_host(xp, [coldot(B, B, xp), coldot(R1, R1, xp), beta1_squared])
    progress = BatchProgress(system, bnorm=bb**0.5, r0norm=rr**0.5)
    hxp = progress.hxp
    progress.stop(~hxp.isfinite(beta1_host), NONFINITE)
    progress.stop(~(beta1_host > 0), BREAKDOWN)

    # Scalar recurrences, one entry per column (0-d for a single right-hand side).
    beta = xp.sqrt(xp.maximum(beta1_squared, zero))
    scalars = {
        "beta": beta,
        "old_beta": zero * beta,
        "dbar": zero * beta,
        "epsilon": zero * beta,
        "phibar": beta,
        "cs": -one + zero * beta,
        "sn": zero * beta,
    }
    tnorm2 = zero * beta
    # Vectors: the last two Lanczos residuals, the last two directions w, and with a
    # preconditioner the residual and the products A w, updated alongside.
    vectors = {"Y": Y, "R1": R1, "R2": R1, "W": xp.zeros_like(B), "W2": xp.zeros_like(B)}
    if preconditioned:
        vectors.update(R=R1, AW=xp.zeros_like(B), AW2=xp.zeros_like(B))

    stopped = not bool(hxp.all(progress.active))
    first = True
    keep = None  # device mask of the running columns, once some have stopped
    for _ in range(system.maxiter):
        if stopped:
            if not progress.any_active:
                break
            # Stopped columns get all-zero state, so that with a linear operator all their
            # later updates are exactly 0; the masked update of X below guards their
            # iterate against an operator that produces NaN anyway.
            keep = progress.device_mask(progress.active)
            scalars = {key: xp.where(keep, value, zero) for key, value in scalars.items()}
            vectors = {key: xp.where(keep, value, zero) for key, value in vectors.items()}
        s = scalars
        v = vectors
        inv_beta = _safe_divide(one, s["beta"], xp, zero, one)
        V = inv_beta * v["Y"]
        AV = system.apply_A(V)
        Y = AV
        if not first:
            Y = Y - _safe_divide(s["beta"], s["old_beta"], xp, zero, one) * v["R1"]
        alpha = coldot(V, Y, xp)
        Y = Y - (alpha * inv_beta) * v["R2"]
        R1, R2 = v["R2"], Y
        Y = system.apply_M(R2)
        old_beta = s["beta"]
        beta_squared = coldot(R2, Y, xp)
        beta = xp.sqrt(xp.maximum(beta_squared, zero))
        # ||T_j||_F^2, column by column: (beta_j, alpha_j, beta_{j+1}); beta_1 = ||b||_M
        # scales b, not A, so it is left out (unlike SciPy) to keep the tests scale-free.
        tnorm2 = tnorm2 + alpha * alpha + beta * beta
        if not first:
            tnorm2 = tnorm2 + old_beta * old_beta

        # Apply the previous Givens rotation, then compute the next one.
        cs, sn, dbar = s["cs"], s["sn"], s["dbar"]
        old_epsilon = s["epsilon"]
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsilon = sn * beta
        dbar = -cs * beta
        root = xp.sqrt(gbar * gbar + dbar * dbar)  # ||A r_{j-1}|| / ||r_{j-1}||
        gamma = xp.sqrt(gbar * gbar + beta * beta)
        # gamma = 0 only for a singular projected problem, whose step is rejected below;
        # no absolute floor on gamma, so that the iteration is invariant to scaling A.
        inv_gamma = _safe_divide(one, gamma, xp, zero, one)
        cs = gbar * inv_gamma
        sn = beta * inv_gamma
        phi = cs * s["phibar"]
        phibar = sn * s["phibar"]

        W1, W2 = v["W2"], v["W"]
        W = (V - old_epsilon * W1 - delta * W2) * inv_gamma
        X_previous = X
        X = X + phi * W
        if keep is not None:
            X = xp.where(keep, X, X_previous)
        vectors = {"Y": Y, "R1": R1, "R2": R2, "W": W, "W2": W2}
        if preconditioned:
            AW = (AV - old_epsilon * v["AW2"] - delta * v["AW"]) * inv_gamma
            R = v["R"] - phi * AW
            vectors.update(R=R, AW=AW, AW2=v["AW"])
            rr, beta_host, alpha_host, gamma_host, tnorm2_host, root_host = to_host(
                xp, [coldot(R, R, xp), beta_squared, alpha, gamma, tnorm2, root], hxp
            )
            rnorm = rr**0.5
        else:
            phibar_host, beta_host, alpha_host, gamma_host, tnorm2_host, root_host = to_host(
                xp, [phibar, beta_squared, alpha, gamma, tnorm2, root], hxp
            )
            rnorm = hxp.abs(phibar_host)
        scalars = {
            "beta": beta,
            "old_beta": old_beta,
            "dbar": dbar,
            "epsilon": epsilon,
            "phibar": phibar,
            "cs": cs,
            "sn": sn,
        }
        first = False

        active = progress.active
        anorm = tnorm2_host**0.5
        finite = hxp.isfinite(rnorm) & hxp.isfinite(beta_host) & hxp.isfinite(alpha_host)
        # A (numerically) singular rotation means a singular projected problem (e.g. a
        # singular A with b outside its range): the step is meaningless, reject it.
        singular = gamma_host <= (_BREAKDOWN_FACTOR * eps) * anorm
        updated = active & finite & ~singular
        progress.accept(updated, rnorm)
        converged = updated & (rnorm <= progress.tol)
        # Breakdowns after a kept step: the preconditioner is not positive definite,
        # the Krylov space is invariant (beta ~ 0), or ||A r|| <= sqrt(eps) ||A|| ||r||,
        # i.e. the residual lies numerically in the null space of A (b is not in its
        # range, x is a least-squares solution; going on would blow x up).
        broken = (
            (beta_host < 0)
            | (beta_host <= ((_BREAKDOWN_FACTOR * eps) * anorm) ** 2)
            | (root_host <= least_squares_tol * anorm)
        )
        ending = (active & ~updated) | converged | (updated & broken)
        stopped = bool(hxp.any(ending))
        if stopped:
            rejected = active & ~updated
            if bool(hxp.any(rejected)):
                X = xp.where(progress.device_mask(rejected), X_previous, X)
            progress.stop(active & ~finite, NONFINITE)
            progress.stop(rejected, BREAKDOWN)
            progress.stop(converged, CONVERGED)
            progress.stop(updated & broken, BREAKDOWN)

        if callback is not None and (not stopped or bool(hxp.any(updated))):
            callback(X)
        if stopped and not progress.any_active:
            break
    return X, progress.info()
