"""Pooling, batch normalization and dropout (curvlinops.nn) against PyTorch in float64.

Forward passes against the torch modules (``AvgPool2d``, ``MaxPool2d``,
``AdaptiveAvgPool2d(1)``, ``BatchNorm1d``/``2d`` in evaluation mode with random running
statistics and affine parameters, ``Dropout`` in evaluation mode); the JVP, VJP and
second-order product (cross terms included: every layer sits after a Linear or a
convolution) of small networks against ``torch.func`` with K vectors at once; the
per-datum curvature rule against ``J^T H J`` from dense per-datum Jacobians
(``torch.func.jacrev``); the batch-averaged rules against the sum over items of the
diagonal blocks of ``J^T H J`` where they are exact (every output item carrying the
same block); the elementwise tap of batch normalization against per-sample gradients
from ``torch.func.vmap(grad)``; GGN and Hessian operators of a native CNN against
dense torch references; float32 runs; argument and shape errors.
"""

from __future__ import annotations

import functools
import math

import array_api_compat.numpy as npx
import numpy as np
import pytest
from nn_reference import HAS_TORCH, flat_k, ours_on_backend, random_problem

from curvlinops import GGNLinearOperator, HessianLinearOperator, MSELoss, nn
from curvlinops.models import MissingLayerRuleError

torch = pytest.importorskip("torch") if HAS_TORCH else None
pytestmark = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")

K = 3


