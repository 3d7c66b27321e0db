"""A ``torch.nn.Module`` and a list of its parameters as a :class:`TorchModel`.

What the PyTorch adapter of :func:`curvlinops.models.as_model` does with the call
style of curvlinops-for-pytorch, ``GGNLinearOperator(module, loss, params, data)``:
each tensor of ``params`` is looked up among ``module.named_parameters()`` (by
identity, or as a view of the same memory such as ``p.detach()``), and the model is
``TorchModel(module, param_names=<their names>)``: the curvature is taken with
respect to those parameters, in the order given, at their current values; every
other parameter of the module stays a constant.

Importing this module imports PyTorch; ``curvlinops.frontends`` imports it only for
an object that is a ``torch.nn.Module``. May import: torch, ``.torch``.
"""

from __future__ import annotations

import torch

from .torch import TorchModel

__all__ = ["module_and_params"]


def module_and_params(module, params):
    """``(TorchModel, parameter values)`` for a module and a list of its parameters."""
    if params is None:
        model = TorchModel(module)
        return model, model.params
    if isinstance(params, (torch.Tensor, dict, str)):
        raise TypeError(
            "params must be a list of the module's parameters (e.g. "
            f"list(module.parameters())), got a {type(params).__name__}."
        )
    params = list(params)  # also takes module.parameters(), a generator
    if not params:
        raise TypeError(
            "params must be a non-empty list of the module's parameters (e.g. "
            "list(module.parameters())); got an empty one."
        )
    named = list(module.named_parameters())
    by_identity = {id(p): n for n, p in named}
    names = []
    for index, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"params[{index}] is a {type(p).__name__}; the parameters of a PyTorch module "
                "must be torch tensors from module.parameters()."
            )
        name = by_identity.get(id(p))
        if name is None:
            name = _same_memory(named, p, index, type(module).__name__)
        names.append(name)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"params lists the module's parameters {repeated} more than once; list each once."
        )
    model = TorchModel(module, param_names=names)
    return model, model.params


def _same_memory(named, p, index, module_name):
    """The name of the one parameter ``p`` is a view of (``p.detach()``), or an error."""
    matches = [
        n
        for n, q in named
        if q.data_ptr() == p.data_ptr()
        and q.shape == p.shape
        and q.stride() == p.stride()
        and q.dtype == p.dtype
        and q.device == p.device
    ]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(
        f"params[{index}] (a tensor of shape {tuple(p.shape)}) is not a parameter of the "
        f"{module_name} module. Pass tensors from module.parameters() (a subset is fine: "
        "the curvature is taken with respect to those, at their current values). To take "
        "the curvature at other values, wrap the module by hand, "
        "model = curvlinops.frontends.torch.TorchModel(module), and pass a list of tensors "
        "shaped like model.params."
    )
