"""Laplace approximations: the cost of fitting and of the predictive, over loss+gradient.

MLP 784-256-256-10 (ReLU), N = 1024, cross-entropy, float64, NumPy, one batch (quick:
64-32-32-10, N = 256). Float64: in float32 the conditioning rule of
:class:`~curvlinops.conditioning` refuses the inverse of a rank-10 posterior of 268 000
parameters whose curvature exceeds the prior more than 160-fold (its limit for that
size), which a posterior's covariance usually does. The denominator is one
loss+gradient over the data set (``GGNLinearOperator.gradient_and_loss``: a forward and a
backward pass). Rows:

- fit / loss+grad: ``Laplace(...)`` for each structure, all weights or the last layer
  (the pass for the log-likelihood, the curvature, nothing else);
- tune / loss+grad: ``optimize_prior_precision`` (scalar, layerwise; the dense last
  layer scalar only), after the fit;
- predictive per test point / loss+grad per datum: the GLM probit predictive of 64 test
  points (quick: 16) over a loss+gradient's time divided by N (per-datum Jacobians
  through the layer taps, one product of the covariance with their ``C`` columns per
  point).

With the peers (``--peers`` or ``CURVLINOPS_BENCH_PEERS=1``): the agreement with
laplace-torch 0.3 (``_laplace_agreement``: largest relative deviation over the cases of
the precision, evidence, predictive moments and probit, and of the tuned priors), and
fit and predictive times of both libraries on the agreement's small float64 MLP, timed
in interleaved rounds (``_peers.PeerSession``).

Ratios only, measured in one run; those against loss+gradient in interleaved rounds
(``_timing.time_ratio``).
"""

from __future__ import annotations

import os
import statistics

from _mlp import mlp_problem
from _timing import time_call, time_ratio

import curvlinops as cl
from curvlinops.bayes import Laplace

#: (structure, subset, options, tuning modes): the dense last layer (2570 parameters on
#: the full-size MLP) is tuned for a scalar only, each layerwise step being an
#: eigendecomposition of the dense precision. The predictive uses the last one, the
#: scalar.
CASES = [
    ("diag", None, {}, ("layerwise", "scalar")),
    ("kron", None, {}, ("layerwise", "scalar")),
    ("ekfac", None, {}, ("layerwise", "scalar")),
    ("lowrank", None, {"rank": 10}, ("layerwise", "scalar")),
    ("full", "last_layer", {}, ("scalar",)),
    ("kron", "last_layer", {}, ("layerwise", "scalar")),
]


def run(quick: bool = False) -> list[dict]:
    model, params, X, y = mlp_problem(quick=quick, dtype="float64")
    data = [(X, y)]
    loss = cl.CrossEntropyLoss()
    N = X.shape[0]
    X_test = X[: 16 if quick else 64]
    G = cl.GGNLinearOperator(model, loss, params, data, check_deterministic=False)
    baseline = G.gradient_and_loss
    rounds = 3
    rows = []
    for structure, subset, kwargs, modes in CASES:
        name = structure + (" (last layer)" if subset else "")

        def fit(structure=structure, subset=subset, kwargs=kwargs):
            return Laplace(model, loss, params, data, structure=structure, subset=subset,
                           check_deterministic=False, num_data=N, **kwargs)  # fmt: skip

        la = fit()
        ratio = time_ratio(fit, baseline, rounds=rounds, block=1)
        rows.append({"quantity": f"fit {name} / loss+grad", "ratio": ratio})
        for mode in modes:
            tune = time_ratio(
                lambda la=la, mode=mode: la.optimize_prior_precision(mode),
                baseline,
                rounds=rounds,
                block=1,
            )
            rows.append({"quantity": f"tune {mode} {name} / loss+grad", "ratio": tune})
        la.posterior.covariance  # formed once, as for repeated predictions  # noqa: B018
        predict = time_ratio(lambda la=la: la.predictive(X_test), baseline, rounds=rounds, block=1)
        rows.append(
            {
                "quantity": f"predictive per test point, {name} / loss+grad per datum",
                "ratio": predict * N / X_test.shape[0],
                "note": f"{X_test.shape[0]} test points, probit",
            }
        )
    if os.environ.get("CURVLINOPS_BENCH_PEERS") == "1":
        rows.extend(_peer_rows(quick))
    return rows


def _peer_rows(quick):
    from _laplace_agreement import CASES as PEER_CASES, agreement, peer_inputs, problem
    from _peers import PeerSession, PeerUnavailable

    rows = []
    try:
        for likelihood in ("classification", "regression"):
            for row in agreement(likelihood):
                worst = max(
                    row[k]
                    for k in ("precision", "log_marglik", "f_mean", "f_var", "probit")
                    if k in row
                )
                tuned = max(row[k] for k in row if k.endswith(" rel"))
                rows.append(
                    {
                        "quantity": f"agreement {likelihood} {row['case']}",
                        "ratio": worst,
                        "note": f"max rel. deviation; tuned priors {tuned:.2g} apart "
                        "(laplace-torch: 100 Adam steps)",
                    }
                )
        model, loss, params, X, y, X_test = problem()
        inputs = peer_inputs(params, X, y, X_test, "classification", 1.0, 100)
        with PeerSession("laplace-torch", inputs) as peer:
            for subset, structure in PEER_CASES:
                ours_fit = _ours(model, loss, params, X, y, subset, structure)
                la = ours_fit()
                predict = lambda la=la: la.predictive(X_test)  # noqa: E731
                for kind, fn in (("fit", ours_fit), ("predict", predict)):
                    ratios = []
                    for _ in range(3 if quick else 5):  # interleaved rounds
                        theirs = statistics.median(peer.time(f"{kind}:{subset}:{structure}", 3))
                        mine = time_call(fn, repeats=3, warmup=1).median
                        ratios.append(mine / theirs)
                    rows.append(
                        {
                            "quantity": f"{kind} {subset} {structure}: ours / laplace-torch",
                            "ratio": statistics.median(ratios),
                            "note": "MLP 3-6-3 tanh, N=50, float64, 8 test points",
                        }
                    )
    except PeerUnavailable as err:
        rows.append({"quantity": "laplace-torch", "note": f"unavailable: {err}"[:200]})
    return rows


def _ours(model, loss, params, X, y, subset, structure):
    from _laplace_agreement import PRIOR, PRIOR_LAST

    prior = PRIOR if subset == "all" else PRIOR_LAST
    sub = None if subset == "all" else "last_layer"
    return lambda: Laplace(model, loss, params, [(X, y)], structure=structure, subset=sub,
                           prior_precision=prior, check_deterministic=False)  # fmt: skip
