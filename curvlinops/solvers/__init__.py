"""Matrix-free algorithms: Krylov solvers, inverses as operators, Lanczos, Nystrom,
trace/diagonal estimators, spectral density.

They see only the LinearOperator interface. See DESIGN.md, layer 3.
May import: ``curvlinops._backend``, ``curvlinops.linalg``.
"""

from . import cg, estimators, inverse, lanczos, minres, nystrom, spectral_density
from .cg import *  # noqa: F403
from .estimators import *  # noqa: F403
from .inverse import *  # noqa: F403
from .lanczos import *  # noqa: F403
from .minres import *  # noqa: F403
from .nystrom import *  # noqa: F403
from .spectral_density import *  # noqa: F403

__all__ = [
    *cg.__all__,
    *minres.__all__,
    *inverse.__all__,
    *lanczos.__all__,
    *nystrom.__all__,
    *estimators.__all__,
    *spectral_density.__all__,
]
