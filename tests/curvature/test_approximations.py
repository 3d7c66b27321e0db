"""Diagonal, block-diagonal, low-rank and diagonal-plus-low-rank approximations.

References: dense matrices of the exact operators (tested against finite differences
and closed forms in test_exact.py) and numpy.linalg on them.
"""

from __future__ import annotations

import re

import array_api_compat.numpy as npx
import numpy as np
import pytest
from monte_carlo import assert_unbiased
from reference import build_mlp
from test_exact import problem

import curvlinops as cl
from curvlinops.curvature.approximations import default_partition


@pytest.mark.parametrize("name", ["mse", "ce", "bce", "poisson"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_exact_ggn_and_ef_diagonals_equal_dense_diagonals(name, activation):
    model, spec, params, data, X, y, theta, loss = problem(name, activation=activation, seed=21)
    G = cl.GGNLinearOperator(model, loss, params, data).to_dense()
    E = cl.EFLinearOperator(model, loss, params, data).to_dense()
    D = cl.GGNDiagonalLinearOperator(model, loss, params, data)
    assert isinstance(D, cl.DiagonalLinearOperator)
    np.testing.assert_allclose(D.diagonal(), np.diag(G), rtol=1e-11, atol=1e-14)
    DE = cl.EFDiagonalLinearOperator(model, loss, params, data)
    np.testing.assert_allclose(DE.diagonal(), np.diag(E), rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("shared", [(6,), (2, 3)], ids=["one_axis", "two_axes"])
def test_ggn_diagonal_with_shared_axes(shared):
    import array_api_compat.numpy as xp

    rng = np.random.default_rng(0)
    model, _ = build_mlp([3, 4, 2], "tanh")
    params = model.init(1, xp=xp, dtype=xp.float64)
    X = rng.normal(size=(5, *shared, 3))  # 5 data points, shared axes of 6 positions
    y = rng.normal(size=(5, *shared, 2))
    data = [(X[:2], y[:2]), (X[2:], y[2:])]
    G = cl.GGNLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    D = cl.GGNDiagonalLinearOperator(model, cl.MSELoss(), params, data)
    np.testing.assert_allclose(D.diagonal(), np.diag(G), rtol=1e-11, atol=1e-14)
    E = cl.EFLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    DE = cl.EFDiagonalLinearOperator(model, cl.MSELoss(), params, data)
    np.testing.assert_allclose(DE.diagonal(), np.diag(E), rtol=1e-11, atol=1e-14)


def test_mc_ggn_diagonal_converges_in_expectation():
    model, spec, params, data, X, y, theta, loss = problem("ce", widths=(3, 4), N=6, seed=22)
    exact = cl.GGNDiagonalLinearOperator(model, loss, params, data).diagonal()
    draws = [
        cl.GGNDiagonalLinearOperator(
            model, loss, params, data, mc_samples=64, seed=s, check_deterministic=False
        ).diagonal()
        for s in range(200)
    ]
    assert_unbiased(draws, exact)  # with the power to see a 0.9 or 1.1 scale error


def test_mc_ggn_diagonal_draws_afresh_for_every_batch():
    """Two copies of one batch get their own draws: the diagonal over [b, b] is the mean of
    two independent estimates, not the one-batch estimate again (and not exact)."""
    model, spec, params, data, X, y, theta, loss = problem("ce", widths=(3, 4), N=6, seed=22)
    kw = dict(mc_samples=1, seed=3, check_deterministic=False)
    one = cl.GGNDiagonalLinearOperator(model, loss, params, data[:1], **kw).diagonal()
    twice = cl.GGNDiagonalLinearOperator(model, loss, params, data[:1] * 2, **kw).diagonal()
    assert np.max(np.abs(twice - one)) > 1e-3 * np.max(np.abs(one))


def test_diagonal_errors():
    model, spec, params, data, X, y, theta, loss = problem("gaussian", seed=23)
    with pytest.raises(NotImplementedError, match="Fisher"):
        cl.GGNDiagonalLinearOperator(model, loss, params, data)
    with pytest.raises(ValueError, match="mc_samples"):
        cl.GGNDiagonalLinearOperator(model, loss, params, data, mc_samples=0)


def test_diagonals_on_every_backend(backend):
    model, spec, params, data, X, y, theta, loss = problem("ce", seed=24)
    G = cl.GGNLinearOperator(model, loss, params, data).to_dense()
    p_b = [backend.asarray(np.asarray(p)) for p in params]
    data_b = [(backend.asarray(a), backend.asarray(b)) for a, b in data]
    D = cl.GGNDiagonalLinearOperator(model, loss, p_b, data_b)
    np.testing.assert_allclose(backend.to_numpy(D.diagonal()), np.diag(G), rtol=1e-10)


def test_block_diagonal_on_the_operators_device(backend):
    """The unit vectors that extract the blocks live on the operator's device (strict
    refuses a product across devices)."""
    if backend.name not in ("numpy", "array_api_strict"):
        pytest.skip("the device rule is the same for every library; strict checks it")
    model, spec, params, data, X, y, theta, loss = problem("mse", widths=(3, 2, 2), seed=25)
    dense = cl.GGNLinearOperator(model, loss, params, data).to_dense()  # layers of 8 and 6
    p_b = [backend.asarray(np.asarray(p)) for p in params]
    data_b = [(backend.asarray(a), backend.asarray(b)) for a, b in data]
    B = cl.block_diagonal(cl.GGNLinearOperator(model, loss, p_b, data_b))
    expected = np.zeros_like(dense)
    expected[:8, :8], expected[8:, 8:] = dense[:8, :8], dense[8:, 8:]
    got = backend.to_numpy(B @ backend.asarray(np.eye(len(dense))))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("Op", [cl.GGNLinearOperator, cl.HessianLinearOperator])
def test_block_diagonal_equals_dense_blocks_and_inverts_blockwise(Op):
    model, spec, params, data, X, y, theta, loss = problem("mse", widths=(3, 4, 2), seed=25)
    A = Op(model, loss, params, data)
    dense = A.to_dense()
    B = cl.block_diagonal(A)
    sizes = [3 * 4 + 4, 4 * 2 + 2]
    ref = np.zeros_like(dense)
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        ref[sl, sl] = dense[sl, sl]
        start += size
    np.testing.assert_allclose(B.to_dense(), ref, rtol=1e-12, atol=1e-14)
    v = np.random.default_rng(0).normal(size=theta.size)
    np.testing.assert_allclose(B @ v, ref @ v, rtol=1e-12, atol=1e-14)
    damping = 0.5
    inv_ref = np.linalg.inv(ref + damping * np.eye(theta.size))
    np.testing.assert_allclose(B.inverse(damping).to_dense(), inv_ref, rtol=1e-10, atol=1e-12)
    # a diagonal block of a PSD operator is PSD (the GGN), of an indefinite one not known
    psd = Op is cl.GGNLinearOperator
    assert A.is_psd == psd and [b.is_psd for b in B.blocks] == [psd, psd] and B.is_psd == psd
    if psd:
        assert all(np.linalg.eigvalsh(b.to_dense()).min() > -1e-12 for b in B.blocks)
    # a custom partition: every parameter array its own block
    B2 = cl.block_diagonal(A, partition=[[0], [1], [2], [3]])
    assert [b.shape[0] for b in B2.blocks] == [12, 4, 8, 2]


def _exactly(text):
    """A ``pytest.raises`` pattern that matches ``text`` and nothing else."""
    return "^" + re.escape(text) + "$"


def test_block_diagonal_refuses_large_blocks_and_bad_partitions():
    model, spec, params, data, X, y, theta, loss = problem("mse", seed=26)
    G = cl.GGNLinearOperator(model, loss, params, data)
    assert [p.shape for p in params] == [(4, 3), (4,), (3, 4), (3,)]  # blocks of 16 and 15
    assert [b.shape[0] for b in cl.block_diagonal(G, max_block_size=16).blocks] == [16, 15]
    with pytest.raises(
        ValueError,
        match=_exactly(
            "The block of parameters [0, 1] has 16 rows, more than max_block_size=15. Split it "
            "with a finer partition, raise max_block_size if memory allows, or use a "
            "Kronecker-factored approximation (KFACLinearOperator)."
        ),
    ):
        cl.block_diagonal(G, max_block_size=15)
    for partition in ([[0, 2], [1, 3]], [[0, 1]], [[0, 1], [], [2, 3]], [[1, 0], [2, 3]]):
        with pytest.raises(
            ValueError,
            match=_exactly(
                "partition must split the parameter indices 0..3 into non-empty, contiguous "
                f"groups in order (e.g. [[0, 1], [2, 3]]); got {partition}."
            ),
        ):
            cl.block_diagonal(G, partition=partition)


def test_block_diagonal_of_one_entry_blocks_is_the_diagonal():
    """``max_block_size=1`` is a valid size: blocks of single parameters (a network of
    scalar weights and biases) give the dense matrix's diagonal."""
    import array_api_compat.numpy as xp

    from curvlinops import nn

    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh(), nn.Linear(1, 1))
    params = model.init(3, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(4)
    data = [(rng.normal(size=(6, 1)), rng.normal(size=(6, 1)))]
    G = cl.GGNLinearOperator(model, cl.MSELoss(), params, data)
    dense = np.asarray(G.to_dense())
    B = cl.block_diagonal(G, partition=[[0], [1], [2], [3]], max_block_size=1)
    np.testing.assert_allclose(B.to_dense(), np.diag(np.diag(dense)), rtol=1e-13, atol=1e-15)
    with pytest.raises(
        ValueError,
        match=_exactly(
            "The block of parameters [0, 1] has 2 rows, more than max_block_size=1. Split it "
            "with a finer partition, raise max_block_size if memory allows, or use a "
            "Kronecker-factored approximation (KFACLinearOperator)."
        ),
    ):
        cl.block_diagonal(G, max_block_size=1)  # the default partition: one block per layer


def test_block_diagonal_and_default_partition_need_a_square_curvature_operator():
    square = cl.aslinearoperator(np.eye(3))
    with pytest.raises(
        TypeError,
        match=_exactly("block_diagonal needs a curvature operator that knows its parameters."),
    ):
        cl.block_diagonal(square)
    with pytest.raises(
        TypeError,
        match=_exactly(
            "block_diagonal needs a square curvature operator, got <3x2 DenseLinearOperator "
            "dtype=float64 namespace=numpy>."
        ),
    ):
        cl.block_diagonal(cl.aslinearoperator(np.ones((3, 2))))
    with pytest.raises(
        TypeError,
        match=_exactly(
            "The default partition needs a curvature operator (with parameter shapes); pass "
            "partition= for other operators."
        ),
    ):
        default_partition(square)


def test_low_rank_lanczos_and_nystrom_against_eigh():
    model, spec, params, data, X, y, theta, loss = problem("ce", widths=(3, 5, 3), N=9, seed=27)
    G = cl.GGNLinearOperator(model, loss, params, data)
    dense = G.to_dense()
    w, Q = np.linalg.eigh(dense)
    k = 4
    L = cl.low_rank(G, k, method="lanczos")
    assert isinstance(L, cl.EighLinearOperator)
    np.testing.assert_allclose(np.sort(L.eigenvalues), w[-k:], rtol=1e-8)
    best = Q[:, -k:] @ np.diag(w[-k:]) @ Q[:, -k:].T
    np.testing.assert_allclose(L.to_dense(), best, rtol=1e-6, atol=1e-8 * w[-1])
    # Nystrom: the error is bounded by the tail of the spectrum (PSD, rank-k sketch with
    # oversampling); here the GGN's rank (<= N * (C - 1) = 18) is far below the sketch size.
    N_op = cl.low_rank(G, k, method="nystrom", seed=0, oversampling=20)
    err = np.linalg.norm(dense - N_op.to_dense(), 2)
    assert err <= 1.01 * w[-k - 1] + 1e-8 * w[-1]
    with pytest.raises(ValueError, match="method"):
        cl.low_rank(G, 2, method="svd")


def test_diagonal_plus_low_rank_with_exact_woodbury_inverse():
    model, spec, params, data, X, y, theta, loss = problem("mse", widths=(3, 4, 2), seed=28)
    G = cl.GGNLinearOperator(model, loss, params, data)
    dense = G.to_dense()
    D = cl.GGNDiagonalLinearOperator(model, loss, params, data)
    A = cl.diagonal_plus_low_rank(G, 3, diagonal=D, method="nystrom", seed=1)
    assert isinstance(A, cl.DiagonalPlusLowRankLinearOperator)
    np.testing.assert_allclose(np.diag(A.to_dense()), np.diag(dense), rtol=1e-10, atol=1e-13)
    damping = 0.1
    ref = A.to_dense() + damping * np.eye(theta.size)
    np.testing.assert_allclose(
        A.inverse(damping).to_dense(), np.linalg.inv(ref), rtol=1e-8, atol=1e-10
    )
    np.testing.assert_allclose(
        float(A.damped(damping).logdet()), np.linalg.slogdet(ref)[1], rtol=1e-10
    )
    np.testing.assert_allclose(float(A.trace()), np.trace(A.to_dense()), rtol=1e-12)


def test_diagonal_plus_low_rank_defaults_are_the_documented_ones():
    """method="nystrom" and seed=0 by default: the same operator as passing them (with a
    rank below the operator's, so that the sketch depends on the method and the draw)."""
    model, spec, params, data, X, y, theta, loss = problem("mse", widths=(3, 4, 2), seed=28)
    G = cl.GGNLinearOperator(model, loss, params, data)
    D = cl.GGNDiagonalLinearOperator(model, loss, params, data)
    default = cl.diagonal_plus_low_rank(G, 2, diagonal=D).to_dense()
    explicit = cl.diagonal_plus_low_rank(G, 2, diagonal=D, method="nystrom", seed=0)
    np.testing.assert_array_equal(default, explicit.to_dense())
    for other in ({"method": "lanczos"}, {"seed": 1}):
        changed = cl.diagonal_plus_low_rank(G, 2, diagonal=D, **other).to_dense()
        assert not np.allclose(default, changed), other


def test_diagonal_plus_low_rank_operator_on_backends(backend, dtype_name):
    from conftest import tolerances

    rtol, atol = tolerances(dtype_name)
    rng = np.random.default_rng(5)
    n, k = 7, 3
    d = rng.uniform(0.5, 2.0, size=n)
    s = rng.uniform(0.5, 3.0, size=k)
    U = rng.normal(size=(n, k))
    ref = np.diag(d) + U @ np.diag(s) @ U.T
    A = cl.DiagonalPlusLowRankLinearOperator(
        backend.asarray(d, dtype_name),
        backend.asarray(s, dtype_name),
        backend.asarray(U, dtype_name),
    )
    X = rng.normal(size=(n, 2))
    np.testing.assert_allclose(
        backend.to_numpy(A @ backend.asarray(X, dtype_name)),
        ref @ X,
        rtol=rtol * 10,
        atol=atol * 10,
    )
    inv = backend.to_numpy(A.inverse(0.3).to_dense())
    np.testing.assert_allclose(
        inv, np.linalg.inv(ref + 0.3 * np.eye(n)), rtol=rtol * 100, atol=atol * 100
    )
    np.testing.assert_allclose(float(A.logdet()), np.linalg.slogdet(ref)[1], rtol=rtol * 100)
    np.testing.assert_allclose(backend.to_numpy(A.diagonal()), np.diag(ref), rtol=rtol * 10)
    with pytest.raises(ValueError, match="low_rank_vectors"):
        cl.DiagonalPlusLowRankLinearOperator(
            backend.asarray(d), backend.asarray(s), backend.asarray(U[:-1])
        )


@pytest.mark.parametrize("name", ["mse", "ce", "bce", "poisson", "gaussian"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "softplus", "elu"])
def test_exact_hessian_diagonal_equals_dense_hessian_diagonal(name, activation):
    model, spec, params, data, X, y, theta, loss = problem(
        name, widths=(3, 4, 4, 3), activation=activation, seed=29
    )
    H = cl.HessianLinearOperator(model, loss, params, data).to_dense()
    D = cl.HessianDiagonalLinearOperator(model, loss, params, data)
    np.testing.assert_allclose(D.diagonal(), np.diag(H), rtol=1e-10, atol=1e-13)
    # the residual terms matter: the GGN diagonal differs
    if activation in ("tanh", "sigmoid") and name != "gaussian":
        G = cl.GGNDiagonalLinearOperator(model, loss, params, data).diagonal()
        assert np.abs(G - np.diag(H)).max() > 1e-4


def test_hessian_diagonal_on_backends_and_errors(backend):
    model, spec, params, data, X, y, theta, loss = problem("ce", seed=30)
    H = cl.HessianLinearOperator(model, loss, params, data).to_dense()
    p_b = [backend.asarray(np.asarray(p)) for p in params]
    data_b = [(backend.asarray(a), backend.asarray(b)) for a, b in data]
    D = cl.HessianDiagonalLinearOperator(model, loss, p_b, data_b)
    np.testing.assert_allclose(backend.to_numpy(D.diagonal()), np.diag(H), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["mse", "ce"])
def test_hessian_diagonal_with_shared_axes_equals_dense_hessian_diagonal(name):
    """Inputs and outputs (N, S, D): each datum's Hessian spans all its positions."""
    model, spec, params, data, X, y, theta, loss = problem(name, widths=(3, 4, 4, 3), seed=31)
    rng = np.random.default_rng(31)
    X = rng.normal(size=(5, 2, 3))
    y = rng.integers(0, 3, size=(5, 2)) if name == "ce" else rng.normal(size=(5, 2, 3))
    shared = [(X[:2], y[:2]), (X[2:], y[2:])]
    H = cl.HessianLinearOperator(model, loss, params, shared).to_dense()
    D = cl.HessianDiagonalLinearOperator(model, loss, params, shared)
    np.testing.assert_allclose(D.diagonal(), np.diag(H), rtol=1e-10, atol=1e-13)


def test_kfac_exact_blocks_of_elementwise_layers_on_every_backend(backend):
    # LayerNorm's affine parameters get an exact GGN block, on every array library
    model = cl.nn.Sequential(
        cl.nn.Linear(3, 4), cl.nn.LayerNorm(4), cl.nn.Tanh(), cl.nn.Linear(4, 3)
    )
    params = model.init(5)
    rng = np.random.default_rng(5)
    data = [(rng.normal(size=(6, 3)), rng.normal(size=(6, 3)))]
    G = cl.GGNLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    p_b = [backend.asarray(np.asarray(p)) for p in params]
    data_b = [(backend.asarray(a), backend.asarray(b)) for a, b in data]
    K = cl.KFACLinearOperator(model, cl.MSELoss(), p_b, data_b)
    (block,) = K.exact_blocks.values()
    start = 3 * 4 + 4  # after the first Linear's weight and bias: LayerNorm's weight, bias
    expected = G[start : start + 8, start : start + 8]
    np.testing.assert_allclose(backend.to_numpy(block), expected, rtol=1e-10, atol=1e-12)


def test_block_diagonal_default_limit_is_4096_rows():
    """The documented default ``max_block_size=4096``: a layer of 4096 weights and one
    bias (one block of 4097 rows) is refused before any product."""
    model = cl.nn.Sequential(cl.nn.Linear(4096, 1))
    params = model.init(0, xp=npx, dtype=npx.float64)
    rng = np.random.default_rng(3)
    data = [(rng.standard_normal((2, 4096)), rng.standard_normal((2, 1)))]
    G = cl.GGNLinearOperator(model, cl.MSELoss(), params, data, check_deterministic=False)
    with pytest.raises(
        ValueError, match=re.escape("has 4097 rows, more than max_block_size=4096.")
    ):
        cl.block_diagonal(G)


def test_low_rank_default_seed_is_zero():
    """``seed=0`` by default: the randomized Nystrom sketch of a rank-deficient draw
    depends on the seed, and the default one is seed 0's."""
    rng = np.random.default_rng(4)
    Q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    A = cl.aslinearoperator((Q * np.linspace(1.0, 2.0, 12)) @ Q.T, psd=True)
    default = cl.low_rank(A, 3, method="nystrom", oversampling=1).to_dense()
    np.testing.assert_array_equal(
        default, cl.low_rank(A, 3, method="nystrom", oversampling=1, seed=0).to_dense()
    )
    other = cl.low_rank(A, 3, method="nystrom", oversampling=1, seed=1).to_dense()
    assert np.abs(default - other).max() > 1e-3


def test_an_integral_float_num_data_counts_as_that_integer():
    """``num_data=8.0`` (e.g. computed by a division) is the integer 8; 8.5 is refused."""
    model, spec, params, data, X, y, theta, loss = problem("mse", seed=27)
    n = sum(int(Xb.shape[0]) for Xb, _ in data)
    as_float = cl.GGNLinearOperator(model, loss, params, data, num_data=float(n))
    assert as_float.num_data == n and isinstance(as_float.num_data, int)
    reference = cl.GGNLinearOperator(model, loss, params, data, num_data=n).to_dense()
    np.testing.assert_array_equal(as_float.to_dense(), reference)
    with pytest.raises(TypeError, match=re.escape("got 8.5.")):
        cl.GGNLinearOperator(model, loss, params, data, num_data=8.5)
