"""The optimizers of :mod:`curvlinops.optim` as a ``torch.optim.Optimizer``.

:class:`TorchOptimizer` wraps :class:`~curvlinops.optim.KFAC`,
:class:`~curvlinops.optim.HessianFree` or :class:`~curvlinops.optim.NaturalGradient`
for a ``torch.nn.Module``: the module becomes a
:class:`~curvlinops.frontends.torch.TorchModel`, each :meth:`TorchOptimizer.step` takes
the functional step on copies of the module's parameters and writes the result back.
Imported on demand (it imports PyTorch).

May import: ``torch``, ``curvlinops.frontends``, ``curvlinops.losses``, ``.kfac``,
``.hessian_free``, ``.natural_gradient``.
"""

from __future__ import annotations

import torch

from ..frontends.torch import TorchModel
from ..losses import as_loss
from .hessian_free import HessianFree
from .kfac import KFAC
from .natural_gradient import NaturalGradient

__all__ = ["TorchOptimizer"]

METHODS = {"kfac": KFAC, "hessian_free": HessianFree, "natural_gradient": NaturalGradient}


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
    method : {"kfac", "hessian_free", "natural_gradient"}
        The functional optimizer.
    **hyperparameters
        Passed to it (``damping``, ``weight_decay``, ...).

    Attributes
    ----------
    method : KFAC or HessianFree or NaturalGradient
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

    def _init(self, values, batch):
        if isinstance(self.method, KFAC):
            return self.method.init(values, batch)
        return self.method.init(values)
