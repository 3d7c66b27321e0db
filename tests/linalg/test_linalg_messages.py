"""Complete texts of the error messages raised by ``curvlinops.linalg``.

Each case triggers one ``raise`` whose message has a plain string literal, through a
public call, and compares the whole message (type and text, case-sensitive) with the
sentence as a user reads it. Partial ``match=`` patterns elsewhere in the suite do not
pin a message's ends or its case; these cases do (mutation testing, issue #14).

A singular dense matrix reaches its own factorization error only past the conditioning
rule, which otherwise refuses it first: those cases run under ``conditioning("warn")``.
"""

from __future__ import annotations

import re

import array_api_compat.numpy as npx
import numpy as np
import pytest
from message_cases import assert_message, message_cases

from curvlinops import (
    BlockDiagonalLinearOperator,
    CallableLinearOperator,
    ConditioningWarning,
    DenseLinearOperator,
    DiagonalLinearOperator,
    DiagonalPlusLowRankLinearOperator,
    EighLinearOperator,
    FactorizationError,
    IdentityLinearOperator,
    IllConditionedError,
    KroneckerEighLinearOperator,
    KroneckerLinearOperator,
    LinearOperator,
    ParameterLayoutLinearOperator,
    aslinearoperator,
    conditioning,
)

_NUMBER = "[-+0-9.einf]+"  # a number formatted with :g or :.2g (``inf`` included)


def _pattern(template):
    """A full-match regex: ``template`` literally, each ``{}`` a formatted number."""
    return re.compile(_NUMBER.join(re.escape(part) for part in template.split("{}")))


# -- builders of tiny operators ---------------------------------------------------------


def _dense(rows=2, cols=2, **tags):
    """A dense float64 operator with distinct, well-conditioned entries."""
    A = np.arange(1.0, rows * cols + 1.0).reshape(rows, cols) + 3.0 * np.eye(rows, cols)
    return DenseLinearOperator(A, **tags)


def _callable(n=2, **tags):
    """A matrix-free ``n x n`` operator (``2 X``) with no adjoint and no exact queries."""
    return CallableLinearOperator(
        (n, n), matmat=lambda X: 2.0 * X, dtype=npx.float64, xp=npx, **tags
    )


def _identity(n):
    return IdentityLinearOperator(n, xp=npx, dtype=npx.float64)


class _Minimal(LinearOperator):
    """A subclass that only passes its arguments to the base class (no ``_rmatmat``)."""

    def _matmat(self, X):
        return X


def _strict_on_other_device():
    """An array-api-strict vector on a non-default device and an operator on the default."""
    xps = pytest.importorskip("array_api_strict")
    other = xps.Device("device1")
    x = xps.asarray([1.0, 2.0], device=other)
    op = DenseLinearOperator(xps.eye(2, dtype=xps.float64))
    return op, x, other


def _device_message():
    op, x, other = _strict_on_other_device()
    with pytest.raises(ValueError) as excinfo:
        op @ x
    expected = (
        f"The vector is on device {other}, the operator on {op.device}. "
        "Move it first; curvlinops never copies between devices inside a product."
    )
    assert str(excinfo.value) == expected


def _past_the_rule(query):
    """``query()`` with the conditioning rule only warning, so a factorization itself fails."""

    def trigger():
        with conditioning("warn"), pytest.warns(ConditioningWarning):
            query()

    return trigger


_SINGULAR = np.array([[1.0, 2.0], [2.0, 4.0]])  # rank one, not declared symmetric


# -- the cases: (id, trigger, exception type, complete message) -------------------------
# The message is a str (compared exactly) or a compiled regex (full match).

_DAMPING_HINT = "Add damping, e.g. A.inverse(damping=1e-3) or A.damped(1e-3).logdet()."
_ILL_CONDITIONED = (
    "The {what} is singular to working precision in float64: condition number {{}} (an "
    "eigenvalue is zero up to rounding; the limit is {{}}). {hint}Add damping: a total "
    "damping of {{}} brings its condition number within the limit; or accept the result "
    "with curvlinops.conditioning('warn') (or a larger tolerance)."
)
_SPECTRUM_HINT = "logdet is defined here for matrices of positive determinant only."

