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
exact :meth:`~curvlinops.LinearizedLayer.backward_gradient` (both paths) and the
positions of all its inner parameters. The curvature walks (the Hessian diagonal and the
Kronecker-factored Hessian) follow one chain of layers and do not go through residual
connections: its curvature rules and its tap in such a walk raise
:class:`~curvlinops.models.MissingLayerRuleError` saying what to use instead.

May import: ``curvlinops._backend``, ``curvlinops.models``, ``.module``,
``.linearization``, ``.sequential``.
"""

from __future__ import annotations

from .linearization import LinearizedNativeLayer
from .module import Layer, Module, channels_first_inputs

__all__ = ["Residual"]

_NO_WALK = (
    " (the Hessian diagonal and the Kronecker-factored Hessian walk one chain of layers "
    "and do not go through residual connections; use HessianLinearOperator, K-FAC "
    "(KFACLinearOperator, EKFACLinearOperator) or curvlinops.hutchinson_diagonal instead)"
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
    """What the forward-tangent pass keeps for :meth:`Residual.r_backward`."""

    def __init__(self, block, shortcut):
        self.block, self.shortcut = block, shortcut


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
        tangents are then pushed here.
        """
        memo = ta
        if not isinstance(memo, _Memo):
            _, memo = self._tangents(params, dparams, state, ta, xp, keep=True)
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
        raise NotImplementedError("the per-datum curvature rule", _NO_WALK)

    def curvature_statistics(self, params, state, g, statistics, xp):
        raise NotImplementedError("the batch-averaged curvature rule", _NO_WALK)

    def backward_mean_curvature(self, params, H, statistics, xp):
        raise NotImplementedError("the batch-averaged curvature rule", _NO_WALK)

    def linearized(self, params, state, xp, *, name=None, param_indices=None):
        """The Residual bound to a forward pass: one :class:`~curvlinops.LinearizedLayer`.

        Its ``backward_gradient`` is exact (both paths) and its ``param_indices`` list
        every inner parameter; its curvature rules and its tap in a curvature walk raise
        :class:`~curvlinops.models.MissingLayerRuleError` (the walks do not go through
        residual connections).

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear
        >>> layer = Residual(Linear(2, 2))
        >>> bound = layer.linearized(layer.init(0, xp=xp), {"input": xp.ones((3, 2))}, xp)
        >>> bound.param_indices, bound.backward_gradient(xp.ones((3, 2))).shape
        ((0, 1), (3, 2))
        """
        if param_indices is None:
            param_indices = tuple(range(len(self.param_shapes())))
        self._states(params, state, xp)
        return _LinearizedResidual(
            self.name if name is None else name, self, list(params), state, xp, param_indices
        )


class _LinearizedResidual(LinearizedNativeLayer):
    """A Residual in a curvature walk: it refuses its tap there.

    The walks read the taps of the layers of one chain and pull curvature back through
    each; the inner layers of a residual block are not in that chain, so a walk that
    reaches the block refuses (rather than leave the inner parameters out silently).
    """

    def tap(self, output_grads=None):
        raise self.missing("the tap in a curvature walk", _NO_WALK)
