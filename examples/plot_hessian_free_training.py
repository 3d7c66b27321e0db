"""
Hessian-free training of a PyTorch MLP
======================================

Hessian-free optimization (Martens, 2010) takes Newton-like steps without ever forming
a curvature matrix: each step solves the damped Gauss-Newton system

.. math:: (G + \\lambda I)\\, \\delta = -g

approximately by a few iterations of conjugate gradients (CG), which only need products
``G @ v`` of the generalized Gauss-Newton (GGN) matrix ``G`` with vectors. The damping
``lambda`` is adapted in the Levenberg-Marquardt way: it shrinks while the quadratic
model of the loss predicts the actual decrease well, and grows when it does not.

This example trains a PyTorch MLP on scikit-learn's digits with Hessian-free steps,
using :class:`~curvlinops.frontends.torch.TorchModel`,
:class:`curvlinops.GGNLinearOperator` and :func:`curvlinops.cg`, and compares it with
full-batch gradient descent given the same amount of work (passes over the data) and
its best learning rate.
"""

# %%
# Data and model
# --------------
# The 8x8 digit images, flattened to 64 standardized features; the first 1500 images
# are the training set, the other 297 the test set. The model is a plain
# ``torch.nn.Sequential`` MLP with one hidden layer of 32 tanh units, in float64.

import math

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits

import curvlinops as cl
from curvlinops.frontends.torch import TorchModel, translate_loss

torch.manual_seed(0)

digits_X, digits_y = load_digits(return_X_y=True)
digits_X = (digits_X - digits_X.mean(0)) / (digits_X.std(0) + 1e-8)
X = torch.as_tensor(digits_X, dtype=torch.float64)
y = torch.as_tensor(digits_y)
X_train, y_train, X_test, y_test = X[:1500], y[:1500], X[1500:], y[1500:]

net = torch.nn.Sequential(
    torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
).double()
loss_function = torch.nn.CrossEntropyLoss()

# %%
# :class:`~curvlinops.frontends.torch.TorchModel` exposes the module to curvlinops as a
# function of a *list* of parameter tensors, so we can evaluate the loss and its
# curvature at any parameters without writing them into the module.
# ``initial_params`` is the common starting point of both optimizers.

model = TorchModel(net)
loss = translate_loss(loss_function)  # the curvlinops loss with the same value
initial_params = [p.clone() for p in model.params]
shapes = [p.shape for p in initial_params]
print(f"{sum(math.prod(s) for s in shapes)} parameters:", model.param_names)


def loss_at(params, X, y):
    """The mean cross-entropy of the network with the given parameters."""
    named = dict(zip(model.param_names, params, strict=True))
    return loss_function(torch.func.functional_call(net, named, (X,)), y)


def accuracy_at(params, X, y):
    return (model(params, X).argmax(1) == y).double().mean().item()


# %%
# Counting the work
# -----------------
# We compare the optimizers at the same cost, counted in passes over the training set:
# a gradient costs one pass (a forward and a backward pass), a GGN-vector product two
# (a forward-mode and a reverse-mode pass), the loss and gradient at a trial point one.
# Each optimizer gets 200 passes.

budget = 200

# %%
# Gradient descent
# ----------------
# Full-batch gradient descent in plain PyTorch, one gradient (one pass) per step. To be
# fair, we try several learning rates and keep the best.

gd_runs = {}
for lr in [3.0, 10.0, 30.0, 100.0]:
    params = [p.clone().requires_grad_() for p in initial_params]
    history = []
    for _ in range(budget):
        value = loss_at(params, X_train, y_train)
        history.append(value.item())
        grads = torch.autograd.grad(value, params)
        with torch.no_grad():
            params = [(p - lr * g).requires_grad_() for p, g in zip(params, grads, strict=True)]
    history.append(loss_at(params, X_train, y_train).item())
    gd_runs[lr] = (history, [p.detach() for p in params])
    print(f"gradient descent, learning rate {lr:5}: final loss {history[-1]:.3g}")

finite = {lr: run for lr, run in gd_runs.items() if math.isfinite(run[0][-1])}
best_lr = min(finite, key=lambda lr: finite[lr][0][-1])
gd_history, gd_params = gd_runs[best_lr]
print(f"best learning rate: {best_lr}")

# %%
# Hessian-free steps
# ------------------
# :class:`curvlinops.GGNLinearOperator` is the GGN of the mean loss over the data (here
# one batch of all 1500 images) at the given parameters; ``cache=True`` keeps its
# forward pass for all the products of one step. ``gradient_and_loss()`` returns the
# gradient (as a list shaped like the parameters) and the loss, and
# :func:`curvlinops.flatten_params` / :func:`curvlinops.unflatten_params` convert
# between such lists and the flat vectors the operator acts on.
#
# Each step runs at most 10 CG iterations with ``damping=lam``, and compares the actual
# change of the loss with the change the quadratic model
# :math:`q(\delta) = g^\top \delta + \frac{1}{2} \delta^\top G \delta` predicts. Their
# ratio ``rho`` steers the damping: if the model is good (``rho > 3/4``) ``lam`` shrinks
# threefold, if it is poor (``rho < 1/4``) it grows by half. A step that does not
# decrease the loss is rejected.

