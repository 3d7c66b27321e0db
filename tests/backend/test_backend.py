"""The backend layer on every array library: random numbers, API gap fillers, namespaces.

References are NumPy/SciPy results on the same data; random moments are checked against
their exact values in expectation (tests/monte_carlo.py: a bound of about five standard
errors from the sample variance, with the power to reject a 0.9 or 1.1 scale error).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.linalg
from monte_carlo import assert_unbiased

from conftest import tolerances
from curvlinops._backend import (
    FactorizationError,
    RandomGenerator,
    all_finite,
    array_namespace,
    as_generator,
    assert_same_namespace,
    can_cast_losslessly,
    checked_cholesky,
    checked_eigh,
    checked_eigvalsh,
    default_float_dtype,
    device,
    diag_matrix,
    dtype_eps,
    dtype_name,
    index_update,
    kron,
    namespace_name,
    normal,
    rademacher,
    solve_triangular,
    spd_inverse,
    to_numpy,
    uniform,
)

SAMPLES = 40_000  # the normal second moment needs them to see a 10 % error


def close(backend, actual, expected, dtype):
    rtol, atol = tolerances(dtype)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(
        backend.to_numpy(actual).astype(np.float64), expected, rtol=rtol, atol=atol + rtol * scale
    )


def check_native(backend, x, shape, dtype):
    assert namespace_name(array_namespace(x)) == backend.name
    assert tuple(x.shape) == shape
    assert x.dtype == backend.dtype(dtype)
    assert str(device(x)) == str(backend.device)


# -- random numbers ----------------------------------------------------------------------


@pytest.mark.parametrize("draw", ["normal", "uniform", "rademacher"])
def test_random_reproducible_and_native(backend, dtype_name, draw):
    xp, dtype = backend.xp, backend.dtype(dtype_name)
    a = getattr(RandomGenerator(3, xp, backend.device), draw)((4, 5), dtype)
    b = getattr(RandomGenerator(3, xp, backend.device), draw)((4, 5), dtype)
    c = getattr(RandomGenerator(4, xp, backend.device), draw)((4, 5), dtype)
    check_native(backend, a, (4, 5), dtype_name)
    np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    assert np.any(backend.to_numpy(a) != backend.to_numpy(c))
    # successive draws of one generator differ
    g = RandomGenerator(3, xp, backend.device)
    first, second = getattr(g, draw)((8,), dtype), getattr(g, draw)((8,), dtype)
    assert np.any(backend.to_numpy(first) != backend.to_numpy(second))


def _moments_ok(samples, mean, var):
    """Mean and second central moment (about the true mean) unbiased: the samples and
    their squared deviations are draws of them. A mean of zero has no scale to err in."""
    assert_unbiased(samples, mean, std=np.sqrt(var), power_scales=(0.9, 1.1) if mean else ())
    assert_unbiased((samples - mean) ** 2, var)


def test_random_moments(backend):
    xp, dtype = backend.xp, backend.dtype("float64")
    g = RandomGenerator(0, xp, backend.device)
    _moments_ok(backend.to_numpy(g.normal((SAMPLES,), dtype)), 0.0, 1.0)
    low, high = -1.0, 3.0
    u = backend.to_numpy(g.uniform((SAMPLES,), dtype, low=low, high=high))
    assert u.min() >= low and u.max() < high
    _moments_ok(u, (low + high) / 2, (high - low) ** 2 / 12)
    r = backend.to_numpy(g.rademacher((SAMPLES,), dtype))
    assert set(np.unique(r).tolist()) == {-1.0, 1.0}
    _moments_ok(r, 0.0, 1.0)


def test_random_functions_and_generators(backend):
    xp, dtype = backend.xp, backend.dtype("float32")
    for fn in (normal, uniform, rademacher):
        a = fn((3,), seed=1, xp=xp, dtype=dtype, device=backend.device)
        b = fn((3,), seed=1, xp=xp, dtype=dtype, device=backend.device)
        check_native(backend, a, (3,), "float32")
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    g = RandomGenerator(5, xp, backend.device)
    assert as_generator(g, xp) is g
    assert isinstance(RandomGenerator(g, xp, backend.device), RandomGenerator)
    with pytest.raises(TypeError, match="explicit seed"):
        RandomGenerator(None, xp)
    with pytest.raises(TypeError, match="seed"):
        RandomGenerator(1.5, xp)


def _native_generator_cases():
    """(namespace, factory of a seeded native generator) for each installed library."""
    import array_api_compat.numpy as np_xp

    cases = [pytest.param(np_xp, lambda: np.random.default_rng(7), id="numpy")]
    if importlib.util.find_spec("torch") is not None:
        import array_api_compat.torch as torch_xp
        import torch

        cases.append(pytest.param(torch_xp, lambda: torch.Generator().manual_seed(7), id="torch"))
    if importlib.util.find_spec("jax") is not None:
        import jax
        import jax.numpy as jnp

        cases.append(pytest.param(jnp, lambda: jax.random.key(7), id="jax"))
    return cases


@pytest.mark.parametrize(("xp", "make"), _native_generator_cases())
def test_random_native_generators(xp, make):
    a = RandomGenerator(make(), xp).normal((4,), xp.float64)
    b = RandomGenerator(make(), xp).normal((4,), xp.float64)
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_random_generator_of_another_library_is_refused():
    import array_api_compat.numpy as np_xp

    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError):
        RandomGenerator(torch.Generator(), np_xp)


# -- gap fillers ---------------------------------------------------------------------------


def test_kron_and_diag_matrix(backend, dtype_name):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3)), rng.normal(size=(4, 2))
    a, b = a.astype(dtype_name).astype(np.float64), b.astype(dtype_name).astype(np.float64)
    xp = backend.xp
    out = kron(backend.asarray(a, dtype_name), backend.asarray(b, dtype_name), xp)
    check_native(backend, out, (8, 6), dtype_name)
    close(backend, out, np.kron(a, b), dtype_name)
    d = np.array([1.0, -2.0, 3.5])
    D = diag_matrix(backend.asarray(d, dtype_name), xp)
    check_native(backend, D, (3, 3), dtype_name)
    close(backend, D, np.diag(d), dtype_name)


@pytest.mark.parametrize("lower", [True, False])
def test_solve_triangular(backend, dtype_name, lower):
    rng = np.random.default_rng(1)
    L = np.tril(rng.normal(size=(4, 4))) + 3 * np.eye(4)
    L = (L if lower else L.T).astype(dtype_name).astype(np.float64)
    B = rng.normal(size=(4, 2)).astype(dtype_name).astype(np.float64)
    X = solve_triangular(
        backend.asarray(L, dtype_name), backend.asarray(B, dtype_name), backend.xp, lower=lower
    )
    check_native(backend, X, (4, 2), dtype_name)
    close(backend, X, scipy.linalg.solve_triangular(L, B, lower=lower), dtype_name)


def test_checked_cholesky(backend, dtype_name):
    rng = np.random.default_rng(2)
    G = rng.normal(size=(4, 4))
    A = (G @ G.T + np.eye(4)).astype(dtype_name).astype(np.float64)
    L = checked_cholesky(backend.asarray(A, dtype_name), backend.xp)
    check_native(backend, L, (4, 4), dtype_name)
    close(backend, L, np.linalg.cholesky(A), dtype_name)
    indefinite = backend.asarray(np.diag([1.0, -1.0, 2.0]), dtype_name)
    # NumPy and PyTorch raise, JAX returns NaN: all must become FactorizationError.
    with pytest.raises(FactorizationError, match="K-factor.*damping"):
        checked_cholesky(indefinite, backend.xp, name="K-factor")


def test_checked_eigh(backend, dtype_name):
    rng = np.random.default_rng(3)
    G = rng.normal(size=(4, 4))
    A = ((G + G.T) / 2).astype(dtype_name).astype(np.float64)
    w, Q = checked_eigh(backend.asarray(A, dtype_name), backend.xp)
    check_native(backend, w, (4,), dtype_name)
    close(backend, w, np.linalg.eigvalsh(A), dtype_name)
    Qn, wn = backend.to_numpy(Q).astype(np.float64), backend.to_numpy(w).astype(np.float64)
    close(backend, backend.asarray(Qn @ np.diag(wn) @ Qn.T), A, dtype_name)
    close(backend, backend.asarray(Qn.T @ Qn), np.eye(4), dtype_name)
    bad = backend.asarray(np.array([[1.0, np.nan], [np.nan, 1.0]]), dtype_name)
    with pytest.raises(FactorizationError, match="NaN"):
        checked_eigh(bad, backend.xp)


def test_checked_eigvalsh(backend, dtype_name):
    rng = np.random.default_rng(4)
    G = rng.normal(size=(5, 5))
    A = ((G + G.T) / 2).astype(dtype_name).astype(np.float64)
    w = checked_eigvalsh(backend.asarray(A, dtype_name), backend.xp)
    check_native(backend, w, (5,), dtype_name)
    close(backend, w, np.linalg.eigvalsh(A), dtype_name)  # ascending, as NumPy's
    bad = backend.asarray(np.array([[1.0, np.inf], [np.inf, 1.0]]), dtype_name)
    with pytest.raises(FactorizationError, match="NaN or Inf"):
        checked_eigvalsh(bad, backend.xp)


def test_spd_inverse(backend, dtype_name):
    rng = np.random.default_rng(5)
    G = rng.normal(size=(6, 6))
    A = (G @ G.T + 0.5 * np.eye(6)).astype(dtype_name).astype(np.float64)
    inv = spd_inverse(backend.asarray(A, dtype_name), backend.xp)
    check_native(backend, inv, (6, 6), dtype_name)
    expected = np.linalg.inv(A)
    rtol, _ = tolerances(dtype_name)
    scale = np.abs(expected).max() * np.linalg.cond(A)  # forward error ~ cond * eps
    np.testing.assert_allclose(backend.to_numpy(inv), expected, rtol=0, atol=rtol * scale)
    np.testing.assert_array_equal(backend.to_numpy(inv), backend.to_numpy(inv).T)
    indefinite = backend.asarray(np.diag([1.0, -1.0, 2.0]), dtype_name)
    with pytest.raises(FactorizationError, match="not positive definite"):
        spd_inverse(indefinite, backend.xp)


def test_index_update(backend):
    x = backend.asarray(np.zeros(4))
    y = index_update(x, 2, 5.0, backend.xp)
    np.testing.assert_array_equal(backend.to_numpy(y), [0.0, 0.0, 5.0, 0.0])
    np.testing.assert_array_equal(backend.to_numpy(x), np.zeros(4))
    M = backend.asarray(np.zeros((2, 3)))
    N = index_update(M, (slice(None), 1), backend.asarray(np.array([1.0, 2.0])), backend.xp)
    expected = np.zeros((2, 3))
    expected[:, 1] = [1.0, 2.0]
    np.testing.assert_array_equal(backend.to_numpy(N), expected)


def test_all_finite(backend):
    assert all_finite(backend.asarray(np.ones(3)), backend.xp)
    assert not all_finite(backend.asarray(np.array([1.0, np.inf])), backend.xp)
    assert not all_finite(backend.asarray(np.array([np.nan, 1.0])), backend.xp)


# -- namespaces, dtypes, conversion --------------------------------------------------------


def test_array_namespace_and_names(backend):
    x = backend.asarray(np.ones(2))
    xp = array_namespace(x)
    assert namespace_name(xp) == backend.name
    assert namespace_name(array_namespace(x, None, 2.0)) == backend.name
    assert_same_namespace(xp, x)
    assert dtype_name(backend.dtype("float32")) == "float32"
    assert dtype_name(x.dtype) == "float64"
    assert dtype_eps(backend.dtype("float32")) == float(np.finfo(np.float32).eps)
    assert dtype_name(default_float_dtype(xp)) in ("float32", "float64")
    assert can_cast_losslessly(backend.dtype("float32"), backend.dtype("float64"), xp)
    assert not can_cast_losslessly(backend.dtype("float64"), backend.dtype("float32"), xp)
    assert can_cast_losslessly(backend.dtype("int64"), backend.dtype("float32"), xp)


def test_array_namespace_errors(backend):
    import array_api_strict

    x = backend.asarray(np.ones(2))
    other = array_api_strict.ones(2) if backend.name == "numpy" else np.ones(2)
    other_name = "array_api_strict" if backend.name == "numpy" else "numpy"
    with pytest.raises(TypeError, match="different array libraries") as info:
        array_namespace(x, other)
    assert other_name in str(info.value)
    with pytest.raises(TypeError, match=other_name):
        assert_same_namespace(array_namespace(x), other)
    with pytest.raises(TypeError, match="at least one array"):
        array_namespace(None, 1.0)


def test_numpy_scalar_is_numpy():
    assert namespace_name(array_namespace(np.float64(1.0))) == "numpy"


def test_to_numpy(backend, dtype_name):
    a = np.arange(6.0).reshape(2, 3).astype(dtype_name)
    out = to_numpy(backend.asarray(a, dtype_name))
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.dtype(dtype_name)
    np.testing.assert_array_equal(out, a)


# -- fused calls ---------------------------------------------------------------------------


@pytest.mark.parametrize("K", [None, 1, 3])
def test_flat_vectors_split_and_join_exactly_on_every_backend(backend, K):
    """Parameter blocks from a flat ``(P,)`` / ``(P, K)`` array (on JAX one compiled call
    each way) against NumPy slicing; joining them gives the array back, bit for bit."""
    from curvlinops.models.params import flatten_params, unflatten_params

    shapes = [(2, 3), (3,), (1, 2, 2)]
    trailing = () if K is None else (K,)
    flat = np.arange(13.0 * (K or 1)).reshape((13, *trailing))
    blocks = unflatten_params(backend.asarray(flat), shapes)
    sizes = np.cumsum([0, 6, 3, 4])
    for block, s, start, stop in zip(blocks, shapes, sizes[:-1], sizes[1:], strict=True):
        np.testing.assert_array_equal(to_numpy(block), flat[start:stop].reshape(s + trailing))
    joined = flatten_params(blocks, shapes)
    np.testing.assert_array_equal(to_numpy(joined), flat)
    # twice: the second call on JAX reuses the compiled one
    np.testing.assert_array_equal(to_numpy(flatten_params(blocks, shapes)), flat)
