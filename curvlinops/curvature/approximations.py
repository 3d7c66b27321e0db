"""Block-diagonal and low-rank approximations of any curvature operator.

- :func:`block_diagonal`: dense blocks of a curvature operator for a partition of
  the parameters (default: one block per layer), each materialized through one
  matmat with the block's unit vectors, returned as a BlockDiagonalLinearOperator
  (inverted blockwise).
- :func:`low_rank`: the top of the spectrum by Lanczos or randomized Nyström, as an
  EighLinearOperator.
- :func:`diagonal_plus_low_rank`: a low-rank part plus the diagonal of the rest, with
  an exact Woodbury inverse.

All three work on distributed operators (``comm=``): they run the same products and
seeded algorithms on every rank, so every rank gets the same approximation.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.solvers``,
``curvlinops.models``.
"""

from __future__ import annotations

import math

from .._backend.reduction import gather_outcomes
from ..linalg import (
    BlockDiagonalLinearOperator,
    DenseLinearOperator,
    DiagonalLinearOperator,
    DiagonalPlusLowRankLinearOperator,
    LinearOperator,
)
from ..models import Tier

__all__ = ["block_diagonal", "default_partition", "low_rank", "diagonal_plus_low_rank"]


def default_partition(A) -> list[list[int]]:
    """One group of parameter indices per layer (weight with its bias) where the model
    offers layer taps, else one group per parameter array.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import GGNLinearOperator, MSELoss, nn
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> G = GGNLinearOperator(model, MSELoss(), model.init(0, xp=xp, dtype=xp.float64),
    ...                       [(np.ones((4, 2)), np.zeros((4, 1)))])
    >>> default_partition(G)
    [[0, 1], [2, 3]]
    """
    shapes = getattr(A, "shapes", None)
    if shapes is None:
        raise TypeError(
            "The default partition needs a curvature operator (with parameter shapes); "
            "pass partition= for other operators."
        )
    model = getattr(A, "model", None)
    if model is not None and model.has_tier(Tier.LAYER_TAPS):
        comm = getattr(A, "comm", None)
        if comm is None or not comm.distributed:
            return _tap_partition(model, A.params, next(iter(A.data))[0], len(shapes))

        def local():  # a distributed operator: the first rank with data knows the taps
            first = next(iter(A.data), None)
            return None if first is None else _tap_partition(model, A.params, first[0], len(shapes))

        found = gather_outcomes(comm, local, "default_partition")
        return next(groups for groups in found if groups is not None)
    return [[i] for i in range(len(shapes))]


def _tap_partition(model, params, X, num_arrays):
    """One group per tapped layer of the model on inputs ``X``, one per other array."""
    taps = model.linearize(params, X).layer_taps(None)
    groups = sorted(
        [t.weight_index] + ([t.bias_index] if t.bias_index is not None else []) for t in taps
    )
    covered = {i for g in groups for i in g}
    groups += [[i] for i in range(num_arrays) if i not in covered]
    return sorted(groups)


def block_diagonal(A, partition=None, *, max_block_size=4096) -> BlockDiagonalLinearOperator:
    """Dense diagonal blocks of a curvature operator, as a block-diagonal operator.

    Parameters
    ----------
    A : CurvatureLinearOperator
        Any exact curvature operator (GGN, Hessian, Fisher, ...). Each block costs
        one matmat with as many columns as the block has parameters.
    partition : list of list of int, optional
        Groups of parameter indices; each group must be a contiguous run and the groups
        must cover all parameters in order. Default: one block per layer.
    max_block_size : int
        Refuse blocks with more rows than this (a dense block of ``n`` rows costs
        ``n`` products and ``n^2`` memory).

    Returns
    -------
    BlockDiagonalLinearOperator
        Blocks are dense operators, inverted blockwise.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import GGNLinearOperator, MSELoss, block_diagonal, nn
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    >>> G = GGNLinearOperator(model, MSELoss(), model.init(0, xp=xp, dtype=xp.float64),
    ...                       [(np.ones((4, 2)), np.zeros((4, 1)))])
    >>> [b.shape for b in block_diagonal(G).blocks]
    [(9, 9), (4, 4)]
    """
    if (
        isinstance(max_block_size, bool)
        or not isinstance(max_block_size, int)
        or max_block_size < 1
    ):
        raise ValueError(f"max_block_size must be a positive integer, got {max_block_size!r}.")
    if not isinstance(A, LinearOperator) or A.shape[0] != A.shape[1]:
        raise TypeError(f"block_diagonal needs a square curvature operator, got {A!r}.")
    shapes = getattr(A, "shapes", None)
    if shapes is None:
        raise TypeError("block_diagonal needs a curvature operator that knows its parameters.")
    partition = default_partition(A) if partition is None else [list(g) for g in partition]
    _check_partition(partition, len(shapes))
    sizes = [math.prod(s) for s in shapes]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    xp = A.xp
    blocks = []
    for group in partition:
        start, stop = offsets[group[0]], offsets[group[-1] + 1]
        n = stop - start
        if n > max_block_size:
            raise ValueError(
                f"The block of parameters {group} has {n} rows, more than max_block_size="
                f"{max_block_size}. Split it with a finer partition, raise max_block_size if "
                "memory allows, or use a Kronecker-factored approximation (KFACLinearOperator)."
            )
        # Unit vectors of the block's coordinates: one matmat yields the block's columns.
        E = xp.eye(A.shape[0], n, k=-start, dtype=A.dtype, device=A.device)
        block = (A @ E)[start:stop, :]
        block = 0.5 * (block + xp.matrix_transpose(block)) if A.is_symmetric else block
        # A diagonal block of a PSD operator is PSD.
        blocks.append(DenseLinearOperator(block, symmetric=A.is_symmetric, psd=A.is_psd))
    return BlockDiagonalLinearOperator(blocks)


