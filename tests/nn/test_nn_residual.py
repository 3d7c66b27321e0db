"""Residual connections (curvlinops.nn.Residual) against torch.func in float64.

A small ResNet (convolutions, two residual blocks, one with a strided 1x1 convolution
as its shortcut) and MLPs with residual blocks (one nested) are built twice, natively
and as a torch model with the same weights. Checked: forward, JVP, VJP and the
second-order product (the R-operator, with the cross terms between parameters before
and inside the blocks) with K > 1 vectors; the dense GGN and Hessian operators against
``jacrev``/``hessian``; the layer taps (names, parameter indices, inputs and output
gradients) against torch hooks and autograd; K-FAC, EKFAC and the GGN diagonal on the
ResNet, exactness of K-FAC where it provably holds (one datum, one pixel per layer);
the layer protocol (exact backward gradient, the Hessian diagonal through the blocks
against torch.func, the per-datum rule against the exact input Hessian); the
``need_input`` the inner layers are asked for (against finite differences); a memo
serves one ``r_backward``; shape and type errors.
"""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest
from nn_reference import HAS_TORCH, flat, flat_k, random_problem, unflat

from curvlinops import GGNLinearOperator, HessianLinearOperator, MSELoss, nn
from curvlinops.models import MissingLayerRuleError

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")

K = 3
ACTIVATIONS = {"relu": "ReLU", "tanh": "Tanh"}


def assert_close(actual, expected, rtol=1e-10):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# -- the models, twice ---------------------------------------------------------------------


def _torch_residual_class():
    import torch

    class TorchResidual(torch.nn.Module):
        def __init__(self, block, shortcut=None):
            super().__init__()
            self.block = block
            self.shortcut = shortcut

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    return TorchResidual


class _Twin:
    """Builds a native layer and its torch twin side by side."""

    def __init__(self, activation):
        self.activation = activation

    def conv(self, c_in, c_out, k, stride=1, padding=0, bias=True):
        import torch

        ours = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=bias)
        theirs = torch.nn.Conv2d(
            c_in, c_out, k, stride=stride, padding=padding, bias=bias, dtype=torch.float64
        )
        return ours, theirs

    def linear(self, d_in, d_out, bias=True):
        import torch

        return nn.Linear(d_in, d_out, bias=bias), torch.nn.Linear(
            d_in, d_out, bias=bias, dtype=torch.float64
        )

    def act(self):
        import torch

        name = ACTIVATIONS[self.activation]
        return getattr(nn, name)(), getattr(torch.nn, name)()

    def flatten(self):
        import torch

        return nn.Flatten(), torch.nn.Flatten()

    @staticmethod
    def seq(*pairs):
        import torch

        return nn.Sequential(*[p[0] for p in pairs]), torch.nn.Sequential(*[p[1] for p in pairs])

    @staticmethod
    def residual(block, shortcut=None):
        TorchResidual = _torch_residual_class()
        if shortcut is None:
            return nn.Residual(block[0]), TorchResidual(block[1])
        return nn.Residual(block[0], shortcut[0]), TorchResidual(block[1], shortcut[1])


def resnet(activation="relu", spatial=6):
    """A small ResNet.

    ``Conv, act, Res(Conv, act, Conv), act, Res(Conv/2, act, Conv; 1x1/2), act, Flatten, Linear``.
    """
    t = _Twin(activation)
    trunk = t.seq(
        t.conv(2, 2, 3, padding=1),
        t.act(),
        t.residual(t.seq(t.conv(2, 2, 3, padding=1), t.act(), t.conv(2, 2, 3, padding=1))),
        t.act(),
        t.residual(
            t.seq(t.conv(2, 3, 3, stride=2, padding=1), t.act(), t.conv(3, 3, 3, padding=1)),
            shortcut=t.conv(2, 3, 1, stride=2),
        ),
        t.act(),
        t.flatten(),
    )
    x = np.zeros((1, 2, spatial, spatial))
    features = trunk[0]([np.zeros(s) for s in trunk[0].expected_param_shapes()], x).shape[1]
    return t.seq(trunk, t.linear(features, 2))


def residual_mlp(activation="tanh", nested=False):
    """``Linear, act, Res(Linear, act, Linear), act, Linear`` (optionally a nested block)."""
    t = _Twin(activation)
    if nested:
        inner = t.residual(t.seq(t.linear(4, 4), t.act()), shortcut=t.linear(4, 4, bias=False))
        block = t.seq(t.linear(4, 4), t.act(), inner, t.linear(4, 4, bias=False))
    else:
        block = t.seq(t.linear(4, 4), t.act(), t.linear(4, 4))
    return t.seq(t.linear(3, 4), t.act(), t.residual(block), t.act(), t.linear(4, 2))


