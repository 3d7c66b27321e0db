"""VOGN and noisy K-FAC: saved states, the torch and optax adapters, backends, dtypes, errors.

References: uninterrupted runs of the same optimizer on the same batches (bit for bit,
after ``numpy.savez`` / ``numpy.load(allow_pickle=False)`` or ``torch.save`` /
``torch.load(weights_only=True)``); the functional step on copies of the parameters;
the same network in the native layers on NumPy float64 arrays (for the adapters and
the other backends, in the noise-free limit ``weight_samples=0``, since every library
draws its own random numbers).
"""

from __future__ import annotations

import io

import array_api_compat.numpy as xp
import numpy as np
import pytest

import curvlinops as cl
import curvlinops.nn as cnn
from curvlinops.optim import VOGN, NoisyKFAC

HYPER = {
    "vogn": {"num_data": 96, "learning_rate": 0.2, "beta1": 0.9, "curvature": "mc"},
    "noisy_kfac": {
        "num_data": 96,
        "learning_rate": 0.2,
        "beta1": 0.5,
        "fisher_type": "mc",
        "inverse_every": 3,
        "precision_form": "factored",
    },
}
METHODS = {"vogn": VOGN, "noisy_kfac": NoisyKFAC}


def deterministic(name):
    """The hyperparameters without Monte-Carlo curvature (exact GGN / type-2 factors)."""
    return {k: v for k, v in HYPER[name].items() if k not in ("curvature", "fisher_type")}


