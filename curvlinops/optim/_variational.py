"""What VOGN and noisy K-FAC share: the Bayesian learning rule's step and the posterior.

The Bayesian learning rule (Khan & Rue, 2021) fits ``q`` of an exponential family to
``exp(-lbar(theta) / tau) p(theta)`` by natural-gradient descent on
``E_q[lbar] / tau + KL(q || p)``. For a Gaussian ``q = N(m, S^{-1})`` the natural
gradient is a Newton-like step with an online curvature estimate::

    S <- (1 - rho) S + rho (E_q[curvature of lbar] / tau + delta I)
    m <- m - alpha S^{-1} (E_q[grad lbar] / tau + delta m)

with ``lbar(theta) = sum_n l_n(theta)`` the data set's negative log-likelihood (the
loss's unnormalized terms), ``p = N(0, delta^{-1} I)`` and the expectations taken at
weights drawn from ``q``. VOGN keeps ``S`` diagonal, noisy K-FAC Kronecker-factored.

What lives here:

- :class:`VariationalPosterior`: the Gaussian ``q`` an optimizer hands out (mean,
  precision and covariance operators, a square root of the covariance, samples, its
  KL divergence to the prior);
- :class:`BayesianLearningRule`: the step both optimizers take (weight samples, the
  curvature's moving average at them, the mean's preconditioned update with momentum),
  their ``init`` / ``step`` / ``posterior`` / ``elbo``; subclasses say how the
  curvature is made and how the posterior is formed from it;
- small helpers: per-step seeds, the split of one moving-average step over several
  weight samples, the data gradient at a sample.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``._common``.
"""

from __future__ import annotations

import math
import numbers

from .._backend import RandomGenerator, array_namespace, as_generator, device as array_device
from ..models import flatten_params, param_shapes, unflatten_params
from ._common import check_positive

__all__ = ["VariationalPosterior"]


class VariationalPosterior:
    """A Gaussian ``q(theta) = N(mean, precision^{-1})`` over the flat parameters.

    What :meth:`VOGN.posterior <curvlinops.optim.VOGN.posterior>` and
    :meth:`NoisyKFAC.posterior <curvlinops.optim.NoisyKFAC.posterior>` return: the
    variational posterior of the current state, for a predictive (sample weights, or
    linearize around the mean with the covariance).

    Parameters
    ----------
    mean : list of arrays
        The mean, shaped like the model's parameters.
    precision, covariance : LinearOperator
        ``S`` and ``S^{-1}`` over flat vectors ``(P,)`` (exact inverses of each other).
    scale : LinearOperator
        A symmetric square root of the covariance, ``scale @ scale = covariance``:
        ``mean + scale @ eps`` with ``eps ~ N(0, I)`` is a draw from ``q``.
    prior_precision : float
        ``delta`` of the prior ``N(0, delta^{-1} I)`` (for :meth:`kl_to_prior`).

    Attributes
    ----------
    mean, precision, covariance, scale, prior_precision
        As given.
    flat_mean : array
        The mean as a flat ``(P,)`` vector.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import DiagonalLinearOperator
    >>> q = VariationalPosterior(
    ...     [np.zeros(2)],
    ...     DiagonalLinearOperator(np.array([4.0, 1.0])),
    ...     DiagonalLinearOperator(np.array([0.25, 1.0])),
    ...     DiagonalLinearOperator(np.array([0.5, 1.0])),
    ...     prior_precision=1.0,
    ... )
    >>> draws = q.sample(20000, seed=0)
    >>> np.round(draws.std(axis=1), 1).tolist()
    [0.5, 1.0]
    >>> round(q.kl_to_prior(), 3)  # (tr - P + mean^2 + log det S) / 2 = (1.25 - 2 + log 4) / 2
    0.318
    """

    def __init__(self, mean, precision, covariance, scale, *, prior_precision):
        self.mean = list(mean)
        self.flat_mean = flatten_params(self.mean)
        self.precision, self.covariance, self.scale = precision, covariance, scale
        self.prior_precision = float(prior_precision)
        self._shapes = param_shapes(self.mean)

    @property
    def num_params(self) -> int:
        """``P``, the number of parameters."""
        return int(self.flat_mean.shape[0])

    def sample(self, num_samples=1, *, seed):
        """``num_samples`` draws from ``q`` as the columns of a flat ``(P, num_samples)`` array.

        Parameters
        ----------
        num_samples : int
            ``>= 1``.
        seed : int or generator
            An int seed or a native generator of the mean's library (or a
            :class:`~curvlinops.RandomGenerator`); the draws are reproducible from it.

        Returns
        -------
        array
            ``mean + scale @ eps`` with standard normal ``eps`` of shape
            ``(P, num_samples)``, on the mean's backend, device and dtype.
        """
        num_samples = check_count(num_samples, "num_samples")
        theta = self.flat_mean
        xp = array_namespace(theta)
        generator = as_generator(seed, xp, array_device(theta))
        eps = generator.normal((self.num_params, num_samples), theta.dtype)
        return theta[:, None] + self.scale @ eps

    def as_params(self, theta):
        """A flat ``(P,)`` vector (or ``(P, K)`` samples) as arrays shaped like the parameters.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import IdentityLinearOperator
        >>> eye = IdentityLinearOperator(3, xp=np, dtype=np.float64)
        >>> q = VariationalPosterior([np.zeros((1, 2)), np.zeros(1)], eye, eye, eye,
        ...                          prior_precision=1.0)
        >>> [p.shape for p in q.as_params(np.arange(3.0))]
        [(1, 2), (1,)]
        """
        return unflatten_params(theta, self._shapes)

    def kl_to_prior(self) -> float:
        """``KL(q || N(0, delta^{-1} I))``, exact from the structured operators.

        ``(delta tr(S^{-1}) + delta |m|^2 - P - P log delta + log det S) / 2`` with the
        trace of the covariance and the log-determinant of the precision in closed form.
        """
        delta, P = self.prior_precision, self.num_params
        xp = array_namespace(self.flat_mean)
        trace = float(self.covariance.trace())
        mean_sq = float(xp.sum(self.flat_mean * self.flat_mean))
        logdet = float(self.precision.logdet())
        return 0.5 * (delta * trace + delta * mean_sq - P - P * math.log(delta) + logdet)


