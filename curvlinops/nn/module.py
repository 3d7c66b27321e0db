"""Base classes of the native layers: :class:`Module` (a curvlinops model) and :class:`Layer`.

A :class:`Module` is a curvlinops :class:`~curvlinops.models.Model` offering all three
tiers. Every module is a chain of :class:`Layer` objects (a single layer is a chain of
one; :class:`~curvlinops.nn.Sequential` concatenates its children's chains), and the
forward pass, its linearization and every derivative product walk that chain. A
composite layer (:class:`~curvlinops.nn.Residual`) is one element of a chain that walks
inner chains of its own, through three hooks of :class:`Layer` whose defaults serve
primitive layers: :meth:`Layer.forward_with_state` (keep the inner layers' states from
the one forward pass), :meth:`Layer.tangent_with_memo` (keep the inner tangents for the
second-order backward pass) and :meth:`Layer.backward_taps` (the inner layers' taps).

Layers compute on arrays in the *internal layout*: a batch of ``K`` vectors (tangents or
cotangents of a layer's input or output ``(N, ..., D)``) is stored as ``(N, ..., K, D)``,
with ``K`` just before the feature axis. Reshaped to ``(N * ... * K, D)`` it meets the
weight matrix in one matrix product, and the weight terms (``a @ dW^T`` for K tangents,
``g^T a`` for K cotangents) are single products without copies of activation-sized
arrays. :mod:`curvlinops.nn.linearization` converts to and from the protocol's
trailing-``K`` layout at the model's boundary only.

Every :class:`Layer` also implements the layer protocol (:mod:`curvlinops.models.layers`)
in the protocol layout: :meth:`Layer.tap`, :meth:`Layer.backward_curvature`,
:meth:`Layer.curvature_statistics` and :meth:`Layer.backward_mean_curvature`;
:meth:`Layer.linearized` binds a layer to a forward pass as a
:class:`~curvlinops.LinearizedLayer` (native models and the PyTorch frontend
share these rules).

May import: ``curvlinops._backend``, ``curvlinops.models``, ``.linearization``.
"""

from __future__ import annotations

from .._backend import (
    all_finite,
    array_namespace,
    as_generator,
    can_cast_losslessly,
    default_float_dtype,
    dtype_name,
    namespace_name,
)
from ..models import Capability, Model, Tier
from .linearization import LinearizedNativeLayer, NativeLinearization, _tap

__all__ = ["Module", "Layer", "channels_first_inputs", "feature_rows", "pull_back_curvature"]


def pull_back_curvature(layer, params, state, H, g, xp):
    """``J^T H J`` per datum for a layer that is linear in its inputs (Jacobian ``J``).

    The per-datum curvature rule of convolutions, pooling, normalization at fixed
    statistics and other layers without curvature of their own: two backward passes of
    the layer (:meth:`Layer.backward`), each with the ``F`` columns of the per-datum
    factors as its ``K`` cotangents. ``H`` is ``(N, F_out, F_out)``, ``g`` the gradient
    with respect to the outputs (it gives their shape); returns ``(N, F_in, F_in)``.
    Costs two backward passes of ``F_out`` and ``F_in`` vectors.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops.nn import Linear
    >>> W = xp.asarray([[1.0, 2.0]])
    >>> state = {"input": xp.ones((1, 2))}
    >>> H = pull_back_curvature(Linear(2, 1, bias=False), [W], state, xp.ones((1, 1, 1)),
    ...                         xp.zeros((1, 1)), xp)
    >>> H[0].tolist()
    [[1.0, 2.0], [2.0, 4.0]]
    """
    N = H.shape[0]
    out_shape = tuple(g.shape[1:])

    def transposed_jacobian_times(columns):
        # (N, F_out, K) columns as K cotangents of the outputs, in the internal layout
        K = columns.shape[-1]
        cotangents = xp.moveaxis(xp.reshape(columns, (N, *out_shape, K)), -1, -2)
        _, g_in = layer.backward(params, state, cotangents, xp, need_params=False)
        return xp.reshape(xp.moveaxis(g_in, -2, -1), (N, -1, K))  # (N, F_in, K)

    left = transposed_jacobian_times(H)  # J^T H, (N, F_in, F_out)
    return transposed_jacobian_times(xp.matrix_transpose(left))  # J^T H J