MODELS = {
    "resnet_relu": (lambda: resnet("relu"), (2, 2, 6, 6)),
    "resnet_tanh": (lambda: resnet("tanh"), (2, 2, 6, 6)),
    "mlp_tanh": (lambda: residual_mlp("tanh"), (4, 3)),
    "mlp_nested": (lambda: residual_mlp("tanh", nested=True), (4, 3)),
}


def problem(name, seed=0):
    build, x_shape = MODELS[name]
    ours, theirs = build()
    shapes = ours.expected_param_shapes()
    assert shapes == [tuple(p.shape) for p in theirs.parameters()]
    prob = random_problem(ours, x_shape, K, seed=seed)
    prob["params"] = [0.6 * p for p in prob["params"]]  # keep the activations moderate
    return ours, theirs, prob


def _functional(theirs, shapes):
    import torch

    names = [name for name, _ in theirs.named_parameters()]

    def call(theta, x):
        params = []
        start = 0
        for s in shapes:
            size = int(np.prod(s))
            params.append(torch.reshape(theta[start : start + size], s))
            start += size
        return torch.func.functional_call(theirs, dict(zip(names, params, strict=True)), (x,))

    return call


def torch_products(theirs, prob):
    """Outputs, J V, J^T U and ``(sum u Hess f) V + J^T w`` from torch.func, as NumPy."""
    import torch

    shapes = [tuple(p.shape) for p in prob["params"]]
    call = _functional(theirs, shapes)
    x = torch.from_numpy(prob["x"])

    def f(theta):
        return call(theta, x)

    theta = torch.from_numpy(flat(prob["params"]))
    V = torch.from_numpy(flat_k(prob["V"]))
    U, u, w = (torch.from_numpy(prob[k]) for k in ("U", "u", "w"))
    outputs, pull = torch.func.vjp(f, theta)
    JV = torch.stack([torch.func.jvp(f, (theta,), (V[:, k],))[1] for k in range(K)], dim=-1)
    JtU = torch.stack([pull(U[..., k])[0] for k in range(K)], dim=-1)
    weighted = torch.func.grad(lambda t: torch.sum(u * f(t)))
    second = torch.stack(
        [torch.func.jvp(weighted, (theta,), (V[:, k],))[1] + pull(w[..., k])[0] for k in range(K)],
        dim=-1,
    )
    return {
        "outputs": outputs.detach().numpy(),
        "JV": JV.detach().numpy(),
        "JtU": JtU.detach().numpy(),
        "second": second.detach().numpy(),
    }


# -- derivative products -------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("name", sorted(MODELS))
def test_products_match_torch_func(name):
    ours, theirs, prob = problem(name)
    lin = ours.linearize(prob["params"], prob["x"])
    reference = torch_products(theirs, prob)
    assert_close(lin.outputs, reference["outputs"])
    assert_close(ours(prob["params"], prob["x"]), reference["outputs"])
    assert_close(lin.jvp(prob["V"]), reference["JV"])
    assert_close(flat_k(lin.vjp(prob["U"])), reference["JtU"])
    second = lin.second_order_vjp(prob["u"], prob["V"], prob["w"])
    assert_close(flat_k(second), reference["second"])


@needs_torch
def test_second_order_cross_terms_between_parameters_before_and_inside_the_block():
    """The tangent of only the stem's weight, the rows of a weight inside the block."""
    ours, theirs, prob = problem("resnet_tanh", seed=3)
    shapes = ours.expected_param_shapes()
    V = [np.zeros(v.shape) for v in prob["V"]]
    V[0] = prob["V"][0]  # the stem convolution only
    prob = dict(prob, V=V, w=np.zeros_like(prob["w"]))
    lin = ours.linearize(prob["params"], prob["x"])
    second = lin.second_order_vjp(prob["u"], V, None)
    reference = torch_products(theirs, prob)["second"]
    assert_close(flat_k(second), reference)
    inside = unflat(reference[:, 0], shapes)[2]  # the block's first convolution
    assert np.max(np.abs(inside)) > 1e-3  # a cross term that the test would see missing
    np.testing.assert_allclose(second[2][..., 0], inside, rtol=1e-10, atol=1e-12)


def test_k_vectors_equal_k_separate_products():
    ours, _, prob = _problem_without_torch()
    lin = ours.linearize(prob["params"], prob["x"])
    V, u, w = prob["V"], prob["u"], prob["w"]
    together = lin.second_order_vjp(u, V, w)
    jv = lin.jvp(V)
    for k in range(K):
        Vk = [v[..., k : k + 1] for v in V]
        assert_close(jv[..., k : k + 1], lin.jvp(Vk))
        for a, b in zip(together, lin.second_order_vjp(u, Vk, w[..., k : k + 1]), strict=True):
            assert_close(a[..., k : k + 1], b)


def _problem_without_torch():
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    ours = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Residual(block), nn.Linear(4, 2))
    return ours, None, random_problem(ours, (5, 3), K, seed=4)


