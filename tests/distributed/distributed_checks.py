"""What a distributed run must reproduce: every operator against its single-process twin.

:func:`run_checks` runs on every rank of a communicator (MPI, torch.distributed, or the
threads of :mod:`thread_ranks`). Each rank holds a shard of one data set (split unevenly, and
with a rank that holds no batch at all) and builds the distributed operators; the
references are the same operators built in the same process on the whole data set
with one process (``comm=None``), which the library computes without any
communication. Monte-Carlo operators are checked against the sum over ranks of
single-process operators on each shard that draw as that rank does (:class:`AsRank`),
and their draws against rank 0's (distinct per rank).

The result is ``{check name: relative error}`` (``max |a - b| / max |b|``) plus, under
``"digests"``, a hash of each distributed result's bits, which the launcher compares
across ranks (every rank must hold the same numbers). Failures of a rank (a bad batch on
one rank) are checked to raise on every rank; their outcome is recorded as an error of 0
(as expected) or 1.

Only the tests import it (and the worker scripts run it).
"""

from __future__ import annotations

import hashlib

import numpy as np

import curvlinops as cl
from curvlinops import nn
from curvlinops.optim import KFAC, HessianFree, NaturalGradient

#: the batches of the data set (sizes differ) and how two ranks split them
BATCH_SIZES = (4, 1, 3, 5)
SPLITS = {"uneven": ((0,), (1, 2, 3)), "rank 0 empty": ((), (0, 1, 2, 3))}
EXACT = (
    cl.GGNLinearOperator,
    cl.HessianLinearOperator,
    cl.GGNResidualLinearOperator,
    cl.FisherLinearOperator,
    cl.EFLinearOperator,
)


class AsRank(cl.SingleProcess):
    """One process that draws Monte-Carlo samples as rank ``rank`` of a run does."""

    def __init__(self, rank):
        super().__init__()
        self.rank = rank


class Problem:
    """A tanh MLP with cross-entropy on 13 data points in 4 batches, on one backend."""

    def __init__(self, convert, xp, dtype, device):
        rng = np.random.default_rng(0)
        N = sum(BATCH_SIZES)
        X, y = rng.normal(size=(N, 3)), rng.integers(0, 3, size=N)
        edges = np.cumsum((0,) + BATCH_SIZES)
        self.batches = [
            (convert(X[a:b]), convert(y[a:b])) for a, b in zip(edges[:-1], edges[1:], strict=True)
        ]
        self.model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
        self.params = self.model.init(0, xp=xp, dtype=dtype, device=device)
        self.loss = cl.CrossEntropyLoss()
        self.P = sum(int(np.prod(p.shape)) for p in self.params)
        self.V = convert(rng.normal(size=(self.P, 3)))
        self.U = convert(rng.normal(size=(N * 3, 2)))
        self.convert = convert
        self._references = {}

    def reference(self, cls, **options):
        """``cls`` on the whole data set with one process (built once per options)."""
        key = (cls, tuple(sorted(options.items())))
        if key not in self._references:
            self._references[key] = cls(
                self.model,
                self.loss,
                self.params,
                self.batches,
                check_deterministic=False,
                **options,
            )
        return self._references[key]

    def shard(self, split, rank):
        return [self.batches[i] for i in SPLITS[split][rank]]

    def concatenated(self, split, rank, xp):
        """This rank's shard as one batch (what an optimizer step takes)."""
        parts = self.shard(split, rank)
        return xp.concat([X for X, _ in parts]), xp.concat([y for _, y in parts])


def _np(a):
    return np.asarray(cl.to_numpy(a), dtype=np.float64)


class Recorder:
    """Relative errors and digests of the checks of one rank."""

    def __init__(self):
        self.errors, self.digests = {}, {}

    def compare(self, name, got, expected):
        got, expected = _np(got), _np(expected)
        if got.shape != expected.shape:
            self.errors[name] = float("inf")
            return
        scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-300)
        self.errors[name] = float(np.max(np.abs(got - expected), initial=0.0)) / scale
        self.digests[name] = hashlib.sha256(np.ascontiguousarray(got).tobytes()).hexdigest()

    def expect(self, name, ok):
        self.errors[name] = 0.0 if ok else 1.0


