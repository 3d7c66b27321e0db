"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse, 2015).

:class:`KFACLinearOperator` approximates each Linear layer's block of the GGN / Fisher
by a Kronecker product ``B (x) A`` of an output-gradient factor and an input factor,
computed in one pass over the data from the model's tier-3 layer taps, and offers
exact products, trace, diagonal, Frobenius norm, log-determinant and (damped) inverses
from the factors. :class:`KroneckerFactoredLinearOperator` is the operator its inverses
(and EKFAC) are made of.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.losses``, ``._data``, ``._kronecker``, ``.base``.
"""

from __future__ import annotations

import math

from .._backend import device as array_device
from ._kronecker import (
    KroneckerFactoredLinearOperator,
    _Factor,
    _KronBlock,
    _KroneckerCurvature,
    spd_inverse,
)

__all__ = ["KFACLinearOperator", "KroneckerFactoredLinearOperator"]

FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")


class KFACLinearOperator(_KroneckerCurvature):
    """K-FAC: one Kronecker-factored block ``B (x) A`` per Linear layer.

    Works for every model that offers tier-3 layer taps (``curvlinops.nn`` models, the
    PyTorch frontend); every parameter must belong to a tapped Linear layer. The
    factors come from **one** pass over the data per batch: one forward pass and one
    backward pass of ``M`` output-space cotangents, chosen by ``fisher_type``:

    - ``"type-2"``: the columns of the loss Hessian's symmetric factor
      (``loss.hessian_sqrt``; ``B (x) A`` approximates the GGN);
    - ``"mc"``: ``mc_samples`` gradients at labels sampled from the model's predictive
      distribution (``loss.sampled_gradients``; approximates the Fisher; the draws depend
      only on ``seed`` and the batch index);
    - ``"empirical"``: the gradient at the true labels (approximates the empirical
      Fisher);
    - ``"forward-only"``: no backward pass; the output factor is the identity (the
      closed form of forward-only K-FAC, ``I (x) A``).

    Scalings. For a layer ``s = W a + b`` with ``W`` of shape ``(D_out, D_in)``
    (flattened in C order), ``A = (1/T) sum_t a_t a_t^T`` over the ``T`` items of the
    data set and ``B = c sum_t sum_m g_t,m g_t,m^T`` with ``g_t,m`` the gradient of the
    layer's output for cotangent column ``m`` and ``c = loss.normalization(num_data,
    outputs_shape)``. An item is a datum; with inputs ``(N, S, D_in)`` (a shared axis),
    ``kfac_approx="expand"`` makes every position ``(n, s)`` an item, and ``"reduce"``
    averages the inputs and sums the output gradients over ``S`` first (Eschenhagen et
    al., 2023). With these scalings K-FAC equals the exact GGN block for a single
    datum, for a single Linear layer with squared loss (linear regression), and for deep
    linear networks with squared loss; "expand" is exact for a weight shared over
    positions that do not interact, "reduce" for a layer whose outputs are aggregated
    over ``S`` linearly before the loss. With outputs ``(N, S, C)`` the loss factors'
    columns (one factor per position) are backpropagated for all positions at once, as
    in the K-FAC literature, so an item's gradient ignores how positions interact.

    The bias block is ``B`` (input factor 1). With ``separate_weight_and_bias=False``
    the weight and bias form one block ``B (x) A`` over ``[W | b]`` whose input factor
    uses the inputs augmented by a trailing one.

    Parameters
    ----------
    model : curvlinops.models.Model
        A model offering layer taps (tier 3), e.g. a ``curvlinops.nn.Sequential``.
    loss : curvlinops.losses.Loss
        Its reduction applies over the whole data set.
    params : list of arrays
        Parameters; the operator acts on flat vectors ``(P,)`` and ``(P, K)``.
    data : iterable of (X, y)
        Re-iterable batches of any sizes on the parameters' backend and device.
    fisher_type : {"type-2", "mc", "empirical", "forward-only"}
        Which cotangents define the output factor (see above).
    mc_samples : int
        Sampled labels per datum for ``fisher_type="mc"``.
    kfac_approx : {"expand", "reduce"}
        Treatment of shared axes (see above); irrelevant without them.
    separate_weight_and_bias : bool
        Separate blocks for weight and bias (True) or one joint block (False).
    seed : int
        Seed of the Monte-Carlo draws.
    num_data : int, optional
        Number of data points (skips the counting pass).
    progressbar : bool
        tqdm progress bar over the batches.
    check_deterministic : bool
        Run over the data twice first and raise if the passes differ.

    Attributes
    ----------
    input_factors : dict
        ``A`` per layer name, ``(D_in, D_in)`` (``(D_in + 1, D_in + 1)`` when joint).
    output_factors : dict
        ``B`` per layer name, ``(D_out, D_out)``.
    layers : list
        The layers in tap order (name, parameter indices, sizes).

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import GGNLinearOperator, MSELoss, nn
    >>> from curvlinops.curvature.kfac import KFACLinearOperator
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # a deep linear network
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> rng = np.random.default_rng(0)
    >>> data = [(rng.normal(size=(10, 3)), rng.normal(size=(10, 2)))]
    >>> K = KFACLinearOperator(model, MSELoss(), params, data)
    >>> sorted(K.input_factors), K.output_factors["0"].shape
    (['0', '1'], (4, 4))
    >>> G = GGNLinearOperator(model, MSELoss(), params, data).to_dense()
    >>> bool(np.allclose(K.to_dense()[:12, :12], G[:12, :12]))  # exact for this case
    True
    >>> v = rng.normal(size=K.shape[1])
    >>> bool(np.allclose(K.inverse(damping=1e-2, exact=True) @ (K @ v + 1e-2 * v), v))
    True
    """

    fisher_types = FISHER_TYPES
    psd = True  # B and A are sums of outer products for every fisher_type

    def _build(self):
        self._set_factors(self._kfac_factors())

    def _set_factors(self, factors):
        """Store ``(B, A)`` per layer and build the operator from them."""
        self.input_factors, self.output_factors, self._factors = {}, {}, {}
        groups = []
        for layer, (B, A) in zip(self.layers, factors, strict=True):
            self.output_factors[layer.name], self.input_factors[layer.name] = B, A
            B_f = _Factor(B, f"output factor B of layer {layer.name!r}")
            A_f = _Factor(A, f"input factor A of layer {layer.name!r}")
            self._factors[layer.name] = (B_f, A_f)
            groups += self._groups(layer, _KronBlock(B_f, A_f), _KronBlock(B_f, self._one()))
        self._operator = self._make_operator(groups)

    def inverse(self, damping=0.0, *, exact=False, heuristic_damping=False, min_damping=1e-8):
        """A damped inverse, factored (cheap, approximate) or exact.

        - ``exact=False`` (default): per layer
          ``(B + sqrt(d) I)^{-1} (x) (A + sqrt(d) I)^{-1}``, the factors inverted
          explicitly through their Cholesky factors. It approximates, but does not
          equal, ``(B (x) A + d I)^{-1}`` (equal for ``d = 0``).
        - ``heuristic_damping=True``: the factored Tikhonov damping of Martens & Grosse
          (2015, section 6.3), ``(B + sqrt(d)/pi I)^{-1} (x) (A + pi sqrt(d) I)^{-1}``
          with ``pi = sqrt((tr A / dim A) / (tr B / dim B))`` (``pi = 1`` if a trace is
          not positive); both shifts are clamped from below by ``min_damping``.
        - ``exact=True``: ``(B (x) A + d I)^{-1}`` exactly, through the eigendecompositions
          of the factors (computed once and cached).

        A separate bias block (``B`` alone) is not a Kronecker product; it is always
        inverted exactly as ``(B + d I)^{-1}`` (with ``d`` clamped from below by
        ``min_damping`` under ``heuristic_damping``).

        Parameters
        ----------
        damping : float
            ``d >= 0``.
        exact : bool
            Exact damped inverse instead of the factored one.
        heuristic_damping : bool
            pi-damping (only with ``exact=False``).
        min_damping : float
            Lower bound of the factor shifts with ``heuristic_damping``.

        Returns
        -------
        KroneckerFactoredLinearOperator

        Raises
        ------
        FactorizationError
            If a shifted factor is not positive definite (after a retry in float64 for
            lower precisions), naming the layer and the factor; add damping.

        Examples
        --------
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import CrossEntropyLoss, nn
        >>> from curvlinops.curvature.kfac import KFACLinearOperator
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> rng = np.random.default_rng(0)
        >>> data = [(rng.normal(size=(6, 3)), rng.integers(0, 3, size=6))]
        >>> K = KFACLinearOperator(model, CrossEntropyLoss(), params, data)
        >>> K_inv = K.inverse(damping=1e-2, heuristic_damping=True)
        >>> K_inv.shape == K.shape
        True
        """
        damping = _check_damping(damping)
        if exact and heuristic_damping:
            raise ValueError(
                "heuristic_damping applies to the factored inverse only; pass exact=False "
                "with heuristic_damping=True, or exact=True without it."
            )
        if exact:
            return self._operator.inverse(damping)
        xp = self.xp
        groups = []
        for layer in self.layers:
            B_f, A_f = self._factors[layer.name]
            B, A = B_f.matrix, A_f.matrix
            shift_A, shift_B = _factor_shifts(A, B, damping, heuristic_damping, min_damping, xp)
            where = f"of layer {layer.name!r}"
            B_inv = _Factor(
                spd_inverse(_shifted(B, shift_B, xp), xp, f"damped output factor B {where}"),
                f"inverse output factor {where}",
            )
            A_inv = _Factor(
                spd_inverse(_shifted(A, shift_A, xp), xp, f"damped input factor A {where}"),
                f"inverse input factor {where}",
            )
            bias_block = None
            if layer.bias_index is not None and not self._joint(layer):
                shift = max(damping, min_damping) if heuristic_damping else damping
                B_bias = spd_inverse(_shifted(B, shift, xp), xp, f"damped bias block B {where}")
                bias_block = _KronBlock(_Factor(B_bias, f"inverse bias block {where}"), self._one())
            groups += self._groups(layer, _KronBlock(B_inv, A_inv), bias_block)
        return self._make_operator(groups)


def _check_damping(damping) -> float:
    damping = float(damping)
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping}.")
    return damping


def _shifted(M, shift, xp):
    if shift == 0.0:
        return M
    return M + shift * xp.eye(M.shape[0], dtype=M.dtype, device=array_device(M))


def _factor_shifts(A, B, damping, heuristic, min_damping, xp):
    """Shifts ``(of A, of B)`` of the factored damping (pi-damping if ``heuristic``)."""
    root = math.sqrt(damping)
    if not heuristic:
        return root, root
    mean_A = float(xp.linalg.trace(A)) / A.shape[0]
    mean_B = float(xp.linalg.trace(B)) / B.shape[0]
    pi = math.sqrt(mean_A / mean_B) if mean_A > 0 and mean_B > 0 else 1.0
    return max(pi * root, min_damping), max(root / pi, min_damping)
