"""TorchModel on convolutional and residual networks: conv taps, K-FAC, diagonals, errors.

References are independent of curvlinops' tap code: the patches of a convolution come
from ``torch.nn.functional.unfold`` (checked against the module's own output), output
gradients from ``torch.autograd.grad`` of the convolution's output, the loss Hessians
from ``torch.func.hessian`` of PyTorch's loss, and K-FAC's factors are written out
from these by the definitions in :class:`~curvlinops.KFACLinearOperator`'s docstring.
Dense GGN and empirical Fisher matrices come from the tier-1 operators (autograd
products, not taps). The native ``curvlinops.nn`` network with the same weights must
give the same K-FAC and diagonals.

torchvision's ``resnet18`` (float64, evaluation mode; the tests skip where torchvision
is not importable, as in CI): K-FAC's factors of its 20 convolutions and ``fc`` by the
same ``F.unfold`` and autograd definitions, and over all its parameters on one image
K-FAC's ``fc`` and batch normalization blocks and the GGN diagonal against
``J^T H J`` from autograd Jacobians of the logits and ``torch.func.hessian`` of the
cross-entropy (never a dense 11M x 11M matrix: blocks, a few products, some tensors'
diagonals).

Tests of native layers other workers add (batch normalization, pooling) skip while
``curvlinops.nn`` lacks them; the ResNet tests that need K-FAC on batch normalization's
elementwise taps skip while the curvature operators do not cover those taps (a probe
on a native network says which).
"""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest

import curvlinops as cl
from curvlinops import nn, to_numpy

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from curvlinops.frontends.torch import TorchModel  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    # torch.func.hessian's jvp in torch >= 2.14 (the venv with torchvision)
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
    # PyTorch's own note on padding="same" with an even kernel
    pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
]

DTYPE = torch.float64
BATCHES = (3, 2)
CONVS = (torch.nn.Conv1d, torch.nn.Conv2d)


# -- networks and data ------------------------------------------------------------------


def _seeded(net, seed):
    """``net`` in float64 and evaluation mode, with parameters drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    net = net.to(DTYPE).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=generator, dtype=DTYPE))
    return net


def _cnn2d():
    """Conv2d (stride, padding, dilation) - ReLU - Conv2d ('same', even kernel) - Linear."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        torch.nn.ReLU(),
        torch.nn.Conv2d(3, 2, 2, padding="same", bias=False),
        torch.nn.Flatten(),
        torch.nn.Linear(48, 3),
    )
    return _seeded(net, 0), (2, 7, 6)


