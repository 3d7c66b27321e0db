"""The linearization of a native model: derivative products along its chain of layers.

:class:`NativeLinearization` keeps what the forward pass computed (every layer's input,
and lazily the activations' derivatives) and walks the chain of layers:

- ``jvp``: one forward-tangent pass (``~2`` matrix products per Linear layer);
- ``vjp``: one backward pass (``~2`` per Linear layer);
- ``second_order_vjp``: Pearlmutter's R-operator on the backward pass, one
  forward-tangent pass and one backward pass propagating ``g`` and ``R g``;
- ``layer_taps``: one backward pass recording the output gradients of each layer that
  has a tap (:meth:`~curvlinops.nn.Layer.tap`), through each layer's
  :meth:`~curvlinops.nn.Layer.backward_taps` (a composite layer such as
  :class:`~curvlinops.nn.Residual` gives the taps of its inner layers);
- ``layers``: the layer protocol, each layer bound to the forward pass as a
  :class:`LinearizedNativeLayer`.

All ``K`` vectors of a batch go through each product together (see
:mod:`curvlinops.nn.module` for the internal layout); the protocol's trailing-``K``
layout is converted to and from at the model's boundary only. Nothing here asks what
class a layer is: layers are used through the methods of :class:`~curvlinops.nn.Layer`.

May import: ``curvlinops._backend``, ``curvlinops.models`` (not the layer modules:
``.module`` imports this one).
"""

from __future__ import annotations

from .._backend import assert_same_namespace, device
from ..models import LayerTap, Linearization, LinearizedLayer

__all__ = ["NativeLinearization", "LinearizedNativeLayer"]


class LinearizedNativeLayer(LinearizedLayer):
    """A :class:`curvlinops.nn.Layer` bound to a forward pass (the layer protocol).

    Obtained from :meth:`Layer.linearized <curvlinops.nn.Layer.linearized>` or
    :meth:`NativeLinearization.layers`; the PyTorch frontend binds the native layer
    equivalent to each torch module the same way, so both share one set of rules.

    Parameters
    ----------
    name : str
        The layer's name in the model.
    layer : curvlinops.nn.Layer
        The layer.
    params : list of arrays
        The layer's parameters.
    state : dict
        ``{"input": the layer's input}`` and what the layer caches.
    xp : namespace
        The arrays' namespace.
    param_indices : sequence of int or None
        For each of the layer's parameters its position in the model's parameter list,
        or None for a constant of the model.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops.nn import Linear, Sequential, Tanh
    >>> model = Sequential(Linear(3, 4), Tanh(), Linear(4, 2))
    >>> lin = model.linearize(model.init(0, xp=xp, dtype=xp.float64), xp.ones((5, 3)))
    >>> [(layer.name, layer.param_indices) for layer in lin.layers()]
    [('0', (0, 1)), ('1', ()), ('2', (2, 3))]
    >>> lin.layers()[2].backward_gradient(xp.ones((5, 2))).shape
    (5, 4)
    """

    def __init__(self, name, layer, params, state, xp, param_indices):
        aligned = tuple(param_indices)
        super().__init__(name, tuple(i for i in aligned if i is not None), description=repr(layer))
        self.layer, self.params, self.state, self.xp = layer, params, state, xp
        self._aligned = aligned

    def tap(self, output_grads=None):
        """The layer's tap; ``output_grads`` (optional) in the layer's internal layout."""
        return _tap(self.name, self.layer, self.state, self.xp, self._aligned, output_grads)

    def backward_gradient(self, g):
        xp = self.xp
        _, g_in = self.layer.backward(
            self.params, self.state, xp.expand_dims(g, axis=-2), xp, need_params=False
        )
        return g_in[..., 0, :]

    def backward_curvature(self, H, g):
        return self._rule(
            "the per-datum curvature rule",
            self.layer.backward_curvature,
            self.params,
            self.state,
            H,
            g,
            self.xp,
        )

    def curvature_statistics(self, g, statistics=None):
        return self._rule(
            "the batch-averaged curvature rule",
            self.layer.curvature_statistics,
            self.params,
            self.state,
            g,
            statistics,
            self.xp,
        )

    def backward_mean_curvature(self, H, statistics):
        return self._rule(
            "the batch-averaged curvature rule",
            self.layer.backward_mean_curvature,
            self.params,
            H,
            statistics,
            self.xp,
        )

    def _rule(self, rule, method, *args):
        """Call a rule of the layer; its NotImplementedError becomes MissingLayerRuleError."""
        try:
            return method(*args)
        except NotImplementedError as error:
            # the layer's reason, ("rule", " (detail)"), or the rule's name alone
            raise self.missing(*(error.args[:2] or (rule,))) from None


