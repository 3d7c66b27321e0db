"""One shared test suite that every linear operator of curvlinops goes through.

Each *case* in the registry :data:`CASES` builds an operator together with a dense
reference matrix in NumPy float64. The reference is built **independently** from the
arrays that define the operator (``np.kron``, ``scipy.linalg.block_diag``, ``np.diag``,
``Q @ diag(lam) @ Q.T``, ...), never from the operator. Every case then runs, on every
backend and in float32 and float64, through the same checks: products (``matvec``,
``matmat``, ``rmatvec``, ``rmatmat``, ``@`` from both sides), the dot-product test,
``to_dense``, the adjoint, and the exact queries (``inverse`` with and without damping,
``trace``, ``diagonal``, ``logdet`` with and without damping, ``frobenius_norm``). A
query an operator does not support must raise :class:`NotImplementedError` (or the
exception the case declares), never return a wrong value.

How to add a case (e.g. a curvature operator in a later issue)
-------------------------------------------------------------
Write a builder in this file (below the existing ones, or in the section at the end)
and register it::

    @register_case("my_operator")
    def _my_operator(backend, dtype, rng):
        A = rng.normal(size=(4, 4))               # defining arrays, NumPy float64
        A_b, A64 = put(backend, dtype, A)         # backend array, and A rounded to dtype
        return Case(
            op=MyOperator(A_b),
            ref=A64,                              # independent dense reference (float64)
            supports={"trace", "diagonal"},       # queries to compare with the reference
            raises={"inverse": FactorizationError},  # other expected exceptions
        )

``backend`` is the fixture from ``tests/conftest.py``, ``dtype`` a name
(``"float32"``/``"float64"``) and ``rng`` a seeded ``numpy.random.Generator``. Queries
neither in ``supports`` nor in ``raises`` must raise :class:`NotImplementedError`.
Square-only queries are skipped for non-square cases. The test functions are
parametrized over the registry at collection time (``pytest_generate_tests``), so a
case registered anywhere in this module is picked up.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import scipy.linalg

from conftest import tolerances
from curvlinops import (
    AdjointLinearOperator,
    BlockDiagonalLinearOperator,
    CallableLinearOperator,
    DenseLinearOperator,
    DiagonalLinearOperator,
    DiagonalPlusLowRankLinearOperator,
    EighLinearOperator,
    FactorizationError,
    IdentityLinearOperator,
    KroneckerEighLinearOperator,
    KroneckerLinearOperator,
    LinearOperator,
    array_namespace,
)
from curvlinops._backend import dtype_name as backend_dtype_name, namespace_name

QUERIES = (
    "inverse",
    "damped_inverse",
    "trace",
    "diagonal",
    "logdet",
    "damped_logdet",
    "frobenius_norm",
)
SQUARE_ONLY = set(QUERIES) - {"frobenius_norm"}
ALL_QUERIES = frozenset(QUERIES)


@dataclass
class Case:
    """An operator, its independent dense float64 reference, and what it supports."""

    op: LinearOperator
    ref: np.ndarray
    supports: frozenset | set = field(default_factory=frozenset)
    raises: dict = field(default_factory=dict)
    damping: float = 0.5


CaseBuilder = Callable[..., Case]
CASES: dict[str, CaseBuilder] = {}


def register_case(name: str):
    """Decorator adding a case builder ``(backend, dtype, rng) -> Case`` to :data:`CASES`."""

    def decorate(builder):
        if name in CASES:
            raise ValueError(f"Duplicate operator case {name!r}.")
        CASES[name] = builder
        return builder

    return decorate


def put(backend, dtype, a):
    """``a`` as a backend array of ``dtype``, and as float64 NumPy after rounding to it."""
    rounded = np.asarray(a, dtype=np.float64).astype(dtype).astype(np.float64)
    return backend.asarray(rounded, dtype), rounded


# -- random defining matrices (NumPy float64) --------------------------------------------
# Cases share a few sizes (N, 2N and (4, N)): JAX compiles every primitive once per
# shape, so fewer distinct shapes keep the suite fast.
N = 6


def spd(rng, n):
    G = rng.normal(size=(n, n))
    return G @ G.T / n + 0.5 * np.eye(n)


def dominant(rng, n):
    """Non-symmetric, eigenvalues in a disc of radius ~1 around 2: det > 0, cond ~ 3."""
    return rng.normal(size=(n, n)) / (2 * np.sqrt(n)) + 2 * np.eye(n)


def orthonormal(rng, n, k):
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return Q[:, :k]


def positive(rng, n):
    return rng.uniform(0.5, 2.0, size=n)


# -- cases: structured operators ----------------------------------------------------------


@register_case("dense_square")
def _dense_square(backend, dtype, rng):
    A, A64 = put(backend, dtype, dominant(rng, N))
    return Case(DenseLinearOperator(A), A64, ALL_QUERIES)


@register_case("dense_symmetric")
def _dense_symmetric(backend, dtype, rng):
    A, A64 = put(backend, dtype, spd(rng, N))
    return Case(DenseLinearOperator(A, symmetric=True), A64, ALL_QUERIES)


@register_case("dense_rectangular")
def _dense_rectangular(backend, dtype, rng):
    A, A64 = put(backend, dtype, rng.normal(size=(4, N)))
    return Case(DenseLinearOperator(A), A64, {"frobenius_norm"})


@register_case("identity")
def _identity(backend, dtype, rng):
    op = IdentityLinearOperator(N, xp=backend.xp, dtype=backend.dtype(dtype), device=backend.device)
    return Case(op, np.eye(N), ALL_QUERIES)


@register_case("diagonal")
def _diagonal(backend, dtype, rng):
    d, d64 = put(backend, dtype, positive(rng, N))
    return Case(DiagonalLinearOperator(d), np.diag(d64), ALL_QUERIES)


@register_case("diagonal_two_negative")
def _diagonal_two_negative(backend, dtype, rng):
    # det > 0 with two negative entries (also after damping 0.5): logdet still defined.
    d, d64 = put(backend, dtype, np.concatenate([positive(rng, N - 2), [-1.5, -2.0]]))
    return Case(DiagonalLinearOperator(d), np.diag(d64), ALL_QUERIES)


@register_case("block_diagonal_mixed")
def _block_diagonal_mixed(backend, dtype, rng):
    A, A64 = put(backend, dtype, dominant(rng, 3))
    d, d64 = put(backend, dtype, positive(rng, 1))
    S, S64 = put(backend, dtype, spd(rng, 2))
    op = BlockDiagonalLinearOperator([A, DiagonalLinearOperator(d), DenseLinearOperator(S)])
    return Case(op, scipy.linalg.block_diag(A64, np.diag(d64), S64), ALL_QUERIES)


@register_case("block_diagonal_single")
def _block_diagonal_single(backend, dtype, rng):
    S, S64 = put(backend, dtype, spd(rng, N))
    return Case(BlockDiagonalLinearOperator([S]), S64, ALL_QUERIES)


@register_case("block_diagonal_rectangular")
def _block_diagonal_rectangular(backend, dtype, rng):
    A, A64 = put(backend, dtype, rng.normal(size=(2, 4)))
    d, d64 = put(backend, dtype, positive(rng, 2))
    op = BlockDiagonalLinearOperator([A, DiagonalLinearOperator(d)])
    return Case(op, scipy.linalg.block_diag(A64, np.diag(d64)), {"frobenius_norm"})


@register_case("block_diagonal_square_of_rectangular_blocks")
def _block_diagonal_square_rect_blocks(backend, dtype, rng):
    # Square overall, but the blocks are not: no blockwise trace/inverse.
    A, A64 = put(backend, dtype, rng.normal(size=(2, 3)))
    B, B64 = put(backend, dtype, rng.normal(size=(4, 3)))
    op = BlockDiagonalLinearOperator([A, B])
    return Case(op, scipy.linalg.block_diag(A64, B64), {"frobenius_norm"})


@register_case("kronecker2_spd")
def _kronecker2_spd(backend, dtype, rng):
    # Plain arrays (not declared symmetric): the damped inverse checks symmetry itself.
    A, A64 = put(backend, dtype, spd(rng, 3))
    B, B64 = put(backend, dtype, spd(rng, 2))
    return Case(KroneckerLinearOperator(A, B), np.kron(A64, B64), ALL_QUERIES)


@register_case("kronecker3_spd_mixed")
def _kronecker3_spd_mixed(backend, dtype, rng):
    A, A64 = put(backend, dtype, spd(rng, 2))
    d, d64 = put(backend, dtype, positive(rng, 3))
    lam, lam64 = put(backend, dtype, positive(rng, 2))
    Q, Q64 = put(backend, dtype, orthonormal(rng, 2, 2))
    op = KroneckerLinearOperator(
        DenseLinearOperator(A, symmetric=True),
        DiagonalLinearOperator(d),
        EighLinearOperator(lam, Q),
    )
    ref = np.kron(np.kron(A64, np.diag(d64)), Q64 @ np.diag(lam64) @ Q64.T)
    return Case(op, ref, ALL_QUERIES)


@register_case("kronecker2_nonsymmetric")
def _kronecker2_nonsymmetric(backend, dtype, rng):
    A, A64 = put(backend, dtype, dominant(rng, 3))
    B, B64 = put(backend, dtype, dominant(rng, 2))
    supports = {"inverse", "trace", "diagonal", "logdet", "frobenius_norm"}
    return Case(KroneckerLinearOperator(A, B), np.kron(A64, B64), supports)


@register_case("kronecker2_rectangular")
def _kronecker2_rectangular(backend, dtype, rng):
    A, A64 = put(backend, dtype, rng.normal(size=(2, 3)))
    B, B64 = put(backend, dtype, rng.normal(size=(2, 2)))
    return Case(KroneckerLinearOperator(A, B), np.kron(A64, B64), {"frobenius_norm"})


@register_case("kronecker3_square_of_rectangular_factors")
def _kronecker3_rect(backend, dtype, rng):
    A, A64 = put(backend, dtype, rng.normal(size=(2, 3)))
    B, B64 = put(backend, dtype, rng.normal(size=(3, 2)))
    C, C64 = put(backend, dtype, rng.normal(size=(2, 2)))
    ref = np.kron(np.kron(A64, B64), C64)
    return Case(KroneckerLinearOperator(A, B, C), ref, {"frobenius_norm"})


@register_case("kronecker_eigh")
def _kronecker_eigh(backend, dtype, rng):
    lam, lam64 = put(backend, dtype, positive(rng, 6))
    Q1, Q1_64 = put(backend, dtype, orthonormal(rng, 2, 2))
    Q2, Q2_64 = put(backend, dtype, orthonormal(rng, 3, 3))
    Q64 = np.kron(Q1_64, Q2_64)
    op = KroneckerEighLinearOperator(lam, [Q1, Q2])
    return Case(op, Q64 @ np.diag(lam64) @ Q64.T, ALL_QUERIES)


@register_case("eigh_full_rank")
def _eigh_full_rank(backend, dtype, rng):
    lam, lam64 = put(backend, dtype, positive(rng, N))
    Q, Q64 = put(backend, dtype, orthonormal(rng, N, N))
    return Case(EighLinearOperator(lam, Q), Q64 @ np.diag(lam64) @ Q64.T, ALL_QUERIES)


@register_case("eigh_low_rank")
def _eigh_low_rank(backend, dtype, rng):
    lam, lam64 = put(backend, dtype, positive(rng, 3))
    Q, Q64 = put(backend, dtype, orthonormal(rng, N, 3))
    supports = {"damped_inverse", "trace", "diagonal", "damped_logdet", "frobenius_norm"}
    raises = {"inverse": FactorizationError, "logdet": FactorizationError}
    return Case(EighLinearOperator(lam, Q), Q64 @ np.diag(lam64) @ Q64.T, supports, raises)


@register_case("diagonal_plus_low_rank")
def _diagonal_plus_low_rank(backend, dtype, rng):
    d, d64 = put(backend, dtype, positive(rng, N))
    s, s64 = put(backend, dtype, positive(rng, 3))
    U, U64 = put(backend, dtype, rng.normal(size=(N, 3)))
    supports = {
        "inverse",
        "damped_inverse",
        "trace",
        "diagonal",
        "logdet",
        "damped_logdet",
        "frobenius_norm",
    }
    ref = np.diag(d64) + U64 @ np.diag(s64) @ U64.T
    return Case(DiagonalPlusLowRankLinearOperator(d, s, U), ref, supports, {})


@register_case("callable")
def _callable(backend, dtype, rng):
    # A generic operator: only products, every exact query must refuse.
    A, A64 = put(backend, dtype, rng.normal(size=(N, N)))
    xp = backend.xp
    op = CallableLinearOperator(
        (N, N),
        matmat=lambda X: A @ X,
        rmatmat=lambda X: xp.matrix_transpose(A) @ X,
        dtype=backend.dtype(dtype),
        xp=xp,
        device=backend.device,
    )
    return Case(op, A64, set())


# -- cases: algebra -------------------------------------------------------------------


@register_case("scaled_kronecker")
def _scaled(backend, dtype, rng):
    case = _kronecker2_spd(backend, dtype, rng)
    return Case(2.5 * case.op, 2.5 * case.ref, ALL_QUERIES)


@register_case("scaled_right")
def _scaled_right(backend, dtype, rng):
    case = _dense_square(backend, dtype, rng)
    return Case(case.op * 0.75, 0.75 * case.ref, ALL_QUERIES)


@register_case("unary_minus")
def _unary_minus(backend, dtype, rng):
    case = _dense_square(backend, dtype, rng)
    supports = {"inverse", "damped_inverse", "trace", "diagonal", "frobenius_norm"}
    return Case(-case.op, -case.ref, supports)


@register_case("division")
def _division(backend, dtype, rng):
    case = _block_diagonal_mixed(backend, dtype, rng)
    return Case(case.op / 2.0, case.ref / 2.0, ALL_QUERIES)


@register_case("sum")
def _sum(backend, dtype, rng):
    A = _dense_square(backend, dtype, rng)
    C = _eigh_full_rank(backend, dtype, rng)
    d, d64 = put(backend, dtype, positive(rng, N))
    op = A.op + DiagonalLinearOperator(d) + C.op
    return Case(op, A.ref + np.diag(d64) + C.ref, {"trace", "diagonal"})


@register_case("difference")
def _difference(backend, dtype, rng):
    A = _dense_symmetric(backend, dtype, rng)
    eye = IdentityLinearOperator(
        N, xp=backend.xp, dtype=backend.dtype(dtype), device=backend.device
    )
    return Case(A.op - 0.25 * eye, A.ref - 0.25 * np.eye(N), {"trace", "diagonal"})


@register_case("product_square")
def _product_square(backend, dtype, rng):
    A = _dense_square(backend, dtype, rng)
    d, d64 = put(backend, dtype, positive(rng, N))
    op = A.op @ DiagonalLinearOperator(d)
    return Case(op, A.ref @ np.diag(d64), {"inverse", "logdet"})


@register_case("product_rectangular")
def _product_rectangular(backend, dtype, rng):
    A, A64 = put(backend, dtype, rng.normal(size=(4, N)))
    B, B64 = put(backend, dtype, rng.normal(size=(2, 2)))
    C, C64 = put(backend, dtype, rng.normal(size=(3, 3)))
    op = DenseLinearOperator(A) @ KroneckerLinearOperator(B, C)
    return Case(op, A64 @ np.kron(B64, C64), set())


@register_case("adjoint_lazy")
def _adjoint_lazy(backend, dtype, rng):
    A = _dense_square(backend, dtype, rng)
    return Case(AdjointLinearOperator(A.op), A.ref.T, ALL_QUERIES)


@register_case("adjoint_kronecker_rectangular")
def _adjoint_kronecker(backend, dtype, rng):
    K = _kronecker2_rectangular(backend, dtype, rng)
    return Case(K.op.T, K.ref.T, {"frobenius_norm"})


@register_case("adjoint_block_diagonal")
def _adjoint_block(backend, dtype, rng):
    B = _block_diagonal_mixed(backend, dtype, rng)
    return Case(B.op.adjoint(), B.ref.T, ALL_QUERIES)


@register_case("damped_kronecker")
def _damped_kronecker(backend, dtype, rng):
    K = _kronecker3_spd_mixed(backend, dtype, rng)
    n = K.ref.shape[0]
    return Case(K.op.damped(0.7), K.ref + 0.7 * np.eye(n), ALL_QUERIES)


@register_case("damped_low_rank")
def _damped_low_rank(backend, dtype, rng):
    E = _eigh_low_rank(backend, dtype, rng)
    n = E.ref.shape[0]
    return Case(E.op.damped(0.3), E.ref + 0.3 * np.eye(n), ALL_QUERIES)


@register_case("inverse_of_damped_low_rank")
def _inverse_of_damped_low_rank(backend, dtype, rng):
    E = _eigh_low_rank(backend, dtype, rng)
    n = E.ref.shape[0]
    return Case(E.op.inverse(damping=0.3), np.linalg.inv(E.ref + 0.3 * np.eye(n)), ALL_QUERIES)


@register_case("inverse_of_damped_kronecker")
def _inverse_of_damped_kronecker(backend, dtype, rng):
    K = _kronecker2_spd(backend, dtype, rng)
    n = K.ref.shape[0]
    return Case(K.op.inverse(damping=0.2), np.linalg.inv(K.ref + 0.2 * np.eye(n)), ALL_QUERIES)


# -- Curvature operators (later issues) -------------------------------------------------
# Register further builders here with @register_case("name").


# -- the suite ---------------------------------------------------------------------------


def pytest_generate_tests(metafunc):
    if "case_name" in metafunc.fixturenames:
        metafunc.parametrize("case_name", list(CASES))


def build(case_name, backend, dtype):
    rng = np.random.default_rng(zlib.crc32(case_name.encode()))
    return CASES[case_name](backend, dtype, rng)


def assert_close(actual, expected, dtype, backend=None, scale=None):
    """Compare a backend array (or scalar) with a float64 reference at ``dtype`` precision."""
    rtol, atol = tolerances(dtype)
    actual = np.asarray(backend.to_numpy(actual) if backend is not None else actual, np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol + rtol * scale)


def assert_native(result, backend, op):
    """A result lives in the operator's namespace and dtype."""
    assert namespace_name(array_namespace(result)) == namespace_name(backend.xp)
    assert backend_dtype_name(result.dtype) == backend_dtype_name(op.dtype)


