"""Structured Sparsity Learning (Wen et al., "Learning Structured Sparsity in Deep Neural Networks",
NIPS 2016): a group-lasso term in the loss drives whole groups of weights to zero during training;
afterwards the groups whose norm fell below a threshold are removed.

Groups, on the lowered matrix ``(g, Cout/g, Cin/g*kh*kw)`` of a conv (Linear: ``(out, in)``):

* ``filter``: a row (one output channel, all its weights) - removing it shrinks Cout;
* ``channel``: one input channel (``kh*kw`` columns) - removing it shrinks Cin;
* ``shape``: one lowered column ``(c, i, j)`` - removing it shrinks the GEMM's K dimension, the
  compact GEMM the engine's ``lowered`` strategy runs;
* ``depth``: a whole layer, only for layers inside a residual branch (a module with a ``downsample``
  or ``shortcut`` attribute, e.g. the zoo's ResNet blocks): the shortcut carries the signal when the
  branch is gone.

The regulariser is

.. math::

    E(W) = E_D(W) + \\sum_{k \\in \\text{kinds}} \\lambda_k \\sum_{l} \\sum_{g}
           \\lVert W^{(l)}_g \\rVert_2

and a group is *removed* when its RMS ``||W_g||_2 / sqrt(|g|)`` is below a threshold, or when it is
among the ``target`` fraction of its kind with the lowest RMS across the pruned layers (the RMS makes
groups of different sizes comparable). At least one row, channel and column of every layer is kept,
so no layer is cut off unless depth-wise groups are asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from sparsecnn.errors import SparseCNNError
from sparsecnn.prune.base import Pruner
from sparsecnn.prune.masks import lowered_view, prunable_layers
from sparsecnn.prune.schedules import Constant, check_target

__all__ = ["GROUP_KINDS", "GroupLasso", "SSLPruner", "group_rms", "residual_layers"]

GROUP_KINDS: tuple[str, ...] = ("filter", "channel", "shape", "depth")
_EPS = 1e-12  # keeps the norm's gradient finite at an all-zero group


def residual_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv layers inside a residual branch (not the shortcut's own projection)."""
    out: dict[str, nn.Module] = {}
    for bname, block in model.named_modules():
        if not (hasattr(block, "downsample") or hasattr(block, "shortcut")):
            continue
        skip = {
            id(m)
            for attr in ("downsample", "shortcut")
            if isinstance(getattr(block, attr, None), nn.Module)
            for m in getattr(block, attr).modules()
        }
        for name, m in block.named_modules():
            if isinstance(m, nn.Conv2d) and id(m) not in skip:
                out[f"{bname}.{name}" if bname else name] = m
    return out


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in GROUP_KINDS]
    if bad or not kinds:
        raise SparseCNNError(
            f"unknown SSL group kind(s) {bad or '(none given)'}; choose from {', '.join(GROUP_KINDS)}"
        )
    return kinds


def _sq_groups(module: nn.Module, kind: str, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Sum of squares per group (flattened over weight groups) and the size of one group."""
    w = module.weight if weight is None else weight
    groups = getattr(module, "groups", 1)
    low = lowered_view(w, groups)  # (g, rows, cols)
    sq = low.pow(2)
    if kind == "filter":
        return sq.sum(dim=2).reshape(-1), low.shape[2]
    if kind == "shape":
        return sq.sum(dim=1).reshape(-1), low.shape[1]
    if kind == "channel":
        if w.dim() == 4:
            per = sq.reshape(low.shape[0], low.shape[1], w.shape[1], -1).sum(dim=(1, 3))
            return per.reshape(-1), low.shape[1] * w.shape[2] * w.shape[3]
        return sq.sum(dim=1).reshape(-1), low.shape[1]
    if kind == "depth":
        return sq.sum().reshape(1), w.numel()
    raise SparseCNNError(f"unknown SSL group kind {kind!r}")


def group_rms(module: nn.Module, kind: str) -> torch.Tensor:
    """RMS of each group of ``kind`` in ``module.weight`` (masked), shape (number of groups,)."""
    with torch.no_grad():
        w = module.weight.detach()
        mask = module._buffers.get("weight_mask")
        if mask is not None:
            w = w * mask
        sq, size = _sq_groups(module, kind, w)
        return (sq / size).sqrt()


def _group_mask(module: nn.Module, kind: str, keep: torch.Tensor) -> torch.Tensor:
    """Expand a per-group 0/1 vector of ``kind`` to an element mask shaped like the weight."""
    w = module.weight
    low_shape = lowered_view(w, getattr(module, "groups", 1)).shape
    g, rows, cols = low_shape
    keep = keep.to(w.device, w.dtype)
    if kind == "filter":
        full = keep.reshape(g, rows, 1).expand(g, rows, cols)
    elif kind == "shape":
        full = keep.reshape(g, 1, cols).expand(g, rows, cols)
    elif kind == "channel":
        if w.dim() == 4:
            per_col = keep.reshape(g, w.shape[1], 1).expand(g, w.shape[1], w.shape[2] * w.shape[3])
            full = per_col.reshape(g, 1, cols).expand(g, rows, cols)
        else:
            full = keep.reshape(1, 1, cols).expand(g, rows, cols)
    else:  # depth
        full = keep.reshape(1, 1, 1).expand(g, rows, cols)
    return full.reshape(w.shape).clone()


class GroupLasso:
    """The SSL regulariser: call it after the forward pass and add the result to the loss.

    Parameters
    ----------
    model : torch.nn.Module
    groups : sequence of str
        Kinds from :data:`GROUP_KINDS`.
    strength : float or mapping of kind to float
        ``lambda_k``; one value for all kinds or one per kind.
    layers : iterable of str, optional
        Layers to regularise (default: every conv layer; ``depth`` always uses
        :func:`residual_layers`, or ``depth_layers``).
    depth_layers : iterable of str, optional
        The layers that may be removed whole.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[str] = ("filter", "channel", "shape"),
        strength: float | Mapping[str, float] = 1e-3,
        layers: Iterable[str] | None = None,
        depth_layers: Iterable[str] | None = None,
    ) -> None:
        self.kinds = _check_kinds(groups)
        if isinstance(strength, Mapping):
            missing = [k for k in self.kinds if k not in strength]
            if missing:
                raise SparseCNNError(f"group-lasso strength missing for kind(s) {missing}")
            self.strength = {k: float(strength[k]) for k in self.kinds}
        else:
            self.strength = dict.fromkeys(self.kinds, float(strength))
        if not all(math.isfinite(v) and v >= 0 for v in self.strength.values()):
            raise SparseCNNError(
                f"group-lasso strengths must be numbers >= 0 (e.g. 2e-4), got {self.strength}"
            )
        self.layers, self.depth = _select(model, self.kinds, layers, depth_layers)

    def __call__(self) -> torch.Tensor:
        total = None
        for kind in self.kinds:
            modules = self.depth if kind == "depth" else self.layers
            for module in modules.values():
                sq, _ = _sq_groups(module, kind)
                term = self.strength[kind] * (sq + _EPS).sqrt().sum()
                total = term if total is None else total + term
        assert total is not None
        return total


