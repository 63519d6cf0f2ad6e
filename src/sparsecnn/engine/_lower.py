"""Lowering: fold BatchNorm, fuse ReLU and residual adds, plan buffers, bind compiled kernels.

The result of :func:`build_program` for one input shape is a :class:`Program`: a list of steps, each
reading its inputs from a value table and writing a buffer planned at build time (views such as
flatten, dropout or a fused ReLU cost nothing: they are the producer's buffer). :meth:`Program.bind`
gives one thread its own buffers and a list of closures that call the numba kernels with arguments
bound once; a forward pass is that list run in order. Values that only direct convs (and the global
average pool) read keep planes padded to whole vectors where H * W is not one (``Program.padded``).
Steps that compute several nodes in one pass: a conv's bias, ReLU and residual add, an LRN and the max
pool after it (``lrn+maxpool``), and in the channel-blocked layout a depthwise conv with the 1x1 convs
before and after it (MobileNet-v2's inverted residual block, ``expand+blocked-dw+...+project``).
"""

from __future__ import annotations

import copy
import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsecnn.engine._graph import Node, Ref, call
from sparsecnn.engine._layout import plan_layouts, to_plain
from sparsecnn.errors import SparseCNNError
from sparsecnn.models._memory import available_bytes

__all__ = ["Program", "build_program", "fold_batchnorm"]


# --------------------------------------------------------------------------------------------------
# node classification


def _is_relu(node: Node) -> bool:
    if node.op == "module":
        return type(node.fn) is nn.ReLU
    if node.op == "function":
        return node.fn in (torch.relu, F.relu, torch.relu_) and len(node.args) == 1
    return node.op == "method" and node.fn in ("relu", "relu_") and len(node.args) == 1


def _clamp_of(node: Node) -> tuple[float, float] | None:
    """``(lo, hi)`` of a clamp of one tensor to constant bounds: ``nn.ReLU6`` / ``nn.Hardtanh``,
    ``F.relu6`` / ``F.hardtanh``, ``torch.clamp`` / ``clip`` and the methods; else None."""
    args, kw = node.args, dict(node.kwargs)
    if not args or not isinstance(args[0], Ref) or any(isinstance(a, Ref) for a in (*args[1:], *kw.values())):
        return None
    kw.pop("inplace", None)
    if node.op == "module" and isinstance(node.fn, nn.Hardtanh) and len(args) == 1 and not kw:
        return float(node.fn.min_val), float(node.fn.max_val)
    if node.op == "function" and node.fn is F.relu6 and len(args) == 1 and not kw:
        return 0.0, 6.0
    if node.op == "function" and node.fn is F.hardtanh:
        bounds = dict(zip(("min_val", "max_val"), args[1:], strict=False)) | kw
        if set(bounds) <= {"min_val", "max_val"}:
            return float(bounds.get("min_val", -1.0)), float(bounds.get("max_val", 1.0))
        return None
    if (node.op == "function" and node.fn in (torch.clamp, torch.clip)) or (
            node.op == "method" and node.fn in ("clamp", "clip", "clamp_", "clip_")):
        bounds = dict(zip(("min", "max"), args[1:], strict=False)) | kw
        if not set(bounds) <= {"min", "max"} or all(bounds.get(k) is None for k in ("min", "max")):
            return None
        if any(not isinstance(v, (int, float)) for v in bounds.values() if v is not None):
            return None
        lo, hi = bounds.get("min"), bounds.get("max")
        return (-math.inf if lo is None else float(lo)), (math.inf if hi is None else float(hi))
    return None


def _depthwise_direct(node: Node) -> bool:
    """A depthwise conv that runs ``direct`` (:mod:`sparsecnn.kernels.depthwise`, which fuses a clamp)."""
    from sparsecnn.kernels import conv
    from sparsecnn.kernels.depthwise import is_depthwise
    from sparsecnn.layers import SparseConv2d

    layer = node.fn if node.op == "module" else None
    return (isinstance(layer, SparseConv2d) and layer.strategy == "direct" and conv.DEPTHWISE
            and is_depthwise(layer.engine.format))


def _is_add(node: Node) -> bool:
    from sparsecnn.io._graph import Binary, Eltwise

    if node.op == "function" and node.fn in (operator.add, torch.add, operator.iadd) and not node.kwargs:
        return len(node.args) == 2 and all(isinstance(a, Ref) for a in node.args)
    if node.op == "method" and node.fn in ("add", "add_") and not node.kwargs:
        return len(node.args) == 2 and all(isinstance(a, Ref) for a in node.args)
    if node.op == "module" and isinstance(node.fn, Eltwise):
        return node.fn.op == "sum" and all(c == 1.0 for c in node.fn.coeff) and len(node.args) == 2
    if node.op == "module" and isinstance(node.fn, Binary):
        return node.fn.op == "add" and node.fn.const is None and len(node.args) == 2
    return False


def _is_alias(node: Node) -> bool:
    """Calls whose result is their first input (eval-mode dropout, identity)."""
    if node.op == "module":
        return isinstance(node.fn, (nn.Dropout, nn.Identity)) and len(node.args) == 1
    if node.op == "function":
        return node.fn in (F.dropout,) and not node.kwargs.get("training", False)
    return node.op == "method" and node.fn == "contiguous"


def _is_reshape(node: Node) -> bool:
    """Calls that only change the shape of a contiguous tensor (its buffer, viewed)."""
    from sparsecnn.engine._graph import _flatten_from
    from sparsecnn.io._graph import Reshape, Squeeze, Unsqueeze

    if node.op == "module":
        return isinstance(node.fn, (nn.Flatten, Reshape, Squeeze, Unsqueeze, nn.Unflatten))
    if node.op == "function":
        return node.fn in (torch.flatten, torch.reshape, _flatten_from, torch.squeeze, torch.unsqueeze)
    return node.op == "method" and node.fn in ("view", "reshape", "flatten", "squeeze", "unsqueeze")


def _conv_of(node: Node) -> nn.Module | None:
    from sparsecnn.layers import SparseConv2d

    # exact types: a subclass may override forward, and then runs as the user wrote it (in torch)
    if node.op == "module" and type(node.fn) in (nn.Conv2d, SparseConv2d) and len(node.args) == 1 \
            and not node.kwargs:
        return node.fn
    return None


def _linear_of(node: Node) -> nn.Module | None:
    from sparsecnn.layers import SparseLinear

    if node.op == "module" and type(node.fn) in (nn.Linear, SparseLinear) and len(node.args) == 1 \
            and not node.kwargs:
        return node.fn
    return None


def _f32_of_shape(v: Any, shape: tuple[int, ...] | None) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype == torch.float32 and tuple(v.shape) == shape


def _users(nodes: list[Node]) -> dict[str, list[int]]:
    users: dict[str, list[int]] = {n.name: [] for n in nodes}
    for i, n in enumerate(nodes):
        for r in n.refs():
            users[r].append(i)
    return users


# --------------------------------------------------------------------------------------------------
# BatchNorm folding (before planning: the folded conv is what gets sparsified)


