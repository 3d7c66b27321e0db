"""Special functions the array API standard lacks: the error function.

:func:`erf` calls the native implementation where a library has one (SciPy for
NumPy, ``torch.special``, ``jax.scipy.special``, ``cupyx.scipy.special``) and a
standard-only fallback otherwise (array-api-strict and unknown namespaces), accurate
to float64 precision.

May import: ``.namespace``, and lazily scipy, cupyx, torch, jax.
"""

from __future__ import annotations

import math

from .namespace import (
    is_cupy_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
)

__all__ = ["erf"]

# The fallback switches from the power series to the continued fraction at |x| = 2;
# these term counts reach float64 round-off on either side (checked against SciPy).
_SERIES_CUT = 2.0
_SERIES_TERMS = 30
_FRACTION_TERMS = 50
# erf(x) rounds to 1 in float64 beyond this; clamping avoids overflow in x * x.
_SATURATION = 6.0


def erf(x, xp):
    """The error function ``erf(x) = 2 / sqrt(pi) * int_0^x exp(-t^2) dt``, elementwise.

    Parameters
    ----------
    x : array
        Real floating array of namespace ``xp``.
    xp
        Its namespace.

    Returns
    -------
    array
        ``erf(x)``, same shape, dtype and device as ``x``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> [round(v, 6) for v in erf(xp.asarray([0.0, 0.5, -3.0]), xp).tolist()]
    [0.0, 0.5205, -0.999978]
    """
    if is_numpy_namespace(xp):
        import scipy.special

        return xp.asarray(scipy.special.erf(x), dtype=x.dtype)
    if is_torch_namespace(xp):
        import torch

        return torch.special.erf(x)
    if is_jax_namespace(xp):
        import jax.scipy.special

        return jax.scipy.special.erf(x)
    if is_cupy_namespace(xp):
        import cupyx.scipy.special

        return cupyx.scipy.special.erf(x)
    return erf_standard(x, xp)


def erf_standard(x, xp):
    """The error function from array-API standard calls only (the fallback of :func:`erf`).

    For ``|x| < 2`` it sums the series ``erf(x) = 2/sqrt(pi) exp(-x^2)
    sum_n 2^n x^(2n+1) / (1 * 3 * ... * (2n+1))``, whose terms are all positive (no
    cancellation); for ``|x| >= 2`` it evaluates the continued fraction of
    ``erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))``
    from the bottom up. Both are evaluated on the whole array with a fixed number of
    terms (no data-dependent control flow) and combined with ``where``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> round(float(erf_standard(xp.asarray(1.0), xp)), 12)
    0.84270079295
    """
    a = xp.abs(x)
    near = xp.where(a < _SERIES_CUT, a, 0.0)
    far = xp.clip(a, _SERIES_CUT, _SATURATION)
    two_over_sqrt_pi = 2.0 / math.sqrt(math.pi)

    near_sq = near * near
    term = near
    total = near
    for k in range(1, _SERIES_TERMS):
        term = term * (2.0 * near_sq) / (2 * k + 1)
        total = total + term
    series = two_over_sqrt_pi * xp.exp(-near_sq) * total

    fraction = far
    for k in range(_FRACTION_TERMS, 0, -1):
        fraction = far + (k / 2) / fraction
    complement = xp.exp(-far * far) / (math.sqrt(math.pi) * fraction)

    magnitude = xp.where(a < _SERIES_CUT, series, 1.0 - complement)
    return xp.where(x < 0, -magnitude, magnitude)
