"""
Fisher, GGN and the empirical Fisher
====================================

Three curvature matrices built from first derivatives only are easy to confuse:

* the **generalized Gauss-Newton** (GGN) matrix
  :math:`G = \\sum_n J_n^\\top H_{L,n} J_n`, with :math:`J_n` the Jacobian of the model's
  output :math:`f_n` for datum :math:`n` and :math:`H_{L,n}` the Hessian of the loss in
  the output :math:`f_n`;
* the **Fisher** :math:`F = \\sum_n J_n^\\top \\mathbb{E}_{y \\sim r(y | f_n)}
  [\\nabla_f \\log r \\, \\nabla_f \\log r^\\top] J_n`, where :math:`r(y | f)` is the
  predictive distribution whose negative log-likelihood is the loss;
* the **empirical Fisher** (EF), the same outer product of gradients but at the
  *observed* labels :math:`y_n` instead of labels drawn from the model.

This example shows, with :class:`~curvlinops.GGNLinearOperator`,
:class:`~curvlinops.FisherLinearOperator` and :class:`~curvlinops.EFLinearOperator`:

1. :math:`F = G` exactly when the loss is an exponential family in its natural
   parameters (squared error, softmax cross-entropy, binary cross-entropy on logits,
   Poisson on log-rates), and :math:`F \\neq G` for a Gaussian that also predicts its
   variance;
2. the empirical Fisher is not the Fisher: on a linear regression problem its
   "natural gradient" :math:`\\mathrm{EF}^{-1} g` turns away from :math:`F^{-1} g` as
   soon as the parameters are far from the optimum.

curvlinops computes the Fisher from its definition (closed forms and exact
enumeration over the predictive distribution), not from the GGN code, so the
comparisons below test something real.
"""

import array_api_compat.numpy as xp
import matplotlib.pyplot as plt
import numpy as np

import curvlinops as cl
from curvlinops import nn

# %%
# F = G for exponential families in their natural parameters
# -----------------------------------------------------------
#
# A small MLP (3 inputs, 6 tanh units) on 16 random inputs. Each loss gets targets of
# the kind it expects and as many outputs as it needs: the Gaussian with predicted
# variance (:class:`~curvlinops.GaussianNLLLoss`) reads its two outputs as the mean
# :math:`\mu` and the log-variance :math:`s`.

rng = np.random.default_rng(0)
N, D_in = 16, 3
X = rng.standard_normal((N, D_in))

cases = {
    "MSE\n(Gaussian mean)": (cl.MSELoss(), 2, rng.standard_normal((N, 2))),
    "cross-entropy\n(softmax logits)": (cl.CrossEntropyLoss(), 3, rng.integers(0, 3, size=N)),
    "BCE\n(logits)": (
        cl.BCEWithLogitsLoss(),
        2,
        rng.integers(0, 2, size=(N, 2)).astype(np.float64),
    ),
    "Poisson\n(log-rates)": (
        cl.PoissonNLLLoss(),
        2,
        rng.poisson(2.0, size=(N, 2)).astype(np.float64),
    ),
    "Gaussian NLL\n(mean, log-var)": (cl.GaussianNLLLoss(), 2, rng.standard_normal((N, 1))),
}


def small_mlp(num_outputs):
    model = nn.Sequential(nn.Linear(D_in, 6), nn.Tanh(), nn.Linear(6, num_outputs))
    return model, model.init(1, xp=xp, dtype=xp.float64)


# %%
# For each loss we build both operators over the same data and compare their dense
# matrices (``to_dense()`` is one batched product with the identity). The relative
# difference :math:`\| F - G \|_F / \| F \|_F` is at rounding level for the four natural
# parameterizations: their loss Hessian does not depend on the label and equals the
# covariance of the score.

