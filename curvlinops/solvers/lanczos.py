"""Lanczos with full reorthogonalization, thick-restart ``eigsh`` and power iteration.

The Krylov core is batched: it runs one Lanczos recurrence per column of a block of
start vectors, so that each step costs ONE ``matmat`` with the operator however many
recurrences run (stochastic Lanczos quadrature runs one per probe). Every new basis
vector is reorthogonalized against the whole basis of its recurrence (classical
Gram-Schmidt repeated until it stops losing norm), which keeps the Ritz values free of
the spurious copies that plain three-term Lanczos produces in finite precision.

Public functions:

- :func:`lanczos`: ``num_steps`` steps from one start vector; the tridiagonal
  coefficients and the orthonormal basis (:class:`LanczosResult`).
- :func:`eigsh`: ``k`` extreme eigenpairs of a symmetric operator by thick-restart
  Lanczos (sorted ascending like :func:`scipy.sparse.linalg.eigsh`).
- :func:`power_iteration`: the eigenpair of largest magnitude.

All three need a symmetric operator: they consult its ``is_symmetric`` tag under the
structure rule of ``._validation`` (silent when declared; otherwise a symmetry probe,
an error if it fails and an :class:`~curvlinops.AssumptionWarning` if it passes).

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``._common``, ``._validation``.
"""

from __future__ import annotations

from typing import NamedTuple

from .._backend import array_namespace, as_generator, device as _device_of, dtype_eps
from ._common import ConvergenceError
from ._validation import (
    SYMMETRIC,
    as_operator,
    check_choice,
    check_count,
    check_real,
    check_vector,
    require_structure,
)

__all__ = ["LanczosResult", "eigsh", "lanczos", "power_iteration"]

_WHICH = ("LA", "SA", "LM")


# -- start vectors ---------------------------------------------------------------------


def _unit_start_vectors(A, v0, num: int, gen, caller: str):
    """Start vectors as a ``(num, n)`` block of unit rows (random when ``v0`` is None)."""
    xp, n = A.xp, A.shape[0]
    if v0 is None:
        V = gen.normal((num, n), A.dtype)
    else:
        v0 = check_vector(A, v0, caller, "start vector v0", ndim=1).array
        V = v0[None, :]
    norms = xp.linalg.vector_norm(V, axis=1)
    if float(xp.min(norms)) == 0.0:
        raise ValueError(f"{caller}: the start vector v0 is zero; pass a non-zero vector.")
    return V / norms[:, None]


# -- the batched Krylov core ------------------------------------------------------------


def _row_norms(W, xp):
    return xp.sqrt(xp.sum(W * W, axis=1))


def _project_out(basis, basis_T, W, xp):
    """Remove from each row of ``W`` (b, n) its components along ``basis`` (b, n, j)."""
    coeffs = (basis_T @ W[:, :, None])[:, :, 0]
    return W - (basis @ coeffs[:, :, None])[:, :, 0], coeffs


def _orthogonalize(basis, W, xp, max_passes: int = 4):
    """Classical Gram-Schmidt against ``basis``, repeated while a pass removes much.

    Two passes suffice unless ``W`` lies almost in the span ("twice is enough",
    Kahan/Parlett); a further pass runs only while some row lost more than half its
    norm in the previous one. Returns the orthogonalized rows, the accumulated
    coefficients and the final row norms.
    """
    basis_T = xp.matrix_transpose(basis)
    W, coeffs = _project_out(basis, basis_T, W, xp)
    norms = _row_norms(W, xp)
    for _ in range(max_passes - 1):
        W, more = _project_out(basis, basis_T, W, xp)
        coeffs = coeffs + more
        new_norms = _row_norms(W, xp)
        shrank = bool(xp.any(new_norms < 0.5 * norms))
        norms = new_norms
        if not shrank:
            break
    return W, coeffs, norms