def _select(
    model: nn.Module, kinds: Sequence[str], layers: Iterable[str] | None, depth_layers: Iterable[str] | None,
) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    if layers is None:
        chosen = {n: m for n, m in prunable_layers(model).items() if isinstance(m, nn.Conv2d)}
        if not chosen:
            raise SparseCNNError("the model has no conv layer; pass layers=... to apply SSL to Linear layers")
    else:
        chosen = prunable_layers(model, layers)
    depth: dict[str, nn.Module] = {}
    if "depth" in kinds:
        depth = residual_layers(model) if depth_layers is None else prunable_layers(model, depth_layers)
        if not depth:
            raise SparseCNNError(
                "depth-wise SSL removes whole layers on a residual path, and this model has none; "
                "drop 'depth' from the groups or name the layers with depth_layers"
            )
    return chosen, depth


class SSLPruner(Pruner):
    """Remove the groups that group-lasso training drove to (near) zero.

    Parameters
    ----------
    target : float in [0, 1), optional
        Fraction of each kind's groups to remove (lowest RMS first, ranked across layers).
    threshold : float, optional
        Instead of a target: remove every group whose RMS is below this value.
    groups, layers, depth_layers
        As in :class:`GroupLasso` (use the same values).
    """

    def __init__(
        self,
        target: float | None = None,
        *,
        threshold: float | None = None,
        groups: Sequence[str] = ("filter", "channel", "shape"),
        layers: Iterable[str] | None = None,
        depth_layers: Iterable[str] | None = None,
    ) -> None:
        if (target is None) == (threshold is None):
            raise SparseCNNError("give exactly one of target or threshold")
        if threshold is not None and not (isinstance(threshold, (int, float)) and threshold >= 0):
            raise SparseCNNError(f"threshold must be a non-negative number, got {threshold!r}")
        super().__init__(Constant(check_target(target) if target is not None else 0.0), None, layers)
        self.kinds = _check_kinds(groups)
        self.threshold = threshold
        self._depth_names = None if depth_layers is None else list(depth_layers)
        self.depth: dict[str, nn.Module] = {}
        self._regular: list[str] = []

    def prepare(self, model: nn.Module) -> nn.Module:
        chosen, self.depth = _select(model, self.kinds, self.layer_names, self._depth_names)
        self._regular = list(chosen)
        self.layer_names = list(dict.fromkeys([*chosen, *self.depth]))
        return super().prepare(model)

    def _default_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        raise AssertionError("unreachable: prepare() always sets layer_names")

    def step(self) -> float:
        if self.threshold is not None:
            self.last_target = None  # the threshold is re-applied on every step
        return super().step()

    @torch.no_grad()
    def compute_masks(self, target: float) -> dict[str, torch.Tensor]:
        out = {n: torch.ones_like(m.weight) for n, m in self.layers.items()}
        for kind in self.kinds:
            names = self.depth if kind == "depth" else self._regular
            modules = {n: self.layers[n] for n in names}
            rms = {n: group_rms(m, kind).cpu() for n, m in modules.items()}
            if self.threshold is not None:
                remove = {n: r < self.threshold for n, r in rms.items()}
            else:
                flat = torch.cat(list(rms.values()))
                k = round(target * flat.numel())
                order = torch.argsort(flat, stable=True)
                cut = torch.zeros(flat.numel(), dtype=torch.bool)
                cut[order[:k]] = True
                remove, start = {}, 0
                for n, r in rms.items():
                    remove[n] = cut[start:start + r.numel()]
                    start += r.numel()
            for n, rem in remove.items():
                if kind != "depth" and bool(rem.all()):
                    rem = rem.clone()
                    rem[int(torch.argmax(rms[n]))] = False  # keep the layer connected
                out[n] = out[n] * _group_mask(self.layers[n], kind, (~rem).float())
        return out
