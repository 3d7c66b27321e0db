"""Pooling layers on channels-first arrays: average, max and global average pooling.

:class:`AvgPool2d`, :class:`MaxPool2d` (and :class:`AvgPool1d`, :class:`MaxPool1d`)
slide a window over the spatial axes of ``(N, C, H, W)`` (``(N, C, L)``) inputs, as
``torch.nn.AvgPool2d`` (``count_include_pad=True``, ``ceil_mode=False``) and
``torch.nn.MaxPool2d`` (padding counts as ``-inf``) do. :class:`GlobalAvgPool2d`
averages each channel over all pixels, ``(N, C, H, W) -> (N, C)`` (or ``(N, C, 1, 1)``,
as ``torch.nn.AdaptiveAvgPool2d(1)``).

Every rule is one strided slice per kernel offset (no loop over samples, pixels,
channels or vectors); the adjoint (the backward pass) adds each offset's slice in
place into one zero-padded buffer at its strided position (for arrays without slice
assignment, as JAX's: spreads it to the stride, pads it to its place and adds). In the
internal layout of :mod:`curvlinops.nn.module` a batch of ``K`` vectors of an image is
``(N, C, H, K, W)``: the windows are slices of axes 2 and 4, so all ``K`` vectors go
through each slice together. The layers have no parameters and are linear in their
inputs (max pooling piecewise linear, with the window's maximum chosen as in PyTorch:
the first one in the window's row-major order), so the second-order rule is the
backward pass applied to ``g`` and ``R g`` (it never reads the input tangent).

Layer protocol. Per datum (:meth:`~curvlinops.nn.Layer.backward_curvature`) the rule
is the exact ``J^T H J`` (:func:`~curvlinops.nn.module.pull_back_curvature`; a closed
form for :class:`GlobalAvgPool2d`). The batch-averaged factors
(:meth:`~curvlinops.nn.Layer.backward_mean_curvature`) are ``(C, C)`` over the
channels, the sum over items (an item is a position ``(n, pixel)``) of each item's
diagonal block, with different positions treated as not interacting (the "expand"
convention) and the output factor shared evenly among the output items:

- average pooling (kernel ``k = kh * kw``): ``H_in = H_out * (sum_o n_o / S_out) / k^2``
  with ``n_o`` the output positions whose kernel offset ``o`` lies inside the unpadded
  input and ``S_out`` the output positions (counts from the input shape);
- max pooling: ``H_in = H_out * P`` with ``P[c, c']`` the fraction of output items at
  which channels ``c`` and ``c'`` take their maximum at the same kernel offset
  (accumulated from the forward pass's choices);
- global average pooling: ``H_in = H_out / S`` with ``S = H * W`` (the items of the
  output are the data).

These are exact when every output item carries the same block and the output factor
has no blocks between different items (e.g. one output position per datum).

May import: ``curvlinops._backend``, ``.conv``, ``.module``.
"""

from __future__ import annotations

import math

from .._backend import device
from .conv import _int_tuple, _pad, _pad_value, _spread, _supports_setitem
from .module import Layer, pull_back_curvature

__all__ = ["AvgPool2d", "AvgPool1d", "MaxPool2d", "MaxPool1d", "GlobalAvgPool2d"]


