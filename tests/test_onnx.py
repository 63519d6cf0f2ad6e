"""ONNX: export -> ONNX Runtime == torch, export -> our import == torch, hand-made graphs, bad files."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sparsecnn import models
from sparsecnn.errors import SparseCNNError
from sparsecnn.io import export_onnx, load_onnx
from sparsecnn.io.caffe import load_caffe
from tests.caffe_writer import write
from tests.test_caffe import alexnet_like_layers


class Net(nn.Module):
    """Every operator the importer maps, as torch emits them (incl. x.view(x.size(0), -1))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.norm1 = nn.LocalResponseNorm(5, 0.05, 0.75, 2.0)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool2 = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=True)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16 * 3 * 3, 16)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.pool1(torch.relu(self.bn1(self.conv1(x)))))
        x = x + self.conv2(x)
        x = self.pool2(torch.cat([x, x * 0.5], 1))
        g = torch.flatten(self.gap(x), 1)
        x = self.drop(x.view(x.size(0), -1))
        return torch.softmax(self.fc(x) + g, dim=1)


@pytest.fixture(scope="module")
def net() -> Net:
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
    m.input_shape = (3, 11, 11)
    return m


def _ort(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_export_runs_in_onnxruntime_and_imports_back(net, tmp_path):
    path = export_onnx(net, tmp_path / "net.onnx")
    graph = onnx.load(path).graph
    assert "LRN" in [n.op_type for n in graph.node]  # one node, not torch's decomposition
    x = torch.randn(4, 3, 11, 11)  # batch 4: the batch dimension is dynamic
    with torch.no_grad():
        ref = net(x)
    np.testing.assert_allclose(_ort(path, x.numpy()), ref.numpy(), rtol=1e-5, atol=1e-6)
    back = load_onnx(path)
    assert back.input_shape == (3, 11, 11)
    names = {n for n, m in back.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert names == {"conv1", "conv2", "fc"}
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref, rtol=1e-5, atol=1e-6)


def test_caffe_import_exports_and_round_trips(tmp_path, rng):
    proto, weights = write(tmp_path, alexnet_like_layers(rng), (1, 3, 35, 35))
    model = load_caffe(proto, weights)
    path = export_onnx(model, tmp_path / "alex.onnx")
    x = torch.from_numpy(rng.standard_normal((2, 3, 35, 35)).astype(np.float32))
    with torch.no_grad():
        ref = model(x)
    np.testing.assert_allclose(_ort(path, x.numpy()), ref.numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(load_onnx(path)(x), ref, rtol=1e-5, atol=1e-6)


def test_sparsified_model_exports_dense_with_its_zeros(tmp_path):
    import sparsecnn
    from sparsecnn.models import apply_profile, build

    model = build("lenet5")
    apply_profile(model, "uniform:0.8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = sparsecnn.sparsify(
            model, {"conv1": "direct", "conv2": "csrmm", "fc1": "spmm", "fc2": "dense"}
        )
    path = export_onnx(sparse, tmp_path / "sparse.onnx")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = sparse(x)
    np.testing.assert_allclose(_ort(path, x.numpy()), ref.numpy(), rtol=1e-4, atol=1e-5)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    assert abs((inits["fc1.weight"] == 0).mean() - 0.8) < 0.01


def _model(nodes, inits, opset=13, in_shape=(2, 3, 4, 4)):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape[1:]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [11, 13])
def test_handmade_graph_matches_onnxruntime(tmp_path, rng, opset):
    f = np.float32
    inits = {
        "w": rng.standard_normal((4, 3, 1, 1)).astype(f),
        "b": rng.standard_normal(4).astype(f),
        "s": rng.standard_normal(4).astype(f),
        "bb": rng.standard_normal(4).astype(f),
        "m": rng.standard_normal(4).astype(f),
        "v": (rng.random(4) + 0.5).astype(f),
        "mm": rng.standard_normal((64, 5)).astype(f),
        "add": rng.standard_normal(5).astype(f),
        "gw": rng.standard_normal((4, 3)).astype(f),
        "gc": rng.standard_normal(3).astype(f),
        "shape": np.array([0, -1], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"], epsilon=1e-3),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "mm"], ["y"]),
        helper.make_node("Add", ["y", "add"], ["z"]),
        helper.make_node("GlobalAveragePool", ["r"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["gf"], axis=1),
        helper.make_node("Gemm", ["gf", "gw", "gc"], ["gg"], alpha=0.5, beta=2.0),
        helper.make_node("Concat", ["z", "gg"], ["cat"], axis=1),
        helper.make_node("Softmax", ["cat"], ["output"], axis=1),
    ]
    path = tmp_path / "g.onnx"
    onnx.save(_model(nodes, inits, opset), path)
    x = rng.standard_normal((2, 3, 4, 4)).astype(f)
    with torch.no_grad():
        got = load_onnx(path)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _ort(path, x), rtol=1e-5, atol=1e-6)


# Padding torch's layers cannot take (one amount for both sides): asymmetric pads, auto_pad SAME,
# pool pads above half the kernel, and Pad nodes, each checked against ONNX Runtime. (ONNX Runtime
# refuses SAME with dilation; test_same_padding_with_dilation checks that against torch.)
_PADDED = {
    "conv asymmetric": [helper.make_node("Conv", ["input", "w"], ["output"], kernel_shape=[3, 3],
                                         strides=[2, 2], pads=[0, 1, 2, 1])],
    "conv same_upper": [helper.make_node("Conv", ["input", "w"], ["output"], kernel_shape=[3, 3],
                                         strides=[2, 2], auto_pad="SAME_UPPER")],
    "conv same_lower": [helper.make_node("Conv", ["input", "w"], ["output"], kernel_shape=[3, 3],
                                         strides=[2, 3], auto_pad="SAME_LOWER")],
    "conv valid": [helper.make_node("Conv", ["input", "w"], ["output"], kernel_shape=[3, 3],
                                    auto_pad="VALID")],
    "maxpool same_upper": [helper.make_node("Relu", ["input"], ["r"]),  # all <= 0: the pads must be -inf
                           helper.make_node("Mul", ["r", "minus"], ["n"]),
                           helper.make_node("MaxPool", ["n"], ["output"], kernel_shape=[3, 3], strides=[2, 2],
                                            auto_pad="SAME_UPPER")],
    "maxpool asymmetric": [helper.make_node("MaxPool", ["input"], ["output"], kernel_shape=[2, 2],
                                            strides=[2, 2], pads=[0, 0, 1, 1])],
    "maxpool above half": [helper.make_node("MaxPool", ["input"], ["output"], kernel_shape=[3, 3],
                                            pads=[2, 2, 2, 2])],
    "avgpool asymmetric": [helper.make_node("AveragePool", ["input"], ["output"], kernel_shape=[3, 3],
                                            strides=[2, 2], pads=[1, 0, 2, 1], count_include_pad=1)],
    "avgpool same_upper excluding pads": [helper.make_node("AveragePool", ["input"], ["output"],
                                                           kernel_shape=[3, 3], strides=[2, 2],
                                                           auto_pad="SAME_UPPER")],
    "avgpool asymmetric excluding pads": [helper.make_node("AveragePool", ["input"], ["output"],
                                                           kernel_shape=[3, 2], pads=[1, 1, 2, 0])],
    "pad constant": [helper.make_node("Pad", ["input", "pads", "value"], ["output"])],
    "pad reflect": [helper.make_node("Pad", ["input", "pads"], ["output"], mode="reflect")],
    "pad edge": [helper.make_node("Pad", ["input", "pads"], ["output"], mode="edge")],
}


@pytest.mark.parametrize("case", sorted(_PADDED))
def test_padding_matches_onnxruntime_in_torch_and_the_executor(case, tmp_path, rng):
    import sparsecnn

    f = np.float32
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(f), "minus": np.array(-1.0, f),
             "pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "value": np.array(1.5, f)}
    nodes = _PADDED[case]
    used = {i for n in nodes for i in n.input}
    path = tmp_path / "p.onnx"
    onnx.save(_model(nodes, {k: v for k, v in inits.items() if k in used}, 13, (2, 3, 7, 8)), path)
    x = rng.standard_normal((2, 3, 7, 8)).astype(f)
    want = _ort(path, x)
    model = load_onnx(path)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    compiled = sparsecnn.compile(model, torch.from_numpy(x), "auto", tune=False)
    np.testing.assert_allclose(compiled.numpy(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_same_padding_with_dilation_is_torchs_same():
    from sparsecnn.io._graph import Pad2d

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (3, 2), dilation=(2, 3), padding="same", bias=False)
    x = torch.randn(1, 2, 9, 10)
    pad = Pad2d(same="upper", kernel=(3, 2), stride=(1, 1), dilation=(2, 3))
    assert pad.amounts(9, 10) == (1, 2, 2, 2)  # total 3 across: 1 left, 2 right (upper)
    with torch.no_grad():
        torch.testing.assert_close(nn.functional.conv2d(pad(x), conv.weight, dilation=(2, 3)), conv(x))
    lower = Pad2d(same="lower", kernel=(3, 3), stride=(2, 2))
    assert lower.amounts(8, 7) == (1, 1, 1, 0)  # 8 rows -> 4 outputs, 1 pad (at the top); 7 -> 4, 2


def test_pad_node_forms_and_a_checkpoint_keeps_them(tmp_path, rng):
    import sparsecnn

    f = np.float32
    x = rng.standard_normal((1, 3, 5, 6)).astype(f)
    # opset 10: pads and value as attributes; opset 18: only the spatial axes named
    old = helper.make_node("Pad", ["input"], ["output"], pads=[0, 0, 2, 1, 0, 0, 0, 3], value=-2.0)
    onnx.save(_model([old], {}, 10, x.shape), tmp_path / "a.onnx")
    new = helper.make_node("Pad", ["input", "pads", "", "axes"], ["p"], mode="edge")
    conv = helper.make_node("Conv", ["p", "w"], ["c"], kernel_shape=[3, 3], auto_pad="SAME_UPPER",
                            strides=[2, 2])
    avg = helper.make_node("AveragePool", ["c"], ["output"], kernel_shape=[2, 2], auto_pad="SAME_LOWER")
    inits = {"pads": np.array([1, 0, 2, 1], np.int64), "axes": np.array([-1, 2], np.int64),
             "w": rng.standard_normal((4, 3, 3, 3)).astype(f)}
    onnx.save(_model([new, conv, avg], inits, 18, x.shape), tmp_path / "b.onnx")
    for name in ("a.onnx", "b.onnx"):
        model = load_onnx(tmp_path / name)
        want = _ort(tmp_path / name, x)
        np.testing.assert_allclose(model(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-5, atol=1e-5)
        if name == "a.onnx":
            continue
        sparse = sparsecnn.sparsify(model, "direct")
        sparsecnn.save(sparse, tmp_path / f"{name}.npz")
        again = sparsecnn.load(tmp_path / f"{name}.npz")
        with torch.no_grad():
            np.testing.assert_allclose(again(torch.from_numpy(x)).numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("node", "message"), [
    (helper.make_node("Pad", ["input", "pads"], ["output"]), "only the spatial axes"),
    (helper.make_node("Pad", ["input", "crop"], ["output"]), "negative pads"),
    (helper.make_node("Pad", ["input", "pads"], ["output"], mode="wrap"), "mode 'wrap' is not supported"),
    (helper.make_node("Conv", ["input", "w"], ["output"], kernel_shape=[3, 3], auto_pad="SAME"),
     "unknown auto_pad 'SAME'"),
    (helper.make_node("MaxPool", ["input"], ["output"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1,
                      auto_pad="SAME_UPPER"), "ceil_mode with asymmetric"),
    (helper.make_node("AveragePool", ["input"], ["output"], kernel_shape=[2, 2], pads=[0, 2, 0, 0]),
     "windows without input pixels"),
])
def test_padding_that_is_not_supported_is_named(node, message, tmp_path, rng):
    inits = {"pads": np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64),
             "crop": np.array([0, 0, -1, 0, 0, 0, 0, 0], np.int64),
             "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)}
    used = set(node.input)
    onnx.save(_model([node], {k: v for k, v in inits.items() if k in used}), tmp_path / "bad.onnx")
    with pytest.raises(SparseCNNError, match=message):
        load_onnx(tmp_path / "bad.onnx")


def test_torch_exported_padding_modules_import_and_compile(tmp_path):
    """torch's exporter computes a Pad node's pads with ConstantOfShape / Concat / Reshape / Slice /
    Transpose / Cast: folded at import into one padding step, which the executor runs."""
    import sparsecnn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ZeroPad2d((1, 2, 0, 1)), nn.ReLU(),
                        nn.ReflectionPad2d((1, 0, 2, 1)), nn.ConstantPad2d((0, 1, 2, 0), -0.75),
                        nn.ReplicationPad2d(1), nn.Conv2d(4, 3, 3, stride=2)).eval()
    x = torch.randn(2, 2, 9, 8)
    path = export_onnx(net, tmp_path / "pads.onnx", input_shape=(2, 9, 8))
    model = load_onnx(path)
    assert sum(type(m).__name__ == "Pad2d" for m in model.children()) == 4
    compiled = sparsecnn.compile(model, x, "direct")
    assert compiled.program(tuple(x.shape)).kinds.count("pad") == 4
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_ort(path, x.numpy()), net(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_shape_arithmetic_on_run_time_tensors_is_named(tmp_path):
    nodes = [helper.make_node("Transpose", ["input"], ["output"], perm=[0, 1, 3, 2], name="t1")]
    onnx.save(_model(nodes, {}), tmp_path / "t.onnx")
    with pytest.raises(SparseCNNError, match=r"'t1' \(Transpose\): Transpose of a tensor computed at run"):
        load_onnx(tmp_path / "t.onnx")


def test_unsupported_operator_names_node_and_type(tmp_path):
    nodes = [helper.make_node("Sin", ["input"], ["output"], name="act7")]
    path = tmp_path / "s.onnx"
    onnx.save(_model(nodes, {}), path)
    with pytest.raises(SparseCNNError, match=r"node 'act7' \(Sin\): operator 'Sin' is not supported"):
        load_onnx(path)


def test_bad_files(tmp_path):
    with pytest.raises(SparseCNNError, match="does not exist"):
        load_onnx(tmp_path / "none.onnx")
    (tmp_path / "t.onnx").write_bytes(b"\x08\x07\x12\x05garbage-that-is-not-onnx")
    with pytest.raises(SparseCNNError):
        load_onnx(tmp_path / "t.onnx")
    with pytest.raises(SparseCNNError, match="input shape is unknown"):
        export_onnx(nn.Linear(3, 2), tmp_path / "x.onnx")
    with pytest.raises(SparseCNNError, match="does not exist"):
        export_onnx(nn.Linear(3, 2), tmp_path / "nodir" / "x.onnx", input_shape=(3,))


def test_export_cli(tmp_path, capsys):
    from sparsecnn.cli import main

    out = tmp_path / "lenet.onnx"
    assert main(["export", "lenet5", "--profile", "uniform:0.5", "--onnx", str(out), "--check"]) == 0
    assert "ok" in capsys.readouterr().out and out.exists()
    assert main(["export", "nosuchmodel", "--onnx", str(out)]) == 2


@pytest.fixture(scope="module")
def valid_onnx(tmp_path_factory, net):
    return open(export_onnx(net, tmp_path_factory.mktemp("o") / "v.onnx"), "rb").read()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cut=st.integers(0, 10**7),
    flips=st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), max_size=6),
    raw=st.binary(max_size=200),
    use_raw=st.booleans(),
)
def test_fuzzed_onnx_bytes(valid_onnx, tmp_path_factory, cut, flips, raw, use_raw):
    data = bytearray(raw if use_raw else valid_onnx)
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    data = data[: cut % (len(data) + 1)]
    path = tmp_path_factory.mktemp("fz") / "f.onnx"
    path.write_bytes(bytes(data))
    try:
        load_onnx(path)
    except SparseCNNError:
        pass


def test_zoo_alexnet_exports_one_node_per_pool_and_lrn(tmp_path):
    # The zoo's fast MaxPool2d / LocalResponseNorm stand aside while the exporter traces.
    model = models.build("alexnet").eval()
    graph = onnx.load(export_onnx(model, tmp_path / "alexnet.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MaxPool") == 3 and ops.count("LRN") == 2 and "Max" not in ops


def test_a_scalar_inf_is_a_value_but_not_as_a_weight(tmp_path, rng):
    """-inf pads a max pool (torch writes F.pad's value as a scalar Constant); a one-element weight or
    bias that is inf is still refused."""
    f = np.float32
    pad = helper.make_node("Pad", ["input", "pads", "minf"], ["p"])
    pool = helper.make_node("MaxPool", ["p"], ["output"], kernel_shape=[2, 2])
    inits = {"pads": np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64), "minf": np.array(-np.inf, f)}
    onnx.save(_model([pad, pool], inits), tmp_path / "ok.onnx")
    x = rng.standard_normal((2, 3, 4, 4)).astype(f)
    with torch.no_grad():
        np.testing.assert_allclose(load_onnx(tmp_path / "ok.onnx")(torch.from_numpy(x)).numpy(),
                                   _ort(tmp_path / "ok.onnx", x))
    conv = helper.make_node("Conv", ["input", "w", "b"], ["output"], kernel_shape=[1, 1])
    inits = {"w": rng.standard_normal((1, 3, 1, 1)).astype(f), "b": np.array([np.inf], f)}
    onnx.save(_model([conv], inits), tmp_path / "bad.onnx")
    with pytest.raises(SparseCNNError, match=r"the bias \('b'\) holds 1 NaN/Inf"):
        load_onnx(tmp_path / "bad.onnx")


def test_imported_padding_exports_as_single_nodes(tmp_path, rng):
    """Pad2d and AvgPoolPadded go back to ONNX as one Pad / AveragePool node each, and the file runs
    in ONNX Runtime as the original does."""
    f = np.float32
    nodes = [helper.make_node("Pad", ["input", "pads"], ["p0"], mode="reflect"),
             helper.make_node("Conv", ["p0", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2],
                              auto_pad="SAME_UPPER"),
             helper.make_node("MaxPool", ["c"], ["m"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
             helper.make_node("AveragePool", ["m"], ["output"], kernel_shape=[3, 3], strides=[2, 2],
                              auto_pad="SAME_LOWER")]
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(f),
             "pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}
    onnx.save(_model(nodes, inits, 13, (1, 3, 17, 15)), tmp_path / "a.onnx")
    path = export_onnx(load_onnx(tmp_path / "a.onnx"), tmp_path / "b.onnx", input_shape=(3, 17, 15))
    ops = [n.op_type for n in onnx.load(path).graph.node if n.op_type != "Constant"]
    assert ops == ["Pad", "Pad", "Conv", "Pad", "MaxPool", "AveragePool"], ops
    x = rng.standard_normal((2, 3, 17, 15)).astype(f)
    want = np.concatenate([_ort(tmp_path / "a.onnx", x[i : i + 1]) for i in range(2)])
    np.testing.assert_allclose(_ort(path, x), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(load_onnx(path)(torch.from_numpy(x)).numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [10, 13])
def test_clip_and_activations_match_onnxruntime(tmp_path, rng, opset):
    """Clip (bounds as attributes before opset 11, as inputs after, either missing), LeakyRelu,
    Sigmoid and Tanh; in torch, in the executor and through a checkpoint."""
    import sparsecnn

    f = np.float32
    if opset < 11:
        clips = [helper.make_node("Clip", ["c"], ["k1"], min=0.0, max=6.0),
                 helper.make_node("Clip", ["k1"], ["k2"], max=2.5)]
    else:
        clips = [helper.make_node("Clip", ["c", "zero", "six"], ["k1"]),
                 helper.make_node("Clip", ["k1", "", "top"], ["k2"])]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), *clips,
             helper.make_node("LeakyRelu", ["c"], ["l"], alpha=0.2),
             helper.make_node("Sigmoid", ["l"], ["s"]), helper.make_node("Tanh", ["c"], ["t"]),
             helper.make_node("Add", ["k2", "s"], ["a"]), helper.make_node("Add", ["a", "t"], ["output"])]
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(f) * 3}
    if opset >= 11:
        inits |= {"zero": np.array(0.0, f), "six": np.array(6.0, f), "top": np.array(2.5, f)}
    onnx.save(_model(nodes, inits, opset, (2, 3, 6, 6)), tmp_path / "a.onnx")
    x = rng.standard_normal((2, 3, 6, 6)).astype(f)
    want = _ort(tmp_path / "a.onnx", x)
    model = load_onnx(tmp_path / "a.onnx")
    kinds = {type(m).__name__ for m in model.children()}
    assert kinds >= {"ReLU6", "Hardtanh", "LeakyReLU", "Sigmoid", "Tanh"}, kinds
    compiled = sparsecnn.compile(model, torch.from_numpy(x), "direct")
    assert compiled.program(x.shape).kinds.count("clamp") == 2
    sparsecnn.save(sparsecnn.sparsify(model, "direct"), tmp_path / "a.npz")
    with torch.no_grad():
        for got in (model(torch.from_numpy(x)), compiled(torch.from_numpy(x)),
                    sparsecnn.load(tmp_path / "a.npz")(torch.from_numpy(x))):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_clip_bounds_that_are_not_an_interval_are_named(tmp_path):
    nodes = [helper.make_node("Clip", ["input"], ["output"], min=2.0, max=1.0, name="c9")]
    onnx.save(_model(nodes, {}, 10), tmp_path / "c.onnx")
    with pytest.raises(SparseCNNError, match=r"'c9' \(Clip\): Clip bounds \[2.0, 1.0\] are not an interval"):
        load_onnx(tmp_path / "c.onnx")
