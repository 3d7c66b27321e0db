"""
The curvature of a small transformer
====================================

A one-block GPT built with :mod:`curvlinops.nn` (NumPy, no autodiff framework) learns
to continue repeating token patterns; then we look at its curvature: the Hessian's
spectrum, exactly (the matrix is small enough to form) and as the spectral density that
stochastic Lanczos quadrature estimates from Hessian-vector products alone, beside the
GGN's; and how close K-FAC and EKFAC come to the exact GGN, layer by layer, on
attention's projections, the MLP, the embedding and the head. (Attention mixes the
positions of a sequence, so K-FAC's Kronecker factors are an approximation even for a
single sequence; the LayerNorms get their exact blocks.)
"""

import array_api_compat.numpy as xp
import matplotlib.pyplot as plt
import numpy as np

import curvlinops as cl
from curvlinops import nn
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator

# %%
# The task
# --------
#
# Sequences of 10 tokens from a vocabulary of 6 that repeat a random pattern of period
# 2 (``c a c a c a ...``). The model predicts the next token at every position: from
# the second position on it can copy the token two positions back (attention has to
# find it), at the first it can only guess.

V, S, PERIOD = 6, 10, 2
rng = np.random.default_rng(0)


def patterns(n):
    motif = rng.integers(0, V, size=(n, PERIOD))
    seq = np.tile(motif, (1, (S + PERIOD) // PERIOD + 1))[:, : S + 1]
    return seq[:, :-1], seq[:, 1:]  # inputs and next-token targets, (n, S)


X, y = patterns(64)
train = [(X, y)]
data = [(X[:12], y[:12]), (X[12:24], y[12:24])]  # for the curvature: 24 of the sequences
X_test, y_test = patterns(256)

model = nn.Sequential(
    nn.Embedding(V, 16),
    nn.SinusoidalPositions(),
    nn.TransformerBlock(16, 2, mlp_ratio=2),
    nn.LayerNorm(16),
    nn.Linear(16, V),
)
params = model.init(0, xp=xp, dtype=xp.float64)
loss = cl.CrossEntropyLoss()
print(f"{sum(p.size for p in params)} parameters")


def accuracy(params, X, y):
    """How often the most likely next token is right, after the first period."""
    predicted = np.argmax(model(params, X), axis=-1)
    return float(np.mean(predicted[:, PERIOD - 1 :] == y[:, PERIOD - 1 :]))


# %%
# Training
# --------
#
# Gradient descent with heavy-ball momentum on 64 sequences, the gradient from the GGN
# operator's ``gradient_and_loss`` (one forward pass and the native backward pass).

velocity = [np.zeros_like(p) for p in params]
history = []
for _ in range(300):
    grads, value = cl.GGNLinearOperator(
        model, loss, params, train, check_deterministic=False
    ).gradient_and_loss()
    velocity = [0.9 * u - 0.1 * g for u, g in zip(velocity, grads, strict=True)]
    params = [p + u for p, u in zip(params, velocity, strict=True)]
    history.append(float(value))
print(f"loss {history[0]:.3f} -> {history[-1]:.3f}")
print(f"test accuracy after the first period: {accuracy(params, X_test, y_test):.2f}")
assert accuracy(params, X_test, y_test) > 0.8  # it learned to copy, on new patterns

fig, ax = plt.subplots(figsize=(5, 3))
ax.semilogy(history)
ax.set_xlabel("step")
ax.set_ylabel("training loss")
fig.tight_layout()

# %%
# The Hessian spectrum
# --------------------
#
# The exact eigenvalues of the Hessian and the GGN (dense, a few thousand parameters),
# and the Hessian's spectral density estimated by stochastic Lanczos quadrature from
# Hessian-vector products (``curvlinops.spectral_density``), as one would for a model
# too large to form. After training most eigenvalues sit near zero; the Hessian has
# negative ones too, the GGN (positive semi-definite) none.


def dense(op, chunk=256):
    """The matrix of ``op``, a block of columns at a time (``op.to_dense()`` takes all
    columns in one product, whose intermediate arrays grow with them)."""
    eye = np.eye(op.shape[1])
    return np.concatenate([op @ eye[:, i : i + chunk] for i in range(0, op.shape[1], chunk)], 1)


H_op = cl.HessianLinearOperator(model, loss, params, data)
H = dense(H_op)
G = dense(cl.GGNLinearOperator(model, loss, params, data))
eig_H, eig_G = np.linalg.eigvalsh(H), np.linalg.eigvalsh(G)
print(f"Hessian eigenvalues in [{eig_H[0]:.3g}, {eig_H[-1]:.3g}]")
print(f"GGN eigenvalues in [{eig_G[0]:.3g}, {eig_G[-1]:.3g}]")
assert eig_H[0] < 0 and eig_G[0] > -1e-10 * eig_G[-1]
grid, density = cl.spectral_density(H_op, num_probes=3, lanczos_steps=40, kappa=3.0, seed=0)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
bins = np.linspace(min(eig_H[0], 0.0), eig_H[-1], 80)
axes[0].hist(eig_H, bins=bins, density=True, alpha=0.5, label="exact (histogram)")
axes[0].plot(grid, density, color="k", label="stochastic Lanczos quadrature")
axes[0].set_yscale("log")
axes[0].set_ylim(bottom=1e-4)
axes[0].set_title("Hessian")
axes[0].set_xlabel("eigenvalue")
axes[0].legend(frameon=False)
order = np.arange(1, eig_H.size + 1)
axes[1].loglog(order, np.sort(np.abs(eig_H))[::-1], label="|Hessian|")
axes[1].loglog(order, np.sort(np.abs(eig_G))[::-1], label="GGN")
axes[1].set_xlabel("rank")
axes[1].set_title("eigenvalue magnitudes, sorted")
axes[1].legend(frameon=False)
fig.tight_layout()

# %%
# K-FAC and EKFAC against the exact GGN
# -------------------------------------
#
# One joint block ``[W | b]`` per tapped layer; the relative Frobenius error of each
# approximation's block against the exact GGN's block of the same parameters.
# ``"expand"`` treats every position as an item of its own, ``"reduce"`` averages each
# sequence's inputs first (Eschenhagen et al., 2023; the embedding always expands).
# With a loss at every position, K-FAC's type-2 cotangents carry all positions of a
# sequence in one column (as in the K-FAC literature), so even the LayerNorms' "exact"
# blocks hold products of different positions' loss factors that the GGN does not
# have: their errors are not zero. EKFAC refits the eigenvalues in K-FAC's eigenbasis.

kw = dict(separate_weight_and_bias=False)
approximations = {
    "K-FAC expand": KFACLinearOperator(model, loss, params, data, kfac_approx="expand", **kw),
    "K-FAC reduce": KFACLinearOperator(model, loss, params, data, kfac_approx="reduce", **kw),
    "EKFAC expand": EKFACLinearOperator(model, loss, params, data, kfac_approx="expand", **kw),
}
offsets = np.cumsum([0] + [p.size for p in params])
names = {
    "0": "embedding",
    "2.0.block.0": "ln1",
    "2.0.block.1.in_proj": "attn in",
    "2.0.block.1.out_proj": "attn out",
    "2.1.block.0": "ln2",
    "2.1.block.1": "mlp 1",
    "2.1.block.3": "mlp 2",
    "3": "ln final",
    "4": "head",
}
layers = approximations["K-FAC expand"].layers
blocks = {}
for layer in layers:
    indices = [i for i in (layer.weight_index, layer.bias_index) if i is not None]
    blocks[names.get(layer.name, layer.name)] = np.concatenate(
        [np.arange(offsets[i], offsets[i + 1]) for i in indices]
    )
errors = {}
for name, op in approximations.items():
    K = op.to_dense()
    errors[name] = [
        np.linalg.norm(K[np.ix_(ix, ix)] - G[np.ix_(ix, ix)]) / np.linalg.norm(G[np.ix_(ix, ix)])
        for ix in blocks.values()
    ]
for name, values in errors.items():
    print(f"{name:13s}", " ".join(f"{b}: {e:.2f}" for b, e in zip(blocks, values, strict=True)))
# the LayerNorms' blocks are the same in all three (no Kronecker factors there)
ln = [i for i, b in enumerate(blocks) if b.startswith("ln")]
assert all(
    np.allclose([v[i] for i in ln], [errors["K-FAC expand"][i] for i in ln])
    for v in errors.values()
)

fig, ax = plt.subplots(figsize=(9, 3.2))
width = 0.27
for i, (name, values) in enumerate(errors.items()):
    ax.bar(np.arange(len(blocks)) + (i - 1) * width, values, width, label=name)
ax.set_xticks(np.arange(len(blocks)), list(blocks), rotation=30)
ax.set_ylabel(r"$\|\tilde G_l - G_l\|_F / \|G_l\|_F$")
ax.legend(frameon=False)
fig.tight_layout()

# %%
# The spectra side by side
# ------------------------
#
# The eigenvalues of the whole K-FAC approximation (block diagonal over the layers)
# against the exact GGN's: K-FAC drops the blocks between layers, but its spectrum
# decays much like the exact one.

eig_K = np.linalg.eigvalsh(approximations["K-FAC expand"].to_dense())
fig, ax = plt.subplots(figsize=(5, 3.2))
ax.loglog(order, np.sort(np.abs(eig_G))[::-1], label="exact GGN")
ax.loglog(order, np.sort(np.abs(eig_K))[::-1], label="K-FAC expand")
ax.set_xlabel("rank")
ax.set_ylabel("eigenvalue")
ax.legend(frameon=False)
fig.tight_layout()
plt.show()