relative_difference = {}
for name, (loss, num_outputs, y) in cases.items():
    model, params = small_mlp(num_outputs)
    F = cl.FisherLinearOperator(model, loss, params, [(X, y)]).to_dense()
    G = cl.GGNLinearOperator(model, loss, params, [(X, y)]).to_dense()
    relative_difference[name] = np.linalg.norm(F - G) / np.linalg.norm(F)
    print(
        f"{name.replace(chr(10), ' '):34s} P = {F.shape[0]:3d}   "
        f"||F - G|| / ||F|| = {relative_difference[name]:.2e}"
    )
    if loss.is_natural:
        assert np.allclose(F, G, rtol=1e-12, atol=1e-14), name

# %%
# For the Gaussian with predicted variance, the loss Hessian in :math:`(\mu, s)`,
#
# .. math::
#
#     \begin{pmatrix} e^{-s} & (y - \mu) e^{-s} \\ (y - \mu) e^{-s} &
#     \tfrac12 (y - \mu)^2 e^{-s} \end{pmatrix},
#
# depends on the label :math:`y` (and is even indefinite when :math:`y \neq \mu`), while
# the Fisher is its expectation under the model, :math:`\mathrm{diag}(e^{-s}, 1/2)`.
# Here the two matrices differ by a large fraction of their norm, and the GGN has
# negative eigenvalues.

gauss = "Gaussian NLL\n(mean, log-var)"
assert relative_difference[gauss] > 0.3
loss, num_outputs, y = cases[gauss]
model, params = small_mlp(num_outputs)
G = cl.GGNLinearOperator(model, loss, params, [(X, y)]).to_dense()
F = cl.FisherLinearOperator(model, loss, params, [(X, y)]).to_dense()
print(
    f"smallest eigenvalue of G: {np.linalg.eigvalsh(G)[0]:.3f}, "
    f"of F: {np.linalg.eigvalsh(F)[0]:.1e}"
)
assert np.linalg.eigvalsh(G)[0] < -1e-3
assert np.linalg.eigvalsh(F)[0] > -1e-12

# %%
# The Fisher *is* the GGN averaged over labels drawn from the model. The loss Hessian
# above depends on the label only through :math:`y - \mu` and :math:`(y - \mu)^2`, so
# two labels per datum that match the first two moments of the predictive
# distribution, :math:`y_\pm = \mu \pm e^{s/2}`, give the expectation exactly:
# :math:`F = \tfrac12 (G(y_+) + G(y_-))`.

outputs = model(params, X)
mean, std = outputs[:, :1], np.exp(outputs[:, 1:] / 2)
G_plus = cl.GGNLinearOperator(model, loss, params, [(X, mean + std)]).to_dense()
G_minus = cl.GGNLinearOperator(model, loss, params, [(X, mean - std)]).to_dense()
print("F == (G(y+) + G(y-)) / 2:", np.allclose(F, (G_plus + G_minus) / 2, rtol=1e-12))
assert np.allclose(F, (G_plus + G_minus) / 2, rtol=1e-12, atol=1e-14)

# %%
# The bar chart shows the relative differences on a logarithmic scale (a difference of
# exactly zero is drawn at :math:`10^{-17}`).

fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
names = list(relative_difference)
heights = [max(relative_difference[n], 1e-17) for n in names]
colors = ["tab:blue" if cases[n][0].is_natural else "tab:red" for n in names]
ax.bar(names, heights, color=colors)
ax.set_yscale("log")
ax.set_ylim(1e-18, 10)
ax.axhline(np.finfo(np.float64).eps, color="gray", ls="--", lw=1, label="machine epsilon")
ax.set_ylabel(r"$\|F - G\|_F \,/\, \|F\|_F$")
ax.set_title("Fisher vs. GGN: equal in natural parameters (blue), not otherwise (red)")
ax.legend(loc="upper left")
ax.tick_params(axis="x", labelsize=8)

