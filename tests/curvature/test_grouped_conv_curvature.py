"""Curvature approximations of grouped and depthwise convolutions against dense references.

A grouped convolution's weight is block diagonal over its groups; K-FAC gives each
group's weight rows (and bias entries) their own Kronecker block from that group's
patches and output gradients. References, all computed without the taps under test:
dense matrices of the exact operators (GGNLinearOperator, EFLinearOperator,
HessianLinearOperator; on TorchModel with PyTorch autodiff), patches unfolded by
``torch.nn.functional.unfold`` and output gradients by autograd for factors computed by
hand, the cases where K-FAC is exact (each output entering the loss on its own:
"expand"; outputs averaged over the pixels: "reduce"; one datum of one pixel for the
Kronecker-factored Hessian), the averaging scheme of the Kronecker-factored Hessian
written out in NumPy, Monte-Carlo variants in expectation with variance-derived bounds.
"""

from __future__ import annotations

import io

import array_api_compat.numpy as xp
import numpy as np
import pytest
from backend_matrix import backends_and_dtypes
from monte_carlo import assert_unbiased

import curvlinops as cl
from curvlinops import nn
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator
from curvlinops.curvature.kfac_hessian import KFACHessianLinearOperator
from curvlinops.models import LayerTap

torch = pytest.importorskip("torch")
F = torch.nn.functional

HAS_POOL = hasattr(nn, "GlobalAvgPool2d")
needs_pool = pytest.mark.skipif(not HAS_POOL, reason="needs nn.GlobalAvgPool2d")


def assert_close(actual, expected, rtol=1e-10):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(np.abs(expected).max(), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * 1e-2 * scale)


def offsets(params):
    return np.cumsum([0] + [int(np.prod(p.shape)) for p in params])


def group_indices(params, weight, bias, groups, g):
    """Flat indices of group ``g``'s weight rows (and bias entries), weight first."""
    starts = offsets(params)
    w_size = int(np.prod(params[weight].shape)) // groups
    ix = [np.arange(starts[weight] + g * w_size, starts[weight] + (g + 1) * w_size)]
    if bias is not None:
        b_size = int(np.prod(params[bias].shape)) // groups
        ix.append(np.arange(starts[bias] + g * b_size, starts[bias] + (g + 1) * b_size))
    return np.concatenate(ix)


def sub(M, ix, iy=None):
    return M[np.ix_(ix, ix if iy is None else iy)]


# (name, layer factory, input shape without the batch axis)
SINGLE_CONVS = [
    ("2d_groups", lambda: nn.Conv2d(4, 6, (2, 3), stride=(1, 2), padding=1, groups=2), (4, 4, 5)),
    ("2d_depthwise", lambda: nn.Conv2d(3, 6, 3, padding="same", groups=3), (3, 4, 4)),
    ("1d_groups", lambda: nn.Conv1d(4, 4, 3, dilation=2, groups=4, bias=False), (4, 8)),
]
SINGLE_IDS = [name for name, _, _ in SINGLE_CONVS]


def grouped_cnn(seed=0):
    """A grouped convolution, a depthwise one (strided), then a Linear mixing all channels."""
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24, 3),
    )
    return model, model.init(seed, xp=xp, dtype=xp.float64)


def torch_cnn(model, params):
    """The torch.nn equivalent of :func:`grouped_cnn` with the same parameters."""
    conv1, conv2 = model.chain()[0][1], model.chain()[2][1]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 6, 3, padding=1, groups=2),
        torch.nn.Tanh(),
        torch.nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(24, 3),
    ).double()
    assert (conv1.groups, conv2.groups) == (2, 6)
    with torch.no_grad():
        for p, value in zip(net.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(np.asarray(value)))
    return net


def classification_data(seed, N=7):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, 4, 4, 4))
    y = rng.integers(0, 3, N)
    return [(X[:3], y[:3]), (X[3:], y[3:])]


def regression_data(model, params, shape, seed, sizes=(2, 3)):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((sum(sizes), *shape))
    Y = rng.standard_normal(model(params, X).shape)
    return [(X[: sizes[0]], Y[: sizes[0]]), (X[sizes[0] :], Y[sizes[0] :])]


# -- exact cases --------------------------------------------------------------------------


