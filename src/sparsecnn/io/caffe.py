"""Caffe models in: a deploy ``.prototxt`` (and ``.caffemodel`` weights) -> an equivalent torch module.

Both files are read with the ``protobuf`` library against :mod:`sparsecnn.io._caffe_schema` (the
messages of BVLC ``caffe.proto`` the importer needs, with their field numbers). Nets in the current
``layer`` layout and the legacy V1 ``layers`` layout are read; weights are matched to layers by name,
as Caffe's ``CopyTrainedLayersFrom`` does, so a V1 ``.caffemodel`` (BVLC AlexNet) loads into a current
deploy prototxt.

Supported layer types and their torch equivalents:

=============  ====================================================================================
Input          network input (also the legacy ``input`` + ``input_shape`` / ``input_dim`` fields)
Convolution    ``nn.Conv2d`` (kernel/stride/pad, their ``_h``/``_w`` forms, dilation, group, bias_term)
InnerProduct   ``nn.Linear`` on the input flattened from ``axis`` (``transpose`` weights handled)
ReLU           ``nn.ReLU`` (``nn.LeakyReLU`` for a nonzero ``negative_slope``)
Pooling        MAX / AVE with Caffe's output size (ceil rounding, last window starting inside the
               input + pad), ``round_mode: FLOOR``, ``global_pooling``
LRN            ``ACROSS_CHANNELS``: ``nn.LocalResponseNorm(local_size, alpha, beta, k)`` (Caffe also
               divides alpha by local_size)
Dropout        ``nn.Dropout`` (identity at inference; Caffe scales during training)
Softmax        ``nn.Softmax(axis)``
Concat         concatenation along ``axis`` (or legacy ``concat_dim``)
Eltwise        SUM (with ``coeff``), PROD, MAX
BatchNorm      ``nn.BatchNorm1d/2d`` without affine; running statistics = blobs 0 and 1 divided by
               the scale factor blob 2 (0 -> 0), ``eps``; ``use_global_stats: false`` -> batch stats
Scale          per-channel factor and optional bias (``bias_term``) along axis 1
Flatten        ``nn.Flatten(axis, end_axis)``
=============  ====================================================================================

Layers are filtered by Caffe's ``include`` / ``exclude`` rules for the TEST phase (the net's
``state`` if it has one), so a train_val prototxt's TRAIN-only layers are skipped. Any other layer type
is a :class:`SparseCNNError` naming the layer and its type; so are unreadable files and blobs whose
shape does not fit their layer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from torch import nn

from sparsecnn.errors import SparseCNNError
from sparsecnn.io import _caffe_schema as pb
from sparsecnn.io._graph import ChannelScale, Concat, Eltwise, GraphNet, Step, safe_name
from sparsecnn.models.zoo import LocalResponseNorm, MaxPool2d

__all__ = ["SUPPORTED_LAYERS", "load_caffe", "read_caffemodel", "read_prototxt"]

# The most elements a tensor built from a prototxt alone may have (no weights file bounds it): 2**31
# floats = 8 GiB, far above any real layer, but it stops a corrupt num_output from allocating terabytes.
_MAX_NUMEL = 2**31

Shape = tuple[int, ...]


def _read_bytes(path: str | os.PathLike[str], what: str) -> bytes:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SparseCNNError(f"{what} {path} does not exist")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SparseCNNError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_prototxt(path: str | os.PathLike[str]) -> Any:
    """Parse a Caffe net definition in protobuf text format into a ``NetParameter`` message."""
    data = _read_bytes(path, "prototxt")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SparseCNNError(
            f"prototxt {os.fspath(path)} is not text (is it a binary .caffemodel? pass that as the weights)"
        ) from None
    net = pb.NetParameter()
    try:
        text_format.Parse(text, net, allow_unknown_field=True)
    except text_format.ParseError as exc:
        raise SparseCNNError(
            f"prototxt {os.fspath(path)} is not a valid Caffe net definition: {exc}"
        ) from None
    except (RecursionError, ValueError, TypeError) as exc:  # pathological nesting or numbers
        raise SparseCNNError(f"prototxt {os.fspath(path)} cannot be parsed: {exc}") from None
    return net


def read_caffemodel(path: str | os.PathLike[str]) -> Any:
    """Parse a binary ``.caffemodel`` (a serialised ``NetParameter``)."""
    data = _read_bytes(path, "caffemodel")
    net = pb.NetParameter()
    try:
        net.ParseFromString(data)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise SparseCNNError(
            f"caffemodel {os.fspath(path)} is truncated or not a Caffe binary NetParameter "
            f"({exc or 'decode error'})"
        ) from None
    if not net.layer and not net.layers:
        raise SparseCNNError(f"caffemodel {os.fspath(path)} holds no layers; is it a Caffe .caffemodel?")
    return net


# ------------------------------------------------------------------------------------------------
# layers in one form for both layouts


@dataclass
class _Layer:
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    msg: Any  # LayerParameter or V1LayerParameter: the *_param fields have the same names
    blobs: list[Any] = field(default_factory=list)


def _rule_met(rule: Any, phase: int, level: int, stages: set[str]) -> bool:
    # caffe::Net::StateMeetsRule
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    return all(s in stages for s in rule.stage) and not any(s in stages for s in rule.not_stage)


def _layers(net: Any) -> list[_Layer]:
    state = net.state
    phase, level, stages = state.phase, state.level, set(state.stage)  # phase defaults to TEST
    out: list[_Layer] = []
    v1_enum = pb.V1LayerParameter.DESCRIPTOR.enum_types_by_name["LayerType"]
    for msg, v1 in [(m, False) for m in net.layer] + [(m, True) for m in net.layers]:
        if v1:
            enum_name = (
                v1_enum.values_by_number[msg.type].name if msg.type in v1_enum.values_by_number else ""
            )
            ltype = pb.V1_TYPE_NAMES.get(enum_name, "") or f"V1 type {msg.type}"
        else:
            if msg.HasField("phase") and msg.phase != phase:
                continue
            ltype = msg.type
        if msg.include and not any(_rule_met(r, phase, level, stages) for r in msg.include):
            continue
        if msg.exclude and any(_rule_met(r, phase, level, stages) for r in msg.exclude):
            continue
        out.append(_Layer(msg.name, ltype, list(msg.bottom), list(msg.top), msg, list(msg.blobs)))
    return out


def _weight_blobs(net: Any) -> dict[str, list[Any]]:
    blobs: dict[str, list[Any]] = {}
    for msg in list(net.layer) + list(net.layers):
        if msg.blobs and msg.name not in blobs:
            blobs[msg.name] = list(msg.blobs)
    return blobs


# ------------------------------------------------------------------------------------------------
# blobs


def _blob_array(blob: Any, where: str) -> np.ndarray:
    if blob.HasField("shape"):
        dims: Shape = tuple(int(d) for d in blob.shape.dim)
    elif any(blob.HasField(k) for k in ("num", "channels", "height", "width")):
        dims = (blob.num, blob.channels, blob.height, blob.width)
    else:
        dims = (len(blob.data) or len(blob.double_data),)
    if any(d < 0 for d in dims):
        raise SparseCNNError(f"{where}: blob has a negative dimension in its shape {dims}")
    n = len(blob.data) if len(blob.data) else len(blob.double_data)
    if math.prod(dims) != n:
        raise SparseCNNError(f"{where}: blob holds {n} values but its shape {dims} needs {math.prod(dims)}")
    if len(blob.data):
        arr = np.asarray(blob.data, dtype=np.float32)
    else:
        arr = np.asarray(blob.double_data, dtype=np.float64).astype(np.float32)
    if not np.isfinite(arr).all():
        raise SparseCNNError(
            f"{where}: blob holds {int((~np.isfinite(arr)).sum())} NaN/Inf value(s); the caffemodel is "
            f"corrupt or its training diverged: use a good copy of the weights"
        )
    return arr.reshape(dims)


def _strip(dims: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(dims)
    while len(dims) > 1 and dims[0] == 1:
        dims = dims[1:]
    return dims


def _fit(arr: np.ndarray, expected: Shape, where: str, role: str) -> torch.Tensor:
    # Legacy blobs are 4-D with leading 1s (an InnerProduct weight is 1 x 1 x N x K): compare the
    # shapes without leading 1s, as Caffe's Blob::ShapeEquals does for legacy blobs.
    if _strip(arr.shape) != _strip(expected):
        raise SparseCNNError(
            f"{where}: {role} blob has shape {tuple(arr.shape)} but the layer needs {tuple(expected)}; "
            f"the weights do not fit this prototxt"
        )
    return torch.from_numpy(np.ascontiguousarray(arr.reshape(expected)))


def _check_numel(where: str, *shapes: Shape) -> None:
    for shape in shapes:
        if math.prod(shape) > _MAX_NUMEL:
            raise SparseCNNError(f"{where}: implausible size {shape} ({math.prod(shape)} elements)")


# ------------------------------------------------------------------------------------------------
# layer builders: (layer, input shapes, blobs) -> (module, output shapes, flatten axis)


def _axis(axis: int, ndim: int, where: str) -> int:
    if not -ndim <= axis < ndim:
        raise SparseCNNError(f"{where}: axis {axis} is out of range for a {ndim}-D input")
    return axis % ndim


def _hw(
    where: str, what: str, values: Sequence[int], h: int | None, w: int | None, default: int
) -> tuple[int, int]:
    if h is not None or w is not None:
        if values:
            raise SparseCNNError(f"{where}: give either {what} or {what}_h and {what}_w, not both")
        if h is None or w is None:
            raise SparseCNNError(f"{where}: {what}_h and {what}_w must be given together")
        return int(h), int(w)
    if len(values) == 0:
        return default, default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    if len(values) == 2:
        return int(values[0]), int(values[1])
    raise SparseCNNError(f"{where}: {what} has {len(values)} values; 2-D convolution takes 1 or 2")


def _opt(msg: Any, name: str) -> int | None:
    return getattr(msg, name) if msg.HasField(name) else None


def _need_blobs(where: str, blobs: list[np.ndarray] | None, n: int) -> list[np.ndarray] | None:
    if blobs is not None and len(blobs) < n:
        raise SparseCNNError(f"{where}: the weights hold {len(blobs)} blob(s) for this layer, it needs {n}")
    return blobs


def _conv(L: _Layer, shapes: list[Shape], blobs: list[np.ndarray] | None, where: str):
    p = L.msg.convolution_param
    (x,) = shapes
    if len(x) != 4:
        raise SparseCNNError(f"{where}: needs a 4-D (N, C, H, W) input, got shape {x}")
    if p.axis != 1:
        raise SparseCNNError(f"{where}: convolution axis {p.axis} is not supported (only 1)")
    kh, kw = _hw(where, "kernel_size", p.kernel_size, _opt(p, "kernel_h"), _opt(p, "kernel_w"), 0)
    sh, sw = _hw(where, "stride", p.stride, _opt(p, "stride_h"), _opt(p, "stride_w"), 1)
    ph, pw = _hw(where, "pad", p.pad, _opt(p, "pad_h"), _opt(p, "pad_w"), 0)
    dh, dw = _hw(where, "dilation", p.dilation, None, None, 1)
    n_out, group, c = p.num_output, p.group, x[1]
    if min(kh, kw, sh, sw, dh, dw, n_out, group) <= 0:
        raise SparseCNNError(f"{where}: num_output, kernel, stride, dilation and group must be positive")
    if c % group or n_out % group:
        raise SparseCNNError(
            f"{where}: input channels {c} and num_output {n_out} must both be divisible by group {group}"
        )
    oh = (x[2] + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (x[3] + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    if oh <= 0 or ow <= 0:
        raise SparseCNNError(f"{where}: input {x[2]}x{x[3]} is smaller than the (dilated, padded) kernel")
    wshape = (n_out, c // group, kh, kw)
    _check_numel(where, wshape)
    blobs = _need_blobs(where, blobs, 2 if p.bias_term else 1)
    args = dict(
        kernel_size=(kh, kw),
        stride=(sh, sw),
        padding=(ph, pw),
        dilation=(dh, dw),
        groups=group,
        bias=p.bias_term,
    )
    if blobs is None:
        module = nn.Conv2d(c, n_out, **args)
    else:
        module = nn.utils.skip_init(nn.Conv2d, c, n_out, **args)
        with torch.no_grad():
            module.weight.copy_(_fit(blobs[0], wshape, where, "weight"))
            if p.bias_term:
                module.bias.copy_(_fit(blobs[1], (n_out,), where, "bias"))
    return module, [(x[0], n_out, oh, ow)], -1


def _inner_product(L: _Layer, shapes: list[Shape], blobs: list[np.ndarray] | None, where: str):
    p = L.msg.inner_product_param
    (x,) = shapes
    axis = _axis(p.axis, len(x), where)
    k, n = math.prod(x[axis:]), p.num_output
    if n <= 0 or k <= 0:
        raise SparseCNNError(f"{where}: num_output and the input size must be positive")
    _check_numel(where, (n, k))
    blobs = _need_blobs(where, blobs, 2 if p.bias_term else 1)
    if blobs is None:
        module = nn.Linear(k, n, bias=p.bias_term)
    else:
        module = nn.utils.skip_init(nn.Linear, k, n, bias=p.bias_term)
        with torch.no_grad():
            if p.transpose:  # Caffe stores the weight as K x N
                module.weight.copy_(_fit(blobs[0], (k, n), where, "weight").T)
            else:
                module.weight.copy_(_fit(blobs[0], (n, k), where, "weight"))
            if p.bias_term:
                module.bias.copy_(_fit(blobs[1], (n,), where, "bias"))
    return module, [(*x[:axis], n)], axis if len(x) > axis + 1 else -1


def _relu(L: _Layer, shapes, blobs, where):
    slope = L.msg.relu_param.negative_slope
    return (nn.LeakyReLU(slope) if slope else nn.ReLU()), list(shapes[:1]), -1


def _caffe_pool_size(size: int, k: int, s: int, p: int, any_pad: bool, ceil: bool) -> int:
    # caffe::PoolingLayer::Reshape
    out = (-(-(size + 2 * p - k) // s) if ceil else (size + 2 * p - k) // s) + 1
    if any_pad and (out - 1) * s >= size + p:  # the last window must start inside the input + pad
        out -= 1
    return out


def _torch_pool_size(size: int, k: int, s: int, p: int, ceil: bool) -> int:
    # aten pooling_output_shape
    out = (size + 2 * p - k + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pooling(L: _Layer, shapes, blobs, where):
    p = L.msg.pooling_param
    (x,) = shapes
    if len(x) != 4:
        raise SparseCNNError(f"{where}: needs a 4-D (N, C, H, W) input, got shape {x}")
    method = (
        pb.LayerParameter.DESCRIPTOR.fields_by_name["pooling_param"]
        .message_type.enum_types_by_name["PoolMethod"]
        .values_by_number[p.pool]
        .name
    )
    if method not in ("MAX", "AVE"):
        raise SparseCNNError(f"{where}: pooling method {method} is not supported (MAX and AVE are)")
    if p.global_pooling:
        if p.pad or p.pad_h or p.pad_w or p.stride != 1 or p.HasField("stride_h"):
            raise SparseCNNError(f"{where}: global pooling takes no pad and stride 1")
        module = nn.AdaptiveMaxPool2d(1) if method == "MAX" else nn.AdaptiveAvgPool2d(1)
        return module, [(x[0], x[1], 1, 1)], -1
    if p.HasField("kernel_size"):
        if p.HasField("kernel_h") or p.HasField("kernel_w"):
            raise SparseCNNError(f"{where}: give either kernel_size or kernel_h and kernel_w, not both")
        kh = kw = p.kernel_size
    elif p.HasField("kernel_h") and p.HasField("kernel_w"):
        kh, kw = p.kernel_h, p.kernel_w
    else:
        raise SparseCNNError(f"{where}: pooling needs kernel_size, or kernel_h and kernel_w")
    ph, pw = (p.pad_h, p.pad_w) if p.HasField("pad_h") or p.HasField("pad_w") else (p.pad, p.pad)
    sh, sw = (
        (p.stride_h, p.stride_w) if p.HasField("stride_h") or p.HasField("stride_w") else (p.stride, p.stride)
    )
    if min(kh, kw, sh, sw) <= 0:
        raise SparseCNNError(f"{where}: pooling kernel and stride must be positive")
    if ph >= kh or pw >= kw:
        raise SparseCNNError(f"{where}: pad ({ph}, {pw}) must be smaller than the kernel ({kh}, {kw})")
    if 2 * ph > kh or 2 * pw > kw:
        raise SparseCNNError(f"{where}: pad ({ph}, {pw}) above half the kernel ({kh}, {kw}) is not supported")
    if x[2] + 2 * ph < kh or x[3] + 2 * pw < kw:
        raise SparseCNNError(f"{where}: input {x[2]}x{x[3]} is smaller than the kernel {kh}x{kw}")
    ceil = p.round_mode == 0  # CEIL, Caffe's default
    any_pad = bool(ph or pw)
    oh = _caffe_pool_size(x[2], kh, sh, ph, any_pad, ceil)
    ow = _caffe_pool_size(x[3], kw, sw, pw, any_pad, ceil)
    if (oh, ow) != (_torch_pool_size(x[2], kh, sh, ph, ceil), _torch_pool_size(x[3], kw, sw, pw, ceil)):
        raise SparseCNNError(
            f"{where}: stride ({sh}, {sw}) larger than the kernel ({kh}, {kw}) without padding makes Caffe's "
            f"last window start outside the input; this pooling is not supported"
        )
    if method == "MAX":
        module = MaxPool2d((kh, kw), (sh, sw), (ph, pw), ceil_mode=ceil)
    else:  # Caffe divides by the window clipped to input + pad, which is count_include_pad in torch
        module = nn.AvgPool2d((kh, kw), (sh, sw), (ph, pw), ceil_mode=ceil, count_include_pad=True)
    return module, [(x[0], x[1], oh, ow)], -1


def _lrn(L: _Layer, shapes, blobs, where):
    p = L.msg.lrn_param
    (x,) = shapes
    if p.norm_region != 0:
        raise SparseCNNError(f"{where}: LRN norm_region WITHIN_CHANNEL is not supported (ACROSS_CHANNELS is)")
    if p.local_size % 2 == 0 or p.local_size <= 0:
        raise SparseCNNError(f"{where}: LRN local_size must be odd and positive, got {p.local_size}")
    if len(x) != 4:
        raise SparseCNNError(f"{where}: needs a 4-D (N, C, H, W) input, got shape {x}")
    # Caffe: x / (k + alpha/n * sum of squares)^beta over n channels centred on c; torch is the same.
    return LocalResponseNorm(p.local_size, alpha=p.alpha, beta=p.beta, k=p.k), [x], -1


def _dropout(L: _Layer, shapes, blobs, where):
    ratio = L.msg.dropout_param.dropout_ratio
    if not 0.0 <= ratio < 1.0:
        raise SparseCNNError(f"{where}: dropout_ratio must be in [0, 1), got {ratio}")
    return nn.Dropout(ratio), list(shapes[:1]), -1


def _softmax(L: _Layer, shapes, blobs, where):
    (x,) = shapes
    return nn.Softmax(dim=_axis(L.msg.softmax_param.axis, len(x), where)), [x], -1


def _concat(L: _Layer, shapes, blobs, where):
    p = L.msg.concat_param
    axis = p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim
    axis = _axis(axis, len(shapes[0]), where)
    for s in shapes[1:]:
        if len(s) != len(shapes[0]) or any(
            a != b for i, (a, b) in enumerate(zip(s, shapes[0], strict=True)) if i != axis
        ):
            raise SparseCNNError(f"{where}: inputs of shapes {shapes} differ outside the concat axis {axis}")
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    return Concat(axis), [tuple(out)], -1


def _eltwise(L: _Layer, shapes, blobs, where):
    p = L.msg.eltwise_param
    op = {0: "prod", 1: "sum", 2: "max"}[p.operation]
    if len(shapes) < 2:
        raise SparseCNNError(f"{where}: Eltwise needs at least 2 bottoms")
    if any(s != shapes[0] for s in shapes):
        raise SparseCNNError(f"{where}: Eltwise inputs must have the same shape, got {shapes}")
    if p.coeff and (op != "sum" or len(p.coeff) != len(shapes)):
        raise SparseCNNError(f"{where}: Eltwise coeff is for SUM only, one per bottom ({len(shapes)})")
    return Eltwise(op, list(p.coeff)), [shapes[0]], -1


def _batch_norm(L: _Layer, shapes, blobs, where):
    p = L.msg.batch_norm_param
    (x,) = shapes
    if len(x) not in (2, 3, 4):
        raise SparseCNNError(f"{where}: BatchNorm supports 2-, 3- and 4-D inputs, got shape {x}")
    c = x[1]
    cls = nn.BatchNorm2d if len(x) == 4 else nn.BatchNorm1d
    global_stats = p.use_global_stats if p.HasField("use_global_stats") else True  # TEST phase default
    module = cls(c, eps=p.eps, affine=False, track_running_stats=global_stats)
    blobs = _need_blobs(where, blobs, 3)
    if blobs is not None and global_stats:
        factor_blob = blobs[2].reshape(-1)
        if factor_blob.size != 1:
            raise SparseCNNError(f"{where}: scale factor blob has {factor_blob.size} values, needs 1")
        s = float(factor_blob[0])
        factor = 0.0 if s == 0 else 1.0 / s  # caffe::BatchNormLayer::Forward_cpu
        with torch.no_grad():
            module.running_mean.copy_(_fit(blobs[0], (c,), where, "mean") * factor)
            module.running_var.copy_(_fit(blobs[1], (c,), where, "variance") * factor)
    return module, [x], -1


def _scale(L: _Layer, shapes, blobs, where):
    p = L.msg.scale_param
    if len(shapes) != 1:
        raise SparseCNNError(f"{where}: Scale with a second bottom (scale from a blob) is not supported")
    (x,) = shapes
    if len(x) < 2 or _axis(p.axis, len(x), where) != 1 or p.num_axes != 1:
        raise SparseCNNError(f"{where}: Scale is supported per channel only (axis 1, num_axes 1)")
    c = x[1]
    module = ChannelScale(c, bias=p.bias_term)
    blobs = _need_blobs(where, blobs, 2 if p.bias_term else 1)
    if blobs is not None:
        with torch.no_grad():
            module.weight.copy_(_fit(blobs[0], (c,), where, "scale"))
            if p.bias_term:
                module.bias.copy_(_fit(blobs[1], (c,), where, "bias"))
    return module, [x], -1


def _flatten(L: _Layer, shapes, blobs, where):
    p = L.msg.flatten_param
    (x,) = shapes
    a, e = _axis(p.axis, len(x), where), _axis(p.end_axis, len(x), where)
    if e < a:
        raise SparseCNNError(f"{where}: Flatten end_axis {p.end_axis} comes before axis {p.axis}")
    return nn.Flatten(a, e), [(*x[:a], math.prod(x[a : e + 1]), *x[e + 1 :])], -1


_BUILDERS = {
    "Convolution": _conv,
    "InnerProduct": _inner_product,
    "ReLU": _relu,
    "Pooling": _pooling,
    "LRN": _lrn,
    "Dropout": _dropout,
    "Softmax": _softmax,
    "Concat": _concat,
    "Eltwise": _eltwise,
    "BatchNorm": _batch_norm,
    "Scale": _scale,
    "Flatten": _flatten,
}
_N_BOTTOMS = {"Concat": None, "Eltwise": None}  # any number; all others take exactly one
_PARAM_LAYERS = {"Convolution", "InnerProduct", "BatchNorm", "Scale"}
SUPPORTED_LAYERS: tuple[str, ...] = ("Input", *sorted(_BUILDERS))


# ------------------------------------------------------------------------------------------------


def _shape_from(dims: Sequence[int], where: str) -> Shape:
    dims = tuple(int(d) for d in dims)
    if not dims or any(d <= 0 for d in dims):
        raise SparseCNNError(f"{where}: input shape {dims} must have positive dimensions")
    _check_numel(where, dims)
    return (1, *dims[1:])  # batch 1 for the shape calculation; the module takes any batch


def _net_inputs(net: Any, layers: list[_Layer]) -> dict[str, Shape | None]:
    inputs: dict[str, Shape | None] = {}
    names = list(net.input)
    if net.input_shape and len(net.input_shape) != len(names):
        raise SparseCNNError(f"net has {len(names)} input(s) but {len(net.input_shape)} input_shape(s)")
    if net.input_dim and len(net.input_dim) != 4 * len(names):
        raise SparseCNNError(
            f"net has {len(names)} input(s) but {len(net.input_dim)} input_dim values (4 each)"
        )
    for i, name in enumerate(names):
        where = f"input {name!r}"
        if net.input_shape:
            inputs[name] = _shape_from(net.input_shape[i].dim, where)
        elif net.input_dim:
            inputs[name] = _shape_from(net.input_dim[4 * i : 4 * i + 4], where)
        else:
            inputs[name] = None
    for L in layers:
        if L.type != "Input":
            continue
        shapes = L.msg.input_param.shape if not isinstance(L.msg, pb.V1LayerParameter) else []
        if shapes and len(shapes) not in (1, len(L.tops)):
            raise SparseCNNError(f"layer {L.name!r} (Input): {len(shapes)} shapes for {len(L.tops)} tops")
        for j, top in enumerate(L.tops):
            dims = shapes[j if len(shapes) > 1 else 0].dim if shapes else None
            inputs[top] = None if dims is None else _shape_from(dims, f"layer {L.name!r} (Input)")
    return inputs


def build_net(
    net: Any,
    weights: dict[str, list[Any]] | None = None,
    input_shape: Sequence[int] | None = None,
    source: str = "",
) -> GraphNet:
    """Build the torch module of a parsed ``NetParameter``.

    Parameters
    ----------
    net : NetParameter
        The architecture (deploy prototxt).
    weights : dict[str, list[BlobProto]], optional
        Blobs by layer name (from a ``.caffemodel``). Without it, blobs inside ``net`` are used, and
        layers without any get PyTorch's default initialisation.
    input_shape : sequence of int, optional
        (C, H, W) of the first input, overriding the prototxt's.
    source : str
        Recorded on the module, e.g. the prototxt path.
    """
    layers = _layers(net)
    if not layers:
        raise SparseCNNError("the Caffe net has no layers")
    inputs = _net_inputs(net, layers)
    if not inputs:
        raise SparseCNNError("the Caffe net declares no input (an Input layer or the input field)")
    first = next(iter(inputs))
    if input_shape is not None:
        inputs[first] = _shape_from((1, *input_shape), "input_shape")
    for name, shape in inputs.items():
        if shape is None:
            raise SparseCNNError(
                f"the Caffe net gives no shape for its input {name!r}; pass input_shape=(C, H, W)"
            )
    shapes: dict[str, Shape] = dict(inputs)  # type: ignore[arg-type]
    own_blobs = _weight_blobs(net)
    taken: set[str] = set()
    modules: dict[str, nn.Module] = {}
    steps: list[Step] = []
    available = set(inputs)
    for i, L in enumerate(layers):
        where = f"layer {L.name!r} ({L.type})"
        if L.type == "Input":
            continue
        builder = _BUILDERS.get(L.type)
        if builder is None:
            raise SparseCNNError(
                f"layer {L.name!r} has type {L.type!r}, which sparsecnn cannot import; supported layer "
                f"types: {', '.join(SUPPORTED_LAYERS)} (use the deploy prototxt, not train_val)"
            )
        if not L.bottoms or not L.tops:
            raise SparseCNNError(f"{where}: needs at least one bottom and one top")
        if L.type not in _N_BOTTOMS and len(L.bottoms) != 1:
            raise SparseCNNError(f"{where}: takes one bottom, got {len(L.bottoms)}")
        if len(L.tops) != 1:
            raise SparseCNNError(f"{where}: produces one top, got {len(L.tops)}")
        for b in L.bottoms:
            if b not in shapes:
                raise SparseCNNError(f"{where}: bottom {b!r} is not produced by any earlier layer or input")
        blobs = None
        if L.type in _PARAM_LAYERS:
            raw = weights.get(L.name) if weights is not None else own_blobs.get(L.name)
            if weights is not None and raw is None:
                raise SparseCNNError(f"{where}: the weights file has no blobs for this layer")
            blobs = None if raw is None else [_blob_array(b, f"{where} blob {j}") for j, b in enumerate(raw)]
        module, out_shapes, flatten = builder(L, [shapes[b] for b in L.bottoms], blobs, where)
        name = safe_name(L.name, taken, f"{L.type.lower()}{i}")
        modules[name] = module
        steps.append(Step(name, tuple(L.bottoms), tuple(L.tops), flatten))
        available.difference_update(L.bottoms)
        for top, shape in zip(L.tops, out_shapes, strict=True):
            shapes[top] = shape
            available.add(top)
    if not steps:
        raise SparseCNNError("the Caffe net has no layers besides its inputs")
    order = {t: k for k, s in enumerate(steps) for t in s.outputs}
    outputs = sorted((b for b in available if b in order), key=lambda b: order[b])
    model = GraphNet(steps, modules, list(inputs), outputs, inputs[first][1:], source=source)  # type: ignore[index]
    return model.eval()


def load_caffe(
    prototxt: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
) -> GraphNet:
    """Load a Caffe model as a torch module.

    Parameters
    ----------
    prototxt : path
        Deploy net definition (protobuf text format).
    weights : path, optional
        Trained weights (binary ``.caffemodel``), matched to layers by name. Without it, the layers get
        PyTorch's default initialisation (enough for shape and cost analysis).
    input_shape : (C, H, W), optional
        Overrides the input shape the prototxt declares (the batch size is never fixed).

    Returns
    -------
    GraphNet
        In eval mode; conv and fully connected layers are ``nn.Conv2d`` / ``nn.Linear`` children named
        after their Caffe layers; ``input_shape`` = (C, H, W).

    Raises
    ------
    SparseCNNError
        For unreadable or corrupt files, unsupported layer types, and weights that do not fit.
    """
    net = read_prototxt(prototxt)
    blobs = _weight_blobs(read_caffemodel(weights)) if weights is not None else None
    try:
        return build_net(net, blobs, input_shape, source=f"caffe:{os.fspath(prototxt)}")
    except SparseCNNError as exc:
        raise SparseCNNError(f"{os.fspath(prototxt)}: {exc}") from None
    except (TypeError, IndexError, KeyError, RuntimeError, OverflowError, ValueError) as exc:
        raise SparseCNNError(
            f"{os.fspath(prototxt)}: cannot build the net ({type(exc).__name__}: {exc})"
        ) from None
