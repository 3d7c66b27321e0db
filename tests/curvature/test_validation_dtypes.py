"""Dtypes, devices and non-finite values at the boundary of the curvature operators.

Every operator checks each batch's metadata against its parameters (floating data of
the parameters' dtype, everything on the parameters' device) and, in the pass the
product makes anyway, the outputs and the batch loss; each error names the batch, the
array, what was found and what was expected. The native layers and the callables
frontend go through the shared check (the PyTorch and JAX frontends in
``tests/frontends/test_frontends_validation.py``). References: the dtypes and devices
the test itself chose, NumPy's float32 overflow of ``exp``, and the entries the test
made NaN.
"""

from __future__ import annotations

import array_api_compat.numpy as xp
import array_api_strict
import numpy as np
import pytest

import curvlinops as cl
from curvlinops import nn
from curvlinops.frontends import CallableModel

OPERATORS = [
    cl.GGNLinearOperator,
    cl.HessianLinearOperator,
    cl.EFLinearOperator,
    cl.KFACLinearOperator,
    cl.GGNDiagonalLinearOperator,
    cl.EFDiagonalLinearOperator,
]
IDS = lambda c: c.__name__  # noqa: E731


def native(dtype):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    return model, [p.astype(dtype) for p in model.init(0, xp=xp, dtype=xp.float64)]


def callable_linear(dtype):
    """``f = x W^T`` with its exact products, taps and (zero) second derivative."""

    def taps(p, x, U):
        tap = cl.LayerTap(name="W", weight_index=0, bias_index=None, inputs=x, output_grads=U)
        return [tap]

    model = CallableModel(
        forward=lambda p, x: x @ p[0].T,
        jvp=lambda p, x, V: np.einsum("ni,oik->nok", x, V[0]),
        vjp=lambda p, x, U: [np.einsum("nok,ni->oik", U, x)],
        second_order_vjp=lambda p, x, u, V, w: [np.einsum("nok,ni->oik", w, x)],
        layer_taps=taps,
        param_shapes=[(3, 3)],
        name="MyModel",
    )
    return model, [np.eye(3, dtype=dtype) + 0.1]


MODELS = {"native": (native, "Sequential"), "callables": (callable_linear, "MyModel")}


def batches(X, y):
    return [(X[:4], y[:4]), (X[4:], y[4:])]


def labels():
    return np.array([0, 1, 2, 1, 0, 2, 1, 0])


@pytest.mark.parametrize("frontend", list(MODELS))
@pytest.mark.parametrize("operator", OPERATORS, ids=IDS)
@pytest.mark.parametrize(
    "params_dtype, data_dtype", [(np.float32, np.float64), (np.float64, np.float32)]
)
def test_floating_inputs_of_another_dtype_are_named_at_construction(
    frontend, operator, params_dtype, data_dtype
):
    build, name = MODELS[frontend]
    model, params = build(params_dtype)
    X = np.random.default_rng(0).normal(size=(8, 3)).astype(data_dtype)
    expected = np.dtype(params_dtype).name
    found = np.dtype(data_dtype).name
    match = (
        rf"Batch 0: the inputs X are {found} but the parameters of {name} are {expected}\."
        rf".*X\.astype\(np\.{expected}\)"
    )
    for num_data in (None, 8):  # counted or not: the first batch is looked at either way
        with pytest.raises(TypeError, match=match):
            operator(
                model,
                cl.CrossEntropyLoss(),
                params,
                batches(X, labels()),
                num_data=num_data,
                check_deterministic=False,
            )


@pytest.mark.parametrize("operator", OPERATORS[:3], ids=IDS)
def test_a_later_batch_of_another_dtype_is_named_in_the_first_product(operator):
    model, params = native(np.float32)
    X = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    Y = np.zeros((8, 3), dtype=np.float32)
    data = [(X[:4], Y[:4]), (X[4:], Y[4:].astype(np.float64))]
    op = operator(model, cl.MSELoss(), params, data, num_data=8, check_deterministic=False)
    with pytest.raises(TypeError, match=r"Batch 1: the targets y are float64 but .* float32"):
        op @ np.ones(op.shape[1], dtype=np.float32)


def test_integer_inputs_and_labels_pass_the_dtype_check():
    # integer data are ids, labels and counts: the model and the loss judge them, and
    # the native layers convert integer features exactly
    model, params = native(np.float64)
    X = np.arange(24).reshape(8, 3) % 5
    G = cl.GGNLinearOperator(model, cl.CrossEntropyLoss(), params, batches(X, labels()))
    G_float = cl.GGNLinearOperator(
        model, cl.CrossEntropyLoss(), params, batches(X.astype(np.float64), labels())
    )
    np.testing.assert_allclose(G.to_dense(), G_float.to_dense(), rtol=1e-14, atol=1e-16)


def test_complex_data_are_refused():
    model, params = native(np.float64)
    X = np.ones((8, 3)) + 1j
    with pytest.raises(TypeError, match=r"Batch 0: the inputs X are complex \(complex128\)"):
        cl.GGNLinearOperator(model, cl.CrossEntropyLoss(), params, batches(X, labels()))


