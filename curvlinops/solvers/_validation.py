"""The one validation module of the matrix-free algorithms: inputs, options, structure.

Every function of :mod:`curvlinops.solvers` (CG, MINRES, the iterative inverses,
Lanczos, ``eigsh``, power iteration, Nystrom, the estimators, the spectral density)
checks its arguments here, before any product with the operator, so that the same
mistake raises the same exception everywhere, with a message that names the caller,
what was expected and what was found:

- :class:`TypeError`: something that is not an operator or an array, an array of
  another library than the operator's, a dtype the operator cannot take, a count that
  is not an integer, an option that is not a real number;
- :class:`ValueError`: a wrong shape, a non-square operator, NaN or Inf in an input, a
  number out of its range, an unknown choice, and an operator that a solver needs
  symmetric but that a symmetry probe shows is not.

Arrays go through the operator's own :meth:`~curvlinops.LinearOperator.check_input`.

**The structure rule** (:func:`require_structure`). A solver states what it assumes
of the operator: ``"symmetric"`` (MINRES, Lanczos, ``eigsh``, power iteration, the
spectral densities) or ``"psd"`` (CG, Nystrom). Then:

1. declared (the operator's ``is_symmetric`` / ``is_psd`` tag is ``True``): silent,
   no extra cost;
2. symmetry not declared: one product with two random vectors tests
   ``y^T A x = x^T A y``; a clear violation raises :class:`ValueError` (the solver's
   answer would be meaningless); otherwise the solver runs and warns with
   :class:`AssumptionWarning` (declare the tag to skip the probe and the warning);
3. PSD assumed but not declared: :class:`AssumptionWarning` (for CG only without
   damping: a positive ``damping`` is the usual remedy for an indefinite or singular
   operator, and CG reports negative curvature in :class:`~curvlinops.SolveInfo`).

A dense 2-D array handed to a solver is wrapped with its symmetry checked exactly
(it is all there); PSD is never guessed. Declarations are trusted, not verified:
:mod:`curvlinops.verify` checks them (``check_symmetric``, ``check_psd``).

May import: ``curvlinops._backend``, ``curvlinops.linalg``; scipy lazily (to recognize a
SciPy operator).
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings

from .._backend import (
    all_finite,
    array_namespace,
    as_generator,
    dtype_eps,
    dtype_name,
    is_numerically_symmetric,
    namespace_name,
)
from ..linalg import DenseLinearOperator, LinearOperator, aslinearoperator

__all__ = ["AssumptionWarning"]

SYMMETRIC = "symmetric"
PSD = "psd"

# A probe asymmetry above this multiple of sqrt(eps) (relative) is not rounding.
_PROBE_FACTOR = 10.0


class AssumptionWarning(UserWarning):
    """A solver assumes structure (symmetric, PSD) that the operator does not declare.

    Emitted by the solvers of :mod:`curvlinops.solvers` under the rule documented in
    :doc:`/api/solvers`: declare the structure (``aslinearoperator(A, psd=True)``,
    ``symmetric=True``/``psd=True`` in an operator's constructor, or the class-level
    tags of the curvature operators) to silence it, or turn it into an error with
    ``warnings.simplefilter("error", curvlinops.AssumptionWarning)``.

    Examples
    --------
    >>> import warnings
    >>> import numpy as np
    >>> from curvlinops import AssumptionWarning, aslinearoperator, cg
    >>> A = aslinearoperator(np.diag([1.0, 2.0]), symmetric=True)  # PSD, not declared
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     x, info = cg(A, np.ones(2))
    >>> [issubclass(w.category, AssumptionWarning) for w in caught]
    [True]
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error", AssumptionWarning)
    ...     x, info = cg(aslinearoperator(np.diag([1.0, 2.0]), psd=True), np.ones(2))
    >>> str(info.reason)
    'converged'
    """


# -- operators ----------------------------------------------------------------------------


def as_operator(A, who: str, *, square: bool = True, nonempty: bool = False) -> LinearOperator:
    """``A`` (operator, 2-D array or SciPy operator) as a :class:`LinearOperator`.

    A square dense array is wrapped with its symmetry checked exactly (declared when
    it holds), so that the structure rule does not need a probe for it.

    Raises
    ------
    TypeError
        If ``A`` is neither an operator nor an array.
    ValueError
        If ``A`` is an array that is not 2-D, not square (with ``square``), or empty
        (with ``nonempty``).
    """
    if not isinstance(A, LinearOperator):
        if _is_array(A):
            if A.ndim != 2:
                raise ValueError(
                    f"{who} needs a square operator of shape (n, n); got an array of shape "
                    f"{tuple(A.shape)}."
                )
            symmetric = A.shape[0] == A.shape[1] and _dense_is_symmetric(A)
            A = DenseLinearOperator(A, symmetric=symmetric)
        elif _is_scipy_like(A):
            A = aslinearoperator(A)
        else:
            raise TypeError(
                f"{who} needs a curvlinops LinearOperator or a 2-D array as its operator, "
                f"got a {type(A).__name__}. Wrap it with curvlinops.aslinearoperator first."
            )
    if square and A.shape[0] != A.shape[1]:
        raise ValueError(
            f"{who} needs a square operator of shape (n, n); got shape {A.shape}. "
            "Solve least-squares problems through the normal equations (A^T A) instead."
        )
    if nonempty and A.shape[0] == 0:
        raise ValueError(f"{who} needs a non-empty operator; got shape {A.shape}.")
    return A


def as_preconditioner(M, A: LinearOperator, who: str):
    """``M`` (operator, 2-D array or None) as an operator matching ``A``, or an error."""
    if M is None:
        return None
    if not isinstance(M, LinearOperator):
        if not _is_array(M):
            raise TypeError(
                f"{who} needs a LinearOperator or a 2-D array as preconditioner M, got a "
                f"{type(M).__name__}."
            )
        M = aslinearoperator(M)
    if M.shape != A.shape:
        raise ValueError(
            f"{who}: the preconditioner M must have the operator's shape {A.shape}; "
            f"got shape {M.shape}."
        )
    _check_same_backend(M, A, who, "the preconditioner")
    return M


def _check_same_backend(B, A, who, what):
    if namespace_name(B.xp) != namespace_name(A.xp):
        raise TypeError(
            f"{who}: {what} works on {namespace_name(B.xp)} arrays but the operator on "
            f"{namespace_name(A.xp)} arrays; build both in one library."
        )
    if B.dtype != A.dtype:
        raise TypeError(
            f"{who}: {what} has dtype {dtype_name(B.dtype)} but the operator "
            f"{dtype_name(A.dtype)}; build both in one dtype."
        )


def _is_array(A) -> bool:
    return hasattr(A, "ndim") and hasattr(A, "shape") and hasattr(A, "dtype")


def _is_scipy_like(A) -> bool:
    try:
        import scipy.sparse.linalg
    except ImportError:  # pragma: no cover - scipy is a dependency
        return False
    return isinstance(A, scipy.sparse.linalg.LinearOperator)


def _dense_is_symmetric(A) -> bool:
    """Exact-up-to-rounding symmetry of a square real floating array (one pass over it)."""
    xp = array_namespace(A)
    if A.shape[0] == 0 or not xp.isdtype(A.dtype, "real floating"):
        return False
    return is_numerically_symmetric(A, xp)


# -- arrays -------------------------------------------------------------------------------


def check_vector(A: LinearOperator, b, who: str, what: str, *, ndim=None, finite=True, like=None):
    """Validate an array for ``A`` (namespace, shape, dtype, device; finite values).

    ``like``: ``(name, array)`` whose shape the array must have (an initial guess and
    its right-hand side). Returns the :class:`~curvlinops.CheckedInput` of
    ``A.check_input``; the error messages are prefixed by the caller's name.
    """
    try:
        checked = A.check_input(b, ndim=ndim, what=what)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{who}: {err}") from None
    if like is not None and tuple(checked.array.shape) != tuple(like[1].shape):
        raise ValueError(
            f"{who}: the {what} must have the shape of {like[0]}, {tuple(like[1].shape)}; "
            f"got shape {tuple(checked.array.shape)}."
        )
    if finite and not all_finite(checked.array, A.xp):
        raise ValueError(f"{who}: the {what} contains NaN or Inf; pass finite values.")
    return checked


# -- options ------------------------------------------------------------------------------


def check_real(value, name: str, who: str, *, minimum=None, positive=False, above=None) -> float:
    """A finite real number, optionally ``>= minimum``, ``> 0`` or ``> above``.

    Raises :class:`TypeError` for a non-number (or a bool), :class:`ValueError` for a
    number out of range or not finite.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number, got {value!r}.")
    value = float(value)
    if positive:
        above = 0.0
    bounds = []
    ok = math.isfinite(value)
    if minimum is not None:
        bounds.append(f">= {minimum}")
        ok = ok and value >= minimum
    if above is not None:
        bounds.append(f"> {above}")
        ok = ok and value > above
    if not ok:
        bound = "".join(f" and {b}" for b in bounds)
        raise ValueError(f"{who}: {name} must be finite{bound}, got {value}.")
    return value


