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
