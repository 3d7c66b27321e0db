"""Monte-Carlo checks for the tests: unbiasedness with a bound from the sample variance,
and the demonstrated power to see a 10 % scale error.

:func:`assert_unbiased` takes ``R`` independent draws of an estimator (axis 0) and the
exact value it estimates. The check it runs (:func:`unbiased`) accepts when

- every entry's mean lies within ``k`` standard errors (from the draws' sample
  variance) of the exact entry, and
- so does the mean of the scale statistic ``t = <draw, exact> / <exact, exact>``, whose
  expectation is exactly 1 for an unbiased estimator and ``c`` for one scaled by ``c``.

``k`` is the two-sided Student-t quantile with ``R - 1`` degrees of freedom at level
``ALPHA / (number of checked quantities)`` (Bonferroni): under the normal approximation
of the means, a correct estimator fails with probability below ``ALPHA = 1e-5``,
whatever the seeds. :func:`assert_unbiased` asserts that the check accepts the draws,
that it rejects the draws scaled by 0.9 and by 1.1, and that this power is no accident of
the seeds: the scale statistic's standard error is small enough that a 10 % scale error
is rejected unless the mean is off by more than ``POWER_Z`` standard errors.

May import: NumPy and SciPy. Only the tests import it.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

ALPHA = 1e-5  # false-alarm probability of one check (normal approximation)
POWER_Z = 4.0  # a 10 % scale error is rejected unless the mean is off by this many SEs
POWER_SCALES = (0.9, 1.1)


def critical_value(num_draws: int, num_checks: int, alpha: float = ALPHA) -> float:
    """Two-sided Student-t quantile for ``num_checks`` simultaneous checks (Bonferroni)."""
    return float(stats.t.isf(alpha / (2 * num_checks), df=num_draws - 1))


def _mean_and_error(values):
    return values.mean(axis=0), values.std(axis=0, ddof=1) / np.sqrt(values.shape[0])


def _scale_statistic(draws, exact):
    """``<draw, exact> / <exact, exact>`` per draw: 1 in expectation when unbiased."""
    flat, norm2 = draws.reshape(draws.shape[0], -1), np.sum(exact**2)
    return flat @ exact.ravel() / norm2 if norm2 > 0 else np.zeros(draws.shape[0])


def unbiased(draws, exact, *, std=None, alpha: float = ALPHA, slack: float = 1e-10):
    """Whether the draws are consistent with an unbiased estimator of ``exact``.

    Parameters
    ----------
    draws : array_like
        ``(R, *exact.shape)``: R independent draws of the estimator.
    exact : array_like
        The value the estimator estimates.
    std : array_like, optional
        The exact standard deviation of one draw, per entry, where it is known: the
        entries' bounds use it instead of the sample's (which is zero, and useless, when
        a rare event was not drawn). The scale statistic always uses the sample's.
    alpha : float
        False-alarm probability of the whole check.
    slack : float
        Absolute slack relative to ``max |exact|``, for entries the estimator gets
        right up to rounding (zero sample variance).

    Returns
    -------
    tuple
        ``(accepted, report)``: a bool and a message with the worst entry and the scale
        statistic's mean and standard error.
    """
    draws, exact = np.asarray(draws, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    assert draws.shape[1:] == exact.shape and draws.shape[0] >= 2, (draws.shape, exact.shape)
    k = critical_value(draws.shape[0], exact.size + 1, alpha)
    atol = slack * np.abs(exact).max()
    mean, se = _mean_and_error(draws)
    if std is not None:
        se = np.broadcast_to(np.asarray(std, dtype=np.float64), exact.shape) / np.sqrt(len(draws))
    excess = np.abs(mean - exact) - k * se - atol
    t_mean, t_se = _mean_and_error(_scale_statistic(draws, exact))
    t_ok = abs(t_mean - 1) <= k * t_se + slack or not np.any(exact)  # zero has no scale
    worst = np.unravel_index(np.argmax(excess), exact.shape)
    report = (
        f"k={k:.2f}; worst entry {worst}: mean {mean[worst]:.6g}, exact {exact[worst]:.6g}, "
        f"se {se[worst]:.3g}; scale statistic {t_mean:.4f} +- {t_se:.4f}"
    )
    return bool(np.all(excess <= 0) and t_ok), report


def assert_unbiased(draws, exact, *, std=None, power_scales=POWER_SCALES, alpha=ALPHA, slack=1e-10):
    """Assert the check of :func:`unbiased` accepts the draws and rejects them scaled.

    Parameters
    ----------
    draws, exact, std, alpha, slack
        As for :func:`unbiased` (``std`` is scaled with the draws).
    power_scales : tuple of float
        Scale errors the check must reject: the draws times each scale fail it, and the
        scale statistic's standard error is small enough to reject them for all but
        unlucky (beyond ``POWER_Z`` standard errors) seeds. Empty when the scale does
        not change the exact value (a mean of zero).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> assert_unbiased(rng.exponential(2.0, size=(4000, 3)), np.full(3, 2.0))
    """
    draws, exact = np.asarray(draws, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    accepted, report = unbiased(draws, exact, std=std, alpha=alpha, slack=slack)
    assert accepted, "the estimator looks biased: " + report
    k = critical_value(draws.shape[0], exact.size + 1, alpha)
    assert np.any(exact) or not power_scales, "a zero exact value has no scale to err in"
    _, t_se = _mean_and_error(_scale_statistic(draws, exact))
    for scale in power_scales:
        scaled_std = None if std is None else scale * np.asarray(std, dtype=np.float64)
        rejected = not unbiased(scale * draws, exact, std=scaled_std, alpha=alpha, slack=slack)[0]
        assert rejected, f"no power: the draws scaled by {scale} pass too ({report})"
        # guaranteed rejection whenever |t_mean - 1| < POWER_Z * t_se
        assert scale * (k + POWER_Z) * t_se <= abs(scale - 1), (
            f"too few draws to see a scale error of {scale} reliably ({report})"
        )
