"""
The Hessian spectrum of a small CNN
===================================

Tools such as PyHessian look at three properties of a trained network's loss Hessian:
its top eigenvalues (how sharp the minimum is), its trace (the total curvature), and
its spectral density (how the eigenvalues are spread out). None of them needs the
Hessian as a matrix; each needs only Hessian-vector products, which curvlinops
provides behind a linear operator.

This example trains a small PyTorch CNN on scikit-learn's digits for a few seconds,
wraps it with :class:`~curvlinops.frontends.torch.TorchModel`, and computes

- the top eigenvalues by Lanczos (:func:`curvlinops.eigsh`),
- the trace by Hutchinson's estimator and by Hutch++
  (:func:`curvlinops.hutchinson_trace`, :func:`curvlinops.hutchpp_trace`),
- the spectral density by stochastic Lanczos quadrature
  (:func:`curvlinops.spectral_density`).

At the end, on a few images, every one of these numbers is checked against the dense
Hessian built directly with ``torch.func``.
"""

# %%
# Data and model
# --------------
# The digits are 8x8 grey-scale images of the digits 0-9. We train on the first 1500
# and test on the other 297. Everything runs in float64, so that the checks against
# the dense Hessian can be tight.

import math

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits

import curvlinops as cl
from curvlinops.frontends.torch import TorchModel, translate_loss


def trapezoid(y, x):
    """Trapezoid rule (``np.trapezoid`` is NumPy 2 only)."""
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


torch.manual_seed(0)

digits_X, digits_y = load_digits(return_X_y=True)
X = torch.as_tensor(digits_X / 16.0, dtype=torch.float64).reshape(-1, 1, 8, 8)
y = torch.as_tensor(digits_y)
X_train, y_train, X_test, y_test = X[:1500], y[:1500], X[1500:], y[1500:]

net = torch.nn.Sequential(
    torch.nn.Conv2d(1, 4, kernel_size=3, padding=1),  # 4 x 8 x 8
    torch.nn.ReLU(),
    torch.nn.MaxPool2d(2),  # 4 x 4 x 4
    torch.nn.Conv2d(4, 8, kernel_size=3, padding=1),  # 8 x 4 x 4
    torch.nn.ReLU(),
    torch.nn.MaxPool2d(2),  # 8 x 2 x 2
    torch.nn.Flatten(),
    torch.nn.Linear(32, 10),
).double()
num_params = sum(p.numel() for p in net.parameters())
print(f"{num_params} parameters")

# %%
# Twelve epochs of Adam
# ---------------------
# Plain PyTorch training, a few seconds; curvlinops plays no part in it.

loss_function = torch.nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
shuffle = torch.Generator().manual_seed(0)
for _epoch in range(12):
    for batch in torch.randperm(1500, generator=shuffle).split(50):
        optimizer.zero_grad()
        loss_function(net(X_train[batch]), y_train[batch]).backward()
        optimizer.step()
with torch.no_grad():
    train_loss = loss_function(net(X_train), y_train).item()
    test_accuracy = (net(X_test).argmax(1) == y_test).double().mean().item()
print(f"training loss {train_loss:.4f}, test accuracy {test_accuracy:.3f}")
assert train_loss < 0.3 and test_accuracy > 0.8

# %%
# The Hessian as a linear operator
# --------------------------------
# :class:`~curvlinops.frontends.torch.TorchModel` adapts the module to the library's
# model protocol: its parameters become a list of tensors (``model.params``), and
# operators act on flat vectors of all of them, in ``net.named_parameters()`` order.
# :func:`~curvlinops.frontends.torch.translate_loss` turns the PyTorch loss into the
# curvlinops loss of the same value.
#
# Like PyHessian, we take the Hessian of the mean loss on a part of the training set:
# 500 images, given to the operator as two batches (the operator sums over batches and
# divides by 500, whatever the batch sizes). ``cache=True`` keeps each batch's forward
# pass between products, since we will multiply a few hundred times. Constructing the
# operator computes nothing but a check that the data iterate deterministically.

model = TorchModel(net)
loss = translate_loss(loss_function)
data = [(X_train[:250], y_train[:250]), (X_train[250:500], y_train[250:500])]
H = cl.HessianLinearOperator(model, loss, model.params, data, cache=True)
print(H)

# %%
# Top eigenvalues by Lanczos
# --------------------------
# :func:`curvlinops.eigsh` runs thick-restart Lanczos; each step is one Hessian-vector
# product ``H @ v`` on ``torch.Tensor`` vectors.

