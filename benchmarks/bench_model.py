"""Native model products (curvlinops.nn) against one loss+gradient and against PyTorch.

MLP 784-256-256-10 (ReLU), N = 1024, float32, on the CPU. Timed, for curvlinops.nn
on NumPy and for the same network in PyTorch (``torch.func``, when installed, with as
many threads as NumPy's BLAS uses):

- ``forward``: the outputs;
- ``loss+grad``: forward, softmax cross-entropy and the gradient of its mean (for
  curvlinops: ``linearize``, the loss's per-datum gradient and one ``vjp``; for PyTorch:
  ``autograd.grad``);
- ``jvp+vjp K=1`` and ``K=16``: one Jacobian-vector and one vector-Jacobian product
  with K vectors each, on a cached forward pass (curvlinops: one linearization; PyTorch:
  ``torch.func.vjp``'s pullback, and ``torch.func.jvp`` -- forward mode, which evaluates
  the primal alongside -- under ``vmap`` for K = 16);
- ``second_order_vjp K=1`` (curvlinops only): the tier-2 product
  ``sum_n u_n Hess f_n v + J^T J v`` with ``u`` the loss gradient, one forward-tangent
  and one R-backward pass (DESIGN.md's target for a Hessian matvec: ~2-2.3).

The columns ``/loss+grad`` (each product over one loss+gradient of the same library:
DESIGN.md's targets are ~1.3 for a GGN matvec with cached forward, i.e. jvp+vjp K=1)
and ``ours/torch`` are ratios of medians measured in this run; each library's
functions are timed in interleaved rounds so that a changing machine load affects them
alike.
"""

from __future__ import annotations

import importlib.util
import statistics

import numpy as np
from _timing import time_call

from curvlinops import nn

SIZES = (784, 256, 256, 10)
BATCH = 1024
QUICK_BATCH = 128
KS = (1, 16)


def run(quick: bool) -> list[dict]:
    n = QUICK_BATCH if quick else BATCH
    rounds = 3 if quick else 11
    problem = _problem(n)
    work = {"curvlinops.nn (numpy)": _our_work(problem)}
    if importlib.util.find_spec("torch") is not None:
        work["torch.func"] = _torch_work(problem)
    times = _time_interleaved(work, rounds)
    rows = []
    for library, by_quantity in times.items():
        base = statistics.median(by_quantity["loss+grad"])
        for quantity, samples in by_quantity.items():
            median = statistics.median(samples)
            row = {
                "library": library,
                "quantity": quantity,
                "seconds": median,
                "min_seconds": min(samples),
                "/loss+grad": median / base,
            }
            if library != "torch.func" and quantity in times.get("torch.func", {}):
                row["ours/torch"] = median / statistics.median(times["torch.func"][quantity])
            row["N"] = n
            rows.append(row)
    return rows


def _time_interleaved(work, rounds):
    """Samples of every function, timed in interleaved rounds within each library.

    One call of each of a library's functions per round, so that a change in the
    machine's load affects all of them alike and the ratios over loss+gradient stay
    meaningful. Libraries are timed one after the other: interleaving them would let
    one library's idle worker threads (which spin for a while) slow the other down.
    """
    samples = {}
    for lib, fns in work.items():
        for fn in fns.values():
            time_call(fn, repeats=1, warmup=1)
        samples[lib] = {q: [] for q in fns}
        for _ in range(rounds):
            for q, fn in fns.items():
                samples[lib][q].append(time_call(fn, repeats=1, warmup=0).min)
    return samples


def _problem(n, seed=0):
    import array_api_compat.numpy as xp

    model = nn.Sequential(
        nn.Linear(SIZES[0], SIZES[1]),
        nn.ReLU(),
        nn.Linear(SIZES[1], SIZES[2]),
        nn.ReLU(),
        nn.Linear(SIZES[2], SIZES[3]),
    )
    params = model.init(seed, xp=xp, dtype=xp.float32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=n)
    tangents = {
        k: [rng.standard_normal(p.shape + (k,)).astype(np.float32) for p in params] for k in KS
    }
    cotangents = {k: rng.standard_normal((n, SIZES[-1], k)).astype(np.float32) for k in KS}
    return model, params, x, y, tangents, cotangents


def _cross_entropy_gradient(logits, y):
    """Gradient of the mean softmax cross-entropy with respect to the logits."""
    try:
        from curvlinops.losses import CrossEntropyLoss
    except ImportError:  # the losses layer is optional for this benchmark
        shifted = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(shifted)
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(y)), y] -= 1.0
        return p / len(y)
    return CrossEntropyLoss().gradient(logits, y) * (1.0 / len(y))


def _our_work(problem):
    model, params, x, y, tangents, cotangents = problem

    def loss_and_gradient():
        lin = model.linearize(params, x)
        return lin.vjp(_cross_entropy_gradient(lin.outputs, y))

    lin = model.linearize(params, x)
    work = {"forward": lambda: model(params, x), "loss+grad": loss_and_gradient}
    for k in KS:
        V, U = tangents[k], cotangents[k]
        work[f"jvp+vjp K={k}"] = lambda V=V, U=U: (lin.jvp(V), lin.vjp(U))
    # Tier 2: sum_n u_n Hess f_n V + J^T (J V) with u the loss gradient (R-operator).
    u = _cross_entropy_gradient(lin.outputs, y)
    work["second_order_vjp K=1"] = lambda: lin.second_order_vjp(u, tangents[1], lambda jv: jv)
    return work


def _torch_work(problem):
    import torch
    from torch.func import functional_call, jvp, vjp, vmap

    torch.set_num_threads(_blas_threads())
    model_np, params_np, x_np, y_np, tangents, cotangents = problem
    layers = []
    for i in range(len(SIZES) - 1):
        layers.append(torch.nn.Linear(SIZES[i], SIZES[i + 1]))
        if i < len(SIZES) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    names = [name for name, _ in model.named_parameters()]
    params = {name: torch.from_numpy(p) for name, p in zip(names, params_np, strict=True)}
    for name, p in model.named_parameters():
        p.data.copy_(params[name])
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)

    def f(p):
        return functional_call(model, p, (x,))

    def forward():
        with torch.no_grad():
            return model(x)

    def loss_and_gradient():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        return torch.autograd.grad(loss, list(model.parameters()))

    work = {"forward": forward, "loss+grad": loss_and_gradient}
    _, pullback = vjp(f, params)
    for k in KS:
        V = {
            n: torch.from_numpy(np.ascontiguousarray(np.moveaxis(t, -1, 0)))
            for n, t in zip(names, tangents[k], strict=True)
        }
        U = torch.from_numpy(np.ascontiguousarray(np.moveaxis(cotangents[k], -1, 0)))
        if k == 1:
            V1 = {n: t[0] for n, t in V.items()}

            def pair(V1=V1, U=U):
                return jvp(f, (params,), (V1,))[1], pullback(U[0])
        else:
            push = vmap(lambda v: jvp(f, (params,), (v,))[1])
            pull = vmap(pullback)

            def pair(V=V, U=U, push=push, pull=pull):
                return push(V), pull(U)

        work[f"jvp+vjp K={k}"] = pair
    return work


def _blas_threads() -> int:
    """Threads of NumPy's BLAS (threadpoolctl when installed, else the CPU count)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        import os

        return os.cpu_count() or 1
    counts = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]
    return max(counts) if counts else 1
