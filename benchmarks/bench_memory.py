"""Peak memory of one curvature product over one batch, against a loss+gradient's.

Rows: for each model and frontend, the peak memory of a GGN matvec and of a Hessian
matvec (each over one batch, forward pass recomputed: ``cache=False``, the default) over
the peak of one loss+gradient of the same model in the same framework. The issue's
targets: GGN ``<= 1.3``, Hessian ``<= 2``.

How memory is measured, per framework:

- NumPy (native ``curvlinops.nn`` models): :func:`_timing.peak_numpy_bytes`,
  ``tracemalloc``'s peak during the call above what was allocated before it (NumPy
  reports its array buffers to tracemalloc); the result counts.
- PyTorch on the CPU (``TorchModel``): :func:`peak_torch_cpu_bytes`, the running sum of
  the allocations and frees that ``torch.profiler`` records (``profile_memory=True``)
  in the order they happen, its maximum. The profiler attributes an allocation to the
  operator that made it (net of what that operator freed itself) and records frees of
  tensors outliving their operator as ``[memory]`` events, so the sum is exact at
  operator boundaries: a transient buffer inside one aten operator is not seen (the
  same for both sides of a ratio).
- JAX on the CPU: not measured. ``jax.Device.memory_stats()`` is None on the CPU
  client, and a product is several compiled calls with buffers alive between them, so
  no per-computation analysis gives its peak; on a GPU the row reads
  ``peak_bytes_in_use`` from ``memory_stats()`` (reset by nothing, so there only the
  product's increase over the process's earlier peak is a bound).

Models: the benchmarks' MLP (784-256-256-10, ReLU, cross-entropy, N = 1024, float32;
``_mlp.mlp_problem``) and the small ResNet of ``bench_cnn`` (N = 128). Run
``python benchmarks/bench_memory.py [--quick]`` or ``benchmarks/run.py memory``.
"""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np
from _mlp import mlp_problem
from _timing import format_bytes, peak_numpy_bytes

import curvlinops as cl

TARGETS = {"GGN": 1.3, "Hessian": 2.0}


def peak_torch_cpu_bytes(fn) -> int:
    """Peak of the CPU memory PyTorch allocates during one call of ``fn()``, in bytes.

    The maximum of the running sum of the allocation and free events that
    ``torch.profiler`` records, in time order (see the module docstring); the result
    counts, as in :func:`_timing.peak_numpy_bytes`.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    changes = sorted(
        (e.time_range.start, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    running = peak = 0
    for _, change in changes:
        running += change
        peak = max(peak, running)
    return peak


def _rows(model_name, frontend, model, params, data, lossgrad, vector, peak_of):
    kw = dict(check_deterministic=False, num_data=int(data[0][0].shape[0]))
    loss = cl.CrossEntropyLoss()
    operators = {
        "GGN": cl.GGNLinearOperator(model, loss, params, data, **kw),
        "Hessian": cl.HessianLinearOperator(model, loss, params, data, **kw),
    }
    for op in operators.values():  # warm-up: first-call checks and caches
        op @ vector
    lossgrad()
    base = peak_of(lossgrad)
    rows = []
    for name, op in operators.items():
        peak = peak_of(lambda op=op: op @ vector)
        ratio = peak / base
        rows.append(
            {
                "model": model_name,
                "frontend": frontend,
                "product": f"{name} matvec",
                "peak": format_bytes(peak),
                "loss+grad peak": format_bytes(base),
                "ratio": round(ratio, 3),
                "target": f"<= {TARGETS[name]}",
                "meets": ratio <= TARGETS[name],
            }
        )
    return rows


def _mlp_rows(quick):
    model, params, X, y = mlp_problem(quick=quick)
    data = [(X, y)]
    G = cl.GGNLinearOperator(model, cl.CrossEntropyLoss(), params, data, check_deterministic=False)
    v = np.ones(G.shape[1], dtype=np.float32)
    rows = _rows("MLP", "native-numpy", model, params, data, G.gradient_and_loss, v,
                 peak_numpy_bytes)  # fmt: skip
    if importlib.util.find_spec("torch") is None:
        return rows
    import torch

    from curvlinops.frontends.torch import TorchModel

    layers = []
    for i, (W, b) in enumerate(zip(params[::2], params[1::2], strict=True)):
        linear = torch.nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.asarray(W)))
            linear.bias.copy_(torch.from_numpy(np.asarray(b)))
        layers += [linear] + ([torch.nn.ReLU()] if i < len(params) // 2 - 1 else [])
    net = torch.nn.Sequential(*layers)
    return rows + _torch_rows("MLP", net, X, y, torch, TorchModel)


def _torch_rows(model_name, net, X, y, torch, TorchModel):
    tmodel = TorchModel(net)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    trainable = [p for p in net.parameters() if p.requires_grad]

    def lossgrad():
        loss = torch.nn.functional.cross_entropy(net(Xt), yt)
        return torch.autograd.grad(loss, trainable)

    v = torch.ones(sum(p.numel() for p in tmodel.params))
    return _rows(model_name, "torch-cpu", tmodel, tmodel.params, [(Xt, yt)], lossgrad, v,
                 peak_torch_cpu_bytes)  # fmt: skip


def _cnn_rows(quick):
    import bench_cnn

    _, _, model, params, X, y = bench_cnn.problem(quick)
    spec, stats = bench_cnn.problem(quick)[:2]
    data = [(X, y)]
    G = cl.GGNLinearOperator(model, cl.CrossEntropyLoss(), params, data, check_deterministic=False)
    v = np.ones(G.shape[1], dtype=np.float32)
    rows = _rows("ResNet", "native-numpy", model, params, data, G.gradient_and_loss, v,
                 peak_numpy_bytes)  # fmt: skip
    if importlib.util.find_spec("torch") is None:
        return rows
    import torch

    from curvlinops.frontends.torch import TorchModel

    build_cnn, _ = bench_cnn._build_cnn()
    net = build_cnn(spec, bench_cnn.arrays_of(spec, stats, params))
    return rows + _torch_rows("ResNet", net, X, y, torch, TorchModel)


def run(quick: bool) -> list[dict]:
    """One row per model, frontend and product."""
    return _mlp_rows(quick) + _cnn_rows(quick)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models")
    rows = run(parser.parse_args().quick)
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)))


if __name__ == "__main__":
    main()
