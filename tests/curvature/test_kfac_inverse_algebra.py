"""``inverse(damping)`` of K-FAC, EKFAC and the K-FAC Hessian is the exact damped inverse,
also under the operator algebra; ``factored_inverse`` is the heuristic, by name.

Every composition is compared, in float64, with ``np.linalg.inv`` of its dense matrix
(assembled with NumPy from the operator's dense form: ``c * D``, ``D + a I``,
``scipy.linalg.block_diag``, ``np.kron``) plus ``damping * I``. The curvature operators'
dense forms are tested against exact GGN / Hessian blocks in test_kfac.py,
test_ekfac.py and test_kfac_hessian.py.
"""

from __future__ import annotations

import array_api_compat.numpy as np_xp
import numpy as np
import pytest
import scipy.linalg
from test_exact import problem
from test_kfac import assert_close

import curvlinops as cl
import curvlinops.nn as cnn
from curvlinops import (
    BlockDiagonalLinearOperator,
    DenseLinearOperator,
    DiagonalLinearOperator,
    FactorizationError,
    KroneckerLinearOperator,
)
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator
from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator

TIGHT = 1e-9


def _operator(kind, separate):
    if kind == "kfac_hessian":
        # a deep linear network: positive definite factors (indefinite ones are in
        # test_kfac_hessian.py)
        model, _, params, data, *_, loss = problem(
            "mse", widths=(4, 3, 5), activation="identity", N=9, splits=(4,), seed=31
        )
        return KFACHessianLinearOperator(
            model, loss, params, data, separate_weight_and_bias=separate
        )
    model, _, params, data, *_, loss = problem("mse", widths=(3, 4, 3), N=9, splits=(4,), seed=32)
    cls = KFACLinearOperator if kind == "kfac" else EKFACLinearOperator
    return cls(model, loss, params, data, separate_weight_and_bias=separate)


def _inv(M, damping=0.0):
    return np.linalg.inv(M + damping * np.eye(len(M)))


