"""Multi-head self-attention: :class:`MultiheadSelfAttention`, as ``torch.nn.MultiheadAttention``.

For inputs ``x`` of shape ``(N, S, E)`` and ``H`` heads of ``d = E / H`` features:
``[q | k | v] = x W_in^T + b_in`` (the packed input projection, ``(N, S, 3E)``), per
head ``A = c q k^T`` with ``c = 1 / sqrt(d)`` (and ``-inf`` above the diagonal with
``causal=True``), ``P = softmax(A)`` over the keys, ``o = P v``, the heads side by side,
and ``y = o W_out^T + b_out``. The layer is a composite of two
:class:`~curvlinops.nn.Linear` layers (the projections) around the parameter-free
attention core, whose rules are, per head, with tangents ``dq, dk, dv``:

- tangent: ``dA = c (dq k^T + q dk^T)``, ``dP = P * (dA - rowsum(P * dA))``,
  ``do = dP v + P dv``;
- backward, for output cotangents ``g``: ``g_P = g v^T``, ``g_v = P^T g``,
  ``g_A = P * (g_P - rowsum(P * g_P))``, ``g_q = c g_A k``, ``g_k = c g_A^T q``;
- R-operator (the directional derivative of the backward pass along the tangents, with
  ``R g`` the cotangents' own): ``R g_P = (R g) v^T + g dv^T``,
  ``R g_v = dP^T g + P^T R g``, ``R g_A = dP * (g_P - rowsum(P * g_P)) + P * (R g_P -
  rowsum(dP * g_P + P * R g_P))`` (the softmax's second derivative),
  ``R g_q = c (R g_A k + g_A dk)`` and ``R g_k = c (R g_A^T q + g_A^T dq)`` (the
  bilinear ``q k^T`` and ``P v`` terms). The projections add their own terms, among
  them the cross terms between their weights and the parameters before them.

Every head and every one of the ``K`` vectors goes through one batched matrix product
(arrays ``(N, K, H, S, d)``). A masked score gets ``P = 0``, so its tangent and
cotangent vanish with no further care.

Tier 3: :meth:`MultiheadSelfAttention.backward_taps` gives two matrix taps, the
packed input projection (``"<name>.in_proj"``: inputs ``(N, S, E)``, outputs
``(N, S, 3E)``) and the output projection (``"<name>.out_proj"``: inputs the attention
output ``(N, S, E)``), their output gradients recorded in one backward pass. The
curvature walks of the layer protocol do not go through attention (it mixes positions):
its curvature rules and its tap in a walk raise
:class:`~curvlinops.models.MissingLayerRuleError`.

May import: ``curvlinops._backend``, ``curvlinops.models``, ``.module``,
``.linearization``, ``.linear``.
"""

from __future__ import annotations

import math

from .._backend import device
from .linear import Linear
from .linearization import LinearizedNativeLayer
from .module import Layer

__all__ = ["MultiheadSelfAttention"]

_NO_WALK = (
    " (attention mixes the positions of a sequence; the Hessian diagonal and the "
    "Kronecker-factored Hessian walk per-position rules and do not go through it: use "
    "HessianLinearOperator, GGNLinearOperator, K-FAC (KFACLinearOperator, "
    "EKFACLinearOperator) or curvlinops.hutchinson_diagonal instead)"
)


def _rowsum(a, xp):
    return xp.sum(a, axis=-1, keepdims=True)


class _Memo:
    """What the forward-tangent pass keeps for :meth:`MultiheadSelfAttention.r_backward`."""

    def __init__(self, ta, heads, dP, t_o):
        self.ta, self.heads, self.dP, self.t_o = ta, heads, dP, t_o


