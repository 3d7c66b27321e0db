"""The backend matrix the tests run over, and its trimmed backend-by-dtype variant.

What lives here: the names of the array backends (``BACKENDS``, the parameters of the
``backend`` fixture in ``conftest.py``) and ``backends_and_dtypes``, a parametrization
over backend and dtype together. JAX compiles every new dtype and shape, so its float32
repeat of an end-to-end case costs 15-30 s while the float32 arithmetic it checks is the
same array-API code that NumPy, array-api-strict and PyTorch already run in float32;
``backends_and_dtypes`` therefore runs JAX in float64 only.

May import: pytest.
"""

from __future__ import annotations

import pytest

BACKENDS = ["numpy", "array_api_strict", "torch", "jax", "cupy"]
DTYPES = ["float32", "float64"]


def backends_and_dtypes():
    """``parametrize("backend, dtype")`` over every backend and dtype but JAX float32."""
    pairs = [(b, d) for b in BACKENDS for d in DTYPES if (b, d) != ("jax", "float32")]
    return pytest.mark.parametrize("backend, dtype", pairs, indirect=["backend"])
