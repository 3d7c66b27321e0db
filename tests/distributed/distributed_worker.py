"""One rank of a distributed test run: ``python distributed_worker.py {mpi,torch} OUT_DIR``.

Started by ``test_distributed_launch.py`` under ``mpirun -n 2`` (the ``mpi`` engine) or as two
processes with the environment of ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``; the ``torch`` engine, gloo). Runs :func:`distributed_checks.run_checks` on several
array backends and writes ``OUT_DIR/rank<r>.json``: per backend, the relative error of
every check against its single-process reference and a digest of each result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_checks import run_checks  # noqa: E402


def numpy_backend(dtype=np.float64):
    import array_api_compat.numpy as xp

    def convert(a):
        a = np.asarray(a)
        return a if a.dtype.kind in "iu" else a.astype(dtype)

    return convert, xp, getattr(xp, np.dtype(dtype).name), "cpu"


def strict_backend():
    import array_api_strict as xp

    dev = xp.Device("device1")  # not the default: arrays made without device= fail

    def convert(a):
        a = np.asarray(a)
        dtype = xp.int64 if a.dtype.kind in "iu" else xp.float64
        return xp.asarray(a, dtype=dtype, device=dev)

    return convert, xp, xp.float64, dev


def torch_backend():
    import array_api_compat.torch as xp
    import torch

    def convert(a):
        a = np.asarray(a)
        return torch.as_tensor(a if a.dtype.kind in "iu" else a.astype(np.float64))

    return convert, xp, xp.float64, torch.device("cpu")


def torch_module_checks(comm):
    """A ``torch.nn.Module`` (hooks, autograd) as a distributed GGN and K-FAC."""
    import torch

    import curvlinops as cl

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    net = net.double()
    X, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    batches = [(X[:2], y[:2]), (X[2:3], y[2:3]), (X[3:], y[3:])]
    shard = batches[:1] if comm.rank == 0 else batches[1:]
    params, loss = list(net.parameters()), torch.nn.MSELoss()
    V = torch.randn(sum(p.numel() for p in params), 2, dtype=torch.float64)
    errors = {}
    for cls in (cl.GGNLinearOperator, cl.HessianLinearOperator, cl.KFACLinearOperator):
        got = cls(net, loss, params, shard, comm=comm) @ V
        expected = cls(net, loss, params, batches) @ V
        errors[f"torch.nn.Module {cls.__name__}"] = float(
            (got - expected).abs().max() / expected.abs().max()
        )
    return {"errors": errors, "digests": {}}


def main():
    engine, out = sys.argv[1], Path(sys.argv[2])
    if engine == "mpi":
        from mpi4py import MPI

        import curvlinops as cl

        comm = cl.MPICommunicator(MPI.COMM_WORLD)
        runs = {
            "numpy": lambda: run_checks(comm, *numpy_backend()),
            "array_api_strict": lambda: run_checks(comm, *strict_backend(), quick=True),
        }
    elif engine == "torch":
        import torch.distributed as dist

        import curvlinops as cl

        dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_* from the environment
        comm = cl.as_communicator(dist.group.WORLD)
        runs = {
            "numpy": lambda: run_checks(comm, *numpy_backend()),
            "torch": lambda: run_checks(comm, *torch_backend(), quick=True),
            "torch.nn.Module": lambda: torch_module_checks(comm),
        }
    else:
        raise SystemExit(f"unknown engine {engine!r}; expected 'mpi' or 'torch'")
    report = {"size": comm.size, "backends": {name: run() for name, run in runs.items()}}
    (out / f"rank{comm.rank}.json").write_text(json.dumps(report), encoding="utf-8")
    if engine == "torch":
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
