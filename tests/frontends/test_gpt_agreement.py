"""One 2-block GPT natively, in PyTorch, as a plain JAX function and in Flax linen.

The GPT (width 16, sequence 8, vocabulary 20, 2 heads, MLP ratio 2): token embedding,
positions (fixed sinusoidal, or learned: an embedding of the position ids
``arange(S)``, ``torch.nn.Embedding``/``embed``/``linen.Embed`` called on them), two
causal pre-norm blocks (LayerNorm, self-attention with the packed projection of
``torch.nn.MultiheadAttention``, LayerNorm, GELU MLP, both residual), a final
LayerNorm and a linear head; cross-entropy at every position. It is built four times
with the same weights:

- natively, ``nn.Sequential(Embedding, SinusoidalPositions | PositionalEmbedding,
  TransformerBlock, TransformerBlock, LayerNorm, Linear)`` (the reference);
- in PyTorch, of ``torch.nn`` modules (``MultiheadAttention(batch_first=True)`` with a
  causal mask), in evaluation mode, through ``TorchModel``;
- as a plain JAX function of a nested dict of parameters, its layers marked with
  :func:`~curvlinops.frontends.jax.dense` (attention's projections with torch-layout
  weights, the MLP with kernels ``(D_in, D_out)``: ``transposed=True``) and
  :func:`~curvlinops.frontends.jax.embed`;
- in Flax linen through ``JaxModel.from_flax``: ``linen.Embed``, ``linen.LayerNorm``,
  and an attention module of two ``linen.Dense`` (the packed ``3E`` projection and the
  output projection) around its own attention math. (Flax's
  ``MultiHeadDotProductAttention`` projects with three ``DenseGeneral`` layers, which
  ``from_flax`` does not tap; and separate query, key and value projections would be
  three K-FAC blocks where the packed projection is one, so K-FAC would differ from the
  native model's even if they were tapped.)

The flat parameter vectors of the frameworks differ by a permutation (pytree leaves in
sorted key order, transposed kernels), built with NumPy by matching the copied values
(every weight a distinct random number). Checked, float64, to ~1e-10: the outputs, the
dense GGN and Hessian (``GGNLinearOperator``, ``HessianLinearOperator``) of all four;
K-FAC (type-2, "expand" and "reduce"), EKFAC, and the GGN and empirical-Fisher
diagonals of all four on the full GPT with learned positions (affine LayerNorms, weights
away from 1 and 0: elementwise taps of
``F.layer_norm``, ``curvlinops.frontends.jax.layer_norm`` and ``linen.LayerNorm``).
K-FAC's exactness in the weight-sharing cases of
Eschenhagen et al. (2023) is tested in ``tests/curvature/test_kfac.py``.
"""

from __future__ import annotations

import math

import array_api_compat.numpy as npx
import numpy as np
import pytest

import curvlinops as cl
from curvlinops import nn
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from curvlinops.frontends.jax import JaxModel, dense, embed, layer_norm  # noqa: E402
from curvlinops.frontends.torch import TorchModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

V, E, S, HEADS, RATIO, BLOCKS = 20, 16, 8, 2, 2, 2
EPS = 1e-5
RTOL = 1e-10
SIZES = (2, 2)  # one batch shape: one compilation of each JAX function
PROBES = 12


# -- the native GPT (the reference) and its weights --------------------------------------


def native_gpt(positions, affine=True):
    pos = nn.SinusoidalPositions() if positions == "sinusoidal" else nn.PositionalEmbedding(S, E)
    blocks = [nn.TransformerBlock(E, HEADS, mlp_ratio=RATIO) for _ in range(BLOCKS)]
    if not affine:  # the same blocks with LayerNorms without parameters
        blocks = [_no_affine_block() for _ in range(BLOCKS)]
    return nn.Sequential(
        nn.Embedding(V, E),
        pos,
        *blocks,
        nn.LayerNorm(E, eps=EPS, elementwise_affine=affine),
        nn.Linear(E, V),
    )


def _no_affine_block():
    """A pre-norm block as ``TransformerBlock``, its LayerNorms without parameters."""
    attention = nn.Residual(
        nn.Sequential(
            nn.LayerNorm(E, eps=EPS, elementwise_affine=False),
            nn.MultiheadSelfAttention(E, HEADS, causal=True),
        )
    )
    mlp = nn.Residual(
        nn.Sequential(
            nn.LayerNorm(E, eps=EPS, elementwise_affine=False),
            nn.Linear(E, RATIO * E),
            nn.GELU(),
            nn.Linear(RATIO * E, E),
        )
    )
    return nn.Sequential(attention, mlp)


