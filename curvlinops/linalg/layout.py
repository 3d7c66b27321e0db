"""An operator in a different layout of its vectors: ``P^T A P`` for a block layout ``P``.

What lives here: :class:`ParameterLayoutLinearOperator`, which applies a square
operator ``A`` that acts on *blocks* (e.g. a :class:`BlockDiagonalLinearOperator` with
one block per layer) to flat vectors laid out differently (e.g. the flat parameter
vector of a model, where a layer's weight and bias need not be contiguous and a joint
``[W | b]`` block interleaves them). ``P`` is a permutation, applied by slicing,
reshaping and concatenating, never as a matrix; since it is orthogonal, every exact
query of ``A`` (inverse with damping, trace, log-determinant, eigenvalues, Frobenius
norm) carries over, and the diagonal is ``A``'s diagonal permuted.

May import: ``curvlinops._backend``, ``.base``, ``.structured``.
"""

from __future__ import annotations

import numbers

from .base import LinearOperator
from .structured import BlockDiagonalLinearOperator

__all__ = ["ParameterLayoutLinearOperator"]


def _segment(spec, block, index):
    """``(start, rows, cols)`` of one segment ``(start, (rows, cols))`` or ``(start, size)``."""
    try:
        start, shape = spec
    except (TypeError, ValueError):
        raise ValueError(
            f"Segment {index} of block {block} must be a pair (start, (rows, cols)) or "
            f"(start, size), got {spec!r}."
        ) from None
    if isinstance(shape, numbers.Integral):
        shape = (1, int(shape))
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 0 or not isinstance(start, numbers.Integral) or start < 0:
        raise ValueError(
            f"Segment {index} of block {block} must be (start >= 0, (rows, cols)) with "
            f"non-negative sizes, got {spec!r}."
        )
    return int(start), shape[0], shape[1]


