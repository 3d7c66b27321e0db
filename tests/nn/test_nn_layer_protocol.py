"""The layer protocol of the native layers against finite differences, and a new layer type.

For each layer ``o = layer(x)`` and a per-datum quadratic ``q(o_n) = c_n . o_n +
o_n^T A_n o_n / 2`` (output Hessian ``A_n``, output gradient ``c_n + A_n o_n``), the
layer's ``backward_gradient`` and ``backward_curvature`` must be the gradient and the
Hessian of ``q(layer(x_n))`` with respect to ``x_n``, which the reference takes by
central finite differences of ``q`` itself. The batch-averaged rule must be the
documented average and, for a single datum, equal the per-datum rule.

The last tests add a layer type that is defined here only: the Hessian diagonal and the
Kronecker-factored Hessian work through it without a change to ``curvlinops.curvature``.
"""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest

import curvlinops as cl
from curvlinops import MissingLayerRuleError, nn
from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator

LAYERS = {
    "linear": lambda: nn.Linear(4, 3),
    "linear_no_bias": lambda: nn.Linear(4, 3, bias=False),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": lambda: nn.Softplus(beta=1.5),
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU("tanh"),
    "elu": lambda: nn.ELU(0.8),
    "relu": nn.ReLU,
    "leaky": lambda: nn.LeakyReLU(0.2),
    "identity": nn.Identity,
    "flatten": nn.Flatten,
}


def _bound(name, N=3, seed=0):
    layer = LAYERS[name]()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 4))
    params = layer.init(seed, xp=xp, dtype=xp.float64)
    lin = layer.linearize(params, x)
    (bound,) = lin.layers()
    return layer, params, x, lin.outputs, bound


def _quadratic(outputs, seed):
    rng = np.random.default_rng(seed)
    N, F = outputs.shape
    c = rng.normal(size=(N, F))
    M = rng.normal(size=(N, F, F))
    A = M + np.swapaxes(M, 1, 2)
    return c, A


def _finite_difference_hessian(fn, x, eps=1e-4):
    """Hessian of the scalar ``fn`` at the vector ``x`` by central differences."""
    n = x.size
    H = np.zeros((n, n))
    E = np.eye(n) * eps
    for i in range(n):
        for j in range(n):
            H[i, j] = (
                fn(x + E[i] + E[j])
                - fn(x + E[i] - E[j])
                - fn(x - E[i] + E[j])
                + fn(x - E[i] - E[j])
            ) / (4 * eps**2)
    return H


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_per_datum_rules_against_finite_differences(name):
    layer, params, x, out, bound = _bound(name, seed=1)
    c, A = _quadratic(out, seed=2)
    g_out = c + np.einsum("nij,nj->ni", A, out)
    g_in = bound.backward_gradient(g_out)
    H_in = bound.backward_curvature(A, g_out)
    assert g_in.shape == x.shape and H_in.shape == (x.shape[0], 4, 4)
    for n in range(x.shape[0]):

        def q(v, n=n):
            o = layer(params, v[None, :])[0]
            return c[n] @ o + 0.5 * o @ A[n] @ o

        eps = 1e-6
        grad = np.array([(q(x[n] + eps * e) - q(x[n] - eps * e)) / (2 * eps) for e in np.eye(4)])
        np.testing.assert_allclose(g_in[n], grad, rtol=1e-6, atol=1e-7)
        # ReLU / LeakyReLU kinks are away from the random inputs: H is exact there too
        np.testing.assert_allclose(
            H_in[n], _finite_difference_hessian(q, x[n]), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_averaged_rule_is_the_documented_average_and_the_per_datum_rule_for_one_datum(name):
    layer, params, x, out, bound = _bound(name, N=6, seed=3)
    rng = np.random.default_rng(4)
    g = rng.normal(size=out.shape)
    M = rng.normal(size=(out.shape[1],) * 2)
    H = M + M.T
    # statistics accumulated over two batches equal those of one batch
    parts = [layer.linearize(params, x[:2]).layers()[0], layer.linearize(params, x[2:]).layers()[0]]
    split = parts[1].curvature_statistics(g[2:], parts[0].curvature_statistics(g[:2]))
    whole = bound.curvature_statistics(g)
    mean = bound.backward_mean_curvature(H, whole)
    np.testing.assert_allclose(parts[0].backward_mean_curvature(H, split), mean, rtol=1e-12)
    if isinstance(layer, nn.Elementwise):
        d1 = layer.first_derivative(x, xp)
        d2 = layer.second_derivative(x, xp)
        expected = H * (d1.T @ d1 / len(x))
        if d2 is not None:
            expected = expected + np.diag(np.sum(d2 * g, axis=0))
    elif isinstance(layer, nn.Linear):
        expected = params[0].T @ H @ params[0]
    else:
        expected = H
    np.testing.assert_allclose(mean, expected, rtol=1e-12, atol=1e-14)
    # one datum: the averaged rule is the per-datum rule
    one = layer.linearize(params, x[:1]).layers()[0]
    np.testing.assert_allclose(
        one.backward_mean_curvature(H, one.curvature_statistics(g[:1])),
        one.backward_curvature(H[None], g[:1])[0],
        rtol=1e-12,
        atol=1e-14,
    )


def test_taps_of_the_protocol_match_layer_taps():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False))
    params = model.init(0, xp=xp, dtype=xp.float64)
    x = np.random.default_rng(0).normal(size=(6, 2, 4))
    lin = model.linearize(params, x)
    taps = lin.layer_taps(np.ones((6, 2, 3, 2)))
    protocol = [layer.tap() for layer in lin.layers() if layer.tap() is not None]
    assert [(t.name, t.weight_index, t.bias_index, t.matrix_shape) for t in taps] == [
        ("0", 0, 1, (5, 4)),
        ("2", 2, None, (3, 5)),
    ]
    assert [(t.name, t.weight_index, t.bias_index, t.matrix_shape) for t in protocol] == [
        (t.name, t.weight_index, t.bias_index, t.matrix_shape) for t in taps
    ]
    for t, p in zip(taps, protocol, strict=True):
        np.testing.assert_array_equal(t.inputs, p.inputs)
        assert p.output_grads is None and t.output_grads.shape == (6, 2, t.matrix_shape[0], 2)


