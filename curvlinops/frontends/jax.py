"""JAX frontend: a pure function ``f(params, x)`` as a curvlinops model.

:class:`JaxModel` offers tiers 1 and 2 of the model protocol, and tier 3 for functions
whose layers are marked:

- tier 1: :meth:`JaxModel.linearize` runs the forward pass once inside ``jax.vjp``,
  compiled with ``jax.jit``; the vector-Jacobian products apply the returned pullback
  and the Jacobian-vector products its linear transpose (``jax.linear_transpose``), so
  neither recomputes the forward pass. The ``K`` columns of a matmat go through
  ``jax.vmap`` in one fused, compiled call.
- tier 2: forward-over-reverse, the ``jax.jvp`` of the ``jax.vjp``, compiled. When
  ``w`` comes as a :class:`~curvlinops.models.TraceableLinearMap` (as the Hessian
  operator passes the loss Hessian), ``w = A(J v)`` is computed inside the same
  compiled pass, with no separate Jacobian-vector product.
- tier 3 (layer taps: K-FAC, EKFAC, the GGN and empirical-Fisher diagonals) for models
  whose layers are marked, one call per layer: in a plain function with
  :func:`dense`, :func:`conv2d`, :func:`embed` and :func:`layer_norm` (created with
  ``JaxModel(fn, params, layer_taps=True)``), and without user code for Flax linen
  (``nn.Dense``, ``nn.Conv``, ``nn.Embed``, ``nn.LayerNorm``: :meth:`JaxModel.from_flax`), Flax nnx
  (``nnx.Linear``, ``nnx.Conv``, ``nnx.Embed``: :meth:`JaxModel.from_nnx`) and
  Equinox (``eqx.nn.Linear``, ``eqx.nn.Conv1d/2d/3d``, ``eqx.nn.Embedding``:
  :meth:`JaxModel.from_equinox`).

How the taps are taken. Outside a tap pass the marking functions are plain JAX
functions (usable under ``jit``, ``vmap``, ``grad``). :meth:`Linearization.layer_taps
<curvlinops.Linearization.layer_taps>` first traces the model once abstractly
(``jax.eval_shape``, cached per input shape) to find its marked layers; then one
compiled pass runs the model with a zero *probe* added to each marked layer's output,
recording the layer inputs, and the output gradients for all ``M`` cotangent columns
come from one ``jax.vjp`` with respect to the probes, ``jax.vmap``-ed over the columns.
Each marked layer names its parameters by passing the parameter arrays themselves: in
the tap pass the model runs on parameters whose leaves are tracers, and a weight (or
bias) is identified with the leaf that *is* that object (``W`` itself, not ``W.T`` or a
cast copy). A weight that is no parameter, or a parameter used by two layers (a layer
called twice), raises a ValueError naming the layer.

The taps' layouts follow :class:`~curvlinops.models.LayerTap`: inputs ``(N, S..., D_in)``
and output gradients ``(N, S..., D_out, M)``; a convolution's inputs are its patches
``(N, S, D_in)`` over the ``S`` output pixels, ordered as the weight flattens
(``(C_in, kh, kw)`` for PyTorch's ``(C_out, C_in, kh, kw)``, ``(kh, kw, C_in)`` for
Flax's kernel ``(kh, kw, C_in, C_out)``); weights stored ``(D_in, D_out)`` (Flax
kernels, embedding tables) are taps with ``transposed=True``. A grouped convolution
(``G`` groups, depthwise for ``G = C_in``: ``conv2d(groups=G)``, Flax's
``feature_group_count``, Equinox's ``groups``) gives a tap with ``groups=G`` whose
patches are group-major, each group's ``D_in / G`` entries contiguous and ordered as
its kernel flattens (``(C_in / G, kh, kw)``, or ``(kh, kw, C_in / G)`` for Flax's
``(kh, kw, C_in / G, C_out)``).

Importing this module imports JAX; Flax and Equinox are imported only by the functions
that need them. May import: jax, flax, equinox (lazily, inside functions),
``curvlinops._backend``, ``curvlinops.models``.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass

try:
    import jax
    import jax.numpy as jnp
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "curvlinops.frontends.jax needs JAX: pip install jax (or curvlinops[jax]).",
        name="jax",
    ) from error

from ..models import (
    OUTPUTS,
    LayerTap,
    Linearization,
    MissingTierError,
    Model,
    OutputsFunction,
    Tier,
    TraceableLinearMap,
    param_shapes,
)

__all__ = ["JaxModel", "dense", "conv2d", "embed", "layer_norm"]

#: what a model without marked layers should do, for the messages of tier 3
_MARK_HINT = (
    "Mark the layers of the function, one call per layer, with "
    "curvlinops.frontends.jax.dense, conv2d or embed and create the model with "
    "JaxModel(fn, params, layer_taps=True); or build it with JaxModel.from_flax, "
    "from_nnx or from_equinox, which tap Dense/Linear, Conv and Embed layers without "
    "user code."
)


class JaxModel(Model):
    """A pure JAX function ``f(params, x) -> outputs`` as a curvlinops model (tiers 1-3).

    Parameters as a list or a pytree. Curvature operators take the parameters as a
    flat list of arrays. If ``params`` is given (any pytree: a list, a dict, nested
    containers), the model remembers its structure: :attr:`params` is the list of its
    leaves in ``jax.tree_util.tree_leaves`` order (dicts in sorted key order), and ``fn``
    is called with the pytree rebuilt from a list (:meth:`unflatten`). Without
    ``params``, ``fn`` receives the list itself.

    Compilation. With ``jit=True`` (default) the forward pass, the linearization and
    the products are compiled with ``jax.jit``; JAX caches one compiled function per
    input shape and dtype, so batches of a few different sizes compile a few times.
    The compiled functions are shared by all models of the same ``fn`` and parameter
    structure (creating a new ``JaxModel`` does not recompile).
    Under ``jit`` the function is traced once per shape: it must be **pure**. A Python
    value it reads from outside (a global, an attribute) is frozen at its value during
    tracing, and later changes are ignored until the next compilation (a new batch
    shape). The forward pass, the linearization and the second-order product are
    compiled separately, so after such a change they may even disagree with each
    other. Pass ``jit=False`` to run op by op, reading such values at every call
    (much slower). Randomness must come in through arguments; randomness in the data
    (e.g. fresh noise per pass) is caught by the curvature operators' determinism
    check.

    Layer taps (tier 3: K-FAC, EKFAC, the GGN and empirical-Fisher diagonals). A JAX
    function has no layers to hook into, so its layers are marked where they are
    computed: ``fn`` calls :func:`dense`, :func:`conv2d` or :func:`embed` once per
    layer, passing the parameter arrays of ``params`` themselves (see the module
    docstring for how they are found). Such a model is created with
    ``layer_taps=True``; the choice is explicit because whether ``fn`` marks its layers
    can only be seen by running it on data, and ``has_tier`` must be answerable before
    (it decides, e.g., the default partition of block-diagonal approximations and what
    ``verify_model`` checks). With ``layer_taps=True`` and no marked layer found,
    ``layer_taps`` raises :class:`~curvlinops.models.MissingTierError` saying how to
    mark them; the marks cost nothing outside a tap pass. The models built by
    :meth:`from_flax`, :meth:`from_nnx` and :meth:`from_equinox` offer tier 3 and tap
    their layers without marks. Marked layers must not sit inside a JAX transform
    within ``fn`` (``jax.vmap``, ``lax.scan``, ``jax.checkpoint``): their parameters
    are not the leaves there (:meth:`from_equinox` handles its own ``vmap``).

    Precision. JAX computes in float32 unless ``jax.config.update("jax_enable_x64",
    True)`` is set before any array is created; float64 parameters need it.

    Parameters
    ----------
    fn : callable
        ``fn(params, x) -> outputs`` of shape ``(N, C)`` (or ``(N, S, C)``), built from
        JAX operations.
    params : pytree of arrays, optional
        Example parameters, giving the pytree structure and the expected shapes.
    jit : bool
        Compile with ``jax.jit`` (see above).
    layer_taps : bool
        Whether the model offers tier 3: ``fn`` marks its layers with :func:`dense`,
        :func:`conv2d` and :func:`embed` (default False).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from curvlinops import GGNLinearOperator, MSELoss
    >>> from curvlinops.frontends.jax import JaxModel
    >>> def mlp(p, x):
    ...     return jnp.tanh(x @ p["w1"].T) @ p["w2"].T
    >>> model = JaxModel(mlp, {"w1": jnp.ones((4, 3)), "w2": jnp.ones((2, 4))})
    >>> [tuple(p.shape) for p in model.params]
    [(4, 3), (2, 4)]
    >>> X, y = jnp.ones((5, 3)), jnp.zeros((5, 2))
    >>> G = GGNLinearOperator(model, MSELoss(), model.params, [(X, y)])
    >>> G.shape
    (20, 20)

    The same network with its layers marked, for K-FAC:

    >>> from curvlinops import KFACLinearOperator
    >>> from curvlinops.frontends.jax import dense
    >>> def marked(p, x):
    ...     return dense(jnp.tanh(dense(x, p["w1"])), p["w2"])
    >>> model = JaxModel(marked, {"w1": jnp.ones((4, 3)), "w2": jnp.ones((2, 4))},
    ...                  layer_taps=True)
    >>> K = KFACLinearOperator(model, MSELoss(), model.params, [(X, y)])
    >>> [(t.name, t.weight_index, t.matrix_shape)
    ...  for t in model.linearize(model.params, X).layer_taps()]
    [('dense_0', 0, (4, 3)), ('dense_1', 1, (2, 4))]
    """

    #: tiers 1 and 2; an instance created with ``layer_taps=True`` adds tier 3
    tiers = frozenset({Tier.FIRST_ORDER, Tier.SECOND_ORDER})

    def __init__(self, fn, params=None, *, jit=True, layer_taps=False):
        if not callable(fn):
            raise TypeError(f"JaxModel expects a function f(params, x), got {type(fn).__name__}.")
        self.fn = fn
        self.treedef = None
        self._params = None
        if params is not None:
            leaves, self.treedef = jax.tree_util.tree_flatten(params)
            self._params = list(leaves)
        self.jit = bool(jit)
        if layer_taps:
            self.tiers = type(self).tiers | {Tier.LAYER_TAPS}
        # Hashable, so that the compiled functions (static in it) are shared by every
        # JaxModel of the same function and parameter structure.
        self._apply = _Apply(fn, self.treedef)
        self._compiled = _COMPILED if self.jit else _EAGER
        self._label = getattr(fn, "__name__", type(fn).__name__)

    # -- models of other JAX libraries ------------------------------------------------

    @classmethod
    def from_flax(cls, module, variables, *, jit=True):
        """A Flax linen module with its variables, its ``Dense``, ``Conv`` and ``Embed`` tapped.

        The model is ``module.apply({"params": params, **rest}, x)``: its parameters are
        the leaves of ``variables["params"]`` (:attr:`params`, in
        ``jax.tree_util.tree_leaves`` order); other collections (``rest``) stay
        constants. Tier 3 taps every ``flax.linen.Dense``, ``Conv`` and ``Embed``
        through ``flax.linen.intercept_methods``: a ``Dense`` kernel ``(D_in, D_out)``
        and an embedding table ``(V, D)`` give taps with ``transposed=True``; a
        ``Conv`` (channels-last inputs ``(N, *spatial, C_in)``, kernel
        ``(*kernel_size, C_in / G, C_out)`` for ``feature_group_count=G``, zero padding
        given as ``"SAME"``, ``"VALID"`` or integers; a kernel mask or another padding
        is refused by name) gives its patches ordered ``(*kernel_size, C_in)`` (with
        ``G > 1``: group-major, ``(G, *kernel_size, C_in / G)``, and ``groups=G``) with
        ``transposed=True, channels_first=False``. Each such layer must run once per
        forward pass (a layer called twice is refused).

        Parameters
        ----------
        module : flax.linen.Module
            The network; ``module.apply(variables, x)`` returns the outputs.
        variables : dict
            Its variables, as ``module.init`` returns them (with a ``"params"`` entry).
        jit : bool
            As in :class:`JaxModel`.

        Returns
        -------
        JaxModel

        Examples
        --------
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as fnn
        >>> from curvlinops.frontends.jax import JaxModel
        >>> net = fnn.Sequential([fnn.Dense(4), jnp.tanh, fnn.Dense(2)])
        >>> variables = net.init(jax.random.key(0), jnp.ones((1, 3)))
        >>> model = JaxModel.from_flax(net, variables)
        >>> [tuple(p.shape) for p in model.params]
        [(4,), (3, 4), (2,), (4, 2)]
        >>> X = jnp.ones((5, 3), model.params[0].dtype)  # the parameters' dtype (x64 or not)
        >>> taps = model.linearize(model.params, X).layer_taps()
        >>> [(t.name, t.weight_index, t.bias_index, t.transposed) for t in taps]
        [('layers_0', 1, 0, True), ('layers_2', 3, 2, True)]
        """
        import flax.linen as linen

        if not isinstance(module, linen.Module):
            raise TypeError(f"from_flax expects a flax.linen.Module, got {type(module).__name__}.")
        if not hasattr(variables, "keys") or "params" not in variables:
            raise ValueError(
                "from_flax needs the module's variables as module.init returns them, a "
                f"mapping with a 'params' entry; got {type(variables).__name__}."
            )
        rest = {k: v for k, v in variables.items() if k != "params"}

        def apply_flax(params, x):
            return module.apply({"params": params, **rest}, x)

        model = cls(apply_flax, variables["params"], jit=jit, layer_taps=True)
        model._apply = _FlaxApply(apply_flax, model.treedef)
        model._label = f"flax {type(module).__name__}"
        model.module = module
        return model

    @classmethod
    def from_nnx(cls, module, *, jit=True):
        """A Flax nnx module, its ``nnx.Linear``, ``nnx.Conv`` and ``nnx.Embed`` tapped.

        The module is split into its graph, its ``nnx.Param`` state and the rest
        (``nnx.split(module, nnx.Param, ...)``); the model is the merged module called on
        ``x``, its parameters the leaves of the ``Param`` state (:attr:`params`), the
        rest constants. The module itself is not modified. During a tap pass (only
        while it is traced) the ``__call__`` of ``nnx.Linear``, ``nnx.Conv`` and
        ``nnx.Embed`` is wrapped to take their taps, laid out as for
        :meth:`from_flax` (kernels ``(D_in, D_out)`` and ``(*kernel_size, C_in / G,
        C_out)``: ``transposed=True``; grouped convolutions with ``groups=G``).

        Parameters
        ----------
        module : flax.nnx.Module
            The network; ``module(x)`` returns the outputs.
        jit : bool
            As in :class:`JaxModel`.

        Returns
        -------
        JaxModel

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from curvlinops.frontends.jax import JaxModel
        >>> class MLP(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.hidden = nnx.Linear(3, 4, rngs=rngs)
        ...         self.out = nnx.Linear(4, 2, rngs=rngs)
        ...     def __call__(self, x):
        ...         return self.out(jnp.tanh(self.hidden(x)))
        >>> model = JaxModel.from_nnx(MLP(nnx.Rngs(0)))
        >>> X = jnp.ones((5, 3), model.params[0].dtype)  # the parameters' dtype (x64 or not)
        >>> taps = model.linearize(model.params, X).layer_taps()
        >>> [(t.name, t.matrix_shape, t.transposed) for t in taps]
        [('hidden', (4, 3), True), ('out', (2, 4), True)]
        """
        from flax import nnx

        if not isinstance(module, nnx.Module):
            raise TypeError(f"from_nnx expects a flax.nnx.Module, got {type(module).__name__}.")
        graphdef, state, *rest = nnx.split(module, nnx.Param, ...)

        def apply_nnx(params, x):
            return nnx.merge(graphdef, params, *rest)(x)

        model = cls(apply_nnx, state, jit=jit, layer_taps=True)
        model._apply = _NnxApply(apply_nnx, model.treedef, graphdef, tuple(rest))
        model._label = f"nnx {type(module).__name__}"
        model.module = module
        return model

    @classmethod
    def from_equinox(cls, module, *, jit=True):
        """An Equinox module, applied per datum, its ``Linear``, ``Conv`` and ``Embedding`` tapped.

        Equinox layers take one datum (``eqx.nn.Linear``: ``(D_in,)``; ``eqx.nn.Conv2d``:
        ``(C_in, H, W)``), so the model maps the module over the batch axis:
        ``f(params, x) = jax.vmap(module)(x)``. Its parameters are the module's
        inexact (floating) array leaves, ``eqx.partition(module, eqx.is_inexact_array)``
        (:attr:`params`, in ``jax.tree_util.tree_leaves`` order); the other leaves stay
        constants. Tier 3 finds the layers by walking the module's pytree:
        ``eqx.nn.Linear`` (weight ``(D_out, D_in)``, as PyTorch), ``eqx.nn.Conv``
        (``Conv1d/2d/3d``: channels first, weight ``(C_out, C_in / G, *kernel)`` for
        ``groups=G``, patches ordered ``(C_in, *kernel)`` and the tap's ``groups=G``;
        ``padding_mode="ZEROS"`` only, other padding modes are refused by name) and
        ``eqx.nn.Embedding`` (table ``(V, D)``: ``transposed=True``). Their names are the
        pytree paths (e.g. ``".layers[0]"``).

        Note: ``eqx.nn.Conv`` stores its bias as ``(C_out, 1, ...)``, which the
        Kronecker-factored operators accept only where they take a bias of
        ``D_out`` entries in any shape; build the convolutions with
        ``use_bias=False`` otherwise.

        Parameters
        ----------
        module : equinox.Module
            The network, a function of one datum.
        jit : bool
            As in :class:`JaxModel`.

        Returns
        -------
        JaxModel

        Examples
        --------
        >>> import jax, jax.numpy as jnp
        >>> import equinox as eqx
        >>> from curvlinops.frontends.jax import JaxModel
        >>> k1, k2 = jax.random.split(jax.random.key(0))
        >>> net = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=k1), eqx.nn.Lambda(jnp.tanh),
        ...                          eqx.nn.Linear(4, 2, key=k2)])
        >>> model = JaxModel.from_equinox(net)
        >>> model(model.params, jnp.ones((5, 3))).shape
        (5, 2)
        >>> X = jnp.ones((5, 3), model.params[0].dtype)  # the parameters' dtype (x64 or not)
        >>> taps = model.linearize(model.params, X).layer_taps()
        >>> [(t.name, t.weight_index, t.bias_index, t.transposed) for t in taps]
        [('.layers[0]', 0, 1, False), ('.layers[2]', 2, 3, False)]
        """
        import equinox as eqx

        if not isinstance(module, eqx.Module):
            raise TypeError(f"from_equinox expects an equinox.Module, got {type(module).__name__}.")
        params, static = eqx.partition(module, eqx.is_inexact_array)

        def apply_equinox(params, x):
            return jax.vmap(eqx.combine(params, static))(x)

        model = cls(apply_equinox, params, jit=jit, layer_taps=True)
        model._apply = _EquinoxApply(apply_equinox, model.treedef, static)
        model._label = f"equinox {type(module).__name__}"
        model.module = module
        return model

    @property
    def name(self) -> str:
        return f"JaxModel({self._label})"

    @property
    def params(self) -> list:
        """The example parameters' leaves (a list), as curvature operators take them."""
        if self._params is None:
            raise ValueError(
                "This JaxModel was created without params: create it as JaxModel(fn, params) "
                "to use model.params, or hand your list of arrays to the operators."
            )
        return list(self._params)

    def flatten(self, tree) -> list:
        """The leaves of a parameter pytree, in the order the model's lists use."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if self.treedef is not None and treedef != self.treedef:
            raise ValueError(f"Expected a pytree of structure {self.treedef}, got {treedef}.")
        return list(leaves)

    def unflatten(self, params):
        """The pytree ``fn`` receives for a list of parameter arrays."""
        if self.treedef is None:
            return list(params)
        return jax.tree_util.tree_unflatten(self.treedef, list(params))

    def expected_param_shapes(self):
        return None if self._params is None else param_shapes(self._params)

    def require(self, tier, purpose: str) -> None:
        try:
            super().require(tier, purpose)
        except MissingTierError as error:
            if int(tier) != int(Tier.LAYER_TAPS):
                raise
            raise MissingTierError(f"{error} {_MARK_HINT}") from None

    def __call__(self, params, x):
        self._check_inputs(params, x)
        return self._compiled.forward(self._apply, list(params), x)

    def linearize(self, params, x) -> Linearization:
        self._check_inputs(params, x)
        # the forward pass runs when the outputs or a first-order product ask for it: a
        # Hessian product recomputes the outputs inside its own compiled pass
        return _JaxLinearization(self, list(params), x)

    # -- internals --------------------------------------------------------------------

    def _check_inputs(self, params, x):
        arrays = [*params, x]
        if not all(isinstance(a, jax.Array) for a in arrays):
            found = sorted({type(a).__module__ + "." + type(a).__name__ for a in arrays})
            raise TypeError(
                f"{self.name} expects JAX arrays for the parameters and the data, found "
                f"{found}. Convert them with jax.numpy.asarray."
            )
        if not params:
            return
        dtype = params[0].dtype
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            raise TypeError(
                f"{self.name}: the inputs X are complex ({x.dtype}); curvature operators "
                "take real data."
            )
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            # JAX would promote silently: products of another dtype than the operator's
            raise TypeError(
                f"{self.name}: the inputs X are {x.dtype} but the parameters are {dtype}; "
                f"JAX would promote the products to another dtype than the operator's. Cast "
                f"the inputs with x.astype(jnp.{dtype}) (or the parameters to {x.dtype})."
            )
        _check_committed_devices(self.name, params, x)

    def _discover(self, params, x):
        """The marked layers (specs) and their output shapes, from one abstract trace."""
        key = (
            self._apply,
            tuple((tuple(p.shape), str(p.dtype)) for p in params),
            (tuple(x.shape), str(x.dtype)),
        )
        found = _DISCOVERED.get(key)
        if found is not None:
            return found
        box = []

        def run(params, x):
            _, (specs, _, outputs) = self._apply.tapped(params, x, None)
            box.append(specs)
            return outputs

        try:
            shapes = jax.eval_shape(run, list(params), x)
        except jax.errors.UnexpectedTracerError as error:
            raise ValueError(
                f"{self.name}: a marked layer's values escaped a JAX transform inside the "
                "model function (jax.vmap, lax.scan, jax.checkpoint, ...). Mark layers "
                "outside such transforms (JaxModel.from_equinox maps a per-datum module "
                "over the batch itself)."
            ) from error
        found = (box[-1], tuple((tuple(s.shape), s.dtype) for s in shapes))
        if len(_DISCOVERED) > 256:
            _DISCOVERED.clear()
        _DISCOVERED[key] = found
        return found


#: (apply, parameter shapes, input shape) -> (layer specs, probe shapes)
_DISCOVERED: dict = {}


def _check_committed_devices(name, params, x):
    """Refuse inputs committed to another device than committed parameters.

    JAX moves uncommitted arrays freely and raises its own error for committed ones on
    different devices; this names the model, the array and both devices instead.
    """
    committed = [p for p in params if getattr(p, "committed", False)]
    if not committed or not getattr(x, "committed", False):
        return
    expected, found = committed[0].devices(), x.devices()
    if expected != found:
        raise ValueError(
            f"{name}: the inputs X are committed to device(s) {sorted(map(str, found))} but "
            f"the parameters to {sorted(map(str, expected))}. Move the data with "
            "jax.device_put(x, device) to the parameters' device."
        )


class _JaxLinearization(Linearization):
    """Outputs of one compiled forward pass and the pullback that reuses it."""

    _traces_outputs = True

    def __init__(self, model, params, x):
        self._forward = None
        super().__init__(model, params, x, None)

    @property
    def outputs(self):
        return self._forward_pass()[0]

    @outputs.setter
    def outputs(self, value):  # the base class's assignment; the pass sets them
        if value is not None:
            raise AttributeError("The outputs of a JAX linearization come from its pass.")

    @property
    def _pullback(self):
        return self._forward_pass()[1]

    def _forward_pass(self):
        if self._forward is None:
            model = self.model
            self._forward = model._compiled.linearize(model._apply, self.params, self.x)
        return self._forward

    def _jvp(self, tangents):
        return self.model._compiled.push(self._pullback, self.outputs, list(tangents))

    def _vjp(self, cotangents):
        return self.model._compiled.pull(self._pullback, cotangents)

    def _gauss_newton_vjp(self, tangents, cotangent_map):
        if not isinstance(cotangent_map, TraceableLinearMap):
            return super()._gauss_newton_vjp(tangents, cotangent_map)
        # push, map and pull in one compiled call: no dispatch of the map's operations
        return self.model._compiled.gauss_newton(
            self._pullback,
            self.outputs,
            cotangent_map.function,
            list(tangents),
            cotangent_map.operands,
        )

    def _second_order_vjp(self, cotangent, tangents, cotangent_tangent):
        model = self.model
        fused = isinstance(cotangent, OutputsFunction)
        if fused and isinstance(cotangent_tangent, TraceableLinearMap):
            # u and A from the outputs of the compiled pass itself: no separate forward
            where_u, u_operands = _split_outputs(cotangent.operands)
            where_A, A_operands = _split_outputs(cotangent_tangent.operands)
            return model._compiled.second_order_from_outputs(
                model._apply,
                (cotangent.function, where_u, cotangent_tangent.function, where_A),
                self.params,
                self.x,
                list(tangents),
                u_operands,
                A_operands,
            )
        if fused:  # the placeholders resolved with this linearization's outputs
            cotangent = cotangent.evaluate(self.outputs)
        if isinstance(cotangent_tangent, TraceableLinearMap):
            cotangent_tangent = cotangent_tangent.with_outputs(self.outputs)
        if isinstance(cotangent_tangent, TraceableLinearMap):
            # One compiled forward-over-reverse pass, w = A(J v) computed inside it.
            return model._compiled.second_order_traceable(
                model._apply,
                cotangent_tangent.function,
                self.params,
                self.x,
                cotangent,
                list(tangents),
                cotangent_tangent.operands,
            )
        if callable(cotangent_tangent):
            cotangent_tangent = cotangent_tangent(self._jvp(tangents))
        model = self.model
        return model._compiled.second_order(
            model._apply, self.params, self.x, cotangent, list(tangents), cotangent_tangent
        )

    def _layer_taps(self, cotangents):
        model = self.model
        specs, probes = model._discover(self.params, self.x)
        if not specs:
            raise MissingTierError(
                f"layer_taps (Kronecker-factored curvature) found no marked layer in "
                f"{model.name}, which offers tier 3 only for the layers its function "
                f"marks. {_MARK_HINT}"
            )
        if cotangents is not None and cotangents.dtype != self.outputs.dtype:
            cotangents = cotangents.astype(self.outputs.dtype)
        laid_out = model._compiled.taps(
            model._apply, specs, probes, self.params, self.x, cotangents
        )
        return [
            LayerTap(
                spec.name,
                spec.weight_index,
                spec.bias_index,
                inputs,
                grads,
                spec.matrix_shape,
                kind=_TAP_KINDS.get(spec.kind, "matrix"),
                channels_first=spec.channels_first,
                transposed=spec.transposed,
                groups=spec.groups,
            )
            for spec, (inputs, grads) in zip(specs, laid_out, strict=True)
        ]


# -- marking layers -----------------------------------------------------------------------


def dense(x, weight, bias=None, *, transposed=False, name=None):
    """A fully connected layer, marked for layer taps: ``x @ weight.T + bias``.

    ``weight`` is ``(D_out, D_in)``, as ``torch.nn.Linear`` (and ``curvlinops.nn.Linear``)
    store it; with ``transposed=True`` it is ``(D_in, D_out)``, as a Flax ``Dense``
    kernel, and the layer computes ``x @ weight + bias`` (its tap then says
    ``transposed=True``). Inputs ``(N, ..., D_in)``: the weight is shared over the
    middle axes (e.g. a sequence).

    Outside a tap pass this is a plain JAX function. Inside one (a :class:`JaxModel`
    created with ``layer_taps=True``), ``weight`` and ``bias`` must be arrays of the
    model's parameters themselves (e.g. ``params["w"]``, not ``params["w"].T``), and
    each may be used by one marked layer only.

    Parameters
    ----------
    x : jax.Array
        Inputs ``(N, ..., D_in)``.
    weight : jax.Array
        ``(D_out, D_in)``, or ``(D_in, D_out)`` with ``transposed=True``.
    bias : jax.Array, optional
        ``(D_out,)``.
    transposed : bool
        The weight's layout (see above).
    name : str, optional
        The layer's name in its tap (default ``"dense_<k>"`` for the ``k``-th marked
        layer).

    Returns
    -------
    jax.Array
        ``(N, ..., D_out)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from curvlinops.frontends.jax import dense
    >>> dense(jnp.ones((2, 3)), jnp.ones((4, 3)), jnp.arange(4.0)).tolist()
    [[3.0, 4.0, 5.0, 6.0], [3.0, 4.0, 5.0, 6.0]]
    >>> dense(jnp.ones((2, 3)), jnp.ones((3, 4)), transposed=True).shape
    (2, 4)
    """
    out = x @ weight if transposed else x @ weight.T
    if bias is not None:
        out = out + bias
    return _mark(_DENSE, x, out, weight, bias, name=name, transposed=transposed)


def layer_norm(x, weight=None, bias=None, *, eps=1e-5, name=None):
    """Layer normalization over the last axis, its affine part marked for layer taps.

    ``y = weight * (x - mean) / sqrt(var + eps) + bias`` with the mean and (biased)
    variance over the last axis, as ``torch.nn.LayerNorm(D)`` and
    ``curvlinops.nn.LayerNorm``. Its tap is of kind ``"elementwise"``: the normalized
    inputs ``(N, ..., D)``, whose weight and bias get their exact block in K-FAC and
    EKFAC. Without ``weight`` nothing is marked.

    Parameters
    ----------
    x : jax.Array
        Inputs ``(N, ..., D)``.
    weight, bias : jax.Array, optional
        ``(D,)`` each, parameters of the model.
    eps : float
        Added to the variance.
    name : str, optional
        The layer's name in its tap (default ``"layer_norm_<k>"``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from curvlinops.frontends.jax import layer_norm
    >>> layer_norm(jnp.asarray([[1.0, 3.0]]), jnp.asarray([2.0, 1.0]), eps=0.0).tolist()
    [[-2.0, 1.0]]
    """
    import jax.numpy as jnp

    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    normalized = centered / jnp.sqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
    if weight is None:
        return normalized if bias is None else normalized + bias
    out = normalized * weight
    if bias is not None:
        out = out + bias
    return _mark(_NORM, normalized, out, weight, bias, name=name)


def conv2d(
    x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, layout="NCHW", name=None
):
    """A 2d convolution, marked for layer taps (``jax.lax.conv_general_dilated``).

    Layout ``"NCHW"`` (default): inputs ``(N, C_in, H, W)``, weight
    ``(C_out, C_in, kh, kw)`` and outputs ``(N, C_out, H_out, W_out)``, as
    ``torch.nn.Conv2d`` and ``curvlinops.nn.Conv2d``; the tap's patches are ordered
    ``(C_in, kh, kw)`` as the weight flattens. Layout ``"NHWC"``: inputs
    ``(N, H, W, C_in)``, weight ``(kh, kw, C_in, C_out)`` (Flax's kernel) and outputs
    ``(N, H_out, W_out, C_out)``; the patches are ordered ``(kh, kw, C_in)`` and the
    tap says ``transposed=True``. With ``groups = G`` (a grouped convolution; depthwise
    for ``G = C_in``) the weight's input-channel axis has ``C_in / G`` entries, the tap
    says ``groups=G``, and its patches are group-major: ``(G, C_in / G, kh, kw)``, or
    ``(G, kh, kw, C_in / G)`` for ``"NHWC"``.

    Parameters
    ----------
    x : jax.Array
        Inputs, as the layout says.
    weight : jax.Array
        The kernel, as the layout says.
    bias : jax.Array, optional
        ``(C_out,)``.
    stride, dilation : int or pair of int
        Stride and kernel dilation per spatial axis.
    groups : int
        Number of groups of input and output channels (``feature_group_count``), each
        dividing ``C_in`` and ``C_out``.
    padding : int, pair of int, pair of pairs, "SAME" or "VALID"
        Zero padding: ``p`` on every side, ``(ph, pw)`` on both sides of each axis,
        ``((top, bottom), (left, right))``, or ``jax.lax``'s ``"SAME"`` (as
        PyTorch's ``"same"`` at stride 1) / ``"VALID"`` (no padding).
    layout : {"NCHW", "NHWC"}
        See above.
    name : str, optional
        The layer's name in its tap (default ``"conv2d_<k>"``).

    Returns
    -------
    jax.Array

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from curvlinops.frontends.jax import conv2d
    >>> conv2d(jnp.ones((2, 3, 5, 5)), jnp.ones((4, 3, 3, 3)), padding=1).shape
    (2, 4, 5, 5)
    >>> conv2d(jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4)), stride=2, layout="NHWC").shape
    (2, 2, 2, 4)
    >>> conv2d(jnp.ones((2, 4, 5, 5)), jnp.ones((6, 2, 3, 3)), groups=2).shape  # C_in / G = 2
    (2, 6, 3, 3)
    """
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"conv2d takes layout 'NCHW' or 'NHWC', got {layout!r}.")
    channels_first = layout == "NCHW"
    if x.ndim != 4:
        raise ValueError(f"conv2d expects inputs of 4 axes ({layout}), got shape {x.shape}.")
    kernel = tuple(weight.shape[2:]) if channels_first else tuple(weight.shape[:2])
    _check_conv_groups(x, weight, _int_tuple(groups, 1, "groups")[0], channels_first)
    geometry = _ConvGeometry(
        kernel,
        _int_tuple(stride, 2, "stride"),
        _padding(padding, 2),
        (1, 1),
        _int_tuple(dilation, 2, "dilation"),
        channels_first,
        _int_tuple(groups, 1, "groups")[0],
    )
    out = jax.lax.conv_general_dilated(
        x,
        weight,
        window_strides=geometry.strides,
        padding=geometry.padding,
        rhs_dilation=geometry.rhs_dilation,
        dimension_numbers=geometry.dimension_numbers(),
        feature_group_count=geometry.groups,
    )
    if bias is not None:
        out = out + (bias[:, None, None] if channels_first else bias)
    return _mark(
        _CONV,
        x,
        out,
        weight,
        bias,
        name=name,
        transposed=not channels_first,
        channels_first=channels_first,
        geometry=geometry,
    )


def _check_conv_groups(x, weight, groups, channels_first):
    """A clear error unless ``groups`` splits the input and output channels of conv2d."""
    c_in = x.shape[1] if channels_first else x.shape[-1]
    c_group = weight.shape[1] if channels_first else weight.shape[-2]
    c_out = weight.shape[0] if channels_first else weight.shape[-1]
    if c_group * groups != c_in or c_out % groups:
        where = "weight.shape[1]" if channels_first else "weight.shape[-2]"
        raise ValueError(
            f"conv2d with groups={groups} needs C_in = {where} * groups and C_out divisible "
            f"by groups; got C_in={c_in}, {where}={c_group}, C_out={c_out}."
        )


def embed(ids, table, *, name=None):
    """An embedding lookup, marked for layer taps: ``table[ids]``.

    The lookup is the linear layer ``onehot(ids) @ table`` of a table ``(V, D)``
    (``V`` entries of ``D`` features, as ``torch.nn.Embedding``, ``flax.linen.Embed`` and
    ``eqx.nn.Embedding`` store it): its tap is of kind ``"embedding"``, the ids
    ``(N, ...)`` with the table as the transposed ``(D_in, D_out)`` matrix, so K-FAC's input
    factor is the diagonal of the ids' counts (as for native and PyTorch embeddings).

    Parameters
    ----------
    ids : jax.Array
        Integer indices ``(N, ...)`` in ``[0, V)``.
    table : jax.Array
        ``(V, D)``.
    name : str, optional
        The layer's name in its tap (default ``"embed_<k>"``).

    Returns
    -------
    jax.Array
        ``(N, ..., D)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from curvlinops.frontends.jax import embed
    >>> embed(jnp.asarray([[0, 2]]), jnp.arange(6.0).reshape(3, 2)).tolist()
    [[[0.0, 1.0], [4.0, 5.0]]]
    """
    out = jnp.take(table, ids, axis=0)
    return _mark(_EMBED, ids, out, table, None, name=name, transposed=True)


_DENSE, _CONV, _EMBED, _NORM = "dense", "conv2d", "embed", "layer_norm"
#: the LayerTap kind of each marked layer's tap
_TAP_KINDS = {_EMBED: "embedding", _NORM: "elementwise"}


@dataclass(frozen=True)
class _ConvGeometry:
    """A convolution's settings, as ``jax.lax`` takes them (hashable: a static argument)."""

    kernel: tuple
    strides: tuple
    padding: object  # a string or a tuple of (low, high) pairs
    lhs_dilation: tuple
    rhs_dilation: tuple
    channels_first: bool
    groups: int = 1  # jax.lax's feature_group_count

    def dimension_numbers(self):
        spatial = "DHW"[3 - len(self.kernel) :] if len(self.kernel) <= 3 else None
        if spatial is None:
            raise ValueError(f"Convolutions of {len(self.kernel)} spatial axes are not tapped.")
        if self.channels_first:
            return ("NC" + spatial, "OI" + spatial, "NC" + spatial)
        return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")


