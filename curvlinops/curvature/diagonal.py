"""Diagonal curvature approximations from the layer taps (tier 3) and the layer protocol.

The exact GGN diagonal propagates the loss-Hessian factor ``S`` (``H_L = S S^T``)
through the model's layer taps: for a Linear layer with inputs ``a_n`` and output
gradients ``g_n,r`` (one per column of ``S``), the weight entries of the diagonal are
``c * sum_{n,r} g_n,r^2 a_n^2`` (one matrix product per layer). The Monte-Carlo
variant uses sampled gradients instead of ``S`` (its expectation is the Fisher
diagonal), the empirical-Fisher diagonal the per-datum gradients at the true labels.

With shared axes (inputs ``(N, S, D)``) the per-datum gradient sums over ``S`` before
it is squared, so those layers form per-datum gradients explicitly.

The exact Hessian diagonal walks the model's layers backwards through the layer
protocol (:func:`._chain.backpropagate`), per datum, down both paths of residual
blocks (with the exact terms that couple the paths at a block's input).

The GGN and empirical-Fisher diagonals also live across steps: ``update(batch, decay)``
averages one batch's diagonal into the current one, and ``state_dict()`` /
``from_state_dict()`` save and restore them as plain arrays.

Distributed (``comm``), each process sums over its shard and one all-reduce adds the
shards' diagonals (and the batch's data count, for ``update``).

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.losses``, ``._data``, ``._chain``, ``._elementwise``, ``._embedding``.
"""

from __future__ import annotations

import math

from .._backend import device as array_device, from_host, host_int, host_str, host_value
from .._backend.comm import as_communicator
from .._backend.reduction import collective_sum
from ..linalg import DiagonalLinearOperator
from ..models import Capability, Tier, flatten_params, param_shapes
from ._chain import backpropagate
from ._data import (
    batch_seed,
    check_batch,
    check_batch_values,
    check_mc_samples,
    check_params_backend,
    iterate_batches,
    prepare_inputs,
    resolve_loss,
    resolve_model,
)
from ._elementwise import elementwise_gradients
from ._embedding import as_matrix_tap

__all__ = [
    "GGNDiagonalLinearOperator",
    "EFDiagonalLinearOperator",
    "HessianDiagonalLinearOperator",
]


