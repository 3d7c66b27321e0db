"""Per-datum Hessians of a native model's pre-activations, backpropagated layer by layer.

For a chain of ``curvlinops.nn`` layers (Linear and elementwise activations) the
Hessian of a datum's loss with respect to each Linear layer's output ``s`` follows
from the output Hessian by the exact recursion

- through a Linear layer ``s = W a + b``: ``H_a = W^T H_s W``, ``g_a = W^T g_s``;
- through an activation ``a = phi(s)``:
  ``H_s = diag(phi'(s)) H_a diag(phi'(s)) + diag(phi''(s) * g_a)``, ``g_s = phi'(s) g_a``,

where the second term is the activation's curvature (the residual term of
DESIGN.md). Because ``s`` is linear in the layer's own weights, the exact Hessian
block of the weights is ``sum_n H_s,n (x) a_n a_n^T``: its diagonal is exact from
these matrices, and the Kronecker-factored Hessian averages them.

Costs ``N * D^2`` memory per layer (one matrix per datum); inputs with shared axes are
not supported.

May import: ``curvlinops._backend``, ``curvlinops.nn``.
"""

from __future__ import annotations

from .._backend import device

__all__ = ["backpropagated_hessians"]


def backpropagated_hessians(lin, output_hessians, output_gradients):
    """Yield ``(name, weight_index, bias_index, inputs, H_s)`` for each Linear layer.

    Parameters
    ----------
    lin : curvlinops.nn linearization
        From ``model.linearize(params, X)`` of a ``curvlinops.nn`` model.
    output_hessians : array
        ``(N, C, C)``: each datum's loss Hessian with respect to the outputs.
    output_gradients : array
        ``(N, C)``: each datum's loss gradient with respect to the outputs.

    Yields
    ------
    tuple
        From the last Linear layer to the first: its name, the positions of its weight
        and bias in the parameter list (bias None if absent), its inputs ``(N, D_in)``
        and the per-datum Hessians ``(N, D_out, D_out)`` of the loss with respect to
        its outputs.
    """
    from ..nn.activations import Elementwise
    from ..nn.linear import Linear
    from ..nn.linearization import NativeLinearization
    from ..nn.shape import Flatten, Identity

    if not isinstance(lin, NativeLinearization):
        raise TypeError(
            "Backpropagated pre-activation Hessians need a curvlinops.nn model (a chain of "
            f"Linear layers and activations); got a linearization of {lin.model.name}."
        )
    xp = lin.xp
    H, g = output_hessians, output_gradients
    for i in range(len(lin._layers) - 1, lin._first - 1, -1):
        name, layer, where, state = lin._layers[i]
        if isinstance(layer, Linear):
            a = state["input"]
            if a.ndim != 2:
                raise ValueError(
                    "Backpropagated pre-activation Hessians support inputs (N, D) only; "
                    f"layer {name} sees inputs of shape {tuple(a.shape)}."
                )
            bias = where.start + 1 if where.stop - where.start > 1 else None
            yield name, where.start, bias, a, H
            if i > lin._first:
                W = lin.params[where.start]
                H = xp.matrix_transpose(W) @ H @ W
                g = g @ W
        elif isinstance(layer, Elementwise):
            s = state["input"]
            d1 = layer.first_derivative(s, xp)
            H = d1[:, :, None] * H * d1[:, None, :]
            d2 = layer.second_derivative(s, xp)
            if d2 is not None:
                eye = xp.eye(H.shape[-1], dtype=H.dtype, device=device(H))
                H = H + eye[None, :, :] * (d2 * g)[:, None, :]
            g = d1 * g
        elif not isinstance(layer, (Identity, Flatten)):
            raise TypeError(
                f"Layer {name} ({type(layer).__name__}) is neither Linear, an activation, "
                "Identity nor Flatten; its Hessian backpropagation is not implemented."
            )
