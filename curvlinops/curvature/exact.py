"""Exact curvature operators over data: GGN, Hessian, its residual, Fisher, EF, Jacobian.

Each operator implements the product of one batch on tangents shaped like the
parameters with a trailing axis ``K`` (all ``K`` vectors in one fused pass); the
base class sums over batches and applies the loss's reduction over the data set.

- GGN ``G = sum_n J_n^T H_L,n J_n``: ``vjp(H_L jvp(V))`` (tier 1).
- Hessian ``H = G + R``: one forward-tangent and one backward pass with the
  model's second-order product (tier 2).
- ``R = H - G = sum_n sum_k (dL/df_nk) Hess(f_nk)``: both kinds of terms
  (activation curvature and the bilinear cross terms of each layer).
- Fisher ``F = sum_n J_n^T E_{y~r(y|f_n)}[g g^T] J_n`` computed from the loss's
  predictive distribution (not from the Hessian code), or by Monte-Carlo sampling
  of labels with a fixed seed.
- Empirical Fisher: the uncentered covariance of per-datum gradients at the true
  labels.
- Jacobian ``J`` of the model outputs over the data set, output space ``(N, C)``
  flattened in data order, and its transpose.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.losses``, ``._data``, ``.base``.
"""

from __future__ import annotations

import math

from ..models import (
    OUTPUTS,
    OutputsFunction,
    Tier,
    TraceableLinearMap,
    flatten_params,
    num_params,
    unflatten_params,
)
from ._data import batch_seed, check_mc_samples
from .base import CurvatureLinearOperator

__all__ = [
    "GGNLinearOperator",
    "HessianLinearOperator",
    "GGNResidualLinearOperator",
    "FisherLinearOperator",
    "EFLinearOperator",
    "JacobianLinearOperator",
    "TransposedJacobianLinearOperator",
]

_COMMON_PARAMETERS = """
    Parameters
    ----------
    model : curvlinops.models.Model or torch.nn.Module
        Any model speaking the protocol (e.g. a ``curvlinops.nn.Sequential``), or a
        ``torch.nn.Module``, wrapped as a ``TorchModel`` over the parameters in
        ``params`` (see :func:`~curvlinops.as_model`; the result is ``.model``).
    loss : curvlinops.losses.Loss or torch.nn.Module
        Loss with reduction "mean" or "sum", applied over the whole data set; PyTorch
        losses are translated (:func:`~curvlinops.as_loss`).
    params : list of arrays
        Parameters; the operator acts on flat vectors ``(P,)`` and ``(P, K)``. With a
        ``torch.nn.Module``: a list of its parameters (any subset, in any order).
    data : iterable of (X, y)
        Re-iterable batches of any sizes on the parameters' backend and device.
    num_data : int, optional
        Number of data points (skips the counting pass).
    progressbar : bool
        tqdm progress bar over batches in each product.
    check_deterministic : bool
        Run over the data twice at construction and raise if the passes differ.
    cache : bool
        Keep each batch's forward pass between products (memory: the model's
        activations over the whole data set).
    comm : optional
        Distribute over processes (an mpi4py communicator, a ``torch.distributed``
        process group or a :class:`~curvlinops.Communicator`): ``data`` is this
        process's shard, ``num_data`` the global count, and each product sums over all
        shards with one all-reduce (see :doc:`/distributed`).
"""


def _per_datum_outer_product(G, Jv, xp):
    """``G_n (G_n^T Jv_n)`` for every datum; ``G`` is ``(N, D, M)``, ``Jv`` ``(N, D, K)``."""
    return G @ (xp.matrix_transpose(G) @ Jv)


def _flat_outputs(A, n, xp):
    """Reshape ``(N, *out, K)`` to ``(N, D, K)``."""
    return xp.reshape(A, (n, -1, A.shape[-1]))


class GGNLinearOperator(CurvatureLinearOperator):
    __doc__ = (
        """Generalized Gauss-Newton matrix ``G = sum_n J_n^T H_L,n J_n`` over the data.

    Symmetric positive semi-definite for convex losses. Each product is one
    Jacobian-vector and one vector-Jacobian product per batch (tier 1), for all
    columns of a matmat at once.
"""
        + _COMMON_PARAMETERS
        + """
    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import GGNLinearOperator, MSELoss, nn
    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> X, y = np.ones((4, 3)), np.zeros((4, 2))
    >>> G = GGNLinearOperator(model, MSELoss(), params, [(X, y)])
    >>> G.shape
    (8, 8)
    """
    )

    psd = True

    def _declares_psd(self, loss) -> bool:
        # J^T H_L J is PSD when the loss Hessian H_L is; the library knows that for
        # losses in natural parameters (not for GaussianNLLLoss, whose H_L is indefinite).
        return bool(getattr(loss, "is_natural", False))

    def _batch_matmat(self, lin, y, tangents, scale, index):
        # the loss Hessian as a traceable map: JAX runs J^T H_L J v in one compiled call
        loss_hessian = TraceableLinearMap(
            _scaled_loss_hessian(self.loss), operands=(scale, lin.outputs, y), symmetric=True
        )
        return lin.gauss_newton_vjp(tangents, loss_hessian)

    def _batch_output_matmat(self, lin, y, Jv, scale, index):
        """``scale H_L (J v)``: the output-space half of a product (quadratic forms)."""
        return _scaled_loss_hessian(self.loss)(scale, lin.outputs, y, Jv)