class MultiheadSelfAttention(Layer):
    """Multi-head self-attention on ``(N, S, E)``, as ``torch.nn.MultiheadAttention``.

    Parameterized as ``torch.nn.MultiheadAttention(E, H, bias=bias, batch_first=True)``
    so that its weights copy across: ``[in_proj_weight (3E, E), in_proj_bias (3E,),
    out_proj.weight (E, E), out_proj.bias (E,)]`` (``[in_proj_weight,
    out_proj.weight]`` without bias), with the same initialization (Xavier-uniform
    packed projection, zero biases). Scaled dot-product attention per head with a
    softmax over the keys; ``causal=True`` masks the future (the output at position
    ``t`` depends on positions ``<= t`` only), as an ``attn_mask`` of
    ``torch.triu(ones, 1)``. Every tier (see :mod:`curvlinops.nn.attention`); two
    matrix taps; no curvature-walk rules.

    Parameters
    ----------
    embed_dim : int
        The features ``E``.
    num_heads : int
        The heads ``H``; must divide ``E``.
    causal : bool
        Whether position ``t`` attends to positions ``<= t`` only; default False.
    bias : bool
        Whether the projections have biases; default True.

    Raises
    ------
    ValueError
        For sizes that are not positive integers or heads that do not divide
        ``embed_dim``; at the forward pass, for inputs of another shape.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> layer = MultiheadSelfAttention(4, 2, causal=True)
    >>> layer.expected_param_shapes()
    [(12, 4), (12,), (4, 4), (4,)]
    >>> params = layer.init(0, xp=xp, dtype=xp.float64)
    >>> x = xp.reshape(xp.arange(24, dtype=xp.float64), (2, 3, 4)) / 10
    >>> lin = layer.linearize(params, x)
    >>> lin.outputs.shape
    (2, 3, 4)
    >>> [(tap.name, tap.weight_index, tap.bias_index, tap.matrix_shape)
    ...  for tap in lin.layer_taps(xp.ones((2, 3, 4, 1)))]  # doctest: +NORMALIZE_WHITESPACE
    [('MultiheadSelfAttention.in_proj', 0, 1, (12, 4)),
     ('MultiheadSelfAttention.out_proj', 2, 3, (4, 4))]
    """

    has_tap = False
    input_layout = output_layout = "features_last"

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool = False, bias: bool = True):
        for what, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"MultiheadSelfAttention needs a positive integer {what}, got {value!r}."
                )
        if embed_dim % num_heads:
            raise ValueError(
                f"MultiheadSelfAttention needs num_heads to divide embed_dim, got "
                f"embed_dim={embed_dim} and num_heads={num_heads}."
            )
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.bias = bool(causal), bool(bias)
        self._in = Linear(embed_dim, 3 * embed_dim, bias=self.bias)
        self._out = Linear(embed_dim, embed_dim, bias=self.bias)
        self._n_in = 2 if self.bias else 1

    def __repr__(self) -> str:
        return (
            f"MultiheadSelfAttention({self.embed_dim}, {self.num_heads}, causal={self.causal}, "
            f"bias={self.bias})"
        )

    def param_shapes(self):
        return self._in.param_shapes() + self._out.param_shapes()

    def init_params(self, generator, dtype):
        E = self.embed_dim
        xp, dev = generator.xp, generator.device
        bound_in = math.sqrt(6.0 / (E + 3 * E))  # Xavier-uniform of the packed (3E, E)
        bound_out = 1.0 / math.sqrt(E)
        params = [generator.uniform((3 * E, E), dtype, -bound_in, bound_in)]
        if self.bias:
            params.append(xp.zeros((3 * E,), dtype=dtype, device=dev))
        params.append(generator.uniform((E, E), dtype, -bound_out, bound_out))
        if self.bias:
            params.append(xp.zeros((E,), dtype=dtype, device=dev))
        return params

    def _split_params(self, params):
        return params[: self._n_in], params[self._n_in :]

    # -- layouts -----------------------------------------------------------------------

    def _heads(self, t, xp):
        """Packed ``(N, S, K, 3E)`` -> ``q, k, v`` each ``(N, K, H, S, d)``."""
        N, S, K = t.shape[0], t.shape[1], t.shape[2]
        t = xp.reshape(t, (N, S, K, 3, self.num_heads, self.head_dim))
        t = xp.permute_dims(t, (3, 0, 2, 4, 1, 5))
        return t[0, ...], t[1, ...], t[2, ...]

    def _split_heads(self, o, xp):
        """``(N, S, K, E)`` -> ``(N, K, H, S, d)``."""
        N, S, K = o.shape[0], o.shape[1], o.shape[2]
        o = xp.reshape(o, (N, S, K, self.num_heads, self.head_dim))
        return xp.permute_dims(o, (0, 2, 3, 1, 4))

    def _merge(self, o, xp):
        """``(N, K, H, S, d)`` -> ``(N, S, K, E)``."""
        N, K, _, S, _ = o.shape
        return xp.reshape(xp.permute_dims(o, (0, 3, 1, 2, 4)), (N, S, K, self.embed_dim))

    def _merge3(self, q, k, v, xp):
        """``q, k, v`` each ``(N, K, H, S, d)`` -> packed ``(N, S, K, 3E)``."""
        N, K, _, S, _ = q.shape
        t = xp.stack([q, k, v], axis=0)  # (3, N, K, H, S, d)
        t = xp.permute_dims(t, (1, 4, 2, 0, 3, 5))
        return xp.reshape(t, (N, S, K, 3 * self.embed_dim))

    # -- forward -----------------------------------------------------------------------

    def _check_input(self, a):
        if a.ndim != 3 or a.shape[-1] != self.embed_dim:
            raise ValueError(
                f"{self!r} expects inputs of shape (N, S, {self.embed_dim}), got shape "
                f"{tuple(a.shape)}."
            )

    def _softmax(self, A, xp):
        S = A.shape[-1]
        if self.causal:
            rows = xp.reshape(xp.arange(S, device=device(A)), (S, 1))
            cols = xp.reshape(xp.arange(S, device=device(A)), (1, S))
            A = xp.where(cols <= rows, A, -math.inf)
        A = A - xp.max(A, axis=-1, keepdims=True)
        e = xp.exp(A)
        return e / _rowsum(e, xp)

    def forward_with_state(self, params, a, xp, state):
        """The forward pass that keeps the projections' states and the attention's arrays.

        ``state["inner"]`` holds the projections' states, the heads ``q, k, v``
        ``(N, 1, H, S, d)`` and the attention weights ``P`` ``(N, 1, H, S, S)``.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> layer = MultiheadSelfAttention(4, 2)
        >>> state = {"input": xp.ones((3, 5, 4))}
        >>> y = layer.forward_with_state(layer.init(0, xp=xp), state["input"], xp, state)
        >>> y.shape, state["inner"]["P"].shape
        ((3, 5, 4), (3, 1, 2, 5, 5))
        """
        self._check_input(a)
        p_in, p_out = self._split_params(params)
        qkv = self._in.forward(p_in, a, xp)
        q, k, v = self._heads(xp.expand_dims(qkv, axis=2), xp)
        c = 1.0 / math.sqrt(self.head_dim)
        P = self._softmax(c * (q @ xp.matrix_transpose(k)), xp)
        o = self._merge(P @ v, xp)[:, :, 0, :]
        state["inner"] = {
            "in": {"input": a, "channels_first": False},
            "out": {"input": o, "channels_first": False},
            "q": q,
            "k": k,
            "v": v,
            "P": P,
        }
        return self._out.forward(p_out, o, xp)

    def forward(self, params, a, xp):
        return self.forward_with_state(params, a, xp, {"input": a})

    def _inner(self, params, state, xp):
        if "inner" not in state:
            self.forward_with_state(params, state["input"], xp, state)
        return state["inner"]

    # -- the attention core --------------------------------------------------------------

    def _core_tangent(self, inner, t_qkv, xp):
        """``(do (N, S, K, E), (dq, dk, dv), dP)`` from the packed tangent."""
        q, k, v, P = inner["q"], inner["k"], inner["v"], inner["P"]
        dq, dk, dv = self._heads(t_qkv, xp)
        c = 1.0 / math.sqrt(self.head_dim)
        dA = c * (dq @ xp.matrix_transpose(k) + q @ xp.matrix_transpose(dk))
        dP = P * (dA - _rowsum(P * dA, xp))
        do = dP @ v + P @ dv
        return self._merge(do, xp), (dq, dk, dv), dP

    def _core_backward(self, inner, g_o, xp):
        """Packed cotangents ``(N, S, K, 3E)`` from those of the attention output."""
        q, k, v, P = inner["q"], inner["k"], inner["v"], inner["P"]
        go = self._split_heads(g_o, xp)
        c = 1.0 / math.sqrt(self.head_dim)
        gP = go @ xp.matrix_transpose(v)
        gv = xp.matrix_transpose(P) @ go
        gA = P * (gP - _rowsum(P * gP, xp))
        return self._merge3(c * (gA @ k), c * (xp.matrix_transpose(gA) @ q), gv, xp)

    def _core_r_backward(self, inner, heads, dP, g_o, rg_o, xp):
        """``(g_qkv, R g_qkv)``: the attention core's backward pass and its R-operator."""
        q, k, v, P = inner["q"], inner["k"], inner["v"], inner["P"]
        T = xp.matrix_transpose
        c = 1.0 / math.sqrt(self.head_dim)
        go = self._split_heads(g_o, xp)  # (N, 1, H, S, d)
        gP = go @ T(v)
        centered = gP - _rowsum(P * gP, xp)
        gA = P * centered
        g_qkv = self._merge3(c * (gA @ k), c * (T(gA) @ q), T(P) @ go, xp)
        rgo = None if rg_o is None else self._split_heads(rg_o, xp)
        dq, dk, dv = heads  # never None: parameter tangents are arrays, so t_qkv exists
        rgP = go @ T(dv)
        rgv = T(dP) @ go
        if rgo is not None:
            rgP = rgP + rgo @ T(v)
            rgv = rgv + T(P) @ rgo
        # the softmax's second derivative: R of P * (g_P - rowsum(P * g_P))
        rgA = dP * centered + P * (rgP - _rowsum(dP * gP + P * rgP, xp))
        # the bilinear terms of q k^T
        rgq = c * (rgA @ k + gA @ dk)
        rgk = c * (T(rgA) @ q + T(gA) @ dq)
        return g_qkv, self._merge3(rgq, rgk, rgv, xp)

    # -- tangents ----------------------------------------------------------------------

    def _tangents(self, params, dparams, state, ta, xp):
        inner = self._inner(params, state, xp)
        p_in, p_out = self._split_params(params)
        d_in, d_out = self._split_params(dparams)
        t_qkv = self._in.tangent(p_in, d_in, inner["in"], ta, xp)
        t_o, heads, dP = self._core_tangent(inner, t_qkv, xp)
        out = self._out.tangent(p_out, d_out, inner["out"], t_o, xp)
        return out, _Memo(ta, heads, dP, t_o)

    def tangent(self, params, dparams, state, ta, xp):
        out, _ = self._tangents(params, dparams, state, ta, xp)
        return out

    def tangent_with_memo(self, params, dparams, state, ta, xp):
        """The output tangent and the inner tangents, for :meth:`r_backward`."""
        return self._tangents(params, dparams, state, ta, xp)

    # -- backward ----------------------------------------------------------------------

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        inner = self._inner(params, state, xp)
        p_in, p_out = self._split_params(params)
        grads_out, g_o = self._out.backward(p_out, inner["out"], g, xp, need_params=need_params)
        g_qkv = self._core_backward(inner, g_o, xp)
        grads_in, g_in = self._in.backward(
            p_in, inner["in"], g_qkv, xp, need_input=need_input, need_params=need_params
        )
        return grads_in + grads_out, g_in

    def r_backward(self, params, dparams, state, ta, g, rg, xp, *, need_input=True):
        """The R-operator of :meth:`backward` along the tangents.

        ``ta`` is the memo of :meth:`tangent_with_memo` or a plain input tangent (None:
        zero), whose inner tangents are then pushed here.
        """
        memo = ta
        if not isinstance(memo, _Memo):
            _, memo = self._tangents(params, dparams, state, ta, xp)
        inner = self._inner(params, state, xp)
        p_in, p_out = self._split_params(params)
        d_in, d_out = self._split_params(dparams)
        rgrads_out, g_o, rg_o = self._out.r_backward(
            p_out, d_out, inner["out"], memo.t_o, g, rg, xp
        )
        g_qkv, rg_qkv = self._core_r_backward(inner, memo.heads, memo.dP, g_o, rg_o, xp)
        rgrads_in, g_in, rg_in = self._in.r_backward(
            p_in, d_in, inner["in"], memo.ta, g_qkv, rg_qkv, xp, need_input=need_input
        )
        return rgrads_in + rgrads_out, g_in, rg_in

    # -- tier 3 ------------------------------------------------------------------------

    def backward_taps(self, params, state, g, xp, *, name, param_indices, need_input=True):
        """The taps of the two projections, with output gradients from one backward pass.

        ``"<name>.in_proj"`` (the packed input projection, matrix ``(3E, E)``) and
        ``"<name>.out_proj"`` (matrix ``(E, E)``, inputs the attention output), in this
        order, with their parameters' positions in the model's parameter list.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> layer = MultiheadSelfAttention(4, 2, bias=False)
        >>> taps, g_in = layer.backward_taps(layer.init(0, xp=xp), {"input": xp.ones((2, 3, 4))},
        ...                                  xp.ones((2, 3, 5, 4)), xp, name="att",
        ...                                  param_indices=(7, 8))
        >>> [(t.name, t.weight_index, t.bias_index, t.matrix_shape) for t in taps], g_in.shape
        ([('att.in_proj', 7, None, (12, 4)), ('att.out_proj', 8, None, (4, 4))], (2, 3, 5, 4))
        """
        aligned = tuple(param_indices)
        inner = self._inner(params, state, xp)
        p_in, p_out = self._split_params(params)
        i_in, i_out = aligned[: self._n_in], aligned[self._n_in :]
        taps_out, g_o = self._out.backward_taps(
            p_out,
            inner["out"],
            g,
            xp,
            name=f"{name}.out_proj",
            param_indices=i_out,
            need_input=g is not None,
        )
        g_qkv = None if g_o is None else self._core_backward(inner, g_o, xp)
        taps_in, g_in = self._in.backward_taps(
            p_in,
            inner["in"],
            g_qkv,
            xp,
            name=f"{name}.in_proj",
            param_indices=i_in,
            need_input=need_input and g_qkv is not None,
        )
        return taps_in + taps_out, g_in

    # -- the layer protocol --------------------------------------------------------------

    def backward_curvature(self, params, state, H, g, xp):
        raise NotImplementedError("the per-datum curvature rule", _NO_WALK)

    def curvature_statistics(self, params, state, g, statistics, xp):
        raise NotImplementedError("the batch-averaged curvature rule", _NO_WALK)

    def backward_mean_curvature(self, params, H, statistics, xp):
        raise NotImplementedError("the batch-averaged curvature rule", _NO_WALK)

    def linearized(self, params, state, xp, *, name=None, param_indices=None):
        """The layer bound to a forward pass; its tap in a curvature walk refuses.

        Examples
        --------
        >>> import array_api_compat.numpy as xp
        >>> layer = MultiheadSelfAttention(2, 1)
        >>> bound = layer.linearized(layer.init(0, xp=xp), {"input": xp.ones((1, 3, 2))}, xp)
        >>> bound.param_indices, bound.backward_gradient(xp.ones((1, 3, 2))).shape
        ((0, 1, 2, 3), (1, 3, 2))
        """
        if param_indices is None:
            param_indices = tuple(range(len(self.param_shapes())))
        self._inner(params, state, xp)
        return _LinearizedAttention(
            self.name if name is None else name, self, list(params), state, xp, param_indices
        )


class _LinearizedAttention(LinearizedNativeLayer):
    """Attention in a curvature walk: it refuses its tap there (rather than be left out)."""

    def tap(self, output_grads=None):
        raise self.missing("the tap in a curvature walk", _NO_WALK)
