"""A model over a subset of its parameters, the others held fixed.

What lives here: :class:`ParameterSubsetModel`, which turns a protocol model over
``params`` into a protocol model over ``[params[i] for i in indices]``: the other
parameters keep the values they were given. Every curvature operator then acts on the
chosen parameters only (their block of the curvature), which is how the Laplace
approximation of :mod:`curvlinops.bayes` treats "the last layer" or "a subnetwork".

The tiers carry over: tangents of the fixed parameters are zero (first and second
order), gradients of the fixed parameters are dropped, and layer taps keep the layers
whose weight is chosen (re-indexed into the subset; a bias that is not chosen is left
out of its tap). The layer protocol (:attr:`~curvlinops.models.Capability.LAYER_PROTOCOL`)
does not carry over.

May import: ``curvlinops._backend``, ``.params``, ``.protocol``.
"""

from __future__ import annotations

import dataclasses
import numbers

from .._backend import array_namespace, device as array_device
from .params import param_shapes
from .protocol import Linearization, Model, Tier

__all__ = ["ParameterSubsetModel"]


class ParameterSubsetModel(Model):
    """A protocol model over the parameters ``params[i], i in indices``; the rest fixed.

    Parameters
    ----------
    model : curvlinops.models.Model
        The model over all parameters.
    params : list of arrays
        Values of all parameters; those not in ``indices`` stay at these values.
    indices : sequence of int
        Positions (in ``params``) of the parameters the new model is a function of,
        in increasing order.

    Attributes
    ----------
    model : Model
        The wrapped model.
    indices : tuple of int
        The chosen positions.

    Notes
    -----
    The curvature of the subset model is the corresponding diagonal block of the full
    model's curvature (the other parameters are constants). Layer taps (tier 3) are
    offered when the wrapped model offers them: a tap whose weight is chosen stays
    (with its bias index re-mapped, or None if its bias is not chosen); a tap whose
    weight is not chosen is dropped, and a chosen bias without its weight then belongs
    to no tap (the Kronecker-factored operators refuse it by name).

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import GGNLinearOperator, MSELoss, nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> last = ParameterSubsetModel(model, params, [2, 3])
    >>> data = [(np.ones((5, 3)), np.zeros((5, 2)))]
    >>> G = GGNLinearOperator(model, MSELoss(), params, data).to_dense()
    >>> G_last = GGNLinearOperator(last, MSELoss(), params[2:], data).to_dense()
    >>> bool(np.allclose(G_last, G[-10:, -10:]))
    True
    """

    def __init__(self, model, params, indices):
        if not isinstance(model, Model):
            raise TypeError(
                f"ParameterSubsetModel wraps a protocol model (curvlinops.models.Model), got "
                f"a {type(model).__name__}; convert it first with curvlinops.as_model."
            )
        params = list(params)
        self.indices = _checked_indices(indices, len(params))
        self.model = model
        self._params = params
        self._shapes = param_shapes([params[i] for i in self.indices])
        self.tiers = frozenset(t for t in model.tiers if t in frozenset(Tier))

    @property
    def name(self) -> str:
        """The wrapped model's name and the chosen parameters."""
        return f"{self.model.name} (parameters {list(self.indices)})"

    def expected_param_shapes(self):
        """Shapes of the chosen parameters."""
        return list(self._shapes)

    def full_params(self, params):
        """All parameters: ``params`` (the chosen ones, in order) among the fixed ones.

        Examples
        --------
        >>> import numpy as np
        >>> from curvlinops import nn
        >>> model = nn.Sequential(nn.Linear(2, 1))
        >>> sub = ParameterSubsetModel(model, [np.ones((1, 2)), np.zeros(1)], [1])
        >>> [p.tolist() for p in sub.full_params([np.array([5.0])])]
        [[[1.0, 1.0]], [5.0]]
        """
        params = list(params)
        if len(params) != len(self.indices):
            raise ValueError(
                f"{self.name} takes {len(self.indices)} parameter arrays, got {len(params)}."
            )
        full = list(self._params)
        for i, p in zip(self.indices, params, strict=True):
            full[i] = p
        return full

    def __call__(self, params, x):
        return self.model(self.full_params(params), x)

    def linearize(self, params, x) -> Linearization:
        inner = self.model.linearize(self.full_params(params), x)
        return _SubsetLinearization(self, list(params), x, inner)


def _checked_indices(indices, count):
    """``indices`` as a sorted tuple of distinct ints in ``[0, count)``, or a clear error."""
    try:
        values = list(indices)
    except TypeError:
        raise TypeError(
            f"indices must be a sequence of parameter positions, got {indices!r}."
        ) from None
    if not values or not all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in values
    ):
        raise TypeError(
            f"indices must be a non-empty sequence of ints (positions in params), got {values!r}."
        )
    values = [int(i) for i in values]
    if values != sorted(set(values)) or values[0] < 0 or values[-1] >= count:
        raise ValueError(
            f"indices must be distinct positions in increasing order within [0, {count - 1}] "
            f"(the model has {count} parameter arrays), got {values}."
        )
    return tuple(values)


class _SubsetLinearization(Linearization):
    """The wrapped model's linearization, seen through the chosen parameters."""

    def __init__(self, model, params, x, inner):
        self.model, self.params, self.x = model, params, x
        self.shapes = param_shapes(params)
        self._inner = inner
        self._traces_outputs = inner._traces_outputs

    @property
    def outputs(self):
        return self._inner.outputs

    def _padded(self, tangents):
        """Tangents of all parameters: the chosen ones', zeros for the fixed ones."""
        k = tangents[0].shape[-1]
        full = self.model.full_params(tangents)
        for i, p in enumerate(self.model._params):
            if i not in self.model.indices:
                xp = array_namespace(p)
                full[i] = xp.zeros((*p.shape, k), dtype=p.dtype, device=array_device(p))
        return full

    def _chosen(self, grads):
        return [grads[i] for i in self.model.indices]

    def _jvp(self, tangents):
        return self._inner._jvp(self._padded(tangents))

    def _vjp(self, cotangents):
        return self._chosen(self._inner._vjp(cotangents))

    def _gauss_newton_vjp(self, tangents, cotangent_map):
        return self._chosen(self._inner._gauss_newton_vjp(self._padded(tangents), cotangent_map))

    def _second_order_vjp(self, cotangent, tangents, cotangent_tangent):
        full = self._padded(tangents)
        return self._chosen(self._inner._second_order_vjp(cotangent, full, cotangent_tangent))

    def _layer_taps(self, cotangents):
        position = {i: j for j, i in enumerate(self.model.indices)}
        taps = []
        for tap in self._inner._layer_taps(cotangents):
            if tap.weight_index not in position:
                continue
            taps.append(
                dataclasses.replace(
                    tap,
                    weight_index=position[tap.weight_index],
                    bias_index=position.get(tap.bias_index),
                )
            )
        return taps
