"""
Calibration of a Laplace approximation on digits
================================================

An MLP with many more parameters than training digits, trained to its MAP under a weak
prior, is overconfident on held-out digits. The Laplace approximation of its last layer
(dense GGN, :class:`~curvlinops.bayes.Laplace` with ``subset="last_layer"``) gives the
linearized predictive (probit). How much it helps depends on the prior precision: the
one that maximizes the marginal likelihood of the training data at this MAP
over-corrects here, while one chosen on a validation split calibrates the predictive.
We compare accuracy, negative log-likelihood (NLL) and expected calibration error
(ECE), and draw reliability diagrams.
"""

# %%
# Data and MAP
# ------------
# Scikit-learn's 8x8 digits, pixels scaled to ``[0, 1]``: 200 for training, 300 for
# validation, 1297 for testing. An MLP ``64-128-10`` with ReLU (9610 parameters) in the
# native layers of :mod:`curvlinops.nn`, trained to the MAP of the weak prior
# ``N(0, I / delta_0)``, ``delta_0 = 1e-4``, by L-BFGS on the model's own gradients.

import array_api_compat.numpy as xp
import matplotlib.pyplot as plt
import numpy as np
from scipy import optimize
from sklearn.datasets import load_digits

from curvlinops import CrossEntropyLoss, flatten_params, nn, unflatten_params
from curvlinops.bayes import Laplace

digits = load_digits()
order = np.random.default_rng(0).permutation(len(digits.target))
X_all, y_all = digits.data[order] / 16.0, digits.target[order]
X, y = X_all[:200], y_all[:200]
X_val, y_val = X_all[200:500], y_all[200:500]
X_test, y_test = X_all[500:], y_all[500:]
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
loss = CrossEntropyLoss(reduction="sum")
init = model.init(0, xp=xp, dtype=xp.float64)
shapes = [p.shape for p in init]
delta_0 = 1e-4


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


def softmax(f):
    e = np.exp(f - f.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def nll(probs, labels):
    return -np.mean(np.log(probs[np.arange(len(labels)), labels]))


# %%
# Laplace approximations of the last layer
# ----------------------------------------
# The posterior over the last layer's 1290 weights and biases, with the dense GGN.
# Its prior precision either maximizes the log marginal likelihood of the training data
# (one value for the layer, Newton's method in ``log delta``), or minimizes the NLL of
# the validation digits over a grid.

la = Laplace(model, loss, params, [(X, y)], structure="full", subset="last_layer")
evidence_delta = la.optimize_prior_precision("scalar")
predictions = {"MAP": softmax(model(params, X_test))}
predictions["Laplace, evidence prior"] = la.predictive(X_test)

grid = np.logspace(-1, 3, 9)
validation = []
for delta in grid:
    la.prior_precision = float(delta)
    validation.append(nll(la.predictive(X_val), y_val))
validation_delta = float(grid[int(np.argmin(validation))])
la.prior_precision = validation_delta
predictions["Laplace, validation prior"] = la.predictive(X_test)
print(f"prior precision: {evidence_delta:.3g} (evidence), {validation_delta:.3g} (validation)")

# %%
# Metrics
# -------
# The expected calibration error sorts the test digits into 10 bins of confidence
# (largest class probability) and averages ``|accuracy - confidence|`` over the bins,
# weighted by their sizes.

BINS = np.linspace(0.0, 1.0, 11)


def reliability(probs, labels):
    confidence = probs.max(axis=1)
    correct = np.argmax(probs, axis=1) == labels
    which = np.clip(np.digitize(confidence, BINS) - 1, 0, len(BINS) - 2)
    counts = np.bincount(which, minlength=len(BINS) - 1)
    accuracy = np.bincount(which, weights=correct, minlength=len(BINS) - 1)
    mean_confidence = np.bincount(which, weights=confidence, minlength=len(BINS) - 1)
    filled = counts > 0
    accuracy[filled] /= counts[filled]
    mean_confidence[filled] /= counts[filled]
    ece = np.sum(counts * np.abs(accuracy - mean_confidence)) / len(labels)
    return ece, accuracy, mean_confidence, counts


metrics = {}
for name, probs in predictions.items():
    accuracy = np.mean(np.argmax(probs, axis=1) == y_test)
    metrics[name] = (accuracy, nll(probs, y_test), reliability(probs, y_test)[0])
    confidence = probs.max(axis=1).mean()
    print(f"{name:26s} accuracy {accuracy:.3f}  NLL {metrics[name][1]:.3f}  "
          f"ECE {metrics[name][2]:.3f}  mean confidence {confidence:.3f}")  # fmt: skip

# %%
# Reliability diagrams
# --------------------
# Bars: the accuracy of each confidence bin; the diagonal is perfect calibration. The
# MAP's bars lie below it (overconfident). With the evidence prior, whose precision is
# tiny next to this weakly regularized MAP's weights (``delta = gamma / ||theta||^2``,
# MacKay's condition at a fixed MAP), the posterior is wide and every prediction
# hesitant: the bars lie far above the diagonal (underconfident). The validation prior
# keeps most of the MAP's confidence and brings the bars to the diagonal.

fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharey=True)
centres = 0.5 * (BINS[:-1] + BINS[1:])
for ax, (name, probs) in zip(axes, predictions.items(), strict=True):
    ece, accuracy, confidence, counts = reliability(probs, y_test)
    filled = counts > 0
    ax.bar(centres[filled], accuracy[filled], width=0.1, edgecolor="k", label="accuracy")
    ax.plot(confidence[filled], confidence[filled], "r.", label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_title(f"{name}\nECE {ece:.3f}, NLL {metrics[name][1]:.3f}", fontsize=10)
    ax.set_xlabel("confidence")
axes[0].set_ylabel("accuracy")
axes[0].legend(loc="upper left")
fig.tight_layout()

# %%
# With the prior chosen on validation digits, the Laplace approximation keeps the MAP's
# accuracy and lowers its test NLL and calibration error; with the evidence prior it
# is underconfident (mean confidence below the accuracy):

tuned, evidence, map_ = (metrics[k] for k in ("Laplace, validation prior",
                                            "Laplace, evidence prior", "MAP"))  # fmt: skip
assert abs(tuned[0] - map_[0]) < 0.01
assert tuned[1] < map_[1] and tuned[2] < map_[2]
assert predictions["Laplace, evidence prior"].max(axis=1).mean() < evidence[0]
