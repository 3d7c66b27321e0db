"""Checks of a model's derivative products against finite differences and each other.

For anything that speaks the model protocol (:class:`curvlinops.Model`): the
Jacobian-vector product against central finite differences, the vector-Jacobian
product by the dot-product test, the second-order product against finite
differences of the vector-Jacobian product, the layer taps against the weight
gradients they imply, the layer protocol's backward rules against the vector-Jacobian
and second-order products, and :func:`verify_model` to run all that a model offers.

Finite differences use the step ``h = eps^(1/3) * max(1, |theta|) / |v|`` of the
parameters' dtype (it balances truncation and rounding errors of central
differences), so the expected relative error is about ``eps^(2/3)``.

May import: ``curvlinops._backend``, ``curvlinops.models``, ``._common``, ``.report``.
"""

from __future__ import annotations

import math

from .._backend import RandomGenerator, array_namespace, device, dtype_eps
from ..models import Capability, Tier
from ..models.protocol import as_requirement
from ._common import dot_product_error, norm, relative_error
from .report import VerificationReport


def tap_outputs(tap) -> int:
    """``D_out`` of a tap: its outputs' feature count."""
    if tap.kind == "elementwise":
        return tap.inputs.shape[-1]
    return tap.matrix_shape[0]


def _features_last(gradient, tap, xp):
    """A gradient of a tapped layer's outputs with its features on the last axis."""
    if tap.channels_first and gradient.ndim > 2:
        return xp.moveaxis(gradient, 1, -1)
    return gradient


