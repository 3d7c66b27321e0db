"""Tests of the iterative inverse operators: CG, MINRES and truncated Neumann series.

References: numpy.linalg.solve / inv, and the truncated Neumann series summed
explicitly with dense NumPy matrix powers.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from curvlinops import (
    AssumptionWarning,
    CGInverseLinearOperator,
    ConvergenceError,
    ConvergenceWarning,
    LinearOperator,
    MINRESInverseLinearOperator,
    NeumannInverseLinearOperator,
    aslinearoperator,
)

N, K = 30, 4  # one size and batch width: JAX compiles each primitive once per shape


def sym_from_spectrum(w, seed):
    """Symmetric matrix ``Q diag(w) Q^T`` with a random orthogonal ``Q``."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(w), len(w))))
    A = (Q * np.asarray(w)) @ Q.T
    return (A + A.T) / 2


def truncated_series(A, b, num_terms, scale, M=None):
    """``scale * sum_{j < num_terms} (I - scale M A)^j M b``, term by term in NumPy."""
    M = np.eye(len(A)) if M is None else M
    T = np.eye(len(A)) - scale * M @ A
    term = scale * M @ b
    total = np.zeros_like(term)
    for _ in range(num_terms):
        total = total + term
        term = T @ term
    return total


def test_cg_inverse_matches_solve(backend, dtype_name):
    A = sym_from_spectrum(np.geomspace(1.0, 100.0, N), seed=0)
    B = np.random.default_rng(1).standard_normal((N, K))
    rtol = {"float64": 1e-12, "float32": 1e-5}[dtype_name]
    op = aslinearoperator(backend.asarray(A, dtype_name), psd=True)
    Ainv = CGInverseLinearOperator(op, rtol=rtol)
    assert isinstance(Ainv, LinearOperator) and Ainv.is_symmetric and Ainv.shape == (N, N)
    assert Ainv.last_info is None
    X = backend.to_numpy(Ainv @ backend.asarray(B, dtype_name))
    exact = np.linalg.solve(A, B)
    cond = 100.0
    tol = {"float64": 2 * cond * rtol, "float32": 1e-3}[dtype_name]
    assert np.linalg.norm(X - exact) <= tol * np.linalg.norm(exact)
    info = Ainv.last_info
    assert info.reason == ["converged"] * K and info.converged.all()
    # A matvec is a one-column solve; the adjoint is the operator itself.
    x = backend.to_numpy(Ainv.T @ backend.asarray(B[:, 0], dtype_name))
    assert x.shape == (N,)
    assert np.linalg.norm(x - exact[:, 0]) <= tol * np.linalg.norm(exact[:, 0])
    assert Ainv.last_info.iterations.shape == (1,)


def test_cg_inverse_options_damping_and_preconditioner(backend):
    w = np.concatenate([np.zeros(3), np.geomspace(1.0, 100.0, N - 3)])  # singular PSD
    A = sym_from_spectrum(w, seed=2)
    B = np.random.default_rng(3).standard_normal((N, K))
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    M = np.diag(1.0 / (np.diag(A) + 0.1))
    Ainv = CGInverseLinearOperator(op, rtol=1e-12, damping=0.1, M=backend.asarray(M))
    X = backend.to_numpy(Ainv @ backend.asarray(B))
    np.testing.assert_allclose(X, np.linalg.solve(A + 0.1 * np.eye(N), B), rtol=1e-7, atol=1e-9)


def test_cg_inverse_strict_and_last_info(backend):
    A = sym_from_spectrum(np.geomspace(1.0, 1e3, N), seed=4)
    B = np.random.default_rng(5).standard_normal((N, K))
    op = aslinearoperator(backend.asarray(A), psd=True)
    lenient = CGInverseLinearOperator(op, rtol=1e-12, maxiter=2)
    with pytest.warns(ConvergenceWarning, match=r"did not converge for 4 of 4 columns.*maxiter"):
        X = lenient @ backend.asarray(B)
    assert X.shape == (N, K)
    assert lenient.last_info.reason == ["maxiter"] * K
    assert not lenient.last_info.converged.any()
    strict = CGInverseLinearOperator(op, rtol=1e-12, maxiter=2, strict=True)
    with pytest.raises(ConvergenceError, match="did not converge.*maxiter"):
        strict @ backend.asarray(B)
    assert strict.last_info.reason == ["maxiter"] * K
    CGInverseLinearOperator(op, rtol=1e-10, strict=True) @ backend.asarray(B)


