"""The conditioning rule of every exact inverse (``curvlinops.conditioning``).

An inverse is refused when ``cond > tolerance / (sqrt(n) eps)`` (default tolerance
0.01) for the spectrum of the matrix it inverts (damping included), with a message
naming the matrix, its condition number and a damping that suffices;
``conditioning("warn")`` returns the same inverse with a
:class:`ConditioningWarning`. References: condition numbers from ``numpy.linalg.cond``
and ``eigvalsh`` of dense float64 matrices assembled here (``np.kron``,
``scipy.linalg.block_diag``), inverses from ``numpy.linalg.inv``, and the minimal
damping from the closed form ``(max - L min) / (L - 1)`` on NumPy's eigenvalues.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg

from curvlinops import (
    BlockDiagonalLinearOperator,
    ConditioningWarning,
    DenseLinearOperator,
    DiagonalLinearOperator,
    DiagonalPlusLowRankLinearOperator,
    EighLinearOperator,
    FactorizationError,
    IllConditionedError,
    KroneckerEighLinearOperator,
    KroneckerLinearOperator,
    ParameterLayoutLinearOperator,
    conditioning,
)
from curvlinops._backend.conditioning import DEFAULT_TOLERANCE

DTYPES = [np.float32, np.float64]


def orthogonal(n, seed):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))[0]


def with_spectrum(values, seed=0):
    Q = orthogonal(len(values), seed)
    M = Q @ np.diag(values) @ Q.T
    return 0.5 * (M + M.T)


def limit(dtype, n, tolerance=DEFAULT_TOLERANCE):
    return tolerance / (np.sqrt(n) * np.finfo(dtype).eps)


def minimal_damping(dense, lim, damping=0.0):
    """Smallest extra shift with cond(dense + s I) <= lim, from NumPy's eigenvalues."""
    w = np.linalg.eigvalsh(dense)
    return damping + max((w.max() - lim * w.min()) / (lim - 1.0), 0.0)


def _spectrum(n, cond, dtype):
    """Eigenvalues in [1 / cond, 1], exactly representable-ish in ``dtype``."""
    return np.geomspace(1.0 / cond, 1.0, n).astype(dtype).astype(np.float64)


def _cases(dtype, factor):
    """(name, operator, dense float64 reference, n) with cond = factor * limit."""
    n = 4
    cond = factor * limit(dtype, n)
    lam = _spectrum(n, cond, dtype)
    S = with_spectrum(lam, 1)
    U, V = orthogonal(n, 2), orthogonal(n, 3)
    G = U @ np.diag(lam) @ V.T
    Q = orthogonal(n, 4)
    Q1, Q2 = orthogonal(2, 5), orthogonal(2, 6)
    c = lambda a: np.asarray(a, dtype=dtype)  # noqa: E731
    yield "diagonal", DiagonalLinearOperator(c(lam)), np.diag(c(lam)).astype(float), n
    yield "dense_symmetric", DenseLinearOperator(c(S), symmetric=True), c(S).astype(float), n
    yield "dense_general", DenseLinearOperator(c(G)), c(G).astype(float), n
    yield "eigh", EighLinearOperator(c(lam), c(Q)), (c(Q) * c(lam)) @ c(Q).T, n
    QQ = np.kron(c(Q1).astype(float), c(Q2).astype(float))
    keigh = KroneckerEighLinearOperator(c(lam), [c(Q1), c(Q2)])
    yield "kronecker_eigh", keigh, QQ @ np.diag(lam) @ QQ.T, 2
    block = BlockDiagonalLinearOperator([c(np.eye(2)), DiagonalLinearOperator(c(lam))])
    yield "block", block, scipy.linalg.block_diag(np.eye(2), np.diag(c(lam))), n
    perm = [[(2, 4)], [(0, 2)]]
    P = np.eye(6)[[2, 3, 4, 5, 0, 1]]
    yield "layout", ParameterLayoutLinearOperator(block, perm), P.T @ block.to_dense() @ P, n


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_refused_beyond_the_limit_accepted_within(dtype):
    for name, op, ref, n in _cases(dtype, 3.0):
        with pytest.raises(IllConditionedError) as caught:
            op.inverse()
        err = caught.value
        expected = np.linalg.cond(ref) if name == "dense_general" else _eig_cond(ref)
        np.testing.assert_allclose(err.condition_number, expected, rtol=0.1, err_msg=name)
        assert f"{err.condition_number:.3g}" in str(err)
        assert np.isclose(err.limit, limit(dtype, n), rtol=1e-12), name
        with pytest.raises(IllConditionedError):
            op.logdet()
    for name, op, ref, _ in _cases(dtype, 0.3):
        np.testing.assert_allclose(
            op.inverse().to_dense().astype(float) @ ref,
            np.eye(len(ref)),
            atol=0.1 * 0.3 * 4,  # within the limit: predicted error below 10 % (x4 margin)
            err_msg=name,
        )