def run_checks(comm, convert, xp, dtype, device=None, *, quick=False):
    """All checks on this rank of ``comm`` (2 ranks); returns ``{"errors", "digests"}``.

    ``convert`` maps NumPy arrays to the backend ``xp`` (floats to ``dtype``, on
    ``device``). ``quick``: products of the exact operators, K-FAC, the tap diagonals,
    CG and the failure checks only (for the slower backends).
    """
    pb = Problem(convert, xp, dtype, device)
    rec = Recorder()
    _exact_products(comm, pb, rec)
    _kronecker(comm, pb, rec, quick, xp)
    _diagonals(comm, pb, rec, quick)
    _solvers(comm, pb, rec, quick)
    if not quick:
        _monte_carlo(comm, pb, rec)
        _optimizers(comm, pb, rec, xp)
        _one_allreduce_per_product(comm, pb, rec)
    _failures(comm, pb, rec, convert)
    return {"errors": rec.errors, "digests": rec.digests}


def _exact_products(comm, pb, rec):
    m, loss, params = pb.model, pb.loss, pb.params
    for split in SPLITS:
        shard = pb.shard(split, comm.rank)
        for cls in EXACT:
            D = cls(m, loss, params, shard, comm=comm)
            rec.compare(f"{cls.__name__} product ({split})", D @ pb.V, pb.reference(cls) @ pb.V)
            rec.compare(
                f"{cls.__name__} quadratic form ({split})",
                D.quadratic_form(pb.V),
                pb.reference(cls).quadratic_form(pb.V),
            )
        (g, value) = D.gradient_and_loss()  # of the last one, EF
        (g_ref, value_ref) = pb.reference(cls).gradient_and_loss()
        for i, (a, b) in enumerate(zip(g, g_ref, strict=True)):
            rec.compare(f"gradient {i} ({split})", a, b)
        rec.compare(f"loss ({split})", value, value_ref)
        J = cl.JacobianLinearOperator(m, loss, params, shard, comm=comm)
        J_ref = pb.reference(cl.JacobianLinearOperator)
        rec.compare(f"Jacobian product ({split})", J @ pb.V, J_ref @ pb.V)
        rec.compare(f"transposed Jacobian product ({split})", J.T @ pb.U, J_ref.T @ pb.U)
        T = cl.TransposedJacobianLinearOperator(m, loss, params, shard, comm=comm)
        rec.compare(f"TransposedJacobianLinearOperator ({split})", T @ pb.U, J_ref.T @ pb.U)


def _kronecker(comm, pb, rec, quick, xp):
    m, loss, params = pb.model, pb.loss, pb.params
    kinds = [
        (cl.KFACLinearOperator, {"fisher_type": "type-2"}),
        (cl.KFACLinearOperator, {"fisher_type": "empirical", "separate_weight_and_bias": False}),
        (cl.KFACLinearOperator, {"fisher_type": "forward-only"}),
        (cl.EKFACLinearOperator, {}),
        (cl.KFACHessianLinearOperator, {}),
    ]
    for split in SPLITS:
        shard = pb.shard(split, comm.rank)
        for cls, options in kinds[:1] if quick else kinds:
            D = cls(m, loss, params, shard, comm=comm, **options)
            S = pb.reference(cls, **options)
            name = f"{cls.__name__} {options.get('fisher_type', '')} ({split})"
            rec.compare(f"{name} dense", D.to_dense(), S.to_dense())
            rec.compare(f"{name} product", D @ pb.V, S @ pb.V)
            for layer in getattr(D, "input_factors", {}):
                rec.compare(f"{name} A {layer}", D.input_factors[layer], S.input_factors[layer])
                rec.compare(f"{name} B {layer}", D.output_factors[layer], S.output_factors[layer])
    if quick:
        return
    # update with each rank's shard of a batch (here: the uneven split of the data set)
    for cls in (cl.KFACLinearOperator, cl.EKFACLinearOperator):
        D = cls(m, loss, params, pb.shard("uneven", comm.rank), comm=comm)
        S = cls(m, loss, params, pb.batches, check_deterministic=False)
        batch = pb.batches[1 + comm.rank]  # this rank's shard of the update's batch
        whole = tuple(xp.concat([pb.batches[1][k], pb.batches[2][k]]) for k in (0, 1))
        D.update(batch, decay=0.5)
        S.update(whole, decay=0.5)
        rec.compare(f"{cls.__name__}.update", D.to_dense(), S.to_dense())


def _diagonals(comm, pb, rec, quick):
    m, loss, params = pb.model, pb.loss, pb.params
    kinds = [cl.GGNDiagonalLinearOperator, cl.EFDiagonalLinearOperator]
    if not quick:
        kinds.append(cl.HessianDiagonalLinearOperator)
    for split in SPLITS:
        shard = pb.shard(split, comm.rank)
        for cls in kinds:
            D = cls(m, loss, params, shard, comm=comm)
            rec.compare(f"{cls.__name__} ({split})", D.diagonal(), pb.reference(cls).diagonal())