def fold_batchnorm(nodes: list[Node]) -> list[Node]:
    """Fold every eval-mode BatchNorm2d (or the ONNX importer's BatchNorm) that follows a Conv2d (its
    only user) into that conv.

    .. math:: W' = W \\gamma / \\sqrt{\\sigma^2 + \\epsilon}, \\quad
              b' = (b - \\mu) \\gamma / \\sqrt{\\sigma^2 + \\epsilon} + \\beta

    The conv is replaced by a folded copy (the model is not modified) and the BatchNorm's users read
    the conv's output. Zeros stay zeros, so the sparsity pattern is unchanged.
    """
    from sparsecnn.io._graph import BatchNorm

    by_name = {n.name: n for n in nodes}
    users = _users(nodes)
    out: list[Node] = []
    renamed: dict[str, str] = {}  # a folded BatchNorm's value -> its conv's
    for node in nodes:
        if renamed:
            node.args, node.kwargs = _renamed(node.args, renamed), _renamed(node.kwargs, renamed)
        bn = node.fn if node.op == "module" else None
        if isinstance(bn, (nn.BatchNorm2d, BatchNorm)) and bn.track_running_stats \
                and bn.running_mean is not None \
                and len(node.args) == 1 and isinstance(node.args[0], Ref):
            src = by_name[node.args[0].name]
            conv = src.fn if src.op == "module" else None
            if type(conv) is nn.Conv2d and len(users[src.name]) == 1 and conv.padding_mode == "zeros":
                src.fn = _folded(conv, bn)
                renamed[node.name] = src.name
                continue
        out.append(node)
    return out


def _renamed(a: Any, names: dict[str, str]) -> Any:
    if isinstance(a, Ref):
        return Ref(names.get(a.name, a.name))
    if isinstance(a, (tuple, list)):
        return type(a)(_renamed(b, names) for b in a)
    if isinstance(a, dict):
        return {k: _renamed(v, names) for k, v in a.items()}
    return a


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    with torch.no_grad():
        scale = bn.weight.detach().double() if bn.affine else torch.ones(bn.num_features, dtype=torch.float64)
        shift = bn.bias.detach().double() if bn.affine else torch.zeros(bn.num_features, dtype=torch.float64)
        inv = scale / torch.sqrt(bn.running_var.double() + bn.eps)
        new = copy.deepcopy(conv)
        w = conv.weight.detach().double() * inv.view(-1, 1, 1, 1)
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels,
                                                                                   dtype=torch.float64)
        new.weight = nn.Parameter(w.to(conv.weight.dtype))
        new.bias = nn.Parameter(((b - bn.running_mean.double()) * inv + shift).to(conv.weight.dtype))
    return new.eval()


# --------------------------------------------------------------------------------------------------
# steps


@dataclass(frozen=True)
class _Buf:
    """A buffer of the plan: ``size`` float32 elements."""

    index: int
    size: int


@dataclass
class _Val:
    """Where a node's value lives: a planned buffer viewed as ``shape`` (``buf``), a static value
    (``static``: shapes, constants), or a slot written at run time (``dynamic``)."""

    shape: tuple[int, ...] | None = None
    buf: _Buf | None = None
    static: Any = None
    is_static: bool = False


class Program:
    """The lowered model for one input shape: buffer sizes and step factories (shared by threads).

    Attributes
    ----------
    kinds : list of str
        What each step runs (``conv:direct+relu``, ``maxpool``, ``torch:Softmax``, ...), for reports.
    """

    def __init__(self) -> None:
        self.buffers: list[int] = []  # float32 elements of each planned buffer
        self.shared: set[int] = set()  # buffers read whole by every thread: never reused (see _Builder)
        self.factories: list[Callable[[list[Any], list[np.ndarray]], Callable[[list[Any]], None]]] = []
        self.kinds: list[str] = []
        self.slots = 0
        self.input_slot = 0
        self.output: Callable[[list[Any]], np.ndarray] | None = None
        self.static: dict[int, Callable[[list[np.ndarray]], Any]] = {}
        self.padded: dict[str, int] = {}  # values whose planes are padded to whole vectors: floats a channel

    def bind(self) -> tuple[list[Any], list[Callable[[list[Any]], None]]]:
        """This thread's value table (its own buffers, allocated here) and the bound steps."""
        from sparsecnn.kernels._numba import aligned_zeros
        from sparsecnn.kernels.conv import SLACK

        # SLACK floats after every buffer: a kernel may read a few lanes past the end of its input
        # (kernels.conv.bind_direct_conv2d's in-place reads). Zeroed: the lanes a kernel reads and
        # discards (padded planes, the slack) must not hold denormal bit patterns from the memory's
        # last use (a small integer read as a float is one), which cost a microcode assist per FMA:
        # ResNet-50's 7x7 layers ran up to 11x slower on an np.empty arena.
        bufs = [aligned_zeros(n + SLACK) for n in self.buffers]
        env: list[Any] = [None] * self.slots
        for slot, make in self.static.items():
            env[slot] = make(bufs)
        return env, [f(env, bufs) for f in self.factories]


