"""The Kronecker-factored Hessian (Botev, Ritter & Barber, 2017).

:class:`KFACHessianLinearOperator` uses K-FAC's input factors and, as output factor
of each Linear layer, the Hessian of the loss with respect to the layer's outputs
(pre-activations), propagated backwards through the network with the recursion of
"Practical Gauss-Newton optimisation for deep learning":

``H_a = W^T H_s W`` through a Linear layer ``s = W a + b``, and
``H_h = phi'(h) H_b phi'(h) + diag(phi''(h) * dL/db)`` through an activation
``b = phi(h)``, started from the loss Hessian with respect to the model outputs.

It keeps the activations' curvature, so the factors (and the operator) can be
indefinite. The recursion is the one backward walk over the layer protocol
(:func:`._chain.backpropagate`), so it serves every model that offers the protocol.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.losses``, ``._data``, ``._chain``, ``._elementwise``, ``.kronecker_statistics``,
``.kronecker_factored``, ``.kfac``, ``.base``.
"""

from __future__ import annotations

import warnings

from .._backend import device as array_device
from .._backend.reduction import Static, broadcast_tree, collective_tree_sum
from ..models import Capability
from ._chain import backpropagate, flat_layers
from ._data import check_batch_values
from ._elementwise import hadamard_block
from .kfac import KFACLinearOperator
from .kronecker_statistics import (
    _InputStatistics,
    _KroneckerCurvature,
    group_rows,
    symmetrized,
)

__all__ = ["KFACHessianLinearOperator"]


