"""The pre-norm transformer block :class:`TransformerBlock`, from residuals and sequentials.

``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``, with ``mlp = Linear(E, r E) ->
activation -> Linear(r E, E)``: a :class:`~curvlinops.nn.Sequential` of two
:class:`~curvlinops.nn.Residual` blocks, so every tier (and the taps of the inner
layers) comes from the layers it is made of. A small GPT is then
``Sequential(Embedding(V, E), SinusoidalPositions(), TransformerBlock(E, H), ...,
LayerNorm(E), Linear(E, V))``.

May import: ``.activations``, ``.attention``, ``.layer_norm``, ``.linear``, ``.residual``,
``.sequential``.
"""

from __future__ import annotations

from .activations import GELU
from .attention import MultiheadSelfAttention
from .layer_norm import LayerNorm
from .linear import Linear
from .residual import Residual
from .sequential import Sequential

__all__ = ["TransformerBlock"]


class TransformerBlock(Sequential):
    """A pre-norm transformer block on ``(N, S, E)``: attention, then an MLP, each residual.

    ``h = x + attn(ln1(x))`` and ``y = h + fc2(act(fc1(ln2(h))))`` with
    :class:`~curvlinops.nn.LayerNorm`, :class:`~curvlinops.nn.MultiheadSelfAttention`
    and :class:`~curvlinops.nn.Linear` layers. The parameters, in order (the order of
    ``named_parameters()`` of a torch module with attributes ``ln1, attn, ln2, mlp``
    registered in this order, ``mlp = Sequential(Linear, GELU, Linear)``)::

        ln1.weight (E,), ln1.bias (E,),
        attn.in_proj_weight (3E, E), attn.in_proj_bias (3E,),
        attn.out_proj.weight (E, E), attn.out_proj.bias (E,),
        ln2.weight (E,), ln2.bias (E,),
        mlp.0.weight (rE, E), mlp.0.bias (rE,), mlp.2.weight (E, rE), mlp.2.bias (E,)

    In a chain the block is two entries (``"<i>.0"``, ``"<i>.1"``, both residuals); the
    taps are ``"<i>.0.block.0"`` (ln1), ``"<i>.0.block.1.in_proj"``,
    ``"<i>.0.block.1.out_proj"``, ``"<i>.1.block.0"`` (ln2), ``"<i>.1.block.1"`` and
    ``"<i>.1.block.3"`` (the MLP's layers).

    Parameters
    ----------
    embed_dim : int
        The features ``E``.
    num_heads : int
        The attention heads (dividing ``E``).
    mlp_ratio : int
        The MLP's hidden width is ``mlp_ratio * E``; default 4.
    causal : bool
        Whether the attention masks the future; default True.
    activation : Layer, optional
        The MLP's activation; default :class:`~curvlinops.nn.GELU` (exact, as
        ``torch.nn.GELU()``).

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> block = TransformerBlock(8, 2, mlp_ratio=2)
    >>> [shape for shape in block.expected_param_shapes()]
    [(8,), (8,), (24, 8), (24,), (8, 8), (8,), (8,), (8,), (16, 8), (16,), (8, 16), (8,)]
    >>> params = block.init(0, xp=xp, dtype=xp.float64)
    >>> block(params, xp.ones((2, 5, 8))).shape
    (2, 5, 8)
    """

    def __init__(
        self, embed_dim: int, num_heads: int, mlp_ratio: int = 4, *, causal=True, activation=None
    ):
        if not isinstance(mlp_ratio, int) or isinstance(mlp_ratio, bool) or mlp_ratio < 1:
            raise ValueError(
                f"TransformerBlock needs a positive integer mlp_ratio, got {mlp_ratio!r}."
            )
        self.embed_dim, self.num_heads, self.mlp_ratio = embed_dim, num_heads, mlp_ratio
        self.causal = bool(causal)
        self.activation = GELU() if activation is None else activation
        E, hidden = embed_dim, mlp_ratio * embed_dim
        attention = Residual(
            Sequential(LayerNorm(E), MultiheadSelfAttention(E, num_heads, causal=self.causal))
        )
        mlp = Residual(
            Sequential(LayerNorm(E), Linear(E, hidden), self.activation, Linear(hidden, E))
        )
        super().__init__(attention, mlp)

    def __repr__(self) -> str:
        return (
            f"TransformerBlock({self.embed_dim}, {self.num_heads}, mlp_ratio={self.mlp_ratio}, "
            f"causal={self.causal}, activation={self.activation!r})"
        )
