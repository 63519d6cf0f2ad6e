"""Pruners: masks, lifecycle, scoring, schedules, patterns, SSL, and the LeNet-5 accuracy targets."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from sparsecnn.cli import main
from sparsecnn.errors import SparseCNNError
from sparsecnn.prune import (
    AGP,
    BlockPruner,
    Constant,
    GroupLasso,
    Iterative,
    MagnitudePruner,
    NMPruner,
    RandomImportance,
    SSLPruner,
    get_mask,
    sparsity_report,
)
from sparsecnn.prune.masks import lowered_view
from sparsecnn.prune.ssl import group_rms, residual_layers


class TinyCNN(nn.Module):
    """Grouped conv, plain conv and two Linear layers: every case the lowering has to handle."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(12 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    x, y = _batch()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: with 2 cores shared by pytest-xdist workers, intra-op threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- masks and lifecycle ---------------------------------------------------------------------------
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_masked_weights_stay_zero_and_gradients_are_masked(optim: str) -> None:
    model = TinyCNN()
    # Momentum/moments collected *before* pruning would move pruned weights without the step hook.
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3) if optim == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.01))
    _train_steps(model, opt, 3)
    pruner = MagnitudePruner(0.7)
    pruner.prepare(model)
    pruner.step()
    pruner.attach(opt)
    masks = {n: m.clone() for n, m in pruner.masks().items()}
    x, y = _batch()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for name, module in pruner.layers.items():
        assert torch.all(module.weight.grad[masks[name] == 0] == 0)
        assert torch.any(module.weight.grad[masks[name] == 1] != 0)
    opt.step()
    _train_steps(model, opt, 5)
    for name, module in pruner.layers.items():
        assert torch.all(module.weight[masks[name] == 0] == 0)
        assert torch.equal(get_mask(module), masks[name])
    assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * sum(m.numel() for m in masks.values()))


def test_state_dict_round_trip_and_squash() -> None:
    model = TinyCNN()
    plain_keys = set(model.state_dict())
    pruner = MagnitudePruner(schedule=Iterative(0.8, cycles=3))
    pruner.prepare(model)
    pruner.step()
    pruner.step()
    sd = model.state_dict()
    assert {k for k in sd if k.endswith("weight_mask")} == {f"{n}.weight_mask" for n in pruner.layers}
    psd = pruner.state_dict()

    other = TinyCNN()
    p2 = MagnitudePruner(schedule=Iterative(0.8, cycles=3))
    p2.prepare(other)
    other.load_state_dict(sd)  # the model's own state dict carries the masks
    for n in pruner.layers:
        assert torch.equal(get_mask(p2.layers[n]), get_mask(pruner.layers[n]))
    p2.load_state_dict(psd)  # ... and so does the pruner's, with the schedule position
    assert p2.step_count == 2 and p2.last_target == pytest.approx(Iterative(0.8, 3)(1))
    assert p2.digest() == pruner.digest()
    p2.step()
    pruner.step()
    assert p2.digest() == pruner.digest()

    before = _weights(model)
    squashed = pruner.squash()
    assert set(squashed.state_dict()) == plain_keys
    assert not any(hasattr(m, "_sparsecnn_mask_hooks") for m in squashed.modules())
    for n, w in _weights(squashed).items():
        assert torch.equal(w, before[n])
    assert sum(r.nnz for r in sparsity_report(squashed)) == round(
        0.2 * sum(r.numel for r in sparsity_report(squashed)))
    with pytest.raises(SparseCNNError, match="prepare"):
        pruner.step()


def test_load_state_dict_rejects_other_layers() -> None:
    a, b = MagnitudePruner(0.5), MagnitudePruner(0.5, layers=["fc1"])
    a.prepare(TinyCNN())
    b.prepare(TinyCNN())
    with pytest.raises(SparseCNNError, match="same layers"):
        b.load_state_dict(a.state_dict())


def test_unknown_layer_and_bad_targets() -> None:
    with pytest.raises(SparseCNNError, match="unknown layer"):
        MagnitudePruner(0.5, layers=["conv9"]).prepare(TinyCNN())
    for bad in (1.0, -0.1, float("nan"), 2):
        with pytest.raises(SparseCNNError, match=r"\[0, 1\)"):
            MagnitudePruner(bad)
    with pytest.raises(SparseCNNError, match="exactly one"):
        MagnitudePruner(0.5, quality=1.0, policy="std")


