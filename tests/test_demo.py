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
    assert "--backend" in out.stdout and "--num-data" in out.stdout and "--figure" in out.stdout
    # plain text, no reStructuredText markup from docstrings
    for markup in ("``", ":mod:", ":func:", ":class:"):
        assert markup not in out.stdout


def _tiny_demo(figure):
    """Run the demo on a tiny configuration; return the lines it printed."""
    from curvlinops.demo import run_demo

    lines = []
    run_demo(
        num_data=100,
        width=4,
        batch_size=50,
        steps=1,
        progress=False,
        out=lines.append,
        figure=str(figure),
    )
    return lines


def test_demo_writes_its_figure(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "demo.png"
    lines = _tiny_demo(path)
    assert f"figure: {path}" in lines
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a PNG file, not an empty one
    assert path.stat().st_size > 10_000


def test_demo_without_matplotlib_says_so(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = tmp_path / "demo.png"
    lines = _tiny_demo(path)
    assert not path.exists()
    assert any("matplotlib is not installed" in line for line in lines)
