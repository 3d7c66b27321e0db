"""Token and position embeddings: :class:`Embedding`, :class:`PositionalEmbedding` and
:class:`SinusoidalPositions`.

- :class:`Embedding` looks up rows of a table: ``y = table[ids]`` for integer ids
  ``(N, S...)``, outputs ``(N, S..., D)``. It is the linear map ``onehot(ids) @ table``
  of its parameter; its inputs are not differentiable (no input tangent or cotangent).
  Its tap has kind ``"embedding"`` (:class:`~curvlinops.models.LayerTap`): the ids, the
  output gradients ``(N, S..., D, M)`` and ``matrix_shape = (D, V)``; K-FAC's input
  factor is then the diagonal of the ids' counts. The table's gradient
  ``onehot(ids)^T g`` is one matrix product with the one-hot rows (the array API has
  no scatter-add).
- :class:`PositionalEmbedding` adds a learned table of positions, ``y = a + P[:S]``
  for inputs ``(N, S, E)``. It has no tap (its per-datum gradient is the output
  gradient itself, summed over nothing): K-FAC and the tap diagonals do not cover it.
- :class:`SinusoidalPositions` adds the fixed encodings of Vaswani et al. (2017), no
  parameters; a GPT built with it is covered by K-FAC entirely.

May import: ``curvlinops._backend``, ``.module``.
"""

from __future__ import annotations

import math

from .._backend import device, dtype_name, namespace_name
from .module import Layer

__all__ = ["Embedding", "PositionalEmbedding", "SinusoidalPositions"]


def _positive_int(value, what, cls):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{cls} needs a positive integer {what}, got {value!r}.")
    return value


def _check_sequence(layer, a, E, max_len=None):
    if a.ndim != 3 or a.shape[-1] != E or (max_len is not None and a.shape[1] > max_len):
        longest = "" if max_len is None else f" with S <= {max_len}"
        raise ValueError(
            f"{layer!r} expects inputs of shape (N, S, {E}){longest}, got shape {tuple(a.shape)}."
        )


