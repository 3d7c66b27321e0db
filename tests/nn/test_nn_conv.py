"""Native convolutions (curvlinops.nn.Conv2d, Conv1d) against PyTorch in float64.

Forward passes against ``torch.nn.functional.conv2d``/``conv1d`` with the same weights;
the JVP, VJP and second-order product of small CNNs against ``torch.func``; the
dot-product test; K vectors at once against K separate ones; the tap against
``torch.nn.functional.unfold`` and autograd; the GGN and Hessian operators against the
same operators on a ``TorchModel`` of the equivalent torch CNN; the GGN diagonal from
the taps against the dense GGN; K-FAC and EKFAC exact on a convolution with one output
pixel and one datum; K-FAC ("expand" and "reduce") against factors computed by hand from
the unfolded patches; the Hessian diagonal and the Kronecker-factored Hessian through
convolutions against the dense Hessian; argument and shape errors.
"""

from __future__ import annotations

import functools

import array_api_compat.numpy as npx
import numpy as np
import pytest
from nn_reference import HAS_TORCH, flat_k, ours_on_backend, random_problem

from curvlinops import GGNLinearOperator, HessianLinearOperator, MSELoss, nn

torch = pytest.importorskip("torch") if HAS_TORCH else None
pytestmark = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")

K = 3

# (name, dimensions, keyword arguments); in/out channels 4/6 (1d: 2/4)
GEOMETRIES = [
    ("plain", 2, dict(kernel_size=3)),
    ("no_bias", 2, dict(kernel_size=3, bias=False)),
    ("stride_padding", 2, dict(kernel_size=3, stride=2, padding=1)),
    ("asymmetric", 2, dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0))),
    ("dilation", 2, dict(kernel_size=2, dilation=(2, 1), padding=1)),
    ("same_even_kernel", 2, dict(kernel_size=(2, 3), padding="same")),
    ("same_dilated", 2, dict(kernel_size=3, padding="same", dilation=2, bias=False)),
    ("valid_groups", 2, dict(kernel_size=2, padding="valid", groups=2)),
    ("groups_stride", 2, dict(kernel_size=3, stride=2, padding=1, groups=2, dilation=(1, 2))),
    ("conv1d", 1, dict(kernel_size=3, stride=2, padding=1)),
    ("conv1d_same_groups", 1, dict(kernel_size=4, padding="same", groups=2, dilation=2)),
]
IDS = [name for name, _, _ in GEOMETRIES]


def make_conv(dims, kwargs, c_in=None, c_out=None):
    if dims == 2:
        return nn.Conv2d(c_in or 4, c_out or 6, **kwargs)
    return nn.Conv1d(c_in or 2, c_out or 4, **kwargs)


def input_shape(dims):
    return (3, 4, 7, 6) if dims == 2 else (3, 2, 9)


def torch_conv(layer, weight, bias, x):
    fn = torch.nn.functional.conv2d if isinstance(layer, nn.Conv2d) else torch.nn.functional.conv1d
    return fn(
        x,
        weight,
        bias,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
    )


def torch_module(layer):
    """The torch.nn convolution equivalent to ``layer`` (float64)."""
    cls = torch.nn.Conv2d if isinstance(layer, nn.Conv2d) else torch.nn.Conv1d
    return cls(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias,
        dtype=torch.float64,
    )


def cnn(dims, kwargs, activation):
    """``Sequential(conv, activation, Flatten, Linear(., 3))`` and its torch twin."""
    conv = make_conv(dims, kwargs)
    x = np.zeros(input_shape(dims))
    features = int(np.prod(conv([np.zeros(s) for s in conv.param_shapes()], x).shape[1:]))
    ours = nn.Sequential(conv, activation(), nn.Flatten(), nn.Linear(features, 3))
    torch_activation = {nn.Tanh: torch.nn.Tanh, nn.ReLU: torch.nn.ReLU}[activation]
    theirs = torch.nn.Sequential(
        torch_module(conv),
        torch_activation(),
        torch.nn.Flatten(),
        torch.nn.Linear(features, 3, dtype=torch.float64),
    )
    return ours, theirs


