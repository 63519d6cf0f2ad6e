"""Training loop: determinism, checkpoints and resume, optimizers, progress, CLI, and a 2-process DDP job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsecnn import data, models
from sparsecnn.cli import main
from sparsecnn.errors import SparseCNNError
from sparsecnn.prune import AGP, MagnitudePruner
from sparsecnn.train import TrainConfig, evaluate, fit


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: with 2 cores shared by pytest-xdist workers, intra-op threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> data.DataSplits:
    return data.digits()


def _cfg(**kw) -> TrainConfig:
    base = {"epochs": 4, "lr": 0.1, "progress": False, "batch_size": 64}
    base.update(kw)
    return TrainConfig(**base)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fit_learns_and_is_deterministic(digits) -> None:
    a, b, c = small_cnn(), small_cnn(), small_cnn()
    ra = fit(a, digits.train, digits.test, _cfg())
    fit(b, digits.train, digits.test, _cfg())
    fit(c, digits.train, digits.test, _cfg(seed=1))
    assert ra.test_accuracy > 0.85 and len(ra.history) == 4
    assert ra.history[-1].test_accuracy == pytest.approx(evaluate(a, digits.test))
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


class Interrupt(Exception):
    pass


def _interrupt_after(n: int):
    def hook(record) -> None:
        if record.epoch == n:
            raise Interrupt

    return hook


def test_resume_continues_without_losing_epochs(digits, tmp_path) -> None:
    full = small_cnn()
    ref = fit(full, digits.train, digits.test, _cfg())
    ckpt = tmp_path / "ckpt.pt"
    part = small_cnn()
    with pytest.raises(Interrupt):
        fit(part, digits.train, digits.test, _cfg(), checkpoint=ckpt, on_epoch_end=_interrupt_after(2))
    resumed_model = small_cnn(seed=5)  # a fresh process would start from other weights
    res = fit(resumed_model, digits.train, digits.test, _cfg(), checkpoint=ckpt, resume=True)
    assert res.resumed_from == 2 and [r.epoch for r in res.history] == [1, 2, 3, 4]
    sr, sf = _state(resumed_model), _state(full)
    assert all(torch.equal(sr[k], sf[k]) for k in sf)
    assert [r.test_accuracy for r in res.history] == [r.test_accuracy for r in ref.history]


def test_resume_restores_pruner_mid_schedule(digits, tmp_path) -> None:
    def run(checkpoint=None, resume=False, stop=None, seed=0):
        model = small_cnn(seed)
        pruner = MagnitudePruner(schedule=AGP(0.8, end=3))
        pruner.prepare(model)
        hook = _interrupt_after(stop) if stop else None
        fit(model, digits.train, digits.test, _cfg(epochs=5), checkpoint=checkpoint, resume=resume,
            pruner=pruner, step_pruner=True, on_epoch_end=hook)
        return model, pruner

    ref_model, ref_pruner = run()
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(Interrupt):
        run(ckpt, stop=2)
    model, pruner = run(ckpt, resume=True, seed=3)
    assert pruner.step_count == ref_pruner.step_count == 5
    assert pruner.digest() == ref_pruner.digest()
    s, r = _state(model), _state(ref_model)
    assert all(torch.equal(s[k], r[k]) for k in r)
    total = sum(x.numel for x in pruner.report())
    assert sum(x.numel - x.nnz for x in pruner.report()) == round(0.8 * total)


def test_adam_step_schedule_and_progress(digits, capsys) -> None:
    res = fit(small_cnn(), digits.train, digits.test,
              _cfg(optimizer="adam", lr=1e-2, lr_schedule="step", step_size=2, gamma=0.1, progress=True))
    assert [r.lr for r in res.history] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])
    assert res.test_accuracy > 0.8
    out = capsys.readouterr().out
    assert "epoch 4/4" in out and "test" in out


def test_bad_config_and_resume_errors(digits, tmp_path) -> None:
    for kw, msg in [({"optimizer": "rmsprop"}, "optimizer"), ({"lr_schedule": "warm"}, "LR schedule"),
                    ({"epochs": -1}, "epochs"), ({"lr": 0.0}, "learning rate"),
                    ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(SparseCNNError, match=msg):
            _cfg(**kw)
    with pytest.raises(SparseCNNError, match="no checkpoint"):
        fit(small_cnn(), digits.train, digits.test, _cfg(), checkpoint=tmp_path / "none.pt", resume=True)
    ckpt = tmp_path / "c.pt"
    fit(small_cnn(), digits.train, digits.test, _cfg(epochs=1), checkpoint=ckpt)
    with pytest.raises(SparseCNNError, match="lr="):
        fit(small_cnn(), digits.train, digits.test, _cfg(epochs=1, lr=0.2), checkpoint=ckpt, resume=True)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(SparseCNNError, match="does not fit"):
        fit(other, digits.train, digits.test, _cfg(epochs=1), checkpoint=ckpt, resume=True)


def test_cli_train_writes_loadable_state_dict_and_resumes(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = ["train", "lenet5", "--data", "digits", "--epochs", "2", "--out", str(out), "--quiet"]
    assert main(args) == 0
    model = models.build("lenet5", num_classes=10, in_channels=1, input_size=8)
    models.load_weights(model, out / "model.pt")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "lenet5" and len(summary["result"]["history"]) == 2
    assert evaluate(model, data.digits().test) == pytest.approx(summary["result"]["test_accuracy"])
    assert main([*args, "--resume"]) == 0  # nothing left to do: no epoch is repeated
    again = json.loads((out / "summary.json").read_text())
    assert again["result"]["resumed_from"] == 2 and len(again["result"]["history"]) == 2
    capsys.readouterr()
    assert main(["train", "lenet5", "--data", "digits", "--epochs", "3", "--out", str(out), "--resume"]) == 2
    assert "epochs=2" in capsys.readouterr().err
    assert main(["train", "lenet5", "--data", "no/such/folder", "--out", str(tmp_path / "x")]) == 2
    assert main(["train", "lenet9", "--out", str(tmp_path / "x")]) == 2


def _torchrun(args: list[str], nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "sparsecnn", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_ddp_two_process_gloo_matches_one_process_and_masks_agree(tmp_path) -> None:
    dense = tmp_path / "dense"
    assert main(["train", "lenet5", "--data", "digits", "--epochs", "6", "--out", str(dense), "--quiet"]) == 0
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        # AGP updates the masks inside the DDP training loop, from each rank's own copy of the weights.
        proc = _torchrun(["prune", str(dense / "model.pt"), "--model", "lenet5", "--method", "magnitude",
                          "--target", "0.9", "--schedule", "agp", "--retrain-epochs", "3", "--quiet",
                          "--out", str(out)], nproc, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = json.loads((out / "summary.json").read_text())
    one, two = results[1], results[2]
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(set(two["mask_digests"])) == 1  # identical masks on both ranks
    assert two["overall_sparsity"] == pytest.approx(0.9, abs=1e-4)
    # Same global batch and data order, so only float reduction order differs: well within noise.
    assert abs(one["accuracy"]["after_retraining"] - two["accuracy"]["after_retraining"]) <= 0.015
    assert two["accuracy"]["after_retraining"] >= 0.9