def _layout(positions, affine):
    """The parameters by name, in the native order: ``[(name, shape)]``."""
    names = [("tok", (V, E))]
    if positions == "learned":
        names.append(("pos", (S, E)))
    for i in range(BLOCKS):
        b = f"blocks.{i}."
        if affine:
            names += [(b + "ln1.weight", (E,)), (b + "ln1.bias", (E,))]
        names += [
            (b + "attn.in_proj_weight", (3 * E, E)),
            (b + "attn.in_proj_bias", (3 * E,)),
            (b + "attn.out_proj.weight", (E, E)),
            (b + "attn.out_proj.bias", (E,)),
        ]
        if affine:
            names += [(b + "ln2.weight", (E,)), (b + "ln2.bias", (E,))]
        names += [
            (b + "fc1.weight", (RATIO * E, E)),
            (b + "fc1.bias", (RATIO * E,)),
            (b + "fc2.weight", (E, RATIO * E)),
            (b + "fc2.bias", (E,)),
        ]
    if affine:
        names += [("ln_f.weight", (E,)), ("ln_f.bias", (E,))]
    return names + [("head.weight", (V, E)), ("head.bias", (V,))]


def weights(positions, affine, seed=0):
    """``{name: array}``: distinct random values, LayerNorm weights near 1 (float64)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in _layout(positions, affine):
        value = 0.4 * rng.standard_normal(shape)
        if name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == "ln_f.weight":
            value = 1.0 + value
        out[name] = value
    return out


# -- PyTorch -----------------------------------------------------------------------------


def _torch_sinusoids(length, width):
    position = torch.arange(length, dtype=torch.float64)[:, None]
    frequency = torch.exp(-math.log(1e4) * torch.arange(0, width, 2, dtype=torch.float64) / width)
    table = torch.zeros(length, width, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class TorchBlock(torch.nn.Module):
    def __init__(self, affine):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(E, eps=EPS, elementwise_affine=affine)
        self.attn = torch.nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(E, eps=EPS, elementwise_affine=affine)
        self.fc1 = torch.nn.Linear(E, RATIO * E)
        self.fc2 = torch.nn.Linear(RATIO * E, E)

    def forward(self, h):
        a = self.ln1(h)
        mask = torch.triu(torch.ones(h.shape[1], h.shape[1], dtype=torch.bool), diagonal=1)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(h))))


class TorchGPT(torch.nn.Module):
    """The GPT of ``torch.nn`` modules; learned positions are an ``nn.Embedding`` of the
    position ids (``arange(S)`` for every datum)."""

    def __init__(self, positions, affine):
        super().__init__()
        self.tok = torch.nn.Embedding(V, E)
        self.learned = positions == "learned"
        if self.learned:
            self.pos = torch.nn.Embedding(S, E)
        else:
            self.register_buffer("sinusoids", _torch_sinusoids(S, E))
        self.blocks = torch.nn.ModuleList([TorchBlock(affine) for _ in range(BLOCKS)])
        self.ln_f = torch.nn.LayerNorm(E, eps=EPS, elementwise_affine=affine)
        self.head = torch.nn.Linear(E, V)

    def forward(self, ids):
        N, length = ids.shape
        h = self.tok(ids)
        if self.learned:
            h = h + self.pos(torch.arange(length, device=ids.device).expand(N, length))
        else:
            h = h + self.sinusoids[:length]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def torch_gpt(w, positions, affine):
    net = TorchGPT(positions, affine).to(torch.float64)
    rename = {"tok": "tok.weight", "pos": "pos.weight"}
    params = dict(net.named_parameters())
    assert sorted(params) == sorted(rename.get(n, n) for n in w)
    with torch.no_grad():
        for name, value in w.items():
            params[rename.get(name, name)].copy_(torch.from_numpy(value))
    return TorchModel(net.eval())


# -- a plain JAX function with marked layers ------------------------------------------------


def _jax_sinusoids(length, width):
    position = jnp.arange(length, dtype=jnp.float64)[:, None]
    frequency = jnp.exp(-math.log(1e4) * jnp.arange(0, width, 2, dtype=jnp.float64) / width)
    angle = position * frequency
    return jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(length, width)


def _jax_layer_norm(x, p=None):
    """The marked layer norm (an elementwise tap) or, without parameters, the plain one."""
    if p is None:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + EPS)
    return layer_norm(x, p["scale"], p["bias"], eps=EPS)


def _attention_core(qkv):
    """Causal multi-head attention of a packed ``(N, S, 3E)`` projection: ``(N, S, E)``."""
    N, length, _ = qkv.shape
    d = E // HEADS
    q, k, v = (
        jnp.transpose(t.reshape(N, length, HEADS, d), (0, 2, 1, 3))
        for t in jnp.split(qkv, 3, axis=-1)
    )
    scores = q @ jnp.swapaxes(k, -1, -2) / math.sqrt(d)
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    o = jax.nn.softmax(scores, axis=-1) @ v
    return jnp.transpose(o, (0, 2, 1, 3)).reshape(N, length, E)


def plain_gpt(p, ids):
    """The GPT as a JAX function of a nested dict; ``p["ln*"]`` absent: no affine part."""
    N, length = ids.shape
    h = embed(ids, p["tok"])
    if "pos" in p:
        h = h + embed(jnp.broadcast_to(jnp.arange(length), (N, length)), p["pos"])
    else:
        h = h + _jax_sinusoids(length, E)
    for b in p["blocks"]:
        a = _jax_layer_norm(h, b.get("ln1"))
        qkv = dense(a, b["attn"]["in_w"], b["attn"]["in_b"])
        h = h + dense(_attention_core(qkv), b["attn"]["out_w"], b["attn"]["out_b"])
        m = _jax_layer_norm(h, b.get("ln2"))
        m = jax.nn.gelu(
            dense(m, b["mlp"]["k1"], b["mlp"]["b1"], transposed=True), approximate=False
        )
        h = h + dense(m, b["mlp"]["k2"], b["mlp"]["b2"], transposed=True)
    return dense(_jax_layer_norm(h, p.get("ln_f")), p["head"]["w"], p["head"]["b"])


def plain_params(w):
    tree = {"tok": w["tok"], "blocks": [], "head": {"w": w["head.weight"], "b": w["head.bias"]}}
    if "pos" in w:
        tree["pos"] = w["pos"]
    if "ln_f.weight" in w:
        tree["ln_f"] = {"scale": w["ln_f.weight"], "bias": w["ln_f.bias"]}
    for i in range(BLOCKS):
        b = f"blocks.{i}."
        block = {
            "attn": {
                "in_w": w[b + "attn.in_proj_weight"],
                "in_b": w[b + "attn.in_proj_bias"],
                "out_w": w[b + "attn.out_proj.weight"],
                "out_b": w[b + "attn.out_proj.bias"],
            },
            "mlp": {
                "k1": w[b + "fc1.weight"].T,
                "b1": w[b + "fc1.bias"],
                "k2": w[b + "fc2.weight"].T,
                "b2": w[b + "fc2.bias"],
            },
        }
        for ln in ("ln1", "ln2"):
            if b + ln + ".weight" in w:
                block[ln] = {"scale": w[b + ln + ".weight"], "bias": w[b + ln + ".bias"]}
        tree["blocks"].append(block)
    return jax.tree_util.tree_map(jnp.asarray, tree)


def plain_model(w, positions, affine):
    return JaxModel(plain_gpt, plain_params(w), layer_taps=True)


# -- Flax linen ------------------------------------------------------------------------------


def _flax_classes():
    linen = pytest.importorskip("flax.linen")

    class Attention(linen.Module):
        """Self-attention with the packed projection: Dense(3E), the math, Dense(E)."""

        @linen.compact
        def __call__(self, x):
            qkv = linen.Dense(3 * E, name="qkv")(x)
            return linen.Dense(E, name="out")(_attention_core(qkv))

    class Block(linen.Module):
        affine: bool

        @linen.compact
        def __call__(self, h):
            kw = dict(epsilon=EPS, use_bias=self.affine, use_scale=self.affine)
            h = h + Attention(name="attn")(linen.LayerNorm(name="ln1", **kw)(h))
            m = linen.Dense(RATIO * E, name="fc1")(linen.LayerNorm(name="ln2", **kw)(h))
            return h + linen.Dense(E, name="fc2")(linen.gelu(m, approximate=False))

    class GPT(linen.Module):
        learned: bool
        affine: bool

        @linen.compact
        def __call__(self, ids):
            N, length = ids.shape
            h = linen.Embed(V, E, name="tok")(ids)
            if self.learned:
                positions = jnp.broadcast_to(jnp.arange(length), (N, length))
                h = h + linen.Embed(S, E, name="pos")(positions)
            else:
                h = h + _jax_sinusoids(length, E)
            for i in range(BLOCKS):
                h = Block(self.affine, name=f"block{i}")(h)
            kw = dict(epsilon=EPS, use_bias=self.affine, use_scale=self.affine)
            h = linen.LayerNorm(name="ln_f", **kw)(h)
            return linen.Dense(V, name="head")(h)

    return GPT


def flax_model(w, positions, affine):
    GPT = _flax_classes()

    def dense_(name):
        return {"kernel": w[name + ".weight"].T, "bias": w[name + ".bias"]}

    def ln(name):
        return {"scale": w[name + ".weight"], "bias": w[name + ".bias"]}

    params = {"tok": {"embedding": w["tok"]}, "head": dense_("head")}
    if positions == "learned":
        params["pos"] = {"embedding": w["pos"]}
    if affine:
        params["ln_f"] = ln("ln_f")
    for i in range(BLOCKS):
        b = f"blocks.{i}."
        block = {
            "attn": {
                "qkv": {
                    "kernel": w[b + "attn.in_proj_weight"].T,
                    "bias": w[b + "attn.in_proj_bias"],
                },
                "out": dense_(b + "attn.out_proj"),
            },
            "fc1": dense_(b + "fc1"),
            "fc2": dense_(b + "fc2"),
        }
        if affine:
            block["ln1"], block["ln2"] = ln(b + "ln1"), ln(b + "ln2")
        params[f"block{i}"] = block
    params = jax.tree_util.tree_map(jnp.asarray, params)
    net = GPT(learned=positions == "learned", affine=affine)
    # the structure Flax itself makes agrees with the one built here
    made = net.init(jax.random.key(0), jnp.zeros((1, S), dtype=jnp.int32))["params"]
    shapes = jax.tree_util.tree_map(lambda a: a.shape, made)
    assert shapes == jax.tree_util.tree_map(lambda a: a.shape, params)
    return JaxModel.from_flax(net, {"params": params})


# -- the problems --------------------------------------------------------------------------


def permutation(native_params, params):
    """``P`` with ``flat(params) == flat(native_params)[P]``, by matching the values."""
    native = np.concatenate([np.ravel(p) for p in native_params])
    ours = np.concatenate([np.ravel(np.asarray(p)) for p in params])
    assert native.shape == ours.shape and np.unique(native).size == native.size
    order = np.argsort(native)
    P = order[np.searchsorted(native[order], ours)]
    np.testing.assert_array_equal(ours, native[P])  # a pure reordering of the weights
    return P


def _data(seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, V, (n, S)), rng.integers(0, V, (n, S))) for n in SIZES]


BUILDERS = {"torch": torch_gpt, "jax": plain_model, "flax": flax_model}
_CACHE = {}


def setup(framework, positions, affine=True):
    """``(model, params, data, P)``; ``framework="native"`` gives ``P = arange``."""
    key = (framework, positions, affine)
    if key not in _CACHE:
        w = weights(positions, affine)
        native_params = list(w.values())
        data = _data()
        if framework == "native":
            model = native_gpt(positions, affine)
            assert model.expected_param_shapes() == [p.shape for p in native_params]
            params, model_data = native_params, data
        else:
            model = BUILDERS[framework](w, positions, affine)
            params = model.params
            if framework == "torch":
                model_data = [(torch.from_numpy(X), torch.from_numpy(y)) for X, y in data]
            else:
                model_data = [(jnp.asarray(X), jnp.asarray(y)) for X, y in data]
        _CACHE[key] = (model, params, model_data, permutation(native_params, params))
    return _CACHE[key]


def _dense(operator):
    if hasattr(operator, "to_dense"):
        return np.array(cl.to_numpy(operator.to_dense()))  # a writable copy
    return np.diag(np.asarray(cl.to_numpy(operator.diagonal())))


def assert_close(actual, expected, rtol=RTOL):
    scale = float(np.max(np.abs(expected)))
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


_REFERENCES = {}


def reference(name, positions, affine=True):
    key = (name, positions, affine)
    if key not in _REFERENCES:
        model, params, data, _ = setup("native", positions, affine)
        _REFERENCES[key] = _dense(OPERATORS[name](model, cl.CrossEntropyLoss(), params, data))
    return _REFERENCES[key]


OPERATORS = {
    "ggn": lambda *a: cl.GGNLinearOperator(*a),
    "hessian": lambda *a: cl.HessianLinearOperator(*a),
    "kfac-expand": lambda *a: KFACLinearOperator(*a, kfac_approx="expand"),
    "kfac-reduce": lambda *a: KFACLinearOperator(*a, kfac_approx="reduce"),
    "ekfac": lambda *a: EKFACLinearOperator(*a),
    "ggn-diagonal": lambda *a: cl.GGNDiagonalLinearOperator(*a),
    "ef-diagonal": lambda *a: cl.EFDiagonalLinearOperator(*a),
}
EXACT = ["ggn", "hessian"]
TAPS = [name for name in OPERATORS if name not in EXACT]
FRAMEWORKS = ["torch", "jax", "flax"]
POSITIONS = ["sinusoidal", "learned"]


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_outputs_agree(framework, positions):
    native, w, data, _ = setup("native", positions)
    model, params, model_data, _ = setup(framework, positions)
    for (X, _), (Xm, _) in zip(data, model_data, strict=True):
        out = np.asarray(cl.to_numpy(model(params, Xm)))
        assert_close(out, native(w, X), rtol=1e-12)


def _probes(framework, P):
    """Random ``(P, PROBES)`` columns in the model's flat order and the native ones."""
    V_model = np.random.default_rng(7).standard_normal((P.size, PROBES))
    V_native = np.empty_like(V_model)
    V_native[P] = V_model  # flat(model) = flat(native)[P]
    if framework == "torch":
        return torch.from_numpy(V_model), V_native
    if framework in ("jax", "flax"):
        return jnp.asarray(V_model), V_native
    return V_model, V_native


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("name", EXACT)
def test_ggn_and_hessian_agree_up_to_the_permutation(name, framework, positions):
    """On random columns: ``G_model V = (G_native V')[P]`` with ``V'[P] = V``.

    (``P = 5140``: the dense matrices, ``P`` products each, would take minutes through
    the frontends; products with random columns determine the same agreement.)
    """
    native, w, data, _ = setup("native", positions)
    model, params, model_data, P = setup(framework, positions)
    V_model, V_native = _probes(framework, P)
    loss = cl.CrossEntropyLoss()
    expected = np.asarray(OPERATORS[name](native, loss, w, data) @ V_native)[P]
    ours = np.asarray(cl.to_numpy(OPERATORS[name](model, loss, params, model_data) @ V_model))
    assert_close(ours, expected)