class _Pool(Layer):
    """Shared implementation of windowed pooling in 2d; the 1d layers add a height of one."""

    input_layout = output_layout = "channels_first"
    r_backward_uses_input_tangent = False
    _spatial = 2
    _has_dilation = False

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        cls, n = type(self).__name__, self._spatial
        self.kernel_size = _int_tuple(kernel_size, n, "kernel_size", cls, 1)
        self.stride = (
            self.kernel_size if stride is None else _int_tuple(stride, n, "stride", cls, 1)
        )
        self.padding = _int_tuple(padding, n, "padding", cls, 0)
        self.dilation = _int_tuple(dilation, n, "dilation", cls, 1)
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size, strict=True)):
            raise ValueError(
                f"{cls} needs padding at most half the kernel size (as in PyTorch), got "
                f"padding={padding!r} for kernel_size={kernel_size!r}."
            )
        if ceil_mode:
            raise ValueError(
                f"{cls} supports ceil_mode=False only (the output size rounds down, as "
                "PyTorch's default); drop ceil_mode=True or pad the inputs instead."
            )

    def __repr__(self) -> str:
        def one(t):
            return t[0] if len(t) == 1 else t

        dilation = f", dilation={one(self.dilation)}" if self._has_dilation else ""
        return (
            f"{type(self).__name__}(kernel_size={one(self.kernel_size)}, "
            f"stride={one(self.stride)}, padding={one(self.padding)}{dilation})"
        )

    # -- geometry ----------------------------------------------------------------------

    def _geometry(self):
        """Kernel, stride, dilation and padding as two-dimensional tuples."""
        if self._spatial == 2:
            return self.kernel_size, self.stride, self.dilation, self.padding
        (k,), (s,), (d,), (p,) = self.kernel_size, self.stride, self.dilation, self.padding
        return (1, k), (1, s), (1, d), (0, p)

    @property
    def _window_size(self):
        return math.prod(self.kernel_size)

    def _out_hw(self, hw):
        """Output size for inputs of spatial size ``hw`` (as a 2d image)."""
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self._geometry()
        H, W = hw
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        return Ho, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _in_hw(self, state):
        a = state["input"]
        return tuple(a.shape[2:]) if self._spatial == 2 else (1, a.shape[2])

    def _check_input(self, a):
        n = self._spatial
        if a.ndim != n + 2:
            dims = "H, W" if n == 2 else "L"
            raise ValueError(
                f"{self!r} expects channels-first inputs of shape (N, C, {dims}), got shape "
                f"{tuple(a.shape)}."
            )
        hw = tuple(a.shape[2:]) if n == 2 else (1, a.shape[2])
        if min(self._out_hw(hw)) < 1:
            raise ValueError(
                f"{self!r} gets inputs of spatial size {tuple(a.shape[2:])}, smaller than its "
                "(dilated) kernel plus padding: the output would be empty."
            )

    # -- layouts: 1d inputs get a height of one; windows are slices of two axes --------

    def _image(self, a, xp):
        """``(N, C, [H,] ...)`` with a height axis (inserted at axis 2 for 1d layers)."""
        return a if self._spatial == 2 else xp.expand_dims(a, axis=2)

    def _unimage(self, y):
        return y if self._spatial == 2 else y[:, :, 0, ...]

    def _offsets(self):
        """The kernel offsets ``(o, i, j)`` in row-major order."""
        (kh, kw) = self._geometry()[0]
        return [(i * kw + j, i, j) for i in range(kh) for j in range(kw)]

    def _windows(self, x, axes, out_hw, value, xp):
        """For each kernel offset the strided slice ``(..., Ho, ..., Wo)`` of padded ``x``."""
        _, (sh, sw), (dh, dw), (ph, pw) = self._geometry()
        ah, aw = axes
        x = _pad_value(_pad_value(x, ph, ph, ah, value, xp), pw, pw, aw, value, xp)
        Ho, Wo = out_hw
        out = []
        for _, i, j in self._offsets():
            index = [slice(None)] * x.ndim
            index[ah] = slice(i * dh, i * dh + sh * (Ho - 1) + 1, sh)
            index[aw] = slice(j * dw, j * dw + sw * (Wo - 1) + 1, sw)
            out.append(x[tuple(index)])
        return out

    def _scatter(self, pieces, axes, in_hw, xp):
        """The adjoint of :meth:`_windows`: add each offset's slice back at its place.

        ``pieces`` yields ``(offset, i, j, slice)``; returns the unpadded sum. Where the
        arrays take slice assignment, each slice is added in place into one zero-padded
        buffer at its strided position; else it is spread to the stride (zeros between
        entries), padded to its place and added.
        """
        _, (sh, sw), (dh, dw), (ph, pw) = self._geometry()
        ah, aw = axes
        H, W = in_hw
        Hp, Wp = H + 2 * ph, W + 2 * pw
        pieces = list(pieces)
        y0 = pieces[0][3]
        if _supports_setitem(y0, xp):
            shape = list(y0.shape)
            shape[ah], shape[aw] = Hp, Wp
            total = xp.zeros(tuple(shape), dtype=y0.dtype, device=device(y0))
            for _, i, j, y in pieces:
                index = [slice(None)] * y.ndim
                index[ah] = slice(i * dh, i * dh + sh * (y.shape[ah] - 1) + 1, sh)
                index[aw] = slice(j * dw, j * dw + sw * (y.shape[aw] - 1) + 1, sw)
                total[tuple(index)] += y
        else:
            total = None
            for _, i, j, y in pieces:
                y = _spread(_spread(y, sh, ah, xp), sw, aw, xp)
                y = _pad(y, i * dh, Hp - i * dh - y.shape[ah], ah, xp)
                y = _pad(y, j * dw, Wp - j * dw - y.shape[aw], aw, xp)
                total = y if total is None else total + y
        index = [slice(None)] * total.ndim
        index[ah], index[aw] = slice(ph, ph + H), slice(pw, pw + W)
        return total[tuple(index)]

    # -- derivatives: linear maps of the inputs (``_map``) and their adjoint ------------

    def forward(self, params, a, xp):
        self._check_input(a)
        x = self._image(a, xp)
        return self._unimage(self._pool(x, xp))

    def tangent(self, params, dparams, state, ta, xp):
        if ta is None:
            return None
        return self._unimage(self._map(state, self._image(ta, xp), xp))

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        if not need_input:
            return [], None
        return [], self._unimage(self._adjoint(state, self._image(g, xp), xp))

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        if not need_input:
            return [], None, None
        _, g_in = self.backward(params, state, g, xp)
        rg_in = None if rg is None else self.backward(params, state, rg, xp)[1]
        return [], g_in, rg_in

    def backward_curvature(self, params, state, H, g, xp):
        return pull_back_curvature(self, params, state, H, g, xp)


