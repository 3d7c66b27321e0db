"""TorchModel on transformers: taps of F.linear (MultiheadAttention), embeddings, LayerNorm.

Every reference is computed independently of the frontend, in float64: the taps by a
forward pass written out by hand from the modules' weights (attention included) and
``torch.autograd.grad`` of its intermediate tensors; the curvature by ``torch.func``
(``jacrev``/``hessian`` of a ``functional_call``) or by the definitions of the
operators' docstrings.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import curvlinops as cl
from curvlinops import to_numpy

torch = pytest.importorskip("torch")
F = torch.nn.functional

from curvlinops.frontends.torch import TorchModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

DTYPE = torch.float64
V, E, S, HEADS = 20, 16, 8, 2


def _sinusoids(length, width):
    """Fixed sinusoidal positions ``(length, width)`` (Vaswani et al., 2017)."""
    position = torch.arange(length, dtype=DTYPE)[:, None]
    frequency = torch.exp(-math.log(1e4) * torch.arange(0, width, 2, dtype=DTYPE) / width)
    table = torch.zeros(length, width, dtype=DTYPE)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


def _causal_mask(length):
    return torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)


class _Block(torch.nn.Module):
    """A pre-norm transformer block: causal self-attention and an MLP, both residual."""

    def __init__(self, need_weights):
        super().__init__()
        self.need_weights = need_weights
        self.ln1 = torch.nn.LayerNorm(E)
        self.attn = torch.nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(E)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(E, 2 * E), torch.nn.GELU(), torch.nn.Linear(2 * E, E)
        )

    def forward(self, h):
        a = self.ln1(h)
        mask = _causal_mask(h.shape[1])
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=self.need_weights)[0]
        return h + self.mlp(self.ln2(h))


class GPT(torch.nn.Module):
    """A tiny GPT: token embedding, positions, 2 pre-norm blocks, final LayerNorm, head.

    ``positions="sinusoidal"``: fixed positions (a buffer); ``"learned"``: a parameter
    added to the embeddings (which is no layer tap of any kind). ``last_only``: the
    logits of the last position only, ``(N, V)`` (a sequence classifier), instead of
    every position's, ``(N, S, V)``.
    """

    def __init__(self, positions="sinusoidal", need_weights=False, blocks=2, last_only=False):
        super().__init__()
        self.last_only = last_only
        self.tok = torch.nn.Embedding(V, E)
        if positions == "learned":
            self.pos = torch.nn.Parameter(0.1 * torch.randn(S, E))
        else:
            self.register_buffer("pos", _sinusoids(S, E))
        self.blocks = torch.nn.ModuleList([_Block(need_weights) for _ in range(blocks)])
        self.ln_f = torch.nn.LayerNorm(E)
        self.head = torch.nn.Linear(E, V)

    def forward(self, ids):
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.ln_f(h))
        return logits[:, -1] if self.last_only else logits


def _gpt(seed=0, **kwargs):
    torch.manual_seed(seed)
    net = GPT(**kwargs).to(DTYPE)
    with torch.no_grad():  # LayerNorm affine parameters away from (1, 0)
        for module in net.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    return net.eval()


def _tokens(sizes=(3, 2), seed=1):
    """Batches ``(ids (N, S), next-token targets (N, S))``."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, V, (n, S), generator=generator),
            torch.randint(0, V, (n, S), generator=generator),
        )
        for n in sizes
    ]


# -- the forward pass by hand ------------------------------------------------------------