def test_r_backward_with_a_plain_input_tangent_equals_the_memo_path():
    """Called with a plain tangent (no memo) the Residual pushes its inner tangents itself."""
    layer = nn.Residual(
        nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)), shortcut=nn.Linear(3, 3)
    )
    rng = np.random.default_rng(0)
    params = layer.init(1, xp=npx, dtype=npx.float64)
    dparams = [rng.standard_normal(p.shape + (K,)) for p in params]
    a = rng.standard_normal((4, 3))
    state = {"input": a, "channels_first": False}
    layer.forward_with_state(params, a, npx, state)
    ta, g, rg = (rng.standard_normal(s) for s in ((4, K, 3), (4, 1, 3), (4, K, 3)))
    out, memo = layer.tangent_with_memo(params, dparams, state, ta, npx)
    assert_close(out, layer.tangent(params, dparams, state, ta, npx))
    with_memo = layer.r_backward(params, dparams, state, memo, g, rg, npx)
    plain = layer.r_backward(params, dparams, state, ta, g, rg, npx)
    for a_, b_ in zip(with_memo[0], plain[0], strict=True):
        assert_close(a_, b_)
    assert_close(with_memo[1], plain[1])
    assert_close(with_memo[2], plain[2])


@needs_torch
def test_inner_layers_get_the_layouts_of_the_chain():
    model = resnet("relu")[0]
    params = model.init(0, xp=npx, dtype=npx.float64)
    lin = model.linearize(params, np.ones((1, 2, 6, 6)))
    states = lin._states
    for position in (2, 4):  # the residual blocks
        block, shortcut = states[position]["paths"]
        assert [s["channels_first"] for s in block] == [True, True, True]
        assert shortcut is None or [s["channels_first"] for s in shortcut] == [True]
    assert states[5]["channels_first"] and not states[7]["channels_first"]  # ReLU, Linear
    mlp = residual_mlp()[0]
    lin = mlp.linearize(mlp.init(0, xp=npx, dtype=npx.float64), np.ones((2, 3)))
    (block, shortcut) = lin._states[2]["paths"]
    assert shortcut is None and not any(s["channels_first"] for s in block)


# -- dense curvature operators --------------------------------------------------------------


def _data(name, seed):
    _, x_shape = MODELS[name]
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((2,) + x_shape[1:]), rng.standard_normal((2, 2))),
        (rng.standard_normal((1,) + x_shape[1:]), rng.standard_normal((1, 2))),
    ]


def _torch_dense(theirs, params, data, kind):
    """Dense GGN ``sum 2 J^T J`` or Hessian of ``sum (f - y)^2`` from torch.func."""
    import torch

    call = _functional(theirs, [tuple(p.shape) for p in params])
    theta = torch.from_numpy(flat(params))
    total = 0
    for X, y in data:
        x, target = torch.from_numpy(X), torch.from_numpy(y)
        if kind == "ggn":
            J = torch.func.jacrev(lambda t, x=x: call(t, x))(theta).reshape(-1, theta.numel())
            total = total + 2 * J.T @ J
        else:
            loss = lambda t, x=x, target=target: torch.sum((call(t, x) - target) ** 2)  # noqa: E731
            total = total + torch.func.hessian(loss)(theta)
    return total.detach().numpy()


@needs_torch
@pytest.mark.parametrize("kind", ["ggn", "hessian"])
@pytest.mark.parametrize("name", ["resnet_relu", "resnet_tanh", "mlp_nested"])
def test_dense_ggn_and_hessian_match_torch_func(name, kind):
    ours, theirs, prob = problem(name, seed=1)
    data = _data(name, 2)
    cls = {"ggn": GGNLinearOperator, "hessian": HessianLinearOperator}[kind]
    dense = cls(ours, MSELoss(reduction="sum"), prob["params"], data).to_dense()
    assert_close(dense, _torch_dense(theirs, prob["params"], data, kind), rtol=1e-9)


# -- tier 3: layer taps ---------------------------------------------------------------------


def _torch_taps(theirs, params, x, U, names):
    """Per hooked module: its input and its output gradients ``(..., M)`` by autograd."""
    import torch

    modules = dict(theirs.named_modules())
    record = {}
    handles = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: record.__setitem__(n, (i[0], o)))
        for n in names
    ]
    try:
        out = _functional(theirs, [tuple(p.shape) for p in params])(
            torch.from_numpy(flat(params)).requires_grad_(True), torch.from_numpy(x)
        )
    finally:
        for h in handles:
            h.remove()
    outputs = [record[n][1] for n in names]
    grads = [
        torch.autograd.grad(out, outputs, torch.from_numpy(U[..., m]), retain_graph=True)
        for m in range(U.shape[-1])
    ]
    result = {}
    for j, n in enumerate(names):
        result[n] = (
            record[n][0].detach(),
            torch.stack([g[j] for g in grads], dim=-1).detach().numpy(),
        )
    return result, modules


