"""TorchModel on bad input, frozen parameters, devices; translate_loss and as_loss."""

from __future__ import annotations

import numpy as np
import pytest
from frontends_mlp import mlp_problem, torch_mlp

from curvlinops import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    GGNLinearOperator,
    HessianLinearOperator,
    MSELoss,
    NonDeterministicDataError,
    PoissonNLLLoss,
    to_numpy,
)
from curvlinops.frontends import as_loss

torch = pytest.importorskip("torch")

from curvlinops.frontends.torch import TorchModel, translate_loss  # noqa: E402

# torch loads its forward-mode decompositions with torch.jit.script on first use and warns
# about it; the warning is torch's own.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def problem():
    return mlp_problem()


def _data(problem, device="cpu"):
    return problem.batches(problem.y_class, lambda a: torch.from_numpy(np.asarray(a)).to(device))


def _native_ggn(problem):
    data = problem.batches(problem.y_class)
    return GGNLinearOperator(problem.native, CrossEntropyLoss(), problem.params, data).to_dense()


# -- randomness -------------------------------------------------------------------------


def _net_with_dropout():
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Dropout(0.5), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    )
    return net.double()


def test_dropout_in_training_mode_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"dropout.*training mode.*module\.eval\(\)"):
        TorchModel(_net_with_dropout())


def test_dropout_switched_back_to_training_mode_is_refused_at_the_next_pass(problem):
    net = _net_with_dropout().eval()
    model = TorchModel(net)
    X = torch.from_numpy(problem.X)
    model.linearize(model.params, X)  # deterministic in evaluation mode
    net.train()
    with pytest.raises(ValueError, match=r"module\.eval\(\)"):
        model.linearize(model.params, X)