def _cnn1d():
    """Conv1d (stride, padding) - Tanh - Conv1d (dilation, 'valid') - Linear."""
    net = torch.nn.Sequential(
        torch.nn.Conv1d(2, 3, 3, stride=2, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv1d(3, 2, 2, dilation=2, padding="valid"),
        torch.nn.Flatten(),
        torch.nn.Linear(6, 3),
    )
    return _seeded(net, 1), (2, 9)


NETWORKS = {"conv2d": _cnn2d, "conv1d": _cnn1d}


class _Block(torch.nn.Module):
    """conv-BN-ReLU-conv-BN plus a 1x1 projection of the input, then ReLU."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c_out)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c_out)
        self.proj = torch.nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        self.relu2 = torch.nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.proj(x))


class _ResNet(torch.nn.Module):
    """A small ResNet: stem conv-BN-ReLU, one residual block, global pooling, Linear."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU()
        self.block = _Block(4, 6, stride=2)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.flatten = torch.nn.Flatten()
        self.fc = torch.nn.Linear(6, classes)

    def forward(self, x):
        x = self.block(self.relu(self.bn(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


def _with_running_statistics(net, seed):
    """``net`` with random running statistics in its batch normalizations (in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                shape = m.running_mean.shape
                m.running_mean.copy_(torch.randn(shape, generator=generator, dtype=DTYPE))
                m.running_var.copy_(0.5 + torch.rand(shape, generator=generator, dtype=DTYPE))
    return net


def _resnet():
    return _with_running_statistics(_seeded(_ResNet(), 2), 3)


def _batches(shape, loss_name, seed=0, classes=3, outputs=None):
    """Batches of sizes ``BATCHES`` as torch tensors, and all data."""
    generator = torch.Generator().manual_seed(seed)
    n = sum(BATCHES)
    X = torch.randn((n, *shape), generator=generator, dtype=DTYPE)
    if loss_name == "ce":
        y = torch.randint(0, classes, (n,), generator=generator)
    else:
        y = torch.randn((n, *(outputs or (classes,))), generator=generator, dtype=DTYPE)
    data, start = [], 0
    for size in BATCHES:
        data.append((X[start : start + size], y[start : start + size]))
        start += size
    return X, y, data


def _loss(loss_name):
    return cl.CrossEntropyLoss() if loss_name == "ce" else cl.MSELoss()


# -- independent references -------------------------------------------------------------


def _explicit_pads(conv):
    """``(before, after)`` zeros per spatial axis, as PyTorch pads ``conv``'s input."""
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    if conv.padding == "valid":
        return [(0, 0)] * len(conv.kernel_size)
    return [(p, p) for p in conv.padding]


def _unfold(conv, x):
    """The patches ``(N, S, C_in * prod(kernel))`` of ``conv``'s input by ``F.unfold``."""
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    pads = _explicit_pads(conv)
    if isinstance(conv, torch.nn.Conv1d):  # as an image of height one
        x = x[:, :, None, :]
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
        pads = [(0, 0), *pads]
    x = F.pad(x, pads[1] + pads[0])  # F.pad lists the last axis first
    return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)


def _reference_taps(net, X, cotangents, names=None):
    """``{name: (inputs, output gradients)}`` of every Conv and Linear module of ``net``.

    Inputs ``(N, S, D_in)`` (patches, by ``F.unfold``) or ``(N, D_in)``; output
    gradients ``(N, S, D_out, M)`` or ``(N, D_out, M)``, one autograd gradient of
    ``sum(outputs * cotangents[..., m])`` with respect to the module's output per
    column ``m``. The patches are checked against the module's output.
    """
    layers = [
        (n, m)
        for n, m in net.named_modules()
        if isinstance(m, (*CONVS, torch.nn.Linear)) and (names is None or n in names)
    ]
    seen = {}
    handles = [
        m.register_forward_hook(lambda _m, args, out, n=n: seen.__setitem__(n, (args[0], out)))
        for n, m in layers
    ]
    try:
        with torch.enable_grad():
            outputs = net(X)
    finally:
        for handle in handles:
            handle.remove()
    columns = [
        torch.autograd.grad(
            outputs, [seen[n][1] for n, _ in layers], cotangents[..., m], retain_graph=True
        )
        for m in range(cotangents.shape[-1])
    ]
    refs = {}
    for i, (name, module) in enumerate(layers):
        x, out = seen[name]
        g = torch.stack([grads[i] for grads in columns], dim=-1)  # (N, D_out, *spatial, M)
        if isinstance(module, torch.nn.Linear):
            refs[name] = (x.detach(), g)
            continue
        patches = _unfold(module, x.detach())
        N, C, M = g.shape[0], g.shape[1], g.shape[-1]
        # the reference patches times the weight are the module's outputs
        rows = patches @ module.weight.detach().reshape(C, -1).T
        if module.bias is not None:
            rows = rows + module.bias.detach()
        torch.testing.assert_close(rows, out.detach().reshape(N, C, -1).transpose(1, 2))
        refs[name] = (patches, g.reshape(N, C, -1, M).permute(0, 2, 1, 3))
    return refs


def _loss_factor(loss_name, outputs, y):
    """Columns ``S_n`` with ``S_n S_n^T`` the Hessian of the loss of datum n (unreduced)."""

    def single(f, target):
        if loss_name == "ce":
            return F.cross_entropy(f[None], target[None], reduction="sum")
        return ((f - target) ** 2).sum()

    factors = []
    for f, target in zip(outputs.detach(), y, strict=True):
        H = torch.func.hessian(lambda f, target=target: single(f, target))(f)
        values, vectors = torch.linalg.eigh(H)
        factors.append(vectors * values.clamp(min=0).sqrt())
    return torch.stack(factors)  # (N, C, C)


def _loss_gradient(loss_name, outputs, y):
    """Per-datum gradients of the unreduced loss, ``(N, C, 1)``."""
    f = outputs.detach().requires_grad_(True)
    if loss_name == "ce":
        value = F.cross_entropy(f, y, reduction="sum")
    else:
        value = ((f - y) ** 2).sum()
    return torch.autograd.grad(value, f)[0][..., None]


def _reference_kfac_factors(net, data, loss_name, fisher_type, approx):
    """``{name: (B, A)}`` by the definitions of KFACLinearOperator's docstring.

    ``A = mean over items of a a^T``; ``B = c sum over items and columns of g g^T``
    with ``c`` the loss's normalization (1 / N for the mean cross-entropy, 1 / (N C)
    for the mean squared error); "reduce" averages the inputs and sums the output
    gradients over the positions first.
    """
    sums = {}
    num_data = sum(int(X.shape[0]) for X, _ in data)
    for X, y in data:
        with torch.no_grad():
            outputs = net(X)
        if fisher_type == "type-2":
            cotangents = _loss_factor(loss_name, outputs, y)
        else:
            cotangents = _loss_gradient(loss_name, outputs, y)
        for name, (a, g) in _reference_taps(net, X, cotangents).items():
            if a.ndim == 3 and approx == "reduce":
                a, g = a.mean(dim=1), g.sum(dim=1)
            a = a.reshape(-1, a.shape[-1])
            G = torch.movedim(g, -1, -2).reshape(-1, g.shape[-2])
            aa, gg, count = sums.get(name, (0, 0, 0))
            sums[name] = (aa + a.T @ a, gg + G.T @ G, count + a.shape[0])
    c = 1.0 / num_data if loss_name == "ce" else 1.0 / (num_data * outputs.shape[-1])
    return {name: (c * gg, aa / count) for name, (aa, gg, count) in sums.items()}


def _restricted(dense, model, names):
    """The block of ``dense`` over the parameters ``names`` (in the model's order)."""
    sizes = [int(np.prod(shape)) for shape in model.expected_param_shapes()]
    starts = np.cumsum([0, *sizes])
    index = np.concatenate(
        [np.arange(starts[i], starts[i + 1]) for i, n in enumerate(model.param_names) if n in names]
    )
    return dense[np.ix_(index, index)]


# -- conv taps ----------------------------------------------------------------------------


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_conv_taps_are_unfolded_inputs_and_autograd_output_gradients(network):
    net, shape = NETWORKS[network]()
    X, _, _ = _batches(shape, "ce")
    model = TorchModel(net)
    generator = torch.Generator().manual_seed(4)
    cotangents = torch.randn((X.shape[0], 3, 2), generator=generator, dtype=DTYPE)
    taps = {t.name: t for t in model.linearize(model.params, X).layer_taps(cotangents)}
    refs = _reference_taps(net, X, cotangents)
    assert sorted(taps) == sorted(refs) == ["0", "2", "4"]
    for name, (inputs, grads) in refs.items():
        module = net.get_submodule(name)
        torch.testing.assert_close(taps[name].inputs, inputs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(taps[name].output_grads, grads, rtol=1e-12, atol=1e-12)
        assert taps[name].kind == "matrix"
        assert taps[name].matrix_shape == (module.weight.shape[0], inputs.shape[-1])
    bias = None if net[2].bias is None else 3
    assert (taps["2"].weight_index, taps["2"].bias_index) == (2, bias)


@pytest.mark.parametrize(
    "conv",
    [
        lambda: torch.nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
        lambda: torch.nn.Conv2d(2, 4, 3, padding="same", dilation=2, bias=False),
        lambda: torch.nn.Conv2d(2, 3, 4, padding="same"),
        lambda: torch.nn.Conv2d(2, 4, 3, stride=2, padding="valid", groups=2),
        lambda: torch.nn.Conv1d(2, 3, 4, stride=3, padding=2, dilation=1),
        lambda: torch.nn.Conv1d(2, 2, 2, padding="same", groups=2, bias=False),
    ],
    ids=["2d", "2d-same-odd", "2d-same-even", "2d-grouped", "1d", "1d-grouped-same"],
)
def test_convolutions_map_to_native_layers_computing_the_same_function(conv):
    conv = _seeded(conv(), 5)
    shape = (2, 8, 7) if isinstance(conv, torch.nn.Conv2d) else (2, 9)
    X = torch.randn((3, *shape), generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    model = TorchModel(conv)
    (layer,) = model.linearize(model.params, X).layers()
    assert isinstance(layer, nn.LinearizedNativeLayer)
    assert type(layer.layer).__name__ == type(conv).__name__
    assert layer.state["channels_first"] is True
    with torch.no_grad():
        torch.testing.assert_close(layer.layer(model.params, X), conv(X), rtol=1e-12, atol=1e-12)


def test_the_chain_records_channels_first_inputs_as_the_native_chain_does():
    torch_net, native, params, _ = _torch_and_native_cnn()
    X = np.random.default_rng(0).normal(size=(2, 2, 6, 6))
    model = TorchModel(torch_net)
    layers = model.linearize(model.params, torch.from_numpy(X)).layers()
    native_layers = native.linearize(params, X).layers()
    got = [la.state["channels_first"] for la in layers]
    assert got == [la.state["channels_first"] for la in native_layers]
    assert got == [True, True, True, False]
    # a module without a native equivalent states no layout: the one before holds
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 2, 3), torch.nn.Softsign(), torch.nn.Flatten(), torch.nn.Linear(32, 2)
    ).to(DTYPE)
    model = TorchModel(net)
    layers = model.linearize(model.params, torch.from_numpy(X)).layers()
    assert not isinstance(layers[1], nn.LinearizedNativeLayer)
    assert [la.state["channels_first"] for la in (layers[0], layers[2], layers[3])] == [
        True,
        True,
        False,
    ]


# -- K-FAC --------------------------------------------------------------------------------


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("network, loss_name", [("conv2d", "ce"), ("conv1d", "mse")])
def test_kfac_factors_equal_the_factors_from_unfold_and_autograd(
    network, loss_name, fisher_type, approx
):
    net, shape = NETWORKS[network]()
    _, _, data = _batches(shape, loss_name)
    model = TorchModel(net)
    K = cl.KFACLinearOperator(
        model, _loss(loss_name), model.params, data, fisher_type=fisher_type, kfac_approx=approx
    )
    refs = _reference_kfac_factors(net, data, loss_name, fisher_type, approx)
    assert sorted(K.input_factors) == sorted(refs)
    for name, (B, A) in refs.items():
        torch.testing.assert_close(K.input_factors[name], A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(K.output_factors[name], B, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_kfac_expand_is_the_exact_ggn_of_a_convolution_followed_by_flatten(bias):
    conv = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=(1, 2), bias=bias)
    net = _seeded(torch.nn.Sequential(conv, torch.nn.Flatten()), 7)
    _, _, data = _batches((2, 6, 7), "mse", outputs=(3 * 3 * 3,))
    model = TorchModel(net)
    loss = cl.MSELoss()
    # with a bias the weight-bias cross block is exact only in the joint block [W | b]
    K = cl.KFACLinearOperator(
        model, loss, model.params, data, kfac_approx="expand", separate_weight_and_bias=not bias
    )
    G = cl.GGNLinearOperator(model, loss, model.params, data).to_dense()
    np.testing.assert_allclose(to_numpy(K.to_dense()), to_numpy(G), rtol=1e-10, atol=1e-12)


def test_kfac_reduce_is_the_exact_ggn_of_a_convolution_averaged_over_pixels():
    conv = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1)
    net = torch.nn.Sequential(conv, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    net = _seeded(net, 8)
    _, _, data = _batches((2, 6, 7), "mse")
    model = TorchModel(net)
    loss = cl.MSELoss()
    G = to_numpy(cl.GGNLinearOperator(model, loss, model.params, data).to_dense())
    dense = {
        approx: to_numpy(
            cl.KFACLinearOperator(
                model,
                loss,
                model.params,
                data,
                kfac_approx=approx,
                separate_weight_and_bias=False,
            ).to_dense()
        )
        for approx in ("expand", "reduce")
    }
    np.testing.assert_allclose(dense["reduce"], G, rtol=1e-10, atol=1e-12)
    assert not np.allclose(dense["expand"], G)  # not exact: the check has teeth


# -- diagonals ----------------------------------------------------------------------------


@pytest.mark.parametrize("network, loss_name", [("conv2d", "ce"), ("conv1d", "mse")])
def test_ggn_and_ef_diagonals_equal_the_diagonals_of_the_dense_matrices(network, loss_name):
    net, shape = NETWORKS[network]()
    _, _, data = _batches(shape, loss_name)
    model = TorchModel(net)
    loss = _loss(loss_name)
    for diagonal, dense in (
        (cl.GGNDiagonalLinearOperator, cl.GGNLinearOperator),
        (cl.EFDiagonalLinearOperator, cl.EFLinearOperator),
    ):
        got = diagonal(model, loss, model.params, data).diagonal()
        expected = torch.diagonal(dense(model, loss, model.params, data).to_dense())
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


# -- the native network with the same weights ---------------------------------------------


def _torch_and_native_cnn():
    native = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)
    )
    params = [1.5 * p for p in native.init(9, xp=npx, dtype=npx.float64)]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(27, 3),
    ).to(DTYPE)
    with torch.no_grad():
        for p, value in zip(net.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(value))
    rng = np.random.default_rng(10)
    data = [(rng.normal(size=(n, 2, 6, 6)), rng.integers(0, 3, size=n)) for n in (*BATCHES, 4)]
    return net, native, params, data


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_torch_cnn_and_the_native_network_give_the_same_kfac_and_ggn_diagonal(approx):
    net, native, params, data = _torch_and_native_cnn()
    model = TorchModel(net)
    torch_data = [(torch.from_numpy(X), torch.from_numpy(y)) for X, y in data]
    loss = cl.CrossEntropyLoss()
    K_torch = cl.KFACLinearOperator(model, loss, model.params, torch_data, kfac_approx=approx)
    K_native = cl.KFACLinearOperator(native, loss, params, data, kfac_approx=approx)
    np.testing.assert_allclose(
        to_numpy(K_torch.to_dense()), K_native.to_dense(), rtol=1e-12, atol=1e-12
    )
    D_torch = cl.GGNDiagonalLinearOperator(model, loss, model.params, torch_data).diagonal()
    D_native = cl.GGNDiagonalLinearOperator(native, loss, params, data).diagonal()
    np.testing.assert_allclose(to_numpy(D_torch), D_native, rtol=1e-12, atol=1e-12)


# -- what is refused ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_convolution_with_another_padding_mode_is_refused_by_name(mode):
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 2, 3), torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode=mode)
    ).to(DTYPE)
    with pytest.raises(
        ValueError, match=rf"'1' is a torch.nn.Conv2d with padding_mode='{mode}'.*'zeros'"
    ):
        TorchModel(net)
    # frozen, it is no tapped layer: the rest of the model is fine
    model = TorchModel(net, param_names=["0.weight", "0.bias"])
    X = torch.ones(2, 2, 7, 7, dtype=DTYPE)
    (tap,) = model.linearize(model.params, X).layer_taps(torch.ones(2, 2, 5, 5, 1, dtype=DTYPE))
    assert tap.name == "0"


