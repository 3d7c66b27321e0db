"""The base class of curvature operators over a data set.

:class:`CurvatureLinearOperator` owns everything that curvature matrices share:
parameters and their backend, the re-iterable data of ``(X, y)`` batches of any
sizes, the number of data points, the loss's reduction over the whole data set,
the determinism check, the optional progress bar and per-batch cache, and the
communicator of a distributed operator. A concrete operator implements only the
product of one batch, :meth:`_batch_matmat`, on tangents shaped like the parameters
with a trailing axis ``K``; the base class sums over batches and applies the loss's
normalization.

Sums over data go through one reduction point, :meth:`CurvatureLinearOperator._summed`:
the local sum over this process's batches, then (with a distributed ``comm``) one
all-reduce over the processes of everything the quantity needs (a product's whole
``(P, K)`` block, a gradient with the loss value).

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.losses``, ``._data``.
"""

from __future__ import annotations

from .._backend.comm import as_communicator
from .._backend.reduction import collective_sum
from ..linalg import LinearOperator
from ..models import Tier, flatten_params, num_params, param_shapes, unflatten_params
from ._data import (
    DataShards,
    NonDeterministicDataError,
    _checked_num_data as checked_num_data,
    check_batch_values,
    check_params_backend,
    iterate_batches,
    prepare_inputs,
    resolve_loss,
    resolve_model,
)

__all__ = ["CurvatureLinearOperator", "NonDeterministicDataError"]