def torch_products(theirs, prob):
    """Outputs, J V, J^T U and ``sum u Hess v + J^T w`` from torch.func."""
    names = [name for name, _ in theirs.named_parameters()]
    params = tuple(torch.from_numpy(p) for p in prob["params"])
    x = torch.from_numpy(prob["x"])

    def f(*ps):
        return torch.func.functional_call(theirs, dict(zip(names, ps, strict=True)), (x,))

    outputs, vjp_fn = torch.func.vjp(f, *params)
    V = [torch.from_numpy(v) for v in prob["V"]]
    JV = torch.stack(
        [torch.func.jvp(f, params, tuple(v[..., k] for v in V))[1] for k in range(K)], dim=-1
    )
    U = torch.from_numpy(prob["U"])
    JtU = [torch.stack(g, dim=-1) for g in zip(*[vjp_fn(U[..., k]) for k in range(K)], strict=True)]
    u, w = torch.from_numpy(prob["u"]), torch.from_numpy(prob["w"])

    def weighted_grad(*ps):
        return torch.func.grad(lambda *q: torch.sum(u * f(*q)), argnums=tuple(range(len(ps))))(*ps)

    columns = []
    for k in range(K):
        _, hv = torch.func.jvp(weighted_grad, params, tuple(v[..., k] for v in V))
        jtw = vjp_fn(w[..., k])
        columns.append(torch.cat([(a + b).reshape(-1) for a, b in zip(hv, jtw, strict=True)]))
    return {
        "outputs": outputs.detach().numpy(),
        "JV": JV.detach().numpy(),
        "JtU": flat_k([g.detach().numpy() for g in JtU]),
        "second": torch.stack(columns, dim=-1).detach().numpy(),
    }


def assert_close(actual, expected, rtol=1e-10):
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@functools.cache
def problem(name, activation_name):
    _, dims, kwargs = next(g for g in GEOMETRIES if g[0] == name)
    activation = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation_name]
    ours, theirs = cnn(dims, kwargs, activation)
    prob = random_problem(ours, input_shape(dims), K, seed=len(name))
    return ours, theirs, prob


# -- forward ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "dims", "kwargs"), GEOMETRIES, ids=IDS)
def test_forward_matches_torch(name, dims, kwargs):
    layer = make_conv(dims, kwargs)
    params = layer.init(1, xp=npx, dtype=npx.float64)
    x = np.random.default_rng(0).standard_normal(input_shape(dims))
    ours = layer(params, x)
    bias = torch.from_numpy(params[1]) if layer.bias else None
    theirs = torch_conv(layer, torch.from_numpy(params[0]), bias, torch.from_numpy(x))
    assert ours.shape == tuple(theirs.shape)
    assert_close(ours, theirs.numpy())


def test_init_is_pytorchs_default_bound():
    layer = nn.Conv2d(4, 6, (2, 3), groups=2)
    w, b = layer.init(0, xp=npx, dtype=npx.float64)
    bound = 1 / np.sqrt(2 * 2 * 3)
    assert w.shape == (6, 2, 2, 3) and b.shape == (6,)
    assert np.all(np.abs(w) <= bound) and np.all(np.abs(b) <= bound)
    assert np.max(np.abs(w)) > 0.8 * bound


# -- derivative products ------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("name", IDS)
def test_products_match_torch_func(name, activation):
    ours, theirs, prob = problem(name, activation)
    mine = ours_on_backend(ours, prob, _NumpyBackend)
    reference = torch_products(theirs, prob)
    for key in ("outputs", "JV", "JtU", "second"):
        assert_close(mine[key], reference[key])
    # dot-product test <U, J V> = <J^T U, V>, one pair per column
    lhs = np.sum(np.reshape(prob["U"] * mine["JV"], (-1, K)), axis=0)
    rhs = np.einsum("pk,pk->k", mine["JtU"], flat_k(prob["V"]))
    assert_close(lhs, rhs)


@pytest.mark.parametrize("name", ["groups_stride", "conv1d_same_groups"])
def test_products_on_every_backend(name, backend):
    """The same rules on NumPy, array-api-strict (only standard calls), PyTorch, JAX, CuPy."""
    ours, theirs, prob = problem(name, "tanh")
    mine = ours_on_backend(ours, prob, backend)
    reference = torch_products(theirs, prob)
    for key in ("outputs", "JV", "JtU", "second"):
        assert_close(mine[key], reference[key])


