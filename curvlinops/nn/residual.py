"""Residual connections: :class:`Residual`, ``out = block(x) + shortcut(x)``.

A :class:`Residual` is one element of its parent's chain (a composite
:class:`~curvlinops.nn.Layer`) that walks two inner chains, the block's and the
shortcut's (none for the identity). Every rule is the sum along both paths:

- forward and tangents: ``y = b(x) + s(x)``, ``dy = J_b dx + J_s dx`` (plus the inner
  parameters' terms);
- backward: the output cotangents ``g`` go down both paths and the input cotangents
  add, ``g_x = J_b^T g + J_s^T g``;
- second order (Pearlmutter's R-operator): ``g`` and ``R g`` go down both paths, each
  inner layer adds its own curvature and cross terms, and ``R g_x`` is the sum of both
  paths'. Cross terms between parameters before the block and inside it arrive through
  the input tangent, which both paths push forward.

All ``K`` vectors go through each inner layer together, in the internal layout of
:mod:`curvlinops.nn.module`. The inner layers' states (their inputs and caches) are
kept in the Residual's own state by the one forward pass of :meth:`Module.linearize
<curvlinops.nn.Module.linearize>` (:meth:`Residual.forward_with_state`); their layouts
follow from the Residual's input layout (:func:`~curvlinops.nn.module.channels_first_inputs`).
The forward-tangent pass of a second-order product keeps the inner layers' tangents
(:meth:`Residual.tangent_with_memo`), so the backward pass does not push them again.

Tier 3: :meth:`Residual.backward_taps` gives the taps of the inner layers, named
``"<residual>.block.<i>"`` and ``"<residual>.shortcut[.<i>]"``, with their output
gradients from the one backward pass; K-FAC, EKFAC and the taps' diagonals work on
residual networks unchanged.

The layer protocol: a Residual is one :class:`~curvlinops.LinearizedLayer` with an
exact :meth:`~curvlinops.LinearizedLayer.backward_gradient` (both paths), the positions
of all its inner parameters, no tap of its own, and its two paths as
:meth:`~curvlinops.LinearizedLayer.branches` (the block's inner layers, and the
shortcut's or None for the identity), which the curvature walks (the Hessian diagonal,
the Kronecker-factored Hessian) go down, so that every inner layer's tap gets the
curvature of its own outputs. At the Residual's input the walk adds the two paths'
pulled-back factors and the terms that couple them, which the Residual gives:

- per datum, exactly (:meth:`Residual.cross_curvature`): ``J_b^T H J_s + J_s^T H J_b``
  with ``J_b``, ``J_s`` the paths' Jacobians (``J_s = I`` for the identity), from two
  backward passes of the per-datum factor's columns (``J_s^T H``, then ``J_b^T`` of
  its transpose). With the paths' own pulled-back Hessians ``J_p^T H J_p + R_p``
  (``R_p`` the curvature of the activations inside path ``p``) the sum is the exact
  Hessian with respect to the input, ``(J_b + J_s)^T H (J_b + J_s) + R_b + R_s``; the
  same is :meth:`Residual.backward_curvature`, the Residual's per-datum rule as one
  layer;
- averaged over the data (the Kronecker-factored Hessian's scheme, where a factor is
  the sum over the items of each item's block, :mod:`curvlinops.models.layers`):
  ``M_b^T H M_s + M_s^T H M_b`` with ``M_p`` path ``p``'s Jacobian in feature space
  averaged over the output items, ``M_p = (1 / T) sum_t sum_p' J_p[t, p']`` (the
  response of an output item's features to a perturbation of the same input feature
  at every input item; ``M_s = I`` for the identity), accumulated by
  :meth:`Residual.cross_curvature_statistics` from ``D_in`` forward tangents through
  each path per batch. It is exact for a single datum whose paths do not mix positions
  (Linear layers, elementwise layers, 1 x 1 convolutions, a single pixel), as the
  per-datum rule; beyond that it replaces the mean of the products of the paths'
  Jacobians by the product of their means, as the scheme does through each layer.

May import: ``curvlinops._backend``, ``curvlinops.models``, ``.module``,
``.linearization``, ``.sequential``.
"""

