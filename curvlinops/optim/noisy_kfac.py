"""Noisy K-FAC (Zhang et al., 2018): natural-gradient VI with a Kronecker-factored posterior.

:class:`NoisyKFAC` is the Bayesian learning rule (Khan & Rue, 2021) with a Gaussian
posterior whose precision is K-FAC's: per layer ``(B (x) A) / tau + delta I`` (exact,
in the factors' eigenbasis) or Zhang et al.'s factored damping
``(B + d_B I) (x) (A + d_A I) / tau``. Each step draws weights from the posterior,
averages the batch's K-FAC factors at them into the moving averages of a
:class:`~curvlinops.KFACLinearOperator` (``update(batch, decay)``), and moves the mean
by the gradient preconditioned with the posterior covariance. Weights are drawn with
the eigendecompositions of the factors (``Q diag(lam^{-1/2}) Q^T`` per block, never a
dense ``P x P`` matrix). :class:`NoisyKFACState` is what it carries.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.curvature``, ``._common``, ``._variational``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .._backend import (
    FactorizationError,
    array_namespace,
    device as array_device,
    from_host,
    host_int,
    host_value,
)
from ..curvature import KFACLinearOperator
from ..linalg import (
    BlockDiagonalLinearOperator,
    DenseLinearOperator,
    DiagonalLinearOperator,
    IdentityLinearOperator,
    KroneckerEighLinearOperator,
    KroneckerLinearOperator,
    ParameterLayoutLinearOperator,
)
from ._common import check_every, load_fields, save_fields
from ._variational import BayesianLearningRule

__all__ = ["NoisyKFAC", "NoisyKFACState"]

PRECISION_FORMS = ("exact", "factored")


@dataclass(frozen=True)
class NoisyKFACState:
    """What :class:`NoisyKFAC` carries between steps.

    Attributes
    ----------
    curvature : KFACLinearOperator
        The factors' moving averages at the weight samples (updated in place by each
        step), with the loss's reduction over the first batch.
    curvature_scale : float
        ``s``: ``s * curvature`` estimates K-FAC of the data set's negative
        log-likelihood ``lbar`` (``num_data`` times the per-datum mean).
    spectra : tuple
        The posterior covariance at the last refresh, per block of the layout:
        ``(eigenvalues, eigenvectors)`` with the eigenvectors one square array per
        Kronecker factor (an int ``n`` for the identity of size ``n``).
    layout : tuple
        The blocks' segments of the flat parameter vector (as
        :class:`~curvlinops.linalg.ParameterLayoutLinearOperator` takes them).
    momentum : array or None
        The moving average of the natural-parameter gradient (with ``beta1 > 0``).
    estimates : int
        Factor estimates averaged so far (the first batch's is one).
    step : int
        Steps taken.
    loss : float or None
        The loss (with its reduction) of the last step's batch, averaged over its weight
        samples.
    covariance, scale : LinearOperator
        The posterior covariance and its symmetric square root, built from the spectra
        (at each refresh and on loading; not saved).
    """

    curvature: object
    curvature_scale: float
    spectra: tuple
    layout: tuple
    momentum: object = None
    estimates: int = 1
    step: int = 0
    loss: float | None = None
    covariance: object = None
    scale: object = None

    def state_dict(self):
        """The state as plain NumPy arrays (for ``numpy.savez``; no pickle).

        Holds the scalars, the momentum, the curvature's state (``curvature/...``) and
        the posterior's spectra and layout at the last refresh (``posterior/...``), so
        that a restored state samples and preconditions exactly as the saved one.

        Returns
        -------
        dict
            ``str`` to NumPy arrays; fields that are None are left out.
        """
        out = save_fields(self, "NoisyKFAC", _SCALARS, ("momentum",))
        out.update({f"curvature/{k}": v for k, v in self.curvature.state_dict().items()})
        out["posterior/blocks"] = host_value(len(self.spectra))
        for i, ((values, vectors), segments) in enumerate(
            zip(self.spectra, self.layout, strict=True)
        ):
            out[f"posterior/values:{i}"] = host_value(values)
            out[f"posterior/factors:{i}"] = host_value(len(vectors))
            for j, Q in enumerate(vectors):
                key = "identity" if isinstance(Q, int) else "vectors"
                out[f"posterior/{key}:{i}:{j}"] = host_value(Q)
            out[f"posterior/layout:{i}"] = host_value([[s, r, c] for s, (r, c) in segments])
        return out


_SCALARS = {"curvature_scale": float, "estimates": int, "step": int, "loss": float}


class NoisyKFAC(BayesianLearningRule):
    """Noisy K-FAC (Zhang et al., 2018): natural-gradient VI with K-FAC's precision.

    The target, the step and the hyperparameters are those of
    :class:`~curvlinops.optim.VOGN` (the Bayesian learning rule for
    ``E_q[lbar] / tau + KL(q || N(0, delta^{-1} I))``), with a Kronecker-factored
    precision instead of a diagonal one. With ``K = B (x) A`` per layer the moving
    average of the batches' K-FAC at the weight samples, scaled to the data set's
    ``N`` points:

    - ``precision_form="exact"``: ``S = (K + damping I) / tau + delta I`` exactly (the
      eigenbasis of ``B (x) A`` with shifted eigenvalues). When K-FAC is exact (a
      single linear layer with squared loss and a joint weight-and-bias block), the
      fixed point is the exact posterior of Bayesian linear regression.
    - ``precision_form="factored"``: Zhang et al.'s ``S = (N / tau) (Bbar + d_B I) (x)
      (A + d_A I)`` with ``Bbar`` the per-datum output factor and ``d_A d_B =
      gamma = (tau delta + damping) / N`` split by Martens & Grosse's ``pi``
      (:meth:`KFACLinearOperator.factored_inverse
      <curvlinops.KFACLinearOperator.factored_inverse>` with ``pi_damping=True``);
      separate bias blocks and exact blocks are shifted exactly. Zhang et al.'s
      ``gamma_in = lambda / (N eta)`` (KL weight ``lambda``, prior variance ``eta``) is
      ``damping=0``, ``tau = lambda``, ``delta = 1 / eta``; their extrinsic
      damping ``gamma_ex`` is ``damping = N gamma_ex``.

    The posterior's eigendecompositions are refreshed every ``inverse_every`` steps
    (Zhang et al.'s ``T_inv``); in between, weights are drawn from and the mean
    preconditioned with the last refresh.

    Parameters
    ----------
    model : curvlinops.models.Model
        A model with layer taps (K-FAC's tier 3).
    loss : curvlinops.losses.Loss
        The negative log-likelihood.
    num_data, learning_rate, prior_precision, beta1, beta2, weight_samples, temperature,
    damping, seed
        As for :class:`~curvlinops.optim.VOGN` (``beta2``: the factors' moving average).
    fisher_type : {"type-2", "mc", "empirical"}
        K-FAC's output factors (:class:`~curvlinops.KFACLinearOperator`): the GGN's
        (exact loss-Hessian factors), the Fisher's from sampled labels (Zhang et al.),
        or the empirical Fisher's.
    precision_form : {"exact", "factored"}
        See above.
    inverse_every : int
        Refresh cadence of the posterior's eigendecompositions (steps).
    separate_weight_and_bias : bool
        K-FAC's blocks (False: one joint block per layer over ``[W | b]``).
    min_damping : float
        Lower bound of the factored shifts (``precision_form="factored"``).

    Examples
    --------
    Bayesian linear regression with one output: K-FAC is exact, and so is the fixed
    point (the mean and the full precision of the exact posterior).

    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import MSELoss, nn
    >>> from curvlinops.optim import NoisyKFAC
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 3))
    >>> y = X @ np.array([[1.0], [-2.0], [0.5]]) + 0.7 * rng.normal(size=(40, 1))
    >>> model = nn.Sequential(nn.Linear(3, 1, bias=False))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> opt = NoisyKFAC(model, MSELoss(), num_data=40, learning_rate=1.0, weight_samples=0)
    >>> state = opt.init(params, (X, y))
    >>> for _ in range(3):
    ...     params, state = opt.step(params, state, (X, y))
    >>> precision = 2 * X.T @ X + np.eye(3)
    >>> q = opt.posterior(params, state)
    >>> bool(np.allclose(q.precision.to_dense(), precision))
    True
    >>> bool(np.allclose(q.flat_mean, np.linalg.solve(precision, 2 * X.T @ y[:, 0])))
    True
    """

    name = "NoisyKFAC"
    state_class = NoisyKFACState

    def __init__(
        self,
        model,
        loss,
        *,
        num_data,
        learning_rate=1e-3,
        prior_precision=1.0,
        beta1=0.0,
        beta2=0.99,
        weight_samples=1,
        temperature=1.0,
        fisher_type="type-2",
        precision_form="exact",
        inverse_every=1,
        separate_weight_and_bias=True,
        damping=0.0,
        min_damping=1e-8,
        seed=0,
    ):
        if fisher_type not in ("type-2", "mc", "empirical"):
            raise ValueError(
                f"fisher_type must be one of ('type-2', 'mc', 'empirical'), got {fisher_type!r}."
            )
        if precision_form not in PRECISION_FORMS:
            raise ValueError(
                f"precision_form must be one of {PRECISION_FORMS}, got {precision_form!r}."
            )
        self.fisher_type, self.precision_form = fisher_type, precision_form
        self.inverse_every = check_every(inverse_every, "inverse_every")
        self.separate_weight_and_bias = bool(separate_weight_and_bias)
        self.min_damping = float(min_damping)
        super().__init__(
            model,
            loss,
            num_data=num_data,
            learning_rate=learning_rate,
            prior_precision=prior_precision,
            beta1=beta1,
            beta2=beta2,
            weight_samples=weight_samples,
            temperature=temperature,
            damping=damping,
            seed=seed,
        )

    def load_state_dict(self, state, params):
        """The state saved by :meth:`NoisyKFACState.state_dict`, to continue from.

        The curvature is restored with :meth:`KFACLinearOperator.from_state_dict
        <curvlinops.KFACLinearOperator.from_state_dict>` (no pass over data), the
        posterior from its saved spectra (nothing is recomputed).

        Parameters
        ----------
        state : dict
            The saved arrays (e.g. ``dict(numpy.load(file, allow_pickle=False))``).
        params : list of arrays
            The current mean: everything is put on its backend, dtype and device.

        Returns
        -------
        NoisyKFACState
            Steps from it continue as the saved run would have (bit for bit on the same
            backend and dtype).

        Examples
        --------
        >>> import io
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import CrossEntropyLoss, nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> rng = np.random.default_rng(0)
        >>> batch = (rng.normal(size=(16, 3)), rng.integers(0, 3, size=16))
        >>> opt = NoisyKFAC(model, CrossEntropyLoss(), num_data=160, learning_rate=0.1,
        ...                 inverse_every=2)
        >>> state = opt.init(params, batch)
        >>> for _ in range(3):
        ...     params, state = opt.step(params, state, batch)
        >>> file = io.BytesIO()
        >>> np.savez(file, **state.state_dict())
        >>> _ = file.seek(0)
        >>> restored = opt.load_state_dict(dict(np.load(file, allow_pickle=False)), params)
        >>> a, _ = opt.step(params, state, batch)
        >>> b, _ = opt.step(params, restored, batch)
        >>> all(np.array_equal(u, v) for u, v in zip(a, b))
        True
        """
        fields = load_fields(state, "NoisyKFAC", _SCALARS, ("momentum",), params)
        curvature = {
            k[len("curvature/") :]: v for k, v in state.items() if k.startswith("curvature/")
        }
        K = KFACLinearOperator.from_state_dict(curvature, self.model, self.loss, params)
        reference = params[0]
        xp, dtype, dev = array_namespace(reference), reference.dtype, array_device(reference)
        spectra, layout = [], []
        for i in range(host_int(state["posterior/blocks"])):
            values = from_host(state[f"posterior/values:{i}"], xp, dtype, dev)
            vectors = []
            for j in range(host_int(state[f"posterior/factors:{i}"])):
                if f"posterior/identity:{i}:{j}" in state:
                    vectors.append(host_int(state[f"posterior/identity:{i}:{j}"]))
                else:
                    vectors.append(from_host(state[f"posterior/vectors:{i}:{j}"], xp, dtype, dev))
            spectra.append((values, tuple(vectors)))
            segments = state[f"posterior/layout:{i}"].tolist()
            layout.append(tuple((int(s), (int(r), int(c))) for s, r, c in segments))
        spectra, layout = tuple(spectra), tuple(layout)
        return NoisyKFACState(
            curvature=K, spectra=spectra, layout=layout, **fields, **_operators(spectra, layout)
        )

    def _new_curvature(self, params, batch):
        return KFACLinearOperator(
            self.model,
            self.loss,
            params,
            [batch],
            fisher_type=self.fisher_type,
            separate_weight_and_bias=self.separate_weight_and_bias,
            seed=self.seed,
            num_data=int(batch[0].shape[0]),
            check_deterministic=False,
        )

    def _first_state(self, params, curvature, scale):
        spectra, layout = self._spectra(curvature, scale)
        return NoisyKFACState(
            curvature=curvature,
            curvature_scale=scale,
            spectra=spectra,
            layout=layout,
            **_operators(spectra, layout),
        )

    def _refreshed(self, state, step):
        if step % self.inverse_every != 0:
            return state
        spectra, layout = self._spectra(state.curvature, state.curvature_scale)
        return replace(state, spectra=spectra, layout=layout, **_operators(spectra, layout))

    def _spectra(self, K, scale):
        """The covariance's eigendecomposition per block, ``(tau / s) (K + shift I)^{-1}``
        (or the factored inverse), and the blocks' layout."""
        shift = self._precision_shift(scale)
        try:
            if self.precision_form == "exact":
                inverse = K.inverse(shift)
            else:
                inverse = K.factored_inverse(shift, pi_damping=True, min_damping=self.min_damping)
        except FactorizationError as err:
            # K's shift is (tau delta + damping) / s: a suggested shift t needs
            # tau delta + damping >= s t
            raise err.with_context(
                "NoisyKFAC: the posterior covariance is refused (raise prior_precision or "
                "damping: the error's suggested_damping is the tau * prior_precision + "
                "damping that suffices)",
                damping_scale=scale,
            ) from err
        factor = self.temperature / scale
        spectra = []
        for name, block in zip(inverse.names, inverse.operator.blocks, strict=True):
            values, vectors = _block_spectrum(block)
            if not bool(array_namespace(values).all(values > 0)):
                raise FactorizationError(
                    f"NoisyKFAC: the posterior covariance of the {name} is not positive "
                    "definite; increase prior_precision or damping."
                )
            spectra.append((factor * values, tuple(_row_major(Q) for Q in vectors)))
        layout = tuple(tuple((s, (r, c)) for s, r, c in block) for block in inverse.blocks)
        return tuple(spectra), layout

    def _precision(self, state):
        """Eigenvalues ``1 / lam`` in each block's Kronecker eigenbasis."""
        return _spectral_operator(state.spectra, state.layout, lambda v: 1.0 / v)

    def _covariance(self, state):
        return state.covariance

    def _scale(self, state):
        return state.scale

    def _advanced(self, state, **fields):
        return replace(state, **fields)


def _spectral_operator(spectra, layout, transform):
    """The flat-parameter operator with eigenvalues ``transform(lam)`` per block."""
    blocks = [KroneckerEighLinearOperator(transform(v), Q) for v, Q in spectra]
    return ParameterLayoutLinearOperator(BlockDiagonalLinearOperator(blocks), layout, psd=True)


def _operators(spectra, layout):
    """The covariance (eigenvalues ``lam``) and its square root (``lam^{1/2}``)."""
    xp = array_namespace(spectra[0][0])
    return {
        "covariance": _spectral_operator(spectra, layout, lambda v: v),
        "scale": _spectral_operator(spectra, layout, xp.sqrt),
    }


def _row_major(Q):
    """``Q`` with C-order strides (an int basis as is).

    ``eigh`` returns column-major eigenvectors (LAPACK's layout) while a restored state
    holds row-major ones, and a matrix product may round differently on the two: the
    same layout makes a resumed run bit-identical. Flattening copies only if needed.
    """
    if isinstance(Q, int):
        return Q
    xp = array_namespace(Q)
    return xp.reshape(xp.reshape(Q, (-1,)), tuple(Q.shape))


def _block_spectrum(block):
    """``(eigenvalues, eigenvector factors)`` of a symmetric block of a K-FAC inverse."""
    if isinstance(block, KroneckerEighLinearOperator):
        return block.eigenvalues, list(block.eigenvectors)
    if isinstance(block, KroneckerLinearOperator):
        pairs = block.factor_eigh()
        xp = block.xp
        values = pairs[0][0]
        for lam, _ in pairs[1:]:
            values = xp.reshape(values[:, None] * lam[None, :], (-1,))
        return values, [Q for _, Q in pairs]
    if isinstance(block, DenseLinearOperator):
        values, Q = block.eigh()
        return values, [Q]
    if isinstance(block, (DiagonalLinearOperator, IdentityLinearOperator)):
        return block.diagonal(), [int(block.shape[0])]
    raise TypeError(f"NoisyKFAC cannot decompose a block of type {type(block).__name__}.")