def test_minres_inverse_on_indefinite(backend, dtype_name):
    w = np.concatenate([-np.linspace(1.0, 10.0, 10), np.linspace(1.0, 10.0, N - 10)])
    A = sym_from_spectrum(w, seed=6)
    B = np.random.default_rng(7).standard_normal((N, K))
    rtol = {"float64": 1e-12, "float32": 1e-5}[dtype_name]
    op = aslinearoperator(backend.asarray(A, dtype_name), symmetric=True)
    Ainv = MINRESInverseLinearOperator(op, rtol=rtol)
    X = backend.to_numpy(Ainv @ backend.asarray(B, dtype_name))
    exact = np.linalg.solve(A, B)
    tol = {"float64": 20 * rtol, "float32": 1e-3}[dtype_name]
    assert np.linalg.norm(X - exact) <= tol * np.linalg.norm(exact)
    assert Ainv.last_info.converged.all()
    # CG's positive-definiteness assumption fails here: it reports the curvature.
    with pytest.warns(AssumptionWarning, match="only declared symmetric"):
        cg_inverse = CGInverseLinearOperator(op, rtol=rtol)
    with pytest.warns(ConvergenceWarning, match="negative_curvature.*add damping"):
        cg_inverse @ backend.asarray(B, dtype_name)
    assert "negative_curvature" in cg_inverse.last_info.reason
    with pytest.warns(AssumptionWarning):
        strict = CGInverseLinearOperator(op, strict=True)
    with pytest.raises(ConvergenceError, match="negative_curvature.*add damping"):
        strict @ backend.asarray(B, dtype_name)


@pytest.mark.parametrize("num_terms", [1, 2, 7, 40])
def test_neumann_equals_truncated_series(backend, num_terms):
    w = np.linspace(0.2, 3.5, N)  # spectrum inside (0, 2 / scale)
    scale = 0.5
    A = sym_from_spectrum(w, seed=8)
    B = np.random.default_rng(9).standard_normal((N, K))
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    Ainv = NeumannInverseLinearOperator(op, num_terms=num_terms, scale=scale)
    assert Ainv.is_symmetric
    X = backend.to_numpy(Ainv @ backend.asarray(B))
    np.testing.assert_allclose(X, truncated_series(A, B, num_terms, scale), rtol=1e-12, atol=1e-13)
    # The error is what the series predicts: -(I - s A)^m A^{-1} b.
    exact = np.linalg.solve(A, B)
    predicted = -np.linalg.matrix_power(np.eye(N) - scale * A, num_terms) @ exact
    np.testing.assert_allclose(X - exact, predicted, rtol=1e-10, atol=1e-12)
    x = backend.to_numpy(Ainv @ backend.asarray(B[:, 0]))
    np.testing.assert_allclose(x, X[:, 0], rtol=1e-12)


def test_neumann_approximates_inverse_with_enough_terms(backend):
    w = np.linspace(0.5, 3.0, N)
    A = sym_from_spectrum(w, seed=10)
    scale = 1.0 / 3.0  # contraction factor max |1 - s w| = 5/6
    Ainv = NeumannInverseLinearOperator(aslinearoperator(backend.asarray(A)), 200, scale)
    X = backend.to_numpy(Ainv @ backend.asarray(np.eye(N)))
    bound = (5.0 / 6.0) ** 200 * np.linalg.norm(np.linalg.inv(A), 2)
    assert np.linalg.norm(X - np.linalg.inv(A), 2) <= 1.01 * bound + 1e-12


