"""The optimizers of curvlinops.optim against dense references and known optima.

References: dense curvature matrices (the exact GGN / Fisher operators, tested in
tests/curvature against finite differences) inverted with ``numpy.linalg``; K-FAC's
damped preconditioner assembled with ``numpy.kron`` from the factors; the 2x2 system of
the quadratic model solved with ``numpy.linalg.solve``; least squares by
``numpy.linalg.lstsq``; a strongly convex optimum by ``scipy.optimize.minimize``; the
Levenberg-Marquardt rule on constructed reduction ratios.
"""

from __future__ import annotations

import math

import array_api_compat.numpy as xp
import numpy as np
import pytest

import curvlinops as cl
import curvlinops.nn as cnn
from curvlinops.optim import (
    KFAC,
    HessianFree,
    NaturalGradient,
    levenberg_marquardt,
    reduction_ratio,
)


def flat(params):
    return np.concatenate([np.ravel(p) for p in params])


def mlp(seed=0, n=24, loss="ce"):
    model = cnn.Sequential(cnn.Linear(3, 4), cnn.Tanh(), cnn.Linear(4, 3))
    params = model.init(seed, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = rng.integers(0, 3, size=n) if loss == "ce" else rng.normal(size=(n, 3))
    return model, params, (X, y)


def dense_ggn(model, loss, params, batch):
    return cl.GGNLinearOperator(model, loss, params, [batch]).to_dense()


def gradient(model, loss, params, batch):
    g, value = cl.GGNLinearOperator(model, loss, params, [batch]).gradient_and_loss()
    return flat(g), float(value)


def batch_loss(model, loss, params, batch):
    X, y = batch
    out = model(params, X)
    return loss.normalization(X.shape[0], out.shape) * float(loss.sum_value(out, y))


# -- the Levenberg-Marquardt rule ---------------------------------------------------------


@pytest.mark.parametrize(
    ("rho", "expected"),
    [
        (0.9, 2 / 3),
        (0.76, 2 / 3),
        (0.75, 1.0),
        (0.5, 1.0),
        (0.25, 1.0),
        (0.2, 1.5),
        (-3.0, 1.5),
        (math.nan, 1.5),
        (-math.inf, 1.5),
    ],
)
def test_levenberg_marquardt_rule_of_martens_2010(rho, expected):
    assert levenberg_marquardt(2.0, rho) == pytest.approx(2.0 * expected, rel=1e-15)


def test_levenberg_marquardt_with_the_kfac_factor():
    omega = (19 / 20) ** 5
    assert levenberg_marquardt(1.0, 0.8, factor=omega) == pytest.approx(omega)
    assert levenberg_marquardt(1.0, 0.1, factor=omega) == pytest.approx(1 / omega)
    with pytest.raises(ValueError, match="factor"):
        levenberg_marquardt(1.0, 0.5, factor=1.5)


def test_reduction_ratio():
    assert reduction_ratio(-1.0, -4.0) == 0.25
    assert reduction_ratio(-1.0, 0.0) == -math.inf
    assert reduction_ratio(math.nan, -1.0) == -math.inf


# -- K-FAC -----------------------------------------------------------------------------------


def kfac_preconditioner(K, shift):
    """Dense factored Tikhonov inverse of Martens & Grosse (pi-damping), from the factors."""
    blocks = []
    for name in K.input_factors:
        A, B = K.input_factors[name], K.output_factors[name]
        pi = math.sqrt((np.trace(A) / A.shape[0]) / (np.trace(B) / B.shape[0]))
        r = math.sqrt(shift)
        inv_B = np.linalg.inv(B + r / pi * np.eye(B.shape[0]))
        inv_A = np.linalg.inv(A + pi * r * np.eye(A.shape[0]))
        blocks += [np.kron(inv_B, inv_A), np.linalg.inv(B + shift * np.eye(B.shape[0]))]
    P = np.zeros((sum(b.shape[0] for b in blocks),) * 2)
    i = 0
    for b in blocks:
        P[i : i + b.shape[0], i : i + b.shape[0]] = b
        i += b.shape[0]
    return P


def test_kfac_two_steps_equal_the_dense_construction():
    model, params, batch = mlp(1)
    loss = cl.CrossEntropyLoss()
    lam, eta = 0.3, 1e-2
    opt = KFAC(model, loss, damping=lam, weight_decay=eta, inverse_every=1, damping_every=100)
    state = opt.init(params, batch)
    theta = flat(params)
    K0 = cl.KFACLinearOperator(model, loss, params, [batch])
    previous = None
    for step in range(2):
        p_list = cl.unflatten_params(theta, cl.param_shapes(params))
        if step == 1:  # the moving average with decay min(1 - 1/2, 0.95)
            K1 = cl.KFACLinearOperator(model, loss, p_list, [batch])
            for name in K0.input_factors:
                K0.input_factors[name] = 0.5 * K0.input_factors[name] + 0.5 * K1.input_factors[name]
                K0.output_factors[name] = (
                    0.5 * K0.output_factors[name] + 0.5 * K1.output_factors[name]
                )
        g, _ = gradient(model, loss, p_list, batch)
        g = g + eta * theta
        C = dense_ggn(model, loss, p_list, batch) + (lam + eta) * np.eye(theta.size)
        proposal = -kfac_preconditioner(K0, lam + eta) @ g
        if previous is None:
            coefficients = np.array([-(g @ proposal) / (proposal @ C @ proposal)])
            D = proposal[:, None]
        else:
            D = np.stack([proposal, previous], axis=1)
            coefficients = np.linalg.solve(D.T @ C @ D, -D.T @ g)
        previous = D @ coefficients
        theta = theta + previous
        params, state = opt.step(params, state, batch)
        np.testing.assert_allclose(flat(params), theta, rtol=1e-9, atol=1e-12)
    assert state.mu == pytest.approx(coefficients[1], rel=1e-8)


def test_kfac_damping_follows_the_rule_on_its_reduction_ratio():
    model, params, batch = mlp(2)
    loss = cl.CrossEntropyLoss()
    opt = KFAC(model, loss, damping=1.0, damping_every=1, momentum=0.0)
    state = opt.init(params, batch)
    for _ in range(3):
        before = params
        damping = state.damping
        params, state = opt.step(params, state, batch)
        # rho from dense quantities: the actual change over the undamped quadratic model
        g, value = gradient(model, loss, before, batch)
        d = flat(params) - flat(before)
        predicted = g @ d + 0.5 * d @ dense_ggn(model, loss, before, batch) @ d
        rho = (batch_loss(model, loss, params, batch) - value) / predicted
        assert state.rho == pytest.approx(rho, rel=1e-8)
        expected = levenberg_marquardt(damping, rho, factor=19 / 20)
        assert state.damping == pytest.approx(expected, rel=1e-12)


def test_kfac_on_a_single_linear_layer_is_the_natural_gradient_step():
    rng = np.random.default_rng(3)
    model = cnn.Sequential(cnn.Linear(3, 2, bias=False))
    params = model.init(3, xp=xp, dtype=xp.float64)
    X = rng.normal(size=(40, 3))
    batch = (X, rng.normal(size=(40, 2)))
    loss = cl.MSELoss()
    lam = 1e-16  # the factor shifts are sqrt(lam) / pi and pi sqrt(lam)
    opt = KFAC(model, loss, damping=lam, learning_rate=1.0)
    params_new, _ = opt.step(params, opt.init(params, batch), batch)
    G = dense_ggn(model, loss, params, batch)
    g, _ = gradient(model, loss, params, batch)
    expected = flat(params) - np.linalg.solve(G, g)  # the exact natural-gradient step
    np.testing.assert_allclose(flat(params_new), expected, rtol=1e-6, atol=1e-8)


# -- Hessian-free ----------------------------------------------------------------------------


def test_hessian_free_solves_least_squares_in_one_step():
    rng = np.random.default_rng(4)
    model = cnn.Sequential(cnn.Linear(4, 2))
    params = model.init(4, xp=xp, dtype=xp.float64)
    X = rng.normal(size=(30, 4))
    y = rng.normal(size=(30, 2))
    opt = HessianFree(model, cl.MSELoss(), damping=1e-12, rtol=1e-13, max_iterations=100)
    params, state = opt.step(params, opt.init(params), (X, y))
    design = np.concatenate([X, np.ones((30, 1))], axis=1)
    solution = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(params[0], solution[:4].T, atol=1e-9)
    np.testing.assert_allclose(params[1], solution[4], atol=1e-9)
    assert state.rho == pytest.approx(1.0, abs=1e-6) and state.damping < 1e-12


@pytest.mark.parametrize("preconditioner", [None, "empirical_fisher", "ggn"])
def test_hessian_free_step_is_the_damped_gauss_newton_step(preconditioner):
    model, params, batch = mlp(5)
    loss = cl.CrossEntropyLoss()
    lam = 0.5
    opt = HessianFree(model, loss, damping=lam, rtol=1e-12, preconditioner=preconditioner)
    new, state = opt.step(params, opt.init(params), batch)
    G = dense_ggn(model, loss, params, batch)
    g, value = gradient(model, loss, params, batch)
    d = -np.linalg.solve(G + lam * np.eye(G.shape[0]), g)
    np.testing.assert_allclose(state.previous, d, rtol=1e-8, atol=1e-10)
    # the step is the last iterate or an earlier one with a smaller loss
    assert state.accepted
    chosen = batch_loss(model, loss, new, batch)
    at_last = batch_loss(
        model, loss, cl.unflatten_params(flat(params) + d, cl.param_shapes(params)), batch
    )
    assert chosen <= at_last
    if state.chosen == state.cg_iterations:
        np.testing.assert_allclose(flat(new), flat(params) + d, rtol=1e-8, atol=1e-10)
    # the damping follows the rule on the ratio computed densely
    rho = (at_last - value) / (g @ d + 0.5 * d @ G @ d)
    assert state.damping == pytest.approx(levenberg_marquardt(lam, rho), rel=1e-10)


def test_hessian_free_warm_start_and_iteration_limit():
    model, params, batch = mlp(6)
    loss = cl.CrossEntropyLoss()
    opt = HessianFree(model, loss, damping=1.0, max_iterations=3, rtol=0.0)
    params1, state = opt.step(params, opt.init(params), batch)
    assert state.cg_iterations == 3
    # the second solve starts from 0.95 times the first solution: one iteration from
    # there equals CG's own first iteration from that point
    opt1 = HessianFree(model, loss, damping=state.damping, max_iterations=1, rtol=0.0)
    _, second = opt1.step(params1, state, batch)
    G = cl.GGNLinearOperator(model, loss, params1, [batch])
    g, _ = gradient(model, loss, params1, batch)
    x, _ = cl.cg(G, -g, 0.95 * state.previous, damping=state.damping, maxiter=1, rtol=0.0)
    np.testing.assert_allclose(second.previous, x, rtol=1e-12, atol=1e-14)


# -- natural gradient ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fisher", "ggn"])
def test_natural_gradient_exact_step(kind):
    model, params, batch = mlp(7)
    loss = cl.CrossEntropyLoss()
    lam, lr = 0.1, 0.7
    opt = NaturalGradient(model, loss, learning_rate=lr, damping=lam, curvature=kind, rtol=1e-12)
    new, _ = opt.step(params, opt.init(params), batch)
    op = cl.FisherLinearOperator if kind == "fisher" else cl.GGNLinearOperator
    F = op(model, loss, params, [batch]).to_dense()
    g, _ = gradient(model, loss, params, batch)
    expected = flat(params) - lr * np.linalg.solve(F + lam * np.eye(F.shape[0]), g)
    np.testing.assert_allclose(flat(new), expected, rtol=1e-8, atol=1e-10)


def test_natural_gradient_with_an_approximation_uses_its_exact_damped_inverse():
    model, params, batch = mlp(8)
    loss = cl.CrossEntropyLoss()
    lam = 0.05

    def kfac(m, lo, p, b):
        return cl.KFACLinearOperator(m, lo, p, [b], check_deterministic=False)

    opt = NaturalGradient(model, loss, learning_rate=1.0, damping=lam, curvature=kfac)
    new, _ = opt.step(params, opt.init(params), batch)
    K = cl.KFACLinearOperator(model, loss, params, [batch]).to_dense()
    g, _ = gradient(model, loss, params, batch)
    expected = flat(params) - np.linalg.solve(K + lam * np.eye(K.shape[0]), g)
    np.testing.assert_allclose(flat(new), expected, rtol=1e-10, atol=1e-12)


def test_natural_gradient_is_invariant_to_a_linear_reparameterization():
    rng = np.random.default_rng(9)
    d, C, N = 3, 3, 40
    X = rng.normal(size=(N, d))
    y = rng.integers(0, C, size=N)
    M = rng.normal(size=(d, d)) + 2 * np.eye(d)
    model = cnn.Sequential(cnn.Linear(d, C, bias=False))
    W = rng.normal(size=(C, d))
    W_reparam = W @ np.linalg.inv(M).T  # (X M) W'^T = X W^T: the same outputs
    loss = cl.CrossEntropyLoss()
    opt = NaturalGradient(model, loss, learning_rate=0.3, damping=0.0, rtol=1e-13)
    (W_new,), _ = opt.step([W], opt.init([W]), (X, y))
    (W_reparam_new,), _ = opt.step([W_reparam], opt.init([W_reparam]), (X @ M, y))
    np.testing.assert_allclose(W_reparam_new @ M.T - W, W_new - W, rtol=1e-7, atol=1e-10)
    # and plain gradient descent is not invariant (the test can fail)
    g = flat(gradient(model, loss, [W], (X, y))[0]).reshape(C, d)
    g_r = flat(gradient(model, loss, [W_reparam], (X @ M, y))[0]).reshape(C, d)
    assert not np.allclose(g_r @ M.T, g, rtol=1e-2)


# -- convergence on a strongly convex problem ------------------------------------------------


def logistic_problem():
    rng = np.random.default_rng(10)
    X = rng.normal(size=(60, 3))
    y = rng.integers(0, 3, size=60)
    model = cnn.Sequential(cnn.Linear(3, 3))
    params = model.init(10, xp=xp, dtype=xp.float64)
    eta = 0.05
    shapes = cl.param_shapes(params)

    def objective(theta):
        W, b = theta[:9].reshape(3, 3), theta[9:]
        z = X @ W.T + b
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -logp[np.arange(60), y].mean() + 0.5 * eta * theta @ theta

    from scipy.optimize import minimize

    optimum = minimize(objective, np.zeros(12), method="BFGS", options={"gtol": 1e-12}).x
    return model, params, (X, y), eta, optimum, shapes


@pytest.mark.parametrize("method", ["kfac", "hessian_free", "natural_gradient"])
def test_converges_to_the_optimum_of_regularized_logistic_regression(method):
    model, params, batch, eta, optimum, _ = logistic_problem()
    loss = cl.CrossEntropyLoss()
    if method == "kfac":
        opt = KFAC(model, loss, damping=1e-2, weight_decay=eta, inverse_every=1, damping_every=1)
        state = opt.init(params, batch)
    elif method == "hessian_free":
        opt = HessianFree(model, loss, damping=1e-2, weight_decay=eta, rtol=1e-10)
        state = opt.init(params)
    else:
        opt = NaturalGradient(model, loss, learning_rate=1.0, damping=1e-4, weight_decay=eta)
        state = opt.init(params)
    for _ in range(40):
        params, state = opt.step(params, state, batch)
    np.testing.assert_allclose(flat(params), optimum, atol=1e-6)
