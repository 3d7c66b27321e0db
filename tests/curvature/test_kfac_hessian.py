"""The Kronecker-factored Hessian against exact Hessian blocks and a NumPy closed form.

References: dense matrices of HessianLinearOperator (tested against finite differences
and torch.func in test_exact.py), K-FAC where the two coincide, and the documented
averaging scheme written out in NumPy for a two-layer network.
"""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest
from test_exact import problem
from test_kfac import (
    assert_blocks_equal,
    assert_close,
    block,
    ggn,
    indices,
    layer_groups,
    split,
)

import curvlinops as cl
import curvlinops.nn as cnn
from curvlinops import FactorizationError, MissingTierError
from curvlinops.curvature.kfac import KFACLinearOperator
from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator


def hessian(model, loss, params, data):
    return cl.HessianLinearOperator(model, loss, params, data).to_dense()


@pytest.mark.parametrize("name", ["mse", "ce", "bce", "gaussian"])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "softplus"])
@pytest.mark.parametrize("separate", [True, False])
def test_exact_hessian_blocks_on_a_single_datum(name, activation, separate):
    model, _, params, data, *_, loss = problem(
        name, widths=(3, 4, 3, 2), activation=activation, N=1, splits=(), seed=21
    )
    K = KFACHessianLinearOperator(model, loss, params, data, separate_weight_and_bias=separate)
    H = hessian(model, loss, params, data)
    assert_blocks_equal(K.to_dense(), H, params, layer_groups(model, separate))
    # the activations' curvature matters: the GGN blocks differ from these
    G = ggn(model, loss, params, data)
    first = layer_groups(model, separate)[0]
    assert not np.allclose(block(G, params, first), block(H, params, first), rtol=1e-4)


def test_equals_kfac_and_the_exact_hessian_blocks_for_deep_linear_networks():
    model, _, params, data, *_, loss = problem(
        "mse", widths=(3, 4, 2, 3), activation="identity", N=9, splits=(4,), seed=22
    )
    for separate in (True, False):
        K = KFACHessianLinearOperator(
            model, loss, params, data, separate_weight_and_bias=separate
        ).to_dense()
        kfac = KFACLinearOperator(
            model, loss, params, data, separate_weight_and_bias=separate
        ).to_dense()
        assert_close(K, kfac)
        assert_blocks_equal(
            K, hessian(model, loss, params, data), params, layer_groups(model, separate)
        )


def test_averaging_scheme_over_many_data_against_numpy():
    """The documented recursion on data-set averages, written out in NumPy."""
    rng = np.random.default_rng(23)
    N, reduction = 7, "mean"
    model = cnn.Sequential(cnn.Linear(3, 4), cnn.Tanh(), cnn.Linear(4, 2))
    params = [1.5 * p for p in model.init(23, xp=xp, dtype=xp.float64)]
    X, y = rng.normal(size=(N, 3)), rng.normal(size=(N, 2))
    loss = cl.MSELoss(reduction=reduction)
    K = KFACHessianLinearOperator(model, loss, params, split(X, y, (3,)))
    W0, b0, W1, b1 = params
    h = X @ W0.T + b0
    a1 = np.tanh(h)
    f = a1 @ W1.T + b1
    c = 1.0 / (N * 2)
    B1 = c * N * 2 * np.eye(2)  # sum of the MSE Hessians 2 I
    dl_da1 = 2 * (f - y) @ W1
    d1 = 1 - np.tanh(h) ** 2
    d2 = -2 * np.tanh(h) * d1
    B0 = (W1.T @ B1 @ W1) * (d1.T @ d1 / N) + np.diag(c * np.sum(d2 * dl_da1, axis=0))
    A0, A1 = X.T @ X / N, a1.T @ a1 / N
    assert_close(K.output_factors["0"], B0)
    assert_close(K.output_factors["2"], B1)
    assert_close(K.input_factors["0"], A0)
    assert_close(K.input_factors["2"], A1)
    dense = K.to_dense()
    assert_close(block(dense, params, [0]), np.kron(B0, A0))
    assert_close(block(dense, params, [1]), B0)
    assert_close(block(dense, params, [2]), np.kron(B1, A1))


def _indefinite_case():
    """One datum through a tanh network with a large residual: negative curvature."""
    model = cnn.Sequential(cnn.Linear(2, 3), cnn.Tanh(), cnn.Linear(3, 2))
    params = [2.0 * p for p in model.init(24, xp=xp, dtype=xp.float64)]
    data = [(np.array([[1.0, -2.0]]), np.array([[4.0, -3.0]]))]
    return model, params, data, cl.MSELoss()


