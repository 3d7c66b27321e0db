"""TorchModel's layer protocol on residual networks: the Hessian diagonal and the
Kronecker-factored Hessian of torch ResNets, and the graphs it refuses.

The ResNet is built as torchvision's (``BasicBlock``: conv-BN-ReLU-conv-BN,
``out += identity`` with ``identity = downsample(x)`` where the shape changes, then the
same in-place ``ReLU`` module again; ``torch.flatten(x, 1)`` before the classifier),
from ``torch.nn`` modules (torchvision is not needed). References, independent of the
layer protocol: the dense Hessian of PyTorch's own loss by ``torch.func.hessian`` (for
the diagonal), and for the Kronecker-factored Hessian the native ``curvlinops.nn``
network with the same weights, whose operator is tested against its definition in
``tests/curvature/test_residual_curvature.py``.
"""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest

import curvlinops as cl
from curvlinops import nn

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from curvlinops.curvature._chain import flat_layers  # noqa: E402
from curvlinops.frontends.torch import TorchModel  # noqa: E402

DTYPE = torch.float64


# -- networks ----------------------------------------------------------------------------


class _BasicBlock(torch.nn.Module):
    """torchvision's ``BasicBlock`` forward, with a conv1x1-BN projection where needed
    (``inplace=False``: no in-place operation, ``out = out + identity``)."""

    def __init__(self, c_in, c_out, stride, inplace):
        super().__init__()
        self.inplace = inplace
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c_out)
        self.relu = torch.nn.ReLU(inplace=inplace)
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                torch.nn.BatchNorm2d(c_out),
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        if self.inplace:
            out += identity  # as torchvision's
        else:
            out = out + identity
        return self.relu(out)


class _ResNet(torch.nn.Module):
    """Stem conv-BN-ReLU, an identity block, a downsampling block, pooling, Linear."""

    def __init__(self, inplace=True):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(2)
        self.relu = torch.nn.ReLU(inplace=inplace)
        self.layer1 = torch.nn.Sequential(_BasicBlock(2, 2, 1, inplace))
        self.layer2 = torch.nn.Sequential(_BasicBlock(2, 3, 2, inplace))
        self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _seeded(net, seed, dtype=DTYPE):
    """``net`` in evaluation mode with random weights (of a scale that keeps the logits
    of order one, where the softmax is not saturated) and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    net = net.to(dtype).eval()
    with torch.no_grad():
        for p in net.parameters():
            scale = 1.2 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.5
            p.copy_(scale * torch.randn(p.shape, generator=generator, dtype=dtype))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=generator, dtype=dtype))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator, dtype=dtype))
    return net


def _data(shape=(2, 8, 8), seed=0, dtype=DTYPE):
    """Three images in batches of two and one, and labels of three classes."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn((3, *shape), generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (3,), generator=generator)
    return X, y, [(X[:2], y[:2]), (X[2:], y[2:])]