def _eig_cond(ref):
    """cond of a symmetric matrix's spectrum (the blocks' well-conditioned block lies
    inside the bad block's spectrum, so the whole matrix's cond is the bad block's)."""
    w = np.abs(np.linalg.eigvalsh(ref))
    return w.max() / w.min()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_the_suggested_damping_suffices_and_is_not_too_large(dtype):
    for name, op, ref, n in _cases(dtype, 30.0):
        if name == "dense_general":  # singular values do not shift with the damping
            continue
        with pytest.raises(IllConditionedError) as caught:
            op.inverse()
        suggested = caught.value.suggested_damping
        # from the exact spectrum (NumPy's eigenvalues of ref are rounding noise here);
        # the operator's own eigenvalues may be off by rounding: 10 % slack
        exact = np.diag(_spectrum(n, 30.0 * limit(dtype, n), dtype))
        needed = minimal_damping(exact, limit(dtype, n))
        assert 0.9 * needed <= suggested <= 100 * needed, name
        expected = np.linalg.inv(ref + suggested * np.eye(len(ref)))
        actual = op.inverse(suggested).to_dense().astype(float)
        np.testing.assert_allclose(actual, expected, rtol=0.05, atol=0.05 * np.abs(expected).max())
        assert f"{suggested:.2g}" in str(caught.value)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_damped_kronecker_is_judged_as_a_whole_and_names_the_factor(dtype):
    A = with_spectrum([1.0, 0.5, 0.0], 7).astype(dtype)  # singular input factor
    B = with_spectrum([2.0, 1.0], 8).astype(dtype)
    K = KroneckerLinearOperator(B, A, names=("output factor B", "input factor A"))
    ref = np.kron(B.astype(float), A.astype(float))
    lim = limit(dtype, 3)
    d = 2.0 / (3 * lim)  # cond (2 + d) / (0 + d) ~ 3 x the limit
    with pytest.raises(IllConditionedError, match="input factor A has the smallest") as caught:
        K.inverse(d)
    w = np.linalg.eigvalsh(ref + d * np.eye(6))
    np.testing.assert_allclose(caught.value.condition_number, w.max() / w.min(), rtol=0.1)
    suggested = caught.value.suggested_damping
    needed = minimal_damping(ref, lim)
    assert 0.9 * needed <= suggested <= 100 * needed  # rounding of the computed eigenvalues
    np.testing.assert_allclose(
        K.inverse(suggested).to_dense().astype(float),
        np.linalg.inv(ref + suggested * np.eye(6)),
        rtol=0.05,
        atol=0.05 / suggested,
    )
    # undamped: each factor is judged on its own (cond(A) cond(B) may exceed the limit)
    lam = _spectrum(3, 0.5 * limit(dtype, 3), dtype)
    A_ok = with_spectrum(lam, 9).astype(dtype)
    B_ok = with_spectrum(_spectrum(2, 0.5 * limit(dtype, 3), dtype), 10).astype(dtype)
    assert np.linalg.cond(np.kron(B_ok, A_ok).astype(float)) > limit(dtype, 3)
    inverse = KroneckerLinearOperator(B_ok, A_ok).inverse().to_dense().astype(float)
    expected = np.kron(np.linalg.inv(B_ok.astype(float)), np.linalg.inv(A_ok.astype(float)))
    np.testing.assert_allclose(inverse, expected, rtol=0.1, atol=0.1 * np.abs(expected).max())
    with pytest.raises(IllConditionedError, match="The input factor A is singular"):
        K.inverse()


