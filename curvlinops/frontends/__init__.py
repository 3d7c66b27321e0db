"""Frontends: models and losses from other sources of derivatives.

The curvature operators accept any :class:`~curvlinops.models.Model`. This namespace
turns other sources of derivatives into one:

- :mod:`curvlinops.frontends.torch`: :class:`~curvlinops.frontends.torch.TorchModel`
  wraps a ``torch.nn.Module`` (derivatives from ``torch.func`` and module hooks) and
  :func:`~curvlinops.frontends.torch.translate_loss` turns a PyTorch loss into the
  curvlinops loss of the same value.
- :mod:`curvlinops.frontends.jax`: :class:`~curvlinops.frontends.jax.JaxModel` wraps a
  pure function ``f(params, x)`` (derivatives from ``jax.vjp`` / ``jax.jvp``, compiled
  with ``jax.jit``).
- :mod:`curvlinops.frontends.callables`: :class:`CallableModel` takes hand-written
  ``forward``, ``jvp`` and ``vjp`` functions (and optionally second-order products and
  layer taps).

``import curvlinops.frontends`` imports neither PyTorch nor JAX: each library is
imported when its submodule is (``import curvlinops.frontends.torch``).

This package sits on top of the model layer: it may import ``curvlinops._backend``,
``curvlinops.models`` and ``curvlinops.losses``; ``curvlinops.verify`` only lazily
(``CallableModel(..., verify=True)``). Nothing in the library imports it at module
import; the curvature operators call :func:`as_loss` lazily.

Examples
--------
>>> from curvlinops import MSELoss
>>> from curvlinops.frontends import as_loss
>>> loss = MSELoss(reduction="sum")
>>> as_loss(loss) is loss
True
"""

from __future__ import annotations

import sys

from ..losses import Loss
from .callables import CallableModel

__all__ = ["CallableModel", "as_loss"]


def as_loss(loss) -> Loss:
    """A curvlinops loss from a curvlinops loss (unchanged) or a PyTorch loss object.

    PyTorch losses (``torch.nn.MSELoss``, ``CrossEntropyLoss``, ``BCEWithLogitsLoss``,
    ``PoissonNLLLoss``) are translated with
    :func:`curvlinops.frontends.torch.translate_loss`. This function never imports
    PyTorch itself: a PyTorch loss can only exist if PyTorch is already loaded.

    Parameters
    ----------
    loss : curvlinops.losses.Loss or torch.nn.Module
        The loss (any ``torch.nn.Module`` is handed to ``translate_loss``, which
        refuses the ones it cannot translate).

    Returns
    -------
    curvlinops.losses.Loss

    Raises
    ------
    TypeError
        If ``loss`` is neither a curvlinops loss nor a PyTorch loss.
    ValueError
        If the PyTorch loss uses an option curvlinops does not support (see
        :func:`~curvlinops.frontends.torch.translate_loss`).

    Examples
    --------
    >>> import torch
    >>> from curvlinops.frontends import as_loss
    >>> as_loss(torch.nn.CrossEntropyLoss(reduction="sum"))
    CrossEntropyLoss(reduction='sum')
    >>> as_loss("mse")
    Traceback (most recent call last):
    ...
    TypeError: Expected a curvlinops loss (e.g. curvlinops.MSELoss()) or a PyTorch loss ...
    """
    if isinstance(loss, Loss):
        return loss
    torch = sys.modules.get("torch")  # a PyTorch loss implies PyTorch is loaded
    if torch is not None and isinstance(loss, torch.nn.Module):
        from .torch import translate_loss

        return translate_loss(loss)
    raise TypeError(
        "Expected a curvlinops loss (e.g. curvlinops.MSELoss()) or a PyTorch loss "
        f"(torch.nn.MSELoss, CrossEntropyLoss, BCEWithLogitsLoss, ...), got "
        f"{type(loss).__module__}.{type(loss).__name__}."
    )