def feature_rows(a, state, xp):
    """``a`` (shaped like a layer's inputs) as rows ``(items, D)`` over its feature axis.

    The feature axis is the channels (axis 1) where ``state["channels_first"]``, else
    the last axis; every other axis (data, positions) indexes items. What the
    batch-averaged curvature rules average over.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> a = xp.reshape(xp.arange(12.0), (1, 3, 2, 2))  # (N, C, H, W)
    >>> feature_rows(a, {"channels_first": True}, xp).shape
    (4, 3)
    >>> feature_rows(a, {}, xp).shape
    (6, 2)
    """
    if state.get("channels_first") and a.ndim > 2:
        a = xp.moveaxis(a, 1, -1)
    return xp.reshape(a, (-1, a.shape[-1]))


def channels_first_inputs(layers, first=None) -> list[bool]:
    """For each layer of a chain, whether its inputs are channels-first.

    Follows the layers' :attr:`Layer.input_layout` and :attr:`Layer.output_layout`
    (None: as before). ``first`` is the layout of the chain's inputs (True:
    channels-first), e.g. for the inner chains of a composite layer; by default the
    model's inputs are features-last unless the first layer that states an input
    layout says otherwise.

    Examples
    --------
    >>> from curvlinops.nn import Conv2d, Flatten, Linear, ReLU
    >>> channels_first_inputs([Conv2d(1, 2, 3), ReLU(), Flatten(), Linear(8, 2), ReLU()])
    [True, True, True, False, False]
    >>> channels_first_inputs([ReLU(), Conv2d(2, 2, 1)], first=True)
    [True, True]
    """
    if first is None:
        stated = next((la.input_layout for la in layers if la.input_layout is not None), None)
        current = stated == "channels_first"
    else:
        current = bool(first)
    out = []
    for layer in layers:
        if layer.input_layout is not None:
            current = layer.input_layout == "channels_first"
        out.append(current)
        if layer.output_layout is not None:
            current = layer.output_layout == "channels_first"
    return out