class _DataDiagonalLinearOperator(DiagonalLinearOperator):
    """A diagonal curvature accumulated in one pass over the data.

    Subclasses yield, per batch, ``(parameter index, contribution)`` pairs of
    unnormalized diagonal sums (:meth:`_batch_contributions`); this class runs the
    loop, checks that every parameter was covered and applies the loss's reduction.
    """

    #: tier of the model protocol the subclass needs
    required_tier = Tier.LAYER_TAPS
    #: positive semi-definite by construction (the ``is_psd`` tag; else derived from the
    #: signs of the entries when a solver asks)
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
        comm=None,
    ):
        model, params = resolve_model(model, params)  # a torch.nn.Module -> TorchModel
        loss, xp, _, _, self.num_data, shards = prepare_inputs(
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
        self.model, self.loss, self.comm = model, loss, shards.comm
        self._outputs_shape = shards.outputs_shape
        diagonal = self._accumulate(model, loss, params, data, xp, progressbar)
        super().__init__(diagonal, psd=self.psd or None)

    def _batch_contributions(self, lin, y, index, xp):
        """Yield ``(parameter index, array shaped like that parameter)`` for one batch."""
        raise NotImplementedError

    def _accumulate(self, model, loss, params, data, xp, progressbar):
        self.params, self.shapes = list(params), param_shapes(params)
        batches = iterate_batches(
            data,
            xp,
            params=params,
            model_name=model.name,
            progressbar=progressbar,
            desc=type(self).__name__,
        )
        sums, outputs_shape, _ = self._sums(params, batches, xp)
        return loss.normalization(self.num_data, outputs_shape) * sums

    def _sums(self, params, batches, xp):
        """The unnormalized flat diagonal over ``(index, X, y)`` batches, an output shape
        and the number of data points: this process's sums, added over the processes in
        one all-reduce (the reduction point of the diagonals)."""
        shapes = param_shapes(params)
        found = {"outputs_shape": None}

        def local():
            sums = [None] * len(params)
            count = 0
            for index, X, y in batches:
                lin = self.model.linearize(params, X)
                check_batch_values(self.loss, lin.outputs, y, index)
                found["outputs_shape"] = found["outputs_shape"] or tuple(lin.outputs.shape)
                count += int(X.shape[0])
                for where, value in self._batch_contributions(lin, y, index, xp):
                    sums[where] = value if sums[where] is None else sums[where] + value
            missing = [i for i, s in enumerate(sums) if s is None]
            if missing and found["outputs_shape"] is not None:  # a rank without data adds 0
                raise ValueError(
                    f"{type(self).__name__} needs every parameter in a tapped layer (Linear, "
                    "convolution, normalization), "
                    f"but parameters {missing} (shapes {[shapes[i] for i in missing]}) are not."
                )
            reshaped = [
                None if s is None else xp.reshape(s, shape)
                for s, shape in zip(sums, shapes, strict=True)
            ]
            dtype, dev = params[0].dtype, array_device(params[0])
            return [*reshaped, xp.asarray(float(count), dtype=dtype, device=dev)]

        *summed, count = collective_sum(
            self.comm,
            local,
            [*shapes, ()],
            xp=xp,
            dtype=params[0].dtype,
            device=array_device(params[0]),
            what=f"{type(self).__name__} pass over the data",
        )
        # distributed, every rank takes the shape found at construction (its first batch
        # may be missing or differ); one process, the first batch's as before
        stored = getattr(self, "_outputs_shape", None)
        outputs_shape = stored if stored and self.comm.distributed else found["outputs_shape"]
        return flatten_params(summed), outputs_shape, round(float(count))


class _TapDiagonalLinearOperator(_DataDiagonalLinearOperator):
    """A diagonal curvature from the layer taps of cotangents ``G`` (curvature ``G G^T``).

    Lives across steps: :meth:`update` (a moving average over batches),
    :meth:`state_dict` and :meth:`from_state_dict`.
    """

    num_updates = 0

    def update(self, batch, decay=0.95, *, params=None):
        """Average one batch's diagonal into the current one (curvature across steps).

        The diagonal becomes ``decay * old + (1 - decay) * new`` with ``new`` the
        diagonal of ``batch`` alone, scaled as an estimate of the data set's (as
        :meth:`KFACLinearOperator.update <curvlinops.KFACLinearOperator.update>` scales
        its factors): the batch mean for ``"mean"``, the batch sum times
        ``num_data / N_batch`` for ``"sum"``. One forward and one backward pass; no
        determinism check or counting pass. Monte-Carlo draws depend on ``seed`` and
        the update count, so a restored state continues with the same draws.
        Distributed (``comm``), every process calls it with its shard of the batch, and
        ``N_batch`` counts all shards.

        Parameters
        ----------
        batch : tuple (X, y)
            One batch on the operator's backend.
        decay : float
            In ``[0, 1]``.
        params : list of arrays, optional
            Take the batch's diagonal at these parameters (and keep them).

        Returns
        -------
        self
            Updated in place; inverses taken before stay those of the old diagonal.

        Examples
        --------
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import EFDiagonalLinearOperator, MSELoss, nn
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> rng = np.random.default_rng(0)
        >>> a, b = [(rng.normal(size=(6, 3)), rng.normal(size=(6, 2))) for _ in "ab"]
        >>> D = EFDiagonalLinearOperator(model, MSELoss(), params, [a], check_deterministic=False)
        >>> old = D.diagonal()
        >>> new = EFDiagonalLinearOperator(model, MSELoss(), params, [b]).diagonal()
        >>> bool(np.allclose(D.update(b, decay=0.75).diagonal(), 0.75 * old + 0.25 * new))
        True
        """
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}.")
        xp = self.xp
        if params is not None:
            params = list(params)
            self.model.check_params(params)
            if param_shapes(params) != self.shapes:
                raise ValueError(
                    f"update got parameters of shapes {param_shapes(params)}, the operator "
                    f"has {self.shapes}."
                )
            self.params = params
        index = _UPDATE_INDEX + self.num_updates
        sums, outputs_shape, N = self._sums(self.params, _OneBatch(index, batch, xp), xp)
        scale = self.loss.normalization(self.num_data, outputs_shape) * self.num_data / N
        self.num_updates += 1
        self._diag = decay * self._diag + (1.0 - decay) * (scale * sums)
        return self

    def state_dict(self):
        """The diagonal and its counts as plain NumPy arrays (``numpy.savez``, no pickle).

        Returns
        -------
        dict
            ``class``, ``num_data``, ``num_updates``, ``options`` and ``diagonal``.

        Examples
        --------
        >>> import io
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import GGNDiagonalLinearOperator, MSELoss, nn
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> D = GGNDiagonalLinearOperator(model, MSELoss(), params, [(np.eye(3), np.ones((3, 2)))])
        >>> file = io.BytesIO()
        >>> np.savez(file, **D.state_dict())
        >>> _ = file.seek(0)
        >>> state = dict(np.load(file, allow_pickle=False))
        >>> R = GGNDiagonalLinearOperator.from_state_dict(state, model, MSELoss(), params)
        >>> bool(np.array_equal(R.diagonal(), D.diagonal()))
        True
        """
        return {
            "class": host_value(type(self).__name__),
            "num_data": host_value(self.num_data),
            "num_updates": host_value(self.num_updates),
            "options": host_value(list(self._options())),
            "diagonal": host_value(self._diag),
        }

    def load_state_dict(self, state):
        """Take the diagonal and counts of a saved state (of the same class and size).

        Returns
        -------
        self
        """
        found = host_str(state["class"])
        if found != type(self).__name__:
            raise ValueError(f"The state is of a {found}, not of a {type(self).__name__}.")
        diagonal = state["diagonal"]
        if tuple(diagonal.shape) != (self.shape[0],):
            raise ValueError(
                f"The state's diagonal has shape {tuple(diagonal.shape)}, this operator's "
                f"({self.shape[0]},)."
            )
        self._set_options([int(v) for v in state["options"]])
        self.num_data = host_int(state["num_data"])
        self.num_updates = host_int(state["num_updates"])
        self._diag = from_host(diagonal, self.xp, self.dtype, self.device)
        return self

    @classmethod
    def from_state_dict(cls, state, model, loss, params, *, comm=None):
        """An operator restored from a saved state, without data (no pass over data).

        Parameters
        ----------
        state : dict
            From :meth:`state_dict`.
        model, loss :
            The model and loss the state was computed with.
        params : list of arrays
            Their backend, dtype and device are the restored operator's; later
            :meth:`update` calls take the batches' diagonals there.
        comm : optional
            The communicator of later :meth:`update` calls (each rank passes its shard
            of the batch).

        Returns
        -------
        operator
        """
        self = cls.__new__(cls)
        self.comm = as_communicator(comm)
        self._outputs_shape = None
        model, params = resolve_model(model, params)
        xp, dtype, dev = check_params_backend(params)
        model.check_params(params)
        model.require(cls.required_tier, cls.__name__)
        self.model, self.loss = model, resolve_loss(loss)
        self.params, self.shapes = list(params), param_shapes(params)
        self.num_data = host_int(state["num_data"])
        diagonal = from_host(state["diagonal"], xp, dtype, dev)
        DiagonalLinearOperator.__init__(self, diagonal, psd=self.psd or None)
        return self.load_state_dict(state)

    def _options(self):
        """The options a saved state keeps, as integers."""
        return ()

    def _set_options(self, options):
        pass

    def _cotangents(self, outputs, y, index, xp):
        """``(N, *out, M)`` cotangents whose outer products define the curvature."""
        raise NotImplementedError

    def _batch_contributions(self, lin, y, index, xp):
        for tap in lin.layer_taps(self._cotangents(lin.outputs, y, index, xp)):
            tap = _as_matrix_tap(tap, lin, xp)
            if tap.kind == "elementwise":
                rows = elementwise_gradients(tap, xp)
                yield tap.weight_index, xp.sum(rows[0] * rows[0], axis=0)
                if tap.bias_index is not None:
                    yield tap.bias_index, xp.sum(rows[1] * rows[1], axis=0)
                continue
            d_weight, d_bias = _squared_gradient_sums(
                tap.inputs, tap.output_grads, xp, groups=tap.groups
            )
            yield tap.weight_index, xp.matrix_transpose(d_weight) if tap.transposed else d_weight
            if tap.bias_index is not None:
                yield tap.bias_index, d_bias


