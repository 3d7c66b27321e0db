"""The shared operator test case: an operator against an independent dense reference.

Everything here compares a :class:`~curvlinops.LinearOperator` of any backend with a
dense reference matrix held in NumPy float64 (built independently from the arrays
that define the operator: ``np.kron``, ``scipy.linalg.block_diag``, finite
differences, ...), at tolerances set by the operator's dtype:

- :func:`check_products`: ``matvec``, ``matmat``, ``rmatvec``, ``rmatmat``, ``@`` from
  both sides, ``to_dense``, the adjoint (``adjoint()``, ``.T``, ``.H``), the
  dot-product test ``y . (A x) = (A^T y) . x``; results in the operator's namespace
  and dtype;
- :func:`check_tags`: the structure tags agree with the reference (``is_symmetric``:
  the reference is symmetric; ``is_psd``: its eigenvalues are non-negative);
- :func:`check_queries`: ``inverse`` with and without damping, ``trace``,
  ``diagonal``, ``logdet`` with and without damping, ``frobenius_norm``: each either
  matches NumPy on the reference (an operator result, e.g. an inverse, also with tags
  that hold for its reference), or raises the declared exception
  (:class:`NotImplementedError` by default), never a wrong value;
- :func:`check_operator`: all of them; :class:`OperatorCase` bundles an operator with
  its reference and what it supports; :class:`OperatorTestCase` is a base class whose
  ``test_*`` methods pytest collects in a user's ``Test...`` subclass.

Failures raise :class:`AssertionError` naming the check, so the functions work in any
test runner. Nothing here imports pytest.

May import: ``curvlinops._backend``, ``curvlinops.linalg``; NumPy for the references.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._backend import (
    array_namespace,
    dtype_name,
    is_array_api_strict_namespace,
    namespace_name,
    to_device,
    to_numpy,
)
from ..linalg import LinearOperator

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

#: The exact queries :func:`check_queries` knows, in the order it runs them.
QUERIES = (
    "inverse",
    "damped_inverse",
    "trace",
    "diagonal",
    "logdet",
    "damped_logdet",
    "frobenius_norm",
)
_SQUARE_ONLY = frozenset(QUERIES) - {"frobenius_norm"}


@dataclass
class OperatorCase:
    """An operator, its independent dense reference, and which exact queries it answers.

    Parameters
    ----------
    op : LinearOperator
        The operator under test, on any backend.
    reference : array
        Its dense ``(m, n)`` matrix, computed independently of ``op`` (any array
        library; compared in NumPy float64).
    supports : set of str
        Queries of :data:`QUERIES` that must match the reference.
    raises : dict
        ``{query: exception type}`` for queries expected to raise something other than
        :class:`NotImplementedError` (e.g. :class:`~curvlinops.FactorizationError` for
        the inverse of a singular operator).
    damping : float
        The damping of ``damped_inverse`` and ``damped_logdet``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import DiagonalLinearOperator
    >>> case = OperatorCase(DiagonalLinearOperator(np.array([1.0, 2.0])), np.diag([1.0, 2.0]),
    ...                     supports=set(QUERIES))  # a diagonal answers every query
    >>> check_operator(case)
    """

    op: LinearOperator
    reference: Any
    supports: frozenset | set = field(default_factory=frozenset)
    raises: dict = field(default_factory=dict)
    damping: float = 0.5


def tolerances(dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for well-conditioned small problems in ``dtype``.

    ``float32``: ``(2e-4, 2e-5)``; ``float64``: ``(1e-10, 1e-12)``; other dtypes scale
    with their machine epsilon.

    Examples
    --------
    >>> import numpy as np
    >>> tolerances(np.float32)
    (0.0002, 2e-05)
    """
    name = dtype_name(dtype) if not isinstance(dtype, str) else dtype
    known = {"float32": (2e-4, 2e-5), "float64": (1e-10, 1e-12)}
    if name in known:
        return known[name]
    eps = float(np.finfo(np.dtype(name)).eps)
    return 1e3 * eps, 1e2 * eps


def as_operator_array(a, op: LinearOperator):
    """A NumPy array as an array of ``op``'s namespace, dtype and device.

    The values are rounded to the operator's dtype first (so that the float64
    reference computed from the rounded values is exact).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> x = as_operator_array(np.ones(2), aslinearoperator(np.eye(2, dtype=np.float32)))
    >>> str(x.dtype)
    'float32'
    """
    xp = op.xp
    host = np.ascontiguousarray(np.asarray(a, dtype=np.float64).astype(dtype_name(op.dtype)))
    out = xp.asarray(host, dtype=op.dtype)
    return to_device(out, op.device) if op.device is not None else out