class Module(Model):
    """A native model: a chain of :class:`Layer` objects with hand-derived derivatives.

    Subclasses provide :meth:`chain`. Parameters are a list of arrays, the
    concatenation of the layers' parameter lists in chain order.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops.nn import Linear, Sequential, Tanh
    >>> model = Sequential(Linear(3, 4), Tanh(), Linear(4, 2))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> model.expected_param_shapes()
    [(4, 3), (4,), (2, 4), (2,)]
    >>> model(params, xp.ones((5, 3))).shape
    (5, 2)
    """

    #: tiers 1, 2 and 3 and the layer protocol
    tiers = frozenset(Tier) | {Capability.LAYER_PROTOCOL}

    def chain(self) -> list[tuple[str, Layer]]:
        """The layers in forward order, each with its name (``"2"``, ``"1.0"``).

        Primitive layers, and composite layers (e.g. :class:`~curvlinops.nn.Residual`)
        as one entry each: they walk their own inner chains.
        """
        raise NotImplementedError

    def expected_param_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the parameter arrays, in order.

        Examples
        --------
        >>> from curvlinops.nn import Linear
        >>> Linear(3, 2).expected_param_shapes()
        [(2, 3), (2,)]
        """
        return [shape for _, layer in self.chain() for shape in layer.param_shapes()]

    def init(self, seed, *, xp=None, dtype=None, device=None) -> list:
        """Draw initial parameters as PyTorch does by default.

        Each ``Linear`` gets weight and bias from ``U(-1/sqrt(in), 1/sqrt(in))``.

        Parameters
        ----------
        seed : int or RandomGenerator
            Explicit seed (no global random state).
        xp : namespace, optional
            Array namespace of the parameters (default: NumPy).
        dtype : dtype, optional
            Real floating dtype (default: the namespace's default floating dtype).
        device : optional
            Device of the parameters.

        Returns
        -------
        list of arrays
            Shapes :meth:`expected_param_shapes`.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear
        >>> w, b = Linear(4, 2).init(0, xp=xp, dtype=xp.float32)
        >>> w.shape, b.shape, str(w.dtype), bool(xp.all(xp.abs(w) <= 0.5))
        ((2, 4), (2,), 'float32', True)
        """
        if xp is None:
            import array_api_compat.numpy as xp
        if dtype is None:
            dtype = default_float_dtype(xp, device)
        if not xp.isdtype(dtype, "real floating"):
            raise TypeError(f"init needs a real floating dtype, got {dtype_name(dtype)}.")
        generator = as_generator(seed, xp, device)
        return [p for _, layer in self.chain() for p in layer.init_params(generator, dtype)]

    def __call__(self, params, x):
        """The outputs ``f(params, x)``.

        Parameters
        ----------
        params : list of arrays
            Shapes :meth:`expected_param_shapes`.
        x : array
            Inputs ``(N, ..., D_in)``.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import ReLU
        >>> ReLU()([], xp.asarray([[-1.0, 2.0]])).tolist()
        [[0.0, 2.0]]
        """
        xp, params, x = self.prepare(params, x)
        a = x
        for layer, layer_params in self._split(params):
            a = layer.forward(layer_params, a, xp)
        return a

    def linearize(self, params, x):
        """Run the forward pass once, keep its activations, return a linearization.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear
        >>> model = Linear(3, 2)
        >>> lin = model.linearize(model.init(0, xp=xp), xp.ones((4, 3)))
        >>> lin.outputs.shape, [g.shape for g in lin.vjp(xp.ones((4, 2, 5)))]
        ((4, 2), [(2, 3, 5), (2, 5)])
        """
        xp, params, x = self.prepare(params, x)
        states = []
        a = x
        layers = [layer for _, layer in self.chain()]
        layouts = channels_first_inputs(layers)
        for (layer, layer_params), channels_first in zip(self._split(params), layouts, strict=True):
            state = {"input": a, "channels_first": channels_first}
            states.append(state)
            a = layer.forward_with_state(layer_params, a, xp, state)
        return NativeLinearization(self, params, x, a, xp, states)

    # -- validation --------------------------------------------------------------------

    def prepare(self, params, x):
        """Validate ``params`` and ``x``; return ``(xp, params, x)`` with ``x`` cast.

        Where the first layer of the chain takes integer inputs
        (:attr:`Layer.integer_inputs`, e.g. the ids of an embedding) ``x`` must have an
        integer dtype and is not cast; the layer checks their values
        (:meth:`Layer.check_integer_inputs`, e.g. ids in ``[0, V)``).

        Raises
        ------
        TypeError
            Mixed array libraries, non-floating parameters, parameters of different
            dtypes, an ``x`` whose dtype does not convert losslessly, or floating inputs
            where the first layer takes integers.
        ValueError
            Wrong number or shapes of parameters, ``x`` with fewer than two axes (one
            for integer inputs), non-finite values, or integer inputs the first layer
            refuses (e.g. ids out of range).

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Embedding
        >>> model = Embedding(5, 2)
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> model.prepare(params, xp.asarray([[1, 4]]))[2].dtype
        dtype('int64')
        >>> model.prepare(params, xp.asarray([[1, 5]]))
        Traceback (most recent call last):
        ...
        ValueError: Embedding(5, 2) takes ids in [0, 5), got ids from 1 to 5. ...
        """
        self.check_params(params)
        xp = array_namespace(x, *params)
        chain = self.chain()
        first = chain[0][1] if chain else None
        if first is not None and first.integer_inputs:
            return self._prepare_integer_inputs(first, xp, params, x)
        if x.ndim < 2:
            raise ValueError(
                f"{self.name} expects inputs with a batch axis, shape (N, ..., D), got shape "
                f"{tuple(x.shape)}. Add a batch axis (e.g. x[None, :])."
            )
        dtypes = {dtype_name(p.dtype) for p in params}
        if len(dtypes) > 1:
            raise TypeError(
                f"{self.name} expects parameters of one dtype, got {sorted(dtypes)}. Cast them "
                "to one floating dtype."
            )
        if params:
            dtype = params[0].dtype
            if not xp.isdtype(dtype, "real floating"):
                raise TypeError(
                    f"{self.name} expects real floating parameters, got {dtype_name(dtype)}."
                )
            if x.dtype != dtype:
                if not can_cast_losslessly(x.dtype, dtype, xp):
                    raise TypeError(
                        f"{self.name} has {dtype_name(dtype)} parameters but the inputs are "
                        f"{dtype_name(x.dtype)}; convert the inputs (or the parameters) to one "
                        "dtype first."
                    )
                x = xp.astype(x, dtype)
        elif not xp.isdtype(x.dtype, "real floating"):
            raise TypeError(f"{self.name} expects real floating inputs, got {x.dtype}.")
        if not all_finite(x, xp):
            raise ValueError(f"The inputs of {self.name} contain NaN or Inf; clean the data.")
        for i, p in enumerate(params):
            if not all_finite(p, xp):
                raise ValueError(
                    f"Parameter {i} of {self.name} contains NaN or Inf "
                    f"({namespace_name(xp)} array of shape {tuple(p.shape)})."
                )
        return xp, list(params), x

    def _prepare_integer_inputs(self, first, xp, params, x):
        """:meth:`prepare` where the first layer takes integer inputs (not cast)."""
        if not xp.isdtype(x.dtype, "integral"):
            raise TypeError(
                f"{self.name} starts with {first!r}, which takes integer inputs, but the "
                f"inputs are {dtype_name(x.dtype)}; pass integer ids (e.g. int64)."
            )
        if x.ndim < 1:
            raise ValueError(
                f"{self.name} expects integer inputs with a batch axis, shape (N, ...), got "
                f"shape {tuple(x.shape)}. Add a batch axis (e.g. x[None])."
            )
        dtypes = {dtype_name(p.dtype) for p in params}
        if len(dtypes) > 1:
            raise TypeError(
                f"{self.name} expects parameters of one dtype, got {sorted(dtypes)}. Cast them "
                "to one floating dtype."
            )
        if params and not xp.isdtype(params[0].dtype, "real floating"):
            raise TypeError(
                f"{self.name} expects real floating parameters, got {dtype_name(params[0].dtype)}."
            )
        first.check_integer_inputs(x, xp)
        for i, p in enumerate(params):
            if not all_finite(p, xp):
                raise ValueError(
                    f"Parameter {i} of {self.name} contains NaN or Inf "
                    f"({namespace_name(xp)} array of shape {tuple(p.shape)})."
                )
        return xp, list(params), x

    def _split(self, params):
        """Pairs ``(layer, its parameters)`` along the chain."""
        start = 0
        for _, layer in self.chain():
            n = len(layer.param_shapes())
            yield layer, params[start : start + n]
            start += n


class Layer(Module):
    """A primitive layer: forward pass and hand-derived derivative rules.

    Subclasses implement :meth:`forward`, :meth:`tangent`, :meth:`backward` and
    :meth:`r_backward` on arrays in the internal layout (see the module docstring):
    tangents and cotangents of an input ``(N, ..., D)`` are ``(N, ..., K, D)``. A
    ``None`` tangent or cotangent stands for zero (e.g. the input tangent of the first
    layer: the data do not depend on the parameters) so that no work is spent on it.
    ``state`` is the layer's dictionary in a linearization: ``state["input"]`` is the
    input of the forward pass, and layers may cache derived arrays there.

    ``r_backward_uses_input_tangent`` says whether :meth:`r_backward` reads ``ta``;
    where it does not (layers that only move data, piecewise-linear activations),
    a second-order product passes None and frees the tangent early.

    The layer protocol (:mod:`curvlinops.models.layers`): :meth:`tap` (with
    ``has_tap = True``) for a layer whose weight multiplies its inputs, and the
    curvature rules :meth:`backward_curvature`, :meth:`curvature_statistics` and
    :meth:`backward_mean_curvature`, in the protocol layout (no ``K`` axis). A layer
    that leaves a rule out makes the operators that need it raise
    :class:`~curvlinops.models.MissingLayerRuleError` naming the layer. A new layer
    type is one such subclass in its own file, plus one entry in each frontend's
    mapping of framework layers to native ones.

    A composite layer (several inner layers, e.g. :class:`~curvlinops.nn.Residual`)
    also overrides :meth:`forward_with_state`, :meth:`tangent_with_memo` and
    :meth:`backward_taps`; the linearization calls these on every layer and never asks
    what class a layer is.

    Examples
    --------
    >>> from curvlinops.nn import Tanh
    >>> [name for name, _ in Tanh().chain()]
    ['Tanh']
    """

    r_backward_uses_input_tangent = True
    #: whether the layer takes integer inputs (e.g. the ids of an embedding): a model
    #: whose chain starts with such a layer neither casts its inputs nor asks for
    #: floating ones (:meth:`Module.prepare`), and the layer checks their values in
    #: :meth:`check_integer_inputs`
    integer_inputs = False
    #: whether :meth:`tap` gives a tap (a weight that multiplies the inputs)
    has_tap = False
    #: the :class:`~curvlinops.models.LayerTap` kind of the tap: ``"matrix"``,
    #: ``"elementwise"`` or ``"embedding"``
    tap_kind = "matrix"
    #: the :class:`~curvlinops.models.LayerTap` groups of the tap: a weight block
    #: diagonal over that many groups of inputs and outputs (a grouped convolution)
    tap_groups = 1
    #: layout of the layer's inputs and outputs in the batch-averaged curvature rules:
    #: ``"channels_first"`` (features on axis 1, ``(N, C, ...)``, as convolutions),
    #: ``"features_last"`` (``(N, S..., D)``), or None: the same as the layer before
    #: it (for the inputs) or as the inputs (for the outputs). The forward pass of a
    #: linearization records in ``state["channels_first"]`` which one the layer's
    #: inputs have (:func:`channels_first_inputs`).
    input_layout = None
    output_layout = None

    def chain(self):
        return [(self.name, self)]

    def param_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of this layer's own parameters."""
        return []

    def init_params(self, generator, dtype) -> list:
        """Initial parameters drawn from ``generator`` (a RandomGenerator)."""
        return []

    def forward(self, params, a, xp):
        """Output of the layer for input ``a``."""
        raise NotImplementedError

    def check_integer_inputs(self, x, xp):
        """Validate integer inputs (layers with :attr:`integer_inputs`; default: accept).

        Raises ValueError (naming what was expected and found) for values the layer
        cannot take.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Embedding
        >>> Embedding(3, 2).check_integer_inputs(xp.asarray([[0, 2]]), xp) is None
        True
        """
        return None

    def forward_with_state(self, params, a, xp, state):
        """Output for input ``a`` in the forward pass of a linearization.

        ``state`` is the layer's dictionary (``state["input"]`` is ``a``,
        ``state["channels_first"]`` its layout). The default is :meth:`forward`; a
        composite layer overrides it to keep its inner layers' states in ``state``
        (from this one forward pass, for every later product).

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import ReLU
        >>> ReLU().forward_with_state([], xp.asarray([[-1.0, 2.0]]), xp, {}).tolist()
        [[0.0, 2.0]]
        """
        return self.forward(params, a, xp)

    def tangent(self, params, dparams, state, ta, xp):
        """Output tangent ``(N, ..., K, D_out)`` from parameter and input tangents.

        ``dparams`` are in the protocol layout (parameter shape + ``(K,)``); ``ta`` is the
        input tangent in the internal layout, or None (zero).
        """
        raise NotImplementedError

    def tangent_with_memo(self, params, dparams, state, ta, xp):
        """:meth:`tangent` and what :meth:`r_backward` later gets as its ``ta``.

        Returns ``(output tangent, memo)``. The forward-tangent pass of a second-order
        product keeps the memo for the backward pass. The default memo is the input
        tangent ``ta`` (None where :attr:`r_backward_uses_input_tangent` is False, so
        that it is freed early); a composite layer returns its inner layers' tangents
        too, so that its :meth:`r_backward` does not push them again.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import ReLU, Tanh
        >>> ta = xp.ones((1, 1, 2))
        >>> state = {"input": xp.zeros((1, 2))}
        >>> out, memo = Tanh().tangent_with_memo([], [], state, ta, xp)
        >>> out.tolist(), memo is ta, ReLU().tangent_with_memo([], [], state, ta, xp)[1]
        ([[[1.0, 1.0]]], True, None)
        """
        out = self.tangent(params, dparams, state, ta, xp)
        return out, (ta if self.r_backward_uses_input_tangent else None)

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        """Pull the output cotangents ``g`` ``(N, ..., K, D_out)`` back.

        Returns ``(parameter gradients in the protocol layout, input cotangents)``;
        either part may be skipped (``[]``/None) when not needed.
        """
        raise NotImplementedError

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        """The R-operator (Pearlmutter) of :meth:`backward` along the tangents.

        ``g`` is the plain backward signal ``(N, ..., 1, D_out)`` (one cotangent, no
        ``K``), ``rg`` its directional derivative ``(N, ..., K, D_out)`` or None (zero),
        ``ta`` the input tangent or None. Returns ``(R of the parameter gradients in
        the protocol layout, g of the input, R g of the input)``.
        """
        raise NotImplementedError

    def backward_taps(self, params, state, g, xp, *, name, param_indices, need_input=True):
        """The tier-3 taps of this layer and the input cotangents, in one backward step.

        ``g`` are the output cotangents in the internal layout (or None: taps without
        output gradients, and no backward step); ``name`` is the layer's name in the
        model and ``param_indices`` the positions of its parameters in the model's
        parameter list. Returns ``(list of LayerTap in forward order, input cotangents
        or None)``. The default is the layer's own :meth:`tap` (none without
        :attr:`has_tap`) and :meth:`backward`; a composite layer returns the taps of
        its inner layers, their output gradients recorded in its own backward pass.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear
        >>> layer = Linear(3, 2)
        >>> params = layer.init(0, xp=xp)
        >>> (tap,), g_in = layer.backward_taps(params, {"input": xp.ones((4, 3))},
        ...                                    xp.ones((4, 5, 2)), xp, name="fc",
        ...                                    param_indices=(7, 8))
        >>> tap.name, tap.weight_index, tap.bias_index, tap.output_grads.shape, g_in.shape
        ('fc', 7, 8, (4, 2, 5), (4, 5, 3))
        """
        aligned = tuple(param_indices)
        taps = []
        if self.has_tap:
            tap = _tap(name, self, state, xp, aligned, g)
            if tap is not None:
                taps.append(tap)
        g_in = None
        if need_input and g is not None:
            _, g_in = self.backward(params, state, g, xp, need_params=False)
        return taps, g_in

    # -- the layer protocol (curvlinops.models.layers), in the protocol layout ---------

    def tap(self, state, output_grads=None, xp=None):
        """``(inputs, output gradients, matrix shape)`` if the layer's weight multiplies its inputs.

        None (the default) for layers without such a weight. ``output_grads`` are the
        gradients of the layer's outputs in the internal layout ``(N, ..., M, D_out)``
        (or None); the result has inputs ``(N, S..., D_in)``, output gradients
        ``(N, S..., D_out, M)`` (or None) and ``(D_out, D_in)``.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear, Tanh
        >>> Tanh().tap({"input": xp.ones((2, 3))}) is None
        True
        >>> inputs, grads, shape = Linear(3, 4).tap({"input": xp.ones((2, 3))})
        >>> inputs.shape, grads, shape
        ((2, 3), None, (4, 3))
        """
        return None

    def backward_curvature(self, params, state, H, g, xp):
        """Per-datum Hessian of the inputs ``(N, F_in, F_in)`` from that of the outputs.

        ``H`` is ``(N, F_out, F_out)`` over each datum's output entries in C order.

        ``g`` is the gradient with respect to the outputs (their shape). Raises
        NotImplementedError (with the reason) where the layer has no such rule.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Tanh
        >>> s = xp.asarray([[0.0, 1.0]])
        >>> H = Tanh().backward_curvature([], {"input": s}, xp.ones((1, 2, 2)), 0 * s, xp)
        >>> [[round(float(h), 4) for h in row] for row in H[0]]
        [[1.0, 0.42], [0.42, 0.1764]]
        """
        raise NotImplementedError("the per-datum curvature rule")

    def curvature_statistics(self, params, state, g, statistics, xp):
        """Add one batch to the sums :meth:`backward_mean_curvature` needs (default: none).

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Identity
        >>> g = xp.ones((2, 3))
        >>> Identity().curvature_statistics([], {"input": g}, g, None, xp) is None
        True
        """
        return None

    def backward_mean_curvature(self, params, H, statistics, xp):
        """Averaged factor of the inputs ``(D_in, D_in)`` from the outputs' ``(D_out, D_out)``.

        Raises NotImplementedError (with the reason) where the layer has no such rule.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear
        >>> W = xp.asarray([[1.0, 2.0]])
        >>> Linear(2, 1, bias=False).backward_mean_curvature([W], xp.ones((1, 1)), None, xp)
        array([[1., 2.],
               [2., 4.]])
        """
        raise NotImplementedError("the batch-averaged curvature rule")

    def linearized(self, params, state, xp, *, name=None, param_indices=None):
        """This layer bound to a forward pass: a :class:`~curvlinops.LinearizedLayer`.

        Parameters
        ----------
        params : list of arrays
            The layer's own parameters (constants of the model included).
        state : dict
            ``{"input": the layer's input}``, plus what the layer caches.
        xp : namespace
            The arrays' namespace.
        name : str, optional
            The layer's name in the model (default its class name).
        param_indices : sequence of int or None, optional
            For each of the layer's parameters its position in the model's parameter
            list, or None for a constant (default ``0, 1, ...``).

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops.nn import Linear
        >>> layer = Linear(3, 2)
        >>> bound = layer.linearized(layer.init(0, xp=xp), {"input": xp.ones((4, 3))}, xp)
        >>> bound.param_indices, bound.tap().matrix_shape
        ((0, 1), (2, 3))
        """
        if param_indices is None:
            param_indices = tuple(range(len(self.param_shapes())))
        return LinearizedNativeLayer(
            self.name if name is None else name, self, list(params), state, xp, param_indices
        )

    def __repr__(self) -> str:
        return f"{self.name}()"
