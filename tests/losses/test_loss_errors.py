"""Bad input to the losses: clear errors naming what was expected and what was found.

Every message is asserted in full (``_exactly``): the text is the contract, written out
here from what each error must tell the user, so that a changed word, a changed case or
a lost sentence fails a test.
"""

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
    as_loss,
    register_loss_adapter,
)
from curvlinops.losses import adapters

ALL = [MSELoss, CrossEntropyLoss, BCEWithLogitsLoss, PoissonNLLLoss, GaussianNLLLoss]


def _exactly(text):
    """A ``pytest.raises`` pattern that matches ``text`` and nothing else."""
    return "^" + re.escape(text) + "$"


@pytest.mark.parametrize("loss_cls", ALL)
def test_repr_names_the_class_and_reduction(loss_cls):
    assert repr(loss_cls(reduction="sum")) == f"{loss_cls.__name__}(reduction='sum')"


@pytest.mark.parametrize("loss_cls", ALL)
def test_unknown_reduction(loss_cls):
    with pytest.raises(
        ValueError,
        match=_exactly(
            "reduction must be one of ('mean', 'sum'), got 'none'. "
            "('none' is not supported: curvature needs a scalar loss.)"
        ),
    ):
        loss_cls(reduction="none")


def test_cross_entropy_labels_out_of_range(backend):
    f = backend.asarray(np.zeros((3, 4)))
    for bad, found in (([0, 4, 1], "[0, 4]"), ([0, -1, 1], "[-1, 1]")):
        expected = (
            "CrossEntropyLoss expects class indices in [0, 3] for 4 classes, got labels in "
            f"{found}."
        )
        with pytest.raises(ValueError, match=_exactly(expected)):
            CrossEntropyLoss()(f, backend.asarray(np.array(bad), "int64"))


def test_cross_entropy_float_class_indices_are_a_type_error(backend):
    f = backend.asarray(np.zeros((3, 4)))
    with pytest.raises(
        TypeError,
        match=_exactly(
            "CrossEntropyLoss received floating targets of shape (3,): class indices must "
            "have an integer dtype (got float64). Cast them to an integer dtype, or pass "
            "class probabilities of shape (3, 4)."
        ),
    ):
        CrossEntropyLoss().check(f, backend.asarray(np.array([0.0, 1.0, 2.0])))
    with pytest.raises(
        TypeError,
        match=_exactly(
            "CrossEntropyLoss expects integer class indices (3,) or floating class "
            "probabilities (3, 4), got dtype bool."
        ),
    ):
        CrossEntropyLoss().check(f, backend.asarray(np.array([True, False, True]), "bool"))


def test_cross_entropy_probabilities_must_be_distributions():
    f = np.zeros((2, 3))
    with pytest.raises(
        ValueError,
        match=_exactly(
            "CrossEntropyLoss expects class probabilities that sum to 1 over the last axis; "
            "found sums off by up to 0.5. Normalize the targets."
        ),
    ):
        CrossEntropyLoss().check(f, np.full((2, 3), 0.5))
    with pytest.raises(
        ValueError,
        match=_exactly(
            "CrossEntropyLoss expects class probabilities in [0, 1]; found values outside."
        ),
    ):
        CrossEntropyLoss().check(f, np.array([[1.5, -0.5, 0.0], [1.0, 0.0, 0.0]]))


@pytest.mark.parametrize(
    "loss_cls, outputs_shape, targets_shape, dtype, expected_shape",
    [
        (MSELoss, (3, 4), (3, 5), "float64", (3, 4)),
        (MSELoss, (3, 4), (4, 3), "float64", (3, 4)),
        (CrossEntropyLoss, (3, 4), (4,), "int64", (3,)),
        (CrossEntropyLoss, (3, 2, 4), (3, 4), "int64", (3, 2)),
        (CrossEntropyLoss, (3, 4), (3, 5), "float64", (3, 4)),
        (BCEWithLogitsLoss, (3, 4), (3,), "float64", (3, 4)),
        (PoissonNLLLoss, (3, 4), (3, 4, 1), "float64", (3, 4)),
        (GaussianNLLLoss, (3, 4), (3, 4), "float64", (3, 2)),
    ],
)
def test_mismatched_target_shapes(
    backend, loss_cls, outputs_shape, targets_shape, dtype, expected_shape
):
    f = backend.asarray(np.zeros(outputs_shape))
    y = backend.asarray(np.zeros(targets_shape), dtype)
    expected = (
        f"{loss_cls.__name__} expects targets of shape {expected_shape} for outputs of shape "
        f"{outputs_shape}, got targets of shape {targets_shape}."
    )
    with pytest.raises(ValueError, match=_exactly(expected)):
        loss_cls().check(f, y)
    with pytest.raises(ValueError, match=_exactly(expected)):
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
    # the message says what is not finite and where (one entry, of datum 1) and why
    for kind, outputs in (
        ("NaN", f),
        ("Inf", backend.asarray(np.where(np.isnan(f_np), np.inf, f_np))),
    ):
        expected = (
            f"{loss_cls.__name__} received outputs with {kind} entries (1 of 8; data points "
            "[1] of the batch); the model diverged (parameters not finite, or too large for "
            "the dtype) or its inputs are not finite."
        )
        with pytest.raises(ValueError, match=_exactly(expected)):
            loss_cls()(outputs, y)
        with pytest.raises(ValueError, match=_exactly(expected)):
            loss_cls().check(outputs, y)
        with pytest.raises(ValueError, match=_exactly(expected)):
            loss_cls().check_outputs(outputs)