# -- magnitude policies and importance -------------------------------------------------------------
def test_global_policy_is_one_threshold() -> None:
    model = TinyCNN()
    before = _weights(model)
    p = MagnitudePruner(0.6)
    p.prepare(model)
    p.step()
    kept = torch.cat([before[n][m == 1].abs() for n, m in p.masks().items()])
    cut = torch.cat([before[n][m == 0].abs() for n, m in p.masks().items()])
    assert cut.max() <= kept.min()
    assert cut.numel() == round(0.6 * (cut.numel() + kept.numel()))


def test_layer_and_std_policies() -> None:
    model = TinyCNN()
    p = MagnitudePruner(0.5, policy="layer", layer_targets={"fc1": 0.9})
    p.prepare(model)
    p.step()
    for r in p.report():
        assert r.sparsity == pytest.approx(0.9 if r.name == "fc1" else 0.5, abs=0.5 / r.numel + 1e-9)

    model = TinyCNN()
    std = {n: float(w.std()) for n, w in _weights(model).items()}
    q = MagnitudePruner(quality=0.5, policy="std")
    q.prepare(model)
    before = _weights(model)
    q.step()
    for n, m in q.masks().items():
        assert torch.equal(m == 0, before[n].abs() < 0.5 * std[n])

    model = TinyCNN()
    r = MagnitudePruner(0.75, policy="std")
    r.prepare(model)
    r.step()
    total = sum(x.numel for x in r.report())
    assert sum(x.numel - x.nnz for x in r.report()) == round(0.75 * total)

    model = TinyCNN()
    t = MagnitudePruner(threshold=0.05)
    t.prepare(model)
    before = _weights(model)
    t.step()
    for n, m in t.masks().items():
        assert torch.equal(m == 0, before[n].abs() < 0.05)


def test_importance_is_swappable() -> None:
    a, b = TinyCNN(), TinyCNN()
    pm, pr = MagnitudePruner(0.5), MagnitudePruner(0.5, importance=RandomImportance(seed=3))
    pm.prepare(a)
    pr.prepare(b)
    pm.step()
    pr.step()
    assert pm.digest() != pr.digest()
    # magnitude keeps more of the weights' L2 mass than random choice
    mass = [sum(float(m.weight.detach().pow(2).sum()) for m in p.layers.values()) for p in (pm, pr)]
    assert mass[0] > mass[1]


# -- schedules -------------------------------------------------------------------------------------
def test_agp_follows_zhu_gupta() -> None:
    s = AGP(final=0.9, initial=0.1, begin=2, end=8, frequency=2)
    assert s(0) == 0.0 and s(1) == 0.0
    assert s(2) == pytest.approx(0.1)
    assert s(3) == s(2)  # held between updates
    assert s(4) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - 2 / 6) ** 3)
    assert s(8) == s(100) == pytest.approx(0.9)
    values = [s(t) for t in range(12)]
    assert values == sorted(values)


def test_iterative_removes_same_fraction_of_survivors() -> None:
    s = Iterative(0.92, cycles=3)
    left = [1 - s(i) for i in range(3)]
    assert left[2] == pytest.approx(0.08)
    assert left[1] / left[0] == pytest.approx(left[0]) and left[2] / left[1] == pytest.approx(left[0])
    assert Constant(0.3)(7) == 0.3


def test_agp_pruner_masks_only_shrink() -> None:
    model = TinyCNN()
    p = MagnitudePruner(schedule=AGP(0.8, end=4))
    p.prepare(model)
    prev = None
    for _ in range(6):
        p.step()
        cur = {n: m.clone() for n, m in p.masks().items()}
        if prev is not None:
            assert all(torch.all(cur[n] <= prev[n]) for n in cur)
        prev = cur
    total = sum(r.numel for r in p.report())
    assert sum(r.numel - r.nnz for r in p.report()) == round(0.8 * total)


# -- patterns --------------------------------------------------------------------------------------
def test_lowered_view_matches_caffe_lowering() -> None:
    from sparsecnn.formats import lower_conv_weight

    model = TinyCNN()
    w = model.conv2.weight.detach()
    np.testing.assert_array_equal(lowered_view(w, 2).numpy(), lower_conv_weight(w.numpy(), 2))


