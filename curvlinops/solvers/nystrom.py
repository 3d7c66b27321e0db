"""Randomized Nystrom approximation of PSD operators and the Nystrom PCG preconditioner.

:func:`nystrom` sketches a positive semi-definite operator with one ``matmat`` against
an orthonormalized Gaussian test matrix and returns its low-rank approximation
``U diag(lam) U^T`` as an :class:`~curvlinops.EighLinearOperator`, computed in the
numerically stable way of Tropp et al. (2017, "Fixed-rank approximation of a
positive-semidefinite matrix from streaming data", Alg. 3) and Frangella, Tropp &
Udell (2023, "Randomized Nystrom preconditioning", Alg. 2.1): a tiny shift makes the
core matrix safely positive definite, a Cholesky factor replaces the pseudo-inverse,
and the shift is removed from the eigenvalues afterwards.

:class:`NystromPreconditioner` turns such an approximation into the preconditioner
of Frangella et al. for ``(A + mu I) x = b``, to be passed as ``M=`` to
:func:`curvlinops.cg`.

Structure: :func:`nystrom` needs a PSD operator and consults its tags under the rule
of ``._validation``: silent when ``is_psd``; an :class:`~curvlinops.AssumptionWarning`
when it is only symmetric; a symmetry probe (error if it fails, warning if it passes)
when it is not even declared symmetric. The preconditioner is symmetric positive
definite (tagged PSD).

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``._validation``.
"""

from __future__ import annotations

from .._backend import (
    FactorizationError,
    as_generator,
    checked_cholesky,
    dtype_eps,
    solve_triangular,
)
from ..linalg import EighLinearOperator, LinearOperator
from ._validation import PSD, as_operator, check_count, check_real, require_structure

__all__ = ["NystromPreconditioner", "nystrom", "nystrom_preconditioner"]


def nystrom(A, rank: int, *, seed=0, oversampling: int = 10) -> EighLinearOperator:
    """Randomized Nystrom approximation of a symmetric PSD operator, truncated to ``rank``.

    Draws a Gaussian test matrix ``Omega`` of ``l = min(rank + oversampling, n)``
    columns, orthonormalizes it (QR), and forms the sketch ``Y = A Omega`` in one
    product. With the shift ``nu = sqrt(n) * eps * ||Y||_F`` and ``Y_nu = Y + nu Omega``,
    the Nystrom approximation of ``A + nu I`` is ``B B^T`` with ``B = Y_nu C^{-T}``,
    ``C`` the Cholesky factor of ``Omega^T Y_nu``. The thin SVD ``B = U S V^T`` gives
    the eigenpairs; ``lam = max(0, s^2 - nu)`` removes the shift. The ``rank`` largest
    are returned.

    Parameters
    ----------
    A : LinearOperator
        Symmetric positive semi-definite ``(n, n)`` operator; its ``is_psd`` tag is
        consulted (see the module's structure rule).
    rank : int
        Rank ``r`` of the returned approximation, ``1 <= r <= n``.
    seed
        Seed or generator for the test matrix.
    oversampling : int
        Extra sketch columns beyond ``rank`` (default 10); they make the top ``rank``
        eigenpairs more accurate.

    Returns
    -------
    EighLinearOperator
        ``U diag(lam) U^T`` with ``U`` ``(n, rank)`` orthonormal and ``lam``
        non-negative, descending.

    Raises
    ------
    ValueError
        Non-square ``A``, ``rank`` not in ``[1, n]``, negative ``oversampling``; ``A``
        not declared symmetric and a symmetry probe shows it is not.
    TypeError
        Non-integer ``rank`` or ``oversampling``.
    FactorizationError
        If ``A`` is clearly not positive semi-definite (the core Cholesky fails; the
        message says so when ``A`` was declared PSD).

    Warns
    -----
    AssumptionWarning
        If ``A`` is not declared PSD.

    Notes
    -----
    With ``l > r + 1`` sketch columns the untruncated approximation ``A_l`` satisfies
    ``E ||A - A_l||_* <= (1 + r / (l - r - 1)) * sum_{j > r} lam_j(A)`` (nuclear norm;
    Tropp et al. 2017). Products: ``l`` columns in one ``matmat``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> rng = np.random.default_rng(0)
    >>> G = rng.standard_normal((50, 3))
    >>> A = aslinearoperator(G @ G.T, psd=True)  # rank 3
    >>> A_nys = nystrom(A, rank=3, seed=0)
    >>> bool(np.allclose(A_nys.to_dense(), G @ G.T))
    True
    """
    A = as_operator(A, "nystrom", nonempty=True)
    xp, n, dtype, dev = A.xp, A.shape[0], A.dtype, A.device
    rank = check_count(rank, "rank", "nystrom", minimum=1, maximum=n)
    oversampling = check_count(oversampling, "oversampling", "nystrom", minimum=0)
    require_structure(A, "nystrom", PSD)
    sketch_size = min(rank + oversampling, n)
    gen = as_generator(seed, xp, dev)
    Omega, _ = xp.linalg.qr(gen.normal((n, sketch_size), dtype))
    Y = A.matmat(Omega)
    nu = (n**0.5) * dtype_eps(dtype) * xp.linalg.matrix_norm(Y, ord="fro")
    Y_nu = Y + nu * Omega
    core = xp.matrix_transpose(Omega) @ Y_nu
    core = 0.5 * (core + xp.matrix_transpose(core))
    try:
        C = checked_cholesky(core, xp, name="Nystrom core matrix Omega^T A Omega")
    except FactorizationError as err:
        declared = (
            f" (the {type(A).__name__} is declared PSD: the declaration is wrong)"
            if A.is_psd
            else ""
        )
        raise FactorizationError(
            "nystrom: the Cholesky factorization of Omega^T A Omega failed, so A is not "
            f"positive semi-definite{declared} (or badly scaled). Nystrom needs a PSD "
            "operator; for indefinite operators use eigsh instead."
        ) from err
    # B = Y_nu C^{-T}, i.e. B^T = C^{-1} Y_nu^T (C lower triangular).
    B = xp.matrix_transpose(solve_triangular(C, xp.matrix_transpose(Y_nu), xp, lower=True))
    U, s, _ = xp.linalg.svd(B, full_matrices=False)
    lam = xp.maximum(s[:rank] ** 2 - nu, xp.zeros_like(s[:rank]))
    return EighLinearOperator(lam, U[:, :rank])


