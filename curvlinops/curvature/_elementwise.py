"""Elementwise taps (``s = w * a + b``): their per-datum gradients and exact blocks.

A layer whose weight scales its inputs entry by entry (the affine part of batch and
layer normalization) exposes a :class:`~curvlinops.models.LayerTap` of kind
``"elementwise"``. Kronecker factors do not fit it (its weight is not a matrix), but its
block is small (``2 D`` entries): the curvature operators form its per-datum
gradients explicitly and give it the exact block, ``c sum_{n,m} grad_n,m grad_n,m^T``
over the same cotangents as the Kronecker blocks (type-2: the exact GGN block; MC: the
Monte-Carlo Fisher block; empirical: the empirical Fisher block), and its exact
diagonal.

Internal to the curvature layer. May import: nothing from curvlinops.
"""

from __future__ import annotations

__all__: list[str] = []


def elementwise_gradients(tap, xp, *, with_bias=True):
    """Per-datum gradients ``(N * M, D)`` of the weight, then (optionally) of the bias.

    ``tap.inputs`` is ``(N, S..., D)``, ``tap.output_grads`` ``(N, S..., D, M)``; the
    gradient of column ``m`` of datum ``n`` is ``sum_s g[n, s, :, m] * a[n, s, :]`` for
    the weight and ``sum_s g[n, s, :, m]`` for the bias. Rows are datum-major.
    Returns ``[weight rows, bias rows]`` (the bias only if the tap has one and
    ``with_bias``).
    """
    a, g = tap.inputs, tap.output_grads
    N, D, M = a.shape[0], a.shape[-1], g.shape[-1]
    a3 = xp.reshape(a, (N, -1, D))
    g4 = xp.reshape(g, (N, -1, D, M))
    rows = [_datum_rows(xp.sum(g4 * a3[..., None], axis=1), xp)]
    if with_bias and tap.bias_index is not None:
        rows.append(_datum_rows(xp.sum(g4, axis=1), xp))
    return rows


def _datum_rows(grads, xp):
    """``(N, D, M)`` -> ``(N * M, D)``."""
    N, D, M = grads.shape
    return xp.reshape(xp.permute_dims(grads, (0, 2, 1)), (N * M, D))


def hadamard_block(H, A, joint, xp):
    """An elementwise layer's Kronecker-factored-Hessian block: ``H`` times the input moments.

    Per item ``t`` the weight's Hessian block is ``diag(a_t) H_t diag(a_t)``; with the
    data-set averages of the Kronecker-factored Hessian it becomes ``H * A``
    (elementwise), ``A`` the mean of ``a a^T``. With ``joint`` (a bias), ``A`` is the
    joint factor ``[[mean a a^T, mean a], [mean a^T, 1]]`` and the block over
    ``[w, b]`` is ``[[H * A_aa, H * m^T], [H * m, H]]`` (``m`` the mean input).
    """
    D = H.shape[0]
    if not joint:
        return H * A
    M_aa, m = A[:D, :D], A[:D, D]
    top = xp.concat([H * M_aa, H * m[:, None]], axis=1)
    bottom = xp.concat([H * m[None, :], H], axis=1)
    return xp.concat([top, bottom], axis=0)
