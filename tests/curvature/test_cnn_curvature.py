"""Curvature approximations of native CNNs against exact dense references.

References: dense matrices of the exact operators (GGNLinearOperator, EFLinearOperator,
HessianLinearOperator, themselves tested against finite differences and PyTorch); the
cases where K-FAC is exact for convolutions (a convolution whose outputs each enter the
loss on their own: "expand"; a convolution whose outputs are averaged over the pixels
before the loss: "reduce"); EKFAC's optimality in Frobenius norm; Monte-Carlo variants
in expectation, with bounds from the sample variance and the power to see a 10 % bias;
batch normalization's exact blocks against the exact GGN block of its parameters.
"""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest
from monte_carlo import assert_unbiased

import curvlinops as cl
from curvlinops import nn
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator
from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator

HAS_NORM = hasattr(nn, "BatchNorm2d") and hasattr(nn, "GlobalAvgPool2d")
needs_norm = pytest.mark.skipif(not HAS_NORM, reason="needs nn.BatchNorm2d and nn.GlobalAvgPool2d")


def assert_close(actual, expected, rtol=1e-10):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(np.abs(expected).max(), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-12 * scale)


def param_groups(model, joint):
    """Parameter indices of each layer with parameters: [[w, b]] (joint) or [[w], [b]]."""
    groups, start = [], 0
    for _, layer in model.chain():
        n = len(layer.param_shapes())
        if n:
            members = list(range(start, start + n))
            groups += [members] if joint else [[i] for i in members]
        start += n
    return groups


def block(M, params, group):
    offsets = np.cumsum([0] + [p.size for p in params])
    ix = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in group])
    return M[np.ix_(ix, ix)]


def small_cnn(seed=0):
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    return model, model.init(seed, xp=xp, dtype=xp.float64)


def classification_data(seed, N=6):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, 2, 4, 4))
    y = rng.integers(0, 3, N)
    return [(X[:4], y[:4]), (X[4:], y[4:])]


# -- exact cases --------------------------------------------------------------------------


