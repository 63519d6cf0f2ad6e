"""A model as a flat list of calls over named values: what the executor lowers.

Two sources give the same form: a torch module traced by ``torch.fx`` (the zoo, any traceable user
module; the layers the executor knows are leaves, so their own forward is not traced into), and an
imported Caffe/ONNX :class:`~sparsecnn.io._graph.GraphNet`, whose steps already are such a list.
:func:`record` runs the list once in torch on an example input and keeps every value, which gives
the executor each activation's shape (and every shape-only value, e.g. ``x.size(0)``) for that input
shape.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from sparsecnn.errors import SparseCNNError

__all__ = ["Node", "Ref", "capture", "record", "record_shapes"]


@dataclass(frozen=True)
class Ref:
    """A reference to the value another node produced."""

    name: str


@dataclass(eq=False)
class Node:
    """One call: ``value[name] = fn(*args, **kwargs)`` with :class:`Ref` arguments resolved.

    ``op`` is ``"input"`` (the model's input; ``fn`` unused), ``"module"`` (``fn`` an nn.Module named
    ``target`` in the model), ``"function"`` (a Python callable), ``"method"`` (``fn`` the method name,
    called on the first argument), ``"const"`` (``fn`` the value) or ``"output"`` (``args[0]`` the result).
    """

    name: str
    op: str
    fn: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    target: str = ""

    def refs(self) -> list[str]:
        out: list[str] = []

        def walk(a: Any) -> None:
            if isinstance(a, Ref):
                out.append(a.name)
            elif isinstance(a, (tuple, list)):
                for b in a:
                    walk(b)
            elif isinstance(a, dict):
                for b in a.values():
                    walk(b)

        walk(self.args)
        walk(self.kwargs)
        return out


def _leaf_types() -> tuple[type, ...]:
    from sparsecnn.io import _graph as g
    from sparsecnn.layers import SparseConv2d, SparseLinear

    return (SparseConv2d, SparseLinear, g.Concat, g.Eltwise, g.ChannelScale, g.Binary, g.Constant, g.Shape,
            g.Gather, g.Unsqueeze, g.Squeeze, g.Reshape, g.Pad2d,
            g.AvgPoolPadded)


class _Tracer(fx.Tracer):
    """Modules of torch.nn, sparsecnn's layers and the importers' operators are leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _leaf_types()):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return type(m).__module__.startswith("torch.nn") or isinstance(
            m, (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.LocalResponseNorm, nn.BatchNorm2d, nn.ReLU))


