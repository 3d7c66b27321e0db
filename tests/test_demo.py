"""The demo runs end to end on a small configuration and reports sensible values."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")


def test_demo_runs_and_trains():
    from curvlinops.demo import run_demo

    lines = []
    rows = run_demo(num_data=200, width=8, batch_size=64, steps=3, progress=False, out=lines.append)
    # Cross-entropy of an untrained 10-class model is about log(10); LM steps reduce it.
    assert rows["loss after training"] < 0.8 * np.log(10)
    assert rows["F = G check: max |FV - GV| / max |GV|"] < 1e-10
    assert rows["natural-gradient CG relative residual"] < 1e-5
    assert rows["top GGN eigenvalues"].shape == (3,)
    assert any("GGN trace (exact)" in line for line in lines)


def test_demo_command_line_help():
    out = subprocess.run(
        [sys.executable, "-m", "curvlinops", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--backend" in out.stdout and "--num-data" in out.stdout