class HessianLinearOperator(CurvatureLinearOperator):
    __doc__ = (
        """Hessian of the loss over the data, ``H = G + R`` (needs a tier-2 model).

    Symmetric, possibly indefinite. One product runs, per batch, one forward-tangent
    pass (which yields ``J v``) and one backward pass of the model's second-order
    product, with the loss's Hessian applied to ``J v`` in between.
"""
        + _COMMON_PARAMETERS
        + """
    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import HessianLinearOperator, MSELoss, nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> X, y = np.ones((5, 3)), np.zeros((5, 1))
    >>> H = HessianLinearOperator(model, MSELoss(), params, [(X, y)])
    >>> bool(np.allclose(H.to_dense(), H.to_dense().T))
    True
    """
    )

    required_tier = Tier.SECOND_ORDER

    def _batch_matmat(self, lin, y, tangents, scale, index):
        # One function object per loss configuration (the same for every batch, product
        # and operator) with the batch's arrays as operands: autodiff frontends may
        # trace and compile it once (JAX: a static argument of jit). OUTPUTS stands for
        # the outputs, so that JAX computes them inside its second-order pass.
        operands = (scale, OUTPUTS, y)
        loss_gradient = OutputsFunction(_scaled_loss_gradient(self.loss), operands=operands)
        loss_hessian = TraceableLinearMap(
            _scaled_loss_hessian(self.loss), operands=operands, symmetric=True
        )
        return lin.second_order_vjp(loss_gradient, tangents, loss_hessian)


class GGNResidualLinearOperator(CurvatureLinearOperator):
    __doc__ = (
        """The residual ``R = H - G = sum_n sum_k (dL/df_nk) Hess_theta(f_nk)``.

    Contains both kinds of terms that separate the Hessian from the GGN: the
    curvature of the activation functions, and the bilinear cross terms of each
    layer ``s = W a`` between ``W`` and the parameters ``a`` depends on (nonzero
    even for ReLU and linear networks). Needs a tier-2 model.
"""
        + _COMMON_PARAMETERS
        + """
    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import GGNResidualLinearOperator, MSELoss, nn
    >>> model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    >>> params = [np.array([[2.0]]), np.array([[3.0]])]
    >>> X, y = np.array([[1.0]]), np.array([[1.0]])
    >>> R = GGNResidualLinearOperator(model, MSELoss(reduction="sum"), params, [(X, y)])
    >>> R.to_dense().tolist()  # dL/df * d2f/dw1dw2 = 2 * (6 - 1) * 1
    [[0.0, 10.0], [10.0, 0.0]]
    """
    )

    required_tier = Tier.SECOND_ORDER

    def _batch_matmat(self, lin, y, tangents, scale, index):
        return lin.second_order_vjp(scale * self.loss.gradient(lin.outputs, y), tangents, None)


