"""Sums over processes in one all-reduce, with a collective error check.

The curvature layer sums over data in one place per quantity (a product, a gradient, a
pass of K-FAC statistics); with a distributed :class:`~.comm.Communicator` that place
calls one of these, which run the process's local work, pack all its arrays into **one**
buffer and all-reduce it once:

- :func:`collective_sum`: arrays of shapes every rank knows (a product's ``(P, K)``
  block, a gradient): the buffer carries the data and one error flag, so a product is
  one all-reduce;
- :func:`collective_tree_sum`: a nested structure (lists, tuples, dicts) of arrays,
  Python ints and floats and :class:`Static` values whose shapes only the ranks with
  data know (K-FAC's statistics, whose layout comes from the first batch): a small
  all-gather of the structures (and errors) comes first, so that a rank without data
  adds zeros of the right shapes;
- :func:`broadcast_tree`: one rank's structure on every rank (a masked all-reduce);
- :func:`gather_outcomes`: each rank's small host result (counts at construction).

A rank whose local work raises takes part in the collective with its error instead of
its data; then it re-raises its own exception and every other rank raises
:class:`~.comm.RemoteRankError`, so that no rank waits forever. With one process every
helper just calls the local work.

Python ints are summed exactly (as two base-4096 digits per int, exact in float32 up
to totals of ``2**36``); every array is reduced in the dtype of the buffer.

May import: ``numbers``, ``.namespace``, ``.comm``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from .comm import RemoteRankError
from .namespace import to_numpy

__all__ = [
    "Static",
    "broadcast_tree",
    "collective_sum",
    "collective_tree_sum",
    "gather_outcomes",
]

#: Python ints travel as two digits ``v = hi * base + lo`` so that float32 sums stay exact
_INT_BASE = 4096


@dataclass(frozen=True)
class Static:
    """A leaf of a reduced structure that is not summed: every rank with data must hold
    the same value (a layer layout), and the ranks without data take it from them."""

    value: object


def collective_sum(comm, compute, shapes, *, xp, dtype, device, what):
    """``compute()``'s arrays summed over all processes, in one all-reduce.

    Parameters
    ----------
    comm : Communicator
    compute : callable
        ``() -> list of arrays`` of ``shapes`` (an entry may be None: a zero
        contribution). Must not itself run collectives.
    shapes : list of tuple
        The shapes, the same on every rank.
    xp, dtype, device
        Namespace, dtype and device of the buffer (and the results).
    what : str
        The computation, for the error of a failing rank.

    Returns
    -------
    list of arrays
        The sums over processes, of ``shapes`` (None entries are zeros).

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops._backend.comm import SingleProcess
    >>> parts = collective_sum(SingleProcess(), lambda: [xp.ones(2), None], [(2,), (1, 2)],
    ...                        xp=xp, dtype=xp.float64, device="cpu", what="a sum")
    >>> [p.tolist() for p in parts]
    [[1.0, 1.0], [[0.0, 0.0]]]
    """
    shapes = [tuple(int(n) for n in s) for s in shapes]
    if not comm.distributed:
        return _zeros_for_none(compute(), shapes, xp, dtype, device)
    error, parts = None, None
    try:
        parts = _checked_parts(compute(), shapes, what)
    except Exception as err:  # every rank must learn of any failure
        error = err
    if parts is None:
        parts = [None] * len(shapes)
    flag = 0.0 if error is None else 1.0
    buffer = _pack(parts, shapes, [flag], xp, dtype, device)
    total = comm.allreduce_sum(buffer)
    if error is not None or float(to_numpy(total[-1:])[0]) != 0.0:
        infos = comm.allgather_object(_describe(error))
        _raise_if_failed(comm, error, infos, what)
    return _unpack_arrays(total, shapes, xp)


def collective_tree_sum(comm, compute, *, xp, dtype, device, what):
    """The sum over processes of a structure whose shapes not every rank knows.

    Parameters
    ----------
    comm : Communicator
    compute : callable
        ``() -> tree or None``: a nested structure of lists, tuples and dicts whose
        leaves are arrays, Python ints or floats (summed), None (kept) and
        :class:`Static` values (equal on every rank with data); None for a rank
        without data. Must not itself run collectives.
    xp, dtype, device
        Namespace, dtype and device of the buffer; every array is reduced in ``dtype``.
    what : str
        The computation, for error messages.

    Returns
    -------
    tree or None
        The structure with its leaves summed over processes (None if no rank had data).

    Raises
    ------
    ValueError
        On every rank, if the ranks with data return different structures.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops._backend.comm import SingleProcess
    >>> tree = {"count": 3, "sum": xp.ones(2), "layout": Static(("0", 2))}
    >>> collective_tree_sum(SingleProcess(), lambda: tree, xp=xp, dtype=xp.float64,
    ...                     device="cpu", what="statistics")["count"]
    3
    """
    if not comm.distributed:
        return compute()
    error, tree = None, None
    try:
        tree = compute()
    except Exception as err:
        error = err
    arrays, scalars = [], []
    structure = None
    if error is None and tree is not None:
        try:
            structure = _flatten(tree, arrays, scalars)
        except Exception as err:
            error = err
    outcomes = comm.allgather_object((structure, _describe(error)))
    _raise_if_failed(comm, error, [info for _, info in outcomes], what)
    structures = [(rank, s) for rank, (s, _) in enumerate(outcomes) if s is not None]
    if not structures:
        return None
    first_rank, structure = structures[0]
    different = [rank for rank, s in structures if s != structure]
    if different:
        raise ValueError(
            f"{what}: the ranks with data disagree on the structure of their sums (rank "
            f"{different[0]} differs from rank {first_rank}: different layers, shapes or "
            "options). Every rank must build the operator with the same model, "
            "parameters and options."
        )
    if tree is None:  # no data here: zeros of the shapes the others found
        arrays = [None] * _count(structure, "array")
        scalars = _scalars_in_order(structure, 0, 0.0)
    shapes = _shapes(structure)
    digits = _scalar_digits(structure, scalars)
    buffer = _pack(arrays, shapes, digits, xp, dtype, device)
    total = comm.allreduce_sum(buffer)
    summed = _unpack_arrays(total, shapes, xp)
    host = to_numpy(total[sum(_size(s) for s in shapes) :]) if digits else []
    return _unflatten(structure, iter(summed), _decoded_scalars(structure, host))


def broadcast_tree(comm, root, compute, *, xp, dtype, device, what):
    """Rank ``root``'s structure (``compute()``, run there only) on every rank.

    A masked all-reduce: the other ranks add zeros, so that every rank receives the
    root's values bit for bit (up to the sign of zeros).

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops._backend.comm import SingleProcess
    >>> broadcast_tree(SingleProcess(), 0, lambda: [xp.ones(1)], xp=xp, dtype=xp.float64,
    ...                device="cpu", what="a basis")[0].tolist()
    [1.0]
    """
    return collective_tree_sum(
        comm,
        lambda: compute() if comm.rank == root else None,
        xp=xp,
        dtype=dtype,
        device=device,
        what=what,
    )


def gather_outcomes(comm, compute, what) -> list:
    """Every rank's ``compute()`` (a small picklable host object), in rank order.

    A rank whose ``compute`` raises re-raises it; the others raise
    :class:`~.comm.RemoteRankError`.

    Examples
    --------
    >>> from curvlinops._backend.comm import SingleProcess
    >>> gather_outcomes(SingleProcess(), lambda: {"count": 4}, "counting")
    [{'count': 4}]
    """
    if not comm.distributed:
        return [compute()]
    error, result = None, None
    try:
        result = compute()
    except Exception as err:
        error = err
    outcomes = comm.allgather_object((result, _describe(error)))
    _raise_if_failed(comm, error, [info for _, info in outcomes], what)
    return [r for r, _ in outcomes]


# -- errors --------------------------------------------------------------------------------


def _describe(error):
    """``(type name, message)`` of an exception (None for none): what other ranks see."""
    return None if error is None else (type(error).__name__, str(error))


def _raise_if_failed(comm, error, infos, what):
    """Raise on every rank if any rank failed: its own error, or RemoteRankError."""
    failures = [(rank, *info) for rank, info in enumerate(infos) if info is not None]
    if error is not None:
        raise error
    if failures:
        raise RemoteRankError(failures, what, comm.rank, comm.size)


# -- packing ---------------------------------------------------------------------------------


def _size(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _checked_parts(parts, shapes, what):
    parts = list(parts)
    if len(parts) != len(shapes):
        raise ValueError(f"{what}: {len(parts)} local sums for {len(shapes)} expected shapes.")
    for part, shape in zip(parts, shapes, strict=True):
        if part is not None and tuple(part.shape) != shape:
            raise ValueError(f"{what}: a local sum has shape {tuple(part.shape)}, not {shape}.")
    return parts


def _zeros_for_none(parts, shapes, xp, dtype, device):
    return [
        xp.zeros(shape, dtype=dtype, device=device) if part is None else part
        for part, shape in zip(parts, shapes, strict=True)
    ]


def _pack(arrays, shapes, scalars, xp, dtype, device):
    """One flat buffer: the arrays (zeros for None), then the host scalars."""
    pieces = []
    for array, shape in zip(arrays, shapes, strict=True):
        if array is None:
            pieces.append(xp.zeros((_size(shape),), dtype=dtype, device=device))
            continue
        if array.dtype != dtype:
            array = xp.astype(array, dtype)
        pieces.append(xp.reshape(array, (-1,)))
    if scalars:
        pieces.append(xp.asarray(scalars, dtype=dtype, device=device))
    if not pieces:
        return xp.zeros((0,), dtype=dtype, device=device)
    return xp.concat(pieces) if len(pieces) > 1 else xp.asarray(pieces[0], copy=True)


def _unpack_arrays(buffer, shapes, xp):
    out, start = [], 0
    for shape in shapes:
        stop = start + _size(shape)
        out.append(xp.reshape(buffer[start:stop], shape))
        start = stop
    return out


# -- structures ------------------------------------------------------------------------------


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Static)


def _flatten(tree, arrays, scalars):
    """The structure of ``tree`` (a host object); its arrays and scalars appended."""
    if tree is None:
        return None
    if isinstance(tree, Static):
        return ("static", tree.value)
    if _is_array(tree):
        arrays.append(tree)
        return ("array", tuple(int(n) for n in tree.shape))
    if isinstance(tree, bool):
        return ("static", tree)
    if isinstance(tree, numbers.Integral):
        scalars.append(int(tree))
        return ("int",)
    if isinstance(tree, numbers.Real):
        scalars.append(float(tree))
        return ("float",)
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return (kind, tuple(_flatten(t, arrays, scalars) for t in tree))
    if isinstance(tree, dict):
        keys = sorted(tree)
        return ("dict", tuple((k, _flatten(tree[k], arrays, scalars)) for k in keys))
    raise TypeError(f"Cannot sum a {type(tree).__name__} over processes.")


def _children(structure):
    if structure is None or structure[0] in ("static", "array", "int", "float"):
        return []
    if structure[0] == "dict":
        return [child for _, child in structure[1]]
    return list(structure[1])


def _leaves(structure):
    if structure is None:
        return
    if structure[0] in ("array", "int", "float"):
        yield structure
    for child in _children(structure):
        yield from _leaves(child)


def _count(structure, kind) -> int:
    return sum(1 for leaf in _leaves(structure) if leaf[0] == kind)


def _scalars_in_order(structure, zero_int, zero_float):
    return [
        zero_int if leaf[0] == "int" else zero_float
        for leaf in _leaves(structure)
        if leaf[0] != "array"
    ]


def _shapes(structure):
    return [leaf[1] for leaf in _leaves(structure) if leaf[0] == "array"]


def _scalar_digits(structure, scalars):
    """The scalars as buffer entries: two digits per int, one entry per float."""
    digits = []
    kinds = [leaf[0] for leaf in _leaves(structure) if leaf[0] != "array"]
    for kind, value in zip(kinds, scalars, strict=True):
        if kind == "int":
            high = value // _INT_BASE
            digits += [float(high), float(value - high * _INT_BASE)]
        else:
            digits.append(float(value))
    return digits


def _decoded_scalars(structure, host):
    """The summed scalars back from their buffer entries, in order."""
    values, i = [], 0
    for leaf in _leaves(structure):
        if leaf[0] == "int":
            values.append(round(float(host[i])) * _INT_BASE + round(float(host[i + 1])))
            i += 2
        elif leaf[0] == "float":
            values.append(float(host[i]))
            i += 1
    return iter(values)


def _unflatten(structure, arrays, scalars):
    if structure is None:
        return None
    kind = structure[0]
    if kind == "static":
        return structure[1]
    if kind == "array":
        return next(arrays)
    if kind in ("int", "float"):
        return next(scalars)
    if kind == "dict":
        return {k: _unflatten(child, arrays, scalars) for k, child in structure[1]}
    items = [_unflatten(child, arrays, scalars) for child in structure[1]]
    return items if kind == "list" else tuple(items)
