"""Masks that live beside the weights they prune, and the structural report of a pruned layer.

Design choice: a mask is a registered buffer ``weight_mask`` (same shape and dtype as ``weight``,
values 0 or 1) on the pruned module, and ``weight`` stays an ordinary ``nn.Parameter`` whose pruned
entries are stored as exact zeros. Three things keep them zero during retraining:

* a forward pre-hook multiplies ``weight`` by its mask in place before every forward, so the forward
  never sees a stale nonzero;
* a tensor hook on ``weight`` multiplies its gradient by the mask, so no gradient flows into a pruned
  weight (and a DDP all-reduce of zeros stays zero);
* :meth:`Pruner.attach` adds an optimizer step post-hook that re-applies the mask, because momentum
  and Adam's moments, accumulated before the weight was pruned, would otherwise move it.

Why buffers and not ``torch.nn.utils.parametrize`` or ``torch.nn.utils.prune``: both rename the
parameter in the state dict (``parametrizations.weight.original``, ``weight_orig``), so a checkpoint
taken during retraining no longer loads into a plain model, and DDP/optimizers see a different
parameter. With a buffer, the state dict of a prepared model is the plain one plus ``*.weight_mask``
keys; it round-trips through ``state_dict``/``load_state_dict`` and through DDP (which broadcasts
buffers from rank 0). :func:`remove_mask` (the pruners' ``squash``) drops the buffer and hooks and
leaves a plain module whose weight holds the zeros.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sparsecnn.errors import SparseCNNError

__all__ = [
    "MASK_NAME",
    "LayerSparsity",
    "add_mask",
    "apply_mask",
    "get_mask",
    "lowered_view",
    "mask_digest",
    "prunable_layers",
    "remove_mask",
    "sparsity_report",
]

MASK_NAME = "weight_mask"
_HOOKS = "_sparsecnn_mask_hooks"


def prunable_layers(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The model's ``Conv2d`` and ``Linear`` layers by name, in module order.

    Parameters
    ----------
    model : torch.nn.Module
    layers : iterable of str, optional
        Restrict to these names (in module order); every name must be a conv/linear layer.

    Raises
    ------
    SparseCNNError
        For a name that is not a conv/linear layer of ``model``.
    """
    found = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if not found:
        raise SparseCNNError(f"{type(model).__name__} has no Conv2d or Linear layer to prune")
    if layers is None:
        return found
    wanted = list(layers)
    unknown = [n for n in wanted if n not in found]
    if unknown:
        raise SparseCNNError(
            f"unknown layer(s) {', '.join(repr(n) for n in unknown)}; the model's conv/linear layers are "
            f"{', '.join(found)}"
        )
    if not wanted:
        raise SparseCNNError("the list of layers to prune is empty; name at least one conv/linear layer")
    return {n: m for n, m in found.items() if n in wanted}


def get_mask(module: nn.Module) -> torch.Tensor | None:
    """The module's ``weight_mask`` buffer, or None if it is not pruned."""
    return module._buffers.get(MASK_NAME)


@torch.no_grad()
def apply_mask(module: nn.Module) -> None:
    """Zero the pruned entries of ``module.weight`` in place (no-op without a mask)."""
    mask = get_mask(module)
    if mask is not None:
        module.weight.mul_(mask)


def _forward_pre_hook(module: nn.Module, args: tuple) -> None:
    apply_mask(module)


