"""Parameters as lists of arrays, and the flat-vector convention of docs/design.rst.

An operator over parameters acts on flat vectors ``(P,)`` and matrices ``(P, K)``:
the parameters in list order, each flattened in C order. Tangents handed to models
are lists of arrays shaped like the parameters, with an optional trailing axis ``K``
of vectors: the C-order flattening makes the two layouts mere reshapes of each other.

May import: ``curvlinops._backend``.
"""

from __future__ import annotations

import math

from .._backend import (
    array_namespace,
    device,
    fused,
    is_cupy_namespace,
    is_numpy_namespace,
    is_torch_namespace,
)

__all__ = ["flatten_params", "unflatten_params", "num_params", "param_shapes", "check_params"]


def param_shapes(params) -> list[tuple[int, ...]]:
    """Shapes of a list of parameter arrays.

    Examples
    --------
    >>> import numpy as np
    >>> param_shapes([np.zeros((2, 3)), np.zeros(2)])
    [(2, 3), (2,)]
    """
    return [tuple(int(s) for s in p.shape) for p in params]


def num_params(shapes) -> int:
    """Total number of entries ``P`` of parameters with the given shapes.

    Examples
    --------
    >>> num_params([(2, 3), (2,)])
    8
    """
    return sum(math.prod(s) for s in shapes)


def flatten_params(arrays, shapes=None):
    """Concatenate arrays shaped like the parameters into ``(P,)`` or ``(P, K)``.

    Parameters
    ----------
    arrays : list of arrays
        Each of shape ``shapes[i]`` or ``shapes[i] + (K,)`` (all with the same K).
    shapes : list of tuple, optional
        The parameter shapes; needed to tell a trailing ``K`` axis apart. Without it
        the arrays are taken as plain parameters (no ``K``).

    Returns
    -------
    array
        ``(P,)`` or ``(P, K)``.

    Examples
    --------
    >>> import numpy as np
    >>> v = flatten_params([np.ones((2, 2)), np.zeros(1)])
    >>> v.tolist()
    [1.0, 1.0, 1.0, 1.0, 0.0]
    >>> V = flatten_params([np.ones((2, 2, 3)), np.zeros((1, 3))], [(2, 2), (1,)])
    >>> V.shape
    (5, 3)
    """
    xp = array_namespace(*arrays)
    if shapes is None or all(a.ndim == len(s) for a, s in zip(arrays, shapes, strict=True)):
        return fused(xp, _concat_rows, (-1,))(list(arrays))
    K = arrays[0].shape[-1]
    if _slices_are_views(xp):
        return _fill_rows(arrays, K, xp)
    return fused(xp, _concat_rows, (-1, K))(list(arrays))


def _concat_rows(xp, row_shape, arrays):
    return xp.concat([xp.reshape(a, row_shape) for a in arrays], axis=0)


def _slices_are_views(xp) -> bool:
    """Whether row slices of a contiguous array are writable views in ``xp``."""
    return is_numpy_namespace(xp) or is_torch_namespace(xp) or is_cupy_namespace(xp)


def _fill_rows(arrays, K, xp):
    """Stack ``(*shape, K)`` arrays as rows of one ``(P, K)`` array with a single copy.

    Concatenating reshaped arrays copies twice when an array is a permuted view (as
    weight gradients of batched products are): once to reshape, once to concatenate.
    Writing each array into its reshaped slice of a preallocated result copies once.
    """
    total = sum(math.prod(a.shape[:-1]) for a in arrays)
    out = xp.empty((total, K), dtype=arrays[0].dtype, device=device(arrays[0]))
    start = 0
    for a in arrays:
        size = math.prod(a.shape[:-1])
        out_rows = xp.reshape(out[start : start + size, :], tuple(a.shape))
        out_rows[...] = a
        start += size
    return out


def unflatten_params(vector, shapes):
    """Split ``(P,)`` or ``(P, K)`` into arrays of the given shapes (plus trailing ``K``).

    Examples
    --------
    >>> import numpy as np
    >>> [a.shape for a in unflatten_params(np.arange(5.0), [(2, 2), (1,)])]
    [(2, 2), (1,)]
    >>> [a.shape for a in unflatten_params(np.ones((5, 3)), [(2, 2), (1,)])]
    [(2, 2, 3), (1, 3)]
    """
    xp = array_namespace(vector)
    total = num_params(shapes)
    if vector.shape[0] != total or vector.ndim not in (1, 2):
        raise ValueError(
            f"Expected a flat parameter vector of shape ({total},) or ({total}, K), "
            f"got shape {tuple(vector.shape)}."
        )
    shapes = tuple(tuple(int(n) for n in s) for s in shapes)
    return list(fused(xp, _split_rows, shapes, tuple(vector.shape[1:]))(vector))


def _split_rows(xp, shapes, trailing, vector):
    out, start = [], 0
    for s in shapes:
        size = math.prod(s)
        out.append(xp.reshape(vector[start : start + size, ...], s + trailing))
        start += size
    return out


def check_params(params, expected_shapes, model_name: str) -> None:
    """Raise ValueError unless ``params`` is a list of arrays of the expected shapes.

    Examples
    --------
    >>> import numpy as np
    >>> check_params([np.zeros(2)], [(2,)], "model")
    >>> check_params([np.zeros(3)], [(2,)], "model")
    Traceback (most recent call last):
    ...
    ValueError: model expects 1 parameter arrays of shapes [(2,)], got shapes [(3,)].
    """
    if not isinstance(params, (list, tuple)):
        raise TypeError(
            f"{model_name} expects its parameters as a list of arrays, got {type(params).__name__}."
        )
    got = [tuple(getattr(p, "shape", ())) for p in params]
    expected = [tuple(s) for s in expected_shapes]
    if got != expected:
        raise ValueError(
            f"{model_name} expects {len(expected)} parameter arrays of shapes {expected}, "
            f"got shapes {got}."
        )