def test_products_and_adjoint(case_name, backend, dtype_name):
    """matvec, matmat, rmatvec, rmatmat, ``@`` from both sides, dot-product test,
    ``to_dense`` and the adjoint, against the dense reference."""
    case = build(case_name, backend, dtype_name)
    op, ref = case.op, case.ref
    m, n = ref.shape
    assert op.shape == (m, n)
    assert backend_dtype_name(op.dtype) == dtype_name
    rng = np.random.default_rng(1)
    x, x64 = put(backend, dtype_name, rng.normal(size=n))
    X, X64 = put(backend, dtype_name, rng.normal(size=(n, 3)))
    y, y64 = put(backend, dtype_name, rng.normal(size=m))
    Y, Y64 = put(backend, dtype_name, rng.normal(size=(m, 3)))

    AX = op.matmat(X)
    ATY = op.rmatmat(Y)
    checks = [
        (op.matvec(x), ref @ x64),
        (AX, ref @ X64),
        (op @ x, ref @ x64),
        (op @ X, ref @ X64),
        (op.rmatvec(y), ref.T @ y64),
        (ATY, ref.T @ Y64),
        (op.to_dense(), ref),
        (op.adjoint().to_dense(), ref.T),
        (op.T @ Y, ref.T @ Y64),
        (op.H.to_dense(), ref.T),
    ]
    if backend.name == "array_api_strict":
        # array-api-strict arrays raise TypeError for a foreign right operand of '@'
        # instead of deferring to its __rmatmul__; users call A.rmatvec there.
        with pytest.raises(TypeError):
            y @ op
    else:
        checks += [(y @ op, y64 @ ref), (backend.xp.matrix_transpose(Y) @ op, Y64.T @ ref)]
    for result, expected in checks:
        assert_native(result, backend, op)
        assert_close(result, expected, dtype_name, backend)
    assert op.adjoint().shape == (n, m)

    # Dot-product test y . (A x) = (A^T y) . x, column by column, on the operator alone.
    AX, ATY = backend.to_numpy(AX).astype(np.float64), backend.to_numpy(ATY).astype(np.float64)
    lhs, rhs = np.sum(Y64 * AX, axis=0), np.sum(ATY * X64, axis=0)
    scale = np.linalg.norm(ref, 2) * np.linalg.norm(X64, axis=0) * np.linalg.norm(Y64, axis=0)
    rtol, _ = tolerances(dtype_name)
    assert np.all(np.abs(lhs - rhs) <= 10 * rtol * scale)
    if op.is_symmetric:
        np.testing.assert_allclose(ref, ref.T, atol=1e-12 * np.max(np.abs(ref)))


