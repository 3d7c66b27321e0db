"""Tests of curvlinops.solvers.spectral_density: stochastic Lanczos quadrature.

The reference is the histogram of the eigenvalues from numpy.linalg.eigvalsh: the
density's mass per bin must match the fraction of eigenvalues per bin (total
variation distance), and the density must integrate to one over its grid. In
expectation over the probes (tests/monte_carlo.py), the mass per cluster is the fraction
of eigenvalues in it, with the power to reject masses scaled by 0.9 or 1.1.
"""

from __future__ import annotations

import numpy as np
import pytest
from monte_carlo import assert_unbiased

from curvlinops import (
    CallableLinearOperator,
    aslinearoperator,
    log_spectral_density,
    spectral_density,
)


def _symmetric(eigenvalues, seed=0):
    n = len(eigenvalues)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    A = (Q * np.asarray(eigenvalues)) @ Q.T
    return 0.5 * (A + A.T)


def _clustered_spectrum(centers, counts, spread, seed=1):
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [c + spread * rng.uniform(-1.0, 1.0, k) for c, k in zip(centers, counts, strict=True)]
    )


def _binned_mass(grid, density, edges):
    """Trapezoid mass of the density in each bin [edges[i], edges[i+1])."""
    masses = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (grid >= lo) & (grid < hi)
        masses.append(np.trapezoid(density * inside, grid))
    return np.array(masses)


def _total_variation(p, q):
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum()


def test_spectral_density_matches_eigenvalue_histogram(backend):
    # three well-separated clusters holding 50%, 30% and 20% of n = 60 eigenvalues
    counts = [30, 18, 12]
    spectrum = _clustered_spectrum([-2.0, 3.0, 10.0], counts, spread=0.1)
    A = _symmetric(spectrum, seed=2)
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    grid, density = spectral_density(op, num_probes=20, lanczos_steps=25, seed=0)
    grid, density = backend.to_numpy(grid), backend.to_numpy(density)
    assert grid.shape == density.shape == (1024,)
    assert np.all(density >= 0)
    assert abs(np.trapezoid(density, grid) - 1.0) <= 1e-10
    # estimated boundaries (with the default 5% margin) contain the spectrum
    assert grid[0] <= spectrum.min() and grid[-1] >= spectrum.max()
    edges = [-np.inf, 0.5, 6.5, np.inf]
    slq = _binned_mass(grid, density, edges)
    exact = np.histogram(spectrum, bins=edges)[0] / len(spectrum)
    # per-probe cluster-mass std <= sqrt(2 * 30) / 60 ~ 0.13, so ~0.03 for 20 probes
    assert _total_variation(slq, exact) <= 0.1


def test_cluster_masses_are_unbiased_over_probes(numpy_backend):
    """A unit probe's quadrature puts mass ``v^T P v`` on a cluster with spectral
    projector ``P``; its expectation is ``tr(P) / n``. Clusters far apart (25 Lanczos
    steps resolve them) and the default margin keep the bumps' mass in their bins."""
    counts = [30, 18, 12]
    spectrum = _clustered_spectrum([-2.0, 3.0, 10.0], counts, spread=0.1)
    op = aslinearoperator(_symmetric(spectrum, seed=2), symmetric=True)
    edges = [-np.inf, 0.5, 6.5, np.inf]
    draws = [  # 50 independent estimates of 20 probes each
        _binned_mass(*spectral_density(op, num_probes=20, lanczos_steps=25, seed=s), edges)
        for s in range(50)
    ]
    assert_unbiased(draws, np.asarray(counts) / len(spectrum))


def test_estimated_boundaries_contain_spectrum_without_margin(backend):
    spectrum = np.linspace(-3.0, 5.0, 60)
    A = _symmetric(spectrum, seed=3)
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    grid, _ = spectral_density(op, num_probes=20, lanczos_steps=25, margin=0.0, seed=0)
    grid = backend.to_numpy(grid)
    assert grid[0] <= spectrum.min() + 1e-10 and grid[-1] >= spectrum.max() - 1e-10
    # ... and are not much wider than it
    assert grid[0] >= spectrum.min() - 0.5 and grid[-1] <= spectrum.max() + 0.5


