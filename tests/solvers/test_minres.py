"""Tests of :func:`curvlinops.minres` against numpy.linalg and scipy.sparse.linalg.minres.

References are independent: dense solves, least-squares problems over an explicitly
built Krylov basis (MINRES's iterate ``x_j`` minimizes ``||b - A x||`` over
``K_j(A, b)``), and SciPy's MINRES.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
from hypothesis import given, strategies as st

from curvlinops import CallableLinearOperator, aslinearoperator, minres

N, K = 30, 4  # one size and batch width: JAX compiles each primitive once per shape


def sym_from_spectrum(w, seed):
    """Symmetric matrix ``Q diag(w) Q^T`` with a random orthogonal ``Q``."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(w), len(w))))
    A = (Q * np.asarray(w)) @ Q.T
    return (A + A.T) / 2


def indefinite_spectrum(n=N, low=1.0, high=10.0, negatives=None):
    negatives = n // 3 if negatives is None else negatives
    return np.concatenate(
        [-np.linspace(low, high, negatives), np.geomspace(low, high, n - negatives)]
    )


SPECTRA = {
    "indefinite": lambda: indefinite_spectrum(),
    "spd": lambda: np.geomspace(1.0, 100.0, N),
    "clustered_indefinite": lambda: (
        np.repeat([-3.0, 1.0, 7.0], N // 3) + 1e-3 * np.random.default_rng(2).standard_normal(N)
    ),
}


def krylov_minimizer(A, b, steps):
    """argmin of ||b - A x|| over the Krylov space K_steps(A, b), by dense least squares."""
    basis = [b / np.linalg.norm(b)]
    for _ in range(steps - 1):
        v = A @ basis[-1]
        for u in basis:  # twice-orthogonalized Gram-Schmidt
            v = v - (u @ v) * u
        for u in basis:
            v = v - (u @ v) * u
        basis.append(v / np.linalg.norm(v))
    V = np.stack(basis, axis=1)
    y, *_ = np.linalg.lstsq(A @ V, b, rcond=None)
    return V @ y


def scipy_minres(A, b, **kwargs):
    count = [0]

    def callback(_):
        count[0] += 1

    x, _ = scipy.sparse.linalg.minres(A, b, callback=callback, **kwargs)
    return x, count[0]


def op_and_rhs(backend, A, B, dtype_name="float64"):
    return aslinearoperator(backend.asarray(A, dtype_name), symmetric=True), backend.asarray(
        B, dtype_name
    )


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
def test_minres_matches_solve_and_scipy_float64(backend, spectrum):
    w = SPECTRA[spectrum]()
    A = sym_from_spectrum(w, seed=0)
    b = np.random.default_rng(3).standard_normal(N)
    rtol = 1e-10
    op, b_b = op_and_rhs(backend, A, b)
    x, info = minres(op, b_b, rtol=rtol)
    x = backend.to_numpy(x)
    assert info.converged and info.reason == "converged"
    exact = np.linalg.solve(A, b)
    cond = np.abs(w).max() / np.abs(w).min()
    # Our rule: the Euclidean residual, relative to ||b|| (recurrence ~ true residual).
    assert np.linalg.norm(b - A @ x) <= 2 * rtol * np.linalg.norm(b)
    assert info.residual_norms[-1] <= rtol * np.linalg.norm(b)
    assert info.residual_norms[-1] == pytest.approx(np.linalg.norm(b - A @ x), rel=0.1, abs=1e-14)
    assert np.linalg.norm(x - exact) <= 2 * cond * rtol * np.linalg.norm(exact)
    # SciPy's looser rule (relative to ||A|| ||x||) stops no later than ours.
    x_scipy, iterations_scipy = scipy_minres(A, b, rtol=rtol)
    assert info.iterations >= iterations_scipy - 3
    assert np.linalg.norm(x - x_scipy) <= 1e-6 * np.linalg.norm(exact)
    assert len(info.residual_norms) == info.iterations + 1
    assert np.all(np.diff(info.residual_norms) <= 1e-12 * np.linalg.norm(b))  # monotone


@pytest.mark.parametrize("steps", [1, 3, 6])
def test_minres_iterates_minimize_residual_over_krylov_space(backend, steps):
    A = sym_from_spectrum(indefinite_spectrum(), seed=4)
    b = np.random.default_rng(5).standard_normal(N)
    op, b_b = op_and_rhs(backend, A, b)
    x, info = minres(op, b_b, rtol=0.0, maxiter=steps)
    assert info.iterations == steps and info.reason == "maxiter"
    np.testing.assert_allclose(backend.to_numpy(x), krylov_minimizer(A, b, steps), rtol=1e-9)


def test_minres_float32(backend):
    A = sym_from_spectrum(indefinite_spectrum(), seed=6)
    b = np.random.default_rng(7).standard_normal(N)
    op, b_b = op_and_rhs(backend, A, b, "float32")
    x, info = minres(op, b_b, rtol=1e-5)
    x = backend.to_numpy(x)
    assert x.dtype == np.float32 and info.converged
    A32, b32 = A.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    assert np.linalg.norm(b32 - A32 @ x) <= 1e-4 * np.linalg.norm(b)
    exact = np.linalg.solve(A32, b32)
    assert np.linalg.norm(x - exact) <= 1e-3 * np.linalg.norm(exact)


def test_minres_multiple_rhs_equal_columnwise_solves(backend):
    A = sym_from_spectrum(indefinite_spectrum(), seed=8)
    rng = np.random.default_rng(9)
    evals, Q = np.linalg.eigh(A)
    B = np.stack(
        [
            rng.standard_normal(N),
            Q[:, [0, 15, 29]] @ np.array([1.0, -2.0, 0.5]),  # 3 eigenvectors: 3 iterations
            np.zeros(N),
            1e3 * rng.standard_normal(N),
        ],
        axis=1,
    )
    op, B_b = op_and_rhs(backend, A, B)
    X, info = minres(op, B_b, rtol=1e-10)
    X = backend.to_numpy(X)
    assert info.reason == ["converged"] * 4
    assert info.iterations[2] == 0 and info.iterations[1] <= 4
    np.testing.assert_allclose(X, np.linalg.solve(A, B), rtol=1e-6, atol=1e-12)
    for j in range(K):
        x_j, info_j = minres(op, backend.asarray(B[:, j]), rtol=1e-10)
        scale = max(np.linalg.norm(np.linalg.solve(A, B[:, j])), 1e-300)
        assert np.linalg.norm(X[:, j] - backend.to_numpy(x_j)) <= 1e-6 * scale
        assert abs(int(info.iterations[j]) - info_j.iterations) <= 3


def test_minres_damping(backend):
    A = sym_from_spectrum(indefinite_spectrum(), seed=10)
    B = np.random.default_rng(11).standard_normal((N, K))
    op, B_b = op_and_rhs(backend, A, B)
    X, info = minres(op, B_b, rtol=1e-11, damping=0.4)
    assert info.converged.all()
    expected = np.linalg.solve(A + 0.4 * np.eye(N), B)
    np.testing.assert_allclose(backend.to_numpy(X), expected, rtol=1e-7, atol=1e-10)
    # SciPy's shift s is damping -s.
    x_scipy, _ = scipy.sparse.linalg.minres(A, B[:, 0], shift=-0.4, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(X[:, 0]), x_scipy, rtol=1e-6)


def test_minres_jacobi_preconditioner(backend):
    C = sym_from_spectrum(indefinite_spectrum(low=1.0, high=3.0), seed=12)
    d = np.geomspace(1.0, 1e3, N)
    A = d[:, None] * C * d[None, :]  # badly scaled, indefinite
    b = np.random.default_rng(13).standard_normal(N)
    M = np.diag(1.0 / np.abs(np.diag(A)))
    op, b_b = op_and_rhs(backend, A, b)
    x_plain, info_plain = minres(op, b_b, rtol=1e-8)
    x_prec, info_prec = minres(op, b_b, rtol=1e-8, M=backend.asarray(M))
    assert info_prec.converged
    assert info_prec.iterations < info_plain.iterations / 2
    x_prec = backend.to_numpy(x_prec)
    # The Euclidean norm of the residual is what is tested, also when preconditioned.
    assert np.linalg.norm(b - A @ x_prec) <= 2e-8 * np.linalg.norm(b)
    assert info_prec.residual_norms[-1] <= 1e-8 * np.linalg.norm(b)
    exact = np.linalg.solve(A, b)
    np.testing.assert_allclose(x_prec, exact, rtol=1e-8 * np.linalg.cond(A))
    # The preconditioned iterates are those of SciPy's preconditioned MINRES.
    x3, info3 = minres(op, b_b, rtol=0.0, maxiter=3, M=backend.asarray(M))
    x3_scipy, _ = scipy.sparse.linalg.minres(A, b, rtol=0.0, maxiter=3, M=M)
    np.testing.assert_allclose(backend.to_numpy(x3), x3_scipy, rtol=1e-8)


def _failing_operator(backend, A, calls_before_nan, column=None):
    """Operator that returns ``A X`` for some calls, then NaN (in one column or all)."""
    A_b = backend.asarray(A)
    xp = backend.xp
    calls = []

    def matmat(X):
        calls.append(1)
        out = A_b @ X
        if len(calls) > calls_before_nan:
            if column is None:
                return out * float("nan")
            mask = xp.asarray(np.arange(X.shape[1]) == column, device=backend.device)
            return xp.where(mask, out * float("nan"), out)
        return out

    op = CallableLinearOperator(
        A.shape, matmat=matmat, dtype=A_b.dtype, xp=xp, device=backend.device, symmetric=True
    )
    return op, calls


def test_minres_stops_on_nan(backend):
    A = sym_from_spectrum(indefinite_spectrum(), seed=14)
    b = np.random.default_rng(15).standard_normal(N)
    op, calls = _failing_operator(backend, A, calls_before_nan=3)
    x, info = minres(op, backend.asarray(b), rtol=1e-12, maxiter=1000)
    assert info.reason == "nonfinite" and info.iterations == 3 and len(calls) == 4
    np.testing.assert_allclose(backend.to_numpy(x), krylov_minimizer(A, b, 3), rtol=1e-9)
    # NaN in one column of a batch: the others converge.
    B = np.random.default_rng(16).standard_normal((N, K))
    op, _ = _failing_operator(backend, A, calls_before_nan=2, column=2)
    X, info = minres(op, backend.asarray(B), rtol=1e-10)
    X = backend.to_numpy(X)
    assert info.reason == ["converged", "converged", "nonfinite", "converged"]
    assert info.iterations[2] == 2 and np.all(np.isfinite(X))
    np.testing.assert_allclose(X[:, 2], krylov_minimizer(A, B[:, 2], 2), rtol=1e-9)
    others = [0, 1, 3]
    np.testing.assert_allclose(X[:, others], np.linalg.solve(A, B[:, others]), rtol=1e-6)


def test_minres_singular_inconsistent_system_breaks_down(backend):
    # b has a component in the null space: the best residual is that component.
    w = np.concatenate([[0.0], np.linspace(-4.0, -1.0, 9), np.linspace(1.0, 4.0, N - 10)])
    A = sym_from_spectrum(w, seed=17)
    b = np.random.default_rng(18).standard_normal(N)
    op, b_b = op_and_rhs(backend, A, b)
    x, info = minres(op, b_b, rtol=1e-10)
    x = backend.to_numpy(x)
    assert info.reason == "breakdown" and not info.converged
    assert info.iterations < N
    assert np.all(np.isfinite(x))
    best = np.linalg.norm(b - A @ np.linalg.lstsq(A, b, rcond=None)[0])
    assert np.linalg.norm(b - A @ x) <= best * (1 + 1e-8)


def test_minres_x0_callback_and_maxiter(backend):
    A = sym_from_spectrum(indefinite_spectrum(), seed=19)
    rng = np.random.default_rng(20)
    b = rng.standard_normal(N)
    exact = np.linalg.solve(A, b)
    x0 = exact + 1e-4 * rng.standard_normal(N)
    op, b_b = op_and_rhs(backend, A, b)
    seen = []
    x, info = minres(op, b_b, backend.asarray(x0), rtol=1e-10, callback=lambda xk: seen.append(xk))
    assert info.converged and len(seen) == info.iterations > 0
    assert info.residual_norms[0] == pytest.approx(np.linalg.norm(b - A @ x0), rel=1e-8)
    np.testing.assert_allclose(backend.to_numpy(x), exact, rtol=1e-7)
    x, info = minres(op, b_b, backend.asarray(exact), rtol=1e-8)
    assert info.iterations == 0 and info.converged
    x, info = minres(op, b_b, maxiter=0)
    assert info.reason == "maxiter" and np.all(backend.to_numpy(x) == 0)


def test_minres_bad_inputs(numpy_backend):
    A = sym_from_spectrum(indefinite_spectrum(6, negatives=2), seed=21)
    b = np.ones(6)
    with pytest.raises(ValueError, match=r"square.*\(6, 5\)"):
        minres(np.ones((6, 5)), b)
    with pytest.raises(ValueError, match=r"\(6,\) or \(6, k\).*\(7, 2\)"):
        minres(A, np.ones((7, 2)))
    with pytest.raises(ValueError, match=r"preconditioner.*\(6, 6\).*\(6, 3\)"):
        minres(A, b, M=np.ones((6, 3)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        minres(A, b * np.nan)
    with pytest.raises(ValueError, match="damping"):
        minres(A, b, damping=float("inf"))
    import array_api_strict

    with pytest.raises(TypeError, match="array_api_strict"):
        minres(A, array_api_strict.asarray(b))


def test_minres_indefinite_preconditioner_is_a_breakdown(numpy_backend):
    A = sym_from_spectrum(indefinite_spectrum(), seed=22)
    b = np.ones(N)
    M = -np.eye(N)
    x, info = minres(A, b, M=M)
    assert info.reason == "breakdown" and info.iterations == 0


@given(
    n=st.integers(2, 12),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    negatives=st.integers(0, 6),
)
def test_minres_property_random_symmetric(n, k, seed, negatives):
    rng = np.random.default_rng(seed)
    negatives = min(negatives, n)
    w = rng.uniform(1.0, 5.0, n) * np.where(np.arange(n) < negatives, -1.0, 1.0)
    A = sym_from_spectrum(w, seed=seed)
    B = rng.standard_normal((n, k))
    X, info = minres(aslinearoperator(A, symmetric=True), B, rtol=1e-12)
    assert info.converged.all()
    for j in range(k):
        assert np.linalg.norm(B[:, j] - A @ X[:, j]) <= 2e-12 * np.linalg.norm(B[:, j])
    np.testing.assert_allclose(X, np.linalg.solve(A, B), rtol=0, atol=1e-9 * np.abs(X).max())


@pytest.mark.parametrize("scale_A, scale_b", [(1e-20, 1.0), (1e20, 1e-20), (1.0, 1e20)])
def test_minres_is_invariant_to_scaling(numpy_backend, scale_A, scale_b):
    A = sym_from_spectrum(indefinite_spectrum(), seed=23)
    b = np.random.default_rng(24).standard_normal(N)
    exact = np.linalg.solve(A, b) * scale_b / scale_A
    for M in (None, np.eye(N) / scale_A):
        x, info = minres(scale_A * A, scale_b * b, rtol=1e-10, M=M)
        assert info.reason == "converged"
        assert np.linalg.norm(x - exact) <= 1e-8 * np.linalg.norm(exact)