def test_warn_returns_the_same_inverse():
    lam = np.array([1.0, 1e-9, 0.5])
    D = DiagonalLinearOperator(lam.astype(np.float32))
    S = DenseLinearOperator(with_spectrum(lam, 3).astype(np.float32), symmetric=True)
    for op in (D, S):
        with pytest.raises(IllConditionedError):
            op.inverse()
        with conditioning(tolerance=1e30):  # the rule never refuses: the unchecked inverse
            unchecked = op.inverse().to_dense()
        with warnings.catch_warnings(record=True) as caught, conditioning("warn"):
            warnings.simplefilter("always")
            warned = op.inverse().to_dense()
        assert [w.category for w in caught] == [ConditioningWarning]
        assert "ill-conditioned" in str(caught[0].message) or "singular" in str(caught[0].message)
        np.testing.assert_array_equal(warned, unchecked)
    with conditioning("warn"), pytest.warns(ConditioningWarning):
        np.testing.assert_allclose(D.inverse().diagonal(), 1 / lam, rtol=1e-6)
    # back to raising outside the context
    with pytest.raises(IllConditionedError):
        D.inverse()
    # a zero eigenvalue raises even when warning
    with conditioning("warn"), pytest.raises(IllConditionedError, match="singular"):
        DiagonalLinearOperator(np.array([1.0, 0.0])).inverse()


def test_tolerance_moves_the_limit_and_bad_settings_raise():
    D = DiagonalLinearOperator(np.array([1.0, 1e-5], dtype=np.float32))
    with pytest.raises(IllConditionedError):
        with conditioning(tolerance=DEFAULT_TOLERANCE * 1e5 / limit(np.float32, 2) / 2):
            D.inverse()
    with conditioning(tolerance=DEFAULT_TOLERANCE * 1e5 / limit(np.float32, 2) * 2):
        np.testing.assert_allclose(D.inverse().diagonal(), [1.0, 1e5], rtol=1e-6)
    with pytest.raises(ValueError, match="action"):
        conditioning("ignore")
    with pytest.raises(ValueError, match="tolerance"):
        conditioning(tolerance=0.0)