@needs_torch
@pytest.mark.parametrize("name", ["resnet_tanh", "mlp_nested"])
def test_layer_taps_match_torch_hooks_and_autograd(name):
    import torch

    ours, theirs, prob = problem(name, seed=5)
    lin = ours.linearize(prob["params"], prob["x"])
    taps = lin.layer_taps(prob["U"])
    names = [tap.name for tap in taps]
    parameter_names = [n for n, _ in theirs.named_parameters()]
    expected_names = [n[: -len(".weight")] for n in parameter_names if n.endswith(".weight")]
    assert names == expected_names
    if name == "resnet_tanh":
        assert names == ["0.0", "0.2.block.0", "0.2.block.2", "0.4.block.0", "0.4.block.2",
                         "0.4.shortcut", "1"]  # fmt: skip
    else:
        assert "2.block.2.shortcut" in names and "2.block.2.block.0" in names
    reference, modules = _torch_taps(theirs, prob["params"], prob["x"], prob["U"], names)
    grads = lin.vjp(prob["U"])
    for tap in taps:
        module = modules[tap.name]
        assert tap.weight_index == parameter_names.index(f"{tap.name}.weight")
        bias = f"{tap.name}.bias"
        assert tap.bias_index == (parameter_names.index(bias) if bias in parameter_names else None)
        inputs, out_grads = reference[tap.name]
        M = prob["U"].shape[-1]
        if isinstance(module, torch.nn.Conv2d):
            patches = torch.nn.functional.unfold(
                inputs, module.kernel_size, padding=module.padding, stride=module.stride
            )
            expected_inputs = patches.permute(0, 2, 1).numpy()  # (N, S, D)
            N, C = out_grads.shape[:2]
            expected_grads = np.moveaxis(out_grads.reshape(N, C, -1, M), 1, 2)  # (N, S, C, M)
        else:
            expected_inputs, expected_grads = inputs.numpy(), out_grads
        assert_close(tap.inputs, expected_inputs)
        assert_close(tap.output_grads, expected_grads)
        # the taps reproduce the weight gradients of the VJP
        a = np.reshape(tap.inputs, (-1, tap.inputs.shape[-1]))
        g = np.reshape(tap.output_grads, (-1, tap.matrix_shape[0], M))
        weight_grad = np.einsum("nom,ni->oim", g, a)
        expected = np.reshape(grads[tap.weight_index], tap.matrix_shape + (M,))
        assert_close(weight_grad, expected)


def test_taps_without_cotangents_name_every_inner_layer():
    ours, _, prob = _problem_without_torch()
    lin = ours.linearize(prob["params"], prob["x"])
    taps = lin.layer_taps()
    assert [(t.name, t.weight_index, t.bias_index) for t in taps] == [
        ("0", 0, 1),
        ("2.block.0", 2, 3),
        ("2.block.2", 4, 5),
        ("3", 6, 7),
    ]
    assert all(t.output_grads is None for t in taps)


def test_taps_of_a_residual_that_is_the_first_layer():
    layer = nn.Residual(nn.Linear(3, 3), shortcut=nn.Sequential(nn.Tanh(), nn.Linear(3, 3)))
    model = nn.Sequential(layer, nn.Tanh())
    prob = random_problem(model, (4, 3), 2, seed=1)
    lin = model.linearize(prob["params"], prob["x"])
    taps = lin.layer_taps(prob["U"])
    assert [(t.name, t.weight_index, t.bias_index) for t in taps] == [
        ("0.block", 0, 1),
        ("0.shortcut.1", 2, 3),
    ]
    grads = lin.vjp(prob["U"])
    for tap in taps:
        weight_grad = np.einsum("nom,ni->oim", tap.output_grads, tap.inputs)
        assert_close(weight_grad, grads[tap.weight_index])


# -- K-FAC, EKFAC and the diagonals through the taps ----------------------------------------


def _kfac_classes():
    from curvlinops.curvature.ekfac import EKFACLinearOperator
    from curvlinops.curvature.kfac import KFACLinearOperator

    return {"KFAC": KFACLinearOperator, "EKFAC": EKFACLinearOperator}


def _block_indices(params, indices):
    offsets = np.concatenate([[0], np.cumsum([p.size for p in params])])
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in indices])


@needs_torch
@pytest.mark.parametrize("approximation", ["KFAC", "EKFAC"])
def test_kfac_and_ekfac_cover_every_parameter_of_the_resnet(approximation):
    ours, _, prob = problem("resnet_tanh", seed=6)
    data = _data("resnet_tanh", 7)
    op = _kfac_classes()[approximation](ours, MSELoss(), prob["params"], data)
    covered = sorted(
        i for layer in op.layers for i in (layer.weight_index, layer.bias_index) if i is not None
    )
    assert covered == list(range(len(prob["params"])))
    dense = op.to_dense()
    assert dense.shape == (sum(p.size for p in prob["params"]),) * 2
    assert np.all(np.isfinite(dense))
    np.testing.assert_allclose(dense, dense.T, atol=1e-12)
    assert np.min(np.linalg.eigvalsh(dense)) > -1e-10


