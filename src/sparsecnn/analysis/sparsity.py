"""Weight sparsity at four granularities and activation sparsity from a real forward pass.

Granularities follow Mao et al., "Exploring the granularity of sparsity in CNNs" (2017) and SSL
(Wen et al., NIPS 2016), on Caffe's lowered weight: group ``k`` of a conv is the
``(Cout/g) x (Cin/g kh kw)`` matrix ``W_k`` (rows: filters, columns: (input channel, i, j)).

- element: fraction of zero weights.
- filter: fraction of output channels (rows of ``W_k``) that are entirely zero.
- channel: fraction of input channels, per group, whose ``kh x kw`` slices are zero in every filter of
  the group (a block of ``kh kw`` columns of ``W_k``).
- kernel shape: fraction of columns of ``W_k`` (one (c, i, j) position) that are zero in every filter
  of the group (SSL's "filter shape" sparsity).

A Linear weight ``(out, in)`` is a 1x1 conv with one group: filter = zero rows, and channel and kernel
shape both = zero columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sparsecnn.errors import SparseCNNError
from sparsecnn.models._memory import forward_guard

__all__ = ["ActivationStats", "WeightSparsity", "activation_stats", "weight_sparsity"]


@dataclass(frozen=True)
class WeightSparsity:
    """Sparsity of one weight tensor; every field is a fraction in [0, 1]."""

    element: float  # zero weights / weights
    filter: float  # all-zero output channels / output channels
    channel: float  # all-zero (group, input channel) pairs / (groups * Cin/g)
    kernel_shape: float  # all-zero lowered columns / (groups * Cin/g * kh * kw)


def _as_array(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().cpu().numpy()
    return np.asarray(weight)


def weight_sparsity(weight: torch.Tensor | np.ndarray, groups: int = 1) -> WeightSparsity:
    """Sparsity of a conv or linear weight at element, filter, channel and kernel-shape granularity.

    Parameters
    ----------
    weight : Tensor or ndarray, shape (Cout, Cin/g, kh, kw) or (out, in)
        A conv weight (PyTorch/Caffe layout) or a Linear weight.
    groups : int
        The conv's groups ``g`` (1 for a Linear weight).

    Returns
    -------
    WeightSparsity
    """
    w = _as_array(weight)
    if w.ndim == 2:
        w = w[:, :, None, None]
    if w.ndim != 4 or w.size == 0:
        raise SparseCNNError(f"weight_sparsity needs a non-empty 2-D or 4-D weight, got shape {w.shape}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or w.shape[0] % groups:
        raise SparseCNNError(
            f"groups = {groups!r} does not divide Cout = {w.shape[0]}; pass the layer's groups"
        )
    c_out, c_in_g, kh, kw = w.shape
    zero = (w == 0).reshape(groups, c_out // groups, c_in_g, kh * kw)
    return WeightSparsity(
        element=float(zero.mean()),
        filter=float(zero.all(axis=(2, 3)).mean()),
        channel=float(zero.all(axis=(1, 3)).mean()),
        kernel_shape=float(zero.all(axis=1).mean()),
    )


@dataclass(frozen=True)
class ActivationStats:
    """What one layer saw during a forward pass."""

    input_shape: tuple[int, ...]  # shape of the layer's input at the first call, batch dimension first
    output_shape: tuple[int, ...]  # shape of its output at the first call
    zeros: int  # exact zeros in its inputs, summed over calls
    elements: int  # input elements, summed over calls

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros in the layer's input."""
        return self.zeros / self.elements if self.elements else 0.0


@contextmanager
def _hooks(layers: dict[str, nn.Module], record: Callable[[str, torch.Tensor, torch.Tensor], None]
           ) -> Iterator[None]:
    handles = []
    try:
        for name, module in layers.items():
            # Counting in a forward hook is safe: conv/linear do not modify their input, and later
            # in-place ops (ReLU(inplace=True)) act on the output of a later layer, after this hook.
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: record(name, args[0], out)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_stats(model: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module] | None = None
                     ) -> dict[str, ActivationStats]:
    """Run ``model`` in eval mode on ``x`` and record each layer's input sparsity and shapes.

    Parameters
    ----------
    model : torch.nn.Module
        Its training/eval mode is restored afterwards.
    x : Tensor, shape (N, C, H, W)
        The input batch.
    layers : dict of str to Module, optional
        The layers to watch (default: every Conv2d and Linear).

    Returns
    -------
    dict[str, ActivationStats]
        In the order of ``layers``; a layer the forward pass never called is missing.
    """
    if layers is None:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    seen: dict[str, list] = {}

    def record(name: str, inp: torch.Tensor, out: torch.Tensor) -> None:
        zeros, numel = int((inp == 0).sum()), inp.numel()
        if name in seen:
            seen[name][2] += zeros
            seen[name][3] += numel
        else:
            seen[name] = [tuple(inp.shape), tuple(out.shape), zeros, numel]

    was_training = model.training
    model.eval()
    try:
        with _hooks(layers, record), forward_guard(model, "use a smaller batch or input size"):
            model(x)
    except (RuntimeError, MemoryError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, MemoryError) or "allocate" in first or "out of memory" in first:
            raise SparseCNNError(
                f"the model ran out of memory on an input of shape {tuple(x.shape)} ({first}); "
                f"use a smaller batch or input size"
            ) from None
        raise SparseCNNError(
            f"the model failed on an input of shape {tuple(x.shape)} ({first}); "
            f"give an input that matches the model's input shape"
        ) from None
    finally:
        model.train(was_training)
    return {n: ActivationStats(*seen[n]) for n in layers if n in seen}
