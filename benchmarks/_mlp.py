"""The benchmarks' shared problem: MLP 784-256-256-10 (ReLU), cross-entropy, N = 1024.

Returns the same weights, data and vectors as NumPy arrays to every benchmark, so that
numbers from different benchmarks (and peers) refer to one model. May import NumPy and
curvlinops.
"""

from __future__ import annotations

import numpy as np

WIDTHS = (784, 256, 256, 10)


def mlp_problem(*, quick=False, dtype="float32", seed=0, num_data=None, widths=WIDTHS):
    """``(model, params, X, y)`` in NumPy: the curvlinops.nn MLP and its data."""
    import array_api_compat.numpy as xp

    import curvlinops as cl

    if quick:
        widths = (64, 32, 32, 10)
    N = num_data or (256 if quick else 1024)
    layers = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(cl.nn.Linear(d_in, d_out))
        if i < len(widths) - 2:
            layers.append(cl.nn.ReLU())
    model = cl.nn.Sequential(*layers)
    params = model.init(seed, xp=xp, dtype=getattr(xp, dtype))
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, widths[0])).astype(dtype)
    y = rng.integers(0, widths[-1], size=N)
    return model, params, X, y


def peer_inputs(params, X, y, v, V, *, repeats, threads, dtype="float32", **extra):
    """The ``.npz`` payload of :func:`benchmarks._peers.run_peer` for this MLP."""
    inputs = {
        "X": X,
        "y": y,
        "v": v,
        "V": V,
        "repeats": repeats,
        "threads": threads,
        "dtype": dtype,
        "num_layers": len(params) // 2,
    }
    for i in range(len(params) // 2):
        inputs[f"W{i}"] = np.asarray(params[2 * i])
        inputs[f"b{i}"] = np.asarray(params[2 * i + 1])
    inputs.update(extra)
    return inputs


def threads() -> int:
    """Threads the peer may use: the same limit as this process (``OMP_NUM_THREADS``)."""
    import os

    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
