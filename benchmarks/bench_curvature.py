"""Exact curvature products over loss+gradient, and against curvlinops-for-pytorch.

MLP 784-256-256-10 (ReLU), N = 1024, cross-entropy, float32, NumPy, one batch. The
denominator is loss+gradient of the same model in curvlinops.nn. Rows:

- GGN and Hessian matvec, forward recomputed and with ``cache=True``;
- matmat with K = 16 (shared forward; with the cache, per-vector cost against the
  cached matvec);
- the peer: curvlinops-for-pytorch's GGN and Hessian matvecs on the same weights and
  vectors (its own loss+gradient as denominator, plus ours over theirs), run in a
  virtual environment of its own (set ``CURVLINOPS_BENCH_PEERS=1`` or pass
  ``--peers`` to the runner);
- the exact GGN diagonal (C = 10 classes) over loss+gradient;
- memory: the peak of a GGN matvec over 60 000 random samples in batches of 1000,
  against two batches (it must stay at batch scale: one batch's activations plus the
  product and its running sum, whatever the number of batches); and the peaks of one
  GGN and one Hessian matvec over the benchmark's batch against loss+gradient's.

Ratios only, measured in one run; those with targets in interleaved rounds with their
baseline (``_timing.time_ratio``), so that a drift of the machine's speed cancels.
"""

from __future__ import annotations

import os

import numpy as np
from _mlp import mlp_problem, peer_inputs, threads as _threads
from _timing import format_bytes, peak_numpy_bytes, time_call, time_ratio

import curvlinops as cl


def run(quick: bool = False) -> list[dict]:
    model, params, X, y = mlp_problem(quick=quick)
    data = [(X, y)]
    loss = cl.CrossEntropyLoss()
    repeats = 3 if quick else 11
    kw = dict(check_deterministic=False)
    G = cl.GGNLinearOperator(model, loss, params, data, **kw)
    H = cl.HessianLinearOperator(model, loss, params, data, **kw)
    Gc = cl.GGNLinearOperator(model, loss, params, data, cache=True, **kw)
    Hc = cl.HessianLinearOperator(model, loss, params, data, cache=True, **kw)
    rng = np.random.default_rng(1)
    v = rng.standard_normal(G.shape[0]).astype(X.dtype)
    V = rng.standard_normal((G.shape[0], 16)).astype(X.dtype)

    def t(fn):
        return time_call(fn, repeats=repeats, warmup=1).median

    rows = []

    def row(what, fn, target, baseline=G.gradient_and_loss, per_call=1, note=""):
        # Interleaved rounds with the baseline (see _timing.time_ratio).
        ratio = time_ratio(fn, baseline, rounds=3 if quick else 7) / per_call
        rows.append(
            {
                "quantity": what,
                "ratio": ratio,
                "target": f"<= {target}",
                "meets": ratio <= target,
                "note": note,
            }
        )

    row("GGN matvec / loss+grad", lambda: G @ v, 1.7)
    row("GGN matvec cached / loss+grad", lambda: Gc @ v, 1.4)
    row("Hessian matvec / loss+grad", lambda: H @ v, 2.5)
    row("Hessian matvec cached / loss+grad", lambda: Hc @ v, 1.7)
    row("GGN matmat K=16 / GGN matvec", lambda: G @ V, 12.5, lambda: G @ v, note="shared forward")
    row(
        "GGN matmat K=16 cached, per vector / cached matvec",
        lambda: Gc @ V,
        1.05,
        lambda: Gc @ v,
        per_call=16,
    )
    row(
        "exact GGN diagonal (C=10) / loss+grad",
        lambda: cl.GGNDiagonalLinearOperator(model, loss, params, data, **kw),
        3.0,
    )
    # Absolute times, for the comparison with the peer (measured in its own process).
    t_grad, t_ggn, t_hess = t(G.gradient_and_loss), t(lambda: G @ v), t(lambda: H @ v)
    rows.extend(_peer_rows(params, X, y, v, V, repeats, t_grad, t_ggn, t_hess, G, H))
    rows.extend(_memory_rows(model, loss, params, quick))
    peak_grad = peak_numpy_bytes(G.gradient_and_loss)
    for name, op in (("GGN", G), ("Hessian", H)):
        peak = peak_numpy_bytes(lambda op=op: op @ v)
        rows.append(
            {
                "quantity": f"{name} matvec peak memory / loss+grad peak (one batch)",
                "ratio": peak / peak_grad,
                "note": f"{format_bytes(peak)}; loss+grad {format_bytes(peak_grad)}",
            }
        )
    return rows


