"""The layer protocol: what curvature code needs of each layer of a model.

A linearization that offers the layer protocol
(:attr:`~curvlinops.models.Capability.LAYER_PROTOCOL`) returns its layers in forward
order from :meth:`Linearization.layers() <curvlinops.models.Linearization.layers>`,
each a :class:`~curvlinops.LinearizedLayer`: one layer bound to the forward pass it was linearized
at. Curvature code walks these objects and never asks what class a layer is. A layer
says, once:

- **its tap** (:meth:`LinearizedLayer.tap`): for a layer whose weight multiplies its
  inputs, a :class:`~curvlinops.models.LayerTap` with the inputs in the shared
  ``(N, S..., D_in)`` layout (``S`` every axis the weight is shared over: sequence
  positions, convolution output pixels), the positions of its weight and bias in the
  parameter list and ``matrix_shape = (D_out, D_in)``, the shape of the weight reshaped
  (in C order) to the matrix that multiplies the inputs. The bias has ``D_out`` entries
  and joins the matrix as a last column, ``[W | b]``, for inputs augmented by a one. A
  weight that is block diagonal over groups of inputs and outputs (a grouped or
  depthwise convolution) says its number of groups ``G``
  (:attr:`~curvlinops.models.LayerTap.groups`; ``matrix_shape = (D_out, D_in / G)``),
  and the curvature operators treat each group as a layer of its own;
- **how a gradient moves backwards through it** (:meth:`LinearizedLayer.backward_gradient`):
  the gradient of a scalar with respect to the layer's outputs, one per datum, to the
  gradient with respect to its inputs;
- **how an output-space curvature factor moves backwards through it**, per datum
  (:meth:`LinearizedLayer.backward_curvature`: the exact Hessian of the scalar with
  respect to the layer's outputs, ``(N, F_out, F_out)`` with ``F`` the per-datum number
  of features, to that of its inputs) and averaged over a data set
  (:meth:`LinearizedLayer.curvature_statistics` accumulates over the batches what
  :meth:`LinearizedLayer.backward_mean_curvature` needs to map an averaged
  ``(D_out, D_out)`` factor to ``(D_in, D_in)``, the scheme of Botev, Ritter & Barber,
  2017). For an affine layer ``s = W a + b``: ``H_a = W^T H_s W`` and ``g_a = W^T g_s``;
  for an elementwise activation ``a = phi(s)``:
  ``H_s = diag(phi') H_a diag(phi') + diag(phi'' * g_a)`` and ``g_s = phi' * g_a``
  (averaged: ``H_s = H_a * mean(phi' phi'^T) + diag(sum phi'' * g_a)``).
- **its branches**, for a layer whose output is the sum of parallel chains of layers,
  ``y = sum_p b_p(x)`` (a residual connection ``y = x + F(x)`` or ``P x + F(x)``):
  :meth:`LinearizedLayer.branches` gives each branch's layers (None for the identity),
  and the walks go down every branch, so that the branches' own taps get the curvature
  of their outputs. At the input the pulled-back factors of the branches add up, plus
  the terms that couple two branches, which the layer gives:
  :meth:`LinearizedLayer.cross_curvature` per datum (``sum_{p != q} J_p^T H J_q``,
  exact), :meth:`LinearizedLayer.cross_curvature_statistics` and
  :meth:`LinearizedLayer.backward_mean_cross_curvature` averaged over the data. The
  gradients of the branches add up too.

A layer that lacks a rule raises :class:`MissingLayerRuleError` (a
:class:`~curvlinops.models.MissingTierError` and a ``TypeError``) naming itself and
the rule, and the operator that needed it says what to use instead.

**Layouts.** Batch-averaged factors are ``(D, D)`` over a layer's *feature axis*: the
last axis of features-last arrays ``(N, S..., D)`` (Linear layers, sequences), the
channels (axis 1) of channels-first arrays ``(N, C, ...)`` (convolutions, pooling,
batch normalization), and they are the sum over the items (data and positions) of each
item's diagonal block ("expand": positions do not interact). Each native layer states
the layout of its inputs and outputs (:attr:`curvlinops.nn.Layer.input_layout`,
``output_layout``; None to pass the input's on), and the forward pass records in each
layer's state whether its inputs are channels-first
(:func:`curvlinops.nn.channels_first_inputs`). Per-datum factors are over a datum's
entries in C order of the array, whatever its layout; a tap says with
``channels_first`` how its own outputs are ordered.

**Kinds of taps** (:attr:`~curvlinops.models.LayerTap.kind`): ``"matrix"`` for a weight
that multiplies the inputs (Linear; a convolution's unfolded patches), with
``transposed`` for a weight stored as ``(D_in, D_out)``; ``"elementwise"`` for
``s = w * a + b`` (normalization: an exact block, not Kronecker factors);
``"embedding"`` for ``s = table[ids]`` (a diagonal input factor).

**How to add a layer type** (e.g. a pooling layer): write one file in ``curvlinops/nn``
with a subclass of :class:`curvlinops.nn.Layer` that implements its forward pass, its
derivative products (``tangent``, ``backward``, ``r_backward``), its layouts, and the
layer protocol (``tap`` returning its inputs ``(N, S, D_in)``, its output gradients
``(N, S, D_out, M)`` and ``matrix_shape``, with ``tap_kind`` if it is not a matrix
tap and ``tap_groups`` if its weight is block diagonal over groups;
``backward_curvature`` (:func:`curvlinops.nn.pull_back_curvature` is ``J^T H J``
for any layer linear in its inputs), ``curvature_statistics`` and
``backward_mean_curvature`` where they exist), with its tests in ``tests/nn``; then add
one entry per frontend that maps the framework's layer to it
(``curvlinops.frontends.torch``: the module type and how to build the native layer
from it). A layer made of other layers (:class:`curvlinops.nn.Residual`) overrides
``forward_with_state``, ``tangent_with_memo`` and ``backward_taps`` to walk its inner
chains. Nothing in ``curvlinops.curvature`` changes: the Hessian diagonal, the
Kronecker-factored Hessian and K-FAC read only this protocol and the taps.

May import: ``.protocol``.
"""