@dataclass(frozen=True)
class _LayerSpec:
    """A marked layer, as one trace of the model found it (static: no arrays)."""

    name: str
    kind: str
    weight_index: int
    bias_index: int | None
    matrix_shape: tuple
    transposed: bool = False
    channels_first: bool = False
    geometry: _ConvGeometry | None = None
    dtype: object = None  # of the weight (one-hot inputs of an embedding)
    groups: int = 1  # a grouped convolution's


def _int_tuple(value, n, what):
    items = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        items = tuple(int(v) for v in items)
    except (TypeError, ValueError):
        items = ()
    if len(items) != n or min(items) < 1:
        raise ValueError(f"{what} must be a positive integer or {n} of them, got {value!r}.")
    return items


def _padding(padding, n):
    """``padding`` as ``jax.lax`` takes it: ``"SAME"``, ``"SAME_LOWER"``, ``"VALID"`` or pairs."""
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "SAME_LOWER", "VALID"):
            return padding.upper()
        raise ValueError(
            f"Tapped convolutions take zero padding 'SAME', 'VALID' or integers, got "
            f"{padding!r} (circular, causal or reflecting padding is not tapped)."
        )
    if isinstance(padding, int) and not isinstance(padding, bool):
        return ((padding, padding),) * n
    try:
        items = list(padding)
        if len(items) == n:
            pairs = tuple(
                (int(p), int(p)) if isinstance(p, int) else tuple(int(v) for v in p) for p in items
            )
            if all(len(p) == 2 and min(p) >= 0 for p in pairs):
                return pairs
    except (TypeError, ValueError):
        pass
    raise ValueError(
        f"padding must be 'SAME', 'VALID', an integer, {n} integers or {n} pairs of "
        f"non-negative integers, got {padding!r}."
    )


