"""Operator layer: the LinearOperator protocol, its algebra, structured operators, interop.

See docs/design.rst, layer 2. May import only ``curvlinops._backend``.
"""

from .base import (
    AdjointLinearOperator,
    CheckedInput,
    DampedLinearOperator,
    LinearOperator,
    ProductLinearOperator,
    ScaledLinearOperator,
    SumLinearOperator,
)
from .interop import CallableLinearOperator, ScipyLinearOperator, aslinearoperator
from .layout import ParameterLayoutLinearOperator
from .lowrank import DiagonalPlusLowRankLinearOperator
from .structured import *  # noqa: F403
from .structured import __all__ as _structured_all

__all__ = [
    "AdjointLinearOperator",
    "CallableLinearOperator",
    "CheckedInput",
    "DampedLinearOperator",
    "DiagonalPlusLowRankLinearOperator",
    "LinearOperator",
    "ParameterLayoutLinearOperator",
    "ProductLinearOperator",
    "ScaledLinearOperator",
    "ScipyLinearOperator",
    "SumLinearOperator",
    "aslinearoperator",
    *_structured_all,
]
