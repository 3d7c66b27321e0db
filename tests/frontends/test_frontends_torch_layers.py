"""The layer protocol of TorchModel: Hessian diagonal and Kronecker-factored Hessian.

References are independent of curvlinops' operators: the exact Hessian of the loss over
all data from ``torch.func.hessian`` of a flat-parameter function written in PyTorch,
its diagonal and its layer blocks, and the averaging scheme of the Kronecker-factored
Hessian written out in NumPy. The native model with the same weights must agree too.
"""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest

import curvlinops as cl
from curvlinops import MissingLayerRuleError, MissingTierError, nn
from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator

torch = pytest.importorskip("torch")

from curvlinops.frontends.torch import TorchModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

#: name -> (torch module, native layer)
ACTIVATIONS = {
    "tanh": (torch.nn.Tanh, nn.Tanh),
    "sigmoid": (torch.nn.Sigmoid, nn.Sigmoid),
    "softplus": (lambda: torch.nn.Softplus(beta=2.0), lambda: nn.Softplus(beta=2.0)),
    "gelu": (lambda: torch.nn.GELU("tanh"), lambda: nn.GELU("tanh")),
    "elu": (lambda: torch.nn.ELU(0.7, inplace=True), lambda: nn.ELU(0.7)),
    "relu": (lambda: torch.nn.ReLU(inplace=True), nn.ReLU),
    "leaky": (lambda: torch.nn.LeakyReLU(0.1), lambda: nn.LeakyReLU(0.1)),
}
BATCHES = (3, 1, 4)


def _nets(activation, widths=(6, 4, 4, 3), flatten=True):
    """The same network as torch.nn.Sequential and curvlinops.nn.Sequential."""
    make_torch, make_native = ACTIVATIONS[activation]
    torch_layers = [torch.nn.Flatten()] if flatten else []
    native_layers = [nn.Flatten()] if flatten else []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        torch_layers.append(torch.nn.Linear(d_in, d_out, bias=i != 1))
        native_layers.append(nn.Linear(d_in, d_out, bias=i != 1))
        if i < len(widths) - 2:
            torch_layers += [make_torch(), torch.nn.Identity(), torch.nn.Dropout(0.3)]
            native_layers += [make_native(), nn.Identity(), nn.Identity()]
    net = torch.nn.Sequential(*torch_layers).double().eval()
    native = nn.Sequential(*native_layers)
    params = [1.3 * p for p in native.init(5, xp=npx, dtype=npx.float64)]
    with torch.no_grad():
        for p, value in zip(net.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(value))
    return net, native, params


def _data(loss_name, seed=0, flatten=True):
    rng = np.random.default_rng(seed)
    n = sum(BATCHES)
    X = rng.normal(size=(n, 2, 3) if flatten else (n, 6))
    y = rng.integers(0, 3, size=n) if loss_name == "ce" else rng.normal(size=(n, 3))
    out, start = [], 0
    for size in BATCHES:
        out.append((X[start : start + size], y[start : start + size]))
        start += size
    return X, y, out


def _loss(loss_name, reduction="mean"):
    if loss_name == "ce":
        return cl.CrossEntropyLoss(reduction=reduction)
    return cl.MSELoss(reduction=reduction)


