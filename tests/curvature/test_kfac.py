"""K-FAC against exact GGN blocks where it is exact, and against NumPy closed forms.

References: dense matrices of the exact operators (GGNLinearOperator, EFLinearOperator,
tested against finite differences and closed forms in test_exact.py), the inputs of
each layer recomputed in NumPy, and numpy.linalg. The helpers here are shared with
the EKFAC and K-FAC Hessian tests.
"""

from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from monte_carlo import assert_unbiased, critical_value
from test_exact import problem

import curvlinops as cl
import curvlinops.nn as cnn
from curvlinops import FactorizationError
from curvlinops.curvature.kfac import KFACLinearOperator, KroneckerFactoredLinearOperator

RTOL, ATOL = 1e-10, 1e-12


# -- helpers shared with test_ekfac.py and test_kfac_hessian.py --------------------------


def offsets(params):
    sizes = [int(np.prod(p.shape)) for p in params]
    return np.concatenate([[0], np.cumsum(sizes)])


def indices(params, group):
    """Flat indices of the parameters in ``group`` (in the flat vector's order)."""
    off = offsets(params)
    return np.concatenate([np.arange(off[i], off[i + 1]) for i in group])


def layer_groups(model, separate):
    """Parameter groups of the Kronecker blocks: [w], [b] (separate) or [w, b] (joint)."""
    groups, start = [], 0
    for _, layer in model.chain():
        n = len(layer.param_shapes())
        if isinstance(layer, cnn.Linear):
            if n == 1:
                groups.append([start])
            elif separate:
                groups += [[start], [start + 1]]
            else:
                groups.append([start, start + 1])
        start += n
    return groups


def block(M, params, group):
    ix = indices(params, group)
    return M[np.ix_(ix, ix)]


def assert_close(actual, expected, rtol=RTOL, atol_scale=ATOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(np.abs(expected).max(), 1e-300) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol_scale * scale)


def assert_blocks_equal(K, G, params, groups):
    """Each block of K equals G's; K is zero outside its blocks."""
    mask = np.zeros(K.shape, dtype=bool)
    for group in groups:
        ix = indices(params, group)
        mask[np.ix_(ix, ix)] = True
        assert_close(block(K, params, group), block(G, params, group))
    assert np.all(K[~mask] == 0)


def joint_order(weight_shape):
    """Position in the joint block over ``[W | b]`` (C order, ``(D_out, D_in + 1)``) of each
    entry of ``W`` (flattened) followed by ``b``: the order of the flat parameter vector."""
    d_out, d_in = weight_shape
    order = np.arange(d_out * (d_in + 1)).reshape(d_out, d_in + 1)
    return np.concatenate([order[:, :d_in].ravel(), order[:, d_in]])


def from_joint_order(M, weight_shape):
    """A matrix over ``[W | b]`` in joint (interleaved) order, in flat-vector order."""
    perm = joint_order(weight_shape)
    return M[np.ix_(perm, perm)]


