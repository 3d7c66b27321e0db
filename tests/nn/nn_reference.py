"""Independent references for the tests of curvlinops.nn.

Layer specs (tuples such as ``("linear", 4, 3, True)`` or ``("gelu", "tanh")``) build the
same network three ways: a curvlinops.nn model, a ``torch.nn.Sequential`` and a
functional JAX forward. Derivative references come from central finite differences in
NumPy float64, from ``torch.func`` and from ``jax`` on the same weights.
"""

from __future__ import annotations

import importlib.util
import math

import array_api_compat.numpy as npx
import numpy as np

from curvlinops import nn

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None

ACTIVATION_SPECS = {
    "relu": ("relu",),
    "leaky_relu": ("leaky_relu", 0.1),
    "tanh": ("tanh",),
    "sigmoid": ("sigmoid",),
    "softplus": ("softplus", 1.0, 20.0),
    "softplus_threshold": ("softplus", 2.0, 1.0),
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
    "elu": ("elu", 0.7),
    "identity": ("identity",),
}


def build_ours(specs):
    """curvlinops.nn.Sequential from layer specs."""
    return nn.Sequential(*[_our_layer(s) for s in specs])


def _our_layer(spec):
    kind, *args = spec
    return {
        "linear": lambda: nn.Linear(args[0], args[1], bias=args[2]),
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(args[0]),
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "softplus": lambda: nn.Softplus(beta=args[0], threshold=args[1]),
        "gelu": lambda: nn.GELU(approximate=args[0]),
        "elu": lambda: nn.ELU(alpha=args[0]),
        "identity": nn.Identity,
        "flatten": nn.Flatten,
    }[kind]()


def build_torch(specs):
    """torch.nn.Sequential (float64) from layer specs."""
    import torch

    def layer(spec):
        kind, *args = spec
        return {
            "linear": lambda: torch.nn.Linear(args[0], args[1], bias=args[2], dtype=torch.float64),
            "relu": torch.nn.ReLU,
            "leaky_relu": lambda: torch.nn.LeakyReLU(args[0]),
            "tanh": torch.nn.Tanh,
            "sigmoid": torch.nn.Sigmoid,
            "softplus": lambda: torch.nn.Softplus(beta=args[0], threshold=args[1]),
            "gelu": lambda: torch.nn.GELU(approximate=args[0]),
            "elu": lambda: torch.nn.ELU(alpha=args[0]),
            "identity": torch.nn.Identity,
            "flatten": torch.nn.Flatten,
        }[kind]()

    return torch.nn.Sequential(*[layer(s) for s in specs])


def jax_forward(specs):
    """Functional JAX forward ``f(params, x)`` from layer specs."""
    import jax
    import jax.numpy as jnp

    def apply(spec, p, a):
        kind, *args = spec
        if kind == "linear":
            out = a @ p[0].T
            return out + p[1] if args[2] else out
        if kind == "relu":
            return jax.nn.relu(a)
        if kind == "leaky_relu":
            return jnp.where(a > 0, a, args[0] * a)
        if kind == "tanh":
            return jnp.tanh(a)
        if kind == "sigmoid":
            return jax.nn.sigmoid(a)
        if kind == "softplus":
            beta, threshold = args
            return jnp.where(beta * a > threshold, a, jax.nn.softplus(beta * a) / beta)
        if kind == "gelu":
            return jax.nn.gelu(a, approximate=args[0] == "tanh")
        if kind == "elu":
            return jax.nn.elu(a, args[0])
        if kind == "identity":
            return a
        if kind == "flatten":
            return jnp.reshape(a, (a.shape[0], -1))
        raise ValueError(kind)

    counts = [(3 if s[3] else 2) - 1 if s[0] == "linear" else 0 for s in specs]

    def forward(params, x):
        a, start = x, 0
        for spec, n in zip(specs, counts, strict=True):
            a = apply(spec, params[start : start + n], a)
            start += n
        return a

    return forward


# -- data --------------------------------------------------------------------------------


def random_problem(model, x_shape, K, seed):
    """Weights, inputs, tangents (trailing K), cotangents and second-order inputs in NumPy."""
    rng = np.random.default_rng(seed)
    shapes = model.expected_param_shapes()
    params = [0.8 * rng.standard_normal(s) for s in shapes]
    x = rng.standard_normal(x_shape)
    out_shape = model(params, x).shape
    return {
        "params": params,
        "x": x,
        "V": [rng.standard_normal(s + (K,)) for s in shapes],
        "U": rng.standard_normal(out_shape + (K,)),
        "u": rng.standard_normal(out_shape),
        "w": rng.standard_normal(out_shape + (K,)),
    }


def flat(arrays):
    return np.concatenate([np.reshape(a, -1) for a in arrays])


def flat_k(arrays):
    """Arrays shaped like the parameters plus trailing K -> (P, K)."""
    K = arrays[0].shape[-1]
    return np.concatenate([np.reshape(a, (-1, K)) for a in arrays], axis=0)


def unflat(vector, shapes):
    out, start = [], 0
    for s in shapes:
        size = math.prod(s)
        out.append(np.reshape(vector[start : start + size], s))
        start += size
    return out


# -- finite differences (NumPy float64) --------------------------------------------------


