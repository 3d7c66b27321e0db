"""Conditioning and negative damping of the K-FAC family's inverses.

The conditioning rule (``curvlinops.conditioning``) on K-FAC, EKFAC and the factored
heuristic: what the message names (operator, layer, factor), its condition number against
``numpy.linalg.cond`` of the factor or damped block, its suggested damping against the
closed-form minimum from NumPy's eigenvalues, and the accuracy of what the rule lets
through against float64 inverses of the same float32 factors. Negative damping: the exact
inverses equal ``numpy.linalg.inv(dense + d I)``; the factored heuristic refuses it.
"""

from __future__ import annotations

import warnings

import array_api_compat.numpy as xp
import numpy as np
import pytest

from curvlinops import (
    ConditioningWarning,
    EKFACLinearOperator,
    IllConditionedError,
    KFACLinearOperator,
    MSELoss,
    conditioning,
    nn,
)
from curvlinops._backend.conditioning import DEFAULT_TOLERANCE


def _kfac(dtype, *, scale=1.0, tiny_column=None, n_data=10, cls=KFACLinearOperator):
    """K-FAC of one Linear(6, 2) layer; ``n_data = 3`` makes the input factor singular."""
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(6, 2))
    params = model.init(0, xp=xp, dtype=xp.float64 if dtype == np.float64 else xp.float32)
    X = scale * rng.normal(size=(n_data, 6))
    if tiny_column is not None:
        X[:, 0] *= tiny_column
    Y = rng.normal(size=(n_data, 2))
    return cls(model, MSELoss(), params, [(X.astype(dtype), Y.astype(dtype))])


def limit(dtype, n, tolerance=DEFAULT_TOLERANCE):
    return tolerance / (np.sqrt(n) * np.finfo(dtype).eps)


def spectral_error(actual, expected):
    return np.linalg.norm(actual - expected, 2) / np.linalg.norm(expected, 2)


