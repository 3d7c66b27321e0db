"""Matrix-free algorithms: Krylov solvers, inverses as operators, Lanczos, Nystrom,
trace/diagonal estimators, spectral density.

They see only the LinearOperator interface. See docs/design.rst, layer 3.
May import: ``curvlinops._backend``, ``curvlinops.linalg``.
"""

# Aliases: the star imports below rebind names such as ``cg`` and ``lanczos`` to the
# functions of the same name, so __all__ is collected from the module objects.
from . import (
    cg as _cg,
    estimators as _estimators,
    inverse as _inverse,
    lanczos as _lanczos,
    minres as _minres,
    nystrom as _nystrom,
    spectral_density as _spectral_density,
)
from .cg import *  # noqa: F403
from .estimators import *  # noqa: F403
from .inverse import *  # noqa: F403
from .lanczos import *  # noqa: F403
from .minres import *  # noqa: F403
from .nystrom import *  # noqa: F403
from .spectral_density import *  # noqa: F403

__all__ = [
    *_cg.__all__,
    *_minres.__all__,
    *_inverse.__all__,
    *_lanczos.__all__,
    *_nystrom.__all__,
    *_estimators.__all__,
    *_spectral_density.__all__,
]