@pytest.mark.parametrize("operator", OPERATORS, ids=IDS)
def test_data_on_another_device_are_named(operator):
    # array-api-strict has several devices: the shared check sees any library's devices
    xs = array_api_strict
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    params = model.init(0, xp=xs, dtype=xs.float64)
    other = xs.Device("device1")
    X = xs.asarray(np.random.default_rng(0).normal(size=(8, 3)), device=other)
    y = xs.asarray(labels(), device=other)
    with pytest.raises(
        ValueError,
        match=r"Batch 0: the inputs X are on device .*device1.* but the parameters of "
        r"Sequential are on device .*CPU_DEVICE.*Move the data",
    ):
        operator(model, cl.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False)


@pytest.mark.parametrize("operator", OPERATORS, ids=IDS)
def test_a_batch_loss_that_overflows_is_named(operator):
    # log-rates of 180 are finite in float32 but exp(180) is not: the outputs pass the
    # finiteness check, the batch loss does not
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(np.float32(180.0)))
    model = nn.Sequential(nn.Linear(3, 2))
    params = [np.full((2, 3), 60.0, dtype=np.float32), np.zeros(2, dtype=np.float32)]
    data = [(np.ones((4, 3), dtype=np.float32), np.ones((4, 2), dtype=np.float32))]
    match = r"Batch 0: the PoissonNLLLoss of the batch is inf although outputs and targets"
    with np.errstate(over="ignore"), pytest.raises(ValueError, match=match):
        op = operator(
            model, cl.PoissonNLLLoss(), params, data, num_data=4, check_deterministic=False
        )
        op @ np.ones(op.shape[1], dtype=np.float32)


@pytest.mark.parametrize("operator", OPERATORS, ids=IDS)
def test_non_finite_outputs_name_the_batch_and_the_data_points(operator):
    # a callable model passes NaN inputs through (the native layers refuse them first)
    model, params = callable_linear(np.float64)
    X = np.random.default_rng(0).normal(size=(8, 3))
    X[5, 1] = np.nan  # datum 1 of batch 1: output entries (1, 0..2) become NaN
    match = (
        r"Batch 1: CrossEntropyLoss received outputs with NaN entries \(3 of 12; data "
        r"points \[1\] of the batch\)"
    )
    with pytest.raises(ValueError, match=match):
        op = operator(
            model,
            cl.CrossEntropyLoss(),
            params,
            batches(X, labels()),
            num_data=8,
            check_deterministic=False,
        )
        op @ np.ones(op.shape[1])


@pytest.mark.parametrize(
    "operator, fisher_type",
    [
        (cl.KFACLinearOperator, "mc"),
        (cl.KFACLinearOperator, "forward-only"),
        (cl.EKFACLinearOperator, "mc"),
        (cl.FisherLinearOperator, None),
    ],
)
def test_products_without_targets_still_name_non_finite_outputs(operator, fisher_type):
    # Monte-Carlo and forward-only statistics use no targets, yet NaN outputs would
    # make NaN factors
    model, params = callable_linear(np.float64)
    X = np.random.default_rng(0).normal(size=(8, 3))
    X[1, 0] = np.inf
    kw = {"mc_samples": 2} if fisher_type is None else {"fisher_type": fisher_type}
    match = r"Batch 0: CrossEntropyLoss received outputs with (NaN and )?Inf entries"
    with pytest.raises(ValueError, match=match), np.errstate(invalid="ignore"):
        op = operator(
            model,
            cl.CrossEntropyLoss(),
            params,
            batches(X, labels()),
            num_data=8,
            check_deterministic=False,
            **kw,
        )
        op @ np.ones(op.shape[1])


def test_non_finite_targets_name_what_and_where():
    model, params = native(np.float64)
    X = np.random.default_rng(0).normal(size=(8, 3))
    Y = np.zeros((8, 3))
    Y[2, 0], Y[3, 2] = np.nan, np.inf
    op = cl.HessianLinearOperator(
        model, cl.MSELoss(), params, batches(X, Y), num_data=8, check_deterministic=False
    )
    match = (
        r"Batch 0: MSELoss received targets with NaN and Inf entries \(2 of 12; data points "
        r"\[2, 3\]"
    )
    with pytest.raises(ValueError, match=match):
        op @ np.ones(op.shape[1])


@pytest.mark.parametrize(
    "library, hint",
    [
        ("numpy", "X.astype(np.float32)"),
        ("jax.numpy", "X.astype(jnp.float32)"),
        ("cupy", "X.astype(cp.float32)"),
        ("torch", "X.to(torch.float32)"),
        ("array_api_strict", "X.astype(xp.float32)"),
    ],
)
def test_the_cast_hint_is_written_in_the_datas_own_library(library, hint):
    """The hint names each library's own alias (stand-in namespaces: CuPy needs a GPU)."""
    from types import ModuleType

    from curvlinops.curvature._data import _cast_hint

    assert _cast_hint(ModuleType(library), "X", np.float32) == hint
