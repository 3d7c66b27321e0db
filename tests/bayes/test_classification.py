"""Laplace approximations of classifiers against dense Laplace approximations built apart.

References (``bayes_problems``): the network written again in PyTorch as a function of
the flat parameters, its MAP from SciPy's L-BFGS, the Hessian from
``torch.func.hessian``, the GGN and the predictive's Jacobians from ``torch.func.jacrev``,
the empirical Fisher from per-datum gradients (``torch.func.vmap``); the evidence and
its maximizer densely (``slogdet``, SciPy's BFGS).

- Logistic regression (a linear classifier): Hessian = GGN, so the full Laplace with
  either equals the dense one; its predictive (moments, probit) and tuned priors too.
- A tanh MLP at its MAP: the full Hessian, GGN and empirical Fisher, and the diagonal
  of each, against the dense references; for K-FAC, EKFAC and the low-rank structures
  the posterior algebra (precision, covariance, log-determinant, evidence, tuned
  priors) against dense linear algebra on the structure's own matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
from bayes_problems import classifier, dense_log_evidence, per_entry
from scipy import optimize

from curvlinops import CrossEntropyLoss, to_numpy
from curvlinops.bayes import Laplace

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def logistic():
    return classifier(widths=(3, 3), seed=1, N=50, prior=1.0)


@pytest.fixture(scope="module")
def mlp():
    return classifier(widths=(2, 4, 3), seed=0, N=40, prior=1.0)


def laplace(backend, problem, dtype="float64", **kwargs):
    model, params, X, y, _ = problem
    params = [backend.asarray(p, dtype) for p in params]
    data = [(backend.asarray(X, dtype), backend.asarray(y))]
    return Laplace(model, CrossEntropyLoss(), params, data, **kwargs)


def flat(params):
    return np.concatenate([np.ravel(p) for p in params])


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_logistic_regression_equals_the_dense_laplace(backend, logistic, curvature):
    model, params, X, y, ref = logistic
    H = ref.hessian(params, X, y)
    np.testing.assert_allclose(H, ref.ggn(params, X), atol=1e-10)  # linear: H = GGN
    prior = [0.7, 2.0]
    delta = per_entry(prior, ref.shapes)
    la = laplace(backend, logistic, structure="full", curvature=curvature, prior_precision=prior)
    A = H + np.diag(delta)
    np.testing.assert_allclose(to_numpy(la.precision.to_dense()), A, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        to_numpy(la.covariance.to_dense()), np.linalg.inv(A), rtol=1e-10, atol=1e-12
    )
    theta = flat(params)
    expected = dense_log_evidence(ref.log_likelihood(params, X, y), theta, H, delta)
    np.testing.assert_allclose(la.log_marginal_likelihood(), expected, rtol=1e-10)
    # the predictive: moments J Sigma J^T and the probit formula, written out here
    X_test = np.random.default_rng(7).normal(size=(6, 3))
    J = ref.jacobians(params, X_test)
    f_var = np.einsum("ncp,pq,ndq->ncd", J, np.linalg.inv(A), J)
    f_mean = ref.outputs(params, X_test)
    mean, var = la.functional_variance(backend.asarray(X_test), batch_size=4)  # two batches
    np.testing.assert_allclose(to_numpy(mean), f_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(var), f_var, rtol=1e-9, atol=1e-12)
    scaled = f_mean / np.sqrt(1 + np.pi / 8 * np.diagonal(f_var, axis1=1, axis2=2))
    probit = np.exp(scaled) / np.exp(scaled).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(to_numpy(la.predictive(backend.asarray(X_test))), probit, rtol=1e-10)


def test_logistic_regression_tuned_priors_maximize_the_dense_evidence(numpy_backend, logistic):
    model, params, X, y, ref = logistic
    H, theta = ref.hessian(params, X, y), flat(params)
    log_lik = ref.log_likelihood(params, X, y)

    def negative(t):
        return -dense_log_evidence(log_lik, theta, H, per_entry(np.exp(t), ref.shapes))

    la = laplace(numpy_backend, logistic, structure="full")
    scalar = optimize.minimize_scalar(lambda t: negative([t, t]), bracket=(-2, 2), tol=1e-12)
    np.testing.assert_allclose(np.log(la.optimize_prior_precision("scalar")), scalar.x, atol=1e-6)
    layerwise = optimize.minimize(negative, np.zeros(2), method="BFGS", options={"gtol": 1e-10})
    tuned = la.optimize_prior_precision("layerwise")
    np.testing.assert_allclose(np.log(tuned), layerwise.x, atol=1e-6)
    np.testing.assert_allclose(la.log_marginal_likelihood(), -layerwise.fun, rtol=1e-12)


REFERENCES = {
    "hessian": lambda ref, p, X, y: ref.hessian(p, X, y),
    "ggn": lambda ref, p, X, y: ref.ggn(p, X),
    "ef": lambda ref, p, X, y: ref.empirical_fisher(p, X, y),
}


@pytest.mark.parametrize("curvature", sorted(REFERENCES))
@pytest.mark.parametrize("structure", ["full", "diag"])
def test_mlp_full_and_diagonal_equal_the_dense_references(backend, mlp, structure, curvature):
    model, params, X, y, ref = mlp
    H = REFERENCES[curvature](ref, params, X, y)
    if structure == "diag":
        H = np.diag(np.diag(H))
    prior = [0.5, 1.0, 2.0, 4.0]
    delta = per_entry(prior, ref.shapes)
    la = laplace(backend, mlp, structure=structure, curvature=curvature, prior_precision=prior)
    np.testing.assert_allclose(
        to_numpy(la.precision.to_dense()), H + np.diag(delta), rtol=1e-9, atol=1e-10
    )
    expected = dense_log_evidence(ref.log_likelihood(params, X, y), flat(params), H, delta)
    np.testing.assert_allclose(la.log_marginal_likelihood(), expected, rtol=1e-10)


def test_mlp_full_rank_nystrom_equals_the_dense_ggn(numpy_backend, mlp):
    model, params, X, y, ref = mlp
    G = ref.ggn(params, X)
    P = G.shape[0]
    la = laplace(numpy_backend, mlp, structure="lowrank", rank=P, low_rank_method="nystrom")
    np.testing.assert_allclose(la.precision.to_dense(), G + np.eye(P), rtol=1e-9, atol=1e-9)


STRUCTURED = [
    ("kron", "ggn", {}),
    ("kron", "ef", {}),
    ("ekfac", "ggn", {}),
    ("lowrank", "ggn", {"rank": 5}),
    ("lowrank", "ef", {"rank": 5, "low_rank_method": "nystrom"}),
    ("diag_lowrank", "ggn", {"rank": 5}),
    ("diag_lowrank", "ef", {"rank": 5, "low_rank_method": "lanczos"}),
]


def structure_curvature(la):
    """The structure's own curvature ``s H`` densely: the precision minus its prior."""
    delta = la.prior_precision
    dense = to_numpy(la.precision.to_dense())
    return dense - np.diag(per_entry(delta, [p.shape for p in la.params]))