def split(X, y, splits):
    bounds = [0, *splits, X.shape[0]]
    return [(X[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def ggn(model, loss, params, data):
    return cl.GGNLinearOperator(model, loss, params, data).to_dense()


def numpy_layer_inputs(model, params, X):
    """Inputs of every Linear layer, from a NumPy forward pass written here."""
    from reference import ACTIVATIONS

    numpy_acts = {cls: fn for cls, fn in ACTIVATIONS.values()}
    inputs, a, start = [], X, 0
    for _, layer in model.chain():
        if isinstance(layer, cnn.Linear):
            inputs.append(a)
            W = params[start]
            a = a @ W.T + (params[start + 1] if layer.bias else 0.0)
            start += 2 if layer.bias else 1
        else:
            a = numpy_acts[type(layer)](a)
    return inputs


def shared_axis_problem(seed=0, N=5, S=4, D=3, C=2, splits=(2,)):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, S, D))
    return rng, X, split(X, rng.normal(size=(N, S, C)), splits)


# -- exactness -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mse", "ce", "bce", "poisson"])
@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("widths", [(3, 2), (3, 4, 3)])
def test_type2_exact_on_a_single_datum(name, separate, widths):
    """On one datum every layer's GGN block is (sum_r g_r g_r^T) (x) a a^T: K-FAC is exact."""
    model, _, params, data, *_, loss = problem(name, widths=widths, N=1, splits=(), seed=1)
    K = KFACLinearOperator(model, loss, params, data, separate_weight_and_bias=separate)
    assert_blocks_equal(
        K.to_dense(), ggn(model, loss, params, data), params, layer_groups(model, separate)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("separate", [True, False])
def test_type2_exact_for_linear_regression(reduction, separate):
    model, _, params, data, *_, loss = problem(
        "mse", widths=(4, 3), N=9, splits=(2, 6), reduction=reduction, seed=2
    )
    K = KFACLinearOperator(model, loss, params, data, separate_weight_and_bias=separate)
    assert_blocks_equal(
        K.to_dense(), ggn(model, loss, params, data), params, layer_groups(model, separate)
    )


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("identity_layers", [True, False])
def test_type2_exact_for_deep_linear_networks(separate, identity_layers):
    """Squared loss, no activations: every layer's block is exact over many data."""
    widths = (3, 4, 2, 3)
    if identity_layers:
        model, _, params, data, *_, loss = problem(
            "mse", widths=widths, activation="identity", N=8, splits=(3,), seed=3
        )
    else:
        layers = [cnn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        model = cnn.Sequential(*layers)
        params = model.init(3, xp=xp, dtype=xp.float64)
        rng = np.random.default_rng(3)
        data = split(rng.normal(size=(8, 3)), rng.normal(size=(8, 3)), (3,))
        loss = cl.MSELoss()
    K = KFACLinearOperator(model, loss, params, data, separate_weight_and_bias=separate)
    assert_blocks_equal(
        K.to_dense(), ggn(model, loss, params, data), params, layer_groups(model, separate)
    )


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("depth", [1, 2])
def test_expand_exact_for_a_weight_shared_over_independent_positions(separate, depth):
    """Positions that do not interact: every (n, s) is a datum, and 'expand' is exact."""
    _, _, data = shared_axis_problem(seed=4)
    layers = [cnn.Linear(3, 2)] if depth == 1 else [cnn.Linear(3, 4), cnn.Linear(4, 2)]
    model = cnn.Sequential(*layers)
    params = model.init(4, xp=xp, dtype=xp.float64)
    loss = cl.MSELoss()
    K = KFACLinearOperator(
        model, loss, params, data, kfac_approx="expand", separate_weight_and_bias=separate
    )
    G = ggn(model, loss, params, data)
    assert_blocks_equal(K.to_dense(), G, params, layer_groups(model, separate))
    # 'reduce' is a different approximation here, not exact: the test is not vacuous.
    R = KFACLinearOperator(
        model, loss, params, data, kfac_approx="reduce", separate_weight_and_bias=separate
    ).to_dense()
    first = layer_groups(model, separate)[0]
    assert not np.allclose(block(R, params, first), block(G, params, first), rtol=1e-3)


def mean_over_positions_model(S, D=3, C=2):
    """A shared Linear layer whose outputs are averaged over the S positions.

    ``Linear(D, C)`` on ``(N, S, D)``, flattened to ``(N, S * C)``, then a bias-free
    Linear layer whose weight is fixed at ``[I ... I] / S``: f_n = W mean_s(a_ns) + b.
    """
    model = cnn.Sequential(cnn.Linear(D, C), cnn.Flatten(), cnn.Linear(S * C, C, bias=False))
    params = model.init(5, xp=xp, dtype=xp.float64)
    params[2] = np.tile(np.eye(C), (1, S)) / S
    return model, params


@pytest.mark.parametrize("separate", [True, False])
def test_reduce_exact_for_a_shared_layer_averaged_over_positions(separate):
    S = 4
    rng = np.random.default_rng(5)
    X = rng.normal(size=(7, S, 3))
    data = split(X, rng.normal(size=(7, 2)), (3,))
    model, params = mean_over_positions_model(S)
    loss = cl.MSELoss()
    G = ggn(model, loss, params, data)
    groups = layer_groups(model, separate)
    R = KFACLinearOperator(
        model, loss, params, data, kfac_approx="reduce", separate_weight_and_bias=separate
    )
    assert_blocks_equal(R.to_dense(), G, params, groups)
    E = KFACLinearOperator(
        model, loss, params, data, kfac_approx="expand", separate_weight_and_bias=separate
    ).to_dense()
    assert not np.allclose(block(E, params, groups[0]), block(G, params, groups[0]), rtol=1e-3)


@given(
    widths=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    separate=st.booleans(),
    bias=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_property_exact_for_deep_linear_networks(widths, sizes, separate, bias, reduction, seed):
    """Any widths, batch sizes and splits: deep linear + squared loss is exact per layer."""
    rng = np.random.default_rng(seed)
    layers = [cnn.Linear(a, b, bias=bias) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    model = cnn.Sequential(*layers)
    params = model.init(seed, xp=xp, dtype=xp.float64)
    data = [(rng.normal(size=(n, widths[0])), rng.normal(size=(n, widths[-1]))) for n in sizes]
    loss = cl.MSELoss(reduction=reduction)
    K = KFACLinearOperator(
        model, loss, params, data, separate_weight_and_bias=separate, check_deterministic=False
    )
    assert_blocks_equal(
        K.to_dense(), ggn(model, loss, params, data), params, layer_groups(model, separate)
    )


def test_num_data_scales_the_output_factor_only():
    model, _, params, data, *_, loss = problem("ce", widths=(3, 4, 3), N=6, splits=(2,))
    K = KFACLinearOperator(model, loss, params, data)
    K12 = KFACLinearOperator(model, loss, params, data, num_data=12)
    for name in K.output_factors:
        assert_close(K12.output_factors[name], K.output_factors[name] / 2)
        assert_close(K12.input_factors[name], K.input_factors[name])


# -- other fisher types ----------------------------------------------------------------


@pytest.mark.parametrize("separate", [True, False])
def test_forward_only_equals_identity_kron_input_covariance(separate):
    model, _, params, data, X, *_, loss = problem("ce", widths=(3, 4, 3), N=7, splits=(4,))
    K = KFACLinearOperator(
        model, loss, params, data, fisher_type="forward-only", separate_weight_and_bias=separate
    ).to_dense()
    blocks = []
    for a, W in zip(numpy_layer_inputs(model, params, X), params[::2], strict=True):
        d_out = W.shape[0]
        if separate:
            blocks += [np.kron(np.eye(d_out), a.T @ a / len(a)), np.eye(d_out)]
        else:
            a1 = np.hstack([a, np.ones((len(a), 1))])
            blocks.append(np.kron(np.eye(d_out), a1.T @ a1 / len(a)))
    if separate:
        import scipy.linalg

        expected = scipy.linalg.block_diag(*blocks)
    else:
        expected = np.zeros_like(K)
        for joint, group in zip(blocks, layer_groups(model, False), strict=True):
            ix = indices(params, group)
            expected[np.ix_(ix, ix)] = from_joint_order(joint, params[group[0]].shape)
    assert_close(K, expected)


def test_empirical_equals_per_sample_gradient_outer_product_on_a_single_datum():
    model, _, params, data, *_, loss = problem("ce", widths=(3, 4, 3), N=1, splits=())
    for separate in (True, False):
        K = KFACLinearOperator(
            model, loss, params, data, fisher_type="empirical", separate_weight_and_bias=separate
        ).to_dense()
        E = cl.EFLinearOperator(model, loss, params, data).to_dense()
        assert_blocks_equal(K, E, params, layer_groups(model, separate))


def test_mc_converges_to_type2_in_expectation():
    model, _, params, data, *_, loss = problem("ce", widths=(3, 4, 3), N=5, splits=(2,), seed=6)
    exact = KFACLinearOperator(model, loss, params, data)
    draws = {name: [] for name in exact.output_factors}
    for seed in range(300):
        K = KFACLinearOperator(
            model,
            loss,
            params,
            data,
            fisher_type="mc",
            mc_samples=64,
            seed=seed,
            check_deterministic=False,
        )
        for name, B in K.output_factors.items():
            draws[name].append(B)
        for name, A in K.input_factors.items():  # the input factor does not depend on y
            assert_close(A, exact.input_factors[name])
    for name, samples in draws.items():  # each layer, with power against 0.9 and 1.1
        assert_unbiased(samples, exact.output_factors[name])


def test_mc_is_reproducible_and_uses_mc_samples():
    model, _, params, data, *_, loss = problem("ce", widths=(3, 3), N=4, splits=())
    one = KFACLinearOperator(model, loss, params, data, fisher_type="mc", seed=3)
    two = KFACLinearOperator(model, loss, params, data, fisher_type="mc", seed=3)
    other = KFACLinearOperator(model, loss, params, data, fisher_type="mc", seed=4)
    assert np.array_equal(one.output_factors["0"], two.output_factors["0"])
    assert not np.array_equal(one.output_factors["0"], other.output_factors["0"])
    # mc_samples=S averages S samples: its error is that of one sample over sqrt(S),
    # with the one-sample standard deviation from 200 one-sample factors
    singles = np.stack(
        [
            KFACLinearOperator(
                model, loss, params, data, fisher_type="mc", seed=s, check_deterministic=False
            ).output_factors["0"]
            for s in range(200)
        ]
    )
    sd = singles.std(axis=0, ddof=1)
    exact = KFACLinearOperator(model, loss, params, data).output_factors["0"]
    S = 2000
    bound = critical_value(200, sd.size) * sd / np.sqrt(S) + 1e-12 * np.abs(exact).max()
    many = KFACLinearOperator(model, loss, params, data, fisher_type="mc", mc_samples=S)
    assert np.all(np.abs(many.output_factors["0"] - exact) <= bound)
    # power: had mc_samples been ignored (one sample), the bound would catch it: every
    # one-sample factor breaches it
    assert np.all(np.abs(singles - exact).max(axis=(1, 2)) > bound.max())


# -- inverses, damping and exact queries -----------------------------------------------


def _tanh_problem(separate=True, name="ce", seed=7):
    model, _, params, data, *_, loss = problem(name, widths=(3, 4, 3), N=9, splits=(4,), seed=seed)
    return KFACLinearOperator(model, loss, params, data, separate_weight_and_bias=separate), params


def _factored_reference(K, params, shift, separate):
    """NumPy: blockdiag of inv(B + dB I) (x) inv(A + dA I) and inv(B + d I) for biases."""
    expected = np.zeros((K.shape[0],) * 2)
    groups = iter(layer_groups(K.model, separate))
    inv = np.linalg.inv
    for layer in K.layers:
        A, B = K.input_factors[layer.name], K.output_factors[layer.name]
        d_A, d_B, d_bias = shift(A, B)
        weight_block = np.kron(inv(B + d_B * np.eye(len(B))), inv(A + d_A * np.eye(len(A))))
        group = next(groups)
        if not separate:
            weight_block = from_joint_order(weight_block, (layer.d_out, layer.d_in))
        ix = indices(params, group)
        expected[np.ix_(ix, ix)] = weight_block
        if separate:
            ix = indices(params, next(groups))
            expected[np.ix_(ix, ix)] = inv(B + d_bias * np.eye(len(B)))
    return expected


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("damping", [0.0, 1e-2, 0.7])
def test_inverse_exact_and_factored_damping(separate, damping):
    K, params = _tanh_problem(separate, name="mse")
    dense = K.to_dense()
    exact = K.inverse(damping)
    assert isinstance(exact, KroneckerFactoredLinearOperator)
    assert_close(exact.to_dense(), np.linalg.inv(dense + damping * np.eye(len(dense))), 1e-8)
    root = np.sqrt(damping)
    expected = _factored_reference(K, params, lambda A, B: (root, root, damping), separate)
    assert_close(K.factored_inverse(damping).to_dense(), expected, 1e-8)
    if damping == 0.0:  # undamped, the factored inverse is the inverse
        assert_close(K.factored_inverse(0.0).to_dense(), np.linalg.inv(dense), 1e-8)
    else:  # damped, the two differ: the factored one is a different matrix
        distance = np.linalg.norm(K.factored_inverse(damping).to_dense() - exact.to_dense())
        assert distance > 1e-3 * np.linalg.norm(exact.to_dense())
    # K + d I through damped(): exact inverse and log-determinant
    assert_close(K.damped(damping).inverse().to_dense(), exact.to_dense(), 1e-12)
    sign, logdet = np.linalg.slogdet(dense + damping * np.eye(len(dense)))
    assert sign > 0
    assert_close(K.damped(damping).logdet(), logdet, 1e-9)


@pytest.mark.parametrize("separate", [True, False])
def test_heuristic_pi_damping_against_its_formula(separate):
    K, params = _tanh_problem(separate, name="ce")
    d, min_damping = 0.3, 1e-8

    def pi_shift(A, B):
        pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(B) / len(B)))
        return max(pi * np.sqrt(d), min_damping), max(np.sqrt(d) / pi, min_damping), d

    expected = _factored_reference(K, params, pi_shift, separate)
    result = K.factored_inverse(d, pi_damping=True, min_damping=min_damping)
    assert_close(result.to_dense(), expected, 1e-8)
    # The shifts are clamped from below by min_damping.
    floor = 0.05
    clamped = K.factored_inverse(0.0, pi_damping=True, min_damping=floor)
    expected = _factored_reference(K, params, lambda A, B: (floor, floor, floor), separate)
    assert_close(clamped.to_dense(), expected, 1e-8)


def test_queries_against_numpy_on_the_dense_matrix():
    for separate in (True, False):
        K, _ = _tanh_problem(separate, name="mse")
        dense = K.to_dense()
        assert_close(dense, dense.T, 0, 1e-14)
        assert_close(K.trace(), np.trace(dense))
        assert_close(K.diagonal(), np.diag(dense))
        assert_close(K.frobenius_norm(), np.linalg.norm(dense))
        sign, logdet = np.linalg.slogdet(dense)
        assert sign > 0
        assert_close(K.logdet(), logdet, 1e-9)
        X = np.random.default_rng(0).normal(size=(K.shape[1], 3))
        assert_close(K @ X, dense @ X)
        assert_close(K @ X[:, 0], dense @ X[:, 0])
        inv = K.inverse(0.2)
        assert_close(inv.trace(), np.trace(inv.to_dense()))
        assert_close(inv.diagonal(), np.diag(inv.to_dense()))
        assert_close(inv.logdet(), np.linalg.slogdet(inv.to_dense())[1], 1e-9)


def test_singular_factor_raises_factorization_error_naming_layer_and_factor():
    # A bottleneck (4 -> 2 -> 3): the output factor of the first layer is W2^T W2 (x) ...,
    # of rank 2 < 4, so the undamped inverse does not exist.
    model, _, params, data, *_, loss = problem(
        "mse", widths=(3, 4, 2), activation="identity", N=6, splits=()
    )
    params[2] = np.vstack([params[2][:1], params[2][:1]])  # rank-1 W2 makes B of layer 0 singular
    K = KFACLinearOperator(model, loss, params, data)
    with pytest.raises(FactorizationError, match=r"output factor B of layer '0'.*damping"):
        K.factored_inverse(0.0)
    with pytest.raises(FactorizationError, match=r"weight block of layer '0'.*singular.*damping"):
        K.inverse()
    K.factored_inverse(1e-3)  # damping makes it invertible
    K.inverse(1e-3)


def test_factored_inverse_reuses_the_cached_eigendecompositions(monkeypatch):
    """Both inverses come from one eigendecomposition per factor; new dampings reuse it."""
    K, _ = _tanh_problem(True, name="mse")
    import curvlinops.linalg.structured as structured

    calls = []
    real = structured.checked_eigh

    def counting(A, *args, **kwargs):
        calls.append(A.shape)
        return real(A, *args, **kwargs)

    monkeypatch.setattr(structured, "checked_eigh", counting)
    K.inverse(0.1)
    first = len(calls)
    K.factored_inverse(0.2, pi_damping=True)
    K.inverse(0.3)
    K.factored_inverse(0.4)
    assert first == 2 * len(K.layers) and len(calls) == first


@pytest.mark.parametrize("separate", [True, False])
def test_factored_inverse_without_eigenvectors(separate, monkeypatch):
    """Fresh factors: the factored inverse takes only eigenvalues (for the conditioning
    rule) and Cholesky inverses, and equals the formula; after the exact inverse has
    cached the eigenvectors it uses them and gives the same matrix."""
    K, params = _tanh_problem(separate, name="ce")
    import curvlinops.linalg.structured as structured

    calls = []
    real = structured.checked_eigh
    monkeypatch.setattr(
        structured, "checked_eigh", lambda A, *a, **k: calls.append(A.shape) or real(A, *a, **k)
    )
    d = 0.3

    def pi_shift(A, B):
        pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(B) / len(B)))
        return pi * np.sqrt(d), np.sqrt(d) / pi, d

    expected = _factored_reference(K, params, pi_shift, separate)
    fresh = K.factored_inverse(d, pi_damping=True).to_dense()
    assert calls == []
    assert_close(fresh, expected, 1e-12)
    K.inverse(d)
    assert len(calls) == 2 * len(K.layers)
    assert_close(K.factored_inverse(d, pi_damping=True).to_dense(), expected, 1e-12)


# -- backends, other models, errors ----------------------------------------------------


def test_products_on_every_backend(backend):
    """Linear regression: K-FAC's blocks are the exact GGN blocks."""
    separate = True
    model, _, params, data, *_, loss = backend_problem()
    G = ggn(model, loss, params, data)
    reference = np.zeros_like(G)
    for group in layer_groups(model, separate):
        ix = indices(params, group)
        reference[np.ix_(ix, ix)] = G[np.ix_(ix, ix)]
    to = backend.asarray
    K = KFACLinearOperator(
        model,
        loss,
        [to(p) for p in params],
        [(to(X), to(y)) for X, y in data],
        separate_weight_and_bias=separate,
        check_deterministic=False,
    )
    V = np.random.default_rng(1).normal(size=(K.shape[1], 3))
    assert_close(backend.to_numpy(K @ to(V)), reference @ V)
    assert_close(backend.to_numpy(K @ to(V[:, 0])), reference @ V[:, 0])
    d = 0.1
    expected_inverse = np.linalg.inv(reference + d * np.eye(len(reference)))
    assert_close(backend.to_numpy(K.inverse(d) @ to(V)), expected_inverse @ V, 1e-8)
    assert_close(backend.to_numpy(K.trace()), np.trace(reference))


def test_forward_only_exact_blocks_are_the_identity_on_the_operators_device(backend):
    """Forward-only K-FAC gives an elementwise layer's ``[w, b]`` the identity as its
    exact block (its output factor), created on the parameters' device."""
    if backend.name not in ("numpy", "array_api_strict"):
        pytest.skip("the device rule is the same for every library; strict checks it")
    model = cnn.Sequential(cnn.Linear(3, 4), cnn.LayerNorm(4), cnn.Linear(4, 2))
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(s) for s in model.expected_param_shapes()]
    X, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    to = backend.asarray
    K = KFACLinearOperator(
        model, cl.MSELoss(), [to(p) for p in params], [(to(X), to(y))],
        fisher_type="forward-only", check_deterministic=False,
    )  # fmt: skip
    dense = backend.to_numpy(K @ to(np.eye(K.shape[1])))
    start = params[0].size + params[1].size  # LayerNorm's weight and bias follow Linear's
    block = dense[start : start + 8, start : start + 8]
    assert_close(block, np.eye(8))
    assert np.all(dense[start : start + 8, :start] == 0)
    assert np.all(dense[start : start + 8, start + 8 :] == 0)


