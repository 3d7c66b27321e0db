"""Tier 3 of the JAX frontend: marked layers, Flax linen, Flax nnx and Equinox.

An MLP and a small CNN (conv, relu, conv, flatten, dense) exist natively
(``curvlinops.nn``, the reference) and as JAX models of each kind with the same weights,
copied in each library's layout (transposed kernels, channels-last images, the
flattening order of NHWC features). Every tap-based operator (K-FAC type-2 with
"expand" and "reduce", K-FAC empirical, EKFAC, the GGN and empirical-Fisher diagonals)
must equal the native one up to the permutation of the flat parameter vector, which is
built with NumPy by matching the copied weight values to the native ones (every weight
is a distinct random number, and the match is checked to be exact). The taps themselves
are checked against ``jax.vjp`` of the network cut at each layer and against patches
unfolded with NumPy; float64 throughout (``tests/conftest.py`` enables JAX's x64).
A grouped CNN (grouped and depthwise convolutions) in Flax and Equinox is compared with
the native one the same way; a single Flax depthwise convolution with K-FAC "expand"
against the exact GGN from JAX autodiff; grouped ``conv2d`` marks against ``jax.vjp``.
"""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest

import curvlinops as cl
from curvlinops import nn
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from curvlinops.frontends.jax import JaxModel, conv2d, dense, embed  # noqa: E402

RTOL, ATOL = 1e-10, 1e-12
SIZES = (4, 3)


# -- the problems: a native network, its data, and its weights --------------------------


def _native(kind):
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)
        )
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _problem(kind, seed=0):
    native = _native(kind)
    params = native.init(seed, xp=npx, dtype=npx.float64)
    rng = np.random.default_rng(seed + 1)
    shape = (5,) if kind == "mlp" else (2, 6, 6)
    data = [(rng.standard_normal((n, *shape)), rng.integers(0, 3, n)) for n in SIZES]
    return native, params, data


# -- the same networks in each JAX style, from the native weights -------------------------


def _plain_mlp(p, x):
    h = jnp.tanh(dense(x, p[0], p[1]))
    h = jnp.tanh(dense(h, p[2], p[3], transposed=True))  # a kernel stored (D_in, D_out)
    return dense(h, p[4], p[5], name="head")


def _plain_mlp_params(w):
    return [w[0], w[1], w[2].T, w[3], w[4], w[5]]


def _plain_cnn(p, x):
    h = jax.nn.relu(conv2d(x, p[0], p[1], padding=1))
    h = conv2d(h, p[2], p[3], stride=2)
    return dense(h.reshape(h.shape[0], -1), p[4], p[5])


def _plain_cnn_nhwc(p, x):
    h = jax.nn.relu(conv2d(x, p[0], p[1], padding=((1, 1), (1, 1)), layout="NHWC"))
    h = conv2d(h, p[2], p[3], stride=(2, 2), padding="VALID", layout="NHWC")
    return dense(h.reshape(h.shape[0], -1), p[4], p[5], transposed=True)


def _hwio(w):
    return np.transpose(w, (2, 3, 1, 0))


def _nhwc_dense(w, c, h, wd):
    """A native Linear weight after a (C, H, W) flatten as the kernel after an (H, W, C) one."""
    out = w.shape[0]
    return np.transpose(w.reshape(out, c, h, wd), (2, 3, 1, 0)).reshape(h * wd * c, out)


def _cnn_nhwc_params(w):
    return [_hwio(w[0]), w[1], _hwio(w[2]), w[3], _nhwc_dense(w[4], 2, 2, 2), w[5]]


def _to_nhwc(X):
    return np.transpose(X, (0, 2, 3, 1))


def _build_plain(kind, w):
    if kind == "mlp":
        return JaxModel(_plain_mlp, _jnp(_plain_mlp_params(w)), layer_taps=True), None
    return JaxModel(_plain_cnn, _jnp(w), layer_taps=True), None


def _build_plain_nhwc(kind, w):
    return JaxModel(_plain_cnn_nhwc, _jnp(_cnn_nhwc_params(w)), layer_taps=True), _to_nhwc


def _build_flax(kind, w):
    linen = pytest.importorskip("flax.linen")

    if kind == "mlp":

        class Net(linen.Module):
            @linen.compact
            def __call__(self, x):
                x = jnp.tanh(linen.Dense(6)(x))
                x = jnp.tanh(linen.Dense(4)(x))
                return linen.Dense(3)(x)

        names = ["Dense_0", "Dense_1", "Dense_2"]
        kernels = [w[0].T, w[2].T, w[4].T]
        convert = None
    else:

        class Net(linen.Module):
            @linen.compact
            def __call__(self, x):
                x = linen.relu(linen.Conv(3, (3, 3), padding=1)(x))
                x = linen.Conv(2, (3, 3), strides=2, padding="VALID")(x)
                return linen.Dense(3)(x.reshape(x.shape[0], -1))

        names = ["Conv_0", "Conv_1", "Dense_0"]
        kernels = [_hwio(w[0]), _hwio(w[2]), _nhwc_dense(w[4], 2, 2, 2)]
        convert = _to_nhwc
    params = {
        name: {"kernel": jnp.asarray(k), "bias": jnp.asarray(b)}
        for name, k, b in zip(names, kernels, w[1::2], strict=True)
    }
    return JaxModel.from_flax(Net(), {"params": params}), convert