def assert_close(actual, expected, rtol=1e-10):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def tt(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# -- building a native network and its torch twin from specs -----------------------------


def _stats(C, seed):
    rng = np.random.default_rng(100 + seed + C)
    return rng.standard_normal(C), rng.uniform(0.5, 2.0, C)


def _pair(spec, seed):
    """One native layer and its torch twin (float64, evaluation mode)."""
    kind, *args = spec
    f64 = dict(dtype=torch.float64)
    if kind == "conv2d":
        cin, cout, kw = args
        return nn.Conv2d(cin, cout, **kw), torch.nn.Conv2d(cin, cout, **kw, **f64)
    if kind == "conv1d":
        cin, cout, kw = args
        return nn.Conv1d(cin, cout, **kw), torch.nn.Conv1d(cin, cout, **kw, **f64)
    if kind == "linear":
        cin, cout = args
        return nn.Linear(cin, cout), torch.nn.Linear(cin, cout, **f64)
    if kind == "avg2d":
        return nn.AvgPool2d(**args[0]), torch.nn.AvgPool2d(**args[0])
    if kind == "avg1d":
        return nn.AvgPool1d(**args[0]), torch.nn.AvgPool1d(**args[0])
    if kind == "max2d":
        return nn.MaxPool2d(**args[0]), torch.nn.MaxPool2d(**args[0])
    if kind == "max1d":
        return nn.MaxPool1d(**args[0]), torch.nn.MaxPool1d(**args[0])
    if kind == "gap":
        (keepdim,) = args
        theirs = torch.nn.AdaptiveAvgPool2d(1)
        if not keepdim:
            theirs = torch.nn.Sequential(theirs, torch.nn.Flatten())
        return nn.GlobalAvgPool2d(keepdim=keepdim), theirs
    if kind in ("bn1d", "bn2d"):
        C, affine = args
        mean, var = _stats(C, seed)
        ours_cls, torch_cls = {
            "bn1d": (nn.BatchNorm1d, torch.nn.BatchNorm1d),
            "bn2d": (nn.BatchNorm2d, torch.nn.BatchNorm2d),
        }[kind]
        ours = ours_cls(C, running_mean=mean, running_var=var, eps=1e-3, affine=affine)
        theirs = torch_cls(C, eps=1e-3, affine=affine, **f64)
        with torch.no_grad():
            theirs.running_mean.copy_(tt(mean))
            theirs.running_var.copy_(tt(var))
        return ours, theirs.eval()
    if kind == "dropout":
        return nn.Dropout(args[0]), torch.nn.Dropout(args[0]).eval()
    if kind == "tanh":
        return nn.Tanh(), torch.nn.Tanh()
    if kind == "relu":
        return nn.ReLU(), torch.nn.ReLU()
    if kind == "flatten":
        return nn.Flatten(), torch.nn.Flatten()
    raise ValueError(kind)


def build(specs, x_shape, seed=0):
    """``(ours, theirs)``; ``("linear", None, out)`` takes its input size from the shapes."""
    ours, theirs = [], []
    a = np.zeros(x_shape)
    for spec in specs:
        if spec[0] == "linear" and spec[1] is None:
            spec = ("linear", a.shape[-1], spec[2])
        mine, twin = _pair(spec, seed)
        a = mine(mine.init(0, xp=npx, dtype=npx.float64), a)
        ours.append(mine)
        theirs.append(twin)
    return nn.Sequential(*ours), torch.nn.Sequential(*theirs)


def torch_products(theirs, prob):
    """Outputs, J V, J^T U and ``sum u Hess v + J^T w`` from torch.func."""
    names = [name for name, _ in theirs.named_parameters()]
    params = tuple(tt(p) for p in prob["params"])
    x = tt(prob["x"])

    def f(*ps):
        return torch.func.functional_call(theirs, dict(zip(names, ps, strict=True)), (x,))

    outputs, vjp_fn = torch.func.vjp(f, *params)
    V = [tt(v) for v in prob["V"]]
    Kv = prob["V"][0].shape[-1]
    JV = torch.stack(
        [torch.func.jvp(f, params, tuple(v[..., k] for v in V))[1] for k in range(Kv)], dim=-1
    )
    U = tt(prob["U"])
    JtU = [
        torch.stack(g, dim=-1) for g in zip(*[vjp_fn(U[..., k]) for k in range(Kv)], strict=True)
    ]
    u, w = tt(prob["u"]), tt(prob["w"])

    def weighted_grad(*ps):
        return torch.func.grad(lambda *q: torch.sum(u * f(*q)), argnums=tuple(range(len(ps))))(*ps)

    columns = []
    for k in range(Kv):
        _, hv = torch.func.jvp(weighted_grad, params, tuple(v[..., k] for v in V))
        jtw = vjp_fn(w[..., k])
        columns.append(torch.cat([(a + b).reshape(-1) for a, b in zip(hv, jtw, strict=True)]))
    return {
        "outputs": outputs.detach().numpy(),
        "JV": JV.detach().numpy(),
        "JtU": flat_k([g.detach().numpy() for g in JtU]),
        "second": torch.stack(columns, dim=-1).detach().numpy(),
    }


class _NumpyBackend:
    @staticmethod
    def asarray(a, dtype):
        return np.asarray(a, dtype=dtype)

    @staticmethod
    def to_numpy(a):
        return np.asarray(a)


CONV = ("conv2d", 2, 3, dict(kernel_size=3, padding=1))
CONV1 = ("conv1d", 2, 3, dict(kernel_size=3, padding=1))
HEAD = [("tanh",), ("flatten",), ("linear", None, 3)]
X2, X1 = (2, 2, 6, 5), (2, 2, 9)

# name -> (specs, input shape); every layer under test sits after one with parameters
NETWORKS = {
    "avg": ([CONV, ("avg2d", dict(kernel_size=2))] + HEAD, X2),
    "avg_overlap_pad": ([CONV, ("avg2d", dict(kernel_size=3, stride=2, padding=1))] + HEAD, X2),
    "avg_asymmetric": (
        [CONV, ("avg2d", dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)))] + HEAD,
        X2,
    ),
    "avg1d": ([CONV1, ("avg1d", dict(kernel_size=3, stride=2, padding=1))] + HEAD, X1),
    "max": ([CONV, ("max2d", dict(kernel_size=2))] + HEAD, X2),
    "max_overlap_pad": ([CONV, ("max2d", dict(kernel_size=3, stride=2, padding=1))] + HEAD, X2),
    "max_dilation": (
        [CONV, ("max2d", dict(kernel_size=(2, 3), stride=1, padding=(1, 1), dilation=(2, 1)))]
        + HEAD,
        X2,
    ),
    "max1d": ([CONV1, ("max1d", dict(kernel_size=3, stride=2, padding=1, dilation=2))] + HEAD, X1),
    "gap": ([CONV, ("tanh",), ("gap", False), ("linear", None, 3)], X2),
    "gap_keepdim": ([CONV, ("gap", True)] + HEAD, X2),
    "bn2d": ([CONV, ("bn2d", 3, True)] + HEAD, X2),
    "bn2d_no_affine": ([CONV, ("bn2d", 3, False)] + HEAD, X2),
    "bn2d_first": ([("bn2d", 2, True), CONV] + HEAD, X2),
    "bn1d": ([("linear", 4, 5), ("bn1d", 5, True), ("tanh",), ("linear", 5, 3)], (4, 4)),
    "bn1d_no_affine": ([("linear", 4, 5), ("bn1d", 5, False), ("tanh",), ("linear", 5, 3)], (4, 4)),
    "bn1d_sequence": ([CONV1, ("bn1d", 3, True)] + HEAD, X1),
    "dropout": ([("linear", 4, 5), ("dropout", 0.3), ("tanh",), ("linear", 5, 3)], (4, 4)),
}