# -- the tap pass: a context the marked layers report to -------------------------------------

_STATE = threading.local()
_AMBIGUOUS = -1


def _active():
    stack = getattr(_STATE, "stack", None)
    return stack[-1] if stack else None


class _TapContext:
    """What one run of the model in a tap pass records: the marked layers, in call order.

    ``leaves`` are the parameters the model runs on (tracers in a compiled pass); a marked
    layer's weight is the leaf that *is* the array it passes. ``probes`` (None while the
    layers are discovered) are added, in order, to the marked layers' outputs.
    """

    def __init__(self, leaves, probes):
        self.leaves = list(leaves)
        self.index = {}
        for i, leaf in enumerate(self.leaves):
            self.index[id(leaf)] = _AMBIGUOUS if id(leaf) in self.index else i
        self.probes = probes
        self.specs, self.inputs, self.outputs = [], [], []
        self.owner = {}

    def __enter__(self):
        if not hasattr(_STATE, "stack"):
            _STATE.stack = []
        _STATE.stack.append(self)
        return self

    def __exit__(self, *exc):
        _STATE.stack.pop()
        return False

    def records(self):
        return tuple(self.specs), list(self.inputs), list(self.outputs)

    def _parameter(self, array, what, label):
        i = self.index.get(id(array))
        if i is None:
            shape = tuple(getattr(array, "shape", ()))
            raise ValueError(
                f"The {what} of the marked layer {label!r} (shape {shape}) is not one of the "
                "model's parameters: pass the parameter array itself (e.g. params['w']), not "
                "a transformed copy (w.T, w.astype(...), w * 1) or a constant, and mark the "
                "layer outside JAX transforms within the model function."
            )
        if i == _AMBIGUOUS:
            raise ValueError(
                f"The {what} of the marked layer {label!r} appears more than once in the "
                "parameter list (the same array object twice): pass distinct arrays."
            )
        if i in self.owner:
            raise ValueError(
                f"Parameter {i} (shape {tuple(self.leaves[i].shape)}) is used by the marked "
                f"layers {self.owner[i]!r} and {label!r}: a layer called twice in one "
                "forward pass (or weights shared between layers). Layer taps need each "
                "marked layer's parameters to be its own, used once; use an exact operator "
                "(e.g. GGNLinearOperator) for this model."
            )
        self.owner[i] = label
        return i

    def site(self, kind, x, out, weight, bias, *, name, transposed, channels_first, geometry):
        k = len(self.specs)
        label = f"{kind}_{k}" if name is None else str(name)
        w = self._parameter(weight, "weight", label)
        b = None if bias is None else self._parameter(bias, "bias", label)
        shape = tuple(weight.shape)
        if kind == _CONV:
            d_in = math.prod(shape[1:]) if channels_first else math.prod(shape[:-1])
            matrix_shape = (shape[0] if channels_first else shape[-1], d_in)
        elif kind == _NORM:  # an elementwise tap: weight and bias of D entries
            matrix_shape = None
        elif len(shape) != 2:
            raise ValueError(
                f"The weight of the marked layer {label!r} must be a matrix, got {shape}."
            )
        else:
            matrix_shape = (shape[1], shape[0]) if transposed else shape
        spec = _LayerSpec(
            label,
            kind,
            w,
            b,
            matrix_shape,
            bool(transposed),
            bool(channels_first),
            geometry,
            weight.dtype if kind == _EMBED else None,
            geometry.groups if kind == _CONV else 1,
        )
        self.specs.append(spec)
        self.inputs.append(x)
        self.outputs.append(out)
        if self.probes is None:
            return out
        if k >= len(self.probes) or tuple(self.probes[k].shape) != tuple(out.shape):
            raise ValueError(
                f"The marked layer {label!r} differs from the one found when the model was "
                "traced before: the model function is not pure (it marks different layers "
                "on different runs)."
            )
        # a zero added to the layer's output: the gradient with respect to it is the
        # gradient with respect to the output
        return out + self.probes[k]


