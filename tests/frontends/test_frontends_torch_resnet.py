"""TorchModel's layer protocol on residual networks: the Hessian diagonal, the GGN, K-FAC
and the Kronecker-factored Hessian of torch ResNets, and the graphs it refuses.

The ResNets are built as torchvision's, from ``torch.nn`` modules (torchvision is not
needed), with either block: ``BasicBlock`` (conv-BN-ReLU-conv-BN) or ``Bottleneck``
(conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1-BN), then ``out += identity`` with
``identity = downsample(x)`` (conv1x1-BN) where the shape changes, then the same
in-place ``ReLU`` module again; ``torch.flatten(x, 1)`` before the classifier. Both
in place (as torchvision's) and out of place. References, independent of the layer
protocol: the dense Hessian of PyTorch's own loss by ``torch.func.hessian`` (for the
diagonal); the dense GGN ``J^T H J`` from ``torch.func.jacrev`` of the logits and
``torch.func.hessian`` of the cross-entropy (for the GGN, its diagonal and K-FAC's
exact batch normalization blocks); and for K-FAC and the Kronecker-factored Hessian the
native ``curvlinops.nn`` network with the same weights, whose operators are tested
against their definitions in ``tests/curvature/``.
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


class _ResidualBlock(torch.nn.Module):
    """What torchvision's blocks share: a conv1x1-BN projection ``downsample`` where the
    shape changes, and the end ``relu(out + identity)`` (in place as torchvision's, or
    ``out = out + identity``), with the block's one ReLU module."""

    def _shortcut(self, c_in, c_out, stride):
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                torch.nn.BatchNorm2d(c_out),
            )

    def _add_identity(self, out, x):
        identity = x if self.downsample is None else self.downsample(x)
        if self.inplace:
            out += identity  # as torchvision's
        else:
            out = out + identity
        return self.relu(out)