@functools.cache
def network(name):
    specs, x_shape = NETWORKS[name]
    ours, theirs = build(specs, x_shape, seed=len(name))
    prob = random_problem(ours, x_shape, K, seed=len(name))
    return ours, theirs, prob


# -- forward ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "x_shape"),
    [
        (("avg2d", dict(kernel_size=2)), (2, 3, 6, 5)),
        (("avg2d", dict(kernel_size=3, stride=2, padding=1)), (2, 3, 7, 6)),
        (("avg2d", dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1))), (2, 3, 5, 6)),
        (("avg1d", dict(kernel_size=3, stride=2, padding=1)), (2, 3, 8)),
        (("max2d", dict(kernel_size=2)), (2, 3, 6, 5)),
        (("max2d", dict(kernel_size=3, stride=2, padding=1)), (2, 3, 7, 6)),
        (
            ("max2d", dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), dilation=2)),
            (2, 3, 8, 7),
        ),
        (("max1d", dict(kernel_size=2, stride=1, padding=1)), (2, 3, 6)),
        (("gap", False), (2, 3, 5, 4)),
        (("gap", True), (2, 3, 5, 4)),
        (("bn2d", 3, True), (2, 3, 5, 4)),
        (("bn2d", 3, False), (2, 3, 5, 4)),
        (("bn1d", 3, True), (4, 3)),
        (("bn1d", 3, True), (4, 3, 5)),
        (("dropout", 0.5), (4, 3)),
    ],
)
def test_forward_matches_torch(spec, x_shape):
    ours, theirs = _pair(spec, seed=1)
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s) for s in ours.expected_param_shapes()]
    if params:
        with torch.no_grad():
            theirs.weight.copy_(tt(params[0]))
            theirs.bias.copy_(tt(params[1]))
    x = rng.standard_normal(x_shape)
    expected = theirs(tt(x)).detach().numpy()
    assert_close(ours(params, x), expected)


def test_batchnorm_init_and_statistics_conversion():
    layer = nn.BatchNorm2d(3, running_mean=torch.arange(3.0), running_var=np.ones(3) * 4.0)
    weight, bias = layer.init(0, xp=npx, dtype=npx.float32)
    assert (
        weight.dtype == np.float32 and weight.tolist() == [1.0] * 3 and bias.tolist() == [0.0] * 3
    )
    assert layer.running_mean == (0.0, 1.0, 2.0) and layer.running_var == (4.0,) * 3
    x = np.ones((1, 3, 2, 2))
    y64 = layer([weight.astype(np.float64), bias.astype(np.float64)], x)
    y32 = layer([weight, bias], x.astype(np.float32))
    assert y32.dtype == np.float32
    assert_close(y64[0, :, 0, 0], (1.0 - np.arange(3.0)) / np.sqrt(4.0 + 1e-5))
    # one converted copy per (namespace, device, dtype), reused by later calls
    assert len(layer._converted) == 2
    layer([weight, bias], x.astype(np.float32))
    assert len(layer._converted) == 2
    defaults = nn.BatchNorm1d(2, affine=False)
    assert defaults.running_mean == (0.0, 0.0) and defaults.running_var == (1.0, 1.0)
    assert defaults.expected_param_shapes() == [] and not defaults.has_tap


# -- derivative products ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NETWORKS))
def test_products_match_torch_func(name):
    ours, theirs, prob = network(name)
    mine = ours_on_backend(ours, prob, _NumpyBackend)
    reference = torch_products(theirs, prob)
    for key in ("outputs", "JV", "JtU", "second"):
        assert_close(mine[key], reference[key])
    # dot-product test <U, J V> = <J^T U, V>
    lhs = np.sum(np.reshape(prob["U"] * mine["JV"], (-1, K)), axis=0)
    rhs = np.einsum("pk,pk->k", mine["JtU"], flat_k(prob["V"]))
    assert_close(lhs, rhs)


@pytest.mark.parametrize("name", ["bn2d", "max_overlap_pad", "gap", "bn1d_sequence"])
def test_k_vectors_equal_k_separate_products(name):
    ours, _, prob = network(name)
    lin = ours.linearize(prob["params"], prob["x"])
    V, u, w = prob["V"], prob["u"], prob["w"]
    second = lin.second_order_vjp(u, V, w)
    jv = lin.jvp(V)
    for k in range(K):
        Vk = [v[..., k : k + 1] for v in V]
        assert_close(jv[..., k : k + 1], lin.jvp(Vk))
        for a, b in zip(second, lin.second_order_vjp(u, Vk, w[..., k : k + 1]), strict=True):
            assert_close(a[..., k : k + 1], b)


