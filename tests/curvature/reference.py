"""Independent NumPy references for curvature tests.

Nothing here calls curvlinops' derivative code: the MLP forward pass is written again
in NumPy, Jacobians come from central finite differences, the loss Hessians from
closed forms, the Fisher from its definition (enumeration over labels, or
Gauss-Hermite / truncated-Poisson quadrature of the expectation).
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats

import curvlinops.nn as cnn

ACTIVATIONS = {
    "tanh": (cnn.Tanh, np.tanh),
    "sigmoid": (cnn.Sigmoid, special.expit),
    "relu": (cnn.ReLU, lambda s: np.maximum(s, 0.0)),
    "softplus": (cnn.Softplus, lambda s: np.logaddexp(0.0, s)),
    "elu": (cnn.ELU, lambda s: np.where(s > 0, s, np.expm1(s))),
    "identity": (cnn.Identity, lambda s: s),
}


def build_mlp(widths, activation, bias=True):
    """curvlinops.nn model and the matching NumPy forward ``f(theta_flat, X)``."""
    layers, spec = [], []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(cnn.Linear(d_in, d_out, bias=bias))
        spec.append(("linear", d_in, d_out, bias))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation][0]())
            spec.append(("act", activation))
    return cnn.Sequential(*layers), spec


def numpy_forward(spec, theta, X):
    """MLP forward from a flat parameter vector, in NumPy."""
    a, start = X, 0
    for layer in spec:
        if layer[0] == "linear":
            _, d_in, d_out, bias = layer
            W = theta[start : start + d_in * d_out].reshape(d_out, d_in)
            start += d_in * d_out
            a = a @ W.T
            if bias:
                a = a + theta[start : start + d_out]
                start += d_out
        else:
            a = ACTIVATIONS[layer[1]][1](a)
    return a


def fd_jacobian(fun, theta, h=1e-6):
    """Central finite-difference Jacobian of ``fun: (P,) -> (N, C)``: ``(N, C, P)``."""
    cols = []
    for j in range(theta.size):
        e = np.zeros_like(theta)
        e[j] = h
        cols.append((fun(theta + e) - fun(theta - e)) / (2 * h))
    return np.stack(cols, axis=-1)


def loss_value(name, f, y, reduction):
    """Loss value as PyTorch defines it, written directly in NumPy."""
    N = f.shape[0]
    if name == "mse":
        terms, count = (f - y) ** 2, f.size
    elif name == "ce":
        logp = f - special.logsumexp(f, axis=1, keepdims=True)
        terms, count = -logp[np.arange(N), y], N
    elif name == "bce":
        terms, count = np.logaddexp(0.0, f) - y * f, f.size
    elif name == "poisson":
        terms, count = np.exp(f) - y * f, f.size
    elif name == "gaussian":
        D = f.shape[1] // 2
        mu, s = f[:, :D], f[:, D:]
        terms, count = 0.5 * (s + (y - mu) ** 2 * np.exp(-s)), mu.size
    else:
        raise ValueError(name)
    total = terms.sum()
    return total / count if reduction == "mean" else total


def normalization(name, f_shape, num_data, reduction):
    if reduction == "sum":
        return 1.0
    per_datum = {
        "mse": f_shape[1],
        "bce": f_shape[1],
        "poisson": f_shape[1],
        "ce": 1,
        "gaussian": f_shape[1] // 2,
    }[name]
    return 1.0 / (num_data * per_datum)


def output_gradient(name, f_n, y_n):
    """Gradient of the per-datum (unnormalized) loss w.r.t. the outputs, closed form."""
    if name == "mse":
        return 2 * (f_n - y_n)
    if name == "ce":
        p = special.softmax(f_n)
        return p - np.eye(f_n.size)[y_n]
    if name == "bce":
        return special.expit(f_n) - y_n
    if name == "poisson":
        return np.exp(f_n) - y_n
    D = f_n.size // 2
    mu, s = f_n[:D], f_n[D:]
    r = y_n - mu
    return np.concatenate([-r * np.exp(-s), 0.5 * (1 - r**2 * np.exp(-s))])


def output_hessian(name, f_n, y_n):
    """Hessian of the per-datum (unnormalized) loss w.r.t. the outputs, closed form."""
    C = f_n.size
    if name == "mse":
        return 2 * np.eye(C)
    if name == "ce":
        p = special.softmax(f_n)
        return np.diag(p) - np.outer(p, p)
    if name == "bce":
        s = special.expit(f_n)
        return np.diag(s * (1 - s))
    if name == "poisson":
        return np.diag(np.exp(f_n))
    D = C // 2
    mu, s = f_n[:D], f_n[D:]
    r = y_n - mu
    H = np.zeros((C, C))
    H[:D, :D] = np.diag(np.exp(-s))
    H[:D, D:] = H[D:, :D] = np.diag(r * np.exp(-s))
    H[D:, D:] = np.diag(0.5 * r**2 * np.exp(-s))
    return H


def output_fisher(name, f_n):
    """Fisher of the predictive distribution from its definition E_y[g g^T]."""
    C = f_n.size
    if name == "ce":  # enumerate the classes
        p = special.softmax(f_n)
        return sum(p[c] * np.outer(*(2 * [output_gradient("ce", f_n, c)])) for c in range(C))
    if name == "bce":  # enumerate the 2^C label vectors of independent Bernoullis
        s = special.expit(f_n)
        F = np.zeros((C, C))
        for bits in range(2**C):
            y = np.array([(bits >> c) & 1 for c in range(C)], dtype=float)
            prob = np.prod(np.where(y == 1, s, 1 - s))
            g = output_gradient("bce", f_n, y)
            F += prob * np.outer(g, g)
        return F
    if name == "poisson":  # truncated sum over the support
        F = np.zeros((C, C))
        lam = np.exp(f_n)
        ks = np.arange(0, int(lam.max() * 10 + 60))
        for c in range(C):
            pmf = stats.poisson.pmf(ks, lam[c])
            F[c, c] = np.sum(pmf * (lam[c] - ks) ** 2)
        return F
    # Gaussian predictive (MSE: variance 1/2; gaussian: learned variance): Gauss-Hermite.
    nodes, weights = np.polynomial.hermite_e.hermegauss(20)
    weights = weights / weights.sum()
    if name == "mse":
        mu, var = f_n, np.full(C, 0.5)
        F = np.zeros((C, C))
        for c in range(C):
            y = mu[c] + np.sqrt(var[c]) * nodes
            F[c, c] = np.sum(weights * (2 * (mu[c] - y)) ** 2)
        return F
    D = C // 2
    mu, s = f_n[:D], f_n[D:]
    F = np.zeros((C, C))
    for d in range(D):
        y = mu[d] + np.exp(s[d] / 2) * nodes
        g_mu = -(y - mu[d]) * np.exp(-s[d])
        g_s = 0.5 * (1 - (y - mu[d]) ** 2 * np.exp(-s[d]))
        idx = [d, D + d]
        G = np.stack([g_mu, g_s])
        F[np.ix_(idx, idx)] = (G * weights) @ G.T
    return F


def make_targets(name, rng, N, C):
    if name == "mse":
        return rng.normal(size=(N, C))
    if name == "ce":
        return rng.integers(0, C, size=N)
    if name == "bce":
        return rng.integers(0, 2, size=(N, C)).astype(float)
    if name == "poisson":
        return rng.poisson(1.5, size=(N, C)).astype(float)
    if name == "gaussian":
        return rng.normal(size=(N, C // 2))
    raise ValueError(name)


def dense_references(name, spec, theta, X, y, reduction):
    """GGN, Fisher, empirical Fisher, Jacobian (N*C, P) and output-space quantities."""
    fun = lambda t: numpy_forward(spec, t, X)  # noqa: E731
    f = fun(theta)
    J = fd_jacobian(fun, theta)
    c = normalization(name, f.shape, X.shape[0], reduction)
    G = np.zeros((theta.size,) * 2)
    F = np.zeros_like(G)
    E = np.zeros_like(G)
    for n in range(X.shape[0]):
        Jn = J[n]
        G += Jn.T @ output_hessian(name, f[n], y[n]) @ Jn
        F += Jn.T @ output_fisher(name, f[n]) @ Jn
        g = Jn.T @ output_gradient(name, f[n], y[n])
        E += np.outer(g, g)
    return {"G": c * G, "F": c * F, "E": c * E, "J": J.reshape(-1, theta.size), "f": f}


def fd_hessian(name, spec, theta, X, y, reduction, h=1e-4):
    """Hessian of the full-data loss by second-order central differences of its value."""
    L = lambda t: loss_value(name, numpy_forward(spec, t, X), y, reduction)  # noqa: E731
    P = theta.size
    H = np.zeros((P, P))
    eye = np.eye(P) * h
    for i in range(P):
        for j in range(i, P):
            H[i, j] = H[j, i] = (
                L(theta + eye[i] + eye[j])
                - L(theta + eye[i] - eye[j])
                - L(theta - eye[i] + eye[j])
                + L(theta - eye[i] - eye[j])
            ) / (4 * h * h)
    return H


def torch_loss_hessian(name, spec, theta, X, y, reduction):
    """Hessian of the full-data loss by ``torch.func.hessian`` of a torch forward pass."""
    import torch

    acts = {
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "relu": torch.relu,
        "softplus": torch.nn.functional.softplus,
        "elu": torch.nn.functional.elu,
        "identity": lambda s: s,
    }
    Xt = torch.as_tensor(X)
    yt = torch.as_tensor(y)
    F = torch.nn.functional

    def full_loss(t):
        a, start = Xt, 0
        for layer in spec:
            if layer[0] == "linear":
                _, d_in, d_out, bias = layer
                a = a @ t[start : start + d_in * d_out].reshape(d_out, d_in).T
                start += d_in * d_out
                if bias:
                    a = a + t[start : start + d_out]
                    start += d_out
            else:
                a = acts[layer[1]](a)
        if name == "mse":
            return F.mse_loss(a, yt, reduction=reduction)
        if name == "ce":
            return F.cross_entropy(a, yt, reduction=reduction)
        if name == "bce":
            return F.binary_cross_entropy_with_logits(a, yt, reduction=reduction)
        if name == "poisson":
            return F.poisson_nll_loss(a, yt, log_input=True, full=False, reduction=reduction)
        raise ValueError(name)

    return torch.func.hessian(full_loss)(torch.as_tensor(theta)).numpy()
