"""EKFAC: K-FAC's eigenbasis with re-fitted eigenvalues (George et al., 2018).

:class:`EKFACLinearOperator` computes K-FAC's factors (one pass over the data),
eigendecomposes them, and fits, in a second pass, the diagonal scalings of the
curvature in the Kronecker eigenbasis ``Q = Q_B (x) Q_A``: the second moments of the
per-item gradients expressed in that basis. Of all matrices diagonal in that basis it
is the closest to the curvature block in Frobenius norm, so it is at least as close as
K-FAC (whose eigenvalues are the products ``lam_B lam_A``).

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.losses``, ``._data``, ``.kronecker_factored``, ``.kronecker_statistics``,
``.base``.

EKFAC has no factored inverse: its eigenvalues are not products of factor eigenvalues,
so there is no ``(B + d_B I)^{-1} (x) (A + d_A I)^{-1}`` form; :meth:`inverse` is exact
(``diag(1 / (s + damping))`` in the eigenbasis) and as cheap.
"""

from __future__ import annotations

from .._backend import checked_eigh, host_value
from .._backend.reduction import broadcast_tree, collective_tree_sum
from ..linalg import DenseLinearOperator, KroneckerEighLinearOperator
from .kronecker_statistics import _KroneckerCurvature, flatten_tap, per_group

__all__ = ["EKFACLinearOperator"]

FISHER_TYPES = ("type-2", "mc", "empirical")
#: entries of the rotated per-datum gradients held at once for layers with shared axes
_CHUNK_ENTRIES = 2**24


