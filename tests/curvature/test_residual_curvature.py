"""The Hessian diagonal and the Kronecker-factored Hessian through residual blocks.

``y = x + F(x)`` and ``y = P x + F(x)`` (a projection shortcut): the walks go down both
paths and add their cross terms at the block's input. References, independent of the
walks: the dense Hessian from PyTorch autodiff (``torch.autograd.functional.hessian`` of
the loss of the model run on torch tensors: the forward pass is the library's, every
derivative is PyTorch's) and HessianLinearOperator (the R-operator, tested against
torch.func elsewhere); the exact Hessian blocks on a single datum (where the
Kronecker-factored Hessian is exact by definition); and the documented averaging scheme
through a residual block written out in NumPy for many data.
"""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest
from backend_matrix import backends_and_dtypes

import curvlinops as cl
from curvlinops import nn
from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator

torch = pytest.importorskip("torch")

HAS_LAYERS = all(hasattr(nn, n) for n in ("BatchNorm2d", "MaxPool2d", "GlobalAvgPool2d"))
needs_layers = pytest.mark.skipif(not HAS_LAYERS, reason="needs batch norm and pooling layers")


def assert_close(actual, expected, rtol=1e-10):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def perturbed(model, seed, scale=0.3):
    """Parameters away from their initial values (batch norm's affine ones included)."""
    rng = np.random.default_rng(seed)
    params = model.init(seed, xp=xp, dtype=xp.float64)
    return [p + scale * rng.standard_normal(p.shape) for p in params]


def resnet(seed=0, pixels=True):
    """Conv, BN, tanh, an identity block (conv, BN, tanh, 1x1 conv), a downsampling block
    with a strided 1x1 projection, max pooling, global pooling, Linear. ``pixels=False``:
    every convolution 1 x 1 and no max pooling, for one-pixel images."""
    rng = np.random.default_rng(seed + 100)

    def bn(c):
        return nn.BatchNorm2d(
            c, running_mean=rng.standard_normal(c), running_var=rng.random(c) + 0.5
        )

    k, pad = (3, 1) if pixels else (1, 0)
    stride = 2 if pixels else 1
    layers = [
        nn.Conv2d(2, 3, k, padding=pad),
        bn(3),
        nn.Tanh(),
        nn.Residual(
            nn.Sequential(nn.Conv2d(3, 3, k, padding=pad), bn(3), nn.Tanh(), nn.Conv2d(3, 3, 1))
        ),
        nn.Residual(
            nn.Sequential(nn.Conv2d(3, 4, k, stride=stride, padding=pad), nn.Sigmoid()),
            shortcut=nn.Conv2d(3, 4, 1, stride=stride, bias=False),
        ),
    ]
    if pixels:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.GlobalAvgPool2d(), nn.Linear(4, 3)]
    return nn.Sequential(*layers)


def residual_mlp(shortcut):
    """Linear, tanh, Residual(Linear, tanh, Linear[, shortcut Linear]), Linear."""
    block = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    skip = nn.Linear(3, 3, bias=False) if shortcut else None
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Residual(block, skip), nn.Linear(3, 2))


def torch_hessian(model, params, data, loss):
    """The dense Hessian of the loss over all data by PyTorch autodiff (``torch.func``)."""
    shapes = [p.shape for p in params]
    sizes = [int(np.prod(s)) for s in shapes]

    def total(theta):
        parts, start = [], 0
        for s, n in zip(shapes, sizes, strict=True):
            parts.append(theta[start : start + n].reshape(s))
            start += n
        value = 0.0
        for X, y in data:
            f = model(parts, torch.from_numpy(X))
            value = value + _torch_loss(loss, f, torch.from_numpy(np.asarray(y)))
        return value

    theta = torch.from_numpy(np.concatenate([np.ravel(p) for p in params]))
    return torch.func.hessian(total)(theta).numpy()


def _torch_loss(loss, f, y):
    """The loss's sum over the data (normalized by the caller's reduction)."""
    if isinstance(loss, cl.CrossEntropyLoss):
        return torch.nn.functional.cross_entropy(f, y, reduction="sum")
    return torch.sum((f - y) ** 2)


