"""Bayesian methods built on curvature: the Laplace approximation and Gaussian predictives.

See docs/design.rst, layer 7. :class:`Laplace` approximates a model's posterior at its
MAP parameters by a Gaussian whose precision is the curvature of the negative
log-likelihood (Hessian, GGN or empirical Fisher; dense, diagonal, K-FAC, EKFAC, low
rank or diagonal plus low rank) plus a diagonal prior, with the exact log marginal
likelihood of that structure, the tuning of the prior precision by maximizing it,
posterior samples and the linearized predictive. :class:`GaussianPosterior` and the
predictive functions take any Gaussian given by a mean and a precision operator (a
variational posterior from :mod:`curvlinops.optim`, say), not only a Laplace one.

May import every layer above: ``curvlinops._backend``, ``curvlinops.linalg``,
``curvlinops.solvers``, ``curvlinops.models``, ``curvlinops.losses``,
``curvlinops.curvature``.
"""

from .laplace import Laplace
from .posterior import GaussianPosterior, covariance_factor
from .predictive import (
    glm_predictive_moments,
    mc_predictive,
    per_datum_jacobians,
    probit_predictive,
    regression_predictive,
)

__all__ = [
    "GaussianPosterior",
    "Laplace",
    "covariance_factor",
    "glm_predictive_moments",
    "mc_predictive",
    "per_datum_jacobians",
    "probit_predictive",
    "regression_predictive",
]