def test_cross_term_between_two_convolutions():
    """Conv -> Tanh -> Conv: the second-order product includes the bilinear cross term."""
    conv1 = nn.Conv2d(2, 3, 3, padding=1)
    conv2 = nn.Conv2d(3, 2, 2, stride=2)
    ours = nn.Sequential(conv1, nn.Tanh(), conv2, nn.Flatten())
    theirs = torch.nn.Sequential(
        torch_module(conv1), torch.nn.Tanh(), torch_module(conv2), torch.nn.Flatten()
    )
    prob = random_problem(ours, (2, 2, 5, 4), K, seed=7)
    mine = ours_on_backend(ours, prob, _NumpyBackend)
    reference = torch_products(theirs, prob)
    for key in ("outputs", "JV", "JtU", "second"):
        assert_close(mine[key], reference[key])
    # without a cotangent tangent (w = 0): the last convolution's bias gets a zero block
    lin = ours.linearize(prob["params"], prob["x"])
    second = lin.second_order_vjp(prob["u"], prob["V"], None)
    assert [tuple(g.shape) for g in second] == [tuple(v.shape) for v in prob["V"]]
    without_w = torch_products(theirs, dict(prob, w=np.zeros_like(prob["w"])))["second"]
    assert_close(flat_k(second), without_w)


@pytest.mark.parametrize("name", ["groups_stride", "conv1d"])
def test_k_vectors_equal_k_separate_products(name):
    ours, _, prob = problem(name, "tanh")
    lin = ours.linearize(prob["params"], prob["x"])
    V, U, u, w = prob["V"], prob["U"], prob["u"], prob["w"]
    jv = lin.jvp(V)
    jtu = lin.vjp(U)
    second = lin.second_order_vjp(u, V, w)
    for k in range(K):
        Vk = [v[..., k : k + 1] for v in V]
        assert_close(jv[..., k : k + 1], lin.jvp(Vk))
        for a, b in zip(jtu, lin.vjp(U[..., k : k + 1]), strict=True):
            assert_close(a[..., k : k + 1], b)
        for a, b in zip(second, lin.second_order_vjp(u, Vk, w[..., k : k + 1]), strict=True):
            assert_close(a[..., k : k + 1], b)


def test_float32_smoke():
    ours, _, prob = problem("stride_padding", "tanh")
    mine32 = ours_on_backend(ours, prob, _NumpyBackend, dtype="float32")
    mine64 = ours_on_backend(ours, prob, _NumpyBackend)
    for key in ("outputs", "JV", "JtU", "second"):
        assert mine32[key].dtype == np.float32
        assert_close(mine32[key], mine64[key], rtol=1e-4)


