"""Transformer layers (LayerNorm, Embedding, positions, attention, blocks, a GPT) in float64.

Each layer is placed after a Linear (so that its input tangents are nonzero) and built
twice, natively and as a torch model with the same weights (``torch.nn.LayerNorm``,
``torch.nn.Embedding``, ``torch.nn.MultiheadAttention(batch_first=True)`` in evaluation
mode with an explicit causal mask, ``torch.nn.Linear``/``GELU``). Checked: forward, JVP,
VJP and the second-order product (the R-operator) with K > 1 vectors against torch.func
(reverse-over-reverse for the Hessian products); finite differences for attention's
second-order product; the dense GGN and Hessian of a tiny GPT against
``jacrev``/``hessian``; K-FAC, EKFAC and the GGN diagonal over every parameter of a GPT;
K-FAC exact where it provably is; the taps; the layer protocol (LayerNorm's exact
per-datum rule, refusals); attention's rules on a state without a forward pass (against
finite differences); integer inputs; the whole error messages; causal masking; other
backends.
"""

from __future__ import annotations

import math

import array_api_compat.numpy as npx
import numpy as np
import pytest
from monte_carlo import assert_unbiased
from nn_reference import HAS_TORCH, fd_second_order, flat, flat_k

from curvlinops import GGNLinearOperator, HessianLinearOperator, MSELoss, nn
from curvlinops.models import MissingLayerRuleError

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")

K = 3


def assert_close(actual, expected, rtol=1e-10):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.fixture(autouse=True)
def _no_torch_attention_fast_path():
    """torch's fused attention kernels have no forward-mode AD: use the plain path."""
    if not HAS_TORCH:
        yield
        return
    import torch

    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


# -- the models, twice ---------------------------------------------------------------------


def sinusoidal_reference(S, E):
    """The encodings of Vaswani et al. written out position by position."""
    pe = np.zeros((S, E))
    for p in range(S):
        for i in range(0, E, 2):
            angle = p / 10000 ** (i / E)
            pe[p, i] = math.sin(angle)
            if i + 1 < E:
                pe[p, i + 1] = math.cos(angle)
    return pe


def _torch_classes():
    import torch

    class Residual(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x):
            return x + self.block(x)

    class Attention(torch.nn.Module):
        def __init__(self, E, H, causal, bias):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(
                E, H, bias=bias, batch_first=True, dtype=torch.float64
            )
            self.causal = causal
            self.eval()

        def forward(self, x):
            S = x.shape[1]
            mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1) if self.causal else None
            return self.attn(x, x, x, attn_mask=mask, need_weights=True)[0]

    class Block(torch.nn.Module):
        def __init__(self, E, H, ratio, causal):
            super().__init__()
            self.ln1 = torch.nn.LayerNorm(E, dtype=torch.float64)
            self.attn = Attention(E, H, causal, True)
            self.ln2 = torch.nn.LayerNorm(E, dtype=torch.float64)
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(E, ratio * E, dtype=torch.float64),
                torch.nn.GELU(),
                torch.nn.Linear(ratio * E, E, dtype=torch.float64),
            )

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class Sinusoidal(torch.nn.Module):
        def forward(self, x):
            pe = torch.from_numpy(sinusoidal_reference(x.shape[1], x.shape[2]))
            return x + pe

    class Positions(torch.nn.Module):
        def __init__(self, max_len, E):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(max_len, E, dtype=torch.float64))

        def forward(self, x):
            return x + self.weight[: x.shape[1]]

    return Residual, Attention, Block, Sinusoidal, Positions


class _Twin:
    """Builds a native layer and its torch twin side by side."""

    def __init__(self):
        import torch

        self.torch = torch
        self.Residual, self.Attention, self.Block, self.Sinusoidal, self.Positions = (
            _torch_classes()
        )

    def linear(self, d_in, d_out, bias=True):
        t = self.torch
        return nn.Linear(d_in, d_out, bias=bias), t.nn.Linear(
            d_in, d_out, bias=bias, dtype=t.float64
        )

    def layer_norm(self, D, affine=True, bias=True):
        t = self.torch
        ours = nn.LayerNorm(D, eps=1e-5, elementwise_affine=affine, bias=bias)
        theirs = t.nn.LayerNorm(D, eps=1e-5, elementwise_affine=affine, bias=bias, dtype=t.float64)
        return ours, theirs

    def tanh(self):
        return nn.Tanh(), self.torch.nn.Tanh()

    def gelu(self):
        return nn.GELU(), self.torch.nn.GELU()

    def embedding(self, V, D):
        t = self.torch
        return nn.Embedding(V, D), t.nn.Embedding(V, D, dtype=t.float64)

    def attention(self, E, H, causal=False, bias=True):
        ours = nn.MultiheadSelfAttention(E, H, causal=causal, bias=bias)
        return ours, self.Attention(E, H, causal, bias)

    def block(self, E, H, ratio=2, causal=True):
        return nn.TransformerBlock(E, H, mlp_ratio=ratio, causal=causal), self.Block(
            E, H, ratio, causal
        )

    def sinusoidal(self):
        return nn.SinusoidalPositions(), self.Sinusoidal()

    def positions(self, max_len, E):
        return nn.PositionalEmbedding(max_len, E), self.Positions(max_len, E)

    def seq(self, *pairs):
        return nn.Sequential(*[p[0] for p in pairs]), self.torch.nn.Sequential(
            *[p[1] for p in pairs]
        )


def gpt(V, E, H, blocks, ratio=2, positions="sinusoidal", max_len=None):
    """``Embedding, positions, blocks..., LayerNorm, Linear`` (a small GPT), twice."""
    t = _Twin()
    pos = t.sinusoidal() if positions == "sinusoidal" else t.positions(max_len, E)
    return t.seq(
        t.embedding(V, E),
        pos,
        *[t.block(E, H, ratio) for _ in range(blocks)],
        t.layer_norm(E),
        t.linear(E, V),
    )


