"""
How good are the curvature approximations?
==========================================

The exact generalized Gauss-Newton matrix :math:`G` of a network has :math:`P^2`
entries; the structured approximations that second-order optimizers and Laplace
approximations use instead are cheap to store and to invert:

* the **diagonal** of :math:`G` (:class:`~curvlinops.GGNDiagonalLinearOperator`),
* its **diagonal blocks**, one per layer (:func:`~curvlinops.block_diagonal`),
* **K-FAC**, one Kronecker product :math:`B \\otimes A` per weight
  (:class:`~curvlinops.curvature.kfac.KFACLinearOperator`),
* **EKFAC**, K-FAC's eigenbasis with refitted eigenvalues
  (:class:`~curvlinops.curvature.ekfac.EKFACLinearOperator`),
* a **low-rank** approximation from the top of the spectrum found by Lanczos
  (:func:`~curvlinops.low_rank`).

On a small MLP this example compares each with the exact GGN in three ways: which
properties hold *exactly* (the ones the literature guarantees, asserted below), how
their spectra look, and how close their damped natural-gradient directions
:math:`(A + \\lambda I)^{-1} g` come to the exact :math:`(G + \\lambda I)^{-1} g`.
"""

import array_api_compat.numpy as xp
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits

import curvlinops as cl
from curvlinops import nn

# %%
# Problem
# -------
#
# 300 of scikit-learn's bundled handwritten digits, average-pooled from 8x8 to 4x4
# pixels and standardized, classified by an MLP 16-12-10 (tanh) with the softmax
# cross-entropy, at its random initialization. The data are passed as three batches
# of 100; every operator is the curvature of the mean loss over all 300.

X, y = load_digits(return_X_y=True)
X = X.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)
X = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-8)
N = 300
X, y = X[:N], y[:N]
data = [(X[i : i + 100], y[i : i + 100]) for i in range(0, N, 100)]

model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 10))
params = model.init(0, xp=xp, dtype=xp.float64)
loss = cl.CrossEntropyLoss()

G = cl.GGNLinearOperator(model, loss, params, data)
G_dense = G.to_dense()  # P products in one batched pass: fine for a small model
P = G.shape[0]
eigenvalues, eigenvectors = np.linalg.eigh(G_dense)
exact_eigenvalues = eigenvalues[::-1]  # descending
print(f"P = {P} parameters, largest GGN eigenvalue {exact_eigenvalues[0]:.3f}")

# %%
# The approximations
# ------------------
#
# All of them are linear operators of the same shape as ``G`` over the same data.
# K-FAC and EKFAC use the GGN's own output-space factor (``fisher_type="type-2"``,
# the default), so they approximate exactly this :math:`G`.

approximations = {
    "diagonal": cl.GGNDiagonalLinearOperator(model, loss, params, data),
    "block-diagonal (per layer)": cl.block_diagonal(G),
    "K-FAC": cl.KFACLinearOperator(model, loss, params, data),
    "EKFAC": cl.EKFACLinearOperator(model, loss, params, data),
    "low rank (k = 20, Lanczos)": cl.low_rank(G, 20, seed=0),
}
dense = {name: A.to_dense() for name, A in approximations.items()}

# %%
# What must hold exactly
# ----------------------
#
# **The diagonal is the exact diagonal.** The GGN diagonal is computed from the layer
# taps in one pass, without forming :math:`G`; it must equal the diagonal of the dense
# matrix.

assert np.allclose(approximations["diagonal"].diagonal(), np.diag(G_dense), rtol=1e-10, atol=0)

# %%
# **Block-diagonal with one block is the exact GGN**, and the per-layer blocks are
# the exact diagonal blocks.

one_block = cl.block_diagonal(G, partition=[[0, 1, 2, 3]])
assert np.allclose(one_block.to_dense(), G_dense, rtol=1e-12, atol=1e-15)
sizes = [block.shape[0] for block in approximations["block-diagonal (per layer)"].blocks]
print("per-layer block sizes:", sizes)

# %%
# **Frobenius-norm projections.** The block-diagonal part of :math:`G` is the
# Frobenius-closest matrix with that block structure, so it beats every approximation
# with that structure or a finer one: the diagonal, K-FAC and EKFAC (K-FAC's blocks
# are per weight and per bias, within the layers' blocks). EKFAC is the
# Frobenius-closest matrix that is diagonal in K-FAC's eigenbasis, and K-FAC is one
# of those matrices, so EKFAC is at least as close as K-FAC (George et al., 2018).
# The best rank-:math:`k` approximation (Eckart-Young) misses exactly the eigenvalues
# it drops, :math:`\|G - G_k\|_F^2 = \sum_{i > k} \lambda_i^2`, and Lanczos finds it.

