"""Embedding taps (integer ids, a table ``(V, D)``) against the same model on one-hot inputs.

An embedding is the linear map ``onehot(ids) @ table``. A model that takes ids and
exposes its first layer as an ``"embedding"`` tap must get the same curvature as the
native model that takes one-hot vectors through a Linear layer without bias (weight
``table^T``), up to the permutation of the flat parameters that transposes the table.
References: the native operators on one-hot inputs (tested against dense exact blocks
elsewhere), that permutation, and the closed form of the input factor,
``diag(counts) / T``.
"""

from __future__ import annotations

import dataclasses

import array_api_compat.numpy as xp
import numpy as np
import pytest

import curvlinops as cl
from curvlinops import nn
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator
from curvlinops.linalg import DiagonalLinearOperator
from curvlinops.models import Linearization, Model, Tier

V, D, C = 6, 3, 4


class IdsModel(Model):
    """``Linear(tanh(table[ids]))`` over sequences of ids ``(N, S)``, outputs ``(N, C)``."""

    tiers = frozenset({Tier.FIRST_ORDER, Tier.LAYER_TAPS})

    def __init__(self):
        self.native = nn.Sequential(
            nn.Linear(V, D, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(2 * D, C)
        )

    def expected_param_shapes(self):
        return [(V, D), (C, 2 * D), (C,)]

    def _native(self, params):
        return [params[0].T, *params[1:]]

    @staticmethod
    def one_hot(ids):
        return (ids[..., None] == np.arange(V)).astype(np.float64)

    def __call__(self, params, x):
        return self.native(self._native(params), self.one_hot(x))

    def linearize(self, params, x):
        return _IdsLinearization(self, params, x)


class _IdsLinearization(Linearization):
    def __init__(self, model, params, x):
        self.inner = model.native.linearize(model._native(params), model.one_hot(x))
        super().__init__(model, params, x, self.inner.outputs)

    def _jvp(self, tangents):
        return self.inner.jvp([np.swapaxes(tangents[0], 0, 1), *tangents[1:]])

    def _vjp(self, cotangents):
        grads = self.inner.vjp(cotangents)
        return [np.swapaxes(grads[0], 0, 1), *grads[1:]]

    def _layer_taps(self, cotangents):
        taps = self.inner.layer_taps(cotangents)
        first = dataclasses.replace(taps[0], inputs=self.x, kind="embedding")
        return [first, *taps[1:]]


def problem():
    model = IdsModel()
    rng = np.random.default_rng(0)
    table = rng.standard_normal((V, D))
    native = model.native.init(1, xp=xp, dtype=xp.float64)
    params = [table, native[1], native[2]]
    # ids with distinct counts (so that the eigenbasis of the input factor is unique) and
    # one id that never occurs
    ids = np.array([[0, 1], [1, 2], [2, 2], [3, 3], [3, 3], [1, 3], [2, 3], [3, 0]])
    y = rng.integers(0, C, len(ids))
    data = [(ids[:5], y[:5]), (ids[5:], y[5:])]
    native_data = [(model.one_hot(X), t) for X, t in data]
    return model, params, data, native_data


def native_index():
    """Indices ``P`` with ``flat_ids_model = flat_native[P]``."""
    weight = np.arange(D * V).reshape(D, V)  # native: table^T
    rest = np.arange(D * V, D * V + C * 2 * D + C)
    return np.concatenate([weight.T.ravel(), rest])


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize(
    "make",
    [
        KFACLinearOperator,
        EKFACLinearOperator,
        lambda *a, **k: KFACLinearOperator(*a, fisher_type="empirical", **k),
    ],
    ids=["kfac", "ekfac", "kfac-empirical"],
)
def test_embedding_taps_equal_one_hot_inputs_permuted(make, separate):
    model, params, data, native_data = problem()
    loss = cl.CrossEntropyLoss()
    ours = make(model, loss, params, data, separate_weight_and_bias=separate)
    reference = make(
        model.native, loss, model._native(params), native_data, separate_weight_and_bias=separate
    )
    P = native_index()
    np.testing.assert_allclose(
        ours.to_dense(), reference.to_dense()[np.ix_(P, P)], rtol=1e-11, atol=1e-14
    )
    np.testing.assert_allclose(
        ours.inverse(0.1).to_dense(),
        reference.inverse(0.1).to_dense()[np.ix_(P, P)],
        rtol=1e-10,
        atol=1e-13,
    )


def test_embedding_input_factor_is_the_diagonal_of_the_id_counts():
    model, params, data, _ = problem()
    K = KFACLinearOperator(model, cl.CrossEntropyLoss(), params, data)
    ids = np.concatenate([X for X, _ in data]).ravel()
    counts = np.bincount(ids, minlength=V)
    np.testing.assert_allclose(K.input_factors["0"], counts / ids.size, rtol=1e-14)
    assert isinstance(K._factor_ops["0"][0][1], DiagonalLinearOperator)
    # the factored inverse keeps it diagonal: (A + d I)^{-1} = diag(1 / (counts / T + d))
    factored = K.factored_inverse(0.04)
    np.testing.assert_allclose(
        factored.to_dense(),
        np.linalg.inv(_factored_dense(K, 0.2)),
        rtol=1e-10,
    )


def _factored_dense(K, root):
    """The factored damped matrix ``(B + r I) (x) (A + r I)`` per block, densely."""
    B, A = K.output_factors["0"], np.diag(K.input_factors["0"])
    blocks = [np.kron(np.diag(np.diag(A)) + root * np.eye(V), B + root * np.eye(D))]
    B1, A1 = K.output_factors["3"], K.input_factors["3"]
    blocks.append(np.kron(B1 + root * np.eye(C), A1 + root * np.eye(2 * D)))
    blocks.append(B1 + 0.04 * np.eye(C))
    size = sum(b.shape[0] for b in blocks)
    out, start = np.zeros((size, size)), 0
    for b in blocks:
        out[start : start + b.shape[0], start : start + b.shape[0]] = b
        start += b.shape[0]
    return out


@pytest.mark.parametrize("diagonal", [cl.GGNDiagonalLinearOperator, cl.EFDiagonalLinearOperator])
def test_embedding_taps_in_the_diagonals(diagonal):
    model, params, data, native_data = problem()
    loss = cl.CrossEntropyLoss()
    ours = diagonal(model, loss, params, data).diagonal()
    reference = diagonal(model.native, loss, model._native(params), native_data).diagonal()
    np.testing.assert_allclose(ours, reference[native_index()], rtol=1e-12)


def test_the_exact_inverse_keeps_the_embedding_basis_unformed():
    """``(B (x) diag(a) + d I)^{-1}``: the diagonal factor's eigenbasis is the standard one,
    kept as its size (no V x V identity), and the inverse is still exact."""
    model, params, data, _ = problem()
    K = KFACLinearOperator(model, cl.CrossEntropyLoss(), params, data)
    inverse = K.inverse(0.1)
    embedding_block = inverse.operator.blocks[0]
    assert V in embedding_block.eigenvectors  # the int V: the identity, never formed
    dense = K.to_dense()
    expected = np.linalg.inv(dense + 0.1 * np.eye(dense.shape[0]))
    np.testing.assert_allclose(
        inverse.to_dense(), expected, rtol=1e-10, atol=1e-13 * np.abs(expected).max()
    )
    E = EKFACLinearOperator(model, cl.CrossEntropyLoss(), params, data)
    assert E.input_eigenvectors["0"] == V


@pytest.mark.parametrize("Op", [KFACLinearOperator, EKFACLinearOperator])
def test_embedding_statistics_keep_float32(backend, Op):
    """The one-hot rows and id counts of an embedding are built in the operator's dtype:
    float32 operators stay float32 on every backend (array-api-strict refuses a dtype of
    None) and agree with float64 to float32 precision."""
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
    rng = np.random.default_rng(11)
    data = [(rng.integers(0, 5, (6, 2)), rng.integers(0, 2, 6))]
    params = model.init(0, xp=xp, dtype=xp.float64)
    reference = Op(model, cl.CrossEntropyLoss(), params, data).to_dense()
    to = backend.asarray
    op = Op(
        model,
        cl.CrossEntropyLoss(),
        [to(p, "float32") for p in params],
        [(to(X), to(y)) for X, y in data],
        check_deterministic=False,
    )
    dense = op.to_dense()
    assert str(dense.dtype).endswith("float32")
    np.testing.assert_allclose(backend.to_numpy(dense), reference, rtol=1e-4, atol=1e-6)