class _AvgPool(_Pool):
    """Average pooling with ``count_include_pad=True``: zeros padded, divisor ``kh * kw``."""

    def __init__(
        self,
        kernel_size,
        stride=None,
        padding=0,
        ceil_mode=False,
        count_include_pad=True,
        divisor_override=None,
    ):
        super().__init__(kernel_size, stride, padding, 1, ceil_mode)
        cls = type(self).__name__
        if not count_include_pad:
            raise ValueError(
                f"{cls} supports count_include_pad=True only (the divisor is always the "
                "kernel size, padded zeros included, as PyTorch's default)."
            )
        if divisor_override is not None:
            raise ValueError(
                f"{cls} does not support divisor_override (got {divisor_override!r}); the "
                "divisor is the kernel size."
            )

    def _sum_windows(self, x, axes, out_hw, xp):
        total = None
        for w in self._windows(x, axes, out_hw, 0.0, xp):
            total = w if total is None else total + w
        return total * (1.0 / self._window_size)

    def _pool(self, x, xp):
        return self._sum_windows(x, (2, 3), self._out_hw(x.shape[2:]), xp)

    def _map(self, state, t, xp):
        return self._sum_windows(t, (2, 4), self._out_hw(self._in_hw(state)), xp)

    def _adjoint(self, state, g, xp):
        g = g * (1.0 / self._window_size)
        pieces = ((o, i, j, g) for o, i, j in self._offsets())
        return self._scatter(pieces, (2, 4), self._in_hw(state), xp)

    def _valid_counts(self, hw):
        """``(sum_o n_o, S_out)`` per datum: output positions per offset inside the input."""
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self._geometry()
        Ho, Wo = self._out_hw(hw)

        def inside(size, out, k, s, d, p):
            # for each offset the output positions whose entry lies in [0, size)
            return [sum(0 <= q * s + i * d - p < size for q in range(out)) for i in range(k)]

        rows = inside(hw[0], Ho, kh, sh, dh, ph)
        cols = inside(hw[1], Wo, kw, sw, dw, pw)
        return sum(rows) * sum(cols), Ho * Wo

    def curvature_statistics(self, params, state, g, statistics, xp):
        N = state["input"].shape[0]
        valid, positions = self._valid_counts(self._in_hw(state))
        valid, items = N * valid, N * positions
        if statistics is not None:
            valid, items = valid + statistics[0], items + statistics[1]
        return valid, items

    def backward_mean_curvature(self, params, H, statistics, xp):
        if statistics is None:
            raise NotImplementedError(
                "the batch-averaged curvature rule without statistics",
                " (pass what curvature_statistics accumulated over the data)",
            )
        valid, items = statistics
        return H * (valid / (items * self._window_size**2))


