"""Structure tags ``is_symmetric`` / ``is_psd``: declared, derived by the algebra and the
structured operators, never claimed when the structure does not imply them.

(That a tag that *is* claimed holds for the dense reference is checked for every case
of the operator suite by :func:`curvlinops.testing.check_tags`.)
"""

from __future__ import annotations

import numpy as np
import pytest

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
    aslinearoperator,
)


def spd(n, seed=0):
    G = np.random.default_rng(seed).standard_normal((n, n))
    return G @ G.T + np.eye(n)


def tags(op):
    return op.is_symmetric, op.is_psd


def test_declarations():
    A = spd(3)
    assert tags(aslinearoperator(A)) == (False, False)
    assert tags(aslinearoperator(A, symmetric=True)) == (True, False)
    assert tags(aslinearoperator(A, psd=True)) == (True, True)
    assert tags(aslinearoperator(A, symmetric=True, psd=True)) == (True, True)
    assert tags(DenseLinearOperator(A, psd=True)) == (True, True)
    import array_api_compat.numpy as xp

    op = CallableLinearOperator((3, 3), matmat=lambda X: A @ X, dtype=xp.float64, xp=xp, psd=True)
    assert tags(op) == (True, True)
    with pytest.raises(ValueError, match="contradiction"):
        DenseLinearOperator(A, symmetric=False, psd=True)
    with pytest.raises(ValueError, match="square"):
        DenseLinearOperator(np.ones((2, 3)), psd=True)


def test_structured_operators_derive_psd_from_their_data():
    import array_api_compat.numpy as xp

    assert tags(IdentityLinearOperator(3, xp=xp, dtype=xp.float64)) == (True, True)
    assert tags(DiagonalLinearOperator(np.array([1.0, 0.0]))) == (True, True)
    assert tags(DiagonalLinearOperator(np.array([1.0, -1e-30]))) == (True, False)
    Q = np.linalg.qr(np.random.default_rng(1).standard_normal((4, 4)))[0]
    assert EighLinearOperator(np.array([2.0, 0.0]), Q[:, :2]).is_psd
    assert not EighLinearOperator(np.array([2.0, -1.0]), Q[:, :2]).is_psd
    # (A + d I)^{-1} is PSD for a PSD A and d > 0, not for an indefinite A (eigenvalue
    # 1 / (-1 + 0.5) < 0)
    assert EighLinearOperator(np.array([2.0, 0.0]), Q[:, :2]).inverse(0.5).is_psd
    indefinite = EighLinearOperator(np.array([2.0, -1.0]), Q[:, :2]).inverse(0.5)
    assert not indefinite.is_psd and np.linalg.eigvalsh(indefinite.to_dense()).min() < 0
    assert KroneckerEighLinearOperator(np.arange(4.0), [Q[:2, :2], np.eye(2)]).is_psd
    assert not KroneckerEighLinearOperator(np.arange(4.0) - 1, [Q[:2, :2], np.eye(2)]).is_psd
    U = np.ones((3, 1))
    assert DiagonalPlusLowRankLinearOperator(np.ones(3), np.ones(1), U).is_psd
    assert not DiagonalPlusLowRankLinearOperator(-np.ones(3), np.ones(1), U).is_psd
    # zeros are allowed on both sides (a PSD diagonal plus a PSD low-rank term)
    U2 = np.ones((3, 2))
    assert DiagonalPlusLowRankLinearOperator(np.zeros(3), np.array([1.0, 0.0]), U2).is_psd
    assert not DiagonalPlusLowRankLinearOperator(np.ones(3), np.array([1.0, -1e-30]), U2).is_psd
    assert DiagonalLinearOperator(np.array([1.0, -1.0]), psd=True).is_psd  # declared: trusted


def test_composites():
    P = DenseLinearOperator(spd(2), psd=True)
    S = DenseLinearOperator(np.array([[0.0, 1.0], [1.0, 0.0]]), symmetric=True)  # indefinite
    D = DiagonalLinearOperator(np.array([1.0, 2.0, 3.0]))
    assert tags(KroneckerLinearOperator(P, D)) == (True, True)
    assert tags(KroneckerLinearOperator(P, S)) == (True, False)
    assert tags(KroneckerLinearOperator(spd(2), spd(3))) == (False, False)  # plain arrays
    assert tags(KroneckerLinearOperator(spd(2), spd(3), psd=True)) == (True, True)
    assert tags(BlockDiagonalLinearOperator([P, D])) == (True, True)
    assert tags(BlockDiagonalLinearOperator([P, S])) == (True, False)
    assert tags(BlockDiagonalLinearOperator([spd(2)], psd=True)) == (True, True)
    assert tags(2.0 * P) == (True, True)
    assert tags(-P) == (True, False)
    assert tags(0.0 * P) == (True, True)
    assert tags(P + P) == (True, True)
    assert tags(P + S) == (True, False)
    assert tags(P - P) == (True, False)
    assert tags(P.damped(0.5)) == (True, True)
    assert tags(P.damped(-0.5)) == (True, False)
    assert tags(S.damped(3.0)) == (True, False)  # PD in fact, but not derivable
    assert tags(AdjointLinearOperator(P)) == (True, True)


