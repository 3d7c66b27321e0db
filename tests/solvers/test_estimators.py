"""Tests of curvlinops.solvers.estimators: Hutchinson, Hutch++, XTrace, XDiag.

Unbiasedness is checked in expectation (tests/monte_carlo.py): the mean of 80 independent
estimates lies within a Bonferroni-corrected Student-t bound (about 5 standard errors,
from the draws) of the exact value from the dense NumPy matrix, and the same check
rejects the estimates scaled by 0.9 and by 1.1. XTrace/XDiag are also compared with a
brute-force NumPy evaluation of their leave-one-out definition on the same probes.
"""

from __future__ import annotations

import numpy as np
import pytest
from monte_carlo import assert_unbiased

from curvlinops import (
    CallableLinearOperator,
    RandomGenerator,
    aslinearoperator,
    hutchinson_diagonal,
    hutchinson_squared_frobenius,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xtrace,
)

NUM_REPEATS = 80  # independent estimates (seeds) per unbiasedness test


def _test_matrix(n=12, seed=0, tail=(-1.0, 1.0)):
    """Symmetric, indefinite, with a few dominant eigenvalues and non-zero off-diagonals;
    the other eigenvalues are uniform on ``tail``."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([[6.0, -4.0, 3.0], rng.uniform(*tail, n - 3)])
    A = (Q * lam) @ Q.T
    return 0.5 * (A + A.T)


def _unbiasedness_matrix():
    """60 x 60 with a positive tail of 57 eigenvalues: the trace, diagonal and squared
    Frobenius norm are large against the estimators' standard deviations, so that 80
    estimates see a 10 % scale error; the sketches (24 matvecs) stay below n."""
    return _test_matrix(60, seed=0, tail=(0.5, 1.5))


# matvecs per estimate: the Hutchinson averages take many probes in one matmat; the
# sketching estimators keep their sketch (8-12 columns) below n = 60
TRACE_ESTIMATORS = [(hutchinson_trace, 60), (hutchpp_trace, 24), (xtrace, 24)]


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
@pytest.mark.parametrize("estimator,num_matvecs", TRACE_ESTIMATORS)
def test_trace_estimators_unbiased(backend, estimator, num_matvecs, distribution):
    A = _unbiasedness_matrix()
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    draws = []
    for seed in range(NUM_REPEATS):
        est = estimator(op, num_matvecs, seed=seed, distribution=distribution)
        assert est.ndim == 0
        draws.append(float(est))
    assert np.std(draws) > 0  # really random
    assert_unbiased(draws, np.trace(A))


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
@pytest.mark.parametrize("estimator,num_matvecs", [(hutchinson_diagonal, 120), (xdiag, 24)])
def test_diagonal_estimators_unbiased(backend, estimator, num_matvecs, distribution):
    A = _unbiasedness_matrix()
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    draws = [
        backend.to_numpy(estimator(op, num_matvecs, seed=seed, distribution=distribution))
        for seed in range(NUM_REPEATS)
    ]
    assert draws[0].shape == (A.shape[0],)
    assert_unbiased(draws, np.diag(A))


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_squared_frobenius_unbiased(backend, distribution):
    A = _unbiasedness_matrix()
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    draws = [
        float(hutchinson_squared_frobenius(op, 120, seed=seed, distribution=distribution))
        for seed in range(NUM_REPEATS)
    ]
    assert_unbiased(draws, np.linalg.norm(A, "fro") ** 2)


def test_exact_cases(backend):
    n = 12
    D = np.diag(np.arange(1.0, n + 1))
    op_D = aslinearoperator(backend.asarray(D), symmetric=True)
    # +-1 probes are exact for diagonal matrices
    assert abs(float(hutchinson_trace(op_D, 6, seed=0)) - np.trace(D)) <= 1e-12
    np.testing.assert_allclose(backend.to_numpy(hutchinson_diagonal(op_D, 6, seed=0)), np.diag(D))
    fro = float(hutchinson_squared_frobenius(op_D, 6, seed=0))
    assert abs(fro - np.sum(np.diag(D) ** 2)) <= 1e-10
    # low rank (3) below the sketch size: the low-rank parts are exact
    G = np.random.default_rng(1).standard_normal((n, 3))
    L = G @ G.T
    op_L = aslinearoperator(backend.asarray(L), symmetric=True)
    assert abs(float(hutchpp_trace(op_L, 12, seed=0)) - np.trace(L)) <= 1e-10 * np.trace(L)
    assert abs(float(xtrace(op_L, 12, seed=0)) - np.trace(L)) <= 1e-10 * np.trace(L)
    np.testing.assert_allclose(backend.to_numpy(xdiag(op_L, 12, seed=0)), np.diag(L), atol=1e-10)


def _leave_one_out_reference(A, Omega):
    """XTrace and XDiag from their definitions: average over i of the estimate that
    projects onto range(A Omega_{-i}) and corrects with probe i."""
    n, s = Omega.shape
    traces, diags = [], []
    for i in range(s):
        Q_i, _ = np.linalg.qr(A @ np.delete(Omega, i, axis=1))
        P = Q_i @ Q_i.T
        R = np.eye(n) - P
        w = Omega[:, i]
        traces.append(np.trace(P @ A) + w @ R @ A @ R @ w)
        diags.append(np.diag(A @ P) + w * (A @ R @ w))
    return np.mean(traces), np.mean(diags, axis=0)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_xtrace_xdiag_match_definition(numpy_backend, distribution):
    xp = numpy_backend.xp
    n, s = 12, 6
    rng = np.random.default_rng(2)
    A = rng.standard_normal((n, n)) + 0.5 * np.eye(n)  # not symmetric: needs no A^T
    op = aslinearoperator(A)
    # the estimators draw their s probes first from RandomGenerator(seed)
    gen = RandomGenerator(3, xp)
    Omega = (
        gen.rademacher((n, s), xp.float64)
        if distribution == "rademacher"
        else gen.normal((n, s), xp.float64)
    )
    trace_ref, diag_ref = _leave_one_out_reference(A, Omega)
    assert abs(float(xtrace(op, 2 * s, seed=3, distribution=distribution)) - trace_ref) <= 1e-10
    np.testing.assert_allclose(
        xdiag(op, 2 * s, seed=3, distribution=distribution), diag_ref, atol=1e-10
    )


def test_hutchpp_matches_definition(numpy_backend):
    xp = numpy_backend.xp
    n, m = 12, 12
    A = _test_matrix(n, seed=4)
    gen = RandomGenerator(5, xp)
    S = gen.rademacher((n, m // 3), xp.float64)
    G = gen.rademacher((n, m - 2 * (m // 3)), xp.float64)
    Q, _ = np.linalg.qr(A @ S)
    P = np.eye(n) - Q @ Q.T
    expected = np.trace(Q.T @ A @ Q) + np.trace(G.T @ P @ A @ P @ G) / G.shape[1]
    assert abs(float(hutchpp_trace(aslinearoperator(A), m, seed=5)) - expected) <= 1e-10


def test_variance_reduction_on_decaying_spectrum(backend):
    """At equal budget, Hutch++ and XTrace beat Hutchinson by far (MSE) when a few
    eigenvalues dominate; XDiag beats Hutchinson's diagonal estimator likewise."""
    n, budget, num_seeds = 12, 12, 10
    rng = np.random.default_rng(6)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([[10.0, 9.0, 8.0], 1e-3 * rng.uniform(size=n - 3)])
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    op = aslinearoperator(backend.asarray(A), symmetric=True)

    def mse(estimator, truth):
        errors = [
            np.sum((backend.to_numpy(estimator(op, budget, seed=s)) - truth) ** 2)
            for s in range(num_seeds)
        ]
        return np.mean(errors)

    mse_hutch = mse(hutchinson_trace, np.trace(A))
    assert mse(hutchpp_trace, np.trace(A)) < 1e-3 * mse_hutch
    assert mse(xtrace, np.trace(A)) < 1e-3 * mse_hutch
    assert mse(xdiag, np.diag(A)) < 1e-2 * mse(hutchinson_diagonal, np.diag(A))


