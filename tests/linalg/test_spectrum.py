"""``eigvalsh()``: every eigenvalue of a structured symmetric operator, from its structure.

Compared (sorted) with ``numpy.linalg.eigvalsh`` of dense references assembled here
(``np.kron``, ``scipy.linalg.block_diag``, ``Q diag(lam) Q^T``).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from curvlinops import (
    BlockDiagonalLinearOperator,
    CallableLinearOperator,
    DenseLinearOperator,
    DiagonalLinearOperator,
    EighLinearOperator,
    KroneckerEighLinearOperator,
    KroneckerLinearOperator,
    ParameterLayoutLinearOperator,
)


def spd(rng, n):
    G = rng.normal(size=(n, n))
    return G @ G.T / n + 0.5 * np.eye(n)


def orthogonal(rng, n):
    return np.linalg.qr(rng.normal(size=(n, n)))[0]


def _cases(rng):
    A, B, C = spd(rng, 3), spd(rng, 2), spd(rng, 4)
    d = rng.uniform(-1.0, 2.0, size=3)
    lam, Q = rng.normal(size=2), orthogonal(rng, 4)[:, :2]
    Q1, Q2 = orthogonal(rng, 2), orthogonal(rng, 3)
    mu = rng.normal(size=6)
    kron = KroneckerLinearOperator(A, B)
    yield "dense", DenseLinearOperator(A, symmetric=True), A
    yield "diagonal", DiagonalLinearOperator(d), np.diag(d)
    yield "eigh low rank", EighLinearOperator(lam, Q), Q @ np.diag(lam) @ Q.T
    yield "kronecker", kron, np.kron(A, B)
    yield "kronecker3", KroneckerLinearOperator(A, B, C), np.kron(np.kron(A, B), C)
    QQ = np.kron(Q1, Q2)
    yield "kronecker eigh", KroneckerEighLinearOperator(mu, [Q1, Q2]), QQ @ np.diag(mu) @ QQ.T
    block = BlockDiagonalLinearOperator([kron, DiagonalLinearOperator(d)])
    ref = scipy.linalg.block_diag(np.kron(A, B), np.diag(d))
    yield "block diagonal", block, ref
    yield "scaled damped", 2.0 * block.damped(0.5), 2.0 * (ref + 0.5 * np.eye(9))
    yield "negatively scaled", -3.0 * block, -3.0 * ref
    yield "scaled by zero", 0.0 * block, np.zeros_like(ref)
    layout = [[(3, (2, 3))], [(0, 3)]]
    # a permutation P keeps the spectrum: P^T A P has A's eigenvalues (the reference is
    # A's, not the layout operator's own dense form)
    yield "layout", ParameterLayoutLinearOperator(block, layout), ref
    yield (
        "damped layout",
        ParameterLayoutLinearOperator(block, layout).damped(-0.25),
        (ref - 0.25 * np.eye(9)),
    )


@pytest.mark.parametrize("index", range(12))
def test_eigvalsh_against_numpy(index):
    rng = np.random.default_rng(index)
    name, op, ref = list(_cases(rng))[index]
    actual = np.sort(np.asarray(op.eigvalsh()))
    np.testing.assert_allclose(
        actual, np.linalg.eigvalsh(ref), rtol=1e-10, atol=1e-12, err_msg=name
    )


def test_eigvalsh_refuses_without_structure():
    op = CallableLinearOperator((2, 2), matmat=lambda X: X, dtype=np.float64, xp=np, device=None)
    with pytest.raises(NotImplementedError, match="eigsh"):
        op.eigvalsh()
    with pytest.raises(NotImplementedError, match="symmetric"):
        DenseLinearOperator(np.eye(2)).eigvalsh()
