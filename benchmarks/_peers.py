"""Run peer libraries in virtual environments of their own and exchange data by files.

curvlinops-for-pytorch installs a package that is also named ``curvlinops``, so it
cannot live beside this library. :func:`run_peer` creates (once) a virtual environment
under ``benchmarks/.peers/<name>`` with the peer and ``torch==2.13.0`` (the CPU build
found locally, pinned by ``.ci/constraints.txt`` so no CUDA build is downloaded), then
runs a peer script there on an ``.npz`` file of weights and vectors and reads back the
``.npz`` of results it writes. :class:`PeerSession` keeps the peer's process running
after that, to time its operations on request: a benchmark can then alternate rounds of
its own calls with rounds of the peer's, so that a drift of the machine's speed slows
both sides alike (as ``_timing.time_ratio`` does within one process).

May import: the standard library and NumPy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONSTRAINTS = HERE.parent / ".ci" / "constraints.txt"
PEERS = {
    "curvlinops-for-pytorch": {
        "requirements": ["torch==2.13.0", "curvlinops-for-pytorch==3.0.1"],
        "script": HERE / "peers" / "curvlinops_for_pytorch.py",
    },
    # laplace-torch 0.3 requires torchvision, whose wheel here is a CUDA build that
    # breaks torch's CPU operators on import (``operator torchvision::nms does not
    # exist``); laplace itself never imports it. So laplace-torch and asdfghjkl (which
    # provides the ``asdl`` module laplace imports) are installed without their
    # requirements, the others with theirs, and the torchvision that backpack-for-pytorch
    # pulls in is uninstalled again.
    "laplace-torch": {
        "requirements": [
            "torch==2.13.0",
            "curvlinops-for-pytorch==3.0.1",
            "numpy",
            "scipy>=1.12",
            "tqdm>=4.66",
            "opt-einsum",
            "torchmetrics",
        ],
        "no_deps": ["laplace-torch==0.3", "asdfghjkl==0.1a4"],
        "uninstall": ["torchvision"],
        "check": "from laplace import Laplace",
        "script": HERE / "peers" / "laplace_torch.py",
    },
}


def _peer_environment() -> dict:
    """This process's environment without ``PYTHONPATH``: a checkout of curvlinops on the
    path would shadow the peer's own package of that name."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


class PeerUnavailable(RuntimeError):
    """The peer's environment could not be created or its script failed."""


def peer_python(name: str) -> Path:
    """Python of the peer's virtual environment, created on first use."""
    spec = PEERS[name]
    venv = HERE / ".peers" / name
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if marker.exists():
        return python
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True
        )
        pip = [str(python), "-m", "pip", "install", "-q"]
        if CONSTRAINTS.exists():
            pip += ["-c", str(CONSTRAINTS)]
        subprocess.run(
            pip + spec["requirements"], check=True, capture_output=True, text=True, timeout=1800
        )
        if spec.get("no_deps"):
            subprocess.run(
                pip + ["--no-deps", *spec["no_deps"]],
                check=True,
                capture_output=True,
                text=True,
                timeout=1800,
            )
        if spec.get("uninstall"):
            subprocess.run(
                [str(python), "-m", "pip", "uninstall", "-y", "-q", *spec["uninstall"]],
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
            )
        if spec.get("check"):  # the peer imports in its own environment
            subprocess.run(
                [str(python), "-c", spec["check"]],
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
                env=_peer_environment(),
            )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        detail = getattr(err, "stderr", "") or ""
        raise PeerUnavailable(f"could not install {name}: {detail[-500:]}") from err
    marker.write_text("ok\n")
    return python


def run_peer(name: str, inputs: dict, timeout: float = 1800) -> dict:
    """Run the peer script on ``inputs`` (arrays and scalars); return its results."""
    python = peer_python(name)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "inputs.npz", Path(tmp) / "results.npz"
        np.savez(src, **inputs)
        proc = subprocess.run(
            [str(python), str(PEERS[name]["script"]), str(src), str(dst)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp,
            env=_peer_environment(),
        )
        if proc.returncode != 0:
            raise PeerUnavailable(f"{name} failed: {proc.stderr[-1500:]}")
        with np.load(dst) as results:
            return {key: results[key] for key in results.files}


class PeerSession:
    """The peer script on ``inputs``, kept running to time its operations on request.

    Use as a context manager: entering runs ``script inputs.npz results.npz --serve``,
    waits until the script has written its results (:attr:`results`) and says
    ``ready``; :meth:`time` then asks it to run one of its named operations a number of
    times and returns the wall times it measured. Between requests the peer's process
    waits on its input and takes no CPU time. Raises :class:`PeerUnavailable` when the
    environment cannot be created or the script fails.
    """

    def __init__(self, name: str, inputs: dict):
        self.name, self.inputs = name, inputs
        self.results: dict = {}
        self._tmp = self._proc = self._stderr = None

    def __enter__(self) -> PeerSession:
        python = peer_python(self.name)
        self._tmp = tempfile.TemporaryDirectory()
        tmp = Path(self._tmp.name)
        src, dst = tmp / "inputs.npz", tmp / "results.npz"
        np.savez(src, **self.inputs)
        self._stderr = open(tmp / "stderr.txt", "w+")  # noqa: SIM115 - closed in __exit__
        self._proc = subprocess.Popen(
            [str(python), str(PEERS[self.name]["script"]), str(src), str(dst), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=tmp,
            env=_peer_environment(),
        )
        try:
            if self._proc.stdout.readline().strip() != "ready":
                raise self._failure()
            with np.load(dst) as results:
                self.results = {key: results[key] for key in results.files}
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def time(self, operation: str, count: int) -> list[float]:
        """Wall times (seconds) of ``count`` back-to-back calls of the peer's ``operation``."""
        try:
            self._proc.stdin.write(f"{operation} {count}\n")
            self._proc.stdin.flush()
        except OSError:
            raise self._failure() from None
        line = self._proc.stdout.readline()
        if not line:
            raise self._failure()
        return json.loads(line)

    def _failure(self) -> PeerUnavailable:
        self._proc.wait(timeout=60)
        self._stderr.seek(0)
        return PeerUnavailable(f"{self.name} failed: {self._stderr.read()[-1500:]}")

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.stdin.write("quit\n")
                self._proc.stdin.close()
                self._proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        if self._stderr is not None:
            self._stderr.close()
        if self._tmp is not None:
            self._tmp.cleanup()
