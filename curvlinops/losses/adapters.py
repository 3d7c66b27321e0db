"""Losses from other libraries as curvlinops losses: :func:`as_loss` and its registry.

The curvature operators pass their ``loss`` argument through :func:`as_loss`: a
curvlinops :class:`~curvlinops.losses.Loss` comes back unchanged; anything else is
offered to the adapters registered with :func:`register_loss_adapter`, in
registration order. The frontends register theirs when imported (the PyTorch one
translates ``torch.nn.MSELoss``, ``CrossEntropyLoss``, ...), and ``import curvlinops``
imports them; this module knows none of them.

May import: ``.base``.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Loss

__all__ = ["as_loss", "register_loss_adapter"]

#: name -> (adapter, what it accepts), in registration order
_ADAPTERS: dict[str, tuple[Callable, str]] = {}


def register_loss_adapter(name: str, adapter: Callable, *, accepts: str) -> None:
    """Let :func:`as_loss` (hence every curvature operator) accept more kinds of loss.

    Parameters
    ----------
    name : str
        Key of the adapter; registering the same name again replaces it.
    adapter : callable
        ``adapter(loss)`` returns a curvlinops :class:`~curvlinops.losses.Loss` for
        the objects it handles and None for all others (then the next adapter is
        asked). It may raise a clear error for an object it recognizes but cannot
        translate. It must not import a library just to find out that the object is
        not one of its kind.
    accepts : str
        What the adapter accepts, for the TypeError of :func:`as_loss`.

    Examples
    --------
    >>> from curvlinops import MSELoss
    >>> def adapt_names(loss):
    ...     return MSELoss(reduction="sum") if loss == "sum of squares" else None
    >>> register_loss_adapter("names", adapt_names, accepts="the name 'sum of squares'")
    >>> as_loss("sum of squares")
    MSELoss(reduction='sum')
    """
    if not callable(adapter):
        raise TypeError(f"adapter must be callable, got {type(adapter).__name__}.")
    _ADAPTERS.pop(name, None)
    _ADAPTERS[name] = (adapter, str(accepts))


def as_loss(loss) -> Loss:
    """A curvlinops loss from a curvlinops loss (unchanged) or a loss an adapter knows.

    With ``curvlinops`` imported, PyTorch losses (``torch.nn.MSELoss``,
    ``CrossEntropyLoss``, ``BCEWithLogitsLoss``, ``PoissonNLLLoss``) are translated
    with :func:`curvlinops.frontends.torch.translate_loss`. This function never
    imports PyTorch itself: a PyTorch loss can only exist if PyTorch is loaded.

    Parameters
    ----------
    loss : curvlinops.losses.Loss or a loss an adapter knows (e.g. torch.nn.Module)
        The loss (any ``torch.nn.Module`` is handed to ``translate_loss``, which
        refuses the ones it cannot translate).

    Returns
    -------
    curvlinops.losses.Loss

    Raises
    ------
    TypeError
        If no adapter takes ``loss``; the message names what is accepted.
    ValueError
        If an adapter recognizes the loss but not one of its options (e.g. a PyTorch
        loss with class weights, see :func:`~curvlinops.frontends.torch.translate_loss`).

    Examples
    --------
    >>> from curvlinops import MSELoss, as_loss
    >>> loss = MSELoss(reduction="sum")
    >>> as_loss(loss) is loss
    True
    >>> as_loss("mse")
    Traceback (most recent call last):
    ...
    TypeError: Expected a curvlinops loss (e.g. curvlinops.MSELoss()), or a PyTorch loss ...
    """
    if isinstance(loss, Loss):
        return loss
    for adapter, _ in list(_ADAPTERS.values()):
        translated = adapter(loss)
        if translated is not None:
            return translated
    accepted = "".join(f", or {accepts}" for _, accepts in _ADAPTERS.values())
    raise TypeError(
        f"Expected a curvlinops loss (e.g. curvlinops.MSELoss()){accepted}; got "
        f"{type(loss).__module__}.{type(loss).__qualname__}."
    )
