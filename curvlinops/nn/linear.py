"""The fully connected layer :class:`Linear` and its hand-derived derivative rules.

For ``s = a W^T + b`` with inputs ``a`` of shape ``(N, ..., D_in)`` every rule is one
matrix product of the flattened batch (all leading axes and the ``K`` vectors at once)
with ``W`` or with a reshaped tangent; see :mod:`curvlinops.nn.module` for the layout.
Its layer protocol: the tap (inputs ``(N, S..., D_in)``, ``matrix_shape = (D_out, D_in)``)
and ``H_a = W^T H_s W``, averaged and per datum (with shared axes for every pair of
positions).

May import: ``curvlinops._backend``, ``.module``.
"""

from __future__ import annotations

import math

from .._backend import device
from .module import Layer

__all__ = ["Linear"]


class Linear(Layer):
    """Affine map ``s = a W^T + b`` on the last axis, as ``torch.nn.Linear``.

    Parameters are ``[weight (out, in), bias (out,)]`` (or ``[weight]`` without bias),
    so PyTorch weights copy across. Inputs ``(N, D_in)`` or ``(N, *S, D_in)``: the
    weight is shared over the axes ``S`` (e.g. a sequence).

    Parameters
    ----------
    in_features : int
        Size ``D_in`` of the inputs' last axis.
    out_features : int
        Size ``D_out`` of the outputs' last axis.
    bias : bool
        Whether the layer has a bias.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> layer = Linear(2, 1)
    >>> w, b = xp.asarray([[1.0, 2.0]]), xp.asarray([0.5])
    >>> layer([w, b], xp.asarray([[1.0, 1.0], [0.0, 1.0]])).tolist()
    [[3.5], [2.5]]
    >>> layer([w, b], xp.ones((4, 3, 2))).shape
    (4, 3, 1)
    """

    has_tap = True
    input_layout = output_layout = "features_last"

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        for what, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Linear needs a positive integer {what}, got {value!r}.")
        self.in_features = in_features
        self.out_features = out_features
        self.bias = bool(bias)

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias})"

    def param_shapes(self):
        shapes = [(self.out_features, self.in_features)]
        if self.bias:
            shapes.append((self.out_features,))
        return shapes

    def init_params(self, generator, dtype):
        bound = 1.0 / math.sqrt(self.in_features)
        return [generator.uniform(shape, dtype, -bound, bound) for shape in self.param_shapes()]

    def forward(self, params, a, xp):
        if a.ndim < 2 or a.shape[-1] != self.in_features:
            raise ValueError(
                f"{self!r} expects inputs of shape (N, ..., {self.in_features}), got shape "
                f"{tuple(a.shape)}."
            )
        out = _rows(a, self.in_features, xp) @ params[0].T
        if self.bias:
            out = out + params[1]
        return xp.reshape(out, tuple(a.shape[:-1]) + (self.out_features,))

    def tangent(self, params, dparams, state, ta, xp):
        a = state["input"]
        dW = dparams[0]
        K = dW.shape[-1]
        d_in, d_out = self.in_features, self.out_features
        shape = tuple(a.shape[:-1]) + (K, d_out)
        # a @ dW^T for all K tangents at once: (M, in) @ (in, K * out).
        dW_cols = xp.reshape(xp.permute_dims(dW, (1, 2, 0)), (d_in, K * d_out))
        out = xp.reshape(_rows(a, d_in, xp) @ dW_cols, shape)
        if self.bias:
            out = out + xp.permute_dims(dparams[1], (1, 0))
        if ta is not None:
            out = out + xp.reshape(_rows(ta, d_in, xp) @ params[0].T, shape)
        return out

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        a = state["input"]
        K = g.shape[-2]
        d_in, d_out = self.in_features, self.out_features
        grads = []
        if need_params:
            # sum_n g_nk^T a_n for all K cotangents: (K * out, M) @ (M, in).
            gW = _rows(g, K * d_out, xp).T @ _rows(a, d_in, xp)
            grads.append(xp.permute_dims(xp.reshape(gW, (K, d_out, d_in)), (1, 2, 0)))
            if self.bias:
                gb = xp.sum(xp.reshape(g, (-1, K, d_out)), axis=0)
                grads.append(xp.permute_dims(gb, (1, 0)))
        g_in = None
        if need_input:
            g_in = xp.reshape(_rows(g, d_out, xp) @ params[0], tuple(g.shape[:-1]) + (d_in,))
        return grads, g_in

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        a = state["input"]
        W, dW = params[0], dparams[0]
        K = dW.shape[-1]
        d_in, d_out = self.in_features, self.out_features
        g_rows = _rows(g, d_out, xp)  # g has K = 1: (M, out)
        lead = tuple(a.shape[:-1])

        # R(g^T a) = (R g)^T a + g^T (R a): the second term is the bilinear cross term
        # between W and the parameters that a depends on.
        rgW = None
        if rg is not None:
            first = _rows(rg, K * d_out, xp).T @ _rows(a, d_in, xp)
            rgW = xp.permute_dims(xp.reshape(first, (K, d_out, d_in)), (1, 2, 0))
        if ta is not None:
            cross = g_rows.T @ _rows(ta, K * d_in, xp)
            cross = xp.permute_dims(xp.reshape(cross, (d_out, K, d_in)), (0, 2, 1))
            rgW = cross if rgW is None else rgW + cross
        if rgW is None:
            rgW = xp.zeros((d_out, d_in, K), dtype=W.dtype, device=device(W))
        rgrads = [rgW]
        if self.bias:
            if rg is None:
                rgrads.append(xp.zeros((d_out, K), dtype=W.dtype, device=device(W)))
            else:
                rgb = xp.sum(xp.reshape(rg, (-1, K, d_out)), axis=0)
                rgrads.append(xp.permute_dims(rgb, (1, 0)))

        if not need_input:
            return rgrads, None, None
        g_in = xp.reshape(g_rows @ W, lead + (1, d_in))
        # R(g W) = (R g) W + g (R W), the latter for all K tangents: (M, out) @ (out, K * in).
        dW_rows = xp.reshape(xp.permute_dims(dW, (0, 2, 1)), (d_out, K * d_in))
        rg_in = xp.reshape(g_rows @ dW_rows, lead + (K, d_in))
        if rg is not None:
            rg_in = rg_in + xp.reshape(_rows(rg, d_out, xp) @ W, lead + (K, d_in))
        return rgrads, g_in, rg_in

    # -- the layer protocol ------------------------------------------------------------

    def tap(self, state, output_grads=None, xp=None):
        grads = None
        if output_grads is not None:
            n = output_grads.ndim
            axes = tuple(range(n - 2)) + (n - 1, n - 2)
            grads = xp.permute_dims(output_grads, axes)
        return state["input"], grads, (self.out_features, self.in_features)

    def backward_curvature(self, params, state, H, g, xp):
        a, W = state["input"], params[0]
        if a.ndim == 2:
            return xp.matrix_transpose(W) @ H @ W
        # Shared axes S: H is over a datum's S * D_out outputs, (N, S D_out, S D_out);
        # H_a[(s, i), (t, j)] = sum_ab W_ai H[(s, a), (t, b)] W_bj for every pair (s, t).
        N, S = a.shape[0], math.prod(a.shape[1:-1])
        d_in, d_out = self.in_features, self.out_features
        blocks = xp.permute_dims(xp.reshape(H, (N, S, d_out, S, d_out)), (0, 1, 3, 2, 4))
        blocks = xp.matrix_transpose(W) @ blocks @ W  # (N, S, S, D_in, D_in)
        return xp.reshape(xp.permute_dims(blocks, (0, 1, 3, 2, 4)), (N, S * d_in, S * d_in))

    def backward_mean_curvature(self, params, H, statistics, xp):
        W = params[0]
        return xp.matrix_transpose(W) @ H @ W


def _rows(a, width, xp):
    """``a`` as a matrix with ``width`` columns (a view when ``a`` is contiguous)."""
    return xp.reshape(a, (-1, width))