def check_count(value, name: str, who: str, *, minimum: int = 1, maximum=None) -> int:
    """An integer in ``[minimum, maximum]``.

    Raises :class:`TypeError` for a non-integer (or a bool), :class:`ValueError` out of
    range. The message names the allowed range and the value found.
    """
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{who}: {name} must be an integer {bound}, got {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{who}: {name} must be an integer {bound}, got {value}.")
    return int(value)


def check_choice(value, name: str, who: str, choices) -> str:
    """One of ``choices``, or :class:`ValueError` naming them."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{who}: unknown {name}={value!r}; use one of {options}.")
    return value


def check_interval(pair, name: str, who: str):
    """``None``, or a pair ``(low, high)`` of finite numbers with ``low < high``.

    Raises :class:`ValueError` naming the pair otherwise (an infinite end would make a
    grid of NaN).
    """
    if pair is None:
        return None
    try:
        low, high = (float(v) for v in pair)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{who}: {name} must be a pair (low, high) of numbers, got {pair!r}."
        ) from err
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{who}: {name} must be finite and satisfy low < high, got {pair!r}.")
    return low, high


def check_grid(grid, A: LinearOperator, who: str):
    """A 1-D array of at least 2 finite points, in ``A``'s namespace; cast to its dtype."""
    xp = A.xp
    if not _is_array(grid) or grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(
            f"{who}: grid must be a 1-D array of at least 2 points, got "
            f"{'shape ' + str(tuple(grid.shape)) if _is_array(grid) else type(grid).__name__}."
        )
    if namespace_name(array_namespace(grid)) != namespace_name(xp):
        raise TypeError(
            f"{who}: grid is a {namespace_name(array_namespace(grid))} array but the operator "
            f"works on {namespace_name(xp)} arrays."
        )
    grid = xp.astype(grid, A.dtype)
    if not all_finite(grid, xp):
        raise ValueError(f"{who}: grid contains NaN or Inf; pass finite points.")
    return grid


# -- structure ----------------------------------------------------------------------------

_DECLARE = (
    "Declare it to skip this check: aslinearoperator(A, {tag}=True), {tag}=True in the "
    "operator's constructor, or a class-level tag on your operator class."
)


def require_structure(A: LinearOperator, who: str, assumes: str, *, damping: float = 0.0):
    """Apply the structure rule (module docstring) for a solver that ``assumes`` it.

    Parameters
    ----------
    A
        The (validated, square) operator.
    who
        The solver's name, for messages.
    assumes : {"symmetric", "psd"}
        What the solver's results rely on.
    damping
        The solver's damping, if it has one: with ``damping > 0`` a missing PSD
        declaration is not reported (``A + damping I`` is the remedy already taken).

    Raises
    ------
    ValueError
        If symmetry is not declared and a random probe shows ``A`` is not symmetric.
    """
    if assumes not in (SYMMETRIC, PSD):
        raise ValueError(f"unknown assumption {assumes!r}")  # a bug in the caller
    if not A.is_symmetric:
        _probe_symmetry(A, who)
        needs = "symmetric positive semi-definite" if assumes == PSD else "symmetric"
        warn_assumption(
            f"{who} assumes a {needs} operator, but the {type(A).__name__} is not declared "
            f"symmetric; a random symmetry probe passed (one extra product), so it runs. "
            + _DECLARE.format(tag="psd" if assumes == PSD else "symmetric")
        )
        return
    if assumes == PSD and not A.is_psd and not damping > 0:
        warn_assumption(
            f"{who} assumes a positive semi-definite operator, but the {type(A).__name__} is "
            "only declared symmetric. " + _PSD_REMEDY.get(who, "") + _DECLARE.format(tag="psd")
        )


_PSD_REMEDY = {
    "cg": (
        "If it is indefinite, CG stops with StopReason.NEGATIVE_CURVATURE: add damping "
        "or use minres. "
    ),
    "nystrom": "If it is indefinite, the sketch fails: use eigsh instead. ",
}


def _probe_symmetry(A: LinearOperator, who: str) -> None:
    """One product with two random vectors; ValueError if ``y^T A x != x^T A y``."""
    xp, n = A.xp, A.shape[0]
    gen = as_generator(0, xp, A.device)
    V = gen.normal((n, 2), A.dtype)
    AV = A.matmat(V)
    x, y, Ax, Ay = V[:, 0], V[:, 1], AV[:, 0], AV[:, 1]
    lhs, rhs = float(xp.vecdot(y, Ax)), float(xp.vecdot(x, Ay))
    norm = xp.linalg.vector_norm
    scale = float(norm(y)) * float(norm(Ax)) + float(norm(x)) * float(norm(Ay))
    if not all(math.isfinite(v) for v in (lhs, rhs, scale)):
        return  # the solver itself reports non-finite products
    tol = _PROBE_FACTOR * dtype_eps(A.dtype) ** 0.5
    if abs(lhs - rhs) > tol * scale:
        raise ValueError(
            f"{who} needs a symmetric operator, but the {type(A).__name__} is not: for "
            f"random x, y, y^T A x = {lhs:.6g} and x^T A y = {rhs:.6g} (relative difference "
            f"{abs(lhs - rhs) / scale:.2g} > {tol:.2g}). Symmetrize it (0.5 * (A + A.T)), "
            "solve the normal equations (A.T @ A) for a linear system, or declare "
            "symmetric=True if it is symmetric in exact arithmetic."
        )


def warn_assumption(message: str) -> None:
    """Emit an :class:`AssumptionWarning` attributed to the first caller outside curvlinops."""
    warnings.warn(message, AssumptionWarning, stacklevel=_external_stacklevel())


def _external_stacklevel() -> int:
    """The ``stacklevel`` of the innermost frame that is not in the curvlinops package."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("curvlinops."):
        frame, level = frame.f_back, level + 1
    return level
