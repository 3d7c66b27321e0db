"""Inverses of operators as operators, by iteration: CG, MINRES, Neumann series.

:class:`CGInverseLinearOperator` (symmetric positive definite ``A``) and
:class:`MINRESInverseLinearOperator` (symmetric indefinite ``A``) run the batched solver
on all columns of a matmat at once and keep the record of the last solve in
``last_info``. :class:`NeumannInverseLinearOperator` applies a fixed number of terms of
the (optionally preconditioned) Neumann series: cheap, differentiable in the operator's
library, but only an approximation.

The structure rule of the solvers (``._validation``) runs once, when the inverse is
built (not at every product): the CG inverse assumes a PSD operator, the MINRES
inverse a symmetric one. The inverses carry tags too: both are symmetric, and PSD
when ``A`` is PSD and ``damping >= 0``.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``._common``,
``._validation``, ``.cg``, ``.minres``.
"""

from __future__ import annotations

import warnings

from ..linalg import LinearOperator
from ._common import ConvergenceError, ConvergenceWarning, StopReason, matmat
from ._validation import (
    PSD,
    SYMMETRIC,
    as_operator,
    as_preconditioner,
    check_count,
    check_real,
    require_structure,
)
from .cg import _cg
from .minres import _minres

__all__ = [
    "CGInverseLinearOperator",
    "MINRESInverseLinearOperator",
    "NeumannInverseLinearOperator",
]


class _KrylovInverseLinearOperator(LinearOperator):
    """``(A + damping I)^{-1}`` applied by an iterative solver; see the subclasses."""

    _solver = None
    _name = ""
    _assumes = None
    _negative_damping = None  # why a negative damping is refused (None: allowed)

    def __init__(
        self,
        A,
        *,
        rtol=1e-5,
        atol=0.0,
        maxiter=None,
        M=None,
        damping=0.0,
        callback=None,
        strict=False,
    ):
        who = type(self).__name__
        A = as_operator(A, who)
        M = as_preconditioner(M, A, who)
        damping = check_real(damping, "damping", who)
        if damping < 0 and self._negative_damping is not None:
            raise ValueError(
                f"{who}: damping must be >= 0, got {damping}. {self._negative_damping}"
            )
        require_structure(A, who, self._assumes, damping=damping)
        super().__init__(
            A.shape,
            dtype=A.dtype,
            xp=A.xp,
            device=A.device,
            symmetric=True,
            psd=A.is_psd and damping >= 0,
        )
        self.operator = A
        self.strict = bool(strict)
        self.options = {
            "rtol": check_real(rtol, "rtol", who, minimum=0.0),
            "atol": check_real(atol, "atol", who, minimum=0.0),
            "maxiter": None if maxiter is None else check_count(maxiter, "maxiter", who, minimum=0),
            "M": M,
            "damping": damping,
            "callback": callback,
        }
        self.last_info = None

    def _matmat(self, X):
        o = self.options
        solution, info = type(self)._solver(
            self.operator,
            X,
            None,
            o["rtol"],
            o["atol"],
            o["maxiter"],
            o["M"],
            o["damping"],
            o["callback"],
            assumes=None,
            who=type(self).__name__,
        )
        self.last_info = info
        if not bool(info.converged.all()):
            failed = [(j, r) for j, r in enumerate(info.reason) if r != StopReason.CONVERGED]
            remedies = "; ".join(
                f"{reason}: {reason.remedy}" for reason in dict.fromkeys(r for _, r in failed)
            )
            listed = ", ".join(f"({j}, {r})" for j, r in failed[:10])
            message = (
                f"{type(self).__name__}: {self._name} did not converge for "
                f"{len(failed)} of {len(info.reason)} columns (column, reason): {listed}. "
                f"{remedies}"
            )
            if self.strict:
                raise ConvergenceError(
                    f"{message} Or pass strict=False to accept the result (see last_info)."
                )
            # nothing silent: an unconverged product is returned, with a warning
            warnings.warn(
                f"{message} The product is returned unconverged (strict=False; see last_info).",
                ConvergenceWarning,
                stacklevel=3,
            )
        return solution


class CGInverseLinearOperator(_KrylovInverseLinearOperator):
    """``(A + damping I)^{-1}`` of a symmetric positive definite ``A``, applied by CG.

    Every product runs :func:`curvlinops.cg` on all its columns at once (one product
    with ``A`` per iteration for the whole batch).

    Parameters
    ----------
    A : LinearOperator or array
        Square symmetric positive definite operator. Its structure tags are consulted
        once, here, under the rule of :func:`curvlinops.cg` (warning if it is not
        declared PSD and ``damping <= 0``).
    rtol, atol, maxiter, M, damping, callback
        Options of :func:`curvlinops.cg`, used for every product; ``damping >= 0``
        (CG needs ``A + damping I`` positive definite; see ``Raises``).
    strict : bool
        If ``True``, a product whose solve does not converge in some column raises
        :class:`curvlinops.ConvergenceError`. If ``False`` (default) the result is
        returned anyway; check ``last_info``.

    Attributes
    ----------
    operator : LinearOperator
        ``A``.
    last_info : SolveInfo or None
        The :class:`curvlinops.SolveInfo` of the most recent product (per column: a
        matvec counts as one column), ``None`` before the first product.

    Raises
    ------
    ValueError
        If ``A`` is not square, ``M`` does not have ``A``'s shape, or ``damping < 0``
        (a negative damping can make ``A + damping I`` indefinite, where CG returns a
        partial solve; use :class:`MINRESInverseLinearOperator` for that).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import CGInverseLinearOperator
    >>> from curvlinops import aslinearoperator
    >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> Ainv = CGInverseLinearOperator(aslinearoperator(A, psd=True), rtol=1e-12)
    >>> bool(np.allclose(Ainv @ np.eye(2), np.linalg.inv(A)))
    True
    >>> Ainv.last_info.reason, Ainv.is_psd
    ([StopReason.CONVERGED, StopReason.CONVERGED], True)
    """

    _solver = staticmethod(_cg)
    _name = "CG"
    _assumes = PSD
    _negative_damping = (
        "CG needs A + damping I positive definite, which a negative damping can break "
        "without notice (CG then stops at the first direction of negative curvature and "
        "returns a partial solve, e.g. zeros). For an indefinite shift use "
        "MINRESInverseLinearOperator, or the exact inverse(damping) of a structured "
        "operator."
    )


