"""ParameterLayoutLinearOperator through the shared operator suite, and its errors.

The suite's checks (every ``test_*(case_name, backend, dtype_name)`` of
``test_operator_suite.py``) run on layout cases registered in a private copy of the
suite module, so the suite file itself is unchanged. The reference of ``P^T A P`` is
built independently: the permutation is an index array assembled here with NumPy from
the segments (``np.arange(...).reshape(rows, cols)`` side by side), and ``A``'s dense
reference comes from ``np.kron`` / ``scipy.linalg.block_diag`` as in the suite.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from curvlinops import (
    BlockDiagonalLinearOperator,
    DenseLinearOperator,
    DiagonalLinearOperator,
    KroneckerEighLinearOperator,
    KroneckerLinearOperator,
    ParameterLayoutLinearOperator,
)

_SUITE_PATH = Path(__file__).resolve().parent / "test_operator_suite.py"
_spec = importlib.util.spec_from_file_location("_layout_operator_suite_copy", _SUITE_PATH)
suite = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = suite  # dataclasses look their module up there
_spec.loader.exec_module(suite)


def permutation(layout):
    """``perm`` with ``(P x) = x[perm]``, from the segments, in NumPy."""
    rows = []
    for block in layout:
        parts = []
        for start, shape in block:
            r, c = (1, shape) if isinstance(shape, int) else shape
            parts.append(start + np.arange(r * c).reshape(r, c))
        rows.append(np.concatenate(parts, axis=1).ravel())
    return np.concatenate(rows)


def conjugated(A64, layout):
    """``P^T A P`` as a dense NumPy matrix."""
    P = np.eye(len(A64))[permutation(layout)]
    return P.T @ A64 @ P


# A layer with weight (2, 3) and bias (2,), one with weight (3, 2) and bias (3,), flat as
# [W0, b0, W1, b1]: the first joint over [W0 | b0], the second split in weight and bias.
LAYERS = [[(0, (2, 3)), (6, (2, 1))], [(8, 6)], [(14, (3, 1))]]


def _kronecker_blocks(backend, dtype, rng):
    B0, B0_64 = suite.put(backend, dtype, suite.spd(rng, 2))
    A0, A0_64 = suite.put(backend, dtype, suite.spd(rng, 4))
    B1, B1_64 = suite.put(backend, dtype, suite.spd(rng, 3))
    A1, A1_64 = suite.put(backend, dtype, suite.spd(rng, 2))
    inner = BlockDiagonalLinearOperator(
        [
            KroneckerLinearOperator(B0, A0),
            KroneckerLinearOperator(B1, A1),
            DenseLinearOperator(B1, symmetric=True),
        ]
    )
    ref = scipy.linalg.block_diag(np.kron(B0_64, A0_64), np.kron(B1_64, A1_64), B1_64)
    op = ParameterLayoutLinearOperator(inner, LAYERS)
    return suite.Case(op, conjugated(ref, LAYERS), suite.ALL_QUERIES)


def _kronecker_eigh_joint(backend, dtype, rng):
    lam, lam64 = suite.put(backend, dtype, suite.positive(rng, 8))
    Q1, Q1_64 = suite.put(backend, dtype, suite.orthonormal(rng, 2, 2))
    Q2, Q2_64 = suite.put(backend, dtype, suite.orthonormal(rng, 4, 4))
    layout = [[(0, (2, 3)), (6, (2, 1))]]
    Q = np.kron(Q1_64, Q2_64)
    ref = Q @ np.diag(lam64) @ Q.T
    op = ParameterLayoutLinearOperator(KroneckerEighLinearOperator(lam, [Q1, Q2]), layout)
    return suite.Case(op, conjugated(ref, layout), suite.ALL_QUERIES)


def _reversed_nonsymmetric(backend, dtype, rng):
    # A general (not block-diagonal, not symmetric) A: products go through P^T A P.
    A, A64 = suite.put(backend, dtype, suite.dominant(rng, 6))
    layout = [[(4, 2)], [(0, (2, 2))]]
    op = ParameterLayoutLinearOperator(DenseLinearOperator(A), layout)
    return suite.Case(op, conjugated(A64, layout), suite.ALL_QUERIES)


def _identity_layout(backend, dtype, rng):
    d, d64 = suite.put(backend, dtype, suite.positive(rng, 6))
    layout = [[(0, 2)], [(2, 4)]]
    inner = BlockDiagonalLinearOperator(
        [DiagonalLinearOperator(d[:2]), DiagonalLinearOperator(d[2:])]
    )
    return suite.Case(ParameterLayoutLinearOperator(inner, layout), np.diag(d64), suite.ALL_QUERIES)


# A grouped weight stored transposed, W^T (3, 4) with 2 groups of 2 columns, and a bias
# (4,), flat as [W^T, b]: group g's joint block [W_g^T; b_g^T] is a segment per row of W^T
# plus its bias entries (more than two segments: the gather path).
GROUPED_TRANSPOSED = [[(i * 4 + 2 * g, 2) for i in range(3)] + [(12 + 2 * g, 2)] for g in (0, 1)]


def _grouped_transposed_blocks(backend, dtype, rng):
    blocks, refs = [], []
    for _ in GROUPED_TRANSPOSED:
        A, A64 = suite.put(backend, dtype, suite.spd(rng, 4))
        B, B64 = suite.put(backend, dtype, suite.spd(rng, 2))
        blocks.append(KroneckerLinearOperator(A, B))
        refs.append(np.kron(A64, B64))
    inner = BlockDiagonalLinearOperator(blocks)
    ref = scipy.linalg.block_diag(*refs)
    op = ParameterLayoutLinearOperator(inner, GROUPED_TRANSPOSED)
    return suite.Case(op, conjugated(ref, GROUPED_TRANSPOSED), suite.ALL_QUERIES)


def _grouped_transposed_nonsymmetric(backend, dtype, rng):
    A, A64 = suite.put(backend, dtype, suite.dominant(rng, 16))
    op = ParameterLayoutLinearOperator(DenseLinearOperator(A), GROUPED_TRANSPOSED)
    return suite.Case(op, conjugated(A64, GROUPED_TRANSPOSED), suite.ALL_QUERIES)


def _aligned_nonsymmetric(layout):
    """Aligned non-symmetric dense blocks: products and adjoints go block by block."""

    def build(backend, dtype, rng):
        sizes = [sum(r * c for _, (r, c) in _shaped(block)) for block in layout]
        blocks, refs = [], []
        for m in sizes:
            A, A64 = suite.put(backend, dtype, suite.dominant(rng, m))
            blocks.append(DenseLinearOperator(A))
            refs.append(A64)
        op = ParameterLayoutLinearOperator(BlockDiagonalLinearOperator(blocks), layout)
        return suite.Case(op, conjugated(scipy.linalg.block_diag(*refs), layout), suite.ALL_QUERIES)

    return build


def _shaped(block):
    """Segments as ``(start, (rows, cols))`` (a plain length is one column)."""
    return [(s, shape if isinstance(shape, tuple) else (shape, 1)) for s, shape in block]


CASES = {
    "layout_aligned_nonsymmetric_sliced": _aligned_nonsymmetric(
        [[(0, (2, 3)), (6, (2, 1))], [(8, 2)]]
    ),
    "layout_aligned_nonsymmetric_gathered": _aligned_nonsymmetric(GROUPED_TRANSPOSED),
    "layout_grouped_transposed": _grouped_transposed_blocks,
    "layout_grouped_transposed_nonsymmetric": _grouped_transposed_nonsymmetric,
    "layout_kronecker_blocks": _kronecker_blocks,
    "layout_kronecker_eigh_joint": _kronecker_eigh_joint,
    "layout_reversed_nonsymmetric": _reversed_nonsymmetric,
    "layout_identity": _identity_layout,
}
for _name, _builder in CASES.items():
    suite.register_case(_name)(_builder)

SUITE_CHECKS = suite.suite_checks()


@pytest.mark.parametrize("check", SUITE_CHECKS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_operator_suite(check, case_name, backend, dtype_name):
    getattr(suite, check)(case_name, backend, dtype_name)


def test_the_suite_checks_were_found():
    assert {"test_queries", "test_products_and_adjoint"} <= set(SUITE_CHECKS)


# -- the permutation itself ------------------------------------------------------------


def test_to_and_from_block_order_invert_each_other():
    rng = np.random.default_rng(0)
    op = ParameterLayoutLinearOperator(DenseLinearOperator(np.eye(17), symmetric=True), LAYERS)
    X = rng.normal(size=(17, 3))
    perm = permutation(LAYERS)
    np.testing.assert_array_equal(op.to_block_order(X), X[perm])
    np.testing.assert_array_equal(op.to_block_order(X[:, 0]), X[perm, 0])
    np.testing.assert_array_equal(op.from_block_order(op.to_block_order(X)), X)
    np.testing.assert_array_equal(op.from_block_order(X[perm, 1]), X[:, 1])
    # the joint block is [W0 | b0] row by row: W0[0, :], b0[0], W0[1, :], b0[1]
    np.testing.assert_array_equal(perm[:8], [0, 1, 2, 6, 3, 4, 5, 7])
    grouped = ParameterLayoutLinearOperator(
        DenseLinearOperator(np.eye(16), symmetric=True), GROUPED_TRANSPOSED
    )
    Y = rng.normal(size=(16, 2))
    np.testing.assert_array_equal(grouped.to_block_order(Y), Y[permutation(GROUPED_TRANSPOSED)])
    np.testing.assert_array_equal(grouped.from_block_order(grouped.to_block_order(Y)), Y)
    # group 0: the first two entries of each row of W^T (3, 4), then b[0:2]
    np.testing.assert_array_equal(permutation(GROUPED_TRANSPOSED)[:8], [0, 1, 4, 5, 8, 9, 12, 13])
    with pytest.raises(ValueError, match=r"\(17, k\)"):
        op.to_block_order(np.ones((17, 2, 2)))
    with pytest.raises(ValueError, match=r"\(17,\)"):
        op.from_block_order(np.ones(16))


def test_a_layout_already_in_block_order_copies_nothing():
    """Blocks of one segment each, in the flat order: ``P = I``, so the reorderings hand
    the arrays through (no copy inside a product), and products are the wrapped ones."""
    layout = [[(0, (2, 3))], [(6, (4, 1))]]  # W (2, 3) then b (4,): already in block order
    A = np.random.default_rng(1).normal(size=(10, 10))
    op = ParameterLayoutLinearOperator(DenseLinearOperator(A), layout)
    X = np.random.default_rng(2).normal(size=(10, 3))
    assert np.shares_memory(op.to_block_order(X), X)
    assert np.shares_memory(op.from_block_order(X), X)
    np.testing.assert_allclose(op @ X, A @ X, rtol=1e-14)
    shuffled = ParameterLayoutLinearOperator(DenseLinearOperator(A), layout[::-1])
    assert not np.shares_memory(shuffled.to_block_order(X), X)  # a real permutation copies


def test_invalid_layouts_are_refused():
    A = DenseLinearOperator(np.eye(6), symmetric=True)
    cover = "they must cover the {} entries of the flat vector exactly once."
    cases = [
        ([[(0, 4)], [(3, 3)]], "The layout's segments overlap at index 3: " + cover.format(7)),
        ([[(0, 2)], [(3, 3)]], "The layout's segments leave a gap at index 2: " + cover.format(5)),
        (
            [[(0, (2, 2)), (4, (1, 2))]],
            "The segments of block 0 are placed side by side and need the same number of "
            "rows; got shapes [(2, 2), (1, 2)].",
        ),
        ([[]], "Block 0 of the layout has no segments."),
        ([], "A layout needs at least one block, got none."),
        (
            [[(0, 6)], [(6, (2, -3))]],
            "Segment 0 of block 1 must be (start >= 0, (rows, cols)) with non-negative sizes, "
            "got (6, (2, -3)).",
        ),
        (
            [[(0, 3), ("a", 3)]],
            "Segment 1 of block 0 must be (start >= 0, (rows, cols)) with non-negative sizes, "
            "got ('a', 3).",
        ),
        (
            [[6]],
            "Segment 0 of block 0 must be a pair (start, (rows, cols)) or (start, size), got 6.",
        ),
    ]
    for layout, message in cases:
        with pytest.raises(ValueError) as info:
            ParameterLayoutLinearOperator(A, layout)
        assert str(info.value) == message
    calls = [
        (
            ValueError,
            lambda: ParameterLayoutLinearOperator(A, [[(0, 2)]], size=6),
            "The layout's segments cover 2 entries, the flat vector has 6.",
        ),
        (
            ValueError,
            lambda: ParameterLayoutLinearOperator(DenseLinearOperator(np.ones((6, 5))), [[(0, 6)]]),
            "ParameterLayoutLinearOperator needs a square operator, got shape (6, 5).",
        ),
        (
            ValueError,
            lambda: ParameterLayoutLinearOperator(DenseLinearOperator(np.eye(5)), [[(0, 6)]]),
            "The layout has 6 entries but the operator has shape (5, 5).",
        ),
        (
            TypeError,
            lambda: ParameterLayoutLinearOperator(np.eye(6), [[(0, 6)]]),
            "ParameterLayoutLinearOperator wraps a LinearOperator, got a ndarray.",
        ),
    ]
    for error, call, message in calls:
        with pytest.raises(error) as info:
            call()
        assert str(info.value) == message


def test_tags_follow_the_wrapped_operator_or_the_declaration():
    """``P^T A P`` (``P`` a permutation) is symmetric exactly when ``A`` is, and PSD when
    ``A`` is; ``psd=True`` declares both for an ``A`` not declared symmetric."""
    rng = np.random.default_rng(7)
    G = rng.standard_normal((6, 6))
    layout = [[(0, (2, 2)), (4, (2, 1))]]
    dense = {
        "symmetric": DenseLinearOperator(G + G.T, symmetric=True),
        "psd": DenseLinearOperator(G @ G.T, psd=True),
        "undeclared": DenseLinearOperator(G @ G.T),
        "general": DenseLinearOperator(G),
    }
    expected = {
        "symmetric": (True, False),
        "psd": (True, True),
        "undeclared": (False, False),
        "general": (False, False),
    }
    for name, A in dense.items():
        op = ParameterLayoutLinearOperator(A, layout)
        assert (op.is_symmetric, op.is_psd) == expected[name], name
        assert (op.adjoint() is op) == expected[name][0], name
        np.testing.assert_allclose(op.adjoint().to_dense(), conjugated(A.A, layout).T)
    declared = ParameterLayoutLinearOperator(dense["undeclared"], layout, psd=True)
    assert (declared.is_symmetric, declared.is_psd) == (True, True)
    assert declared.adjoint() is declared
    symmetric_declared = ParameterLayoutLinearOperator(dense["symmetric"], layout, psd=True)
    assert (symmetric_declared.is_symmetric, symmetric_declared.is_psd) == (True, True)
    # the inverse of a damped PSD operator is PSD for every damping >= 0, also where only
    # the layout is declared PSD (the wrapped operator's inverse carries no tag)
    for damping in (0.0, 0.5, 2.0):
        assert ParameterLayoutLinearOperator(dense["psd"], layout).inverse(damping).is_psd
        assert declared.inverse(damping).is_psd


@pytest.mark.parametrize("sizes", [[8, 9], [2, 6, 4, 5]], ids=["fewer", "more"])
def test_block_diagonal_operators_with_other_blocks_than_the_layout(sizes):
    """A block-diagonal operator whose blocks do not match the layout's three blocks (8,
    6 and 3 entries) is applied as one operator: ``P^T B P`` as for any other."""
    rng = np.random.default_rng(5)
    blocks = []
    for m in sizes:
        G = rng.standard_normal((m, m))
        blocks.append(G @ G.T)
    B = BlockDiagonalLinearOperator([DenseLinearOperator(M) for M in blocks])
    op = ParameterLayoutLinearOperator(B, LAYERS)
    V = rng.standard_normal((17, 2))
    expected = conjugated(scipy.linalg.block_diag(*blocks), LAYERS)
    np.testing.assert_allclose(op @ V, expected @ V, rtol=1e-12)
    np.testing.assert_allclose(op.to_dense(), expected, rtol=1e-12)


def test_aligned_block_diagonal_operators_are_applied_block_by_block(monkeypatch):
    """Blocks of the layout's sizes (8, 6 and 3 entries): each block multiplies its own
    rows, without the permutation of the whole vector into block order and back."""
    rng = np.random.default_rng(6)
    blocks = [rng.standard_normal((m, m)) for m in (8, 6, 3)]
    B = BlockDiagonalLinearOperator([DenseLinearOperator(M) for M in blocks])
    op = ParameterLayoutLinearOperator(B, LAYERS)

    def whole(*_):
        raise AssertionError("the block-diagonal operator was applied as a whole")

    monkeypatch.setattr(B, "_matmat", whole)
    monkeypatch.setattr(B, "_rmatmat", whole)
    V = rng.standard_normal((17, 2))
    expected = conjugated(scipy.linalg.block_diag(*blocks), LAYERS)
    np.testing.assert_allclose(op @ V, expected @ V, rtol=1e-12)
    np.testing.assert_allclose(op.T @ V, expected.T @ V, rtol=1e-12)


def test_a_zero_size_segment_is_accepted_and_moves_nothing():
    """A segment of shape (2, 0) (a parameter without entries, e.g. a bias of a layer with
    no outputs) covers no entries: the layout equals the one without it."""
    rng = np.random.default_rng(8)
    G = rng.standard_normal((17, 17))
    A = DenseLinearOperator(G @ G.T)
    with_empty = [[(0, (2, 3)), (6, (2, 0)), (6, (2, 1))], [(8, 6)], [(14, (3, 1))]]
    op = ParameterLayoutLinearOperator(A, with_empty)
    np.testing.assert_allclose(op.to_dense(), conjugated(G @ G.T, LAYERS), rtol=1e-12)