def _mark(
    kind, x, out, weight, bias, *, name, transposed=False, channels_first=False, geometry=None
):
    """``out``, reported to the tap pass in progress (if any) as a marked layer's output."""
    context = _active()
    if context is None:
        return out
    return context.site(
        kind,
        x,
        out,
        weight,
        bias,
        name=name,
        transposed=transposed,
        channels_first=channels_first,
        geometry=geometry,
    )


# -- the model functions, plain and of Flax / Equinox -------------------------------------


@dataclass(frozen=True, eq=False)
class _Apply:
    """``fn`` applied to a parameter list; equal for equal ``fn`` and structure."""

    fn: object
    treedef: object

    # jit compares static arguments; a PyTreeDef raises on ``== None``, so the
    # structure is compared only between two present ones.
    def _key(self):
        return type(self), self.fn, self.treedef is None

    def __eq__(self, other):
        if not isinstance(other, _Apply) or self._key() != other._key():
            return False
        return self.treedef is None or self.treedef == other.treedef

    def __hash__(self):
        return hash((self._key(), self.treedef))

    def __call__(self, params, x):
        return self.fn(self._tree(params), x)

    def _tree(self, params):
        if self.treedef is None:
            return list(params)
        return jax.tree_util.tree_unflatten(self.treedef, list(params))

    def tapped(self, params, x, probes):
        """Outputs and ``(specs, layer inputs, layer outputs)`` of a run with the probes added."""
        with _TapContext(params, probes) as context:
            outputs = self(params, x)
        return outputs, context.records()


