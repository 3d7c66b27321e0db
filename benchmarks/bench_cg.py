"""curvlinops.cg against scipy.sparse.linalg.cg on the same NumPy operator.

Two systems: a dense SPD matrix of n = 4000, and a Kronecker operator of
n = 250 000 (two 500 x 500 SPD factors). Both solvers start from zero with the same
tolerance; the table reports both iteration counts and the ratio of the time per
iteration (ours over SciPy's; target <= 1.2), with the operator's product shared by
both (scipy drives ``to_scipy()`` of the same operator).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg
from _timing import time_call

import curvlinops as cl


def _spd(rng, n, cond):
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = np.geomspace(1.0, cond, n)
    return (Q * w) @ Q.T


def _case(name, A, b, rtol, repeats):
    counts = {}

    def ours():
        x, info = cl.cg(A, b, rtol=rtol, maxiter=10_000)
        counts["ours"] = int(info.iterations)
        return x

    S = A.to_scipy()

    def theirs():
        iters = [0]

        def count(_):
            iters[0] += 1

        x, _ = scipy.sparse.linalg.cg(S, b, rtol=rtol, maxiter=10_000, callback=count)
        counts["scipy"] = iters[0]
        return x

    t_ours = time_call(ours, repeats=repeats, warmup=1).min
    t_scipy = time_call(theirs, repeats=repeats, warmup=1).min
    x_ours, x_scipy = ours(), theirs()
    per_ours, per_scipy = t_ours / counts["ours"], t_scipy / counts["scipy"]
    ratio = per_ours / per_scipy
    return {
        "system": name,
        "iterations ours": counts["ours"],
        "iterations scipy": counts["scipy"],
        "time/iteration ours / scipy": ratio,
        "target": "<= 1.2",
        "meets": ratio <= 1.2,
        "max |x_ours - x_scipy| / max |x|": float(
            np.abs(x_ours - x_scipy).max() / np.abs(x_scipy).max()
        ),
    }


def run(quick: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    n_dense, n_factor = (500, 60) if quick else (4000, 500)
    repeats = 2 if quick else 5
    dense = cl.aslinearoperator(_spd(rng, n_dense, 1e3), psd=True)
    rows = [_case(f"dense SPD n={n_dense}", dense, rng.standard_normal(n_dense), 1e-8, repeats)]
    A1, A2 = _spd(rng, n_factor, 30.0), _spd(rng, n_factor, 30.0)
    kron = cl.KroneckerLinearOperator(A1, A2, psd=True)
    b = rng.standard_normal(n_factor * n_factor)
    rows.append(_case(f"Kronecker n={n_factor**2}", kron, b, 1e-8, repeats))
    return rows
