"""The linearized predictive: Jacobians, output moments, probit and Monte-Carlo links.

References: per-datum Jacobians from ``torch.func.jacrev`` of the network written again
in PyTorch (``bayes_problems``) and from central finite differences of a NumPy
forward pass; ``J Sigma J^T`` from them densely; ``E[sigmoid(f)]`` and
``E[softmax(f)]`` for Gaussian ``f`` by Gauss-Hermite quadrature (in 1 and 3
dimensions), against which the Monte-Carlo predictive is checked in expectation
(``monte_carlo.assert_unbiased``: a bound from the draws' variance, with the power to
see a 10 % scale error) and the probit approximation within its known accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest
from bayes_problems import classifier, conv_classifier
from monte_carlo import assert_unbiased

from curvlinops import DenseLinearOperator, IdentityLinearOperator, to_numpy
from curvlinops.bayes import (
    glm_predictive_moments,
    mc_predictive,
    per_datum_jacobians,
    probit_predictive,
    regression_predictive,
)
from curvlinops.bayes.predictive import _tap_jacobians, _vjp_jacobians


@pytest.fixture(scope="module")
def mlp():
    pytest.importorskip("torch")
    return classifier(widths=(3, 5, 4), seed=2, N=10)


def test_per_datum_jacobians_from_taps_and_from_a_vjp_equal_torch_func(backend, mlp):
    model, params, X, y, ref = mlp
    expected = ref.jacobians(params, X)
    ps = [backend.asarray(p) for p in params]
    Xb = backend.asarray(X)
    outputs, J = per_datum_jacobians(model, ps, Xb)
    np.testing.assert_allclose(to_numpy(outputs), ref.outputs(params, X), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(J), expected, rtol=1e-10, atol=1e-12)
    lin = model.linearize(ps, Xb)
    np.testing.assert_allclose(to_numpy(_tap_jacobians(lin, ps)), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(_vjp_jacobians(lin, ps)), expected, rtol=1e-10, atol=1e-12)


def test_per_datum_jacobians_of_a_convolutional_network_equal_finite_differences(numpy_backend):
    # shared axes (pixels) summed per datum, for a convolution's taps
    model, params, X, forward = conv_classifier(seed=0)
    theta = np.concatenate([p.ravel() for p in params])
    h = 1e-6
    columns = []
    for j in range(theta.size):
        e = np.zeros_like(theta)
        e[j] = h
        columns.append((forward(theta + e, X) - forward(theta - e, X)) / (2 * h))
    expected = np.stack(columns, axis=-1)
    _, J = per_datum_jacobians(model, params, X)
    np.testing.assert_allclose(J, expected, rtol=1e-6, atol=1e-8)
    lin = model.linearize(params, X)
    np.testing.assert_allclose(_vjp_jacobians(lin, params), J, rtol=1e-10, atol=1e-12)


def test_per_datum_jacobians_of_a_grouped_convolution_equal_finite_differences():
    """A grouped weight holds only its groups' blocks; the taps' dense per-datum
    gradient would hold every group pair, so grouped taps take the VJP route."""
    import array_api_compat.numpy as npx

    from curvlinops import nn

    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3))
    params = model.init(0, xp=npx, dtype=npx.float64)
    X = np.random.default_rng(0).standard_normal((2, 4, 4, 4))
    shapes = [p.shape for p in params]
    theta = np.concatenate([p.ravel() for p in params])

    def forward(t):
        sizes = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
        ps = [t[a:b].reshape(s) for a, b, s in zip(sizes[:-1], sizes[1:], shapes, strict=True)]
        return np.asarray(model(ps, X))

    h = 1e-6
    expected = np.stack(
        [(forward(theta + h * e) - forward(theta - h * e)) / (2 * h) for e in np.eye(theta.size)],
        axis=-1,
    )
    assert _tap_jacobians(model.linearize(params, X), params) is None
    _, J = per_datum_jacobians(model, params, X)
    assert J.shape == (2, 3, theta.size)
    np.testing.assert_allclose(J, expected, rtol=1e-6, atol=1e-8)


def test_per_datum_jacobians_of_torch_and_jax_models(mlp):
    torch = pytest.importorskip("torch")
    from curvlinops.frontends.torch import TorchModel

    model, params, X, y, ref = mlp
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)
    ).double()
    with torch.no_grad():
        for p, value in zip(net.parameters(), params, strict=True):
            p.copy_(torch.as_tensor(value))
    tm = TorchModel(net)
    _, J = per_datum_jacobians(tm, list(net.parameters()), torch.as_tensor(X))
    np.testing.assert_allclose(J.detach().numpy(), ref.jacobians(params, X), rtol=1e-10)
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from curvlinops.frontends.jax import JaxModel

    def apply(ps, x):
        W0, b0, W1, b1 = ps
        return jnp.tanh(x @ W0.T + b0) @ W1.T + b1

    jm = JaxModel(apply)
    jparams = [jnp.asarray(p) for p in params]
    _, Jj = per_datum_jacobians(jm, jparams, jnp.asarray(X))
    np.testing.assert_allclose(np.asarray(Jj), ref.jacobians(params, X), rtol=1e-10)
    assert jax is not None


def test_moments_are_the_sandwich_of_the_covariance(backend, mlp):
    model, params, X, y, ref = mlp
    J = ref.jacobians(params, X)
    P = J.shape[2]
    rng = np.random.default_rng(0)
    B = rng.normal(size=(P, P))
    Sigma = B @ B.T / P + 0.1 * np.eye(P)
    mean, cov = glm_predictive_moments(
        model,
        [backend.asarray(p) for p in params],
        backend.asarray(X),
        DenseLinearOperator(backend.asarray(Sigma), symmetric=True),
        batch_size=3,  # four batches, the last of one point
    )
    np.testing.assert_allclose(to_numpy(mean), ref.outputs(params, X), rtol=1e-12)
    expected = np.einsum("ncp,pq,ndq->ncd", J, Sigma, J)
    np.testing.assert_allclose(to_numpy(cov), expected, rtol=1e-10, atol=1e-12)


def test_regression_predictive_adds_the_noise(backend):
    rng = np.random.default_rng(1)
    B = rng.normal(size=(4, 2, 2))
    cov = B @ np.swapaxes(B, 1, 2)
    mean, total = regression_predictive(backend.asarray(np.ones((4, 2))), backend.asarray(cov), 0.3)
    np.testing.assert_allclose(to_numpy(total), cov + 0.09 * np.eye(2)[None], rtol=1e-12)
    np.testing.assert_array_equal(to_numpy(mean), np.ones((4, 2)))


def gauss_hermite_sigmoid(mu, var, degree=120):
    """``E[sigmoid(f)]``, ``f ~ N(mu, var)``, by Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(degree)
    f = mu[..., None] + np.sqrt(var)[..., None] * nodes
    return (weights / np.sqrt(2 * np.pi) * (1 / (1 + np.exp(-f)))).sum(axis=-1)