from __future__ import annotations

from .._backend import device
from .linearization import LinearizedNativeLayer
from .module import Layer, Module, channels_first_inputs

__all__ = ["Residual"]

#: entries of the forward tangents held at once by the averaged cross terms' statistics
_CHUNK_ENTRIES = 2**24

_BRANCHES = (
    " as one layer (its batch-averaged rules are those of its paths' layers and its "
    "cross terms: a curvature walk goes down its branches(), as curvlinops.curvature's do)"
)


def _add(a, b):
    """``a + b`` where None stands for zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _named_chain(prefix, module):
    """The inner chain of a path: ``[(name, layer, parameter slice)]`` from offset 0."""
    if isinstance(module, Layer):
        pairs = [(prefix, module)]
    else:
        pairs = [(f"{prefix}.{name}", layer) for name, layer in module.chain()]
    entries, start = [], 0
    for name, layer in pairs:
        n = len(layer.param_shapes())
        entries.append((name, layer, slice(start, start + n)))
        start += n
    return entries, start


def _first_with_params(entries):
    """Index of the first inner layer with parameters (``len(entries)`` if none)."""
    return next(
        (j for j, (_, layer, _) in enumerate(entries) if layer.param_shapes()), len(entries)
    )


def _shift(entries, offset):
    """The entries with their parameter slices moved by ``offset``."""
    return [(n, la, slice(w.start + offset, w.stop + offset)) for n, la, w in entries]


class _Memo:
    """What the forward-tangent pass keeps for :meth:`Residual.r_backward` (used once)."""

    def __init__(self, block, shortcut):
        self.block, self.shortcut = block, shortcut
        self.used = False

    def use(self):
        """Mark the memo used; refuse a second use (its inner tangents are freed by then)."""
        if self.used:
            raise ValueError(
                "Residual.r_backward got a memo of tangent_with_memo that an earlier "
                "r_backward already used (it frees the inner tangents as it goes); call "
                "tangent_with_memo again for each r_backward, or pass the plain input tangent."
            )
        self.used = True


class Residual(Layer):
    """A residual connection ``out = block(x) + shortcut(x)`` (the identity by default).

    The building block of ResNets. ``block`` and ``shortcut`` are curvlinops.nn
    modules (a layer, a :class:`~curvlinops.nn.Sequential`, another ``Residual``). The
    parameters are the block's, then the shortcut's, in order. Every tier goes through
    both paths (see :mod:`curvlinops.nn.residual`); in a chain the Residual is one
    entry whose inner layers' taps are named ``"<name>.block.<i>"`` and
    ``"<name>.shortcut[.<i>]"``.

    Parameters
    ----------
    block : Module
        The residual branch.
    shortcut : Module or None, optional
        The skip branch (e.g. a strided 1x1 convolution where the block changes the
        shape); None (default) is the identity, and the block must then keep the
        shape of its inputs.

    Raises
    ------
    TypeError
        If ``block`` or ``shortcut`` is not a curvlinops.nn module.
    ValueError
        At the forward pass, if the two paths give outputs of different shapes.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops.nn import Linear, Sequential, Tanh
    >>> model = Sequential(Linear(3, 4), Residual(Sequential(Linear(4, 4), Tanh(), Linear(4, 4))),
    ...                    Linear(4, 2))
    >>> [name for name, _ in model.chain()]
    ['0', '1', '2']
    >>> model.expected_param_shapes()
    [(4, 3), (4,), (4, 4), (4,), (4, 4), (4,), (2, 4), (2,)]
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> lin = model.linearize(params, xp.ones((5, 3)))
    >>> [(tap.name, tap.weight_index) for tap in lin.layer_taps()]
    [('0', 0), ('1.block.0', 2), ('1.block.2', 4), ('2', 6)]

    With a shortcut that changes the shape as the block does:

    >>> from curvlinops.nn import Conv2d, ReLU
    >>> down = Residual(Sequential(Conv2d(2, 4, 3, stride=2, padding=1), ReLU(),
    ...                            Conv2d(4, 4, 3, padding=1)),
    ...                 shortcut=Conv2d(2, 4, 1, stride=2, bias=False))
    >>> down(down.init(0, xp=xp), xp.ones((1, 2, 6, 6))).shape
    (1, 4, 3, 3)
    """

    has_tap = False

    def __init__(self, block, shortcut=None):
        for what, module in (("block", block), ("shortcut", shortcut)):
            if module is None and what == "shortcut":
                continue
            if not isinstance(module, Module):
                raise TypeError(
                    f"Residual takes curvlinops.nn modules; its {what} is a "
                    f"{type(module).__name__}."
                )
        self.block, self.shortcut = block, shortcut
        self._block, n_block = _named_chain("block", block)
        self._shortcut = None
        if shortcut is not None:
            entries, _ = _named_chain("shortcut", shortcut)
            self._shortcut = _shift(entries, n_block)

    def __repr__(self) -> str:
        if self.shortcut is None:
            return f"Residual({self.block!r})"
        return f"Residual({self.block!r}, shortcut={self.shortcut!r})"

    def _paths(self):
        """The inner chains: the block's and the shortcut's (None for the identity)."""
        return self._block, self._shortcut

    def _entries(self):
        return self._block + (self._shortcut or [])

    # -- layouts and parameters ----------------------------------------------------------

    @property
    def input_layout(self):
        """The first input layout the block's layers state (None: as the layer before)."""
        layers = [layer for _, layer, _ in self._block]
        return next((la.input_layout for la in layers if la.input_layout is not None), None)

    @property
    def output_layout(self):
        """The layout the block's layers leave their outputs in (None: as the inputs)."""
        current = None
        for _, layer, _ in self._block:
            current = layer.input_layout or current
            current = layer.output_layout or current
        return current

    def param_shapes(self):
        return [shape for _, layer, _ in self._entries() for shape in layer.param_shapes()]

    def init_params(self, generator, dtype):
        return [p for _, layer, _ in self._entries() for p in layer.init_params(generator, dtype)]

    # -- forward ---------------------------------------------------------------------------

    def _check_shapes(self, a, out_block, out_shortcut):
        if tuple(out_block.shape) == tuple(out_shortcut.shape):
            return
        if self.shortcut is None:
            raise ValueError(
                f"Residual with the identity shortcut needs a block that keeps the shape of "
                f"its inputs, but the block maps {tuple(a.shape)} to "
                f"{tuple(out_block.shape)}; pass a shortcut that maps the inputs to the "
                "block's output shape (e.g. a strided 1x1 convolution)."
            )
        raise ValueError(
            f"Residual needs a block and a shortcut with outputs of one shape; for inputs "
            f"{tuple(a.shape)} the block gives {tuple(out_block.shape)} and the shortcut "
            f"{tuple(out_shortcut.shape)}."
        )

    def forward(self, params, a, xp):
        outs = []
        for entries in self._paths():
            y = a
            for _, layer, where in entries or ():
                y = layer.forward(params[where], y, xp)
            outs.append(y)
        self._check_shapes(a, *outs)
        return outs[0] + outs[1]

    def forward_with_state(self, params, a, xp, state):
        """The forward pass that keeps every inner layer's state in ``state``.

        ``state["paths"]`` holds the block's and the shortcut's lists of inner states
        (``{"input", "channels_first"}`` each, as :meth:`Module.linearize
        <curvlinops.nn.Module.linearize>` makes them; None for the identity).

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear, Sequential, Tanh
        >>> layer = Residual(Sequential(Tanh(), Linear(2, 2)))
        >>> state = {"input": xp.ones((3, 2)), "channels_first": False}
        >>> out = layer.forward_with_state(layer.init(0, xp=xp), state["input"], xp, state)
        >>> block, shortcut = state["paths"]
        >>> len(block), shortcut, block[1]["channels_first"]
        (2, None, False)
        """
        first = bool(state.get("channels_first", False))
        outs, states = [], []
        for entries in self._paths():
            if entries is None:
                outs.append(a)
                states.append(None)
                continue
            layouts = channels_first_inputs([layer for _, layer, _ in entries], first=first)
            path_states, y = [], a
            for (_, layer, where), channels_first in zip(entries, layouts, strict=True):
                inner = {"input": y, "channels_first": channels_first}
                path_states.append(inner)
                y = layer.forward_with_state(params[where], y, xp, inner)
            outs.append(y)
            states.append(path_states)
        self._check_shapes(a, *outs)
        state["paths"] = tuple(states)
        return outs[0] + outs[1]

    def _states(self, params, state, xp):
        """The inner states (from :meth:`forward_with_state`; made here if missing)."""
        if "paths" not in state:
            self.forward_with_state(params, state["input"], xp, state)
        return state["paths"]

    # -- tangents ----------------------------------------------------------------------------

    def _tangents(self, params, dparams, state, ta, xp, keep):
        """Output tangent and, with ``keep``, the inner layers' memos (a :class:`_Memo`)."""
        out, memos = None, []
        for entries, states in zip(self._paths(), self._states(params, state, xp), strict=True):
            if entries is None:
                out = _add(out, ta)
                memos.append(None)
                continue
            path_memos, t = [None] * len(entries), ta
            for j, (_, layer, where) in enumerate(entries):
                if t is None and not layer.param_shapes():
                    continue  # a zero tangent through a layer without parameters
                if keep:
                    t, path_memos[j] = layer.tangent_with_memo(
                        params[where], dparams[where], states[j], t, xp
                    )
                else:
                    t = layer.tangent(params[where], dparams[where], states[j], t, xp)
            out = _add(out, t)
            memos.append(path_memos)
        return out, _Memo(*memos)

    def tangent(self, params, dparams, state, ta, xp):
        out, _ = self._tangents(params, dparams, state, ta, xp, keep=False)
        return out

    def tangent_with_memo(self, params, dparams, state, ta, xp):
        """The output tangent and the inner layers' memos, for :meth:`r_backward`."""
        return self._tangents(params, dparams, state, ta, xp, keep=True)

    # -- backward ----------------------------------------------------------------------------

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        grads, g_in = [], None
        for entries, states in zip(self._paths(), self._states(params, state, xp), strict=True):
            if entries is None:
                g_in = _add(g_in, g if need_input else None)
                continue
            first = _first_with_params(entries)
            stop = 0 if need_input else first
            per_layer, h = [], g
            for j in range(len(entries) - 1, stop - 1, -1):
                _, layer, where = entries[j]
                layer_grads, h = layer.backward(
                    params[where],
                    states[j],
                    h,
                    xp,
                    need_input=need_input or j > first,
                    need_params=need_params,
                )
                per_layer.append(layer_grads if need_params else [])
            grads.extend(p for layer_grads in reversed(per_layer) for p in layer_grads)
            if need_input:
                g_in = _add(g_in, h)
        return grads, g_in

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        """The R-operator of :meth:`backward`: ``g`` and ``R g`` go down both paths.

        ``ta`` is the memo of :meth:`tangent_with_memo` (the inner layers' tangents of
        the forward-tangent pass) or a plain input tangent (None: zero), whose inner
        tangents are then pushed here. A memo serves one call: this frees its inner
        tangents as it goes, and a second call with it raises a ValueError.
        """
        memo = ta
        if not isinstance(memo, _Memo):
            _, memo = self._tangents(params, dparams, state, ta, xp, keep=True)
        memo.use()
        rgrads, g_in, rg_in = [], None, None
        paths = zip(
            self._paths(),
            self._states(params, state, xp),
            (memo.block, memo.shortcut),
            strict=True,
        )
        for entries, states, memos in paths:
            if entries is None:
                if need_input:
                    g_in, rg_in = _add(g_in, g), _add(rg_in, rg)
                continue
            first = _first_with_params(entries)
            stop = 0 if need_input else first
            per_layer, h, rh = [], g, rg
            for j in range(len(entries) - 1, stop - 1, -1):
                _, layer, where = entries[j]
                layer_rgrads, h, rh = layer.r_backward(
                    params[where],
                    dparams[where],
                    states[j],
                    memos[j],
                    h,
                    rh,
                    xp,
                    need_input=need_input or j > first,
                )
                memos[j] = None  # free the tangent once used
                per_layer.append(layer_rgrads)
            rgrads.extend(p for layer_rgrads in reversed(per_layer) for p in layer_rgrads)
            if need_input:
                g_in, rg_in = _add(g_in, h), _add(rg_in, rh)
        return rgrads, g_in, rg_in

    # -- tier 3: the inner layers' taps ------------------------------------------------------

    def backward_taps(self, params, state, g, xp, *, name, param_indices, need_input=True):
        """The taps of the inner layers, with output gradients from one backward pass.

        Named ``"<name>.block.<i>"`` and ``"<name>.shortcut[.<i>]"`` (``"<name>.block"``
        for a block that is a single layer), in forward order; their parameter indices
        are those of the model's flat parameter list.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear, Tanh, Sequential
        >>> layer = Residual(Sequential(Linear(2, 3), Tanh()), shortcut=Linear(2, 3, bias=False))
        >>> state = {"input": xp.ones((4, 2))}
        >>> taps, g_in = layer.backward_taps(layer.init(0, xp=xp), state, xp.ones((4, 1, 3)), xp,
        ...                                  name="5", param_indices=(10, 11, 12))
        >>> [(t.name, t.weight_index, t.bias_index) for t in taps], g_in.shape
        ([('5.block.0', 10, 11), ('5.shortcut', 12, None)], (4, 1, 2))
        """
        aligned = tuple(param_indices)
        taps, g_in = [], None
        for entries, states in zip(self._paths(), self._states(params, state, xp), strict=True):
            if entries is None:
                if need_input and g is not None:
                    g_in = _add(g_in, g)
                continue
            first = _first_with_params(entries)
            walk_input = need_input and g is not None
            stop = 0 if walk_input else first
            per_layer, h = [], g
            for j in range(len(entries) - 1, stop - 1, -1):
                inner_name, layer, where = entries[j]
                layer_taps, h = layer.backward_taps(
                    params[where],
                    states[j],
                    h,
                    xp,
                    name=f"{name}.{inner_name}",
                    param_indices=aligned[where],
                    need_input=h is not None and (walk_input or j > first),
                )
                per_layer.append(layer_taps)
            taps.extend(tap for layer_taps in reversed(per_layer) for tap in layer_taps)
            if walk_input:
                g_in = _add(g_in, h)
        return taps, g_in

    # -- the layer protocol ------------------------------------------------------------------

    def backward_curvature(self, params, state, H, g, xp):
        """Per datum, the exact Hessian with respect to the inputs: both paths and their
        cross terms.

        Each path pulls ``H`` back through its layers' own rules (their activations'
        curvature included); :meth:`cross_curvature` adds the terms that couple them.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear
        >>> layer = Residual(Linear(1, 1, bias=False))  # y = x + w x
        >>> state = {"input": xp.ones((1, 1))}
        >>> H = layer.backward_curvature([xp.asarray([[2.0]])], state, xp.ones((1, 1, 1)),
        ...                              xp.zeros((1, 1)), xp)
        >>> H.tolist()  # (1 + w)^2
        [[[9.0]]]
        """
        total = self.cross_curvature(params, state, H, g, xp)
        paths = zip(self._paths(), self._states(params, state, xp), strict=True)
        for entries, states in paths:
            total = total + _path_curvature(entries, states, params, H, g, xp)
        return total

    def cross_curvature(self, params, state, H, g, xp):
        """Per datum, ``J_b^T H J_s + J_s^T H J_b`` ``(N, F_in, F_in)`` (exact).

        ``H`` is ``(N, F_out, F_out)`` (symmetric), ``g`` the gradient with respect to
        the outputs (it gives their shape). Two backward passes of ``F`` columns: the
        shortcut's ``J_s^T H`` (none for the identity), then the block's ``J_b^T`` of
        its transpose.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear
        >>> layer = Residual(Linear(1, 1, bias=False))  # J_b = w, J_s = 1
        >>> state = {"input": xp.ones((1, 1))}
        >>> layer.cross_curvature([xp.asarray([[2.0]])], state, xp.ones((1, 1, 1)),
        ...                       xp.zeros((1, 1)), xp).tolist()
        [[[4.0]]]
        """
        (block, shortcut), (block_states, shortcut_states) = (
            self._paths(),
            self._states(params, state, xp),
        )
        out_shape = tuple(g.shape[1:])
        left = _pull_columns(shortcut, shortcut_states, params, H, out_shape, xp)  # J_s^T H
        mixed = _pull_columns(
            block, block_states, params, xp.matrix_transpose(left), out_shape, xp
        )  # J_b^T H J_s
        return mixed + xp.matrix_transpose(mixed)

    def curvature_statistics(self, params, state, g, statistics, xp):
        raise NotImplementedError("the batch-averaged curvature rule", _BRANCHES)

    def backward_mean_curvature(self, params, H, statistics, xp):
        raise NotImplementedError("the batch-averaged curvature rule", _BRANCHES)

    def cross_curvature_statistics(self, params, state, g, statistics, xp):
        """Add one batch to the sums of the paths' feature-space Jacobians (averaged cross terms).

        Returns ``(sums, items)``: per path the sum over the batch's output items of
        its output features' response to each input feature, ``(D_out, D_in)`` (None for
        the identity), and the number of output items seen. ``D_in`` forward tangents
        through each path (in chunks that bound their memory).

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear
        >>> layer = Residual(Linear(2, 2, bias=False))
        >>> W = xp.asarray([[1.0, 2.0], [3.0, 4.0]])
        >>> state = {"input": xp.ones((3, 2)), "channels_first": False}
        >>> (block, shortcut), items = layer.cross_curvature_statistics(
        ...     [W], state, xp.zeros((3, 2)), None, xp)
        >>> block.tolist(), shortcut, items  # 3 data, each with the Jacobian W
        ([[3.0, 6.0], [9.0, 12.0]], None, 3)
        """
        paths = zip(self._paths(), self._states(params, state, xp), strict=True)
        sums = [
            None if entries is None else _feature_response(self, entries, states, params, state, xp)
            for entries, states in paths
        ]
        items = _output_items(self, state, g)
        if statistics is not None:
            old, old_items = statistics
            sums = [None if s is None else s + o for s, o in zip(sums, old, strict=True)]
            items += old_items
        return sums, items

    def backward_mean_cross_curvature(self, params, H, statistics, xp):
        """Averaged cross terms ``M_b^T H M_s + M_s^T H M_b`` ``(D_in, D_in)``.

        ``M_p`` is path ``p``'s accumulated feature-space Jacobian over the output items
        (:meth:`cross_curvature_statistics`), ``I`` for the identity.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear
        >>> layer = Residual(Linear(2, 2, bias=False))
        >>> W = xp.asarray([[1.0, 2.0], [3.0, 4.0]])
        >>> statistics = ([3 * W, None], 3)  # M_b = W, the identity shortcut
        >>> layer.backward_mean_cross_curvature([W], xp.eye(2), statistics, xp).tolist()
        [[2.0, 5.0], [5.0, 8.0]]
        """
        if statistics is None:
            raise NotImplementedError(
                "the batch-averaged cross-curvature rule without statistics",
                " (pass what cross_curvature_statistics accumulated over the data)",
            )
        (block, shortcut), items = statistics
        M_b = block / items
        left = xp.matrix_transpose(M_b) @ H  # M_b^T H
        mixed = left if shortcut is None else left @ (shortcut / items)
        return mixed + xp.matrix_transpose(mixed)

    def linearized(self, params, state, xp, *, name=None, param_indices=None):
        """The Residual bound to a forward pass: one :class:`~curvlinops.LinearizedLayer`.

        Its ``backward_gradient`` and ``backward_curvature`` are exact (both paths), its
        ``param_indices`` list every inner parameter, it has no tap of its own, and its
        ``branches()`` are its paths' inner layers, bound to the same forward pass and
        named as their taps (``"<name>.block.<i>"``, ``"<name>.shortcut[.<i>]"``), with
        the cross terms of :meth:`cross_curvature` and
        :meth:`backward_mean_cross_curvature`.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear
        >>> layer = Residual(Linear(2, 2))
        >>> bound = layer.linearized(layer.init(0, xp=xp), {"input": xp.ones((3, 2))}, xp)
        >>> bound.param_indices, bound.backward_gradient(xp.ones((3, 2))).shape
        ((0, 1), (3, 2))
        >>> bound.tap() is None, [(la.name, la.param_indices) for la in bound.branches()[0]]
        (True, [('Residual.block', (0, 1))])
        >>> bound.branches()[1] is None  # the identity shortcut
        True
        """
        if param_indices is None:
            param_indices = tuple(range(len(self.param_shapes())))
        self._states(params, state, xp)
        return _LinearizedResidual(
            self.name if name is None else name, self, list(params), state, xp, param_indices
        )


