"""The model zoo: LeNet-5 (Caffe), AlexNet (BVLC/Caffe), VGG-16 (configuration D), ResNet-18/50,
MobileNet-v2.

Every model is built from its published definition with readable layer names (``conv1`` ... ``fc8``,
``layer1.0.conv1``), so that per-layer sparsity profiles and reports can name layers the way the
papers do. Each built model carries ``input_shape`` = (C, H, W), the input it was sized for.

Initialisation is seeded through a local :class:`torch.Generator`: the model is first created on the
``meta`` device (no memory, no random numbers drawn), then materialised and initialised from the
generator, so building a model never changes the global torch RNG state.

References
----------
LeCun et al., "Gradient-based learning applied to document recognition", 1998 (Caffe's ``lenet``).
Krizhevsky et al., "ImageNet classification with deep convolutional neural networks", NIPS 2012
(as ``bvlc_alexnet`` in Caffe). Simonyan & Zisserman, "Very deep convolutional networks", ICLR 2015.
He et al., "Deep residual learning for image recognition", CVPR 2016. Sandler et al.,
"MobileNetV2: inverted residuals and linear bottlenecks", CVPR 2018 (torchvision's layer names).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsecnn.errors import SparseCNNError
from sparsecnn.models._memory import check_fits

__all__ = ["build", "input_shape", "load_weights", "names", "resolve"]


# --------------------------------------------------------------------------------------------------
# shape helpers


def _feature_hw(make: Callable[[], nn.Module], in_channels: int, size: int, model: str) -> tuple[int, ...]:
    """Output shape (C, H, W) of the module ``make()`` for one (in_channels, size, size) image.

    The module is built and run on the ``meta`` device: a dry shape calculation that costs nothing.
    """
    with torch.device("meta"):
        module = make().eval()  # BatchNorm in training mode refuses a 1x1 map of one image
        try:
            out = module(torch.empty(1, in_channels, size, size))
        except RuntimeError as exc:
            raise SparseCNNError(
                f"{model}: input_size {size} is too small for its convolutions and pools ({exc}); "
                f"use a larger input_size"
            ) from None
    shape = tuple(int(d) for d in out.shape[1:])
    if any(d <= 0 for d in shape):
        raise SparseCNNError(f"{model}: input_size {size} is too small; use a larger input_size")
    return shape


def _check_positive(model: str, **values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SparseCNNError(f"{model}: {key} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------------
# LeNet-5 (Caffe examples/mnist/lenet_train_test.prototxt)


def _lenet5_features(in_channels: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, 20, 5, padding=padding),
            pool1=MaxPool2d(2, 2),
            conv2=nn.Conv2d(20, 50, 5, padding=padding),
            pool2=MaxPool2d(2, 2),
            flatten=nn.Flatten(),
        )
    )


def _lenet5(num_classes: int, in_channels: int, input_size: int) -> nn.Sequential:
    # Caffe's LeNet has no padding: 28 -> 24 -> 12 -> 8 -> 4. That geometry needs input_size >= 16.
    # Below that (sklearn's 8x8 digits) both convolutions pad 2 ("same"), keeping the 20/50/500/10
    # widths: 8 -> 8 -> 4 -> 4 -> 2, so fc1 sees 50*2*2 = 200 inputs.
    padding = 0 if input_size >= 16 else 2
    (flat,) = _feature_hw(lambda: _lenet5_features(in_channels, padding), in_channels, input_size, "lenet5")
    features = _lenet5_features(in_channels, padding)
    return nn.Sequential(
        OrderedDict(
            [
                *features.named_children(),
                ("fc1", nn.Linear(flat, 500)),  # 50*4*4 = 800 at 28x28
                ("relu1", nn.ReLU(inplace=True)),
                ("fc2", nn.Linear(500, num_classes)),
            ]
        )
    )


# --------------------------------------------------------------------------------------------------
# AlexNet (Caffe models/bvlc_alexnet/deploy.prototxt)


class LocalResponseNorm(nn.LocalResponseNorm):
    r"""``torch.nn.LocalResponseNorm`` (and Caffe's ``ACROSS_CHANNELS`` LRN), computed with a running sum.

    .. math:: b_c = a_c \left(k + \frac{\alpha}{n} \sum_{c'=c-\lfloor n/2 \rfloor}^{c+\lfloor (n-1)/2 \rfloor}
              a_{c'}^2\right)^{-\beta}

    Same parameters and outputs as torch's module, whose CPU implementation (a 3-D average pooling
    over the squares) costs more than all of AlexNet's convolutions at batch 1 (17 ms of 42 ms on
    2 cores). Here the window sum is ``size`` shifted adds of the padded squares and the power, for
    Caffe's beta = 0.75, is ``rsqrt(d) * sqrt(rsqrt(d))``. In CPU inference (float32, no autograd
    recording) the same sums run fused in one numba pass (:mod:`sparsecnn.kernels.lrn`). Inputs that
    are not (B, C, H, W) use torch's path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        if x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0 and not _records(x):
            # Inference on the CPU: one fused pass (sparsecnn.kernels.lrn), 4-6x fewer ms.
            from sparsecnn.kernels.lrn import lrn_across_channels

            xc = x.detach().contiguous()
            out = torch.empty_like(xc)
            lrn_across_channels(xc.numpy(), self.size, self.alpha, self.beta, self.k, out.numpy())
            return out
        c = x.shape[1]
        front, back = self.size // 2, (self.size - 1) // 2
        sq = torch.nn.functional.pad(x.square(), (0, 0, 0, 0, front, back))
        window = sq[:, :c].clone()
        for j in range(1, self.size):
            window += sq[:, j:j + c]
        d = window.mul_(self.alpha / self.size).add_(self.k)
        if self.beta == 0.75:
            r = d.rsqrt_()
            return x * r * r.sqrt()
        return x * d.pow_(-self.beta)


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d``, computed as separable maxima of strided views in inference.

    Same parameters and outputs as torch's module (NaN propagates, padding counts as -inf,
    ``ceil_mode`` drops a last window that starts in the right padding). torch's CPU kernel for a
    contiguous (B, C, H, W) tensor at batch 1 takes about 34 ns per output on one core: AlexNet's
    three pools cost 2 ms on 2 cores, more than its 90%-sparse conv2..conv5 together. Here the max
    over each window's ``kw`` columns is ``kw - 1`` elementwise maxima of strided views, then the
    same over ``kh`` rows: 4-5x faster; for float32 the executor's numba pass
    (:func:`sparsecnn.kernels.elementwise.max_pool2d`) runs instead, 2-2.5x faster again (AlexNet's
    pool1 at batch 1: 0.35 -> 0.15 ms, 2 threads). While autograd records (training), and for
    indices, torch's own path runs, so gradients keep its tie-breaking.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 4 or self.return_indices or x.device.type != "cpu" or not x.is_floating_point()
                or _records(x)):
            return super().forward(x)
        (kh, kw), (sh, sw) = _pair(self.kernel_size), _pair(self.stride or self.kernel_size)
        (ph, pw), (dh, dw) = _pair(self.padding), _pair(self.dilation)
        h, w = x.shape[-2:]
        ho = _pooled_size(h, kh, sh, ph, dh, self.ceil_mode)
        wo = _pooled_size(w, kw, sw, pw, dw, self.ceil_mode)
        if ho <= 0 or wo <= 0:
            return super().forward(x)  # torch's own error for an input smaller than the window
        if x.dtype == torch.float32 and x.numel() > 0 and 2 * ph <= kh and 2 * pw <= kw:
            # One numba pass (sparsecnn.kernels.elementwise, the executor's pool): 2-2.5x the views below.
            from sparsecnn.kernels.elementwise import max_pool2d

            xc = x.detach().contiguous()
            out = torch.empty((*x.shape[:2], ho, wo), dtype=torch.float32)
            max_pool2d(xc.numpy(), out.numpy(), (kh, kw), (sh, sw), (ph, pw), (dh, dw))
            return out
        need_h, need_w = (ho - 1) * sh + (kh - 1) * dh + 1, (wo - 1) * sw + (kw - 1) * dw + 1
        bottom, right = max(0, need_h - h - ph), max(0, need_w - w - pw)
        if ph or pw or bottom or right:
            x = torch.nn.functional.pad(x, (pw, right, ph, bottom), value=-math.inf)
        cols = [x[..., t * dw : t * dw + (wo - 1) * sw + 1 : sw] for t in range(kw)]
        r = cols[0]
        for c in cols[1:]:
            r = torch.maximum(r, c)
        rows = [r[..., t * dh : t * dh + (ho - 1) * sh + 1 : sh, :] for t in range(kh)]
        out = rows[0]
        for c in rows[1:]:
            out = torch.maximum(out, c)
        return out if kh > 1 or kw > 1 else out.contiguous()