@pytest.mark.parametrize("blocksize", [(4, 4), (2, 3), (1, 8)])
def test_block_pruner_removes_whole_blocks(blocksize: tuple[int, int]) -> None:
    model = TinyCNN()
    p = BlockPruner(0.6, blocksize=blocksize)
    p.prepare(model)
    before = _weights(model)
    p.step()
    R, C = blocksize
    kept_norm, cut_norm = [], []
    for name, module in p.layers.items():
        low = lowered_view(get_mask(module), getattr(module, "groups", 1))
        wl = lowered_view(before[name], getattr(module, "groups", 1))
        for g in range(low.shape[0]):
            for i in range(0, low.shape[1], R):
                for j in range(0, low.shape[2], C):
                    blk = low[g, i:i + R, j:j + C]
                    assert blk.min() == blk.max()  # all kept or all removed
                    rms = float(wl[g, i:i + R, j:j + C].pow(2).mean().sqrt())
                    (kept_norm if blk.max() == 1 else cut_norm).append(rms)
    assert max(cut_norm) <= min(kept_norm)
    total = sum(r.numel for r in p.report())
    assert sum(r.numel - r.nnz for r in p.report()) / total == pytest.approx(0.6, abs=0.03)


def test_nm_keeps_n_largest_of_every_m_along_lowered_k() -> None:
    model = TinyCNN()
    p = NMPruner(2, 4)
    p.prepare(model)
    before = _weights(model)
    p.step()
    for name, module in p.layers.items():
        groups = getattr(module, "groups", 1)
        mask = lowered_view(get_mask(module), groups)
        w = lowered_view(before[name], groups).abs()
        k = mask.shape[2]
        for start in range(0, k, 4):
            m = mask[..., start:start + 4]
            expect = min(2, m.shape[-1])
            assert torch.all(m.sum(dim=-1) == expect)
            kept = torch.where(m == 1, w[..., start:start + 4], torch.inf).amin(dim=-1)
            cut = torch.where(m == 0, w[..., start:start + 4], -torch.inf).amax(dim=-1)
            assert torch.all(cut <= kept)
    # conv1: K = 2*3*3 = 18 = 4 full groups + a tail of 2 that keeps both
    r = {x.name: x for x in p.report()}
    assert r["conv1"].nnz == 8 * (4 * 2 + 2)
    assert r["fc1"].sparsity == 0.5