class _LinearizedResidual(LinearizedNativeLayer):
    """A Residual in a curvature walk: no tap of its own, its paths as branches.

    The walks go down the branches (the inner layers, with their taps and rules) and
    add the Residual's cross terms at its input.
    """

    def tap(self, output_grads=None):
        return None

    def branches(self):
        if getattr(self, "_branches", None) is None:
            layer, xp = self.layer, self.xp
            paths = zip(layer._paths(), layer._states(self.params, self.state, xp), strict=True)
            self._branches = tuple(
                None
                if entries is None
                else [
                    inner.linearized(
                        self.params[where],
                        states[j],
                        xp,
                        name=f"{self.name}.{inner_name}",
                        param_indices=self._aligned[where],
                    )
                    for j, (inner_name, inner, where) in enumerate(entries)
                ]
                for entries, states in paths
            )
        return self._branches

    def cross_curvature(self, H, g):
        return self._rule(
            "the per-datum cross-curvature rule",
            self.layer.cross_curvature,
            self.params,
            self.state,
            H,
            g,
            self.xp,
        )

    def cross_curvature_statistics(self, g, statistics=None):
        return self.layer.cross_curvature_statistics(
            self.params, self.state, g, statistics, self.xp
        )

    def backward_mean_cross_curvature(self, H, statistics):
        return self._rule(
            "the batch-averaged cross-curvature rule",
            self.layer.backward_mean_cross_curvature,
            self.params,
            H,
            statistics,
            self.xp,
        )


