"""Magnitude pruning as in Deep Compression (Han et al., "Learning both Weights and Connections for
Efficient Neural Networks", NIPS 2015): remove the weights with the smallest scores, retrain, repeat.

Three ways to pick the threshold (``policy``):

* ``"global"``: one threshold over all layers, chosen so the overall pruned fraction is the target
  (or a fixed magnitude ``threshold``);
* ``"layer"``: each layer pruned to the same target fraction, or to its own (``layer_targets``);
* ``"std"``: Han et al.'s per-layer threshold ``quality * std(w_layer)``; either a fixed ``quality``
  or the one quality that reaches the target overall.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from sparsecnn.errors import SparseCNNError
from sparsecnn.prune.base import Pruner
from sparsecnn.prune.importance import Importance
from sparsecnn.prune.schedules import Constant, Schedule, check_target

__all__ = ["POLICIES", "MagnitudePruner", "prune_smallest"]

POLICIES: tuple[str, ...] = ("global", "layer", "std")


def prune_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A 0/1 mask shaped like ``scores`` that zeros exactly the ``k`` smallest (ties: lowest index)."""
    flat = scores.reshape(-1)
    mask = torch.ones_like(flat)
    if k > 0:
        order = torch.argsort(flat, stable=True)
        mask[order[:k]] = 0
    return mask.reshape(scores.shape)


class MagnitudePruner(Pruner):
    """Unstructured magnitude pruning with a per-layer, global or quality x std threshold.

    Parameters
    ----------
    target : float in [0, 1), optional
        Fraction of the selected layers' weights to prune (one shot); or give ``schedule``.
    schedule : Schedule, optional
        :class:`~sparsecnn.prune.schedules.Iterative`, :class:`~sparsecnn.prune.schedules.AGP`, ...
    policy : {"global", "layer", "std"}
        How the target is split across layers (see the module docstring).
    quality : float, optional
        With ``policy="std"``: prune ``|w| < quality * std(w)`` per layer instead of reaching a target.
    threshold : float, optional
        With ``policy="global"``: prune every score below this value instead of reaching a target.
    layer_targets : mapping of str to float, optional
        With ``policy="layer"``: each named layer's own final fraction (others use the target); the
        schedule scales them by ``schedule(step) / schedule.final``.
    importance, layers
        As in :class:`~sparsecnn.prune.base.Pruner`.

    Notes
    -----
    The std of each layer is taken from its weights when :meth:`prepare` runs (the trained dense
    weights in Han et al.'s recipe), so the per-layer thresholds do not drift as weights are zeroed.
    """

    def __init__(
        self,
        target: float | None = None,
        *,
        schedule: Schedule | None = None,
        policy: str = "global",
        quality: float | None = None,
        threshold: float | None = None,
        layer_targets: Mapping[str, float] | None = None,
        importance: Importance | None = None,
        layers: Iterable[str] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise SparseCNNError(f"unknown magnitude policy {policy!r}; choose one of {', '.join(POLICIES)}")
        fixed = quality is not None or threshold is not None
        given = sum(x is not None for x in (target, schedule, quality, threshold))
        if given != 1:
            raise SparseCNNError("give exactly one of target, schedule, quality or threshold")
        if quality is not None and policy != "std":
            raise SparseCNNError("quality (threshold = quality x std) needs policy='std'")
        if threshold is not None and policy != "global":
            raise SparseCNNError("a fixed threshold needs policy='global'")
        if layer_targets is not None and policy != "layer":
            raise SparseCNNError("layer_targets needs policy='layer'")
        for what, value in (("quality", quality), ("threshold", threshold)):
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise SparseCNNError(f"{what} must be a non-negative number, got {value!r}")
        if target is not None:
            schedule = Constant(check_target(target))
        elif fixed:
            schedule = Constant(0.0)  # the step count still advances; the threshold is fixed
        super().__init__(schedule, importance, layers)
        self.policy = policy
        self.quality = quality
        self.threshold = threshold
        self.layer_targets = {
            n: check_target(t, f"target of layer {n!r}") for n, t in (layer_targets or {}).items()
        }
        self._std: dict[str, float] = {}

    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)
        unknown = set(self.layer_targets) - set(self.layers)
        if unknown:
            raise SparseCNNError(
                f"layer_targets names layer(s) {sorted(unknown)} that are not pruned; pruned layers: "
                f"{', '.join(self.layers)}"
            )
        self._std = {n: float(m.weight.detach().float().std()) for n, m in self.layers.items()}
        return model

    def step(self) -> float:
        if self.quality is not None or self.threshold is not None:
            self.last_target = None  # a fixed threshold re-applies on every step (weights move)
        return super().step()

    @torch.no_grad()
    def compute_masks(self, target: float) -> dict[str, torch.Tensor]:
        scores = {n: self.importance(m) for n, m in self.layers.items()}
        if self.threshold is not None:
            return {n: (s >= self.threshold).to(s.dtype) for n, s in scores.items()}
        if self.quality is not None:
            return {n: (s >= self.quality * self._std[n]).to(s.dtype) for n, s in scores.items()}
        if self.policy == "layer":
            final = getattr(self.schedule, "final", target) or 0.0
            scale = target / final if final > 0 else 0.0
            out = {}
            for n, s in scores.items():
                t = self.layer_targets[n] * scale if n in self.layer_targets else target
                out[n] = prune_smallest(s, round(t * s.numel()))
            return out
        if self.policy == "std":
            scores = {n: s / max(self._std[n], 1e-12) for n, s in scores.items()}
        return _global_masks(scores, target)


def _global_masks(scores: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
    """Prune the ``target`` fraction of all scores with one threshold across layers."""
    flat = torch.cat([s.reshape(-1).float().cpu() for s in scores.values()])
    keep = prune_smallest(flat, round(target * flat.numel()))
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start:start + s.numel()].reshape(s.shape).to(s.device, s.dtype)
        start += s.numel()
    return out
