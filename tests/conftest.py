"""Shared test fixtures: the backend matrix and the hypothesis profiles.

Every test that touches arrays takes the ``backend`` fixture and builds its inputs in
NumPy float64 (the independent reference), then moves them with ``backend.asarray``.
NumPy and array-api-strict always run; PyTorch and JAX when installed; CuPy only when
a GPU is present (skipped cleanly otherwise).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import pytest
from backend_matrix import BACKENDS
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if importlib.util.find_spec("jax") is not None:
    import jax

    # float64 tests need it; it must be set before any JAX array exists.
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_platforms", "cpu" if not os.environ.get("CURVLINOPS_JAX_GPU") else "")


@dataclass
class Backend:
    """One array library under test: its namespace, device, and converters."""

    name: str
    xp: object
    device: object

    def asarray(self, a, dtype=None):
        """NumPy array (or nested lists) -> array of this backend, on its device."""
        a = np.asarray(a)
        dtype = self.dtype(str(a.dtype) if dtype is None else dtype)
        if self.name == "torch":
            import torch

            return torch.as_tensor(np.ascontiguousarray(a), device=self.device).to(dtype)
        if self.name == "jax":
            import jax.numpy as jnp

            return jnp.asarray(a, dtype=dtype)
        if self.name == "cupy":
            import cupy

            return cupy.asarray(a, dtype=dtype)
        if self.name == "array_api_strict":
            return self.xp.asarray(a, dtype=dtype, device=self.device)
        return self.xp.asarray(a, dtype=dtype)

    def dtype(self, name):
        """Dtype of this backend from its NumPy-style name (``'float32'``)."""
        return getattr(self.xp, name)

    def to_numpy(self, x):
        from curvlinops import to_numpy

        return to_numpy(x)


def _cupy_available() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def _make_backend(name):
    if name == "numpy":
        import array_api_compat.numpy as xp

        return Backend("numpy", xp, "cpu")
    if name == "array_api_strict":
        import array_api_strict as xp

        # a device other than the default: an array created without device= then fails
        return Backend("array_api_strict", xp, xp.Device("device1"))
    if name == "torch":
        import array_api_compat.torch as xp
        import torch

        return Backend("torch", xp, torch.device("cpu"))
    if name == "jax":
        import jax
        import jax.numpy as xp

        return Backend("jax", xp, jax.devices()[0])
    if name == "cupy":
        import array_api_compat.cupy as xp
        import cupy

        return Backend("cupy", xp, cupy.cuda.Device(0))
    raise ValueError(name)


def _available(name):
    if name in ("numpy", "array_api_strict"):
        return importlib.util.find_spec(name) is not None
    if name == "cupy":
        return _cupy_available()
    return importlib.util.find_spec(name) is not None


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every available array backend; unavailable ones are skipped with a reason."""
    if not _available(request.param):
        pytest.skip(f"{request.param} is not installed (or no GPU for cupy)")
    return _make_backend(request.param)


@pytest.fixture
def numpy_backend():
    return _make_backend("numpy")


@pytest.fixture(params=["float32", "float64"])
def dtype_name(request):
    return request.param


def tolerances(dtype_name):
    """(rtol, atol) that match a precision for well-conditioned small problems."""
    return {"float32": (2e-4, 2e-5), "float64": (1e-10, 1e-12)}[dtype_name]