train_data = [(X_train, y_train)]
params, lam, passes = initial_params, 1.0, 0
G = cl.GGNLinearOperator(model, loss, params, train_data, cache=True)
grads, value = G.gradient_and_loss()
passes += 1
hf_passes, hf_history, hf_damping, hf_cg_iterations = [passes], [float(value)], [], []
while passes < budget:
    g = cl.flatten_params(grads)
    delta, info = cl.cg(G, -g, damping=lam, rtol=0.1, maxiter=10)
    predicted = float(g @ delta + 0.5 * delta @ (G @ delta))
    passes += 2 * info.iterations + 2  # CG's products with G, and G @ delta
    trial = [p + d for p, d in zip(params, cl.unflatten_params(delta, shapes), strict=True)]
    G_trial = cl.GGNLinearOperator(
        model, loss, trial, train_data, cache=True, num_data=1500, check_deterministic=False
    )
    grads_trial, value_trial = G_trial.gradient_and_loss()
    passes += 1
    rho = (float(value_trial) - float(value)) / predicted
    hf_damping.append(lam)
    hf_cg_iterations.append(info.iterations)
    if rho > 0.75:
        lam /= 3
    elif rho < 0.25:
        lam *= 1.5
    if float(value_trial) < float(value):  # accept the step
        params, G, grads, value = trial, G_trial, grads_trial, value_trial
    hf_passes.append(passes)
    hf_history.append(float(value))
hf_params = params
print(f"Hessian-free: {len(hf_damping)} steps, {passes} passes, final loss {hf_history[-1]:.3g}")

# %%
# Results
# -------
# Gradient descent with its tuned learning rate is ahead at first. The Hessian-free
# steps, an order of magnitude fewer but each more expensive, reduce the loss by a
# steady factor per pass and overtake it. They needed no learning rate: the damping
# adapted itself (here the quadratic model predicted every step well, ``rho > 3/4``, so
# it only shrank), while gradient
# descent's result depends on a learning rate found by trying several (a divergent or
# slow one is easy to pick, see the faint curves).

gd_test, hf_test = accuracy_at(gd_params, X_test, y_test), accuracy_at(hf_params, X_test, y_test)
print(f"test accuracy: gradient descent {gd_test:.3f}, Hessian-free {hf_test:.3f}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=[3, 2])
for lr, (history, _) in gd_runs.items():
    if lr != best_lr:
        ax1.semilogy(history, color="C0", alpha=0.25, lw=1)
ax1.semilogy(gd_history, color="C0", label=f"gradient descent, best lr = {best_lr:g}")
ax1.semilogy(hf_passes, hf_history, "o-", color="C3", ms=4, label="Hessian-free (CG on the GGN)")
ax1.set_xlabel("passes over the training data")
ax1.set_ylabel("training loss (log scale)")
ax1.set_ylim(hf_history[-1] / 3, 5.0)
ax1.set_title("Training loss at equal cost (faint: other learning rates)")
ax1.legend()
steps = range(1, len(hf_damping) + 1)
ax2.semilogy(steps, hf_damping, "s-", color="C2", label="damping $\\lambda$")
ax2.set_xlabel("Hessian-free step")
ax2.set_ylabel("damping (log scale)")
ax2b = ax2.twinx()
ax2b.bar(steps, hf_cg_iterations, color="C7", alpha=0.3, label="CG iterations")
ax2b.set_ylabel("CG iterations")
ax2.set_zorder(ax2b.get_zorder() + 1)
ax2.patch.set_visible(False)
ax2.set_title("Levenberg-Marquardt damping")
handles = ax2.get_legend_handles_labels()[0] + ax2b.get_legend_handles_labels()[0]
ax2.legend(handles=handles, loc="lower left")
fig.tight_layout()

# %%
# The Hessian-free run ends below the best gradient-descent run and below ``1e-3``
# (more than a thousandfold below the initial loss), its damping shrank at every step,
# and both networks classify most
# test images correctly (the last 297 digits are harder than the first 1500):

assert hf_history[-1] < gd_history[-1]
assert all(later < earlier for earlier, later in zip(hf_damping[:-1], hf_damping[1:], strict=True))
assert hf_history[-1] < 1e-3 < hf_history[0] / 1000
assert hf_test > 0.85 and gd_test > 0.85

plt.show()
