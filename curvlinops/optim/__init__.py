"""Optimizers built on curvature: K-FAC, Hessian-free and natural gradient.

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
from .hessian_free import HessianFree, HessianFreeState
from .kfac import KFAC, KFACState
from .natural_gradient import NaturalGradient, NaturalGradientState

__all__ = [
    "KFAC",
    "KFACState",
    "HessianFree",
    "HessianFreeState",
    "NaturalGradient",
    "NaturalGradientState",
    "levenberg_marquardt",
    "reduction_ratio",
]
