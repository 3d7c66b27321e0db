"""Run peer libraries in virtual environments of their own and exchange data by files.

curvlinops-for-pytorch installs a package that is also named ``curvlinops``, so it
cannot live beside this library. :func:`run_peer` creates (once) a virtual environment
under ``benchmarks/.peers/<name>`` with the peer and ``torch==2.13.0`` (the CPU build
found locally, pinned by ``.ci/constraints.txt`` so no CUDA build is downloaded), then
runs a peer script there on an ``.npz`` file of weights and vectors and reads back the
``.npz`` of results it writes.

May import: the standard library and NumPy.
"""

from __future__ import annotations

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
    }
}


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
        )
        if proc.returncode != 0:
            raise PeerUnavailable(f"{name} failed: {proc.stderr[-1500:]}")
        with np.load(dst) as results:
            return {key: results[key] for key in results.files}
