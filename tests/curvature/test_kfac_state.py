"""Curvature across steps: one-batch EMA updates and saved states of K-FAC and EKFAC.

References: K-FAC operators built on each batch alone (their factors are checked against
exact GGN blocks in test_kfac.py), the exact GGN operator's dense blocks rotated into
the eigenbasis with ``numpy.kron`` and ``numpy.linalg.eigh``, and uninterrupted runs
(for exact, bit-level continuation after a save through ``numpy.savez``).
"""

from __future__ import annotations

import io

import array_api_compat.numpy as np_xp
import numpy as np
import pytest

import curvlinops as cl
import curvlinops.nn as cnn
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator


def setup(seed=0, sizes=(8, 5, 6, 7), loss="ce"):
    model = cnn.Sequential(cnn.Linear(3, 4), cnn.Tanh(), cnn.Linear(4, 3))
    params = model.init(seed, xp=np_xp, dtype=np_xp.float64)
    rng = np.random.default_rng(seed)

    def target(n):
        return rng.integers(0, 3, size=n) if loss == "ce" else rng.normal(size=(n, 3))

    batches = [(rng.normal(size=(n, 3)), target(n)) for n in sizes]
    return model, params, batches


def LOSS(loss, reduction="mean"):
    return cl.CrossEntropyLoss(reduction=reduction) if loss == "ce" else cl.MSELoss(reduction)


def alone(cls, model, loss, params, batch, **kw):
    return cls(model, loss, params, [batch], check_deterministic=False, **kw)


def npz_round_trip(state):
    file = io.BytesIO()
    np.savez(file, **state)
    file.seek(0)
    return dict(np.load(file, allow_pickle=False))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("separate", [True, False])
