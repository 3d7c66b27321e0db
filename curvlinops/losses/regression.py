"""Gaussian likelihoods: :class:`MSELoss` (fixed variance) and :class:`GaussianNLLLoss`
(predicted mean and log-variance).

May import: ``.base``, ``curvlinops._backend``.
"""

from __future__ import annotations

import math

from .._backend import device, dtype_name
from .base import Loss

__all__ = ["MSELoss", "GaussianNLLLoss"]


class MSELoss(Loss):
    """Squared error, the negative log-likelihood of a Gaussian with variance 1/2.

    ``l_n = sum_c (f_nc - y_nc)^2`` over all non-batch axes; ``"mean"`` divides by
    all elements ``N * prod(S) * C`` as :class:`torch.nn.MSELoss` does.

    Up to a constant, ``l_n = -log N(y | f, I/2)``, a Gaussian in its natural
    parameter (its mean), so the Hessian ``2 I`` equals the Fisher.

    Fisher route: closed form from the distribution. The score is
    ``grad_f log r = 2 (y - f)`` and ``E[4 (y - f)(y - f)^T] = 4 Cov(y) = 4 * I/2``.

    Sampling: ``y = f + sqrt(1/2) * z`` with ``z`` standard normal.

    Parameters
    ----------
    reduction : {"mean", "sum"}

    Examples
    --------
    >>> import numpy as np
    >>> loss = MSELoss(reduction="sum")
    >>> f, y = np.array([[1.0, 0.5]]), np.array([[0.0, 0.5]])
    >>> float(loss(f, y)), loss.gradient(f, y).tolist()
    (1.0, [[2.0, 0.0]])
    >>> loss.fisher_sqrt(f)[0].tolist() == (np.sqrt(2.0) * np.eye(2)).tolist()
    True
    """

    is_natural = True
    variance = 0.5

    def _per_datum_count(self, outputs_shape):
        return math.prod(outputs_shape[1:])

    def _prepare_targets(self, xp, outputs, targets):
        return self._same_shape_float_targets(xp, outputs, targets)

    def _loss_terms(self, xp, outputs, targets):
        return (outputs - targets) ** 2

    def _gradient(self, xp, outputs, targets):
        return 2.0 * (outputs - targets)

    def _hessian_diagonal(self, xp, outputs, targets):
        return xp.full(outputs.shape, 2.0, dtype=outputs.dtype, device=device(outputs))

    def _fisher_diagonal(self, xp, outputs):
        # E[(score)^2] = (d score / d y)^2 Var(y) = 4 * variance, from the distribution.
        value = 4.0 * self.variance
        return xp.full(outputs.shape, value, dtype=outputs.dtype, device=device(outputs))

    def _sample(self, generator, xp, outputs, num_samples):
        noise = generator.normal((num_samples, *outputs.shape), outputs.dtype)
        return outputs + math.sqrt(self.variance) * noise


