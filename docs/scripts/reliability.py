"""How accurate is each operator in float32? Measured against the same operator in float64.

Writes ``docs/_generated/reliability_table.inc`` (included by ``docs/reliability.rst``;
the docs build runs this script, see ``docs/conf.py``): for a small MLP (tanh,
cross-entropy) on fixed random data, every operator is built twice, once with float64
parameters and data, once with the same values rounded to float32, and applied to the
same few vectors (rounded likewise). The table gives the relative error of the float32
result, ``max_k ||A32 v_k - A64 v_k|| / ||A64 v_k||`` for products, ``|a32 - a64| /
|a64|`` for scalars, and the same in units of float32's machine epsilon.

The error includes the rounding of the inputs (parameters, data, vectors) to float32,
which is what a user who trains in float32 gets. Run:
``python docs/scripts/reliability.py [--out PATH] [--quick]`` (``--quick`` builds a
smaller problem; the full table takes a few seconds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "_generated" / "reliability_table.inc"
EPS32 = float(np.finfo(np.float32).eps)
DAMPING = 1e-2  # of the inverses and solves; about 1 % of the GGN's mean eigenvalue here
SMALL_DAMPING = 1e-6  # ill-conditioned: shows how the error grows with the condition number
NUM_VECTORS = 4


def problem(dtype, quick):
    """``(model, loss, params, data)`` with float64 values rounded to ``dtype``."""
    import array_api_compat.numpy as xp

    import curvlinops as cl

    width, n = (6, 24) if quick else (12, 64)
    model = cl.nn.Sequential(cl.nn.Linear(5, width), cl.nn.Tanh(), cl.nn.Linear(width, 3))
    params = [p.astype(dtype) for p in model.init(0, xp=xp, dtype=xp.float64)]
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(n, 5)).astype(dtype), rng.integers(0, 3, size=n)
    half = n // 2
    data = [(X[:half], y[:half]), (X[half:], y[half:])]
    return model, cl.CrossEntropyLoss(), params, data


def _curvature(name):
    """A function ``(model, loss, params, data) -> operator`` for each curvature operator."""
    import curvlinops as cl

    kw = dict(check_deterministic=False)

    def kfac(fisher_type):
        return lambda *a: cl.KFACLinearOperator(*a, fisher_type=fisher_type, seed=0, **kw)

    builders = {
        "GGN": lambda *a: cl.GGNLinearOperator(*a, **kw),
        "Hessian": lambda *a: cl.HessianLinearOperator(*a, **kw),
        "GGN residual H - G": lambda *a: cl.GGNResidualLinearOperator(*a, **kw),
        "empirical Fisher": lambda *a: cl.EFLinearOperator(*a, **kw),
        "Fisher (exact)": lambda *a: cl.FisherLinearOperator(*a, **kw),
        "Fisher (MC, 8 samples)": lambda *a: cl.FisherLinearOperator(
            *a, mc_samples=8, seed=0, **kw
        ),
        "K-FAC type-2": kfac("type-2"),
        "K-FAC MC": kfac("mc"),
        "K-FAC empirical": kfac("empirical"),
        "K-FAC forward-only": kfac("forward-only"),
        "EKFAC": lambda *a: cl.EKFACLinearOperator(*a, **kw),
        "K-FAC Hessian": lambda *a: cl.KFACHessianLinearOperator(*a, **kw),
        "GGN diagonal": lambda *a: cl.GGNDiagonalLinearOperator(*a, **kw),
        "EF diagonal": lambda *a: cl.EFDiagonalLinearOperator(*a, **kw),
        "Hessian diagonal": lambda *a: cl.HessianDiagonalLinearOperator(*a, **kw),
    }
    return builders[name]


#: rows of the table: (operator, what is compared, how to compute it from the problem)
ROWS = [
    *[
        (name, "product", (name, "product"))
        for name in (
            "GGN",
            "Hessian",
            "GGN residual H - G",
            "empirical Fisher",
            "Fisher (exact)",
            "Fisher (MC, 8 samples)",
            "K-FAC type-2",
            "K-FAC MC",
            "K-FAC empirical",
            "K-FAC forward-only",
            "EKFAC",
            "K-FAC Hessian",
            "GGN diagonal",
            "EF diagonal",
            "Hessian diagonal",
        )
    ],
    ("block-diagonal GGN (per layer)", "product", ("GGN", "block")),
    ("Jacobian", "product", ("Jacobian", "product")),
    ("K-FAC type-2", f"inverse (damping {DAMPING:g})", ("K-FAC type-2", "inverse")),
    ("EKFAC", f"inverse (damping {DAMPING:g})", ("EKFAC", "inverse")),
    ("GGN diagonal", f"inverse (damping {DAMPING:g})", ("GGN diagonal", "inverse")),
    ("block-diagonal GGN", f"inverse (damping {DAMPING:g})", ("GGN", "block inverse")),
    ("K-FAC type-2", f"inverse (damping {SMALL_DAMPING:g})", ("K-FAC type-2", "small inverse")),
    ("block-diagonal GGN", f"inverse (damping {SMALL_DAMPING:g})", ("GGN", "small inverse")),
    ("K-FAC type-2", "logdet", ("K-FAC type-2", "logdet")),
    ("K-FAC type-2", "trace", ("K-FAC type-2", "trace")),
    ("EKFAC", "logdet", ("EKFAC", "logdet")),
    ("GGN", "trace (Hutchinson, 32 vectors)", ("GGN", "hutchinson")),
    ("GGN", f"CG solve (damping {DAMPING:g}, rtol 1e-6)", ("GGN", "cg")),
    ("GGN", "top-4 eigenvalues (Lanczos)", ("GGN", "eigsh")),
    ("GGN", "rank-4 approximation (Lanczos), product", ("GGN", "low rank")),
    (
        "GGN",
        "diagonal + rank-4 (Nystrom), product",
        ("GGN", "diagonal plus low rank"),
    ),
]


def measure(key, problem_, vectors):
    """The result of ``key`` on one problem: an array (products) or a float (scalars)."""
    import curvlinops as cl

    name, what = key
    if name == "Jacobian":
        return cl.JacobianLinearOperator(*problem_, check_deterministic=False) @ vectors
    A = _curvature(name)(*problem_)
    if what == "product":
        return A @ vectors
    if what == "block":
        return cl.block_diagonal(A) @ vectors
    if what == "inverse":
        return A.inverse(DAMPING) @ vectors
    if what == "block inverse":
        return cl.block_diagonal(A).inverse(DAMPING) @ vectors
    if what == "small inverse":
        A = cl.block_diagonal(A) if name == "GGN" else A
        return A.inverse(SMALL_DAMPING) @ vectors
    if what == "logdet":
        return float(A.damped(DAMPING).logdet())
    if what == "trace":
        return float(A.trace())
    if what == "hutchinson":
        return float(cl.hutchinson_trace(A, 32, seed=0))
    if what == "cg":
        return cl.cg(A, vectors, damping=DAMPING, rtol=1e-6)[0]
    if what == "eigsh":
        return np.sort(np.asarray(cl.eigsh(A, 4, seed=0)[0]))
    if what == "low rank":
        return cl.low_rank(A, 4, method="lanczos", seed=0) @ vectors
    if what == "diagonal plus low rank":
        diagonal = _curvature("GGN diagonal")(*problem_).diagonal()
        return cl.diagonal_plus_low_rank(A, 4, diagonal=diagonal, seed=0) @ vectors
    raise ValueError(f"unknown measurement {key}")


def relative_error(approx, exact) -> float:
    """``max_k ||a_k - e_k|| / ||e_k||`` over the columns (a scalar's ``|a - e| / |e|``).

    Examples
    --------
    >>> relative_error(np.array([[1.0, 0.0], [0.0, 2.2]]), np.array([[1.0, 0.0], [0.0, 2.0]]))
    0.10000000000000009
    >>> relative_error(1.5, 2.0)
    0.25
    """
    a = np.asarray(approx, dtype=np.float64)
    e = np.asarray(exact, dtype=np.float64)
    if e.ndim == 0:
        return float(abs(a - e) / abs(e))
    if e.ndim == 1:
        a, e = a[:, None], e[:, None]
    return float(np.max(np.linalg.norm(a - e, axis=0) / np.linalg.norm(e, axis=0)))


def table(quick=False):
    """``[(operator, what, relative error of float32)]`` in the order of :data:`ROWS`.

    The error is a float, or the :class:`~curvlinops.FactorizationError` that float32
    raised where float64 succeeded.
    """
    import curvlinops as cl

    problems = {dtype: problem(dtype, quick) for dtype in (np.float64, np.float32)}
    P = sum(p.size for p in problems[np.float64][2])
    v = np.random.default_rng(2).normal(size=(P, NUM_VECTORS))
    rows = []
    for operator, what, key in ROWS:
        exact = measure(key, problems[np.float64], v)
        try:
            error = relative_error(measure(key, problems[np.float32], v.astype(np.float32)), exact)
        except cl.FactorizationError as refusal:
            # float32 cannot tell the smallest damped eigenvalue from zero: the library
            # refuses instead of returning a meaningless inverse
            error = refusal
        rows.append((operator, what, error))
    return rows


def _cells(error):
    if isinstance(error, Exception):
        return f"refused: {type(error).__name__}", "n/a"  # ("-" would be a bullet)
    return f"{error:.1e}", f"{error / EPS32:.1f}"


def render(rows, quick=False) -> str:
    """The rows as an rst table, with the problem described above it."""
    header = ("operator", "compared", "relative error", "in float32 eps")
    body = [(op, what, *_cells(err)) for op, what, err in rows]
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(4)]
    rule = "  ".join("=" * w for w in widths)

    def line(r):
        return "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()

    size = "6 hidden units, 24 data" if quick else "12 hidden units, 64 data"
    intro = (
        f"MLP 5-{size.split()[0]}-3 (tanh), cross-entropy, {size.split(',')[1].strip()} "
        f"in two batches; {NUM_VECTORS} random vectors; float32 eps = {EPS32:.2e}. "
        "Measured by ``docs/scripts/reliability.py`` when the documentation was built."
    )
    return "\n".join([intro, "", rule, line(header), rule, *map(line, body), rule, ""])


# -- the errors section: each message as the library raises it ---------------------


def _mlp_problem():
    import array_api_compat.numpy as xp

    import curvlinops as cl

    model = cl.nn.Sequential(cl.nn.Linear(3, 4), cl.nn.Tanh(), cl.nn.Linear(4, 3))
    params = model.init(0, xp=xp, dtype=xp.float64)
    X = np.random.default_rng(0).normal(size=(8, 3))
    return model, params, X, np.array([0, 1, 2, 1, 0, 1, 2, 0])


class _Shuffling:
    """A data loader that reshuffles on every pass (what the determinism check catches)."""

    def __init__(self, X, y):
        self.X, self.y, self.rng = X, y, np.random.default_rng(0)

    def __iter__(self):
        order = self.rng.permutation(len(self.y))
        yield self.X[order], self.y[order]


def _error_cases():
    """``{key: function}``: each function raises (or warns) the error of its key."""
    import curvlinops as cl
    from curvlinops.frontends import CallableModel

    model, params, X, y = _mlp_problem()
    ce = cl.CrossEntropyLoss()
    kw = dict(num_data=8, check_deterministic=False)

    def product(loss, data, model=model, params=params):
        A = cl.GGNLinearOperator(model, loss, params, data, **kw)
        return A @ np.ones(A.shape[1], dtype=params[0].dtype)

    def overflow():
        linear = cl.nn.Sequential(cl.nn.Linear(3, 2))
        big = [np.full((2, 3), 60.0, dtype=np.float32), np.zeros(2, dtype=np.float32)]
        data = [(np.ones((8, 3), dtype=np.float32), np.ones((8, 2), dtype=np.float32))]
        with np.errstate(over="ignore"):
            product(cl.PoissonNLLLoss(), data, linear, big)

    def nonfinite():  # the user's model returns NaN for one datum
        X_nan = X.copy()
        X_nan[5, 0] = np.nan
        product(ce, [(X[:4], y[:4]), (X_nan[4:], y[4:])], _linear_callable(), _W)

    linear_only = CallableModel(
        forward=lambda p, x: x @ p[0].T,
        jvp=lambda p, x, V: np.einsum("ni,oik->nok", x, V[0]),
        vjp=lambda p, x, U: [np.einsum("nok,ni->oik", U, x)],
    )
    G = cl.GGNLinearOperator(model, ce, params, [(X, y)])
    layer_norm = cl.nn.Sequential(cl.nn.Linear(3, 4), cl.nn.LayerNorm(4), cl.nn.Linear(4, 3))
    return {
        "label": lambda: product(ce, [(X[:4], y[:4]), (X[4:], np.array([0, 7, 1, 2]))]),
        "support": lambda: product(cl.PoissonNLLLoss(), [(X, -np.ones((8, 3)))]),
        "nonfinite": nonfinite,
        "overflow": overflow,
        "dtype": lambda: product(ce, [(X.astype(np.float32), y)]),
        "device": _device_mismatch,
        "empty": lambda: product(ce, []),
        "list": lambda: G @ [1.0] * G.shape[1],
        "complex": lambda: G @ (np.ones(G.shape[1]) + 1j),
        "nondeterministic": lambda: cl.GGNLinearOperator(model, ce, params, _Shuffling(X, y)),
        "tier": lambda: cl.HessianLinearOperator(linear_only, ce, [np.ones((3, 3))], [(X, y)]),
        "layer_rule": lambda: cl.KFACHessianLinearOperator(
            layer_norm, ce, layer_norm.init(0, xp=_xp(), dtype=np.float64), [(X, y)]
        ),
        "ill_conditioned": lambda: cl.KFACLinearOperator(model, ce, params, [(X, y)]).inverse(0.0),
        "factorization": lambda: cl.DenseLinearOperator(np.diag([1.0, np.nan])).inverse(),
        "convergence": lambda: cl.CGInverseLinearOperator(G, maxiter=1, strict=True) @ _ones(G),
        "convergence_warning": lambda: cl.CGInverseLinearOperator(G, maxiter=1) @ _ones(G),
        "assumption": lambda: cl.cg(cl.aslinearoperator(np.diag([1.0, 2.0])), np.ones(2)),
        "verification": _wrong_adjoint,
        "product_shape": _wrong_vjp_count,
    }


_W = [np.eye(3)]


def _xp():
    import array_api_compat.numpy as xp

    return xp


def _ones(A):
    return np.ones(A.shape[1])


def _linear_callable(scale=1.0):
    from curvlinops.frontends import CallableModel

    return CallableModel(
        forward=lambda p, x: x @ p[0].T,
        jvp=lambda p, x, V: np.einsum("ni,oik->nok", x, V[0]),
        vjp=lambda p, x, U: [scale * np.einsum("nok,ni->oik", U, x)],
        name="MyModel",
    )


def _wrong_adjoint():
    model = _linear_callable(scale=1.01)  # a vjp that is not the jvp's adjoint
    model._verify([np.eye(3)], np.random.default_rng(0).normal(size=(4, 3)))


def _wrong_vjp_count():
    from curvlinops.frontends import CallableModel

    model = CallableModel(  # a vjp that forgets the bias's gradient
        forward=lambda p, x: x @ p[0].T + p[1],
        jvp=lambda p, x, V: np.einsum("ni,oik->nok", x, V[0]) + V[1][None],
        vjp=lambda p, x, U: [np.einsum("nok,ni->oik", U, x)],
        name="MyModel",
    )
    model.linearize([np.eye(3), np.zeros(3)], np.ones((4, 3))).vjp(np.ones((4, 3)))


def _device_mismatch():
    import torch

    import curvlinops as cl

    module = torch.nn.Linear(3, 3).to("meta")  # parameters on another device than the data
    data = [(torch.ones(8, 3), torch.zeros(8, dtype=torch.long))]
    cl.GGNLinearOperator(module, torch.nn.CrossEntropyLoss(), list(module.parameters()), data)


def error_messages():
    """``{key: (class name, message)}`` of every case of :func:`_error_cases`."""
    import warnings

    messages = {}
    for key, case in _error_cases().items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning is raised, so its message is caught
            try:
                case()
            except Exception as error:  # noqa: BLE001 - every error is what we collect
                messages[key] = (type(error).__name__, str(error))
                continue
        raise AssertionError(f"the error case {key!r} raised nothing")
    return messages


def write_error_messages(folder: Path) -> None:
    """One ``<key>.inc`` per case: the class and message as a literal block."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, (name, message) in error_messages().items():
        body = "\n".join("   " + line for line in f"{name}: {message}".splitlines())
        (folder / f"{key}.inc").write_text(f".. code-block:: text\n\n{body}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(table(args.quick), args.quick))
    write_error_messages(args.out.parent / "errors")
    return args.out


if __name__ == "__main__":
    print(main())