def _torch_hessian(net, loss_name, X, y, reduction="mean"):
    """The exact Hessian over all data by torch.func.hessian of a flat-parameter loss."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [int(np.prod(s)) for s in shapes]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    X, y = torch.from_numpy(X), torch.from_numpy(y)

    def loss(flat):
        pieces = torch.split(flat, sizes)
        params = {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        out = torch.func.functional_call(net, params, (X,))
        if loss_name == "ce":
            return torch.nn.functional.cross_entropy(out, y, reduction=reduction)
        return torch.nn.functional.mse_loss(out, y, reduction=reduction)

    return torch.func.hessian(loss)(theta).numpy()


def _groups(native):
    """Parameter indices of each Linear layer (weight, bias) for block comparisons."""
    groups, start = [], 0
    for _, layer in native.chain():
        n = len(layer.param_shapes())
        if n:
            groups.extend([[start]] + ([[start + 1]] if n > 1 else []))
        start += n
    return groups


def _indices(params, group):
    offsets = np.cumsum([0] + [p.size for p in params])
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in group])


def _to_torch(data):
    return [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in data]


@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_hessian_diagonal_equals_torch_func_hessian_diagonal(activation, loss_name):
    net, native, params = _nets(activation)
    X, y, data = _data(loss_name, seed=1)
    model = TorchModel(net)
    loss = _loss(loss_name)
    D = cl.HessianDiagonalLinearOperator(model, loss, model.params, _to_torch(data))
    reference = np.diag(_torch_hessian(net, loss_name, X, y))
    got = D.diagonal()
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), reference, rtol=1e-10, atol=1e-12)
    native_diagonal = cl.HessianDiagonalLinearOperator(native, loss, params, data).diagonal()
    np.testing.assert_allclose(got.numpy(), native_diagonal, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("activation", ["tanh", "softplus", "elu"])
def test_kfac_hessian_on_one_datum_equals_the_torch_func_hessian_blocks(activation, loss_name):
    net, native, params = _nets(activation)
    X, y, _ = _data(loss_name, seed=2)
    X, y = X[:1], y[:1]
    model = TorchModel(net)
    loss = _loss(loss_name, "sum")
    K = KFACHessianLinearOperator(
        model, loss, model.params, [(torch.from_numpy(X), torch.from_numpy(y))]
    )
    dense = K.to_dense().numpy()
    H = _torch_hessian(net, loss_name, X, y, reduction="sum")
    for group in _groups(native):
        ix = _indices(params, group)
        np.testing.assert_allclose(dense[np.ix_(ix, ix)], H[np.ix_(ix, ix)], rtol=1e-9, atol=1e-12)
    native_dense = KFACHessianLinearOperator(native, loss, params, [(X, y)]).to_dense()
    np.testing.assert_allclose(dense, native_dense, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("separate", [True, False])
def test_kfac_hessian_over_batches_equals_native_and_the_numpy_averaging_scheme(separate):
    rng = np.random.default_rng(3)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    net = net.double()
    native = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = [1.5 * p for p in native.init(7, xp=npx, dtype=npx.float64)]
    with torch.no_grad():
        for p, value in zip(net.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(value))
    N = 7
    X, y = rng.normal(size=(N, 3)), rng.normal(size=(N, 2))
    data = [(X[:3], y[:3]), (X[3:], y[3:])]
    model, loss = TorchModel(net), cl.MSELoss()
    K = KFACHessianLinearOperator(
        model, loss, model.params, _to_torch(data), separate_weight_and_bias=separate
    )
    native_K = KFACHessianLinearOperator(
        native, loss, params, data, separate_weight_and_bias=separate
    )
    np.testing.assert_allclose(K.to_dense().numpy(), native_K.to_dense(), rtol=1e-12, atol=1e-14)
    # the documented recursion on data-set averages, in NumPy
    W0, b0, W1, b1 = params
    h = X @ W0.T + b0
    a1 = np.tanh(h)
    f = a1 @ W1.T + b1
    c = 1.0 / (N * 2)
    B1 = c * N * 2 * np.eye(2)
    d1, d2 = 1 - a1**2, -2 * a1 * (1 - a1**2)
    B0 = (W1.T @ B1 @ W1) * (d1.T @ d1 / N) + np.diag(c * np.sum(d2 * (2 * (f - y) @ W1), axis=0))
    np.testing.assert_allclose(K.output_factors["0"].numpy(), B0, rtol=1e-12)
    np.testing.assert_allclose(K.output_factors["2"].numpy(), B1, rtol=1e-12)
    A0 = X.T @ X / N
    if not separate:
        ones = np.ones((N, 1))
        A0 = np.hstack([X, ones]).T @ np.hstack([X, ones]) / N
    np.testing.assert_allclose(K.input_factors["0"].numpy(), A0, rtol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_hessian_diagonal_with_a_shared_axis_equals_torch_func(reduction):
    net, _, _ = _nets("softplus", widths=(3, 4, 4, 3), flatten=False)
    rng = np.random.default_rng(6)
    X, y = rng.normal(size=(5, 2, 3)), rng.normal(size=(5, 2, 3))
    model = TorchModel(net)
    data = _to_torch([(X[:3], y[:3]), (X[3:], y[3:])])
    loss = cl.MSELoss(reduction=reduction)
    D = cl.HessianDiagonalLinearOperator(model, loss, model.params, data).diagonal()
    reference = np.diag(_torch_hessian(net, "mse", X, y, reduction=reduction))
    np.testing.assert_allclose(D.numpy(), reference, rtol=1e-10, atol=1e-12)


def test_frozen_layer_is_walked_through_but_not_tapped():
    net, native, params = _nets("tanh", flatten=False)
    net[0].weight.requires_grad_(False)
    net[0].bias.requires_grad_(False)
    X, y, data = _data("ce", seed=4, flatten=False)
    model = TorchModel(net)
    lin = model.linearize(model.params, torch.from_numpy(X))
    layers = lin.layers()
    assert layers[0].param_indices == () and layers[0].tap() is None
    assert [la.tap().weight_index for la in layers if la.tap() is not None] == [0, 1]
    loss = cl.CrossEntropyLoss()
    D = cl.HessianDiagonalLinearOperator(model, loss, model.params, _to_torch(data))
    full = cl.HessianDiagonalLinearOperator(native, loss, params, data).diagonal()
    skip = params[0].size + params[1].size
    np.testing.assert_allclose(D.diagonal().numpy(), full[skip:], rtol=1e-12, atol=1e-14)


def test_torch_model_passes_the_layer_protocol_check():
    from curvlinops.verify import check_layer_protocol, verify_model

    net, _, _ = _nets("gelu")
    model = TorchModel(net)
    X = torch.from_numpy(_data("ce", seed=5)[0])
    report = check_layer_protocol(model, model.params, X)
    assert report.passed, report
    assert [r.name for r in verify_model(model, model.params, X)][-1] == "layer_protocol"


def test_taps_carry_the_matrix_shape():
    net, _, _ = _nets("tanh", flatten=False)
    model = TorchModel(net)
    lin = model.linearize(model.params, torch.ones(2, 6, dtype=torch.float64))
    taps = lin.layer_taps(torch.ones(2, 3, 1, dtype=torch.float64))
    assert [t.matrix_shape for t in taps] == [(4, 6), (4, 4), (3, 4)]
    protocol = [la.tap() for la in lin.layers() if la.tap() is not None]
    assert [(t.name, t.weight_index, t.bias_index, t.matrix_shape) for t in protocol] == [
        (t.name, t.weight_index, t.bias_index, t.matrix_shape) for t in taps
    ]


# -- what the protocol cannot walk ------------------------------------------------------


class _Gated(torch.nn.Module):
    """A product of two paths: no chain, and no residual sum either."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)) * x)