class _NoisyNet(torch.nn.Module):
    """Randomness the frontend cannot see: noise or functional dropout inside forward."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.linear = torch.nn.Linear(5, 3).double()

    def forward(self, x):
        out = self.linear(x)
        if self.kind == "dropout":
            return torch.nn.functional.dropout(out, p=0.5, training=True)
        return out + 0.1 * torch.randn_like(out)


@pytest.mark.parametrize("kind", ["dropout", "noise"])
def test_hidden_randomness_is_caught_by_the_determinism_check(problem, kind):
    model = TorchModel(_NoisyNet(kind))
    with pytest.raises(NonDeterministicDataError, match="no dropout"):
        GGNLinearOperator(model, CrossEntropyLoss(), model.params, _data(problem))


# -- unsupported layers and inputs --------------------------------------------------------


@pytest.mark.parametrize("norm", [torch.nn.BatchNorm1d, torch.nn.SyncBatchNorm])
def test_batch_norm_in_training_mode_is_refused_and_accepted_in_evaluation_mode(norm):
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), norm(8), torch.nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"training mode.*couple the data points.*model\.eval"):
        TorchModel(net)
    TorchModel(net.eval())  # running statistics: a fixed affine map


def test_module_on_another_device_than_the_data_names_both(problem):
    net = torch_mlp(problem.params).to("meta")
    model = TorchModel(net)
    with pytest.raises(ValueError, match=r"X is on device cpu.*device meta"):
        model.linearize(model.params, torch.from_numpy(problem.X))


def test_buffer_on_another_device_than_the_data_names_both(problem):
    net = torch_mlp(problem.params)
    net.register_buffer("offset", torch.zeros(3, device="meta"))
    model = TorchModel(net)
    with pytest.raises(ValueError, match=r"X is on device cpu.*'offset'.*device meta"):
        model(model.params, torch.from_numpy(problem.X))


def test_non_tensor_inputs_are_refused(problem):
    model = TorchModel(torch_mlp(problem.params))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.linearize(model.params, problem.X)
    with pytest.raises(TypeError, match="nn.Module"):
        TorchModel(lambda x: x)


def test_shared_linear_layer_is_refused_by_layer_taps(problem):
    shared = torch.nn.Linear(5, 5).double()
    net = torch.nn.Sequential(shared, torch.nn.Tanh(), shared)
    model = TorchModel(net)
    lin = model.linearize(model.params, torch.from_numpy(problem.X))
    with pytest.raises(ValueError, match="more than once"):
        lin.layer_taps(torch.ones(lin.outputs.shape + (1,), dtype=torch.float64))


# -- parameters that do not require gradients ----------------------------------------------


def test_frozen_parameters_are_excluded(problem):
    net = torch_mlp(problem.params)
    net[0].weight.requires_grad_(False)
    model = TorchModel(net)
    assert model.param_names == ["0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert [tuple(p.shape) for p in model.params] == [(8,), (8, 8), (8,), (3, 8), (3,)]
    G = GGNLinearOperator(model, CrossEntropyLoss(), model.params, _data(problem)).to_dense()
    # The curvature of the remaining parameters is the matching block of the full one.
    keep = slice(5 * 8, None)
    full = _native_ggn(problem)
    np.testing.assert_allclose(to_numpy(G), full[keep, keep], rtol=1e-10, atol=1e-13)
    # The layer whose weight is frozen has no tap; the others point into the new list.
    lin = model.linearize(model.params, torch.from_numpy(problem.X))
    taps = lin.layer_taps()
    assert [(t.name, t.weight_index, t.bias_index) for t in taps] == [("2", 1, 2), ("4", 3, 4)]


def test_module_without_trainable_parameters_is_refused(problem):
    net = torch_mlp(problem.params).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require gradients"):
        TorchModel(net)


def test_params_share_memory_with_the_module(problem):
    net = torch_mlp(problem.params)
    model = TorchModel(net)
    params = model.params
    assert all(not p.requires_grad for p in params)
    with torch.no_grad():
        net[0].bias.add_(1.0)
    assert torch.equal(params[1], net[0].bias.detach())


# -- devices, dtypes, chunking -------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_operators_on_each_device(problem, device):
    model = TorchModel(torch_mlp(problem.params).to(device))
    data = _data(problem, device)
    G = GGNLinearOperator(model, CrossEntropyLoss(), model.params, data)
    v = torch.ones(G.shape[1], dtype=torch.float64, device=device)
    result = G @ v
    assert result.device.type == device
    np.testing.assert_allclose(
        to_numpy(result), _native_ggn(problem) @ np.ones(G.shape[1]), rtol=1e-10, atol=1e-13
    )
    H = HessianLinearOperator(model, CrossEntropyLoss(), model.params, data)
    assert (H @ v).device.type == device


def test_float32_module(problem):
    model = TorchModel(torch_mlp(problem.params).float())
    data = problem.batches(problem.y_class, torch.from_numpy)
    data = [(X.float(), y) for X, y in data]
    G = GGNLinearOperator(model, CrossEntropyLoss(), model.params, data)
    result = G @ torch.ones(G.shape[1])
    assert result.dtype == torch.float32
    expected = _native_ggn(problem) @ np.ones(G.shape[1])
    np.testing.assert_allclose(to_numpy(result), expected, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("operator", [GGNLinearOperator, HessianLinearOperator])
def test_chunked_columns_give_the_same_products(problem, operator):
    """8 columns in chunks of 3, 3 and 2: through vmap (GGN) and through batched double
    backward (Hessian), against the native model's dense operator."""
    model = TorchModel(torch_mlp(problem.params), chunk_size=3)
    A = operator(model, CrossEntropyLoss(), model.params, _data(problem))
    reference = operator(
        problem.native, CrossEntropyLoss(), problem.params, problem.batches(problem.y_class)
    ).to_dense()
    V = np.random.default_rng(0).standard_normal((A.shape[1], 8))
    np.testing.assert_allclose(
        to_numpy(A @ torch.from_numpy(V)), reference @ V, rtol=1e-10, atol=1e-13
    )


# -- losses ---------------------------------------------------------------------------------


def _loss_case(name, rng):
    f = rng.standard_normal((6, 4))
    if name == "cross_entropy":
        return f, rng.integers(0, 4, size=6)
    if name == "bce":
        return f, rng.uniform(size=(6, 4))
    if name == "poisson":
        return f, rng.poisson(2.0, size=(6, 4)).astype(float)
    return f, rng.standard_normal((6, 4))


TORCH_LOSSES = {
    "mse": (torch.nn.MSELoss, MSELoss),
    "cross_entropy": (torch.nn.CrossEntropyLoss, CrossEntropyLoss),
    "bce": (torch.nn.BCEWithLogitsLoss, BCEWithLogitsLoss),
    "poisson": (torch.nn.PoissonNLLLoss, PoissonNLLLoss),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(TORCH_LOSSES))
