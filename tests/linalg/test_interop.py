"""Interop: ``to_scipy()`` with SciPy's solvers, ``to_cupyx()``, ``aslinearoperator``.

References are NumPy/SciPy computations on the dense matrices the operators are built
from.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg

from conftest import tolerances
from curvlinops import (
    CallableLinearOperator,
    DenseLinearOperator,
    KroneckerLinearOperator,
    LinearOperator,
    ScipyLinearOperator,
    aslinearoperator,
)
from curvlinops._backend import namespace_name


def _spd(rng, n):
    G = rng.normal(size=(n, n))
    return G @ G.T / n + np.eye(n)


@pytest.fixture
def kronecker_numpy():
    rng = np.random.default_rng(0)
    A, B = _spd(rng, 3), _spd(rng, 4)
    return KroneckerLinearOperator(A, B), np.kron(A, B)


def test_to_scipy_products(kronecker_numpy):
    op, ref = kronecker_numpy
    S = op.to_scipy()
    assert isinstance(S, scipy.sparse.linalg.LinearOperator)
    assert S.shape == ref.shape and S.dtype == np.float64
    rng = np.random.default_rng(1)
    x, X = rng.normal(size=12), rng.normal(size=(12, 3))
    np.testing.assert_allclose(S @ x, ref @ x, rtol=1e-12)
    np.testing.assert_allclose(S @ X, ref @ X, rtol=1e-12)
    np.testing.assert_allclose(S.matvec(x[:, None]).ravel(), ref @ x, rtol=1e-12)
    np.testing.assert_allclose(S.rmatvec(x), ref.T @ x, rtol=1e-12)
    np.testing.assert_allclose(S.H @ X, ref.T @ X, rtol=1e-12)


def test_to_scipy_rectangular_adjoint():
    rng = np.random.default_rng(2)
    A, B = rng.normal(size=(2, 3)), rng.normal(size=(4, 2))
    S = KroneckerLinearOperator(A, B).to_scipy()
    y = rng.normal(size=8)
    np.testing.assert_allclose(S.rmatvec(y), np.kron(A, B).T @ y, rtol=1e-12)
    np.testing.assert_allclose(S.H.matmat(y[:, None]).ravel(), np.kron(A, B).T @ y, rtol=1e-12)


def test_to_scipy_cg(kronecker_numpy):
    op, ref = kronecker_numpy
    b = np.random.default_rng(3).normal(size=12)
    x, info = scipy.sparse.linalg.cg(op.to_scipy(), b, rtol=1e-12, atol=0.0, maxiter=500)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(ref, b), rtol=1e-8)


def test_to_scipy_eigsh(kronecker_numpy):
    op, ref = kronecker_numpy
    top = scipy.sparse.linalg.eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(ref)[-3:], rtol=1e-9)


def test_to_scipy_on_every_backend(backend):
    # Operators on any backend convert to SciPy through host copies (see the tests at
    # the end of this file); the reference is the NumPy matrix the operator holds.
    rng = np.random.default_rng(9)
    A = rng.normal(size=(4, 3))
    S = DenseLinearOperator(backend.asarray(A)).to_scipy()
    assert isinstance(S, scipy.sparse.linalg.LinearOperator)
    assert S.shape == (4, 3) and S.dtype == np.float64
    x, y, X = rng.normal(size=3), rng.normal(size=4), rng.normal(size=(3, 2))
    for result, want in [(S @ x, A @ x), (S.rmatvec(y), A.T @ y), (S @ X, A @ X)]:
        assert type(result) is np.ndarray and result.flags.writeable
        np.testing.assert_allclose(result, want, rtol=1e-12)


class _CountingDense(DenseLinearOperator):
    """A dense operator that records how many products it ran and of which kind."""

    def __init__(self, A):
        super().__init__(A)
        self.calls = []

    def _matmat(self, X):
        self.calls.append(("matmat", X.shape[1]))
        return super()._matmat(X)

    def _rmatmat(self, X):
        self.calls.append(("rmatmat", X.shape[1]))
        return super()._rmatmat(X)


@pytest.mark.parametrize("name", ["numpy", "array_api_strict"])
def test_to_scipy_runs_no_product_to_find_its_dtype_and_one_per_block(name, backend):
    """Building the SciPy operator runs no product (SciPy would probe one to infer a
    missing dtype), keeps float32, and a block of K vectors is one fused product."""
    if backend.name != name:
        pytest.skip("one backend per case")
    rng = np.random.default_rng(3)
    A = rng.normal(size=(4, 3)).astype(np.float32)
    op = _CountingDense(backend.asarray(A))
    S = op.to_scipy()
    assert op.calls == [] and S.dtype == np.float32
    X, Y = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32)
    np.testing.assert_allclose(S.matmat(X), A @ X, rtol=1e-6)
    np.testing.assert_allclose(S.rmatmat(Y), A.T @ Y, rtol=1e-6)
    assert op.calls == [("matmat", 5), ("rmatmat", 2)]


def test_to_cupyx(backend):
    A = np.random.default_rng(4).normal(size=(3, 3))
    op = DenseLinearOperator(backend.asarray(A))
    if backend.name != "cupy":
        with pytest.raises(TypeError, match="CuPy"):
            op.to_cupyx()
        return
    import cupy

    C = op.to_cupyx()
    x = cupy.asarray(np.arange(3.0))
    np.testing.assert_allclose(cupy.asnumpy(C @ x), A @ np.arange(3.0), rtol=1e-12)
    np.testing.assert_allclose(cupy.asnumpy(C.rmatvec(x)), A.T @ np.arange(3.0), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_cupyx_wiring_without_a_gpu(monkeypatch, dtype):
    """``to_cupyx``'s products and dtype, with SciPy standing in for cupyx and NumPy for
    CuPy (the CuPy run above needs a GPU): (2-D) vectors are flattened before matvec."""
    import sys
    import types

    import curvlinops.linalg.base as base

    cupy = types.ModuleType("cupy")
    cupy.ravel, cupy.dtype = np.ravel, np.dtype
    cupyx = types.ModuleType("cupyx")
    cupyx.scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy.sparse = types.ModuleType("cupyx.scipy.sparse")
    cupyx.scipy.sparse.linalg = scipy.sparse.linalg
    for name, module in [
        ("cupy", cupy),
        ("cupyx", cupyx),
        ("cupyx.scipy", cupyx.scipy),
        ("cupyx.scipy.sparse", cupyx.scipy.sparse),
        ("cupyx.scipy.sparse.linalg", scipy.sparse.linalg),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(base, "is_cupy_namespace", lambda xp: True)
    rng = np.random.default_rng(7)
    A = rng.normal(size=(3, 4)).astype(dtype)
    C = DenseLinearOperator(A).to_cupyx()
    x, y, X = rng.normal(size=(4, 1)), rng.normal(size=(3, 1)), rng.normal(size=(4, 2))
    x, y, X = x.astype(dtype), y.astype(dtype), X.astype(dtype)
    assert C.shape == (3, 4) and C.dtype == np.dtype(dtype)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(C.matvec(x).ravel(), (A @ x).ravel(), rtol=rtol)
    np.testing.assert_allclose(C.rmatvec(y).ravel(), (A.T @ y).ravel(), rtol=rtol)
    np.testing.assert_allclose(C.matmat(X), A @ X, rtol=rtol)


_READ_ONLY_INPUTS = """
import warnings
import numpy as np
import torch
from curvlinops import DenseLinearOperator
warnings.simplefilter("error")
S = DenseLinearOperator(torch.eye(3, dtype=torch.float64)).to_scipy()
x = np.arange(3.0)
x.setflags(write=False)
X = np.asfortranarray(np.ones((3, 2)))
X.setflags(write=False)
assert S.matvec(x).tolist() == [0.0, 1.0, 2.0] and S.matmat(X).tolist() == [[1.0, 1.0]] * 3
"""


def test_to_scipy_of_a_torch_operator_takes_read_only_arrays_without_a_warning():
    """SciPy may hand read-only arrays to a product; PyTorch warns about wrapping them
    (once per process: hence a fresh interpreter, with warnings as errors)."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _READ_ONLY_INPUTS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_aslinearoperator_dense(backend, dtype_name):
    rng = np.random.default_rng(5)
    A = rng.normal(size=(4, 3)).astype(dtype_name)
    x = rng.normal(size=3).astype(dtype_name)
    op = aslinearoperator(backend.asarray(A))
    assert isinstance(op, DenseLinearOperator)
    assert namespace_name(op.xp) == backend.name
    assert op.dtype == backend.dtype(dtype_name)
    result = op @ backend.asarray(x)
    rtol, atol = tolerances(dtype_name)
    np.testing.assert_allclose(
        backend.to_numpy(result), A.astype(np.float64) @ x.astype(np.float64), rtol=rtol, atol=atol
    )
    assert aslinearoperator(op) is op