@needs_torch
@pytest.mark.parametrize("name", ["resnet_tanh", "mlp_nested"])
def test_ggn_diagonal_equals_the_dense_ggn_diagonal(name):
    from curvlinops import GGNDiagonalLinearOperator

    ours, _, prob = problem(name, seed=8)
    data = _data(name, 9)
    diagonal = GGNDiagonalLinearOperator(ours, MSELoss(), prob["params"], data).diagonal()
    dense = GGNLinearOperator(ours, MSELoss(), prob["params"], data).to_dense()
    assert_close(np.asarray(diagonal), np.diag(dense))


@needs_torch
@pytest.mark.parametrize("approximation", ["KFAC", "EKFAC"])
@pytest.mark.parametrize("model", ["resnet", "mlp_nested"])
def test_kfac_is_exact_per_layer_for_one_datum_and_one_pixel(model, approximation):
    """One datum and one position per layer: each layer's GGN block is ``B (x) A``.

    A layer's weight Jacobian of the outputs for the datum is ``g_c a^T`` per output
    ``c`` with a single input ``a`` (one patch of the 1x1 images), so its exact type-2
    GGN block ``sum_c (g_c g_c^T) (x) (a a^T)`` is one Kronecker product; with the bias
    joined to the weight (``a`` augmented by a one) the joint block is exact too.
    """
    if model == "resnet":
        ours, _ = resnet("tanh", spatial=1)
        x_shape = (1, 2, 1, 1)
    else:
        ours, _ = residual_mlp("tanh", nested=True)
        x_shape = (1, 3)
    rng = np.random.default_rng(10)
    params = [0.7 * rng.standard_normal(s) for s in ours.expected_param_shapes()]
    data = [(rng.standard_normal(x_shape), rng.standard_normal((1, 2)))]
    op = _kfac_classes()[approximation](
        ours, MSELoss(), params, data, separate_weight_and_bias=False
    )
    kfac = op.to_dense()
    ggn = GGNLinearOperator(ours, MSELoss(), params, data).to_dense()
    for layer in op.layers:
        group = [i for i in (layer.weight_index, layer.bias_index) if i is not None]
        ix = _block_indices(params, group)
        assert_close(kfac[np.ix_(ix, ix)], ggn[np.ix_(ix, ix)], rtol=1e-9)


# -- the layer protocol ---------------------------------------------------------------------


@needs_torch
def test_layers_bind_the_residual_as_one_layer_with_an_exact_backward_gradient():
    import torch

    ours, theirs, prob = problem("mlp_nested", seed=11)
    lin = ours.linearize(prob["params"], prob["x"])
    layers = lin.layers()
    assert [layer.name for layer in layers] == ["0", "1", "2", "3", "4"]
    residual = layers[2]
    n_block = len(ours[2].expected_param_shapes())
    assert residual.param_indices == tuple(range(2, 2 + n_block))
    assert residual.description.startswith("Residual(Sequential(Linear(4, 4")
    a = lin._states[2]["input"]
    g = np.random.default_rng(0).standard_normal(a.shape)
    a_t = torch.from_numpy(a).requires_grad_(True)
    names = [n for n, _ in theirs[2].named_parameters()]
    params = [torch.from_numpy(p) for p in prob["params"][2 : 2 + n_block]]
    out = torch.func.functional_call(theirs[2], dict(zip(names, params, strict=True)), (a_t,))
    (expected,) = torch.autograd.grad(out, a_t, torch.from_numpy(g))
    assert_close(residual.backward_gradient(g), expected.numpy())


@needs_torch
@pytest.mark.parametrize("name", sorted(MODELS))
def test_hessian_diagonal_through_residual_blocks_matches_torch_func(name):
    """The walk goes down both paths and adds their cross terms: against ``hessian`` of
    the torch twin (identity and strided 1x1 shortcuts, a nested block)."""
    import torch

    from curvlinops import HessianDiagonalLinearOperator

    ours, theirs, prob = problem(name, seed=12)
    data = _data(name, 13)
    diagonal = HessianDiagonalLinearOperator(ours, MSELoss(), prob["params"], data).diagonal()
    call = _functional(theirs, [tuple(p.shape) for p in prob["params"]])
    X, Y = (torch.from_numpy(np.concatenate(a)) for a in zip(*data, strict=True))

    def loss(theta):
        return torch.mean((call(theta, X) - Y) ** 2)

    theta = torch.from_numpy(flat(prob["params"]))
    reference = torch.diagonal(torch.func.hessian(loss)(theta)).numpy()
    assert_close(np.asarray(diagonal), reference, rtol=1e-9)


