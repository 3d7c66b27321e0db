"""Complete texts of the errors and warnings raised by ``curvlinops.solvers``.

Each case triggers one ``raise`` or ``warn`` whose message has a plain string literal,
through a public call, and compares the whole message (type and text, case-sensitive)
with the sentence as a user reads it. Numbers computed at run time (a random probe's
products, a residual) are matched by a number pattern; every word around them is spelled
out. Partial ``match=`` patterns elsewhere in the suite pin neither a message's ends nor
its case; these cases do (mutation testing, issue #14).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from message_cases import assert_message, message_cases

from curvlinops import (
    AssumptionWarning,
    CGInverseLinearOperator,
    ConvergenceError,
    DenseLinearOperator,
    EighLinearOperator,
    FactorizationError,
    NystromPreconditioner,
    aslinearoperator,
    cg,
    eigsh,
    nystrom,
    power_iteration,
    spectral_density,
)

# -- builders ---------------------------------------------------------------------------

_SPD = np.array([[2.0, 1.0], [1.0, 3.0]])
_NUMBER = "[-+0-9.e]+"  # a number formatted with :g, :.2g, :.3g or :.6g


def _pattern(template):
    """A full-match regex: ``template`` literally, each ``{}`` a formatted number."""
    return re.compile(_NUMBER.join(re.escape(part) for part in template.split("{}")))


def _dense(A, **tags):
    return DenseLinearOperator(np.asarray(A, dtype=np.float64), **tags)


def _diag(values, **tags):
    return _dense(np.diag(values), **tags)


def _quietly(call):
    """``call`` with its AssumptionWarning (a different message than the one tested) caught."""

    def trigger():
        with pytest.warns(AssumptionWarning):
            call()

    return trigger


_DECLARE = (
    "Declare it to skip this check: aslinearoperator(A, {tag}=True), {tag}=True in the "
    "operator's constructor, or a class-level tag on your operator class."
)
_PROBE_PASSED = (
    "{who} assumes a {needs} operator, but the DenseLinearOperator is not declared "
    "symmetric; a random symmetry probe passed (one extra product), so it runs. "
)
_ONLY_SYMMETRIC = (
    "{who} assumes a positive semi-definite operator, but the DenseLinearOperator is only "
    "declared symmetric. "
)

# -- the cases: (id, trigger, exception or warning type, complete message) ---------------
# The message is a str (compared exactly) or a compiled regex (full match).

CASES = [
    # _validation.py
    (
        "non-square",
        lambda: cg(np.ones((2, 3)), np.ones(2)),
        ValueError,
        "cg needs a square operator of shape (n, n); got shape (2, 3). Solve least-squares "
        "problems through the normal equations (A^T A) instead.",
    ),
    (
        "probe-finds-asymmetry",
        lambda: cg(_dense([[1.0, 2.0], [0.0, 1.0]]), np.ones(2)),
        ValueError,
        _pattern(
            "cg needs a symmetric operator, but the DenseLinearOperator is not: for random "
            "x, y, y^T A x = {} and x^T A y = {} (relative difference {} > {}). Symmetrize "
            "it (0.5 * (A + A.T)), solve the normal equations (A.T @ A) for a linear "
            "system, or declare symmetric=True if it is symmetric in exact arithmetic."
        ),
    ),
    (
        "probe-passed-psd",
        lambda: cg(_dense(_SPD), np.ones(2)),
        AssumptionWarning,
        _PROBE_PASSED.format(who="cg", needs="symmetric positive semi-definite")
        + _DECLARE.format(tag="psd"),
    ),
    (
        "probe-passed-symmetric",
        lambda: eigsh(_diag([1.0, 2.0, 3.0]), k=1),
        AssumptionWarning,
        _PROBE_PASSED.format(who="eigsh", needs="symmetric") + _DECLARE.format(tag="symmetric"),
    ),
    (
        "cg-only-symmetric",
        lambda: cg(_dense(_SPD, symmetric=True), np.ones(2)),
        AssumptionWarning,
        _ONLY_SYMMETRIC.format(who="cg")
        + "If it is indefinite, CG stops with StopReason.NEGATIVE_CURVATURE: add damping or "
        "use minres. " + _DECLARE.format(tag="psd"),
    ),
    (
        "nystrom-only-symmetric",
        lambda: nystrom(_dense(_SPD, symmetric=True), rank=1),
        AssumptionWarning,
        _ONLY_SYMMETRIC.format(who="nystrom")
        + "If it is indefinite, the sketch fails: use eigsh instead. "
        + _DECLARE.format(tag="psd"),
    ),
    (
        "cg-inverse-only-symmetric",
        lambda: CGInverseLinearOperator(_dense(_SPD, symmetric=True)),
        AssumptionWarning,
        _ONLY_SYMMETRIC.format(who="CGInverseLinearOperator") + _DECLARE.format(tag="psd"),
    ),
    # cg.py
    (
        "cg-declared-psd-meets-negative-curvature",
        lambda: cg(_diag([1.0, -1.0], psd=True), np.ones(2)),
        AssumptionWarning,
        "cg: the DenseLinearOperator is declared positive semi-definite, but CG met a "
        "direction p with p^T (A + damping I) p <= 0. Either the declaration is wrong "
        "(check it with curvlinops.verify.check_psd), or A is singular and rounding made it "
        "look indefinite: add damping > 0.",
    ),
    # lanczos.py
    (
        "eigsh-k-not-below-n",
        lambda: eigsh(_diag([1.0, 2.0, 3.0], symmetric=True), k=3),
        ValueError,
        "eigsh: k must be smaller than the dimension n = 3, got k = 3. For all eigenpairs, "
        "densify the operator and use a dense eigh.",
    ),
    (
        "eigsh-maxiter-zero",
        lambda: eigsh(_diag([1.0, 2.0, 3.0], symmetric=True), k=1, maxiter=0),
        ValueError,
        "eigsh: maxiter must be an integer >= 1, got 0.",
    ),
    (
        "eigsh-no-convergence",
        lambda: eigsh(
            _diag(np.arange(1.0, 31.0), symmetric=True), k=2, ncv=4, maxiter=1, tol=1e-10
        ),
        ConvergenceError,
        _pattern(
            "eigsh did not converge within maxiter = 1 products with A: {} of 2 pairs "
            "reached tol = 1e-10. Increase maxiter or ncv, or loosen tol."
        ),
    ),
    (
        "power-iteration-start-vector-not-finite",
        lambda: power_iteration(_diag([1.0, 2.0], symmetric=True), v0=np.array([1.0, np.nan])),
        ValueError,
        "power_iteration: the start vector v0 contains NaN or Inf; pass finite values.",
    ),
    (
        "power-iteration-no-convergence",
        lambda: power_iteration(_diag([1.0, -1.0], symmetric=True), maxiter=3),
        ConvergenceError,
        _pattern(
            "power_iteration did not converge within maxiter = 3 products: residual {} > "
            "tol * |lam|. The two largest-magnitude eigenvalues may be (nearly) equal in "
            "size; use eigsh(A, k=2, which='LM') instead."
        ),
    ),
    # nystrom.py
    (
        "nystrom-not-psd-declared",
        lambda: nystrom(_diag([-1.0, -2.0, -3.0], psd=True), rank=1),
        FactorizationError,
        "nystrom: the Cholesky factorization of Omega^T A Omega failed, so A is not positive "
        "semi-definite (the DenseLinearOperator is declared PSD: the declaration is wrong) "
        "(or badly scaled). Nystrom needs a PSD operator; for indefinite operators use "
        "eigsh instead.",
    ),
    (
        "nystrom-not-psd-undeclared",
        _quietly(lambda: nystrom(_diag([-1.0, -2.0, -3.0], symmetric=True), rank=1)),
        FactorizationError,
        "nystrom: the Cholesky factorization of Omega^T A Omega failed, so A is not positive "
        "semi-definite (or badly scaled). Nystrom needs a PSD operator; for indefinite "
        "operators use eigsh instead.",
    ),
    (
        "nystrom-preconditioner-not-eigh",
        lambda: NystromPreconditioner(_dense(_SPD, psd=True), 1.0),
        TypeError,
        "NystromPreconditioner needs the EighLinearOperator returned by curvlinops.nystrom, "
        "got a DenseLinearOperator.",
    ),
    (
        "spectral-density-num-points",
        lambda: spectral_density(_dense(np.eye(3), symmetric=True), num_points=1),
        ValueError,
        "spectral_density: num_points must be an integer >= 2, got 1.",
    ),
    (
        "nystrom-preconditioner-negative-eigenvalue",
        lambda: NystromPreconditioner(EighLinearOperator(np.array([-1.0, 2.0]), np.eye(2)), 1.0),
        ValueError,
        "NystromPreconditioner needs non-negative eigenvalues (a PSD approximation); got a "
        "smallest eigenvalue of -1.",
    ),
]


@message_cases(CASES)
def test_message_is_complete(trigger, kind, expected):
    assert_message(trigger, kind, expected)


def test_number_pattern_is_strict():
    """The number pattern accepts formatted numbers only, not words around them."""
    pattern = _pattern("residual {} > tol")
    assert pattern.fullmatch("residual 0.707 > tol")
    assert pattern.fullmatch("residual -1.2e-05 > tol")
    assert not pattern.fullmatch("residual 0.707 > TOL")
    assert not pattern.fullmatch("residual nan or more > tol")


def test_unknown_choices_and_bad_margins_are_spelled_out():
    A = aslinearoperator(np.eye(3), symmetric=True)
    assert_message(
        lambda: eigsh(A, k=1, which="XX"),
        ValueError,
        "eigsh: unknown which='XX'; use one of 'LA', 'SA', 'LM'.",
    )
    assert_message(
        lambda: spectral_density(A, margin=-1.0),
        ValueError,
        "spectral_density: margin must be finite and >= 0.0, got -1.0.",
    )
