"""Kronecker-factored products: ``(A (x) B) x`` without forming ``A (x) B``.

Two sizes:

- ``64 x 64`` factors (``n = 4096``): the dense ``n x n`` matrix fits (128 MiB in
  float64), so the Kronecker product is timed against the dense product on the same
  vectors, as a ratio ``kron/dense`` measured in this run.
- ``512 x 512`` factors (``n = 262144``): the dense matrix would take 512 GiB, so the
  Kronecker product is timed alone.

For NumPy the peak memory of one product is measured with tracemalloc, and the table
says whether any allocation reached the size of the dense matrix (``n^2 * itemsize``;
it must not: the operator works on the ``(n1, n2)`` reshaped vectors only).
"""

from __future__ import annotations

import importlib.util

import numpy as np
from _timing import format_bytes, peak_numpy_bytes, time_call

from curvlinops import KroneckerLinearOperator

DENSE_LIMIT_BYTES = 2**30  # compare with the dense product only below this size


def _backends():
    """``(name, asarray, kron)`` for each installed array library (CPU)."""
    yield "numpy", np.asarray, np.kron
    if importlib.util.find_spec("torch") is not None:
        import torch

        yield "torch", torch.from_numpy, torch.kron
    if importlib.util.find_spec("jax") is not None:
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        yield "jax", jnp.asarray, jnp.kron


def _case(backend, factor_size, k, *, quick, seed=0):
    name, asarray, kron = backend
    rng = np.random.default_rng(seed)
    A1 = rng.standard_normal((factor_size, factor_size))
    A2 = rng.standard_normal((factor_size, factor_size))
    n = factor_size * factor_size
    X_np = rng.standard_normal((n, k)) if k > 1 else rng.standard_normal(n)
    dense_bytes = n * n * X_np.itemsize

    op = KroneckerLinearOperator(asarray(A1), asarray(A2))
    X = asarray(X_np)
    repeats = 3 if quick else 15
    kron_time = time_call(lambda: op @ X, repeats=repeats, min_time=0.0 if quick else 0.2)
    row = {
        "backend": name,
        "factors": f"{factor_size}x{factor_size} (x) {factor_size}x{factor_size}",
        "n": n,
        "k": k,
        "kron_ms": 1e3 * kron_time.median,
    }

    if dense_bytes <= DENSE_LIMIT_BYTES:
        dense = kron(asarray(A1), asarray(A2))
        dense_time = time_call(lambda: dense @ X, repeats=repeats, min_time=0.0 if quick else 0.2)
        row["dense_ms"] = 1e3 * dense_time.median
        row["kron/dense"] = kron_time.median / dense_time.median
        del dense
    else:
        row["dense_ms"] = f"does not fit ({format_bytes(dense_bytes)})"
        row["kron/dense"] = ""

    if name == "numpy":
        peak = peak_numpy_bytes(lambda: op @ X)
        row["kron_peak"] = format_bytes(peak)
        row["peak/vector"] = peak / X_np.nbytes
        row["alloc>=n^2"] = peak >= dense_bytes
    else:
        row["kron_peak"] = "n/a (numpy only)"
    return row


def run(quick: bool) -> list[dict]:
    """Rows for both sizes, a matvec and a 16-column matmat, on every installed backend."""
    sizes = [64, 512] if not quick else [64, 256]
    rows = []
    for backend in _backends():
        for factor_size in sizes:
            for k in (1, 16):
                rows.append(_case(backend, factor_size, k, quick=quick))
    return rows
