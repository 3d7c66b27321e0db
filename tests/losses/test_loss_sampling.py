"""Samplers of the predictive distributions and the Monte-Carlo Fisher they give.

Moments are checked against the distributions' closed forms in expectation
(tests/monte_carlo.py): the samples (for means), their squared deviations from the exact
mean (for variances), their one-hot codes (for class frequencies) and the per-sample
gradient products (for the Fisher) are independent unbiased draws; their mean lies
within a Bonferroni-corrected bound of about 5 standard errors of the closed form, and
the same check rejects the draws scaled by 0.9 and by 1.1.
"""

from __future__ import annotations

import numpy as np
import pytest
from loss_cases import JAX_FEW_KINDS, KINDS, dense_blocks, make_case, skip_kind_on_jax
from monte_carlo import assert_unbiased

from curvlinops import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    GaussianNLLLoss,
    MSELoss,
    PoissonNLLLoss,
)

M = 10_000  # one sample count for all tests: JAX compiles once per shape


def _sigmoid(f):
    return 1 / (1 + np.exp(-f))


@pytest.mark.parametrize(
    "loss_cls, mean_fn, var_fn",
    [
        (MSELoss, lambda f: f, lambda f: 0.5 + 0 * f),
        (BCEWithLogitsLoss, _sigmoid, lambda f: _sigmoid(f) * (1 - _sigmoid(f))),
        (PoissonNLLLoss, np.exp, np.exp),
    ],
    ids=["gaussian", "bernoulli", "poisson"],
)
def test_elementwise_samplers_match_mean_and_variance(backend, loss_cls, mean_fn, var_fn):
    rng = np.random.default_rng(0)
    f_np = rng.normal(size=(3, 4))
    num = 3 * M  # the Poisson variance needs them to see a 10 % error
    samples = backend.to_numpy(loss_cls().sample(backend.asarray(f_np), num, seed=1))
    assert samples.shape == (num, 3, 4)
    mean, var = mean_fn(f_np), var_fn(f_np)
    assert_unbiased(samples, mean)
    assert_unbiased((samples - mean) ** 2, var)  # squared deviations from the exact mean
    if loss_cls is not MSELoss:
        assert np.all(samples >= 0) and np.all(samples == np.round(samples))


def test_poisson_sampler_handles_small_and_large_rates(backend):
    if backend.name == "jax":
        pytest.skip("compile time; the Poisson sampler runs on JAX in the moment test")
    rates = np.array([[1e-3, 0.7, 30.0, 400.0]])
    num = 3 * M  # the variance of the rate 400 needs them to see a 10 % error
    f = backend.asarray(np.log(rates))
    samples = backend.to_numpy(PoissonNLLLoss().sample(f, num, seed=2))
    # exact standard deviations: at the rate 1e-3 a few samples are non-zero (or none)
    assert_unbiased(samples, rates, std=np.sqrt(rates))
    mu4 = rates * (1 + 3 * rates)  # fourth central moment of a Poisson distribution
    assert_unbiased((samples - rates) ** 2, rates, std=np.sqrt(mu4 - rates**2))


def test_categorical_sampler_matches_class_frequencies(backend):
    rng = np.random.default_rng(3)
    f_np = 1.5 * rng.normal(size=(3, 2, 4))  # a shared axis of 2 positions
    f_np[0, 0, 2] = -50.0  # a class of (numerically) zero probability is never drawn
    labels = backend.to_numpy(CrossEntropyLoss().sample(backend.asarray(f_np), M, seed=4))
    assert labels.shape == (M, 3, 2) and labels.dtype.kind == "i"
    p = np.exp(f_np) / np.exp(f_np).sum(axis=-1, keepdims=True)
    one_hot = (labels[..., None] == np.arange(4)).astype(np.float64)  # (M, 3, 2, 4)
    assert_unbiased(one_hot, p, std=np.sqrt(p * (1 - p)))
    assert not np.any(labels[:, 0, 0] == 2)


