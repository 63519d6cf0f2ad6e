"""Physically remove the filters and input channels that structured pruning (SSL) zeroed.

A conv (or linear) *producer* ``P`` feeding a *consumer* ``C`` (conv or linear) through a simple
chain of per-channel operations (ReLU, max pooling, unpadded average pooling, eval-mode BatchNorm,
dropout, identity, and a ``flatten(x, 1)`` in front of a linear) carries one channel of ``P``'s output
into input channel ``c`` of ``C``. Channel ``c`` can go, from both layers and from every BatchNorm in
between, when

* ``C`` never reads it: its weights on channel ``c`` are all zero (an SSL "removed channel"); or
* ``P``'s filter ``c`` is all zero: its output is the constant ``bias[c]``, carried through the chain
  to a per-channel constant ``v``. ``v = 0`` drops out; a nonzero ``v`` is folded into ``C``'s bias
  (``v`` times the sum of ``C``'s weights on channel ``c``), which is exact only when ``C`` is a linear
  or an unpadded conv, so elsewhere the filter is kept.

Only a simple chain qualifies: ``P``'s output and every step of the chain used exactly once, nothing
that mixes channels (LRN, softmax, a residual add, a concatenation) in between. Grouped layers keep
equal groups: in every block of ``Cout / lcm(g_P, g_C)`` channels the same number are removed (the
smallest count any block allows). The result is checked against the original model on the example
input (relative 1e-4) before it is returned.

The compact layers are ordinary ``nn.Conv2d`` / ``nn.Linear`` modules, so oneDNN or any sparse
strategy then runs fewer FLOPs: SSL's speedup (Wen et al., "Learning structured sparsity in deep
neural networks", NIPS 2016, section 4) made physical.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from sparsecnn.errors import SparseCNNError

__all__ = ["ShrinkResult", "shrink"]

_ELEMENTWISE = (nn.ReLU, nn.Dropout, nn.Identity)
_SPATIAL = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class ShrinkResult:
    """What :func:`shrink` removed."""

    model: nn.Module | None  # the shrunk copy (eval mode); None in sparsify's record of it
    removed_filters: dict[str, int]  # producer layer -> output channels removed
    removed_inputs: dict[str, int]  # consumer layer -> input channels (linear: channels x features) removed
    max_rel_error: float  # max |shrunk - original| / max |original| on the example input

    @property
    def changed(self) -> bool:
        return bool(self.removed_filters)


class _LeafTracer(fx.Tracer):
    """Every module without children is a leaf, so the graph shows modules, not their internals
    (the zoo's own pooling and LRN stay opaque)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not any(True for _ in m.children())


@dataclass
class _Pair:
    producer: str
    consumer: str
    between: list[str]  # per-channel modules in order (BatchNorm2d to slice; others pass through)
    flatten_hw: int  # features per channel after a flatten (0: no flatten)
    ops: list[tuple[str, object]]  # ("relu", None) | ("bn", module) | ("id", None) for constants


def _chain_step(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, object] | None:
    """How one node acts on a per-channel constant, or None when it is not a per-channel op."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.ReLU):
            return ("relu", None)
        if isinstance(m, (nn.Dropout, nn.Identity, *_SPATIAL)):
            return ("id", None)
        if isinstance(m, nn.AvgPool2d) and m.padding in (0, (0, 0)):
            return ("id", None)
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None:
            return ("bn", m)
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return ("flatten", None)
        return None
    if node.op == "call_function":
        if node.target in (torch.relu, torch.nn.functional.relu) and len(node.args) == 1:
            return ("relu", None)
        if node.target is torch.flatten and tuple(node.args[1:]) == (1,) and not node.kwargs:
            return ("flatten", None)
        return None
    if node.op == "call_method" and node.target == "relu" and len(node.args) == 1:
        return ("relu", None)
    return None


def _pairs(model: nn.Module) -> list[_Pair]:
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # a forward fx cannot trace (data-dependent control flow): nothing to shrink
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    out: list[_Pair] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, nn.Linear)) \
                or calls[node.target] != 1:
            continue
        producer = modules[node.target]
        between: list[str] = []
        ops: list[tuple[str, object]] = []
        flat = False
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if nxt.op == "call_module" and isinstance(modules[nxt.target], (nn.Conv2d, nn.Linear)):
                consumer = modules[nxt.target]
                if len(nxt.args) != 1 or nxt.kwargs or calls[nxt.target] != 1:
                    break
                if isinstance(consumer, nn.Conv2d):
                    ok = isinstance(producer, nn.Conv2d) and not flat
                    hw = 0
                elif flat:  # conv -> ... -> flatten -> linear
                    ok = consumer.in_features % producer.out_channels == 0
                    hw = consumer.in_features // producer.out_channels if ok else 0
                else:
                    ok = isinstance(producer, nn.Linear)
                    hw = 0
                if ok:
                    out.append(_Pair(node.target, nxt.target, between, hw, ops))
                break
            step = _chain_step(nxt, modules)
            if step is None:
                break
            if step[0] == "flatten":
                if flat or isinstance(producer, nn.Linear):
                    break
                flat = True
            elif flat and step[0] == "bn":
                break
            if step[0] == "bn":
                between.append(nxt.target)
            ops.append(step)
            cur = nxt
    return out


def _constant(bias: float, ops: list[tuple[str, object]], channel: int) -> float:
    v = bias
    for kind, m in ops:
        if kind == "relu":
            v = max(v, 0.0)
        elif kind == "bn":
            assert isinstance(m, nn.BatchNorm2d)
            mean = float(m.running_mean[channel])
            var = float(m.running_var[channel])
            w = float(m.weight[channel]) if m.weight is not None else 1.0
            b = float(m.bias[channel]) if m.bias is not None else 0.0
            v = (v - mean) / math.sqrt(var + m.eps) * w + b
    return v


def _groups(m: nn.Module) -> int:
    return int(getattr(m, "groups", 1))


def _consumer_in(consumer: nn.Module, hw: int) -> np.ndarray:
    """Consumer weight as (in_channel, rest) magnitudes: which input channels it reads."""
    w = consumer.weight.detach().cpu().numpy()
    if isinstance(consumer, nn.Linear):
        per = np.abs(w).reshape(w.shape[0], -1, max(hw, 1))  # (out, C, hw)
        return per.sum(axis=(0, 2))  # (C,)
    g = _groups(consumer)
    cout, cin_g = w.shape[:2]
    per = np.abs(w).reshape(g, cout // g, cin_g, -1).sum(axis=(1, 3))  # (g, cin_g)
    return per.reshape(-1)


def _fold_weight(consumer: nn.Module, channel: int, hw: int) -> np.ndarray:
    """Sum of the consumer's weights on one input channel, per output."""
    w = consumer.weight.detach().cpu().numpy()
    if isinstance(consumer, nn.Linear):
        step = max(hw, 1)
        return w[:, channel * step:(channel + 1) * step].sum(axis=1)
    g = _groups(consumer)
    cout, cin_g = w.shape[:2]
    grp, local = divmod(channel, cin_g)
    out = np.zeros(cout, np.float32)
    rows = slice(grp * (cout // g), (grp + 1) * (cout // g))
    out[rows] = w[rows, local].sum(axis=(1, 2))
    return out


def _removable(model_mods: dict[str, nn.Module], pair: _Pair
               ) -> tuple[np.ndarray, dict[int, float]]:
    """Channels of the pair that may go, and the constants to fold for them."""
    producer, consumer = model_mods[pair.producer], model_mods[pair.consumer]
    pw = producer.weight.detach().cpu().numpy().reshape(producer.weight.shape[0], -1)
    pb = producer.bias.detach().cpu().numpy() if producer.bias is not None else np.zeros(pw.shape[0])
    unused = _consumer_in(consumer, pair.flatten_hw) == 0
    zero_filter = ~(pw != 0).any(axis=1)
    if isinstance(consumer, nn.Linear):
        foldable = True
    else:  # a constant channel's contribution is the same at every output only without padding
        foldable = consumer.padding == "valid" or (
            not isinstance(consumer.padding, str) and all(p == 0 for p in consumer.padding))
    ok = unused.copy()
    fold: dict[int, float] = {}
    for c in np.flatnonzero(zero_filter & ~unused):
        v = _constant(float(pb[c]), pair.ops, int(c))
        if v == 0.0:
            ok[c] = True
        elif foldable and math.isfinite(v):
            ok[c] = True
            fold[int(c)] = v
    # equal removals in every block of the finer of the two groupings
    n = ok.size
    blocks = math.lcm(_groups(producer), _groups(consumer))
    per = ok.reshape(blocks, n // blocks)
    k = min(int(per.sum(axis=1).min()), n // blocks - 1)  # keep a channel: no zero-width layer
    keep_removed = np.zeros_like(per)
    for b in range(blocks):
        keep_removed[b, np.flatnonzero(per[b])[:k]] = True
    removed = keep_removed.reshape(-1)
    return removed, {c: v for c, v in fold.items() if removed[c]}


def _max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return float((y - ref).abs().max()) / scale if scale > 0 else float((y - ref).abs().max())


@torch.no_grad()
def shrink(model: nn.Module, example_input: torch.Tensor, *, rtol: float = 1e-4) -> ShrinkResult:
    """A copy of ``model`` without the all-zero filters and unread input channels it can drop.

    Parameters
    ----------
    model : torch.nn.Module
        Not modified. Dense float layers (``nn.Conv2d``, ``nn.Linear``), before ``sparsify``.
    example_input : Tensor, shape (N, C, H, W) (or what the model takes)
        Checks the result: the shrunk copy must give the original's output on it.
    rtol : float
        The largest relative difference (to the output's largest magnitude) accepted.

    Returns
    -------
    ShrinkResult
        The copy (unchanged apart from eval mode when nothing could go) and what was removed.

    Raises
    ------
    SparseCNNError
        The example input does not fit the model, or (a bug) the shrunk model's output differs.
    """
    if not isinstance(model, nn.Module):
        raise SparseCNNError(f"shrink needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise SparseCNNError(f"shrink needs an example input tensor, got {type(example_input).__name__}")
    new = copy.deepcopy(model).eval()
    try:
        ref = new(example_input)
    except (RuntimeError, ValueError) as exc:
        raise SparseCNNError(f"shrink: the model fails on the example input of shape "
                             f"{tuple(example_input.shape)} ({str(exc).splitlines()[0]}); give an input the "
                             f"model takes") from None
    mods = dict(new.named_modules())
    pairs = _pairs(new)
    out_keep: dict[str, np.ndarray] = {}
    in_keep: dict[str, np.ndarray] = {}
    folds: dict[str, tuple[_Pair, dict[int, float]]] = {}
    pair_of: dict[str, _Pair] = {}
    for pair in pairs:
        if pair.producer == pair.consumer:
            continue
        removed, fold = _removable(mods, pair)
        if not removed.any():
            continue
        out_keep[pair.producer] = ~removed
        in_keep[pair.consumer] = ~removed
        folds[pair.consumer] = (pair, fold)
        pair_of[pair.producer] = pair
    removed_filters: dict[str, int] = {}
    removed_inputs: dict[str, int] = {}
    for name in dict.fromkeys([*out_keep, *in_keep]):
        m = mods[name]
        w = m.weight.detach()
        b = None if m.bias is None else m.bias.detach().clone()
        rows = torch.from_numpy(np.flatnonzero(out_keep.get(name, np.ones(w.shape[0], bool))))
        if name in in_keep:
            pair, fold = folds[name]
            if fold:
                extra = np.zeros(w.shape[0], np.float32)
                for c, v in fold.items():
                    extra += np.float32(v) * _fold_weight(m, c, pair.flatten_hw)
                base = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b
                b = base + torch.from_numpy(extra).to(w.dtype)
            keep = in_keep[name]
            if isinstance(m, nn.Linear):
                cols = np.repeat(keep, max(pair.flatten_hw, 1))
                w = w[:, torch.from_numpy(np.flatnonzero(cols))]
            else:
                # every group keeps the same number of channels (by construction); which ones differs
                g = _groups(m)
                cin_g, per_group = w.shape[1], w.shape[0] // g
                parts = []
                for grp in range(g):
                    idx = torch.from_numpy(np.flatnonzero(keep.reshape(g, cin_g)[grp]))
                    parts.append(w[grp * per_group:(grp + 1) * per_group][:, idx])
                w = torch.cat(parts, dim=0)
            removed_inputs[name] = int((~keep).sum())
        w = w[rows]
        if b is not None:
            b = b[rows]
        if name in out_keep:
            removed_filters[name] = int((~out_keep[name]).sum())
        _replace(new, name, m, w, b)
        pair = pair_of.get(name)
        if pair is not None:
            for bn_name in pair.between:
                _slice_bn(new, bn_name, mods[bn_name], rows)
    result = new(example_input) if removed_filters else ref
    err = _max_rel(result, ref)
    if not err <= rtol:
        raise SparseCNNError(
            f"shrink: the shrunk model differs from the original by {err:.3g} (relative) on the example "
            f"input; this is a bug in sparsecnn.shrink, run sparsify with shrink=False meanwhile")
    return ShrinkResult(new, removed_filters, removed_inputs, err)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _replace(model: nn.Module, name: str, old: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> None:
    if isinstance(old, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    else:
        new = nn.Conv2d(w.shape[1] * old.groups, w.shape[0], old.kernel_size, stride=old.stride,
                        padding=old.padding, dilation=old.dilation, groups=old.groups, bias=b is not None,
                        padding_mode=old.padding_mode, dtype=w.dtype)
    new.weight.copy_(w)
    if b is not None:
        new.bias.copy_(b)
    _set(model, name, new.eval())


def _slice_bn(model: nn.Module, name: str, bn: nn.BatchNorm2d, rows: torch.Tensor) -> None:
    new = nn.BatchNorm2d(int(rows.numel()), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=True, dtype=bn.running_mean.dtype)
    new.running_mean.copy_(bn.running_mean[rows])
    new.running_var.copy_(bn.running_var[rows])
    if bn.affine:
        new.weight.copy_(bn.weight.detach()[rows])
        new.bias.copy_(bn.bias.detach()[rows])
    _set(model, name, new.eval())