def _models():
    t = _Twin()
    return {
        "layer_norm": (
            lambda: t.seq(t.linear(3, 5), t.layer_norm(5), t.tanh(), t.linear(5, 2)),
            (4, 3, 3),
        ),
        "layer_norm_flat": (lambda: t.seq(t.linear(3, 5), t.layer_norm(5), t.linear(5, 2)), (4, 3)),
        "layer_norm_no_bias": (
            lambda: t.seq(t.linear(3, 4), t.layer_norm(4, bias=False), t.tanh(), t.linear(4, 2)),
            (3, 2, 3),
        ),
        "layer_norm_no_affine": (
            lambda: t.seq(t.linear(3, 4), t.layer_norm(4, affine=False), t.tanh(), t.linear(4, 2)),
            (3, 2, 3),
        ),
        "attention": (lambda: t.seq(t.linear(4, 8), t.attention(8, 2), t.linear(8, 3)), (3, 5, 4)),
        "attention_causal": (
            lambda: t.seq(t.linear(4, 8), t.attention(8, 4, causal=True), t.tanh(), t.linear(8, 3)),
            (3, 5, 4),
        ),
        "attention_no_bias": (
            lambda: t.seq(t.linear(4, 6), t.attention(6, 3, bias=False), t.linear(6, 2)),
            (2, 4, 4),
        ),
        "embedding": (
            lambda: t.seq(t.embedding(7, 4), t.tanh(), t.linear(4, 3)),
            ("ids", 7, (3, 5)),
        ),
        "positions": (
            lambda: t.seq(t.linear(3, 4), t.positions(6, 4), t.tanh(), t.linear(4, 2)),
            (3, 5, 3),
        ),
        "sinusoidal": (
            lambda: t.seq(t.linear(3, 4), t.sinusoidal(), t.tanh(), t.linear(4, 2)),
            (3, 5, 3),
        ),
        "block": (lambda: t.seq(t.linear(3, 8), t.block(8, 2), t.linear(8, 2)), (2, 5, 3)),
        "gpt": (lambda: gpt(20, 16, 4, 2), ("ids", 20, (2, 8))),
        "gpt_learned_positions": (
            lambda: gpt(9, 8, 2, 1, positions="learned", max_len=6),
            ("ids", 9, (2, 5)),
        ),
    }


MODELS = sorted(_models()) if HAS_TORCH else []


def _inputs(x_spec, rng):
    if x_spec[0] == "ids":
        _, V, shape = x_spec
        return rng.integers(0, V, size=shape)
    return rng.standard_normal(x_spec)


def problem(name, seed=0, scale=0.5):
    """Our model, the torch twin with copied weights, and a random problem in NumPy."""
    import torch

    build, x_spec = _models()[name]
    ours, theirs = build()
    shapes = ours.expected_param_shapes()
    assert shapes == [tuple(p.shape) for p in theirs.parameters()]
    rng = np.random.default_rng(seed)
    params = [scale * rng.standard_normal(s) for s in shapes]
    with torch.no_grad():
        for p, value in zip(theirs.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(value))
    x = _inputs(x_spec, rng)
    out_shape = ours(params, x).shape
    prob = {
        "params": params,
        "x": x,
        "V": [rng.standard_normal(s + (K,)) for s in shapes],
        "U": rng.standard_normal(out_shape + (K,)),
        "u": rng.standard_normal(out_shape),
        "w": rng.standard_normal(out_shape + (K,)),
    }
    return ours, theirs, prob


def _functional(theirs, shapes):
    import torch

    names = [name for name, _ in theirs.named_parameters()]

    def call(theta, x):
        params, start = [], 0
        for s in shapes:
            size = math.prod(s)
            params.append(torch.reshape(theta[start : start + size], s))
            start += size
        return torch.func.functional_call(theirs, dict(zip(names, params, strict=True)), (x,))

    return call


def torch_products(theirs, prob):
    """Outputs, J V, J^T U and ``(sum u Hess f) V + J^T w`` from torch.func, as NumPy.

    The Hessian products by reverse-over-reverse (the VJP of the gradient: the Hessian
    is symmetric), the JVPs by forward mode.
    """
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
    _, hvp = torch.func.vjp(torch.func.grad(lambda t: torch.sum(u * f(t))), theta)
    second = torch.stack([hvp(V[:, k])[0] + pull(w[..., k])[0] for k in range(K)], dim=-1)
    return {
        "outputs": outputs.detach().numpy(),
        "JV": JV.detach().numpy(),
        "JtU": JtU.detach().numpy(),
        "second": second.detach().numpy(),
    }


# -- derivative products -------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("name", MODELS)
def test_products_match_torch_func(name):
    ours, theirs, prob = problem(name)
    lin = ours.linearize(prob["params"], prob["x"])
    reference = torch_products(theirs, prob)
    assert_close(lin.outputs, reference["outputs"])
    assert_close(ours(prob["params"], prob["x"]), reference["outputs"])
    assert_close(lin.jvp(prob["V"]), reference["JV"])
    assert_close(flat_k(lin.vjp(prob["U"])), reference["JtU"])
    second = lin.second_order_vjp(prob["u"], prob["V"], prob["w"])
    assert_close(flat_k(second), reference["second"], rtol=1e-9)


