"""K-FAC and EKFAC: factor computation, inverse set-up and inverse products.

An MLP ``784-256-256-10`` with ReLU, ``N = 1024`` data points in one batch, float32,
NumPy, cross-entropy loss. Every time is reported as a ratio to one loss+gradient of the
same model on the same data (``GGNLinearOperator(...).gradient_and_loss()``), measured
in this run, in interleaved rounds (``_timing.time_ratio``):

- K-FAC factors with ``fisher_type="mc"`` (one sampled label per datum; target
  ``<= 2x``) and ``"type-2"`` (ten loss-Hessian columns per datum, reported);
- inverse set-up from fresh factors (one eigendecomposition per factor, which both
  inverses share): the factored inverse with pi-damping (``factored_inverse``) and the
  exact damped inverse (``inverse``); and the exact inverse for a new damping once the
  eigendecompositions are cached;
- inverse matvec (one vector): factored with heuristic damping (target ``<= 0.4x``)
  and exact damping (target ``<= 0.75x``);
- EKFAC construction (K-FAC's pass, eigendecompositions, the scalings from the same
  taps: one batch is linearized once).

Beside each ratio, ``model`` gives the matrix-product cost model: the multiply-adds of
the row's matrix products over those of one loss+gradient (forward ``F = N sum D_in
D_out``, backward ``F`` for the weights plus the propagation through the layers after
the first). K-FAC factors with ``M`` cotangent columns (``mc``: 1 sample; ``type-2``:
``C`` backward columns, the classes): ``F`` plus ``M`` propagations plus ``N sum
D_in^2`` (``A``) plus ``M N sum D_out^2`` (``B``); EKFAC adds the rotations into the
eigenbasis (``M N D_out^2 + N D_in^2 + N D_in D_out`` per layer) and leaves out the
eigendecompositions (LAPACK, not matrix products).

The operators are built with ``check_deterministic=False`` (the check runs two more
passes over the data; it is a one-off at construction, not part of the method).
"""

from __future__ import annotations

import numpy as np
from _timing import time_call, time_ratio

from curvlinops import CrossEntropyLoss, GGNLinearOperator, nn
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator

DAMPING = 1e-3


def _problem(quick):
    import array_api_compat.numpy as xp

    widths = (784, 256, 256, 10)
    n = 256 if quick else 1024
    layers = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    params = model.init(0, xp=xp, dtype=xp.float32)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, widths[0]), dtype=np.float32)
    y = rng.integers(0, widths[-1], size=n)
    return model, params, [(X, y)], n


def _cost_model(widths, n):
    """Matrix-product multiply-adds over one loss+gradient's (see the module docstring)."""
    pairs = list(zip(widths[:-1], widths[1:], strict=True))
    forward = n * sum(i * o for i, o in pairs)
    propagate = n * sum(i * o for i, o in pairs[1:])
    lossgrad = 2 * forward + propagate

    def factors(m):
        return (
            forward
            + m * propagate
            + n * sum(i * i for i, _ in pairs)
            + m * n * sum(o * o for _, o in pairs)
        )

    classes = widths[-1]
    rotations = sum(classes * n * o * o + n * i * i + n * i * o for i, o in pairs)
    return {
        "K-FAC factors, mc (1 sample)": factors(1) / lossgrad,
        "K-FAC factors, type-2": factors(classes) / lossgrad,
        "EKFAC construction (type-2)": (factors(classes) + rotations) / lossgrad,
    }


