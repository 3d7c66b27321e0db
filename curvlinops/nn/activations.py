"""Elementwise activation layers with hand-derived first and second derivatives.

Each activation provides ``phi``, ``phi'`` and ``phi''`` (``None`` where ``phi''`` is
zero almost everywhere: ReLU, LeakyReLU). A linearization caches ``phi'(s)`` and
``phi''(s)`` of the forward pre-activations ``s`` the first time a product needs them.
Formulas are written to avoid overflow (no ``exp`` of large positive arguments).
Derivatives at kinks follow PyTorch (``ReLU'(0) = 0``, ``ELU'(0) = alpha``).
Their layer protocol: ``H_s = diag(phi') H_a diag(phi') + diag(phi'' * g_a)`` per datum,
and ``H_s = H_a * mean(phi' phi'^T) + diag(sum phi'' * g_a)`` averaged over the data.

May import: ``curvlinops._backend``, ``.module``.
"""

from __future__ import annotations

import math

from .._backend import device, diag_matrix, erf
from .module import Layer, feature_rows

__all__ = ["Elementwise", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "Softplus", "GELU", "ELU"]

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715


class Elementwise(Layer):
    """Base class of activations ``b = phi(s)`` applied entry by entry.

    Subclasses implement :meth:`function`, :meth:`first_derivative` and
    :meth:`second_derivative` (returning None when it is zero almost everywhere).

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> Tanh().first_derivative(xp.asarray([0.0]), xp).tolist()
    [1.0]
    """

    #: True where ``phi''`` vanishes almost everywhere (``second_derivative`` is None).
    piecewise_linear = False

    @property
    def r_backward_uses_input_tangent(self):
        return not self.piecewise_linear

    def function(self, s, xp):
        """``phi(s)``."""
        raise NotImplementedError

    def first_derivative(self, s, xp):
        """``phi'(s)``."""
        raise NotImplementedError

    def second_derivative(self, s, xp):
        """``phi''(s)``, or None if it vanishes almost everywhere."""
        raise NotImplementedError

    def forward(self, params, a, xp):
        return self.function(a, xp)

    def _d1(self, state, xp):
        if "d1" not in state:
            state["d1"] = xp.expand_dims(self.first_derivative(state["input"], xp), axis=-2)
        return state["d1"]

    def _d2(self, state, xp):
        if "d2" not in state:
            d2 = self.second_derivative(state["input"], xp)
            state["d2"] = None if d2 is None else xp.expand_dims(d2, axis=-2)
        return state["d2"]

    def _times_d1(self, state, x, xp):
        """``phi'(s) * x`` for ``x`` in the internal layout."""
        return self._d1(state, xp) * x

    def tangent(self, params, dparams, state, ta, xp):
        return None if ta is None else self._times_d1(state, ta, xp)

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        return [], (self._times_d1(state, g, xp) if need_input else None)

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        if not need_input:
            return [], None, None
        rg_in = None if rg is None else self._times_d1(state, rg, xp)
        d2 = self._d2(state, xp)
        if d2 is not None and ta is not None:
            # R(phi'(s) g) = phi''(s) (R s) g + phi'(s) R g: the activation's curvature.
            curvature = d2 * ta * g
            rg_in = curvature if rg_in is None else rg_in + curvature
        return [], self._times_d1(state, g, xp), rg_in

    # -- the layer protocol ------------------------------------------------------------

    def backward_curvature(self, params, state, H, g, xp):
        s = state["input"]
        N = s.shape[0]
        d1 = xp.reshape(self.first_derivative(s, xp), (N, -1))
        H = d1[:, :, None] * H * d1[:, None, :]
        d2 = self.second_derivative(s, xp)
        if d2 is not None:
            # the activation's curvature: diag(phi'' * g) for each datum
            eye = xp.eye(H.shape[-1], dtype=H.dtype, device=device(H))
            H = H + eye[None, :, :] * xp.reshape(d2 * g, (N, 1, -1))
        return H

    def curvature_statistics(self, params, state, g, statistics, xp):
        s = state["input"]
        # the features are the channels (axis 1) of channels-first inputs, else the last axis
        rows = feature_rows(self.first_derivative(s, xp), state, xp)
        outer = xp.matrix_transpose(rows) @ rows
        count = rows.shape[0]
        d2 = self.second_derivative(s, xp)
        second = None if d2 is None else xp.sum(feature_rows(d2 * g, state, xp), axis=0)
        if statistics is not None:
            old_outer, old_count, old_second = statistics
            outer, count = old_outer + outer, old_count + count
            second = old_second if second is None else second + old_second
        return outer, count, second

    def backward_mean_curvature(self, params, H, statistics, xp):
        if statistics is None:
            raise NotImplementedError(
                "the batch-averaged curvature rule without statistics",
                " (pass what curvature_statistics accumulated over the data)",
            )
        outer, count, second = statistics
        H = H * (outer / count)
        return H if second is None else H + diag_matrix(second, xp)


