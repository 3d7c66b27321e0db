"""Derivative products of curvlinops.nn against independent references on every backend.

For each network (every layer and activation, MLPs, shared-axis inputs, Flatten): the
JVP against central finite differences, the VJP by the dot-product test, the
second-order VJP against finite differences of ``theta -> J(theta)^T u`` (plus
``J^T w``), and all of them against ``torch.func`` and ``jax`` on the same weights.
Closed form: the two-layer scalar linear network of DESIGN.md, whose Hessian has the
bilinear cross term ``r x``.
"""

from __future__ import annotations

import functools

import array_api_compat.numpy as npx
import numpy as np
import pytest
from nn_reference import (
    ACTIVATION_SPECS,
    HAS_JAX,
    HAS_TORCH,
    build_ours,
    fd_jvp,
    fd_second_order,
    flat_k,
    jax_reference,
    ours_on_backend,
    random_problem,
    torch_reference,
)

from curvlinops import nn

# (layer specs, input shape)
CASES = {
    "linear": ([("linear", 4, 3, True)], (5, 4)),
    "linear_no_bias": ([("linear", 4, 3, False)], (5, 4)),
    "linear_shared_axis": ([("linear", 4, 3, True)], (3, 2, 4)),
    **{
        f"mlp_{name}": ([("linear", 4, 5, True), spec, ("linear", 5, 3, True)], (5, 4))
        for name, spec in ACTIVATION_SPECS.items()
    },
    "deep_shared_axis": (
        [
            ("linear", 4, 5, True),
            ("tanh",),
            ("linear", 5, 5, False),
            ("sigmoid",),
            ("linear", 5, 2, True),
        ],
        (3, 2, 4),
    ),
    "flatten_first": (
        [("flatten",), ("linear", 6, 4, True), ("gelu", "none"), ("linear", 4, 2, True)],
        (4, 2, 3),
    ),
    "flatten_after_shared_linear": (
        [("linear", 3, 4, True), ("elu", 1.0), ("flatten",), ("linear", 8, 2, True)],
        (4, 2, 3),
    ),
}
K = 3


def assert_close(actual, expected, rtol):
    """Entrywise agreement up to ``rtol`` relative to the largest reference entry."""
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@functools.cache
def problem(case):
    specs, x_shape = CASES[case]
    model = build_ours(specs)
    return specs, model, random_problem(model, x_shape, K, seed=len(case))


@functools.cache
def finite_differences(case):
    _, model, prob = problem(case)
    lin = model.linearize(prob["params"], prob["x"])
    return {
        "outputs": lin.outputs,
        "JV": fd_jvp(model, prob["params"], prob["x"], prob["V"]),
        "second": fd_second_order(model, prob["params"], prob["x"], prob["u"], prob["V"])
        + flat_k(lin.vjp(prob["w"])),
    }


@functools.cache
def torch_result(case):
    specs, _, prob = problem(case)
    return torch_reference(specs, prob)


@functools.cache
def jax_result(case):
    specs, _, prob = problem(case)
    return jax_reference(specs, prob)


# The layer code is the same on every namespace: every network runs on NumPy (and on
# array-api-strict, which proves that only standard calls are used), and two networks
# that involve every layer kind's tensor handling run on the whole backend matrix.
BACKEND_CASES = ["deep_shared_axis", "flatten_after_shared_linear"]
JAX_CASES = ["mlp_gelu", "mlp_softplus_threshold", "flatten_after_shared_linear"]


def check_against_finite_differences(case, backend):
    _, model, prob = problem(case)
    fd = finite_differences(case)
    ours = ours_on_backend(model, prob, backend)
    assert_close(ours["JV"], fd["JV"], 1e-6)
    assert_close(ours["second"], fd["second"], 1e-6)
    # Dot-product test <U, J V> = <J^T U, V>, one pair per column k.
    lhs = np.sum(np.reshape(prob["U"] * ours["JV"], (-1, K)), axis=0)
    rhs = np.einsum("pk,pk->k", ours["JtU"], flat_k(prob["V"]))
    assert_close(lhs, rhs, 1e-10)
    return ours


@pytest.mark.parametrize("backend", ["numpy", "array_api_strict"], indirect=True)
@pytest.mark.parametrize("case", sorted(CASES))
def test_products_match_finite_differences(case, backend):
    check_against_finite_differences(case, backend)


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_products_on_every_backend(case, backend):
    ours = check_against_finite_differences(case, backend)
    if HAS_TORCH:
        reference = torch_result(case)
        for key in ("outputs", "JV", "JtU", "second"):
            assert_close(ours[key], reference[key], 1e-10)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("backend", ["numpy"], indirect=True)
@pytest.mark.parametrize("case", sorted(CASES))
def test_products_match_torch_func(case, backend):
    _, model, prob = problem(case)
    ours = ours_on_backend(model, prob, backend)
    reference = torch_result(case)
    for key in ("outputs", "JV", "JtU", "second"):
        assert_close(ours[key], reference[key], 1e-10)


