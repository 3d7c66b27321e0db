"""PyTorch frontend: an ``nn.Module`` as a curvlinops model, PyTorch losses as curvlinops losses.

:class:`TorchModel` offers all three tiers of the model protocol:

- tier 1: :meth:`TorchModel.linearize` records the forward pass once with autograd
  (when first needed); vector-Jacobian products are backward passes over that graph
  (the ``K`` columns of a matmat in one batched pass, ``is_grads_batched``);
  Jacobian-vector products use ``torch.func.jvp`` (or, on request,
  ``torch.func.linearize``) with ``torch.func.vmap`` over the columns, except a
  product of one vector asked for before the forward pass was recorded (the GGN's
  product without ``cache``), which runs in the recording pass itself with dual
  numbers (``torch.autograd.forward_ad``): one primal computation instead of two;
- batch normalization in evaluation mode runs as the per-channel affine map it is
  (``x * a + b`` with ``torch.addcmul``, the same function): PyTorch's derivatives of
  ``F.batch_norm`` carry the terms of training mode's batch statistics (several
  full-size passes more in forward mode and in double backward) and have no batching
  rule;
- tier 2: where the product is a symmetric matrix (no ``w``, or ``w`` given as a
  symmetric :class:`~curvlinops.models.TraceableLinearMap`, as the Hessian operator
  does) by double backward over the recorded graph, which is faster than forward
  mode in PyTorch on the CPU; otherwise forward-over-reverse, the ``torch.func.jvp``
  of the ``torch.func.vjp``;
- without forward mode: where an operation of the module has no forward-mode
  derivative (an ``autograd.Function`` without ``jvp``, a fused kernel), the first
  product that needs one finds out and the model switches to reverse mode for good:
  Jacobian-vector products become reverse-over-reverse, ``J v = d/du <J^T u, v>`` (one
  graph of ``J^T u`` per linearization, then one batched backward pass per product,
  about twice a vjp), which is what the GGN, Fisher and Jacobian products then pay;
  second-order products with a ``w`` that is not symmetric become double backward
  plus a vjp (and a reverse-mode jvp for a map ``w = A(J v)``). Symmetric Hessian
  products and vjps are reverse mode anyway;
- attention: every forward pass runs with ``torch.nn.MultiheadAttention``'s fast path
  off (``torch._native_multi_head_attention`` bypasses ``F.linear`` and has no
  forward-mode derivative) and ``scaled_dot_product_attention`` on its math backend
  (its fused kernels have neither forward mode nor double backward); the previous
  settings are restored afterwards. The function is the same;
- tier 3: a torch-function mode over the forward pass taps every call in which a
  trainable parameter (by object identity with the tensors given to
  ``functional_call``) enters the model as the weight of ``torch.nn.functional.linear``
  (``nn.Linear``, the packed ``in_proj_weight``/``in_proj_bias`` and ``out_proj`` of
  ``nn.MultiheadAttention`` in self-attention, ``F.linear`` in user code: a tap of kind
  ``"matrix"``), the table of ``F.embedding`` (``nn.Embedding``: kind ``"embedding"``,
  the integer ids as inputs) or the weight of ``F.layer_norm`` over the last axis
  (``nn.LayerNorm``: kind ``"elementwise"``, the normalized inputs ``(x - mean) /
  sqrt(var + eps)`` as inputs). Forward hooks tap ``Conv1d`` and ``Conv2d`` with
  ``padding_mode="zeros"`` and batch normalization in evaluation mode (when the native
  ``BatchNorm1d``/``BatchNorm2d`` exist), laid out by the native layer's tap (a
  convolution's unfolded patches, batch normalization's normalized inputs). Each tapped
  call gets a zero probe added to its output; the gradients of the probes for ``M``
  cotangents come from one backward pass per cotangent (a batched pass would run the
  backward of convolutions and batch normalization column by column anyway, without a
  batching rule for them). A convolution's patches are one strided view of its padded
  input, copied once (the same arrays as the native layer's tap). Inputs and output
  gradients are laid out ``(N, S..., D)`` with the data axis first (the attention
  projections' sequence-first inputs are transposed). A parameter used in two tapped
  calls (weight tying, a layer called twice) is refused: Kronecker factors need each
  parameter in one layer. Hooks and the mode see any module graph, so residual
  networks and transformers get taps too;
- the layer protocol (:mod:`curvlinops.models.layers`): every leaf module is mapped to
  the ``curvlinops.nn`` layer that computes the same function (``_NATIVE_EQUIVALENTS``:
  ``Linear``, ``Conv1d``, ``Conv2d``, the elementwise activations ``ReLU``,
  ``LeakyReLU``, ``Tanh``, ``Sigmoid``, ``Softplus``, ``GELU``, ``ELU``, and
  ``Identity``, ``Flatten``, dropout in evaluation mode; where ``curvlinops.nn`` has
  them, ``BatchNorm1d``/``BatchNorm2d`` in evaluation mode, ``AvgPool2d``,
  ``MaxPool2d`` and ``AdaptiveAvgPool2d`` to a single pixel) and bound to its inputs of
  one forward pass recorded with hooks (with the channels-first layout of its inputs,
  as a native chain records it), so that the Hessian diagonal and the
  Kronecker-factored Hessian use the native layers' rules on torch tensors. Modules
  that form a chain (each leaf module takes the previous one's output, as in
  ``torch.nn.Sequential``) are the layers in call order. Otherwise the forward pass is
  read with ``torch.fx`` (:mod:`._torch_graph`, leaf modules kept as calls): a graph
  that nests chains and **residual sums** ``out = body(x) + shortcut(x)`` (a ResNet's
  blocks, ``out += identity`` included, the shortcut the identity or a projection such
  as conv1x1-BN), with the functional ``relu`` and ``flatten(x, 1)`` between modules,
  is mapped sum by sum to :class:`curvlinops.nn.Residual` over the native layers of its
  two paths, bound to the sum's input; the walks then use the native Residual's rules
  (both paths, their cross terms), and its inner layers carry the torch modules' names
  (``"layer1.0.conv1"``; a sum is named after the module that holds it,
  ``"layer1.0"``). A module without children called several times is one layer per
  call if it has no trainable parameters (torchvision's ``BasicBlock`` calls its
  ``relu`` twice) and refused otherwise. Outputs that an in-place operation overwrites
  later are recorded again, copied as they are made. Anything else between modules (a
  concatenation, a product, a scaled sum, a tensor attribute read in ``forward``,
  paths that do not meet at one addition, control flow that ``torch.fx`` cannot trace)
  is refused with a ValueError naming it. Other modules are layers without rules (a
  residual sum around one too): an operator that needs to walk through one says so,
  naming it.

:func:`translate_loss` turns ``torch.nn.MSELoss``, ``CrossEntropyLoss``,
``BCEWithLogitsLoss`` and ``PoissonNLLLoss`` into the curvlinops loss of the same value.

Importing this module imports PyTorch. May import: torch, ``curvlinops._backend``,
``curvlinops.models``, ``curvlinops.losses``, ``curvlinops.nn`` (the native layers'
rules of the layer protocol; ``curvlinops.nn`` never imports a frontend),
``._torch_graph``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

try:
    import torch
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "curvlinops.frontends.torch needs PyTorch: pip install torch (or curvlinops[torch]).",
        name="torch",
    ) from error

from torch.autograd import forward_ad
from torch.func import functional_call, jvp, linearize, vjp, vmap

from .. import losses, nn as native
from .._backend import array_namespace
from ..models import (
    Capability,
    LayerTap,
    Linearization,
    LinearizedLayer,
    MissingLayerRuleError,
    Model,
    Tier,
    TraceableLinearMap,
)
from ..nn.module import channels_first_inputs
from . import _torch_graph as _graph

__all__ = ["TorchModel", "translate_loss"]

_DROPOUT_TYPES = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


class TorchModel(Model):
    """A ``torch.nn.Module`` as a curvlinops model (tiers 1, 2 and 3).

    The model's parameters are the module's parameters that require gradients, in
    ``module.named_parameters()`` order (``param_names``); curvature operators act
    on flat vectors of them. Parameters with ``requires_grad=False`` are **excluded**:
    they stay constants of the model, read from the module at every call (freeze a
    layer to take the curvature of the others only). The operators take the parameter
    values as a list of tensors (:attr:`params`), so the curvature can be evaluated at
    any point without touching the module.

    Requirements on the module, checked with clear errors:

    - Deterministic: dropout layers must be in evaluation mode (call ``module.eval()``);
      this is checked at construction and before every forward pass. Randomness the
      frontend cannot see (``torch.randn`` in a custom ``forward``, functional dropout)
      is caught by the curvature operators' determinism check
      (:class:`~curvlinops.NonDeterministicDataError`).
    - Batch normalization in evaluation mode only, with running statistics
      (``module.eval()``, ``track_running_stats=True``): it is then a fixed affine map
      per channel, and the curvature is that of the network in inference form. In
      training mode (or without running statistics) its batch statistics couple the
      data points, so the loss is not a sum over data and the curvature would depend
      on how the data is split into batches; this is refused at construction and
      before every forward pass.
    - Convolutions ``Conv1d``/``Conv2d`` with ``padding_mode="zeros"`` (the layer taps
      unfold zero-padded inputs); another padding mode of a convolution whose weight is
      among the parameters is refused at construction.
    - Inputs, parameters and the module's remaining tensors (frozen parameters,
      buffers) on one device: a mismatch raises a ValueError naming both devices.

    Tier 3 (layer taps) covers every call of ``torch.nn.functional.linear`` whose weight
    is among the parameters (``torch.nn.Linear``, the projections of
    ``torch.nn.MultiheadAttention`` in self-attention, functional calls), every
    ``torch.nn.Embedding``/``F.embedding`` table (an embedding tap) and every
    ``torch.nn.LayerNorm``/``F.layer_norm`` weight over the last axis (an elementwise
    tap), plus ``Conv1d`` and ``Conv2d`` (grouped and depthwise ones included: their
    taps say their groups, and the curvature operators give each group its own
    block) and, where
    ``curvlinops.nn`` has them, ``BatchNorm1d``/``BatchNorm2d`` (an elementwise tap)
    whose weight is among the parameters, in any module graph (residual connections
    included); each parameter must enter one tapped call once per forward pass (a
    shared layer or tied weights are refused, naming the parameter). Refused by the
    taps, with the reason: a slice of a parameter in ``F.linear`` (cross-attention,
    whose packed projection is split), layer normalization over more than the last
    axis, inputs whose first axis is not the data axis. A parameter added or
    multiplied outside these calls (a learned positional embedding added to the
    inputs) is in no tap: K-FAC and the diagonals then say which parameter they lack.
    Embeddings with a trainable table and ``padding_idx``, ``max_norm``,
    ``scale_grad_by_freq`` or ``sparse`` are refused at construction (they change the
    derivatives, or mutate the table, or give sparse gradients).
    The layer protocol (:meth:`Linearization.layers
    <curvlinops.Linearization.layers>`; the Hessian diagonal and the
    Kronecker-factored Hessian) needs the leaf modules to form a chain (the input of
    each is the output of the one before, and the last one's output is the model's) or
    a nesting of chains and residual sums ``body(x) + shortcut(x)`` in ``forward`` (a
    ResNet: read with ``torch.fx``, each sum mapped to :class:`curvlinops.nn.Residual`;
    ``relu`` and ``flatten(x, 1)`` may be functional), each module with trainable
    parameters called once; another graph is refused, naming the operation that does
    not fit. It knows ``Linear``, ``Conv1d``, ``Conv2d``, ``ReLU``,
    ``LeakyReLU``, ``Tanh``, ``Sigmoid``, ``Softplus``, ``GELU``, ``ELU``,
    ``Identity``, ``Flatten`` and dropout (in evaluation mode), and the batch
    normalization and pooling layers ``curvlinops.nn`` has; an operator that walks
    through another module (or needs a rule a native layer lacks) raises
    :class:`~curvlinops.MissingLayerRuleError` naming it.

    Parameters
    ----------
    module : torch.nn.Module
        The network; its forward takes one input tensor ``x`` of shape ``(N, ...)``
        and returns outputs ``(N, C)`` (or ``(N, S, C)``).
    chunk_size : int, optional
        Passed to ``torch.func.vmap``: process the ``K`` columns of a matmat in chunks
        of this many vectors to bound memory (default: all at once).
    jvp_method : {"jvp", "linearize"}
        How Jacobian-vector products are computed. ``"jvp"`` (default):
        ``torch.func.jvp``, which runs the forward pass again with the tangents (about
        one forward pass more per product); a product of one vector that comes before
        the linearization's forward pass was recorded (every GGN matvec without
        ``cache``) runs in the recording pass, with no forward pass more.
        ``"linearize"``: ``torch.func.linearize`` traces the tangent map once per
        linearization (at its first product) and then applies only the tangent
        operations. Tracing costs about ten to twenty forward passes, so it pays off
        only when one linearization serves many products (a curvature operator with
        ``cache=True`` in a CG solve), and it needs a forward pass free of
        data-dependent Python control flow.
    param_names : list of str, optional
        Names (from ``module.named_parameters()``) of the parameters to take the
        curvature with respect to, in the order of the parameter list; every other
        parameter stays a constant of the model, whatever its ``requires_grad``.
        Default: the parameters that require gradients, in ``named_parameters()``
        order. (A curvature operator given a module and a list of its parameters
        builds the model with the names of those parameters.)

    Attributes
    ----------
    module : torch.nn.Module
    param_names : list of str
        Names of the parameters, in the order of the parameter list.

    Examples
    --------
    >>> import torch
    >>> from curvlinops import GGNLinearOperator, MSELoss
    >>> from curvlinops.frontends.torch import TorchModel
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> model = TorchModel(net.double())
    >>> model.param_names
    ['0.weight', '0.bias', '2.weight', '2.bias']
    >>> X, y = torch.ones(5, 3, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64)
    >>> G = GGNLinearOperator(model, MSELoss(), model.params, [(X, y)])
    >>> G.shape
    (26, 26)
    >>> type(G @ torch.ones(26, dtype=torch.float64)).__name__
    'Tensor'
    """

    #: tiers 1, 2 and 3 and the layer protocol
    tiers = frozenset(Tier) | {Capability.LAYER_PROTOCOL}

    def __init__(self, module, *, chunk_size=None, jvp_method="jvp", param_names=None):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchModel expects a torch.nn.Module, got {type(module).__name__}.")
        if jvp_method not in ("jvp", "linearize"):
            raise ValueError(f"jvp_method must be 'jvp' or 'linearize', got {jvp_method!r}.")
        self.jvp_method = jvp_method
        self.module = module
        self.chunk_size = chunk_size
        self._dropouts = [
            (n, m) for n, m in module.named_modules() if isinstance(m, _DROPOUT_TYPES)
        ]
        self._batch_norms = [
            (n, m)
            for n, m in module.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        self._check_deterministic_mode()
        if param_names is None:
            trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        else:
            trainable = _named_selection(module, param_names)
        if not trainable:
            raise ValueError(
                "The module has no parameters that require gradients; there is no curvature "
                "to take. Set requires_grad=True on the parameters of interest."
            )
        self.param_names = [n for n, _ in trainable]
        _refuse_unsupported_padding(module, self.param_names)
        _refuse_unsupported_embeddings(module, self.param_names)
        self._shapes = [tuple(p.shape) for _, p in trainable]
        self._taps = _tapped_layers(module, self.param_names)
        # how the inputs of a functional linear map are laid out, per weight name (the
        # projections inside MultiheadAttention see sequence-first inputs)
        self._layouts = _linear_layouts(module, self.param_names)
        # the forward pass's torch.fx structure, for the layer protocol of a module graph
        # that is no chain (traced when first needed)
        self._structure = None
        # whether forward mode works through the module (False after it first failed:
        # Jacobian-vector products then go through reverse-over-reverse)
        self._forward_mode = True

    @property
    def name(self) -> str:
        return f"TorchModel({type(self.module).__name__})"

    def __repr__(self) -> str:
        return f"TorchModel({type(self.module).__name__}, param_names={self.param_names})"

    @property
    def params(self) -> list:
        """The module's trainable parameters, detached (they share memory with the module)."""
        named = dict(self.module.named_parameters())
        return [named[n].detach() for n in self.param_names]

    def expected_param_shapes(self):
        return list(self._shapes)

    def __call__(self, params, x):
        self._check_inputs(params, x)
        with torch.no_grad():
            return self._forward(params, x)

    def linearize(self, params, x) -> Linearization:
        self._check_inputs(params, x)
        # Detached: products must not extend a graph the caller's tensors may carry.
        return _TorchLinearization(self, [p.detach() for p in params], x.detach())

    # -- internals --------------------------------------------------------------------

    def _forward(self, params, x):
        try:
            with _differentiable_attention(), _AffineBatchNorm():
                return functional_call(
                    self.module, dict(zip(self.param_names, params, strict=True)), (x,)
                )
        except RuntimeError as error:
            # integer inputs where a layer needs floats: torch's own message names
            # neither the model nor the array (``mat1 and mat2 must have the same dtype``)
            if params and x.dtype != params[0].dtype and "dtype" in str(error).lower():
                raise TypeError(
                    f"{self.name}: the module could not take the inputs X of dtype "
                    f"{_dtype_name(x.dtype)} with its {_dtype_name(params[0].dtype)} parameters "
                    f"(PyTorch: {error}). Cast the inputs, x.to({params[0].dtype}), unless the "
                    "first layer takes integer ids (nn.Embedding)."
                ) from error
            raise

    def _traced_structure(self, problem):
        """The forward pass as nested chains and residual sums (traced once).

        ``problem`` says why the hooks found no chain; it leads the message of a graph
        that cannot be mapped.
        """
        if self._structure is None:
            try:
                self._structure = _graph.trace_structure(self.module)
            except ValueError as error:
                raise ValueError(
                    "The layer protocol maps the module calls of the forward pass to layers, "
                    f"in a chain or in residual connections; {problem} {error}"
                ) from None
        return self._structure

    def _vmap(self, fn):
        """``fn`` mapped over the trailing axis of its inputs and outputs."""
        # out_dims=0 then movedim: vmap with out_dims=-1 fails for outputs that do not
        # depend on the mapped inputs (e.g. the last bias in a second-order product).
        mapped = vmap(fn, in_dims=-1, out_dims=0, chunk_size=self.chunk_size)

        def fn_over_last_axis(*args):
            out = mapped(*args)
            if isinstance(out, torch.Tensor):
                return torch.movedim(out, 0, -1)
            return [torch.movedim(o, 0, -1) for o in out]

        return fn_over_last_axis

    def _check_deterministic_mode(self):
        """Refuse modules whose outputs are random or couple the data points.

        Runs at construction and before every forward pass, so that a module switched
        to training mode afterwards is refused when it is next evaluated or linearized.
        """
        active = [n for n, m in self._dropouts if m.training and m.p > 0]
        if active:
            raise ValueError(
                f"The module has dropout layers in training mode ({active}): its outputs are "
                "random, so curvature products would be too. Call module.eval() first."
            )
        _refuse_batch_statistics(self._batch_norms)

    def _check_inputs(self, params, x):
        self._check_deterministic_mode()
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name} expects a torch.Tensor input, got {type(x).__name__}.")
        if not all(isinstance(p, torch.Tensor) for p in params):
            raise TypeError(
                f"{self.name} expects its parameters as torch tensors, got "
                f"{sorted({type(p).__name__ for p in params})}."
            )
        if params and x.is_floating_point() and x.dtype != params[0].dtype:
            raise TypeError(
                f"{self.name}: the inputs X are {_dtype_name(x.dtype)} but the parameters are "
                f"{_dtype_name(params[0].dtype)}; PyTorch layers take one dtype. Cast the "
                f"inputs with x.to({params[0].dtype}) (or the module with "
                f"module.to({x.dtype}) and pass its parameters again)."
            )
        if x.is_complex():
            raise TypeError(
                f"{self.name}: the inputs X are complex ({_dtype_name(x.dtype)}); curvature "
                "operators take real data."
            )
        if params and params[0].device != x.device:
            raise ValueError(
                f"The data X is on device {x.device} but the parameters are on device "
                f"{params[0].device}. Move the data (or the model) with .to(device)."
            )
        fixed = next(_fixed_tensors(self.module, self.param_names), None)
        if fixed is not None and fixed[1].device != x.device:
            raise ValueError(
                f"The data X is on device {x.device} but the module's tensor {fixed[0]!r} "
                f"(a buffer or frozen parameter) is on device {fixed[1].device}. Move the "
                "module with module.to(device)."
            )


