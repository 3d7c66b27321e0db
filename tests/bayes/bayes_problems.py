"""Shared problems of the Bayes tests: a small classifier at its MAP and dense references.

The references never call curvlinops: the network is written again as a function of
the flat parameters in PyTorch, its MAP found by SciPy's L-BFGS on PyTorch gradients,
and the Hessian, GGN, empirical Fisher and per-datum Jacobians taken with
``torch.func`` (``hessian``, ``jacrev``, ``vmap``).
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

import curvlinops.nn as cnn


def classifier(widths=(2, 4, 3), seed=0, N=40, prior=1.0):
    """A tanh MLP classifier, its data and its MAP under the prior ``N(0, I / prior)``.

    Returns ``(model, params, X, y, reference)`` with NumPy float64 arrays and the
    :class:`Reference` of the network. Skips the calling test without PyTorch.
    """
    import pytest

    torch = pytest.importorskip("torch")

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, widths[0]))
    y = rng.integers(0, widths[-1], size=N)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(cnn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(cnn.Tanh())
    model = cnn.Sequential(*layers)
    import array_api_compat.numpy as xp

    init = model.init(seed, xp=xp, dtype=xp.float64)
    shapes = [p.shape for p in init]
    ref = Reference(widths, shapes)
    theta0 = np.concatenate([p.ravel() for p in init])
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)

    def objective(theta):
        t = torch.as_tensor(theta).requires_grad_(True)
        value = ref.nll(t, Xt, yt) + 0.5 * prior * (t @ t)
        (grad,) = torch.autograd.grad(value, t)
        return float(value.detach()), grad.numpy()

    result = optimize.minimize(
        objective, theta0, jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "maxiter": 5000}
    )
    theta = result.x
    params, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        params.append(theta[start : start + size].reshape(shape))
        start += size
    return model, params, X, y, ref


class Reference:
    """The MLP as a function of the flat parameters, in PyTorch, and its dense curvatures."""

    def __init__(self, widths, shapes):
        self.widths, self.shapes = widths, shapes

    def forward(self, theta, X):
        import torch

        a, start = X, 0
        count = len(self.widths) - 1
        for i, (d_in, d_out) in enumerate(zip(self.widths[:-1], self.widths[1:], strict=True)):
            W = theta[start : start + d_in * d_out].reshape(d_out, d_in)
            start += d_in * d_out
            b = theta[start : start + d_out]
            start += d_out
            a = a @ W.T + b
            if i < count - 1:
                a = torch.tanh(a)
        return a

    def nll(self, theta, X, y):
        import torch

        return torch.nn.functional.cross_entropy(self.forward(theta, X), y, reduction="sum")

    def _tensors(self, theta, X, y=None):
        import torch

        out = [torch.as_tensor(np.concatenate([np.ravel(p) for p in theta]))]
        out.append(torch.as_tensor(X))
        if y is not None:
            out.append(torch.as_tensor(y))
        return out

    def hessian(self, params, X, y):
        import torch

        theta, Xt, yt = self._tensors(params, X, y)
        return torch.func.hessian(lambda t: self.nll(t, Xt, yt))(theta).numpy()

    def jacobians(self, params, X):
        """``(N, C, P)``: every datum's Jacobian."""
        import torch

        theta, Xt = self._tensors(params, X)
        J = torch.func.jacrev(lambda t: self.forward(t, Xt))(theta)
        return J.numpy()

    def ggn(self, params, X):
        J = self.jacobians(params, X)
        f = self.outputs(params, X)
        p = np.exp(f - f.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        H_out = np.einsum("nc,cd->ncd", p, np.eye(p.shape[1])) - np.einsum("nc,nd->ncd", p, p)
        return np.einsum("ncp,ncd,ndq->pq", J, H_out, J)

    def empirical_fisher(self, params, X, y):
        import torch

        theta, Xt, yt = self._tensors(params, X, y)

        def single(t, x, label):
            return self.nll(t, x[None], label[None])

        grads = torch.func.vmap(torch.func.grad(single), in_dims=(None, 0, 0))(theta, Xt, yt)
        G = grads.numpy()
        return G.T @ G

    def outputs(self, params, X):
        theta, Xt = self._tensors(params, X)
        return self.forward(theta, Xt).numpy()

    def log_likelihood(self, params, X, y):
        theta, Xt, yt = self._tensors(params, X, y)
        return -float(self.nll(theta, Xt, yt))


def dense_log_evidence(log_lik, theta, H, delta):
    """The Laplace evidence from dense matrices (``delta`` per parameter)."""
    logdet = np.linalg.slogdet(H + np.diag(delta))
    assert logdet[0] > 0
    return log_lik - 0.5 * (delta @ theta**2) + 0.5 * np.sum(np.log(delta)) - 0.5 * logdet[1]


def per_entry(prior, shapes):
    """A per-array prior as the per-parameter diagonal."""
    values = np.broadcast_to(np.asarray(prior, dtype=float), (len(shapes),))
    sizes = [int(np.prod(s)) for s in shapes]
    return np.concatenate([np.full(n, v) for v, n in zip(values, sizes, strict=True)])


def conv_classifier(seed=0, N=3):
    """A small CNN of native layers (a convolution, batch normalization in evaluation
    mode, ReLU, average pooling, Linear), its parameters and inputs, and its forward pass
    as a function of the flat parameters (for finite differences)."""
    import array_api_compat.numpy as xp

    model = cnn.Sequential(
        cnn.Conv2d(2, 3, 3, padding=1),
        cnn.BatchNorm2d(3, running_mean=np.full(3, 0.1), running_var=np.full(3, 2.0)),
        cnn.ReLU(),
        cnn.AvgPool2d(2),
        cnn.Flatten(),
        cnn.Linear(12, 3),
    )
    params = model.init(seed, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(seed)
    params = [p + 0.1 * rng.normal(size=p.shape) for p in params]  # a bias and BN off zero
    X = rng.normal(size=(N, 2, 4, 4))
    shapes = [p.shape for p in params]

    def forward(theta, inputs):
        ps, start = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            ps.append(theta[start : start + size].reshape(shape))
            start += size
        return model(ps, inputs)

    return model, params, X, forward
