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

from .._backend import host_value, to_numpy
from .._backend.comm import as_communicator
from ..curvature import KFACLinearOperator
from ..models import param_shapes
from ._common import (
    BatchObjective,
    as_params,
    batch_size,
    check_every,
    check_fraction,
    check_positive,
    levenberg_marquardt,
    load_fields,
    reduction_ratio,
    save_fields,
    window,
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
    preconditioner_factors : list or None
        The factors the preconditioner was computed from (``(B, A)`` per layer of
        ``curvature.layers``, ``(exact block, None)`` for elementwise layers; the
        arrays themselves, no copies), so that a saved state can rebuild it.
    preconditioner_shift : float or None
        The ``gamma^2`` it was computed with.
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
    preconditioner_factors: object = None
    preconditioner_shift: float | None = None

    def state_dict(self):
        """The state as plain NumPy arrays (for ``numpy.savez``; no pickle).

        Holds the scalars, the velocity, the curvature's state (keys
        ``curvature/...``, :meth:`KFACLinearOperator.state_dict
        <curvlinops.KFACLinearOperator.state_dict>`) and the factors of the last
        inverse refresh (``preconditioner/...``), from which
        :meth:`KFAC.load_state_dict` recomputes the preconditioner.

        Returns
        -------
        dict
            ``str`` to NumPy arrays; fields that are None are left out.
        """
        out = save_fields(self, "KFAC", _SCALARS, ("velocity",))
        curvature = self.curvature.state_dict()
        out.update({f"curvature/{k}": v for k, v in curvature.items()})
        if self.preconditioner_factors is not None:
            for i, (B, A) in enumerate(self.preconditioner_factors):
                keys = {"exact": B} if A is None else {"B": B, "A": A}
                out.update({f"preconditioner/{k}:{i}": host_value(v) for k, v in keys.items()})
        return out


_SCALARS = {
    "damping": float,
    "step": int,
    "loss": float,
    "rho": float,
    "alpha": float,
    "mu": float,
    "preconditioner_shift": float,
}


def _factors_of(K):
    """K-FAC's stored ``(B, A)`` per layer (``(exact block, None)``): references, no copies."""
    return [
        (K.exact_blocks[la.name], None)
        if la.exact
        else (K.output_factors[la.name], K.input_factors[la.name])
        for la in K.layers
    ]


def _section(state, prefix):
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


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
    statistics_fraction, products_fraction : float
        In ``(0, 1]``: the factors' update (step 1) and the exact curvature products
        of the quadratic model (steps 4-5) use this fraction of the batch, a window
        of its rows that moves each step (all rows are seen in turn; deterministic).
        The products are rescaled to the batch's reduction. The gradient and the
        objective always use the whole batch. Smaller fractions make a step cheaper
        (both are estimates that a part of the batch gives nearly as well); on the
        digits benchmark (``benchmarks/bench_optim.py``) 1/8, with the factors
        updated every second step, keeps K-FAC's amortized step within twice an
        Adam step, converging as with the whole batch.
    comm : optional
        Data-parallel steps (an mpi4py communicator, a ``torch.distributed`` process
        group or a :class:`~curvlinops.Communicator`): every rank calls :meth:`init` and
        :meth:`step` with its shard of the step's batch; factors, gradients, products and
        the objective are over all shards, so every rank takes the same step (see
        :doc:`/distributed`).

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
        statistics_fraction=1.0,
        products_fraction=1.0,
        comm=None,
    ):
        self.model, self.loss = model, loss
        self.comm = as_communicator(comm)
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
        self.statistics_fraction = check_fraction(statistics_fraction, "statistics_fraction")
        self.products_fraction = check_fraction(products_fraction, "products_fraction")

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
                num_data=batch_size(batch, self.comm),
                check_deterministic=False,
                comm=self.comm,
            )
        return KFACState(curvature=curvature, damping=self.damping)

    def load_state_dict(self, state, params):
        """The state saved by :meth:`KFACState.state_dict`, to continue from.

        The curvature is restored with :meth:`KFACLinearOperator.from_state_dict
        <curvlinops.KFACLinearOperator.from_state_dict>` (no pass over data) and the
        preconditioner recomputed from the saved factors of its refresh.

        Parameters
        ----------
        state : dict
            The saved arrays (e.g. ``dict(numpy.load(file, allow_pickle=False))``).
        params : list of arrays
            The current parameters: everything is put on their backend, dtype and
            device (exactly, for the saved dtype).

        Returns
        -------
        KFACState
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
        >>> opt = KFAC(model, CrossEntropyLoss(), damping=0.1)
        >>> state = opt.init(params, batch)
        >>> for _ in range(2):
        ...     params, state = opt.step(params, state, batch)
        >>> file = io.BytesIO()
        >>> np.savez(file, **state.state_dict())
        >>> _ = file.seek(0)
        >>> restored = opt.load_state_dict(dict(np.load(file, allow_pickle=False)), params)
        >>> a, _ = opt.step(params, state, batch)
        >>> b, _ = opt.step(params, restored, batch)
        >>> all(np.array_equal(x, y) for x, y in zip(a, b))
        True
        """
        fields = load_fields(state, "KFAC", _SCALARS, ("velocity",), params)
        curvature = _section(state, "curvature/")
        K = KFACLinearOperator.from_state_dict(
            curvature, self.model, self.loss, params, comm=self.comm
        )
        if "preconditioner_shift" in fields:
            # an operator holding the refresh's factors gives the same factored inverse
            at_refresh = {**curvature, **_section(state, "preconditioner/")}
            P = KFACLinearOperator.from_state_dict(at_refresh, self.model, self.loss, params)
            fields["preconditioner"] = P.factored_inverse(
                fields["preconditioner_shift"], pi_damping=True, min_damping=self.min_damping
            )
            fields["preconditioner_factors"] = _factors_of(P)
        return KFACState(curvature=K, **fields)

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
            K.update(
                window(batch, self.statistics_fraction, state.step),
                decay=min(1 - 1 / estimates, self.decay_max),
                params=params,
            )
        shift = state.damping + self.weight_decay
        preconditioner = state.preconditioner
        factors, used_shift = state.preconditioner_factors, state.preconditioner_shift
        if preconditioner is None or state.step % self.inverse_every == 0:
            preconditioner = K.factored_inverse(
                shift, pi_damping=True, min_damping=self.min_damping
            )
            factors, used_shift = _factors_of(K), shift
        objective = BatchObjective(
            self.model,
            self.loss,
            params,
            batch,
            weight_decay=self.weight_decay,
            curvature=self.curvature,
            comm=self.comm,
        )
        value, g = objective.value_and_gradient()
        proposal = -(preconditioner @ g)
        adapt = k % self.damping_every == 0
        gram = self._curvature_gram(objective, params, batch, state.step)
        delta, alpha, mu, model_change = self._combine(
            objective.xp, gram, g, proposal, state, need_model=adapt
        )
        theta = objective.theta
        rho, damping = None, state.damping
        if adapt:
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
            preconditioner_factors=factors,
            preconditioner_shift=used_shift,
        )
        return new_params, new_state

    def _curvature_gram(self, objective, params, batch, step):
        """``D -> D^T (C + eta I) D`` (host ``(k, k)``), ``C`` from the batch or its window.

        A window's curvature is rescaled to the batch's reduction. The Gram matrix needs
        only Jacobian-vector products (``quadratic_form``), not full products.
        """
        xp, eta = objective.xp, self.weight_decay
        operator, scale = objective.operator, 1.0
        if self.products_fraction < 1.0:
            part = window(batch, self.products_fraction, step)
            sub = BatchObjective(
                self.model, self.loss, params, part, curvature=self.curvature, comm=self.comm
            )
            operator, (N, n) = sub.operator, (objective.num_data, sub.num_data)  # all shards
            # the window's reduction to the batch's: n/N for "mean" (times N/n), 1 for "sum"
            loss = objective.loss
            scale = (N / n) * loss.normalization(N, (N, 1)) / loss.normalization(n, (n, 1))

        def gram(D):
            return to_numpy(scale * operator.quadratic_form(D) + eta * (xp.matrix_transpose(D) @ D))

        return gram

    def _combine(self, xp, gram, g, proposal, state, *, need_model=True):
        """``delta = alpha Delta + mu delta_prev`` and its undamped model change.

        With a fixed learning rate and momentum the curvature is needed only for the
        model change (``need_model``, when the damping is adapted).
        """
        previous = state.velocity
        use_previous = previous is not None and self.momentum != 0.0
        D = xp.stack([proposal, previous], axis=1) if use_previous else proposal[:, None]
        if self.learning_rate is not None and not need_model:
            coefficients = [self.learning_rate] + ([self.momentum] if use_previous else [])
            delta = D @ xp.asarray(coefficients, dtype=D.dtype)
            return delta, coefficients[0], coefficients[-1] if use_previous else 0.0, None
        Cn = gram(D).tolist()  # D^T (C + eta I) D: exact curvature
        Dn = to_numpy(xp.matrix_transpose(D) @ D).tolist()
        b = to_numpy(xp.matrix_transpose(D) @ g).tolist()
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