def _dtype_name(dtype) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")


class _TorchLinearization(Linearization):
    """Outputs of one forward pass and its ``torch.func`` products."""

    def __init__(self, model: TorchModel, params, x):
        self._function = lambda *ps: model._forward(list(ps), x)
        # The forward pass is recorded once by autograd: vector-Jacobian products and
        # the double-backward second-order products all start from this graph (kept
        # with retain_graph, so a cached linearization serves every product). It is
        # recorded when first needed (_graph), so that a Jacobian-vector product asked
        # for first records it in the same pass (_recording_jvp).
        self._leaves = [p.detach().requires_grad_(True) for p in params]
        self._graph_outputs = None
        self._detached_outputs = None
        self._push = None  # the traced tangent map of jvp_method="linearize"
        self._transposed = None  # J^T u with a graph in u (the reverse-mode jvp)
        self._protocol_layers = None
        super().__init__(model, params, x, None)

    @property
    def outputs(self):
        """The model's outputs (the forward pass is recorded at the first request)."""
        self._graph()
        return self._detached_outputs

    @outputs.setter
    def outputs(self, value):
        if value is not None:  # the base class initializes it to None here
            raise AttributeError("The outputs of a linearization are read-only.")

    def _graph(self):
        """The outputs with the recorded graph of the forward pass, recorded once."""
        if self._graph_outputs is None:
            with torch.enable_grad():
                self._keep(self._function(*self._leaves))
        return self._graph_outputs

    def _keep(self, outputs):
        self._graph_outputs = outputs
        self._detached_outputs = outputs.detach()

    def _jvp(self, tangents):
        if self.model._forward_mode:
            try:
                if self._graph_outputs is None and tangents[0].shape[-1] == 1:
                    return self._recording_jvp(tangents)
                return self._forward_mode_jvp(tangents)
            except (NotImplementedError, RuntimeError) as error:
                if not _is_missing_forward_mode(error):
                    raise
                self.model._forward_mode = False
        return self._reverse_mode_jvp(tangents)

    def _recording_jvp(self, tangents):
        """``J v`` for one vector in the pass that records the forward graph.

        The first product of a linearization that has not run its forward pass yet
        (each product of an operator without ``cache``): one forward pass with dual
        numbers (``torch.autograd.forward_ad``) over the leaves that autograd records
        gives the outputs, their graph for the backward passes that follow, and ``J
        v``, where recording first and then ``torch.func.jvp`` would run the primal
        computation twice.
        """
        with torch.enable_grad(), forward_ad.dual_level():
            duals = [
                forward_ad.make_dual(leaf, t[..., 0])
                for leaf, t in zip(self._leaves, tangents, strict=True)
            ]
            outputs, tangent = forward_ad.unpack_dual(self.model._forward(duals, self.x))
            if tangent is None:  # the outputs do not depend on the parameters
                tangent = torch.zeros_like(outputs)
            tangent = tangent.detach()
        self._keep(outputs)
        return tangent[..., None]

    def _forward_mode_jvp(self, tangents):
        if self.model.jvp_method == "linearize":
            single = self._traced_tangent_map()
        else:
            primals = tuple(self.params)

            def single(*v):
                return jvp(self._function, primals, v)[1]

        return self._map_columns(single, tangents)

    def _reverse_mode_jvp(self, tangents):
        """``J v`` by reverse-over-reverse: ``J v = d/du <J^T u, v>`` (the "double vjp").

        The fallback for modules without forward-mode derivatives: ``J^T u`` is
        recorded once (with a graph, ``u`` a leaf) over the forward graph, and each
        product is one batched backward pass through it, linear in ``u``.
        """
        if self._transposed is None:
            with torch.enable_grad():
                u = torch.zeros_like(self._graph(), requires_grad=True)
                first = torch.autograd.grad(
                    self._graph_outputs,
                    self._leaves,
                    grad_outputs=u,
                    create_graph=True,
                    retain_graph=True,
                    allow_unused=True,
                )
            used = [i for i, g in enumerate(first) if g is not None and g.requires_grad]
            self._transposed = (u, [first[i] for i in used], used)
        u, roots, used = self._transposed
        K = tangents[0].shape[-1]
        if not roots:
            return torch.zeros(u.shape + (K,), dtype=u.dtype, device=u.device)
        return self._grad_columns(roots, [tangents[i] for i in used], K, wrt=[u])[0]

    def _traced_tangent_map(self):
        if self._push is None:
            with warnings.catch_warnings():
                # torch.fx's constant folding warns about its own internals.
                warnings.simplefilter("ignore", UserWarning)
                self._push = linearize(self._function, *self.params)[1]
        return self._push

    def _vjp(self, cotangents):
        return self._grad_columns([self._graph()], [cotangents], cotangents.shape[-1])

    def _second_order_vjp(self, cotangent, tangents, cotangent_tangent):
        # With a traceable w = A(J v), one pass replaces a J v pass followed by the
        # second-order one: the cotangent is made to depend on the outputs through a
        # term that is zero in value but whose derivative is A J.
        def dependent_cotangent(outputs):
            return cotangent + cotangent_tangent((outputs - outputs.detach())[..., None])[..., 0]

        if cotangent_tangent is None:  # sum_c u_c Hess(f_c) is symmetric
            return self._reverse_over_reverse(lambda outputs: cotangent, tangents)
        if isinstance(cotangent_tangent, TraceableLinearMap) and cotangent_tangent.symmetric:
            return self._reverse_over_reverse(dependent_cotangent, tangents)
        if self.model._forward_mode:
            try:
                return self._forward_over_reverse(
                    cotangent, tangents, cotangent_tangent, dependent_cotangent
                )
            except (NotImplementedError, RuntimeError) as error:
                if not _is_missing_forward_mode(error):
                    raise
                self.model._forward_mode = False
        # reverse mode only: sum_c u_c Hess(f_c) v by double backward, plus J^T w (with
        # w = A(J v) from the reverse-mode jvp when w is a map)
        if callable(cotangent_tangent):
            cotangent_tangent = cotangent_tangent(self._jvp(tangents))
        curvature = self._reverse_over_reverse(lambda outputs: cotangent, tangents)
        return [c + g for c, g in zip(curvature, self._vjp(cotangent_tangent), strict=True)]

    def _forward_over_reverse(self, cotangent, tangents, cotangent_tangent, dependent_cotangent):
        """The second-order product of a map ``w`` that is not symmetric: the
        ``torch.func.jvp`` of the ``torch.func.vjp``."""
        function, primals = self._function, tuple(self.params)

        def transposed_jacobian_product(u, *ps):
            return vjp(function, *ps)[1](u)

        if isinstance(cotangent_tangent, TraceableLinearMap):

            def with_dependent_cotangent(*ps):
                outputs, pullback = vjp(function, *ps)
                return pullback(dependent_cotangent(outputs))

            def single_fused(*v):
                return jvp(with_dependent_cotangent, primals, v)[1]

            return list(self._map_columns(single_fused, tangents))
        if callable(cotangent_tangent):  # a black box: J v first, then w from it
            cotangent_tangent = cotangent_tangent(self._jvp(tangents))

        def single_with_w(w, *v):
            return jvp(transposed_jacobian_product, (cotangent, *primals), (w, *v))[1]

        return list(self._map_columns(single_with_w, [cotangent_tangent, *tangents]))

    def _reverse_over_reverse(self, dependent_cotangent, tangents):
        """``d/dtheta <J^T u(theta), v>`` for all K columns by double backward.

        This is the transpose of the forward-over-reverse product, hence equal to it
        when the whole matrix is symmetric (``A`` symmetric); PyTorch's reverse mode is
        faster on the CPU than its forward mode through ``torch.func``.
        """
        outputs = self._graph()
        with torch.enable_grad():
            first = torch.autograd.grad(
                outputs,
                self._leaves,
                grad_outputs=dependent_cotangent(outputs),
                create_graph=True,
                retain_graph=True,
                allow_unused=True,
            )
        # Entries of J^T u that do not depend on the parameters contribute nothing.
        used = [i for i, g in enumerate(first) if g is not None and g.requires_grad]
        K = tangents[0].shape[-1]
        return self._grad_columns([first[i] for i in used], [tangents[i] for i in used], K)

    def _grad_columns(self, roots, cotangents, K, wrt=None):
        """``sum_i (d roots_i / d params)^T cotangents_i`` for each trailing column.

        All ``K`` columns go through one batched backward pass (in chunks of the
        model's ``chunk_size`` if it has one). The recorded forward graph is retained.
        ``wrt``: the tensors to differentiate with respect to (default: the parameters).
        """
        leaves = self._leaves if wrt is None else wrt
        targets = self.params if wrt is None else wrt
        if not roots or not roots[0].requires_grad:  # nothing depends on the parameters
            return [_columns_or_zeros(None, p, K, False) for p in targets]
        chunk = K if self.model.chunk_size is None else self.model.chunk_size
        pieces = []
        for lo in range(0, K, chunk):
            columns = [c[..., lo : lo + chunk] for c in cotangents]
            batched = columns[0].shape[-1] > 1
            grads = torch.autograd.grad(
                roots,
                leaves,
                grad_outputs=[torch.movedim(c, -1, 0) if batched else c[..., 0] for c in columns],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )
            pieces.append(
                [
                    _columns_or_zeros(g, p, columns[0].shape[-1], batched)
                    for g, p in zip(grads, targets, strict=True)
                ]
            )
        if len(pieces) == 1:
            return pieces[0]
        return [torch.cat(parts, dim=-1) for parts in zip(*pieces, strict=True)]

    def _map_columns(self, single, arrays):
        """``single`` applied to each column ``k`` of the trailing axis of ``arrays``."""
        if arrays[0].shape[-1] == 1:  # one vector: skip vmap's overhead
            out = single(*(a[..., 0] for a in arrays))
            if isinstance(out, torch.Tensor):
                return out[..., None]
            return [o[..., None] for o in out]
        return self.model._vmap(single)(*arrays)

    def _layer_taps(self, cotangents):
        model = self.model
        N = self.x.shape[0]
        # the functional taps (linear maps, embeddings, layer normalization) from a
        # torch-function mode, the modules' (convolutions, batch normalization) from
        # forward hooks; both keyed by the weight's index in the parameter list
        recorder = _TapRecorder(
            model, self.params, N, probes=cotangents is not None, input_shape=tuple(self.x.shape)
        )
        handles = []

        def make_hook(layer_name, weight_index, bias_index):
            def hook(_module, args, output):
                if weight_index in recorder.records:
                    raise ValueError(
                        f"The layer {layer_name!r} ran more than once in one forward pass; "
                        "layer taps need each tapped (e.g. Linear) layer to be used once."
                    )
                recorder.claim(layer_name, weight_index, bias_index)
                probe, output = recorder.probe(output)
                recorder.records[weight_index] = _Record(
                    layer_name, weight_index, bias_index, args[0].detach(), probe, "module"
                )
                return output

            return hook

        try:
            for layer_name, layer, weight_index, bias_index, _ in model._taps:
                handles.append(
                    layer.register_forward_hook(make_hook(layer_name, weight_index, bias_index))
                )
            with torch.enable_grad() if cotangents is not None else torch.no_grad():
                with recorder:
                    outputs = model._forward(self.params, self.x)
        finally:
            for handle in handles:
                handle.remove()
        records = [recorder.records[i] for i in sorted(recorder.records)]
        grads = [None] * len(records)
        if cotangents is not None and records:
            grads = _probe_gradients(outputs, [r.probe for r in records], cotangents)
        modules = {weight_index: entry for entry in model._taps for weight_index in [entry[2]]}
        taps = []
        for record, columns in zip(records, grads, strict=True):
            if record.layout == "module":
                taps.append(self._module_tap(modules[record.weight_index], record, columns))
                continue
            g = None if columns is None else torch.stack(columns, dim=0)
            if g is not None:
                # (M, output layout) to the shared layout (N, S..., D, M)
                g = _items(
                    g, record.layout, N, lead=1, who=self.model.param_names[record.weight_index]
                )
                g = torch.movedim(g, 0, -1)
            taps.append(
                LayerTap(
                    record.name,
                    record.weight_index,
                    record.bias_index,
                    record.inputs,
                    g,
                    record.matrix_shape,
                    kind=record.kind,
                )
            )
        return taps

    def _module_tap(self, entry, record, columns):
        """The tap of a hooked module from its native equivalent's rule; ``columns``: the
        gradients of its output for each cotangent column (or None)."""
        name, layer, weight_index, bias_index, equivalent = entry
        # built anew: the native layer reads the module's buffers (batch
        # normalization's running statistics), which .to() or .double() replace
        fresh = _native_layer(layer)
        equivalent = equivalent if fresh is None else fresh
        a = record.inputs
        if isinstance(equivalent, (native.Conv1d, native.Conv2d)):
            inputs, output_grads, shape = _unfolded_conv_tap(equivalent, a, columns)
            return LayerTap(
                name,
                weight_index,
                bias_index,
                inputs,
                output_grads,
                shape,
                kind=equivalent.tap_kind,
                groups=equivalent.tap_groups,
            )
        g = None
        if columns is not None:
            # (M, N, ..., D_out) to the native layers' internal layout (N, ..., M, D_out)
            g = torch.stack(columns, dim=-2)
        state = {"input": a}
        if equivalent.input_layout is not None:
            state["channels_first"] = equivalent.input_layout == "channels_first"
        # the native layer's tap: its inputs and output gradients in the shared
        # (N, S..., D) layout and the weight's matrix shape
        try:
            inputs, output_grads, shape = equivalent.tap(state, g, array_namespace(a))
        except MissingLayerRuleError as error:
            raise MissingLayerRuleError(
                f"The module {name!r} (torch.nn.{type(layer).__name__}) has no layer tap: "
                f"{error} (Or leave its parameters out of param_names to approximate "
                "the curvature of the others.)"
            ) from None
        shape = None if shape is None else tuple(shape)
        return LayerTap(
            name, weight_index, bias_index, inputs, output_grads, shape, kind=equivalent.tap_kind
        )

    def _layers(self):
        if self._protocol_layers is None:
            self._protocol_layers = self._protocol_chain()
        return list(self._protocol_layers)

    def _protocol_chain(self):
        """The layer protocol's layers from one hooked forward pass (and, for a module
        graph that is no chain, its torch.fx trace)."""
        index = {n: i for i, n in enumerate(self.model.param_names)}
        calls, outputs = self._record_calls()
        _refuse_shared_modules(calls, index)
        problem = _chain_problem(calls, outputs, index)
        if problem is None:
            natives = [None if c.value is None else _native_layer(c.module) for c in calls]
            layouts = channels_first_inputs([_NO_LAYOUT if n is None else n for n in natives])
            return [
                self._protocol_layer(call.name, call.module, call.value, equivalent, first, index)
                for call, equivalent, first in zip(calls, natives, layouts, strict=True)
            ]
        return self._traced_layers(calls, problem, index)

    def _record_calls(self, *, clone=False):
        """One forward pass with hooks on the leaf modules: each call, in order.

        With ``clone`` every output is copied when it is made, so that later in-place
        operations (``ReLU(inplace=True)``, ``out += identity``) leave it as it was.
        """
        calls, handles, running = [], [], {}

        def pre_hook(name, module):
            def hook(_module, args):
                given = args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
                value = given
                if given is not None and getattr(module, "inplace", False):
                    value = given.clone()  # the module overwrites its input
                running[name] = len(calls)
                calls.append(_Call(name, module, given, value))

            return hook

        def post_hook(name):
            def hook(_module, _args, output):
                call = calls[running.pop(name)]
                call.output = output.clone() if clone and torch.is_tensor(output) else output
                call.version = getattr(output, "_version", None)

            return hook

        try:
            for name, module in self.model.module.named_modules():
                if next(module.children(), None) is not None:
                    continue
                handles.append(module.register_forward_pre_hook(pre_hook(name, module)))
                handles.append(module.register_forward_hook(post_hook(name)))
            with torch.no_grad():
                outputs = self.model._forward(self.params, self.x)
        finally:
            for handle in handles:
                handle.remove()
        return calls, outputs

    def _protocol_layer(self, name, module, value, layer, channels_first, index):
        """The layer protocol for one leaf module: its native equivalent ``layer`` (or
        None), bound to its input ``value``."""
        values, aligned = self._own_params(name, module, index)
        if layer is None:
            return LinearizedLayer(
                name,
                tuple(i for i in aligned if i is not None),
                description=f"torch.nn.{type(module).__name__} (a module the PyTorch "
                "frontend has no layer-protocol rules for)",
            )
        state = {"input": value, "channels_first": channels_first}
        return layer.linearized(
            values, state, array_namespace(value), name=name, param_indices=aligned
        )

    def _own_params(self, name, module, index):
        """A module's own parameters: their values (the linearization's where trainable)
        and their positions among the model's parameters (None: a constant)."""
        prefix = f"{name}." if name else ""
        own = list(module.named_parameters(recurse=False))
        aligned = [index.get(prefix + n) for n, _ in own]
        values = [
            p.detach() if i is None else self.params[i]
            for (_, p), i in zip(own, aligned, strict=True)
        ]
        return values, aligned

    # -- residual networks: the structure from torch.fx --------------------------------------

    def _traced_layers(self, calls, problem, index):
        """The layers of a module graph that is no chain: chains of module calls and
        residual sums (:mod:`._torch_graph`), each bound to its input of one forward pass.

        A residual sum is the native :class:`curvlinops.nn.Residual` of its paths'
        native layers, whose rules (both paths, their cross terms) the curvature walks
        use; its inner layers are named after the torch modules.
        """
        structure = self.model._traced_structure(problem)
        found = [c.name for c in calls]
        if structure.calls != found:
            raise ValueError(
                "The layer protocol maps a module graph that is no chain by its torch.fx "
                f"trace, whose forward pass calls the modules {structure.calls}, but the "
                f"forward pass ran {found} (control flow that depends on the data?). Use "
                "HessianLinearOperator or KFACLinearOperator for this model."
            )
        if any(torch.is_tensor(c.output) and c.output._version != c.version for c in calls):
            calls, _ = self._record_calls(clone=True)  # outputs changed in place later
        binder = _ResidualBinder(self, calls, index)
        elements = structure.elements
        natives = [binder.native(e) for e in elements]
        layouts = channels_first_inputs([_NO_LAYOUT if n is None else n for n in natives])
        layers, value = [], self.x
        for element, equivalent, channels_first in zip(elements, natives, layouts, strict=True):
            layers.append(binder.bind(element, equivalent, channels_first, value))
            value = binder.output(element, value)
        return layers


