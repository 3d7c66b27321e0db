"""The linearized (GLM) predictive of a Gaussian posterior over a model's parameters.

For test inputs ``X`` the model linearized at the posterior mean ``theta`` has Gaussian
outputs ``f ~ N(f(theta, X), J Sigma J^T)`` per test point (``J`` the point's ``C x P``
Jacobian, ``Sigma`` the posterior covariance). What lives here:

- :func:`per_datum_jacobians`: ``J`` of every test point, ``(N, C, P)``, from one
  backward pass of ``C`` cotangents per batch through the layer taps when the model
  offers them (tier 3, every parameter in a tapped layer), else from one vector-Jacobian
  product with ``N * C`` one-hot cotangents (tier 1);
- :func:`glm_predictive_moments`: the mean and the ``C x C`` covariance of ``f`` per
  point, with one product of the covariance operator with all ``N * C`` columns;
- :func:`probit_predictive` and :func:`mc_predictive`: class probabilities (softmax or
  independent sigmoids) from those moments, by the probit approximation
  (MacKay, 1992) or by Monte-Carlo draws of ``f``;
- :func:`regression_predictive`: the closed form for a Gaussian likelihood, the
  covariance plus the observation noise.

Everything takes the covariance as an operator, so any Gaussian posterior (a
:class:`~curvlinops.bayes.Laplace` posterior, a :class:`~curvlinops.bayes.GaussianPosterior`
built elsewhere) uses the same functions.

May import: ``curvlinops._backend``, ``curvlinops.linalg``, ``curvlinops.models``,
``curvlinops.curvature`` (its tap helpers).
"""

from __future__ import annotations

import math
import numbers

from .._backend import array_namespace, as_generator, device as array_device
from ..curvature._elementwise import elementwise_gradients
from ..curvature._embedding import as_matrix_tap
from ..linalg import LinearOperator
from ..models import Tier, flatten_params, param_shapes

__all__ = [
    "glm_predictive_moments",
    "mc_predictive",
    "per_datum_jacobians",
    "probit_predictive",
    "regression_predictive",
]

LINKS = ("classification", "binary")

#: entries of the per-datum Jacobians ``(N, C, P)`` one pass of the predictive holds at most
#: when no batch size is given (128 MiB in float64)
MAX_JACOBIAN_ENTRIES = 2**24


def per_datum_jacobians(model, params, X):
    """The outputs and every datum's Jacobian, ``(N, C)`` and ``(N, C, P)``.

    Parameters
    ----------
    model : curvlinops.models.Model
        Any protocol model with outputs ``(N, C)``.
    params : list of arrays
        The point of linearization; ``P`` entries in all.
    X : array
        Inputs of ``N`` data points.

    Returns
    -------
    outputs, jacobians : arrays
        ``J[n, c, :]`` is the gradient of output ``c`` of datum ``n`` with respect to the
        flat parameters.

    Notes
    -----
    With layer taps (tier 3) covering every parameter, one backward pass of the ``C``
    unit cotangents gives each datum's gradients layer by layer (``g a^T`` per datum,
    summed over shared axes); otherwise one vector-Jacobian product with ``N * C``
    one-hot cotangents, whose cost grows with ``N`` per datum (pass small batches).

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import nn
    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> params = model.init(0, xp=xp, dtype=xp.float64)
    >>> X = np.arange(6.0).reshape(2, 3)
    >>> f, J = per_datum_jacobians(model, params, X)
    >>> J.shape
    (2, 2, 8)
    >>> J[1, 0].tolist()  # d f_10 / d (W, b): the input in W's first row, then e_0
    [3.0, 4.0, 5.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    """
    lin = model.linearize(params, X)
    outputs = lin.outputs
    if outputs.ndim != 2:
        raise ValueError(
            f"The predictive needs model outputs (N, C), got shape {tuple(outputs.shape)}; "
            "flatten shared axes into the batch axis first."
        )
    if model.has_tier(Tier.LAYER_TAPS):
        jacobians = _tap_jacobians(lin, params)
        if jacobians is not None:
            return outputs, jacobians
    return outputs, _vjp_jacobians(lin, params)


