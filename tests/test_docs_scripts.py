"""The docs' approximation-quality table is produced by a script that keeps running."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

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


RELIABILITY = SCRIPT.parent / "reliability.py"


def _reliability():
    spec = importlib.util.spec_from_file_location("reliability", RELIABILITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reliability_relative_error_against_a_hand_computed_case():
    module = _reliability()
    exact = np.array([[3.0, 1.0], [4.0, 0.0]])  # column norms 5 and 1
    approx = exact + np.array([[0.0, 0.0], [0.05, 0.5]])
    assert module.relative_error(approx, exact) == pytest.approx(0.5, rel=1e-12)
    assert module.relative_error(approx[:, 0], exact[:, 0]) == pytest.approx(0.01, rel=1e-12)
    assert module.relative_error(np.float32(2.5), 2.0) == 0.25


def test_reliability_table_measures_float32_against_float64(tmp_path):
    module = _reliability()
    rows = module.table(quick=True)
    assert [(op, what) for op, what, _ in rows] == [(op, what) for op, what, _ in module.ROWS]
    eps = float(np.finfo(np.float32).eps)
    for operator, what, error in rows:
        if "1e-06" in what:  # ill-conditioned: float32 may refuse or lose digits
            continue
        assert isinstance(error, float), (operator, what, error)
        # well-conditioned results keep float32's accuracy up to the conditioning of
        # the inverses (< 1e3 here) and the Nystrom sketch
        assert error < 1e4 * eps, (operator, what, error)
        if what == "product":
            # the rounding of the inputs alone is a few 1e-8: an error far below would
            # mean the "float32" operator computed in float64
            assert error > 0.05 * eps, (operator, what, error)
    module.main(["--quick", "--out", str(tmp_path / "table.inc")])
    assert "K-FAC type-2" in (tmp_path / "table.inc").read_text()


def test_reliability_error_messages_are_the_library_s_own(tmp_path):
    module = _reliability()
    messages = module.error_messages()
    # every error class the page documents appears with its message
    names = {name for name, _ in messages.values()}
    for name in (
        "FactorizationError",
        "IllConditionedError",
        "MissingTierError",
        "MissingLayerRuleError",
        "NonDeterministicDataError",
        "ConvergenceError",
        "ConvergenceWarning",
        "AssumptionWarning",
        "VerificationError",
        "TypeError",
        "ValueError",
    ):
        assert name in names, name
    assert messages["label"][1].startswith("Batch 1: CrossEntropyLoss expects class indices")
    assert "data points [1] of the batch" in messages["nonfinite"][1]
    module.write_error_messages(tmp_path)
    page = (RELIABILITY.parents[1] / "reliability.rst").read_text()
    for key in messages:
        assert f"_generated/errors/{key}.inc" in page, key
        assert (tmp_path / f"{key}.inc").read_text().startswith(".. code-block:: text")
