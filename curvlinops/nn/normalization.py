"""Batch normalization at fixed statistics: :class:`BatchNorm1d` and :class:`BatchNorm2d`.

The inference form of batch normalization, as ``torch.nn.BatchNorm1d``/``2d`` in
evaluation mode: ``y = weight * (x - running_mean) / sqrt(running_var + eps) + bias``
per channel (axis 1), with running statistics that are constants of the model (not
parameters, not recomputed from the batch). The layer is then affine in its inputs,
``y = d * x + e`` with ``d = weight / sigma``, ``sigma = sqrt(running_var + eps)``, and
bilinear in ``(weight, x)``.

Derivatives, with ``xhat = (x - running_mean) / sigma`` and ``t`` the input tangent:

- tangent: ``d * t + dweight * xhat + dbias``;
- backward: ``g_weight = sum g * xhat``, ``g_bias = sum g`` (over data and positions),
  ``g_x = d * g``;
- R-operator: ``R g_weight = sum (R g) * xhat + sum g * t / sigma`` (the bilinear cross
  term between the weight and the parameters ``x`` depends on), ``R g_bias = sum R g``,
  ``R g_x = d * R g + g * dweight / sigma``.

The running statistics (any array or sequence of ``C`` numbers; None: zeros and ones)
are kept as Python floats and converted once per namespace, device and dtype of the
inputs, so no host copy happens inside a product.

Layer protocol. The tap (``affine=True``) is elementwise
(:class:`~curvlinops.models.LayerTap` ``kind="elementwise"``): the normalized inputs
``xhat`` in the features-last layout ``(N, S..., C)`` and the output gradients
``(N, S..., C, M)``. The curvature rules are exact: per datum ``H_in = D H_out D`` with
``D`` the diagonal of ``d`` repeated over a datum's positions; batch-averaged
``H_in = diag(d) H_out diag(d)`` over the channels (each item keeps its position, so
no "expand" approximation enters here).

May import: ``curvlinops._backend``, ``.module``.
"""

from __future__ import annotations

import math

from .._backend import device, dtype_name, namespace_name, to_numpy
from .module import Layer

__all__ = ["BatchNorm1d", "BatchNorm2d"]


def _as_floats(value, count, default, what, cls):
    """``value`` (None, an array or a sequence of ``count`` numbers) as a tuple of floats."""
    if value is None:
        return (float(default),) * count
    try:
        if hasattr(value, "shape") and not isinstance(value, (list, tuple)):
            shape = tuple(value.shape)
            items = to_numpy(value).tolist() if shape == (count,) else None
        else:
            items = list(value)
            shape = (len(items),)
        floats = tuple(float(v) for v in items) if shape == (count,) else None
    except (TypeError, ValueError):
        floats, shape = None, "not a flat sequence of numbers"
    if floats is None:
        raise ValueError(
            f"{cls} needs {what} with num_features={count} entries (an array or a sequence), "
            f"got {shape}."
        )
    if not all(math.isfinite(v) for v in floats):
        raise ValueError(f"{cls} got a {what} with NaN or Inf entries.")
    return floats