def test_gram_products():
    B = DenseLinearOperator(np.random.default_rng(2).standard_normal((3, 4)))
    P = DenseLinearOperator(spd(3), psd=True)
    S = DenseLinearOperator(np.array([[0.0, 1.0, 0], [1.0, 0, 0], [0, 0, 1]]), symmetric=True)
    assert tags(B.T @ B) == (True, True)
    assert tags(B.H @ B) == (True, True)
    assert tags(B @ B.T) == (True, True)
    assert tags(AdjointLinearOperator(B) @ B) == (True, True)
    assert tags(B.T @ P @ B) == (True, True)
    assert tags(B.T @ S @ B) == (True, False)
    assert tags(S @ S) == (True, True)  # S^T S for symmetric S
    assert tags(P @ P.damped(1.0)) == (False, False)  # not a Gram structure


def test_inverses_keep_psd():
    P = DenseLinearOperator(spd(3), psd=True)
    assert P.inverse().is_psd and P.inverse(damping=0.1).is_psd
    assert not DenseLinearOperator(spd(3), symmetric=True).inverse().is_psd
    Q = np.linalg.qr(np.random.default_rng(3).standard_normal((4, 4)))[0][:, :2]
    E = EighLinearOperator(np.array([2.0, 1.0]), Q)
    assert E.inverse(damping=0.5).is_psd
    K = KroneckerLinearOperator(P, DiagonalLinearOperator(np.ones(2)))
    assert K.inverse(damping=0.2).is_psd and K.inverse().is_psd
    W = DiagonalPlusLowRankLinearOperator(np.ones(3), np.ones(1), np.ones((3, 1)))
    assert W.inverse().is_psd


def test_adjoint_mark_does_not_travel_to_copies():
    """``A.T`` remembers that it is ``A``'s adjoint; operators built by copying its
    attributes (its adjoint, its inverse) are not, so products with them are not Gram
    products (regression: ``A.T.adjoint() @ A`` = ``A @ A`` was tagged PSD)."""
    from curvlinops import ParameterLayoutLinearOperator

    rng = np.random.default_rng(3)
    M = rng.standard_normal((6, 6))
    A = ParameterLayoutLinearOperator(DenseLinearOperator(M), [[(0, (2, 2)), (4, (2, 1))]])
    AT = A.T
    assert tags(AT @ A) == (True, True)  # the genuine Gram product
    square = AT.adjoint() @ A  # A @ A
    dense = square.to_dense()
    assert not np.allclose(dense, dense.T)
    assert tags(square) == (False, False)
    mixed = A @ AT.inverse()  # A A^{-T}
    dense = mixed.to_dense()
    assert not np.allclose(dense, dense.T)
    assert tags(mixed) == (False, False)


@pytest.mark.parametrize("damping", [2.0, -0.5])
def test_inverse_of_an_operator_scaled_by_zero(damping):
    """``(0 A + d I)^{-1} = I / d`` through the whole operator suite (products, tags,
    exact queries against the dense ``I / d``)."""
    from curvlinops.testing import QUERIES, check_operator

    A = aslinearoperator(np.diag([1.0, -2.0, 3.0, 4.0]), symmetric=True)
    inverse = (0 * A).inverse(damping)
    ref = np.eye(4) / damping
    assert inverse.is_psd == (damping > 0)
    check_operator(inverse, ref, supports=QUERIES, damping=1.0)  # -2 I + I: invertible
    with pytest.raises(FactorizationError, match="zero matrix"):
        inverse.inverse(-1.0 / damping)
    np.testing.assert_allclose((0 * A).damped(damping).inverse().to_dense(), ref)


def test_a_copy_of_an_adjoint_is_not_known_to_be_the_adjoint():
    import copy

    M = np.random.default_rng(5).standard_normal((3, 3))
    A = DenseLinearOperator(M)
    AT = A.T
    assert tags(AT @ A) == (True, True)
    clone = copy.copy(AT)
    np.testing.assert_allclose(clone.to_dense(), M.T)
    assert tags(clone @ A) == (False, False)  # only AT itself carries the mark
    assert tags(AT @ A) == (True, True)


def test_nested_sums_and_products_are_flat():
    """A sum of sums (a product of products) keeps one flat tuple of terms (factors), in
    order, so that the tags are derived from all terms at once and the algebra's depth
    does not grow with each ``+``."""
    P = DenseLinearOperator(spd(3), psd=True)
    S = DenseLinearOperator(np.diag([1.0, -1.0, 2.0]), symmetric=True)
    D = DiagonalLinearOperator(np.ones(3))
    for total in ((P + S) + D, P + (S + D), (P + S) + (D + P)):
        assert all(type(op) is not type(total) for op in total.operators)
    assert ((P + S) + D).operators == (P, S, D)
    assert (P + (S + D)).operators == (P, S, D)
    assert ((P + S) + (D + P)).operators == (P, S, D, P)
    np.testing.assert_allclose(((P + S) + (D + P)).to_dense(), 2 * spd(3) + S.A + np.eye(3))
    B = DenseLinearOperator(np.random.default_rng(4).standard_normal((3, 3)))
    BT = B.T
    nested = BT @ (P @ B)  # B^T (P B): a Gram product only once flattened
    assert nested.operators == (BT, P, B)
    assert tags(nested) == (True, True)