def _krylov_steps(A, basis, start: int, V, num_steps: int, gen):
    """Extend orthonormal Krylov bases by ``num_steps`` steps, one matmat per step.

    The bases live in a fixed-size array whose unused columns are zero (they drop out
    of the Gram-Schmidt projections): every step works on arrays of the same shapes,
    which JAX compiles once and GPUs allocate once.

    Parameters
    ----------
    A
        Square ``(n, n)`` operator.
    basis
        ``(b, n, m)`` orthonormal columns ``0 .. start - 1`` per recurrence, zeros after.
    start
        Index of the first column to fill; ``start + num_steps <= min(m, n)``.
    V
        ``(b, n)`` unit rows orthogonal to the filled columns: the next basis vectors.
    num_steps
        Steps to take.
    gen
        Random generator, used only to restart a recurrence that broke down.

    Returns
    -------
    basis
        ``(b, n, m)`` with columns up to ``start + num_steps - 1`` filled.
    V
        ``(b, n)`` unit rows continuing the recurrences (zeros once a basis spans the
        whole space).
    coeffs
        List of ``(b, m)`` arrays: ``basis^T A v_j`` for the vector ``v_j`` placed in
        column ``j`` (entry ``j`` is the Lanczos ``alpha``, entries after it are 0).
    norms
        List of ``(b,)`` arrays: the norm of the new direction (the Lanczos ``beta``);
        0 where a recurrence broke down and restarted from a random direction.
    """
    xp = A.xp
    b, n, m = basis.shape
    eps = dtype_eps(A.dtype)
    columns = xp.arange(m, device=_device_of(basis))
    coeffs_list, norms_list = [], []
    for j in range(start, start + num_steps):
        basis = xp.where((columns == j)[None, None, :], V[:, :, None], basis)
        AV = xp.matrix_transpose(A.matmat(xp.matrix_transpose(V)))
        scale = _row_norms(AV, xp)
        W, coeffs, norms = _orthogonalize(basis, AV, xp)
        coeffs_list.append(coeffs)
        if j + 1 == n:
            # The basis spans the space: A maps it into itself, nothing is left.
            norms_list.append(xp.zeros_like(norms))
            V = xp.zeros_like(V)
            break
        # A direction that is rounding noise relative to A v means an invariant
        # subspace was found: continue from a fresh random direction with beta = 0,
        # which decouples the tridiagonal matrix into exact blocks.
        broken = norms <= 10.0 * eps * scale
        safe = xp.where(broken, xp.ones_like(norms), norms)
        V = W / safe[:, None]
        if bool(xp.any(broken)):
            fresh, _, fresh_norms = _orthogonalize(basis, gen.normal((b, n), A.dtype), xp)
            fresh = fresh / fresh_norms[:, None]
            V = xp.where(broken[:, None], fresh, V)
            norms = xp.where(broken, xp.zeros_like(norms), norms)
        norms_list.append(norms)
    return basis, V, coeffs_list, norms_list


def _tridiagonal(alphas, betas, xp):
    """Symmetric tridiagonal matrices ``(..., m, m)`` from ``alphas (..., m)`` and the
    off-diagonal ``betas (..., m - 1)``."""
    m = alphas.shape[-1]
    dtype = alphas.dtype
    dev = _device_of(alphas)
    T = xp.eye(m, dtype=dtype, device=dev) * alphas[..., None, :]
    if m > 1:
        zero = xp.zeros(betas.shape[:-1] + (1,), dtype=dtype, device=dev)
        upper = (
            xp.eye(m, k=1, dtype=dtype, device=dev)
            * xp.concat([zero, betas], axis=-1)[..., None, :]
        )
        T = T + upper + xp.matrix_transpose(upper)
    return T


def _batched_lanczos(A, V0, num_steps: int, gen):
    """Lanczos from each row of ``V0`` (b, n) (unit rows), all in one matmat per step.

    Returns ``alphas (b, m)``, ``betas (b, m)`` (``betas[:, i]`` couples basis vectors
    ``i`` and ``i + 1``; the last is the residual norm) and the bases ``(b, n, m)``.
    """
    xp = A.xp
    b, n = V0.shape
    basis = xp.zeros((b, n, num_steps), dtype=A.dtype, device=_device_of(V0))
    basis, _, coeffs, norms = _krylov_steps(A, basis, 0, V0, num_steps, gen)
    alphas = xp.linalg.diagonal(xp.stack(coeffs, axis=1))
    betas = xp.stack(norms, axis=1)
    return alphas, betas, basis


# -- public functions -------------------------------------------------------------------