def _unit_cotangents(outputs, columns):
    """``(N, C, columns)``: for ``columns = C`` the unit vectors of every datum, for
    ``columns = N * C`` one-hot over all outputs."""
    xp = array_namespace(outputs)
    N, C = outputs.shape
    eye = xp.eye(columns, dtype=outputs.dtype, device=array_device(outputs))
    if columns == C:
        return xp.broadcast_to(eye[None, :, :], (N, C, C))
    return xp.reshape(eye, (N, C, columns))


def _vjp_jacobians(lin, params):
    xp = array_namespace(lin.outputs)
    N, C = lin.outputs.shape
    grads = lin.vjp(_unit_cotangents(lin.outputs, N * C))
    transposed = flatten_params(grads, param_shapes(params))  # (P, N * C)
    return xp.reshape(xp.matrix_transpose(transposed), (N, C, transposed.shape[0]))


def _tap_jacobians(lin, params):
    """Per-datum Jacobians from the layer taps, or None if a parameter has no tap (or
    a tap is grouped)."""
    xp = array_namespace(lin.outputs)
    N, C = lin.outputs.shape
    pieces = [None] * len(params)
    for tap in lin.layer_taps(_unit_cotangents(lin.outputs, C)):
        if tap.groups > 1:  # a grouped weight holds only its groups' blocks: the VJP route
            return None
        if tap.kind == "embedding":
            table = params[tap.weight_index]
            tap = as_matrix_tap(tap, table.shape[0], table.dtype, xp)
        if tap.kind == "elementwise":
            rows = elementwise_gradients(tap, xp)
            pieces[tap.weight_index] = xp.reshape(rows[0], (N, C, -1))
            if tap.bias_index is not None:
                pieces[tap.bias_index] = xp.reshape(rows[1], (N, C, -1))
            continue
        weight, bias = _matrix_tap_gradients(tap.inputs, tap.output_grads, xp)
        if tap.transposed:
            weight = xp.matrix_transpose(weight)
        pieces[tap.weight_index] = xp.reshape(weight, (N, C, -1))
        if tap.bias_index is not None:
            pieces[tap.bias_index] = bias
    if any(p is None for p in pieces):
        return None
    return xp.concat(pieces, axis=2)


def _matrix_tap_gradients(a, g, xp):
    """Per-datum gradients ``(N, M, D_out, D_in)`` and ``(N, M, D_out)`` of a matrix tap.

    ``a`` is ``(N, [S...,] D_in)``, ``g`` is ``(N, [S...,] D_out, M)``; with shared axes the
    datum's gradient sums over them.
    """
    N, d_in, d_out, M = a.shape[0], a.shape[-1], g.shape[-2], g.shape[-1]
    a3 = xp.reshape(a, (N, -1, d_in))
    g4 = xp.reshape(g, (N, -1, d_out, M))
    weight = xp.permute_dims(g4, (0, 3, 2, 1)) @ a3[:, None, :, :]
    bias = xp.permute_dims(xp.sum(g4, axis=1), (0, 2, 1))
    return weight, bias


