"""The full text of the native layers' error messages.

Each case triggers one raise of ``curvlinops.nn`` as a user would (a constructor, a
forward pass, or a rule of a linearized layer, :meth:`Module.linearize` then
``layers()``) and compares the whole message with the text written out here (the
specification), so that a change of any word, of its case, or a dropped sentence fails.
A rule a layer lacks reaches the user as a
:class:`~curvlinops.models.MissingLayerRuleError` that names the layer, the rule and the
layer's reason; that is the message checked.

Plain NumPy in float64 (float32 only where a case needs a second dtype), tiny sizes.
"""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest
from message_cases import assert_message, message_cases

from curvlinops import nn
from curvlinops.models import MissingLayerRuleError

# -- builders ----------------------------------------------------------------------------


def _params(model, dtype=npx.float64):
    return model.init(0, xp=npx, dtype=dtype)


def _forward(model, x, params=None):
    """``model(params, x)`` (default: its float64 initial parameters)."""
    return lambda: model(_params(model) if params is None else params, x)


def _layer(model, x, index):
    """Layer ``index`` of ``model`` linearized at ``x`` (float64 initial parameters)."""
    return model.linearize(_params(model), x).layers()[index]


def _images(n=2, c=1, h=4, w=4):
    return np.random.default_rng(0).normal(size=(n, c, h, w))


def _mixed_dtypes(model):
    """The initial parameters of ``model``, the first one cast to float32."""
    params = _params(model)
    return [params[0].astype(np.float32), *params[1:]]


class _Square(nn.Layer):
    """A user's layer ``a ** 2`` that leaves out every curvature rule (the defaults)."""

    def __repr__(self):
        return "_Square()"

    def forward(self, params, a, xp):
        return a**2

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        return [], (2 * g * state["input"][..., None, :] if need_input else None)


class _Bare(_Square):
    """Like :class:`_Square`, but its rules raise NotImplementedError without a reason."""

    def __repr__(self):
        return "_Bare()"

    def backward_curvature(self, params, state, H, g, xp):
        raise NotImplementedError

    def curvature_statistics(self, params, state, g, statistics, xp):
        raise NotImplementedError

    def backward_mean_curvature(self, params, H, statistics, xp):
        raise NotImplementedError


def _middle(layer):
    """``layer`` linearized as layer '1' of Linear(3, 3) -> layer -> Linear(3, 2)."""
    model = nn.Sequential(nn.Linear(3, 3), layer, nn.Linear(3, 2))
    return _layer(model, np.ones((2, 3)), 1)


def _attention():
    return _layer(nn.Sequential(nn.MultiheadSelfAttention(2, 1)), np.ones((1, 3, 2)), 0)


def _embedding():
    return _layer(nn.Sequential(nn.Embedding(3, 2)), np.asarray([[0, 2]]), 0)


def _layer_norm():
    return _layer(nn.Sequential(nn.LayerNorm(2)), np.ones((2, 2)), 0)


def _residual():
    return _layer(nn.Sequential(nn.Residual(nn.Linear(2, 2))), np.ones((2, 2)), 0)


def _on_images(layer):
    """``layer`` linearized on 1-channel 4x4 images."""
    return _layer(nn.Sequential(layer), _images(), 0)


_H = np.eye(2)  # an output factor; the rules refuse before they read it
_NO_STATISTICS = (
    "which does not implement the batch-averaged curvature rule without statistics of the "
    "layer protocol (pass what curvature_statistics accumulated over the data)."
)
_NO_WALK = (
    " of the layer protocol (attention mixes the positions of a sequence; the Hessian "
    "diagonal and the Kronecker-factored Hessian walk per-position rules and do not go "
    "through it: use HessianLinearOperator, GGNLinearOperator, K-FAC (KFACLinearOperator, "
    "EKFACLinearOperator) or curvlinops.hutchinson_diagonal instead)."
)
_IDS = (
    " of the layer protocol (the inputs of an Embedding are integer ids: there is no "
    "curvature to pass on; an embedding can only be the first layer with parameters)."
)
_LAYER_NORM = (
    "layer '0' is LayerNorm(2, eps=1e-05, elementwise_affine=True, bias=True), which does "
    "not implement the batch-averaged curvature rule of the layer protocol (layer "
    "normalization couples a position's features nonlinearly; no averaged rule is "
    "implemented: use the per-datum walk, HessianDiagonalLinearOperator, or "
    "KFACLinearOperator)."
)
_RESIDUAL = (
    "layer '0' is Residual(Linear(2, 2, bias=True)), which does not implement the "
    "batch-averaged curvature rule of the layer protocol as one layer (its batch-averaged "
    "rules are those of its paths' layers and its cross terms: a curvature walk goes down "
    "its branches(), as curvlinops.curvature's do)."
)
_CONV = (
    "Conv2d(1, 1, kernel_size=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1), "
    "groups=1, bias=True)"
)
_MAXPOOL = "MaxPool2d(kernel_size=(3, 3), stride=(3, 3), padding=(0, 0), dilation=(1, 1))"

