"""Published per-layer sparsity profiles and magnitude pruning to a profile.

A profile maps layer names (as in ``model.named_modules()``) to the fraction of that layer's weights
that is pruned (set to zero). The published profiles are for AlexNet:

- ``deep-compression``: Han, Mao & Dally, "Deep Compression", ICLR 2016 (arXiv 2015), table 4.
- ``ssl``: Wen et al., "Learning structured sparsity in deep neural networks", NIPS 2016, as quoted by
  the seed study (conv layers only).
- ``uniform:S``: the fraction S in [0, 1] for every Conv2d and Linear layer of any model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from sparsecnn.errors import SparseCNNError

__all__ = ["PROFILES", "apply_profile", "get_profile", "prunable_layers"]

PROFILES: dict[str, dict[str, float]] = {
    "deep-compression": {
        "conv1": 0.16, "conv2": 0.62, "conv3": 0.65, "conv4": 0.63, "conv5": 0.63,
        "fc6": 0.91, "fc7": 0.91, "fc8": 0.75,
    },
    "ssl": {"conv1": 0.14, "conv2": 0.54, "conv3": 0.72, "conv4": 0.68, "conv5": 0.58},
}


def prunable_layers(model: nn.Module) -> dict[str, nn.Conv2d | nn.Linear]:
    """The model's Conv2d and Linear layers by name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _check_fraction(where: str, layer: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise SparseCNNError(
            f"{where}: layer {layer!r} has pruned fraction {value!r}, outside [0, 1]; "
            f"give the fraction of weights to zero, e.g. 0.9 for 90%"
        )
    return float(value)


def _check_profile(where: str, profile: Mapping[str, object], model: nn.Module) -> dict[str, float]:
    layers = prunable_layers(model)
    out: dict[str, float] = {}
    for layer, value in profile.items():
        if layer not in layers:
            raise SparseCNNError(
                f"{where} names layer {layer!r}, which the model lacks (its conv/linear layers: "
                f"{', '.join(layers) or 'none'}); use a profile made for this model, or uniform:S"
            )
        out[layer] = _check_fraction(where, layer, value)
    return out


def get_profile(spec: str, model: nn.Module) -> dict[str, float]:
    """The per-layer pruned fractions of profile ``spec`` for ``model``, checked against the model.

    Parameters
    ----------
    spec : str
        ``"deep-compression"``, ``"ssl"`` or ``"uniform:S"`` with S in [0, 1].
    model : torch.nn.Module
        The model the profile is for; every layer the profile names must be a Conv2d or Linear in it.

    Returns
    -------
    dict[str, float]
        Layer name -> fraction of its weights to prune.
    """
    if not isinstance(spec, str):
        raise SparseCNNError(
            f"profile must be a string or a mapping of layer names to fractions, got {spec!r}"
        )
    if spec.startswith("uniform:"):
        text = spec[len("uniform:"):]
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise SparseCNNError(
                f"malformed profile {spec!r}: S in uniform:S must be a number in [0, 1], e.g. uniform:0.9"
            )
        return dict.fromkeys(prunable_layers(model), value)
    if spec not in PROFILES:
        raise SparseCNNError(
            f"unknown profile {spec!r}; choose one of {', '.join(sorted(PROFILES))} "
            f"or uniform:S (S in [0, 1])"
        )
    return _check_profile(f"profile {spec!r}", PROFILES[spec], model)


@torch.no_grad()
def apply_profile(model: nn.Module, profile: str | Mapping[str, float]) -> dict[str, float]:
    """Magnitude-prune ``model`` in place to a per-layer profile.

    In each layer the ``round(frac * numel)`` weights of smallest magnitude are set to zero; biases
    are untouched. Ties in magnitude are broken by position (lower flat index pruned first), so the
    result is deterministic. Layers the profile does not name are left alone.

    Parameters
    ----------
    model : torch.nn.Module
        Modified in place.
    profile : str or Mapping[str, float]
        A spec for :func:`get_profile`, or layer name -> pruned fraction.

    Returns
    -------
    dict[str, float]
        Layer name -> achieved fraction of exact zeros in its weight (at least the requested one;
        more where the weight already held more zeros).
    """
    fractions = (
        get_profile(profile, model) if isinstance(profile, str)
        else _check_profile("profile", profile, model) if isinstance(profile, Mapping)
        else get_profile(profile, model)  # raises the type error message
    )
    layers = prunable_layers(model)
    achieved: dict[str, float] = {}
    for name, frac in fractions.items():
        weight = layers[name].weight
        magnitude = weight.detach().reshape(-1).abs().numpy()
        if not np.isfinite(magnitude).all():
            raise SparseCNNError(
                f"layer {name!r} has NaN or infinite weights; fix or reload the weights before pruning"
            )
        k = round(frac * magnitude.size)
        if k > 0:
            weight.view(-1)[torch.from_numpy(_smallest(magnitude, k))] = 0.0
        achieved[name] = float((weight == 0).sum().item()) / weight.numel()
    return achieved


def _smallest(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the ``k`` smallest entries; among equal values the lower index comes first.

    Equal to ``argsort(magnitude, stable)[:k]`` but O(n): a selection finds the k-th value, then all
    smaller entries and the first few equal to it are taken.
    """
    kth = np.partition(magnitude, k - 1)[k - 1]
    below = np.flatnonzero(magnitude < kth)
    ties = np.flatnonzero(magnitude == kth)[: k - below.size]
    return np.concatenate([below, ties])
