"""Optimizers built on curvature: K-FAC, Hessian-free, natural gradient, and natural-gradient
variational inference (VOGN, noisy K-FAC: the Bayesian learning rule with diagonal and
Kronecker-factored Gaussian posteriors, which hand out a :class:`VariationalPosterior`).

See docs/design.rst, layer 7. Each optimizer is a functional step on parameters as
lists of arrays of any array-API backend (``opt.init(params, ...) -> state``,
``opt.step(params, state, batch) -> (params, state)``); adapters make them a
``torch.optim.Optimizer`` (:mod:`curvlinops.optim.torch`) and an optax-style
``init``/``update`` pair for JAX (:mod:`curvlinops.optim.optax`), imported on demand.

May import every layer above: ``curvlinops._backend``, ``curvlinops.linalg``,
``curvlinops.solvers``, ``curvlinops.models``, ``curvlinops.losses``,
``curvlinops.curvature``.
"""

from ._common import levenberg_marquardt, reduction_ratio
from ._variational import VariationalPosterior
from .hessian_free import HessianFree, HessianFreeState
from .kfac import KFAC, KFACState
from .natural_gradient import NaturalGradient, NaturalGradientState
from .noisy_kfac import NoisyKFAC, NoisyKFACState
from .vogn import VOGN, VOGNState

__all__ = [
    "KFAC",
    "KFACState",
    "HessianFree",
    "HessianFreeState",
    "NaturalGradient",
    "NaturalGradientState",
    "NoisyKFAC",
    "NoisyKFACState",
    "VOGN",
    "VOGNState",
    "VariationalPosterior",
    "levenberg_marquardt",
    "reduction_ratio",
]