@needs_torch
def test_the_residuals_per_datum_curvature_rule_is_the_exact_input_hessian():
    """``backward_curvature`` of a block with a projection: the Hessian with respect to
    its inputs of ``psi(y) = g.(y - y0) + (y - y0)^T H (y - y0) / 2`` at ``y0``, per datum,
    against ``torch.func.hessian`` of the torch twin."""
    import torch

    t = _Twin("tanh")
    block = t.residual(
        t.seq(t.linear(3, 4), t.act(), t.linear(4, 2)), shortcut=t.linear(3, 2, bias=False)
    )
    rng = np.random.default_rng(14)
    params = [0.8 * rng.standard_normal(s) for s in block[0].expected_param_shapes()]
    x = rng.standard_normal((3, 3))
    M = rng.standard_normal((3, 2, 2))
    H, g = M + np.swapaxes(M, 1, 2), rng.standard_normal((3, 2))
    bound = block[0].linearized(params, {"input": x, "channels_first": False}, npx, name="5")
    ours = bound.backward_curvature(H, g)
    names = [n for n, _ in block[1].named_parameters()]
    weights = dict(zip(names, (torch.from_numpy(p) for p in params), strict=True))
    y0 = torch.func.functional_call(block[1], weights, (torch.from_numpy(x),)).detach()

    def psi(xn, n):
        dy = torch.func.functional_call(block[1], weights, (xn[None, :],))[0] - y0[n]
        return torch.dot(torch.from_numpy(g[n]), dy) + 0.5 * dy @ torch.from_numpy(H[n]) @ dy

    expected = np.stack(
        [torch.func.hessian(psi)(torch.from_numpy(x[n]), n).numpy() for n in range(3)]
    )
    assert_close(ours, expected)
    # the cross terms alone are J_b^T H J_s + J_s^T H J_b (not vacuous: they are not zero)
    cross = bound.cross_curvature(H, g)
    assert np.abs(cross).max() > 1e-2
    assert bound.tap() is None
    block_layers, shortcut_layers = bound.branches()
    assert [la.name for la in block_layers] == ["5.block.0", "5.block.1", "5.block.2"]
    assert [la.name for la in shortcut_layers] == ["5.shortcut"]
    assert [la.param_indices for la in block_layers] == [(0, 1), (), (2, 3)]


def test_the_residuals_batch_averaged_rules_as_one_layer_refuse_with_the_reason():
    layer = nn.Residual(nn.Linear(2, 2))
    bound = layer.linearized(layer.init(0, xp=npx), {"input": np.ones((3, 2))}, npx, name="7")
    for call in (
        lambda: bound.curvature_statistics(np.ones((3, 2))),
        lambda: bound.backward_mean_curvature(np.eye(2), None),
    ):
        with pytest.raises(MissingLayerRuleError, match="batch-averaged.*walk goes down its"):
            call()
    with pytest.raises(MissingLayerRuleError, match="cross-curvature rule without statistics"):
        bound.backward_mean_cross_curvature(np.eye(2), None)


# -- construction, parameters, errors -------------------------------------------------------


def test_parameters_are_the_blocks_then_the_shortcuts():
    layer = nn.Residual(
        nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1)),
        shortcut=nn.Conv2d(2, 4, 1, stride=2, bias=False),
    )
    assert layer.expected_param_shapes() == [(4, 2, 3, 3), (4,), (4, 4, 1, 1), (4,), (4, 2, 1, 1)]
    params = layer.init(0, xp=npx, dtype=npx.float64)
    assert [p.shape for p in params] == layer.expected_param_shapes()
    bound = 1 / np.sqrt(2)  # the shortcut's initializer: U(-1/sqrt(fan_in), ...)
    assert np.all(np.abs(params[4]) <= bound)
    assert layer.input_layout == layer.output_layout == "channels_first"
    assert nn.Residual(nn.Tanh()).input_layout is None
    assert repr(nn.Residual(nn.Tanh())) == "Residual(Tanh())"
    assert repr(nn.Residual(nn.Tanh(), shortcut=nn.Linear(2, 2))) == (
        "Residual(Tanh(), shortcut=Linear(2, 2, bias=True))"
    )
    model = nn.Sequential(nn.Linear(2, 2), nn.Residual(nn.Linear(2, 2)))
    assert [n for n, _ in model.chain()] == ["0", "1"]


def test_the_forward_pass_is_the_sum_of_both_paths():
    block = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    shortcut = nn.Linear(3, 3, bias=False)
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s) for s in nn.Residual(block, shortcut).expected_param_shapes()]
    x = rng.standard_normal((4, 3))
    expected = block(params[:2], x) + shortcut(params[2:], x)
    assert_close(nn.Residual(block, shortcut)(params, x), expected)
    assert_close(nn.Residual(block)(params[:2], x), block(params[:2], x) + x)


