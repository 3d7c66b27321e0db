"""The operator K-FAC, EKFAC and the Kronecker-factored Hessian are made of, and its layout.

What lives here:

- :class:`KroneckerFactoredLinearOperator`: a
  :class:`~curvlinops.linalg.ParameterLayoutLinearOperator` around a
  :class:`~curvlinops.linalg.BlockDiagonalLinearOperator` with one
  :class:`~curvlinops.linalg.KroneckerLinearOperator` (``B (x) A``) or
  :class:`~curvlinops.linalg.KroneckerEighLinearOperator` (EKFAC) block per layer, or
  per weight and bias. Every product and exact query (damped inverse, trace,
  diagonal, log-determinant, eigenvalues, Frobenius norm) is the linalg operators';
  this class only names the blocks in error messages.
- :func:`layer_layout`: the segments of the flat parameter vector that form each
  layer's blocks (a weight ``(D_out, D_in)``; its bias; or both side by side as
  ``[W | b]``; for a grouped layer the same per group, each group's weight rows and
  bias entries being contiguous, or, for a grouped weight stored transposed, a segment
  per row of ``W^T``), from the layers' :class:`~.kronecker_statistics.LayerInfo`.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``.
"""

from __future__ import annotations

import math

from .._backend.conditioning import invert_all
from ..linalg import BlockDiagonalLinearOperator, ParameterLayoutLinearOperator

__all__ = ["KroneckerFactoredLinearOperator"]


class KroneckerFactoredLinearOperator(ParameterLayoutLinearOperator):
    """Block-diagonal Kronecker-factored curvature over the flat parameter vector.

    ``P^T blockdiag(K_1, ..., K_L) P`` with ``P`` the
    :class:`~curvlinops.linalg.ParameterLayoutLinearOperator` layout of the layers'
    parameters and each ``K_l`` a :class:`~curvlinops.linalg.KroneckerLinearOperator`
    ``B (x) A`` acting on a weight ``(D_out, D_in)`` flattened in C order (a separate
    bias block is ``B (x) 1``; a joint block acts on ``[W | b]``), or a
    :class:`~curvlinops.linalg.KroneckerEighLinearOperator` (EKFAC). Products never
    form a Kronecker product; :meth:`inverse` is the exact ``(K + damping I)^{-1}``,
    blockwise through the factors' eigendecompositions (cached on the factors), and
    trace, diagonal, Frobenius norm, log-determinant and eigenvalues come from the
    factors. A block beyond what its dtype resolves raises
    :class:`~curvlinops.IllConditionedError` (the rule of
    :class:`~curvlinops.conditioning`) naming the block.

    What the curvature operators' :meth:`inverse`, ``factored_inverse`` and ``damped``
    return, and what they delegate to; not meant to be constructed directly.

    Parameters
    ----------
    blocks : sequence of LinearOperator
        The square blocks, in layout order.
    layout : sequence
        Segments of each block, as for
        :class:`~curvlinops.linalg.ParameterLayoutLinearOperator`.
    names : sequence of str
        A name per block for error messages (e.g. ``"weight block of layer '0'"``).

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import MSELoss, nn
    >>> from curvlinops.curvature.kfac import KFACLinearOperator
    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> data = [(np.random.default_rng(0).normal(size=(8, 3)), np.zeros((8, 2)))]
    >>> K = KFACLinearOperator(model, MSELoss(), params, data)
    >>> K_inv = K.inverse(damping=0.1)
    >>> type(K_inv).__name__
    'KroneckerFactoredLinearOperator'
    >>> [type(b).__name__ for b in K_inv.operator.blocks]  # weight block, bias block
    ['KroneckerEighLinearOperator', 'KroneckerEighLinearOperator']
    >>> dense = K.to_dense()
    >>> bool(np.allclose(K_inv.to_dense(), np.linalg.inv(dense + 0.1 * np.eye(8))))
    True
    """

    def __init__(self, blocks, layout, names, *, psd=None):
        super().__init__(BlockDiagonalLinearOperator(list(blocks)), layout, psd=psd)
        self.names = tuple(names)

    def _blockwise_query(self, query):
        return invert_all(
            [
                (f"The {name}", lambda b=block: query(b))
                for name, block in zip(self.names, self.operator.blocks, strict=True)
            ]
        )

    def inverse(self, damping=0.0):
        """Exact ``(K + damping I)^{-1}``, blockwise from the factors' eigendecompositions.

        Raises
        ------
        FactorizationError
            If a block plus ``damping`` is refused by the rule of
            :class:`~curvlinops.conditioning` (naming the block).
        """
        damping = float(damping)
        inverses = self._blockwise_query(lambda b: b.inverse(damping=damping))
        out = self._rewrap(BlockDiagonalLinearOperator(inverses))
        if self.is_psd and damping >= 0:
            out._psd = True  # the inverse of a (damped) PSD matrix is PSD
        return out

    def _logdet(self, damping):
        total = 0.0
        for value in self._blockwise_query(lambda b: b._logdet(damping)):
            total = total + value
        return total


