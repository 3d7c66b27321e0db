"""Property tests (hypothesis) for the structured operators, against NumPy/SciPy.

Hypothesis draws shapes, numbers of Kronecker factors (2-3) and blocks (1-4), ranks,
damping and seeds; the defining arrays come from a seeded NumPy generator and the dense
references from ``np.kron``, ``scipy.linalg.block_diag``, ``np.diag`` and
``Q @ diag(lam) @ Q.T``. These run on NumPy only; the backend matrix is covered by
``test_operator_suite.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, strategies as st

from curvlinops import (
    BlockDiagonalLinearOperator,
    DenseLinearOperator,
    DiagonalLinearOperator,
    EighLinearOperator,
    FactorizationError,
    IdentityLinearOperator,
    KroneckerEighLinearOperator,
    KroneckerLinearOperator,
)

RTOL = 1e-10
seeds = st.integers(0, 2**32 - 1)
dampings = st.sampled_from([1e-2, 0.3, 2.0])


def close(actual, expected, rtol=RTOL):
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * scale)


def spd(rng, n):
    G = rng.normal(size=(n, n))
    return G @ G.T / n + 0.5 * np.eye(n)


def dominant(rng, n):
    return rng.normal(size=(n, n)) / (2 * np.sqrt(n)) + 2 * np.eye(n)


def orthogonal(rng, n):
    return np.linalg.qr(rng.normal(size=(n, n)))[0]


def check_products(op, ref, rng, k):
    m, n = ref.shape
    X, Y = rng.normal(size=(n, k)), rng.normal(size=(m, k))
    close(op @ X, ref @ X)
    close(op.rmatmat(Y), ref.T @ Y)
    close(op @ X[:, 0], ref @ X[:, 0])
    close(op.to_dense(), ref)
    close(op.adjoint().to_dense(), ref.T)
    close(op.frobenius_norm(), np.linalg.norm(ref))


def check_square_queries(op, ref, damping, rng):
    n = ref.shape[0]
    X = rng.normal(size=(n, 2))
    shifted = ref + damping * np.eye(n)
    close(op.inverse(damping=damping) @ X, np.linalg.solve(shifted, X), rtol=1e-8)
    close(op.trace(), np.trace(ref))
    close(op.diagonal(), np.diag(ref))
    close(op._logdet(damping), np.linalg.slogdet(shifted)[1])


@given(
    seed=seeds,
    dims=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=2, max_size=3),
    k=st.integers(1, 3),
)
def test_kronecker_rectangular_products(seed, dims, k):
    rng = np.random.default_rng(seed)
    factors = [rng.normal(size=shape) for shape in dims]
    ref = factors[0]
    for f in factors[1:]:
        ref = np.kron(ref, f)
    check_products(KroneckerLinearOperator(*factors), ref, rng, k)


@given(
    seed=seeds,
    sizes=st.lists(st.integers(1, 4), min_size=2, max_size=3),
    damping=dampings,
    k=st.integers(1, 3),
)
def test_kronecker_spd(seed, sizes, damping, k):
    rng = np.random.default_rng(seed)
    factors = [spd(rng, n) for n in sizes]
    ref = factors[0]
    for f in factors[1:]:
        ref = np.kron(ref, f)
    op = KroneckerLinearOperator(*factors)
    check_products(op, ref, rng, k)
    check_square_queries(op, ref, damping, rng)
    X = rng.normal(size=(ref.shape[0], k))
    close(op.inverse() @ X, np.linalg.solve(ref, X), rtol=1e-8)
    close(op.logdet(), np.linalg.slogdet(ref)[1])


@given(seed=seeds, sizes=st.lists(st.integers(1, 3), min_size=2, max_size=3))
def test_kronecker_nonsymmetric_inverse(seed, sizes):
    rng = np.random.default_rng(seed)
    factors = [dominant(rng, n) for n in sizes]
    ref = factors[0]
    for f in factors[1:]:
        ref = np.kron(ref, f)
    op = KroneckerLinearOperator(*factors)
    close(op.inverse().to_dense(), np.linalg.inv(ref), rtol=1e-8)
    close(op.logdet(), np.linalg.slogdet(ref)[1])
    if any(n > 1 for n in sizes):
        with pytest.raises(NotImplementedError, match="not symmetric"):
            op.inverse(damping=0.1)


@st.composite
def blocks(draw):
    """1-4 square blocks of mixed kinds: (operator or array, dense reference)."""
    rng = np.random.default_rng(draw(seeds))
    out = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 4))
        kind = draw(st.sampled_from(["dense", "spd", "diagonal", "eigh"]))
        if kind == "dense":
            A = dominant(rng, n)
            out.append((A, A))
        elif kind == "spd":
            A = spd(rng, n)
            out.append((DenseLinearOperator(A, symmetric=True), A))
        elif kind == "diagonal":
            d = rng.uniform(0.5, 2.0, size=n)
            out.append((DiagonalLinearOperator(d), np.diag(d)))
        else:
            lam, Q = rng.uniform(0.5, 2.0, size=n), orthogonal(rng, n)
            out.append((EighLinearOperator(lam, Q), Q @ np.diag(lam) @ Q.T))
    return out


@given(parts=blocks(), damping=dampings, k=st.integers(1, 3), seed=seeds)
def test_block_diagonal(parts, damping, k, seed):
    rng = np.random.default_rng(seed)
    op = BlockDiagonalLinearOperator([p for p, _ in parts])
    ref = scipy.linalg.block_diag(*(r for _, r in parts))
    check_products(op, ref, rng, k)
    check_square_queries(op, ref, damping, rng)
    close(op.inverse().to_dense(), np.linalg.inv(ref), rtol=1e-8)
    close(op.logdet(), np.linalg.slogdet(ref)[1])


@given(
    seed=seeds,
    shapes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=4),
    k=st.integers(1, 3),
)
def test_block_diagonal_rectangular(seed, shapes, k):
    rng = np.random.default_rng(seed)
    parts = [rng.normal(size=s) for s in shapes]
    op = BlockDiagonalLinearOperator(parts)
    check_products(op, scipy.linalg.block_diag(*parts), rng, k)


@given(seed=seeds, n=st.integers(1, 6), data=st.data(), damping=dampings, k=st.integers(1, 3))
def test_eigh(seed, n, data, damping, k):
    rank = data.draw(st.integers(1, n))
    rng = np.random.default_rng(seed)
    lam = rng.uniform(0.1, 3.0, size=rank) * rng.choice([-1.0, 1.0], size=rank)
    # keep lam + damping away from 0 so that the damped matrix is well conditioned
    lam = np.where(np.abs(lam + damping) < 0.05, lam - 0.1, lam)
    Q = orthogonal(rng, n)[:, :rank]
    ref = Q @ np.diag(lam) @ Q.T
    op = EighLinearOperator(lam, Q)
    check_products(op, ref, rng, k)
    shifted = ref + damping * np.eye(n)
    X = rng.normal(size=(n, k))
    close(op.inverse(damping=damping) @ X, np.linalg.solve(shifted, X), rtol=1e-7)
    close(op.trace(), np.trace(ref))
    close(op.diagonal(), np.diag(ref))
    sign, logabs = np.linalg.slogdet(shifted)
    if sign > 0:
        close(op._logdet(damping), logabs)
    else:
        with pytest.raises(ValueError, match="positive determinant"):
            op._logdet(damping)
    if rank < n:
        with pytest.raises(FactorizationError, match="damping"):
            op.inverse()


@given(seed=seeds, n=st.integers(1, 6), damping=st.sampled_from([0.0, 0.3]))
def test_diagonal(seed, n, damping):
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.5, 2.0, size=n) * rng.choice([-1.0, 1.0], size=n)
    op = DiagonalLinearOperator(d)
    ref = np.diag(d)
    check_products(op, ref, rng, 2)
    shifted = ref + damping * np.eye(n)
    close(op.inverse(damping=damping).to_dense(), np.linalg.inv(shifted))
    sign, logabs = np.linalg.slogdet(shifted)
    if sign > 0:
        close(op._logdet(damping), logabs)
    else:
        with pytest.raises(ValueError, match="positive determinant"):
            op._logdet(damping)


@given(seed=seeds, sizes=st.lists(st.integers(1, 3), min_size=2, max_size=3), damping=dampings)
def test_kronecker_eigh(seed, sizes, damping):
    rng = np.random.default_rng(seed)
    Qs = [orthogonal(rng, n) for n in sizes]
    n = int(np.prod(sizes))
    lam = rng.uniform(0.5, 2.0, size=n)
    Q = Qs[0]
    for Qi in Qs[1:]:
        Q = np.kron(Q, Qi)
    ref = Q @ np.diag(lam) @ Q.T
    op = KroneckerEighLinearOperator(lam, Qs)
    check_products(op, ref, rng, 2)
    check_square_queries(op, ref, damping, rng)


@given(seed=seeds, n=st.integers(1, 5), damping=st.sampled_from([0.0, 0.3]), k=st.integers(1, 3))
def test_dense(seed, n, damping, k):
    rng = np.random.default_rng(seed)
    A = dominant(rng, n)
    op = DenseLinearOperator(A)
    check_products(op, A, rng, k)
    check_square_queries(op, A, damping, rng)
    close(op.inverse(damping=damping).to_dense(), np.linalg.inv(A + damping * np.eye(n)))


@given(n=st.integers(1, 6), damping=st.sampled_from([-3.0, -0.5, 0.0, 0.3]))
def test_identity(n, damping):
    import array_api_compat.numpy as xp

    op = IdentityLinearOperator(n, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(n)
    check_products(op, np.eye(n), rng, 2)
    shifted = (1.0 + damping) * np.eye(n)
    close(op.inverse(damping=damping).to_dense(), np.linalg.inv(shifted))
    close(op.trace(), n)
    close(op.diagonal(), np.ones(n))
    sign, logabs = np.linalg.slogdet(shifted)
    if sign > 0:
        close(op._logdet(damping), logabs)
    else:
        with pytest.raises(ValueError, match="positive determinant"):
            op._logdet(damping)