class Embedding(Layer):
    """A lookup table ``y = weight[ids]``, as ``torch.nn.Embedding``.

    Inputs are integer ids ``(N, S...)`` in ``[0, num_embeddings)``, outputs
    ``(N, S..., embedding_dim)``; the parameter is ``[weight (V, D)]``, initialized
    from ``N(0, 1)`` as PyTorch. A model whose chain starts with an embedding takes
    integer inputs (:attr:`~curvlinops.nn.Layer.integer_inputs`): they are checked to
    be in range and not cast. The ids are not differentiable: the layer has no input
    tangents or cotangents. Its tap has kind ``"embedding"``.

    Parameters
    ----------
    num_embeddings : int
        The vocabulary size ``V``.
    embedding_dim : int
        The size ``D`` of each row.

    Raises
    ------
    ValueError
        For non-positive sizes; at the forward pass (through the model's checks), for
        ids out of range.
    TypeError
        At the forward pass, for floating inputs.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> layer = Embedding(3, 2)
    >>> table = xp.asarray([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    >>> layer([table], xp.asarray([[2, 0]])).tolist()
    [[[4.0, 5.0], [0.0, 1.0]]]
    >>> lin = layer.linearize([table], xp.asarray([[2, 0], [2, 2]]))
    >>> lin.vjp(xp.ones((2, 2, 2)))[0][:, 0].tolist()
    [1.0, 0.0, 3.0]
    """

    has_tap = True
    tap_kind = "embedding"
    integer_inputs = True
    r_backward_uses_input_tangent = False
    input_layout = output_layout = "features_last"

    def __init__(self, num_embeddings: int, embedding_dim: int):
        self.num_embeddings = _positive_int(num_embeddings, "num_embeddings", "Embedding")
        self.embedding_dim = _positive_int(embedding_dim, "embedding_dim", "Embedding")

    def __repr__(self) -> str:
        return f"Embedding({self.num_embeddings}, {self.embedding_dim})"

    def param_shapes(self):
        return [(self.num_embeddings, self.embedding_dim)]

    def init_params(self, generator, dtype):
        return [generator.normal((self.num_embeddings, self.embedding_dim), dtype)]

    def check_integer_inputs(self, x, xp):
        """Raise ValueError unless every id is in ``[0, num_embeddings)``.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> Embedding(3, 2).check_integer_inputs(xp.asarray([[0, -1]]), xp)
        Traceback (most recent call last):
        ...
        ValueError: Embedding(3, 2) takes ids in [0, 3), got ids from -1 to 0. ...
        """
        if x.size == 0:
            return None
        low, high = int(xp.min(x)), int(xp.max(x))
        if low < 0 or high >= self.num_embeddings:
            raise ValueError(
                f"{self!r} takes ids in [0, {self.num_embeddings}), got ids from {low} to "
                f"{high}. Map the tokens to a vocabulary of {self.num_embeddings} ids (or "
                "enlarge num_embeddings)."
            )
        return None

    # -- forward and derivatives -------------------------------------------------------

    def _one_hot(self, state, dtype, xp):
        """One-hot rows ``(N * S..., V)`` of the ids, in ``dtype`` (cached)."""
        key = ("one_hot", dtype_name(dtype))
        if key not in state:
            ids = xp.reshape(state["input"], (-1,))
            vocabulary = xp.arange(self.num_embeddings, device=device(ids))
            state[key] = xp.astype(ids[:, None] == vocabulary, dtype)
        return state[key]

    def _lookup(self, table, ids, xp):
        """``table[ids]`` for a table ``(V, ...)``: ``ids.shape + table.shape[1:]``."""
        rows = xp.take(table, xp.reshape(ids, (-1,)), axis=0)
        return xp.reshape(rows, tuple(ids.shape) + tuple(table.shape[1:]))

    def forward(self, params, a, xp):
        if not xp.isdtype(a.dtype, "integral"):
            raise TypeError(f"{self!r} takes integer ids, got {dtype_name(a.dtype)} inputs.")
        return self._lookup(params[0], a, xp)

    def tangent(self, params, dparams, state, ta, xp):
        # the rows of the K table tangents: (N, S..., D, K) -> (N, S..., K, D)
        return xp.moveaxis(self._lookup(dparams[0], state["input"], xp), -1, -2)

    def _table_gradient(self, state, g, xp):
        """``onehot(ids)^T g`` for cotangents ``(N, S..., K, D)``: ``(V, D, K)``."""
        K, D = g.shape[-2], self.embedding_dim
        one_hot = self._one_hot(state, g.dtype, xp)
        gW = xp.matrix_transpose(one_hot) @ xp.reshape(g, (-1, K * D))  # (V, K * D)
        return xp.permute_dims(xp.reshape(gW, (self.num_embeddings, K, D)), (0, 2, 1))

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        grads = [self._table_gradient(state, g, xp)] if need_params else []
        return grads, None  # integer ids: no input cotangents

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        # linear in the table and nothing before it: R g_table = onehot^T R g
        if rg is None:
            K = dparams[0].shape[-1]
            shape = (self.num_embeddings, self.embedding_dim, K)
            rgrads = [xp.zeros(shape, dtype=g.dtype, device=device(g))]
        else:
            rgrads = [self._table_gradient(state, rg, xp)]
        return rgrads, None, None

    # -- the layer protocol ------------------------------------------------------------

    def tap(self, state, output_grads=None, xp=None):
        """``(ids (N, S...), output gradients (N, S..., D, M) or None, (D, V))``.

        The embedding tap (``kind="embedding"``): the curvature operators read the ids
        (one-hot inputs never formed for K-FAC) and the table as a transposed weight.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> ids, grads, shape = Embedding(5, 2).tap({"input": xp.asarray([[1, 3]])},
        ...                                         xp.ones((1, 2, 4, 2)), xp)
        >>> ids.tolist(), grads.shape, shape
        ([[1, 3]], (1, 2, 2, 4), (2, 5))
        """
        grads = None if output_grads is None else xp.moveaxis(output_grads, -2, -1)
        return state["input"], grads, (self.embedding_dim, self.num_embeddings)

    def backward_curvature(self, params, state, H, g, xp):
        raise NotImplementedError(
            "the per-datum curvature rule",
            " (the inputs of an Embedding are integer ids: there is no curvature to pass on; "
            "an embedding can only be the first layer with parameters)",
        )

    def backward_mean_curvature(self, params, H, statistics, xp):
        raise NotImplementedError(
            "the batch-averaged curvature rule",
            " (the inputs of an Embedding are integer ids: there is no curvature to pass on; "
            "an embedding can only be the first layer with parameters)",
        )


