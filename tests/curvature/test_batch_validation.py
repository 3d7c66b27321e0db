"""Bad batches are named in the products, without the determinism check.

Optimizers and Laplace libraries pass ``check_deterministic=False`` (and ``num_data``)
to skip the passes at construction; the first product then validates each batch once
(labels in range and integer, targets finite and in the loss's support, finite
outputs), with an error that names the batch. References: the loss's own rules, and a
counting spy that shows the check runs once per batch, not once per product.
"""

from __future__ import annotations

import dataclasses
import re

import array_api_compat.numpy as xp
import numpy as np
import pytest

import curvlinops as cl
from curvlinops import nn

OPERATORS = [cl.GGNLinearOperator, cl.HessianLinearOperator, cl.EFLinearOperator]


def problem():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    params = model.init(0, xp=xp, dtype=xp.float64)
    X = np.random.default_rng(0).normal(size=(10, 3))
    return model, params, X


def bad_data(case, X):
    good = np.array([0, 1, 2, 1, 0])
    if case == "label out of range":
        return (
            cl.CrossEntropyLoss(),
            [(X[:5], good), (X[5:], np.array([0, 1, 7, 1, 0]))],
            (
                ValueError,
                r"Batch 1: CrossEntropyLoss expects class indices in \[0, 2\]",
            ),
        )
    if case == "negative label":
        return (
            cl.CrossEntropyLoss(),
            [(X[:5], np.array([0, -1, 2, 1, 0])), (X[5:], good)],
            (
                ValueError,
                r"Batch 0: CrossEntropyLoss expects class indices",
            ),
        )
    if case == "nan target":
        Y = np.zeros((10, 3))
        Y[7, 1] = np.nan
        return (
            cl.MSELoss(),
            [(X[:5], Y[:5]), (X[5:], Y[5:])],
            (
                ValueError,
                r"Batch 1: MSELoss received targets with NaN",
            ),
        )
    if case == "nan input":
        Xn = X.copy()
        Xn[2, 0] = np.nan
        return cl.CrossEntropyLoss(), [(Xn[:5], good), (Xn[5:], good)], (ValueError, r"NaN")
    if case == "negative count":
        Y = np.ones((10, 3))
        Y[3, 0] = -1.0
        return (
            cl.PoissonNLLLoss(),
            [(X[:5], Y[:5]), (X[5:], Y[5:])],
            (
                ValueError,
                r"Batch 0: PoissonNLLLoss expects non-negative counts",
            ),
        )
    raise AssertionError(case)


CASES = ["label out of range", "negative label", "nan target", "nan input", "negative count"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("operator", OPERATORS, ids=lambda c: c.__name__)
def test_the_first_product_names_the_bad_batch(operator, case):
    model, params, X = problem()
    loss, data, (error, match) = bad_data(case, X)
    op = operator(model, loss, params, data, num_data=10, check_deterministic=False)
    with pytest.raises(error, match=match):
        op @ np.ones(op.shape[1])
    with pytest.raises(error, match=match):
        op.gradient_and_loss()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "operator",
    [
        cl.GGNDiagonalLinearOperator,
        cl.EFDiagonalLinearOperator,
        cl.HessianDiagonalLinearOperator,
        cl.KFACLinearOperator,
        cl.EKFACLinearOperator,
        cl.KFACHessianLinearOperator,
    ],
    ids=lambda c: c.__name__,
)
def test_approximations_name_the_bad_batch_at_construction(operator, case):
    model, params, X = problem()
    loss, data, (error, match) = bad_data(case, X)
    with pytest.raises(error, match=match):
        operator(model, loss, params, data, num_data=10, check_deterministic=False)


def test_each_batch_is_checked_once_not_once_per_product(monkeypatch):
    model, params, X = problem()
    loss = cl.CrossEntropyLoss()
    data = [(X[:5], np.array([0, 1, 2, 1, 0])), (X[5:], np.array([2, 1, 0, 1, 2]))]
    calls = []
    original = type(loss).check
    monkeypatch.setattr(
        type(loss), "check", lambda self, f, y: calls.append(1) or original(self, f, y)
    )
    op = cl.GGNLinearOperator(model, loss, params, data, num_data=10, check_deterministic=False)
    v = np.ones(op.shape[1])
    first = op @ v
    assert len(calls) == 2
    for _ in range(3):
        np.testing.assert_array_equal(op @ v, first)
    assert len(calls) == 2


