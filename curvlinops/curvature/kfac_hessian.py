"""The Kronecker-factored Hessian (Botev, Ritter & Barber, 2017).

:class:`KFACHessianLinearOperator` uses K-FAC's input factors and, as output factor
of each Linear layer, the Hessian of the loss with respect to the layer's outputs
(pre-activations), propagated backwards through the network with the recursion of
"Practical Gauss-Newton optimisation for deep learning":

``H_a = W^T H_s W`` through a Linear layer ``s = W a + b``, and
``H_h = phi'(h) H_b phi'(h) + diag(phi''(h) * dL/db)`` through an activation
``b = phi(h)``, started from the loss Hessian with respect to the model outputs.

It keeps the activations' curvature, so the factors (and the operator) can be
indefinite. The recursion walks the layers of a ``curvlinops.nn`` model.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.nn``, ``curvlinops.losses``, ``._data``, ``.kronecker_statistics``,
``.kronecker_factored``, ``.kfac``, ``.base``.
"""

from __future__ import annotations

import warnings

from .._backend import device as array_device, diag_matrix
from ..nn import Elementwise, Identity, Linear, Module
from .kfac import KFACLinearOperator
from .kronecker_statistics import LayerInfo, _InputStatistics, _KroneckerCurvature, symmetrized

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
    - through a Linear layer: ``H_a = W^T H_s W`` (exact);
    - through an elementwise activation ``b = phi(h)``:
      ``H_h = H_b * mean_t(phi'(h_t) phi'(h_t)^T) + diag(c sum_t phi''(h_t) * dl_t/db_t)``,
      i.e. ``mean_t diag(phi'_t) H_b diag(phi'_t)`` with ``H_b`` the averaged matrix,
      plus the (summed) activation curvature;

    where ``t`` runs over the items of the data set (data points; every position with
    shared axes, as "expand"), sums and means are over the whole data set (all batches),
    and ``dl_t/db_t`` is the gradient of the item's unnormalized loss. For deep linear
    networks with squared loss this equals K-FAC (and the exact Hessian blocks).

    **Indefinite.** With curved activations (tanh, sigmoid, softplus, ...) the output
    factors, hence the operator, can have negative eigenvalues. ``logdet`` raises for a
    negative determinant; :meth:`inverse` is the exact ``(K + damping I)^{-1}`` whenever
    ``K + damping I`` is not singular, and warns when it is still indefinite; the
    factored heuristic :meth:`~KFACLinearOperator.factored_inverse` (inherited from
    K-FAC) raises :class:`~curvlinops.FactorizationError` when a damped factor is not
    positive definite.

    Parameters
    ----------
    model : curvlinops.nn.Module
        A ``curvlinops.nn`` model whose layers from the first Linear layer on are
        Linear layers, elementwise activations and Identity (parameter-free layers
        such as Flatten may come before the first Linear layer).
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

    Raises
    ------
    TypeError
        If the model is not a ``curvlinops.nn`` model, or contains a layer the recursion
        does not support.

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
    ):
        self._chain = _supported_chain(model)
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
        )

    # -- factors ---------------------------------------------------------------------------

    def _build(self):
        self.layers, starts = self._chain_layout()
        self._set_factors(self._hessian_factors(starts))

    def _chain_layout(self):
        """LayerInfo of every Linear layer, and each chain layer's first parameter index."""
        layers, starts, start = [], [], 0
        for name, layer in self._chain:
            starts.append(start)
            if isinstance(layer, Linear):
                bias = start + 1 if layer.bias else None
                layers.append(LayerInfo(name, start, bias, layer.in_features, layer.out_features))
            start += len(layer.param_shapes())
        return layers, starts

    def _hessian_factors(self, starts):
        xp = self.xp
        chain = self._chain
        first = next(i for i, (_, layer) in enumerate(chain) if isinstance(layer, Linear))
        inputs = {
            i: _InputStatistics() for i, (_, la) in enumerate(chain) if isinstance(la, Linear)
        }
        curvature = {}  # activation index -> [sum phi' phi'^T, count, sum phi'' * dl/db]
        output_hessian = None
        for _, X, y in self._batches():
            activations, outputs = self._forward(X, starts)
            self._set_output_shape(outputs)
            self.loss.check(outputs, y)
            hessian = _summed_loss_hessian(self.loss, outputs, y, xp)
            output_hessian = hessian if output_hessian is None else output_hessian + hessian
            grad = self.loss.gradient(outputs, y)
            for i in range(len(chain) - 1, first - 1, -1):
                layer, h = chain[i][1], activations[i]
                if isinstance(layer, Linear):
                    inputs[i].add(xp.reshape(h, (-1, layer.in_features)), xp)
                    if i > first:
                        W = self.params[starts[i]]
                        rows = xp.reshape(grad, (-1, layer.out_features)) @ W
                        grad = xp.reshape(rows, tuple(h.shape))
                elif isinstance(layer, Elementwise):
                    grad = _accumulate_activation(curvature, i, layer, h, grad, xp)
        c = self._normalization()
        H = c * output_hessian
        factors = {}
        for i in range(len(chain) - 1, first - 1, -1):
            layer = chain[i][1]
            if isinstance(layer, Linear):
                H = symmetrized(H, xp)
                A = symmetrized(inputs[i].factor(self._joint(self._info(i, starts)), xp), xp)
                factors[i] = (H, A)
                W = self.params[starts[i]]
                H = xp.matrix_transpose(W) @ H @ W
            elif isinstance(layer, Elementwise) and i in curvature:
                outer, count, second = curvature[i]
                H = H * (outer / count)
                if second is not None:
                    H = H + diag_matrix(c * second, xp)
        return [factors[i] for i in sorted(factors)]

    def _info(self, chain_index, starts):
        start = starts[chain_index]
        return next(la for la in self.layers if la.weight_index == start)

    def _forward(self, X, starts):
        """Inputs of every chain layer and the outputs, via the layers' own forward pass."""
        xp, params, a = self.model.prepare(self.params, X)
        activations = []
        for (_, layer), start in zip(self._chain, starts, strict=True):
            activations.append(a)
            n = len(layer.param_shapes())
            a = layer.forward(params[start : start + n], a, xp)
        return activations, a

    # -- inverse ------------------------------------------------------------------------

    def inverse(self, damping=0.0):
        """Exact ``(K + damping I)^{-1}``, as for K-FAC (:meth:`KFACLinearOperator.inverse`).

        The operator can be indefinite: the inverse exists whenever no eigenvalue plus
        ``damping`` is zero (the singular rule of :class:`~curvlinops.FactorizationError`),
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


def _supported_chain(model):
    """The model's chain of layers, or a TypeError if the recursion cannot walk it."""
    if not isinstance(model, Module):
        raise TypeError(
            "KFACHessianLinearOperator needs a curvlinops.nn model (e.g. nn.Sequential of "
            "Linear layers and elementwise activations): the pre-activation Hessian "
            f"recursion walks its layers. Got a {type(model).__name__}. For other models "
            "use KFACLinearOperator (GGN / Fisher) or HessianLinearOperator."
        )
    chain = model.chain()
    linear = [i for i, (_, layer) in enumerate(chain) if isinstance(layer, Linear)]
    if not linear:
        raise ValueError("KFACHessianLinearOperator needs a model with at least one Linear layer.")
    for name, layer in chain[linear[0] :]:
        if not isinstance(layer, (Linear, Elementwise, Identity)):
            raise TypeError(
                f"KFACHessianLinearOperator supports Linear layers, elementwise activations "
                f"and Identity after the first Linear layer; layer {name!r} is {layer!r}."
            )
    return chain


