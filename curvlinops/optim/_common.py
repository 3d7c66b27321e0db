"""What the optimizers share: the objective of one batch, Levenberg-Marquardt damping.

- :class:`BatchObjective`: ``h(theta) = loss over one batch + (weight_decay / 2)
  ||theta||^2`` at flat parameters, its gradient and exact curvature products (GGN or
  Fisher, with the batch's forward pass cached), and the quadratic model
  ``M(d) = g^T d + d^T C d / 2`` the reduction ratio compares with;
- :func:`levenberg_marquardt` (the damping rule) and :func:`reduction_ratio`;
- the saved form of the optimizers' states: plain NumPy arrays (:func:`save_fields`,
  :func:`load_fields`), as ``numpy.savez`` writes them without pickle.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.curvature``.
"""

from __future__ import annotations

import math

from .._backend import array_namespace, device as array_device, from_host, host_str, host_value
from .._backend.comm import as_communicator
from .._backend.reduction import collective_sum
from ..curvature import FisherLinearOperator, GGNLinearOperator
from ..models import flatten_params, param_shapes, unflatten_params

__all__ = ["levenberg_marquardt", "reduction_ratio"]

CURVATURES = {"ggn": GGNLinearOperator, "fisher": FisherLinearOperator}


def levenberg_marquardt(damping, rho, *, factor=2 / 3, low=0.25, high=0.75):
    """The Levenberg-Marquardt rule: a new damping from the reduction ratio ``rho``.

    ``rho > high``: the quadratic model is trusted, ``damping * factor``; ``rho < low``
    (or ``rho`` not finite: the model predicted no decrease, or the loss is not
    finite): ``damping / factor``; otherwise unchanged. Martens (2010) uses
    ``factor = 2/3`` (``rho < 1/4``: times 3/2; ``rho > 3/4``: times 2/3); Martens &
    Grosse (2015) ``factor = (19/20)^T1`` for an adaptation every ``T1`` steps.

    Parameters
    ----------
    damping : float
        The current damping ``lambda > 0``.
    rho : float
        The reduction ratio (:func:`reduction_ratio`).
    factor : float
        In ``(0, 1)``.
    low, high : float
        The thresholds, ``low <= high``.

    Returns
    -------
    float

    Examples
    --------
    >>> levenberg_marquardt(1.0, 0.9), levenberg_marquardt(1.0, 0.1), levenberg_marquardt(1.0, 0.5)
    (0.6666666666666666, 1.5, 1.0)
    """
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor must be in (0, 1), got {factor}.")
    if not low <= high:
        raise ValueError(f"low must not exceed high, got low={low}, high={high}.")
    rho = float(rho)
    if not math.isfinite(rho) or rho < low:
        return float(damping) / factor
    if rho > high:
        return float(damping) * factor
    return float(damping)


def reduction_ratio(actual, predicted):
    """``rho = actual / predicted``: the change of the objective over its model's change.

    ``predicted`` is ``M(d) - M(0)`` of the quadratic model; a model that predicts no
    decrease (``predicted >= 0``) or a non-finite change gives ``-inf`` (the step is
    not trusted).

    Examples
    --------
    >>> reduction_ratio(-0.5, -1.0), reduction_ratio(-0.5, 0.0)
    (0.5, -inf)
    """
    actual, predicted = float(actual), float(predicted)
    if not (math.isfinite(actual) and math.isfinite(predicted)) or predicted >= 0:
        return -math.inf
    return actual / predicted


def check_positive(value, what, *, allow_zero=False):
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{what} must be a finite number {bound}, got {value}.")
    return value


def check_every(value, what):
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}.")
    return int(value)