class _BatchNorm(Layer):
    """Shared implementation; subclasses say which input ranks they take."""

    tap_kind = "elementwise"
    input_layout = output_layout = "channels_first"
    _ranks = ()
    _dims = ""

    def __init__(self, num_features, *, running_mean=None, running_var=None, eps=1e-5, affine=True):
        cls = type(self).__name__
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"{cls} needs a positive integer num_features, got {num_features!r}.")
        eps = float(eps)
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"{cls} needs a finite eps >= 0, got {eps!r}.")
        C = self.num_features = num_features
        self.eps = eps
        self.affine = bool(affine)
        self._mean = _as_floats(running_mean, C, 0.0, "running_mean", cls)
        self._var = _as_floats(running_var, C, 1.0, "running_var", cls)
        if not all(v + eps > 0 for v in self._var):
            raise ValueError(
                f"{cls} needs running_var + eps > 0 in every channel (a variance is "
                f"non-negative), got running_var={list(self._var)} and eps={eps}."
            )
        self._inv_sigma = tuple(1.0 / math.sqrt(v + eps) for v in self._var)
        self._converted = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_features}, eps={self.eps}, affine={self.affine})"

    @property
    def running_mean(self) -> tuple:
        """The running mean, one float per channel."""
        return self._mean

    @property
    def running_var(self) -> tuple:
        """The running variance, one float per channel."""
        return self._var

    @property
    def has_tap(self):
        """Whether the layer has a tap: with ``affine=True`` (an elementwise one)."""
        return self.affine

    @property
    def r_backward_uses_input_tangent(self):
        """Whether :meth:`r_backward` reads the input tangent (with ``affine=True``)."""
        # only the cross term g * t / sigma of the weight's R-gradient reads the tangent
        return self.affine

    def param_shapes(self):
        return [(self.num_features,), (self.num_features,)] if self.affine else []

    def init_params(self, generator, dtype):
        if not self.affine:
            return []
        xp, dev, C = generator.xp, generator.device, self.num_features
        return [xp.ones((C,), dtype=dtype, device=dev), xp.zeros((C,), dtype=dtype, device=dev)]

    # -- constants ---------------------------------------------------------------------

    def _statistics(self, like, xp):
        """``(running_mean, 1 / sigma)`` as ``(C,)`` arrays like ``like`` (cached)."""
        key = (namespace_name(xp), str(device(like)), dtype_name(like.dtype))
        if key not in self._converted:
            dev = device(like)
            self._converted[key] = (
                xp.asarray(self._mean, dtype=like.dtype, device=dev),
                xp.asarray(self._inv_sigma, dtype=like.dtype, device=dev),
            )
        return self._converted[key]

    def _scale(self, params, like, xp):
        """``d = weight / sigma`` (or ``1 / sigma``), ``(C,)``."""
        _, inv = self._statistics(like, xp)
        return params[0] * inv if self.affine else inv

    # -- layouts -----------------------------------------------------------------------

    @staticmethod
    def _channels(v, rank, xp):
        """A ``(C,)`` vector shaped to broadcast over inputs of ``rank`` axes."""
        return xp.reshape(v, (1, v.shape[0]) + (1,) * (rank - 2))

    @staticmethod
    def _channels_k(v, rank, xp):
        """``(C,)`` or ``(C, K)`` shaped to broadcast over internal-layout vectors.

        Vectors of inputs ``(N, C)`` are ``(N, K, C)``; of ``(N, C, S..., L)`` they are
        ``(N, C, S..., K, L)``.
        """
        C = v.shape[0]
        K = v.shape[1] if v.ndim == 2 else 1
        if rank == 2:
            return xp.reshape(xp.matrix_transpose(v) if v.ndim == 2 else v, (1, K, C))
        return xp.reshape(v, (1, C) + (1,) * (rank - 3) + (K, 1))

    @staticmethod
    def _reduce(a, rank, xp):
        """Sum internal-layout vectors over data and positions: ``(C, K)``."""
        if rank == 2:
            return xp.matrix_transpose(xp.sum(a, axis=0))
        axes = (0,) + tuple(range(2, rank - 1)) + (rank,)
        return xp.sum(a, axis=axes)

    def _xhat(self, state, xp):
        """Normalized inputs in the internal layout ``(N, ..., 1, L)`` (cached)."""
        if "xhat" not in state:
            x = state["input"]
            mean, inv = self._statistics(x, xp)
            rank = x.ndim
            xhat = (x - self._channels(mean, rank, xp)) * self._channels(inv, rank, xp)
            state["xhat"] = xp.expand_dims(xhat, axis=-2)
        return state["xhat"]

    def _check_input(self, a):
        if a.ndim not in self._ranks or a.shape[1] != self.num_features:
            raise ValueError(
                f"{self!r} expects inputs of shape {self._dims.format(C=self.num_features)}, "
                f"got shape {tuple(a.shape)}."
            )

    # -- forward and derivatives -------------------------------------------------------

    def forward(self, params, a, xp):
        self._check_input(a)
        mean, inv = self._statistics(a, xp)
        rank = a.ndim
        y = (a - self._channels(mean, rank, xp)) * self._channels(inv, rank, xp)
        if self.affine:
            y = y * self._channels(params[0], rank, xp) + self._channels(params[1], rank, xp)
        return y

    def tangent(self, params, dparams, state, ta, xp):
        rank = state["input"].ndim
        out = None
        if ta is not None:
            out = ta * self._channels_k(self._scale(params, ta, xp), rank, xp)
        if self.affine:
            dw, db = dparams
            own = self._xhat(state, xp) * self._channels_k(dw, rank, xp)
            own = own + self._channels_k(db, rank, xp)
            out = own if out is None else out + own
        return out

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        rank = state["input"].ndim
        grads = []
        if need_params and self.affine:
            grads = [self._reduce(g * self._xhat(state, xp), rank, xp), self._reduce(g, rank, xp)]
        g_in = None
        if need_input:
            g_in = g * self._channels_k(self._scale(params, g, xp), rank, xp)
        return grads, g_in

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        rank = state["input"].ndim
        rgrads = []
        _, inv = self._statistics(g, xp)
        if self.affine:
            dw = dparams[0]
            C, K = dw.shape
            rgw = rgb = None
            if rg is not None:
                rgw = self._reduce(rg * self._xhat(state, xp), rank, xp)
                rgb = self._reduce(rg, rank, xp)
            if ta is not None:
                # R xhat = t / sigma: the cross term between the weight and the input
                cross = self._reduce(g * ta * self._channels_k(inv, rank, xp), rank, xp)
                rgw = cross if rgw is None else rgw + cross
            zeros = xp.zeros((C, K), dtype=g.dtype, device=device(g))
            rgrads = [zeros if rgw is None else rgw, zeros if rgb is None else rgb]
        if not need_input:
            return rgrads, None, None
        d = self._channels_k(self._scale(params, g, xp), rank, xp)
        rg_in = None if rg is None else rg * d
        if self.affine:
            # R d = dweight / sigma
            own = g * self._channels_k(dparams[0] * xp.expand_dims(inv, axis=-1), rank, xp)
            rg_in = own if rg_in is None else rg_in + own
        return rgrads, g * d, rg_in

    # -- the layer protocol ------------------------------------------------------------

    def tap(self, state, output_grads=None, xp=None):
        """``(xhat (N, S..., C), output gradients (N, S..., C, M) or None, None)``.

        The elementwise tap (``kind="elementwise"``): the weight multiplies the
        normalized inputs entry by entry over the channels.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> layer = BatchNorm2d(3, running_mean=[0.0, 1.0, 2.0])
        >>> inputs, grads, shape = layer.tap({"input": xp.ones((2, 3, 4, 5))}, None, xp)
        >>> inputs.shape, grads, shape, [round(v, 12) for v in inputs[0, 0, 0].tolist()]
        ((2, 4, 5, 3), None, None, [0.999995000037, 0.0, -0.999995000037])
        """
        xhat = self._xhat(state, xp)[..., 0, :]
        rank = xhat.ndim
        inputs = xhat if rank == 2 else xp.moveaxis(xhat, 1, -1)
        grads = None
        if output_grads is not None:
            if rank == 2:  # (N, M, C) -> (N, C, M)
                grads = xp.matrix_transpose(output_grads)
            else:  # (N, C, S1.., K, L) -> (N, S1.., L, C, K)
                order = (0,) + tuple(range(2, rank - 1)) + (rank, 1, rank - 1)
                grads = xp.permute_dims(output_grads, order)
        return inputs, grads, None

    def backward_curvature(self, params, state, H, g, xp):
        """``D H D`` per datum, ``D`` the diagonal of ``d`` over a datum's entries (exact).

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> layer = BatchNorm1d(2, running_var=[3.0, 0.0], eps=1.0)
        >>> s = {"input": xp.zeros((1, 2))}
        >>> H = layer.backward_curvature([xp.asarray([2.0, 1.0]), xp.zeros(2)], s,
        ...                              xp.ones((1, 2, 2)), xp.zeros((1, 2)), xp)
        >>> H[0].tolist()
        [[1.0, 1.0], [1.0, 1.0]]
        """
        x = state["input"]
        d = self._scale(params, H, xp)
        positions = math.prod(x.shape[2:])
        C = d.shape[0]
        entries = xp.reshape(xp.broadcast_to(xp.reshape(d, (C, 1)), (C, positions)), (-1,))
        return H * xp.reshape(entries, (1, -1, 1)) * xp.reshape(entries, (1, 1, -1))

    def backward_mean_curvature(self, params, H, statistics, xp):
        """``diag(d) H diag(d)`` over the channels (exact; needs no statistics).

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> layer = BatchNorm2d(2, affine=False, running_var=[4.0, 1.0], eps=0.0)
        >>> layer.backward_mean_curvature([], xp.ones((2, 2)), None, xp).tolist()
        [[0.25, 0.5], [0.5, 1.0]]
        """
        d = self._scale(params, H, xp)
        return H * xp.reshape(d, (-1, 1)) * xp.reshape(d, (1, -1))


