"""Bayesian linear regression: the Laplace approximation is exact, checked in closed form.

A linear model ``f = Phi theta`` (a single ``Linear`` layer; ``Phi = [X, 1]``) with
Gaussian noise ``sigma`` and prior ``N(0, diag(delta)^{-1})`` has the posterior
``N(m, A^{-1})``, ``A = Phi^T Phi / sigma^2 + diag(delta)``, ``m = A^{-1} Phi^T y /
sigma^2``, the predictive ``N(phi^T m, phi^T A^{-1} phi + sigma^2)`` and the evidence
``log N(y | 0, sigma^2 I + Phi diag(delta)^{-1} Phi^T)`` (computed here with SciPy's
multivariate normal, not with the Laplace formula). All written in NumPy from the data,
without curvlinops.

Which structures are exact: the full GGN and Hessian always; K-FAC and EKFAC (blocks
per weight and bias) when the inputs are centred (the weight-bias block of ``Phi^T Phi``
is ``X^T 1 = 0``); the diagonal when, in addition, the inputs' columns are orthogonal;
low rank when ``Phi^T Phi`` has that rank (fewer data than parameters), with a scalar
prior (damped eigendecomposition) and a per-array prior (Woodbury), and diagonal plus
low rank there too. Each is checked to 1e-10 in float64 on every backend; float32 to
its precision.

The tuned prior precision is checked against MacKay's fixed point of the exact evidence
(the MAP recomputed for every ``alpha``) and against SciPy's maximizer of the exact
evidence.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

import curvlinops.nn as cnn
from curvlinops import MSELoss, to_numpy
from curvlinops.bayes import Laplace

SIGMA = 0.7


def orthogonal_centred_inputs(N, D, seed):
    """Inputs whose columns are centred and mutually orthogonal, of different norms."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(N, D))
    Z -= Z.mean(axis=0)
    Q, _ = np.linalg.qr(Z)
    return Q * np.linspace(2.0, 5.0, D)[None, :]


def design(X):
    return np.concatenate([X, np.ones((X.shape[0], 1))], axis=1)


def posterior(X, y, delta, sigma=SIGMA):
    """Exact posterior ``(m, A)`` of Bayesian linear regression, prior diag(delta)."""
    Phi = design(X)
    A = Phi.T @ Phi / sigma**2 + np.diag(delta)
    m = np.linalg.solve(A, Phi.T @ y / sigma**2)
    return m, A


def log_evidence(X, y, delta, sigma=SIGMA):
    Phi = design(X)
    cov = sigma**2 * np.eye(len(y)) + Phi @ np.diag(1.0 / delta) @ Phi.T
    return stats.multivariate_normal(np.zeros(len(y)), cov).logpdf(y)


def expand(prior, D):
    """A per-array prior (weight, bias) as the per-parameter diagonal."""
    values = np.broadcast_to(np.asarray(prior, dtype=float), (2,))
    return np.concatenate([np.full(D, values[0]), [values[1]]])


def problem(N=40, D=4, seed=0, orthogonal=True):
    rng = np.random.default_rng(seed + 1)
    if orthogonal:
        X = orthogonal_centred_inputs(N, D, seed)
    else:
        X = rng.normal(size=(N, D))
        X -= X.mean(axis=0)
    y = X @ rng.normal(size=D) + 0.3 + SIGMA * rng.normal(size=N)
    return X, y


def laplace_at_map(backend, X, y, prior, dtype="float64", **kwargs):
    D = X.shape[1]
    m, _ = posterior(X, y, expand(prior, D))
    model = cnn.Sequential(cnn.Linear(D, 1))
    params = [backend.asarray(m[:D].reshape(1, D), dtype), backend.asarray(m[D:], dtype)]
    data = [(backend.asarray(X, dtype), backend.asarray(y[:, None], dtype))]
    la = Laplace(model, MSELoss(), params, data, sigma_noise=SIGMA, prior_precision=prior, **kwargs)
    return la, m