@dataclass(eq=False)
class _Call:
    """One call of a leaf module in a hooked forward pass.

    ``given`` is its input tensor (None if it took other arguments), ``value`` that
    input as it was at the call (copied for a module that overwrites it), ``output``
    its output and ``version`` the output's version counter when it was made (a later
    in-place change increments it).
    """

    name: str
    module: object
    given: object
    value: object
    output: object = None
    version: int | None = None


def _refuse_shared_modules(calls, index):
    """A module with trainable parameters called twice has no layer of its own: refused."""
    seen = set()
    for call in calls:
        prefix = f"{call.name}." if call.name else ""
        trainable = any(prefix + n in index for n, _ in call.module.named_parameters(recurse=False))
        if trainable and call.name in seen:
            raise ValueError(
                f"The module {call.name!r} ran more than once in one forward pass; the "
                "layer protocol needs each module with parameters to be called once (use "
                "HessianLinearOperator or KFACLinearOperator for this model)."
            )
        seen.add(call.name)


def _chain_problem(calls, outputs, index):
    """Why the calls are no chain (each taking the one before's output, the last one's
    the model's) from the first with trainable parameters on; None for a chain."""

    def trainable(call):
        prefix = f"{call.name}." if call.name else ""
        return any(prefix + n in index for n, _ in call.module.named_parameters(recurse=False))

    first = next((i for i, c in enumerate(calls) if trainable(c)), len(calls))
    for i in range(max(first, 1), len(calls)):
        if calls[i].given is None or calls[i].given is not calls[i - 1].output:
            return (
                f"the input of module {calls[i].name!r} is not the output of the module "
                f"before it ({calls[i - 1].name!r}): the forward pass combines tensors "
                "outside modules."
            )
    if calls and first < len(calls) and outputs is not calls[-1].output:
        return (
            f"the model's output is not the output of its last module ({calls[-1].name!r}): "
            "the forward pass computes its output outside modules."
        )
    return None