def test_aslinearoperator_scipy():
    rng = np.random.default_rng(6)
    A = rng.normal(size=(4, 3))
    op = aslinearoperator(scipy.sparse.linalg.aslinearoperator(A))
    assert isinstance(op, ScipyLinearOperator) and op.shape == (4, 3)
    X, Y = rng.normal(size=(3, 2)), rng.normal(size=(4, 2))
    np.testing.assert_allclose(op @ X, A @ X, rtol=1e-12)
    np.testing.assert_allclose(op.T @ Y, A.T @ Y, rtol=1e-12)
    np.testing.assert_allclose(op.to_dense(), A, rtol=1e-12)


def test_aslinearoperator_callable(backend):
    A = np.random.default_rng(7).normal(size=(3, 3))
    Ab = backend.asarray(A)
    op = aslinearoperator(
        lambda X: Ab @ X,
        shape=(3, 3),
        xp=backend.xp,
        dtype=backend.dtype("float64"),
        device=backend.device,
    )
    assert isinstance(op, CallableLinearOperator)
    X = np.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose(backend.to_numpy(op @ backend.asarray(X)), A @ X, rtol=1e-12)
    with pytest.raises(NotImplementedError, match="adjoint"):
        op.rmatvec(backend.asarray(np.ones(3)))


