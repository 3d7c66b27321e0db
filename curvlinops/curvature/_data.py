"""Data handling shared by all curvature operators.

Checks the parameters, the data iterable and each batch against the operator's
backend; counts data points; runs the determinism check; wraps iteration in an
optional progress bar; caches per-batch linearizations on request.

With a distributed communicator, each process holds a shard of the data (any number of
batches, none included): :func:`prepare_inputs` runs the local checks and counts on every
rank and exchanges what they found in one collective (:class:`DataShards`: the global
number of data points, which ranks hold data, the shape of one batch of outputs).

May import: ``curvlinops._backend``, ``curvlinops.models``, ``curvlinops.losses``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .._backend import (
    array_namespace,
    assert_same_namespace,
    device as array_device,
    dtype_name,
    namespace_name,
    to_numpy,
)
from .._backend.comm import as_communicator
from .._backend.reduction import gather_outcomes
from ..losses import as_loss
from ..models import as_model

__all__ = [
    "DataShards",
    "NonDeterministicDataError",
    "batch_seed",
    "check_batch_metadata",
    "check_batch_outputs",
    "check_batch_values",
    "check_data_iterable",
    "check_mc_samples",
    "assert_deterministic",
    "count_data",
    "iterate_batches",
    "prepare_inputs",
    "resolve_model",
]


class NonDeterministicDataError(RuntimeError):
    """Two passes over the data disagree (shuffling loader, dropout, random augmentation)."""


def check_params_backend(params):
    """Return ``(xp, dtype, device)`` shared by all parameters, or raise a clear error."""
    if not isinstance(params, (list, tuple)) or len(params) == 0:
        raise TypeError(f"params must be a non-empty list of arrays, got {type(params).__name__}.")
    xp = array_namespace(*params)
    dtypes = {dtype_name(p.dtype) for p in params}
    if len(dtypes) != 1:
        raise TypeError(f"All parameters must share one dtype; found {sorted(dtypes)}.")
    dtype = params[0].dtype
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"Parameters must be real floating, got {dtype_name(dtype)}.")
    return xp, dtype, array_device(params[0])


def check_data_iterable(data):
    """Refuse one-shot iterators: every product iterates over the data again."""
    if iter(data) is data:
        raise TypeError(
            "data must be re-iterable (a list of (X, y) batches or a data loader), but a "
            "one-shot iterator/generator was given: it would be empty on the second product. "
            "Pass list(data) instead."
        )


def check_batch(batch, xp, what_index):
    """Validate one ``(X, y)`` batch and return it."""
    try:
        X, y = batch
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"Each batch must be a pair (X, y); batch {what_index} is a {type(batch).__name__}."
        ) from err
    assert_same_namespace(xp, X, what=f"input X of batch {what_index}")
    assert_same_namespace(xp, y, what=f"target y of batch {what_index}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(
            f"Batch {what_index}: X has {X.shape[0]} data points but y has {y.shape[0]}."
        )
    return X, y


def check_batch_metadata(X, y, params, model_name, index) -> None:
    """Dtypes and devices of one batch against the parameters' (metadata only, no sync).

    Floating inputs and targets must have the parameters' dtype: every frontend would
    otherwise differ (PyTorch refuses, JAX and NumPy promote an operator of one dtype
    to products of another, or round the data). Integer inputs (ids) and targets
    (labels, counts) pass; the model and the loss judge them. Complex data are refused.
    Arrays must sit on the parameters' device.

    Raises
    ------
    TypeError
        A floating array of another dtype than the parameters, or a complex one.
    ValueError
        An array on another device than the parameters.

    Examples
    --------
    >>> import numpy as np
    >>> p = [np.zeros((2, 3), dtype=np.float32)]
    >>> check_batch_metadata(np.zeros((4, 3)), np.zeros(4, dtype=int), p, "Sequential", 2)
    Traceback (most recent call last):
    ...
    TypeError: Batch 2: the inputs X are float64 but the parameters of Sequential are \
