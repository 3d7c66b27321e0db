"""Activation functions and their hand-derived derivatives against PyTorch's autograd.

``phi``, ``phi'`` and ``phi''`` of every activation, on every backend, in float64 and
float32, over a grid that includes the kinks, PyTorch's Softplus threshold and
arguments large enough to overflow a naive ``exp`` (RuntimeWarnings are errors). At
kinks the first derivative follows PyTorch (ReLU'(0) = 0, ELU'(0) = alpha).
"""

from __future__ import annotations

import numpy as np
import pytest
from nn_reference import ACTIVATION_SPECS, HAS_TORCH, build_ours, build_torch

pytestmark = pytest.mark.skipif(not HAS_TORCH, reason="torch is the reference")

GRID = np.array(
    [
        [-1e3, -50.0, -30.0, -20.5, -8.0, -3.0, -1.5],
        [-0.7, -0.1, 0.0, 0.1, 0.5, 1.0, 2.5],
        [9.0, 10.25, 19.9, 20.1, 30.0, 50.0, 1e3],
    ]
)

# Points where phi' is discontinuous: ELU at 0, Softplus(beta=2, threshold=1) at 1/2.
KINKS = {"elu": 0.0, "softplus_threshold": 0.5}


def torch_derivatives(spec, s):
    """phi, phi', phi'' of the PyTorch layer by autograd (double backward), float64."""
    import torch

    layer = build_torch([spec])
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    phi = layer(st)
    (d1,) = torch.autograd.grad(phi.sum(), st, create_graph=True)
    if d1.requires_grad:
        (d2,) = torch.autograd.grad(d1.sum(), st, allow_unused=True, materialize_grads=True)
    else:  # piecewise linear: phi' does not depend on s
        d2 = torch.zeros_like(st)
    return [t.detach().numpy() for t in (phi, d1, d2)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(set(ACTIVATION_SPECS) - {"identity"}))
def test_activation_and_derivatives_match_torch_autograd(name, dtype, backend):
    spec = ACTIVATION_SPECS[name]
    layer = build_ours([spec])[0]
    s_np = GRID.astype(dtype)
    expected = torch_derivatives(spec, s_np.astype(np.float64))
    s = backend.asarray(s_np, dtype)
    xp = backend.xp
    d2 = layer.second_derivative(s, xp)
    ours = [
        layer([], s),
        layer.first_derivative(s, xp),
        np.zeros_like(s_np) if d2 is None else d2,
    ]
    rtol, atol = (1e-12, 1e-14) if dtype == "float64" else (2e-6, 1e-6)
    for what, value, reference in zip(("phi", "phi'", "phi''"), ours, expected, strict=True):
        value = backend.to_numpy(value)
        if what == "phi''" and name in KINKS:
            # phi'' is undefined where phi' jumps, and conventions differ there (PyTorch's
            # ELU''(0) = 0, here the left limit alpha as in JAX); compare away from it.
            away = s_np != KINKS[name]
            value, reference = value[away], reference[away]
        assert value.dtype == np.dtype(dtype), what
        np.testing.assert_allclose(value, reference, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("name", sorted(set(ACTIVATION_SPECS) - {"identity"}))
def test_r_backward_by_default_returns_the_input_signals_of_autograd(name):
    """Called without ``need_input`` (default True), the R-operator of the backward
    pass returns ``g_in = phi'(s) g`` and ``R g_in = phi''(s) (R s) g + phi'(s) R g``,
    here against PyTorch's first and second derivatives."""
    import array_api_compat.numpy as xp

    spec = ACTIVATION_SPECS[name]
    layer = build_ours([spec])[0]
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 3, 4))  # (N, S, D): away from the kinks
    g, ta, rg = rng.standard_normal((2, 3, 1, 4)), *rng.standard_normal((2, 2, 3, 2, 4))
    state = {"input": s}
    layer.forward_with_state([], s, xp, state)
    rgrads, g_in, rg_in = layer.r_backward([], [], state, ta, g, rg, xp)
    _, d1, d2 = (d[:, :, None, :] for d in torch_derivatives(spec, s))
    assert rgrads == []
    np.testing.assert_allclose(g_in, d1 * g, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rg_in, d2 * ta * g + d1 * rg, rtol=1e-12, atol=1e-14)