#: index of the first update's Monte-Carlo draws (distinct from the construction's batches)
_UPDATE_INDEX = 1 << 24


class _OneBatch:
    """One update's batch as re-iterable data of ``(index, X, y)``: the batch is checked
    when iterated, inside the local work of a pass (so that a bad batch on one rank
    raises on every rank)."""

    def __init__(self, index, batch, xp):
        self.index, self.batch, self.xp = index, batch, xp

    def __iter__(self):
        X, y = check_batch(self.batch, self.xp, f"of update {self.index - _UPDATE_INDEX}")
        yield self.index, X, y


def _as_matrix_tap(tap, lin, xp):
    """An embedding's tap with one-hot inputs (other taps unchanged)."""
    if tap.kind != "embedding":
        return tap
    table = lin.params[tap.weight_index]
    return as_matrix_tap(tap, table.shape[0], table.dtype, xp)


def _per_datum_factor(S, xp):
    """Block-diagonal per-datum factor from per-position factors ``(N, *shared, C, R)``.

    With shared axes the loss returns one factor per position (its Hessian is block
    diagonal over them); the exact per-datum factor needs the blocks side by side:
    ``(N, *shared, C, P * R)`` with ``P`` positions, zero outside each position's block.
    """
    if S.ndim <= 3:
        return S
    N, C, R = S.shape[0], S.shape[-2], S.shape[-1]
    positions = S.shape[1:-2]
    P = 1
    for p in positions:
        P *= p
    S3 = xp.reshape(S, (N, P, C, R))
    eye = xp.eye(P, dtype=S.dtype, device=array_device(S))
    blocks = S3[:, :, :, None, :] * eye[None, :, None, :, None]
    return xp.reshape(blocks, (N, *positions, C, P * R))