class KFACHessianLinearOperator(KFACLinearOperator):
    """Kronecker-factored Hessian: ``H_s (x) A`` per Linear layer, possibly indefinite.

    The input factor ``A`` is K-FAC's (see
    :class:`~curvlinops.curvature.kfac.KFACLinearOperator`). The output factor is the
    loss Hessian with respect to the layer's outputs ``s``, backpropagated with the
    recursion of Botev, Ritter & Barber (2017), including the curvature of the
    activations, so that for a **single datum** the weight (and bias) blocks equal the
    exact Hessian blocks. Over a data set the recursion runs on data-set averages
    (their scheme: the per-sample recursion applied to batch-averaged matrices):

    - at the outputs: ``H_L = c sum_t H_l,t`` (the loss Hessians, normalized by the
      loss's reduction ``c``);
    - the output factor of a grouped convolution's group ``g`` (one block per group,
      as in K-FAC): the diagonal block of ``H_s`` over that group's output channels;
    - through a Linear layer: ``H_a = W^T H_s W`` (exact);
    - through an elementwise activation ``b = phi(h)``:
      ``H_h = H_b * mean_t(phi'(h_t) phi'(h_t)^T) + diag(c sum_t phi''(h_t) * dl_t/db_t)``,
      i.e. ``mean_t diag(phi'_t) H_b diag(phi'_t)`` with ``H_b`` the averaged matrix,
      plus the (summed) activation curvature;

    - through a residual block ``y = S x + F(x)`` (:class:`~curvlinops.nn.Residual`,
      ``S`` the identity or a projection): down both paths (the block's layers give
      their own factors), and at the input the sum of the paths' pulled-back factors
      plus ``M_F^T H_y M_S + M_S^T H_y M_F``, with ``M_p`` path ``p``'s Jacobian in
      feature space averaged over the items (``M_S = I`` for the identity; see
      :mod:`curvlinops.nn.residual`);

    where ``t`` runs over the items of the data set (data points; every position with
    shared axes, as "expand"), sums and means are over the whole data set (all batches),
    and ``dl_t/db_t`` is the gradient of the item's unnormalized loss. For deep linear
    networks with squared loss this equals K-FAC (and the exact Hessian blocks); for a
    single datum through residual blocks whose paths do not mix positions (Linear
    layers, 1 x 1 convolutions, one pixel) every block is the exact Hessian block.

    **Indefinite.** With curved activations (tanh, sigmoid, softplus, ...) the output
    factors, hence the operator, can have negative eigenvalues. ``logdet`` raises for a
    negative determinant; :meth:`inverse` is the exact ``(K + damping I)^{-1}`` whenever
    ``K + damping I`` is not singular, and warns when it is still indefinite; the
    factored heuristic :meth:`~KFACLinearOperator.factored_inverse` (inherited from
    K-FAC) raises :class:`~curvlinops.FactorizationError` when a damped factor is not
    positive definite.

    Parameters
    ----------
    model : curvlinops.models.Model
        A model that offers the layer protocol
        (:attr:`~curvlinops.models.Capability.LAYER_PROTOCOL`): a ``curvlinops.nn`` model or
        a :class:`~curvlinops.frontends.torch.TorchModel`, whose layers from the first
        one with parameters on have the batch-averaged curvature rule (Linear layers,
        convolutions, elementwise activations, batch normalization, pooling, Identity,
        residual blocks of ``curvlinops.nn`` made of such layers; parameter-free layers
        such as Flatten may come before the first Linear layer). Every parameter must
        belong to a tapped layer.
    loss : curvlinops.losses.Loss
        Its reduction applies over the whole data set.
    params : list of arrays
        Parameters; the operator acts on flat vectors ``(P,)`` and ``(P, K)``.
    data : iterable of (X, y)
        Re-iterable batches of any sizes on the parameters' backend and device.
    separate_weight_and_bias : bool
        Separate blocks for weight and bias (True) or one joint block (False).
    num_data : int, optional
        Number of data points (skips the counting pass).
    progressbar : bool
        tqdm progress bar over the batches.
    check_deterministic : bool
        Run over the data twice first and raise if the passes differ.
    comm : optional
        Distribute the pass over processes (as for
        :class:`~curvlinops.curvature.kfac.KFACLinearOperator`): one all-reduce adds the
        shards' sums (loss Hessians, the layers' statistics, the input moments); the
        backward walk then runs on the sums (on the first rank with data, which shares
        the factors with the ranks without data). See :doc:`/distributed`.

    Raises
    ------
    MissingTierError
        If the model does not offer the layer protocol (a JAX function, hand-written
        callables); :class:`~curvlinops.models.MissingLayerRuleError` (also a
        ``TypeError``) if a layer lacks the batch-averaged curvature rule.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import HessianLinearOperator, MSELoss, nn
    >>> from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> data = [(np.array([[1.0, -2.0]]), np.array([[3.0, -1.0]]))]  # a single datum
    >>> K = KFACHessianLinearOperator(model, MSELoss(), params, data)
    >>> H = HessianLinearOperator(model, MSELoss(), params, data).to_dense()
    >>> bool(np.allclose(K.to_dense()[:6, :6], H[:6, :6]))  # first weight block
    True
    """

    fisher_types = ("hessian",)
    required_tier = Capability.LAYER_PROTOCOL
    psd = False  # symmetric, possibly indefinite

    def __init__(
        self,
        model,
        loss,
        params,
        data,
        *,
        separate_weight_and_bias=True,
        num_data=None,
        progressbar=False,
        check_deterministic=True,
        comm=None,
    ):
        _KroneckerCurvature.__init__(
            self,
            model,
            loss,
            params,
            data,
            fisher_type="hessian",
            kfac_approx="expand",
            separate_weight_and_bias=separate_weight_and_bias,
            num_data=num_data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            comm=comm,
        )

    # -- factors ---------------------------------------------------------------------------

    _WHO = "KFACHessianLinearOperator"
    _INSTEAD = "KFACLinearOperator (GGN / Fisher) or HessianLinearOperator for this model"

    def _build(self):
        self._set_factors(self._hessian_factors())

    def _layout(self, layers):
        """Lay out ``self.layers`` (a LayerInfo per tapped layer) from the first batch."""
        # the taps in forward order, those inside residual blocks' branches included
        taps = [tap for tap in (layer.tap() for layer in flat_layers(layers)) if tap is not None]
        if not taps:
            raise ValueError(
                "KFACHessianLinearOperator needs a model with at least one tapped layer "
                "(Linear, a convolution, an embedding, or a normalization's affine map); "
                "this model has none."
            )
        self.layers = self._layout_from_taps(taps)

    def _hessian_factors(self):
        """``(B, A)`` per tapped layer in order: one pass over the data, the sums over
        the processes, then one walk."""
        found = {}  # the linearized layers of this rank's last batch (for the walk)
        sums = collective_tree_sum(
            self.comm,
            lambda: self._local_sums(found),
            xp=self.xp,
            dtype=self.dtype,
            device=self.device,
            what=f"{self._WHO} pass over the data",
        )
        if sums is None:
            raise ValueError("The data contain no batches; K-FAC needs at least one.")
        if self.layers is None:
            self.layers = list(sums["layers"])
        if all(self.shards.has_data):
            return self._walk(found["layers"], sums)
        # the walk needs a batch's linearized layers: ranks without data take its result
        return broadcast_tree(
            self.comm,
            self.shards.first_with_data,
            lambda: self._walk(found["layers"], sums),
            xp=self.xp,
            dtype=self.dtype,
            device=self.device,
            what=f"{self._WHO} factors",
        )

    def _local_sums(self, found):
        """This rank's sums over its batches: the loss Hessians, the layers' statistics
        and the tapped layers' input moments (None without batches)."""
        xp = self.xp
        statistics, inputs = {}, {}
        output_hessian, layers = None, None
        for index, X, y in self._batches():
            lin = self.model.linearize(self.params, X)
            outputs = lin.outputs
            self._set_output_shape(outputs)
            check_batch_values(self.loss, outputs, y, index)
            layers = lin.layers()
            if self.layers is None:
                self._layout(layers)
            expected = [(la.name, la.weight_index, la.bias_index) for la in self.layers]
            hessian = _summed_loss_hessian(self.loss, outputs, y, xp)
            output_hessian = hessian if output_hessian is None else output_hessian + hessian
            # the gradient of the whole (normalized) loss, so that the activations'
            # curvature sum phi'' * g comes out normalized too
            gradient = self._normalization() * self.loss.gradient(outputs, y)
            walk = backpropagate(
                layers,
                gradient=gradient,
                statistics=statistics,
                who=self._WHO,
                instead=self._INSTEAD,
            )
            found_taps = []
            for i, layer, _, _ in walk:
                tap = layer.tap()
                if tap is None:
                    continue
                found_taps.append((tap.name, tap.weight_index, tap.bias_index))
                statistics_of_inputs = inputs.setdefault(i, _InputStatistics())
                if tap.kind == "embedding":  # the ids' counts: a diagonal input factor
                    V = self.shapes[tap.weight_index][0]
                    statistics_of_inputs.add_counts(tap.inputs, V, self.dtype, xp)
                else:
                    rows = xp.reshape(tap.inputs, (-1, tap.inputs.shape[-1]))
                    statistics_of_inputs.add(group_rows(rows, tap.groups, xp), xp)
            if found_taps[::-1] != expected:
                raise ValueError(
                    f"Batch {index} exposed the layer taps {found_taps[::-1]}, the first batch "
                    f"{expected}; every batch must run through the same layers."
                )
        if layers is None:
            return None
        found["layers"] = layers
        return {
            "layers": Static(tuple(self.layers)),
            "output_hessian": output_hessian,
            "statistics": statistics,
            "inputs": {i: stats.sums() for i, stats in inputs.items()},
        }

    def _walk(self, layers, sums):
        """The backward walk of the summed loss Hessian through ``layers`` (one batch's
        linearized layers) with the summed statistics: ``(B, A)`` per tapped layer."""
        xp = self.xp
        statistics = sums["statistics"]
        inputs = {i: _InputStatistics.from_sums(s) for i, s in sums["inputs"].items()}
        walk = backpropagate(
            layers,
            curvature=self._normalization() * sums["output_hessian"],
            statistics=statistics,
            who=self._WHO,
            instead=self._INSTEAD,
        )
        factors = []
        infos = iter(reversed(self.layers))
        for i, layer, H, _ in walk:
            if layer.tap() is None:
                continue
            info = next(infos)
            if info.exact:  # an elementwise layer: H times its inputs' moments
                A = inputs[i].factor(info.bias_index is not None, xp)
                block = hadamard_block(H, A, info.bias_index is not None, xp)
                factors.append((symmetrized(block, xp), None))
                continue
            if info.kind == "embedding":
                A = inputs[i].diagonal_factor()
            else:
                A = symmetrized(inputs[i].factor(self._joint(info), xp), xp)
            factors.append((symmetrized(_group_blocks(H, info.groups, xp), xp), A))
        return factors[::-1]

    # -- inverse ------------------------------------------------------------------------

    def inverse(self, damping=0.0, **deprecated):
        """Exact ``(K + damping I)^{-1}``, as for K-FAC (:meth:`KFACLinearOperator.inverse`).

        The operator can be indefinite: the inverse exists whenever the spectrum plus
        ``damping`` passes the conditioning rule of :class:`~curvlinops.conditioning`,
        and a ``UserWarning`` says when the result is the inverse of an indefinite matrix
        (then it is not a descent preconditioner). The factored heuristic
        :meth:`~KFACLinearOperator.factored_inverse` needs positive definite damped
        factors and raises :class:`~curvlinops.FactorizationError` otherwise.

        Examples
        --------
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import MSELoss, nn
        >>> from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 1))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> data = [(np.ones((3, 2)), np.zeros((3, 1)))]
        >>> K = KFACHessianLinearOperator(model, MSELoss(), params, data)
        >>> dense = K.to_dense() + np.eye(9)
        >>> bool(np.allclose(K.inverse(damping=1.0).to_dense(), np.linalg.inv(dense)))
        True
        """
        if deprecated:
            return super().inverse(damping, **deprecated)
        inverse = super().inverse(damping)
        xp = self.xp
        if bool(xp.any(self._operator.eigvalsh() + float(damping) < 0)):
            warnings.warn(
                f"The Kronecker-factored Hessian plus {float(damping)} I is indefinite; "
                "its inverse is not positive definite (not a descent preconditioner). "
                "Increase the damping above the most negative eigenvalue's magnitude to "
                "make it positive definite.",
                UserWarning,
                stacklevel=2,
            )
        return inverse


def _group_blocks(H, groups, xp):
    """The groups' diagonal blocks ``(G, d, d)`` of an output factor ``(G d, G d)``: the
    output factors of a grouped layer's groups (``H`` itself for one group)."""
    if groups == 1:
        return H
    d = H.shape[0] // groups
    blocks = xp.permute_dims(xp.reshape(H, (groups, d, groups, d)), (1, 3, 0, 2))
    return xp.permute_dims(xp.linalg.diagonal(blocks), (2, 0, 1))


def _summed_loss_hessian(loss, outputs, y, xp):
    """``sum_t H_l,t``: the loss Hessians w.r.t. the outputs summed over all items, ``(C, C)``.

    Through ``hessian_matmat`` with the identity, so that indefinite loss Hessians (a
    Gaussian likelihood with learned variance) work too.
    """
    C = outputs.shape[-1]
    eye = xp.eye(C, dtype=outputs.dtype, device=array_device(outputs))
    columns = loss.hessian_matmat(outputs, y, xp.broadcast_to(eye, tuple(outputs.shape) + (C,)))
    return xp.sum(xp.reshape(columns, (-1, C, C)), axis=0)