def _records(x: torch.Tensor) -> bool:
    """Whether autograd records ``x``'s ops or a tracer (ONNX export) watches: the fast inference paths
    stand aside, so gradients and exported graphs are torch's own (one MaxPool / LRN node)."""
    return (torch.is_grad_enabled() and x.requires_grad) or torch.jit.is_tracing()


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pooled_size(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooled length: with ``ceil_mode`` a last window starting in the right padding is dropped."""
    span = n + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def _lrn_caffe() -> nn.LocalResponseNorm:
    # Caffe LRN across channels: local_size 5, alpha 1e-4, beta 0.75, k 1 (torch also divides alpha by n).
    return LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)


def _pool3s2() -> nn.MaxPool2d:
    # Caffe rounds pooled sizes up; at 227x227 this gives the published 55 -> 27 -> 13 -> 6.
    return MaxPool2d(3, 2, ceil_mode=True)


def _alexnet_features(in_channels: int, dry: bool = False) -> list[tuple[str, nn.Module]]:
    # dry: LRN keeps the shape, and its meta-device forward costs a second of one-off tracing setup.
    _lrn = nn.Identity if dry else _lrn_caffe
    return [
        ("conv1", nn.Conv2d(in_channels, 96, 11, stride=4)),
        ("relu1", nn.ReLU(inplace=True)),
        ("norm1", _lrn()),
        ("pool1", _pool3s2()),
        ("conv2", nn.Conv2d(96, 256, 5, padding=2, groups=2)),
        ("relu2", nn.ReLU(inplace=True)),
        ("norm2", _lrn()),
        ("pool2", _pool3s2()),
        ("conv3", nn.Conv2d(256, 384, 3, padding=1)),
        ("relu3", nn.ReLU(inplace=True)),
        ("conv4", nn.Conv2d(384, 384, 3, padding=1, groups=2)),
        ("relu4", nn.ReLU(inplace=True)),
        ("conv5", nn.Conv2d(384, 256, 3, padding=1, groups=2)),
        ("relu5", nn.ReLU(inplace=True)),
        ("pool5", _pool3s2()),
        ("flatten", nn.Flatten()),
    ]


def _alexnet(num_classes: int, in_channels: int, input_size: int) -> nn.Sequential:
    (flat,) = _feature_hw(
        lambda: nn.Sequential(OrderedDict(_alexnet_features(in_channels, dry=True))), in_channels, input_size,
        "alexnet",
    )
    return nn.Sequential(
        OrderedDict(
            [
                *_alexnet_features(in_channels),
                ("fc6", nn.Linear(flat, 4096)),  # 256*6*6 = 9216 at 227x227
                ("relu6", nn.ReLU(inplace=True)),
                ("drop6", nn.Dropout(0.5)),
                ("fc7", nn.Linear(4096, 4096)),
                ("relu7", nn.ReLU(inplace=True)),
                ("drop7", nn.Dropout(0.5)),
                ("fc8", nn.Linear(4096, num_classes)),
            ]
        )
    )


# --------------------------------------------------------------------------------------------------
# VGG-16, configuration D (Simonyan & Zisserman table 1)

_VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def _vgg16_features(in_channels: int) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = []
    c = in_channels
    for stage, (width, depth) in enumerate(_VGG16_STAGES, start=1):
        for i in range(1, depth + 1):
            layers.append((f"conv{stage}_{i}", nn.Conv2d(c, width, 3, padding=1)))
            layers.append((f"relu{stage}_{i}", nn.ReLU(inplace=True)))
            c = width
        layers.append((f"pool{stage}", MaxPool2d(2, 2)))
    layers.append(("flatten", nn.Flatten()))
    return layers


def _vgg16(num_classes: int, in_channels: int, input_size: int) -> nn.Sequential:
    # No adaptive pooling (the original network has none): fc6's input is 512 * (input_size/32)^2.
    (flat,) = _feature_hw(
        lambda: nn.Sequential(OrderedDict(_vgg16_features(in_channels))), in_channels, input_size, "vgg16"
    )
    return nn.Sequential(
        OrderedDict(
            [
                *_vgg16_features(in_channels),
                ("fc6", nn.Linear(flat, 4096)),  # 512*7*7 = 25088 at 224x224
                ("relu6", nn.ReLU(inplace=True)),
                ("drop6", nn.Dropout(0.5)),
                ("fc7", nn.Linear(4096, 4096)),
                ("relu7", nn.ReLU(inplace=True)),
                ("drop7", nn.Dropout(0.5)),
                ("fc8", nn.Linear(4096, num_classes)),
            ]
        )
    )


# --------------------------------------------------------------------------------------------------
# ResNet-18 / ResNet-50 (He et al. 2016, table 1; stride on the 3x3 conv as in torchvision "v1.5")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), with an identity or projection shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class ResNet(nn.Module):
    """ResNet for ImageNet-style inputs: 7x7/2 stem, 3x3/2 max pool, four stages, global average pool."""

    def __init__(
        self, block: type[BasicBlock | Bottleneck], depths: tuple[int, int, int, int], num_classes: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = MaxPool2d(3, stride=2, padding=1)
        in_planes = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True), start=1):
            blocks = []
            for j in range(depth):
                blocks.append(block(in_planes, planes, stride=2 if (i > 1 and j == 0) else 1))
                in_planes = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def _resnet(block: type[BasicBlock | Bottleneck], depths: tuple[int, int, int, int], name: str):
    def make(num_classes: int, in_channels: int, input_size: int) -> ResNet:
        # The global average pool makes fc independent of input_size; the dry run only checks it fits.
        def trunk() -> nn.Module:
            net = ResNet(block, depths, num_classes, in_channels)
            return nn.Sequential(net.conv1, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)

        _feature_hw(trunk, in_channels, input_size, name)
        return ResNet(block, depths, num_classes, in_channels)

    return make


# --------------------------------------------------------------------------------------------------
# MobileNet-v2 (Sandler et al., CVPR 2018), width 1.0, with torchvision's layer names

# (expansion t, output channels c, repeats n, first stride s): the paper's Table 2
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNet-v2's block: 1x1 expansion (t > 1) + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection,
    each with BatchNorm; the input added where the shape is kept (stride 1, ``cin == cout``)."""

    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        mid = cin * t
        layers: list[nn.Module] = [] if t == 1 else [_conv_bn_relu6(cin, mid, 1)]
        layers += [_conv_bn_relu6(mid, mid, 3, stride, groups=mid), nn.Conv2d(mid, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _mobilenet_v2_features(in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = [_conv_bn_relu6(in_channels, 32, 3, 2)]
    cin = 32
    for t, c, n, s in _MOBILENET_V2:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers.append(_conv_bn_relu6(cin, 1280, 1))
    return nn.Sequential(*layers)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.features = _mobilenet_v2_features(in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def _mobilenet_v2(num_classes: int, in_channels: int, input_size: int) -> MobileNetV2:
    _feature_hw(lambda: _mobilenet_v2_features(in_channels), in_channels, input_size, "mobilenet_v2")
    return MobileNetV2(num_classes, in_channels)


# --------------------------------------------------------------------------------------------------
# registry

# name -> (constructor, default (num_classes, in_channels, input_size))
_ZOO: dict[str, tuple[Callable[[int, int, int], nn.Module], tuple[int, int, int]]] = {
    "alexnet": (_alexnet, (1000, 3, 227)),
    "lenet5": (_lenet5, (10, 1, 28)),
    "mobilenet_v2": (_mobilenet_v2, (1000, 3, 224)),
    "resnet18": (_resnet(BasicBlock, (2, 2, 2, 2), "resnet18"), (1000, 3, 224)),
    "resnet50": (_resnet(Bottleneck, (3, 4, 6, 3), "resnet50"), (1000, 3, 224)),
    "vgg16": (_vgg16, (1000, 3, 224)),
}


def names() -> tuple[str, ...]:
    """Names of the zoo models, sorted: ``("alexnet", "lenet5", "mobilenet_v2", "resnet18", "resnet50",
    "vgg16")``."""
    return tuple(sorted(_ZOO))


@torch.no_grad()
def _init_(model: nn.Module, generator: torch.Generator) -> None:
    """Initialise every parameter and buffer of a freshly materialised model from ``generator``.

    Convolutions: He normal (fan_out, ReLU), zero bias, as torchvision does for these models.
    Linear layers: Gaussian with the variance of PyTorch's default (std 1/sqrt(3 fan_in)), as Caffe's
    Gaussian fillers of the BVLC models are bell-shaped; bias uniform +-1/sqrt(fan_in) (PyTorch's
    default). Not PyTorch's uniform weight: pruned by magnitude, a uniform weight leaves two flat bands
    that no trained layer has, and quantization and Huffman coding would be measured on those.
    BatchNorm: weight 1, bias 0, running statistics of the identity.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.in_features)
            nn.init.normal_(module.weight, 0.0, bound / math.sqrt(3.0), generator=generator)
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.reset_running_stats()
        elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(False)):
            raise AssertionError(f"zoo init does not know how to initialise {name} ({type(module).__name__})")


def build(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    input_size: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build a zoo model with seeded weights.

    Parameters
    ----------
    name : str
        One of :func:`names`.
    num_classes, in_channels, input_size : int, optional
        Override the model's defaults (lenet5: 10, 1, 28; alexnet: 1000, 3, 227; vgg16, resnet18,
        resnet50, mobilenet_v2: 1000, 3, 224). Fully connected input sizes follow from ``input_size`` by a dry
        shape calculation.
    seed : int
        Seed of the local generator the weights are drawn from; the global RNG is not touched.

    Returns
    -------
    torch.nn.Module
        In training mode, on the CPU, float32, with attribute ``input_shape`` = (C, H, W).
    """
    if name not in _ZOO:
        raise SparseCNNError(f"unknown model {name!r}; choose one of {', '.join(names())}")
    make, (d_classes, d_channels, d_size) = _ZOO[name]
    num_classes = d_classes if num_classes is None else num_classes
    in_channels = d_channels if in_channels is None else in_channels
    input_size = d_size if input_size is None else input_size
    _check_positive(name, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SparseCNNError(f"{name}: seed must be an integer, got {seed!r}")

    with torch.device("meta"):  # no allocation and no draws from the global RNG
        model = make(num_classes, in_channels, input_size)
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    check_fits(
        nbytes,
        f"{name} with num_classes={num_classes}, in_channels={in_channels}, input_size={input_size} "
        f"({sum(p.numel() for p in model.parameters()):,} weights)",
        "use a smaller input_size or num_classes",
    )
    model = model.to_empty(device="cpu")
    _init_(model, torch.Generator().manual_seed(seed))
    model.input_shape = (in_channels, input_size, input_size)
    model.zoo_name = name
    return model


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """The (C, H, W) input a model was built for (its ``input_shape`` attribute).

    Raises
    ------
    SparseCNNError
        For a module that does not carry ``input_shape`` (anything not built by the zoo or a loader).
    """
    shape = getattr(model, "input_shape", None)
    if (
        isinstance(shape, tuple)
        and len(shape) == 3
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        return shape
    raise SparseCNNError(
        f"{type(model).__name__} does not record its input shape; pass an explicit (C, H, W) input shape "
        f"or set model.input_shape = (C, H, W)"
    )


def _state_dict_from(obj: Any, path: str) -> Mapping[str, torch.Tensor]:
    # Accept a bare state dict or a training checkpoint that wraps one.
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise SparseCNNError(
            f"weights file {path} does not hold a state dict (a mapping of names to tensors); "
            f"save one with torch.save(model.state_dict(), path)"
        )
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


_BUILD_HINT = "build the model with matching num_classes/in_channels/input_size"


def load_weights(model: nn.Module, path: str | os.PathLike[str], *,
                 build_hint: str = _BUILD_HINT) -> nn.Module:
    """Load a state dict file (``torch.save(model.state_dict(), path)``) into ``model`` in place;
    ``build_hint`` is the remedy a shape mismatch names.

    Raises
    ------
    SparseCNNError
        If the file is missing or not a readable torch file, or its state dict does not fit the model:
        the message names the first missing, unexpected or mismatched key and both shapes.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise SparseCNNError(f"weights file {path} is a directory; pass the state dict file in it (sparsecnn "
                             f"train and prune write model.pt)")
    if not os.path.isfile(path):
        raise SparseCNNError(f"weights file {path} does not exist; pass the path of a saved state dict")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, RuntimeError) for a bad file
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours some messages
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # what torch.save writes
        if not zipped:
            why = "not a file that torch.save wrote"
        elif "Weights only load failed" in text:
            # torch's own advice (weights_only=False) would run the file's pickled code: not given here
            why = "it holds pickled Python objects besides tensors, e.g. a whole model, which are not loaded"
        else:
            why = text.splitlines()[0] if text else type(exc).__name__
        raise SparseCNNError(
            f"weights file {path} is not a readable torch state dict ({why}); save one with "
            f"torch.save(model.state_dict(), path) (an ONNX or Caffe model is passed as the MODEL itself)"
        ) from None
    state = _state_dict_from(obj, path)
    own = model.state_dict()
    for key, tensor in own.items():
        if key not in state:
            raise SparseCNNError(
                f"weights file {path} does not fit the model: key {key!r} (shape {tuple(tensor.shape)}) "
                f"is missing from the file; check that the file was saved from the same model"
            )
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise SparseCNNError(
                f"weights file {path} does not fit the model: key {key!r} has shape "
                f"{tuple(state[key].shape)} in the file but {tuple(tensor.shape)} in the model; {build_hint}"
            )
    for key in state:
        if key not in own:
            raise SparseCNNError(
                f"weights file {path} does not fit the model: the file has key {key!r} "
                f"(shape {tuple(state[key].shape)}) that the model lacks; "
                f"check that it was saved from the same model"
            )
    check_finite(state.items(), f"weights file {path}")
    model.load_state_dict(state, strict=True)
    return model


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Raise :class:`SparseCNNError` naming the first floating-point tensor that holds NaN or Inf.

    Such weights make every sparsity, byte count and output that follows meaningless, so they are
    refused where they enter: a weights file, an imported model, an export.
    """
    for key, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise SparseCNNError(
                f"{source}: {key!r} holds {bad} NaN/Inf value(s) (training diverged or the file is "
                f"corrupt); use weights from before the divergence or a good copy of the file"
            )


def _recorded_build(spec: str, weights: str | os.PathLike[str]) -> dict[str, Any]:
    # `sparsecnn train` / `prune` write summary.json beside model.pt with the build arguments
    # (LeNet-5 on 8x8 digits is not the 28x28 default), so their weights load without repeating them.
    path = Path(weights).parent / "summary.json"
    try:
        text = path.read_text()
    except OSError:
        return {}
    try:
        summary = json.loads(text)
        build_args = summary["build"] if summary.get("model") == spec else {}
    except ValueError as exc:
        raise SparseCNNError(f"{path} (the build arguments of {weights}) is not valid JSON ({exc}); restore "
                             f"the one that sparsecnn train / prune wrote, or delete it") from None
    except (KeyError, TypeError, AttributeError):
        return {}
    if not isinstance(build_args, dict):
        return {}
    return {k: v for k, v in build_args.items() if k in ("num_classes", "in_channels", "input_size")}


def resolve(spec: str, weights: str | os.PathLike[str] | None = None, **build_kwargs: Any) -> nn.Module:
    """Turn a model spec from the command line into a module.

    A small dispatch: a zoo name builds the model (``build_kwargs`` go to :func:`build`); then
    ``weights``, if given, is loaded with :func:`load_weights`. Build arguments not given are taken
    from a ``summary.json`` beside ``weights`` written by ``sparsecnn train`` or ``prune`` for the
    same model (its ``build`` entry), so ``resolve("lenet5", weights="runs/dense/model.pt")`` builds
    the 8x8 LeNet-5 that was trained on digits.
    """
    if spec not in _ZOO:
        raise SparseCNNError(f"unknown model {spec!r}; choose one of {', '.join(names())}")
    if weights is not None:
        build_kwargs = {**_recorded_build(spec, weights), **build_kwargs}
    model = build(spec, **build_kwargs)
    if weights is not None:
        # from the command line the build arguments come from that summary.json, not from options
        load_weights(model, weights, build_hint=f"the command line builds {spec} with the input size and "
                     f"classes that sparsecnn train / prune record in summary.json beside the weights: keep "
                     f"that file in {Path(weights).parent}")
    return model
