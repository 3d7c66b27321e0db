"""Array-namespace, dtype and device helpers.

This module is the only place (together with its siblings in ``_backend``) where
the library touches concrete array libraries. Everything above this layer calls
:func:`array_namespace` once at its public boundary and then uses only functions of
the Python array API standard on the returned namespace.

May import: ``array_api_compat``, ``numpy`` (for reporting only). Nothing else
of curvlinops.
"""

from __future__ import annotations

import array_api_compat
import numpy as np

__all__ = [
    "array_namespace",
    "assert_same_namespace",
    "device",
    "to_device",
    "to_numpy",
    "namespace_name",
    "is_numpy_namespace",
    "is_cupy_namespace",
    "is_torch_namespace",
    "is_jax_namespace",
    "is_array_api_strict_namespace",
    "is_real_floating",
    "can_cast_losslessly",
    "default_float_dtype",
    "dtype_eps",
    "dtype_name",
    "indefinite_article",
]


def array_namespace(*arrays):
    """Return the array-API namespace of the given arrays.

    Thin wrapper around :func:`array_api_compat.array_namespace` that turns its
    error for mixed libraries into a :class:`TypeError` naming the libraries found.

    Parameters
    ----------
    *arrays
        Arrays of one library (NumPy, CuPy, PyTorch, JAX, array-api-strict).
        ``None`` entries and Python scalars are ignored.

    Returns
    -------
    namespace
        The array-API compatible namespace (``array_api_compat.numpy`` for NumPy).

    Raises
    ------
    TypeError
        If the arrays come from more than one library, or none is an array.

    Examples
    --------
    >>> import numpy as np
    >>> xp = array_namespace(np.ones(3))
    >>> namespace_name(xp)
    'numpy'
    """
    # type(...) rather than isinstance: numpy.float64 subclasses float but is a NumPy
    # scalar (what NumPy reductions return) and must count as a NumPy array.
    arrays = [a for a in arrays if a is not None and type(a) not in (int, float, complex, bool)]
    if not arrays:
        raise TypeError("array_namespace needs at least one array, got none.")
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as err:
        kinds = sorted({type(a).__module__.split(".")[0] + "." + type(a).__name__ for a in arrays})
        raise TypeError(
            f"Arrays of different array libraries were mixed: found {kinds}. "
            "Convert all inputs to one library (and device) first."
        ) from err


def namespace_name(xp) -> str:
    """Short, human-readable name of an array namespace (for error messages).

    Examples
    --------
    >>> import numpy as np
    >>> namespace_name(array_namespace(np.zeros(1)))
    'numpy'
    """
    if array_api_compat.is_numpy_namespace(xp):
        return "numpy"
    if array_api_compat.is_cupy_namespace(xp):
        return "cupy"
    if array_api_compat.is_torch_namespace(xp):
        return "torch"
    if array_api_compat.is_jax_namespace(xp):
        return "jax"
    if array_api_compat.is_array_api_strict_namespace(xp):
        return "array_api_strict"
    return getattr(xp, "__name__", repr(xp))


def is_numpy_namespace(xp) -> bool:
    """Whether ``xp`` is NumPy (plain or array-api-compat wrapped)."""
    return array_api_compat.is_numpy_namespace(xp)


def is_cupy_namespace(xp) -> bool:
    """Whether ``xp`` is CuPy (plain or array-api-compat wrapped)."""
    return array_api_compat.is_cupy_namespace(xp)


def is_torch_namespace(xp) -> bool:
    """Whether ``xp`` is PyTorch (plain or array-api-compat wrapped)."""
    return array_api_compat.is_torch_namespace(xp)


def is_jax_namespace(xp) -> bool:
    """Whether ``xp`` is ``jax.numpy``."""
    return array_api_compat.is_jax_namespace(xp)


def is_array_api_strict_namespace(xp) -> bool:
    """Whether ``xp`` is ``array_api_strict``."""
    return array_api_compat.is_array_api_strict_namespace(xp)


