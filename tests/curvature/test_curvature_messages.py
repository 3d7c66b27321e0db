"""The full text of the curvature layer's error and warning messages.

A message is what a user reads to fix the cause: each case below triggers one raise or
warning of ``curvlinops.curvature`` as a user would and compares the whole message with
the text written out here (the specification), so that a change of any word, of its
case, or a dropped sentence fails. Messages with run-time values are matched with
``re.fullmatch``: only the values are wildcards, every literal part is spelled out.

Plain NumPy in float64 on tiny problems (array-api-strict only for the device check).
"""

from __future__ import annotations

import re
import sys
from unittest import mock

import array_api_compat.numpy as npx
import array_api_strict
import numpy as np
from message_cases import assert_message, message_cases

import curvlinops as cl
from curvlinops import nn
from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator

# -- builders of small problems ----------------------------------------------------------


def _mlp(activation=nn.Tanh):
    """A 3 -> 4 -> 2 MLP in float64 and its parameters."""
    model = nn.Sequential(nn.Linear(3, 4), activation(), nn.Linear(4, 2))
    return model, model.init(0, xp=npx, dtype=npx.float64)


def _data(n=4, d_in=3, d_out=2, dtype=np.float64):
    """One batch of ``n`` regression data (inputs and targets of the given dtype)."""
    rng = np.random.default_rng(0)
    return [(rng.normal(size=(n, d_in)).astype(dtype), rng.normal(size=(n, d_out)))]


def _ggn(data=None, **kwargs):
    """A GGN of the MLP on ``data`` (default: one float64 batch)."""
    model, params = _mlp()
    return cl.GGNLinearOperator(
        model, cl.MSELoss(), params, _data() if data is None else data, **kwargs
    )


class _Scale(nn.Layer):
    """A user's layer ``a * s`` with a parameter ``s`` but no layer tap."""

    def __init__(self, features):
        self.features = features

    def __repr__(self):
        return f"_Scale({self.features})"

    def param_shapes(self):
        return [(self.features,)]

    def init_params(self, generator, dtype):
        return [generator.uniform((self.features,), dtype, 0.5, 1.5)]

    def forward(self, params, a, xp):
        return a * params[0]

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        a = state["input"]  # (N, D); g is (N, K, D)
        grads = [xp.permute_dims(xp.sum(g * a[:, None, :], axis=0), (1, 0))] if need_params else []
        return grads, (g * params[0] if need_input else None)


class _Square(nn.Layer):
    """A user's parameter-free layer ``a ** 2`` without the curvature rules."""

    def __repr__(self):
        return "_Square()"

    def forward(self, params, a, xp):
        return a**2

    def backward(self, params, state, g, xp, *, need_input=True, need_params=True):
        return [], (2 * g * state["input"][..., None, :] if need_input else None)


def _without_rules(operator):
    """``operator`` of Linear -> :class:`_Square` -> Linear (no rules to walk back)."""
    model = nn.Sequential(nn.Linear(3, 3), _Square(), nn.Linear(3, 2))
    params = model.init(0, xp=npx, dtype=npx.float64)
    return operator(model, cl.MSELoss(), params, _data())


def _untapped(operator, *layers):
    """``operator`` of a model with an untapped parameter (:class:`_Scale`) on 3 features."""
    model = nn.Sequential(_Scale(3), *layers)
    params = model.init(0, xp=npx, dtype=npx.float64)
    X, y = _data()[0]
    return operator(model, cl.MSELoss(), params, [(X, y[:, :1] if layers else X)])


class _Reshuffled:
    """Data that differ on every other pass: inputs and targets reordered (a shuffling
    loader), or the targets alone (a random augmentation of the labels)."""

    def __init__(self, inputs=True):
        self.passes, self.inputs = 0, inputs

    def __iter__(self):
        self.passes += 1
        X, y = _data()[0]
        if self.passes % 2 == 0:
            X, y = (X[::-1] if self.inputs else X), y[::-1]
        return iter([(X, y)])


class _TwoRanks(cl.Communicator):
    """Rank 0 of two, whose peer reports what ``peer`` makes of this rank's outcome."""

    rank, size = 0, 2

    def __init__(self, peer):
        super().__init__()
        self.peer = peer

    def _allreduce_sum(self, x):
        return 2 * x

    def allgather_object(self, obj):
        return [obj, self.peer(obj)]