def _reference(query, ref, d):
    n = ref.shape[0]
    shifted = ref + d * np.eye(n) if query.startswith("damped") else ref
    if query in ("inverse", "damped_inverse"):
        return np.linalg.inv(shifted)
    if query in ("logdet", "damped_logdet"):
        sign, value = np.linalg.slogdet(shifted)
        assert sign > 0, "a case that supports logdet needs a positive determinant"
        return value
    if query == "trace":
        return np.trace(ref)
    if query == "diagonal":
        return np.diag(ref).copy()
    return np.linalg.norm(ref, "fro")


def _call(op, query, d):
    """Run a query; damped queries both directly and through ``damped(d)``."""
    if query == "inverse":
        return [op.inverse()]
    if query == "damped_inverse":
        return [op.inverse(damping=d), op.damped(d).inverse()]
    if query == "logdet":
        return [op.logdet()]
    if query == "damped_logdet":
        return [op._logdet(d), op.damped(d).logdet()]
    return [getattr(op, query)()]


def _check_query(case, query, backend, dtype_name):
    op, ref, d = case.op, case.ref, case.damping
    if query not in case.supports:
        expected_error = case.raises.get(query, NotImplementedError)
        with pytest.raises(expected_error):
            _call(op, query, d)
        return
    expected = _reference(query, ref, d)
    rng = np.random.default_rng(3)
    X, X64 = put(backend, dtype_name, rng.normal(size=(ref.shape[1], 3)))
    for result in _call(op, query, d):
        if isinstance(result, LinearOperator):
            assert result.shape == ref.shape
            assert_close(result.to_dense(), expected, dtype_name, backend)
            applied = result @ X
            assert_native(applied, backend, op)
            assert_close(applied, expected @ X64, dtype_name, backend)
        else:
            if hasattr(result, "dtype"):
                assert_native(result, backend, op)
            scale = max(1.0, float(np.max(np.abs(expected))))
            assert_close(result, expected, dtype_name, backend, scale=scale)


def test_queries(case_name, backend, dtype_name):
    """inverse (with and without damping), trace, diagonal, logdet, frobenius_norm
    against NumPy on the reference, or the declared exception."""
    case = build(case_name, backend, dtype_name)
    square = case.ref.shape[0] == case.ref.shape[1]
    for query in QUERIES:
        if query in SQUARE_ONLY and not square:
            continue
        try:
            _check_query(case, query, backend, dtype_name)
        except BaseException as err:
            raise AssertionError(f"query {query!r} failed: {err}") from err