def problem(seed=0, n=12, steps=7):
    model = cnn.Sequential(cnn.Linear(3, 4), cnn.Tanh(), cnn.Linear(4, 3))
    params = model.init(seed, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(seed)
    batches = [(rng.normal(size=(n, 3)), rng.integers(0, 3, size=n)) for _ in range(steps)]
    return model, params, batches


def npz(arrays):
    file = io.BytesIO()
    np.savez(file, **arrays)
    file.seek(0)
    return dict(np.load(file, allow_pickle=False))


def run(opt, params, state, batches):
    for batch in batches:
        params, state = opt.step(params, state, batch)
    return params, state


# -- saved states ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("samples", [0, 2])
def test_resuming_from_a_saved_state_continues_bit_identically(name, samples):
    model, params, batches = problem(1)
    loss = cl.CrossEntropyLoss()
    opt = METHODS[name](model, loss, weight_samples=samples, seed=3, **HYPER[name])
    straight, straight_state = run(opt, params, opt.init(params, batches[0]), batches)
    half, state = run(opt, params, opt.init(params, batches[0]), batches[:5])
    saved = npz(state.state_dict())
    assert all(v.dtype.kind != "O" for v in saved.values())  # nothing pickled
    resumed_params = [np.array(p) for p in half]
    fresh = METHODS[name](model, loss, weight_samples=samples, seed=3, **HYPER[name])
    resumed, resumed_state = run(
        fresh, resumed_params, fresh.load_state_dict(saved, resumed_params), batches[5:]
    )
    for a, b in zip(resumed, straight, strict=True):
        assert np.array_equal(a, b)
    for field in ("step", "loss", "estimates", "curvature_scale"):
        assert getattr(resumed_state, field) == getattr(straight_state, field), field
    assert np.array_equal(resumed_state.momentum, straight_state.momentum)
    q, r = opt.posterior(straight, straight_state), fresh.posterior(resumed, resumed_state)
    assert np.array_equal(q.precision.to_dense(), r.precision.to_dense())
    assert np.array_equal(q.sample(4, seed=1), r.sample(4, seed=1))
    if name == "noisy_kfac":
        # saved at step 5, after an update since the refresh at step 3: the posterior is
        # not the current factors' (restoring it from them would not do)
        current = opt.posterior(half, opt._refreshed(state, 6)).precision.to_dense()
        assert not np.allclose(current, opt.posterior(half, state).precision.to_dense())


def test_the_weight_noise_changes_the_run():
    model, params, batches = problem(2)
    a = VOGN(model, cl.CrossEntropyLoss(), num_data=96, learning_rate=0.2, seed=0)
    b = VOGN(model, cl.CrossEntropyLoss(), num_data=96, learning_rate=0.2, seed=1)
    pa, _ = run(a, params, a.init(params, batches[0]), batches[:2])
    pb, _ = run(b, params, b.init(params, batches[0]), batches[:2])
    pa2, _ = run(a, params, a.init(params, batches[0]), batches[:2])
    assert all(np.array_equal(u, v) for u, v in zip(pa, pa2, strict=True))  # reproducible
    assert not all(np.allclose(u, v) for u, v in zip(pa, pb, strict=True))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_load_state_dict_refuses_another_optimizers_state(name):
    model, params, batches = problem(3)
    loss = cl.CrossEntropyLoss()
    other = "vogn" if name == "noisy_kfac" else "noisy_kfac"
    opt, wrong = METHODS[name](model, loss, num_data=12), METHODS[other](model, loss, num_data=12)
    _, state = wrong.step(params, wrong.init(params, batches[0]), batches[0])
    with pytest.raises(ValueError, match="saved state is of"):
        opt.load_state_dict(state.state_dict(), params)


# -- the torch adapter -------------------------------------------------------------------


def torch_problem():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    net = net.double()
    X = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    return torch, net, X, y


@pytest.mark.parametrize("name", sorted(METHODS))
def test_torch_optimizer_takes_the_functional_steps(name):
    torch, net, X, y = torch_problem()
    from curvlinops.frontends.torch import TorchModel
    from curvlinops.optim.torch import TorchOptimizer

    hyper = {**HYPER[name], "num_data": 100, "weight_samples": 1}
    values = [p.detach().clone() for p in net.parameters()]
    opt = TorchOptimizer(net, torch.nn.CrossEntropyLoss(), name, **hyper)
    functional = METHODS[name](TorchModel(net), cl.CrossEntropyLoss(), **hyper)
    state = functional.init(values, (X, y))
    for _ in range(3):
        loss = opt.step(lambda: (X, y))
        values, state = functional.step(values, state, (X, y))
        assert loss == state.loss
        for p, v in zip(net.parameters(), values, strict=True):
            assert torch.equal(p.detach(), v)
    q, r = opt.posterior(), functional.posterior(values, state)
    assert torch.equal(q.precision.to_dense(), r.precision.to_dense())
    assert torch.equal(q.sample(2, seed=0), r.sample(2, seed=0))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_torch_optimizer_without_noise_equals_the_native_layers(name):
    torch, net, X, y = torch_problem()
    from curvlinops.optim.torch import TorchOptimizer

    hyper = {**deterministic(name), "num_data": 100, "weight_samples": 0}
    numpy_params = [p.detach().numpy().copy() for p in net.parameters()]
    opt = TorchOptimizer(net, torch.nn.CrossEntropyLoss(), name, **hyper)
    native = cnn.Sequential(cnn.Linear(3, 4), cnn.Tanh(), cnn.Linear(4, 3))
    numpy_opt = METHODS[name](native, cl.CrossEntropyLoss(), **hyper)
    batch = (X.numpy(), y.numpy())
    state = numpy_opt.init(numpy_params, batch)
    for _ in range(3):
        opt.step((X, y))
        numpy_params, state = numpy_opt.step(numpy_params, state, batch)
        for p, n in zip(net.parameters(), numpy_params, strict=True):
            np.testing.assert_allclose(p.detach().numpy(), n, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(
        opt.posterior().covariance.to_dense().numpy(),
        numpy_opt.posterior(numpy_params, state).covariance.to_dense(),
        rtol=1e-9,
        atol=1e-13,
    )


@pytest.mark.parametrize("name", sorted(METHODS))
def test_torch_optimizer_state_dict_resumes_bit_identically(name):
    torch, _, _, _ = torch_problem()
    from curvlinops.optim.torch import TorchOptimizer

    hyper = {**HYPER[name], "weight_samples": 1}
    torch.manual_seed(0)
    X = torch.randn(5, 16, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5, 16))

    def network():
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
        return net.double()

    def optimizer(net):
        return TorchOptimizer(net, torch.nn.CrossEntropyLoss(), name, **hyper)

    straight = network()
    opt = optimizer(straight)
    for k in range(5):
        opt.step((X[k], y[k]))
    net = network()
    opt = optimizer(net)
    for k in range(4):
        opt.step((X[k], y[k]))
    file = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, file)
    file.seek(0)
    saved = torch.load(file, weights_only=True)
    resumed = network()
    resumed.load_state_dict(saved["model"])
    opt = optimizer(resumed)
    opt.load_state_dict(saved["optimizer"])
    assert opt.method_state.step == 4
    opt.step((X[4], y[4]))
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


