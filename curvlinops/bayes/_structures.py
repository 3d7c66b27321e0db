"""The structures of a Laplace posterior precision: the curvature, then the prior on top.

What lives here: :func:`fit_structure` builds, once, the curvature of the negative
log-likelihood in one of the structures of :data:`STRUCTURES` (from the operators of
:mod:`curvlinops.curvature`); the object it returns then forms the posterior precision
``s * H + diag(prior)`` for any likelihood scale ``s`` and prior precision, in a form
whose inverse and log-determinant are exact (:meth:`_Structure.precision`), and the
log-determinant with the traces and squared norms of the posterior covariance's blocks
per parameter array (:class:`EvidenceTerms`, from :meth:`_Structure.evidence_terms`:
what the marginal likelihood and its Newton iteration in ``log delta`` need), from the
structure's spectrum or the Woodbury identity, without forming a dense matrix.

The prior is diagonal: one precision per parameter array (a scalar repeated, or one per
"layer"), or one per parameter entry (:class:`Prior`).

Internal to :mod:`curvlinops.bayes`. May import: ``curvlinops._backend``,
``curvlinops.linalg``, ``curvlinops.models``, ``curvlinops.curvature``, ``.predictive``
(its per-datum Jacobians).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._backend import (
    array_namespace,
    checked_cholesky,
    checked_eigh,
    solve_triangular,
    to_numpy,
)
from ..curvature import (
    EFDiagonalLinearOperator,
    EFLinearOperator,
    EKFACLinearOperator,
    GGNDiagonalLinearOperator,
    GGNLinearOperator,
    HessianDiagonalLinearOperator,
    HessianLinearOperator,
    KFACHessianLinearOperator,
    KFACLinearOperator,
    diagonal_plus_low_rank,
    low_rank,
)
from ..linalg import (
    BlockDiagonalLinearOperator,
    DenseLinearOperator,
    DiagonalLinearOperator,
    DiagonalPlusLowRankLinearOperator,
    KroneckerEighLinearOperator,
    KroneckerLinearOperator,
    ParameterLayoutLinearOperator,
)

__all__: list[str] = []

STRUCTURES = ("full", "diag", "kron", "ekfac", "lowrank", "diag_lowrank")
CURVATURES = ("ggn", "hessian", "ef")

#: the largest number of parameters ``structure="full"`` materializes by default
MAX_FULL = 8192

_EXACT = {"ggn": GGNLinearOperator, "hessian": HessianLinearOperator, "ef": EFLinearOperator}
_DIAGONAL = {
    "ggn": GGNDiagonalLinearOperator,
    "hessian": HessianDiagonalLinearOperator,
    "ef": EFDiagonalLinearOperator,
}
_FISHER_TYPE = {"ggn": "type-2", "ef": "empirical"}


@dataclass(frozen=True)
class EvidenceTerms:
    """What the marginal likelihood and its derivatives in ``log delta`` need of ``A``.

    ``logdet``: ``log det A``. ``traces[g]``: ``tr`` of the covariance ``A^{-1}`` over
    parameter array ``g``; ``coupling[g][h]``: ``||(A^{-1})_{gh}||_F^2``, the squared
    Frobenius norm of the covariance's block between arrays ``g`` and ``h`` (the second
    derivatives of ``log det A`` in ``log delta``). For a scalar prior some structures
    know only the totals (``total_trace``, ``total_coupling``; the per-array fields None).
    """

    logdet: float
    traces: list | None = None
    coupling: list | None = None
    total_trace: float | None = None
    total_coupling: float | None = None

    def trace(self, group):
        """The covariance's trace over the arrays of ``group``, or None."""
        if self.traces is not None:
            return sum(self.traces[g] for g in group)
        return self.total_trace if group is None else None

    def block_coupling(self, group, other):
        """``sum_{g in group, h in other} coupling[g][h]``, or None."""
        if self.coupling is not None:
            return sum(self.coupling[g][h] for g in group for h in other)
        return self.total_coupling if group is None and other is None else None


def _diagonal_coupling(values):
    """A coupling matrix with ``values`` on the diagonal (blocks that do not interact)."""
    n = len(values)
    return [[values[g] if g == h else 0.0 for h in range(n)] for g in range(n)]