# -- bad arguments at the boundary ------------------------------------------------------


@pytest.mark.parametrize(
    "operator",
    [cl.GGNLinearOperator, cl.KFACLinearOperator, cl.GGNDiagonalLinearOperator],
    ids=lambda c: c.__name__,
)
def test_data_without_batches_is_refused_with_num_data_given(operator):
    model, params, _ = problem()
    with pytest.raises(ValueError, match=r"data without batches \(num_data=8\)"):
        operator(model, cl.CrossEntropyLoss(), params, [], num_data=8)


@pytest.mark.parametrize("num_data", [0, -3, 2.5, True, "8"])
def test_num_data_must_be_a_positive_integer(num_data):
    model, params, X = problem()
    data = [(X, np.zeros(10, dtype=np.int64))]
    with pytest.raises((TypeError, ValueError), match="num_data must be"):
        cl.GGNLinearOperator(model, cl.CrossEntropyLoss(), params, data, num_data=num_data)


def test_python_lists_and_complex_vectors_get_messages_that_say_what_to_do():
    model, params, X = problem()
    G = cl.GGNLinearOperator(model, cl.CrossEntropyLoss(), params, [(X, np.zeros(10, dtype=int))])
    n = G.shape[1]
    with pytest.raises(TypeError, match=r"got a Python list\. Convert it first"):
        G @ [1.0] * n
    with pytest.raises(TypeError, match=r"real \(float64\) operator.*x\.real \+ 1j"):
        G @ (np.ones(n) + 1j)


@pytest.mark.parametrize("size", [-5, 0, 2.0, True])
def test_block_diagonal_refuses_a_max_block_size_that_is_not_a_positive_integer(size):
    model, params, X = problem()
    G = cl.GGNLinearOperator(model, cl.CrossEntropyLoss(), params, [(X, np.zeros(10, dtype=int))])
    with pytest.raises(
        ValueError, match=_exactly(f"max_block_size must be a positive integer, got {size!r}.")
    ):
        cl.block_diagonal(G, max_block_size=size)


# -- the data's errors, in full: the message is the contract ------------------------------


def _exactly(text):
    """A ``pytest.raises`` pattern that matches ``text`` and nothing else."""
    return "^" + re.escape(text) + "$"


CONSTRUCTED = [
    cl.GGNDiagonalLinearOperator,
    cl.EFDiagonalLinearOperator,
    cl.HessianDiagonalLinearOperator,
    cl.KFACLinearOperator,
    cl.EKFACLinearOperator,
    cl.KFACHessianLinearOperator,
]

_DTYPE_MESSAGE = (
    "Batch 1: the inputs X are float32 but the parameters of Sequential are float64. The "
    "operator computes in the parameters' dtype; cast the data, X.astype(np.float64), or "
    "the parameters to the data's dtype."
)


def _second_batch_float32(X):
    labels = np.array([0, 1, 2, 1, 0])
    return [(X[:5], labels), (X[5:].astype(np.float32), labels)]


@pytest.mark.parametrize("operator", CONSTRUCTED, ids=lambda c: c.__name__)
def test_a_batch_of_another_dtype_is_named_with_the_model_at_construction(operator):
    """With ``num_data`` given and no determinism check, construction looks at the first
    batch only; the pass that accumulates the approximation checks the others."""
    model, params, X = problem()
    data = _second_batch_float32(X)
    for kwargs in ({}, {"num_data": 10, "check_deterministic": False}):
        with pytest.raises(TypeError, match=_exactly(_DTYPE_MESSAGE)):
            operator(model, cl.CrossEntropyLoss(), params, data, **kwargs)