@pytest.mark.parametrize("operator", [KFACLinearOperator, EKFACLinearOperator])
@pytest.mark.parametrize(("name", "make", "shape"), SINGLE_CONVS, ids=SINGLE_IDS)
def test_expand_exact_for_grouped_convolutions_whose_outputs_each_enter_the_loss(
    name, make, shape, operator
):
    """Conv -> Flatten with squared error: every output pixel of every group is an item."""
    model = nn.Sequential(make(), nn.Flatten())
    params = model.init(0, xp=xp, dtype=xp.float64)
    data = regression_data(model, params, shape, 1)
    ggn = cl.GGNLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    approx = operator(
        model, cl.MSELoss(), params, data, kfac_approx="expand", separate_weight_and_bias=False
    )
    assert_close(approx.to_dense(), ggn)
    G = make().groups
    if operator is KFACLinearOperator:  # one factor per group, stacked
        D_g = int(np.prod(params[0].shape[1:])) + (len(params) > 1)
        assert approx.input_factors["0"].shape == (G, D_g, D_g)


def test_ekfac_scalings_with_an_output_per_position_follow_their_definition():
    """Outputs ``(N, C_out, L)`` read as ``(N, S, C)``, a loss term per position: EKFAC's
    items are the positions, and group g's scalings are
    ``c sum_t sum_m ((Q_B,g^T g_t,m,g) (Q_A,g^T [a_t,g; 1])^T)^2``, here from the patches
    by ``F.unfold`` and the loss factor's columns (the model's outputs are the layer's)."""
    model = nn.Conv1d(4, 6, 2, padding=1, groups=2)
    params = model.init(0, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(15)
    X = rng.standard_normal((5, 4, 4))
    f = model(params, X)  # (5, 6, 5): 6 "positions" of 5 classes
    y = rng.integers(0, 5, (5, 6))
    loss = cl.CrossEntropyLoss()
    E = EKFACLinearOperator(model, loss, params, [(X, y)], separate_weight_and_bias=False)
    S = np.asarray(loss.hessian_sqrt(f, y))  # (N, 6, 5, R)
    patches = F.unfold(F.pad(torch.from_numpy(X)[:, :, None, :], (1, 1)), (1, 2)).numpy()
    a = np.swapaxes(patches, 1, 2).reshape(-1, 8)  # items (n, l), entries (channel, k)
    g = np.moveaxis(S, 2, 1).reshape(-1, 6, S.shape[-1])  # (items, C_out, R)
    c = loss.normalization(5, f.shape)
    (name,) = E.scalings
    Q_B, Q_A = E.output_eigenvectors[name], E.input_eigenvectors[name]
    for group in range(2):
        a_g = np.concatenate([a[:, 4 * group : 4 * group + 4], np.ones((len(a), 1))], axis=1)
        g_g = g[:, 3 * group : 3 * group + 3, :]
        rotated = (
            np.einsum("ji,tjm->tmi", Q_B[group], g_g)[..., None]
            * (a_g @ Q_A[group])[:, None, None, :]
        )
        assert_close(E.scalings[name][group], c * np.sum(rotated**2, axis=(0, 1)))
    assert E.scalings[name].shape == (2, 3, 5)


@needs_pool
@pytest.mark.parametrize("operator", [KFACLinearOperator, EKFACLinearOperator])
def test_reduce_exact_for_a_grouped_convolution_averaged_over_pixels(operator):
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, dilation=(1, 2), groups=2), nn.GlobalAvgPool2d()
    )
    params = model.init(0, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(2)
    data = [(rng.standard_normal((n, 4, 5, 6)), rng.standard_normal((n, 6))) for n in (3, 4)]
    ggn = cl.GGNLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    kwargs = dict(separate_weight_and_bias=False)
    reduce = operator(model, cl.MSELoss(), params, data, kfac_approx="reduce", **kwargs)
    assert_close(reduce.to_dense(), ggn)
    expand = KFACLinearOperator(model, cl.MSELoss(), params, data, kfac_approx="expand", **kwargs)
    assert np.linalg.norm(expand.to_dense() - ggn) > 1e-3 * np.linalg.norm(ggn)  # not vacuous


# -- factors by hand -------------------------------------------------------------------


def hand_factors(model, params, data, kfac_approx):
    """K-FAC's per-group factors of the first convolution of :func:`grouped_cnn` with the
    summed squared error (Hessian 2 I, factor sqrt(2) I): patches by ``F.unfold``, output
    gradients by autograd of the torch network."""
    net = torch_cnn(model, params)
    conv, G = net[0], 2
    sums_a, sums_g, count = 0.0, 0.0, 0
    for X, _ in data:
        x = torch.from_numpy(X)
        seen = {}

        def keep(_module, _args, out, seen=seen):
            seen["out"] = out

        handle = conv.register_forward_hook(keep)
        outputs = net(x)
        handle.remove()
        N, C = outputs.shape
        patches = F.unfold(F.pad(x, (1, 1, 1, 1)), 3).transpose(1, 2)  # (N, S, 36)
        grads = torch.stack(  # (N, 6, H, W, M): one column per output entry
            [
                torch.autograd.grad(outputs, seen["out"], np.sqrt(2.0) * e, retain_graph=True)[0]
                for e in torch.eye(C, dtype=torch.float64)[:, None, :].expand(C, N, C)
            ],
            dim=-1,
        )
        grads = grads.reshape(N, 6, -1, C).permute(0, 2, 3, 1)  # (N, S, M, 6)
        if kfac_approx == "reduce":
            patches, grads = patches.mean(dim=1), grads.sum(dim=1)
        a = patches.reshape(-1, G, 18).permute(1, 0, 2)  # (G, items, 18)
        g = grads.reshape(-1, G, 3).permute(1, 0, 2)  # (G, items * M, 3)
        sums_a = sums_a + a.transpose(1, 2) @ a
        sums_g = sums_g + g.transpose(1, 2) @ g
        count += a.shape[1]
    return (sums_g).detach().numpy(), (sums_a / count).detach().numpy()


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_kfac_blocks_are_each_groups_factors_computed_by_hand(kfac_approx):
    """Block diagonal over the groups: group g's weight block is B_g (x) A_g, its bias
    block B_g, and nothing couples the groups (although the GGN does, here)."""
    model, params = grouped_cnn(1)
    data = regression_data(model, params, (4, 4, 4), 3)
    loss = cl.MSELoss(reduction="sum")
    K = KFACLinearOperator(model, loss, params, data, kfac_approx=kfac_approx)
    B, A = hand_factors(model, params, data, kfac_approx)
    assert_close(K.output_factors["0"], B)
    assert_close(K.input_factors["0"], A)
    dense = K.to_dense()
    starts = offsets(params)
    for g in range(2):
        w = np.arange(starts[0] + g * 54, starts[0] + (g + 1) * 54)
        b = np.arange(starts[1] + g * 3, starts[1] + (g + 1) * 3)
        assert_close(sub(dense, w), np.kron(B[g], A[g]))
        assert_close(sub(dense, b), B[g])
        other = group_indices(params, 0, 1, 2, 1 - g)
        assert np.all(sub(dense, w, other) == 0) and np.all(sub(dense, w, b) == 0)
    ggn = cl.GGNLinearOperator(model, loss, params, data).to_dense()
    assert (
        np.abs(sub(ggn, group_indices(params, 0, 1, 2, 0), group_indices(params, 0, 1, 2, 1))).max()
        > 1e-3
    )


@pytest.mark.parametrize("separate", [True, False])
def test_ekfac_is_at_least_as_close_as_kfac_on_every_group_block(separate):
    model, params = grouped_cnn(2)
    data = classification_data(4)
    loss = cl.CrossEntropyLoss()
    ggn = cl.GGNLinearOperator(model, loss, params, data).to_dense()
    kw = dict(separate_weight_and_bias=separate)
    E = EKFACLinearOperator(model, loss, params, data, **kw).to_dense()
    K = KFACLinearOperator(model, loss, params, data, **kw).to_dense()
    closer = 0
    for weight, bias, G in ((0, 1, 2), (2, 3, 6)):
        for g in range(G):
            if separate:
                ix = group_indices(params, weight, None, G, g)
                blocks = [ix, group_indices(params, bias, None, G, g)]
            else:
                blocks = [group_indices(params, weight, bias, G, g)]
            for ix in blocks:
                error_E = np.linalg.norm(sub(E, ix) - sub(ggn, ix))
                error_K = np.linalg.norm(sub(K, ix) - sub(ggn, ix))
                assert error_E <= error_K * (1 + 1e-10) + 1e-14
                closer += error_E < error_K * (1 - 1e-6)
    assert closer >= 4  # strictly closer on several group blocks (not vacuous)


# -- diagonals -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    ("diagonal", "dense"),
    [
        (cl.GGNDiagonalLinearOperator, cl.GGNLinearOperator),
        (cl.EFDiagonalLinearOperator, cl.EFLinearOperator),
        (cl.HessianDiagonalLinearOperator, cl.HessianLinearOperator),
    ],
    ids=["ggn", "ef", "hessian"],
)
def test_diagonals_of_grouped_and_depthwise_convolutions_are_exact(diagonal, dense, dtype):
    model, params = grouped_cnn(3)
    data = classification_data(5)
    loss = cl.CrossEntropyLoss()
    reference = np.diag(dense(model, loss, params, data).to_dense())
    cast = getattr(np, dtype)
    params_d = [p.astype(cast) for p in params]
    data_d = [(X.astype(cast), y) for X, y in data]
    ours = diagonal(model, loss, params_d, data_d).diagonal()
    assert ours.dtype == cast
    assert_close(ours, reference, rtol=1e-10 if dtype == "float64" else 2e-4)