@dataclass(frozen=True, eq=False)
class _FlaxApply(_Apply):
    """A linen module's apply; Dense, Conv, Embed, LayerNorm tapped by method interception."""

    def tapped(self, params, x, probes):
        import flax.linen as linen

        with _TapContext(params, probes) as context, linen.intercept_methods(_linen_tap):
            outputs = self(params, x)
        return outputs, context.records()


@dataclass(frozen=True, eq=False)
class _NnxApply(_Apply):
    """An nnx module merged from its state; Linear, Conv and Embed tapped by wrapped calls."""

    graphdef: object = None
    rest: tuple = ()

    def tapped(self, params, x, probes):
        from flax import nnx

        root = nnx.merge(self.graphdef, self._tree(params), *self.rest)
        names = {
            id(node): ".".join(str(p) for p in path)
            for path, node in nnx.iter_graph(root)
            if isinstance(node, nnx.Module)
        }
        with _TapContext(params, probes) as context, _nnx_calls_tapped(names):
            outputs = root(x)
        return outputs, context.records()


@dataclass(frozen=True, eq=False)
class _EquinoxApply(_Apply):
    """A per-datum Equinox module vmapped over the batch; its layers wrapped by a tree walk."""

    static: object = None

    def tapped(self, params, x, probes):
        import equinox as eqx

        module = _equinox_tapped(eqx.combine(self._tree(params), self.static))
        leaves, found = list(params), []

        def one(x_n, probes_n):
            # the context lives inside vmap: the layers see one datum, the probes' slices,
            # and their inputs and outputs leave as vmap's (batched) outputs
            with _TapContext(leaves, probes_n) as context:
                out = module(x_n)
            specs, inputs, outputs = context.records()
            found.append(specs)
            return out, inputs, outputs

        outputs, inputs, layer_outputs = jax.vmap(one)(x, probes)
        return outputs, (found[-1], inputs, layer_outputs)