def test_identity_shortcut_with_a_shape_changing_block_raises():
    layer = nn.Residual(nn.Linear(3, 4))
    params = layer.init(0, xp=npx, dtype=npx.float64)
    match = r"identity shortcut needs a block that keeps the shape.*\(2, 3\) to \(2, 4\)"
    with pytest.raises(ValueError, match=match):
        layer(params, np.ones((2, 3)))
    with pytest.raises(ValueError, match=match):
        nn.Sequential(nn.Tanh(), layer).linearize(params, np.ones((2, 3)))
    both = nn.Residual(nn.Linear(3, 4), shortcut=nn.Linear(3, 5))
    with pytest.raises(ValueError, match=r"block gives \(2, 4\) and the shortcut \(2, 5\)"):
        both(both.init(0, xp=npx, dtype=npx.float64), np.ones((2, 3)))


def test_non_module_block_or_shortcut_raises_type_error():
    with pytest.raises(TypeError, match="its block is a str"):
        nn.Residual("conv")
    with pytest.raises(TypeError, match="its shortcut is a int"):
        nn.Residual(nn.Tanh(), shortcut=3)
    if HAS_TORCH:
        import torch

        with pytest.raises(TypeError, match="its block is a Linear"):
            nn.Residual(torch.nn.Linear(2, 2))


def test_the_verify_checks_pass_on_a_native_resnet():
    """Finite differences and the taps' consistency checks (no torch needed)."""
    from curvlinops.verify import check_jvp, check_layer_taps, check_second_order, check_vjp

    model = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1),
        nn.Tanh(),
        nn.Residual(
            nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 1)),
            shortcut=nn.Conv2d(2, 3, 1, stride=2),
        ),
        nn.Residual(nn.Sequential(nn.Tanh(), nn.Conv2d(3, 3, 3, padding=1))),
        nn.Flatten(),
        nn.Linear(12, 2),
    )
    params = model.init(0, xp=npx, dtype=npx.float64)
    x = np.random.default_rng(0).standard_normal((2, 2, 4, 4))
    for check in (check_jvp, check_vjp, check_second_order, check_layer_taps):
        report = check(model, params, x)
        assert report.passed, report


def test_the_layer_protocol_check_passes_through_a_block_with_a_projection():
    """The per-datum curvature pulled back through the block (its own rule) against the
    second-order product at the first layer (curvlinops.verify, no torch needed)."""
    from curvlinops.verify import check_layer_protocol

    block = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    model = nn.Sequential(
        nn.Linear(2, 3),
        nn.Tanh(),
        nn.Residual(block, shortcut=nn.Linear(3, 3, bias=False)),
        nn.Sigmoid(),
        nn.Linear(3, 2),
    )
    params = model.init(0, xp=npx, dtype=npx.float64)
    report = check_layer_protocol(model, params, np.random.default_rng(1).standard_normal((4, 2)))
    assert report.passed and "per-datum curvature at 2" in report.details, report


# -- what the Residual asks of its inner layers ---------------------------------------------


def _spied_residual(log):
    """``Res(Tanh, Linear, Tanh, Linear; shortcut Linear)`` whose inner layers log the
    ``need_input`` each of their backward rules is asked for (a user's own layer sees it)."""
    layers = {
        "act0": nn.Tanh(),
        "lin1": nn.Linear(3, 3),
        "act2": nn.Tanh(),
        "lin3": nn.Linear(3, 3),
        "skip": nn.Linear(3, 3),
    }
    for label, layer in layers.items():
        for method in ("backward", "r_backward", "backward_taps"):
            rule = getattr(layer, method)

            def spy(*args, _rule=rule, _call=(label, method), **kwargs):
                log.append((*_call, kwargs.get("need_input", True)))  # True: the default
                return _rule(*args, **kwargs)

            setattr(layer, method, spy)
    block = nn.Sequential(layers["act0"], layers["lin1"], layers["act2"], layers["lin3"])
    return nn.Residual(block, shortcut=layers["skip"])


def _fd_gradient(f, arrays, eps=1e-6):
    """Central differences of the scalar ``f(arrays)`` with respect to every entry."""
    grads = []
    for i, a in enumerate(arrays):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            shifted = [b.copy() for b in arrays]
            shifted[i][idx] += eps
            up = f(shifted)
            shifted[i][idx] -= 2 * eps
            g[idx] = (up - f(shifted)) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize("need_input", [False, True])
