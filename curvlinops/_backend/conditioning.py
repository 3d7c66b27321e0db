"""When a matrix is too ill-conditioned to invert in its dtype, and what then happens.

The one rule of every exact inverse and log-determinant (of :mod:`curvlinops.linalg`,
the curvature operators, K-FAC's factored inverse): :func:`check_invertible_spectrum`
judges the spectrum of the matrix about to be inverted, damping included, and raises
:class:`IllConditionedError` (a :class:`~curvlinops.FactorizationError`) when its
condition number is beyond what the dtype resolves; inside :class:`conditioning`
``("warn")`` it warns with :class:`ConditioningWarning` instead and lets the inverse be
computed. The message names the matrix, its condition number, the limit, and the
smallest damping that brings the condition number within the limit.

May import: ``.namespace``, ``.linalg`` (for :class:`~curvlinops.FactorizationError`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings

from .linalg import FactorizationError, all_finite
from .namespace import dtype_eps, dtype_name

__all__ = [
    "ConditioningWarning",
    "IllConditionedError",
    "check_invertible_spectrum",
    "combined_error",
    "condition_limit",
    "conditioning",
    "invert_all",
]

#: The predicted relative error ``sqrt(n) eps cond`` an inverse may have by default.
DEFAULT_TOLERANCE = 0.01

_POLICY = contextvars.ContextVar("curvlinops_conditioning", default=("raise", DEFAULT_TOLERANCE))


class IllConditionedError(FactorizationError):
    """A matrix to be inverted is singular or too ill-conditioned for its dtype.

    Raised by every exact ``inverse`` and ``logdet`` (and K-FAC's ``factored_inverse``)
    under the rule of :func:`~curvlinops.conditioning`. A subclass of
    :class:`~curvlinops.FactorizationError`, so ``except FactorizationError`` catches it.

    Attributes
    ----------
    condition_number : float
        ``max|v| / min|v|`` of the spectrum ``v`` judged (``inf`` for a zero eigenvalue).
    limit : float
        The largest condition number the dtype resolves for this matrix,
        ``tolerance / (sqrt(n) eps)``.
    suggested_damping : float or None
        The smallest total damping (rounded up to two significant digits) that brings
        the condition number within ``limit``; ``None`` where no damping helps.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import DiagonalLinearOperator, IllConditionedError
    >>> D = DiagonalLinearOperator(np.array([1.0, 1e-17]))
    >>> try:
    ...     D.inverse()
    ... except IllConditionedError as err:
    ...     print(f"{err.condition_number:.0e}", err.suggested_damping)
    1e+17 3.2e-14
    >>> float(D.inverse(3.2e-14).diagonal()[0]) < 1.0
    True
    """

    def __init__(self, message, *, condition_number, limit, suggested_damping):
        super().__init__(message)
        self.condition_number = condition_number
        self.limit = limit
        self.suggested_damping = suggested_damping

    def with_context(self, prefix: str, *, damping_scale: float = 1.0):
        """The same error with ``prefix`` before its message (and the suggested damping
        multiplied by ``damping_scale``, for a scaled operator ``c A``).

        Examples
        --------
        >>> err = IllConditionedError("bad", condition_number=1e9, limit=1e8,
        ...                           suggested_damping=0.5)
        >>> wrapped = err.with_context("Block 2", damping_scale=2.0)
        >>> str(wrapped), wrapped.suggested_damping
        ('Block 2: bad', 1.0)
        """
        suggested = self.suggested_damping
        if suggested is not None:
            suggested = suggested * damping_scale
        return IllConditionedError(
            f"{prefix}: {self}",
            condition_number=self.condition_number,
            limit=self.limit,
            suggested_damping=suggested,
        )


def combined_error(errors):
    """One error for several refused parts (blocks, factors): the first one's message,
    and a suggested damping that suffices for all of them (the largest in the first
    one's direction).

    Examples
    --------
    >>> a = IllConditionedError("A", condition_number=1e9, limit=1e8, suggested_damping=0.1)
    >>> b = IllConditionedError("B", condition_number=1e10, limit=1e8, suggested_damping=0.3)
    >>> merged = combined_error([a, b])
    >>> merged.suggested_damping, str(merged)
    (0.3, 'A (2 parts refused; a total damping of 0.3 suffices for all of them.)')
    """
    first = errors[0]
    if len(errors) == 1:
        return first
    values = [e.suggested_damping for e in errors if e.suggested_damping is not None]
    suggested = None
    if values and first.suggested_damping is not None:
        suggested = max(values) if first.suggested_damping > 0 else min(values)
    note = f" ({len(errors)} parts refused"
    if suggested:
        note += f"; a total damping of {suggested:.2g} suffices for all of them"
    note += ".)"
    return IllConditionedError(
        f"{first}{note}",
        condition_number=max(e.condition_number for e in errors),
        limit=first.limit,
        suggested_damping=suggested,
    )


def invert_all(calls):
    """Results of the zero-argument callables ``fn`` in ``calls = [(name, fn), ...]``
    (``name`` prefixes a part's error message; ``None``: the message names it already).

    Every part is tried: if several are refused by the rule, one
    :class:`IllConditionedError` (:func:`combined_error`, each part named) says which
    and a damping that suffices for all; any other
    :class:`~curvlinops.FactorizationError` propagates at once, named.

    Examples
    --------
    >>> invert_all([("x", lambda: 1), ("y", lambda: 2)])
    [1, 2]
    """
    results, refused = [], []
    for name, fn in calls:
        try:
            results.append(fn())
        except IllConditionedError as err:
            refused.append(err.with_context(name) if name else err)
        except FactorizationError as err:
            raise (err.with_context(name) if name else err) from err
    if refused:
        raise combined_error(refused)
    return results


class ConditioningWarning(UserWarning):
    """An inverse was computed although its matrix is beyond what the dtype resolves.

    Emitted instead of :class:`IllConditionedError` inside ``conditioning("warn")``;
    the message is the error's. Turn it into an error again with
    ``warnings.simplefilter("error", curvlinops.ConditioningWarning)``.

    Examples
    --------
    >>> import warnings
    >>> import numpy as np
    >>> from curvlinops import ConditioningWarning, DiagonalLinearOperator, conditioning
    >>> with warnings.catch_warnings(record=True) as caught, conditioning("warn"):
    ...     warnings.simplefilter("always")
    ...     inverse = DiagonalLinearOperator(np.array([1.0, 1e-17])).inverse()
    >>> [w.category is ConditioningWarning for w in caught], float(inverse.diagonal()[1])
    ([True], 1e+17)
    """


class conditioning(contextlib.ContextDecorator):  # noqa: N801 (used like a function)
    """What an ill-conditioned inverse does: raise (default) or warn; and the tolerance.

    **The rule.** Let ``v`` be the spectrum of the matrix about to be inverted, damping
    included (eigenvalues; diagonal entries of a diagonal matrix; singular values of a
    non-symmetric dense matrix; for a damped Kronecker product the products of the
    factors' eigenvalues plus the damping, for an undamped one each factor's own), and
    ``n`` the dimension of the largest matrix factorized to obtain it. Its inverse,
    computed from a backward-stable eigendecomposition or solve, has a relative error of
    about ``sqrt(n) eps cond`` with ``cond = max|v| / min|v|`` and ``eps`` the machine
    epsilon of the dtype (measured: 0.3 to 4 times that for ``n`` from 4 to 1024, in
    float32). The matrix is beyond what the dtype resolves when that predicted error
    exceeds ``tolerance`` (1 % by default), i.e. when

    ``cond > tolerance / (sqrt(n) eps)``

    (float32, ``n = 100``: ``8.4e3``; float64: ``4.5e12``). Then the inverse (or
    log-determinant) raises :class:`IllConditionedError`, naming the matrix (operator,
    layer and factor where there are any), ``cond``, the limit, and the smallest total
    damping that brings ``cond`` within it. A zero eigenvalue (``cond = inf``) or NaN
    always raises. Each block of a block-diagonal operator is judged on its own; when
    several blocks (or K-FAC factors) are refused, one error names them and gives a
    damping that suffices for all. (For a non-symmetric dense matrix, whose singular
    values do not move with the damping, the suggested damping is only a guess.)

    **Negative damping.** An exact inverse takes any finite damping as a shift of the
    spectrum (``(c A).inverse(d)`` with ``c < 0`` asks ``A`` for ``d / c``) and judges
    the shifted spectrum by the same rule, so a shift that lands near an eigenvalue is
    refused. Methods that need a positive definite matrix refuse a negative damping with
    a ``ValueError`` saying so: K-FAC's ``factored_inverse`` (its factors' shifts are
    square roots of the damping) and :class:`~curvlinops.CGInverseLinearOperator` (use
    :class:`~curvlinops.MINRESInverseLinearOperator` for an indefinite ``A + d I``).
    :func:`~curvlinops.cg` itself takes it and reports negative curvature.

    Parameters
    ----------
    action : {"raise", "warn"}
        ``"warn"``: emit :class:`ConditioningWarning` and return the inverse anyway (the
        same matrix as without the check). A zero eigenvalue still raises.
    tolerance : float
        The predicted relative error an inverse may have (``> 0``); default 0.01.

    Notes
    -----
    A context manager (and decorator) over a context variable: it applies to the
    inverses built inside it, in this thread or task, and nests.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import DiagonalLinearOperator, IllConditionedError, conditioning
    >>> D = DiagonalLinearOperator(np.array([1.0, 1e-6], dtype=np.float32))
    >>> try:
    ...     D.inverse()
    ... except IllConditionedError as err:
    ...     print(str(err).split(";")[0])
    The diagonal matrix is ill-conditioned for float32: condition number 1e+06 > 5.9e+04
    >>> with conditioning(tolerance=0.5):  # accept a predicted error of up to 50 %
    ...     print(D.inverse().diagonal().tolist())
    [1.0, 1000000.0]
    """

    def __init__(self, action: str = "raise", *, tolerance: float = DEFAULT_TOLERANCE):
        if action not in ("raise", "warn"):
            raise ValueError(f'action must be "raise" or "warn", got {action!r}.')
        tolerance = float(tolerance)
        if not (math.isfinite(tolerance) and tolerance > 0):
            raise ValueError(f"tolerance must be a finite number > 0, got {tolerance}.")
        self.policy = (action, tolerance)
        self._tokens = []

    def __enter__(self):
        self._tokens.append(_POLICY.set(self.policy))
        return self

    def __exit__(self, *exc):
        _POLICY.reset(self._tokens.pop())
        return False


def condition_limit(dtype, size: int, tolerance: float | None = None) -> float:
    """``tolerance / (sqrt(size) eps)``: the largest condition number ``dtype`` resolves.

    ``tolerance`` defaults to the one in force (see :class:`conditioning`).

    Examples
    --------
    >>> import numpy as np
    >>> round(condition_limit(np.float32, 100) / 1e3, 1)
    8.4
    """
    if tolerance is None:
        tolerance = _POLICY.get()[1]
    return tolerance / (math.sqrt(max(int(size), 1)) * dtype_eps(dtype))


def _round_toward(value: float, direction: float) -> float:
    """``value`` rounded to two significant digits, towards ``+inf`` if ``direction > 0``
    and towards ``-inf`` otherwise (a damping to type in that still suffices)."""
    if value == 0:
        return value
    exponent = math.floor(math.log10(abs(value))) - 1
    scaled = value / 10.0**exponent
    return (math.ceil(scaled) if direction > 0 else math.floor(scaled)) * 10.0**exponent


def suggested_shift(lo: float, hi: float, limit: float) -> float | None:
    """The smallest shift ``s`` with ``max|v + s| / min|v + s| <= limit`` for a real
    spectrum in ``[lo, hi]``, moving away from zero on the side of its larger end
    (towards positive definite unless the spectrum is negative definite).

    Examples
    --------
    >>> suggested_shift(0.0, 1.0, 101.0)  # (1 + s) / s = 101
    0.01
    >>> suggested_shift(-1.0, -0.0, 101.0)
    -0.01
    """
    if hi <= 0 and lo < 0:  # negative definite: mirror
        mirrored = suggested_shift(-hi, -lo, limit)
        return None if mirrored is None else -mirrored
    if limit <= 1 or hi <= 0:
        return None
    return max((hi - limit * lo) / (limit - 1.0), 0.0)


def check_invertible_spectrum(
    values, xp, *, size, what, hint=None, shift=0.0, damping_for=None, suggest_from=None
):
    """Apply the conditioning rule (see :class:`conditioning`) to the spectrum ``values``.

    Parameters
    ----------
    values
        Eigenvalues (or diagonal entries, or singular values) of the matrix to be
        inverted, damping included; any shape.
    xp
        Their namespace.
    size : int
        Dimension of the largest matrix factorized to obtain ``values``.
    what : str
        The matrix, as the message names it (e.g. ``"Kronecker product plus 0.1 I"``).
    hint : str, optional
        What the result would be, put before the suggested damping.
    shift : float
        The damping already in ``values``.
    damping_for : callable, optional
        Maps the total shift of ``values`` that suffices to the damping the user passes
        (K-FAC's factored inverse: ``t -> (t / pi)^2``); default: the shift itself.
    suggest_from
        The spectrum the suggested damping shifts, if not ``values`` (an undamped
        Kronecker product is judged per factor, damped as a whole).

    Raises
    ------
    FactorizationError
        If ``values`` has NaN or Inf.
    IllConditionedError
        If the rule refuses ``values`` (under ``conditioning("warn")``: a
        :class:`ConditioningWarning` instead, unless an eigenvalue is zero).

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> check_invertible_spectrum(np.array([1.0, 1e-3]), xp, size=2, what="factor")
    >>> check_invertible_spectrum(np.array([1.0, 1e-17]), xp, size=2, what="factor")
    Traceback (most recent call last):
    ...
    curvlinops._backend.conditioning.IllConditionedError: The factor is singular ...
    """
    flat = xp.reshape(values, (-1,))
    if flat.shape[0] == 0:
        return
    magnitudes = xp.abs(flat)
    if not all_finite(magnitudes, xp):
        raise FactorizationError(f"The {what} contains NaN or Inf; it cannot be inverted.")
    largest, smallest = float(xp.max(magnitudes)), float(xp.min(magnitudes))
    cond = math.inf if smallest == 0.0 else largest / smallest
    action, tolerance = _POLICY.get()
    limit = condition_limit(values.dtype, size, tolerance)
    if cond <= limit:
        return
    base = flat if suggest_from is None else xp.reshape(suggest_from, (-1,))
    s = suggested_shift(float(xp.min(base)), float(xp.max(base)), limit)
    suggested = None
    if s is not None:
        total = (shift if suggest_from is None else 0.0) + s
        if damping_for is not None:  # a shift t >= 0 of a factor, as the user's damping
            total = damping_for(total)
        suggested = _round_toward(total, s) or None
    all_zero = float(xp.max(xp.abs(base))) == 0.0
    message = _message(what, cond, limit, size, values.dtype, hint, suggested, all_zero)
    if action == "warn" and math.isfinite(cond):
        warnings.warn(message, ConditioningWarning, stacklevel=3)
        return
    raise IllConditionedError(
        message, condition_number=cond, limit=limit, suggested_damping=suggested
    )


def _message(what, cond, limit, size, dtype, hint, suggested, all_zero=False):
    eps = dtype_eps(dtype)
    name = dtype_name(dtype)
    if cond >= 1.0 / (max(int(size), 1) * eps):
        head = (
            f"The {what} is singular to working precision in {name}: condition number "
            f"{cond:.3g} (an eigenvalue is zero up to rounding; the limit is {limit:.2g})"
        )
    else:
        head = (
            f"The {what} is ill-conditioned for {name}: condition number {cond:.3g} > "
            f"{limit:.2g}; its inverse may be off by up to about "
            f"{math.sqrt(max(int(size), 1)) * eps * cond:.0%}"
        )
    if suggested is not None:
        fix = (
            f"Add damping: a total damping of {suggested:.2g} brings its condition number "
            "within the limit"
        )
    elif all_zero:  # the infimum 0 of the sufficient shifts is not one of them
        fix = "Every eigenvalue is zero: any positive damping makes its condition number 1"
    else:
        fix = "No damping brings its condition number within the limit"

    wider = "compute in float64, or " if eps > dtype_eps_float64() else ""
    return (
        f"{head}. {hint + ' ' if hint else ''}{fix}; or {wider}accept the result with "
        "curvlinops.conditioning('warn') (or a larger tolerance)."
    )


def dtype_eps_float64() -> float:
    """Machine epsilon of float64 (a dtype below it gains from computing in float64)."""
    return 2.0**-52