def layer_layout(layers, shapes, joint):
    """Blocks (layout segments) and their names, layer by layer.

    Parameters
    ----------
    layers : list of LayerInfo
        The layers, in order.
    shapes : list of tuple
        Shapes of all parameters (flat vector order).
    joint : callable
        ``joint(layer)``: whether the layer's weight and bias form one block.

    Returns
    -------
    layout : list
        Segments of every block, layer by layer (weight or joint block first, then a
        separate bias block; a layer with groups has these blocks for each group in
        turn: group ``g``'s rows ``g d_out ... (g + 1) d_out - 1`` of the weight
        ``(G d_out, d_in)`` and its ``d_out`` bias entries).
    names : list of str
        The blocks' names.
    """
    offsets = [0]
    for shape in shapes:
        offsets.append(offsets[-1] + math.prod(shape))
    layout, names = [], []
    for layer in layers:
        where = f"of layer {layer.name!r}"
        w = offsets[layer.weight_index]
        if getattr(layer, "exact", False):
            # an elementwise layer's exact block over [w, b] (or two blocks)
            segments = [(w, (1, layer.d_in))]
            if layer.bias_index is not None:
                segments.append((offsets[layer.bias_index], (1, layer.d_in)))
            if len(segments) == 1 or joint(layer):
                layout.append(segments)
                names.append(f"exact block {where}")
            else:
                layout += [[segment] for segment in segments]
                names += [f"exact weight block {where}", f"exact bias block {where}"]
            continue
        groups = getattr(layer, "groups", 1)
        if layer.transposed:
            _transposed_layout(layer, w, offsets, joint(layer), where, layout, names)
            continue
        for g in range(groups):
            group = f"{where}, group {g}" if groups > 1 else where
            weight = (w + g * layer.d_out * layer.d_in, (layer.d_out, layer.d_in))
            if layer.bias_index is None:
                layout.append([weight])
                names.append(f"weight block {group}")
                continue
            bias = (offsets[layer.bias_index] + g * layer.d_out, (layer.d_out, 1))
            if joint(layer):
                layout.append([weight, bias])
                names.append(f"joint weight and bias block {group}")
            else:
                layout += [[weight], [bias]]
                names += [f"weight block {group}", f"bias block {group}"]
    return layout, names


def _transposed_layout(layer, w, offsets, joint, where, layout, names):
    """The blocks of a layer whose weight is stored transposed, ``W^T (D_in, D_out)``.

    Without groups the weight block is the flat segment of ``W^T`` (C order) and the
    joint block ``[W^T; b^T]`` appends the bias as a last row: the two flat segments one
    after the other. With ``G`` groups, group ``g``'s entries are the columns
    ``g d_out ... (g + 1) d_out - 1`` of ``W^T (d_in, G d_out)``: one segment of
    ``d_out`` entries per row of ``W^T``, ``[W_g^T; b_g^T]`` flat row by row.
    """
    groups = getattr(layer, "groups", 1)
    row = groups * layer.d_out  # entries of one row of W^T
    for g in range(groups):
        group = f"{where}, group {g}" if groups > 1 else where
        if groups == 1:
            weight = [(w, layer.d_in * layer.d_out)]
        else:
            weight = [(w + i * row + g * layer.d_out, layer.d_out) for i in range(layer.d_in)]
        if layer.bias_index is None:
            layout.append(weight)
            names.append(f"weight block {group}")
            continue
        bias = (offsets[layer.bias_index] + g * layer.d_out, layer.d_out)
        if joint:
            layout.append([*weight, bias])
            names.append(f"joint weight and bias block {group}")
        else:
            layout += [weight, [bias]]
            names += [f"weight block {group}", f"bias block {group}"]