@needs_torch
@pytest.mark.parametrize("name", ["attention", "attention_causal", "layer_norm", "block"])
def test_second_order_cross_terms_reach_the_first_linear(name):
    """Tangent along the first Linear only: the R-operator's terms through the layer."""
    ours, theirs, prob = problem(name, seed=3)
    V = [np.zeros(v.shape) for v in prob["V"]]
    V[0] = prob["V"][0]
    prob = dict(prob, V=V, w=np.zeros_like(prob["w"]))
    lin = ours.linearize(prob["params"], prob["x"])
    second = flat_k(lin.second_order_vjp(prob["u"], V, None))
    reference = torch_products(theirs, prob)["second"]
    assert np.max(np.abs(reference)) > 1e-3
    assert_close(second, reference, rtol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_second_order_product_matches_finite_differences(causal):
    model = nn.Sequential(
        nn.Linear(3, 6), nn.MultiheadSelfAttention(6, 2, causal=causal), nn.Tanh(), nn.Linear(6, 2)
    )
    rng = np.random.default_rng(1)
    params = [0.7 * rng.standard_normal(s) for s in model.expected_param_shapes()]
    x = rng.standard_normal((2, 4, 3))
    V = [rng.standard_normal(p.shape + (K,)) for p in params]
    u = rng.standard_normal((2, 4, 2))
    second = model.linearize(params, x).second_order_vjp(u, V, None)
    reference = fd_second_order(model, params, x, u, V)
    assert_close(flat_k(second), reference, rtol=1e-7)


def test_attention_k_vectors_equal_k_separate_products_and_the_memo_path():
    layer = nn.MultiheadSelfAttention(4, 2, causal=True)
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(p.shape) for p in layer.init(1, xp=npx, dtype=npx.float64)]
    dparams = [rng.standard_normal(p.shape + (K,)) for p in params]
    a = rng.standard_normal((2, 3, 4))
    state = {"input": a, "channels_first": False}
    layer.forward_with_state(params, a, npx, state)
    ta, g, rg = (rng.standard_normal(s) for s in ((2, 3, K, 4), (2, 3, 1, 4), (2, 3, K, 4)))
    out, memo = layer.tangent_with_memo(params, dparams, state, ta, npx)
    assert_close(out, layer.tangent(params, dparams, state, ta, npx))
    with_memo = layer.r_backward(params, dparams, state, memo, g, rg, npx)
    plain = layer.r_backward(params, dparams, state, ta, g, rg, npx)
    for x, y in zip(with_memo[0], plain[0], strict=True):
        assert_close(x, y)
    assert_close(with_memo[2], plain[2])
    for k in range(K):
        one = layer.r_backward(
            params, [d[..., k : k + 1] for d in dparams], state, ta[:, :, k : k + 1],
            g, rg[:, :, k : k + 1], npx,
        )  # fmt: skip
        for x, y in zip(with_memo[0], one[0], strict=True):
            assert_close(x[..., k : k + 1], y)
        assert_close(with_memo[2][:, :, k : k + 1], one[2])
        assert_close(with_memo[1], one[1])


def test_attention_rules_on_a_state_without_a_forward_pass():
    """Every rule called on a fresh state ``{"input": a}`` runs the forward pass itself:
    the tangent against central differences of the forward pass, the backward pass by
    the dot-product test against them, the rest as on a forwarded state."""
    layer = nn.MultiheadSelfAttention(4, 2, causal=True)
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(p.shape) for p in layer.init(1, xp=npx, dtype=npx.float64)]
    dparams = [rng.standard_normal(p.shape + (2,)) for p in params]
    a = rng.standard_normal((2, 3, 4))
    ta, g, rg = (rng.standard_normal(s) for s in ((2, 3, 2, 4), (2, 3, 1, 4), (2, 3, 2, 4)))

    def fresh():
        return {"input": a, "channels_first": False}

    h = 1e-6
    fd = np.stack(
        [
            (
                layer([p + h * d[..., k] for p, d in zip(params, dparams, strict=True)],
                      a + h * ta[:, :, k])
                - layer([p - h * d[..., k] for p, d in zip(params, dparams, strict=True)],
                        a - h * ta[:, :, k])
            ) / (2 * h)
            for k in range(2)
        ],
        axis=2,
    )  # fmt: skip
    assert_close(layer.tangent(params, dparams, fresh(), ta, npx), fd, rtol=1e-7)
    out, memo = layer.tangent_with_memo(params, dparams, fresh(), ta, npx)
    assert_close(out, fd, rtol=1e-7)
    grads, g_in = layer.backward(params, fresh(), g, npx)
    for k in range(2):  # <J^T g, (dparams, ta)> = <g, J (dparams, ta)>
        pairs = zip(grads, dparams, strict=True)
        pulled = sum(float(np.sum(gp[..., 0] * d[..., k])) for gp, d in pairs)
        pulled += float(np.sum(g_in[:, :, 0] * ta[:, :, k]))
        np.testing.assert_allclose(pulled, np.sum(g[:, :, 0] * fd[:, :, k]), rtol=1e-7)

    forwarded = fresh()
    layer.forward_with_state(params, a, npx, forwarded)
    expected = layer.r_backward(params, dparams, forwarded, memo, g, rg, npx)
    plain = layer.r_backward(params, dparams, fresh(), ta, g, rg, npx)
    for x, y in zip(plain[0], expected[0], strict=True):
        assert_close(x, y)
    assert_close(plain[1], expected[1])
    assert_close(plain[2], expected[2])
    taps, g_taps = layer.backward_taps(params, fresh(), g, npx, name="att", param_indices=range(4))
    assert_close(g_taps, g_in)
    reference_taps, _ = layer.backward_taps(
        params, forwarded, g, npx, name="att", param_indices=range(4)
    )
    assert [t.name for t in taps] == ["att.in_proj", "att.out_proj"]
    for tap, reference in zip(taps, reference_taps, strict=True):
        assert_close(tap.inputs, reference.inputs)
        assert_close(tap.output_grads, reference.output_grads)
    bound = layer.linearized(params, fresh(), npx)
    assert_close(bound.backward_gradient(g[:, :, 0]), g_in[:, :, 0])


# -- dense curvature of a tiny GPT -----------------------------------------------------------


def _gpt_data(V, S, seed, sizes=(2, 1)):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, V, size=(n, S)), rng.standard_normal((n, S, V))) for n in sizes]


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
            # reverse over reverse: torch's forward-over-reverse ``hessian`` gives an
            # asymmetric (wrong) result through the embedding's backward pass
            total = total + torch.func.jacrev(torch.func.grad(loss))(theta)
    return total.detach().numpy()


def tiny_gpt(seed=1, positions="sinusoidal"):
    """Width 8, 2 heads, sequence 4, vocabulary 5, one block (MLP ratio 2)."""
    import torch

    ours, theirs = gpt(5, 8, 2, 1, positions=positions, max_len=4)
    rng = np.random.default_rng(seed)
    params = [0.5 * rng.standard_normal(s) for s in ours.expected_param_shapes()]
    with torch.no_grad():
        for p, value in zip(theirs.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(value))
    return ours, theirs, params