@pytest.mark.parametrize("operator", [KFACLinearOperator, EKFACLinearOperator])
def test_expand_exact_for_a_convolution_whose_outputs_each_enter_the_loss(operator):
    """Conv2d -> Flatten with squared error: each output pixel is an item of its own."""
    model = nn.Sequential(nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=1), nn.Flatten())
    params = model.init(0, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((5, 2, 4, 5))
    Y = rng.standard_normal(model(params, X).shape)
    data = [(X[:2], Y[:2]), (X[2:], Y[2:])]
    ggn = cl.GGNLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    approx = operator(
        model, cl.MSELoss(), params, data, kfac_approx="expand", separate_weight_and_bias=False
    ).to_dense()
    assert_close(approx, ggn)


@needs_norm
@pytest.mark.parametrize("operator", [KFACLinearOperator, EKFACLinearOperator])
def test_reduce_exact_for_a_convolution_averaged_over_pixels(operator):
    """Conv2d -> global average pooling with squared error: the data are the items."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, dilation=(1, 2)), nn.GlobalAvgPool2d())
    params = model.init(0, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(2)
    data = [(rng.standard_normal((n, 2, 5, 6)), rng.standard_normal((n, 3))) for n in (3, 4)]
    ggn = cl.GGNLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    approx = operator(
        model, cl.MSELoss(), params, data, kfac_approx="reduce", separate_weight_and_bias=False
    ).to_dense()
    assert_close(approx, ggn)
    expand = KFACLinearOperator(
        model, cl.MSELoss(), params, data, kfac_approx="expand", separate_weight_and_bias=False
    ).to_dense()
    assert np.linalg.norm(expand - ggn) > 1e-3 * np.linalg.norm(ggn)  # not exact: not vacuous


# -- EKFAC's optimality -------------------------------------------------------------------


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss", [cl.CrossEntropyLoss(), cl.MSELoss()], ids=["ce", "mse"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ekfac_at_least_as_close_as_kfac_in_frobenius_norm(kfac_approx, loss, seed):
    """EKFAC's scalings are the exact block's diagonal in K-FAC's eigenbasis (per datum)."""
    model, params = small_cnn(seed)
    data = classification_data(seed + 10)
    if isinstance(loss, cl.MSELoss):
        rng = np.random.default_rng(seed)
        data = [(X, rng.standard_normal((X.shape[0], 3))) for X, _ in data]
    ggn = cl.GGNLinearOperator(model, loss, params, data).to_dense()
    for joint in (False, True):
        kwargs = dict(kfac_approx=kfac_approx, separate_weight_and_bias=not joint)
        E = EKFACLinearOperator(model, loss, params, data, **kwargs).to_dense()
        K = KFACLinearOperator(model, loss, params, data, **kwargs).to_dense()
        for group in param_groups(model, joint):
            error_E = np.linalg.norm(block(E, params, group) - block(ggn, params, group))
            error_K = np.linalg.norm(block(K, params, group) - block(ggn, params, group))
            assert error_E <= error_K * (1 + 1e-10) + 1e-14
        # strictly closer on the convolutions (not vacuous)
        first = param_groups(model, joint)[0]
        error_E = np.linalg.norm(block(E, params, first) - block(ggn, params, first))
        error_K = np.linalg.norm(block(K, params, first) - block(ggn, params, first))
        assert error_E < error_K * (1 - 1e-6)


# -- Monte-Carlo variants in expectation ------------------------------------------------


def test_mc_kfac_of_a_cnn_is_unbiased_with_power_to_see_ten_percent():
    """E[B_mc] = B_type-2 for the cross-entropy (its Fisher is its GGN), per conv layer."""
    model, params = small_cnn(3)
    data = classification_data(4)
    loss = cl.CrossEntropyLoss()
    exact = KFACLinearOperator(model, loss, params, data)
    draws = {name: [] for name in exact.output_factors}
    for seed in range(200):
        K = KFACLinearOperator(
            model,
            loss,
            params,
            data,
            fisher_type="mc",
            mc_samples=32,
            seed=seed,
            check_deterministic=False,
        )
        for name, B in K.output_factors.items():
            draws[name].append(B)
    for name, samples in draws.items():  # rejects the factors scaled by 0.9 and 1.1
        assert_unbiased(samples, exact.output_factors[name])


def test_mc_ggn_diagonal_of_a_cnn_is_unbiased_with_power_to_see_ten_percent():
    model, params = small_cnn(5)
    data = classification_data(6)
    loss = cl.CrossEntropyLoss()
    exact = np.diag(cl.GGNLinearOperator(model, loss, params, data).to_dense())
    draws = [
        cl.GGNDiagonalLinearOperator(
            model, loss, params, data, mc_samples=32, seed=seed, check_deterministic=False
        ).diagonal()
        for seed in range(200)
    ]
    assert_unbiased(draws, exact)  # rejects the diagonals scaled by 0.9 and 1.1


def test_ef_diagonal_of_a_cnn_equals_the_dense_empirical_fisher():
    model, params = small_cnn(7)
    data = classification_data(8)
    loss = cl.CrossEntropyLoss()
    dense = cl.EFLinearOperator(model, loss, params, data).to_dense()
    diagonal = cl.EFDiagonalLinearOperator(model, loss, params, data).diagonal()
    assert_close(diagonal, np.diag(dense))


def test_kronecker_factored_hessian_of_a_cnn_is_symmetric_and_covers_every_parameter():
    """Beyond the exact one-pixel case (tests/nn/test_nn_conv.py): a strided CNN runs,
    and its blocks of the last (Linear) layer on a single datum are exact."""
    model, params = small_cnn(9)
    rng = np.random.default_rng(9)
    data = [(rng.standard_normal((1, 2, 4, 4)), rng.standard_normal((1, 3)))]
    op = KFACHessianLinearOperator(model, cl.MSELoss(), params, data)
    dense = op.to_dense()
    assert_close(dense, dense.T)
    hessian = cl.HessianLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    for group in ([4], [5]):
        assert_close(block(dense, params, group), block(hessian, params, group))


# -- batch normalization: exact blocks --------------------------------------------------


def bn_cnn(seed=0):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3, running_mean=rng.standard_normal(3), running_var=rng.random(3) + 0.5),
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, stride=2),
        nn.BatchNorm2d(4, running_mean=rng.standard_normal(4), running_var=rng.random(4) + 0.5),
        nn.Tanh(),
        nn.GlobalAvgPool2d(),
        nn.Linear(4, 3),
    )
    params = model.init(seed, xp=xp, dtype=xp.float64)
    # affine parameters away from their initial (1, 0), so that nothing is special
    params = [p + 0.3 * rng.standard_normal(p.shape) if p.ndim == 1 else p for p in params]
    return model, params