class _MaxPool(_Pool):
    """Max pooling, padding counting as ``-inf``; the first maximum of a window wins."""

    _has_dilation = True

    def __init__(
        self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
    ):
        super().__init__(kernel_size, stride, padding, dilation, ceil_mode)
        if return_indices:
            raise ValueError(
                f"{type(self).__name__} does not support return_indices=True (its output is "
                "the pooled array only)."
            )

    def _pool(self, x, xp):
        windows = self._windows(x, (2, 3), self._out_hw(x.shape[2:]), -math.inf, xp)
        out = windows[0]
        for w in windows[1:]:
            out = xp.maximum(out, w)
        return out

    def _choice(self, state, xp):
        """Offset of each output entry's maximum ``(N, C, Ho, 1, Wo)`` (cached)."""
        if "choice" not in state:
            x = self._image(state["input"], xp)
            windows = self._windows(x, (2, 3), self._out_hw(x.shape[2:]), -math.inf, xp)
            # argmax returns the first maximum, as PyTorch's kernels keep the first one
            choice = xp.argmax(xp.stack(windows, axis=-1), axis=-1)
            state["choice"] = xp.expand_dims(choice, axis=-2)
        return state["choice"]

    def _map(self, state, t, xp):
        choice = self._choice(state, xp)
        out_hw = self._out_hw(self._in_hw(state))
        total = None
        for (o, _, _), w in zip(
            self._offsets(), self._windows(t, (2, 4), out_hw, 0.0, xp), strict=True
        ):
            picked = xp.astype(choice == o, t.dtype) * w
            total = picked if total is None else total + picked
        return total

    def _adjoint(self, state, g, xp):
        choice = self._choice(state, xp)
        pieces = ((o, i, j, xp.astype(choice == o, g.dtype) * g) for o, i, j in self._offsets())
        return self._scatter(pieces, (2, 4), self._in_hw(state), xp)

    def curvature_statistics(self, params, state, g, statistics, xp):
        choice = self._choice(state, xp)[..., 0, :]  # (N, C, Ho, Wo)
        N, C = choice.shape[:2]
        offsets = xp.arange(self._window_size, dtype=choice.dtype, device=device(choice))
        onehot = xp.astype(xp.expand_dims(choice, axis=-1) == offsets, g.dtype)
        rows = xp.reshape(xp.permute_dims(onehot, (1, 0, 2, 3, 4)), (C, -1))
        same = rows @ xp.matrix_transpose(rows)  # sum over items of onehot onehot^T
        items = N * choice.shape[2] * choice.shape[3]
        if statistics is not None:
            same, items = same + statistics[0], items + statistics[1]
        return same, items

    def backward_mean_curvature(self, params, H, statistics, xp):
        if statistics is None:
            raise NotImplementedError(
                "the batch-averaged curvature rule without statistics",
                " (pass what curvature_statistics accumulated over the data)",
            )
        same, items = statistics
        return H * (same / items)