def _manual_gpt(net, ids):
    """The GPT's outputs computed by hand from its weights, and every tapped layer's
    ``(inputs, outputs)`` as the taps define them (inputs ``(N, S, D)``: the token ids
    of the embedding, the normalized inputs of a LayerNorm, the inputs of a linear map)."""
    record = {}

    def linear(name, x, weight, bias):
        out = x @ weight.T + bias
        record[name] = (x, out)
        return out

    def layer_norm(name, x, module):
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
        normalized = (x - mean) / torch.sqrt(var + module.eps)
        out = normalized * module.weight + module.bias
        record[name] = (normalized, out)
        return out

    N = ids.shape[0]
    h = net.tok.weight[ids]
    record["tok"] = (ids, h)
    h = h + net.pos[:S]
    for i, block in enumerate(net.blocks):
        p = f"blocks.{i}."
        a = layer_norm(p + "ln1", h, block.ln1)
        attn = block.attn
        qkv = linear(p + "attn.in_proj", a, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = (t.reshape(N, S, HEADS, E // HEADS).transpose(1, 2) for t in qkv.split(E, dim=-1))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(E // HEADS)
        scores = scores.masked_fill(_causal_mask(S), float("-inf"))
        o = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(N, S, E)
        h = h + linear(p + "attn.out_proj", o, attn.out_proj.weight, attn.out_proj.bias)
        m = layer_norm(p + "ln2", h, block.ln2)
        m = F.gelu(linear(p + "mlp.0", m, block.mlp[0].weight, block.mlp[0].bias))
        h = h + linear(p + "mlp.2", m, block.mlp[2].weight, block.mlp[2].bias)
    out = linear("head", layer_norm("ln_f", h, net.ln_f), net.head.weight, net.head.bias)
    return out, record


def _reference_taps(net, ids, cotangents):
    """``{name: (inputs, output gradients (N, S, D, M))}`` from the forward pass by hand."""
    with torch.enable_grad():
        outputs, record = _manual_gpt(net, ids)
    torch.testing.assert_close(outputs, net(ids), rtol=1e-10, atol=1e-12)  # the same function
    names = sorted(record)
    columns = [
        torch.autograd.grad(
            outputs, [record[n][1] for n in names], cotangents[..., m], retain_graph=True
        )
        for m in range(cotangents.shape[-1])
    ]
    return {
        name: (record[name][0].detach(), torch.stack([c[i] for c in columns], dim=-1))
        for i, name in enumerate(names)
    }


def _ce_factor(outputs, y):
    """The cross-entropy Hessian's factor ``diag(sqrt p) - p sqrt(p)^T`` per position,
    checked against ``torch.func.hessian`` (curvlinops' loss uses this factor; K-FAC's
    output factor depends on the factor chosen, as the positions' columns are
    backpropagated together)."""
    p = torch.softmax(outputs.detach(), dim=-1)
    factor = torch.diag_embed(p.sqrt()) - p[..., :, None] * p.sqrt()[..., None, :]
    f0, t0 = outputs[0, 0].detach(), y[0, 0]
    H = torch.func.hessian(lambda f: F.cross_entropy(f[None], t0[None], reduction="sum"))(f0)
    torch.testing.assert_close(factor[0, 0] @ factor[0, 0].T, H)
    return factor


def _reference_kfac(net, data):
    """K-FAC's ``{name: (B, A)}`` by the definitions (type-2, "expand"): ``A`` the mean of
    ``a a^T`` over the items (positions), the embedding's the ids' counts over the items
    (diagonal); ``B = c sum_{t, m} g_t,m g_t,m^T`` with ``c = 1 / (N S)``."""
    sums, items, num = {}, 0, 0
    for ids, y in data:
        with torch.no_grad():
            outputs = net(ids)
        for name, (a, g) in _reference_taps(net, ids, _ce_factor(outputs, y)).items():
            if name.startswith("blocks.") and ".ln" in name or name == "ln_f":
                continue  # elementwise: exact blocks
            if name == "tok":
                aa = torch.bincount(a.reshape(-1), minlength=V).to(DTYPE)
            else:
                a2 = a.reshape(-1, a.shape[-1])
                aa = a2.T @ a2
            G = torch.movedim(g, -1, -2).reshape(-1, g.shape[-2])
            previous = sums.get(name, (0, 0))
            sums[name] = (previous[0] + G.T @ G, previous[1] + aa)
        items += ids.numel()
        num += ids.shape[0]
    c = 1.0 / (num * S)
    return {name: (c * gg, aa / items) for name, (gg, aa) in sums.items()}


def _math_attention():
    """The reference's attention through the math backend (the same function; fused
    kernels have no batching rule for ``jacrev``'s vmap)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _flat_params(model):
    return dict(zip(model.param_names, model.params, strict=True))


def _jacobian(net, model, ids):
    """``(N, S, C, P)``: the Jacobian of the outputs by ``torch.func.jacrev``."""
    names = model.param_names
    params = _flat_params(model)

    def f(*ps):
        return torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (ids,))

    with _math_attention():
        jac = torch.func.jacrev(f, argnums=tuple(range(len(names))))(*params.values())
    out_shape = f(*params.values()).shape
    return torch.cat([j.reshape(*out_shape, -1) for j in jac], dim=-1)


def _flat_index(model, names):
    sizes = [int(np.prod(shape)) for shape in model.expected_param_shapes()]
    starts = np.cumsum([0, *sizes])
    return np.concatenate(
        [np.arange(starts[i], starts[i + 1]) for i, n in enumerate(model.param_names) if n in names]
    )


# -- taps ----------------------------------------------------------------------------------


def test_taps_of_attention_embedding_and_layer_norm_equal_the_forward_pass_by_hand():
    net = _gpt()
    model = TorchModel(net)
    ids, y = _tokens()[0]
    lin = model.linearize(model.params, ids)
    cotangents = _ce_factor(lin.outputs, y)
    taps = {t.name: t for t in lin.layer_taps(cotangents)}
    refs = _reference_taps(net, ids, cotangents)
    assert sorted(taps) == sorted(refs)
    index = {n: i for i, n in enumerate(model.param_names)}
    for name, (a, g) in refs.items():
        tap = taps[name]
        if tap.kind == "embedding":
            assert torch.equal(tap.inputs, a)
        else:
            torch.testing.assert_close(tap.inputs, a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(tap.output_grads, g, rtol=1e-10, atol=1e-12)
    assert taps["tok"].kind == "embedding" and taps["tok"].matrix_shape == (E, V)
    assert taps["tok"].bias_index is None
    assert taps["blocks.0.ln1"].kind == "elementwise"
    attention = taps["blocks.1.attn.in_proj"]
    assert attention.kind == "matrix" and attention.matrix_shape == (3 * E, E)
    assert (attention.weight_index, attention.bias_index) == (
        index["blocks.1.attn.in_proj_weight"],
        index["blocks.1.attn.in_proj_bias"],
    )
    assert taps["blocks.1.attn.out_proj"].weight_index == index["blocks.1.attn.out_proj.weight"]
    # without cotangents: the same inputs, no gradients
    plain = {t.name: t for t in lin.layer_taps()}
    assert all(t.output_grads is None for t in plain.values())
    torch.testing.assert_close(
        plain["blocks.0.attn.out_proj"].inputs, refs["blocks.0.attn.out_proj"][0]
    )


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_taps_in_evaluation_mode_with_and_without_attention_weights(need_weights):
    net = _gpt(need_weights=need_weights, blocks=1)
    model = TorchModel(net)
    ids, y = _tokens()[0]
    lin = model.linearize(model.params, ids)
    cotangents = torch.randn(*lin.outputs.shape, 2, dtype=DTYPE)
    taps = {t.name: t for t in lin.layer_taps(cotangents)}
    refs = _reference_taps(net, ids, cotangents)
    for name in ("blocks.0.attn.in_proj", "blocks.0.attn.out_proj"):
        torch.testing.assert_close(taps[name].inputs, refs[name][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(taps[name].output_grads, refs[name][1], rtol=1e-10, atol=1e-12)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the passes


class _FunctionalNet(torch.nn.Module):
    """F.linear and F.layer_norm on the module's own parameters, no nn.Linear."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(5, 3, dtype=DTYPE))
        self.b1 = torch.nn.Parameter(torch.randn(5, dtype=DTYPE))
        self.gamma = torch.nn.Parameter(1 + 0.3 * torch.randn(5, dtype=DTYPE))
        self.w2 = torch.nn.Parameter(torch.randn(2, 5, dtype=DTYPE))

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w1, self.b1))
        h = F.layer_norm(h, (5,), self.gamma, None, 1e-5)
        return F.linear(h, self.w2)


def test_functional_linear_and_layer_norm_in_user_code_are_tapped():
    torch.manual_seed(3)
    net = _FunctionalNet()
    model = TorchModel(net)
    X = torch.randn(4, 6, 3, dtype=DTYPE)
    lin = model.linearize(model.params, X)
    cotangents = torch.randn(4, 6, 2, 3, dtype=DTYPE)
    taps = lin.layer_taps(cotangents)
    assert [(t.name, t.weight_index, t.bias_index, t.kind) for t in taps] == [
        ("w1", 0, 1, "matrix"),
        ("gamma", 2, None, "elementwise"),
        ("w2", 3, None, "matrix"),
    ]
    # by hand
    with torch.enable_grad():
        s1 = X @ net.w1.T + net.b1
        h = torch.tanh(s1)
        normalized = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, False, True) + 1e-5)
        s2 = normalized * net.gamma
        s3 = s2 @ net.w2.T
        grads = [
            torch.autograd.grad(s3, [s1, s2, s3], cotangents[..., m], retain_graph=True)
            for m in range(3)
        ]
    for i, (tap, a) in enumerate(zip(taps, [X, normalized, s2], strict=True)):
        torch.testing.assert_close(tap.inputs, a.detach(), rtol=1e-10, atol=1e-12)
        g = torch.stack([c[i] for c in grads], dim=-1)
        torch.testing.assert_close(tap.output_grads, g, rtol=1e-10, atol=1e-12)