@pytest.mark.parametrize("name", ["avg_overlap_pad", "max_dilation", "gap_keepdim", "bn2d", "bn1d"])
def test_float32_runs(name):
    ours, _, prob = network(name)
    mine32 = ours_on_backend(ours, prob, _NumpyBackend, dtype="float32")
    mine64 = ours_on_backend(ours, prob, _NumpyBackend)
    for key in ("outputs", "JV", "JtU", "second"):
        assert mine32[key].dtype == np.float32
        assert_close(mine32[key], mine64[key], rtol=1e-4)


def _cnn(N=3):
    """Conv2d, BatchNorm2d, ReLU, MaxPool2d, Conv2d, GlobalAvgPool2d, Linear (and torch's)."""
    specs = [
        ("conv2d", 2, 4, dict(kernel_size=3, padding=1)),
        ("bn2d", 4, True),
        ("relu",),
        ("max2d", dict(kernel_size=2)),
        ("conv2d", 4, 3, dict(kernel_size=3, padding=1)),
        ("gap", False),
        ("linear", 3, 2),
    ]
    return build(specs, (N, 2, 6, 6), seed=3)


def test_products_on_every_backend(backend):
    """The same rules on NumPy, array-api-strict (only standard calls), PyTorch, JAX, CuPy."""
    ours, theirs = _cnn()
    prob = random_problem(ours, (3, 2, 6, 6), K, seed=11)
    mine = ours_on_backend(ours, prob, backend)
    reference = torch_products(theirs, prob)
    for key in ("outputs", "JV", "JtU", "second"):
        assert_close(mine[key], reference[key])


# -- the per-datum curvature rule -----------------------------------------------------------

# (spec, input shape) of single layers
SINGLE = {
    "avg": (("avg2d", dict(kernel_size=3, stride=2, padding=1)), (2, 2, 5, 4)),
    "avg1d": (("avg1d", dict(kernel_size=2, stride=1, padding=1)), (2, 2, 5)),
    "max": (("max2d", dict(kernel_size=2)), (2, 2, 4, 6)),
    "max_overlap": (("max2d", dict(kernel_size=3, stride=1, padding=1, dilation=1)), (2, 2, 4, 3)),
    "max1d": (("max1d", dict(kernel_size=3, stride=2, padding=1)), (2, 2, 7)),
    "gap": (("gap", False), (2, 3, 3, 4)),
    "gap_keepdim": (("gap", True), (2, 3, 3, 4)),
    "bn2d": (("bn2d", 3, True), (2, 3, 3, 2)),
    "bn2d_no_affine": (("bn2d", 3, False), (2, 3, 3, 2)),
    "bn1d": (("bn1d", 3, True), (4, 3)),
    "bn1d_sequence": (("bn1d", 3, True), (2, 3, 4)),
    "dropout": (("dropout", 0.2), (3, 4)),
}


def _single(name, seed=0):
    spec, x_shape = SINGLE[name]
    ours, theirs = _pair(spec, seed=5)
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s) for s in ours.expected_param_shapes()]
    if params:
        with torch.no_grad():
            theirs.weight.copy_(tt(params[0]))
            theirs.bias.copy_(tt(params[1]))
    return ours, theirs, params, rng.standard_normal(x_shape)


def _jacobians(theirs, x):
    """Per-datum Jacobians ``(N, F_out, F_in)`` of the torch module, by jacrev."""
    jacs = []
    for n in range(x.shape[0]):
        J = torch.func.jacrev(lambda z: theirs(z[None])[0])(tt(x[n]))
        F_out = math.prod(J.shape[: J.ndim - (x.ndim - 1)])
        jacs.append(J.reshape(F_out, -1).detach().numpy())
    return np.stack(jacs)


def _bound(ours, params, x):
    """The layer bound to a forward pass (the layer protocol's view)."""
    (layer,) = nn.Sequential(ours).linearize(params, x).layers()
    return layer


@pytest.mark.parametrize("name", list(SINGLE))
def test_per_datum_curvature_is_jt_h_j(name):
    ours, theirs, params, x = _single(name)
    J = _jacobians(theirs, x)
    rng = np.random.default_rng(1)
    A = rng.standard_normal((x.shape[0], J.shape[1], J.shape[1]))
    H = A + np.swapaxes(A, 1, 2)
    g = rng.standard_normal(ours(params, x).shape)
    result = _bound(ours, params, x).backward_curvature(H, g)
    assert_close(result, np.swapaxes(J, 1, 2) @ H @ J)