class LanczosResult(NamedTuple):
    """Output of :func:`lanczos`: ``A Q = Q T + residual q_next e_m^T``.

    Attributes
    ----------
    alphas
        ``(m,)`` diagonal of the tridiagonal matrix ``T``.
    betas
        ``(m - 1,)`` off-diagonal of ``T``.
    residual
        0-d array: norm of the part of ``A q_m`` outside the basis (0 when the Krylov
        space is invariant).
    basis
        ``(n, m)`` orthonormal Lanczos vectors ``Q``.
    """

    alphas: object
    betas: object
    residual: object
    basis: object

    def tridiagonal(self):
        """The ``(m, m)`` symmetric tridiagonal matrix ``T = Q^T A Q``."""
        xp = array_namespace(self.alphas)
        return _tridiagonal(self.alphas, self.betas, xp)


def lanczos(A, num_steps: int, *, v0=None, seed=0) -> LanczosResult:
    """Run ``num_steps`` Lanczos steps with full reorthogonalization.

    Builds an orthonormal basis ``Q`` of the Krylov space
    ``span(v0, A v0, ..., A^{m-1} v0)`` and the tridiagonal ``T = Q^T A Q`` (one
    product with ``A`` per step). If the Krylov space becomes invariant early, the
    recurrence continues from a random direction orthogonal to the basis, with a zero
    off-diagonal entry: ``T`` then splits into blocks whose eigenvalues are exact.

    Parameters
    ----------
    A : LinearOperator
        Symmetric ``(n, n)`` operator.
    num_steps : int
        Number of steps ``m`` (``1 <= m <= n``).
    v0
        Start vector ``(n,)`` of ``A``'s namespace (normalized internally); drawn from
        a standard normal with ``seed`` when None.
    seed
        Seed or generator for the start vector and for restarts after a breakdown.

    Returns
    -------
    LanczosResult
        ``(alphas, betas, residual, basis)``; ``result.tridiagonal()`` builds ``T``.

    Raises
    ------
    ValueError
        If ``A`` is not square, ``num_steps`` is not in ``[1, n]``, or ``A`` is not
        declared symmetric and a symmetry probe shows it is not.
    TypeError
        A non-integer ``num_steps``, a ``v0`` of another library or dtype.

    Warns
    -----
    AssumptionWarning
        If ``A`` is not declared symmetric (and the probe passed).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> A = aslinearoperator(np.diag([1.0, 2.0, 3.0, 4.0]), symmetric=True)
    >>> res = lanczos(A, 4, seed=0)
    >>> np.round(np.linalg.eigvalsh(res.tridiagonal()), 8).tolist()
    [1.0, 2.0, 3.0, 4.0]
    """
    A = as_operator(A, "lanczos", nonempty=True)
    n = A.shape[0]
    num_steps = check_count(num_steps, "num_steps", "lanczos", minimum=1, maximum=n)
    require_structure(A, "lanczos", SYMMETRIC)
    gen = as_generator(seed, A.xp, A.device)
    V0 = _unit_start_vectors(A, v0, 1, gen, "lanczos")
    alphas, betas, basis = _batched_lanczos(A, V0, num_steps, gen)
    return LanczosResult(alphas[0, :], betas[0, :-1], betas[0, -1], basis[0, :, :])


def _wanted_order(theta, which: str, xp):
    """Indices of Ritz values from most to least wanted."""
    if which == "LA":
        return xp.argsort(theta, descending=True)
    if which == "SA":
        return xp.argsort(theta)
    return xp.argsort(xp.abs(theta), descending=True)


def _projected_matrix(kept_theta, coeffs, m: int, xp, dtype, dev):
    """Symmetric ``(m, m)`` projection ``V^T A V`` of one thick-restart cycle.

    The first ``p`` basis vectors are kept Ritz vectors (projection ``diag(kept_theta)``);
    the columns of the others come from their Gram-Schmidt coefficients, which hold
    the upper triangle (the arrow row of the restart and the tridiagonal part).
    """
    eye = xp.eye(m, dtype=dtype, device=dev)
    cols = []
    if kept_theta is not None:
        p = kept_theta.shape[0]
        padded = xp.concat([kept_theta, xp.zeros((m - p,), dtype=dtype, device=dev)])
        cols.append(eye[:, :p] * padded[:, None])
    cols.append(xp.stack([c[0, :] for c in coeffs], axis=1))
    upper = xp.concat(cols, axis=1)
    diag = xp.linalg.diagonal(upper)
    # Keep the upper triangle (incl. diagonal) and mirror it.
    upper = upper * _upper_mask(m, xp, dtype, dev)
    return upper + xp.matrix_transpose(upper) - eye * diag[None, :]


