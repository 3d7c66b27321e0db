"""K-FAC, its inverses, EKFAC and the K-FAC Hessian through the shared operator suite.

The suite's checks (products from both sides, dot-product test, adjoint, dense form,
inverse, damped inverse, trace, diagonal, log-determinant, Frobenius norm: every
``test_*(case_name, backend, dtype_name)`` of the suite) run on every backend in
float32 and float64. The cases register in a private copy of the suite
module, so the suite file itself is unchanged and its own run is unaffected.

The problem is a deep linear network ``3 -> 2 -> 4`` with squared loss, where K-FAC
(and EKFAC) equal the exact GGN blocks; the reference is their closed form in NumPy:
``B_1 = (2 / C) I``, ``B_0 = (2 / C) W_1^T W_1``, ``A_l`` the mean outer product of the
layer's inputs (``C = 4`` outputs, mean reduction), assembled with ``np.kron`` and
``scipy.linalg.block_diag``.

No waiver: every case's ``inverse(damping)`` is compared with the exact
``(A + d I)^{-1}``, also for K-FAC under scaling, damping, and inside block-diagonal and
Kronecker compositions. The factored heuristic is its own case
(``factored_inverse``), against its own closed form.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from test_kfac import from_joint_order

import curvlinops.nn as cnn
from curvlinops import (
    BlockDiagonalLinearOperator,
    DenseLinearOperator,
    DiagonalLinearOperator,
    KroneckerLinearOperator,
    MSELoss,
)
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator
from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator

_SUITE_PATH = Path(__file__).resolve().parents[1] / "linalg" / "test_operator_suite.py"
_spec = importlib.util.spec_from_file_location("_kfac_operator_suite_copy", _SUITE_PATH)
suite = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = suite  # dataclasses look their module up there
_spec.loader.exec_module(suite)

D_IN, HIDDEN, C, N = 3, 2, 4, 10


def _problem(backend, dtype, rng):
    """Backend operator inputs and the float64 NumPy arrays they were rounded from."""
    W0 = np.array([[0.9, -0.3, 0.2], [0.1, 0.8, -0.4]])
    b0 = np.array([0.3, -0.2])
    W1 = np.array([[1.0, 0.2], [-0.3, 0.9], [0.4, 0.5], [0.2, -0.6]])
    b1 = np.array([0.1, 0.0, -0.2, 0.3])
    X = rng.normal(size=(N, D_IN))
    y = rng.normal(size=(N, C))
    arrays = [suite.put(backend, dtype, a) for a in (W0, b0, W1, b1, X, y)]
    backend_arrays = [b for b, _ in arrays]
    rounded = [r for _, r in arrays]
    model = cnn.Sequential(cnn.Linear(D_IN, HIDDEN), cnn.Linear(HIDDEN, C))
    # one batch: several batches are tested in test_kfac.py, and JAX compiles every shape
    data = [(backend_arrays[4], backend_arrays[5])]
    return model, backend_arrays[:4], data, rounded


def _closed_form(rounded, separate):
    W0, b0, W1, _, X, _ = rounded
    H = X @ W0.T + b0
    B = [(2 / C) * W1.T @ W1, (2 / C) * np.eye(C)]
    blocks = []
    for a, B_l in zip((X, H), B, strict=True):
        if separate:
            blocks += [np.kron(B_l, a.T @ a / N), B_l]
        else:
            a1 = np.hstack([a, np.ones((N, 1))])
            joint = np.kron(B_l, a1.T @ a1 / N)
            blocks.append(from_joint_order(joint, (B_l.shape[0], a.shape[1])))
    return scipy.linalg.block_diag(*blocks)


def _kfac(backend, dtype, rng, separate=True):
    model, params, data, rounded = _problem(backend, dtype, rng)
    op = KFACLinearOperator(
        model,
        MSELoss(),
        params,
        data,
        separate_weight_and_bias=separate,
        check_deterministic=False,
    )
    return op, _closed_form(rounded, separate)


def _kfac_case(backend, dtype, rng):
    # inverse(damping) is the exact (K + d I)^{-1}, like every operator's: no waiver.
    op, ref = _kfac(backend, dtype, rng)
    return suite.Case(op, ref, suite.ALL_QUERIES)


def _kfac_joint_damped_case(backend, dtype, rng):
    op, ref = _kfac(backend, dtype, rng, separate=False)
    return suite.Case(op.damped(0.3), ref + 0.3 * np.eye(len(ref)), suite.ALL_QUERIES)


def _kfac_exact_inverse_case(backend, dtype, rng):
    op, ref = _kfac(backend, dtype, rng)
    inverse = op.inverse(0.2)
    return suite.Case(inverse, np.linalg.inv(ref + 0.2 * np.eye(len(ref))), suite.ALL_QUERIES)


def _kfac_scaled_case(backend, dtype, rng):
    # (c K + d I)^{-1} = (1/c) (K + (d/c) I)^{-1} goes through K.inverse(d / c): exact.
    op, ref = _kfac(backend, dtype, rng, separate=False)
    return suite.Case(2.5 * op, 2.5 * ref, suite.ALL_QUERIES)


def _kfac_factored_inverse_case(backend, dtype, rng):
    """The factored heuristic is an operator of its own, against its closed form."""
    model, params, data, rounded = _problem(backend, dtype, rng)
    op = KFACLinearOperator(model, MSELoss(), params, data, check_deterministic=False)
    W0, b0, W1, _, X, _ = rounded
    H = X @ W0.T + b0
    d, inv = 0.04, np.linalg.inv
    blocks = []
    for a, B in zip((X, H), [(2 / C) * W1.T @ W1, (2 / C) * np.eye(C)], strict=True):
        A = a.T @ a / N
        eye_A, eye_B = np.eye(len(A)), np.eye(len(B))
        blocks += [np.kron(inv(B + 0.2 * eye_B), inv(A + 0.2 * eye_A)), inv(B + d * eye_B)]
    ref = scipy.linalg.block_diag(*blocks)
    return suite.Case(op.factored_inverse(d), ref, suite.ALL_QUERIES)


def _kfac_hessian_case(backend, dtype, rng):
    # A deep linear network with squared loss: the K-FAC Hessian equals K-FAC.
    model, params, data, rounded = _problem(backend, dtype, rng)
    op = KFACHessianLinearOperator(model, MSELoss(), params, data, check_deterministic=False)
    return suite.Case(op, _closed_form(rounded, True), suite.ALL_QUERIES)


def _kfac_in_block_diagonal_case(backend, dtype, rng):
    op, ref = _kfac(backend, dtype, rng)
    d, d64 = suite.put(backend, dtype, rng.uniform(0.5, 2.0, size=3))
    composed = BlockDiagonalLinearOperator([0.5 * op, DiagonalLinearOperator(d)])
    return suite.Case(composed, scipy.linalg.block_diag(0.5 * ref, np.diag(d64)), suite.ALL_QUERIES)


def _kfac_in_kronecker_case(backend, dtype, rng):
    op, ref = _kfac(backend, dtype, rng)
    S, S64 = suite.put(backend, dtype, suite.spd(rng, 2))
    composed = KroneckerLinearOperator(op, DenseLinearOperator(S, symmetric=True))
    return suite.Case(composed, np.kron(ref, S64), suite.ALL_QUERIES)


def _ekfac_case(backend, dtype, rng, separate=False):
    model, params, data, rounded = _problem(backend, dtype, rng)
    op = EKFACLinearOperator(
        model,
        MSELoss(),
        params,
        data,
        separate_weight_and_bias=separate,
        check_deterministic=False,
    )
    return suite.Case(op, _closed_form(rounded, separate), suite.ALL_QUERIES)


def _ekfac_separate_scaled_case(backend, dtype, rng):
    case = _ekfac_case(backend, dtype, rng, separate=True)
    return suite.Case(case.op / 4.0, case.reference / 4.0, suite.ALL_QUERIES)


CASES = {
    "kfac": _kfac_case,
    "kfac_joint_damped": _kfac_joint_damped_case,
    "kfac_exact_inverse": _kfac_exact_inverse_case,
    "kfac_scaled_joint": _kfac_scaled_case,
    "kfac_factored_inverse": _kfac_factored_inverse_case,
    "kfac_hessian": _kfac_hessian_case,
    "kfac_in_block_diagonal": _kfac_in_block_diagonal_case,
    "kfac_in_kronecker": _kfac_in_kronecker_case,
    "ekfac_joint": _ekfac_case,
    "ekfac_separate_scaled": _ekfac_separate_scaled_case,
}
for _name, _builder in CASES.items():
    suite.register_case(_name)(_builder)

SUITE_CHECKS = suite.suite_checks()


@pytest.mark.parametrize("check", SUITE_CHECKS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_operator_suite(check, case_name, backend, dtype_name):
    if backend.name == "jax" and dtype_name == "float32":
        # JAX compiles every operation for every new shape and dtype on first use (tens of
        # seconds here); float32 runs on the other backends, JAX in float64.
        pytest.skip("JAX runs the curvature cases in float64 only, to bound test time")
    getattr(suite, check)(case_name, backend, dtype_name)


def test_the_suite_checks_were_found():
    assert {"test_queries"} <= set(SUITE_CHECKS) and len(SUITE_CHECKS) >= 2
