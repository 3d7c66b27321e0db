"""
Curvature over many processes
=============================

A curvature product is a sum over data, so it splits over processes: each process
(rank) holds a shard of the data, sums over it, and one all-reduce adds the shards'
sums. Every curvature operator takes the communicator of the engine you run
(``comm=``: an mpi4py communicator or a ``torch.distributed`` process group; see
:doc:`/distributed`).

This example writes the script each rank runs (a GGN's spectrum, trace and a damped
natural-gradient direction, by CG and by K-FAC), runs it as one process, shows how to
start it on many, and then runs it on two ranks inside this process (threads behind a
small :class:`~curvlinops.Communicator`) to check that two ranks compute what one does,
with one all-reduce of a ``(P, K)`` block per product, and that a failing rank makes
every rank raise.
"""

import threading

import array_api_compat.numpy as xp
import matplotlib.pyplot as plt
import numpy as np

import curvlinops as cl
from curvlinops import nn

# %%
# The script every rank runs
# --------------------------
#
# The data set is five batches of different sizes; rank ``r`` of ``size`` takes the
# batches ``r, r + size, ...`` (any split works, including none at all). Everything
# else is the same on every rank: the model, the parameters, the seeds of the solvers.

rng = np.random.default_rng(0)
sizes = [120, 80, 150, 60, 90]
X = rng.normal(size=(sum(sizes), 8))
y = (X[:, :3] @ rng.normal(size=(3, 3))).argmax(axis=1)
edges = np.cumsum([0, *sizes])
batches = [(X[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
params = model.init(0, xp=xp, dtype=xp.float64)
loss = cl.CrossEntropyLoss()


def curvature_report(comm):
    """The GGN over all ranks' data: spectrum, trace, natural-gradient directions."""
    comm = cl.as_communicator(comm)
    shard = batches[comm.rank :: comm.size]
    G = cl.GGNLinearOperator(model, loss, params, shard, comm=comm)
    grads, value = G.gradient_and_loss()
    g = cl.models.flatten_params(grads)
    eigenvalues, _ = cl.eigsh(G, k=3, seed=0)
    direction, _ = cl.cg(G, g, damping=0.1, rtol=1e-10)
    K = cl.KFACLinearOperator(model, loss, params, shard, comm=comm)
    grid, density = cl.spectral_density(G, num_probes=4, lanczos_steps=30, seed=1)
    return {
        "rank": comm.rank,
        "loss": float(value),
        "top eigenvalues": eigenvalues,
        "trace estimate": float(cl.hutchinson_trace(G, 50, seed=2)),
        "CG direction": direction,
        "K-FAC direction": K.inverse(0.1) @ g,
        "density": (grid, density),
        "all-reduces": comm.allreduce_calls,
        "bytes": comm.allreduce_bytes,
    }


# %%
# One process
# -----------
#
# Without a communicator (``comm=None``) the script is an ordinary single-process run.

one = curvature_report(None)
print(f"loss {one['loss']:.4f}, top eigenvalues {np.round(one['top eigenvalues'], 4)}")

# %%
# Many processes
# --------------
#
# On a cluster the same function runs in every process; only the communicator
# changes. With MPI (``pip install curvlinops[mpi]`` on one machine; the cluster's MPI
# and ``pip install --no-binary=mpi4py mpi4py`` elsewhere):
#
# .. code-block:: python
#
#     if __name__ == "__main__":
#         from mpi4py import MPI
#         report = curvature_report(MPI.COMM_WORLD)
#
# .. code-block:: bash
#
#     mpirun -n 4 python report.py          # one machine
#     srun --ntasks=64 python report.py     # Slurm
#
# With PyTorch, ``torchrun`` starts the processes and
# ``torch.distributed.init_process_group("gloo")`` (``"nccl"`` on GPUs) joins them:
#
# .. code-block:: python
#
#     if __name__ == "__main__":
#         import torch.distributed as dist
#         dist.init_process_group("gloo")
#         report = curvature_report(dist.group.WORLD)
#
# .. code-block:: bash
#
#     torchrun --nproc-per-node 4 report.py
#
# Two ranks in this process
# -------------------------
#
# A :class:`~curvlinops.Communicator` needs two collectives: the sum of an array over
# the ranks and the gathering of small Python objects. Here the ranks are threads that
# meet at a barrier (a stand-in for MPI, good enough to run the script twice at once).


class ThreadCommunicator(cl.Communicator):
    """Rank ``rank`` of ``size`` threads that share ``slots`` and a ``barrier``."""

    def __init__(self, rank, size, slots, barrier):
        super().__init__()
        self.rank, self.size, self.slots, self.barrier = rank, size, slots, barrier

    def _exchange(self, value):
        self.barrier.wait()
        self.slots[self.rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        return values

    def _allreduce_sum(self, x):
        return sum(self._exchange(np.array(x)))  # every rank adds in rank order

    def allgather_object(self, obj):
        return self._exchange(obj)


def run_ranks(size, work):
    """``work(comm)`` on ``size`` thread ranks; their results (or their errors)."""
    slots, barrier = [None] * size, threading.Barrier(size, timeout=60)
    results = [None] * size

    def target(rank):
        try:
            results[rank] = work(ThreadCommunicator(rank, size, slots, barrier))
        except Exception as err:
            results[rank] = err

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


two = run_ranks(2, curvature_report)
for report in two:
    print(
        f"rank {report['rank']}: loss {report['loss']:.4f}, top eigenvalues "
        f"{np.round(report['top eigenvalues'], 4)}, {report['all-reduces']} all-reduces"
    )

# %%
# Both ranks hold the whole data set's results, equal to the single process's up to
# the rounding of a sum in another order; the spectral density, the trace estimate and
# the eigenvalues come from the same random probes on every rank (from the seed).

for key in ("top eigenvalues", "CG direction", "K-FAC direction"):
    for report in two:
        error = np.abs(report[key] - one[key]).max() / np.abs(one[key]).max()
        assert error < 1e-12, (key, error)
    print(f"{key}: two ranks = one process (relative difference < 1e-12)")
assert abs(two[0]["trace estimate"] - one["trace estimate"]) < 1e-10 * one["trace estimate"]
assert np.array_equal(two[0]["CG direction"], two[1]["CG direction"])  # the same bits

# %%
# What one product sends: one all-reduce of the ``(P, K)`` block plus one number (a
# flag that a rank failed), whatever the number of batches or parameter arrays.

P = sum(p.size for p in params)
V = rng.normal(size=(P, 8))


def product_traffic(comm):
    G = cl.GGNLinearOperator(model, loss, params, batches[comm.rank :: 2], comm=comm)
    calls, sent = comm.allreduce_calls, comm.allreduce_bytes
    G @ V
    return comm.allreduce_calls - calls, comm.allreduce_bytes - sent


calls, sent = run_ranks(2, product_traffic)[0]
print(f"P = {P}, K = 8: {calls} all-reduce of {sent} bytes = ({P} * 8 + 1) * 8")
assert (calls, sent) == (1, (P * 8 + 1) * 8)

# %%
# A failing rank
# --------------
#
# If one rank's batch is bad (here a label outside the classes, on rank 1 only), that
# rank raises its own error and every other rank raises
# :class:`~curvlinops.RemoteRankError` naming it, instead of waiting in an all-reduce
# that rank 1 never joins.


def with_a_bad_label(comm):
    shard = batches[comm.rank :: 2]
    if comm.rank == 1:
        shard = [(shard[0][0], np.full_like(shard[0][1], 7))] + shard[1:]
    return cl.GGNLinearOperator(model, loss, params, shard, comm=comm)


errors = run_ranks(2, with_a_bad_label)
for rank, err in enumerate(errors):
    print(f"rank {rank}: {type(err).__name__}: {str(err)[:110]}...")
assert isinstance(errors[0], cl.RemoteRankError) and isinstance(errors[1], ValueError)

# %%
# The spectral density of the GGN, from one process and from two ranks: the same curve.

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(*one["density"], lw=3, alpha=0.5, label="one process")
ax.plot(*two[1]["density"], "k--", lw=1, label="two ranks (rank 1)")
ax.set_xlabel("eigenvalue")
ax.set_ylabel("density")
ax.set_title("GGN spectral density (stochastic Lanczos quadrature)")
ax.legend()
fig.tight_layout()
