"""Parameter-free layers that only move data: :class:`Identity` and :class:`Flatten`.

Their layer protocol passes curvature factors through unchanged (a per-datum factor is
over a datum's entries flattened in C order, which flattening does not change). The
batch-averaged factor of :class:`Flatten` is defined for inputs ``(N, D)`` and for
channels-first inputs ``(N, C, S...)`` (the output of a convolution), whose items are
the positions: there it keeps the diagonal blocks of the positions, summed.

May import: ``curvlinops._backend``, ``.module``.
"""

from __future__ import annotations

import math

from .module import Layer

__all__ = ["Identity", "Flatten"]


class Identity(Layer):
    """Returns its input unchanged.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> Identity()([], xp.asarray([[1.0, 2.0]])).tolist()
    [[1.0, 2.0]]
    """

    r_backward_uses_input_tangent = False

    def forward(self, params, a, xp):
        return a

    def tangent(self, params, dparams, state, ta, xp):
        return ta

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        return [], g

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        return [], g, rg

    def backward_curvature(self, params, state, H, g, xp):
        return H

    def backward_mean_curvature(self, params, H, statistics, xp):
        return H


class Flatten(Layer):
    """Flattens all axes after the batch axis: ``(N, d1, ..., dr) -> (N, d1 * ... * dr)``.

    As ``torch.nn.Flatten(start_dim=1)``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> Flatten()([], xp.ones((4, 2, 3))).shape
    (4, 6)
    """

    output_layout = "features_last"

    r_backward_uses_input_tangent = False

    def forward(self, params, a, xp):
        if a.ndim < 2:
            raise ValueError(f"Flatten expects inputs (N, ...), got shape {tuple(a.shape)}.")
        return xp.reshape(a, (a.shape[0], math.prod(a.shape[1:])))

    # In the internal layout a batch of K vectors of an input (N, d1, ..., dr) is
    # (N, d1, ..., d_{r-1}, K, dr) and of the output (N, K, d1 * ... * dr).

    def tangent(self, params, dparams, state, ta, xp):
        if ta is None:
            return None
        a = state["input"]
        if a.ndim == 2:
            return ta
        k_axis = a.ndim - 1
        order = (0, k_axis) + tuple(i for i in range(1, ta.ndim) if i != k_axis)
        moved = xp.permute_dims(ta, order)
        return xp.reshape(moved, (a.shape[0], ta.shape[k_axis], math.prod(a.shape[1:])))

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        return [], (self._unflatten(state["input"], g, xp) if need_input else None)

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        if not need_input:
            return [], None, None
        a = state["input"]
        rg_in = None if rg is None else self._unflatten(a, rg, xp)
        return [], self._unflatten(a, g, xp), rg_in

    def backward_curvature(self, params, state, H, g, xp):
        return H

    def curvature_statistics(self, params, state, g, statistics, xp):
        a = state["input"]
        if a.ndim != 2 and not state.get("channels_first"):
            raise NotImplementedError(
                "the batch-averaged curvature rule for inputs with shared axes (N, S..., D)",
                f" (it sees inputs of shape {tuple(a.shape)}: the items before and after "
                "flattening differ)",
            )
        # the input's shape (C, S...) per datum, for the rule below
        return tuple(a.shape[1:])

    def backward_mean_curvature(self, params, H, statistics, xp):
        if statistics is None or len(statistics) == 1:
            return H
        # channels-first inputs (N, C, S...): an item is a position (n, s); the
        # flattened factor over (c, s) keeps its diagonal blocks s = s' (the "expand"
        # convention: positions do not interact), summed over the positions
        C, S = statistics[0], math.prod(statistics[1:])
        blocks = xp.reshape(H, (C, S, C, S))
        return xp.sum(xp.linalg.diagonal(xp.permute_dims(blocks, (0, 2, 1, 3))), axis=-1)

    @staticmethod
    def _unflatten(a, g, xp):
        """``(N, K, d1 * ... * dr)`` back to ``(N, d1, ..., d_{r-1}, K, dr)``."""
        if a.ndim == 2:
            return g
        r = a.ndim - 1
        unflat = xp.reshape(g, (a.shape[0], g.shape[1]) + tuple(a.shape[1:]))
        order = (0,) + tuple(range(2, r + 1)) + (1, r + 1)
        return xp.permute_dims(unflat, order)