def check_count(value, what, *, minimum=1):
    """``value`` as an int ``>= minimum`` (no bools, no fractions), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_unit_interval(value, what):
    """``value`` as a float in ``[0, 1)`` (a moving-average coefficient), else an error."""
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {value}.")
    return value


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s weight draws: fixed by the optimizer's seed and the step,
    so that a resumed run draws what the uninterrupted one would have."""
    return (int(seed) * 1_000_003 + 7919 * int(step)) % (2**31 - 1)


def split_decay(decay: float, count: int) -> list[float]:
    """Decays of ``count`` successive moving-average updates that together make one.

    Updating ``x <- d_j x + (1 - d_j) e_j`` for ``j = 1..count`` with these ``d_j`` gives
    ``decay * x + (1 - decay) * mean_j(e_j)``: the weight left on the old value before
    update ``j`` is ``w_j = 1 - (count - j + 1) (1 - decay) / count`` and
    ``d_j = w_j / w_{j+1}``.

    Examples
    --------
    >>> split_decay(0.5, 1)
    [0.5]
    >>> [round(d, 6) for d in split_decay(0.7, 3)]
    [0.875, 0.888889, 0.9]
    """
    weights = [1.0 - (count - j) * (1.0 - decay) / count for j in range(count + 1)]
    return [weights[j] / weights[j + 1] for j in range(count)]


def data_gradient(model, loss, params, X, y):
    """``(sum_n grad l_n, loss value)`` at ``params`` on one batch (one forward pass).

    The gradient is of the loss's unnormalized terms (the negative log-likelihood); the
    value is the loss with its own reduction over the batch (what an optimizer reports).
    """
    lin = model.linearize(params, X)
    outputs = lin.outputs
    gradient = flatten_params(lin.vjp(loss.gradient(outputs, y)))
    c = loss.normalization(int(X.shape[0]), tuple(outputs.shape))
    return gradient, c * float(loss.sum_value(outputs, y))


def check_pair(batch):
    """``(X, y)`` from a batch, or a clear error."""
    try:
        X, y = batch
    except (TypeError, ValueError) as err:
        raise TypeError(f"A batch must be a pair (X, y), got a {type(batch).__name__}.") from err
    return X, y


