"""The :class:`Loss` base class: what the curvature layer needs from a loss, in output space.

A loss here is the negative log-likelihood of a predictive distribution ``r(y | f)``
whose parameters are the model outputs ``f``. Everything the curvature operators need
lives in output space and is batched over the data (no loops over samples):

- the reduced value (matching PyTorch's loss of the same name),
- per-datum gradients, Hessian products and symmetric Hessian factors,
- the Fisher of the predictive distribution (computed from the distribution itself),
- samples from the predictive distribution and the sampled gradients of MC Fisher.

Shapes. ``outputs`` is ``(N, C)`` or ``(N, *S, C)``: a batch axis ``N`` of data
points, optional shared axes ``S`` (e.g. sequence positions), and the last axis of
the distribution's parameters. The loss of a datum sums over its shared axes and its
last axis; the value of a batch sums (``"sum"``) or averages the way PyTorch does
(``"mean"``) over the data.

May import: ``curvlinops._backend``.
"""

from __future__ import annotations

import math
import numbers

from .._backend import (
    all_finite,
    array_namespace,
    as_generator,
    device,
    dtype_name,
    namespace_name,
    to_numpy,
)

__all__ = ["Loss"]

_REDUCTIONS = ("mean", "sum")


class Loss:
    """Base class of the losses: a negative log-likelihood ``-log r(y | f)`` in output space.

    Conventions (the curvature layer relies on them):

    - ``l_n = -log r(y_n | f_n) + const`` is the *unnormalized* loss of datum ``n``,
      summed over its shared axes and its last axis. :meth:`sum_value`,
      :meth:`gradient`, :meth:`hessian_matmat`, :meth:`hessian_sqrt`,
      :meth:`fisher_matmat`, :meth:`fisher_sqrt` and :meth:`sampled_gradients` all
      refer to ``l_n`` (summed over the batch where a scalar is returned).
    - :meth:`normalization` is the factor that turns sums over data into the loss's
      reduction over a data set: ``1`` for ``"sum"``, ``1 / (num_data * count)`` for
      ``"mean"``, with ``count`` what PyTorch's mean divides by per datum. Calling the
      loss returns ``sum_value * normalization(N, outputs.shape)``, PyTorch's value.
    - Per-datum matrices act on the flattened non-batch axes of ``f_n``. The loss is a
      sum of independent terms over the shared axes ``S``, so its Hessian and Fisher
      are block diagonal over them; the factors :meth:`hessian_sqrt` and
      :meth:`fisher_sqrt` return one block factor per position,
      ``outputs.shape + (R,)``, with ``H_{n,s} = S_{n,s} S_{n,s}^T`` (for outputs
      ``(N, C)`` this is simply ``H_n = S_n S_n^T``).
    - ``V`` arguments carry a trailing axis ``K`` of vectors: ``outputs.shape + (K,)``.
    - Every method takes arrays of any array-API namespace and returns arrays of it.

    Validation. :meth:`check` (also run by ``__call__``) inspects values: label range,
    finiteness of the outputs. It needs a host synchronization, so the other methods
    only check namespaces, dtypes and shapes; a curvature operator calls :meth:`check`
    once per batch.

    Subclasses implement the underscore hooks; the public methods validate and call
    them. The hooks must broadcast over extra *leading* axes of the targets (samples).

    Parameters
    ----------
    reduction : {"mean", "sum"}
        How the batch value is reduced (as in PyTorch).

    Attributes
    ----------
    is_natural : bool
        Whether the outputs are the natural parameters of an exponential family, so
        that the Hessian of ``l_n`` equals the Fisher of ``r`` (then GGN = Fisher, and
        the GGN is tagged positive semi-definite). ``False`` unless a subclass declares
        it: a loss whose Hessian may be indefinite must not claim it.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import MSELoss
    >>> loss = MSELoss()
    >>> f, y = np.array([[1.0, 2.0]]), np.array([[0.0, 0.0]])
    >>> float(loss(f, y)), float(loss.sum_value(f, y)), loss.normalization(1, f.shape)
    (2.5, 5.0, 0.5)
    """

    is_natural: bool = False

    def __init__(self, reduction: str = "mean"):
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"reduction must be one of {_REDUCTIONS}, got {reduction!r}. "
                "('none' is not supported: curvature needs a scalar loss.)"
            )
        self.reduction = reduction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    @property
    def name(self) -> str:
        """Name used in error messages."""
        return type(self).__name__

    # -- public API -------------------------------------------------------------------

    def __call__(self, outputs, targets):
        """The reduced loss of the batch, as PyTorch computes it (a 0-d array).

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import CrossEntropyLoss
        >>> float(CrossEntropyLoss(reduction="sum")(np.zeros((3, 2)), np.array([0, 1, 1])))
        2.0794415416798357
        """
        xp, targets = self._validated(outputs, targets, values=True)
        scale = self.normalization(outputs.shape[0], tuple(outputs.shape))
        return xp.sum(self._loss_terms(xp, outputs, targets)) * scale

    def check(self, outputs, targets) -> None:
        """Validate a batch: namespaces, dtypes, shapes, target values, finite outputs.

        Raises
        ------
        TypeError
            Mixed array libraries, non-floating outputs, targets of the wrong dtype
            (e.g. floating class indices).
        ValueError
            Shapes that do not match, labels or targets out of range, non-finite
            outputs.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import CrossEntropyLoss
        >>> CrossEntropyLoss().check(np.zeros((2, 3)), np.array([0, 3]))
        Traceback (most recent call last):
        ...
        ValueError: CrossEntropyLoss expects class indices in [0, 2] for 3 classes, got labels \
in [0, 3].
        """
        self._validated(outputs, targets, values=True)

    def check_outputs(self, outputs) -> None:
        """Validate a batch of outputs alone: dtype, shape, finite values.

        What :meth:`check` does without targets, for what uses only the outputs (the
        Monte-Carlo Fisher samples its targets from them).

        Raises
        ------
        TypeError
            Non-floating outputs.
        ValueError
            Outputs of the wrong shape, or not finite (the message says which entries).

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import CrossEntropyLoss
        >>> CrossEntropyLoss().check_outputs(np.array([[0.0, 1.0], [np.nan, 0.0]]))
        Traceback (most recent call last):
        ...
        ValueError: CrossEntropyLoss received outputs with NaN entries (1 of 4; data points \
[1] of the batch); ...
        """
        self._check_finite_outputs(self._validated_outputs(outputs), outputs)

    def normalization(self, num_data: int, outputs_shape) -> float:
        """Factor turning sums over data into the reduction over ``num_data`` data points.

        ``1`` for ``"sum"``; for ``"mean"``, ``1 / (num_data * count)`` where ``count``
        is what PyTorch's mean divides by per datum (the number of elements of the
        loss per datum, see the subclass).

        Parameters
        ----------
        num_data : int
            Number of data points of the whole data set.
        outputs_shape : tuple of int
            Shape of one batch of outputs (only its non-batch axes matter).

        Examples
        --------
        >>> from curvlinops import CrossEntropyLoss, MSELoss
        >>> MSELoss().normalization(10, (4, 3)), CrossEntropyLoss().normalization(10, (4, 5, 3))
        (0.03333333333333333, 0.02)
        """
        if not isinstance(num_data, numbers.Integral) or num_data <= 0:
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}.")
        if self.reduction == "sum":
            return 1.0
        return 1.0 / (int(num_data) * self._per_datum_count(tuple(outputs_shape)))

    def sum_value(self, outputs, targets):
        """``sum_n l_n``: the unnormalized loss summed over the batch (0-d array).

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import MSELoss
        >>> float(MSELoss().sum_value(np.ones((2, 2)), np.zeros((2, 2))))
        4.0
        """
        xp, targets = self._validated(outputs, targets)
        return xp.sum(self._loss_terms(xp, outputs, targets))

    def gradient(self, outputs, targets):
        """Per-datum gradients ``grad_f l_n`` stacked over the batch (outputs' shape).

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import MSELoss
        >>> MSELoss().gradient(np.ones((1, 2)), np.zeros((1, 2))).tolist()
        [[2.0, 2.0]]
        """
        xp, targets = self._validated(outputs, targets)
        return self._gradient(xp, outputs, targets)

    def hessian_matmat(self, outputs, targets, V):
        """Per-datum Hessians of ``l_n`` applied to ``V`` (``outputs.shape + (K,)``).

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import CrossEntropyLoss
        >>> H = CrossEntropyLoss().hessian_matmat(np.zeros((1, 2)), np.array([0]), np.eye(2)[None])
        >>> H.tolist()  # diag(p) - p p^T with p = (1/2, 1/2)
        [[[0.25, -0.25], [-0.25, 0.25]]]
        """
        xp, targets = self._validated(outputs, targets)
        self._check_vectors(outputs, V)
        return self._hessian_matmat(xp, outputs, targets, V)

    def hessian_sqrt(self, outputs, targets):
        """Symmetric factor ``S`` (``outputs.shape + (R,)``) with ``H = S S^T`` per datum.

        With shared axes the factor is per position (see the class notes).

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import BCEWithLogitsLoss
        >>> BCEWithLogitsLoss().hessian_sqrt(np.zeros((1, 2)), np.ones((1, 2))).tolist()
        [[[0.5, 0.0], [0.0, 0.5]]]
        """
        xp, targets = self._validated(outputs, targets)
        return self._hessian_sqrt(xp, outputs, targets)

    def fisher_matmat(self, outputs, V):
        """Per-datum Fisher of ``r(y | f_n)`` applied to ``V`` (``outputs.shape + (K,)``).

        The Fisher ``E_{y ~ r}[grad_f log r grad_f log r^T]`` is computed from the
        distribution (enumeration or closed form, see the subclass), not from the
        Hessian.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import PoissonNLLLoss
        >>> F = PoissonNLLLoss().fisher_matmat(np.log([[2.0, 3.0]]), np.ones((1, 2, 1)))
        >>> np.round(F, 12).tolist()  # the rates, up to the rounding of exp(log(3))
        [[[2.0], [3.0]]]
        """
        xp = self._validated_outputs(outputs)
        self._check_vectors(outputs, V)
        return self._fisher_matmat(xp, outputs, V)

    def fisher_sqrt(self, outputs):
        """Factor ``S`` (``outputs.shape + (R,)``) with ``F = S S^T`` per datum (or position).

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import CrossEntropyLoss
        >>> S = CrossEntropyLoss().fisher_sqrt(np.zeros((1, 2)))
        >>> np.round(S[0] @ S[0].T, 12).tolist()
        [[0.25, -0.25], [-0.25, 0.25]]
        """
        xp = self._validated_outputs(outputs)
        return self._fisher_sqrt(xp, outputs)

    def sample(self, outputs, num_samples: int, seed):
        """Draw ``num_samples`` targets per datum from ``r(y | f_n)``.

        Parameters
        ----------
        outputs : array
            Model outputs.
        num_samples : int
            Number of draws ``M``.
        seed : int or generator
            Explicit seed (see :class:`curvlinops.RandomGenerator`).

        Returns
        -------
        array
            ``(M,) + targets_shape``, in the format the loss accepts as targets.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import CrossEntropyLoss
        >>> y = CrossEntropyLoss().sample(np.array([[0.0, 50.0]]), num_samples=3, seed=0)
        >>> y.tolist()
        [[1], [1], [1]]
        """
        xp = self._validated_outputs(outputs)
        num_samples = _check_num_samples(num_samples)
        generator = as_generator(seed, xp, device(outputs))
        return self._sample(generator, xp, outputs, num_samples)

    def sampled_gradients(self, outputs, num_samples: int, seed):
        """Gradients at sampled targets, ``outputs.shape + (M,)``, scaled by ``1/sqrt(M)``.

        Column ``m`` is ``grad_f l_n(y_m) / sqrt(M)`` with ``y_m ~ r(y | f_n)``, so that
        ``G_n G_n^T`` is the Monte-Carlo estimate of the Fisher of datum ``n`` with
        ``M`` samples (what MC Fisher and MC K-FAC use).

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import MSELoss
        >>> G = MSELoss().sampled_gradients(np.zeros((4, 2)), num_samples=5, seed=0)
        >>> G.shape
        (4, 2, 5)
        """
        xp = self._validated_outputs(outputs)
        num_samples = _check_num_samples(num_samples)
        generator = as_generator(seed, xp, device(outputs))
        samples = self._sample(generator, xp, outputs, num_samples)
        grads = self._gradient(xp, outputs, samples)
        return _move_first_axis_last(xp, grads) / math.sqrt(num_samples)

    # -- hooks of the subclasses --------------------------------------------------------

    def _per_datum_count(self, outputs_shape) -> int:
        """Number of loss elements per datum that PyTorch's mean divides by."""
        raise NotImplementedError

    def _check_outputs_shape(self, outputs) -> None:
        """Raise ValueError for output shapes the loss cannot take (default: ndim >= 2)."""
        if outputs.ndim < 2:
            raise ValueError(
                f"{self.name} expects outputs of shape (N, C) or (N, ..., C), got shape "
                f"{tuple(outputs.shape)}. Add a trailing axis of size 1 for scalar outputs."
            )

    def _prepare_targets(self, xp, outputs, targets):
        """Check dtype and shape of the targets (no host sync); return them converted."""
        raise NotImplementedError

    def _check_target_values(self, xp, outputs, targets) -> None:
        """Value checks that need a host sync (label range, finiteness)."""
        if not all_finite(targets, xp):
            raise ValueError(
                f"{self.name} received targets with {_non_finite(xp, targets)}; clean the "
                "data (drop or impute the missing targets)."
            )

    def _loss_terms(self, xp, outputs, targets):
        """Array whose sum over all axes is ``sum_n l_n``."""
        raise NotImplementedError

    def _gradient(self, xp, outputs, targets):
        """``grad_f l_n``; broadcasts over extra leading axes of ``targets``."""
        raise NotImplementedError

    def _hessian_diagonal(self, xp, outputs, targets):
        """Diagonal of the per-datum Hessian, for losses whose Hessian is diagonal."""
        raise NotImplementedError(f"{self.name} has no diagonal Hessian.")

    def _fisher_diagonal(self, xp, outputs):
        """Diagonal of the per-datum Fisher, for distributions with independent entries."""
        raise NotImplementedError(f"{self.name} has no diagonal Fisher.")

    def _hessian_matmat(self, xp, outputs, targets, V):
        return self._hessian_diagonal(xp, outputs, targets)[..., None] * V

    def _hessian_sqrt(self, xp, outputs, targets):
        return _embed_diagonal(xp, xp.sqrt(self._hessian_diagonal(xp, outputs, targets)))

    def _fisher_matmat(self, xp, outputs, V):
        return self._fisher_diagonal(xp, outputs)[..., None] * V

    def _fisher_sqrt(self, xp, outputs):
        return _embed_diagonal(xp, xp.sqrt(self._fisher_diagonal(xp, outputs)))

    def _sample(self, generator, xp, outputs, num_samples):
        """``(M,) + targets_shape`` draws from ``r(y | f)``."""
        raise NotImplementedError

    # -- validation ------------------------------------------------------------------------

    def _validated_outputs(self, outputs):
        xp = array_namespace(outputs)
        if not xp.isdtype(outputs.dtype, "real floating"):
            raise TypeError(
                f"{self.name} expects real floating outputs (logits, means, ...), got dtype "
                f"{dtype_name(outputs.dtype)}. Cast them, e.g. to float32 or float64."
            )
        self._check_outputs_shape(outputs)
        return xp

    def _validated(self, outputs, targets, *, values=False):
        xp = self._validated_outputs(outputs)
        targets_xp = array_namespace(targets)
        if namespace_name(targets_xp) != namespace_name(xp):
            raise TypeError(
                f"{self.name}: outputs are {namespace_name(xp)} arrays but targets are "
                f"{namespace_name(targets_xp)} arrays. Convert them to one library first."
            )
        targets = self._prepare_targets(xp, outputs, targets)
        if values:
            self._check_finite_outputs(xp, outputs)
            self._check_target_values(xp, outputs, targets)
        return xp, targets

    def _check_finite_outputs(self, xp, outputs) -> None:
        if not all_finite(outputs, xp):
            raise ValueError(
                f"{self.name} received outputs with {_non_finite(xp, outputs)}; the "
                "model diverged (parameters not finite, or too large for the dtype) or "
                "its inputs are not finite."
            )

    def _check_vectors(self, outputs, V) -> None:
        expected = tuple(outputs.shape)
        if V.ndim != len(expected) + 1 or tuple(V.shape[:-1]) != expected:
            raise ValueError(
                f"{self.name} expected vectors of shape outputs.shape + (K,) = {expected} + "
                f"(K,), got shape {tuple(V.shape)}. Add a trailing axis for one vector."
            )

    # -- helpers for subclasses --------------------------------------------------------

    def _same_shape_float_targets(self, xp, outputs, targets, *, allow_integer=False):
        """Targets of the outputs' shape, floating (or integer if allowed), cast to f's dtype."""
        kinds = ("real floating", "integral") if allow_integer else "real floating"
        if not xp.isdtype(targets.dtype, kinds):
            allowed = "a real floating or integer" if allow_integer else "a real floating"
            raise TypeError(
                f"{self.name} expects targets of {allowed} dtype, got dtype "
                f"{dtype_name(targets.dtype)}."
            )
        self._check_targets_shape(outputs, targets, tuple(outputs.shape))
        return xp.astype(targets, outputs.dtype)

    def _check_targets_shape(self, outputs, targets, expected) -> None:
        if tuple(targets.shape) != tuple(expected):
            raise ValueError(
                f"{self.name} expects targets of shape {tuple(expected)} for outputs of shape "
                f"{tuple(outputs.shape)}, got targets of shape {tuple(targets.shape)}."
            )

    def _check_in_unit_interval(self, xp, targets, what) -> None:
        if not all_finite(targets, xp) or not bool(xp.all((targets >= 0) & (targets <= 1))):
            raise ValueError(f"{self.name} expects {what} in [0, 1]; found values outside.")