class BatchNorm1d(_BatchNorm):
    """Batch normalization of ``(N, C)`` or ``(N, C, L)`` inputs at fixed statistics.

    As ``torch.nn.BatchNorm1d`` in evaluation mode: ``y = weight * (x - running_mean) /
    sqrt(running_var + eps) + bias`` per channel (axis 1). Every tier; the elementwise
    tap ``(N, [L,] C)``; exact curvature rules (see :mod:`curvlinops.nn.normalization`).

    Parameters
    ----------
    num_features : int
        Channels ``C`` (axis 1 of the inputs).
    running_mean, running_var : array or sequence of C numbers, optional
        The fixed statistics (default zeros and ones); an array of any library or a
        list.
    eps : float
        Added to the variance; default ``1e-5``.
    affine : bool
        Whether the layer has parameters ``[weight (C,), bias (C,)]`` (initialized to
        ones and zeros, as PyTorch); default True.

    Raises
    ------
    ValueError
        For statistics of the wrong size or with NaN or Inf, ``running_var + eps <= 0``;
        at the forward pass, for inputs of another shape.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> layer = BatchNorm1d(2, running_mean=[1.0, 0.0], running_var=[4.0, 1.0], eps=0.0)
    >>> params = layer.init(0, xp=xp, dtype=xp.float64)
    >>> layer(params, xp.asarray([[3.0, 2.0]])).tolist()
    [[1.0, 2.0]]
    >>> BatchNorm1d(2, affine=False).expected_param_shapes()
    []
    """

    _ranks = (2, 3)
    _dims = "(N, {C}) or (N, {C}, L)"