float32. ...
    """
    xp = array_namespace(params[0])
    dtype, dev = params[0].dtype, array_device(params[0])
    for what, a in (("inputs X", X), ("targets y", y)):
        if xp.isdtype(a.dtype, "complex floating"):
            raise TypeError(
                f"Batch {index}: the {what} are complex ({dtype_name(a.dtype)}); curvature "
                "operators take real data. Split real and imaginary parts into features."
            )
        if xp.isdtype(a.dtype, "real floating") and a.dtype != dtype:
            raise TypeError(
                f"Batch {index}: the {what} are {dtype_name(a.dtype)} but the parameters of "
                f"{model_name} are {dtype_name(dtype)}. The operator computes in the "
                f"parameters' dtype; cast the data, {_cast_hint(xp, what[-1], dtype)}, or "
                "the parameters to the data's dtype."
            )
        found = _device_or_none(a)
        if found is not None and dev is not None and found != dev:
            raise ValueError(
                f"Batch {index}: the {what} are on device {found} but the parameters of "
                f"{model_name} are on device {dev}. Move the data to the parameters' device "
                "(or the model to the data's) before building the operator; curvlinops "
                "never copies between devices."
            )


def _cast_hint(xp, name, dtype) -> str:
    """How to cast array ``name`` to ``dtype`` in the library of ``xp``."""
    library, dtype = namespace_name(xp), dtype_name(dtype)
    if library == "torch":
        return f"{name}.to(torch.{dtype})"
    prefix = {"numpy": "np", "jax": "jnp", "cupy": "cp"}.get(library, "xp")
    return f"{name}.astype({prefix}.{dtype})"


def _device_or_none(a):
    """The array's device, None where it has no single one (a sharded JAX array)."""
    try:
        return array_device(a)
    except (ValueError, TypeError, AttributeError):
        return None


def iterate_batches(
    data, xp, *, params=None, model_name="the model", progressbar=False, desc="batches"
):
    """Yield ``(index, X, y)`` over the data, optionally with a tqdm progress bar.

    With ``params`` given, each batch's dtypes and devices are checked against them
    (:func:`check_batch_metadata`).
    """
    iterable = data
    if progressbar:
        try:
            from tqdm.auto import tqdm
        except ImportError as err:
            raise ImportError(
                "progressbar=True needs tqdm: pip install tqdm (or curvlinops[demo])."
            ) from err
        iterable = tqdm(data, desc=desc, leave=False)
    for index, batch in enumerate(iterable):
        X, y = check_batch(batch, xp, index)
        if params is not None:
            check_batch_metadata(X, y, params, model_name, index)
        yield index, X, y


def count_data(data, xp, params=None, model_name="the model"):
    """Number of data points in the data set (one pass over it)."""
    batches = iterate_batches(data, xp, params=params, model_name=model_name)
    return sum(int(X.shape[0]) for _, X, _ in batches)


def arrays_equal(a, b) -> bool:
    """Exact equality of two arrays (host comparison; only used at construction)."""
    a, b = to_numpy(a), to_numpy(b)
    return a.shape == b.shape and bool((a == b).all())


def check_mc_samples(mc_samples, *, allow_none=False):
    """``mc_samples`` as an int >= 1 (or None, where None means exact), else ValueError."""
    if mc_samples is None and allow_none:
        return None
    if (
        isinstance(mc_samples, bool)
        or not isinstance(mc_samples, numbers.Real)
        or int(mc_samples) != mc_samples
        or mc_samples < 1
    ):
        accepted = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"mc_samples must be {accepted}, got {mc_samples!r}.")
    return int(mc_samples)


def check_batch_values(loss, outputs, targets, index):
    """``loss.check`` of one batch, its errors naming the batch; returns its summed loss.

    Labels and targets (dtype, range, support), shapes, finite outputs and a finite
    batch loss (finite outputs can still overflow it, e.g. a Poisson log-rate of 100
    in float32); raises the loss's TypeError or ValueError with ``"Batch <index>: "``
    in front. Runs on the outputs the product computes anyway: no extra model pass.
    The batch's ``loss.sum_value`` (an array) comes back, so that a caller that needs
    the loss's value does not evaluate it a second time.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import CrossEntropyLoss
    >>> check_batch_values(CrossEntropyLoss(), np.zeros((2, 3)), np.array([0, 7]), 4)
    Traceback (most recent call last):
    ...
    ValueError: Batch 4: CrossEntropyLoss expects class indices in [0, 2] for 3 classes, got \
labels in [0, 7].
    """
    try:
        loss.check(outputs, targets)
    except (TypeError, ValueError) as error:
        raise type(error)(f"Batch {index}: {error}") from None
    summed = loss.sum_value(outputs, targets)
    value = float(summed)
    if not math.isfinite(value):
        raise ValueError(
            f"Batch {index}: the {loss.name} of the batch is {value} although outputs and "
            "targets are finite: the loss overflowed (outputs too large for the dtype). "
            "Use float64, or rescale the model's outputs."
        )
    return summed