BN_GROUPS = ([1, 2], [5, 6])  # the batch-norm weight and bias of each normalization layer


@needs_norm
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("operator", [KFACLinearOperator, EKFACLinearOperator])
def test_batch_norm_parameters_get_their_exact_block(operator, fisher_type):
    model, params = bn_cnn()
    data = classification_data(11)
    loss = cl.CrossEntropyLoss()
    reference = {"type-2": cl.GGNLinearOperator, "empirical": cl.EFLinearOperator}[fisher_type]
    dense = reference(model, loss, params, data).to_dense()
    for joint in (True, False):
        op = operator(
            model, loss, params, data, fisher_type=fisher_type, separate_weight_and_bias=not joint
        )
        ours = op.to_dense()
        for pair in BN_GROUPS:
            groups = [pair] if joint else [[i] for i in pair]
            for group in groups:
                assert_close(block(ours, params, group), block(dense, params, group))
        assert sorted(op.exact_blocks) == ["1", "4"]


@needs_norm
def test_batch_norm_diagonals_and_hessian_diagonal_are_exact():
    model, params = bn_cnn(1)
    data = classification_data(12)
    loss = cl.CrossEntropyLoss()
    for diagonal, dense in (
        (cl.GGNDiagonalLinearOperator, cl.GGNLinearOperator),
        (cl.EFDiagonalLinearOperator, cl.EFLinearOperator),
        (cl.HessianDiagonalLinearOperator, cl.HessianLinearOperator),
    ):
        ours = diagonal(model, loss, params, data).diagonal()
        assert_close(ours, np.diag(dense(model, loss, params, data).to_dense()))


@needs_norm
def test_batch_norm_in_the_kronecker_factored_hessian_is_exact_for_one_datum_of_one_pixel():
    rng = np.random.default_rng(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 1),
        nn.BatchNorm2d(3, running_mean=rng.standard_normal(3), running_var=rng.random(3) + 0.5),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3, 2),
    )
    params = model.init(0, xp=xp, dtype=xp.float64)
    params = [p + 0.3 * rng.standard_normal(p.shape) for p in params]
    data = [(rng.standard_normal((1, 2, 1, 1)), rng.standard_normal((1, 2)))]
    op = KFACHessianLinearOperator(
        model, cl.MSELoss(), params, data, separate_weight_and_bias=False
    )
    hessian = cl.HessianLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    for group in ([0, 1], [2, 3], [4, 5]):
        assert_close(block(op.to_dense(), params, group), block(hessian, params, group))


@needs_norm
def test_factored_and_exact_inverses_with_batch_norm_blocks():
    model, params = bn_cnn(2)
    data = classification_data(13)
    K = KFACLinearOperator(model, cl.CrossEntropyLoss(), params, data)
    dense = K.to_dense()
    eye = np.eye(dense.shape[0])
    assert_close(K.inverse(0.1).to_dense(), np.linalg.inv(dense + 0.1 * eye), rtol=1e-8)
    factored = K.factored_inverse(0.1).to_dense()
    # the exact blocks are inverted exactly in the factored inverse too
    inv = np.linalg.inv(block(dense, params, [1]) + 0.1 * np.eye(3))
    assert_close(block(factored, params, [1]), inv, rtol=1e-8)


# -- a native ResNet: every parameter covered ------------------------------------------


def small_resnet(seed=0):
    rng = np.random.default_rng(seed)

    def bn(c):
        return nn.BatchNorm2d(
            c, running_mean=rng.standard_normal(c), running_var=rng.random(c) + 0.5
        )

    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        bn(3),
        nn.ReLU(),
        nn.Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), bn(3), nn.Tanh())),
        nn.Residual(
            nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), bn(4), nn.ReLU()),
            shortcut=nn.Conv2d(3, 4, 1, stride=2, bias=False),
        ),
        nn.MaxPool2d(2),
        nn.GlobalAvgPool2d(),
        nn.Linear(4, 3),
    )
    params = model.init(seed, xp=xp, dtype=xp.float64)
    params = [p + 0.2 * rng.standard_normal(p.shape) if p.ndim == 1 else p for p in params]
    return model, params