def _rounded(a, op):
    return np.asarray(a, dtype=np.float64).astype(dtype_name(op.dtype)).astype(np.float64)


def _host(x):
    return np.asarray(to_numpy(x), dtype=np.float64)


def _assert_close(actual, expected, dtype, what, scale=None):
    rtol, atol = tolerances(dtype)
    actual = _host(actual)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape}, expected {expected.shape}.")
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 1.0
    try:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol + rtol * scale)
    except AssertionError as err:
        raise AssertionError(f"{what} differs from the dense reference:{err}") from None


def _assert_native(result, op, what):
    """A result lives in the operator's namespace and has its dtype."""
    found = namespace_name(array_namespace(result))
    if found != namespace_name(op.xp):
        raise AssertionError(f"{what}: a {found} array, expected {namespace_name(op.xp)}.")
    if dtype_name(result.dtype) != dtype_name(op.dtype):
        raise AssertionError(
            f"{what}: dtype {dtype_name(result.dtype)}, expected {dtype_name(op.dtype)}."
        )


def _reference(reference):
    ref = _host(reference)
    if ref.ndim != 2:
        raise ValueError(f"The dense reference must be 2-D, got shape {ref.shape}.")
    return ref


def check_products(op: LinearOperator, reference, *, seed: int = 1, num_columns: int = 3):
    """Products, adjoint, ``to_dense`` and the dot-product test against ``reference``.

    Parameters
    ----------
    op : LinearOperator
        The operator, on any backend.
    reference : array
        Its independent dense ``(m, n)`` matrix.
    seed : int
        Seed of the random test vectors (drawn in NumPy float64, rounded to the
        operator's dtype).
    num_columns : int
        Columns of the test matrices.

    Raises
    ------
    AssertionError
        Naming the product that differs from the reference.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> A = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> check_products(aslinearoperator(A), A)
    >>> check_products(aslinearoperator(A), A.T @ A[:, :1])
    Traceback (most recent call last):
    ...
    AssertionError: the shape (3, 2) differs from the reference's (2, 1).
    """
    ref = _reference(reference)
    if tuple(op.shape) != ref.shape:
        raise AssertionError(f"the shape {op.shape} differs from the reference's {ref.shape}.")
    m, n = ref.shape
    rng = np.random.default_rng(seed)
    k = num_columns
    x64, X64 = _rounded(rng.normal(size=n), op), _rounded(rng.normal(size=(n, k)), op)
    y64, Y64 = _rounded(rng.normal(size=m), op), _rounded(rng.normal(size=(m, k)), op)
    x, X, y, Y = (as_operator_array(a, op) for a in (x64, X64, y64, Y64))
    xp = op.xp

    AX = op.matmat(X)
    ATY = op.rmatmat(Y)
    checks = [
        ("matvec", op.matvec(x), ref @ x64),
        ("matmat", AX, ref @ X64),
        ("A @ x", op @ x, ref @ x64),
        ("A @ X", op @ X, ref @ X64),
        ("rmatvec", op.rmatvec(y), ref.T @ y64),
        ("rmatmat", ATY, ref.T @ Y64),
        ("to_dense", op.to_dense(), ref),
        ("adjoint().to_dense", op.adjoint().to_dense(), ref.T),
        ("A.T @ Y", op.T @ Y, ref.T @ Y64),
        ("A.H.to_dense", op.H.to_dense(), ref.T),
    ]
    try:
        left = [("y @ A", y @ op, y64 @ ref), ("Y^T @ A", xp.matrix_transpose(Y) @ op, Y64.T @ ref)]
    except TypeError:
        # array-api-strict arrays raise TypeError for a foreign right operand of '@'
        # instead of deferring to its __rmatmul__; users call A.rmatvec there.
        if not is_array_api_strict_namespace(xp):
            raise
        left = []
    for what, result, expected in checks + left:
        _assert_native(result, op, what)
        _assert_close(result, expected, op.dtype, what)
    if tuple(op.adjoint().shape) != (n, m):
        raise AssertionError(f"adjoint(): shape {op.adjoint().shape}, expected {(n, m)}.")

    # Dot-product test y . (A x) = (A^T y) . x, column by column, on the operator alone.
    lhs = np.sum(Y64 * _host(AX), axis=0)
    rhs = np.sum(_host(ATY) * X64, axis=0)
    scale = np.linalg.norm(ref, 2) * np.linalg.norm(X64, axis=0) * np.linalg.norm(Y64, axis=0)
    rtol, _ = tolerances(op.dtype)
    if not np.all(np.abs(lhs - rhs) <= 10 * rtol * scale):
        raise AssertionError(
            f"dot-product test: y . (A x) = {lhs} but (A^T y) . x = {rhs}; the adjoint "
            "product (_rmatmat) is not the transpose of the product (_matmat)."
        )