def gauss_hermite_softmax(mean, cov, degree=24):
    """``E[softmax(f)]``, ``f ~ N(mean, cov)`` per point (3 classes), tensor quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(degree)
    Z = np.stack(np.meshgrid(nodes, nodes, nodes, indexing="ij"), axis=-1).reshape(-1, 3)
    W = np.prod(np.stack(np.meshgrid(weights, weights, weights, indexing="ij"), -1), -1).ravel()
    W = W / (2 * np.pi) ** 1.5
    out = []
    for m, S in zip(mean, cov, strict=True):
        f = m[None, :] + Z @ np.linalg.cholesky(S).T
        p = np.exp(f - f.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out.append(W @ p)
    return np.array(out)


def moments(seed, N=5, C=3, scale=1.5):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(N, C))
    B = scale * rng.normal(size=(N, C, C)) / np.sqrt(C)
    return mean, B @ np.swapaxes(B, 1, 2) + 0.05 * np.eye(C)


def test_binary_monte_carlo_is_unbiased_and_probit_close(backend):
    mean, cov = moments(0, C=1)
    exact = gauss_hermite_sigmoid(mean[:, 0], cov[:, 0, 0])[:, None]
    R = 4000  # independent one-draw estimates: the points repeated R times
    draws = mc_predictive(
        backend.asarray(np.tile(mean, (R, 1))),
        backend.asarray(np.tile(cov, (R, 1, 1))),
        "binary",
        num_samples=1,
        seed=3,
    )
    assert_unbiased(to_numpy(draws).reshape(R, *mean.shape), exact)
    probit = to_numpy(probit_predictive(backend.asarray(mean), backend.asarray(cov), "binary"))
    # MacKay's probit approximation of the Gaussian-sigmoid integral: off by < 0.02
    assert np.max(np.abs(probit - exact)) < 0.02
    # ...and far closer than the plug-in sigmoid of the mean
    plug_in = 1 / (1 + np.exp(-mean))
    assert np.max(np.abs(probit - exact)) < 0.25 * np.max(np.abs(plug_in - exact))


def test_softmax_monte_carlo_is_unbiased_and_probit_close(backend):
    mean, cov = moments(1)
    exact = gauss_hermite_softmax(mean, cov)
    np.testing.assert_allclose(exact.sum(axis=1), 1.0, rtol=1e-12)
    R = 3000
    draws = mc_predictive(
        backend.asarray(np.tile(mean, (R, 1))),
        backend.asarray(np.tile(cov, (R, 1, 1))),
        num_samples=1,
        seed=4,
    )
    assert_unbiased(to_numpy(draws).reshape(R, *mean.shape), exact)
    # many draws at once, one call: within 5 standard errors of the quadrature
    many = to_numpy(mc_predictive(backend.asarray(mean), backend.asarray(cov), num_samples=20000))
    np.testing.assert_allclose(many, exact, atol=5 * 0.5 / np.sqrt(20000))


def test_softmax_probit_is_close_for_independent_outputs(backend):
    # the multi-class probit treats each output alone (laplace-torch's formula): with
    # independent outputs of variance about 1 it is within 0.08 of the integral (0.06 in
    # this case), about half the plug-in softmax's error; with strongly correlated outputs
    # it is not meant to be close (0.15 off for the covariances of the test above)
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(50, 3))
    cov = rng.uniform(0.5, 1.5, size=(50, 3))[:, :, None] * np.eye(3)[None]
    exact = gauss_hermite_softmax(mean, cov)
    probit = to_numpy(probit_predictive(backend.asarray(mean), backend.asarray(cov)))
    np.testing.assert_allclose(probit.sum(axis=1), 1.0, rtol=1e-12)
    plug_in = np.exp(mean) / np.exp(mean).sum(axis=1, keepdims=True)
    assert np.max(np.abs(probit - exact)) < 0.08
    assert np.mean(np.abs(probit - exact)) < 0.5 * np.mean(np.abs(plug_in - exact))


def test_monte_carlo_is_reproducible_and_float32(backend):
    mean, cov = moments(2)
    m32, c32 = backend.asarray(mean, "float32"), backend.asarray(cov, "float32")
    a = mc_predictive(m32, c32, num_samples=64, seed=11)
    b = mc_predictive(m32, c32, num_samples=64, seed=11)
    assert str(a.dtype).endswith("float32")
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    many = to_numpy(mc_predictive(m32, c32, num_samples=20000, seed=12))
    exact = gauss_hermite_softmax(mean, cov)
    np.testing.assert_allclose(many, exact, atol=5 * 0.5 / np.sqrt(20000))


def test_predictive_errors(numpy_backend):
    with pytest.raises(ValueError, match="link must be one of"):
        probit_predictive(np.zeros((1, 2)), np.zeros((1, 2, 2)), "poisson")
    with pytest.raises(ValueError, match=r"mean \(N, C\) and a covariance \(N, C, C\)"):
        mc_predictive(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        mc_predictive(np.zeros((1, 2)), np.zeros((1, 2, 2)), num_samples=0)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        mc_predictive(np.zeros((1, 2)), -np.eye(2)[None])
    with pytest.raises(ValueError, match="sigma_noise must be positive"):
        regression_predictive(np.zeros((1, 1)), np.zeros((1, 1, 1)), -1.0)
    import array_api_compat.numpy as xp

    from curvlinops import nn

    model = nn.Sequential(nn.Linear(2, 1))
    params = model.init(0, xp=xp, dtype=xp.float64)
    eye = IdentityLinearOperator(5, xp=xp, dtype=xp.float64)
    with pytest.raises(ValueError, match="has shape \\(5, 5\\) but the model has 3 parameters"):
        glm_predictive_moments(model, params, np.ones((2, 2)), eye)
    with pytest.raises(TypeError, match="covariance must be a curvlinops LinearOperator"):
        glm_predictive_moments(model, params, np.ones((2, 2)), np.eye(3))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        glm_predictive_moments(model, params, np.ones((2, 2)), eye, batch_size=0)


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("structure", ["kron", "ekfac", "diag", "lowrank", "diag_lowrank"])
@pytest.mark.parametrize("subset", [None, "last_layer"])
def test_predictive_from_the_taps_equals_the_sandwich(backend, mlp, structure, subset, layerwise):
    # the route without Jacobians (K-FAC/EKFAC in their eigenbases, the diagonal
    # entrywise, low rank with one Jacobian-vector product) against J Sigma J^T with the
    # Jacobians from torch.func and the covariance densely
    from curvlinops import CrossEntropyLoss
    from curvlinops.bayes import Laplace

    model, params, X, y, ref = mlp
    ps = [backend.asarray(p) for p in params]
    data = [(backend.asarray(X), backend.asarray(y))]
    prior = ([0.5, 2.0] if subset else [0.5, 1.0, 2.0, 4.0]) if layerwise else 1.5
    la = Laplace(model, CrossEntropyLoss(), ps, data, structure=structure, subset=subset,
                 prior_precision=prior, rank=4)  # fmt: skip
    X_test = np.random.default_rng(4).normal(size=(7, 3))
    lin = la.model.linearize(la.params, backend.asarray(X_test))
    assert la._structure.output_covariance(la._scale, la._prior, lin) is not None  # the route
    mean, cov = la.functional_variance(backend.asarray(X_test), batch_size=3)
    J = ref.jacobians(params, X_test)
    if subset:
        J = J[:, :, -sum(p.size for p in params[2:]) :]
    Sigma = np.linalg.inv(to_numpy(la.precision.to_dense()))
    np.testing.assert_allclose(to_numpy(cov), np.einsum("ncp,pq,ndq->ncd", J, Sigma, J),
                               rtol=1e-9, atol=1e-12)  # fmt: skip
    np.testing.assert_allclose(to_numpy(mean), ref.outputs(params, X_test), rtol=1e-12)


def test_predictive_of_a_cnn_falls_back_to_the_jacobians(numpy_backend):
    from curvlinops import CrossEntropyLoss
    from curvlinops.bayes import Laplace

    model, params, X, _ = conv_classifier(seed=1, N=6)
    y = np.arange(6) % 3
    la = Laplace(model, CrossEntropyLoss(), params, [(X, y)], structure="kron")
    lin = model.linearize(params, X[:2])
    assert la._structure.output_covariance(la._scale, la._prior, lin) is None  # shared axes
    _, cov = la.functional_variance(X[:2])
    _, expected = glm_predictive_moments(model, params, X[:2], la.covariance)
    np.testing.assert_allclose(cov, expected, rtol=1e-12)