def add_mask(module: nn.Module, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Give ``module`` a ``weight_mask`` buffer (all ones unless ``mask`` is given) and its hooks.

    Calling it again on a masked module replaces the mask's values in place (hooks are not duplicated).

    Returns
    -------
    torch.Tensor, shape of ``module.weight``
        The mask buffer.
    """
    weight = module.weight
    new = torch.ones_like(weight) if mask is None else mask.to(device=weight.device, dtype=weight.dtype)
    if new.shape != weight.shape:
        raise SparseCNNError(
            f"mask shape {tuple(new.shape)} does not match weight shape {tuple(weight.shape)}"
        )
    existing = get_mask(module)
    if existing is not None:
        existing.copy_(new)
    else:
        module.register_buffer(MASK_NAME, new.clone())
        # The hooks look the mask up at call time, so load_state_dict / DDP buffer broadcasts that
        # replace its values are seen.
        grad_hook = weight.register_hook(lambda g, m=module: g * m._buffers[MASK_NAME])
        pre_hook = module.register_forward_pre_hook(_forward_pre_hook)
        setattr(module, _HOOKS, (grad_hook, pre_hook))
    apply_mask(module)
    return module._buffers[MASK_NAME]


def remove_mask(module: nn.Module) -> None:
    """Bake the mask into the weight (exact zeros) and drop the buffer and hooks (no-op if unmasked)."""
    if get_mask(module) is None:
        return
    apply_mask(module)
    for handle in getattr(module, _HOOKS, ()):
        handle.remove()
    if hasattr(module, _HOOKS):
        delattr(module, _HOOKS)
    del module._buffers[MASK_NAME]


def lowered_view(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A weight as its lowered GEMM matrices: shape (g, rows, columns), a view when possible.

    Conv ``(Cout, Cin/g, kh, kw)`` -> ``(g, Cout/g, Cin/g*kh*kw)``, columns in Caffe's ``(c, i, j)``
    row-major order (the same layout as :func:`sparsecnn.formats.lower_conv_weight`); Linear
    ``(out, in)`` -> ``(1, out, in)``.
    """
    if weight.dim() == 2:
        return weight.unsqueeze(0)
    cout = weight.shape[0]
    return weight.reshape(groups, cout // groups, -1)


@dataclass(frozen=True)
class LayerSparsity:
    """Sparsity of one layer's weight, and the rows/columns of its lowered matrix that are all zero.

    Rows are output channels (filters; Linear: output features); columns are lowered columns
    (conv: one per (input channel, kernel row, kernel column) in each group; Linear: input features);
    channels are conv input channels whose every weight is zero (a removed channel also removes
    its ``kh*kw`` columns). Counts are summed over groups.
    """

    name: str
    kind: str  # "conv" or "linear"
    shape: tuple[int, ...]
    numel: int
    nnz: int
    sparsity: float  # fraction of exact zeros
    rows: int
    removed_rows: int
    columns: int
    removed_columns: int
    channels: int
    removed_channels: int

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@torch.no_grad()
def _layer_sparsity(name: str, module: nn.Module) -> LayerSparsity:
    w = module.weight.detach()
    mask = get_mask(module)
    if mask is not None:
        w = w * mask
    groups = getattr(module, "groups", 1)
    low = lowered_view(w, groups) != 0  # (g, rows, cols)
    g = low.shape[0]
    zero_rows = int((~low.any(dim=2)).sum())
    zero_cols = int((~low.any(dim=1)).sum())
    if w.dim() == 4:
        kind = "conv"
        per_channel = (w != 0).reshape(g, w.shape[0] // g, w.shape[1], -1).any(dim=3).any(dim=1)
        channels = g * w.shape[1]
        removed_channels = int((~per_channel).sum())
    else:
        kind = "linear"
        channels = w.shape[1]
        removed_channels = zero_cols
    nnz = int((w != 0).sum())
    return LayerSparsity(
        name=name,
        kind=kind,
        shape=tuple(w.shape),
        numel=w.numel(),
        nnz=nnz,
        sparsity=1.0 - nnz / w.numel(),
        rows=g * low.shape[1],
        removed_rows=zero_rows,
        columns=g * low.shape[2],
        removed_columns=zero_cols,
        channels=channels,
        removed_channels=removed_channels,
    )


def sparsity_report(model: nn.Module, layers: Sequence[str] | None = None) -> list[LayerSparsity]:
    """Per-layer sparsity and removed rows/columns of the conv/linear layers (masks applied)."""
    return [_layer_sparsity(n, m) for n, m in prunable_layers(model, layers).items()]


def mask_digest(masks: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the masks' 0/1 patterns, in name order: equal digests mean identical masks."""
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update((masks[name].detach().cpu() != 0).numpy().tobytes())
    return h.hexdigest()