@pytest.mark.parametrize("structure, curvature, kwargs", STRUCTURED)
def test_structured_posteriors_obey_dense_linear_algebra(
    backend, mlp, structure, curvature, kwargs
):
    model, params, X, y, ref = mlp
    prior = [0.5, 1.0, 2.0, 4.0]
    la = laplace(
        backend, mlp, structure=structure, curvature=curvature, prior_precision=prior, **kwargs
    )
    H = structure_curvature(la)
    np.testing.assert_allclose(H, H.T, atol=1e-12)
    theta = flat(params)
    log_lik = ref.log_likelihood(params, X, y)
    for values in (prior, [3.0, 0.2, 1.0, 0.7], 1.5):
        delta = per_entry(values, ref.shapes)
        A = H + np.diag(delta)
        np.testing.assert_allclose(
            to_numpy(la._structure.precision(1.0, la._prior_for(values)).inverse().to_dense()),
            np.linalg.inv(A),
            rtol=1e-9,
            atol=1e-11,
        )
        np.testing.assert_allclose(
            la.log_marginal_likelihood(values),
            dense_log_evidence(log_lik, theta, H, delta),
            rtol=1e-10,
        )


@pytest.mark.parametrize("structure, curvature, kwargs", STRUCTURED)
def test_structured_tuned_priors_maximize_the_dense_evidence(
    numpy_backend, mlp, structure, curvature, kwargs
):
    model, params, X, y, ref = mlp
    la = laplace(numpy_backend, mlp, structure=structure, curvature=curvature, **kwargs)
    H = structure_curvature(la)
    theta = flat(params)
    log_lik = ref.log_likelihood(params, X, y)

    def negative(t):
        return -dense_log_evidence(log_lik, theta, H, per_entry(np.exp(t), ref.shapes))

    best = optimize.minimize(negative, np.zeros(4), method="BFGS", options={"gtol": 1e-10})
    tuned = la.optimize_prior_precision("layerwise")
    np.testing.assert_allclose(np.log(tuned), best.x, atol=1e-5)
    scalar = optimize.minimize_scalar(lambda t: negative(np.full(4, t)), bracket=(-2, 2), tol=1e-12)
    np.testing.assert_allclose(np.log(la.optimize_prior_precision("scalar")), scalar.x, atol=1e-6)


