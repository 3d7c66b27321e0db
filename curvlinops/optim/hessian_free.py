"""The Hessian-free optimizer of Martens (2010), as a functional step on flat arrays.

:class:`HessianFree` solves ``(G + lambda I) d = -g`` by conjugate gradients on the
batch's exact GGN (matrix-free), warm-started from the previous solution times
``warm_start_decay``, keeps CG's iterates at geometrically spaced iterations and
backtracks over them on the objective, and adapts ``lambda`` by the
Levenberg-Marquardt rule. An optional diagonal preconditioner comes from the
empirical-Fisher or GGN diagonal. :class:`HessianFreeState` is what it carries.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.solvers``, ``curvlinops.curvature``, ``._common``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .._backend.comm import as_communicator
from ..curvature import EFDiagonalLinearOperator, GGNDiagonalLinearOperator
from ..linalg import DiagonalLinearOperator
from ..models import param_shapes
from ..solvers import cg
from ._common import (
    BatchObjective,
    as_params,
    batch_size,
    check_positive,
    dot,
    levenberg_marquardt,
    load_fields,
    reduction_ratio,
    save_fields,
)

__all__ = ["HessianFree", "HessianFreeState"]

PRECONDITIONERS = {"empirical_fisher": EFDiagonalLinearOperator, "ggn": GGNDiagonalLinearOperator}


@dataclass(frozen=True)
class HessianFreeState:
    """What :class:`HessianFree` carries between steps.

    Attributes
    ----------
    damping : float
        ``lambda``.
    previous : array or None
        The last CG solution (flat), the next warm start before its decay.
    step : int
        Steps taken.
    loss, rho : float or None
        Of the last step: the objective before it and the reduction ratio.
    cg_iterations : int or None
        CG iterations of the last step.
    chosen : int or None
        The CG iteration whose iterate the backtracking chose.
    accepted : bool
        Whether the last step was taken (it is not when no iterate decreased the
        objective).
    """

    damping: float = 1.0
    previous: object = None
    step: int = 0
    loss: float | None = None
    rho: float | None = None
    cg_iterations: int | None = None
    chosen: int | None = None
    accepted: bool = True

    def state_dict(self):
        """The state as plain NumPy arrays (for ``numpy.savez``; no pickle).

        Restore with :meth:`HessianFree.load_state_dict`.

        Returns
        -------
        dict
            ``str`` to NumPy arrays; fields that are None are left out.

        Examples
        --------
        >>> sorted(HessianFreeState(damping=0.5, step=3).state_dict())
        ['accepted', 'damping', 'optimizer', 'step']
        """
        return save_fields(self, "HessianFree", _SCALARS, ("previous",))


_SCALARS = {
    "damping": float,
    "step": int,
    "loss": float,
    "rho": float,
    "cg_iterations": int,
    "chosen": int,
    "accepted": bool,
}


class HessianFree:
    """Hessian-free optimization (Martens, 2010) with the GGN.

    Each step, on ``h(theta) = L(theta; batch) + (weight_decay / 2) ||theta||^2``:

    1. CG on ``(G + (lambda + weight_decay) I) d = -grad h`` from
       ``d_0 = warm_start_decay * d_prev``, at most ``max_iterations`` iterations
       (``rtol`` as :func:`~curvlinops.cg`'s), with the Jacobi-like preconditioner
       ``(diag + lambda + weight_decay)^(-exponent)`` if ``preconditioner`` is given
       (Martens uses the empirical-Fisher diagonal with exponent 3/4);
    2. the iterates at iterations ``ceil(backtrack_base^j)`` and the last are kept;
       backtracking starts at the last and moves to earlier ones while the
       objective decreases (Martens's section 4.6), and the step is
       ``learning_rate`` times the chosen iterate (rejected, ``theta`` unchanged,
       if it does not decrease ``h``);
    3. ``rho = (h(theta + d_N) - h(theta)) / (M(d_N) - M(0))`` with the last
       iterate ``d_N`` and ``M(d) = g^T d + d^T (G + weight_decay I) d / 2``, and
       :func:`levenberg_marquardt` (``rho < 1/4``: ``lambda * 3/2``;
       ``rho > 3/4``: ``lambda * 2/3``); ``d_N`` is the next warm start.

    Parameters
    ----------
    model : curvlinops.models.Model
        A model of tier 1 at least (tier 3 for a preconditioner).
    loss : curvlinops.losses.Loss
    damping : float
        The initial ``lambda``.
    max_iterations : int
        CG's iteration limit per step.
    rtol : float
        CG's relative residual tolerance.
    warm_start_decay : float
        In ``[0, 1]`` (0: no warm start).
    preconditioner : {None, "empirical_fisher", "ggn"}
        The diagonal of the preconditioner.
    exponent : float
        Its exponent.
    backtrack_base : float
        Spacing of the kept iterates (> 1).
    learning_rate : float
        Scale of the chosen iterate.
    weight_decay : float
    lm_factor : float
        The Levenberg-Marquardt factor (2/3).
    curvature : {"ggn", "fisher"}
    comm : optional
        Data-parallel steps (an mpi4py communicator, a ``torch.distributed`` process
        group or a :class:`~curvlinops.Communicator`): every rank calls :meth:`step` with
        its shard of the step's batch; the gradient, the CG products (one all-reduce
        each), the preconditioner and the objective are over all shards, so every rank
        takes the same step (see :doc:`/distributed`).

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import MSELoss, nn
    >>> from curvlinops.optim import HessianFree
    >>> model = nn.Sequential(nn.Linear(3, 1))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(20, 3))
    >>> batch = (X, X @ rng.normal(size=(3, 1)) + 0.5)
    >>> opt = HessianFree(model, MSELoss(), damping=1e-10, rtol=1e-12)
    >>> params, state = opt.step(params, opt.init(params), batch)
    >>> residual = model(params, X) - batch[1]
    >>> bool(np.abs(residual).max() < 1e-8)  # a quadratic: solved in one step
    True
    """

    def __init__(
        self,
        model,
        loss,
        *,
        damping=1.0,
        max_iterations=250,
        rtol=5e-4,
        warm_start_decay=0.95,
        preconditioner=None,
        exponent=0.75,
        backtrack_base=1.3,
        learning_rate=1.0,
        weight_decay=0.0,
        lm_factor=2 / 3,
        curvature="ggn",
        comm=None,
    ):
        self.model, self.loss = model, loss
        self.comm = as_communicator(comm)
        self.damping = check_positive(damping, "damping")
        self.max_iterations = int(max_iterations)
        self.rtol = check_positive(rtol, "rtol", allow_zero=True)
        self.warm_start_decay = float(warm_start_decay)
        if not 0.0 <= self.warm_start_decay <= 1.0:
            raise ValueError(f"warm_start_decay must be in [0, 1], got {warm_start_decay}.")
        if preconditioner is not None and preconditioner not in PRECONDITIONERS:
            raise ValueError(
                f"preconditioner must be None or one of {sorted(PRECONDITIONERS)}, got "
                f"{preconditioner!r}."
            )
        self.preconditioner, self.exponent = preconditioner, float(exponent)
        if not backtrack_base > 1.0:
            raise ValueError(f"backtrack_base must be > 1, got {backtrack_base}.")
        self.backtrack_base = float(backtrack_base)
        self.learning_rate = check_positive(learning_rate, "learning_rate")
        self.weight_decay = check_positive(weight_decay, "weight_decay", allow_zero=True)
        self.lm_factor, self.curvature = float(lm_factor), curvature

    def init(self, params, batch=None):
        """The first state (no warm start; ``params`` and ``batch`` are not needed).

        Returns
        -------
        HessianFreeState
        """
        return HessianFreeState(damping=self.damping)

    def load_state_dict(self, state, params):
        """The state saved by :meth:`HessianFreeState.state_dict`, to continue from.

        Parameters
        ----------
        state : dict
            The saved arrays (e.g. ``dict(numpy.load(file, allow_pickle=False))``).
        params : list of arrays
            The current parameters: the warm start is put on their backend, dtype and
            device (exactly, for the saved dtype).

        Returns
        -------
        HessianFreeState
            Steps from it continue as the saved run would have (bit for bit on the same
            backend and dtype).

        Examples
        --------
        >>> import io
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import MSELoss, nn
        >>> model = nn.Sequential(nn.Linear(3, 1))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> batch = (np.eye(3), np.ones((3, 1)))
        >>> opt = HessianFree(model, MSELoss(), damping=0.1)
        >>> params, state = opt.step(params, opt.init(params), batch)
        >>> file = io.BytesIO()
        >>> np.savez(file, **state.state_dict())
        >>> _ = file.seek(0)
        >>> restored = opt.load_state_dict(dict(np.load(file, allow_pickle=False)), params)
        >>> bool(np.array_equal(restored.previous, state.previous)), restored.step
        (True, 1)
        """
        return HessianFreeState(
            **load_fields(state, "HessianFree", _SCALARS, ("previous",), params)
        )

    def step(self, params, state, batch):
        """One Hessian-free step on ``batch``; returns ``(new params, new state)``.

        Parameters
        ----------
        params : list of arrays
        state : HessianFreeState
        batch : tuple (X, y)

        Returns
        -------
        tuple
            The new parameters and state.
        """
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
        shift = state.damping + self.weight_decay
        x0 = None
        if state.previous is not None and self.warm_start_decay > 0:
            x0 = self.warm_start_decay * state.previous
        kept, record = self._recorder()
        last, info = cg(
            objective.operator,
            -g,
            x0,
            damping=shift,
            rtol=self.rtol,
            maxiter=self.max_iterations,
            M=self._preconditioner(params, batch, shift),
            callback=record,
        )
        iterations = int(info.iterations)
        kept.append((iterations, last))
        theta = objective.theta
        chosen, best, last_value = self._backtrack(objective, theta, kept)
        model_change = dot(objective.xp, g, last) + 0.5 * objective.curvature_quadratic(last)
        rho = reduction_ratio(last_value - value, model_change)
        damping = levenberg_marquardt(state.damping, rho, factor=self.lm_factor)
        accepted = best[1] < value
        new_theta = theta + self.learning_rate * best[0] if accepted else theta
        new_state = replace(
            state,
            damping=damping,
            previous=last,
            step=state.step + 1,
            loss=value,
            rho=rho,
            cg_iterations=iterations,
            chosen=chosen,
            accepted=accepted,
        )
        return as_params(new_theta, param_shapes(params)), new_state

    def _recorder(self):
        """A CG callback keeping the iterates at iterations ``ceil(base^j)``."""
        keep, j = set(), 0
        while self.backtrack_base**j <= self.max_iterations + 1:
            keep.add(math.ceil(self.backtrack_base**j))
            j += 1
        kept, counter = [], [0]

        def record(x):
            counter[0] += 1
            if counter[0] in keep:
                kept.append((counter[0], x))

        return kept, record

    def _backtrack(self, objective, theta, kept):
        """From the last kept iterate back while ``h`` decreases.

        Returns ``(chosen iteration, (iterate, h there), h at the last iterate)``.
        """
        chosen, d = kept[-1]
        best = (d, objective.value_at(theta + self.learning_rate * d))
        last_value = best[1]
        for i, d in reversed(kept[:-1]):
            if i >= chosen:  # the last iterate kept twice
                continue
            value = objective.value_at(theta + self.learning_rate * d)
            if not value < best[1]:
                break
            best, chosen = (d, value), i
        return chosen, best, last_value

    def _preconditioner(self, params, batch, shift):
        if self.preconditioner is None:
            return None
        diag = PRECONDITIONERS[self.preconditioner](
            self.model,
            self.loss,
            params,
            [batch],
            num_data=batch_size(batch, self.comm),
            check_deterministic=False,
            comm=self.comm,
        ).diagonal()
        return DiagonalLinearOperator((diag + shift) ** (-self.exponent))