def test_diagonals_on_every_backend(backend):
    model, params = grouped_cnn(4)
    data = classification_data(6, N=4)
    loss = cl.CrossEntropyLoss()
    to = backend.asarray
    params_b = [to(p) for p in params]
    data_b = [(to(X), to(y)) for X, y in data]
    for diagonal, dense in (
        (cl.GGNDiagonalLinearOperator, cl.GGNLinearOperator),
        (cl.HessianDiagonalLinearOperator, cl.HessianLinearOperator),
    ):
        reference = np.diag(dense(model, loss, params, data).to_dense())
        ours = diagonal(model, loss, params_b, data_b, check_deterministic=False).diagonal()
        assert_close(backend.to_numpy(ours), reference)


def test_mc_ggn_diagonal_of_grouped_convolutions_is_unbiased():
    model, params = grouped_cnn(5)
    data = classification_data(7)
    loss = cl.CrossEntropyLoss()
    exact = np.diag(cl.GGNLinearOperator(model, loss, params, data).to_dense())
    draws = [
        cl.GGNDiagonalLinearOperator(
            model, loss, params, data, mc_samples=16, seed=seed, check_deterministic=False
        ).diagonal()
        for seed in range(200)
    ]
    assert_unbiased(draws, exact)  # rejects the diagonals scaled by 0.9 and 1.1