@pytest.mark.parametrize("name", ["linear", "tanh", "flatten"])
def test_per_datum_rule_with_a_shared_axis_against_finite_differences(name):
    """Inputs (N, S, D): the per-datum Hessian is over all S * D entries of a datum."""
    layer = LAYERS[name]()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 2, 4))
    params = layer.init(5, xp=xp, dtype=xp.float64)
    lin = layer.linearize(params, x)
    (bound,) = lin.layers()
    out = np.reshape(lin.outputs, (2, -1))
    c, A = _quadratic(out, seed=6)
    g_out = np.reshape(c + np.einsum("nij,nj->ni", A, out), lin.outputs.shape)
    H_in = bound.backward_curvature(A, g_out)
    assert H_in.shape == (2, 8, 8)
    for n in range(2):

        def q(v, n=n):
            o = np.reshape(layer(params, np.reshape(v, (1, 2, 4))), (-1,))
            return c[n] @ o + 0.5 * o @ A[n] @ o

        reference = _finite_difference_hessian(q, np.reshape(x[n], (-1,)))
        np.testing.assert_allclose(H_in[n], reference, rtol=1e-5, atol=1e-6)


def test_rules_a_layer_lacks_raise_naming_the_layer():
    flatten = nn.Flatten().linearize([], np.ones((2, 5, 3))).layers()[0]
    with pytest.raises(MissingLayerRuleError, match=r"is Flatten\(\).*batch-averaged"):
        flatten.curvature_statistics(np.ones((2, 15)))
    tanh = nn.Tanh().linearize([], np.ones((2, 3))).layers()[0]
    with pytest.raises(MissingLayerRuleError, match="without statistics"):
        tanh.backward_mean_curvature(np.eye(3), None)


# -- adding a layer type: one class, nothing in curvlinops.curvature --------------------


class Scale(nn.Layer):
    """``a = c s``: a new parameter-free layer type with its derivative rules and protocol."""

    r_backward_uses_input_tangent = False

    def __init__(self, c):
        self.c = float(c)

    def __repr__(self):
        return f"Scale({self.c})"

    def forward(self, params, a, xp):
        return self.c * a

    def tangent(self, params, dparams, state, ta, xp):
        return None if ta is None else self.c * ta

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        return [], (self.c * g if need_input else None)

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        if not need_input:
            return [], None, None
        return [], self.c * g, None if rg is None else self.c * rg

    # the layer protocol
    def backward_curvature(self, params, state, H, g, xp):
        return self.c**2 * H

    def backward_mean_curvature(self, params, H, statistics, xp):
        return self.c**2 * H


class Opaque(Scale):
    """The same layer without the layer protocol's curvature rules."""

    backward_curvature = nn.Layer.backward_curvature
    backward_mean_curvature = nn.Layer.backward_mean_curvature

    def __repr__(self):
        return "Opaque()"


def _problem(middle, N):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), middle, nn.Linear(4, 2))
    params = model.init(8, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(8)
    return model, params, [(rng.normal(size=(N, 3)), rng.normal(size=(N, 2)))]


def test_a_new_layer_type_works_with_the_hessian_diagonal_and_kfac_hessian():
    loss = cl.MSELoss()
    model, params, data = _problem(Scale(-1.7), N=5)
    H = cl.HessianLinearOperator(model, loss, params, data).to_dense()
    D = cl.HessianDiagonalLinearOperator(model, loss, params, data).diagonal()
    np.testing.assert_allclose(D, np.diag(H), rtol=1e-10, atol=1e-13)
    model, params, data = _problem(Scale(-1.7), N=1)
    K = KFACHessianLinearOperator(model, loss, params, data).to_dense()
    H = cl.HessianLinearOperator(model, loss, params, data).to_dense()
    np.testing.assert_allclose(K[:12, :12], H[:12, :12], rtol=1e-10, atol=1e-13)  # first weight


def test_a_layer_type_without_the_rules_is_named_with_what_to_use_instead():
    model, params, data = _problem(Opaque(2.0), N=3)
    with pytest.raises(MissingLayerRuleError, match=r"layer '2' is Opaque\(\).*HessianLinearOp"):
        cl.HessianDiagonalLinearOperator(model, cl.MSELoss(), params, data)
    with pytest.raises(MissingLayerRuleError, match=r"layer '2' is Opaque\(\).*KFACLinearOperator"):
        KFACHessianLinearOperator(model, cl.MSELoss(), params, data)


class WrongScale(Scale):
    """A planted bug: the curvature rule forgets one factor ``c``."""

    def backward_curvature(self, params, state, H, g, xp):
        return self.c * H


def test_check_layer_protocol_passes_for_native_layers_and_catches_a_wrong_rule():
    from curvlinops.verify import check_layer_protocol

    model, params, data = _problem(Scale(-1.7), N=4)
    report = check_layer_protocol(model, params, data[0][0])
    assert report.passed, report
    model, params, data = _problem(WrongScale(-1.7), N=4)
    report = check_layer_protocol(model, params, data[0][0])
    assert not report.passed and "worst layer '0'" in str(report), report
