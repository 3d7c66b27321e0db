"""The public operator test case (:mod:`curvlinops.testing`) on every backend.

It must pass correct operators, catch each kind of wrong operator (product, adjoint,
tag, exact query, a query that answers instead of refusing), work without pytest, and
its documentation page's example must run.
"""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from curvlinops import (
    CallableLinearOperator,
    DenseLinearOperator,
    DiagonalLinearOperator,
    EighLinearOperator,
    FactorizationError,
)
from curvlinops.testing import (
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

DOCS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "api" / "testing.rst"


def _callable(backend, A, *, rmat=None, **tags):
    A_b = backend.asarray(A)
    R_b = backend.asarray(A.T if rmat is None else rmat)
    return CallableLinearOperator(
        A.shape,
        matmat=lambda X: A_b @ X,
        rmatmat=lambda X: R_b @ X,
        dtype=A_b.dtype,
        xp=backend.xp,
        device=backend.device,
        **tags,
    )


def test_docs_page_example_runs():
    if "import torch" in DOCS_PAGE.read_text(encoding="utf-8"):
        pytest.importorskip("torch")  # the page also checks a torch operator
    result = doctest.testfile(
        str(DOCS_PAGE),
        module_relative=False,
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS,
        raise_on_error=False,
        verbose=False,
    )
    assert result.attempted > 5 and result.failed == 0


def test_import_does_not_need_pytest():
    code = "import sys, curvlinops.testing; print('pytest' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_correct_operators_pass(backend, dtype_name):
    rng = np.random.default_rng(0)
    A = rng.normal(size=(5, 4)).astype(dtype_name).astype(np.float64)
    check_operator(_callable(backend, A), A)  # rectangular, no exact queries
    d = rng.uniform(0.5, 2.0, size=4).astype(dtype_name).astype(np.float64)
    check_operator(
        DiagonalLinearOperator(backend.asarray(d, dtype_name)), np.diag(d), supports=QUERIES
    )


def test_wrong_product_is_caught(backend):
    A = np.arange(6.0).reshape(3, 2)
    with pytest.raises(AssertionError, match="matvec differs"):
        check_products(_callable(backend, A), A + 1e-3)


def test_wrong_adjoint_is_caught(backend):
    A = np.arange(4.0).reshape(2, 2) + 1.0
    with pytest.raises(AssertionError, match="rmatvec differs"):
        check_products(_callable(backend, A, rmat=A), A)


def test_wrong_shape_is_caught(numpy_backend):
    A = np.eye(3)
    with pytest.raises(AssertionError, match="shape"):
        check_products(_callable(numpy_backend, A), np.eye(2))


def test_contradicted_tags_are_caught(backend):
    N = np.array([[1.0, 2.0], [0.0, 1.0]])
    with pytest.raises(AssertionError, match="is_symmetric is True"):
        check_tags(_callable(backend, N, rmat=N, symmetric=True), N)
    S = np.array([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    with pytest.raises(AssertionError, match="is_psd is True.*-1"):
        check_tags(DenseLinearOperator(backend.asarray(S), psd=True), S)
    check_tags(DenseLinearOperator(backend.asarray(S), symmetric=True), S)  # not PSD: fine


def test_queries_answer_or_refuse(backend):
    lam = np.array([2.0, 1.0])
    Q = np.eye(3)[:, :2]
    op = EighLinearOperator(backend.asarray(lam), backend.asarray(Q))
    ref = Q @ np.diag(lam) @ Q.T
    raises = {"inverse": FactorizationError, "logdet": FactorizationError}
    supported = set(QUERIES) - set(raises)
    check_queries(op, ref, supports=supported, raises=raises)
    # A supported query that refuses, and an unsupported one that answers, both fail.
    with pytest.raises(AssertionError, match="query 'inverse': expected NotImplementedError"):
        check_queries(op, ref, supports=supported - {"trace"})
    with pytest.raises(AssertionError, match="'trace': declared supported, but it raised"):
        check_queries(_callable(backend, ref), ref, supports={"trace"})
    with pytest.raises(ValueError, match="Unknown queries"):
        check_queries(op, ref, supports={"determinant"})


def test_wrong_query_value_is_caught(numpy_backend):
    class WrongDiagonal(DiagonalLinearOperator):
        def trace(self):
            return 2 * super().trace()

    d = np.array([1.0, 2.0])
    with pytest.raises(AssertionError, match="query 'trace'"):
        check_operator(WrongDiagonal(d), np.diag(d), supports=QUERIES)


def test_false_tag_of_a_query_result_is_caught(numpy_backend):
    """The result of an exact query (an inverse) carries tags too; a false ``is_psd`` on
    it is caught, not only on the operator."""

    class ClaimsPSDInverse(DiagonalLinearOperator):
        def inverse(self, damping=0.0):
            return DiagonalLinearOperator(1.0 / (self.diagonal() + damping), psd=True)

    d = np.array([2.0, -1.0])
    kwargs = {
        "supports": set(QUERIES) - {"logdet"},
        "raises": {"logdet": ValueError},  # a negative determinant
        "damping": 3.0,
    }
    with pytest.raises(AssertionError, match=r"query 'inverse'.*tags.*is_psd is True"):
        check_queries(ClaimsPSDInverse(d), np.diag(d), **kwargs)
    check_queries(DiagonalLinearOperator(d), np.diag(d), **kwargs)


def test_case_and_tolerances(backend):
    op = DiagonalLinearOperator(backend.asarray(np.array([1.0, 3.0]), "float32"))
    assert tolerances(op.dtype) == (2e-4, 2e-5)
    x = as_operator_array(np.array([1.0, 2.0]), op)
    assert backend.to_numpy(x).dtype == np.float32
    check_operator(OperatorCase(op, np.diag([1.0, 3.0]), set(QUERIES), damping=0.25))
    with pytest.raises(TypeError, match="reference"):
        check_operator(op)


class TestSubclassedOperatorCase(OperatorTestCase):
    """What a user writes: pytest collects the three inherited checks."""

    def make_case(self):
        A = np.array([[2.0, 1.0], [1.0, 2.0]])
        return OperatorCase(DenseLinearOperator(A, psd=True), A, supports=set(QUERIES))


def test_the_base_class_is_not_collected_and_needs_make_case():
    assert not OperatorTestCase.__name__.startswith("Test")
    with pytest.raises(NotImplementedError, match="make_case"):
        OperatorTestCase().test_tags()
