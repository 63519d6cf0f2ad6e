"""Published per-layer sparsity profiles and magnitude pruning to a profile.

A profile maps layer names (as in ``model.named_modules()``) to the fraction of that layer's weights
that is pruned (set to zero). The published profiles are for AlexNet:

- ``deep-compression``: Han, Mao & Dally, "Deep Compression", ICLR 2016 (arXiv 2015), table 4.
- ``ssl``: Wen et al., "Learning structured sparsity in deep neural networks", NIPS 2016, as quoted by
  the seed study (conv layers only). Applied *structured*, as SSL's results are: whole kernel-shape
  columns of the lowered weight (Caffe order ``(c, i, j)`` per group) first, then whole filters, by
  group L2 norm (:func:`apply_structured`).
- ``ssl-unstructured``: the same per-layer fractions by element magnitude, to compare structured and
  unstructured zeros at the same zero count.
- ``uniform:S``: the fraction S in [0, 1] for every Conv2d and Linear layer of any model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from sparsecnn.errors import SparseCNNError

__all__ = ["PROFILES", "STRUCTURED_PROFILES", "apply_profile", "apply_structured", "get_profile",
           "prunable_layers"]

PROFILES: dict[str, dict[str, float]] = {
    "deep-compression": {
        "conv1": 0.16, "conv2": 0.62, "conv3": 0.65, "conv4": 0.63, "conv5": 0.63,
        "fc6": 0.91, "fc7": 0.91, "fc8": 0.75,
    },
    "ssl": {"conv1": 0.14, "conv2": 0.54, "conv3": 0.72, "conv4": 0.68, "conv5": 0.58},
    "ssl-unstructured": {"conv1": 0.14, "conv2": 0.54, "conv3": 0.72, "conv4": 0.68, "conv5": 0.58},
}

# Profiles applied as whole groups (columns, then filters) rather than single weights.
STRUCTURED_PROFILES: frozenset[str] = frozenset({"ssl"})


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
        ``"deep-compression"``, ``"ssl"``, ``"ssl-unstructured"`` or ``"uniform:S"`` with S in [0, 1].
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
    """Prune ``model`` in place to a per-layer profile.

    A profile in :data:`STRUCTURED_PROFILES` (``ssl``) removes whole groups, see
    :func:`apply_structured`. Any other profile is magnitude pruning: in each layer the
    ``round(frac * numel)`` weights of smallest magnitude are set to zero; biases are untouched. Ties
    in magnitude are broken by position (lower flat index pruned first), so the result is
    deterministic. Layers the profile does not name are left alone.

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
    if isinstance(profile, str) and profile in STRUCTURED_PROFILES:
        return apply_structured(model, fractions)
    layers = prunable_layers(model)
    achieved: dict[str, float] = {}
    for name, frac in fractions.items():
        weight = layers[name].weight
        magnitude = weight.detach().reshape(-1).abs().numpy()
        _check_finite_weights(name, magnitude)
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


def _check_finite_weights(name: str, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise SparseCNNError(
            f"layer {name!r} has NaN or infinite weights; fix or reload the weights before pruning"
        )


def _lowest(norms: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``norms`` (g, n): a boolean mask of its ``k`` smallest entries (ties: lower index)."""
    order = np.argsort(norms, axis=1, kind="stable")[:, :k]
    out = np.zeros(norms.shape, dtype=bool)
    np.put_along_axis(out, order, True, axis=1)
    return out


@torch.no_grad()
def apply_structured(model: nn.Module, profile: Mapping[str, float]) -> dict[str, float]:
    """Prune ``model`` in place to a per-layer profile by removing whole groups (SSL's structure).

    A conv weight ``(Cout, Cin/g, kh, kw)`` is seen as Caffe's lowered matrix per group,
    ``W_k`` of shape ``(Cout/g, K)`` with ``K = Cin/g kh kw`` (columns in ``(c, i, j)`` order); a Linear
    ``(out, in)`` as one group with ``K = in``. For a pruned fraction ``f`` of a layer:

    1. columns: in every group the ``K - ceil(K sqrt(1 - f))`` columns of smallest L2 norm are zeroed
       (kernel-shape sparsity; a channel whose ``kh kw`` columns all go is a removed input channel);
    2. filters: then in every group the fewest rows of smallest L2 norm (of what is left) are zeroed
       so that at least ``round(f * numel)`` weights are zero, and the removed filters' biases are
       zeroed with them (a removed filter is a removed output channel, its bias included).

    The columns and filters are split as ``sqrt(1 - f)`` of each kept, so the compact GEMM is about
    ``(1 - f)`` of the dense one. The same number of groups is removed in every group of a grouped
    conv, so the compact layer keeps equal groups. At least one column and one filter of each group
    are kept. Ties in norm go to the lower index, so the result is deterministic.

    Parameters
    ----------
    model : torch.nn.Module
        Modified in place.
    profile : Mapping[str, float]
        Layer name -> pruned fraction in [0, 1] (checked against the model).

    Returns
    -------
    dict[str, float]
        Layer name -> achieved fraction of exact zeros in its weight (at least the requested one,
        unless keeping one column and filter per group caps it).
    """
    fractions = _check_profile("profile", profile, model)
    layers = prunable_layers(model)
    achieved: dict[str, float] = {}
    for name, frac in fractions.items():
        layer = layers[name]
        weight = layer.weight
        groups = getattr(layer, "groups", 1)
        w = weight.detach().cpu().numpy().reshape(groups, weight.shape[0] // groups, -1).copy()
        _check_finite_weights(name, w)
        g, mg, k = w.shape
        target = round(frac * w.size)
        if target > int((w == 0).sum()):
            keep_cols = min(k, max(1, math.ceil(k * math.sqrt(1.0 - frac) - 1e-9)))
            w[_lowest(np.linalg.norm(w, axis=1), k - keep_cols)[:, None, :].repeat(mg, axis=1)] = 0.0
            removed_rows = np.zeros((g, mg), dtype=bool)
            if int((w == 0).sum()) < target:
                row_norm = np.linalg.norm(w, axis=2)  # (g, mg), of the kept columns
                order = np.argsort(row_norm, axis=1, kind="stable")
                nz_rows = (w != 0).sum(axis=2)
                # zeros gained by removing the r weakest rows of every group
                gain = np.cumsum(np.take_along_axis(nz_rows, order, axis=1).sum(axis=0))
                need = target - int((w == 0).sum())
                r = min(mg - 1, int(np.searchsorted(gain, need)) + 1)
                removed_rows = _lowest(row_norm, r)
            w[removed_rows] = 0.0
            weight.copy_(torch.from_numpy(w.reshape(weight.shape)).to(weight.dtype))
            if layer.bias is not None:
                layer.bias[torch.from_numpy(removed_rows.reshape(-1))] = 0.0
        achieved[name] = float((weight == 0).sum().item()) / weight.numel()
    return achieved