def _flax_conv_geometry(module, x, label):
    """The ``_ConvGeometry`` of a linen or nnx ``Conv`` (channels last), or a clear error."""
    kernel = tuple(int(k) for k in module.kernel_size)
    n = len(kernel)
    if getattr(module, "mask", None) is not None:
        raise ValueError(f"The Conv {label!r} has a kernel mask; masked kernels are not tapped.")
    if x.ndim != n + 2:
        raise ValueError(
            f"The Conv {label!r} gets inputs of shape {tuple(x.shape)}; layer taps need one "
            f"batch axis, (N, {', '.join(['...'] * n)}, C_in)."
        )
    return _ConvGeometry(
        kernel,
        _int_tuple(module.strides or 1, n, "strides"),
        _padding(module.padding, n),
        _int_tuple(module.input_dilation or 1, n, "input_dilation"),
        _int_tuple(module.kernel_dilation or 1, n, "kernel_dilation"),
        False,
        int(module.feature_group_count),
    )


def _linen_tap(next_fun, args, kwargs, context):
    """``flax.linen.intercept_methods`` interceptor: the taps of Dense, Conv, Embed, LayerNorm."""
    import flax.linen as linen

    module = context.module
    if context.method_name != "__call__" or _active() is None:
        return next_fun(*args, **kwargs)
    if not isinstance(module, (linen.Dense, linen.Conv, linen.Embed, linen.LayerNorm)):
        return next_fun(*args, **kwargs)
    label = "/".join(str(p) for p in module.path) or type(module).__name__
    x = args[0] if args else next(iter(kwargs.values()))
    out = next_fun(*args, **kwargs)
    if isinstance(module, linen.LayerNorm):
        return _linen_layer_norm(module, x, out, label)
    if isinstance(module, linen.Embed):
        table = module.get_variable("params", "embedding")
        return _mark(_EMBED, x, out, table, None, name=label, transposed=True)
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    if isinstance(module, linen.Dense):
        return _mark(_DENSE, x, out, kernel, bias, name=label, transposed=True)
    geometry = _flax_conv_geometry(module, x, label)
    return _mark(_CONV, x, out, kernel, bias, name=label, transposed=True, geometry=geometry)


