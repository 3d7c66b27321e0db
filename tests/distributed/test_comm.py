"""Communicators and the reduction helpers, on every backend, in one process.

Ranks are threads (:mod:`thread_ranks`); the expected sums are computed in NumPy from
the ranks' contributions. The adapters of mpi4py and torch.distributed run as worlds of
one process here (their buffer conversions on every library); their collectives over two
processes are tested by the launches of ``test_distributed_launch.py``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from thread_ranks import run_ranks

import curvlinops as cl
from curvlinops._backend import (
    Static,
    broadcast_tree,
    collective_sum,
    collective_tree_sum,
    gather_outcomes,
)


def _outcome(fn):
    """``("ok", result)``, ``("own", exception)`` or ``("remote", RemoteRankError)``."""
    try:
        return "ok", fn()
    except cl.RemoteRankError as err:
        return "remote", err
    except ValueError as err:
        return "own", err


def test_as_communicator():
    assert isinstance(cl.as_communicator(None), cl.SingleProcess)
    comm = cl.SingleProcess()
    assert cl.as_communicator(comm) is comm
    assert not comm.distributed and (comm.rank, comm.size) == (0, 1)
    with pytest.raises(TypeError, match="mpi4py communicator .* got a list"):
        cl.as_communicator([0, 1])


def test_single_process_runs_the_local_work_without_collectives(backend):
    comm = cl.SingleProcess()
    x = backend.asarray(np.arange(3.0))
    parts = collective_sum(
        comm,
        lambda: [x, None],
        [(3,), (2,)],
        xp=backend.xp,
        dtype=x.dtype,
        device=backend.device,
        what="a sum",
    )
    assert parts[0] is x  # the local result itself
    np.testing.assert_array_equal(backend.to_numpy(parts[1]), np.zeros(2))
    assert comm.allreduce_calls == 0


def test_collective_sum_is_one_allreduce_of_every_array(backend):
    rng = np.random.default_rng(0)
    contributions = [[rng.normal(size=(2, 3)), rng.normal(size=(1,))] for _ in range(3)]
    contributions[1][0] = None  # a rank with no contribution to the first array
    xp, dtype = backend.xp, backend.dtype("float64")

    def work(comm):
        mine = [None if a is None else backend.asarray(a) for a in contributions[comm.rank]]
        out = collective_sum(
            comm, lambda: mine, [(2, 3), (1,)], xp=xp, dtype=dtype, device=backend.device, what="s"
        )
        return out, comm.allreduce_calls, comm.allreduce_bytes

    expected = [sum(c[i] for c in contributions if c[i] is not None) for i in range(2)]
    for out, calls, sent in run_ranks(3, work):
        assert (calls, sent) == (1, (6 + 1 + 1) * 8)  # the arrays and the error flag
        for got, want in zip(out, expected, strict=True):
            assert cl.array_namespace(got) is cl.array_namespace(backend.asarray(want))
            np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-15)


def test_tree_sum_adds_ints_exactly_in_float32_and_shares_the_layout(numpy_backend):
    xp = numpy_backend.xp
    big = 2**30  # far beyond float32's 2**24 integers

    def work(comm):
        if comm.rank == 2:  # no data: it learns the layout and adds zeros
            tree = None
        else:
            tree = {
                "count": big + 3 + comm.rank,
                "mass": 0.5,
                "sums": [xp.full((2,), 1.0 + comm.rank, dtype=xp.float32), None],
                "layout": Static(("layer", 4)),
            }
        return collective_tree_sum(
            comm, lambda: tree, xp=xp, dtype=xp.float32, device="cpu", what="statistics"
        )

    for result in run_ranks(3, work):
        assert result["count"] == 2 * big + 7
        assert result["mass"] == 1.0
        assert result["layout"] == ("layer", 4) and result["sums"][1] is None
        np.testing.assert_array_equal(result["sums"][0], [3.0, 3.0])


def test_tree_sum_refuses_ranks_that_disagree(numpy_backend):
    xp = numpy_backend.xp

    def work(comm):
        tree = [xp.zeros((2 + comm.rank,))]
        return _outcome(
            lambda: collective_tree_sum(
                comm, lambda: tree, xp=xp, dtype=xp.float64, device="cpu", what="K-FAC"
            )
        )

    for kind, err in run_ranks(2, work):
        assert kind == "own" and "ranks with data disagree" in str(err)


def test_tree_sum_without_data_anywhere_is_none(numpy_backend):
    xp = numpy_backend.xp
    results = run_ranks(
        2,
        lambda comm: collective_tree_sum(
            comm, lambda: None, xp=xp, dtype=xp.float64, device="cpu", what="s"
        ),
    )
    assert results == [None, None]


def test_broadcast_tree_gives_every_rank_the_roots_bits(backend):
    rng = np.random.default_rng(1)
    values = [rng.normal(size=(3, 3)) for _ in range(3)]
    xp, dtype = backend.xp, backend.dtype("float64")

    def work(comm):
        mine = backend.asarray(values[comm.rank])
        return broadcast_tree(
            comm, 1, lambda: [mine, 7], xp=xp, dtype=dtype, device=backend.device, what="basis"
        )

    for got, count in run_ranks(3, work):
        assert count == 7
        np.testing.assert_array_equal(backend.to_numpy(got), values[1])


@pytest.mark.parametrize("helper", ["collective_sum", "collective_tree_sum", "gather_outcomes"])
def test_a_failure_raises_on_every_rank(numpy_backend, helper):
    xp = numpy_backend.xp

    def work(comm):
        def compute():
            if comm.rank != 1:
                raise ValueError(f"bad batch on rank {comm.rank}")
            return [xp.ones(2)]

        calls = {
            "collective_sum": lambda: collective_sum(
                comm, compute, [(2,)], xp=xp, dtype=xp.float64, device="cpu", what="a product"
            ),
            "collective_tree_sum": lambda: collective_tree_sum(
                comm, compute, xp=xp, dtype=xp.float64, device="cpu", what="a product"
            ),
            "gather_outcomes": lambda: gather_outcomes(comm, lambda: compute()[0].shape, "a count"),
        }
        first = _outcome(calls[helper])
        # still in step afterwards: a collective that succeeds everywhere
        after = collective_sum(
            comm, lambda: [xp.ones(1)], [(1,)], xp=xp, dtype=xp.float64, device="cpu", what="x"
        )
        return first, float(after[0][0])

    (r0, a0), (r1, a1), (r2, a2) = run_ranks(3, work)
    assert r0[0] == "own" and str(r0[1]) == "bad batch on rank 0"
    assert r2[0] == "own" and str(r2[1]) == "bad batch on rank 2"
    assert r1[0] == "remote"
    assert r1[1].failures == [
        (0, "ValueError", "bad batch on rank 0"),
        (2, "ValueError", "bad batch on rank 2"),
    ]
    assert "failed on ranks 0, 2 of 3" in str(r1[1]) and "rank 1 raises too" in str(r1[1])
    assert a0 == a1 == a2 == 3.0


def test_collective_sum_names_a_local_sum_of_the_wrong_shape(numpy_backend):
    xp = numpy_backend.xp

    def work(comm):
        shape = (3,) if comm.rank == 0 else (2,)
        return _outcome(
            lambda: collective_sum(
                comm,
                lambda: [xp.ones(shape)],
                [(2,)],
                xp=xp,
                dtype=xp.float64,
                device="cpu",
                what="GGN product",
            )
        )

    (k0, e0), (k1, e1) = run_ranks(2, work)
    assert k0 == "own" and "GGN product: a local sum has shape (3,), not (2,)" in str(e0)
    assert k1 == "remote" and e1.failures[0][0] == 0


# -- the adapters, as worlds of one process ----------------------------------------------


def _same_array(got, x, backend):
    assert cl.array_namespace(got) is cl.array_namespace(x)
    assert got.dtype == x.dtype
    if backend.name in ("torch", "array_api_strict", "cupy"):
        assert got.device == x.device
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(x))


def test_mpi_communicator_takes_every_library(backend):
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install curvlinops[mpi])")
    if backend.name == "cupy":
        pytest.skip("device buffers need a CUDA-aware MPI (device_buffers=True)")
    from mpi4py import MPI

    comm = cl.as_communicator(MPI.COMM_WORLD)
    assert isinstance(comm, cl.MPICommunicator) and comm.size == 1
    for dtype in ("float32", "float64"):
        x = backend.asarray(np.arange(6.0).reshape(2, 3), dtype=dtype)
        _same_array(comm.allreduce_sum(backend.xp.asarray(x, copy=True)), x, backend)
    assert comm.allgather_object({"n": 1}) == [{"n": 1}]
    with pytest.raises(TypeError, match="device_buffers must be True, False or None"):
        cl.MPICommunicator(MPI.COMM_WORLD, device_buffers="yes")


@pytest.fixture(scope="module")
def torch_world():
    """A torch.distributed world of one process (gloo, an in-memory store)."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a torch.distributed group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


def test_torch_communicator_takes_every_library(backend, torch_world):
    comm = cl.as_communicator(torch_world)  # the module itself: its default group
    assert isinstance(comm, cl.TorchCommunicator) and comm.backend == "gloo"
    assert isinstance(cl.as_communicator(torch_world.group.WORLD), cl.TorchCommunicator)
    for dtype in ("float32", "float64"):
        x = backend.asarray(np.arange(6.0).reshape(2, 3), dtype=dtype)
        _same_array(comm.allreduce_sum(backend.xp.asarray(x, copy=True)), x, backend)
    assert comm.allgather_object(("shape", (2, 3))) == [("shape", (2, 3))]


def test_torch_communicator_needs_an_initialized_group():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a torch.distributed group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        cl.TorchCommunicator()