class _ResidualBinder:
    """Maps the elements of a traced forward pass (:mod:`._torch_graph`) to native layers
    and binds them to their inputs: module calls by ``_NATIVE_EQUIVALENTS``, the
    functional ReLU and flatten by ``curvlinops.nn``'s, residual sums by
    :class:`curvlinops.nn.Residual` over their paths' native layers."""

    def __init__(self, linearization, calls, index):
        self.lin, self.calls, self.index = linearization, calls, index

    def native(self, element):
        """The native layer of an element (None: a module without an equivalent inside)."""
        if isinstance(element, _graph.Call):
            return _native_layer(self.calls[element.index].module)
        if isinstance(element, _graph.Functional):
            return native.ReLU() if element.kind == "relu" else native.Flatten()
        paths = [
            None if path is None else [self.native(e) for e in path]
            for path in (element.block, element.shortcut)
        ]
        if any(la is None for path in paths if path is not None for la in path):
            return None
        block, shortcut = (None if p is None else native.Sequential(*p) for p in paths)
        return native.Residual(block, shortcut)

    def bind(self, element, layer, channels_first, value):
        """The element bound to its input ``value``: a LinearizedLayer."""
        if isinstance(element, _graph.Call):
            call = self.calls[element.index]
            return self.lin._protocol_layer(
                call.name, call.module, value, layer, channels_first, self.index
            )
        xp = array_namespace(value)
        state = {"input": value, "channels_first": channels_first}
        if isinstance(element, _graph.Functional):
            return layer.linearized([], state, xp, name=element.name, param_indices=())
        values, aligned = [], []
        for call in _calls_in(element, self.calls):
            v, a = self.lin._own_params(call.name, call.module, self.index)
            values += v
            aligned += a
        if layer is None:
            missing = [
                f"{c.name!r} (torch.nn.{type(c.module).__name__})"
                for c in _calls_in(element, self.calls)
                if _native_layer(c.module) is None
            ]
            return LinearizedLayer(
                element.name,
                tuple(i for i in aligned if i is not None),
                description=f"a residual connection around {', '.join(missing)} (a module "
                "without layer-protocol rules in the PyTorch frontend)",
            )
        bound = layer.linearized(values, state, xp, name=element.name, param_indices=aligned)
        _name_branches(bound, element, self.calls)
        return bound

    def output(self, element, value):
        """The element's output for its input ``value``: recorded for module calls,
        computed (out of place) for the functional layers and the sums."""
        if isinstance(element, _graph.Call):
            return self.calls[element.index].output
        if isinstance(element, _graph.Functional):
            return _graph.evaluate(element, value)
        total = value
        if element.shortcut is not None:
            total = self._chain_output(element.shortcut, value)
        return self._chain_output(element.block, value) + total

    def _chain_output(self, elements, value):
        for element in elements:
            value = self.output(element, value)
        return value