# -- the batch-averaged rules ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(SINGLE))
def test_averaged_rule_is_the_sum_of_diagonal_blocks_where_exact(name):
    """Every output item carries the same block ``B``, none between items: then exact.

    Direct: ``sum_n sum_q`` of the ``(C, C)`` diagonal blocks of ``J_n^T (B (x) I) J_n``
    over the input items ``q``; the rule maps ``H_out = (number of output items) B``.
    The statistics accumulate over two batches.
    """
    ours, theirs, params, x = _single(name)
    J = _jacobians(theirs, x)
    y = ours(params, x)
    C_out = y.shape[1]
    P_out = math.prod(y.shape[2:])  # output positions per datum (1 for (N, C) outputs)
    C_in = x.shape[1]
    Q = math.prod(x.shape[2:])
    rng = np.random.default_rng(2)
    A = rng.standard_normal((C_out, C_out))
    B = A + A.T
    H_datum = np.kron(B, np.eye(P_out))  # over a datum's outputs (c, p)
    direct = np.zeros((C_in, C_in))
    for Jn in J:
        blocks = (Jn.T @ H_datum @ Jn).reshape(C_in, Q, C_in, Q)
        direct += np.einsum("aqbq->ab", blocks)
    statistics = None
    for part in (x[:1], x[1:]):
        layer = _bound(ours, params, part)
        statistics = layer.curvature_statistics(np.zeros(ours(params, part).shape), statistics)
    items = x.shape[0] * P_out
    result = _bound(ours, params, x).backward_mean_curvature(items * B, statistics)
    assert_close(result, direct)


def test_maxpool_averaged_rule_is_the_agreement_of_the_maxima():
    """``P[c, c']``: the fraction of output items where two channels pick the same offset."""
    layer = nn.MaxPool2d(2)
    x = np.zeros((1, 2, 2, 4))
    x[0, 0, 0, 0], x[0, 0, 1, 3] = 1.0, 1.0  # channel 0 picks offsets 0 and 3
    x[0, 1, 0, 0], x[0, 1, 0, 3] = 1.0, 1.0  # channel 1 picks offsets 0 and 1
    bound = _bound(layer, [], x)
    statistics = bound.curvature_statistics(np.zeros((1, 2, 1, 2)), None)
    result = bound.backward_mean_curvature(np.ones((2, 2)), statistics)
    assert_close(result, [[1.0, 0.5], [0.5, 1.0]])


def test_avgpool_counts_equal_the_unfolded_ones_image():
    """``sum_o n_o`` from the shape equals average pooling an all-ones image times k."""
    layer = nn.AvgPool2d((3, 2), stride=(2, 1), padding=(1, 1))
    ones = np.ones((1, 1, 5, 4))
    pooled = torch.nn.functional.avg_pool2d(tt(ones), (3, 2), (2, 1), (1, 1)).numpy()
    valid, positions = layer._valid_counts((5, 4))
    assert positions == pooled.size
    assert valid == pytest.approx(float(np.sum(pooled)) * 6)


def test_averaged_rules_need_statistics():
    for layer, x in (
        (nn.AvgPool2d(2), np.ones((1, 1, 2, 2))),
        (nn.MaxPool2d(2), np.ones((1, 1, 2, 2))),
        (nn.GlobalAvgPool2d(), np.ones((1, 1, 2, 2))),
    ):
        # the message says what to pass
        what = "without statistics.*pass what curvature_statistics accumulated over the data"
        with pytest.raises(MissingLayerRuleError, match=what):
            _bound(layer, [], x).backward_mean_curvature(np.ones((1, 1)), None)


def test_layouts():
    assert nn.MaxPool2d(2).input_layout == nn.AvgPool1d(2).output_layout == "channels_first"
    assert nn.GlobalAvgPool2d().output_layout == "features_last"
    assert nn.GlobalAvgPool2d(keepdim=True).output_layout == "channels_first"
    assert nn.BatchNorm1d(2).input_layout == nn.BatchNorm2d(2).output_layout == "channels_first"
    assert nn.Dropout().input_layout is None and nn.Dropout().output_layout is None
    for layer in (nn.AvgPool2d(2), nn.MaxPool2d(2), nn.GlobalAvgPool2d(), nn.Dropout()):
        assert layer.r_backward_uses_input_tangent is False
    assert nn.BatchNorm2d(2).r_backward_uses_input_tangent
    assert not nn.BatchNorm2d(2, affine=False).r_backward_uses_input_tangent


# -- the elementwise tap ------------------------------------------------------------------------