def _convert(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return Ref(a.name)
    if isinstance(a, (tuple, list)):
        return type(a)(_convert(b) for b in a)
    if isinstance(a, dict):
        return {k: _convert(v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_convert(a.start), _convert(a.stop), _convert(a.step))
    return a


def _from_fx(model: nn.Module) -> list[Node]:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable Python (data-dependent control flow)
        raise SparseCNNError(
            f"cannot compile {type(model).__name__}: torch.fx could not trace its forward "
            f"({type(exc).__name__}: {exc}); make the forward traceable (no control flow on tensor values), "
            f"or export it to ONNX and compile the ONNX file") from None
    nodes: list[Node] = []
    inputs = 0
    for n in graph.nodes:
        args, kwargs = _convert(n.args), _convert(n.kwargs)
        if n.op == "placeholder":
            inputs += 1
            nodes.append(Node(n.name, "input", None))
        elif n.op == "get_attr":
            value = operator.attrgetter(n.target)(model)
            nodes.append(Node(n.name, "const", value.detach() if isinstance(value, torch.Tensor) else value))
        elif n.op == "call_module":
            nodes.append(Node(n.name, "module", model.get_submodule(n.target), args, kwargs, n.target))
        elif n.op == "call_function":
            nodes.append(Node(n.name, "function", n.target, args, kwargs))
        elif n.op == "call_method":
            nodes.append(Node(n.name, "method", n.target, args, kwargs))
        elif n.op == "output":
            out = args[0]
            if not isinstance(out, Ref):
                raise SparseCNNError(f"cannot compile {type(model).__name__}: its forward returns "
                                     f"{type(n.args[0]).__name__}, not one tensor; return a single tensor")
            nodes.append(Node(n.name, "output", None, (out,)))
    if inputs != 1:
        raise SparseCNNError(f"cannot compile {type(model).__name__}: its forward takes {inputs} inputs; "
                             f"the executor runs models of one input tensor")
    return nodes


def _from_graphnet(net: nn.Module) -> list[Node]:
    if len(net.inputs) != 1 or len(net.outputs) != 1:
        raise SparseCNNError(f"cannot compile this graph: it has {len(net.inputs)} inputs and "
                             f"{len(net.outputs)} outputs; the executor runs graphs of one input and one "
                             f"output")
    names: dict[str, str] = {}
    nodes = [Node("input", "input", None)]
    names[net.inputs[0]] = "input"
    for step in net.steps:
        args: list[Any] = [Ref(names[i]) for i in step.inputs]
        if step.flatten >= 0:
            flat = f"{step.name}.flatten"
            nodes.append(Node(flat, "function", _flatten_from, (args[0], step.flatten)))
            args[0] = Ref(flat)
        mod = net._modules[step.name]
        if len(step.outputs) == 1:
            nodes.append(Node(step.name, "module", mod, tuple(args), {}, step.name))
            names[step.outputs[0]] = step.name
        else:
            nodes.append(Node(step.name, "module", mod, tuple(args), {}, step.name))
            for k, out in enumerate(step.outputs):
                item = f"{step.name}.{k}"
                nodes.append(Node(item, "function", operator.getitem, (Ref(step.name), k)))
                names[out] = item
    nodes.append(Node("output", "output", None, (Ref(names[net.outputs[0]]),)))
    return nodes


def _flatten_from(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Caffe's InnerProduct ``axis``: flatten from ``axis`` when the input has more dimensions."""
    return x.flatten(axis) if x.dim() > axis + 1 else x


def capture(model: nn.Module) -> list[Node]:
    """The model's calls in execution order (an imported GraphNet's steps, or its fx trace)."""
    from sparsecnn.io._graph import GraphNet

    if isinstance(model, GraphNet):
        return _from_graphnet(model)
    return _from_fx(model)


def resolve(a: Any, values: dict[str, Any]) -> Any:
    """``a`` with every :class:`Ref` replaced by its value."""
    if isinstance(a, Ref):
        return values[a.name]
    if isinstance(a, (tuple, list)):
        return type(a)(resolve(b, values) for b in a)
    if isinstance(a, dict):
        return {k: resolve(v, values) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(resolve(a.start, values), resolve(a.stop, values), resolve(a.step, values))
    return a


def call(node: Node, values: dict[str, Any]) -> Any:
    """Run one node in torch (eager) with its arguments taken from ``values``."""
    args, kwargs = resolve(node.args, values), resolve(node.kwargs, values)
    if node.op in ("module", "function"):
        return node.fn(*args, **kwargs)
    if node.op == "method":
        return getattr(args[0], node.fn)(*args[1:], **kwargs)
    if node.op == "const":
        return node.fn
    raise AssertionError(node.op)


def record(nodes: list[Node], x: torch.Tensor) -> dict[str, Any]:
    """Every node's value on input ``x`` (torch eager, no autograd).

    ``no_grad``, not ``inference_mode``: buffers the layers create and keep here (a strategy's
    per-shape workspace tensors) must stay writable by later calls outside inference mode.
    """
    values: dict[str, Any] = {}
    with torch.no_grad():
        for node in nodes:
            if node.op == "input":
                values[node.name] = x
            elif node.op == "output":
                values[node.name] = values[node.args[0].name]
            else:
                values[node.name] = call(node, values)
    return values


class _WrongInput(ValueError):
    """A sparse layer given an input it cannot take, found on meta tensors."""


def _meta_layer(fn: nn.Module, x: Any) -> torch.Tensor | None:
    """The output of a sparse layer on a meta tensor (its shape only), or None for other modules. The
    sparse layers' engines need data; their output shapes follow from their geometry. A wrong input
    raises :class:`_WrongInput` (a ValueError), as a real run would raise."""
    from sparsecnn.layers import SparseConv2d, SparseLinear

    if not isinstance(x, torch.Tensor) or not x.is_meta:
        return None
    if isinstance(fn, SparseConv2d):
        spec = fn.spec
        if x.dim() not in (3, 4) or x.shape[-3] != spec.in_channels:
            raise _WrongInput(f"expected input (B, {spec.in_channels}, H, W), got {tuple(x.shape)}")
        hout, wout = spec.out_hw(int(x.shape[-2]), int(x.shape[-1]))
        if hout < 1 or wout < 1:
            raise _WrongInput(f"input {tuple(x.shape[-2:])} is too small for the kernel")
        return torch.empty((*x.shape[:-3], spec.out_channels, hout, wout), device="meta")
    if isinstance(fn, SparseLinear):
        if x.dim() == 0 or x.shape[-1] != fn.in_features:
            raise _WrongInput(f"expected input (..., {fn.in_features}), got {tuple(x.shape)}")
        return torch.empty((*x.shape[:-1], fn.out_features), device="meta")
    return None


def record_shapes(nodes: list[Node], shape: tuple[int, ...]) -> dict[str, Any]:
    """Every node's value for an input of ``shape`` as :func:`record` gives it, with the values that
    depend on the input's data as ``meta`` tensors (shape and dtype, no storage): what lowering needs.

    Why: :func:`record` keeps every activation of a real forward pass, so building a program for a
    large batch held all of them at once (VGG-16 at batch 32: 3.2 GB against the executor's 0.8 GB
    of planned buffers; at batch 256 more than this machine's 24 GB) and spent the time of an eager
    forward pass (2.8 s). A model with an op that cannot run on meta tensors falls back to
    :func:`record` on zeros.
    """
    values: dict[str, Any] = {}
    try:
        with torch.no_grad():
            for node in nodes:
                if node.op == "input":
                    values[node.name] = torch.empty(shape, device="meta")
                elif node.op == "output":
                    values[node.name] = values[node.args[0].name]
                else:
                    meta = None
                    if node.op == "module" and node.args:
                        meta = _meta_layer(node.fn, resolve(node.args[0], values))
                    values[node.name] = meta if meta is not None else call(node, values)
    except _WrongInput:
        raise
    except Exception:  # an op without a meta kernel (or a custom module that needs data)
        return record(nodes, torch.zeros(shape))
    return values
