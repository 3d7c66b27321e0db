"""Randomized estimators of the trace, diagonal and squared Frobenius norm of an operator.

All estimators see the operator only through ``A.matmat``: the random probe vectors
are drawn on the operator's device with :class:`curvlinops.RandomGenerator` from an
explicit ``seed``, and multiplied in batches (one ``matmat`` per batch, never one
vector at a time). Probes are Rademacher (+-1) or standard normal; both satisfy
``E[v v^T] = I``, which makes every estimator here unbiased.

- :func:`hutchinson_trace`, :func:`hutchinson_diagonal`,
  :func:`hutchinson_squared_frobenius`: plain Monte-Carlo averages (Hutchinson 1989;
  Bekas, Kokiopoulou & Saad 2007 for the diagonal).
- :func:`hutchpp_trace`: Hutch++ (Meyer, Musco, Musco & Woodruff 2021): the trace of a
  sketched low-rank part exactly, Hutchinson on the deflated rest.
- :func:`xtrace`, :func:`xdiag`: XTrace and XDiag (Epperly, Tropp & Webber 2024):
  exchangeable estimators that reuse every probe both for the low-rank part and for the
  correction, by averaging leave-one-out estimates.

Results are 0-d arrays (trace, squared norm) or ``(n,)`` arrays (diagonal) of the
operator's namespace.

Structure: every estimator here is unbiased for any square operator, symmetric or
not, so none of them requires a structure tag (and none warns). The variance
formulas in the docstrings are for symmetric operators, and the fast ``1/m`` error
decay of Hutch++ and XTrace holds for PSD operators (or a fast-decaying spectrum).

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``._validation``.
"""

from __future__ import annotations

from .._backend import as_generator, dtype_eps, solve_triangular
from ._validation import as_operator, check_choice, check_count

__all__ = [
    "hutchinson_diagonal",
    "hutchinson_squared_frobenius",
    "hutchinson_trace",
    "hutchpp_trace",
    "xdiag",
    "xtrace",
]

_DISTRIBUTIONS = ("rademacher", "normal")


# -- shared helpers ---------------------------------------------------------------------


def _setup(A, num_matvecs, distribution, caller: str, minimum: int = 1, batch_size=None):
    """Validate the common arguments; return the square operator."""
    A = as_operator(A, caller)
    check_choice(distribution, "distribution", caller, _DISTRIBUTIONS)
    check_count(num_matvecs, "num_matvecs", caller, minimum=minimum)
    if batch_size is not None:
        check_count(batch_size, "batch_size", caller)
    return A


def _probes(gen, n: int, num: int, dtype, distribution: str):
    """``(n, num)`` probe vectors with ``E[v v^T] = I``."""
    if distribution == "rademacher":
        return gen.rademacher((n, num), dtype)
    return gen.normal((n, num), dtype)