def check_batch_outputs(loss, outputs, index) -> None:
    """``loss.check_outputs`` of one batch (finite outputs), its errors naming the batch.

    For the products that use no targets (Monte-Carlo Fisher, forward-only K-FAC).

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import CrossEntropyLoss
    >>> check_batch_outputs(CrossEntropyLoss(), np.array([[np.inf, 0.0]]), 3)
    Traceback (most recent call last):
    ...
    ValueError: Batch 3: CrossEntropyLoss received outputs with Inf entries ...
    """
    try:
        loss.check_outputs(outputs)
    except (TypeError, ValueError) as error:
        raise type(error)(f"Batch {index}: {error}") from None


def batch_seed(seed: int, index: int, rank: int = 0) -> int:
    """Seed of the Monte-Carlo draws of batch ``index`` of process ``rank``.

    Fixed per operator, batch and rank, so that products are reproducible from one
    seed; distinct across ranks (rank 0 keeps the single-process seeds), whose batch
    indices count their own shards' batches.

    Examples
    --------
    >>> batch_seed(0, 3) == batch_seed(0, 3, rank=0), batch_seed(0, 3) == batch_seed(0, 3, 1)
    (True, False)
    """
    seed = (int(seed) * 1_000_003 + int(index)) % (2**31 - 1)
    if rank:
        seed = (seed * 1_000_033 + 7_919 * int(rank)) % (2**31 - 1)
    return seed


def assert_deterministic(model, loss, params, data, xp):
    """Run over the data twice; raise NonDeterministicDataError if the passes differ."""
    first = _data_fingerprint(model, loss, params, data, xp)
    second = _data_fingerprint(model, loss, params, data, xp)
    if len(first) != len(second):
        raise NonDeterministicDataError(
            f"The data gave {len(first)} batches on one pass and {len(second)} on the next."
        )
    names = ("inputs X", "targets y", "loss", "gradient")
    for index, (a, b) in enumerate(zip(first, second, strict=True)):
        for what, u, v in zip(names, a, b, strict=True):
            if not arrays_equal(u, v):
                raise NonDeterministicDataError(
                    f"Two passes over the data differ in the {what} of batch {index}. "
                    "Curvature operators iterate over the data in every product, so the "
                    "data must come in the same order every time (no shuffling) and the "
                    "model must be deterministic (no dropout). Fix the data loader or "
                    "pass check_deterministic=False if the difference is intended."
                )


def _data_fingerprint(model, loss, params, data, xp):
    from ..models import flatten_params

    prints = []
    for index, X, y in iterate_batches(data, xp, params=params, model_name=model.name):
        lin = model.linearize(params, X)
        check_batch_values(loss, lin.outputs, y, index)
        value = loss.sum_value(lin.outputs, y)
        grad = flatten_params(lin.vjp(loss.gradient(lin.outputs, y)))
        prints.append((X, y, value, grad))
    return prints


def resolve_loss(loss):
    """A curvlinops loss from a curvlinops loss or one a registered adapter translates."""
    return as_loss(loss)


def resolve_model(model, params):
    """``(model, params)`` as a protocol model and a list: a protocol model unchanged,
    anything else through the registered adapters (a PyTorch module with a list of its
    parameters becomes a TorchModel over those parameters and their values)."""
    if params is None:
        raise TypeError(
            "params must be a non-empty list of arrays (for a PyTorch module: a list of its "
            "parameters), got None."
        )
    return as_model(model, params)


def _checked_num_data(num_data) -> int:
    """``num_data`` as a positive int, or a clear error (no bools, no fractions)."""
    integral = isinstance(num_data, numbers.Integral) or (
        isinstance(num_data, numbers.Real) and float(num_data).is_integer()
    )
    if isinstance(num_data, bool) or not integral:
        raise TypeError(
            f"num_data must be a positive integer (the number of data points), got {num_data!r}."
        )
    value = int(num_data)
    if value <= 0:
        raise ValueError(f"num_data must be positive, got {num_data}.")
    return value


