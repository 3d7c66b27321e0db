"""The distributed code paths in one process: ranks as threads (:mod:`thread_ranks`).

The same checks as the ``mpirun`` and torch.distributed launches (:mod:`distributed_checks`: every
operator, K-FAC's factors, diagonals, solvers, optimizers and the failure of one rank,
against single-process references on the whole data set), on every array backend
(array-api-strict on a non-default device catches arrays made without ``device=``) and
in float32, plus the distributed Monte-Carlo diagonal checked in expectation. These run
in the README's bare environment too, where the launches skip.
"""

from __future__ import annotations

import numpy as np
import pytest
from distributed_checks import BATCH_SIZES, SPLITS, Problem, run_checks
from monte_carlo import assert_unbiased
from thread_ranks import run_ranks

import curvlinops as cl

#: float64: as close as the launches; float32: rounding of sums in another order
TOLERANCE = {"float64": 1e-12, "float32": 1e-4}


def _converter(backend, dtype):
    def convert(a):
        a = np.asarray(a)
        return backend.asarray(a) if a.dtype.kind in "iu" else backend.asarray(a, dtype=dtype)

    return convert


def _assert_all_close(results, tolerance, minimum):
    first, second = results
    assert first["errors"].keys() == second["errors"].keys()
    assert len(first["errors"]) >= minimum  # the checks ran (no vacuous pass)
    bad = [
        f"rank {rank}: {name}: {error:.3g}"
        for rank, run in enumerate(results)
        for name, error in run["errors"].items()
        if not error <= tolerance
    ]
    assert not bad, "\n".join(bad)
    assert first["digests"] == second["digests"], "the ranks hold different results"


def test_two_thread_ranks_match_one_process(backend):
    # NumPy runs every check; the other backends the ones whose buffers differ
    if backend.name == "jax":
        pytest.skip(
            "JAX compiles every operation for every batch shape (a minute for these "
            "checks); JAX buffers are covered in test_comm.py"
        )
    quick = backend.name != "numpy"
    convert = _converter(backend, "float64")
    results = run_ranks(
        2,
        lambda comm: run_checks(
            comm, convert, backend.xp, backend.dtype("float64"), backend.device, quick=quick
        ),
    )
    _assert_all_close(results, TOLERANCE["float64"], 40 if quick else 90)


def test_float32_thread_ranks_match_one_process(numpy_backend):
    convert = _converter(numpy_backend, "float32")
    xp = numpy_backend.xp
    results = run_ranks(2, lambda comm: run_checks(comm, convert, xp, xp.float32, quick=True))
    _assert_all_close(results, TOLERANCE["float32"], 40)


def test_distributed_monte_carlo_diagonal_is_unbiased(numpy_backend):
    # with 20 labels drawn per datum and rank, 200 draws see a 10 % scale error
    xp = numpy_backend.xp
    pb = Problem(_converter(numpy_backend, "float64"), xp, xp.float64, "cpu")
    exact = pb.reference(cl.GGNDiagonalLinearOperator).diagonal()  # Fisher = GGN here
    N = sum(BATCH_SIZES)

    def draws(comm):
        shard = pb.shard("uneven", comm.rank)
        return [
            cl.GGNDiagonalLinearOperator(
                pb.model,
                pb.loss,
                pb.params,
                shard,
                mc_samples=20,
                seed=seed,
                num_data=N,
                check_deterministic=False,
                comm=comm,
            ).diagonal()
            for seed in range(200)
        ]

    first, second = run_ranks(2, draws)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert_unbiased(np.stack(first), exact)


def test_splits_cover_an_uneven_split_and_an_empty_rank():
    # what the checks rely on: both splits hold every batch once, one rank nothing
    for ranks in SPLITS.values():
        assert sorted(ranks[0] + ranks[1]) == [0, 1, 2, 3]
    assert any(len(ranks[0]) != len(ranks[1]) for ranks in SPLITS.values())
    assert any(not ranks[0] or not ranks[1] for ranks in SPLITS.values())


@pytest.mark.parametrize("size", [3])
def test_three_ranks_two_empty(numpy_backend, size):
    # ranks 0 and 2 hold no batch: K-FAC's layout and the Hessian-K-FAC factors reach them
    xp = numpy_backend.xp
    pb = Problem(_converter(numpy_backend, "float64"), xp, xp.float64, "cpu")

    def work(comm):
        shard = pb.batches if comm.rank == 1 else []
        out = []
        for cls in (cl.KFACLinearOperator, cl.KFACHessianLinearOperator, cl.EKFACLinearOperator):
            out.append((cls(pb.model, pb.loss, pb.params, shard, comm=comm) @ pb.V, cls))
        return out

    for results in run_ranks(size, work):
        for got, cls in results:
            expected = pb.reference(cls) @ pb.V
            np.testing.assert_allclose(
                got, expected, rtol=1e-12, atol=1e-14 * np.abs(expected).max()
            )


def test_construction_refuses_no_data_anywhere_and_disagreeing_num_data(numpy_backend):
    xp = numpy_backend.xp
    pb = Problem(_converter(numpy_backend, "float64"), xp, xp.float64, "cpu")

    def build(comm, shard, **options):
        try:
            return cl.GGNLinearOperator(pb.model, pb.loss, pb.params, shard, comm=comm, **options)
        except ValueError as err:
            return err

    empty = run_ranks(2, lambda comm: build(comm, []))
    assert all("without batches on all 2 ranks" in str(err) for err in empty)
    differ = run_ranks(2, lambda comm: build(comm, pb.batches[:1], num_data=5 + comm.rank))
    assert all("different num_data (5, 6)" in str(err) for err in differ)
    given = run_ranks(2, lambda comm: build(comm, pb.shard("uneven", comm.rank), num_data=99))
    counted = run_ranks(2, lambda comm: build(comm, pb.shard("uneven", comm.rank)))
    assert [G.num_data for G in given + counted] == [99, 99, 13, 13]


def test_a_failed_eigenbasis_on_rank_0_is_named_on_every_rank():
    """Inputs of 1e200 overflow EKFAC's input factor (the logits and the cross-entropy stay
    finite): rank 0, which eigendecomposes for all, names the factor; the other rank
    names the computation that failed there instead of waiting in the next collective."""
    import array_api_compat.numpy as xp

    model = cl.nn.Sequential(cl.nn.Linear(3, 2))
    params = model.init(0, xp=xp, dtype=xp.float64)
    X, y = np.full((4, 3), 1e200), np.array([0, 1, 0, 1])

    def work(comm):
        shard = [(X[2 * comm.rank : 2 * comm.rank + 2], y[2 * comm.rank : 2 * comm.rank + 2])]
        with np.errstate(over="ignore"):
            try:
                cl.EKFACLinearOperator(model, cl.CrossEntropyLoss(), params, shard, comm=comm)
            except (cl.FactorizationError, cl.RemoteRankError) as err:
                return type(err).__name__, str(err)
        return None

    own, remote = run_ranks(2, work)
    assert own == (
        "FactorizationError",
        "The input factor A of layer '0' contains NaN or Inf; cannot eigendecompose it.",
    )
    assert remote[0] == "RemoteRankError"
    assert remote[1].startswith(
        "EKFACLinearOperator eigenbasis failed on rank 0 of 2 (FactorizationError: The input "
        "factor A of layer '0' contains NaN or Inf"
    )