# -- SSL -------------------------------------------------------------------------------------------
def test_group_lasso_matches_reference() -> None:
    model = TinyCNN()
    lasso = GroupLasso(model, ("filter", "channel", "shape"), {"filter": 1.0, "channel": 2.0, "shape": 3.0})
    expect = 0.0
    for conv, g in ((model.conv1, 1), (model.conv2, 2)):
        w = conv.weight.detach()
        cout, cin_g = w.shape[:2]
        for gi in range(g):
            wg = w[gi * cout // g:(gi + 1) * cout // g]
            expect += 1.0 * sum(float(wg[o].norm()) for o in range(wg.shape[0]))
            expect += 2.0 * sum(float(wg[:, c].norm()) for c in range(cin_g))
            expect += 3.0 * sum(float(wg[:, c, i, j].norm())
                                for c in range(cin_g) for i in range(3) for j in range(3))
    assert float(lasso().detach()) == pytest.approx(expect, rel=1e-5)
    assert set(lasso.layers) == {"conv1", "conv2"}  # conv layers by default


def test_group_lasso_training_zeroes_groups_and_ssl_reports_them() -> None:
    model = TinyCNN()
    lasso = GroupLasso(model, ("filter", "shape"), 0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _batch()
    rms0 = group_rms(model.conv1, "filter").clone()
    for _ in range(60):
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + lasso()).backward()
        opt.step()
    assert float(group_rms(model.conv1, "filter").median()) < 0.5 * float(rms0.median())

    p = SSLPruner(0.5, groups=("filter", "shape"))
    p.prepare(model)
    rms = {n: (group_rms(m, "filter"), group_rms(m, "shape")) for n, m in p.layers.items()}
    p.step()
    report = {r.name: r for r in p.report()}
    assert set(report) == {"conv1", "conv2"}
    removed_rows = sum(r.removed_rows for r in report.values())
    removed_cols = sum(r.removed_columns for r in report.values())
    assert removed_rows == round(0.5 * (8 + 12))
    assert removed_cols >= round(0.5 * (18 + 2 * 36))  # removed filters can empty more columns
    # the removed filters are those with the lowest RMS
    cut = [float(rms[n][0][i]) for n, m in p.layers.items()
           for i in range(m.weight.shape[0]) if not get_mask(m)[i].any()]
    kept = [float(rms[n][0][i]) for n, m in p.layers.items()
            for i in range(m.weight.shape[0]) if get_mask(m)[i].any()]
    assert max(cut) <= min(kept)


def test_ssl_threshold_and_channel_groups() -> None:
    model = TinyCNN()
    with torch.no_grad():
        model.conv2.weight[:, 1] = 1e-4  # input channel 1 of each group, all filters
        model.conv1.weight[3] = 0.0
    p = SSLPruner(threshold=1e-3, groups=("channel", "filter"))
    p.prepare(model)
    p.step()
    r = {x.name: x for x in p.report()}
    assert r["conv2"].removed_channels == 2 and r["conv2"].removed_columns == 2 * 9
    assert r["conv1"].removed_rows == 1


def test_ssl_depth_groups_need_a_residual_path() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.downsample = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv2(torch.relu(self.conv1(x)))

    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Block(), Block())
    assert set(residual_layers(net)) == {"1.conv1", "1.conv2", "2.conv1", "2.conv2"}
    with torch.no_grad():
        net[2].conv2.weight.mul_(1e-3)
    p = SSLPruner(0.25, groups=("depth",))
    p.prepare(net)
    p.step()
    assert float(net[2].conv2.weight.abs().sum()) == 0.0
    assert float(net[1].conv2.weight.abs().sum()) > 0.0
    with pytest.raises(SparseCNNError, match="residual"):
        SSLPruner(0.5, groups=("depth",)).prepare(TinyCNN())
    with pytest.raises(SparseCNNError, match="group kind"):
        SSLPruner(0.5, groups=("rows",))
    from sparsecnn.prune.pipeline import PruneConfig

    with pytest.raises(SparseCNNError, match=r"group kind\(s\) \(none given\); choose from"):
        PruneConfig(method="ssl", target=0.5, groups=())


def test_sparsity_report_counts_rows_columns_channels() -> None:
    model = TinyCNN()
    with torch.no_grad():
        model.conv1.weight[2] = 0  # a filter
        model.conv1.weight[:, 0, 1, 1] = 0  # a lowered column
        model.conv1.weight[:, 1] = 0  # an input channel (9 columns)
        model.fc1.weight[:, 5] = 0
    r = {x.name: x for x in sparsity_report(model)}
    assert (r["conv1"].removed_rows, r["conv1"].removed_columns, r["conv1"].removed_channels) == (1, 10, 1)
    assert (r["fc1"].removed_columns, r["fc1"].removed_rows) == (1, 0)
    assert r["conv2"].rows == 12 and r["conv2"].columns == 2 * 4 * 9
    assert r["conv1"].sparsity == pytest.approx(1 - int((model.conv1.weight != 0).sum()) / 144)


# -- LeNet-5 on digits: the targets, through the CLI -----------------------------------------------
@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("dense")
    assert main(["train", "lenet5", "--data", "digits", "--epochs", "20", "--out", str(out), "--quiet"]) == 0
    return out