# %%
# The empirical Fisher is not the Fisher
# --------------------------------------
#
# Linear regression :math:`y = w z + b + \sigma \varepsilon` with the squared error
# (:class:`~curvlinops.MSELoss`, whose Gaussian has variance 1/2). The model is linear
# in :math:`\theta = (w, b)`, so :math:`F = G = 2 \cdot \frac1N \sum_n x_n x_n^\top`
# with :math:`x_n = (z_n, 1)`, the same everywhere, and the natural gradient
# :math:`F^{-1} g = \theta - \theta^\star` points from the least-squares solution
# :math:`\theta^\star` to :math:`\theta`: it is Newton's step. The empirical Fisher
# :math:`\frac1N \sum_n 4 r_n^2 x_n x_n^\top` weights each datum by its squared residual
# :math:`r_n`, which changes with :math:`\theta`.

N_reg, sigma = 2000, 0.3
z = rng.standard_normal((N_reg, 1))
y_reg = 2.0 * z - 1.0 + sigma * rng.standard_normal((N_reg, 1))
theta_star = np.linalg.lstsq(np.hstack([z, np.ones((N_reg, 1))]), y_reg[:, 0], rcond=None)[0]

linear = nn.Sequential(nn.Linear(1, 1))  # parameters: weight (1, 1), then bias (1,)
mse = cl.MSELoss()


def natural_directions(theta):
    """``F^{-1} g`` and ``EF^{-1} g`` at ``theta = (w, b)``."""
    params = [np.array([[theta[0]]]), np.array([theta[1]])]
    data = [(z, y_reg)]
    fisher = cl.FisherLinearOperator(linear, mse, params, data, check_deterministic=False)
    empirical = cl.EFLinearOperator(linear, mse, params, data, check_deterministic=False)
    g = cl.flatten_params(fisher.gradient_and_loss()[0])
    return np.linalg.solve(fisher.to_dense(), g), np.linalg.solve(empirical.to_dense(), g)


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# %%
# We measure the cosine between the two directions at points
# :math:`\theta = \theta^\star + \rho \sigma (\cos\varphi, \sin\varphi)`, for distances
# :math:`\rho` (in units of the noise level, so small :math:`\rho` is "converged" and
# large :math:`\rho` is "early in training") and 12 directions :math:`\varphi`.
#
# For comparison, the population limit (:math:`N \to \infty`, :math:`z` standard
# normal): with :math:`\delta = \theta - \theta^\star` the residual is
# :math:`r = \sigma\varepsilon - x^\top \delta`, and Gaussian moments give
# :math:`\mathrm{EF} \propto M(\delta) + \sigma^2 I` with
# :math:`M = \begin{pmatrix} \delta_b^2 + 3 \delta_w^2 & 2 \delta_w \delta_b \\
# 2 \delta_w \delta_b & \delta_b^2 + \delta_w^2 \end{pmatrix}`, while
# :math:`F \propto I`.


def population_cosine(delta):
    dw, db = delta
    M = np.array([[db**2 + 3 * dw**2, 2 * dw * db], [2 * dw * db, db**2 + dw**2]])
    return cosine(delta, np.linalg.solve(M + sigma**2 * np.eye(2), delta))


rhos = np.logspace(-2, 2, 21)
phis = np.linspace(0, np.pi, 12, endpoint=False)
sample_cos = np.empty((rhos.size, phis.size))
population_cos = np.empty_like(sample_cos)
for i, rho in enumerate(rhos):
    for j, phi in enumerate(phis):
        delta = rho * sigma * np.array([np.cos(phi), np.sin(phi)])
        sample_cos[i, j] = cosine(*natural_directions(theta_star + delta))
        population_cos[i, j] = population_cosine(delta)

worst = sample_cos.min(axis=1)
print(f"near the optimum (rho = {rhos[0]:g}): worst cosine {worst[0]:.4f}")
print(
    f"far from it      (rho = {rhos[-1]:g}): worst cosine {worst[-1]:.4f} "
    f"({np.degrees(np.arccos(worst[-1])):.0f} degrees), population limit "
    f"{population_cos.min(axis=1)[-1]:.4f}"
)

