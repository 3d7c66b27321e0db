"""JAX frontend: a pure function ``f(params, x)`` as a curvlinops model.

:class:`JaxModel` offers tiers 1 and 2 of the model protocol:

- tier 1: :meth:`JaxModel.linearize` runs the forward pass once inside ``jax.vjp``,
  compiled with ``jax.jit``; the vector-Jacobian products apply the returned pullback
  and the Jacobian-vector products its linear transpose (``jax.linear_transpose``), so
  neither recomputes the forward pass. The ``K`` columns of a matmat go through
  ``jax.vmap`` in one fused, compiled call.
- tier 2: forward-over-reverse, the ``jax.jvp`` of the ``jax.vjp``, compiled. When
  ``w`` comes as a :class:`~curvlinops.models.TraceableLinearMap` (as the Hessian
  operator passes the loss Hessian), ``w = A(J v)`` is computed inside the same
  compiled pass, with no separate Jacobian-vector product.

Tier 3 (layer taps) is not offered: a JAX function has no layers to hook into. Operators
that need it raise :class:`~curvlinops.models.MissingTierError`.

Importing this module imports JAX. May import: jax, ``curvlinops._backend``,
``curvlinops.models``.
"""

from __future__ import annotations

from dataclasses import dataclass

try:
    import jax
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "curvlinops.frontends.jax needs JAX: pip install jax (or curvlinops[jax]).",
        name="jax",
    ) from error

from ..models import Linearization, Model, Tier, TraceableLinearMap, param_shapes

__all__ = ["JaxModel"]


class JaxModel(Model):
    """A pure JAX function ``f(params, x) -> outputs`` as a curvlinops model (tiers 1, 2).

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
    """

    #: tiers 1 and 2 (a JAX function has no layers to tap)
    tiers = frozenset({Tier.FIRST_ORDER, Tier.SECOND_ORDER})

    def __init__(self, fn, params=None, *, jit=True):
        if not callable(fn):
            raise TypeError(f"JaxModel expects a function f(params, x), got {type(fn).__name__}.")
        self.fn = fn
        self.treedef = None
        self._params = None
        if params is not None:
            leaves, self.treedef = jax.tree_util.tree_flatten(params)
            self._params = list(leaves)
        self.jit = bool(jit)
        # Hashable, so that the compiled functions (static in it) are shared by every
        # JaxModel of the same function and parameter structure.
        self._apply = _Apply(fn, self.treedef)
        self._compiled = _COMPILED if self.jit else _EAGER

    @property
    def name(self) -> str:
        return f"JaxModel({getattr(self.fn, '__name__', type(self.fn).__name__)})"

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

    def __call__(self, params, x):
        self._check_inputs(params, x)
        return self._compiled.forward(self._apply, list(params), x)

    def linearize(self, params, x) -> Linearization:
        self._check_inputs(params, x)
        params = list(params)
        outputs, pullback = self._compiled.linearize(self._apply, params, x)
        return _JaxLinearization(self, params, x, outputs, pullback)

    # -- internals --------------------------------------------------------------------

    def _check_inputs(self, params, x):
        arrays = [*params, x]
        if not all(isinstance(a, jax.Array) for a in arrays):
            found = sorted({type(a).__module__ + "." + type(a).__name__ for a in arrays})
            raise TypeError(
                f"{self.name} expects JAX arrays for the parameters and the data, found "
                f"{found}. Convert them with jax.numpy.asarray."
            )


class _JaxLinearization(Linearization):
    """Outputs of one compiled forward pass and the pullback that reuses it."""

    def __init__(self, model, params, x, outputs, pullback):
        super().__init__(model, params, x, outputs)
        self._pullback = pullback

    def _jvp(self, tangents):
        return self.model._compiled.push(self._pullback, self.outputs, list(tangents))

    def _vjp(self, cotangents):
        return self.model._compiled.pull(self._pullback, cotangents)

    def _second_order_vjp(self, cotangent, tangents, cotangent_tangent):
        model = self.model
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


@dataclass(frozen=True)
class _Apply:
    """``fn`` applied to a parameter list; equal for equal ``fn`` and structure."""

    fn: object
    treedef: object

    def __call__(self, params, x):
        if self.treedef is not None:
            params = jax.tree_util.tree_unflatten(self.treedef, list(params))
        return self.fn(params, x)


def _forward(apply, params, x):
    return apply(params, x)


def _linearize(apply, params, x):
    """Outputs and the pullback (a pytree holding the forward pass's residuals)."""
    return jax.vjp(lambda p: apply(p, x), params)


def _pull(pullback, cotangents):
    """``J^T U`` for cotangents with a trailing axis ``K`` (one vmapped pullback)."""
    return jax.vmap(lambda u: pullback(u)[0], in_axes=-1, out_axes=-1)(cotangents)


def _push(pullback, outputs, tangents):
    """``J V``: the transpose of the (linear) pullback, applied to each of the ``K`` columns."""
    push = jax.linear_transpose(pullback, jax.ShapeDtypeStruct(outputs.shape, outputs.dtype))
    return jax.vmap(lambda v: push((v,))[0], in_axes=-1, out_axes=-1)(tangents)


def _second_order(apply, params, x, u, tangents, w):
    """``sum u Hess(f) v + J^T w`` per column: the jvp of the vjp (forward over reverse)."""

    def transposed_jacobian_product(p, c):
        return jax.vjp(lambda q: apply(q, x), p)[1](c)[0]

    if w is None:

        def single(v):
            return jax.jvp(lambda p: transposed_jacobian_product(p, u), (params,), (v,))[1]

        return jax.vmap(single, in_axes=-1, out_axes=-1)(tangents)

    def single_with_w(v, w_k):
        return jax.jvp(transposed_jacobian_product, (params, u), (v, w_k))[1]

    return jax.vmap(single_with_w, in_axes=-1, out_axes=-1)(tangents, w)


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

    return jax.vmap(single, in_axes=-1, out_axes=-1)(tangents)


@dataclass(frozen=True)
class _Functions:
    forward: object
    linearize: object
    pull: object
    push: object
    second_order: object
    second_order_traceable: object


_EAGER = _Functions(_forward, _linearize, _pull, _push, _second_order, _second_order_traceable)
_COMPILED = _Functions(
    forward=jax.jit(_forward, static_argnums=0),
    linearize=jax.jit(_linearize, static_argnums=0),
    pull=jax.jit(_pull),
    push=jax.jit(_push),
    second_order=jax.jit(_second_order, static_argnums=0),
    second_order_traceable=jax.jit(_second_order_traceable, static_argnums=(0, 1)),
)
