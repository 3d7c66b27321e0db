"""The error function gap filler (curvlinops._backend.special) against SciPy."""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest
import scipy.special

from curvlinops._backend import erf
from curvlinops._backend.special import erf_standard

POINTS = np.concatenate(
    [np.linspace(-7.0, 7.0, 1401), [0.0, 1e-300, -1e-12, 1.999999, 2.0, 2.000001, 40.0, -1e300]]
)


def test_standard_fallback_is_accurate_to_float64_precision():
    ours = erf_standard(npx.asarray(POINTS), npx)
    reference = scipy.special.erf(POINTS)
    np.testing.assert_allclose(ours, reference, rtol=4e-15, atol=0)


def test_standard_fallback_handles_infinities_and_nan():
    ours = erf_standard(npx.asarray([np.inf, -np.inf, np.nan]), npx)
    assert ours[0] == 1.0 and ours[1] == -1.0 and np.isnan(ours[2])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_erf_on_every_backend(dtype, backend):
    points = POINTS[np.abs(POINTS) < float(np.finfo(dtype).max)]
    x = backend.asarray(points, dtype)
    ours = backend.to_numpy(erf(x, backend.xp))
    assert ours.dtype == np.dtype(dtype)
    reference = scipy.special.erf(points.astype(dtype).astype(np.float64))
    rtol = 4e-15 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=0)
