"""Several array operations as one call on the backends that compile (JAX).

Run eagerly, JAX dispatches each operation on its own: the dozen slices and reshapes
that split a flat ``(P, K)`` block into parameter-shaped arrays cost about as much as a
small matrix product. :func:`fused` compiles such a group once per static
configuration on JAX and leaves every other backend's calls as they are.

May import: ``.namespace``, and lazily jax (only for a JAX namespace, so it is already
imported).
"""

from __future__ import annotations

import functools

from .namespace import is_jax_namespace

__all__ = ["fused"]


def fused(xp, function, *static):
    """``functools.partial(function, xp, *static)``, compiled once if ``xp`` is JAX.

    Parameters
    ----------
    xp
        The array namespace the call runs on.
    function
        A module-level function ``function(xp, *static, *arrays)`` using only array-API
        calls on ``xp`` and no Python decision on array values.
    *static
        Hashable configuration (shapes, sizes) that the compiled call is specialized to.

    Returns
    -------
    callable
        Taking the arrays (lists of arrays allowed).

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> def halves(xp, n, v):
    ...     return v[:n], v[n:]
    >>> [a.tolist() for a in fused(xp, halves, 1)(xp.asarray([1.0, 2.0]))]
    [[1.0], [2.0]]
    """
    if is_jax_namespace(xp):
        return _compiled(function, xp, static)
    return functools.partial(function, xp, *static)


@functools.lru_cache(maxsize=512)
def _compiled(function, xp, static):
    import jax

    return jax.jit(functools.partial(function, xp, *static))
