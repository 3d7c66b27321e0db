"""VOGN and noisy K-FAC against closed forms: Bayesian linear and logistic regression.

References, none of them the library's own optimizer code:

- Bayesian linear regression (likelihood ``exp(-sum (f - y)^2 / tau)``, prior
  ``N(0, delta^{-1} I)``): the exact posterior ``N(Lam^{-1} b, Lam^{-1})`` with
  ``Lam = (2 / tau) X^T X + delta I``, ``b = (2 / tau) X^T y`` (NumPy). Its mean-field
  optimum is the exact mean with precision ``diag(Lam)``; VOGN's fixed point with the
  exact GGN (exact for this model) is that optimum, noisy K-FAC's the exact posterior
  when K-FAC is exact (one linear layer, one output, joint weight and bias block);
- one step with weight noise: its expectation is the noise-free step written out in
  NumPy (the gradient is linear in the weights), checked with a variance-derived bound
  and the power to see a 10 % error (``tests/monte_carlo.py``);
- the posteriors' draws: their second moments against the dense covariance;
- logistic regression: the ELBO of a Gaussian by Gauss-Hermite quadrature of the
  one-dimensional expectations ``E[softplus(f_n)]`` (``f_n`` Gaussian) and the KL
  divergence in NumPy; the mean-field optimum by ``scipy.optimize.minimize`` on it;
- the precisions at the first state: dense GGN and K-FAC matrices (tested in
  tests/curvature against finite differences and autodiff), the factored damping of
  Zhang et al. assembled with ``numpy.kron``.
"""

from __future__ import annotations

import math

import array_api_compat.numpy as xp
import numpy as np
import pytest
from scipy.optimize import minimize

import curvlinops as cl
import curvlinops.nn as cnn
from curvlinops.optim import VOGN, NoisyKFAC
from tests.monte_carlo import assert_unbiased


def flat(params):
    return np.concatenate([np.ravel(np.asarray(p)) for p in params])


def regression(seed=0, n=40, d=3, bias=True):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) @ (np.eye(d) + np.eye(d, k=1))  # correlated inputs
    w = rng.normal(size=(d,)) * 2
    y = (X @ w + 1.5 + 0.5 * rng.normal(size=n))[:, None]
    model = cnn.Sequential(cnn.Linear(d, 1, bias=bias))
    params = [np.zeros((1, d))] + ([np.zeros(1)] if bias else [])
    return model, params, X, y


def design(X, bias=True):
    return np.concatenate([X, np.ones((X.shape[0], 1))], axis=1) if bias else X


def exact_posterior(X, y, tau, delta, bias=True):
    """``(mean, precision)`` of Bayesian linear regression with MSELoss's likelihood."""
    D = design(X, bias)
    precision = (2 / tau) * D.T @ D + delta * np.eye(D.shape[1])
    return np.linalg.solve(precision, (2 / tau) * D.T @ y[:, 0]), precision


# -- Bayesian linear regression: the fixed points ---------------------------------------


