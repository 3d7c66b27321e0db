"""Factor statistics over data: the base of the Kronecker-factored curvature operators.

What lives here (the statistics, apart from the operators they end up in):

- :class:`LayerInfo`: a Linear layer as the Kronecker operators see it (its name,
  parameter indices and sizes);
- :class:`_InputStatistics`: running sums ``sum a a^T``, ``sum a`` and the item count of
  one layer's inputs, and the input factor ``A`` (or the joint ``[a; 1]`` factor) from
  them;
- :func:`flatten_tap`: one tap's inputs and output gradients as item matrices
  (``kfac_approx`` "expand" / "reduce"), with a leading group axis for a tap whose
  weight is block diagonal over groups (a grouped convolution);
- :class:`_KroneckerCurvature`: the curvature-operator base of
  :class:`~curvlinops.curvature.kfac.KFACLinearOperator`,
  :class:`~curvlinops.curvature.ekfac.EKFACLinearOperator` and
  :class:`~curvlinops.curvature.kfac_hessian.KFACHessianLinearOperator`: data, loss
  normalization, the layer layout from the tier-3 taps, the cotangents, one pass over the
  data that accumulates K-FAC's factors, and delegation of products and exact queries to
  the :class:`~.kronecker_factored.KroneckerFactoredLinearOperator` a subclass builds
  with :meth:`_KroneckerCurvature._make_operator`;
- :func:`symmetrized`, :func:`diag_matrix` (re-exported), :func:`check_fisher_type`,
  :func:`check_damping`.

Internal to the curvature layer (no public names).

The interface to a subclass's own statistics code (e.g. the K-FAC Hessian's recursion):
``self.layers`` (a list of :class:`LayerInfo`, in order) and
``self._set_factors([(B, A), ...])`` (one pair per layer, in that order).

Conventions (the scalings that make K-FAC exact in the known cases). A Linear layer
``s = W a + b`` with ``W`` of shape ``(D_out, D_in)`` flattened in C order has the
weight block ``B (x) A`` with

- ``A = (1 / T) sum_t a_t a_t^T`` over the ``T`` items ``t`` of the whole data set
  (an item is a datum ``n``; with shared axes and ``kfac_approx="expand"`` every
  position ``(n, s)``; with ``"reduce"`` a datum whose input is averaged over ``S``);
- ``B = c sum_t sum_m g_t,m g_t,m^T`` with ``g_t,m`` the gradient of the layer's output
  for the output-space cotangent column ``m`` (summed over ``S`` for ``"reduce"``) and
  ``c = loss.normalization(num_data, outputs_shape)``.

For a single datum, for linear regression and for deep linear networks with squared
loss, ``B (x) A`` equals the exact GGN block.

Groups. A tap with ``groups = G > 1`` (a grouped convolution: its weight is block
diagonal over groups of inputs and outputs) is ``G`` layers in one: group ``g``'s
weight rows ``(D_out / G, D_in / G)`` (and bias entries) get their own block
``B_g (x) A_g`` from group ``g``'s inputs and output gradients. Its
:class:`LayerInfo` holds the sizes of one group; its factors are stacks
``(G, d, d)``, accumulated for all groups at once (batched matrix products, no loop
over groups in the pass over the data). The bias block is ``B (x) 1``; with
``separate_weight_and_bias=False`` the joint block over ``[W | b]`` uses inputs
augmented by a trailing one.

Distributed (``comm``): a pass sums ``a a^T``, ``a``, the item counts and ``G^T G`` over
this process's batches; one all-reduce adds the processes' sums (with the layer layout
for ranks without data, which learn it from the others); the factors follow from the
sums on every rank alike, so that products after construction need no communication.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.losses``, ``._data``, ``._elementwise``, ``._embedding``, ``.base``,
``.kronecker_factored``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._backend import (  # noqa: F401 (re-exported)
    FactorizationError,
    device as array_device,
    diag_matrix,
    from_host,
    host_int,
    host_str,
    host_value,
)
from .._backend.reduction import Static, collective_tree_sum
from ..linalg import IdentityLinearOperator, KroneckerLinearOperator
from ..models import Tier, param_shapes
from ._data import (
    batch_seed,
    check_batch,
    check_batch_outputs,
    check_batch_values,
    check_mc_samples,
)
from ._elementwise import elementwise_gradients
from ._embedding import as_matrix_tap, counts
from .base import CurvatureLinearOperator
from .kronecker_factored import KroneckerFactoredLinearOperator, layer_layout

# Internal machinery of the curvature layer: nothing here is public API (the operators
# built on it are, from their own modules).
__all__: list[str] = []

APPROXIMATIONS = ("expand", "reduce")


@dataclass(frozen=True)
class LayerInfo:
    """A tapped layer of the model as the Kronecker operators see it.

    ``kind`` is the tap's: ``"matrix"`` (Kronecker blocks) or ``"elementwise"`` (an
    exact block over its ``D = d_in = d_out`` weight and bias entries). With
    ``groups > 1``, ``d_in`` and ``d_out`` are the sizes of one group.
    """

    name: str
    weight_index: int
    bias_index: int | None
    d_in: int
    d_out: int
    kind: str = "matrix"
    transposed: bool = False
    groups: int = 1

    @property
    def exact(self) -> bool:
        """Whether the layer gets an exact block instead of Kronecker factors."""
        return self.kind == "elementwise"


class _InputStatistics:
    """Running sums for one layer's input factor: ``sum a a^T``, ``sum a``, item count.

    Items ``a`` are ``(T, D)``, or ``(G, T, D)`` for the groups of a grouped layer
    (then the sums are stacks over the groups).
    """

    def __init__(self):
        self.sum_aa = None
        self.sum_a = None
        self.count = 0

    def sums(self):
        """``(sum a a^T, sum a, count)``: what a sum over processes adds."""
        return (self.sum_aa, self.sum_a, self.count)

    @classmethod
    def from_sums(cls, sums):
        self = cls()
        self.sum_aa, self.sum_a, self.count = sums
        return self

    def add(self, a, xp):
        aa = xp.matrix_transpose(a) @ a
        s = xp.sum(a, axis=-2)
        self.sum_aa = aa if self.sum_aa is None else self.sum_aa + aa
        self.sum_a = s if self.sum_a is None else self.sum_a + s
        self.count += int(a.shape[-2])

    def add_counts(self, ids, V, dtype, xp):
        """An embedding's items: their one-hot inputs' sums (``sum a a^T`` is diagonal)."""
        c = counts(ids, V, dtype, xp)
        self.sum_a = c if self.sum_a is None else self.sum_a + c
        self.count += math.prod(ids.shape)

    def diagonal_factor(self):
        """An embedding's ``A``: the diagonal ``counts / T``, as a 1-D array."""
        return self.sum_a / self.count

    def factor(self, joint: bool, xp):
        """``A`` (or the joint ``[a; 1]`` factor): the mean over the items seen."""
        if not joint:
            return self.sum_aa / self.count
        A = self.sum_aa
        s = self.sum_a
        lead = tuple(A.shape[:-2])  # the groups, if any
        corner = xp.full(lead + (1, 1), float(self.count), dtype=A.dtype, device=array_device(A))
        top = xp.concat([A, s[..., :, None]], axis=-1)
        bottom = xp.concat([s[..., None, :], corner], axis=-1)
        return xp.concat([top, bottom], axis=-2) / self.count