class CurvatureLinearOperator(LinearOperator):
    """A curvature matrix of ``loss(model(params, X), y)`` over a data set.

    Parameters
    ----------
    model : curvlinops.models.Model or torch.nn.Module
        Any model that speaks the protocol (tier 1 at least), or a model a registered
        adapter takes (:func:`~curvlinops.as_model`): a ``torch.nn.Module``
        becomes a :class:`~curvlinops.frontends.torch.TorchModel` over the parameters
        in ``params`` (the built model is :attr:`model`).
    loss : curvlinops.losses.Loss
        The loss; its ``reduction`` ("mean" or "sum") is applied over the whole data
        set, not per batch.
    params : list of arrays
        The point at which the curvature is taken. Operators act on flat vectors
        ``(P,)`` / ``(P, K)``: the parameters in list order, each flattened in C order.
    data : iterable of (X, y)
        Re-iterable batches of any sizes on the parameters' backend and device
        (a list, or a data loader that iterates in the same order every time).
    num_data : int, optional
        Number of data points; counted with one pass over the data when omitted.
    progressbar : bool
        Show a tqdm progress bar over batches in each product (needs tqdm).
    check_deterministic : bool
        At construction, run over the data twice and raise
        :class:`NonDeterministicDataError` if batches, losses or gradients differ.
    cache : bool
        Keep each batch's forward pass (its linearization) between products. Memory:
        the model's activations for the whole data set (for an MLP, about
        ``N * sum(layer widths)`` numbers for the inputs of every layer plus the
        pre-activations), so use it when the data set's activations fit in memory;
        it makes each product skip the forward pass.
    comm : optional
        Distribute over processes: an mpi4py communicator, a ``torch.distributed``
        process group or a :class:`~curvlinops.Communicator`. Then ``data`` is this
        process's shard (any number of batches, none included), ``num_data`` the
        global count (counted with one collective when omitted), and every product is
        the curvature over all shards, computed with one all-reduce of its ``(P, K)``
        block and returned on every process. Every process must call the same methods
        in the same order (see :doc:`/distributed`).
    """

    #: tiers of the model protocol the operator needs
    required_tier = Tier.FIRST_ORDER
    #: whether the operator is symmetric (the curvature matrices are)
    symmetric = True
    #: whether the operator is positive semi-definite by construction (GGN, Fisher, EF,
    #: K-FAC, ...; not the Hessian): the ``is_psd`` tag the solvers consult
    psd = False

    def __init__(
        self,
        model,
        loss,
        params,
        data,
        *,
        num_data=None,
        progressbar=False,
        check_deterministic=True,
        cache=False,
        comm=None,
    ):
        model, params = resolve_model(model, params)  # a torch.nn.Module -> TorchModel
        loss, xp, dtype, dev, self.num_data, shards = prepare_inputs(
            model,
            loss,
            params,
            data,
            tier=self.required_tier,
            who=type(self).__name__,
            num_data=num_data,
            check_deterministic=check_deterministic,
            comm=comm,
        )
        self._set_shards(shards)
        self._init_fields(model, loss, params, data, xp, dtype, dev, progressbar, cache)

    def _set_shards(self, shards):
        self.shards, self.comm = shards, shards.comm
        if shards.outputs_shape is not None:  # distributed: every rank knows it
            self._outputs_shape = shards.outputs_shape

    @classmethod
    def _without_data(cls, model, loss, params, num_data, comm=None):
        """An instance over ``model``, ``loss`` and ``params`` but no data (``data`` is None):
        the start of restoring a saved state, which must then set everything a product
        needs. No pass over data, no determinism check."""
        self = cls.__new__(cls)
        model, params = resolve_model(model, params)
        xp, dtype, dev = check_params_backend(params)
        loss = resolve_loss(loss)
        model.check_params(params)
        model.require(cls.required_tier, cls.__name__)
        self.num_data = checked_num_data(num_data)
        comm = as_communicator(comm)
        self._set_shards(DataShards(comm, (False,) * comm.size))
        self._init_fields(model, loss, params, None, xp, dtype, dev, False, False)
        return self

    def _init_fields(self, model, loss, params, data, xp, dtype, dev, progressbar, cache):
        self.model, self.loss, self.params, self.data = model, loss, list(params), data
        self.shapes = param_shapes(params)
        self.progressbar, self.cache = bool(progressbar), bool(cache)
        P = num_params(self.shapes)
        super().__init__(
            self._operator_shape(P),
            dtype=dtype,
            xp=xp,
            device=dev,
            symmetric=self.symmetric,
            psd=self._declares_psd(loss),
        )
        self._cached = {}
        self._checked_batches = set()

    # -- subclass hooks -------------------------------------------------------------

    def _declares_psd(self, loss) -> bool:
        """The ``psd`` tag for this loss: the class-level fact, unless it depends on it."""
        return bool(self.psd)

    def _operator_shape(self, P):
        return (P, P)

    def _batch_matmat(self, lin, y, tangents, scale, index):
        """Product of batch ``index``'s curvature with tangents (+ trailing K), times ``scale``.

        ``scale`` is the loss's normalization over the data set; operators apply it in
        output space (``N x C x K`` numbers) rather than to the ``P x K`` result.
        Returns a list shaped like the parameters with the trailing ``K`` axis.
        """
        raise NotImplementedError

    # -- products -------------------------------------------------------------------

    def _matmat(self, V):
        tangents = unflatten_params(V, self.shapes)

        def local():
            total = None
            for index, lin, y, scale in self._checked_linearizations():
                batch = self._batch_matmat(lin, y, tangents, scale, index)
                part = flatten_params(batch, self.shapes)
                total = part if total is None else total + part
            return [total]

        (total,) = self._summed(local, [(self.shape[0], V.shape[1])], "product")
        return total

    def quadratic_form(self, V):
        """``V^T A V``, the ``(K, K)`` Gram matrix of the columns of ``V`` under ``A``.

        What a quadratic model of the loss over a few directions needs (K-FAC's step
        size and momentum, a subspace method's projected curvature). Operators of the
        form ``J^T M J`` with an output-space ``M`` (GGN, Fisher, empirical Fisher)
        compute it as ``(J V)^T M (J V)`` from one Jacobian-vector product per batch,
        without the backward pass of a product; the others as ``V^T (A V)``.

        Parameters
        ----------
        V : array
            ``(P, K)`` directions (a vector ``(P,)`` is one column).

        Returns
        -------
        array
            ``(K, K)`` on the operator's backend; ``(1, 1)`` for a vector.

        Examples
        --------
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import GGNLinearOperator, MSELoss, nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> rng = np.random.default_rng(0)
        >>> data = [(rng.normal(size=(5, 3)), rng.normal(size=(5, 2)))]
        >>> G = GGNLinearOperator(model, MSELoss(), params, data)
        >>> V = rng.normal(size=(G.shape[1], 2))
        >>> bool(np.allclose(G.quadratic_form(V), V.T @ (G @ V)))
        True
        """
        V = self.check_input(V, what="directions V").array
        V = V[:, None] if V.ndim == 1 else V
        xp = self.xp
        if not hasattr(self, "_batch_output_matmat"):
            return xp.matrix_transpose(V) @ self._matmat(V)
        tangents = unflatten_params(V, self.shapes)

        def local():
            total = None
            for index, lin, y, scale in self._checked_linearizations():
                Jv = lin.jvp(tangents)
                MJv = self._batch_output_matmat(lin, y, Jv, scale, index)
                K = Jv.shape[-1]
                part = xp.matrix_transpose(xp.reshape(Jv, (-1, K))) @ xp.reshape(MJv, (-1, K))
                total = part if total is None else total + part
            return [total]

        K = V.shape[1]
        (total,) = self._summed(local, [(K, K)], "quadratic form")
        return 0.5 * (total + xp.matrix_transpose(total))  # exactly symmetric

    def _checked_linearizations(self):
        """``(index, linearization, y, scale)`` of this process's batches, for products.

        ``scale`` is the loss's normalization, from the first batch's output shape (no
        extra forward pass); each batch's labels, targets and outputs are checked once
        (the data and parameters are fixed: the first product pays one check per batch).
        """
        scale = None
        for index, X, y in self._batches():
            lin = self._linearization(index, X)
            if scale is None:
                self._set_output_shape(lin.outputs)
                scale = self._normalization()
            if index not in self._checked_batches:
                check_batch_values(self.loss, lin.outputs, y, index)
                self._checked_batches.add(index)
            yield index, lin, y, scale

    def _summed(self, local, shapes, what):
        """The reduction point of sums over data: ``local()`` (this process's sums, a list
        of arrays of ``shapes``, None for none) summed over the processes of ``comm`` in
        one all-reduce; a rank's failure raises on every rank."""
        return collective_sum(
            self.comm,
            local,
            shapes,
            xp=self.xp,
            dtype=self.dtype,
            device=self.device,
            what=f"{type(self).__name__} {what}",
        )

    def _batches(self):
        return iterate_batches(
            self.data,
            self.xp,
            params=self.params,
            model_name=self.model.name,
            progressbar=self.progressbar,
            desc=type(self).__name__,
        )

    def _linearization(self, index, X):
        if self.cache:
            if index not in self._cached:
                self._cached[index] = self.model.linearize(self.params, X)
            return self._cached[index]
        return self.model.linearize(self.params, X)

    def _normalization(self):
        return self.loss.normalization(self.num_data, self._output_shape())

    def _set_output_shape(self, outputs):
        if not hasattr(self, "_outputs_shape"):
            self._outputs_shape = tuple(outputs.shape)

    def _output_shape(self):
        if not hasattr(self, "_outputs_shape") and getattr(self, "_cached", None):
            # a cached forward pass knows the shape: no pass just for it
            self._outputs_shape = tuple(next(iter(self._cached.values())).outputs.shape)
        if not hasattr(self, "_outputs_shape"):
            for _, X, _ in iterate_batches(self.data, self.xp):
                self._outputs_shape = tuple(self.model(self.params, X).shape)
                break
        return self._outputs_shape

    # -- the loss and its gradient over the same data ---------------------------------

    def gradient_and_loss(self):
        """Gradient (list shaped like the parameters) and value of the loss over the data.

        Uses the loss's reduction over the whole data set, so the result equals the
        loss of the concatenated data. Distributed (``comm``), the data set is all
        processes' shards: one all-reduce of the gradient and the loss, the same result
        on every process.
        """
        grads, value = self._gradient_and_loss_unnormalized()
        c = self._normalization()
        return [c * g for g in grads], c * value

    def _gradient_and_loss_unnormalized(self):
        def local():
            grads, value = [None] * len(self.shapes), None
            for index, X, y in self._batches():
                lin = self._linearization(index, X)
                batch_value = check_batch_values(self.loss, lin.outputs, y, index)
                batch_grads = lin.vjp(self.loss.gradient(lin.outputs, y))
                value = batch_value if value is None else value + batch_value
                grads = [b if g is None else g + b for g, b in zip(grads, batch_grads, strict=True)]
            return [*grads, value]

        *grads, value = self._summed(local, [*self.shapes, ()], "gradient and loss")
        return grads, value