def _other_num_data(outcome):
    (count, shape, num_data), error = outcome
    return (count, shape, num_data + 1), error


def _kfac_hessian():
    """The Kronecker-factored Hessian of a sigmoid MLP with large residuals (indefinite)."""
    model, params = _mlp(nn.Sigmoid)
    X, y = _data()[0]
    return KFACHessianLinearOperator(model, cl.MSELoss(), params, [(X, 10 * y)])


def _kfac(**kwargs):
    model, params = _mlp()
    return cl.KFACLinearOperator(model, cl.MSELoss(), params, _data(), **kwargs)


def _without_tqdm(build):
    def call():
        with mock.patch.dict(sys.modules, {"tqdm": None, "tqdm.auto": None}):
            build()

    return call


def _on_other_device():
    xs = array_api_strict
    model = nn.Sequential(nn.Linear(3, 2))
    params = model.init(0, xp=xs, dtype=xs.float64)
    X, y = _data()[0]
    other = xs.Device("device1")
    data = [(xs.asarray(X, device=other), xs.asarray(y, device=other))]
    cl.GGNLinearOperator(model, cl.MSELoss(), params, data)


def _overflowing_loss():
    # log-rates of 800 are finite in float64 but exp(800) is not
    model = nn.Sequential(nn.Linear(3, 2))
    params = [np.full((2, 3), 800.0), np.zeros(2)]
    data = [(np.ones((4, 3)) / 3, np.ones((4, 2)))]
    with np.errstate(over="ignore"):
        cl.GGNLinearOperator(model, cl.PoissonNLLLoss(), params, data)


def _mlp_op(operator, data=None, **kwargs):
    model, params = _mlp()
    data = _data() if data is None else data
    return lambda: operator(model, cl.MSELoss(), params, data, **kwargs)


# -- the cases: (id, trigger, exception or warning type, full message) ------------------

_DAMPING_NEGATIVE = (
    "damping must be a finite number >= 0, got -1.0. The factored inverse shifts each "
    "Kronecker factor by a square root of the damping, which needs damping >= 0 (and "
    "positive definite damped factors); for a negative shift of the spectrum use the exact "
    "inverse(damping)."
)