def _compositions(K, D, rng):
    """(name, operator, dense matrix) for compositions of K (dense D) with other operators."""
    n = len(D)
    d = rng.uniform(0.5, 2.0, size=3)
    S = rng.normal(size=(2, 2))
    S = S @ S.T + 0.5 * np.eye(2)
    yield "itself", K, D
    yield "scaled by 2", 2 * K, 2 * D
    yield "scaled by 0.25", K * 0.25, 0.25 * D
    yield "divided by 3", K / 3.0, D / 3.0
    yield "damped", K.damped(0.3), D + 0.3 * np.eye(n)
    yield "scaled damped", 2 * K.damped(0.3), 2 * (D + 0.3 * np.eye(n))
    yield "damped scaled", (2 * K).damped(0.3), 2 * D + 0.3 * np.eye(n)
    yield "adjoint", K.T, D.T
    yield (
        "block diagonal",
        BlockDiagonalLinearOperator([K, DiagonalLinearOperator(d), 0.5 * K]),
        scipy.linalg.block_diag(D, np.diag(d), 0.5 * D),
    )
    yield (
        "kronecker",
        KroneckerLinearOperator(K, DenseLinearOperator(S, symmetric=True)),
        np.kron(D, S),
    )
    yield (
        "kronecker of scaled",
        KroneckerLinearOperator(DenseLinearOperator(S, symmetric=True), 3 * K),
        np.kron(S, 3 * D),
    )


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("kind", ["kfac", "ekfac", "kfac_hessian"])
def test_inverse_is_exact_under_the_algebra(kind, separate):
    K = _operator(kind, separate)
    D = K.to_dense()
    rng = np.random.default_rng(33)
    for name, op, M in _compositions(K, D, rng):
        for damping in (0.0, 0.2, 1.5):
            try:
                actual = op.inverse(damping).to_dense()
            except BaseException as err:
                raise AssertionError(f"{name}, damping {damping}: {err}") from err
            expected = _inv(M, damping)
            try:
                assert_close(actual, expected, TIGHT, TIGHT)
            except AssertionError as err:
                raise AssertionError(f"{name}, damping {damping}: {err}") from err
            # and through damped(): the same matrix
            assert_close(op.damped(damping).inverse().to_dense(), expected, TIGHT, TIGHT)
        sign, logdet = np.linalg.slogdet(M + 0.2 * np.eye(len(M)))
        assert sign > 0
        assert_close(op.damped(0.2).logdet(), logdet, TIGHT)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_inverse_of_a_psd_operator_is_psd_for_non_negative_damping(kind):
    """K-FAC and EKFAC are PSD (positive definite here: numpy's eigenvalues), so their
    inverse at damping 0 is too, and is tagged so."""
    K = _operator(kind, separate=True)
    assert K.is_psd and np.linalg.eigvalsh(K.to_dense()).min() > 0
    for damping in (0.0, 0.3):
        inverse = K.inverse(damping)
        assert inverse.is_psd
        assert np.linalg.eigvalsh(inverse.to_dense()).min() > 0


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("kind", ["kfac", "ekfac", "kfac_hessian"])
@pytest.mark.filterwarnings("ignore:The Kronecker-factored Hessian plus")
def test_inverse_is_exact_for_non_positive_scales(kind, separate):
    """``(c K + d I)^{-1}`` for ``c < 0`` asks ``K`` for a negative shift ``d / c``, and
    ``(0 K + d I)^{-1}`` is ``I / d``: both exact, never refused (regression: a
    ``ValueError`` for the negative shift, a ``ZeroDivisionError`` for ``c = 0``)."""
    K = _operator(kind, separate)
    D = K.to_dense()
    n = len(D)
    for c in (-2.0, -0.25, 0.0):
        for damping in (0.2, 1.5, -0.7):
            expected = _inv(c * D, damping)
            for op in ((c * K).inverse(damping), (c * K).damped(damping).inverse()):
                assert_close(op.to_dense(), expected, TIGHT, TIGHT)
            assert (c * K).inverse(damping).is_psd == (c == 0 and damping > 0)
    # c < 0: det(c K + d I) = c^n det(K + (d/c) I), exact for even n (K padded by a 1 x 1
    # block when n is odd); odd n refuses
    even = K if n % 2 == 0 else BlockDiagonalLinearOperator([K, DiagonalLinearOperator(np.ones(1))])
    D_even = D if n % 2 == 0 else scipy.linalg.block_diag(D, np.ones((1, 1)))
    for c, damping in ((-2.0, -0.1), (-0.5, -3.0)):
        sign, expected = np.linalg.slogdet(c * D_even + damping * np.eye(len(D_even)))
        assert sign > 0
        assert_close((c * even).damped(damping).logdet(), expected, TIGHT)
    if n % 2 == 1:
        with pytest.raises(NotImplementedError, match="odd dimension"):
            (-2.0 * K).damped(-0.1).logdet()
    # (0 K + d I) has the log-determinant n log d
    assert_close((0 * K).damped(0.5).logdet(), n * np.log(0.5), TIGHT)
    with pytest.raises(ZeroDivisionError):
        (0 * K).inverse()


def test_the_reported_case_is_now_exact():
    """Issue #11: (2 K).inverse(0.2) was 56 % away from (2K + 0.2 I)^{-1}."""
    K = _operator("kfac", True)
    D = K.to_dense()
    expected = _inv(2 * D, 0.2)
    assert_close((2 * K).inverse(0.2).to_dense(), expected, TIGHT, TIGHT)
    factored = (2 * K.factored_inverse(0.1)).to_dense() / 4  # (1/2) of K's factored inverse
    assert np.linalg.norm(factored - expected) > 0.05 * np.linalg.norm(expected)


def test_sums_refuse_instead_of_answering_wrongly():
    K = _operator("kfac", True)
    D = DiagonalLinearOperator(np.ones(K.shape[0]))
    for op in (K + D, K + K, K - 0.5 * K):
        with pytest.raises(NotImplementedError):
            op.inverse(0.1)
    # their exact queries that do exist are right
    assert_close((K + D).trace(), np.trace(K.to_dense()) + K.shape[0])


