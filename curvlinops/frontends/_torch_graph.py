"""The structure of a torch module's forward pass: chains of module calls and residual sums.

The layer protocol walks a chain of layers, in which a residual connection
``y = body(x) + shortcut(x)`` is one layer with two inner chains
(:class:`curvlinops.nn.Residual`). A torch ResNet adds the two paths in its
``forward``, outside any module, where forward hooks do not see it. This module reads
the forward pass with ``torch.fx`` (:func:`trace_structure`): every module without
children is a leaf of the trace (called, not traced through), and the graph between
them must be a nesting of

- chains: one tensor flows from node to node;
- sums of two paths that leave one tensor and meet again at one addition
  (``operator.add``, ``torch.add`` or ``Tensor.add``, ``out += identity`` included);
- between modules, the functional ReLU (``F.relu``, ``torch.relu``, ``Tensor.relu``,
  in place or not) and ``torch.flatten(x, 1)``.

The result is a list of elements (:class:`Call`, :class:`Functional`, :class:`Sum`)
over the trace's nodes, in forward order; the PyTorch frontend maps each to its
``curvlinops.nn`` layer. Anything else (another functional operation between modules,
a tensor attribute read in ``forward``, a value used by two paths that do not meet at
one addition, several inputs or outputs) is refused with a ValueError that names it
and says why. :func:`evaluate` computes the value of a functional node from its
arguments' values (out of place), so that the frontend can bind each element to its
input from one recorded forward pass.

Importing this module imports PyTorch. May import: torch.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

__all__ = ["Call", "Functional", "Structure", "Sum", "evaluate", "trace_structure"]

#: what the layer protocol can map, for messages
_MAPPABLE = (
    "calls of modules, sums of two paths (a residual connection), relu and "
    "flatten(x, 1) between modules"
)

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__")
_RELU_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu_)
_RELU_METHODS = ("relu", "relu_")


@dataclass(eq=False)
class Call:
    """One call of a leaf module: ``index`` counts the module calls of the pass."""

    node: torch.fx.Node
    name: str
    index: int

    @property
    def input(self):
        return self.node.args[0]


@dataclass(eq=False)
class Functional:
    """A functional layer between modules: ``kind`` is ``"relu"`` or ``"flatten"``."""

    node: torch.fx.Node
    kind: str
    input: torch.fx.Node

    @property
    def name(self) -> str:
        return self.node.name


@dataclass(eq=False)
class Sum:
    """``block(x) + shortcut(x)`` of the tensor ``fork``; ``shortcut`` None: the identity."""

    node: torch.fx.Node
    fork: torch.fx.Node
    block: list
    shortcut: list | None
    name: str

    @property
    def input(self):
        return self.fork


@dataclass(eq=False)
class Structure:
    """A traced forward pass: its top-level chain and the module names in call order."""

    elements: list
    calls: list


class _LeafTracer(torch.fx.Tracer):
    """Keeps every module without children as one call (as the frontend's hooks see it)."""

    def is_leaf_module(self, m, module_qualified_name):
        return next(m.children(), None) is None


def trace_structure(module) -> Structure:
    """The forward pass of ``module`` as nested chains and residual sums.

    Raises
    ------
    ValueError
        If ``torch.fx`` cannot trace the forward pass, or its graph is not a nesting of
        chains and residual sums of the operations that the layer protocol maps; the
        message names the operation.

    Examples
    --------
    >>> import torch
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc, self.act = torch.nn.Linear(3, 3), torch.nn.Tanh()
    ...     def forward(self, x):
    ...         return torch.relu(self.act(self.fc(x)) + x)
    >>> structure = trace_structure(Block())
    >>> [type(e).__name__ for e in structure.elements]
    ['Sum', 'Functional']
    >>> [c.name for c in structure.elements[0].block], structure.elements[0].shortcut
    (['fc', 'act'], None)
    """
    try:
        graph = _LeafTracer().trace(module)
    except Exception as error:  # noqa: BLE001 - any failure of the trace: say why
        raise ValueError(
            f"torch.fx could not trace the forward pass of {type(module).__name__} to find "
            f"its residual structure ({type(error).__name__}: {error}). Use "
            "HessianLinearOperator or KFACLinearOperator for this model, or build it from "
            "curvlinops.nn layers (curvlinops.nn.Residual for a skip connection)."
        ) from error
    return _Parser(graph).structure()


def evaluate(element, value):
    """The output of a :class:`Functional` element for the input ``value`` (out of place)."""
    if element.kind == "relu":
        return torch.relu(value)
    return torch.flatten(value, 1)


class _Parser:
    """Reads a traced graph backwards from its output into nested chains."""

    def __init__(self, graph):
        self.nodes = list(graph.nodes)
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        self.input = inputs[0] if inputs else None
        for extra in inputs[1:]:
            if extra.users:
                raise ValueError(
                    f"The forward pass uses a second argument {extra.name!r}; the layer "
                    "protocol maps a forward pass of one input tensor."
                )
        modules = [n for n in self.nodes if n.op == "call_module"]
        self.calls = {n: Call(n, str(n.target), i) for i, n in enumerate(modules)}
        self.forks = {}
        self.claimed = set()

    def structure(self) -> Structure:
        output = next(n for n in self.nodes if n.op == "output")
        result = output.args[0]
        if not isinstance(result, torch.fx.Node) or self.input is None:
            raise ValueError(
                "The forward pass returns "
                f"{type(result).__name__ if not isinstance(result, torch.fx.Node) else 'no input'}"
                "; the layer protocol maps a forward pass from one tensor to one tensor."
            )
        elements = self.chain(result, self.input)
        return Structure(elements, [c.name for c in self.calls.values()])

    # -- what a node is ------------------------------------------------------------------

    def kind(self, node):
        """``(kind, tensor arguments)`` of a node; a ValueError for what cannot be mapped."""
        if node.op == "call_module":
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
                raise ValueError(
                    f"The forward pass calls the module {node.target!r} with arguments "
                    f"{node.args} {node.kwargs}; the layer protocol maps modules of one input "
                    "tensor."
                )
            return "module", node.args
        if node.op in ("call_function", "call_method"):
            target = node.target
            is_method = node.op == "call_method"
            if target in (_ADD_METHODS if is_method else _ADD_FUNCTIONS):
                return "add", self._add_operands(node)
            if target in (_RELU_METHODS if is_method else _RELU_FUNCTIONS):
                return "relu", self._relu_operand(node)
            if target == ("flatten" if is_method else torch.flatten):
                return "flatten", self._flatten_operand(node)
        raise ValueError(
            f"The forward pass uses {_describe(node)} between modules, which the layer "
            f"protocol cannot map (it maps {_MAPPABLE}). Make it a module with a "
            "curvlinops.nn equivalent, or use HessianLinearOperator or KFACLinearOperator "
            "for this model."
        )

    def _add_operands(self, node):
        a, b = (list(node.args) + [None, None])[:2]
        extra = len(node.args) > 2 or node.kwargs
        if extra or not isinstance(a, torch.fx.Node) or not isinstance(b, torch.fx.Node):
            raise ValueError(
                f"The forward pass computes {_describe(node)} with the arguments {node.args} "
                f"{node.kwargs}; the layer protocol maps the sum of two tensors that two paths "
                "compute from one tensor (a residual connection), not a sum with a constant "
                "or a scaled sum."
            )
        return a, b

    def _relu_operand(self, node):
        args, kwargs = node.args, dict(node.kwargs)
        kwargs.pop("inplace", None)
        if not args or not isinstance(args[0], torch.fx.Node) or len(args) > 2 or kwargs:
            raise ValueError(
                f"The forward pass computes {_describe(node)} with the arguments {args} "
                f"{dict(node.kwargs)}; the layer protocol maps relu of one tensor."
            )
        return args[:1]

    def _flatten_operand(self, node):
        names = ("input", "start_dim", "end_dim")
        bound = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
        start, end = bound.get("start_dim", 0), bound.get("end_dim", -1)
        if not isinstance(bound.get("input"), torch.fx.Node) or (start, end) != (1, -1):
            raise ValueError(
                f"The forward pass computes {_describe(node)} from axis {start} to {end}; the "
                "layer protocol maps flatten(x, 1), which flattens every axis after the data "
                "axis (as torch.nn.Flatten())."
            )
        return (bound["input"],)

    # -- the nesting -----------------------------------------------------------------------

    def parent(self, node):
        """The node a node's value is computed from (an addition's: where its paths part)."""
        kind, args = self.kind(node)
        return self.fork(node) if kind == "add" else args[0]

    def spine(self, node):
        """The nodes from ``node`` back to the input, each addition's paths skipped."""
        out = [node]
        while node is not self.input:
            if node.op == "placeholder":
                raise ValueError(
                    f"The forward pass reads its argument {node.name!r}; the layer protocol "
                    "maps a forward pass of one input tensor."
                )
            node = self.parent(node)
            out.append(node)
        return out

    def fork(self, node):
        """Where the two paths of the addition ``node`` part: the nearest common node."""
        if node not in self.forks:
            a, b = self.kind(node)[1]
            on_a = set(self.spine(a))
            self.forks[node] = next(n for n in self.spine(b) if n in on_a)
        return self.forks[node]

    def chain(self, node, stop):
        """The elements that compute ``node`` from ``stop``, in forward order."""
        elements = []
        while node is not stop:
            self._claim(node)
            kind, args = self.kind(node)
            if kind == "add":
                elements.append(self._sum(node, *args))
                node = elements[-1].fork
                continue
            call = self.calls.get(node)
            elements.append(call if kind == "module" else Functional(node, kind, args[0]))
            node = args[0]
        return elements[::-1]

    def _sum(self, node, a, b):
        fork = self.fork(node)
        block, shortcut = self.chain(a, fork), self.chain(b, fork)
        if not block:  # x + f(x): the identity first
            block, shortcut = shortcut, block
        if not block:
            raise ValueError(
                f"The forward pass computes {_describe(node)} of a tensor with itself; the "
                "layer protocol maps the sum of two paths from one tensor (a residual "
                "connection) where at least one path is not the identity."
            )
        return Sum(node, fork, block, shortcut or None, _sum_name(node, block + (shortcut or [])))

    def _claim(self, node):
        if node in self.claimed:
            raise ValueError(
                f"The value of {_describe(node)} feeds two paths of the forward pass that do "
                "not meet at one addition; the layer protocol maps chains and residual sums "
                "nested in each other (as in a ResNet), not this graph. Use "
                "HessianLinearOperator or KFACLinearOperator for this model."
            )
        self.claimed.add(node)


def _leaf_names(elements):
    for element in elements:
        if isinstance(element, Call):
            yield element.name
        elif isinstance(element, Sum):
            yield from _leaf_names(element.block + (element.shortcut or []))


def _sum_name(node, elements) -> str:
    """The module that holds a sum: the common parent of its modules (else the node's name)."""
    parents = [name.split(".")[:-1] for name in _leaf_names(elements)]
    common = []
    for parts in zip(*parents, strict=False):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return ".".join(common) if parents and common else node.name


def _describe(node) -> str:
    """How a node reads in a message: ``torch.cat``, ``the method .view``, ..."""
    if node.op == "call_method":
        return f"the method .{node.target}() ({node.name})"
    if node.op == "call_function":
        target = node.target
        module = getattr(target, "__module__", None) or "torch"
        name = getattr(target, "__name__", repr(target))
        if module in ("_operator", "operator"):
            return f"operator.{name} ({node.name})"
        module = "torch" if module.startswith("torch._C") else module
        return f"{module}.{name} ({node.name})"
    if node.op == "get_attr":
        return f"the tensor attribute {node.target!r} (read in forward)"
    if node.op == "call_module":
        return f"the call of module {node.target!r}"
    return f"{node.op} {node.name}"
