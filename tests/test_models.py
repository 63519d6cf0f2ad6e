"""The model zoo: shapes, layer names, seeded determinism, weight loading and resolve."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparsecnn import SparseCNNError, models

# Big models run at a small input_size so the suite stays fast; the defaults are checked separately.
SMALL = {"alexnet": 67, "lenet5": 28, "mobilenet_v2": 32, "resnet18": 32, "resnet50": 32, "vgg16": 32}


def _convs_and_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_names() -> None:
    assert models.names() == ("alexnet", "lenet5", "mobilenet_v2", "resnet18", "resnet50", "vgg16")


@pytest.mark.parametrize("name", models.names())
def test_forward_shape(name: str) -> None:
    model = models.build(name, num_classes=7, input_size=SMALL[name]).eval()
    c, h, w = models.input_shape(model)
    assert (h, w) == (SMALL[name], SMALL[name])
    with torch.no_grad():
        out = model(torch.randn(2, c, h, w))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [
        ("alexnet", (3, 227, 227), 1000),
        ("lenet5", (1, 28, 28), 10),
        ("mobilenet_v2", (3, 224, 224), 1000),
        ("resnet18", (3, 224, 224), 1000),
        ("resnet50", (3, 224, 224), 1000),
        ("vgg16", (3, 224, 224), 1000),
    ],
)
def test_defaults(name: str, shape: tuple[int, int, int], classes: int) -> None:
    model = models.build(name)
    assert model.input_shape == shape
    assert models.input_shape(model) == shape
    last = list(_convs_and_linears(model).values())[-1]
    assert isinstance(last, nn.Linear) and last.out_features == classes


def test_alexnet_is_bvlc() -> None:
    model = models.build("alexnet")
    layers = _convs_and_linears(model)
    assert list(layers) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    expect = {  # name: (weight shape, stride, padding, groups)
        "conv1": ((96, 3, 11, 11), (4, 4), (0, 0), 1),
        "conv2": ((256, 48, 5, 5), (1, 1), (2, 2), 2),
        "conv3": ((384, 256, 3, 3), (1, 1), (1, 1), 1),
        "conv4": ((384, 192, 3, 3), (1, 1), (1, 1), 2),
        "conv5": ((256, 192, 3, 3), (1, 1), (1, 1), 2),
    }
    for name, (shape, stride, padding, groups) in expect.items():
        conv = layers[name]
        assert tuple(conv.weight.shape) == shape
        assert (conv.stride, conv.padding, conv.groups) == (stride, padding, groups)
    assert tuple(layers["fc6"].weight.shape) == (4096, 9216)
    assert tuple(layers["fc7"].weight.shape) == (4096, 4096)
    assert tuple(layers["fc8"].weight.shape) == (1000, 4096)
    assert sum(p.numel() for p in model.parameters()) == 60_965_224  # Caffe's bvlc_alexnet
    lrn = [m for m in model.modules() if isinstance(m, nn.LocalResponseNorm)]
    assert len(lrn) == 2 and (lrn[0].size, lrn[0].alpha, lrn[0].beta, lrn[0].k) == (5, 1e-4, 0.75, 1.0)
    # Caffe's spatial sizes at 227: 55 -> 27 -> 13 -> 13 -> 13 -> 6.
    sizes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, o.shape[-1]))
             for n, m in layers.items() if n.startswith("conv")]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 227, 227))
    for h in hooks:
        h.remove()
    assert sizes == {"conv1": 55, "conv2": 27, "conv3": 13, "conv4": 13, "conv5": 13}


def test_lenet5_layers_and_small_input() -> None:
    model = models.build("lenet5")
    layers = _convs_and_linears(model)
    assert {n: tuple(m.weight.shape) for n, m in layers.items()} == {
        "conv1": (20, 1, 5, 5), "conv2": (50, 20, 5, 5), "fc1": (500, 800), "fc2": (10, 500),
    }
    small = models.build("lenet5", num_classes=10, in_channels=1, input_size=8)
    layers = _convs_and_linears(small)
    assert [tuple(m.weight.shape)[:2] for m in layers.values()] == [(20, 1), (50, 20), (500, 200), (10, 500)]
    assert small(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_vgg16_layers() -> None:
    model = models.build("vgg16", input_size=64)
    layers = _convs_and_linears(model)
    convs = [n for n in layers if n.startswith("conv")]
    assert convs == ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                     "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
    assert [n for n in layers if n.startswith("fc")] == ["fc6", "fc7", "fc8"]
    assert layers["fc6"].in_features == 512 * 2 * 2  # from input_size 64, not hard-coded 25088
    with torch.device("meta"):
        full = sum(p.numel() for p in models.zoo._vgg16(1000, 3, 224).parameters())
    assert full == 138_357_544  # VGG-16 D


@pytest.mark.parametrize(
    ("name", "params", "n_convs"), [("resnet18", 11_689_512, 20), ("resnet50", 25_557_032, 53)]
)
def test_resnet_layers(name: str, params: int, n_convs: int) -> None:
    model = models.build(name)
    names = dict(model.named_modules())
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == n_convs
    for key in ("conv1", "bn1", "layer1.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2", "fc"):
        assert key in names
    assert isinstance(names["layer2.0.downsample.1"], nn.BatchNorm2d)
    assert names["layer2.0.conv1" if name == "resnet18" else "layer2.0.conv2"].stride == (2, 2)


def test_mobilenet_v2_layers() -> None:
    """MobileNet-v2 (width 1.0) as published and as torchvision names it: 3,504,872 weights, 52 convs of
    which 17 depthwise, ReLU6, 10 residual blocks."""
    model = models.build("mobilenet_v2")
    names = dict(model.named_modules())
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 52
    assert sum(m.groups == m.in_channels == m.out_channels > 1 for m in convs) == 17
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 35
    assert sum(getattr(m, "use_res_connect", False) for m in model.modules()) == 10
    assert names["features.0.0"].stride == (2, 2) and names["features.0.0"].out_channels == 32
    assert names["features.2.conv.1.0"].groups == 96 and names["features.2.conv.1.0"].stride == (2, 2)
    assert names["features.18.0"].out_channels == 1280
    assert isinstance(names["classifier.1"], nn.Linear)


def test_overrides() -> None:
    model = models.build("resnet18", num_classes=5, in_channels=1, input_size=40)
    assert model.input_shape == (1, 40, 40)
    assert tuple(model.conv1.weight.shape) == (64, 1, 7, 7)
    assert model(torch.randn(1, 1, 40, 40)).shape == (1, 5)
    alex = models.build("alexnet", input_size=99, in_channels=1)
    assert alex.fc6.in_features == 256 * 2 * 2


@pytest.mark.parametrize("name", ["lenet5", "alexnet", "resnet18"])
def test_seeded(name: str) -> None:
    state = torch.get_rng_state()
    a = models.build(name, seed=3, input_size=SMALL[name])
    b = models.build(name, seed=3, input_size=SMALL[name])
    c = models.build(name, seed=4, input_size=SMALL[name])
    assert torch.equal(state, torch.get_rng_state()), "building a model must not touch the global RNG"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    for key, value in sa.items():
        assert torch.isfinite(value.float()).all(), key


def test_bad_build() -> None:
    with pytest.raises(SparseCNNError, match=r"unknown model 'resnet'.*alexnet, lenet5"):
        models.build("resnet")
    with pytest.raises(SparseCNNError, match="input_size"):
        models.build("alexnet", input_size=8)
    with pytest.raises(SparseCNNError, match="num_classes must be a positive integer"):
        models.build("lenet5", num_classes=0)


def test_input_shape_of_foreign_module() -> None:
    with pytest.raises(SparseCNNError, match="explicit"):
        models.input_shape(nn.Conv2d(1, 1, 3))


def test_load_weights(tmp_path) -> None:
    src = models.build("lenet5", seed=1)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    dst = models.load_weights(models.build("lenet5", seed=2), path)
    assert torch.equal(dst.fc1.weight, src.fc1.weight)
    # DDP-style prefixes and checkpoint wrappers are unwrapped.
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    assert torch.equal(models.load_weights(models.build("lenet5"), path).conv2.weight, src.conv2.weight)


def test_load_weights_errors(tmp_path) -> None:
    model = models.build("lenet5")
    with pytest.raises(SparseCNNError, match="does not exist"):
        models.load_weights(model, tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(SparseCNNError, match=r"not a file that torch\.save wrote"):
        models.load_weights(model, corrupt)
    whole = tmp_path / "whole.pt"  # a pickled module: torch's advice (weights_only=False) is not passed on
    torch.save(models.build("lenet5"), whole)
    with pytest.raises(SparseCNNError, match="holds pickled Python objects besides tensors") as info:
        models.load_weights(model, whole)
    assert "weights_only" not in str(info.value) and "\x1b" not in str(info.value)
    wrong = tmp_path / "wrong.pt"
    torch.save(models.build("lenet5", num_classes=5).state_dict(), wrong)
    with pytest.raises(SparseCNNError, match=r"'fc2.weight' has shape \(5, 500\) in the file but \(10,"):
        models.load_weights(model, wrong)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in model.state_dict().items() if k != "fc2.bias"}, partial)
    with pytest.raises(SparseCNNError, match=r"'fc2.bias'.*missing"):
        models.load_weights(model, partial)
    extra = tmp_path / "extra.pt"
    torch.save({**model.state_dict(), "fc3.weight": torch.zeros(2)}, extra)
    with pytest.raises(SparseCNNError, match=r"'fc3.weight'.*lacks"):
        models.load_weights(model, extra)
    notdict = tmp_path / "list.pt"
    torch.save([1, 2], notdict)
    with pytest.raises(SparseCNNError, match="does not hold a state dict"):
        models.load_weights(model, notdict)


def test_resolve(tmp_path) -> None:
    model = models.resolve("lenet5", input_size=8)
    assert model.input_shape == (1, 8, 8)
    path = tmp_path / "w.pt"
    torch.save(models.build("lenet5", seed=5).state_dict(), path)
    loaded = models.resolve("lenet5", weights=str(path))
    assert torch.equal(loaded.conv1.weight, models.build("lenet5", seed=5).conv1.weight)
    with pytest.raises(SparseCNNError, match="unknown model 'nope'; choose one of alexnet"):
        models.resolve("nope")


@pytest.mark.parametrize("beta", [0.75, 0.5])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 6])
def test_fast_lrn_matches_torch(size: int, beta: float) -> None:
    from torch import nn

    from sparsecnn.models.zoo import LocalResponseNorm

    x = torch.randn(2, 11, 7, 5, generator=torch.Generator().manual_seed(size)) * 4
    ref = nn.LocalResponseNorm(size, alpha=1e-2, beta=beta, k=0.5)
    ours = LocalResponseNorm(size, alpha=1e-2, beta=beta, k=0.5)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)  # numba kernel (inference)
    xg = x.clone().requires_grad_(True)
    torch.testing.assert_close(ours(xg), ref(x), rtol=1e-5, atol=1e-6)  # autograd records: torch ops
    torch.testing.assert_close(ours(x[:, :, 0]), ref(x[:, :, 0]))  # 3-D: torch's own path
    torch.testing.assert_close(ours(x[:, :, :, ::2]), ref(x[:, :, :, ::2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), [
    (3, 2, 0, 1),  # AlexNet / Caffe
    (2, 2, 0, 1),  # VGG, LeNet
    (3, 2, 1, 1),  # ResNet stem
    ((3, 2), (1, 2), (1, 0), (2, 1)),  # asymmetric, dilated
    (1, 3, 0, 1),  # a strided pick, no max
])
@pytest.mark.parametrize("hw", [(13, 13), (55, 55), (8, 5)])
def test_fast_maxpool_matches_torch(kernel, stride, padding, dilation, ceil_mode, hw) -> None:
    from torch import nn

    from sparsecnn.models.zoo import MaxPool2d

    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(hw[0]))
    x[1, 2, 3, 4] = float("nan")  # propagates as in torch
    x[0, 0, 0, :] = float("-inf")
    ref = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    ours = MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    with torch.inference_mode():
        got = ours(x)
    assert got.shape == ref(x).shape
    torch.testing.assert_close(got, ref(x), rtol=0, atol=0, equal_nan=True)  # float32: the numba pass
    with torch.inference_mode():  # other floats: strided views
        torch.testing.assert_close(ours(x.double()), ref(x.double()), rtol=0, atol=0, equal_nan=True)
        strided = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not C-contiguous
        torch.testing.assert_close(ours(strided), got, rtol=0, atol=0, equal_nan=True)
    # While autograd records, torch's own path (and its gradient) runs.
    xg = x.clone().requires_grad_(True)
    out = ours(xg)
    assert out.grad_fn is not None and "MaxPool" in type(out.grad_fn).__name__


def test_resolve_reads_the_summary_beside_the_weights_or_says_what_is_wrong(tmp_path) -> None:
    small = models.build("lenet5", in_channels=1, input_size=8)
    torch.save(small.state_dict(), tmp_path / "model.pt")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"model": "lenet5", "build": {"in_channels": 1, "input_size": 8}}))
    assert models.resolve("lenet5", weights=tmp_path / "model.pt").fc1.weight.shape == (500, 200)
    summary.write_text("{bad")  # a damaged summary is not silently skipped (the shapes would then mismatch)
    with pytest.raises(SparseCNNError, match=r"summary\.json .* is not valid JSON"):
        models.resolve("lenet5", weights=tmp_path / "model.pt")
    summary.unlink()  # no summary: the remedy names it, not build arguments the command line cannot take
    with pytest.raises(SparseCNNError, match=r"record in summary\.json beside the weights"):
        models.resolve("lenet5", weights=tmp_path / "model.pt")
