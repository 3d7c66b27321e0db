"""Plain host arrays for saved states: what ``state_dict()`` methods hold and restore from.

A saved state is a ``dict`` of ``str`` to NumPy arrays (numbers, strings and booleans as
0-d or 1-d arrays), so that ``numpy.savez`` writes it and ``numpy.load(...,
allow_pickle=False)`` reads it back without pickle. :func:`host_value` makes such an
entry from an array of any supported library or a Python value; :func:`from_host` puts
a saved array back on a backend; :func:`host_str`, :func:`host_int` read scalars back.

May import: ``numpy``, ``.namespace``. Nothing else of curvlinops.
"""

from __future__ import annotations

import numpy as np

from .namespace import to_numpy

__all__ = ["from_host", "host_int", "host_str", "host_value"]


def host_value(x) -> np.ndarray:
    """``x`` (an array of any library, a number, a string, a list of them) as a NumPy array.

    Examples
    --------
    >>> host_value("type-2").dtype.kind, host_value(3).item(), host_value([1, 2]).tolist()
    ('U', 3, [1, 2])
    """
    if isinstance(x, (bool, int, float, str, list, tuple)):
        return np.asarray(x)
    return np.array(to_numpy(x), copy=True)  # a copy: later updates never alias it


def from_host(a, xp, dtype, device):
    """The saved array ``a`` on backend ``xp`` with ``dtype`` and ``device`` (exact for the
    same dtype).

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> from_host(np.arange(3.0), xp, xp.float32, "cpu").dtype
    dtype('float32')
    """
    a = np.ascontiguousarray(np.asarray(a))
    try:
        return xp.asarray(a, dtype=dtype, device=device)
    except TypeError:  # namespaces whose asarray takes no device
        return xp.asarray(a, dtype=dtype)


def host_str(a) -> str:
    """A saved 0-d string array as a ``str``."""
    return str(np.asarray(a).item())


def host_int(a) -> int:
    """A saved 0-d integer array as an ``int``."""
    return int(np.asarray(a).item())