def test_neumann_preconditioned(backend):
    C = sym_from_spectrum(np.linspace(0.5, 1.5, N), seed=11)
    d = np.geomspace(1.0, 100.0, N)
    A = d[:, None] * C * d[None, :]  # badly scaled: the plain series would need tiny steps
    M = np.diag(1.0 / np.diag(A))
    B = np.random.default_rng(12).standard_normal((N, K))
    Ainv = NeumannInverseLinearOperator(
        aslinearoperator(backend.asarray(A), symmetric=True),
        num_terms=25,
        scale=0.8,
        M=aslinearoperator(backend.asarray(M), symmetric=True),
    )
    assert Ainv.is_symmetric
    X = backend.to_numpy(Ainv @ backend.asarray(B))
    np.testing.assert_allclose(X, truncated_series(A, B, 25, 0.8, M), rtol=1e-11, atol=1e-14)
    assert np.max(np.abs(np.linalg.eigvals(np.eye(N) - 0.8 * M @ A))) < 1  # it converges
    # The symmetric result equals its adjoint product.
    Xt = backend.to_numpy(Ainv.rmatmat(backend.asarray(B)))
    np.testing.assert_allclose(Xt, X, rtol=1e-12)


def test_neumann_nonsymmetric_adjoint(backend):
    rng = np.random.default_rng(13)
    A = np.eye(N) + 0.1 * rng.standard_normal((N, N)) / np.sqrt(N)
    M = np.diag(rng.uniform(0.8, 1.2, N)) + 0.01 * rng.standard_normal((N, N))
    Ainv = NeumannInverseLinearOperator(
        aslinearoperator(backend.asarray(A)), 6, 0.9, M=backend.asarray(M)
    )
    assert not Ainv.is_symmetric
    dense = truncated_series(A, np.eye(N), 6, 0.9, M)
    B = rng.standard_normal((N, K))
    np.testing.assert_allclose(
        backend.to_numpy(Ainv @ backend.asarray(B)), dense @ B, rtol=1e-11, atol=1e-13
    )
    np.testing.assert_allclose(
        backend.to_numpy(Ainv.T @ backend.asarray(B)), dense.T @ B, rtol=1e-11, atol=1e-13
    )


@pytest.mark.parametrize("cls", [CGInverseLinearOperator, MINRESInverseLinearOperator])
def test_krylov_inverse_is_psd_exactly_when_its_damped_operator_is(cls):
    """``(A + d I)^{-1}`` is PSD for a PSD ``A`` and ``d >= 0`` (``d = 0`` included),
    not declared so for a negative shift (MINRES allows one) or an undeclared ``A``."""
    A = sym_from_spectrum(np.linspace(1.0, 2.0, N), seed=3)
    psd = aslinearoperator(A, psd=True)
    assert cls(psd).is_psd and cls(psd, damping=0.0).is_psd and cls(psd, damping=0.5).is_psd
    assert not cls(aslinearoperator(A, symmetric=True), damping=0.5).is_psd
    if cls is MINRESInverseLinearOperator:
        assert not cls(psd, damping=-0.5).is_psd