def _calls_in(element, calls):
    """The recorded module calls inside a residual sum, in the native Residual's
    parameter order (the block's, then the shortcut's)."""
    for inner in element.block + (element.shortcut or []):
        if isinstance(inner, _graph.Call):
            yield calls[inner.index]
        elif isinstance(inner, _graph.Sum):
            yield from _calls_in(inner, calls)


def _name_branches(bound, element, calls):
    """Name the layers of a bound Residual's branches after the torch modules (the native
    Residual names them ``"<name>.block.<i>"``), recursively for nested sums."""
    for layers, path in zip(bound.branches(), (element.block, element.shortcut), strict=True):
        for layer, inner in zip(layers or [], path or [], strict=True):
            layer.name = calls[inner.index].name if isinstance(inner, _graph.Call) else inner.name
            if isinstance(inner, _graph.Sum):
                _name_branches(layer, inner, calls)


# -- tier 3 from functional calls ---------------------------------------------------------


@dataclass
class _Record:
    """One tapped call of a forward pass: its layer's parameters, inputs and probe.

    ``layout`` says how the inputs and outputs of the call are laid out: ``"module"``
    (a hooked module, laid out by its native equivalent's tap), ``"batch_first"``
    (``(N, S..., D)``), ``"sequence_first"`` (``(S, N, D)``) or ``"flat_sequence_first"``
    (``(S * N, D)``, rows position-major), the last two inside ``MultiheadAttention``.
    """

    name: str
    weight_index: int
    bias_index: int | None
    inputs: object
    probe: object
    layout: str
    kind: str = "matrix"
    matrix_shape: tuple | None = None


#: one hop of torch-function dispatch skipped (to see the calls inside a Python-level
#: function such as ``F.multi_head_attention_forward``); None in versions without it
_redispatch = getattr(torch.overrides, "redispatch_function", None)
if _redispatch is None and hasattr(torch._C, "_skip_one_hop_torch_function"):  # pragma: no cover
    _redispatch = torch._C._skip_one_hop_torch_function