def _backward_gradient(layer, params, state, g, xp):
    """One gradient per datum (protocol layout) pulled back through a native layer."""
    _, g_in = layer.backward(params, state, xp.expand_dims(g, axis=-2), xp, need_params=False)
    return g_in[..., 0, :]


def _path_curvature(entries, states, params, H, g, xp):
    """Per datum, ``H`` pulled back through a path's layers by their own rules."""
    if entries is None:  # the identity
        return H
    for j in range(len(entries) - 1, -1, -1):
        _, layer, where = entries[j]
        H = layer.backward_curvature(params[where], states[j], H, g, xp)
        if j:
            g = _backward_gradient(layer, params[where], states[j], g, xp)
    return H


def _pull_columns(entries, states, params, columns, out_shape, xp):
    """``J^T columns`` of a path, per datum: ``(N, F_out, K)`` -> ``(N, F_in, K)``.

    The ``K`` columns are ``K`` cotangents of the path's outputs (of shape
    ``out_shape``) in one backward pass; the identity leaves them.
    """
    if entries is None:
        return columns
    N, K = columns.shape[0], columns.shape[-1]
    h = xp.moveaxis(xp.reshape(columns, (N, *out_shape, K)), -1, -2)  # internal layout
    for j in range(len(entries) - 1, -1, -1):
        _, layer, where = entries[j]
        _, h = layer.backward(params[where], states[j], h, xp, need_params=False)
    return xp.reshape(xp.moveaxis(h, -2, -1), (N, -1, K))


