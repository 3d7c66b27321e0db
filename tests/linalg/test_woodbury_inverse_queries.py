"""The Woodbury inverse of a diagonal-plus-low-rank operator answers diagonal and trace.

``(D + U S U^T)^{-1} = D^{-1} - W W^T``: its diagonal and trace come from ``W``'s row
norms (the posterior variances of a low-rank Laplace approximation), checked against
``numpy.linalg.inv`` of the dense matrix on every backend, with and without damping.
"""

from __future__ import annotations

import numpy as np
import pytest

from curvlinops import DiagonalPlusLowRankLinearOperator, to_numpy


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_inverse_diagonal_and_trace(backend, dtype_name, damping):
    from conftest import tolerances

    rng = np.random.default_rng(0)
    d, s, U = rng.uniform(0.5, 2.0, 7), rng.uniform(0.5, 2.0, 2), rng.normal(size=(7, 2))
    op = DiagonalPlusLowRankLinearOperator(
        backend.asarray(d, dtype_name),
        backend.asarray(s, dtype_name),
        backend.asarray(U, dtype_name),
    )
    inverse = np.linalg.inv(np.diag(d) + U @ np.diag(s) @ U.T + damping * np.eye(7))
    rtol, atol = tolerances(dtype_name)
    inv = op.inverse(damping)
    np.testing.assert_allclose(
        to_numpy(inv.diagonal()), np.diag(inverse), rtol=10 * rtol, atol=atol
    )
    np.testing.assert_allclose(float(inv.trace()), np.trace(inverse), rtol=10 * rtol)
