"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse, 2015).

:class:`KFACLinearOperator` approximates each Linear layer's block of the GGN / Fisher
by a Kronecker product ``B (x) A`` of an output-gradient factor and an input factor,
computed in one pass over the data from the model's tier-3 layer taps, and offers
exact products, trace, diagonal, Frobenius norm, log-determinant and (damped) inverses
from the factors: :meth:`~KFACLinearOperator.inverse` is the exact
``(K + damping I)^{-1}``, :meth:`~KFACLinearOperator.factored_inverse` the factored
(Tikhonov / pi-damping) heuristic of Martens & Grosse (2015).
:class:`KroneckerFactoredLinearOperator` (from ``.kronecker_factored``) is the operator
K-FAC and its inverses are made of; the factor statistics live in
``.kronecker_statistics``.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.losses``, ``._data``, ``.kronecker_factored``, ``.kronecker_statistics``,
``.base``.
"""

from __future__ import annotations

import math
import warnings

from .._backend import FactorizationError, check_invertible_spectrum, device, spd_inverse
from .._backend.conditioning import invert_all
from ..linalg import DenseLinearOperator, DiagonalLinearOperator, KroneckerLinearOperator
from .kronecker_factored import KroneckerFactoredLinearOperator
from .kronecker_statistics import _KroneckerCurvature, check_damping, per_group

__all__ = ["KFACLinearOperator", "KroneckerFactoredLinearOperator"]

FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")


class KFACLinearOperator(_KroneckerCurvature):
    """K-FAC: one Kronecker-factored block ``B (x) A`` per Linear or convolution layer.

    Works for every model that offers tier-3 layer taps (``curvlinops.nn`` models, the
    PyTorch frontend); every parameter must belong to a tapped layer: a linear map of
    its inputs (Linear; a convolution, whose inputs are its unfolded patches, after
    Grosse & Martens, 2016; a grouped convolution, whose weight is block diagonal over
    its ``G`` groups, gets one block ``B_g (x) A_g`` per group, from that group's
    patches and output gradients) or an elementwise affine map (the weight and bias of
    batch normalization), which gets its exact block instead of Kronecker factors (see
    ``exact_blocks`` below). The factors come from **one** pass over the data per
    batch: one forward pass and one backward pass of ``M`` output-space cotangents,
    chosen by ``fisher_type``:

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
    comm : optional
        Distribute the pass over processes (an mpi4py communicator, a
        ``torch.distributed`` process group or a :class:`~curvlinops.Communicator`):
        ``data`` is this process's shard (Monte-Carlo draws differ per rank), one
        all-reduce adds the shards' statistics, and every rank holds the same factors;
        products then need no communication. :meth:`update` is collective too (each
        rank passes its shard of the batch). See :doc:`/distributed`.

    Attributes
    ----------
    input_factors : dict
        ``A`` per layer name, ``(D_in, D_in)`` (``(D_in + 1, D_in + 1)`` when joint).
        For a grouped convolution (``G`` groups) a stack ``(G, d_in, d_in)`` of each
        group's factor (``d_in = C_in / G * kh * kw``).
    output_factors : dict
        ``B`` per layer name, ``(D_out, D_out)``; for ``G`` groups a stack
        ``(G, D_out / G, D_out / G)``.
    exact_blocks : dict
        Per elementwise layer (normalization: a tap of kind ``"elementwise"``), its
        exact block over ``[weight, bias]`` (``2 D x 2 D``; ``D x D`` without bias),
        from the same cotangents as the Kronecker factors (the identity for
        ``"forward-only"``). With ``separate_weight_and_bias`` the operator uses its
        two diagonal blocks. Exact for models with outputs ``(N, C)`` (type-2: the GGN
        block; MC: the Fisher block in expectation; empirical: the empirical Fisher
        block). With an output per position ``(N, S, C)`` (a language model), the
        type-2 cotangents, like K-FAC's, put all positions of a datum in one column, so
        the block also holds products of different positions' loss factors that the GGN
        does not have (the MC and empirical blocks stay exact: MC draws each position
        independently, and the empirical gradient is the datum's own).
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
    >>> bool(np.allclose(K.inverse(damping=1e-2) @ (K @ v + 1e-2 * v), v))  # exact
    True
    """

    fisher_types = FISHER_TYPES
    psd = True  # B and A are sums of outer products for every fisher_type

    def _build(self):
        self._set_factors(self._kfac_factors()[0])

    def _set_factors(self, factors):
        """Store ``(B, A)`` per layer (in ``self.layers`` order); operators come on first use.

        An optimizer updates the factors every step but multiplies or inverts with them
        far less often, so the operators over them are assembled lazily
        (:meth:`_assembly`).
        """
        self.input_factors, self.output_factors, self.exact_blocks = {}, {}, {}
        for layer, (B, A) in zip(self.layers, factors, strict=True):
            if layer.exact:  # an elementwise layer: its exact block (A is None)
                self.exact_blocks[layer.name] = B
            else:
                self.output_factors[layer.name], self.input_factors[layer.name] = B, A
        self._assembled = None

    @property
    def _factor_ops(self):
        return self._assembly()[0]

    @property
    def _operator(self):
        return self._assembly()[1]

    def _assembly(self):
        """``(factor operators per layer, the operator)`` over the current factors.

        Each layer's blocks are :class:`~curvlinops.linalg.KroneckerLinearOperator`
        ``B (x) A`` (and ``B (x) 1`` for a separate bias) sharing one
        :class:`~curvlinops.linalg.DenseLinearOperator` per factor, so that the weight
        and bias blocks share ``B``'s cached eigendecomposition; a grouped layer (stacked
        factors ``(G, d, d)``) has these blocks for each group.
        """
        if self._assembled is not None:
            return self._assembled
        factor_ops, blocks = {}, []
        for layer in self.layers:
            if layer.exact:
                B = self.exact_blocks[layer.name]
                ops = [DenseLinearOperator(b, symmetric=True) for b in self._exact_blocks(layer, B)]
                factor_ops[layer.name] = ops
                blocks += ops
                continue
            B, A = self.output_factors[layer.name], self.input_factors[layer.name]
            pairs, G = [], layer.groups  # (B_op, A_op) of each group (one for G = 1)
            for B_g, A_g in zip(per_group(B, G), per_group(A, G), strict=True):
                B_op = DenseLinearOperator(B_g, symmetric=True)
                # an embedding's input factor is diagonal: stored and inverted as such
                A_op = (
                    DiagonalLinearOperator(A_g)
                    if A_g.ndim == 1
                    else DenseLinearOperator(A_g, symmetric=True)
                )
                pairs.append((B_op, A_op))
                blocks.append(self._kronecker(layer, B_op, A_op))
                if layer.bias_index is not None and not self._joint(layer):
                    blocks.append(KroneckerLinearOperator(B_op, self._one()))
            factor_ops[layer.name] = pairs
        self._assembled = (factor_ops, self._make_operator(blocks))
        return self._assembled

    def update(self, batch, decay=0.95, *, params=None):
        """Average one batch's factors into the current ones (curvature across steps).

        Each factor (and exact block) becomes ``decay * old + (1 - decay) * new`` with
        ``new`` the factor of ``batch`` alone, scaled as an estimate of the data set's:
        ``A`` is the mean over the batch's items, ``B`` uses the loss's normalization
        of the batch (``"mean"``: ``1 / (N_batch * count)``; ``"sum"``: the batch sum
        times ``num_data / N_batch``). One forward and one backward pass; no
        determinism check, no counting pass, the data given at construction are not
        touched. Monte-Carlo draws (``fisher_type="mc"``) depend on ``seed`` and the
        update count, so a restored state continues with the same draws. Distributed
        (``comm``), every process calls it with its shard of the batch, and
        ``N_batch`` counts all shards. Inverses
        computed before remain valid for the old factors (they are separate
        operators); new products, inverses and eigendecompositions use the new ones.

        Parameters
        ----------
        batch : tuple (X, y)
            One batch on the operator's backend.
        decay : float
            In ``[0, 1]``: ``0`` replaces the factors by the batch's, ``1`` keeps them.
        params : list of arrays, optional
            Take the batch's factors at these parameters (and keep them for later
            products): an optimizer passes its current parameters.

        Returns
        -------
        KFACLinearOperator
            ``self``, updated in place.

        Examples
        --------
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import MSELoss, nn
        >>> from curvlinops.curvature.kfac import KFACLinearOperator
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> rng = np.random.default_rng(0)
        >>> first, second = [(rng.normal(size=(8, 3)), rng.normal(size=(8, 2))) for _ in "ab"]
        >>> K = KFACLinearOperator(model, MSELoss(), params, [first], check_deterministic=False)
        >>> A0 = K.input_factors["0"]
        >>> A1 = KFACLinearOperator(model, MSELoss(), params, [second]).input_factors["0"]
        >>> bool(np.allclose(K.update(second, decay=0.9).input_factors["0"], 0.9 * A0 + 0.1 * A1))
        True
        """
        factors, _, _ = self._averaged_factors(batch, decay, params)
        self._set_factors(factors)
        return self

    def state_dict(self):
        """The operator's state as plain NumPy arrays (saved with ``numpy.savez``, no pickle).

        Holds the options, the data count, the update count, the layer layout and
        the factors (``B:i``, ``A:i``, ``exact:i`` for the layer at position ``i``).
        Restore with :meth:`load_state_dict` or :meth:`from_state_dict`, on any backend.

        Returns
        -------
        dict
            ``str`` to NumPy arrays (numbers and strings as 0-d arrays); copies.

        Examples
        --------
        >>> import io
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import MSELoss, nn
        >>> from curvlinops.curvature.kfac import KFACLinearOperator
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> data = [(np.ones((4, 3)), np.zeros((4, 2)))]
        >>> K = KFACLinearOperator(model, MSELoss(), params, data)
        >>> file = io.BytesIO()
        >>> np.savez(file, **K.state_dict())
        >>> _ = file.seek(0)
        >>> state = dict(np.load(file, allow_pickle=False))
        >>> R = KFACLinearOperator.from_state_dict(state, model, MSELoss(), params)
        >>> bool(np.array_equal(R.to_dense(), K.to_dense()))
        True
        """
        return {**self._state_header(), **self._factor_state()}

    def load_state_dict(self, state):
        """Take the factors and counts of a saved state (of an operator of the same layout).

        The arrays are converted to this operator's backend, dtype and device (exact
        for the same dtype); inverse caches are rebuilt from them.

        Parameters
        ----------
        state : dict
            From :meth:`state_dict` (or ``dict(numpy.load(file))``).

        Returns
        -------
        KFACLinearOperator
            ``self``.

        Raises
        ------
        ValueError
            If the state is of another class or its layers differ from this operator's.
        """
        self._load_header(state)
        self._set_factors(self._loaded_factors(state))
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
            The parameters (their backend, dtype and device are the restored
            operator's; later :meth:`update` calls take their factors there).
        comm : optional
            The communicator of later :meth:`update` calls.

        Returns
        -------
        KFACLinearOperator
            Its ``data`` is None: products, inverses and :meth:`update` work, methods
            that iterate over data (``gradient_and_loss``) do not.
        """
        return cls._restore(state, model, loss, params, comm)

    def inverse(self, damping=0.0, **deprecated):
        """Exact ``(K + damping I)^{-1}``, blockwise through the factors' eigendecompositions.

        Like every operator's ``inverse``: the same matrix as
        ``K.damped(damping).inverse()`` and as a dense
        ``inv(K.to_dense() + damping I)``, also under the operator algebra (``(c * K)``,
        block-diagonal and Kronecker operators containing ``K``). The eigendecomposition
        of each factor is computed once and cached (shared with
        :meth:`factored_inverse`), so a new damping costs one pass over the eigenvalues.
        The factored heuristic of Martens & Grosse is :meth:`factored_inverse`.

        Parameters
        ----------
        damping : float
            Any finite number; a negative one is a shift of the spectrum like any other
            (``(c * K).inverse(d)`` with ``c < 0`` needs it), judged by the same
            conditioning rule (:class:`~curvlinops.conditioning`): a shift that makes a
            block singular or too ill-conditioned raises.
        **deprecated
            The keywords of the former ``inverse`` (``exact``, ``heuristic_damping``,
            ``min_damping``) still work with a ``FutureWarning``: ``exact=True`` gives
            this inverse, ``exact=False`` the factored heuristic :meth:`factored_inverse`
            (with ``pi_damping=heuristic_damping``).

        Returns
        -------
        KroneckerFactoredLinearOperator
            With :class:`~curvlinops.linalg.KroneckerEighLinearOperator` blocks (for
            ``damping = 0``: Kronecker products of the factors' inverses).

        Raises
        ------
        ValueError
            If ``damping`` is not finite.
        FactorizationError
            (:class:`~curvlinops.IllConditionedError`) If a block plus ``damping`` is
            beyond what the dtype resolves (the rule of :class:`~curvlinops.conditioning`;
            undamped: each factor on its own), naming the layer, block and factor, the
            condition number and the total damping that suffices.

        Examples
        --------
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import MSELoss, nn
        >>> from curvlinops.curvature.kfac import KFACLinearOperator
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> rng = np.random.default_rng(0)
        >>> data = [(rng.normal(size=(10, 3)), rng.normal(size=(10, 2)))]
        >>> K = KFACLinearOperator(model, MSELoss(), params, data)
        >>> dense = K.to_dense()
        >>> eye = np.eye(K.shape[0])
        >>> bool(np.allclose((2 * K).inverse(0.2).to_dense(), np.linalg.inv(2 * dense + 0.2 * eye)))
        True
        >>> bool(np.allclose(K.inverse(0.1).to_dense(), K.damped(0.1).inverse().to_dense()))
        True
        """
        if deprecated:
            return self._deprecated_inverse(damping, **deprecated)
        return super().inverse(damping)

    def _deprecated_inverse(
        self, damping, *, exact=False, heuristic_damping=False, min_damping=1e-8
    ):
        """The keywords of the former ``inverse``: ``exact=True`` is now plain ``inverse``,
        the factored heuristic (``exact=False``, ``heuristic_damping``) ``factored_inverse``."""
        warnings.warn(
            "KFACLinearOperator.inverse(damping) is now always the exact (K + damping I)^-1; "
            "its keywords exact=, heuristic_damping= and min_damping= are deprecated. Call "
            "inverse(damping) for the exact inverse, or factored_inverse(damping, "
            "pi_damping=..., min_damping=...) for the factored heuristic of Martens & Grosse.",
            FutureWarning,
            stacklevel=3,
        )
        if exact:
            return super().inverse(damping)
        return self.factored_inverse(
            damping, pi_damping=bool(heuristic_damping), min_damping=min_damping
        )

    def factored_inverse(self, damping, *, pi_damping=False, min_damping=1e-8):
        """The factored damped inverse of K-FAC (a heuristic; not ``(K + damping I)^{-1}``).

        Per layer ``(B + d_B I)^{-1} (x) (A + d_A I)^{-1}``:

        - ``pi_damping=False``: ``d_A = d_B = sqrt(damping)``;
        - ``pi_damping=True``: the factored Tikhonov damping of Martens & Grosse (2015,
          section 6.3), ``d_A = pi sqrt(damping)``, ``d_B = sqrt(damping) / pi`` with
          ``pi = sqrt((tr A / dim A) / (tr B / dim B))`` (``pi = 1`` if a trace is not
          positive), both clamped from below by ``min_damping``.

        This is the inverse of ``(B + d_B I) (x) (A + d_A I) = B (x) A + d_A B (x) I +
        d_B I (x) A + d_A d_B I``: the damping is spread over the factors and grows
        with them, a preconditioner that K-FAC optimizers use (it is never more
        expensive to apply than the exact inverse, and it needs no eigendecomposition
        of the full block). It equals the exact inverse only for ``damping = 0``
        without ``pi_damping``. A separate bias block ``B`` is inverted as
        ``(B + damping I)^{-1}`` (``damping`` clamped from below by ``min_damping``
        under ``pi_damping``).

        **When to use which.** :meth:`inverse` is the exact ``(K + damping I)^{-1}``,
        the matrix that ``K.damped(damping).inverse()``, ``(c * K).inverse(c * damping)``
        and a dense ``inv`` give; use it whenever the result must be an inverse of the
        damped curvature (solvers, Laplace posteriors, influence functions, composing
        operators). Use ``factored_inverse`` for the K-FAC optimizer's preconditioner as
        Martens & Grosse define it. The two differ substantially: in the example below
        the factored inverse is 56 % (with pi-damping 53 %) away from the exact one in
        relative Frobenius norm.

        Both use the factors' spectra (computed once per factor and cached; the
        factored inverse needs only the eigenvalues, then a Cholesky inverse of each
        damped factor, unless the eigenvectors are already cached), and both apply
        the conditioning rule of :class:`~curvlinops.conditioning` to the matrices they
        invert: here each damped factor, so that a float32 factor with a
        damping too small for its spectrum is refused (see the last example) instead of
        returning a preconditioner that is off by tens of percent.

        Parameters
        ----------
        damping : float
            ``damping >= 0``.
        pi_damping : bool
            Split the damping between the factors by their traces (see above).
        min_damping : float
            Lower bound of the factor shifts with ``pi_damping`` (``>= 0``).

        Returns
        -------
        KroneckerFactoredLinearOperator
            With blocks :class:`~curvlinops.linalg.KroneckerLinearOperator` of the
            factors' damped inverses.

        Raises
        ------
        ValueError
            If ``damping`` or ``min_damping`` is negative (the factors' shifts are square
            roots of the damping; use :meth:`inverse` for a negative shift) or not finite.
        FactorizationError
            If a damped factor is not positive definite; and
            (:class:`~curvlinops.IllConditionedError`) if its condition number is beyond
            what the dtype resolves, naming the layer and the factor, with the damping
            to pass to ``factored_inverse`` that suffices.

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
        >>> exact = np.linalg.inv(K.to_dense() + 1e-2 * np.eye(K.shape[0]))
        >>> def distance(M):  # relative Frobenius distance to the exact damped inverse
        ...     return float(np.linalg.norm(M.to_dense() - exact) / np.linalg.norm(exact))
        >>> distance(K.inverse(1e-2)) < 1e-12
        True
        >>> round(distance(K.factored_inverse(1e-2)), 2)
        0.56
        >>> round(distance(K.factored_inverse(1e-2, pi_damping=True)), 2)
        0.53

        In float32, a damping too small for a factor's spectrum is refused:

        >>> from curvlinops import IllConditionedError
        >>> X = 10 * rng.normal(size=(2, 3)).astype(np.float32)  # 2 data: A is singular
        >>> params32 = model.init(0, xp=xp, dtype=xp.float32)
        >>> K32 = KFACLinearOperator(model, CrossEntropyLoss(), params32, [(X, np.zeros(2, int))])
        >>> try:
        ...     K32.factored_inverse(1e-12)
        ... except IllConditionedError as err:
        ...     print(str(err)[:73])
        ...     damping = err.suggested_damping
        KFACLinearOperator: The damped output factor B of layer '0' is ill-condit
        >>> K32.factored_inverse(damping).shape
        (31, 31)
        """
        damping = check_damping(damping, negative_reason=_FACTORED_NEGATIVE)
        min_damping = check_damping(min_damping, "min_damping")
        try:
            return self._make_operator(self._factored_blocks(damping, pi_damping, min_damping))
        except FactorizationError as err:  # name the operator before the layer and factor
            raise err.with_context(type(self).__name__) from err

    def _factored_blocks(self, damping, pi_damping, min_damping):
        """The blocks of :meth:`factored_inverse`, layer by layer, in layout order.

        Every damped factor is inverted (or refused) before any block is formed, so that
        a refusal names all refused factors and a damping that suffices for all.
        """
        root = math.sqrt(damping)
        plain = max(damping, min_damping) if pi_damping else damping  # exact and bias blocks
        calls, shapes = [], []  # one call per inverted factor; how they form the blocks
        for layer in self.layers:
            where = f"of layer {layer.name!r}"
            if layer.exact:  # exact blocks: (block + damping I)^{-1}
                for op in self._factor_ops[layer.name]:
                    calls.append(_factor_call(op, plain, f"exact block {where}"))
                    shapes.append(None)
                continue
            pairs = self._factor_ops[layer.name]
            for g, (B_op, A_op) in enumerate(pairs):
                at = f"{where}, group {g}" if len(pairs) > 1 else where
                pi = _pi(A_op, B_op) if pi_damping else 1.0
                shift_A, shift_B = root, root
                if pi_damping:
                    shift_A, shift_B = max(pi * root, min_damping), max(root / pi, min_damping)
                # a factor shifted by scale * sqrt(damping) needs damping (t / scale)^2 for t
                calls.append(_factor_call(B_op, shift_B, f"output factor B {at}", 1 / pi))
                calls.append(_factor_call(A_op, shift_A, f"input factor A {at}", pi))
                shapes.append(layer)
                if layer.bias_index is not None and not self._joint(layer):
                    calls.append(_factor_call(B_op, plain, f"output factor B {at} (bias)"))
                    shapes.append("bias")
        inverses = iter(invert_all(calls))
        blocks = []
        for shape in shapes:
            if shape is None:
                blocks.append(next(inverses))
            elif shape == "bias":
                blocks.append(KroneckerLinearOperator(next(inverses), self._one()))
            else:
                B_inv = next(inverses)
                blocks.append(self._kronecker(shape, B_inv, next(inverses)))
        return blocks