def test_batch_norm_in_training_mode_is_refused_with_the_reason_and_the_remedy():
    net = _resnet().train()
    with pytest.raises(
        ValueError,
        match=r"batch normalization in training mode \(\['bn', 'block.bn1', 'block.bn2'\]\).*"
        r"couple the data points.*depend on how the data is split into batches.*"
        r"model\.eval\(\).*running statistics",
    ):
        TorchModel(net)


def test_batch_norm_switched_to_training_mode_is_refused_when_linearized():
    net = _resnet()
    model = TorchModel(net)
    X = torch.ones(2, 3, 6, 6, dtype=DTYPE)
    model.linearize(model.params, X)
    net.block.bn2.train()
    with pytest.raises(ValueError, match=r"training mode \(\['block.bn2'\]\).*model\.eval\(\)"):
        model.linearize(model.params, X)
    with pytest.raises(ValueError, match="training mode"):
        model(model.params, X)


def test_batch_norm_without_running_statistics_is_refused_in_evaluation_mode():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 2, 3), torch.nn.BatchNorm2d(2, track_running_stats=False)
    )
    with pytest.raises(
        ValueError, match=r"without running statistics \(\['1'\].*couple the data points"
    ):
        TorchModel(net.to(DTYPE).eval())


@pytest.mark.parametrize(
    "conv",
    [
        lambda: torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        lambda: torch.nn.Conv2d(4, 4, 3, padding="same", groups=4, bias=False),  # depthwise
        lambda: torch.nn.Conv1d(4, 6, 2, dilation=2, groups=2),
    ],
    ids=["2d-grouped", "2d-depthwise", "1d-grouped"],
)
def test_grouped_convolution_taps_are_unfolded_inputs_with_their_groups(conv):
    """A grouped convolution's tap: all channels' patches (group-major), the autograd
    output gradients, its groups and the weight as (C_out, C_in / G * prod(kernel))."""
    conv = _seeded(conv(), 11)
    net = torch.nn.Sequential(conv, torch.nn.Flatten())
    shape = (4, 5, 6) if isinstance(conv, torch.nn.Conv2d) else (4, 7)
    X = torch.randn((3, *shape), generator=torch.Generator().manual_seed(12), dtype=DTYPE)
    model = TorchModel(net)
    with torch.no_grad():
        F_out = net(X).shape[1]
    generator = torch.Generator().manual_seed(13)
    cotangents = torch.randn((3, F_out, 2), generator=generator, dtype=DTYPE)
    (tap,) = model.linearize(model.params, X).layer_taps(cotangents)
    patches = _unfold(conv, X)
    G, C_out = conv.groups, conv.out_channels
    assert tap.groups == G and tap.matrix_shape == (C_out, patches.shape[-1] // G)
    torch.testing.assert_close(tap.inputs, patches, rtol=1e-12, atol=1e-12)
    # group g's rows of the weight times group g's patches are the module's outputs
    W = conv.weight.detach().reshape(G, C_out // G, -1)
    d = tap.matrix_shape[1]
    rows = torch.cat([patches[..., g * d : (g + 1) * d] @ W[g].T for g in range(G)], dim=-1)
    if conv.bias is not None:
        rows = rows + conv.bias.detach()
    with torch.no_grad():
        out = conv(X)
    torch.testing.assert_close(rows.transpose(1, 2).reshape(out.shape), out)
    # output gradients: the cotangents pulled back through Flatten by autograd
    expected = cotangents.reshape(*out.shape, 2).reshape(3, C_out, -1, 2).transpose(1, 2)
    torch.testing.assert_close(tap.output_grads, expected, rtol=1e-12, atol=1e-12)


# -- the native layers other workers add ---------------------------------------------------


def _native_or_skip(name):
    native_type = getattr(nn, name, None)
    if native_type is None:
        pytest.skip(f"curvlinops.nn has no {name} yet (it is added on another branch)")
    return native_type


def _layer_after_a_conv(module, X):
    """The layer protocol's binding of ``module`` in ``Sequential(Conv2d, module)``."""
    net = torch.nn.Sequential(torch.nn.Conv2d(X.shape[1], 3, 1), module).to(DTYPE).eval()
    model = TorchModel(net)
    return model, model.linearize(model.params, X).layers()[1]


@pytest.mark.parametrize(
    "native_name, make",
    [
        ("AvgPool2d", lambda: torch.nn.AvgPool2d(3, stride=2, padding=1)),
        ("AvgPool2d", lambda: torch.nn.AvgPool2d(2)),
        ("MaxPool2d", lambda: torch.nn.MaxPool2d(3, stride=2, padding=1, dilation=1)),
        ("MaxPool2d", lambda: torch.nn.MaxPool2d(2, dilation=2)),
        ("GlobalAvgPool2d", lambda: torch.nn.AdaptiveAvgPool2d(1)),
        ("GlobalAvgPool2d", lambda: torch.nn.AdaptiveAvgPool2d((1, 1))),
    ],
)
def test_pooling_maps_to_native_layers_computing_the_same_function(native_name, make):
    native_type = _native_or_skip(native_name)
    X = torch.randn((2, 2, 7, 6), generator=torch.Generator().manual_seed(12), dtype=DTYPE)
    pool = make()
    model, layer = _layer_after_a_conv(pool, X)
    assert isinstance(layer, nn.LinearizedNativeLayer)
    assert isinstance(layer.layer, native_type)
    a = layer.state["input"]
    with torch.no_grad():
        torch.testing.assert_close(layer.layer([], a), pool(a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "native_name, make",
    [
        ("AvgPool2d", lambda: torch.nn.AvgPool2d(3, padding=1, count_include_pad=False)),
        ("AvgPool2d", lambda: torch.nn.AvgPool2d(2, ceil_mode=True)),
        ("AvgPool2d", lambda: torch.nn.AvgPool2d(2, divisor_override=3)),
        ("MaxPool2d", lambda: torch.nn.MaxPool2d(2, ceil_mode=True)),
        ("GlobalAvgPool2d", lambda: torch.nn.AdaptiveAvgPool2d(2)),
    ],
)
def test_pooling_settings_without_a_native_equivalent_are_layers_without_rules(native_name, make):
    _native_or_skip(native_name)
    X = torch.randn((2, 2, 7, 6), generator=torch.Generator().manual_seed(13), dtype=DTYPE)
    _, layer = _layer_after_a_conv(make(), X)
    assert not isinstance(layer, nn.LinearizedNativeLayer)
    assert "no layer-protocol rules" in layer.description


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    "native_name, make, shape",
    [
        ("BatchNorm2d", torch.nn.BatchNorm2d, (2, 5, 4)),
        ("BatchNorm1d", torch.nn.BatchNorm1d, (2, 6)),
    ],
)
def test_batch_norm_in_evaluation_mode_maps_to_the_native_inference_form(
    native_name, make, shape, affine
):
    native_type = _native_or_skip(native_name)
    norm = make(3, eps=1e-3, affine=affine).to(DTYPE)
    if affine:
        _seeded(norm, 14)
    _with_running_statistics(norm.eval(), 15)
    conv = torch.nn.Conv2d if len(shape) == 3 else torch.nn.Conv1d
    net = torch.nn.Sequential(conv(2, 3, 1), norm).to(DTYPE).eval()
    X = torch.randn((4, *shape), generator=torch.Generator().manual_seed(16), dtype=DTYPE)
    model = TorchModel(net)
    lin = model.linearize(model.params, X)
    layer = lin.layers()[1]
    assert isinstance(layer.layer, native_type)
    assert layer.state["channels_first"] is True
    a = layer.state["input"]
    params = model.params[2:]  # [weight, bias] where affine
    with torch.no_grad():
        torch.testing.assert_close(layer.layer(params, a), norm(a), rtol=1e-12, atol=1e-12)
    taps = {t.name: t for t in lin.layer_taps(torch.ones((*lin.outputs.shape, 1), dtype=DTYPE))}
    if affine:  # the elementwise tap: normalized inputs (N, S..., C)
        tap = taps["1"]
        assert tap.kind == "elementwise"
        normalized = (a - norm.running_mean[:, None]) if a.ndim == 3 else None
        if normalized is not None:
            normalized = normalized / torch.sqrt(norm.running_var[:, None] + norm.eps)
            torch.testing.assert_close(
                tap.inputs, normalized.transpose(1, 2), rtol=1e-12, atol=1e-12
            )
    else:
        assert "1" not in taps


# -- ResNets ------------------------------------------------------------------------------


def _elementwise_curvature_missing():
    """Why K-FAC and the diagonals cannot yet cover batch normalization, or None.

    Probes the curvature operators on a native network with a ``BatchNorm2d`` (its
    elementwise tap); skips name the missing capability, not this frontend.
    """
    native_type = getattr(nn, "BatchNorm2d", None)
    if native_type is None:
        return "curvlinops.nn has no BatchNorm2d yet (it is added on another branch)"
    native = nn.Sequential(nn.Conv2d(1, 2, 3), native_type(2), nn.Flatten(), nn.Linear(8, 2))
    params = native.init(0, xp=npx, dtype=npx.float64)
    data = [(np.ones((2, 1, 4, 4)), np.zeros((2, 2)))]
    try:
        cl.KFACLinearOperator(native, cl.MSELoss(), params, data)
        cl.GGNDiagonalLinearOperator(native, cl.MSELoss(), params, data)
    except (ValueError, TypeError, NotImplementedError) as error:
        return (
            "the curvature operators do not cover elementwise (batch normalization) taps "
            f"yet: on a native Conv2d-BatchNorm2d network K-FAC or the GGN diagonal raised "
            f"{type(error).__name__}: {error}"
        )
    return None


def _conv_and_linear_names(net):
    return [
        f"{n}.{p}"
        for n, m in net.named_modules()
        if isinstance(m, (*CONVS, torch.nn.Linear))
        for p, _ in m.named_parameters(recurse=False)
    ]


def test_resnet_conv_taps_equal_unfold_and_autograd_through_the_skip_connection():
    net = _resnet()
    X, _, _ = _batches((3, 6, 6), "ce")
    model = TorchModel(net, param_names=_conv_and_linear_names(net))
    cotangents = torch.randn((X.shape[0], 3, 2), generator=torch.Generator().manual_seed(17))
    cotangents = cotangents.to(DTYPE)
    taps = {t.name: t for t in model.linearize(model.params, X).layer_taps(cotangents)}
    refs = _reference_taps(net, X, cotangents)
    assert sorted(taps) == sorted(refs)
    assert sorted(refs) == ["block.conv1", "block.conv2", "block.proj", "fc", "stem"]
    for name, (inputs, grads) in refs.items():
        torch.testing.assert_close(taps[name].inputs, inputs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(taps[name].output_grads, grads, rtol=1e-12, atol=1e-12)


def test_resnet_with_fixed_batch_norm_gets_kfac_ekfac_and_exact_diagonals():
    net = _resnet()
    _, _, data = _batches((3, 6, 6), "ce")
    names = _conv_and_linear_names(net)
    model = TorchModel(net, param_names=names)
    loss = cl.CrossEntropyLoss()
    K = cl.KFACLinearOperator(model, loss, model.params, data, kfac_approx="reduce")
    assert sorted(K.input_factors) == ["block.conv1", "block.conv2", "block.proj", "fc", "stem"]
    refs = _reference_kfac_factors(net, data, "ce", "type-2", "reduce")
    for name, (B, A) in refs.items():
        torch.testing.assert_close(K.input_factors[name], A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(K.output_factors[name], B, rtol=1e-10, atol=1e-12)
    E = cl.EKFACLinearOperator(model, loss, model.params, data)
    dense = E.to_dense()
    assert dense.shape == (K.shape[0], K.shape[0])
    torch.testing.assert_close(dense, dense.T, rtol=1e-10, atol=1e-12)
    for diagonal, full in (
        (cl.GGNDiagonalLinearOperator, cl.GGNLinearOperator),
        (cl.EFDiagonalLinearOperator, cl.EFLinearOperator),
    ):
        got = diagonal(model, loss, model.params, data).diagonal()
        expected = torch.diagonal(full(model, loss, model.params, data).to_dense())
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


def test_resnet_layer_protocol_has_the_skip_connection_as_one_layer_with_two_branches():
    """The block's ``out + proj(x)`` is one layer whose branches are its two paths (the
    walks of the Hessian diagonal and the Kronecker-factored Hessian go down both; see
    test_frontends_torch_resnet.py for their values)."""
    net = _resnet()
    model = TorchModel(net)
    X = torch.ones(2, 3, 6, 6, dtype=DTYPE)
    layers = model.linearize(model.params, X).layers()
    names = ["stem", "bn", "relu", "block", "block.relu2", "pool", "flatten", "fc"]
    assert [la.name for la in layers] == names
    body, shortcut = layers[3].branches()
    assert [la.name for la in body] == [
        f"block.{n}" for n in ("conv1", "bn1", "relu1", "conv2", "bn2")
    ]
    assert [la.name for la in shortcut] == ["block.proj"]
    index = {n: i for i, n in enumerate(model.param_names)}
    inner = [n for n in model.param_names if n.startswith("block.")]
    assert layers[3].param_indices == tuple(index[n] for n in inner)


def test_resnet_with_trainable_batch_norm_gets_kfac_and_diagonals_over_every_parameter():
    reason = _elementwise_curvature_missing()
    if reason is not None:
        pytest.skip(reason)
    net = _resnet()
    _, _, data = _batches((3, 6, 6), "ce")
    model = TorchModel(net)
    loss = cl.CrossEntropyLoss()
    K = cl.KFACLinearOperator(model, loss, model.params, data, separate_weight_and_bias=False)
    P = sum(p.numel() for p in net.parameters())
    assert K.shape == (P, P)
    G = cl.GGNLinearOperator(model, loss, model.params, data).to_dense()
    # the batch normalizations' blocks are exact (elementwise taps); their diagonal too
    D = cl.GGNDiagonalLinearOperator(model, loss, model.params, data).diagonal()
    torch.testing.assert_close(D, torch.diagonal(G), rtol=1e-10, atol=1e-13)
    bn_names = [n for n, _ in net.named_parameters() if ".bn" in f".{n}" or n.startswith("bn")]
    block = _restricted(to_numpy(G), model, bn_names[:2])
    np.testing.assert_allclose(
        _restricted(to_numpy(K.to_dense()), model, bn_names[:2]), block, rtol=1e-10, atol=1e-12
    )


def _torchvision_resnet18():
    """torchvision's ``resnet18`` (10 classes) in float64 and evaluation mode, its batch
    normalizations with random affine parameters and running statistics (torchvision's
    ``1, 0`` and ``0, 1`` would make them almost the identity), of scales that keep the
    logits of order one (the softmax not saturated)."""
    try:
        import torchvision
    except (ImportError, RuntimeError) as error:  # a build for another torch fails to load
        pytest.skip(f"torchvision is not importable here: {type(error).__name__}: {error}")
    torch.manual_seed(18)  # torchvision's initialization draws from the global generator
    net = torchvision.models.resnet18(num_classes=10).to(DTYPE).eval()
    generator = torch.Generator().manual_seed(19)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=generator, dtype=DTYPE))
                m.bias.copy_(0.3 * torch.randn(c, generator=generator, dtype=DTYPE))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=generator, dtype=DTYPE))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator, dtype=DTYPE))
    return net


