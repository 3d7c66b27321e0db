"""Values, gradients and Hessian products of the losses against PyTorch and finite
differences, on every backend, for both reductions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
from hypothesis import given, strategies as st
from loss_cases import (
    KINDS,
    dense_blocks,
    make_case,
    skip_kind_on_jax,
    torch_loss_fn,
    torch_targets,
)

import curvlinops as cl

RTOL, ATOL = 1e-10, 1e-12


def _torch_reference(case, reduction, hessian=True):
    """Value, gradient and dense Hessian of torch's loss with respect to the outputs."""
    torch = pytest.importorskip("torch")
    fn = torch_loss_fn(case.kind, reduction)
    f = torch.as_tensor(case.outputs, dtype=torch.float64)
    y = torch_targets(case.targets)
    value = fn(f, y)
    grad = torch.func.grad(lambda g: fn(g, y))(f)
    if not hessian:
        return value.item(), grad.numpy(), None
    hess = torch.func.hessian(lambda g: fn(g, y))(f)
    size = f.numel()
    return value.item(), grad.numpy(), hess.reshape(size, size).numpy()


def _ours_on(backend, case):
    f = backend.asarray(case.outputs, "float64")
    dtype = "float64" if case.targets.dtype.kind == "f" else "int64"
    y = backend.asarray(case.targets, dtype)
    return f, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", KINDS)
def test_value_gradient_hessian_match_torch(backend, kind, reduction):
    skip_kind_on_jax(backend, kind)
    case = make_case(kind, np.random.default_rng(0))
    loss = case.loss(reduction)
    f, y = _ours_on(backend, case)
    value, grad, hess = _torch_reference(case, reduction)
    scale = loss.normalization(f.shape[0], tuple(f.shape))

    np.testing.assert_allclose(float(loss(f, y)), value, rtol=RTOL)
    np.testing.assert_allclose(float(loss.sum_value(f, y)) * scale, value, rtol=RTOL)
    np.testing.assert_allclose(
        scale * backend.to_numpy(loss.gradient(f, y)), grad, rtol=RTOL, atol=ATOL
    )

    # Our per-datum Hessians, laid out on the block diagonal, against torch's full one.
    blocks = dense_blocks(
        lambda V: backend.to_numpy(loss.hessian_matmat(f, y, backend.asarray(V))), f.shape
    )
    N, P = blocks.shape[0], blocks.shape[1]
    full = np.zeros((N * P, N * P))
    for n in range(N):
        full[n * P : (n + 1) * P, n * P : (n + 1) * P] = blocks[n]
    np.testing.assert_allclose(scale * full, hess, rtol=RTOL, atol=ATOL)


def test_mean_normalization_counts_like_torch():
    """What the mean divides by per datum: all elements, or positions for cross-entropy."""
    rng = np.random.default_rng(1)
    shape = (3, 2, 4)
    expected = {"mse_shared": 8, "ce_shared_labels": 2, "bce_hard": 4, "gaussian_shared": 4}
    for kind, count in expected.items():
        case = make_case(kind, rng, N=shape[0], C=shape[2], S=shape[1])
        assert case.loss("mean").normalization(5, case.outputs.shape) == pytest.approx(
            1 / (5 * count)
        )
        assert case.loss("sum").normalization(5, case.outputs.shape) == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_and_hessian_against_finite_differences(backend, kind):
    """Central differences of sum_value and of the gradient along random directions."""
    skip_kind_on_jax(backend, kind)
    rng = np.random.default_rng(2)
    case = make_case(kind, rng)
    loss = case.loss("sum")
    f_np = case.outputs
    f, y = _ours_on(backend, case)
    h = 1e-5
    directions = rng.normal(size=(*f_np.shape, 3))

    def value(g):
        return float(loss.sum_value(backend.asarray(g), y))

    def grad(g):
        return backend.to_numpy(loss.gradient(backend.asarray(g), y))

    G = backend.to_numpy(loss.gradient(f, y))
    HV = backend.to_numpy(loss.hessian_matmat(f, y, backend.asarray(directions)))
    for k in range(directions.shape[-1]):
        d = directions[..., k]
        fd_value = (value(f_np + h * d) - value(f_np - h * d)) / (2 * h)
        np.testing.assert_allclose(fd_value, np.sum(G * d), rtol=1e-7, atol=1e-8)
        fd_grad = (grad(f_np + h * d) - grad(f_np - h * d)) / (2 * h)
        np.testing.assert_allclose(fd_grad, HV[..., k], rtol=1e-6, atol=1e-8)


@given(
    kind=st.sampled_from(KINDS),
    N=st.integers(1, 5),
    C=st.integers(1, 5),
    S=st.integers(1, 3),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_value_and_gradient_match_torch(kind, N, C, S, reduction, seed):
    if kind.startswith("gaussian"):
        C = 2 * C
    case = make_case(kind, np.random.default_rng(seed), N=N, C=C, S=S)
    loss = case.loss(reduction)
    value, grad, _ = _torch_reference(case, reduction, hessian=False)
    f, y = case.outputs, case.targets
    np.testing.assert_allclose(float(loss(f, y)), value, rtol=RTOL, atol=ATOL)
    scale = loss.normalization(N, f.shape)
    np.testing.assert_allclose(scale * loss.gradient(f, y), grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_value_and_gradient(kind):
    """float32 inputs stay float32 and agree with the float64 reference to float32 precision."""
    case = make_case(kind, np.random.default_rng(3))
    loss = case.loss("mean")
    f32 = case.outputs.astype(np.float32)
    y32 = case.targets.astype(np.float32) if case.targets.dtype.kind == "f" else case.targets
    value, grad, _ = _torch_reference(case, "mean", hessian=False)
    assert loss(f32, y32).dtype == np.float32 and loss.gradient(f32, y32).dtype == np.float32
    np.testing.assert_allclose(float(loss(f32, y32)), value, rtol=1e-5)
    scale = loss.normalization(f32.shape[0], f32.shape)
    np.testing.assert_allclose(scale * loss.gradient(f32, y32), grad, rtol=1e-4, atol=1e-6)


def test_cross_entropy_is_stable_per_row_for_logits_of_different_scales():
    """Each row is shifted by its own maximum: a row of logits near -2000 next to one
    near 0 keeps its probabilities (a shift by the batch maximum would underflow it)."""
    f = np.array([[0.0, 1.0, -0.5], [-2000.0, -1999.0, -2000.5]])
    y = np.array([2, 0])
    loss = cl.CrossEntropyLoss(reduction="sum")
    expected = -scipy.special.log_softmax(f, axis=-1)[np.arange(2), y].sum()
    np.testing.assert_allclose(float(loss(f, y)), expected, rtol=1e-14)
    p = scipy.special.softmax(f, axis=-1)
    np.testing.assert_allclose(loss.gradient(f, y), p - np.eye(3)[y], rtol=1e-12, atol=1e-15)
