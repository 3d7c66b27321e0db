"""Communicators: the sum over processes of a data-parallel computation.

A curvature product, a gradient or a K-FAC factor is a sum over data. With the data
split over processes, each process sums over its own shard and one all-reduce adds the
shards' sums. This module wraps the engines users already run, behind one small
interface (:class:`Communicator`: ``rank``, ``size``, :meth:`~Communicator.allreduce_sum`
of one array, :meth:`~Communicator.allgather_object` of small host objects):

- :class:`SingleProcess`: one process, no communication (the default, ``comm=None``);
- :class:`MPICommunicator`: an ``mpi4py`` communicator (NumPy and CPU tensors as host
  buffers without a copy; CuPy arrays and CUDA tensors as device buffers when the MPI
  build is CUDA-aware, or staged through host memory when asked to);
- :class:`TorchCommunicator`: a ``torch.distributed`` process group (gloo on the CPU,
  NCCL on the GPU; tensors without a copy, CuPy arrays through DLPack);

and :func:`as_communicator` turns what a user passes as ``comm=`` into one of them.
:class:`RemoteRankError` is what every other rank raises when one rank fails.

The packing of many arrays into the one buffer of an all-reduce, and the collective
error check, live next door in :mod:`.reduction`.

May import: ``numpy``, ``.namespace``, ``.state``; ``mpi4py`` and ``torch`` lazily, inside
the adapters (they are never needed for one process).
"""

from __future__ import annotations

import numpy as np

from .namespace import (
    array_namespace,
    device as array_device,
    is_cupy_namespace,
    is_numpy_namespace,
    is_torch_namespace,
    namespace_name,
    to_numpy,
)
from .state import from_host

__all__ = [
    "Communicator",
    "MPICommunicator",
    "RemoteRankError",
    "SingleProcess",
    "TorchCommunicator",
    "as_communicator",
]


class RemoteRankError(RuntimeError):
    """Another process failed during a collective computation; this one raises too.

    Every rank of a distributed operator runs the same collectives in the same order. If
    one rank's local work raises (a bad batch, a failing data loader), that rank takes
    part in the next collective with an error flag instead of its data, and re-raises
    its own exception afterwards; every other rank raises this error, naming the ranks
    that failed and their messages, instead of waiting forever.

    Attributes
    ----------
    failures : list of tuple
        ``(rank, exception type name, message)`` of each failed rank.
    what : str
        The computation that failed (``"GGNLinearOperator product"``).

    Examples
    --------
    >>> err = RemoteRankError([(1, "ValueError", "Batch 0: bad labels")], "a product", 0, 2)
    >>> print(err)
    a product failed on rank 1 of 2 (ValueError: Batch 0: bad labels); rank 0 raises too, \
instead of waiting for the failed rank in the next collective.
    """

    def __init__(self, failures, what, rank, size):
        self.failures = [(int(r), str(t), str(m)) for r, t, m in failures]
        self.what = str(what)
        ranks = ", ".join(str(r) for r, _, _ in self.failures)
        causes = "; ".join(
            f"rank {r}: {t}: {m}" if len(failures) > 1 else f"{t}: {m}" for r, t, m in self.failures
        )
        plural = "s" if len(self.failures) > 1 else ""
        super().__init__(
            f"{self.what} failed on rank{plural} {ranks} of {size} ({causes}); rank {rank} "
            "raises too, instead of waiting for the failed rank in the next collective."
        )


class Communicator:
    """The collectives a distributed curvature operator needs, over some engine.

    Subclasses implement :meth:`_allreduce_sum` and :meth:`allgather_object` and set
    ``rank`` and ``size``. The counters record every all-reduce (what the benchmark
    reports and the tests check: one per product).

    Attributes
    ----------
    rank, size : int
        This process's rank and the number of processes.
    allreduce_calls : int
        All-reduces run so far.
    allreduce_bytes : int
        Bytes of the buffers all-reduced so far (the buffer's size on this rank, which
        is what it sends to a ring or tree all-reduce about twice over).

    Examples
    --------
    >>> import numpy as np
    >>> comm = SingleProcess()
    >>> comm.allreduce_sum(np.ones(3)).tolist(), comm.rank, comm.size
    ([1.0, 1.0, 1.0], 0, 1)
    >>> comm.allreduce_calls, comm.allreduce_bytes
    (1, 24)
    """

    rank = 0
    size = 1

    def __init__(self):
        self.allreduce_calls = 0
        self.allreduce_bytes = 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.size > 1

    def allreduce_sum(self, x):
        """The elementwise sum of ``x`` over all processes, on every process.

        Parameters
        ----------
        x : array
            The same shape and dtype on every process; the buffer may be overwritten
            (pass one you own).

        Returns
        -------
        array
            Of ``x``'s library, dtype and device.
        """
        self.allreduce_calls += 1
        self.allreduce_bytes += _nbytes(x)
        return self._allreduce_sum(x)

    def _allreduce_sum(self, x):
        raise NotImplementedError

    def allgather_object(self, obj) -> list:
        """Every process's ``obj`` (a small picklable host object), in rank order.

        Used at construction (data counts, layouts) and when a rank failed (its message),
        never inside a product.
        """
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleProcess(Communicator):
    """One process: every collective returns its input (the default of ``comm=None``).

    Examples
    --------
    >>> SingleProcess().allgather_object({"count": 3})
    [{'count': 3}]
    """

    def _allreduce_sum(self, x):
        return x

    def allgather_object(self, obj) -> list:
        return [obj]


