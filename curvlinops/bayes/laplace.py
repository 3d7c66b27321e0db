"""The Laplace approximation of a model's posterior, its evidence and its predictive.

What lives here: :class:`Laplace`. At the MAP parameters ``theta`` of a model trained
with a negative log-likelihood ``L`` and a Gaussian prior ``N(mu_0, diag(delta)^{-1})``,
the posterior is approximated by ``N(theta, (s H + diag(delta))^{-1})``, with ``H`` the
Hessian, GGN or empirical Fisher of the summed loss in one of the structures of
:mod:`._structures` and ``s`` the factor that makes ``s * loss`` the negative
log-likelihood (``1`` for the classification losses, ``1 / (2 sigma^2)`` for
:class:`~curvlinops.MSELoss` with observation noise ``sigma``). The class offers the
posterior (:class:`~curvlinops.bayes.GaussianPosterior`: covariance, samples), the
Laplace log marginal likelihood and the tuning of the prior precision by maximizing it
(:meth:`Laplace.optimize_prior_precision`), and the linearized predictive.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.losses``, ``curvlinops.curvature``, ``._structures``, ``._tuning``,
``.posterior``, ``.predictive``.
"""

from __future__ import annotations

import math
import numbers

from ..curvature._data import check_params_backend, iterate_batches
from ..losses import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss, as_loss
from ..models import ParameterSubsetModel, Tier, as_model, flatten_params
from ._structures import MAX_FULL, Prior, fit_structure
from ._tuning import maximize_evidence
from .posterior import GaussianPosterior
from .predictive import (
    glm_predictive_moments,
    mc_predictive,
    probit_predictive,
    regression_predictive,
)

__all__ = ["Laplace"]

_LIKELIHOODS = {
    CrossEntropyLoss: "classification",
    BCEWithLogitsLoss: "binary",
    MSELoss: "regression",
}


