"""The optimizers of ``curvlinops.optim`` against SGD with momentum and Adam on digits.

Reproduces the kind of result Martens (2010) and Martens & Grosse (2015) report for
their MNIST autoencoders, on data that ships with scikit-learn (``load_digits``: 1797
images of 8x8 pixels, scaled to ``[0, 1]``), full-batch, float64, NumPy, one thread
(``threadpoolctl`` limits BLAS and OpenMP to one thread, as ``OMP_NUM_THREADS=1
OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1`` would):

- ``autoencoder``: a deep autoencoder ``64-32-16-8-16-32-64`` with tanh, binary
  cross-entropy on the logits of the reconstructed pixels (the papers' loss);
- ``classifier``: an MLP ``64-32-32-10`` with tanh, cross-entropy.

Optimizers. Adam and SGD with momentum 0.9 are NumPy update rules written here (one step
is one loss+gradient of the native model, ``model.linearize`` and a VJP, plus the
update), tuned on a grid of learning rates (the best final loss wins) with a budget of
``T`` iterations. K-FAC, Hessian-free and natural gradient (CG on the exact Fisher) get
``T / 3`` iterations. K-FAC uses Monte-Carlo factors (one sampled label per output), its
quadratic model for the step size and momentum, the Levenberg-Marquardt damping, an
inverse every 20 steps, the factors' update every second step (``update_every=2``),
and the factors' update and the model's curvature products on an eighth of the batch
(``statistics_fraction = products_fraction = 1/8``); the full run also reports K-FAC
with the factors updated every step, and with the whole batch for both.

Columns: ``final`` (loss after the budget), ``iters_to_target`` and ``s_to_target``
(first iteration, and the wall time up to it, whose loss is at most the tuned Adam's
final loss; ``-`` if never), ``ms/iter`` and ``iter/adam`` (an iteration's time over an
Adam step's, amortized: measured in interleaved rounds of 20 steps of each,
``_timing.time_ratio``; rounds of 2 steps for Hessian-free and natural gradient,
which have no cadences). ``ms/iter`` is the run's mean, which drifts with the load of
the machine; ``iter/adam`` is the ratio to read. The targets of the issue: K-FAC and
Hessian-free reach the tuned Adam's final loss within ``T / 3`` iterations
(``iters_to_target <= T/3``), and K-FAC's ``iter/adam <= 2``.

Run ``python benchmarks/bench_optim.py [--quick]`` (``--quick``: ``T = 60`` for the
autoencoder and 120 for the classifier, fewer learning rates, about 30 s; the full
run: ``T = 450`` and 600, a few minutes) or through ``benchmarks/run.py optim``. Needs scikit-learn.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from _timing import time_ratio

from curvlinops import BCEWithLogitsLoss, CrossEntropyLoss, nn
from curvlinops.optim import KFAC, HessianFree, NaturalGradient

ROUND = 20  # steps per timing round: one K-FAC inverse refresh per round


def _mlp(widths):
    layers = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def problems():
    """``name -> (model, loss, initial params, batch)`` on the digits."""
    import array_api_compat.numpy as xp
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = digits.data / 16.0
    out = {}
    model = _mlp((64, 32, 16, 8, 16, 32, 64))
    out["autoencoder"] = (
        model,
        BCEWithLogitsLoss(),
        model.init(0, xp=xp, dtype=xp.float64),
        (X, X),
    )
    model = _mlp((64, 32, 32, 10))
    out["classifier"] = (
        model,
        CrossEntropyLoss(),
        model.init(0, xp=xp, dtype=xp.float64),
        (X, digits.target),
    )
    return out


def loss_and_gradient(model, loss, params, batch):
    """The batch's loss and gradient: one forward pass and one VJP of the native model."""
    X, y = batch
    lin = model.linearize(params, X)
    c = loss.normalization(X.shape[0], lin.outputs.shape)
    grads = lin.vjp(loss.gradient(lin.outputs, y))
    return c * float(loss.sum_value(lin.outputs, y)), [c * g for g in grads]


def batch_loss(model, loss, params, batch):
    X, y = batch
    out = model(params, X)
    return loss.normalization(X.shape[0], out.shape) * float(loss.sum_value(out, y))


class Adam:
    """Adam (Kingma & Ba, 2015) with bias correction, as a NumPy update rule."""

    def __init__(self, model, loss, lr, beta1=0.9, beta2=0.999, eps=1e-8):
        self.model, self.loss, self.lr = model, loss, lr
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def init(self, params, batch):
        return {"m": [0 * p for p in params], "v": [0 * p for p in params], "t": 0}

    def step(self, params, state, batch):
        value, grads = loss_and_gradient(self.model, self.loss, params, batch)
        t = state["t"] + 1
        b1, b2 = self.beta1, self.beta2
        m = [b1 * m + (1 - b1) * g for m, g in zip(state["m"], grads, strict=True)]
        v = [b2 * v + (1 - b2) * g * g for v, g in zip(state["v"], grads, strict=True)]
        c1, c2 = 1 - b1**t, 1 - b2**t
        new = [
            p - self.lr * (mi / c1) / (np.sqrt(vi / c2) + self.eps)
            for p, mi, vi in zip(params, m, v, strict=True)
        ]
        return new, {"m": m, "v": v, "t": t, "loss": value}


class SGD:
    """SGD with heavy-ball momentum, as a NumPy update rule."""

    def __init__(self, model, loss, lr, momentum=0.9):
        self.model, self.loss, self.lr, self.momentum = model, loss, lr, momentum

    def init(self, params, batch):
        return {"u": [0 * p for p in params]}

    def step(self, params, state, batch):
        value, grads = loss_and_gradient(self.model, self.loss, params, batch)
        u = [self.momentum * u - self.lr * g for u, g in zip(state["u"], grads, strict=True)]
        return [p + ui for p, ui in zip(params, u, strict=True)], {"u": u, "loss": value}


