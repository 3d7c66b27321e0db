"""Layer normalization over the last axis: :class:`LayerNorm`, as ``torch.nn.LayerNorm``.

For inputs ``x`` of shape ``(N, S..., D)`` each position is normalized over its ``D``
features: ``mu = mean(x)``, ``r = 1 / sqrt(var(x) + eps)`` (the biased variance),
``xhat = r (x - mu)`` and ``y = w * xhat + b``. Unlike batch normalization at fixed
statistics the map ``x -> xhat`` is nonlinear; its derivatives, with means over the
feature axis, ``t`` an input tangent and ``h`` a cotangent of ``xhat``:

- Jacobian (symmetric): ``J t = r (t - mean(t) - xhat mean(xhat t))``;
- tangent: ``w * J t + dw * xhat + db``; backward: ``g_w = sum g * xhat``,
  ``g_b = sum g`` (over data and positions), ``g_x = J (w * g)``;
- R-operator: with ``u = J t`` (the tangent of ``xhat``) and ``m = mean(xhat t)``,
  ``R r = -r m`` per position and the directional derivative of ``J`` applied to a
  fixed ``h`` is ``(R J) h = -r (m J h + u mean(xhat h) + xhat mean(u h))``. Then
  ``R g_x = J (w * R g + dw * g) + (R J)(w * g)``, ``R g_w = sum (R g) * xhat +
  sum g * u`` (the cross term between ``w`` and the parameters ``x`` depends on) and
  ``R g_b = sum R g``.

Layer protocol. The tap (``elementwise_affine=True``) is elementwise
(:class:`~curvlinops.models.LayerTap` ``kind="elementwise"``): the normalized inputs
``xhat (N, S..., D)`` and the output gradients ``(N, S..., D, M)``; the curvature
operators give ``[w, b]`` their exact block. The per-datum curvature rule is exact:
``J^T diag(w) H diag(w) J`` plus, per position, the normalization's own curvature
``sum_k h_k d^2 xhat_k / dx^2 = -(r / D) (J h xhat^T + xhat (J h)^T) - r mean(xhat h) J``
with ``h = w * g``. The batch-averaged rule (the Kronecker-factored Hessian) is not
implemented: the normalization couples a position's features nonlinearly.

May import: ``curvlinops._backend``, ``.module``.
"""

from __future__ import annotations

import math

from .._backend import device
from .module import Layer, pull_back_curvature

__all__ = ["LayerNorm"]


def _mean(a, xp):
    """Mean over the last axis, kept as an axis of size one."""
    return xp.mean(a, axis=-1, keepdims=True)


def _jacobian(h, xhat, r, xp):
    """``J h = r (h - mean(h) - xhat mean(xhat h))`` (J is symmetric: also ``J^T h``)."""
    return r * (h - _mean(h, xp) - xhat * _mean(xhat * h, xp))