def _channels_first_outputs(residual, state) -> bool:
    """Whether the Residual's outputs are channels-first (as its inputs, unless stated)."""
    layout = residual.output_layout
    if layout is not None:
        return layout == "channels_first"
    return bool(state.get("channels_first"))


def _output_items(residual, state, g) -> int:
    """The number of output items (data and positions) of a batch: outputs like ``g``."""
    n = 1
    for size in g.shape:
        n *= int(size)
    features = (
        g.shape[1] if _channels_first_outputs(residual, state) and g.ndim > 2 else g.shape[-1]
    )
    return n // int(features)


def _feature_response(residual, entries, states, params, state, xp):
    """``sum_t sum_p J[t, p]`` over the batch's output items ``t``: ``(D_out, D_in)``.

    Column ``i`` is the path's output tangent for the unit tangent of input feature
    ``i`` at every input item, summed over the output items: one forward-tangent pass
    of ``D_in`` tangents (in chunks of features that bound the memory; parameter
    tangents zero).
    """
    a = state["input"]
    first_in = bool(state.get("channels_first")) and a.ndim > 2
    first_out = _channels_first_outputs(residual, state)
    D = int(a.shape[1] if first_in else a.shape[-1])
    size = 1
    for n in a.shape:
        size *= int(n)
    chunk = max(1, _CHUNK_ENTRIES // size)
    columns = []
    for start in range(0, D, chunk):  # chunks of features bound the memory
        k = min(chunk, D - start)
        t = _unit_tangents(a, first_in, start, k, xp)
        for j, (_, layer, where) in enumerate(entries):
            zero = [
                xp.zeros(tuple(p.shape) + (k,), dtype=p.dtype, device=device(p))
                for p in params[where]
            ]
            t = layer.tangent(params[where], zero, states[j], t, xp)
        t = xp.moveaxis(t, -2, -1)  # the outputs' shape + (k,)
        features = 1 if first_out and t.ndim > 3 else t.ndim - 2
        axes = tuple(i for i in range(t.ndim - 1) if i != features)
        columns.append(xp.sum(t, axis=axes))  # (D_out, k)
    return xp.concat(columns, axis=1)


def _unit_tangents(a, channels_first, start, k, xp):
    """``k`` tangents of ``a`` in the internal layout ``(N, ..., k, last)``: tangent ``j``
    is one at feature ``start + j`` of every item, zero elsewhere."""
    D = a.shape[1] if channels_first else a.shape[-1]
    features = xp.arange(D, device=device(a))[:, None]
    chosen = start + xp.arange(k, device=device(a))[None, :]
    E = xp.astype(features == chosen, a.dtype)  # (D, k)
    shape = tuple(a.shape[:-1]) + (k, a.shape[-1])
    if channels_first:  # (N, C, ..., k, W): C on axis 1, k before the last axis
        E = xp.reshape(E, (1, D) + (1,) * (a.ndim - 3) + (k, 1))
    else:  # (N, S..., k, D)
        E = xp.reshape(xp.matrix_transpose(E), (1,) * (a.ndim - 1) + (k, D))
    return xp.zeros(shape, dtype=a.dtype, device=device(a)) + E