def test_cg_inverse_names_itself_when_a_psd_declaration_is_wrong():
    A = aslinearoperator(np.diag([1.0, -1.0]), psd=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CGInverseLinearOperator(A) @ np.ones(2)
    assert str(caught[0].message) == (
        "CGInverseLinearOperator: the DenseLinearOperator is declared positive "
        "semi-definite, but CG met a direction p with p^T (A + damping I) p <= 0. Either the "
        "declaration is wrong (check it with curvlinops.verify.check_psd), or A is singular "
        "and rounding made it look indefinite: add damping > 0."
    )
    assert str(caught[1].message).startswith("CGInverseLinearOperator: CG did not converge")


def test_neumann_nonsymmetric_without_preconditioner(backend):
    """Without ``M`` the adjoint is the series of ``A^T`` alone, on ``A``'s device."""
    rng = np.random.default_rng(14)
    A = np.eye(N) + 0.2 * rng.standard_normal((N, N)) / np.sqrt(N)
    op = aslinearoperator(backend.asarray(A))
    Ainv = NeumannInverseLinearOperator(op, 5, 0.7)
    assert not Ainv.is_symmetric
    assert Ainv.device == op.device
    dense = truncated_series(A, np.eye(N), 5, 0.7)
    B = rng.standard_normal((N, K))
    Xt = backend.to_numpy(Ainv.rmatmat(backend.asarray(B)))
    np.testing.assert_allclose(Xt, dense.T @ B, rtol=1e-11, atol=1e-13)
    xt = backend.to_numpy(Ainv.rmatvec(backend.asarray(B[:, 0])))
    np.testing.assert_allclose(xt, dense.T @ B[:, 0], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize(
    "make",
    [
        lambda A, **kw: CGInverseLinearOperator(A, **kw),
        lambda A, **kw: MINRESInverseLinearOperator(A, **kw),
        lambda A, **kw: NeumannInverseLinearOperator(A, 3, 0.5, **kw),
    ],
    ids=["cg", "minres", "neumann"],
)
@pytest.mark.filterwarnings("ignore::curvlinops.AssumptionWarning")  # raw arrays: PSD not declared
def test_inverse_operators_bad_inputs(numpy_backend, make):
    with pytest.raises(ValueError, match=r"square.*\(4, 3\)"):
        make(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(3, 3\)"):
        make(np.eye(4), M=np.eye(3))
    with pytest.raises(TypeError, match="dtype"):
        make(np.eye(4), M=np.eye(4, dtype=np.float32))
    op = make(np.eye(4))
    with pytest.raises(ValueError, match=r"\(4, k\).*\(3, 2\)"):
        op @ np.ones((3, 2))
    if not isinstance(op, NeumannInverseLinearOperator):
        with pytest.raises(ValueError, match="NaN or Inf"):
            op @ np.array([1.0, np.nan, 0.0, 0.0])


def test_neumann_bad_parameters(numpy_backend):
    with pytest.raises(ValueError, match="num_terms"):
        NeumannInverseLinearOperator(np.eye(3), 0, 0.5)
    with pytest.raises(TypeError, match="num_terms"):
        NeumannInverseLinearOperator(np.eye(3), 2.0, 0.5)
    with pytest.raises(ValueError, match="scale"):
        NeumannInverseLinearOperator(np.eye(3), 2, 0.0)
    with pytest.raises(ValueError, match="scale"):
        NeumannInverseLinearOperator(np.eye(3), 2, float("nan"))


def test_negative_damping_cg_inverse_refuses_minres_inverse_solves(numpy_backend):
    """The issue's case: a PSD operator with damping -1e6 is indefinite. The CG inverse
    refuses the negative damping (instead of returning CG's partial solve, zeros); the
    MINRES inverse solves it as numpy.linalg.solve does."""
    A = sym_from_spectrum(np.linspace(1.0, 3.0e6, N), seed=21)
    op = aslinearoperator(A, psd=True)
    with pytest.raises(ValueError, match="damping must be >= 0.*MINRESInverseLinearOperator"):
        CGInverseLinearOperator(op, damping=-1e6)
    B = np.random.default_rng(22).standard_normal((N, K))
    shifted = A - 1e6 * np.eye(N)
    assert np.linalg.eigvalsh(shifted)[0] < 0 < np.linalg.eigvalsh(shifted)[-1]
    Ainv = MINRESInverseLinearOperator(op, damping=-1e6, rtol=1e-12, maxiter=20 * N)
    X = Ainv @ B
    exact = np.linalg.solve(shifted, B)
    assert np.linalg.norm(X - exact) <= 1e-8 * np.linalg.norm(exact)
    # a non-negative damping is CG's domain
    X = CGInverseLinearOperator(op, damping=1.0, rtol=1e-12) @ B
    np.testing.assert_allclose(X, np.linalg.solve(A + np.eye(N), B), rtol=1e-8, atol=1e-14)


def test_cg_inverse_uses_its_preconditioner(numpy_backend):
    """With the exact inverse as preconditioner, preconditioned CG converges in one
    iteration per column; unpreconditioned CG on the same system needs many more."""
    A = sym_from_spectrum(np.geomspace(1.0, 1e4, N), seed=4)
    B = np.random.default_rng(5).standard_normal((N, K))
    op = aslinearoperator(A, psd=True)
    exact = CGInverseLinearOperator(op, rtol=1e-10, M=np.linalg.inv(A))
    np.testing.assert_allclose(exact @ B, np.linalg.solve(A, B), rtol=1e-8)
    assert np.all(np.asarray(exact.last_info.iterations) == 1)
    plain = CGInverseLinearOperator(op, rtol=1e-10)
    _ = plain @ B
    assert np.all(np.asarray(plain.last_info.iterations) > 5)