top_eigenvalues, top_eigenvectors = cl.eigsh(H, k=4, which="LA", seed=0)
print("top eigenvalues:", np.round(top_eigenvalues.numpy()[::-1], 4))

# %%
# Each pair satisfies ``H q = lambda q`` to a tiny residual; an ``(n, k)`` matrix is
# multiplied in one batched pass:

residuals = torch.linalg.vector_norm(
    H @ top_eigenvectors - top_eigenvectors * top_eigenvalues, dim=0
)
print("residuals:", residuals.numpy())
assert residuals.max() < 1e-8 * top_eigenvalues.max()

# %%
# The trace
# ---------
# Hutchinson's estimator averages ``v^T H v`` over random vectors ``v`` with +-1
# entries. Hutch++ spends a third of its products on a sketch of the top of the
# spectrum, whose trace it takes exactly, and the rest on Hutchinson for the remainder.
# Both take an explicit seed. (How close such estimates are to the exact trace is
# checked at the end, where the exact trace is known.)

trace_hutchinson = float(cl.hutchinson_trace(H, 60, seed=0))
trace_hutchpp = float(cl.hutchpp_trace(H, 60, seed=0))
print(f"trace with 60 products: Hutchinson {trace_hutchinson:.2f}, Hutch++ {trace_hutchpp:.2f}")

# %%
# The spectral density
# --------------------
# Stochastic Lanczos quadrature (SLQ) runs a short Lanczos recursion from each of a few
# random unit vectors, all of them together (one ``H @ V`` per step). The Ritz values
# and weights of each run form a quadrature rule for the eigenvalue distribution; their
# average, with each node widened to a narrow Gaussian, is the density. ``kappa`` sets
# the width of the Gaussians (larger is narrower). The density integrates to one.
#
# Most eigenvalues of a trained network's Hessian sit near zero and a few are large,
# so, as PyHessian does, we plot the density on a logarithmic axis.

grid, density = cl.spectral_density(H, num_probes=5, lanczos_steps=40, kappa=10.0, seed=0)
grid, density = grid.numpy(), density.numpy()
mass = trapezoid(density, grid)
print(f"integral of the density: {mass:.10f}")
assert abs(mass - 1.0) < 1e-10 and density.min() >= 0.0

fig, ax = plt.subplots(figsize=(7, 4))
ax.semilogy(grid, density + 1e-6, color="C0", label="spectral density (SLQ)")
for i, lam in enumerate(top_eigenvalues.numpy()):
    label = "top eigenvalues (Lanczos)" if i == 0 else None
    ax.axvline(lam, color="C3", lw=1, ls="--", label=label)
ax.set_ylim(1e-6, None)
ax.set_xlabel("eigenvalue")
ax.set_ylabel("density (log scale)")
ax.set_title(f"Hessian spectrum of a {num_params}-parameter CNN, 500 digits")
ax.legend()
fig.tight_layout()

# %%
# The largest Ritz value of SLQ is an eigenvalue estimate too; it agrees with Lanczos,
# so the density's right edge is where the top eigenvalue is.

right_edge = grid[np.nonzero(density > 1e-3 * density.max())[0][-1]]
print(f"right edge of the density {right_edge:.3f}, top eigenvalue {top_eigenvalues[-1]:.3f}")
assert abs(right_edge - top_eigenvalues[-1].item()) < 0.05 * top_eigenvalues[-1].item()

# %%
# Checking against the dense Hessian
# ----------------------------------
# To make sure these numbers are right, we repeat them on 50 training images, where the
# dense :math:`P \times P` Hessian is cheap to build with ``torch.func`` directly
# from the module, without curvlinops: the mean loss as a function of one flat
# parameter vector, differentiated twice.

X_small, y_small = X_train[:50], y_train[:50]
H_small = cl.HessianLinearOperator(model, loss, model.params, [(X_small, y_small)], cache=True)

shapes = [p.shape for p in model.params]
theta = torch.cat([p.reshape(-1) for p in model.params])


def loss_of_flat(flat):
    chunks = flat.split([math.prod(s) for s in shapes])
    params = {n: c.reshape(s) for n, c, s in zip(model.param_names, chunks, shapes, strict=True)}
    return loss_function(torch.func.functional_call(net, params, (X_small,)), y_small)


H_dense = torch.func.jacrev(torch.func.grad(loss_of_flat))(theta)
eigenvalues_dense = torch.linalg.eigvalsh(H_dense)

# %%
# The top eigenvalues by Lanczos agree with the dense ones to many digits:

