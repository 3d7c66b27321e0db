"""Dropout in its evaluation form: :class:`Dropout`, the identity.

A dropout layer in training mode multiplies its inputs by random masks: the loss is
then a random function of the parameters and has no well-defined Hessian, GGN or
Fisher (each product would see other masks). Curvature is taken of the model in
evaluation form, where dropout is the identity (as ``module.eval()`` makes it in
PyTorch); :class:`Dropout` is that layer, and refuses ``training=True``.

Layer protocol: the curvature passes through unchanged, per datum and averaged (both
exact).

May import: ``.shape``.
"""

from __future__ import annotations

import math

from .shape import Identity

__all__ = ["Dropout"]


class Dropout(Identity):
    """Dropout at inference: the identity, as ``torch.nn.Dropout`` in evaluation mode.

    Every tier (the derivatives of the identity); its layer protocol passes curvature
    factors through unchanged (exact).

    Parameters
    ----------
    p : float
        The drop probability of the training form, in ``[0, 1)``; kept for the
        record (the evaluation form does not depend on it). Default 0.5.
    training : bool
        Must be False: random masks make the loss non-deterministic, so its
        curvature is not defined.

    Raises
    ------
    ValueError
        For ``training=True`` or a ``p`` outside ``[0, 1)``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> Dropout(0.3)([], xp.asarray([[1.0, -2.0]])).tolist()
    [[1.0, -2.0]]
    >>> Dropout(training=True)
    Traceback (most recent call last):
    ...
    ValueError: Dropout(training=True) multiplies by random masks...
    """

    def __init__(self, p=0.5, training=False):
        if training:
            raise ValueError(
                "Dropout(training=True) multiplies by random masks, which makes the loss "
                "non-deterministic: its curvature (Hessian, GGN, Fisher) is not defined. "
                "Build the layer in evaluation form, Dropout(p, training=False), the "
                "identity (as PyTorch's module.eval())."
            )
        if (
            isinstance(p, bool)
            or not isinstance(p, (int, float))
            or not (math.isfinite(p) and 0 <= p < 1)
        ):
            raise ValueError(f"Dropout needs a drop probability p in [0, 1), got {p!r}.")
        self.p = float(p)

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"