def test_factored_inverse_differs_from_inverse_and_has_its_own_name():
    for kind in ("kfac", "kfac_hessian"):
        K = _operator(kind, True)
        exact = K.inverse(0.1).to_dense()
        assert_close(exact, _inv(K.to_dense(), 0.1), TIGHT, TIGHT)
        for pi in (False, True):
            factored = K.factored_inverse(0.1, pi_damping=pi).to_dense()
            assert np.linalg.norm(factored - exact) > 1e-2 * np.linalg.norm(exact)
    E = _operator("ekfac", True)
    assert not hasattr(E, "factored_inverse")  # EKFAC has no factored form


def test_a_factor_with_a_relative_eigenvalue_of_1e_17_raises_in_both_inverses():
    K = _operator("kfac", False)
    factors = [(K.output_factors[la.name], K.input_factors[la.name]) for la in K.layers]
    B, A = factors[0]
    w, Q = np.linalg.eigh(A)
    w = w / w.max()
    w[0] = 1e-17
    A_singular = Q @ np.diag(w) @ Q.T
    factors[0] = (B, 0.5 * (A_singular + A_singular.T))
    K._set_factors(factors)
    with pytest.raises(FactorizationError, match=r"layer '0'.*singular.*damping"):
        K.inverse()
    with pytest.raises(FactorizationError, match=r"input factor A of layer '0'.*singular"):
        K.factored_inverse(0.0)
    with pytest.raises(FactorizationError, match=r"layer '0'.*singular"):
        K.logdet()
    D = K.to_dense()
    assert_close(K.inverse(1e-3).to_dense(), _inv(D, 1e-3), 1e-8, 1e-10)
    K.factored_inverse(1e-3)


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "kfac_hessian"])
def test_eigenvalues_from_the_factors(kind):
    for separate in (True, False):
        K = _operator(kind, separate)
        actual = np.sort(K.eigvalsh())
        assert_close(actual, np.linalg.eigvalsh(K.to_dense()), TIGHT, TIGHT)


def test_former_inverse_keywords_still_work_with_a_warning():
    # Code written for the former inverse(damping, exact=..., heuristic_damping=...) keeps
    # running: exact=True is the exact inverse, exact=False the factored heuristic.
    import array_api_compat.numpy as xp

    from curvlinops import MSELoss, nn

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = model.init(0, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(0)
    K = KFACLinearOperator(
        model, MSELoss(), params, [(rng.normal(size=(9, 3)), rng.normal(size=(9, 2)))]
    )
    dense = K.to_dense()
    with pytest.warns(FutureWarning, match="factored_inverse"):
        exact = K.inverse(0.1, exact=True).to_dense()
    np.testing.assert_allclose(exact, np.linalg.inv(dense + 0.1 * np.eye(len(dense))), rtol=1e-9)
    for heuristic in (False, True):
        with pytest.warns(FutureWarning):
            old = K.inverse(0.1, exact=False, heuristic_damping=heuristic).to_dense()
        new = K.factored_inverse(0.1, pi_damping=heuristic).to_dense()
        np.testing.assert_array_equal(old, new)
        with pytest.warns(FutureWarning):  # exact=False was the former default
            default = K.inverse(0.1, heuristic_damping=heuristic).to_dense()
        np.testing.assert_array_equal(default, new)
    with pytest.raises(TypeError):
        K.inverse(0.1, not_a_keyword=True)


def test_pi_damping_with_a_zero_input_factor_falls_back_to_pi_one():
    # inputs of zero: A = 0 for both layers, so pi = 1 (the trace rule is undefined)
    model = cnn.Sequential(cnn.Linear(3, 4, bias=False), cnn.Tanh(), cnn.Linear(4, 2, bias=False))
    params = model.init(0, xp=np_xp, dtype=np_xp.float64)
    data = [(np.zeros((5, 3)), np.random.default_rng(0).normal(size=(5, 2)))]
    K = KFACLinearOperator(model, cl.MSELoss(), params, data)
    damping = 0.04
    r = np.sqrt(damping)
    blocks = []
    for name in K.input_factors:
        A, B = K.input_factors[name], K.output_factors[name]
        assert np.all(A == 0)
        blocks.append(np.kron(np.linalg.inv(B + r * np.eye(len(B))), np.eye(len(A)) / r))
    expected = scipy.linalg.block_diag(*blocks)
    actual = K.factored_inverse(damping, pi_damping=True).to_dense()
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)