from __future__ import annotations

from .protocol import MissingTierError

__all__ = ["LinearizedLayer", "MissingLayerRuleError"]


class MissingLayerRuleError(MissingTierError, TypeError):
    """A layer does not implement a rule of the layer protocol that an operator needs.

    Examples
    --------
    >>> from curvlinops.models import MissingTierError
    >>> error = MissingLayerRuleError("layer '3' is Conv2d, which has no per-datum curvature rule")
    >>> isinstance(error, MissingTierError) and isinstance(error, TypeError)
    True
    """


class LinearizedLayer:
    """One layer of a linearization, as curvature code sees it (the layer protocol).

    The base class implements nothing but a layer without parameters and without
    rules: every rule raises :class:`MissingLayerRuleError`. Implementations override
    what their layer supports. Arrays are in the protocol layout (batch axis first, no
    trailing ``K``): gradients ``g`` have the shape of the layer's outputs (or inputs),
    per-datum curvatures are ``(N, F, F)`` over the ``F`` entries of one datum's
    outputs flattened in C order, averaged curvatures are ``(D, D)`` over the last
    (feature) axis.

    Parameters
    ----------
    name : str
        The layer's name (``"2"``, ``"encoder.fc"``), for messages.
    param_indices : tuple of int
        Positions of the layer's parameters in the model's parameter list (empty for a
        layer without trainable parameters).
    description : str, optional
        What the layer is (e.g. ``"Linear(3, 2, bias=True)"``), for messages; default
        the class name.

    Examples
    --------
    A layer without rules (e.g. a framework layer the frontend cannot map):

    >>> layer = LinearizedLayer("1", (), description="Dropout2d")
    >>> layer.tap() is None
    True
    >>> layer.backward_gradient(None)
    Traceback (most recent call last):
    ...
    curvlinops.models.layers.MissingLayerRuleError: layer '1' is Dropout2d, which does \
not implement the backward gradient rule of the layer protocol.
    """

    def __init__(self, name: str, param_indices=(), *, description: str | None = None):
        self.name = str(name)
        self.param_indices = tuple(param_indices)
        self.description = description or type(self).__name__

    def __repr__(self) -> str:
        return f"<layer {self.name!r}: {self.description}>"

    def tap(self):
        """The layer's :class:`~curvlinops.models.LayerTap` (no output gradients), or None.

        None for layers whose weight does not multiply their inputs (activations,
        reshapes) and for layers whose weight is not a parameter of the model.
        """
        return None

    def backward_gradient(self, g):
        """Gradient with respect to the inputs from that with respect to the outputs.

        ``g`` has the outputs' shape (one gradient per datum); returns the inputs' shape.
        """
        raise self.missing("the backward gradient rule")

    def backward_curvature(self, H, g):
        """Per-datum Hessian w.r.t. the inputs ``(N, F_in, F_in)`` from the outputs'.

        ``H`` is ``(N, F_out, F_out)``, ``g`` the gradient with respect to the outputs
        (of the same scalar).
        """
        raise self.missing("the per-datum curvature rule")

    def curvature_statistics(self, g, statistics=None):
        """Add one batch to what :meth:`backward_mean_curvature` needs; return the sums.

        ``g`` is the batch's gradient with respect to the outputs (of the loss over the
        whole data set), ``statistics`` what this method returned for the previous
        batches (None at the first). The default needs no statistics.
        """
        return None

    def backward_mean_curvature(self, H, statistics):
        """Averaged factor of the inputs ``(D_in, D_in)`` from the outputs' ``(D_out, D_out)``.

        ``statistics`` is what :meth:`curvature_statistics` accumulated over the data.
        """
        raise self.missing("the batch-averaged curvature rule")

    def branches(self):
        """The parallel branches whose outputs add up to this layer's, or None (the default).

        A tuple with, per branch, its layers in forward order (a list of
        :class:`LinearizedLayer`) or None for the identity. A layer with branches is
        walked through them (their layers' rules and taps), plus its cross terms
        (:meth:`cross_curvature`); its own :meth:`tap` is None.
        """
        return None

    def cross_curvature(self, H, g):
        """Per datum, the input Hessian's terms that couple two branches ``(N, F_in, F_in)``.

        ``sum_{p != q} J_p^T H J_q`` with ``J_p`` the Jacobian of branch ``p`` (the
        identity for a skip connection) and ``H`` ``(N, F_out, F_out)`` the Hessian with
        respect to the outputs; ``g`` is the gradient with respect to the outputs. The
        input Hessian is this plus the branches' own pulled-back Hessians.
        """
        raise self.missing("the per-datum cross-curvature rule of its branches")

    def cross_curvature_statistics(self, g, statistics=None):
        """Add one batch to what :meth:`backward_mean_cross_curvature` needs; return the sums."""
        return None

    def backward_mean_cross_curvature(self, H, statistics):
        """Averaged cross terms of the branches ``(D_in, D_in)`` from the outputs' factor."""
        raise self.missing("the batch-averaged cross-curvature rule of its branches")

    def missing(self, rule: str, detail: str = "") -> MissingLayerRuleError:
        """The error for a rule this layer does not implement (to be raised)."""
        detail = f" {detail.strip()}" if detail else ""
        return MissingLayerRuleError(
            f"layer {self.name!r} is {self.description}, which does not implement {rule} "
            f"of the layer protocol{detail}."
        )
