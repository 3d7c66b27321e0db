"""curvlinops.nn: array-API layers with hand-derived derivatives (every tier).

Every layer and container here is a curvlinops :class:`~curvlinops.models.Model`: it
draws initial parameters (:meth:`Module.init`), evaluates ``model(params, x)`` and
linearizes itself (:meth:`Module.linearize`) for Jacobian products, Hessian
(second-order) products, layer taps and the layer protocol (each layer's backward rules
for curvature, :mod:`curvlinops.models.layers`), on NumPy, CuPy, PyTorch, JAX or
array-api-strict arrays, with no autodiff framework.

May import: curvlinops._backend, curvlinops.linalg, curvlinops.models.

Examples
--------
>>> import array_api_compat.numpy as xp
>>> from curvlinops import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
>>> params = model.init(0, xp=xp, dtype=xp.float64)
>>> lin = model.linearize(params, xp.ones((2, 4)))
>>> [g.shape for g in lin.vjp(xp.ones((2, 3)))]
[(8, 4), (8,), (3, 8), (3,)]
"""

from .activations import ELU, GELU, Elementwise, LeakyReLU, ReLU, Sigmoid, Softplus, Tanh
from .conv import Conv1d, Conv2d
from .dropout import Dropout
from .linear import Linear
from .linearization import LinearizedNativeLayer, NativeLinearization
from .module import Layer, Module, channels_first_inputs, feature_rows, pull_back_curvature
from .normalization import BatchNorm1d, BatchNorm2d
from .pooling import AvgPool1d, AvgPool2d, GlobalAvgPool2d, MaxPool1d, MaxPool2d
from .residual import Residual
from .sequential import Sequential
from .shape import Flatten, Identity

__all__ = [
    "AvgPool1d",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv1d",
    "Conv2d",
    "Dropout",
    "ELU",
    "GELU",
    "Elementwise",
    "Flatten",
    "GlobalAvgPool2d",
    "Identity",
    "Layer",
    "LeakyReLU",
    "Linear",
    "LinearizedNativeLayer",
    "MaxPool1d",
    "MaxPool2d",
    "Module",
    "NativeLinearization",
    "ReLU",
    "Residual",
    "Sequential",
    "Sigmoid",
    "Softplus",
    "Tanh",
    "channels_first_inputs",
    "feature_rows",
    "pull_back_curvature",
]
