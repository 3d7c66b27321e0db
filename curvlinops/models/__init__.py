"""Model layer: the model protocol and the flat-parameter helpers.

See DESIGN.md, layer 4, "The model protocol". May import ``curvlinops._backend``,
``curvlinops.linalg`` and ``curvlinops.solvers``.
"""

from .adapters import as_model, register_model_adapter
from .params import check_params, flatten_params, num_params, param_shapes, unflatten_params
from .protocol import (
    LayerTap,
    Linearization,
    MissingTierError,
    Model,
    Tier,
    TraceableLinearMap,
)

__all__ = [
    "LayerTap",
    "Linearization",
    "MissingTierError",
    "Model",
    "Tier",
    "TraceableLinearMap",
    "as_model",
    "check_params",
    "flatten_params",
    "num_params",
    "param_shapes",
    "register_model_adapter",
    "unflatten_params",
]
