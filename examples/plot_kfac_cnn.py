"""
K-FAC and EKFAC on a convolutional network
==========================================

K-FAC approximates each layer's block of the generalized Gauss-Newton matrix
:math:`G` by a Kronecker product :math:`B \\otimes A`. For a convolution
(Grosse & Martens, 2016), :math:`A` is built from the layer's unfolded input patches
and :math:`B` from the gradients of its output pixels; how the pixels of one image are
treated is the choice of ``kfac_approx``: ``"expand"`` makes every output pixel an item
of its own, ``"reduce"`` averages each image's patches and sums its pixel gradients
first (Eschenhagen et al., 2023). EKFAC keeps K-FAC's eigenbasis and refits the
eigenvalues to the exact block, which makes it at least as close in Frobenius norm.

This example builds a small CNN with :mod:`curvlinops.nn` (NumPy, no autodiff
framework), computes the exact GGN densely, and compares the blocks of each layer.
"""

import array_api_compat.numpy as xp
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits

import curvlinops as cl
from curvlinops import nn
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator

# %%
# Problem
# -------
#
# 256 of scikit-learn's 8x8 handwritten digits, standardized, as one-channel images,
# classified by two convolutions and a linear layer with the softmax cross-entropy, at
# the network's random initialization. The data come in two batches.

X, y = load_digits(return_X_y=True)
X = ((X - X.mean()) / X.std()).reshape(-1, 1, 8, 8)[:256]
y = y[:256]
data = [(X[:128], y[:128]), (X[128:], y[128:])]

model = nn.Sequential(
    nn.Conv2d(1, 4, 3, stride=2, padding=1),  # 8 x 8 -> 4 x 4
    nn.ReLU(),
    nn.Conv2d(4, 4, 3, stride=2, padding=1),  # 4 x 4 -> 2 x 2
    nn.ReLU(),
    nn.Flatten(),
    nn.Linear(4 * 2 * 2, 10),
)
params = model.init(0, xp=xp, dtype=xp.float64)
loss = cl.CrossEntropyLoss()
G = cl.GGNLinearOperator(model, loss, params, data).to_dense()
print(f"{G.shape[0]} parameters")

# %%
# The approximations
# ------------------
#
# One joint block ``[W | b]`` per layer, so that each approximation is compared with
# the exact block of the same parameters.

approximations = {
    "K-FAC expand": KFACLinearOperator(
        model, loss, params, data, kfac_approx="expand", separate_weight_and_bias=False
    ),
    "K-FAC reduce": KFACLinearOperator(
        model, loss, params, data, kfac_approx="reduce", separate_weight_and_bias=False
    ),
    "EKFAC expand": EKFACLinearOperator(
        model, loss, params, data, kfac_approx="expand", separate_weight_and_bias=False
    ),
}
dense = {name: op.to_dense() for name, op in approximations.items()}

offsets = np.cumsum([0] + [p.size for p in params])
layers = {"conv 1": (0, 2), "conv 2": (2, 4), "linear": (4, 6)}


def layer_block(M, layer):
    start, stop = layers[layer]
    ix = np.arange(offsets[start], offsets[stop])
    return M[np.ix_(ix, ix)]


errors = {
    name: [
        np.linalg.norm(layer_block(M, layer) - layer_block(G, layer))
        / np.linalg.norm(layer_block(G, layer))
        for layer in layers
    ]
    for name, M in dense.items()
}
for name, values in errors.items():
    print(name, " ".join(f"{layer}: {e:.3f}" for layer, e in zip(layers, values, strict=True)))

# EKFAC is the Frobenius-closest matrix diagonal in K-FAC's eigenbasis: never farther
# from the exact block than K-FAC (expand) is.
assert all(
    e <= k * (1 + 1e-10)
    for e, k in zip(errors["EKFAC expand"], errors["K-FAC expand"], strict=True)
)

# %%
# Relative error of each layer's block
# ------------------------------------

fig, ax = plt.subplots(figsize=(6, 3.2))
width = 0.25
for i, (name, values) in enumerate(errors.items()):
    ax.bar(np.arange(len(layers)) + (i - 1) * width, values, width, label=name)
ax.set_xticks(np.arange(len(layers)), list(layers))
ax.set_ylabel(r"$\|\tilde G_l - G_l\|_F / \|G_l\|_F$")
ax.legend(frameon=False)
fig.tight_layout()

# %%
# The first convolution's block
# -----------------------------
#
# The exact block (40 x 40: 4 filters of 3 x 3 weights and a bias each) beside its
# approximations, on one color scale.

shown = {"exact GGN": G, **dense}
blocks = {name: layer_block(M, "conv 1") for name, M in shown.items()}
limit = max(np.abs(b).max() for b in blocks.values())
fig, axes = plt.subplots(1, len(blocks), figsize=(11, 3))
for ax, (name, b) in zip(axes, blocks.items(), strict=True):
    image = ax.imshow(b, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(name)
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(image, ax=axes, shrink=0.8)
plt.show()