class EKFACLinearOperator(_KroneckerCurvature):
    """Eigenvalue-corrected K-FAC: ``Q diag(s) Q^T`` per layer with K-FAC's eigenbasis ``Q``.

    ``Q = Q_B (x) Q_A`` holds the eigenvectors of K-FAC's factors (see
    :class:`~curvlinops.curvature.kfac.KFACLinearOperator` for their definition, the
    ``fisher_type`` and ``kfac_approx`` options and the scalings), and the scalings are
    refitted from the per-item gradients in that basis (a second pass over the data, with
    the same cotangents and Monte-Carlo draws as the first; the first pass's last batch
    keeps its taps for it, so one-batch data are linearized once):

    ``s = c sum_t sum_m ((Q_B^T g_t,m) (Q_A^T a_t)^T)^2`` (elementwise),

    computed per batch with three matrix products per layer (``g`` and ``a`` rotated
    separately, then ``(Q_B^T g)^2`` summed over ``m`` contracted with
    ``(Q_A^T a)^2`` over the items). For a layer with shared axes (the pixels of a
    convolution) in a model with outputs ``(N, C)`` (a classifier), each datum's
    gradient is the sum over its positions, ``sum_s (Q_B^T g_n,s,m) (Q_A^T a_n,s)^T``,
    squared after the sum (for ``kfac_approx="expand"`` and ``"reduce"`` alike: the
    option chooses K-FAC's basis). Then ``s`` is the diagonal of the curvature block
    (type-2: the exact GGN block) in the eigenbasis: EKFAC is the Frobenius-closest
    matrix diagonal in that basis, at least as close as K-FAC, and it equals the exact
    block where K-FAC does. With outputs ``(N, S, C)`` (one loss term per position) the
    loss's per-position factors are backpropagated for all positions at once, as in
    K-FAC, and the items of ``kfac_approx`` are used instead (exact where K-FAC is).
    Products,
    exact damped inverse (``diag(1 / (s + d))`` in the eigenbasis), trace,
    log-determinant, diagonal and Frobenius norm come from ``Q_A``, ``Q_B``, ``s``.
    Elementwise layers (batch normalization) keep K-FAC's exact block.

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
    fisher_type : {"type-2", "mc", "empirical"}
        Which output-space cotangents define the curvature (as in K-FAC).
    mc_samples : int
        Sampled labels per datum for ``fisher_type="mc"``.
    kfac_approx : {"expand", "reduce"}
        Treatment of shared axes, as in K-FAC; with "expand" every position is an item
        with its own rank-one gradient.
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
        Distribute both passes over processes (as for
        :class:`~curvlinops.curvature.kfac.KFACLinearOperator`): one all-reduce adds the
        shards' factor statistics, rank 0's eigenbasis is shared with every rank, a
        second all-reduce adds the scaling sums. See :doc:`/distributed`.

    Attributes
    ----------
    input_factors, output_factors : dict
        K-FAC's ``A`` and ``B`` per layer name.
    input_eigenvectors, output_eigenvectors : dict
        ``Q_A`` and ``Q_B`` per layer name (for an embedding, whose input factor is
        diagonal, ``Q_A`` is the int ``V``: the standard basis, never formed).
    scalings : dict
        ``s`` of the weight (or joint) block per layer name, shape ``(D_out, D_in)``
        (``(D_out, D_in + 1)`` when joint), ordered like the flattened weight; for a
        grouped convolution a stack ``(G, D_out / G, d_in)`` of its groups' (with the
        stacked eigenvectors ``(G, d, d)`` of their factors).
    bias_scalings : dict
        ``s`` of a separate bias block, ``(D_out,)`` (``(G, D_out / G)`` with groups),
        per layer name that has one.
    exact_blocks : dict
        The exact block of each elementwise layer (batch normalization), as in K-FAC:
        its eigenvalues need no correction, so EKFAC keeps it.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import CrossEntropyLoss, GGNLinearOperator, nn
    >>> from curvlinops.curvature.ekfac import EKFACLinearOperator
    >>> from curvlinops.curvature.kfac import KFACLinearOperator
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> rng = np.random.default_rng(0)
    >>> data = [(rng.normal(size=(12, 3)), rng.integers(0, 3, size=12))]
    >>> G = GGNLinearOperator(model, CrossEntropyLoss(), params, data).to_dense()
    >>> E = EKFACLinearOperator(model, CrossEntropyLoss(), params, data).to_dense()
    >>> K = KFACLinearOperator(model, CrossEntropyLoss(), params, data).to_dense()
    >>> bool(np.linalg.norm(E - G) <= np.linalg.norm(K - G))
    True
    """

    fisher_types = FISHER_TYPES
    _retain_taps = True  # the scalings' pass reuses the factors' last batch
    psd = True  # non-negative eigenvalues (sums of squares) in an orthogonal basis

    def _build(self):
        try:
            factors, _ = self._kfac_factors()
            self._set_factor_dicts(factors)
            bases = self._bases(factors)
            weight_sums, bias_sums = self._scaling_sums(bases)
        finally:  # retained taps belong to this build only
            self._retained = None
        c = self._normalization()
        self._set_scalings(
            bases,
            [None if w is None else c * w for w in weight_sums],
            [None if b is None else c * b for b in bias_sums],
        )

    def _set_factor_dicts(self, factors):
        """Store K-FAC's ``B``, ``A`` (and exact blocks) per layer name."""
        self.input_factors, self.output_factors, self.exact_blocks = {}, {}, {}
        for layer, (B, A) in zip(self.layers, factors, strict=True):
            if layer.exact:  # an elementwise layer keeps its exact block (A is None)
                self.exact_blocks[layer.name] = B
            else:
                self.output_factors[layer.name], self.input_factors[layer.name] = B, A

    def _bases(self, factors):
        """``(Q_B, Q_A)`` per layer (None for exact blocks): the factors' eigenvectors.

        Distributed, rank 0 computes them and every rank receives its bits: the scalings
        of all ranks' data must be taken in one basis, and eigenvectors are unique only
        up to signs and rotations within eigenspaces.
        """
        return broadcast_tree(
            self.comm,
            0,
            lambda: self._local_bases(factors),
            xp=self.xp,
            dtype=self.dtype,
            device=self.device,
            what=f"{type(self).__name__} eigenbasis",
        )

    def _local_bases(self, factors):
        bases = []
        for layer, (B, A) in zip(self.layers, factors, strict=True):
            if layer.exact:
                bases.append(None)
                continue
            where = f"of layer {layer.name!r}"
            _, Q_B = checked_eigh(B, self.xp, name=f"output factor B {where}")
            if A.ndim == 1:  # an embedding's diagonal input factor: the standard basis,
                Q_A = int(A.shape[0])  # never formed (the identity of that size)
            else:
                _, Q_A = checked_eigh(A, self.xp, name=f"input factor A {where}")
            bases.append((Q_B, Q_A))
        return bases

    def _set_scalings(self, bases, weight_scalings, bias_scalings):
        """Store the eigenvectors and (normalized) scalings; build the operator."""
        xp = self.xp
        self.input_eigenvectors, self.output_eigenvectors = {}, {}
        self.scalings, self.bias_scalings = {}, {}
        blocks = []
        for layer, basis, s_w, s_b in zip(
            self.layers, bases, weight_scalings, bias_scalings, strict=True
        ):
            if basis is None:
                block = self.exact_blocks[layer.name]
                blocks += [
                    DenseLinearOperator(b, symmetric=True) for b in self._exact_blocks(layer, block)
                ]
                continue
            Q_B, Q_A = basis
            self.output_eigenvectors[layer.name], self.input_eigenvectors[layer.name] = Q_B, Q_A
            self.scalings[layer.name] = s_w
            if s_b is not None:
                self.bias_scalings[layer.name] = s_b
            G = layer.groups
            biases = per_group(s_b, G) if s_b is not None else [None] * G
            for Q_Bg, Q_Ag, s_wg, s_bg in zip(
                per_group(Q_B, G), per_group(Q_A, G), per_group(s_w, G), biases, strict=True
            ):
                if layer.transposed:  # A (x) B on W^T: the scalings transposed
                    s_t = xp.reshape(xp.matrix_transpose(s_wg), (-1,))
                    blocks.append(KroneckerEighLinearOperator(s_t, [Q_Ag, Q_Bg]))
                else:
                    s_flat = xp.reshape(s_wg, (-1,))
                    blocks.append(KroneckerEighLinearOperator(s_flat, [Q_Bg, Q_Ag]))
                if s_bg is not None:
                    blocks.append(KroneckerEighLinearOperator(s_bg, [Q_Bg]))
        self._operator = self._make_operator(blocks)

    def _current_bases(self):
        return [
            None
            if la.exact
            else (self.output_eigenvectors[la.name], self.input_eigenvectors[la.name])
            for la in self.layers
        ]

    def _current_scalings(self):
        weights = [None if la.exact else self.scalings[la.name] for la in self.layers]
        return weights, [self.bias_scalings.get(la.name) for la in self.layers]

    def update(self, batch, decay=0.95, *, params=None, refresh_basis=True):
        """Average one batch into K-FAC's factors and into the scalings (George et al., 2018).

        The factors (and exact blocks) are averaged as in
        :meth:`KFACLinearOperator.update <curvlinops.KFACLinearOperator.update>`:
        ``decay * old + (1 - decay) * batch``, with the same scaling of the batch.
        With ``refresh_basis`` the eigenbasis is recomputed from the averaged factors
        and the old scalings are carried into it as the diagonal, in the new basis, of
        the old operator (``(R_B * R_B) S (R_A * R_A)^T`` with ``R = Q_new^T Q_old``,
        the Frobenius-closest diagonal); without it the basis stays. Then the
        scalings become ``decay * old + (1 - decay) * s_batch`` with ``s_batch`` the
        batch's second moments in the (new) basis. One forward and one backward pass
        (the factor statistics and the scalings share the batch's taps); no
        determinism check, no counting pass.

        Parameters
        ----------
        batch : tuple (X, y)
            One batch on the operator's backend.
        decay : float
            In ``[0, 1]``.
        params : list of arrays, optional
            Take the batch's statistics at these parameters (and keep them).
        refresh_basis : bool
            Recompute the eigenbasis (two eigendecompositions per layer); an optimizer
            does so on a slower cadence than the scalings' updates.

        Returns
        -------
        EKFACLinearOperator
            ``self``, updated in place.

        Examples
        --------
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import MSELoss, nn
        >>> from curvlinops.curvature.ekfac import EKFACLinearOperator
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> rng = np.random.default_rng(0)
        >>> first, second = [(rng.normal(size=(8, 3)), rng.normal(size=(8, 2))) for _ in "ab"]
        >>> E = EKFACLinearOperator(model, MSELoss(), params, [first], check_deterministic=False)
        >>> E1 = EKFACLinearOperator(model, MSELoss(), params, [second])
        >>> bool(np.allclose(E.update(second, decay=0.0).to_dense(), E1.to_dense()))
        True
        """
        try:
            factors, decay, (batches, scale) = self._averaged_factors(batch, decay, params)
            old_bases = self._current_bases()
            old_w, old_b = self._current_scalings()
            self._set_factor_dicts(factors)
            if refresh_basis:
                bases = self._bases(factors)
                old_w, old_b = self._carried_scalings(old_bases, bases, old_w, old_b)
            else:
                bases = old_bases
            batch_w, batch_b = self._scaling_sums(bases, batches)
        finally:  # the batch's retained taps belong to this update only
            self._retained = None
        weights = [_averaged(o, n, decay, scale) for o, n in zip(old_w, batch_w, strict=True)]
        biases = [_averaged(o, n, decay, scale) for o, n in zip(old_b, batch_b, strict=True)]
        self._set_scalings(bases, weights, biases)
        return self

    def _carried_scalings(self, old_bases, bases, weights, biases):
        """The old scalings as the diagonal of the old operator in the new basis."""
        xp = self.xp
        new_w, new_b = [], []
        for old, new, s_w, s_b in zip(old_bases, bases, weights, biases, strict=True):
            if old is None:
                new_w.append(None)
                new_b.append(None)
                continue
            R_B = xp.matrix_transpose(new[0]) @ old[0]
            R_B = R_B * R_B
            if isinstance(new[1], int):  # the standard basis stays
                s = R_B @ s_w
            else:
                R_A = xp.matrix_transpose(new[1]) @ old[1]
                s = R_B @ s_w @ xp.matrix_transpose(R_A * R_A)
            new_w.append(s)
            new_b.append(None if s_b is None else (R_B @ s_b[..., None])[..., 0])
        return new_w, new_b

    def state_dict(self):
        """The operator's state as plain NumPy arrays (``numpy.savez``, no pickle).

        As :meth:`KFACLinearOperator.state_dict <curvlinops.KFACLinearOperator.state_dict>`,
        plus the eigenbasis (``Q_B:i``, ``Q_A:i``; none for an embedding's standard
        basis) and the scalings (``s:i``, ``s_bias:i``), so that a restored operator
        continues bit-identically (no eigendecomposition is recomputed).

        Returns
        -------
        dict
            ``str`` to NumPy arrays; copies.
        """
        state = {**self._state_header(), **self._factor_state()}
        weights, biases = self._current_scalings()
        for i, (basis, s_w, s_b) in enumerate(
            zip(self._current_bases(), weights, biases, strict=True)
        ):
            if basis is None:
                continue
            state[f"Q_B:{i}"], state[f"s:{i}"] = host_value(basis[0]), host_value(s_w)
            if not isinstance(basis[1], int):
                state[f"Q_A:{i}"] = host_value(basis[1])
            if s_b is not None:
                state[f"s_bias:{i}"] = host_value(s_b)
        return state

    def load_state_dict(self, state):
        """Take the factors, eigenbasis, scalings and counts of a saved state.

        Parameters
        ----------
        state : dict
            From :meth:`state_dict`.

        Returns
        -------
        EKFACLinearOperator
            ``self``.

        Raises
        ------
        ValueError
            If the state is of another class or its layers differ from this operator's.
        """
        self._load_header(state)
        factors = self._loaded_factors(state)
        self._set_factor_dicts(factors)
        put = self._from_host
        bases, weights, biases = [], [], []
        for i, (layer, (_, A)) in enumerate(zip(self.layers, factors, strict=True)):
            if layer.exact:
                bases.append(None)
                weights.append(None)
                biases.append(None)
                continue
            Q_A = put(state[f"Q_A:{i}"]) if f"Q_A:{i}" in state else int(A.shape[0])
            bases.append((put(state[f"Q_B:{i}"]), Q_A))
            weights.append(put(state[f"s:{i}"]))
            biases.append(put(state[f"s_bias:{i}"]) if f"s_bias:{i}" in state else None)
        self._set_scalings(bases, weights, biases)
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
            The parameters (their backend, dtype and device are the restored operator's).
        comm : optional
            The communicator of later :meth:`update` calls.

        Returns
        -------
        EKFACLinearOperator
            Its ``data`` is None: products, inverses and :meth:`update` work.
        """
        return cls._restore(state, model, loss, params, comm)

    def _scaling_sums(self, bases, batches=None):
        """Second pass (over the data or ``batches``): unnormalized
        ``sum ((Q_B^T g)(Q_A^T a)^T)^2`` per layer, summed over the processes."""
        sums = collective_tree_sum(
            self.comm,
            lambda: self._local_scaling_sums(bases, batches),
            xp=self.xp,
            dtype=self.dtype,
            device=self.device,
            what=f"{type(self).__name__} pass for the scalings",
        )
        if sums is None:
            raise ValueError("The data contain no batches; EKFAC needs at least one.")
        return sums

    def _local_scaling_sums(self, bases, batches):
        """This process's scaling sums (None without batches)."""
        weight_sums = [None] * len(self.layers)
        bias_sums = [None] * len(self.layers)
        seen = False
        for raw_taps in self._second_pass_taps(batches):
            seen = True
            taps = self._matrix_taps(raw_taps)
            for i, (layer, tap, basis) in enumerate(zip(self.layers, taps, bases, strict=True)):
                if basis is None:  # an exact block: nothing to refit
                    continue
                Q_B, Q_A = basis
                # per-datum gradients where each cotangent column belongs to one datum
                # (outputs (N, C)); with shared output axes a column spans all the
                # positions of a datum, and positions are the items instead
                if tap.inputs.ndim > 2 and len(self._outputs_shape) == 2:
                    s_w, s_b = self._shared_axes_sums(layer, tap, Q_B, Q_A)
                else:
                    s_w, s_b = self._item_sums(layer, tap, Q_B, Q_A)
                weight_sums[i] = _add(weight_sums[i], s_w)
                if s_b is not None:
                    bias_sums[i] = _add(bias_sums[i], s_b)
        return (weight_sums, bias_sums) if seen else None

    def _second_pass_taps(self, batches):
        """The taps of each batch for the scalings: the batch that the factors' pass
        retained first (the same cotangents and draws; not recomputed), then the others."""
        retained, self._retained = self._retained, None
        skip = None
        if retained is not None:
            skip, taps = retained
            del retained
            yield taps
            del taps  # released before the next batch's taps are computed
        for index, X, y in self._batches() if batches is None else batches:
            if index != skip:
                yield self._taps(index, X, y)

    def _item_sums(self, layer, tap, Q_B, Q_A):
        """Sums for a layer without shared axes: an item is a datum, gradients rank one.

        For a grouped layer every array has a leading group axis (batched products).
        """
        xp = self.xp
        a, G, M = flatten_tap(tap, self.kfac_approx, xp)  # (G,) (T, d_in), (T * M, d_out)
        rotated_g = G @ Q_B
        lead, T = tuple(a.shape[:-2]), a.shape[-2]
        g2 = xp.sum(xp.reshape(rotated_g * rotated_g, lead + (T, M, layer.d_out)), axis=-2)
        rotated_a = _rotated_inputs(a, Q_A, self._joint(layer), layer.d_in)
        s_w = xp.matrix_transpose(g2) @ (rotated_a * rotated_a)
        separate_bias = layer.bias_index is not None and not self._joint(layer)
        return s_w, (xp.sum(g2, axis=-2) if separate_bias else None)

    def _shared_axes_sums(self, layer, tap, Q_B, Q_A):
        """Sums from each datum's gradient ``sum_s g_s a_s^T`` rotated into the eigenbasis.

        With shared axes (positions, pixels) a datum's gradient is a sum of rank-one
        terms, rotated as ``sum_s (Q_B^T g_s) (Q_A^T a_s)^T``: one batched matrix
        product per layer, in chunks of data that bound its memory. A grouped layer's
        groups go through the same products as a batch axis ``G`` (``G = 1`` for a
        layer without groups, dropped at the end).
        """
        xp = self.xp
        a, g = tap.inputs, tap.output_grads
        N, M = a.shape[0], g.shape[-1]
        G, d_in, d_out = layer.groups, layer.d_in, layer.d_out
        # (n, G, S, d_in) and (n, M, G, S, d_out): each group's own columns
        a = xp.permute_dims(xp.reshape(a, (N, -1, G, d_in)), (0, 2, 1, 3))
        g = xp.permute_dims(xp.reshape(g, (N, -1, G, d_out, M)), (0, 4, 2, 1, 3))
        S = a.shape[2]
        Q_B = xp.reshape(Q_B, (G, d_out, d_out))
        if not isinstance(Q_A, int):
            Q_A = xp.reshape(Q_A, (G, Q_A.shape[-2], Q_A.shape[-1]))
        joint = self._joint(layer)
        rotated_inputs = Q_A if isinstance(Q_A, int) else Q_A.shape[-1]
        per_datum = M * G * d_out * (rotated_inputs + S)
        chunk = max(1, _CHUNK_ENTRIES // per_datum)
        s_w = s_b = None
        for start in range(0, N, chunk):  # chunks of data bound the memory, not a loop per datum
            stop = min(start + chunk, N)  # (the standard takes no slice past the end)
            ra = _rotated_inputs(a[start:stop, ...], Q_A, joint, d_in)  # (n, G, S, D_A)
            rg = g[start:stop, ...] @ Q_B  # (n, M, G, S, D_B)
            rotated = xp.matrix_transpose(rg) @ ra[:, None, ...]  # (n, M, G, D_B, D_A)
            s_w = _add(s_w, xp.sum(rotated * rotated, axis=(0, 1)))
            if layer.bias_index is not None and not joint:
                rb = xp.sum(rg, axis=-2)  # (n, M, G, D_B)
                s_b = _add(s_b, xp.sum(rb * rb, axis=(0, 1)))
        if G == 1:
            return s_w[0, ...], None if s_b is None else s_b[0, ...]
        return s_w, s_b

    def inverse(self, damping=0.0):
        """Exact ``(E + damping I)^{-1}``: ``Q diag(1 / (s + damping)) Q^T`` per block.

        EKFAC has no factored inverse (its scalings ``s`` are not products of factor
        eigenvalues); this exact one costs the same as a product.

        Raises
        ------
        ValueError
            If ``damping`` is not finite (a negative shift is allowed).
        FactorizationError
            (:class:`~curvlinops.IllConditionedError`) If the condition number of some
            block's ``s + damping`` is beyond what the dtype resolves (the rule of
            :class:`~curvlinops.conditioning`), naming the block, the condition number and
            the damping that suffices.

        Examples
        --------
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import MSELoss, nn
        >>> from curvlinops.curvature.ekfac import EKFACLinearOperator
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> data = [(np.random.default_rng(0).normal(size=(5, 2)), np.zeros((5, 2)))]
        >>> E = EKFACLinearOperator(model, MSELoss(), params, data)
        >>> dense = E.to_dense()
        >>> bool(np.allclose(E.inverse(0.5).to_dense(), np.linalg.inv(dense + 0.5 * np.eye(6))))
        True
        """
        return super().inverse(damping)


def _rotated_inputs(a, Q_A, joint, d_in):
    """``a Q_A`` (or ``[a, 1] Q_A`` without forming ``[a, 1]``: the last row of ``Q_A``
    multiplies the one); an int ``Q_A`` is the identity (an embedding's basis)."""
    if isinstance(Q_A, int):
        return a
    if joint:  # (for stacks of groups too)
        return a @ Q_A[..., :d_in, :] + Q_A[..., d_in:, :]
    return a @ Q_A


def _averaged(old, batch_sum, decay, scale):
    """``decay old + (1 - decay) scale batch_sum`` (None where a layer has none)."""
    if old is None:
        return None
    return decay * old + (1.0 - decay) * (scale * batch_sum)


def _add(total, value):
    return value if total is None else total + value
