"""The same MLP as curvlinops.nn, torch.nn and a JAX function gives the same curvature.

For one set of float64 weights, the exact curvature operators (Hessian, GGN, Fisher,
empirical Fisher, Jacobian) built on each frontend, over batches of different sizes,
are compared with dense references of the full-data loss (mean reduction over all
data) computed directly with ``torch.func`` and ``jax``, and with each other. The
protocol-level products of the torch and JAX frontends are compared with the native
model's.
"""

from __future__ import annotations

import numpy as np
import pytest
from frontends_mlp import BATCH_SIZES, flat, jax_mlp, mlp_problem, torch_mlp, unflat_torch

from curvlinops import (
    OUTPUTS,
    CrossEntropyLoss,
    EFLinearOperator,
    FisherLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    MSELoss,
    OutputsFunction,
    TraceableLinearMap,
    to_numpy,
)

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from curvlinops.frontends.jax import JaxModel  # noqa: E402
from curvlinops.frontends.torch import TorchModel  # noqa: E402

# torch loads its forward-mode decompositions with torch.jit.script on first use and warns
# about it; the warning is torch's own.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

LOSSES = ("cross_entropy", "mse")
FRONTENDS = ("native", "torch", "jax")
OPERATORS = {
    "hessian": HessianLinearOperator,
    "ggn": GGNLinearOperator,
    "fisher": FisherLinearOperator,
    "ef": EFLinearOperator,
    "jacobian": JacobianLinearOperator,
}