class BatchNorm2d(_BatchNorm):
    """Batch normalization of ``(N, C, H, W)`` images at fixed statistics.

    As ``torch.nn.BatchNorm2d`` in evaluation mode: ``y = weight * (x - running_mean) /
    sqrt(running_var + eps) + bias`` per channel (axis 1). Every tier; the elementwise
    tap ``(N, H, W, C)``; exact curvature rules (see :mod:`curvlinops.nn.normalization`).

    Parameters
    ----------
    num_features : int
        Channels ``C`` (axis 1 of the inputs).
    running_mean, running_var : array or sequence of C numbers, optional
        The fixed statistics (default zeros and ones); an array of any library or a
        list.
    eps : float
        Added to the variance; default ``1e-5``.
    affine : bool
        Whether the layer has parameters ``[weight (C,), bias (C,)]`` (initialized to
        ones and zeros, as PyTorch); default True.

    Raises
    ------
    ValueError
        For statistics of the wrong size or with NaN or Inf, ``running_var + eps <= 0``;
        at the forward pass, for inputs of another shape.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> layer = BatchNorm2d(3, running_var=[1.0, 4.0, 9.0], eps=0.0)
    >>> weight, bias = layer.init(0, xp=xp, dtype=xp.float64)
    >>> y = layer([weight, bias + 1.0], xp.ones((2, 3, 4, 4)))
    >>> y.shape, y[0, :, 0, 0].tolist()
    ((2, 3, 4, 4), [2.0, 1.5, 1.3333333333333333])
    """

    _ranks = (4,)
    _dims = "(N, {C}, H, W)"
