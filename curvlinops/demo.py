"""The demo: curvature of a small MLP on scikit-learn's digits, end to end.

``python -m curvlinops demo`` trains a small MLP for a few Hessian-free steps
(:class:`curvlinops.optim.HessianFree`: damped Gauss-Newton, solved by CG on the GGN,
Levenberg-Marquardt damping), then prints what a user of the
library looks at: loss and gradient norm, the top Hessian and GGN eigenvalues, exact
and estimated traces, the F = G check, a natural-gradient CG solve, and the time of
each curvature product relative to one loss+gradient. When matplotlib is installed it
also draws the training curve and the Hessian's spectral density (stochastic Lanczos
quadrature) into a PNG file and prints its path.

An application on top of every layer of curvlinops. Needs the ``demo`` extra
(scikit-learn for the bundled digits data set, tqdm for the progress bar, matplotlib
for the figure).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

__all__ = ["main", "run_demo"]


def _namespace(backend: str):
    if backend == "numpy":
        import array_api_compat.numpy as xp

        return xp, "cpu"
    if backend == "torch":
        import array_api_compat.torch as xp
        import torch

        return xp, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "cupy":
        import array_api_compat.cupy as xp
        import cupy

        if not cupy.cuda.is_available():
            raise SystemExit("--backend cupy needs a CUDA GPU; none is available.")
        return xp, cupy.cuda.Device(0)
    raise SystemExit(f"Unknown backend {backend!r}; choose numpy, torch or cupy.")


def _load_digits(num_data: int, batch_size: int, xp, device, dtype):
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise SystemExit(
            "The demo needs scikit-learn's bundled digits: pip install 'curvlinops[demo]'."
        ) from err
    X, y = load_digits(return_X_y=True)
    X = (X - X.mean(0)) / (X.std(0) + 1e-8)
    X, y = X[:num_data], y[:num_data]
    batches = []
    for start in range(0, X.shape[0], batch_size):
        Xb = xp.asarray(X[start : start + batch_size], dtype=dtype, device=device)
        yb = xp.asarray(y[start : start + batch_size], dtype=xp.int64, device=device)
        batches.append((Xb, yb))
    return batches, X.shape[1]


def _timed(fn, repeats=3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _exact_trace(A, xp, chunk=256):
    """Trace from unit vectors in chunks of columns (reference for the estimators)."""
    n, total = A.shape[0], 0.0
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        E = xp.eye(n, k, k=-start, dtype=A.dtype, device=A.device)
        total += float(xp.sum(xp.linalg.diagonal(E.T @ A.matmat(E))))
    return total


def run_demo(
    *,
    num_data=1000,
    width=32,
    batch_size=250,
    steps=5,
    damping=1e-3,
    backend="numpy",
    seed=0,
    progress=True,
    out=print,
    figure=None,
):
    """Run the demo and print its report; returns the report rows as a dict.

    ``figure`` is the path of a PNG to draw the training curve and the Hessian's
    spectral density into (needs matplotlib; None draws nothing).
    """
    import curvlinops as cl

    xp, device = _namespace(backend)
    dtype = xp.float64
    data, num_features = _load_digits(num_data, batch_size, xp, device, dtype)
    model = cl.nn.Sequential(
        cl.nn.Linear(num_features, width), cl.nn.Tanh(), cl.nn.Linear(width, 10)
    )
    params = model.init(seed, xp=xp, dtype=dtype, device=device)
    loss = cl.CrossEntropyLoss()
    shapes = cl.param_shapes(params)
    out(
        f"curvlinops demo: MLP {num_features}-{width}-10 (tanh), {num_data} digits, "
        f"{sum(int(np.prod(s)) for s in shapes)} parameters, backend {backend}"
    )

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps + 7, desc="demo", leave=False)
        except ImportError:
            bar = None

    def tick(what):
        if bar is not None:
            bar.set_postfix_str(what)
            bar.update(1)

    # Hessian-free training (curvlinops.optim.HessianFree): damped Gauss-Newton steps
    # solved by CG on the GGN, warm-started, with Levenberg-Marquardt adaptation of the
    # damping; a step that does not lower the loss is rejected. Its steps are on one
    # batch, so the demo's batches are joined into one (the whole training set).
    from curvlinops.optim import HessianFree

    full = (xp.concat([X for X, _ in data]), xp.concat([y for _, y in data]))
    hf = HessianFree(model, loss, damping=1.0, max_iterations=50, rtol=1e-3)
    state = hf.init(params)
    history = []
    for step in range(steps):
        params, state = hf.step(params, state, full)
        history.append(state.loss)  # the loss before this step
        tick(f"step {step}: loss {state.loss:.4f}, CG iterations {state.cg_iterations}")
    rows = {}
    G = cl.GGNLinearOperator(model, loss, params, data, cache=True)
    H = cl.HessianLinearOperator(model, loss, params, data, cache=True)
    F = cl.FisherLinearOperator(model, loss, params, data, cache=True)
    grads, value = G.gradient_and_loss()
    g = cl.flatten_params(grads)
    history.append(float(value))
    rows["loss after training"] = float(value)
    rows["training accuracy"] = _accuracy(model, params, data, xp)
    rows["gradient norm"] = float(xp.linalg.vector_norm(g))
    tick("eigenvalues")
    rows["top Hessian eigenvalues"] = cl.to_numpy(cl.eigsh(H, k=3, which="LA", seed=seed)[0])
    rows["top GGN eigenvalues"] = cl.to_numpy(cl.eigsh(G, k=3, which="LA", seed=seed)[0])
    tick("traces")
    rows["GGN trace (exact)"] = _exact_trace(G, xp)
    rows["GGN trace (Hutch++, 60 products)"] = float(cl.hutchpp_trace(G, 60, seed=seed))
    rows["GGN trace (XTrace, 60 products)"] = float(cl.xtrace(G, 60, seed=seed))
    tick("F = G")
    V = cl.RandomGenerator(seed, xp, device).normal((G.shape[0], 4), dtype)
    GV, FV = G @ V, F @ V
    rows["F = G check: max |FV - GV| / max |GV|"] = float(
        xp.max(xp.abs(FV - GV)) / xp.max(xp.abs(GV))
    )
    tick("natural gradient")
    nat, info = cl.cg(F, g, damping=damping, rtol=1e-6, maxiter=500)
    rows["natural-gradient CG iterations"] = int(info.iterations)
    rows["natural-gradient CG relative residual"] = float(
        xp.linalg.vector_norm(F @ nat + damping * nat - g) / xp.linalg.vector_norm(g)
    )
    tick("timing")
    v = V[:, 0]
    G_plain = cl.GGNLinearOperator(model, loss, params, data, check_deterministic=False)
    t_grad = _timed(lambda: G_plain.gradient_and_loss())
    H_plain = cl.HessianLinearOperator(model, loss, params, data, check_deterministic=False)
    rows["GGN matvec / gradient"] = _timed(lambda: G_plain @ v) / t_grad
    rows["GGN matvec (cached forward) / gradient"] = _timed(lambda: G @ v) / t_grad
    rows["Hessian matvec / gradient"] = _timed(lambda: H_plain @ v) / t_grad
    rows["Hessian matvec (cached forward) / gradient"] = _timed(lambda: H @ v) / t_grad
    tick("spectral density")
    if figure is not None:
        grid, density = cl.spectral_density(H, num_probes=8, lanczos_steps=40, seed=seed)
        curves = {
            "loss history": np.asarray(history),
            "density grid": cl.to_numpy(grid),
            "density": cl.to_numpy(density),
        }
    tick("done")
    if bar is not None:
        bar.close()
    _print_table(rows, out)
    if figure is not None:
        path = _write_figure(figure, curves, rows["top Hessian eigenvalues"])
        out(f"figure: {path}" if path else _NO_MATPLOTLIB)
    return rows


_NO_MATPLOTLIB = "figure: not written, matplotlib is not installed (pip install 'curvlinops[demo]')"


def _write_figure(path, curves, top_eigenvalues):
    """Training curve and Hessian spectral density as a PNG; its absolute path, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    history = curves["loss history"]
    left.plot(range(len(history)), history, marker="o")
    left.set(
        xlabel="Hessian-free step",
        ylabel="cross-entropy (training)",
        title="Training",
        yscale="log",
    )
    grid, density = curves["density grid"], curves["density"]
    right.semilogy(grid, np.maximum(density, 1e-12), label="SLQ density")
    for value in top_eigenvalues:
        right.axvline(value, color="C3", linestyle=":", linewidth=1)
    right.set(
        xlabel="eigenvalue",
        ylabel="density",
        title="Hessian spectrum (dotted: top eigenvalues)",
        ylim=(max(float(density.max()) * 1e-8, 1e-12), float(density.max()) * 2),
    )
    right.legend()
    path = os.path.abspath(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _accuracy(model, params, data, xp):
    correct = sum(float(xp.sum(xp.argmax(model(params, X), axis=1) == y)) for X, y in data)
    return correct / sum(X.shape[0] for X, _ in data)


def _print_table(rows, out):
    width = max(len(k) for k in rows)
    out("-" * (width + 40))
    for key, value in rows.items():
        if isinstance(value, np.ndarray):
            text = ", ".join(f"{v:.4g}" for v in value[::-1])
        elif isinstance(value, float):
            text = f"{value:.4g}"
        else:
            text = str(value)
        out(f"{key:<{width}}  {text}")
    out("-" * (width + 40))


def main(argv=None):
    """Command line: ``python -m curvlinops demo [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m curvlinops",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="curvature of a small MLP on the digits data set",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--num-data", type=int, default=1000, help="data points (max 1797)")
    demo.add_argument("--width", type=int, default=32, help="hidden width of the MLP")
    demo.add_argument("--batch-size", type=int, default=250, help="batch size")
    demo.add_argument("--steps", type=int, default=5, help="Hessian-free training steps")
    demo.add_argument("--damping", type=float, default=1e-3, help="damping of the CG solves")
    demo.add_argument("--backend", choices=["numpy", "torch", "cupy"], default="numpy")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.add_argument(
        "--figure",
        default="curvlinops-demo.png",
        help="PNG file for the training curve and spectral density (default: %(default)s)",
    )
    demo.add_argument("--no-figure", action="store_true", help="draw no figure")
    args = parser.parse_args(argv)
    if args.num_data < 2 or args.width < 1 or args.batch_size < 1:
        parser.error("--num-data must be >= 2, --width and --batch-size >= 1")
    run_demo(
        num_data=args.num_data,
        width=args.width,
        batch_size=args.batch_size,
        steps=args.steps,
        damping=args.damping,
        backend=args.backend,
        seed=args.seed,
        progress=not args.no_progress,
        figure=None if args.no_figure else args.figure,
    )
    return 0


_DESCRIPTION = """\
Train a small MLP on scikit-learn's digits with Hessian-free steps (damped
Gauss-Newton, CG on the GGN), then report its curvature: the top Hessian and GGN
eigenvalues, exact and estimated traces, the F = G check, a natural-gradient solve
and the cost of each curvature product relative to one loss+gradient. With
matplotlib installed, the training curve and the Hessian's spectral density are
drawn into a PNG file whose path is printed.

Needs the demo extra: pip install "curvlinops[demo]"."""