@needs_torch
@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_dense_ggn_and_hessian_of_a_tiny_gpt_match_torch_func(kind):
    ours, theirs, params = tiny_gpt()
    data = _gpt_data(5, 4, seed=2)
    cls = {"ggn": GGNLinearOperator, "hessian": HessianLinearOperator}[kind]
    dense = cls(ours, MSELoss(reduction="sum"), params, data).to_dense()
    reference = _torch_dense(theirs, params, data, kind)
    assert_close(reference, reference.T, rtol=1e-12)
    assert_close(dense, reference, rtol=1e-9)


# -- tier 3: taps, K-FAC, EKFAC, diagonals -----------------------------------------------------


@needs_torch
def test_gpt_taps_name_every_layer_and_reproduce_the_gradients():
    ours, _, prob = problem("gpt", seed=5)
    lin = ours.linearize(prob["params"], prob["x"])
    taps = lin.layer_taps(prob["U"])
    names = [(t.name, t.kind, t.weight_index, t.bias_index) for t in taps]
    block = lambda i, w: [  # noqa: E731
        (f"{i}.0.block.0", "elementwise", w, w + 1),
        (f"{i}.0.block.1.in_proj", "matrix", w + 2, w + 3),
        (f"{i}.0.block.1.out_proj", "matrix", w + 4, w + 5),
        (f"{i}.1.block.0", "elementwise", w + 6, w + 7),
        (f"{i}.1.block.1", "matrix", w + 8, w + 9),
        (f"{i}.1.block.3", "matrix", w + 10, w + 11),
    ]
    assert names == [
        ("0", "embedding", 0, None), *block(2, 1), *block(3, 13), ("4", "elementwise", 25, 26),
        ("5", "matrix", 27, 28),
    ]  # fmt: skip
    grads = lin.vjp(prob["U"])
    M = prob["U"].shape[-1]
    for tap in taps:
        g = np.asarray(tap.output_grads)
        if tap.kind == "embedding":
            assert tap.matrix_shape == (16, 20)
            one_hot = np.eye(20)[np.asarray(tap.inputs)]  # (N, S, V)
            weight_grad = np.einsum("nsv,nsdm->vdm", one_hot, g)
        elif tap.kind == "elementwise":
            weight_grad = np.einsum("nsdm,nsd->dm", g, tap.inputs)
        else:
            a = np.reshape(tap.inputs, (-1, tap.inputs.shape[-1]))
            weight_grad = np.einsum("nom,ni->oim", np.reshape(g, (-1, tap.matrix_shape[0], M)), a)
        assert_close(weight_grad, grads[tap.weight_index])
        if tap.bias_index is not None:
            assert_close(np.sum(np.reshape(g, (-1, g.shape[-2], M)), axis=0), grads[tap.bias_index])
    assert all(t.output_grads is None for t in lin.layer_taps())


@needs_torch
def test_attention_taps_match_torch_autograd():
    """The projections' inputs and output gradients (of the packed ``qkv``, of the output)."""
    import torch

    ours, theirs, prob = problem("attention_causal", seed=6)
    taps = ours.linearize(prob["params"], prob["x"]).layer_taps(prob["U"])
    tap_in, tap_out = taps[1], taps[2]
    assert (tap_in.name, tap_out.name) == ("1.in_proj", "1.out_proj")
    x = torch.from_numpy(prob["x"])
    with torch.no_grad():
        a = theirs[0](x)
    mha = theirs[1].attn
    Wi, bi = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    qkv = (a @ Wi.T + bi).requires_grad_(True)
    E, H = 8, 4
    d = E // H
    q, k, v = (t.reshape(3, 5, H, d).transpose(1, 2) for t in qkv.split(E, dim=-1))
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(mask, -math.inf)
    o = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(3, 5, E)
    z = mha.out_proj(o)
    y = theirs[3](theirs[2](z))
    assert_close(y.detach().numpy(), ours(prob["params"], prob["x"]))
    expected_in, expected_out = [], []
    for m in range(K):
        gq, go = torch.autograd.grad(y, (qkv, z), torch.from_numpy(prob["U"][..., m]),
                                     retain_graph=True)  # fmt: skip
        expected_in.append(gq.numpy())
        expected_out.append(go.numpy())
    assert_close(tap_in.inputs, a.numpy())
    assert_close(tap_in.output_grads, np.stack(expected_in, axis=-1))
    assert_close(tap_out.inputs, o.detach().numpy())
    assert_close(tap_out.output_grads, np.stack(expected_out, axis=-1))
    assert tap_in.matrix_shape == (24, 8) and tap_out.matrix_shape == (8, 8)


def _kfac_classes():
    from curvlinops.curvature.ekfac import EKFACLinearOperator
    from curvlinops.curvature.kfac import KFACLinearOperator

    return {"KFAC": KFACLinearOperator, "EKFAC": EKFACLinearOperator}


def _class_data(V, S, seed, sizes=(2, 1)):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, V, size=(n, S)), rng.integers(0, V, size=(n, S))) for n in sizes]


@needs_torch
@pytest.mark.parametrize("approximation", ["KFAC", "EKFAC"])
def test_kfac_and_ekfac_cover_every_parameter_of_the_gpt(approximation):
    from curvlinops import CrossEntropyLoss

    ours, _, params = tiny_gpt(seed=6)
    op = _kfac_classes()[approximation](ours, CrossEntropyLoss(), params, _class_data(5, 4, 7))
    covered = sorted(
        i for layer in op.layers for i in (layer.weight_index, layer.bias_index) if i is not None
    )
    assert covered == list(range(len(params)))
    assert [layer.kind for layer in op.layers][:3] == ["embedding", "elementwise", "matrix"]
    dense = op.to_dense()
    assert dense.shape == (sum(p.size for p in params),) * 2
    assert np.all(np.isfinite(dense))
    np.testing.assert_allclose(dense, dense.T, atol=1e-12)
    assert np.min(np.linalg.eigvalsh(dense)) > -1e-10


