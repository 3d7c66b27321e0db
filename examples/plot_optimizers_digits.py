"""
K-FAC, Hessian-free and natural gradient against Adam on a digits autoencoder
=============================================================================

Martens (2010) and Martens & Grosse (2015) showed their second-order methods on deep
autoencoders of MNIST, a problem on which first-order methods crawl. This example
trains a small deep autoencoder of scikit-learn's 8x8 digits with the optimizers of
:mod:`curvlinops.optim`, :class:`~curvlinops.optim.KFAC`,
:class:`~curvlinops.optim.HessianFree` and :class:`~curvlinops.optim.NaturalGradient`,
and with Adam, whose learning rate we tune. Adam gets three times as many iterations.

The full comparison (also SGD with momentum and an MLP classifier, larger budgets and
the timings) is ``benchmarks/bench_optim.py``.
"""

# %%
# Data, model and loss
# --------------------
# The 1797 digits, pixels scaled to ``[0, 1]``, reconstructed through a bottleneck of
# 8 units: ``64-32-16-8-16-32-64`` with tanh, in the native layers of
# :mod:`curvlinops.nn` on NumPy arrays. The loss is the papers' binary cross-entropy
# of the pixels, on the logits of the last layer. We train full-batch.

import time

import array_api_compat.numpy as xp
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits

from curvlinops import BCEWithLogitsLoss, nn
from curvlinops.optim import KFAC, HessianFree, NaturalGradient

X = load_digits().data / 16.0
batch = (X, X)  # an autoencoder: the targets are the inputs
widths = (64, 32, 16, 8, 16, 32, 64)
layers = []
for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
    layers += [nn.Linear(d_in, d_out)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
model = nn.Sequential(*layers)
loss = BCEWithLogitsLoss()
initial = model.init(0, xp=xp, dtype=xp.float64)

# %%
# Adam, tuned
# -----------
# Adam as a few lines of NumPy: one loss and gradient per step (one forward pass of the
# native model and one vector-Jacobian product), then the update with bias correction.
# We try three learning rates and keep the one with the lowest final loss.

T = 90  # Adam's budget; the second-order methods get T / 3


def loss_and_gradient(params):
    lin = model.linearize(params, X)
    c = loss.normalization(X.shape[0], lin.outputs.shape)
    grads = lin.vjp(loss.gradient(lin.outputs, X))
    return c * float(loss.sum_value(lin.outputs, X)), [c * g for g in grads]


def final_loss(params):
    out = model(params, X)
    return loss.normalization(X.shape[0], out.shape) * float(loss.sum_value(out, X))


def adam(lr, beta1=0.9, beta2=0.999, eps=1e-8):
    params = [p.copy() for p in initial]
    m, v = [0 * p for p in params], [0 * p for p in params]
    losses, times, start = [], [], time.perf_counter()
    for t in range(1, T + 1):
        value, grads = loss_and_gradient(params)
        m = [beta1 * a + (1 - beta1) * g for a, g in zip(m, grads, strict=True)]
        v = [beta2 * a + (1 - beta2) * g * g for a, g in zip(v, grads, strict=True)]
        params = [
            p - lr * (a / (1 - beta1**t)) / (np.sqrt(b / (1 - beta2**t)) + eps)
            for p, a, b in zip(params, m, v, strict=True)
        ]
        losses.append(value)
        times.append(time.perf_counter() - start)
    return np.array(losses + [final_loss(params)]), np.array(times)


adam_runs = {lr: adam(lr) for lr in (1e-2, 3e-2, 1e-1)}
best_lr = min(adam_runs, key=lambda lr: adam_runs[lr][0][-1])
target = adam_runs[best_lr][0][-1]
print(f"Adam: best learning rate {best_lr}, final loss {target:.4f} after {T} iterations")

# %%
# The second-order optimizers
# ---------------------------
# Each is a functional step ``params, state = opt.step(params, state, batch)``. K-FAC
# takes its Kronecker factors from one sampled label per output (``fisher_type="mc"``),
# refreshes its inverse every 20 steps, picks step size and momentum from the quadratic
# model and adapts its damping; its factors' update and the quadratic model's products
# use an eighth of the batch. Hessian-free runs at most 20 CG iterations per step on the
# GGN; natural gradient at most 20 on the Fisher.

optimizers = {
    "K-FAC": KFAC(
        model,
        loss,
        damping=0.01,
        fisher_type="mc",
        statistics_fraction=0.125,
        products_fraction=0.125,
    ),
    "Hessian-free": HessianFree(model, loss, damping=1.0, max_iterations=20),
    "natural gradient": NaturalGradient(
        model, loss, learning_rate=0.5, damping=1e-2, max_iterations=20, rtol=1e-3
    ),
}


def train(opt, iterations):
    params = [p.copy() for p in initial]
    state = opt.init(params, batch)
    losses, times, start = [], [], time.perf_counter()
    for _ in range(iterations):
        params, state = opt.step(params, state, batch)
        losses.append(state.loss)  # the loss before this step
        times.append(time.perf_counter() - start)
    return np.array(losses + [final_loss(params)]), np.array(times)


runs = {name: train(opt, T // 3) for name, opt in optimizers.items()}
reached = {}
for name, (losses, _) in runs.items():
    hits = np.flatnonzero(losses <= target)
    reached[name] = int(hits[0]) if hits.size else None
    print(f"{name}: final loss {losses[-1]:.4f}, Adam's final loss reached at {reached[name]}")

# %%
# Results
# -------
# Left: the loss per iteration. Adam (faint: the other learning rates) descends slowly;
# the second-order methods reach its final loss in a fraction of its iterations. Right:
# the same runs against wall time (one thread would be the fair setting; here whatever
# the docs build has). A K-FAC step costs about twice an Adam step, a Hessian-free or
# natural-gradient step (up to 20 curvature products) an order of magnitude more.

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for lr, (losses, times) in adam_runs.items():
    faint = {} if lr == best_lr else {"alpha": 0.3, "lw": 1}
    label = f"Adam, lr {lr:g}" if lr == best_lr else None
    ax1.plot(losses, color="C0", label=label, **faint)
    ax2.plot(np.r_[0.0, times], losses, color="C0", label=label, **faint)
for k, (name, (losses, times)) in enumerate(runs.items()):
    ax1.plot(losses, "o-", ms=3, color=f"C{k + 1}", label=name)
    ax2.plot(np.r_[0.0, times], losses, "o-", ms=3, color=f"C{k + 1}", label=name)
for ax in (ax1, ax2):
    ax.axhline(target, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_ylim(None, 0.75)  # the spikes of the largest learning rate cut off
ax1.set_xlabel("iteration")
ax2.set_xlabel("wall time (s)")
ax1.set_ylabel("training loss (log scale)")
ax1.set_title("Training loss per iteration (dashed: tuned Adam's final loss)")
ax2.set_title("... and against time")
ax1.legend()
fig.tight_layout()

# %%
# K-FAC and Hessian-free reach the tuned Adam's final loss within a third of Adam's
# iterations (the claim of the papers, here on digits):

for name in ("K-FAC", "Hessian-free"):
    assert reached[name] is not None and reached[name] <= T // 3, (name, reached[name])
