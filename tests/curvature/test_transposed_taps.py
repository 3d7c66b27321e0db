"""Taps of transposed weights (``s = a W + b``, Flax's kernels) against the native layout.

A model that stores every Linear weight transposed, ``(D_in, D_out)``, and says so in
its taps (``LayerTap.transposed``) must get the same curvature as the native model with
the weights ``(D_out, D_in)``, up to the permutation of the flat parameter vector that
transposes each weight. References: the native operators (tested against dense exact
blocks elsewhere) and that permutation, built with NumPy.

Hand-written taps (no ``matrix_shape``) must read the weight as stored, native or
transposed; taps that contradict the parameters, and data that run dry before the
factors are accumulated, get errors that name the layer or the data (asserted in full).
"""

from __future__ import annotations

import dataclasses
import re

import array_api_compat.numpy as xp
import numpy as np
import pytest

import curvlinops as cl
from curvlinops import nn
from curvlinops.curvature.ekfac import EKFACLinearOperator
from curvlinops.curvature.kfac import KFACLinearOperator
from curvlinops.models import Linearization, Model, Tier


class TransposedWeights(Model):
    """A native MLP whose Linear weights are stored (and tapped) as ``(D_in, D_out)``."""

    tiers = frozenset({Tier.FIRST_ORDER, Tier.LAYER_TAPS})

    def __init__(self, native):
        self.native = native

    def _native(self, params):
        return [p.T if p.ndim == 2 else p for p in params]

    def expected_param_shapes(self):
        return [s[::-1] for s in self.native.expected_param_shapes()]

    def __call__(self, params, x):
        return self.native(self._native(params), x)

    def linearize(self, params, x):
        return _TransposedLinearization(self, params, x)


class _TransposedLinearization(Linearization):
    def __init__(self, model, params, x):
        self.inner = model.native.linearize(model._native(params), x)
        super().__init__(model, params, x, self.inner.outputs)

    def _jvp(self, tangents):
        return self.inner.jvp([np.swapaxes(t, 0, 1) if t.ndim == 3 else t for t in tangents])

    def _vjp(self, cotangents):
        grads = self.inner.vjp(cotangents)
        return [np.swapaxes(g, 0, 1) if g.ndim == 3 else g for g in grads]

    def _layer_taps(self, cotangents):
        return [dataclasses.replace(t, transposed=True) for t in self.inner.layer_taps(cotangents)]


class HandWrittenTaps(Model):
    """A model whose taps do not say ``matrix_shape`` (taps written by hand): the
    weight parameter itself must then be read as the matrix (or its transpose)."""

    tiers = frozenset({Tier.FIRST_ORDER, Tier.LAYER_TAPS})

    def __init__(self, inner, rewrite=None):
        self.inner = inner
        self.rewrite = rewrite or (lambda taps: taps)

    def expected_param_shapes(self):
        return self.inner.expected_param_shapes()

    def __call__(self, params, x):
        return self.inner(params, x)

    def linearize(self, params, x):
        return _HandWrittenLinearization(self, params, x)


class _HandWrittenLinearization(Linearization):
    def __init__(self, model, params, x):
        self.wrapped = model.inner.linearize(params, x)
        super().__init__(model, params, x, self.wrapped.outputs)

    def _jvp(self, tangents):
        return self.wrapped.jvp(tangents)

    def _vjp(self, cotangents):
        return self.wrapped.vjp(cotangents)

    def _layer_taps(self, cotangents):
        taps = self.wrapped.layer_taps(cotangents)
        return self.model.rewrite([dataclasses.replace(t, matrix_shape=None) for t in taps])


def permutation(native_params):
    """Indices ``P`` with ``flat_transposed = flat_native[P]``."""
    index, start = [], 0
    for p in native_params:
        ids = np.arange(start, start + p.size).reshape(p.shape)
        index.append((ids.T if p.ndim == 2 else ids).ravel())
        start += p.size
    return np.concatenate(index)


def problem():
    native = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    params = native.init(0, xp=xp, dtype=xp.float64)
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((5, 3)), rng.integers(0, 3, 5)) for _ in range(2)]
    transposed = TransposedWeights(native)
    return native, params, transposed, [p.T if p.ndim == 2 else p for p in params], data


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
def test_transposed_taps_equal_the_native_layout_permuted(make, separate):
    native, params, transposed, t_params, data = problem()
    loss = cl.CrossEntropyLoss()
    ours = make(transposed, loss, t_params, data, separate_weight_and_bias=separate)
    reference = make(native, loss, params, data, separate_weight_and_bias=separate)
    P = permutation(params)
    dense = reference.to_dense()
    np.testing.assert_allclose(ours.to_dense(), dense[np.ix_(P, P)], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        ours.inverse(0.1).to_dense(), reference.inverse(0.1).to_dense()[np.ix_(P, P)], rtol=1e-10
    )
    if hasattr(ours, "factored_inverse"):
        np.testing.assert_allclose(
            ours.factored_inverse(0.1).to_dense(),
            reference.factored_inverse(0.1).to_dense()[np.ix_(P, P)],
            rtol=1e-10,
        )