def _torch_hessian(net, X, y, loss_fn):
    """The dense Hessian of PyTorch's loss over all data, by ``torch.func.hessian``."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]

    def loss(theta):
        params = dict(zip(names, torch.split(theta, sizes), strict=True))
        params = {n: t.reshape(s) for (n, t), s in zip(params.items(), shapes, strict=True)}
        return loss_fn(torch.func.functional_call(net, params, (X,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return torch.func.hessian(loss)(theta)


# -- the Hessian diagonal ----------------------------------------------------------------


_REFERENCE: dict = {}


def _reference_diagonal():
    """The diagonal of the dense Hessian of ``_ResNet`` (seed 0) on ``_data()`` (once)."""
    if "diagonal" not in _REFERENCE:
        X, y, _ = _data()
        H = _torch_hessian(_seeded(_ResNet(inplace=False), 0), X, y, F.cross_entropy)
        _REFERENCE["diagonal"] = torch.diagonal(H)
    return _REFERENCE["diagonal"]


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "out-of-place"])
def test_hessian_diagonal_of_a_torch_resnet_is_the_dense_hessians(inplace):
    """In place (as torchvision's): the outputs that ``out += identity`` and the ReLU
    overwrite later are recorded again, copied as they are made; out of place: the
    outputs of the first recording."""
    net = _seeded(_ResNet(inplace), 0)
    _, _, data = _data()
    model = TorchModel(net)
    loss = cl.CrossEntropyLoss()
    ours = cl.HessianDiagonalLinearOperator(model, loss, model.params, data).diagonal()
    reference = _reference_diagonal()
    assert ours.shape == reference.shape == (sum(p.numel() for p in net.parameters()),)
    scale = float(reference.abs().max())
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12 * scale)


def test_hessian_diagonal_of_a_torch_resnet_in_float32():
    reference = _reference_diagonal()
    X, y, _ = _data()
    net = _seeded(_ResNet(), 0).to(torch.float32)
    X32 = X.to(torch.float32)
    model = TorchModel(net)
    data = [(X32[:2], y[:2]), (X32[2:], y[2:])]
    ours = cl.HessianDiagonalLinearOperator(
        model, cl.CrossEntropyLoss(), model.params, data
    ).diagonal()
    assert ours.dtype == torch.float32
    scale = float(reference.abs().max())
    torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=1e-5 * scale)


class _Nested(torch.nn.Module):
    """A residual block inside another (the identity first in the sum), a projection
    first in the outer sum (so that the native Residual's parameter order, its first
    path's and then its second's, is not the module's), the functional ReLU between
    modules, and a Tanh module called twice."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = (torch.nn.Linear(*s) for s in ((2, 3), (3, 3), (3, 4)))
        self.proj = torch.nn.Linear(3, 4, bias=False)
        self.act = torch.nn.Tanh()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc0(x)
        inner = h + self.act(self.fc1(h))
        outer = self.proj(h) + self.fc2(torch.relu(inner))  # the projection first
        return self.head(self.act(outer))


def test_hessian_diagonal_through_nested_residual_sums_and_functional_relu():
    net = _seeded(_Nested(), 2)
    generator = torch.Generator().manual_seed(3)
    X = torch.randn((6, 2), generator=generator, dtype=DTYPE)
    Y = torch.randn((6, 2), generator=generator, dtype=DTYPE)
    model = TorchModel(net)
    loss = cl.MSELoss(reduction="sum")
    data = [(X[:4], Y[:4]), (X[4:], Y[4:])]
    ours = cl.HessianDiagonalLinearOperator(model, loss, model.params, data).diagonal()
    reference = torch.diagonal(
        _torch_hessian(net, X, Y, lambda f, y: torch.sum((f - y) ** 2))  # MSE "sum"
    )
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    layers = model.linearize(model.params, X).layers()
    assert [la.name for la in layers] == ["fc0", "add_1", "act", "head"]
    assert [la.name for la in flat_layers(layers)[1:8]] == [
        "add_1", "proj", "add", "fc1", "act", "relu", "fc2"
    ]  # fmt: skip
    index = {n: i for i, n in enumerate(model.param_names)}
    inner = ["proj.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert layers[1].param_indices == tuple(index[n] for n in inner)


# -- the Kronecker-factored Hessian ------------------------------------------------------


def _native_resnet(net):
    """The ``curvlinops.nn`` network computing what ``_ResNet`` computes."""

    def conv(m):
        return nn.Conv2d(
            m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
            padding=m.padding, bias=m.bias is not None,
        )  # fmt: skip

    def bn(m):
        return nn.BatchNorm2d(
            m.num_features,
            running_mean=m.running_mean.numpy(),
            running_var=m.running_var.numpy(),
            eps=m.eps,
        )

    def block(b):
        body = nn.Sequential(conv(b.conv1), bn(b.bn1), nn.ReLU(), conv(b.conv2), bn(b.bn2))
        shortcut = None
        if b.downsample is not None:
            shortcut = nn.Sequential(conv(b.downsample[0]), bn(b.downsample[1]))
        return nn.Residual(body, shortcut)

    return nn.Sequential(
        conv(net.conv1), bn(net.bn1), nn.ReLU(),
        block(net.layer1[0]), nn.ReLU(), block(net.layer2[0]), nn.ReLU(),
        nn.GlobalAvgPool2d(), nn.Linear(3, 3),
    )  # fmt: skip


def test_kfac_hessian_of_a_torch_resnet_is_the_native_networks():
    net = _seeded(_ResNet(), 4)
    X, y, data = _data(seed=4)
    model = TorchModel(net)
    loss = cl.CrossEntropyLoss()
    ours = cl.KFACHessianLinearOperator(model, loss, model.params, data)
    native = _native_resnet(net)
    params = [p.detach().numpy() for p in net.parameters()]
    assert [p.shape for p in params] == [tuple(s) for s in native.expected_param_shapes()]
    reference = cl.KFACHessianLinearOperator(
        native, loss, params, [(X_.numpy(), y_.numpy()) for X_, y_ in data]
    )
    np.testing.assert_allclose(
        ours.to_dense().numpy(), reference.to_dense(), rtol=1e-10, atol=1e-12
    )
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert set(convs) <= set(ours.input_factors)  # named after the torch modules
    # the native network computes the same function (so the comparison means something)
    torch.testing.assert_close(
        torch.from_numpy(native(params, X.numpy())), net(X), rtol=1e-12, atol=1e-12
    )
    assert npx.all(npx.isfinite(reference.to_dense()))


def test_resnet_protocol_layers_tap_what_the_hooks_tap():
    net = _seeded(_ResNet(inplace=False), 5)
    X, _, _ = _data(seed=5)
    model = TorchModel(net)
    lin = model.linearize(model.params, X)
    taps = [la.tap() for la in flat_layers(lin.layers())]
    taps = [t for t in taps if t is not None]
    hooked = lin.layer_taps()
    assert [(t.name, t.weight_index, t.bias_index) for t in taps] == [
        (t.name, t.weight_index, t.bias_index) for t in hooked
    ]
    for ours, theirs in zip(taps, hooked, strict=True):
        torch.testing.assert_close(ours.inputs, theirs.inputs, rtol=1e-12, atol=1e-12)


# -- refused graphs ----------------------------------------------------------------------


class _Graph(torch.nn.Module):
    """Three Linear layers and a head around a forward pass that ``combine`` gives."""

    def __init__(self, combine):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(3, 3) for _ in range(3))
        self.head = torch.nn.Linear(6 if combine is _concatenated else 3, 2)
        self.combine = combine

    def forward(self, x):
        return self.head(self.combine(self, x))


def _concatenated(m, x):
    return torch.cat([m.a(x), m.b(x)], dim=1)


def _scaled(m, x):
    return 2 * m.a(x)


def _plus_constant(m, x):
    return m.a(x) + 1.0


def _shared(m, x):
    return m.a(m.a(x))


def _crossing(m, x):
    u = m.a(x)
    return m.b(u) + (m.c(x) + u)


def _data_dependent(m, x):
    return m.a(x) + x if x.sum() > 0 else m.b(x)


def _with_itself(m, x):
    u = m.a(x)
    return u + u


@pytest.mark.parametrize(
    ("combine", "message"),
    [
        (_concatenated, r"uses torch\.cat \(cat\) between modules, which the layer protocol"),
        (_scaled, r"uses operator\.mul \(mul\) between modules"),
        (_plus_constant, r"not a sum with a constant"),
        (_shared, r"The module 'a' ran more than once in one forward pass"),
        (_crossing, r"feeds two paths of the forward pass that do not meet at one addition"),
        (_data_dependent, r"torch\.fx could not trace the forward pass of _Graph"),
        (_with_itself, r"of a tensor with itself"),
    ],
)
def test_graphs_that_cannot_be_mapped_are_refused_by_name(combine, message):
    net = _seeded(_Graph(combine), 6)
    model = TorchModel(net)
    X = torch.ones((2, 3), dtype=DTYPE)
    with pytest.raises(ValueError, match=message):
        model.linearize(model.params, X).layers()
    # the taps need no structure: K-FAC's still work (but for the shared layer)
    if combine is not _shared:
        assert model.linearize(model.params, X).layer_taps()


def test_a_residual_block_around_a_module_without_rules_is_named_when_walked():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0, self.fc, self.act = (
                torch.nn.Linear(3, 3),
                torch.nn.Linear(3, 3),
                torch.nn.Hardtanh(),
            )
            self.head = torch.nn.Linear(3, 2)

        def forward(self, x):
            x = self.fc0(x)
            return self.head(self.act(self.fc(x)) + x)

    model = TorchModel(_seeded(Block(), 7))
    data = [(torch.ones((2, 3), dtype=DTYPE), torch.zeros((2, 2), dtype=DTYPE))]
    message = (
        r"but layer 'add' is a residual connection around 'act' \(torch\.nn\.Hardtanh\) \(a "
        r"module without layer-protocol rules in the PyTorch frontend\), which does not implement"
    )
    with pytest.raises(cl.MissingLayerRuleError, match=message):
        cl.HessianDiagonalLinearOperator(model, cl.MSELoss(), model.params, data).diagonal()
