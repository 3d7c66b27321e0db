"""The one backward walk over the layer protocol: backpropagated curvature.

The Hessian of a loss with respect to each layer's outputs follows from the loss
Hessian with respect to the model's outputs by the exact recursion that each layer
states in the layer protocol (:mod:`curvlinops.models.layers`): through an affine layer
``s = W a + b``, ``H_a = W^T H_s W`` and ``g_a = W^T g_s``; through an activation
``a = phi(s)``, ``H_s = diag(phi'(s)) H_a diag(phi'(s)) + diag(phi''(s) * g_a)`` and
``g_s = phi'(s) g_a``, the second term being the activation's curvature (a residual
term, part of ``H - G``). Because a layer's outputs are linear in its own weights, the exact
Hessian block of the weights of a datum is ``H_s (x) a a^T`` (for inputs ``(N, D)``).

:func:`backpropagate` is that recursion, written once for all its users:

- per datum (:class:`~curvlinops.curvature.diagonal.HessianDiagonalLinearOperator`):
  ``gradient`` ``(N, ...)`` and ``curvature`` ``(N, F, F)`` move backwards together;
- batch statistics (first pass of the Kronecker-factored Hessian): only the
  ``gradient`` moves, and each layer adds what its averaged rule needs to
  ``statistics``;
- batch-averaged (second pass of the Kronecker-factored Hessian): only a
  ``curvature`` ``(D, D)`` moves, through each layer's averaged rule with the
  accumulated ``statistics``.

It never asks what class a layer is.

May import: ``curvlinops.models``.
"""

from __future__ import annotations

from ..models import MissingLayerRuleError

__all__ = ["backpropagate", "first_with_parameters"]


def first_with_parameters(layers) -> int:
    """Index of the first layer with parameters (``len(layers)`` if none has any).

    Layers before it see inputs that do not depend on the parameters: the walk stops
    there, and they need no rules.
    """
    return next((i for i, layer in enumerate(layers) if layer.param_indices), len(layers))


def backpropagate(layers, *, gradient=None, curvature=None, statistics=None, who, instead):
    """Walk ``layers`` backwards; yield ``(index, layer, curvature, gradient)`` at each one.

    The yielded curvature and gradient are those with respect to the layer's outputs
    (None where not propagated); after the consumer has seen them they are pulled back
    to the layer's inputs, down to the first layer with parameters.

    Parameters
    ----------
    layers : sequence of LinearizedLayer
        From ``lin.layers()``, in forward order.
    gradient : array, optional
        Gradient with respect to the model's outputs, one per datum.
    curvature : array, optional
        Per datum ``(N, C, C)`` when ``gradient`` is given, else batch-averaged
        ``(C, C)`` (then ``statistics`` must hold what the layers accumulated).
    statistics : dict, optional
        Layer index -> the layer's accumulated statistics. With a gradient and no
        curvature, each layer adds one batch to it (:meth:`curvature_statistics`).
    who, instead : str
        The operator (for messages) and what to use instead when a layer lacks a rule.

    Raises
    ------
    MissingLayerRuleError
        If a layer does not implement a rule the walk needs; the message names the
        layer, the operator and the alternative.
    """
    first = first_with_parameters(layers)
    mean = curvature is not None and gradient is None
    for i in range(len(layers) - 1, first - 1, -1):
        layer = layers[i]
        yield i, layer, curvature, gradient
        if i == first:
            return
        try:
            if mean:
                curvature = layer.backward_mean_curvature(curvature, statistics.get(i))
                continue
            if curvature is not None:
                curvature = layer.backward_curvature(curvature, gradient)
            elif statistics is not None:
                statistics[i] = layer.curvature_statistics(gradient, statistics.get(i))
            gradient = layer.backward_gradient(gradient)
        except MissingLayerRuleError as error:
            raise MissingLayerRuleError(
                f"{who} propagates the curvature backwards through every layer after the "
                f"first one with parameters, but {error} Use {instead}."
            ) from None
