"""The model protocol: the few products the curvature layer asks of "autodiff".

A model is a function ``f(params, x) -> outputs`` with outputs ``(N, C)`` (or
``(N, S, C)`` for models with a shared axis such as sequences) and ``params`` a list of
arrays. A model offers up to three tiers (see docs/frontends.rst):

- Tier 1 (:attr:`Tier.FIRST_ORDER`): :meth:`Model.linearize` runs the forward pass
  once and returns a :class:`Linearization` with ``jvp`` and ``vjp``. Both take a
  trailing batch axis ``K`` of vectors and process it in one fused pass.
- Tier 2 (:attr:`Tier.SECOND_ORDER`): :meth:`Linearization.second_order_vjp`, the
  directional derivative of ``theta -> J(theta)^T u`` along a tangent ``v``, plus
  ``J^T w``: ``sum_n,c u_nc Hess_theta(f_nc) v + J^T w``.
- Tier 3 (:attr:`Tier.LAYER_TAPS`): :meth:`Linearization.layer_taps`, for each
  supported layer its inputs and the gradients of its outputs that a batch of output
  cotangents produces (K-FAC, exact diagonals, per-layer blocks).
- The layer protocol (:attr:`Capability.LAYER_PROTOCOL`, a capability of its own):
  :meth:`Linearization.layers`, the model's layers in forward order, each a
  :class:`~curvlinops.LinearizedLayer` that says how gradients and curvature
  factors move backwards through it (Hessian diagonal, Kronecker-factored Hessian;
  see :mod:`curvlinops.models.layers`). Models that are a chain of known layers
  (``curvlinops.nn``, the PyTorch frontend) offer it; a JAX function or hand-written
  callables do not.

Implementations subclass :class:`Model` and :class:`Linearization` and implement the
underscore methods on batched (trailing-``K``) arrays; the public methods add and
remove the ``K`` axis, so every implementation has one code path.

May import: ``curvlinops._backend``, ``.params``. (:mod:`.layers` imports this module.)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .params import check_params, param_shapes

__all__ = [
    "Tier",
    "Capability",
    "Model",
    "Linearization",
    "LayerTap",
    "MissingTierError",
    "TraceableLinearMap",
]


class Tier(enum.IntEnum):
    """The three tiers of derivative information a model can offer."""

    FIRST_ORDER = 1
    SECOND_ORDER = 2
    LAYER_TAPS = 3


class Capability(enum.IntEnum):
    """What a model can offer beyond the three tiers; listed in ``Model.tiers`` too.

    ``LAYER_PROTOCOL`` (4): the model's layers with their backward rules,
    :meth:`Linearization.layers` (the Hessian diagonal and the Kronecker-factored
    Hessian need it). It is not a member of :class:`Tier`, so ``frozenset(Tier)`` keeps
    meaning "tiers 1 to 3", and it is not implied by them: a model with hand-written
    layer taps need not know its layers' rules.

    Examples
    --------
    >>> int(Capability.LAYER_PROTOCOL), Capability.LAYER_PROTOCOL in frozenset(Tier)
    (4, False)
    """

    LAYER_PROTOCOL = 4


def as_requirement(value):
    """A :class:`Tier` or :class:`Capability` from itself or its number.

    Examples
    --------
    >>> as_requirement(2), as_requirement(4)
    (<Tier.SECOND_ORDER: 2>, <Capability.LAYER_PROTOCOL: 4>)
    """
    if isinstance(value, (Tier, Capability)):
        return value
    return Capability(value) if int(value) in Capability._value2member_map_ else Tier(value)


def _describe(requirement) -> str:
    if isinstance(requirement, Capability):
        return "the layer protocol"
    return f"tier {int(requirement)} ({requirement.name.lower().replace('_', ' ')}) derivatives"


_TIER_HINTS = {
    4: " The layer protocol (Linearization.layers()) is offered by models that are a chain "
    "of known layers: curvlinops.nn models and curvlinops.frontends.torch.TorchModel.",
}


#: the kinds of :class:`LayerTap`
TAP_KINDS = ("matrix", "elementwise", "embedding")


class MissingTierError(NotImplementedError):
    """A model lacks the tier of derivatives an operator needs."""


@dataclass(frozen=True)
class LayerTap:
    """What one layer exposes for Kronecker-factored and per-layer curvature.

    Attributes
    ----------
    name : str
        Layer name (e.g. ``"2"`` or ``"2.Linear"``), for messages and partitions.
    weight_index : int
        Position of the layer's weight ``(D_out, D_in)`` in the parameter list.
    bias_index : int or None
        Position of its bias ``(D_out,)``, or None.
    inputs : array
        Layer inputs ``(N, D_in)``, or ``(N, S, D_in)`` with a shared axis ``S``.
    output_grads : array or None
        Gradients of ``sum_{n,c} u_{n,c,m} f_{n,c}`` with respect to the layer's
        outputs, for each of the ``M`` cotangents: ``(N, D_out, M)`` or
        ``(N, S, D_out, M)``. None when the tap was taken without cotangents.
    matrix_shape : tuple of int or None
        ``(D_out, D_in)``: the weight, reshaped in C order, as the matrix that
        multiplies the inputs' last axis (for a ``Linear`` layer its own shape; for a
        convolution ``(C_out, C_in * kh * kw)``). The bias, if any, has ``D_out``
        entries and joins the matrix as a last column ``[W | b]``. None when the model
        does not say (taps written by hand): then the weight itself is
        ``(D_out, D_in)``. Ignored for ``kind="elementwise"``. With ``groups = G > 1``
        it is ``(D_out, D_in / G)``: the rows of all groups stacked (see ``groups``).
    kind : {"matrix", "elementwise"}
        How the weight acts on the inputs. ``"matrix"`` (the default): ``s = W a + b``
        over the last axis, the case of Kronecker factors. ``"elementwise"``: ``s = w *
        a + b`` with a weight and bias of ``D`` entries each and ``D_in = D_out = D``
        (the affine part of batch or layer normalization, with ``a`` the normalized
        inputs); the curvature operators give such parameters their exact block (the
        per-datum gradients ``sum_s g_s * a_s`` and ``sum_s g_s`` are formed
        explicitly, and the block is their sum of outer products). ``"embedding"``:
        ``s = table[ids]`` with the weight the table ``(V, D)``: ``inputs`` are the
        integer ids ``(N, S...)`` (the one-hot inputs are never formed for K-FAC, whose
        input factor is then diagonal), ``matrix_shape`` is ``(D, V)`` and the weight
        is transposed by definition.
    channels_first : bool
        Whether the layer's own outputs are channels-first, ``(N, D_out, S...)`` (a
        convolution's), rather than ``(N, S..., D_out)``. It says how a datum's output
        entries are ordered in the per-datum curvature of the layer-protocol walks
        (the Hessian diagonal); ``inputs`` and ``output_grads`` are in the layout
        above either way.
    transposed : bool
        Whether the weight parameter holds the *transposed* matrix, ``(D_in, D_out)``
        in C order, so that ``s = a W + b`` (Flax's ``Dense`` and ``Conv`` kernels, whose
        inputs ``D_in`` are then ordered as the kernel's leading axes). ``matrix_shape``
        stays ``(D_out, D_in)``; the curvature operators swap the Kronecker factors of
        such a weight (``A (x) B`` instead of ``B (x) A``) and lay out its bias as a last
        row.
    groups : int
        ``G``: the weight is block diagonal over ``G`` groups (a grouped convolution,
        ``G = C_in`` for a depthwise one). The inputs' last axis ``D_in`` and the
        outputs' ``D_out`` split into ``G`` contiguous groups of ``D_in / G`` and
        ``D_out / G`` entries, and group ``g``'s outputs are its weight rows
        ``g D_out / G ... (g + 1) D_out / G - 1`` of the ``(D_out, D_in / G)`` matrix
        times group ``g``'s inputs, plus its bias entries. With ``transposed`` the weight
        holds that matrix transposed, ``(D_in / G, D_out)`` (a Flax grouped ``Conv``
        kernel ``(*kernel, C_in / G, C_out)``), and group ``g``'s entries are its columns
        ``g D_out / G ... (g + 1) D_out / G - 1``. Kind ``"matrix"`` only; the curvature
        operators treat each group as a layer of its own (K-FAC: one Kronecker block per
        group). Default 1.

    Examples
    --------
    >>> import numpy as np
    >>> tap = LayerTap("0", 0, 1, np.ones((5, 3)), matrix_shape=(2, 3))
    >>> tap.matrix_shape, tap.output_grads is None
    ((2, 3), True)
    """

    name: str
    weight_index: int
    bias_index: int | None
    inputs: object
    output_grads: object = None
    matrix_shape: tuple | None = None
    kind: str = "matrix"
    channels_first: bool = False
    transposed: bool = False
    groups: int = 1

    def __post_init__(self):
        if self.kind not in TAP_KINDS:
            raise ValueError(f"LayerTap kind must be one of {TAP_KINDS}, got {self.kind!r}.")
        groups = self.groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"LayerTap groups must be a positive integer, got {groups!r}.")
        if groups > 1 and self.kind != "matrix":
            raise ValueError(
                f"LayerTap {self.name!r} has groups={groups}: groups are for matrix taps "
                f"(kind='matrix'), got kind={self.kind!r}."
            )


class _OutputsPlaceholder:
    """The type of :data:`OUTPUTS`."""

    def __repr__(self) -> str:
        return "OUTPUTS"

    def __reduce__(self):  # one instance, also after pickling
        return "OUTPUTS"


#: In the operands of an :class:`OutputsFunction` or a :class:`TraceableLinearMap`
#: given to :meth:`Linearization.second_order_vjp`: the model's outputs at the
#: linearization point. A frontend that recomputes the outputs inside its compiled
#: second-order pass (JAX) then needs no separate forward pass; the others substitute
#: ``Linearization.outputs``.
OUTPUTS = _OutputsPlaceholder()


def _resolved(operands, outputs):
    return tuple(outputs if o is OUTPUTS else o for o in operands)


class OutputsFunction:
    """An array computed from the model's outputs with array-API calls: ``function(*operands)``.

    The cotangent ``u`` of :meth:`Linearization.second_order_vjp` may be given this
    way (e.g. a loss gradient), with :data:`OUTPUTS` among ``operands`` standing for
    the outputs, so that a frontend may compute it inside its own transforms (JAX:
    ``function`` is a static argument of ``jit``; pass the same function object every
    time).

    Parameters
    ----------
    function : callable
        ``function(*operands)`` returns an array of the outputs' shape.
    operands : tuple
        Arrays, scalars and :data:`OUTPUTS`.

    Examples
    --------
    >>> import numpy as np
    >>> u = OutputsFunction(lambda c, f: c * f, operands=(2.0, OUTPUTS))
    >>> u.evaluate(np.ones((1, 2))).tolist()
    [[2.0, 2.0]]
    """

    def __init__(self, function, *, operands=()):
        if not callable(function):
            raise TypeError(f"OutputsFunction needs a callable, got {type(function).__name__}.")
        self.function = function
        self.operands = tuple(operands)

    def evaluate(self, outputs):
        """``function(*operands)`` with :data:`OUTPUTS` replaced by ``outputs``."""
        return self.function(*_resolved(self.operands, outputs))


class TraceableLinearMap:
    """A linear map ``w = A(J v)`` of output-space vectors, written with array-API calls.

    Pass one as the ``cotangent_tangent`` of :meth:`Linearization.second_order_vjp`
    to promise that the function is linear and uses only array-API operations on its
    argument (no conversion to NumPy, no Python branching on values), so that an
    autodiff frontend may evaluate it inside its own transforms. The PyTorch frontend
    then computes a Hessian product in one pass (double backward when ``symmetric``,
    forward-over-reverse otherwise) instead of a Jacobian-vector product followed by
    a second-order one. Any other callable is treated as a black box. The Hessian
    operator wraps the loss Hessian this way.

    Parameters
    ----------
    function : callable
        ``function(*operands, v)`` maps an array ``v`` of shape ``outputs.shape + (K,)``
        to one of the same shape, linearly in ``v``.
    operands : tuple
        Arrays (and scalars) the map depends on, e.g. the outputs and targets of a
        loss Hessian. The JAX frontend compiles the map with ``jax.jit``, ``function``
        being a static argument: pass the same function object every time (a bound
        method or a module-level function, not a new lambda per call, which would be
        compiled anew at every product) and its data through ``operands``.
    symmetric : bool
        Whether the map is symmetric (self-adjoint), as a loss Hessian is. Then the
        whole second-order product is a symmetric matrix applied to ``v``, and a
        frontend may compute it by reverse-over-reverse differentiation, which is
        faster than forward-over-reverse in PyTorch on the CPU.

    Examples
    --------
    >>> import numpy as np
    >>> def scale_rows(d, v):
    ...     return d[:, :, None] * v
    >>> A = TraceableLinearMap(scale_rows, operands=(np.array([[1.0, 3.0]]),), symmetric=True)
    >>> A(np.ones((1, 2, 1))).tolist()
    [[[1.0], [3.0]]]
    """

    def __init__(self, function, *, operands=(), symmetric: bool = False):
        if not callable(function):
            raise TypeError(f"TraceableLinearMap needs a callable, got {type(function).__name__}.")
        self.function = function
        self.operands = tuple(operands)
        self.symmetric = bool(symmetric)

    def __call__(self, v):
        return self.function(*self.operands, v)

    def with_outputs(self, outputs):
        """This map with :data:`OUTPUTS` among its operands replaced by ``outputs``."""
        if not any(o is OUTPUTS for o in self.operands):
            return self
        return TraceableLinearMap(
            self.function, operands=_resolved(self.operands, outputs), symmetric=self.symmetric
        )

    def __repr__(self) -> str:
        return (
            f"TraceableLinearMap({self.function!r}, operands=<{len(self.operands)}>, "
            f"symmetric={self.symmetric})"
        )


class Linearization:
    """A model linearized at ``(params, x)``: its outputs and derivative products.

    Obtained from :meth:`Model.linearize`; keeps what the forward pass computed so
    that every product reuses it.

    Attributes
    ----------
    outputs : array
        The model's outputs ``(N, C)`` (or ``(N, S, C)``).
    """

    #: whether ``_second_order_vjp`` takes :data:`OUTPUTS` placeholders itself (JAX)
    _traces_outputs = False

    def __init__(self, model: Model, params, x, outputs):
        self.model = model
        self.params = params
        self.x = x
        self.outputs = outputs
        self.shapes = param_shapes(params)

    # -- public methods: add/remove the trailing K axis, then call the batched code --

    def jvp(self, tangents):
        """``J v``: tangents shaped like the parameters (plus trailing ``K``) to outputs.

        Returns ``outputs.shape`` or ``outputs.shape + (K,)``.
        """
        tangents, squeeze = self._batch_tangents(tangents)
        out = self._jvp(tangents)
        return out[..., 0] if squeeze else out

    def vjp(self, cotangents):
        """``J^T u``: cotangents ``outputs.shape (+ (K,))`` to a list like the parameters."""
        cotangents, squeeze = self._batch_cotangents(cotangents)
        grads = self._vjp(cotangents)
        return [g[..., 0] for g in grads] if squeeze else grads

    def gauss_newton_vjp(self, tangents, cotangent_map):
        """``J^T A(J v)``: a Gauss-Newton product through a linear map ``A`` of the outputs.

        Parameters
        ----------
        tangents : list of arrays
            ``v`` shaped like the parameters (plus trailing ``K``).
        cotangent_map : callable
            A *linear* function from ``J v`` (``outputs.shape + (K,)``) to cotangents of
            the same shape (e.g. a loss Hessian). Wrapped in :class:`TraceableLinearMap`
            a frontend may run the three steps in one compiled call (JAX); otherwise,
            and by default, it is ``vjp(cotangent_map(jvp(v)))``.

        Returns
        -------
        list of arrays
            Shaped like the parameters (plus trailing ``K``).

        Examples
        --------
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import nn
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> lin = model.linearize(params, np.ones((4, 3)))
        >>> v = [np.ones_like(p) for p in params]
        >>> double = TraceableLinearMap(lambda c, u: c * u, operands=(2.0,))
        >>> all(np.allclose(a, 2 * b) for a, b in
        ...     zip(lin.gauss_newton_vjp(v, double), lin.vjp(lin.jvp(v)), strict=True))
        True
        """
        tangents, squeeze = self._batch_tangents(tangents)
        out = self._gauss_newton_vjp(tangents, cotangent_map)
        return [g[..., 0] for g in out] if squeeze else out

    def second_order_vjp(self, cotangent, tangents, cotangent_tangent=None):
        """``sum_nc u_nc Hess(f_nc) v + J^T w``: the derivative of ``J^T u`` along ``v``.

        Parameters
        ----------
        cotangent : array or OutputsFunction
            ``u`` of the outputs' shape (no ``K`` axis), e.g. the loss gradient; an
            :class:`OutputsFunction` of the outputs lets a frontend compute it inside
            its compiled pass (and :data:`OUTPUTS` may then stand for the outputs in
            the operands of a :class:`TraceableLinearMap` ``cotangent_tangent``).
        tangents : list of arrays
            ``v`` shaped like the parameters (plus trailing ``K``).
        cotangent_tangent : None, array or callable
            ``w`` of shape ``outputs.shape + (K,)``, or a *linear* function that
            receives ``J v`` (``outputs.shape + (K,)``) and returns ``w``: this lets a
            Hessian product ``J^T H_L J v + sum u Hess(f) v`` run in one
            forward-tangent and one backward pass. Wrap it in
            :class:`TraceableLinearMap` when it is written with array-API calls only.
        """
        self.model.require(Tier.SECOND_ORDER, "second_order_vjp (Hessian products)")
        if not self._traces_outputs:  # OUTPUTS stands for the outputs computed here
            if isinstance(cotangent, OutputsFunction):
                cotangent = cotangent.evaluate(self.outputs)
            if isinstance(cotangent_tangent, TraceableLinearMap):
                cotangent_tangent = cotangent_tangent.with_outputs(self.outputs)
        tangents, squeeze = self._batch_tangents(tangents)
        if cotangent_tangent is not None and not callable(cotangent_tangent):
            w = cotangent_tangent
            if squeeze:
                w = w[..., None]
            cotangent_tangent = w
        out = self._second_order_vjp(cotangent, tangents, cotangent_tangent)
        return [g[..., 0] for g in out] if squeeze else out

    def layer_taps(self, cotangents=None):
        """Per-layer inputs and output gradients for cotangents ``outputs.shape + (M,)``."""
        self.model.require(Tier.LAYER_TAPS, "layer_taps (Kronecker-factored curvature)")
        if cotangents is not None and cotangents.ndim == len(self.outputs.shape):
            cotangents = cotangents[..., None]
        return self._layer_taps(cotangents)

    def layers(self):
        """The model's layers in forward order, each a :class:`~curvlinops.LinearizedLayer`.

        The layer protocol (:attr:`Capability.LAYER_PROTOCOL`): what the Hessian diagonal and
        the Kronecker-factored Hessian walk backwards. See :mod:`curvlinops.models.layers`.

        Raises
        ------
        MissingTierError
            If the model does not offer the layer protocol.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> lin = model.linearize(model.init(0, xp=xp), xp.ones((5, 3)))
        >>> [(layer.name, layer.tap() is not None) for layer in lin.layers()]
        [('0', True), ('1', False), ('2', True)]
        """
        self.model.require(Capability.LAYER_PROTOCOL, "layers() (backpropagated curvature)")
        return self._layers()

    # -- what implementations provide (all arrays carry the trailing K axis) ---------

    def _jvp(self, tangents):
        raise NotImplementedError

    def _vjp(self, cotangents):
        raise NotImplementedError

    def _second_order_vjp(self, cotangent, tangents, cotangent_tangent):
        raise NotImplementedError

    def _gauss_newton_vjp(self, tangents, cotangent_map):
        return self._vjp(cotangent_map(self._jvp(tangents)))

    def _layer_taps(self, cotangents):
        raise NotImplementedError

    def _layers(self):
        raise NotImplementedError

    # -- shape handling ---------------------------------------------------------------

    def _batch_tangents(self, tangents):
        if len(tangents) != len(self.shapes):
            raise ValueError(
                f"{self.model.name} has {len(self.shapes)} parameter arrays, got "
                f"{len(tangents)} tangents."
            )
        plain = [tuple(t.shape) for t in tangents] == self.shapes
        if plain:
            return [t[..., None] for t in tangents], True
        ks = {t.shape[-1] for t in tangents}
        if len(ks) != 1 or [tuple(t.shape[:-1]) for t in tangents] != self.shapes:
            raise ValueError(
                f"Tangents must have the parameter shapes {self.shapes}, optionally with one "
                f"common trailing axis K; got {[tuple(t.shape) for t in tangents]}."
            )
        return list(tangents), False

    def _batch_cotangents(self, cotangents):
        out_shape = tuple(self.outputs.shape)
        if tuple(cotangents.shape) == out_shape:
            return cotangents[..., None], True
        if tuple(cotangents.shape[:-1]) != out_shape:
            raise ValueError(
                f"Cotangents must have the output shape {out_shape} (optionally with a "
                f"trailing axis K), got {tuple(cotangents.shape)}."
            )
        return cotangents, False


class Model:
    """Base class of models that speak the protocol.

    Subclasses set :attr:`tiers` and implement :meth:`__call__`, :meth:`linearize`
    and :meth:`expected_param_shapes` (or override :meth:`check_params`).

    Attributes
    ----------
    tiers : frozenset of Tier and Capability
        The tiers (and capabilities, e.g. :attr:`Capability.LAYER_PROTOCOL`) this model
        offers.
    """

    #: the tiers and capabilities the model offers (see :meth:`has_tier`)
    tiers: frozenset = frozenset({Tier.FIRST_ORDER})

    @property
    def name(self) -> str:
        """Name of the model in error messages (default: its class name)."""
        return type(self).__name__

    def __call__(self, params, x):
        """The outputs ``f(params, x)``."""
        raise NotImplementedError

    def linearize(self, params, x) -> Linearization:
        """Run the forward pass once; return outputs and derivative products."""
        raise NotImplementedError

    def check_params(self, params) -> None:
        """Raise a clear error if ``params`` do not fit the model."""
        expected = self.expected_param_shapes()
        if expected is not None:
            check_params(params, expected, self.name)

    def expected_param_shapes(self):
        """Shapes the parameters must have, or None if the model does not know them."""
        return None

    def has_tier(self, tier) -> bool:
        """Whether the model offers ``tier``.

        ``tier`` is a :class:`~curvlinops.Tier` or a :class:`~curvlinops.Capability`.
        """
        return as_requirement(tier) in self.tiers

    def require(self, tier, purpose: str) -> None:
        """Raise :class:`~curvlinops.MissingTierError` naming the tier, model and purpose."""
        if not self.has_tier(tier):
            tier = as_requirement(tier)
            raise MissingTierError(
                f"{purpose} needs {_describe(tier)}, which the model {self.name} does not "
                f"offer (it offers tiers {sorted(int(t) for t in self.tiers)})."
                f"{_TIER_HINTS.get(int(tier), '')}"
            )
