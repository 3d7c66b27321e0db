"""Natural-gradient descent, as a functional step on flat arrays.

:class:`NaturalGradient` steps ``-learning_rate (C + damping I)^{-1} grad h`` with
``C`` the exact Fisher or GGN of the batch (solved by conjugate gradients, matrix-free)
or any curvature approximation whose ``inverse(damping)`` is exact (K-FAC, EKFAC, a
diagonal, ...), built on the batch by a callable. :class:`NaturalGradientState` is
what it carries.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.solvers``, ``curvlinops.curvature``, ``._common``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .._backend.comm import as_communicator
from ..models import param_shapes
from ..solvers import cg
from ._common import (
    CURVATURES,
    BatchObjective,
    as_params,
    check_positive,
    load_fields,
    save_fields,
)

__all__ = ["NaturalGradient", "NaturalGradientState"]


@dataclass(frozen=True)
class NaturalGradientState:
    """What :class:`NaturalGradient` carries between steps.

    Attributes
    ----------
    previous : array or None
        The last solution of ``(C + damping I) d = grad h`` (CG's warm start).
    velocity : array or None
        The last update (for ``momentum``).
    step : int
    loss : float or None
        The objective before the last step.
    cg_iterations : int or None
    """

    previous: object = None
    velocity: object = None
    step: int = 0
    loss: float | None = None
    cg_iterations: int | None = None

    def state_dict(self):
        """The state as plain NumPy arrays (for ``numpy.savez``; no pickle).

        Restore with :meth:`NaturalGradient.load_state_dict`.

        Returns
        -------
        dict
            ``str`` to NumPy arrays; fields that are None are left out.

        Examples
        --------
        >>> sorted(NaturalGradientState(step=2, loss=0.5).state_dict())
        ['loss', 'optimizer', 'step']
        """
        return save_fields(self, "NaturalGradient", _SCALARS, _ARRAYS)


_SCALARS = {"step": int, "loss": float, "cg_iterations": int}
_ARRAYS = ("previous", "velocity")


class NaturalGradient:
    """Natural gradient: ``delta = -lr (C + damping I)^{-1} grad h + momentum delta_prev``.

    Parameters
    ----------
    model : curvlinops.models.Model
    loss : curvlinops.losses.Loss
    learning_rate : float
    damping : float
        ``>= 0``.
    curvature : {"fisher", "ggn"} or callable
        ``"fisher"``/``"ggn"``: the exact matrix of the batch, solved by CG
        (``rtol``, ``max_iterations``, warm-started from the last solution). A
        callable ``curvature(model, loss, params, batch) -> operator`` (e.g.
        ``lambda m, l, p, b: KFACLinearOperator(m, l, p, [b])``): the operator's
        exact damped inverse ``inverse(damping)``.
    weight_decay : float
        Adds ``weight_decay * theta`` to the gradient (and ``weight_decay I`` to the
        exact curvature).
    momentum : float
    rtol : float
    max_iterations : int, optional
    warm_start : bool
    comm : optional
        Data-parallel steps (an mpi4py communicator, a ``torch.distributed`` process
        group or a :class:`~curvlinops.Communicator`): every rank calls :meth:`step` with
        its shard of the step's batch; the gradient and the exact curvature's CG
        products are over all shards, so every rank takes the same step. A callable
        ``curvature`` builds its operator itself: pass it the communicator too
        (``lambda m, l, p, b: KFACLinearOperator(m, l, p, [b], comm=comm)``). See
        :doc:`/distributed`.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import CrossEntropyLoss, nn
    >>> from curvlinops.optim import NaturalGradient
    >>> model = nn.Sequential(nn.Linear(3, 3))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> rng = np.random.default_rng(0)
    >>> batch = (rng.normal(size=(30, 3)), rng.integers(0, 3, size=30))
    >>> opt = NaturalGradient(model, CrossEntropyLoss(), learning_rate=0.5, damping=1e-3)
    >>> state = opt.init(params)
    >>> for _ in range(5):
    ...     params, state = opt.step(params, state, batch)
    >>> losses = [state.loss]
    >>> params, state = opt.step(params, state, batch)
    >>> bool(state.loss < losses[0])
    True
    """

    def __init__(
        self,
        model,
        loss,
        *,
        learning_rate=1.0,
        damping=1e-3,
        curvature="fisher",
        weight_decay=0.0,
        momentum=0.0,
        rtol=1e-6,
        max_iterations=None,
        warm_start=True,
        comm=None,
    ):
        self.model, self.loss = model, loss
        self.comm = as_communicator(comm)
        self.learning_rate = check_positive(learning_rate, "learning_rate")
        self.damping = check_positive(damping, "damping", allow_zero=True)
        if not callable(curvature) and curvature not in CURVATURES:
            raise ValueError(
                f"curvature must be one of {sorted(CURVATURES)} or a callable (model, loss, "
                f"params, batch) -> operator, got {curvature!r}."
            )
        self.curvature = curvature
        self.weight_decay = check_positive(weight_decay, "weight_decay", allow_zero=True)
        self.momentum = float(momentum)
        self.rtol, self.max_iterations = float(rtol), max_iterations
        self.warm_start = bool(warm_start)

    def init(self, params, batch=None):
        """The first state (``params`` and ``batch`` are not needed).

        Returns
        -------
        NaturalGradientState
        """
        return NaturalGradientState()

    def load_state_dict(self, state, params):
        """The state saved by :meth:`NaturalGradientState.state_dict`, to continue from.

        Parameters
        ----------
        state : dict
            The saved arrays (e.g. ``dict(numpy.load(file, allow_pickle=False))``).
        params : list of arrays
            The current parameters: the warm start and velocity are put on their
            backend, dtype and device.

        Returns
        -------
        NaturalGradientState

        Examples
        --------
        >>> import numpy as np
        >>> import array_api_compat.numpy as xp
        >>> from curvlinops import MSELoss, nn
        >>> model = nn.Sequential(nn.Linear(2, 1))
        >>> params = model.init(0, xp=xp, dtype=xp.float64)
        >>> opt = NaturalGradient(model, MSELoss(), momentum=0.5)
        >>> params, state = opt.step(params, opt.init(params), (np.eye(2), np.ones((2, 1))))
        >>> restored = opt.load_state_dict(state.state_dict(), params)
        >>> bool(np.array_equal(restored.velocity, state.velocity)), restored.step
        (True, 1)
        """
        return NaturalGradientState(
            **load_fields(state, "NaturalGradient", _SCALARS, _ARRAYS, params)
        )

    def step(self, params, state, batch):
        """One natural-gradient step on ``batch``; returns ``(new params, new state)``.

        Parameters
        ----------
        params : list of arrays
        state : NaturalGradientState
        batch : tuple (X, y)

        Returns
        -------
        tuple
            The new parameters and state.
        """
        exact = not callable(self.curvature)
        objective = BatchObjective(
            self.model,
            self.loss,
            params,
            batch,
            weight_decay=self.weight_decay,
            curvature=self.curvature if exact else "ggn",
            comm=self.comm,
        )
        value, g = objective.value_and_gradient()
        iterations = None
        if exact:
            x0 = state.previous if self.warm_start else None
            direction, info = cg(
                objective.operator,
                g,
                x0,
                damping=self.damping + self.weight_decay,
                rtol=self.rtol,
                maxiter=self.max_iterations,
            )
            iterations = int(info.iterations)
        else:
            operator = self.curvature(self.model, self.loss, params, batch)
            direction = operator.inverse(self.damping) @ g
        delta = -self.learning_rate * direction
        if self.momentum and state.velocity is not None:
            delta = delta + self.momentum * state.velocity
        new_state = replace(
            state,
            previous=direction,
            velocity=delta,
            step=state.step + 1,
            loss=value,
            cg_iterations=iterations,
        )
        return as_params(objective.theta + delta, param_shapes(params)), new_state