def flatten_tap(tap, kfac_approx, xp):
    """Inputs ``(T, D_in)`` and output gradients ``(T * M, D_out)`` of one tap's items.

    Without shared axes an item is a datum. With shared axes ``(N, S..., D)``,
    ``"expand"`` makes each position an item and ``"reduce"`` averages the inputs and
    sums the output gradients over the shared axes (Eschenhagen et al., 2023). Rows of
    the gradient matrix are item-major: rows ``t * M ... t * M + M - 1`` belong to item
    ``t``. The gradients are None for a tap taken without cotangents.

    For a tap with ``groups = G > 1`` both come with a leading group axis, ``(G, T,
    D_in / G)`` and ``(G, T * M, D_out / G)``: each group's own items.
    """
    a, g = tap.inputs, tap.output_grads
    d_in = a.shape[-1]
    if a.ndim > 2 and kfac_approx == "reduce":
        a = xp.mean(a, axis=tuple(range(1, a.ndim - 1)))
        if g is not None:
            g = xp.sum(g, axis=tuple(range(1, g.ndim - 2)))
    a = group_rows(xp.reshape(a, (-1, d_in)), tap.groups, xp)
    if g is None:
        return a, None, 0
    d_out, M = g.shape[-2], g.shape[-1]
    order = tuple(range(g.ndim - 2)) + (g.ndim - 1, g.ndim - 2)
    G = group_rows(xp.reshape(xp.permute_dims(g, order), (-1, d_out)), tap.groups, xp)
    return a, G, M