@dataclass(frozen=True)
class DataShards:
    """How the data are spread over the processes of a communicator.

    Attributes
    ----------
    comm : Communicator
    has_data : tuple of bool
        Per rank, whether it holds at least one batch.
    outputs_shape : tuple of int or None
        The outputs' shape of the first batch of the first rank with data (None with
        one process, where the operator finds it lazily).
    """

    comm: object
    has_data: tuple = (True,)
    outputs_shape: tuple | None = None

    @property
    def first_with_data(self) -> int:
        """The lowest rank that holds data."""
        return self.has_data.index(True)

    @property
    def local(self) -> bool:
        """Whether this rank holds data."""
        return bool(self.has_data[self.comm.rank])


def prepare_inputs(
    model, loss, params, data, *, tier, who, num_data, check_deterministic, comm=None
):
    """Validate what every curvature operator takes; return ``(loss, xp, dtype, device,
    num_data, shards)``.

    Checks the parameters' backend and shapes, translates a PyTorch loss, requires the
    model tier, refuses one-shot iterators, counts the data when ``num_data`` is None
    and runs the determinism check on request. With a distributed ``comm`` the data are
    this rank's shard, ``num_data`` (given or counted) is the global count, and the
    checks run on every rank's shard: one collective at the end tells every rank the
    count, which ranks hold data (:class:`DataShards`) and any rank's failure.
    """
    xp, dtype, dev = check_params_backend(params)
    loss = resolve_loss(loss)
    model.check_params(params)
    model.require(tier, who)
    comm = as_communicator(comm)
    if comm.distributed:
        num_data, shards = _distributed_inputs(
            model, loss, params, data, xp, who, num_data, check_deterministic, comm
        )
        return loss, xp, dtype, dev, num_data, shards
    num_data = _single_process_inputs(model, loss, params, data, xp, who, num_data)
    if check_deterministic:
        assert_deterministic(model, loss, params, data, xp)
    return loss, xp, dtype, dev, num_data, DataShards(comm)


def _single_process_inputs(model, loss, params, data, xp, who, num_data):
    """The count (or the checked ``num_data``) of data held by one process."""
    check_data_iterable(data)
    if num_data is None:
        num_data = count_data(data, xp, params, model.name)
    else:
        num_data = _checked_num_data(num_data)
        # one batch looked at, not a pass: its metadata fail early, at construction
        if next(iterate_batches(data, xp, params=params, model_name=model.name), None) is None:
            raise ValueError(
                f"{who} got data without batches (num_data={num_data}); pass an iterable "
                "of (X, y) batches with at least one batch."
            )
    if num_data <= 0:
        raise ValueError(f"num_data must be positive, got {num_data}.")
    return num_data


def _distributed_inputs(model, loss, params, data, xp, who, num_data, check_deterministic, comm):
    """``(global num_data, DataShards)`` from every rank's shard, in one collective."""
    if num_data is not None:
        num_data = _checked_num_data(num_data)

    def local():
        check_data_iterable(data)
        batches = iterate_batches(data, xp, params=params, model_name=model.name)
        first = next(batches, None)
        count = None if num_data is not None else count_data(data, xp, params, model.name)
        if check_deterministic:
            assert_deterministic(model, loss, params, data, xp)
        shape = None if first is None else tuple(model(params, first[1]).shape)
        return count, shape, num_data

    outcomes = gather_outcomes(comm, local, f"{who} construction")
    given = sorted({str(n) for _, _, n in outcomes})
    if len(given) > 1:
        raise ValueError(
            f"{who}: the ranks passed different num_data ({', '.join(given)}); num_data is "
            "the global number of data points, the same on every rank (or None to count)."
        )
    has_data = tuple(shape is not None for _, shape, _ in outcomes)
    if not any(has_data):
        raise ValueError(
            f"{who} got data without batches on all {comm.size} ranks; pass each rank an "
            "iterable of (X, y) batches (its shard), with at least one batch on some rank."
        )
    if num_data is None:
        num_data = sum(count for count, _, _ in outcomes)
    if num_data <= 0:
        raise ValueError(f"num_data must be positive, got {num_data}.")
    outputs_shape = next(shape for _, shape, _ in outcomes if shape is not None)
    return num_data, DataShards(comm, has_data, outputs_shape)