# -- K-FAC ---------------------------------------------------------------------------------


def test_kfac_factors_of_attention_mlp_and_embedding_equal_the_factors_by_hand():
    net = _gpt()
    data = _tokens()
    model = TorchModel(net)
    K = cl.KFACLinearOperator(model, cl.CrossEntropyLoss(), model.params, data)
    refs = _reference_kfac(net, data)
    assert sorted(K.input_factors) == sorted(refs)
    for name, (B, A) in refs.items():
        torch.testing.assert_close(K.input_factors[name], A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(K.output_factors[name], B, rtol=1e-10, atol=1e-12)
    assert K.input_factors["tok"].ndim == 1  # the embedding's diagonal input factor
    assert sorted(K.exact_blocks) == ["blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1"] + [
        "blocks.1.ln2",
        "ln_f",
    ]


def _layer_norm_blocks(net, data, name):
    """K-FAC's exact block of the LayerNorm ``name`` (joint over weight and bias), the
    dense GGN's block of its parameters, and the block of K-FAC's products."""
    model = TorchModel(net)
    loss = cl.CrossEntropyLoss()
    K = cl.KFACLinearOperator(model, loss, model.params, data, separate_weight_and_bias=False)
    # the GGN block of (weight, bias): the GGN of the model with only these parameters
    own = TorchModel(net, param_names=[f"{name}.weight", f"{name}.bias"])
    G = to_numpy(cl.GGNLinearOperator(own, loss, own.params, data).to_dense())
    index = _flat_index(model, {f"{name}.weight", f"{name}.bias"})
    columns = np.zeros((K.shape[0], len(index)))
    columns[index, np.arange(len(index))] = 1.0
    products = to_numpy(K @ torch.from_numpy(columns))[index]
    return to_numpy(K.exact_blocks[name]), G, products


@pytest.mark.parametrize("name", ["blocks.0.ln1", "blocks.1.ln2", "ln_f"])
def test_layer_norm_exact_block_equals_the_dense_ggn_block(name):
    """A sequence classifier (the last position's logits): the LayerNorm's block over its
    (weight, bias), normalizing every position, is exact."""
    net = _gpt(last_only=True)
    data = [(ids, y[:, -1]) for ids, y in _tokens()]
    block, G, products = _layer_norm_blocks(net, data, name)
    np.testing.assert_allclose(block, G, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(products, G, rtol=1e-9, atol=1e-12)


def test_layer_norm_exact_block_with_a_loss_at_every_position():
    """Outputs (N, S, C): the exact GGN block needs each position's loss factor
    backpropagated on its own; K-FAC backpropagates all positions' columns together."""
    net = _gpt()
    block, G, _ = _layer_norm_blocks(net, _tokens(), "ln_f")
    if not np.allclose(block, G, rtol=1e-9, atol=1e-12):
        pytest.skip(
            "the curvature layer's exact blocks of elementwise taps (kronecker_statistics."
            "_accumulate via elementwise_gradients) use the cotangents of K-FAC's output "
            "factor, whose loss-factor columns cover all positions at once; with outputs "
            "(N, S, C) that is not the exact GGN block (it needs a per-datum factor, "
            "block-diagonal over the positions, as diagonal._per_datum_factor builds)"
        )
    np.testing.assert_allclose(block, G, rtol=1e-9, atol=1e-12)


def test_kfac_and_ekfac_cover_every_parameter_of_the_gpt():
    net = _gpt()
    data = _tokens()
    model = TorchModel(net)
    P = sum(p.numel() for p in model.params)
    loss = cl.CrossEntropyLoss()
    covered = set()
    for operator in (cl.KFACLinearOperator, cl.EKFACLinearOperator):
        K = operator(model, loss, model.params, data)
        assert K.shape == (P, P)
        covered = {i for layer in K.layers for i in (layer.weight_index, layer.bias_index)}
        assert covered - {None} == set(range(len(model.params)))
        v = torch.randn(P, dtype=DTYPE)
        Kv = K @ v
        assert Kv.shape == (P,) and bool(torch.isfinite(Kv).all())
        assert float(v @ Kv) > 0
        # the Kronecker blocks are blocks of an operator over the flat parameters: the
        # diagonal from the factors equals the diagonal of its products
        idx = _flat_index(model, {"tok.weight", "blocks.0.attn.in_proj_bias"})
        columns = torch.zeros(P, len(idx), dtype=DTYPE)
        columns[idx, torch.arange(len(idx))] = 1.0
        torch.testing.assert_close(
            torch.diagonal((K @ columns)[idx]), K.diagonal()[idx], rtol=1e-10, atol=1e-12
        )


def test_learned_positions_are_no_tap_and_kfac_says_so():
    net = _gpt(positions="learned")
    model = TorchModel(net)
    with pytest.raises(ValueError, match=r"parameters \[0\].*belong to no tapped layer"):
        cl.KFACLinearOperator(model, cl.CrossEntropyLoss(), model.params, _tokens())
    assert model.param_names[0] == "pos"  # the root module's own parameter comes first


class _SharedLinear(torch.nn.Module):
    """A Linear applied to every position; optionally averaged over the positions."""

    def __init__(self, average):
        super().__init__()
        self.average = average
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        out = self.linear(x)
        return out.mean(dim=1) if self.average else out


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_is_exact_in_the_weight_sharing_cases(approx):
    """Eschenhagen et al. (2023): "expand" is exact for a per-position loss, "reduce" for
    outputs averaged over the positions before the loss (linear layer, squared loss)."""
    torch.manual_seed(4)
    net = _SharedLinear(average=approx == "reduce").to(DTYPE)
    model = TorchModel(net)
    X = [torch.randn(n, 5, 4, dtype=DTYPE) for n in (3, 2)]
    shape = (3,) if approx == "reduce" else (5, 3)
    data = [(x, torch.randn(x.shape[0], *shape, dtype=DTYPE)) for x in X]
    loss = cl.MSELoss()
    G = to_numpy(cl.GGNLinearOperator(model, loss, model.params, data).to_dense())
    dense = {
        a: to_numpy(
            cl.KFACLinearOperator(
                model, loss, model.params, data, kfac_approx=a, separate_weight_and_bias=False
            ).to_dense()
        )
        for a in ("expand", "reduce")
    }
    np.testing.assert_allclose(dense[approx], G, rtol=1e-10, atol=1e-12)
    other = "reduce" if approx == "expand" else "expand"
    assert not np.allclose(dense[other], G)  # the other one is not: the check has teeth


# -- diagonals -----------------------------------------------------------------------------


def _reference_diagonals(net, model, data):
    """The GGN and EF diagonals by ``torch.func``: ``c sum_{n,s,m} (S^T J)^2`` and
    ``c sum_n (grad of datum n's loss)^2`` with ``c = 1 / (N S)`` (mean cross-entropy)."""
    ggn, ef, num = 0.0, 0.0, 0
    for ids, y in data:
        J = _jacobian(net, model, ids)  # (N, S, C, P)
        outputs = net(ids).detach()
        factor = _ce_factor(outputs, y)  # (N, S, C, C)
        SJ = torch.einsum("nscm,nscp->nsmp", factor, J)
        ggn = ggn + (SJ**2).sum(dim=(0, 1, 2))
        grad_f = torch.softmax(outputs, -1) - F.one_hot(y, V).to(DTYPE)  # (N, S, C)
        per_datum = torch.einsum("nsc,nscp->np", grad_f, J)
        ef = ef + (per_datum**2).sum(dim=0)
        num += ids.shape[0]
    c = 1.0 / (num * S)
    return c * ggn, c * ef


def _diagonals_take_embedding_taps():
    """Whether GGNDiagonalLinearOperator handles taps of kind "embedding" (probed on an
    embedding followed by a Linear, against the dense GGN)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 3)).to(DTYPE)
    model = TorchModel(net)
    data = [(torch.tensor([[0, 1], [1, 3]]), torch.tensor([[0, 2], [1, 1]]))]
    loss = cl.CrossEntropyLoss()
    try:
        D = cl.GGNDiagonalLinearOperator(model, loss, model.params, data).diagonal()
    except Exception:  # noqa: BLE001 - any failure means: not supported
        return False
    G = cl.GGNLinearOperator(model, loss, model.params, data).to_dense()
    return D.shape == (G.shape[0],) and bool(torch.allclose(D, torch.diagonal(G)))


@pytest.mark.parametrize("frozen_embedding", [True, False])
def test_ggn_and_ef_diagonals_of_the_gpt_equal_torch_func(frozen_embedding):
    net = _gpt()
    names = [n for n, _ in net.named_parameters() if not (frozen_embedding and n == "tok.weight")]
    if not frozen_embedding and not _diagonals_take_embedding_taps():
        pytest.skip(
            "GGNDiagonalLinearOperator/EFDiagonalLinearOperator do not take layer taps of "
            "kind 'embedding' yet (curvlinops/curvature/diagonal.py treats every non-"
            "elementwise tap as a matrix tap; it needs as_matrix_tap from ._embedding)"
        )
    model = TorchModel(net, param_names=names)
    data = _tokens(sizes=(2, 1))
    loss = cl.CrossEntropyLoss()
    ggn, ef = _reference_diagonals(net, model, data)
    D = cl.GGNDiagonalLinearOperator(model, loss, model.params, data).diagonal()
    torch.testing.assert_close(D, ggn, rtol=1e-9, atol=1e-12)
    D = cl.EFDiagonalLinearOperator(model, loss, model.params, data).diagonal()
    torch.testing.assert_close(D, ef, rtol=1e-9, atol=1e-12)


# -- exact curvature through attention in evaluation mode ------------------------------------


class _Attention(torch.nn.Module):
    def __init__(self, need_weights):
        super().__init__()
        self.need_weights = need_weights
        self.attn = torch.nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        mask = _causal_mask(x.shape[1])
        out = self.attn(x, x, x, attn_mask=mask, need_weights=self.need_weights)[0]
        return self.head(torch.tanh(out))


@pytest.mark.parametrize("need_weights", [False, True])
def test_ggn_and_hessian_through_attention_in_evaluation_mode_equal_torch_func(need_weights):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(5)
    net = _Attention(need_weights).to(DTYPE).eval()
    model = TorchModel(net)
    X = torch.randn(3, 4, 6, dtype=DTYPE)
    y = torch.randn(3, 4, 3, dtype=DTYPE)
    loss = cl.MSELoss()
    names, params = model.param_names, model.params
    G = cl.GGNLinearOperator(model, loss, params, [(X, y)]).to_dense()
    H = cl.HessianLinearOperator(model, loss, params, [(X, y)]).to_dense()
    assert torch.backends.mha.get_fastpath_enabled()  # restored

    def outputs(*ps):
        return torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (X,))

    def value(*ps):
        return F.mse_loss(outputs(*ps), y)

    # the reference in torch.func: reverse mode only for the Jacobian; the Hessian by
    # forward-over-reverse, through the math attention backend without the fast path
    argnums = tuple(range(len(params)))
    with _math_attention():
        jac = torch.func.jacrev(outputs, argnums)(*params)
    J = torch.cat([j.reshape(*X.shape[:2], 3, -1) for j in jac], -1).reshape(-1, G.shape[0])
    H_loss = 2.0 / y.numel()  # the mean squared error's Hessian: (2 / (N S C)) I
    torch.testing.assert_close(G, H_loss * J.T @ J, rtol=1e-9, atol=1e-12)
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            blocks = torch.func.hessian(value, argnums)(*params)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    sizes = [p.numel() for p in params]
    H_ref = torch.cat(
        [torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in argnums], 1) for i in argnums]
    )
    torch.testing.assert_close(H, H_ref, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(G, H)  # attention is not linear: the residual term is there


class _Cube(torch.autograd.Function):
    """``x^3`` with a backward pass but no forward-mode derivative (no ``jvp``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class _CubeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(_Cube.apply(self.fc1(x)))


def test_modules_without_forward_mode_fall_back_to_reverse_over_reverse():
    torch.manual_seed(6)
    net = _CubeNet().to(DTYPE)
    model = TorchModel(net)
    X, y = 0.5 * torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    names, params = model.param_names, model.params
    lin = model.linearize(params, X)
    tangents = [torch.randn(*p.shape, 3, dtype=DTYPE) for p in params]
    Jv = lin.jvp(tangents)
    assert not model._forward_mode  # the first product found no forward mode

    def outputs(*ps):
        return torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (X,))

    argnums = tuple(range(len(params)))
    J = torch.cat([j.reshape(5, 2, -1) for j in torch.func.jacrev(outputs, argnums)(*params)], -1)
    flat = torch.cat([t.reshape(-1, 3) for t in tangents])
    torch.testing.assert_close(Jv, J @ flat, rtol=1e-10, atol=1e-12)
    loss = cl.MSELoss()
    G = cl.GGNLinearOperator(model, loss, params, [(X, y)]).to_dense()
    J2 = J.reshape(10, -1)
    torch.testing.assert_close(G, (2.0 / 10) * J2.T @ J2, rtol=1e-10, atol=1e-12)
    # a second-order product with a map that is not symmetric takes the reverse-mode path
    u = torch.randn(5, 2, dtype=DTYPE)
    w = cl.TraceableLinearMap(lambda v: 2.0 * v.flip(-2), symmetric=False)
    got = lin.second_order_vjp(u, [t[..., 0] for t in tangents], w)

    def ju(*ps):
        return (outputs(*ps) * u).sum()

    # reverse-over-reverse: the function has no forward-mode derivative
    hess = torch.func.jacrev(torch.func.jacrev(ju, argnums), argnums)(*params)
    sizes = [p.numel() for p in params]
    Hu = torch.cat(
        [torch.cat([hess[i][j].reshape(sizes[i], sizes[j]) for j in argnums], 1) for i in argnums]
    )
    want = Hu @ flat[:, 0] + J2.T @ (2.0 * (J @ flat[:, 0]).flip(-1)).reshape(-1)
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in got]), want, rtol=1e-9, atol=1e-12)


