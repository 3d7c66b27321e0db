"""Bad batches are named in the products, without the determinism check.

Optimizers and Laplace libraries pass ``check_deterministic=False`` (and ``num_data``)
to skip the passes at construction; the first product then validates each batch once
(labels in range and integer, targets finite and in the loss's support, finite
outputs), with an error that names the batch. References: the loss's own rules, and a
counting spy that shows the check runs once per batch, not once per product.
"""

from __future__ import annotations

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
    with pytest.raises(ValueError, match="max_block_size must be a positive integer"):
        cl.block_diagonal(G, max_block_size=size)
