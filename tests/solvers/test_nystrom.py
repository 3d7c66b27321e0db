"""Tests of curvlinops.solvers.nystrom: randomized Nystrom and its PCG preconditioner.

References: dense NumPy float64 matrices, numpy.linalg.eigh, the expected-error bound
of Tropp, Yurtsever, Udell & Cevher (2017), and unpreconditioned CG.
"""

from __future__ import annotations

import numpy as np
import pytest

from curvlinops import (
    AssumptionWarning,
    DiagonalLinearOperator,
    EighLinearOperator,
    FactorizationError,
    NystromPreconditioner,
    aslinearoperator,
    cg,
    nystrom,
    nystrom_preconditioner,
)


def _psd(eigenvalues, seed=0):
    n = len(eigenvalues)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    A = (Q * np.asarray(eigenvalues)) @ Q.T
    return 0.5 * (A + A.T)


def _nuclear(M):
    return np.abs(np.linalg.eigvalsh(0.5 * (M + M.T))).sum()


def test_nystrom_exact_on_low_rank(backend):
    n, r = 60, 5
    G = np.random.default_rng(0).standard_normal((n, r))
    A = G @ G.T
    A_nys = nystrom(aslinearoperator(backend.asarray(A), psd=True), rank=r, seed=1)
    assert isinstance(A_nys, EighLinearOperator) and A_nys.rank == r
    lam = backend.to_numpy(A_nys.eigenvalues)
    U = backend.to_numpy(A_nys.eigenvectors)
    assert U.shape == (n, r) and lam.shape == (r,)
    np.testing.assert_allclose(U.T @ U, np.eye(r), atol=1e-12)
    scale = np.linalg.norm(A, 2)
    np.testing.assert_allclose((U * lam) @ U.T, A, atol=1e-9 * scale)
    np.testing.assert_allclose(np.sort(lam), np.linalg.eigvalsh(A)[-r:], atol=1e-9 * scale)


def test_nystrom_expected_error_bound(backend):
    """Mean nuclear-norm error over seeds against the bound of Tropp et al. (2017),
    E||A - A_hat||_* <= (1 + r/(l-r-1)) * sum_{j>r} lam_j for a Gaussian sketch of size
    l > r + 1, for the untruncated approximation (any r) and for its rank-r truncation
    (their fixed-rank theorem). The means are tested at 3 standard errors."""
    n, l, num_seeds = 60, 12, 20
    spectrum = 1.0 / np.arange(1, n + 1) ** 2
    A = _psd(spectrum, seed=3)
    op = aslinearoperator(backend.asarray(A), psd=True)
    lam_desc = np.sort(spectrum)[::-1]
    tail = np.array([lam_desc[r:].sum() for r in range(n)])

    full = [
        _nuclear(A - backend.to_numpy(nystrom(op, l, oversampling=0, seed=s).to_dense()))
        for s in range(num_seeds)
    ]
    mean, se = np.mean(full), np.std(full, ddof=1) / np.sqrt(num_seeds)
    bound = min((1 + r / (l - r - 1)) * tail[r] for r in range(1, l - 1))
    assert mean - 3 * se <= bound

    r = 6
    trunc = [
        _nuclear(A - backend.to_numpy(nystrom(op, r, oversampling=l - r, seed=s).to_dense()))
        for s in range(num_seeds)
    ]
    mean, se = np.mean(trunc), np.std(trunc, ddof=1) / np.sqrt(num_seeds)
    assert mean - 3 * se <= (1 + r / (l - r - 1)) * tail[r]
    # and it is never better than the best rank-r approximation
    assert min(trunc) >= tail[r] * (1 - 1e-8)


def test_nystrom_float32(backend):
    n, r = 60, 5
    G = np.random.default_rng(5).standard_normal((n, r))
    A = G @ G.T
    A_nys = nystrom(aslinearoperator(backend.asarray(A, "float32"), psd=True), r, seed=0)
    assert A_nys.dtype == backend.dtype("float32")
    dense = backend.to_numpy(A_nys.to_dense()).astype(np.float64)
    np.testing.assert_allclose(dense, A, atol=1e-4 * np.linalg.norm(A, 2))


def test_preconditioner_matches_formula(backend):
    n, r, mu = 60, 5, 1e-2
    A = _psd(np.logspace(0, -6, n), seed=6)
    A_nys = nystrom(aslinearoperator(backend.asarray(A), psd=True), r, seed=0)
    P_inv = nystrom_preconditioner(A_nys, mu)
    assert isinstance(P_inv, NystromPreconditioner) and P_inv.is_symmetric
    lam = backend.to_numpy(A_nys.eigenvalues)
    U = backend.to_numpy(A_nys.eigenvectors)
    expected = (lam.min() + mu) * (U / (lam + mu)) @ U.T + np.eye(n) - U @ U.T
    np.testing.assert_allclose(backend.to_numpy(P_inv.to_dense()), expected, atol=1e-12)
    # on range(U) it inverts A_nys + mu I up to the factor lam_r + mu, elsewhere identity
    A_nys_dense = (U * lam) @ U.T
    M = backend.to_numpy(P_inv.to_dense()) @ (A_nys_dense + mu * np.eye(n))
    P_U = U @ U.T
    np.testing.assert_allclose(M, (lam.min() + mu) * P_U + mu * (np.eye(n) - P_U), atol=1e-12)


