"""The container :class:`Sequential`: layers applied one after the other.

May import: ``.module``.
"""

from __future__ import annotations

from .module import Layer, Module

__all__ = ["Sequential"]


class Sequential(Module):
    """Applies its layers in order; its parameters are theirs, concatenated in order.

    Parameters
    ----------
    *layers : Module
        Layers or other ``Sequential`` containers (flattened into one chain; layer
        names are index paths such as ``"2"`` or ``"1.0"``).

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops.nn import Linear, ReLU
    >>> model = Sequential(Linear(784, 256), ReLU(), Linear(256, 10))
    >>> [name for name, _ in model.chain()]
    ['0', '1', '2']
    >>> len(model.init(0, xp=xp))
    4
    >>> model[:2]
    Sequential(Linear(784, 256, bias=True), ReLU())
    """

    def __init__(self, *layers: Module):
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(
                    f"Sequential takes curvlinops.nn modules; layer {i} is a "
                    f"{type(layer).__name__}."
                )
        self.layers = tuple(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(*self.layers[index])
        return self.layers[index]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Sequential({inner})"

    def chain(self):
        out = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Layer):
                out.append((str(i), layer))
            else:
                out.extend((f"{i}.{name}", sub) for name, sub in layer.chain())
        return out