class _TapRecorder(torch.overrides.TorchFunctionMode):
    """A torch-function mode that taps every call in which a parameter enters the model.

    Intercepts ``torch.nn.functional.linear`` (``nn.Linear``, the projections of
    ``nn.MultiheadAttention``, functional calls in user code), ``F.embedding`` and
    ``F.layer_norm`` whose weight is one of the parameters of the pass (by object
    identity with the tensors given to ``functional_call``): it records the call's
    inputs (for layer normalization the normalized inputs), adds a zero probe to its
    output (whose gradient is then the output gradient) and maps weight and bias to
    their indices in the parameter list. Other calls pass through unchanged.
    """

    def __init__(self, model, params, batch_size, *, probes, input_shape=()):
        super().__init__()
        self.input_shape = input_shape
        self.names = model.param_names
        self.layouts = model._layouts
        self.index = {id(p): i for i, p in enumerate(params)}
        self.storages = {_storage(p): i for i, p in enumerate(params) if _storage(p)}
        self.batch_size = batch_size
        self.probes = probes
        self.records = {}  # weight index -> _Record
        self.owner = {}  # parameter index -> name of the tapped layer that uses it

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            return self._linear(func, args, kwargs)
        if func is torch.nn.functional.embedding:
            return self._embedding(func, args, kwargs)
        if func is torch.nn.functional.layer_norm:
            return self._layer_norm(func, args, kwargs)
        if func is torch.nn.functional.multi_head_attention_forward and _redispatch is not None:
            # a composite whose projections call F.linear: run its body with the mode on
            with self:
                return _redispatch(func, types, args, kwargs)
        return func(*args, **kwargs)

    # -- the tapped functions ----------------------------------------------------------

    def _linear(self, func, args, kwargs):
        x, weight, bias = _bind(args, kwargs, ("input", "weight", "bias"), {"bias": None})
        w = self._parameter(weight, "torch.nn.functional.linear (as its weight)")
        b = None if bias is None else self._parameter(bias, "torch.nn.functional.linear")
        output = func(*args, **kwargs)
        if w is None:  # a frozen weight: no tap (a trainable bias stays untapped)
            return output
        layout = self.layouts.get(self.names[w], "batch_first")
        inputs = _items(x.detach(), layout, self.batch_size, lead=0, who=self.names[w])
        return self._record(w, b, inputs, output, layout, "matrix", tuple(weight.shape))

    def _embedding(self, func, args, kwargs):
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type")
        names += ("scale_grad_by_freq", "sparse")
        defaults = {"padding_idx": None, "max_norm": None, "norm_type": 2.0}
        defaults |= {"scale_grad_by_freq": False, "sparse": False}
        ids, table, padding_idx, max_norm, _, by_freq, sparse = _bind(args, kwargs, names, defaults)
        w = self._parameter(table, "torch.nn.functional.embedding (as its table)")
        if w is None:
            return func(*args, **kwargs)
        problem = _embedding_problem(padding_idx, max_norm, by_freq, sparse)
        if problem:
            raise ValueError(
                f"The parameter {self.names[w]!r} is the table of an embedding lookup "
                f"(torch.nn.functional.embedding) with {problem}"
            )
        sequence = self.input_shape[1] if len(self.input_shape) > 1 else None
        if ids.ndim == 1 and ids.shape[0] == sequence:
            # ids (S,) shared by all data (positions arange(S), broadcast later) cannot be
            # told from one id per datum when N == S: refused, never read as per-datum
            raise ValueError(
                f"The parameter {self.names[w]!r} is the table of an embedding looked up with "
                f"ids of shape {tuple(ids.shape)}, the length of the inputs' second axis: "
                "shared ids such as positions torch.arange(S) have no data axis, and with as "
                "many data points as positions they would be taken for one id per datum. "
                "Look them up with a data axis, e.g. torch.arange(S).expand(N, S)."
            )
        output = func(*args, **kwargs)
        inputs = _items(ids.detach(), "batch_first", self.batch_size, lead=0, who=self.names[w])
        shape = (table.shape[1], table.shape[0])
        return self._record(w, None, inputs, output, "batch_first", "embedding", shape)

    def _layer_norm(self, func, args, kwargs):
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        defaults = {"weight": None, "bias": None, "eps": 1e-5}
        x, shape, weight, bias, eps = _bind(args, kwargs, names, defaults)
        w = None if weight is None else self._parameter(weight, "torch.nn.functional.layer_norm")
        b = None if bias is None else self._parameter(bias, "torch.nn.functional.layer_norm")
        if w is None:  # no (trainable) weight: no tap
            return func(*args, **kwargs)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(shape) != 1:
            raise ValueError(
                f"The parameter {self.names[w]!r} is the weight of a layer normalization over "
                f"normalized_shape={shape}; layer taps (an elementwise affine map over the "
                "features) cover normalization over the last axis only (normalized_shape of "
                "one dimension, e.g. torch.nn.LayerNorm(D)). Normalize over one axis, or "
                "leave its parameters out of param_names."
            )
        output = func(*args, **kwargs)
        normalized = func(x.detach(), shape, None, None, eps)  # (x - mean) / sqrt(var + eps)
        inputs = _items(normalized, "batch_first", self.batch_size, lead=0, who=self.names[w])
        return self._record(w, b, inputs, output, "batch_first", "elementwise", None)

    # -- bookkeeping -----------------------------------------------------------------------

    def _parameter(self, tensor, where):
        """The index of ``tensor`` in the parameter list, or None; refuses slices of one."""
        index = self.index.get(id(tensor))
        if index is not None or not isinstance(tensor, torch.Tensor):
            return index
        shared = self.storages.get(_storage(tensor))
        if shared is not None:
            raise ValueError(
                f"A part of the parameter {self.names[shared]!r} (a slice or view of it) "
                f"enters {where}; layer taps need whole parameters in a layer. (In "
                "torch.nn.MultiheadAttention this is cross-attention, where the query and "
                "the key/value differ, or kdim/vdim different from embed_dim: the packed "
                "projection is split. Self-attention, attn(x, x, x), projects with the whole "
                "in_proj_weight.) Or leave the parameter out of param_names."
            )
        return None

    def claim(self, name, weight_index, bias_index):
        """Mark the parameters as a layer's; refuse a parameter in two tapped calls."""
        for index in (weight_index, bias_index):
            if index is None:
                continue
            if index in self.owner:
                raise ValueError(
                    f"The parameter {self.names[index]!r} enters the model more than once "
                    f"in one forward pass (in {self.owner[index]!r} and in {name!r}): a layer "
                    "called twice, or weight tying such as a language-model head that "
                    "shares the embedding table. Layer taps, and with them K-FAC, EKFAC "
                    "and the GGN/EF diagonals, need each parameter in one layer, used once "
                    "(Kronecker factors need each parameter in one layer). Untie the "
                    "weights, or leave the parameter out of param_names; the exact "
                    "operators (GGNLinearOperator, HessianLinearOperator) take tied weights."
                )
            self.owner[index] = name

    def probe(self, output):
        """A zero added to ``output`` (requiring gradients), or None without cotangents."""
        if not self.probes:
            return None, output
        probe = torch.zeros_like(output, requires_grad=True)
        return probe, output + probe

    def _record(self, w, b, inputs, output, layout, kind, matrix_shape):
        name = _layer_name(self.names[w])
        self.claim(name, w, b)
        probe, output = self.probe(output)
        self.records[w] = _Record(name, w, b, inputs, probe, layout, kind, matrix_shape)
        return output


def _bind(args, kwargs, names, defaults):
    """The values of ``names`` from a call's positional and keyword arguments."""
    values = dict(zip(names, args, strict=False))
    for name in names[len(args) :]:
        values[name] = kwargs.get(name, defaults.get(name))
    return [values[n] for n in names]


