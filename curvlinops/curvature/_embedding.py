"""Embedding taps (``s = table[ids]``): one-hot inputs without forming them for K-FAC.

An embedding layer looks up rows of its table ``(V, D)``: it is the linear map
``onehot(ids) @ table``, a transposed weight (:attr:`~curvlinops.models.LayerTap.transposed`)
whose inputs are one-hot vectors over the vocabulary. Its tap (kind ``"embedding"``)
carries the integer ids ``(N, S...)`` instead. K-FAC's input factor is then diagonal,
``A = diag(counts) / T`` with the ids' counts over the ``T`` items, and is stored and
inverted as a :class:`~curvlinops.DiagonalLinearOperator`. The other consumers (EKFAC's
scalings, the diagonals) use :func:`as_matrix_tap`, the equivalent tap with one-hot
inputs (``N * S * V`` entries, formed per batch).

With ``kfac_approx="reduce"`` the averaged one-hot inputs would not be one-hot; an
embedding's factors always follow "expand" (every position an item).

Internal to the curvature layer. May import: ``curvlinops._backend``, ``curvlinops.models``.
"""

from __future__ import annotations

import dataclasses

from .._backend import device as array_device

__all__: list[str] = []


def one_hot(ids, V, dtype, xp):
    """``(..., V)`` one-hot rows of integer ``ids``."""
    vocabulary = xp.arange(V, device=array_device(ids))
    return xp.astype(ids[..., None] == vocabulary, dtype)


def counts(ids, V, dtype, xp):
    """How often each of the ``V`` ids occurs, ``(V,)``."""
    flat = xp.reshape(ids, (-1,))
    return xp.sum(one_hot(flat, V, dtype, xp), axis=0)


def as_matrix_tap(tap, V, dtype, xp):
    """The tap of an embedding as a transposed matrix tap with one-hot inputs ``(N, S..., V)``."""
    if tap.kind != "embedding":
        return tap
    return dataclasses.replace(
        tap, inputs=one_hot(tap.inputs, V, dtype, xp), kind="matrix", transposed=True
    )
