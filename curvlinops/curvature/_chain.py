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

Residual connections. A layer whose output is the sum of parallel branches
(:meth:`~curvlinops.LinearizedLayer.branches`: ``y = x + F(x)`` or ``P x + F(x)``) is
walked through every branch with the same curvature and gradient at its output, so the
branches' taps see the exact Hessian with respect to their own outputs. At its input
the branches' pulled-back Hessians add up (each with its own activations' curvature,
``J_p^T H J_p + R_p``), plus the terms that couple the branches, ``J_b^T H J_s + J_s^T
H J_b``, which the layer gives (per datum exactly; averaged over the data as the layer
defines them), and the gradients add up: together the exact Hessian with respect to
the input, ``(J_b + J_s)^T H (J_b + J_s) + R_b + R_s``.

It never asks what class a layer is.

May import: ``curvlinops.models``.
"""

from __future__ import annotations

from ..models import MissingLayerRuleError

__all__ = ["backpropagate", "first_with_parameters", "flat_layers"]


def first_with_parameters(layers) -> int:
    """Index of the first layer with parameters (``len(layers)`` if none has any).

    Layers before it see inputs that do not depend on the parameters: the walk stops
    there, and they need no rules.
    """
    return next((i for i, layer in enumerate(layers) if layer.param_indices), len(layers))


def flat_layers(layers) -> list:
    """``layers`` with every layer that has branches followed by its branches' layers
    (recursively, in branch order), in forward order: the layers whose taps a walk visits."""
    out = []
    for layer in layers:
        branches = layer.branches()
        if branches is None:
            out.append(layer)
            continue
        out.append(layer)
        for branch in branches:
            out.extend(flat_layers(branch or []))
    return out


def backpropagate(layers, *, gradient=None, curvature=None, statistics=None, who, instead):
    """Walk ``layers`` backwards; yield ``(key, layer, curvature, gradient)`` at each one.

    The yielded curvature and gradient are those with respect to the layer's outputs
    (None where not propagated); after the consumer has seen them they are pulled back
    to the layer's inputs, down to the first layer with parameters. A layer with
    branches (:meth:`~curvlinops.LinearizedLayer.branches`, a residual connection) is
    yielded, then its branches are walked (the last branch first, each from its last
    layer), and at its input the branches' pulled-back factors and gradients are added,
    with the layer's cross terms (:meth:`~curvlinops.LinearizedLayer.cross_curvature`
    and its batch-averaged counterparts). So the yielded layers come in the reverse of
    :func:`flat_layers`'s order. ``key`` is the layer's index in ``layers``, or for a
    layer inside a branch ``(index, branch, index in the branch, ...)``.

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
        Layer key -> the layer's accumulated statistics. With a gradient and no
        curvature, each layer adds one batch to it (:meth:`curvature_statistics`, and
        :meth:`cross_curvature_statistics` for a layer with branches).
    who, instead : str
        The operator (for messages) and what to use instead when a layer lacks a rule.

    Raises
    ------
    MissingLayerRuleError
        If a layer does not implement a rule the walk needs; the message names the
        layer, the operator and the alternative.
    """
    walk = _Walk(statistics, curvature is not None and gradient is None, who, instead)
    yield from walk.chain(layers, (), curvature, gradient, need_input=False)


class _Walk:
    """One backward walk: its mode and statistics, and the recursion into branches."""

    def __init__(self, statistics, mean, who, instead):
        self.statistics, self.mean, self.who, self.instead = statistics, mean, who, instead

    def chain(self, layers, prefix, curvature, gradient, *, need_input):
        """Walk a chain backwards (yielding); return the factor and gradient at its input.

        Without ``need_input`` the walk stops at the chain's first layer with parameters
        (and returns what it has there); with it, it pulls back through every layer.
        """
        first = first_with_parameters(layers)
        stop = 0 if need_input else first
        for i in range(len(layers) - 1, stop - 1, -1):
            layer = layers[i]
            key = (*prefix, i) if prefix else i
            yield key, layer, curvature, gradient
            pull = need_input or i > first
            branches = layer.branches()
            if branches is not None:
                curvature, gradient = yield from self.branches(
                    layer, branches, key, curvature, gradient, pull
                )
            elif pull:
                curvature, gradient = self._rule(self._step, layer, key, curvature, gradient)
        return curvature, gradient

    def _step(self, layer, key, curvature, gradient):
        """One layer's own rules: the factor and the gradient at its inputs."""
        if self.mean:
            return layer.backward_mean_curvature(curvature, self.statistics.get(key)), None
        if curvature is not None:
            curvature = layer.backward_curvature(curvature, gradient)
        elif self.statistics is not None:
            self.statistics[key] = layer.curvature_statistics(gradient, self.statistics.get(key))
        return curvature, layer.backward_gradient(gradient)

    def branches(self, layer, branches, key, curvature, gradient, pull):
        """Walk every branch (the last first); at the input: the sums and cross terms."""
        prefix = key if isinstance(key, tuple) else (key,)
        pulled = []
        for p in range(len(branches) - 1, -1, -1):
            if branches[p] is None:  # the identity
                pulled.append((curvature, gradient))
                continue
            pulled.append(
                (
                    yield from self.chain(
                        branches[p], (*prefix, p), curvature, gradient, need_input=pull
                    )
                )
            )
        if not pull:
            return None, None
        cross = self._rule(self._cross, layer, key, curvature, gradient)
        return _sum([c for c, _ in pulled] + [cross]), _sum([g for _, g in pulled])

    def _cross(self, layer, key, curvature, gradient):
        """The layer's cross terms between its branches (None in a statistics pass)."""
        if self.mean:
            return layer.backward_mean_cross_curvature(curvature, self.statistics.get(key))
        if curvature is not None:
            return layer.cross_curvature(curvature, gradient)
        if self.statistics is not None:
            self.statistics[key] = layer.cross_curvature_statistics(
                gradient, self.statistics.get(key)
            )
        return None

    def _rule(self, rule, *args):
        try:
            return rule(*args)
        except MissingLayerRuleError as error:
            raise MissingLayerRuleError(
                f"{self.who} propagates the curvature backwards through every layer after "
                f"the first one with parameters, but {error} Use {self.instead}."
            ) from None


def _sum(arrays):
    """The sum of the arrays that are not None (None if all are)."""
    total = None
    for a in arrays:
        if a is not None:
            total = a if total is None else total + a
    return total
