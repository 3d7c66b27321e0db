"""Convolutions :class:`Conv2d` and :class:`Conv1d` on array-API arrays (shifted products).

The array API has no convolution, so every rule writes its input once into a
channels-last *phase grid* and turns each kernel offset into a shift of rows: with
stride 1 the grid is the zero-padded image, one row of ``C_in`` entries per pixel and
image, ordered ``(y, x, n)`` (pixels row-major, the ``N`` images innermost), and kernel
offset ``(i, j)`` reads the rows shifted by ``(i dh Wp + j dw) N`` (``Wp`` the padded
width). So the output, on the band of the first ``Ho`` grid rows (the positions past
``Wo`` in each are dropped at the end), is a sum of ``kh * kw`` two-dimensional matrix
products ``X[shift_o:] @ W_o`` of contiguous row ranges with the ``(C_in, C_out)``
weight slice of each offset: no patch matrix, one layout copy of the input and one of
the output. A stride ``(sh, sw)`` splits the padded image into ``sh * sw`` phases
(pixels ``(y sh + a, x sw + b)`` form phase ``(a, b)``), each of which is again such a
grid, and each offset reads one phase. The adjoints are the same loop: the weight
gradient sums ``X[shift_o:]^T @ g`` per offset, and the input gradient (col2im) sums
``g[-shift_o:] @ W_o^T`` with the output gradients on the grid (zero outside
``Ho x Wo`` and in leading zero rows), then cuts the padding off (interleaving the phases
first). One step per kernel offset; no loop over pixels, samples, channels or
vectors. Groups are the leading axis of the grids and a batched matrix product (a
plain one for ``groups == 1``). Zero padding is one allocation and one slice
assignment where the arrays take it (NumPy, CuPy, torch), else slicing and
concatenation (JAX).

Layout. Inputs are channels-first ``(N, C_in, H, W)`` (``(N, C_in, L)`` for
:class:`Conv1d`), as in PyTorch. In the internal layout of :mod:`curvlinops.nn.module`
a batch of ``K`` tangents or cotangents is ``(N, C, H, K, W)``; the grid of such a
batch has ``K`` rows per pixel and image (the shifts are ``K`` times as long), so all
``K`` vectors go through one grid and one matrix product per offset; weight tangents
with ``K`` columns each multiply the forward input's grid (one row per pixel and
image). A linearization keeps the forward input's grid in its state
(:meth:`_Conv._grid`; about the size of the input) for the later products. The weight
``(C_out, C_in / G, kh, kw)`` flattens in C order, so a patch of
``D_g = C_in / G * kh * kw`` entries is ordered ``(channel, kh, kw)``; only the tap
builds such patches.

Layer protocol. The tap gives the patches ``(N, S, C_in * kh * kw)`` (``S =
H_out * W_out`` output pixels, row-major), output
gradients ``(N, S, C_out, M)`` and ``matrix_shape = (C_out, D_g)``: what
K-FAC and per-example gradients read (Grosse & Martens, 2016). With ``groups = G > 1``
the weight is block diagonal over the groups in that layout: the tap says so
(:attr:`~curvlinops.models.LayerTap.groups`), group ``g``'s patch being the contiguous
``D_g`` entries of its channels and its outputs the ``C_out / G`` channels of its
weight rows, and the curvature operators treat each group as a layer of its own (a
depthwise convolution, ``G = C_in``, included). The per-datum curvature rule is
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

    # -- the phase grid: channels-last images whose kernel offsets are row shifts ------

    def _plan(self, hw):
        """Sizes of the phase grid for inputs of spatial size ``hw`` (as a 2d image).

        Returns ``(Ho, Wo, Hq, Wq, offsets)`` where ``offsets`` lists, per kernel offset
        ``(i, j)`` in row-major order, its phase and its shift in grid pixels.
        """
        (kh, kw), (sh, sw), (dh, dw), ((pt, pb), (pl, pr)) = self._geometry()
        H, W = hw
        Ho = (H + pt + pb - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + pl + pr - dw * (kw - 1) - 1) // sw + 1
        Hq, Wq = Ho + dh * (kh - 1) // sh, Wo + dw * (kw - 1) // sw
        offsets = [
            ((i * dh % sh) * sw + j * dw % sw, (i * dh // sh) * Wq + j * dw // sw)
            for i in range(kh)
            for j in range(kw)
        ]
        return Ho, Wo, Hq, Wq, offsets

    def _in_hw(self, state):
        a = state["input"]
        return tuple(a.shape[2:]) if self._spatial == 2 else (1, a.shape[2])

    @property
    def _lead(self):
        """Zero pixel rows before the output gradients' grid: more than the longest shift."""
        (kh, _), (sh, _), (dh, _), _ = self._geometry()
        return dh * (kh - 1) // sh + 1

    def _to_grid(self, t, xp):
        """Vectors ``(N, C_in, H, K, W)`` -> grid ``(G, P, (Hq + 1) Wq N K, C_in / G)``.

        Row ``((y Wq + x) N + n) K + k`` of phase ``(a, b)`` holds the padded image at
        ``(y sh + a, x sw + b)`` (zeros in the padding and in one extra row of pixels at
        the end, which the shifted row ranges run into).
        """
        N, C, H, K, W = t.shape
        _, (sh, sw), _, ((pt, _), (pl, _)) = self._geometry()
        G = self.groups
        _, _, Hq, Wq, _ = self._plan((H, W))
        t = xp.permute_dims(xp.reshape(t, (N, G, C // G, H, K, W)), (1, 3, 5, 0, 4, 2))
        grid = _window(t, {1: (-pt, (Hq + 1) * sh), 2: (-pl, Wq * sw)}, xp)
        if sh * sw > 1:  # (G, Hq + 1, sh, Wq, sw, N, K, C_g) -> phases first
            grid = xp.reshape(grid, (G, Hq + 1, sh, Wq, sw, N, K, C // G))
            grid = xp.permute_dims(grid, (0, 2, 4, 1, 3, 5, 6, 7))
        return xp.reshape(grid, (G, sh * sw, (Hq + 1) * Wq * N * K, C // G))

    def _grid(self, state, xp):
        """The forward input as a grid (:meth:`_to_grid`; cached in the state)."""
        if "grid" not in state:
            a = self._image(state["input"], xp)
            state["grid"] = self._to_grid(xp.expand_dims(a, axis=3), xp)
        return state["grid"]

    def _grad_grid(self, g, xp):
        """Output vectors ``(N, C_out, [Ho,] K, Wo)`` -> ``(G, (lead + Hq) Wq N K, Co_g)``.

        Row ``(((lead + y) Wq + x) N + n) K + k`` holds output pixel ``(y, x)``: zero
        outside ``Ho x Wo`` and in ``lead`` leading rows of pixels (which the backward
        shifts reach into).
        """
        g = self._image(g, xp)
        N, Co, Ho, K, Wo = g.shape
        G, lead = self.groups, self._lead
        (kh, kw), (sh, sw), (dh, dw), _ = self._geometry()
        Hq, Wq = Ho + dh * (kh - 1) // sh, Wo + dw * (kw - 1) // sw
        g = xp.permute_dims(xp.reshape(g, (N, G, Co // G, Ho, K, Wo)), (1, 3, 5, 0, 4, 2))
        grid = _window(g, {1: (-lead, lead + Hq), 2: (0, Wq)}, xp)
        return xp.reshape(grid, (G, (lead + Hq) * Wq * N * K, Co // G))

    def _from_grid(self, rows, N, K, Ho, Wo, Wq, xp):
        """Output rows ``(G, Ho Wq N K, C_out / G)`` -> vectors ``(N, C_out, [Ho,] K, Wo)``."""
        G, _, Co = rows.shape
        y = xp.reshape(rows, (G, Ho, Wq, N, K, Co))[:, :, :Wo, ...]
        y = xp.reshape(xp.permute_dims(y, (3, 0, 5, 1, 4, 2)), (N, G * Co, Ho, K, Wo))
        return self._unimage(y, xp)

    def _correlate(self, grid, mats, hw, N, K, unit, xp):
        """``sum_o grid[phase_o, rows shifted by shift_o] @ mats[o]``: ``(G, Ho Wq N K, .)``.

        The output rows ``y < Ho`` only. ``unit`` is the number of grid rows per pixel
        and image (``K`` for a grid of ``K`` vectors, 1 for the forward input, whose
        products with ``K`` weight tangents give ``K`` columns per row instead).
        """
        Ho, _, _, Wq, offsets = self._plan(hw)
        step = N * unit
        rows = Ho * Wq * step
        out = None
        for o, (phase, shift) in enumerate(offsets):
            y = _mm(grid[:, phase, shift * step : shift * step + rows, ...], mats[o, ...], xp)
            if out is None:
                out = y
            else:
                out += y
        return xp.reshape(out, (out.shape[0], Ho * Wq * N * K, -1))

    def _correlate_adjoint(self, grad, mats, hw, N, K, unit, xp):
        """The adjoint of :meth:`_correlate`: a grad grid -> input vectors ``(N, C, H, K, W)``.

        ``grad`` is :meth:`_grad_grid`'s ``(G, (lead + Hq) Wq N unit, .)`` and ``mats[o]``
        maps its columns to ``K / unit`` vectors of ``C_in / G`` entries per row.
        """
        (_, _), (sh, sw), _, ((pt, _), (pl, _)) = self._geometry()
        H, W = hw
        _, _, Hq, Wq, offsets = self._plan(hw)
        G, Cg = self.groups, self.in_channels // self.groups
        step = N * unit
        # stride 1: only the grid rows of the unpadded image; else every phase row
        y0, ny = (pt, H) if sh * sw == 1 else (0, Hq)
        first, rows = (self._lead + y0) * Wq * step, ny * Wq * step
        phases = [None] * (sh * sw)
        for o, (phase, shift) in enumerate(offsets):
            start = first - shift * step
            y = _mm(grad[:, start : start + rows, ...], mats[o, ...], xp)
            if phases[phase] is None:
                phases[phase] = y
            else:
                phases[phase] += y
        shape = (G, ny, Wq, N, K, Cg)
        if len(phases) == 1:
            x = _window(xp.reshape(phases[0], shape), {2: (pl, W)}, xp)
        else:
            like = next(p for p in phases if p is not None)
            zeros = xp.zeros(shape, dtype=like.dtype, device=device(like))
            full = xp.stack([zeros if p is None else xp.reshape(p, shape) for p in phases], axis=1)
            full = xp.reshape(full, (G, sh, sw, Hq, Wq, N, K, Cg))
            full = xp.reshape(
                xp.permute_dims(full, (0, 3, 1, 4, 2, 5, 6, 7)), (G, Hq * sh, Wq * sw, N, K, Cg)
            )
            x = _window(full, {1: (pt, H), 2: (pl, W)}, xp)  # (G, H, W, N, K, C_g)
        x = xp.reshape(xp.permute_dims(x, (3, 0, 5, 1, 4, 2)), (N, G * Cg, H, K, W))
        return self._unimage(x, xp)

    def _offset_weights(self, W, xp, transpose=False):
        """``W (C_out, C_g, kh, kw)`` -> ``(kk, G, C_g, C_out / G)`` (or ``(kk, G, Co_g, C_g)``)."""
        G, Co = self.groups, self.out_channels // self.groups
        kk = math.prod(self.kernel_size)
        W = xp.permute_dims(
            xp.reshape(W, (G, Co, self.in_channels // G, kk)),
            (3, 0, 1, 2) if transpose else (3, 0, 2, 1),
        )
        # through a flat copy: contiguous matrices, which BLAS takes without a copy each
        return xp.reshape(xp.reshape(W, (-1,)), tuple(W.shape))

    def _offset_tangents(self, dW, xp, transpose=False):
        """Weight tangents ``(C_out, C_g, kh, kw, K)`` -> ``(kk, G, C_g, K Co_g)``
        (or ``(kk, G, Co_g, K C_g)``)."""
        G, Co, Cg = self.groups, self.out_channels // self.groups, self.in_channels // self.groups
        kk, K = math.prod(self.kernel_size), dW.shape[-1]
        dW = xp.reshape(dW, (G, Co, Cg, kk, K))
        if transpose:
            return xp.reshape(xp.permute_dims(dW, (3, 0, 1, 4, 2)), (kk, G, Co, K * Cg))
        return xp.reshape(xp.permute_dims(dW, (3, 0, 2, 4, 1)), (kk, G, Cg, K * Co))

    def _weight_products(self, left, right, hw, N, xp):
        """``sum over pixels of left[shifted]^T right`` per offset: ``(kk, G, ., .)``.

        ``left`` is a grid ``(G, P, (Hq + 1) Wq N, .)`` (rows of pixels and images),
        ``right`` the rows ``(G, Ho Wq N, .)`` of a grad grid's output band.
        """
        Ho, _, _, Wq, offsets = self._plan(hw)
        rows = Ho * Wq * N
        return xp.stack(
            [
                _mm(
                    xp.matrix_transpose(left[:, phase, shift * N : shift * N + rows, ...]),
                    right,
                    xp,
                )
                for phase, shift in offsets
            ]
        )

    def _pixel_rows(self, grad, hw, N, xp):
        """A grad grid's output band as rows ``(G, Ho Wq N, K Co_g)`` of pixels and images."""
        G, total, Co = grad.shape
        Ho, _, Hq, Wq, _ = self._plan(hw)
        lead = self._lead
        unit = total // ((lead + Hq) * Wq * N)
        grad = xp.reshape(grad, (G, (lead + Hq) * Wq * N, unit * Co))
        return grad[:, lead * Wq * N : (lead + Ho) * Wq * N, ...]

    def _weight_grad(self, grad, state, N, K, xp):
        """``sum_{n, pixels} P^T g`` for the ``K`` cotangents of a grad grid."""
        hw = self._in_hw(state)
        G, Co, Cg = self.groups, self.out_channels // self.groups, self.in_channels // self.groups
        prods = self._weight_products(
            self._grid(state, xp), self._pixel_rows(grad, hw, N, xp), hw, N, xp
        )
        prods = xp.reshape(prods, (prods.shape[0], G, Cg, K, Co))
        prods = xp.permute_dims(prods, (1, 4, 2, 0, 3))  # (G, Co_g, C_g, kk, K)
        return xp.reshape(prods, self.param_shapes()[0] + (K,))

    def _weight(self, params, xp):
        """The weight as ``(G, C_out / G, D_g)``."""
        return xp.reshape(
            params[0], (self.groups, self.out_channels // self.groups, self._group_in)
        )

    def _tap_patches(self, state, xp):
        """The patches ``(N, Ho Wo, C_in kh kw)`` (entries ``(channel, kh, kw)``; cached).

        The channels are group-major, so group ``g``'s patch is the contiguous slice of
        its ``D_g`` entries (the tap's ``groups``).
        """
        if "patches" not in state:
            hw = self._in_hw(state)
            Ho, Wo, Hq, Wq, offsets = self._plan(hw)
            X = self._grid(state, xp)  # (G, P, (Hq + 1) Wq N, C_in / G)
            G, Cg = X.shape[0], X.shape[-1]
            N = self._image(state["input"], xp).shape[0]
            rows = Ho * Wq * N
            slices = [
                xp.reshape(X[:, phase, shift * N : shift * N + rows, ...], (G, Ho, Wq, N, Cg))
                for phase, shift in offsets
            ]
            P = xp.stack([p[:, :, :Wo, ...] for p in slices], axis=-1)  # (G, Ho, Wo, N, Cg, kk)
            P = xp.permute_dims(P, (3, 1, 2, 0, 4, 5))
            state["patches"] = xp.reshape(P, (N, Ho * Wo, G * Cg * len(offsets)))
        return state["patches"]

    # -- forward and derivatives -------------------------------------------------------

    def forward(self, params, a, xp):
        return self._forward(params, a, xp, {"input": a})

    def forward_with_state(self, params, a, xp, state):
        # the input's grid stays in the linearization's state, for every later product
        return self._forward(params, a, xp, state)

    def _forward(self, params, a, xp, local):
        self._check_input(a)
        hw = self._in_hw(local)
        N = a.shape[0]
        Ho, Wo, Hq, Wq, _ = self._plan(hw)
        out = self._correlate(
            self._grid(local, xp), self._offset_weights(params[0], xp), hw, N, 1, 1, xp
        )
        if self.bias:
            out += xp.reshape(params[1], (self.groups, 1, -1))
        y = self._image(self._from_grid(out, N, 1, Ho, Wo, Wq, xp), xp)
        return self._unimage(y[:, :, :, 0, :], xp)

    def tangent(self, params, dparams, state, ta, xp):
        hw = self._in_hw(state)
        X = self._grid(state, xp)
        N = self._image(state["input"], xp).shape[0]
        Ho, Wo, Hq, Wq, _ = self._plan(hw)
        K = dparams[0].shape[-1]
        # sum_o X_o dW_o for all K tangents at once: K Co_g columns per pixel row
        out = self._correlate(X, self._offset_tangents(dparams[0], xp), hw, N, K, 1, xp)
        if ta is not None:
            Xt = self._to_grid(self._image(ta, xp), xp)  # one grid for all K tangents
            out += self._correlate(Xt, self._offset_weights(params[0], xp), hw, N, K, K, xp)
        if self.bias:
            Co = self.out_channels // self.groups
            db = xp.permute_dims(xp.reshape(dparams[1], (self.groups, 1, Co, K)), (0, 1, 3, 2))
            out = xp.reshape(xp.reshape(out, (self.groups, -1, K, Co)) + db, out.shape)
        return self._from_grid(out, N, K, Ho, Wo, Wq, xp)

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        hw = self._in_hw(state)
        K = g.shape[-2]
        N = g.shape[0]
        grads = []
        grad = self._grad_grid(g, xp)  # (G, (lead + Hq) Wq N K, Co_g)
        if need_params:
            grads.append(self._weight_grad(grad, state, N, K, xp))
            if self.bias:
                grads.append(self._bias_grad(g, xp))
        g_in = None
        if need_input:
            Wt = self._offset_weights(params[0], xp, transpose=True)
            g_in = self._correlate_adjoint(grad, Wt, hw, N, K, K, xp)
        return grads, g_in

    def _bias_grad(self, g, xp):
        g = self._image(g, xp)  # (N, C_out, Ho, K, Wo)
        return xp.sum(g, axis=(0, 2, 4))

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        hw = self._in_hw(state)
        W = params[0]
        K = dparams[0].shape[-1]
        N = g.shape[0]
        G, Co, Cg = self.groups, self.out_channels // self.groups, self.in_channels // self.groups
        g_grid = self._grad_grid(g, xp)  # g has one cotangent

        # R(g^T P) = (R g)^T P + g^T (R P): the second term is the bilinear cross term
        # between the weight and the parameters that the input depends on.
        rgW = None
        rg_grid = None
        if rg is not None:
            rg_grid = self._grad_grid(rg, xp)
            rgW = self._weight_grad(rg_grid, state, N, K, xp)
        if ta is not None:
            Xt = self._to_grid(self._image(ta, xp), xp)  # (G, P, (Hq + 1) Wq N K, C_g)
            Xt = xp.reshape(Xt, (G, Xt.shape[1], -1, K * Cg))
            cross = self._weight_products(Xt, self._pixel_rows(g_grid, hw, N, xp), hw, N, xp)
            cross = xp.reshape(cross, (cross.shape[0], G, K, Cg, Co))
            cross = xp.permute_dims(cross, (1, 4, 3, 0, 2))  # (G, Co_g, C_g, kk, K)
            cross = xp.reshape(cross, tuple(W.shape) + (K,))
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
        Wt = self._offset_weights(W, xp, transpose=True)
        g_in = self._correlate_adjoint(g_grid, Wt, hw, N, 1, 1, xp)
        # R(g W) = (R g) W + g (R W), the latter for all K tangents at once
        rg_in = self._correlate_adjoint(
            g_grid, self._offset_tangents(dparams[0], xp, transpose=True), hw, N, K, 1, xp
        )
        if rg is not None:
            rg_in = rg_in + self._correlate_adjoint(rg_grid, Wt, hw, N, K, K, xp)
        return rgrads, g_in, rg_in

    # -- the layer protocol ------------------------------------------------------------

    @property
    def tap_groups(self):
        """The tap's groups: the convolution's (its weight is block diagonal over them)."""
        return self.groups

    def tap(self, state, output_grads=None, xp=None):
        P = self._tap_patches(state, xp)
        N, S, _ = P.shape
        grads = None
        if output_grads is not None:
            g = self._image(output_grads, xp)  # (N, C_out, Ho, M, Wo)
            M = g.shape[3]
            grads = xp.reshape(xp.permute_dims(g, (0, 2, 4, 1, 3)), (N, S, self.out_channels, M))
        return P, grads, (self.out_channels, self._group_in)

    def backward_curvature(self, params, state, H, g, xp):
        return pull_back_curvature(self, params, state, H, g, xp)

    def curvature_statistics(self, params, state, g, statistics, xp):
        # per kernel offset o, over the batch: the output positions whose offset o falls
        # inside the (unpadded) input, and all output positions
        x = self._image(state["input"], xp)
        (kh, kw), (sh, sw), (dh, dw), ((pt, _), (pl, _)) = self._geometry()
        Ho, Wo, _, _, _ = self._plan(x.shape[2:])

        def hits(n_out, size, step, dilation, before, offset):
            # output positions p < n_out with 0 <= p step + offset dilation - before < size
            shift = offset * dilation - before
            lo = max(0, -(shift // step))
            hi = min(n_out - 1, (size - 1 - shift) // step)
            return max(0, hi - lo + 1)

        rows = [hits(Ho, x.shape[2], sh, dh, pt, i) for i in range(kh)]
        cols = [hits(Wo, x.shape[3], sw, dw, pl, j) for j in range(kw)]
        inside = xp.asarray(
            [float(r * c) for r in rows for c in cols], dtype=x.dtype, device=device(x)
        )  # (kk,)
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
    PyTorch weights copy across. Built from shifted row ranges and matrix products (see
    :mod:`curvlinops.nn.conv`); every tier, and the tap ``(N, H_out * W_out,
    C_in * kh * kw)`` with ``groups`` blocks of the weight.

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
    ``(N, L_out, C_in * k)``. Arguments as :class:`Conv2d`, each an
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
    return _pad_value(x, before, after, axis, 0.0, xp)


def _pad_value(x, before, after, axis, value, xp):
    """``x`` with ``before`` and ``after`` entries ``value`` along ``axis``."""
    if before == 0 and after == 0:
        return x
    parts = []
    for size in (before, None, after):
        if size is None:
            parts.append(x)
        elif size:
            shape = list(x.shape)
            shape[axis] = size
            parts.append(xp.full(tuple(shape), value, dtype=x.dtype, device=device(x)))
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


_SETITEM: dict = {}


def _supports_setitem(x, xp) -> bool:
    """Whether arrays like ``x`` take slice assignment (NumPy, CuPy, torch; not JAX).

    Probed once per array type, on a two-entry array.
    """
    kind = type(x)
    if kind not in _SETITEM:
        try:
            probe = xp.zeros((2,), dtype=x.dtype, device=device(x))
            probe[:1] = xp.ones((1,), dtype=x.dtype, device=device(x))
            _SETITEM[kind] = True
        except Exception:  # immutable arrays (JAX) raise TypeError; be lenient
            _SETITEM[kind] = False
    return _SETITEM[kind]


def _window(x, spans, xp):
    """``x`` cut or zero-extended: along each ``axis`` of ``spans = {axis: (start, length)}``
    entry ``i`` is ``x[start + i]`` (zero where that is outside ``x``).

    A plain slice where the window lies inside ``x``; else one zero array and one slice
    assignment where the arrays take it (:func:`_supports_setitem`), else slicing and
    concatenation with zeros (:func:`_pad`).
    """
    src, dst, shape = [slice(None)] * x.ndim, [slice(None)] * x.ndim, list(x.shape)
    inside, empty = True, False
    for axis, (start, length) in spans.items():
        lo, hi = max(start, 0), min(start + length, x.shape[axis])
        shape[axis] = length
        empty = empty or lo >= hi
        src[axis], dst[axis] = slice(lo, hi), slice(lo - start, hi - start)
        inside = inside and (lo, hi) == (start, start + length)
    if inside:
        return x[tuple(src)]
    if empty or _supports_setitem(x, xp):
        out = xp.zeros(tuple(shape), dtype=x.dtype, device=device(x))
        if not empty:
            out[tuple(dst)] = x[tuple(src)]
        return out
    y = x[tuple(src)]
    for axis, (start, length) in spans.items():
        lo, hi = max(start, 0), min(start + length, x.shape[axis])
        y = _pad(y, lo - start, start + length - hi, axis, xp)
    return y


def _mm(a, b, xp):
    """``a @ b`` over a leading group axis; a plain 2d product for one group."""
    if a.shape[0] == 1 and b.shape[0] == 1:
        return xp.expand_dims(a[0, ...] @ b[0, ...], axis=0)
    return a @ b