def test_mc_kfac_output_factors_of_each_group_are_unbiased():
    """E[B_mc] = B_type-2 for the cross-entropy (its Fisher is its GGN), group by group."""
    model, params = grouped_cnn(6)
    data = classification_data(8)
    loss = cl.CrossEntropyLoss()
    exact = KFACLinearOperator(model, loss, params, data).output_factors
    draws = {name: [] for name in ("0", "2")}
    for seed in range(200):
        K = KFACLinearOperator(
            model,
            loss,
            params,
            data,
            fisher_type="mc",
            mc_samples=16,
            seed=seed,
            check_deterministic=False,
        )
        for name in draws:
            draws[name].append(K.output_factors[name])
    for name, samples in draws.items():
        assert np.asarray(samples).shape[1] == {"0": 2, "2": 6}[name]  # a factor per group
        assert_unbiased(samples, exact[name])


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical", "forward-only"])
def test_kfac_of_every_fisher_type_covers_every_parameter_and_is_psd(fisher_type):
    model, params = grouped_cnn(7)
    data = classification_data(9)
    K = KFACLinearOperator(model, cl.CrossEntropyLoss(), params, data, fisher_type=fisher_type)
    dense = K.to_dense()
    P = sum(p.size for p in params)
    assert dense.shape == (P, P)
    assert_close(dense, dense.T)
    assert np.linalg.eigvalsh(dense).min() >= -1e-12 * np.abs(dense).max()
    if fisher_type == "forward-only":  # I (x) A per group: the identity output factors
        assert_close(K.output_factors["2"], np.stack([np.eye(1)] * 6))
    else:
        E = EKFACLinearOperator(model, cl.CrossEntropyLoss(), params, data, fisher_type=fisher_type)
        assert E.to_dense().shape == (P, P)
        assert E.scalings["0"].shape == (2, 3, 18)


# -- inverses, states, block diagonal ------------------------------------------------------


def test_exact_and_factored_inverses_per_group():
    model, params = grouped_cnn(8)
    data = classification_data(10)
    K = KFACLinearOperator(model, cl.CrossEntropyLoss(), params, data)
    dense = K.to_dense()
    d = 0.1
    assert_close(K.inverse(d).to_dense(), np.linalg.inv(dense + d * np.eye(len(dense))), 1e-8)
    factored = K.factored_inverse(d).to_dense()
    root = np.sqrt(d)
    for weight, G in ((0, 2), (2, 6)):
        B, A = K.output_factors[str(weight)], K.input_factors[str(weight)]
        for g in range(G):
            ix = group_indices(params, weight, None, G, g)
            expected = np.kron(
                np.linalg.inv(B[g] + root * np.eye(len(B[g]))),
                np.linalg.inv(A[g] + root * np.eye(len(A[g]))),
            )
            assert_close(sub(factored, ix), expected, 1e-8)


