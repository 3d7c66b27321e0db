"""Shared machinery of the Kronecker-factored curvature operators (K-FAC, EKFAC, K-FAC Hessian).

What lives here:

- :class:`KroneckerFactoredLinearOperator`: a symmetric operator over the flat parameter
  vector that is block diagonal over *groups* of parameters (a layer's weight, its bias,
  or both together), each block ``B (x) A`` or ``(Q_B (x) Q_A) diag(s) (Q_B (x) Q_A)^T``.
  A product reshapes the rows of one group to ``(D_out, D_in, K)`` and applies
  ``L V R^T`` with two matrix products, for all ``K`` columns at once. A weight and its
  bias need not be contiguous in the flat vector: a joint group concatenates its slices
  along the input axis (``[W | b]``), never a permutation matrix.
- :class:`_KroneckerCurvature`: the curvature-operator base (data, loss normalization,
  layer layout from the tier-3 taps, factor statistics from one pass over the data) that
  :class:`~curvlinops.curvature.kfac.KFACLinearOperator`,
  :class:`~curvlinops.curvature.ekfac.EKFACLinearOperator` and
  :class:`~curvlinops.curvature.kfac_hessian.KFACHessianLinearOperator` build on.

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
loss, ``B (x) A`` equals the exact GGN block. The bias block is ``B`` (input factor 1);
with ``separate_weight_and_bias=False`` the joint block over ``[W | b]`` uses inputs
augmented by a trailing one.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.losses``, ``._data``, ``.base``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._backend import (
    FactorizationError,
    all_finite,
    array_namespace,
    checked_cholesky,
    checked_eigh,
    device as array_device,
    dtype_eps,
    dtype_name,
    solve_triangular,
)
from ..linalg import LinearOperator
from ..models import Tier, num_params
from ._data import batch_seed, check_mc_samples
from .base import CurvatureLinearOperator

__all__ = ["KroneckerFactoredLinearOperator"]

APPROXIMATIONS = ("expand", "reduce")
_DAMPING_HINT = "Add damping, e.g. inverse(damping=1e-3)."


# -- factors and blocks ------------------------------------------------------------------


class _Factor:
    """A symmetric Kronecker factor with its eigendecomposition computed once, on demand."""

    def __init__(self, matrix, what: str):
        self.matrix = matrix
        self.what = what
        self._eigh = None

    def eigh(self):
        if self._eigh is None:
            self._eigh = checked_eigh(self.matrix, array_namespace(self.matrix), name=self.what)
        return self._eigh


def _sandwich(L, R, V, xp):
    """``L V_k R^T`` for every ``k``: ``V`` is ``(p, q, K)``, ``L`` ``(p', p)``, ``R`` ``(q', q)``.

    Two matrix products; for ``K > 1`` one transpose of a ``(p', q, K)`` array moves the
    ``K`` axis out of the way of the second product.
    """
    p, q, K = V.shape
    LV = L @ xp.reshape(V, (p, q * K))
    p2, q2 = LV.shape[0], R.shape[0]
    if K == 1:
        return xp.reshape(xp.reshape(LV, (p2, q)) @ xp.matrix_transpose(R), (p2, q2, 1))
    T = xp.reshape(xp.permute_dims(xp.reshape(LV, (p2, q, K)), (0, 2, 1)), (p2 * K, q))
    out = T @ xp.matrix_transpose(R)
    return xp.permute_dims(xp.reshape(out, (p2, K, q2)), (0, 2, 1))


class _KronBlock:
    """``B (x) A`` on ``(D_out, D_in)``-shaped slices: ``V -> B V A^T``."""

    def __init__(self, B: _Factor, A: _Factor):
        self.B, self.A = B, A
        self.d_out, self.d_in = B.matrix.shape[0], A.matrix.shape[0]

    def apply(self, V, xp):
        return _sandwich(self.B.matrix, self.A.matrix, V, xp)

    def diagonal(self, xp):
        return (
            xp.linalg.diagonal(self.B.matrix)[:, None] * xp.linalg.diagonal(self.A.matrix)[None, :]
        )

    def trace(self, xp):
        return xp.linalg.trace(self.B.matrix) * xp.linalg.trace(self.A.matrix)

    def squared_frobenius(self, xp):
        B, A = self.B.matrix, self.A.matrix
        return xp.sum(B * B) * xp.sum(A * A)

    def eigenvalues(self, xp):
        lam_B, _ = self.B.eigh()
        lam_A, _ = self.A.eigh()
        return lam_B[:, None] * lam_A[None, :]

    def inverse(self, damping, xp, what):
        lam = self.eigenvalues(xp) + damping
        _check_spectrum(lam, xp, what, damping)
        _, Q_B = self.B.eigh()
        _, Q_A = self.A.eigh()
        return _EigBlock(Q_B, Q_A, 1.0 / lam)


class _EigBlock:
    """``(Q_B (x) Q_A) diag(vec(s)) (Q_B (x) Q_A)^T`` with ``s`` of shape ``(D_out, D_in)``."""

    def __init__(self, Q_B, Q_A, s):
        self.Q_B, self.Q_A, self.s = Q_B, Q_A, s
        self.d_out, self.d_in = Q_B.shape[0], Q_A.shape[0]

    def apply(self, V, xp):
        mT = xp.matrix_transpose
        coefficients = _sandwich(mT(self.Q_B), mT(self.Q_A), V, xp)
        return _sandwich(self.Q_B, self.Q_A, self.s[:, :, None] * coefficients, xp)

    def diagonal(self, xp):
        # diag(Q diag(s) Q^T) for Q = Q_B (x) Q_A, reshaped: (Q_B^2) s (Q_A^2)^T.
        return (self.Q_B * self.Q_B) @ self.s @ xp.matrix_transpose(self.Q_A * self.Q_A)

    def trace(self, xp):
        return xp.sum(self.s)

    def squared_frobenius(self, xp):
        return xp.sum(self.s * self.s)

    def eigenvalues(self, xp):
        return self.s

    def inverse(self, damping, xp, what):
        lam = self.s + damping
        _check_spectrum(lam, xp, what, damping)
        return _EigBlock(self.Q_B, self.Q_A, 1.0 / lam)


def _check_spectrum(values, xp, what, damping):
    """Raise unless every eigenvalue is finite and nonzero at the dtype's precision."""
    if not all_finite(values, xp):
        raise FactorizationError(f"The spectrum of {what} contains NaN or Inf.")
    if _numerically_singular(values, xp):
        raise FactorizationError(
            f"The {what}{_plus(damping)} is singular (an eigenvalue is zero at "
            f"{dtype_name(values.dtype)} precision) and has no inverse. {_DAMPING_HINT}"
        )


def _numerically_singular(values, xp) -> bool:
    """Whether some ``|value| <= 10 eps max|values|``: zero to working precision.

    Eigenvalues from ``eigh`` are accurate to a few ``eps`` times the largest one, so
    smaller ones (and their damped sums) cannot be told apart from zero.
    """
    magnitudes = xp.abs(xp.reshape(values, (-1,)))
    tol = 10 * dtype_eps(values.dtype) * xp.max(magnitudes)
    return bool(xp.any(magnitudes <= tol))


def spd_inverse(M, xp, what: str):
    """Inverse of a symmetric positive definite factor through its Cholesky factor.

    A failed Cholesky factorization in a lower precision is retried in float64 (the
    result is cast back); if that fails too, or in float64 already, a
    :class:`FactorizationError` names the factor and suggests damping.
    """
    try:
        return _cholesky_inverse(M, xp, what)
    except FactorizationError as err:
        if dtype_name(M.dtype) == "float64":
            raise FactorizationError(
                f"The {what} is not positive definite (Cholesky failed). {_DAMPING_HINT}"
            ) from err
    try:
        inverse = _cholesky_inverse(xp.astype(M, xp.float64), xp, what)
    except FactorizationError as err:
        raise FactorizationError(
            f"The {what} is not positive definite: Cholesky failed in "
            f"{dtype_name(M.dtype)} and again in float64. {_DAMPING_HINT}"
        ) from err
    return xp.astype(inverse, M.dtype)


def _cholesky_inverse(M, xp, what):
    L = checked_cholesky(M, xp, name=what)
    eye = xp.eye(M.shape[0], dtype=M.dtype, device=array_device(M))
    L_inv = solve_triangular(L, eye, xp, lower=True)
    inverse = xp.matrix_transpose(L_inv) @ L_inv
    if not all_finite(inverse, xp):
        raise FactorizationError(f"The inverse of the {what} overflowed. {_DAMPING_HINT}")
    return inverse


# -- the operator ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """Parameters (indices into the parameter list) that share one Kronecker block."""

    name: str
    params: tuple
    widths: tuple
    block: object


class KroneckerFactoredLinearOperator(LinearOperator):
    """Block-diagonal operator with one Kronecker-factored block per layer (or weight/bias).

    What K-FAC, EKFAC and the K-FAC Hessian are made of, and what their inverses are:
    each block acts on the slices of one layer's parameters reshaped to
    ``(D_out, D_in, K)`` (a weight ``(D_out, D_in)``, a bias as ``(D_out, 1)``, or both
    side by side as ``[W | b]``), either as ``B (x) A`` (``V -> B V A^T``) or in a
    Kronecker eigenbasis with arbitrary eigenvalues (EKFAC). Products never form a
    Kronecker product; trace, diagonal, Frobenius norm and (damped) log-determinant
    come from the factors, and :meth:`inverse` is exact,
    ``(K + damping I)^{-1}`` blockwise through the factors' eigendecompositions.

    Obtained from the curvature operators (e.g.
    :meth:`KFACLinearOperator.inverse <curvlinops.curvature.kfac.KFACLinearOperator.inverse>`);
    not meant to be constructed directly.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import MSELoss, nn
    >>> from curvlinops.curvature.kfac import KFACLinearOperator
    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> data = [(np.random.default_rng(0).normal(size=(8, 3)), np.zeros((8, 2)))]
    >>> K = KFACLinearOperator(model, MSELoss(), params, data)
    >>> K_inv = K.inverse(damping=0.1, exact=True)
    >>> type(K_inv).__name__
    'KroneckerFactoredLinearOperator'
    >>> dense = K.to_dense()
    >>> bool(np.allclose(K_inv.to_dense(), np.linalg.inv(dense + 0.1 * np.eye(8))))
    True
    """

    def __init__(self, groups, shapes, *, xp, dtype, device=None):
        shapes = [tuple(s) for s in shapes]
        P = num_params(shapes)
        super().__init__((P, P), dtype=dtype, xp=xp, device=device, symmetric=True)
        self._shapes = shapes
        self._offsets = [0]
        for s in shapes:
            self._offsets.append(self._offsets[-1] + math.prod(s))
        self._groups = tuple(groups)
        covered = sorted(i for g in self._groups for i in g.params)
        if covered != list(range(len(shapes))):
            raise ValueError(
                f"The groups must cover each of the {len(shapes)} parameters exactly once; "
                f"they cover {covered}."
            )

    # -- products ----------------------------------------------------------------------

    def _slices(self, X, group):
        """Rows of ``X`` for ``group`` as one ``(D_out, D_in', K)`` array."""
        xp, K = self.xp, X.shape[1]
        d_out = group.block.d_out
        parts = [
            xp.reshape(X[self._offsets[i] : self._offsets[i + 1], :], (d_out, w, K))
            for i, w in zip(group.params, group.widths, strict=True)
        ]
        return parts[0] if len(parts) == 1 else self.xp.concat(parts, axis=1)

    def _scatter(self, pieces, group, out):
        """Split a group's ``(D_out, D_in', K)`` result into the parameters' rows."""
        xp, start = self.xp, 0
        for i, w in zip(group.params, group.widths, strict=True):
            part = out if len(group.params) == 1 else out[:, start : start + w, ...]
            pieces[i] = xp.reshape(part, (math.prod(self._shapes[i]),) + tuple(out.shape[2:]))
            start += w

    def _matmat(self, X):
        pieces = [None] * len(self._shapes)
        for group in self._groups:
            self._scatter(pieces, group, group.block.apply(self._slices(X, group), self.xp))
        return self.xp.concat(pieces, axis=0)

    # -- exact queries from the factors ------------------------------------------------

    def diagonal(self):
        pieces = [None] * len(self._shapes)
        for group in self._groups:
            self._scatter(pieces, group, group.block.diagonal(self.xp))
        return self.xp.concat(pieces, axis=0)

    def trace(self):
        return _sum_over(self._groups, lambda b: b.trace(self.xp))

    def frobenius_norm(self):
        return self.xp.sqrt(_sum_over(self._groups, lambda b: b.squared_frobenius(self.xp)))

    def _logdet(self, damping):
        xp = self.xp
        values = xp.concat(
            [xp.reshape(g.block.eigenvalues(xp) + damping, (-1,)) for g in self._groups]
        )
        if _numerically_singular(values, xp):
            raise FactorizationError(
                f"The Kronecker-factored operator{_plus(damping)} is singular: its "
                f"log-determinant is -inf. {_DAMPING_HINT}"
            )
        if int(xp.sum(xp.astype(values < 0, xp.int64))) % 2 == 1:
            raise ValueError(
                f"The Kronecker-factored operator{_plus(damping)} has a negative determinant "
                "(it is indefinite); logdet is defined here for matrices of positive "
                "determinant only."
            )
        return xp.sum(xp.log(xp.abs(values)))

    def inverse(self, damping=0.0):
        """Exact ``(K + damping I)^{-1}``, blockwise through the factors' eigendecompositions.

        Raises
        ------
        FactorizationError
            If a block plus ``damping`` is singular.
        """
        groups = [
            _Group(g.name, g.params, g.widths, g.block.inverse(float(damping), self.xp, g.name))
            for g in self._groups
        ]
        return KroneckerFactoredLinearOperator(
            groups, self._shapes, xp=self.xp, dtype=self.dtype, device=self.device
        )

    def eigenvalues(self):
        """All eigenvalues (unsorted) as one 1-D array, from the blocks' factors."""
        xp = self.xp
        return xp.concat([xp.reshape(g.block.eigenvalues(xp), (-1,)) for g in self._groups])


def _sum_over(groups, fn):
    total = None
    for g in groups:
        value = fn(g.block)
        total = value if total is None else total + value
    return total


def _plus(damping) -> str:
    return f" plus {damping} I" if damping else ""


# -- the curvature-operator base ------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    """A Linear layer of the model as the Kronecker operators see it."""

    name: str
    weight_index: int
    bias_index: int | None
    d_in: int
    d_out: int


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
            if len(shape) != 2 or shape[1] != d_in:
                raise ValueError(
                    f"Layer {tap.name!r}: its weight (parameter {tap.weight_index}) must have "
                    f"shape (D_out, {d_in}) for inputs with {d_in} features, got {shape}."
                )
            if tap.bias_index is not None and self.shapes[tap.bias_index] != (shape[0],):
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
            layers.append(LayerInfo(tap.name, tap.weight_index, tap.bias_index, d_in, shape[0]))
        missing = [i for i in range(len(self.shapes)) if i not in owner]
        if missing:
            raise ValueError(
                f"{type(self).__name__} covers the parameters of the Linear layers the "
                f"model exposes through layer taps, but parameters {missing} (shapes "
                f"{[self.shapes[i] for i in missing]}) belong to no tapped layer. Use a "
                "model made of Linear layers (and parameter-free layers), or another "
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

    def _groups(self, layer, weight_block, bias_block):
        """Groups of one layer given its weight (or joint) block and its bias block."""
        where = f"of layer {layer.name!r}"
        if layer.bias_index is None:
            return [
                _Group(f"weight block {where}", (layer.weight_index,), (layer.d_in,), weight_block)
            ]
        if self._joint(layer):
            indices = (layer.weight_index, layer.bias_index)
            return [
                _Group(
                    f"joint weight and bias block {where}", indices, (layer.d_in, 1), weight_block
                )
            ]
        return [
            _Group(f"weight block {where}", (layer.weight_index,), (layer.d_in,), weight_block),
            _Group(f"bias block {where}", (layer.bias_index,), (1,), bias_block),
        ]

    def _make_operator(self, groups):
        return KroneckerFactoredLinearOperator(
            groups, self.shapes, xp=self.xp, dtype=self.dtype, device=self.device
        )

    def _one(self):
        return _Factor(xp_ones(self.xp, self.dtype, self.device), "input factor 1 of a bias")

    def _set_output_shape(self, outputs):
        if not hasattr(self, "_outputs_shape"):
            self._outputs_shape = tuple(outputs.shape)

    # -- one pass over the data: statistics of the factors ------------------------------

    def _cotangents(self, outputs, y, index):
        """Output-space cotangents ``outputs.shape + (M,)`` whose outer products define ``B``."""
        kind = self.fisher_type
        if kind == "type-2":
            self.loss.check(outputs, y)
            return self.loss.hessian_sqrt(outputs, y)
        if kind == "mc":
            seed = batch_seed(self.seed, index)
            return self.loss.sampled_gradients(outputs, self.mc_samples, seed=seed)
        if kind == "empirical":
            self.loss.check(outputs, y)
            return self.loss.gradient(outputs, y)[..., None]
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
            A = symmetrized(stats.factor(self._joint(layer), xp), xp)
            if gg is None:  # forward-only: the output factor is the identity
                B = xp.eye(layer.d_out, dtype=self.dtype, device=self.device)
            else:
                B = symmetrized(c * gg, xp)
            factors.append((B, A))
        return factors

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

    def _logdet(self, damping):
        return self._operator._logdet(damping)

    def damped(self, damping):
        """``K + damping I``; its ``inverse()`` and ``logdet()`` are exact (eigen-based)."""
        return self._operator.damped(damping)


def xp_ones(xp, dtype, device):
    return xp.ones((1, 1), dtype=dtype, device=device)


def symmetrized(M, xp):
    """``(M + M^T) / 2``: factors accumulated in floating point are symmetric only nearly."""
    return 0.5 * (M + xp.matrix_transpose(M))


def check_fisher_type(fisher_type, allowed):
    if fisher_type not in allowed:
        raise ValueError(f"fisher_type must be one of {allowed}, got {fisher_type!r}.")