def test_an_embedding_alone_with_squared_loss_is_the_exact_ggn():
    """An embedding is a linear layer on one-hot ids with a per-item loss Hessian that
    is the same for every item: K-FAC (type-2, expand) is its GGN exactly."""
    model = cnn.Sequential(cnn.Embedding(5, 3))
    rng = np.random.default_rng(2)
    params = [rng.standard_normal((5, 3))]
    X, y = rng.integers(0, 5, size=(6, 2)), rng.standard_normal((6, 2, 3))
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    K = KFACLinearOperator(model, cl.MSELoss(), params, data)
    G = cl.GGNLinearOperator(model, cl.MSELoss(), params, data).to_dense()
    assert_close(K.to_dense(), G, 1e-13)


def test_an_exact_block_without_bias_is_one_block_when_weight_and_bias_are_separate():
    """A LayerNorm without bias has one exact block (its weight's) even with
    ``separate_weight_and_bias=True``: the blockwise inverse pairs every block with its
    name and equals the dense inverse."""
    model = cnn.Sequential(cnn.Linear(3, 4), cnn.LayerNorm(4, bias=False), cnn.Linear(4, 2))
    rng = np.random.default_rng(6)
    params = [rng.standard_normal(s) for s in model.expected_param_shapes()]
    data = [(rng.standard_normal((7, 3)), rng.standard_normal((7, 2)))]
    K = KFACLinearOperator(model, cl.MSELoss(), params, data, separate_weight_and_bias=True)
    dense = K.to_dense()
    expected = np.linalg.inv(dense + 0.1 * np.eye(len(dense)))
    assert_close(K.inverse(0.1).to_dense(), expected, 1e-10)