def _check_partition(partition, num_arrays):
    flat = [i for g in partition for i in g]
    if (
        flat != list(range(num_arrays))
        or any(g != list(range(g[0], g[-1] + 1)) for g in partition if g)
        or any(not g for g in partition)
    ):
        raise ValueError(
            f"partition must split the parameter indices 0..{num_arrays - 1} into non-empty, "
            f"contiguous groups in order (e.g. [[0, 1], [2, 3]]); got {partition}."
        )


def low_rank(A, rank, *, method="lanczos", seed=0, **options):
    """Rank-``rank`` approximation of a symmetric operator as an EighLinearOperator.

    Parameters
    ----------
    A : LinearOperator
        Symmetric operator (``method="nystrom"`` needs it positive semi-definite).
    rank : int
        Number of eigenpairs kept.
    method : {"lanczos", "nystrom"}
        Lanczos keeps the eigenpairs of largest magnitude (``eigsh(..., which="LM")``);
        randomized Nyström the top of a PSD spectrum from one sketch.
    seed : int
        Seed of the start vector or sketch.
    **options
        Passed to :func:`curvlinops.eigsh` or :func:`curvlinops.nystrom`.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator, low_rank
    >>> A = aslinearoperator(np.diag([5.0, 4.0, 1e-3, 1e-4]), symmetric=True)
    >>> L = low_rank(A, 2)
    >>> np.round(np.sort(L.eigenvalues), 6).tolist()
    [4.0, 5.0]
    """
    from ..linalg import EighLinearOperator
    from ..solvers import eigsh, nystrom

    if method == "lanczos":
        values, vectors = eigsh(A, k=rank, which="LM", seed=seed, **options)
        return EighLinearOperator(values, vectors)
    if method == "nystrom":
        return nystrom(A, rank, seed=seed, **options)
    raise ValueError(f"method must be 'lanczos' or 'nystrom', got {method!r}.")


def diagonal_plus_low_rank(A, rank, *, diagonal=None, method="nystrom", seed=0, **options):
    """``L + D``: a low-rank part ``L`` of ``A`` plus the diagonal ``D`` of ``A - L``.

    Parameters
    ----------
    A : LinearOperator
        Symmetric (for ``method="nystrom"``: PSD) operator.
    rank : int
        Rank of ``L``.
    diagonal : array or DiagonalLinearOperator, optional
        The diagonal of ``A`` (e.g. from :class:`curvlinops.GGNDiagonalLinearOperator`
        or an estimate by :func:`curvlinops.xdiag`). Default: ``A.diagonal()``, where
        the operator has a cheap exact one.
    method, seed, options
        As in :func:`low_rank`.

    Returns
    -------
    DiagonalPlusLowRankLinearOperator
        With an exact Woodbury inverse, log-determinant and trace.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import aslinearoperator, diagonal_plus_low_rank
    >>> A = aslinearoperator(np.diag([5.0, 4.0, 1.0, 0.5]), psd=True)
    >>> B = diagonal_plus_low_rank(A, 2)
    >>> bool(np.allclose(B.to_dense(), np.diag([5.0, 4.0, 1.0, 0.5])))
    True
    """
    L = low_rank(A, rank, method=method, seed=seed, **options)
    if diagonal is None:
        diagonal = A.diagonal()
    elif isinstance(diagonal, DiagonalLinearOperator):
        diagonal = diagonal.diagonal()
    rest = diagonal - L.diagonal()
    return DiagonalPlusLowRankLinearOperator(rest, L.eigenvalues, L.eigenvectors)