class GaussianNLLLoss(Loss):
    """Gaussian negative log-likelihood with predicted mean and log-variance.

    Outputs ``(N, ..., 2D)`` hold ``[means | log-variances]`` along the last axis,
    targets are ``(N, ..., D)``. Per element
    ``0.5 * (s + (y - mu)^2 exp(-s))``, the value of
    :class:`torch.nn.GaussianNLLLoss` with ``full=False`` and ``var = exp(s)``
    (PyTorch clamps ``var`` at ``eps=1e-6``, so they agree for ``s > log(1e-6)``);
    ``"mean"`` divides by ``N * prod(S) * D``.

    ``(mu, s)`` are not natural parameters (those are ``mu / var`` and
    ``-1 / (2 var)``), so ``is_natural`` is False: the Hessian

    .. math::

        \\begin{pmatrix} e^{-s} & (y - \\mu) e^{-s} \\\\
        (y - \\mu) e^{-s} & \\tfrac12 (y - \\mu)^2 e^{-s} \\end{pmatrix}

    depends on ``y`` and has determinant ``-(y - mu)^2 e^{-2s} / 2 < 0`` whenever
    ``y != mu``: it is indefinite, has no symmetric factor ``S S^T``
    (:meth:`hessian_sqrt` raises), and differs from the Fisher, which is its
    expectation over ``y ~ r``.

    Fisher route: closed form from the distribution. With ``z = (y - mu) e^{-s/2}``
    standard normal the score is ``(z e^{-s/2}, (z^2 - 1) / 2)``; ``E[z^2] = 1``,
    ``E[z^3] = 0`` and ``E[z^4] = 3`` give ``F = diag(e^{-s}, 1/2)`` per element.

    Sampling: ``y = mu + exp(s / 2) * z``.

    Parameters
    ----------
    reduction : {"mean", "sum"}

    Examples
    --------
    >>> import numpy as np
    >>> loss = GaussianNLLLoss(reduction="sum")
    >>> f, y = np.array([[0.0, 0.0]]), np.array([[2.0]])   # mu = 0, log-variance 0
    >>> float(loss(f, y)), loss.gradient(f, y).tolist()
    (2.0, [[-2.0, -1.5]])
    >>> loss.fisher_matmat(f, np.eye(2)[None]).tolist()
    [[[1.0, 0.0], [0.0, 0.5]]]
    """

    is_natural = False

    def _per_datum_count(self, outputs_shape):
        return math.prod(outputs_shape[1:-1]) * (outputs_shape[-1] // 2)

    def _check_outputs_shape(self, outputs):
        if outputs.ndim < 2 or outputs.shape[-1] % 2 != 0:
            raise ValueError(
                f"{self.name} expects outputs (N, ..., 2D) holding [means | log-variances] "
                f"along the last axis, got shape {tuple(outputs.shape)}."
            )

    def _prepare_targets(self, xp, outputs, targets):
        if not xp.isdtype(targets.dtype, "real floating"):
            raise TypeError(
                f"{self.name} expects real floating targets, got dtype {dtype_name(targets.dtype)}."
            )
        expected = (*outputs.shape[:-1], outputs.shape[-1] // 2)
        self._check_targets_shape(outputs, targets, expected)
        return xp.astype(targets, outputs.dtype)

    def _split(self, outputs):
        half = outputs.shape[-1] // 2
        return outputs[..., :half], outputs[..., half:]

    def _loss_terms(self, xp, outputs, targets):
        mean, log_var = self._split(outputs)
        return 0.5 * (log_var + (targets - mean) ** 2 * xp.exp(-log_var))

    def _gradient(self, xp, outputs, targets):
        mean, log_var = self._split(outputs)
        precision = xp.exp(-log_var)
        residual = targets - mean
        grad_mean = -residual * precision
        grad_log_var = 0.5 - 0.5 * residual**2 * precision
        return xp.concat([grad_mean, grad_log_var], axis=-1)

    def _hessian_matmat(self, xp, outputs, targets, V):
        mean, log_var = self._split(outputs)
        precision = xp.exp(-log_var)[..., None]
        residual = (targets - mean)[..., None]
        half = mean.shape[-1]
        V_mean, V_log_var = V[..., :half, :], V[..., half:, :]
        cross = residual * precision
        out_mean = precision * V_mean + cross * V_log_var
        out_log_var = cross * V_mean + 0.5 * residual * cross * V_log_var
        return xp.concat([out_mean, out_log_var], axis=-2)

    def _hessian_sqrt(self, xp, outputs, targets):
        raise NotImplementedError(
            "GaussianNLLLoss has no symmetric Hessian factor: in (mean, log-variance) its "
            "per-element Hessian has determinant -(y - mu)^2 exp(-2 s) / 2 < 0 whenever "
            "y != mu, so it is indefinite and no S with H = S S^T exists. Use the Fisher "
            "(fisher_sqrt, the expected Hessian, positive definite) instead."
        )

    def _fisher_diagonal(self, xp, outputs):
        _, log_var = self._split(outputs)
        return xp.concat([xp.exp(-log_var), xp.full_like(log_var, 0.5)], axis=-1)

    def _sample(self, generator, xp, outputs, num_samples):
        mean, log_var = self._split(outputs)
        noise = generator.normal((num_samples, *mean.shape), outputs.dtype)
        return mean + xp.exp(0.5 * log_var) * noise