@needs_torch
def test_learned_positions_are_an_embedding_of_the_positions():
    """K-FAC covers the learned positions as an embedding of the ids 0..S-1: its input
    factor is ``I / S`` on the positions in use (zero beyond), and the GGN diagonal of
    the table equals the dense GGN's."""
    from curvlinops import CrossEntropyLoss, GGNDiagonalLinearOperator

    ours, _, params = tiny_gpt(positions="learned")
    data = _class_data(5, 3, 7)  # sequences of 3 for max_len 4: one position unused
    K = _kfac_classes()["KFAC"](ours, CrossEntropyLoss(), params, data)
    covered = sorted(
        i for la in K.layers for i in (la.weight_index, la.bias_index) if i is not None
    )
    assert covered == list(range(len(params)))
    assert_close(np.asarray(K.input_factors["1"]), np.array([1, 1, 1, 0]) / 3)
    diagonal = GGNDiagonalLinearOperator(ours, CrossEntropyLoss(), params, data).diagonal()
    dense = GGNLinearOperator(ours, CrossEntropyLoss(), params, data).to_dense()
    assert_close(np.asarray(diagonal), np.diag(dense))


@needs_torch
def test_ggn_diagonal_of_the_gpt_equals_the_dense_ggn_diagonal():
    from curvlinops import CrossEntropyLoss, GGNDiagonalLinearOperator

    ours, _, params = tiny_gpt(seed=8)
    data = _class_data(5, 4, 9)
    diagonal = GGNDiagonalLinearOperator(ours, CrossEntropyLoss(), params, data).diagonal()
    dense = GGNLinearOperator(ours, CrossEntropyLoss(), params, data).to_dense()
    assert_close(np.asarray(diagonal), np.diag(dense))


def _block_indices(params, indices):
    offsets = np.concatenate([[0], np.cumsum([p.size for p in params])])
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in indices])


@needs_torch
@pytest.mark.parametrize("approximation", ["KFAC", "EKFAC"])
@pytest.mark.parametrize("model", ["attention", "gpt"])
def test_kfac_is_exact_per_layer_for_one_datum_and_one_position(model, approximation):
    """One datum, sequence length 1: every tapped layer sees one item.

    With one position the attention weights are 1 (``o = v``), and each projection's
    weight Jacobian for the datum is ``g_c a^T`` with its single input ``a`` (the joint
    ``[a; 1]`` with the bias): the exact GGN block ``sum_c g_c g_c^T (x) a a^T`` is one
    Kronecker product. The embedding's one-hot input gives ``A = e_i e_i^T``, the
    normalization layers get their exact blocks.
    """
    rng = np.random.default_rng(10)
    if model == "attention":
        ours = nn.Sequential(
            nn.Linear(3, 4), nn.Tanh(), nn.MultiheadSelfAttention(4, 2), nn.Tanh(), nn.Linear(4, 2)
        )
        data = [(rng.standard_normal((1, 1, 3)), rng.standard_normal((1, 1, 2)))]
    else:
        ours = gpt(5, 8, 2, 1)[0]
        data = [(rng.integers(0, 5, size=(1, 1)), rng.standard_normal((1, 1, 5)))]
    params = [0.7 * rng.standard_normal(s) for s in ours.expected_param_shapes()]
    op = _kfac_classes()[approximation](
        ours, MSELoss(), params, data, separate_weight_and_bias=False
    )
    kfac = op.to_dense()
    ggn = GGNLinearOperator(ours, MSELoss(), params, data).to_dense()
    assert {layer.kind for layer in op.layers} >= {"matrix"}
    for layer in op.layers:
        group = [i for i in (layer.weight_index, layer.bias_index) if i is not None]
        ix = _block_indices(params, group)
        assert_close(kfac[np.ix_(ix, ix)], ggn[np.ix_(ix, ix)], rtol=1e-9)
        assert np.max(np.abs(ggn[np.ix_(ix, ix)])) > 0 or layer.name.endswith("in_proj")


# -- the layer protocol ------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("x_shape", [(3, 3), (3, 2, 3)])
def test_hessian_diagonal_walks_exactly_through_layer_norm(x_shape):
    """LayerNorm's per-datum rule: ``J^T W H W J`` plus the normalization's curvature."""
    from curvlinops.curvature.diagonal import HessianDiagonalLinearOperator

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2))
    rng = np.random.default_rng(12)
    params = [0.8 * rng.standard_normal(s) for s in model.expected_param_shapes()]
    data = [(rng.standard_normal(x_shape), rng.standard_normal(x_shape[:-1] + (2,)))]
    diagonal = HessianDiagonalLinearOperator(model, MSELoss(), params, data).diagonal()
    dense = HessianLinearOperator(model, MSELoss(), params, data).to_dense()
    assert_close(np.asarray(diagonal), np.diag(dense), rtol=1e-9)


def test_layer_norm_per_datum_rule_is_the_hessian_of_a_scalar_function():
    """``backward_curvature`` with ``H = 0`` is ``d^2 <g, y> / dx^2`` (finite differences)."""
    layer = nn.LayerNorm(3, eps=0.1)
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(3), rng.standard_normal(3)]
    x, g = rng.standard_normal((2, 2, 3)), rng.standard_normal((2, 2, 3))
    rule = layer.backward_curvature(params, {"input": x}, np.zeros((2, 6, 6)), g, npx)
    h = 1e-4

    def grad(z):  # d <g, y> / dx per datum, flattened
        _, g_in = layer.backward(params, {"input": z}, g[:, :, None, :], npx, need_params=False)
        return np.reshape(g_in[:, :, 0, :], (2, 6))

    columns = []
    for j in range(6):
        e = np.zeros(6)
        e[j] = h
        step = np.reshape(e, (1, 2, 3))
        columns.append((grad(x + step) - grad(x - step)) / (2 * h))
    assert_close(rule, np.stack(columns, axis=-1), rtol=1e-7)


@pytest.mark.parametrize("operator", ["HessianDiagonalLinearOperator", "KFACHessianLinearOperator"])
def test_curvature_walks_refuse_attention_and_say_why(operator):
    from curvlinops.curvature.diagonal import HessianDiagonalLinearOperator
    from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator

    cls = {
        "HessianDiagonalLinearOperator": HessianDiagonalLinearOperator,
        "KFACHessianLinearOperator": KFACHessianLinearOperator,
    }[operator]
    for first in (False, True):
        layers = [nn.MultiheadSelfAttention(4, 2), nn.Tanh(), nn.Linear(4, 2)]
        model = nn.Sequential(*layers) if first else nn.Sequential(nn.Linear(3, 4), *layers)
        params = model.init(0, xp=npx, dtype=npx.float64)
        x = np.ones((2, 3, 4 if first else 3))
        data = [(x, np.zeros((2, 3, 2)))]
        with pytest.raises(MissingLayerRuleError, match="attention mixes the positions"):
            cls(model, MSELoss(), params, data).to_dense()