def test_last_layer_laplace_is_the_block_of_the_full_one(numpy_backend, mlp):
    model, params, X, y, ref = mlp
    G = ref.ggn(params, X)
    la = laplace(numpy_backend, mlp, structure="full", subset="last_layer", prior_precision=2.0)
    assert la.num_params == 15 and len(la.params) == 2
    np.testing.assert_allclose(la.precision.to_dense(), G[-15:, -15:] + 2 * np.eye(15), rtol=1e-10)
    kron = laplace(numpy_backend, mlp, structure="kron", subset=[2, 3])
    full_kron = laplace(numpy_backend, mlp, structure="kron")
    np.testing.assert_allclose(
        kron.precision.to_dense(), full_kron.precision.to_dense()[-15:, -15:], rtol=1e-12
    )
    # the linearized predictive of the last layer: J of the last layer only
    X_test = np.random.default_rng(2).normal(size=(5, 2))
    J = ref.jacobians(params, X_test)[:, :, -15:]
    expected = np.einsum("ncp,pq,ndq->ncd", J, np.linalg.inv(G[-15:, -15:] + 2 * np.eye(15)), J)
    np.testing.assert_allclose(la.functional_variance(X_test)[1], expected, rtol=1e-9)


def test_float32_is_close_to_float64(backend, mlp):
    la64 = laplace(backend, mlp, structure="kron", prior_precision=[0.5, 1.0, 2.0, 4.0])
    la32 = laplace(backend, mlp, "float32", structure="kron", prior_precision=[0.5, 1.0, 2.0, 4.0])
    assert str(la32.precision.dtype).endswith("float32")
    np.testing.assert_allclose(
        la32.log_marginal_likelihood(), la64.log_marginal_likelihood(), rtol=1e-5
    )
    X_test = backend.asarray(mlp[2][:5])
    np.testing.assert_allclose(
        to_numpy(la32.predictive(backend.asarray(mlp[2][:5], "float32"))),
        to_numpy(la64.predictive(X_test)),
        rtol=1e-4,
        atol=1e-5,
    )


ALL_STRUCTURES = [("full", {}), ("diag", {}), ("kron", {}), ("ekfac", {}),
                  ("lowrank", {"rank": 5}), ("diag_lowrank", {"rank": 5})]  # fmt: skip


@pytest.mark.parametrize("per_array", [False, True])
@pytest.mark.parametrize("prior", [0.7, [0.5, 1.0, 2.0, 4.0]], ids=["scalar", "layerwise"])
@pytest.mark.parametrize("structure, kwargs", ALL_STRUCTURES)
def test_evidence_terms_are_the_dense_covariance_blocks(
    numpy_backend, mlp, structure, kwargs, prior, per_array
):
    # what the Newton iteration in log delta needs: log det A, the covariance's trace per
    # parameter array and the squared Frobenius norms of its blocks, against dense inv(A)
    la = laplace(numpy_backend, mlp, structure=structure, prior_precision=prior, **kwargs)
    A = la.precision.to_dense()
    Sigma = np.linalg.inv(A)
    starts = np.cumsum([0, *la._sizes])
    blocks = [slice(starts[g], starts[g + 1]) for g in range(4)]
    terms = la._structure.evidence_terms(la._scale, la._prior, per_array=per_array)
    np.testing.assert_allclose(terms.logdet, np.linalg.slogdet(A)[1], rtol=1e-12)
    if terms.traces is None:  # a scalar prior: the totals
        assert not per_array and np.isscalar(prior)
        np.testing.assert_allclose(terms.total_trace, np.trace(Sigma), rtol=1e-10)
        np.testing.assert_allclose(terms.total_coupling, np.sum(Sigma**2), rtol=1e-10)
        return
    traces = [np.trace(Sigma[b, b]) for b in blocks]
    coupling = [[np.sum(Sigma[b, c] ** 2) for c in blocks] for b in blocks]
    np.testing.assert_allclose(terms.traces, traces, rtol=1e-10)
    np.testing.assert_allclose(terms.coupling, coupling, rtol=1e-9, atol=1e-14)
