"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

For a unit probe ``v``, ``m`` Lanczos steps give a tridiagonal ``T = S diag(theta) S^T``
whose Ritz values ``theta_k`` and weights ``tau_k = S[0, k]^2`` form the Gauss
quadrature of the measure ``sum_j (v^T q_j)^2 delta(x - lam_j)``. With random probes
(``E[(v^T q_j)^2] = 1/n``) averaging these discrete measures estimates the spectral
density ``(1/n) sum_j delta(x - lam_j)`` (Ubaru, Chen & Saad 2017); each delta is
widened to a Gaussian to draw a smooth curve (Ghorbani, Krishnan & Xiao 2019; Papyan
2020). All probes run together: one ``matmat`` per Lanczos step.

- :func:`spectral_density`: density of the eigenvalues on a uniform grid.
- :func:`log_spectral_density`: density of ``log(|lam| + epsilon)`` for PSD operators
  whose eigenvalues span many orders of magnitude (Papyan 2020).

Structure: both need a symmetric operator (Lanczos) and consult its ``is_symmetric``
tag under the rule of ``._validation`` (see :func:`curvlinops.lanczos`);
:func:`log_spectral_density` is meant for PSD operators but does not require the tag
(it takes ``|lam|``).

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``.lanczos``, ``._validation``.
"""

from __future__ import annotations

import math

from .._backend import as_generator
from ._validation import (
    SYMMETRIC,
    as_operator,
    check_choice,
    check_count,
    check_grid,
    check_interval,
    check_real,
    require_structure,
)
from .lanczos import _batched_lanczos, _tridiagonal

__all__ = ["log_spectral_density", "spectral_density"]


def _lanczos_quadrature(A, num_probes, lanczos_steps, seed, distribution):
    """Ritz values, weights and extreme residuals of SLQ on ``num_probes`` probes.

    Returns ``nodes (b, m)``, ``weights (b, m)`` (each row sums to one), and the
    smallest and largest Ritz values widened by their residual norms (Python floats).
    """
    xp, n = A.xp, A.shape[0]
    gen = as_generator(seed, xp, A.device)
    if distribution == "rademacher":
        V = gen.rademacher((num_probes, n), A.dtype)
    else:
        V = gen.normal((num_probes, n), A.dtype)
    V = V / xp.linalg.vector_norm(V, axis=1)[:, None]
    steps = min(lanczos_steps, n)
    alphas, betas, _ = _batched_lanczos(A, V, steps, gen)
    T = _tridiagonal(alphas, betas[:, :-1], xp)
    nodes, S = xp.linalg.eigh(T)
    weights = S[:, 0, :] ** 2
    # An eigenvalue of A lies within |beta_m S[m-1, k]| of each Ritz value theta_k.
    residuals = xp.abs(betas[:, -1:] * S[:, steps - 1, :])
    low = float(xp.min(nodes[:, 0] - residuals[:, 0]))
    high = float(xp.max(nodes[:, steps - 1] + residuals[:, steps - 1]))
    return nodes, weights, low, high


def _check_common(A, num_probes, lanczos_steps, num_points, kappa, margin, distribution, caller):
    A = as_operator(A, caller, nonempty=True)
    check_count(num_probes, "num_probes", caller)
    check_count(lanczos_steps, "lanczos_steps", caller)
    check_count(num_points, "num_points", caller, minimum=2)
    check_real(kappa, "kappa", caller, above=1.0)
    check_real(margin, "margin", caller, minimum=0.0)
    check_choice(distribution, "distribution", caller, ("rademacher", "normal"))
    require_structure(A, caller, SYMMETRIC)
    return A


def _grid_from(grid, low, high, num_points, A):
    """The evaluation grid: the user's 1-D array, or ``num_points`` points on [low, high]."""
    if grid is None:
        return A.xp.linspace(low, high, num_points, dtype=A.dtype, device=A.device)
    return grid  # checked by check_grid before the Lanczos runs


