"""The one rule for singular matrices (FactorizationError's docstring), on every operator.

A matrix cannot be inverted when its condition number exceeds ``0.01 / (sqrt(n) eps)``
for its spectrum ``v`` (damping included), ``n`` the largest factorized dimension (the
rule of ``curvlinops.conditioning``). Each structured operator is
built with an eigenvalue (or singular value) of ``1e-17`` relative to 1: its inverse and
log-determinant must raise FactorizationError ("add damping") instead of returning
entries of size 1e17, and with damping the exact inverse must match NumPy. References:
``np.linalg.inv`` of dense matrices assembled here with ``np.kron`` and
``scipy.linalg.block_diag``.
"""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest
import scipy.linalg

from curvlinops import (
    BlockDiagonalLinearOperator,
    DenseLinearOperator,
    DiagonalLinearOperator,
    EighLinearOperator,
    FactorizationError,
    KroneckerEighLinearOperator,
    KroneckerLinearOperator,
    ParameterLayoutLinearOperator,
)
from curvlinops._backend import check_invertible_spectrum
from curvlinops._backend.conditioning import DEFAULT_TOLERANCE

EPS = np.finfo(np.float64).eps
TINY = 1e-17


def orthogonal(n, seed):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))[0]


def with_spectrum(values, seed=0):
    Q = orthogonal(len(values), seed)
    M = Q @ np.diag(values) @ Q.T
    return 0.5 * (M + M.T)


def spd(n, seed):
    return with_spectrum(np.linspace(0.5, 2.0, n), seed)


def _cases():
    """(name, operator, dense reference): each has an eigenvalue 1e-17 relative to 1."""
    tiny3 = [1.0, TINY, 0.5]
    S = with_spectrum(tiny3, 1)
    U, V = orthogonal(3, 2), orthogonal(3, 3)
    G = U @ np.diag(tiny3) @ V.T  # not symmetric, a singular value of 1e-17
    K_ref = np.kron(S, spd(2, 4))
    Q1, Q2 = orthogonal(2, 5), orthogonal(3, 6)
    lam = np.array([1.0, 0.3, 0.7, TINY, 0.9, 0.4])
    Q = np.kron(Q1, Q2)
    yield "diagonal", DiagonalLinearOperator(np.array(tiny3)), np.diag(tiny3)
    yield "dense_symmetric", DenseLinearOperator(S, symmetric=True), S
    yield "dense_undeclared", DenseLinearOperator(S), S
    yield "dense_nonsymmetric", DenseLinearOperator(G), G
    Q7 = orthogonal(3, 7)
    yield "eigh", EighLinearOperator(np.array(tiny3), Q7), Q7 @ np.diag(tiny3) @ Q7.T
    yield "kronecker", KroneckerLinearOperator(S, spd(2, 4)), K_ref
    yield (
        "kronecker_diagonal_factor",
        KroneckerLinearOperator(DiagonalLinearOperator(np.array([1.0, TINY])), spd(3, 8)),
        np.kron(np.diag([1.0, TINY]), spd(3, 8)),
    )
    yield (
        "kronecker_nonsymmetric",
        KroneckerLinearOperator(G, np.eye(2) * 2.0 + 0.1 * np.ones((2, 2))),
        None,
    )
    yield "kronecker_eigh", KroneckerEighLinearOperator(lam, [Q1, Q2]), Q @ np.diag(lam) @ Q.T
    block = BlockDiagonalLinearOperator([spd(2, 9), DenseLinearOperator(S, symmetric=True)])
    block_ref = scipy.linalg.block_diag(spd(2, 9), S)
    yield "block_diagonal", block, block_ref
    layout = [[(2, 3)], [(0, 2)]]  # P x = [x[2:5], x[0:2]]
    perm = np.array([2, 3, 4, 0, 1])
    P = np.eye(5)[perm]
    yield "layout", ParameterLayoutLinearOperator(block, layout), P.T @ block_ref @ P
    yield "scaled", 3.0 * KroneckerLinearOperator(S, spd(2, 4)), 3.0 * K_ref


CASES = {name: (op, ref) for name, op, ref in _cases()}


