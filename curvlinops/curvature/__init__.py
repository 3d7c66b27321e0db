"""Curvature layer: curvature of a loss over data as linear operators.

See DESIGN.md, layer 6. May import every layer above: ``curvlinops._backend``,
``curvlinops.linalg``, ``curvlinops.solvers``, ``curvlinops.models``,
``curvlinops.losses``.
"""

from . import exact
from .base import CurvatureLinearOperator, NonDeterministicDataError
from .exact import *  # noqa: F403

__all__ = ["CurvatureLinearOperator", "NonDeterministicDataError", *exact.__all__]