def _squared_gradient_sums(a, g, xp, *, groups=1):
    """``sum_{n,m} (grad of datum n, column m)^2`` for a Linear layer's weight and bias.

    ``a`` is ``(N, [S...,] D_in)``, ``g`` is ``(N, [S...,] D_out, M)``. With ``groups =
    G`` (a grouped convolution) group ``g``'s weight rows meet only group ``g``'s
    inputs: the groups are a batch axis of the products, and the weight's entries come
    out as its matrix ``(D_out, D_in / G)``.
    """
    N, d_in, d_out, M = a.shape[0], a.shape[-1], g.shape[-2], g.shape[-1]
    G = groups
    if a.ndim == 2:
        g2 = xp.sum(g * g, axis=-1)  # (N, D_out)
        return _grouped_products(g2, a * a, G, xp), xp.sum(g2, axis=0)
    # Shared axes: the per-datum gradient sums over them before it is squared.
    a4 = xp.permute_dims(xp.reshape(a, (N, -1, G, d_in // G)), (0, 2, 1, 3))  # (N, G, S, d)
    g5 = xp.reshape(g, (N, -1, G, d_out // G, M))
    g5 = xp.permute_dims(g5, (0, 4, 2, 3, 1))  # (N, M, G, D_out / G, S)
    per_datum = g5 @ a4[:, None, ...]  # (N, M, G, D_out / G, D_in / G)
    d_weight = xp.sum(per_datum * per_datum, axis=(0, 1))
    g_bias = xp.sum(xp.reshape(g, (N, -1, d_out, M)), axis=1)  # (N, D_out, M)
    return xp.reshape(d_weight, (d_out, d_in // G)), xp.sum(g_bias * g_bias, axis=(0, 2))


_DIAGONAL_PARAMETERS = """
    Parameters
    ----------
    model : curvlinops.models.Model
        A model offering tier-3 layer taps (e.g. ``curvlinops.nn.Sequential``).
    loss : curvlinops.losses.Loss
        The loss; its reduction applies over the whole data set.
    params : list of arrays
        Parameters; the diagonal is over the flat vector of all of them.
    data : iterable of (X, y)
        Re-iterable batches on the parameters' backend and device.
    num_data : int, optional
        Number of data points (skips the counting pass).
    progressbar : bool
        tqdm progress bar over the batches.
    check_deterministic : bool
        Run over the data twice first and raise if the passes differ.
    comm : optional
        Distribute over processes (an mpi4py communicator, a ``torch.distributed``
        process group or a :class:`~curvlinops.Communicator`): ``data`` is this
        process's shard, ``num_data`` the global count; one all-reduce adds the
        shards' diagonals (see :doc:`/distributed`).
"""


class GGNDiagonalLinearOperator(_TapDiagonalLinearOperator):
    psd = True  # sums of squares

    __doc__ = (
        """Diagonal of the GGN, exact or Monte-Carlo, as a DiagonalLinearOperator.

    Exact (``mc_samples=None``): propagates the loss-Hessian factor ``S`` with
    ``H_L = S S^T`` through the layer taps, costing one backward pass of ``C``
    (number of outputs) vectors per batch. Monte-Carlo: propagates ``mc_samples``
    sampled gradients of the predictive distribution instead; its expectation is the
    Fisher diagonal (equal to the GGN diagonal for the natural-parameter losses).
"""
        + _DIAGONAL_PARAMETERS
        + """    mc_samples : int, optional
        Sampled labels per datum; None for the exact diagonal.
    seed : int
        Seed of the Monte-Carlo draws.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import GGNDiagonalLinearOperator, GGNLinearOperator, MSELoss, nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> data = [(np.ones((5, 3)), np.zeros((5, 2)))]
    >>> D = GGNDiagonalLinearOperator(model, MSELoss(), params, data)
    >>> G = GGNLinearOperator(model, MSELoss(), params, data)
    >>> bool(np.allclose(D.diagonal(), np.diag(G.to_dense())))
    True
    """
    )

    def __init__(self, model, loss, params, data, *, mc_samples=None, seed=0, **kwargs):
        self.mc_samples = check_mc_samples(mc_samples, allow_none=True)
        self.seed = int(seed)
        super().__init__(model, loss, params, data, **kwargs)

    def _options(self):
        return (-1 if self.mc_samples is None else self.mc_samples, self.seed)

    def _set_options(self, options):
        mc_samples, seed = options
        self.mc_samples = None if mc_samples < 0 else mc_samples
        self.seed = seed

    def _cotangents(self, outputs, y, index, xp):
        if self.mc_samples is None:
            return _per_datum_factor(self.loss.hessian_sqrt(outputs, y), xp)
        seed = batch_seed(self.seed, index, self.comm.rank)
        return self.loss.sampled_gradients(outputs, self.mc_samples, seed=seed)


class EFDiagonalLinearOperator(_TapDiagonalLinearOperator):
    psd = True  # sums of squares

    __doc__ = (
        """Diagonal of the empirical Fisher (squared per-datum gradients, summed).

    Uses the gradients at the true labels; see :class:`curvlinops.EFLinearOperator`
    for why this is not the Fisher.
"""
        + _DIAGONAL_PARAMETERS
        + """
    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import EFDiagonalLinearOperator, EFLinearOperator, MSELoss, nn
    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> data = [(np.ones((4, 3)), np.ones((4, 2)))]
    >>> D = EFDiagonalLinearOperator(model, MSELoss(), params, data)
    >>> E = EFLinearOperator(model, MSELoss(), params, data)
    >>> bool(np.allclose(D.diagonal(), np.diag(E.to_dense())))
    True
    """
    )

    def _cotangents(self, outputs, y, index, xp):
        return self.loss.gradient(outputs, y)[..., None]


class HessianDiagonalLinearOperator(_DataDiagonalLinearOperator):
    __doc__ = (
        """Exact diagonal of the Hessian, residual included, from the layer protocol.

    Backpropagates each datum's Hessian with respect to every tapped layer's outputs
    through the layers' own rules (including the curvature of the activations, see
    :mod:`curvlinops.curvature._chain` and :mod:`curvlinops.models.layers`); the weight
    entries of the diagonal are then ``c * sum_n diag(H_s,n) a_n^2``. Exact, not an
    estimate; it costs ``N * D^2`` memory per layer for batches of ``N`` data points
    with layers of width ``D``. With shared axes (inputs and outputs ``(N, S..., D)``,
    e.g. sequences) each datum's Hessian is over all its ``S * D`` entries, so the cost
    is ``N * (S D)^2``.

    Works for every model that offers the layer protocol
    (:attr:`~curvlinops.models.Capability.LAYER_PROTOCOL`): ``curvlinops.nn`` models and
    PyTorch models (:class:`~curvlinops.frontends.torch.TorchModel`: a chain of modules,
    or a ResNet whose ``forward`` adds two paths) made of layers the protocol knows
    (Linear, convolutions, grouped ones included, elementwise activations, batch
    normalization in evaluation mode, pooling, Identity, Flatten), and residual blocks
    (:class:`~curvlinops.nn.Residual` in ``curvlinops.nn``, which the PyTorch frontend
    maps a torch residual sum to; an identity or a projection shortcut): the walk goes
    down both paths, and at a block's input adds the paths' pulled-back Hessians and the
    exact terms that couple them (``J_b^T H J_s + J_s^T H J_b``).
"""
        + _DIAGONAL_PARAMETERS
        + """
    Raises
    ------
    MissingTierError
        If the model does not offer the layer protocol (a JAX function, hand-written
        callables); a layer without the rule raises
        :class:`~curvlinops.models.MissingLayerRuleError` naming it.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import (CrossEntropyLoss, HessianDiagonalLinearOperator,
    ...                         HessianLinearOperator, nn)
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> data = [(np.ones((5, 3)), np.array([0, 1, 2, 0, 1]))]
    >>> D = HessianDiagonalLinearOperator(model, CrossEntropyLoss(), params, data)
    >>> H = HessianLinearOperator(model, CrossEntropyLoss(), params, data)
    >>> bool(np.allclose(D.diagonal(), np.diag(H.to_dense())))
    True
    """
    )

    required_tier = Capability.LAYER_PROTOCOL

    def _batch_contributions(self, lin, y, index, xp):
        f = lin.outputs
        N, F = f.shape[0], math.prod(f.shape[1:])
        # each datum's loss Hessian over its F output entries (block diagonal over the
        # positions of shared axes), from the loss Hessian applied to the identity
        eye = xp.eye(F, dtype=f.dtype, device=array_device(f))
        columns = xp.broadcast_to(xp.reshape(eye, (1, *f.shape[1:], F)), (*f.shape, F))
        H_out = xp.reshape(self.loss.hessian_matmat(f, y, columns), (N, F, F))
        walk = backpropagate(
            lin.layers(),
            gradient=self.loss.gradient(f, y),
            curvature=H_out,
            who="HessianDiagonalLinearOperator",
            instead="HessianLinearOperator(...).to_dense() or a stochastic diagonal estimate "
            "(curvlinops.hutchinson_diagonal) for this model",
        )
        for _, layer, H, _ in walk:
            tap = layer.tap()
            if tap is None:
                continue
            tap = _as_matrix_tap(tap, lin, xp)
            for where, value in _hessian_diagonal_of_tap(tap, H, xp):
                transpose = tap.transposed and where == tap.weight_index
                yield where, xp.matrix_transpose(value) if transpose else value


def _grouped_products(left, right, groups, xp):
    """``left^T right`` ``(D_out, D_in)`` for rows ``(N, D_out)`` and ``(N, D_in)``; with
    ``groups`` only each group's block, as the weight's matrix ``(D_out, D_in / G)``."""
    if groups == 1:
        return xp.matrix_transpose(left) @ right
    N, d_out, d_in = left.shape[0], left.shape[-1], right.shape[-1]
    left_groups = xp.permute_dims(xp.reshape(left, (N, groups, d_out // groups)), (1, 2, 0))
    right_groups = xp.permute_dims(xp.reshape(right, (N, groups, d_in // groups)), (1, 0, 2))
    return xp.reshape(left_groups @ right_groups, (d_out, d_in // groups))


def _hessian_diagonal_of_tap(tap, H, xp):
    """``(index, diagonal)`` of a tapped layer's weight and bias from the outputs' Hessians.

    ``H`` is per datum over the layer's outputs, ``(N, S D_out, S D_out)``; the weight
    entry ``(i, j)`` is ``sum_n sum_{s,t} H_n[(s, i), (t, i)] a_n,s,j a_n,t,j``. With
    groups (a grouped convolution), ``j`` runs over the entries of the group of ``i``.
    """
    a = tap.inputs
    N, d_in = a.shape[0], a.shape[-1]
    if a.ndim == 2:
        h = xp.linalg.diagonal(H)  # (N, D_out)
        if tap.kind == "elementwise":  # w * a + b: the weight entry i is h_i a_i^2
            yield tap.weight_index, xp.sum(h * a * a, axis=0)
        else:
            yield tap.weight_index, _grouped_products(h, a * a, tap.groups, xp)
        if tap.bias_index is not None:
            yield tap.bias_index, xp.sum(h, axis=0)
        return
    S = math.prod(a.shape[1:-1])
    d_out = H.shape[-1] // S
    a3 = xp.reshape(a, (N, S, d_in))
    if tap.channels_first:  # outputs (N, D_out, S...): entries ordered (feature, position)
        blocks = xp.permute_dims(xp.reshape(H, (N, d_out, S, d_out, S)), (0, 2, 4, 1, 3))
    else:
        blocks = xp.permute_dims(xp.reshape(H, (N, S, d_out, S, d_out)), (0, 1, 3, 2, 4))
    h = xp.linalg.diagonal(blocks)  # (N, S, S, D_out): [n, s, t, i]
    if tap.kind == "elementwise":
        # the weight entry i: sum_{s,t} h[n, s, t, i] a[n, s, i] a[n, t, i]
        yield tap.weight_index, xp.sum(h * a3[:, :, None, :] * a3[:, None, :, :], axis=(0, 1, 2))
        if tap.bias_index is not None:
            yield tap.bias_index, xp.sum(h, axis=(0, 1, 2))
        return
    # sum_s h[n, s, t, i] a[n, s, j] for every (n, t), then times a[n, t, j], summed;
    # the groups (one for a layer without) are a batch axis: i and j of the same group
    G = tap.groups
    h5 = xp.reshape(h, (N, S, S, G, d_out // G))
    a4 = xp.permute_dims(xp.reshape(a3, (N, S, G, d_in // G)), (0, 2, 1, 3))  # (N, G, S, d)
    mixed = xp.permute_dims(h5, (0, 3, 2, 4, 1)) @ a4[:, :, None, :, :]  # (N, G, t, i, j)
    weight = xp.sum(mixed * a4[:, :, :, None, :], axis=(0, 2))  # (G, D_out / G, D_in / G)
    yield tap.weight_index, xp.reshape(weight, (d_out, d_in // G))
    if tap.bias_index is not None:
        yield tap.bias_index, xp.sum(h, axis=(0, 1, 2))
