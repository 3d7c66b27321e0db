"""Tests of curvlinops.solvers.lanczos: lanczos, eigsh, power_iteration.

References are dense NumPy float64 eigendecompositions (numpy.linalg.eigh).
"""

from __future__ import annotations

import numpy as np
import pytest

from curvlinops import (
    CallableLinearOperator,
    ConvergenceError,
    aslinearoperator,
    eigsh,
    lanczos,
    power_iteration,
)
from curvlinops._backend import array_namespace, namespace_name


def _symmetric(eigenvalues, seed=0):
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q`` (NumPy float64)."""
    n = len(eigenvalues)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    A = (Q * np.asarray(eigenvalues)) @ Q.T
    return 0.5 * (A + A.T)


def _counting_operator(backend, A, dtype="float64"):
    """A symmetric operator over ``A`` that counts its matmat calls."""
    A_b = backend.asarray(A, dtype)
    calls = []

    def matmat(X):
        calls.append(X.shape[1])
        return A_b @ X

    op = CallableLinearOperator(
        A.shape,
        matmat=matmat,
        dtype=A_b.dtype,
        xp=backend.xp,
        device=backend.device,
        symmetric=True,
    )
    return op, calls


def _reference(A, k, which):
    lam, Q = np.linalg.eigh(A)
    if which == "LA":
        idx = np.arange(len(lam) - k, len(lam))
    elif which == "SA":
        idx = np.arange(k)
    else:
        idx = np.sort(np.argsort(-np.abs(lam))[:k])
        idx = idx[np.argsort(lam[idx])]
    return lam[idx], Q[:, idx]


def _check_pairs(A, lam, Q, lam_ref, Q_ref, rtol):
    scale = np.abs(np.linalg.eigvalsh(A)).max()
    np.testing.assert_allclose(lam, lam_ref, rtol=0, atol=rtol * scale)
    # residual and orthonormality, then agreement up to sign with the reference
    assert np.linalg.norm(A @ Q - Q * lam, axis=0).max() <= 10 * rtol * scale
    np.testing.assert_allclose(Q.T @ Q, np.eye(Q.shape[1]), atol=10 * rtol)
    np.testing.assert_allclose(np.abs(Q_ref.T @ Q), np.eye(Q.shape[1]), atol=100 * rtol)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigsh_matches_eigh(backend, which):
    rng = np.random.default_rng(1)
    # mixed signs, the largest magnitude at the negative end for "LM"
    spectrum = np.concatenate([[-12.0, -9.0], rng.uniform(-3.0, 3.0, 56), [7.0, 8.0]])
    A = _symmetric(spectrum, seed=2)
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    lam, Q = eigsh(op, k=4, which=which, seed=0)
    assert namespace_name(array_namespace(lam)) == namespace_name(backend.xp)
    assert Q.shape == (60, 4) and Q.dtype == backend.dtype("float64")
    lam, Q = backend.to_numpy(lam), backend.to_numpy(Q)
    assert np.all(np.diff(lam) >= 0)  # ascending, like scipy
    lam_ref, Q_ref = _reference(A, 4, which)
    _check_pairs(A, lam, Q, lam_ref, Q_ref, rtol=1e-10)


def test_eigsh_clustered_spectrum(backend):
    # a tight cluster at the top (relative gaps 1e-4) above a bulk
    top = 10.0 + 1e-3 * np.arange(4)
    spectrum = np.concatenate([np.linspace(0.0, 5.0, 56), top])
    A = _symmetric(spectrum, seed=3)
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    lam, Q = eigsh(op, k=4, which="LA", seed=1)
    lam, Q = backend.to_numpy(lam), backend.to_numpy(Q)
    np.testing.assert_allclose(lam, top, rtol=0, atol=1e-10)
    assert np.linalg.norm(A @ Q - Q * lam, axis=0).max() <= 1e-9
    # the cluster's eigenvectors span the same subspace as the reference
    _, Q_ref = _reference(A, 4, "LA")
    np.testing.assert_allclose(np.linalg.svd(Q_ref.T @ Q)[1], 1.0, atol=1e-8)


def test_eigsh_needs_restarts(backend):
    # evenly spaced spectrum: slow Krylov convergence, a small basis must restart often
    n, k, ncv = 60, 4, 12
    A = _symmetric(np.linspace(1.0, 2.0, n), seed=4)
    op, calls = _counting_operator(backend, A)
    lam, Q = eigsh(op, k=k, which="SA", ncv=ncv, seed=0)
    assert len(calls) > 3 * ncv  # several restart cycles
    assert set(calls) == {1}
    lam_ref, Q_ref = _reference(A, k, "SA")
    _check_pairs(A, backend.to_numpy(lam), backend.to_numpy(Q), lam_ref, Q_ref, rtol=1e-10)


def test_eigsh_repeated_eigenvalue(backend):
    # the top eigenvalue has multiplicity 3: a single Krylov sequence sees it once, the
    # breakdown restarts must find the other copies
    spectrum = np.repeat([1.0, 2.0, 3.0], [40, 17, 3])
    A = _symmetric(spectrum, seed=5)
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    lam, Q = eigsh(op, k=3, which="LA", seed=0)
    lam, Q = backend.to_numpy(lam), backend.to_numpy(Q)
    np.testing.assert_allclose(lam, [3.0, 3.0, 3.0], atol=1e-10)
    assert np.linalg.norm(A @ Q - 3.0 * Q) <= 1e-9
    np.testing.assert_allclose(Q.T @ Q, np.eye(3), atol=1e-10)


def test_lanczos_restarts_after_a_breakdown_and_finds_every_eigenvalue(backend):
    """Two distinct eigenvalues: the Krylov space of any start is invariant after two
    steps, and the recurrence continues from random directions (zero off-diagonals),
    so six steps give an orthonormal basis and T with the whole spectrum."""
    A = _symmetric(np.repeat([1.0, 2.0], 3), seed=8)
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    res = lanczos(op, 6, seed=0)
    Q, T = backend.to_numpy(res.basis), backend.to_numpy(res.tridiagonal())
    np.testing.assert_allclose(Q.T @ Q, np.eye(6), atol=1e-12)
    np.testing.assert_allclose(np.linalg.eigvalsh(T), np.repeat([1.0, 2.0], 3), atol=1e-12)
    assert abs(float(backend.to_numpy(res.betas)[1])) <= 1e-12  # the breakdown


def test_eigsh_start_vector_is_eigenvector(backend):
    spectrum = np.arange(1.0, 61.0)
    A = _symmetric(spectrum, seed=6)
    q_small = np.linalg.eigh(A)[1][:, 0]  # an invariant start: immediate breakdown
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    lam, Q = eigsh(op, k=2, which="LA", v0=backend.asarray(q_small), seed=0)
    np.testing.assert_allclose(backend.to_numpy(lam), [59.0, 60.0], atol=1e-10)


def test_eigsh_float32(backend):
    A = _symmetric(np.concatenate([np.linspace(0.0, 1.0, 57), [2.0, 3.0, 4.0]]), seed=7)
    op = aslinearoperator(backend.asarray(A, "float32"), symmetric=True)
    lam, Q = eigsh(op, k=3, which="LA", seed=0)
    assert lam.dtype == backend.dtype("float32") and Q.dtype == backend.dtype("float32")
    lam, Q = backend.to_numpy(lam).astype(np.float64), backend.to_numpy(Q).astype(np.float64)
    np.testing.assert_allclose(lam, [2.0, 3.0, 4.0], rtol=1e-4)
    assert np.linalg.norm(A @ Q - Q * lam, axis=0).max() <= 1e-3


def test_eigsh_errors(numpy_backend):
    op = aslinearoperator(np.eye(5), symmetric=True)
    with pytest.raises(ValueError, match="square"):
        eigsh(aslinearoperator(np.ones((4, 5))), k=1)
    with pytest.raises(ValueError, match="k must be smaller"):
        eigsh(op, k=5)
    with pytest.raises(ValueError, match="unknown which"):
        eigsh(op, k=2, which="BE")
    with pytest.raises(ValueError, match="ncv"):
        eigsh(op, k=2, ncv=2)
    # API change (issue #11): one message format for counts in every solver.
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        eigsh(op, k=0)
    with pytest.raises(ValueError, match=r"eigsh: tol must be finite and >= 0, got -1.0"):
        eigsh(op, k=2, tol=-1.0)


def test_eigsh_maxiter_reached(numpy_backend):
    A = _symmetric(np.linspace(1.0, 2.0, 60), seed=8)
    with pytest.raises(ConvergenceError, match=r"[0-4] of 5 pairs reached"):
        eigsh(aslinearoperator(A, symmetric=True), k=5, ncv=8, maxiter=20)


def test_lanczos_relation(backend):
    n, m = 60, 20
    A = _symmetric(np.linspace(-1.0, 3.0, n), seed=9)
    v0 = np.random.default_rng(10).standard_normal(n)
    op, calls = _counting_operator(backend, A)
    res = lanczos(op, m, v0=backend.asarray(v0))
    assert len(calls) == m
    Q = backend.to_numpy(res.basis)
    T = backend.to_numpy(res.tridiagonal())
    alphas, betas = backend.to_numpy(res.alphas), backend.to_numpy(res.betas)
    assert Q.shape == (n, m) and alphas.shape == (m,) and betas.shape == (m - 1,)
    np.testing.assert_allclose(Q[:, 0], v0 / np.linalg.norm(v0), atol=1e-12)
    np.testing.assert_allclose(Q.T @ Q, np.eye(m), atol=1e-12)
    np.testing.assert_allclose(Q.T @ A @ Q, T, atol=1e-11)
    np.testing.assert_allclose(np.diag(T), alphas, atol=0)
    np.testing.assert_allclose(np.diag(T, 1), betas, atol=0)
    # A Q - Q T is zero except for the last column, of norm `residual`
    R = A @ Q - Q @ T
    np.testing.assert_allclose(R[:, :-1], 0.0, atol=1e-11)
    np.testing.assert_allclose(np.linalg.norm(R[:, -1]), float(res.residual), rtol=1e-9)


def test_lanczos_full_space_is_exact(backend):
    A = _symmetric(np.array([-2.0, 0.5, 1.0, 4.0, 4.5, 7.0]), seed=11)
    res = lanczos(aslinearoperator(backend.asarray(A), symmetric=True), 6, seed=3)
    ritz = np.linalg.eigvalsh(backend.to_numpy(res.tridiagonal()))
    np.testing.assert_allclose(ritz, np.linalg.eigvalsh(A), atol=1e-12)


def test_lanczos_errors(numpy_backend):
    op = aslinearoperator(np.eye(4), symmetric=True)
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 4\], got 5"):
        lanczos(op, 5)
    with pytest.raises(ValueError, match="shape"):
        lanczos(op, 2, v0=np.ones(3))
    with pytest.raises(ValueError, match="zero"):
        lanczos(op, 2, v0=np.zeros(4))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_power_iteration(backend, sign):
    spectrum = np.concatenate([np.linspace(-1.0, 1.0, 59), [sign * 4.0]])
    A = _symmetric(spectrum, seed=12)
    lam, v = power_iteration(aslinearoperator(backend.asarray(A), symmetric=True), seed=0)
    lam, v = float(lam), backend.to_numpy(v)
    w, Q = np.linalg.eigh(A)
    q = Q[:, np.argmax(np.abs(w))]
    assert abs(lam - sign * 4.0) <= 1e-10
    assert abs(abs(q @ v) - 1.0) <= 1e-10
    assert np.linalg.norm(A @ v - lam * v) <= 1e-6


def test_power_iteration_no_gap_raises(numpy_backend):
    A = aslinearoperator(np.diag([1.0, -1.0, 0.5]), symmetric=True)
    with pytest.raises(ConvergenceError, match="eigsh"):
        power_iteration(A, maxiter=50, seed=0)


@pytest.mark.parametrize("k", [1, 3])
def test_eigsh_with_the_smallest_basis(numpy_backend, k):
    """``ncv = k + 1`` (the smallest allowed basis): each thick restart keeps all ``k``
    wanted Ritz vectors and extends them by one Lanczos step; with well separated extreme
    eigenvalues that converges to the pairs of numpy.linalg.eigh."""
    spectrum = np.concatenate([[-40.0, -30.0, -20.0], np.linspace(-3.0, 3.0, 34), [19, 29, 39]])
    A = _symmetric(spectrum, seed=3)
    for which in ("LA", "SA", "LM"):
        lam, Q = eigsh(aslinearoperator(A, symmetric=True), k=k, ncv=k + 1, which=which, tol=1e-12)
        lam_ref, Q_ref = _reference(A, k, which)
        _check_pairs(A, lam, Q, lam_ref, Q_ref, rtol=1e-9)


def test_power_iteration_with_an_explicit_tolerance(numpy_backend):
    """A tighter ``tol`` than the default (sqrt(eps)) gives a more accurate eigenpair."""
    spectrum = np.concatenate([np.linspace(-1.0, 1.0, 29), [3.0]])
    A = _symmetric(spectrum, seed=13)
    op = aslinearoperator(A, symmetric=True)
    lam, v = power_iteration(op, tol=1e-13, seed=0)
    assert abs(float(lam) - 3.0) <= 1e-12
    assert np.linalg.norm(A @ v - float(lam) * v) <= 1e-11


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_power_iteration_tolerance_is_relative_to_the_eigenvalue(numpy_backend, scale):
    """The stopping rule ||A v - lam v|| <= tol |lam| does not depend on the scale of A:
    the same accuracy, relative to the eigenvalue, for 1e-8 A and 1e8 A."""
    spectrum = np.concatenate([np.linspace(-1.0, 1.0, 29), [3.0]])
    A = scale * _symmetric(spectrum, seed=13)
    lam, v = power_iteration(aslinearoperator(A, symmetric=True), seed=0)
    assert abs(float(lam) - 3.0 * scale) <= 1e-8 * 3.0 * scale
    assert np.linalg.norm(A @ v - float(lam) * v) <= np.sqrt(np.finfo(float).eps) * 3.0 * scale


def test_eigsh_stops_when_maxiter_products_are_used(numpy_backend):
    """``maxiter`` counts products with A: with ``maxiter = ncv`` the first Lanczos
    cycle uses them all, so an unconverged run raises after exactly ``ncv`` products
    instead of restarting."""
    A = _symmetric(np.linspace(1.0, 1.01, 40), seed=14)  # clustered: slow convergence
    op, calls = _counting_operator(numpy_backend, A)
    with pytest.raises(ConvergenceError, match="within maxiter = 5 products"):
        eigsh(op, k=1, ncv=5, maxiter=5, seed=0)
    assert sum(calls) == 5


@pytest.mark.parametrize(
    "squared_norm, passes", [(1.2, 4), (1.6, 2)], ids=["all-passes", "stops-after-two"]
)
def test_gram_schmidt_repeats_only_while_a_pass_halves_a_row(squared_norm, passes):
    """With a basis column b of squared norm s, one pass maps W = b to (1 - s) b.

    So each pass shrinks the row by |1 - s|: by 0.2 (< 1/2, keep going, up to
    ``max_passes`` = 4 passes) or by 0.6 (not below 1/2: stop after the second pass).
    A row orthogonal to b is left alone, and the norms returned are the final ones.
    """
    from curvlinops.solvers.lanczos import _orthogonalize

    b = np.array([1.0, 2.0, 2.0]) / 3.0 * np.sqrt(squared_norm)
    orthogonal = np.array([2.0, -1.0, 0.0])
    basis = np.stack([b[:, None], b[:, None]])  # (rows, n, one column)
    W, coeffs, norms = _orthogonalize(basis, np.stack([b, orthogonal]), np, max_passes=4)
    shrink = 1.0 - squared_norm
    np.testing.assert_allclose(W, np.stack([shrink**passes * b, orthogonal]), atol=1e-15)
    # the coefficients add up over the passes: b^T W_k = s (1 - s)^k
    expected = sum(squared_norm * shrink**k for k in range(passes))
    np.testing.assert_allclose(coeffs, [[expected], [0.0]], atol=1e-15)
    np.testing.assert_allclose(norms, [abs(shrink) ** passes * np.sqrt(squared_norm), np.sqrt(5)])