def run(quick: bool) -> list[dict]:
    """One row per measured quantity, with its ratio to loss+gradient."""
    model, params, data, n = _problem(quick)
    loss = CrossEntropyLoss()
    repeats = 3 if quick else 7
    kwargs = dict(check_deterministic=False)

    G = GGNLinearOperator(model, loss, params, data, **kwargs)
    baseline = time_call(G.gradient_and_loss, repeats=repeats).median

    def kfac(fisher_type):
        return KFACLinearOperator(model, loss, params, data, fisher_type=fisher_type, **kwargs)

    K = kfac("mc")
    v = np.random.default_rng(1).standard_normal(K.shape[1], dtype=np.float32)

    def refresh():
        # New factor objects, so that the eigendecompositions are not cached.
        K._set_factors([(K.output_factors[la.name], K.input_factors[la.name]) for la in K.layers])

    def fresh_exact_inverse():
        refresh()
        return K.inverse(DAMPING)

    def fresh_factored_inverse():
        refresh()
        return K.factored_inverse(DAMPING, pi_damping=True)

    heuristic_inverse = K.factored_inverse(DAMPING, pi_damping=True)
    exact_inverse = K.inverse(DAMPING)

    measurements = [
        ("K-FAC factors, mc (1 sample)", lambda: kfac("mc"), 2.0),
        ("K-FAC factors, type-2", lambda: kfac("type-2"), None),
        ("inverse set-up, pi-damping (eigh)", fresh_factored_inverse, None),
        ("inverse set-up, exact damping (eigh)", fresh_exact_inverse, None),
        ("inverse set-up, new damping (eigh cached)", lambda: K.inverse(2 * DAMPING), None),
        ("K-FAC matvec", lambda: K @ v, None),
        ("inverse matvec, pi-damping", lambda: heuristic_inverse @ v, 0.4),
        ("inverse matvec, exact damping", lambda: exact_inverse @ v, 0.75),
        (
            "EKFAC construction (type-2)",
            lambda: EKFACLinearOperator(model, loss, params, data, **kwargs),
            None,
        ),
    ]
    rows = [
        {
            "quantity": "loss + gradient (baseline)",
            "N": n,
            "ms": 1e3 * baseline,
            "ratio": 1.0,
            "model": 1.0,
            "target": "",
            "met": "",
        }
    ]
    model_ratios = _cost_model((784, 256, 256, 10), n)
    for name, fn, target in measurements:
        fast = "matvec" in name
        timing = time_call(
            fn, repeats=repeats, warmup=1, min_time=0.0 if quick or not fast else 0.2
        )
        # The ratio from interleaved rounds with loss+gradient (see _timing.time_ratio);
        # "ms" is the plain median of this row's own calls.
        ratio = time_ratio(
            fn, G.gradient_and_loss, rounds=3 if quick else 7, block=5 if fast else 3
        )
        rows.append(
            {
                "quantity": name,
                "N": n,
                "ms": 1e3 * timing.median,
                "ratio": ratio,
                "model": model_ratios.get(name, ""),
                "target": "" if target is None else f"<= {target}",
                "met": "" if target is None else ratio <= target,
            }
        )
    rows.extend(_peer_rows(model, loss, params, data, repeats, baseline))
    return rows


def _peer_rows(model, loss, params, data, repeats, baseline):
    """curvlinops-for-pytorch's K-FAC and EKFAC on the same weights (``--peers``)."""
    import os

    if os.environ.get("CURVLINOPS_BENCH_PEERS") != "1":
        return [{"quantity": "curvlinops-for-pytorch K-FAC/EKFAC", "met": "skipped (--peers)"}]
    from _mlp import peer_inputs, threads as _threads
    from _peers import PeerUnavailable, run_peer

    X, y = data[0]
    rng = np.random.default_rng(3)
    P = sum(p.size for p in params)
    v = rng.standard_normal(P).astype(np.float32)
    V = rng.standard_normal((P, 2)).astype(np.float32)
    try:
        res = run_peer(
            "curvlinops-for-pytorch",
            peer_inputs(params, X, y, v, V, repeats=repeats, threads=_threads(), kfac=1),
        )
    except PeerUnavailable as err:
        return [{"quantity": "curvlinops-for-pytorch K-FAC/EKFAC", "met": f"unavailable: {err}"}]
    kw = dict(check_deterministic=False)
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2", **kw)
    E = EKFACLinearOperator(model, loss, params, data, **kw)

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    t_k = time_call(
        lambda: KFACLinearOperator(model, loss, params, data, fisher_type="type-2", **kw),
        repeats=max(1, repeats // 2),
    ).median
    t_e = time_call(
        lambda: EKFACLinearOperator(model, loss, params, data, **kw), repeats=max(1, repeats // 2)
    ).median
    t_kv = time_call(lambda: K @ v, repeats=repeats, min_time=0.2).median
    peer_grad = float(res["t_grad"])
    return [
        {
            "quantity": "ours / peer: K-FAC type-2 construction + 1 matvec",
            "ratio": t_k / float(res["t_kfac_build"]),
            "met": f"values: max rel. diff {rel(K @ v, res['kfac_v']):.1e}",
        },
        {"quantity": "ours / peer: K-FAC matvec", "ratio": t_kv / float(res["t_kfac_matvec"])},
        {
            "quantity": "ours / peer: EKFAC construction + 1 matvec",
            "ratio": t_e / float(res["t_ekfac_build"]),
            "met": f"values: max rel. diff {rel(E @ v, res['ekfac_v']):.1e}",
        },
        {
            "quantity": "peer K-FAC type-2 construction + 1 matvec / its loss+grad",
            "ratio": float(res["t_kfac_build"]) / peer_grad,
        },
        {"quantity": "ours / peer: loss+grad", "ratio": baseline / peer_grad},
    ]
