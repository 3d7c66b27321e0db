"""Peer script: curvlinops-for-pytorch on the benchmark's MLP (runs in the peer's venv).

Usage: ``python curvlinops_for_pytorch.py inputs.npz results.npz``. Reads the weights
of an MLP (``W0, b0, W1, b1, ...``), data ``X, y`` and vectors ``v (P,)``, ``V (P, K)``;
writes the products and the median times of loss+gradient and of the products, so the
benchmark can check that both libraries compute the same numbers and report ratios
measured in one run on one machine.
"""

import statistics
import sys
import time

import numpy as np
import torch


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(src, dst):
    from curvlinops import (
        EKFACLinearOperator,
        GGNLinearOperator,
        HessianLinearOperator,
        KFACLinearOperator,
    )

    d = np.load(src)
    repeats = int(d["repeats"])
    torch.set_num_threads(int(d["threads"]))
    dtype = getattr(torch, str(d["dtype"]))
    num_layers = int(d["num_layers"])
    layers = []
    for i in range(num_layers):
        W = torch.as_tensor(d[f"W{i}"], dtype=dtype)
        lin = torch.nn.Linear(W.shape[1], W.shape[0]).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(W)
            lin.bias.copy_(torch.as_tensor(d[f"b{i}"], dtype=dtype))
        layers.append(lin)
        if i < num_layers - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    params = [p for p in model.parameters() if p.requires_grad]
    X = torch.as_tensor(d["X"], dtype=dtype)
    y = torch.as_tensor(d["y"]).long()
    data = [(X, y)]
    loss = torch.nn.CrossEntropyLoss()
    v = torch.as_tensor(d["v"], dtype=dtype)
    V = torch.as_tensor(d["V"], dtype=dtype)
    out = {}
    G = GGNLinearOperator(model, loss, params, data, check_deterministic=False)
    H = HessianLinearOperator(model, loss, params, data, check_deterministic=False)
    out["t_grad"] = timed(lambda: G.gradient_and_loss(), repeats)
    out["ggn_v"] = (G @ v).numpy()
    out["hess_v"] = (H @ v).numpy()
    out["t_ggn_matvec"] = timed(lambda: G @ v, repeats)
    out["t_hess_matvec"] = timed(lambda: H @ v, repeats)
    out["t_ggn_matmat"] = timed(lambda: G @ V, max(1, repeats // 2))
    if int(d.get("kfac", 0)):

        def kfac():
            return KFACLinearOperator(
                model, loss, params, data, fisher_type="type-2", check_deterministic=False
            )

        def ekfac():
            return EKFACLinearOperator(
                model, loss, params, data, fisher_type="type-2", check_deterministic=False
            )

        # The peer computes its factors lazily, in the first product: time construction
        # together with one product so that the factors are really computed.
        K = kfac()
        out["kfac_v"] = (K @ v).numpy()
        out["t_kfac_build"] = timed(lambda: kfac() @ v, max(1, repeats // 2))
        out["t_kfac_matvec"] = timed(lambda: K @ v, repeats)
        E = ekfac()
        out["ekfac_v"] = (E @ v).numpy()
        out["t_ekfac_build"] = timed(lambda: ekfac() @ v, max(1, repeats // 2))
    np.savez(dst, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