class MINRESInverseLinearOperator(_KrylovInverseLinearOperator):
    """``(A + damping I)^{-1}`` of a symmetric (indefinite) ``A``, applied by MINRES.

    Every product runs :func:`curvlinops.minres` on all its columns at once.

    Parameters
    ----------
    A : LinearOperator or array
        Square symmetric invertible operator. Its ``is_symmetric`` tag is consulted
        once, here, under the rule of :func:`curvlinops.minres`.
    rtol, atol, maxiter, M, damping, callback
        Options of :func:`curvlinops.minres` (``M`` must be positive definite), used
        for every product.
    strict : bool
        If ``True``, a product whose solve does not converge in some column raises
        :class:`curvlinops.ConvergenceError`; otherwise see ``last_info``.

    Attributes
    ----------
    operator : LinearOperator
        ``A``.
    last_info : SolveInfo or None
        The :class:`curvlinops.SolveInfo` of the most recent product, ``None`` before
        the first one.

    Raises
    ------
    ValueError
        If ``A`` is not square or ``M`` does not have ``A``'s shape.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import MINRESInverseLinearOperator
    >>> A = np.array([[1.0, 2.0], [2.0, -1.0]])  # indefinite
    >>> Ainv = MINRESInverseLinearOperator(A, rtol=1e-12)
    >>> bool(np.allclose(Ainv @ np.eye(2), np.linalg.inv(A)))
    True
    """

    _solver = staticmethod(_minres)
    _name = "MINRES"
    _assumes = SYMMETRIC


class NeumannInverseLinearOperator(LinearOperator):
    """Truncated (preconditioned) Neumann series as an approximate inverse of ``A``.

    A product with ``b`` runs ``num_terms`` steps of the preconditioned Richardson
    iteration ``x_{j+1} = x_j + scale * M (b - A x_j)`` from ``x_0 = 0``, i.e.

    ``x = scale * sum_{j < num_terms} (I - scale M A)^j M b``

    (``M = I`` without preconditioner). This costs ``num_terms - 1`` products with ``A``
    and ``num_terms`` with ``M``, has no data-dependent control flow and is only an
    approximation of ``A^{-1} b``: its error is ``-(I - scale M A)^{num_terms} A^{-1} b``.

    Parameters
    ----------
    A : LinearOperator or array
        Square operator.
    num_terms : int
        Number of terms of the series (``>= 1``).
    scale : float
        Step size ``> 0``. The series converges (as ``num_terms`` grows) if and only if
        the spectral radius of ``I - scale M A`` is below 1; for symmetric positive
        definite ``A`` (and ``M = I``) that is ``0 < scale < 2 / lambda_max(A)``, and
        ``scale = 1 / lambda_max(A)`` is a safe choice.
    M : LinearOperator or array, optional
        Preconditioner approximating ``A^{-1}`` (e.g. the inverse diagonal).

    Raises
    ------
    ValueError
        If ``A`` is not square, ``M`` does not have ``A``'s shape, ``num_terms < 1`` or
        ``scale`` is not positive and finite.

    Notes
    -----
    The operator is symmetric when ``A`` and ``M`` are (declared) symmetric; otherwise
    its adjoint is the series of ``A^T`` and ``M^T``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import NeumannInverseLinearOperator
    >>> A = np.diag([1.0, 2.0])
    >>> Ainv = NeumannInverseLinearOperator(A, num_terms=60, scale=0.5)
    >>> np.round(Ainv @ np.ones(2), 8).tolist()
    [1.0, 0.5]
    """

    def __init__(self, A, num_terms, scale, M=None):
        who = type(self).__name__
        A = as_operator(A, who)
        M = as_preconditioner(M, A, who)
        symmetric = A.is_symmetric and (M is None or M.is_symmetric)
        super().__init__(A.shape, dtype=A.dtype, xp=A.xp, device=A.device, symmetric=symmetric)
        self.operator = A
        self.preconditioner = M
        self.num_terms = check_count(num_terms, "num_terms", who, minimum=1)
        self.scale = check_real(scale, "scale", who, positive=True)

    def _series(self, A, M, B):
        scale = self.scale
        X = scale * (B if M is None else matmat(M, B))
        for _ in range(self.num_terms - 1):
            update = B - matmat(A, X)
            X = X + scale * (update if M is None else matmat(M, update))
        return X

    def _matmat(self, X):
        return self._series(self.operator, self.preconditioner, X)

    def _rmatmat(self, X):
        if self.is_symmetric:
            return self._matmat(X)
        M = self.preconditioner
        # (sum_j (I - s M A)^j M)^T = sum_j (I - s M^T A^T)^j M^T.
        return self._series(self.operator.adjoint(), None if M is None else M.adjoint(), X)