def test_one_matmat_per_batch(backend):
    n = 12
    A_b = backend.asarray(_test_matrix(n))
    calls = []

    def matmat(X):
        calls.append(X.shape[1])
        return A_b @ X

    op = CallableLinearOperator(
        (n, n), matmat=matmat, dtype=A_b.dtype, xp=backend.xp, device=backend.device
    )
    hutchinson_trace(op, 12, seed=0, batch_size=5)
    assert calls == [5, 5, 2]
    calls.clear()
    hutchinson_diagonal(op, 6, seed=0)
    assert calls == [6]
    calls.clear()
    hutchinson_diagonal(op, 7, seed=0, batch_size=3)
    assert calls == [3, 3, 1]
    calls.clear()
    hutchpp_trace(op, 12, seed=0)
    assert calls == [4, 8]
    calls.clear()
    xtrace(op, 12, seed=0)
    assert calls == [6, 6]


def test_estimator_errors(numpy_backend):
    op = aslinearoperator(np.eye(4))
    # API change (issue #11): one message format for counts in every solver.
    with pytest.raises(ValueError, match="num_matvecs must be an integer >= 3"):
        hutchpp_trace(op, 2)
    with pytest.raises(ValueError, match="num_matvecs must be an integer >= 2"):
        xtrace(op, 1)
    with pytest.raises(ValueError, match="num_matvecs must be an integer >= 2"):
        xdiag(op, 1)
    with pytest.raises(ValueError, match="num_matvecs must be an integer >= 1"):
        hutchinson_trace(op, 0)
    with pytest.raises(ValueError, match="unknown distribution"):
        hutchinson_diagonal(op, 3, distribution="uniform")
    with pytest.raises(ValueError, match="square"):
        hutchinson_squared_frobenius(aslinearoperator(np.ones((3, 4))), 3)
    for estimator in (hutchinson_trace, hutchinson_diagonal, hutchinson_squared_frobenius):
        with pytest.raises(ValueError) as info:
            estimator(op, 3, batch_size=0)
        expected = f"{estimator.__name__}: batch_size must be an integer >= 1, got 0."
        assert str(info.value) == expected


