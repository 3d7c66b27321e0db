"""Compatibility names for code written against the former ``_kronecker`` module.

The factor statistics moved to :mod:`.kronecker_statistics` and the operator to
:mod:`.kronecker_factored`; this module only re-exports the names that the
Kronecker-factored Hessian's statistics code imports. New code imports from those
modules directly.

May import: ``.kronecker_statistics``, ``.kronecker_factored``.
"""

from __future__ import annotations

from .kronecker_factored import KroneckerFactoredLinearOperator, layer_layout  # noqa: F401
from .kronecker_statistics import (  # noqa: F401
    LayerInfo,
    _InputStatistics,
    _KroneckerCurvature,
    check_fisher_type,
    diag_matrix,
    flatten_tap,
    symmetrized,
)

__all__: list[str] = []
