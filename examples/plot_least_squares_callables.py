"""
Nonlinear least squares with hand-written Jacobian products
===========================================================

Scientific models often come with hand-derived derivatives instead of an autodiff
framework. :class:`curvlinops.frontends.CallableModel` turns three functions,
``forward``, ``jvp`` (Jacobian-vector products) and ``vjp`` (vector-Jacobian products),
into a model that every first-order curvature operator accepts.

This example fits a damped oscillation

.. math::

    y(t) = a \\, e^{-b t} \\cos(\\omega t + \\varphi)

to noisy measurements. It

1. writes the Jacobian products by hand, plants a bug in the ``vjp``, and lets the
   verification toolkit (``curvlinops.verify``) find it: the dot-product test fails,
   the finite-difference check of the ``jvp`` passes, and ``CallableModel(...,
   verify=True)`` refuses the model;
2. fits the four parameters by Gauss-Newton with Levenberg-Marquardt damping: each
   step solves :math:`(G + \\lambda I) s = -g` by conjugate gradients on
   :class:`~curvlinops.GGNLinearOperator`, which only ever calls the ``jvp`` and
   ``vjp``;
3. checks the fit against the true parameters (within the standard errors that the
   GGN itself provides) and against ``scipy.optimize.least_squares``.
"""

import matplotlib.pyplot as plt
import numpy as np
from scipy.optimize import least_squares

import curvlinops as cl
from curvlinops.frontends import CallableModel
from curvlinops.verify import VerificationError, check_jvp, check_vjp

# %%
# The model and its Jacobian
# --------------------------
#
# The parameters are one array :math:`\theta = (a, b, \omega, \varphi)`, the input a
# batch of times ``t`` of shape ``(N, 1)``, the output ``(N, 1)``. With
# :math:`e = e^{-b t}`, :math:`c = \cos(\omega t + \varphi)` and
# :math:`s = \sin(\omega t + \varphi)` the Jacobian's columns are
#
# .. math::
#
#     \frac{\partial y}{\partial a} = e c, \quad
#     \frac{\partial y}{\partial b} = -a t e c, \quad
#     \frac{\partial y}{\partial \omega} = -a t e s, \quad
#     \frac{\partial y}{\partial \varphi} = -a e s.
#
# The products take a trailing axis ``K`` of vectors, so one call serves a whole
# batch of them: tangents come as a list shaped like the parameters plus ``K``
# (here one array ``(4, K)``), ``jvp`` returns ``(N, 1, K)``, cotangents come as
# ``(N, 1, K)`` and ``vjp`` returns a list like the tangents.


def forward(params, t):
    a, b, omega, phi = params[0]
    return a * np.exp(-b * t) * np.cos(omega * t + phi)


def jacobian(params, t):
    a, b, omega, phi = params[0]
    t = t[:, 0]
    e, c, s = np.exp(-b * t), np.cos(omega * t + phi), np.sin(omega * t + phi)
    return np.stack([e * c, -a * t * e * c, -a * t * e * s, -a * e * s], axis=1)  # (N, 4)


def jvp(params, t, tangents):
    return (jacobian(params, t) @ tangents[0])[:, None, :]  # (N, 1, K)


def vjp(params, t, cotangents):
    return [jacobian(params, t).T @ cotangents[:, 0, :]]  # [(4, K)]


# %%
# A typical slip: in the ``vjp`` the derivative by :math:`\omega` loses its factor
# :math:`t` (copied from the :math:`\varphi` column). The ``jvp`` is still right.


def buggy_vjp(params, t, cotangents):
    J = jacobian(params, t)
    a, b, omega, phi = params[0]
    J[:, 2] = -a * np.exp(-b * t[:, 0]) * np.sin(omega * t[:, 0] + phi)  # should be * t
    return [J.T @ cotangents[:, 0, :]]


# %%
# Verifying the products
# ----------------------
#
# :func:`curvlinops.verify.check_jvp` compares the ``jvp`` with central finite
# differences of ``forward``; :func:`curvlinops.verify.check_vjp` runs the dot-product
# test :math:`\langle u, J v \rangle = \langle J^\top u, v \rangle` for random
# :math:`u, v`, which holds only if the ``vjp`` is the adjoint of the ``jvp``. Each
# returns a report with the measured error and the tolerance it was held to.