EXACT_CASES = [
    ("full", "ggn", {}),
    ("full", "hessian", {}),
    ("kron", "ggn", {}),
    ("kron", "hessian", {}),
    ("ekfac", "ggn", {}),
    ("diag", "ggn", {}),
    ("diag", "hessian", {}),
]
PRIORS = [2.0, [0.5, 3.0]]


@pytest.mark.parametrize("prior", PRIORS, ids=["scalar", "layerwise"])
@pytest.mark.parametrize("structure, curvature, kwargs", EXACT_CASES)
def test_posterior_predictive_and_evidence_in_closed_form(
    backend, structure, curvature, kwargs, prior
):
    X, y = problem()
    la, m = laplace_at_map(backend, X, y, prior, structure=structure, curvature=curvature)
    delta = expand(prior, X.shape[1])
    _, A = posterior(X, y, delta)
    covariance = np.linalg.inv(A)
    np.testing.assert_allclose(to_numpy(la.mean), m, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(la.precision.to_dense()), A, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        to_numpy(la.covariance.to_dense()), covariance, rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(la.log_marginal_likelihood(), log_evidence(X, y, delta), rtol=1e-10)
    X_test = np.random.default_rng(5).normal(size=(7, X.shape[1]))
    mean, var = la.predictive(backend.asarray(X_test))
    Phi_test = design(X_test)
    np.testing.assert_allclose(to_numpy(mean)[:, 0], Phi_test @ m, rtol=1e-10, atol=1e-12)
    expected_var = np.einsum("np,pq,nq->n", Phi_test, covariance, Phi_test) + SIGMA**2
    np.testing.assert_allclose(to_numpy(var)[:, 0, 0], expected_var, rtol=1e-10)


def test_kron_is_exact_without_orthogonal_columns(numpy_backend):
    # centred but correlated inputs: K-FAC's blocks are exact, the diagonal is not
    X, y = problem(orthogonal=False)
    delta = expand(1.5, X.shape[1])
    _, A = posterior(X, y, delta)
    la, _ = laplace_at_map(numpy_backend, X, y, 1.5, structure="kron")
    np.testing.assert_allclose(la.precision.to_dense(), A, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(la.log_marginal_likelihood(), log_evidence(X, y, delta), rtol=1e-10)
    diag, _ = laplace_at_map(numpy_backend, X, y, 1.5, structure="diag")
    assert abs(diag.log_marginal_likelihood() - log_evidence(X, y, delta)) > 1e-3  # not exact


LOW_RANK_CASES = [
    ("lowrank", "lanczos"),
    ("lowrank", "nystrom"),
    ("diag_lowrank", "nystrom"),
    ("diag_lowrank", "lanczos"),
]


@pytest.mark.parametrize("prior", PRIORS, ids=["scalar", "layerwise"])
@pytest.mark.parametrize("structure, method", LOW_RANK_CASES)
def test_low_rank_is_exact_for_a_low_rank_design(backend, structure, method, prior):
    # 4 data, 7 + 1 parameters: Phi^T Phi has rank 4
    rng = np.random.default_rng(3)
    X = rng.normal(size=(4, 7))
    y = rng.normal(size=4)
    delta = expand(prior, 7)
    _, A = posterior(X, y, delta)
    la, _ = laplace_at_map(
        backend, X, y, prior, structure=structure, rank=4, low_rank_method=method
    )
    np.testing.assert_allclose(to_numpy(la.precision.to_dense()), A, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        to_numpy(la.covariance.to_dense()), np.linalg.inv(A), rtol=1e-9, atol=1e-10
    )
    np.testing.assert_allclose(la.log_marginal_likelihood(), log_evidence(X, y, delta), rtol=1e-10)


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_float32_matches_the_closed_form_to_its_precision(backend, structure):
    X, y = problem()
    la, _ = laplace_at_map(backend, X, y, [0.5, 3.0], dtype="float32", structure=structure)
    delta = expand([0.5, 3.0], X.shape[1])
    _, A = posterior(X, y, delta)
    assert str(la.precision.dtype).endswith("float32")
    np.testing.assert_allclose(to_numpy(la.precision.to_dense()), A, rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(la.log_marginal_likelihood(), log_evidence(X, y, delta), rtol=1e-5)
    mean, var = la.predictive(backend.asarray(X[:5], "float32"))
    expected = np.einsum("np,pq,nq->n", design(X[:5]), np.linalg.inv(A), design(X[:5]))
    np.testing.assert_allclose(to_numpy(var)[:, 0, 0], expected + SIGMA**2, rtol=1e-5)


def mackay_alpha(X, y, sigma=SIGMA, alpha=1.0, iterations=10_000):
    """MacKay's fixed point of the exact evidence: the MAP is recomputed for every alpha."""
    Phi = design(X)
    eigenvalues = np.linalg.eigvalsh(Phi.T @ Phi) / sigma**2
    for _ in range(iterations):
        m, _ = posterior(X, y, np.full(Phi.shape[1], alpha), sigma)
        gamma = np.sum(eigenvalues / (eigenvalues + alpha))
        new = gamma / (m @ m)
        if abs(new - alpha) < 1e-15 * alpha:
            break
        alpha = new
    return alpha


@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
def test_tuned_scalar_prior_is_mackays_evidence_maximizer(numpy_backend, structure):
    X, y = problem()
    alpha = mackay_alpha(X, y)
    # the exact evidence is maximal there (SciPy, on its own formula)
    best = optimize.minimize_scalar(
        lambda t: -log_evidence(X, y, np.full(X.shape[1] + 1, np.exp(t))),
        bracket=(-3.0, 3.0),
        tol=1e-12,
    )
    np.testing.assert_allclose(np.exp(best.x), alpha, rtol=1e-5)
    # Laplace at the MAP for alpha, started elsewhere, tunes back to alpha
    la, _ = laplace_at_map(numpy_backend, X, y, alpha, structure=structure)
    la.prior_precision = 10 * alpha
    tuned = la.optimize_prior_precision("scalar")
    np.testing.assert_allclose(tuned, alpha, rtol=1e-8)
    assert la.prior_precision == (tuned, tuned)


def test_tuned_layerwise_prior_maximizes_the_dense_evidence(numpy_backend):
    # at a fixed MAP, the Laplace evidence as a function of (delta_W, delta_b), written
    # densely with slogdet, maximized by SciPy
    X, y = problem(orthogonal=False)
    la, m = laplace_at_map(numpy_backend, X, y, [1.0, 1.0], structure="full")
    Phi = design(X)
    H = Phi.T @ Phi / SIGMA**2
    residual = y - Phi @ m
    log_lik = -0.5 * residual @ residual / SIGMA**2 - 0.5 * len(y) * np.log(2 * np.pi * SIGMA**2)

    def negative_evidence(t):
        delta = expand(np.exp(t), X.shape[1])
        logdet = np.linalg.slogdet(H + np.diag(delta))[1]
        return -(log_lik - 0.5 * (delta @ m**2) + 0.5 * np.sum(np.log(delta)) - 0.5 * logdet)

    best = optimize.minimize(negative_evidence, np.zeros(2), method="BFGS", options={"gtol": 1e-10})
    tuned = la.optimize_prior_precision("layerwise")
    np.testing.assert_allclose(np.log(tuned), best.x, atol=1e-6)
    np.testing.assert_allclose(la.log_marginal_likelihood(), -best.fun, rtol=1e-12)
    # a maximum: every step away lowers the evidence
    for step in ([0.05, 0.0], [0.0, 0.05], [-0.05, 0.0], [0.0, -0.05]):
        assert negative_evidence(np.log(tuned) + np.array(step)) > best.fun