def backend_problem():
    """Linear regression, where K-FAC is exact; small, since JAX compiles every new shape."""
    return problem("mse", widths=(3, 2), N=6, splits=(), seed=8)


def test_torch_frontend_model():
    torch = pytest.importorskip("torch")
    from curvlinops.frontends.torch import TorchModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    model = TorchModel(net)
    rng = np.random.default_rng(9)
    data = [
        (torch.as_tensor(rng.normal(size=(n, 3))), torch.as_tensor(rng.normal(size=(n, 2))))
        for n in (3, 4)
    ]
    K = KFACLinearOperator(model, cl.MSELoss(), model.params, data).to_dense()
    G = cl.GGNLinearOperator(model, cl.MSELoss(), model.params, data).to_dense()
    params = [p.detach().numpy() for p in model.params]
    assert_blocks_equal(K.numpy(), G.numpy(), params, [[0], [1], [2], [3]])

    # a parameter that enters no linear, elementwise-affine or embedding map: PReLU's slope
    prelu = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.PReLU()).double()
    model = TorchModel(prelu)
    with pytest.raises(ValueError, match=r"parameters \[2\].*no tapped layer"):
        KFACLinearOperator(model, cl.MSELoss(), model.params, data)


def test_invalid_arguments():
    model, _, params, data, *_, loss = problem("ce", widths=(3, 3), N=4, splits=())
    for kwargs, match in [
        ({"fisher_type": "hessian"}, "fisher_type"),
        ({"kfac_approx": "mean"}, "kfac_approx"),
        ({"fisher_type": "mc", "mc_samples": 0}, "mc_samples"),
    ]:
        with pytest.raises(ValueError, match=match):
            KFACLinearOperator(model, loss, params, data, **kwargs)
    K = KFACLinearOperator(model, loss, params, data)
    # the exact inverse takes any finite shift, as every operator's inverse does
    dense = K.to_dense()
    spectrum = np.linalg.eigvalsh(dense)
    middle = len(spectrum) // 2
    shift = -0.5 * float(spectrum[middle] + spectrum[middle + 1])  # K + shift I: indefinite
    expected = np.linalg.inv(dense + shift * np.eye(K.shape[0]))
    np.testing.assert_allclose(K.inverse(shift).to_dense(), expected, rtol=1e-8, atol=1e-10)
    assert not K.inverse(shift).is_psd  # a negative shift proves nothing
    with pytest.raises(ValueError, match=r"damping must be a finite number, got inf"):
        K.inverse(float("inf"))
    with pytest.raises(ValueError, match=r"damping must be a finite number >= 0, got -1.0"):
        K.factored_inverse(-1.0)
    with pytest.raises(ValueError, match="min_damping"):
        K.factored_inverse(1.0, pi_damping=True, min_damping=-1e-8)
    with pytest.raises(ValueError, match="damping"):
        K.inverse(float("nan"))
    # the former keyword arguments of inverse still run, with a warning that names the
    # new methods (test_kfac_inverse_algebra checks what they return); others are refused
    for kwargs in ({"exact": True}, {"heuristic_damping": True}):
        with pytest.warns(FutureWarning, match="factored_inverse"):
            K.inverse(1.0, **kwargs)
    with pytest.raises(TypeError):
        K.inverse(1.0, exact_damping=True)


def test_model_without_layer_taps_is_refused():
    from curvlinops.frontends import CallableModel

    model, _, params, data, *_, loss = problem("mse", widths=(2, 2), N=3, splits=())
    lin = model.linearize

    callable_model = CallableModel(
        forward=lambda p, x: model(p, x),
        jvp=lambda p, x, t: lin(p, x).jvp(t),
        vjp=lambda p, x, u: lin(p, x).vjp(u),
    )
    with pytest.raises(cl.MissingTierError, match="layer taps"):
        KFACLinearOperator(callable_model, loss, params, data)


def test_symmetric_psd_for_other_losses_and_reductions():
    """Smoke check across losses and reductions: symmetric PSD with a positive trace."""
    for name in ("bce", "poisson"):
        for reduction in ("mean", "sum"):
            model, _, params, data, *_, loss = problem(name, reduction=reduction, N=5)
            dense = KFACLinearOperator(model, loss, params, data).to_dense()
            assert_close(dense, dense.T, 0, 1e-14)
            assert np.linalg.eigvalsh(dense).min() >= -1e-12 * np.abs(dense).max()
