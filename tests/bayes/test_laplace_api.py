"""The Laplace class's interface: frontends, likelihoods, noise, and clear errors.

References: the Bernoulli likelihood's Laplace against the categorical one of the
equivalent two-class model written out densely; the regression noise's role in the
evidence against SciPy's multivariate normal (Bayesian linear regression); PyTorch and
JAX models against the same network in native layers.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import curvlinops.nn as cnn
from curvlinops import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss, PoissonNLLLoss, to_numpy
from curvlinops.bayes import Laplace


def small_problem(seed=0, N=20):
    import array_api_compat.numpy as xp

    model = cnn.Sequential(cnn.Linear(2, 3), cnn.Tanh(), cnn.Linear(3, 2))
    params = model.init(seed, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(seed)
    X, y = rng.normal(size=(N, 2)), rng.integers(0, 2, size=N)
    return model, params, [(X, y)], X, y


def test_binary_likelihood_is_a_bernoulli_per_output(numpy_backend):
    # one output with a sigmoid: the GGN is sum_n p(1-p) J^T J, the log-likelihood
    # sum_n y log p + (1-y) log(1-p); written out densely here
    import array_api_compat.numpy as xp

    model = cnn.Sequential(cnn.Linear(2, 1))
    params = model.init(1, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(30, 2)), rng.integers(0, 2, size=(30, 1)).astype(float)
    data = [(X, y)]
    la = Laplace(model, BCEWithLogitsLoss(), params, data, structure="full", prior_precision=2.0)
    Phi = np.concatenate([X, np.ones((30, 1))], axis=1)
    f = Phi @ np.concatenate([params[0].ravel(), params[1]])
    p = 1 / (1 + np.exp(-f))
    A = Phi.T @ (Phi * (p * (1 - p))[:, None]) + 2 * np.eye(3)
    np.testing.assert_allclose(la.precision.to_dense(), A, rtol=1e-12)
    log_lik = np.sum(y[:, 0] * np.log(p) + (1 - y[:, 0]) * np.log(1 - p))
    np.testing.assert_allclose(la.log_likelihood, log_lik, rtol=1e-12)
    probs = la.predictive(X[:4])
    var = np.einsum("np,pq,nq->n", Phi[:4], np.linalg.inv(A), Phi[:4])
    expected = 1 / (1 + np.exp(-f[:4] / np.sqrt(1 + np.pi / 8 * var)))
    np.testing.assert_allclose(probs[:, 0], expected, rtol=1e-12)


def test_noise_enters_the_evidence_and_is_restored(numpy_backend):
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(2)
    X = rng.normal(size=(15, 2))
    y = X @ np.array([1.0, -2.0]) + 0.5 * rng.normal(size=15)
    model = cnn.Sequential(cnn.Linear(2, 1, bias=False))
    params = [np.array([[0.9, -1.8]])]
    la = Laplace(model, MSELoss(), params, [(X, y[:, None])], structure="full", sigma_noise=0.5)
    assert xp is not None
    for sigma in (0.5, 0.8):
        # not at the MAP: compare with the Laplace formula written densely
        residual = y - X @ params[0][0]
        log_lik = stats.norm(0, sigma).logpdf(residual).sum()
        A = X.T @ X / sigma**2 + np.eye(2)
        expected = (
            log_lik - 0.5 * params[0].ravel() @ params[0].ravel() - 0.5 * np.linalg.slogdet(A)[1]
        )
        np.testing.assert_allclose(la.log_marginal_likelihood(sigma_noise=sigma), expected)
    assert la.sigma_noise == 0.5  # restored
    la.sigma_noise = 0.8
    np.testing.assert_allclose(la.precision.to_dense(), X.T @ X / 0.64 + np.eye(2), rtol=1e-12)


def test_torch_and_jax_models_equal_native_layers():
    torch = pytest.importorskip("torch")
    model, params, data, X, y = small_problem()
    native = Laplace(model, CrossEntropyLoss(), params, data, structure="kron")
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    net = net.double()
    with torch.no_grad():
        for p, v in zip(net.parameters(), params, strict=True):
            p.copy_(torch.as_tensor(v))
    tdata = [(torch.as_tensor(X), torch.as_tensor(y))]
    ours = Laplace(net, torch.nn.CrossEntropyLoss(), list(net.parameters()), tdata,
                   structure="kron")  # fmt: skip
    np.testing.assert_allclose(ours.log_marginal_likelihood(), native.log_marginal_likelihood())
    np.testing.assert_allclose(
        to_numpy(ours.predictive(torch.as_tensor(X[:3]))), native.predictive(X[:3]), rtol=1e-12
    )
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from curvlinops.frontends.jax import JaxModel

    def apply(ps, x):
        W0, b0, W1, b1 = ps
        return jnp.tanh(x @ W0.T + b0) @ W1.T + b1

    jparams = [jnp.asarray(p) for p in params]
    jdata = [(jnp.asarray(X), jnp.asarray(y))]
    full_native = Laplace(model, CrossEntropyLoss(), params, data, structure="full")
    jax_full = Laplace(JaxModel(apply), CrossEntropyLoss(), jparams, jdata, structure="full")
    np.testing.assert_allclose(
        jax_full.log_marginal_likelihood(), full_native.log_marginal_likelihood(), rtol=1e-12
    )
    with pytest.raises(ValueError, match="finds the last layer from the layer taps"):
        Laplace(JaxModel(apply), CrossEntropyLoss(), jparams, jdata, subset="last_layer")
    last = Laplace(JaxModel(apply), CrossEntropyLoss(), jparams, jdata, subset=[2, 3],
                   structure="full")  # fmt: skip
    native_last = Laplace(model, CrossEntropyLoss(), params, data, subset="last_layer",
                          structure="full")  # fmt: skip
    np.testing.assert_allclose(
        np.asarray(last.precision.to_dense()), native_last.precision.to_dense(), rtol=1e-12
    )


BAD_ARGUMENTS = [
    ({"structure": "nope"}, ValueError, "structure must be one of"),
    ({"curvature": "fisher"}, ValueError, "curvature must be one of"),
    ({"prior_precision": -1.0}, ValueError, "Prior precisions must be positive"),
    ({"prior_precision": [1.0, 2.0]}, ValueError, r"one value per parameter array \(4\)"),
    ({"prior_precision": True}, TypeError, "prior_precision must be a number"),
    (
        {"structure": "kron", "prior_precision": np.arange(1.0, 18.0)},
        ValueError,
        "takes a prior precision per parameter array",
    ),  # fmt: skip
    ({"sigma_noise": 2.0}, ValueError, "observation noise of a regression"),
    ({"subset": "first"}, ValueError, "subset must be None, 'last_layer'"),
    ({"structure": "lowrank"}, ValueError, "needs rank="),
    ({"structure": "full", "max_full": 5}, ValueError, "would materialize a 17 x 17 matrix"),
    ({"structure": "kron", "separate_weight_and_bias": False}, ValueError, "separate blocks"),
    ({"prior_mean": np.ones(3)}, ValueError, r"shape \(17,\), got shape \(3,\)"),
    ({"structure": "ekfac", "curvature": "hessian"}, ValueError, "no Hessian variant"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_clearly(numpy_backend, kwargs, error, message):
    model, params, data, _, _ = small_problem()
    with pytest.raises(error, match=message):
        Laplace(model, CrossEntropyLoss(), params, data, **kwargs)


def test_bad_calls_are_refused_clearly(numpy_backend):
    model, params, data, X, _ = small_problem()
    with pytest.raises(ValueError, match="Laplace needs a likelihood"):
        Laplace(model, PoissonNLLLoss(), params, data)
    la = Laplace(model, CrossEntropyLoss(), params, data)
    with pytest.raises(ValueError, match="mode must be 'scalar' or 'layerwise'"):
        la.optimize_prior_precision("per-entry")
    with pytest.raises(ValueError, match="link_approx must be 'probit' or 'mc'"):
        la.predictive(X, link_approx="bridge")
    with pytest.raises(ValueError, match="did not converge in 1 iterations"):
        la.optimize_prior_precision(max_iterations=1)
    la.prior_mean = la.mean
    with pytest.raises(ValueError, match="equal the prior mean"):
        la.optimize_prior_precision()
    # a Hessian away from a minimum is not a posterior precision: said so
    hessian = Laplace(model, CrossEntropyLoss(), params, data, structure="full",
                      curvature="hessian", prior_precision=1e-3)  # fmt: skip
    with pytest.raises(ValueError, match="not positive definite"):
        hessian.log_marginal_likelihood()


@pytest.mark.parametrize("structure, kwargs", [("full", {}), ("diag", {}), ("lowrank", {"rank": 5}),
                                               ("diag_lowrank", {"rank": 5})])  # fmt: skip
def test_a_prior_per_parameter_is_its_diagonal(backend, structure, kwargs):
    model, params, data, X, y = small_problem()
    ps = [backend.asarray(p) for p in params]
    bdata = [(backend.asarray(X), backend.asarray(y))]
    d = np.random.default_rng(3).uniform(0.5, 3.0, size=17)
    la = Laplace(model, CrossEntropyLoss(), ps, bdata, structure=structure, prior_precision=1.0,
                 **kwargs)  # fmt: skip
    H = to_numpy(la.precision.to_dense()) - np.eye(17)  # the structure's own curvature
    for prior in (backend.asarray(d), list(d)):
        la.prior_precision = prior
        np.testing.assert_allclose(to_numpy(la.precision.to_dense()), H + np.diag(d), atol=1e-12)
        expected = np.linalg.slogdet(H + np.diag(d))[1] - np.sum(np.log(d))
        np.testing.assert_allclose(la.log_det_ratio(), expected, rtol=1e-10)
    # constant on every array: also one value per array (what K-FAC takes)
    kron = Laplace(model, CrossEntropyLoss(), params, data, structure="kron",
                   prior_precision=np.repeat([1.0, 2.0, 3.0, 4.0], [6, 3, 6, 2]))  # fmt: skip
    assert kron.prior_precision == (1.0, 2.0, 3.0, 4.0)
    with pytest.raises(ValueError, match="positive and finite"):
        la.prior_precision = backend.asarray(-d)
