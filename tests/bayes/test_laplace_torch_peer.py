"""Agreement with laplace-torch 0.3 on an MLP, where the two libraries' definitions match.

laplace-torch imports a package named ``curvlinops`` (curvlinops-for-pytorch), so it
runs in a virtual environment of its own (``benchmarks/.peers/laplace-torch``, see
``benchmarks/_peers.py``); ``benchmarks/_laplace_agreement.py`` runs the comparison and
says where the definitions match and where they differ. This test is skipped unless
that environment exists or ``CURVLINOPS_PEERS=1`` asks for it to be created.

Checked, for classification and regression, for all weights and for the last layer,
with the full, Kronecker-factored and diagonal GGN: the posterior precision, the log
marginal likelihood (per-layer and scalar priors), the GLM predictive's mean and
covariance and the probit probabilities agree to 1e-10 (relative); the tuned prior
precisions agree to 2 % (laplace-torch takes 100 Adam steps, ours is the fixed point),
and ours has at least the evidence of laplace-torch's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
INSTALLED = BENCHMARKS / ".peers" / "laplace-torch" / ".installed"

if not INSTALLED.exists() and os.environ.get("CURVLINOPS_PEERS") != "1":
    pytest.skip(
        "laplace-torch's environment benchmarks/.peers/laplace-torch does not exist; set "
        "CURVLINOPS_PEERS=1 to create it (it installs laplace-torch 0.3 from the package "
        "index) and run the comparison",
        allow_module_level=True,
    )

pytest.importorskip("scipy")


@pytest.fixture(scope="module")
def agreement():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _laplace_agreement
        from _peers import PeerUnavailable

        try:
            return {
                likelihood: _laplace_agreement.agreement(likelihood)
                for likelihood in ("classification", "regression")
            }
        except PeerUnavailable as err:
            pytest.fail(f"laplace-torch could not run: {err}")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_laplace_torch_agrees(agreement, likelihood):
    rows = agreement[likelihood]
    assert len(rows) == 6
    for row in rows:
        for name in ("precision", "log_marglik", "log_marglik_scalar", "f_mean", "f_var"):
            assert row[name] < 1e-10, (row["case"], name, row[name])
        if likelihood == "classification":
            assert row["probit"] < 1e-10, (row["case"], row["probit"])
        tuned = [key for key in row if key.endswith(" rel")]
        assert tuned, row
        for key in tuned:
            assert row[key] < 0.02, (row["case"], key, row[key])
            gain = row[key.replace(" rel", " evidence gain")]
            assert gain >= -1e-9, (row["case"], key, gain)
