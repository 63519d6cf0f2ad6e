"""The pruner lifecycle shared by every method: prepare -> step -> squash (DESIGN rule 8).

``prepare(model)`` puts an all-ones mask beside each selected weight; ``step()`` asks the schedule
for the current target and the subclass for new masks (scored by a swappable importance object),
and narrows the masks (they only shrink); ``squash()`` bakes the zeros into the weights and removes
every mask, leaving a plain module. ``state_dict()``/``load_state_dict()`` carry the masks and the
schedule position, so a checkpoint taken mid-schedule resumes exactly (the pattern of
``torch.ao.pruning.BaseSparsifier``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sparsecnn.errors import SparseCNNError
from sparsecnn.prune.importance import Importance, MagnitudeImportance
from sparsecnn.prune.masks import (
    LayerSparsity,
    add_mask,
    apply_mask,
    get_mask,
    mask_digest,
    prunable_layers,
    remove_mask,
    sparsity_report,
)
from sparsecnn.prune.schedules import Schedule

__all__ = ["Pruner"]


class Pruner:
    """Base class: subclasses implement :meth:`compute_masks`.

    Parameters
    ----------
    schedule : Schedule
        Target sparsity per step.
    importance : Importance, optional
        Element scores (default :class:`MagnitudeImportance`).
    layers : iterable of str, optional
        Names of the conv/linear layers to prune (default: all of them).
    """

    def __init__(
        self,
        schedule: Schedule,
        importance: Importance | None = None,
        layers: Iterable[str] | None = None,
    ) -> None:
        self.schedule = schedule
        self.importance = importance if importance is not None else MagnitudeImportance()
        self.layer_names = None if layers is None else list(layers)
        self.model: nn.Module | None = None
        self.layers: dict[str, nn.Module] = {}
        self.step_count = 0
        self.last_target: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def _default_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return prunable_layers(model)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Attach an all-ones mask to each layer to prune (before wrapping the model in DDP)."""
        if self.model is not None:
            raise SparseCNNError("this pruner is already prepared; make a new one for another model")
        if self.layer_names is None:
            self.layers = self._default_layers(model)
        else:
            self.layers = prunable_layers(model, self.layer_names)
        for module in self.layers.values():
            add_mask(module, get_mask(module))
        self.model = model
        return model

    def _check_prepared(self) -> None:
        if self.model is None:
            raise SparseCNNError("call prepare(model) before step(), squash() or state_dict()")

    def compute_masks(self, target: float) -> dict[str, torch.Tensor]:
        """New 0/1 masks for every layer at sparsity ``target`` (subclasses implement this)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self) -> float:
        """Advance the schedule one step and narrow the masks to its target; returns the target."""
        self._check_prepared()
        target = float(self.schedule(self.step_count))
        self.step_count += 1
        if target != self.last_target:
            new = self.compute_masks(target)
            for name, module in self.layers.items():
                add_mask(module, get_mask(module) * new[name])
            self.last_target = target
            self._sync()
        return target

    def squash(self) -> nn.Module:
        """Bake the zeros into the weights and drop masks and hooks; returns the plain model."""
        self._check_prepared()
        for module in self.layers.values():
            remove_mask(module)
        model, self.model, self.layers = self.model, None, {}
        return model

    # -- helpers -----------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self) -> None:
        """Re-zero every pruned weight (after an optimizer step)."""
        for module in self.layers.values():
            apply_mask(module)

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Re-apply the masks after every ``optimizer.step()``; returns the removable hook handle.

        Needed because momentum and Adam moments collected before pruning still move a weight whose
        gradient is now masked to zero.
        """
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply())

    def masks(self) -> dict[str, torch.Tensor]:
        """The current masks by layer name (the live buffers)."""
        self._check_prepared()
        return {name: get_mask(m) for name, m in self.layers.items()}

    def digest(self) -> str:
        """SHA-256 of the mask patterns; identical on every DDP rank."""
        return mask_digest(self.masks())

    def report(self) -> list[LayerSparsity]:
        """Per-layer sparsity and removed rows/columns, masks applied."""
        self._check_prepared()
        return sparsity_report(self.model, list(self.layers))

    def _sync(self) -> None:
        # Every rank computes the same masks from the same (all-reduced) weights; broadcasting rank
        # 0's masks makes that exact even if a score ties differently on another device.
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for mask in self.masks().values():
                dist.broadcast(mask, src=0)
            self.apply()

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Masks (cloned to the CPU), schedule position and last target."""
        self._check_prepared()
        return {
            "step_count": self.step_count,
            "last_target": self.last_target,
            "masks": {n: m.detach().cpu().clone() for n, m in self.masks().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks and schedule position into a prepared pruner (same layers)."""
        self._check_prepared()
        masks = state.get("masks", {})
        if set(masks) != set(self.layers):
            raise SparseCNNError(
                f"pruner state holds masks for layers {sorted(masks)} but this pruner prunes "
                f"{sorted(self.layers)}; prepare it with the same layers"
            )
        for name, module in self.layers.items():
            if tuple(masks[name].shape) != tuple(module.weight.shape):
                raise SparseCNNError(
                    f"pruner state mask for {name!r} has shape {tuple(masks[name].shape)}, "
                    f"the layer's weight {tuple(module.weight.shape)}"
                )
            add_mask(module, masks[name])
        self.step_count = int(state["step_count"])
        self.last_target = state["last_target"]

