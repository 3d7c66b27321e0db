"""A communicator of threads in one process: the collectives of ``size`` ranks, each a
thread, for fast in-process tests of the distributed code paths on every backend.

Each collective puts this rank's contribution in a slot, waits for all ranks at a
barrier, and reads the others' (sums in rank order, so that every rank gets the same
bits). Only the tests import it.
"""

from __future__ import annotations

import threading

import numpy as np

from curvlinops import Communicator, array_namespace, to_numpy
from curvlinops._backend import device, from_host


class ThreadGroup:
    """The shared state of ``size`` thread ranks."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size


class ThreadCommunicator(Communicator):
    """Rank ``rank`` of a :class:`ThreadGroup`."""

    def __init__(self, group, rank):
        super().__init__()
        self.group, self.rank, self.size = group, rank, group.size

    def _exchange(self, value):
        group = self.group
        group.barrier.wait()
        group.slots[self.rank] = value
        group.barrier.wait()
        values = list(group.slots)
        group.barrier.wait()
        return values

    def _allreduce_sum(self, x):
        values = self._exchange(np.array(to_numpy(x), copy=True))
        total = values[0]
        for v in values[1:]:
            total = total + v
        return from_host(total, array_namespace(x), x.dtype, device(x))

    def allgather_object(self, obj):
        return self._exchange(obj)


def run_ranks(size, work):
    """``[work(comm) for each rank]``, each rank in its own thread (exceptions re-raised)."""
    group = ThreadGroup(size)
    results, errors = [None] * size, [None] * size

    def target(rank):
        try:
            results[rank] = work(ThreadCommunicator(group, rank))
        except BaseException as err:  # noqa: B036 (re-raised in the main thread)
            errors[rank] = err
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the rank that failed first broke the barrier for the others: its error first
    for err in sorted(
        (e for e in errors if e is not None),
        key=lambda e: isinstance(e, threading.BrokenBarrierError),
    ):
        raise err
    return results
