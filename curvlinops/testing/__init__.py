"""The shared operator test case, public: check your own operator like curvlinops does.

:func:`check_operator` compares an operator of any backend with an independent dense
reference (NumPy float64) at tolerances set by the operator's dtype: every product
and the adjoint, the dot-product test, the structure tags, and the exact queries
(inverse, trace, diagonal, log-determinant, Frobenius norm: the declared ones must
match, the others must refuse). :class:`OperatorCase` bundles an operator with its
reference; :class:`OperatorTestCase` is a base class for pytest. This subpackage is a
namespace: use ``curvlinops.testing.check_operator``. It does not need pytest.

May import: ``curvlinops._backend``, ``curvlinops.linalg``; NumPy.
"""

from .operator_suite import (
    QUERIES,
    OperatorCase,
    OperatorTestCase,
    as_operator_array,
    check_operator,
    check_products,
    check_queries,
    check_tags,
    tolerances,
)

__all__ = [
    "QUERIES",
    "OperatorCase",
    "OperatorTestCase",
    "as_operator_array",
    "check_operator",
    "check_products",
    "check_queries",
    "check_tags",
    "tolerances",
]
