"""Models from other libraries as protocol models: :func:`as_model` and its registry.

The curvature operators take a :class:`~curvlinops.models.Model`. So that they can
also take a model of another library directly (a ``torch.nn.Module`` with its
parameters, as curvlinops-for-pytorch does), they pass what they get through
:func:`as_model`: a protocol model comes back unchanged; anything else is offered to
the adapters registered with :func:`register_model_adapter`, in registration order.
The frontends (``curvlinops.frontends``) register their adapters when imported, and
``import curvlinops`` imports them; this module knows none of them, so the curvature
layer depends on the model layer only.

May import: ``.protocol``.
"""

from __future__ import annotations

from collections.abc import Callable

from .protocol import Model

__all__ = ["as_model", "register_model_adapter"]

#: name -> (adapter, what it accepts), in registration order
_ADAPTERS: dict[str, tuple[Callable, str]] = {}


def register_model_adapter(name: str, adapter: Callable, *, accepts: str) -> None:
    """Let :func:`as_model` (hence every curvature operator) accept more kinds of model.

    Parameters
    ----------
    name : str
        Key of the adapter; registering the same name again replaces it.
    adapter : callable
        ``adapter(model, params)`` returns ``(protocol_model, params_list)`` for the
        objects it handles and None for all others (then the next adapter is asked).
        It may raise a clear error for an object it recognizes but cannot adapt.
        It must be cheap for foreign objects: it must not import a library just to
        find out that the object is not one of its kind.
    accepts : str
        What the adapter accepts, for the message of the TypeError that
        :func:`as_model` raises when no adapter takes an object
        (e.g. ``"a torch.nn.Module (wrapped as TorchModel)"``).

    Examples
    --------
    A user's own description of an MLP, adapted to a ``curvlinops.nn`` model:

    >>> import numpy as np
    >>> from curvlinops import nn
    >>> class Widths:
    ...     def __init__(self, *widths):
    ...         self.widths = widths
    >>> def adapt_widths(model, params):
    ...     if not isinstance(model, Widths):
    ...         return None  # not ours: ask the next adapter
    ...     pairs = zip(model.widths, model.widths[1:])
    ...     return nn.Sequential(*[nn.Linear(a, b) for a, b in pairs]), list(params)
    >>> register_model_adapter("widths", adapt_widths, accepts="a Widths")
    >>> model, params = as_model(Widths(2, 1), [np.ones((1, 2)), np.zeros(1)])
    >>> model
    Sequential(Linear(2, 1, bias=True))
    """
    if not callable(adapter):
        raise TypeError(f"adapter must be callable, got {type(adapter).__name__}.")
    _ADAPTERS.pop(name, None)
    _ADAPTERS[name] = (adapter, str(accepts))


def as_model(model, params=None) -> tuple[Model, list]:
    """A protocol model and its parameter list, from any model an adapter knows.

    A :class:`~curvlinops.models.Model` and its ``params`` come back unchanged. Any
    other object is offered to the registered adapters
    (:func:`register_model_adapter`); with ``curvlinops`` imported, a
    ``torch.nn.Module`` with a list of its parameters becomes a
    :class:`~curvlinops.frontends.torch.TorchModel` over exactly those parameters
    (in their order) and their values, as curvlinops-for-pytorch takes them. This is
    what every curvature operator does with its ``model`` and ``params`` arguments.

    Parameters
    ----------
    model : curvlinops.models.Model or a model an adapter knows
        The model.
    params : list of arrays, optional
        The parameters (for a PyTorch module: tensors of ``module.parameters()``, any
        subset, in any order). For a foreign model, None lets the adapter choose
        (a PyTorch module: its parameters that require gradients).

    Returns
    -------
    model : curvlinops.models.Model
    params : list of arrays
        The parameter values on the model's backend, in the order of ``params`` (for
        a protocol model, ``params`` itself).

    Raises
    ------
    TypeError
        If ``model`` is neither a protocol model nor an object an adapter accepts; the
        message names what is accepted.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import nn
    >>> net = nn.Sequential(nn.Linear(2, 1))
    >>> params = net.init(0, xp=xp, dtype=xp.float64)
    >>> model, same = as_model(net, params)
    >>> model is net and same == params
    True
    >>> as_model(lambda p, x: x, params)
    Traceback (most recent call last):
    ...
    TypeError: Expected a curvlinops model (a curvlinops.models.Model: a curvlinops.nn ...
    """
    if isinstance(model, Model):
        return model, params  # checked by the operators (check_params_backend)
    for adapter, _ in list(_ADAPTERS.values()):
        adapted = adapter(model, params)
        if adapted is not None:
            return adapted
    accepted = "".join(f", or {accepts}" for _, accepts in _ADAPTERS.values())
    raise TypeError(
        "Expected a curvlinops model (a curvlinops.models.Model: a curvlinops.nn model, "
        f"TorchModel, JaxModel or CallableModel){accepted}; got "
        f"{type(model).__module__}.{type(model).__qualname__}. A plain function "
        "f(params, x) is no model by itself: wrap it with "
        "curvlinops.frontends.jax.JaxModel (JAX) or curvlinops.frontends.CallableModel "
        "(hand-written Jacobian products)."
    )