CASES = [
    # base.py
    (
        "psd-not-symmetric",
        lambda: _Minimal((2, 2), dtype=npx.float64, xp=npx, symmetric=False, psd=True),
        ValueError,
        "_Minimal: psd=True with symmetric=False is a contradiction; curvlinops calls an "
        "operator positive semi-definite only if it is symmetric. Pass symmetric=True "
        "(or leave it out).",
    ),
    (
        "no-adjoint",
        lambda: _callable().T @ np.ones(2),
        NotImplementedError,
        "CallableLinearOperator has no adjoint product (_rmatmat). Implement it, or build "
        "the operator with symmetric=True if it is symmetric.",
    ),
    (
        "matmul-python-list",
        lambda: _dense() @ [1.0, 2.0],
        TypeError,
        "A @ x needs x as an array of the operator's library (numpy), got a Python list. "
        "Convert it first, e.g. A @ xp.asarray(x, dtype=A.dtype).",
    ),
    (
        "complex-input",
        lambda: _dense() @ np.ones(2, dtype=np.complex128),
        TypeError,
        "DenseLinearOperator is a real (float64) operator and takes real vectors; got a "
        "complex128 one. Apply it to the real and imaginary parts separately: "
        "A @ x.real + 1j * (A @ x.imag).",
    ),
    (
        "add-scalar",
        lambda: _dense() + 1.0,
        TypeError,
        "Adding a scalar to an operator is ambiguous; use A.damped(c) for A + c*I.",
    ),
    (
        "mul-array",
        lambda: _dense() * np.ones(2),
        TypeError,
        "Use '@' for products of operators with operators or arrays.",
    ),
    (
        "mul-operator",
        lambda: _dense() * _dense(),
        TypeError,
        "Use '@' for products of operators with operators or arrays.",
    ),
    ("divide-by-zero", lambda: _dense() / 0, ZeroDivisionError, "Division of an operator by zero."),
    (
        "no-inverse",
        lambda: _callable().inverse(),
        NotImplementedError,
        "CallableLinearOperator has no cheap exact inverse. Use "
        "curvlinops.CGInverseLinearOperator (symmetric PSD) or "
        "curvlinops.MINRESInverseLinearOperator (symmetric indefinite) instead.",
    ),
    (
        "no-spectrum",
        lambda: _callable().eigvalsh(),
        NotImplementedError,
        "CallableLinearOperator has no cheap exact spectrum. Use curvlinops.eigsh (Lanczos) "
        "for a few eigenvalues or curvlinops.spectral_density for their density.",
    ),
    (
        "no-trace",
        lambda: _callable().trace(),
        NotImplementedError,
        "CallableLinearOperator has no cheap exact trace. Estimate it with "
        "curvlinops.hutchpp_trace or curvlinops.xtrace.",
    ),
    (
        "no-diagonal",
        lambda: _callable().diagonal(),
        NotImplementedError,
        "CallableLinearOperator has no cheap exact diagonal. Estimate it with "
        "curvlinops.xdiag or curvlinops.hutchinson_diagonal.",
    ),
    (
        "no-logdet",
        lambda: _callable().logdet(),
        NotImplementedError,
        "CallableLinearOperator has no cheap exact log-determinant. Estimate it with "
        "curvlinops.spectral_density (stochastic Lanczos quadrature).",
    ),
    (
        "no-frobenius",
        lambda: _callable().frobenius_norm(),
        NotImplementedError,
        "CallableLinearOperator has no cheap exact Frobenius norm. Estimate its square "
        "with curvlinops.hutchinson_squared_frobenius.",
    ),
    (
        "zero-scaled-inverse",
        lambda: (0 * _dense()).inverse(),
        ZeroDivisionError,
        "The operator is scaled by zero and has no inverse.",
    ),
    (
        "negative-scaled-odd-logdet",
        lambda: (-1 * _identity(3)).logdet(),
        NotImplementedError,
        "logdet of an operator of odd dimension scaled by a negative number (or by zero, "
        "undamped) needs the sign of the unscaled operator's determinant; take the logdet "
        "of the unscaled operator.",
    ),
    (
        "zero-scaled-negative-damping-logdet",
        lambda: (0 * _identity(3)).damped(-2.0).logdet(),
        ValueError,
        f"-2.0 I has a negative determinant; {_SPECTRUM_HINT}",
    ),
    (
        "damped-product-inverse",
        lambda: (_dense() @ _dense()).inverse(damping=1.0),
        NotImplementedError,
        "A damped product has no cheap exact inverse; use "
        "curvlinops.CGInverseLinearOperator on it.",
    ),
    (
        "non-square-product-inverse",
        lambda: (_dense(2, 3) @ _dense(3, 2)).inverse(),
        NotImplementedError,
        "Only products of square operators invert factorwise.",
    ),
    # interop.py
    (
        "callable-without-products",
        lambda: CallableLinearOperator((2, 2), dtype=npx.float64, xp=npx),
        ValueError,
        "CallableLinearOperator needs matvec or matmat.",
    ),
    (
        "aslinearoperator-callable-without-shape",
        lambda: aslinearoperator(lambda X: X, xp=npx),
        ValueError,
        "aslinearoperator of a callable needs shape= and xp=.",
    ),
    (
        "aslinearoperator-unknown",
        lambda: aslinearoperator("matrix"),
        TypeError,
        "aslinearoperator cannot convert a str; expected an array, a scipy LinearOperator, "
        "a callable matmat, or a curvlinops LinearOperator.",
    ),
    # layout.py
    (
        "layout-non-square",
        lambda: ParameterLayoutLinearOperator(_dense(2, 3), [[(0, 2)]]),
        ValueError,
        "ParameterLayoutLinearOperator needs a square operator, got shape (2, 3).",
    ),
    (
        "layout-no-blocks",
        lambda: ParameterLayoutLinearOperator(_dense(), []),
        ValueError,
        "A layout needs at least one block, got none.",
    ),
    # lowrank.py
    (
        "woodbury-indefinite-low-rank",
        lambda: DiagonalPlusLowRankLinearOperator(
            np.ones(2), np.array([-1.0]), np.array([[1.0], [0.0]])
        ).inverse(),
        ValueError,
        "The Woodbury inverse needs positive low-rank values s; use an EighLinearOperator "
        "or a dense inverse for indefinite low-rank parts.",
    ),
    # structured.py
    (
        "eigh-negative-determinant",
        lambda: EighLinearOperator(np.array([-1.0, 2.0]), np.eye(2)).logdet(),
        ValueError,
        "The eigendecomposed operator has a negative determinant (it is not positive "
        f"definite); {_SPECTRUM_HINT}",
    ),
    (
        "dense-ill-conditioned-inverse",  # the rule, before any factorization
        lambda: DenseLinearOperator(np.diag([1.0, 1e-17]), symmetric=True).inverse(),
        IllConditionedError,
        _pattern(_ILL_CONDITIONED.format(what="2x2 dense matrix", hint="")),
    ),
    (
        "kronecker-trace-of-non-square-factors",
        lambda: KroneckerLinearOperator(np.ones((2, 3)), np.eye(2)).trace(),
        ValueError,
        "trace needs a square operator; KroneckerLinearOperator has shape (4, 6).",
    ),
    (
        "dense-singular-inverse",
        _past_the_rule(lambda: DenseLinearOperator(_SINGULAR).inverse()),
        FactorizationError,
        f"The 2x2 dense matrix is singular and has no inverse. {_DAMPING_HINT}",
    ),
    (
        "dense-overflowing-inverse",
        lambda: DenseLinearOperator(1e-309 * np.eye(2)).inverse(),
        FactorizationError,
        "The 2x2 dense matrix has no finite inverse in float64: its entries overflow. "
        f"Rescale the matrix. {_DAMPING_HINT}",
    ),
    (
        "dense-singular-logdet",
        _past_the_rule(lambda: DenseLinearOperator(_SINGULAR).logdet()),
        FactorizationError,
        f"The dense matrix is singular: its log-determinant is -inf. {_DAMPING_HINT}",
    ),
    (
        "dense-eigh-not-symmetric",
        lambda: _dense().eigh(),
        NotImplementedError,
        "eigh needs a dense operator declared symmetric (symmetric=True).",
    ),
    (
        "dense-eigvalsh-not-symmetric",
        lambda: _dense().eigvalsh(),
        NotImplementedError,
        "eigvalsh needs a dense operator declared symmetric (symmetric=True).",
    ),
    (
        "dense-negative-determinant",
        lambda: DenseLinearOperator(np.array([[0.0, 1.0], [2.0, 0.0]])).logdet(),
        ValueError,
        "The dense matrix has a negative determinant (it is not positive definite); "
        f"{_SPECTRUM_HINT}",
    ),
    (
        "identity-minus-one-inverse",
        lambda: _identity(2).inverse(damping=-1.0),
        FactorizationError,
        "The identity plus damping -1 is the zero matrix and has no inverse.",
    ),
    (
        "identity-minus-one-logdet",
        lambda: _identity(2).damped(-1.0).logdet(),
        FactorizationError,
        "The identity plus damping -1 is singular.",
    ),
    (
        "identity-negative-determinant",
        lambda: _identity(3).damped(-2.0).logdet(),
        ValueError,
        f"The damped identity has a negative determinant; {_SPECTRUM_HINT}",
    ),
    (
        "block-diagonal-no-blocks",
        lambda: BlockDiagonalLinearOperator([]),
        ValueError,
        "A block-diagonal operator needs at least one block, got none.",
    ),
    (
        "block-diagonal-dtypes-differ",
        lambda: BlockDiagonalLinearOperator(
            [_dense(), DenseLinearOperator(np.eye(2, dtype=np.float32))]
        ),
        TypeError,
        "Block 0 has dtype float64 but Block 1 has dtype float32; convert all of them to one "
        "dtype.",
    ),
    (
        "kronecker-factor-dtypes-differ",
        lambda: KroneckerLinearOperator(_dense(), DenseLinearOperator(np.eye(2, dtype=np.float32))),
        TypeError,
        "Kronecker factor 0 has dtype float64 but Kronecker factor 1 has dtype float32; convert "
        "all of them to one dtype.",
    ),
    (
        "kronecker-no-factors",
        lambda: KroneckerLinearOperator(),
        ValueError,
        "A Kronecker product needs at least one factor, got none.",
    ),
    (
        "kronecker-non-symmetric-factor-inverse",
        lambda: KroneckerLinearOperator(_dense(), _identity(2)).inverse(damping=1.0),
        NotImplementedError,
        "The Kronecker factor 0 is not symmetric, so the damped inverse and log-determinant of the "
        "Kronecker product have no cheap exact form. Use curvlinops.CGInverseLinearOperator "
        "(or a symmetric factor).",
    ),
    (
        "kronecker-eigh-no-factors",
        lambda: KroneckerEighLinearOperator(np.ones(1), []),
        ValueError,
        "KroneckerEighLinearOperator needs at least one eigenvector factor.",
    ),
    (
        "eigh-wide-eigenvectors",
        lambda: EighLinearOperator(np.ones(3), np.ones((2, 3))),
        ValueError,
        "Expected eigenvectors of shape (n, k) with k <= n, got shape (2, 3).",
    ),
    # names and hints that the operators hand to the conditioning rule and factorizations
    (
        "diagonal-singular-logdet",
        lambda: DiagonalLinearOperator(np.array([1.0, 0.0])).logdet(),
        IllConditionedError,
        _pattern(
            _ILL_CONDITIONED.format(
                what="diagonal matrix",
                hint="Its log-determinant would be -inf or dominated by rounding. ",
            )
        ),
    ),
    (
        "low-rank-singular-diagonal-part",
        lambda: DiagonalPlusLowRankLinearOperator(
            np.array([1.0, 0.0]), np.array([1.0]), np.array([[1.0], [0.0]])
        ).inverse(),
        IllConditionedError,
        _pattern(_ILL_CONDITIONED.format(what="diagonal part (plus damping)", hint="")),
    ),
    (
        "woodbury-capacitance-not-positive-definite",
        lambda: DiagonalPlusLowRankLinearOperator(
            -np.ones(2), np.array([1.0]), np.array([[2.0], [0.0]])
        ).inverse(),  # 1/s + U^T D^{-1} U = 1 - 4 < 0
        FactorizationError,
        "Cholesky factorization of the Woodbury capacitance matrix failed: it is not "
        "positive definite (singular or indefinite). Add damping (e.g. inverse(damping=1e-3)).",
    ),
    (
        "kronecker-damped-names-the-worst-factor",
        lambda: (
            KroneckerLinearOperator(
                DenseLinearOperator(np.diag([1e4, 1e-10]), psd=True),
                DenseLinearOperator(np.diag([1e-8, 1.0]), psd=True),
            )
            .damped(1e-30)
            .logdet()
        ),  # factor 0's ratio 1e-14 is below factor 1's 1e-8
        IllConditionedError,
        _pattern(
            "The Kronecker factor 0 has the smallest eigenvalue relative to its largest ({}): "
            + _ILL_CONDITIONED.format(what="Kronecker product plus {} I", hint="")
        ),
    ),
    (
        "kronecker-eigh-damped-inverse-ill-conditioned",
        lambda: KroneckerEighLinearOperator(
            np.array([1.0, 1e-300, 1.0, 1.0]), [np.eye(2), np.eye(2)]
        ).inverse(damping=1e-300),
        IllConditionedError,
        _pattern(
            _ILL_CONDITIONED.format(what="Kronecker-eigendecomposed operator plus {} I", hint="")
        ),
    ),
    (
        "kronecker-factor-not-finite",
        lambda: KroneckerLinearOperator(
            DenseLinearOperator(np.full((2, 2), np.nan), symmetric=True),
            DenseLinearOperator(np.eye(2), psd=True),
        ).inverse(damping=1.0),
        FactorizationError,
        "The Kronecker factor 0: The symmetric dense matrix contains NaN or Inf; cannot "
        "eigendecompose it.",
    ),
    (
        "kronecker-scaled-factor-not-finite",  # a symmetric factor that is not dense
        lambda: KroneckerLinearOperator(
            2.0 * DenseLinearOperator(np.full((2, 2), np.nan), symmetric=True),
            DenseLinearOperator(np.eye(2), psd=True),
        ).inverse(damping=1.0),
        FactorizationError,
        "The Kronecker factor 0 contains NaN or Inf; cannot eigendecompose it.",
    ),
    (
        "dense-eigvalsh-not-finite",
        lambda: DenseLinearOperator(np.full((2, 2), np.nan), symmetric=True).eigvalsh(),
        FactorizationError,
        "The symmetric dense matrix contains NaN or Inf; cannot eigendecompose it.",
    ),
    (
        "low-rank-diagonal-part-negative-determinant",
        lambda: DiagonalPlusLowRankLinearOperator(
            np.array([-1.0, 2.0]), np.array([3.0]), np.array([[0.0], [1.0]])
        ).logdet(),  # the capacitance 1/3 + 1/2 is positive, det(D) = -2 is not
        ValueError,
        "The diagonal part (plus damping) has a negative determinant (it is not positive "
        "definite); logdet is defined here for matrices of positive determinant only.",
    ),
    (
        "low-rank-dtypes-differ",
        lambda: DiagonalPlusLowRankLinearOperator(
            np.ones(2), np.ones(1, dtype=np.float32), np.ones((2, 1))
        ),
        TypeError,
        "The arrays diagonal and low_rank_values must share one dtype, got float64 and "
        "float32; convert both to one dtype.",
    ),
    (
        "low-rank-vectors-dtype-differs",
        lambda: DiagonalPlusLowRankLinearOperator(
            np.ones(2), np.ones(1), np.ones((2, 1), dtype=np.float32)
        ),
        TypeError,
        "The arrays diagonal and low_rank_vectors must share one dtype, got float64 and "
        "float32; convert both to one dtype.",
    ),
    (
        "dense-eigh-not-finite",
        lambda: DenseLinearOperator(np.full((2, 2), np.nan), symmetric=True).eigh(),
        FactorizationError,
        "The symmetric dense matrix contains NaN or Inf; cannot eigendecompose it.",
    ),
    (
        "matmat-wrong-shape",
        lambda: _dense() @ np.ones((3, 2)),
        ValueError,
        "DenseLinearOperator of shape (2, 2) expected a matrix of shape (2, k), got shape (3, 2).",
    ),
    (
        "to-block-order-wrong-shape",
        lambda: ParameterLayoutLinearOperator(_dense(), [[(0, 2)]]).to_block_order(np.ones(3)),
        ValueError,
        "ParameterLayoutLinearOperator of shape (2, 2) expected an array of shape (2,) or "
        "(2, k), got shape (3,).",
    ),
]


@message_cases(CASES)
def test_message_is_complete(trigger, kind, expected):
    assert_message(trigger, kind, expected)


def test_device_message_is_complete():
    """The device check needs a second device, which array-api-strict provides."""
    _device_message()


def test_case_ids_are_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z0-9-]+", i) for i in ids)