class ReLU(Elementwise):
    """``max(s, 0)``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> ReLU()([], xp.asarray([[-1.0, 0.0, 2.0]])).tolist()
    [[0.0, 0.0, 2.0]]
    """

    piecewise_linear = True

    def function(self, s, xp):
        return xp.maximum(s, 0.0)

    def _times_d1(self, state, x, xp):
        # Keep a boolean mask instead of phi' as floats: a quarter of the memory held by
        # the linearization (the float copy made here lives only for this product).
        if "positive" not in state:
            state["positive"] = xp.expand_dims(state["input"] > 0, axis=-2)
        return xp.astype(state["positive"], x.dtype) * x

    def first_derivative(self, s, xp):
        return xp.astype(s > 0, s.dtype)

    def second_derivative(self, s, xp):
        return None


class LeakyReLU(Elementwise):
    """``s`` for ``s > 0``, ``negative_slope * s`` otherwise, as ``torch.nn.LeakyReLU``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> LeakyReLU(0.1)([], xp.asarray([[-1.0, 2.0]])).tolist()
    [[-0.1, 2.0]]
    """

    def __init__(self, negative_slope: float = 0.01):
        self.negative_slope = float(negative_slope)

    def __repr__(self) -> str:
        return f"LeakyReLU(negative_slope={self.negative_slope})"

    piecewise_linear = True

    def function(self, s, xp):
        return xp.where(s > 0, s, self.negative_slope * s)

    def first_derivative(self, s, xp):
        slope = self.negative_slope
        return slope + (1.0 - slope) * xp.astype(s > 0, s.dtype)

    def second_derivative(self, s, xp):
        return None


class Tanh(Elementwise):
    """``tanh(s)``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> Tanh()([], xp.asarray([[0.0]])).tolist()
    [[0.0]]
    """

    def function(self, s, xp):
        return xp.tanh(s)

    def first_derivative(self, s, xp):
        t = xp.tanh(s)
        return 1.0 - t * t

    def second_derivative(self, s, xp):
        t = xp.tanh(s)
        return -2.0 * t * (1.0 - t * t)


class Sigmoid(Elementwise):
    """``1 / (1 + exp(-s))``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> Sigmoid()([], xp.asarray([[0.0]])).tolist()
    [[0.5]]
    """

    def function(self, s, xp):
        return _sigmoid(s, xp)

    def first_derivative(self, s, xp):
        p = _sigmoid(s, xp)
        return p * (1.0 - p)

    def second_derivative(self, s, xp):
        p = _sigmoid(s, xp)
        return p * (1.0 - p) * (1.0 - 2.0 * p)