TAP_NETWORKS = {
    "bn2d": ([CONV, ("bn2d", 3, True), ("tanh",), ("flatten",), ("linear", None, 2)], (3, 2, 4, 3)),
    "bn1d": ([("linear", 4, 3), ("bn1d", 3, True), ("tanh",), ("linear", 3, 2)], (5, 4)),
    "bn1d_sequence": ([CONV1, ("bn1d", 3, True)] + HEAD[:2] + [("linear", None, 2)], (3, 2, 5)),
}


@pytest.mark.parametrize("name", list(TAP_NETWORKS))
def test_elementwise_tap_gives_per_sample_gradients(name):
    specs, x_shape = TAP_NETWORKS[name]
    ours, theirs = build(specs, x_shape, seed=2)
    prob = random_problem(ours, x_shape, 2, seed=9)
    params, x = prob["params"], prob["x"]
    M = 2
    cotangents = prob["U"][..., :M]
    lin = ours.linearize(params, x)
    taps = lin.layer_taps(cotangents)
    (tap,) = [t for t in taps if t.kind == "elementwise"]
    assert tap.matrix_shape is None and (tap.weight_index, tap.bias_index) == (2, 3)

    # the normalized inputs, features last, from torch's preceding layer
    bn = theirs[1]
    with torch.no_grad():
        for p, value in zip(theirs.parameters(), params, strict=True):
            p.copy_(tt(value))
        before = theirs[0](tt(x))
        xhat = (before - bn.running_mean.reshape((1, -1) + (1,) * (before.ndim - 2))) / torch.sqrt(
            bn.running_var + bn.eps
        ).reshape((1, -1) + (1,) * (before.ndim - 2))
    expected_inputs = torch.movedim(xhat, 1, -1).numpy()
    assert_close(tap.inputs, expected_inputs)

    a, g = np.asarray(tap.inputs), np.asarray(tap.output_grads)  # (N, S.., C), (N, S.., C, M)
    N, C = x.shape[0], a.shape[-1]
    a, g = a.reshape(N, -1, C), g.reshape(N, -1, C, M)
    per_weight = np.einsum("nscm,nsc->ncm", g, a)
    per_bias = g.sum(axis=1)

    names = [n for n, _ in theirs.named_parameters()]
    tparams = {n: tt(p) for n, p in zip(names, params, strict=True)}

    def weighted(ps, xn, cn):
        out = torch.func.functional_call(theirs, ps, (xn[None],))[0]
        return torch.sum(out * cn)

    for m in range(M):
        grads = torch.func.vmap(torch.func.grad(weighted), in_dims=(None, 0, 0))(
            tparams, tt(x), tt(cotangents[..., m])
        )
        assert_close(per_weight[..., m], grads["1.weight"].numpy())
        assert_close(per_bias[..., m], grads["1.bias"].numpy())


def test_batchnorm_without_affine_has_no_tap():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, affine=False))
    lin = model.linearize(model.init(0, xp=npx, dtype=npx.float64), np.ones((2, 3)))
    assert [t.kind for t in lin.layer_taps(None)] == ["matrix"]


# -- curvature operators end to end -----------------------------------------------------------


def _dense_torch_curvature(theirs, params, data):
    """Hessian and GGN of the summed squared error, densely with torch.func."""
    names = [n for n, _ in theirs.named_parameters()]
    shapes = [tuple(p.shape) for p in params]
    sizes = [math.prod(s) for s in shapes]

    def unflat(theta):
        pieces = torch.split(theta, sizes)
        return {n: q.reshape(s) for n, q, s in zip(names, pieces, shapes, strict=True)}

    theta = torch.cat([tt(p).reshape(-1) for p in params])
    hessian = 0.0
    ggn = 0.0
    for X, y in data:
        X, y = tt(X), tt(y)

        def outputs(t, X=X):
            return torch.func.functional_call(theirs, unflat(t), (X,)).reshape(-1)

        def loss(t, X=X, y=y):
            return torch.sum((outputs(t, X) - y.reshape(-1)) ** 2)

        hessian = hessian + torch.func.hessian(loss)(theta)
        J = torch.func.jacrev(outputs)(theta)
        ggn = ggn + 2.0 * J.T @ J
    return hessian.detach().numpy(), ggn.detach().numpy()


