"""Hand-written derivative products as a curvlinops model.

:class:`CallableModel` turns a user's ``forward``, ``jvp`` and ``vjp`` functions (and
optionally a second-order product and layer taps) into a model that every curvature
operator accepts: the route for scientific codes with hand-derived adjoints.

May import: ``curvlinops._backend``, ``curvlinops.models``; ``curvlinops.verify`` lazily
(only when ``verify=True``).
"""

from __future__ import annotations

from .._backend import array_namespace
from ..models import Linearization, Model, Tier

__all__ = ["CallableModel"]


class CallableModel(Model):
    """A model from user functions: ``forward``, ``jvp``, ``vjp`` and optional extras.

    All functions receive the parameters as a list of arrays ``params`` and the input
    batch ``x`` first; outputs have shape ``(N, C)`` (or ``(N, S, C)``). With
    ``batched=True`` (default) the products take a trailing axis ``K`` of vectors:

    ====================================================  ===========================
    function                                              returns
    ====================================================  ===========================
    ``forward(params, x)``                                outputs ``(N, C)``
    ``jvp(params, x, tangents)``                          ``J V``: ``(N, C, K)``
    ``vjp(params, x, cotangents)``                        ``J^T U``: list like params
    ``second_order_vjp(params, x, u, tangents, w)``       list like params
    ``layer_taps(params, x, cotangents)``                 list of ``LayerTap``
    ====================================================  ===========================

    - ``tangents``: a list shaped like ``params``, each with a trailing ``K``
      (``params[i].shape + (K,)``); the vjp returns the same layout.
    - ``cotangents``: ``(N, C, K)``.
    - ``second_order_vjp`` returns ``sum_{n,c} u_nc Hess(f_nc) v_k + J^T w_k`` for each
      column ``k``: ``u`` is ``(N, C)`` (no ``K``), ``w`` is ``(N, C, K)`` or None (then
      leave out the ``J^T w`` term). The model computes ``w`` before calling it when
      an operator gives ``w`` as a function of ``J v`` (the Hessian does).
    - ``layer_taps`` returns, for cotangents ``(N, C, M)`` or None, one
      :class:`~curvlinops.models.LayerTap` per layer (see its documentation).

    With ``batched=False`` the functions ``jvp``, ``vjp`` and ``second_order_vjp`` take
    and return single vectors instead (the same shapes without ``K``; ``w`` is then
    ``(N, C)`` or None), and the model calls them once per column in a Python loop
    and stacks the results: simple to write, ``K`` times the calls. Prefer
    ``batched=True`` when the products are matrix products anyway (a trailing ``K``
    is often just one more axis in an ``einsum``). ``layer_taps`` always takes the
    batched cotangents.

    Every product's result is checked against these shapes (one array per parameter
    for ``vjp`` and ``second_order_vjp``): a wrong count or shape raises a ValueError
    naming the function, what it returned and what was expected.

    The model offers tier 1 always, tier 2 when ``second_order_vjp`` is given and
    tier 3 when ``layer_taps`` is given. Each product call re-runs the user's
    functions; nothing is cached between them.

    Parameters
    ----------
    forward, jvp, vjp : callable
        See above.
    second_order_vjp, layer_taps : callable, optional
        See above.
    param_shapes : list of tuple, optional
        Shapes the parameters must have (checked by the curvature operators).
    batched : bool
        Whether the products take the trailing axis ``K`` (see above).
    verify : bool
        Check the products at construction with
        :func:`curvlinops.verify.verify_model` at ``verify_params`` and ``verify_x``
        (finite differences and dot-product tests) and raise
        :class:`curvlinops.verify.VerificationError` naming the failing product.
    verify_params, verify_x : optional
        Where to verify (required with ``verify=True``).
    name : str, optional
        Name for error messages.

    Examples
    --------
    A linear model ``f = x @ W.T`` with its exact products:

    >>> import numpy as np
    >>> from curvlinops import GGNLinearOperator, MSELoss
    >>> from curvlinops.frontends import CallableModel
    >>> model = CallableModel(
    ...     forward=lambda p, x: x @ p[0].T,
    ...     jvp=lambda p, x, V: np.einsum("ni,oik->nok", x, V[0]),
    ...     vjp=lambda p, x, U: [np.einsum("nok,ni->oik", U, x)],
    ...     param_shapes=[(2, 3)],
    ... )
    >>> X, y = np.eye(3), np.zeros((3, 2))
    >>> G = GGNLinearOperator(model, MSELoss(reduction="sum"), [np.ones((2, 3))], [(X, y)])
    >>> bool(np.allclose(G.to_dense(), 2 * np.eye(6)))
    True
    """

    def __init__(
        self,
        forward,
        jvp,
        vjp,
        *,
        second_order_vjp=None,
        layer_taps=None,
        param_shapes=None,
        batched=True,
        verify=False,
        verify_params=None,
        verify_x=None,
        name=None,
    ):
        for label, fn in (("forward", forward), ("jvp", jvp), ("vjp", vjp)):
            if not callable(fn):
                raise TypeError(f"CallableModel needs a function {label}, got {fn!r}.")
        for label, fn in (("second_order_vjp", second_order_vjp), ("layer_taps", layer_taps)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{label} must be a function or None, got {fn!r}.")
        self.forward, self.jvp_fn, self.vjp_fn = forward, jvp, vjp
        self.second_order_vjp_fn, self.layer_taps_fn = second_order_vjp, layer_taps
        self.batched = bool(batched)
        self._param_shapes = None if param_shapes is None else [tuple(s) for s in param_shapes]
        self._name = name
        tiers = {Tier.FIRST_ORDER}
        if second_order_vjp is not None:
            tiers.add(Tier.SECOND_ORDER)
        if layer_taps is not None:
            tiers.add(Tier.LAYER_TAPS)
        self.tiers = frozenset(tiers)
        if verify:
            self._verify(verify_params, verify_x)

    @property
    def name(self) -> str:
        return self._name or "CallableModel"

    def expected_param_shapes(self):
        return None if self._param_shapes is None else list(self._param_shapes)

    def __call__(self, params, x):
        return self.forward(list(params), x)

    def linearize(self, params, x) -> Linearization:
        params = list(params)
        return _CallableLinearization(self, params, x, self.forward(params, x))

    def _verify(self, params, x):
        if params is None or x is None:
            raise ValueError(
                "CallableModel(verify=True) needs verify_params and verify_x: the point "
                "(parameters and an input batch) at which to check the products."
            )
        from ..verify import VerificationError, verify_model

        reports = verify_model(self, list(params), x)
        failed = [r.name for r in reports if not r.passed]
        if failed:
            lines = "\n".join(f"  {r}" for r in reports)
            raise VerificationError(
                f"{self.name}: the product(s) {', '.join(failed)} failed verification at "
                f"verify_params and verify_x; fix the function(s) you passed.\n{lines}"
            )


class _CallableLinearization(Linearization):
    """Calls the user's functions; loops over ``K`` only with ``batched=False``.

    What the functions return is checked against the shapes they must have (one array
    per parameter, shaped like it plus ``K``; ``J V`` shaped like the outputs plus
    ``K``), so a wrong count or shape is named here instead of failing later in a
    sum or silently broadcasting.
    """

    def _jvp(self, tangents):
        m = self.model
        if m.batched:
            out = m.jvp_fn(self.params, self.x, tangents)
        else:
            columns = _columns(tangents)
            out = self._stack(
                [m.jvp_fn(self.params, self.x, _column(tangents, k)) for k in columns]
            )
        expected = tuple(self.outputs.shape) + (tangents[0].shape[-1],)
        if tuple(getattr(out, "shape", ())) != expected:
            raise ValueError(
                f"{m.name}: jvp returned {_described(out)}; J V must have the outputs' "
                f"shape plus the K = {expected[-1]} tangents, {expected}."
            )
        return out

    def _vjp(self, cotangents):
        m = self.model
        if m.batched:
            grads = list(m.vjp_fn(self.params, self.x, cotangents))
        else:
            grads = self._stack_lists(
                [
                    m.vjp_fn(self.params, self.x, cotangents[..., k])
                    for k in range(cotangents.shape[-1])
                ]
            )
        return self._like_params(grads, cotangents.shape[-1], "vjp")

    def _second_order_vjp(self, cotangent, tangents, cotangent_tangent):
        m = self.model
        w = cotangent_tangent
        if callable(w):
            w = w(self._jvp(tangents))
        if m.batched:
            grads = list(m.second_order_vjp_fn(self.params, self.x, cotangent, tangents, w))
        else:
            grads = self._stack_lists(
                [
                    m.second_order_vjp_fn(
                        self.params,
                        self.x,
                        cotangent,
                        _column(tangents, k),
                        None if w is None else w[..., k],
                    )
                    for k in _columns(tangents)
                ]
            )
        return self._like_params(grads, tangents[0].shape[-1], "second_order_vjp")

    def _like_params(self, grads, K, what):
        """``grads`` if they are one array per parameter shaped like it plus ``K``."""
        name, shapes = self.model.name, [tuple(p.shape) for p in self.params]
        if len(grads) != len(shapes):
            raise ValueError(
                f"{name}: {what} returned {_counted(len(grads), 'array')} for "
                f"{_counted(len(shapes), 'parameter')}; return one per parameter, in the "
                "parameters' order."
            )
        for i, (g, shape) in enumerate(zip(grads, shapes, strict=True)):
            if tuple(getattr(g, "shape", ())) != shape + (K,):
                raise ValueError(
                    f"{name}: {what} returned {_described(g)} for parameter {i} of shape "
                    f"{shape}; with K = {K} vectors it must have shape {shape + (K,)}."
                )
        return grads

    def _layer_taps(self, cotangents):
        return list(self.model.layer_taps_fn(self.params, self.x, cotangents))

    def _stack(self, arrays):
        xp = array_namespace(*arrays)
        return xp.stack(arrays, axis=-1)

    def _stack_lists(self, lists):
        return [self._stack([lst[i] for lst in lists]) for i in range(len(lists[0]))]


def _counted(n, noun):
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _described(a):
    shape = getattr(a, "shape", None)
    return f"an array of shape {tuple(shape)}" if shape is not None else f"a {type(a).__name__}"


def _columns(tangents):
    return range(tangents[0].shape[-1])


def _column(tangents, k):
    return [t[..., k] for t in tangents]