class NystromPreconditioner(LinearOperator):
    """Nystrom preconditioner for ``(A + mu I) x = b`` (Frangella, Tropp & Udell 2023).

    From a Nystrom approximation ``U diag(lam) U^T`` of ``A`` (``lam`` of length ``r``,
    smallest ``lam_r``), applies

    ``P^{-1} = (lam_r + mu) U diag(1 / (lam + mu)) U^T + (I - U U^T)``

    matrix-free (two thin products with ``U``). It maps the top eigendirections of
    ``A + mu I`` to eigenvalues near ``lam_r + mu`` and leaves the rest untouched, so
    CG on the preconditioned system converges at a rate set by the tail of the
    spectrum. It is symmetric positive definite; pass it as ``M=`` to
    :func:`curvlinops.cg`.

    Parameters
    ----------
    A_nys : EighLinearOperator
        A Nystrom approximation (from :func:`nystrom`) with non-negative eigenvalues.
    damping : float
        ``mu > 0``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import EighLinearOperator
    >>> U = np.eye(3)[:, :2]
    >>> P_inv = NystromPreconditioner(EighLinearOperator(np.array([9.0, 3.0]), U), 1.0)
    >>> (P_inv @ np.ones(3)).tolist()
    [0.4, 1.0, 1.0]
    """

    def __init__(self, A_nys, damping: float):
        if not isinstance(A_nys, EighLinearOperator):
            raise TypeError(
                "NystromPreconditioner needs the EighLinearOperator returned by "
                f"curvlinops.nystrom, got a {type(A_nys).__name__}."
            )
        damping = check_real(damping, "damping", "NystromPreconditioner", positive=True)
        super().__init__(A_nys.shape, dtype=A_nys.dtype, xp=A_nys.xp, device=A_nys.device, psd=True)
        xp = A_nys.xp
        lam = A_nys.eigenvalues
        if float(xp.min(lam)) < 0.0:
            raise ValueError(
                "NystromPreconditioner needs non-negative eigenvalues (a PSD approximation); "
                f"got a smallest eigenvalue of {float(xp.min(lam)):.3g}."
            )
        self.eigenvectors = A_nys.eigenvectors
        self.damping = damping
        # P^{-1} = I + U diag((lam_r + mu) / (lam + mu) - 1) U^T
        self._weights = (xp.min(lam) + damping) / (lam + damping) - 1.0

    def _matmat(self, X):
        U = self.eigenvectors
        return X + U @ (self._weights[:, None] * (self.xp.matrix_transpose(U) @ X))


def nystrom_preconditioner(A_nys, damping: float) -> NystromPreconditioner:
    """The :class:`NystromPreconditioner` of ``A_nys`` for ``A + damping * I``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> A = aslinearoperator(np.diag([100.0, 10.0, 1.0, 0.1]), psd=True)
    >>> P_inv = nystrom_preconditioner(nystrom(A, rank=2, oversampling=2, seed=0), 0.1)
    >>> P_inv.shape
    (4, 4)
    """
    return NystromPreconditioner(A_nys, damping)
