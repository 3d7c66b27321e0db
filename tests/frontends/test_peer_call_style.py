"""The call style of curvlinops-for-pytorch: ``Operator(module, torch_loss, params, data)``.

Every curvature operator takes a ``torch.nn.Module`` with a list of its parameters (any
subset, any order) and a PyTorch loss, and wraps them as a ``TorchModel`` and a
curvlinops loss internally. The references:

- the same operator built by hand (``TorchModel(module)``, ``translate_loss``), whose
  results must be **identical** (bitwise; float64);
- for parameter subsets, a copy of the network with the other parameters frozen
  (``requires_grad=False``), and the Hessian / GGN from ``torch.func`` directly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from frontends_mlp import mlp_problem, torch_mlp

import curvlinops as cl
from curvlinops import (
    CrossEntropyLoss,
    MSELoss,
    NonDeterministicDataError,
    as_loss,
    as_model,
    block_diagonal,
    default_partition,
)

torch = pytest.importorskip("torch")

from curvlinops.frontends.torch import TorchModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def problem():
    return mlp_problem()


def _tensor(a):
    return torch.from_numpy(np.asarray(a))


def _class_data(problem):
    return problem.batches(problem.y_class, _tensor)


def _regression_data(problem):
    return problem.batches(problem.y_regression, _tensor)


def _assert_identical(a, b):
    a, b = _as_tensor(a), _as_tensor(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a, b), float((a - b).abs().max())


def _as_tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _probe(shape, columns=3, seed=0):
    rng = np.random.default_rng(seed)
    return _tensor(rng.standard_normal((shape, columns)))


def _assert_same_operator(peer, hand):
    """Same class, shape, model and products as the hand-built operator."""
    assert type(peer) is type(hand) and peer.shape == hand.shape
    assert isinstance(peer.model, TorchModel)
    assert peer.model.param_names == hand.model.param_names
    _assert_identical(peer.to_dense(), hand.to_dense())
    V = _probe(peer.shape[1])
    _assert_identical(peer @ V, hand @ V)
    _assert_identical(peer @ V[:, 0], hand @ V[:, 0])
    U = _probe(peer.shape[0], seed=1)
    _assert_identical(peer.T @ U, hand.T @ U)


# -- every operator: peer style == hand-wrapped ---------------------------------------------

EXACT = {
    "ggn": (cl.GGNLinearOperator, {}),
    "ggn-cached": (cl.GGNLinearOperator, {"cache": True}),
    "hessian": (cl.HessianLinearOperator, {}),
    "ggn-residual": (cl.GGNResidualLinearOperator, {}),
    "fisher": (cl.FisherLinearOperator, {}),
    "fisher-mc": (cl.FisherLinearOperator, {"mc_samples": 3, "seed": 7}),
    "ef": (cl.EFLinearOperator, {}),
    "jacobian": (cl.JacobianLinearOperator, {}),
    "transposed-jacobian": (cl.TransposedJacobianLinearOperator, {}),
}

DIAGONALS = {
    "ggn-diagonal": (cl.GGNDiagonalLinearOperator, {}),
    "ggn-diagonal-mc": (cl.GGNDiagonalLinearOperator, {"mc_samples": 2, "seed": 3}),
    "ef-diagonal": (cl.EFDiagonalLinearOperator, {}),
    "hessian-diagonal": (cl.HessianDiagonalLinearOperator, {}),
}

KRONECKER = {
    "kfac": (cl.KFACLinearOperator, {}),
    "kfac-mc": (cl.KFACLinearOperator, {"fisher_type": "mc", "mc_samples": 2, "seed": 5}),
    "kfac-empirical": (cl.KFACLinearOperator, {"fisher_type": "empirical"}),
    "kfac-forward-only": (cl.KFACLinearOperator, {"fisher_type": "forward-only"}),
    "kfac-reduce-joint": (
        cl.KFACLinearOperator,
        {"kfac_approx": "reduce", "separate_weight_and_bias": False},
    ),
    "ekfac": (cl.EKFACLinearOperator, {}),
    "ekfac-mc": (cl.EKFACLinearOperator, {"fisher_type": "mc", "mc_samples": 2, "seed": 1}),
}


def _peer_and_hand(problem, cls, kwargs, *, torch_loss=None, data=None):
    torch_loss = torch.nn.CrossEntropyLoss() if torch_loss is None else torch_loss
    data = _class_data(problem) if data is None else data
    net = torch_mlp(problem.params)
    peer = cls(net, torch_loss, list(net.parameters()), data, **kwargs)
    model = TorchModel(torch_mlp(problem.params))
    hand = cls(model, as_loss(torch_loss), model.params, data, **kwargs)
    return peer, hand


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_operators_match_the_hand_wrapped_model(problem, name):
    cls, kwargs = EXACT[name]
    peer, hand = _peer_and_hand(problem, cls, kwargs)
    _assert_same_operator(peer, hand)
    assert isinstance(peer.loss, CrossEntropyLoss) and peer.loss.reduction == "mean"
    if cls is not cl.JacobianLinearOperator and cls is not cl.TransposedJacobianLinearOperator:
        (g_peer, value_peer), (g_hand, value_hand) = (
            peer.gradient_and_loss(),
            hand.gradient_and_loss(),
        )
        _assert_identical(value_peer, value_hand)
        for a, b in zip(g_peer, g_hand, strict=True):
            _assert_identical(a, b)


def _unsupported_by_torch_model(problem, cls, kwargs):
    """The error the hand-wrapped TorchModel gets, or None if the operator supports it."""
    model = TorchModel(torch_mlp(problem.params))
    try:
        cls(model, CrossEntropyLoss(), model.params, _class_data(problem), **kwargs)
    except (TypeError, NotImplementedError) as error:
        return error
    return None


@pytest.mark.parametrize("name", list(DIAGONALS))
def test_diagonal_operators_match_the_hand_wrapped_model(problem, name):
    cls, kwargs = DIAGONALS[name]
    error = _unsupported_by_torch_model(problem, cls, kwargs)
    if error is not None:  # e.g. the exact Hessian diagonal walks curvlinops.nn layers only
        net = torch_mlp(problem.params)
        with pytest.raises(type(error)) as peer_error:
            cls(net, torch.nn.CrossEntropyLoss(), list(net.parameters()), _class_data(problem))
        assert str(peer_error.value) == str(error)
        return
    peer, hand = _peer_and_hand(problem, cls, kwargs)
    assert type(peer) is type(hand) and isinstance(peer.model, TorchModel)
    _assert_identical(peer.diagonal(), hand.diagonal())
    V = _probe(peer.shape[1])
    _assert_identical(peer @ V, hand @ V)


def _kronecker_arrays(op):
    """Every factor array of a Kronecker-factored operator (B, A; or eigenbases and
    eigenvalues for EKFAC), in block order, read from its blocks."""
    arrays = []
    for block in op._operator.operator.blocks:  # a layout around a block-diagonal
        if isinstance(block, cl.KroneckerEighLinearOperator):
            arrays.extend([block.eigenvalues, *block.eigenvectors])
        else:  # Kronecker(B, A), or Kronecker(B, 1) for a separate bias
            arrays.extend(f.A for f in block.factors if isinstance(f, cl.DenseLinearOperator))
    return arrays


@pytest.mark.parametrize("name", list(KRONECKER))
def test_kronecker_operators_and_factors_match_the_hand_wrapped_model(problem, name):
    cls, kwargs = KRONECKER[name]
    peer, hand = _peer_and_hand(problem, cls, kwargs)
    _assert_same_operator(peer, hand)
    peer_factors, hand_factors = _kronecker_arrays(peer), _kronecker_arrays(hand)
    assert len(peer_factors) == len(hand_factors)
    for a, b in zip(peer_factors, hand_factors, strict=True):
        _assert_identical(a, b)
    _assert_identical(peer.diagonal(), hand.diagonal())
    _assert_identical(peer.trace(), hand.trace())
    _assert_identical(peer.inverse(damping=0.1).to_dense(), hand.inverse(damping=0.1).to_dense())


def test_kronecker_factors_are_found(problem):
    # Guards the factor comparison above against comparing two empty lists.
    peer, _ = _peer_and_hand(problem, cl.KFACLinearOperator, {})
    factors = _kronecker_arrays(peer)
    assert len(factors) >= 6  # B and A of the weight blocks, B of the bias blocks
    assert {tuple(f.shape) for f in factors} >= {(8, 8), (5, 5), (3, 3)}


def test_kfac_hessian_of_a_torch_module_matches_the_hand_wrapped_model(problem):
    peer, hand = _peer_and_hand(problem, cl.KFACHessianLinearOperator, {})
    _assert_identical(peer.to_dense(), hand.to_dense())


def test_block_diagonal_of_a_peer_style_operator(problem):
    peer, hand = _peer_and_hand(problem, cl.GGNLinearOperator, {})
    assert default_partition(peer) == default_partition(hand) == [[0, 1], [2, 3], [4, 5]]
    _assert_identical(block_diagonal(peer).to_dense(), block_diagonal(hand).to_dense())


@pytest.mark.parametrize(
    "torch_loss", [torch.nn.MSELoss(), torch.nn.MSELoss(reduction="sum")], ids=["mean", "sum"]
)
def test_regression_losses_in_peer_style(problem, torch_loss):
    data = _regression_data(problem)
    peer, hand = _peer_and_hand(
        problem, cl.HessianLinearOperator, {}, torch_loss=torch_loss, data=data
    )
    assert isinstance(peer.loss, MSELoss) and peer.loss.reduction == torch_loss.reduction
    _assert_same_operator(peer, hand)


# -- Monte-Carlo operators: seeds, num_data, check_deterministic ----------------------------


def test_monte_carlo_seeds_num_data_and_determinism_check(problem):
    options = {"mc_samples": 2, "seed": 11, "num_data": 14, "check_deterministic": False}
    peer, hand = _peer_and_hand(problem, cl.FisherLinearOperator, options)
    assert peer.num_data == hand.num_data == 14
    _assert_same_operator(peer, hand)
    other, _ = _peer_and_hand(problem, cl.FisherLinearOperator, {**options, "seed": 12})
    assert not torch.equal(other.to_dense(), peer.to_dense())  # the seed is used
    for cls in (cl.KFACLinearOperator, cl.GGNDiagonalLinearOperator):
        kwargs = {"mc_samples": 2, "seed": 4, "num_data": 14, "check_deterministic": False}
        if cls is cl.KFACLinearOperator:
            kwargs["fisher_type"] = "mc"
        peer, hand = _peer_and_hand(problem, cls, kwargs)
        _assert_identical(peer.to_dense(), hand.to_dense())


def test_dropout_in_training_mode_is_refused_in_peer_style():
    net = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Dropout(0.5)).double()
    X = torch.ones(4, 5, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    loss = torch.nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"module\.eval\(\)"):
        cl.GGNLinearOperator(net, loss, list(net.parameters()), [(X, y)])
    net.eval()
    G = cl.GGNLinearOperator(net, loss, list(net.parameters()), [(X, y)])
    assert G.shape == (18, 18)


# -- data as the peer passes it ---------------------------------------------------------------


def test_a_data_loader_gives_the_same_operator_as_a_list(problem):
    X, y = _tensor(problem.X), _tensor(problem.y_class)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=5, shuffle=False
    )
    collated = [(Xb, yb) for Xb, yb in loader]  # the loader's own (collated) batches
    slices = [(X[i : i + 5], y[i : i + 5]) for i in range(0, len(X), 5)]
    net = torch_mlp(problem.params)
    loss = torch.nn.CrossEntropyLoss()
    for cls in (cl.GGNLinearOperator, cl.KFACLinearOperator, cl.HessianLinearOperator):
        peer = cls(net, loss, list(net.parameters()), loader)
        model = TorchModel(torch_mlp(problem.params))
        hand = cls(model, as_loss(loss), model.params, collated)
        _assert_identical(peer.to_dense(), hand.to_dense())
        # Views of the data instead of collated copies: the same up to rounding (the
        # memory layout may change the order of BLAS's floating-point sums).
        sliced = cls(model, as_loss(loss), model.params, slices)
        torch.testing.assert_close(peer.to_dense(), sliced.to_dense(), rtol=0, atol=1e-15)


def test_a_shuffling_data_loader_is_refused(problem):
    X, y = _tensor(problem.X), _tensor(problem.y_class)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y),
        batch_size=5,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    net = torch_mlp(problem.params)
    with pytest.raises(NonDeterministicDataError, match="no shuffling"):
        cl.GGNLinearOperator(net, torch.nn.CrossEntropyLoss(), list(net.parameters()), loader)


# -- which parameters ---------------------------------------------------------------------------


def _frozen_copy(problem, keep):
    """The network with every parameter but those named in ``keep`` frozen."""
    net = torch_mlp(problem.params)
    for name, p in net.named_parameters():
        p.requires_grad_(name in keep)
    return TorchModel(net)


def test_a_subset_in_module_order_equals_freezing_the_others(problem):
    net = torch_mlp(problem.params)
    subset = [net[0].weight, net[0].bias, net[4].weight]
    data = _class_data(problem)
    loss = torch.nn.CrossEntropyLoss()
    reference = _frozen_copy(problem, {"0.weight", "0.bias", "4.weight"})
    assert reference.param_names == ["0.weight", "0.bias", "4.weight"]
    for cls in (cl.GGNLinearOperator, cl.HessianLinearOperator, cl.KFACLinearOperator):
        peer = cls(net, loss, subset, data)
        hand = cls(reference, as_loss(loss), reference.params, data)
        assert peer.model.param_names == reference.param_names
        assert peer.shape == (40 + 8 + 24, 40 + 8 + 24)
        _assert_identical(peer.to_dense(), hand.to_dense())
    # The module's other parameters still require gradients: they were left alone.
    assert all(p.requires_grad for p in net.parameters())


def _sizes(names, shapes):
    return {n: int(np.prod(s)) for n, s in zip(names, shapes, strict=True)}


def test_a_subset_in_any_order_follows_the_list_order(problem):
    net = torch_mlp(problem.params)
    names = ["4.weight", "0.weight", "0.bias"]
    modules = dict(net.named_parameters())
    data = _class_data(problem)
    peer = cl.GGNLinearOperator(net, torch.nn.CrossEntropyLoss(), [modules[n] for n in names], data)
    assert peer.model.param_names == names
    reference = _frozen_copy(problem, set(names))  # module order: 0.weight, 0.bias, 4.weight
    dense = cl.GGNLinearOperator(reference, CrossEntropyLoss(), reference.params, data).to_dense()
    sizes = _sizes(reference.param_names, [p.shape for p in reference.params])
    starts = dict(zip(reference.param_names, np.cumsum([0, *sizes.values()]), strict=False))
    order = np.concatenate([np.arange(starts[n], starts[n] + sizes[n]) for n in names])
    _assert_identical(peer.to_dense(), dense[order][:, order])


def _flat_loss(net, names, X, y, loss_fn):
    """The loss over all data as a function of the flattened ``names`` parameters."""
    shapes = [dict(net.named_parameters())[n].shape for n in names]

    def loss(theta):
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(np.prod(shape))
            params[name] = theta[start : start + size].reshape(shape)
            start += size
        return loss_fn(torch.func.functional_call(net, params, (X,)), y)

    values = dict(net.named_parameters())
    theta = torch.cat([values[n].detach().reshape(-1) for n in names])
    return loss, theta


def test_a_subset_hessian_and_ggn_equal_torch_func(problem):
    net = torch_mlp(problem.params)
    names = ["2.bias", "4.weight", "0.weight"]
    modules = dict(net.named_parameters())
    X, y = _tensor(problem.X), _tensor(problem.y_class)
    loss, theta = _flat_loss(net, names, X, y, torch.nn.functional.cross_entropy)
    H = cl.HessianLinearOperator(
        net, torch.nn.CrossEntropyLoss(), [modules[n] for n in names], _class_data(problem)
    )
    reference = torch.func.hessian(loss)(theta)
    torch.testing.assert_close(H.to_dense(), reference, rtol=1e-10, atol=1e-12)
    # GGN = J^T H_L J with J from torch.func.jacrev and H_L the softmax Hessian.
    shapes = [modules[n].shape for n in names]

    def outputs(t):
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(np.prod(shape))
            params[name] = t[start : start + size].reshape(shape)
            start += size
        return torch.func.functional_call(net, params, (X,))

    J = torch.func.jacrev(outputs)(theta)  # (N, C, P)
    p = torch.softmax(outputs(theta), dim=-1)
    H_L = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / len(X)
    ggn = torch.einsum("ncp,ncd,ndq->pq", J, H_L, J)
    G = cl.GGNLinearOperator(
        net, torch.nn.CrossEntropyLoss(), [modules[n] for n in names], _class_data(problem)
    )
    torch.testing.assert_close(G.to_dense(), ggn, rtol=1e-10, atol=1e-12)


def test_parameters_as_views_generators_and_frozen_parameters(problem):
    data = _class_data(problem)
    loss = torch.nn.CrossEntropyLoss()
    net = torch_mlp(problem.params)
    full = cl.GGNLinearOperator(net, loss, list(net.parameters()), data).to_dense()
    # Detached views of the parameters (e.g. TorchModel.params) and a generator.
    views = cl.GGNLinearOperator(net, loss, [p.detach() for p in net.parameters()], data)
    _assert_identical(views.to_dense(), full)
    generator = cl.GGNLinearOperator(net, loss, net.parameters(), data)
    _assert_identical(generator.to_dense(), full)
    # A parameter with requires_grad=False that is listed is a parameter of the operator.
    net[0].weight.requires_grad_(False)
    listed = cl.GGNLinearOperator(net, loss, [net[0].weight], data)
    assert listed.model.param_names == ["0.weight"] and listed.shape == (40, 40)
    _assert_identical(listed.to_dense(), full[:40, :40])


def test_the_wrapped_model_is_visible_and_as_model_builds_it(problem):
    net = torch_mlp(problem.params)
    subset = [net[4].weight, net[4].bias]
    model, params = as_model(net, subset)
    assert isinstance(model, TorchModel) and model.module is net
    assert model.param_names == ["4.weight", "4.bias"]
    assert repr(model) == "TorchModel(Sequential, param_names=['4.weight', '4.bias'])"
    for value, p in zip(params, subset, strict=True):
        assert not value.requires_grad and torch.equal(value, p)
        assert value.data_ptr() == p.data_ptr()  # the module's current values, not copies
    G = cl.GGNLinearOperator(net, torch.nn.CrossEntropyLoss(), subset, _class_data(problem))
    assert G.model.param_names == model.param_names and G.model.module is net
    # Protocol models pass through unchanged.
    assert as_model(model, params) == (model, params)
    assert as_model(problem.native, problem.params)[0] is problem.native


# -- clear errors -------------------------------------------------------------------------------


def test_errors_name_what_was_expected(problem):
    net = torch_mlp(problem.params)
    data = _class_data(problem)
    loss = torch.nn.CrossEntropyLoss()
    GGN = cl.GGNLinearOperator
    with pytest.raises(ValueError, match=r"params\[1\].*not a parameter of the Sequential"):
        GGN(net, loss, [net[0].weight, torch.zeros(8, dtype=torch.float64)], data)
    with pytest.raises(ValueError, match="more than once"):
        GGN(net, loss, [net[0].weight, net[0].weight], data)
    with pytest.raises(TypeError, match="list of the module's parameters"):
        GGN(net, loss, dict(net.named_parameters()), data)
    with pytest.raises(TypeError, match=r"params\[0\] is a ndarray.*torch tensors"):
        GGN(net, loss, problem.params, data)
    with pytest.raises(TypeError, match="params must be a non-empty list"):
        GGN(net, loss, None, data)
    with pytest.raises(TypeError, match="non-empty list of the module's parameters"):
        GGN(net, loss, [], data)
    with pytest.raises(TypeError, match=r"curvlinops model.*torch\.nn\.Module.*builtins\.str"):
        GGN("net", loss, list(net.parameters()), data)
    with pytest.raises(TypeError, match=r"curvlinops loss.*PyTorch loss"):
        GGN(net, "cross-entropy", list(net.parameters()), data)
    with pytest.raises(TypeError, match="No curvlinops translation.*L1Loss"):
        GGN(net, torch.nn.L1Loss(), list(net.parameters()), data)


def test_frontends_as_loss_is_the_loss_layers_as_loss():
    from curvlinops.frontends import as_loss as frontends_as_loss
    from curvlinops.losses import as_loss as losses_as_loss

    assert frontends_as_loss is losses_as_loss is cl.as_loss
    assert isinstance(as_loss(torch.nn.BCEWithLogitsLoss()), cl.BCEWithLogitsLoss)


# -- layering -----------------------------------------------------------------------------------


def _imported_modules(path):
    """Every module a file imports (module level or inside functions), as written."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def test_curvature_and_the_registries_import_no_frontend():
    files = sorted((ROOT / "curvlinops" / "curvature").glob("*.py"))
    files += [ROOT / "curvlinops" / "models" / "adapters.py"]
    files += [ROOT / "curvlinops" / "losses" / "adapters.py"]
    for path in files:
        for name in _imported_modules(path):
            assert "frontends" not in name, f"{path.name} imports {name}"
            assert name.split(".")[0] not in ("torch", "jax"), f"{path.name} imports {name}"