def _summed_loss_hessian(loss, outputs, y, xp):
    """``sum_t H_l,t``: the loss Hessians w.r.t. the outputs summed over all items, ``(C, C)``.

    Through ``hessian_matmat`` with the identity, so that indefinite loss Hessians (a
    Gaussian likelihood with learned variance) work too.
    """
    C = outputs.shape[-1]
    eye = xp.eye(C, dtype=outputs.dtype, device=array_device(outputs))
    columns = loss.hessian_matmat(outputs, y, xp.broadcast_to(eye, tuple(outputs.shape) + (C,)))
    return xp.sum(xp.reshape(columns, (-1, C, C)), axis=0)


def _accumulate_activation(curvature, index, layer, h, grad, xp):
    """Add one batch's ``phi' phi'^T`` and ``phi'' * dl/db``; return ``dl/dh``."""
    D = h.shape[-1]
    d1 = layer.first_derivative(h, xp)
    d2 = layer.second_derivative(h, xp)
    rows = xp.reshape(d1, (-1, D))
    outer = xp.matrix_transpose(rows) @ rows
    second = None if d2 is None else xp.sum(xp.reshape(d2 * grad, (-1, D)), axis=0)
    if index in curvature:
        old_outer, old_count, old_second = curvature[index]
        outer = old_outer + outer
        second = second if old_second is None else old_second + second
        count = old_count + rows.shape[0]
    else:
        count = rows.shape[0]
    curvature[index] = [outer, count, second]
    return d1 * grad
