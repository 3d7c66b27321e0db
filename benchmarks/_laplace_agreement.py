"""curvlinops.bayes against laplace-torch 0.3 on one MLP, where their definitions match.

:func:`agreement` builds a tanh MLP at its MAP (SciPy's L-BFGS on the negative
log-posterior, gradients from curvlinops' own native layers), runs the peer script
``peers/laplace_torch.py`` in laplace-torch's virtual environment (``_peers.run_peer``)
and compares, case by case (all weights or the last layer; full, Kronecker-factored and
diagonal GGN), the posterior precision, the log marginal likelihood, the GLM predictive's
moments and probit probabilities, and the tuned prior precisions. It returns one row
per case with the largest relative deviations.

Where the two agree by definition (and the rows check): laplace-torch's likelihood is
the sum over the data (``CrossEntropyLoss(reduction="sum")``, for regression
``1/2 MSE(sum)`` with ``1/sigma^2``) and its prior precision is diagonal, per parameter
tensor for the "layerwise" prior, biases included; its ``kron`` is K-FAC (type-2,
``expand``) with separate weight and bias blocks and the exact ``+ delta I`` through the
factors' eigendecompositions (``damping=False``, its default); its ``diag`` the exact GGN
diagonal; its log-likelihood for regression includes ``-N C log(sigma sqrt(2 pi))``;
its probit the same formula. Where they differ: laplace-torch tunes the prior with 100
Adam steps on ``log delta`` (by default; the rows give its tuned values next to ours,
the exact maximizer of the same evidence), its ``LLLaplace`` takes no per-layer prior
(the last-layer cases use a scalar), and its ``kron`` with several batches of different
sizes rescales the input factors by the batch fraction (the same sums as ours; the
comparison uses one batch).

May import: NumPy, SciPy, curvlinops, ``_peers``.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

import curvlinops as cl
from curvlinops.bayes import Laplace

CASES = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("last_layer", "full"),
    ("last_layer", "kron"),
    ("last_layer", "diag"),
]
PRIOR = (0.5, 1.0, 2.0, 4.0)
PRIOR_LAST = 2.0


def problem(likelihood="classification", widths=(3, 6, 3), N=50, seed=0, sigma=0.7):
    """``(model, loss, params, X, y, X_test)`` at the MAP of the prior ``N(0, I)``."""
    import array_api_compat.numpy as xp

    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(cl.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(cl.nn.Tanh())
    model = cl.nn.Sequential(*layers)
    init = model.init(seed, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, widths[0]))
    if likelihood == "classification":
        y = rng.integers(0, widths[-1], size=N)
        loss, scale = cl.CrossEntropyLoss(reduction="sum"), 1.0
    else:
        y = np.sin(X @ rng.normal(size=(widths[0], widths[-1]))) + sigma * rng.normal(
            size=(N, widths[-1])
        )
        loss, scale = cl.MSELoss(reduction="sum"), 1.0 / (2 * sigma**2)
    shapes = [p.shape for p in init]
    sizes = [p.size for p in init]

    def unflatten(theta):
        return [
            theta[s : s + n].reshape(shape)
            for s, n, shape in zip(np.cumsum([0, *sizes[:-1]]), sizes, shapes, strict=True)
        ]

    def objective(theta):  # the negative log-posterior, with curvlinops' gradient
        lin = model.linearize(unflatten(theta), X)
        value = float(loss.sum_value(lin.outputs, y))
        grads = lin.vjp(loss.gradient(lin.outputs, y))
        g = np.concatenate([np.ravel(a) for a in grads])
        return scale * value + 0.5 * theta @ theta, scale * g + theta

    theta0 = np.concatenate([p.ravel() for p in init])
    result = optimize.minimize(
        objective, theta0, jac=True, method="L-BFGS-B", options={"gtol": 1e-11, "maxiter": 5000}
    )
    params = unflatten(result.x)
    X_test = np.random.default_rng(seed + 7).normal(size=(8, widths[0]))
    return model, loss, params, X, y, X_test


def peer_inputs(params, X, y, X_test, likelihood, sigma, tune_steps):
    inputs = {
        "X": X,
        "y": y,
        "X_test": X_test,
        "likelihood": np.array(likelihood),
        "sigma_noise": np.array(sigma),
        "prior": np.array(PRIOR),
        "prior_last": np.array(PRIOR_LAST),
        "tune_steps": np.array(tune_steps),
    }
    for i in range(len(params) // 2):
        inputs[f"W{i}"], inputs[f"b{i}"] = params[2 * i], params[2 * i + 1]
    return inputs


def ours(model, loss, params, X, y, X_test, subset, structure, sigma):
    kwargs = {"sigma_noise": sigma} if isinstance(loss, cl.MSELoss) else {}
    prior = PRIOR if subset == "all" else PRIOR_LAST
    la = Laplace(
        model,
        loss,
        params,
        [(X, y)],
        structure=structure,
        subset=None if subset == "all" else "last_layer",
        prior_precision=prior,
        **kwargs,
    )
    out = {
        "precision": la.precision.to_dense(),
        "log_marglik": la.log_marginal_likelihood(),
        "log_marglik_scalar": la.log_marginal_likelihood(PRIOR[0]),
    }
    out["f_mean"], out["f_var"] = la.functional_variance(X_test)
    if not isinstance(loss, cl.MSELoss):
        out["probit"] = la.predictive(X_test)
    out["tuned_scalar"] = np.array([la.optimize_prior_precision("scalar")])
    if subset == "all":
        out["tuned_layerwise"] = np.array(la.optimize_prior_precision("layerwise"))
    return out, la


def _as_prior(values):
    values = [float(v) for v in np.ravel(values)]
    return values[0] if len(values) == 1 else values


def relative(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def agreement(likelihood="classification", tune_steps=100, sigma=0.7):
    """Rows ``{case, precision, log_marglik, f_var, probit, tuned_*}``: relative deviations
    of ours from laplace-torch's, both tuned priors and the evidence gained by ours over
    laplace-torch's tuned values (raises ``PeerUnavailable``)."""
    from _peers import run_peer

    model, loss, params, X, y, X_test = problem(likelihood, sigma=sigma)
    theirs = run_peer(
        "laplace-torch", peer_inputs(params, X, y, X_test, likelihood, sigma, tune_steps)
    )
    rows = []
    for subset, structure in CASES:
        key = f"{subset}_{structure}"
        mine, la = ours(model, loss, params, X, y, X_test, subset, structure, sigma)
        row = {"likelihood": likelihood, "case": key}
        for name in ("precision", "log_marglik", "log_marglik_scalar", "f_mean", "f_var", "probit"):
            if name in mine:
                row[name] = relative(mine[name], theirs[f"{key}/{name}"])
        for name in ("tuned_scalar", "tuned_layerwise"):
            if name in mine:
                row[f"{name} ours"] = " ".join(f"{v:.4g}" for v in mine[name])
                row[f"{name} laplace-torch"] = " ".join(f"{v:.4g}" for v in theirs[f"{key}/{name}"])
                row[f"{name} rel"] = relative(theirs[f"{key}/{name}"], mine[name])
                # ours maximizes the evidence (which both compute alike): by how much
                # ours is higher than at laplace-torch's values (>= 0)
                row[f"{name} evidence gain"] = la.log_marginal_likelihood(
                    _as_prior(mine[name])
                ) - la.log_marginal_likelihood(_as_prior(theirs[f"{key}/{name}"]))
        rows.append(row)
    return rows
