"""``quadratic_form(V) = V^T A V`` of the curvature operators, against dense references.

The GGN, Fisher (exact and Monte-Carlo) and empirical Fisher take the route through
one Jacobian-vector product per batch; the Hessian the default ``V^T (A V)``. The
references are the dense matrices of ``tests/curvature/reference.py`` (finite
differences, closed-form loss Hessians, the Fisher from its definition).
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import dense_references, fd_hessian
from test_exact import problem

import curvlinops as cl


@pytest.mark.parametrize("name", ["mse", "ce", "bce", "poisson", "gaussian"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_quadratic_forms_against_dense(name, reduction):
    model, spec, params, data, X, y, theta, loss = problem(name, reduction=reduction, splits=(2, 5))
    ref = dense_references(name, spec, theta, X, y, reduction)
    V = np.random.default_rng(1).normal(size=(theta.size, 3))
    for Op, dense in (
        (cl.GGNLinearOperator, ref["G"]),
        (cl.FisherLinearOperator, ref["F"]),
        (cl.EFLinearOperator, ref["E"]),
    ):
        gram = Op(model, loss, params, data).quadratic_form(V)
        expected = V.T @ dense @ V
        np.testing.assert_allclose(gram, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
        assert np.array_equal(gram, gram.T)


def test_hessian_and_vector_input():
    model, spec, params, data, X, y, theta, loss = problem("ce", seed=3)
    H = fd_hessian("ce", spec, theta, X, y, "mean")
    v = np.random.default_rng(2).normal(size=theta.size)
    gram = cl.HessianLinearOperator(model, loss, params, data).quadratic_form(v)
    assert gram.shape == (1, 1)
    np.testing.assert_allclose(gram[0, 0], v @ H @ v, rtol=1e-4)


def test_mc_fisher_quadratic_form_is_its_own_product():
    """The sampled Fisher's quadratic form uses the same draws as its products."""
    model, spec, params, data, X, y, theta, loss = problem("ce", seed=4)
    F = cl.FisherLinearOperator(model, loss, params, data, mc_samples=3, seed=7)
    V = np.random.default_rng(3).normal(size=(theta.size, 2))
    np.testing.assert_allclose(F.quadratic_form(V), V.T @ (F @ V), rtol=1e-10, atol=1e-13)


def test_on_every_backend(backend):
    model, spec, params, data, X, y, theta, loss = problem("ce", seed=13)
    ref = dense_references("ce", spec, theta, X, y, "mean")
    p_b = [backend.asarray(np.asarray(p)) for p in params]
    data_b = [(backend.asarray(a), backend.asarray(b)) for a, b in data]
    V = np.random.default_rng(0).normal(size=(theta.size, 2))
    gram = cl.GGNLinearOperator(model, loss, p_b, data_b).quadratic_form(backend.asarray(V))
    expected = V.T @ ref["G"] @ V
    np.testing.assert_allclose(backend.to_numpy(gram), expected, rtol=1e-6, atol=1e-10)


def test_float32_and_bad_input():
    model, spec, params, data, X, y, theta, loss = problem("mse", seed=5)
    p32 = [np.asarray(p, dtype=np.float32) for p in params]
    d32 = [(a.astype(np.float32), b.astype(np.float32)) for a, b in data]
    G64 = cl.GGNLinearOperator(model, loss, params, data)
    G32 = cl.GGNLinearOperator(model, loss, p32, d32)
    V = np.random.default_rng(4).normal(size=(theta.size, 2))
    gram = G32.quadratic_form(V.astype(np.float32))
    assert gram.dtype == np.float32
    expected = G64.quadratic_form(V)
    np.testing.assert_allclose(gram, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(ValueError, match="directions V"):
        G64.quadratic_form(V[:-1])