def test_nan_and_inf_outputs_are_both_named():
    f = np.zeros((3, 2))
    f[0, 0], f[2, 1] = np.nan, -np.inf
    with pytest.raises(
        ValueError,
        match=_exactly(
            "MSELoss received outputs with NaN and Inf entries (2 of 6; data points [0, 2] "
            "of the batch); the model diverged (parameters not finite, or too large for the "
            "dtype) or its inputs are not finite."
        ),
    ):
        MSELoss().check(f, np.zeros((3, 2)))


@pytest.mark.parametrize(
    "loss_cls, targets, error, message",
    [
        (
            BCEWithLogitsLoss,
            np.array([[0.5, 1.2]]),
            ValueError,
            "BCEWithLogitsLoss expects targets (probabilities of label 1) in [0, 1]; found "
            "values outside.",
        ),
        (
            BCEWithLogitsLoss,
            np.array([[0, 1]]),
            TypeError,
            "BCEWithLogitsLoss expects targets of a real floating dtype, got dtype int64.",
        ),
        (
            PoissonNLLLoss,
            np.array([[1.0, -1.0]]),
            ValueError,
            "PoissonNLLLoss expects non-negative counts as targets.",
        ),
        (
            PoissonNLLLoss,
            np.array([[True, False]]),
            TypeError,
            "PoissonNLLLoss expects targets of a real floating or integer dtype, got dtype bool.",
        ),
        (
            MSELoss,
            np.array([[1.0, np.inf]]),
            ValueError,
            "MSELoss received targets with Inf entries (1 of 2; data points [0] of the "
            "batch); clean the data (drop or impute the missing targets).",
        ),
        (
            MSELoss,
            np.array([[1, 2]]),
            TypeError,
            "MSELoss expects targets of a real floating dtype, got dtype int64.",
        ),
        (
            GaussianNLLLoss,
            np.array([[1]]),
            TypeError,
            "GaussianNLLLoss expects real floating targets, got dtype int64.",
        ),
    ],
)
def test_bad_target_values_and_dtypes(loss_cls, targets, error, message):
    with pytest.raises(error, match=_exactly(message)):
        loss_cls().check(np.zeros((1, 2)), targets)


def test_integer_counts_are_poisson_targets_but_not_regression_targets():
    f = np.log(np.array([[2.0, 0.5]]))
    counts = np.array([[3, 0]])
    # exp(f) - y f per element, summed: integer counts are the float counts
    expected = np.sum(np.exp(f) - counts * f)
    assert float(PoissonNLLLoss(reduction="sum")(f, counts)) == pytest.approx(expected, rel=1e-15)
    with pytest.raises(
        TypeError,
        match=_exactly("MSELoss expects targets of a real floating dtype, got dtype int64."),
    ):
        MSELoss()(f, counts)


