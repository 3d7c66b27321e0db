"""The verification helpers pass correct models and operators and catch planted bugs."""

from __future__ import annotations

import numpy as np
import pytest
from verify_models import TanhNet, make_params

from curvlinops import CallableLinearOperator, MissingTierError, Tier, aslinearoperator, verify
from curvlinops.verify import (
    VerificationError,
    VerificationReport,
    check_adjoint,
    check_jvp,
    check_layer_taps,
    check_psd,
    check_second_order,
    check_symmetric,
    check_vjp,
    verify_model,
)


def _on(backend, params, x, dtype="float64"):
    return [backend.asarray(p, dtype) for p in params], backend.asarray(x, dtype)


def test_correct_model_passes_every_check(backend):
    params, x = _on(backend, *make_params(np.random.default_rng(0)))
    reports = verify_model(TanhNet(), params, x)
    assert [r.name for r in reports] == ["jvp", "vjp", "second_order_vjp", "layer_taps"]
    for report in reports:
        report.raise_if_failed()
        assert report.error <= 1e-3 * report.tolerance or report.name != "vjp"


def test_correct_model_passes_in_float32():
    params, x = make_params(np.random.default_rng(1))
    params, x = [p.astype(np.float32) for p in params], x.astype(np.float32)
    for report in verify_model(TanhNet(), params, x):
        assert report.passed, str(report)


@pytest.mark.parametrize(
    "bug, check, name",
    [
        ("vjp_scale", check_vjp, "vjp"),
        ("vjp_transpose", check_vjp, "vjp"),
        ("jvp_sign", check_jvp, "jvp"),
        ("jvp_sign", check_vjp, "vjp"),
        ("second_order", check_second_order, "second_order_vjp"),
        ("taps", check_layer_taps, "layer_taps"),
    ],
)
def test_planted_bugs_are_reported(bug, check, name):
    params, x = make_params(np.random.default_rng(2))
    report = check(TanhNet(bug=bug), params, x)
    assert not report.passed and report.name == name
    assert report.error > 100 * report.tolerance
    with pytest.raises(VerificationError, match=rf"{name} is wrong: measured error .* exceeds"):
        report.raise_if_failed()
    assert str(report).startswith(f"[FAIL] {name}: error")


def test_wrong_shapes_are_reported():
    params, x = make_params(np.random.default_rng(11))
    report = check_vjp(TanhNet(bug="vjp_shape"), params, x)
    assert not report.passed and "wrong shapes" in report.details and "(3, 4, 2)" in report.details
    with pytest.raises(VerificationError, match="vjp is wrong"):
        report.raise_if_failed()


def test_unrelated_checks_still_pass_with_a_planted_bug():
    """A bug in one product does not show up in the checks of the others."""
    params, x = make_params(np.random.default_rng(3))
    assert check_jvp(TanhNet(bug="vjp_scale"), params, x).passed
    assert check_vjp(TanhNet(bug="second_order"), params, x).passed
    reports = verify_model(TanhNet(bug="second_order"), params, x)
    assert [r.passed for r in reports] == [True, True, False, True]


def test_tiers_are_respected():
    params, x = make_params(np.random.default_rng(4))
    first_order = TanhNet(tiers={Tier.FIRST_ORDER})
    assert [r.name for r in verify_model(first_order, params, x)] == ["jvp", "vjp"]
    assert [r.name for r in verify_model(TanhNet(), params, x, tiers=[2])] == ["second_order_vjp"]
    with pytest.raises(MissingTierError, match="tier 2"):
        check_second_order(first_order, params, x)
    with pytest.raises(MissingTierError, match="tier 3"):
        verify_model(first_order, params, x, tiers=[Tier.LAYER_TAPS])


def test_explicit_step_and_tolerance():
    params, x = make_params(np.random.default_rng(5))
    coarse = check_jvp(TanhNet(), params, x, step=1e-1)
    assert not coarse.passed  # truncation error O(h^2) of a huge step
    assert check_jvp(TanhNet(), params, x, step=1e-1, rtol=0.1).passed