class Laplace:
    """Laplace approximation ``N(theta, (s H + diag(delta))^{-1})`` at the MAP ``theta``.

    Parameters
    ----------
    model : curvlinops.models.Model or torch.nn.Module
        The model (any frontend; a ``torch.nn.Module`` with ``params`` its parameters).
    loss : curvlinops.losses.Loss or a PyTorch loss
        :class:`~curvlinops.CrossEntropyLoss` (categorical likelihood),
        :class:`~curvlinops.BCEWithLogitsLoss` (independent Bernoulli outputs) or
        :class:`~curvlinops.MSELoss` (Gaussian with noise ``sigma_noise``). Its
        reduction does not matter: the likelihood is the sum over the data.
    params : list of arrays
        The MAP parameters.
    data : iterable of (X, y)
        The training data (re-iterable batches).
    structure : {"kron", "full", "diag", "ekfac", "lowrank", "diag_lowrank"}
        The structure of ``H``: K-FAC (one Kronecker-factored block per parameter
        array), dense (``P`` at most ``max_full``), its diagonal, EKFAC, its top
        ``rank`` eigenpairs (``low_rank_method`` "lanczos" or "nystrom"), or those plus
        the exact diagonal of the rest (default "nystrom").
    curvature : {"ggn", "hessian", "ef"}
        Generalized Gauss-Newton, Hessian or empirical Fisher. ``"hessian"`` with
        ``"kron"`` is the Kronecker-factored Hessian; ``"ekfac"`` has no Hessian
        variant.
    prior_precision : float, sequence or array
        ``delta``: a scalar, one value per parameter array (laplace-torch's "layerwise"
        prior), or one per parameter (not with "kron"/"ekfac").
    prior_mean : float or array
        ``mu_0``: a scalar or ``(P,)``.
    sigma_noise : float
        The observation noise of a regression (:class:`~curvlinops.MSELoss`) likelihood.
    subset : None, "last_layer" or sequence of int
        The parameters the posterior is over: all, those of the last layer with layer
        taps, or the arrays at these positions of ``params``; the others are held at
        their values (:class:`~curvlinops.ParameterSubsetModel`).
    rank : int, optional
        Number of eigenpairs of the low-rank structures.
    low_rank_method : {"lanczos", "nystrom"}, optional
    seed : int
        Seed of the Lanczos start, the Nystrom sketch and Monte-Carlo curvature.
    num_data : int, optional
        Number of data points (skips the counting; the pass for the log-likelihood
        runs anyway).
    check_deterministic : bool
        Passed to the curvature operator.
    max_full : int
        The largest ``P`` that ``structure="full"`` materializes.
    **curvature_options
        Passed to the curvature operator (e.g. ``kfac_approx``, ``mc_samples``,
        ``cache``).

    Attributes
    ----------
    model : Model
        The model over the posterior's parameters (a subset model for ``subset``).
    params : list of arrays
        The MAP values of those parameters.
    mean : array
        ``theta`` flattened, ``(P,)``.
    likelihood : str
        ``"classification"``, ``"binary"`` or ``"regression"``.
    num_data : int

    Notes
    -----
    Every structure gives the posterior precision with an exact inverse and
    log-determinant: per K-FAC block ``s (B (x) A) + delta I`` through the factors'
    eigendecompositions, a low-rank part plus a per-array prior through the Woodbury
    identity. The log marginal likelihood is

    ``log p(D | theta) - 1/2 (theta - mu_0)^T diag(delta) (theta - mu_0)
    + 1/2 log det diag(delta) - 1/2 log det(s H + diag(delta))``,

    with ``log p(D | theta)`` the full log-likelihood (for regression including
    ``-N C/2 log(2 pi sigma^2)``).

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import CrossEntropyLoss, nn
    >>> from curvlinops.bayes import Laplace
    >>> model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> rng = np.random.default_rng(0)
    >>> data = [(rng.normal(size=(40, 2)), rng.integers(0, 3, size=40))]
    >>> la = Laplace(model, CrossEntropyLoss(), params, data, structure="kron")
    >>> la.num_params
    51
    >>> delta = la.optimize_prior_precision()
    >>> bool(la.log_marginal_likelihood() >= la.log_marginal_likelihood(2 * delta))
    True
    >>> probs = la.predictive(rng.normal(size=(5, 2)))
    >>> probs.shape, bool(np.allclose(probs.sum(axis=1), 1.0))
    ((5, 3), True)
    """

    def __init__(
        self,
        model,
        loss,
        params,
        data,
        *,
        structure="kron",
        curvature="ggn",
        prior_precision=1.0,
        prior_mean=0.0,
        sigma_noise=1.0,
        subset=None,
        rank=None,
        low_rank_method=None,
        seed=0,
        num_data=None,
        check_deterministic=True,
        max_full=MAX_FULL,
        **curvature_options,
    ):
        model, params = as_model(model, params)
        loss = as_loss(loss)
        self.likelihood = _likelihood_of(loss)
        self.xp, self.dtype, self.device = check_params_backend(params)
        self.model, self.params = _restricted(model, list(params), subset, data)
        self.mean = flatten_params(self.params)
        self._sizes = [math.prod(p.shape) for p in self.params]
        # the cheap arguments first: a wrong one fails before the curvature is computed
        self._structure = None
        self.sigma_noise = sigma_noise
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean
        self._sum_loss = type(loss)(reduction="sum")
        self._sum_value, self._num_outputs, counted = self._data_pass(data)
        self.num_data = counted if num_data is None else int(num_data)
        self.structure, self.curvature = structure, curvature
        settings = {
            "num_data": self.num_data,
            "check_deterministic": check_deterministic,
            "seed": seed,
            "rank": rank,
            "low_rank_method": low_rank_method,
            "max_full": max_full,
        }
        self._structure = fit_structure(
            structure,
            curvature,
            self.model,
            self._sum_loss,
            self.params,
            data,
            settings=settings,
            options=curvature_options,
        )
        self._structure.check_prior(self._prior)

    # -- setup ----------------------------------------------------------------------

    def _data_pass(self, data):
        """The summed loss, the number of output entries and of data points (one pass)."""
        total, outputs, count = 0.0, 0, 0
        for _, X, y in iterate_batches(data, self.xp, params=self.params):
            f = self.model(self.params, X)
            total += float(self._sum_loss.sum_value(f, y))
            outputs += math.prod(f.shape)
            count += int(f.shape[0])
        if count == 0:
            raise ValueError("Laplace got data without batches; pass (X, y) batches.")
        return total, outputs, count

    @property
    def num_params(self) -> int:
        """``P``: the number of parameters the posterior is over."""
        return int(self.mean.shape[0])

    @property
    def prior_precision(self):
        """``delta``: a tuple with one value per parameter array, or a ``(P,)`` array."""
        return self._prior.values()

    @prior_precision.setter
    def prior_precision(self, value):
        self._prior = self._prior_for(value)

    @property
    def prior_mean(self):
        """``mu_0``, ``(P,)``."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value):
        xp = self.xp
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            self._prior_mean = xp.full(
                (self.num_params,), float(value), dtype=self.dtype, device=self.device
            )
            return
        shape = getattr(value, "shape", None)
        if shape is None or tuple(shape) != (self.num_params,):
            found = type(value).__name__ if shape is None else f"shape {tuple(shape)}"
            raise ValueError(
                f"prior_mean must be a scalar or an array of shape ({self.num_params},), got "
                f"{found}."
            )
        self._prior_mean = value

    @property
    def sigma_noise(self) -> float:
        """The observation noise's standard deviation (regression; 1 otherwise)."""
        return self._sigma

    @sigma_noise.setter
    def sigma_noise(self, value):
        sigma = float(value)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma_noise must be positive and finite, got {value}.")
        if sigma != 1.0 and self.likelihood != "regression":
            raise ValueError(
                f"sigma_noise is the observation noise of a regression (MSELoss) likelihood; "
                f"this Laplace approximation has a {self.likelihood} likelihood."
            )
        self._sigma = sigma

    @property
    def _scale(self) -> float:
        """``s``: the negative log-likelihood is ``s`` times the summed loss."""
        if self.likelihood == "regression":  # MSELoss is sum (f - y)^2 = 2 sigma^2 NLL
            return 1.0 / (2.0 * self._sigma**2)
        return 1.0

    # -- the posterior ----------------------------------------------------------------

    @property
    def precision(self):
        """The posterior precision ``s H + diag(delta)`` (a structured operator)."""
        return self.posterior.precision

    @property
    def posterior(self) -> GaussianPosterior:
        """The posterior ``N(mean, precision^{-1})`` (covariance, samples).

        Kept until the prior, its mean or the noise change, so that its covariance (the
        precision's inverse) and covariance factor are formed once.
        """
        key = (self._prior, self._sigma)
        cached = getattr(self, "_posterior", None)
        if cached is None or cached[0] != key:
            precision = self._structure.precision(self._scale, self._prior)
            cached = (key, GaussianPosterior(self.mean, precision))
            self._posterior = cached
        return cached[1]

    @property
    def covariance(self):
        """The posterior covariance, the precision's exact inverse."""
        return self.posterior.covariance

    def sample(self, num_samples, seed=0):
        """Posterior samples of the flat parameters, ``(num_samples, P)``."""
        return self.posterior.sample(num_samples, seed=seed)

    # -- evidence ---------------------------------------------------------------------

    @property
    def log_likelihood(self) -> float:
        """``log p(D | theta)`` at the MAP, with the likelihood's normalization."""
        nll = self._scale * self._sum_value
        if self.likelihood == "regression":
            nll += 0.5 * self._num_outputs * math.log(2.0 * math.pi * self._sigma**2)
        return -nll

    def log_det_ratio(self, prior_precision=None):
        """``log det(s H + diag(delta)) - log det diag(delta)`` (a float)."""
        return self._log_det_ratio(self._prior_for(prior_precision))

    def _log_det_ratio(self, prior):
        return self._log_det_precision(prior) - prior.log_det(self.xp)

    def _prior_for(self, prior_precision):
        if prior_precision is None:
            return self._prior
        prior = Prior(prior_precision, self._sizes, self.xp, self.dtype, self.device)
        if self._structure is not None:
            self._structure.check_prior(prior)
        return prior

    def _log_det_precision(self, prior):
        return self._structure.evidence_terms(self._scale, prior).logdet

    def _scatter(self, prior):
        xp = self.xp
        diff = self.mean - self.prior_mean
        return float(xp.sum(prior.diagonal * diff * diff))

    def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None):
        """The Laplace approximation of ``log p(D)`` (a float).

        Parameters
        ----------
        prior_precision, sigma_noise : optional
            Evaluate at these instead of the current values (which stay unchanged).
        """
        if sigma_noise is not None:
            saved = self._sigma
            self.sigma_noise = sigma_noise
            try:
                return self.log_marginal_likelihood(prior_precision)
            finally:
                self._sigma = saved
        return self._log_marginal(self._prior_for(prior_precision))

    def _log_marginal(self, prior):
        return self.log_likelihood - 0.5 * (self._log_det_ratio(prior) + self._scatter(prior))

    def optimize_prior_precision(self, mode="scalar", *, max_iterations=100, tol=1e-10):
        """Tune ``delta`` to maximize the log marginal likelihood; set and return it.

        Over one precision for all parameters (``"scalar"``) or one per parameter array
        (``"layerwise"``), by Newton's method in ``log delta`` with exact first and second
        derivatives (the traces of the posterior covariance over each group and the
        squared norms of its blocks between groups, from the structure: its spectrum per
        block for K-FAC, EKFAC and the diagonal, an eigendecomposition for the dense one,
        the Woodbury identity for the low-rank ones), falling back to MacKay's fixed
        point ``delta_g <- gamma_g / ||theta_g - mu_0,g||^2`` (``gamma_g = n_g - delta_g
        tr_g(Sigma)``, the group's effective number of parameters) where the Hessian is
        not negative definite, and halving each step until the evidence does not
        decrease. It stops when ``log delta`` changes by less than ``tol``; at the
        maximum ``delta_g ||theta_g - mu_0,g||^2 = gamma_g`` for every group.

        Parameters
        ----------
        mode : {"scalar", "layerwise"}
        max_iterations : int
        tol : float

        Returns
        -------
        float or tuple of float
            The tuned precision (a float for "scalar", one per array for "layerwise").

        Raises
        ------
        ValueError
            If a group's parameters equal the prior mean (the evidence grows without
            bound in ``delta``), or the iteration does not converge.
        """
        if mode not in ("scalar", "layerwise"):
            raise ValueError(f"mode must be 'scalar' or 'layerwise', got {mode!r}.")
        arrays = list(range(len(self._sizes)))
        groups = [arrays] if mode == "scalar" else [[i] for i in arrays]
        squares = self._group_squares(groups)
        counts = [sum(self._sizes[i] for i in g) for g in groups]
        start = [math.log(v) for v in self._initial_values(groups)]

        def terms_at(log_delta):
            prior = self._prior_for(self._per_array(groups, log_delta))
            terms = self._structure.evidence_terms(self._scale, prior, per_array=len(groups) > 1)
            if terms.traces is None:  # totals only (a scalar prior): the one group
                return terms.logdet, [terms.total_trace], [[terms.total_coupling]]
            traces = [terms.trace(g) for g in groups]
            coupling = [[terms.block_coupling(g, h) for h in groups] for g in groups]
            return terms.logdet, traces, coupling

        log_delta, _ = maximize_evidence(
            terms_at, start, squares, counts, max_iterations=max_iterations, tol=tol
        )
        self.prior_precision = self._per_array(groups, log_delta)
        values = [math.exp(v) for v in log_delta]
        return values[0] if mode == "scalar" else tuple(values)

    def _initial_values(self, groups):
        prior = self._prior
        if prior.per_array is not None:
            return [prior.per_array[g[0]] for g in groups]
        return [float(self.xp.mean(prior.diagonal))] * len(groups)

    def _group_squares(self, groups):
        xp, diff = self.xp, self.mean - self.prior_mean
        starts = [0]
        for n in self._sizes:
            starts.append(starts[-1] + n)
        out = []
        for g in groups:
            q = sum(float(xp.sum(diff[starts[i] : starts[i + 1]] ** 2)) for i in g)
            if not q > 0:
                raise ValueError(
                    f"The parameters {g} equal the prior mean: the marginal likelihood grows "
                    "without bound in their prior precision. Tune another grouping, or fix "
                    "their precision."
                )
            out.append(q)
        return out

    def _per_array(self, groups, log_delta):
        values = [0.0] * len(self._sizes)
        for g, ld in zip(groups, log_delta, strict=True):
            for i in g:
                values[i] = math.exp(ld)
        return values

    # -- predictive -------------------------------------------------------------------

    def functional_variance(self, X, *, batch_size=None):
        """The linearized outputs' mean ``(N, C)`` and covariance ``(N, C, C)`` at ``X``.

        ``J Sigma J^T`` per test point. For models of Linear layers without shared axes
        and every structure but the dense one it comes from the layer taps without
        forming the Jacobians (``batch_size`` test points per pass, default 1024): a
        layer's Jacobian is ``g a^T``, so K-FAC's and EKFAC's blocks act on it in their
        eigenbases and a diagonal entrywise, and a low-rank part adds one
        Jacobian-vector product with its ``rank`` columns. Otherwise from
        :func:`~curvlinops.bayes.glm_predictive_moments`.
        """
        fast = getattr(self._structure, "output_covariance", None)
        if fast is not None:
            moments = self._tap_moments(fast, X, 1024 if batch_size is None else batch_size)
            if moments is not None:
                return moments
        return glm_predictive_moments(
            self.model, self.params, X, self.covariance, batch_size=batch_size
        )

    def _tap_moments(self, output_covariance, X, batch_size):
        xp, N = self.xp, int(X.shape[0])
        means, covariances = [], []
        for start in range(0, N, batch_size):  # batches of test points, one pass each
            lin = self.model.linearize(self.params, X[start : min(start + batch_size, N), ...])
            cov = output_covariance(self._scale, self._prior, lin)
            if cov is None:
                return None
            means.append(lin.outputs)
            covariances.append(cov)
        if len(means) == 1:
            return means[0], covariances[0]
        return xp.concat(means, axis=0), xp.concat(covariances, axis=0)

    def predictive(self, X, *, link_approx="probit", num_samples=1000, seed=0, batch_size=None):
        """The linearized (GLM) predictive at test inputs ``X``.

        Parameters
        ----------
        X : array
            Test inputs.
        link_approx : {"probit", "mc"}
            For classification: the probit approximation or ``num_samples`` Monte-Carlo
            draws of the outputs (ignored for regression).
        num_samples : int
        seed : int or generator
        batch_size : int, optional
            Test points per pass (default: as many as keep their Jacobians within
            ``2**24`` entries).

        Returns
        -------
        array or tuple
            Class probabilities ``(N, C)``; for regression the predictive mean ``(N, C)``
            and covariance ``(N, C, C)``, observation noise included.
        """
        mean, cov = self.functional_variance(X, batch_size=batch_size)
        if self.likelihood == "regression":
            return regression_predictive(mean, cov, self._sigma)
        if link_approx == "probit":
            return probit_predictive(mean, cov, self.likelihood)
        if link_approx == "mc":
            return mc_predictive(mean, cov, self.likelihood, num_samples=num_samples, seed=seed)
        raise ValueError(f"link_approx must be 'probit' or 'mc', got {link_approx!r}.")