class AvgPool2d(_AvgPool):
    """2d average pooling of channels-first images, as ``torch.nn.AvgPool2d``.

    Inputs ``(N, C, H, W)``, outputs ``(N, C, H_out, W_out)``; each output is the mean
    of its window, padded zeros included (``count_include_pad=True``), with
    ``H_out = (H + 2 p - k) // s + 1`` (``ceil_mode=False``). No parameters.
    Layer protocol: the per-datum rule is exact (``J^T H J``); the batch-averaged rule
    ``H_in = H_out * (sum_o n_o / S_out) / (kh kw)^2`` follows the "expand" convention
    (see :mod:`curvlinops.nn.pooling`).

    Parameters
    ----------
    kernel_size : int or tuple of 2 ints
        Window ``(kh, kw)``.
    stride : int or tuple of 2 ints, optional
        Step of the window; default the kernel size.
    padding : int or tuple of 2 ints
        Zeros added on both sides (at most half the kernel size); default 0.
    ceil_mode, count_include_pad, divisor_override
        Accepted with PyTorch's defaults only (``False``, ``True``, ``None``); other
        values raise a ValueError.

    Raises
    ------
    ValueError
        For sizes that are not positive integers, padding over half the kernel, other
        options than the defaults; at the forward pass, for inputs that are not
        ``(N, C, H, W)`` or are smaller than the kernel.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> x = xp.reshape(xp.arange(16.0), (1, 1, 4, 4))
    >>> AvgPool2d(2)([], x)[0, 0].tolist()
    [[2.5, 4.5], [10.5, 12.5]]
    >>> AvgPool2d(3, stride=2, padding=1)([], xp.ones((2, 3, 5, 5))).shape
    (2, 3, 3, 3)
    """

    _spatial = 2


class AvgPool1d(_AvgPool):
    """1d average pooling of channels-first sequences, as ``torch.nn.AvgPool1d``.

    Inputs ``(N, C, L)``, outputs ``(N, C, L_out)``; arguments as :class:`AvgPool2d`,
    each an int (or a 1-tuple). The same rules (it is an :class:`AvgPool2d` with an
    image height of one).

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> AvgPool1d(2)([], xp.asarray([[[1.0, 3.0, 5.0, 7.0]]])).tolist()
    [[[2.0, 6.0]]]
    """

    _spatial = 1


class MaxPool2d(_MaxPool):
    """2d max pooling of channels-first images, as ``torch.nn.MaxPool2d``.

    Inputs ``(N, C, H, W)``, outputs ``(N, C, H_out, W_out)`` with ``H_out =
    (H + 2 p - d (k - 1) - 1) // s + 1``; padding counts as ``-inf``. Where a window
    has several maxima the first one (row-major in the window) is the one the
    derivatives route through, as PyTorch's CPU kernels do. No parameters. Layer
    protocol: the per-datum rule is exact (``J^T H J`` at the chosen maxima); the
    batch-averaged rule ``H_in = H_out * P`` (``P[c, c']`` the fraction of output items
    where channels ``c`` and ``c'`` pick the same offset) follows the "expand"
    convention (see :mod:`curvlinops.nn.pooling`).

    Parameters
    ----------
    kernel_size : int or tuple of 2 ints
        Window ``(kh, kw)``.
    stride : int or tuple of 2 ints, optional
        Step of the window; default the kernel size.
    padding : int or tuple of 2 ints
        ``-inf`` added on both sides (at most half the kernel size); default 0.
    dilation : int or tuple of 2 ints
        Spacing of the window's entries; default 1.
    ceil_mode, return_indices
        Accepted as ``False`` only (PyTorch's defaults); ``True`` raises a ValueError.

    Raises
    ------
    ValueError
        For sizes that are not positive integers, padding over half the kernel, the
        unsupported options; at the forward pass, for inputs that are not
        ``(N, C, H, W)`` or are smaller than the dilated kernel.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> x = xp.reshape(xp.arange(16.0), (1, 1, 4, 4))
    >>> MaxPool2d(2)([], x)[0, 0].tolist()
    [[5.0, 7.0], [13.0, 15.0]]
    >>> MaxPool2d(3, stride=2, padding=1, dilation=1)([], -xp.ones((1, 1, 3, 3)))[0, 0].tolist()
    [[-1.0, -1.0], [-1.0, -1.0]]
    """

    _spatial = 2


class MaxPool1d(_MaxPool):
    """1d max pooling of channels-first sequences, as ``torch.nn.MaxPool1d``.

    Inputs ``(N, C, L)``, outputs ``(N, C, L_out)``; arguments as :class:`MaxPool2d`,
    each an int (or a 1-tuple), and the same rules.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> MaxPool1d(2)([], xp.asarray([[[1.0, 3.0, 7.0, 5.0]]])).tolist()
    [[[3.0, 7.0]]]
    """

    _spatial = 1