# -- errors --------------------------------------------------------------------------------


class _TiedGPT(GPT):
    """The language-model head reuses the embedding table (weight tying)."""

    def __init__(self, how):
        super().__init__(blocks=1)
        self.how = how
        if how == "module":
            self.head.weight = self.tok.weight

    def forward(self, ids):
        if self.how == "module":
            return super().forward(ids)
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        return F.linear(self.ln_f(self.blocks[0](h)), self.tok.weight)


@pytest.mark.parametrize("how", ["module", "functional"])
def test_tied_weights_are_refused_by_kfac_with_the_reason(how):
    net = _TiedGPT(how).to(DTYPE).eval()
    model = TorchModel(net)
    with pytest.raises(ValueError, match=r"'tok.weight' enters the model more than once.*tying"):
        cl.KFACLinearOperator(model, cl.CrossEntropyLoss(), model.params, _tokens())
    # the exact operators take tied weights
    G = cl.GGNLinearOperator(model, cl.CrossEntropyLoss(), model.params, _tokens())
    assert G.shape[0] == sum(p.numel() for p in model.params)


@pytest.mark.parametrize(
    "option, match",
    [
        ({"padding_idx": 0}, "padding_idx=0.*forward-mode"),
        ({"max_norm": 1.0}, "max_norm=1.0.*in place"),
        ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
        ({"sparse": True}, "sparse=True"),
    ],
)
def test_embedding_options_that_change_the_derivatives_are_refused(option, match):
    net = torch.nn.Sequential(torch.nn.Embedding(5, 3, **option), torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"'0' is a torch.nn.Embedding with " + match):
        TorchModel(net)
    net[0].weight.requires_grad_(False)
    TorchModel(net)  # a frozen table is a constant