def _linen_layer_norm(module, x, out, label):
    """A linen LayerNorm over the last axis with a scale: an elementwise tap (else none)."""
    import jax.numpy as jnp

    axes = {a % x.ndim for a in _as_tuple(module.reduction_axes)}
    features = {a % x.ndim for a in _as_tuple(module.feature_axes)}
    if not module.use_scale or axes != {x.ndim - 1} or features != {x.ndim - 1}:
        if module.use_scale or module.use_bias:
            raise ValueError(
                f"The Flax LayerNorm {label!r} normalizes over axes {module.reduction_axes} "
                f"with features on {module.feature_axes} (use_scale={module.use_scale}); "
                "layer taps cover a LayerNorm over the last axis with a scale. Freeze its "
                "parameters, or normalize over the last axis."
            )
        return out
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(centered * centered, axis=-1, keepdims=True)
    normalized = centered / jnp.sqrt(variance + module.epsilon)
    scale = module.get_variable("params", "scale")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    return _mark(_NORM, normalized, out, scale, bias, name=label)


def _as_tuple(axes):
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


_PATCH_LOCK = threading.RLock()


@contextmanager
def _nnx_calls_tapped(names):
    """``nnx.Linear``, ``nnx.Conv`` and ``nnx.Embed`` calls taken as marked layers, meanwhile."""
    from flax import nnx

    def value(variable):
        get = getattr(variable, "get_value", None)
        return get() if get is not None else variable.value

    def tapped_call(original, kind):
        def call(self, inputs, *args, **kwargs):
            out = original(self, inputs, *args, **kwargs)
            if _active() is None:
                return out
            label = names.get(id(self)) or None
            if kind == _EMBED:
                table = value(self.embedding)
                return _mark(_EMBED, inputs, out, table, None, name=label, transposed=True)
            kernel = value(self.kernel)
            bias = None if self.bias is None else value(self.bias)
            if kind == _DENSE:
                return _mark(_DENSE, inputs, out, kernel, bias, name=label, transposed=True)
            geometry = _flax_conv_geometry(self, inputs, label or "Conv")
            return _mark(
                _CONV, inputs, out, kernel, bias, name=label, transposed=True, geometry=geometry
            )

        call.__wrapped__ = original
        return call

    kinds = {nnx.Linear: _DENSE, nnx.Conv: _CONV, nnx.Embed: _EMBED}
    with _PATCH_LOCK:
        originals = {cls: cls.__dict__["__call__"] for cls in kinds}
        try:
            for cls, kind in kinds.items():
                cls.__call__ = tapped_call(originals[cls], kind)
            yield
        finally:
            for cls, original in originals.items():
                cls.__call__ = original


_EQUINOX_WRAPPER = []


def _equinox_tapped(module):
    """``module`` with each ``eqx.nn.Linear``, ``Conv`` and ``Embedding`` in a tapping wrapper."""
    import equinox as eqx

    if not _EQUINOX_WRAPPER:

        class TappedLayer(eqx.Module):
            layer: object
            name: str = eqx.field(static=True)

            def __call__(self, x, *, key=None):
                layer = self.layer
                out = layer(x, key=key)
                label = self.name or None
                if isinstance(layer, eqx.nn.Linear):
                    if "scalar" in (layer.in_features, layer.out_features):
                        raise ValueError(
                            f"The eqx.nn.Linear {self.name!r} has scalar features; layer taps "
                            "need vector inputs and outputs."
                        )
                    return _mark(_DENSE, x, out, layer.weight, layer.bias, name=label)
                if isinstance(layer, eqx.nn.Embedding):
                    return _mark(_EMBED, x, out, layer.weight, None, name=label, transposed=True)
                if layer.padding_mode != "ZEROS":
                    raise ValueError(
                        f"The eqx.nn.Conv {self.name!r} has padding_mode="
                        f"{layer.padding_mode!r}; layer taps cover convolutions with zero "
                        "padding (padding_mode='ZEROS'). Use an exact operator (e.g. "
                        "GGNLinearOperator) for this model."
                    )
                n = layer.num_spatial_dims
                geometry = _ConvGeometry(
                    tuple(int(k) for k in layer.kernel_size),
                    _int_tuple(layer.stride, n, "stride"),
                    _padding(layer.padding, n),
                    (1,) * n,
                    _int_tuple(layer.dilation, n, "dilation"),
                    True,
                    int(layer.groups),
                )
                return _mark(
                    _CONV,
                    x,
                    out,
                    layer.weight,
                    layer.bias,
                    name=label,
                    channels_first=True,
                    geometry=geometry,
                )

        _EQUINOX_WRAPPER.append(TappedLayer)
    wrapper = _EQUINOX_WRAPPER[0]
    targets = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.Embedding)

    def wrap(path, node):
        if isinstance(node, targets):
            return wrapper(node, jax.tree_util.keystr(path))
        return node

    return jax.tree_util.tree_map_with_path(
        wrap, module, is_leaf=lambda node: isinstance(node, targets)
    )


# -- taps: layouts and the compiled pass -----------------------------------------------------


