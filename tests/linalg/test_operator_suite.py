"""One shared test suite that every linear operator of curvlinops goes through.

This file is the **registry** of the library's own cases; the checks themselves are
the public :mod:`curvlinops.testing` (which users run on their own operators). Each
*case* in :data:`CASES` builds an operator together with a dense reference matrix in
NumPy float64. The reference is built **independently** from the arrays that define
the operator (``np.kron``, ``scipy.linalg.block_diag``, ``np.diag``,
``Q @ diag(lam) @ Q.T``, ...), never from the operator. Every case then runs, on every
backend and in float32 and float64, through the same checks: products (``matvec``,
``matmat``, ``rmatvec``, ``rmatmat``, ``@`` from both sides), the dot-product test,
``to_dense``, the adjoint (:func:`curvlinops.testing.check_products`), the structure
tags ``is_symmetric``/``is_psd`` (:func:`~curvlinops.testing.check_tags`), and the
exact queries (``inverse`` with and without damping, ``trace``, ``diagonal``,
``logdet`` with and without damping, ``frobenius_norm``;
:func:`~curvlinops.testing.check_queries`). A query an operator does not support must
raise :class:`NotImplementedError` (or the exception the case declares), never return
a wrong value.

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
            reference=A64,                        # independent dense reference (float64)
            supports={"trace", "diagonal"},       # queries to compare with the reference
            raises={"inverse": FactorizationError},  # other expected exceptions
        )

``Case`` is :class:`curvlinops.testing.OperatorCase`. ``backend`` is the fixture from
``tests/conftest.py``, ``dtype`` a name (``"float32"``/``"float64"``) and ``rng`` a
seeded ``numpy.random.Generator``. Queries neither in ``supports`` nor in ``raises``
must raise :class:`NotImplementedError`. Square-only queries are skipped for
non-square cases. The test functions are parametrized over the registry at collection
time (``pytest_generate_tests``), so a case registered anywhere in this module is
picked up; every ``test_*(case_name, backend, dtype_name)`` function here is a check
that other suites (``tests/curvature/test_kfac_operator_suite.py``) reuse by name.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable

import numpy as np
import scipy.linalg

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
)
from curvlinops._backend import dtype_name as backend_dtype_name
from curvlinops.testing import (
    QUERIES,
    OperatorCase as Case,
    check_products,
    check_queries,
    check_tags,
)

ALL_QUERIES = frozenset(QUERIES)

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
    return Case(2.5 * case.op, 2.5 * case.reference, ALL_QUERIES)


@register_case("scaled_right")
def _scaled_right(backend, dtype, rng):
    case = _dense_square(backend, dtype, rng)
    return Case(case.op * 0.75, 0.75 * case.reference, ALL_QUERIES)


@register_case("unary_minus")
def _unary_minus(backend, dtype, rng):
    case = _dense_square(backend, dtype, rng)
    supports = {"inverse", "damped_inverse", "trace", "diagonal", "frobenius_norm"}
    # det(-A + d I) = det(A - d I) for even N: the logdets exist where that is positive
    # (the default damping of the suite is 0.5); for odd N they refuse
    raises = {}
    for query, shift in (("logdet", 0.0), ("damped_logdet", 0.5)):
        sign = np.linalg.slogdet(-case.reference + shift * np.eye(N))[0]
        if N % 2 == 0 and sign > 0:
            supports.add(query)
        elif N % 2 == 0:
            raises[query] = ValueError  # a negative determinant
    return Case(-case.op, -case.reference, supports, raises)


@register_case("division")
def _division(backend, dtype, rng):
    case = _block_diagonal_mixed(backend, dtype, rng)
    return Case(case.op / 2.0, case.reference / 2.0, ALL_QUERIES)


@register_case("sum")
def _sum(backend, dtype, rng):
    A = _dense_square(backend, dtype, rng)
    C = _eigh_full_rank(backend, dtype, rng)
    d, d64 = put(backend, dtype, positive(rng, N))
    op = A.op + DiagonalLinearOperator(d) + C.op
    return Case(op, A.reference + np.diag(d64) + C.reference, {"trace", "diagonal"})


@register_case("difference")
def _difference(backend, dtype, rng):
    A = _dense_symmetric(backend, dtype, rng)
    eye = IdentityLinearOperator(
        N, xp=backend.xp, dtype=backend.dtype(dtype), device=backend.device
    )
    return Case(A.op - 0.25 * eye, A.reference - 0.25 * np.eye(N), {"trace", "diagonal"})


@register_case("product_square")
def _product_square(backend, dtype, rng):
    A = _dense_square(backend, dtype, rng)
    d, d64 = put(backend, dtype, positive(rng, N))
    op = A.op @ DiagonalLinearOperator(d)
    return Case(op, A.reference @ np.diag(d64), {"inverse", "logdet"})


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
    return Case(AdjointLinearOperator(A.op), A.reference.T, ALL_QUERIES)


@register_case("adjoint_kronecker_rectangular")
def _adjoint_kronecker(backend, dtype, rng):
    K = _kronecker2_rectangular(backend, dtype, rng)
    return Case(K.op.T, K.reference.T, {"frobenius_norm"})


@register_case("adjoint_block_diagonal")
def _adjoint_block(backend, dtype, rng):
    B = _block_diagonal_mixed(backend, dtype, rng)
    return Case(B.op.adjoint(), B.reference.T, ALL_QUERIES)


@register_case("damped_kronecker")
def _damped_kronecker(backend, dtype, rng):
    K = _kronecker3_spd_mixed(backend, dtype, rng)
    n = K.reference.shape[0]
    return Case(K.op.damped(0.7), K.reference + 0.7 * np.eye(n), ALL_QUERIES)


@register_case("damped_low_rank")
def _damped_low_rank(backend, dtype, rng):
    E = _eigh_low_rank(backend, dtype, rng)
    n = E.reference.shape[0]
    return Case(E.op.damped(0.3), E.reference + 0.3 * np.eye(n), ALL_QUERIES)


@register_case("inverse_of_damped_low_rank")
def _inverse_of_damped_low_rank(backend, dtype, rng):
    E = _eigh_low_rank(backend, dtype, rng)
    n = E.reference.shape[0]
    return Case(
        E.op.inverse(damping=0.3), np.linalg.inv(E.reference + 0.3 * np.eye(n)), ALL_QUERIES
    )


@register_case("inverse_of_damped_kronecker")
def _inverse_of_damped_kronecker(backend, dtype, rng):
    K = _kronecker2_spd(backend, dtype, rng)
    n = K.reference.shape[0]
    return Case(
        K.op.inverse(damping=0.2), np.linalg.inv(K.reference + 0.2 * np.eye(n)), ALL_QUERIES
    )


# -- cases: structure tags (declared and derived) --------------------------------------


@register_case("dense_psd_declared")
def _dense_psd_declared(backend, dtype, rng):
    A, A64 = put(backend, dtype, spd(rng, N))
    op = DenseLinearOperator(A, psd=True)
    assert op.is_symmetric and op.is_psd
    return Case(op, A64, ALL_QUERIES)


@register_case("gram_product")
def _gram_product(backend, dtype, rng):
    # B^T B with B rectangular: derived symmetric PSD, no exact queries.
    B, B64 = put(backend, dtype, rng.normal(size=(4, N)))
    B_op = DenseLinearOperator(B)
    op = B_op.T @ B_op
    assert op.is_symmetric and op.is_psd
    return Case(op, B64.T @ B64, set())


@register_case("scaled_damped_psd_sum")
def _scaled_damped_psd_sum(backend, dtype, rng):
    # 0.5 * (K + diag(d)).damped(0.1) with K = A (x) diag(e), A declared PSD: every step
    # keeps the tag.
    A, A64 = put(backend, dtype, spd(rng, 2))
    e, e64 = put(backend, dtype, positive(rng, 3))
    K = KroneckerLinearOperator(DenseLinearOperator(A, psd=True), DiagonalLinearOperator(e))
    d, d64 = put(backend, dtype, positive(rng, N))
    op = 0.5 * (K + DiagonalLinearOperator(d)).damped(0.1)
    assert K.is_psd and op.is_psd
    ref = 0.5 * (np.kron(A64, np.diag(e64)) + np.diag(d64) + 0.1 * np.eye(N))
    return Case(op, ref, {"trace", "diagonal"})


# -- Curvature operators (later issues) -------------------------------------------------
# Register further builders here with @register_case("name").


# -- the suite ---------------------------------------------------------------------------


def pytest_generate_tests(metafunc):
    if "case_name" in metafunc.fixturenames:
        metafunc.parametrize("case_name", list(CASES))


def suite_checks() -> list[str]:
    """Names of the checks below, each ``check(case_name, backend, dtype_name)``: what a
    file that registers cases into its own copy of this module parametrizes over."""
    return sorted(
        name
        for name, fn in globals().items()
        if name.startswith("test_")
        and callable(fn)
        and list(inspect.signature(fn).parameters) == ["case_name", "backend", "dtype_name"]
    )


def build(case_name, backend, dtype):
    rng = np.random.default_rng(zlib.crc32(case_name.encode()))
    case = CASES[case_name](backend, dtype, rng)
    assert backend_dtype_name(case.op.dtype) == dtype
    return case


def test_products_and_adjoint(case_name, backend, dtype_name):
    """matvec, matmat, rmatvec, rmatmat, ``@`` from both sides, dot-product test,
    ``to_dense`` and the adjoint, against the dense reference."""
    case = build(case_name, backend, dtype_name)
    check_products(case.op, case.reference)


def test_tags(case_name, backend, dtype_name):
    """``is_symmetric`` and ``is_psd`` (declared or derived) hold for the reference."""
    case = build(case_name, backend, dtype_name)
    check_tags(case.op, case.reference)


def test_queries(case_name, backend, dtype_name):
    """inverse (with and without damping), trace, diagonal, logdet, frobenius_norm
    against NumPy on the reference, or the declared exception."""
    case = build(case_name, backend, dtype_name)
    check_queries(
        case.op, case.reference, supports=case.supports, raises=case.raises, damping=case.damping
    )
