"""The engine's sparse layers as data: their format arrays out, and the layers rebuilt from them.

:mod:`sparsecnn.layers` builds a :class:`~sparsecnn.layers.SparseConv2d` / ``SparseLinear`` from a dense
layer (``from_dense``) or from a format built earlier (``from_format``, which validates the format
against the strategy and geometry). A checkpoint stores the built format, and :func:`rebuild_layer`
hands it back to ``from_format``. :func:`dense_module` turns any sparse layer back into its dense
equivalent (for ONNX export).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsecnn.errors import SparseCNNError

__all__ = ["dense_module", "dense_weight", "format_from_parts", "format_parts", "is_sparse", "rebuild_layer"]


def _layers():
    from sparsecnn import layers

    return layers


def is_sparse(module: nn.Module) -> bool:
    L = _layers()
    return isinstance(module, (L.SparseConv2d, L.SparseLinear))


def _format_classes() -> dict[str, type]:
    from sparsecnn.formats import BSRMatrix, CSRMatrix
    from sparsecnn.kernels.conv import DirectConvPrep
    from sparsecnn.kernels.qspmv import QuantLinearPrep
    from sparsecnn.kernels.spconv_input import SpconvPrep
    from sparsecnn.kernels.spmv import LinearPrep
    from sparsecnn.kernels.spmv_act import ActLinearPrep

    return {
        c.__name__: c for c in (CSRMatrix, BSRMatrix, _layers().LoweredWeight, DirectConvPrep, LinearPrep,
                                ActLinearPrep, QuantLinearPrep, SpconvPrep)
    }


def format_parts(fmt: Any) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """``(class name, scalar fields, array fields)`` of a format (a dense ndarray is class ``ndarray``)."""
    if isinstance(fmt, np.ndarray):
        return "ndarray", {}, {"array": fmt}
    name = type(fmt).__name__
    if name not in _format_classes() or not dataclasses.is_dataclass(fmt):
        raise SparseCNNError(f"cannot store a sparse format of type {name}")
    scalars: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for f in dataclasses.fields(fmt):
        if f.name.startswith("_"):
            continue  # caches (workspaces), rebuilt on use
        value = getattr(fmt, f.name)
        if isinstance(value, np.ndarray):
            arrays[f.name] = value
        else:
            scalars[f.name] = list(value) if isinstance(value, tuple) else value
    return name, scalars, arrays


def format_from_parts(name: str, scalars: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    """Inverse of :func:`format_parts`. The format is not validated here: ``from_format`` does that
    against the layer it is for (:func:`rebuild_layer`)."""
    if name == "ndarray":
        return np.ascontiguousarray(arrays["array"])
    classes = _format_classes()
    if name not in classes:
        raise SparseCNNError(f"unknown sparse format {name!r}")
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in scalars.items()}
    kwargs.update({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    try:
        return classes[name](**kwargs)
    except TypeError as exc:
        raise SparseCNNError(f"stored {name} has the wrong fields ({exc})") from None


# ------------------------------------------------------------------------------------------------


def _cpu_only(layer: nn.Module) -> None:
    if layer.device.type != "cpu":
        raise SparseCNNError(
            f"layer {layer.name!r} runs on {layer.device}; only CPU sparse layers are supported"
        )


def dense_weight(layer: nn.Module) -> tuple[np.ndarray, np.ndarray | None]:
    """The dense weight and bias a SparseConv2d / SparseLinear computes with (float32 copies)."""
    _cpu_only(layer)
    return layer.dense_parameters()


def dense_module(layer: nn.Module) -> nn.Module:
    """An ``nn.Conv2d`` / ``nn.Linear`` computing what the sparse layer computes."""
    L = _layers()
    w, b = dense_weight(layer)
    if isinstance(layer, L.SparseLinear):
        m: nn.Module = nn.utils.skip_init(
            nn.Linear, layer.in_features, layer.out_features, bias=b is not None
        )
    else:
        m = nn.utils.skip_init(
            nn.Conv2d,
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=b is not None,
        )
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w))
        if b is not None:
            m.bias.copy_(torch.from_numpy(b))
    return m


# ------------------------------------------------------------------------------------------------


def layer_spec(layer: nn.Module) -> dict[str, Any]:
    """JSON-able geometry of a sparse layer (what its dense equivalent's constructor takes)."""
    L = _layers()
    if isinstance(layer, L.SparseLinear):
        return {
            "kind": "linear",
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.has_bias,
        }
    return {
        "kind": "conv",
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": list(layer.kernel_size),
        "stride": list(layer.stride),
        "padding": list(layer.padding),
        "dilation": list(layer.dilation),
        "groups": layer.groups,
        "bias": layer.has_bias,
    }


def rebuild_layer(
    spec: dict[str, Any],
    strategy: str,
    name: str,
    fmt: Any,
    bias: np.ndarray | None,
    conversion_seconds: float,
) -> nn.Module:
    """A SparseConv2d / SparseLinear from its stored format (``from_format``, which validates it).

    ``spec`` is :func:`layer_spec`'s record; for strategy ``torch`` ``fmt`` is the dense weight.
    """
    L = _layers()
    if spec["kind"] == "linear":
        return L.SparseLinear.from_format(
            fmt, strategy, in_features=int(spec["in_features"]), out_features=int(spec["out_features"]),
            bias=bias, name=name, conversion_seconds=conversion_seconds,
        )
    if spec["kind"] != "conv":
        raise SparseCNNError(f"layer {name!r}: unknown layer kind {spec['kind']!r}")
    return L.SparseConv2d.from_format(
        fmt, strategy,
        in_channels=int(spec["in_channels"]), out_channels=int(spec["out_channels"]),
        kernel_size=tuple(spec["kernel_size"]), stride=tuple(spec["stride"]),
        padding=tuple(spec["padding"]), dilation=tuple(spec["dilation"]), groups=int(spec["groups"]),
        bias=bias, name=name, conversion_seconds=conversion_seconds,
    )