class _Additive(Layer):
    """Shared rules of ``y = a + c``: the identity in the inputs."""

    r_backward_uses_input_tangent = False
    input_layout = output_layout = "features_last"

    def backward_curvature(self, params, state, H, g, xp):
        return H

    def backward_mean_curvature(self, params, H, statistics, xp):
        return H


class SinusoidalPositions(_Additive):
    """Adds the fixed sinusoidal position encodings to ``(N, S, E)`` inputs.

    ``y[n, p, 2i] = a[n, p, 2i] + sin(p / 10000^(2i / E))`` and
    ``y[n, p, 2i + 1] = a[n, p, 2i + 1] + cos(p / 10000^(2i / E))`` (Vaswani et al.,
    2017). No parameters; every tier (the identity in the inputs) and exact curvature
    rules. The encodings are made once per namespace, device, dtype and length.

    Parameters
    ----------
    base : float
        The base of the wavelengths; default ``10000``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> y = SinusoidalPositions()([], xp.zeros((1, 2, 4)))
    >>> [[round(float(v), 4) for v in row] for row in y[0]]
    [[0.0, 1.0, 0.0, 1.0], [0.8415, 0.5403, 0.01, 1.0]]
    """

    def __init__(self, base: float = 10000.0):
        base = float(base)
        if not (math.isfinite(base) and base > 0):
            raise ValueError(f"SinusoidalPositions needs a positive base, got {base!r}.")
        self.base = base
        self._converted = {}

    def __repr__(self) -> str:
        return "SinusoidalPositions()" if self.base == 1e4 else f"SinusoidalPositions({self.base})"

    def encodings(self, S, E, like, xp):
        """The encodings ``(S, E)`` in the namespace, device and dtype of ``like``.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> SinusoidalPositions().encodings(1, 2, xp.zeros(1), xp).tolist()
        [[0.0, 1.0]]
        """
        key = (namespace_name(xp), str(device(like)), dtype_name(like.dtype), S, E)
        if key not in self._converted:
            dev = device(like)
            position = xp.reshape(xp.arange(S, dtype=like.dtype, device=dev), (S, 1))
            pair = xp.arange(E, device=dev) // 2
            rate = xp.exp(xp.astype(2 * pair, like.dtype) * (-math.log(self.base) / E))
            angle = position * xp.reshape(rate, (1, E))
            odd = xp.reshape(xp.arange(E, device=dev) % 2 == 1, (1, E))
            self._converted[key] = xp.where(odd, xp.cos(angle), xp.sin(angle))
        return self._converted[key]

    def forward(self, params, a, xp):
        _check_sequence(self, a, a.shape[-1] if a.ndim else 0)
        return a + self.encodings(a.shape[1], a.shape[2], a, xp)

    def tangent(self, params, dparams, state, ta, xp):
        return ta

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        return [], (g if need_input else None)

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        if not need_input:
            return [], None, None
        return [], g, rg