def test_the_batch_averaged_walk_refuses_layer_norm():
    from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator

    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    params = model.init(0, xp=npx, dtype=npx.float64)
    data = [(np.ones((2, 3)), np.zeros((2, 2)))]
    with pytest.raises(MissingLayerRuleError, match="couples a position's features"):
        KFACHessianLinearOperator(model, MSELoss(), params, data).to_dense()


# -- integer inputs and masking -------------------------------------------------------------


def test_integer_inputs_are_checked_and_not_cast():
    model = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2))
    params = model.init(0, xp=npx, dtype=npx.float64)
    ids = np.asarray([[0, 3, 1]])
    lin = model.linearize(params, ids)
    assert lin.x.dtype == np.int64
    assert_close(lin.outputs, params[0][ids] @ params[1].T + params[2])
    assert model(params, np.asarray([1, 2])).shape == (2, 2)  # ids (N,): outputs (N, D)
    with pytest.raises(ValueError, match=r"takes ids in \[0, 4\), got ids from 0 to 4"):
        model(params, np.asarray([[0, 4]]))
    with pytest.raises(ValueError, match=r"got ids from -1 to 2"):
        model.linearize(params, np.asarray([[-1, 2]]))
    with pytest.raises(TypeError, match=r"takes integer inputs, but the inputs are float64"):
        model(params, np.asarray([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="batch axis"):
        model(params, np.asarray(1))
    # a model that starts with a Linear still casts its (integer) inputs
    linear = nn.Linear(2, 1)
    out = linear(linear.init(0, xp=npx, dtype=npx.float64), np.asarray([[1, 2]]))
    assert out.dtype == np.float64
    assert nn.Embedding(3, 2).integer_inputs and not nn.Linear(2, 2).integer_inputs


def test_embedding_init_and_errors():
    (table,) = nn.Embedding(400, 100).init(0, xp=npx, dtype=npx.float64)
    # N(0, 1) entries (PyTorch's default): mean and second moment in expectation
    assert_unbiased(table.ravel(), 0.0, std=1.0, power_scales=())
    assert_unbiased(table.ravel() ** 2, 1.0, std=np.sqrt(2.0))
    with pytest.raises(ValueError, match="positive integer num_embeddings"):
        nn.Embedding(0, 2)
    with pytest.raises(ValueError, match="num_heads to divide embed_dim"):
        nn.MultiheadSelfAttention(6, 4)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(N, S, 4\)"):
        nn.MultiheadSelfAttention(4, 2)(nn.MultiheadSelfAttention(4, 2).init(0), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"S <= 3"):
        layer = nn.PositionalEmbedding(3, 2)
        layer(layer.init(0), np.ones((1, 4, 2)))
    with pytest.raises(ValueError, match=r"expects inputs of shape \(N, ..., 4\)"):
        nn.LayerNorm(4)(nn.LayerNorm(4).init(0), np.ones((2, 3)))
    emb = nn.Embedding(3, 2)
    for ids in ([[3]], [[-1]]):  # a single id is checked too
        with pytest.raises(ValueError, match=r"takes ids in \[0, 3\)"):
            emb(emb.init(0), np.asarray(ids))
    assert emb(emb.init(0), np.zeros((0, 1), dtype=np.int64)).shape == (0, 1, 2)
    assert repr(nn.SinusoidalPositions()) == "SinusoidalPositions()"
    assert repr(nn.SinusoidalPositions(100.0)) == "SinusoidalPositions(100.0)"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: nn.Embedding(0, 2), "Embedding needs a positive integer num_embeddings, got 0."),
        (lambda: nn.Embedding(3, 2.0),
         "Embedding needs a positive integer embedding_dim, got 2.0."),
        (lambda: nn.PositionalEmbedding(0, 2),
         "PositionalEmbedding needs a positive integer max_len, got 0."),
        (lambda: nn.PositionalEmbedding(3, True),
         "PositionalEmbedding needs a positive integer embedding_dim, got True."),
        (lambda: nn.SinusoidalPositions(0.0),
         "SinusoidalPositions needs a positive base, got 0.0."),
        (lambda: nn.SinusoidalPositions(float("nan")),
         "SinusoidalPositions needs a positive base, got nan."),
        (lambda: nn.MultiheadSelfAttention(0, 2),
         "MultiheadSelfAttention needs a positive integer embed_dim, got 0."),
        (lambda: nn.MultiheadSelfAttention(4, False),
         "MultiheadSelfAttention needs a positive integer num_heads, got False."),
        (lambda: nn.MultiheadSelfAttention(6, 4),
         "MultiheadSelfAttention needs num_heads to divide embed_dim, got embed_dim=6 and "
         "num_heads=4."),
    ],
)  # fmt: skip
def test_transformer_layer_arguments_raise_with_the_whole_message(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value) == message


def test_transformer_layer_inputs_raise_with_the_whole_message():
    def raised(error, call):
        with pytest.raises(error) as err:
            call()
        return str(err.value)

    attention = nn.MultiheadSelfAttention(4, 2)
    assert raised(ValueError, lambda: attention(attention.init(0), np.ones((2, 3, 5)))) == (
        "MultiheadSelfAttention(4, 2, causal=False, bias=True) expects inputs of shape "
        "(N, S, 4), got shape (2, 3, 5)."
    )
    positions = nn.PositionalEmbedding(3, 2)
    assert raised(ValueError, lambda: positions(positions.init(0), np.ones((1, 4, 2)))) == (
        "PositionalEmbedding(3, 2) expects inputs of shape (N, S, 2) with S <= 3, got shape "
        "(1, 4, 2)."
    )
    sinusoidal = nn.SinusoidalPositions()
    assert raised(ValueError, lambda: sinusoidal.forward([], np.ones((2, 3)), npx)) == (
        "SinusoidalPositions() expects inputs of shape (N, S, 3), got shape (2, 3)."
    )
    emb = nn.Embedding(3, 2)
    table = emb.init(0, xp=npx, dtype=npx.float64)
    assert raised(ValueError, lambda: emb(table, np.asarray([[0, 5], [1, 2]]))) == (
        "Embedding(3, 2) takes ids in [0, 3), got ids from 0 to 5. Map the tokens to a "
        "vocabulary of 3 ids (or enlarge num_embeddings)."
    )
    assert raised(TypeError, lambda: emb.forward(table, np.ones((1, 2)), npx)) == (
        "Embedding(3, 2) takes integer ids, got float64 inputs."
    )


