"""Exponential-family losses with everything the curvature layer needs in output space.

Each loss is the negative log-likelihood of a predictive distribution ``r(y | f)``
and offers, batched over the data: the PyTorch-matching value, per-datum gradients,
Hessian products and factors, the Fisher of ``r`` computed from the distribution
itself, samples of ``r`` and the sampled gradients of Monte-Carlo Fisher. See
:class:`Loss` for the conventions.

May import: curvlinops._backend, curvlinops.linalg, curvlinops.models.
"""

from .adapters import as_loss, register_loss_adapter
from .base import Loss
from .classification import BCEWithLogitsLoss, CrossEntropyLoss
from .poisson import PoissonNLLLoss
from .regression import GaussianNLLLoss, MSELoss

__all__ = [
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "GaussianNLLLoss",
    "Loss",
    "MSELoss",
    "PoissonNLLLoss",
    "as_loss",
    "register_loss_adapter",
]