def test_torch_optimizer_posterior_errors():
    torch, net, X, y = torch_problem()
    from curvlinops.optim.torch import TorchOptimizer

    opt = TorchOptimizer(net, torch.nn.CrossEntropyLoss(), "vogn", num_data=20)
    with pytest.raises(ValueError, match="first step"):
        opt.posterior()
    kfac = TorchOptimizer(net, torch.nn.CrossEntropyLoss(), "kfac", damping=1.0)
    kfac.step((X, y))
    with pytest.raises(TypeError, match="no posterior"):
        kfac.posterior()


# -- the optax adapter ----------------------------------------------------------------


def jax_problem():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from curvlinops.frontends.jax import JaxModel, dense

    rng = np.random.default_rng(1)
    params = {
        "w1": jnp.asarray(rng.normal(size=(4, 3))),
        "b1": jnp.asarray(rng.normal(size=(4,))),
        "w2": jnp.asarray(rng.normal(size=(3, 4))),
    }

    def fn(p, x):
        return dense(jnp.tanh(dense(x, p["w1"], p["b1"])), p["w2"])

    model = JaxModel(fn, params, layer_taps=True)
    X = jnp.asarray(rng.normal(size=(16, 3)))
    y = jnp.asarray(rng.integers(0, 3, size=16))
    return jax, model, params, (X, y)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_optax_pair_takes_the_functional_steps(name):
    jax, model, params, batch = jax_problem()
    from curvlinops.optim.optax import as_gradient_transformation, variational_posterior

    hyper = {**HYPER[name], "weight_samples": 1}
    method = METHODS[name](model, cl.CrossEntropyLoss(), **hyper)
    tx = as_gradient_transformation(method)
    functional = METHODS[name](model, cl.CrossEntropyLoss(), **hyper)
    values = model.flatten(params)
    state, tx_state = functional.init(values, batch), tx.init(params)
    with pytest.raises(ValueError, match="first update"):
        variational_posterior(method, tx_state, params)
    for _ in range(3):
        updates, tx_state = tx.update(None, tx_state, params, batch=batch)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        values, state = functional.step(values, state, batch)
        for got, expected in zip(model.flatten(params), values, strict=True):
            np.testing.assert_allclose(
                np.asarray(got), np.asarray(expected), rtol=1e-12, atol=1e-14
            )
    q = variational_posterior(method, tx_state, params)
    r = functional.posterior(values, state)
    np.testing.assert_allclose(
        np.asarray(q.precision.to_dense()), np.asarray(r.precision.to_dense()), rtol=1e-12
    )


# -- backends and dtypes ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_steps_on_every_backend_equal_numpy(backend, name):
    model, params, batches = problem(4, steps=3)
    # no random numbers (each library draws its own): no weight noise, exact curvature
    hyper = {**deterministic(name), "weight_samples": 0}
    reference = METHODS[name](model, cl.CrossEntropyLoss(), **hyper)
    ref_params, ref_state = run(reference, params, reference.init(params, batches[0]), batches)
    p = [backend.asarray(a) for a in params]
    data = [(backend.asarray(X), backend.asarray(y)) for X, y in batches]
    opt = METHODS[name](model, cl.CrossEntropyLoss(), **hyper)
    p, state = run(opt, p, opt.init(p, data[0]), data)
    for got, expected in zip(p, ref_params, strict=True):
        np.testing.assert_allclose(backend.to_numpy(got), expected, rtol=1e-9, atol=1e-11)
    q = opt.posterior(p, state)
    np.testing.assert_allclose(
        backend.to_numpy(q.covariance.to_dense()),
        reference.posterior(ref_params, ref_state).covariance.to_dense(),
        rtol=1e-9,
        atol=1e-13,
    )
    # with weight noise: the draws are on the backend's device (array-api-strict checks)
    noisy = METHODS[name](model, cl.CrossEntropyLoss(), **{**hyper, "weight_samples": 2})
    p2, state2 = run(noisy, p, noisy.init(p, data[0]), data)
    draws = noisy.posterior(p2, state2).sample(3, seed=0)
    assert tuple(draws.shape) == (sum(a.size for a in params), 3)
    assert np.all(np.isfinite(backend.to_numpy(draws)))
    assert np.isfinite(noisy.elbo(noisy.posterior(p2, state2), data[:1], num_samples=2))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_float32_follows_float64(name, dtype_name):
    model, params, batches = problem(5, steps=4)
    hyper = {**deterministic(name), "weight_samples": 0}
    reference = METHODS[name](model, cl.CrossEntropyLoss(), **hyper)
    ref_params, _ = run(reference, params, reference.init(params, batches[0]), batches)
    dtype = getattr(np, dtype_name)
    p = [a.astype(dtype) for a in params]
    data = [(X.astype(dtype), y) for X, y in batches]
    opt = METHODS[name](model, cl.CrossEntropyLoss(), **hyper)
    p, state = run(opt, p, opt.init(p, data[0]), data)
    q = opt.posterior(p, state)
    assert all(a.dtype == dtype for a in p) and q.sample(2, seed=0).dtype == dtype
    assert q.precision.dtype == dtype
    rtol = 1e-4 if dtype_name == "float32" else 1e-12
    for got, expected in zip(p, ref_params, strict=True):
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)


