"""EKFAC against exact GGN blocks, K-FAC's Frobenius error, and NumPy.

References: dense matrices of the exact GGN operator (tested independently in
test_exact.py) and numpy.linalg on them.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_exact import problem
from test_kfac import (
    assert_blocks_equal,
    assert_close,
    backend_problem,
    block,
    ggn,
    indices,
    joint_order,
    layer_groups,
    mean_over_positions_model,
    shared_axis_problem,
    split,
)

import curvlinops as cl
import curvlinops.nn as cnn
from curvlinops import FactorizationError
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize(
    "case",
    ["single_datum_ce", "linear_regression", "deep_linear"],
)
def test_equals_exact_block_where_kfac_is_exact(case, separate):
    if case == "single_datum_ce":
        args = problem("ce", widths=(3, 4, 3), N=1, splits=(), seed=11)
    elif case == "linear_regression":
        args = problem("mse", widths=(4, 3), N=9, splits=(5,), seed=12)
    else:
        args = problem("mse", widths=(3, 4, 2, 3), activation="identity", N=8, splits=(3,))
    model, _, params, data, *_, loss = args
    E = EKFACLinearOperator(model, loss, params, data, separate_weight_and_bias=separate)
    assert_blocks_equal(
        E.to_dense(), ggn(model, loss, params, data), params, layer_groups(model, separate)
    )


def test_equals_exact_block_in_the_weight_sharing_cases():
    import array_api_compat.numpy as xp

    _, _, data = shared_axis_problem(seed=13)
    model = cnn.Sequential(cnn.Linear(3, 4), cnn.Linear(4, 2))
    params = model.init(13, xp=xp, dtype=xp.float64)
    E = EKFACLinearOperator(model, cl.MSELoss(), params, data, kfac_approx="expand")
    G = ggn(model, cl.MSELoss(), params, data)
    assert_blocks_equal(E.to_dense(), G, params, layer_groups(model, True))

    rng = np.random.default_rng(14)
    data = split(rng.normal(size=(7, 4, 3)), rng.normal(size=(7, 2)), (3,))
    model, params = mean_over_positions_model(4)
    E = EKFACLinearOperator(
        model, cl.MSELoss(), params, data, kfac_approx="reduce", separate_weight_and_bias=False
    )
    G = ggn(model, cl.MSELoss(), params, data)
    assert_blocks_equal(E.to_dense(), G, params, layer_groups(model, False))


@pytest.mark.parametrize("name", ["ce", "mse"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frobenius_error_at_most_kfacs(name, activation, seed):
    """Of all matrices diagonal in K-FAC's eigenbasis, EKFAC is the closest to the GGN."""
    model, _, params, data, *_, loss = problem(
        name, widths=(3, 5, 4, 3), activation=activation, N=11, splits=(6,), seed=seed
    )
    G = ggn(model, loss, params, data)
    for separate in (True, False):
        E = EKFACLinearOperator(model, loss, params, data, separate_weight_and_bias=separate)
        K = KFACLinearOperator(model, loss, params, data, separate_weight_and_bias=separate)
        E, K = E.to_dense(), K.to_dense()
        for group in layer_groups(model, separate):
            error_E = np.linalg.norm(block(E, params, group) - block(G, params, group))
            error_K = np.linalg.norm(block(K, params, group) - block(G, params, group))
            assert error_E <= error_K * (1 + 1e-10) + 1e-14
        assert np.linalg.norm(E - G) <= np.linalg.norm(K - G) * (1 + 1e-10)
        # and strictly better somewhere in these non-exact cases (not vacuous)
        assert np.linalg.norm(E - G) < np.linalg.norm(K - G) * (1 - 1e-6)


def test_scalings_are_the_diagonal_of_the_exact_block_in_the_eigenbasis():
    model, _, params, data, *_, loss = problem("ce", widths=(3, 4, 3), N=7, splits=(3,), seed=4)
    E = EKFACLinearOperator(model, loss, params, data, separate_weight_and_bias=False)
    G = ggn(model, loss, params, data)
    for layer, group in zip(E.layers, layer_groups(model, False), strict=True):
        Q = np.kron(E.output_eigenvectors[layer.name], E.input_eigenvectors[layer.name])
        # the joint block [W | b] is ordered (o, i) with i over D_in + 1 columns
        d_out, d_in = layer.d_out, layer.d_in
        flat = joint_order((d_out, d_in))
        G_block = np.zeros((d_out * (d_in + 1),) * 2)
        G_block[np.ix_(flat, flat)] = block(G, params, group)
        expected = np.diag(Q.T @ G_block @ Q).reshape(d_out, d_in + 1)
        assert_close(E.scalings[layer.name], expected)


