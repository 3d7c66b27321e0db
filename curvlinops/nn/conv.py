"""Convolutions :class:`Conv2d` and :class:`Conv1d` on array-API arrays (im2col).

The array API has no convolution, so every rule unfolds its input into patches by
strided slicing (one slice per kernel offset, ``kh * kw`` of them; no loop over pixels,
samples or vectors) and multiplies them with the weight reshaped to a matrix. The
adjoint of the unfolding (col2im) scatters patch gradients back by zero-interleaving
(for strides), zero-padding (for offsets) and addition, again one step per kernel
offset. Groups are an axis of a batched matrix product (no loop over groups).

Layout. Inputs are channels-first ``(N, C_in, H, W)`` (``(N, C_in, L)`` for
:class:`Conv1d`), as in PyTorch. In the internal layout of :mod:`curvlinops.nn.module`
a batch of ``K`` tangents or cotangents is ``(N, C, H, K, W)``; each rule moves ``K``
next to ``N`` and treats the ``N * K`` images as one batch, so all ``K`` vectors go
through one im2col and one matrix product. The unfolded patches of an input are
``(N, S, G, D_g)`` with ``S = H_out * W_out`` output pixels (row-major), ``G`` groups
and ``D_g = C_in / G * kh * kw`` entries per patch, ordered ``(channel, kh, kw)`` as the
weight ``(C_out, C_in / G, kh, kw)`` flattens in C order.

Layer protocol. The tap (``groups == 1``) gives the patches ``(N, S, D_in)``, output
gradients ``(N, S, C_out, M)`` and ``matrix_shape = (C_out, C_in * kh * kw)``: what
K-FAC and per-example gradients read (Grosse & Martens, 2016). With ``groups > 1`` the
weight is block diagonal in that layout and the tap raises
:class:`~curvlinops.models.MissingLayerRuleError`. The per-datum curvature rule is
exact, ``J^T H J`` through two backward passes (:func:`~curvlinops.nn.module.pull_back_curvature`);
the batch-averaged rule maps the outputs' ``(C_out, C_out)`` factor to the inputs'
``(C_in, C_in)``: ``W^T H W`` over the patch entries, whose per-offset diagonal blocks
are summed, each weighted by the fraction of output positions at which that kernel
offset falls inside the input (positions are treated as not interacting, the "expand"
convention; exact for a 1 x 1 kernel).

May import: ``curvlinops._backend``, ``curvlinops.models``, ``.module``.
"""

from __future__ import annotations

import math

from .._backend import device
from ..models import MissingLayerRuleError
from .module import Layer, pull_back_curvature

__all__ = ["Conv2d", "Conv1d"]


def _int_tuple(value, n, what, cls, minimum):
    """``value`` (an int or ``n`` ints) as a tuple of ``n`` ints ``>= minimum``."""
    items = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        items = None
    if (
        items is None
        or len(items) != n
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in items)
    ):
        bound = "positive" if minimum == 1 else "non-negative"
        raise ValueError(
            f"{cls} needs {what} as a {bound} integer or a tuple of {n} such integers, got "
            f"{value!r}."
        )
    return items