@pytest.mark.parametrize("operator", OPERATORS, ids=lambda c: c.__name__)
def test_a_batch_of_another_dtype_is_named_with_the_model_in_the_product(operator):
    model, params, X = problem()
    data = _second_batch_float32(X)
    op = operator(
        model, cl.CrossEntropyLoss(), params, data, num_data=10, check_deterministic=False
    )
    with pytest.raises(TypeError, match=_exactly(_DTYPE_MESSAGE)):
        op @ np.ones(op.shape[1])


@pytest.mark.parametrize(
    "operator",
    [cl.GGNLinearOperator, cl.HessianLinearOperator, cl.EFLinearOperator],
    ids=lambda c: c.__name__,
)
def test_the_determinism_check_names_a_later_batch_of_another_dtype(operator):
    """With ``num_data`` given, construction looks at the first batch only; the
    determinism check's passes then name a later batch's dtype, before any product."""
    model, params, X = problem()
    with pytest.raises(TypeError, match=_exactly(_DTYPE_MESSAGE)):
        operator(model, cl.CrossEntropyLoss(), params, _second_batch_float32(X), num_data=10)


def test_batches_that_are_not_pairs_of_matching_arrays():
    model, params, X = problem()
    y = np.zeros(10, dtype=np.int64)
    loss = cl.CrossEntropyLoss()
    cases = [
        ([(X, y, y)], TypeError, "Each batch must be a pair (X, y); batch 0 is a tuple."),
        ([(X, y), 5], TypeError, "Each batch must be a pair (X, y); batch 1 is a int."),
        ([(X, y), [X]], TypeError, "Each batch must be a pair (X, y); batch 1 is a list."),
        ([(X, y[:9])], ValueError, "Batch 0: X has 10 data points but y has 9."),
        (
            [(X, y.astype(np.complex128))],
            TypeError,
            "Batch 0: the targets y are complex (complex128); curvature operators take real "
            "data. Split real and imaginary parts into features.",
        ),
    ]
    for data, error, message in cases:
        with pytest.raises(error, match=_exactly(message)):
            cl.GGNLinearOperator(model, loss, params, data)


def test_bad_params_and_one_shot_data_are_refused_with_what_to_pass():
    model, params, X = problem()
    y = np.zeros(10, dtype=np.int64)
    loss, data = cl.CrossEntropyLoss(), [(X, y)]
    cases = [
        (params[0], data, "params must be a non-empty list of arrays, got ndarray."),
        ([], data, "params must be a non-empty list of arrays, got list."),
        (
            None,
            data,
            "params must be a non-empty list of arrays (for a PyTorch module: a list of its "
            "parameters), got None.",
        ),
        (
            [params[0].astype(np.float32), *params[1:]],
            data,
            "All parameters must share one dtype; found ['float32', 'float64'].",
        ),
        (
            [p.astype(np.int64) for p in params],
            data,
            "Parameters must be real floating, got int64.",
        ),
        (
            params,
            ((X, y) for _ in range(1)),
            "data must be re-iterable (a list of (X, y) batches or a data loader), but a "
            "one-shot iterator/generator was given: it would be empty on the second "
            "product. Pass list(data) instead.",
        ),
    ]
    for p, d, message in cases:
        with pytest.raises(TypeError, match=_exactly(message)):
            cl.GGNLinearOperator(model, loss, p, d)


def test_num_data_and_empty_data_messages():
    model, params, X = problem()
    loss, data = cl.CrossEntropyLoss(), [(X, np.zeros(10, dtype=np.int64))]
    with pytest.raises(
        TypeError,
        match=_exactly("num_data must be a positive integer (the number of data points), got 2.5."),
    ):
        cl.GGNLinearOperator(model, loss, params, data, num_data=2.5)
    for num_data, d in ((0, data), (-3, data), (None, [])):
        found = 0 if num_data is None else num_data
        with pytest.raises(ValueError, match=_exactly(f"num_data must be positive, got {found}.")):
            cl.GGNLinearOperator(model, loss, params, d, num_data=num_data)
    with pytest.raises(
        ValueError,
        match=_exactly(
            "KFACLinearOperator got data without batches (num_data=8); pass an iterable of "
            "(X, y) batches with at least one batch."
        ),
    ):
        cl.KFACLinearOperator(model, loss, params, [], num_data=8)


