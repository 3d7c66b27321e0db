"""The K-FAC optimizer of Martens & Grosse (2015), as a functional step on flat arrays.

:class:`KFAC` keeps a :class:`~curvlinops.KFACLinearOperator` across steps (updated from
each batch with an exponential moving average), refreshes its factored Tikhonov-damped
inverse (pi-damping) on its own cadence, chooses the step size and momentum from the
quadratic model with exact damped curvature products (their section 7) and adapts the
damping by the Levenberg-Marquardt rule (their section 6.5). :class:`KFACState` is what
it carries from step to step.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.curvature``, ``._common``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..curvature import KFACLinearOperator
from ..models import param_shapes
from ._common import (
    BatchObjective,
    as_params,
    check_every,
    check_positive,
    dot,
    levenberg_marquardt,
    reduction_ratio,
)

__all__ = ["KFAC", "KFACState"]


@dataclass(frozen=True)
class KFACState:
    """What :class:`KFAC` carries between steps.

    Attributes
    ----------
    curvature : KFACLinearOperator
        The factors' moving averages (updated in place by each step).
    preconditioner : LinearOperator or None
        The factored inverse of the last refresh.
    damping : float
        The Levenberg-Marquardt damping ``lambda``.
    velocity : array or None
        The previous update ``delta`` (flat), the momentum direction.
    step : int
        Steps taken.
    loss, rho, alpha, mu : float or None
        Of the last step: the objective before it, the reduction ratio (when the
        damping was adapted), the step size and the momentum coefficient.
    """

    curvature: object
    preconditioner: object = None
    damping: float = 150.0
    velocity: object = None
    step: int = 0
    loss: float | None = None
    rho: float | None = None
    alpha: float | None = None
    mu: float | None = None


class KFAC:
    """K-FAC (Martens & Grosse, 2015): a natural-gradient step with Kronecker factors.

    Objective ``h(theta) = L(theta; batch) + (weight_decay / 2) ||theta||^2``. Each step:

    1. average the batch's K-FAC factors into the state's (``decay = min(1 - 1/k,
       decay_max)`` at the ``k``-th estimate), every ``update_every`` steps;
    2. every ``inverse_every`` steps, refresh the preconditioner: the factored
       inverse ``(B + d_B I)^{-1} (x) (A + d_A I)^{-1}`` with
       ``gamma^2 = lambda + weight_decay`` split between the factors by ``pi``
       (:meth:`KFACLinearOperator.factored_inverse <curvlinops.KFACLinearOperator.factored_inverse>`
       with ``pi_damping=True``);
    3. the proposal ``Delta = -preconditioner grad h``;
    4. ``delta = alpha Delta + mu delta_prev`` with ``(alpha, mu)`` minimizing the
       quadratic model ``g^T d + d^T (C + (lambda + weight_decay) I) d / 2`` over the
       two directions (``C`` the exact GGN or Fisher of the batch: two curvature
       products), or a fixed ``learning_rate`` and ``momentum``;
    5. every ``damping_every`` steps (``T1``), ``rho = (h(theta + delta) - h(theta)) /
       (M(delta) - M(0))`` with the undamped model (``C + weight_decay I``), and
       :func:`levenberg_marquardt` with ``factor = (19/20)^T1``.

    Parameters
    ----------
    model : curvlinops.models.Model
        A model with layer taps (K-FAC's tier 3).
    loss : curvlinops.losses.Loss
    damping : float
        The initial ``lambda`` (Martens & Grosse start at 150 for their autoencoders).
    weight_decay : float
        ``eta``, the coefficient of the l2 term of the objective.
    learning_rate, momentum : float, optional
        Fix ``alpha`` (and ``mu``; default 0 then) instead of the quadratic model.
        With ``learning_rate=None`` and ``momentum=0.0`` only ``alpha`` is chosen.
    update_every, inverse_every, damping_every : int
        Cadences (steps) of the factor update, the inverse refresh and the damping
        adaptation.
    decay_max : float
        The largest moving-average decay (0.95 in the paper).
    fisher_type : {"type-2", "mc", "empirical"}
        The factors' cotangents (:class:`~curvlinops.KFACLinearOperator`).
    curvature : {"ggn", "fisher"}
        The exact curvature of the quadratic model.
    min_damping : float
        Lower bound of the factor shifts.
    seed : int
        Of the factors' Monte-Carlo draws.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import MSELoss, nn
    >>> from curvlinops.optim import KFAC
    >>> model = nn.Sequential(nn.Linear(3, 2, bias=False))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(32, 3))
    >>> batch = (X, X @ rng.normal(size=(3, 2)))
    >>> opt = KFAC(model, MSELoss(), damping=1e-6)
    >>> state = opt.init(params, batch)
    >>> for _ in range(3):
    ...     params, state = opt.step(params, state, batch)
    >>> bool(state.loss < 1e-10)  # linear regression: K-FAC is exact up to the damping
    True
    """

    def __init__(
        self,
        model,
        loss,
        *,
        damping=150.0,
        weight_decay=0.0,
        learning_rate=None,
        momentum=None,
        update_every=1,
        inverse_every=20,
        damping_every=5,
        decay_max=0.95,
        fisher_type="type-2",
        curvature="ggn",
        min_damping=1e-8,
        seed=0,
    ):
        self.model, self.loss = model, loss
        self.damping = check_positive(damping, "damping")
        self.weight_decay = check_positive(weight_decay, "weight_decay", allow_zero=True)
        self.learning_rate = None if learning_rate is None else float(learning_rate)
        self.momentum = None if momentum is None else float(momentum)
        if self.learning_rate is not None and self.momentum is None:
            self.momentum = 0.0
        self.update_every = check_every(update_every, "update_every")
        self.inverse_every = check_every(inverse_every, "inverse_every")
        self.damping_every = check_every(damping_every, "damping_every")
        self.decay_max = float(decay_max)
        self.fisher_type, self.curvature, self.seed = fisher_type, curvature, int(seed)
        self.min_damping = float(min_damping)
        self.omega = (19 / 20) ** self.damping_every

    def init(self, params, batch, *, curvature=None):
        """The first state: K-FAC's factors from ``batch`` (or a given operator).

        Parameters
        ----------
        params : list of arrays
        batch : tuple (X, y)
        curvature : KFACLinearOperator, optional
            Factors to start from (e.g. :meth:`KFACLinearOperator.from_state_dict
            <curvlinops.KFACLinearOperator.from_state_dict>` of a saved run).

        Returns
        -------
        KFACState
        """
        if curvature is None:
            curvature = KFACLinearOperator(
                self.model,
                self.loss,
                params,
                [batch],
                fisher_type=self.fisher_type,
                seed=self.seed,
                num_data=int(batch[0].shape[0]),
                check_deterministic=False,
            )
        return KFACState(curvature=curvature, damping=self.damping)

    def step(self, params, state, batch):
        """One K-FAC step on ``batch``; returns ``(new params, new state)``.

        Parameters
        ----------
        params : list of arrays
        state : KFACState
        batch : tuple (X, y)

        Returns
        -------
        tuple
            The new parameters (list of arrays of the same backend) and state.
        """
        k = state.step + 1
        K = state.curvature
        if state.step > 0 and state.step % self.update_every == 0:
            estimates = K.num_updates + 2  # the construction was the first estimate
            K.update(batch, decay=min(1 - 1 / estimates, self.decay_max), params=params)
        shift = state.damping + self.weight_decay
        preconditioner = state.preconditioner
        if preconditioner is None or state.step % self.inverse_every == 0:
            preconditioner = K.factored_inverse(
                shift, pi_damping=True, min_damping=self.min_damping
            )
        objective = BatchObjective(
            self.model,
            self.loss,
            params,
            batch,
            weight_decay=self.weight_decay,
            curvature=self.curvature,
        )
        value, g = objective.value_and_gradient()
        proposal = -(preconditioner @ g)
        delta, alpha, mu, model_change = self._combine(objective, g, proposal, state, shift)
        theta = objective.theta
        rho, damping = None, state.damping
        if k % self.damping_every == 0:
            rho = reduction_ratio(objective.value_at(theta + delta) - value, model_change)
            damping = levenberg_marquardt(damping, rho, factor=self.omega)
        new_params = as_params(theta + delta, param_shapes(params))
        new_state = replace(
            state,
            preconditioner=preconditioner,
            damping=damping,
            velocity=delta,
            step=k,
            loss=value,
            rho=rho,
            alpha=alpha,
            mu=mu,
        )
        return new_params, new_state

    def _combine(self, objective, g, proposal, state, shift):
        """``delta = alpha Delta + mu delta_prev`` and its undamped model change."""
        xp = objective.xp
        previous = state.velocity
        use_previous = previous is not None and self.momentum != 0.0
        D = xp.stack([proposal, previous], axis=1) if use_previous else proposal[:, None]
        CD = objective.curvature_matmat(D)  # (C + eta I) D: exact products
        Cn = [[dot(xp, D[:, i], CD[:, j]) for j in range(D.shape[1])] for i in range(D.shape[1])]
        Dn = [[dot(xp, D[:, i], D[:, j]) for j in range(D.shape[1])] for i in range(D.shape[1])]
        b = [dot(xp, D[:, i], g) for i in range(D.shape[1])]
        damped = [
            [c + state.damping * d for c, d in zip(rc, rd, strict=True)]
            for rc, rd in zip(Cn, Dn, strict=True)
        ]
        coefficients = self._coefficients(damped, b, use_previous)
        delta = D @ xp.asarray(coefficients, dtype=D.dtype)
        # M(delta) - M(0) = c^T b + c^T (D^T (C + eta I) D) c / 2, without lambda
        quadratic = sum(
            ci * Cn[i][j] * cj
            for i, ci in enumerate(coefficients)
            for j, cj in enumerate(coefficients)
        )
        model_change = sum(c * bi for c, bi in zip(coefficients, b, strict=True)) + 0.5 * quadratic
        mu = coefficients[1] if use_previous else 0.0
        return delta, coefficients[0], mu, model_change

    def _coefficients(self, M, b, use_previous):
        """``(alpha[, mu])`` minimizing ``c^T b + c^T M c / 2`` (fixed ones if given)."""
        if self.learning_rate is not None:
            return [self.learning_rate] + ([self.momentum] if use_previous else [])
        if not use_previous:
            return [-b[0] / M[0][0]]
        if self.momentum is not None:  # a fixed mu: alpha alone
            mu = self.momentum
            return [-(b[0] + mu * M[0][1]) / M[0][0], mu]
        det = M[0][0] * M[1][1] - M[0][1] * M[1][0]
        if not math.isfinite(det) or abs(det) <= 1e-14 * abs(M[0][0] * M[1][1]):
            return [-b[0] / M[0][0], 0.0]  # parallel directions: the proposal alone
        alpha = -(M[1][1] * b[0] - M[0][1] * b[1]) / det
        mu = -(M[0][0] * b[1] - M[1][0] * b[0]) / det
        return [alpha, mu]