theta_true = np.array([1.5, 0.3, 2.0, 0.5])
where = [np.array([1.0, 0.2, 1.5, 0.1])]  # any point will do for the checks
t_check = np.linspace(0.0, 5.0, 7)[:, None]

buggy = CallableModel(forward, jvp, buggy_vjp, param_shapes=[(4,)], name="buggy oscillator")
jvp_report = check_jvp(buggy, where, t_check)
vjp_report = check_vjp(buggy, where, t_check)
print(jvp_report)
print(vjp_report)
assert jvp_report.passed and not vjp_report.passed

# %%
# The same checks run at construction with ``verify=True``; the model is refused with
# an error that names the failing product.

try:
    CallableModel(
        forward,
        jvp,
        buggy_vjp,
        param_shapes=[(4,)],
        verify=True,
        verify_params=where,
        verify_x=t_check,
        name="buggy oscillator",
    )
except VerificationError as error:
    message = str(error)
    print(message)
else:
    raise AssertionError("the buggy vjp was not caught")
assert "[FAIL] vjp" in message and "[PASS] jvp" in message

# %%
# The dot-product test alone cannot tell whether the Jacobian is the *right* one: a
# ``jvp`` and ``vjp`` that share the same wrong Jacobian are adjoint to each other.
# That is what the finite-difference check of the ``jvp`` is for.


def wrong_jacobian(params, t):
    J = jacobian(params, t)
    J[:, 1] *= -1  # the sign of d/db flipped in both products
    return J


consistent_but_wrong = CallableModel(
    forward,
    lambda p, t, V: (wrong_jacobian(p, t) @ V[0])[:, None, :],
    lambda p, t, U: [wrong_jacobian(p, t).T @ U[:, 0, :]],
    param_shapes=[(4,)],
)
jvp_report = check_jvp(consistent_but_wrong, where, t_check)
vjp_report = check_vjp(consistent_but_wrong, where, t_check)
print(jvp_report)
print(vjp_report)
assert not jvp_report.passed and vjp_report.passed

# %%
# The correct products pass both checks, and ``verify=True`` accepts the model.

model = CallableModel(
    forward,
    jvp,
    vjp,
    param_shapes=[(4,)],
    verify=True,
    verify_params=where,
    verify_x=t_check,
    name="damped oscillator",
)
for report in (check_jvp(model, where, t_check), check_vjp(model, where, t_check)):
    print(report)
    assert report.passed

# %%
# Data
# ----
#
# 120 measurements on :math:`t \in [0, 10]` with Gaussian noise of standard deviation
# :math:`\sigma = 0.05`.

rng = np.random.default_rng(0)
N, sigma = 120, 0.05
t = np.linspace(0.0, 10.0, N)[:, None]
y = forward([theta_true], t) + sigma * rng.standard_normal((N, 1))

# %%
# Gauss-Newton with Levenberg-Marquardt damping
# ---------------------------------------------
#
# With the summed squared error :math:`L(\theta) = \sum_n (f_n(\theta) - y_n)^2`
# (:class:`~curvlinops.MSELoss` with ``reduction="sum"``), the GGN is
# :math:`G = 2 J^\top J` and the gradient :math:`g = 2 J^\top r` with the residuals
# :math:`r = f - y`. A Levenberg-Marquardt step solves :math:`(G + \lambda I) s = -g`;
# :func:`curvlinops.cg` does it matrix-free (one ``jvp`` and one ``vjp`` per
# iteration). The damping :math:`\lambda` shrinks after a step that lowers the loss
# and grows after one that does not, moving between Gauss-Newton steps and short
# gradient steps.

loss = cl.MSELoss(reduction="sum")
theta = np.array([1.0, 0.1, 1.7, -0.5])  # initial guess
theta_start = theta.copy()
damping = 1.0
residual_norms, gradient_norms, dampings = [], [], []
for _iteration in range(100):
    G = cl.GGNLinearOperator(model, loss, [theta], [(t, y)], check_deterministic=False)
    (g,), value = G.gradient_and_loss()
    residual_norms.append(float(np.sqrt(value)))
    gradient_norms.append(float(np.linalg.norm(g)))
    dampings.append(damping)
    if gradient_norms[-1] < 1e-9:  # a stationary point: done
        break
    step, info = cl.cg(G, -g, damping=damping, rtol=1e-10)
    assert info.converged
    trial = theta + step
    if np.sum((forward([trial], t) - y) ** 2) < value:
        theta, damping = trial, damping / 3
    else:
        damping *= 4