def test_pcg_with_nystrom_preconditioner_needs_fewer_iterations(backend):
    # r large eigenvalues down to 1e-2 above a tail in [1e-4, 1e-3], damping 1e-3: the
    # preconditioned system has condition number ~ (lam_r + mu) / mu ~ 10 instead of 1e7
    n, r, mu = 60, 15, 1e-3
    A = _psd(np.concatenate([np.logspace(4, -2, r), np.logspace(-3, -4, n - r)]), seed=7)
    b = np.random.default_rng(8).standard_normal(n)
    op = aslinearoperator(backend.asarray(A), psd=True)
    P_inv = nystrom_preconditioner(nystrom(op, r, seed=0), mu)
    x_ref = np.linalg.solve(A + mu * np.eye(n), b)
    b_b = backend.asarray(b)
    x_plain, info_plain = cg(op, b_b, rtol=1e-8, damping=mu, maxiter=2000)
    x_pcg, info_pcg = cg(op, b_b, rtol=1e-8, damping=mu, M=P_inv, maxiter=2000)
    assert info_pcg.converged
    assert info_pcg.iterations < info_plain.iterations / 3
    np.testing.assert_allclose(
        backend.to_numpy(x_pcg), x_ref, rtol=0, atol=1e-6 * np.linalg.norm(x_ref)
    )


def test_nystrom_errors(numpy_backend):
    op = aslinearoperator(np.eye(4), psd=True)
    # API change (issue #11): one message format for counts in every solver.
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 4\], got 5"):
        nystrom(op, 5)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 4\], got 0"):
        nystrom(op, 0)
    with pytest.raises(ValueError, match="oversampling must be an integer >= 0"):
        nystrom(op, 2, oversampling=-1)
    with pytest.raises(ValueError, match="square"):
        nystrom(aslinearoperator(np.ones((3, 4))), 2)
    with (
        pytest.raises(FactorizationError, match="positive semi-definite"),
        pytest.warns(AssumptionWarning, match="only declared symmetric"),
    ):
        nystrom(aslinearoperator(-np.eye(6), symmetric=True), 3, seed=0)
    with pytest.raises(FactorizationError, match="declared PSD: the declaration is wrong"):
        nystrom(aslinearoperator(-np.eye(6), psd=True), 3, seed=0)
    with pytest.raises(TypeError, match="EighLinearOperator"):
        NystromPreconditioner(op, 1.0)
    with pytest.raises(ValueError, match="damping"):
        NystromPreconditioner(nystrom(op, 2, seed=0), 0.0)


def test_preconditioner_of_a_rank_deficient_approximation(numpy_backend):
    """A zero eigenvalue is allowed (a PSD approximation); -1e-12 is not. With
    lam = (4, 0), mu = 1: P^{-1} = (lam_r + mu) U (Lam + mu I)^{-1} U^T + (I - U U^T)
    scales u_1 by 1/5 and leaves u_2 and the complement alone."""
    from curvlinops import EighLinearOperator

    Q = np.linalg.qr(np.random.default_rng(2).standard_normal((4, 4)))[0]
    U = Q[:, :2]
    P_inv = NystromPreconditioner(EighLinearOperator(np.array([4.0, 0.0]), U), 1.0)
    expected = np.eye(4) - 0.8 * np.outer(U[:, 0], U[:, 0])
    np.testing.assert_allclose(P_inv.to_dense(), expected, atol=1e-14)
    with pytest.raises(ValueError, match="smallest eigenvalue of -1e-12"):
        NystromPreconditioner(EighLinearOperator(np.array([4.0, -1e-12]), U), 1.0)


def test_nystrom_default_seed_is_zero(numpy_backend):
    """The documented default ``seed=0``: a sketch that depends on its draw (rank below
    the operator's) equals the one drawn with ``seed=0`` and differs from ``seed=1``."""
    A = aslinearoperator(_psd(np.linspace(1.0, 2.0, 12), seed=3), psd=True)
    default = nystrom(A, rank=3, oversampling=1).to_dense()
    np.testing.assert_array_equal(default, nystrom(A, rank=3, oversampling=1, seed=0).to_dense())
    assert np.abs(default - nystrom(A, rank=3, oversampling=1, seed=1).to_dense()).max() > 1e-3


def test_nystrom_memory_is_linear_in_the_dimension(numpy_backend):
    """n = 200 000: an ``n x n`` intermediate (320 GB) would not fit; the sketch's
    ``n x l`` arrays (l = rank + oversampling) do, and a rank-2 operator is recovered."""
    n = 200_000
    d = np.zeros(n)
    d[:2] = [5.0, 3.0]
    A = DiagonalLinearOperator(d, psd=True)
    approx = nystrom(A, rank=2, oversampling=4, seed=0)
    np.testing.assert_allclose(np.sort(approx.eigenvalues), [3.0, 5.0], rtol=1e-10)