class _BasicBlock(_ResidualBlock):
    """torchvision's ``BasicBlock`` forward: conv3x3(stride)-BN-ReLU, conv3x3-BN, then
    the shared end (``inplace=False``: no in-place operation)."""

    def __init__(self, c_in, c_out, stride, inplace):
        super().__init__()
        self.inplace = inplace
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c_out)
        self.relu = torch.nn.ReLU(inplace=inplace)
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c_out)
        self._shortcut(c_in, c_out, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self._add_identity(self.bn2(self.conv2(out)), x)


class _Bottleneck(_ResidualBlock):
    """torchvision's ``Bottleneck`` forward (expansion 4): conv1x1-BN-ReLU,
    conv3x3(stride)-BN-ReLU, conv1x1-BN, then the shared end, the same ReLU module a third
    time (``inplace=False``: no in-place operation)."""

    expansion = 4

    def __init__(self, c_in, width, stride, inplace):
        super().__init__()
        self.inplace = inplace
        c_out = width * self.expansion
        self.conv1 = torch.nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(width)
        self.conv3 = torch.nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = torch.nn.BatchNorm2d(c_out)
        self.relu = torch.nn.ReLU(inplace=inplace)
        self._shortcut(c_in, c_out, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._add_identity(self.bn3(self.conv3(out)), x)


BLOCKS = ("basic", "bottleneck")


class _ResNet(torch.nn.Module):
    """Stem conv-BN-ReLU, an identity block, a downsampling block, pooling, Linear.

    ``block="basic"``: ``_BasicBlock`` 2 -> 2 and 2 -> 3 (stride 2); ``"bottleneck"``:
    ``_Bottleneck`` 4 -> 4 (width 1) and 4 -> 8 (width 2, stride 2) after a stem of 4
    channels.
    """

    def __init__(self, inplace=True, block="basic"):
        super().__init__()
        stem, c_out = (2, 3) if block == "basic" else (4, 8)
        self.conv1 = torch.nn.Conv2d(2, stem, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(stem)
        self.relu = torch.nn.ReLU(inplace=inplace)
        if block == "basic":
            self.layer1 = torch.nn.Sequential(_BasicBlock(2, 2, 1, inplace))
            self.layer2 = torch.nn.Sequential(_BasicBlock(2, 3, 2, inplace))
        else:
            self.layer1 = torch.nn.Sequential(_Bottleneck(4, 1, 1, inplace))
            self.layer2 = torch.nn.Sequential(_Bottleneck(4, 2, 2, inplace))
        self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.fc = torch.nn.Linear(c_out, 3)

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


def _reference_diagonal(block="basic"):
    """The diagonal of the dense Hessian of ``_ResNet`` (seed 0) on ``_data()`` (once)."""
    if block not in _REFERENCE:
        X, y, _ = _data()
        net = _seeded(_ResNet(inplace=False, block=block), 0)
        _REFERENCE[block] = torch.diagonal(_torch_hessian(net, X, y, F.cross_entropy))
    return _REFERENCE[block]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "out-of-place"])
def test_hessian_diagonal_of_a_torch_resnet_is_the_dense_hessians(inplace, block):
    """In place (as torchvision's): the outputs that ``out += identity`` and the ReLU
    overwrite later are recorded again, copied as they are made; out of place: the
    outputs of the first recording."""
    net = _seeded(_ResNet(inplace, block), 0)
    _, _, data = _data()
    model = TorchModel(net)
    loss = cl.CrossEntropyLoss()
    ours = cl.HessianDiagonalLinearOperator(model, loss, model.params, data).diagonal()
    reference = _reference_diagonal(block)
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
        body = [conv(b.conv1), bn(b.bn1), nn.ReLU(), conv(b.conv2), bn(b.bn2)]
        if isinstance(b, _Bottleneck):
            body += [nn.ReLU(), conv(b.conv3), bn(b.bn3)]
        body, shortcut = nn.Sequential(*body), None
        if b.downsample is not None:
            shortcut = nn.Sequential(conv(b.downsample[0]), bn(b.downsample[1]))
        return nn.Residual(body, shortcut)

    return nn.Sequential(
        conv(net.conv1), bn(net.bn1), nn.ReLU(),
        block(net.layer1[0]), nn.ReLU(), block(net.layer2[0]), nn.ReLU(),
        nn.GlobalAvgPool2d(), nn.Linear(net.fc.in_features, net.fc.out_features),
    )  # fmt: skip


@pytest.mark.parametrize("block", BLOCKS)
def test_kfac_hessian_of_a_torch_resnet_is_the_native_networks(block):
    net = _seeded(_ResNet(block=block), 4)
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


def _torch_ggn(net, X, y):
    """The dense GGN of the mean cross-entropy, ``(1 / N) sum_n J_n^T H_n J_n``: the
    Jacobians of the logits by ``torch.func.jacrev``, the loss Hessians ``H_n`` of each
    datum's cross-entropy by ``torch.func.hessian``."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]

    def logits(theta):
        pieces = torch.split(theta, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return torch.func.functional_call(net, params, (X,))

    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    J = torch.func.jacrev(logits)(theta)  # (N, C, P)
    H = torch.stack(
        [
            torch.func.hessian(lambda f, t=t: F.cross_entropy(f[None], t[None], reduction="sum"))(f)
            for f, t in zip(logits(theta).detach(), y, strict=True)
        ]
    )
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J) / X.shape[0]


def _indices(net, names):
    """The entries of the flat parameter vector (``named_parameters`` order) of ``names``."""
    sizes = [p.numel() for _, p in net.named_parameters()]
    starts = np.cumsum([0, *sizes])
    return torch.cat(
        [
            torch.arange(int(starts[i]), int(starts[i + 1]))
            for i, (n, _) in enumerate(net.named_parameters())
            if n in names
        ]
    )


@pytest.mark.parametrize("block", BLOCKS)
def test_ggn_kfac_and_diagonal_of_a_torch_resnet_are_the_dense_and_native_ones(block):
    """In place, as torchvision's: the GGN and its diagonal are the dense GGN's by
    ``torch.func``; K-FAC's batch normalization blocks are the GGN's (exact for
    elementwise layers); K-FAC (type-2 "expand", empirical "reduce") is the native
    network's with the same weights."""
    net = _seeded(_ResNet(block=block), 6)
    X, y, data = _data(seed=6)
    model = TorchModel(net)
    loss = cl.CrossEntropyLoss()
    G = _torch_ggn(net, X, y)
    P = sum(p.numel() for p in net.parameters())
    assert G.shape == (P, P) and model.param_names == [n for n, _ in net.named_parameters()]
    scale = float(G.abs().max())
    ours = cl.GGNLinearOperator(model, loss, model.params, data).to_dense()
    torch.testing.assert_close(ours, G, rtol=1e-10, atol=1e-12 * scale)
    D = cl.GGNDiagonalLinearOperator(model, loss, model.params, data).diagonal()
    torch.testing.assert_close(D, torch.diagonal(G), rtol=1e-10, atol=1e-12 * scale)

    native = _native_resnet(net)
    params = [p.detach().numpy() for p in net.parameters()]
    native_data = [(X_.numpy(), y_.numpy()) for X_, y_ in data]
    bns = [n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for options in (
        {"fisher_type": "type-2", "separate_weight_and_bias": False},
        {"fisher_type": "empirical", "kfac_approx": "reduce"},
    ):
        K = cl.KFACLinearOperator(model, loss, model.params, data, **options)
        reference = cl.KFACLinearOperator(native, loss, params, native_data, **options)
        dense = K.to_dense()
        np.testing.assert_allclose(dense.numpy(), reference.to_dense(), rtol=1e-10, atol=1e-12)
        if options["fisher_type"] == "type-2":
            assert sorted(K.exact_blocks) == sorted(bns)
            for m in bns:
                index = _indices(net, [f"{m}.weight", f"{m}.bias"])
                block_G = G[index][:, index]
                torch.testing.assert_close(
                    dense[index][:, index], block_G, rtol=1e-10, atol=1e-12 * scale
                )
                torch.testing.assert_close(
                    K.exact_blocks[m], block_G, rtol=1e-10, atol=1e-12 * scale
                )


def test_bottleneck_blocks_are_one_layer_each_with_the_body_and_the_projection_as_branches():
    """Each ``out += identity`` is one layer whose branches are the body (the one ReLU
    module run twice in it) and the projection, or None (the identity) where the shape
    stays; the third run of the ReLU follows the block."""
    net = _seeded(_ResNet(block="bottleneck"), 7)
    model = TorchModel(net)
    X, _, _ = _data(seed=7)
    layers = model.linearize(model.params, X).layers()
    assert [la.name for la in layers] == [
        "conv1", "bn1", "relu", "layer1.0", "layer1.0.relu", "layer2.0", "layer2.0.relu",
        "avgpool", "flatten", "fc",
    ]  # fmt: skip
    body = ["conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"]
    index = {n: i for i, n in enumerate(model.param_names)}
    for residual, shortcut in ((layers[3], None), (layers[5], ["downsample.0", "downsample.1"])):
        prefix = residual.name
        path, skip = residual.branches()
        assert [la.name for la in path] == [f"{prefix}.{n}" for n in body]
        if shortcut is None:
            assert skip is None  # the identity
        else:
            assert [la.name for la in skip] == [f"{prefix}.{n}" for n in shortcut]
        inner = [n for n in model.param_names if n.startswith(f"{prefix}.")]
        assert len(inner) == (9 if shortcut is None else 12)
        assert residual.param_indices == tuple(index[n] for n in inner)


@pytest.mark.parametrize("block", BLOCKS)
def test_resnet_protocol_layers_tap_what_the_hooks_tap(block):
    net = _seeded(_ResNet(inplace=False, block=block), 5)
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