@pytest.mark.parametrize("causal", [True, False])
def test_causal_attention_does_not_see_the_future(causal):
    model = nn.Sequential(
        nn.Embedding(6, 8), nn.SinusoidalPositions(), nn.TransformerBlock(8, 2, causal=causal),
        nn.LayerNorm(8), nn.Linear(8, 6),
    )  # fmt: skip
    params = model.init(3, xp=npx, dtype=npx.float64)
    ids = np.asarray([[1, 2, 3, 4, 5]])
    out = model(params, ids)
    for t in range(4):
        changed = ids.copy()
        changed[0, t + 1 :] = (changed[0, t + 1 :] + 1) % 6
        other = model(params, changed)
        past = np.max(np.abs(other[:, : t + 1] - out[:, : t + 1]))
        assert (past == 0.0) if causal else (past > 1e-6)
        assert np.max(np.abs(other[:, t + 1 :] - out[:, t + 1 :])) > 1e-6
    # the Jacobian of the attention output: zero above the diagonal of positions
    layer = nn.MultiheadSelfAttention(4, 2, causal=causal)
    p = layer.init(0, xp=npx, dtype=npx.float64)
    lin = layer.linearize(p, np.random.default_rng(0).standard_normal((1, 3, 4)))
    cot = np.zeros((1, 3, 4, 1))
    cot[0, 0, :, 0] = 1.0  # the output at position 0
    g_x = layer.backward(p, lin._states[0], np.moveaxis(cot, -1, -2), npx, need_params=False)[1]
    assert (np.max(np.abs(g_x[0, 1:])) == 0.0) == causal


# -- backends and dtypes ------------------------------------------------------------------------


def test_gpt_products_on_every_backend(backend):
    """The same rules on NumPy, array-api-strict (only standard calls), PyTorch, JAX, CuPy."""
    model = gpt_native = nn.Sequential(
        nn.Embedding(7, 8), nn.PositionalEmbedding(5, 8), nn.TransformerBlock(8, 2, mlp_ratio=2),
        nn.LayerNorm(8), nn.Linear(8, 7),
    )  # fmt: skip
    rng = np.random.default_rng(4)
    params = [0.5 * rng.standard_normal(s) for s in model.expected_param_shapes()]
    ids = rng.integers(0, 7, size=(2, 5))
    V = [rng.standard_normal(p.shape + (2,)) for p in params]
    u, w = rng.standard_normal((2, 5, 7)), rng.standard_normal((2, 5, 7, 2))

    def run(to, to_ids, to_numpy):
        lin = gpt_native.linearize([to(p) for p in params], to_ids(ids))
        Vb = [to(v) for v in V]
        taps = lin.layer_taps(to(w))
        return {
            "outputs": to_numpy(lin.outputs),
            "JV": to_numpy(lin.jvp(Vb)),
            "JtU": flat_k([to_numpy(g) for g in lin.vjp(to(w))]),
            "second": flat_k([to_numpy(g) for g in lin.second_order_vjp(to(u), Vb, to(w))]),
            "tap": to_numpy(taps[0].output_grads),
        }

    mine = run(lambda a: backend.asarray(a, "float64"), lambda a: backend.asarray(a, "int64"),
               backend.to_numpy)  # fmt: skip
    reference = run(np.asarray, np.asarray, np.asarray)
    for key, value in reference.items():
        assert_close(mine[key], value, rtol=1e-9)