@pytest.mark.parametrize("diagonal", [cl.GGNDiagonalLinearOperator, cl.EFDiagonalLinearOperator])
def test_transposed_taps_diagonals(diagonal):
    native, params, transposed, t_params, data = problem()
    loss = cl.CrossEntropyLoss()
    ours = diagonal(transposed, loss, t_params, data).diagonal()
    reference = diagonal(native, loss, params, data).diagonal()
    np.testing.assert_allclose(ours, reference[permutation(params)], rtol=1e-12)


@pytest.mark.parametrize("transposed", [False, True], ids=["native", "transposed"])
@pytest.mark.parametrize("separate", [True, False])
def test_taps_without_matrix_shape_read_the_weight_as_stored(transposed, separate):
    """Hand-written taps (no ``matrix_shape``) of non-square Linear layers: the weight is
    ``(D_out, D_in)``, or ``(D_in, D_out)`` where the tap says ``transposed``."""
    native, params, _, t_params, data = problem()
    loss = cl.CrossEntropyLoss()
    inner = TransposedWeights(native) if transposed else native
    hand = HandWrittenTaps(inner)
    used = t_params if transposed else params
    P = permutation(params) if transposed else np.arange(sum(p.size for p in params))
    for make in (KFACLinearOperator, EKFACLinearOperator):
        ours = make(hand, loss, used, data, separate_weight_and_bias=separate)
        reference = make(native, loss, params, data, separate_weight_and_bias=separate)
        np.testing.assert_allclose(
            ours.to_dense(), reference.to_dense()[np.ix_(P, P)], rtol=1e-12, atol=1e-14
        )
    ours = cl.GGNDiagonalLinearOperator(hand, loss, used, data).diagonal()
    reference = cl.GGNDiagonalLinearOperator(native, loss, params, data).diagonal()
    np.testing.assert_allclose(ours, reference[P], rtol=1e-12)


def _exactly(text):
    """A ``pytest.raises`` pattern that matches ``text`` and nothing else."""
    return "^" + re.escape(text) + "$"


def _replace(i, **changes):
    """A rewrite of the taps that changes tap ``i`` only."""
    return lambda taps: [
        dataclasses.replace(t, **changes) if j == i else t for j, t in enumerate(taps)
    ]


def test_taps_that_contradict_the_parameters_are_refused_with_the_layer_named():
    native, params, *_ = problem()
    square = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    square_params = square.init(0, xp=xp, dtype=xp.float64)
    data = problem()[-1]
    cases = [
        (  # a (3, 4) weight said to be transposed reads as (4, 3): 3 columns, not 4
            native,
            params,
            _replace(1, transposed=True),
            "Layer '2': its weight (parameter 2) must have shape (D_out, 4) for inputs with 4 "
            "features, got (4, 3).",
        ),
        (
            native,
            params,
            _replace(0, bias_index=3),
            "Layer '0': its bias (parameter 3) must have shape (4,), got (3,).",
        ),
        (
            square,
            square_params,
            _replace(1, bias_index=1),
            "Parameter 1 belongs to two tapped layers, '0' and '2'; Kronecker factors need "
            "each layer's parameters to be its own.",
        ),
        (
            native,
            params,
            lambda taps: taps[:1],
            "KFACLinearOperator covers the parameters of the layers the model exposes through "
            "layer taps (linear maps: Linear, convolutions; elementwise affine maps: "
            "normalization), but parameters [2, 3] (shapes [(3, 4), (3,)]) belong to no "
            "tapped layer. Use a model made of such layers (and parameter-free layers), or "
            "another curvature approximation for these parameters.",
        ),
    ]
    for model, p, rewrite, message in cases:
        with pytest.raises(ValueError, match=_exactly(message)):
            KFACLinearOperator(HandWrittenTaps(model, rewrite), cl.CrossEntropyLoss(), p, data)


class _EmptyAfterFirstPass:
    """Data whose batches exist on the first pass only (a loader that runs dry)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        yield from self.batches if self.passes == 1 else []


@pytest.mark.parametrize("make", [KFACLinearOperator, EKFACLinearOperator])
def test_data_that_run_dry_before_the_factors_are_refused(make):
    """With ``num_data`` given and no determinism check, construction peeks at one batch;
    the pass that accumulates the factors must not build them from no data."""
    native, params, *_, data = problem()
    with pytest.raises(
        ValueError, match=_exactly("The data contain no batches; K-FAC needs at least one.")
    ):
        make(
            native,
            cl.CrossEntropyLoss(),
            params,
            _EmptyAfterFirstPass(data),
            num_data=10,
            check_deterministic=False,
        )
