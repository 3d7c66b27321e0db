"""Curvature products through the frontends, relative to loss+gradient of the same framework.

Model: MLP 784-256-256-10 with ReLU, ``N = 1024`` data points in one batch, float32,
cross-entropy (mean). For each source of derivatives:

- ``native-numpy``: ``curvlinops.nn.Sequential`` on NumPy (loss+gradient is the
  library's own forward pass and backward pass, ``gradient_and_loss``);
- ``torch-cpu`` (and ``torch-cuda`` with a GPU): ``TorchModel`` of a
  ``torch.nn.Sequential`` (loss+gradient: ``cross_entropy`` + ``torch.autograd.grad``);
- ``jax``: ``JaxModel`` of a pure function (loss+gradient: ``jax.jit`` of
  ``jax.value_and_grad``).

Columns: the time of one GGN matvec and one Hessian matvec from the curvature operators
(forward pass recomputed in each product, ``cache=False``; and the GGN with the forward
pass kept, ``cache=True``), each divided by the time of one loss+gradient of the same
framework measured in the same run (each time the minimum over the repeats, the call
least disturbed by other work on the machine). DESIGN.md's targets: GGN ~1.3 (cached) to ~1.7,
Hessian ~2-2.3.

On a machine shared with other work, pin every framework to one thread for stable
ratios: ``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``.

The torch frontend is measured with both ``jvp_method`` settings. A last row times
its two ways of a Jacobian-vector product alone: ``torch.func.jvp`` (forward pass
recomputed with the tangent) against ``torch.func.linearize`` (trace once, then apply
the traced tangent map), and how many products amortize the tracing.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
from _timing import time_call

from curvlinops import CrossEntropyLoss, GGNLinearOperator, HessianLinearOperator, nn

WIDTHS = (784, 256, 256, 10)


def _problem(n, seed=0):
    import array_api_compat.numpy as xp

    native = nn.Sequential(
        nn.Linear(WIDTHS[0], WIDTHS[1]),
        nn.ReLU(),
        nn.Linear(WIDTHS[1], WIDTHS[2]),
        nn.ReLU(),
        nn.Linear(WIDTHS[2], WIDTHS[3]),
    )
    params = native.init(seed, xp=xp, dtype=xp.float32)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, WIDTHS[0])).astype(np.float32)
    y = rng.integers(0, WIDTHS[-1], size=n)
    return native, params, X, y


def _row(name, model, params, data, lossgrad, vector, repeats):
    loss = CrossEntropyLoss()
    ggn = GGNLinearOperator(model, loss, params, data, check_deterministic=False)
    ggn_cached = GGNLinearOperator(model, loss, params, data, check_deterministic=False, cache=True)
    hessian = HessianLinearOperator(model, loss, params, data, check_deterministic=False)
    # The minimum over repeats: the machine may be shared, and the fastest call is the
    # one least disturbed by other work.
    base = time_call(lossgrad, repeats=repeats).min
    times = {
        "ggn": time_call(lambda: ggn @ vector, repeats=repeats).min,
        "ggn_cached": time_call(lambda: ggn_cached @ vector, repeats=repeats).min,
        "hessian": time_call(lambda: hessian @ vector, repeats=repeats).min,
    }
    row = {"frontend": name, "lossgrad_ms": 1e3 * base}
    for key, value in times.items():
        row[f"{key}_ms"] = 1e3 * value
    for key, value in times.items():
        row[f"{key}/lossgrad"] = value / base
    return row


def _native_row(native, params, X, y, repeats):
    data = [(X, y)]
    ggn = GGNLinearOperator(native, CrossEntropyLoss(), params, data, check_deterministic=False)
    vector = np.ones(ggn.shape[1], dtype=np.float32)
    return _row("native-numpy", native, params, data, ggn.gradient_and_loss, vector, repeats)


def _torch_net(params, device):
    import torch

    net = torch.nn.Sequential(
        torch.nn.Linear(WIDTHS[0], WIDTHS[1]),
        torch.nn.ReLU(),
        torch.nn.Linear(WIDTHS[1], WIDTHS[2]),
        torch.nn.ReLU(),
        torch.nn.Linear(WIDTHS[2], WIDTHS[3]),
    )
    with torch.no_grad():
        for p, value in zip(net.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(np.asarray(value)))
    return net.to(device)


def _torch_row(params, X, y, device, repeats, jvp_method="jvp"):
    import torch

    from curvlinops.frontends.torch import TorchModel

    net = _torch_net(params, device)
    model = TorchModel(net, jvp_method=jvp_method)
    Xt, yt = torch.from_numpy(X).to(device), torch.from_numpy(y).to(device)
    trainable = list(net.parameters())

    def lossgrad():
        loss = torch.nn.functional.cross_entropy(net(Xt), yt)
        return torch.autograd.grad(loss, trainable)[0]

    vector = torch.ones(sum(p.numel() for p in trainable), device=device)
    name = f"torch-{device}" + ("" if jvp_method == "jvp" else f" ({jvp_method})")
    return _row(name, model, model.params, [(Xt, yt)], lossgrad, vector, repeats)


def _jax_row(params, X, y, repeats):
    import jax
    import jax.numpy as jnp

    from curvlinops.frontends.jax import JaxModel

    def mlp(p, x):
        h = jax.nn.relu(x @ p[0].T + p[1])
        h = jax.nn.relu(h @ p[2].T + p[3])
        return h @ p[4].T + p[5]

    jparams = [jnp.asarray(p) for p in params]
    Xj, yj = jnp.asarray(X), jnp.asarray(y)
    model = JaxModel(mlp, jparams)

    @jax.jit
    def lossgrad_jit(p):
        def loss(p):
            logp = jax.nn.log_softmax(mlp(p, Xj), axis=1)
            return -jnp.mean(jnp.take_along_axis(logp, yj[:, None], axis=1))

        return jax.value_and_grad(loss)(p)

    def lossgrad():
        return lossgrad_jit(jparams)[1][0]

    vector = jnp.ones(sum(p.size for p in jparams), dtype=jnp.float32)
    return _row("jax", model, jparams, [(Xj, yj)], lossgrad, vector, repeats)


def _torch_jvp_rows(params, X, device, repeats):
    """``torch.func.jvp`` (recompute) against ``torch.func.linearize`` (trace once)."""
    import torch
    from torch.func import functional_call, jvp, linearize

    net = _torch_net(params, device)
    names = [n for n, _ in net.named_parameters()]
    primals = tuple(p.detach() for p in net.parameters())
    Xt = torch.from_numpy(X).to(device)
    tangents = tuple(torch.ones_like(p) for p in primals)

    def f(*ps):
        return functional_call(net, dict(zip(names, ps, strict=True)), (Xt,))

    jvp_time = time_call(lambda: jvp(f, primals, tangents)[1], repeats=repeats).min
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.fx internals
        linearize_time = time_call(lambda: linearize(f, *primals)[1], repeats=repeats).min
        _, push = linearize(f, *primals)
    apply_time = time_call(lambda: push(*tangents), repeats=repeats).min
    return [
        {
            "device": device,
            "func.jvp_ms": 1e3 * jvp_time,
            "func.linearize_ms": 1e3 * linearize_time,
            "linearized_apply_ms": 1e3 * apply_time,
            "products_to_amortize": linearize_time / max(jvp_time - apply_time, 1e-12),
        }
    ]


def run(quick: bool) -> list[dict]:
    n = 128 if quick else 1024
    repeats = 3 if quick else 10
    native, params, X, y = _problem(n)
    rows = [_native_row(native, params, X, y, repeats)]
    devices = []
    if importlib.util.find_spec("torch") is not None:
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            rows.append(_torch_row(params, X, y, device, repeats))
            rows.append(_torch_row(params, X, y, device, repeats, jvp_method="linearize"))
    if importlib.util.find_spec("jax") is not None:
        rows.append(_jax_row(params, X, y, repeats))
    for device in devices:
        rows += [
            {"frontend": "torch jvp variants", **r}
            for r in _torch_jvp_rows(params, X, device, repeats)
        ]
    return rows