def test_indefinite_case_inverse_raises_or_warns():
    model, params, data, loss = _indefinite_case()
    K = KFACHessianLinearOperator(model, loss, params, data)
    dense = K.to_dense()
    eigenvalues = np.linalg.eigvalsh(dense)
    assert eigenvalues.min() < -1e-3  # indefinite, like the exact Hessian block it equals
    H = hessian(model, loss, params, data)
    assert np.linalg.eigvalsh(block(H, params, [1])).min() < -1e-3
    assert_close(block(dense, params, [1]), block(H, params, [1]))

    small = 0.1 * abs(eigenvalues.min())
    with pytest.raises(FactorizationError, match=r"factor B of layer '0'.*damping"):
        K.factored_inverse(small**2)  # B + sqrt(d) I is not positive definite
    with pytest.warns(UserWarning, match="indefinite"):
        inverse = K.inverse(small)
    expected = np.linalg.inv(dense + small * np.eye(len(dense)))
    assert_close(inverse.to_dense(), expected, 1e-8)
    sign, value = np.linalg.slogdet(dense + small * np.eye(len(dense)))
    if sign < 0:
        with pytest.raises(ValueError, match="negative determinant"):
            K.damped(small).logdet()
    else:
        assert_close(K.damped(small).logdet(), value, 1e-9)
    # enough damping: positive definite, no warning, factored inverse works
    large = 2 * abs(eigenvalues.min())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(
            K.inverse(large).to_dense(),
            np.linalg.inv(dense + large * np.eye(len(dense))),
            1e-8,
        )
    K.factored_inverse(100.0)


def test_flatten_before_the_first_layer_and_shared_positions():
    model = cnn.Sequential(cnn.Flatten(), cnn.Linear(6, 3), cnn.Sigmoid(), cnn.Linear(3, 2))
    params = model.init(25, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(25)
    data = [(rng.normal(size=(1, 2, 3)), rng.normal(size=(1, 2)))]
    K = KFACHessianLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    H = hessian(model, cl.MSELoss(), params, data)
    assert_blocks_equal(K, H, params, layer_groups(model, True))
    # a shared axis: every position is an item ("expand"); one position is one datum
    shared = cnn.Sequential(cnn.Linear(3, 4), cnn.Tanh(), cnn.Linear(4, 2))
    params = shared.init(26, xp=xp, dtype=xp.float64)
    X, y = rng.normal(size=(1, 1, 3)), rng.normal(size=(1, 1, 2))
    K = KFACHessianLinearOperator(shared, cl.MSELoss(), params, [(X, y)]).to_dense()
    K2 = KFACHessianLinearOperator(shared, cl.MSELoss(), params, [(X[:, 0], y[:, 0])]).to_dense()
    assert_close(K, K2)


def test_unsupported_models_raise_clear_errors():
    rng = np.random.default_rng(27)
    data = [(rng.normal(size=(2, 2, 3)), rng.normal(size=(2, 2)))]
    middle = cnn.Sequential(cnn.Linear(3, 2), cnn.Flatten(), cnn.Linear(4, 2))
    params = middle.init(0, xp=xp, dtype=xp.float64)
    with pytest.raises(TypeError, match=r"layer '1' is Flatten"):
        KFACHessianLinearOperator(middle, cl.MSELoss(), params, data)
    from curvlinops.frontends import CallableModel

    linear = cnn.Linear(3, 2)
    callable_model = CallableModel(
        forward=lambda p, x: linear(p, x),
        jvp=lambda p, x, t: linear.linearize(p, x).jvp(t),
        vjp=lambda p, x, u: linear.linearize(p, x).vjp(u),
    )
    with pytest.raises(MissingTierError, match="needs the layer protocol.*curvlinops.nn"):
        KFACHessianLinearOperator(
            callable_model,
            cl.MSELoss(),
            linear.init(0, xp=xp),
            [(np.ones((2, 3)), np.ones((2, 2)))],
        )


def test_product_on_every_backend(backend):
    model, params, data, loss = _indefinite_case()
    H = hessian(model, loss, params, data)
    to = backend.asarray
    K = KFACHessianLinearOperator(
        model,
        loss,
        [to(p) for p in params],
        [(to(X), to(y)) for X, y in data],
        check_deterministic=False,
    )
    reference = np.zeros_like(H)
    for group in layer_groups(model, True):
        ix = indices(params, group)
        reference[np.ix_(ix, ix)] = H[np.ix_(ix, ix)]
    V = np.random.default_rng(3).normal(size=(K.shape[1], 2))
    assert_close(backend.to_numpy(K @ to(V)), reference @ V)


def test_an_embedding_alone_with_squared_loss_is_exact():
    """An embedding is a linear layer on one-hot ids, and the squared loss's Hessian is
    the same for every item, so its Hessian is exactly ``diag(counts) / T kron B``:
    the dense Hessian, over two batches."""
    model = cnn.Sequential(cnn.Embedding(5, 3))
    rng = np.random.default_rng(1)
    params = [rng.standard_normal((5, 3))]
    X, y = rng.integers(0, 5, size=(6, 2)), rng.standard_normal((6, 2, 3))
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    K = KFACHessianLinearOperator(model, cl.MSELoss(), params, data)
    H = cl.HessianLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    np.testing.assert_allclose(K.to_dense(), H, rtol=1e-13, atol=1e-15)