G_norm = np.linalg.norm(G_dense)
error = {name: np.linalg.norm(G_dense - A) / G_norm for name, A in dense.items()}
for name, e in error.items():
    print(f"{name:28s} ||G - A||_F / ||G||_F = {e:.4f}")

block = error["block-diagonal (per layer)"]
assert block <= error["diagonal"] and block <= error["EKFAC"] <= error["K-FAC"]
eckart_young = np.sqrt(np.sum(exact_eigenvalues[20:] ** 2)) / G_norm
assert np.isclose(error["low rank (k = 20, Lanczos)"], eckart_young, rtol=1e-8)

# %%
# **Low rank is exact at the rank of** :math:`G`. The softmax is unchanged when the
# same number is added to every logit, so the GGN has a null direction for the last
# bias (all ones) and 12 for the last weight (the same vector of 12 numbers added to
# each of its rows): :math:`P - 13` nonzero eigenvalues. A rank-:math:`(P - 13)`
# approximation reproduces :math:`G`.

rank = int(np.sum(exact_eigenvalues > 1e-10 * exact_eigenvalues[0]))
print(f"numerical rank of G: {rank} = P - {P - rank}")
assert rank == P - 13
full = cl.low_rank(G, rank, seed=0)
assert np.linalg.norm(full.to_dense() - G_dense) < 1e-10 * G_norm

# %%
# **K-FAC is exact for a single datum.** For one data point, a layer's weight block is
# :math:`(a a^\top) \otimes (\sum_m g_m g_m^\top)` exactly, with :math:`a` the layer's
# input and :math:`g_m` its output gradients for the columns of the loss Hessian's
# factor; with weight and bias in one block (``separate_weight_and_bias=False``),
# K-FAC equals the exact per-layer blocks.

one_datum = [(X[:1], y[:1])]
K_one = cl.KFACLinearOperator(model, loss, params, one_datum, separate_weight_and_bias=False)
G_one = cl.block_diagonal(cl.GGNLinearOperator(model, loss, params, one_datum))
assert np.allclose(K_one.to_dense(), G_one.to_dense(), rtol=1e-10, atol=1e-14)

# %%
# Spectra
# -------
#
# The sorted eigenvalues of each approximation against the exact ones (logarithmic
# scale; the low-rank approximation has only its 20 nonzero eigenvalues). The diagonal
# compresses the spread of the spectrum; K-FAC and EKFAC follow its shape; the
# low-rank approximation is exact at the top and zero below.

spectra = {
    name: np.clip(np.linalg.eigvalsh((A + A.T) / 2)[::-1], 0, None) for name, A in dense.items()
}
spectra["low rank (k = 20, Lanczos)"] = spectra["low rank (k = 20, Lanczos)"][:20]
assert np.allclose(spectra["low rank (k = 20, Lanczos)"], exact_eigenvalues[:20], rtol=1e-8)

palette = ["tab:green", "tab:purple", "tab:orange", "tab:red", "tab:brown"]
colors = dict(zip(dense, palette, strict=True))
fig, (ax_spec, ax_err) = plt.subplots(
    1, 2, figsize=(10.5, 4.2), layout="constrained", width_ratios=[3, 2]
)
floor = 1e-8 * exact_eigenvalues[0]
index = np.arange(1, P + 1)
exact_clipped = np.maximum(exact_eigenvalues, floor)
ax_spec.semilogy(index, exact_clipped, "k", lw=3, alpha=0.4, label="exact GGN")
for name, values in spectra.items():
    style = "o" if name.startswith("low rank") else "-"
    ax_spec.semilogy(
        index[: values.size],
        np.maximum(values, floor),
        style,
        color=colors[name],
        ms=4,
        zorder=3,
        label=name,
    )
ax_spec.set_ylim(floor / 3, 3 * exact_eigenvalues[0])
ax_spec.set_xlabel("index $i$ (descending order)")
ax_spec.set_ylabel(r"eigenvalue $\lambda_i$")
ax_spec.set_title(f"Spectra (P = {P}; zeros drawn at $10^{{-8}}\\lambda_1$)")
ax_spec.legend(fontsize=8)

ax_err.barh(list(error), list(error.values()), color=[colors[n] for n in error])
for i, e in enumerate(error.values()):
    ax_err.text(e + 0.01, i, f"{e:.3f}", va="center", fontsize=8)