# -- the cases: (id, trigger, exception type, full message) ------------------------------


def _embedding_model_with_a_nan_parameter():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
    params = model.init(0, xp=npx, dtype=npx.float64)
    params[0][1, 1] = np.nan
    return model(params, np.array([[0, 1]]))


CASES = [
    (
        "integer inputs with a NaN parameter",
        _embedding_model_with_a_nan_parameter,
        ValueError,
        "Parameter 0 of Sequential contains NaN or Inf (numpy array of shape (5, 3)).",
    ),
    # constructors
    (
        "Conv2d padding='same' with a stride",
        lambda: nn.Conv2d(1, 1, 3, stride=2, padding="same"),
        ValueError,
        "Conv2d with padding='same' needs stride 1, got stride=2 (as in PyTorch); give the "
        "padding as integers instead.",
    ),
    (
        "Dropout in training form",
        lambda: nn.Dropout(0.5, training=True),
        ValueError,
        "Dropout(training=True) multiplies by random masks, which makes the loss "
        "non-deterministic: its curvature (Hessian, GGN, Fisher) is not defined. Build "
        "the layer in evaluation form, Dropout(p, training=False), the identity (as "
        "PyTorch's module.eval()).",
    ),
    (
        "MaxPool2d ceil_mode",
        lambda: nn.MaxPool2d(2, ceil_mode=True),
        ValueError,
        "MaxPool2d supports ceil_mode=False only (the output size rounds down, as PyTorch's "
        "default); drop ceil_mode=True or pad the inputs instead.",
    ),
    (
        "AvgPool2d count_include_pad=False",
        lambda: nn.AvgPool2d(2, count_include_pad=False),
        ValueError,
        "AvgPool2d supports count_include_pad=True only (the divisor is always the kernel "
        "size, padded zeros included, as PyTorch's default).",
    ),
    (
        "AvgPool2d divisor_override",
        lambda: nn.AvgPool2d(2, divisor_override=3),
        ValueError,
        "AvgPool2d does not support divisor_override (got 3); the divisor is the kernel size.",
    ),
    (
        "MaxPool2d return_indices",
        lambda: nn.MaxPool2d(2, return_indices=True),
        ValueError,
        "MaxPool2d does not support return_indices=True (its output is the pooled array only).",
    ),
    # sizes that are not positive integers (the names and bounds in the messages)
    (
        "Linear in_features 0",
        lambda: nn.Linear(0, 2),
        ValueError,
        "Linear needs a positive integer in_features, got 0.",
    ),
    (
        "Linear out_features 0",
        lambda: nn.Linear(2, 0),
        ValueError,
        "Linear needs a positive integer out_features, got 0.",
    ),
    (
        "attention embed_dim 0",
        lambda: nn.MultiheadSelfAttention(0, 1),
        ValueError,
        "MultiheadSelfAttention needs a positive integer embed_dim, got 0.",
    ),
    (
        "attention num_heads 0",
        lambda: nn.MultiheadSelfAttention(2, 0),
        ValueError,
        "MultiheadSelfAttention needs a positive integer num_heads, got 0.",
    ),
    (
        "Conv2d in_channels 0",
        lambda: nn.Conv2d(0, 1, 2),
        ValueError,
        "Conv2d needs a positive integer in_channels, got 0.",
    ),
    (
        "Conv2d out_channels 0",
        lambda: nn.Conv2d(1, 0, 2),
        ValueError,
        "Conv2d needs a positive integer out_channels, got 0.",
    ),
    (
        "Conv2d groups 0",
        lambda: nn.Conv2d(1, 1, 2, groups=0),
        ValueError,
        "Conv2d needs a positive integer groups, got 0.",
    ),
    (
        "Conv2d in_channels not divisible",
        lambda: nn.Conv2d(3, 2, 2, groups=2),
        ValueError,
        "Conv2d needs in_channels divisible by groups, got in_channels=3 and groups=2.",
    ),
    (
        "Conv2d out_channels not divisible",
        lambda: nn.Conv2d(2, 3, 2, groups=2),
        ValueError,
        "Conv2d needs out_channels divisible by groups, got out_channels=3 and groups=2.",
    ),
    (
        "Conv2d kernel_size 0",
        lambda: nn.Conv2d(1, 1, 0),
        ValueError,
        "Conv2d needs kernel_size as a positive integer or a tuple of 2 such integers, got 0.",
    ),
    (
        "Conv2d stride 0",
        lambda: nn.Conv2d(1, 1, 2, stride=0),
        ValueError,
        "Conv2d needs stride as a positive integer or a tuple of 2 such integers, got 0.",
    ),
    (
        "Conv2d dilation 0",
        lambda: nn.Conv2d(1, 1, 2, dilation=0),
        ValueError,
        "Conv2d needs dilation as a positive integer or a tuple of 2 such integers, got 0.",
    ),
    (
        "Conv2d padding -1",
        lambda: nn.Conv2d(1, 1, 2, padding=-1),
        ValueError,
        "Conv2d needs padding as a non-negative integer or a tuple of 2 such integers, got -1.",
    ),
    (
        "MaxPool2d kernel_size 0",
        lambda: nn.MaxPool2d(0),
        ValueError,
        "MaxPool2d needs kernel_size as a positive integer or a tuple of 2 such integers, got 0.",
    ),
    (
        "MaxPool2d stride 0",
        lambda: nn.MaxPool2d(2, stride=0),
        ValueError,
        "MaxPool2d needs stride as a positive integer or a tuple of 2 such integers, got 0.",
    ),
    (
        "MaxPool2d padding -1",
        lambda: nn.MaxPool2d(2, padding=-1),
        ValueError,
        "MaxPool2d needs padding as a non-negative integer or a tuple of 2 such integers, got -1.",
    ),
    (
        "MaxPool2d dilation 0",
        lambda: nn.MaxPool2d(2, dilation=0),
        ValueError,
        "MaxPool2d needs dilation as a positive integer or a tuple of 2 such integers, got 0.",
    ),
    # forward passes
    (
        "Conv2d on images smaller than its kernel",
        _forward(nn.Conv2d(1, 1, 3), _images(h=2, w=2)),
        ValueError,
        f"{_CONV} gets inputs of spatial size (2, 2), smaller than its dilated kernel plus "
        "padding: the output would be empty.",
    ),
    (
        "MaxPool2d on images smaller than its kernel",
        _forward(nn.MaxPool2d(3), _images(h=2, w=2)),
        ValueError,
        f"{_MAXPOOL} gets inputs of spatial size (2, 2), smaller than its (dilated) kernel "
        "plus padding: the output would be empty.",
    ),
    (
        "Embedding ids out of range",
        _forward(nn.Embedding(3, 2), np.asarray([[0, 3]])),
        ValueError,
        "Embedding(3, 2) takes ids in [0, 3), got ids from 0 to 3. Map the tokens to a "
        "vocabulary of 3 ids (or enlarge num_embeddings).",
    ),
    (
        "Residual block that changes the shape",
        _forward(nn.Residual(nn.Linear(3, 2)), np.ones((4, 3))),
        ValueError,
        "Residual with the identity shortcut needs a block that keeps the shape of its "
        "inputs, but the block maps (4, 3) to (4, 2); pass a shortcut that maps the inputs "
        "to the block's output shape (e.g. a strided 1x1 convolution).",
    ),
    (
        "parameters of two dtypes",
        lambda: _forward(
            nn.Sequential(nn.Linear(3, 2)),
            np.ones((4, 3)),
            _mixed_dtypes(nn.Sequential(nn.Linear(3, 2))),
        )(),
        TypeError,
        "Sequential expects parameters of one dtype, got ['float32', 'float64']. Cast them "
        "to one floating dtype.",
    ),
    (
        "parameters of two dtypes after integer inputs",
        lambda: _forward(
            nn.Sequential(nn.Embedding(3, 2), nn.Linear(2, 1)),
            np.asarray([[0, 2]]),
            _mixed_dtypes(nn.Sequential(nn.Embedding(3, 2), nn.Linear(2, 1))),
        )(),
        TypeError,
        "Sequential expects parameters of one dtype, got ['float32', 'float64']. Cast them "
        "to one floating dtype.",
    ),
    (
        "float inputs for a model that starts with an embedding",
        _forward(nn.Sequential(nn.Embedding(3, 2), nn.Linear(2, 1)), np.asarray([[0.0, 2.0]])),
        TypeError,
        "Sequential starts with Embedding(3, 2), which takes integer inputs, but the inputs "
        "are float64; pass integer ids (e.g. int64).",
    ),
    (
        "integer inputs without a batch axis",
        _forward(nn.Sequential(nn.Embedding(3, 2), nn.Linear(2, 1)), np.asarray(1)),
        ValueError,
        "Sequential expects integer inputs with a batch axis, shape (N, ...), got shape (). "
        "Add a batch axis (e.g. x[None]).",
    ),
    (
        "integer parameters after integer inputs",
        _forward(
            nn.Sequential(nn.Embedding(3, 2), nn.Linear(2, 1)),
            np.asarray([[0, 2]]),
            [
                np.zeros((3, 2), dtype=np.int64),
                np.zeros((1, 2), dtype=np.int64),
                np.zeros(1, dtype=np.int64),
            ],
        ),
        TypeError,
        "Sequential expects real floating parameters, got int64.",
    ),  # fmt: skip
    (
        "integer parameters",
        _forward(
            nn.Sequential(nn.Linear(2, 1)),
            np.ones((4, 2)),
            [np.zeros((1, 2), dtype=np.int64), np.zeros(1, dtype=np.int64)],
        ),
        TypeError,
        "Sequential expects real floating parameters, got int64.",
    ),
    (
        "complex inputs for real parameters",
        _forward(nn.Sequential(nn.Linear(3, 2)), np.ones((4, 3)) + 1j),
        TypeError,
        "Sequential has float64 parameters but the inputs are complex128; convert the "
        "inputs (or the parameters) to one dtype first.",
    ),
    # rules a layer lacks (module.py's defaults, linearization.py's names of the rules)
    (
        "default per-datum rule",
        lambda: _middle(_Square()).backward_curvature(np.ones((2, 3, 3)), np.ones((2, 3))),
        MissingLayerRuleError,
        "layer '1' is _Square(), which does not implement the per-datum curvature rule of "
        "the layer protocol.",
    ),
    (
        "default batch-averaged rule",
        lambda: _middle(_Square()).backward_mean_curvature(np.eye(3), None),
        MissingLayerRuleError,
        "layer '1' is _Square(), which does not implement the batch-averaged curvature rule "
        "of the layer protocol.",
    ),
    (
        "per-datum rule without a reason",
        lambda: _middle(_Bare()).backward_curvature(np.ones((2, 3, 3)), np.ones((2, 3))),
        MissingLayerRuleError,
        "layer '1' is _Bare(), which does not implement the per-datum curvature rule of the "
        "layer protocol.",
    ),
    (
        "statistics without a reason",
        lambda: _middle(_Bare()).curvature_statistics(np.ones((2, 3))),
        MissingLayerRuleError,
        "layer '1' is _Bare(), which does not implement the batch-averaged curvature rule "
        "of the layer protocol.",
    ),
    (
        "batch-averaged rule without a reason",
        lambda: _middle(_Bare()).backward_mean_curvature(np.eye(3), None),
        MissingLayerRuleError,
        "layer '1' is _Bare(), which does not implement the batch-averaged curvature rule "
        "of the layer protocol.",
    ),
    # batch-averaged rules called without the statistics they need
    (
        "Tanh without statistics",
        lambda: _middle(nn.Tanh()).backward_mean_curvature(np.eye(3), None),
        MissingLayerRuleError,
        f"layer '1' is Tanh(), {_NO_STATISTICS}",
    ),
    (
        "Conv2d without statistics",
        lambda: _on_images(nn.Conv2d(1, 1, 3)).backward_mean_curvature(np.eye(4), None),
        MissingLayerRuleError,
        f"layer '0' is {_CONV}, {_NO_STATISTICS}",
    ),
    (
        "AvgPool2d without statistics",
        lambda: _on_images(nn.AvgPool2d(2)).backward_mean_curvature(np.eye(4), None),
        MissingLayerRuleError,
        f"layer '0' is AvgPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0)), "
        f"{_NO_STATISTICS}",
    ),
    (
        "MaxPool2d without statistics",
        lambda: _on_images(nn.MaxPool2d(3)).backward_mean_curvature(np.eye(1), None),
        MissingLayerRuleError,
        f"layer '0' is {_MAXPOOL}, {_NO_STATISTICS}",
    ),
    (
        "GlobalAvgPool2d without statistics",
        lambda: _on_images(nn.GlobalAvgPool2d()).backward_mean_curvature(np.eye(1), None),
        MissingLayerRuleError,
        f"layer '0' is GlobalAvgPool2d(keepdim=False), {_NO_STATISTICS}",
    ),
    (
        "Residual cross terms without statistics",
        lambda: _residual().backward_mean_cross_curvature(_H, None),
        MissingLayerRuleError,
        "layer '0' is Residual(Linear(2, 2, bias=True)), which does not implement the "
        "batch-averaged cross-curvature rule without statistics of the layer protocol "
        "(pass what cross_curvature_statistics accumulated over the data).",
    ),
    (
        "Flatten statistics of inputs with shared axes",
        lambda: _layer(
            nn.Sequential(nn.Linear(2, 2), nn.Flatten(), nn.Linear(6, 2)), np.ones((2, 3, 2)), 1
        ).curvature_statistics(np.ones((2, 6))),
        MissingLayerRuleError,
        "layer '1' is Flatten(), which does not implement the batch-averaged curvature rule "
        "for inputs with shared axes (N, S..., D) of the layer protocol (it sees inputs of "
        "shape (2, 3, 2): the items before and after flattening differ).",
    ),
    # rules layers do not have, with their reasons
    (
        "attention per-datum rule",
        lambda: _attention().backward_curvature(np.ones((1, 6, 6)), np.ones((1, 3, 2))),
        MissingLayerRuleError,
        "layer '0' is MultiheadSelfAttention(2, 1, causal=False, bias=True), which does not "
        f"implement the per-datum curvature rule{_NO_WALK}",
    ),
    (
        "attention statistics",
        lambda: _attention().curvature_statistics(np.ones((1, 3, 2))),
        MissingLayerRuleError,
        "layer '0' is MultiheadSelfAttention(2, 1, causal=False, bias=True), which does not "
        f"implement the batch-averaged curvature rule{_NO_WALK}",
    ),
    (
        "attention batch-averaged rule",
        lambda: _attention().backward_mean_curvature(_H, None),
        MissingLayerRuleError,
        "layer '0' is MultiheadSelfAttention(2, 1, causal=False, bias=True), which does not "
        f"implement the batch-averaged curvature rule{_NO_WALK}",
    ),
    (
        "attention tap in a walk",
        lambda: _attention().tap(),
        MissingLayerRuleError,
        "layer '0' is MultiheadSelfAttention(2, 1, causal=False, bias=True), which does not "
        f"implement the tap in a curvature walk{_NO_WALK}",
    ),
    (
        "Embedding per-datum rule",
        lambda: _embedding().backward_curvature(np.ones((1, 4, 4)), np.ones((1, 2, 2))),
        MissingLayerRuleError,
        "layer '0' is Embedding(3, 2), which does not implement the per-datum curvature "
        f"rule{_IDS}",
    ),
    (
        "Embedding batch-averaged rule",
        lambda: _embedding().backward_mean_curvature(_H, None),
        MissingLayerRuleError,
        "layer '0' is Embedding(3, 2), which does not implement the batch-averaged curvature "
        f"rule{_IDS}",
    ),
    (
        "LayerNorm statistics",
        lambda: _layer_norm().curvature_statistics(np.ones((2, 2))),
        MissingLayerRuleError,
        _LAYER_NORM,
    ),
    (
        "LayerNorm batch-averaged rule",
        lambda: _layer_norm().backward_mean_curvature(_H, None),
        MissingLayerRuleError,
        _LAYER_NORM,
    ),
    (
        "Residual statistics",
        lambda: _residual().curvature_statistics(np.ones((2, 2))),
        MissingLayerRuleError,
        _RESIDUAL,
    ),
    (
        "Residual batch-averaged rule",
        lambda: _residual().backward_mean_curvature(_H, None),
        MissingLayerRuleError,
        _RESIDUAL,
    ),
]


@message_cases(CASES)
def test_message_is_spelled_out(trigger, kind, expected):
    assert_message(trigger, kind, expected)


def test_a_second_order_cotangent_tangent_of_another_library_is_named():
    xps = pytest.importorskip("array_api_strict")
    model = nn.Sequential(nn.Linear(2, 2))
    lin = model.linearize(_params(model), np.ones((3, 2)))
    tangents = [np.ones(p.shape + (1,)) for p in _params(model)]
    with pytest.raises(TypeError) as err:
        lin.second_order_vjp(np.ones((3, 2)), tangents, xps.ones((3, 2, 1), dtype=xps.float64))
    assert str(err.value) == (
        "The cotangent_tangent is an array_api_strict array, but the operator works on numpy "
        "arrays. Convert it first (same library and device)."
    )