class _KroneckerCurvature(CurvatureLinearOperator):
    """Base of the Kronecker-factored curvature operators: layout, statistics, delegation.

    Subclasses implement :meth:`_build` (compute the factors and set ``self._operator``,
    a :class:`KroneckerFactoredLinearOperator`). Products and exact queries delegate
    to it; the operator never touches the data after construction.
    """

    required_tier = Tier.LAYER_TAPS
    #: keep the last batch's taps after a pass of :meth:`_accumulate` (in ``_retained``)
    _retain_taps = False
    _retained = None
    #: the ``fisher_type`` values a subclass accepts
    fisher_types: tuple = ()

    def __init__(
        self,
        model,
        loss,
        params,
        data,
        *,
        fisher_type="type-2",
        mc_samples=1,
        kfac_approx="expand",
        separate_weight_and_bias=True,
        seed=0,
        num_data=None,
        progressbar=False,
        check_deterministic=True,
        comm=None,
    ):
        self._set_options(fisher_type, mc_samples, kfac_approx, separate_weight_and_bias, seed)
        super().__init__(
            model,
            loss,
            params,
            data,
            num_data=num_data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            comm=comm,
        )
        self.layers = None
        self.num_updates = 0
        self._build()

    def _set_options(self, fisher_type, mc_samples, kfac_approx, separate_weight_and_bias, seed):
        check_fisher_type(fisher_type, self.fisher_types)
        self.fisher_type = fisher_type
        self.mc_samples = check_mc_samples(mc_samples)
        self.seed = int(seed)
        if kfac_approx not in APPROXIMATIONS:
            raise ValueError(f"kfac_approx must be one of {APPROXIMATIONS}, got {kfac_approx!r}.")
        self.kfac_approx = kfac_approx
        self.separate_weight_and_bias = bool(separate_weight_and_bias)

    def _build(self):
        raise NotImplementedError

    # -- curvature across steps: one-batch updates and saved states -------------------

    def _prepare_update(self, batch, decay, params):
        """Check an update's arguments, move to ``params``; return ``(decay, batches)``.

        ``batches`` is the update's batch as one-batch data, checked when a pass iterates
        it; its index numbers the update's Monte-Carlo draws (reproducible from the update
        count, distinct from the construction's batches).
        """
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}.")
        if params is not None:
            params = list(params)
            self.model.check_params(params)
            if param_shapes(params) != self.shapes:
                raise ValueError(
                    f"update got parameters of shapes {param_shapes(params)}, the operator "
                    f"has {self.shapes}."
                )
            self.params = params
            self._cached = {}
        index = _UPDATE_INDEX + self.num_updates
        return decay, _OneBatch(index, batch, self.xp, f"of update {self.num_updates}")

    def _batch_scale(self, count):
        """The scale that makes a batch's factors an estimate of the data set's: the
        batch mean for ``"mean"``, the batch sum times ``num_data / N_batch`` for
        ``"sum"`` (``count``: the batch's data points over all processes)."""
        return self._normalization() * self.num_data / count

    def _current_factors(self):
        """``(B, A)`` per layer as stored (``(exact block, None)`` for elementwise layers)."""
        return [
            (self.exact_blocks[la.name], None)
            if la.exact
            else (self.output_factors[la.name], self.input_factors[la.name])
            for la in self.layers
        ]

    def _averaged_factors(self, batch, decay, params):
        """K-FAC's factors averaged with one batch's: ``decay old + (1 - decay) batch``."""
        decay, batches = self._prepare_update(batch, decay, params)
        new, scale = self._kfac_factors(batches)
        self.num_updates += 1
        factors = [
            (_ema(B0, B1, decay), None if A0 is None else _ema(A0, A1, decay))
            for (B0, A0), (B1, A1) in zip(self._current_factors(), new, strict=True)
        ]
        return factors, decay, (batches, scale)

    def _state_header(self):
        """The options, counts and layer layout of a saved state (host arrays)."""
        layers = self.layers
        ints = [
            [la.weight_index, -1 if la.bias_index is None else la.bias_index, la.d_in, la.d_out]
            for la in layers
        ]
        return {
            "class": host_value(type(self).__name__),
            "fisher_type": host_value(self.fisher_type),
            "kfac_approx": host_value(self.kfac_approx),
            "mc_samples": host_value(self.mc_samples),
            "seed": host_value(self.seed),
            "separate_weight_and_bias": host_value(self.separate_weight_and_bias),
            "num_data": host_value(self.num_data),
            "num_updates": host_value(self.num_updates),
            "outputs_shape": host_value(list(self._output_shape())),
            "layer_names": host_value([la.name for la in layers]),
            "layer_indices": host_value(ints),
            "layer_kinds": host_value([la.kind for la in layers]),
            "layer_transposed": host_value([la.transposed for la in layers]),
            "layer_groups": host_value([la.groups for la in layers]),
        }

    def _factor_state(self):
        """K-FAC's factors per layer position: ``B:i``, ``A:i`` or ``exact:i``."""
        state = {}
        for i, (B, A) in enumerate(self._current_factors()):
            if A is None:
                state[f"exact:{i}"] = host_value(B)
            else:
                state[f"B:{i}"], state[f"A:{i}"] = host_value(B), host_value(A)
        return state

    def _load_header(self, state):
        """Check a saved state against this operator (class, layout) and take its counts."""
        found = host_str(state["class"])
        if found != type(self).__name__:
            raise ValueError(f"The state is of a {found}, not of a {type(self).__name__}.")
        layers = _layers_from_state(state)
        if self.layers is not None and layers != self.layers:
            raise ValueError(
                f"The state's layers {[la.name for la in layers]} (with their sizes) differ "
                f"from this operator's {[la.name for la in self.layers]}."
            )
        self.layers = layers
        self._outputs_shape = tuple(int(n) for n in state["outputs_shape"])
        self.num_updates = host_int(state["num_updates"])

    def _loaded_factors(self, state):
        """K-FAC's ``(B, A)`` per layer from a saved state, on this operator's backend."""
        put = self._from_host
        return [
            (put(state[f"exact:{i}"]), None)
            if la.exact
            else (put(state[f"B:{i}"]), put(state[f"A:{i}"]))
            for i, la in enumerate(self.layers)
        ]

    def _from_host(self, a):
        return from_host(a, self.xp, self.dtype, self.device)

    @classmethod
    def _restore(cls, state, model, loss, params, comm=None):
        """An operator from a saved state: no data, no pass over data."""
        self = cls._without_data(model, loss, params, host_int(state["num_data"]), comm)
        self._set_options(
            host_str(state["fisher_type"]),
            host_int(state["mc_samples"]),
            host_str(state["kfac_approx"]),
            bool(state["separate_weight_and_bias"]),
            host_int(state["seed"]),
        )
        self.layers = None
        self.load_state_dict(state)
        return self

    # -- layout --------------------------------------------------------------------------

    def _layout_from_taps(self, taps):
        """LayerInfo per tap; raise if a parameter is covered by no tap or by two."""
        layers, owner = [], {}
        for tap in taps:
            shape = self.shapes[tap.weight_index]
            d_in = int(tap.inputs.shape[-1])
            if tap.kind == "embedding":
                if len(shape) != 2:
                    raise ValueError(
                        f"Layer {tap.name!r}: its embedding table (parameter "
                        f"{tap.weight_index}) must have shape (V, D), got {shape}."
                    )
                d_in, shape = shape[0], (shape[1], shape[0])
            elif tap.kind == "elementwise":
                shape = (d_in, d_in)  # checked as a weight of d_in entries below
                if self.shapes[tap.weight_index] != (d_in,):
                    raise ValueError(
                        f"Layer {tap.name!r}: its elementwise weight (parameter "
                        f"{tap.weight_index}) must have shape ({d_in},) for inputs with "
                        f"{d_in} features, got {self.shapes[tap.weight_index]}."
                    )
            # the weight as the matrix that multiplies the inputs (a convolution's kernel
            # (C_out, C_in / G, kh, kw) reshaped in C order), as the tap says
            elif tap.matrix_shape is not None and math.prod(tap.matrix_shape) == math.prod(shape):
                shape = tuple(tap.matrix_shape)
            elif tap.transposed and len(shape) == 2:
                shape = (shape[1], shape[0])
            groups = tap.groups
            if groups > 1:
                _check_groups(tap, shape, d_in)
                d_in //= groups  # one group's inputs
            if len(shape) != 2 or shape[1] != d_in:
                raise ValueError(
                    f"Layer {tap.name!r}: its weight (parameter {tap.weight_index}) must have "
                    f"shape (D_out, {d_in}) for inputs with {d_in} features, got {shape}."
                )
            # a bias of D_out entries, any shape ((C_out,), or Equinox's (C_out, 1, 1))
            if tap.bias_index is not None and math.prod(self.shapes[tap.bias_index]) != shape[0]:
                raise ValueError(
                    f"Layer {tap.name!r}: its bias (parameter {tap.bias_index}) must have "
                    f"shape ({shape[0]},), got {self.shapes[tap.bias_index]}."
                )
            for index in (tap.weight_index, tap.bias_index):
                if index is None:
                    continue
                if index in owner:
                    raise ValueError(
                        f"Parameter {index} belongs to two tapped layers, {owner[index]!r} "
                        f"and {tap.name!r}; Kronecker factors need each layer's parameters "
                        "to be its own."
                    )
                owner[index] = tap.name
            layers.append(
                LayerInfo(
                    tap.name,
                    tap.weight_index,
                    tap.bias_index,
                    d_in,
                    shape[0] // groups,
                    tap.kind,
                    bool(tap.transposed) or tap.kind == "embedding",
                    groups,
                )
            )
        missing = [i for i in range(len(self.shapes)) if i not in owner]
        if missing:
            raise ValueError(
                f"{type(self).__name__} covers the parameters of the layers the model "
                "exposes through layer taps (linear maps: Linear, convolutions; elementwise "
                f"affine maps: normalization), but parameters {missing} (shapes "
                f"{[self.shapes[i] for i in missing]}) belong to no tapped layer. Use a "
                "model made of such layers (and parameter-free layers), or another "
                "curvature approximation for these parameters."
            )
        return layers

    @staticmethod
    def _check_same_layout(layers, taps, index):
        got = [(t.name, t.weight_index, t.bias_index) for t in taps]
        expected = [(la.name, la.weight_index, la.bias_index) for la in layers]
        if got != expected:
            raise ValueError(
                f"Batch {index} exposed the layer taps {got}, the first batch {expected}; "
                "every batch must run through the same layers."
            )

    def _joint(self, layer) -> bool:
        return layer.bias_index is not None and not self.separate_weight_and_bias

    def _make_operator(self, blocks):
        """The operator over the flat parameters from the blocks, in :func:`layer_layout` order.

        ``blocks``: per layer, its weight (or joint) block, then its separate bias block if
        it has one.
        """
        layout, names = layer_layout(self.layers, self.shapes, self._joint)
        return KroneckerFactoredLinearOperator(blocks, layout, names, psd=self.psd or None)

    def _kronecker(self, layer, B, A):
        """The weight (or joint) block ``B (x) A``, or ``A (x) B`` for a transposed weight;
        the factors are named in error messages (``"input factor A"``, ``"output factor B"``)."""
        names = ("output factor B", "input factor A")
        if layer.transposed:
            return KroneckerLinearOperator(A, B, names=names[::-1])
        return KroneckerLinearOperator(B, A, names=names)

    def _one(self):
        """The input factor ``1`` of a separate bias block (``B (x) 1``)."""
        return IdentityLinearOperator(1, xp=self.xp, dtype=self.dtype, device=self.device)

    # -- one pass over the data: statistics of the factors ------------------------------

    def _cotangents(self, outputs, y, index):
        """Output-space cotangents ``outputs.shape + (M,)`` whose outer products define ``B``."""
        kind = self.fisher_type
        if kind == "type-2":
            check_batch_values(self.loss, outputs, y, index)
            return self.loss.hessian_sqrt(outputs, y)
        if kind == "empirical":
            check_batch_values(self.loss, outputs, y, index)
            return self.loss.gradient(outputs, y)[..., None]
        # MC and forward-only use no targets, but non-finite outputs would make NaN factors
        check_batch_outputs(self.loss, outputs, index)
        if kind == "mc":
            seed = batch_seed(self.seed, index, self.comm.rank)
            return self.loss.sampled_gradients(outputs, self.mc_samples, seed=seed)
        return None  # forward-only

    def _taps(self, index, X, y):
        """The layer taps of one batch (and the layout, from the first batch)."""
        lin = self.model.linearize(self.params, X)
        self._set_output_shape(lin.outputs)
        taps = lin.layer_taps(self._cotangents(lin.outputs, y, index))
        if self.layers is None:
            self.layers = self._layout_from_taps(taps)
        else:
            self._check_same_layout(self.layers, taps, index)
        return taps

    def _matrix_taps(self, taps):
        """``taps`` with embeddings as one-hot matrix taps (for consumers other than K-FAC's A)."""
        return [
            as_matrix_tap(tap, layer.d_in, self.dtype, self.xp)
            for tap, layer in zip(taps, self.layers, strict=True)
        ]

    def _accumulate(self, batches=None):
        """One pass over the data (or over ``batches``, ``(index, X, y)`` triples): input
        statistics, ``sum G^T G`` per layer and the number of data points, summed over
        the processes (this rank's batches, then one all-reduce).

        With ``_retain_taps`` the last batch's ``(index, taps)`` stay in ``_retained``
        for a second pass (EKFAC's scalings), which then need not recompute them: one
        batch's taps, which the pass held anyway, so the peak memory does not grow.
        """
        sums = collective_tree_sum(
            self.comm,
            lambda: self._local_statistics(batches),
            xp=self.xp,
            dtype=self.dtype,
            device=self.device,
            what=f"{type(self).__name__} pass over the data",
        )
        if sums is None:
            raise ValueError("The data contain no batches; K-FAC needs at least one.")
        if self.layers is None:  # a rank without data: the layout the others found
            self.layers = list(sums["layers"])
        inputs = [_InputStatistics.from_sums(s) for s in sums["inputs"]]
        return inputs, list(sums["grads"]), sums["count"]

    def _local_statistics(self, batches):
        """This process's sums over its batches (None without batches)."""
        xp = self.xp
        inputs, grads, count = None, None, 0
        for index, X, y in self._batches() if batches is None else batches:
            self._retained = None  # release the previous batch's taps before the next's
            taps = self._taps(index, X, y)
            count += int(X.shape[0])
            if inputs is None:
                inputs = [_InputStatistics() for _ in taps]
                grads = [None] * len(taps)
            for i, tap in enumerate(taps):
                if tap.kind == "elementwise":
                    G = None
                    if tap.output_grads is not None:
                        G = xp.concat(elementwise_gradients(tap, xp), axis=1)
                elif tap.kind == "embedding":  # "expand" always; the ids' counts for A
                    _, G, _ = flatten_tap(tap, "expand", xp)
                    inputs[i].add_counts(tap.inputs, self.layers[i].d_in, self.dtype, xp)
                else:
                    a, G, _ = flatten_tap(tap, self.kfac_approx, xp)
                    inputs[i].add(a, xp)
                if G is not None:
                    gg = xp.matrix_transpose(G) @ G
                    grads[i] = gg if grads[i] is None else grads[i] + gg
            if self._retain_taps:
                self._retained = (index, taps)
        if inputs is None:
            return None
        return {
            "layers": Static(tuple(self.layers)),
            "inputs": [stats.sums() for stats in inputs],
            "grads": grads,
            "count": count,
        }

    def _kfac_factors(self, batches=None):
        """K-FAC's ``(B, A)`` per layer (``A`` joint where weight and bias are joint) and
        the normalization of ``B``: over the data, or over ``batches`` (an update's
        batch) scaled as an estimate of the data set's (:meth:`_batch_scale`)."""
        xp = self.xp
        inputs, grads, count = self._accumulate(batches)
        c = self._normalization() if batches is None else self._batch_scale(count)
        factors = []
        for layer, stats, gg in zip(self.layers, inputs, grads, strict=True):
            if layer.exact:
                factors.append((self._exact_block(layer, gg, c), None))
                continue
            if layer.kind == "embedding":
                A = stats.diagonal_factor()  # 1-D: the diagonal input factor
            else:
                A = symmetrized(stats.factor(self._joint(layer), xp), xp)
            if gg is None:  # forward-only: the output factor is the identity (of each group)
                B = xp.eye(layer.d_out, dtype=self.dtype, device=self.device)
                if layer.groups > 1:
                    B = xp.stack([B] * layer.groups)
            else:
                B = symmetrized(c * gg, xp)
            factors.append((B, A))
        return factors, c

    def _exact_block(self, layer, gg, c):
        """The exact block of an elementwise layer over ``[w, b]`` from ``sum G^T G``.

        Forward-only (no gradients): the identity, as the output factor of the
        Kronecker blocks.
        """
        xp = self.xp
        size = layer.d_in * (1 if layer.bias_index is None else 2)
        if gg is None:
            return xp.eye(size, dtype=self.dtype, device=self.device)
        return symmetrized(c * gg, xp)

    def _exact_blocks(self, layer, block):
        """An elementwise layer's blocks in layout order: joint, or weight then bias."""
        if layer.bias_index is None or self._joint(layer):
            return [block]
        D = layer.d_in
        return [block[:D, :D], block[D:, D:]]

    # -- delegation ----------------------------------------------------------------------

    @property
    def kronecker_factored(self) -> KroneckerFactoredLinearOperator:
        """The operator the products and exact queries delegate to, block by block.

        A :class:`~curvlinops.KroneckerFactoredLinearOperator`: its ``operator.blocks``
        are the blocks (``B (x) A``, a bias's ``B (x) 1``, EKFAC's eigendecomposed blocks,
        exact blocks of elementwise layers) and its ``blocks`` their segments of the flat
        parameter vector, so that a caller can treat each block on its own (a prior
        precision per layer, :mod:`curvlinops.bayes`). Replaced, not changed, by
        :meth:`update` and ``load_state_dict``.
        """
        return self._operator

    def _matmat(self, X):
        return self._operator._matmat(X)

    def to_dense(self):
        return self._operator.to_dense()

    def diagonal(self):
        """Exact diagonal from the factors (no pass over the data)."""
        return self._operator.diagonal()

    def trace(self):
        """Exact trace from the factors (no pass over the data)."""
        return self._operator.trace()

    def frobenius_norm(self):
        """Exact Frobenius norm from the factors (no pass over the data)."""
        return self._operator.frobenius_norm()

    def eigvalsh(self):
        """All eigenvalues (unsorted), from the factors' eigendecompositions."""
        return self._operator.eigvalsh()

    def _logdet(self, damping):
        try:
            return self._operator._logdet(damping)
        except FactorizationError as err:
            raise err.with_context(type(self).__name__) from err

    def damped(self, damping):
        """``K + damping I``; its ``inverse()`` and ``logdet()`` are exact (eigen-based)."""
        return self._operator.damped(damping)

    def inverse(self, damping=0.0):
        """Exact ``(K + damping I)^{-1}``, blockwise through the factors' eigendecompositions.

        The same matrix as ``K.damped(damping).inverse()`` and as the dense
        ``inv(K.to_dense() + damping I)``; it stays exact under the operator algebra
        (``(c K).inverse(d)``, block-diagonal and Kronecker compositions). The
        eigendecompositions are computed once per factor and cached, so further
        dampings cost one pass over the eigenvalues.

        ``damping`` may be negative (any finite shift; ``(c K).inverse(d)`` with ``c < 0``
        asks ``K`` for ``d / c``), like every operator's ``inverse``.

        Raises
        ------
        ValueError
            If ``damping`` is not finite.
        FactorizationError
            (:class:`~curvlinops.IllConditionedError`) If a block plus ``damping`` is
            beyond what the dtype resolves (the rule of :class:`~curvlinops.conditioning`),
            naming the operator, the block and (undamped) the factor, with the condition
            number and the damping that suffices.
        """
        damping = check_damping(damping, negative=True)
        try:
            return self._operator.inverse(damping)
        except FactorizationError as err:  # name the operator before the block and factor
            raise err.with_context(type(self).__name__) from err


