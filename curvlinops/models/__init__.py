"""Model layer: the model protocol, the layer protocol and the flat-parameter helpers.

See docs/design.rst, layer 4 (Models). May import ``curvlinops._backend``,
``curvlinops.linalg`` and ``curvlinops.solvers``.
"""

from .adapters import as_model, register_model_adapter
from .layers import LinearizedLayer, MissingLayerRuleError
from .params import check_params, flatten_params, num_params, param_shapes, unflatten_params
from .protocol import (
    OUTPUTS,
    Capability,
    LayerTap,
    Linearization,
    MissingTierError,
    Model,
    OutputsFunction,
    Tier,
    TraceableLinearMap,
)
from .subset import ParameterSubsetModel

__all__ = [
    "Capability",
    "LayerTap",
    "Linearization",
    "LinearizedLayer",
    "MissingLayerRuleError",
    "MissingTierError",
    "Model",
    "OUTPUTS",
    "OutputsFunction",
    "ParameterSubsetModel",
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