@pytest.mark.parametrize(
    ("tau", "delta", "beta1", "reduction"),
    [(1.0, 1.0, 0.0, "mean"), (0.5, 3.0, 0.0, "sum"), (2.0, 0.2, 0.8, "mean")],
)
def test_vogn_converges_to_the_mean_field_optimum_of_linear_regression(
    tau, delta, beta1, reduction
):
    model, params, X, y = regression(1)
    mean, precision = exact_posterior(X, y, tau, delta)
    # Jacobi-like iteration m <- m - lr diag(Lam)^{-1} (Lam m - b): lr below
    # 2 / lambda_max(diag^{-1} Lam) converges
    D = np.diag(np.diag(precision))
    lr = 1.0 / np.linalg.eigvalsh(np.linalg.solve(D, precision)).max()
    opt = VOGN(
        model,
        cl.MSELoss(reduction=reduction),
        num_data=40,
        learning_rate=lr,
        prior_precision=delta,
        temperature=tau,
        beta1=beta1,
        weight_samples=0,
    )
    state = opt.init(params, (X, y))
    for _ in range(400):
        params, state = opt.step(params, state, (X, y))
    q = opt.posterior(params, state)
    np.testing.assert_allclose(q.flat_mean, mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(q.precision.diagonal(), np.diag(precision), rtol=1e-12)
    np.testing.assert_allclose(q.covariance.diagonal(), 1 / np.diag(precision), rtol=1e-12)
    # the mean-field optimum is not the posterior's marginal: diag(Lam)^{-1} is smaller
    # than diag(Lam^{-1}) (correlated inputs), so the test tells the two apart
    marginal = np.diag(np.linalg.inv(precision))
    assert np.max(marginal / q.covariance.diagonal()) > 1.2


@pytest.mark.parametrize(("tau", "delta", "reduction"), [(1.0, 1.0, "mean"), (0.5, 3.0, "sum")])
def test_noisy_kfac_converges_to_the_exact_posterior_when_kfac_is_exact(tau, delta, reduction):
    model, params, X, y = regression(2)
    mean, precision = exact_posterior(X, y, tau, delta)
    opt = NoisyKFAC(
        model,
        cl.MSELoss(reduction=reduction),
        num_data=40,
        learning_rate=0.5,
        prior_precision=delta,
        temperature=tau,
        weight_samples=0,
        separate_weight_and_bias=False,  # one joint block: K-FAC is the exact GGN
    )
    state = opt.init(params, (X, y))
    for _ in range(60):
        params, state = opt.step(params, state, (X, y))
    q = opt.posterior(params, state)
    np.testing.assert_allclose(q.flat_mean, mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(q.precision.to_dense(), precision, rtol=1e-10, atol=1e-10)
    covariance = np.linalg.inv(precision)
    np.testing.assert_allclose(q.covariance.to_dense(), covariance, rtol=1e-10, atol=1e-13)
    S = q.scale.to_dense()
    np.testing.assert_allclose(S @ S, covariance, rtol=1e-10, atol=1e-13)
    assert abs(q.kl_to_prior() - kl_to_prior(q.flat_mean, covariance, delta)) < 1e-9


def test_noisy_kfac_with_separate_bias_blocks_is_not_the_exact_posterior():
    model, params, X, y = regression(2)
    _, precision = exact_posterior(X, y, 1.0, 1.0)
    opt = NoisyKFAC(model, cl.MSELoss(), num_data=40, learning_rate=0.5, weight_samples=0)
    state = opt.init(params, (X, y))
    dense = opt.posterior(params, state).precision.to_dense()
    # the weight-bias cross terms are dropped: the test above can fail
    np.testing.assert_allclose(dense[:3, :3], precision[:3, :3], rtol=1e-12)
    assert np.abs(dense[:3, 3] - precision[:3, 3]).max() > 1.0


# -- one step with weight noise: unbiased -------------------------------------------------


def expected_step(X, y, batch, mean, tau, delta, lr, N, kind):
    """The noise-free step of the rule from the init state, written out densely."""
    Xb, yb = batch
    D_full, D_batch = design(X), design(Xb)
    n = Xb.shape[0]
    # the precision: the init's full-batch curvature and the batch's, averaged 1/2 : 1/2,
    # both scaled to N data; for K-FAC B = 2 c n0 is the same in both, A is averaged
    A = 0.5 * D_full.T @ D_full / X.shape[0] + 0.5 * D_batch.T @ D_batch / n
    precision = (2 * N / tau) * A + delta * np.eye(A.shape[0])
    if kind == "diagonal":
        precision = np.diag(np.diag(precision))
    gradient = (N / n) * (2 / tau) * D_batch.T @ (D_batch @ mean - yb[:, 0]) + delta * mean
    return -lr * np.linalg.solve(precision, gradient)


@pytest.mark.parametrize(
    ("method", "samples"), [("vogn", 1), ("vogn", 3), ("noisy_kfac", 1), ("noisy_kfac", 2)]
)
def test_one_noisy_step_is_unbiased_for_the_noise_free_step(method, samples):
    model, params, X, y = regression(3)
    tau, delta, lr, N = 0.8, 2.0, 0.7, 40
    rng = np.random.default_rng(0)
    rows = rng.choice(40, size=20, replace=False)
    batch = (X[rows], y[rows])
    start = [np.array([[1.0, -0.5, 2.0]]), np.array([0.3])]
    kind = "diagonal" if method == "vogn" else "kronecker"
    exact = expected_step(X, y, batch, flat(start), tau, delta, lr, N, kind)
    Opt = VOGN if method == "vogn" else NoisyKFAC
    extra = {} if method == "vogn" else {"separate_weight_and_bias": False}
    draws = []
    for seed in range(400):
        opt = Opt(
            model,
            cl.MSELoss(),
            num_data=N,
            learning_rate=lr,
            prior_precision=delta,
            temperature=tau,
            weight_samples=samples,
            seed=seed,
            **extra,
        )
        new, _ = opt.step(start, opt.init(start, (X, y)), batch)
        draws.append(flat(new) - flat(start))
    assert np.std(draws, axis=0).min() > 1e-3  # the weights were perturbed
    assert_unbiased(np.array(draws), exact)


# -- the posteriors' draws ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["vogn", "noisy_kfac"])
def test_posterior_draws_have_the_posterior_covariance(method):
    model, params, X, y = regression(4)
    Opt = VOGN if method == "vogn" else NoisyKFAC
    opt = Opt(model, cl.MSELoss(), num_data=40, learning_rate=0.5, weight_samples=1)
    state = opt.init(params, (X, y))
    params, state = opt.step(params, state, (X, y))
    q = opt.posterior(params, state)
    covariance = np.linalg.inv(q.precision.to_dense())  # an independent inversion
    theta = q.sample(20000, seed=5)
    assert theta.shape == (4, 20000)
    centered = theta - q.flat_mean[:, None]
    assert_unbiased(centered.T, np.zeros(4), power_scales=())
    outer = centered.T[:, :, None] * centered.T[:, None, :]
    assert_unbiased(outer, covariance)
    # reproducible from the seed, different for another
    assert np.array_equal(q.sample(3, seed=5), q.sample(3, seed=5))
    assert not np.array_equal(q.sample(3, seed=6), q.sample(3, seed=5))


# -- the first state's precision -------------------------------------------------------


def mlp(seed=0, n=24):
    model = cnn.Sequential(cnn.Linear(3, 4), cnn.Tanh(), cnn.Linear(4, 3))
    params = model.init(seed, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(seed)
    return model, params, (rng.normal(size=(n, 3)), rng.integers(0, 3, size=n))


@pytest.mark.parametrize("curvature", ["ggn", "empirical"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_vogn_precision_is_the_scaled_curvature_diagonal_plus_the_prior(curvature, reduction):
    model, params, batch = mlp(1)
    loss = cl.CrossEntropyLoss(reduction=reduction)
    N, tau, delta, damping = 240, 0.5, 3.0, 7.0
    opt = VOGN(
        model,
        loss,
        num_data=N,
        prior_precision=delta,
        temperature=tau,
        damping=damping,
        curvature=curvature,
    )
    q = opt.posterior(params, opt.init(params, batch))
    # the data set's curvature: N times the per-datum mean of the batch's, from the
    # dense matrices of the sum over the batch
    Op = cl.GGNLinearOperator if curvature == "ggn" else cl.EFLinearOperator
    total = (N / 24) * Op(model, cl.CrossEntropyLoss(reduction="sum"), params, [batch]).to_dense()
    expected = (np.diag(total) + damping) / tau + delta
    np.testing.assert_allclose(q.precision.diagonal(), expected, rtol=1e-12)
    np.testing.assert_allclose(q.scale.diagonal() ** 2, 1 / expected, rtol=1e-12)


def test_vogn_monte_carlo_curvature_differs_from_the_exact_one():
    model, params, batch = mlp(2)
    exact = VOGN(model, cl.CrossEntropyLoss(), num_data=24, curvature="ggn")
    mc = VOGN(model, cl.CrossEntropyLoss(), num_data=24, curvature="mc")
    d_exact = exact.posterior(params, exact.init(params, batch)).precision.diagonal()
    d_mc = mc.posterior(params, mc.init(params, batch)).precision.diagonal()
    assert np.all(d_mc >= 1.0) and np.abs(d_mc - d_exact).max() > 1e-3


def test_noisy_kfac_exact_precision_on_an_mlp():
    model, params, batch = mlp(3)
    N, tau, delta = 240, 2.0, 0.5
    opt = NoisyKFAC(
        model, cl.CrossEntropyLoss(), num_data=N, prior_precision=delta, temperature=tau
    )
    q = opt.posterior(params, opt.init(params, batch))
    K = cl.KFACLinearOperator(model, cl.CrossEntropyLoss(reduction="sum"), params, [batch])
    expected = (N / 24) * K.to_dense() / tau + delta * np.eye(K.shape[0])
    np.testing.assert_allclose(q.precision.to_dense(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        q.covariance.to_dense(), np.linalg.inv(expected), rtol=1e-9, atol=1e-12
    )
    S = q.scale.to_dense()
    np.testing.assert_allclose(S @ S, np.linalg.inv(expected), rtol=1e-9, atol=1e-12)
    sign, logdet = np.linalg.slogdet(expected)
    assert sign > 0 and float(q.precision.logdet()) == pytest.approx(logdet, rel=1e-12)


def test_noisy_kfac_factored_precision_is_zhang_et_al_s():
    model, params, batch = mlp(4)
    N, tau, delta, damping = 240, 0.5, 2.0, 3.0
    opt = NoisyKFAC(
        model,
        cl.CrossEntropyLoss(),
        num_data=N,
        prior_precision=delta,
        temperature=tau,
        damping=damping,
        precision_form="factored",
    )
    q = opt.posterior(params, opt.init(params, batch))
    # per-datum factors: A the input factor, Bbar = B / 24 of the summed loss
    K = cl.KFACLinearOperator(model, cl.CrossEntropyLoss(reduction="sum"), params, [batch])
    gamma = (tau * delta + damping) / N
    blocks = []
    for name in K.input_factors:
        A, B = K.input_factors[name], K.output_factors[name] / 24
        pi = math.sqrt((np.trace(A) / A.shape[0]) / (np.trace(B) / B.shape[0]))
        d_A, d_B = pi * math.sqrt(gamma), math.sqrt(gamma) / pi
        weight = (N / tau) * np.kron(B + d_B * np.eye(B.shape[0]), A + d_A * np.eye(A.shape[0]))
        bias = (N / tau) * (B + gamma * np.eye(B.shape[0]))  # the bias block: exact shift
        blocks += [weight, bias]
    expected = np.zeros((K.shape[0],) * 2)
    i = 0
    for b in blocks:
        expected[i : i + b.shape[0], i : i + b.shape[0]] = b
        i += b.shape[0]
    np.testing.assert_allclose(q.precision.to_dense(), expected, rtol=1e-9, atol=1e-9)
    exact = NoisyKFAC(
        model, cl.CrossEntropyLoss(), num_data=N, prior_precision=delta, temperature=tau
    )
    dense_exact = exact.posterior(params, exact.init(params, batch)).precision.to_dense()
    assert np.abs(dense_exact - expected).max() > 1e-2 * np.abs(expected).max()


def test_the_likelihood_does_not_depend_on_the_losss_reduction():
    model, params, X, y = regression(5)
    Y = np.concatenate([y, -y], axis=1)  # two outputs: "mean" divides by both
    model = cnn.Sequential(cnn.Linear(3, 2))
    params = model.init(5, xp=xp, dtype=xp.float64)
    runs = []
    for reduction in ("mean", "sum"):
        for Opt in (VOGN, NoisyKFAC):
            opt = Opt(model, cl.MSELoss(reduction=reduction), num_data=80, learning_rate=0.3)
            p, state = params, opt.init(params, (X[:10], Y[:10]))
            for k in range(3):
                p, state = opt.step(p, state, (X[10 * k : 10 * k + 10], Y[10 * k : 10 * k + 10]))
            runs.append((flat(p), opt.posterior(p, state).precision.to_dense()))
    for (m_mean, P_mean), (m_sum, P_sum) in zip(runs[:2], runs[2:], strict=True):
        np.testing.assert_allclose(m_mean, m_sum, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(P_mean, P_sum, rtol=1e-10, atol=1e-10)


# -- logistic regression: the ELBO ------------------------------------------------------

NODES, WEIGHTS = np.polynomial.hermite_e.hermegauss(80)
WEIGHTS = WEIGHTS / math.sqrt(2 * math.pi)  # E[g(z)] = sum w g(z), z ~ N(0, 1)


def softplus(f):
    return np.logaddexp(0.0, f)


def kl_to_prior(mean, covariance, delta):
    P = mean.size
    _, logdet = np.linalg.slogdet(covariance)
    return 0.5 * (
        delta * np.trace(covariance) + delta * mean @ mean - P - P * math.log(delta) - logdet
    )


def logistic_elbo(D, t, mean, covariance, delta):
    """``E_q[sum_n log r(t_n | f_n)] - KL(q || p)`` by Gauss-Hermite quadrature."""
    m = D @ mean
    v = np.einsum("ni,ij,nj->n", D, covariance, D)
    f = m[:, None] + np.sqrt(v)[:, None] * NODES[None, :]
    expected_nll = softplus(f) @ WEIGHTS - t * m  # E[softplus(f) - t f]
    return -expected_nll.sum() - kl_to_prior(mean, covariance, delta)


def logistic_problem(seed=7, n=60):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    t = rng.uniform(size=n) < 1 / (1 + np.exp(-(X @ np.array([2.0, -1.0]) + 0.5)))
    model = cnn.Sequential(cnn.Linear(2, 1))
    return model, X, t.astype(np.float64)[:, None]


def mean_field_optimum(D, t, delta):
    """The mean-field ELBO optimum (scipy, exact gradients by quadrature and Price's rule)."""
    P = D.shape[1]

    def negative(z):
        mean, log_sd = z[:P], z[P:]
        var = np.exp(2 * log_sd)
        m, v = D @ mean, (D * D) @ var
        f = m[:, None] + np.sqrt(v)[:, None] * NODES[None, :]
        s = 1 / (1 + np.exp(-f))
        value = -logistic_elbo(D, t[:, 0], mean, np.diag(var), delta)
        # d/dm E[softplus(f)] = E[sigma(f)]; d/dv = E[sigma'(f)] / 2
        g_mean = D.T @ (s @ WEIGHTS - t[:, 0]) + delta * mean
        g_var = 0.5 * (D * D).T @ ((s * (1 - s)) @ WEIGHTS) + 0.5 * delta - 0.5 / var
        return value, np.concatenate([g_mean, g_var * 2 * var])

    result = minimize(negative, np.zeros(2 * P), jac=True, method="BFGS", options={"gtol": 1e-10})
    return result.x[:P], np.exp(2 * result.x[P:]), -result.fun


def run_logistic(Opt, X, t, steps, *, average_from=None, **hyper):
    """Run the rule from a zero mean; the ELBOs by quadrature, and time-averaged ``q``."""
    model = cnn.Sequential(cnn.Linear(2, 1))
    opt = Opt(model, cl.BCEWithLogitsLoss(), num_data=t.shape[0], **hyper)
    params = [np.zeros((1, 2)), np.zeros(1)]
    state = opt.init(params, (X, t))
    D = design(X)
    q = opt.posterior(params, state)
    elbos = [logistic_elbo(D, t[:, 0], q.flat_mean, q.covariance.to_dense(), 1.0)]
    means, precisions = [], []
    for k in range(steps):
        params, state = opt.step(params, state, (X, t))
        q = opt.posterior(params, state)
        elbos.append(logistic_elbo(D, t[:, 0], q.flat_mean, q.covariance.to_dense(), 1.0))
        if average_from is not None and k >= average_from:
            means.append(q.flat_mean)
            precisions.append(q.precision.diagonal())
    return opt, q, np.array(elbos), means, precisions


def test_vogn_on_logistic_regression_reaches_the_mean_field_optimum():
    """The rule's fixed point in expectation is the mean-field ELBO optimum: with
    ``E_q`` exact, ``E_q[grad lbar] + delta m = 0`` and ``s = E_q[diag H] + delta`` are its
    stationarity conditions (the GGN is the Hessian of logistic regression). With
    Monte-Carlo weights the iterates fluctuate around it. Seen over three seeds: from
    step 150 on the ELBO stays within 0.9 % of the initial gap to the optimum; averaged
    over the last 150 of 300 steps, the precision is within 0.5 % of the optimum's and
    the mean within 0.07 posterior standard deviations. The bounds leave a factor 2 to
    4; the same run with a 10 % error in the likelihood's weight (temperature 1.1)
    misses the precision by 6-7 %, which they reject."""
    _, X, t = logistic_problem()
    D = design(X)
    m_opt, v_opt, elbo_opt = mean_field_optimum(D, t, 1.0)
    hyper = {"learning_rate": 0.1, "weight_samples": 4, "beta2": 0.9, "seed": 3}
    _, _, elbos, means, precisions = run_logistic(VOGN, X, t, 300, average_from=150, **hyper)
    gaps = elbo_opt - elbos
    assert gaps[0] > 10.0 and np.all(gaps > -1e-9)  # the optimum is the optimum
    assert gaps[60] < 0.02 * gaps[0] and np.all(gaps[150:] < 0.02 * gaps[0])
    mean, precision = np.mean(means, axis=0), np.mean(precisions, axis=0)
    np.testing.assert_allclose(precision, 1 / v_opt, rtol=0.02)
    assert np.all(np.abs(mean - m_opt) < 0.2 * np.sqrt(v_opt))
    averaged = logistic_elbo(D, t[:, 0], mean, np.diag(1 / precision), 1.0)
    assert elbo_opt - averaged < 1e-3 * gaps[0]
    # power: a 10 % error in the data term's weight is seen
    _, _, _, _, precisions = run_logistic(
        VOGN, X, t, 300, average_from=150, temperature=1.1, **hyper
    )
    assert np.abs(np.mean(precisions, axis=0) * v_opt - 1).max() > 0.04


def test_noisy_kfac_on_logistic_regression_increases_the_elbo():
    _, X, t = logistic_problem()
    _, _, elbo_mean_field = mean_field_optimum(design(X), t, 1.0)
    hyper = {"learning_rate": 0.1, "weight_samples": 4, "beta2": 0.9, "seed": 4}
    _, _, elbos, _, _ = run_logistic(NoisyKFAC, X, t, 150, separate_weight_and_bias=False, **hyper)
    gap = elbo_mean_field - elbos[0]
    # K-FAC's family (one output: a scaled input factor plus the prior) is not the
    # mean-field one; it comes within 1 % of the initial gap of that optimum
    assert gap > 10.0 and elbo_mean_field - elbos[-1] < 1e-2 * gap
    assert np.mean(np.diff(elbos[:30]) > 0) > 0.8  # mostly increasing while far away


@pytest.mark.parametrize("method", ["vogn", "noisy_kfac"])
def test_elbo_estimate_is_unbiased_against_quadrature(method):
    _, X, t = logistic_problem()
    Opt = VOGN if method == "vogn" else NoisyKFAC
    opt, q, _, _, _ = run_logistic(Opt, X, t, 20, learning_rate=0.3, weight_samples=1)
    exact = logistic_elbo(design(X), t[:, 0], q.flat_mean, q.covariance.to_dense(), 1.0)
    assert q.kl_to_prior() == pytest.approx(
        kl_to_prior(q.flat_mean, q.covariance.to_dense(), 1.0), rel=1e-12
    )
    # two batches of the data set, and a part of it scaled to the whole
    data = [(X[:25], t[:25]), (X[25:], t[25:])]
    draws = [opt.elbo(q, data, num_samples=10, seed=s) for s in range(40)]
    assert_unbiased(np.array(draws), np.array(exact))
    part = [opt.elbo(q, [(X[:30], t[:30])], num_samples=10, seed=s) for s in range(40)]
    nll_part = -(
        logistic_elbo(design(X[:30]), t[:30, 0], q.flat_mean, q.covariance.to_dense(), 1.0)
        + kl_to_prior(q.flat_mean, q.covariance.to_dense(), 1.0)
    )
    assert_unbiased(np.array(part), np.array(-2 * nll_part - q.kl_to_prior()))
