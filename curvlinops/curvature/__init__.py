"""Curvature layer: curvature of a loss over data as linear operators.

See docs/design.rst, layer 6. May import every layer above: ``curvlinops._backend``,
``curvlinops.linalg``, ``curvlinops.solvers``, ``curvlinops.models``,
``curvlinops.losses``.
"""

from . import approximations, diagonal, ekfac, exact, kfac, kfac_hessian
from .approximations import *  # noqa: F403
from .base import CurvatureLinearOperator, NonDeterministicDataError
from .diagonal import *  # noqa: F403
from .ekfac import *  # noqa: F403
from .exact import *  # noqa: F403
from .kfac import *  # noqa: F403
from .kfac_hessian import *  # noqa: F403

__all__ = [
    "CurvatureLinearOperator",
    "NonDeterministicDataError",
    *exact.__all__,
    *diagonal.__all__,
    *approximations.__all__,
    *kfac.__all__,
    *ekfac.__all__,
    *kfac_hessian.__all__,
]