# -- the tap -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "dims", "kwargs"), GEOMETRIES, ids=IDS)
def test_tap_matches_torch_unfold_and_autograd(name, dims, kwargs):
    conv = make_conv(dims, kwargs)
    model = nn.Sequential(conv, nn.Flatten())
    rng = np.random.default_rng(2)
    params = model.init(3, xp=npx, dtype=npx.float64)
    x = rng.standard_normal(input_shape(dims))
    lin = model.linearize(params, x)
    M = 2
    cotangents = rng.standard_normal(lin.outputs.shape + (M,))
    (tap,) = lin.layer_taps(cotangents)
    assert (tap.weight_index, tap.bias_index) == (0, 1 if conv.bias else None)

    # independent unfolding: torch.nn.functional.unfold on a 4d view, padded by hand
    xt = torch.from_numpy(x if dims == 2 else x[:, :, None, :])
    kernel, stride, dilation = (
        (conv.kernel_size, conv.stride, conv.dilation)
        if dims == 2
        else ((1, *conv.kernel_size), (1, *conv.stride), (1, *conv.dilation))
    )
    pads = conv._pads if dims == 2 else ((0, 0), *conv._pads)
    xt = torch.nn.functional.pad(xt, (*pads[1], *pads[0]))
    unfolded = torch.nn.functional.unfold(xt, kernel, dilation=dilation, stride=stride)
    expected_inputs = unfolded.permute(0, 2, 1).numpy()  # (N, S, C_in kh kw)
    d_in = expected_inputs.shape[-1]
    G = conv.groups
    assert tap.groups == G
    assert tap.matrix_shape == (conv.out_channels, d_in // G)
    assert_close(tap.inputs, expected_inputs)

    # output gradients: the cotangents pulled back through Flatten, channels last
    bias = torch.from_numpy(params[1]) if conv.bias else None
    out = torch_conv(conv, torch.from_numpy(params[0]), bias, torch.from_numpy(x))
    S = expected_inputs.shape[1]
    grads = cotangents.reshape(out.shape + (M,))  # (N, C_out, *spatial, M)
    grads = np.moveaxis(grads.reshape(x.shape[0], conv.out_channels, S, M), 1, 2)
    assert tap.output_grads.shape == (x.shape[0], S, conv.out_channels, M)
    assert_close(tap.output_grads, grads)

    # the weight as the matrix multiplying the taps' inputs reproduces the outputs: group
    # g's rows of the (C_out, D_in / G) matrix times group g's slice of the patches
    matrix = np.reshape(params[0], tap.matrix_shape)
    rows, cols = conv.out_channels // G, d_in // G
    recomputed = np.concatenate(
        [
            tap.inputs[..., g * cols : (g + 1) * cols] @ matrix[g * rows : (g + 1) * rows].T
            for g in range(G)
        ],
        axis=-1,
    ) + (params[1] if conv.bias else 0.0)
    assert_close(np.moveaxis(recomputed, 1, 2).reshape(out.shape), out.numpy())


@pytest.mark.parametrize("name", ["stride_padding", "asymmetric", "dilation", "conv1d"])
def test_hessian_diagonal_through_convolutions_matches_the_dense_hessian(name):
    """The per-datum walk through convolutions (J^T H J) and curved activations."""
    from curvlinops.curvature.diagonal import HessianDiagonalLinearOperator

    dims, kwargs = next((g[1], g[2]) for g in GEOMETRIES if g[0] == name)
    conv = make_conv(dims, kwargs)
    shape = input_shape(dims)
    probe = conv(conv.init(0, xp=npx, dtype=npx.float64), np.ones((1,) + shape[1:]))
    second = (nn.Conv2d if dims == 2 else nn.Conv1d)(conv.out_channels, 2, 2)
    weight = np.ones((2, conv.out_channels) + (2,) * dims)
    features = second([weight, np.zeros(2)], probe).size
    model = nn.Sequential(
        conv, nn.Tanh(), second, nn.Sigmoid(), nn.Flatten(), nn.Linear(features, 3)
    )
    params = model.init(1, xp=npx, dtype=npx.float64)
    data = _data(dims, 3)
    dense = HessianLinearOperator(model, MSELoss(), params, data).to_dense()
    diagonal = HessianDiagonalLinearOperator(model, MSELoss(), params, data).diagonal()
    assert_close(diagonal, np.diag(dense))


def test_kronecker_factored_hessian_is_exact_for_one_datum_of_one_pixel():
    """With one position per layer and one datum, every block is the exact Hessian block."""
    from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator

    model = nn.Sequential(
        nn.Conv2d(2, 3, 1), nn.Tanh(), nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(2, 2)
    )
    params = model.init(0, xp=npx, dtype=npx.float64)
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((1, 2, 1, 1)), rng.standard_normal((1, 2)))]
    op = KFACHessianLinearOperator(model, MSELoss(), params, data, separate_weight_and_bias=False)
    dense = HessianLinearOperator(model, MSELoss(), params, data).to_dense()
    ours = op.to_dense()
    # the joint [W | b] block of each layer, in the flat order of (W, b)
    offsets = np.cumsum([0] + [p.size for p in params])
    for w in (0, 2, 4):
        idx = np.r_[offsets[w] : offsets[w + 2]]
        assert_close(ours[np.ix_(idx, idx)], dense[np.ix_(idx, idx)])