class FisherLinearOperator(CurvatureLinearOperator):
    __doc__ = (
        """Fisher information of the model's predictive distribution over the data.

    ``F = sum_n J_n^T E_{y ~ r(y|f_n)}[grad_f log r grad_f log r^T] J_n``, computed
    from the loss's predictive distribution itself: exactly (enumeration for
    categorical and Bernoulli outputs, closed forms for Gaussian and Poisson) when
    ``mc_samples`` is None, or by Monte-Carlo with ``mc_samples`` labels drawn per
    datum. The draws depend only on ``seed`` and the batch index (and, distributed, the
    rank), so every product of one operator uses the same samples (the operator is a
    fixed matrix).
"""
        + _COMMON_PARAMETERS
        + """
    mc_samples : int, optional
        Number of sampled labels per datum; None for the exact Fisher.
    seed : int
        Seed of the Monte-Carlo draws.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import CrossEntropyLoss, FisherLinearOperator, nn
    >>> model = nn.Sequential(nn.Linear(3, 4))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> X, y = np.ones((6, 3)), np.array([0, 1, 2, 3, 0, 1])
    >>> F = FisherLinearOperator(model, CrossEntropyLoss(), params, [(X, y)])
    >>> F_mc = FisherLinearOperator(model, CrossEntropyLoss(), params, [(X, y)],
    ...                             mc_samples=2, seed=1)
    >>> bool(np.allclose(F_mc @ np.ones(16), F_mc @ np.ones(16)))  # fixed draws
    True
    """
    )

    psd = True  # an expectation (or average) of outer products

    def __init__(self, model, loss, params, data, *, mc_samples=None, seed=0, **kwargs):
        self.mc_samples = check_mc_samples(mc_samples, allow_none=True)
        self.seed = int(seed)
        super().__init__(model, loss, params, data, **kwargs)

    def _batch_matmat(self, lin, y, tangents, scale, index):
        Jv = lin.jvp(tangents)
        return lin.vjp(self._batch_output_matmat(lin, y, Jv, scale, index))

    def _batch_output_matmat(self, lin, y, Jv, scale, index):
        """``scale F_out (J v)`` with the output-space Fisher, exact or sampled."""
        f = lin.outputs
        if self.mc_samples is None:
            return scale * self.loss.fisher_matmat(f, Jv)
        # Seeds depend on the batch index and rank only, so products are reproducible.
        seed = batch_seed(self.seed, index, self.comm.rank)
        G = self.loss.sampled_gradients(f, self.mc_samples, seed=seed)
        xp, n = self.xp, f.shape[0]
        FJv = _per_datum_outer_product(_flat_outputs(G, n, xp), _flat_outputs(Jv, n, xp), xp)
        return scale * xp.reshape(FJv, Jv.shape)


class EFLinearOperator(CurvatureLinearOperator):
    __doc__ = (
        """Empirical Fisher: ``sum_n J_n^T g_n g_n^T J_n`` with ``g_n`` the gradient of
    the loss of datum ``n`` at its true label (the uncentered gradient covariance).

    Not the Fisher: it uses the observed labels instead of the model's predictive
    distribution, and differs from it wherever the labels are far from the model's
    predictions.
"""
        + _COMMON_PARAMETERS
        + """
    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import EFLinearOperator, MSELoss, nn
    >>> model = nn.Sequential(nn.Linear(2, 1))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> E = EFLinearOperator(model, MSELoss(), params, [(np.ones((3, 2)), np.zeros((3, 1)))])
    >>> E.shape
    (3, 3)
    """
    )

    psd = True  # a sum of outer products

    def _batch_matmat(self, lin, y, tangents, scale, index):
        Jv = lin.jvp(tangents)
        return lin.vjp(self._batch_output_matmat(lin, y, Jv, scale, index))

    def _batch_output_matmat(self, lin, y, Jv, scale, index):
        """``scale g g^T (J v)`` per datum, ``g`` the loss gradient at the true label."""
        f = lin.outputs
        xp, n = self.xp, f.shape[0]
        g = _flat_outputs(self.loss.gradient(f, y)[..., None], n, xp)
        EJv = _per_datum_outer_product(g, _flat_outputs(Jv, n, xp), xp)
        return scale * xp.reshape(EJv, Jv.shape)


class _JacobianProducts(CurvatureLinearOperator):
    """Shared products of the Jacobian and its transpose over the data.

    Distributed, the output space holds the outputs of all ranks' shards in rank
    order: ``J V`` places this rank's rows at its offset and one all-reduce of the
    whole ``(N * C, K)`` result fills in the others'; ``J^T U`` takes this rank's
    rows of ``U`` and sums over ranks.
    """

    symmetric = False

    def _output_size(self):
        from .._backend.reduction import gather_outcomes
        from ._data import check_params_backend, iterate_batches

        xp, _, _ = check_params_backend(self.params)

        def local_sizes():
            batches = iterate_batches(self.data, xp)
            return [math.prod(self.model(self.params, X).shape) for _, X, _ in batches]

        per_rank = gather_outcomes(self.comm, local_sizes, f"{type(self).__name__} sizes")
        self._batch_output_sizes = per_rank[self.comm.rank]
        self._rank_offset = sum(sum(sizes) for sizes in per_rank[: self.comm.rank])
        self._num_outputs = sum(sum(sizes) for sizes in per_rank)
        return self._num_outputs

    def _jacobian_matmat(self, V):
        tangents = unflatten_params(V, self.shapes)
        xp, K, total = self.xp, V.shape[1], self._num_outputs

        def local():
            parts = []
            for index, X, _ in self._batches():
                Jv = self._linearization(index, X).jvp(tangents)
                parts.append(xp.reshape(Jv, (-1, K)))
            if not self.comm.distributed:
                return [xp.concat(parts, axis=0)]
            mine = sum(self._batch_output_sizes)
            before, after = self._rank_offset, total - self._rank_offset - mine
            zeros = [
                xp.zeros((n, K), dtype=self.dtype, device=self.device) for n in (before, after)
            ]
            return [xp.concat([zeros[0], *parts, zeros[1]], axis=0)]

        (JV,) = self._summed(local, [(total, K)], "product")
        return JV

    def _transposed_jacobian_matmat(self, U):
        def local():
            total, start = None, self._rank_offset
            for index, X, _ in self._batches():
                lin = self._linearization(index, X)
                size = self._batch_output_sizes[index]
                u_shape = tuple(lin.outputs.shape) + (U.shape[1],)
                u = self.xp.reshape(U[start : start + size, :], u_shape)
                start += size
                part = flatten_params(lin.vjp(u), self.shapes)
                total = part if total is None else total + part
            return [total]

        P = num_params(self.shapes)
        (JtU,) = self._summed(local, [(P, U.shape[1])], "transposed product")
        return JtU

    def _as(self, cls):
        """The same operator data as ``cls`` (no new passes over the data)."""
        other = cls.__new__(cls)
        other.__dict__.update(self.__dict__)
        other._shape = (self.shape[1], self.shape[0])
        return other