# -- bad inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_data": 0}, "num_data must be an integer >= 1"),
        ({"num_data": True}, "num_data must be an integer"),
        ({"num_data": 10.5}, "num_data must be an integer"),
        ({"learning_rate": 0.0}, "learning_rate must be a finite number > 0"),
        ({"prior_precision": 0.0}, "prior_precision must be a finite number > 0"),
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        ({"beta2": -0.1}, r"beta2 must be in \[0, 1\)"),
        ({"weight_samples": -1}, "weight_samples must be an integer >= 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
        ({"damping": -1.0}, "damping must be a finite number >= 0"),
    ],
)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_bad_hyperparameters(name, kwargs, match):
    model, _, _ = problem(6)
    with pytest.raises(ValueError, match=match):
        METHODS[name](model, cl.CrossEntropyLoss(), **{"num_data": 10, **kwargs})


def test_bad_options():
    model, params, batches = problem(7)
    loss = cl.CrossEntropyLoss()
    with pytest.raises(ValueError, match="curvature must be one of"):
        VOGN(model, loss, num_data=10, curvature="hessian")
    with pytest.raises(ValueError, match="fisher_type must be one of"):
        NoisyKFAC(model, loss, num_data=10, fisher_type="forward-only")
    with pytest.raises(ValueError, match="precision_form must be one of"):
        NoisyKFAC(model, loss, num_data=10, precision_form="dense")
    with pytest.raises(ValueError, match="inverse_every must be a positive integer"):
        NoisyKFAC(model, loss, num_data=10, inverse_every=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        VOGN(model, loss, num_data=10, seed="a")
    with pytest.raises(TypeError, match="num_data"):
        VOGN(model, loss)  # num_data is required: the data set's size


def test_bad_calls():
    model, params, batches = problem(8)
    loss = cl.CrossEntropyLoss()
    opt = VOGN(model, loss, num_data=12)
    state = opt.init(params, batches[0])
    with pytest.raises(TypeError, match="A batch must be a pair"):
        opt.step(params, state, batches[0][0])
    kfac_state = NoisyKFAC(model, loss, num_data=12).init(params, batches[0])
    with pytest.raises(TypeError, match="VOGN needs a VOGNState .* got a NoisyKFACState"):
        opt.step(params, kfac_state, batches[0])
    with pytest.raises(TypeError, match="VOGN needs a VOGNState"):
        opt.posterior(params, kfac_state)
    with pytest.raises(ValueError, match="expects 4 parameter arrays of shapes"):
        opt.step(params[:2] + [params[3], params[2]], state, batches[0])
    other = [np.zeros((2, 3)), np.zeros(2)]
    with pytest.raises(ValueError, match="pass the parameters of this state"):
        opt.posterior(other, state)
    q = opt.posterior(params, state)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        q.sample(0, seed=0)
    with pytest.raises(TypeError, match="explicit seed"):
        q.sample(1, seed=None)
    with pytest.raises(ValueError, match="at least one batch"):
        opt.elbo(q, [], num_samples=2)
    with pytest.raises(ValueError, match="class indices"):
        opt.step(params, state, (batches[0][0], batches[0][1] + 5))


def test_a_posterior_that_is_not_positive_definite_is_refused():
    model, params, batches = problem(9)
    opt = NoisyKFAC(model, cl.MSELoss(), num_data=12, prior_precision=1e-300)
    X = batches[0][0][:1]  # one datum: the factors are singular
    with pytest.raises(cl.IllConditionedError, match="raise prior_precision or damping") as err:
        opt.init(params, (X, np.zeros((1, 3))))
    # the suggested tau * prior_precision + damping suffices
    suggested = err.value.suggested_damping
    enough = NoisyKFAC(model, cl.MSELoss(), num_data=12, prior_precision=1e-300, damping=suggested)
    q = enough.posterior(params, enough.init(params, (X, np.zeros((1, 3)))))
    assert np.all(np.isfinite(q.covariance.to_dense()))