@pytest.mark.parametrize("name", list(CASES))
def test_relative_eigenvalue_1e_17_raises_and_damping_fixes_it(name):
    op, ref = CASES[name]
    with pytest.raises(FactorizationError, match=r"(?s)singular.*[Aa]dd damping"):
        op.inverse()
    with pytest.raises(FactorizationError, match=r"(?s)singular.*damping"):
        op.logdet()
    if name == "kronecker_nonsymmetric":
        return  # no damped inverse for non-symmetric Kronecker factors
    expected = np.linalg.inv(ref + 1e-3 * np.eye(len(ref)))
    actual = op.inverse(damping=1e-3).to_dense()
    np.testing.assert_allclose(actual, expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())


def test_the_threshold_is_the_conditioning_limit():
    """cond > tolerance / (sqrt(n) eps) is refused (curvlinops.conditioning), cond below passes."""
    n = 4
    limit = DEFAULT_TOLERANCE / (np.sqrt(n) * EPS)
    within = np.array([1.0, 1.01 / limit, 0.5, -0.25])
    beyond = np.array([1.0, 0.99 / limit, 0.5, -0.25])
    check_invertible_spectrum(within, xp, size=n, what="matrix")
    with pytest.raises(FactorizationError, match="ill-conditioned"):
        check_invertible_spectrum(beyond, xp, size=n, what="matrix")
    with pytest.raises(FactorizationError, match="singular"):  # the zero matrix
        check_invertible_spectrum(np.zeros(3), xp, size=3, what="matrix")
    with pytest.raises(FactorizationError, match="NaN or Inf"):
        check_invertible_spectrum(np.array([1.0, np.nan]), xp, size=2, what="matrix")
    # relative, not absolute: a well-conditioned matrix of tiny scale is invertible
    small = DiagonalLinearOperator(np.array([1e-200, 3e-200]))
    np.testing.assert_allclose(small.inverse().diagonal(), [1e200, 1e200 / 3])
    # each block of a block-diagonal operator is judged on its own scale
    blocks = BlockDiagonalLinearOperator([np.eye(2) * 1e-30, np.eye(2)])
    np.testing.assert_allclose(blocks.inverse().diagonal(), [1e30, 1e30, 1.0, 1.0])


def test_kronecker_threshold_uses_the_largest_factor_and_the_dtype():
    """cond 1e10: invertible in float64, beyond float32 (its limit is 4.8e5 for n = 3)."""
    A = with_spectrum([1.0, 1e-10, 0.5], 10)
    B = spd(2, 11)
    ref = np.kron(A, B)
    inverse = KroneckerLinearOperator(A, B).inverse().to_dense()
    np.testing.assert_allclose(inverse @ ref, np.eye(6), atol=1e-5)
    K32 = KroneckerLinearOperator(A.astype(np.float32), B.astype(np.float32))
    with pytest.raises(FactorizationError, match="singular to working precision in float32"):
        K32.inverse()
    K32.inverse(damping=1e-3)  # damping makes it invertible again


def test_damped_singular_product_names_the_damping():
    K = KroneckerLinearOperator(np.diag([1.0, 0.0]), np.eye(2))
    with pytest.raises(FactorizationError, match=r"plus -1.0 I is singular"):
        K.inverse(damping=-1.0)


def test_one_numerical_symmetry_test():
    """Solvers (a dense array handed to cg) and Kronecker factors not declared symmetric
    use the same rounding threshold, ``100 eps max|A|``."""
    from curvlinops._backend import is_numerically_symmetric
    from curvlinops.solvers._validation import as_operator

    S = with_spectrum([1.0, 0.5, 2.0], 12)
    for relative, expected in ((10 * EPS, True), (1e3 * EPS, False)):
        A = S.copy()
        A[0, 1] += relative * np.abs(S).max()
        assert is_numerically_symmetric(A, xp) is expected
        assert as_operator(A, "cg").is_symmetric is expected
        K = KroneckerLinearOperator(DenseLinearOperator(A), np.eye(2))
        if expected:  # a symmetric factor: the damped inverse is the exact one
            ref = np.linalg.inv(np.kron(A, np.eye(2)) + 0.1 * np.eye(6))
            np.testing.assert_allclose(K.inverse(0.1).to_dense(), ref, rtol=1e-10, atol=1e-12)
        else:
            with pytest.raises(NotImplementedError, match="not symmetric"):
                K.inverse(0.1)
    assert is_numerically_symmetric(np.zeros((0, 0)), xp)
