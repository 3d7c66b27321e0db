"""Random numbers on any array-API backend from an explicit seed.

The array API has no random module. :class:`~curvlinops.RandomGenerator` wraps the native
generator of each library (NumPy ``Generator``, ``cupy.random`` generator,
``torch.Generator``, ``jax.random`` keys) behind one small interface, so that
every Monte-Carlo quantity in curvlinops is reproducible from a seed and draws
directly on the device of the operator. There is no global random state.

For array-api-strict the draws are made with NumPy and converted: that namespace
only exists to prove that no NumPy-only call slipped into the algorithms.

May import: numpy, and lazily torch, cupy, jax; ``.namespace``.
"""

from __future__ import annotations

import numpy as np

from .namespace import (
    device,
    dtype_name,
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
    namespace_name,
)

__all__ = ["RandomGenerator", "as_generator", "normal", "rademacher", "uniform"]


class RandomGenerator:
    """A seeded random generator that draws arrays of one namespace and device.

    Parameters
    ----------
    seed : int, numpy.random.Generator, torch.Generator, jax key or RandomGenerator
        An integer seed, or a native generator of the library of ``xp``
        (a JAX key for ``jax.numpy``; it is split at every draw).
    xp
        Array namespace the draws are returned in.
    device
        Device the draws are made on (``None``: the library's default).

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> g = RandomGenerator(0, xp)
    >>> g.rademacher((2, 3), xp.float64).shape
    (2, 3)
    >>> bool(xp.all(RandomGenerator(1, xp).normal((4,), xp.float32)
    ...             == RandomGenerator(1, xp).normal((4,), xp.float32)))
    True
    """

    def __init__(self, seed, xp, device=None):
        if isinstance(seed, RandomGenerator):
            seed = seed._native
        self.xp = xp
        self.device = device
        self._native = _make_native(seed, xp, device)

    def normal(self, shape, dtype):
        """Standard normal draws of the given shape and real floating dtype."""
        shape = tuple(int(s) for s in shape)
        xp = self.xp
        if is_torch_namespace(xp):
            import torch

            return torch.randn(shape, generator=self._native, dtype=dtype, device=self.device)
        if is_jax_namespace(xp):
            import jax

            return jax.random.normal(self._next_key(), shape, dtype=dtype)
        if is_cupy_namespace(xp):
            return self._native.standard_normal(shape, dtype=dtype_name(dtype))
        draw = self._native.standard_normal(shape).astype(dtype_name(dtype))
        return self._from_numpy(draw, dtype)

    def uniform(self, shape, dtype, low=0.0, high=1.0):
        """Uniform draws on ``[low, high)`` of the given shape and floating dtype."""
        shape = tuple(int(s) for s in shape)
        xp = self.xp
        if is_torch_namespace(xp):
            import torch

            u = torch.rand(shape, generator=self._native, dtype=dtype, device=self.device)
            return low + (high - low) * u
        if is_jax_namespace(xp):
            import jax

            return jax.random.uniform(self._next_key(), shape, dtype=dtype, minval=low, maxval=high)
        if is_cupy_namespace(xp):
            u = self._native.random(shape, dtype=dtype_name(dtype))
            return low + (high - low) * u
        draw = self._native.uniform(low, high, size=shape).astype(dtype_name(dtype))
        return self._from_numpy(draw, dtype)

    def rademacher(self, shape, dtype):
        """Draws of +1 and -1 with equal probability."""
        u = self.uniform(shape, dtype)
        xp = self.xp
        dev = device(u)
        minus, plus = (xp.asarray(v, dtype=dtype, device=dev) for v in (-1.0, 1.0))
        return xp.where(u < 0.5, minus, plus)

    # -- internals -----------------------------------------------------------------

    def _from_numpy(self, draw, dtype):
        xp = self.xp
        if is_numpy_namespace(xp):
            return draw
        return xp.asarray(draw, dtype=dtype, device=self.device)

    def _next_key(self):
        import jax

        self._native, sub = jax.random.split(self._native)
        return sub


def _make_native(seed, xp, device):
    """Build the native generator of ``xp`` from an int seed or accept a native one."""
    name = namespace_name(xp)
    if isinstance(seed, (bool,)) or not (
        isinstance(seed, (int, np.integer)) or _is_native_generator(seed, xp)
    ):
        raise TypeError(
            f"seed must be an int or a {name} generator, got {type(seed).__name__}. "
            "curvlinops uses no global random state: pass an explicit seed."
        )
    if is_torch_namespace(xp):
        import torch

        if isinstance(seed, torch.Generator):
            return seed
        gen = torch.Generator(device=device if device is not None else "cpu")
        gen.manual_seed(int(seed))
        return gen
    if is_jax_namespace(xp):
        import jax

        if isinstance(seed, (int, np.integer)):
            # RBG keys compile several times faster than the default threefry ones.
            return jax.random.key(int(seed), impl="rbg")
        return seed
    if is_cupy_namespace(xp):
        import cupy

        if isinstance(seed, (int, np.integer)):
            return cupy.random.default_rng(int(seed))
        return seed
    if is_numpy_namespace(xp) or is_array_api_strict_namespace(xp):
        if isinstance(seed, np.random.Generator):
            return seed
        return np.random.default_rng(int(seed))
    raise TypeError(f"No random-number support for the namespace {name}.")


def _is_native_generator(seed, xp) -> bool:
    if isinstance(seed, np.random.Generator):
        return is_numpy_namespace(xp) or is_array_api_strict_namespace(xp)
    module = type(seed).__module__.split(".")[0]
    if is_torch_namespace(xp):
        return module == "torch" and type(seed).__name__ == "Generator"
    if is_jax_namespace(xp):
        return module in ("jax", "jaxlib")
    if is_cupy_namespace(xp):
        return module == "cupy"
    return False


def as_generator(seed, xp, device=None) -> RandomGenerator:
    """Return ``seed`` if it is a :class:`~curvlinops.RandomGenerator`, else build one from it."""
    if isinstance(seed, RandomGenerator):
        return seed
    return RandomGenerator(seed, xp, device)


def normal(shape, *, seed, xp, dtype, device=None):
    """Standard normal draws; see :class:`~curvlinops.RandomGenerator`.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> normal((2,), seed=0, xp=xp, dtype=xp.float64).dtype
    dtype('float64')
    """
    return as_generator(seed, xp, device).normal(shape, dtype)


def rademacher(shape, *, seed, xp, dtype, device=None):
    """Rademacher (+-1) draws; see :class:`~curvlinops.RandomGenerator`.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> sorted(set(rademacher((50,), seed=0, xp=xp, dtype=xp.float64).tolist()))
    [-1.0, 1.0]
    """
    return as_generator(seed, xp, device).rademacher(shape, dtype)


def uniform(shape, *, seed, xp, dtype, device=None, low=0.0, high=1.0):
    """Uniform draws on ``[low, high)``; see :class:`~curvlinops.RandomGenerator`.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> u = uniform((100,), seed=0, xp=xp, dtype=xp.float64)
    >>> bool(xp.all((u >= 0) & (u < 1)))
    True
    """
    return as_generator(seed, xp, device).uniform(shape, dtype, low=low, high=high)