def _build_nnx(kind, w):
    pytest.importorskip("flax")
    from flax import nnx

    rngs = nnx.Rngs(0)
    if kind == "mlp":

        class Net(nnx.Module):
            def __init__(self):
                self.l1 = nnx.Linear(5, 6, rngs=rngs)
                self.l2 = nnx.Linear(6, 4, rngs=rngs)
                self.l3 = nnx.Linear(4, 3, rngs=rngs)

            def __call__(self, x):
                return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))

        layers = {"l1": w[0].T, "l2": w[2].T, "l3": w[4].T}
        convert = None
    else:

        class Net(nnx.Module):
            def __init__(self):
                self.c1 = nnx.Conv(2, 3, (3, 3), padding=1, rngs=rngs)
                self.c2 = nnx.Conv(3, 2, (3, 3), strides=2, padding="VALID", rngs=rngs)
                self.l3 = nnx.Linear(8, 3, rngs=rngs)

            def __call__(self, x):
                x = self.c2(nnx.relu(self.c1(x)))
                return self.l3(x.reshape(x.shape[0], -1))

        layers = {"c1": _hwio(w[0]), "c2": _hwio(w[2]), "l3": _nhwc_dense(w[4], 2, 2, 2)}
        convert = _to_nhwc
    net = Net()
    for (name, kernel), bias in zip(layers.items(), w[1::2], strict=True):
        getattr(net, name).kernel = nnx.Param(jnp.asarray(kernel))
        getattr(net, name).bias = nnx.Param(jnp.asarray(bias))
    return JaxModel.from_nnx(net), convert


def _build_equinox(kind, w):
    eqx = pytest.importorskip("equinox")
    keys = jax.random.split(jax.random.key(0), 3)
    if kind == "mlp":
        layers = [
            eqx.nn.Linear(5, 6, key=keys[0]),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Linear(6, 4, key=keys[1]),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Linear(4, 3, key=keys[2]),
        ]
        tapped = [0, 2, 4]
        biases = list(w[1::2])
    else:
        layers = [
            eqx.nn.Conv2d(2, 3, 3, padding=1, key=keys[0]),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Conv2d(3, 2, 3, stride=2, key=keys[1]),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(8, 3, key=keys[2]),
        ]
        tapped = [0, 2, 4]
        biases = [w[1][:, None, None], w[3][:, None, None], w[5]]  # eqx conv bias (C, 1, 1)
    net = eqx.nn.Sequential(layers)
    for i, weight, bias in zip(tapped, w[0::2], biases, strict=True):
        net = eqx.tree_at(
            lambda m, i=i: (m.layers[i].weight, m.layers[i].bias),
            net,
            (jnp.asarray(weight), jnp.asarray(bias)),
        )
    return JaxModel.from_equinox(net), None


def _jnp(arrays):
    return [jnp.asarray(a) for a in arrays]


BUILDERS = {
    "plain": _build_plain,
    "plain-nhwc": _build_plain_nhwc,
    "flax": _build_flax,
    "nnx": _build_nnx,
    "equinox": _build_equinox,
}
CASES = [("mlp", f) for f in ("plain", "flax", "nnx", "equinox")] + [
    ("cnn", f) for f in ("plain", "plain-nhwc", "flax", "nnx", "equinox")
]


def permutation(native_params, params):
    """``P`` with ``flat(params) == flat(native_params)[P]``, by matching the values."""
    native = np.concatenate([np.ravel(p) for p in native_params])
    ours = np.concatenate([np.ravel(np.asarray(p)) for p in params])
    assert native.shape == ours.shape and np.unique(native).size == native.size
    order = np.argsort(native)
    P = order[np.searchsorted(native[order], ours)]
    np.testing.assert_array_equal(ours, native[P])  # a pure reordering of the weights
    return P


_SETUPS = {}


def setup(kind, framework):
    """(native, params, data, model, model params, model data, P), built once per case."""
    key = (kind, framework)
    if key not in _SETUPS:
        native, params, data = _problem(kind)
        model, convert = BUILDERS[framework](kind, params)
        convert = convert or (lambda X: X)
        model_data = [(jnp.asarray(convert(X)), jnp.asarray(y)) for X, y in data]
        _SETUPS[key] = (
            native,
            params,
            data,
            model,
            model.params,
            model_data,
            permutation(params, model.params),
        )
    return _SETUPS[key]


# -- the curvature of each model equals the native one, permuted ---------------------------

