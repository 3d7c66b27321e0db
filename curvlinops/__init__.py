"""curvlinops: curvature of a model's loss as linear operators on any array-API backend.

The subpackages follow the layers of docs/design.rst, each importing only from the ones
listed before it:

1. ``curvlinops._backend``: namespaces, dtypes, devices, random numbers;
2. ``curvlinops.linalg``: the LinearOperator, its algebra and structured operators;
3. ``curvlinops.solvers``: matrix-free algorithms (CG, MINRES, Lanczos, estimators);
4. ``curvlinops.models`` and ``curvlinops.nn``: the model protocol and native layers;
5. ``curvlinops.losses``: exponential-family losses in output space;
6. ``curvlinops.curvature``: curvature operators over data;
7. ``curvlinops.optim``: optimizers built on curvature (K-FAC, Hessian-free, natural
   gradient; their torch and optax adapters are imported on demand);
   ``curvlinops.bayes``: the Laplace approximation and Gaussian predictives;
8. ``curvlinops.verify``: checks users run on their own models and operators;
   ``curvlinops.testing``: the shared operator test case, for users' own operators.

``curvlinops.frontends`` (PyTorch, JAX and hand-written models) is imported too, so
that the curvature operators take PyTorch modules and losses directly; it imports
neither PyTorch nor JAX.

Every public name of the layers is re-exported here.
"""

# frontends registers the PyTorch adapters of as_model / as_loss (it imports no torch)
from . import (
    bayes,
    curvature,
    frontends,
    linalg,
    losses,
    models,
    nn,
    optim,
    solvers,
    testing,
    verify,
)
from ._backend import RandomGenerator, array_namespace, to_numpy
from ._backend.comm import (
    Communicator,
    MPICommunicator,
    RemoteRankError,
    SingleProcess,
    TorchCommunicator,
    as_communicator,
)
from ._backend.conditioning import ConditioningWarning, IllConditionedError, conditioning
from ._backend.linalg import FactorizationError
from .curvature import *  # noqa: F403
from .linalg import *  # noqa: F403
from .losses import *  # noqa: F403
from .models import *  # noqa: F403
from .solvers import *  # noqa: F403

__version__ = "0.1.0.dev0"

__all__ = [
    "ConditioningWarning",
    "FactorizationError",
    "IllConditionedError",
    "conditioning",
    "RandomGenerator",
    "array_namespace",
    "to_numpy",
    "Communicator",
    "MPICommunicator",
    "TorchCommunicator",
    "SingleProcess",
    "RemoteRankError",
    "as_communicator",
    *linalg.__all__,
    *solvers.__all__,
    *models.__all__,
    *losses.__all__,
    *curvature.__all__,
    "bayes",
    "frontends",
    "nn",
    "optim",
    "testing",
    "verify",
]