# %%
# What theory lets us assert:
#
# * **near the optimum**, the residuals are the noise, independent of :math:`x` and of
#   equal variance, so :math:`\mathrm{EF} \approx 4\sigma^2 \frac1N \sum_n x_n
#   x_n^\top \propto F` up to sampling fluctuations of order :math:`1/\sqrt{N}`: the
#   directions agree;
# * **far from it**, the residuals are dominated by :math:`x^\top \delta` and the
#   empirical Fisher's directions turn by tens of degrees in the worst case (about 46
#   degrees in the population limit; we assert more than 35); the sample value is
#   within finite-sample error of that limit.

assert worst[0] > 0.99
assert worst[-1] < 0.8
assert abs(worst[-1] - population_cos.min(axis=1)[-1]) < 0.1

# %%
# Left: the two preconditioned descent directions :math:`-F^{-1} g` and
# :math:`-\mathrm{EF}^{-1} g` (normalized) on a grid around :math:`\theta^\star`, over
# the loss's contours; the Fisher's arrows point straight at the optimum, the empirical
# Fisher's swerve. Right: the cosine between them against the distance from the
# optimum.

fig, (ax_field, ax_cos) = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
span = 3.0
W, B = np.meshgrid(
    np.linspace(theta_star[0] - span, theta_star[0] + span, 9),
    np.linspace(theta_star[1] - span, theta_star[1] + span, 9),
)
grid = np.stack([W.ravel(), B.ravel()], axis=1)
W_fine, B_fine = np.meshgrid(
    np.linspace(theta_star[0] - span, theta_star[0] + span, 60),
    np.linspace(theta_star[1] - span, theta_star[1] + span, 60),
)
residuals = W_fine.ravel()[:, None] * z[:, 0] + B_fine.ravel()[:, None] - y_reg[:, 0]
mean_squared = np.mean(residuals**2, axis=1).reshape(W_fine.shape)
ax_field.contour(W_fine, B_fine, mean_squared, 10, colors="0.8")
arrows = {"Fisher": [], "empirical Fisher": []}
for theta in grid:
    if np.linalg.norm(theta - theta_star) < 1e-9:
        arrows["Fisher"].append(np.zeros(2))
        arrows["empirical Fisher"].append(np.zeros(2))
        continue
    for key, direction in zip(arrows, natural_directions(theta), strict=True):
        arrows[key].append(-direction / np.linalg.norm(direction))
for (key, vectors), color in zip(arrows.items(), ["tab:blue", "tab:orange"], strict=True):
    vectors = np.array(vectors)
    ax_field.quiver(
        grid[:, 0],
        grid[:, 1],
        vectors[:, 0],
        vectors[:, 1],
        color=color,
        angles="xy",
        scale=13,
        width=0.006,
        pivot="tail",
        label=rf"$-$({key})$^{{-1}} g$",
    )
ax_field.plot(*theta_star, "k*", ms=12, label=r"least squares $\theta^\star$")
ax_field.set_xlabel("weight $w$")
ax_field.set_ylabel("bias $b$")
ax_field.set_aspect("equal")
ax_field.set_title("Preconditioned descent directions")
ax_field.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=3, fontsize=8)

ax_cos.semilogx(
    rhos,
    sample_cos.mean(axis=1),
    "o-",
    color="tab:orange",
    label=f"mean over 12 directions (N = {N_reg})",
)
ax_cos.semilogx(rhos, worst, "s-", color="tab:red", label="worst direction")
ax_cos.semilogx(rhos, population_cos.min(axis=1), "k--", label=r"worst, $N \to \infty$")
ax_cos.set_xlabel(r"distance from the optimum $\|\theta - \theta^\star\| / \sigma$")
ax_cos.set_ylabel(r"cosine($F^{-1} g$, EF$^{-1} g$)")
ax_cos.set_ylim(0.5, 1.02)
ax_cos.set_title("Empirical Fisher vs. Fisher direction")
ax_cos.legend(loc="lower left")
plt.show()
