"""Tests of :func:`curvlinops.cg` against numpy.linalg.solve and scipy.sparse.linalg.cg.

Matrices are built in NumPy float64 from prescribed spectra (``Q diag(w) Q^T``), moved to
each backend, and the results compared with dense solves and with SciPy's CG (same
algorithm and stopping rule, so same iteration counts on the same problem).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
from hypothesis import given, strategies as st

import curvlinops
from curvlinops import (
    AssumptionWarning,
    CallableLinearOperator,
    SolveInfo,
    aslinearoperator,
    cg,
    minres,
)


def sym_from_spectrum(w, seed):
    """Symmetric matrix ``Q diag(w) Q^T`` with a random orthogonal ``Q``."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(w), len(w))))
    A = (Q * np.asarray(w)) @ Q.T
    return (A + A.T) / 2


# One size and batch width throughout: JAX compiles each primitive once per shape.
N, K = 30, 4

SPECTRA = {
    "random": lambda: np.random.default_rng(1).uniform(1.0, 10.0, N),
    "ill_conditioned": lambda: np.geomspace(1.0, 1e4, N),
    "clustered": lambda: (
        np.repeat([1.0, 5.0, 40.0], N // 3) + 1e-3 * np.random.default_rng(2).standard_normal(N)
    ),
}


def scipy_cg(A, b, **kwargs):
    """SciPy's CG solution and its iteration count (number of callback calls)."""
    count = [0]

    def callback(_):
        count[0] += 1

    x, _ = scipy.sparse.linalg.cg(A, b, callback=callback, **kwargs)
    return x, count[0]


def op_and_rhs(backend, A, B, dtype_name="float64", psd=True):
    op = aslinearoperator(backend.asarray(A, dtype_name), symmetric=True, psd=psd)
    return op, backend.asarray(B, dtype_name)


@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
def test_cg_matches_solve_and_scipy_float64(backend, spectrum):
    w = SPECTRA[spectrum]()
    A = sym_from_spectrum(w, seed=0)
    b = np.random.default_rng(3).standard_normal(len(w))
    rtol = 1e-10
    op, b_b = op_and_rhs(backend, A, b)
    x, info = cg(op, b_b, rtol=rtol)
    x = backend.to_numpy(x)
    assert x.shape == b.shape
    assert info.converged and info.reason == "converged"
    cond = w.max() / w.min()
    exact = np.linalg.solve(A, b)
    assert np.linalg.norm(b - A @ x) <= 2 * rtol * np.linalg.norm(b)
    assert np.linalg.norm(x - exact) <= 2 * cond * rtol * np.linalg.norm(exact)
    x_scipy, iterations_scipy = scipy_cg(A, b, rtol=rtol)
    # Same algorithm and stopping rule: same count on NumPy; other libraries round the
    # dot products differently, which shifts the count a little on ill-conditioned cases.
    slack = 3 if backend.name in ("numpy", "array_api_strict") else 3 + iterations_scipy // 10
    assert abs(info.iterations - iterations_scipy) <= slack
    assert np.linalg.norm(x - x_scipy) <= 2 * cond * rtol * np.linalg.norm(exact)
    assert len(info.residual_norms) == info.iterations + 1
    assert info.residual_norms[0] == pytest.approx(np.linalg.norm(b), rel=1e-12)
    assert info.residual_norms[-1] <= rtol * np.linalg.norm(b)


@pytest.mark.parametrize("spectrum", ["random", "clustered"])
def test_cg_float32(backend, spectrum):
    w = SPECTRA[spectrum]()
    A = sym_from_spectrum(w, seed=0)
    b = np.random.default_rng(3).standard_normal(len(w))
    op, b_b = op_and_rhs(backend, A, b, "float32")
    x, info = cg(op, b_b, rtol=1e-5)
    x = backend.to_numpy(x)
    assert x.dtype == np.float32 and info.converged
    A32, b32 = A.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    assert np.linalg.norm(b32 - A32 @ x) <= 1e-4 * np.linalg.norm(b)
    exact = np.linalg.solve(A32, b32)
    assert np.linalg.norm(x - exact) <= 1e-3 * np.linalg.norm(exact)


def test_cg_multiple_rhs_equal_columnwise_solves(backend):
    w = np.geomspace(1.0, 1e3, N)
    A = sym_from_spectrum(w, seed=4)
    rng = np.random.default_rng(5)
    _, Q = np.linalg.eigh(A)
    B = np.stack(
        [
            rng.standard_normal(N),  # generic: many iterations
            Q[:, -3:] @ np.array([1.0, -2.0, 0.5]),  # 3 eigenvectors: 3 iterations
            np.zeros(N),  # converged before the first iteration
            1e3 * rng.standard_normal(N),  # large scale
        ],
        axis=1,
    )
    op, B_b = op_and_rhs(backend, A, B)
    X, info = cg(op, B_b, rtol=1e-10)
    X = backend.to_numpy(X)
    assert X.shape == (N, K)
    assert isinstance(info, SolveInfo)
    assert info.reason == ["converged"] * 4
    assert info.converged.tolist() == [True] * 4
    assert info.iterations[2] == 0 and info.iterations[1] <= 4
    assert np.all(X[:, 2] == 0)
    for j in range(4):
        x_j, info_j = cg(op, backend.asarray(B[:, j]), rtol=1e-10)
        scale = max(np.linalg.norm(np.linalg.solve(A, B[:, j])), 1e-300)
        assert np.linalg.norm(X[:, j] - backend.to_numpy(x_j)) <= 1e-6 * scale
        assert abs(int(info.iterations[j]) - info_j.iterations) <= 3
        assert len(info.residual_norms[j]) == info.iterations[j] + 1
    np.testing.assert_allclose(X, np.linalg.solve(A, B), rtol=1e-5, atol=1e-12)


def test_cg_damping_solves_damped_system(backend):
    # Singular PSD matrix: only the damped system is solvable.
    w = np.concatenate([np.zeros(5), np.linspace(1.0, 3.0, N - 5)])
    A = sym_from_spectrum(w, seed=6)
    B = np.random.default_rng(7).standard_normal((N, K))
    op, B_b = op_and_rhs(backend, A, B)
    X, info = cg(op, B_b, rtol=1e-11, damping=0.5)
    assert info.converged.all()
    expected = np.linalg.solve(A + 0.5 * np.eye(N), B)
    np.testing.assert_allclose(backend.to_numpy(X), expected, rtol=1e-8, atol=1e-10)


def test_cg_jacobi_preconditioner_reduces_iterations(backend):
    n = N
    C = sym_from_spectrum(np.linspace(1.0, 4.0, n), seed=8)
    d = np.geomspace(1.0, 1e3, n)
    A = d[:, None] * C * d[None, :]  # badly scaled SPD
    b = np.random.default_rng(9).standard_normal(n)
    M = np.diag(1.0 / np.diag(A))
    op, b_b = op_and_rhs(backend, A, b)
    M_b = backend.asarray(M)
    x_plain, info_plain = cg(op, b_b, rtol=1e-10)
    x_prec, info_prec = cg(op, b_b, rtol=1e-10, M=M_b)
    assert info_prec.converged
    assert info_prec.iterations < info_plain.iterations / 3
    exact = np.linalg.solve(A, b)
    cond = np.linalg.cond(A)
    err = np.linalg.norm(backend.to_numpy(x_prec) - exact)
    assert err <= 2 * cond * 1e-10 * np.linalg.norm(exact)
    _, iterations_scipy = scipy_cg(A, b, rtol=1e-10, M=M)
    assert abs(info_prec.iterations - iterations_scipy) <= 3
    # The preconditioner can also be a LinearOperator.
    x_op, _ = cg(op, b_b, rtol=1e-10, M=aslinearoperator(M_b, symmetric=True))
    np.testing.assert_allclose(backend.to_numpy(x_op), backend.to_numpy(x_prec), rtol=1e-12)


def test_cg_detects_negative_curvature(backend):
    n = N
    w = np.concatenate([np.linspace(1.0, 2.0, n - 5), -np.linspace(0.5, 1.0, 5)])
    A = sym_from_spectrum(w, seed=10)
    evals, Q = np.linalg.eigh(A)
    rng = np.random.default_rng(11)
    positive = Q[:, evals > 0] @ rng.standard_normal((n - 5, 2))  # never meets evals < 0
    B = np.stack([positive[:, 0], rng.standard_normal(n), positive[:, 1], np.ones(n)], axis=1)
    op, B_b = op_and_rhs(backend, A, B, psd=False)
    iterates = []
    with pytest.warns(AssumptionWarning, match="only declared symmetric"):
        X, info = cg(op, B_b, rtol=1e-10, callback=lambda xk: iterates.append(backend.to_numpy(xk)))
    X = backend.to_numpy(X)
    assert info.reason == ["converged", "negative_curvature"] * 2
    directions = info.negative_curvature_direction
    assert directions[0] is None and directions[2] is None
    for p in (directions[1], directions[3]):
        p = backend.to_numpy(p)
        assert p.shape == (n,) and np.linalg.norm(p) > 0
        assert p @ A @ p <= 0
    # x is the iterate before the rejected step: the one after iterations[1] accepted steps.
    assert np.all(np.isfinite(X))
    k = int(info.iterations[1])
    last = np.zeros(n) if k == 0 else iterates[k - 1][:, 1]
    np.testing.assert_allclose(X[:, 1], last, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(X[:, 0], np.linalg.solve(A, B[:, 0]), rtol=1e-6)

    # Single right-hand side: the direction is an array.
    with pytest.warns(AssumptionWarning):
        x, info = cg(op, B_b[:, 1], rtol=1e-10)
    assert info.reason == "negative_curvature" and not info.converged
    p = backend.to_numpy(info.negative_curvature_direction)
    assert p @ A @ p <= 0


def test_cg_negative_curvature_with_damping(numpy_backend):
    # A - 2I is indefinite for A with eigenvalues in [1, 3]; damping = -2 must see that.
    A = sym_from_spectrum(np.linspace(1.0, 3.0, N), seed=12)
    b = np.ones(N)
    with pytest.warns(AssumptionWarning, match="positive semi-definite"):
        x, info = cg(A, b, damping=-2.0)
    p = info.negative_curvature_direction
    assert info.reason == "negative_curvature"
    assert p @ (A - 2 * np.eye(N)) @ p <= 0


def _failing_operator(backend, A, calls_before_nan, column=None, value=float("nan")):
    """Operator that returns ``A X`` for some calls, then NaN (in one column or all)."""
    A_b = backend.asarray(A)
    xp = backend.xp
    calls = []

    def matmat(X):
        calls.append(1)
        out = A_b @ X
        if len(calls) > calls_before_nan:
            if column is None:
                return out * value
            mask = xp.asarray(np.arange(X.shape[1]) == column, device=backend.device)
            return xp.where(mask, out * value, out)
        return out

    op = CallableLinearOperator(
        A.shape, matmat=matmat, dtype=A_b.dtype, xp=xp, device=backend.device, psd=True
    )
    return op, calls


def test_cg_breaks_down_when_a_singular_preconditioner_zeroes_the_residual(numpy_backend):
    """``A = I``, ``b = (1, 1)``, ``M = diag(1, 0)``: the first step gives ``x = (1, 0)``
    and ``r = (0, 1)`` with ``M r = 0``, so ``r^T M r = 0`` after a good step and CG
    has no new direction. It stops there with the step kept (breakdown); a second
    column that converges in that step is unaffected."""
    A = aslinearoperator(np.eye(2), psd=True)
    M = aslinearoperator(np.diag([1.0, 0.0]), psd=True)
    x, info = cg(A, np.ones(2), M=M, maxiter=10)
    assert info.reason == "breakdown" and info.iterations == 1
    np.testing.assert_array_equal(x, [1.0, 0.0])
    X, info = cg(A, np.array([[1.0, 1.0], [1.0, 0.0]]), M=M, maxiter=10)
    assert [str(r) for r in info.reason] == ["breakdown", "converged"]
    np.testing.assert_array_equal(X, [[1.0, 1.0], [0.0, 0.0]])


def test_cg_stops_on_nan_from_operator(backend):
    A = sym_from_spectrum(np.linspace(1.0, 10.0, N), seed=13)
    b = np.random.default_rng(14).standard_normal(N)
    op, calls = _failing_operator(backend, A, calls_before_nan=3)
    x, info = cg(op, backend.asarray(b), rtol=1e-12, maxiter=1000)
    assert info.reason == "nonfinite" and not info.converged
    assert info.iterations == 3
    assert len(calls) == 4  # stopped at the first NaN, did not loop to maxiter
    x_three, _ = scipy.sparse.linalg.cg(A, b, rtol=0.0, atol=0.0, maxiter=3)
    np.testing.assert_allclose(backend.to_numpy(x), x_three, rtol=1e-10)


def test_cg_nan_in_one_column_leaves_others(backend):
    A = sym_from_spectrum(np.linspace(1.0, 10.0, N), seed=15)
    B = np.random.default_rng(16).standard_normal((N, K))
    op, _ = _failing_operator(backend, A, calls_before_nan=2, column=1)
    X, info = cg(op, backend.asarray(B), rtol=1e-10)
    X = backend.to_numpy(X)
    assert info.reason == ["converged", "nonfinite", "converged", "converged"]
    assert info.iterations[1] == 2
    assert np.all(np.isfinite(X))
    expected = np.linalg.solve(A, B)
    others = [0, 2, 3]
    np.testing.assert_allclose(X[:, others], expected[:, others], rtol=1e-7)
    x_two, _ = scipy.sparse.linalg.cg(A, B[:, 1], rtol=0.0, atol=0.0, maxiter=2)
    np.testing.assert_allclose(X[:, 1], x_two, rtol=1e-10)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_cg_stops_on_inf_and_on_nan_from_preconditioner(backend):
    A = sym_from_spectrum(np.linspace(1.0, 10.0, N), seed=17)
    b = np.ones(N)
    op, calls = _failing_operator(backend, A, calls_before_nan=1, value=float("inf"))
    x, info = cg(op, backend.asarray(b))
    assert info.reason == "nonfinite" and info.iterations == 1 and len(calls) == 2
    assert np.all(np.isfinite(backend.to_numpy(x)))
    M, m_calls = _failing_operator(backend, np.eye(N), calls_before_nan=2)
    x, info = cg(aslinearoperator(backend.asarray(A), psd=True), backend.asarray(b), M=M)
    assert info.reason == "nonfinite" and info.iterations == 2 and len(m_calls) == 3
    assert np.all(np.isfinite(backend.to_numpy(x)))


def test_cg_x0_is_honoured(backend):
    A = sym_from_spectrum(np.geomspace(1.0, 100.0, N), seed=18)
    rng = np.random.default_rng(19)
    b = rng.standard_normal(N)
    exact = np.linalg.solve(A, b)
    x0 = exact + 1e-3 * rng.standard_normal(N)
    op, b_b = op_and_rhs(backend, A, b)
    x, info = cg(op, b_b, backend.asarray(x0), rtol=1e-10)
    _, iterations_scipy = scipy_cg(A, b, x0=x0, rtol=1e-10)
    assert abs(info.iterations - iterations_scipy) <= 3
    assert info.residual_norms[0] == pytest.approx(np.linalg.norm(b - A @ x0), rel=1e-8)
    np.testing.assert_allclose(backend.to_numpy(x), exact, rtol=1e-6)
    # maxiter=0 returns x0 untouched.
    x, info = cg(op, b_b, backend.asarray(x0), maxiter=0)
    assert info.reason == "maxiter" and info.iterations == 0
    np.testing.assert_array_equal(backend.to_numpy(x), x0)
    # The exact solution as x0: converged without iterating.
    x, info = cg(op, b_b, backend.asarray(exact), rtol=1e-8)
    assert info.reason == "converged" and info.iterations == 0


def test_cg_callback_once_per_iteration_and_maxiter(backend):
    A = sym_from_spectrum(np.geomspace(1.0, 1e3, N), seed=20)
    b = np.random.default_rng(21).standard_normal(N)
    op, b_b = op_and_rhs(backend, A, b)
    seen = []
    x, info = cg(op, b_b, rtol=1e-8, callback=lambda xk: seen.append(backend.to_numpy(xk)))
    assert len(seen) == info.iterations > 0
    assert seen[0].shape == (N,)
    np.testing.assert_array_equal(seen[-1], backend.to_numpy(x))
    x, info = cg(op, b_b, rtol=1e-14, maxiter=5)
    assert info.reason == "maxiter" and info.iterations == 5 and not info.converged
    x_five, _ = scipy.sparse.linalg.cg(A, b, rtol=0.0, atol=0.0, maxiter=5)
    np.testing.assert_allclose(backend.to_numpy(x), x_five, rtol=1e-10)


@pytest.mark.filterwarnings("ignore::curvlinops.AssumptionWarning")  # raw arrays: PSD not declared
def test_cg_default_maxiter_is_ten_n(numpy_backend):
    A = sym_from_spectrum(np.array([1.0, 2.0, 3.0]), seed=22)
    seen = []
    x, info = cg(A, np.ones(3), rtol=0.0, atol=0.0, callback=seen.append)
    # Exact arithmetic would converge in 3 steps; with rtol = atol = 0 it runs on.
    assert info.reason in ("maxiter", "converged", "negative_curvature")
    assert info.iterations <= 30 and len(seen) == info.iterations
    np.testing.assert_allclose(x, np.linalg.solve(A, np.ones(3)), rtol=1e-10)


def test_cg_zero_rhs_and_atol(backend):
    A = sym_from_spectrum(np.linspace(1.0, 2.0, N), seed=23)
    op, b_b = op_and_rhs(backend, A, np.zeros(N))
    x, info = cg(op, b_b)
    assert info.reason == "converged" and info.iterations == 0
    assert np.all(backend.to_numpy(x) == 0)
    # atol alone decides when rtol = 0.
    b = np.ones(N)
    x, info = cg(op, backend.asarray(b), rtol=0.0, atol=1e-6)
    assert info.converged and info.residual_norms[-1] <= 1e-6
    assert np.linalg.norm(b - A @ backend.to_numpy(x)) <= 1e-5


@pytest.mark.filterwarnings("ignore::curvlinops.AssumptionWarning")  # raw arrays: PSD not declared
def test_cg_accepts_dense_array_and_integer_rhs(numpy_backend):
    A = np.array([[4.0, 1.0], [1.0, 3.0]])
    x, info = cg(A, np.array([1, 2]), rtol=1e-12)
    np.testing.assert_allclose(x, np.linalg.solve(A, [1.0, 2.0]), rtol=1e-10)
    assert x.dtype == np.float64


def test_cg_bad_inputs(numpy_backend):
    A = sym_from_spectrum(np.linspace(1.0, 2.0, 5), seed=24)
    b = np.ones(5)
    with pytest.raises(ValueError, match=r"square.*\(5, 4\)"):
        cg(np.ones((5, 4)), b)
    with pytest.raises(ValueError, match=r"\(5,\) or \(5, k\).*\(4,\)"):
        cg(A, np.ones(4))
    with pytest.raises(ValueError, match=r"\(5,\) or \(5, k\).*\(5, 2, 1\)"):
        cg(A, np.ones((5, 2, 1)))
    with pytest.raises(ValueError, match=r"preconditioner.*\(5, 5\).*\(4, 4\)"):
        cg(A, b, M=np.eye(4))
    with pytest.raises(ValueError, match=r"x0.*\(5,\).*\(5, 1\)"):
        cg(A, b, np.ones((5, 1)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        cg(A, np.array([1.0, np.nan, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        cg(A, np.ones((5, 2)) * np.array([1.0, np.inf]))
    with pytest.raises(ValueError, match="rtol"):
        cg(A, b, rtol=-1.0)
    with pytest.raises(ValueError, match="maxiter"):
        cg(A, b, maxiter=-1)
    with pytest.raises(TypeError, match="maxiter"):
        cg(A, b, maxiter=2.5)
    import array_api_strict

    with pytest.raises(TypeError, match="array_api_strict"):
        cg(A, array_api_strict.asarray(b))
    with pytest.raises(TypeError, match="dtype"):
        cg(A, b, M=np.eye(5, dtype=np.float32))
    with pytest.raises(TypeError, match="float32"):
        cg(A.astype(np.float32), b)


def test_cg_exported_at_top_level():
    assert curvlinops.cg is cg
    assert "cg" in curvlinops.__all__ and "SolveInfo" in curvlinops.__all__


@given(
    n=st.integers(1, 12),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    log_cond=st.floats(0.0, 3.0),
)
def test_cg_property_random_spd(n, k, seed, log_cond):
    rng = np.random.default_rng(seed)
    w = np.geomspace(1.0, 10.0**log_cond, n) * rng.uniform(0.5, 2.0)
    A = sym_from_spectrum(w, seed=seed)
    B = rng.standard_normal((n, k))
    X, info = cg(aslinearoperator(A, psd=True), B, rtol=1e-12)
    assert info.converged.all()
    assert np.all(info.iterations <= 3 * n)
    cond = w.max() / w.min()
    np.testing.assert_allclose(X, np.linalg.solve(A, B), rtol=0, atol=1e-9 * cond * np.abs(X).max())
    for j in range(k):
        assert np.linalg.norm(B[:, j] - A @ X[:, j]) <= 2e-12 * np.linalg.norm(B[:, j])


@pytest.mark.filterwarnings("ignore::curvlinops.AssumptionWarning")  # raw arrays: PSD not declared
@pytest.mark.parametrize("scale_A, scale_b", [(1e-20, 1.0), (1e20, 1e-20), (1.0, 1e20)])
def test_cg_is_invariant_to_scaling(numpy_backend, scale_A, scale_b):
    A = sym_from_spectrum(np.geomspace(1.0, 100.0, N), seed=25)
    b = np.random.default_rng(26).standard_normal(N)
    exact = np.linalg.solve(A, b) * scale_b / scale_A
    for M in (None, np.eye(N) / scale_A):
        x, info = cg(scale_A * A, scale_b * b, rtol=1e-10, M=M)
        assert info.reason == "converged"
        assert np.linalg.norm(x - exact) <= 1e-8 * np.linalg.norm(exact)


@pytest.mark.parametrize("solver", [cg, minres], ids=["cg", "minres"])
def test_an_empty_batch_returns_at_once(numpy_backend, solver):
    """``b`` of shape ``(n, 0)``: nothing to solve, so no product with the operator, no
    callback, and an empty (n, 0) solution and empty per-column info (the shared
    ``prepare_system`` stops both Krylov solvers before their loops)."""
    A = np.diag([1.0, 2.0, 3.0])
    products, calls = [], []
    op = CallableLinearOperator(
        (3, 3),
        matmat=lambda X: products.append(X.shape) or A @ X,
        dtype=np.float64,
        xp=np,
        psd=True,
    )
    x, info = solver(op, np.zeros((3, 0)), callback=calls.append)
    assert x.shape == (3, 0) and products == [] and calls == []
    assert info.iterations.shape == (0,) and info.converged.shape == (0,)
    assert info.reason == [] and info.residual_norms == []