def _tap(name, layer, state, xp, aligned, output_grads):
    """The :class:`LayerTap` of a layer (None if it has none or its weight is a constant)."""
    weight = aligned[0] if aligned else None
    if weight is None or not layer.has_tap:
        return None
    inputs, grads, matrix_shape = layer.tap(state, output_grads, xp)
    bias = aligned[1] if len(aligned) > 1 else None
    shape = None if matrix_shape is None else tuple(matrix_shape)
    if layer.output_layout is not None:
        channels_first = layer.output_layout == "channels_first"
    else:
        channels_first = bool(state.get("channels_first"))
    channels_first = channels_first and inputs.ndim > 2
    return LayerTap(
        name,
        weight,
        bias,
        inputs,
        grads,
        shape,
        kind=layer.tap_kind,
        channels_first=channels_first,
        groups=layer.tap_groups,
    )


class NativeLinearization(Linearization):
    """A native model linearized at ``(params, x)``; see :meth:`Module.linearize`.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops.nn import Linear, Sequential, Tanh
    >>> model = Sequential(Linear(3, 4), Tanh(), Linear(4, 2))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> lin = model.linearize(params, xp.ones((5, 3)))
    >>> lin.jvp([xp.ones(p.shape + (7,)) for p in params]).shape
    (5, 2, 7)
    >>> [g.shape for g in lin.second_order_vjp(xp.ones((5, 2)), params)]
    [(4, 3), (4,), (2, 4), (2,)]
    """

    def __init__(self, model, params, x, outputs, xp, states):
        super().__init__(model, params, x, outputs)
        self.xp = xp
        self._states = states
        self._chain = []
        start = 0
        for (name, layer), state in zip(model.chain(), states, strict=True):
            n = len(layer.param_shapes())
            self._chain.append((name, layer, slice(start, start + n), state))
            start += n
        # Layers before the first one with parameters see no tangents and need no
        # cotangents: products start (forward) and stop (backward) there.
        with_params = [i for i, (_, layer, _, _) in enumerate(self._chain) if layer.param_shapes()]
        self._first = with_params[0] if with_params else len(self._chain)
        self._bound = None

    # -- the protocol's products (trailing-K arrays in and out) --------------------------

    def _jvp(self, tangents):
        self._check_namespace(tangents, "tangents")
        _, out = self._forward_tangents(tangents, keep=False)
        return self._to_protocol(out, tangents)

    def _vjp(self, cotangents):
        self._check_namespace([cotangents], "cotangents")
        grads = [None] * len(self.shapes)
        g = self._to_internal(cotangents)
        for i in range(len(self._chain) - 1, self._first - 1, -1):
            _, layer, where, state = self._chain[i]
            layer_grads, g = layer.backward(
                self.params[where], state, g, self.xp, need_input=i > self._first
            )
            grads[where] = layer_grads
        return grads

    def _second_order_vjp(self, cotangent, tangents, cotangent_tangent):
        xp = self.xp
        self._check_namespace([cotangent, *tangents], "second_order_vjp argument")
        if tuple(cotangent.shape) != tuple(self.outputs.shape):
            raise ValueError(
                f"The cotangent u must have the output shape {tuple(self.outputs.shape)}, got "
                f"{tuple(cotangent.shape)}."
            )
        inputs_tangents, out_tangent = self._forward_tangents(tangents, keep=True)
        w = cotangent_tangent
        if callable(w):
            w = w(self._to_protocol(out_tangent, tangents))
        rg = None
        if w is not None:
            self._check_namespace([w], "cotangent_tangent")
            expected = tuple(self.outputs.shape) + (self._num_vectors(tangents),)
            if tuple(w.shape) != expected:
                raise ValueError(
                    f"cotangent_tangent must have shape {expected} (outputs + K), got "
                    f"{tuple(w.shape)}."
                )
            rg = self._to_internal(w)
        grads = [None] * len(self.shapes)
        g = xp.expand_dims(cotangent, axis=-2)
        for i in range(len(self._chain) - 1, self._first - 1, -1):
            _, layer, where, state = self._chain[i]
            layer_grads, g, rg = layer.r_backward(
                self.params[where],
                tangents[where],
                state,
                inputs_tangents.pop(),  # index i; dropped once used, to free it early
                g,
                rg,
                xp,
                need_input=i > self._first,
            )
            grads[where] = layer_grads
        return grads

    def _layer_taps(self, cotangents):
        g = None
        if cotangents is not None:
            self._check_namespace([cotangents], "cotangents")
            if tuple(cotangents.shape[:-1]) != tuple(self.outputs.shape):
                raise ValueError(
                    f"Cotangents must have shape {tuple(self.outputs.shape)} + (M,), got "
                    f"{tuple(cotangents.shape)}."
                )
            g = self._to_internal(cotangents)
        # one backward pass; each layer gives its taps (a composite one those of its
        # inner layers) with the output gradients it sees, and the input cotangents
        per_layer = []
        for i in range(len(self._chain) - 1, self._first - 1, -1):
            name, layer, where, state = self._chain[i]
            taps, g = layer.backward_taps(
                self.params[where],
                state,
                g,
                self.xp,
                name=name,
                param_indices=range(where.start, where.stop),
                need_input=g is not None and i > self._first,
            )
            per_layer.append(taps)
        return [tap for taps in reversed(per_layer) for tap in taps]

    def _layers(self):
        if self._bound is None:
            self._bound = [
                layer.linearized(
                    self.params[where],
                    state,
                    self.xp,
                    name=name,
                    param_indices=range(where.start, where.stop),
                )
                for name, layer, where, state in self._chain
            ]
        return list(self._bound)

    # -- helpers -------------------------------------------------------------------------

    def _forward_tangents(self, tangents, *, keep):
        """Push tangents through the chain; return (memos per layer, output tangent).

        A layer's memo is what its ``r_backward`` reads as ``ta`` (with ``keep``; see
        :meth:`~curvlinops.nn.Layer.tangent_with_memo`), None without ``keep``.
        """
        inputs_tangents = [None] * len(self._chain)
        t = None
        for i in range(self._first, len(self._chain)):
            _, layer, where, state = self._chain[i]
            if keep:  # what the layer's r_backward reads (its input tangent, or more)
                t, inputs_tangents[i] = layer.tangent_with_memo(
                    self.params[where], tangents[where], state, t, self.xp
                )
            else:
                t = layer.tangent(self.params[where], tangents[where], state, t, self.xp)
        return inputs_tangents, t

    def _to_protocol(self, t, tangents):
        """Output tangent in the internal layout (or None) -> ``outputs.shape + (K,)``."""
        if t is None:  # a model without parameters: J is empty
            shape = tuple(self.outputs.shape) + (self._num_vectors(tangents),)
            return self.xp.zeros(shape, dtype=self.outputs.dtype, device=device(self.outputs))
        return _swap_last_axes(t, self.xp)

    def _to_internal(self, v):
        """``outputs.shape + (K,)`` -> ``(..., K, C)``."""
        return _swap_last_axes(v, self.xp)

    @staticmethod
    def _num_vectors(tangents):
        return tangents[0].shape[-1] if tangents else 1

    def _check_namespace(self, arrays, what):
        for a in arrays:
            assert_same_namespace(self.xp, a, what)


def _swap_last_axes(a, xp):
    axes = tuple(range(a.ndim - 2)) + (a.ndim - 1, a.ndim - 2)
    return xp.permute_dims(a, axes)
