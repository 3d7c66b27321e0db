"""The optimizers of :mod:`curvlinops.optim` as a ``torch.optim.Optimizer``.

:class:`TorchOptimizer` wraps :class:`~curvlinops.optim.KFAC`,
:class:`~curvlinops.optim.HessianFree`, :class:`~curvlinops.optim.NaturalGradient`,
:class:`~curvlinops.optim.VOGN` or :class:`~curvlinops.optim.NoisyKFAC` for a
``torch.nn.Module``: the module becomes a
:class:`~curvlinops.frontends.torch.TorchModel`, each :meth:`TorchOptimizer.step` takes
the functional step on copies of the module's parameters and writes the result back.
Imported on demand (it imports PyTorch).

May import: ``torch``, ``curvlinops.frontends``, ``curvlinops.losses``, ``.kfac``,
``.hessian_free``, ``.natural_gradient``, ``.vogn``, ``.noisy_kfac``, ``._variational``.
"""

from __future__ import annotations

import torch

from ..frontends.torch import TorchModel
from ..losses import as_loss
from ._variational import BayesianLearningRule
from .hessian_free import HessianFree
from .kfac import KFAC
from .natural_gradient import NaturalGradient
from .noisy_kfac import NoisyKFAC
from .vogn import VOGN

__all__ = ["TorchOptimizer"]


def _to_torch(saved):
    """NumPy arrays as tensors (bit for bit), string arrays as ``str`` or lists of them."""
    return {k: v.tolist() if v.dtype.kind == "U" else torch.from_numpy(v) for k, v in saved.items()}


def _to_numpy(saved):
    """The inverse of :func:`_to_torch`: NumPy arrays (strings as 0-d or 1-d arrays)."""
    import numpy as np

    return {
        k: np.asarray(v) if not isinstance(v, torch.Tensor) else v.detach().cpu().numpy()
        for k, v in saved.items()
    }


METHODS = {
    "kfac": KFAC,
    "hessian_free": HessianFree,
    "natural_gradient": NaturalGradient,
    "vogn": VOGN,
    "noisy_kfac": NoisyKFAC,
}