def test_outputs_must_be_floating_and_have_a_class_axis():
    with pytest.raises(
        TypeError,
        match=_exactly(
            "MSELoss expects real floating outputs (logits, means, ...), got dtype int64. "
            "Cast them, e.g. to float32 or float64."
        ),
    ):
        MSELoss().check(np.zeros((2, 3), dtype=np.int64), np.zeros((2, 3)))
    with pytest.raises(
        ValueError,
        match=_exactly(
            "MSELoss expects outputs of shape (N, C) or (N, ..., C), got shape (3,). Add a "
            "trailing axis of size 1 for scalar outputs."
        ),
    ):
        MSELoss().check(np.zeros(3), np.zeros(3))
    with pytest.raises(
        ValueError,
        match=_exactly(
            "GaussianNLLLoss expects outputs (N, ..., 2D) holding [means | log-variances] "
            "along the last axis, got shape (2, 3)."
        ),
    ):
        GaussianNLLLoss().check(np.zeros((2, 3)), np.zeros((2, 1)))
    with pytest.raises(
        ValueError,
        match=_exactly(
            "MSELoss expected vectors of shape outputs.shape + (K,) = (2, 3) + (K,), got "
            "shape (2, 3). Add a trailing axis for one vector."
        ),
    ):
        MSELoss().hessian_matmat(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(
        ValueError,
        match=_exactly(
            "CrossEntropyLoss expected vectors of shape outputs.shape + (K,) = (2, 3) + (K,), "
            "got shape (2, 4, 1). Add a trailing axis for one vector."
        ),
    ):
        CrossEntropyLoss().fisher_matmat(np.zeros((2, 3)), np.zeros((2, 4, 1)))


def test_gaussian_nll_refuses_a_hessian_factor_and_points_to_the_fisher():
    with pytest.raises(
        NotImplementedError,
        match=_exactly(
            "GaussianNLLLoss has no symmetric Hessian factor: in (mean, log-variance) its "
            "per-element Hessian has determinant -(y - mu)^2 exp(-2 s) / 2 < 0 whenever "
            "y != mu, so it is indefinite and no S with H = S S^T exists. Use the Fisher "
            "(fisher_sqrt, the expected Hessian, positive definite) instead."
        ),
    ):
        GaussianNLLLoss().hessian_sqrt(np.zeros((1, 2)), np.ones((1, 1)))


def test_mixed_libraries_and_bad_arguments():
    with pytest.raises(ValueError, match=_exactly("num_data must be a positive integer, got 0.")):
        MSELoss().normalization(0, (2, 3))
    with pytest.raises(
        ValueError, match=_exactly("num_samples must be a positive integer, got 0.")
    ):
        MSELoss().sample(np.zeros((2, 3)), 0, seed=0)
    with pytest.raises(
        TypeError,
        match=_exactly(
            "seed must be an int or a numpy generator, got NoneType. curvlinops uses no "
            "global random state: pass an explicit seed."
        ),
    ):
        MSELoss().sample(np.zeros((2, 3)), 2, seed=None)
    torch = pytest.importorskip("torch")
    with pytest.raises(
        TypeError,
        match=_exactly(
            "MSELoss: outputs are numpy arrays but targets are torch arrays. Convert them "
            "to one library first."
        ),
    ):
        MSELoss().check(np.zeros((2, 3)), torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("bad_rows, listed", [(5, "[0, 1, 2, 3, 4]"), (6, "[0, 1, 2, 3, 4], ...")])
def test_non_finite_message_lists_five_data_points_then_an_ellipsis(bad_rows, listed):
    f = np.zeros((8, 3))
    f[:bad_rows, 1] = np.nan
    expected = (
        f"MSELoss received outputs with NaN entries ({bad_rows} of 24; data points {listed} "
        "of the batch); the model diverged (parameters not finite, or too large for the "
        "dtype) or its inputs are not finite."
    )
    with pytest.raises(ValueError, match=_exactly(expected)):
        MSELoss()(f, np.zeros((8, 3)))


# -- as_loss and its registry -----------------------------------------------------------


def test_as_loss_names_what_it_accepts(monkeypatch):
    monkeypatch.setattr(adapters, "_ADAPTERS", {})  # no frontend registered
    loss = MSELoss(reduction="sum")
    assert as_loss(loss) is loss
    with pytest.raises(
        TypeError,
        match=_exactly(
            "Expected a curvlinops loss (e.g. curvlinops.MSELoss()); got builtins.object."
        ),
    ):
        as_loss(object())
    register_loss_adapter("names", lambda x: MSELoss() if x == "mse" else None, accepts="'mse'")
    register_loss_adapter("none", lambda x: None, accepts="nothing at all")
    assert isinstance(as_loss("mse"), MSELoss)
    with pytest.raises(
        TypeError,
        match=_exactly(
            "Expected a curvlinops loss (e.g. curvlinops.MSELoss()), or 'mse', or nothing "
            "at all; got builtins.str."
        ),
    ):
        as_loss("sum of squares")


def test_register_loss_adapter_replaces_by_name_and_refuses_non_callables(monkeypatch):
    monkeypatch.setattr(adapters, "_ADAPTERS", {})
    register_loss_adapter("a", lambda x: MSELoss(reduction="sum"), accepts="first")
    register_loss_adapter("a", lambda x: PoissonNLLLoss(), accepts="second")
    assert isinstance(as_loss(1), PoissonNLLLoss)
    assert [accepts for _, accepts in adapters._ADAPTERS.values()] == ["second"]
    with pytest.raises(TypeError, match=_exactly("adapter must be callable, got int.")):
        register_loss_adapter("b", 3, accepts="x")