def test_report_formatting():
    ok = VerificationReport.from_error("adjoint", 1e-16, 1e-8, "dot-product test")
    assert ok.passed and ok.raise_if_failed() is ok
    assert str(ok) == "[PASS] adjoint: error 1.000e-16 <= tolerance 1.000e-08 (dot-product test)"
    assert not VerificationReport.from_error("psd", float("nan"), 1.0).passed
    assert verify.__all__ and not hasattr(__import__("curvlinops"), "check_vjp")


def _spd(rng, n):
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (Q * rng.uniform(0.5, 2.0, size=n)) @ Q.T


def test_operator_checks_pass_on_spd(backend):
    rng = np.random.default_rng(6)
    A = aslinearoperator(backend.asarray(_spd(rng, 12)))
    for report in (check_symmetric(A), check_psd(A), check_adjoint(A)):
        report.raise_if_failed()
    singular = rng.normal(size=(12, 3))
    check_psd(backend.asarray(singular @ singular.T)).raise_if_failed()


def test_symmetry_check_fails_on_nonsymmetric(backend):
    rng = np.random.default_rng(7)
    M = _spd(rng, 12)  # one size for all operator tests: JAX compiles once per shape
    M[0, 3] += 0.3
    report = check_symmetric(backend.asarray(M))
    assert not report.passed and report.error > 1e-3
    with pytest.raises(VerificationError, match="symmetry is wrong"):
        report.raise_if_failed()
    assert not check_symmetric(backend.asarray(np.ones((3, 4)))).passed


def test_psd_check_fails_on_indefinite(backend):
    rng = np.random.default_rng(8)
    n = 12
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigenvalues = np.linspace(1.0, 10.0, n)
    eigenvalues[0] = -0.5  # one small negative direction: random probes miss it
    A = backend.asarray((Q * eigenvalues) @ Q.T)
    probes_only = check_psd(A, lanczos_steps=0)
    assert probes_only.passed  # Rayleigh quotients of random vectors average ~5.5
    report = check_psd(A, lanczos_steps=25)
    assert not report.passed
    np.testing.assert_allclose(report.error, 0.5 / 10.0, rtol=1e-6)
    with pytest.raises(VerificationError, match="psd is wrong"):
        report.raise_if_failed()


def test_adjoint_check_catches_wrong_rmatmat(backend):
    rng = np.random.default_rng(9)
    M_np = rng.normal(size=(5, 7))
    M = backend.asarray(M_np)
    xp = backend.xp

    def make(rmatmat):
        return CallableLinearOperator(
            (5, 7),
            matmat=lambda X: M @ X,
            rmatmat=rmatmat,
            dtype=M.dtype,
            xp=xp,
            device=backend.device,
        )

    assert check_adjoint(make(lambda Y: xp.matrix_transpose(M) @ Y)).passed
    wrong = backend.asarray(M_np.T + 0.01 * rng.normal(size=(7, 5)))
    report = check_adjoint(make(lambda Y: wrong @ Y))
    assert not report.passed and report.name == "adjoint"
    missing = CallableLinearOperator(
        (5, 7), matmat=lambda X: M @ X, dtype=M.dtype, xp=xp, device=backend.device
    )
    report = check_adjoint(missing)
    assert not report.passed and "no adjoint product" in report.details


def test_native_network_passes():
    """The library's own layers (curvlinops.nn) pass every check of every tier."""
    import array_api_compat.numpy as xp

    from curvlinops import nn

    if not all(hasattr(nn, name) for name in ("Sequential", "Linear", "Tanh")):
        pytest.skip("curvlinops.nn lacks Sequential/Linear/Tanh")
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    params = model.init(0, xp=xp, dtype=xp.float64)
    x = np.random.default_rng(10).normal(size=(4, 3))
    reports = verify_model(model, params, x)
    assert len(reports) == len(model.tiers) + 1
    for report in reports:
        report.raise_if_failed()
