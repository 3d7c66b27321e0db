"""Peer script: laplace-torch 0.3 on an MLP (runs in the peer's own venv).

Usage: ``python laplace_torch.py inputs.npz results.npz [--serve]``.

Inputs: the weights of an MLP ``W0, b0, W1, b1, ...`` (tanh between the Linear layers),
training data ``X, y`` (one batch), test inputs ``X_test``, ``likelihood``
("classification" or "regression"), ``sigma_noise``, a per-layer ``prior`` (one value
per parameter tensor), a scalar ``prior_last`` for the last-layer cases and
``tune_steps`` (Adam steps of laplace-torch's marginal-likelihood
tuning). For every case ``<subset>_<structure>`` (subset "all" or "last_layer",
structure "full", "kron" or "diag") the script fits ``laplace.Laplace`` (default
backend, curvlinops-for-pytorch's GGN) and writes:

- ``<case>/precision``: the posterior precision as a dense matrix;
- ``<case>/log_marglik``: the log marginal likelihood at the per-layer ``prior``
  (``prior_last`` for the last layer, whose ``LLLaplace`` takes no per-layer prior) and
  ``<case>/log_marglik_scalar`` at the scalar ``prior[0]``;
- ``<case>/f_mean``, ``<case>/f_var``: the GLM predictive's moments at ``X_test``;
- ``<case>/probit`` (classification): ``la(X_test, pred_type="glm", link_approx="probit")``;
- ``<case>/tuned_scalar``, ``<case>/tuned_layerwise``: laplace-torch's tuned prior
  precision (``optimize_prior_precision(method="marglik")``, ``tune_steps`` Adam steps
  of learning rate 0.1 from 1; the last layer's only scalar).

With ``--serve`` it then times, on request, ``fit:<subset>:<structure>`` (building and
fitting the Laplace approximation) and ``predict:<subset>:<structure>`` (the GLM probit
predictive at ``X_test``), the way ``benchmarks/_peers.PeerSession`` asks.

Imports torch and NumPy at the top; laplace (with its own ``curvlinops``) inside the
functions.
"""

import json
import sys
import time

import numpy as np
import torch

CASES = [
    ("all", "full"),
    ("all", "kron"),
    ("all", "diag"),
    ("last_layer", "full"),
    ("last_layer", "kron"),
    ("last_layer", "diag"),
]


def build_mlp(arrays):
    count = len([k for k in arrays if k.startswith("W")])
    layers = []
    for i in range(count):
        W = arrays[f"W{i}"]
        layer = torch.nn.Linear(W.shape[1], W.shape[0]).double()
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(W))
            layer.bias.copy_(torch.as_tensor(arrays[f"b{i}"]))
        layers.append(layer)
        if i < count - 1:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def fit(arrays, subset, structure, prior):
    from laplace import Laplace

    likelihood = str(arrays["likelihood"])
    X, y = torch.as_tensor(arrays["X"]), torch.as_tensor(arrays["y"])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=len(X), shuffle=False
    )
    kwargs = {"sigma_noise": float(arrays["sigma_noise"])} if likelihood == "regression" else {}
    la = Laplace(
        build_mlp(arrays),
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_precision=prior,
        **kwargs,
    )
    la.fit(loader)
    return la


def dense_precision(la, structure):
    P = la.posterior_precision
    if structure == "kron":
        return P.to_matrix()
    if structure == "diag":
        return torch.diag(P)
    return P


def layer_prior(arrays, subset):
    """The per-layer prior of all weights; the scalar ``prior_last`` for the last layer
    (``LLLaplace`` takes no per-layer prior: its Kron variant refuses a diagonal, its
    others a per-layer one)."""
    if subset == "all":
        return torch.as_tensor(arrays["prior"])
    return float(arrays["prior_last"])


def case_results(arrays, subset, structure):
    la = fit(arrays, subset, structure, layer_prior(arrays, subset))
    key = f"{subset}_{structure}"
    X_test = torch.as_tensor(arrays["X_test"])
    out = {}
    out[f"{key}/precision"] = dense_precision(la, structure).detach().numpy()
    out[f"{key}/log_marglik"] = float(la.log_marginal_likelihood())
    scalar = torch.as_tensor([float(arrays["prior"][0])], dtype=torch.float64)
    out[f"{key}/log_marglik_scalar"] = float(la.log_marginal_likelihood(scalar))
    la.prior_precision = layer_prior(arrays, subset)
    f_mean, f_var = la._glm_predictive_distribution(X_test)
    out[f"{key}/f_mean"] = f_mean.detach().numpy()
    out[f"{key}/f_var"] = f_var.detach().numpy()
    if str(arrays["likelihood"]) == "classification":
        probit = la(X_test, pred_type="glm", link_approx="probit")
        out[f"{key}/probit"] = probit.detach().numpy()
    steps = int(arrays["tune_steps"])
    # LLLaplace has no layerwise prior
    for structure_name in ("scalar", "layerwise") if subset == "all" else ("scalar",):
        la.optimize_prior_precision(
            pred_type="glm",
            method="marglik",
            n_steps=steps,
            init_prior_prec=1.0,
            prior_structure=structure_name,
        )
        out[f"{key}/tuned_{structure_name}"] = la.prior_precision.detach().numpy()
    return out


def serve(arrays):
    """Answer ``<operation> <count>`` lines with the wall times of that many calls."""
    X_test = torch.as_tensor(arrays["X_test"])
    fitted = {}

    def operation(name):
        kind, subset, structure = name.split(":")
        p = layer_prior(arrays, subset)
        if kind == "fit":
            return lambda: fit(arrays, subset, structure, p)
        key = (subset, structure)
        if key not in fitted:
            fitted[key] = fit(arrays, subset, structure, p)
        la = fitted[key]
        return lambda: la(X_test, pred_type="glm", link_approx="probit")

    print("ready", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "quit":
            break
        fn, count = operation(parts[0]), int(parts[1])
        times = []
        for _ in range(count):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)


def main():
    src, dst = sys.argv[1], sys.argv[2]
    torch.set_default_dtype(torch.float64)
    with np.load(src) as data:
        arrays = {key: data[key] for key in data.files}
    results = {}
    for subset, structure in CASES:
        results.update(case_results(arrays, subset, structure))
    np.savez(dst, **results)
    if "--serve" in sys.argv[3:]:
        serve(arrays)


if __name__ == "__main__":
    main()