def _factor_call(factor, shift, what, scale=None):
    """``(None, fn)`` for :func:`~curvlinops._backend.conditioning.invert_all`: ``fn``
    inverts the damped factor; ``scale``: its shift is ``scale * sqrt(damping)``."""
    damping_for = None if scale is None else (lambda t: (t / scale) ** 2)
    return None, lambda: _damped_factor_inverse(factor, shift, what, damping_for)


_FACTORED_NEGATIVE = (
    "The factored inverse shifts each Kronecker factor by a square root of the damping, "
    "which needs damping >= 0 (and positive definite damped factors); for a negative "
    "shift of the spectrum use the exact inverse(damping)."
)


def _pi(A, B) -> float:
    """Martens & Grosse's ``pi = sqrt((tr A / dim A) / (tr B / dim B))`` (1 if not positive)."""
    mean_A = float(A.trace()) / A.shape[0]
    mean_B = float(B.trace()) / B.shape[0]
    return math.sqrt(mean_A / mean_B) if mean_A > 0 and mean_B > 0 else 1.0


def _damped_factor_inverse(factor, shift, what, damping_for=None):
    """``(F + shift I)^{-1}`` of a symmetric factor: from its eigendecomposition if
    cached, else from its (cached) eigenvalues and a Cholesky inverse.

    The damped factor must be positive definite and within the conditioning rule of
    :class:`~curvlinops.conditioning` (the factored inverse is a preconditioner);
    ``damping_for`` maps a sufficient shift to the damping the user passes.
    """
    xp = factor.xp
    diagonal = isinstance(factor, DiagonalLinearOperator)
    if diagonal:
        lam, Q = factor.diagonal(), None
    else:
        try:
            # The rule needs the spectrum only: without a cached eigendecomposition
            # (the exact inverse's, EKFAC's), the eigenvalues alone and a Cholesky
            # inverse take about half the time of eigenvectors and Q diag Q^T.
            lam, Q = factor._cached_eigh() or (factor.eigvalsh(), None)
        except FactorizationError as err:
            raise FactorizationError(f"The {what}: {err}") from err
    shifted = lam + shift if shift else lam
    name = f"damped {what}" if shift else what
    check_invertible_spectrum(
        shifted, xp, size=factor.shape[0], what=name, shift=shift, damping_for=damping_for
    )
    if not bool(xp.all(shifted > 0)):
        raise FactorizationError(
            f"The {name} is not positive definite (its smallest eigenvalue is "
            f"{float(xp.min(shifted)):.3g}); the factored inverse needs positive definite "
            "damped factors. Add damping, or use the exact inverse(damping)."
        )
    if diagonal:
        return DiagonalLinearOperator(1.0 / shifted)
    if Q is None:
        A = factor.A
        damped = A + shift * xp.eye(A.shape[0], dtype=A.dtype, device=device(A)) if shift else A
        try:
            inverse = spd_inverse(damped, xp, name=name)
        except FactorizationError as err:
            raise FactorizationError(f"The {what}: {err}") from err
    else:
        inverse = (Q * (1.0 / shifted)[None, :]) @ xp.matrix_transpose(Q)
    return DenseLinearOperator(inverse, symmetric=True)