def test_state_round_trip_and_update_keep_the_groups():
    model, params = grouped_cnn(9)
    data = classification_data(11)
    loss = cl.CrossEntropyLoss()
    for cls in (KFACLinearOperator, EKFACLinearOperator):
        op = cls(model, loss, params, data[:1], check_deterministic=False)
        file = io.BytesIO()
        np.savez(file, **op.state_dict())
        file.seek(0)
        state = dict(np.load(file, allow_pickle=False))
        assert state["layer_groups"].tolist() == [2, 6, 1]
        restored = cls.from_state_dict(state, model, loss, params)
        assert_close(restored.to_dense(), op.to_dense(), 0)
        # decay 0: the batch's operator alone
        alone = cls(model, loss, params, data[1:], check_deterministic=False)
        updated = op.update(data[1], decay=0.0)
        assert_close(updated.to_dense(), alone.to_dense())


def test_block_diagonal_of_a_grouped_cnn_has_one_exact_block_per_layer():
    model, params = grouped_cnn(10)
    data = classification_data(12)
    G = cl.GGNLinearOperator(model, cl.CrossEntropyLoss(), params, data)
    dense = G.to_dense()
    B = cl.block_diagonal(G)
    starts = offsets(params)
    expected = np.zeros_like(dense)
    for first, last in ((0, 1), (2, 3), (4, 5)):
        ix = np.arange(starts[first], starts[last + 1])
        expected[np.ix_(ix, ix)] = dense[np.ix_(ix, ix)]
    assert [b.shape[0] for b in B.blocks] == [114, 60, 75]
    assert_close(B.to_dense(), expected)


@backends_and_dtypes()
def test_kfac_and_ekfac_products_on_every_backend(backend, dtype):
    """An exact case ("expand", each output on its own), so the reference is the GGN."""
    model = nn.Sequential(nn.Conv2d(2, 4, 2, groups=2), nn.Flatten())
    params = model.init(0, xp=xp, dtype=xp.float64)
    data = regression_data(model, params, (2, 3, 3), 13)
    ggn = cl.GGNLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    to = backend.asarray
    rtol = 1e-10 if dtype == "float64" else 1e-4
    V = np.random.default_rng(1).normal(size=(ggn.shape[1], 3))
    for cls in (KFACLinearOperator, EKFACLinearOperator):
        K = cls(
            model,
            cl.MSELoss(),
            [to(p, dtype) for p in params],
            [(to(X, dtype), to(y, dtype)) for X, y in data],
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        assert_close(backend.to_numpy(K @ to(V, dtype)), ggn @ V, rtol)
        d = 0.1
        expected = np.linalg.solve(ggn + d * np.eye(len(ggn)), V)
        assert_close(backend.to_numpy(K.inverse(d) @ to(V, dtype)), expected, max(rtol, 1e-8))


# -- the Kronecker-factored Hessian ------------------------------------------------------


def one_pixel_model(seed=0):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 1, groups=2),
        nn.Tanh(),
        nn.Conv2d(4, 2, 1, groups=2),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(2, 2),
    )
    params = [
        p + 0.3 * rng.standard_normal(p.shape) for p in model.init(seed, xp=xp, dtype=xp.float64)
    ]
    return model, params


def test_kronecker_factored_hessian_is_exact_per_group_for_one_datum_of_one_pixel():
    model, params = one_pixel_model()
    rng = np.random.default_rng(1)
    data = [(rng.standard_normal((1, 4, 1, 1)), rng.standard_normal((1, 2)))]
    op = KFACHessianLinearOperator(
        model, cl.MSELoss(), params, data, separate_weight_and_bias=False
    )
    ours = op.to_dense()
    hessian = cl.HessianLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    for weight, G in ((0, 2), (2, 2)):
        for g in range(G):
            ix = group_indices(params, weight, weight + 1, G, g)
            assert_close(sub(ours, ix), sub(hessian, ix))
    # the groups of the first convolution are coupled in the Hessian, not in the operator
    a, b = group_indices(params, 0, 1, 2, 0), group_indices(params, 0, 1, 2, 1)
    assert np.abs(sub(hessian, a, b)).max() > 1e-4 and np.all(sub(ours, a, b) == 0)