def _upper_mask(m, xp, dtype, dev):
    idx = xp.arange(m, device=dev)
    return xp.astype(idx[:, None] <= idx[None, :], dtype)


def eigsh(A, k: int = 6, *, which: str = "LA", maxiter=None, tol=None, ncv=None, v0=None, seed=0):
    """``k`` eigenpairs of a symmetric operator by thick-restart Lanczos.

    Each cycle extends an orthonormal basis of ``ncv`` vectors by Lanczos steps with
    full reorthogonalization (one product with ``A`` per step), computes Ritz pairs
    from the projected matrix, and, until the ``k`` wanted pairs have converged,
    restarts with the most wanted Ritz vectors plus the residual direction (thick
    restart, Wu & Simon 2000), which keeps the Krylov relation exact.

    Parameters
    ----------
    A : LinearOperator
        Symmetric ``(n, n)`` operator; its ``is_symmetric`` tag is consulted (see
        :func:`lanczos`).
    k : int
        Number of eigenpairs, ``1 <= k < n``.
    which : {"LA", "SA", "LM"}
        Largest algebraic, smallest algebraic, or largest magnitude eigenvalues.
    maxiter : int, optional
        Maximum number of products with ``A`` over all cycles, checked after each
        cycle (default ``max(100, 10 n)``).
    tol : float, optional
        A pair is converged when its residual ``||A q - lam q||`` is at most
        ``tol * max |Ritz value|``. Default: ``100 * eps`` of ``A``'s dtype.
    ncv : int, optional
        Basis size per cycle, ``k < ncv <= n``; default ``min(n, max(2k + 1, 20))``.
    v0
        Start vector ``(n,)``; random (from ``seed``) when None.
    seed
        Seed or generator for the start vector and for breakdown restarts.

    Returns
    -------
    eigenvalues
        ``(k,)`` array, ascending.
    eigenvectors
        ``(n, k)`` orthonormal columns in ``A``'s namespace, device and dtype.

    Raises
    ------
    ValueError
        Non-square ``A``, ``k`` not in ``[1, n)``, ``ncv`` not in ``(k, n]``, unknown
        ``which``; ``A`` not declared symmetric and a symmetry probe shows it is not.
    TypeError
        Non-integer ``k``, ``ncv`` or ``maxiter``, non-number ``tol``.
    ConvergenceError
        If the pairs have not converged after ``maxiter`` products (a subclass of
        RuntimeError; the message says how many pairs reached ``tol``).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> A = aslinearoperator(np.diag(np.arange(1.0, 31.0)), symmetric=True)
    >>> lam, Q = eigsh(A, k=3, which="LA")
    >>> np.round(lam, 8).tolist(), Q.shape
    ([28.0, 29.0, 30.0], (30, 3))
    """
    A = as_operator(A, "eigsh", nonempty=True)
    xp, n, dtype, dev = A.xp, A.shape[0], A.dtype, A.device
    which = check_choice(which, "which", "eigsh", _WHICH)
    k = check_count(k, "k", "eigsh", minimum=1)
    if k >= n:
        raise ValueError(
            f"eigsh: k must be smaller than the dimension n = {n}, got k = {k}. "
            "For all eigenpairs, densify the operator and use a dense eigh."
        )
    if ncv is None:
        ncv = min(n, max(2 * k + 1, 20))
    else:
        ncv = check_count(ncv, "ncv", "eigsh", minimum=k + 1, maximum=n)
    maxiter = max(100, 10 * n) if maxiter is None else check_count(maxiter, "maxiter", "eigsh")
    tol = 100.0 * dtype_eps(dtype) if tol is None else check_real(tol, "tol", "eigsh", minimum=0)
    require_structure(A, "eigsh", SYMMETRIC)

    gen = as_generator(seed, xp, dev)
    V = _unit_start_vectors(A, v0, 1, gen, "eigsh")
    basis = xp.zeros((1, n, ncv), dtype=dtype, device=dev)
    kept_theta, num_kept, num_products = None, 0, 0
    while True:
        basis, V, coeffs, norms = _krylov_steps(A, basis, num_kept, V, ncv - num_kept, gen)
        num_products += len(coeffs)
        T = _projected_matrix(kept_theta, coeffs, ncv, xp, dtype, dev)
        theta, S = xp.linalg.eigh(T)
        order = _wanted_order(theta, which, xp)
        top = order[:k]
        # Residual of Ritz pair i: |beta_last * S[last, i]| (exactly 0 once the basis
        # spans the whole space).
        residuals = xp.abs(norms[-1][0] * xp.take(S[ncv - 1, :], top))
        bound = tol * float(xp.max(xp.abs(theta)))
        converged = float(xp.max(residuals)) <= bound
        if converged or num_products >= maxiter:
            if not converged:
                num_conv = int(xp.sum(xp.astype(residuals <= bound, xp.int32)))
                raise ConvergenceError(
                    f"eigsh did not converge within maxiter = {maxiter} products with A: "
                    f"{num_conv} of {k} pairs reached tol = {tol:g}. Increase maxiter or "
                    "ncv, or loosen tol."
                )
            return _sorted_pairs(theta, S, top, basis[0, :, :], xp)
        # Thick restart: keep the most wanted Ritz vectors; V (the residual direction,
        # orthogonal to all of them) continues the recurrence.
        num_kept = min(k + (ncv - k) // 2, ncv - 1)
        keep = order[:num_kept]
        kept = basis[0, :, :] @ xp.take(S, keep, axis=1)
        pad = xp.zeros((n, ncv - num_kept), dtype=dtype, device=dev)
        basis = xp.concat([kept, pad], axis=1)[None, :, :]
        kept_theta = xp.take(theta, keep)


def _sorted_pairs(theta, S, idx, Q, xp):
    lam = xp.take(theta, idx)
    order = xp.argsort(lam)
    idx = xp.take(idx, order)
    return xp.take(theta, idx), Q @ xp.take(S, idx, axis=1)


def power_iteration(A, *, maxiter: int = 1000, tol=None, seed=0, v0=None):
    """The eigenpair of largest magnitude by power iteration.

    Converges linearly with rate ``|lam_2 / lam_1|``; it needs a gap between the two
    largest magnitudes (for clustered spectra use :func:`eigsh` with ``which="LM"``).

    Parameters
    ----------
    A : LinearOperator
        Symmetric ``(n, n)`` operator; its ``is_symmetric`` tag is consulted (see
        :func:`lanczos`).
    maxiter : int
        Maximum number of products with ``A``.
    tol : float, optional
        Stop when ``||A v - lam v|| <= tol * |lam|``. Default: ``sqrt(eps)`` of
        ``A``'s dtype.
    seed
        Seed or generator for the random start vector.
    v0
        Start vector ``(n,)`` (overrides the random one).

    Returns
    -------
    eigenvalue
        0-d array (the Rayleigh quotient, with sign).
    eigenvector
        ``(n,)`` unit vector.

    Raises
    ------
    ConvergenceError
        If the residual tolerance is not reached within ``maxiter`` products (a
        subclass of RuntimeError).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> A = aslinearoperator(np.diag([1.0, -2.0, 10.0]), symmetric=True)
    >>> lam, v = power_iteration(A, seed=0)
    >>> round(float(lam), 6), np.round(np.abs(v), 6).tolist()
    (10.0, [0.0, 0.0, 1.0])
    """
    who = "power_iteration"
    A = as_operator(A, who, nonempty=True)
    xp = A.xp
    maxiter = check_count(maxiter, "maxiter", who)
    tol = dtype_eps(A.dtype) ** 0.5 if tol is None else check_real(tol, "tol", who, minimum=0)
    require_structure(A, who, SYMMETRIC)
    gen = as_generator(seed, xp, A.device)
    v = _unit_start_vectors(A, v0, 1, gen, "power_iteration")[0, :]
    residual = float("inf")
    for _ in range(maxiter):
        w = A.matvec(v)
        lam = xp.vecdot(v, w)
        residual = float(xp.linalg.vector_norm(w - lam * v))
        if residual <= tol * abs(float(lam)):
            return lam, v
        norm = xp.linalg.vector_norm(w)
        if float(norm) == 0.0:  # v spans part of the null space: eigenvalue 0
            return lam, v
        v = w / norm
    raise ConvergenceError(
        f"power_iteration did not converge within maxiter = {maxiter} products: residual "
        f"{residual:.3g} > tol * |lam|. The two largest-magnitude eigenvalues may be "
        "(nearly) equal in size; use eigsh(A, k=2, which='LM') instead."
    )