print(
    f"{len(residual_norms) - 1} steps, residual norm {residual_norms[-1]:.6f}, "
    f"gradient norm {gradient_norms[-1]:.1e}"
)
assert gradient_norms[-1] < 1e-9
print("fitted:", np.round(theta, 5).tolist(), " true:", theta_true.tolist())

# %%
# How good is the fit?
# --------------------
#
# For Gaussian noise, the covariance of the least-squares estimate is about
# :math:`\sigma^2 (J^\top J)^{-1} = 2 \sigma^2 G^{-1}`, so the GGN at the fit gives the
# standard errors; we estimate :math:`\sigma^2` from the residuals. The fitted
# parameters must lie within a few standard errors of the truth.

G = cl.GGNLinearOperator(model, loss, [theta], [(t, y)], check_deterministic=False)
(g,), value = G.gradient_and_loss()
sigma2_hat = value / (N - 4)
covariance = 2 * sigma2_hat * np.linalg.inv(G.to_dense())
standard_errors = np.sqrt(np.diag(covariance))
z_scores = (theta - theta_true) / standard_errors
print("standard errors:", np.round(standard_errors, 5).tolist())
print("z-scores:       ", np.round(z_scores, 2).tolist())
print(f"noise level: estimated {np.sqrt(sigma2_hat):.4f}, true {sigma}")
assert np.all(np.abs(z_scores) < 4)

# %%
# And against SciPy's Levenberg-Marquardt (MINPACK) with the same Jacobian and start:
# both find the same minimum.

reference = least_squares(
    lambda p: (forward([p], t) - y)[:, 0],
    theta_start,
    jac=lambda p: jacobian([p], t),
    method="lm",
    xtol=1e-14,
    ftol=1e-14,
)
print("scipy: ", np.round(reference.x, 5).tolist())
assert np.allclose(theta, reference.x, rtol=1e-6, atol=1e-8)

# %%
# Left: the data, the initial guess and the fit. Right: the residual norm
# :math:`\|f(\theta_k) - y\|`, the gradient norm and the damping per iteration. The
# damping grows while the steps overshoot (far from the solution) and shrinks once
# the Gauss-Newton model is good; then the gradient falls fast and the residual norm
# levels off at the noise floor :math:`\approx \sigma \sqrt{N}`.

fig, (ax_fit, ax_conv) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
t_fine = np.linspace(0.0, 10.0, 400)[:, None]
ax_fit.plot(t[:, 0], y[:, 0], ".", color="0.5", label="data")
ax_fit.plot(t_fine, forward([theta_start], t_fine), ":", color="tab:gray", label="initial guess")
ax_fit.plot(t_fine, forward([theta_true], t_fine), color="k", lw=3, alpha=0.3, label="truth")
ax_fit.plot(t_fine, forward([theta], t_fine), color="tab:blue", label="Gauss-Newton fit")
ax_fit.set_xlabel("time $t$")
ax_fit.set_ylabel("$y$")
ax_fit.set_title(r"$y = a\, e^{-bt} \cos(\omega t + \varphi)$")
ax_fit.legend()

ax_conv.semilogy(residual_norms, "o-", color="tab:blue", label=r"residual norm $\|f - y\|$")
ax_conv.semilogy(gradient_norms, "^-", color="tab:green", label=r"gradient norm $\|g\|$")
ax_conv.semilogy(dampings, "s--", color="tab:orange", ms=4, label=r"damping $\lambda$")
ax_conv.axhline(sigma * np.sqrt(N), color="k", ls=":", label=r"noise floor $\sigma\sqrt{N}$")
ax_conv.set_xlabel("iteration")
ax_conv.set_title("Levenberg-Marquardt with CG on the GGN")
ax_conv.legend()
plt.show()