def test_unsupported_modules_and_non_chains_raise_clear_errors():
    X, y = torch.ones(4, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
    loss = cl.MSELoss()
    norm = torch.nn.Sequential(
        torch.nn.Linear(3, 3),
        torch.nn.LayerNorm(3, elementwise_affine=False),
        torch.nn.Linear(3, 2),
    ).double()
    model = TorchModel(norm)
    with pytest.raises(
        MissingLayerRuleError, match=r"layer '1' is torch.nn.LayerNorm.*HessianLinearOperator"
    ):
        cl.HessianDiagonalLinearOperator(model, loss, model.params, [(X, y)])
    with pytest.raises(TypeError, match=r"layer '1' is torch.nn.LayerNorm.*KFACLinearOperator"):
        KFACHessianLinearOperator(model, loss, model.params, [(X, y)])
    model = TorchModel(_Gated().double())
    with pytest.raises(
        ValueError, match=r"input of module 'fc2' is not the output.*'act'.*uses operator\.mul"
    ):
        cl.HessianDiagonalLinearOperator(model, loss, model.params, [(X, y)])
    shared = torch.nn.Linear(3, 3)
    model = TorchModel(torch.nn.Sequential(shared, torch.nn.Tanh(), shared).double())
    with pytest.raises(ValueError, match="more than once"):
        model.linearize(model.params, X).layers()


def test_jax_and_callable_models_do_not_offer_the_layer_protocol():
    from curvlinops.frontends import CallableModel

    linear = nn.Linear(3, 2)
    model = CallableModel(
        forward=lambda p, x: linear(p, x),
        jvp=lambda p, x, t: linear.linearize(p, x).jvp(t),
        vjp=lambda p, x, u: linear.linearize(p, x).vjp(u),
    )
    data = [(np.ones((2, 3)), np.ones((2, 2)))]
    with pytest.raises(MissingTierError, match="needs the layer protocol"):
        cl.HessianDiagonalLinearOperator(model, cl.MSELoss(), linear.init(0, xp=npx), data)
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from curvlinops.frontends.jax import JaxModel

    jax_model = JaxModel(lambda p, x: x @ p[0].T)
    with pytest.raises(MissingTierError, match="layer protocol"):
        jax_model.linearize([jnp.ones((2, 3))], jnp.ones((4, 3))).layers()