def _peer_rows(params, X, y, v, V, repeats, t_grad, t_ggn, t_hess, G, H):
    if os.environ.get("CURVLINOPS_BENCH_PEERS") != "1":
        return [{"quantity": "curvlinops-for-pytorch", "note": "skipped (use --peers)"}]
    from _peers import PeerUnavailable, run_peer

    try:
        res = run_peer(
            "curvlinops-for-pytorch",
            peer_inputs(params, X, y, v, V, repeats=repeats, threads=_threads()),
        )
    except PeerUnavailable as err:
        return [{"quantity": "curvlinops-for-pytorch", "note": f"unavailable: {err}"}]
    ours_ggn, ours_hess = G @ v, H @ v

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    peer_grad = float(res["t_grad"])
    return [
        {
            "quantity": "peer GGN matvec / its loss+grad",
            "ratio": float(res["t_ggn_matvec"]) / peer_grad,
        },
        {
            "quantity": "peer Hessian matvec / its loss+grad",
            "ratio": float(res["t_hess_matvec"]) / peer_grad,
        },
        {"quantity": "ours / peer: loss+grad", "ratio": t_grad / peer_grad},
        {
            "quantity": "ours / peer: GGN matvec",
            "ratio": t_ggn / float(res["t_ggn_matvec"]),
            "note": f"max rel. difference {rel(ours_ggn, res['ggn_v']):.1e}",
        },
        {
            "quantity": "ours / peer: Hessian matvec",
            "ratio": t_hess / float(res["t_hess_matvec"]),
            "note": f"max rel. difference {rel(ours_hess, res['hess_v']):.1e}",
        },
    ]


def _memory_rows(model, loss, params, quick):
    num_data, batch = (6000, 100) if quick else (60000, 1000)
    rng = np.random.default_rng(2)
    d_in = params[0].shape[1]
    C = params[-1].shape[0]

    class RandomBatches:
        """Batches drawn from a fixed seed per batch: the same on every pass, and never
        all in memory at once."""

        def __init__(self, num_batches):
            self.num_batches = num_batches

        def __iter__(self):
            for i in range(self.num_batches):
                r = np.random.default_rng(1000 + i)
                yield (
                    r.standard_normal((batch, d_in)).astype("float32"),
                    r.integers(0, C, size=batch),
                )

    v = rng.standard_normal(sum(p.size for p in params)).astype("float32")
    kw = dict(check_deterministic=False)
    G_all = cl.GGNLinearOperator(
        model, loss, params, RandomBatches(num_data // batch), num_data=num_data, **kw
    )
    G_one = cl.GGNLinearOperator(model, loss, params, RandomBatches(1), num_data=batch, **kw)
    # Two batches: the same working set as many (one batch's activations, the product and
    # the running sum over batches), so the ratio shows growth with the data set alone.
    G_two = cl.GGNLinearOperator(model, loss, params, RandomBatches(2), num_data=2 * batch, **kw)
    peak_all = peak_numpy_bytes(lambda: G_all @ v)
    peak_one = peak_numpy_bytes(lambda: G_one @ v)
    peak_two = peak_numpy_bytes(lambda: G_two @ v)
    return [
        {
            "quantity": f"GGN matvec peak memory, {num_data} samples / 2 batches of {batch}",
            "ratio": peak_all / peak_two,
            "target": "<= 1.1",
            "meets": peak_all / peak_two <= 1.1,
            "note": f"{format_bytes(peak_all)}; one batch alone {format_bytes(peak_one)}",
        }
    ]
