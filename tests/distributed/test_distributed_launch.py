"""Distributed runs in CI: ``mpirun -n 2`` and two torch.distributed (gloo) processes.

Each launch starts two processes of ``distributed_worker.py``, which build every curvature operator
on their shards of one data set (split unevenly, and with a rank that holds no batch)
and compare products, K-FAC factors, diagonals, solver and optimizer results with the
single-process ones computed in the same process on the whole data (float64, relative
error at most 1e-12), check that a failure on one rank raises on every rank, and write
a report per rank. This test reads the reports: every check within tolerance, the same
checks on both ranks, the same bits on both ranks. One launch per engine checks
everything (a launch costs seconds: the interpreter, imports, MPI or gloo setup).

Skipped, with the reason, where mpi4py / ``mpirun`` or torch are missing (the README's
bare environment).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
ROOT = HERE.parents[1]
TOLERANCE = 1e-12
#: the least number of checks per backend a report must hold (guards a vacuous pass)
MINIMUM_CHECKS = {"numpy": 90, "array_api_strict": 40, "torch": 40, "torch.nn.Module": 3}
TIMEOUT = 300  # seconds; a hang (a rank waiting forever) fails instead of blocking CI


def _environment(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    env.update(extra)
    return env


def _mpirun():
    beside = Path(sys.executable).parent / "mpirun"  # mpich from pip installs it there
    return str(beside) if beside.exists() else shutil.which("mpirun")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_reports(out, output):
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["size"] for r in reports] == [2, 2]
    failures = []
    for backend, minimum in MINIMUM_CHECKS.items():
        if backend not in reports[0]["backends"]:
            continue
        first, second = (r["backends"][backend] for r in reports)
        assert first["errors"].keys() == second["errors"].keys(), backend
        assert len(first["errors"]) >= minimum, (backend, len(first["errors"]))
        for rank, run in enumerate((first, second)):
            failures += [
                f"{backend} rank {rank}: {name}: relative error {error:.3g}"
                for name, error in run["errors"].items()
                if not error <= TOLERANCE
            ]
        failures += [
            f"{backend}: {name}: ranks hold different results"
            for name, digest in first["digests"].items()
            if second["digests"][name] != digest
        ]
    assert not failures, "\n".join(failures) + "\n" + output[-3000:]
    return reports


def _finish(processes, out):
    output = []
    try:
        for p in processes:
            stdout, _ = p.communicate(timeout=TIMEOUT)
            output.append(stdout)
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        pytest.fail(f"a distributed run did not finish within {TIMEOUT} s (a rank hangs)")
    text = "\n".join(output)
    assert all(p.returncode == 0 for p in processes), text[-5000:]
    return _check_reports(out, text)


def test_mpirun_two_ranks_match_one_process(tmp_path):
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install curvlinops[mpi])")
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("no mpirun on PATH (pip install mpich, or an MPI of the system)")
    command = [mpirun, "-n", "2", sys.executable, str(WORKER), "mpi", str(tmp_path)]
    process = subprocess.Popen(
        command, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    reports = _finish([process], tmp_path)
    assert set(reports[0]["backends"]) == {"numpy", "array_api_strict"}


def test_torch_distributed_gloo_two_ranks_match_one_process(tmp_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (pip install curvlinops[torch])")
    port = str(_free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "torch", str(tmp_path)],
            env=_environment(
                RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    reports = _finish(processes, tmp_path)
    assert set(reports[0]["backends"]) == {"numpy", "torch", "torch.nn.Module"}
