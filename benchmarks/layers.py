"""The layer shapes the suite measures: AlexNet (BVLC), ResNet-18/50 and VGG-16.

Each layer is built directly as an ``nn.Conv2d`` / ``nn.Linear`` of the published shape, so the suite
needs no model zoo. ``family`` groups layers for the targets: ``alexnet-conv`` (conv2..conv5 carry the
headline targets), ``resnet3x3`` / ``vgg3x3`` (the 70% break-even target), ``resnet1x1``, ``fc``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    """One layer: a conv when ``kernel > 0``, else a linear ``cout x cin``."""

    name: str
    family: str
    cin: int
    cout: int
    hw: int = 0  # input height = width (conv)
    kernel: int = 0  # 0 for a linear layer
    stride: int = 1
    padding: int = 0
    groups: int = 1

    @property
    def is_conv(self) -> bool:
        return self.kernel > 0

    def build(self) -> nn.Module:
        if self.is_conv:
            return nn.Conv2d(self.cin, self.cout, self.kernel, self.stride, self.padding, groups=self.groups)
        return nn.Linear(self.cin, self.cout)

    def input_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.cin, self.hw, self.hw) if self.is_conv else (batch, self.cin)

    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.kernel) // self.stride + 1

    def dense_flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the dense layer."""
        if not self.is_conv:
            return 2 * batch * self.cin * self.cout
        return 2 * batch * self.cout * (self.cin // self.groups) * self.kernel**2 * self.out_hw() ** 2


LAYERS: tuple[LayerSpec, ...] = (
    # AlexNet as in BVLC Caffe (groups=2 in conv2, conv4, conv5), 227x227 input.
    LayerSpec("alexnet.conv1", "alexnet-conv", 3, 96, 227, 11, 4, 0),
    LayerSpec("alexnet.conv2", "alexnet-conv", 96, 256, 27, 5, 1, 2, 2),
    LayerSpec("alexnet.conv3", "alexnet-conv", 256, 384, 13, 3, 1, 1),
    LayerSpec("alexnet.conv4", "alexnet-conv", 384, 384, 13, 3, 1, 1, 2),
    LayerSpec("alexnet.conv5", "alexnet-conv", 384, 256, 13, 3, 1, 1, 2),
    LayerSpec("alexnet.fc6", "fc", 9216, 4096),
    LayerSpec("alexnet.fc7", "fc", 4096, 4096),
    LayerSpec("alexnet.fc8", "fc", 4096, 1000),
    # ResNet-18/50 3x3 convolutions (the same shapes in both; stride-2 entries of each stage).
    LayerSpec("resnet.3x3.56", "resnet3x3", 64, 64, 56, 3, 1, 1),
    LayerSpec("resnet.3x3.28", "resnet3x3", 128, 128, 28, 3, 1, 1),
    LayerSpec("resnet.3x3.14", "resnet3x3", 256, 256, 14, 3, 1, 1),
    LayerSpec("resnet.3x3.7", "resnet3x3", 512, 512, 7, 3, 1, 1),
    LayerSpec("resnet.3x3s2.56", "resnet3x3", 64, 128, 56, 3, 2, 1),
    LayerSpec("resnet.3x3s2.28", "resnet3x3", 128, 256, 28, 3, 2, 1),
    # ResNet 1x1 convolutions: ResNet-18 downsample, ResNet-50 bottleneck in/out.
    LayerSpec("resnet.1x1s2.56", "resnet1x1", 64, 128, 56, 1, 2, 0),
    LayerSpec("resnet50.1x1.56a", "resnet1x1", 64, 256, 56, 1),
    LayerSpec("resnet50.1x1.56b", "resnet1x1", 256, 64, 56, 1),
    LayerSpec("resnet50.1x1.28a", "resnet1x1", 128, 512, 28, 1),
    LayerSpec("resnet50.1x1.28b", "resnet1x1", 512, 128, 28, 1),
    LayerSpec("resnet50.1x1.14a", "resnet1x1", 256, 1024, 14, 1),
    LayerSpec("resnet50.1x1.14b", "resnet1x1", 1024, 256, 14, 1),
    # VGG-16 3x3 convolutions (distinct shapes; 224x224 input).
    LayerSpec("vgg16.conv1_2", "vgg3x3", 64, 64, 224, 3, 1, 1),
    LayerSpec("vgg16.conv2_1", "vgg3x3", 64, 128, 112, 3, 1, 1),
    LayerSpec("vgg16.conv2_2", "vgg3x3", 128, 128, 112, 3, 1, 1),
    LayerSpec("vgg16.conv3_1", "vgg3x3", 128, 256, 56, 3, 1, 1),
    LayerSpec("vgg16.conv3_2", "vgg3x3", 256, 256, 56, 3, 1, 1),
    LayerSpec("vgg16.conv4_1", "vgg3x3", 256, 512, 28, 3, 1, 1),
    LayerSpec("vgg16.conv4_2", "vgg3x3", 512, 512, 28, 3, 1, 1),
    LayerSpec("vgg16.conv5_1", "vgg3x3", 512, 512, 14, 3, 1, 1),
)

QUICK_LAYERS: tuple[str, ...] = (
    "alexnet.conv2", "alexnet.conv3", "alexnet.conv4", "alexnet.conv5", "alexnet.fc6", "alexnet.fc7",
    "resnet.3x3.56", "resnet.3x3.28", "resnet.3x3.14", "resnet50.1x1.28b", "vgg16.conv3_2",
)


def select(names: list[str] | None) -> list[LayerSpec]:
    """Layers by exact name, family name or name prefix (``alexnet`` selects all AlexNet layers)."""
    if not names:
        return list(LAYERS)
    chosen = [spec for spec in LAYERS if any(
        spec.name == n or spec.family == n or spec.name.startswith(n + ".") or spec.name.startswith(n)
        for n in names)]
    if not chosen:
        known = ", ".join(s.name for s in LAYERS)
        raise SystemExit(f"no layer matches {names}; known layers: {known}")
    return chosen