def test_inner_layers_are_asked_only_for_the_cotangents_the_residual_needs(need_input):
    """Without input cotangents the walk stops at the block's first layer with
    parameters and asks it (and the shortcut) for none; the values do not change."""
    log = []
    layer = _spied_residual(log)
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(s) for s in layer.expected_param_shapes()]
    a = rng.standard_normal((4, 3))
    g = rng.standard_normal((4, 1, 3))
    state = {"input": a, "channels_first": False}
    layer.forward_with_state(params, a, npx, state)
    # the block's walk from its last layer, then the shortcut's
    if need_input:
        asked = [("lin3", True), ("act2", True), ("lin1", True), ("act0", True), ("skip", True)]
    else:
        asked = [("lin3", True), ("act2", True), ("lin1", False), ("skip", False)]

    def calls(method):
        return [(label, flag) for label, m, flag in log if m == method]

    grads, g_in = layer.backward(params, state, g, npx, need_input=need_input)
    assert calls("backward") == asked
    reference = _fd_gradient(
        lambda ps: float(np.sum(g[:, 0] * layer(ps[:-1], ps[-1]))), [*params, a]
    )
    for grad, expected in zip(grads, reference[:-1], strict=True):
        assert_close(grad[..., 0], expected, rtol=1e-7)
    if need_input:
        assert_close(g_in[:, 0], reference[-1], rtol=1e-7)
    else:
        assert g_in is None

    log.clear()
    dparams = [rng.standard_normal(p.shape + (2,)) for p in params]
    ta, rg = rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 2, 3))
    rgrads, g_r, rg_in = layer.r_backward(
        params, dparams, state, ta, g, rg, npx, need_input=need_input
    )
    assert calls("r_backward") == asked
    full = layer.r_backward(params, dparams, state, ta, g, rg, npx)
    for x, y in zip(rgrads, full[0], strict=True):
        assert_close(x, y)
    assert (g_r is None and rg_in is None) != need_input

    log.clear()
    taps, g_t = layer.backward_taps(
        params, state, g, npx, name="r", param_indices=range(6), need_input=need_input
    )
    assert calls("backward_taps") == asked
    assert [t.name for t in taps] == ["r.block.1", "r.block.3", "r.shortcut"]
    assert (g_t is None) != need_input


def test_a_memo_serves_one_r_backward_and_a_second_use_raises():
    """The Residual frees a memo's inner tangents as its backward pass goes: reusing the
    memo would give the products without them, so it is refused."""
    layer = nn.Residual(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), shortcut=nn.Linear(3, 3))
    rng = np.random.default_rng(1)
    params = layer.init(0, xp=npx, dtype=npx.float64)
    dparams = [rng.standard_normal(p.shape + (2,)) for p in params]
    a = rng.standard_normal((4, 3))
    state = {"input": a, "channels_first": False}
    ta, g, rg = (rng.standard_normal(s) for s in ((4, 2, 3), (4, 1, 3), (4, 2, 3)))
    _, memo = layer.tangent_with_memo(params, dparams, state, ta, npx)
    layer.r_backward(params, dparams, state, memo, g, rg, npx)
    expected = (
        "Residual.r_backward got a memo of tangent_with_memo that an earlier r_backward "
        "already used (it frees the inner tangents as it goes); call tangent_with_memo "
        "again for each r_backward, or pass the plain input tangent."
    )
    with pytest.raises(ValueError) as err:
        layer.r_backward(params, dparams, state, memo, g, rg, npx)
    assert str(err.value) == expected
    # a plain input tangent can be passed any number of times
    once = layer.r_backward(params, dparams, state, ta, g, rg, npx)
    twice = layer.r_backward(params, dparams, state, ta, g, rg, npx)
    for x, y in zip(once[0], twice[0], strict=True):
        assert_close(x, y)


def test_cross_curvature_statistics_count_positions_of_channels_last_sequences():
    """Through ``Residual(Linear)`` every datum and position has the Jacobian ``W``: on
    channels-last ``(N, S, D)`` inputs the statistics are ``N S W`` over ``N S`` items
    (positions are items; the features are the last axis)."""
    layer = nn.Residual(nn.Linear(2, 2, bias=False))
    W = npx.asarray([[1.0, 2.0], [3.0, 4.0]])
    state = {"input": npx.ones((3, 4, 2)), "channels_first": False}
    (block, shortcut), items = layer.cross_curvature_statistics(
        [W], state, npx.zeros((3, 4, 2)), None, npx
    )
    assert items == 12 and shortcut is None
    np.testing.assert_array_equal(block, 12 * np.asarray(W))


def test_backward_taps_without_the_input_cotangent_return_none_for_it():
    """``need_input=False``: the taps only, for an identity shortcut too (its path would
    otherwise hand the output cotangent through as the input's)."""
    layer = nn.Residual(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    params = layer.init(0, xp=npx, dtype=npx.float64)
    g = np.ones((4, 1, 2))  # (N, M, D)
    taps, g_in = layer.backward_taps(
        params, {"input": np.ones((4, 2))}, g, npx, name="5", param_indices=(0, 1),
        need_input=False,
    )  # fmt: skip
    assert g_in is None and [t.name for t in taps] == ["5.block.0"]
    _, g_in = layer.backward_taps(
        params, {"input": np.ones((4, 2))}, g, npx, name="5", param_indices=(0, 1)
    )
    assert g_in.shape == (4, 1, 2)
