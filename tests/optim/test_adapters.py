"""The torch.optim and optax-style adapters take the functional optimizers' steps.

References: the functional step (tested against dense matrices in test_optim.py) on
copies of the parameters, for the torch adapter also the same network written with
the native layers on NumPy arrays; the optax pair against the functional step on the
JAX pytree's leaves.
"""

from __future__ import annotations

import numpy as np
import pytest

import curvlinops as cl
import curvlinops.nn as cnn
from curvlinops.optim import KFAC, HessianFree, NaturalGradient

HYPER = {
    "kfac": {"damping": 0.1, "inverse_every": 1, "damping_every": 1},
    "hessian_free": {"damping": 0.5, "max_iterations": 20},
    "natural_gradient": {"damping": 0.1, "learning_rate": 0.5},
}
METHODS = {"kfac": KFAC, "hessian_free": HessianFree, "natural_gradient": NaturalGradient}


def init_state(opt, params, batch):
    return opt.init(params, batch) if isinstance(opt, KFAC) else opt.init(params)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_torch_optimizer_takes_the_functional_steps(method):
    torch = pytest.importorskip("torch")
    from curvlinops.frontends.torch import TorchModel
    from curvlinops.optim.torch import TorchOptimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    net = net.double()
    X = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    values = [p.detach().clone() for p in net.parameters()]
    opt = TorchOptimizer(net, torch.nn.CrossEntropyLoss(), method, **HYPER[method])
    functional = METHODS[method](TorchModel(net), cl.CrossEntropyLoss(), **HYPER[method])
    state = init_state(functional, values, (X, y))
    # the same network in native layers on NumPy: an independent model implementation
    native = cnn.Sequential(cnn.Linear(3, 4), cnn.Tanh(), cnn.Linear(4, 3))
    numpy_params = [v.numpy().copy() for v in values]
    numpy_opt = METHODS[method](native, cl.CrossEntropyLoss(), **HYPER[method])
    numpy_batch = (X.numpy(), y.numpy())
    numpy_state = init_state(numpy_opt, numpy_params, numpy_batch)
    for _ in range(3):
        loss = opt.step(lambda: (X, y))
        values, state = functional.step(values, state, (X, y))
        numpy_params, numpy_state = numpy_opt.step(numpy_params, numpy_state, numpy_batch)
        assert loss == state.loss
        for p, v, n in zip(net.parameters(), values, numpy_params, strict=True):
            assert torch.equal(p.detach(), v)
            np.testing.assert_allclose(p.detach().numpy(), n, rtol=1e-9, atol=1e-11)


def jax_problem(taps):
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

    model = JaxModel(fn, params, layer_taps=taps)
    X = jnp.asarray(rng.normal(size=(16, 3)))
    y = jnp.asarray(rng.integers(0, 3, size=16))
    return jax, model, params, (X, y)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_optax_pair_takes_the_functional_steps(method):
    jax, model, params, batch = jax_problem(taps=True)
    from curvlinops.optim.optax import as_gradient_transformation

    tx = as_gradient_transformation(METHODS[method](model, cl.CrossEntropyLoss(), **HYPER[method]))
    functional = METHODS[method](model, cl.CrossEntropyLoss(), **HYPER[method])
    values = model.flatten(params)
    state, tx_state = init_state(functional, values, batch), tx.init(params)
    for _ in range(3):
        grads = jax.grad(lambda p: 0.0 * p["w1"].sum())(params)  # ignored by the method
        updates, tx_state = tx.update(grads, tx_state, params, batch=batch)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        values, state = functional.step(values, state, batch)
        for got, expected in zip(model.flatten(params), values, strict=True):
            np.testing.assert_allclose(
                np.asarray(got), np.asarray(expected), rtol=1e-12, atol=1e-14
            )
    assert isinstance(updates, dict) and sorted(updates) == ["b1", "w1", "w2"]


def test_functional_step_on_jax_equals_numpy():
    _, model, params, batch = jax_problem(taps=True)
    opt = KFAC(model, cl.CrossEntropyLoss(), **HYPER["kfac"])
    values = model.flatten(params)
    native = cnn.Sequential(cnn.Linear(3, 4), cnn.Tanh(), cnn.Linear(4, 3, bias=False))
    np_params = [np.asarray(params["w1"]), np.asarray(params["b1"]), np.asarray(params["w2"])]
    # JaxModel orders leaves by sorted key: b1, w1, w2
    assert [tuple(v.shape) for v in values] == [(4,), (4, 3), (3, 4)]
    np_opt = KFAC(native, cl.CrossEntropyLoss(), **HYPER["kfac"])
    np_batch = (np.asarray(batch[0]), np.asarray(batch[1]))
    state = opt.init(values, batch)
    np_state = np_opt.init(np_params, np_batch)
    for _ in range(2):
        values, state = opt.step(values, state, batch)
        np_params, np_state = np_opt.step(np_params, np_state, np_batch)
    reordered = [values[1], values[0], values[2]]
    for got, expected in zip(reordered, np_params, strict=True):
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-9, atol=1e-11)
