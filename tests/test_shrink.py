"""Structured SSL profile and physical shrinking (sparsecnn.shrink), against the unshrunk model."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from sparsecnn.analysis.sparsity import weight_sparsity
from sparsecnn.errors import SparseCNNError
from sparsecnn.layers import sparsify, strategies
from sparsecnn.models import apply_profile, apply_structured, build
from sparsecnn.shrink import shrink
from tests.reference import assert_close


def _structure_only(weight: torch.Tensor, groups: int) -> None:
    """Every zero lies in an all-zero lowered column or an all-zero filter, the same count per group."""
    w = weight.detach().numpy().reshape(groups, weight.shape[0] // groups, -1)
    zero_col = (w == 0).all(axis=1)  # (g, K)
    zero_row = (w == 0).all(axis=2)  # (g, Mg)
    covered = zero_col[:, None, :] | zero_row[:, :, None]
    assert ((w != 0) | covered).all(), "a zero outside the removed columns and filters"
    assert len(set(zero_col.sum(axis=1))) == 1 and len(set(zero_row.sum(axis=1))) == 1


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("frac", [0.0, 0.14, 0.54, 0.72, 0.99])
def test_structured_profile_removes_whole_groups(groups: int, frac: float) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, groups=groups)
    model = nn.Sequential(OrderedDict(conv=conv))
    got = apply_structured(model, {"conv": frac})["conv"]
    assert got >= frac - 1e-9 or frac > 0.9  # 99% is capped by keeping one row and column per group
    assert got == pytest.approx(float((conv.weight == 0).double().mean()))
    _structure_only(conv.weight, groups)
    removed = (conv.weight.reshape(12, -1) == 0).all(dim=1)
    assert (conv.bias[removed] == 0).all()  # a removed filter takes its bias with it


def test_ssl_profile_is_structured_and_unstructured_kept_by_name() -> None:
    model = build("alexnet")
    fractions = apply_profile(model, "ssl")
    for name, target in {"conv1": 0.14, "conv2": 0.54, "conv3": 0.72, "conv4": 0.68, "conv5": 0.58}.items():
        conv = getattr(model, name)
        assert target <= fractions[name] < target + 0.015
        _structure_only(conv.weight, conv.groups)
        ws = weight_sparsity(conv.weight, conv.groups)
        assert ws.kernel_shape > 0.05 and ws.filter > 0.05
    other = build("alexnet")
    unstructured = apply_profile(other, "ssl-unstructured")
    ws = weight_sparsity(other.conv3.weight)
    assert abs(unstructured["conv3"] - 0.72) < 1e-6 and ws.filter == 0.0 and ws.kernel_shape == 0.0


def _chain(seed: int, groups: tuple[int, int], bn: bool, bias_sign: float) -> nn.Sequential:
    torch.manual_seed(seed)
    g1, g2 = groups
    layers: list[tuple[str, nn.Module]] = [("c1", nn.Conv2d(4, 12, 3, padding=1)), ("r1", nn.ReLU())]
    if bn:
        layers.append(("bn1", nn.BatchNorm2d(12)))
    layers += [("p1", nn.MaxPool2d(2)), ("c2", nn.Conv2d(12, 12, 3, padding=1, groups=g1)),
               ("r2", nn.ReLU(inplace=True)), ("c3", nn.Conv2d(12, 8, 1, groups=g2)), ("r3", nn.ReLU()),
               ("flat", nn.Flatten()), ("f1", nn.Linear(8 * 4 * 4, 20)), ("d", nn.Dropout()),
               ("r4", nn.ReLU()), ("f2", nn.Linear(20, 5))]
    model = nn.Sequential(OrderedDict(layers)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=gen)
                m.running_var.uniform_(0.5, 2, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-1, 1, generator=gen)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                rows = torch.rand(m.weight.shape[0], generator=gen) < 0.4
                m.weight[rows] = 0.0  # all-zero filters
                m.bias.copy_(bias_sign * torch.rand(m.bias.shape, generator=gen))
                if isinstance(m, nn.Conv2d):
                    cols = torch.rand(m.weight.shape[1], generator=gen) < 0.3
                    m.weight[:, cols] = 0.0  # unread input channels
    return model


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("groups", [(1, 1), (2, 1), (2, 4)])
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("bias_sign", [-1.0, 1.0])
def test_shrink_equals_original(seed: int, groups: tuple[int, int], bn: bool, bias_sign: float) -> None:
    model = _chain(seed, groups, bn, bias_sign)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    result = shrink(model, x)
    with torch.no_grad():
        assert_close(result.model(x), model(x))
        x2 = torch.relu(torch.randn(2, 4, 8, 8))  # another input, half zeros
        assert_close(result.model(x2), model(x2))
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in result.model.parameters())
    assert result.changed == (after < before)
    for name, n in result.removed_filters.items():
        assert getattr(result.model, name).weight.shape[0] == getattr(model, name).weight.shape[0] - n
    # the linear f1 reads c3 through flatten: negative biases make c3's zero filters exact zeros
    if bias_sign < 0:
        assert result.removed_filters, "nothing was removed from a model full of zero filters"


def test_shrink_leaves_residual_and_lrn_alone() -> None:
    model = build("resnet18", num_classes=10, input_size=32).eval()
    with torch.no_grad():
        model.layer1[0].conv1.weight[:5] = 0.0
        model.layer1[0].conv1.weight[:, :3] = 0.0
    x = torch.randn(1, 3, 32, 32)
    result = shrink(model, x)
    with torch.no_grad():
        assert_close(result.model(x), model(x))
    lrn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.LocalResponseNorm(3), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        lrn[0].weight[:4] = 0.0
        lrn[0].bias.zero_()
    r = shrink(lrn, torch.randn(1, 3, 9, 9))
    assert not r.changed  # LRN mixes channels: removing one moves its neighbours' windows


def test_shrink_bad_input() -> None:
    model = _chain(0, (1, 1), False, -1.0)
    with pytest.raises(SparseCNNError, match="example input"):
        shrink(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(SparseCNNError, match="example input tensor"):
        shrink(model, np.zeros((1, 4, 8, 8)))  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", [s for s in strategies("conv") if s != "torch"])
def test_sparsify_shrink_matches_dense(strategy: str) -> None:
    model = _chain(1, (2, 1), True, -1.0)
    x = torch.relu(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)))
    fast = sparsify(model, strategy, shrink=True, example_input=x)
    assert fast.sparsecnn_shrink.removed_filters
    with torch.no_grad():
        assert_close(fast(x), model(x))