def test_kronecker_factored_hessian_averaging_scheme_against_numpy():
    """1 x 1 grouped convolutions over several data and pixels, the recursion written out."""
    rng = np.random.default_rng(2)
    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), nn.Tanh(), nn.Conv2d(4, 2, 1), nn.Flatten())
    params = [
        p + 0.5 * rng.standard_normal(p.shape) for p in model.init(3, xp=xp, dtype=xp.float64)
    ]
    X = rng.standard_normal((3, 4, 2, 2))
    Y = rng.standard_normal((3, 8))
    loss = cl.MSELoss(reduction="sum")
    op = KFACHessianLinearOperator(model, loss, params, [(X, Y)])
    W0, b0, W1, b1 = params
    x = np.moveaxis(X, 1, -1).reshape(-1, 4)  # items (n, pixel), channels last
    h = np.concatenate([x[:, :2] @ W0[:2, :, 0, 0].T, x[:, 2:] @ W0[2:, :, 0, 0].T], 1) + b0
    a = np.tanh(h)
    f = a @ W1[:, :, 0, 0].T + b1
    target = np.moveaxis(Y.reshape(3, 2, 4), 1, -1).reshape(-1, 2)
    T = x.shape[0]
    H1 = 2.0 * T * np.eye(2)  # the summed Hessians of (f - y)^2 over the items
    d1, d2 = 1 - a**2, -2 * a * (1 - a**2)
    g_a = 2 * (f - target) @ W1[:, :, 0, 0]
    H0 = (W1[:, :, 0, 0].T @ H1 @ W1[:, :, 0, 0]) * (d1.T @ d1 / T) + np.diag(np.sum(d2 * g_a, 0))
    assert_close(op.output_factors["2"], H1)
    assert_close(op.output_factors["0"], np.stack([H0[:2, :2], H0[2:, 2:]]))
    assert_close(
        op.input_factors["0"], np.stack([x[:, :2].T @ x[:, :2], x[:, 2:].T @ x[:, 2:]]) / T
    )
    dense = op.to_dense()
    for g in range(2):
        ix = group_indices(params, 0, None, 2, g)
        A_g = x[:, 2 * g : 2 * g + 2].T @ x[:, 2 * g : 2 * g + 2] / T
        assert_close(sub(dense, ix), np.kron(H0[2 * g : 2 * g + 2, 2 * g : 2 * g + 2], A_g))


# -- through the PyTorch frontend ---------------------------------------------------------


def _torch_data(data):
    return [(torch.from_numpy(X), torch.from_numpy(np.asarray(y))) for X, y in data]


@pytest.mark.parametrize("operator", [KFACLinearOperator, EKFACLinearOperator])
@pytest.mark.parametrize(
    "conv",
    [
        lambda: torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        lambda: torch.nn.Conv2d(4, 4, 3, padding="same", groups=4, bias=False),  # depthwise
        lambda: torch.nn.Conv1d(4, 6, 2, dilation=2, groups=2),
    ],
    ids=["2d_groups", "2d_depthwise", "1d_groups"],
)
def test_torch_model_kfac_of_grouped_convolutions_is_exact_where_expand_is(conv, operator):
    from curvlinops.frontends.torch import TorchModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(conv(), torch.nn.Flatten()).double()
    model = TorchModel(net)
    shape = (4, 5, 5) if isinstance(net[0], torch.nn.Conv2d) else (4, 7)
    rng = np.random.default_rng(3)
    X = rng.standard_normal((5, *shape))
    with torch.no_grad():
        Y = rng.standard_normal(tuple(net(torch.from_numpy(X)).shape))
    data = _torch_data([(X[:2], Y[:2]), (X[2:], Y[2:])])
    ggn = cl.GGNLinearOperator(model, cl.MSELoss(), model.params, data).to_dense()
    ours = operator(model, cl.MSELoss(), model.params, data, separate_weight_and_bias=False)
    assert_close(ours.to_dense().numpy(), ggn.numpy())