class _FunctionalEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(5, 3, dtype=DTYPE))

    def forward(self, ids):
        return F.embedding(ids, self.table, max_norm=1.0).sum(dim=1)


def test_functional_embedding_with_max_norm_is_refused_by_the_taps():
    model = TorchModel(_FunctionalEmbedding())
    lin = model.linearize(model.params, torch.tensor([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match=r"'table' is the table of an embedding.*max_norm"):
        lin.layer_taps()


def test_layer_norm_over_more_than_the_last_axis_is_refused_by_the_taps():
    net = torch.nn.Sequential(torch.nn.LayerNorm((4, 3)), torch.nn.Flatten()).to(DTYPE)
    model = TorchModel(net)
    lin = model.linearize(model.params, torch.randn(2, 4, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"normalized_shape=\(4, 3\).*last axis only"):
        lin.layer_taps()
    # tier 1 is unaffected
    assert lin.jvp([torch.ones_like(p) for p in model.params]).shape == (2, 12)


class _CrossAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, torch.tanh(x), torch.tanh(x))[0]


def test_cross_attention_splits_the_packed_projection_and_is_refused_by_the_taps():
    model = TorchModel(_CrossAttention().to(DTYPE).eval())
    lin = model.linearize(model.params, torch.randn(2, 3, 4, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"part of the parameter 'attn.in_proj_weight'.*cross"):
        lin.layer_taps()


@pytest.mark.parametrize("N", [3, 4])
def test_shared_position_ids_without_a_data_axis_are_refused_not_misread(N):
    """``pos(torch.arange(S))`` has no data axis: with N == S it would pass the shape check
    and be read as one id per datum (a wrong diagonal); it is refused either way."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = torch.nn.Embedding(4, 2), torch.nn.Embedding(3, 2)
            self.head = torch.nn.Linear(2, 4)

        def forward(self, ids):
            return self.head(torch.tanh(self.tok(ids) + self.pos(torch.arange(ids.shape[1]))))

    torch.manual_seed(0)
    model = TorchModel(Net().double())
    ids, y = torch.randint(0, 4, (N, 3)), torch.randint(0, 4, (N, 3))
    with pytest.raises(ValueError, match=r"pos.weight.*arange\(S\)\.expand\(N, S\)|data axis"):
        cl.GGNDiagonalLinearOperator(model, cl.CrossEntropyLoss(), model.params, [(ids, y)])