class Prior:
    """A diagonal prior precision over the flat parameters, by group or by entry.

    ``per_array`` holds one precision per parameter array (then ``diagonal`` repeats
    it over the array's entries), or is None when the precision is given per entry.
    """

    def __init__(self, value, sizes, xp, dtype, device):
        self.sizes = list(sizes)
        total = sum(self.sizes)
        values = _as_floats(value)
        if values is not None and len(values) == total and total != len(self.sizes):
            value, values = xp.asarray(values, dtype=dtype, device=device), None
        if values is None:  # an array: one value per array, or per entry
            array = xp.reshape(xp.asarray(value, dtype=dtype, device=device), (-1,))
            if array.shape[0] == total and total != len(self.sizes):
                self._per_entry(array, xp)
                return
            values = [float(v) for v in to_numpy(array).tolist()]
        if len(values) == 1:
            values = values * len(self.sizes)
        if len(values) != len(self.sizes):
            raise ValueError(
                f"prior_precision must be a scalar, one value per parameter array "
                f"({len(self.sizes)}) or one per parameter ({total}); got {len(values)} values."
            )
        self.per_array = tuple(_positive(v) for v in values)
        entries = [xp.full((n,), v, dtype=dtype, device=device) for v, n in self._pairs()]
        self.diagonal = xp.concat(entries) if len(entries) > 1 else entries[0]

    def _per_entry(self, array, xp):
        """A prior per parameter entry (kept as an array: one reduction per check)."""
        smallest = float(xp.min(array))
        if not (smallest > 0 and bool(xp.all(xp.isfinite(array)))):
            raise ValueError(
                f"Prior precisions must be positive and finite, got a smallest value of "
                f"{smallest} (or a non-finite one)."
            )
        self.diagonal = array
        # constant on every array: then also one value per array (as K-FAC needs)
        per_array, start = [], 0
        for n in self.sizes:
            part = array[start : start + n]
            low, high = float(xp.min(part)), float(xp.max(part))
            per_array.append(low if low == high else None)
            start += n
        self.per_array = None if None in per_array else tuple(per_array)

    def _pairs(self):
        return zip(self.per_array, self.sizes, strict=True)

    @property
    def is_scalar(self) -> bool:
        return self.per_array is not None and len(set(self.per_array)) == 1

    def values(self):
        """The per-array values (a tuple), or the per-entry diagonal (an array)."""
        return self.per_array if self.per_array is not None else self.diagonal

    def log_det(self, xp):
        """``sum_i log prior_i`` (a float)."""
        if self.per_array is not None:
            return sum(n * math.log(v) for v, n in self._pairs())
        return float(xp.sum(xp.log(self.diagonal)))


def _as_floats(value):
    """A list of floats from a number or a list/tuple of numbers; None for an array."""
    if isinstance(value, bool):
        raise TypeError(f"prior_precision must be a number or an array, got {value!r}.")
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    if getattr(value, "ndim", None) is None:
        raise TypeError(
            f"prior_precision must be a number, a sequence or an array, got {type(value).__name__}."
        )
    return None


def _positive(v):
    v = float(v)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(
            f"Prior precisions must be positive and finite, got {v}. (A zero prior precision "
            "is an improper prior: the posterior precision may be singular.)"
        )
    return v


