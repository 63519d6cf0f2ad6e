"""Caffe import: hand-written prototxt/caffemodel (tests/caffe_writer.py) -> module == torch by hand."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sparsecnn.errors import SparseCNNError
from sparsecnn.io.caffe import load_caffe, read_caffemodel, read_prototxt
from sparsecnn.models import resolve
from tests.caffe_writer import Layer, caffemodel, prototxt, write


def _w(rng, *shape, scale=0.1):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# LeNet (Caffe examples/mnist/lenet.prototxt)


def lenet_layers(rng) -> list[Layer]:
    return [
        Layer(
            "conv1",
            "Convolution",
            ["data"],
            ["conv1"],
            "convolution_param { num_output: 20 kernel_size: 5 stride: 1 weight_filler { type: 'xavier' } }",
            [_w(rng, 20, 1, 5, 5), _w(rng, 20)],
        ),
        Layer(
            "pool1", "Pooling", ["conv1"], ["pool1"], "pooling_param { pool: MAX kernel_size: 2 stride: 2 }"
        ),
        Layer(
            "conv2",
            "Convolution",
            ["pool1"],
            ["conv2"],
            "param { lr_mult: 1 } param { lr_mult: 2 } convolution_param { num_output: 50 kernel_size: 5 }",
            [_w(rng, 50, 20, 5, 5), _w(rng, 50)],
        ),
        Layer(
            "pool2", "Pooling", ["conv2"], ["pool2"], "pooling_param { pool: MAX kernel_size: 2 stride: 2 }"
        ),
        Layer(
            "ip1",
            "InnerProduct",
            ["pool2"],
            ["ip1"],
            "inner_product_param { num_output: 500 }",
            [_w(rng, 500, 800, scale=0.03), _w(rng, 500)],
        ),
        Layer("relu1", "ReLU", ["ip1"], ["ip1"]),
        Layer(
            "ip2",
            "InnerProduct",
            ["ip1"],
            ["ip2"],
            "inner_product_param { num_output: 10 }",
            [_w(rng, 10, 500), _w(rng, 10)],
        ),
        Layer("prob", "Softmax", ["ip2"], ["prob"]),
    ]


def lenet_by_hand(layers: list[Layer]) -> nn.Module:
    b = {L.name: [torch.from_numpy(x) for x in L.blobs] for L in layers}
    net = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 20, 5),
            pool1=nn.MaxPool2d(2, 2),
            conv2=nn.Conv2d(20, 50, 5),
            pool2=nn.MaxPool2d(2, 2),
            flat=nn.Flatten(),
            ip1=nn.Linear(800, 500),
            relu1=nn.ReLU(),
            ip2=nn.Linear(500, 10),
            prob=nn.Softmax(1),
        )
    )
    with torch.no_grad():
        for name in ("conv1", "conv2", "ip1", "ip2"):
            getattr(net, name).weight.copy_(b[name][0])
            getattr(net, name).bias.copy_(b[name][1])
    return net.eval()


@pytest.mark.parametrize(("v1", "legacy_blobs"), [(False, False), (False, True), (True, True), (True, False)])
def test_lenet_matches_torch_by_hand(tmp_path, rng, v1, legacy_blobs):
    layers = lenet_layers(rng)
    proto, weights = write(tmp_path, layers, (64, 1, 28, 28), v1=v1, legacy_blobs=legacy_blobs)
    model = load_caffe(proto, weights)
    assert model.input_shape == (1, 28, 28)
    assert [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))] == [
        "conv1",
        "conv2",
        "ip1",
        "ip2",
    ]
    x = torch.from_numpy(rng.standard_normal((3, 1, 28, 28)).astype(np.float32))
    _close(model(x), lenet_by_hand(layers)(x))


def test_v1_caffemodel_loads_into_current_prototxt(tmp_path, rng):
    # BVLC's released AlexNet is a V1 caffemodel used with a current-format deploy prototxt.
    layers = lenet_layers(rng)
    (tmp_path / "deploy.prototxt").write_text(prototxt(layers, (1, 1, 28, 28)))
    (tmp_path / "old.caffemodel").write_bytes(caffemodel(layers, v1=True, legacy_blobs=True))
    model = load_caffe(tmp_path / "deploy.prototxt", tmp_path / "old.caffemodel")
    x = torch.from_numpy(rng.standard_normal((2, 1, 28, 28)).astype(np.float32))
    _close(model(x), lenet_by_hand(layers)(x))


def test_legacy_input_fields_and_double_blobs(tmp_path, rng):
    layers = lenet_layers(rng)
    (tmp_path / "n.prototxt").write_text(prototxt(layers, (1, 1, 28, 28), legacy_input=True))
    (tmp_path / "n.caffemodel").write_bytes(caffemodel(layers))
    model = load_caffe(tmp_path / "n.prototxt", tmp_path / "n.caffemodel")
    assert model.inputs == ["data"] and model.input_shape == (1, 28, 28)


# ------------------------------------------------------------------------------------------------
# a grouped AlexNet-like net with LRN and ceil pooling


def alexnet_like_layers(rng) -> list[Layer]:
    lrn = "lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 k: 2 }"
    return [
        Layer(
            "conv1",
            "Convolution",
            ["data"],
            ["conv1"],
            "convolution_param { num_output: 8 kernel_size: 5 stride: 2 }",
            [_w(rng, 8, 3, 5, 5, scale=0.3), _w(rng, 8)],
        ),
        Layer("relu1", "ReLU", ["conv1"], ["conv1"]),
        Layer("norm1", "LRN", ["conv1"], ["norm1"], lrn),
        Layer(
            "pool1", "Pooling", ["norm1"], ["pool1"], "pooling_param { pool: MAX kernel_size: 3 stride: 2 }"
        ),
        Layer(
            "conv2",
            "Convolution",
            ["pool1"],
            ["conv2"],
            "convolution_param { num_output: 16 pad: 2 kernel_size: 5 group: 2 }",
            [_w(rng, 16, 4, 5, 5), _w(rng, 16)],
        ),
        Layer("relu2", "ReLU", ["conv2"], ["conv2"]),
        Layer("norm2", "LRN", ["conv2"], ["norm2"], lrn),
        Layer(
            "pool2",
            "Pooling",
            ["norm2"],
            ["pool2"],
            "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }",
        ),
        Layer(
            "conv3",
            "Convolution",
            ["pool2"],
            ["conv3"],
            "convolution_param { num_output: 12 pad_h: 1 pad_w: 0 kernel_h: 3 kernel_w: 1 group: 2 "
            "bias_term: false }",
            [_w(rng, 12, 8, 3, 1)],
        ),
        Layer("relu3", "ReLU", ["conv3"], ["conv3"]),
        Layer(
            "pool5", "Pooling", ["conv3"], ["pool5"], "pooling_param { pool: MAX kernel_size: 3 stride: 2 }"
        ),
        Layer(
            "fc6",
            "InnerProduct",
            ["pool5"],
            ["fc6"],
            "inner_product_param { num_output: 32 }",
            [_w(rng, 32, 12 * 2 * 2), _w(rng, 32)],
        ),
        Layer("relu6", "ReLU", ["fc6"], ["fc6"]),
        Layer("drop6", "Dropout", ["fc6"], ["fc6"], "dropout_param { dropout_ratio: 0.5 }"),
        Layer(
            "fc7",
            "InnerProduct",
            ["fc6"],
            ["fc7"],
            "inner_product_param { num_output: 10 }",
            [_w(rng, 10, 32), _w(rng, 10)],
        ),
        Layer("prob", "Softmax", ["fc7"], ["prob"]),
    ]


def alexnet_like_by_hand(layers: list[Layer]) -> nn.Module:
    # 35 -> conv1 16 -> pool1 ceil((16-3)/2)+1 = 8 (floor would give 7) -> conv2 8 -> pool2 (pad 1) 5
    # -> conv3 5 -> pool5 ceil((5-3)/2)+1 = 2
    b = {L.name: [torch.from_numpy(x) for x in L.blobs] for L in layers}
    net = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 5, stride=2),
            relu1=nn.ReLU(),
            norm1=nn.LocalResponseNorm(5, 0.1, 0.75, 2.0),
            pool1=nn.MaxPool2d(3, 2, ceil_mode=True),
            conv2=nn.Conv2d(8, 16, 5, padding=2, groups=2),
            relu2=nn.ReLU(),
            norm2=nn.LocalResponseNorm(5, 0.1, 0.75, 2.0),
            pool2=nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=True),
            conv3=nn.Conv2d(16, 12, (3, 1), padding=(1, 0), groups=2, bias=False),
            relu3=nn.ReLU(),
            pool5=nn.MaxPool2d(3, 2, ceil_mode=True),
            flat=nn.Flatten(),
            fc6=nn.Linear(48, 32),
            relu6=nn.ReLU(),
            fc7=nn.Linear(32, 10),
            prob=nn.Softmax(1),
        )
    )
    with torch.no_grad():
        for name, blobs in b.items():
            for param, blob in zip(("weight", "bias"), blobs, strict=False):
                getattr(getattr(net, name), param).copy_(blob)
    return net.eval()


def test_alexnet_like_grouped_lrn_ceil_pooling(tmp_path, rng):
    layers = alexnet_like_layers(rng)
    proto, weights = write(tmp_path, layers, (10, 3, 35, 35))
    model = load_caffe(proto, weights)
    assert model.conv2.groups == 2 and model.conv3.bias is None and model.conv3.padding == (1, 0)
    x = torch.from_numpy(rng.standard_normal((2, 3, 35, 35)).astype(np.float32))
    _close(model(x), alexnet_like_by_hand(layers)(x))
    # the ceil rounding is what makes fc6 fit: 12 * 2 * 2 inputs
    assert model.fc6.in_features == 48


# ------------------------------------------------------------------------------------------------
# layer semantics against slow references ported from Caffe's CPU code


def caffe_pool(x: np.ndarray, k: int, s: int, p: int, method: str) -> np.ndarray:
    """caffe::PoolingLayer Reshape (output size) + Forward_cpu, transcribed loop by loop."""
    n, c, h, w = x.shape
    ph_ = math.ceil((h + 2 * p - k) / s) + 1
    pw_ = math.ceil((w + 2 * p - k) / s) + 1
    if p:
        if (ph_ - 1) * s >= h + p:
            ph_ -= 1
        if (pw_ - 1) * s >= w + p:
            pw_ -= 1
    out = np.zeros((n, c, ph_, pw_), np.float64)
    for i in range(ph_):
        for j in range(pw_):
            hs, ws = i * s - p, j * s - p
            he, we = min(hs + k, h + p), min(ws + k, w + p)
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            win = x[:, :, hs:he, ws:we]
            out[:, :, i, j] = win.max(axis=(2, 3)) if method == "MAX" else win.sum(axis=(2, 3)) / size
    return out


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize(
    ("k", "s", "p"), [(2, 2, 0), (3, 2, 0), (3, 2, 1), (3, 3, 1), (2, 1, 1), (3, 1, 0), (4, 3, 2)]
)
@pytest.mark.parametrize("size", [5, 6, 7, 8])
def test_pooling_matches_caffe_reference(tmp_path, rng, method, k, s, p, size):
    layers = [
        Layer(
            "pool",
            "Pooling",
            ["data"],
            ["pool"],
            f"pooling_param {{ pool: {method} kernel_size: {k} stride: {s} pad: {p} }}",
        )
    ]
    (tmp_path / "p.prototxt").write_text(prototxt(layers, (1, 2, size, size)))
    model = load_caffe(tmp_path / "p.prototxt")
    x = rng.standard_normal((2, 2, size, size)).astype(np.float32)
    ref = caffe_pool(x.astype(np.float64), k, s, p, method)
    np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_lrn_batchnorm_scale_eltwise_concat_flatten_against_formulas(tmp_path, rng):
    c = 6
    mean, var, factor = _w(rng, c), np.abs(_w(rng, c)) + 0.5, np.array([2.0], np.float32)
    gamma, beta = _w(rng, c, scale=1.0), _w(rng, c)
    layers = [
        Layer("lrn", "LRN", ["data"], ["lrn"], "lrn_param { local_size: 3 alpha: 0.3 beta: 0.6 k: 1.5 }"),
        Layer("bn", "BatchNorm", ["data"], ["bn"], "batch_norm_param { eps: 0.001 }", [mean, var, factor]),
        Layer("scale", "Scale", ["bn"], ["bn"], "scale_param { bias_term: true }", [gamma, beta]),
        Layer(
            "sum", "Eltwise", ["lrn", "bn"], ["sum"], "eltwise_param { operation: SUM coeff: 2 coeff: -0.5 }"
        ),
        Layer("prod", "Eltwise", ["lrn", "bn"], ["prod"], "eltwise_param { operation: PROD }"),
        Layer("max", "Eltwise", ["lrn", "bn"], ["max"], "eltwise_param { operation: MAX }"),
        Layer("cat", "Concat", ["sum", "prod", "max"], ["cat"], "concat_param { axis: 1 }"),
        Layer("flat", "Flatten", ["cat"], ["flat"]),
    ]
    proto, weights = write(tmp_path, layers, (1, c, 4, 5))
    model = load_caffe(proto, weights)
    x = rng.standard_normal((2, c, 4, 5))
    sq = np.pad(x**2, ((0, 0), (1, 1), (0, 0), (0, 0)))
    lrn = x / (1.5 + 0.3 / 3 * (sq[:, :-2] + sq[:, 1:-1] + sq[:, 2:])) ** 0.6  # caffe CrossChannelForward
    v = (1, c, 1, 1)
    bn = (x - (mean / 2).reshape(v)) / np.sqrt((var / 2).reshape(v) + 1e-3) * gamma.reshape(v) + beta.reshape(
        v
    )
    ref = np.concatenate([2 * lrn - 0.5 * bn, lrn * bn, np.maximum(lrn, bn)], axis=1).reshape(2, -1)
    out = model(torch.from_numpy(x.astype(np.float32)))
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-4, atol=1e-5)


def test_train_only_layers_are_skipped_and_net_output_is_the_unconsumed_top(tmp_path, rng):
    layers = lenet_layers(rng)
    text = prototxt(layers, (1, 1, 28, 28))
    text += (
        'layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc" '
        "include { phase: TRAIN } }\n"
    )
    (tmp_path / "n.prototxt").write_text(text)
    (tmp_path / "n.caffemodel").write_bytes(caffemodel(layers))
    model = load_caffe(tmp_path / "n.prototxt", tmp_path / "n.caffemodel")
    assert model.outputs == ["prob"]


def test_models_resolve_and_analyze_cli(tmp_path, rng, capsys):
    from sparsecnn.cli import main

    proto, weights = write(tmp_path, lenet_layers(rng), (1, 1, 28, 28))
    model = resolve(proto, weights=weights)
    assert model.input_shape == (1, 28, 28) and isinstance(model.ip1, nn.Linear)
    assert main(["analyze", proto, "--weights", weights, "--batch", "2"]) == 0
    assert "conv2" in capsys.readouterr().out
    with pytest.raises(SparseCNNError, match=r"pass the deploy \.prototxt"):
        resolve(weights)


# ------------------------------------------------------------------------------------------------
# errors


def test_unsupported_layer_names_layer_and_type(tmp_path):
    layers = [Layer("weird", "Deconvolution", ["data"], ["weird"])]
    (tmp_path / "n.prototxt").write_text(prototxt(layers, (1, 1, 8, 8)))
    with pytest.raises(SparseCNNError, match=r"layer 'weird' has type 'Deconvolution'"):
        load_caffe(tmp_path / "n.prototxt")


def test_blob_shape_that_does_not_fit(tmp_path, rng):
    layers = lenet_layers(rng)
    proto, _ = write(tmp_path, layers, (1, 1, 28, 28))
    layers[2].blobs[0] = _w(rng, 50, 20, 3, 3)
    (tmp_path / "bad.caffemodel").write_bytes(caffemodel(layers))
    with pytest.raises(
        SparseCNNError, match=r"layer 'conv2'.*weight blob has shape \(50, 20, 3, 3\).*\(50, 20, 5, 5\)"
    ):
        load_caffe(proto, tmp_path / "bad.caffemodel")


def test_missing_weights_for_a_layer(tmp_path, rng):
    layers = lenet_layers(rng)
    proto, _ = write(tmp_path, layers, (1, 1, 28, 28))
    (tmp_path / "part.caffemodel").write_bytes(caffemodel(layers[:4]))
    with pytest.raises(SparseCNNError, match=r"layer 'ip1'.*no blobs"):
        load_caffe(proto, tmp_path / "part.caffemodel")


def test_truncated_and_swapped_files(tmp_path, rng):
    proto, weights = write(tmp_path, lenet_layers(rng), (1, 1, 28, 28))
    data = open(weights, "rb").read()
    (tmp_path / "cut.caffemodel").write_bytes(data[: len(data) // 3])
    with pytest.raises(SparseCNNError, match="truncated"):
        load_caffe(proto, tmp_path / "cut.caffemodel")
    with pytest.raises(SparseCNNError, match="not text"):
        read_prototxt(weights)
    with pytest.raises(SparseCNNError, match="does not exist"):
        load_caffe(tmp_path / "none.prototxt")
    (tmp_path / "broken.prototxt").write_text('layer { name: "x" type: "ReLU" bottom: "data" top: "x"')
    with pytest.raises(SparseCNNError, match="not a valid Caffe net definition"):
        load_caffe(tmp_path / "broken.prototxt")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('layer { name: "r" type: "ReLU" bottom: "nothere" top: "r" }', "bottom 'nothere' is not produced"),
        (
            'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
            "pooling_param { kernel_size: 2 stride: 4 } }",
            "stride .* larger than the kernel",
        ),
        (
            'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 3 '
            "kernel_size: 3 group: 2 } }",
            "divisible by group",
        ),
        (
            'layer { name: "n" type: "LRN" bottom: "data" top: "n" lrn_param { local_size: 4 } }',
            "must be odd",
        ),
        (
            'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
            "convolution_param { num_output: 4000000 "
            "kernel_size: 1000 } }",
            "smaller than the",
        ),
    ],
)
def test_bad_layer_configurations(tmp_path, text, match):
    (tmp_path / "n.prototxt").write_text(prototxt([], (1, 2, 8, 8)) + text + "\n")
    with pytest.raises(SparseCNNError, match=match):
        load_caffe(tmp_path / "n.prototxt")


# ------------------------------------------------------------------------------------------------
# fuzzing: our error, never another exception


@pytest.fixture(scope="module")
def valid_lenet(tmp_path_factory):
    d = tmp_path_factory.mktemp("lenet")
    return write(d, lenet_layers(np.random.default_rng(1)), (1, 1, 28, 28))


_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(data=st.binary(max_size=400))
def test_fuzzed_caffemodel_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fz") / "f.caffemodel"
    path.write_bytes(data)
    try:
        read_caffemodel(path)
    except SparseCNNError:
        pass


@_FUZZ
@given(
    cut=st.integers(0, 10**6),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
)
def test_mutated_caffemodel_into_loader(valid_lenet, tmp_path_factory, cut, flips):
    proto, weights = valid_lenet
    data = bytearray(open(weights, "rb").read())
    for pos, value in flips:
        data[pos % len(data)] = value
    data = data[: max(1, cut % (len(data) + 1))]
    path = tmp_path_factory.mktemp("fz") / "m.caffemodel"
    path.write_bytes(bytes(data))
    try:
        load_caffe(proto, path)
    except SparseCNNError:
        pass


@_FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300))
def test_fuzzed_prototxt(valid_lenet, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fz") / "f.prototxt"
    text = open(valid_lenet[0]).read()
    if isinstance(data, str):
        cut = len(data) % (len(text) + 1)
        path.write_text(text[:cut] + data)
    else:
        path.write_bytes(data)
    try:
        load_caffe(path)
    except SparseCNNError:
        pass


def test_caffe_model_compiles_and_matches(tmp_path, rng):
    """The whole-model executor runs an imported Caffe graph (grouped convs, LRN, ceil pooling,
    InnerProduct's flatten axis) and gives the imported model's outputs."""
    import sparsecnn

    layers = alexnet_like_layers(rng)
    proto, weights = write(tmp_path, layers, (10, 3, 35, 35))
    model = load_caffe(proto, weights)
    x = torch.from_numpy(rng.standard_normal((2, 3, 35, 35)).astype(np.float32))
    compiled = sparsecnn.compile(model, x, "direct")
    with torch.no_grad():
        _close(compiled(x), model(x))
    kinds = compiled.steps((2, 3, 35, 35))
    assert "lrn" in kinds and "maxpool" in kinds
