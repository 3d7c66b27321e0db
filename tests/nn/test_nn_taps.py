"""Layer taps (tier 3) of curvlinops.nn against the forward pass and the VJP.

The inputs of each Linear layer must equal the forward activations (from the outputs of
the network's prefixes), and the output gradients must reproduce, per cotangent, the
VJP's weight and bias gradients through ``grad_W = sum_n g_n a_n^T``, ``grad_b = sum_n g_n``.
"""

from __future__ import annotations

import numpy as np
import pytest
from nn_reference import build_ours, random_problem

SPECS = [
    ("linear", 4, 5, True),
    ("tanh",),
    ("linear", 5, 5, False),
    ("softplus", 1.0, 20.0),
    ("linear", 5, 2, True),
]
LINEAR_POSITIONS = [0, 2, 4]


@pytest.mark.parametrize(
    ("x_shape", "backend"),
    [((3, 2, 4), name) for name in ("numpy", "array_api_strict", "torch", "jax", "cupy")]
    + [((6, 4), "numpy")],
    indirect=["backend"],
)
def test_taps_reproduce_activations_and_vjp(x_shape, backend):
    model = build_ours(SPECS)
    M = 3
    prob = random_problem(model, x_shape, M, seed=11)
    to = lambda a: backend.asarray(a, "float64")  # noqa: E731
    lin = model.linearize([to(p) for p in prob["params"]], to(prob["x"]))
    taps = lin.layer_taps(to(prob["U"]))
    grads = [backend.to_numpy(g) for g in lin.vjp(to(prob["U"]))]

    assert [t.name for t in taps] == [str(i) for i in LINEAR_POSITIONS]
    assert [(t.weight_index, t.bias_index) for t in taps] == [(0, 1), (2, None), (3, 4)]
    for tap, position in zip(taps, LINEAR_POSITIONS, strict=True):
        prefix = build_ours(SPECS[:position])
        n_prefix = len(prefix.expected_param_shapes())
        expected_inputs = prefix(prob["params"][:n_prefix], prob["x"]) if position else prob["x"]
        np.testing.assert_allclose(backend.to_numpy(tap.inputs), expected_inputs, rtol=1e-12)

        a = backend.to_numpy(tap.inputs)
        g = backend.to_numpy(tap.output_grads)
        d_in, d_out = a.shape[-1], g.shape[-2]
        assert g.shape == a.shape[:-1] + (d_out, M)
        a_rows, g_rows = a.reshape(-1, d_in), g.reshape(-1, d_out, M)
        grad_w = np.einsum("nom,ni->oim", g_rows, a_rows)
        np.testing.assert_allclose(grad_w, grads[tap.weight_index], rtol=1e-10, atol=1e-12)
        if tap.bias_index is not None:
            np.testing.assert_allclose(
                g_rows.sum(axis=0), grads[tap.bias_index], rtol=1e-10, atol=1e-12
            )


def test_taps_without_cotangents_and_with_a_single_one(numpy_backend):
    model = build_ours(SPECS)
    prob = random_problem(model, (5, 4), 1, seed=2)
    lin = model.linearize(prob["params"], prob["x"])
    bare = lin.layer_taps()
    assert all(t.output_grads is None for t in bare)
    np.testing.assert_array_equal(bare[0].inputs, prob["x"])

    single = lin.layer_taps(prob["u"])
    batched = lin.layer_taps(prob["u"][..., None])
    for s, b in zip(single, batched, strict=True):
        assert s.output_grads.shape[-1] == 1
        np.testing.assert_allclose(s.output_grads, b.output_grads, rtol=1e-15)


def test_taps_reject_cotangents_of_the_wrong_shape(numpy_backend):
    model = build_ours(SPECS)
    prob = random_problem(model, (5, 4), 1, seed=2)
    lin = model.linearize(prob["params"], prob["x"])
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        lin.layer_taps(np.ones((5, 3, 2)))
