"""K-FAC, its inverses and EKFAC through the shared operator suite (tests/linalg).

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
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from test_kfac import from_joint_order

import curvlinops.nn as cnn
from curvlinops import MSELoss
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator

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
    op, ref = _kfac(backend, dtype, rng)
    # K-FAC's inverse(damping) is factored by default (exact only for damping 0, tested
    # separately in test_kfac.py); the suite compares with the exact (A + d I)^{-1}.
    return suite.Case(op, ref, suite.ALL_QUERIES, damping=0.0)


def _kfac_joint_damped_case(backend, dtype, rng):
    op, ref = _kfac(backend, dtype, rng, separate=False)
    return suite.Case(op.damped(0.3), ref + 0.3 * np.eye(len(ref)), suite.ALL_QUERIES)


def _kfac_exact_inverse_case(backend, dtype, rng):
    op, ref = _kfac(backend, dtype, rng)
    inverse = op.inverse(0.2, exact=True)
    return suite.Case(inverse, np.linalg.inv(ref + 0.2 * np.eye(len(ref))), suite.ALL_QUERIES)


def _ekfac_case(backend, dtype, rng):
    model, params, data, rounded = _problem(backend, dtype, rng)
    op = EKFACLinearOperator(
        model, MSELoss(), params, data, separate_weight_and_bias=False, check_deterministic=False
    )
    return suite.Case(op, _closed_form(rounded, False), suite.ALL_QUERIES)


CASES = {
    "kfac": _kfac_case,
    "kfac_joint_damped": _kfac_joint_damped_case,
    "kfac_exact_inverse": _kfac_exact_inverse_case,
    "ekfac_joint": _ekfac_case,
}
for _name, _builder in CASES.items():
    suite.register_case(_name)(_builder)

# Every check of the suite that takes (case_name, backend, dtype_name), whatever its name.
SUITE_CHECKS = sorted(
    name
    for name, fn in vars(suite).items()
    if name.startswith("test_")
    and callable(fn)
    and list(inspect.signature(fn).parameters) == ["case_name", "backend", "dtype_name"]
)


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
