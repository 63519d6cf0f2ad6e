"""Published sparsity profiles and magnitude pruning to them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsecnn import SparseCNNError, models
from sparsecnn.models import PROFILES, apply_profile, get_profile


def test_published_values() -> None:
    assert PROFILES["deep-compression"] == {
        "conv1": 0.16, "conv2": 0.62, "conv3": 0.65, "conv4": 0.63, "conv5": 0.63,
        "fc6": 0.91, "fc7": 0.91, "fc8": 0.75,
    }
    assert PROFILES["ssl"] == {"conv1": 0.14, "conv2": 0.54, "conv3": 0.72, "conv4": 0.68, "conv5": 0.58}


@pytest.mark.parametrize("spec", ["deep-compression", "ssl-unstructured"])  # ssl: tests/test_shrink.py
def test_apply_published(spec: str) -> None:
    # Same layer names and conv shapes as AlexNet; input 67 keeps fc6 small (256*1*1 inputs).
    model = models.build("alexnet", input_size=67)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    achieved = apply_profile(model, spec)
    assert achieved.keys() == PROFILES[spec].keys()
    layers = dict(model.named_modules())
    for name, frac in PROFILES[spec].items():
        weight = layers[name].weight
        assert abs(achieved[name] - frac) < 1e-3  # within 0.1 percentage point
        assert int((weight == 0).sum()) == round(frac * weight.numel())  # exact count
        # The zeroed weights are the smallest in magnitude; the others are unchanged.
        old = before[f"{name}.weight"]
        kept = weight != 0
        assert torch.equal(weight[kept], old[kept])
        assert old[~kept].abs().max() <= old[kept].abs().min()
        assert torch.equal(layers[name].bias, before[f"{name}.bias"])
    untouched = [n for n in layers if isinstance(layers[n], nn.Linear) and n not in PROFILES[spec]]
    for name in untouched:
        assert torch.equal(layers[name].weight, before[f"{name}.weight"])


def test_exact_small_layer_and_ties() -> None:
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(4, 2))
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[0.5, -1.0, 0.5, 2.0], [-0.5, 3.0, 0.1, 0.5]]))
    achieved = apply_profile(model, {"fc": 0.5})  # 4 of 8: 0.1, then three of the four 0.5s in order
    assert achieved == {"fc": 0.5}
    assert model.fc.weight.tolist() == [[0.0, -1.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.5]]
    assert apply_profile(model, {"fc": 0.0}) == {"fc": 0.5}  # existing zeros count; nothing new
    assert apply_profile(model, {"fc": 1.0}) == {"fc": 1.0}


def test_round_half() -> None:
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(1, 1, 3))  # 9 weights
    assert apply_profile(model, "uniform:0.3")["conv"] == pytest.approx(3 / 9)


def test_uniform_covers_every_conv_and_linear() -> None:
    model = models.build("resnet18", input_size=32)
    profile = get_profile("uniform:0.8", model)
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert list(profile) == expected and len(expected) == 21
    assert set(profile.values()) == {0.8}
    achieved = apply_profile(model, "uniform:0.8")
    assert all(abs(v - 0.8) < 1e-3 for v in achieved.values())


def test_deterministic() -> None:
    a = models.build("alexnet", input_size=67)
    b = models.build("alexnet", input_size=67)
    apply_profile(a, "deep-compression")
    apply_profile(b, "deep-compression")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ("deep-compression", "names layer 'conv3', which the model lacks.*uniform:S"),
        ("no-such", "unknown profile 'no-such'; choose one of deep-compression, ssl, ssl-unstructured or "
                    "uniform:S"),
        ("uniform:", r"malformed profile 'uniform:'.*\[0, 1\]"),
        ("uniform:x", "malformed profile 'uniform:x'"),
        ("uniform:1.5", "malformed profile 'uniform:1.5'"),
        ("uniform:nan", "malformed profile 'uniform:nan'"),
        ({"conv1": 1.2}, r"'conv1' has pruned fraction 1.2, outside \[0, 1\]"),
        ({"conv1": -0.1}, r"outside \[0, 1\]"),
        ({"fc9": 0.5}, "names layer 'fc9', which the model lacks"),
        ({"pool1": 0.5}, "names layer 'pool1', which the model lacks"),
    ],
)
def test_bad_profiles(profile: object, message: str) -> None:
    model = models.build("lenet5")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(SparseCNNError, match=message):
        apply_profile(model, profile)
    assert all(torch.equal(x, y) for x, y in zip(before, model.parameters(), strict=True))


def test_nan_weights() -> None:
    model = models.build("lenet5")
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(SparseCNNError, match="'fc1' has NaN"):
        apply_profile(model, {"fc1": 0.5})
