"""Error messages say what to do: their advice is part of the contract.

Each test triggers one error as a user would and checks the sentence that tells the user
how to fix the cause (mutation testing found these sentences unchecked).
"""

from __future__ import annotations

import sys

import array_api_compat.numpy as npx
import numpy as np
import pytest

import curvlinops as cl
import curvlinops.nn as cnn


def _mlp(dtype=npx.float64):
    model = cnn.Sequential(cnn.Linear(3, 4), cnn.Tanh(), cnn.Linear(4, 2))
    return model, model.init(0, xp=npx, dtype=dtype)


def test_non_finite_targets_say_to_clean_the_data():
    y = np.zeros((4, 2))
    y[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"clean the data \(drop or impute the missing targets\)"):
        cl.MSELoss()(np.zeros((4, 2)), y)


def test_non_finite_outputs_say_the_model_diverged():
    f = np.zeros((4, 2))
    f[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"model diverged \(parameters not finite, or too large"):
        cl.MSELoss()(f, np.zeros((4, 2)))


def test_untapped_parameters_name_the_tapped_layer_kinds():
    torch = pytest.importorskip("torch")

    class Scaled(torch.nn.Module):  # a parameter outside any linear or affine layer
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 2).double()
            self.scale = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))

        def forward(self, x):
            return self.linear(x) * self.scale

    module = Scaled()
    data = [(torch.ones(4, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64))]
    params = list(module.parameters())
    with pytest.raises(ValueError, match=r"linear maps: Linear, convolutions; elementwise"):
        cl.KFACLinearOperator(module, torch.nn.MSELoss(), params, data)


def test_progressbar_without_tqdm_says_how_to_install_it(monkeypatch):
    model, params = _mlp()
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    data = [(np.ones((4, 3)), np.zeros((4, 2)))]
    G = cl.GGNLinearOperator(model, cl.MSELoss(), params, data, progressbar=True)
    with pytest.raises(ImportError, match=r"progressbar=True needs tqdm: pip install tqdm"):
        G @ np.ones(G.shape[1])


def test_an_operator_without_matmat_is_named():
    class Incomplete(cl.LinearOperator):
        pass

    op = Incomplete((2, 2), dtype=npx.float64, xp=npx)
    with pytest.raises(NotImplementedError, match="Incomplete does not implement _matmat"):
        op @ np.ones(2)


def test_a_parameter_free_model_keeps_the_dtype():
    model = cnn.Sequential(cnn.Tanh())
    x = np.ones((3, 2), dtype=np.float32)
    lin = model.linearize([], x)
    jv = lin.jvp([])
    assert jv.dtype == np.float32 and jv.shape[:2] == (3, 2) and not np.any(jv)


def test_rmatmat_takes_matrices_only():
    A = cl.aslinearoperator(np.eye(3))
    with pytest.raises(ValueError, match=r"expected a matrix of shape \(3, k\), got shape \(3,\)"):
        A.rmatmat(np.ones(3))


def test_a_wrapped_scipy_operator_keeps_its_declared_properties():
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    A = cl.aslinearoperator(scipy_linalg.aslinearoperator(np.eye(3)), symmetric=True, psd=True)
    assert A.is_symmetric and A.is_psd
