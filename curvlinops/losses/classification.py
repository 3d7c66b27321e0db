"""Categorical and Bernoulli likelihoods on logits: :class:`CrossEntropyLoss` and
:class:`BCEWithLogitsLoss`.

May import: ``.base``, ``curvlinops._backend``.
"""

from __future__ import annotations

import math

from .._backend import device, dtype_name
from .base import Loss, _embed_diagonal, _log_softmax, _move_first_axis_last, _sigmoid, _softplus

__all__ = ["CrossEntropyLoss", "BCEWithLogitsLoss"]

# Probability targets must sum to one up to this tolerance: the Fisher assumes it.
_PROBABILITY_SUM_TOL = 1e-4


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy on logits: the categorical negative log-likelihood.

    Outputs are logits ``(N, C)`` or ``(N, *S, C)`` (classes on the **last** axis;
    PyTorch puts them on axis 1). Targets are either class indices of an integer
    dtype, shape ``(N, *S)``, or class probabilities of a floating dtype, the
    outputs' shape. Per position ``-sum_c t_c log softmax(f)_c``; ``"mean"``
    divides by ``N * prod(S)`` as :class:`torch.nn.CrossEntropyLoss` does.

    The logits are the natural parameters of the categorical distribution
    (``is_natural``), so the Hessian ``diag(p) - p p^T`` equals the Fisher.

    Fisher route: exact enumeration of the ``C`` outcomes,
    ``F = sum_c p_c g_c g_c^T`` with ``g_c = p - e_c`` the gradient of the loss at
    label ``c``; :meth:`fisher_sqrt` has the columns ``sqrt(p_c) g_c``.

    Sampling: inversion of the cumulative distribution (a uniform draw compared
    with the cumulative sums of ``p``); samples are integer class indices.

    Parameters
    ----------
    reduction : {"mean", "sum"}

    Examples
    --------
    >>> import numpy as np
    >>> loss = CrossEntropyLoss()
    >>> f, y = np.zeros((2, 4)), np.array([0, 3])
    >>> abs(float(loss(f, y)) - float(np.log(4.0))) < 1e-12
    True
    >>> loss.gradient(f, y)[0].tolist()
    [-0.75, 0.25, 0.25, 0.25]
    """

    is_natural = True

    def _per_datum_count(self, outputs_shape):
        return math.prod(outputs_shape[1:-1])

    def _prepare_targets(self, xp, outputs, targets):
        label_shape = tuple(outputs.shape[:-1])
        if xp.isdtype(targets.dtype, "integral"):
            self._check_targets_shape(outputs, targets, label_shape)
            return targets
        if not xp.isdtype(targets.dtype, "real floating"):
            raise TypeError(
                f"{self.name} expects integer class indices {label_shape} or floating class "
                f"probabilities {tuple(outputs.shape)}, got dtype {dtype_name(targets.dtype)}."
            )
        if tuple(targets.shape) == label_shape:
            raise TypeError(
                f"{self.name} received floating targets of shape {label_shape}: class indices "
                f"must have an integer dtype (got {dtype_name(targets.dtype)}). Cast them to "
                f"an integer dtype, or pass class probabilities of shape {tuple(outputs.shape)}."
            )
        self._check_targets_shape(outputs, targets, tuple(outputs.shape))
        return xp.astype(targets, outputs.dtype)

    def _check_target_values(self, xp, outputs, targets):
        num_classes = outputs.shape[-1]
        if xp.isdtype(targets.dtype, "integral"):
            if targets.size and not bool(xp.all((targets >= 0) & (targets < num_classes))):
                low, high = int(xp.min(targets)), int(xp.max(targets))
                raise ValueError(
                    f"{self.name} expects class indices in [0, {num_classes - 1}] for "
                    f"{num_classes} classes, got labels in [{low}, {high}]."
                )
            return
        self._check_in_unit_interval(xp, targets, "class probabilities")
        deviation = float(xp.max(xp.abs(xp.sum(targets, axis=-1) - 1.0)))
        if deviation > _PROBABILITY_SUM_TOL:
            raise ValueError(
                f"{self.name} expects class probabilities that sum to 1 over the last axis; "
                f"found sums off by up to {deviation:.3g}. Normalize the targets."
            )

    def _probabilities(self, xp, outputs, targets):
        """Targets as class probabilities (one-hot for indices), broadcast-ready."""
        if not xp.isdtype(targets.dtype, "integral"):
            return targets
        classes = xp.arange(outputs.shape[-1], device=device(outputs))
        return xp.astype(targets[..., None] == classes, outputs.dtype)

    def _loss_terms(self, xp, outputs, targets):
        return -self._probabilities(xp, outputs, targets) * _log_softmax(xp, outputs)

    def _gradient(self, xp, outputs, targets):
        t = self._probabilities(xp, outputs, targets)
        p = xp.exp(_log_softmax(xp, outputs))
        return xp.sum(t, axis=-1, keepdims=True) * p - t

    def _target_mass(self, xp, outputs, targets):
        """``sum_c t_c`` per position, ``(..., 1, 1)``: the Hessian scales with it."""
        t = self._probabilities(xp, outputs, targets)
        return xp.sum(t, axis=-1)[..., None, None]

    def _hessian_matmat(self, xp, outputs, targets, V):
        p = xp.exp(_log_softmax(xp, outputs))[..., None]
        pV = p * V
        return self._target_mass(xp, outputs, targets) * (
            pV - p * xp.sum(pV, axis=-2, keepdims=True)
        )

    def _hessian_sqrt(self, xp, outputs, targets):
        # (diag(sqrt p) - p sqrt(p)^T)(...)^T = diag(p) - p p^T because sum(p) = 1.
        p = xp.exp(_log_softmax(xp, outputs))
        root = xp.sqrt(p)
        factor = _embed_diagonal(xp, root) - p[..., :, None] * root[..., None, :]
        return xp.sqrt(self._target_mass(xp, outputs, targets)) * factor

    def _fisher_sqrt(self, xp, outputs):
        num_classes = outputs.shape[-1]
        every_label = xp.reshape(
            xp.arange(num_classes, device=device(outputs)),
            (num_classes,) + (1,) * (outputs.ndim - 1),
        )
        scores = _move_first_axis_last(xp, self._gradient(xp, outputs, every_label))
        p = xp.exp(_log_softmax(xp, outputs))
        return scores * xp.sqrt(p)[..., None, :]

    def _fisher_matmat(self, xp, outputs, V):
        S = self._fisher_sqrt(xp, outputs)
        return S @ (xp.matrix_transpose(S) @ V)

    def _sample(self, generator, xp, outputs, num_samples):
        cdf = xp.cumulative_sum(xp.exp(_log_softmax(xp, outputs)), axis=-1)
        u = generator.uniform((num_samples, *outputs.shape[:-1]), outputs.dtype)
        int_dtype = _default_int(xp, outputs)
        # The label is the number of cumulative sums (last one excluded) that u passes.
        return xp.sum(xp.astype(u[..., None] >= cdf[..., :-1], int_dtype), axis=-1)


class BCEWithLogitsLoss(Loss):
    """Binary cross-entropy on logits: independent Bernoulli likelihoods.

    Outputs are logits ``(N, C)`` (or ``(N, *S, C)``), targets have the same shape,
    a floating dtype and values in ``[0, 1]`` (hard or soft labels). Per element
    ``softplus(f) - y f``; ``"mean"`` divides by all elements, as
    :class:`torch.nn.BCEWithLogitsLoss` does.

    The logit is the natural parameter of the Bernoulli distribution
    (``is_natural``): the Hessian ``sigma (1 - sigma)`` equals the Fisher.

    Fisher route: exact enumeration of the two outcomes of each element,
    ``F = (1 - sigma) g(0)^2 + sigma g(1)^2`` with ``g(y) = sigma - y`` the gradient
    at label ``y`` (diagonal: the elements are independent).

    Sampling: ``y = 1`` where a uniform draw falls below ``sigma(f)``.

    Parameters
    ----------
    reduction : {"mean", "sum"}

    Examples
    --------
    >>> import numpy as np
    >>> loss = BCEWithLogitsLoss(reduction="sum")
    >>> f, y = np.zeros((1, 2)), np.array([[1.0, 0.0]])
    >>> loss.gradient(f, y).tolist(), loss.fisher_sqrt(f)[0].tolist()
    ([[-0.5, 0.5]], [[0.5, 0.0], [0.0, 0.5]])
    """

    is_natural = True

    def _per_datum_count(self, outputs_shape):
        return math.prod(outputs_shape[1:])

    def _prepare_targets(self, xp, outputs, targets):
        return self._same_shape_float_targets(xp, outputs, targets)

    def _check_target_values(self, xp, outputs, targets):
        self._check_in_unit_interval(xp, targets, "targets (probabilities of label 1)")

    def _loss_terms(self, xp, outputs, targets):
        return _softplus(xp, outputs) - targets * outputs

    def _gradient(self, xp, outputs, targets):
        return _sigmoid(xp, outputs) - targets

    def _hessian_diagonal(self, xp, outputs, targets):
        s = _sigmoid(xp, outputs)
        return s * (1.0 - s)

    def _fisher_diagonal(self, xp, outputs):
        prob_one = _sigmoid(xp, outputs)
        score_zero = self._gradient(xp, outputs, xp.zeros_like(outputs))
        score_one = self._gradient(xp, outputs, xp.ones_like(outputs))
        return (1.0 - prob_one) * score_zero**2 + prob_one * score_one**2

    def _sample(self, generator, xp, outputs, num_samples):
        u = generator.uniform((num_samples, *outputs.shape), outputs.dtype)
        return xp.astype(u < _sigmoid(xp, outputs), outputs.dtype)


def _default_int(xp, x):
    """The namespace's default integer dtype on the device of ``x``."""
    return xp.__array_namespace_info__().default_dtypes(device=device(x))["integral"]