def test_kfac_ema_is_the_weighted_sum_of_the_batches_factors(reduction, separate):
    model, params, batches = setup(1)
    loss = LOSS("ce", reduction)
    kw = {"separate_weight_and_bias": separate}
    K = alone(KFACLinearOperator, model, loss, params, batches[0], **kw)
    N0 = batches[0][0].shape[0]
    expected_A = dict(K.input_factors)
    expected_B = dict(K.output_factors)
    for batch, decay in zip(batches[1:], (0.9, 0.5, 0.0), strict=True):
        K.update(batch, decay)
        single = alone(KFACLinearOperator, model, loss, params, batch, **kw)
        # "sum": the batch sum estimates the data set's (N0 points) sum
        ratio = N0 / batch[0].shape[0] if reduction == "sum" else 1.0
        for name in expected_A:
            expected_A[name] = decay * expected_A[name] + (1 - decay) * single.input_factors[name]
            expected_B[name] = (
                decay * expected_B[name] + (1 - decay) * ratio * single.output_factors[name]
            )
    for name in expected_A:
        np.testing.assert_allclose(K.input_factors[name], expected_A[name], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(K.output_factors[name], expected_B[name], rtol=1e-13, atol=1e-15)
    assert K.num_updates == 3


def test_kfac_update_at_new_parameters_takes_the_batch_there():
    model, params, batches = setup(2)
    loss = LOSS("ce")
    K = alone(KFACLinearOperator, model, loss, params, batches[0])
    moved = [p + 0.3 for p in params]
    K.update(batches[1], decay=0.0, params=moved)
    there = alone(KFACLinearOperator, model, loss, moved, batches[1])
    np.testing.assert_allclose(K.to_dense(), there.to_dense(), rtol=1e-13, atol=1e-15)


def test_update_refuses_a_decay_outside_zero_one():
    model, params, batches = setup(3)
    K = alone(KFACLinearOperator, model, LOSS("ce"), params, batches[0])
    with pytest.raises(ValueError, match="decay"):
        K.update(batches[1], 1.5)


def rotated_diagonal(G, Q_B, Q_A):
    """``diag((Q_B (x) Q_A)^T G (Q_B (x) Q_A))`` as ``(D_out, D_in)``."""
    Q = np.kron(Q_B, Q_A)
    return np.diag(Q.T @ G @ Q).reshape(Q_B.shape[0], Q_A.shape[0])


def weight_and_bias_slices(params):
    offsets = np.cumsum([0] + [p.size for p in params])
    return [slice(offsets[i], offsets[i + 1]) for i in range(len(params))]


@pytest.mark.parametrize("refresh", [False, True])
def test_ekfac_update_against_dense_blocks_in_the_eigenbasis(refresh):
    model, params, batches = setup(4)
    loss = LOSS("ce")
    E = alone(EKFACLinearOperator, model, loss, params, batches[0])
    E0 = E.to_dense()
    decay = 0.7
    old_basis = {n: (E.output_eigenvectors[n], E.input_eigenvectors[n]) for n in E.scalings}
    K0 = alone(KFACLinearOperator, model, loss, params, batches[0])
    K1 = alone(KFACLinearOperator, model, loss, params, batches[1])
    E.update(batches[1], decay, refresh_basis=refresh)
    G1 = cl.GGNLinearOperator(model, loss, params, [batches[1]]).to_dense()
    slices = weight_and_bias_slices(params)
    for i, name in enumerate(["0", "2"]):
        A = decay * K0.input_factors[name] + (1 - decay) * K1.input_factors[name]
        B = decay * K0.output_factors[name] + (1 - decay) * K1.output_factors[name]
        np.testing.assert_allclose(E.input_factors[name], A, rtol=1e-13, atol=1e-15)
        if refresh:  # eigenvectors of the averaged factors (eigh's own signs and order)
            Q_B, Q_A = np.linalg.eigh(B)[1], np.linalg.eigh(A)[1]
        else:
            Q_B, Q_A = old_basis[name]
        w, b = slices[2 * i], slices[2 * i + 1]
        s_w = decay * rotated_diagonal(E0[w, w], Q_B, Q_A) + (1 - decay) * rotated_diagonal(
            G1[w, w], Q_B, Q_A
        )
        s_b = decay * np.diag(Q_B.T @ E0[b, b] @ Q_B) + (1 - decay) * np.diag(
            Q_B.T @ G1[b, b] @ Q_B
        )
        Q = np.kron(Q_B, Q_A)
        dense = E.to_dense()
        np.testing.assert_allclose(dense[w, w], Q @ np.diag(s_w.ravel()) @ Q.T, atol=1e-13)
        np.testing.assert_allclose(dense[b, b], Q_B @ np.diag(s_b) @ Q_B.T, atol=1e-13)


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_npz_round_trip_restores_the_same_operator(cls):
    model, params, batches = setup(5)
    loss = LOSS("ce")
    op = alone(cls, model, loss, params, batches[0])
    op.update(batches[1], 0.8)
    state = op.state_dict()
    loaded = npz_round_trip(state)
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert loaded[key].dtype.kind != "O"  # no pickled objects
        np.testing.assert_array_equal(loaded[key], value)
    restored = cls.from_state_dict(loaded, model, loss, params)
    assert restored.data is None and restored.num_updates == 1
    np.testing.assert_array_equal(restored.to_dense(), op.to_dense())
    np.testing.assert_array_equal(restored.inverse(0.1).to_dense(), op.inverse(0.1).to_dense())


@pytest.mark.parametrize(
    ("cls", "fisher_type"),
    [
        (KFACLinearOperator, "type-2"),
        (KFACLinearOperator, "mc"),
        (EKFACLinearOperator, "type-2"),
        (EKFACLinearOperator, "mc"),
    ],
)
def test_resuming_from_a_saved_state_continues_bit_identically(cls, fisher_type):
    model, params, batches = setup(6, sizes=(6, 6, 6, 6, 6))
    loss = LOSS("ce")
    steps = [[p + 0.05 * k for p in params] for k in range(4)]

    def run(op, ks):
        for k in ks:
            kw = {"refresh_basis": k % 2 == 0} if cls is EKFACLinearOperator else {}
            op.update(batches[k + 1], 0.9, params=steps[k], **kw)
        return op

    kw = {"fisher_type": fisher_type, "seed": 3}
    straight = run(alone(cls, model, loss, params, batches[0], **kw), range(4))
    first = run(alone(cls, model, loss, params, batches[0], **kw), range(2))
    state = npz_round_trip(first.state_dict())
    resumed = run(cls.from_state_dict(state, model, loss, steps[1]), range(2, 4))
    assert np.array_equal(resumed.to_dense(), straight.to_dense())
    assert np.array_equal(resumed.inverse(1e-2).to_dense(), straight.inverse(1e-2).to_dense())
    # load_state_dict into an existing operator continues the same way
    other = alone(cls, model, loss, params, batches[3], **kw).load_state_dict(state)
    assert np.array_equal(run(other, range(2, 4)).to_dense(), straight.to_dense())


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_restore_on_torch_within_dtype_precision(cls):
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as torch_xp

    model, params, batches = setup(7)
    loss = LOSS("ce")
    op = alone(cls, model, loss, params, batches[0])
    state = npz_round_trip(op.state_dict())
    for dtype, rtol in ((torch.float64, 1e-14), (torch.float32, 1e-5)):
        t_params = [torch_xp.asarray(p, dtype=dtype) for p in params]
        restored = cls.from_state_dict(state, model, loss, t_params)
        if dtype == torch.float64:  # the arrays themselves come back exactly
            for name, A in op.input_factors.items():
                assert np.array_equal(restored.input_factors[name].numpy(), A)
        dense = restored.to_dense()
        assert isinstance(dense, torch.Tensor) and dense.dtype == dtype
        np.testing.assert_allclose(dense.numpy(), op.to_dense(), rtol=rtol, atol=10 * rtol)
    # and it keeps updating on torch like the NumPy operator does
    t_params = [torch_xp.asarray(p) for p in params]
    restored = cls.from_state_dict(state, model, loss, t_params)
    X, y = batches[1]
    restored.update((torch.asarray(X), torch.asarray(y)), 0.5)
    op.update(batches[1], 0.5)
    np.testing.assert_allclose(restored.to_dense().numpy(), op.to_dense(), rtol=1e-10, atol=1e-12)


def test_load_state_dict_refuses_another_class_or_layout():
    model, params, batches = setup(8)
    loss = LOSS("ce")
    K = alone(KFACLinearOperator, model, loss, params, batches[0])
    E = alone(EKFACLinearOperator, model, loss, params, batches[0])
    with pytest.raises(ValueError, match="EKFACLinearOperator"):
        K.load_state_dict(E.state_dict())
    wide = cnn.Sequential(cnn.Linear(3, 5), cnn.Tanh(), cnn.Linear(5, 3))
    wide_params = wide.init(0, xp=np_xp, dtype=np_xp.float64)
    other = alone(KFACLinearOperator, wide, loss, wide_params, batches[0])
    with pytest.raises(ValueError, match="layers"):
        K.load_state_dict(other.state_dict())


def test_kfac_ema_of_an_elementwise_layer_averages_its_exact_block():
    # LayerNorm's affine parameters have an exact block (no input factor): averaged too
    model = cnn.Sequential(cnn.Linear(3, 4), cnn.LayerNorm(4), cnn.Tanh(), cnn.Linear(4, 3))
    params = model.init(3, xp=np_xp, dtype=np_xp.float64)
    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=(n, 3)), rng.integers(0, 3, size=n)) for n in (6, 5)]
    loss = LOSS("ce")
    K = alone(KFACLinearOperator, model, loss, params, batches[0])
    assert K.exact_blocks, "the LayerNorm block is exact"
    expected = {k: 0.75 * v for k, v in K.exact_blocks.items()}
    K.update(batches[1], 0.75)
    single = alone(KFACLinearOperator, model, loss, params, batches[1])
    for name, block in single.exact_blocks.items():
        np.testing.assert_allclose(K.exact_blocks[name], expected[name] + 0.25 * block, rtol=1e-13)


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_round_trip_keeps_an_embeddings_transposed_layout(cls):
    """An embedding's weight (V, D) is transposed against a linear layer's (D_out, D_in):
    its block is A (x) B, not B (x) A. The restored operator must lay it out the same."""
    model = cnn.Sequential(cnn.Embedding(5, 4), cnn.Tanh(), cnn.Linear(4, 3))
    params = model.init(9, xp=np_xp, dtype=np_xp.float64)
    rng = np.random.default_rng(9)
    batch = (rng.integers(0, 5, size=(6, 2)), rng.integers(0, 3, size=(6, 2)))
    op = alone(cls, model, LOSS("ce"), params, batch)
    restored = cls.from_state_dict(npz_round_trip(op.state_dict()), model, LOSS("ce"), params)
    np.testing.assert_array_equal(restored.to_dense(), op.to_dense())


def test_round_trip_keeps_exact_blocks_and_reads_states_saved_before_groups():
    """LayerNorm's exact block travels in the state; a state saved before layers had
    groups (no ``layer_groups`` entry) is read as one group per layer."""
    model = cnn.Sequential(cnn.Linear(3, 4), cnn.LayerNorm(4), cnn.Tanh(), cnn.Linear(4, 3))
    params = model.init(3, xp=np_xp, dtype=np_xp.float64)
    rng = np.random.default_rng(3)
    batch = (rng.normal(size=(6, 3)), rng.integers(0, 3, size=6))
    K = alone(KFACLinearOperator, model, LOSS("ce"), params, batch)
    assert K.exact_blocks
    state = npz_round_trip(K.state_dict())
    restored = KFACLinearOperator.from_state_dict(state, model, LOSS("ce"), params)
    np.testing.assert_array_equal(restored.to_dense(), K.to_dense())
    del state["layer_groups"]
    older = KFACLinearOperator.from_state_dict(state, model, LOSS("ce"), params)
    np.testing.assert_array_equal(older.to_dense(), K.to_dense())