def test_cnn_curvature_operators_match_torch():
    ours, theirs = _cnn()
    rng = np.random.default_rng(4)
    params = [0.8 * rng.standard_normal(s) for s in ours.expected_param_shapes()]
    data = [
        (rng.standard_normal((2, 2, 6, 6)), rng.standard_normal((2, 2))),
        (rng.standard_normal((3, 2, 6, 6)), rng.standard_normal((3, 2))),
    ]
    hessian, ggn = _dense_torch_curvature(theirs, params, data)
    loss = MSELoss(reduction="sum")
    assert_close(GGNLinearOperator(ours, loss, params, data).to_dense(), ggn)
    assert_close(HessianLinearOperator(ours, loss, params, data).to_dense(), hessian)
    # a real check: the Hessian has cross terms the GGN lacks
    assert np.max(np.abs(hessian - ggn)) > 1e-3 * np.max(np.abs(ggn))


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: nn.BatchNorm2d(0), "positive integer num_features"),
        (lambda: nn.BatchNorm2d(3, running_mean=[0.0, 1.0]), r"num_features=3 entries.*\(2,\)"),
        (lambda: nn.BatchNorm1d(2, running_var=np.ones((2, 1))), "num_features=2 entries"),
        (lambda: nn.BatchNorm1d(2, running_var=[1.0, -1.0]), "running_var \\+ eps > 0"),
        (lambda: nn.BatchNorm1d(2, running_mean=[1.0, float("nan")]), "NaN or Inf"),
        (lambda: nn.BatchNorm1d(2, running_mean=["a", "b"]), "got not a flat sequence of numbers"),
        (lambda: nn.BatchNorm1d(2, running_var=3.0), "got not a flat sequence of numbers"),
        (lambda: nn.BatchNorm1d(2, eps=-1.0), "eps >= 0"),
        (lambda: nn.Dropout(training=True), "random masks.*non-deterministic.*training=False"),
        (lambda: nn.Dropout(1.0), r"p in \[0, 1\)"),
        (lambda: nn.Dropout(-0.1), r"p in \[0, 1\)"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: nn.AvgPool2d(3, padding=2),
         "AvgPool2d needs padding at most half the kernel size (as in PyTorch), got padding=2 "
         "for kernel_size=3."),
        (lambda: nn.MaxPool2d(2, padding=(0, 2)),
         "MaxPool2d needs padding at most half the kernel size (as in PyTorch), got "
         "padding=(0, 2) for kernel_size=2."),
        (lambda: nn.AvgPool2d(2, ceil_mode=True),
         "AvgPool2d supports ceil_mode=False only (the output size rounds down, as PyTorch's "
         "default); drop ceil_mode=True or pad the inputs instead."),
        (lambda: nn.MaxPool1d(2, ceil_mode=True),
         "MaxPool1d supports ceil_mode=False only (the output size rounds down, as PyTorch's "
         "default); drop ceil_mode=True or pad the inputs instead."),
        (lambda: nn.AvgPool2d(2, count_include_pad=False),
         "AvgPool2d supports count_include_pad=True only (the divisor is always the kernel "
         "size, padded zeros included, as PyTorch's default)."),
        (lambda: nn.AvgPool1d(2, divisor_override=3),
         "AvgPool1d does not support divisor_override (got 3); the divisor is the kernel size."),
        (lambda: nn.MaxPool2d(2, return_indices=True),
         "MaxPool2d does not support return_indices=True (its output is the pooled array only)."),
        (lambda: nn.AvgPool2d(0),
         "AvgPool2d needs kernel_size as a positive integer or a tuple of 2 such integers, "
         "got 0."),
        (lambda: nn.MaxPool2d(2, stride=(1, 1, 1)),
         "MaxPool2d needs stride as a positive integer or a tuple of 2 such integers, got "
         "(1, 1, 1)."),
        (lambda: nn.MaxPool1d(2, padding=-1),
         "MaxPool1d needs padding as a non-negative integer or a tuple of 1 such integers, "
         "got -1."),
        (lambda: nn.MaxPool2d(2, dilation=0),
         "MaxPool2d needs dilation as a positive integer or a tuple of 2 such integers, got 0."),
    ],
)  # fmt: skip
def test_bad_pooling_arguments_raise_with_the_whole_message(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value) == message


