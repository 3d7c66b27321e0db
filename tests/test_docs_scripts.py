"""The docs' approximation-quality table is produced by a script that keeps running."""

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "scripts" / "approximation_quality.py"


def test_approximation_quality_script_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("approximation_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    columns, rows = module.table(quick=True)
    assert len(columns) == len(module.RELATIVE_DAMPINGS)
    np.testing.assert_allclose(rows["exact Fisher / GGN"], 1.0, atol=1e-10)
    # K-FAC's eigenvalue-refitted variant is a different direction from plain K-FAC
    assert rows["EKFAC"] != rows["K-FAC (type-2), exact damping"]
    # with growing damping every direction approaches the gradient direction
    gd = rows["gradient descent (identity)"]
    assert gd[-1] > gd[0]
    module.main(["--quick", "--out", str(tmp_path / "table.rst")])
    assert "EKFAC" in (tmp_path / "table.rst").read_text()
