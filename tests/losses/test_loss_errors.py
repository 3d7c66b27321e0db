"""Bad input to the losses: clear errors naming what was expected and what was found."""

from __future__ import annotations

import re

import numpy as np
import pytest

from curvlinops import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    GaussianNLLLoss,
    MSELoss,
    PoissonNLLLoss,
)

ALL = [MSELoss, CrossEntropyLoss, BCEWithLogitsLoss, PoissonNLLLoss, GaussianNLLLoss]


@pytest.mark.parametrize("loss_cls", ALL)
def test_unknown_reduction(loss_cls):
    with pytest.raises(ValueError, match="reduction must be one of"):
        loss_cls(reduction="none")


def test_cross_entropy_labels_out_of_range(backend):
    f = backend.asarray(np.zeros((3, 4)))
    for bad in ([0, 4, 1], [0, -1, 1]):
        with pytest.raises(ValueError, match=r"class indices in \[0, 3\].*got labels in"):
            CrossEntropyLoss()(f, backend.asarray(np.array(bad), "int64"))


def test_cross_entropy_float_class_indices_are_a_type_error(backend):
    f = backend.asarray(np.zeros((3, 4)))
    with pytest.raises(TypeError, match="class indices must have an integer dtype"):
        CrossEntropyLoss().check(f, backend.asarray(np.array([0.0, 1.0, 2.0])))
    with pytest.raises(TypeError, match="integer class indices"):
        CrossEntropyLoss().check(f, backend.asarray(np.array([True, False, True]), "bool"))


def test_cross_entropy_probabilities_must_be_distributions():
    f = np.zeros((2, 3))
    with pytest.raises(ValueError, match="sum to 1"):
        CrossEntropyLoss().check(f, np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        CrossEntropyLoss().check(f, np.array([[1.5, -0.5, 0.0], [1.0, 0.0, 0.0]]))


@pytest.mark.parametrize(
    "loss_cls, outputs_shape, targets_shape, dtype",
    [
        (MSELoss, (3, 4), (3, 5), "float64"),
        (MSELoss, (3, 4), (4, 3), "float64"),
        (CrossEntropyLoss, (3, 4), (4,), "int64"),
        (CrossEntropyLoss, (3, 2, 4), (3, 4), "int64"),
        (CrossEntropyLoss, (3, 4), (3, 5), "float64"),
        (BCEWithLogitsLoss, (3, 4), (3,), "float64"),
        (PoissonNLLLoss, (3, 4), (3, 4, 1), "float64"),
        (GaussianNLLLoss, (3, 4), (3, 4), "float64"),
    ],
)
def test_mismatched_target_shapes(backend, loss_cls, outputs_shape, targets_shape, dtype):
    f = backend.asarray(np.zeros(outputs_shape))
    y = backend.asarray(np.zeros(targets_shape), dtype)
    with pytest.raises(ValueError, match=r"expects targets of shape .* got targets of shape"):
        loss_cls().check(f, y)
    with pytest.raises(ValueError, match="expects targets of shape"):
        loss_cls().gradient(f, y)


@pytest.mark.parametrize("loss_cls", ALL)
def test_non_finite_outputs(backend, loss_cls):
    f_np = np.zeros((2, 4))
    f_np[1, 2] = np.nan
    y_np = np.zeros((2,), dtype=np.int64) if loss_cls is CrossEntropyLoss else np.zeros((2, 4))
    if loss_cls is GaussianNLLLoss:
        y_np = np.zeros((2, 2))
    f = backend.asarray(f_np)
    y = backend.asarray(y_np)
    # the message says what is not finite and where: one entry, of datum 1
    with pytest.raises(ValueError, match=r"outputs with NaN entries \(1 of 8; data points \[1\]"):
        loss_cls()(f, y)
    with pytest.raises(ValueError, match=r"outputs with Inf entries \(1 of 8; data points \[1\]"):
        loss_cls().check(backend.asarray(np.where(np.isnan(f_np), np.inf, f_np)), y)


@pytest.mark.parametrize(
    "loss_cls, targets, message",
    [
        (BCEWithLogitsLoss, np.array([[0.5, 1.2]]), r"in \[0, 1\]"),
        (BCEWithLogitsLoss, np.array([[0, 1]]), "real floating"),
        (PoissonNLLLoss, np.array([[1.0, -1.0]]), "non-negative"),
        (
            MSELoss,
            np.array([[1.0, np.inf]]),
            r"targets with Inf entries \(1 of 2; data points \[0\]",
        ),
        (MSELoss, np.array([[1, 2]]), "real floating"),
        (GaussianNLLLoss, np.array([[1]]), "real floating"),
    ],
)
def test_bad_target_values_and_dtypes(loss_cls, targets, message):
    error = TypeError if message == "real floating" else ValueError
    with pytest.raises(error, match=message):
        loss_cls().check(np.zeros((1, 2)), targets)


def test_outputs_must_be_floating_and_have_a_class_axis():
    with pytest.raises(TypeError, match="real floating outputs"):
        MSELoss().check(np.zeros((2, 3), dtype=np.int64), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"outputs of shape \(N, C\)"):
        MSELoss().check(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"\(N, \.\.\., 2D\)"):
        GaussianNLLLoss().check(np.zeros((2, 3)), np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"outputs.shape \+ \(K,\)"):
        MSELoss().hessian_matmat(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"outputs.shape \+ \(K,\)"):
        CrossEntropyLoss().fisher_matmat(np.zeros((2, 3)), np.zeros((2, 4, 1)))


def test_mixed_libraries_and_bad_arguments():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="outputs are numpy arrays but targets are torch"):
        MSELoss().check(np.zeros((2, 3)), torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_data must be a positive integer"):
        MSELoss().normalization(0, (2, 3))
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        MSELoss().sample(np.zeros((2, 3)), 0, seed=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        MSELoss().sample(np.zeros((2, 3)), 2, seed=None)


@pytest.mark.parametrize(
    "bad_rows, listed", [(5, "[0, 1, 2, 3, 4] of"), (6, "[0, 1, 2, 3, 4], ... of")]
)
def test_non_finite_message_lists_five_data_points_then_an_ellipsis(bad_rows, listed):
    f = np.zeros((8, 3))
    f[:bad_rows, 1] = np.nan
    with pytest.raises(ValueError, match=f"data points {re.escape(listed)} the batch"):
        MSELoss()(f, np.zeros((8, 3)))
