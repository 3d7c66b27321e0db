"""CallableModel: a nonlinear least-squares fit with hand-derived Jacobian products.

The model is a sum of two exponentials ``y = a1 exp(-b1 t) + a2 exp(-b2 t)`` with
parameters ``theta = (a1, b1, a2, b2)``. Its products are written by hand with
array-API calls (so the model runs on every backend); the references are finite
differences of the forward pass in NumPy and ``scipy.optimize.least_squares``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
from message_cases import assert_message

from curvlinops import (
    GGNLinearOperator,
    HessianLinearOperator,
    LayerTap,
    MissingTierError,
    MSELoss,
    Tier,
    array_namespace,
    cg,
    to_numpy,
)
from curvlinops.frontends import CallableModel

# torch loads its forward-mode decompositions with torch.jit.script on first use and warns
# about it; the warning is torch's own.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

TRUE_THETA = np.array([2.0, 0.5, 1.0, 3.0])
START = np.array([1.5, 0.4, 1.5, 2.5])


def _exponentials(theta, t, xp):
    """``e_i = exp(-b_i t)`` for the two terms, each ``(N,)``."""
    return xp.exp(-theta[1] * t), xp.exp(-theta[3] * t)


def forward(params, x):
    xp = array_namespace(x)
    theta, t = params[0], x[:, 0]
    e1, e2 = _exponentials(theta, t, xp)
    return (theta[0] * e1 + theta[2] * e2)[:, None]


def jacobian(params, x):
    """``d f_n / d theta``: ``(N, 4)``."""
    xp = array_namespace(x)
    theta, t = params[0], x[:, 0]
    e1, e2 = _exponentials(theta, t, xp)
    return xp.stack([e1, -theta[0] * t * e1, e2, -theta[2] * t * e2], axis=1)


def jvp(params, x, tangents):
    return (jacobian(params, x) @ tangents[0])[:, None, :]


def vjp(params, x, cotangents):
    J = jacobian(params, x)
    return [J.T @ cotangents[:, 0, :]]


def second_order_vjp(params, x, u, tangents, w):
    """``sum_n u_n Hess(f_n) V + J^T W``; ``Hess(f_n)`` is block diagonal in (a_i, b_i)."""
    xp = array_namespace(x)
    theta, t, u = params[0], x[:, 0], u[:, 0]
    e1, e2 = _exponentials(theta, t, xp)
    s1, s2 = -xp.sum(u * t * e1), -xp.sum(u * t * e2)  # d2 f / da_i db_i
    q1, q2 = xp.sum(u * theta[0] * t**2 * e1), xp.sum(u * theta[2] * t**2 * e2)  # d2 / db_i^2
    V = tangents[0]
    out = xp.stack(
        [s1 * V[1, :], s1 * V[0, :] + q1 * V[1, :], s2 * V[3, :], s2 * V[2, :] + q2 * V[3, :]],
        axis=0,
    )
    if w is not None:
        out = out + jacobian(params, x).T @ w[:, 0, :]
    return [out]


def exponential_model(**kwargs):
    return CallableModel(
        forward, jvp, vjp, second_order_vjp=second_order_vjp, param_shapes=[(4,)], **kwargs
    )


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 4.0, n)
    y = forward([TRUE_THETA], t[:, None])[:, 0] + 0.01 * rng.standard_normal(n)
    return t[:, None], y[:, None]


def _residuals(theta, t, y):
    return forward([theta], t)[:, 0] - y[:, 0]


def _fd_jacobian(theta, t, h=1e-6):
    """Central finite differences of the forward pass (NumPy), ``(N, 4)``."""
    cols = []
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        cols.append((forward([theta + e], t)[:, 0] - forward([theta - e], t)[:, 0]) / (2 * h))
    return np.stack(cols, axis=1)


def _fd_hessian_of_sum_loss(theta, t, y, h=1e-4):
    """Four-point central differences of the loss ``sum r^2`` (NumPy), ``(4, 4)``."""

    def loss(th):
        return np.sum(_residuals(th, t, y) ** 2)

    eye = h * np.eye(theta.size)
    H = np.empty((theta.size, theta.size))
    for i in range(theta.size):
        for j in range(theta.size):
            di, dj = eye[i], eye[j]
            H[i, j] = (
                loss(theta + di + dj)
                - loss(theta + di - dj)
                - loss(theta - di + dj)
                + loss(theta - di - dj)
            ) / (4 * h * h)
    return H


# -- products on every backend -----------------------------------------------------------


def test_ggn_and_hessian_match_finite_differences(backend):
    t, y = _data(n=12)
    model = exponential_model()
    params = [backend.asarray(START, "float64")]
    data = [(backend.asarray(t, "float64"), backend.asarray(y, "float64"))]
    loss = MSELoss(reduction="sum")
    G = to_numpy(GGNLinearOperator(model, loss, params, data).to_dense())
    J = _fd_jacobian(START, t)
    np.testing.assert_allclose(G, 2.0 * J.T @ J, rtol=1e-7, atol=1e-9)
    H = to_numpy(HessianLinearOperator(model, loss, params, data).to_dense())
    reference = _fd_hessian_of_sum_loss(START, t, y)
    np.testing.assert_allclose(H, reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max())


def test_unbatched_functions_give_the_same_products():
    t, y = _data(n=12)

    def single(fn):
        # The same products, written for one vector: add and remove K around fn.
        def wrapped(params, x, *vectors):
            batched = [
                v
                if v is None
                else ([a[..., None] for a in v] if isinstance(v, list) else v[..., None])
                for v in vectors
            ]
            out = fn(params, x, *batched)
            return [a[..., 0] for a in out] if isinstance(out, list) else out[..., 0]

        return wrapped

    def so_single(params, x, u, v, w):
        v = [a[..., None] for a in v]
        w = None if w is None else w[..., None]
        return [a[..., 0] for a in second_order_vjp(params, x, u, v, w)]

    unbatched = CallableModel(
        forward, single(jvp), single(vjp), second_order_vjp=so_single, batched=False
    )
    batched = exponential_model()
    loss, data = MSELoss(reduction="sum"), [(t, y)]
    for cls in (GGNLinearOperator, HessianLinearOperator):
        want = cls(batched, loss, [START], data).to_dense()
        got = cls(unbatched, loss, [START], data).to_dense()
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


# -- Gauss-Newton with Levenberg-Marquardt damping against SciPy ---------------------------


def _levenberg_marquardt(model, t, y, theta, *, iterations=100, damping=1e-2):
    loss, data = MSELoss(reduction="sum"), [(t, y)]
    for _ in range(iterations):
        G = GGNLinearOperator(model, loss, [theta], data, check_deterministic=False)
        (gradient,), value = G.gradient_and_loss()
        if np.linalg.norm(gradient) < 1e-13:
            break
        step, info = cg(G, -gradient, damping=damping, rtol=1e-14, maxiter=50)
        candidate = theta + step
        if np.sum(_residuals(candidate, t, y) ** 2) < float(value):
            theta, damping = candidate, damping / 3.0
        else:
            damping *= 4.0
    return theta


def test_gauss_newton_reaches_the_scipy_least_squares_minimum():
    t, y = _data()
    theta = _levenberg_marquardt(exponential_model(), t, y, START.copy())
    reference = scipy.optimize.least_squares(
        _residuals,
        START,
        jac=lambda th, t, y: _fd_jacobian(th, t),
        args=(t, y),
        method="lm",
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
    )
    np.testing.assert_allclose(theta, reference.x, rtol=1e-7)
    cost = 0.5 * np.sum(_residuals(theta, t, y) ** 2)
    np.testing.assert_allclose(cost, reference.cost, rtol=1e-12)
    # the data are fitted: the parameters are near the ones that generated them
    np.testing.assert_allclose(theta, TRUE_THETA, rtol=0.1)


# -- verification at construction ----------------------------------------------------------


def test_verify_passes_for_correct_products():
    t, _ = _data(n=10)
    model = exponential_model(verify=True, verify_params=[START], verify_x=t)
    assert model.has_tier(Tier.SECOND_ORDER)


def _wrong_vjp(params, x, cotangents):
    (g,) = vjp(params, x, cotangents)
    return [g * np.array([1.0, 1.0, 1.0, -1.0])[:, None]]  # sign error in d/db2


def _wrong_second_order_vjp(params, x, u, tangents, w):
    (out,) = second_order_vjp(params, x, u, tangents, w)
    return [1.01 * out]


@pytest.mark.parametrize(
    "product, functions",
    [
        ("vjp", {"vjp": _wrong_vjp, "second_order_vjp": None}),
        ("second_order_vjp", {"second_order_vjp": _wrong_second_order_vjp}),
    ],
)
def test_verify_names_the_wrong_product(product, functions):
    from curvlinops.verify import VerificationError

    t, _ = _data(n=10)
    kwargs = {"jvp": jvp, "vjp": vjp, "second_order_vjp": second_order_vjp, **functions}
    with pytest.raises(VerificationError, match=rf"product\(s\) {product} failed") as info:
        CallableModel(forward, verify=True, verify_params=[START], verify_x=t, **kwargs)
    assert "[PASS] jvp" in str(info.value)


def test_verify_needs_a_point():
    with pytest.raises(ValueError, match="verify_params and verify_x"):
        CallableModel(forward, jvp, vjp, verify=True)


# -- tiers, shapes ----------------------------------------------------------------------------


def test_tiers_follow_the_functions_given():
    t, y = _data(n=5)
    first_order = CallableModel(forward, jvp, vjp)
    assert first_order.tiers == {Tier.FIRST_ORDER}
    with pytest.raises(MissingTierError, match="tier 2"):
        HessianLinearOperator(first_order, MSELoss(), [START], [(t, y)])


def test_layer_taps_are_passed_through():
    W = np.arange(6.0).reshape(2, 3)
    x = np.ones((4, 3))

    def taps(params, x, cotangents):
        return [LayerTap("linear", 0, None, x, cotangents)]

    model = CallableModel(
        lambda p, x: x @ p[0].T,
        lambda p, x, V: np.einsum("ni,oik->nok", x, V[0]),
        lambda p, x, U: [np.einsum("nok,ni->oik", U, x)],
        layer_taps=taps,
    )
    assert model.has_tier(Tier.LAYER_TAPS)
    (tap,) = model.linearize([W], x).layer_taps(np.ones((4, 2)))
    assert tap.output_grads.shape == (4, 2, 1)


def test_parameter_shapes_are_checked():
    t, y = _data(n=5)
    with pytest.raises(ValueError, match=r"shapes \[\(4,\)\]"):
        GGNLinearOperator(exponential_model(), MSELoss(), [np.ones(3)], [(t, y)])
    with pytest.raises(TypeError, match="function jvp"):
        CallableModel(forward, None, vjp)


def test_returned_counts_and_shapes_are_named():
    """A function returning the wrong number of arrays, or arrays of a wrong shape, is
    named with what it returned and what was expected, batched or not (instead of a
    bare zip or broadcasting error later, or a silently truncated gradient)."""
    t, _ = _data(n=5)
    theta = [np.asarray(TRUE_THETA)]
    V, U = [np.ones((4, 2))], np.ones((5, 1, 2))
    wrong = CallableModel(
        forward,
        lambda p, x, V: jvp(p, x, V)[:, :, :1],
        lambda p, x, U: [*vjp(p, x, U), np.zeros((1, 2))],
        second_order_vjp=lambda p, x, u, V, w: [second_order_vjp(p, x, u, V, w)[0][:3]],
    ).linearize(theta, t)
    assert_message(
        lambda: wrong.jvp(V),
        ValueError,
        "CallableModel: jvp returned an array of shape (5, 1, 1); J V must have the outputs' "
        "shape plus the K = 2 tangents, (5, 1, 2).",
    )
    assert_message(
        lambda: wrong.vjp(U),
        ValueError,
        "CallableModel: vjp returned 2 arrays for 1 parameter; return one per parameter, in "
        "the parameters' order.",
    )
    assert_message(
        lambda: wrong.second_order_vjp(np.ones((5, 1)), V, None),
        ValueError,
        "CallableModel: second_order_vjp returned an array of shape (3, 2) for parameter 0 of "
        "shape (4,); with K = 2 vectors it must have shape (4, 2).",
    )
    unbatched = CallableModel(
        forward,
        lambda p, x, v: jvp(p, x, [v[0][:, None]])[:, :, 0],
        lambda p, x, u: [vjp(p, x, u[..., None])[0][:2, 0]],
        batched=False,
        name="decay",
    ).linearize(theta, t)
    assert_message(
        lambda: unbatched.vjp(U),
        ValueError,
        "decay: vjp returned an array of shape (2, 2) for parameter 0 of shape (4,); with K = 2 "
        "vectors it must have shape (4, 2).",
    )
    np.testing.assert_allclose(unbatched.jvp(V), jvp(theta, t, V))  # the right ones pass