class BatchObjective:
    """``h(theta) = L(theta; batch) + (weight_decay / 2) ||theta||^2`` at flat parameters.

    ``L`` is the loss over the batch with its own reduction. The curvature
    (``"ggn"`` or ``"fisher"``) is built once at ``params`` with the batch's forward
    pass cached, so its gradient and products share one forward pass; the weight
    decay adds ``weight_decay * I`` to the curvature in :meth:`curvature_quadratic`.

    With a distributed ``comm`` the batch is this rank's shard of the step's batch:
    the loss, gradient and products are over all shards (``num_data`` is the global
    batch size), the same on every rank.
    """

    def __init__(self, model, loss, params, batch, *, weight_decay=0.0, curvature="ggn", comm=None):
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {sorted(CURVATURES)}, got {curvature!r}.")
        self.model, self.loss, self.batch = model, loss, batch
        self.shapes = param_shapes(params)
        self.weight_decay = float(weight_decay)
        self.comm = as_communicator(comm)
        self.operator = CURVATURES[curvature](
            model,
            loss,
            params,
            [batch],
            num_data=batch_size(batch, self.comm),
            check_deterministic=False,
            cache=True,
            comm=self.comm,
        )
        self.num_data = self.operator.num_data
        self.loss = self.operator.loss
        self.xp = self.operator.xp
        self.theta = flatten_params(params, self.shapes)

    def value_and_gradient(self):
        """``(h(theta), grad h(theta))`` (a float and a flat array)."""
        grads, value = self.operator.gradient_and_loss()
        g = flatten_params(grads, self.shapes)
        return float(value) + self._decay_value(self.theta), g + self.weight_decay * self.theta

    def value_at(self, theta):
        """``h`` at other flat parameters (one forward pass on the batch; distributed,
        on every shard, with one all-reduce of the loss)."""
        X, y = self.batch
        params = unflatten_params(theta, self.shapes)
        found = {}

        def local():
            outputs = self.model(params, X)
            found["shape"] = tuple(outputs.shape)
            return [self.loss.sum_value(outputs, y)]

        op = self.operator
        (value,) = collective_sum(
            self.comm, local, [()], xp=op.xp, dtype=op.dtype, device=op.device, what="objective"
        )
        c = self.loss.normalization(self.num_data, op.shards.outputs_shape or found["shape"])
        return c * float(value) + self._decay_value(theta)

    def curvature_quadratic(self, d):
        """``d^T (C + weight_decay I) d`` for one flat direction (a float; JVPs only)."""
        value = float(self.operator.quadratic_form(d)[0, 0])
        return value + self.weight_decay * dot(self.xp, d, d)

    def _decay_value(self, theta):
        if not self.weight_decay:
            return 0.0
        return 0.5 * self.weight_decay * float(self.xp.sum(theta * theta))


def batch_size(batch, comm):
    """``num_data`` for an operator over one batch: its size with one process, None
    (counted over all shards at construction) with a distributed ``comm``."""
    return None if comm.distributed else int(batch[0].shape[0])


def as_params(theta, shapes):
    """Flat parameters back as the list of arrays."""
    return unflatten_params(theta, shapes)


def check_fraction(value, what):
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {value}.")
    return value


def window(batch, fraction, step):
    """The rows ``[s, s + n)`` (cyclically) of ``batch``, ``n = ceil(fraction N)``, ``s = step n``.

    A window that moves by its own length each step, so that successive steps see
    the whole batch; deterministic (a resumed run takes the same rows) and without
    random numbers. ``fraction == 1``: the batch itself.
    """
    if fraction >= 1.0:
        return batch
    X, y = batch
    N = int(X.shape[0])
    n = max(1, math.ceil(fraction * N))
    xp = array_namespace(X)
    rows = (xp.arange(n, device=array_device(X)) + (step * n) % N) % N
    return xp.take(X, rows, axis=0), xp.take(xp.asarray(y), rows, axis=0)


def save_fields(state, name, scalars, arrays):
    """A state's fields as plain host arrays; fields that are None are left out.

    ``scalars``: field names of numbers and booleans (0-d arrays, floats exact);
    ``arrays``: names of flat parameter-space arrays. ``"optimizer"`` names the class.
    """
    out = {"optimizer": host_value(name)}
    for field in scalars:
        value = getattr(state, field)
        if value is not None:
            out[field] = host_value(value)
    for field in arrays:
        value = getattr(state, field)
        if value is not None:
            out[field] = host_value(value)
    return out


def load_fields(saved, name, scalars, arrays, params):
    """The fields :func:`save_fields` wrote, arrays on the parameters' backend and dtype.

    ``scalars``: ``field -> type`` (``float``, ``int``, ``bool``); a missing field is
    None.
    """
    found = host_str(saved["optimizer"]) if "optimizer" in saved else None
    if found != name:
        raise ValueError(f"The saved state is of {found!r}, not of a {name} optimizer.")
    fields = {f: kind(saved[f].item()) for f, kind in scalars.items() if f in saved}
    reference = params[0]
    xp = array_namespace(reference)
    for field in arrays:
        if field in saved:
            fields[field] = from_host(saved[field], xp, reference.dtype, array_device(reference))
    return fields


def dot(xp, a, b):
    return float(xp.sum(a * b))