def _torchvision_data(sizes):
    """Batches of ``sizes`` images ``3 x 32 x 32`` (float64) with labels of 10 classes."""
    generator = torch.Generator().manual_seed(18)
    X = torch.randn((sum(sizes), 3, 32, 32), generator=generator, dtype=DTYPE)
    y = torch.randint(0, 10, (sum(sizes),), generator=generator)
    starts = np.cumsum([0, *sizes])
    return [(X[a:b], y[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _jacobians_and_loss_hessians(net, data, names):
    """Per datum ``(J_n, H_n)``: the Jacobian ``(C, P_S)`` of the logits with respect to
    the parameters ``names`` (flattened and concatenated in that order), one
    ``torch.autograd.grad`` per logit, and the Hessian ``(C, C)`` of the datum's
    cross-entropy with respect to its logits by ``torch.func.hessian``. The GGN block of
    the mean cross-entropy over ``names`` is ``(1 / N) sum_n J_n^T H_n J_n``."""
    params = [net.get_parameter(n) for n in names]
    pairs = []
    for X, y in data:
        with torch.enable_grad():
            outputs = net(X)
        for n in range(X.shape[0]):
            rows = [
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(f, params, retain_graph=True)]
                )
                for f in outputs[n]
            ]
            H = torch.func.hessian(
                lambda f, t=y[n : n + 1]: F.cross_entropy(f[None], t, reduction="sum")
            )(outputs[n].detach())
            pairs.append((torch.stack(rows), H))
    return pairs


def _flat_slices(model):
    """``{parameter name: slice}`` of the model's flat parameter vector."""
    sizes = [int(np.prod(shape)) for shape in model.expected_param_shapes()]
    starts = np.cumsum([0, *sizes])
    return {n: slice(int(starts[i]), int(starts[i + 1])) for i, n in enumerate(model.param_names)}


def test_torchvision_resnet18_kfac_factors_equal_the_factors_from_unfold_and_autograd():
    """All 20 convolutions (3 of them downsampling projections) and ``fc``, over two
    batches of one image: the factors by the definitions, from ``F.unfold`` patches and
    autograd output gradients of the type-2 cotangents (``_reference_kfac_factors``)."""
    net = _torchvision_resnet18()
    names = _conv_and_linear_names(net)
    model = TorchModel(net, param_names=names)
    data = _torchvision_data((1, 1))
    K = cl.KFACLinearOperator(
        model, cl.CrossEntropyLoss(), model.params, data, check_deterministic=False
    )
    assert K.shape[0] == sum(net.get_parameter(n).numel() for n in names)
    refs = _reference_kfac_factors(net, data, "ce", "type-2", "expand")
    assert len(refs) == 21 and sum(".downsample." in n for n in refs) == 3
    assert sorted(K.input_factors) == sorted(K.output_factors) == sorted(refs)
    for name, (B, A) in refs.items():
        torch.testing.assert_close(K.input_factors[name], A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(K.output_factors[name], B, rtol=1e-10, atol=1e-12)


def test_torchvision_resnet18_in_evaluation_mode_gets_kfac_and_ggn_diagonal_over_every_parameter():
    """Over all 11M parameters on one image (type-2, joint weight and bias blocks): K-FAC's
    ``fc`` block is the GGN's (exact for the last Linear layer on one datum), its batch
    normalization blocks are the GGN's (exact for elementwise layers), K-FAC has no
    blocks between layers, and the GGN diagonal is the GGN's, against
    ``J^T H J`` from autograd Jacobians (``_jacobians_and_loss_hessians``)."""
    net = _torchvision_resnet18()
    reason = _elementwise_curvature_missing()
    if reason is not None:
        pytest.skip(reason)
    model = TorchModel(net)
    loss = cl.CrossEntropyLoss()
    data = _torchvision_data((1,))
    P = sum(p.numel() for p in net.parameters())
    assert model.param_names == [n for n, _ in net.named_parameters()]
    slices = _flat_slices(model)
    bns = ["bn1", "layer2.0.downsample.1", "layer4.1.bn2"]
    exact = ["fc.weight", "fc.bias", *(f"{m}.{p}" for m in bns for p in ("weight", "bias"))]
    diag_names = ["conv1.weight", "layer3.0.downsample.0.weight", "layer1.1.bn2.bias", *exact]
    [(J, H)] = _jacobians_and_loss_hessians(net, data, diag_names)
    offsets = np.cumsum([0, *(net.get_parameter(n).numel() for n in diag_names)])
    columns = {
        n: slice(int(a), int(b))
        for n, a, b in zip(diag_names, offsets[:-1], offsets[1:], strict=True)
    }

    K = cl.KFACLinearOperator(
        model, loss, model.params, data, separate_weight_and_bias=False, check_deterministic=False
    )
    assert K.shape == (P, P)
    assert len(K.input_factors) == 21 and len(K.exact_blocks) == 20
    for m in bns:  # the stored exact block over [weight, bias]
        index = (
            torch.cat([torch.arange(P)[slices[f"{m}.{p}"]] for p in ("weight", "bias")])
            - slices[f"{m}.weight"].start
        )
        Jm = torch.cat([J[:, columns[f"{m}.weight"]], J[:, columns[f"{m}.bias"]]], dim=1)
        assert index.tolist() == list(range(Jm.shape[1]))  # weight then bias
        torch.testing.assert_close(K.exact_blocks[m], Jm.T @ H @ Jm, rtol=1e-10, atol=1e-12)
    # K @ V for V supported on fc and the three batch normalizations: there it is the
    # GGN's block-diagonal part times V, everywhere else zero
    generator = torch.Generator().manual_seed(21)
    V = torch.zeros((P, 2), dtype=DTYPE)
    for n in exact:
        V[slices[n]] = torch.randn(
            (slices[n].stop - slices[n].start, 2), generator=generator, dtype=DTYPE
        )
    KV = K @ V
    expected = torch.zeros_like(V)
    for layer in [["fc.weight", "fc.bias"], *([f"{m}.weight", f"{m}.bias"] for m in bns)]:
        Jl = torch.cat([J[:, columns[n]] for n in layer], dim=1)
        Vl = torch.cat([V[slices[n]] for n in layer])
        out = Jl.T @ (H @ (Jl @ Vl))
        start = 0
        for n in layer:
            size = slices[n].stop - slices[n].start
            expected[slices[n]] = out[start : start + size]
            start += size
    scale = float(expected.abs().max())
    assert scale > 1e-3  # the softmax is not saturated
    torch.testing.assert_close(KV, expected, rtol=1e-10, atol=1e-12 * scale)

    D = cl.GGNDiagonalLinearOperator(model, loss, model.params, data).diagonal()
    assert D.shape == (P,)
    reference = torch.einsum("ci,cd,di->i", J, H, J)
    for n in diag_names:
        torch.testing.assert_close(D[slices[n]], reference[columns[n]], rtol=1e-10, atol=1e-14)