def test_undamped_message_names_operator_layer_factor_and_numpy_condition_number():
    K = _kfac(np.float64, tiny_column=1e-5)  # cond(A) ~ 1e10: well resolved in float64
    A = K.input_factors["0"]
    tolerance = 1e-7  # limit 4e7 for n = 6: cond(A) is beyond it
    with conditioning(tolerance=tolerance), pytest.raises(IllConditionedError) as caught:
        K.inverse()
    message = str(caught.value)
    for part in ("KFACLinearOperator", "weight block of layer '0'", "input factor A"):
        assert part in message
    np.testing.assert_allclose(caught.value.condition_number, np.linalg.cond(A), rtol=1e-3)
    assert caught.value.limit == pytest.approx(limit(np.float64, 6, tolerance))
    # the suggested damping is for the block B (x) A and makes its damped inverse pass
    block = K.to_dense()[:12, :12]
    w = np.linalg.eigvalsh(block)
    lim = caught.value.limit
    needed = (w.max() - lim * w.min()) / (lim - 1)
    suggested = caught.value.suggested_damping
    assert needed <= suggested <= 100 * needed
    with conditioning(tolerance=tolerance):
        inverse = K.inverse(suggested).to_dense()
    expected = np.linalg.inv(K.to_dense() + suggested * np.eye(K.shape[0]))
    np.testing.assert_allclose(inverse, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_damped_block_condition_number_matches_numpy():
    K = _kfac(np.float64, tiny_column=1e-5)
    d = 1e-9
    dense = K.to_dense()[:12, :12] + d * np.eye(12)
    with conditioning(tolerance=1e-7), pytest.raises(IllConditionedError) as caught:
        K.inverse(d)
    assert "input factor A has the smallest eigenvalue" in str(caught.value)
    np.testing.assert_allclose(caught.value.condition_number, np.linalg.cond(dense), rtol=1e-3)
    assert f"plus {d} I" in str(caught.value)


def test_float32_factored_inverse_with_tiny_damping_is_refused():
    """The issue's case: float32, damping 1e-7, a singular input factor of scale 1e2."""
    K = _kfac(np.float32, scale=10.0, n_data=3)
    A = K.input_factors["0"].astype(np.float64)
    B = K.output_factors["0"].astype(np.float64)

    def reference(d):  # the float64 factored inverse of the same float32 factors
        r = np.sqrt(d)
        return np.kron(np.linalg.inv(B + r * np.eye(2)), np.linalg.inv(A + r * np.eye(6)))

    with pytest.raises(IllConditionedError) as caught:
        K.factored_inverse(1e-7)
    err = caught.value
    assert "KFACLinearOperator: The damped input factor A of layer '0'" in str(err)
    np.testing.assert_allclose(
        err.condition_number, np.linalg.cond(A + np.sqrt(1e-7) * np.eye(6)), rtol=0.1
    )
    # the warned result is the same matrix, and measurably off
    with warnings.catch_warnings(record=True) as caught_warnings, conditioning("warn"):
        warnings.simplefilter("always")
        warned = K.factored_inverse(1e-7).to_dense()[:12, :12].astype(np.float64)
    assert ConditioningWarning in [w.category for w in caught_warnings]
    with conditioning(tolerance=1e30):  # nothing refused: the unchecked inverse
        unchecked = K.factored_inverse(1e-7).to_dense()[:12, :12].astype(np.float64)
    np.testing.assert_array_equal(warned, unchecked)
    assert spectral_error(warned, reference(1e-7)) > 1e-2
    # the suggested damping (of the factored inverse, sqrt(d) per factor) suffices and is
    # within 100x of the minimum (cond(A + sqrt(d) I) = limit, from NumPy's eigenvalues)
    w = np.linalg.eigvalsh(A)
    lim = limit(np.float32, 6)
    needed = ((w.max() - lim * w.min()) / (lim - 1)) ** 2
    suggested = err.suggested_damping
    assert 0.9 * needed <= suggested <= 100 * needed
    accepted = K.factored_inverse(suggested).to_dense()[:12, :12].astype(np.float64)
    assert spectral_error(accepted, reference(suggested)) < 0.1


def test_float32_pi_damped_factored_inverse_suggests_the_users_damping():
    """Under pi-damping A is shifted by pi sqrt(d) and B by sqrt(d) / pi, so the shift t
    a factor needs is the damping (t / pi)^2 or (t pi)^2 (pi from NumPy's traces)."""
    K = _kfac(np.float32, scale=10.0, n_data=3)
    A = K.input_factors["0"].astype(np.float64)
    B = K.output_factors["0"].astype(np.float64)
    pi = np.sqrt((np.trace(A) / 6) / (np.trace(B) / 2))
    assert pi > 3  # far enough from 1 that (t / pi)^2 and (t pi)^2 differ

    def needed_shift(F):
        w, lim = np.linalg.eigvalsh(F), limit(np.float32, F.shape[0])
        return max((w.max() - lim * w.min()) / (lim - 1), 0.0)

    needed = max((needed_shift(A) / pi) ** 2, (needed_shift(B) * pi) ** 2)
    with pytest.raises(IllConditionedError, match="input factor A") as caught:
        K.factored_inverse(1e-7, pi_damping=True)
    suggested = caught.value.suggested_damping
    assert 0.9 * needed <= suggested <= 100 * needed
    K.factored_inverse(suggested, pi_damping=True)  # accepted


def test_float32_factor_with_damping_below_its_resolution():
    """lambda_max(A) ~ 1e2, damping 1e-9 < eps32 lambda_max: float32 refuses the exact
    inverse; the float64 operator from the same data inverts it as NumPy does."""
    K32 = _kfac(np.float32, scale=10.0, n_data=3)
    with pytest.raises(IllConditionedError, match="float32"):
        K32.inverse(1e-9)
    K64 = _kfac(np.float64, scale=10.0, n_data=3)
    damped = K64.to_dense() + 1e-9 * np.eye(K64.shape[0])
    expected = np.linalg.inv(damped)
    # cond ~ 1e11 < 1.8e14: accurate to about sqrt(n) eps cond (both sides)
    bound = 10 * np.sqrt(6) * np.finfo(np.float64).eps * np.linalg.cond(damped)
    assert spectral_error(K64.inverse(1e-9).to_dense(), expected) < bound < 1e-2


def test_ekfac_names_the_block():
    E = _kfac(np.float64, n_data=3, cls=EKFACLinearOperator)
    with pytest.raises(IllConditionedError) as caught:
        E.inverse()
    message = str(caught.value)
    assert "EKFACLinearOperator" in message and "weight block of layer '0'" in message
    suggested = caught.value.suggested_damping
    expected = np.linalg.inv(E.to_dense() + suggested * np.eye(E.shape[0]))
    # at the limit the rule promises about 10 % (NumPy's reference is as accurate)
    assert spectral_error(E.inverse(suggested).to_dense(), expected) < 0.1


# -- negative damping -----------------------------------------------------------------


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_negative_damping_is_the_exact_shifted_inverse(cls):
    K = _kfac(np.float64, cls=cls)
    dense = K.to_dense()
    w = np.unique(np.round(np.linalg.eigvalsh(dense), 8))
    d = -0.5 * (w[0] + w[1])  # between the two smallest eigenvalues: indefinite, invertible
    eye = np.eye(K.shape[0])
    expected = np.linalg.inv(dense + d * eye)
    for inverse in (K.inverse(d), K.damped(d).inverse(), (-2.0 * K).inverse(-2.0 * d) * -2.0):
        np.testing.assert_allclose(inverse.to_dense(), expected, rtol=1e-8, atol=1e-10)
    with pytest.raises(IllConditionedError):  # a shift onto an eigenvalue
        K.inverse(-np.linalg.eigvalsh(dense)[0])


def test_factored_inverse_refuses_negative_damping_and_says_why():
    K = _kfac(np.float64)
    with pytest.raises(ValueError, match="square root of the damping"):
        K.factored_inverse(-1.0)