class TorchOptimizer(torch.optim.Optimizer):
    """A curvature optimizer for a ``torch.nn.Module``, closure-based.

    Second-order steps need the batch, not only a loss: :meth:`step` takes a closure
    that returns the batch ``(X, y)`` of this step (or the batch itself). Gradients
    are computed by the method (``.grad`` of the parameters is neither read nor
    written).

    Parameters
    ----------
    module : torch.nn.Module
        All its parameters are optimized (in ``module.parameters()`` order).
    loss : curvlinops.losses.Loss or torch.nn.Module
        A curvlinops loss or a PyTorch loss it translates (``torch.nn.MSELoss``,
        ``torch.nn.CrossEntropyLoss``, ...).
    method : {"kfac", "hessian_free", "natural_gradient", "vogn", "noisy_kfac"}
        The functional optimizer (for the variational ones the module's parameters are
        the posterior's mean; :meth:`posterior` hands out the posterior).
    **hyperparameters
        Passed to it (``damping``, ``weight_decay``, ...).

    Attributes
    ----------
    method : KFAC, HessianFree, NaturalGradient, VOGN or NoisyKFAC
        The functional optimizer (its ``model`` is a TorchModel of ``module``).
    method_state : object
        Its state after the last step (None before the first).

    Examples
    --------
    >>> import torch
    >>> from curvlinops.optim.torch import TorchOptimizer
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> net = net.double()
    >>> X = torch.randn(64, 3, dtype=torch.float64)
    >>> y = torch.sin(X[:, :2] + X[:, 2:])
    >>> opt = TorchOptimizer(net, torch.nn.MSELoss(), "kfac", damping=1e-2)
    >>> before = torch.nn.functional.mse_loss(net(X), y).item()
    >>> for _ in range(10):
    ...     _ = opt.step(lambda: (X, y))
    >>> bool(torch.nn.functional.mse_loss(net(X), y).item() < 0.5 * before)
    True
    """

    def __init__(self, module, loss, method="kfac", **hyperparameters):
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}.")
        params = list(module.parameters())
        super().__init__(params, {})
        self.model = TorchModel(module)
        self.method = METHODS[method](self.model, as_loss(loss), **hyperparameters)
        self.method_state = None

    def step(self, closure):
        """One step on the batch that ``closure()`` returns (or on ``closure`` itself).

        Parameters
        ----------
        closure : callable or tuple
            ``closure() -> (X, y)``, or the batch ``(X, y)``.

        Returns
        -------
        float
            The objective on the batch before the step.
        """
        batch = closure() if callable(closure) else closure
        params = [p for group in self.param_groups for p in group["params"]]
        values = [p.detach().clone() for p in params]
        if self.method_state is None:
            self.method_state = self._init(values, batch)
        new, self.method_state = self.method.step(values, self.method_state, batch)
        with torch.no_grad():
            for p, value in zip(params, new, strict=True):
                p.copy_(value)
        return self.method_state.loss

    def state_dict(self):
        """``torch.optim.Optimizer.state_dict()`` plus the method's state.

        The method's state (:meth:`KFACState.state_dict
        <curvlinops.optim.KFACState.state_dict>` and the like: damping, velocity, step
        count, warm start, curvature factors) is under ``"method_state"`` as tensors,
        strings and numbers only, so that ``torch.save`` writes it and
        ``torch.load(..., weights_only=True)`` reads it; None before the first step.

        Returns
        -------
        dict

        Examples
        --------
        >>> import io
        >>> import torch
        >>> from curvlinops.optim.torch import TorchOptimizer
        >>> net = torch.nn.Linear(2, 1).double()
        >>> X = torch.eye(2, dtype=torch.float64)
        >>> opt = TorchOptimizer(net, torch.nn.MSELoss(), "hessian_free", damping=0.1)
        >>> _ = opt.step((X, torch.ones(2, 1, dtype=torch.float64)))
        >>> file = io.BytesIO()
        >>> torch.save(opt.state_dict(), file)
        >>> _ = file.seek(0)
        >>> other = TorchOptimizer(net, torch.nn.MSELoss(), "hessian_free", damping=0.1)
        >>> other.load_state_dict(torch.load(file, weights_only=True))
        >>> restored = other.method_state
        >>> restored.step, torch.equal(restored.previous, opt.method_state.previous)
        (1, True)
        """
        out = super().state_dict()
        saved = None if self.method_state is None else self.method_state.state_dict()
        out["method_state"] = None if saved is None else _to_torch(saved)
        return out

    def load_state_dict(self, state_dict):
        """Restore what :meth:`state_dict` saved; the module's parameters must already hold
        the values of the saved run (``module.load_state_dict``), since the method's
        state is put on their device and dtype.

        Parameters
        ----------
        state_dict : dict
        """
        state_dict = dict(state_dict)
        saved = state_dict.pop("method_state", None)
        super().load_state_dict(state_dict)
        if saved is None:
            self.method_state = None
            return
        values = [p.detach().clone() for group in self.param_groups for p in group["params"]]
        self.method_state = self.method.load_state_dict(_to_numpy(saved), values)

    def posterior(self):
        """The variational posterior of the last step (methods ``"vogn"``, ``"noisy_kfac"``).

        Returns
        -------
        VariationalPosterior
            Its mean is (a copy of) the module's parameters, as tensors.

        Examples
        --------
        >>> import torch
        >>> from curvlinops.optim.torch import TorchOptimizer
        >>> net = torch.nn.Linear(2, 1, bias=False).double()
        >>> X = torch.eye(2, dtype=torch.float64)
        >>> opt = TorchOptimizer(net, torch.nn.MSELoss(), "vogn", num_data=2, weight_samples=0)
        >>> _ = opt.step((X, torch.ones(2, 1, dtype=torch.float64)))
        >>> [round(v, 12) for v in opt.posterior().precision.diagonal().tolist()]  # 2 x^2 + 1
        [3.0, 3.0]
        """
        if not isinstance(self.method, BayesianLearningRule):
            raise TypeError(
                f"{type(self.method).__name__} has no posterior; use method 'vogn' or 'noisy_kfac'."
            )
        if self.method_state is None:
            raise ValueError("The posterior exists after the first step; call step first.")
        values = [p.detach().clone() for group in self.param_groups for p in group["params"]]
        return self.method.posterior(values, self.method_state)

    def _init(self, values, batch):
        if isinstance(self.method, (KFAC, BayesianLearningRule)):
            return self.method.init(values, batch)
        return self.method.init(values)
