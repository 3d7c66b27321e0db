"""Test cases of the losses: NumPy float64 inputs and PyTorch reference losses.

Each case names a loss configuration, builds outputs and targets in NumPy, and
evaluates the same loss with ``torch.nn`` (PyTorch puts the class axis of
cross-entropy on axis 1, so shared axes are moved for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from curvlinops import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    GaussianNLLLoss,
    MSELoss,
    PoissonNLLLoss,
)

KINDS = [
    "mse",
    "mse_shared",
    "ce_labels",
    "ce_probs",
    "ce_shared_labels",
    "ce_shared_probs",
    "bce_hard",
    "bce_soft",
    "poisson",
    "gaussian",
    "gaussian_shared",
]
NATURAL_KINDS = [k for k in KINDS if not k.startswith("gaussian")]

# JAX compiles every new (operation, shape) pair on first use (~0.1 s each), so the
# tests that sweep every kind on every backend take this representative subset on JAX
# (every loss class, labels and probabilities, with and without shared axes).
# Tests of secondary identities take the smaller JAX_FEW_KINDS.
JAX_KINDS = ("mse_shared", "ce_labels", "ce_shared_probs", "bce_soft", "poisson", "gaussian")
JAX_FEW_KINDS = ("ce_labels", "poisson", "gaussian")


def skip_kind_on_jax(backend, kind, kinds=JAX_KINDS):
    if backend.name == "jax" and kind not in kinds:
        pytest.skip(f"{kind} on JAX: compile time; JAX runs the kinds {kinds} here")


@dataclass
class Case:
    kind: str
    loss_cls: type
    outputs: np.ndarray
    targets: np.ndarray

    def loss(self, reduction="mean"):
        return self.loss_cls(reduction=reduction)


def make_case(kind, rng, N=3, C=4, S=2) -> Case:
    """Outputs and targets of moderate size and scale for a loss kind."""
    shared = "shared" in kind
    lead = (N, S) if shared else (N,)
    f = rng.normal(size=(*lead, C))
    if kind.startswith("mse"):
        return Case(kind, MSELoss, f, rng.normal(size=f.shape))
    if kind.startswith("ce"):
        if "labels" in kind:
            return Case(kind, CrossEntropyLoss, f, rng.integers(0, C, size=lead))
        probs = rng.dirichlet(np.ones(C), size=lead)
        return Case(kind, CrossEntropyLoss, f, probs)
    if kind == "bce_hard":
        return Case(kind, BCEWithLogitsLoss, f, rng.integers(0, 2, size=f.shape).astype(float))
    if kind == "bce_soft":
        return Case(kind, BCEWithLogitsLoss, f, rng.uniform(size=f.shape))
    if kind == "poisson":
        f = 0.5 * f + 0.5
        return Case(kind, PoissonNLLLoss, f, rng.poisson(np.exp(f)).astype(float))
    if kind.startswith("gaussian"):
        D = max(C // 2, 1)
        mean = rng.normal(size=(*lead, D))
        log_var = 0.5 * rng.normal(size=(*lead, D))
        y = mean + np.exp(0.5 * log_var) * rng.normal(size=mean.shape)
        return Case(kind, GaussianNLLLoss, np.concatenate([mean, log_var], axis=-1), y)
    raise ValueError(kind)


def torch_loss_fn(kind, reduction):
    """``(outputs, targets) -> loss`` with torch.nn, taking our layouts."""
    import torch

    if kind.startswith("mse"):
        fn = torch.nn.MSELoss(reduction=reduction)
        return fn
    if kind.startswith("ce"):
        fn = torch.nn.CrossEntropyLoss(reduction=reduction)

        def ce(f, y):
            if f.ndim == 3:  # (N, S, C) -> PyTorch's (N, C, S)
                f = f.permute(0, 2, 1)
                y = y.permute(0, 2, 1) if y.is_floating_point() else y
            return fn(f, y)

        return ce
    if kind.startswith("bce"):
        return torch.nn.BCEWithLogitsLoss(reduction=reduction)
    if kind == "poisson":
        return torch.nn.PoissonNLLLoss(log_input=True, full=False, reduction=reduction)
    if kind.startswith("gaussian"):
        fn = torch.nn.GaussianNLLLoss(full=False, reduction=reduction)

        def gaussian(f, y):
            D = f.shape[-1] // 2
            return fn(f[..., :D], y, torch.exp(f[..., D:]))

        return gaussian
    raise ValueError(kind)


def torch_targets(targets):
    import torch

    t = torch.as_tensor(targets)
    return t if not t.is_floating_point() else t.to(torch.float64)


def dense_blocks(matmat, outputs_shape, num_blocks_axes=1):
    """Dense per-datum matrices ``(N, P, P)`` of an output-space product ``V -> M V``.

    ``matmat`` takes NumPy arrays ``outputs.shape + (K,)``; the identity on the
    flattened non-batch axes is fed once and the diagonal blocks are read off.
    """
    N = outputs_shape[0]
    P = int(np.prod(outputs_shape[1:]))
    eye = np.tile(np.eye(P), (N, 1, 1)).reshape((*outputs_shape, P))
    return np.asarray(matmat(eye)).reshape(N, P, P)


def block_diag_from_factor(S, outputs_shape):
    """Per-datum ``(N, P, P)`` from per-position factors ``outputs.shape + (R,)``."""
    N = outputs_shape[0]
    C = outputs_shape[-1]
    positions = int(np.prod(outputs_shape[1:-1]))
    S = np.asarray(S).reshape(N, positions, C, -1)
    blocks = np.einsum("nscr,nsdr->nscd", S, S)
    out = np.zeros((N, positions * C, positions * C))
    for s in range(positions):
        out[:, s * C : (s + 1) * C, s * C : (s + 1) * C] = blocks[:, s]
    return out