class _Builder:
    """Walks the nodes once for one input shape, planning buffers by liveness.

    A dead value's buffer is reused by a later value, except a buffer that every thread reads whole
    (``Program.shared``): the input of a direct conv read in place (stride 1, no padding) while the
    threads split its filters. Rewriting it later makes a core wait for the other core's copies of
    the lines to be invalidated: on this project's VM (two vCPUs that the host places near or far
    apart, changing within minutes), rewriting 800 KB took 10 us where only the writer held the
    lines, 84 us where both cores had just read them, 350-390 us in the far spells. ResNet-50 at 90%
    (batch 1, 2 threads, its 1x1 layers read in place), the two plans interleaved in one process: far
    spells 16.5-17.0 against 20.1-21.6 ms, near spells 13.2-14.7 against 12.7-14.9 ms. Every value in a
    buffer of its own was faster still in the far spells (15.7 ms) and slower in the near ones
    (14.0-14.3; ResNet-18 5.4-5.6 against 5.2, AlexNet at 90% 2.9 against 2.85 ms): docs/engine.md,
    "Session of 2026-12-05 (fourth)".
    """

    def __init__(self, nodes: list[Node], values: dict[str, Any], reuse: bool = True,
                 layouts: Any = None) -> None:
        self.nodes = nodes if layouts is None else layouts.nodes
        self.values = values if layouts is None else layouts.values
        self.reuse = reuse  # False: every value gets a buffer of its own
        # channel-blocked values and the convs running the channel-vector GEMM (engine._layout)
        self.blocked: set[str] = set() if layouts is None else layouts.blocked
        self.chan: dict[str, tuple[Any, Any]] = {} if layouts is None else layouts.chan
        # depthwise convs on blocked input and output (kernels.depthwise.bind_depthwise_blocked)
        self.dw_blocked: set[str] = set() if layouts is None else layouts.depthwise
        self.prog = Program()
        self.slot: dict[str, int] = {}
        self.val: dict[str, _Val] = {}
        self.base: dict[str, str] = {}  # value -> the value whose buffer it views
        self.last_use: dict[str, int] = {}
        self.free: list[_Buf] = []
        self.fused: set[str] = set()  # ReLU nodes folded into their producer
        self.relu_after: set[str] = set()  # producers that apply the ReLU themselves
        self.clamp_after: dict[str, tuple[float, float]] = {}  # depthwise convs that apply a clamp
        self.clamp_before: dict[str, tuple[float, float]] = {}  # ... or clamp their input as they copy it
        # conv -> (the other input, the add): residual adds a direct conv may take into its epilogue
        self.residual_of: dict[str, tuple[str, str]] = {}
        self.add_into: dict[str, str] = {}  # add -> the conv that computed it (the add is its view)
        self.padded: dict[str, int] = {}  # value -> floats per channel, its planes padded to whole vectors
        self.lrn_into_pool: dict[str, Node] = {}  # max pool -> the LRN it computes too (lrn+maxpool)
        # blocked depthwise conv -> (the 1x1 conv before it that it computes too or None, the value it
        # reads, that conv's ReLU), the 1x1 conv after it that it computes too, and the values such
        # steps never write (the 1x1 convs' outputs inside the block, the ReLUs or clamps on them)
        self.expand_into: dict[str, tuple[str, str, bool]] = {}
        self.project_of: dict[str, str] = {}  # ... and the projecting 1x1 conv it computes after it
        self.unwritten: set[str] = set()

    # ---- buffers
    def _alloc(self, size: int) -> _Buf:
        fits = [b for b in self.free if b.size >= size] if self.reuse else []
        if fits:
            best = min(fits, key=lambda b: b.size)
            self.free.remove(best)
            return best
        self.prog.buffers.append(size)
        return _Buf(len(self.prog.buffers) - 1, size)

    def _release_dead(self, i: int) -> None:
        for name, v in self.val.items():
            if v.buf is not None and self.base.get(name, name) == name and self.last_use.get(name, -1) == i \
                    and v.buf.index not in self.prog.shared:
                self.free.append(v.buf)

    def _read_by_every_thread(self, name: str) -> None:
        """Value ``name`` (its planned buffer, if any) is read whole by every thread: never reused
        (unless :data:`KEEP_SHARED` is off)."""
        v = self.val.get(self.base.get(name, name))
        if KEEP_SHARED and v is not None and v.buf is not None:
            self.prog.shared.add(v.buf.index)

    def _slot(self, name: str) -> int:
        if name not in self.slot:
            self.slot[name] = self.prog.slots
            self.prog.slots += 1
        return self.slot[name]

    def _planned(self, name: str, shape: tuple[int, ...]) -> tuple[int, _Buf]:
        """A new planned float32 buffer for value ``name`` of ``shape``; its slot holds the view
        (of the padded shape where its planes are padded)."""
        shape = self._padded_shape(name, shape)
        size = int(np.prod(shape, dtype=np.int64))
        buf = self._alloc(size)
        self.val[name] = _Val(shape, buf)
        s = self._slot(name)
        self.prog.static[s] = lambda bufs, b=buf.index, n=size, sh=shape: bufs[b][:n].reshape(sh)
        return s, buf

    def _view(self, name: str, src: str, shape: tuple[int, ...]) -> None:
        """Value ``name`` is ``src``'s data seen as ``shape`` (free when src is planned)."""
        root = self.base.get(src, src)
        self.base[name] = root
        v = self.val.get(src)
        s, ss = self._slot(name), self.slot[src]
        if name in self.padded:  # the padded producer's value, seen the same way
            shape = self._padded_shape(name, shape)
        if v is not None and v.buf is not None:
            self.val[name] = _Val(shape, v.buf)
            n = int(np.prod(shape, dtype=np.int64))
            self.prog.static[s] = lambda bufs, b=v.buf.index, n=n, sh=shape: bufs[b][:n].reshape(sh)
        else:
            self._step("view", lambda env, bufs, s=s, ss=ss, sh=shape: _bind_view(env, s, ss, sh))

    def _step(self, kind: str, factory: Callable) -> None:
        self.prog.kinds.append(kind)
        self.prog.factories.append(factory)

    # ---- liveness
    def _liveness(self) -> None:
        for i, n in enumerate(self.nodes):
            for r in n.refs():
                self.last_use[r] = i

    def _extend_base_liveness(self) -> None:
        for name, root in self.base.items():
            if self.last_use.get(name, -1) > self.last_use.get(root, -1):
                self.last_use[root] = self.last_use[name]

    # ---- build
    def build(self) -> Program:
        self._liveness()
        users = _users(self.nodes)
        by_name = {n.name: n for n in self.nodes}
        dynamic: set[str] = set()
        for n in self.nodes:
            if n.op == "input" or (any(r in dynamic for r in n.refs())
                                   and not _shape_like(self.values[n.name])):
                dynamic.add(n.name)
        # which ReLUs fuse into their producer (conv, linear, add) as its epilogue; which clamps (ReLU6)
        # into a depthwise conv run by kernels.depthwise
        for n in self.nodes:
            if _is_relu(n) and isinstance(n.args[0], Ref):
                src = by_name[n.args[0].name]
                if len(users[src.name]) == 1 and (_conv_of(src) is not None or _linear_of(src) is not None
                                                  or _is_add(src)):
                    self.fused.add(n.name)
                    self.relu_after.add(src.name)
            elif (bounds := _clamp_of(n)) is not None and bounds[0] <= bounds[1] and FUSE_CLAMP:
                src = by_name[n.args[0].name]
                dst = [self.nodes[u] for u in users[n.name]]
                if len(users[src.name]) == 1 and _depthwise_direct(src):
                    self.fused.add(n.name)
                    self.clamp_after[src.name] = bounds
                elif (len(dst) == 1 and _depthwise_direct(dst[0]) and dst[0].refs() == [n.name]
                      and bounds[0] <= 0.0 <= bounds[1] and FUSE_CLAMP_INPUT):
                    # into the depthwise conv after it, on its per-channel copies (its input is read
                    # there only: the clamp's value is a view of its input, never written)
                    self.fused.add(n.name)
                    self.clamp_before[dst[0].name] = bounds
        self._residual_candidates(by_name, users)
        self._padded_planes(users)
        self._lrn_pools(by_name, users)
        self._expand_pairs(by_name, users)
        self.prog.padded = dict(self.padded)
        # a forward pass of ReLU aliases is planned in two passes: first fix bases for liveness
        for i, n in enumerate(self.nodes):
            self._lower(i, n, dynamic)
            self._extend_base_liveness()
            self._release_dead(i)
        return self.prog

    def _lrn_pools(self, by_name: dict[str, Node], users: dict[str, list[int]]) -> None:
        """Max pools that compute the LRN before them in the same pass (``lrn+maxpool``: the normalised
        tensor is never written): where the LRN's only reader is a pool that
        :func:`sparsecnn.kernels.lrn.fuses_with_lrn` takes, on float32 planes in the plain layout. The
        LRN's input then lives until the pool."""
        from sparsecnn.kernels.lrn import fuses_with_lrn

        if not FUSE_LRN_POOL:
            return
        index = {n.name: i for i, n in enumerate(self.nodes)}
        for n in self.nodes:
            if pool_kind(n, self.values) != "max" or not isinstance(n.args[0], Ref):
                continue
            lrn = by_name[n.args[0].name]
            if pool_kind(lrn, self.values) != "lrn" or len(users[lrn.name]) != 1:
                continue
            src = lrn.refs()[0]
            if {src, lrn.name, n.name} & (self.blocked | set(self.padded)) or any(
                    self.values[v].dtype != torch.float32 for v in (src, lrn.name, n.name)):
                continue
            m = n.fn
            p = tuple(_pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation))
            _, _, h, w = self.values[src].shape
            # ceil_mode pools too, where the output is the floor formula's (AlexNet's 55 -> 27, 27 -> 13)
            floor = tuple(self.values[n.name].shape[2:]) == ((h - 3) // 2 + 1, (w - 3) // 2 + 1)
            if fuses_with_lrn(*p, tuple(self.values[src].shape)) and floor:
                self.lrn_into_pool[n.name] = lrn
                self.last_use[src] = max(self.last_use.get(src, -1), index[n.name])

    def _expand_pairs(self, by_name: dict[str, Node], users: dict[str, list[int]]) -> None:
        """Blocked depthwise convs that compute the expanding 1x1 conv before them and the projecting
        one after them in the same pass (:mod:`sparsecnn.kernels.expand_depthwise`), either or both,
        where each thread gets ``FUSE_EXPAND_ROWS`` output rows (or whole images) and the depthwise
        conv takes no residual. The 1x1 conv before it: running the channel-vector GEMM blocked in and
        out, its output (or the ReLU or clamp on it, fused) read by the depthwise conv alone, no
        residual; its input then lives until the depthwise conv. The one after it: the same, reading
        the depthwise conv's output (past its fused ReLU or clamp) alone; its residual add, if any,
        computed before the depthwise conv."""
        from sparsecnn.kernels._numba import num_threads
        from sparsecnn.kernels.conv import split_by_image
        from sparsecnn.kernels.expand_depthwise import fusable_expand, fusable_project

        if not FUSE_EXPAND:
            return
        index = {n.name: i for i, n in enumerate(self.nodes)}
        nparts = num_threads()
        for d in self.nodes:
            if d.name not in self.dw_blocked or d.name in self.residual_of or len(d.refs()) != 1:
                continue
            batch, cexp, hout, _ = self.values[d.name].shape
            if not (split_by_image(int(batch), nparts) or hout >= FUSE_EXPAND_ROWS * nparts):
                continue
            between = d.refs()[0]
            e = by_name[between].args[0].name if between in self.fused else between  # past a ReLU / clamp
            en = by_name[e]
            claimed = set(self.project_of.values())  # a 1x1 conv another depthwise conv computes already
            expand = (e in self.chan and e in self.blocked and e not in self.residual_of and e not in claimed
                      and len(en.refs()) == 1 and en.refs()[0] in self.blocked and len(users[e]) == 1
                      and len(users[between]) == 1 and fusable_expand(self.chan[e][0], d.fn.engine.format))
            after = d.name  # the depthwise conv's value, past its fused ReLU or clamp
            if len(users[after]) == 1 and self.nodes[users[after][0]].name in self.fused:
                after = self.nodes[users[after][0]].name
            pn = self.nodes[users[after][0]] if FUSE_PROJECT and len(users[after]) == 1 else None
            other, _ = self.residual_of.get(pn.name, (None, None)) if pn is not None else (None, None)
            early = other is None or index[other] < index[d.name]  # the residual, computed before
            if pn is not None and not (pn.name in self.chan and pn.name in self.blocked and early
                                       and pn.refs() == [after]
                                       and fusable_project(self.chan[pn.name][0], int(cexp))):
                pn = None
            if not expand and pn is None:
                continue
            if expand:
                src = en.refs()[0]
                self.expand_into[d.name] = (e, src, e in self.relu_after)
                self.unwritten |= {e, between}
                self.last_use[src] = max(self.last_use.get(src, -1), index[d.name])
            else:
                self.expand_into[d.name] = (None, between, False)
            if pn is not None:
                self.project_of[d.name] = pn.name
                self.unwritten |= {after, pn.name} - {d.name}

    def _residual_candidates(self, by_name: dict[str, Node], users: dict[str, list[int]]) -> None:
        """Residual adds ``conv(x) + r`` (ResNet's) whose conv runs the direct kernel or the implicit
        GEMM, is read by the add alone and runs after ``r`` is computed: the conv can add ``r`` (and
        the add's ReLU) as it writes its output (:func:`sparsecnn.kernels.conv.bind_direct_conv2d`,
        :func:`sparsecnn.kernels.implicit_gemm.bind_implicit_gemm_conv2d`), one pass instead of
        two. Where both inputs are such convs (a downsampling block), the later one takes the add."""
        from sparsecnn.layers import SparseConv2d

        if not FUSE_RESIDUAL:
            return
        index = {n.name: i for i, n in enumerate(self.nodes)}
        for n in self.nodes:
            if not _is_add(n):
                continue
            a, b = (r.name for r in n.args)
            value = self.values[n.name]
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
            for conv, other in sorted(((a, b), (b, a)), key=lambda p: -index[p[0]]):
                node = by_name[conv]
                layer = node.fn
                fusable = conv in self.chan or (isinstance(layer, SparseConv2d) and _epilogue_adds(layer))
                if (a != b and fusable
                        and node.op == "module" and len(users[conv]) == 1 and index[other] < index[conv]
                        and all(_f32_of_shape(self.values[v], shape) for v in (conv, other))):
                    self.residual_of[conv] = (other, n.name)
                    break

    def _padded_planes(self, users: dict[str, list[int]]) -> None:
        """The values whose planes are padded to whole vectors (:func:`sparsecnn.kernels.conv.
        padded_plane`): outputs of direct convs on planes that are not whole vectors (ResNet's 14x14
        and 7x7) whose every reader takes that layout: direct convs (a 1x1 layer then reads every
        channel from the start of a line; the others' phase copies read the padded planes), the
        residual add fused into a direct conv whose own output is padded too (its epilogue reads the
        residual where it writes), and global average pooling. A value read by anything else (torch,
        the model's output, another kernel), or tied by a residual to one that is, keeps plain planes.
        Measured, single 1x1 layers read in place at 80-90% (2 threads): 1024 -> 256 at 14x14 1.65x,
        2048 -> 512 at 7x7 1.40-1.48x, the expanding ones 1.09-1.33x (against their aligned copy)."""
        from sparsecnn.kernels.conv import padded_plane
        from sparsecnn.layers import SparseConv2d

        if not PAD_PLANES:
            return
        index = {n.name: i for i, n in enumerate(self.nodes)}

        def direct(n: Node) -> bool:
            return (n.op == "module" and isinstance(n.fn, SparseConv2d) and n.fn.strategy == "direct"
                    and n.name not in self.chan and n.name not in self.blocked and len(n.refs()) == 1
                    and _f32_of_shape(self.values[n.refs()[0]], tuple(self.values[n.refs()[0]].shape)))

        aliases: dict[str, list[str]] = {}
        for n in self.nodes:
            v = self.values[n.name]
            if direct(n) and isinstance(v, torch.Tensor) and v.dim() == 4 and v.dtype == torch.float32 \
                    and padded_plane(int(v.shape[2]), int(v.shape[3])) != v.shape[2] * v.shape[3]:
                names = [n.name]
                other, add = self.residual_of.get(n.name, (None, None))
                if add is not None:
                    names.append(add)
                names += [r for r in self.fused if self.nodes[index[r]].args[0].name in names]
                aliases[n.name] = names
        owner = {a: c for c, names in aliases.items() for a in names}
        ties: list[tuple[str, str]] = []
        kept = set(aliases)
        for c, names in aliases.items():
            for a in names:
                for u in users[a]:
                    un = self.nodes[u]
                    if un.name in names:
                        continue
                    if direct(un):
                        continue  # reads it as its input (in_stride)
                    conv = next((d for d, (o, add) in self.residual_of.items() if o == a and add == un.name),
                                None)
                    if conv is not None and conv in aliases:
                        ties.append((c, conv))  # the residual of conv's epilogue
                        continue
                    if un.op == "module" and pool_kind(un, self.values) == "avg" and a not in self.blocked:
                        continue
                    kept.discard(c)
            other, _ = self.residual_of.get(c, (None, None))
            if other is not None:
                if other in owner:
                    ties.append((owner[other], c))
                else:
                    kept.discard(c)  # the residual is not a padded conv's output
        changed = True
        while changed:
            changed = False
            for a, b in ties:
                if (a in kept) != (b in kept):
                    kept.discard(a)
                    kept.discard(b)
                    changed = True
        for c in kept:
            v = self.values[c]
            plane = padded_plane(int(v.shape[2]), int(v.shape[3]))
            for a in aliases[c]:
                self.padded[a] = plane

    def _padded_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """How value ``name`` of ``shape`` is stored: (B, C, padded plane) where its planes are
        padded, else ``shape``."""
        plane = self.padded.get(name)
        return shape if plane is None else (shape[0], shape[1], plane)

    def _lower(self, i: int, n: Node, dynamic: set[str]) -> None:
        value = self.values[n.name]
        if n.op == "input":
            self.prog.input_slot = self._slot(n.name)
            return
        if n.op == "output":
            s = self.slot[n.args[0].name]
            self.prog.output = lambda env, s=s: env[s]
            return
        if n.name not in dynamic:
            # shapes, sizes and constants: fixed for this input shape
            s = self._slot(n.name)
            self.prog.static[s] = lambda bufs, v=value: v.numpy() if isinstance(v, torch.Tensor) else v
            return
        ins = n.refs()
        if not isinstance(value, torch.Tensor):
            self._torch(n)
            return
        shape = tuple(value.shape)
        f32 = value.dtype == torch.float32 and all(
            isinstance(self.values[r], torch.Tensor) and self.values[r].dtype == torch.float32 for r in ins)
        if n.name in self.unwritten:  # computed inside the depthwise conv after it (expand+blocked-dw)
            self.prog.static.setdefault(self._slot(n.name), lambda bufs: None)
            return
        if n.name in self.fused:
            self._view(n.name, ins[0], shape)
            return
        if any(lrn is n for lrn in self.lrn_into_pool.values()):
            return  # the max pool after it computes it (lrn+maxpool)
        if n.name in self.add_into:  # computed by the conv's epilogue
            self._view(n.name, self.add_into[n.name], shape)
            return
        if f32 and (_is_alias(n) or (_is_reshape(n) and self.values[ins[0]].is_contiguous())):
            self._view(n.name, ins[0], shape)
            return
        relu = n.name in self.relu_after
        lrn = self.lrn_into_pool.get(n.name)
        x = self.slot[lrn.refs()[0] if lrn is not None else ins[0]] if ins else -1
        if n.op == "function" and n.fn is to_plain:
            from sparsecnn.kernels.blocked import BLOCK, from_blocked

            s, _ = self._planned(n.name, shape)
            b, c, h, w = shape

            def convert(env, bufs, x=x, s=s):
                out = env[s].reshape(b, c, h * w)
                return _bind_kernel(env, x, lambda v: from_blocked(v.reshape(b, c // BLOCK, h * w, BLOCK),
                                                                   out))

            self._step("to-plain", convert)
        elif n.name in self.chan and len(shape) == 4:
            self._chan_conv(n, x, shape, relu)
        elif f32 and _conv_of(n) is not None and len(shape) == 4:
            self._conv(n, x, shape, relu)
        elif f32 and _linear_of(n) is not None and len(shape) == 2:
            self._linear(n, x, shape, relu)
        elif f32 and _is_relu(n):
            self._relu(n, x, ins[0], i, shape)
        elif f32 and (bounds := _clamp_of(n)) is not None and bounds[0] <= bounds[1]:
            self._relu(n, x, ins[0], i, shape, bounds)
        elif f32 and _is_add(n) and all(tuple(self.values[r].shape) == shape for r in ins):
            s, _ = self._planned(n.name, shape)
            from sparsecnn.kernels.elementwise import add_relu

            self._step("add+relu" if relu else "add", lambda env, bufs, a=x, b=self.slot[ins[1]], s=s, r=relu:
                       _bind_add(add_relu, env, a, b, s, r))
        elif f32 and self._pool(n, x, shape):
            pass
        elif f32 and self._pad(n, x, shape):
            pass
        else:
            self._torch(n)

    # ---- kernels
    def _conv(self, n: Node, x: int, shape: tuple[int, ...], relu: bool) -> None:
        from sparsecnn.layers import SparseConv2d

        layer = n.fn
        if not isinstance(layer, SparseConv2d) or layer.strategy == "torch":
            conv = layer.engine.conv if isinstance(layer, SparseConv2d) else layer
            if conv.padding_mode != "zeros":
                self._torch(n)
                return
            s = self._slot(n.name)
            self.prog.static.setdefault(s, lambda bufs: None)
            w = conv.weight.detach()
            b = None if conv.bias is None else conv.bias.detach()
            args = (conv.stride, conv.padding, conv.dilation, conv.groups)
            self._step("conv:torch" + ("+relu" if relu else ""),
                       lambda env, bufs, x=x, s=s: _bind_torch_conv(env, x, s, w, b, args, relu))
            return
        if _epilogue_adds(layer):
            from sparsecnn.kernels.conv import SLACK, bind_direct_conv2d
            from sparsecnn.kernels.implicit_gemm import bind_implicit_gemm_conv2d

            v = self.val.get(n.refs()[0])  # a planned buffer (not the caller's input) has the slack
            slack = SLACK if v is not None and v.buf is not None else 0
            direct = layer.strategy == "direct"
            prep = layer.engine.format if direct else layer.engine.implicit
            binder = bind_direct_conv2d if direct else bind_implicit_gemm_conv2d
            self._shared_if_in_place(n, prep)
            relu, res = self._fused_residual(n, relu)
            if n.name in self.expand_into:
                self._expand_conv(n, shape, relu, prep)
                return
            if n.name in self.dw_blocked:  # reads its input in place: no slack
                from sparsecnn.kernels.depthwise import bind_depthwise_blocked

                binder = bind_depthwise_blocked
            else:
                binder = functools.partial(binder, slack=slack)
            if n.name in self.clamp_after:  # a fused ReLU6 (kernels.depthwise)
                binder = functools.partial(binder, clamp=self.clamp_after[n.name])
            if n.name in self.clamp_before:
                binder = functools.partial(binder, in_clamp=self.clamp_before[n.name])
            self._bound_conv(n, x, shape, relu, res, binder, prep, clamp=n.name in self.clamp_after,
                             pre="clamp>" if n.name in self.clamp_before else "",
                             kind="blocked-dw" if n.name in self.dw_blocked else None)
            return
        if layer.strategy == "spconv-act":
            from sparsecnn.kernels.spconv_input import bind_spconv_input

            sp = layer.engine.spec
            geometry = (*sp.kernel_size, *sp.stride, *sp.padding, *sp.dilation)
            self._bound_conv(n, x, shape, relu, None, functools.partial(bind_spconv_input, geometry=geometry),
                             layer.engine.format)
            return
        s = self._slot(n.name)
        self.prog.static.setdefault(s, lambda bufs: None)
        self._step(f"conv:{layer.strategy}" + ("+relu" if relu else ""),
                   lambda env, bufs, x=x, s=s: _bind_engine(env, x, s, layer.engine, relu))

    def _expand_conv(self, n: Node, shape: tuple[int, ...], relu: bool, prep: Any) -> None:
        """Blocked depthwise conv ``n`` computing the 1x1 conv before it (``expand+blocked-dw`` steps,
        :func:`sparsecnn.kernels.expand_depthwise.bind_expand_depthwise_blocked`), reading that conv's
        input, or the one after it (``...+project`` steps, writing that conv's output), or both."""
        from sparsecnn.kernels.expand_depthwise import bind_expand_depthwise_blocked

        e, src, expand_relu = self.expand_into[n.name]
        eprep, ebias = self.chan[e] if e is not None else (None, None)
        eng = n.fn.engine
        binder = functools.partial(bind_expand_depthwise_blocked, eprep, ebias,
                                   clamp=self.clamp_after.get(n.name), in_clamp=self.clamp_before.get(n.name),
                                   expand_relu=expand_relu)
        bias, xs = eng.bias if eng.has_bias else None, tuple(self.values[src].shape)
        label = ("clamp>" if n.name in self.clamp_before else "") + "conv:"
        label += "expand+blocked-dw" if e is not None else "blocked-dw"
        label += "+relu" if relu else "+clamp" if n.name in self.clamp_after else ""
        res = None
        if n.name in self.project_of:  # the projecting conv's output instead of the depthwise conv's
            pn = next(m for m in self.nodes if m.name == self.project_of[n.name])
            prelu, res = self._fused_residual(pn, pn.name in self.relu_after)
            binder = functools.partial(binder, project=self.chan[pn.name], project_relu=prelu)
            self.prog.static.setdefault(self._slot(n.name), lambda bufs: None)
            s, _ = self._planned(pn.name, tuple(self.values[pn.name].shape))
            label += "+project" + ("+add" if res is not None else "") + ("+relu" if prelu else "")
        else:
            s, _ = self._planned(n.name, shape)
        if res is not None:
            self._step(label, lambda env, bufs, x=self.slot[src], s=s, r=res: _bind_kernel_res(
                env, x, r, binder(prep, xs, bias, env[s], relu)))
            return
        self._step(label, lambda env, bufs, x=self.slot[src], s=s: _bind_kernel(
            env, x, binder(prep, xs, bias, env[s], relu)))

    def _chan_conv(self, n: Node, x: int, shape: tuple[int, ...], relu: bool) -> None:
        """A conv running the channel-vector implicit GEMM, reading and writing the layouts that
        engine._layout chose (``conv:blocked`` steps), with a fused residual add as the others."""
        from sparsecnn.kernels.conv import SLACK
        from sparsecnn.kernels.implicit_gemm import bind_implicit_gemm_conv2d

        src = n.refs()[0]
        v = self.val.get(src)
        slack = SLACK if v is not None and v.buf is not None else 0
        prep, bias = self.chan[n.name]
        self._shared_if_in_place(n, prep)
        binder = functools.partial(bind_implicit_gemm_conv2d, slack=slack, in_blocked=src in self.blocked,
                                   out_blocked=n.name in self.blocked)
        relu, res = self._fused_residual(n, relu)
        self._bound_conv(n, x, shape, relu, res, binder, prep, bias=(bias,), kind="blocked")

    def _shared_if_in_place(self, n: Node, prep: Any) -> None:
        """A stride-1 unpadded conv reads its input in place; where the threads split its filters,
        each reads all of it (see :class:`_Builder` on reusing such buffers)."""
        from sparsecnn.kernels._numba import num_threads
        from sparsecnn.kernels.conv import split_by_image

        nparts = num_threads()
        if prep.stride == (1, 1) and prep.padding == (0, 0) and nparts > 1 \
                and not split_by_image(int(self.values[n.refs()[0]].shape[0]), nparts):
            self._read_by_every_thread(n.refs()[0])

    def _fused_residual(self, n: Node, relu: bool) -> tuple[bool, int | None]:
        """The ReLU and the residual slot of conv ``n`` when a residual add is fused into it."""
        other, add = self.residual_of.get(n.name, (None, None))
        ov = self.val.get(self.base.get(other, other)) if other is not None else None
        if ov is not None and ov.buf is not None:  # a planned buffer: C-contiguous, not the output's
            self.add_into[add] = n.name
            return add in self.relu_after, self.slot[other]
        return relu, None

    def _bound_conv(self, n: Node, x: int, shape: tuple[int, ...], relu: bool, res: int | None, binder: Any,
                    prep: Any, bias: tuple[Any] | None = None, kind: str | None = None,
                    clamp: bool = False, pre: str = "") -> None:
        """A conv step running ``binder(prep, x_shape, bias, out, relu)`` (a kernel's ``bind_*``); with
        ``res`` (a slot) the bound kernel also adds that value (a residual connection)."""
        s, _ = self._planned(n.name, shape)
        if bias is None:
            eng = n.fn.engine
            bias = (eng.bias if eng.has_bias else None,)
        bias = bias[0]
        xs = tuple(self.values[n.refs()[0]].shape)
        strides = {k: v for k, v in (("in_stride", self.padded.get(n.refs()[0], 0)),
                                     ("out_stride", self.padded.get(n.name, 0))) if v}
        if strides:
            binder = functools.partial(binder, **strides)
        label = f"{pre}conv:{kind or n.fn.strategy}" + ("+add" if res is not None else "")
        label += "+relu" if relu else "+clamp" if clamp else ""
        if res is not None:
            self._step(label, lambda env, bufs, x=x, s=s, r=res: _bind_kernel_res(
                env, x, r, binder(prep, xs, bias, env[s], relu)))
            return
        self._step(label, lambda env, bufs, x=x, s=s: _bind_kernel(
            env, x, binder(prep, xs, bias, env[s], relu)))

    def _linear(self, n: Node, x: int, shape: tuple[int, ...], relu: bool) -> None:
        from sparsecnn.layers import SparseLinear

        layer = n.fn
        strategy = layer.strategy if isinstance(layer, SparseLinear) else "torch"
        suffix = "+relu" if relu else ""
        if strategy in ("spmv", "spmm"):
            s, _ = self._planned(n.name, shape)
            eng = layer.engine
            from sparsecnn.kernels.spmv import bind_sparse_linear

            self._step(f"linear:{strategy}{suffix}", lambda env, bufs, x=x, s=s: _bind_kernel(
                env, x, bind_sparse_linear(eng.format, shape[0], eng.bias, env[s], relu)))
        elif strategy == "qspmv":
            s, _ = self._planned(n.name, shape)
            eng = layer.engine
            from sparsecnn.kernels.qspmv import bind_quant_linear

            self._step(f"linear:{strategy}{suffix}", lambda env, bufs, x=x, s=s: _bind_kernel(
                env, x, bind_quant_linear(eng.format, shape[0], eng.bias, env[s], relu)))
        elif strategy == "direct":
            s, _ = self._planned(n.name, shape)
            eng = layer.engine
            from sparsecnn.kernels.direct_linear import bind_direct_linear

            self._step(f"linear:{strategy}{suffix}", lambda env, bufs, x=x, s=s: _bind_kernel(
                env, x, bind_direct_linear(eng.format, shape[0], eng.bias, env[s], relu)))
        elif strategy == "spmv-act":
            s, _ = self._planned(n.name, shape)
            eng = layer.engine
            from sparsecnn.kernels.spmv_act import bind_act_sparse_linear

            self._step(f"linear:{strategy}{suffix}", lambda env, bufs, x=x, s=s: _bind_kernel(
                env, x, bind_act_sparse_linear(eng.format, shape[0], eng.bias, env[s], relu)))
        elif strategy in ("torch", "dense"):
            s, _ = self._planned(n.name, shape)
            lin = layer.engine.linear if strategy == "torch" and isinstance(layer, SparseLinear) else layer
            if strategy == "dense":
                wt, bt = layer.engine.weight_t, layer.engine.bias_t
            else:
                wt, bt = lin.weight.detach().t(), None if lin.bias is None else lin.bias.detach()
            self._step(f"linear:{strategy}{suffix}",
                       lambda env, bufs, x=x, s=s: _bind_gemm(env, x, s, wt, bt, relu))
        else:  # any other engine, through its own run (torch tensors in and out)
            s = self._slot(n.name)
            self.prog.static.setdefault(s, lambda bufs: None)
            self._step(f"linear:{strategy}{suffix}",
                       lambda env, bufs, x=x, s=s: _bind_engine(env, x, s, layer.engine, relu))

    def _relu(self, n: Node, x: int, src: str, i: int, shape: tuple[int, ...],
              bounds: tuple[float, float] | None = None) -> None:
        """A ReLU (or, with ``bounds``, a clamp: ReLU6, Hardtanh) not fused into its producer: in place
        where its input dies here, else into a buffer of its own."""
        from sparsecnn.kernels.elementwise import clamp_, relu_

        kind, op = "relu", relu_
        if bounds is not None:
            kind, op = "clamp", functools.partial(clamp_, lo=bounds[0], hi=bounds[1])
        v = self.val.get(src)
        root = self.base.get(src, src)
        dies = self.last_use.get(root, -1) <= i and root != self.nodes[0].name
        if v is not None and v.buf is not None and dies:
            # the input dies here: in place
            self._view(n.name, src, shape)
            s = self.slot[n.name]
            self._step(kind, lambda env, bufs, s=s: _bind_relu(op, env, s, s))
            return
        s, _ = self._planned(n.name, shape)
        self._step(kind, lambda env, bufs, x=x, s=s: _bind_relu(op, env, x, s))

    def _pool(self, n: Node, x: int, shape: tuple[int, ...]) -> bool:
        from sparsecnn.kernels.elementwise import bind_global_avg_pool, bind_max_pool2d
        from sparsecnn.kernels.lrn import bind_lrn

        kind = pool_kind(n, self.values)
        if kind is None:
            return False
        m = n.fn
        xs = tuple(self.values[n.refs()[0]].shape)
        blocked = n.refs()[0] in self.blocked
        if kind == "max" and n.name in self.lrn_into_pool:
            from sparsecnn.kernels.lrn import bind_lrn_max_pool

            lrn = self.lrn_into_pool[n.name].fn
            xs = tuple(self.values[self.lrn_into_pool[n.name].refs()[0]].shape)
            a = (lrn.size, lrn.alpha, lrn.beta, lrn.k)
            s, _ = self._planned(n.name, shape)
            self._step("lrn+maxpool", lambda env, bufs, x=x, s=s: _bind_kernel(
                env, x, bind_lrn_max_pool(xs, *a, env[s])))
            return True
        if kind == "max":
            p = tuple(_pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation))
            s, _ = self._planned(n.name, shape)
            bind = _bind_max_pool_blocked if blocked else bind_max_pool2d
            self._step("maxpool" + (":blocked" if blocked else ""), lambda env, bufs, x=x, s=s: _bind_kernel(
                env, x, bind(xs, env[s], *p)))
            return True
        if kind == "avg":
            s, _ = self._planned(n.name, shape)
            bind = _bind_global_avg_pool_blocked if blocked else bind_global_avg_pool
            if n.refs()[0] in self.padded:
                bind = functools.partial(bind_global_avg_pool, in_stride=self.padded[n.refs()[0]])
            self._step("avgpool" + (":blocked" if blocked else ""), lambda env, bufs, x=x, s=s: _bind_kernel(
                env, x, bind(xs, env[s])))
            return True
        if kind == "lrn":
            s, _ = self._planned(n.name, shape)
            a = (m.size, m.alpha, m.beta, m.k)
            self._step("lrn", lambda env, bufs, x=x, s=s: _bind_kernel(env, x, bind_lrn(xs, *a, env[s])))
            return True
        return False

    def _pad(self, n: Node, x: int, shape: tuple[int, ...]) -> bool:
        """A padding module on a plain 4-D input, in numba: an imported model's ``io._graph.Pad2d``, or
        torch's ``ZeroPad2d`` / ``ConstantPad2d`` / ``ReflectionPad2d`` / ``ReplicationPad2d``."""
        from sparsecnn.kernels.elementwise import bind_pad2d

        src = n.refs()[0] if len(n.refs()) == 1 else None
        xin = self.values.get(src) if src is not None else None
        how = _padding_of(n.fn) if n.op == "module" and not n.kwargs and len(n.args) == 1 else None
        if (how is None or not isinstance(xin, torch.Tensor) or xin.dim() != 4 or src in self.blocked
                or src in self.padded):
            return False
        xs = tuple(xin.shape)
        amounts, mode, value = how
        pads = amounts(xs[2], xs[3])
        if min(pads) < 0:  # torch's negative padding crops: left to torch
            return False
        s, _ = self._planned(n.name, shape)
        self._step("pad", lambda env, bufs, x=x, s=s: _bind_kernel(
            env, x, bind_pad2d(xs, env[s], pads, mode, value)))
        return True

    def _torch(self, n: Node) -> None:
        """Anything else runs in torch on views of the buffers (no copy in), its result taken as is."""
        s = self._slot(n.name)
        self.prog.static.setdefault(s, lambda bufs: None)
        slots = {r: self.slot[r] for r in n.refs()}
        label = type(n.fn).__name__ if n.op == "module" else getattr(n.fn, "__name__", str(n.fn))
        self._step(f"torch:{label}", lambda env, bufs, s=s: _bind_torch(env, n, slots, s))


def _padding_of(m: Any) -> tuple[Callable[[int, int], tuple[int, ...]], str, float] | None:
    """``(amounts(h, w), mode, value)`` of a 2-D padding module the engine runs itself, else None."""
    from sparsecnn.io._graph import Pad2d

    if isinstance(m, Pad2d):
        return m.amounts, m.mode, m.value
    modes = ((nn.ConstantPad2d, "constant"), (nn.ReflectionPad2d, "reflect"),
             (nn.ReplicationPad2d, "replicate"))
    for cls, mode in modes:  # ZeroPad2d is a ConstantPad2d
        if isinstance(m, cls):
            pads = tuple(int(p) for p in m.padding)
            return (lambda h, w, p=pads: p), mode, float(getattr(m, "value", 0.0))
    return None


def pool_kind(n: Node, values: dict[str, Any]) -> str | None:
    """``"max"`` (nn.MaxPool2d), ``"avg"`` (average pooling to 1 x 1) or ``"lrn"`` for the pooling
    and normalisation modules the engine runs itself on a 4-D input, else None."""
    m = n.fn if n.op == "module" else None
    xin = values.get(n.refs()[0]) if len(n.refs()) == 1 else None
    if not isinstance(xin, torch.Tensor) or xin.dim() != 4 or len(n.args) != 1 or n.kwargs:
        return None
    if isinstance(m, nn.MaxPool2d) and not m.return_indices:
        return "max"
    shape = tuple(values[n.name].shape)
    if (isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1)) or (
            isinstance(m, nn.AvgPool2d) and shape[2:] == (1, 1) and xin.shape[2:] == _pair(m.kernel_size)
            and _pair(m.padding) == (0, 0)):
        return "avg"
    if isinstance(m, nn.LocalResponseNorm):
        return "lrn"
    return None