def _solvers(comm, pb, rec, quick):
    m, loss, params = pb.model, pb.loss, pb.params
    S = pb.reference(cl.GGNLinearOperator)
    b = pb.V[:, 0]
    # well conditioned (damping 1): the solutions agree as closely as the products
    x_ref, _ = cl.cg(S, b, damping=1.0, rtol=1e-10)
    for split in list(SPLITS)[: 1 if quick else None]:
        G = cl.GGNLinearOperator(m, loss, params, pb.shard(split, comm.rank), comm=comm)
        x, _ = cl.cg(G, b, damping=1.0, rtol=1e-10)
        rec.compare(f"cg ({split})", x, x_ref)
        if quick:
            continue
        H = cl.HessianLinearOperator(m, loss, params, pb.shard(split, comm.rank), comm=comm)
        H_ref = pb.reference(cl.HessianLinearOperator)
        x, _ = cl.minres(H, b, damping=1.0, rtol=1e-10)
        x_ref_h, _ = cl.minres(H_ref, b, damping=1.0, rtol=1e-10)
        rec.compare(f"minres ({split})", x, x_ref_h)
        values, _ = cl.eigsh(G, k=3, seed=1)
        values_ref, _ = cl.eigsh(S, k=3, seed=1)
        rec.compare(f"eigsh ({split})", values, values_ref)
        rec.compare(
            f"hutchinson_trace ({split})",
            cl.hutchinson_trace(G, 8, seed=3),
            cl.hutchinson_trace(S, 8, seed=3),
        )
        grid, density = cl.spectral_density(G, num_probes=2, lanczos_steps=10, seed=4)
        grid_ref, density_ref = cl.spectral_density(S, num_probes=2, lanczos_steps=10, seed=4)
        rec.compare(f"spectral_density ({split})", density, density_ref)
        blocks = cl.block_diagonal(G).to_dense()
        rec.compare(f"block_diagonal ({split})", blocks, cl.block_diagonal(S).to_dense())


def _monte_carlo(comm, pb, rec):
    """MC operators: the sum over ranks of per-shard operators drawing as that rank."""
    m, loss, params = pb.model, pb.loss, pb.params
    N = sum(BATCH_SIZES)
    split = "uneven"
    shards = [pb.shard(split, r) for r in range(2)]
    mine = shards[comm.rank]

    def per_rank(make):
        return [make(shards[r], AsRank(r)) for r in range(2)]

    F = cl.FisherLinearOperator(m, loss, params, mine, mc_samples=2, seed=5, comm=comm)
    parts = per_rank(
        lambda s, c: cl.FisherLinearOperator(
            m, loss, params, s, mc_samples=2, seed=5, num_data=N, comm=c
        )
    )
    rec.compare("MC Fisher product", F @ pb.V, parts[0] @ pb.V + parts[1] @ pb.V)
    D = cl.GGNDiagonalLinearOperator(m, loss, params, mine, mc_samples=3, seed=6, comm=comm)
    parts = per_rank(
        lambda s, c: cl.GGNDiagonalLinearOperator(
            m, loss, params, s, mc_samples=3, seed=6, num_data=N, comm=c
        )
    )
    rec.compare("MC GGN diagonal", D.diagonal(), parts[0].diagonal() + parts[1].diagonal())
    K = cl.KFACLinearOperator(m, loss, params, mine, fisher_type="mc", seed=7, comm=comm)
    parts = per_rank(
        lambda s, c: cl.KFACLinearOperator(
            m, loss, params, s, fisher_type="mc", seed=7, num_data=N, comm=c
        )
    )
    for name in K.output_factors:
        summed = parts[0].output_factors[name] + parts[1].output_factors[name]
        rec.compare(f"MC K-FAC output factor {name}", K.output_factors[name], summed)
    # rank 1 draws differently from rank 0 on the same batch; rank 0 as one process does
    same = [pb.batches[0]]
    draws = [
        cl.FisherLinearOperator(m, loss, params, same, mc_samples=1, seed=5, comm=AsRank(r))
        for r in range(2)
    ]
    plain = cl.FisherLinearOperator(m, loss, params, same, mc_samples=1, seed=5)
    rec.expect(
        "MC draws differ per rank", not np.allclose(_np(draws[0] @ pb.V), _np(draws[1] @ pb.V))
    )
    rec.compare("MC draws of rank 0 are the single-process ones", draws[0] @ pb.V, plain @ pb.V)