def tap_gradients(tap, output_grads, xp, *, vocabulary=None):
    """Weight and bias gradients ``(..., M)`` that a tap implies, summed over its items.

    ``output_grads`` is ``(N, S..., D_out, M)``; the weight gradient has the weight's
    matrix layout (``(D_out, D_in)``, ``(D_in, D_out)`` when transposed, ``(D,)`` for an
    elementwise tap, ``(V, D)`` for an embedding, ``(D_out, D_in / G)`` for a tap with
    ``G`` groups, ``(D_in / G, D_out)`` for one also transposed), each with a trailing
    ``M``.
    """
    M = output_grads.shape[-1]
    d_out = output_grads.shape[-2]
    g = xp.reshape(output_grads, (-1, d_out, M))  # (items, D_out, M)
    bias = xp.sum(g, axis=0)
    if tap.kind == "elementwise":
        a = xp.reshape(tap.inputs, (-1, d_out))
        return xp.sum(g * a[:, :, None], axis=0), bias
    if tap.kind == "embedding":
        ids = xp.reshape(tap.inputs, (-1,))
        a = xp.astype(ids[:, None] == xp.arange(vocabulary, device=device(ids)), g.dtype)
    else:
        a = xp.reshape(tap.inputs, (-1, tap.inputs.shape[-1]))
    if tap.groups > 1:  # group g's rows of the weight meet group g's inputs only
        G = tap.groups
        T = a.shape[0]
        a_groups = xp.permute_dims(xp.reshape(a, (T, G, -1)), (1, 0, 2))  # (G, T, d_in)
        g_groups = xp.permute_dims(xp.reshape(g, (T, G, d_out // G, M)), (1, 3, 2, 0))
        weight = g_groups @ a_groups[:, None, :, :]  # (G, M, d_out, d_in)
        weight = xp.reshape(xp.permute_dims(weight, (0, 2, 3, 1)), (d_out, -1, M))
        if tap.transposed:  # (D_in / G, D_out), as a Flax grouped kernel
            weight = xp.permute_dims(weight, (1, 0, 2))
        return weight, bias
    by_probe = xp.reshape(xp.permute_dims(g, (2, 1, 0)), (M * d_out, -1))
    weight = xp.permute_dims(xp.reshape(by_probe @ a, (M, d_out, -1)), (1, 2, 0))
    if tap.transposed or tap.kind == "embedding":
        weight = xp.permute_dims(weight, (1, 0, 2))
    return weight, bias


__all__ = [
    "check_jvp",
    "check_vjp",
    "check_second_order",
    "check_layer_taps",
    "check_layer_protocol",
    "verify_model",
]


def check_jvp(model, params, x, *, seed=0, rtol=None, step=None, num_probes=2):
    """Compare ``J v`` with central differences ``(f(theta + h v) - f(theta - h v)) / 2h``.

    Parameters
    ----------
    model : Model
        Anything implementing the model protocol (tier 1).
    params : list of arrays
        Parameters at which to check.
    x
        Model input.
    seed : int
        Seed of the random tangents.
    rtol : float, optional
        Allowed relative error; default ``10 * sqrt(eps)`` of the dtype.
    step : float, optional
        Length ``|h v|`` of the finite-difference perturbation; default
        ``eps^(1/3) * max(1, |theta|)``.
    num_probes : int
        Number of random tangents, passed to ``jvp`` as one batch.

    Returns
    -------
    VerificationReport
        Named ``"jvp"``; the error is the largest relative difference over probes.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import nn
    >>> from curvlinops.verify import check_jvp
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
    >>> params = model.init(0)  # NumPy float64 arrays
    >>> print(check_jvp(model, params, np.ones((4, 3))))
    [PASS] jvp: error ... <= tolerance ... (central finite differences along 2 random ...)
    """
    xp, dtype = _namespace_and_dtype(params)
    rtol = _fd_rtol(dtype) if rtol is None else rtol
    generator = RandomGenerator(seed, xp, device(params[0]))
    tangents = _random_like(generator, params, num_probes)
    linearization = model.linearize(params, x)
    JV = linearization.jvp(tangents)
    expected_shape = (*linearization.outputs.shape, num_probes)
    if tuple(JV.shape) != expected_shape:
        return _shape_failure("jvp", rtol, expected_shape, JV.shape)
    errors, steps = [], []
    for k in range(num_probes):  # one pair of forward passes per probe is inherent to FD
        v = [t[..., k] for t in tangents]
        h, length = _step(xp, params, v, dtype, step)
        plus, minus = model(_shift(params, v, h), x), model(_shift(params, v, -h), x)
        errors.append(relative_error(xp, (plus - minus) / (2 * h), JV[..., k]))
        steps.append(length)
    details = (
        f"central finite differences along {num_probes} random tangents, step length "
        f"{max(steps):.2e}"
    )
    return VerificationReport.from_error("jvp", max(errors), rtol, details)


def check_vjp(model, params, x, *, seed=0, rtol=None, num_probes=2):
    """Dot-product test ``<u, J v> = <J^T u, v>`` for random ``u`` and ``v``.

    The error of probe ``k`` is ``|<u, J v> - <J^T u, v>|`` relative to
    ``|u| |J v| + |J^T u| |v|`` (a bound of both sides), so it is meaningful even
    when the inner products are small.

    Parameters
    ----------
    model, params, x, seed
        As in :func:`check_jvp`.
    rtol : float, optional
        Allowed relative error; default ``sqrt(eps)`` of the dtype.
    num_probes : int
        Number of pairs ``(u, v)``, each side evaluated as one batch.

    Returns
    -------
    VerificationReport
        Named ``"vjp"``.

    Examples
    --------
    Hand-written products of ``f(W, x) = x W^T``, tangents and cotangents with a
    trailing axis of ``K`` vectors, and the same model with a wrong factor in ``vjp``:

    >>> import numpy as np
    >>> from curvlinops.frontends import CallableModel
    >>> from curvlinops.verify import check_vjp
    >>> def forward(params, x):
    ...     return x @ params[0].T
    >>> def jvp(params, x, V):  # V[0]: (2, 3, K) -> (N, 2, K)
    ...     return np.einsum("ni,oik->nok", x, V[0])
    >>> def vjp(params, x, U):  # U: (N, 2, K) -> [(2, 3, K)]
    ...     return [np.einsum("ni,nok->oik", x, U)]
    >>> def wrong_vjp(params, x, U):
    ...     return [2 * vjp(params, x, U)[0]]
    >>> W, x = np.ones((2, 3)), np.ones((4, 3))
    >>> model = CallableModel(forward, jvp, vjp, param_shapes=[(2, 3)])
    >>> check_vjp(model, [W], x).passed
    True
    >>> wrong = CallableModel(forward, jvp, wrong_vjp, param_shapes=[(2, 3)])
    >>> check_vjp(wrong, [W], x).passed
    False
    """
    xp, dtype = _namespace_and_dtype(params)
    rtol = math.sqrt(dtype_eps(dtype)) if rtol is None else rtol
    generator = RandomGenerator(seed, xp, device(params[0]))
    linearization = model.linearize(params, x)
    outputs = linearization.outputs
    tangents = _random_like(generator, params, num_probes)
    U = generator.normal((*outputs.shape, num_probes), outputs.dtype)
    JV = linearization.jvp(tangents)
    JTU = linearization.vjp(U)
    expected = [(*p.shape, num_probes) for p in params]
    found = [tuple(g.shape) for g in JTU]
    if found != expected:
        return _shape_failure("vjp", rtol, expected, found)
    U2, JV2 = _columns(xp, U, num_probes), _columns(xp, JV, num_probes)
    JTU2 = _stack_columns(xp, JTU, num_probes)
    V2 = _stack_columns(xp, tangents, num_probes)
    error = dot_product_error(xp, U2, JV2, JTU2, V2)
    details = f"dot-product test <u, J v> = <J^T u, v>, {num_probes} random pairs"
    return VerificationReport.from_error("vjp", error, rtol, details)


def check_second_order(model, params, x, *, seed=0, rtol=None, step=None, num_probes=2):
    """Compare ``second_order_vjp(u, v)`` with central differences of ``theta -> J^T u``.

    Three parts, the largest error is reported: (1) ``sum_n,c u_nc Hess(f_nc) v``
    against ``(J(theta + h v)^T u - J(theta - h v)^T u) / 2h``; (2) with an array
    ``w``, the extra term ``J^T w``; (3) with a callable receiving ``J v``, the
    extra term ``J^T w(J v)`` (the path Hessian products use).

    Parameters
    ----------
    model, params, x, seed, step, num_probes
        As in :func:`check_jvp`; the model must offer tier 2.
    rtol : float, optional
        Allowed relative error; default ``10 * sqrt(eps)`` of the dtype.

    Returns
    -------
    VerificationReport
        Named ``"second_order_vjp"``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import nn
    >>> from curvlinops.verify import check_second_order
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
    >>> check_second_order(model, model.init(0), np.ones((4, 3))).passed
    True
    """
    model.require(Tier.SECOND_ORDER, "check_second_order")
    xp, dtype = _namespace_and_dtype(params)
    rtol = _fd_rtol(dtype) if rtol is None else rtol
    generator = RandomGenerator(seed, xp, device(params[0]))
    linearization = model.linearize(params, x)
    outputs = linearization.outputs
    u = generator.normal(tuple(outputs.shape), outputs.dtype)
    tangents = _random_like(generator, params, num_probes)
    result = linearization.second_order_vjp(u, tangents)
    expected = [(*p.shape, num_probes) for p in params]
    if [tuple(r.shape) for r in result] != expected:
        return _shape_failure("second_order_vjp", rtol, expected, [r.shape for r in result])

    errors, steps = [], []
    for k in range(num_probes):
        v = [t[..., k] for t in tangents]
        h, length = _step(xp, params, v, dtype, step)
        plus = model.linearize(_shift(params, v, h), x).vjp(u)
        minus = model.linearize(_shift(params, v, -h), x).vjp(u)
        fd = [(a - b) / (2 * h) for a, b in zip(plus, minus, strict=True)]
        errors.append(relative_error(xp, _flat(xp, fd), _flat(xp, [r[..., k] for r in result])))
        steps.append(length)

    w = generator.normal((*outputs.shape, num_probes), outputs.dtype)
    with_w = linearization.second_order_vjp(u, tangents, w)
    expected_w = _add(result, linearization.vjp(w))
    error_w = relative_error(xp, _flat(xp, with_w), _flat(xp, expected_w))

    received = []

    def cotangent_tangent(jv):
        received.append(jv)
        return w * jv

    with_fn = linearization.second_order_vjp(u, tangents, cotangent_tangent)
    JV = linearization.jvp(tangents)
    expected_fn = _add(result, linearization.vjp(w * JV))
    error_fn = relative_error(xp, _flat(xp, with_fn), _flat(xp, expected_fn))
    if len(received) != 1:
        error_fn = math.inf

    details = (
        f"central finite differences of J^T u, {num_probes} probes, step length "
        f"{max(steps):.2e}: "
        f"error {max(errors):.2e}; + J^T w term: {error_w:.2e}; callable w(J v) term: "
        f"{error_fn:.2e}"
    )
    error = max(max(errors), error_w, error_fn)
    return VerificationReport.from_error("second_order_vjp", error, rtol, details)


def check_layer_taps(model, params, x, *, seed=0, rtol=None, num_probes=2):
    """Check that the layer taps reproduce the weight and bias gradients of ``vjp``.

    For each tap, ``sum_n,s g_{n,s} a_{n,s}^T`` (output gradients times inputs) must
    equal the vjp's gradient of the layer's weight and ``sum_n,s g_{n,s}`` that of its
    bias, for random cotangents.

    Parameters
    ----------
    model, params, x, seed, num_probes
        As in :func:`check_vjp`; the model must offer tier 3.
    rtol : float, optional
        Allowed relative error; default ``sqrt(eps)`` of the dtype.

    Returns
    -------
    VerificationReport
        Named ``"layer_taps"``.

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import nn
    >>> from curvlinops.verify import check_layer_taps
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
    >>> check_layer_taps(model, model.init(0), np.ones((4, 3))).passed
    True
    """
    model.require(Tier.LAYER_TAPS, "check_layer_taps")
    xp, dtype = _namespace_and_dtype(params)
    rtol = math.sqrt(dtype_eps(dtype)) if rtol is None else rtol
    generator = RandomGenerator(seed, xp, device(params[0]))
    linearization = model.linearize(params, x)
    outputs = linearization.outputs
    U = generator.normal((*outputs.shape, num_probes), outputs.dtype)
    grads = linearization.vjp(U)
    taps = [t for t in linearization.layer_taps(U) if t.output_grads is not None]
    errors = {}
    for tap in taps:
        V = params[tap.weight_index].shape[0] if tap.kind == "embedding" else None
        weight_grad, bias_grad = tap_gradients(tap, tap.output_grads, xp, vocabulary=V)
        expected = xp.reshape(grads[tap.weight_index], tuple(weight_grad.shape))
        errors[tap.name] = relative_error(xp, weight_grad, expected)
        if tap.bias_index is not None:
            expected = xp.reshape(grads[tap.bias_index], tuple(bias_grad.shape))
            errors[tap.name] = max(errors[tap.name], relative_error(xp, bias_grad, expected))
    if not errors:
        return VerificationReport("layer_taps", False, math.inf, rtol, "the model gave no taps")
    worst = max(errors, key=errors.get)
    details = (
        f"weight/bias gradients from {len(taps)} taps vs vjp, {num_probes} random cotangents; "
        f"worst layer {worst!r}"
    )
    return VerificationReport.from_error("layer_taps", errors[worst], rtol, details)


def check_layer_protocol(model, params, x, *, seed=0, rtol=None, num_probes=2):
    """Check the layer protocol's backward rules against ``vjp`` and ``second_order_vjp``.

    A random output gradient ``g`` walks backwards through ``lin.layers()`` with each
    layer's ``backward_gradient``; at every layer with a tap the gradient of its
    outputs times its inputs, ``sum_n,s g_{n,s} a_{n,s}^T`` (reshaped to the weight),
    must equal the weight gradient of ``vjp(g)`` (and ``sum g`` the bias gradient). If
    the model offers tier 2 and its outputs are ``(N, C)``, the per-datum curvature walk
    (``backward_curvature``) from random symmetric output Hessians ``A_n`` must give,
    for random tangents ``V`` of each tapped weight with inputs ``(N, D)``,
    ``sum_n (V a_n)^T H_s,n (V a_n) = v . second_order_vjp(g, v, A J v)``, the exact
    weight block of the Hessian of ``sum_n g_n . f_n + (J v)^T A (J v) / 2``.

    Parameters
    ----------
    model, params, x, seed, num_probes
        As in :func:`check_vjp`; the model must offer the layer protocol
        (``Capability.LAYER_PROTOCOL``).
    rtol : float, optional
        Allowed relative error; default ``sqrt(eps)`` of the dtype.

    Returns
    -------
    VerificationReport
        Named ``"layer_protocol"``.

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> check_layer_protocol(model, params, np.ones((5, 3))).passed
    True
    """
    model.require(Capability.LAYER_PROTOCOL, "check_layer_protocol")
    xp, dtype = _namespace_and_dtype(params)
    rtol = math.sqrt(dtype_eps(dtype)) if rtol is None else rtol
    generator = RandomGenerator(seed, xp, device(params[0]))
    linearization = model.linearize(params, x)
    outputs = linearization.outputs
    g = generator.normal(tuple(outputs.shape), outputs.dtype)
    grads = linearization.vjp(g)
    layers = linearization.layers()
    first = next((i for i, la in enumerate(layers) if la.param_indices), len(layers))
    curvature = None
    second_order = model.has_tier(Tier.SECOND_ORDER) and outputs.ndim == 2
    if second_order:
        C = outputs.shape[1]
        M = generator.normal((outputs.shape[0], C, C), outputs.dtype)
        A = M + xp.matrix_transpose(M)
        curvature = A
    errors, checked_curvature = {}, 0
    gradient = g
    for i in range(len(layers) - 1, first - 1, -1):
        layer = layers[i]
        tap = layer.tap()
        if tap is not None:
            rows = xp.reshape(_features_last(gradient, tap, xp), (-1, tap_outputs(tap)))
            V = params[tap.weight_index].shape[0] if tap.kind == "embedding" else None
            weight_grad, bias_grad = tap_gradients(tap, rows[..., None], xp, vocabulary=V)
            weight_grad = xp.reshape(weight_grad, (-1,))
            error = relative_error(xp, weight_grad, xp.reshape(grads[tap.weight_index], (-1,)))
            if tap.bias_index is not None:
                bias = xp.reshape(grads[tap.bias_index], (-1,))
                error = max(error, relative_error(xp, xp.reshape(bias_grad, (-1,)), bias))
            if curvature is not None and tap.inputs.ndim == 2 and tap.groups == 1:
                error = max(
                    error,
                    _curvature_error(
                        xp, generator, linearization, tap, g, A, curvature, num_probes
                    ),
                )
                checked_curvature += 1
            errors[tap.name] = error
        if i == first:
            break
        if curvature is not None:
            try:
                curvature = layer.backward_curvature(curvature, gradient)
            except NotImplementedError:
                curvature = None  # a layer without the per-datum rule: check gradients only
        gradient = layer.backward_gradient(gradient)
    if not errors:
        return VerificationReport(
            "layer_protocol", False, math.inf, rtol, "the model's layers have no taps"
        )
    worst = max(errors, key=errors.get)
    details = (
        f"backward gradients at {len(errors)} tapped layers vs vjp, per-datum curvature at "
        f"{checked_curvature} vs second_order_vjp; worst layer {worst!r}"
    )
    return VerificationReport.from_error("layer_protocol", errors[worst], rtol, details)


def _curvature_error(xp, generator, linearization, tap, g, A, H, num_probes):
    """Relative error of ``sum_n (V a_n)^T H_n (V a_n)`` against the second-order product."""
    d_out, d_in = tap.matrix_shape or tuple(linearization.params[tap.weight_index].shape)
    weight = linearization.params[tap.weight_index]
    V = generator.normal((d_out, d_in, num_probes), weight.dtype)
    tangents = [
        xp.zeros((*p.shape, num_probes), dtype=p.dtype, device=device(p))
        for p in linearization.params
    ]
    tangents[tap.weight_index] = xp.reshape(V, (*weight.shape, num_probes))
    result = linearization.second_order_vjp(g, tangents, lambda jv: A @ jv)
    expected = xp.sum(
        xp.reshape(result[tap.weight_index], (d_out * d_in, num_probes))
        * xp.reshape(V, (d_out * d_in, num_probes)),
        axis=0,
    )
    Va = xp.permute_dims(xp.tensordot(tap.inputs, V, axes=([1], [1])), (0, 2, 1))  # (N, K, out)
    got = xp.sum(Va * xp.matrix_transpose(H @ xp.matrix_transpose(Va)), axis=(0, 2))
    return relative_error(xp, got, expected)


def verify_model(model, params, x, tiers=None, *, seed=0):
    """Run the checks of every tier the model offers (or of ``tiers``).

    Tier 1: :func:`check_jvp` and :func:`check_vjp`; tier 2:
    :func:`check_second_order`; tier 3: :func:`check_layer_taps`; the layer protocol
    (``Capability.LAYER_PROTOCOL``): :func:`check_layer_protocol`.

    Parameters
    ----------
    model, params, x, seed
        As in :func:`check_jvp`.
    tiers : iterable of Tier or int, optional
        Tiers to check; default all that ``model.tiers`` offers. Asking for a tier
        the model lacks raises :class:`curvlinops.MissingTierError`.

    Returns
    -------
    list of VerificationReport

    Examples
    --------
    >>> import numpy as np
    >>> from curvlinops import nn
    >>> from curvlinops.verify import verify_model
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
    >>> reports = verify_model(model, model.init(0), np.ones((4, 3)))
    >>> [(r.name, r.passed) for r in reports]
    [('jvp', True), ('vjp', True), ('second_order_vjp', True), ('layer_taps', True),
     ('layer_protocol', True)]
    """
    tiers = set(model.tiers) if tiers is None else {as_requirement(t) for t in tiers}
    for tier in sorted(tiers):
        model.require(tier, "verify_model")
    reports = []
    if Tier.FIRST_ORDER in tiers:
        reports.append(check_jvp(model, params, x, seed=seed))
        reports.append(check_vjp(model, params, x, seed=seed))
    if Tier.SECOND_ORDER in tiers:
        reports.append(check_second_order(model, params, x, seed=seed))
    if Tier.LAYER_TAPS in tiers:
        reports.append(check_layer_taps(model, params, x, seed=seed))
    if Capability.LAYER_PROTOCOL in tiers:
        reports.append(check_layer_protocol(model, params, x, seed=seed))
    return reports


# -- helpers -------------------------------------------------------------------------


def _namespace_and_dtype(params):
    if not isinstance(params, (list, tuple)) or not params:
        raise TypeError("params must be a non-empty list of arrays.")
    xp = array_namespace(*params)
    dtype = params[0].dtype
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"Parameters must be real floating to verify derivatives, got {dtype}.")
    return xp, dtype


def _fd_rtol(dtype):
    return 10 * math.sqrt(dtype_eps(dtype))


def _random_like(generator, params, num_probes):
    return [generator.normal((*p.shape, num_probes), p.dtype) for p in params]


def _step(xp, params, v, dtype, step):
    """FD step ``h`` and the length ``|h v|``: ``eps^(1/3) max(1, |theta|)`` or ``step``."""
    v_norm = norm(xp, v)
    length = step if step is not None else dtype_eps(dtype) ** (1 / 3) * max(1.0, norm(xp, params))
    return (length / v_norm if v_norm > 0 else 1.0), length


def _shift(params, v, h):
    return [p + h * t for p, t in zip(params, v, strict=True)]


def _add(a, b):
    return [s + t for s, t in zip(a, b, strict=True)]


def _flat(xp, arrays):
    return xp.concat([xp.reshape(a, (-1,)) for a in arrays])


def _columns(xp, X, num_probes):
    return xp.reshape(X, (-1, num_probes))


def _stack_columns(xp, arrays, num_probes):
    return xp.concat([_columns(xp, a, num_probes) for a in arrays], axis=0)


def _shape_failure(name, tolerance, expected, found):
    return VerificationReport(
        name,
        False,
        math.inf,
        tolerance,
        f"wrong shapes: expected {expected}, got {found}",
    )