def _smoothed_density(grid, nodes, weights, sigma, xp):
    """``mean_probes sum_k tau_k N(grid; theta_k, sigma^2)``, normalized to unit integral
    over the grid (trapezoid rule)."""
    diff = (grid[None, None, :] - nodes[:, :, None]) / sigma
    bumps = xp.exp(-0.5 * diff * diff) / (sigma * math.sqrt(2.0 * math.pi))
    density = xp.mean(xp.sum(weights[:, :, None] * bumps, axis=1), axis=0)
    return density / _trapezoid(density, grid, xp)


def _trapezoid(y, x, xp):
    dx = x[1:] - x[:-1]
    return xp.sum(0.5 * (y[1:] + y[:-1]) * dx)


def _bump_width(low, high, lanczos_steps, kappa):
    """Gaussian width: with nodes about ``(high - low) / (m - 1)`` apart, a bump's value
    half a node spacing from its center is ``1 / kappa`` of its peak."""
    spacing = (high - low) / max(lanczos_steps - 1, 1)
    return spacing / math.sqrt(8.0 * math.log(kappa))


def _padded(low, high, margin):
    width = high - low
    pad = margin * width if width > 0 else margin * max(abs(low), 1.0)
    return low - pad, high + pad


def spectral_density(
    A,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 50,
    grid=None,
    num_points: int = 1024,
    kappa: float = 3.0,
    boundaries=None,
    seed=0,
    margin: float = 0.05,
    distribution: str = "rademacher",
    log: bool = False,
    epsilon: float = 1e-5,
):
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Runs ``lanczos_steps`` Lanczos steps (full reorthogonalization) from
    ``num_probes`` random unit probes at once, one ``matmat`` per step, and returns
    ``mean_probes sum_k tau_k N(x; theta_k, sigma^2)`` on a grid, with Ritz values
    ``theta_k`` and weights ``tau_k`` (squared first components of the eigenvectors
    of the tridiagonal matrix). The density is normalized to integrate to one over the
    grid (trapezoid rule).

    Parameters
    ----------
    A : LinearOperator
        Symmetric ``(n, n)`` operator; its ``is_symmetric`` tag is consulted (see
        :func:`curvlinops.lanczos`).
    num_probes : int
        Number of random probes (Lanczos runs) to average.
    lanczos_steps : int
        Lanczos steps (quadrature nodes) per probe; capped at ``n``.
    grid : array, optional
        1-D increasing grid of ``A``'s namespace to evaluate the density on; overrides
        ``num_points``, ``boundaries`` and ``margin`` for the grid (not for the width).
    num_points : int
        Number of grid points when ``grid`` is None.
    kappa : float
        Width of the Gaussian bumps, ``> 1``: with the nodes ``(high - low) /
        (lanczos_steps - 1)`` apart, a bump half a node spacing away from its center
        has ``1 / kappa`` of its peak (Papyan 2020's parametrization). Larger kappa:
        narrower bumps.
    boundaries : (float, float), optional
        Interval ``(low, high)`` that contains the spectrum. Estimated when None from
        the extreme Ritz values of the same Lanczos runs, widened by their residual
        norms (an eigenvalue lies within that distance of each Ritz value).
    seed
        Seed or generator for the probes.
    margin : float
        Relative padding of the interval on both sides (``margin * (high - low)``).
    distribution : {"rademacher", "normal"}
        Distribution of the probe entries (normalized to unit probes).
    log : bool
        Return :func:`log_spectral_density` instead (``A`` must be PSD).
    epsilon : float
        Only with ``log=True``: the shift in ``log(|lam| + epsilon)``.

    Returns
    -------
    grid
        ``(num_points,)`` grid of eigenvalue positions.
    density
        ``(num_points,)`` non-negative density with unit integral over ``grid``.

    Raises
    ------
    ValueError
        Non-square ``A``, non-positive counts, ``kappa <= 1``, bad ``boundaries`` or
        ``grid``, unknown ``distribution``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> A = aslinearoperator(np.diag(np.repeat([1.0, 5.0], 50)), symmetric=True)
    >>> grid, density = spectral_density(A, num_probes=4, lanczos_steps=10, seed=0)
    >>> mass_near_1 = float(np.trapezoid(density * (grid < 3), grid))
    >>> round(mass_near_1, 1)
    0.5
    """
    if log:
        return log_spectral_density(
            A,
            num_probes=num_probes,
            lanczos_steps=lanczos_steps,
            grid=grid,
            num_points=num_points,
            kappa=kappa,
            boundaries=boundaries,
            seed=seed,
            margin=margin,
            distribution=distribution,
            epsilon=epsilon,
        )
    caller = "spectral_density"
    A = _check_common(A, num_probes, lanczos_steps, num_points, kappa, margin, distribution, caller)
    boundaries = check_interval(boundaries, "boundaries", caller)
    grid = None if grid is None else check_grid(grid, A, caller)
    nodes, weights, low, high = _lanczos_quadrature(
        A, num_probes, lanczos_steps, seed, distribution
    )
    if boundaries is not None:
        low, high = boundaries
    low, high = _padded(low, high, margin)
    xp = A.xp
    grid = _grid_from(grid, low, high, num_points, A)
    steps = nodes.shape[1]
    sigma = _bump_width(low, high, steps, kappa)
    return grid, _smoothed_density(grid, nodes, weights, sigma, xp)


def log_spectral_density(
    A,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 50,
    grid=None,
    num_points: int = 1024,
    kappa: float = 3.0,
    boundaries=None,
    seed=0,
    margin: float = 0.05,
    distribution: str = "rademacher",
    epsilon: float = 1e-5,
):
    """Density of ``t = log(|lam| + epsilon)`` over the eigenvalues of a PSD operator.

    The spectra of curvature matrices span many orders of magnitude, with most
    eigenvalues near zero; on a logarithmic axis their structure becomes visible
    (Papyan 2020). The Lanczos quadrature is the same as in :func:`spectral_density`;
    its Ritz values are mapped to ``t = log(|theta| + epsilon)`` before the Gaussian
    smoothing, on a uniform grid in ``t``.

    Parameters
    ----------
    A : LinearOperator
        Symmetric positive semi-definite ``(n, n)`` operator (``|lam|`` makes the tiny
        negative Ritz values that rounding produces harmless).
    num_probes, lanczos_steps, num_points, kappa, seed, margin, distribution
        As in :func:`spectral_density` (``kappa`` and ``margin`` act in ``t``).
    grid : array, optional
        1-D increasing grid of ``t`` values (log scale).
    boundaries : (float, float), optional
        ``(low, high)`` eigenvalues (not logarithms) enclosing the spectrum; estimated
        by Lanczos when None.
    epsilon : float
        Shift ``> 0`` that keeps ``log`` finite at zero eigenvalues; eigenvalues much
        smaller than ``epsilon`` pile up at ``t = log(epsilon)``. Default ``1e-5``
        (Papyan 2020).

    Returns
    -------
    grid
        ``(num_points,)`` uniform grid of ``t = log(lam + epsilon)``; plot the density
        against ``exp(grid) - epsilon`` on a logarithmic axis.
    density
        ``(num_points,)`` density of ``t`` with unit integral over ``grid``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator
    >>> A = aslinearoperator(np.diag(np.repeat([1e-3, 1e2], 50)), symmetric=True)
    >>> t, density = log_spectral_density(A, num_probes=4, lanczos_steps=10, seed=0)
    >>> mass_below_1 = float(np.trapezoid(density * (t < 0.0), t))
    >>> round(mass_below_1, 1)
    0.5
    """
    caller = "log_spectral_density"
    A = _check_common(A, num_probes, lanczos_steps, num_points, kappa, margin, distribution, caller)
    boundaries = check_interval(boundaries, "boundaries", caller)
    grid = None if grid is None else check_grid(grid, A, caller)
    check_real(epsilon, "epsilon", caller, positive=True)
    nodes, weights, low, high = _lanczos_quadrature(
        A, num_probes, lanczos_steps, seed, distribution
    )
    if boundaries is not None:
        low, high = boundaries
    xp = A.xp
    low = math.log(max(low, 0.0) + epsilon)
    high = math.log(max(abs(high), 0.0) + epsilon)
    if not high > low:
        high = low + 1.0
    low, high = _padded(low, high, margin)
    grid = _grid_from(grid, low, high, num_points, A)
    log_nodes = xp.log(xp.abs(nodes) + epsilon)
    sigma = _bump_width(low, high, nodes.shape[1], kappa)
    return grid, _smoothed_density(grid, log_nodes, weights, sigma, xp)