def _storage(tensor):
    """The address of a tensor's storage (0 where it has none, e.g. on the meta device)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _layer_name(param_name):
    """The layer of a weight: ``"0.weight"`` -> ``"0"``, ``"attn.in_proj_weight"`` ->
    ``"attn.in_proj"``."""
    prefix, _, last = param_name.rpartition(".")
    if last == "weight":
        return prefix
    if last.endswith("_weight"):
        last = last[: -len("_weight")]
    return f"{prefix}.{last}" if prefix else last


def _items(t, layout, N, *, lead, who):
    """A call's inputs or outputs ``t`` (after ``lead`` leading axes) in the layout
    ``(N, S..., D)``, the data axis first; a clear error if it has no data axis."""
    if layout == "flat_sequence_first":  # (S * N, D), rows position-major
        t = torch.reshape(t, t.shape[:lead] + (-1, N, t.shape[-1]))
        layout = "sequence_first"
    if layout == "sequence_first":  # (S, N, D)
        if t.ndim - lead != 3:
            raise ValueError(
                f"The parameter {who!r} is a projection of torch.nn.MultiheadAttention "
                f"called on inputs of shape {tuple(t.shape[lead:])}; layer taps need batched "
                "inputs (the data points of the model's input on the batch axis)."
            )
        t = torch.movedim(t, lead + 1, lead)
    if t.ndim <= lead or t.shape[lead] != N:
        raise ValueError(
            f"The parameter {who!r} enters a layer whose inputs have shape "
            f"{tuple(t.shape[lead:])}, whose first axis is not the data axis of the model's "
            f"inputs ({N} data points); layer taps need each tapped layer's inputs laid out "
            "as (N, ..., D) with the data points first (as the model's inputs are)."
        )
    return t


def _linear_layouts(module, param_names):
    """The layout of the inputs of each weight's linear map, where not ``"batch_first"``.

    ``torch.nn.MultiheadAttention`` projects sequence-first inputs ``(S, N, E)``
    (``batch_first`` or not: it transposes internally) and applies ``out_proj`` to
    ``(S * N, E)``.
    """
    names, layouts = set(param_names), {}
    for name, layer in module.named_modules():
        if not isinstance(layer, torch.nn.MultiheadAttention):
            continue
        prefix = f"{name}." if name else ""
        for weight in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            if prefix + weight in names:
                layouts[prefix + weight] = "sequence_first"
        if prefix + "out_proj.weight" in names:
            layouts[prefix + "out_proj.weight"] = "flat_sequence_first"
    return layouts


class _AffineBatchNorm(torch.overrides.TorchFunctionMode):
    """Batch normalization in evaluation mode as the affine map it is, per channel.

    ``F.batch_norm`` with running statistics and ``training=False`` computes ``x * a +
    b`` with ``a = weight / sqrt(running_var + eps)`` and ``b = bias - running_mean * a``
    (PyTorch's CPU kernel computes exactly these); here that map is written with
    ``torch.addcmul``, the same function, whose derivatives are elementwise products
    and sums. PyTorch's derivatives of ``F.batch_norm`` are written for training mode
    (batch statistics): its forward-mode derivative and its double backward carry the
    terms of the batch statistics, several full-size passes more per layer, and its
    backward has no batching rule for ``vmap``. Other calls pass through unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training")
            names += ("momentum", "eps")
            defaults = {"weight": None, "bias": None, "training": False, "eps": 1e-5}
            x, mean, var, weight, bias, training, _, eps = _bind(args, kwargs, names, defaults)
            if not training and mean is not None and var is not None and x.ndim >= 2:
                return _affine_batch_norm(x, mean, var, weight, bias, eps)
        return func(*args, **kwargs)


def _affine_batch_norm(x, mean, var, weight, bias, eps):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over axis 1 as ``x * a + b``."""
    scale = 1.0 / torch.sqrt(var + eps)
    if weight is not None:
        scale = weight * scale
    shift = -mean * scale
    if bias is not None:
        shift = bias + shift
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))


@contextlib.contextmanager
def _differentiable_attention():
    """Attention through differentiable operations: no fused kernels.

    ``torch.nn.MultiheadAttention`` in evaluation mode may take PyTorch's fast path
    (``torch._native_multi_head_attention``), which bypasses ``F.linear`` and has no
    forward-mode derivative; ``scaled_dot_product_attention``'s fused CPU and GPU kernels
    have neither forward-mode derivatives nor double backward. Inside this context the
    fast path is off and attention uses the math backend (a composite of differentiable
    operations, the same function); the previous settings are restored on exit.
    """
    mha = getattr(torch.backends, "mha", None)
    previous = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        with _math_attention():
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(previous)


def _math_attention():
    """``scaled_dot_product_attention`` restricted to its math backend, where torch has
    the switch."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _is_missing_forward_mode(error):
    """Whether ``error`` says that an operation has no forward-mode derivative."""
    message = str(error)
    return any(
        phrase in message
        for phrase in (
            "forward AD",
            "forward mode",
            "forward-mode",
            "jvp function",
            "functorch transforms",  # an autograd.Function without setup_context
        )
    )


def _embedding_problem(padding_idx, max_norm, scale_grad_by_freq, sparse):
    """What about an embedding's options the curvature cannot take, or None."""
    if max_norm is not None:
        return (
            f"max_norm={max_norm}: it renormalizes rows of the table in place at every "
            "lookup, so the model would change its own parameters while it is evaluated. "
            "Construct it without max_norm (normalize explicitly in forward if needed), or "
            "leave the table out of param_names."
        )
    if padding_idx is not None:
        return (
            f"padding_idx={padding_idx}: PyTorch's backward pass leaves the gradient of "
            "that row at zero while its forward-mode derivative does not, so the model's "
            "Jacobian and its transposed products would disagree. Construct it without "
            "padding_idx (mask padded positions in the loss or the model instead), or leave "
            "the table out of param_names."
        )
    if scale_grad_by_freq:
        return (
            "scale_grad_by_freq=True: its backward pass scales the gradients by the inverse "
            "frequency of the ids in the batch, which is not the derivative of the model. "
            "Construct it with scale_grad_by_freq=False."
        )
    if sparse:
        return (
            "sparse=True: the gradients of its table are sparse tensors, which batched "
            "backward passes (the curvature products) do not take. Construct it with "
            "sparse=False (the default); the function and its curvature are the same."
        )
    return None


def _refuse_unsupported_embeddings(module, param_names):
    """Refuse embeddings with a trainable table whose options change the derivatives."""
    names = set(param_names)
    for name, layer in module.named_modules():
        if not isinstance(layer, torch.nn.Embedding):
            continue
        prefix = f"{name}." if name else ""
        if prefix + "weight" not in names:
            continue
        problem = _embedding_problem(
            layer.padding_idx, layer.max_norm, layer.scale_grad_by_freq, layer.sparse
        )
        if problem:
            raise ValueError(f"The module {name!r} is a torch.nn.Embedding with {problem}")


def _refuse_batch_statistics(batch_norms):
    """Refuse batch normalization that normalizes with the statistics of the batch.

    ``batch_norms`` are ``(name, module)`` pairs. A batch normalization (``SyncBatchNorm``
    included) uses its batch's statistics in training mode, and in evaluation mode too
    when it keeps no running statistics, as PyTorch decides it.
    """
    training = [n for n, m in batch_norms if m.training]
    untracked = [
        n
        for n, m in batch_norms
        if not m.training and (m.running_mean is None or m.running_var is None)
    ]
    if not training and not untracked:
        return
    why = (
        "Batch statistics couple the data points, so the loss is not a sum over data and "
        "its curvature would depend on how the data is split into batches."
    )
    if training:
        raise ValueError(
            f"The module has batch normalization in training mode ({training}), which "
            f"normalizes with the statistics of each batch. {why} Call model.eval() to use "
            "the running statistics instead: the curvature is then that of the network in "
            "inference form (batch normalization as a fixed affine map per channel)."
        )
    raise ValueError(
        f"The module has batch normalization without running statistics ({untracked}: "
        "track_running_stats=False), which normalizes with the statistics of each batch "
        f"even in evaluation mode. {why} Construct it with track_running_stats=True (and "
        "train it, or load running statistics) and call model.eval(), or replace it by "
        "LayerNorm or GroupNorm."
    )


def _refuse_unsupported_padding(module, param_names):
    """Refuse convolutions with trainable weights whose padding is not zeros.

    Their layer taps would unfold zero-padded inputs; rather than leave them untapped
    (and the parameters silently out of K-FAC and the diagonals), TorchModel refuses them.
    """
    names = set(param_names)
    for name, layer in module.named_modules():
        if not isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d)):
            continue
        prefix = f"{name}." if name else ""
        if layer.padding_mode == "zeros" or prefix + "weight" not in names:
            continue
        raise ValueError(
            f"The module {name!r} is a torch.nn.{type(layer).__name__} with "
            f"padding_mode={layer.padding_mode!r}; TorchModel's layer taps unfold zero-padded "
            "inputs, so only padding_mode='zeros' is supported. Pad explicitly instead "
            "(e.g. torch.nn.ReflectionPad2d or CircularPad2d followed by the convolution with "
            "padding=0, which computes the same function), or leave its parameters out of "
            "param_names."
        )


def _named_selection(module, param_names):
    """``(name, parameter)`` for the given names, in their order; a clear error otherwise."""
    if isinstance(param_names, str):
        raise TypeError(f"param_names must be a list of names, got the string {param_names!r}.")
    named = dict(module.named_parameters())
    names = list(param_names)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(
            f"param_names {unknown} are not parameters of the module; its parameters are "
            f"{list(named)}."
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"param_names lists {repeated} more than once.")
    return [(n, named[n]) for n in names]


def _fixed_tensors(module, param_names):
    """``(name, tensor)`` of the module's buffers and frozen parameters."""
    names = set(param_names)
    for n, p in module.named_parameters():
        if n not in names:
            yield n, p
    yield from module.named_buffers()


def _native_layer(module):
    """The ``curvlinops.nn`` layer computing what ``module`` computes, or None."""
    make = _NATIVE_EQUIVALENTS.get(type(module))
    if make is None and isinstance(module, torch.nn.Linear):  # subclasses of Linear
        make = _NATIVE_EQUIVALENTS[torch.nn.Linear]
    return None if make is None else make(module)


def _tapped_layers(module, param_names):
    """``(name, module, weight_index, bias_index, native layer)`` of each hooked module.

    A module is hooked when its native equivalent has a tap (a weight that multiplies
    its inputs: convolutions; batch normalization) and its weight is among the trainable
    parameters. ``torch.nn.Linear`` is not: it is tapped where it calls
    ``torch.nn.functional.linear`` (:class:`_TapRecorder`).
    """
    index = {n: i for i, n in enumerate(param_names)}
    taps = []
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):  # tapped at its F.linear call
            continue
        equivalent = _native_layer(layer)
        if equivalent is None or not equivalent.has_tap:
            continue
        prefix = f"{name}." if name else ""
        if prefix + "weight" not in index:
            continue
        weight, bias = index[prefix + "weight"], index.get(prefix + "bias")
        taps.append((name, layer, weight, bias, equivalent))
    return taps


_NO_LAYOUT = type("_NoLayout", (), {"input_layout": None, "output_layout": None})()


def _convolution(native_type):
    """Builder of the native convolution equivalent to a ``torch.nn.Conv1d``/``Conv2d``."""

    def make(module):
        if module.padding_mode != "zeros":
            return None  # the native convolution pads with zeros only
        return native_type(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
        )

    return make


def _batch_norm(native_type):
    """Builder of the native batch normalization (inference form) for a torch one."""

    def make(module):
        if module.running_mean is None or module.running_var is None:
            return None  # normalizes with batch statistics: refused by TorchModel
        return native_type(
            module.num_features,
            running_mean=module.running_mean.detach(),
            running_var=module.running_var.detach(),
            eps=module.eps,
            affine=module.affine,
        )

    return make


def _avg_pool(native_type):
    def make(module):
        if not module.count_include_pad or module.ceil_mode or module.divisor_override is not None:
            return None
        return native_type(module.kernel_size, stride=module.stride, padding=module.padding)

    return make


def _max_pool(native_type):
    def make(module):
        if module.ceil_mode or module.return_indices:
            return None
        return native_type(
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
        )

    return make


def _global_avg_pool(native_type):
    def make(module):
        size = module.output_size
        if size not in (1, (1, 1)):
            return None  # only the average over all pixels
        return native_type(keepdim=True)

    return make