def test_gaussian_nll_sampler_matches_mean_and_variance(backend):
    rng = np.random.default_rng(5)
    mean, log_var = rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
    f = backend.asarray(np.concatenate([mean, log_var], axis=-1))
    num = 2 * M  # the means' scale statistic needs them to see a 10 % error
    samples = backend.to_numpy(GaussianNLLLoss().sample(f, num, seed=6))
    assert samples.shape == (num, 3, 2)
    var = np.exp(log_var)
    assert_unbiased(samples, mean)
    assert_unbiased((samples - mean) ** 2, var)


@pytest.mark.parametrize("kind", KINDS)
def test_mc_fisher_from_sampled_gradients_converges_to_fisher(backend, kind):
    skip_kind_on_jax(backend, kind, JAX_FEW_KINDS)
    case = make_case(kind, np.random.default_rng(7))
    loss = case.loss()
    f = backend.asarray(case.outputs)
    num = M
    G = backend.to_numpy(loss.sampled_gradients(f, num, seed=8))
    assert G.shape == (*case.outputs.shape, num)
    N = case.outputs.shape[0]
    raw = G.reshape(N, -1, num) * np.sqrt(num)  # per-datum gradients at the samples
    products = np.einsum("nim,njm->nijm", raw, raw)
    F = dense_blocks(lambda V: backend.to_numpy(loss.fisher_matmat(f, backend.asarray(V))), f.shape)
    assert_unbiased(np.moveaxis(products, -1, 0), F)
    # G G^T is the Monte-Carlo Fisher by construction of the 1/sqrt(M) scaling.
    np.testing.assert_allclose(
        np.einsum("nim,njm->nij", G.reshape(N, -1, num), G.reshape(N, -1, num)),
        products.mean(axis=-1),
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize("kind", ["mse_shared", "ce_labels", "bce_soft", "poisson", "gaussian"])
def test_samples_are_reproducible_by_seed(backend, kind):
    skip_kind_on_jax(backend, kind, JAX_FEW_KINDS)
    case = make_case(kind, np.random.default_rng(9))
    loss = case.loss()
    f = backend.asarray(case.outputs)
    # M samples: the shapes of the convergence test, which JAX has compiled already.
    first = backend.to_numpy(loss.sample(f, M, seed=11))
    np.testing.assert_array_equal(first, backend.to_numpy(loss.sample(f, M, seed=11)))
    assert np.any(first != backend.to_numpy(loss.sample(f, M, seed=12)))
    np.testing.assert_array_equal(
        backend.to_numpy(loss.sampled_gradients(f, M, seed=11)),
        backend.to_numpy(loss.sampled_gradients(f, M, seed=11)),
    )


def test_sampled_targets_are_valid_targets(numpy_backend):
    """Samples can be fed back to the loss (checks pass, shapes and dtypes fit)."""
    for kind in KINDS:
        case = make_case(kind, np.random.default_rng(10))
        loss = case.loss()
        samples = loss.sample(case.outputs, 2, seed=0)
        loss.check(case.outputs, samples[0])


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_poisson_log_factorial_matches_lgamma(dtype, rtol):
    """The sampler's pmf uses ``log k!`` from Stirling's series (the array API has no
    lgamma): it must agree with ``math.lgamma(k + 1)`` from small counts (where the
    upward shift by 8 matters) to large ones."""
    import math

    import array_api_compat.numpy as xp

    from curvlinops.losses.poisson import _log_factorial

    k = np.concatenate([np.arange(0.0, 40.0), [99.0, 500.0, 4321.0, 1e5]]).astype(dtype)
    got = _log_factorial(xp, k)
    assert got.dtype == dtype
    expected = np.array([math.lgamma(float(v) + 1.0) for v in k])
    # absolute: the series is accurate to ~1e-11 (the docstring's claim), and log 0! = 0
    atol = 1e-11 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)
