"""Factor statistics over data: the base of the Kronecker-factored curvature operators.

What lives here (the statistics, apart from the operators they end up in):

- :class:`LayerInfo`: a Linear layer as the Kronecker operators see it (its name,
  parameter indices and sizes);
- :class:`_InputStatistics`: running sums ``sum a a^T``, ``sum a`` and the item count of
  one layer's inputs, and the input factor ``A`` (or the joint ``[a; 1]`` factor) from
  them;
- :func:`flatten_tap`: one tap's inputs and output gradients as item matrices
  (``kfac_approx`` "expand" / "reduce");
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
loss, ``B (x) A`` equals the exact GGN block. The bias block is ``B (x) 1``; with
``separate_weight_and_bias=False`` the joint block over ``[W | b]`` uses inputs
augmented by a trailing one.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.losses``, ``._data``, ``._elementwise``, ``._embedding``, ``.base``,
``.kronecker_factored``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._backend import device as array_device, diag_matrix  # noqa: F401 (re-exported)
from ..linalg import IdentityLinearOperator, KroneckerLinearOperator
from ..models import Tier
from ._data import batch_seed, check_batch_outputs, check_batch_values, check_mc_samples
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
    exact block over its ``D = d_in = d_out`` weight and bias entries).
    """

    name: str
    weight_index: int
    bias_index: int | None
    d_in: int
    d_out: int
    kind: str = "matrix"
    transposed: bool = False

    @property
    def exact(self) -> bool:
        """Whether the layer gets an exact block instead of Kronecker factors."""
        return self.kind == "elementwise"


class _InputStatistics:
    """Running sums for one layer's input factor: ``sum a a^T``, ``sum a``, item count."""

    def __init__(self):
        self.sum_aa = None
        self.sum_a = None
        self.count = 0

    def add(self, a, xp):
        aa = xp.matrix_transpose(a) @ a
        s = xp.sum(a, axis=0)
        self.sum_aa = aa if self.sum_aa is None else self.sum_aa + aa
        self.sum_a = s if self.sum_a is None else self.sum_a + s
        self.count += int(a.shape[0])

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
        corner = xp.full((1, 1), float(self.count), dtype=A.dtype, device=array_device(A))
        top = xp.concat([A, s[:, None]], axis=1)
        bottom = xp.concat([s[None, :], corner], axis=1)
        return xp.concat([top, bottom], axis=0) / self.count


def flatten_tap(tap, kfac_approx, xp):
    """Inputs ``(T, D_in)`` and output gradients ``(T * M, D_out)`` of one tap's items.

    Without shared axes an item is a datum. With shared axes ``(N, S..., D)``,
    ``"expand"`` makes each position an item and ``"reduce"`` averages the inputs and
    sums the output gradients over the shared axes (Eschenhagen et al., 2023). Rows of
    the gradient matrix are item-major: rows ``t * M ... t * M + M - 1`` belong to item
    ``t``. The gradients are None for a tap taken without cotangents.
    """
    a, g = tap.inputs, tap.output_grads
    d_in = a.shape[-1]
    if a.ndim > 2 and kfac_approx == "reduce":
        a = xp.mean(a, axis=tuple(range(1, a.ndim - 1)))
        if g is not None:
            g = xp.sum(g, axis=tuple(range(1, g.ndim - 2)))
    a = xp.reshape(a, (-1, d_in))
    if g is None:
        return a, None, 0
    d_out, M = g.shape[-2], g.shape[-1]
    order = tuple(range(g.ndim - 2)) + (g.ndim - 1, g.ndim - 2)
    G = xp.reshape(xp.permute_dims(g, order), (-1, d_out))
    return a, G, M


