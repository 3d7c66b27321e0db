"""Diagonals across steps: one-batch EMA updates and saved states of the GGN/EF diagonals.

References: the diagonals of the exact GGN and empirical-Fisher operators of each batch
alone, materialized densely (``numpy.diag`` of ``to_dense()``), weighted by hand; and
uninterrupted runs (for bit-level continuation after a save through ``numpy.savez``).
"""

from __future__ import annotations

import io

import array_api_compat.numpy as np_xp
import numpy as np
import pytest

import curvlinops as cl
import curvlinops.nn as cnn

DIAGONALS = {
    "ggn": (cl.GGNDiagonalLinearOperator, cl.GGNLinearOperator),
    "ef": (cl.EFDiagonalLinearOperator, cl.EFLinearOperator),
}


def setup(seed=0, sizes=(8, 5, 6, 7)):
    model = cnn.Sequential(cnn.Linear(3, 4), cnn.Tanh(), cnn.Linear(4, 3))
    params = model.init(seed, xp=np_xp, dtype=np_xp.float64)
    rng = np.random.default_rng(seed)
    batches = [(rng.normal(size=(n, 3)), rng.integers(0, 3, size=n)) for n in sizes]
    return model, params, batches


def npz_round_trip(state):
    file = io.BytesIO()
    np.savez(file, **state)
    file.seek(0)
    return dict(np.load(file, allow_pickle=False))


@pytest.mark.parametrize("kind", sorted(DIAGONALS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ema_is_the_weighted_sum_of_the_batches_diagonals(kind, reduction):
    diagonal_cls, exact_cls = DIAGONALS[kind]
    model, params, batches = setup(1)
    loss = cl.CrossEntropyLoss(reduction=reduction)
    D = diagonal_cls(model, loss, params, [batches[0]], check_deterministic=False)
    N0 = batches[0][0].shape[0]

    def exact(p, batch):
        # the batch's diagonal as an estimate of the data set's (N0 data points)
        dense = np.diag(exact_cls(model, loss, p, [batch]).to_dense())
        return dense * (N0 / batch[0].shape[0] if reduction == "sum" else 1.0)

    expected = exact(params, batches[0])
    for k, (batch, decay) in enumerate(zip(batches[1:], (0.9, 0.5, 0.0), strict=True)):
        p = [a + 0.1 * (k + 1) for a in params]  # the update at new parameters
        D.update(batch, decay, params=p)
        expected = decay * expected + (1 - decay) * exact(p, batch)
        np.testing.assert_allclose(D.diagonal(), expected, rtol=1e-12, atol=1e-15)
    assert D.num_updates == 3


def test_update_refuses_a_decay_outside_zero_one_and_other_shapes():
    model, params, batches = setup(2)
    D = cl.EFDiagonalLinearOperator(model, cl.CrossEntropyLoss(), params, [batches[0]])
    with pytest.raises(ValueError, match="decay"):
        D.update(batches[1], 1.5)
    with pytest.raises(ValueError, match="shapes"):
        D.update(batches[1], 0.5, params=params[:2])


@pytest.mark.parametrize("kind", sorted(DIAGONALS))
def test_npz_round_trip_restores_the_same_operator(kind):
    diagonal_cls, _ = DIAGONALS[kind]
    model, params, batches = setup(3)
    loss = cl.CrossEntropyLoss()
    D = diagonal_cls(model, loss, params, [batches[0]]).update(batches[1], 0.8)
    state = D.state_dict()
    loaded = npz_round_trip(state)
    assert sorted(loaded) == sorted(state)
    assert all(v.dtype.kind != "O" for v in loaded.values())
    restored = diagonal_cls.from_state_dict(loaded, model, loss, params)
    assert restored.num_updates == 1 and restored.num_data == D.num_data
    np.testing.assert_array_equal(restored.diagonal(), D.diagonal())
    np.testing.assert_array_equal(restored.inverse(0.1).diagonal(), D.inverse(0.1).diagonal())


@pytest.mark.parametrize(
    ("kind", "options"), [("ggn", {}), ("ggn", {"mc_samples": 2, "seed": 4}), ("ef", {})]
)
def test_resuming_from_a_saved_state_continues_bit_identically(kind, options):
    diagonal_cls, _ = DIAGONALS[kind]
    model, params, batches = setup(4, sizes=(6, 6, 6, 6))
    loss = cl.CrossEntropyLoss()
    steps = [[p + 0.05 * k for p in params] for k in range(3)]

    def run(D, ks):
        for k in ks:
            D.update(batches[k + 1], 0.9, params=steps[k])
        return D

    def build():
        return diagonal_cls(model, loss, params, [batches[0]], **options)

    straight = run(build(), range(3))
    state = npz_round_trip(run(build(), range(1)).state_dict())
    resumed = run(diagonal_cls.from_state_dict(state, model, loss, steps[0]), range(1, 3))
    assert np.array_equal(resumed.diagonal(), straight.diagonal())
    other = diagonal_cls(model, loss, params, [batches[2]], **options).load_state_dict(state)
    assert np.array_equal(run(other, range(1, 3)).diagonal(), straight.diagonal())


def test_load_state_dict_refuses_another_class_or_size():
    model, params, batches = setup(5)
    loss = cl.CrossEntropyLoss()
    G = cl.GGNDiagonalLinearOperator(model, loss, params, [batches[0]])
    E = cl.EFDiagonalLinearOperator(model, loss, params, [batches[0]])
    with pytest.raises(ValueError, match="EFDiagonalLinearOperator"):
        G.load_state_dict(E.state_dict())
    wide = cnn.Sequential(cnn.Linear(3, 5), cnn.Tanh(), cnn.Linear(5, 3))
    wide_params = wide.init(0, xp=np_xp, dtype=np_xp.float64)
    other = cl.GGNDiagonalLinearOperator(wide, loss, wide_params, [batches[0]])
    with pytest.raises(ValueError, match="shape"):
        G.load_state_dict(other.state_dict())