def glm_predictive_moments(model, params, X, covariance, *, batch_size=None):
    """Mean and covariance of the linearized model's outputs, ``(N, C)`` and ``(N, C, C)``.

    ``f(theta, x) + J (theta' - theta)`` with ``theta' ~ N(theta, Sigma)`` has mean
    ``f(theta, x)`` and covariance ``J Sigma J^T`` per test point.

    Parameters
    ----------
    model : curvlinops.models.Model
        A protocol model with outputs ``(N, C)`` (a
        :class:`~curvlinops.ParameterSubsetModel` for a posterior over some parameters).
    params : list of arrays
        The posterior mean, as the model's parameter list.
    X : array
        Test inputs.
    covariance : LinearOperator
        ``Sigma``, ``(P, P)`` (e.g. ``posterior.covariance``).
    batch_size : int, optional
        Test points per pass; memory ``batch_size * C * P`` for the Jacobians. Default:
        as many as keep them within ``2**24`` entries (at least one).

    Returns
    -------
    mean, covariance : arrays

    Examples
    --------
    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> from curvlinops import IdentityLinearOperator, nn
    >>> model = nn.Sequential(nn.Linear(2, 1))
    >>> params = [np.array([[1.0, -1.0]]), np.array([0.5])]
    >>> Sigma = IdentityLinearOperator(3, xp=xp, dtype=xp.float64)
    >>> f, var = glm_predictive_moments(model, params, np.array([[1.0, 2.0]]), Sigma)
    >>> f.tolist(), var.tolist()  # J = [1, 2, 1]: J J^T = 6
    ([[-0.5]], [[[6.0]]])
    """
    if not isinstance(covariance, LinearOperator):
        raise TypeError(
            f"covariance must be a curvlinops LinearOperator, got {type(covariance).__name__}."
        )
    xp = array_namespace(X)
    N = int(X.shape[0])
    if batch_size is None:
        C = int(model(params, X[:1, ...]).shape[-1])
        batch_size = max(1, MAX_JACOBIAN_ENTRIES // (C * covariance.shape[0]))
    batch_size = _check_count(batch_size, "batch_size")
    means, covariances = [], []
    for start in range(0, N, batch_size):  # batches of test points, each in one pass
        f, J = per_datum_jacobians(model, params, X[start : min(start + batch_size, N), ...])
        if J.shape[2] != covariance.shape[0]:
            raise ValueError(
                f"The covariance has shape {covariance.shape} but the model has "
                f"{J.shape[2]} parameters."
            )
        means.append(f)
        covariances.append(_sandwich(J, covariance, xp))
    if len(means) == 1:
        return means[0], covariances[0]
    return xp.concat(means, axis=0), xp.concat(covariances, axis=0)


def _sandwich(J, covariance, xp):
    """``J_n Sigma J_n^T`` for every ``n``: one product of ``Sigma`` with ``N * C`` columns."""
    N, C, P = J.shape
    flat = xp.reshape(J, (N * C, P))
    right = covariance @ xp.matrix_transpose(flat)  # (P, N * C)
    right = xp.permute_dims(xp.reshape(right, (P, N, C)), (1, 0, 2))  # (N, P, C)
    out = J @ right
    return 0.5 * (out + xp.matrix_transpose(out))


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_moments(mean, covariance):
    xp = array_namespace(mean, covariance)
    if mean.ndim != 2 or tuple(covariance.shape) != (*mean.shape, mean.shape[1]):
        raise ValueError(
            f"Expected a mean (N, C) and a covariance (N, C, C), got shapes "
            f"{tuple(mean.shape)} and {tuple(covariance.shape)}."
        )
    return xp


def _check_link(link):
    if link not in LINKS:
        raise ValueError(
            f"link must be one of {LINKS} ('classification': softmax over the C outputs, "
            f"'binary': an independent sigmoid per output), got {link!r}."
        )


def _link(xp, f, link):
    if link == "binary":
        return 1.0 / (1.0 + xp.exp(-f))
    shifted = f - xp.max(f, axis=-1, keepdims=True)
    e = xp.exp(shifted)
    return e / xp.sum(e, axis=-1, keepdims=True)


def probit_predictive(mean, covariance, link="classification"):
    """Class probabilities by the probit approximation of the Gaussian outputs.

    ``softmax(f_c / sqrt(1 + pi/8 * var_c))`` (for ``"binary"``, the sigmoid of each
    output): the approximation ``E[sigmoid(f)] ~ sigmoid(mu / sqrt(1 + pi var / 8))`` of
    MacKay (1992), applied per class with the diagonal of the covariance as in
    laplace-torch.

    Parameters
    ----------
    mean : array
        ``(N, C)``.
    covariance : array
        ``(N, C, C)``.
    link : {"classification", "binary"}

    Returns
    -------
    array
        ``(N, C)`` probabilities.

    Examples
    --------
    >>> import numpy as np
    >>> p = probit_predictive(np.array([[2.0]]), np.array([[[8 / np.pi * 3.0]]]), "binary")
    >>> bool(np.isclose(p[0, 0], 1 / (1 + np.exp(-1.0))))  # 2 / sqrt(1 + 3)
    True
    """
    _check_link(link)
    xp = _check_moments(mean, covariance)
    var = xp.linalg.diagonal(covariance)
    return _link(xp, mean / xp.sqrt(1.0 + (math.pi / 8.0) * var), link)


def mc_predictive(mean, covariance, link="classification", *, num_samples=1000, seed=0):
    """Class probabilities by Monte-Carlo: the average link of draws of the outputs.

    ``(1/S) sum_s link(f_s)``, ``f_s ~ N(mean, covariance)`` per test point, all draws at
    once (a ``C x C`` factor per point, batched).

    Parameters
    ----------
    mean : array
        ``(N, C)``.
    covariance : array
        ``(N, C, C)``, positive semi-definite.
    link : {"classification", "binary"}
    num_samples : int
    seed : int or generator

    Returns
    -------
    array
        ``(N, C)`` probabilities, an unbiased estimate of ``E[link(f)]``.

    Examples
    --------
    >>> import numpy as np
    >>> p = mc_predictive(np.zeros((1, 3)), np.zeros((1, 3, 3)), num_samples=10)
    >>> np.round(p, 6).tolist()  # no uncertainty: the softmax of the mean
    [[0.333333, 0.333333, 0.333333]]
    """
    _check_link(link)
    xp = _check_moments(mean, covariance)
    num_samples = _check_count(num_samples, "num_samples")
    factor = _psd_factor(covariance, xp)  # (N, C, C), factor factor^T = covariance
    N, C = mean.shape
    gen = as_generator(seed, xp, array_device(mean))
    Z = gen.normal((num_samples, N, C, 1), mean.dtype)
    draws = mean[None, :, :] + (factor[None, ...] @ Z)[..., 0]
    return xp.mean(_link(xp, draws, link), axis=0)


def _psd_factor(covariance, xp):
    """``V diag(sqrt(w))`` per point from an eigendecomposition (PSD, possibly singular)."""
    w, V = xp.linalg.eigh(0.5 * (covariance + xp.matrix_transpose(covariance)))
    top = xp.max(xp.abs(w), axis=-1, keepdims=True)
    floor = -1e3 * _eps(covariance.dtype, xp) * top
    if bool(xp.any(w < floor)):
        raise ValueError(
            "The output covariance has clearly negative eigenvalues (it is not positive "
            "semi-definite); the Monte-Carlo predictive needs a valid covariance."
        )
    w = xp.where(w > 0, w, xp.zeros_like(w))
    return V * xp.sqrt(w)[..., None, :]


def _eps(dtype, xp):
    return float(xp.finfo(dtype).eps)


def regression_predictive(mean, covariance, sigma_noise):
    """The predictive of a Gaussian likelihood: ``N(mean, covariance + sigma^2 I)``.

    Parameters
    ----------
    mean : array
        ``(N, C)``: the outputs at the posterior mean.
    covariance : array
        ``(N, C, C)``: the linearized outputs' covariance.
    sigma_noise : float
        The observation noise's standard deviation.

    Returns
    -------
    mean, covariance : arrays
        ``(N, C)`` and ``(N, C, C)``.

    Examples
    --------
    >>> import numpy as np
    >>> _, var = regression_predictive(np.zeros((1, 1)), np.array([[[0.5]]]), 2.0)
    >>> var.tolist()
    [[[4.5]]]
    """
    xp = _check_moments(mean, covariance)
    sigma = float(sigma_noise)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma_noise must be positive and finite, got {sigma_noise}.")
    C = mean.shape[1]
    eye = xp.eye(C, dtype=covariance.dtype, device=array_device(covariance))
    return mean, covariance + (sigma * sigma) * eye[None, :, :]
