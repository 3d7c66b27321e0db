"""The PyTorch and JAX frontends at the boundary: bad data named, never a library's own error.

With ``check_deterministic=False`` (what optimizers and Laplace libraries pass) the
first product checks each batch; dtypes and devices are checked on every batch (and
by the models themselves, for direct calls). References: PyTorch's and JAX's own
behaviour on the same call (PyTorch raises a RuntimeError naming neither model nor
array; JAX promotes silently), and the values the test made bad.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import curvlinops as cl

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
jax.config.update("jax_enable_x64", True)

from curvlinops.frontends.jax import JaxModel, dense  # noqa: E402
from curvlinops.frontends.torch import TorchModel  # noqa: E402

OPERATORS = [
    cl.GGNLinearOperator,
    cl.HessianLinearOperator,
    cl.EFLinearOperator,
    cl.KFACLinearOperator,
    cl.GGNDiagonalLinearOperator,
]
IDS = lambda c: c.__name__  # noqa: E731
RNG = np.random.default_rng(0)
X64 = RNG.normal(size=(8, 3))
LABELS = np.array([0, 1, 2, 1, 0, 2, 1, 0])


def torch_mlp(dtype=torch.float32):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)]
    return torch.nn.Sequential(*layers).to(dtype)


def jax_mlp(p, x):
    return dense(jnp.tanh(dense(x, p[0], p[1])), p[2], p[3])


def jax_params(dtype=jnp.float32):
    rng = np.random.default_rng(1)
    return [jnp.asarray(rng.normal(size=s), dtype=dtype) for s in [(4, 3), (4,), (3, 4), (3,)]]


def torch_problem(X, y, dtype=torch.float32):
    module = torch_mlp(dtype)
    return module, list(module.parameters()), [(torch.as_tensor(X), torch.as_tensor(y))]


def jax_problem(X, y, dtype=jnp.float32):
    params = jax_params(dtype)
    return JaxModel(jax_mlp, params, layer_taps=True), params, [(jnp.asarray(X), jnp.asarray(y))]


def apply(op, like):
    if isinstance(like, torch.Tensor):
        return op @ torch.ones(op.shape[1], dtype=like.dtype, device=like.device)
    return op @ jnp.ones(op.shape[1], dtype=like.dtype)


# -- the user observations, in both frontends ------------------------------------------

BAD_BATCHES = {
    # case: (X, y, loss, error, message)
    "label 7 of 3 classes": (
        X64,
        np.array([0, 1, 2, 7, 0, 2, 1, 0]),
        cl.CrossEntropyLoss(),
        ValueError,
        r"Batch 0: CrossEntropyLoss expects class indices in \[0, 2\] for 3 classes, got "
        r"labels in \[0, 7\]",
    ),
    "NaN targets": (
        X64,
        np.where(np.arange(24).reshape(8, 3) == 4, np.nan, 0.0),
        cl.MSELoss(),
        ValueError,
        r"Batch 0: MSELoss received targets with NaN entries \(1 of 24; data points \[1\]",
    ),
    "NaN inputs": (
        np.where(np.arange(24).reshape(8, 3) == 7, np.nan, X64),
        LABELS,
        cl.CrossEntropyLoss(),
        ValueError,
        r"Batch 0: CrossEntropyLoss received outputs with NaN entries \(3 of 24; data points "
        r"\[2\]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
@pytest.mark.parametrize("frontend", ["torch", "jax"])
@pytest.mark.parametrize("operator", OPERATORS, ids=IDS)
def test_bad_values_are_named_without_the_determinism_check(frontend, operator, case):
    X, y, loss, error, match = BAD_BATCHES[case]
    if frontend == "torch":
        model, params, data = torch_problem(X.astype(np.float32), y.astype(y.dtype))
        if loss.name == "MSELoss":
            data = [(data[0][0], data[0][1].float())]
    else:
        model, params, data = jax_problem(X, y, dtype=jnp.float64)
    with pytest.raises(error, match=match):
        op = operator(model, loss, params, data, num_data=8, check_deterministic=False)
        apply(op, params[0])


# -- dtypes ----------------------------------------------------------------------------


@pytest.mark.parametrize("operator", OPERATORS, ids=IDS)
@pytest.mark.parametrize(
    "params_dtype, data_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)]
)
def test_torch_data_of_another_dtype_are_named(operator, params_dtype, data_dtype):
    module = torch_mlp(params_dtype)
    X = torch.as_tensor(X64, dtype=data_dtype)
    # PyTorch itself refuses the call, naming neither the model nor the array
    with pytest.raises(RuntimeError, match="dtype"):
        module(X)
    found, expected = str(data_dtype)[6:], str(params_dtype)[6:]
    match = (
        rf"Batch 0: the inputs X are {found} but the parameters of TorchModel\(Sequential\) "
        rf"are {expected}\..*X\.to\(torch\.{expected}\)"
    )
    with pytest.raises(TypeError, match=match):
        operator(
            module,
            torch.nn.CrossEntropyLoss(),
            list(module.parameters()),
            [(X, torch.as_tensor(LABELS))],
            num_data=8,
            check_deterministic=False,
        )


def test_torch_model_names_the_dtype_when_called_directly():
    module = torch_mlp(torch.float32)
    model = TorchModel(module)
    X = torch.as_tensor(X64)
    with pytest.raises(
        TypeError, match=r"TorchModel\(Sequential\): the inputs X are float64 but the parameters"
    ):
        model.linearize(model.params, X)


def test_torch_integer_inputs_where_floats_are_needed_are_named():
    module = torch_mlp(torch.float32)
    X = torch.arange(24).reshape(8, 3)
    with pytest.raises(RuntimeError, match="dtype"):  # PyTorch's own error
        module(X)
    match = (
        r"TorchModel\(Sequential\): the module could not take the inputs X of dtype int64 "
        r"with its float32 parameters .*x\.to\(torch\.float32\)"
    )
    for operator in OPERATORS:
        with pytest.raises(TypeError, match=match):
            op = operator(
                module,
                torch.nn.CrossEntropyLoss(),
                list(module.parameters()),
                [(X, torch.as_tensor(LABELS))],
                num_data=8,
                check_deterministic=False,
            )
            apply(op, next(module.parameters()))


def test_torch_float64_targets_of_a_float32_model_are_named():
    module = torch_mlp(torch.float32)
    data = [(torch.as_tensor(X64, dtype=torch.float32), torch.zeros(8, 3, dtype=torch.float64))]
    with pytest.raises(TypeError, match=r"Batch 0: the targets y are float64 .*y\.to\(torch"):
        cl.GGNLinearOperator(module, torch.nn.MSELoss(), list(module.parameters()), data)


def _flax_model(dtype):
    linen = pytest.importorskip("flax.linen")

    class Net(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(3, param_dtype=dtype, dtype=dtype)(jnp.tanh(x))

    variables = Net().init(jax.random.PRNGKey(0), jnp.ones((1, 3), dtype=dtype))
    return JaxModel.from_flax(Net(), variables)


def _equinox_model(dtype):
    eqx = pytest.importorskip("equinox")
    net = eqx.nn.Linear(3, 3, key=jax.random.PRNGKey(0), dtype=dtype)
    return JaxModel.from_equinox(net)


def _plain_model(dtype):
    return JaxModel(jax_mlp, jax_params(dtype), layer_taps=True)


JAX_BUILDERS = {"function": _plain_model, "flax": _flax_model, "equinox": _equinox_model}


@pytest.mark.parametrize("built_with", list(JAX_BUILDERS))
@pytest.mark.parametrize(
    "params_dtype, data_dtype", [(jnp.float32, jnp.float64), (jnp.float64, jnp.float32)]
)
def test_jax_data_of_another_dtype_are_named(built_with, params_dtype, data_dtype):
    model = JAX_BUILDERS[built_with](params_dtype)
    params = model.params
    X = jnp.asarray(X64, dtype=data_dtype)
    # JAX itself promotes: the outputs would have another dtype than the operator's
    promoted = jnp.result_type(params_dtype, data_dtype)
    assert promoted != params_dtype or data_dtype != params_dtype
    found, expected = jnp.dtype(data_dtype).name, jnp.dtype(params_dtype).name
    with pytest.raises(
        TypeError,
        match=rf"JaxModel.*: the inputs X are {found} but the parameters are {expected}; JAX "
        rf"would promote.*x\.astype\(jnp\.{expected}\)",
    ):
        model.linearize(params, X)
    with pytest.raises(
        TypeError, match=rf"Batch 0: the inputs X are {found} but the parameters of JaxModel"
    ):
        cl.GGNLinearOperator(
            model, cl.CrossEntropyLoss(), params, [(X, jnp.asarray(LABELS))], num_data=8
        )


# -- devices ---------------------------------------------------------------------------


@pytest.mark.parametrize("operator", OPERATORS, ids=IDS)
def test_torch_parameters_on_another_device_than_the_data_are_named(operator):
    module = torch_mlp().to("meta")  # a second device without a GPU
    data = [(torch.as_tensor(X64, dtype=torch.float32), torch.as_tensor(LABELS))]
    match = (
        r"Batch 0: the inputs X are on device cpu but the parameters of "
        r"TorchModel\(Sequential\) are on device meta\. Move the data"
    )
    with pytest.raises(ValueError, match=match):
        operator(module, torch.nn.CrossEntropyLoss(), list(module.parameters()), data)
    model = TorchModel(module)
    with pytest.raises(ValueError, match=r"The data X is on device cpu but the parameters"):
        model.linearize(model.params, data[0][0])


_JAX_DEVICES = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import curvlinops as cl
    from curvlinops.frontends.jax import JaxModel
    cpu0, cpu1 = jax.devices()[:2]
    params = [jax.device_put(jnp.ones((3, 3)), cpu0)]
    model = JaxModel(lambda p, x: x @ p[0].T, params)
    X = jax.device_put(jnp.ones((4, 3)), cpu1)
    y = jax.device_put(jnp.zeros(4, dtype=jnp.int32), cpu1)
    for call in (
        lambda: model.linearize(params, X),
        lambda: cl.GGNLinearOperator(model, cl.CrossEntropyLoss(), params, [(X, y)]),
    ):
        try:
            call()
        except ValueError as error:
            print(type(error).__name__, error)
    """
)


def test_jax_inputs_committed_to_another_device_are_named():
    # two CPU devices need a fresh process (XLA reads the flag at start)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _JAX_DEVICES],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    assert (
        "JaxModel(<lambda>): the inputs X are committed to device(s) ['cpu:1'] but the "
        "parameters to ['cpu:0']. Move the data with jax.device_put" in lines[0]
    ), lines[0]
    assert "Batch 0: the inputs X are on device cpu:1 but the parameters of" in lines[1], lines[1]