def test_torch_model_diagonals_and_kronecker_factored_hessian_of_a_grouped_cnn():
    from curvlinops.frontends.torch import TorchModel

    model_native, params = grouped_cnn(11)
    net = torch_cnn(model_native, params)
    model = TorchModel(net)
    data = _torch_data(classification_data(13))
    loss = cl.CrossEntropyLoss()
    for diagonal, dense in (
        (cl.GGNDiagonalLinearOperator, cl.GGNLinearOperator),
        (cl.EFDiagonalLinearOperator, cl.EFLinearOperator),
        (cl.HessianDiagonalLinearOperator, cl.HessianLinearOperator),
    ):
        reference = torch.diagonal(dense(model, loss, model.params, data).to_dense())
        ours = diagonal(model, loss, model.params, data).diagonal()
        assert_close(ours.numpy(), reference.numpy())
    # one exact block per layer (the default partition reads the grouped taps)
    G = cl.GGNLinearOperator(model, loss, model.params, data)
    blocks = cl.block_diagonal(G).blocks
    assert [b.shape[0] for b in blocks] == [114, 60, 75]
    assert_close(blocks[0].to_dense().numpy(), G.to_dense()[:114, :114].numpy())
    # one datum of one pixel: the Kronecker-factored Hessian's group blocks are exact
    native, params = one_pixel_model(4)
    tnet = torch.nn.Sequential(
        torch.nn.Conv2d(4, 4, 1, groups=2),
        torch.nn.Tanh(),
        torch.nn.Conv2d(4, 2, 1, groups=2),
        torch.nn.Sigmoid(),
        torch.nn.Flatten(),
        torch.nn.Linear(2, 2),
    ).double()
    with torch.no_grad():
        for p, value in zip(tnet.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(value))
    tmodel = TorchModel(tnet)
    rng = np.random.default_rng(5)
    one = _torch_data([(rng.standard_normal((1, 4, 1, 1)), rng.standard_normal((1, 2)))])
    op = KFACHessianLinearOperator(
        tmodel, cl.MSELoss(), tmodel.params, one, separate_weight_and_bias=False
    ).to_dense()
    hessian = cl.HessianLinearOperator(tmodel, cl.MSELoss(), tmodel.params, one).to_dense()
    for weight in (0, 2):
        for g in range(2):
            ix = group_indices(params, weight, weight + 1, 2, g)
            assert_close(sub(op.numpy(), ix), sub(hessian.numpy(), ix))


# -- errors -------------------------------------------------------------------------------


def test_layer_tap_groups_are_checked():
    with pytest.raises(ValueError, match="groups must be a positive integer, got 0"):
        LayerTap("0", 0, None, np.ones((2, 4)), groups=0)
    with pytest.raises(ValueError, match="groups are for matrix taps.*elementwise"):
        LayerTap("0", 0, None, np.ones((2, 4)), kind="elementwise", groups=2)
    with pytest.raises(ValueError, match="groups are for matrix taps.*'embedding'"):
        LayerTap("0", 0, None, np.ones((2, 4), int), kind="embedding", groups=2)
    # a transposed grouped weight (a Flax grouped Conv kernel) is a matrix tap
    assert LayerTap("0", 0, None, np.ones((2, 4)), transposed=True, groups=2).groups == 2


def test_a_hand_written_tap_whose_groups_do_not_divide_the_weight_is_refused():
    from curvlinops.frontends import CallableModel

    linear = nn.Linear(3, 2, bias=False)  # inputs of 3 features cannot split into 2 groups

    def layer_taps(params, x, cotangents):
        grads = None if cotangents is None else cotangents
        return [LayerTap("fc", 0, None, x, grads, matrix_shape=(2, 3), groups=2)]

    model = CallableModel(
        forward=lambda p, x: linear(p, x),
        jvp=lambda p, x, t: linear.linearize(p, x).jvp(t),
        vjp=lambda p, x, u: linear.linearize(p, x).vjp(u),
        layer_taps=layer_taps,
    )
    params = linear.init(0, xp=xp, dtype=xp.float64)
    with pytest.raises(ValueError, match=r"Layer 'fc' has groups=2.*3 features.*split into 2"):
        KFACLinearOperator(model, cl.MSELoss(), params, [(np.ones((4, 3)), np.ones((4, 2)))])


def test_the_verify_checks_pass_on_a_grouped_cnn():
    """The grouped taps' implied weight gradients against the vjp (curvlinops.verify)."""
    from curvlinops.verify import verify_model

    model, params = grouped_cnn(12)
    X = np.random.default_rng(14).standard_normal((3, 4, 4, 4))
    reports = verify_model(model, params, X)
    assert {r.name for r in reports} >= {"layer_taps", "layer_protocol"}
    assert all(r.passed for r in reports), [str(r) for r in reports]


def test_squared_gradient_sums_of_a_grouped_tap_without_shared_axes():
    """Inputs ``(N, D_in)`` (no pixel axis): weight entry ``(i, j)`` of the matrix
    ``(D_out, D_in / G)`` is ``sum_n sum_m (g[n, i, m] a[n, group(i) d + j])^2``, written
    out per group in NumPy; the bias sums ``g^2``."""
    from curvlinops.curvature.diagonal import _squared_gradient_sums

    rng = np.random.default_rng(41)
    N, G, d_in, d_out, M = 5, 3, 2, 4, 2  # D_in = 6, D_out = 12
    a = rng.standard_normal((N, G * d_in))
    g = rng.standard_normal((N, G * d_out, M))
    weight, bias = _squared_gradient_sums(a, g, xp, groups=G)
    expected = np.zeros((G * d_out, d_in))
    for group in range(G):
        rows = slice(group * d_out, (group + 1) * d_out)
        cols = slice(group * d_in, (group + 1) * d_in)
        per_datum = np.einsum("nim,nj->nijm", g[:, rows], a[:, cols])  # gradients
        expected[rows] = np.sum(per_datum**2, axis=(0, 3))
    np.testing.assert_allclose(weight, expected, rtol=1e-13)
    np.testing.assert_allclose(bias, np.sum(g**2, axis=(0, 2)), rtol=1e-13)


