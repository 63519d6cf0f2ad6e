"""A small Caffe writer for the tests, independent of sparsecnn's schema.

``prototxt`` writes a net definition in protobuf text format by hand; ``caffemodel`` encodes the binary
``NetParameter`` wire format by hand with BVLC caffe.proto's field numbers (NetParameter.layer = 100,
legacy layers = 2; LayerParameter name 1, type 2, bottom 3, top 4, blobs 7; V1LayerParameter bottom 2,
top 3, name 4, type 5 (enum), blobs 6; BlobProto shape 7 {dim 1 packed}, data 5 packed, legacy
num/channels/height/width 1-4). Sharing no code with the reader, it checks the reader's field numbers.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# V1LayerParameter.LayerType values for the layer types the tests use.
V1_ENUM = {
    "Convolution": ("CONVOLUTION", 4),
    "InnerProduct": ("INNER_PRODUCT", 14),
    "ReLU": ("RELU", 18),
    "Pooling": ("POOLING", 17),
    "LRN": ("LRN", 15),
    "Dropout": ("DROPOUT", 6),
    "Softmax": ("SOFTMAX", 20),
    "Concat": ("CONCAT", 3),
    "Eltwise": ("ELTWISE", 25),
    "Flatten": ("FLATTEN", 8),
}


@dataclass
class Layer:
    name: str
    type: str
    bottom: Sequence[str]
    top: Sequence[str]
    params: str = ""  # text of the layer's *_param blocks, e.g. "convolution_param { num_output: 8 }"
    blobs: list[np.ndarray] = field(default_factory=list)


def prototxt(
    layers: Sequence[Layer],
    input_shape: Sequence[int] | None = None,
    v1: bool = False,
    legacy_input: bool = False,
    name: str = "testnet",
) -> str:
    """A deploy prototxt. ``input_shape`` (N, C, H, W) adds an Input layer (or legacy input fields)."""
    lines = [f'name: "{name}"']
    if input_shape is not None and (v1 or legacy_input):
        lines.append('input: "data"')
        lines += [f"input_dim: {d}" for d in input_shape]
    elif input_shape is not None:
        dims = " ".join(f"dim: {d}" for d in input_shape)
        lines.append(
            f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}'
        )
    for L in layers:
        io = " ".join([f'bottom: "{b}"' for b in L.bottom] + [f'top: "{t}"' for t in L.top])
        if v1:  # V1 layers have no ParamSpec (they used blobs_lr), so drop param { ... } blocks
            params = re.sub(r"\bparam \{[^}]*\}", "", L.params)
            lines.append(f'layers {{ name: "{L.name}" type: {V1_ENUM[L.type][0]} {io} {params} }}')
        else:
            lines.append(f'layer {{ name: "{L.name}" type: "{L.type}" {io} {L.params} }}')
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# protobuf wire format by hand


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _ld(number: int, payload: bytes) -> bytes:  # length-delimited field
    return _key(number, 2) + _varint(len(payload)) + payload


def _string(number: int, s: str) -> bytes:
    return _ld(number, s.encode())


def blob(arr: np.ndarray, legacy: bool = False, double: bool = False) -> bytes:
    """A BlobProto: ``legacy`` writes num/channels/height/width (padded to 4-D) instead of shape."""
    arr = np.asarray(arr)
    if legacy:
        dims = (1,) * (4 - arr.ndim) + arr.shape
        head = b"".join(_key(i, 0) + _varint(d) for i, d in enumerate(dims, start=1))
    else:
        head = _ld(7, _ld(1, b"".join(_varint(d) for d in arr.shape)))
    if double:
        return head + _ld(8, arr.astype("<f8").tobytes())
    return head + _ld(5, arr.astype("<f4").tobytes())


def caffemodel(
    layers: Sequence[Layer], v1: bool = False, legacy_blobs: bool = False, name: str = "testnet"
) -> bytes:
    """A binary NetParameter holding each layer's name, type, bottoms, tops and blobs."""
    out = _string(1, name)
    for L in layers:
        blobs = [blob(b, legacy=legacy_blobs) for b in L.blobs]
        if v1:
            body = _string(4, L.name) + _key(5, 0) + _varint(V1_ENUM[L.type][1])
            body += b"".join(_string(2, b) for b in L.bottom) + b"".join(_string(3, t) for t in L.top)
            body += b"".join(_ld(6, b) for b in blobs)
            out += _ld(2, body)
        else:
            body = _string(1, L.name) + _string(2, L.type)
            body += b"".join(_string(3, b) for b in L.bottom) + b"".join(_string(4, t) for t in L.top)
            body += b"".join(_ld(7, b) for b in blobs)
            out += _ld(100, body)
    return out


def write(
    tmp_path,
    layers: Sequence[Layer],
    input_shape: Sequence[int],
    v1: bool = False,
    legacy_blobs: bool = False,
    stem: str = "net",
) -> tuple[str, str]:
    """Write ``stem.prototxt`` and ``stem.caffemodel`` under ``tmp_path``; return both paths."""
    proto = tmp_path / f"{stem}.prototxt"
    model = tmp_path / f"{stem}.caffemodel"
    proto.write_text(prototxt(layers, input_shape, v1=v1))
    model.write_bytes(caffemodel(layers, v1=v1, legacy_blobs=legacy_blobs))
    return str(proto), str(model)


def float_bits(x: float) -> bytes:
    return struct.pack("<f", x)