class MPICommunicator(Communicator):
    """An ``mpi4py`` communicator (``MPI.COMM_WORLD`` or a sub-communicator).

    Buffers: NumPy arrays and PyTorch CPU tensors are reduced in place, without a copy.
    CuPy arrays and CUDA tensors are device buffers: with ``device_buffers=True`` they go
    to MPI as they are (the MPI build must be CUDA-aware: Open MPI built with CUDA
    support, MPICH or MVAPICH with GPU support), with ``device_buffers=False`` they are
    staged through host memory (one device-to-host and one host-to-device copy of the
    buffer per all-reduce); without the option a device buffer raises, because mpi4py
    cannot tell whether the MPI library handles device memory. JAX arrays (immutable)
    and array-api-strict arrays are copied to a host buffer and back.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        An intra-communicator; every rank of it must build the same operators in the
        same order.
    device_buffers : bool, optional
        How to reduce GPU arrays (see above).

    Examples
    --------
    Under ``mpirun -n 2`` each rank holds its shard; run as one process, the world is
    one rank:

    >>> import numpy as np
    >>> import pytest
    >>> MPI = pytest.importorskip("mpi4py.MPI")
    >>> comm = MPICommunicator(MPI.COMM_WORLD)
    >>> comm.rank, comm.size
    (0, 1)
    >>> comm.allreduce_sum(np.arange(3.0)).tolist()
    [0.0, 1.0, 2.0]
    """

    def __init__(self, comm, *, device_buffers=None):
        super().__init__()
        self.comm = comm
        self.rank, self.size = int(comm.Get_rank()), int(comm.Get_size())
        if device_buffers is not None and not isinstance(device_buffers, bool):
            raise TypeError(f"device_buffers must be True, False or None, got {device_buffers!r}.")
        self.device_buffers = device_buffers

    def _allreduce_sum(self, x):
        from mpi4py import MPI

        xp = array_namespace(x)
        if is_numpy_namespace(xp):
            buffer = np.ascontiguousarray(x)
            self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
            return buffer
        if is_torch_namespace(xp) and x.device.type == "cpu":
            tensor = x.detach().contiguous()
            self.comm.Allreduce(MPI.IN_PLACE, tensor.numpy(), op=MPI.SUM)  # shares memory
            return tensor
        if is_cupy_namespace(xp) or is_torch_namespace(xp):
            return self._device_allreduce(x, xp)
        # JAX and array-api-strict: a host copy (JAX arrays cannot be written in place)
        host = np.array(to_numpy(x), copy=True)
        self.comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        return from_host(host, xp, x.dtype, array_device(x))

    def _device_allreduce(self, x, xp):
        from mpi4py import MPI

        if self.device_buffers is None:
            raise ValueError(
                f"MPICommunicator got a {namespace_name(xp)} array on a GPU, and cannot tell "
                "whether this MPI build is CUDA-aware. Pass "
                "MPICommunicator(comm, device_buffers=True) if it is (Open MPI built with "
                "CUDA, MPICH or MVAPICH with GPU support), or device_buffers=False to stage "
                "each all-reduce through host memory (two copies of the buffer per product)."
            )
        if self.device_buffers:
            x = _synchronized_contiguous(x, xp)
            self.comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)  # __cuda_array_interface__
            return x
        host = np.array(to_numpy(x), copy=True)
        self.comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        if is_torch_namespace(xp):
            import torch

            return torch.from_numpy(host).to(x.device)
        return xp.asarray(host)

    def allgather_object(self, obj) -> list:
        return list(self.comm.allgather(obj))


