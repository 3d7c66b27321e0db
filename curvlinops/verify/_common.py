"""Small numerical helpers shared by the checks: norms, relative and dot-product errors.

May import: nothing of curvlinops.
"""

from __future__ import annotations

import math


def norm(xp, arrays):
    """Euclidean norm of a list of arrays taken as one vector (a Python float)."""
    return math.sqrt(sum(float(xp.sum(a * a)) for a in arrays))


def relative_error(xp, approx, exact):
    """``|approx - exact| / max(|approx|, |exact|)``; 0 when both vanish."""
    scale = max(norm(xp, [approx]), norm(xp, [exact]))
    diff = norm(xp, [approx - exact])
    if scale == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / scale


def dot_product_error(xp, U, AV, ATU, V):
    """Largest ``|<u, A v> - <A^T u, v>| / (|u| |A v| + |A^T u| |v|)`` over columns."""
    left = xp.sum(U * AV, axis=0)
    right = xp.sum(ATU * V, axis=0)

    def col_norm(X):
        return xp.sqrt(xp.sum(X * X, axis=0))

    scale = col_norm(U) * col_norm(AV) + col_norm(ATU) * col_norm(V)
    diff = xp.abs(left - right)
    safe = xp.where(scale > 0, scale, xp.ones_like(scale))
    degenerate = xp.where(diff > 0, xp.full_like(diff, math.inf), xp.zeros_like(diff))
    ratio = xp.where(scale > 0, diff / safe, degenerate)
    return float(xp.max(ratio))