def test_kronecker_factored_hessian_averaged_conv_rule_matches_the_expand_sum():
    """The batch-averaged conv rule against the sum over input pixels of diagonal blocks.

    For a linear network Conv2d -> Conv2d with squared loss on every output, the
    exact per-datum Hessian of the first convolution's outputs is ``J^T J`` of the
    second; its diagonal (pixel, pixel) blocks summed over pixels and data are what the
    averaged rule approximates with the fraction of in-bounds offsets. With stride 1 and
    no padding every output position reaches exactly ``k * k`` inputs, but inputs near
    the border are reached less often: the rule is exact for the sum when every pixel is
    covered the same number of times, which holds for a kernel of 1 x 1 or for a
    periodic layout. We check the 1 x 1 case against the dense sum and a 2 x 2 kernel
    with stride 2 (each input pixel in exactly one patch) too.
    """
    from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator

    for kernel, stride in ((1, 1), (2, 2)):
        first, second = nn.Conv2d(2, 3, 1), nn.Conv2d(3, 2, kernel, stride=stride)
        model = nn.Sequential(first, second, nn.Flatten())
        params = model.init(0, xp=npx, dtype=npx.float64)
        rng = np.random.default_rng(1)
        X = rng.standard_normal((3, 2, 4, 4))
        out = model(params, X)
        data = [(X, rng.standard_normal(out.shape))]
        op = KFACHessianLinearOperator(
            model, MSELoss(reduction="sum"), params, data, separate_weight_and_bias=True
        )
        # exact: H at the first conv's outputs (N, 3, 4, 4), per datum 2 J^T J of the
        # second conv; sum over data and pixels of its (pixel, pixel) channel blocks
        J = _dense_jacobian(second, params[2:], (3, 4, 4))  # (F_out, 3 * 16)
        H = 2.0 * J.T @ J  # channels-first order (c, pixel)
        blocks = H.reshape(3, 16, 3, 16)
        expected = 3 * np.einsum("cpdp->cd", blocks)
        assert_close(op.output_factors["0"], expected)


@pytest.mark.parametrize(
    "layer, in_shape",
    [
        (nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (2, 5, 4)),
        (nn.Conv2d(4, 2, 3, padding="same", groups=2), (4, 3, 4)),
        (nn.Conv1d(2, 2, 3, stride=2, padding=2, dilation=2), (2, 7)),
    ],
    ids=["2d_padded_dilated", "2d_same_groups", "1d_padded"],
)
def test_averaged_conv_rule_is_the_sum_of_diagonal_pixel_blocks_with_padding(layer, in_shape):
    """Every output position carrying the same block ``B`` (none between positions):
    then the averaged rule is exact for ``sum_n sum_q`` of the ``(C_in, C_in)``
    diagonal blocks of ``J^T (B (x) I) J`` over the input pixels ``q``, even where
    padding leaves kernel offsets outside the image at some positions (each offset
    counted at the positions where it lands inside). Statistics over two batches."""
    params = layer.init(0, xp=npx, dtype=npx.float64)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3,) + in_shape)
    y = layer(params, x)
    C_out, P_out = y.shape[1], int(np.prod(y.shape[2:]))
    J = _dense_jacobian(layer, params, in_shape)  # (C_out P_out, C_in Q), channels first
    A = rng.standard_normal((C_out, C_out))
    B = A + A.T
    blocks = (J.T @ np.kron(B, np.eye(P_out)) @ J).reshape(
        in_shape[0], -1, in_shape[0], J.shape[1] // in_shape[0]
    )
    direct = len(x) * np.einsum("aqbq->ab", blocks)
    statistics = None
    for part in (x[:1], x[1:]):
        bound = layer.linearize(params, part).layers()[0]
        statistics = bound.curvature_statistics(np.zeros(layer(params, part).shape), statistics)
    bound = layer.linearize(params, x).layers()[0]
    result = bound.backward_mean_curvature(len(x) * P_out * B, statistics)
    assert_close(result, direct)


def _dense_jacobian(layer, params, in_shape):
    """The Jacobian of a linear layer (without its bias) over one datum's entries."""
    size = int(np.prod(in_shape))
    basis = np.eye(size).reshape((size,) + in_shape)
    zero = [params[0]] + [np.zeros_like(p) for p in params[1:]]
    columns = layer(zero, basis).reshape(size, -1)
    return columns.T