#: the Monte-Carlo index of update ``k`` is ``_UPDATE_INDEX + k`` (apart from data batches)
_UPDATE_INDEX = 1 << 24


class _OneBatch:
    """An update's batch as re-iterable one-batch data of ``(index, X, y)``, checked when
    iterated: inside a pass's local work, so that a bad batch on one rank raises on
    every rank."""

    def __init__(self, index, batch, xp, label):
        self.index, self.batch, self.xp, self.label = index, batch, xp, label

    def __iter__(self):
        X, y = check_batch(self.batch, self.xp, self.label)
        yield self.index, X, y


def _ema(old, new, decay):
    """The exponential moving average ``decay old + (1 - decay) new``."""
    return decay * old + (1.0 - decay) * new


def _layers_from_state(state):
    """The :class:`LayerInfo` list of a saved state (states saved before groups existed
    have none: one group per layer)."""
    names, kinds = state["layer_names"], state["layer_kinds"]
    ints, transposed = state["layer_indices"], state["layer_transposed"]
    groups = state.get("layer_groups", [1] * len(names))
    return [
        LayerInfo(
            str(names[i]),
            int(ints[i][0]),
            None if int(ints[i][1]) < 0 else int(ints[i][1]),
            int(ints[i][2]),
            int(ints[i][3]),
            str(kinds[i]),
            bool(transposed[i]),
            int(groups[i]),
        )
        for i in range(len(names))
    ]