def test_translated_loss_has_the_torch_value(name, reduction):
    torch_cls, expected_cls = TORCH_LOSSES[name]
    torch_loss = torch_cls(reduction=reduction)
    loss = translate_loss(torch_loss)
    assert type(loss) is expected_cls and loss.reduction == reduction
    assert as_loss(torch_loss).reduction == reduction
    f, y = _loss_case(name, np.random.default_rng(0))
    want = float(torch_loss(torch.from_numpy(f), torch.from_numpy(y)))
    np.testing.assert_allclose(float(loss(torch.from_numpy(f), torch.from_numpy(y))), want, 1e-12)


@pytest.mark.parametrize(
    "torch_loss, option",
    [
        (torch.nn.CrossEntropyLoss(weight=torch.ones(3)), "weight"),
        (torch.nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing"),
        (torch.nn.CrossEntropyLoss(ignore_index=0), "ignore_index"),
        (torch.nn.BCEWithLogitsLoss(weight=torch.ones(3)), "weight"),
        (torch.nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "pos_weight"),
        (torch.nn.PoissonNLLLoss(log_input=False), "log_input"),
        (torch.nn.PoissonNLLLoss(full=True), "full"),
        (torch.nn.MSELoss(reduction="none"), "reduction"),
    ],
)
def test_untranslatable_options_are_refused(torch_loss, option):
    with pytest.raises(ValueError, match=option):
        translate_loss(torch_loss)


def test_unsupported_losses_are_refused():
    with pytest.raises(TypeError, match="No curvlinops translation for torch.nn.*L1Loss"):
        translate_loss(torch.nn.L1Loss())
    with pytest.raises(TypeError, match="GaussianNLLLoss"):
        as_loss(torch.nn.GaussianNLLLoss())
    with pytest.raises(TypeError, match="Expected a curvlinops loss"):
        as_loss(torch.ones(2))


def test_as_loss_returns_curvlinops_losses_unchanged():
    loss = CrossEntropyLoss(reduction="sum")
    assert as_loss(loss) is loss
    with pytest.raises(TypeError, match="Expected a curvlinops loss"):
        as_loss(lambda f, y: f)


def test_linearize_jvp_method_gives_the_same_products(problem):
    model = TorchModel(torch_mlp(problem.params), jvp_method="linearize")
    G = GGNLinearOperator(model, CrossEntropyLoss(), model.params, _data(problem), cache=True)
    V = np.random.default_rng(1).standard_normal((G.shape[1], 3))
    expected = _native_ggn(problem) @ V
    for _ in range(2):  # the second product reuses the traced tangent maps
        result = G @ torch.from_numpy(V)
        np.testing.assert_allclose(to_numpy(result), expected, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="jvp_method"):
        TorchModel(torch_mlp(problem.params), jvp_method="forward")


def test_parameters_that_require_grad_give_detached_products(problem):
    net = torch_mlp(problem.params)
    model = TorchModel(net)
    params = list(net.parameters())  # the module's own tensors, requiring gradients
    G = GGNLinearOperator(model, CrossEntropyLoss(), params, _data(problem))
    result = G @ torch.ones(G.shape[1], dtype=torch.float64)
    assert not result.requires_grad
    expected = _native_ggn(problem) @ np.ones(G.shape[1])
    np.testing.assert_allclose(to_numpy(result), expected, rtol=1e-10, atol=1e-13)


def test_shared_axis_outputs_and_layer_taps_match_native():
    import array_api_compat.numpy as npx

    from curvlinops import nn

    native = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    params = native.init(3, xp=npx, dtype=npx.float64)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    net = net.double()
    with torch.no_grad():
        for p, value in zip(net.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(value))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 2, 5))  # a shared axis S = 2
    U = rng.standard_normal((6, 2, 3, 4))
    model = TorchModel(net)
    lin, want = model.linearize(model.params, torch.from_numpy(X)), native.linearize(params, X)
    V = [rng.standard_normal(p.shape + (4,)) for p in params]
    np.testing.assert_allclose(
        to_numpy(lin.jvp([torch.from_numpy(v) for v in V])), want.jvp(V), rtol=1e-12
    )
    for got, ref in zip(lin.vjp(torch.from_numpy(U)), want.vjp(U), strict=True):
        np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-12, atol=1e-14)
    for got, ref in zip(lin.layer_taps(torch.from_numpy(U)), want.layer_taps(U), strict=True):
        assert to_numpy(got.inputs).shape == ref.inputs.shape == (6, 2, got.inputs.shape[-1])
        np.testing.assert_allclose(to_numpy(got.inputs), ref.inputs, rtol=1e-12)
        np.testing.assert_allclose(to_numpy(got.output_grads), ref.output_grads, rtol=1e-12)