def _lay_out(spec, a, g):
    """A marked layer's recorded input and probe gradients in the ``LayerTap`` layout."""
    if spec.kind in (_DENSE, _NORM):  # a layer norm's recorded input is the normalized one
        return a, g
    if spec.kind == _EMBED:  # the ids: an "embedding" tap (its input factor diagonal)
        return a, g
    geometry = spec.geometry
    lhs, rhs, _ = geometry.dimension_numbers()
    spatial = lhs[2:] if geometry.channels_first else lhs[1:-1]
    patches = jax.lax.conv_general_dilated_patches(
        a,
        geometry.kernel,
        geometry.strides,
        geometry.padding,
        lhs_dilation=geometry.lhs_dilation,
        rhs_dilation=geometry.rhs_dilation,
        dimension_numbers=(lhs, rhs, "N" + spatial + "C"),
        precision=jax.lax.Precision.HIGHEST,
    )
    # patches (N, *S, C_in * k) with entries ordered (C_in, *kernel): with G groups the
    # channels of each group are contiguous, (G, C_in / G, *kernel), as LayerTap wants
    N, S, D = patches.shape[0], math.prod(patches.shape[1:-1]), patches.shape[-1]
    k, G = math.prod(geometry.kernel), geometry.groups
    if geometry.channels_first:
        patches = jnp.reshape(patches, (N, S, D))
    else:  # each group's as the kernel's leading axes (*kernel, C_in / G) flatten
        patches = jnp.reshape(
            jnp.swapaxes(jnp.reshape(patches, (N, S, G, D // (G * k), k)), 3, 4), (N, S, D)
        )
    if g is not None:
        if geometry.channels_first:  # (N, C_out, *S, M) -> (N, *S, C_out, M)
            g = jnp.moveaxis(g, 1, -2)
        g = jnp.reshape(g, (N, S, *g.shape[-2:]))
    return patches, g


def _taps(apply, specs, probes, params, x, cotangents):
    """Each marked layer's ``(inputs, output gradients)``: one run, one vmapped pullback."""
    found = []
    if cotangents is None:
        _, (specs_run, inputs, _) = apply.tapped(params, x, None)
        found.append(specs_run)
        grads = [None] * len(inputs)
    else:
        zeros = [jnp.zeros(shape, dtype) for shape, dtype in probes]

        def run(z):
            outputs, (specs_run, inputs, _) = apply.tapped(params, x, z)
            found.append(specs_run)
            return outputs, inputs

        _, pullback, inputs = jax.vjp(run, zeros, has_aux=True)
        grads = _columns(lambda u: pullback(u)[0], cotangents)
    if found[-1] != specs:
        raise ValueError(
            "The model marked other layers than when it was traced before: its function is "
            "not pure."
        )
    return [_lay_out(s, a, g) for s, a, g in zip(specs, inputs, grads, strict=True)]


def _forward(apply, params, x):
    return apply(params, x)


def _linearize(apply, params, x):
    """Outputs and the pullback (a pytree holding the forward pass's residuals)."""
    return jax.vjp(lambda p: apply(p, x), params)


def _columns(linear_map, columns):
    """``linear_map`` applied to each column of a pytree with a trailing axis ``K``.

    ``K = 1`` (a matvec) drops the axis instead of vmapping over it: a vmap over one
    column turns every matrix product into a batched one, 15-20 % slower on CPU.
    """
    if all(leaf.shape[-1] == 1 for leaf in jax.tree_util.tree_leaves(columns)):
        squeezed = jax.tree_util.tree_map(lambda a: a[..., 0], columns)
        return jax.tree_util.tree_map(lambda a: a[..., None], linear_map(squeezed))
    return jax.vmap(linear_map, in_axes=-1, out_axes=-1)(columns)


def _pull(pullback, cotangents):
    """``J^T U`` for cotangents with a trailing axis ``K`` (one vmapped pullback)."""
    return _columns(lambda u: pullback(u)[0], cotangents)


def _push(pullback, outputs, tangents):
    """``J V``: the transpose of the (linear) pullback, applied to each of the ``K`` columns."""
    push = jax.linear_transpose(pullback, jax.ShapeDtypeStruct(outputs.shape, outputs.dtype))
    return _columns(lambda v: push((v,))[0], tangents)


def _gauss_newton(pullback, outputs, map_function, tangents, operands):
    """``J^T A(J V)`` with ``A = map_function(*operands, .)``: push, map and pull."""
    return _pull(pullback, map_function(*operands, _push(pullback, outputs, tangents)))


def _second_order(apply, params, x, u, tangents, w):
    """``sum u Hess(f) v + J^T w`` per column: the jvp of the vjp (forward over reverse)."""

    def transposed_jacobian_product(p, c):
        return jax.vjp(lambda q: apply(q, x), p)[1](c)[0]

    if w is None:

        def single(v):
            return jax.jvp(lambda p: transposed_jacobian_product(p, u), (params,), (v,))[1]

        return _columns(single, tangents)

    def single_with_w(v, w_k):
        return jax.jvp(transposed_jacobian_product, (params, u), (v, w_k))[1]

    return _columns(lambda pair: single_with_w(*pair), (tangents, w))


def _second_order_traceable(apply, map_function, params, x, u, tangents, operands):
    """``sum u Hess(f) v + J^T A J v`` per column for ``A = map_function(*operands, .)``.

    The cotangent is made to depend on the outputs through a term that is zero in value
    but whose tangent is ``J v``, so that the jvp of the vjp carries ``A J v`` along:
    no separate Jacobian-vector product is needed.
    """

    def transposed_jacobian_product(p):
        outputs, pullback = jax.vjp(lambda q: apply(q, x), p)
        carrier = (outputs - jax.lax.stop_gradient(outputs))[..., None]
        return pullback(u + map_function(*operands, carrier)[..., 0])[0]

    def single(v):
        return jax.jvp(transposed_jacobian_product, (params,), (v,))[1]

    return _columns(single, tangents)


def _split_outputs(operands):
    """``(positions of OUTPUTS, the other operands)``: the positions are static."""
    where = tuple(i for i, o in enumerate(operands) if o is OUTPUTS)
    return where, tuple(o for o in operands if o is not OUTPUTS)


def _with_outputs(where, operands, outputs):
    """The operands with ``outputs`` put back at the positions ``where``."""
    full, rest = [], iter(operands)
    for i in range(len(where) + len(operands)):
        full.append(outputs if i in where else next(rest))
    return tuple(full)


def _second_order_from_outputs(apply, maps, params, x, tangents, u_operands, A_operands):
    """``sum u Hess(f) v + J^T A J v`` per column with ``u`` and ``A`` computed from the
    outputs inside the pass (see :func:`_second_order_traceable`)."""
    u_function, where_u, A_function, where_A = maps

    def transposed_jacobian_product(p):
        outputs, pullback = jax.vjp(lambda q: apply(q, x), p)
        fixed = jax.lax.stop_gradient(outputs)  # u and A are evaluated at the outputs
        u = u_function(*_with_outputs(where_u, u_operands, fixed))
        carrier = (outputs - fixed)[..., None]  # zero, with tangent J v
        w = A_function(*_with_outputs(where_A, A_operands, fixed), carrier)[..., 0]
        return pullback(u + w)[0]

    def single(v):
        return jax.jvp(transposed_jacobian_product, (params,), (v,))[1]

    return _columns(single, tangents)


@dataclass(frozen=True)
class _Functions:
    forward: object
    linearize: object
    pull: object
    push: object
    gauss_newton: object
    second_order: object
    second_order_traceable: object
    second_order_from_outputs: object
    taps: object


_EAGER = _Functions(
    _forward,
    _linearize,
    _pull,
    _push,
    _gauss_newton,
    _second_order,
    _second_order_traceable,
    _second_order_from_outputs,
    _taps,
)
_COMPILED = _Functions(
    forward=jax.jit(_forward, static_argnums=0),
    linearize=jax.jit(_linearize, static_argnums=0),
    pull=jax.jit(_pull),
    push=jax.jit(_push),
    gauss_newton=jax.jit(_gauss_newton, static_argnums=2),
    second_order=jax.jit(_second_order, static_argnums=0),
    second_order_traceable=jax.jit(_second_order_traceable, static_argnums=(0, 1)),
    second_order_from_outputs=jax.jit(_second_order_from_outputs, static_argnums=(0, 1)),
    taps=jax.jit(_taps, static_argnums=(0, 1, 2)),
)
