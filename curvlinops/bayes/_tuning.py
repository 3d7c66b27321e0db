"""Maximizing the Laplace evidence over the log prior precisions of a few groups.

What lives here: :func:`maximize_evidence`, a safeguarded Newton ascent in
``u = log delta`` (one value per prior group) of

``F(u) = -1/2 sum_g delta_g q_g + 1/2 sum_g n_g u_g - 1/2 log det(s H + diag(delta))``

(the log marginal likelihood up to terms free of ``delta``; ``q_g = ||theta_g -
mu_0,g||^2``, ``n_g`` the group's size). Its derivatives, with ``t_g`` the trace of the
covariance ``Sigma`` over group ``g`` and ``S_gh`` the squared Frobenius norm of
``Sigma``'s block between groups ``g`` and ``h`` (both from the structure,
:class:`~._structures.EvidenceTerms`):

- ``dF/du_g = 1/2 (n_g - delta_g (q_g + t_g))``; zero where ``delta_g q_g = gamma_g =
  n_g - delta_g t_g``, MacKay's condition;
- ``d2F/du_g du_h = -1/2 delta_g (q_g + t_g) [g = h] + 1/2 delta_g delta_h S_gh``.

Each step is Newton's where the Hessian is negative definite and MacKay's fixed point
``delta_g <- gamma_g / q_g`` otherwise, halved until ``F`` does not decrease. The few
groups' linear algebra is done on Python floats.

Internal to :mod:`curvlinops.bayes`. May import: nothing from curvlinops.
"""

from __future__ import annotations

import math

__all__: list[str] = []


def maximize_evidence(terms_at, u0, squares, counts, *, max_iterations, tol):
    """``(u, terms)`` at the maximum of ``F`` (see the module docstring).

    ``terms_at(u)`` returns ``(log det, traces per group, couplings per pair of groups
    or None)`` at ``u``; ``squares`` and ``counts`` are ``q_g`` and ``n_g``.
    """
    u = list(u0)
    terms = terms_at(u)
    value = _objective(u, terms, squares, counts)
    for _ in range(max_iterations):
        step = _direction(u, terms, squares, counts)
        for _halving in range(60):
            candidate = [a + b for a, b in zip(u, step, strict=True)]
            candidate_terms = terms_at(candidate)
            candidate_value = _objective(candidate, candidate_terms, squares, counts)
            if candidate_value >= value - 1e-13 * abs(value):
                break
            step = [0.5 * s for s in step]
        u, terms, value = candidate, candidate_terms, candidate_value
        if max(abs(s) for s in step) < tol:
            return u, terms
    raise ValueError(
        f"The prior precision did not converge in {max_iterations} iterations (last change of "
        f"log delta: {max(abs(s) for s in step):.3g}); raise max_iterations."
    )


def _objective(u, terms, squares, counts):
    logdet = terms[0]
    return (
        0.5 * sum(n * a - math.exp(a) * q for a, q, n in zip(u, squares, counts, strict=True))
        - 0.5 * logdet
    )


def _direction(u, terms, squares, counts):
    _, traces, coupling = terms
    delta = [math.exp(a) for a in u]
    gradient = [
        0.5 * (n - d * (q + t)) for d, q, t, n in zip(delta, squares, traces, counts, strict=True)
    ]
    if coupling is not None:
        G = len(u)
        negative_hessian = [
            [
                (0.5 * delta[g] * (squares[g] + traces[g]) if g == h else 0.0)
                - 0.5 * delta[g] * delta[h] * coupling[g][h]
                for h in range(G)
            ]
            for g in range(G)
        ]
        step = _cholesky_solve(negative_hessian, gradient)
        if step is not None:
            return step
    # MacKay's fixed point: delta_g <- gamma_g / q_g
    return [
        math.log(max(n - d * t, 1e-300) / q) - a
        for a, d, t, q, n in zip(u, delta, traces, squares, counts, strict=True)
    ]


def _cholesky_solve(A, b):
    """``A^{-1} b`` for a small symmetric positive definite ``A`` (lists), or None."""
    n = len(b)
    L = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            total = A[i][j] - sum(L[i][k] * L[j][k] for k in range(j))
            if i == j:
                if not total > 1e-14 * max(abs(A[i][i]), 1e-300):
                    return None
                L[i][i] = math.sqrt(total)
            else:
                L[i][j] = total / L[j][j]
    y = [0.0] * n
    for i in range(n):
        y[i] = (b[i] - sum(L[i][k] * y[k] for k in range(i))) / L[i][i]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (y[i] - sum(L[k][i] * x[k] for k in range(i + 1, n))) / L[i][i]
    return x
