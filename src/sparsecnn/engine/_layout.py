"""Which activations the compiled executor keeps channel-blocked, and which convs write and read them.

The channel-blocked layout (:mod:`sparsecnn.kernels.blocked`) pays where chains of dense (or SSL's
compact) conv layers run the channel-vector implicit GEMM: each layer then stores its results with
whole-vector stores and reads its input channels in cache lines, as ONNX Runtime's NCHWc kernels do.
Sparse kernels, pools and torch fallbacks read the plain layout. :func:`plan_layouts` decides it per
value for one input shape:

1. *Candidates*: conv layers on the CPU with one group, a multiple of ``BLOCK`` output channels and a
   weight density of at least :data:`MIN_DENSITY` (or SSL's compact ``lowered`` weights; ``compile``
   also tries a lower threshold, see :data:`DENSE_TRY`), which the channel-vector implicit GEMM can
   run; each gets an :class:`~sparsecnn.kernels.implicit_gemm.ImplicitGemmPrep` of its weights.
2. *Classes*: values that must share a layout, because an elementwise step reads and writes them
   together (a ReLU or a clamp such as ReLU6 and its input, a residual add and both its inputs,
   eval-mode dropout).
3. A class is blocked when every member is made by a candidate conv, an elementwise step or a max
   pool of a blocked value, every member's channel count is a multiple of ``BLOCK``, and some member
   is read by a candidate conv or by a max pool whose output is blocked (decided together: all
   classes blocked to start with, those that fail dropped until none does). Max pools of blocked
   values write blocked values, average pools to 1 x 1 read them directly (their output is the same
   in both layouts); other readers (linear layers, reshapes, LRN, the model's output, other convs)
   read a plain copy, converted once right after the value is made.

Candidate convs that read or write a blocked value run the channel-vector GEMM (``conv:blocked`` steps);
the others keep their planned strategy. Depthwise layers run ``direct`` with a multiple of ``BLOCK``
channels are blocked readers and writers too (``conv:blocked-dw``,
:func:`sparsecnn.kernels.depthwise.bind_depthwise_blocked`), where both their input and their output
end up blocked (one that would read one layout and write the other is dropped, and the classes
decided again): MobileNet's chains of 1x1 and depthwise layers stay blocked end to end. The compiled
model times the program with and without blocked values on the example input and keeps the faster
(:func:`sparsecnn.compile`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsecnn.engine._graph import Node, Ref

__all__ = ["Layouts", "below_threshold", "has_candidates", "plan_layouts", "to_plain", "unbuild_below"]

# Convs with at least this fraction of nonzero weights run dense in the channel-vector GEMM when
# their neighbours are blocked (sparser ones keep their sparse kernel and the plain layout).
MIN_DENSITY = 0.35
# ... and compile times the blocked layout with the sparser ones dense too where those hold at least
# this fraction of nonzero weights on average (sparsecnn.engine._faster_layout).
DENSE_TRY = 0.25
# Off: max / average pools read and write only the plain layout (the A/B baseline of the blocked pools).
POOLS = True
# Off: depthwise layers read and write only the plain layout, so blocked chains stop at them (the A/B
# baseline of kernels.depthwise.bind_depthwise_blocked).
DEPTHWISE = True


def to_plain(x: torch.Tensor) -> torch.Tensor:
    """The conversion node's function (in torch, for :func:`sparsecnn.engine._graph.record`: the value
    is the plain tensor itself; the lowered step converts the blocked buffer)."""
    return x


@dataclass
class Layouts:
    """The plan: ``nodes`` with conversion nodes inserted, ``values`` with theirs, ``blocked`` value
    names, and ``chan``: conv node -> (its ImplicitGemmPrep, bias or None)."""

    nodes: list[Node]
    values: dict[str, Any]
    blocked: set[str]
    chan: dict[str, tuple[Any, np.ndarray | None]]
    depthwise: set[str] = field(default_factory=set)  # depthwise convs reading and writing blocked values


def _conv_prep(n: Node, cache: dict[Any, Any], min_density: float | None = None, build: bool = True
               ) -> tuple[Any, np.ndarray | None] | None:
    """The channel-vector GEMM's weights of conv node ``n``, or None if it is not a candidate (at least
    ``min_density`` of its weights nonzero: :data:`MIN_DENSITY` when None). ``cache`` keeps, per
    layer, its density and the weights once built; without ``build``, a candidate whose weights are
    not built yet gives True (a check that builds nothing)."""
    from sparsecnn.kernels.blocked import BLOCK
    from sparsecnn.layers import SparseConv2d, _ConvEngine, _TorchConv

    layer = n.fn
    if n.op != "module" or type(layer) not in (nn.Conv2d, SparseConv2d) or len(n.args) != 1 or n.kwargs:
        return None
    key = id(layer)
    if key not in cache:
        dense = None  # where the layer can run dense: a function giving (weight, bias, geometry)
        density = -1.0
        if isinstance(layer, SparseConv2d):
            eng = layer.engine
            implicit = getattr(eng, "implicit", None)
            if layer.strategy == "lowered" and implicit is not None:
                if implicit.blockable(True):  # SSL's compact weights: a candidate whatever their density
                    cache[key] = (layer, 1.0, (implicit, eng.bias if eng.has_bias else None))
                    return cache[key][2]
            elif isinstance(eng, (_ConvEngine, _TorchConv)):
                s = layer.spec
                if s.groups == 1 and s.out_channels % BLOCK == 0 and \
                        (not isinstance(eng, _TorchConv) or eng.conv.padding_mode == "zeros"):
                    w, _ = layer.dense_parameters()
                    density = np.count_nonzero(w) / max(w.size, 1)
                    dense = _sparse_dense
        elif layer.groups == 1 and layer.out_channels % BLOCK == 0 and layer.padding_mode == "zeros" and \
                isinstance(layer.padding, tuple) and layer.weight.device.type == "cpu":
            w = layer.weight.detach()
            density = int(torch.count_nonzero(w)) / max(w.numel(), 1)
            dense = _module_dense
        cache[key] = (layer, density, dense)  # the layer kept alive with its id
    layer, density, prep = cache[key]
    if density < (MIN_DENSITY if min_density is None else min_density) or prep is None:
        return None
    if callable(prep) and not build:
        return True
    if callable(prep):  # built on first use at a threshold it passes
        from sparsecnn.kernels.implicit_gemm import prepare_implicit_gemm

        w, bias, stride, padding, dilation = prep(layer)
        prep = (_dense_prep(w, stride, padding, dilation, prepare_implicit_gemm), bias)
        cache[key] = (layer, density, prep)
    return prep


def _sparse_dense(layer: Any) -> tuple:
    w, bias = layer.dense_parameters()
    s = layer.spec
    return w, bias, s.stride, s.padding, s.dilation


def _module_dense(layer: nn.Conv2d) -> tuple:
    w = layer.weight.detach().float().numpy()
    bias = None if layer.bias is None else layer.bias.detach().float().numpy().copy()
    return w, bias, layer.stride, layer.padding, layer.dilation


def below_threshold(nodes: list[Node], cache: dict[Any, Any]) -> float:
    """The mean density, weighted by size, of the convs that could run the channel-vector GEMM dense
    but are no candidates at :data:`MIN_DENSITY` (sparser); 0 when there are none. Builds nothing."""
    below = nonzero = 0.0
    for n in nodes:
        _conv_prep(n, cache, 2.0, build=False)  # fills the cache entry
        entry = cache.get(id(n.fn)) if n.op == "module" else None
        if entry is None or not 0.0 <= entry[1] < MIN_DENSITY:
            continue
        layer = entry[0]
        size = float(layer.weight.numel()) if type(layer) is nn.Conv2d else float(layer.spec.out_channels
                                                                                  * layer.spec.k)
        below += size
        nonzero += size * entry[1]
    return nonzero / below if below else 0.0


def _dense_prep(w: np.ndarray, stride: Any, padding: Any, dilation: Any, prepare: Any) -> Any:
    cout = w.shape[0]
    k = int(np.prod(w.shape[1:]))
    data = np.ascontiguousarray(w.reshape(1, cout, k), dtype=np.float32)
    return prepare(data, np.arange(cout)[None], np.arange(k)[None], tuple(w.shape), 1, tuple(stride),
                   tuple(padding), tuple(dilation))


def _depthwise_ok(n: Node) -> bool:
    """Whether conv node ``n`` is a depthwise layer the blocked depthwise kernel can run
    (:func:`sparsecnn.kernels.depthwise.bind_depthwise_blocked`): ``direct``, channels a multiple of
    ``BLOCK``, one input."""
    from sparsecnn.engine._lower import _depthwise_direct
    from sparsecnn.kernels.blocked import BLOCK

    return (DEPTHWISE and n.op == "module" and len(n.args) == 1 and not n.kwargs and _depthwise_direct(n)
            and n.fn.spec.out_channels % BLOCK == 0)


def has_candidates(nodes: list[Node], cache: dict[Any, Any], min_density: float | None = None) -> bool:
    """Whether any conv of ``nodes`` could run the channel-vector GEMM in the blocked layout (builds
    nothing)."""
    return any(_conv_prep(n, cache, min_density, build=False) is not None for n in nodes)


def unbuild_below(cache: dict[Any, Any], min_density: float | None = None) -> None:
    """Drop the built weights of the convs in ``cache`` that are no candidates at ``min_density`` (a
    layout tried and not kept built them)."""
    threshold = MIN_DENSITY if min_density is None else min_density
    for key, (layer, density, prep) in list(cache.items()):
        if 0.0 <= density < threshold and prep is not None and not callable(prep):
            cache[key] = (layer, density, _sparse_dense if hasattr(layer, "spec") else _module_dense)


class _Classes:
    """Union-find over value names."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def plan_layouts(nodes: list[Node], values: dict[str, Any], cache: dict[Any, Any],
                 min_density: float | None = None) -> Layouts:
    """Decide the blocked values of ``nodes`` for the input shape ``values`` was recorded with (see
    the module docstring); ``cache`` keeps each conv's prepared weights across input shapes;
    ``min_density`` replaces :data:`MIN_DENSITY`."""
    from sparsecnn.engine._lower import _clamp_of, _is_add, _is_alias, _is_relu, pool_kind
    from sparsecnn.kernels.blocked import blockable

    def tensor4(name: str) -> bool:
        v = values.get(name)
        return isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.dim() == 4

    chan = {n.name: p for n in nodes
            if (p := _conv_prep(n, cache, min_density)) is not None and tensor4(n.name)}
    classes = _Classes()
    elementwise: set[str] = set()
    for n in nodes:
        ins = n.refs()
        if not tensor4(n.name) or not all(tensor4(r) for r in ins):
            continue
        if (_is_relu(n) or _is_alias(n) or (DEPTHWISE and _clamp_of(n) is not None)) and len(ins) == 1:
            classes.union(n.name, ins[0])
            elementwise.add(n.name)
        elif _is_add(n) and all(tuple(values[r].shape) == tuple(values[n.name].shape) for r in ins):
            for r in ins:
                classes.union(n.name, r)
            elementwise.add(n.name)
    members: dict[str, list[str]] = {}
    for n in nodes:
        if tensor4(n.name):
            members.setdefault(classes.find(n.name), []).append(n.name)
    readers: dict[str, list[Node]] = {}
    for n in nodes:
        for r in n.refs():
            readers.setdefault(r, []).append(n)
    pools = {n.name: kind for n in nodes
             if POOLS and tensor4(n.name) and (kind := pool_kind(n, values)) in ("max", "avg")}
    first_in = {n.name: n.refs()[0] for n in nodes if n.name in pools}
    cls = {m: c for c, names in members.items() for m in names}
    dw = {n.name for n in nodes if _depthwise_ok(n) and tensor4(n.name)}
    refs = {n.name: n.refs() for n in nodes}
    # Optimistic start, every class blocked; drop those that fail until none does (a max pool's
    # output can be blocked only if its input is, and then it is a reader that keeps the input blocked).
    # A depthwise conv runs blocked only with its input and output both blocked: one that ends up
    # with one of them plain is dropped from the candidates, and the classes decided again.
    def blocked_with(dw: set[str]) -> set[str]:
        live = set(members)

        def made_ok(m: str) -> bool:
            if m in chan or m in dw or m in elementwise:
                return True
            return pools.get(m) == "max" and cls.get(first_in[m]) in live

        def keeps_blocked(r: Node) -> bool:  # a reader that reads the blocked layout and writes one
            return r.name in chan or r.name in dw or (pools.get(r.name) == "max" and cls.get(r.name) in live)

        changed = True
        while changed:
            changed = False
            for c in list(live):
                names = members[c]
                ok = all(made_ok(m) and blockable(tuple(values[m].shape)) for m in names) and \
                    any(keeps_blocked(r) for m in names for r in readers.get(m, []))
                if not ok:
                    live.discard(c)
                    changed = True
        return {m for c in live for m in members[c]}

    while True:
        blocked = blocked_with(dw)
        mixed = {d for d in dw if (d in blocked) != (refs[d][0] in blocked)}
        if not mixed:
            break
        dw -= mixed
    dw = {d for d in dw if d in blocked}
    # candidate convs that touch no blocked value keep their own strategy
    chan = {k: v for k, v in chan.items() if k in blocked or any(r in blocked for r in refs[k])}

    def reads_blocked(r: Node) -> bool:
        return r.name in chan or r.name in dw or pools.get(r.name) == "avg" or (
            r.name in blocked and (r.name in elementwise or pools.get(r.name) == "max"))

    # readers that cannot read the blocked layout get a plain copy made right after the value
    out_nodes: list[Node] = []
    values = dict(values)
    plain_of: dict[str, str] = {}
    for n in nodes:
        ins = n.refs()
        if not reads_blocked(n) and any(r in blocked for r in ins):
            n = _with_refs(n, {r: plain_of[r] for r in ins if r in blocked})
        out_nodes.append(n)
        if n.name in blocked and any(not reads_blocked(r) for r in readers.get(n.name, [])):
            name = f"{n.name}.plain"
            plain_of[n.name] = name
            values[name] = values[n.name]
            out_nodes.append(Node(name, "function", to_plain, (Ref(n.name),)))
    return Layouts(out_nodes, values, blocked, chan, dw)


def _with_refs(n: Node, rename: dict[str, str]) -> Node:
    """A copy of ``n`` reading ``rename[r]`` in place of each renamed reference ``r``."""

    def walk(a: Any) -> Any:
        if isinstance(a, Ref):
            return Ref(rename.get(a.name, a.name))
        if isinstance(a, tuple):
            return tuple(walk(b) for b in a)
        if isinstance(a, list):
            return [walk(b) for b in a]
        if isinstance(a, dict):
            return {k: walk(b) for k, b in a.items()}
        return a

    return Node(n.name, n.op, n.fn, walk(n.args), walk(n.kwargs), n.target)