def _normalization(loss, data, outputs):
    N = sum(X.shape[0] for X, _ in data)
    if loss.reduction == "sum":
        return 1.0
    return 1.0 / N if isinstance(loss, cl.CrossEntropyLoss) else 1.0 / (N * outputs)


# -- the Hessian diagonal ---------------------------------------------------------------


@needs_layers
@pytest.mark.parametrize("loss", [cl.CrossEntropyLoss(), cl.MSELoss()], ids=["ce", "mse"])
def test_hessian_diagonal_of_a_resnet_with_projection_batch_norm_and_pooling(loss):
    model = resnet(0)
    params = perturbed(model, 1)
    rng = np.random.default_rng(2)
    X = rng.standard_normal((5, 2, 4, 4))
    y = (
        rng.integers(0, 3, 5)
        if isinstance(loss, cl.CrossEntropyLoss)
        else rng.standard_normal((5, 3))
    )
    data = [(X[:2], y[:2]), (X[2:], y[2:])]
    reference = _normalization(loss, data, 3) * np.diag(torch_hessian(model, params, data, loss))
    ours = cl.HessianDiagonalLinearOperator(model, loss, params, data).diagonal()
    assert_close(ours, reference)
    dense = cl.HessianLinearOperator(model, loss, params, data).to_dense()
    assert_close(ours, np.diag(dense))
    # the cross terms matter: without them the first layers' entries would differ
    ggn = np.diag(cl.GGNLinearOperator(model, loss, params, data).to_dense())
    assert np.abs(ggn - reference).max() > 1e-3 * np.abs(reference).max()


@pytest.mark.parametrize("shortcut", [False, True], ids=["identity", "projection"])
def test_hessian_diagonal_through_nested_blocks_and_a_block_that_comes_first(shortcut):
    inner = nn.Residual(nn.Sequential(nn.Linear(3, 3), nn.Sigmoid()), nn.Linear(3, 3, bias=False))
    block = nn.Residual(
        nn.Sequential(nn.Linear(3, 3), nn.Tanh(), inner, nn.Linear(3, 3)),
        nn.Linear(3, 3, bias=False) if shortcut else None,
    )
    for model in (
        nn.Sequential(nn.Linear(2, 3), nn.Tanh(), block, nn.Tanh(), nn.Linear(3, 2)),
        nn.Sequential(block, nn.Tanh(), nn.Linear(3, 2)),  # the walk stops inside the block
    ):
        params = perturbed(model, 3)
        rng = np.random.default_rng(4)
        d_in = 2 if model.chain()[0][1].param_shapes()[0] == (3, 2) else 3
        data = [(rng.standard_normal((4, d_in)), rng.standard_normal((4, 2)))]
        loss = cl.MSELoss(reduction="sum")
        reference = np.diag(torch_hessian(model, params, data, loss))
        ours = cl.HessianDiagonalLinearOperator(model, loss, params, data).diagonal()
        assert_close(ours, reference)


_REFERENCES: dict = {}


@needs_layers
@backends_and_dtypes()
def test_hessian_diagonal_through_residual_blocks_on_every_backend(backend, dtype):
    """One-pixel images keep it small (JAX compiles every new shape)."""
    model = resnet(5, pixels=False)
    params = perturbed(model, 6)
    rng = np.random.default_rng(7)
    data = [(rng.standard_normal((3, 2, 1, 1)), rng.integers(0, 3, 3))]
    loss = cl.CrossEntropyLoss()
    if "backend" not in _REFERENCES:  # one reference for every backend and dtype
        _REFERENCES["backend"] = np.diag(torch_hessian(model, params, data, loss))
    reference = _normalization(loss, data, 3) * _REFERENCES["backend"]
    to = backend.asarray
    ours = cl.HessianDiagonalLinearOperator(
        model,
        loss,
        [to(p, dtype) for p in params],
        [(to(X, dtype), to(y)) for X, y in data],
        check_deterministic=False,
    ).diagonal()
    assert str(ours.dtype).endswith(dtype)
    assert_close(backend.to_numpy(ours), reference, rtol=1e-10 if dtype == "float64" else 1e-3)


