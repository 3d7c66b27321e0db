"""
Newton-CG for a JAX model
=========================

Newton-CG (also called truncated Newton) minimizes a function by solving each Newton
system :math:`B \\delta = -\\nabla J` only approximately, by conjugate gradients
(CG), which needs nothing but products of the curvature matrix ``B`` with vectors.
With the generalized Gauss-Newton (GGN) matrix as ``B``, the curvature is positive
semi-definite, so CG is well defined and every step is a descent direction.

This example fits two pure-JAX models, functions ``f(params, x)`` with their
parameters in a pytree, to scikit-learn's digits, with the curvature from
:class:`~curvlinops.frontends.jax.JaxModel` and :class:`curvlinops.GGNLinearOperator`:

- a linear softmax classifier (multinomial logistic regression), for which the GGN is
  the exact Hessian: Newton-CG converges superlinearly, and we check the solution
  against scikit-learn's ``LogisticRegression``;
- a small MLP, for which it is the Gauss-Newton method.

Before that, we check the GGN's products against ``jax.jvp`` and ``jax.vjp`` composed
by hand, and the linear model's GGN against ``jax.hessian``.
"""

# %%
# Setup
# -----
# JAX computes in float32 unless told otherwise; Newton's method converges to far more
# digits than float32 has, so we switch to float64 before creating any array.

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

import curvlinops as cl  # noqa: E402
from curvlinops.frontends.jax import JaxModel  # noqa: E402

digits_X, digits_y = load_digits(return_X_y=True)
digits_X = (digits_X - digits_X.mean(0)) / (digits_X.std(0) + 1e-8)
X_train, y_train = jnp.asarray(digits_X[:1500]), jnp.asarray(digits_y[:1500])
X_test, y_test = jnp.asarray(digits_X[1500:]), jnp.asarray(digits_y[1500:])
N = X_train.shape[0]

# %%
# Two models as plain JAX functions
# ---------------------------------
# The parameters are any pytree; here dictionaries. :class:`~curvlinops.frontends.jax.JaxModel`
# remembers the pytree's structure and gives the operators the flat list of its leaves
# (``model.params``, in ``jax.tree_util.tree_leaves`` order: sorted keys);
# ``model.unflatten`` turns such a list back into the pytree.


def linear(p, x):
    return x @ p["w"].T


def mlp(p, x):
    hidden = jnp.tanh(x @ p["hidden"]["w"].T + p["hidden"]["b"])
    return hidden @ p["out"]["w"].T + p["out"]["b"]


# Random numbers from NumPy's generator, with an explicit seed: each ``jax.random``
# call with a new shape would be compiled first, which costs more than it saves here.
rng = np.random.default_rng(0)
linear_model = JaxModel(linear, {"w": jnp.zeros((10, 64))})
mlp_model = JaxModel(
    mlp,
    {
        "hidden": {"w": jnp.asarray(rng.normal(size=(32, 64)) / 8), "b": jnp.zeros(32)},
        "out": {"w": jnp.asarray(rng.normal(size=(10, 32)) / np.sqrt(32)), "b": jnp.zeros(10)},
    },
)
print([p.shape for p in mlp_model.params])

loss = cl.CrossEntropyLoss()  # mean over the data, like the loss below
train_data = [(X_train, y_train)]


def mean_cross_entropy(logits, y):
    """Written in JAX, independently of curvlinops, for the checks."""
    log_probabilities = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probabilities, y[:, None], axis=1))


# %%
# Checking the GGN against JAX
# ----------------------------
# The GGN is :math:`G = J^\top H_L J`, with :math:`J` the Jacobian of the network's
# outputs with respect to the parameters and :math:`H_L` the Hessian of the loss with
# respect to the outputs. For a vector ``v`` we build ``G v`` by hand from JAX's own
# transformations: ``jax.jvp`` gives ``J v``, a ``jax.jvp`` of ``jax.grad`` of the loss
# in output space applies :math:`H_L`, and ``jax.vjp`` applies :math:`J^\top`.

params = mlp_model.params
shapes = [p.shape for p in params]