class JacobianLinearOperator(_JacobianProducts):
    __doc__ = (
        """Jacobian of the model's outputs over the data: ``(N * C, P)``.

    The output space is the outputs ``(N, C)`` of all batches, concatenated in data
    order and flattened in C order. Its adjoint is
    :class:`TransposedJacobianLinearOperator`. The loss only serves the
    determinism check; no normalization is applied.
"""
        + _COMMON_PARAMETERS
        + """
    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import JacobianLinearOperator, MSELoss, nn
    >>> model = nn.Sequential(nn.Linear(2, 3))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> J = JacobianLinearOperator(model, MSELoss(), params, [(np.ones((4, 2)), np.zeros((4, 3)))])
    >>> J.shape, J.T.shape
    ((12, 9), (9, 12))
    """
    )

    def _operator_shape(self, P):
        return (self._output_size(), P)

    def _matmat(self, V):
        return self._jacobian_matmat(V)

    def _rmatmat(self, U):
        return self._transposed_jacobian_matmat(U)

    def adjoint(self):
        return self._as(TransposedJacobianLinearOperator)


class TransposedJacobianLinearOperator(_JacobianProducts):
    __doc__ = (
        """Transposed Jacobian ``J^T`` of the model's outputs over the data: ``(P, N * C)``.

    Same conventions as :class:`JacobianLinearOperator`, whose adjoint it is.
"""
        + _COMMON_PARAMETERS
        + """
    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import MSELoss, TransposedJacobianLinearOperator, nn
    >>> model = nn.Sequential(nn.Linear(2, 3))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> data = [(np.ones((4, 2)), np.zeros((4, 3)))]
    >>> TransposedJacobianLinearOperator(model, MSELoss(), params, data).shape
    (9, 12)
    """
    )

    def _operator_shape(self, P):
        return (P, self._output_size())

    def _matmat(self, U):
        return self._transposed_jacobian_matmat(U)

    def _rmatmat(self, V):
        return self._jacobian_matmat(V)

    def adjoint(self):
        return self._as(JacobianLinearOperator)


#: ``(kind, type, attributes)`` of a loss -> its function (see _loss_function)
_LOSS_FUNCTIONS: dict = {}


def _loss_function(loss, kind, make):
    """One function object ``make(loss)`` per ``kind`` and loss configuration (type and
    attributes), so that a frontend that compiles it (JAX) does so once per batch
    shape, not once per operator or loss object. A loss with unhashable attributes
    gets a function of its own."""
    try:
        key = (kind, type(loss), tuple(sorted(vars(loss).items())))
        hash(key)
    except TypeError:
        return make(loss)
    found = _LOSS_FUNCTIONS.get(key)
    if found is None:
        found = _LOSS_FUNCTIONS[key] = make(loss)
    return found


def _scaled_loss_hessian(loss):
    """``(scale, f, y, V) -> scale * loss.hessian_matmat(f, y, V)`` (one per loss config)."""

    def make(loss):
        def scaled_hessian(scale, outputs, targets, V):
            return scale * loss.hessian_matmat(outputs, targets, V)

        return scaled_hessian

    return _loss_function(loss, "hessian", make)


def _scaled_loss_gradient(loss):
    """``(scale, f, y) -> scale * loss.gradient(f, y)`` (one per loss configuration)."""

    def make(loss):
        def scaled_gradient(scale, outputs, targets):
            return scale * loss.gradient(outputs, targets)

        return scaled_gradient

    return _loss_function(loss, "gradient", make)