# -- curvature operators through the native CNN ---------------------------------------------


def _data(dims, seed):
    rng = np.random.default_rng(seed)
    shape = input_shape(dims)
    return [
        (rng.standard_normal((2,) + shape[1:]), rng.standard_normal((2, 3))),
        (rng.standard_normal((3,) + shape[1:]), rng.standard_normal((3, 3))),
    ]


@pytest.mark.parametrize("operator", [GGNLinearOperator, HessianLinearOperator])
@pytest.mark.parametrize("name", ["stride_padding", "groups_stride", "conv1d"])
def test_curvature_operators_match_torch_model(name, operator):
    from curvlinops.frontends.torch import TorchModel

    ours, theirs, prob = problem(name, "tanh")
    with torch.no_grad():
        for p, value in zip(theirs.parameters(), prob["params"], strict=True):
            p.copy_(torch.from_numpy(value))
    dims = next(g[1] for g in GEOMETRIES if g[0] == name)
    data = _data(dims, 5)
    native = operator(ours, MSELoss(), prob["params"], data).to_dense()
    torch_model = TorchModel(theirs)
    torch_data = [(torch.from_numpy(X), torch.from_numpy(y)) for X, y in data]
    reference = operator(torch_model, MSELoss(), torch_model.params, torch_data).to_dense()
    assert_close(native, reference.detach().numpy())


@pytest.mark.parametrize("approximation", ["KFAC", "EKFAC"])
def test_kfac_is_exact_for_one_output_pixel_and_one_datum(approximation):
    """With one output pixel the convolution is a linear layer on its (padded) patch."""
    from curvlinops.curvature.ekfac import EKFACLinearOperator
    from curvlinops.curvature.kfac import KFACLinearOperator

    cls = {"KFAC": KFACLinearOperator, "EKFAC": EKFACLinearOperator}[approximation]
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)  # 2x2 inputs -> one output pixel
    model = nn.Sequential(conv, nn.Flatten())
    params = model.init(0, xp=npx, dtype=npx.float64)
    rng = np.random.default_rng(1)
    data = [(rng.standard_normal((1, 2, 2, 2)), rng.standard_normal((1, 3)))]
    kfac = cls(model, MSELoss(), params, data, separate_weight_and_bias=False)
    ggn = GGNLinearOperator(model, MSELoss(), params, data)
    assert_close(kfac.to_dense(), ggn.to_dense())


@pytest.mark.parametrize("name", ["stride_padding", "conv1d"])
def test_ggn_diagonal_from_the_taps_matches_the_dense_ggn(name):
    from curvlinops import GGNDiagonalLinearOperator

    ours, _, prob = problem(name, "tanh")
    dims = next(g[1] for g in GEOMETRIES if g[0] == name)
    data = _data(dims, 6)
    diagonal = GGNDiagonalLinearOperator(ours, MSELoss(), prob["params"], data).diagonal()
    dense = GGNLinearOperator(ours, MSELoss(), prob["params"], data).to_dense()
    assert_close(np.asarray(diagonal), np.diag(dense))


def _kfac_problem():
    conv = nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=1)
    model = nn.Sequential(conv, nn.Flatten())
    params = model.init(0, xp=npx, dtype=npx.float64)
    rng = np.random.default_rng(4)
    X = rng.standard_normal((4, 2, 4, 5))
    y = rng.standard_normal(model(params, X).shape)
    return model, params, X, y


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_kfac_equals_hand_computed_factors_of_the_unfolded_inputs(kfac_approx):
    """``B (x) A`` from the tap's patches ``(N, S, D)`` and output gradients, by hand."""
    from curvlinops.curvature.kfac import KFACLinearOperator

    model, params, X, y = _kfac_problem()
    kfac = KFACLinearOperator(
        model, MSELoss(reduction="sum"), params, [(X, y)], kfac_approx=kfac_approx
    )
    lin = model.linearize(params, X)
    N, F = lin.outputs.shape
    # the summed squared error has Hessian 2 I: its symmetric factor is sqrt(2) I per datum
    cotangents = np.broadcast_to(np.sqrt(2.0) * np.eye(F), (N, F, F))
    (tap,) = lin.layer_taps(np.ascontiguousarray(cotangents))
    a, g = np.asarray(tap.inputs), np.asarray(tap.output_grads)  # (N, S, D), (N, S, C, M)
    if kfac_approx == "expand":
        items_a, items_g = a.reshape(-1, a.shape[-1]), np.moveaxis(g, 2, -1).reshape(-1, g.shape[2])
    else:
        items_a = a.mean(axis=1)
        items_g = np.moveaxis(g.sum(axis=1), 1, -1).reshape(-1, g.shape[2])
    A = items_a.T @ items_a / items_a.shape[0]
    B = items_g.T @ items_g
    expected = np.zeros((kfac.shape[0],) * 2)
    nw = B.shape[0] * A.shape[0]
    expected[:nw, :nw] = np.kron(B, A)
    expected[nw:, nw:] = B
    assert_close(kfac.to_dense(), expected)


