"""The curvature operators' structure tags hold for their dense matrices.

A claimed ``is_psd`` is checked with :func:`curvlinops.testing.check_tags` against the
eigenvalues of the dense matrix (``to_dense``, itself tested against independent
references in test_exact.py and test_kfac*.py), for every loss including the one not in
natural parameters (GaussianNLLLoss: its GGN is indefinite and must not claim PSD), and
for the Hessian and the Kronecker-factored Hessian, which must not claim it either.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_exact import problem

import curvlinops as cl
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator
from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator
from curvlinops.losses.base import Loss
from curvlinops.testing import check_tags

LOSSES = ["mse", "ce", "bce", "poisson", "gaussian"]


@pytest.mark.parametrize("name", LOSSES)
def test_exact_operators_claim_only_true_tags(name):
    model, _, params, data, *_, loss = problem(name)
    ops = {
        "GGN": cl.GGNLinearOperator(model, loss, params, data),
        "Fisher": cl.FisherLinearOperator(model, loss, params, data),
        "EF": cl.EFLinearOperator(model, loss, params, data),
        "Hessian": cl.HessianLinearOperator(model, loss, params, data),
    }
    for what, op in ops.items():
        dense = np.asarray(op.to_dense())
        try:
            check_tags(op, dense)
        except AssertionError as err:
            raise AssertionError(f"{what}: {err}") from err
        assert op.is_symmetric, what
    assert ops["GGN"].is_psd == loss.is_natural
    assert ops["Fisher"].is_psd and ops["EF"].is_psd
    assert not ops["Hessian"].is_psd
    if name == "gaussian":  # the case that makes the GGN's missing tag necessary
        assert np.linalg.eigvalsh(np.asarray(ops["GGN"].to_dense())).min() < -1e-8


@pytest.mark.parametrize("name", ["mse", "ce"])
@pytest.mark.filterwarnings("ignore:The Kronecker-factored Hessian plus")
def test_kronecker_operators_claim_only_true_tags(name):
    model, _, params, data, *_, loss = problem(name)
    for cls in (KFACLinearOperator, EKFACLinearOperator, KFACHessianLinearOperator):
        for separate in (True, False):
            op = cls(model, loss, params, data, separate_weight_and_bias=separate)
            dense = np.asarray(op.to_dense())
            check_tags(op, dense)
            check_tags(op.inverse(0.1), np.linalg.inv(dense + 0.1 * np.eye(len(dense))))
            assert op.is_psd == (cls is not KFACHessianLinearOperator)
    # with tanh the Kronecker-factored Hessian is indefinite here: a PSD tag would be false
    K = KFACHessianLinearOperator(model, loss, params, data)
    assert np.linalg.eigvalsh(np.asarray(K.to_dense())).min() < 0


def test_a_loss_is_not_natural_unless_it_says_so():
    """The GGN's PSD tag rests on ``is_natural``; a user's loss that does not declare it
    must not inherit a claim (its Hessian may be indefinite)."""
    assert Loss.is_natural is False
    for cls in (cl.MSELoss, cl.CrossEntropyLoss, cl.BCEWithLogitsLoss, cl.PoissonNLLLoss):
        assert vars(cls)["is_natural"] is True, cls.__name__
    assert vars(cl.GaussianNLLLoss)["is_natural"] is False


@pytest.mark.parametrize(
    "cls, declared",
    [
        (cl.GGNDiagonalLinearOperator, True),
        (cl.EFDiagonalLinearOperator, True),
        (cl.HessianDiagonalLinearOperator, False),
    ],
    ids=lambda c: getattr(c, "__name__", str(c)),
)
def test_diagonals_declare_psd_only_when_it_holds_by_construction(cls, declared, monkeypatch):
    """The GGN and EF diagonals are sums of squares: they declare ``is_psd`` (no look at
    the entries, no host sync); the Hessian diagonal's tag comes from its entries, which
    are those of the dense Hessian's diagonal (tested in test_approximations.py)."""
    model, _, params, data, *_, loss = problem("mse")
    inspected = []
    infer = cl.DiagonalLinearOperator._infer_psd
    monkeypatch.setattr(
        cl.DiagonalLinearOperator,
        "_infer_psd",
        lambda self: inspected.append(type(self).__name__) or infer(self),
    )
    ops = [cls(model, loss, params, data)]
    if declared:  # a restored state keeps the declared tag
        ops.append(cls.from_state_dict(ops[0].state_dict(), model, loss, params))
        assert all(op.is_psd for op in ops)
    else:
        H = np.asarray(cl.HessianLinearOperator(model, loss, params, data).to_dense())
        assert np.diag(H).min() < 0  # tanh: an indefinite diagonal, so the tag must say no
        assert not ops[0].is_psd
    assert inspected == ([] if declared else [cls.__name__])
