"""One MLP with the same weights in three frontends, and its independent references.

The network 5-8-8-3 (tanh, then ReLU) exists as a ``curvlinops.nn.Sequential`` on
NumPy, a ``torch.nn.Sequential`` and a JAX function. The data come in batches of
different sizes. References are built from the full data set with ``torch.func`` and
``jax`` directly (never through curvlinops' operators).
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_compat.numpy as npx
import numpy as np

from curvlinops import nn

WIDTHS = (5, 8, 8, 3)
BATCH_SIZES = (4, 7, 3)


@dataclass
class MLPProblem:
    native: object
    params: list  # NumPy float64
    X: np.ndarray  # all data, (N, 5)
    y_class: np.ndarray  # class labels (N,)
    y_regression: np.ndarray  # (N, 3)

    def batches(self, y, convert=np.asarray):
        out, start = [], 0
        for size in BATCH_SIZES:
            stop = start + size
            out.append((convert(self.X[start:stop]), convert(y[start:stop])))
            start = stop
        return out


def mlp_problem(seed=0) -> MLPProblem:
    native = nn.Sequential(
        nn.Linear(WIDTHS[0], WIDTHS[1]),
        nn.Tanh(),
        nn.Linear(WIDTHS[1], WIDTHS[2]),
        nn.ReLU(),
        nn.Linear(WIDTHS[2], WIDTHS[3]),
    )
    params = native.init(seed, xp=npx, dtype=npx.float64)
    rng = np.random.default_rng(seed + 1)
    n = sum(BATCH_SIZES)
    X = rng.standard_normal((n, WIDTHS[0]))
    y_class = rng.integers(0, WIDTHS[-1], size=n)
    y_regression = rng.standard_normal((n, WIDTHS[-1]))
    return MLPProblem(native, params, X, y_class, y_regression)


def torch_mlp(params):
    """The same network as a float64 ``torch.nn.Sequential`` holding ``params``."""
    import torch

    net = torch.nn.Sequential(
        torch.nn.Linear(WIDTHS[0], WIDTHS[1]),
        torch.nn.Tanh(),
        torch.nn.Linear(WIDTHS[1], WIDTHS[2]),
        torch.nn.ReLU(),
        torch.nn.Linear(WIDTHS[2], WIDTHS[3]),
    ).double()
    with torch.no_grad():
        for p, value in zip(net.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(np.asarray(value)))
    return net


def jax_mlp(p, x):
    """The same network as a pure JAX function of a list of arrays."""
    import jax
    import jax.numpy as jnp

    h = jnp.tanh(x @ p[0].T + p[1])
    h = jax.nn.relu(h @ p[2].T + p[3])
    return h @ p[4].T + p[5]


def flat(params):
    return np.concatenate([np.asarray(p).reshape(-1) for p in params])


def unflat_torch(theta, shapes):
    out, start = [], 0
    for s in shapes:
        size = int(np.prod(s))
        out.append(theta[start : start + size].reshape(s))
        start += size
    return out