def test_default_seeds_are_zero():
    # the documented default seed=0: a call without seed reproduces seed=0 exactly
    A = np.random.default_rng(1).normal(size=(20, 20))
    op = aslinearoperator(A @ A.T, symmetric=True)
    for estimator in (hutchinson_trace, hutchpp_trace, xtrace, hutchinson_diagonal, xdiag):
        np.testing.assert_array_equal(estimator(op, 8), estimator(op, 8, seed=0))
        assert not np.array_equal(estimator(op, 8), estimator(op, 8, seed=1)), estimator


@pytest.mark.parametrize(
    "estimator",
    [
        hutchinson_trace,
        hutchinson_diagonal,
        hutchinson_squared_frobenius,
        hutchpp_trace,
        xtrace,
        xdiag,
    ],
)
def test_float32_operators_give_float32_estimates_close_to_float64(backend, estimator):
    """Every array an estimator builds (probes, identities of the sketch) follows the
    operator's dtype: a float32 operator gives a float32 estimate, and where the
    generator draws the same probes in both dtypes (NumPy's, for NumPy and
    array-api-strict) one within float32 rounding of the float64 estimate."""
    A = _test_matrix()
    ops = {
        name: aslinearoperator(backend.asarray(A, name), symmetric=True)
        for name in ("float32", "float64")
    }
    single, double = (estimator(ops[name], 10, seed=0) for name in ("float32", "float64"))
    assert single.dtype == backend.dtype("float32")
    if backend.name not in ("numpy", "array_api_strict"):
        return
    single = backend.to_numpy(single).astype(np.float64)
    double = backend.to_numpy(double)
    np.testing.assert_allclose(single, double, rtol=1e-4, atol=1e-4 * np.abs(double).max())