class GlobalAvgPool2d(Layer):
    """Mean of each channel over all pixels: ``(N, C, H, W) -> (N, C)``.

    With ``keepdim=True`` the outputs are ``(N, C, 1, 1)``, what
    ``torch.nn.AdaptiveAvgPool2d(1)`` computes (``keepdim=False`` is that followed by
    ``torch.nn.Flatten()``). No parameters. Layer protocol: the per-datum rule is exact
    (``H_in[(c, s), (c', s')] = H_out[c, c'] / S^2``, ``S = H W``); the batch-averaged
    rule ``H_in = H_out / S`` follows the "expand" convention (each input pixel is an
    item, each datum one output item).

    Parameters
    ----------
    keepdim : bool
        Whether to keep the two spatial axes (of size one); default False.

    Raises
    ------
    ValueError
        At the forward pass, for inputs that are not ``(N, C, H, W)``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> x = xp.reshape(xp.arange(8.0), (1, 2, 2, 2))
    >>> GlobalAvgPool2d()([], x).tolist()
    [[1.5, 5.5]]
    >>> GlobalAvgPool2d(keepdim=True)([], x).shape
    (1, 2, 1, 1)
    """

    input_layout = "channels_first"
    r_backward_uses_input_tangent = False

    def __init__(self, keepdim=False):
        self.keepdim = bool(keepdim)

    @property
    def output_layout(self):
        """``"features_last"`` (outputs ``(N, C)``), or ``"channels_first"`` with ``keepdim``."""
        return "channels_first" if self.keepdim else "features_last"

    def __repr__(self) -> str:
        return f"GlobalAvgPool2d(keepdim={self.keepdim})"

    def forward(self, params, a, xp):
        if a.ndim != 4:
            raise ValueError(
                f"{self!r} expects channels-first inputs of shape (N, C, H, W), got shape "
                f"{tuple(a.shape)}."
            )
        return xp.mean(a, axis=(2, 3), keepdims=self.keepdim)

    # internal layout: inputs (N, C, H, K, W); outputs (N, K, C) or (N, C, 1, K, 1)

    def tangent(self, params, dparams, state, ta, xp):
        if ta is None:
            return None
        mean = xp.mean(ta, axis=(2, 4), keepdims=self.keepdim)
        return mean if self.keepdim else xp.permute_dims(mean, (0, 2, 1))

    def _spread_back(self, state, g, xp):
        N, C, H, W = state["input"].shape
        if not self.keepdim:
            K = g.shape[1]
            g = xp.reshape(xp.permute_dims(g, (0, 2, 1)), (N, C, 1, K, 1))
        K = g.shape[3]
        return xp.broadcast_to(g, (N, C, H, K, W)) * (1.0 / (H * W))

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        return [], (self._spread_back(state, g, xp) if need_input else None)

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        if not need_input:
            return [], None, None
        rg_in = None if rg is None else self._spread_back(state, rg, xp)
        return [], self._spread_back(state, g, xp), rg_in

    def backward_curvature(self, params, state, H, g, xp):
        N, C, Hh, W = state["input"].shape
        S = Hh * W
        blocks = xp.broadcast_to(xp.reshape(H, (N, C, 1, C, 1)) * (1.0 / S**2), (N, C, S, C, S))
        return xp.reshape(blocks, (N, C * S, C * S))

    def curvature_statistics(self, params, state, g, statistics, xp):
        N, _, H, W = state["input"].shape
        inverse, count = N / (H * W), N
        if statistics is not None:
            inverse, count = inverse + statistics[0], count + statistics[1]
        return inverse, count

    def backward_mean_curvature(self, params, H, statistics, xp):
        if statistics is None:
            raise NotImplementedError(
                "the batch-averaged curvature rule without statistics",
                " (pass what curvature_statistics accumulated over the data)",
            )
        inverse, count = statistics
        return H * (inverse / count)