def test_given_grid_and_boundaries(backend):
    spectrum = _clustered_spectrum([1.0, 4.0], [30, 30], spread=0.05)
    A = _symmetric(spectrum, seed=4)
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    grid_in = np.linspace(0.0, 5.0, 1024)
    grid, density = spectral_density(
        op, num_probes=20, lanczos_steps=25, grid=backend.asarray(grid_in), seed=1
    )
    np.testing.assert_allclose(backend.to_numpy(grid), grid_in)
    assert abs(np.trapezoid(backend.to_numpy(density), grid_in) - 1.0) <= 1e-10
    grid, density = spectral_density(
        op, num_probes=20, lanczos_steps=25, boundaries=(0.0, 5.0), margin=0.1
    )
    grid = backend.to_numpy(grid)
    assert grid.shape == (1024,)
    np.testing.assert_allclose([grid[0], grid[-1]], [-0.5, 5.5], atol=1e-12)


def test_one_matmat_per_lanczos_step(backend):
    n = 60
    A_b = backend.asarray(_symmetric(np.linspace(0.0, 1.0, n), seed=5))
    calls = []

    def matmat(X):
        calls.append(X.shape[1])
        return A_b @ X

    op = CallableLinearOperator(
        (n, n),
        matmat=matmat,
        dtype=A_b.dtype,
        xp=backend.xp,
        device=backend.device,
        symmetric=True,
    )
    spectral_density(op, num_probes=20, lanczos_steps=25, seed=0)
    assert calls == [20] * 25


def test_log_spectral_density_matches_histogram(backend):
    # PSD, clusters at 1e-4, 1e-1 and 1e2 (50%, 30%, 20%) with 5% relative spread
    counts = [30, 18, 12]
    rng = np.random.default_rng(6)
    spectrum = np.concatenate(
        [
            c * (1.0 + 0.05 * rng.uniform(-1.0, 1.0, k))
            for c, k in zip([1e-4, 1e-1, 1e2], counts, strict=True)
        ]
    )
    A = _symmetric(spectrum, seed=7)
    op = aslinearoperator(backend.asarray(A), symmetric=True)
    eps = 1e-6
    t, density = log_spectral_density(op, num_probes=20, lanczos_steps=25, epsilon=eps, seed=0)
    t, density = backend.to_numpy(t), backend.to_numpy(density)
    assert abs(np.trapezoid(density, t) - 1.0) <= 1e-10
    log_spectrum = np.log(spectrum + eps)
    assert t[0] <= log_spectrum.min() and t[-1] >= log_spectrum.max()
    edges = [-np.inf, np.log(3e-3), np.log(3.0), np.inf]
    slq = _binned_mass(t, density, edges)
    exact = np.histogram(log_spectrum, bins=edges)[0] / len(spectrum)
    assert _total_variation(slq, exact) <= 0.1
    # spectral_density(log=True) is the same computation
    t2, density2 = spectral_density(
        op, num_probes=20, lanczos_steps=25, epsilon=eps, seed=0, log=True
    )
    np.testing.assert_allclose(backend.to_numpy(density2), density, rtol=1e-12, atol=1e-14)


def test_spectral_density_errors(numpy_backend):
    op = aslinearoperator(np.eye(5), symmetric=True)
    with pytest.raises(ValueError, match="square"):
        spectral_density(aslinearoperator(np.ones((3, 4))))
    with pytest.raises(ValueError, match="kappa"):
        spectral_density(op, kappa=1.0)
    with pytest.raises(ValueError, match="boundaries"):
        spectral_density(op, boundaries=(2.0, 1.0))
    with pytest.raises(ValueError, match="distribution"):
        spectral_density(op, distribution="uniform")
    with pytest.raises(ValueError, match="num_probes"):
        spectral_density(op, num_probes=0)
    with pytest.raises(ValueError, match="epsilon"):
        log_spectral_density(op, epsilon=0.0)
    with pytest.raises(ValueError, match="grid"):
        spectral_density(op, grid=np.zeros((2, 2)))


def test_spectral_density_refuses_non_finite_boundaries_and_grids(numpy_backend):
    """An infinite boundary or grid point would give a NaN density silently; the checks
    run in the one validation module, before any product with the operator."""
    calls = []
    op = CallableLinearOperator(
        (5, 5),
        matmat=lambda X: calls.append(1) or X,
        dtype=np.float64,
        xp=np,
        device=None,
        symmetric=True,
    )
    for fn in (spectral_density, log_spectral_density):
        with pytest.raises(ValueError, match="boundaries must be finite"):
            fn(op, boundaries=(0.0, np.inf))
        with pytest.raises(ValueError, match="boundaries must be a pair"):
            fn(op, boundaries=(0.0,))
        with pytest.raises(ValueError, match="grid contains NaN or Inf"):
            fn(op, grid=np.array([0.0, np.nan, 1.0]))
        with pytest.raises(ValueError, match="at least 2 points"):
            fn(op, grid=np.zeros(1))
    assert not calls