def test_callable_matvec_only(backend):
    A = np.random.default_rng(8).normal(size=(3, 2))
    Ab = backend.asarray(A)
    op = CallableLinearOperator(
        (3, 2),
        matvec=lambda x: Ab @ x,
        rmatvec=lambda y: backend.xp.matrix_transpose(Ab) @ y,
        dtype=backend.dtype("float64"),
        xp=backend.xp,
        device=backend.device,
    )
    X, Y = np.ones((2, 4)), np.ones((3, 2))
    np.testing.assert_allclose(backend.to_numpy(op @ backend.asarray(X)), A @ X, rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(op.T @ backend.asarray(Y)), A.T @ Y, rtol=1e-12)


def test_aslinearoperator_errors():
    import array_api_compat.numpy as xp

    with pytest.raises(ValueError, match="shape"):
        aslinearoperator(lambda X: X)
    with pytest.raises(TypeError, match="cannot convert"):
        aslinearoperator("not an operator")
    assert isinstance(aslinearoperator(lambda X: X, shape=(2, 2), xp=xp), LinearOperator)


# -- to_scipy() of operators on other backends: host copies -------------------------------
#
# Curvature operators of PyTorch- and JAX-backed models; the references are dense matrices
# built without curvlinops (torch.func.hessian, jax.hessian, the Jacobian by autodiff).


def _mlp_data(seed=0, n=7, d_in=3, d_out=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d_in)), rng.normal(size=(n, d_out))


def _torch_problem():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    X, y = (torch.from_numpy(a) for a in _mlp_data())
    return torch, net, X, y


def _torch_hessian_reference(torch, net, X, y):
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(t):
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(np.prod(shape))
            params[name] = t[start : start + size].reshape(shape)
            start += size
        return torch.nn.functional.mse_loss(torch.func.functional_call(net, params, (X,)), y)

    return torch.func.hessian(loss)(theta).numpy()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("device", ["cpu", "cpu:0", "torch.device('cpu')", "torch.device('cpu:0')"])