@needs_norm
def test_block_diagonal_of_a_resnet_has_one_exact_block_per_layer():
    model, params = small_resnet()
    data = classification_data(14)
    G = cl.GGNLinearOperator(model, cl.CrossEntropyLoss(), params, data)
    dense = G.to_dense()
    B = cl.block_diagonal(G)
    groups = [[0], [1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11], [12, 13]]
    assert [b.shape[0] for b in B.blocks] == [sum(params[i].size for i in g) for g in groups]
    expected = np.zeros_like(dense)
    for g in groups:
        ix = np.concatenate([np.arange(_offset(params, i), _offset(params, i + 1)) for i in g])
        expected[np.ix_(ix, ix)] = dense[np.ix_(ix, ix)]
    assert_close(B.to_dense(), expected)


def _offset(params, i):
    return int(sum(p.size for p in params[:i]))


@needs_norm
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical", "forward-only"])
def test_kfac_and_ekfac_of_a_resnet_cover_every_parameter(fisher_type):
    model, params = small_resnet(1)
    data = classification_data(15)
    loss = cl.CrossEntropyLoss()
    K = KFACLinearOperator(model, loss, params, data, fisher_type=fisher_type)
    P = sum(p.size for p in params)
    dense = K.to_dense()
    assert dense.shape == (P, P)
    assert_close(dense, dense.T)
    assert np.linalg.eigvalsh(dense).min() >= -1e-12 * np.abs(dense).max()
    if fisher_type != "forward-only":
        E = EKFACLinearOperator(model, loss, params, data, fisher_type=fisher_type)
        assert E.to_dense().shape == (P, P)
    if fisher_type == "type-2":  # the batch norms' and the last layer's blocks are exact
        ggn = cl.GGNLinearOperator(model, loss, params, data).to_dense()
        for group in ([1], [2], [5], [6], [9], [10]):
            assert_close(block(dense, params, group), block(ggn, params, group))


def test_forward_only_kfac_of_a_convolution_is_identity_kron_patch_covariance():
    """``I (x) A`` with ``A`` the mean outer product of the unfolded patches (expand)."""
    conv = nn.Conv2d(2, 3, (2, 3), stride=2, padding=1)
    model = nn.Sequential(conv, nn.Flatten())
    params = model.init(0, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((4, 2, 5, 5))
    data = [(X, rng.standard_normal(model(params, X).shape))]
    K = KFACLinearOperator(model, cl.MSELoss(), params, data, fisher_type="forward-only")
    # patches by hand: every output pixel's receptive field, in (channel, kh, kw) order
    padded = np.pad(X, ((0, 0), (0, 0), (1, 1), (1, 1)))
    rows = [
        padded[n, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 3].ravel()
        for n in range(4)
        for i in range(3)
        for j in range(3)
    ]
    patches = np.stack(rows)
    A = patches.T @ patches / len(rows)
    assert_close(K.input_factors["0"], A)
    assert_close(K.output_factors["0"], np.eye(3))


@needs_norm
def test_kronecker_factored_hessian_walks_through_batch_norm_and_pooling():
    """The averaged rules of batch norm, max and global pooling compose: on one datum the
    last layer's blocks are exact and the operator is symmetric."""
    rng = np.random.default_rng(4)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3, running_mean=rng.standard_normal(3), running_var=rng.random(3) + 0.5),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 1),
        nn.Sigmoid(),
        nn.GlobalAvgPool2d(),
        nn.Linear(4, 2),
    )
    params = model.init(0, xp=xp, dtype=xp.float64)
    data = [(rng.standard_normal((1, 2, 4, 4)), rng.standard_normal((1, 2)))]
    op = KFACHessianLinearOperator(model, cl.MSELoss(), params, data)
    dense = op.to_dense()
    assert_close(dense, dense.T)
    hessian = cl.HessianLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    for group in ([6], [7]):
        assert_close(block(dense, params, group), block(hessian, params, group))
