"""Frontends: models and losses from other sources of derivatives.

The curvature operators accept any :class:`~curvlinops.models.Model`. This namespace
turns other sources of derivatives into one:

- :mod:`curvlinops.frontends.torch`: :class:`~curvlinops.frontends.torch.TorchModel`
  wraps a ``torch.nn.Module`` (derivatives from ``torch.func`` and module hooks) and
  :func:`~curvlinops.frontends.torch.translate_loss` turns a PyTorch loss into the
  curvlinops loss of the same value.
- :mod:`curvlinops.frontends.jax`: :class:`~curvlinops.frontends.jax.JaxModel` wraps a
  pure function ``f(params, x)`` (derivatives from ``jax.vjp`` / ``jax.jvp``, compiled
  with ``jax.jit``; layer taps for layers marked with ``dense``, ``conv2d`` and ``embed``,
  and for Flax linen, Flax nnx and Equinox modules).
- :mod:`curvlinops.frontends.callables`: :class:`CallableModel` takes hand-written
  ``forward``, ``jvp`` and ``vjp`` functions (and optionally second-order products and
  layer taps).

``import curvlinops.frontends`` imports neither PyTorch nor JAX: each library is
imported when its submodule is (``import curvlinops.frontends.torch``).

Importing this package registers its adapters with
:func:`curvlinops.models.register_model_adapter` and
:func:`curvlinops.losses.register_loss_adapter`, so that every curvature operator
takes a ``torch.nn.Module`` with a list of its parameters (wrapped as a
:class:`~curvlinops.frontends.torch.TorchModel` over exactly those parameters) and a
PyTorch loss (translated), the call style of curvlinops-for-pytorch. ``import
curvlinops`` imports this package. The adapters import nothing until they see a
PyTorch object: one can only exist if PyTorch is already loaded.

This package sits on top of the model layer: it may import ``curvlinops._backend``,
``curvlinops.models`` and ``curvlinops.losses``; ``curvlinops.verify`` only lazily
(``CallableModel(..., verify=True)``). Nothing in the library imports it at module
import except the top-level ``curvlinops/__init__.py``, which sits above all layers.

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

from ..losses import as_loss, register_loss_adapter
from ..models import register_model_adapter
from .callables import CallableModel

__all__ = ["CallableModel", "as_loss"]


def _torch_module(obj):
    """``torch`` if ``obj`` is a ``torch.nn.Module``, else None (never imports torch)."""
    torch = sys.modules.get("torch")  # a PyTorch object implies PyTorch is loaded
    if torch is not None and isinstance(obj, torch.nn.Module):
        return torch
    return None


def _adapt_torch_model(model, params):
    if _torch_module(model) is None:
        return None
    from ._torch_params import module_and_params

    return module_and_params(model, params)


def _adapt_torch_loss(loss):
    if _torch_module(loss) is None:
        return None
    from .torch import translate_loss

    return translate_loss(loss)


register_model_adapter(
    "torch",
    _adapt_torch_model,
    accepts="a torch.nn.Module with a list of its parameters (wrapped as "
    "curvlinops.frontends.torch.TorchModel)",
)
register_loss_adapter(
    "torch",
    _adapt_torch_loss,
    accepts="a PyTorch loss (torch.nn.MSELoss, CrossEntropyLoss, BCEWithLogitsLoss, "
    "PoissonNLLLoss)",
)