def transposed_grouped_linear(G, d_in, d_out):
    """A hand-written grouped linear layer whose weight is stored transposed, ``W^T
    (d_in, G d_out)`` with group ``g`` in columns ``g d_out ... (g + 1) d_out - 1`` and
    its bias entries ``g d_out ...`` (a Flax grouped kernel's layout), with its tap."""
    from curvlinops.frontends import CallableModel

    def grouped(x):
        return x.reshape(x.shape[0], G, d_in)

    def forward(p, x):
        h = np.einsum("ngi,igo->ngo", grouped(x), p[0].reshape(d_in, G, d_out))
        return h.reshape(x.shape[0], G * d_out) + p[1]

    def jvp(p, x, V):
        h = np.einsum("ngi,igok->ngok", grouped(x), V[0].reshape(d_in, G, d_out, -1))
        return h.reshape(x.shape[0], G * d_out, -1) + V[1][None]

    def vjp(p, x, U):
        dW = np.einsum("ngi,ngok->igok", grouped(x), U.reshape(U.shape[0], G, d_out, -1))
        return [dW.reshape(d_in, G * d_out, -1), U.sum(axis=0)]

    def layer_taps(p, x, cotangents):
        shape = (G * d_out, d_in)
        return [LayerTap("fc", 0, 1, x, cotangents, matrix_shape=shape, transposed=True, groups=G)]

    return CallableModel(forward=forward, jvp=jvp, vjp=vjp, layer_taps=layer_taps)


@pytest.mark.parametrize("G", [1, 3])
def test_a_hand_written_transposed_grouped_tap_with_a_bias_gives_the_exact_ggn(G):
    """With squared error K-FAC of one (grouped) linear layer is its exact GGN (the
    output factor is the identity), which the callable model's own jvp and vjp give
    without the taps: every group's weight columns and bias entries, joint or separate,
    must land in its block."""
    d_in, d_out = 2, 2
    rng = np.random.default_rng(21)
    model = transposed_grouped_linear(G, d_in, d_out)
    params = [rng.standard_normal((d_in, G * d_out)), rng.standard_normal(G * d_out)]
    data = [(rng.standard_normal((5, G * d_in)), rng.standard_normal((5, G * d_out)))]
    ggn = cl.GGNLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    for joint in (True, False):
        kfac = KFACLinearOperator(
            model, cl.MSELoss(), params, data, separate_weight_and_bias=not joint
        )
        if joint:
            assert_close(kfac.to_dense(), ggn)
        else:  # the weight-bias cross terms are left out: compare the rest
            W = np.arange(d_in * G * d_out)
            b = np.arange(d_in * G * d_out, ggn.shape[0])
            assert_close(sub(kfac.to_dense(), W), sub(ggn, W))
            assert_close(sub(kfac.to_dense(), b), sub(ggn, b))
            np.testing.assert_array_equal(sub(kfac.to_dense(), W, b), 0.0)


@pytest.mark.parametrize(
    "G, named", [(1, "weight block of layer 'fc':"), (2, "weight block of layer 'fc', group 1:")]
)
def test_a_singular_transposed_block_is_named_by_its_layer_and_group(G, named):
    """Inputs zero in every group's second feature: each weight block is singular, and
    the refusal of the exact inverse names the first one (a group only if there are
    groups)."""
    rng = np.random.default_rng(3)
    model = transposed_grouped_linear(G, 2, 1)
    params = [rng.standard_normal((2, G)), rng.standard_normal(G)]
    X = rng.standard_normal((4, G, 2))
    X[:, :, 1] = 0.0
    if G > 1:
        X[:, 0, 1] = 1.0 + rng.random(4)  # group 0 is regular: group 1 fails first
    kfac = KFACLinearOperator(
        model, cl.MSELoss(), params, [(X.reshape(4, 2 * G), np.zeros((4, G)))]
    )
    with pytest.raises(cl.FactorizationError, match=f"The {named}") as caught:
        kfac.inverse()
    assert ", group 0" not in str(caught.value)