def _gaussian_mixture(grid, centers, sigma):
    """``mean_j N(grid; centers_j, sigma^2)``, normalized by the trapezoid rule on ``grid``."""
    bumps = np.exp(-0.5 * ((grid[:, None] - centers[None, :]) / sigma) ** 2)
    density = bumps.mean(axis=1) / (sigma * np.sqrt(2.0 * np.pi))
    return density / np.trapezoid(density, grid)


def test_closed_form_for_a_diagonal_operator_with_every_option(numpy_backend):
    """With as many Lanczos steps as the dimension, the Ritz values are the eigenvalues
    and a normalized Rademacher probe gives each the weight ``1/n`` exactly, so the
    density is a Gaussian mixture written here in NumPy: nodes at the eigenvalues (at
    ``log(lam + epsilon)``), width ``spacing / sqrt(8 log kappa)`` with the node spacing
    ``(high - low) / (n - 1)`` of the padded boundaries. Every option is non-default, and
    ``spectral_density(log=True)`` must pass each of them on."""
    lam = np.array([0.7, 1.5, 3.0, 6.0, 11.0, 19.0])
    n = len(lam)
    op = aslinearoperator(np.diag(lam), symmetric=True)
    opts = dict(num_probes=3, lanczos_steps=n, num_points=101, kappa=7.0, margin=0.2, seed=4)
    low, high, eps = 0.5, 20.0, 1e-2
    linear = spectral_density(op, boundaries=(low, high), **opts)
    logs = [
        spectral_density(op, boundaries=(low, high), log=True, epsilon=eps, **opts),
        log_spectral_density(op, boundaries=(low, high), epsilon=eps, **opts),
    ]
    for results, centers, lo, hi in (
        ([linear], lam, low, high),
        (logs, np.log(lam + eps), np.log(low + eps), np.log(high + eps)),
    ):
        lo, hi = lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo)
        expected_grid = np.linspace(lo, hi, 101)
        sigma = (hi - lo) / (n - 1) / np.sqrt(8.0 * np.log(7.0))
        expected = _gaussian_mixture(expected_grid, centers, sigma)
        for grid, density in results:
            np.testing.assert_allclose(grid, expected_grid, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(density, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("c, pad", [(0.5, 0.1 * 1.0), (3.0, 0.1 * 3.0), (0.0, 0.1)])
def test_a_flat_spectrum_gets_a_margin_relative_to_its_value_or_to_one(c, pad):
    """A spectrum of one value ``c`` has no width to pad by: the grid spans
    ``c +- margin max(|c|, 1)``."""
    A = aslinearoperator(c * np.eye(4), psd=c >= 0, symmetric=True)
    grid, _ = spectral_density(A, num_probes=2, lanczos_steps=2, num_points=5, margin=0.1)
    np.testing.assert_allclose(np.asarray(grid)[[0, -1]], [c - pad, c + pad], atol=1e-12)


def test_the_defaults_are_the_documented_ones():
    """num_probes=10, lanczos_steps=50, num_points=1024, kappa=3, seed=0, margin=0.05,
    Rademacher probes (and epsilon=1e-5 for the log density): the same densities as
    passing them, each of which changes the result when changed."""
    A = aslinearoperator(_symmetric(np.linspace(0.5, 4.0, 60), seed=2), symmetric=True)
    documented = dict(
        num_probes=10, lanczos_steps=50, num_points=1024, kappa=3.0, seed=0, margin=0.05,
        distribution="rademacher",
    )  # fmt: skip
    for call, extra in ((spectral_density, {}), (log_spectral_density, {"epsilon": 1e-5})):
        default = call(A)
        explicit = call(A, **documented, **extra)
        for a, b in zip(default, explicit, strict=True):
            np.testing.assert_array_equal(a, b)
        assert default[0].shape == (1024,)
        for change in ({"num_probes": 11}, {"lanczos_steps": 49}, {"kappa": 3.5}, {"seed": 1},
                       {"margin": 0.06}, {"distribution": "normal"}):  # fmt: skip
            changed = call(A, **{**documented, **extra, **change})
            assert not np.array_equal(changed[1], default[1]), change