def _non_finite(xp, a) -> str:
    """What is not finite in ``a`` and where: ``"NaN entries (2 of 12, data points [1])"``.

    Only on the error path: two reductions more, never in a product that succeeds.
    """
    nan = xp.isnan(a)
    kinds = [k for k, m in (("NaN", nan), ("Inf", xp.isinf(a))) if bool(xp.any(m))]
    bad = ~xp.isfinite(a)
    per_datum = xp.reshape(bad, (a.shape[0], -1))  # 1-D: (N, 1)
    rows = [int(i) for i in to_numpy(xp.nonzero(xp.any(per_datum, axis=1))[0])[:5]]
    more = ", ..." if int(xp.sum(xp.astype(xp.any(per_datum, axis=1), xp.int64))) > 5 else ""
    count = int(xp.sum(xp.astype(bad, xp.int64)))
    return (
        f"{' and '.join(kinds)} entries ({count} of {math.prod(a.shape)}; data points "
        f"{rows}{more} of the batch)"
    )


def _check_num_samples(num_samples) -> int:
    if not isinstance(num_samples, numbers.Integral) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    return int(num_samples)


def _move_first_axis_last(xp, x):
    return xp.permute_dims(x, (*range(1, x.ndim), 0))


def _embed_diagonal(xp, d):
    """``(..., C)`` -> ``(..., C, C)`` with ``d`` on the diagonal of the last two axes."""
    eye = xp.eye(d.shape[-1], dtype=d.dtype, device=device(d))
    return d[..., None] * eye


def _sigmoid(xp, f):
    """Logistic function without overflow for large ``|f|``."""
    e = xp.exp(-xp.abs(f))
    return xp.where(f >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _softplus(xp, f):
    """``log(1 + exp(f))`` without overflow."""
    return xp.maximum(f, xp.zeros_like(f)) + xp.log1p(xp.exp(-xp.abs(f)))


def _log_softmax(xp, f):
    """``log softmax`` over the last axis, shifted by the maximum for stability."""
    shifted = f - xp.max(f, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))