class _Conv(Layer):
    """Shared implementation: a 2d convolution; :class:`Conv1d` adds a height of one."""

    has_tap = True
    input_layout = output_layout = "channels_first"
    _spatial = 2

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
    ):
        cls, n = type(self).__name__, self._spatial
        for what, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("groups", groups),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{cls} needs a positive integer {what}, got {value!r}.")
        for what, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value % groups:
                raise ValueError(
                    f"{cls} needs {what} divisible by groups, got {what}={value} and "
                    f"groups={groups}."
                )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _int_tuple(kernel_size, n, "kernel_size", cls, 1)
        self.stride = _int_tuple(stride, n, "stride", cls, 1)
        self.dilation = _int_tuple(dilation, n, "dilation", cls, 1)
        self.bias = bool(bias)
        if isinstance(padding, str):
            if padding == "valid":
                pads = ((0, 0),) * n
            elif padding == "same":
                if any(s != 1 for s in self.stride):
                    raise ValueError(
                        f"{cls} with padding='same' needs stride 1, got stride={stride!r} "
                        "(as in PyTorch); give the padding as integers instead."
                    )
                # as PyTorch: the extra entry of an odd total padding goes at the end
                totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
                pads = tuple((t // 2, t - t // 2) for t in totals)
            else:
                raise ValueError(
                    f"{cls} takes padding 'same', 'valid' or integers, got {padding!r}."
                )
        else:
            pads = tuple((p, p) for p in _int_tuple(padding, n, "padding", cls, 0))
        self.padding = padding if isinstance(padding, str) else tuple(p for p, _ in pads)
        self._pads = pads

    def __repr__(self) -> str:
        def one(t):
            return t[0] if len(t) == 1 else t

        padding = repr(self.padding) if isinstance(self.padding, str) else one(self.padding)
        return (
            f"{type(self).__name__}({self.in_channels}, {self.out_channels}, "
            f"kernel_size={one(self.kernel_size)}, stride={one(self.stride)}, "
            f"padding={padding}, dilation={one(self.dilation)}, groups={self.groups}, "
            f"bias={self.bias})"
        )

    # -- sizes -------------------------------------------------------------------------

    @property
    def _group_in(self):
        """``D_g``: entries of one patch of one group, ``C_in / G * prod(kernel)``."""
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    def _geometry(self):
        """Kernel, stride, dilation and padding as two-dimensional tuples."""
        if self._spatial == 2:
            return self.kernel_size, self.stride, self.dilation, self._pads
        (k,), (s,), (d,), (p,) = self.kernel_size, self.stride, self.dilation, self._pads
        return (1, k), (1, s), (1, d), ((0, 0), p)

    def param_shapes(self):
        shapes = [(self.out_channels, self.in_channels // self.groups, *self.kernel_size)]
        if self.bias:
            shapes.append((self.out_channels,))
        return shapes

    def init_params(self, generator, dtype):
        bound = 1.0 / math.sqrt(self._group_in)
        return [generator.uniform(shape, dtype, -bound, bound) for shape in self.param_shapes()]

    # -- layout conversions (Conv1d inserts a height of one) ----------------------------

    def _check_input(self, a):
        n = self._spatial
        if a.ndim != n + 2 or a.shape[1] != self.in_channels:
            dims = "H, W" if n == 2 else "L"
            raise ValueError(
                f"{self!r} expects channels-first inputs of shape (N, {self.in_channels}, "
                f"{dims}), got shape {tuple(a.shape)}."
            )
        (kh, kw), _, (dh, dw), ((pt, pb), (pl, pr)) = self._geometry()
        spatial = tuple(a.shape[2:]) if n == 2 else (1, a.shape[2])
        if spatial[0] + pt + pb < dh * (kh - 1) + 1 or spatial[1] + pl + pr < dw * (kw - 1) + 1:
            raise ValueError(
                f"{self!r} gets inputs of spatial size {tuple(a.shape[2:])}, smaller than its "
                "dilated kernel plus padding: the output would be empty."
            )

    def _image(self, a, xp):
        """An input ``(N, C, [H,] W)`` as ``(N, C, H, W)``."""
        return a if self._spatial == 2 else xp.expand_dims(a, axis=2)

    def _unimage(self, y, xp):
        """``(N, C, H, ..., W)`` back to the layer's own number of spatial axes."""
        return y if self._spatial == 2 else y[:, :, 0, ...]

    def _batch(self, t, xp):
        """Internal-layout vectors ``(N, C, [H,] K, W)`` as ``N * K`` images, and ``K``."""
        t = self._image(t, xp)
        N, C, H, K, W = t.shape
        return xp.reshape(xp.permute_dims(t, (0, 3, 1, 2, 4)), (N * K, C, H, W)), K

    def _unbatch(self, y, K, xp):
        """``N * K`` images ``(N * K, C, H, W)`` back to the internal layout."""
        NK, C, H, W = y.shape
        y = xp.permute_dims(xp.reshape(y, (NK // K, K, C, H, W)), (0, 2, 3, 1, 4))
        return self._unimage(y, xp)

    def _patches(self, state, xp):
        """Unfolded patches ``(N, S, G, D_g)`` of the forward input (cached)."""
        if "patches" not in state:
            state["patches"] = self._unfold(self._image(state["input"], xp), xp)
        return state["patches"]

    def _unfold(self, x, xp):
        """Images ``(B, C, H, W)`` -> patches ``(B, S, G, D_g)``."""
        cols = _im2col(x, self._geometry(), xp)  # (B, Ho, Wo, C, kk)
        B, Ho, Wo = cols.shape[:3]
        return xp.reshape(cols, (B, Ho * Wo, self.groups, self._group_in))

    def _out_hw(self, state, xp):
        """Output size ``(Ho, Wo)`` for the forward input (as a 2d image)."""
        (kh, kw), (sh, sw), (dh, dw), ((pt, pb), (pl, pr)) = self._geometry()
        H, W = self._image(state["input"], xp).shape[2:]
        Ho = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
        return Ho, Wo

    def _weight(self, params, xp):
        """The weight as ``(G, C_out / G, D_g)``."""
        return xp.reshape(
            params[0], (self.groups, self.out_channels // self.groups, self._group_in)
        )

    def _apply(self, P, Wm, xp):
        """Patches ``(B, S, G, D_g)`` times the weight: rows ``(G, B * S, C_out / G)``."""
        B, S, G, D = P.shape
        rows = xp.reshape(xp.permute_dims(P, (2, 0, 1, 3)), (G, B * S, D))
        return rows @ xp.matrix_transpose(Wm)

    def _to_images(self, rows, B, hw, xp):
        """Rows ``(G, B * S, C_out / G)`` -> images ``(B, C_out, Ho, Wo)``."""
        G, _, Co = rows.shape
        y = xp.permute_dims(xp.reshape(rows, (G, B, *hw, Co)), (1, 0, 4, 2, 3))
        return xp.reshape(y, (B, G * Co, *hw))

    def _grad_rows(self, g, xp):
        """Output vectors ``(N, C_out, [Ho,] K, Wo)`` -> rows ``(G, N * K * S, C_out / G)``."""
        g = self._image(g, xp)
        N, _, Ho, K, Wo = g.shape
        G = self.groups
        g = xp.reshape(g, (N, G, self.out_channels // G, Ho, K, Wo))
        return xp.reshape(xp.permute_dims(g, (1, 0, 4, 3, 5, 2)), (G, N * K * Ho * Wo, -1))

    def _fold(self, rows, state, K, xp):
        """Patch gradients ``(G, N * K * S, D_g)`` (rows ``(n, k, pixel)``) -> input vectors."""
        x = self._image(state["input"], xp)
        N, C, H, W = x.shape
        Ho, Wo = self._out_hw(state, xp)
        G = self.groups
        kk = math.prod(self.kernel_size)
        cols = xp.reshape(rows, (G, N * K, Ho, Wo, C // G, kk))
        cols = xp.reshape(xp.permute_dims(cols, (1, 2, 3, 0, 4, 5)), (N * K, Ho, Wo, C, kk))
        return self._unbatch(_col2im(cols, self._geometry(), (H, W), xp), K, xp)

    def _param_grad(self, left, right, K, xp):
        """Weight gradient from ``(G, K * Co_g, R) @ (G, R, D_g)`` (rows ``(k, o)``)."""
        G, Co = self.groups, self.out_channels // self.groups
        prod = xp.reshape(left @ right, (G, K, Co, self._group_in))
        prod = xp.permute_dims(prod, (0, 2, 3, 1))  # (G, Co_g, D_g, K)
        return xp.reshape(prod, self.param_shapes()[0] + (K,))

    def _weight_tangent(self, dW, xp, order):
        """Weight tangents ``(C_out, ..., K)`` as ``(G, Co_g, D_g, K)`` permuted by ``order``."""
        G, Co = self.groups, self.out_channels // self.groups
        K = dW.shape[-1]
        return xp.permute_dims(xp.reshape(dW, (G, Co, self._group_in, K)), order), K

    # -- forward and derivatives -------------------------------------------------------

    def forward(self, params, a, xp):
        self._check_input(a)
        P = self._unfold(self._image(a, xp), xp)
        state = {"input": a}
        out = self._to_images(
            self._apply(P, self._weight(params, xp), xp), a.shape[0], self._out_hw(state, xp), xp
        )
        if self.bias:
            out = out + xp.reshape(params[1], (1, self.out_channels, 1, 1))
        return self._unimage(out, xp)

    def tangent(self, params, dparams, state, ta, xp):
        P = self._patches(state, xp)
        N, S, G, D = P.shape
        hw = self._out_hw(state, xp)
        # sum_d P[n, s, g, d] dW[g, o, d, k] for all K tangents: (G, N S, D) @ (G, D, K Co_g)
        dWm, K = self._weight_tangent(dparams[0], xp, (0, 2, 3, 1))
        Co = dWm.shape[-1]
        rows = xp.reshape(xp.permute_dims(P, (2, 0, 1, 3)), (G, N * S, D))
        out = rows @ xp.reshape(dWm, (G, D, K * Co))
        out = xp.reshape(out, (G, N, *hw, K, Co))
        out = xp.reshape(xp.permute_dims(out, (1, 0, 5, 2, 4, 3)), (N, G * Co, hw[0], K, hw[1]))
        if self.bias:
            out = out + xp.reshape(dparams[1], (1, self.out_channels, 1, K, 1))
        if ta is not None:
            images, _ = self._batch(ta, xp)
            Pt = self._unfold(images, xp)  # (N K, S, G, D): one im2col for all K tangents
            y = self._to_images(self._apply(Pt, self._weight(params, xp), xp), N * K, hw, xp)
            out = out + self._image(self._unbatch(y, K, xp), xp)
        return self._unimage(out, xp)

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        K = g.shape[-2]
        grads = []
        rows = self._grad_rows(g, xp)  # (G, N K S, Co_g)
        if need_params:
            grads.append(self._weight_grad(rows, state, K, xp))
            if self.bias:
                grads.append(self._bias_grad(g, xp))
        g_in = None
        if need_input:
            g_in = self._fold(rows @ self._weight(params, xp), state, K, xp)
        return grads, g_in

    def _weight_grad(self, rows, state, K, xp):
        """``sum_{n, s} g[n, s, k, o] P[n, s, d]`` from rows ``(G, N K S, Co_g)``."""
        P = self._patches(state, xp)
        N, S, G, D = P.shape
        Co = rows.shape[-1]
        left = xp.permute_dims(xp.reshape(rows, (G, N, K, S, Co)), (0, 2, 4, 1, 3))
        left = xp.reshape(left, (G, K * Co, N * S))
        right = xp.reshape(xp.permute_dims(P, (2, 0, 1, 3)), (G, N * S, D))
        return self._param_grad(left, right, K, xp)

    def _bias_grad(self, g, xp):
        g = self._image(g, xp)  # (N, C_out, Ho, K, Wo)
        return xp.sum(g, axis=(0, 2, 4))

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        W = params[0]
        K = dparams[0].shape[-1]
        P = self._patches(state, xp)
        N, S, G, D = P.shape
        g_rows = self._grad_rows(g, xp)  # (G, N S, Co_g): g has one cotangent
        Co = g_rows.shape[-1]

        # R(g^T P) = (R g)^T P + g^T (R P): the second term is the bilinear cross term
        # between the weight and the parameters that the input depends on.
        rgW = None
        if rg is not None:
            rg_rows = self._grad_rows(rg, xp)
            rgW = self._weight_grad(rg_rows, state, K, xp)
        if ta is not None:
            images, _ = self._batch(ta, xp)
            Pt = xp.reshape(self._unfold(images, xp), (N, K, S, G, D))
            right = xp.reshape(xp.permute_dims(Pt, (3, 0, 2, 1, 4)), (G, N * S, K * D))
            cross = xp.reshape(xp.matrix_transpose(g_rows) @ right, (G, Co, K, D))
            cross = xp.reshape(xp.permute_dims(cross, (0, 1, 3, 2)), tuple(W.shape) + (K,))
            rgW = cross if rgW is None else rgW + cross
        if rgW is None:
            rgW = xp.zeros(tuple(W.shape) + (K,), dtype=W.dtype, device=device(W))
        rgrads = [rgW]
        if self.bias:
            if rg is None:
                rgrads.append(xp.zeros((self.out_channels, K), dtype=W.dtype, device=device(W)))
            else:
                rgrads.append(self._bias_grad(rg, xp))

        if not need_input:
            return rgrads, None, None
        g_in = self._fold(g_rows @ self._weight(params, xp), state, 1, xp)
        # R(g W) = (R g) W + g (R W), the latter for all K tangents: (G, N S, Co_g) @ (G, Co_g, K D)
        dWm, _ = self._weight_tangent(dparams[0], xp, (0, 1, 3, 2))
        cols = xp.reshape(g_rows @ xp.reshape(dWm, (G, Co, K * D)), (G, N, S, K, D))
        cols = xp.reshape(xp.permute_dims(cols, (0, 1, 3, 2, 4)), (G, N * K * S, D))
        if rg is not None:
            cols = cols + rg_rows @ self._weight(params, xp)
        rg_in = self._fold(cols, state, K, xp)
        return rgrads, g_in, rg_in

    # -- the layer protocol ------------------------------------------------------------

    def tap(self, state, output_grads=None, xp=None):
        if self.groups != 1:
            raise MissingLayerRuleError(
                f"{self!r} has groups={self.groups}: its weight is block diagonal in the "
                "(N, S, D) tap layout, which the layer protocol cannot express; curvlinops.nn "
                "gives taps for convolutions with groups=1 only. Use an exact operator (e.g. "
                "GGNLinearOperator) for this model."
            )
        P = self._patches(state, xp)
        N, S, _, D = P.shape
        grads = None
        if output_grads is not None:
            g = self._image(output_grads, xp)  # (N, C_out, Ho, M, Wo)
            M = g.shape[3]
            grads = xp.reshape(xp.permute_dims(g, (0, 2, 4, 1, 3)), (N, S, self.out_channels, M))
        return xp.reshape(P, (N, S, D)), grads, (self.out_channels, D)

    def backward_curvature(self, params, state, H, g, xp):
        return pull_back_curvature(self, params, state, H, g, xp)

    def curvature_statistics(self, params, state, g, statistics, xp):
        # per kernel offset o, over the batch: the output positions whose offset o falls
        # inside the (unpadded) input, and all output positions
        x = self._image(state["input"], xp)
        ones = xp.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=device(x))
        inside = xp.sum(_im2col(ones, self._geometry(), xp), axis=(0, 1, 2, 3))  # (kk,)
        Ho, Wo = self._out_hw(state, xp)
        counts = (x.shape[0] * inside, x.shape[0] * Ho * Wo)
        if statistics is not None:
            counts = (statistics[0] + counts[0], statistics[1] + counts[1])
        return counts

    def backward_mean_curvature(self, params, H, statistics, xp):
        if statistics is None:
            raise NotImplementedError(
                "the batch-averaged curvature rule without statistics",
                " (pass what curvature_statistics accumulated over the data)",
            )
        inside, positions = statistics
        fractions = inside / positions  # (kk,)
        G, Co = self.groups, self.out_channels // self.groups
        Cg, kk = self.in_channels // G, math.prod(self.kernel_size)
        Wm = self._weight(params, xp)  # (G, Co_g, D_g)
        # W^T H W over the patch entries of all groups: [g, g', d, d'], d = (channel, offset)
        Hb = xp.permute_dims(xp.reshape(H, (G, Co, G, Co)), (0, 2, 1, 3))
        R = xp.matrix_transpose(Wm)[:, None, :, :] @ Hb @ Wm[None, :, :, :]
        R = xp.reshape(R, (G, G, Cg, kk, Cg, kk))
        R = xp.permute_dims(R, (0, 2, 1, 4, 3, 5))  # (G, Cg, G', Cg', kk, kk')
        R = xp.reshape(R, (self.in_channels, self.in_channels, kk, kk))
        # each input pixel's block gathers the offsets' blocks of the output positions
        # that reach it (positions do not interact: "expand")
        return xp.linalg.diagonal(R) @ fractions


class Conv2d(_Conv):
    """2d convolution (cross-correlation) of channels-first images, as ``torch.nn.Conv2d``.

    Inputs ``(N, C_in, H, W)``, outputs ``(N, C_out, H_out, W_out)``. Parameters are
    ``[weight (C_out, C_in / groups, kh, kw), bias (C_out,)]`` (or ``[weight]``), so
    PyTorch weights copy across. Built from strided slicing and matrix products (see
    :mod:`curvlinops.nn.conv`); every tier, and the tap ``(N, H_out * W_out,
    C_in * kh * kw)`` for ``groups=1``.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of the inputs and outputs (both divisible by ``groups``).
    kernel_size : int or tuple of 2 ints
        ``(kh, kw)``.
    stride : int or tuple of 2 ints
        Step of the kernel; default 1.
    padding : int, tuple of 2 ints, "valid" or "same"
        Zeros added on both sides of each spatial axis; ``"same"`` (stride 1 only)
        keeps the spatial size, with the extra zero of an odd total at the end, as in
        PyTorch. Default 0.
    dilation : int or tuple of 2 ints
        Spacing of the kernel's entries; default 1.
    groups : int
        Number of blocked connections from inputs to outputs; default 1.
    bias : bool
        Whether the layer has a bias.

    Raises
    ------
    ValueError
        For sizes that are not positive integers, channels not divisible by ``groups``,
        an unknown padding, or ``padding="same"`` with a stride other than 1; at the
        forward pass, for inputs that are not ``(N, C_in, H, W)`` or are smaller than
        the dilated kernel.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> layer = Conv2d(1, 1, kernel_size=2, bias=False)
    >>> x = xp.reshape(xp.arange(9.0), (1, 1, 3, 3))
    >>> layer([xp.ones((1, 1, 2, 2))], x)[0, 0].tolist()
    [[8.0, 12.0], [20.0, 24.0]]
    >>> model = Conv2d(3, 8, 3, stride=2, padding=1)
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> [p.shape for p in params], model(params, xp.ones((4, 3, 9, 9))).shape
    ([(8, 3, 3, 3), (8,)], (4, 8, 5, 5))
    """

    _spatial = 2


class Conv1d(_Conv):
    """1d convolution (cross-correlation) of channels-first sequences, as ``torch.nn.Conv1d``.

    Inputs ``(N, C_in, L)``, outputs ``(N, C_out, L_out)``, parameters
    ``[weight (C_out, C_in / groups, k), bias (C_out,)]``. The same rules as
    :class:`Conv2d` (it is one with an image height of one); the tap is
    ``(N, L_out, C_in * k)`` for ``groups=1``. Arguments as :class:`Conv2d`, each an
    int (or a 1-tuple).

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> layer = Conv1d(1, 1, kernel_size=2, padding="same", bias=False)
    >>> x = xp.asarray([[[1.0, 2.0, 3.0]]])
    >>> layer([xp.asarray([[[1.0, 10.0]]])], x).tolist()
    [[[21.0, 32.0, 3.0]]]
    """

    _spatial = 1


# -- im2col and its adjoint ------------------------------------------------------------


def _pad(x, before, after, axis, xp):
    """``x`` with ``before`` and ``after`` zeros along ``axis`` (by concatenation)."""
    if before == 0 and after == 0:
        return x
    parts = []
    for size in (before, None, after):
        if size is None:
            parts.append(x)
        elif size:
            shape = list(x.shape)
            shape[axis] = size
            parts.append(xp.zeros(tuple(shape), dtype=x.dtype, device=device(x)))
    return xp.concat(parts, axis=axis)


def _spread(x, step, axis, xp):
    """``x`` with ``step - 1`` zeros between consecutive entries along ``axis``."""
    if step == 1:
        return x
    n = x.shape[axis]
    zeros = xp.zeros_like(x)
    stacked = xp.stack([x] + [zeros] * (step - 1), axis=axis + 1)
    shape = tuple(x.shape[:axis]) + (n * step,) + tuple(x.shape[axis + 1 :])
    spread = xp.reshape(stacked, shape)
    # the trailing Ellipsis: the standard needs an index for every axis or an ellipsis
    index = (slice(None),) * axis + (slice(0, (n - 1) * step + 1), Ellipsis)
    return spread[index]


def _im2col(x, geometry, xp):
    """Images ``(B, C, H, W)`` -> patches ``(B, Ho, Wo, C, kh * kw)``.

    One strided slice per kernel offset ``(i, j)``: entry ``[b, p, q, c, i kw + j]`` is
    the padded image at ``(p sh + i dh, q sw + j dw)``.
    """
    (kh, kw), (sh, sw), (dh, dw), ((pt, pb), (pl, pr)) = geometry
    x = _pad(_pad(x, pt, pb, 2, xp), pl, pr, 3, xp)
    Ho = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    Wo = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    slices = [
        x[:, :, i * dh : i * dh + sh * (Ho - 1) + 1 : sh, j * dw : j * dw + sw * (Wo - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    return xp.permute_dims(xp.stack(slices, axis=-1), (0, 2, 3, 1, 4))


def _col2im(cols, geometry, hw, xp):
    """The adjoint of :func:`_im2col`: patches ``(B, Ho, Wo, C, kh * kw)`` -> ``(B, C, H, W)``.

    Each kernel offset's slice is spread to the stride (zeros between entries), padded
    to its position in the padded image and added; the padding is cut off at the end.
    """
    (kh, kw), (sh, sw), (dh, dw), ((pt, pb), (pl, pr)) = geometry
    H, W = hw
    Hp, Wp = H + pt + pb, W + pl + pr
    cols = xp.permute_dims(cols, (0, 3, 1, 2, 4))  # (B, C, Ho, Wo, kk)
    total = None
    for i in range(kh):
        for j in range(kw):
            y = _spread(_spread(cols[..., i * kw + j], sh, 2, xp), sw, 3, xp)
            y = _pad(y, i * dh, Hp - i * dh - y.shape[2], 2, xp)
            y = _pad(y, j * dw, Wp - j * dw - y.shape[3], 3, xp)
            total = y if total is None else total + y
    return total[:, :, pt : pt + H, pl : pl + W]