# -- the Kronecker-factored Hessian ----------------------------------------------------------


def _layer_blocks(op, params, separate):
    """Flat indices of each block of the operator: each tapped layer's [W, b] entries, or
    its weight's and its bias's apart."""
    starts = np.cumsum([0] + [p.size for p in params])
    for layer in op.layers:
        members = [i for i in (layer.weight_index, layer.bias_index) if i is not None]
        for group in [[i] for i in members] if separate else [members]:
            yield np.concatenate([np.arange(starts[i], starts[i + 1]) for i in group])


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize(
    "name", ["mlp_identity", "mlp_projection", "nested_block_first", "one_pixel_resnet"]
)
def test_kronecker_factored_hessian_is_exact_on_a_single_datum(name, separate):
    """By definition the recursion is the per-datum one for a single datum: every block,
    those of the layers before a residual block (which need its cross terms) included."""
    if name == "one_pixel_resnet":
        if not HAS_LAYERS:
            pytest.skip("needs batch norm and pooling layers")
        model, x_shape, loss = resnet(8, pixels=False), (1, 2, 1, 1), cl.CrossEntropyLoss()
        y, outputs = np.array([2]), 3
    elif name == "nested_block_first":  # the walk stops inside the outer block
        inner = nn.Residual(nn.Sequential(nn.Linear(3, 3), nn.Sigmoid()))
        block = nn.Residual(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), inner), nn.Linear(3, 3))
        model, x_shape, loss = (
            nn.Sequential(block, nn.Tanh(), nn.Linear(3, 2)),
            (1, 3),
            cl.MSELoss(),
        )
        y, outputs = np.random.default_rng(9).standard_normal((1, 2)), 2
    else:
        model, x_shape, loss = residual_mlp(name == "mlp_projection"), (1, 2), cl.MSELoss()
        y, outputs = np.random.default_rng(9).standard_normal((1, 2)), 2
    params = perturbed(model, 10)
    data = [(np.random.default_rng(11).standard_normal(x_shape), y)]
    op = KFACHessianLinearOperator(model, loss, params, data, separate_weight_and_bias=separate)
    hessian = _normalization(loss, data, outputs) * torch_hessian(model, params, data, loss)
    ours = op.to_dense()
    names = [layer.name for layer in op.layers]
    assert names[0].startswith("0") and any(".block." in n for n in names)
    for ix in _layer_blocks(op, params, separate):
        assert_close(ours[np.ix_(ix, ix)], hessian[np.ix_(ix, ix)])


@pytest.mark.parametrize("shortcut", [False, True], ids=["identity", "projection"])
def test_kronecker_factored_hessian_averaging_scheme_through_a_block_against_numpy(shortcut):
    """The documented recursion over many data, through the block, written out in NumPy.

    At the block's input: the block path's and the shortcut's pulled-back factors plus
    ``M_b^T R M_s + M_s^T R M_b``, with ``M_b`` the block's Jacobian averaged over the
    data and ``M_s`` the projection (the identity without one).
    """
    model = residual_mlp(shortcut)
    params = perturbed(model, 12, scale=0.5)
    rng = np.random.default_rng(13)
    N = 9
    X, Y = rng.standard_normal((N, 2)), rng.standard_normal((N, 2))
    loss = cl.MSELoss()
    op = KFACHessianLinearOperator(model, loss, params, [(X[:4], Y[:4]), (X[4:], Y[4:])])
    if shortcut:
        W0, b0, W1, b1, W2, b2, Ws, W3, b3 = params
    else:
        W0, b0, W1, b1, W2, b2, W3, b3 = params
        Ws = np.eye(3)
    c = 1.0 / (N * 2)
    z = np.tanh(X @ W0.T + b0)
    u = z @ W1.T + b1
    v = np.tanh(u)
    r = v @ W2.T + b2 + z @ Ws.T
    f = r @ W3.T + b3
    d1_u, d2_u = 1 - v**2, -2 * v * (1 - v**2)
    d1_z, d2_z = 1 - z**2, -2 * z * (1 - z**2)
    # gradients of the normalized loss
    g_r = c * 2 * (f - Y) @ W3
    g_v = g_r @ W2
    g_u = d1_u * g_v
    g_z = g_r @ Ws + g_u @ W1
    # the factors, from the outputs back
    B3 = c * N * 2 * np.eye(2)
    R = W3.T @ B3 @ W3
    B_block0 = (W2.T @ R @ W2) * (d1_u.T @ d1_u / N) + np.diag(np.sum(d2_u * g_v, axis=0))
    M_b = np.mean([W2 @ np.diag(d1_u[n]) @ W1 for n in range(N)], axis=0)
    cross = M_b.T @ R @ Ws + Ws.T @ R @ M_b
    H_z = W1.T @ B_block0 @ W1 + Ws.T @ R @ Ws + cross
    B0 = H_z * (d1_z.T @ d1_z / N) + np.diag(np.sum(d2_z * g_z, axis=0))
    expected = {"3": B3, "2.block.2": R, "2.block.0": B_block0, "0": B0}
    if shortcut:
        expected["2.shortcut"] = R
    for name, B in expected.items():
        assert_close(op.output_factors[name], B)
    assert_close(op.input_factors["0"], X.T @ X / N)
    assert_close(op.input_factors["2.block.0"], z.T @ z / N)
    assert_close(op.input_factors["2.block.2"], v.T @ v / N)
    # the cross terms matter: without them the first layer's factor would differ
    without = (W1.T @ B_block0 @ W1 + Ws.T @ R @ Ws) * (d1_z.T @ d1_z / N)
    assert (
        np.abs(without + np.diag(np.sum(d2_z * g_z, axis=0)) - B0).max() > 1e-3 * np.abs(B0).max()
    )