def check_tags(op: LinearOperator, reference):
    """The structure tags agree with the reference.

    ``is_symmetric`` needs a symmetric reference, ``is_psd`` one whose smallest
    eigenvalue is non-negative up to rounding (``-10 rtol ||A||_2``). Tags that are
    ``False`` mean "not known" and are not checked.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> check_tags(aslinearoperator(np.eye(2), psd=True), np.eye(2))
    >>> check_tags(aslinearoperator(-np.eye(2), psd=True), -np.eye(2))
    Traceback (most recent call last):
    ...
    AssertionError: is_psd is True, but the reference has eigenvalue -1 < 0.
    """
    ref = _reference(reference)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    if op.is_symmetric:
        asymmetry = float(np.max(np.abs(ref - ref.T))) if ref.size else 0.0
        if ref.shape[0] != ref.shape[1] or asymmetry > 1e-12 * scale:
            raise AssertionError(
                f"is_symmetric is True, but the reference is not symmetric "
                f"(max |A - A^T| = {asymmetry:.3g})."
            )
    if op.is_psd:
        if not op.is_symmetric:
            raise AssertionError("is_psd is True but is_symmetric is False.")
        smallest = float(np.linalg.eigvalsh(ref)[0]) if ref.size else 0.0
        rtol, _ = tolerances(op.dtype)
        if smallest < -10 * rtol * float(np.linalg.norm(ref, 2)):
            raise AssertionError(
                f"is_psd is True, but the reference has eigenvalue {smallest:.6g} < 0."
            )


def _query_reference(query, ref, damping):
    n = ref.shape[0]
    shifted = ref + damping * np.eye(n) if query.startswith("damped") else ref
    if query in ("inverse", "damped_inverse"):
        return np.linalg.inv(shifted)
    if query in ("logdet", "damped_logdet"):
        sign, value = np.linalg.slogdet(shifted)
        if not sign > 0:
            raise ValueError(
                f"a case that supports {query} needs a positive determinant; the reference's "
                f"sign is {sign}."
            )
        return value
    if query == "trace":
        return np.trace(ref)
    if query == "diagonal":
        return np.diag(ref).copy()
    return np.linalg.norm(ref, "fro")


def _call(op, query, damping):
    """Run a query; damped queries both directly and through ``damped(d)``."""
    if query == "inverse":
        return [op.inverse()]
    if query == "damped_inverse":
        return [op.inverse(damping=damping), op.damped(damping).inverse()]
    if query == "logdet":
        return [op.logdet()]
    if query == "damped_logdet":
        return [op._logdet(damping), op.damped(damping).logdet()]
    return [getattr(op, query)()]


def _check_query(op, ref, query, supports, raises, damping):
    if query not in supports:
        expected = raises.get(query, NotImplementedError)
        try:
            _call(op, query, damping)
        except expected:
            return
        except Exception as err:
            raise AssertionError(
                f"expected {expected.__name__}, got {type(err).__name__}: {err}"
            ) from err
        raise AssertionError(f"expected {expected.__name__}, but it returned a value.")
    expected = _query_reference(query, ref, damping)
    X64 = _rounded(np.random.default_rng(3).normal(size=(ref.shape[1], 3)), op)
    X = as_operator_array(X64, op)
    try:
        results = _call(op, query, damping)
    except Exception as err:
        raise AssertionError(
            f"declared supported, but it raised {type(err).__name__}: {err}"
        ) from err
    for result in results:
        if isinstance(result, LinearOperator):
            if tuple(result.shape) != ref.shape:
                raise AssertionError(f"shape {result.shape}, expected {ref.shape}.")
            _assert_close(result.to_dense(), expected, op.dtype, "its to_dense()")
            try:  # an inverse claims structure too (e.g. is_psd): it must hold
                check_tags(result, expected)
            except AssertionError as err:
                raise AssertionError(f"the result's tags: {err}") from None
            applied = result @ X
            _assert_native(applied, op, "its product")
            _assert_close(applied, expected @ X64, op.dtype, "its product")
        else:
            if hasattr(result, "dtype"):
                _assert_native(result, op, "the value")
            scale = max(1.0, float(np.max(np.abs(expected))))
            _assert_close(result, expected, op.dtype, "the value", scale=scale)


