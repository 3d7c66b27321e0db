"""Hessian factors, and the Fisher of the predictive distribution against the Hessian.

The Fisher is computed from the distribution (enumeration or closed form), so
``F = H`` for the natural-parameter losses is a real check; the Gaussian with
predicted variance must show ``F != H`` and ``F = E_y[H]``.
"""

from __future__ import annotations

import numpy as np
import pytest
from loss_cases import (
    JAX_FEW_KINDS,
    KINDS,
    NATURAL_KINDS,
    block_diag_from_factor,
    dense_blocks,
    make_case,
    skip_kind_on_jax,
    torch_loss_fn,
    torch_targets,
)
from monte_carlo import assert_unbiased

from curvlinops import GaussianNLLLoss

RTOL, ATOL = 1e-10, 1e-12


def _on(backend, case):
    f = backend.asarray(case.outputs, "float64")
    dtype = "float64" if case.targets.dtype.kind == "f" else "int64"
    return f, backend.asarray(case.targets, dtype)


def _hessian_blocks(backend, loss, f, y):
    return dense_blocks(
        lambda V: backend.to_numpy(loss.hessian_matmat(f, y, backend.asarray(V))), f.shape
    )


@pytest.mark.parametrize("kind", NATURAL_KINDS)
def test_hessian_sqrt_factors_the_hessian(backend, kind):
    skip_kind_on_jax(backend, kind, JAX_FEW_KINDS)
    case = make_case(kind, np.random.default_rng(0))
    loss = case.loss("sum")
    f, y = _on(backend, case)
    S = backend.to_numpy(loss.hessian_sqrt(f, y))
    assert S.shape[:-1] == case.outputs.shape
    H = _hessian_blocks(backend, loss, f, y)
    np.testing.assert_allclose(
        block_diag_from_factor(S, case.outputs.shape), H, rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("kind", NATURAL_KINDS)
def test_fisher_equals_hessian_for_natural_parameters(backend, kind):
    """F (from the distribution) = torch's Hessian of the summed loss, per datum."""
    torch = pytest.importorskip("torch")
    skip_kind_on_jax(backend, kind)
    case = make_case(kind, np.random.default_rng(1))
    loss = case.loss("sum")
    assert loss.is_natural
    f, y = _on(backend, case)

    fn = torch_loss_fn(kind, "sum")
    t_f = torch.as_tensor(case.outputs)
    t_y = torch_targets(case.targets)
    hess = torch.func.hessian(lambda g: fn(g, t_y))(t_f).numpy()
    N = case.outputs.shape[0]
    P = case.outputs[0].size
    hess = hess.reshape(N, P, N, P)[np.arange(N), :, np.arange(N), :]

    F = dense_blocks(lambda V: backend.to_numpy(loss.fisher_matmat(f, backend.asarray(V))), f.shape)
    np.testing.assert_allclose(F, hess, rtol=RTOL, atol=ATOL)
    S = backend.to_numpy(loss.fisher_sqrt(f))
    assert S.shape[:-1] == case.outputs.shape
    np.testing.assert_allclose(
        block_diag_from_factor(S, case.outputs.shape), hess, rtol=RTOL, atol=ATOL
    )


def test_categorical_fisher_is_the_enumerated_expectation():
    """sum_c p_c g_c g_c^T, with g_c from NumPy's softmax, for one datum."""
    rng = np.random.default_rng(2)
    f = rng.normal(size=(1, 5))
    p = np.exp(f[0]) / np.exp(f[0]).sum()
    expected = sum(p[c] * np.outer(p - np.eye(5)[c], p - np.eye(5)[c]) for c in range(5))
    case = make_case("ce_labels", rng, N=1, C=5)
    F = case.loss().fisher_matmat(f, np.eye(5)[None])[0]
    np.testing.assert_allclose(F, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(F, np.diag(p) - np.outer(p, p), rtol=RTOL, atol=ATOL)


def test_gaussian_nll_hessian_is_indefinite_and_has_no_factor(backend):
    f = backend.asarray(np.array([[0.0, 0.0]]))  # mu = 0, log-variance 0
    y = backend.asarray(np.array([[1.5]]))
    loss = GaussianNLLLoss(reduction="sum")
    H = _hessian_blocks(backend, loss, f, y)[0]
    # [[e^-s, r e^-s], [r e^-s, r^2 e^-s / 2]] with r = 1.5, s = 0.
    np.testing.assert_allclose(H, [[1.0, 1.5], [1.5, 1.125]], rtol=RTOL)
    np.testing.assert_allclose(np.linalg.det(H), -(1.5**2) / 2, rtol=RTOL)
    assert np.linalg.eigvalsh(H)[0] < -0.4
    with pytest.raises(NotImplementedError, match="indefinite"):
        loss.hessian_sqrt(f, y)


def test_gaussian_nll_fisher_differs_from_hessian_but_is_its_expectation(backend):
    """F != H at a concrete target, and F = E_{y ~ r}[H] (Monte Carlo, variance bound)."""
    rng = np.random.default_rng(3)
    N, D, M = 2, 2, 20000
    mean, log_var = rng.normal(size=(N, D)), 0.7 * rng.normal(size=(N, D))
    outputs = np.concatenate([mean, log_var], axis=-1)
    loss = GaussianNLLLoss(reduction="sum")
    assert not loss.is_natural
    f = backend.asarray(outputs)
    F = dense_blocks(lambda V: backend.to_numpy(loss.fisher_matmat(f, backend.asarray(V))), f.shape)
    np.testing.assert_allclose(
        F[0], np.diag(np.concatenate([np.exp(-log_var[0]), [0.5] * D])), rtol=RTOL
    )

    y_far = backend.asarray(mean + 2.0 * np.exp(0.5 * log_var))
    H_far = _hessian_blocks(backend, loss, f, y_far)
    assert np.max(np.abs(H_far - F)) > 0.5

    # NumPy draws y ~ r, all M*N (sample, datum) pairs form one batch of Hessians.
    y = mean + np.exp(0.5 * log_var) * rng.normal(size=(M, N, D))
    f_rep = np.broadcast_to(outputs, (M, N, 2 * D)).reshape(M * N, 2 * D)
    H = _hessian_blocks(
        backend, loss, backend.asarray(f_rep), backend.asarray(y.reshape(M * N, D))
    ).reshape(M, N, 2 * D, 2 * D)
    assert_unbiased(H, F)  # the mean-mean blocks do not depend on y: zero variance


@pytest.mark.parametrize("kind", KINDS)
def test_fisher_sqrt_factors_fisher_matmat(kind):
    case = make_case(kind, np.random.default_rng(4))
    loss = case.loss()
    F = dense_blocks(lambda V: loss.fisher_matmat(case.outputs, V), case.outputs.shape)
    S = loss.fisher_sqrt(case.outputs)
    np.testing.assert_allclose(
        block_diag_from_factor(S, case.outputs.shape), F, rtol=RTOL, atol=ATOL
    )
    assert np.all(np.linalg.eigvalsh(F) > -1e-12)  # PSD (singular for softmax)
