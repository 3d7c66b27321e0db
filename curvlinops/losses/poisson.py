"""Poisson likelihood on log-rates: :class:`PoissonNLLLoss`, with a vectorized sampler.

May import: ``.base``, ``curvlinops._backend``.
"""

from __future__ import annotations

import math

from .._backend import device
from .base import Loss

__all__ = ["PoissonNLLLoss"]

# Half-width of the sampler's support window, in standard deviations plus an offset:
# P(|Y - lambda| > 12 sqrt(lambda) + 10) is far below double-precision resolution.
_WINDOW_STDS = 12.0
_WINDOW_OFFSET = 10.0


class PoissonNLLLoss(Loss):
    """Poisson negative log-likelihood with log-rate outputs.

    Outputs ``f = log(lambda)`` of shape ``(N, C)`` (or ``(N, *S, C)``), targets
    (counts, floating or integer) of the same shape. Per element
    ``exp(f) - y f``, the value of :class:`torch.nn.PoissonNLLLoss` with
    ``log_input=True, full=False`` (the ``log(y!)`` term is a constant in ``f``);
    ``"mean"`` divides by all elements.

    The log-rate is the natural parameter of the Poisson distribution
    (``is_natural``): the Hessian ``exp(f)`` equals the Fisher.

    Fisher route: closed form from the distribution. The score is ``y - lambda``, so
    ``E[(y - lambda)^2] = Var(y) = lambda``.

    Sampling: inversion by cumulative sums over a truncated support. For each
    element the window ``k0 + [0, W)`` with ``k0 = max(0, floor(lambda - 12
    sqrt(lambda) - 10))`` and ``W = ceil(24 sqrt(max lambda) + 40)`` holds all but a
    negligible (below ``1e-30``) probability mass; the pmf is evaluated there in log
    space (``log k!`` by Stirling's series after an upward shift by 8), normalized by
    its cumulative sum, and a uniform draw is compared with the cumulative sums. The
    memory is ``M * N * C * W`` entries, so huge rates are costly.

    Parameters
    ----------
    reduction : {"mean", "sum"}

    Examples
    --------
    >>> import numpy as np
    >>> loss = PoissonNLLLoss(reduction="sum")
    >>> f, y = np.log(np.array([[2.0, 1.0]])), np.array([[3.0, 0.0]])
    >>> np.round(loss.gradient(f, y), 12).tolist()
    [[-1.0, 1.0]]
    >>> y = loss.sample(f, num_samples=2000, seed=0)
    >>> y.shape, bool(abs(y[:, 0, 0].mean() - 2.0) < 0.2)
    ((2000, 1, 2), True)
    """

    is_natural = True

    def _per_datum_count(self, outputs_shape):
        return math.prod(outputs_shape[1:])

    def _prepare_targets(self, xp, outputs, targets):
        return self._same_shape_float_targets(xp, outputs, targets, allow_integer=True)

    def _check_target_values(self, xp, outputs, targets):
        super()._check_target_values(xp, outputs, targets)
        if not bool(xp.all(targets >= 0)):
            raise ValueError(f"{self.name} expects non-negative counts as targets.")

    def _loss_terms(self, xp, outputs, targets):
        return xp.exp(outputs) - targets * outputs

    def _gradient(self, xp, outputs, targets):
        return xp.exp(outputs) - targets

    def _hessian_diagonal(self, xp, outputs, targets):
        return xp.exp(outputs)

    def _fisher_diagonal(self, xp, outputs):
        # Var(y) of a Poisson distribution with rate lambda = exp(f).
        return xp.exp(outputs)

    def _sample(self, generator, xp, outputs, num_samples):
        rate = xp.exp(outputs)
        std = xp.sqrt(rate)
        start = xp.floor(
            xp.maximum(rate - _WINDOW_STDS * std - _WINDOW_OFFSET, xp.zeros_like(rate))
        )
        width = math.ceil(2 * _WINDOW_STDS * math.sqrt(float(xp.max(rate))) + 4 * _WINDOW_OFFSET)
        offsets = xp.arange(width, dtype=outputs.dtype, device=device(outputs))
        support = start[..., None] + offsets
        log_pmf = support * outputs[..., None] - rate[..., None] - _log_factorial(xp, support)
        pmf = xp.exp(log_pmf - xp.max(log_pmf, axis=-1, keepdims=True))
        cdf = xp.cumulative_sum(pmf, axis=-1)
        cdf = cdf / cdf[..., -1:]
        u = generator.uniform((num_samples, *outputs.shape), outputs.dtype)
        passed = xp.sum(xp.astype(u[..., None] >= cdf[..., :-1], outputs.dtype), axis=-1)
        return start + passed


def _log_factorial(xp, k):
    """``log(k!)`` for non-negative integer-valued floats ``k`` (the array API has no lgamma).

    Stirling's series is accurate to ~1e-11 for arguments >= 8, so it is evaluated at
    ``k + 8`` and the eight factors ``(k + 1) ... (k + 8)`` are divided out.
    """
    n = k + 8.0
    stirling = (
        n * xp.log(n)
        - n
        + 0.5 * xp.log(2.0 * math.pi * n)
        + 1.0 / (12.0 * n)
        - 1.0 / (360.0 * n**3)
        + 1.0 / (1260.0 * n**5)
        - 1.0 / (1680.0 * n**7)
    )
    shift = xp.zeros_like(k)
    for j in range(1, 9):  # eight fixed terms, not a loop over data
        shift = shift + xp.log(k + float(j))
    return stirling - shift
