"""JaxModel: pytree parameters, compilation per shape, impure functions, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from frontends_mlp import flat, jax_mlp, mlp_problem

from curvlinops import (
    CrossEntropyLoss,
    GGNLinearOperator,
    HessianLinearOperator,
    MissingTierError,
    MSELoss,
    NonDeterministicDataError,
    Tier,
    to_numpy,
)

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from curvlinops.frontends.jax import JaxModel  # noqa: E402


@pytest.fixture(scope="module")
def problem():
    return mlp_problem()


def _dict_mlp(p, x):
    h = jnp.tanh(x @ p["hidden"]["w"].T + p["hidden"]["b"])
    return h @ p["out"]["w"].T


def _dict_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "out": {"w": jnp.asarray(rng.standard_normal((3, 4)))},
        "hidden": {
            "w": jnp.asarray(rng.standard_normal((4, 5))),
            "b": jnp.asarray(rng.standard_normal(4)),
        },
    }


def test_pytree_parameters_are_flattened_in_tree_leaves_order(problem):
    tree = _dict_params()
    model = JaxModel(_dict_mlp, tree)
    leaves = jax.tree_util.tree_leaves(tree)
    assert [tuple(p.shape) for p in model.params] == [(4,), (4, 5), (3, 4)]  # sorted keys
    assert all(a is b for a, b in zip(model.params, leaves, strict=True))
    assert model.flatten(tree) == model.params
    rebuilt = model.unflatten(model.params)
    assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(tree)
    with pytest.raises(ValueError, match="pytree of structure"):
        model.flatten([1.0, 2.0])
    assert model.expected_param_shapes() == [(4,), (4, 5), (3, 4)]

    # The Hessian over the flat list is the jax.hessian of the loss of the pytree.
    X = jnp.asarray(problem.X)
    y = jnp.asarray(problem.y_regression)
    H = HessianLinearOperator(model, MSELoss(reduction="sum"), model.params, [(X, y)])

    def loss(theta):
        parts, start = [], 0
        for p in leaves:
            parts.append(theta[start : start + p.size].reshape(p.shape))
            start += p.size
        tree_theta = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), parts)
        return jnp.sum((_dict_mlp(tree_theta, X) - y) ** 2)

    reference = jax.hessian(loss)(jnp.asarray(flat(leaves)))
    np.testing.assert_allclose(
        to_numpy(H.to_dense()), np.asarray(reference), rtol=1e-10, atol=1e-10
    )


def test_plain_list_without_example_params(problem):
    model = JaxModel(jax_mlp)
    assert model.expected_param_shapes() is None
    with pytest.raises(ValueError, match="created without params"):
        _ = model.params
    params = [jnp.asarray(p) for p in problem.params]
    out = model(params, jnp.asarray(problem.X))
    np.testing.assert_allclose(to_numpy(out), problem.native(problem.params, problem.X), 1e-12)


def test_one_compilation_per_batch_shape(problem):
    traces = []

    def counted(p, x):
        traces.append(x.shape)  # runs only while JAX traces the function
        return jax_mlp(p, x)

    model = JaxModel(counted, [jnp.asarray(p) for p in problem.params])
    X = jnp.asarray(problem.X)
    for _ in range(3):
        for n in (4, 6):
            lin = model.linearize(model.params, X[:n])
            lin.vjp(jnp.ones((n, 3)))
            lin.jvp(model.params)
    assert traces == [(4, 5), (6, 5)]  # one trace of the linearization per shape
    # A new model of the same function and structure reuses the compiled functions.
    again = JaxModel(counted, [jnp.asarray(p) for p in problem.params])
    again.linearize(again.params, X[:4])
    assert len(traces) == 2


def _global_scale_fn():
    state = {"scale": 1.0}

    def scaled(p, x):
        return state["scale"] * (x @ p[0].T)  # reads a value from outside: not pure

    return scaled, state


def test_impure_function_under_jit_keeps_the_traced_value():
    scaled, state = _global_scale_fn()
    model = JaxModel(scaled, [jnp.ones((2, 3))])
    x4, x5 = jnp.ones((4, 3)), jnp.ones((5, 3))
    assert float(model(model.params, x4)[0, 0]) == 3.0
    state["scale"] = 2.0
    # Documented: the value read at tracing time is frozen for this shape ...
    assert float(model(model.params, x4)[0, 0]) == 3.0
    assert float(model.linearize(model.params, x4).outputs[0, 0]) == 6.0  # new function traced
    # ... and a new shape traces again, reading the new value.
    assert float(model(model.params, x5)[0, 0]) == 6.0


def test_impure_function_without_jit_reads_the_value_at_every_call():
    scaled, state = _global_scale_fn()
    model = JaxModel(scaled, [jnp.ones((2, 3))], jit=False)
    x = jnp.ones((4, 3))
    assert float(model(model.params, x)[0, 0]) == 3.0
    state["scale"] = 2.0
    assert float(model(model.params, x)[0, 0]) == 6.0
    lin = model.linearize(model.params, x)
    np.testing.assert_allclose(to_numpy(lin.jvp([jnp.ones((2, 3))])), 6.0 * np.ones((4, 2)))


class _NoisyData:
    """A data set that adds fresh noise on every pass (random augmentation)."""

    def __init__(self, X, y):
        self.X, self.y, self.passes = X, y, 0

    def __iter__(self):
        self.passes += 1
        noise = jax.random.normal(jax.random.key(self.passes), self.X.shape)
        yield self.X + 0.01 * noise, self.y


def test_randomness_through_the_data_is_caught_by_the_determinism_check(problem):
    model = JaxModel(jax_mlp, [jnp.asarray(p) for p in problem.params])
    data = _NoisyData(jnp.asarray(problem.X), jnp.asarray(problem.y_class))
    with pytest.raises(NonDeterministicDataError, match="inputs X"):
        GGNLinearOperator(model, CrossEntropyLoss(), model.params, data)


def test_no_layer_taps(problem):
    model = JaxModel(jax_mlp, [jnp.asarray(p) for p in problem.params])
    assert not model.has_tier(Tier.LAYER_TAPS)
    lin = model.linearize(model.params, jnp.asarray(problem.X))
    with pytest.raises(MissingTierError, match="tier 3"):
        lin.layer_taps(jnp.ones((problem.X.shape[0], 3, 1)))


def test_non_jax_arrays_are_refused(problem):
    model = JaxModel(jax_mlp, [jnp.asarray(p) for p in problem.params])
    with pytest.raises(TypeError, match="jax.numpy.asarray"):
        model.linearize(model.params, problem.X)
    with pytest.raises(TypeError, match="f\\(params, x\\)"):
        JaxModel("not a function")


def test_float32_parameters_give_float32_products(problem):
    params = [jnp.asarray(p, dtype=jnp.float32) for p in problem.params]
    model = JaxModel(jax_mlp, params)
    X = jnp.asarray(problem.X, dtype=jnp.float32)
    G = GGNLinearOperator(model, CrossEntropyLoss(), params, [(X, jnp.asarray(problem.y_class))])
    result = G @ jnp.ones(G.shape[1], dtype=jnp.float32)
    assert result.dtype == jnp.float32
    data64 = [(problem.X, problem.y_class)]
    expected = GGNLinearOperator(problem.native, CrossEntropyLoss(), problem.params, data64)
    np.testing.assert_allclose(
        to_numpy(result), expected @ np.ones(G.shape[1]), rtol=2e-4, atol=2e-5
    )


def _counted_marked_mlp():
    """A fresh two-layer function with marked layers (so that no compiled function of an
    earlier test is reused) and the list of input shapes it was traced with."""
    from curvlinops.frontends.jax import dense

    traces = []

    def marked(p, x):
        traces.append(tuple(x.shape))  # runs only while JAX traces the function
        return dense(jnp.tanh(dense(x, p[0], p[1])), p[2], p[3])

    return marked, traces


def _marked_problem(marked):
    rng = np.random.default_rng(7)
    shapes = [(4, 5), (4,), (3, 4), (3,)]
    params = [jnp.asarray(rng.standard_normal(s)) for s in shapes]
    X = jnp.asarray(rng.standard_normal((10, 5)))
    y = jnp.asarray(rng.integers(0, 3, size=10))
    data = [(X[:4], y[:4]), (X[4:], y[4:])]  # two batch shapes: 4 and 6
    return JaxModel(marked, params, layer_taps=True), params, data


def _products(op):
    P = op.shape[1]
    for _ in range(2):
        op @ jnp.ones(P)
        op @ jnp.ones((P, 2))


_PRODUCT_OPERATORS = {
    "GGN": lambda m, p, d: GGNLinearOperator(m, CrossEntropyLoss(), p, d),
    "GGN cached": lambda m, p, d: GGNLinearOperator(m, CrossEntropyLoss(), p, d, cache=True),
    "Hessian": lambda m, p, d: HessianLinearOperator(m, CrossEntropyLoss(), p, d),
    "EF": lambda m, p, d: _exact("EFLinearOperator", m, p, d),
    "Fisher": lambda m, p, d: _exact("FisherLinearOperator", m, p, d),
}


def _exact(name, model, params, data):
    import curvlinops

    return getattr(curvlinops, name)(model, CrossEntropyLoss(), params, data)


@pytest.mark.parametrize("name", list(_PRODUCT_OPERATORS))
def test_products_over_an_iterable_compile_once_per_batch_shape(name):
    marked, traces = _counted_marked_mlp()
    model, params, data = _marked_problem(marked)
    op = _PRODUCT_OPERATORS[name](model, params, data)
    _products(op)  # matvecs and matmats over both batches
    first = list(traces)
    _products(op)
    _products(_PRODUCT_OPERATORS[name](model, params, data))  # a new operator too
    assert traces == first  # no call after the first of each kind traces again
    assert set(first) == {(4, 5), (6, 5)}
    # per shape at most: forward, linearization, second order for 1 and for 2 columns
    assert max(first.count((4, 5)), first.count((6, 5))) <= 4, first


_DATA_OPERATORS = {
    "K-FAC type-2": lambda m, p, d: _kfac("KFACLinearOperator", m, p, d),
    "K-FAC mc": lambda m, p, d: _kfac("KFACLinearOperator", m, p, d, fisher_type="mc"),
    "K-FAC empirical": lambda m, p, d: _kfac(
        "KFACLinearOperator", m, p, d, fisher_type="empirical"
    ),
    "EKFAC": lambda m, p, d: _kfac("EKFACLinearOperator", m, p, d),
    "GGN diagonal": lambda m, p, d: _kfac("GGNDiagonalLinearOperator", m, p, d),
    "EF diagonal": lambda m, p, d: _kfac("EFDiagonalLinearOperator", m, p, d),
}


def _kfac(name, model, params, data, **kwargs):
    import curvlinops
    from curvlinops.curvature.ekfac import EKFACLinearOperator

    cls = EKFACLinearOperator if name == "EKFACLinearOperator" else getattr(curvlinops, name)
    return cls(model, CrossEntropyLoss(), params, data, **kwargs)


@pytest.mark.parametrize("name", list(_DATA_OPERATORS))
def test_statistics_over_an_iterable_compile_once_per_batch_shape(name):
    marked, traces = _counted_marked_mlp()
    model, params, data = _marked_problem(marked)
    op = _DATA_OPERATORS[name](model, params, data)
    first = list(traces)
    _DATA_OPERATORS[name](model, params, data)  # the same passes again: nothing traced
    if hasattr(op, "update"):  # an update of the same batch shape neither
        op.update(data[0], decay=0.5)
        op.update(data[1], decay=0.5)
    assert traces == first
    assert set(first) == {(4, 5), (6, 5)}
    # per shape at most: forward, linearization, the taps' discovery and taps
    assert max(first.count((4, 5)), first.count((6, 5))) <= 4, first


def _times_weights(w, v):
    return w[..., None] * v


def test_gauss_newton_vjp_in_one_compiled_call_against_jacobians(problem):
    """``J^T A J v`` from the fused compiled call equals the explicit Jacobians' product
    and the unfused route (a plain callable)."""
    from curvlinops.models import TraceableLinearMap

    model = JaxModel(jax_mlp, [jnp.asarray(p) for p in problem.params])
    X = jnp.asarray(problem.X[:4])
    lin = model.linearize(model.params, X)
    rng = np.random.default_rng(3)
    weights = jnp.asarray(rng.uniform(0.5, 2.0, size=lin.outputs.shape))
    V = [jnp.asarray(rng.standard_normal((*p.shape, 2))) for p in model.params]
    fused = lin.gauss_newton_vjp(V, TraceableLinearMap(_times_weights, operands=(weights,)))
    unfused = lin.gauss_newton_vjp(V, lambda v: _times_weights(weights, v))
    theta = jnp.asarray(flat(model.params))
    sizes = [p.size for p in model.params]

    def f(t):
        parts = jnp.split(t, np.cumsum(sizes)[:-1])
        return jax_mlp(
            [q.reshape(p.shape) for q, p in zip(parts, model.params, strict=True)], X
        ).reshape(-1)

    J = np.asarray(jax.jacobian(f)(theta))
    Vflat = np.concatenate([np.asarray(v).reshape(-1, 2) for v in V])
    expected = J.T @ (np.asarray(weights).reshape(-1, 1) * (J @ Vflat))
    for result in (fused, unfused):
        got = np.concatenate([np.asarray(g).reshape(-1, 2) for g in result])
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
