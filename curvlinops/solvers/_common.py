"""Shared pieces of the Krylov solvers: the result types, the system, host bookkeeping.

:class:`SolveInfo` is what :func:`curvlinops.cg` and :func:`curvlinops.minres` return next
to the solution, with one :class:`StopReason` per system. The rest is private: the
validated system (:func:`prepare_system`, which checks everything through
``._validation`` before any iteration), column-wise products that work for ``(n,)`` and
``(n, k)`` arrays alike, and :class:`BatchProgress`, the host-side record of which
columns of a batched solve are still running. The solvers
fetch a few per-column scalars to the host once per iteration (one small transfer) and
make all control-flow decisions there, so the device arrays never need item access.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``._validation``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .._backend import array_namespace, device as array_device, to_numpy
from ..linalg import LinearOperator
from ._validation import (
    as_operator,
    as_preconditioner,
    check_count,
    check_real,
    check_vector,
    require_structure,
)

__all__ = ["SolveInfo", "StopReason", "ConvergenceError"]

_REMEDIES = {
    "converged": "Nothing to do: the residual reached max(rtol * ||b||, atol).",
    "maxiter": (
        "Increase maxiter, loosen rtol/atol, or add a preconditioner M (e.g. "
        "curvlinops.nystrom_preconditioner) or damping to improve the conditioning."
    ),
    "negative_curvature": (
        "The operator (plus damping) is not positive definite: add damping, or use minres "
        "for symmetric indefinite systems. In Newton-CG, step along "
        "info.negative_curvature_direction."
    ),
    "nonfinite": (
        "The operator or preconditioner produced NaN or Inf: check its products on the "
        "returned (last finite) iterate, its scaling, and the dtype's range."
    ),
    "breakdown": (
        "The preconditioner is not positive definite, or (MINRES) the system is singular "
        "and inconsistent: use a symmetric positive definite M, add damping, or accept the "
        "returned minimal-residual (least-squares) iterate."
    ),
}


class StopReason(str, enum.Enum):
    """Why an iterative solve stopped, with what to do about it (:attr:`remedy`).

    A ``str``-valued enum: each member equals its value (``StopReason.CONVERGED ==
    "converged"``), prints as it (``str``, f-strings) and reprs as its name.

    Attributes
    ----------
    CONVERGED
        ``"converged"``: the residual tolerance was reached.
    MAXITER
        ``"maxiter"``: the iteration budget ran out first.
    NEGATIVE_CURVATURE
        ``"negative_curvature"``: CG met a direction ``p`` with ``p^T (A + damping I) p
        <= 0``.
    NONFINITE
        ``"nonfinite"``: a product produced NaN or Inf.
    BREAKDOWN
        ``"breakdown"``: the preconditioner is not positive definite, or MINRES found an
        invariant Krylov space without converging (singular, inconsistent system).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import StopReason, cg
    >>> x, info = cg(np.diag([1.0, 2.0]), np.ones(2), maxiter=1, damping=1.0)
    >>> info.reason
    StopReason.MAXITER
    >>> info.reason == "maxiter", f"stopped: {info.reason}"
    (True, 'stopped: maxiter')
    >>> info.reason.remedy.startswith("Increase maxiter")
    True
    >>> StopReason("negative_curvature") is StopReason.NEGATIVE_CURVATURE
    True
    """

    CONVERGED = "converged"
    MAXITER = "maxiter"
    NEGATIVE_CURVATURE = "negative_curvature"
    NONFINITE = "nonfinite"
    BREAKDOWN = "breakdown"

    @property
    def remedy(self) -> str:
        """What to do about this outcome, in one or two sentences."""
        return _REMEDIES[self.value]

    def __str__(self) -> str:
        return self.value

    def __format__(self, format_spec) -> str:
        return format(self.value, format_spec)

    def __repr__(self) -> str:
        return f"StopReason.{self.name}"


# Host-side integer codes of BatchProgress (RUNNING never leaves it) and their members.
RUNNING, CONVERGED, MAXITER, NEGATIVE_CURVATURE, NONFINITE, BREAKDOWN = range(6)
REASONS = (
    None,
    StopReason.CONVERGED,
    StopReason.MAXITER,
    StopReason.NEGATIVE_CURVATURE,
    StopReason.NONFINITE,
    StopReason.BREAKDOWN,
)


@dataclass(frozen=True)
class SolveInfo:
    """What happened in an iterative solve (returned next to the solution).

    For a single right-hand side ``b`` of shape ``(n,)`` every field is a plain Python
    value; for ``k`` right-hand sides ``b`` of shape ``(n, k)`` every field holds one
    entry per column.

    Attributes
    ----------
    iterations : int or numpy.ndarray
        Accepted iterations (updates of the iterate) of each system; an iteration
        rejected because of negative curvature or a non-finite value is not counted.
    residual_norms : list of float, or list of k lists of float
        History of the residual norm ``||b - (A + damping I) x_j||``, from the initial
        one to the final one (``iterations + 1`` entries per system). These are the norms
        of the recursively updated residual the solver tests convergence with (equal to
        the true residual up to rounding).
    converged : bool or numpy.ndarray of bool
        Whether ``||r|| <= max(rtol * ||b||, atol)`` was reached.
    reason : StopReason or list of StopReason
        Why each system stopped (a ``str`` enum, so ``info.reason == "converged"``
        works): ``CONVERGED``, ``MAXITER``, ``NEGATIVE_CURVATURE`` (CG met a direction
        ``p`` with ``p^T A p <= 0``), ``NONFINITE`` (the operator or preconditioner
        produced NaN or Inf; the last finite iterate is returned) or ``BREAKDOWN`` (the
        preconditioner is not positive definite, or MINRES found an invariant subspace
        without converging, e.g. a singular inconsistent system). Each member's
        ``remedy`` says what to do.
    negative_curvature_direction : array, list, or None
        CG only: the direction ``p`` with ``p^T (A + damping I) p <= 0`` that stopped the
        system (an array of shape ``(n,)``), or ``None``. For ``k`` systems a list of
        ``k`` such entries.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import cg
    >>> from curvlinops import aslinearoperator
    >>> A = aslinearoperator(np.diag([1.0, 2.0]), psd=True)
    >>> x, info = cg(A, np.array([1.0, 1.0]))
    >>> info.converged, info.reason, info.iterations
    (True, StopReason.CONVERGED, 2)
    """

    iterations: Any
    residual_norms: list
    converged: Any
    reason: Any
    negative_curvature_direction: Any = None


class ConvergenceError(RuntimeError):
    """An iterative method did not reach its tolerance within its iteration budget.

    Raised by the iterative inverses built with ``strict=True`` (the message names the
    columns that failed and why; the record of the solve is in the operator's
    ``last_info``), and by :func:`~curvlinops.eigsh` and
    :func:`~curvlinops.power_iteration`, which have no partial result to return. The
    solvers :func:`~curvlinops.cg` and :func:`~curvlinops.minres` never raise it: they
    report non-convergence in their :class:`SolveInfo`.
    """


class ConvergenceWarning(UserWarning):
    """An iterative inverse built with ``strict=False`` returned an unconverged product.

    The message names the columns that failed, why (:class:`StopReason`) and what to
    do; the record of the solve is in the operator's ``last_info``. Pass
    ``strict=True`` to raise :class:`ConvergenceError` instead, or silence it with
    ``warnings.simplefilter("ignore", curvlinops.ConvergenceWarning)`` where a partial
    solve is what you want (a truncated Hessian-free step).

    Examples
    --------
    >>> import warnings
    >>> import numpy as np
    >>> from curvlinops import CGInverseLinearOperator, aslinearoperator
    >>> A = aslinearoperator(np.diag([1.0, 1e-3, 1e3]), psd=True)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     _ = CGInverseLinearOperator(A, maxiter=1) @ np.ones(3)
    >>> [type(w.message).__name__ for w in caught]
    ['ConvergenceWarning']
    """


@dataclass
class LinearSystem:
    """A validated problem ``(A + damping I) x = b`` with its solver options."""

    A: LinearOperator
    M: LinearOperator | None
    B: Any
    X0: Any
    damping: float
    rtol: float
    atol: float
    maxiter: int

    @property
    def xp(self):
        return self.A.xp

    @property
    def batched(self) -> bool:
        """Whether ``b`` has shape ``(n, k)`` (else ``(n,)``)."""
        return self.B.ndim == 2

    def apply_A(self, X):
        """``(A + damping I) X`` for ``X`` of the shape of ``b``."""
        out = matmat(self.A, X)
        return out + self.damping * X if self.damping != 0.0 else out

    def apply_M(self, X):
        """``M X`` (identity when there is no preconditioner)."""
        return X if self.M is None else matmat(self.M, X)


def prepare_system(who, A, b, x0, *, M, damping, rtol, atol, maxiter, maxiter_per_dim, assumes):
    """Check every input of a solver call; raise before any iteration runs.

    ``assumes`` (``"psd"`` for CG, ``"symmetric"`` for MINRES) goes through the
    structure rule of ``._validation`` after the arrays and options are checked;
    ``None`` skips it (the iterative inverses apply it once, at construction).
    """
    A = as_operator(A, who)
    b = check_vector(A, b, who, "right-hand side b").array
    if x0 is not None:
        x0 = check_vector(A, x0, who, "initial guess x0", like=("b", b)).array
    M = as_preconditioner(M, A, who)
    if maxiter is None:
        maxiter = maxiter_per_dim * A.shape[0]
    system = LinearSystem(
        A=A,
        M=M,
        B=b,
        X0=x0,
        damping=check_real(damping, "damping", who),
        rtol=check_real(rtol, "rtol", who, minimum=0.0),
        atol=check_real(atol, "atol", who, minimum=0.0),
        maxiter=check_count(maxiter, "maxiter", who, minimum=0),
    )
    if b.ndim == 2 and b.shape[1] == 0:
        system.maxiter = 0  # no right-hand side, b of shape (n, 0): nothing to iterate on
    if assumes is not None:
        require_structure(A, who, assumes, damping=system.damping)
    return system


# -- column-wise array helpers -------------------------------------------------------


def matmat(op: LinearOperator, X):
    """Product of an operator with a validated ``(n,)`` or ``(n, k)`` array."""
    if X.ndim == 1:
        return op._matmat(X[:, None])[:, 0]
    return op._matmat(X)


def coldot(a, b, xp):
    """Column-wise dot products: ``(k,)`` for ``(n, k)`` inputs, 0-d for ``(n,)``."""
    # vecdot reads each pair of columns once, without the temporary of sum(a * b).
    return xp.vecdot(a, b, axis=-a.ndim)


def to_host(xp, scalars, hxp=None):
    """Stack per-column scalars, copy them to the host in one transfer: ``(m, k)``.

    ``hxp`` is the host namespace if known (saves a namespace lookup per iteration).
    """
    host = to_numpy(xp.stack(scalars))
    hxp = array_namespace(host) if hxp is None else hxp
    return hxp.reshape(host, (len(scalars), -1))


# -- host bookkeeping ----------------------------------------------------------------


class BatchProgress:
    """Host-side state of ``k`` systems advancing together.

    Parameters
    ----------
    system : LinearSystem
    bnorm, r0norm
        Host arrays ``(k,)``: norms of the right-hand sides and initial residuals.

    The tolerance of each column is ``max(rtol * ||b||, atol)``. Columns whose initial
    residual is already small enough stop as converged, columns whose initial residual
    is not finite stop as ``"nonfinite"`` before any iteration.
    """

    def __init__(self, system: LinearSystem, bnorm, r0norm):
        hxp = array_namespace(r0norm)
        self.hxp = hxp
        self.system = system
        k = r0norm.shape[0]
        self.tol = hxp.maximum(system.rtol * bnorm, system.atol)
        self.active = hxp.ones(k, dtype=hxp.bool)
        self.reason = hxp.zeros(k, dtype=hxp.int64)
        self.iterations = hxp.zeros(k, dtype=hxp.int64)
        self.history = [r0norm]
        self.stop(~hxp.isfinite(r0norm), NONFINITE)
        self.stop(r0norm <= self.tol, CONVERGED)

    @property
    def any_active(self) -> bool:
        return bool(self.hxp.any(self.active))

    def stop(self, mask, reason: int) -> bool:
        """Stop the still-active columns in ``mask`` for ``reason``; whether any did."""
        hxp = self.hxp
        mask = mask & self.active
        if not bool(hxp.any(mask)):
            return False
        self.reason = hxp.where(mask, reason, self.reason)
        self.active = self.active & ~mask
        return True

    def accept(self, updated, rnorm) -> None:
        """Count an iteration for the ``updated`` columns and log their residual norms."""
        self.iterations = self.iterations + self.hxp.astype(updated, self.hxp.int64)
        self.history.append(rnorm)

    def device_mask(self, mask):
        """A host bool mask ``(k,)`` as a device array that broadcasts against ``b``."""
        system = self.system
        xp = system.xp
        dev = xp.asarray(mask.tolist(), dtype=xp.bool, device=array_device(system.B))
        return dev if system.batched else xp.reshape(dev, ())

    def info(self, negative_directions=None, negative_found=None) -> SolveInfo:
        """The :class:`SolveInfo` of the solve; still-running columns count as maxiter."""
        hxp = self.hxp
        self.reason = hxp.where(self.active, MAXITER, self.reason)
        history = hxp.stack(self.history)
        k = self.reason.shape[0]
        iterations = self.iterations
        # One pass over the columns to format the result, outside the iteration loop.
        norms = [history[: int(iterations[j]) + 1, j].tolist() for j in range(k)]
        reasons = [REASONS[int(code)] for code in self.reason.tolist()]
        converged = self.reason == CONVERGED
        directions = None
        if negative_directions is not None:
            if self.system.batched:
                found = negative_found.tolist()
                directions = [negative_directions[:, j] if found[j] else None for j in range(k)]
            elif bool(negative_found[0]):
                directions = negative_directions
        if self.system.batched:
            return SolveInfo(iterations, norms, converged, reasons, directions)
        return SolveInfo(int(iterations[0]), norms[0], bool(converged[0]), reasons[0], directions)