class _ChangingLoader:
    """Re-iterable data that give ``first`` on the first two passes, then ``later``.

    A pass counts once its first batch is asked for (``iter(data) is data`` alone, the
    one-shot check, is no pass): the count (or peek), then the two determinism passes.
    """

    def __init__(self, first, later):
        self.first, self.later, self.passes = first, later, 0

    def __iter__(self):
        self.passes += 1
        yield from self.first if self.passes <= 2 else self.later


def _differ_message(what, index):
    return (
        f"Two passes over the data differ in the {what} of batch {index}. Curvature "
        "operators iterate over the data in every product, so the data must come in the "
        "same order every time (no shuffling) and the model must be deterministic (no "
        "dropout). Fix the data loader or pass check_deterministic=False if the "
        "difference is intended."
    )


@pytest.mark.parametrize(
    "operator",
    [
        cl.GGNLinearOperator,
        cl.GGNDiagonalLinearOperator,
        cl.KFACLinearOperator,
        cl.EKFACLinearOperator,
        cl.KFACHessianLinearOperator,
    ],
    ids=lambda c: c.__name__,
)
def test_non_deterministic_data_are_named_by_batch_and_what_differs(operator):
    model, params, X = problem()
    loss = cl.CrossEntropyLoss()
    a, b = np.array([0, 1, 2, 1, 0]), np.array([2, 1, 0, 1, 2])
    batches = [(X[:5], a), (X[5:], b)]
    cases = [
        ([batches[1], batches[0]], _differ_message("inputs X", 0)),  # shuffled
        ([batches[0], (X[5:], a)], _differ_message("targets y", 1)),  # relabelled
        (batches[:1], "The data gave 2 batches on one pass and 1 on the next."),
    ]
    for later, message in cases:
        with pytest.raises(cl.NonDeterministicDataError, match=_exactly(message)):
            operator(model, loss, params, _ChangingLoader(batches, later))
        # the check is what raises: without it, the same data build an operator
        operator(model, loss, params, _ChangingLoader(batches, later), check_deterministic=False)


class _RenamesTapsOnSmallBatches(nn.Sequential):
    """A model whose layer taps take another name on batches of fewer than 5 data."""

    def linearize(self, params, x):
        def renamed(tap):
            return None if tap is None else dataclasses.replace(tap, name="other." + tap.name)

        class Renamed:  # a layer of the linearization whose tap is renamed
            def __init__(self, layer):
                self.layer = layer

            def __getattr__(self, attribute):
                return getattr(self.layer, attribute)

            def tap(self):
                return renamed(self.layer.tap())

        lin = super().linearize(params, x)
        if x.shape[0] < 5:  # what K-FAC reads (layer_taps) and the Kronecker Hessian (layers)
            taps, layers = lin._layer_taps, lin.layers
            lin._layer_taps = lambda cotangents: [renamed(t) for t in taps(cotangents)]
            lin.layers = lambda: [Renamed(layer) for layer in layers()]
        return lin


@pytest.mark.parametrize("cls", [cl.KFACLinearOperator, cl.KFACHessianLinearOperator])
def test_a_batch_through_other_layers_is_named(cls):
    model = _RenamesTapsOnSmallBatches(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    params = model.init(0, xp=xp, dtype=xp.float64)
    X = np.random.default_rng(0).normal(size=(12, 3))
    y = np.array([0, 1, 2] * 4)
    data = [(X[:5], y[:5]), (X[5:10], y[5:10]), (X[10:], y[10:])]
    first = [("0", 0, 1), ("2", 2, 3)]
    got = [("other.0", 0, 1), ("other.2", 2, 3)]
    message = (
        f"Batch 2 exposed the layer taps {got}, the first batch {first}; every batch must "
        "run through the same layers."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(model, cl.CrossEntropyLoss(), params, data, check_deterministic=False)