def test_float32_damping_below_the_factors_resolution():
    """A float32 factor with lambda_max = 1 and damping 1e-9 < eps32: the shift is lost in
    rounding (the eigenvalue error, ~eps32, exceeds it), so float32 refuses; the same
    factor in float64 inverts to NumPy's inverse."""
    F = with_spectrum([1.0, 0.5, 0.0, 0.25], 11)
    F32 = F.astype(np.float32)
    for op in (
        DenseLinearOperator(F32, symmetric=True),
        KroneckerLinearOperator(F32, np.eye(2, dtype=np.float32)),
    ):
        with pytest.raises(IllConditionedError, match="float32") as caught:
            op.inverse(1e-9)
        assert "compute in float64" in str(caught.value)
    F64 = F32.astype(np.float64)
    for op, ref in (
        (DenseLinearOperator(F64, symmetric=True), F64),
        (KroneckerLinearOperator(F64, np.eye(2)), np.kron(F64, np.eye(2))),
    ):
        expected = np.linalg.inv(ref + 1e-9 * np.eye(len(ref)))
        np.testing.assert_allclose(
            op.inverse(1e-9).to_dense(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
        )


def test_scaled_operator_suggests_its_own_damping():
    """(c A + d I)^{-1} asks A for d / c: the suggestion comes back as a damping of c A."""
    lam = np.array([1.0, 0.5, 0.0])
    A = DiagonalLinearOperator(lam)
    for c in (2.0, -2.0):
        with pytest.raises(IllConditionedError, match="times the operator") as caught:
            (c * A).inverse(0.0)
        suggested = caught.value.suggested_damping
        needed = abs(minimal_damping(np.diag(lam), limit(np.float64, 3)) * c)
        assert needed <= abs(suggested) <= 100 * needed and np.sign(suggested) == np.sign(c)
        expected = np.linalg.inv(c * np.diag(lam) + suggested * np.eye(3))
        np.testing.assert_allclose((c * A).inverse(suggested).to_dense(), expected, rtol=1e-10)


# -- negative damping: a shift like any other for exact inverses ---------------------------


def _negative_cases():
    lam = np.array([1.0, 2.0, 4.0, 3.0])
    S = with_spectrum(lam, 12)
    A, B = with_spectrum([1.0, 3.0], 13), with_spectrum([2.0, 5.0], 14)
    Q1, Q2 = orthogonal(2, 15), orthogonal(2, 16)
    QQ = np.kron(Q1, Q2)
    Q = orthogonal(4, 17)
    yield DiagonalLinearOperator(lam), np.diag(lam)
    yield DenseLinearOperator(S, symmetric=True), S
    yield DenseLinearOperator(S), S
    yield EighLinearOperator(lam, Q), (Q * lam) @ Q.T
    yield EighLinearOperator(lam[:2], Q[:, :2]), (Q[:, :2] * lam[:2]) @ Q[:, :2].T
    yield KroneckerLinearOperator(A, B), np.kron(A, B)
    yield KroneckerEighLinearOperator(lam, [Q1, Q2]), QQ @ np.diag(lam) @ QQ.T
    yield BlockDiagonalLinearOperator([S, np.diag(lam)]), scipy.linalg.block_diag(S, np.diag(lam))
    U = orthogonal(4, 18)[:, :2]
    yield (
        DiagonalPlusLowRankLinearOperator(lam + 4.0, np.array([1.0, 2.0]), U),
        np.diag(lam + 4.0) + (U * [1.0, 2.0]) @ U.T,
    )


@pytest.mark.parametrize("damping", [-0.5, -2.5])
def test_negative_damping_is_the_exact_shifted_inverse(damping):
    for op, ref in _negative_cases():
        expected = np.linalg.inv(ref + damping * np.eye(len(ref)))
        actual = op.inverse(damping).to_dense()
        np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12, err_msg=repr(op))
        np.testing.assert_allclose(op.damped(damping).inverse().to_dense(), expected, rtol=1e-9)


def test_a_negative_shift_onto_an_eigenvalue_is_refused():
    for op, ref in _negative_cases():
        w = np.linalg.eigvalsh(0.5 * (ref + ref.T))
        if isinstance(op, EighLinearOperator) and op.rank < op.shape[0]:
            w = np.array([1.0, 2.0])  # the zero eigenvalues shift to the damping itself
        with pytest.raises(FactorizationError):
            op.inverse(-float(w[0]))


def test_several_refused_blocks_get_one_damping_for_all():
    """Two refused blocks of different scales: the combined suggestion is the larger
    minimal damping (from NumPy's eigenvalues), and it makes both blocks pass."""
    small = np.diag([1.0, 0.0])
    large = np.diag([100.0, 0.0, 3.0])
    op = BlockDiagonalLinearOperator([small, np.eye(2), large])
    with pytest.raises(IllConditionedError, match="2 parts refused") as caught:
        op.inverse()
    assert "Block 0" in str(caught.value)
    needed = max(
        minimal_damping(small, limit(np.float64, 2)), minimal_damping(large, limit(np.float64, 3))
    )
    suggested = caught.value.suggested_damping
    assert needed <= suggested <= 100 * needed
    ref = scipy.linalg.block_diag(small, np.eye(2), large)
    expected = np.linalg.inv(ref + suggested * np.eye(7))
    np.testing.assert_allclose(op.inverse(suggested).to_dense(), expected, rtol=1e-3)