def _bind_max_pool_blocked(x_shape, out, kernel_size, stride, padding, dilation):
    """``run(x)``: max pooling of a channel-blocked ``x`` of (plain) shape ``x_shape`` into ``out``,
    blocked too (:func:`sparsecnn.kernels.blocked.max_pool_blocked`)."""
    from sparsecnn.kernels.blocked import BLOCK, max_pool_blocked

    b, c, h, w = x_shape
    o = out.reshape(b, c // BLOCK, out.shape[2], out.shape[3], BLOCK)
    args = (*kernel_size, *stride, *padding, *dilation)

    def run(x):
        max_pool_blocked(x.reshape(b, c // BLOCK, h, w, BLOCK), o, *args)
    return run


def _bind_global_avg_pool_blocked(x_shape, out):
    """``run(x)``: the mean of each channel of a channel-blocked ``x`` into ``out`` (B, C) or (B, C,
    1, 1): the plain and the blocked layout alike
    (:func:`sparsecnn.kernels.blocked.global_avg_pool_blocked`)."""
    from sparsecnn.kernels.blocked import BLOCK, global_avg_pool_blocked

    b, c, h, w = x_shape
    o = out.reshape(b, c)

    def run(x):
        global_avg_pool_blocked(x.reshape(b, c // BLOCK, h * w, BLOCK), o)
    return run


def _shape_like(v: Any) -> bool:
    """Values that depend on the input only through its shape (fixed for one input shape)."""
    if isinstance(v, (bool, int, float, str, torch.Size)) or v is None:
        return True
    return isinstance(v, (tuple, list)) and all(_shape_like(a) for a in v)


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------------------------------
# bound steps: each returns the closure one forward pass calls (arguments bound once)


def _bind_view(env, s, src, shape):
    def run(env=env):
        env[s] = env[src].reshape(shape)
    return run


def _bind_add(add_relu, env, a, b, s, relu):
    out = env[s].reshape(-1)

    def run(env=env):
        add_relu(env[a].reshape(-1), env[b].reshape(-1), out, relu)
    return run


def _bind_relu(relu_, env, x, s):
    out = env[s]
    flat = out.reshape(-1)
    if x == s:
        def run(env=env):
            relu_(flat)
        return run

    def run_copy(env=env):
        np.copyto(out, env[x])
        relu_(flat)
    return run_copy


def _bind_kernel(env, x, run):
    """A step running a kernel bound by its ``bind_*`` function on the value in slot ``x``."""
    def step(env=env):
        run(env[x])
    return step


def _epilogue_adds(layer: Any) -> bool:
    """Whether a sparse conv layer's bound kernel can add a residual in its epilogue and read its input
    in place: the direct kernel and the implicit GEMM (``lowered`` with its compact weights tiled)."""
    return layer.strategy == "direct" or (layer.strategy == "lowered" and layer.engine.implicit is not None)


def _bind_kernel_res(env, x, r, run):
    """:func:`_bind_kernel` for a kernel that also adds the value in slot ``r`` (a residual)."""
    def step(env=env):
        run(env[x], env[r])
    return step


def _bind_gemm(env, x, s, wt, bt, relu):
    out = torch.from_numpy(env[s])

    def run(env=env):
        xt = torch.from_numpy(env[x])
        if bt is None:
            torch.mm(xt, wt, out=out)
        else:
            torch.addmm(bt, xt, wt, out=out)
        if relu:
            out.relu_()
    return run


def _bind_torch_conv(env, x, s, w, b, args, relu):
    stride, padding, dilation, groups = args

    def run(env=env):
        y = F.conv2d(torch.from_numpy(env[x]), w, b, stride, padding, dilation, groups)
        if relu:
            y.relu_()
        env[s] = y.numpy()
    return run


def _bind_engine(env, x, s, engine, relu):
    def run(env=env):
        y = engine.run(torch.from_numpy(env[x]))
        if relu:
            y.relu_()
        env[s] = y.numpy()
    return run


def _as_torch(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v)
    if isinstance(v, (tuple, list)):
        return type(v)(_as_torch(a) for a in v)
    return v


def _as_numpy(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().contiguous().numpy()
    return v


def _bind_torch(env, node, slots, s):
    def run(env=env):
        vals = {r: _as_torch(env[k]) for r, k in slots.items()}
        y = _as_numpy(call(node, vals))
        if isinstance(y, np.ndarray) and any(isinstance(env[k], np.ndarray) and np.may_share_memory(y, env[k])
                                             for k in slots.values()):
            # the op returned (a view of) its input, whose buffer may be reused once the input is dead
            y = y.copy()
        env[s] = y
    return run


# Off: buffers that every thread reads whole are reused like any other (benchmarks/buffers.py's
# baseline, the plan before 2026-12-05).
KEEP_SHARED = True

# Off: residual adds run as steps of their own after the conv (the A/B baseline of the fusion).
FUSE_RESIDUAL = True

# Off: a clamp (ReLU6) after a depthwise conv runs as a step of its own (benchmarks/mobilenet.py's baseline).
FUSE_CLAMP = True
# Off: ... and one before a depthwise conv too (its input's clamp on the conv's per-channel copies).
FUSE_CLAMP_INPUT = True

# Off: an LRN and the max pool after it run as two steps (benchmarks/fusion.py's lrn-pool baseline).
FUSE_LRN_POOL = True

# Off: a blocked depthwise conv and the 1x1 convs before and after it run as separate steps
# (kernels.expand_depthwise; the A/B baseline). On, the depthwise conv computes the expanding 1x1 conv
# before it where each thread has at least FUSE_EXPAND_ROWS output rows (its first recomputes a row of
# the 1x1 layer its neighbour computes) or whole images, and with FUSE_PROJECT the projecting one after it.
FUSE_EXPAND = True
FUSE_EXPAND_ROWS = 7
# Off: ... the projecting 1x1 conv after the depthwise one runs as a step of its own.
FUSE_PROJECT = True

# Off: every value keeps planes of H * W floats (benchmarks/planes.py's baseline, before 2026-12-06).
PAD_PLANES = True

# Where the threads split a batch's images, every value gets a buffer of its own while they total at
# most this many bytes (per calling thread) and a quarter of the memory available.
OWN_BUFFERS_MAX_BYTES = 512 << 20


def build_program(nodes: list[Node], values: dict[str, Any], blocked: bool = False,
                  cache: dict[Any, Any] | None = None, min_density: float | None = None) -> Program:
    """Lower ``nodes`` for the input shape ``values`` was recorded with (see :func:`record`).

    Where the kernels split the batch's images among the threads (:func:`sparsecnn.kernels.conv.
    split_by_image`), every value gets a buffer of its own (up to :data:`OWN_BUFFERS_MAX_BYTES`), so
    each image's activations are written and read by one core only, layer after layer and call after
    call; a reused buffer puts another layer's images, written by the other core, under them (see
    :class:`_Builder` for what rewriting the other core's lines costs). Whole compiled models at
    batch 32, 2 threads, interleaved in one process: ResNet-18 at 90% 151-157 against 163-170 ms
    (420 against 147 MB of buffers), AlexNet DC 141-152 against 146-160 ms (154 against 71 MB).
    Otherwise (batch 1, or buffers too large) dead values' buffers are reused (:class:`_Builder`).
    With ``blocked``, chains of candidate convs (at least ``min_density`` of their weights nonzero,
    :data:`sparsecnn.engine._layout.MIN_DENSITY` when None) keep channel-blocked activations.

    With ``blocked``, chains of dense conv layers keep their activations channel-blocked and run the
    channel-vector implicit GEMM (:mod:`sparsecnn.engine._layout`); ``cache`` keeps those layers'
    prepared weights across input shapes.
    """
    out = values[nodes[-1].args[0].name]
    if not isinstance(out, torch.Tensor):
        raise SparseCNNError(f"cannot compile: the model returns {type(out).__name__}, not a tensor")
    from sparsecnn.kernels._numba import num_threads
    from sparsecnn.kernels.conv import split_by_image

    x = next((values[n.name] for n in nodes if n.op == "input"), None)
    nparts = num_threads()
    layouts = plan_layouts(nodes, values, {} if cache is None else cache, min_density) if blocked else None
    if isinstance(x, torch.Tensor) and x.dim() > 0 and nparts > 1 and split_by_image(int(x.shape[0]), nparts):
        prog = _Builder(nodes, values, reuse=False, layouts=layouts).build()
        own = 4 * sum(prog.buffers)
        avail = available_bytes()
        if own <= OWN_BUFFERS_MAX_BYTES and (avail is None or own <= avail // 4):
            return prog
    return _Builder(nodes, values, layouts=layouts).build()

