"""Saved optimizer states: resuming continues bit for bit like an uninterrupted run.

References: uninterrupted runs of the same optimizer on the same batches (compared with
``numpy.array_equal`` / ``torch.equal``, after a round trip through ``numpy.savez`` and
``numpy.load(allow_pickle=False)``, or ``torch.save`` / ``torch.load(weights_only=True)``);
for the batch windows of K-FAC, the dense GGN of the window's rows and K-FAC operators
built on those rows alone.
"""

from __future__ import annotations

import io

import array_api_compat.numpy as xp
import numpy as np
import pytest

import curvlinops as cl
import curvlinops.nn as cnn
from curvlinops.optim import KFAC, HessianFree, NaturalGradient


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


OPTIMIZERS = {
    "kfac": lambda m, loss: KFAC(
        m,
        loss,
        damping=0.3,
        fisher_type="mc",
        inverse_every=3,
        damping_every=2,
        statistics_fraction=0.5,
        products_fraction=0.5,
        seed=2,
    ),
    "hessian_free": lambda m, loss: HessianFree(
        m, loss, damping=0.5, max_iterations=8, preconditioner="empirical_fisher"
    ),
    "natural_gradient": lambda m, loss: NaturalGradient(
        m, loss, learning_rate=0.5, damping=0.1, momentum=0.5, max_iterations=6
    ),
}
ARRAY_FIELDS = {"kfac": ("velocity",), "hessian_free": ("previous",)}


def first_state(opt, params, batch):
    return opt.init(params, batch)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resuming_from_a_saved_state_continues_bit_identically(name):
    model, params, batches = problem(1)
    loss = cl.CrossEntropyLoss()
    opt = OPTIMIZERS[name](model, loss)
    straight, straight_state = run(opt, params, first_state(opt, params, batches[0]), batches)
    # five steps, save parameters and state, restore in a fresh optimizer, two more
    half, state = run(opt, params, first_state(opt, params, batches[0]), batches[:5])
    saved = npz(state.state_dict())
    assert all(v.dtype.kind != "O" for v in saved.values())  # nothing pickled
    saved_params = npz({str(i): p for i, p in enumerate(half)})
    resumed_params = [saved_params[str(i)] for i in range(len(half))]
    fresh = OPTIMIZERS[name](model, loss)
    resumed, resumed_state = run(
        fresh, resumed_params, fresh.load_state_dict(saved, resumed_params), batches[5:]
    )
    for a, b in zip(resumed, straight, strict=True):
        assert np.array_equal(a, b)
    for field in ("step", "loss", "damping", "rho", "alpha", "mu", "cg_iterations", "accepted"):
        if hasattr(straight_state, field):
            assert getattr(resumed_state, field) == getattr(straight_state, field), field
    for field in ("velocity", "previous"):
        if getattr(straight_state, field, None) is not None:
            assert np.array_equal(getattr(resumed_state, field), getattr(straight_state, field))
    if name == "kfac":
        dense = resumed_state.curvature.to_dense()
        assert np.array_equal(dense, straight_state.curvature.to_dense())
        # the save fell after an update since the last inverse refresh (at step 3): the
        # preconditioner's factors are not the current ones, so restoring it from the
        # current factors would not do
        assert not np.array_equal(saved["preconditioner/A:0"], saved["curvature/A:0"])


def test_kfac_state_dict_holds_plain_arrays_and_restores_every_field():
    model, params, batches = problem(2)
    loss = cl.CrossEntropyLoss()
    opt = OPTIMIZERS["kfac"](model, loss)
    params, state = run(opt, params, opt.init(params, batches[0]), batches[:2])
    saved = npz(state.state_dict())
    restored = opt.load_state_dict(saved, params)
    assert restored.step == 2 and restored.damping == state.damping
    assert restored.preconditioner_shift == state.preconditioner_shift
    assert np.array_equal(restored.velocity, state.velocity)
    assert np.array_equal(restored.preconditioner.to_dense(), state.preconditioner.to_dense())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_load_state_dict_refuses_another_optimizers_state(name):
    model, params, batches = problem(3)
    loss = cl.CrossEntropyLoss()
    other = "hessian_free" if name != "hessian_free" else "natural_gradient"
    opt, wrong = OPTIMIZERS[name](model, loss), OPTIMIZERS[other](model, loss)
    _, state = wrong.step(params, first_state(wrong, params, batches[0]), batches[0])
    with pytest.raises(ValueError, match="saved state is of"):
        opt.load_state_dict(state.state_dict(), params)


def test_kfac_windows_of_the_batch_for_statistics_and_products():
    model, params, batches = problem(4, n=10)
    loss = cl.CrossEntropyLoss()
    batch = batches[0]
    opt = KFAC(
        model,
        loss,
        damping=0.2,
        momentum=0.0,
        statistics_fraction=0.3,
        products_fraction=0.5,
        inverse_every=1,
        damping_every=100,
    )
    state = opt.init(params, batch)
    K0 = cl.KFACLinearOperator(model, loss, params, [batch])
    p1, state = opt.step(params, state, batch)
    # step 0: the products use rows 0..4 (half of 10) of the batch
    g, _ = cl.GGNLinearOperator(model, loss, params, [batch]).gradient_and_loss()
    g = np.concatenate([np.ravel(a) for a in g])
    proposal = -(K0.factored_inverse(0.2, pi_damping=True) @ g)
    rows = (batch[0][:5], batch[1][:5])
    C = cl.GGNLinearOperator(model, loss, params, [rows]).to_dense() + 0.2 * np.eye(g.size)
    assert state.alpha == pytest.approx(-(g @ proposal) / (proposal @ C @ proposal), rel=1e-10)
    # step 1: the factors' update takes rows 3..5 (3 = ceil(0.3 * 10), window 1)
    opt.step(p1, state, batch)
    K1 = cl.KFACLinearOperator(model, loss, p1, [(batch[0][3:6], batch[1][3:6])])
    for name in K0.input_factors:
        expected = 0.5 * K0.input_factors[name] + 0.5 * K1.input_factors[name]
        np.testing.assert_allclose(state.curvature.input_factors[name], expected, rtol=1e-12)
        expected = 0.5 * K0.output_factors[name] + 0.5 * K1.output_factors[name]
        np.testing.assert_allclose(state.curvature.output_factors[name], expected, rtol=1e-12)


@pytest.mark.parametrize("method", ["kfac", "hessian_free", "natural_gradient"])
def test_torch_optimizer_state_dict_resumes_bit_identically(method):
    torch = pytest.importorskip("torch")
    from curvlinops.optim.torch import TorchOptimizer

    hyper = {
        "kfac": {"damping": 0.3, "fisher_type": "mc", "inverse_every": 3, "damping_every": 2},
        "hessian_free": {"damping": 0.5, "max_iterations": 8},
        "natural_gradient": {"damping": 0.1, "learning_rate": 0.5, "momentum": 0.5},
    }[method]
    torch.manual_seed(0)
    X = torch.randn(5, 16, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5, 16))

    def network():
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
        return net.double()

    def optimizer(net):
        return TorchOptimizer(net, torch.nn.CrossEntropyLoss(), method, **hyper)

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
