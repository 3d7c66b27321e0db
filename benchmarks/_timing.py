"""Timing and memory helpers shared by the benchmarks.

``time_call`` runs a function a few times after a warm-up and reports the median and
minimum wall time; ``time_ratio`` measures the ratio of two functions' times in
interleaved rounds (how the benchmarks check their targets); ``peak_numpy_bytes``
reports the peak of the memory traced by :mod:`tracemalloc` during one call, which
covers NumPy's array buffers (NumPy reports its allocations to tracemalloc) but not the
memory of PyTorch, JAX or CuPy.

Benchmarks report ratios of times measured in one run, never absolute seconds to be
compared across machines. May import: the standard library only.
"""

from __future__ import annotations

import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls, in seconds."""

    median: float
    min: float
    repeats: int


def block_until_ready(result):
    """Wait for asynchronous backends (JAX, CUDA) to finish computing ``result``."""
    if hasattr(result, "block_until_ready"):
        result.block_until_ready()
    elif type(result).__module__.startswith("torch") and getattr(result, "is_cuda", False):
        import torch

        torch.cuda.synchronize()
    elif type(result).__module__.startswith("cupy"):
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    return result


def time_call(
    fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2, min_time: float = 0.0
) -> Timing:
    """Median and minimum wall time of ``fn()`` over ``repeats`` timed calls.

    Parameters
    ----------
    fn
        The work to time; its result is waited for (see :func:`block_until_ready`).
    repeats
        Number of timed calls.
    warmup
        Untimed calls first (compilation, caches, lazy imports).
    min_time
        Keep repeating past ``repeats`` until the timed calls add up to at least this
        many seconds (for calls too short for a single measurement to mean much).
    """
    for _ in range(warmup):
        block_until_ready(fn())
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(times) < repeats or sum(times) < min_time:
            start = time.perf_counter()
            block_until_ready(fn())
            times.append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(median=statistics.median(times), min=min(times), repeats=len(times))


def time_ratio(
    fn: Callable[[], object],
    baseline: Callable[[], object],
    *,
    rounds: int = 7,
    block: int = 3,
    warmup: int = 1,
) -> float:
    """Time of ``fn()`` over time of ``baseline()``, robust to a drifting machine.

    Each of ``rounds`` rounds times ``block`` calls of ``baseline`` and then ``block``
    calls of ``fn``, back to back, and takes the ratio of the two medians; the result is
    the median of the rounds' ratios. A machine whose speed drifts during a run (other
    tenants of a virtual machine, frequency scaling) slows both sides of a round alike,
    where one baseline measured at the start and numerators measured later would not.
    Blocks rather than single alternating calls keep each side's working set warm in
    the CPU caches, as in back-to-back use.
    """
    for _ in range(warmup):
        block_until_ready(baseline())
        block_until_ready(fn())
    ratios = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            medians = []
            for f in (baseline, fn):
                times = []
                for _ in range(block):
                    start = time.perf_counter()
                    block_until_ready(f())
                    times.append(time.perf_counter() - start)
                medians.append(statistics.median(times))
            ratios.append(medians[1] / medians[0])
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(ratios)


def peak_numpy_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes traced by :mod:`tracemalloc` during one call of ``fn()``.

    Measured from the memory already allocated before the call, so it is what the call
    itself needs on top (its result included). Only NumPy (and Python) allocations are
    seen.
    """
    gc.collect()
    already_tracing = tracemalloc.is_tracing()
    if not already_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline, _ = tracemalloc.get_traced_memory()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
        del result
    finally:
        if not already_tracing:
            tracemalloc.stop()
    return max(peak - baseline, 0)


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns
