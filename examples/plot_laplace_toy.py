"""
Predictive uncertainty of a Laplace approximation on a 2-D toy problem
======================================================================

A small ReLU network classifies scikit-learn's "two moons". Trained to its MAP it is
as confident far from the data as next to it: its logits grow linearly with the
distance. The Laplace approximation of :mod:`curvlinops.bayes` (K-FAC posterior
precision, prior precision tuned by maximizing the marginal likelihood, linearized
predictive with the probit approximation) keeps the MAP's decision boundary, while the
variance of its outputs grows with the distance too, so that its confidence away from
the data stays below one (the effect Kristiadi, Hein & Hennig, 2020, describe).
"""

# %%
# Data and MAP
# ------------
# 200 points of the two moons, an MLP ``2-32-32-2`` with ReLU in the native layers of
# :mod:`curvlinops.nn`, trained to the MAP of a Gaussian prior ``N(0, I / delta_0)`` by
# SciPy's L-BFGS on the model's own gradients (one forward pass and one
# vector-Jacobian product per evaluation).

import array_api_compat.numpy as xp
import matplotlib.pyplot as plt
import numpy as np
from scipy import optimize
from sklearn.datasets import make_moons

from curvlinops import CrossEntropyLoss, flatten_params, nn, unflatten_params
from curvlinops.bayes import Laplace

X, y = make_moons(n_samples=200, noise=0.15, random_state=0)
model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
loss = CrossEntropyLoss(reduction="sum")  # the negative log-likelihood of the data
init = model.init(0, xp=xp, dtype=xp.float64)
shapes = [p.shape for p in init]
delta_0 = 1.0


def negative_log_posterior(theta):
    lin = model.linearize(unflatten_params(theta, shapes), X)
    value = float(loss.sum_value(lin.outputs, y)) + 0.5 * delta_0 * theta @ theta
    grad = flatten_params(lin.vjp(loss.gradient(lin.outputs, y))) + delta_0 * theta
    return value, grad


result = optimize.minimize(
    negative_log_posterior, flatten_params(init), jac=True, method="L-BFGS-B",
    options={"maxiter": 2000},
)  # fmt: skip
params = unflatten_params(result.x, shapes)
accuracy = np.mean(np.argmax(model(params, X), axis=1) == y)
print(f"MAP: training accuracy {accuracy:.3f}")

# %%
# The Laplace approximation
# -------------------------
# K-FAC of the GGN, one block per weight and per bias; the prior precision tuned per
# layer by maximizing the log marginal likelihood (MacKay's fixed point, exact for the
# Kronecker-factored structure).

la = Laplace(model, loss, params, [(X, y)], structure="kron", prior_precision=delta_0)
before = la.log_marginal_likelihood()
tuned = la.optimize_prior_precision("layerwise")
print("tuned prior precisions per layer:", np.round(tuned, 3))
print(f"log marginal likelihood: {before:.2f} at delta_0, {la.log_marginal_likelihood():.2f} tuned")

# %%
# Predictive on a grid
# --------------------
# The MAP's softmax and the Laplace approximation's linearized predictive (probit),
# for 3600 points of a region well beyond the data in one call (their Jacobians in
# batches that fit in memory).

grid = np.linspace(-4.5, 5.5, 60)
G1, G2 = np.meshgrid(grid, grid - 0.25)
points = np.stack([G1.ravel(), G2.ravel()], axis=1)
logits = model(params, points)
map_probs = np.exp(logits - logits.max(axis=1, keepdims=True))
map_probs /= map_probs.sum(axis=1, keepdims=True)
laplace_probs = la.predictive(points)

fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
for ax, probs, title in zip(
    axes, (map_probs, laplace_probs), ("MAP", "Laplace (K-FAC, tuned prior)"), strict=True
):
    confidence = probs.max(axis=1).reshape(G1.shape)
    image = ax.contourf(G1, G2, confidence, levels=np.linspace(0.5, 1.0, 11), cmap="viridis")
    ax.contour(G1, G2, probs[:, 1].reshape(G1.shape), levels=[0.5], colors="w", linewidths=1.5)
    ax.scatter(X[:, 0], X[:, 1], c=y, cmap="coolwarm", s=10, edgecolors="k", linewidths=0.3)
    ax.set_title(title)
    ax.set_xlabel("$x_1$")
axes[0].set_ylabel("$x_2$")
fig.colorbar(image, ax=axes, label="confidence (largest class probability)")

# %%
# The decision boundaries (white) agree; far from the data the MAP stays certain while
# the Laplace predictive is not:

far = np.linalg.norm(points - X.mean(axis=0), axis=1) > 3.0
map_far, laplace_far = map_probs.max(axis=1)[far].mean(), laplace_probs.max(axis=1)[far].mean()
print(f"mean confidence far from the data: MAP {map_far:.3f}, Laplace {laplace_far:.3f}")
assert laplace_far < map_far - 0.05
agree = np.mean(np.argmax(map_probs, axis=1) == np.argmax(laplace_probs, axis=1))
assert agree > 0.97, agree
