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

from .._backend import checked_eigh
from ..linalg import KroneckerEighLinearOperator
from .kronecker_statistics import _KroneckerCurvature, flatten_tap

__all__ = ["EKFACLinearOperator"]

FISHER_TYPES = ("type-2", "mc", "empirical")


class EKFACLinearOperator(_KroneckerCurvature):
    """Eigenvalue-corrected K-FAC: ``Q diag(s) Q^T`` per layer with K-FAC's eigenbasis ``Q``.

    ``Q = Q_B (x) Q_A`` holds the eigenvectors of K-FAC's factors (see
    :class:`~curvlinops.curvature.kfac.KFACLinearOperator` for their definition, the
    ``fisher_type`` and ``kfac_approx`` options and the scalings), and the scalings are
    refitted from the per-item gradients in that basis (a second pass over the data, with
    the same cotangents and Monte-Carlo draws as the first):

    ``s = c sum_t sum_m ((Q_B^T g_t,m) (Q_A^T a_t)^T)^2`` (elementwise),

    computed per batch with three matrix products per layer (``g`` and ``a`` rotated
    separately, then ``(Q_B^T g)^2`` summed over ``m`` contracted with
    ``(Q_A^T a)^2`` over the items). With the type-2 cotangents, ``s`` is the diagonal of
    the exact GGN block in the eigenbasis (without shared axes), so EKFAC is the
    Frobenius-closest matrix diagonal in that basis, and it equals the exact block where
    K-FAC does. Products, exact damped inverse (``diag(1 / (s + d))`` in the eigenbasis),
    trace, log-determinant, diagonal and Frobenius norm come from ``Q_A``, ``Q_B``, ``s``.

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

    Attributes
    ----------
    input_factors, output_factors : dict
        K-FAC's ``A`` and ``B`` per layer name.
    input_eigenvectors, output_eigenvectors : dict
        ``Q_A`` and ``Q_B`` per layer name.
    scalings : dict
        ``s`` of the weight (or joint) block per layer name, shape ``(D_out, D_in)``
        (``(D_out, D_in + 1)`` when joint), ordered like the flattened weight.
    bias_scalings : dict
        ``s`` of a separate bias block, ``(D_out,)``, per layer name that has one.

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
    psd = True  # non-negative eigenvalues (sums of squares) in an orthogonal basis

    def _build(self):
        factors = self._kfac_factors()
        self.input_factors, self.output_factors = {}, {}
        self.input_eigenvectors, self.output_eigenvectors = {}, {}
        bases = []
        for layer, (B, A) in zip(self.layers, factors, strict=True):
            self.output_factors[layer.name], self.input_factors[layer.name] = B, A
            where = f"of layer {layer.name!r}"
            _, Q_B = checked_eigh(B, self.xp, name=f"output factor B {where}")
            _, Q_A = checked_eigh(A, self.xp, name=f"input factor A {where}")
            self.output_eigenvectors[layer.name], self.input_eigenvectors[layer.name] = Q_B, Q_A
            bases.append((Q_B, Q_A))
        weight_sums, bias_sums = self._scaling_sums(bases)
        c = self._normalization()
        self.scalings, self.bias_scalings = {}, {}
        blocks = []
        xp = self.xp
        for layer, (Q_B, Q_A), s_w, s_b in zip(
            self.layers, bases, weight_sums, bias_sums, strict=True
        ):
            self.scalings[layer.name] = c * s_w
            blocks.append(KroneckerEighLinearOperator(xp.reshape(c * s_w, (-1,)), [Q_B, Q_A]))
            if s_b is not None:
                self.bias_scalings[layer.name] = c * s_b
                blocks.append(KroneckerEighLinearOperator(c * s_b, [Q_B]))
        self._operator = self._make_operator(blocks)

    def _scaling_sums(self, bases):
        """Second pass: unnormalized ``sum ((Q_B^T g)(Q_A^T a)^T)^2`` per layer."""
        xp = self.xp
        weight_sums = [None] * len(self.layers)
        bias_sums = [None] * len(self.layers)
        for index, X, y in self._batches():
            taps = self._taps(index, X, y)
            for i, (layer, tap, (Q_B, Q_A)) in enumerate(
                zip(self.layers, taps, bases, strict=True)
            ):
                a, G, M = flatten_tap(tap, self.kfac_approx, xp)
                rotated_g = G @ Q_B
                g2 = xp.sum(xp.reshape(rotated_g * rotated_g, (a.shape[0], M, layer.d_out)), axis=1)
                if self._joint(layer):
                    # [a, 1] Q_A without forming [a, 1]: the last row of Q_A multiplies the one.
                    rotated_a = a @ Q_A[: layer.d_in, :] + Q_A[layer.d_in :, :]
                else:
                    rotated_a = a @ Q_A
                s_w = xp.matrix_transpose(g2) @ (rotated_a * rotated_a)
                weight_sums[i] = _add(weight_sums[i], s_w)
                if layer.bias_index is not None and not self._joint(layer):
                    bias_sums[i] = _add(bias_sums[i], xp.sum(g2, axis=0))
        return weight_sums, bias_sums

    def inverse(self, damping=0.0):
        """Exact ``(E + damping I)^{-1}``: ``Q diag(1 / (s + damping)) Q^T`` per block.

        EKFAC has no factored inverse (its scalings ``s`` are not products of factor
        eigenvalues); this exact one costs the same as a product.

        Raises
        ------
        ValueError
            If ``damping`` is not finite (a negative shift is allowed).
        FactorizationError
            If some ``s + damping`` is zero by the rule of
            :class:`~curvlinops.FactorizationError` (add damping).

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


def _add(total, value):
    return value if total is None else total + value