def _check_groups(tap, shape, d_in):
    """A grouped tap's sizes: ``D_in`` and ``D_out`` divisible by its groups, the weight
    ``(D_out, D_in / G)``."""
    G = tap.groups
    if d_in % G or len(shape) != 2 or shape[0] % G or shape[1] * G != d_in:
        raise ValueError(
            f"Layer {tap.name!r} has groups={G}: its inputs' {d_in} features and its "
            f"weight's rows must split into {G} groups, with the weight (parameter "
            f"{tap.weight_index}) of shape (D_out, {d_in} / {G}); got the weight as {shape}."
        )


def group_rows(rows, groups, xp):
    """Item rows ``(T, G * d)`` as ``(G, T, d)``: each group's own columns (``G = 1``:
    unchanged)."""
    if groups == 1:
        return rows
    T, D = rows.shape
    return xp.permute_dims(xp.reshape(rows, (T, groups, D // groups)), (1, 0, 2))


def per_group(stack, groups):
    """The groups' matrices of a stack ``(G, ...)`` (``[stack]`` for one group)."""
    return [stack] if groups == 1 else [stack[g, ...] for g in range(groups)]


def check_damping(damping, what="damping", *, negative=False, negative_reason=None) -> float:
    """``damping`` as a float, or a ValueError unless it is finite (and ``>= 0``,
    unless ``negative``); ``negative_reason`` says why a negative one is refused."""
    value = float(damping)
    if not math.isfinite(value) or (value < 0 and not negative):
        bound = "" if negative else " >= 0"
        why = f" {negative_reason}" if negative_reason and value < 0 else ""
        raise ValueError(f"{what} must be a finite number{bound}, got {damping}.{why}")
    return value


def symmetrized(M, xp):
    """``(M + M^T) / 2``: factors accumulated in floating point are symmetric only nearly."""
    return 0.5 * (M + xp.matrix_transpose(M))


def check_fisher_type(fisher_type, allowed):
    if fisher_type not in allowed:
        raise ValueError(f"fisher_type must be one of {allowed}, got {fisher_type!r}.")