@pytest.mark.parametrize("separate", [True, False])
def test_inverse_and_queries_against_numpy(separate):
    model, _, params, data, *_, loss = problem("ce", widths=(3, 4, 3), N=9, splits=(4,), seed=5)
    E = EKFACLinearOperator(model, loss, params, data, separate_weight_and_bias=separate)
    dense = E.to_dense()
    eye = np.eye(len(dense))
    assert_close(dense, dense.T, 0, 1e-14)
    for d in (0.05, 1.0):
        assert_close(E.inverse(d).to_dense(), np.linalg.inv(dense + d * eye), 1e-8)
        assert_close(E.damped(d).inverse().to_dense(), np.linalg.inv(dense + d * eye), 1e-8)
        assert_close(E.damped(d).logdet(), np.linalg.slogdet(dense + d * eye)[1], 1e-9)
    assert_close(E.trace(), np.trace(dense))
    assert_close(E.diagonal(), np.diag(dense))
    assert_close(E.frobenius_norm(), np.linalg.norm(dense))
    # cross-entropy: the output factor of the last layer is singular (softmax)
    with pytest.raises(FactorizationError, match="singular"):
        E.inverse()


@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
def test_other_fisher_types(fisher_type):
    """On a single datum, EKFAC of the empirical Fisher is its exact block; MC runs."""
    model, _, params, data, *_, loss = problem("ce", widths=(3, 4, 3), N=1, splits=())
    E = EKFACLinearOperator(model, loss, params, data, fisher_type=fisher_type, seed=2)
    dense = E.to_dense()
    assert_close(dense, dense.T, 0, 1e-14)
    if fisher_type == "empirical":
        EF = cl.EFLinearOperator(model, loss, params, data).to_dense()
        assert_blocks_equal(dense, EF, params, layer_groups(model, True))
    with pytest.raises(ValueError, match="fisher_type"):
        EKFACLinearOperator(model, loss, params, data, fisher_type="forward-only")


def test_products_on_every_backend(backend):
    model, _, params, data, *_, loss = backend_problem()
    G = ggn(model, loss, params, data)
    reference = np.zeros_like(G)
    for group in layer_groups(model, False):
        ix = indices(params, group)
        reference[np.ix_(ix, ix)] = G[np.ix_(ix, ix)]
    to = backend.asarray
    E = EKFACLinearOperator(
        model,
        loss,
        [to(p) for p in params],
        [(to(X), to(y)) for X, y in data],
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    V = np.random.default_rng(2).normal(size=(E.shape[1], 4))
    assert_close(backend.to_numpy(E @ to(V)), reference @ V)
    assert_close(backend.to_numpy(E @ to(V[:, 1])), reference @ V[:, 1])
    d = 0.2
    expected = np.linalg.inv(reference + d * np.eye(len(reference))) @ V
    assert_close(backend.to_numpy(E.inverse(d) @ to(V)), expected, 1e-8)


def test_scalings_pass_reuses_the_last_batch_of_the_factors_pass(monkeypatch):
    """Each batch is linearized once for the factors and once more for the scalings,
    except the last, whose taps the factors' pass keeps; an update linearizes once.
    The scalings stay the diagonal of the exact block in the eigenbasis."""
    model, _, params, data, *_, loss = problem("ce", widths=(3, 4, 3), N=9, splits=(3, 6), seed=8)
    calls = []
    linearize = model.linearize
    monkeypatch.setattr(
        model, "linearize", lambda p, X: calls.append(X.shape[0]) or linearize(p, X)
    )
    E = EKFACLinearOperator(
        model, loss, params, data, separate_weight_and_bias=False, check_deterministic=False
    )
    assert calls == [3, 3, 3, 3, 3]  # three batches for the factors, two for the scalings
    G = ggn(model, loss, params, data)
    for layer, group in zip(E.layers, layer_groups(model, False), strict=True):
        Q = np.kron(E.output_eigenvectors[layer.name], E.input_eigenvectors[layer.name])
        flat = joint_order((layer.d_out, layer.d_in))
        G_block = np.zeros((len(flat),) * 2)
        G_block[np.ix_(flat, flat)] = block(G, params, group)
        expected = np.diag(Q.T @ G_block @ Q).reshape(layer.d_out, layer.d_in + 1)
        assert_close(E.scalings[layer.name], expected)
    calls.clear()
    E.update(data[0], decay=0.5)
    assert calls == [3]
    assert E._retained is None  # the kept taps are released after each use


def test_scalings_over_shared_axes_do_not_depend_on_the_memory_chunks(monkeypatch):
    """With shared axes (positions) the scalings are summed in chunks of data that bound
    the memory; chunks of one datum give the same scalings as one chunk for the batch."""
    import curvlinops.curvature.ekfac as ekfac_module

    # the first layer sees 6 positions per datum, the outputs (N, 2) have none
    model = cnn.Sequential(cnn.Linear(3, 4), cnn.Tanh(), cnn.Flatten(), cnn.Linear(24, 2))
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s) for s in model.expected_param_shapes()]
    data = [(rng.standard_normal((5, 6, 3)), rng.standard_normal((5, 2)))]

    def scalings():
        E = EKFACLinearOperator(model, cl.MSELoss(), params, data, kfac_approx="expand")
        return [np.asarray(E.scalings[la.name]) for la in E.layers]

    whole = scalings()
    monkeypatch.setattr(ekfac_module, "_CHUNK_ENTRIES", 1)  # one datum per chunk
    for chunked, reference in zip(scalings(), whole, strict=True):
        np.testing.assert_allclose(chunked, reference, rtol=1e-12)