class TorchCommunicator(Communicator):
    """A ``torch.distributed`` process group (``torch.distributed.init_process_group``
    must have run).

    Buffers: PyTorch tensors are reduced in place. NumPy arrays become CPU tensors
    without a copy (gloo); CuPy arrays become CUDA tensors through DLPack without a copy
    (NCCL, or gloo's CUDA all-reduce). Under NCCL, which reduces only GPU tensors, a host
    buffer (NumPy, CPU tensors) is copied to the current GPU and back; JAX and
    array-api-strict arrays are copied to a host buffer and back.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The group (default: the default group of ``init_process_group``).

    Examples
    --------
    Under ``torchrun`` the environment sets the rank and world size; here a world of
    one process:

    >>> import pytest
    >>> torch = pytest.importorskip("torch")
    >>> import torch.distributed as dist
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> comm = TorchCommunicator()
    >>> comm.rank, comm.size, comm.backend
    (0, 1, 'gloo')
    >>> comm.allreduce_sum(torch.ones(2)).tolist()
    [1.0, 1.0]
    >>> dist.destroy_process_group()
    """

    def __init__(self, group=None):
        super().__init__()
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchCommunicator needs an initialized torch.distributed: call "
                "torch.distributed.init_process_group(...) first (torchrun sets the "
                "environment it reads)."
            )
        self.group = group
        self.rank = int(dist.get_rank(group))
        self.size = int(dist.get_world_size(group))
        self.backend = str(dist.get_backend(group))

    def _allreduce_sum(self, x):
        import torch
        import torch.distributed as dist

        xp = array_namespace(x)
        nccl = self.backend == "nccl"
        if is_torch_namespace(xp):
            tensor = x.detach().contiguous()
            home = tensor.device
            if nccl and home.type == "cpu":  # NCCL reduces GPU tensors only
                tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            return tensor.to(home)
        if is_cupy_namespace(xp):
            x = _synchronized_contiguous(x, xp)
            dist.all_reduce(torch.from_dlpack(x), op=dist.ReduceOp.SUM, group=self.group)
            torch.cuda.current_stream().synchronize()  # before CuPy reads the result
            return x
        host = np.ascontiguousarray(x) if is_numpy_namespace(xp) else np.array(to_numpy(x))
        tensor = torch.from_numpy(host)  # shares memory with host
        if nccl:
            tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        if nccl:
            host = tensor.cpu().numpy()
        return host if is_numpy_namespace(xp) else from_host(host, xp, x.dtype, array_device(x))

    def allgather_object(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def as_communicator(comm) -> Communicator:
    """The :class:`Communicator` for what a user passes as ``comm=``.

    Parameters
    ----------
    comm : None, Communicator, mpi4py.MPI.Comm, torch.distributed.ProcessGroup or the
        ``torch.distributed`` module
        None: one process. An mpi4py communicator: :class:`MPICommunicator`. A process
        group, or ``torch.distributed`` itself (its default group):
        :class:`TorchCommunicator`.

    Returns
    -------
    Communicator

    Raises
    ------
    TypeError
        For anything else.

    Examples
    --------
    >>> as_communicator(None)
    SingleProcess(rank=0, size=1)
    >>> as_communicator("world")
    Traceback (most recent call last):
    ...
    TypeError: comm must be None, a curvlinops Communicator, an mpi4py communicator \
(mpi4py.MPI.COMM_WORLD) or a torch.distributed process group, got a str. ...
    """
    if comm is None:
        return SingleProcess()
    if isinstance(comm, Communicator):
        return comm
    module = type(comm).__module__ or ""
    if module.startswith("mpi4py"):
        return MPICommunicator(comm)
    if getattr(comm, "__name__", None) == "torch.distributed":
        return TorchCommunicator()
    if module.startswith("torch"):
        return TorchCommunicator(comm)
    raise TypeError(
        "comm must be None, a curvlinops Communicator, an mpi4py communicator "
        "(mpi4py.MPI.COMM_WORLD) or a torch.distributed process group, got a "
        f"{type(comm).__name__}. Wrap other engines in a Communicator subclass "
        "(allreduce_sum and allgather_object)."
    )


def _nbytes(x) -> int:
    """Bytes of an array of any library (its size times the item size)."""
    xp = array_namespace(x)
    size = 1
    for n in x.shape:
        size *= int(n)
    info = xp.finfo if xp.isdtype(x.dtype, "real floating") else xp.iinfo
    return size * (info(x.dtype).bits // 8)


def _synchronized_contiguous(x, xp):
    """A contiguous device buffer whose pending work has finished (MPI and another
    library's stream read it next)."""
    if is_torch_namespace(xp):
        import torch

        x = x.detach().contiguous()
        torch.cuda.current_stream(x.device).synchronize()
        return x
    import cupy

    x = cupy.ascontiguousarray(x)
    cupy.cuda.get_current_stream().synchronize()
    return x