ax_err.set_xlim(0, 1)
ax_err.invert_yaxis()
ax_err.set_xlabel(r"$\|G - A\|_F \,/\, \|G\|_F$")
ax_err.set_title("Frobenius distance to the exact GGN")
ax_err.tick_params(axis="y", labelsize=8)

# %%
# Natural-gradient directions
# ---------------------------
#
# What an optimizer does with an approximation is solve against it: the damped
# natural gradient :math:`(A + \lambda I)^{-1} g`. We compare it with the exact
# :math:`(G + \lambda I)^{-1} g` by their cosine, for damping :math:`\lambda` from
# :math:`10^{-3}` to :math:`10^{3}` times the mean eigenvalue :math:`\mathrm{tr}(G)/P`.
#
# ``A.damped(lam)`` is the operator :math:`A + \lambda I`; its ``inverse()`` is exact for
# all these structured operators (from K-FAC's and EKFAC's factor eigendecompositions,
# blockwise for the block-diagonal, on the eigenbasis for the low-rank one). The exact
# direction comes from the eigendecomposition of the dense :math:`G` here, one for all
# dampings (use :func:`curvlinops.cg` when :math:`G` is too large to form).

g = cl.flatten_params(G.gradient_and_loss()[0])
mean_eigenvalue = np.trace(G_dense) / P
relative_dampings = np.logspace(-3, 3, 13)


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


cosines = {name: [] for name in [*approximations, "gradient (identity)"]}
for rel in relative_dampings:
    lam = rel * mean_eigenvalue
    exact = eigenvectors @ ((eigenvectors.T @ g) / (eigenvalues + lam))
    for name, A in approximations.items():
        direction = A.damped(lam).inverse() @ g
        cosines[name].append(cosine(direction, exact))
    cosines["gradient (identity)"].append(cosine(g, exact))

# %%
# The structured inverses are the exact damped inverses: check them against dense
# solves at one damping.

lam = 1e-2 * mean_eigenvalue
for name, A in approximations.items():
    reference = np.linalg.solve(dense[name] + lam * np.eye(P), g)
    assert np.allclose(A.damped(lam).inverse() @ g, reference, rtol=1e-8, atol=1e-10), name

# %%
# What we can guarantee about the cosines: for a positive semi-definite :math:`A` with
# largest eigenvalue :math:`\alpha`, the matrix :math:`(A + \lambda I)^{-1}` has
# condition number at most :math:`\kappa = (\alpha + \lambda) / \lambda`, so it turns
# :math:`g` by at most :math:`\arccos(2\sqrt{\kappa} / (1 + \kappa))` (Kantorovich). The
# two directions are therefore at most the sum of both angles apart, a floor that
# tends to 1 for large damping: every approximation becomes a scaled gradient step.


def kantorovich_angle(largest_eigenvalue, lam):
    kappa = (largest_eigenvalue + lam) / lam
    return np.arccos(2 * np.sqrt(kappa) / (1 + kappa))


for name, values in cosines.items():
    largest = 0.0 if name == "gradient (identity)" else spectra[name][0]
    for rel, c in zip(relative_dampings, values, strict=True):
        lam = rel * mean_eigenvalue
        angle = kantorovich_angle(largest, lam) + kantorovich_angle(exact_eigenvalues[0], lam)
        assert c >= np.cos(min(angle, np.pi)) - 1e-12, (name, rel)
    assert values[-1] > 0.99, name  # lambda = 1000 tr(G)/P

print("damping / (tr(G)/P):", " ".join(f"{r:7.0e}" for r in relative_dampings[::3]))
for name, values in cosines.items():
    print(f"{name:28s}", " ".join(f"{c:7.3f}" for c in values[::3]))

# %%
# At small damping the curvature matters and the approximations separate; at large
# damping they all approach the (rescaled) gradient. Here the per-layer blocks give the
# best directions, K-FAC and EKFAC come close to them (and to each other), and the
# diagonal is barely better than the plain gradient. The top-20 eigenpairs help only
# once the damping is large enough to hide the eigenvalues they leave out.

colors["gradient (identity)"] = "tab:gray"
fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
for name, values in cosines.items():
    style = ":" if name == "gradient (identity)" else "o-"
    ax.semilogx(relative_dampings, values, style, color=colors[name], ms=4, label=name)
ax.set_xlabel(r"damping $\lambda \,/\, (\mathrm{tr}(G) / P)$")
ax.set_ylabel(r"cosine($(A + \lambda I)^{-1} g$, $(G + \lambda I)^{-1} g$)")
ax.set_ylim(0, 1.02)
ax.set_title("Damped natural gradient of each approximation vs. the exact GGN")
ax.legend(fontsize=8, loc="lower right")
plt.show()