def _optimizers(comm, pb, rec, xp):
    """One step of each optimizer on this rank's shard of the batch = on the whole batch."""
    m, loss, params = pb.model, pb.loss, pb.params
    mine = pb.concatenated("uneven", comm.rank, xp)
    whole = (xp.concat([X for X, _ in pb.batches]), xp.concat([y for _, y in pb.batches]))
    cases = {
        "HessianFree": lambda c: HessianFree(m, loss, damping=1.0, rtol=1e-8, comm=c),
        "HessianFree preconditioned": lambda c: HessianFree(
            m, loss, damping=1.0, preconditioner="ggn", comm=c
        ),
        "KFAC": lambda c: KFAC(m, loss, damping=1.0, inverse_every=1, comm=c),
        "NaturalGradient": lambda c: NaturalGradient(m, loss, damping=0.1, rtol=1e-13, comm=c),
    }
    for name, make in cases.items():
        results = []
        for comm_, batch in ((comm, mine), (None, whole)):
            opt = make(comm_)
            p, state = params, opt.init(params, batch)
            for _ in range(2):
                p, state = opt.step(p, state, batch)
            results.append(p)
        for i, (a, b) in enumerate(zip(*results, strict=True)):
            rec.compare(f"{name} two steps, parameter {i}", a, b)


def _one_allreduce_per_product(comm, pb, rec):
    G = cl.GGNLinearOperator(pb.model, pb.loss, pb.params, pb.shard("uneven", comm.rank), comm=comm)
    calls, sent = comm.allreduce_calls, comm.allreduce_bytes
    G @ pb.V
    itemsize = 8 if "64" in str(pb.V.dtype) else 4
    rec.expect("one all-reduce per product", comm.allreduce_calls - calls == 1)
    rec.expect(
        "bytes per product: one (P, K) block and a flag",
        comm.allreduce_bytes - sent == (pb.P * 3 + 1) * itemsize,
    )


class _FailingLoader:
    """A data loader whose iteration raises (on the ranks that get one)."""

    def __iter__(self):
        raise OSError("the data file is unreadable")


def _failures(comm, pb, rec, convert):
    """A failure on one rank raises on every rank: its own error there, RemoteRankError
    (naming the rank) on the others; afterwards the ranks still work together."""
    m, loss, params = pb.model, pb.loss, pb.params
    X, y = pb.batches[0]
    bad = convert(np.array([0, 1, 2, 7]))  # label 7 of 3 classes, on rank 1 only
    shard = [(X, bad if comm.rank == 1 else y)]

    def outcome(fn):
        try:
            fn()
        except cl.RemoteRankError as err:
            return "remote", [r for r, _, _ in err.failures], str(err)
        except (ValueError, OSError) as err:
            return "own", type(err).__name__, str(err)
        return "none", None, ""

    def check(name, fn, failing_rank, error_type, computation="rank"):
        """``computation``: the words the other ranks' message starts with."""
        kind, detail, message = outcome(fn)
        if comm.rank == failing_rank:
            rec.expect(name, kind == "own" and detail == error_type)
        else:
            rec.expect(
                name,
                kind == "remote" and detail == [failing_rank] and computation in message,
            )

    check(
        "bad batch on rank 1: construction raises everywhere",
        lambda: cl.GGNLinearOperator(m, loss, params, shard, comm=comm),
        1,
        "ValueError",
    )
    G = cl.GGNLinearOperator(m, loss, params, shard, comm=comm, check_deterministic=False)
    check(
        "bad batch on rank 1: a product raises everywhere",
        lambda: G @ pb.V,
        1,
        "ValueError",
        "GGNLinearOperator product failed on rank 1 of",
    )
    check(
        "bad batch on rank 1: K-FAC raises everywhere",
        lambda: cl.KFACLinearOperator(m, loss, params, shard, comm=comm, check_deterministic=False),
        1,
        "ValueError",
        "KFACLinearOperator pass over the data failed on rank 1 of",
    )
    loader = _FailingLoader() if comm.rank == 0 else pb.batches
    check(
        "failing data loader on rank 0 raises everywhere",
        lambda: cl.EFLinearOperator(m, loss, params, loader, comm=comm),
        0,
        "OSError",
    )
    # the ranks are still in step: a product after the failures is right
    G = cl.GGNLinearOperator(m, loss, params, pb.shard("uneven", comm.rank), comm=comm)
    rec.compare("a product after the failures", G @ pb.V, pb.reference(cl.GGNLinearOperator) @ pb.V)