class PositionalEmbedding(_Additive):
    """Adds a learned embedding of the positions: ``y = a + weight[:S]`` on ``(N, S, E)``.

    The parameter is ``[weight (max_len, E)]``, initialized from ``N(0, 1)`` (as a
    ``torch.nn.Embedding`` of the positions). Every tier; exact curvature rules (the
    identity in the inputs). Its tap is an embedding of the positions
    (``y - a = onehot(arange(S)) @ weight``: kind ``"embedding"`` with the position ids
    ``(N, S)``), so K-FAC (whose input factor is then ``I / S`` over the positions in
    use), EKFAC and the diagonals cover it.

    Parameters
    ----------
    max_len : int
        The longest sequence ``S`` the layer takes.
    embedding_dim : int
        The features ``E``.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> layer = PositionalEmbedding(3, 2)
    >>> table = xp.asarray([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    >>> layer([table], xp.ones((1, 2, 2))).tolist()
    [[[1.0, 2.0], [3.0, 4.0]]]
    """

    has_tap = True
    tap_kind = "embedding"

    def __init__(self, max_len: int, embedding_dim: int):
        self.max_len = _positive_int(max_len, "max_len", "PositionalEmbedding")
        self.embedding_dim = _positive_int(embedding_dim, "embedding_dim", "PositionalEmbedding")

    def __repr__(self) -> str:
        return f"PositionalEmbedding({self.max_len}, {self.embedding_dim})"

    def param_shapes(self):
        return [(self.max_len, self.embedding_dim)]

    def init_params(self, generator, dtype):
        return [generator.normal((self.max_len, self.embedding_dim), dtype)]

    def forward(self, params, a, xp):
        _check_sequence(self, a, self.embedding_dim, self.max_len)
        return a + params[0][: a.shape[1], :]

    def tangent(self, params, dparams, state, ta, xp):
        S = state["input"].shape[1]
        own = xp.expand_dims(xp.permute_dims(dparams[0][:S, ...], (0, 2, 1)), axis=0)
        if ta is None:  # (1, S, K, E) for every datum
            return xp.broadcast_to(own, (state["input"].shape[0],) + tuple(own.shape[1:]))
        return ta + own

    def tap(self, state, output_grads=None, xp=None):
        """``(position ids (N, S), output gradients (N, S, E, M) or None, (E, max_len))``.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> ids, _, shape = PositionalEmbedding(4, 2).tap({"input": xp.ones((2, 3, 2))}, None, xp)
        >>> ids.tolist(), shape
        ([[0, 1, 2], [0, 1, 2]], (2, 4))
        """
        a = state["input"]
        N, S = a.shape[0], a.shape[1]
        positions = xp.arange(S, device=device(a))
        ids = xp.broadcast_to(positions[None, :], (N, S))
        grads = None if output_grads is None else xp.moveaxis(output_grads, -2, -1)
        return ids, grads, (self.embedding_dim, self.max_len)

    def _table_gradient(self, g, xp):
        """``sum_n g[n]`` for cotangents ``(N, S, K, E)``, zero-padded: ``(max_len, E, K)``."""
        rows = xp.permute_dims(xp.sum(g, axis=0), (0, 2, 1))  # (S, E, K)
        rest = self.max_len - rows.shape[0]
        if rest == 0:
            return rows
        pad = xp.zeros((rest,) + tuple(rows.shape[1:]), dtype=g.dtype, device=device(g))
        return xp.concat([rows, pad], axis=0)

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        grads = [self._table_gradient(g, xp)] if need_params else []
        return grads, (g if need_input else None)

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        if rg is None:
            K = dparams[0].shape[-1]
            shape = (self.max_len, self.embedding_dim, K)
            rgrads = [xp.zeros(shape, dtype=g.dtype, device=device(g))]
        else:
            rgrads = [self._table_gradient(rg, xp)]
        if not need_input:
            return rgrads, None, None
        return rgrads, g, rg
