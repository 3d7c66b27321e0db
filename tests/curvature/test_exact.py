"""Exact curvature operators against dense references built another way.

References (tests/curvature/reference.py) use a NumPy forward pass, finite-difference
Jacobians, closed-form loss Hessians and the Fisher from its definition; the Hessian
also comes from second-order finite differences of the loss value and, where PyTorch
is installed, from ``torch.func.hessian``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st
from monte_carlo import assert_unbiased
from reference import (
    build_mlp,
    dense_references,
    fd_hessian,
    loss_value,
    make_targets,
    numpy_forward,
)

import curvlinops as cl
from curvlinops.models import flatten_params, unflatten_params

LOSSES = {
    "mse": cl.MSELoss,
    "ce": cl.CrossEntropyLoss,
    "bce": cl.BCEWithLogitsLoss,
    "poisson": cl.PoissonNLLLoss,
    "gaussian": cl.GaussianNLLLoss,
}
NATURAL = ["mse", "ce", "bce", "poisson"]


def problem(
    name,
    *,
    widths=(3, 4, 3),
    activation="tanh",
    N=7,
    seed=0,
    splits=(3,),
    reduction="mean",
    bias=True,
):
    """A small MLP problem in NumPy float64: model, params, batches, references."""
    rng = np.random.default_rng(seed)
    widths = list(widths)
    if name == "gaussian":
        widths[-1] = 2 * widths[-1]
    model, spec = build_mlp(widths, activation, bias=bias)
    import array_api_compat.numpy as xp

    params = model.init(seed, xp=xp, dtype=xp.float64)
    # Larger weights than the default init so curvature terms are not tiny.
    params = [1.5 * p for p in params]
    X = rng.normal(size=(N, widths[0]))
    y = make_targets(name, rng, N, widths[-1])
    bounds = [0, *splits, N]
    data = [(X[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    theta = flatten_params(params)
    return model, spec, params, data, X, y, theta, LOSSES[name](reduction=reduction)


@pytest.mark.parametrize("name", ["mse", "ce", "bce", "poisson", "gaussian"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ggn_fisher_ef_jacobian_against_dense_references(name, reduction):
    model, spec, params, data, X, y, theta, loss = problem(name, reduction=reduction)
    ref = dense_references(name, spec, theta, X, y, reduction)
    kwargs = dict(check_deterministic=True)
    G = cl.GGNLinearOperator(model, loss, params, data, **kwargs).to_dense()
    E = cl.EFLinearOperator(model, loss, params, data, **kwargs).to_dense()
    F = cl.FisherLinearOperator(model, loss, params, data, **kwargs).to_dense()
    J = cl.JacobianLinearOperator(model, loss, params, data, **kwargs)
    scale = np.abs(ref["G"]).max()
    np.testing.assert_allclose(E, ref["E"], rtol=1e-6, atol=1e-8 * np.abs(ref["E"]).max())
    np.testing.assert_allclose(F, ref["F"], rtol=1e-6, atol=1e-8 * np.abs(ref["F"]).max())
    np.testing.assert_allclose(J.to_dense(), ref["J"], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(G, ref["G"], rtol=1e-6, atol=1e-8 * scale)
    # The transposed Jacobian is the adjoint, and J^T H_L J rebuilt from it is the GGN.
    JT = cl.TransposedJacobianLinearOperator(model, loss, params, data)
    np.testing.assert_allclose(JT.to_dense(), ref["J"].T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(J.T.to_dense(), ref["J"].T, rtol=1e-6, atol=1e-8)
    # ... whose own adjoint is the Jacobian again, and whose rmatmat is J's matmat
    assert isinstance(JT.T, cl.JacobianLinearOperator)
    np.testing.assert_allclose(JT.T.to_dense(), ref["J"], rtol=1e-6, atol=1e-8)
    V = np.random.default_rng(1).normal(size=(JT.shape[0], 2))
    np.testing.assert_allclose(JT.rmatmat(V), ref["J"] @ V, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["mse", "ce", "poisson", "gaussian"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "softplus"])
def test_hessian_against_finite_differences(name, activation):
    model, spec, params, data, X, y, theta, loss = problem(name, activation=activation, seed=3)
    H = cl.HessianLinearOperator(model, loss, params, data).to_dense()
    H_fd = fd_hessian(name, spec, theta, X, y, "mean")
    np.testing.assert_allclose(H, H_fd, rtol=1e-4, atol=1e-6 * np.abs(H_fd).max())
    np.testing.assert_allclose(H, H.T, rtol=0, atol=1e-12 * np.abs(H).max())


def test_hessian_against_torch_func():
    torch = pytest.importorskip("torch")
    name = "ce"
    model, spec, params, data, X, y, theta, loss = problem(name, activation="sigmoid", seed=5)
    H = cl.HessianLinearOperator(model, loss, params, data).to_dense()

    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)

    def full_loss(t):
        # torch version of the NumPy forward: sigmoid MLP with the same flat layout
        a, start = Xt, 0
        for layer in spec:
            if layer[0] == "linear":
                _, d_in, d_out, bias = layer
                W = t[start : start + d_in * d_out].reshape(d_out, d_in)
                start += d_in * d_out
                a = a @ W.T
                if bias:
                    a = a + t[start : start + d_out]
                    start += d_out
            else:
                a = torch.sigmoid(a)
        return torch.nn.functional.cross_entropy(a, yt)

    H_torch = torch.func.hessian(full_loss)(torch.as_tensor(theta)).numpy()
    np.testing.assert_allclose(H, H_torch, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NATURAL)
def test_fisher_equals_ggn_for_natural_parameters(name):
    model, spec, params, data, X, y, theta, loss = problem(name, activation="tanh", seed=1)
    G = cl.GGNLinearOperator(model, loss, params, data).to_dense()
    F = cl.FisherLinearOperator(model, loss, params, data).to_dense()
    assert np.abs(G).max() > 1e-3  # not vacuous
    np.testing.assert_allclose(F, G, rtol=1e-9, atol=1e-12 * np.abs(G).max())


def test_fisher_differs_from_ggn_for_gaussian_with_learned_variance():
    model, spec, params, data, X, y, theta, loss = problem("gaussian", seed=2)
    G = cl.GGNLinearOperator(model, loss, params, data).to_dense()
    F = cl.FisherLinearOperator(model, loss, params, data).to_dense()
    rel = np.linalg.norm(F - G) / np.linalg.norm(F)
    assert rel > 0.05, rel
    # and the GGN of this non-convex loss is indefinite while the Fisher is PSD
    assert np.linalg.eigvalsh(F).min() > -1e-10 * np.abs(F).max()


@pytest.mark.parametrize("name", NATURAL + ["gaussian"])
def test_ggn_and_fisher_symmetric_psd_hessian_symmetric(name):
    model, spec, params, data, X, y, theta, loss = problem(name, activation="elu", seed=4)
    for Op in (cl.FisherLinearOperator, cl.EFLinearOperator) + (
        (cl.GGNLinearOperator,) if name != "gaussian" else ()
    ):
        A = Op(model, loss, params, data).to_dense()
        np.testing.assert_allclose(A, A.T, atol=1e-12 * np.abs(A).max())
        assert np.linalg.eigvalsh(A).min() >= -1e-10 * np.abs(A).max()
    H = cl.HessianLinearOperator(model, loss, params, data).to_dense()
    np.testing.assert_allclose(H, H.T, atol=1e-12 * np.abs(H).max())


def test_hessian_equals_ggn_for_linear_model_with_mse():
    model, spec, params, data, X, y, theta, loss = problem("mse", widths=(4, 3))
    H = cl.HessianLinearOperator(model, loss, params, data).to_dense()
    G = cl.GGNLinearOperator(model, loss, params, data).to_dense()
    np.testing.assert_allclose(H, G, rtol=1e-12, atol=1e-13)
    R = cl.GGNResidualLinearOperator(model, loss, params, data).to_dense()
    np.testing.assert_allclose(R, 0.0, atol=1e-13)


@pytest.mark.parametrize("activation", ["relu", "tanh", "identity"])
def test_hessian_is_ggn_plus_residual_and_residual_is_not_zero(activation):
    model, spec, params, data, X, y, theta, loss = problem("ce", activation=activation, seed=6)
    H = cl.HessianLinearOperator(model, loss, params, data).to_dense()
    G = cl.GGNLinearOperator(model, loss, params, data).to_dense()
    R = cl.GGNResidualLinearOperator(model, loss, params, data).to_dense()
    np.testing.assert_allclose(H, G + R, rtol=1e-10, atol=1e-12 * np.abs(H).max())
    # Even for ReLU and linear activations R has the bilinear cross terms of s = W a.
    assert np.abs(R).max() > 1e-3
    np.testing.assert_allclose(
        H, fd_hessian("ce", spec, theta, X, y, "mean"), rtol=1e-4, atol=1e-6 * np.abs(H).max()
    )


def test_two_layer_scalar_linear_network_residual_closed_form():
    """DESIGN.md: f = w2 w1 x with squared loss has H - G = [[0, r x], [r x, 0]]."""
    import array_api_compat.numpy as xp

    model = cl.nn.Sequential(cl.nn.Linear(1, 1, bias=False), cl.nn.Linear(1, 1, bias=False))
    w1, w2, x, t = 0.7, -1.3, 2.0, 0.4
    params = [xp.asarray([[w1]]), xp.asarray([[w2]])]
    data = [(np.array([[x]]), np.array([[t]]))]
    loss = cl.MSELoss(reduction="sum")  # (f - t)^2: dL/df = 2 r
    r = w2 * w1 * x - t
    R = cl.GGNResidualLinearOperator(model, loss, params, data).to_dense()
    np.testing.assert_allclose(R, [[0.0, 2 * r * x], [2 * r * x, 0.0]], rtol=1e-14)
    G = cl.GGNLinearOperator(model, loss, params, data).to_dense()
    Jrow = np.array([w2 * x, w1 * x])
    np.testing.assert_allclose(G, 2 * np.outer(Jrow, Jrow), rtol=1e-14)


def test_mc_fisher_converges_to_fisher_in_expectation():
    """200 independent MC Fishers (64 samples each) average to the exact Fisher; the
    check rejects them scaled by 0.9 or 1.1 (tests/monte_carlo.py)."""
    model, spec, params, data, X, y, theta, loss = problem("ce", widths=(3, 3), N=5, seed=7)
    F = cl.FisherLinearOperator(model, loss, params, data).to_dense()
    draws = [
        cl.FisherLinearOperator(
            model, loss, params, data, mc_samples=64, seed=s, check_deterministic=False
        ).to_dense()
        for s in range(200)
    ]
    assert_unbiased(draws, F)


def test_mc_fisher_is_reproducible_across_products():
    model, spec, params, data, X, y, theta, loss = problem("bce", seed=8)
    F = cl.FisherLinearOperator(model, loss, params, data, mc_samples=3, seed=11)
    v = np.random.default_rng(0).normal(size=F.shape[1])
    np.testing.assert_array_equal(F @ v, F @ v)
    F2 = cl.FisherLinearOperator(model, loss, params, data, mc_samples=3, seed=12)
    assert not np.allclose(F @ v, F2 @ v)


def test_matmat_equals_columnwise_matvecs_and_cache_gives_same_results():
    model, spec, params, data, X, y, theta, loss = problem("ce", seed=9)
    V = np.random.default_rng(1).normal(size=(theta.size, 5))
    for Op in (
        cl.GGNLinearOperator,
        cl.HessianLinearOperator,
        cl.FisherLinearOperator,
        cl.EFLinearOperator,
        cl.GGNResidualLinearOperator,
    ):
        A = Op(model, loss, params, data)
        A_cached = Op(model, loss, params, data, cache=True)
        cols = np.stack([A @ V[:, k] for k in range(V.shape[1])], axis=1)
        np.testing.assert_allclose(A @ V, cols, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(A_cached @ V, cols, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(A_cached @ V, cols, rtol=1e-12, atol=1e-14)


def test_products_linearize_every_batch_again_unless_cached(monkeypatch):
    """By default a product linearizes each batch anew (nothing kept between products,
    so memory stays at one batch); ``cache=True`` linearizes each batch once."""
    model, spec, params, data, X, y, theta, loss = problem("ce", seed=9)
    calls = []
    linearize = model.linearize
    monkeypatch.setattr(model, "linearize", lambda p, x: calls.append(1) or linearize(p, x))
    v = np.ones(theta.size)
    for kwargs, per_product in (({}, len(data)), ({"cache": True}, 0)):
        A = cl.GGNLinearOperator(model, loss, params, data, check_deterministic=False, **kwargs)
        assert A.cache is bool(kwargs)
        A @ v
        before = len(calls)
        A @ v
        assert len(calls) - before == per_product


def test_a_cached_gradient_needs_no_forward_pass_for_the_output_shape(monkeypatch):
    """The loss's normalization needs the outputs' shape: with ``cache=True`` the cached
    linearizations know it, so ``gradient_and_loss`` runs no plain forward pass."""
    model, spec, params, data, X, y, theta, loss = problem("ce", seed=9)
    forward = type(model).__call__
    calls = []
    monkeypatch.setattr(
        type(model), "__call__", lambda self, p, x: calls.append(1) or forward(self, p, x)
    )
    G = cl.GGNLinearOperator(model, loss, params, data, check_deterministic=False, cache=True)
    grads, _ = G.gradient_and_loss()
    assert calls == []
    uncached = cl.GGNLinearOperator(model, loss, params, data, check_deterministic=False)
    for a, b in zip(grads, uncached.gradient_and_loss()[0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13)


@given(
    splits=st.lists(st.integers(1, 10), min_size=0, max_size=3, unique=True),
    name=st.sampled_from(["mse", "ce", "bce"]),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 100),
)
def test_results_do_not_depend_on_batch_split(splits, name, reduction, seed):
    N = 11
    whole = problem(name, N=N, splits=(), reduction=reduction, seed=seed)
    split = problem(name, N=N, splits=tuple(sorted(splits)), reduction=reduction, seed=seed)
    model, _, params, data_whole, *_, theta, loss = whole
    data_split = split[3]
    V = np.random.default_rng(seed).normal(size=(theta.size, 2))
    for Op in (cl.GGNLinearOperator, cl.HessianLinearOperator, cl.EFLinearOperator):
        a = Op(model, loss, params, data_whole) @ V
        b = Op(model, loss, params, data_split) @ V
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(a).max())
    g_whole, l_whole = cl.GGNLinearOperator(model, loss, params, data_whole).gradient_and_loss()
    g_split, l_split = cl.GGNLinearOperator(model, loss, params, data_split).gradient_and_loss()
    np.testing.assert_allclose(float(l_whole), float(l_split), rtol=1e-12)
    np.testing.assert_allclose(
        flatten_params(g_whole), flatten_params(g_split), rtol=1e-10, atol=1e-13
    )


def test_gradient_and_loss_against_finite_differences():
    model, spec, params, data, X, y, theta, loss = problem("poisson", seed=10)
    grads, value = cl.GGNLinearOperator(model, loss, params, data).gradient_and_loss()
    L = lambda t: loss_value("poisson", numpy_forward(spec, t, X), y, "mean")  # noqa: E731
    np.testing.assert_allclose(float(value), L(theta), rtol=1e-13)
    h, P = 1e-6, theta.size
    fd = np.array([(L(theta + h * e) - L(theta - h * e)) / (2 * h) for e in np.eye(P)])
    np.testing.assert_allclose(flatten_params(grads), fd, rtol=1e-6, atol=1e-9)


class _ReparameterizedModel(cl.Model):
    """theta = A phi: the same network in linearly transformed parameters."""

    def __init__(self, base, shapes, A):
        self.base, self.shapes, self.A = base, shapes, A
        self.tiers = base.tiers - {cl.Tier.LAYER_TAPS}

    def _theta(self, params):
        return unflatten_params(self.A @ params[0], self.shapes)

    def __call__(self, params, x):
        return self.base(self._theta(params), x)

    def linearize(self, params, x):
        base_lin = self.base.linearize(self._theta(params), x)
        A, shapes = self.A, self.shapes

        class Lin(cl.Linearization):
            def _jvp(self, tangents):
                return base_lin._jvp(unflatten_params(A @ tangents[0], shapes))

            def _vjp(self, cotangents):
                return [A.T @ flatten_params(base_lin._vjp(cotangents), shapes)]

        return Lin(self, params, x, base_lin.outputs)


def test_natural_gradient_is_invariant_under_linear_reparameterization():
    # BCE: the per-datum Fisher has full rank, so F is invertible (softmax cross-entropy
    # would leave the shift of all logits in F's null space).
    model, spec, params, data, X, y, theta, loss = problem(
        "bce", widths=(3, 3, 2), N=20, seed=12, splits=(7, 13)
    )
    F = cl.FisherLinearOperator(model, loss, params, data)
    grads, _ = F.gradient_and_loss()
    g = flatten_params(grads)
    assert np.linalg.eigvalsh(F.to_dense()).min() > 1e-6
    step_theta, info = cl.cg(F, g, rtol=1e-12, maxiter=500)
    assert np.all(info.converged)

    rng = np.random.default_rng(3)
    A = rng.normal(size=(theta.size,) * 2) + 3 * np.eye(theta.size)
    phi = np.linalg.solve(A, theta)
    reparam = _ReparameterizedModel(model, [tuple(p.shape) for p in params], A)
    F_phi = cl.FisherLinearOperator(reparam, loss, [phi], data)
    g_phi = flatten_params(F_phi.gradient_and_loss()[0])
    np.testing.assert_allclose(g_phi, A.T @ g, rtol=1e-10, atol=1e-13)
    step_phi, info = cl.cg(F_phi, g_phi, rtol=1e-12, maxiter=2000)
    assert np.all(info.converged)
    # The plain gradient step is not invariant, the natural gradient step is.
    np.testing.assert_allclose(A @ step_phi, step_theta, rtol=1e-6, atol=1e-8)
    assert not np.allclose(A @ g_phi, g, rtol=1e-2)


def test_empirical_fisher_is_not_the_fisher_and_points_elsewhere():
    """Regression with labels far from the predictions: EF != F, and the preconditioned
    directions EF^{-1} g and F^{-1} g differ clearly."""
    import array_api_compat.numpy as xp

    model = cl.nn.Sequential(cl.nn.Linear(1, 1))
    params = [xp.asarray([[0.5]]), xp.asarray([0.0])]
    x = np.linspace(-1, 1, 9)[:, None]
    y = 0.5 * x + np.where(x > 0.5, 4.0, 0.0)  # labels far off for some inputs
    data = [(x, y)]
    loss = cl.MSELoss()
    F = cl.FisherLinearOperator(model, loss, params, data).to_dense()
    E = cl.EFLinearOperator(model, loss, params, data).to_dense()
    assert np.linalg.norm(F - E) > 0.5 * np.linalg.norm(F)
    g = flatten_params(cl.GGNLinearOperator(model, loss, params, data).gradient_and_loss()[0])
    nat, emp = np.linalg.solve(F, g), np.linalg.solve(E, g)
    cosine = nat @ emp / (np.linalg.norm(nat) * np.linalg.norm(emp))
    assert cosine < 0.9, cosine


def test_operators_on_every_backend(backend):
    """GGN, Hessian, Fisher, EF and J products on each backend equal NumPy float64."""
    name = "ce"
    model, spec, params, data, X, y, theta, loss = problem(name, seed=13)
    ref = dense_references(name, spec, theta, X, y, "mean")
    H_ref = fd_hessian(name, spec, theta, X, y, "mean")
    p_b = [backend.asarray(np.asarray(p)) for p in params]
    data_b = [(backend.asarray(a), backend.asarray(b)) for a, b in data]
    V = np.random.default_rng(0).normal(size=(theta.size, 3))
    V_b = backend.asarray(V)
    cases = [
        (cl.GGNLinearOperator, ref["G"], 1e-6),
        (cl.FisherLinearOperator, ref["F"], 1e-6),
        (cl.EFLinearOperator, ref["E"], 1e-6),
        (cl.HessianLinearOperator, H_ref, 1e-4),
    ]
    for Op, dense, rtol in cases:
        out = backend.to_numpy(Op(model, loss, p_b, data_b) @ V_b)
        np.testing.assert_allclose(out, dense @ V, rtol=rtol, atol=rtol * np.abs(dense).max())
    J = cl.JacobianLinearOperator(model, loss, p_b, data_b)
    np.testing.assert_allclose(backend.to_numpy(J @ V_b), ref["J"] @ V, rtol=1e-6, atol=1e-8)


def test_float32_products_match_float64():
    model, spec, params, data, X, y, theta, loss = problem("mse", seed=14)
    G64 = cl.GGNLinearOperator(model, loss, params, data)
    p32 = [np.asarray(p, dtype=np.float32) for p in params]
    d32 = [(a.astype(np.float32), b.astype(np.float32)) for a, b in data]
    G32 = cl.GGNLinearOperator(model, loss, p32, d32)
    v = np.random.default_rng(0).normal(size=theta.size)
    out = G32 @ v.astype(np.float32)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, G64 @ v, rtol=1e-4, atol=1e-5 * np.abs(G64 @ v).max())
    with pytest.raises(TypeError, match="float64"):
        G32 @ v


class _ShufflingLoader:
    def __init__(self, X, y):
        self.X, self.y, self.calls = X, y, 0

    def __iter__(self):
        self.calls += 1
        perm = np.random.default_rng(self.calls).permutation(len(self.X))
        yield self.X[perm[:4]], self.y[perm[:4]]
        yield self.X[perm[4:]], self.y[perm[4:]]


def test_bad_input_errors():
    model, spec, params, data, X, y, theta, loss = problem("ce", seed=15)
    with pytest.raises(cl.NonDeterministicDataError, match="same order"):
        cl.GGNLinearOperator(model, loss, params, _ShufflingLoader(X, y))
    with pytest.raises(TypeError, match="re-iterable"):
        cl.GGNLinearOperator(model, loss, params, (b for b in data))
    with pytest.raises(ValueError, match="shapes"):
        cl.GGNLinearOperator(model, loss, params[:-1], data)
    with pytest.raises(TypeError, match="list of arrays"):
        cl.GGNLinearOperator(model, loss, params[0], data)
    import array_api_strict

    bad = [(array_api_strict.asarray(a), array_api_strict.asarray(b)) for a, b in data]
    with pytest.raises(TypeError, match="numpy"):
        cl.GGNLinearOperator(model, loss, params, bad)
    with pytest.raises(ValueError, match="num_data"):
        cl.GGNLinearOperator(model, loss, params, data, num_data=0)
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="mc_samples must be a positive integer or None"):
            cl.FisherLinearOperator(model, loss, params, data, mc_samples=bad)
    with pytest.raises(ValueError):
        cl.GGNLinearOperator(model, loss, params, [(X[:3], y[:4])])


def test_num_data_and_progressbar():
    pytest.importorskip("tqdm")
    model, spec, params, data, X, y, theta, loss = problem("mse", seed=16)
    A = cl.GGNLinearOperator(model, loss, params, data, progressbar=True)
    B = cl.GGNLinearOperator(model, loss, params, data, num_data=X.shape[0])
    assert A.num_data == X.shape[0]
    v = np.ones(theta.size)
    np.testing.assert_allclose(A @ v, B @ v, rtol=1e-14)
    # a wrong num_data rescales the mean: the user's number is trusted and used
    C = cl.GGNLinearOperator(model, loss, params, data, num_data=2 * X.shape[0])
    np.testing.assert_allclose(C @ v, 0.5 * (B @ v), rtol=1e-14)


def test_pytorch_loss_objects_are_translated_with_their_reduction():
    torch = pytest.importorskip("torch")
    model, spec, params, data, X, y, theta, loss = problem("ce", seed=17, reduction="sum")
    ours = cl.GGNLinearOperator(model, loss, params, data).to_dense()
    theirs = cl.GGNLinearOperator(
        model, torch.nn.CrossEntropyLoss(reduction="sum"), params, data
    ).to_dense()
    np.testing.assert_allclose(theirs, ours, rtol=1e-14)
    D = cl.GGNDiagonalLinearOperator(
        model, torch.nn.CrossEntropyLoss(reduction="sum"), params, data
    )
    np.testing.assert_allclose(D.diagonal(), np.diag(ours), rtol=1e-11)
    with pytest.raises(TypeError):
        cl.GGNLinearOperator(model, "cross-entropy", params, data)


@given(
    widths=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    activation=st.sampled_from(["tanh", "sigmoid", "softplus", "elu", "relu"]),
    name=st.sampled_from(["mse", "ce", "bce", "poisson"]),
    reduction=st.sampled_from(["mean", "sum"]),
    N=st.integers(1, 6),
    split=st.integers(0, 6),
    seed=st.integers(0, 1000),
)
def test_random_architectures_against_independent_references(
    widths, activation, name, reduction, N, split, seed
):
    """Hypothesis draws the network, loss, reduction, batch split and seed; every operator
    is compared with a reference built another way (finite-difference Jacobians with
    closed-form output curvature; torch.func.hessian or finite differences)."""
    if name == "ce" and widths[-1] < 2:
        widths = [*widths[:-1], 2]
    splits = (split,) if 0 < split < N else ()
    model, spec, params, data, X, y, theta, loss = problem(
        name,
        widths=tuple(widths),
        activation=activation,
        N=N,
        seed=seed,
        splits=splits,
        reduction=reduction,
    )
    ref = dense_references(name, spec, theta, X, y, reduction)
    for Op, key in (
        (cl.GGNLinearOperator, "G"),
        (cl.FisherLinearOperator, "F"),
        (cl.EFLinearOperator, "E"),
    ):
        A = Op(model, loss, params, data).to_dense()
        scale = max(np.abs(ref[key]).max(), 1e-8)
        np.testing.assert_allclose(A, ref[key], rtol=1e-6, atol=1e-7 * scale)
    H = cl.HessianLinearOperator(model, loss, params, data).to_dense()
    try:
        from reference import torch_loss_hessian

        H_ref = torch_loss_hessian(name, spec, theta, X, y, reduction)
        rtol = 1e-9
    except ImportError:
        H_ref, rtol = fd_hessian(name, spec, theta, X, y, reduction), 1e-4
    np.testing.assert_allclose(H, H_ref, rtol=rtol, atol=rtol * max(np.abs(H_ref).max(), 1e-8))


def test_the_loss_hessian_function_is_shared_by_equal_losses():
    """One function object per loss configuration (so that JAX compiles it once per
    batch shape): equal losses share it, another reduction or loss type gets its own."""
    from curvlinops.curvature.exact import _scaled_loss_hessian

    first = _scaled_loss_hessian(cl.MSELoss())
    assert _scaled_loss_hessian(cl.MSELoss()) is first
    assert _scaled_loss_hessian(cl.MSELoss(reduction="sum")) is not first
    assert _scaled_loss_hessian(cl.CrossEntropyLoss()) is not first