def test_kfac_expand_equals_kfac_of_a_linear_layer_on_the_patches():
    from curvlinops.curvature.kfac import KFACLinearOperator

    model, params, X, y = _kfac_problem()
    (tap,) = model.linearize(params, X).layer_taps(None)
    N, S, D = tap.inputs.shape
    kfac = KFACLinearOperator(model, MSELoss(reduction="sum"), params, [(X, y)])
    # the same layer as a Linear on the patches (N, S, D), outputs (N, S, C_out)
    y_linear = np.moveaxis(y.reshape(N, 3, S), 1, 2)
    weights = [np.reshape(params[0], (3, D)), params[1]]
    reference = KFACLinearOperator(
        nn.Linear(D, 3), MSELoss(reduction="sum"), weights, [(np.asarray(tap.inputs), y_linear)]
    )
    assert_close(kfac.to_dense(), reference.to_dense())


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(in_channels=3, out_channels=4, kernel_size=2, groups=2), "in_channels divisible"),
        (dict(in_channels=4, out_channels=3, kernel_size=2, groups=2), "out_channels divisible"),
        (dict(in_channels=2, out_channels=2, kernel_size=3, stride=2, padding="same"), "stride 1"),
        (dict(in_channels=2, out_channels=2, kernel_size=3, padding="full"), "'same', 'valid'"),
        (dict(in_channels=2, out_channels=2, kernel_size=0), "kernel_size as a positive"),
        (dict(in_channels=2, out_channels=2, kernel_size=(2, 2, 2)), "tuple of 2"),
        (dict(in_channels=2, out_channels=2, kernel_size=2, padding=-1), "non-negative"),
        (dict(in_channels=0, out_channels=2, kernel_size=2), "positive integer in_channels"),
        (dict(in_channels=2, out_channels=2, kernel_size=2, stride=1.5), "stride"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nn.Conv2d(**kwargs)


def test_bad_inputs_raise():
    layer = nn.Conv2d(3, 2, 3)
    params = layer.init(0, xp=npx, dtype=npx.float64)
    with pytest.raises(ValueError, match=r"channels-first inputs of shape \(N, 3, H, W\)"):
        layer(params, np.ones((2, 5, 5, 3)))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got shape \(2, 3, 5\)"):
        layer(params, np.ones((2, 3, 5)))
    with pytest.raises(ValueError, match="smaller than its dilated kernel"):
        layer(params, np.ones((2, 3, 2, 5)))
    with pytest.raises(ValueError, match=r"\(N, 2, L\)"):
        nn.Conv1d(2, 2, 2)([np.ones((2, 2, 2)), np.ones(2)], np.ones((1, 3, 4)))


def test_repr():
    assert repr(nn.Conv2d(3, 8, 3, stride=2, padding=1)) == (
        "Conv2d(3, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), "
        "groups=1, bias=True)"
    )
    assert repr(nn.Conv1d(2, 4, 3, padding="same", bias=False)) == (
        "Conv1d(2, 4, kernel_size=3, stride=1, padding='same', dilation=1, groups=1, bias=False)"
    )


class _NumpyBackend:
    @staticmethod
    def asarray(a, dtype):
        return np.asarray(a, dtype=dtype)

    @staticmethod
    def to_numpy(a):
        return np.asarray(a)
