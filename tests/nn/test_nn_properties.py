"""Property tests of curvlinops.nn (NumPy): random MLPs against finite differences.

Hypothesis draws the depth (1-3 Linear layers), widths, activations, batch size, an
optional shared axis and the number K of vectors; the JVP is checked against central
finite differences, the VJP by the dot-product test, and the second-order VJP against
finite differences of the VJP.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, strategies as st
from nn_reference import (
    ACTIVATION_SPECS,
    build_ours,
    fd_jvp,
    fd_second_order,
    flat_k,
    random_problem,
)

KINKED = {"relu", "leaky_relu", "elu", "softplus_threshold"}


@st.composite
def networks(draw):
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 5)) for _ in range(depth + 1)]
    specs = []
    for i in range(depth):
        specs.append(("linear", widths[i], widths[i + 1], draw(st.booleans())))
        if i < depth - 1 or draw(st.booleans()):
            specs.append(ACTIVATION_SPECS[draw(st.sampled_from(sorted(ACTIVATION_SPECS)))])
    n = draw(st.integers(1, 4))
    shared = draw(st.sampled_from([(), (2,)]))
    return specs, (n, *shared, widths[0]), draw(st.integers(1, 3)), draw(st.integers(0, 99))


def pre_activations_away_from_kinks(specs, prob, margin=1e-3):
    """Whether no input of a kinked activation lies within ``margin`` of its kink."""
    for i, spec in enumerate(specs):
        name = next((k for k, v in ACTIVATION_SPECS.items() if v == spec), None)
        if name not in KINKED:
            continue
        prefix = build_ours(specs[:i])
        s = prefix(prob["params"][: len(prefix.expected_param_shapes())], prob["x"])
        kink = 0.5 if name == "softplus_threshold" else 0.0
        if np.min(np.abs(s - kink)) < margin:
            return False
    return True


@given(networks())
def test_random_networks_match_finite_differences(network):
    specs, x_shape, K, seed = network
    model = build_ours(specs)
    prob = random_problem(model, x_shape, K, seed)
    assume(pre_activations_away_from_kinks(specs, prob))
    lin = model.linearize(prob["params"], prob["x"])

    jv = lin.jvp(prob["V"])
    fd = fd_jvp(model, prob["params"], prob["x"], prob["V"])
    scale = max(np.max(np.abs(fd)), 1.0)
    np.testing.assert_allclose(jv, fd, rtol=1e-6, atol=1e-6 * scale)

    jtu = flat_k(lin.vjp(prob["U"]))
    lhs = np.sum(np.reshape(prob["U"] * jv, (-1, K)), axis=0)
    rhs = np.sum(jtu * flat_k(prob["V"]), axis=0)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-10 * max(np.max(np.abs(lhs)), 1.0))

    second = flat_k(lin.second_order_vjp(prob["u"], prob["V"], prob["w"]))
    expected = fd_second_order(model, prob["params"], prob["x"], prob["u"], prob["V"])
    expected = expected + flat_k(lin.vjp(prob["w"]))
    scale = max(np.max(np.abs(expected)), 1.0)
    np.testing.assert_allclose(second, expected, rtol=1e-6, atol=1e-6 * scale)