def fit_structure(structure, curvature, model, loss, params, data, *, settings, options):
    """The curvature of ``loss`` (a sum over the data) in the chosen structure.

    ``settings``: a dict with ``num_data``, ``check_deterministic``, ``seed``, ``rank``,
    ``low_rank_method`` and ``max_full``; ``options``: keywords passed on to the
    curvature operator (``mc_samples``, ``kfac_approx``, ``cache``, ...).
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}.")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
    cls = {
        "full": _Full,
        "diag": _Diagonal,
        "kron": _Kronecker,
        "ekfac": _Kronecker,
        "lowrank": _LowRank,
        "diag_lowrank": _DiagonalPlusLowRank,
    }[structure]
    return cls(structure, curvature, model, loss, params, data, settings, dict(options))


class _Structure:
    """The curvature ``H`` of the sum loss in one structure, and the precisions on it."""

    def __init__(self, structure, curvature, model, loss, params, data, settings, options):
        self.structure, self.curvature_type = structure, curvature
        self.sizes = [math.prod(p.shape) for p in params]
        self.settings = settings
        self._common = {
            "num_data": settings["num_data"],
            "check_deterministic": settings["check_deterministic"],
        }
        self._fit(model, loss, params, data, options)

    def _fit(self, model, loss, params, data, options):
        raise NotImplementedError

    def check_prior(self, prior):
        """Raise a clear error for a prior the structure cannot take (all can, by default)."""

    def precision(self, scale, prior):
        """``scale * H + diag(prior)`` with an exact inverse and log-determinant."""
        raise NotImplementedError

    def evidence_terms(self, scale, prior, per_array=False):
        """:class:`EvidenceTerms` of ``A = scale * H + diag(prior)`` from the structure.

        Every structure gives them exactly without forming ``A`` densely (except the
        dense one): from its spectrum per block, or through the Woodbury identity. For a
        scalar prior the dense and low-rank structures give only the totals (from a
        spectrum computed once) unless ``per_array``.
        """
        raise NotImplementedError

    def _low_rank_settings(self):
        rank = self.settings["rank"]
        if rank is None:
            raise ValueError(
                f"structure={self.structure!r} needs rank= (the number of eigenpairs kept)."
            )
        method = self.settings["low_rank_method"]
        if method is None:
            method = "lanczos" if self.structure == "lowrank" else "nystrom"
        return rank, method, self.settings["seed"]

    def _exact_operator(self, model, loss, params, data, options):
        return _EXACT[self.curvature_type](model, loss, params, data, **self._common, **options)

    def _diagonal_operator(self, model, loss, params, data, options):
        if self.curvature_type == "ggn":
            options = {"seed": self.settings["seed"], **options}
        return _DIAGONAL[self.curvature_type](model, loss, params, data, **self._common, **options)


class _Full(_Structure):
    """The dense ``P x P`` curvature."""

    def _fit(self, model, loss, params, data, options):
        limit = self.settings["max_full"]
        P = sum(self.sizes)
        if P > limit:
            raise ValueError(
                f"structure='full' would materialize a {P} x {P} matrix (more than "
                f"max_full={limit} parameters). Use 'kron', 'diag' or a low-rank structure, a "
                "subset of the parameters (subset='last_layer'), or raise max_full."
            )
        H = None
        if not options and self.curvature_type in ("ggn", "ef"):
            H = _dense_from_jacobians(
                self.curvature_type, model, loss, params, data, self.settings["num_data"]
            )
        if H is None:  # P products of the exact operator
            H = self._exact_operator(model, loss, params, data, options).to_dense()
        xp = array_namespace(H)
        self.H = 0.5 * (H + xp.matrix_transpose(H))
        self.xp = xp
        self._eigenvalues = None

    def precision(self, scale, prior):
        xp = self.xp
        return DenseLinearOperator(
            scale * self.H + _diag_matrix(prior.diagonal, xp), symmetric=True
        )

    def evidence_terms(self, scale, prior, per_array=False):
        xp = self.xp
        if prior.is_scalar and not per_array:  # a shift of the spectrum of H, computed once
            if self._eigenvalues is None:
                self._eigenvalues = DenseLinearOperator(self.H, symmetric=True).eigvalsh()
            shifted = scale * self._eigenvalues + prior.per_array[0]
            _require_positive(shifted, xp, self.structure)
            inverse = 1.0 / shifted
            return EvidenceTerms(
                float(xp.sum(xp.log(shifted))),
                total_trace=float(xp.sum(inverse)),
                total_coupling=float(xp.sum(inverse * inverse)),
            )
        # one eigendecomposition of A gives all: A^{-1} = V diag(1 / w) V^T
        w, V = checked_eigh(self.precision(scale, prior).A, xp, name="dense posterior precision")
        _require_positive(w, xp, self.structure)
        covariance = (V * (1.0 / w)[None, :]) @ xp.matrix_transpose(V)
        squares = _group_matrix(
            _group_matrix(covariance * covariance, self.sizes, xp).T, self.sizes, xp
        )
        return EvidenceTerms(
            float(xp.sum(xp.log(w))),
            traces=_group_sums(xp.linalg.diagonal(covariance), self.sizes, xp),
            coupling=[[float(v) for v in row] for row in _rows(squares)],
        )


def _group_matrix(M, sizes, xp):
    """Sums of the rows of ``M`` over consecutive groups of ``sizes`` rows: ``(G, cols)``."""
    out, start = [], 0
    for n in sizes:
        out.append(xp.sum(M[start : start + n, ...], axis=0))
        start += n
    return xp.stack(out, axis=0)


def _rows(M):
    """A small 2-D array as nested lists of floats (one host transfer)."""
    return to_numpy(M).tolist()


def _dense_from_jacobians(curvature, model, loss, params, data, num_data):
    """The dense GGN or empirical Fisher from per-datum Jacobians, or None.

    ``G = sum_n J_n^T H_n J_n`` and ``EF = sum_n (J_n^T g_n) (J_n^T g_n)^T`` with the
    Jacobians from the layer taps (``C`` backward columns per datum) instead of ``P``
    products of the exact operator: the route of the full structure when the taps cover
    every parameter (else None: the caller falls back to the operator). Data are taken
    in chunks whose Jacobians hold at most ``MAX_JACOBIAN_ENTRIES`` entries.
    """
    from ..curvature._data import iterate_batches
    from ..models import Tier
    from .predictive import MAX_JACOBIAN_ENTRIES, _tap_jacobians

    if not model.has_tier(Tier.LAYER_TAPS):
        return None
    xp = array_namespace(*params)
    P = sum(math.prod(p.shape) for p in params)
    total, shape = None, None
    for _, X, y in iterate_batches(data, xp, params=params):
        N = int(X.shape[0])
        first = model(params, X[:1, ...])
        if first.ndim != 2:
            return None
        C = int(first.shape[1])
        chunk = max(1, MAX_JACOBIAN_ENTRIES // (C * P))
        for start in range(0, N, chunk):
            stop = min(start + chunk, N)
            X_part, y_part = X[start:stop, ...], y[start:stop, ...]
            lin = model.linearize(params, X_part)
            J = _tap_jacobians(lin, params)
            if J is None:
                return None
            f = lin.outputs
            loss.check(f, y_part)
            part = _outer_sum(curvature, loss, f, y_part, J, xp)
            total = part if total is None else total + part
        shape = (N, C)
    return total * loss.normalization(num_data, shape)


def _outer_sum(curvature, loss, f, y, J, xp):
    """``sum_n J_n^T H_n J_n`` (GGN) or ``sum_n J_n^T g_n g_n^T J_n`` (EF) of one chunk."""
    N, C, P = J.shape
    if curvature == "ggn":
        HJ = loss.hessian_matmat(f, y, J)
        return xp.matrix_transpose(xp.reshape(J, (N * C, P))) @ xp.reshape(HJ, (N * C, P))
    grads = xp.sum(J * loss.gradient(f, y)[:, :, None], axis=1)  # (N, P)
    return xp.matrix_transpose(grads) @ grads


def _diag_matrix(d, xp):
    return d[:, None] * xp.eye(d.shape[0], dtype=d.dtype, device=_device_of(d))


def _device_of(a):
    from .._backend import device

    return device(a)


def _require_positive(shifted, xp, structure):
    smallest = float(xp.min(shifted))
    if not smallest > 0:
        raise ValueError(
            f"The posterior precision (structure={structure!r}) is not positive definite: "
            f"its smallest eigenvalue is {smallest:.3g}. The curvature has negative "
            "eigenvalues larger than the prior precision (a Hessian away from a minimum, "
            "or a low-rank Hessian); use curvature='ggn', a larger prior precision, or "
            "parameters at a minimum of the loss."
        )


class _Diagonal(_Structure):
    """The diagonal of the curvature."""

    def _fit(self, model, loss, params, data, options):
        op = self._diagonal_operator(model, loss, params, data, options)
        self.h = op.diagonal()
        self.xp = op.xp

    def precision(self, scale, prior):
        return DiagonalLinearOperator(scale * self.h + prior.diagonal)

    def output_covariance(self, scale, prior, lin):
        """``J_n Sigma J_n^T`` per datum from the taps, ``Sigma`` diagonal (or None)."""
        nu = 1.0 / (scale * self.h + prior.diagonal)
        bases = _diagonal_bases(nu, self.sizes, lin, self.xp)
        return None if bases is None else _tap_output_covariance(lin, bases, self.xp)

    def evidence_terms(self, scale, prior, per_array=False):
        xp = self.xp
        shifted = scale * self.h + prior.diagonal
        _require_positive(shifted, xp, self.structure)
        inverse = 1.0 / shifted
        return EvidenceTerms(
            float(xp.sum(xp.log(shifted))),
            traces=_group_sums(inverse, self.sizes, xp),
            coupling=_diagonal_coupling(_group_sums(inverse * inverse, self.sizes, xp)),
        )


def _group_sums(values, sizes, xp):
    """Sums of ``values`` over consecutive groups of ``sizes`` entries (a list of floats)."""
    out, start = [], 0
    for n in sizes:
        out.append(float(xp.sum(values[start : start + n])))
        start += n
    return out


class _Kronecker(_Structure):
    """K-FAC or EKFAC: one block per parameter array (weights and biases apart)."""

    def _fit(self, model, loss, params, data, options):
        if not options.pop("separate_weight_and_bias", True):
            raise ValueError(
                "A Laplace posterior with structure 'kron' or 'ekfac' keeps weights and biases "
                "in separate blocks (its prior precision may differ between them); "
                "separate_weight_and_bias=False is not supported."
            )
        op = self._operator(model, loss, params, data, options)
        factored = op.kronecker_factored
        self.xp = op.xp
        self.blocks = list(factored.operator.blocks)
        self.layout = [[(s, (r, c)) for s, r, c in block] for block in factored.blocks]
        self.block_array = _block_arrays(factored.blocks, self.sizes)
        self._eigenvalues = [None] * len(self.blocks)

    def _operator(self, model, loss, params, data, options):
        common = self._common
        if self.structure == "ekfac":
            if self.curvature_type == "hessian":
                raise ValueError(
                    "structure='ekfac' has no Hessian variant; use curvature='ggn' or 'ef', "
                    "or structure='kron' with curvature='hessian' (the Kronecker-factored "
                    "Hessian)."
                )
            cls = EKFACLinearOperator
        elif self.curvature_type == "hessian":
            return KFACHessianLinearOperator(model, loss, params, data, **common, **options)
        else:
            cls = KFACLinearOperator
        fisher_type = _FISHER_TYPE[self.curvature_type]
        options = {"seed": self.settings["seed"], **options}
        return cls(model, loss, params, data, fisher_type=fisher_type, **common, **options)

    def check_prior(self, prior):
        self._block_priors(prior)

    def _block_priors(self, prior):
        if prior.per_array is None:
            raise ValueError(
                f"structure={self.structure!r} takes a prior precision per parameter array "
                "(a scalar or one value per array), not one per parameter: its blocks stay "
                "exact only with one prior value per block."
            )
        return [prior.per_array[i] for i in self.block_array]

    def precision(self, scale, prior):
        damped = [
            (scale * block).damped(delta)
            for block, delta in zip(self.blocks, self._block_priors(prior), strict=True)
        ]
        return ParameterLayoutLinearOperator(BlockDiagonalLinearOperator(damped), self.layout)

    def _block_eigenvalues(self, b):
        if self._eigenvalues[b] is None:
            self._eigenvalues[b] = self.blocks[b].eigvalsh()
        return self._eigenvalues[b]

    def evidence_terms(self, scale, prior, per_array=False):
        xp = self.xp
        logdet, traces, squares = 0.0, [0.0] * len(self.sizes), [0.0] * len(self.sizes)
        for b, delta in enumerate(self._block_priors(prior)):
            shifted = scale * self._block_eigenvalues(b) + delta
            _require_positive(shifted, xp, self.structure)
            inverse = 1.0 / shifted
            logdet += float(xp.sum(xp.log(shifted)))
            traces[self.block_array[b]] += float(xp.sum(inverse))
            squares[self.block_array[b]] += float(xp.sum(inverse * inverse))
        return EvidenceTerms(logdet, traces=traces, coupling=_diagonal_coupling(squares))

    def output_covariance(self, scale, prior, lin):
        """``J_n Sigma J_n^T`` of every datum, ``(N, C, C)``, from the taps (or None).

        Each block in its eigenbasis ``Q_B (x) Q_A`` with the covariance's eigenvalues
        ``1 / (scale lam + delta)`` (:func:`_tap_output_covariance`).
        """
        bases = {}
        for b, delta in enumerate(self._block_priors(prior)):
            basis = _eigenbasis(self.blocks[b])
            if basis is None:
                return None
            Q_out, Q_in, lam = basis
            bases[self.block_array[b]] = (Q_out, Q_in, 1.0 / (scale * lam + delta))
        return _tap_output_covariance(lin, bases, self.xp)


def _unit_taps(lin, xp):
    """``{array: (tap, is_weight)}`` of the layer taps for the ``C`` unit cotangents, or
    None unless every tap is a Linear one without shared axes (``s = W a + b``)."""
    outputs = lin.outputs
    N, C = outputs.shape
    eye = xp.eye(C, dtype=outputs.dtype, device=_device_of(outputs))
    roles = {}
    for tap in lin.layer_taps(xp.broadcast_to(eye[None, :, :], (N, C, C))):
        if tap.kind != "matrix" or tap.transposed or tap.inputs.ndim != 2:
            return None
        roles[tap.weight_index] = (tap, True)
        if tap.bias_index is not None:
            roles[tap.bias_index] = (tap, False)
    return roles


def _tap_output_covariance(lin, bases, xp):
    """``sum_l J_n,l Sigma_l J_n,l^T`` per datum for a block-diagonal covariance, or None.

    ``bases[array] = (Q_out, Q_in, nu)``: the array's block of the covariance is
    ``(Q_out (x) Q_in) diag(nu) (Q_out (x) Q_in)^T`` with ``nu`` of the weight's shape
    ``(D_out, D_in)`` (``(D_out, 1)`` for a bias; an int ``Q`` is the identity, e.g. a
    diagonal covariance). For a Linear layer without shared axes the Jacobian of output
    ``c`` is ``g_c a^T`` (its output gradient and input), in the eigenbasis ``u_c v^T``
    (``u_c = Q_out^T g_c``, ``v = Q_in^T a``), and its share of ``J Sigma J^T`` is
    ``sum_i u_ci u_di sum_j nu_ij v_j^2``: per datum ``O(C D_out^2 + D_in^2 + C^2 D_out +
    D_out D_in)`` instead of a product with ``C`` columns of ``P`` entries. None (use the
    Jacobians) for outputs other than ``(N, C)``, other taps (shared axes, transposed
    weights, embeddings, elementwise layers) or an array without a basis.
    """
    if lin.outputs.ndim != 2:
        return None
    roles = _unit_taps(lin, xp)
    if roles is None or set(roles) != set(bases):
        return None
    N = lin.outputs.shape[0]
    total = None
    for array, (Q_out, Q_in, nu) in bases.items():
        tap, is_weight = roles[array]
        d_out, d_in = tap.output_grads.shape[1], tap.inputs.shape[1]
        if tuple(nu.shape) != ((d_out, d_in) if is_weight else (d_out, 1)):
            return None
        U = xp.permute_dims(_rotated(Q_out, tap.output_grads, xp), (0, 2, 1))  # (N, C, D_out)
        if is_weight:
            V = tap.inputs if isinstance(Q_in, int) else tap.inputs @ Q_in
            w = (V * V) @ xp.matrix_transpose(nu)  # (N, D_out)
        else:
            w = xp.broadcast_to(nu[:, 0][None, :], (N, d_out))
        part = (U * w[:, None, :]) @ xp.matrix_transpose(U)
        total = part if total is None else total + part
    return 0.5 * (total + xp.matrix_transpose(total))


def _diagonal_bases(nu, sizes, lin, xp):
    """Identity bases for a diagonal covariance ``diag(nu)``, shaped by the taps (or None)."""
    if lin.outputs.ndim != 2:
        return None
    roles = _unit_taps(lin, xp)
    if roles is None or set(roles) != set(range(len(sizes))):
        return None
    bases, start = {}, 0
    for array, n in enumerate(sizes):
        tap, is_weight = roles[array]
        d_out = tap.output_grads.shape[1]
        bases[array] = (1, 1, xp.reshape(nu[start : start + n], (d_out, -1)))
        start += n
    return bases


def _low_rank_output_covariance(lin, base_nu, vectors, values, sizes, xp):
    """``J (diag(base_nu) + U diag(values) U^T) J^T`` per datum, or None.

    The diagonal part from the taps; the low-rank part from one Jacobian-vector product
    with the ``k`` columns of ``U``: ``(J U) diag(values) (J U)^T``.
    """
    bases = _diagonal_bases(base_nu, sizes, lin, xp)
    if bases is None:
        return None
    diagonal = _tap_output_covariance(lin, bases, xp)
    if diagonal is None:
        return None
    from ..models import unflatten_params

    JU = lin.jvp(unflatten_params(vectors, [tuple(p.shape) for p in lin.params]))  # (N, C, k)
    low_rank = (JU * values[None, None, :]) @ xp.matrix_transpose(JU)
    out = diagonal + low_rank
    return 0.5 * (out + xp.matrix_transpose(out))


def _eigenbasis(block):
    """``(Q_out, Q_in, lam)`` of a two-factor Kronecker(-eigendecomposed) block, or None.

    ``lam`` is ``(D_out, D_in)``, ordered like the flattened weight; an int ``Q`` stands
    for the identity.
    """
    if isinstance(block, KroneckerLinearOperator) and len(block.factors) in (1, 2):
        eigh = block.factor_eigh()
        (lam_out, Q_out), (lam_in, Q_in) = eigh if len(eigh) == 2 else (eigh[0], (None, 1))
        lam_in = block.xp.ones_like(lam_out[:1]) if lam_in is None else lam_in
        return Q_out, Q_in, lam_out[:, None] * lam_in[None, :]
    if isinstance(block, KroneckerEighLinearOperator) and len(block.eigenvectors) in (1, 2):
        Q_out, Q_in = (*block.eigenvectors, 1)[:2]  # one factor: a bias, D_in = 1
        n_out = Q_out if isinstance(Q_out, int) else int(Q_out.shape[0])
        lam = block.xp.reshape(block.eigenvalues, (n_out, -1))
        return Q_out, Q_in, lam
    return None


def _rotated(Q, g, xp):
    """``Q^T g`` for output gradients ``g`` ``(N, D, C)`` (``Q`` an int: the identity)."""
    if isinstance(Q, int):
        return g
    return xp.matrix_transpose(Q)[None, :, :] @ g


def _block_arrays(layout, sizes):
    """The parameter array each block of a Kronecker-factored layout covers."""
    starts, offset = {}, 0
    for i, n in enumerate(sizes):
        starts[offset] = i
        offset += n
    out = []
    for block in layout:
        arrays = {starts.get(s) for s, _, _ in block}
        if len(block) != 1 or None in arrays:
            raise ValueError(
                "Each block of the Kronecker-factored curvature must cover exactly one "
                "parameter array for a Laplace posterior (separate weight and bias blocks)."
            )
        out.append(arrays.pop())
    return out


class _LowRank(_Structure):
    """The top of the spectrum (Lanczos or Nystrom), ``U diag(lam) U^T``."""

    def _fit(self, model, loss, params, data, options):
        rank, method, seed = self._low_rank_settings()
        op = self._exact_operator(model, loss, params, data, options)
        L = low_rank(op, rank, method=method, seed=seed)
        self.eigenvalues, self.eigenvectors = L.eigenvalues, L.eigenvectors
        self.xp = op.xp

    def precision(self, scale, prior):
        from ..linalg import EighLinearOperator

        if prior.is_scalar:
            return (scale * EighLinearOperator(self.eigenvalues, self.eigenvectors)).damped(
                prior.per_array[0]
            )
        return DiagonalPlusLowRankLinearOperator(
            prior.diagonal, scale * self.eigenvalues, self.eigenvectors
        )

    def output_covariance(self, scale, prior, lin):
        """``J_n Sigma J_n^T`` per datum from the taps and one Jacobian-vector product
        with the ``rank`` eigenvectors (or None)."""
        xp, Q = self.xp, self.eigenvectors
        if not prior.is_scalar:
            return _woodbury_output_covariance(
                prior.diagonal, scale * self.eigenvalues, Q, self.sizes, lin, xp
            )
        # (Q diag(s lam) Q^T + delta I)^{-1} = Q diag(1/(s lam + delta) - 1/delta) Q^T + I/delta
        delta = prior.per_array[0]
        values = 1.0 / (scale * self.eigenvalues + delta) - 1.0 / delta
        base = xp.full((Q.shape[0],), 1.0 / delta, dtype=Q.dtype, device=_device_of(Q))
        return _low_rank_output_covariance(lin, base, Q, values, self.sizes, xp)

    def evidence_terms(self, scale, prior, per_array=False):
        xp = self.xp
        if not prior.is_scalar or per_array:
            return _woodbury_terms(
                prior.diagonal, scale * self.eigenvalues, self.eigenvectors, self.sizes, xp
            )
        delta = prior.per_array[0]
        shifted = scale * self.eigenvalues + delta
        _require_positive(shifted, xp, self.structure)
        missing = sum(self.sizes) - int(shifted.shape[0])  # eigenvalues 0 + delta
        inverse = 1.0 / shifted
        return EvidenceTerms(
            float(xp.sum(xp.log(shifted))) + missing * math.log(delta),
            total_trace=float(xp.sum(inverse)) + missing / delta,
            total_coupling=float(xp.sum(inverse * inverse)) + missing / delta**2,
        )


class _DiagonalPlusLowRank(_Structure):
    """A low-rank part plus the exact diagonal of the rest, ``diag(d) + U diag(lam) U^T``."""

    def _fit(self, model, loss, params, data, options):
        rank, method, seed = self._low_rank_settings()
        op = self._exact_operator(model, loss, params, data, options)
        diagonal = self._diagonal_operator(model, loss, params, data, {})
        A = diagonal_plus_low_rank(op, rank, diagonal=diagonal, method=method, seed=seed)
        self.rest, self.eigenvalues = A.diagonal_values, A.low_rank_values
        self.eigenvectors = A.low_rank_vectors
        self.xp = op.xp

    def precision(self, scale, prior):
        return DiagonalPlusLowRankLinearOperator(
            scale * self.rest + prior.diagonal, scale * self.eigenvalues, self.eigenvectors
        )

    def output_covariance(self, scale, prior, lin):
        """``J_n Sigma J_n^T`` per datum through the Woodbury identity (or None)."""
        return _woodbury_output_covariance(
            scale * self.rest + prior.diagonal,
            scale * self.eigenvalues,
            self.eigenvectors,
            self.sizes,
            lin,
            self.xp,
        )

    def evidence_terms(self, scale, prior, per_array=False):
        return _woodbury_terms(
            scale * self.rest + prior.diagonal,
            scale * self.eigenvalues,
            self.eigenvectors,
            self.sizes,
            self.xp,
        )


def _woodbury_factor(d, s, U, xp):
    """``(1/d, W, L)`` with ``(D + U diag(s) U^T)^{-1} = D^{-1} - W W^T``,
    ``W = D^{-1} U L^{-T}`` and ``L L^T = diag(1/s) + U^T D^{-1} U`` (Cholesky)."""
    k = int(s.shape[0])
    d_inv = 1.0 / d
    eye = xp.eye(k, dtype=d.dtype, device=_device_of(d))
    C = xp.matrix_transpose(U) @ (d_inv[:, None] * U) + eye * (1.0 / s)[None, :]
    L = checked_cholesky(C, xp, name="Woodbury capacitance matrix")
    W = xp.matrix_transpose(solve_triangular(L, xp.matrix_transpose(d_inv[:, None] * U), xp))
    return d_inv, W, L


def _woodbury_output_covariance(d, s, U, sizes, lin, xp):
    """``J (D + U diag(s) U^T)^{-1} J^T`` per datum: ``J D^{-1} J^T - (J W)(J W)^T``."""
    if not bool(xp.all(d > 0)) or not bool(xp.all(s > 0)):
        return None
    d_inv, W, _ = _woodbury_factor(d, s, U, xp)
    minus = -xp.ones((W.shape[1],), dtype=W.dtype, device=_device_of(W))
    return _low_rank_output_covariance(lin, d_inv, W, minus, sizes, xp)


def _woodbury_terms(d, s, U, sizes, xp):
    """:class:`EvidenceTerms` of ``D + U diag(s) U^T`` through the Woodbury identity.

    ``A^{-1} = D^{-1} - W W^T`` with ``W = D^{-1} U L^{-T}`` and ``L L^T = diag(1/s) +
    U^T D^{-1} U``; ``log det A = sum log d + sum log s + 2 sum log diag L`` (the matrix
    determinant lemma). The covariance's block between arrays ``g`` and ``h`` is
    ``[g = h] D_g^{-1} - W_g W_h^T``, whose squared Frobenius norm is
    ``[g = h] (sum d_g^{-2} - 2 sum d_g^{-1} |w_i|^2) + <W_g^T W_g, W_h^T W_h>``.
    Costs ``O(P k^2)``.
    """
    if not bool(xp.all(d > 0)) or not bool(xp.all(s > 0)):
        raise ValueError(
            "A low-rank posterior precision with a prior per parameter array needs positive "
            "eigenvalues of the curvature's low-rank part and a positive diagonal; use a "
            "scalar prior (the damped eigendecomposition), or curvature='ggn'."
        )
    d_inv, W, L = _woodbury_factor(d, s, U, xp)
    logdet = xp.sum(xp.log(d)) + xp.sum(xp.log(s)) + 2 * xp.sum(xp.log(xp.linalg.diagonal(L)))
    row_squares = xp.sum(W * W, axis=1)
    traces = _group_sums(d_inv - row_squares, sizes, xp)
    own = _group_sums(d_inv * d_inv - 2 * d_inv * row_squares, sizes, xp)
    grams, start = [], 0
    for n in sizes:
        part = W[start : start + n, ...]
        grams.append(xp.matrix_transpose(part) @ part)
        start += n
    G = xp.stack([xp.reshape(g, (-1,)) for g in grams], axis=0)
    cross = _rows(G @ xp.matrix_transpose(G))
    coupling = [
        [cross[g][h] + (own[g] if g == h else 0.0) for h in range(len(sizes))]
        for g in range(len(sizes))
    ]
    return EvidenceTerms(float(logdet), traces=traces, coupling=coupling)