top_small, _ = cl.eigsh(H_small, k=4, which="LA", seed=0)
print("Lanczos:", top_small.numpy()[::-1])
print("dense:  ", eigenvalues_dense[-4:].numpy()[::-1])
assert torch.allclose(top_small, eigenvalues_dense[-4:], rtol=1e-8)

# %%
# Hutchinson's estimate with ``m`` Rademacher vectors is random, with variance
# :math:`2 (\|H\|_F^2 - \sum_i H_{ii}^2) / m`. We require it to lie within four
# standard deviations of the exact trace, and Hutch++ (whose error is smaller when a
# few eigenvalues dominate) to lie within the same bound.

exact_trace = torch.trace(H_dense).item()
m = 90
off_diagonal = H_dense.square().sum() - H_dense.diagonal().square().sum()
std = math.sqrt(2 * off_diagonal.item() / m)
estimate = float(cl.hutchinson_trace(H_small, m, seed=0))
estimate_pp = float(cl.hutchpp_trace(H_small, m, seed=0))
print(f"exact trace {exact_trace:.4f}")
print(f"Hutchinson  {estimate:.4f}, error {abs(estimate - exact_trace) / std:.2f} std")
print(f"Hutch++     {estimate_pp:.4f}, error {abs(estimate_pp - exact_trace) / std:.2f} std")
assert abs(estimate - exact_trace) < 4 * std
assert abs(estimate_pp - exact_trace) < 4 * std

# %%
# Finally the density. SLQ estimates ``(1/P) sum_j N(x; lambda_j, sigma^2)``, the
# eigenvalues each widened to a Gaussian of the width ``sigma`` that ``kappa`` sets:
# with the ``lanczos_steps`` Ritz values spread over the grid, a Gaussian has ``1 /
# kappa`` of its peak half a node spacing away from its center. We build the same
# smoothed density from the dense eigenvalues and compare the cumulative
# distributions. At each point, the SLQ value is an average over the probes of
# ``v^T f(H) v`` for a function ``f`` with values in [0, 1], whose standard deviation is
# at most ``sqrt(2 / (P num_probes))``; we allow four of them.

num_probes, lanczos_steps, kappa = 5, 40, 10.0
grid_s, density_s = cl.spectral_density(
    H_small, num_probes=num_probes, lanczos_steps=lanczos_steps, kappa=kappa, seed=0
)
grid_s, density_s = grid_s.numpy(), density_s.numpy()
assert abs(trapezoid(density_s, grid_s) - 1.0) < 1e-10

spacing = (grid_s[-1] - grid_s[0]) / (lanczos_steps - 1)
sigma = spacing / math.sqrt(8 * math.log(kappa))
z = (grid_s[:, None] - eigenvalues_dense.numpy()[None, :]) / sigma
density_dense = np.exp(-0.5 * z**2).sum(axis=1)
density_dense /= trapezoid(density_dense, grid_s)


def cdf(density, grid):
    return np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(grid))])


cdf_error = np.abs(cdf(density_s, grid_s) - cdf(density_dense, grid_s)).max()
bound = 4 * math.sqrt(2 / (num_params * num_probes))
print(f"largest difference of the distribution functions {cdf_error:.4f} (bound {bound:.4f})")
assert cdf_error < bound

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
ax1.semilogy(grid_s, density_dense + 1e-6, color="C1", lw=3, alpha=0.6, label="dense, smoothed")
ax1.semilogy(grid_s, density_s + 1e-6, color="C0", label=f"SLQ, {num_probes} probes")
ax1.set_ylim(1e-4, None)
ax1.set_xlabel("eigenvalue")
ax1.set_ylabel("density (log scale)")
ax1.legend()
above_dense = 1 - np.arange(1, num_params + 1) / num_params
ax2.step(
    np.sort(eigenvalues_dense.numpy()),
    above_dense,
    where="post",
    color="C2",
    label="dense eigenvalues",
)
ax2.plot(
    grid_s, 1 - cdf(density_dense, grid_s), color="C1", lw=3, alpha=0.6, label="dense, smoothed"
)
ax2.plot(grid_s, 1 - cdf(density_s, grid_s), color="C0", label="SLQ")
ax2.set_yscale("log")
ax2.set_ylim(1 / num_params / 2, 1.5)
ax2.set_xlabel("eigenvalue")
ax2.set_ylabel("fraction of eigenvalues above (log scale)")
ax2.legend(loc="upper right")
fig.suptitle("Hessian on 50 digits: SLQ against the dense eigenvalues")
fig.tight_layout()

plt.show()
