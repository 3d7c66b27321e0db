"""ParameterSubsetModel: the curvature of chosen parameters is the block of the full one.

References: the dense GGN and Hessian of the full network from ``torch.func``
(``bayes_problems``), sliced to the chosen parameters; K-FAC's blocks of the full
model; per-datum Jacobians of the full model, sliced.
"""

from __future__ import annotations

import numpy as np
import pytest
from bayes_problems import classifier

from curvlinops import (
    CrossEntropyLoss,
    GGNLinearOperator,
    HessianLinearOperator,
    KFACLinearOperator,
    MSELoss,
    ParameterSubsetModel,
    nn,
    to_numpy,
)
from curvlinops.bayes import Laplace, per_datum_jacobians

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def mlp():
    return classifier(widths=(2, 4, 3), seed=0, N=20)


def block(ref_matrix, params, indices):
    sizes = [p.size for p in params]
    starts = np.cumsum([0, *sizes])
    rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in indices])
    return ref_matrix[np.ix_(rows, rows)]


@pytest.mark.parametrize("indices", [[0, 1], [2, 3], [0, 3], [2]])
def test_exact_curvature_of_a_subset_is_the_block(backend, mlp, indices):
    model, params, X, y, ref = mlp
    ps = [backend.asarray(p) for p in params]
    sub = ParameterSubsetModel(model, ps, indices)
    data = [(backend.asarray(X), backend.asarray(y))]
    chosen = [ps[i] for i in indices]
    G = GGNLinearOperator(sub, CrossEntropyLoss(reduction="sum"), chosen, data).to_dense()
    H = HessianLinearOperator(sub, CrossEntropyLoss(reduction="sum"), chosen, data).to_dense()
    np.testing.assert_allclose(to_numpy(G), block(ref.ggn(params, X), params, indices), atol=1e-10)
    np.testing.assert_allclose(
        to_numpy(H), block(ref.hessian(params, X, y), params, indices), atol=1e-10
    )
    _, J = per_datum_jacobians(sub, chosen, backend.asarray(X))
    full = ref.jacobians(params, X)
    starts = np.cumsum([0, *[p.size for p in params]])
    columns = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in indices])
    np.testing.assert_allclose(to_numpy(J), full[:, :, columns], atol=1e-12)


def test_kfac_of_a_subset_keeps_the_chosen_blocks(numpy_backend, mlp):
    model, params, X, y, _ = mlp
    loss, data = CrossEntropyLoss(), [(X, y)]
    full = KFACLinearOperator(model, loss, params, data).to_dense()
    for indices in ([2, 3], [2], [0, 1]):
        sub = ParameterSubsetModel(model, params, indices)
        K = KFACLinearOperator(sub, loss, [params[i] for i in indices], data).to_dense()
        np.testing.assert_allclose(K, block(full, params, indices), rtol=1e-12)
    # a bias without its weight belongs to no tap: K-FAC refuses it
    sub = ParameterSubsetModel(model, params, [3])
    with pytest.raises(Exception, match="(?i)tap|layer"):
        KFACLinearOperator(sub, loss, [params[3]], data)


def test_subset_of_a_torch_module_equals_a_torch_model_over_the_subset():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    net = net.double()
    X, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    data = [(X, y)]
    ours = Laplace(net, torch.nn.CrossEntropyLoss(), list(net.parameters()), data,
                   structure="full", subset="last_layer")  # fmt: skip
    last = list(net[2].parameters())
    direct = GGNLinearOperator(net, torch.nn.CrossEntropyLoss(reduction="sum"), last, data)
    np.testing.assert_allclose(
        ours.precision.to_dense().numpy(), direct.to_dense().numpy() + np.eye(10), rtol=1e-12
    )


def test_subset_model_errors(numpy_backend):
    import array_api_compat.numpy as xp

    model = nn.Sequential(nn.Linear(2, 1))
    params = model.init(0, xp=xp, dtype=xp.float64)
    with pytest.raises(ValueError, match="increasing order"):
        ParameterSubsetModel(model, params, [1, 0])
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        ParameterSubsetModel(model, params, [2])
    with pytest.raises(TypeError, match="non-empty sequence of ints"):
        ParameterSubsetModel(model, params, [])
    with pytest.raises(TypeError, match="non-empty sequence of ints"):
        ParameterSubsetModel(model, params, [True])
    with pytest.raises(TypeError, match="wraps a protocol model"):
        ParameterSubsetModel(lambda p, x: x, params, [0])
    sub = ParameterSubsetModel(model, params, [1])
    with pytest.raises(ValueError, match="takes 1 parameter arrays, got 2"):
        sub.full_params(params)
    assert sub.name == "Sequential (parameters [1])"
    # fixed parameters keep their values; the chosen ones come from the call
    out = sub([np.array([10.0])], np.ones((1, 2)))
    np.testing.assert_allclose(out, np.ones((1, 2)) @ params[0].T + 10.0)
    data = [(np.ones((3, 2)), np.zeros((3, 1)))]
    G = GGNLinearOperator(sub, MSELoss(reduction="sum"), [params[1]], data)
    np.testing.assert_allclose(G.to_dense(), [[6.0]])  # 2 * (sum of d f / d b = 1) over 3 data