class Softplus(Elementwise):
    """``log(1 + exp(beta s)) / beta``, linear where ``beta s > threshold``, as PyTorch.

    Parameters
    ----------
    beta : float
        Sharpness.
    threshold : float
        Above ``beta s > threshold`` the layer is the identity (and its derivatives
        those of the identity), as in ``torch.nn.Softplus``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> [round(v, 6) for v in Softplus()([], xp.asarray([[0.0, 30.0]]))[0].tolist()]
    [0.693147, 30.0]
    """

    def __init__(self, beta: float = 1.0, threshold: float = 20.0):
        if beta <= 0:
            raise ValueError(f"Softplus needs beta > 0, got {beta}.")
        self.beta = float(beta)
        self.threshold = float(threshold)

    def __repr__(self) -> str:
        return f"Softplus(beta={self.beta}, threshold={self.threshold})"

    def _scaled(self, s, xp):
        z = self.beta * s
        return z, z > self.threshold, xp.minimum(z, self.threshold)

    def function(self, s, xp):
        _, linear, z = self._scaled(s, xp)
        return xp.where(linear, s, xp.log1p(xp.exp(z)) / self.beta)

    def first_derivative(self, s, xp):
        _, linear, z = self._scaled(s, xp)
        return xp.where(linear, 1.0, _sigmoid(z, xp))

    def second_derivative(self, s, xp):
        _, linear, z = self._scaled(s, xp)
        p = _sigmoid(z, xp)
        return xp.where(linear, 0.0, self.beta * p * (1.0 - p))


class GELU(Elementwise):
    """Gaussian error linear unit ``s Phi(s)``, as ``torch.nn.GELU``.

    Parameters
    ----------
    approximate : {"none", "tanh"}
        ``"none"``: the exact ``0.5 s (1 + erf(s / sqrt(2)))``; ``"tanh"``:
        ``0.5 s (1 + tanh(sqrt(2/pi) (s + 0.044715 s^3)))``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> [round(v, 6) for v in GELU()([], xp.asarray([[1.0]]))[0].tolist()]
    [0.841345]
    >>> [round(v, 6) for v in GELU("tanh")([], xp.asarray([[1.0]]))[0].tolist()]
    [0.841192]
    """

    def __init__(self, approximate: str = "none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}.")
        self.approximate = approximate

    def __repr__(self) -> str:
        return f"GELU(approximate={self.approximate!r})"

    def function(self, s, xp):
        if self.approximate == "tanh":
            return 0.5 * s * (1.0 + xp.tanh(_tanh_argument(s)))
        return s * _normal_cdf(s, xp)

    def first_derivative(self, s, xp):
        if self.approximate == "tanh":
            t = xp.tanh(_tanh_argument(s))
            return 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * _tanh_argument_d1(s)
        return _normal_cdf(s, xp) + s * _normal_pdf(s, xp)

    def second_derivative(self, s, xp):
        if self.approximate == "tanh":
            t = xp.tanh(_tanh_argument(s))
            du = _tanh_argument_d1(s)
            d2u = (6.0 * _SQRT_2_OVER_PI * _GELU_TANH_CUBIC) * s
            return (1.0 - t * t) * (du + 0.5 * s * (d2u - 2.0 * t * du * du))
        return _normal_pdf(s, xp) * (2.0 - s * s)


class ELU(Elementwise):
    """``s`` for ``s > 0``, ``alpha (exp(s) - 1)`` otherwise, as ``torch.nn.ELU``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> [round(v, 6) for v in ELU()([], xp.asarray([[-1.0, 2.0]]))[0].tolist()]
    [-0.632121, 2.0]
    """

    def __init__(self, alpha: float = 1.0):
        self.alpha = float(alpha)

    def __repr__(self) -> str:
        return f"ELU(alpha={self.alpha})"

    def function(self, s, xp):
        return xp.where(s > 0, s, self.alpha * xp.expm1(xp.minimum(s, 0.0)))

    def first_derivative(self, s, xp):
        return xp.where(s > 0, 1.0, self.alpha * xp.exp(xp.minimum(s, 0.0)))

    def second_derivative(self, s, xp):
        return xp.where(s > 0, 0.0, self.alpha * xp.exp(xp.minimum(s, 0.0)))


def _sigmoid(s, xp):
    """Logistic function without overflow: only ``exp(-|s|)`` is evaluated."""
    e = xp.exp(-xp.abs(s))
    p = 1.0 / (1.0 + e)
    return xp.where(s >= 0, p, e * p)


def _normal_cdf(s, xp):
    return 0.5 * (1.0 + erf(s / _SQRT_2, xp))


def _normal_pdf(s, xp):
    return _INV_SQRT_2PI * xp.exp(-0.5 * s * s)


def _tanh_argument(s):
    return _SQRT_2_OVER_PI * (s + _GELU_TANH_CUBIC * s * s * s)


def _tanh_argument_d1(s):
    return _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * s * s)
