"""Bad inputs to curvlinops.nn models and their products raise clear errors; init."""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest
from monte_carlo import assert_unbiased

from curvlinops import nn
from curvlinops.models import Tier


def mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def numpy_params(model, seed=0):
    return model.init(seed, xp=npx, dtype=npx.float64)


X = np.random.default_rng(0).standard_normal((5, 3))


def test_wrong_number_of_parameters_names_expected_and_received():
    model = mlp()
    params = numpy_params(model)
    with pytest.raises(ValueError, match=r"expects 4 parameter arrays of shapes \[\(4, 3\)"):
        model(params[:3], X)
    with pytest.raises(ValueError, match=r"got shapes \[\(4, 3\), \(4,\), \(2, 4\), \(3,\)\]"):
        model.linearize(params[:3] + [np.zeros(3)], X)


def test_parameters_must_be_a_list():
    with pytest.raises(TypeError, match="list of arrays"):
        nn.Linear(3, 2)(np.zeros((2, 3)), X)


def test_inputs_with_the_wrong_feature_size():
    model = mlp()
    with pytest.raises(ValueError, match=r"\(N, \.\.\., 3\), got shape \(5, 4\)"):
        model(numpy_params(model), np.ones((5, 4)))
    with pytest.raises(ValueError, match="batch axis"):
        model.linearize(numpy_params(model), np.ones(3))
    inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"Linear\(5, 2, bias=True\) expects inputs"):
        inner(numpy_params(inner), X)


def test_mixed_namespaces_raise_type_error():
    torch = pytest.importorskip("torch")
    model = mlp()
    with pytest.raises(TypeError, match="different array libraries"):
        model(numpy_params(model), torch.ones((5, 3), dtype=torch.float64))
    lin = model.linearize(numpy_params(model), X)
    with pytest.raises(TypeError, match="numpy"):
        lin.vjp(torch.ones((5, 2), dtype=torch.float64))
    with pytest.raises(TypeError, match="numpy"):
        lin.jvp([torch.ones(s, dtype=torch.float64) for s in model.expected_param_shapes()])
    torch_tangents = [torch.ones(s, dtype=torch.float64) for s in model.expected_param_shapes()]
    with pytest.raises(TypeError, match="The second_order_vjp argument is a torch array"):
        lin.second_order_vjp(np.ones((5, 2)), torch_tangents)


def test_non_finite_inputs_and_parameters_raise_value_error():
    model = mlp()
    params = numpy_params(model)
    bad_x = X.copy()
    bad_x[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.linearize(params, bad_x)
    params[2] = params[2] * np.inf
    with pytest.raises(ValueError, match="Parameter 2"):
        model(params, X)


def test_dtypes_must_agree_or_convert_losslessly():
    model = mlp()
    params32 = model.init(0, xp=npx, dtype=npx.float32)
    with pytest.raises(TypeError, match="float32 parameters but the inputs are float64"):
        model(params32, X)
    with pytest.raises(TypeError, match="one dtype"):
        model(numpy_params(model)[:2] + params32[2:], X)
    out = model(params32, np.ones((5, 3), dtype=np.int64))
    assert out.dtype == np.float32


def test_products_reject_wrongly_shaped_vectors():
    model = mlp()
    params = numpy_params(model)
    lin = model.linearize(params, X)
    with pytest.raises(ValueError, match="parameter shapes"):
        lin.jvp([np.ones((4, 3, 2)), np.ones((4, 3)), np.ones((2, 4, 2)), np.ones((2, 2))])
    with pytest.raises(ValueError, match="output shape"):
        lin.vjp(np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"cotangent u must have the output shape \(5, 2\)"):
        lin.second_order_vjp(np.ones((5, 3)), params)
    tangents = [np.ones(s + (2,)) for s in model.expected_param_shapes()]
    with pytest.raises(ValueError, match=r"\(5, 2, 2\)"):
        lin.second_order_vjp(np.ones((5, 2)), tangents, np.ones((5, 2, 3)))


def test_invalid_layer_arguments():
    with pytest.raises(ValueError, match="positive integer in_features"):
        nn.Linear(0, 3)
    with pytest.raises(ValueError, match="approximate"):
        nn.GELU("erf")
    with pytest.raises(ValueError, match="beta"):
        nn.Softplus(beta=0.0)
    with pytest.raises(TypeError, match="layer 1 is a str"):
        nn.Sequential(nn.Linear(2, 2), "relu")


def test_modules_offer_all_tiers():
    model = mlp()
    assert all(model.has_tier(tier) for tier in Tier)
    for tier in Tier:
        model.require(tier, "test")  # raises MissingTierError if absent


def test_init_shapes_dtype_and_reproducibility(backend):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False))
    dtype = backend.dtype("float32")
    params = model.init(5, xp=backend.xp, dtype=dtype, device=backend.device)
    assert [tuple(p.shape) for p in params] == model.expected_param_shapes()
    assert all(p.dtype == dtype for p in params)
    again = model.init(5, xp=backend.xp, dtype=dtype, device=backend.device)
    other = model.init(6, xp=backend.xp, dtype=dtype, device=backend.device)
    for p, q, r in zip(params, again, other, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(p), backend.to_numpy(q))
        assert not np.array_equal(backend.to_numpy(p), backend.to_numpy(r))


def test_init_follows_pytorch_default_distribution():
    """U(-1/sqrt(in), 1/sqrt(in)): bounds, and mean and second moment in expectation
    (tests/monte_carlo.py; 12000 biases, so that a 10 % error in the scale shows)."""
    fan_in, fan_out = 100, 12_000
    w, b = nn.Linear(fan_in, fan_out).init(0, xp=npx, dtype=npx.float64)
    bound = 1.0 / np.sqrt(fan_in)
    for values in (w.ravel(), b):
        assert np.all(np.abs(values) <= bound)
        assert_unbiased(values, 0.0, std=bound / np.sqrt(3), power_scales=())  # no scale
        # Var(w^2) of U(-c, c) is c^4/5 - c^4/9 = 4 c^4 / 45.
        assert_unbiased(values**2, bound**2 / 3, std=np.sqrt(4 * bound**4 / 45))


def test_init_defaults_to_numpy_and_its_default_dtype():
    w, b = nn.Linear(3, 2).init(0)
    assert isinstance(w, np.ndarray) and w.dtype == np.float64
    with pytest.raises(TypeError, match="real floating"):
        nn.Linear(3, 2).init(0, xp=npx, dtype=npx.int32)