def _batches(total: int, batch_size):
    """Sizes of consecutive batches that add up to ``total``."""
    if batch_size is None:
        return [total]
    sizes = [batch_size] * (total // batch_size)
    if total % batch_size:
        sizes.append(total % batch_size)
    return sizes


def _hutchinson_sum(A, num_matvecs, seed, distribution, batch_size, reduce):
    """Sum over all probes of ``reduce(V, A V)`` (a per-batch reduction over columns)."""
    gen = as_generator(seed, A.xp, A.device)
    total = None
    for size in _batches(num_matvecs, batch_size):
        V = _probes(gen, A.shape[0], size, A.dtype, distribution)
        part = reduce(V, A.matmat(V))
        total = part if total is None else total + part
    return total


# -- Hutchinson -------------------------------------------------------------------------


def hutchinson_trace(A, num_matvecs: int, *, seed=0, distribution="rademacher", batch_size=None):
    """Hutchinson's estimate ``(1/m) sum_i v_i^T A v_i`` of ``tr(A)``.

    Parameters
    ----------
    A : LinearOperator
        Square ``(n, n)`` operator.
    num_matvecs : int
        Number ``m`` of probe vectors (products with ``A``).
    seed
        Seed or generator for the probes.
    distribution : {"rademacher", "normal"}
        Distribution of the probe entries. Rademacher has the smaller variance
        ``2 (||A||_F^2 - sum_i A_ii^2) / m`` for symmetric ``A`` (normal: ``2 ||A||_F^2 / m``).
    batch_size : int, optional
        Probes per ``matmat`` (default: all at once).

    Returns
    -------
    0-d array
        The estimate, unbiased.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> A = aslinearoperator(np.diag([1.0, 2.0, 3.0]))
    >>> float(hutchinson_trace(A, 10, seed=0))  # exact for diagonal A with +-1 probes
    6.0
    """
    A = _setup(A, num_matvecs, distribution, "hutchinson_trace", batch_size=batch_size)
    xp = A.xp
    total = _hutchinson_sum(
        A, num_matvecs, seed, distribution, batch_size, lambda V, AV: xp.sum(V * AV)
    )
    return total / num_matvecs


def hutchinson_diagonal(A, num_matvecs: int, *, seed=0, distribution="rademacher", batch_size=None):
    """Hutchinson-type estimate ``(1/m) sum_i v_i * (A v_i)`` of ``diag(A)``.

    Parameters
    ----------
    A : LinearOperator
        Square ``(n, n)`` operator.
    num_matvecs : int
        Number ``m`` of probe vectors.
    seed
        Seed or generator for the probes.
    distribution : {"rademacher", "normal"}
        Distribution of the probe entries. With Rademacher probes entry ``j`` has
        variance ``sum_{k != j} A_jk^2 / m``.
    batch_size : int, optional
        Probes per ``matmat`` (default: all at once).

    Returns
    -------
    array
        ``(n,)`` unbiased estimate of the diagonal.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> A = aslinearoperator(np.diag([1.0, 2.0, 3.0]))
    >>> hutchinson_diagonal(A, 5, seed=0).tolist()
    [1.0, 2.0, 3.0]
    """
    A = _setup(A, num_matvecs, distribution, "hutchinson_diagonal", batch_size=batch_size)
    xp = A.xp
    total = _hutchinson_sum(
        A, num_matvecs, seed, distribution, batch_size, lambda V, AV: xp.sum(V * AV, axis=1)
    )
    return total / num_matvecs


def hutchinson_squared_frobenius(
    A, num_matvecs: int, *, seed=0, distribution="rademacher", batch_size=None
):
    """Estimate ``(1/m) sum_i ||A v_i||^2`` of ``||A||_F^2 = tr(A^T A)``.

    Parameters
    ----------
    A : LinearOperator
        Square ``(n, n)`` operator.
    num_matvecs : int
        Number ``m`` of probe vectors.
    seed
        Seed or generator for the probes.
    distribution : {"rademacher", "normal"}
        Distribution of the probe entries.
    batch_size : int, optional
        Probes per ``matmat`` (default: all at once).

    Returns
    -------
    0-d array
        The unbiased estimate of the squared Frobenius norm.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> A = aslinearoperator(np.diag([1.0, 2.0, 3.0]))
    >>> float(hutchinson_squared_frobenius(A, 4, seed=0))  # 1 + 4 + 9, exact here
    14.0
    """
    A = _setup(A, num_matvecs, distribution, "hutchinson_squared_frobenius", batch_size=batch_size)
    xp = A.xp
    total = _hutchinson_sum(
        A, num_matvecs, seed, distribution, batch_size, lambda V, AV: xp.sum(AV * AV)
    )
    return total / num_matvecs


# -- Hutch++ ----------------------------------------------------------------------------


def hutchpp_trace(A, num_matvecs: int, *, seed=0, distribution="rademacher"):
    """Hutch++ estimate of ``tr(A)`` (Meyer, Musco, Musco & Woodruff 2021).

    Splits the budget ``m`` into ``s = m // 3`` sketch vectors ``S`` and ``g = m - 2 s``
    Hutchinson probes ``G``. With ``Q`` an orthonormal basis of ``A S``, the estimate is
    ``tr(Q^T A Q) + (1/g) tr(G^T P A P G)``, ``P = I - Q Q^T``: the top of the
    spectrum is captured exactly, Hutchinson only sees the deflated rest. Two
    ``matmat`` calls: ``A S``, then ``A [Q, P G]``.

    Parameters
    ----------
    A : LinearOperator
        Square ``(n, n)`` operator.
    num_matvecs : int
        Budget ``m >= 3`` of products with ``A``.
    seed
        Seed or generator for ``S`` and ``G``.
    distribution : {"rademacher", "normal"}
        Distribution of the entries of ``S`` and ``G``.

    Returns
    -------
    0-d array
        The unbiased estimate. For PSD ``A`` its error decays like ``1/m`` (Hutchinson:
        ``1/sqrt(m)``).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> A = aslinearoperator(np.diag([5.0, 1.0, 0.0, 0.0]))
    >>> round(float(hutchpp_trace(A, 9, seed=0)), 10)  # rank 2 <= m // 3: exact
    6.0
    """
    A = _setup(A, num_matvecs, distribution, "hutchpp_trace", minimum=3)
    xp, n = A.xp, A.shape[0]
    gen = as_generator(seed, xp, A.device)
    num_sketch = num_matvecs // 3
    num_probes = num_matvecs - 2 * num_sketch
    S = _probes(gen, n, num_sketch, A.dtype, distribution)
    G = _probes(gen, n, num_probes, A.dtype, distribution)
    Q, _ = xp.linalg.qr(A.matmat(S))
    G_deflated = G - Q @ (xp.matrix_transpose(Q) @ G)
    AX = A.matmat(xp.concat([Q, G_deflated], axis=1))
    low_rank = xp.sum(Q * AX[:, :num_sketch])
    rest = xp.sum(G_deflated * AX[:, num_sketch:])
    return low_rank + rest / num_probes


# -- XTrace / XDiag ---------------------------------------------------------------------


class _ExchangeableSketch:
    """The quantities XTrace and XDiag share, from ``s`` probes ``Omega`` (n, s).

    ``Y = A Omega = Q R`` (thin QR) and ``Z = A Q``: two matmats. Leaving probe ``i`` out,
    the basis of ``A Omega_{-i}`` is ``Q`` minus the unit direction ``Q s_i`` with
    ``s_i`` the normalized column ``i`` of ``R^{-T}`` (it is orthogonal to every
    ``y_j = Q r_j``, ``j != i``). Hence the projector is ``P_i = Q Q^T - Q s_i s_i^T Q^T``,
    and ``(I - P_i) omega_i = omega_i - Q c_i`` with ``c_i = w_i - s_i (s_i^T w_i)``,
    ``W = Q^T Omega``. Everything below is a batched formula over ``i``.
    """

    def __init__(self, A, num_probes, seed, distribution):
        xp, n = A.xp, A.shape[0]
        self.xp = xp
        gen = as_generator(seed, xp, A.device)
        self.Omega = _probes(gen, n, num_probes, A.dtype, distribution)
        self.Y = A.matmat(self.Omega)
        self.Q, self.R = xp.linalg.qr(self.Y)
        self.Z = A.matmat(self.Q)
        self.full_rank = self._is_full_rank(A.dtype)
        if self.full_rank:
            s = num_probes
            eye = xp.eye(s, dtype=A.dtype, device=A.device)
            S = solve_triangular(xp.matrix_transpose(self.R), eye, xp, lower=True)
            self.S = S / xp.linalg.vector_norm(S, axis=0)[None, :]
            self.W = xp.matrix_transpose(self.Q) @ self.Omega
            d = xp.sum(self.S * self.W, axis=0)
            self.C = self.W - self.S * d[None, :]

    def _is_full_rank(self, dtype) -> bool:
        """Whether ``A Omega`` has numerically full column rank.

        If not, the range of ``A`` lies (up to a relative ``sqrt(eps)``) in that of
        ``Q`` already, the leave-one-out directions are undefined, and the low-rank
        part alone is the estimate.
        """
        xp = self.xp
        r = xp.abs(xp.linalg.diagonal(self.R))
        largest = float(xp.max(r))
        return largest > 0.0 and float(xp.min(r)) > dtype_eps(dtype) ** 0.5 * largest


def xtrace(A, num_matvecs: int, *, seed=0, distribution="rademacher"):
    """XTrace estimate of ``tr(A)`` (Epperly, Tropp & Webber 2024).

    With ``s = num_matvecs // 2`` probes ``omega_i``: for each ``i``, the trace of the
    projection of ``A`` onto the range of ``A Omega_{-i}`` (all probes but ``i``) plus a
    Hutchinson correction with ``omega_i`` on the deflated rest; the estimate is the
    average of these ``s`` unbiased estimates. Every probe serves both the low-rank
    part and the correction; products: ``A Omega`` and ``A Q``, two ``matmat`` calls.

    Parameters
    ----------
    A : LinearOperator
        Square ``(n, n)`` operator (symmetry is not needed).
    num_matvecs : int
        Budget of products with ``A``, at least 2 (an odd budget leaves one unused).
    seed
        Seed or generator for the probes.
    distribution : {"rademacher", "normal"}
        Distribution of the probe entries.

    Returns
    -------
    0-d array
        The unbiased estimate.

    Notes
    -----
    If ``A Omega`` is numerically rank deficient (``A`` of rank below ``s``, up to a
    relative ``sqrt(eps)``), the range of ``A`` is already captured and
    ``tr(Q^T A Q)`` is returned.

    The leave-one-out quantities come from one QR factorization ``A Omega = Q R``:
    removing probe ``i`` removes the direction ``Q s_i``, ``s_i`` the normalized
    column ``i`` of ``R^{-T}``. The optional rescaling of Gaussian probes to norm
    ``sqrt(n)`` discussed in the paper is not applied (Rademacher probes have that
    norm already).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> A = aslinearoperator(np.diag(2.0 ** -np.arange(30)))  # fast spectral decay
    >>> err = abs(float(xtrace(A, 20, seed=0)) - float(np.sum(2.0 ** -np.arange(30))))
    >>> err < 1e-3
    True
    """
    A = _setup(A, num_matvecs, distribution, "xtrace", minimum=2)
    sk = _ExchangeableSketch(A, num_matvecs // 2, seed, distribution)
    xp = sk.xp
    H = xp.matrix_transpose(sk.Q) @ sk.Z
    trace_H = xp.linalg.trace(H)
    if not sk.full_rank:
        return trace_H
    S, W, C, R = sk.S, sk.W, sk.C, sk.R
    T = xp.matrix_transpose(sk.Z) @ sk.Omega
    # tr(P_i A) = tr(H) - s_i^T H s_i
    low_rank = trace_H - xp.sum(S * (H @ S), axis=0)
    # (omega_i - Q c_i)^T A (omega_i - Q c_i), using Q^T A omega_i = r_i and
    # omega_i^T A Q = t_i^T with T = Z^T Omega.
    correction = (
        xp.sum(W * R, axis=0)
        - xp.sum(T * C, axis=0)
        - xp.sum(C * R, axis=0)
        + xp.sum(C * (H @ C), axis=0)
    )
    return xp.mean(low_rank + correction)


def xdiag(A, num_matvecs: int, *, seed=0, distribution="rademacher"):
    """XDiag estimate of ``diag(A)`` (Epperly, Tropp & Webber 2024).

    The diagonal counterpart of :func:`xtrace`: for each probe ``i``, the diagonal of
    ``A P_i`` (``P_i`` the projector onto the range of ``A Omega_{-i}``) plus the
    Hutchinson-type correction ``omega_i * (A (I - P_i) omega_i)``, averaged over ``i``.
    Products: ``A Omega`` and ``A Q``, two ``matmat`` calls.

    Parameters
    ----------
    A : LinearOperator
        Square ``(n, n)`` operator.
    num_matvecs : int
        Budget of products with ``A``, at least 2 (an odd budget leaves one unused).
    seed
        Seed or generator for the probes.
    distribution : {"rademacher", "normal"}
        Distribution of the probe entries.

    Returns
    -------
    array
        ``(n,)`` unbiased estimate of the diagonal.

    Notes
    -----
    If ``A Omega`` is numerically rank deficient, ``diag(A Q Q^T)`` is returned (exact
    when the range of ``A`` is captured, see :func:`xtrace`).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> rng = np.random.default_rng(0)
    >>> G = rng.standard_normal((20, 3))
    >>> A = aslinearoperator(G @ G.T)  # rank 3 < 10 probes
    >>> bool(np.allclose(xdiag(A, 20, seed=0), np.diag(G @ G.T)))
    True
    """
    A = _setup(A, num_matvecs, distribution, "xdiag", minimum=2)
    sk = _ExchangeableSketch(A, num_matvecs // 2, seed, distribution)
    xp = sk.xp
    Q, Z = sk.Q, sk.Z
    # diag(A Q Q^T): row-wise dot products of Z = A Q and Q.
    diag_low_rank = xp.sum(Z * Q, axis=1)
    if not sk.full_rank:
        return diag_low_rank
    s = sk.S.shape[0]
    S, C = sk.S, sk.C
    # diag(A P_i) = diag(A Q Q^T) - (Z s_i) * (Q s_i), averaged over i.
    removed = xp.sum((Z @ S) * (Q @ S), axis=1) / s
    # omega_i * (A (I - P_i) omega_i) = omega_i * (y_i - Z c_i), averaged over i.
    correction = xp.sum(sk.Omega * (sk.Y - Z @ C), axis=1) / s
    return diag_low_rank - removed + correction