@jax.jit
def ggn_vector_product_by_hand(leaves, v):
    def network_output(leaves):
        return mlp(mlp_model.unflatten(leaves), X_train)

    tangent = cl.unflatten_params(v, shapes)
    outputs, Jv = jax.jvp(network_output, (leaves,), (tangent,))
    HJv = jax.jvp(lambda z: jax.grad(mean_cross_entropy)(z, y_train), (outputs,), (Jv,))[1]
    _, pullback = jax.vjp(network_output, leaves)
    return cl.flatten_params(pullback(HJv)[0])


G = cl.GGNLinearOperator(mlp_model, loss, params, train_data)
v = jnp.asarray(rng.normal(size=G.shape[1]))
Gv, Gv_by_hand = G @ v, ggn_vector_product_by_hand(params, v)
print("relative difference:", float(jnp.linalg.norm(Gv - Gv_by_hand) / jnp.linalg.norm(Gv)))
assert jnp.allclose(Gv, Gv_by_hand, rtol=1e-10, atol=1e-14)

# %%
# The linear model's outputs are linear in its parameters, so its GGN is the Hessian of
# the loss. With 640 parameters, ``jax.hessian`` builds that Hessian densely in a
# moment; the operator's product with a random vector must agree with the dense one.
# (``G_linear.to_dense()`` would compare every entry, but JAX compiles the operator's
# products once per number of columns, and 640 columns would be one more compilation.)

w0 = jnp.asarray(rng.normal(size=(10, 64)) / 8)
G_linear = cl.GGNLinearOperator(linear_model, loss, [w0], train_data)
hessian = jax.jit(jax.hessian(lambda w: mean_cross_entropy(linear({"w": w}, X_train), y_train)))
H_dense = hessian(w0).reshape(640, 640)
v_linear = jnp.asarray(rng.normal(size=640))
Gv_linear = G_linear @ v_linear
print("max |G v - H v|:", float(jnp.max(jnp.abs(Gv_linear - H_dense @ v_linear))))
assert jnp.allclose(Gv_linear, H_dense @ v_linear, rtol=1e-10, atol=1e-14)

# %%
# Newton-CG
# ---------
# We minimize the mean cross-entropy plus an L2 penalty,
# :math:`J(\theta) = L(\theta) + \frac{\alpha}{2} \|\theta\|^2`. The penalty's Hessian is
# :math:`\alpha I`, so the curvature of :math:`J` is ``G + alpha I``: CG's ``damping``
# argument. Each iteration
#
# 1. builds the GGN at the current parameters (``cache=True`` keeps the linearization
#    for all of CG's products) and takes the gradient and loss from it,
# 2. solves :math:`(G + \alpha I) \delta = -\nabla J` by CG to the relative tolerance
#    :math:`\min(0.5, \sqrt{\|\nabla J\|})`, loose far from the solution and tight near
#    it (which keeps Newton's fast local convergence: superlinear, with this tolerance),
# 3. backtracks along ``delta`` until the objective decreases enough (Armijo's rule).


@jax.jit
def squared_norm(leaves):
    return sum(jnp.sum(p**2) for p in leaves)


def objective(model, leaves, alpha):
    return float(loss(model(leaves, X_train), y_train) + 0.5 * alpha * squared_norm(leaves))


def newton_cg(model, leaves, alpha, iterations):
    shapes = [p.shape for p in leaves]
    history = {"objective": [], "gradient norm": [], "cg iterations": [], "step": []}
    for _ in range(iterations):
        G = cl.GGNLinearOperator(
            model, loss, leaves, train_data, num_data=N, cache=True, check_deterministic=False
        )
        grads, value = G.gradient_and_loss()
        g = cl.flatten_params(grads) + alpha * cl.flatten_params(leaves)
        value = float(value + 0.5 * alpha * squared_norm(leaves))
        gradient_norm = float(jnp.linalg.norm(g))
        history["objective"].append(value)
        history["gradient norm"].append(gradient_norm)
        if gradient_norm < 1e-12:
            break
        delta, info = cl.cg(G, -g, damping=alpha, rtol=min(0.5, gradient_norm**0.5), maxiter=200)
        history["cg iterations"].append(info.iterations)
        directions = cl.unflatten_params(delta, shapes)
        slope, step = float(g @ delta), 1.0
        assert slope < 0, "CG on G + alpha I always returns a descent direction"
        while True:
            trial = [p + step * d for p, d in zip(leaves, directions, strict=True)]
            if objective(model, trial, alpha) <= value + 1e-4 * step * slope:
                break
            step /= 2
        history["step"].append(step)
        leaves = trial
    return leaves, history


