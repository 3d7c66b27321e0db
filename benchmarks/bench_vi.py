"""The cost of a natural-gradient VI step (VOGN, noisy K-FAC) over an Adam step, on digits.

The classifier of ``bench_optim.py`` (an MLP ``64-32-32-10`` with tanh, cross-entropy,
scikit-learn's digits), minibatches of 128 of the 1797 images, float64, NumPy, one
thread. A VI step draws ``weight_samples`` weights from the posterior and, per weight,
takes the batch's gradient and curvature (a GGN diagonal: one backward pass of ``C``
cotangents; K-FAC factors: one backward pass of ``C`` cotangents for ``"type-2"``, of
one for ``"mc"``), then moves the mean; noisy K-FAC also refreshes the posterior's
eigendecompositions every ``inverse_every`` steps.

Columns: ``iter/adam``, an iteration's time over an Adam step's (loss+gradient and
update), amortized over interleaved rounds of 20 steps of each
(``_timing.time_ratio``); ``elbo/N``, the ELBO per datum after ``T`` steps (16 weight
draws, on all the data), and ``nll/N`` the training loss at the mean, to show the runs
learn. The ratio is the number to read; the costs above say what to expect (about 2-4
Adam steps per weight sample).

Run ``python benchmarks/bench_vi.py [--quick]`` (``--quick``: fewer steps and rounds) or
through ``benchmarks/run.py vi``. Needs scikit-learn.
"""

from __future__ import annotations

import argparse

from bench_optim import ROUND, Adam, amortized_ratio, batch_loss, problems

from curvlinops.optim import VOGN, NoisyKFAC

BATCH = 128


def methods(model, loss, N):
    """``name -> optimizer``: the variants whose cost the table compares."""
    common = dict(num_data=N, learning_rate=0.01, prior_precision=10.0, beta2=0.95)
    return {
        "VOGN (GGN diagonal)": VOGN(model, loss, **common),
        "VOGN (squared gradients)": VOGN(model, loss, curvature="empirical", **common),
        "noisy K-FAC (type-2, inverse every step)": NoisyKFAC(model, loss, **common),
        "noisy K-FAC (MC, inverse every 20)": NoisyKFAC(
            model, loss, fisher_type="mc", inverse_every=ROUND, **common
        ),
    }


def run(quick: bool) -> list[dict]:
    from threadpoolctl import threadpool_limits

    model, loss, params, (X, y) = problems()["classifier"]
    N = X.shape[0]
    batches = [(X[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    steps = 30 if quick else 150
    rounds = 3 if quick else 7
    rows = []
    with threadpool_limits(limits=1):
        adam = Adam(model, loss, lr=0.01)
        for name, opt in methods(model, loss, N).items():
            p, state = params, opt.init(params, batches[0])
            for k in range(steps):
                p, state = opt.step(p, state, batches[k % len(batches)])
            q = opt.posterior(p, state)
            elbo = opt.elbo(q, [(X, y)], num_samples=16, seed=0)
            ratio = amortized_ratio(opt, adam, params, batches[0], rounds)
            rows.append(
                {
                    "method": name,
                    "steps": steps,
                    "iter/adam": round(ratio, 2),
                    "elbo/N": round(elbo / N, 4),
                    "nll/N": round(batch_loss(model, loss, p, (X, y)), 4),
                }
            )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in run(args.quick):
        print(row)
