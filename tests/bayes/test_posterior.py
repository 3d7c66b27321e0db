"""Gaussian posteriors: covariance factors of every structure, and samples' moments.

References: dense NumPy inverses of the precisions (``np.linalg.inv`` of their dense
forms, which the structured operators build from their parts, e.g. ``np.kron`` of the
factors); samples checked in expectation (``monte_carlo.assert_unbiased``: mean and
second moments within a variance-derived bound, with the power to see a 10 % error).
"""

from __future__ import annotations

import numpy as np
import pytest
from bayes_problems import classifier
from monte_carlo import assert_unbiased

from curvlinops import (
    BlockDiagonalLinearOperator,
    CallableLinearOperator,
    CrossEntropyLoss,
    DenseLinearOperator,
    DiagonalLinearOperator,
    DiagonalPlusLowRankLinearOperator,
    EighLinearOperator,
    FactorizationError,
    IdentityLinearOperator,
    KroneckerEighLinearOperator,
    KroneckerLinearOperator,
    ParameterLayoutLinearOperator,
    to_numpy,
)
from curvlinops.bayes import GaussianPosterior, Laplace, covariance_factor


def spd(n, seed, shift=0.5):
    B = np.random.default_rng(seed).normal(size=(n, n))
    return B @ B.T / n + shift * np.eye(n)


def orthonormal(n, k, seed):
    Q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, k)))
    return Q


def precisions(b):
    """``name -> (operator, dense)`` for the structures covariance_factor knows."""
    A, B, C = spd(3, 0), spd(2, 1), spd(4, 2)
    d = np.array([0.5, 2.0, 1.5, 3.0])
    lam = np.random.default_rng(3).uniform(0.5, 2.0, size=6)
    Q1, Q2 = orthonormal(3, 3, 4), orthonormal(2, 2, 5)
    U = np.random.default_rng(6).normal(size=(4, 2))
    Q = orthonormal(5, 2, 7)
    kron = KroneckerLinearOperator(
        DenseLinearOperator(b.asarray(A), symmetric=True),
        DiagonalLinearOperator(b.asarray(np.array([1.0, 2.5]))),
    )
    layout = [[(0, (2, 2))], [(4, 2)]]  # a 2x2 "weight" and a bias of 2, reordered
    out = {
        "dense": (DenseLinearOperator(b.asarray(C), symmetric=True), C),
        "diagonal": (DiagonalLinearOperator(b.asarray(d)), np.diag(d)),
        "identity": (
            IdentityLinearOperator(3, xp=b.xp, dtype=b.xp.float64, device=b.device) * 2.0,
            2 * np.eye(3),
        ),  # fmt: skip
        "kronecker": (kron, np.kron(A, np.diag([1.0, 2.5]))),
        "kronecker damped and scaled": (
            (3.0 * kron).damped(0.2),
            3 * np.kron(A, np.diag([1.0, 2.5])) + 0.2 * np.eye(6),
        ),
        "kronecker eigh": (
            KroneckerEighLinearOperator(b.asarray(lam), [b.asarray(Q1), b.asarray(Q2)]),
            np.kron(Q1, Q2) @ np.diag(lam) @ np.kron(Q1, Q2).T,
        ),
        "low rank damped": (
            EighLinearOperator(b.asarray(np.array([4.0, 1.0])), b.asarray(Q)).damped(0.3),
            Q @ np.diag([4.0, 1.0]) @ Q.T + 0.3 * np.eye(5),
        ),
        "eigh full rank": (
            EighLinearOperator(b.asarray(lam[:3]), b.asarray(Q1)),
            Q1 @ np.diag(lam[:3]) @ Q1.T,
        ),
        "diagonal plus low rank": (
            DiagonalPlusLowRankLinearOperator(
                b.asarray(d), b.asarray(np.array([2.0, 0.7])), b.asarray(U)
            ),
            np.diag(d) + U @ np.diag([2.0, 0.7]) @ U.T,
        ),
        "block diagonal": (
            BlockDiagonalLinearOperator(
                [
                    DenseLinearOperator(b.asarray(B), symmetric=True),
                    DiagonalLinearOperator(b.asarray(d)),
                ]
            ),  # fmt: skip
            np.block([[B, np.zeros((2, 4))], [np.zeros((4, 2)), np.diag(d)]]),
        ),
    }
    inner = BlockDiagonalLinearOperator(
        [DenseLinearOperator(b.asarray(C), symmetric=True), DiagonalLinearOperator(
            b.asarray(np.array([1.0, 3.0])))]
    )  # fmt: skip
    op = ParameterLayoutLinearOperator(inner, layout)
    out["parameter layout"] = (op, to_numpy(op.to_dense()))
    return out


NAMES = [
    "dense",
    "diagonal",
    "identity",
    "kronecker",
    "kronecker damped and scaled",
    "kronecker eigh",
    "low rank damped",
    "eigh full rank",
    "diagonal plus low rank",
    "block diagonal",
    "parameter layout",
]


@pytest.mark.parametrize("name", NAMES)
def test_covariance_factor_squares_to_the_inverse(backend, name):
    op, dense = precisions(backend)[name]
    np.testing.assert_allclose(to_numpy(op.to_dense()), dense, rtol=1e-12, atol=1e-12)
    R = to_numpy(covariance_factor(op).to_dense())
    np.testing.assert_allclose(R @ R.T, np.linalg.inv(dense), rtol=1e-10, atol=1e-12)
    shifted = to_numpy(covariance_factor(op, 0.4).to_dense())
    np.testing.assert_allclose(
        shifted @ shifted.T, np.linalg.inv(dense + 0.4 * np.eye(len(dense))), rtol=1e-10, atol=1e-12
    )