def _loss_of(state):
    return state["loss"] if isinstance(state, dict) else state.loss


def train(opt, params, batch, iterations):
    """``(losses after 0..T steps, cumulative seconds after 1..T steps)``."""
    state = opt.init(params, batch)
    losses, times, elapsed = [], [], 0.0
    for _ in range(iterations):
        start = time.perf_counter()
        params, state = opt.step(params, state, batch)
        elapsed += time.perf_counter() - start
        losses.append(_loss_of(state))  # the loss before this step
        times.append(elapsed)
    losses.append(batch_loss(opt.model, opt.loss, params, batch))
    return np.asarray(losses), np.asarray(times)


def first_below(losses, target):
    """The first iteration whose loss is at most ``target`` (None if none)."""
    hits = np.flatnonzero(losses <= target)
    return int(hits[0]) if hits.size else None


def amortized_ratio(opt, baseline, params, batch, rounds, steps_per_round=ROUND):
    """An iteration of ``opt`` over one of ``baseline``, in interleaved rounds of steps."""
    runs = {}
    for name, o in (("opt", opt), ("base", baseline)):
        runs[name] = [params, o.init(params, batch)]

    def steps(name, o):
        def go():
            p, s = runs[name]
            for _ in range(steps_per_round):
                p, s = o.step(p, s, batch)
            runs[name] = [p, s]

        return go

    return time_ratio(steps("opt", opt), steps("base", baseline), rounds=rounds, block=1)


def optimizers(model, loss, quick):
    """The second-order optimizers: ``name -> optimizer``."""
    kfac = dict(damping=0.01, fisher_type="mc", inverse_every=ROUND)
    windows = dict(statistics_fraction=0.125, products_fraction=0.125)
    out = {
        "K-FAC": KFAC(model, loss, update_every=2, **windows, **kfac),
        "Hessian-free": HessianFree(model, loss, damping=1.0, max_iterations=50),
        "natural gradient": NaturalGradient(
            model, loss, learning_rate=0.5, damping=1e-2, max_iterations=50, rtol=1e-3
        ),
    }
    if not quick:
        out["K-FAC (factors every step)"] = KFAC(model, loss, **windows, **kfac)
        out["K-FAC (whole batch)"] = KFAC(model, loss, **kfac)
    return out


# Adam's budget T per problem (the classifier's steps are cheap)
QUICK = {"autoencoder": 60, "classifier": 120}
FULL = {"autoencoder": 450, "classifier": 600}
ADAM_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SGD_RATES = (0.1, 0.3, 1.0, 3.0)


def run(quick: bool) -> list[dict]:
    """One row per problem and optimizer."""
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_limits

    # threadpool_limits reaches only the libraries loaded when it is entered: SciPy's own
    # OpenBLAS (K-FAC's Cholesky inverses) must be loaded first, or it keeps two threads,
    # whose hand-offs cost tens of milliseconds per 32x32 inverse on a loaded machine
    with threadpool_limits(1):  # also when numpy was imported before this module
        return [row for name, problem in problems().items() for row in _rows(name, problem, quick)]


def _tuned(cls, rates, model, loss, params, batch, T):
    """The learning rate with the best final loss, and its run."""
    best = None
    for lr in rates:
        losses, times = train(cls(model, loss, lr), params, batch, T)
        final = losses[-1] if math.isfinite(losses[-1]) else math.inf
        if best is None or final < best[1][0][-1]:
            best = (lr, (losses, times))
    return best


def _rows(name, problem, quick):
    model, loss, params, batch = problem
    T = (QUICK if quick else FULL)[name]
    rounds = 3 if quick else 7
    adam_rates = (1e-2, 3e-2) if quick else ADAM_RATES
    sgd_rates = (1.0,) if quick else SGD_RATES
    adam_lr, (adam_losses, adam_times) = _tuned(Adam, adam_rates, model, loss, params, batch, T)
    target = float(adam_losses[-1])
    adam = Adam(model, loss, adam_lr)
    runs = {f"Adam (lr {adam_lr:g})": (adam, adam_losses, adam_times, T)}
    sgd_lr, (losses, times) = _tuned(SGD, sgd_rates, model, loss, params, batch, T)
    runs[f"SGD+momentum (lr {sgd_lr:g})"] = (SGD(model, loss, sgd_lr), losses, times, T)
    for label, opt in optimizers(model, loss, quick).items():
        runs[label] = (opt, *train(opt, params, batch, T // 3), T // 3)
    rows = []
    for label, (opt, losses, times, budget) in runs.items():
        hit = first_below(losses, target)
        if opt is adam:
            ratio = 1.0
        elif isinstance(opt, (HessianFree, NaturalGradient)):  # no cadences: short rounds
            ratio = amortized_ratio(opt, adam, params, batch, 3, steps_per_round=2)
        else:
            ratio = amortized_ratio(opt, adam, params, batch, rounds)
        rows.append(
            {
                "problem": name,
                "optimizer": label,
                "iters": budget,
                "final": f"{losses[-1]:.4g}",
                "iters_to_target": "-" if hit is None else hit,
                "s_to_target": "-" if hit is None else f"{(times[hit - 1] if hit else 0):.2f}",
                "ms/iter": f"{1e3 * times[-1] / budget:.1f}",
                "iter/adam": f"{ratio:.2f}",
                "target": f"{target:.4g}",
            }
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smaller budgets, fewer learning rates"
    )
    rows = run(parser.parse_args().quick)
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)))


if __name__ == "__main__":
    main()