class _KroneckerCurvature(CurvatureLinearOperator):
    """Base of the Kronecker-factored curvature operators: layout, statistics, delegation.

    Subclasses implement :meth:`_build` (compute the factors and set ``self._operator``,
    a :class:`KroneckerFactoredLinearOperator`). Products and exact queries delegate
    to it; the operator never touches the data after construction.
    """

    required_tier = Tier.LAYER_TAPS
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
    ):
        check_fisher_type(fisher_type, self.fisher_types)
        self.fisher_type = fisher_type
        self.mc_samples = check_mc_samples(mc_samples)
        self.seed = int(seed)
        if kfac_approx not in APPROXIMATIONS:
            raise ValueError(f"kfac_approx must be one of {APPROXIMATIONS}, got {kfac_approx!r}.")
        self.kfac_approx = kfac_approx
        self.separate_weight_and_bias = bool(separate_weight_and_bias)
        super().__init__(
            model,
            loss,
            params,
            data,
            num_data=num_data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
        )
        self.layers = None
        self._build()

    def _build(self):
        raise NotImplementedError

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
            # (C_out, C_in, kh, kw) reshaped in C order), as the tap says
            elif tap.matrix_shape is not None and math.prod(tap.matrix_shape) == math.prod(shape):
                shape = tuple(tap.matrix_shape)
            elif tap.transposed and len(shape) == 2:
                shape = (shape[1], shape[0])
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
                    shape[0],
                    tap.kind,
                    bool(tap.transposed) or tap.kind == "embedding",
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
        """The weight (or joint) block ``B (x) A``, or ``A (x) B`` for a transposed weight."""
        return KroneckerLinearOperator(A, B) if layer.transposed else KroneckerLinearOperator(B, A)

    def _one(self):
        """The input factor ``1`` of a separate bias block (``B (x) 1``)."""
        return IdentityLinearOperator(1, xp=self.xp, dtype=self.dtype, device=self.device)

    def _set_output_shape(self, outputs):
        if not hasattr(self, "_outputs_shape"):
            self._outputs_shape = tuple(outputs.shape)

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
            seed = batch_seed(self.seed, index)
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

    def _accumulate(self):
        """One pass over the data: input statistics and ``sum G^T G`` per layer."""
        xp = self.xp
        inputs, grads = None, None
        for index, X, y in self._batches():
            taps = self._taps(index, X, y)
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
        if inputs is None:
            raise ValueError("The data contain no batches; K-FAC needs at least one.")
        return inputs, grads

    def _kfac_factors(self):
        """K-FAC's ``(B, A)`` per layer (``A`` joint where weight and bias are joint)."""
        xp = self.xp
        inputs, grads = self._accumulate()
        c = self._normalization()
        factors = []
        for layer, stats, gg in zip(self.layers, inputs, grads, strict=True):
            if layer.exact:
                factors.append((self._exact_block(layer, gg, c), None))
                continue
            if layer.kind == "embedding":
                A = stats.diagonal_factor()  # 1-D: the diagonal input factor
            else:
                A = symmetrized(stats.factor(self._joint(layer), xp), xp)
            if gg is None:  # forward-only: the output factor is the identity
                B = xp.eye(layer.d_out, dtype=self.dtype, device=self.device)
            else:
                B = symmetrized(c * gg, xp)
            factors.append((B, A))
        return factors

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
        return self._operator._logdet(damping)

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
            If a block plus ``damping`` is singular (the rule of
            :class:`~curvlinops.FactorizationError`), naming the block.
        """
        return self._operator.inverse(check_damping(damping, negative=True))


def check_damping(damping, what="damping", *, negative=False) -> float:
    """``damping`` as a float, or a ValueError unless it is finite (and ``>= 0``,
    unless ``negative``)."""
    value = float(damping)
    if not math.isfinite(value) or (value < 0 and not negative):
        bound = "" if negative else " >= 0"
        raise ValueError(f"{what} must be a finite number{bound}, got {damping}.")
    return value


def symmetrized(M, xp):
    """``(M + M^T) / 2``: factors accumulated in floating point are symmetric only nearly."""
    return 0.5 * (M + xp.matrix_transpose(M))


def check_fisher_type(fisher_type, allowed):
    if fisher_type not in allowed:
        raise ValueError(f"fisher_type must be one of {allowed}, got {fisher_type!r}.")