@pytest.mark.skipif(not HAS_JAX, reason="jax is not installed")
@pytest.mark.parametrize("backend", ["numpy"], indirect=True)
@pytest.mark.parametrize("case", JAX_CASES)
def test_products_match_jax(case, backend):
    _, model, prob = problem(case)
    ours = ours_on_backend(model, prob, backend)
    reference = jax_result(case)
    for key in ("outputs", "JV", "JtU", "second"):
        assert_close(ours[key], reference[key], 1e-10)


def test_two_layer_scalar_network_has_bilinear_cross_term(backend):
    """DESIGN.md: f = w2 w1 x with 0.5 (f - y)^2 has H - G = [[0, r x], [r x, 0]]."""
    rng = np.random.default_rng(3)
    w1, w2 = 0.7, -1.3
    x, y = rng.standard_normal((4, 1)), rng.standard_normal((4, 1))
    r = w2 * w1 * x - y
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    to = lambda a: backend.asarray(a, "float64")  # noqa: E731
    lin = model.linearize([to([[w1]]), to([[w2]])], to(x))
    eye = np.eye(2)
    tangents = [to(eye[0].reshape(1, 1, 2)), to(eye[1].reshape(1, 1, 2))]

    residual_curvature = flat_k(
        [backend.to_numpy(g) for g in lin.second_order_vjp(to(r), tangents)]
    )
    rx = float(np.sum(r * x))
    np.testing.assert_allclose(residual_curvature, [[0.0, rx], [rx, 0.0]], atol=1e-12)

    # The full Hessian: the Gauss-Newton part J^T J (H_L = 1) comes in through w = J v.
    hessian = flat_k(
        [backend.to_numpy(g) for g in lin.second_order_vjp(to(r), tangents, lambda jv: jv)]
    )
    xx = float(np.sum(x * x))
    expected = [[w2 * w2 * xx, w1 * w2 * xx + rx], [w1 * w2 * xx + rx, w1 * w1 * xx]]
    np.testing.assert_allclose(hessian, expected, rtol=1e-12, atol=1e-12)


def test_k_vectors_equal_k_separate_products(backend):
    _, model, prob = problem("deep_shared_axis")
    to = lambda a: backend.asarray(a, "float64")  # noqa: E731
    lin = model.linearize([to(p) for p in prob["params"]], to(prob["x"]))
    V = [to(v) for v in prob["V"]]
    u, U = to(prob["u"]), to(prob["U"])
    npy = backend.to_numpy

    def double(jv):
        return 2.0 * jv

    jv = npy(lin.jvp(V))
    jtu = [npy(g) for g in lin.vjp(U)]
    second = [npy(g) for g in lin.second_order_vjp(u, V, double)]
    for k in range(K):
        Vk = [to(v[..., k]) for v in prob["V"]]
        assert_close(npy(lin.jvp(Vk)), jv[..., k], 1e-12)
        for g, gk in zip(jtu, lin.vjp(to(prob["U"][..., k])), strict=True):
            assert_close(npy(gk), g[..., k], 1e-12)
        for g, gk in zip(second, lin.second_order_vjp(u, Vk, double), strict=True):
            assert_close(npy(gk), g[..., k], 1e-12)


def test_callable_cotangent_tangent_equals_precomputed_array(numpy_backend):
    _, model, prob = problem("mlp_tanh")
    lin = model.linearize(prob["params"], prob["x"])
    jv = lin.jvp(prob["V"])
    with_callable = lin.second_order_vjp(prob["u"], prob["V"], lambda t: 3.0 * t)
    with_array = lin.second_order_vjp(prob["u"], prob["V"], 3.0 * jv)
    for a, b in zip(with_callable, with_array, strict=True):
        assert_close(a, b, 1e-12)


# JAX recompiles every primitive for a new dtype; float32 on JAX adds nothing the other
# backends do not check.
@pytest.mark.parametrize("backend", ["numpy", "array_api_strict", "torch", "cupy"], indirect=True)
def test_float32_products_match_float64(backend):
    _, model, prob = problem("deep_shared_axis")
    ours32 = ours_on_backend(model, prob, backend, "float32")
    reference = finite_differences("deep_shared_axis")
    assert ours32["JV"].dtype == np.float32
    assert_close(ours32["JV"], reference["JV"], 1e-4)
    assert_close(ours32["second"], reference["second"], 1e-4)


def test_model_without_parameters_has_empty_jacobian(numpy_backend):
    model = nn.Sequential(nn.Tanh(), nn.Flatten())
    x = np.random.default_rng(0).standard_normal((3, 2, 2))
    lin = model.linearize([], npx.asarray(x))
    np.testing.assert_allclose(lin.outputs, np.tanh(x).reshape(3, 4), rtol=1e-15)
    assert lin.vjp(np.ones((3, 4, 2))) == []
    assert lin.second_order_vjp(np.ones((3, 4)), []) == []