class BayesianLearningRule:
    """The Bayesian learning rule for a Gaussian posterior (shared by VOGN and noisy K-FAC).

    Subclasses implement :meth:`_new_curvature` (the curvature operator of the first
    batch, with ``update(batch, decay, params=...)``), :meth:`_precision`,
    :meth:`_covariance` and :meth:`_scale` (the posterior's operators of a state),
    :meth:`_refreshed` (a state whose posterior form follows the updated curvature) and
    the state's class.
    """

    #: name of the optimizer in saved states and messages
    name = "BayesianLearningRule"
    #: the class of its states
    state_class = object

    def __init__(
        self,
        model,
        loss,
        *,
        num_data,
        learning_rate,
        prior_precision,
        beta1,
        beta2,
        weight_samples,
        temperature,
        damping,
        seed,
    ):
        self.model, self.loss = model, loss
        self.num_data = check_count(num_data, "num_data")
        self.learning_rate = check_positive(learning_rate, "learning_rate")
        self.prior_precision = check_positive(prior_precision, "prior_precision")
        self.beta1 = check_unit_interval(beta1, "beta1")
        self.beta2 = check_unit_interval(beta2, "beta2")
        self.weight_samples = check_count(weight_samples, "weight_samples", minimum=0)
        self.temperature = check_positive(temperature, "temperature")
        self.damping = check_positive(damping, "damping", allow_zero=True)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
        self.seed = int(seed)

    # -- the public steps ------------------------------------------------------------

    def init(self, params, batch):
        """The first state: the curvature of ``batch`` at ``params`` (no weight noise yet).

        Parameters
        ----------
        params : list of arrays
            The initial mean.
        batch : tuple (X, y)
            Its curvature is the first estimate of the moving average, and its size and
            outputs fix the scaling to the data set's ``num_data`` points.

        Returns
        -------
        state
        """
        X, y = check_pair(batch)
        curvature = self._new_curvature(params, (X, y))
        outputs = self.model(list(params), X)
        n = int(X.shape[0])
        # the operators hold c(n) sum over n data (c: the loss's normalization); the data
        # set's curvature is num_data times the per-datum mean
        scale = self.num_data / (self.loss.normalization(n, tuple(outputs.shape)) * n)
        return self._first_state(params, curvature, scale)

    def step(self, params, state, batch):
        """One step of the Bayesian learning rule on ``batch``; returns ``(mean, state)``.

        Parameters
        ----------
        params : list of arrays
            The current mean.
        state
            From :meth:`init` or the last step.
        batch : tuple (X, y)
            A batch of the data set (any size; scaled to ``num_data``).

        Returns
        -------
        tuple
            The new mean (list of arrays of the same backend) and state.
        """
        X, y = check_pair(batch)
        self._check_state(state)
        shapes = param_shapes(params)
        mean = flatten_params(params)
        k = state.step + 1
        gradient, loss = self._sampled_gradient(mean, shapes, state, k, (X, y))
        # E_q[grad lbar] / tau + delta m, the data term estimated from the batch
        natural = (self.num_data / (int(X.shape[0]) * self.temperature)) * gradient
        natural = natural + self.prior_precision * mean
        momentum, direction = self._momentum(state, natural, k)
        state = self._refreshed(state, k)
        new_mean = mean - self.learning_rate * (self._covariance(state) @ direction)
        new_state = self._advanced(
            state, momentum=momentum, estimates=state.estimates + 1, step=k, loss=loss
        )
        return unflatten_params(new_mean, shapes), new_state

    def posterior(self, params, state):
        """The variational posterior ``q`` of a state, with mean ``params``.

        Parameters
        ----------
        params : list of arrays
            The mean (the parameters the last step returned).
        state
            The state of that step.

        Returns
        -------
        VariationalPosterior
            The Gaussian the next step draws its weights from.
        """
        self._check_state(state)
        precision, covariance = self._precision(state), self._covariance(state)
        scale = self._scale(state)
        if covariance.shape[0] != flatten_params(params).shape[0]:
            raise ValueError(
                f"The state's posterior has {covariance.shape[0]} parameters, the mean "
                f"{flatten_params(params).shape[0]}; pass the parameters of this state."
            )
        return VariationalPosterior(
            params, precision, covariance, scale, prior_precision=self.prior_precision
        )

    def elbo(self, posterior, data, *, num_samples=16, seed=0):
        """A Monte-Carlo estimate of ``E_q[-lbar] - tau KL(q || p)`` (the ELBO for ``tau = 1``).

        ``lbar`` is the data set's negative log-likelihood up to its constant (the sum
        of the loss's unnormalized terms), averaged over ``num_samples`` draws from
        ``q``; the KL divergence is exact.

        Parameters
        ----------
        posterior : VariationalPosterior
        data : iterable of (X, y)
            The data set's batches (one pass). When they hold ``n != num_data`` points,
            their term is scaled by ``num_data / n`` (an estimate from a part).
        num_samples : int
        seed : int

        Returns
        -------
        float
        """
        thetas = posterior.sample(check_count(num_samples, "num_samples"), seed=seed)
        samples = posterior.as_params(thetas)
        total, count = 0.0, 0
        for batch in data:
            X, y = check_pair(batch)
            count += int(X.shape[0])
            for j in range(num_samples):
                at = [p[..., j] for p in samples]
                total += float(self.loss.sum_value(self.model(at, X), y))
        if count == 0:
            raise ValueError("elbo needs at least one batch of data, got none.")
        expected = -(self.num_data / count) * total / num_samples
        return expected - self.temperature * posterior.kl_to_prior()

    # -- internals ------------------------------------------------------------------

    def _check_state(self, state):
        if not isinstance(state, self.state_class):
            raise TypeError(
                f"{self.name} needs a {self.state_class.__name__} (from init, step or "
                f"load_state_dict), got a {type(state).__name__}."
            )

    def _sampled_gradient(self, mean, shapes, state, step, batch):
        """The batch's ``sum_n grad l_n`` averaged over the weight samples, and the loss.

        At each sample, the curvature's moving average takes the batch's estimate (one
        step of decay ``min(1 - 1/k, beta2)`` split over the samples, see
        :func:`split_decay`).
        """
        samples = self._weight_samples(mean, state, step)
        decay = min(1.0 - 1.0 / (state.estimates + 1), self.beta2)
        gradient, values = None, []
        for theta, d in zip(samples, split_decay(decay, len(samples)), strict=True):
            at = unflatten_params(theta, shapes)
            state.curvature.update(batch, decay=d, params=at)
            g, value = data_gradient(self.model, self.loss, at, *batch)
            gradient = g if gradient is None else gradient + g
            values.append(value)
        return gradient / len(samples), sum(values) / len(values)

    def _momentum(self, state, natural, step):
        """``(moving average to keep, bias-corrected direction)``; ``(None, natural)`` for
        ``beta1 = 0``."""
        if not self.beta1:
            return None, natural
        previous = state.momentum
        momentum = (1.0 - self.beta1) * natural
        if previous is not None:
            momentum = self.beta1 * previous + momentum
        return momentum, momentum / (1.0 - self.beta1**step)

    def _weight_samples(self, mean, state, step):
        """The weights of this step: ``weight_samples`` draws from ``q``, or the mean."""
        if self.weight_samples == 0:
            return [mean]
        xp = array_namespace(mean)
        scale = self._scale(state)
        generator = RandomGenerator(step_seed(self.seed, step), xp, array_device(mean))
        eps = generator.normal((mean.shape[0], self.weight_samples), mean.dtype)
        thetas = mean[:, None] + scale @ eps
        return [thetas[:, j] for j in range(self.weight_samples)]

    def _precision_shift(self, curvature_scale):
        """``(tau delta + damping) / s``: the shift of the curvature operator whose scaled
        inverse is the covariance, ``S^{-1} = (tau / s) (K + shift I)^{-1}``."""
        return (self.temperature * self.prior_precision + self.damping) / curvature_scale

    def _new_curvature(self, params, batch):
        raise NotImplementedError

    def _first_state(self, params, curvature, scale):
        raise NotImplementedError

    def _precision(self, state):
        raise NotImplementedError

    def _covariance(self, state):
        raise NotImplementedError

    def _scale(self, state):
        raise NotImplementedError

    def _refreshed(self, state, step):
        return state

    def _advanced(self, state, **fields):
        raise NotImplementedError