class LayerNorm(Layer):
    """Layer normalization over the last axis, as ``torch.nn.LayerNorm(D)``.

    ``y = w * (x - mean(x)) / sqrt(var(x) + eps) + b`` at each position of inputs
    ``(N, S..., D)``, with the mean and (biased) variance over the ``D`` features.
    Parameters ``[weight (D,), bias (D,)]`` (initialized to ones and zeros), ``[weight]``
    without bias, none without ``elementwise_affine``; PyTorch weights copy across.
    Every tier, with the normalization's own Jacobian and second derivative (see
    :mod:`curvlinops.nn.layer_norm`); an elementwise tap; an exact per-datum curvature
    rule.

    Parameters
    ----------
    normalized_shape : int
        The number of features ``D`` (the inputs' last axis).
    eps : float
        Added to the variance; default ``1e-5``.
    elementwise_affine : bool
        Whether the layer has a weight (and a bias); default True.
    bias : bool
        Whether the affine part has a bias; default True.

    Raises
    ------
    ValueError
        For a non-positive ``normalized_shape`` or a negative ``eps``; at the forward
        pass, for inputs whose last axis is not ``D``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> layer = LayerNorm(2, eps=0.0)
    >>> params = layer.init(0, xp=xp, dtype=xp.float64)
    >>> layer(params, xp.asarray([[1.0, 3.0], [2.0, 0.0]])).tolist()
    [[-1.0, 1.0], [1.0, -1.0]]
    >>> LayerNorm(4, bias=False).expected_param_shapes()
    [(4,)]
    """

    tap_kind = "elementwise"
    input_layout = output_layout = "features_last"

    def __init__(self, normalized_shape: int, eps=1e-5, elementwise_affine=True, bias=True):
        D = normalized_shape
        if not isinstance(D, int) or isinstance(D, bool) or D < 1:
            raise ValueError(
                f"LayerNorm needs a positive integer normalized_shape (the last axis), got {D!r}."
            )
        eps = float(eps)
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"LayerNorm needs a finite eps >= 0, got {eps!r}.")
        self.normalized_shape = D
        self.eps = eps
        self.elementwise_affine = bool(elementwise_affine)
        self.bias = bool(bias) and self.elementwise_affine

    def __repr__(self) -> str:
        return (
            f"LayerNorm({self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias})"
        )

    @property
    def has_tap(self):
        """Whether the layer has a tap: with ``elementwise_affine`` (an elementwise one)."""
        return self.elementwise_affine

    def param_shapes(self):
        if not self.elementwise_affine:
            return []
        D = self.normalized_shape
        return [(D,), (D,)] if self.bias else [(D,)]

    def init_params(self, generator, dtype):
        xp, dev, D = generator.xp, generator.device, self.normalized_shape
        out = []
        if self.elementwise_affine:
            out.append(xp.ones((D,), dtype=dtype, device=dev))
            if self.bias:
                out.append(xp.zeros((D,), dtype=dtype, device=dev))
        return out

    # -- the normalization -------------------------------------------------------------

    def _check_input(self, a):
        if a.ndim < 2 or a.shape[-1] != self.normalized_shape:
            raise ValueError(
                f"{self!r} expects inputs of shape (N, ..., {self.normalized_shape}), got "
                f"shape {tuple(a.shape)}."
            )

    def _normalize(self, a, xp):
        """``(xhat, r)`` of inputs ``a`` (``r`` with a last axis of size one)."""
        centered = a - _mean(a, xp)
        r = 1.0 / xp.sqrt(_mean(centered * centered, xp) + self.eps)
        return centered * r, r

    def _cached(self, state, xp):
        """``(xhat, r)`` in the internal layout, ``(N, ..., 1, D)`` and ``(N, ..., 1, 1)``."""
        if "xhat" not in state:
            xhat, r = self._normalize(state["input"], xp)
            state["xhat"] = xp.expand_dims(xhat, axis=-2)
            state["r"] = xp.expand_dims(r, axis=-2)
        return state["xhat"], state["r"]

    @staticmethod
    def _k_rows(v, xp):
        """A ``(D, K)`` parameter tangent as ``(K, D)``, broadcasting over internal vectors."""
        return xp.matrix_transpose(v)

    @staticmethod
    def _reduce(a, xp):
        """Sum internal-layout vectors ``(N, ..., K, D)`` over data and positions: ``(D, K)``."""
        rows = xp.sum(xp.reshape(a, (-1, a.shape[-2], a.shape[-1])), axis=0)
        return xp.matrix_transpose(rows)

    def forward(self, params, a, xp):
        self._check_input(a)
        y, _ = self._normalize(a, xp)
        if self.elementwise_affine:
            y = y * params[0]
            if self.bias:
                y = y + params[1]
        return y

    # -- derivatives -------------------------------------------------------------------

    def tangent(self, params, dparams, state, ta, xp):
        xhat, r = self._cached(state, xp)
        out = None
        if ta is not None:
            out = _jacobian(ta, xhat, r, xp)
            if self.elementwise_affine:
                out = out * params[0]
        if self.elementwise_affine:
            own = xhat * self._k_rows(dparams[0], xp)
            if self.bias:
                own = own + self._k_rows(dparams[1], xp)
            out = own if out is None else out + own
        return out

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        xhat, r = self._cached(state, xp)
        grads = []
        if need_params and self.elementwise_affine:
            grads.append(self._reduce(g * xhat, xp))
            if self.bias:
                grads.append(self._reduce(g, xp))
        g_in = None
        if need_input:
            h = g * params[0] if self.elementwise_affine else g
            g_in = _jacobian(h, xhat, r, xp)
        return grads, g_in

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        xhat, r = self._cached(state, xp)
        affine = self.elementwise_affine
        u = None if ta is None else _jacobian(ta, xhat, r, xp)  # the tangent of xhat
        rgrads = []
        if affine:
            K = dparams[0].shape[-1]
            zeros = xp.zeros((self.normalized_shape, K), dtype=g.dtype, device=device(g))
            rgw = None if rg is None else self._reduce(rg * xhat, xp)
            if u is not None:  # R xhat = u: the cross term between w and the inputs
                cross = self._reduce(g * u, xp)
                rgw = cross if rgw is None else rgw + cross
            rgrads.append(zeros if rgw is None else rgw)
            if self.bias:
                rgrads.append(zeros if rg is None else self._reduce(rg, xp))
        if not need_input:
            return rgrads, None, None
        h = g * params[0] if affine else g
        g_in = _jacobian(h, xhat, r, xp)
        # R h = w * R g + dw * g
        rh = None if rg is None else (rg * params[0] if affine else rg)
        if affine:
            own = g * self._k_rows(dparams[0], xp)
            rh = own if rh is None else rh + own
        rg_in = None if rh is None else _jacobian(rh, xhat, r, xp)
        if u is not None:
            # (R J) h = -r (m J h + u mean(xhat h) + xhat mean(u h)), m = mean(xhat t)
            m = _mean(xhat * ta, xp)
            curvature = -r * (m * g_in + u * _mean(xhat * h, xp) + xhat * _mean(u * h, xp))
            rg_in = curvature if rg_in is None else rg_in + curvature
        return rgrads, g_in, rg_in

    # -- the layer protocol ------------------------------------------------------------

    def tap(self, state, output_grads=None, xp=None):
        """``(xhat (N, S..., D), output gradients (N, S..., D, M) or None, None)``.

        The elementwise tap (``kind="elementwise"``): the weight multiplies the
        normalized inputs entry by entry.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> inputs, grads, shape = LayerNorm(2, eps=0.0).tap(
        ...     {"input": xp.asarray([[[0.0, 2.0]]])}, xp.ones((1, 1, 3, 2)), xp)
        >>> inputs.tolist(), grads.shape, shape
        ([[[-1.0, 1.0]]], (1, 1, 2, 3), None)
        """
        xhat, _ = self._cached(state, xp)
        grads = None if output_grads is None else xp.moveaxis(output_grads, -2, -1)
        return xhat[..., 0, :], grads, None

    def backward_curvature(self, params, state, H, g, xp):
        """``J^T diag(w) H diag(w) J`` plus the normalization's curvature, per datum (exact).

        ``H`` is ``(N, F, F)`` over a datum's ``F = S D`` output entries, ``g`` the
        gradient of the outputs ``(N, S..., D)``. The normalization's curvature
        ``sum_k (w g)_k d^2 xhat_k / dx^2`` is block diagonal over the positions.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> layer = LayerNorm(2, eps=0.0, elementwise_affine=False)
        >>> s = {"input": xp.asarray([[1.0, 3.0]])}
        >>> layer.backward_curvature([], s, xp.zeros((1, 2, 2)), xp.asarray([[1.0, 0.0]]),
        ...                          xp)[0].tolist()
        [[0.0, 0.0], [0.0, 0.0]]
        """
        H_in = pull_back_curvature(self, params, state, H, g, xp)
        xhat, r = self._cached(state, xp)
        xhat, r = xhat[..., 0, :], r[..., 0, :]  # (N, S..., D), (N, S..., 1)
        N, D = g.shape[0], self.normalized_shape
        S = math.prod(g.shape[1:-1])
        h = g * params[0] if self.elementwise_affine else g
        Jh = _jacobian(h, xhat, r, xp)
        xhat, r, h, Jh = (xp.reshape(a, (N, S, a.shape[-1])) for a in (xhat, r, h, Jh))
        eye = xp.eye(D, dtype=H.dtype, device=device(H))
        ones = xp.ones((D, D), dtype=H.dtype, device=device(H)) / D
        outer = Jh[..., :, None] * xhat[..., None, :]
        J = r[..., None] * (eye - ones - xhat[..., :, None] * xhat[..., None, :] / D)
        scale = xp.mean(xhat * h, axis=-1)[..., None, None]
        M = -(r[..., None] / D) * (outer + xp.matrix_transpose(outer)) - r[..., None] * scale * J
        # block diagonal over the positions: (N, S, D, S, D)
        same = xp.eye(S, dtype=H.dtype, device=device(H))
        blocks = M[:, :, :, None, :] * same[None, :, None, :, None]
        return H_in + xp.reshape(blocks, (N, S * D, S * D))

    def curvature_statistics(self, params, state, g, statistics, xp):
        raise NotImplementedError(
            "the batch-averaged curvature rule",
            " (layer normalization couples a position's features nonlinearly; no averaged "
            "rule is implemented: use the per-datum walk, HessianDiagonalLinearOperator, or "
            "KFACLinearOperator)",
        )

    def backward_mean_curvature(self, params, H, statistics, xp):
        raise NotImplementedError(
            "the batch-averaged curvature rule",
            " (layer normalization couples a position's features nonlinearly; no averaged "
            "rule is implemented: use the per-datum walk, HessianDiagonalLinearOperator, or "
            "KFACLinearOperator)",
        )