def _prune(dense, tmp_path, *args: str) -> dict:
    out = tmp_path / "pruned"
    assert main(["prune", str(dense / "model.pt"), "--model", "lenet5", "--data", "digits",
                 "--out", str(out), "--quiet", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    from sparsecnn import models

    model = models.build("lenet5", num_classes=10, in_channels=1, input_size=8)
    models.load_weights(model, out / "model.pt")  # plain weights, no mask buffers
    assert all("mask" not in k for k in model.state_dict())
    for layer in summary["layers"]:
        w = dict(model.named_modules())[layer["name"]].weight
        assert int((w != 0).sum()) == layer["nnz"]
    return summary


@pytest.mark.slow
def test_dense_lenet5_reaches_97_percent(dense) -> None:
    summary = json.loads((dense / "summary.json").read_text())
    assert summary["result"]["test_accuracy"] >= 0.97
    assert summary["build"] == {"num_classes": 10, "in_channels": 1, "input_size": 8}


@pytest.mark.slow
def test_magnitude_prunes_92_percent_within_half_a_point(dense, tmp_path) -> None:
    s = _prune(dense, tmp_path, "--method", "magnitude", "--target", "0.92", "--retrain-epochs", "6")
    assert s["overall_sparsity"] >= 0.92
    acc = s["accuracy"]
    assert acc["after_retraining"] >= acc["before_pruning"] - 0.005
    assert len(s["history"]) == 6 and s["world_size"] == 1


@pytest.mark.slow
def test_two_four_on_every_layer_within_one_point(dense, tmp_path) -> None:
    s = _prune(dense, tmp_path, "--method", "nm", "--nm", "2:4", "--retrain-epochs", "4")
    assert {ly["name"] for ly in s["layers"]} == {"conv1", "conv2", "fc1", "fc2"}
    for ly in s["layers"]:
        assert ly["sparsity"] >= (0.48 if ly["name"] == "conv1" else 0.5)  # conv1: K = 25, see patterns.py
    acc = s["accuracy"]
    assert acc["after_retraining"] >= acc["before_pruning"] - 0.01


@pytest.mark.slow
def test_ssl_removes_half_the_filters_within_one_point(dense, tmp_path) -> None:
    s = _prune(dense, tmp_path, "--method", "ssl", "--groups", "filter,shape", "--target", "0.6",
               "--retrain-epochs", "5")
    assert max(s["conv_filters_removed"], s["conv_columns_removed"]) >= 0.5
    conv = {ly["name"]: ly for ly in s["layers"] if ly["kind"] == "conv"}
    assert sum(ly["removed_rows"] for ly in conv.values()) >= 0.5 * sum(ly["rows"] for ly in conv.values())
    acc = s["accuracy"]
    assert acc["after_retraining"] >= acc["before_pruning"] - 0.01


def test_block_pruning_through_cli(dense, tmp_path) -> None:
    s = _prune(dense, tmp_path, "--method", "block", "--block", "2x2", "--target", "0.5", "--schedule",
               "oneshot", "--retrain-epochs", "1")
    assert math.isclose(s["overall_sparsity"], 0.5, abs_tol=0.01)
    assert s["accuracy"]["after_retraining"] >= 0.9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "magnitude", "--target", "1.0"], "[0, 1)"),
        (["--method", "magnitude", "--target", "-0.5"], "[0, 1)"),
        (["--method", "prune-harder", "--target", "0.5"], "unknown pruning method"),
        (["--method", "magnitude", "--target", "0.5", "--layers", "conv1,conv7"], "unknown layer"),
        (["--method", "nm", "--nm", "4:2"], "0 < N < M"),
        (["--method", "nm", "--target", "0.9"], "contradicts"),
        (["--method", "block", "--target", "0.5", "--block", "4by4"], "RxC"),
        (["--method", "ssl", "--target", "0.5", "--groups", "filter,rows"], "group kind"),
        (["--method", "magnitude"], "needs --target"),
    ],
)
def test_bad_prune_input_is_one_line_exit_2(tmp_path, capsys, args: list[str], message: str) -> None:
    from sparsecnn import models

    weights = tmp_path / "w.pt"
    torch.save(models.build("lenet5", num_classes=10, in_channels=1, input_size=8).state_dict(), weights)
    assert main(["prune", str(weights), "--model", "lenet5", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_checkpoint_that_does_not_fit_is_exit_2(tmp_path, capsys) -> None:
    from sparsecnn import models

    weights = tmp_path / "w.pt"
    torch.save(models.build("lenet5", num_classes=7, in_channels=1, input_size=8).state_dict(), weights)
    assert main(["prune", str(weights), "--model", "lenet5", "--method", "magnitude", "--target", "0.5",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit" in err
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert main(["prune", str(tmp_path / "junk.pt"), "--model", "lenet5", "--method", "nm",
                 "--out", str(tmp_path / "o")]) == 2
    assert "not a readable" in capsys.readouterr().err


def test_pruned_model_deepcopies_and_prunes_again() -> None:
    model = TinyCNN()
    p = MagnitudePruner(0.5)
    p.prepare(model)
    p.step()
    clone = copy.deepcopy(p.squash())
    q = NMPruner(1, 2)
    q.prepare(clone)
    q.step()
    assert all(r.sparsity >= 0.5 for r in q.report())