def fd_jvp(model, params, x, V, h=1e-5):
    """Central differences of ``model(params + h v_k)`` for each of the K tangents."""
    cols = []
    for k in range(V[0].shape[-1]):
        plus = model([p + h * v[..., k] for p, v in zip(params, V, strict=True)], x)
        minus = model([p - h * v[..., k] for p, v in zip(params, V, strict=True)], x)
        cols.append((plus - minus) / (2 * h))
    return np.stack(cols, axis=-1)


def fd_second_order(model, params, x, u, V, h=1e-5):
    """Central differences of ``theta -> J(theta)^T u`` along each tangent: ``(P, K)``."""
    cols = []
    for k in range(V[0].shape[-1]):
        shifted = [
            [p + sign * h * v[..., k] for p, v in zip(params, V, strict=True)]
            for sign in (1.0, -1.0)
        ]
        grads = [flat(model.linearize(q, x).vjp(u)) for q in shifted]
        cols.append((grads[0] - grads[1]) / (2 * h))
    return np.stack(cols, axis=-1)


def numpy_model_outputs(model, params, x):
    return np.asarray(model([npx.asarray(p) for p in params], npx.asarray(x)))


# -- torch.func and jax references -------------------------------------------------------


def torch_reference(specs, prob):
    """Outputs, J V, J^T U and (sum u Hess f) V + J^T w from torch.func, as NumPy."""
    import torch
    from torch.func import functional_call, hessian, jvp, vjp

    module = build_torch(specs)
    names = [name for name, _ in module.named_parameters()]
    shapes = [tuple(p.shape) for p in prob["params"]]
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)  # noqa: E731
    x = t(prob["x"])

    def f(*params):
        return functional_call(module, dict(zip(names, params, strict=True)), (x,))

    params = tuple(t(p) for p in prob["params"])
    K = prob["U"].shape[-1]
    outputs = f(*params)
    jv = [jvp(f, params, tuple(t(v[..., k]) for v in prob["V"]))[1] for k in range(K)]
    _, pull = vjp(f, *params)
    jtu = [flat([g.numpy() for g in pull(t(prob["U"][..., k]))]) for k in range(K)]
    jtw = [flat([g.numpy() for g in pull(t(prob["w"][..., k]))]) for k in range(K)]
    u = t(prob["u"])

    def contracted(theta):
        pieces = zip(_split(theta, shapes), shapes, strict=True)
        return torch.sum(u * f(*[torch.reshape(q, s) for q, s in pieces]))

    H = hessian(contracted)(t(flat(prob["params"]))).numpy()
    return {
        "outputs": outputs.detach().numpy(),
        "JV": np.stack([j.detach().numpy() for j in jv], axis=-1),
        "JtU": np.stack(jtu, axis=-1),
        "second": H @ flat_k(prob["V"]) + np.stack(jtw, axis=-1),
    }


def jax_reference(specs, prob):
    """Outputs, J V, J^T U and (sum u Hess f) V + J^T w from jax, as NumPy.

    Everything is computed in one jitted function (one compilation instead of one per
    primitive and shape in eager mode).
    """
    import jax
    import jax.numpy as jnp

    forward = jax_forward(specs)
    shapes = [tuple(p.shape) for p in prob["params"]]

    def unflatten(theta):
        return [jnp.reshape(q, s) for q, s in zip(_split(theta, shapes), shapes, strict=True)]

    @jax.jit
    def products(theta, x, V, U, u, w):
        def f(t):
            return forward(unflatten(t), x)

        outputs, pull = jax.vjp(f, theta)
        JV = jax.vmap(lambda v: jax.jvp(f, (theta,), (v,))[1], in_axes=1, out_axes=-1)(V)
        JtU = jax.vmap(lambda c: pull(c)[0], in_axes=-1, out_axes=1)(U)
        JtW = jax.vmap(lambda c: pull(c)[0], in_axes=-1, out_axes=1)(w)
        H = jax.hessian(lambda t: jnp.sum(u * f(t)))(theta)
        return outputs, JV, JtU, H @ V + JtW

    args = [flat(prob["params"]), prob["x"], flat_k(prob["V"]), prob["U"], prob["u"], prob["w"]]
    results = products(*[jnp.asarray(a) for a in args])
    return dict(zip(("outputs", "JV", "JtU", "second"), map(np.asarray, results), strict=True))


def _split(theta, shapes):
    out, start = [], 0
    for s in shapes:
        size = math.prod(s)
        out.append(theta[start : start + size])
        start += size
    return out


# -- running our model on a backend -------------------------------------------------------


def ours_on_backend(model, prob, backend, dtype="float64"):
    """Our outputs, J V, J^T U and second-order product on ``backend``, as NumPy."""
    to = lambda a: backend.asarray(a, dtype)  # noqa: E731
    lin = model.linearize([to(p) for p in prob["params"]], to(prob["x"]))
    V = [to(v) for v in prob["V"]]
    return {
        "outputs": backend.to_numpy(lin.outputs),
        "JV": backend.to_numpy(lin.jvp(V)),
        "JtU": flat_k([backend.to_numpy(g) for g in lin.vjp(to(prob["U"]))]),
        "second": flat_k(
            [backend.to_numpy(g) for g in lin.second_order_vjp(to(prob["u"]), V, to(prob["w"]))]
        ),
    }