def _optional_equivalents():
    """Entries for native layers that ``curvlinops.nn`` may not have (yet): one per
    ``(torch type, native name, builder of the builder)`` whose native class exists."""
    optional = [
        (torch.nn.BatchNorm1d, "BatchNorm1d", _batch_norm),
        (torch.nn.BatchNorm2d, "BatchNorm2d", _batch_norm),
        (torch.nn.AvgPool2d, "AvgPool2d", _avg_pool),
        (torch.nn.MaxPool2d, "MaxPool2d", _max_pool),
        (torch.nn.AdaptiveAvgPool2d, "GlobalAvgPool2d", _global_avg_pool),
    ]
    entries = {}
    for torch_type, native_name, builder in optional:
        native_type = getattr(native, native_name, None)
        if native_type is not None:
            entries[torch_type] = builder(native_type)
    return entries


def _flatten(module):
    if (module.start_dim, module.end_dim) != (1, -1):
        return None  # only the default flattens every axis after the batch axis
    return native.Flatten()


#: torch module type -> builder of the ``curvlinops.nn`` layer computing the same function
#: (or None where the module's settings have no native equivalent). One entry per layer
#: type: this is the PyTorch frontend's part of adding a layer type to the protocol.
#: Entries for native layers ``curvlinops.nn`` may not have (batch normalization,
#: pooling) are present only where it has them (:func:`_optional_equivalents`).
_NATIVE_EQUIVALENTS = {
    torch.nn.Linear: lambda m: native.Linear(
        m.in_features, m.out_features, bias=m.bias is not None
    ),
    torch.nn.ReLU: lambda m: native.ReLU(),
    torch.nn.LeakyReLU: lambda m: native.LeakyReLU(m.negative_slope),
    torch.nn.Tanh: lambda m: native.Tanh(),
    torch.nn.Sigmoid: lambda m: native.Sigmoid(),
    torch.nn.Softplus: lambda m: native.Softplus(m.beta, m.threshold),
    torch.nn.GELU: lambda m: native.GELU(m.approximate),
    torch.nn.ELU: lambda m: native.ELU(m.alpha),
    torch.nn.Identity: lambda m: native.Identity(),
    torch.nn.Flatten: _flatten,
    torch.nn.Conv1d: _convolution(native.Conv1d),
    torch.nn.Conv2d: _convolution(native.Conv2d),
    **{t: (lambda m: native.Identity()) for t in _DROPOUT_TYPES},  # evaluation mode only
    **_optional_equivalents(),
}


# -- losses ---------------------------------------------------------------------------


def translate_loss(torch_loss) -> losses.Loss:
    """The curvlinops loss with the value of a PyTorch loss module.

    Supported, with ``reduction`` ``"mean"`` or ``"sum"``:

    - ``torch.nn.MSELoss`` -> :class:`curvlinops.MSELoss`;
    - ``torch.nn.CrossEntropyLoss`` -> :class:`curvlinops.CrossEntropyLoss` (without
      ``weight``, ``label_smoothing`` or a non-default ``ignore_index``). Note that
      curvlinops takes the classes on the **last** axis of the outputs; PyTorch's loss
      takes them on axis 1. The two agree for outputs ``(N, C)``.
    - ``torch.nn.BCEWithLogitsLoss`` -> :class:`curvlinops.BCEWithLogitsLoss` (without
      ``weight`` or ``pos_weight``);
    - ``torch.nn.PoissonNLLLoss`` with ``log_input=True, full=False`` ->
      :class:`curvlinops.PoissonNLLLoss`.

    Parameters
    ----------
    torch_loss : torch.nn.Module
        The PyTorch loss.

    Returns
    -------
    curvlinops.losses.Loss

    Raises
    ------
    ValueError
        For an option the curvlinops loss does not have (weights, label smoothing,
        ``pos_weight``, ``ignore_index``, ``reduction="none"``), naming it.
    TypeError
        For any other loss.

    Examples
    --------
    >>> import torch
    >>> from curvlinops.frontends.torch import translate_loss
    >>> translate_loss(torch.nn.MSELoss(reduction="sum"))
    MSELoss(reduction='sum')
    >>> translate_loss(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    Traceback (most recent call last):
    ...
    ValueError: CrossEntropyLoss with label_smoothing=0.1 has no curvlinops equivalent; ...
    """
    nn = torch.nn
    name = type(torch_loss).__name__
    reduction = getattr(torch_loss, "reduction", None)
    if isinstance(torch_loss, nn.MSELoss):
        target = losses.MSELoss
    elif isinstance(torch_loss, nn.CrossEntropyLoss):
        _refuse(name, "weight", torch_loss.weight is not None, torch_loss.weight)
        _refuse(
            name, "label_smoothing", torch_loss.label_smoothing != 0.0, torch_loss.label_smoothing
        )
        _refuse(name, "ignore_index", torch_loss.ignore_index != -100, torch_loss.ignore_index)
        target = losses.CrossEntropyLoss
    elif isinstance(torch_loss, nn.BCEWithLogitsLoss):
        _refuse(name, "weight", torch_loss.weight is not None, torch_loss.weight)
        _refuse(name, "pos_weight", torch_loss.pos_weight is not None, torch_loss.pos_weight)
        target = losses.BCEWithLogitsLoss
    elif isinstance(torch_loss, nn.PoissonNLLLoss):
        _refuse(name, "log_input", not torch_loss.log_input, torch_loss.log_input)
        _refuse(name, "full", torch_loss.full, torch_loss.full)
        target = losses.PoissonNLLLoss
    else:
        raise TypeError(
            f"No curvlinops translation for {type(torch_loss).__module__}.{name}; supported: "
            "torch.nn.MSELoss, CrossEntropyLoss, BCEWithLogitsLoss, PoissonNLLLoss. "
            "(For a Gaussian with predicted variance use curvlinops.GaussianNLLLoss, which "
            "takes [means | log-variances] as outputs.)"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{name} has reduction={reduction!r}; curvature needs a scalar loss, so use "
            "reduction='mean' or 'sum'."
        )
    return target(reduction=reduction)


def _refuse(loss_name, option, used, value):
    if used:
        raise ValueError(
            f"{loss_name} with {option}={value} has no curvlinops equivalent; construct it "
            f"without {option} (curvlinops losses are unweighted negative log-likelihoods)."
        )


def _probe_gradients(outputs, probes, cotangents):
    """Per probe, its gradients for each of the ``M`` trailing cotangent columns.

    One backward pass per column (the graph retained between them): a batched backward
    pass (``is_grads_batched``, ``vmap`` over the columns) has no batching rule for the
    backward of convolutions and batch normalization and runs them column by column
    anyway, with copies of the batched intermediates on top. The columns are left
    unstacked, so that each tap lays them out with one copy.
    """
    M = cotangents.shape[-1]
    columns = [
        torch.autograd.grad(
            outputs,
            probes,
            grad_outputs=cotangents[..., m],
            retain_graph=m < M - 1,
            allow_unused=True,
            materialize_grads=True,
        )
        for m in range(M)
    ]
    return list(zip(*columns, strict=True))


def _unfolded_conv_tap(conv, a, columns):
    """A convolution's tap from strided views of torch tensors.

    The same arrays as the native layer's tap (``conv.tap``, the reference): inputs
    ``(N, S, C_in * kh * kw)``, entries in ``(channel, kh, kw)`` order per output
    position, and output gradients ``(N, S, C_out, M)`` from the output's gradients for
    the ``M`` cotangent columns, ``columns`` (``(N, C_out, [Ho,] Wo)`` each), or None. The
    native tap stacks one strided slice per kernel offset and permutes the stack; here
    the patches are one strided view of the padded input (``Tensor.as_strided``) copied
    once into their layout, and each column's gradients are copied once, transposed,
    into theirs. A ``Conv1d`` is a ``Conv2d`` with an image height of one. The output
    gradients are a view whose last two axes swapped are contiguous (``(N, S, M,
    C_out)``, the rows K-FAC multiplies). With groups the channels of each group are
    contiguous in the patches (group-major), and the weight's matrix is
    ``(C_out, C_in / groups * kh * kw)``.
    """
    (kh, kw), (sh, sw), (dh, dw), ((pt, pb), (pl, pr)) = conv._geometry()
    x = a if a.ndim == 4 else a[:, :, None, :]
    if pt or pb or pl or pr:
        x = torch.nn.functional.pad(x, (pl, pr, pt, pb))
    N, C_in, H, W = x.shape
    Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = x.stride()
    patches = x.as_strided(
        (N, Ho, Wo, C_in, kh, kw),
        (s_n, sh * s_h, sw * s_w, s_c, dh * s_h, dw * s_w),
        x.storage_offset(),
    )
    S, D = Ho * Wo, C_in * kh * kw
    inputs = patches.reshape(N, S, D)
    grads = None
    if columns is not None:
        C = conv.out_channels
        rows = torch.stack([c.reshape(N, C, S).transpose(1, 2) for c in columns], dim=2)
        grads = rows.transpose(2, 3)  # (N, S, C_out, M), a view of (N, S, M, C_out)
    return inputs, grads, (conv.out_channels, D // conv.groups)


def _columns_or_zeros(grad, param, K, batched):
    """A gradient as ``param.shape + (K,)``: zeros where autograd returned None (the
    parameter does not influence the product)."""
    if grad is None:
        return torch.zeros(param.shape + (K,), dtype=param.dtype, device=param.device)
    return torch.movedim(grad, 0, -1) if batched else grad[..., None]