def assert_close(actual, expected, rtol=1e-10):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(np.abs(expected).max(), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def problem():
    return mlp_problem()


def _targets(problem, loss_name):
    return problem.y_class if loss_name == "cross_entropy" else problem.y_regression


def _loss(loss_name):
    return CrossEntropyLoss() if loss_name == "cross_entropy" else MSELoss()


# -- dense references from torch.func and jax on the whole data set ---------------------


@pytest.fixture(scope="module")
def torch_references(problem):
    """Dense Hessian, GGN, Fisher, EF and Jacobian of the full-data loss, from torch.func."""
    net = torch_mlp(problem.params)
    names = [n for n, _ in net.named_parameters()]
    shapes = [tuple(p.shape) for p in problem.params]
    theta0 = torch.from_numpy(flat(problem.params))
    X = torch.from_numpy(problem.X)
    n, c = X.shape[0], 3

    def outputs(theta, x=X):
        params = dict(zip(names, unflat_torch(theta, shapes), strict=True))
        return torch.func.functional_call(net, params, (x,))

    J = torch.func.jacrev(outputs)(theta0).reshape(n * c, -1)
    refs = {}
    for loss_name in LOSSES:
        y = torch.from_numpy(_targets(problem, loss_name))
        if loss_name == "cross_entropy":
            loss_of_f = lambda f, y=y: torch.nn.functional.cross_entropy(f, y)  # noqa: E731
            datum_loss = lambda f, t: torch.nn.functional.cross_entropy(  # noqa: E731
                f[None], t[None], reduction="sum"
            )
            scale = 1.0 / n
        else:
            loss_of_f = lambda f, y=y: torch.nn.functional.mse_loss(f, y)  # noqa: E731
            datum_loss = lambda f, t: torch.nn.functional.mse_loss(f, t, reduction="sum")  # noqa: E731
            scale = 1.0 / (n * c)
        f0 = outputs(theta0).detach()
        H_L = torch.func.hessian(loss_of_f)(f0).reshape(n * c, n * c)
        hessian = torch.func.hessian(lambda t, lf=loss_of_f: lf(outputs(t)))(theta0)
        ggn = J.T @ H_L @ J
        if loss_name == "cross_entropy":
            # Fisher by its definition: enumerate the classes, F_n = sum_c p_c g_c g_c^T.
            p = torch.softmax(f0, dim=1)
            g = p[:, None, :] - torch.eye(c, dtype=p.dtype)[None]  # (n, class, output)
            F_out = torch.einsum("nk,nki,nkj->nij", p, g, g)
            F_out = torch.block_diag(*F_out)
            fisher = scale * J.T @ F_out @ J
        else:
            fisher = ggn  # Gaussian with fixed variance: the Fisher is the GGN
        per_datum = torch.func.vmap(
            torch.func.grad(lambda t, x, yy, dl=datum_loss: dl(outputs(t, x[None])[0], yy)),
            in_dims=(None, 0, 0),
        )(theta0, X, y)
        ef = scale * per_datum.T @ per_datum
        refs[loss_name] = {
            "hessian": hessian.numpy(),
            "ggn": ggn.numpy(),
            "fisher": fisher.numpy(),
            "ef": ef.numpy(),
            "jacobian": J.numpy(),
        }
    return refs


@pytest.fixture(scope="module")
def jax_hessians(problem):
    """Dense Hessians of the full-data loss from jax.hessian."""
    shapes = [tuple(p.shape) for p in problem.params]
    X = jnp.asarray(problem.X)

    def unflat(theta):
        out, start = [], 0
        for s in shapes:
            size = int(np.prod(s))
            out.append(theta[start : start + size].reshape(s))
            start += size
        return out

    def loss(theta, loss_name):
        f = jax_mlp(unflat(theta), X)
        if loss_name == "cross_entropy":
            y = jnp.asarray(problem.y_class)
            logp = jax.nn.log_softmax(f, axis=1)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
        return jnp.mean((f - jnp.asarray(problem.y_regression)) ** 2)

    theta0 = jnp.asarray(flat(problem.params))
    return {
        name: np.asarray(jax.hessian(lambda t, name=name: loss(t, name))(theta0)) for name in LOSSES
    }


def test_references_agree(torch_references, jax_hessians):
    # The two independent dense routes agree, so each can serve as the reference.
    for name in LOSSES:
        assert_close(jax_hessians[name], torch_references[name]["hessian"])


# -- the operators of each frontend ------------------------------------------------------


def _model_params_and_convert(problem, frontend):
    if frontend == "native":
        return problem.native, [np.asarray(p) for p in problem.params], np.asarray
    if frontend == "torch":
        model = TorchModel(torch_mlp(problem.params))
        return model, model.params, torch.from_numpy
    model = JaxModel(jax_mlp, [jnp.asarray(p) for p in problem.params])
    return model, model.params, jnp.asarray


@pytest.fixture(scope="module")
def dense_operators(problem):
    """``{(frontend, loss, operator): dense matrix}`` from the curvature operators."""
    out = {}
    for frontend in FRONTENDS:
        model, params, convert = _model_params_and_convert(problem, frontend)
        for loss_name in LOSSES:
            data = problem.batches(_targets(problem, loss_name), convert)
            for op_name, cls in OPERATORS.items():
                op = cls(model, _loss(loss_name), params, data, check_deterministic=False)
                out[frontend, loss_name, op_name] = to_numpy(op.to_dense())
    return out


@pytest.mark.parametrize("op_name", list(OPERATORS))
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_operator_matches_dense_reference(
    dense_operators, torch_references, frontend, loss_name, op_name
):
    assert_close(
        dense_operators[frontend, loss_name, op_name], torch_references[loss_name][op_name]
    )


@pytest.mark.parametrize("op_name", list(OPERATORS))
@pytest.mark.parametrize("loss_name", LOSSES)
def test_frontends_agree_with_each_other(dense_operators, loss_name, op_name):
    native = dense_operators["native", loss_name, op_name]
    for frontend in ("torch", "jax"):
        assert_close(dense_operators[frontend, loss_name, op_name], native, rtol=1e-12)


def test_operators_return_the_frontend_arrays(problem):
    for frontend in ("torch", "jax"):
        model, params, convert = _model_params_and_convert(problem, frontend)
        data = problem.batches(problem.y_class, convert)
        G = GGNLinearOperator(model, CrossEntropyLoss(), params, data)
        v = convert(np.ones(G.shape[1]))
        result = G @ v
        assert type(result) is type(v)
        assert result.shape == v.shape
        assert sum(BATCH_SIZES) == G.num_data


# -- protocol-level products against the native model ------------------------------------


@pytest.fixture(scope="module")
def linearizations(problem):
    X = problem.X[: BATCH_SIZES[1]]
    lins = {"native": problem.native.linearize([np.asarray(p) for p in problem.params], X)}
    for frontend in ("torch", "jax"):
        model, params, convert = _model_params_and_convert(problem, frontend)
        lins[frontend] = model.linearize(params, convert(X))
    return lins


def _vectors(problem, k, seed):
    rng = np.random.default_rng(seed)
    V = [rng.standard_normal(tuple(p.shape) + (k,)) for p in problem.params]
    U = rng.standard_normal((BATCH_SIZES[1], 3, k))
    return V, U


def _to(frontend, a):
    return {"torch": torch.from_numpy, "jax": jnp.asarray}[frontend](np.asarray(a))


@pytest.mark.parametrize("frontend", ["torch", "jax"])
def test_protocol_products_match_native(problem, linearizations, frontend):
    native, lin = linearizations["native"], linearizations[frontend]
    V, U = _vectors(problem, 4, seed=1)
    conv = lambda a: _to(frontend, a)  # noqa: E731
    assert_close(to_numpy(lin.outputs), native.outputs, rtol=1e-13)
    assert_close(to_numpy(lin.jvp([conv(v) for v in V])), native.jvp(V))
    # single vectors (no K axis) go through the same path
    assert_close(
        to_numpy(lin.jvp([conv(v[..., 0]) for v in V])), native.jvp([v[..., 0] for v in V])
    )
    for got, want in zip(lin.vjp(conv(U)), native.vjp(U), strict=True):
        assert_close(to_numpy(got), want)
    for got, want in zip(lin.vjp(conv(U[..., 0])), native.vjp(U[..., 0]), strict=True):
        assert_close(to_numpy(got), want)


def _left_multiply(M, Jv):
    """``M`` applied to each datum's output vectors: ``(C, C) @ (N, C, K)``."""
    return M @ Jv


@pytest.mark.parametrize("frontend", ["torch", "jax"])
@pytest.mark.parametrize("w_kind", ["none", "array", "callable", "traceable", "symmetric"])
def test_second_order_vjp_matches_native(problem, linearizations, frontend, w_kind):
    """``callable`` is a black box (it goes through NumPy); ``traceable`` and
    ``symmetric`` are TraceableLinearMaps of the frontend's own arrays, which the
    frontends evaluate inside their compiled or transformed passes (PyTorch by double
    backward for the symmetric one)."""
    native, lin = linearizations["native"], linearizations[frontend]
    V, W = _vectors(problem, 3, seed=2)
    u = np.random.default_rng(3).standard_normal((BATCH_SIZES[1], 3))
    conv = lambda a: _to(frontend, a)  # noqa: E731
    M = np.random.default_rng(4).standard_normal((3, 3))
    M_sym = M + M.T
    native_w = {
        "none": None,
        "array": W,
        "callable": lambda Jv: M @ Jv,
        "traceable": lambda Jv: M @ Jv,
        "symmetric": lambda Jv: M_sym @ Jv,
    }
    frontend_w = {
        "none": None,
        "array": conv(W),
        "callable": lambda Jv: conv(M @ to_numpy(Jv)),
        "traceable": TraceableLinearMap(_left_multiply, operands=(conv(M),)),
        "symmetric": TraceableLinearMap(_left_multiply, operands=(conv(M_sym),), symmetric=True),
    }
    got = lin.second_order_vjp(conv(u), [conv(v) for v in V], frontend_w[w_kind])
    want = native.second_order_vjp(u, V, native_w[w_kind])
    for g, w in zip(got, want, strict=True):
        assert_close(to_numpy(g), w)


def test_torch_layer_taps_match_native(problem, linearizations):
    native, lin = linearizations["native"], linearizations["torch"]
    _, U = _vectors(problem, 5, seed=5)
    for cotangents in (U, None):
        got = lin.layer_taps(None if cotangents is None else torch.from_numpy(cotangents))
        want = native.layer_taps(cotangents)
        assert [(t.weight_index, t.bias_index) for t in got] == [
            (t.weight_index, t.bias_index) for t in want
        ]
        for g, w in zip(got, want, strict=True):
            assert_close(to_numpy(g.inputs), w.inputs, rtol=1e-13)
            if cotangents is None:
                assert g.output_grads is None
            else:
                assert_close(to_numpy(g.output_grads), w.output_grads)


# -- operators built on layer taps (tier 3) ------------------------------------------------


def test_torch_tap_based_diagonals_match_the_dense_references(problem, torch_references):
    from curvlinops import EFDiagonalLinearOperator, GGNDiagonalLinearOperator

    model, params, convert = _model_params_and_convert(problem, "torch")
    for loss_name in LOSSES:
        data = problem.batches(_targets(problem, loss_name), convert)
        refs = torch_references[loss_name]
        for cls, ref in ((GGNDiagonalLinearOperator, "ggn"), (EFDiagonalLinearOperator, "ef")):
            diagonal = cls(model, _loss(loss_name), params, data).diagonal()
            assert_close(to_numpy(diagonal), np.diag(refs[ref]))


def test_torch_kfac_matches_native_kfac(problem):
    kfac = pytest.importorskip("curvlinops.curvature.kfac")
    dense = {}
    for frontend in ("native", "torch"):
        model, params, convert = _model_params_and_convert(problem, frontend)
        data = problem.batches(problem.y_class, convert)
        op = kfac.KFACLinearOperator(model, CrossEntropyLoss(), params, data)
        dense[frontend] = to_numpy(op.to_dense())
    assert np.abs(dense["native"]).max() > 0
    assert_close(dense["torch"], dense["native"], rtol=1e-12)


def test_jax_model_refuses_tap_based_operators(problem):
    from curvlinops import GGNDiagonalLinearOperator, MissingTierError

    model, params, convert = _model_params_and_convert(problem, "jax")
    data = problem.batches(problem.y_class, convert)
    with pytest.raises(MissingTierError, match="tier 3"):
        GGNDiagonalLinearOperator(model, CrossEntropyLoss(), params, data)


def _scaled(c, f):
    return c * f


def _outputs_squared_times(f, Jv):
    """``diag(f^2)`` applied to each datum's output vectors (symmetric)."""
    return (f * f)[..., None] * Jv


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_second_order_vjp_from_outputs_placeholders(problem, linearizations, frontend):
    """``u = c f`` and ``A = diag(f^2)`` given through OUTPUTS (JAX computes them inside
    its compiled pass, the others from the linearization's outputs) equal the same
    product with the native outputs' arrays."""
    native, lin = linearizations["native"], linearizations[frontend]
    V, _ = _vectors(problem, 2, seed=5)
    f = native.outputs
    u = OutputsFunction(_scaled, operands=(0.7, OUTPUTS))
    A = TraceableLinearMap(_outputs_squared_times, operands=(OUTPUTS,), symmetric=True)
    tangents = V if frontend == "native" else [_to(frontend, v) for v in V]
    got = lin.second_order_vjp(u, tangents, A)
    want = native.second_order_vjp(0.7 * f, V, lambda Jv: (f * f)[..., None] * Jv)
    for g, w in zip(got, want, strict=True):
        assert_close(to_numpy(g), w)