def test_covariance_factor_of_curvature_operators_and_unknown_ones(numpy_backend):
    import array_api_compat.numpy as xp

    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    model, params, X, y, _ = classifier(widths=(2, 3, 2), seed=0, N=12)
    for cls in (KFACLinearOperator, EKFACLinearOperator):
        K = cls(model, CrossEntropyLoss(), params, [(X, y)])
        for precision in (K.damped(0.1), 2.0 * K.damped(0.1)):
            R = covariance_factor(precision).to_dense()
            np.testing.assert_allclose(
                R @ R.T, np.linalg.inv(precision.to_dense()), rtol=1e-9, atol=1e-12
            )
        R = covariance_factor(K, 0.1).to_dense()
        expected = np.linalg.inv(K.to_dense() + 0.1 * np.eye(K.shape[0]))
        np.testing.assert_allclose(R @ R.T, expected, rtol=1e-9)
    # an operator of no known structure: densified and factored (small)
    A = spd(5, 9)
    unknown = CallableLinearOperator((5, 5), matmat=lambda V: A @ V, dtype=xp.float64, xp=xp,
                                     symmetric=True)  # fmt: skip
    R = covariance_factor(unknown).to_dense()
    np.testing.assert_allclose(R @ R.T, np.linalg.inv(A), rtol=1e-10)
    big = CallableLinearOperator((5000, 5000), matmat=lambda V: V, dtype=xp.float64, xp=xp,
                                 symmetric=True)  # fmt: skip
    with pytest.raises(NotImplementedError, match="knows no square root"):
        covariance_factor(big)
    with pytest.raises(FactorizationError, match="not positive definite"):
        covariance_factor(DiagonalLinearOperator(np.array([1.0, -1.0])))
    with pytest.raises(FactorizationError, match="not positive definite"):
        covariance_factor(DenseLinearOperator(-np.eye(2), symmetric=True))
    with pytest.raises(FactorizationError, match="singular"):
        covariance_factor(EighLinearOperator(np.array([1.0]), np.array([[1.0], [0.0]])))
    with pytest.raises(FactorizationError, match="positive scale"):
        covariance_factor(-1.0 * DiagonalLinearOperator(np.ones(2)))


def second_moments(samples, mean):
    centred = samples - mean[None, :]
    return centred[:, :, None] * centred[:, None, :]


@pytest.mark.parametrize("name", ["kronecker damped and scaled", "diagonal plus low rank",
                                  "parameter layout", "low rank damped"])  # fmt: skip
def test_samples_have_the_posterior_moments(backend, name):
    op, dense = precisions(backend)[name]
    n = dense.shape[0]
    mean = np.linspace(-1.0, 2.0, n)
    posterior = GaussianPosterior(backend.asarray(mean), op)
    samples = to_numpy(posterior.sample(15000, seed=1))
    assert samples.shape == (15000, n)
    covariance = np.linalg.inv(dense)
    assert_unbiased(samples, mean)
    assert_unbiased(second_moments(samples, mean), covariance)
    again = to_numpy(posterior.sample(15000, seed=1))
    np.testing.assert_array_equal(samples, again)
    np.testing.assert_allclose(
        to_numpy(posterior.covariance.to_dense()), covariance, rtol=1e-10, atol=1e-12
    )
    logdet = np.linalg.slogdet(dense)[1]
    np.testing.assert_allclose(posterior.log_det_precision(), logdet, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "structure, kwargs",
    [("full", {}), ("diag", {}), ("kron", {}), ("ekfac", {}), ("lowrank", {"rank": 4}),
     ("diag_lowrank", {"rank": 4})],
)  # fmt: skip
def test_laplace_samples_have_the_posterior_moments(numpy_backend, structure, kwargs):
    model, params, X, y, _ = classifier(widths=(2, 3, 2), seed=0, N=12)
    la = Laplace(model, CrossEntropyLoss(), params, [(X, y)], structure=structure,
                 prior_precision=[0.5, 1.0, 2.0, 4.0], **kwargs)  # fmt: skip
    mean = la.mean
    samples = la.sample(15000, seed=2)
    covariance = np.linalg.inv(la.precision.to_dense())
    assert_unbiased(samples, mean)
    assert_unbiased(second_moments(samples, mean), covariance)


def test_float32_samples(backend):
    op = DiagonalLinearOperator(backend.asarray(np.array([1.0, 4.0]), "float32"))
    posterior = GaussianPosterior(backend.asarray(np.zeros(2), "float32"), op)
    samples = posterior.sample(40000, seed=0)
    assert str(samples.dtype).endswith("float32")
    assert_unbiased(to_numpy(samples) ** 2, np.array([1.0, 0.25]))


def test_gaussian_posterior_errors(numpy_backend):
    op = DiagonalLinearOperator(np.ones(3))
    with pytest.raises(ValueError, match=r"flat vector \(P,\)"):
        GaussianPosterior(np.zeros((3, 1)), op)
    with pytest.raises(TypeError, match="precision must be a curvlinops LinearOperator"):
        GaussianPosterior(np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"has shape \(3, 3\) but the mean has 2 entries"):
        GaussianPosterior(np.zeros(2), op)
    with pytest.raises(TypeError, match="dtype"):
        GaussianPosterior(np.zeros(3, dtype=np.float32), op)
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        GaussianPosterior(np.zeros(3), op).sample(0)