def test_bad_pooling_inputs_and_missing_statistics_raise_with_the_whole_message():
    def raised(error, call):
        with pytest.raises(error) as err:
            call()
        return str(err.value)

    assert raised(ValueError, lambda: nn.AvgPool2d(2)([], np.ones((2, 3, 4)))) == (
        "AvgPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0)) expects channels-first "
        "inputs of shape (N, C, H, W), got shape (2, 3, 4)."
    )
    assert raised(ValueError, lambda: nn.MaxPool1d(2)([], np.ones((2, 3, 4, 4)))) == (
        "MaxPool1d(kernel_size=2, stride=2, padding=0, dilation=1) expects channels-first "
        "inputs of shape (N, C, L), got shape (2, 3, 4, 4)."
    )
    assert raised(ValueError, lambda: nn.MaxPool2d(3)([], np.ones((1, 1, 2, 5)))) == (
        "MaxPool2d(kernel_size=(3, 3), stride=(3, 3), padding=(0, 0), dilation=(1, 1)) gets "
        "inputs of spatial size (2, 5), smaller than its (dilated) kernel plus padding: the "
        "output would be empty."
    )
    assert raised(ValueError, lambda: nn.GlobalAvgPool2d()([], np.ones((2, 3)))) == (
        "GlobalAvgPool2d(keepdim=False) expects channels-first inputs of shape (N, C, H, W), "
        "got shape (2, 3)."
    )
    state = {"input": np.ones((1, 2, 4, 4)), "channels_first": True}
    for layer in (nn.AvgPool2d(2), nn.MaxPool2d(2), nn.GlobalAvgPool2d()):
        bound = layer.linearized([], dict(state), npx)
        assert raised(MissingLayerRuleError, lambda b=bound: b.backward_mean_curvature(
            np.eye(2), None)) == (
            f"layer {type(layer).__name__!r} is {layer!r}, which does not implement the "
            "batch-averaged curvature rule without statistics of the layer protocol (pass "
            "what curvature_statistics accumulated over the data)."
        )  # fmt: skip


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"channels-first inputs of shape \(N, C, H, W\)"):
        nn.AvgPool2d(2)([], np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"\(N, C, L\), got shape \(2, 3, 4, 4\)"):
        nn.MaxPool1d(2)([], np.ones((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="smaller than its"):
        nn.MaxPool2d(3)([], np.ones((1, 1, 2, 5)))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\), got shape \(2, 3\)"):
        nn.GlobalAvgPool2d()([], np.ones((2, 3)))
    bn = nn.BatchNorm2d(3)
    params = bn.init(0, xp=npx, dtype=npx.float64)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got shape \(2, 4, 2, 2\)"):
        bn(params, np.ones((2, 4, 2, 2)))
    with pytest.raises(ValueError, match=r"\(N, 3\) or \(N, 3, L\), got shape \(2, 3, 2, 2\)"):
        nn.BatchNorm1d(3)(params, np.ones((2, 3, 2, 2)))


def test_sequential_iterates_over_its_layers():
    layers = [nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)]
    model = nn.Sequential(*layers)
    assert list(model) == layers and [model[i] for i in range(3)] == layers


def test_repr():
    assert repr(nn.MaxPool2d(3, stride=2, padding=1)) == (
        "MaxPool2d(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1))"
    )
    assert repr(nn.AvgPool1d(2)) == "AvgPool1d(kernel_size=2, stride=2, padding=0)"
    assert repr(nn.BatchNorm2d(4, affine=False)) == "BatchNorm2d(4, eps=1e-05, affine=False)"
    assert repr(nn.Dropout(0.1)) == "Dropout(p=0.1)"
    assert repr(nn.GlobalAvgPool2d()) == "GlobalAvgPool2d(keepdim=False)"


def test_maxpool_ties_route_to_the_first_maximum_as_torch():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 2, size=(2, 3, 5, 6)).astype(np.float64)  # many ties
    layer = nn.MaxPool2d(3, stride=2, padding=1)
    lin = nn.Sequential(layer).linearize([], x)
    g = rng.standard_normal(lin.outputs.shape)
    (state,) = lin._states
    _, ours = layer.backward([], state, np.moveaxis(g[..., None], -1, -2), npx, need_params=False)
    out, pull = torch.func.vjp(lambda z: torch.nn.functional.max_pool2d(z, 3, 2, 1), tt(x))
    assert_close(lin.outputs, out.numpy())
    assert_close(np.asarray(ours)[..., 0, :], pull(tt(g))[0].numpy())


def test_hessian_diagonal_walks_through_batchnorm_and_dropout():
    """The per-datum rules in a curvature walk: the Hessian diagonal is exact."""
    from curvlinops.curvature.diagonal import HessianDiagonalLinearOperator

    specs = [("linear", 3, 4), ("bn1d", 4, False), ("tanh",), ("dropout", 0.5), ("linear", 4, 2)]
    ours, theirs = build(specs, (5, 3), seed=6)
    rng = np.random.default_rng(8)
    params = [rng.standard_normal(s) for s in ours.expected_param_shapes()]
    data = [(rng.standard_normal((5, 3)), rng.standard_normal((5, 2)))]
    hessian, _ = _dense_torch_curvature(theirs, params, data)
    loss = MSELoss(reduction="sum")
    diagonal = HessianDiagonalLinearOperator(ours, loss, params, data).to_dense()
    assert_close(np.diag(diagonal), np.diag(hessian))
