"""VOGN: variational online Gauss-Newton (Khan et al., 2018), a diagonal Gaussian posterior.

:class:`VOGN` is the Bayesian learning rule (Khan & Rue, 2021) with a mean-field
Gaussian ``q = N(m, diag(s)^{-1})``: each step draws weights from ``q``, averages the
batch's curvature diagonal at them into a moving average, and moves the mean by the
gradient at them preconditioned with the posterior covariance (an Adam-like step whose
"second moment" is the precision, hence "weight-perturbation in Adam"). The curvature
is the GGN diagonal (the exact Gauss-Newton diagonal of the library's
:class:`~curvlinops.GGNDiagonalLinearOperator`) or, as in Khan et al. (2018), the
per-example squared gradients (:class:`~curvlinops.EFDiagonalLinearOperator`).
:class:`VOGNState` is what it carries.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.curvature``, ``._common``, ``._variational``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .._backend import host_str
from ..curvature import EFDiagonalLinearOperator, GGNDiagonalLinearOperator
from ..linalg import DiagonalLinearOperator
from ._common import load_fields, save_fields
from ._variational import BayesianLearningRule

__all__ = ["VOGN", "VOGNState"]

CURVATURES = ("ggn", "mc", "empirical")
_CLASSES = {"GGNDiagonalLinearOperator": GGNDiagonalLinearOperator}
_CLASSES["EFDiagonalLinearOperator"] = EFDiagonalLinearOperator


@dataclass(frozen=True)
class VOGNState:
    """What :class:`VOGN` carries between steps.

    Attributes
    ----------
    curvature : GGNDiagonalLinearOperator or EFDiagonalLinearOperator
        The moving average of the batches' curvature diagonals at the weight samples
        (updated in place by each step), with the loss's reduction over the first batch.
    curvature_scale : float
        ``s``: ``s * curvature`` estimates the curvature of the data set's negative
        log-likelihood ``lbar`` (``num_data`` times the per-datum mean).
    momentum : array or None
        The moving average of the natural-parameter gradient (flat; with ``beta1 > 0``).
    estimates : int
        Curvature estimates averaged so far (the first batch's is one).
    step : int
        Steps taken.
    loss : float or None
        The loss (with its reduction) of the last step's batch, averaged over its weight
        samples.
    """

    curvature: object
    curvature_scale: float
    momentum: object = None
    estimates: int = 1
    step: int = 0
    loss: float | None = None

    def state_dict(self):
        """The state as plain NumPy arrays (for ``numpy.savez``; no pickle).

        Holds the scalars, the momentum and the curvature's state (keys
        ``curvature/...``); restore with :meth:`VOGN.load_state_dict`.

        Returns
        -------
        dict
            ``str`` to NumPy arrays; fields that are None are left out.
        """
        out = save_fields(self, "VOGN", _SCALARS, ("momentum",))
        out.update({f"curvature/{k}": v for k, v in self.curvature.state_dict().items()})
        return out


_SCALARS = {"curvature_scale": float, "estimates": int, "step": int, "loss": float}


class VOGN(BayesianLearningRule):
    """VOGN (Khan et al., 2018): natural-gradient VI with a diagonal Gaussian posterior.

    The target is ``q(theta) = N(m, diag(s)^{-1})`` minimizing
    ``E_q[lbar(theta)] / tau + KL(q || N(0, delta^{-1} I))``, with
    ``lbar = sum_n l_n`` the loss's unnormalized terms over the ``num_data`` points of
    the data set (the likelihood ``exp(-l_n)``: for :class:`~curvlinops.MSELoss` a
    Gaussian of variance 1/2, for :class:`~curvlinops.CrossEntropyLoss` a categorical;
    the loss's reduction does not matter). Each step on a batch of ``n`` points:

    1. draw ``theta_j = m + diag(s)^{-1/2} eps_j``, ``j = 1..weight_samples``, from the
       current ``q`` (with ``weight_samples=0``: ``theta = m``, no noise);
    2. average the batch's curvature diagonal at the ``theta_j`` into the moving
       average ``h`` with decay ``min(1 - 1/k, beta2)`` at the ``k``-th estimate (the
       running mean until it reaches ``beta2``); the precision is
       ``s = (N h + damping) / tau + delta``, ``N h`` the data set's curvature;
    3. ``g = (N / n) mean_j sum_{i in batch} grad l_i(theta_j) / tau + delta m``, the
       gradient of the objective in ``m``; with ``beta1 > 0`` its moving average
       ``g <- beta1 g_prev + (1 - beta1) g``, bias-corrected by ``1 - beta1^t``;
    4. ``m <- m - learning_rate g / s``.

    In the per-datum form of Khan et al. (2018) and Osawa et al. (2019) this is
    ``m <- m - alpha (ghat + deltatilde m) / (hbar + deltatilde)`` with
    ``deltatilde = tau delta / N`` and ``hbar`` the per-datum curvature: the same
    learning rate. The fixed point satisfies ``E_q[grad lbar] + tau delta m = 0`` and
    ``s = E_q[diag curvature] / tau + delta``: the mean-field optimum when the curvature
    is the Hessian's diagonal in expectation (e.g. Bayesian linear regression with the
    GGN, where it is exact).

    Parameters
    ----------
    model : curvlinops.models.Model
        A model with layer taps (tier 3: the diagonals need per-layer gradients).
    loss : curvlinops.losses.Loss
        The negative log-likelihood.
    num_data : int
        ``N``, the size of the data set (the batches are scaled to it).
    learning_rate : float
        ``alpha`` of the mean's step.
    prior_precision : float
        ``delta > 0`` of the prior ``N(0, delta^{-1} I)``.
    beta1 : float
        In ``[0, 1)``: momentum of the mean's gradient (0: none).
    beta2 : float
        In ``[0, 1)``: the largest decay of the precision's moving average (the
        weight of a new estimate is at least ``1 - beta2``).
    weight_samples : int
        Monte-Carlo weight samples per step (``>= 0``; 0 evaluates at the mean: the
        deterministic limit, an online Gauss-Newton method).
    temperature : float
        ``tau > 0``: the target is ``exp(-lbar / tau) p``; equivalently the ELBO with
        KL weight ``tau``, ``E_q[-lbar] - tau KL(q || p)`` (Zhang et al.'s ``lambda``).
        A Gaussian likelihood of variance ``sigma^2`` with :class:`~curvlinops.MSELoss`:
        ``tau = 2 sigma^2``.
    curvature : {"ggn", "mc", "empirical"}
        The batch's curvature diagonal: ``"ggn"`` the exact GGN diagonal;
        ``"mc"`` its Monte-Carlo estimate from one sampled label per datum (the Fisher's
        diagonal in expectation); ``"empirical"`` the per-example squared gradients,
        the Gauss-Newton approximation of Khan et al. (2018)'s VOGN.
    damping : float
        ``>= 0``, added to the data set's curvature before it enters the precision.
    seed : int
        Of the weight draws (and of ``"mc"``'s labels); step ``t`` draws from a seed of
        ``(seed, t)``, so that a resumed run draws the same weights.

    Examples
    --------
    Bayesian linear regression (Gaussian noise of variance 1/2, prior ``N(0, I)``):
    the fixed point is the mean-field optimum, the exact posterior mean with the
    diagonal of the exact posterior precision.

    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import MSELoss, nn
    >>> from curvlinops.optim import VOGN
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(50, 3))
    >>> y = X @ np.array([[1.0], [-2.0], [0.5]]) + 0.7 * rng.normal(size=(50, 1))
    >>> model = nn.Sequential(nn.Linear(3, 1, bias=False))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> opt = VOGN(model, MSELoss(), num_data=50, learning_rate=0.5, weight_samples=0)
    >>> state = opt.init(params, (X, y))
    >>> for _ in range(100):
    ...     params, state = opt.step(params, state, (X, y))
    >>> precision = 2 * X.T @ X + np.eye(3)
    >>> mean = np.linalg.solve(precision, 2 * X.T @ y[:, 0])
    >>> q = opt.posterior(params, state)
    >>> bool(np.allclose(q.flat_mean, mean)), bool(np.allclose(q.precision.diagonal(),
    ...                                                          np.diag(precision)))
    (True, True)
    """

    name = "VOGN"
    state_class = VOGNState

    def __init__(
        self,
        model,
        loss,
        *,
        num_data,
        learning_rate=1e-3,
        prior_precision=1.0,
        beta1=0.0,
        beta2=0.999,
        weight_samples=1,
        temperature=1.0,
        curvature="ggn",
        damping=0.0,
        seed=0,
    ):
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
        self.curvature = curvature
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
        """The state saved by :meth:`VOGNState.state_dict`, to continue from.

        Parameters
        ----------
        state : dict
            The saved arrays (e.g. ``dict(numpy.load(file, allow_pickle=False))``).
        params : list of arrays
            The current mean: everything is put on its backend, dtype and device.

        Returns
        -------
        VOGNState
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
        >>> opt = VOGN(model, CrossEntropyLoss(), num_data=160, learning_rate=0.1, beta1=0.9)
        >>> state = opt.init(params, batch)
        >>> for _ in range(2):
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
        fields = load_fields(state, "VOGN", _SCALARS, ("momentum",), params)
        curvature = {
            k[len("curvature/") :]: v for k, v in state.items() if k.startswith("curvature/")
        }
        kind = host_str(curvature["class"])
        if kind not in _CLASSES:
            raise ValueError(f"The saved curvature is a {kind}, not a diagonal VOGN uses.")
        operator = _CLASSES[kind].from_state_dict(curvature, self.model, self.loss, params)
        return VOGNState(curvature=operator, **fields)

    def _new_curvature(self, params, batch):
        options = {"num_data": int(batch[0].shape[0]), "check_deterministic": False}
        if self.curvature == "empirical":
            return EFDiagonalLinearOperator(self.model, self.loss, params, [batch], **options)
        mc_samples = 1 if self.curvature == "mc" else None
        return GGNDiagonalLinearOperator(
            self.model, self.loss, params, [batch], mc_samples=mc_samples, seed=self.seed, **options
        )

    def _first_state(self, params, curvature, scale):
        return VOGNState(curvature=curvature, curvature_scale=scale)

    def _precision(self, state):
        """``diag(s)``, ``s = (N h + damping) / tau + delta``."""
        c = state.curvature_scale / self.temperature
        shift = c * self._precision_shift(state.curvature_scale)
        return DiagonalLinearOperator(c * state.curvature.diagonal() + shift, psd=True)

    def _covariance(self, state):
        return DiagonalLinearOperator(1.0 / self._precision(state).diagonal(), psd=True)

    def _scale(self, state):
        xp = state.curvature.xp
        return DiagonalLinearOperator(1.0 / xp.sqrt(self._precision(state).diagonal()), psd=True)

    def _advanced(self, state, **fields):
        return replace(state, **fields)
