"""Importance scores: how much each weight matters, as a non-negative tensor shaped like the weight.

A pruner asks its importance object for scores and removes the lowest-scoring weights, blocks or
groups (structured pruners aggregate element scores with an L2 norm). Scores of already pruned
weights are 0, so masks only ever shrink. Swap the object to change the criterion without touching
the pruner (the idea of Torch-Pruning's importance classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from sparsecnn.errors import SparseCNNError
from sparsecnn.prune.masks import get_mask

__all__ = ["Importance", "MagnitudeImportance", "RandomImportance", "TaylorImportance"]


@runtime_checkable
class Importance(Protocol):
    def __call__(self, module: nn.Module) -> torch.Tensor: ...


def _masked(module: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    mask = get_mask(module)
    return scores if mask is None else scores * mask


@dataclass(frozen=True)
class MagnitudeImportance:
    """``|w|^p`` (Han et al. 2015 use ``p = 1``; block and group norms then come out as L2 norms of w)."""

    p: float = 1.0  # ranking of single weights does not depend on p; it reweights aggregated scores

    @torch.no_grad()
    def __call__(self, module: nn.Module) -> torch.Tensor:
        return _masked(module, module.weight.detach().abs().pow(self.p))


@dataclass(frozen=True)
class TaylorImportance:
    """First-order Taylor estimate of the loss change, ``|w * dL/dw|`` (Molchanov et al. 2019).

    Uses the gradient left in ``module.weight.grad`` by the caller's last backward pass.
    """

    @torch.no_grad()
    def __call__(self, module: nn.Module) -> torch.Tensor:
        grad = module.weight.grad
        if grad is None:
            raise SparseCNNError(
                "TaylorImportance needs gradients: run a backward pass on a batch before the pruner's step"
            )
        return _masked(module, (module.weight.detach() * grad).abs())


@dataclass(frozen=True)
class RandomImportance:
    """Uniform random scores: the baseline any real criterion must beat."""

    seed: int = 0  # same seed and layer shape -> same scores

    @torch.no_grad()
    def __call__(self, module: nn.Module) -> torch.Tensor:
        w = module.weight
        g = torch.Generator().manual_seed(self.seed + w.numel())
        return _masked(module, torch.rand(w.shape, generator=g).to(w.device, w.dtype))