@needs_layers
def test_kronecker_factored_hessian_of_a_resnet_with_pixels_is_symmetric_and_covers_it():
    model = resnet(14)
    params = perturbed(model, 15)
    rng = np.random.default_rng(16)
    data = [(rng.standard_normal((4, 2, 4, 4)), rng.standard_normal((4, 3)))]
    loss = cl.MSELoss()
    op = KFACHessianLinearOperator(model, loss, params, data)
    dense = op.to_dense()
    assert dense.shape == (sum(p.size for p in params),) * 2
    assert_close(dense, dense.T)
    covered = sorted(
        i for layer in op.layers for i in (layer.weight_index, layer.bias_index) if i is not None
    )
    assert covered == list(range(len(params)))
    # the last layer's blocks are exact: the squared error's Hessian is the same for all
    hessian = cl.HessianLinearOperator(model, loss, params, data).to_dense()
    starts = np.cumsum([0] + [p.size for p in params])
    for i in (len(params) - 2, len(params) - 1):
        ix = np.arange(starts[i], starts[i + 1])
        assert_close(dense[np.ix_(ix, ix)], hessian[np.ix_(ix, ix)])


@needs_layers
@backends_and_dtypes()
def test_kronecker_factored_hessian_through_blocks_on_every_backend(backend, dtype):
    """A single datum: the operator is the exact Hessian's block diagonal over the layers."""
    model = resnet(17, pixels=False)
    params = perturbed(model, 18)
    rng = np.random.default_rng(19)
    data = [(rng.standard_normal((1, 2, 1, 1)), np.array([1]))]
    loss = cl.CrossEntropyLoss()
    if "kfac_hessian" not in _REFERENCES:  # one reference for every backend and dtype
        _REFERENCES["kfac_hessian"] = torch_hessian(model, params, data, loss)
    hessian = _normalization(loss, data, 3) * _REFERENCES["kfac_hessian"]
    to = backend.asarray
    op = KFACHessianLinearOperator(
        model,
        loss,
        [to(p, dtype) for p in params],
        [(to(X, dtype), to(y)) for X, y in data],
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    reference = np.zeros_like(hessian)
    for ix in _layer_blocks(op, params, separate=False):
        reference[np.ix_(ix, ix)] = hessian[np.ix_(ix, ix)]
    V = rng.standard_normal((op.shape[1], 2))
    rtol = 1e-10 if dtype == "float64" else 1e-3
    assert_close(backend.to_numpy(op @ to(V, dtype)), reference @ V, rtol)
