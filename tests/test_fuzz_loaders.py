"""Every loader fed mutated and truncated bytes of a valid file.

The rule (issue 14): the load ends in one :class:`SparseCNNError`, or gives a model; never another
exception type, a hang over 5 s, or an allocation over 1 GiB. A model from sparsecnn's own checkpoints
must be identical to the original (they carry a checksum); Caffe and ONNX files have no checksum, so a
flipped bit inside a weight cannot be told from a real weight (nor a prototxt cut after a layer from a
shorter net): a model loaded from them must at least be consistent (it runs on its declared input).

Mutations: single bit flips, truncation at every tenth of the file and at generated offsets, and
"huge declared sizes" (4 or 8 bytes overwritten with 0xff.., 0x7f.., or a 10-byte varint).
``--hypothesis-profile=fuzz`` (``make fuzz``) runs many more examples.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsecnn
from sparsecnn.errors import SparseCNNError
from tests.caffe_writer import Layer, write

pytestmark = pytest.mark.fuzz

GiB = 1 << 30
INPUT = (1, 8, 8)


def _tiny_caffe_layers(rng: np.random.Generator) -> list[Layer]:
    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return [
        Layer("conv1", "Convolution", ["data"], ["conv1"],
              "convolution_param { num_output: 2 kernel_size: 3 }", [w(2, 1, 3, 3), w(2)]),
        Layer("relu1", "ReLU", ["conv1"], ["conv1"]),
        Layer("pool1", "Pooling", ["conv1"], ["pool1"],
              "pooling_param { pool: MAX kernel_size: 2 stride: 2 }"),
        Layer("ip1", "InnerProduct", ["pool1"], ["ip1"], "inner_product_param { num_output: 3 }",
              [w(3, 18), w(3)]),
    ]


def _tiny_torch() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 3))
    with torch.no_grad():
        m[4].weight[:, ::2] = 0.0  # sparse enough for a CSR layer
    return m.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[bytes, ...]]:
    d = tmp_path_factory.mktemp("valid")
    proto, weights = write(d, _tiny_caffe_layers(np.random.default_rng(0)), (1, *INPUT))
    onnx_path = d / "m.onnx"
    sparsecnn.io.export_onnx(_tiny_torch(), onnx_path, input_shape=INPUT)
    graph = sparsecnn.io.load_onnx(onnx_path)
    sparse = sparsecnn.sparsify(graph, "csrmm")
    sparsecnn.save(sparse, d / "m.npz")
    out = {"prototxt": (Path(proto).read_bytes(), Path(weights).read_bytes()),
           "caffemodel": (Path(proto).read_bytes(), Path(weights).read_bytes()),
           "onnx": (onnx_path.read_bytes(),), "npz": ((d / "m.npz").read_bytes(),)}
    try:
        sparsecnn.save(sparse, d / "m.safetensors")
        out["safetensors"] = ((d / "m.safetensors").read_bytes(),)
    except SparseCNNError:  # safetensors not installed
        pass
    return out


def _loader(kind: str, d: Path, blobs: tuple[bytes, ...]) -> Callable[[], nn.Module]:
    """Write ``blobs`` (the mutated file, plus the untouched companion for Caffe) and return the load."""
    if kind in ("prototxt", "caffemodel"):
        (d / "n.prototxt").write_bytes(blobs[0])
        (d / "n.caffemodel").write_bytes(blobs[1])
        return lambda: sparsecnn.io.load_caffe(d / "n.prototxt", d / "n.caffemodel")
    path = d / f"m.{kind}"
    path.write_bytes(blobs[0])
    if kind == "onnx":
        return lambda: sparsecnn.io.load_onnx(path)
    return lambda: sparsecnn.load(path)


def _outcome(load: Callable[[], nn.Module], measure_memory: bool = False) -> nn.Module | None:
    t0 = time.perf_counter()
    if measure_memory:
        tracemalloc.start()
    try:
        model = load()
    except SparseCNNError as exc:
        assert "\n" not in str(exc).strip() or len(str(exc)) < 2000
        model = None
    finally:
        if measure_memory:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < GiB, f"peak allocation {peak / GiB:.1f} GiB"
    assert time.perf_counter() - t0 < 5.0, "a load took over 5 s"
    return model


def _forward(model: nn.Module) -> torch.Tensor | tuple[torch.Tensor, ...]:
    x = torch.linspace(-1, 1, int(np.prod(INPUT))).reshape(1, *INPUT)
    with torch.no_grad():
        return model(x)


def _check(kind: str, model: nn.Module | None, original: nn.Module) -> None:
    if model is None:
        return
    if kind in ("npz", "safetensors"):  # checksummed: identical or an error
        assert model.state_dict().keys() == original.state_dict().keys()
        for k, v in original.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), f"{k} differs: a silently different model"
        assert torch.equal(_forward(model), _forward(original))
    else:
        # a truncated prototxt is often a valid, shorter net: only "it runs on its declared input"
        # is a property of every model these formats can describe
        # (a flipped bit in a top's name leaves a blob no layer reads: Caffe then makes it a second
        # output of the net, so the forward returns a tuple, as it does for any multi-output net)
        try:
            y = _forward(model)
        except SparseCNNError:
            return
        for out in y if isinstance(y, tuple) else (y,):
            assert out.shape[0] == 1


def _mutate(data: bytes, which: int, kind: str, pos: int, arg: int) -> bytes:
    if kind == "flip":
        b = bytearray(data)
        b[pos % len(b)] ^= 1 << (arg % 8)
        return bytes(b)
    if kind == "truncate":
        return data[: pos % len(data)]
    # a huge declared size where a length, count or dimension may be
    huge = [b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\xff" * 8, b"\xff" * 9 + b"\x01", b"\x00\x00\x00\x80"]
    h = huge[arg % len(huge)]
    p = pos % max(len(data) - len(h), 1)
    return data[:p] + h + data[p + len(h):]


KINDS = ("prototxt", "caffemodel", "onnx", "npz", "safetensors")


@pytest.fixture(scope="module")
def originals(files, tmp_path_factory) -> dict[str, nn.Module]:
    d = tmp_path_factory.mktemp("orig")
    return {k: _loader(k, d, files[k])() for k in files}


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_at_every_tenth(kind, files, originals, tmp_path) -> None:
    if kind not in files:
        pytest.skip("safetensors is not installed")
    which = 1 if kind == "caffemodel" else 0
    data = files[kind][which]
    for i in range(10):
        blobs = list(files[kind])
        blobs[which] = data[: len(data) * i // 10]
        _check(kind, _outcome(_loader(kind, tmp_path, tuple(blobs))), originals[kind])


@pytest.mark.parametrize("kind", KINDS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(mutation=st.sampled_from(["flip", "truncate", "huge"]), pos=st.integers(0, 1 << 20),
       arg=st.integers(0, 255),
       extra=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 7)), max_size=3))
def test_mutated_bytes(kind, files, originals, tmp_path, mutation, pos, arg, extra) -> None:
    if kind not in files:
        pytest.skip("safetensors is not installed")
    which = 1 if kind == "caffemodel" else 0
    blobs = list(files[kind])
    data = _mutate(blobs[which], which, mutation, pos, arg)
    for p, bit in extra:  # a few more flips
        data = _mutate(data, which, "flip", p, bit) if data else data
    blobs[which] = data
    _check(kind, _outcome(_loader(kind, tmp_path, tuple(blobs)), measure_memory=mutation == "huge"),
           originals[kind])


def test_checkpoint_bit_flips_after_the_first_member(files, originals, tmp_path) -> None:
    """200 flips spread over the arrays: each is an error or (in zip padding) the identical model."""
    data = files["npz"][0]
    start = data.find(b"sparse/")
    assert start > 0
    for pos in range(start, len(data), max(1, (len(data) - start) // 200)):
        b = bytearray(data)
        b[pos] ^= 0x10
        m = _outcome(_loader("npz", tmp_path, (bytes(b),)))
        _check("npz", m, originals["npz"])


def test_prototxt_flip_that_orphans_a_top_gives_a_two_output_net(files, originals, tmp_path) -> None:
    """Found by ``make fuzz``: one flipped bit renames the ReLU's in-place top ("conv1" -> "bonv1"),
    so no layer reads it and it becomes a second output of the net, as Caffe makes any unread top:
    a valid different net whose forward returns a tuple, not an error and not a crash."""
    blobs = list(files["prototxt"])
    text = blobs[0].decode()
    relu = text.index('type: "ReLU"')
    top = text.index('top: "conv1"', relu) + len('top: "')
    b = bytearray(blobs[0])
    b[top] ^= 1  # 'c' (0x63) -> 'b' (0x62)
    blobs[0] = bytes(b)
    model = _outcome(_loader("prototxt", tmp_path, tuple(blobs)))
    assert model is not None and model.outputs == ["bonv1", "ip1"]
    _check("prototxt", model, originals["prototxt"])
    y = _forward(model)
    assert isinstance(y, tuple) and [t.shape[0] for t in y] == [1, 1]