class ParameterLayoutLinearOperator(LinearOperator):
    """``P^T A P``: a square operator ``A`` on blocks, applied to flat vectors in another layout.

    ``P`` maps a flat vector ``x`` (e.g. a model's parameters, flattened in C order and
    concatenated) to the blocks ``A`` acts on, concatenated in block order. Each block
    is made of *segments* of ``x``: the segment ``(start, (rows, cols))`` is the slice
    ``x[start : start + rows * cols]`` viewed as a C-order ``(rows, cols)`` matrix, and a
    block's vector is the C-order flattening of its segments placed side by side,
    ``[S_1 | S_2 | ...]`` (all with the same number of rows). A K-FAC layer with weight
    ``W`` (``D_out x D_in``) and bias ``b`` is one block
    ``[(start_W, (D_out, D_in)), (start_b, (D_out, 1))]`` (the joint ``[W | b]`` in the
    order of ``B (x) A``), or two blocks. ``(start, size)`` is a contiguous slice taken
    as it is. The segments must cover ``x`` exactly once, so ``P`` is a permutation;
    it is applied by slicing, reshaping and concatenating (one pass over the rows, for
    all columns of a matrix at once), never formed; a layout with a block of more than
    two segments (e.g. a grouped weight stored transposed: a segment per row) is
    applied as one gather of rows by an index array built once, ``xp.take``.

    Because ``P`` is orthogonal, ``(P^T A P + d I)^{-1} = P^T (A + d I)^{-1} P``: the
    inverse (with damping), trace, log-determinant, eigenvalues and Frobenius norm are
    ``A``'s, and the diagonal is ``A``'s permuted. When ``A`` is a
    :class:`BlockDiagonalLinearOperator` whose blocks match the layout's, products apply
    each block to its segments directly.

    Parameters
    ----------
    operator : LinearOperator
        Square ``A`` of dimension ``n``, acting on the blocks concatenated in order.
    blocks : sequence of sequences of segments
        For each block, its segments ``(start, (rows, cols))`` or ``(start, size)``.
    size : int, optional
        Length ``n`` of the flat vectors (default: the segments' total; it must equal
        ``A``'s dimension either way).

    Raises
    ------
    ValueError
        If the segments overlap, leave part of ``x`` uncovered, disagree in their rows
        within a block, or do not add up to ``A``'s dimension (or a block of a
        block-diagonal ``A`` is not square).

    Examples
    --------
    A weight ``W`` (2 x 2) and a bias ``b`` (2), flat as ``[W.ravel(), b]``, with one
    block over ``[W | b]`` (a 2 x 3 matrix, C order):

    >>> import numpy as np
    >>> from curvlinops import DenseLinearOperator
    >>> M = np.diag(np.arange(1.0, 7.0))  # acts on vec([W | b])
    >>> layout = [[(0, (2, 2)), (4, (2, 1))]]
    >>> op = ParameterLayoutLinearOperator(DenseLinearOperator(M, symmetric=True), layout)
    >>> x = np.array([1.0, 1.0, 1.0, 1.0, 10.0, 10.0])  # W = ones, b = (10, 10)
    >>> op.to_block_order(x).tolist()  # [W | b] row by row
    [1.0, 1.0, 10.0, 1.0, 1.0, 10.0]
    >>> (op @ x).tolist()  # M scales vec([W | b]); back in the flat layout
    [1.0, 2.0, 4.0, 5.0, 30.0, 60.0]
    >>> op.diagonal().tolist()
    [1.0, 2.0, 4.0, 5.0, 3.0, 6.0]
    >>> bool(np.allclose(op.inverse(damping=1.0).to_dense(),
    ...                  np.linalg.inv(op.to_dense() + np.eye(6))))
    True
    """

    def __init__(self, operator: LinearOperator, blocks, *, size=None, psd=None):
        if not isinstance(operator, LinearOperator):
            raise TypeError(
                f"ParameterLayoutLinearOperator wraps a LinearOperator, got a "
                f"{type(operator).__name__}."
            )
        if operator.shape[0] != operator.shape[1]:
            raise ValueError(
                "ParameterLayoutLinearOperator needs a square operator, got shape "
                f"{operator.shape}."
            )
        layout = []
        for b, block in enumerate(blocks):
            segments = [_segment(spec, b, i) for i, spec in enumerate(block)]
            if not segments:
                raise ValueError(f"Block {b} of the layout has no segments.")
            rows = {r for _, r, _ in segments}
            if len(segments) > 1 and len(rows) != 1:
                raise ValueError(
                    f"The segments of block {b} are placed side by side and need the same "
                    f"number of rows; got shapes {[(r, c) for _, r, c in segments]}."
                )
            layout.append(tuple(segments))
        if not layout:
            raise ValueError("A layout needs at least one block, got none.")
        total = sum(r * c for block in layout for _, r, c in block)
        n = total if size is None else int(size)
        covered = sorted((s, s + r * c) for block in layout for s, r, c in block)
        position = 0
        for start, stop in covered:
            if start != position:
                what = "overlap" if start < position else "leave a gap"
                raise ValueError(
                    f"The layout's segments {what} at index {min(start, position)}: they must "
                    f"cover the {n} entries of the flat vector exactly once."
                )
            position = stop
        if position != n:
            raise ValueError(
                f"The layout's segments cover {position} entries, the flat vector has {n}."
            )
        if operator.shape[0] != n:
            raise ValueError(
                f"The layout has {n} entries but the operator has shape {operator.shape}."
            )
        super().__init__(
            (n, n),
            dtype=operator.dtype,
            xp=operator.xp,
            device=operator.device,
            symmetric=operator.is_symmetric or bool(psd),
            psd=psd,
        )
        self.operator = operator
        self.blocks = tuple(layout)
        self._block_sizes = [sum(r * c for _, r, c in block) for block in layout]
        # segments in the order of the flat vector: (start, block, index in block)
        self._flat_order = sorted(
            (s, b, i) for b, block in enumerate(layout) for i, (s, _, _) in enumerate(block)
        )
        in_order = [(b, i) for _, b, i in self._flat_order]
        self._identity = all(len(block) == 1 for block in layout) and in_order == [
            (b, 0) for b in range(len(layout))
        ]
        self._blockwise = self._aligned(operator)
        # many segments: one gather by precomputed indices instead of a slice per segment
        self._gather = None
        if max(len(block) for block in layout) > 2:
            self._gather = self._gather_indices()

    def _gather_indices(self):
        """``(P, P^{-1})`` as index arrays: ``(P x)_k = x[P[k]]``, on the operator's device."""
        xp, device = self.xp, self.device
        parts = []
        for block in self.blocks:
            columns = [
                xp.reshape(xp.arange(s, s + r * c, device=device), (r, c)) for s, r, c in block
            ]
            parts.append(xp.reshape(xp.concat(columns, axis=1), (-1,)))
        forward = xp.concat(parts, axis=0)
        return forward, xp.argsort(forward)

    def _infer_psd(self):
        return self.operator.is_psd  # P^T A P with P orthogonal keeps A's definiteness

    def _aligned(self, operator) -> bool:
        """Whether ``operator`` is block diagonal with one square block per layout block."""
        return (
            isinstance(operator, BlockDiagonalLinearOperator)
            and len(operator.blocks) == len(self.blocks)
            and all(
                op.shape == (m, m) for op, m in zip(operator.blocks, self._block_sizes, strict=True)
            )
        )

    # -- the permutation -------------------------------------------------------------

    def _gather_block(self, X, block):
        """Rows of ``X`` ``(n, k)`` for one block, in the block's order: ``(m, k)``."""
        xp, k = self.xp, X.shape[1]
        if len(block) == 1:
            start, r, c = block[0]
            return X[start : start + r * c, ...]
        rows = block[0][1]
        parts = [xp.reshape(X[s : s + r * c, ...], (r, c, k)) for s, r, c in block]
        joined = xp.concat(parts, axis=1)
        return xp.reshape(joined, (rows * joined.shape[1], k))

    def _split_block(self, Y, block):
        """A block's result ``(m, k)`` split into its segments' rows (flat order each)."""
        xp, k = self.xp, Y.shape[1]
        if len(block) == 1:
            return [Y]
        rows = block[0][1]
        width = sum(c for _, _, c in block)
        Y3 = xp.reshape(Y, (rows, width, k))
        out, col = [], 0
        for _, r, c in block:
            out.append(xp.reshape(Y3[:, col : col + c, ...], (r * c, k)))
            col += c
        return out

    def _assemble(self, pieces):
        """Concatenate per-block segment pieces in the order of the flat vector."""
        return self.xp.concat([pieces[b][i] for _, b, i in self._flat_order], axis=0)

    def _to_blocks(self, X):
        if self._identity:
            return X
        if self._gather is not None:
            return self.xp.take(X, self._gather[0], axis=0)
        return self.xp.concat([self._gather_block(X, block) for block in self.blocks], axis=0)

    def _from_blocks(self, Y):
        if self._identity:
            return Y
        if self._gather is not None:
            return self.xp.take(Y, self._gather[1], axis=0)
        pieces, start = [], 0
        for block, m in zip(self.blocks, self._block_sizes, strict=True):
            pieces.append(self._split_block(Y[start : start + m, ...], block))
            start += m
        return self._assemble(pieces)

    def to_block_order(self, x):
        """``P x``: a flat vector ``(n,)`` or matrix ``(n, k)`` in the blocks' order."""
        checked = self.check_input(x, what="array")
        return checked.restore(self._to_blocks(checked.matrix))

    def from_block_order(self, y):
        """``P^T y``: a vector ``(n,)`` or matrix ``(n, k)`` in block order, in the flat layout."""
        checked = self.check_input(y, adjoint=True, what="array")
        return checked.restore(self._from_blocks(checked.matrix))

    # -- products --------------------------------------------------------------------

    def _apply(self, X, adjoint):
        if self._blockwise and self._gather is not None:
            Xb, pieces, start = self._to_blocks(X), [], 0
            for op, m in zip(self.operator.blocks, self._block_sizes, strict=True):
                block = Xb[start : start + m, ...]
                pieces.append(op._rmatmat(block) if adjoint else op._matmat(block))
                start += m
            return self._from_blocks(self.xp.concat(pieces, axis=0))
        if self._blockwise:
            pieces = []
            for op, block in zip(self.operator.blocks, self.blocks, strict=True):
                Xb = self._gather_block(X, block)
                Yb = op._rmatmat(Xb) if adjoint else op._matmat(Xb)
                pieces.append(self._split_block(Yb, block))
            return self._assemble(pieces)
        inner = self.operator._rmatmat if adjoint else self.operator._matmat
        return self._from_blocks(inner(self._to_blocks(X)))

    def _matmat(self, X):
        return self._apply(X, adjoint=False)

    def _rmatmat(self, X):
        return self._apply(X, adjoint=True)

    def _rewrap(self, operator):
        """The same layout around another operator (the class is kept for subclasses)."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        LinearOperator.__init__(
            out,
            self.shape,
            dtype=operator.dtype,
            xp=operator.xp,
            device=operator.device,
            symmetric=operator.is_symmetric,
        )
        out.operator = operator
        out._blockwise = self._aligned(operator)
        return out

    def adjoint(self):
        if self.is_symmetric:
            return self
        return self._rewrap(self.operator.adjoint())

    # -- exact queries from A ----------------------------------------------------------

    def inverse(self, damping=0.0):
        """``(P^T A P + damping I)^{-1} = P^T (A + damping I)^{-1} P``, from ``A.inverse``."""
        out = self._rewrap(self.operator.inverse(damping=damping))
        if self.is_psd and float(damping) >= 0:
            out._psd = True  # the inverse of a (damped) PSD matrix is PSD
        return out

    def trace(self):
        return self.operator.trace()

    def diagonal(self):
        if self._blockwise and self._gather is not None:
            d = self.xp.concat([op.diagonal() for op in self.operator.blocks], axis=0)
            return self._from_blocks(d[:, None])[:, 0]
        if self._blockwise:
            pieces = [
                self._split_block(op.diagonal()[:, None], block)
                for op, block in zip(self.operator.blocks, self.blocks, strict=True)
            ]
            return self._assemble(pieces)[:, 0]
        return self._from_blocks(self.operator.diagonal()[:, None])[:, 0]

    def eigvalsh(self):
        """``A``'s eigenvalues (a permutation does not change them)."""
        return self.operator.eigvalsh()

    def _logdet(self, damping):
        return self.operator._logdet(damping)

    def frobenius_norm(self):
        return self.operator.frobenius_norm()

    def to_dense(self):
        xp = self.xp
        left = self._from_blocks(self.operator.to_dense())  # P^T A
        return xp.matrix_transpose(self._from_blocks(xp.matrix_transpose(left)))
