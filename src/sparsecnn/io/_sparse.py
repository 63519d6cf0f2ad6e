"""The engine's sparse layers as data: their format arrays out, and the layers rebuilt from them.

:mod:`sparsecnn.layers` builds a :class:`~sparsecnn.layers.SparseConv2d` / ``SparseLinear`` from a dense
layer (the conversion). A checkpoint stores the built format instead, so loading must rebuild the
layer *from* the format. The engines' constructors take dense weights, so :func:`rebuild_layer` creates
each engine with ``__new__`` and sets what its constructor would have derived from the format (the
tests round-trip every strategy, which catches any drift from ``layers.py``). :func:`dense_weight`
turns any sparse layer back into its dense weight (for ONNX export).
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
    from sparsecnn.kernels.spmv import LinearPrep

    return {
        c.__name__: c for c in (CSRMatrix, BSRMatrix, _layers().LoweredWeight, DirectConvPrep, LinearPrep)
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
    """Inverse of :func:`format_parts`; the format's own checks run where it has them."""
    if name == "ndarray":
        return np.ascontiguousarray(arrays["array"])
    classes = _format_classes()
    if name not in classes:
        raise SparseCNNError(f"unknown sparse format {name!r}")
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in scalars.items()}
    kwargs.update({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    try:
        fmt = classes[name](**kwargs)
    except TypeError as exc:
        raise SparseCNNError(f"stored {name} has the wrong fields ({exc})") from None
    check = getattr(fmt, "check_format", None)
    if callable(check):
        check()
    else:  # the kernels' prepared CSR forms have no checker: the kernels index with these unchecked
        rows = fmt.shape[0] if name == "LinearPrep" else fmt.weight_shape[0]
        cols = fmt.shape[1] if name == "LinearPrep" else int(np.prod(fmt.weight_shape[1:]))
        _check_csr(name, fmt.indptr, fmt.indices, fmt.data, rows, cols)
    return fmt


def _check_csr(
    name: str, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: int, cols: int
) -> None:
    def bad(why: str) -> SparseCNNError:
        return SparseCNNError(f"stored {name} is invalid: {why}")

    for arr, what in ((indptr, "indptr"), (indices, "indices")):
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise bad(f"{what} must be a 1-D integer array")
    if data.ndim != 1 or data.dtype != np.float32:
        raise bad("data must be a 1-D float32 array")
    if indptr.size != rows + 1 or indptr[0] != 0 or indptr[-1] != data.size or indices.size != data.size:
        raise bad(f"indptr/indices/data sizes do not fit {rows} rows and {data.size} nonzeros")
    if (np.diff(indptr.astype(np.int64)) < 0).any():
        raise bad("indptr decreases")
    if indices.size and (indices.min() < 0 or indices.max() >= cols):
        raise bad(f"column indices outside [0, {cols})")
    if indices.size > 1:  # sorted within each row
        step = np.diff(indices.astype(np.int64))
        row_starts = indptr[1:-1].astype(np.int64)
        ok = step > 0
        ok[row_starts[(row_starts > 0) & (row_starts < indices.size)] - 1] = True
        if not ok.all():
            raise bad("column indices are not strictly increasing within a row")


# ------------------------------------------------------------------------------------------------


def dense_weight(layer: nn.Module) -> tuple[np.ndarray, np.ndarray | None]:
    """The dense weight and bias a SparseConv2d / SparseLinear computes with (float32 copies)."""
    L = _layers()
    eng = layer.engine
    if layer.device.type != "cpu":
        raise SparseCNNError(
            f"layer {layer.name!r} runs on {layer.device}; only CPU sparse layers are supported"
        )
    if isinstance(layer, L.SparseLinear):
        if layer.strategy == "torch":
            return _module_weights(eng.linear)
        fmt = eng.format
        if isinstance(fmt, np.ndarray):
            w = fmt.copy()
            bias = None if eng.bias_t is None else eng.bias_t.numpy().copy()
        else:
            w = _csr_dense(fmt.indptr, fmt.indices, fmt.data, fmt.shape)
            bias = None if eng.bias is None else np.array(eng.bias, np.float32)
        return w, bias
    if layer.strategy == "torch":
        return _module_weights(eng.conv)
    s = layer.spec
    wshape = (s.out_channels, s.in_channels // s.groups, *s.kernel_size)
    fmt = eng.format
    g, mg, k = s.groups, s.m_group, s.k
    if layer.strategy == "dense":
        w = fmt.reshape(s.out_channels, k)
    elif layer.strategy in ("csrmm", "spgemm"):
        w = fmt.to_dense()
    elif layer.strategy == "bsr":
        w = fmt.to_dense()
        if w.shape[0] != s.out_channels:  # rows padded per group to a multiple of R
            w = w.reshape(g, -1, k)[:, :mg].reshape(s.out_channels, k)
    elif layer.strategy == "lowered":
        w = np.zeros((s.out_channels, k), np.float32)
        for i in range(g):
            rows = fmt.row_map[i] >= 0
            cols = fmt.col_index[i] >= 0
            w[np.ix_(fmt.row_map[i][rows], fmt.col_index[i][cols])] = fmt.data[i][np.ix_(rows, cols)]
    elif layer.strategy == "direct":
        w = _csr_dense(fmt.indptr, fmt.indices, fmt.data, (s.out_channels, k))
    else:
        raise SparseCNNError(f"layer {layer.name!r}: unknown strategy {layer.strategy!r}")
    bias = np.array(eng.bias, np.float32) if eng.has_bias else None
    return np.ascontiguousarray(w.reshape(wshape), dtype=np.float32), bias


def _module_weights(m: nn.Module) -> tuple[np.ndarray, np.ndarray | None]:
    w = m.weight.detach().cpu().numpy().copy()
    return w, None if m.bias is None else m.bias.detach().cpu().numpy().copy()


def _csr_dense(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    rows = np.repeat(np.arange(shape[0]), np.diff(indptr.astype(np.int64)))
    out[rows, indices.astype(np.int64)] = data
    return out


def dense_module(layer: nn.Module) -> nn.Module:
    """An ``nn.Conv2d`` / ``nn.Linear`` computing what the sparse layer computes."""
    L = _layers()
    w, b = dense_weight(layer)
    if isinstance(layer, L.SparseLinear):
        m: nn.Module = nn.utils.skip_init(
            nn.Linear, layer.in_features, layer.out_features, bias=b is not None
        )
    else:
        s = layer.spec
        m = nn.utils.skip_init(
            nn.Conv2d,
            s.in_channels,
            s.out_channels,
            s.kernel_size,
            stride=s.stride,
            padding=s.padding,
            dilation=s.dilation,
            groups=s.groups,
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
        has_bias = dense_bias_present(layer)
        return {
            "kind": "linear",
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": has_bias,
        }
    s = layer.spec
    return {
        "kind": "conv",
        "in_channels": s.in_channels,
        "out_channels": s.out_channels,
        "kernel_size": list(s.kernel_size),
        "stride": list(s.stride),
        "padding": list(s.padding),
        "dilation": list(s.dilation),
        "groups": s.groups,
        "bias": dense_bias_present(layer),
    }


def dense_bias_present(layer: nn.Module) -> bool:
    eng = layer.engine
    if layer.strategy == "torch":
        return (eng.linear if hasattr(eng, "linear") else eng.conv).bias is not None
    if hasattr(eng, "has_bias"):
        return bool(eng.has_bias)
    if hasattr(eng, "bias_t"):
        return eng.bias_t is not None
    return eng.bias is not None


def _expect(name: str, what: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise SparseCNNError(
            f"layer {name!r}: stored {what} has shape {tuple(got)}, the layer needs {tuple(want)}"
        )


def _check_conv_format(name: str, strategy: str, cs: Any, fmt: Any) -> None:
    g, mg, k = cs.groups, cs.m_group, cs.k
    if strategy == "dense":
        _expect(name, "dense weight", fmt.shape, (g, mg, k))
        if fmt.dtype != np.float32:
            raise SparseCNNError(f"layer {name!r}: stored dense weight is {fmt.dtype}, not float32")
    elif strategy in ("csrmm", "spgemm"):
        _expect(name, "CSRMatrix", fmt.shape, (cs.out_channels, k))
    elif strategy == "bsr":
        r = fmt.blocksize[0]
        rows = g * (-(-mg // r) * r) if g > 1 and mg % r else cs.out_channels
        _expect(name, "BSRMatrix", fmt.shape, (rows, k))
    elif strategy == "lowered":
        _expect(name, "LoweredWeight", fmt.shape, (cs.out_channels, k))
        if fmt.data.shape[0] != g:
            raise SparseCNNError(
                f"layer {name!r}: stored LoweredWeight has {fmt.data.shape[0]} groups, not {g}"
            )
    elif strategy == "direct":
        _expect(
            name, "DirectConvPrep", fmt.weight_shape, (cs.out_channels, cs.in_channels // g, *cs.kernel_size)
        )
        if (fmt.groups, fmt.stride, fmt.padding, fmt.dilation) != (g, cs.stride, cs.padding, cs.dilation):
            raise SparseCNNError(f"layer {name!r}: stored DirectConvPrep geometry does not match the layer")


def rebuild_layer(
    spec: dict[str, Any],
    strategy: str,
    name: str,
    fmt: Any,
    bias: np.ndarray | None,
    dense: nn.Module | None,
    conversion_seconds: float,
) -> nn.Module:
    """A SparseConv2d / SparseLinear from its stored format, without converting from dense.

    ``dense`` is the layer's ``torch`` module (strategy ``torch`` only, whose weights are dense).
    """
    L = _layers()
    cpu = torch.device("cpu")
    if spec["kind"] == "linear":
        if strategy == "torch":
            eng: Any = L._TorchLinear(dense)
        elif strategy == "dense":
            _expect(name, "dense weight", fmt.shape, (int(spec["out_features"]), int(spec["in_features"])))
            eng = L._DenseLinear(
                np.ascontiguousarray(fmt, dtype=np.float32), bias
            )  # the format is the weight
        elif strategy in ("spmv", "spmm"):
            _expect(
                name, "LinearPrep", tuple(fmt.shape), (int(spec["out_features"]), int(spec["in_features"]))
            )
            eng = L._SparseLinear.__new__(L._SparseLinear)
            eng.format, eng.nbytes, eng.bias, eng.m = fmt, int(fmt.nbytes), bias, int(fmt.shape[0])
        else:
            raise SparseCNNError(f"layer {name!r}: unknown linear strategy {strategy!r}")
        return L.SparseLinear(
            eng, int(spec["in_features"]), int(spec["out_features"]), strategy, name, cpu, conversion_seconds
        )
    cs = L._ConvSpec(
        int(spec["in_channels"]),
        int(spec["out_channels"]),
        tuple(spec["kernel_size"]),
        tuple(spec["stride"]),
        tuple(spec["padding"]),
        tuple(spec["dilation"]),
        int(spec["groups"]),
    )
    if strategy == "torch":
        eng = L._TorchConv(dense)
    else:
        classes = {
            "dense": L._DenseConv,
            "csrmm": L._CsrConv,
            "spgemm": L._SpgemmConv,
            "bsr": L._BsrConv,
            "lowered": L._LoweredConv,
            "direct": L._DirectConv,
        }
        if strategy not in classes:
            raise SparseCNNError(f"layer {name!r}: unknown conv strategy {strategy!r}")
        _check_conv_format(name, strategy, cs, fmt)
        if bias is not None:
            _expect(name, "bias", bias.shape, (cs.out_channels,))
        eng = classes[strategy].__new__(classes[strategy])
        L._ConvEngine.__init__(eng, cs, bias)
        eng.format, eng.nbytes = fmt, int(fmt.nbytes)
        bias_t = torch.from_numpy(eng.bias).view(1, -1, 1, 1)
        if strategy == "dense":
            eng.weight_t, eng.bias_t = torch.from_numpy(fmt), bias_t
        elif strategy == "bsr":
            r = int(fmt.blocksize[0])
            eng.m_pad = -(-cs.m_group // r) * r
        elif strategy == "lowered":
            _, mr, kr = fmt.data.shape
            eng.empty = mr == 0 or kr == 0
            eng.all_rows = mr == cs.m_group and bool((fmt.row_map >= 0).all())
            eng.weight_t, eng.bias_t = torch.from_numpy(fmt.data), bias_t
    return L.SparseConv2d(eng, cs, strategy, name, cpu, conversion_seconds)