def test_a_zero_operator_is_told_that_any_positive_damping_works():
    """Every shift s > 0 makes 0 + s I perfectly conditioned, but no shift is the
    smallest: the message says so rather than suggesting a number (or none at all)."""
    zero = DiagonalLinearOperator(np.zeros(3))
    with pytest.raises(IllConditionedError) as err:
        zero.inverse()
    assert err.value.suggested_damping is None
    assert "Every eigenvalue is zero: any positive damping makes its condition number 1" in (
        str(err.value)
    )
    assert np.array_equal(zero.inverse(1e-300).to_dense(), np.eye(3) / 1e-300)


def test_no_shift_helps_when_the_limit_is_one():
    """With a tolerance that leaves a limit at or below 1, only an exactly flat spectrum
    passes; the message says no damping suffices instead of suggesting one."""
    with conditioning(tolerance=1e-30), pytest.raises(IllConditionedError) as err:
        DiagonalLinearOperator(np.array([1.0, 2.0])).inverse()
    assert err.value.suggested_damping is None
    assert "No damping brings its condition number within the limit" in str(err.value)


def test_kronecker_eigh_logdet_is_judged_at_the_size_of_its_largest_factor():
    """A Kronecker eigendecomposition factorizes ``2 x 2`` factors, not the ``4 x 4``
    product: a condition number between the two sizes' limits is accepted, and its
    log-determinant is the sum of the logs of the eigenvalues."""
    cond = np.sqrt(limit(np.float64, 2) * limit(np.float64, 4))  # inside (limit 4, limit 2)
    lam = np.geomspace(1.0 / cond, 1.0, 4)
    op = KroneckerEighLinearOperator(lam, [orthogonal(2, 7), orthogonal(2, 8)])
    np.testing.assert_allclose(float(op.logdet()), np.sum(np.log(lam)), rtol=1e-13)
    too_wide = np.geomspace(1.0 / (1.1 * limit(np.float64, 2)), 1.0, 4)
    with pytest.raises(IllConditionedError):
        KroneckerEighLinearOperator(too_wide, [orthogonal(2, 7), orthogonal(2, 8)]).logdet()


def test_kronecker_logdet_is_judged_factor_by_factor():
    """The undamped log-determinant of a Kronecker product factorizes its factors, so the
    rule applies to each factor at its own size (as for the undamped inverse), not to
    the product's spectrum: two 4 x 4 float32 factors, each conditioned within the 4 x 4
    limit, whose product's condition number (the product of theirs) exceeds the 16 x 16
    limit."""
    cond = np.sqrt(limit(np.float32, 4))  # cond^2 = limit(4) > limit(16)
    assert cond**2 > limit(np.float32, 16)
    factors = [
        (orthogonal(4, seed) * np.geomspace(1.0 / cond, 1.0, 4)) @ orthogonal(4, seed).T
        for seed in (3, 4)
    ]
    factors = [0.5 * (F + F.T) for F in factors]
    op = KroneckerLinearOperator(
        *[DenseLinearOperator(F.astype(np.float32), psd=True) for F in factors]
    )
    expected = sum(4 * np.linalg.slogdet(F)[1] for F in factors)  # det(A x B) = |A|^4 |B|^4
    np.testing.assert_allclose(float(op.logdet()), expected, rtol=1e-4)


def test_damped_kronecker_logdet_judges_the_damped_spectrum():
    """A singular factor is fine once damped: ``log det(B x A + I)`` with ``B`` of rank
    one is finite and is judged on the damped spectrum (not factor by factor)."""
    B = DenseLinearOperator(np.diag([1.0, 0.0]), psd=True)
    A = DenseLinearOperator(2.0 * np.eye(2), psd=True)
    K = KroneckerLinearOperator(B, A)
    expected = np.linalg.slogdet(np.kron(np.diag([1.0, 0.0]), 2.0 * np.eye(2)) + np.eye(4))[1]
    np.testing.assert_allclose(float(K.damped(1.0).logdet()), expected, rtol=1e-14)
    with pytest.raises(IllConditionedError):
        K.logdet()