def test_float32_follows_float64():
    model = nn.Sequential(
        nn.Embedding(7, 8), nn.SinusoidalPositions(), nn.TransformerBlock(8, 2, mlp_ratio=2),
        nn.LayerNorm(8), nn.Linear(8, 7),
    )  # fmt: skip
    rng = np.random.default_rng(5)
    params = [0.5 * rng.standard_normal(s) for s in model.expected_param_shapes()]
    ids = rng.integers(0, 7, size=(2, 5))
    V = [rng.standard_normal(p.shape + (2,)) for p in params]
    u = rng.standard_normal((2, 5, 7))
    results = {}
    for dtype in (np.float32, np.float64):
        lin = model.linearize([p.astype(dtype) for p in params], ids)
        Vd = [v.astype(dtype) for v in V]
        second = lin.second_order_vjp(u.astype(dtype), Vd, None)
        assert lin.outputs.dtype == dtype and all(s.dtype == dtype for s in second)
        results[dtype] = (lin.outputs, lin.jvp(Vd), flat_k(second))
    for a, b in zip(results[np.float32], results[np.float64], strict=True):
        assert_close(a, b, rtol=2e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_init_gives_every_parameter_the_dtype_asked_for(dtype):
    for layer in (nn.MultiheadSelfAttention(4, 2), nn.TransformerBlock(4, 2), nn.LayerNorm(4)):
        params = layer.init(0, xp=npx, dtype=dtype)
        assert [p.dtype for p in params] == [np.dtype(dtype)] * len(params), layer


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_first_layer_norm_without_cotangent_tangent_has_zero_second_order_terms(dtype):
    """w * xhat + b is linear in (w, b) and the inputs have no tangent, so without w the
    second-order product is zero: blocks of the parameters' shapes and dtype."""
    model = nn.Sequential(nn.LayerNorm(4))
    params = model.init(0, xp=npx, dtype=dtype)
    rng = np.random.default_rng(6)
    lin = model.linearize(params, rng.standard_normal((3, 4)).astype(dtype))
    V = [rng.standard_normal((4, 2)).astype(dtype) for _ in params]
    second = lin.second_order_vjp(rng.standard_normal((3, 4)).astype(dtype), V, None)
    for s in second:
        assert s.shape == (4, 2) and s.dtype == dtype and not np.any(s)


def test_repr_and_parameter_order():
    block = nn.TransformerBlock(8, 2, mlp_ratio=2)
    assert [name for name, _ in block.chain()] == ["0", "1"]
    assert repr(block).startswith("TransformerBlock(8, 2, mlp_ratio=2, causal=True")
    assert repr(nn.LayerNorm(3)) == "LayerNorm(3, eps=1e-05, elementwise_affine=True, bias=True)"
    assert nn.LayerNorm(3, elementwise_affine=False).expected_param_shapes() == []
    assert nn.MultiheadSelfAttention(4, 2, bias=False).expected_param_shapes() == [(12, 4), (4, 4)]
    weight, bias = nn.LayerNorm(3).init(0, xp=npx, dtype=npx.float64)
    assert weight.tolist() == [1.0] * 3 and bias.tolist() == [0.0] * 3
    w_in, b_in, w_out, b_out = nn.MultiheadSelfAttention(8, 2).init(0, xp=npx, dtype=npx.float64)
    assert np.all(np.abs(w_in) <= math.sqrt(6 / 32)) and not np.any(b_in) and not np.any(b_out)
    assert np.all(np.abs(w_out) <= 1 / math.sqrt(8))
    assert_close(
        nn.SinusoidalPositions().encodings(6, 5, np.zeros(1), npx), sinusoidal_reference(6, 5)
    )


@pytest.mark.parametrize("operator", ["HessianDiagonalLinearOperator", "KFACHessianLinearOperator"])
def test_curvature_walks_take_an_embedding_as_the_first_layer(operator):
    from curvlinops.curvature.diagonal import HessianDiagonalLinearOperator
    from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator

    model = nn.Sequential(nn.Embedding(5, 3), nn.Tanh(), nn.Linear(3, 2))
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s) for s in model.expected_param_shapes()]
    data = [(rng.integers(0, 5, (3, 4)), rng.standard_normal((3, 4, 2)))]
    dense = HessianLinearOperator(model, MSELoss(), params, data).to_dense()
    if operator == "HessianDiagonalLinearOperator":
        diagonal = HessianDiagonalLinearOperator(model, MSELoss(), params, data).diagonal()
        assert_close(np.asarray(diagonal), np.diag(dense), rtol=1e-9)
    else:
        op = KFACHessianLinearOperator(model, MSELoss(), params, data)
        assert op.to_dense().shape == dense.shape


@pytest.mark.parametrize("name", ["numpy", "array_api_strict"])
def test_embedding_r_backward_without_a_second_cotangent_is_zero(name, backend):
    """``rg = None`` (nothing after the layer depends on the tangent): the R-gradients of
    the tables are zeros ``(rows, D, K)`` for ``K`` tangents, on the cotangents' device."""
    if backend.name != name:
        pytest.skip("one backend per case")
    xp, to = backend.xp, backend.asarray
    g = to(np.ones((2, 3, 5)))  # (N, S, D) cotangents, D = 5
    for layer, rows in ((nn.Embedding(4, 5), 4), (nn.PositionalEmbedding(7, 5), 7)):
        dparams = [to(np.ones((rows, 5, 2)))]  # K = 2 tangents
        state = {"input": to(np.zeros((2, 3), dtype=np.int64))}
        if isinstance(layer, nn.PositionalEmbedding):
            state = {"input": to(np.zeros((2, 3, 5)))}
        rgrads, *_ = layer.r_backward([to(np.zeros((rows, 5)))], dparams, state, None, g, None, xp)
        assert rgrads[0].shape == (rows, 5, 2) and rgrads[0].device == g.device
        assert not np.any(backend.to_numpy(rgrads[0]))


def test_positional_embedding_tap_ids_live_on_the_inputs_device():
    """The tap's position ids ``(N, S)`` are built on the inputs' device, not the default."""
    xps = pytest.importorskip("array_api_strict")
    other = xps.Device("device1")
    a = xps.zeros((2, 3, 4), dtype=xps.float64, device=other)
    ids, grads, shape = nn.PositionalEmbedding(5, 4).tap({"input": a}, None, xps)
    assert ids.device == other and grads is None and shape == (4, 5)
    cpu = xps.asarray(ids, device=xps.Device("CPU_DEVICE"))
    np.testing.assert_array_equal(np.asarray(cpu), [[0, 1, 2], [0, 1, 2]])


def test_sinusoidal_encodings_are_cached_per_device():
    """The cache holds one copy per device: inputs on another device get encodings
    on that device, not the first device's copy."""
    xps = pytest.importorskip("array_api_strict")
    layer = nn.SinusoidalPositions()
    first, second = xps.Device("device1"), xps.Device("device2")
    a = layer.encodings(3, 4, xps.zeros(1, dtype=xps.float64, device=first), xps)
    b = layer.encodings(3, 4, xps.zeros(1, dtype=xps.float64, device=second), xps)
    assert a.device == first and b.device == second
    np.testing.assert_array_equal(
        np.asarray(xps.asarray(b, device=xps.Device("CPU_DEVICE"))),
        np.asarray(xps.asarray(a, device=xps.Device("CPU_DEVICE"))),
    )


def test_ggn_of_positional_embeddings_on_raw_inputs_has_its_closed_form():
    """``f = x + P[:S]`` with the mean squared error over ``N x S x E`` outputs: the GGN
    of the table ``P`` is ``2 / (S E)`` on its first ``S`` rows and zero on the rest
    (the N data each contribute ``2 / (N S E)``). The layer's inputs are data (no
    incoming tangent), and N = 2 differs from S = 3."""
    N, S, E, max_len = 2, 3, 2, 5
    model = nn.Sequential(nn.PositionalEmbedding(max_len, E))
    params = model.init(0, xp=npx, dtype=npx.float64)
    rng = np.random.default_rng(9)
    data = [(rng.standard_normal((N, S, E)), rng.standard_normal((N, S, E)))]
    G = GGNLinearOperator(model, MSELoss(), params, data).to_dense()
    expected = np.zeros(max_len * E)
    expected[: S * E] = 2.0 / (S * E)
    np.testing.assert_allclose(G, np.diag(expected), rtol=1e-13, atol=1e-15)
