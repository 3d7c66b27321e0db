"""Backend layer: array namespaces, dtypes, devices, random numbers, API gap fillers.

The only layer that imports concrete array libraries. See docs/design.rst, layer 1.
"""

from .conditioning import (
    ConditioningWarning,
    IllConditionedError,
    check_invertible_spectrum,
    condition_limit,
    conditioning,
)
from .linalg import (
    FactorizationError,
    all_finite,
    checked_cholesky,
    checked_eigh,
    diag_matrix,
    index_update,
    is_numerically_symmetric,
    kron,
    solve_triangular,
)
from .namespace import (
    array_namespace,
    assert_same_namespace,
    can_cast_losslessly,
    default_float_dtype,
    device,
    dtype_eps,
    dtype_name,
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_real_floating,
    is_torch_namespace,
    namespace_name,
    to_device,
    to_numpy,
)
from .random import RandomGenerator, as_generator, normal, rademacher, uniform
from .special import erf
from .state import from_host, host_int, host_str, host_value

__all__ = [
    "ConditioningWarning",
    "FactorizationError",
    "IllConditionedError",
    "RandomGenerator",
    "all_finite",
    "array_namespace",
    "as_generator",
    "assert_same_namespace",
    "can_cast_losslessly",
    "check_invertible_spectrum",
    "condition_limit",
    "conditioning",
    "checked_cholesky",
    "checked_eigh",
    "default_float_dtype",
    "device",
    "diag_matrix",
    "dtype_eps",
    "dtype_name",
    "erf",
    "from_host",
    "host_int",
    "host_str",
    "host_value",
    "index_update",
    "is_array_api_strict_namespace",
    "is_cupy_namespace",
    "is_jax_namespace",
    "is_numerically_symmetric",
    "is_numpy_namespace",
    "is_real_floating",
    "is_torch_namespace",
    "kron",
    "namespace_name",
    "normal",
    "rademacher",
    "solve_triangular",
    "to_device",
    "to_numpy",
    "uniform",
]