OPERATORS = {
    "kfac-expand": lambda *a: KFACLinearOperator(*a, kfac_approx="expand"),
    "kfac-reduce": lambda *a: KFACLinearOperator(*a, kfac_approx="reduce"),
    "kfac-joint": lambda *a: KFACLinearOperator(*a, separate_weight_and_bias=False),
    "kfac-empirical": lambda *a: KFACLinearOperator(*a, fisher_type="empirical"),
    "ekfac": lambda *a: EKFACLinearOperator(*a),
    "ggn-diagonal": lambda *a: cl.GGNDiagonalLinearOperator(*a),
    "ef-diagonal": lambda *a: cl.EFDiagonalLinearOperator(*a),
}
_REFERENCES = {}


def _dense(operator):
    if hasattr(operator, "to_dense"):
        return cl.to_numpy(operator.to_dense())
    return np.diag(cl.to_numpy(operator.diagonal()))


def reference(kind, name):
    if (kind, name) not in _REFERENCES:
        native, params, data = _problem(kind)
        op = OPERATORS[name](native, cl.CrossEntropyLoss(), params, data)
        _REFERENCES[kind, name] = _dense(op)
    return _REFERENCES[kind, name]


@pytest.mark.parametrize("name", list(OPERATORS))
@pytest.mark.parametrize(("kind", "framework"), CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_tap_operators_equal_the_native_ones_permuted(kind, framework, name):
    if kind == "mlp" and name == "kfac-reduce":
        pytest.skip("no shared axes: reduce is expand")
    _, _, _, model, params, data, P = setup(kind, framework)
    expected = reference(kind, name)[np.ix_(P, P)]
    ours = OPERATORS[name](model, cl.CrossEntropyLoss(), params, data)
    np.testing.assert_allclose(_dense(ours), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("kind", "framework"), CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_taps_give_the_weight_gradients_of_vjp(kind, framework):
    # (curvlinops.verify.check_layer_taps does the same; see the test below)
    _, _, _, model, params, data, _ = setup(kind, framework)
    X = data[0][0]
    U = jnp.asarray(np.random.default_rng(2).standard_normal((X.shape[0], 3, 2)))
    lin = model.linearize(params, X)
    grads = [np.asarray(g) for g in lin.vjp(U)]
    for tap in lin.layer_taps(U):
        a = np.asarray(tap.inputs).reshape(-1, tap.inputs.shape[-1])
        g = np.asarray(tap.output_grads).reshape(-1, *tap.output_grads.shape[-2:])
        weight = np.einsum("tom,ti->oim", g, a)  # (D_out, D_in, M)
        if tap.transposed:
            weight = np.swapaxes(weight, 0, 1)
        expected = grads[tap.weight_index]
        np.testing.assert_allclose(weight.reshape(expected.shape), expected, rtol=1e-11, atol=1e-13)
        if tap.bias_index is not None:
            expected = grads[tap.bias_index]
            bias = g.sum(axis=0).reshape(expected.shape)
            np.testing.assert_allclose(bias, expected, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize(("kind", "framework"), CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_verify_check_layer_taps_passes_for_every_framework(kind, framework):
    from curvlinops.verify import check_layer_taps

    _, _, _, model, params, data, _ = setup(kind, framework)
    report = check_layer_taps(model, params, data[0][0])
    assert report.passed, report


@pytest.mark.parametrize(("kind", "framework"), CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_forward_and_tap_layout_match_the_native_model(kind, framework):
    native, w, data, model, params, model_data, _ = setup(kind, framework)
    X = model_data[0][0]
    np.testing.assert_allclose(
        np.asarray(model(params, X)), native(w, data[0][0]), rtol=1e-12, atol=1e-12
    )
    taps = model.linearize(params, X).layer_taps(None)
    native_taps = native.linearize(w, data[0][0]).layer_taps(None)
    assert len(taps) == len(native_taps) == 3
    transposed = {"plain": [False, kind == "mlp", False], "equinox": [False] * 3}
    expected = transposed.get(framework, [True] * 3)  # flax, nnx, plain-nhwc: kernels (D_in, D_out)
    assert [t.transposed for t in taps] == expected
    for tap, ref in zip(taps, native_taps, strict=True):
        assert tap.matrix_shape == ref.matrix_shape
        assert tap.output_grads is None
        assert tap.inputs.shape == ref.inputs.shape


# -- the taps against jax.vjp directly --------------------------------------------------


def _im2col(x, k, stride, pad):
    """Patches ``(N, S, C * k * k)`` of NCHW images, ordered ``(C, kh, kw)`` (NumPy)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    N, C, H, W = x.shape
    Ho, Wo = (H - k) // stride + 1, (W - k) // stride + 1
    cols = np.empty((N, C, k, k, Ho, Wo))
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = x[:, :, i : i + stride * Ho : stride, j : j + stride * Wo : stride]
    return np.transpose(cols, (0, 4, 5, 1, 2, 3)).reshape(N, Ho * Wo, C * k * k)


def _cnn_pieces(p):
    """The plain CNN as three functions of the layer outputs (pre-activations)."""

    def first(x):
        return conv2d(x, p[0], p[1], padding=1)

    def second(s1):
        return conv2d(jax.nn.relu(s1), p[2], p[3], stride=2)

    def third(s2):
        return dense(s2.reshape(s2.shape[0], -1), p[4], p[5])

    return first, second, third


def _column_vjp(fn, primal, U):
    _, pullback = jax.vjp(fn, primal)
    return jax.vmap(lambda u: pullback(u)[0], in_axes=-1, out_axes=-1)(U)


def test_plain_cnn_taps_against_vjp_and_numpy_patches():
    _, w, data, model, params, model_data, _ = setup("cnn", "plain")
    X = model_data[0][0]
    U = jnp.asarray(np.random.default_rng(3).standard_normal((X.shape[0], 3, 4)))
    taps = model.linearize(params, X).layer_taps(U)
    first, second, third = _cnn_pieces(params)
    s1 = first(X)
    s2 = second(s1)
    g3 = U
    g2 = _column_vjp(third, s2, U)
    g1 = _column_vjp(lambda s: third(second(s)), s1, U)
    expected_inputs = [
        _im2col(np.asarray(X), 3, 1, 1),
        _im2col(np.asarray(jax.nn.relu(s1)), 3, 2, 0),
        np.asarray(s2).reshape(X.shape[0], -1),
    ]
    expected_grads = [
        np.moveaxis(np.asarray(g), 1, -2).reshape(X.shape[0], -1, g.shape[1], 4) for g in (g1, g2)
    ] + [np.asarray(g3)]
    assert [t.name for t in taps] == ["conv2d_0", "conv2d_1", "dense_2"]
    assert [t.channels_first for t in taps] == [True, True, False]
    for tap, a, g in zip(taps, expected_inputs, expected_grads, strict=True):
        np.testing.assert_allclose(np.asarray(tap.inputs), a, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(np.asarray(tap.output_grads), g, rtol=1e-12, atol=1e-13)


def test_flax_conv_taps_are_patches_in_kernel_order():
    pytest.importorskip("flax")
    _, _, data, model, params, model_data, _ = setup("cnn", "flax")
    X = model_data[0][0]
    U = jnp.asarray(np.random.default_rng(4).standard_normal((X.shape[0], 3, 2)))
    taps = model.linearize(params, X).layer_taps(U)
    # patches of the NCHW images, reordered from (C, kh, kw) to (kh, kw, C)
    patches = _im2col(data[0][0], 3, 1, 1).reshape(X.shape[0], 36, 2, 3, 3)
    expected = np.transpose(patches, (0, 1, 3, 4, 2)).reshape(X.shape[0], 36, 18)
    np.testing.assert_allclose(np.asarray(taps[0].inputs), expected, rtol=1e-13, atol=1e-13)
    assert (taps[0].transposed, taps[0].channels_first) == (True, False)
    assert taps[0].matrix_shape == (3, 18)
    # output gradients of the first conv: vjp of the rest of the network, channels last
    linen = pytest.importorskip("flax.linen")
    tree = model.unflatten(params)

    def rest(s1):
        h = linen.Conv(2, (3, 3), strides=2, padding="VALID").apply(
            {"params": tree["Conv_1"]}, jax.nn.relu(s1)
        )
        return linen.Dense(3).apply({"params": tree["Dense_0"]}, h.reshape(h.shape[0], -1))

    s1 = linen.Conv(3, (3, 3), padding=1).apply({"params": tree["Conv_0"]}, X)
    g1 = np.asarray(_column_vjp(rest, s1, U)).reshape(X.shape[0], 36, 3, 2)
    np.testing.assert_allclose(np.asarray(taps[0].output_grads), g1, rtol=1e-12, atol=1e-13)


def test_plain_mlp_taps_against_vjp_eager_and_compiled():
    _, _, _, model, params, model_data, _ = setup("mlp", "plain")
    X = model_data[0][0]
    U = jnp.asarray(np.random.default_rng(5).standard_normal((X.shape[0], 3, 3)))
    eager = JaxModel(_plain_mlp, params, jit=False, layer_taps=True)
    p = params
    h1 = jnp.tanh(X @ p[0].T + p[1])
    s2 = h1 @ p[2] + p[3]
    h2 = jnp.tanh(s2)

    def from_s1(s1):
        return dense(jnp.tanh(jnp.tanh(s1) @ p[2] + p[3]), p[4], p[5])

    expected = [
        (X, _column_vjp(from_s1, X @ p[0].T + p[1], U)),
        (h1, _column_vjp(lambda s: dense(jnp.tanh(s), p[4], p[5]), s2, U)),
        (h2, U),
    ]
    for m in (model, eager):
        taps = m.linearize(params, X).layer_taps(U)
        assert [(t.name, t.weight_index, t.bias_index, t.transposed) for t in taps] == [
            ("dense_0", 0, 1, False),
            ("dense_1", 2, 3, True),
            ("head", 4, 5, False),
        ]
        assert [t.matrix_shape for t in taps] == [(6, 5), (4, 6), (3, 4)]
        for tap, (a, g) in zip(taps, expected, strict=True):
            np.testing.assert_allclose(np.asarray(tap.inputs), np.asarray(a), rtol=1e-13)
            np.testing.assert_allclose(
                np.asarray(tap.output_grads), np.asarray(g), rtol=1e-12, atol=1e-14
            )


# -- embeddings: exact diagonal of the GGN from the taps ------------------------------------


def _embedding_problem():
    rng = np.random.default_rng(7)
    table = jnp.asarray(rng.standard_normal((6, 4)))
    w = jnp.asarray(rng.standard_normal((3, 4)))
    ids = jnp.asarray(rng.integers(0, 6, (5, 2)))
    y = jnp.asarray(rng.integers(0, 3, (5, 2)))
    return table, w, ids, y


def _embedding_net(p, ids):
    return dense(jnp.tanh(embed(ids, p["table"])), p["w"])  # (N, 2, 3): a shared axis


def test_embed_taps_and_ggn_diagonal_against_the_exact_ggn():
    table, w, ids, y = _embedding_problem()
    model = JaxModel(_embedding_net, {"table": table, "w": w}, layer_taps=True)
    params = model.params
    U = jnp.asarray(np.random.default_rng(8).standard_normal((5, 2, 3, 2)))
    taps = model.linearize(params, ids).layer_taps(U)
    np.testing.assert_array_equal(np.asarray(taps[0].inputs), np.asarray(ids))
    assert (taps[0].kind, taps[0].matrix_shape, taps[0].weight_index) == ("embedding", (4, 6), 0)
    s = jnp.take(table, ids, axis=0)
    g = _column_vjp(lambda e: dense(jnp.tanh(e), w), s, U)
    np.testing.assert_allclose(np.asarray(taps[0].output_grads), np.asarray(g), rtol=1e-12)
    loss, data = cl.CrossEntropyLoss(), [(ids, y)]
    diagonal = cl.GGNDiagonalLinearOperator(model, loss, params, data).diagonal()
    exact = np.diag(cl.to_numpy(cl.GGNLinearOperator(model, loss, params, data).to_dense()))
    np.testing.assert_allclose(cl.to_numpy(diagonal), exact, rtol=1e-10, atol=1e-14)


def test_flax_and_equinox_embeddings_give_the_exact_ggn_diagonal():
    linen = pytest.importorskip("flax.linen")
    eqx = pytest.importorskip("equinox")
    table, w, ids, y = _embedding_problem()

    class Net(linen.Module):
        @linen.compact
        def __call__(self, ids):
            return linen.Dense(3, use_bias=False)(jnp.tanh(linen.Embed(6, 4)(ids)))

    flax_model = JaxModel.from_flax(
        Net(), {"params": {"Embed_0": {"embedding": table}, "Dense_0": {"kernel": w.T}}}
    )
    keys = jax.random.split(jax.random.key(0))
    per_token = eqx.nn.Sequential(
        [
            eqx.nn.Embedding(6, 4, key=keys[0]),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Linear(4, 3, use_bias=False, key=keys[1]),
        ]
    )
    per_token = eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[2].weight), per_token, (table, w)
    )
    eqx_model = JaxModel.from_equinox(per_token)
    loss = cl.CrossEntropyLoss()
    flat_ids, flat_y = ids[:, 0], y[:, 0]  # equinox's Embedding takes one index per datum
    for model, data in ((flax_model, [(ids, y)]), (eqx_model, [(flat_ids, flat_y)])):
        params = model.params
        diagonal = cl.GGNDiagonalLinearOperator(model, loss, params, data).diagonal()
        exact = cl.GGNLinearOperator(model, loss, params, data).to_dense()
        np.testing.assert_allclose(
            cl.to_numpy(diagonal), np.diag(cl.to_numpy(exact)), rtol=1e-10, atol=1e-14
        )


# -- outside a tap pass the marks are plain functions ---------------------------------------


def test_marks_are_plain_functions_under_jit_vmap_and_grad():
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((2, 3, 5, 5)))
    W = jnp.asarray(rng.standard_normal((4, 3, 3, 3)))
    b = jnp.asarray(rng.standard_normal(4))
    nchw = np.asarray(jax.jit(lambda x: conv2d(x, W, b, padding=1))(x))
    native = nn.Conv2d(3, 4, 3, padding=1)([np.asarray(W), np.asarray(b)], np.asarray(x))
    np.testing.assert_allclose(nchw, native, rtol=1e-12)
    nhwc = conv2d(
        jnp.transpose(x, (0, 2, 3, 1)),
        jnp.asarray(_hwio(np.asarray(W))),
        b,
        padding=1,
        layout="NHWC",
    )
    np.testing.assert_allclose(np.transpose(np.asarray(nhwc), (0, 3, 1, 2)), native, rtol=1e-12)
    A = jnp.asarray(rng.standard_normal((3, 4)))
    v = jnp.asarray(rng.standard_normal((6, 4)))
    per_row = jax.vmap(lambda r: dense(r, A))(v)
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(v @ A.T), rtol=1e-13)
    grad = jax.grad(lambda A: jnp.sum(dense(v, A, transposed=True) ** 2))(A.T)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(2 * v.T @ (v @ A.T)), rtol=1e-12)
    table = jnp.arange(12.0).reshape(6, 2)
    np.testing.assert_array_equal(np.asarray(embed(jnp.asarray([5, 0]), table)), [[10, 11], [0, 1]])


# -- errors ------------------------------------------------------------------------------


def _problem_params():
    rng = np.random.default_rng(11)
    return [jnp.asarray(rng.standard_normal((4, 4))), jnp.asarray(rng.standard_normal((3, 4)))]


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, x: dense(dense(x, p[0].T), p[1]),  # a transformed copy
        lambda p, x: dense(dense(x, jnp.ones((4, 4))), p[1]),  # a constant
    ],
    ids=["transposed-copy", "constant"],
)
def test_a_marked_weight_that_is_no_parameter_is_refused(fn):
    model = JaxModel(fn, _problem_params(), layer_taps=True)
    lin = model.linearize(model.params, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="'dense_0' .* is not one of the model's parameters"):
        lin.layer_taps(jnp.ones((2, 3, 1)))


def test_a_layer_called_twice_is_refused():
    def twice(p, x):
        return dense(jnp.tanh(dense(jnp.tanh(dense(x, p[0])), p[0])), p[1])

    model = JaxModel(twice, _problem_params(), layer_taps=True)
    lin = model.linearize(model.params, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="used by the marked layers 'dense_0' and 'dense_1'"):
        lin.layer_taps(jnp.ones((2, 3, 1)))
    # the operators say so too
    with pytest.raises(ValueError, match="called twice"):
        KFACLinearOperator(
            model, cl.MSELoss(), model.params, [(jnp.ones((2, 4)), jnp.ones((2, 3)))]
        )


def test_a_flax_layer_called_twice_is_refused():
    linen = pytest.importorskip("flax.linen")

    class Shared(linen.Module):
        @linen.compact
        def __call__(self, x):
            layer = linen.Dense(4)
            return layer(jnp.tanh(layer(x)))

    variables = Shared().init(jax.random.key(0), jnp.ones((1, 4)))
    model = JaxModel.from_flax(Shared(), variables)
    with pytest.raises(ValueError, match="used by the marked layers 'Dense_0' and 'Dense_0'"):
        model.linearize(model.params, jnp.ones((2, 4), jnp.float32)).layer_taps(None)


def test_taps_without_marked_layers():
    def unmarked(p, x):
        return jnp.tanh(x @ p[0].T) @ p[1].T

    data = [(jnp.ones((2, 4)), jnp.ones((2, 3)))]
    plain = JaxModel(unmarked, _problem_params())
    assert not plain.has_tier(cl.Tier.LAYER_TAPS)
    with pytest.raises(cl.MissingTierError, match="tier 3.*layer_taps=True"):
        KFACLinearOperator(plain, cl.MSELoss(), plain.params, data)
    flagged = JaxModel(unmarked, _problem_params(), layer_taps=True)
    assert flagged.has_tier(cl.Tier.LAYER_TAPS)
    with pytest.raises(cl.MissingTierError, match="found no marked layer.*conv2d or embed"):
        flagged.linearize(flagged.params, data[0][0]).layer_taps(jnp.ones((2, 3, 1)))
    with pytest.raises(cl.MissingTierError, match="found no marked layer"):
        KFACLinearOperator(flagged, cl.MSELoss(), flagged.params, data)


def test_unsupported_convolutions_are_refused_with_the_reason():
    linen = pytest.importorskip("flax.linen")
    with pytest.raises(ValueError, match="layout 'NCHW' or 'NHWC'"):
        conv2d(jnp.ones((1, 2, 4, 4)), jnp.ones((2, 2, 3, 3)), layout="CHWN")
    with pytest.raises(ValueError, match="circular, causal or reflecting"):
        conv2d(jnp.ones((1, 2, 4, 4)), jnp.ones((2, 2, 3, 3)), padding="circular")
    circular = linen.Conv(4, (3, 3), padding="CIRCULAR", feature_group_count=2)
    variables = circular.init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))
    model = JaxModel.from_flax(circular, variables)
    with pytest.raises(ValueError, match="got 'CIRCULAR' \\(circular, causal or reflecting"):
        # Flax's parameters are float32 (its default) whatever x64 says: inputs too
        model.linearize(model.params, jnp.ones((2, 5, 5, 2), jnp.float32)).layer_taps(None)
    with pytest.raises(ValueError, match=r"groups=2 needs C_in = weight.shape\[1\] \* groups"):
        conv2d(jnp.ones((1, 3, 4, 4)), jnp.ones((2, 2, 3, 3)), groups=2)  # C_in 3, not 2 * 2
    with pytest.raises(ValueError, match="groups must be a positive integer"):
        conv2d(jnp.ones((1, 2, 4, 4)), jnp.ones((2, 2, 3, 3)), groups=0)
    eqx = pytest.importorskip("equinox")
    reflect = eqx.nn.Conv2d(2, 2, 3, padding=1, padding_mode="REFLECT", key=jax.random.key(0))
    model = JaxModel.from_equinox(reflect)
    X = jnp.ones((2, 2, 5, 5), model.params[0].dtype)
    with pytest.raises(ValueError, match="padding_mode='REFLECT'; layer taps cover.*'ZEROS'"):
        model.linearize(model.params, X).layer_taps(None)


# -- grouped and depthwise convolutions ----------------------------------------------------


def _grouped_native():
    """A grouped convolution (2 groups), a strided depthwise one (6 groups), a Linear."""
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24, 3),
    )


def _grouped_flax(w):
    linen = pytest.importorskip("flax.linen")

    class Net(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = jnp.tanh(linen.Conv(6, (3, 3), padding=1, feature_group_count=2)(x))
            x = linen.Conv(6, (3, 3), strides=2, padding=1, feature_group_count=6)(x)
            return linen.Dense(3)(linen.relu(x).reshape(x.shape[0], -1))

    kernels = [_hwio(w[0]), _hwio(w[2]), _nhwc_dense(w[4], 6, 2, 2)]
    params = {
        name: {"kernel": jnp.asarray(k), "bias": jnp.asarray(b)}
        for name, k, b in zip(["Conv_0", "Conv_1", "Dense_0"], kernels, w[1::2], strict=True)
    }
    return JaxModel.from_flax(Net(), {"params": params}), _to_nhwc


def _grouped_equinox(w):
    eqx = pytest.importorskip("equinox")
    keys = jax.random.split(jax.random.key(0), 3)
    net = eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(4, 6, 3, padding=1, groups=2, key=keys[0]),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, key=keys[1]),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Lambda(jnp.ravel),
            eqx.nn.Linear(24, 3, key=keys[2]),
        ]
    )
    biases = [w[1][:, None, None], w[3][:, None, None], w[5]]  # eqx conv bias (C, 1, 1)
    for i, weight, bias in zip([0, 2, 5], w[0::2], biases, strict=True):
        net = eqx.tree_at(
            lambda m, i=i: (m.layers[i].weight, m.layers[i].bias),
            net,
            (jnp.asarray(weight), jnp.asarray(bias)),
        )
    return JaxModel.from_equinox(net), None


GROUPED_BUILDERS = {"flax": _grouped_flax, "equinox": _grouped_equinox}
GROUPED_OPERATORS = ["kfac-expand", "kfac-reduce", "ekfac", "ggn-diagonal"]
_GROUPED = {}


def grouped_setup(framework):
    """(native, params, data, model, model params, model data, P) of the grouped CNN."""
    if "native" not in _GROUPED:
        native = _grouped_native()
        params = native.init(0, xp=npx, dtype=npx.float64)
        rng = np.random.default_rng(1)
        # two batches of one size: one compilation per JAX function
        data = [(rng.standard_normal((3, 4, 4, 4)), rng.integers(0, 3, 3)) for _ in range(2)]
        _GROUPED["native"] = native, params, data
    native, params, data = _GROUPED["native"]
    if framework not in _GROUPED:
        model, convert = GROUPED_BUILDERS[framework](params)
        convert = convert or (lambda X: X)
        model_data = [(jnp.asarray(convert(X)), jnp.asarray(y)) for X, y in data]
        P = permutation(params, model.params)
        _GROUPED[framework] = model, model.params, model_data, P
    return (native, params, data, *_GROUPED[framework])


@pytest.mark.parametrize("name", GROUPED_OPERATORS)
@pytest.mark.parametrize("framework", list(GROUPED_BUILDERS))
def test_grouped_cnn_operators_equal_the_native_ones_permuted(framework, name):
    """Flax's transposed grouped kernels (a group's entries strided in the flat vector)
    and Equinox's grouped weights give the native grouped operators, permuted."""
    native, w, data, model, params, model_data, P = grouped_setup(framework)
    key = ("grouped", name)
    if key not in _REFERENCES:
        op = OPERATORS[name](native, cl.CrossEntropyLoss(), w, data)
        _REFERENCES[key] = _dense(op)
    ours = OPERATORS[name](model, cl.CrossEntropyLoss(), params, model_data)
    np.testing.assert_allclose(_dense(ours), _REFERENCES[key][np.ix_(P, P)], rtol=RTOL, atol=ATOL)
    if name == "kfac-expand":  # the taps' groups, and a Kronecker block per group
        assert [layer.groups for layer in ours.layers] == [2, 6, 1]
        assert ours.input_factors[ours.layers[1].name].shape == (6, 9, 9)  # a 3 x 3 patch


def test_expand_is_the_exact_ggn_of_a_flax_depthwise_convolution():
    """Conv -> flatten with squared error: every output pixel enters the loss on its own,
    so K-FAC "expand" and EKFAC with joint weight and bias blocks (``[W_g^T; b_g^T]`` of
    strided kernel columns) are the exact GGN, here from JAX autodiff (no taps). The
    taps' weight gradients equal the vjp's (curvlinops.verify), the kernel's transposed."""
    linen = pytest.importorskip("flax.linen")
    from curvlinops.verify import check_layer_taps

    conv = linen.Conv(6, (2, 3), strides=(1, 2), padding=1, feature_group_count=3)
    net = linen.Sequential([conv, lambda x: x.reshape(x.shape[0], -1)])
    variables = net.init(jax.random.key(1), jnp.ones((1, 4, 5, 3), jnp.float64))
    model = JaxModel.from_flax(net, jax.tree_util.tree_map(jnp.float64, variables))
    params = model.params
    rng = np.random.default_rng(4)
    X = jnp.asarray(rng.standard_normal((4, 4, 5, 3)))
    Y = jnp.asarray(rng.standard_normal(model(params, X).shape))
    data = [(X[:2], Y[:2]), (X[2:], Y[2:])]  # one size: one compilation
    ggn = cl.to_numpy(cl.GGNLinearOperator(model, cl.MSELoss(), params, data).to_dense())
    for operator in (KFACLinearOperator, EKFACLinearOperator):
        approx = operator(
            model, cl.MSELoss(), params, data, kfac_approx="expand", separate_weight_and_bias=False
        )
        np.testing.assert_allclose(cl.to_numpy(approx.to_dense()), ggn, rtol=RTOL, atol=ATOL)
    assert approx.layers[0].groups == 3
    assert check_layer_taps(model, params, data[0][0]).passed


def test_marked_grouped_convolutions_give_the_weight_gradients_of_vjp():
    """conv2d(groups=2) in both layouts: the taps' implied weight and bias gradients
    against jax.vjp (curvlinops.verify.check_layer_taps), and the forward pass against
    jax.lax with each group convolved on its own."""
    from curvlinops.verify import check_layer_taps

    rng = np.random.default_rng(3)
    shapes = [(4, 2, 2, 3), (4,), (3, 3, 2, 6), (6,)]
    params = [jnp.asarray(rng.standard_normal(shape)) for shape in shapes]

    def fn(p, x):
        h = jnp.tanh(conv2d(x, p[0], p[1], padding=1, stride=(2, 1), groups=2))
        h = conv2d(
            jnp.transpose(h, (0, 2, 3, 1)), p[2], p[3], padding="SAME", groups=2, layout="NHWC"
        )
        return h.reshape(x.shape[0], -1)

    model = JaxModel(fn, params, layer_taps=True)
    X = jnp.asarray(rng.standard_normal((3, 4, 3, 4)))
    taps = model.linearize(params, X).layer_taps()
    assert [(t.groups, t.transposed, t.matrix_shape) for t in taps] == [
        (2, False, (4, 12)),
        (2, True, (6, 18)),
    ]
    assert check_layer_taps(model, params, X).passed
    # group 1 of the first layer: its input channels 2, 3 and its filters 2, 3 alone
    alone = jax.lax.conv_general_dilated(X[:, 2:], params[0][2:], (2, 1), ((1, 1), (1, 1)))
    np.testing.assert_allclose(
        np.asarray(conv2d(X, params[0], padding=1, stride=(2, 1), groups=2)[:, 2:]),
        np.asarray(alone),
        rtol=1e-13,
        atol=1e-13,
    )


# -- layer normalization: an elementwise tap ----------------------------------------------


def test_layer_norm_marks_give_the_native_exact_blocks():
    """``layer_norm`` (plain JAX) against ``curvlinops.nn.LayerNorm`` on copied weights."""
    import array_api_compat.numpy as npx

    from curvlinops.frontends.jax import layer_norm

    native = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2))
    rng = np.random.default_rng(0)
    w = [p + 0.3 * rng.standard_normal(p.shape) for p in native.init(0, xp=npx, dtype=npx.float64)]

    def f(p, x):
        return dense(layer_norm(jnp.tanh(dense(x, p[0], p[1])), p[2], p[3]), p[4], p[5])

    model = JaxModel(f, [jnp.asarray(p) for p in w], layer_taps=True)
    X, y = rng.standard_normal((6, 5, 3)), rng.integers(0, 2, (6, 5))
    loss = cl.CrossEntropyLoss()
    taps = model.linearize(model.params, jnp.asarray(X)).layer_taps()
    assert [t.kind for t in taps] == ["matrix", "elementwise", "matrix"]
    for separate in (True, False):
        ours = cl.KFACLinearOperator(
            model, loss, model.params, [(jnp.asarray(X), jnp.asarray(y))],
            separate_weight_and_bias=separate,
        )  # fmt: skip
        reference = cl.KFACLinearOperator(
            native, loss, w, [(X, y)], separate_weight_and_bias=separate
        )
        np.testing.assert_allclose(
            np.asarray(ours.to_dense()), reference.to_dense(), rtol=1e-10, atol=1e-13
        )
    D = cl.GGNDiagonalLinearOperator(model, loss, model.params, [(jnp.asarray(X), jnp.asarray(y))])
    exact = np.diag(cl.GGNLinearOperator(native, loss, w, [(X, y)]).to_dense())
    np.testing.assert_allclose(np.asarray(D.diagonal()), exact, rtol=1e-10, atol=1e-14)