alpha = 1e-3
w_newton, linear_history = newton_cg(linear_model, linear_model.params, alpha, 20)
mlp_params, mlp_history = newton_cg(mlp_model, mlp_model.params, alpha, 15)
for name, history in [("linear", linear_history), ("MLP", mlp_history)]:
    print(
        f"{name}: {len(history['objective'])} iterations, objective "
        f"{history['objective'][-1]:.6f}, gradient norm {history['gradient norm'][-1]:.2e}, "
        f"CG iterations {history['cg iterations']}"
    )

# %%
# Checking the linear model against scikit-learn
# -----------------------------------------------
# For the linear model the objective is convex, and scikit-learn's L-BFGS solver for
# multinomial logistic regression minimizes the same function up to a factor:
# ``LogisticRegression(C=1 / (alpha N), fit_intercept=False)`` minimizes
# :math:`\frac{1}{2}\|W\|^2 + C \sum_n \ell_n = J(W) / \alpha`.

reference = LogisticRegression(C=1 / (alpha * N), fit_intercept=False, tol=1e-10, max_iter=5000)
reference.fit(digits_X[:1500], digits_y[:1500])
w_reference = jnp.asarray(reference.coef_)
objective_reference = objective(linear_model, [w_reference], alpha)
print(
    f"objective: Newton-CG {linear_history['objective'][-1]:.10f}, "
    f"scikit-learn {objective_reference:.10f}"
)
difference = float(jnp.max(jnp.abs(w_newton[0] - w_reference)) / jnp.max(jnp.abs(w_reference)))
print(f"largest difference of the weights (relative): {difference:.1e}")
assert linear_history["gradient norm"][-1] < 1e-10
assert linear_history["objective"][-1] <= objective_reference + 1e-12
assert difference < 1e-4

# %%
# The MLP
# -------
# For the MLP the GGN is not the Hessian: it leaves out the curvature of the network
# itself, weighted by the residuals, which do not vanish at the minimum of a
# cross-entropy. Gauss-Newton therefore converges only linearly. Far from the minimum
# it makes fast progress with full steps; near it, the line search shortens the steps
# (the Gauss-Newton model of the loss is no longer accurate there). In 15 iterations
# the MLP fits the training data better than the linear model can.

print("MLP step lengths:", mlp_history["step"])
accuracy = {
    name: float(jnp.mean(jnp.argmax(model(leaves, X_test), axis=1) == y_test))
    for name, model, leaves in [("linear", linear_model, w_newton), ("MLP", mlp_model, mlp_params)]
}
print("test accuracy:", accuracy)
assert mlp_history["objective"][-1] < 0.065 < linear_history["objective"][-1]
assert mlp_history["objective"][-1] < mlp_history["objective"][0] / 30
assert mlp_history["gradient norm"][-1] < mlp_history["gradient norm"][0] / 30
assert min(accuracy.values()) > 0.85

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
for name, history, color in [
    ("linear (GGN = Hessian)", linear_history, "C0"),
    ("MLP (Gauss-Newton)", mlp_history, "C3"),
]:
    ax1.semilogy(history["objective"], "o-", ms=3, color=color, label=name)
    ax2.semilogy(history["gradient norm"], "o-", ms=3, color=color, label=name)
ax1.set_xlabel("Newton-CG iteration")
ax1.set_ylabel("regularized training loss (log scale)")
ax1.set_title("Objective")
ax1.legend()
ax2.set_xlabel("Newton-CG iteration")
ax2.set_ylabel("gradient norm (log scale)")
ax2.set_title("Gradient norm")
ax2.legend()
fig.suptitle(f"Newton-CG on digits, L2 penalty alpha = {alpha:g}")
fig.tight_layout()

plt.show()