CASES = [
    # _data.py: the data, their batches, num_data, mc_samples, determinism, devices
    (
        "one-shot iterator",
        lambda: _ggn(iter(_data())),
        TypeError,
        "data must be re-iterable (a list of (X, y) batches or a data loader), but a "
        "one-shot iterator/generator was given: it would be empty on the second product. "
        "Pass list(data) instead.",
    ),
    (
        "params None",
        lambda: cl.GGNLinearOperator(_mlp()[0], cl.MSELoss(), None, _data()),
        TypeError,
        "params must be a non-empty list of arrays (for a PyTorch module: a list of its "
        "parameters), got None.",
    ),
    (
        "complex inputs",
        lambda: _ggn([(_data()[0][0] + 1j, _data()[0][1])]),
        TypeError,
        "Batch 0: the inputs X are complex (complex128); curvature operators take real "
        "data. Split real and imaginary parts into features.",
    ),
    (
        "float32 inputs for float64 parameters",
        lambda: _ggn(_data(dtype=np.float32)),
        TypeError,
        "Batch 0: the inputs X are float32 but the parameters of Sequential are float64. "
        "The operator computes in the parameters' dtype; cast the data, "
        "X.astype(np.float64), or the parameters to the data's dtype.",
    ),
    (
        "complex targets",
        lambda: _ggn([(_data()[0][0], _data()[0][1] + 1j)]),
        TypeError,
        "Batch 0: the targets y are complex (complex128); curvature operators take real "
        "data. Split real and imaginary parts into features.",
    ),
    (
        "float32 targets for float64 parameters",
        lambda: _ggn([(_data()[0][0], _data()[0][1].astype(np.float32))]),
        TypeError,
        "Batch 0: the targets y are float32 but the parameters of Sequential are float64. "
        "The operator computes in the parameters' dtype; cast the data, "
        "y.astype(np.float64), or the parameters to the data's dtype.",
    ),
    (
        "data on another device",
        _on_other_device,
        ValueError,
        re.compile(
            r"Batch 0: the inputs X are on device .*device1.* but the parameters of "
            r"Sequential are on device .*CPU_DEVICE.*\. Move the data to the parameters' "
            r"device \(or the model to the data's\) before building the operator; "
            r"curvlinops never copies between devices\."
        ),
    ),
    (
        "loss overflow",
        _overflowing_loss,
        ValueError,
        "Batch 0: the PoissonNLLLoss of the batch is inf although outputs and targets are "
        "finite: the loss overflowed (outputs too large for the dtype). Use float64, or "
        "rescale the model's outputs.",
    ),
    (
        "no batches with num_data",
        lambda: _ggn([], num_data=8),
        ValueError,
        "GGNLinearOperator got data without batches (num_data=8); pass an iterable of "
        "(X, y) batches with at least one batch.",
    ),
    (
        "progressbar without tqdm",
        _without_tqdm(lambda: _ggn(progressbar=True) @ np.ones(26)),
        ImportError,
        "progressbar=True needs tqdm: pip install tqdm (or curvlinops[demo]).",
    ),
    (
        "shuffled data",
        lambda: _ggn(_Reshuffled()),
        cl.NonDeterministicDataError,
        "Two passes over the data differ in the inputs X of batch 0. Curvature operators "
        "iterate over the data in every product, so the data must come in the same order "
        "every time (no shuffling) and the model must be deterministic (no dropout). Fix "
        "the data loader or pass check_deterministic=False if the difference is intended.",
    ),
    (
        "augmented targets",
        lambda: _ggn(_Reshuffled(inputs=False)),
        cl.NonDeterministicDataError,
        "Two passes over the data differ in the targets y of batch 0. Curvature operators "
        "iterate over the data in every product, so the data must come in the same order "
        "every time (no shuffling) and the model must be deterministic (no dropout). Fix "
        "the data loader or pass check_deterministic=False if the difference is intended.",
    ),
    (
        "ranks disagree on num_data",
        lambda: _ggn(num_data=4, comm=_TwoRanks(_other_num_data)),
        ValueError,
        "GGNLinearOperator: the ranks passed different num_data (4, 5); num_data is the "
        "global number of data points, the same on every rank (or None to count).",
    ),
    (
        "no batches on any rank",
        lambda: _ggn([], comm=_TwoRanks(lambda outcome: outcome)),
        ValueError,
        "GGNLinearOperator got data without batches on all 2 ranks; pass each rank an "
        "iterable of (X, y) batches (its shard), with at least one batch on some rank.",
    ),
    (
        "mc_samples zero (None allowed)",
        _mlp_op(cl.FisherLinearOperator, mc_samples=0),
        ValueError,
        "mc_samples must be a positive integer or None, got 0.",
    ),
    (
        "mc_samples zero (K-FAC)",
        lambda: _kfac(fisher_type="mc", mc_samples=0),
        ValueError,
        "mc_samples must be a positive integer, got 0.",
    ),
    # approximations.py
    (
        "default partition of a dense operator",
        lambda: cl.default_partition(cl.DenseLinearOperator(np.eye(2))),
        TypeError,
        "The default partition needs a curvature operator (with parameter shapes); pass "
        "partition= for other operators.",
    ),
    (
        "block_diagonal of a dense operator",
        lambda: cl.block_diagonal(cl.DenseLinearOperator(np.eye(2))),
        TypeError,
        "block_diagonal needs a curvature operator that knows its parameters.",
    ),
    (
        "block larger than max_block_size",
        lambda: cl.block_diagonal(_ggn(), max_block_size=10),
        ValueError,
        "The block of parameters [0, 1] has 16 rows, more than max_block_size=10. Split "
        "it with a finer partition, raise max_block_size if memory allows, or use a "
        "Kronecker-factored approximation (KFACLinearOperator).",
    ),
    # diagonal.py and kronecker_statistics.py: parameters outside the tapped layers
    (
        "GGN diagonal of untapped parameters",
        lambda: _untapped(cl.GGNDiagonalLinearOperator, nn.Linear(3, 1)),
        ValueError,
        "GGNDiagonalLinearOperator needs every parameter in a tapped layer (Linear, "
        "convolution, normalization), but parameters [0] (shapes [(3,)]) are not.",
    ),
    (
        "K-FAC of untapped parameters",
        lambda: _untapped(cl.KFACLinearOperator, nn.Linear(3, 1)),
        ValueError,
        "KFACLinearOperator covers the parameters of the layers the model exposes through "
        "layer taps (linear maps: Linear, convolutions; elementwise affine maps: "
        "normalization), but parameters [0] (shapes [(3,)]) belong to no tapped layer. "
        "Use a model made of such layers (and parameter-free layers), or another curvature "
        "approximation for these parameters.",
    ),
    # _chain.py, with what diagonal.py and kfac_hessian.py say to use instead
    (
        "Hessian diagonal through a layer without the per-datum rule",
        lambda: _without_rules(cl.HessianDiagonalLinearOperator),
        cl.MissingLayerRuleError,
        "HessianDiagonalLinearOperator propagates the curvature backwards through every "
        "layer after the first one with parameters, but layer '1' is _Square(), which "
        "does not implement the per-datum curvature rule of the layer protocol. Use "
        "HessianLinearOperator(...).to_dense() or a stochastic diagonal estimate "
        "(curvlinops.hutchinson_diagonal) for this model.",
    ),
    (
        "Kronecker-factored Hessian through a layer without the averaged rule",
        lambda: _without_rules(KFACHessianLinearOperator),
        cl.MissingLayerRuleError,
        "KFACHessianLinearOperator propagates the curvature backwards through every "
        "layer after the first one with parameters, but layer '1' is _Square(), which "
        "does not implement the batch-averaged curvature rule of the layer protocol. Use "
        "KFACLinearOperator (GGN / Fisher) or HessianLinearOperator for this model.",
    ),
    # kfac.py
    (
        "deprecated inverse keywords",
        lambda: _kfac().inverse(0.1, exact=True),
        FutureWarning,
        "KFACLinearOperator.inverse(damping) is now always the exact (K + damping I)^-1; "
        "its keywords exact=, heuristic_damping= and min_damping= are deprecated. Call "
        "inverse(damping) for the exact inverse, or factored_inverse(damping, "
        "pi_damping=..., min_damping=...) for the factored heuristic of Martens & Grosse.",
    ),
    (
        "negative damping of the factored inverse",
        lambda: _kfac().factored_inverse(-1.0),
        ValueError,
        _DAMPING_NEGATIVE,
    ),
    (
        "negative min_damping",
        lambda: _kfac().factored_inverse(0.1, min_damping=-1),
        ValueError,
        "min_damping must be a finite number >= 0, got -1.",
    ),
    (
        "infinite damping of the exact inverse",
        lambda: _kfac().inverse(float("inf")),
        ValueError,
        "damping must be a finite number, got inf.",
    ),
    (
        "factored inverse of an indefinite factor",
        lambda: _kfac_hessian().factored_inverse(1e-3),
        cl.FactorizationError,
        re.compile(
            r"KFACHessianLinearOperator: The damped output factor B of layer '0' is not "
            r"positive definite \(its smallest eigenvalue is .*\); the factored inverse "
            r"needs positive definite damped factors\. Add damping, or use the exact "
            r"inverse\(damping\)\."
        ),
    ),
    # kfac_hessian.py
    (
        "Kronecker-factored Hessian without tapped layers",
        lambda: _untapped(KFACHessianLinearOperator),
        ValueError,
        "KFACHessianLinearOperator needs a model with at least one tapped layer (Linear, "
        "a convolution, an embedding, or a normalization's affine map); this model has "
        "none.",
    ),
    (
        "inverse of an indefinite Kronecker-factored Hessian",
        lambda: _kfac_hessian().inverse(1e-3),
        UserWarning,
        "The Kronecker-factored Hessian plus 0.001 I is indefinite; its inverse is not "
        "positive definite (not a descent preconditioner). Increase the damping above the "
        "most negative eigenvalue's magnitude to make it positive definite.",
    ),
]


@message_cases(CASES)
def test_message_is_spelled_out(trigger, kind, expected):
    assert_message(trigger, kind, expected)
