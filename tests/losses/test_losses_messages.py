"""Complete texts of the error messages raised by ``curvlinops.losses``.

Each case triggers one ``raise`` whose message has a plain string literal (in the
``raise`` itself or in the helper that describes non-finite entries), through a public
call, and compares the whole message (type and text, case-sensitive) with the sentence
as a user reads it. Partial ``match=`` patterns elsewhere in the suite pin neither a
message's ends nor its case; these cases do (mutation testing, issue #14).
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from message_cases import assert_message, message_cases

from curvlinops import GaussianNLLLoss, Loss, MSELoss, as_loss, register_loss_adapter
from curvlinops.losses import adapters

# -- builders ---------------------------------------------------------------------------


def _with_entry(shape, index, value):
    """Zeros of ``shape`` with ``value`` at ``index``."""
    a = np.zeros(shape)
    a[index] = value
    return a


def _as_loss_with_two_adapters():
    """``as_loss`` of an unknown object while exactly two adapters (that decline) exist."""
    with mock.patch.dict(adapters._ADAPTERS, clear=True):
        register_loss_adapter("first", lambda loss: None, accepts="the name 'first'")
        register_loss_adapter("second", lambda loss: None, accepts="the name 'second'")
        as_loss(object())


_DIVERGED = (
    "the model diverged (parameters not finite, or too large for the dtype) or its inputs "
    "are not finite."
)
_CLEAN = "clean the data (drop or impute the missing targets)."

# -- the cases: (id, trigger, exception type, complete message) -------------------------

CASES = [
    # base.py
    (
        "reduction-none",
        lambda: MSELoss(reduction="none"),
        ValueError,
        "reduction must be one of ('mean', 'sum'), got 'none'. ('none' is not supported: "
        "curvature needs a scalar loss.)",
    ),
    (
        "nan-target",
        lambda: MSELoss()(np.zeros((4, 2)), _with_entry((4, 2), (2, 1), np.nan)),
        ValueError,
        f"MSELoss received targets with NaN entries (1 of 8; data points [2] of the batch); "
        f"{_CLEAN}",
    ),
    (
        "nan-and-inf-targets-in-many-data-points",
        lambda: MSELoss()(
            np.zeros((7, 1)), np.array([[np.nan], [np.inf], [np.nan]] * 2 + [[np.inf]])
        ),
        ValueError,
        "MSELoss received targets with NaN and Inf entries (7 of 7; data points "
        f"[0, 1, 2, 3, 4], ... of the batch); {_CLEAN}",
    ),
    (
        "inf-output",
        lambda: MSELoss()(_with_entry((4, 2), (0, 0), np.inf), np.zeros((4, 2))),
        ValueError,
        f"MSELoss received outputs with Inf entries (1 of 8; data points [0] of the batch); "
        f"{_DIVERGED}",
    ),
    (
        "nan-output-check-outputs",
        lambda: MSELoss().check_outputs(_with_entry((3, 2), (1, 0), np.nan)),
        ValueError,
        f"MSELoss received outputs with NaN entries (1 of 6; data points [1] of the batch); "
        f"{_DIVERGED}",
    ),
    # regression.py
    (
        "gaussian-nll-hessian-sqrt",
        lambda: GaussianNLLLoss().hessian_sqrt(np.zeros((2, 2)), np.ones((2, 1))),
        NotImplementedError,
        "GaussianNLLLoss has no symmetric Hessian factor: in (mean, log-variance) its "
        "per-element Hessian has determinant -(y - mu)^2 exp(-2 s) / 2 < 0 whenever y != mu, "
        "so it is indefinite and no S with H = S S^T exists. Use the Fisher (fisher_sqrt, "
        "the expected Hessian, positive definite) instead.",
    ),
    # adapters.py: the accepted inputs of the registered adapters, joined
    (
        "as-loss-lists-the-adapters",
        _as_loss_with_two_adapters,
        TypeError,
        "Expected a curvlinops loss (e.g. curvlinops.MSELoss()), or the name 'first', or the "
        "name 'second'; got builtins.object.",
    ),
]


@message_cases(CASES)
def test_message_is_complete(trigger, kind, expected):
    assert_message(trigger, kind, expected)


def test_adapters_are_restored():
    """The two-adapter case leaves the registry as it found it."""
    before = dict(adapters._ADAPTERS)
    with pytest.raises(TypeError):
        _as_loss_with_two_adapters()
    assert adapters._ADAPTERS == before


class _Quartic(Loss):
    """A user's loss ``sum (f - y)^4 / 4`` that has neither a diagonal Hessian hook nor a
    diagonal Fisher hook (the base class's defaults then speak)."""

    def _per_datum_count(self, outputs_shape):
        return outputs_shape[-1]

    def _prepare_targets(self, xp, outputs, targets):
        return targets

    def _loss_terms(self, xp, outputs, targets):
        return (outputs - targets) ** 4 / 4

    def _gradient(self, xp, outputs, targets):
        return (outputs - targets) ** 3


def test_a_user_loss_without_diagonal_hooks_says_which_one_it_lacks():
    loss, f, y = _Quartic(), np.ones((2, 3)), np.zeros((2, 3))
    V = np.ones((2, 3, 1))
    for call, what in (
        (lambda: loss.hessian_matmat(f, y, V), "Hessian"),
        (lambda: loss.fisher_matmat(f, V), "Fisher"),
    ):
        with pytest.raises(NotImplementedError) as err:
            call()
        assert str(err.value) == f"_Quartic has no diagonal {what}."
