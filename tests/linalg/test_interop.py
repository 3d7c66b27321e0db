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


def test_to_scipy_rejects_other_namespaces(backend):
    op = DenseLinearOperator(backend.asarray(np.eye(3)))
    if backend.name == "numpy":
        assert op.to_scipy().shape == (3, 3)
    else:
        with pytest.raises(TypeError, match="NumPy"):
            op.to_scipy()


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
