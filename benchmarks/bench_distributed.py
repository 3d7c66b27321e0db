"""Distributed curvature: 2 processes against 1 on this machine, and the bytes per product.

The shared MLP problem (``_mlp.py``: 784-256-256-10, N = 1024, float32) in 4 batches of
256; with two processes each holds two batches. :func:`run` starts two ranks with each
engine installed (``mpirun -n 2`` with mpi4py and ``mpirun``; two torch.distributed gloo
processes on 127.0.0.1 with torch), each rank with one thread. In interleaved rounds,
rank 0 times the single-process operator on all four batches while rank 1 sleeps (a
barrier polled with sleeps: MPI's busy-waiting would take a core from the single-process
timing), then both time the distributed operator on their shards
(``_timing.time_ratio``'s scheme across the two processes: a block of single-process
calls, then a block of distributed calls, per round; the ratio is the median of the
rounds' ratios).

Rows: the GGN matvec and a matmat of 16 columns, the gradient and loss, the K-FAC
factors' construction. Columns: time with 2 processes over time with 1 (ideal 0.5 on two
idle cores), the bytes one all-reduce of a product carries (``comm.allreduce_bytes``:
the ``(P, K)`` block plus one float, the error flag) against the block itself, and the
share of the distributed call spent in an all-reduce of that buffer alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _quiet_barrier(comm):
    """A barrier that sleeps while it waits (MPI's and gloo's blocking calls may spin)."""
    if isinstance(comm, __import__("curvlinops").MPICommunicator):
        request = comm.comm.Ibarrier()
        while not request.Test():
            time.sleep(1e-3)
        return
    import torch.distributed as dist

    work = dist.barrier(group=comm.group, async_op=True)
    while not work.is_completed():
        time.sleep(1e-3)


def _interleaved(comm, single, distributed, rounds, block):
    """Median over rounds of (distributed time / single-process time), timed on rank 0."""
    ratios = []
    if comm.rank == 0:
        single()  # warm-up
    distributed()
    for _ in range(rounds):
        _quiet_barrier(comm)  # rank 1 sleeps while rank 0 times one process
        t_single = _median_time(single, block) if comm.rank == 0 else 0.0
        _quiet_barrier(comm)
        t_dist = _median_time(distributed, block)
        ratios.append(t_dist / t_single if comm.rank == 0 else 0.0)
    return statistics.median(ratios)


def _worker(comm, quick, out):
    """Both ranks: build the operators, time them, rank 0 writes the rows to ``out``."""
    import numpy as np
    from _mlp import mlp_problem

    import curvlinops as cl

    model, params, X, y = mlp_problem(quick=quick)
    loss = cl.CrossEntropyLoss()
    n = X.shape[0] // 4
    batches = [(X[i * n : (i + 1) * n], y[i * n : (i + 1) * n]) for i in range(4)]
    shard = batches[2 * comm.rank : 2 * comm.rank + 2]
    rounds, block = (3, 2) if quick else (7, 3)
    P = sum(p.size for p in params)
    rng = np.random.default_rng(0)
    options = {"check_deterministic": False}
    G_one = cl.GGNLinearOperator(model, loss, params, batches, comm=None, **options)
    G = cl.GGNLinearOperator(model, loss, params, shard, comm=comm, **options)
    itemsize = X.dtype.itemsize
    rows = []
    for K in (1, 16):
        V = rng.standard_normal((P, K)).astype(X.dtype)
        calls, sent = comm.allreduce_calls, comm.allreduce_bytes
        G @ V
        per_product = comm.allreduce_bytes - sent
        reduces = comm.allreduce_calls - calls
        ratio = _interleaved(comm, lambda V=V: G_one @ V, lambda V=V: G @ V, rounds, block)
        buffer = np.zeros(P * K + 1, dtype=X.dtype)
        t_reduce = _median_time(lambda b=buffer: comm.allreduce_sum(b.copy()), 5 * block)
        t_product = _median_time(lambda V=V: G @ V, block)
        rows.append(
            {
                "quantity": "GGN matvec" if K == 1 else f"GGN matmat K={K}",
                "2 procs / 1 proc": ratio,
                "ideal": 0.5,
                "all-reduces": reduces,
                "bytes per product": per_product,
                "(P, K) block bytes": P * K * itemsize,
                "all-reduce share": t_reduce / t_product,
            }
        )
    ratio = _interleaved(
        comm, lambda: G_one.gradient_and_loss(), lambda: G.gradient_and_loss(), rounds, block
    )
    rows.append(
        {
            "quantity": "gradient and loss",
            "2 procs / 1 proc": ratio,
            "ideal": 0.5,
            "bytes per product": (P + 2) * itemsize,
        }
    )
    ratio = _interleaved(
        comm,
        lambda: cl.KFACLinearOperator(model, loss, params, batches, **options),
        lambda: cl.KFACLinearOperator(model, loss, params, shard, comm=comm, **options),
        max(2, rounds // 2),
        1,
    )
    rows.append({"quantity": "K-FAC factors", "2 procs / 1 proc": ratio, "ideal": 0.5})
    if comm.rank == 0:
        engine = type(comm).__name__
        for row in rows:
            row["engine"] = engine
        Path(out).write_text(json.dumps(rows), encoding="utf-8")


def _environment(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env


def _launch(engine, quick, out):
    """Two ranks of this file as a worker; returns their combined output."""
    script = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, out]
    if quick:
        script.append("--quick")
    if engine == "mpi":
        beside = Path(sys.executable).parent / "mpirun"
        mpirun = str(beside) if beside.exists() else shutil.which("mpirun")
        processes = [subprocess.Popen([mpirun, "-n", "2", *script], env=_environment())]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        processes = [
            subprocess.Popen(
                script,
                env=_environment(
                    RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
                ),
            )
            for r in range(2)
        ]
    for p in processes:
        p.wait(timeout=1800)
        if p.returncode:
            raise RuntimeError(f"a distributed benchmark rank exited with {p.returncode}")


def _engines():
    found = []
    mpi = importlib.util.find_spec("mpi4py") is not None
    if mpi and ((Path(sys.executable).parent / "mpirun").exists() or shutil.which("mpirun")):
        found.append("mpi")
    if importlib.util.find_spec("torch") is not None:
        found.append("torch")
    return found


def run(quick: bool = False) -> list[dict]:
    engines = _engines()
    if not engines:
        return [{"quantity": "skipped", "reason": "needs mpi4py and mpirun, or torch"}]
    rows = []
    for engine in engines:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "rows.json")
            _launch(engine, quick, out)
            rows += json.loads(Path(out).read_text(encoding="utf-8"))
    return rows


def _main(argv):
    _, engine, out, *rest = argv
    import curvlinops as cl

    if engine == "mpi":
        from mpi4py import MPI

        comm = cl.MPICommunicator(MPI.COMM_WORLD)
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        comm = cl.TorchCommunicator()
    _worker(comm, "--quick" in rest, out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _main(sys.argv[1:])
    else:
        for row in run("--quick" in sys.argv):
            print(row)