@pytest.mark.parametrize("positions", ["learned"])  # every tap kind (both embeddings)
@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("name", TAPS)
def test_tap_operators_of_the_full_gpt_agree(name, framework, positions):
    """With affine LayerNorms: their elementwise taps (torch F.layer_norm, JAX layer_norm,
    Flax LayerNorm) give the same exact blocks as the native ones; the learned positions
    are an embedding tap, so this covers every tap kind of the GPT."""
    model, params, data, P = setup(framework, positions)
    expected = reference(name, positions)[np.ix_(P, P)]
    ours = _dense(OPERATORS[name](model, cl.CrossEntropyLoss(), params, data))
    assert_close(ours, expected)


def test_every_framework_taps_the_same_layers():
    """Embeddings (tokens, positions) and the five linear maps per block and head."""
    for positions in POSITIONS:
        counts = {}
        for framework in ["native", *FRAMEWORKS]:
            model, params, data, _ = setup(framework, positions, affine=False)
            taps = model.linearize(params, data[0][0]).layer_taps()
            counts[framework] = sorted(tuple(t.matrix_shape) for t in taps)
        assert all(c == counts["native"] for c in counts.values()), counts
        assert len(counts["native"]) == (2 if positions == "learned" else 1) + 4 * BLOCKS + 1


def test_native_params_init_layout():
    """The native layout here is the one the library's blocks have."""
    model = native_gpt("learned")
    params = model.init(0, xp=npx, dtype=npx.float64)
    assert [tuple(p.shape) for p in params] == [s for _, s in _layout("learned", True)]