def assert_same_namespace(expected, x, what: str = "input") -> None:
    """Raise :class:`TypeError` if ``x`` does not belong to namespace ``expected``.

    Parameters
    ----------
    expected
        The namespace an operator was built on.
    x
        The array handed in.
    what
        Name of the argument, used in the message.

    Examples
    --------
    >>> import numpy as np
    >>> assert_same_namespace(array_namespace(np.ones(1)), np.ones(2))
    """
    found = array_namespace(x)
    name = namespace_name(found)
    if name != namespace_name(expected):
        raise TypeError(
            f"The {what} is {indefinite_article(name)} {name} array, but the operator works on "
            f"{namespace_name(expected)} arrays. Convert it first (same library and device)."
        )


def indefinite_article(word: str) -> str:
    """The indefinite article for ``word`` in messages ("an array", "a vector").

    Examples
    --------
    >>> indefinite_article("array_api_strict"), indefinite_article("numpy")
    ('an', 'a')
    """
    return "an" if word[:1].lower() in "aeiou" else "a"


def device(x):
    """Device of an array (``"cpu"`` for NumPy), via array-api-compat."""
    return array_api_compat.device(x)


def to_device(x, dev):
    """Move ``x`` to device ``dev`` (a no-op when it is already there)."""
    if dev is None or device(x) == dev:
        return x
    return array_api_compat.to_device(x, dev)


def to_numpy(x) -> np.ndarray:
    """Copy an array of any supported library to a NumPy array on the host.

    Meant for reporting and tests, never for use inside a product.

    Examples
    --------
    >>> import numpy as np
    >>> to_numpy(np.arange(3)).tolist()
    [0, 1, 2]
    """
    if isinstance(x, np.ndarray):
        return x
    xp = array_namespace(x)
    if is_torch_namespace(xp):
        return x.detach().cpu().numpy()
    if is_cupy_namespace(xp):
        return x.get()
    if is_array_api_strict_namespace(xp):
        # array-api-strict supports the buffer protocol only on its CPU device
        x = x.to_device(xp.Device("CPU_DEVICE"))
        return np.asarray(x.__array__() if hasattr(x, "__array__") else x)
    return np.asarray(x)


def is_real_floating(dtype, xp) -> bool:
    """Whether ``dtype`` is a real floating dtype of namespace ``xp``."""
    return xp.isdtype(dtype, "real floating")


def dtype_name(dtype) -> str:
    """Short name of a dtype of any library (``'float32'``), for messages and casts.

    Accepts NumPy/CuPy/JAX dtypes and scalar types (``numpy.float64``), PyTorch and
    array-api-strict dtypes, and names.

    Examples
    --------
    >>> import numpy as np
    >>> dtype_name(np.float64), dtype_name(np.dtype("float32"))
    ('float64', 'float32')
    """
    if isinstance(dtype, str):
        return dtype
    if dtype is not None:
        try:
            # NumPy dtypes and scalar types (also JAX's and CuPy's, which are NumPy's).
            return np.dtype(dtype).name
        except TypeError:
            pass
    name = getattr(dtype, "name", None)
    if isinstance(name, str):
        return name
    # 'torch.float32', 'array_api_strict.float32'
    return str(dtype).rsplit(".", 1)[-1]


def can_cast_losslessly(from_dtype, to_dtype, xp) -> bool:
    """Whether values of ``from_dtype`` convert to ``to_dtype`` without loss.

    Integers and booleans count as castable to any floating dtype (they are data,
    not results); a float64 array is not castable to float32.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> can_cast_losslessly(xp.float32, xp.float64, xp)
    True
    >>> can_cast_losslessly(xp.float64, xp.float32, xp)
    False
    """
    if from_dtype == to_dtype:
        return True
    if xp.isdtype(from_dtype, ("integral", "bool")):
        return True
    if xp.isdtype(from_dtype, "real floating") and xp.isdtype(to_dtype, "real floating"):
        # Compare precisions: torch's can_cast(float64, float32) is True (same kind).
        return xp.finfo(from_dtype).bits <= xp.finfo(to_dtype).bits
    if xp.isdtype(from_dtype, "complex floating") and not xp.isdtype(to_dtype, "complex floating"):
        return False
    return xp.can_cast(from_dtype, to_dtype)


def default_float_dtype(xp, device=None):
    """The namespace's default real floating dtype (float64, float32 for JAX without x64)."""
    info = xp.__array_namespace_info__()
    return info.default_dtypes(device=device)["real floating"]


def dtype_eps(dtype) -> float:
    """Machine epsilon of a real floating dtype of any library."""
    name = dtype_name(dtype)
    return float(np.finfo(np.dtype(name)).eps)