def test_a_torch_device_given_by_name_or_with_an_index_is_the_tensors_device(device):
    """PyTorch tensors report ``cpu`` (``cuda:0``); an operator's device given as the
    string ``"cpu"``, as ``"cpu:0"`` or as a ``torch.device`` is the same device."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as tx

    dev = eval(device, {"torch": torch}) if device.startswith("torch") else device
    op = CallableLinearOperator(
        (3, 3), matmat=lambda X: 2 * X, dtype=torch.float64, xp=tx, device=dev
    )
    x = torch.arange(3.0, dtype=torch.float64)
    np.testing.assert_array_equal((op @ x).numpy(), [0.0, 2.0, 4.0])


def test_to_scipy_torch_hessian_products_eigsh_and_cg():
    pytest.importorskip("torch")
    from curvlinops import HessianLinearOperator, MSELoss
    from curvlinops.frontends.torch import TorchModel

    torch, net, X, y = _torch_problem()
    model = TorchModel(net)
    H = HessianLinearOperator(model, MSELoss(), model.params, [(X[:4], y[:4]), (X[4:], y[4:])])
    reference = _torch_hessian_reference(torch, net, X, y)
    dense = H.to_dense().numpy()
    np.testing.assert_allclose(dense, reference, rtol=1e-10, atol=1e-12)
    S = H.to_scipy()
    assert S.shape == H.shape and S.dtype == np.float64
    rng = np.random.default_rng(1)
    v, V = rng.normal(size=H.shape[1]), rng.normal(size=(H.shape[1], 3))
    np.testing.assert_allclose(S.matvec(v), reference @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.matmat(V), reference @ V, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.rmatvec(v), reference.T @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.matvec(v[:, None]).ravel(), reference @ v, atol=1e-12)
    top = scipy.sparse.linalg.eigsh(S, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(reference)[-2:], rtol=1e-8)
    damped = H.damped(10.0).to_scipy()  # positive definite: the Hessian is small here
    b = rng.normal(size=H.shape[0])
    x, info = scipy.sparse.linalg.cg(damped, b, rtol=1e-12, atol=0.0, maxiter=500)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(reference + 10 * np.eye(len(b)), b), rtol=1e-8)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_to_scipy_torch_jacobian_adjoint_and_float32():
    pytest.importorskip("torch")
    from curvlinops import JacobianLinearOperator, MSELoss
    from curvlinops.frontends.torch import TorchModel

    torch, net, X, y = _torch_problem()
    model = TorchModel(net)
    J = JacobianLinearOperator(model, MSELoss(), model.params, [(X, y)])
    # Independent reference: the Jacobian of the flattened outputs by torch.func.
    names = [n for n, _ in net.named_parameters()]

    def outputs(*ps):
        return torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (X,)).reshape(-1)

    blocks = torch.func.jacrev(outputs, argnums=tuple(range(len(names))))(*model.params)
    reference = torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1).numpy()
    S = J.to_scipy()
    rng = np.random.default_rng(2)
    u, U = rng.normal(size=J.shape[0]), rng.normal(size=(J.shape[0], 2))
    np.testing.assert_allclose(S.rmatvec(u), reference.T @ u, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.rmatmat(U), reference.T @ U, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.H @ U, reference.T @ U, rtol=1e-10, atol=1e-12)
    svals = scipy.sparse.linalg.svds(S, k=2, return_singular_vectors=False)
    np.testing.assert_allclose(
        np.sort(svals), np.linalg.svd(reference, compute_uv=False)[:2][::-1], rtol=1e-8
    )
    # float32 operators give float32 SciPy operators; float32 inputs come back float32.
    A32 = DenseLinearOperator(torch.from_numpy(reference.astype(np.float32)))
    S32 = A32.to_scipy()
    v = rng.normal(size=J.shape[1]).astype(np.float32)
    assert S32.dtype == np.float32 and (S32 @ v).dtype == np.float32
    np.testing.assert_allclose(S32 @ v, reference @ v, rtol=1e-4, atol=1e-5)


def test_to_scipy_jax_hessian_products_eigsh_and_cg():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from curvlinops import HessianLinearOperator, MSELoss
    from curvlinops.frontends.jax import JaxModel

    if not jax.config.jax_enable_x64:
        pytest.skip("needs jax_enable_x64 (set by tests/conftest.py)")

    def f(p, x):
        return jnp.tanh(x @ p[0].T + p[1]) @ p[2].T

    rng = np.random.default_rng(3)
    p0 = [jnp.asarray(rng.normal(size=s)) for s in [(4, 3), (4,), (2, 4)]]
    Xn, yn = _mlp_data(seed=4)
    X, y = jnp.asarray(Xn), jnp.asarray(yn)
    model = JaxModel(f, p0)
    H = HessianLinearOperator(model, MSELoss(), model.params, [(X[:3], y[:3]), (X[3:], y[3:])])
    shapes = [p.shape for p in model.params]

    def loss(theta):
        ps, start = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            ps.append(theta[start : start + size].reshape(shape))
            start += size
        return jnp.mean((f(ps, X) - y) ** 2)

    theta = jnp.concatenate([p.reshape(-1) for p in model.params])
    reference = np.asarray(jax.hessian(loss)(theta))
    S = H.to_scipy()
    v, V = rng.normal(size=H.shape[1]), rng.normal(size=(H.shape[1], 2))
    np.testing.assert_allclose(S.matvec(v), reference @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.matmat(V), reference @ V, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.rmatvec(v), reference.T @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(H.to_dense()), reference, rtol=1e-10, atol=1e-12)
    result = S @ v
    assert type(result) is np.ndarray and result.flags.writeable  # not a JAX buffer view
    top = scipy.sparse.linalg.eigsh(S, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), np.linalg.eigvalsh(reference)[-2:], rtol=1e-8)
    b = rng.normal(size=H.shape[0])
    x, info = scipy.sparse.linalg.cg(H.damped(10.0).to_scipy(), b, rtol=1e-12, atol=0.0)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(reference + 10 * np.eye(len(b)), b), rtol=1e-8)