def _likelihood_of(loss):
    for cls, name in _LIKELIHOODS.items():
        if type(loss) is cls:
            return name
    raise ValueError(
        f"Laplace needs a likelihood: CrossEntropyLoss (categorical), BCEWithLogitsLoss "
        f"(Bernoulli) or MSELoss (Gaussian, with sigma_noise); got {type(loss).__name__}."
    )


def _restricted(model, params, subset, data):
    """``(model, params)`` over the chosen parameters."""
    if subset is None:
        return model, params
    if isinstance(subset, str):
        if subset != "last_layer":
            raise ValueError(
                f"subset must be None, 'last_layer' or a sequence of parameter positions, got "
                f"{subset!r}."
            )
        subset = _last_layer(model, params, data)
    sub = ParameterSubsetModel(model, params, subset)
    return sub, [params[i] for i in sub.indices]


def _last_layer(model, params, data):
    if not model.has_tier(Tier.LAYER_TAPS):
        raise ValueError(
            f"subset='last_layer' finds the last layer from the layer taps, which the model "
            f"{model.name} does not offer; pass the positions of its parameters instead "
            f"(e.g. subset=[{len(params) - 2}, {len(params) - 1}])."
        )
    X = next(iter(data))[0]
    taps = model.linearize(params, X).layer_taps(None)
    if not taps:
        raise ValueError(f"The model {model.name} has no tapped layer; pass subset= positions.")
    last = max(taps, key=lambda tap: tap.weight_index)
    return [last.weight_index] + ([last.bias_index] if last.bias_index is not None else [])
