"""The optimizers of :mod:`curvlinops.optim` as an optax-style ``init``/``update`` pair.

:func:`as_gradient_transformation` turns :class:`~curvlinops.optim.KFAC`,
:class:`~curvlinops.optim.HessianFree`, :class:`~curvlinops.optim.NaturalGradient`,
:class:`~curvlinops.optim.VOGN` or :class:`~curvlinops.optim.NoisyKFAC` (built on a
:class:`~curvlinops.frontends.jax.JaxModel`) into a
:class:`GradientTransformation`: ``init(params) -> state`` and
``update(updates, state, params, batch=...) -> (updates, state)`` on parameter pytrees,
the updates to add with ``optax.apply_updates``. The method computes its own gradient
on the batch (the incoming ``updates`` are ignored), and the state holds curvature
operators, so ``update`` is not traced by ``jax.jit``. :func:`variational_posterior`
hands out the posterior of the variational ones. Needs no optax installed.

May import: ``jax``, ``.kfac``, ``._variational``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = [
    "GradientTransformation",
    "OptaxState",
    "as_gradient_transformation",
    "variational_posterior",
]


class GradientTransformation(NamedTuple):
    """optax's pair of functions: ``init(params)`` and ``update(updates, state, params, ...)``."""

    init: Any
    update: Any


class OptaxState(NamedTuple):
    """The state of :func:`as_gradient_transformation`'s pair: the method's state (None
    before the first update)."""

    method_state: Any = None


def as_gradient_transformation(method):
    """An optax-style pair for a functional optimizer over a JaxModel.

    Parameters
    ----------
    method : KFAC, HessianFree, NaturalGradient, VOGN or NoisyKFAC
        Built on a :class:`~curvlinops.frontends.jax.JaxModel` (its ``flatten`` and
        ``unflatten`` map pytrees to the lists the method steps on).

    Returns
    -------
    GradientTransformation
        ``update(updates, state, params, *, batch)``: ``batch`` is the ``(X, y)`` of this
        step; the returned updates are ``new params - params`` as a pytree.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from curvlinops import MSELoss
    >>> from curvlinops.frontends.jax import JaxModel
    >>> from curvlinops.optim import HessianFree
    >>> from curvlinops.optim.optax import as_gradient_transformation
    >>> params = {"w": jnp.zeros((1, 2))}
    >>> model = JaxModel(lambda p, x: x @ p["w"].T, params)
    >>> X = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> y = X @ jnp.array([[2.0], [-1.0]])
    >>> tx = as_gradient_transformation(HessianFree(model, MSELoss(), damping=1e-6))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(None, state, params, batch=(X, y))
    >>> params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    >>> [round(float(v), 3) for v in params["w"].ravel()]
    [2.0, -1.0]
    """
    model = method.model

    def init(params):
        return OptaxState()

    def update(updates, state, params, *, batch):
        values = model.flatten(params)
        method_state = state.method_state
        if method_state is None:
            method_state = _first_state(method, values, batch)
        new, method_state = method.step(values, method_state, batch)
        deltas = [n - v for n, v in zip(new, values, strict=True)]
        return model.unflatten(deltas), OptaxState(method_state)

    return GradientTransformation(init, update)


def variational_posterior(method, state, params):
    """The posterior of a :class:`~curvlinops.optim.VOGN` or
    :class:`~curvlinops.optim.NoisyKFAC` pair's state, with mean ``params`` (a pytree).

    Parameters
    ----------
    method : VOGN or NoisyKFAC
        The method the pair was made of (on a JaxModel).
    state : OptaxState
        The pair's state after an update.
    params : pytree
        The parameters after that update (the mean).

    Returns
    -------
    VariationalPosterior
        Its mean is the list of ``params``' leaves (the model's ``flatten`` order).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from curvlinops import MSELoss
    >>> from curvlinops.frontends.jax import JaxModel, dense
    >>> from curvlinops.optim import VOGN
    >>> from curvlinops.optim.optax import as_gradient_transformation, variational_posterior
    >>> params = {"w": jnp.zeros((1, 2))}
    >>> model = JaxModel(lambda p, x: dense(x, p["w"]), params, layer_taps=True)
    >>> method = VOGN(model, MSELoss(), num_data=2, weight_samples=0)
    >>> tx = as_gradient_transformation(method)
    >>> state = tx.init(params)
    >>> X, y = jnp.eye(2), jnp.ones((2, 1))
    >>> updates, state = tx.update(None, state, params, batch=(X, y))
    >>> params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    >>> q = variational_posterior(method, state, params)
    >>> [round(float(v), 12) for v in q.precision.diagonal()]  # 2 x^2 + prior precision 1
    [3.0, 3.0]
    """
    from ._variational import BayesianLearningRule

    if not isinstance(method, BayesianLearningRule):
        raise TypeError(f"{type(method).__name__} has no posterior; use VOGN or NoisyKFAC.")
    if state.method_state is None:
        raise ValueError("The posterior exists after the first update; call update first.")
    return method.posterior(method.model.flatten(params), state.method_state)


def _first_state(method, values, batch):
    from ._variational import BayesianLearningRule
    from .kfac import KFAC

    if isinstance(method, (KFAC, BayesianLearningRule)):
        return method.init(values, batch)
    return method.init(values)