def check_queries(op: LinearOperator, reference, *, supports=(), raises=None, damping=0.5):
    """Exact queries against NumPy on the reference, or the declared exception.

    Parameters
    ----------
    op : LinearOperator
        The operator.
    reference : array
        Its independent dense matrix.
    supports : iterable of str
        Queries of :data:`QUERIES` the operator answers; they must match the reference.
    raises : dict, optional
        ``{query: exception type}`` for the others that raise something other than
        :class:`NotImplementedError` (which is what every other query must raise).
    damping : float
        Damping of the damped queries (needs ``reference + damping I`` invertible, and
        of positive determinant for ``damped_logdet``).

    Notes
    -----
    Square-only queries (all but ``frobenius_norm``) are skipped for a rectangular
    operator. Damped queries run both as ``op.inverse(damping=d)`` and as
    ``op.damped(d).inverse()`` (``logdet`` likewise).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import DiagonalLinearOperator
    >>> D = DiagonalLinearOperator(np.array([1.0, 2.0]))
    >>> check_queries(D, np.diag([1.0, 2.0]), supports=set(QUERIES))
    >>> check_queries(D, np.diag([1.0, 2.0]), supports={"trace"})
    Traceback (most recent call last):
    ...
    AssertionError: query 'inverse': expected NotImplementedError, but it returned a value.
    """
    ref = _reference(reference)
    supports = frozenset(supports)
    unknown = (supports | set(raises or {})) - set(QUERIES)
    if unknown:
        raise ValueError(f"Unknown queries {sorted(unknown)}; the queries are {QUERIES}.")
    square = ref.shape[0] == ref.shape[1]
    for query in QUERIES:
        if query in _SQUARE_ONLY and not square:
            continue
        try:
            _check_query(op, ref, query, supports, raises or {}, damping)
        except AssertionError as err:
            raise AssertionError(f"query {query!r}: {err}") from err


def check_operator(op, reference=None, *, supports=(), raises=None, damping=0.5, seed=1):
    """Run every check: products and adjoint, structure tags, exact queries.

    Parameters
    ----------
    op : LinearOperator or OperatorCase
        The operator (then ``reference`` is required), or a case that bundles it with
        its reference, ``supports``, ``raises`` and ``damping``.
    reference : array, optional
        The operator's independent dense matrix.
    supports, raises, damping
        See :func:`check_queries` (ignored when ``op`` is an :class:`OperatorCase`).
    seed : int
        Seed of the random test vectors of :func:`check_products`.

    Raises
    ------
    AssertionError
        Naming the first check that failed.

    Examples
    --------
    A user's operator: ``diag(d) + u u^T``, with a cheap trace.

    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import LinearOperator
    >>> class RankOneUpdate(LinearOperator):
    ...     def __init__(self, d, u):
    ...         super().__init__((d.shape[0],) * 2, dtype=d.dtype, xp=xp, psd=True)
    ...         self.d, self.u = d, u
    ...     def _matmat(self, X):
    ...         return self.d[:, None] * X + self.u[:, None] * (self.u @ X)[None, :]
    ...     def trace(self):
    ...         return xp.sum(self.d) + self.u @ self.u
    >>> d, u = np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.0, -1.0])
    >>> check_operator(RankOneUpdate(d, u), np.diag(d) + np.outer(u, u), supports={"trace"})
    """
    if isinstance(op, OperatorCase):
        case = op
    else:
        if reference is None:
            raise TypeError("check_operator needs the dense reference of the operator.")
        case = OperatorCase(op, reference, frozenset(supports), dict(raises or {}), damping)
    check_products(case.op, case.reference, seed=seed)
    check_tags(case.op, case.reference)
    check_queries(
        case.op,
        case.reference,
        supports=case.supports,
        raises=case.raises,
        damping=case.damping,
    )


class OperatorTestCase:
    """Base class for a user's operator tests; pytest collects its ``test_*`` methods.

    Subclass it in a class whose name starts with ``Test`` and implement
    :meth:`make_case` (it may use pytest fixtures through attributes set by your own
    autouse fixture, or build everything itself). Each ``test_*`` method runs one
    group of checks, so a failure names the group.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> class TestMyOperator(OperatorTestCase):
    ...     def make_case(self):
    ...         A = np.array([[2.0, 1.0], [1.0, 2.0]])
    ...         return OperatorCase(aslinearoperator(A, psd=True), A, supports=set(QUERIES))
    >>> t = TestMyOperator()
    >>> t.test_products_and_adjoint(); t.test_tags(); t.test_queries()
    """

    def make_case(self) -> OperatorCase:
        """Build the operator, its dense reference and what it supports."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_case().")

    def test_products_and_adjoint(self):
        """:func:`check_products` on the case."""
        case = self.make_case()
        check_products(case.op, case.reference)

    def test_tags(self):
        """:func:`check_tags` on the case."""
        case = self.make_case()
        check_tags(case.op, case.reference)

    def test_queries(self):
        """:func:`check_queries` on the case, with its ``supports``, ``raises``, ``damping``."""
        case = self.make_case()
        check_queries(
            case.op,
            case.reference,
            supports=case.supports,
            raises=case.raises,
            damping=case.damping,
        )
