"""``prune_model(..., checkpoint=, resume=)`` (``sparsecnn prune --resume``): a run interrupted at any
point and resumed ends with the weights, masks and result of an uninterrupted run; checkpoints of
another run, damaged files and a missing file are one clear error.

The interruption is real: a forward hook raises after the n-th forward call of the model (a training
batch or an evaluation), wherever in the pipeline that falls. The SIGKILL test of the CLI is in
test_resume.py.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Subset

from sparsecnn import data, models
from sparsecnn.errors import SparseCNNError
from sparsecnn.prune.pipeline import PruneConfig, PruneResult, prune_model
from sparsecnn.train import TrainConfig, fit

RETRAIN = TrainConfig(epochs=4, batch_size=32, lr=0.01, progress=False, device="cpu")
CONFIGS = {
    "magnitude-iterative": PruneConfig(method="magnitude", target=0.6, schedule="iterative", cycles=2,
                                       retrain=RETRAIN),
    "block-agp": PruneConfig(method="block", target=0.5, schedule="agp", blocksize=(2, 2), retrain=RETRAIN),
    "ssl": PruneConfig(method="ssl", target=0.3, ssl_epochs=2, ssl_strength=1e-3,
                       retrain=TrainConfig(epochs=2, batch_size=32, lr=0.01, progress=False, device="cpu")),
}


class Interrupted(BaseException):
    """Raised by the hook: a BaseException, so no ``except Exception`` on the way swallows it."""


@pytest.fixture(scope="module")
def splits():
    torch.set_num_threads(1)
    d = data.digits()
    return Subset(d.train, range(256)), Subset(d.test, range(96))


def _model(seed: int = 0) -> torch.nn.Module:
    return models.build("lenet5", seed=seed, num_classes=10, in_channels=1, input_size=8)


def _run(splits, config: PruneConfig, ck: Path | None, resume: bool = False, cut: int | None = None,
         seed: int = 0, trained: list[int] | None = None) -> tuple[torch.nn.Module, PruneResult, int]:
    """One prune_model call on a fresh model; with ``cut``, interrupted at that forward call.
    ``trained[0]`` counts the training batches run (forward calls in training mode)."""
    model = _model(seed)
    calls = [0]

    def hook(module: torch.nn.Module, _: Any) -> None:
        calls[0] += 1
        if trained is not None and module.training:
            trained[0] += 1
        if cut is not None and calls[0] >= cut:
            raise Interrupted

    model.register_forward_pre_hook(hook)  # deepcopy (the one-shot probe) copies it: counted too
    out, result = prune_model(model, *splits, config, checkpoint=ck, resume=resume)
    return out, result, calls[0]


def _epochs_on_disk(ck: Path) -> int:
    """Epochs saved: those of the finished stages plus those of the stage's epoch checkpoint."""
    if not ck.exists():
        return 0
    n = len(torch.load(ck, weights_only=True)["results"].get("history", []))
    for f in ck.parent.glob("checkpoint.*.pt"):
        n += int(torch.load(f, weights_only=True)["epoch"])
    return n


def _comparable(result: PruneResult) -> dict[str, Any]:
    js = result.to_json()
    for rec in js["history"]:
        rec.pop("seconds")  # wall time
    return js


def _assert_same(a: tuple, b: tuple) -> None:
    (ma, ra, _), (mb, rb, _) = a, b
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs from the uninterrupted run"  # bitwise, on CPU
    assert _comparable(ra) == _comparable(rb)
    assert ra.mask_digests == rb.mask_digests


@pytest.mark.parametrize("name", list(CONFIGS))
def test_interrupted_and_resumed_prune_equals_an_uninterrupted_run(splits, tmp_path: Path, name: str) -> None:
    config = CONFIGS[name]
    ref_batches = [0]
    ref = _run(splits, config, None, trained=ref_batches)  # no checkpoint: checkpointing changes nothing
    total = ref[2]
    per_epoch = -(-256 // RETRAIN.batch_size)
    ck = tmp_path / "run" / "checkpoint.pt"
    rng = random.Random(name)
    interrupted = 0
    for _ in range(5):  # interrupted again and again, each time resumed from where the last one stopped
        before, batches = _epochs_on_disk(ck), [0]
        try:  # total counts every forward call of an uninterrupted run (its batches and evaluations)
            _run(splits, config, ck, resume=ck.exists(), cut=rng.randint(1, total // 2), trained=batches)
        except Interrupted:
            interrupted += 1
        # Resumed at the epoch, not the stage: a run trains the epochs it adds to disk and at most the
        # batches of the one epoch it was cut in (all of them if cut in that epoch's evaluation);
        # nothing already saved is trained again.
        gained = (_epochs_on_disk(ck) - before) * per_epoch
        assert gained <= batches[0] <= gained + per_epoch, (before, batches, gained)
    assert interrupted >= 3
    before, batches = _epochs_on_disk(ck), [0]
    got = _run(splits, config, ck, resume=True, trained=batches)
    assert batches[0] == ref_batches[0] - before * per_epoch  # exactly the epochs left
    _assert_same(got, ref)
    # Only the stage checkpoint is left: every epoch checkpoint was removed with its stage.
    assert sorted(p.name for p in ck.parent.iterdir()) == ["checkpoint.pt"]


def test_resume_of_a_finished_run_returns_its_result(splits, tmp_path: Path) -> None:
    config = CONFIGS["magnitude-iterative"]
    ck = tmp_path / "checkpoint.pt"
    first = _run(splits, config, ck)
    again = _run(splits, config, ck, resume=True, cut=first[2] + 10**6)
    assert again[2] == 2  # no training: only the input check (one image) and the final evaluation
    _assert_same(again, first)


@pytest.fixture
def started(splits, tmp_path: Path) -> Path:
    """A checkpoint of a magnitude run interrupted in its first training batch."""
    ck = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupted):
        _run(splits, CONFIGS["magnitude-iterative"], ck, cut=3)  # 1: start, 2: probe, 3: training
    assert ck.is_file()
    return ck


@pytest.mark.parametrize(("change", "message"), [
    ({"target": 0.7}, "target=0.6 but this run asks for 0.7"),
    ({"method": "block"}, "method='magnitude' but this run asks for 'block'"),
    ({"cycles": 3}, "cycles=2 but this run asks for 3"),
    ({"retrain": TrainConfig(epochs=4, batch_size=32, lr=0.02, progress=False)}, "lr=0.01"),
])
def test_checkpoint_of_other_arguments_is_refused(splits, started: Path, change: dict, message: str) -> None:
    config = replace(CONFIGS["magnitude-iterative"], **change)
    with pytest.raises(SparseCNNError, match=message) as err:
        _run(splits, config, started, resume=True)
    assert "delete it to start over, or run without --resume" in str(err.value)


def test_checkpoint_of_other_weights_or_model_is_refused(splits, started: Path) -> None:
    config = CONFIGS["magnitude-iterative"]
    with pytest.raises(SparseCNNError, match="other starting weights"):
        _run(splits, config, started, resume=True, seed=1)
    wider = models.build("lenet5", seed=0, num_classes=12, in_channels=1, input_size=8)
    with pytest.raises(SparseCNNError, match="a Sequential with other layers or shapes"):
        prune_model(wider, *splits, config, checkpoint=started, resume=True)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1))

    with pytest.raises(SparseCNNError, match="model 'Sequential' but this run prunes 'Tiny'"):
        prune_model(Tiny(), *splits, config, checkpoint=started, resume=True)


def test_a_fresh_run_replaces_the_checkpoint_and_its_epoch_files(splits, started: Path) -> None:
    epoch_file = started.with_name("checkpoint.cycle1.pt")
    torch.save({"stale": 1}, epoch_file)  # as if left by an earlier run
    keep = started.with_name("checkpoint.mine.pt")
    keep.write_bytes(b"not ours")
    _run(splits, CONFIGS["magnitude-iterative"], started)
    assert not epoch_file.exists()
    assert keep.read_bytes() == b"not ours"  # only the stage names are ours to remove


def test_resume_removes_the_epoch_file_of_a_finished_stage(splits, tmp_path: Path) -> None:
    """Killed after a stage's checkpoint was written but before its epoch checkpoint was removed (as
    the CLI's SIGKILL test once hit): the resumed run skips the stage and removes the spent file."""
    config = CONFIGS["magnitude-iterative"]
    ck = tmp_path / "checkpoint.pt"
    first = _run(splits, config, ck)
    spent = ck.with_name("checkpoint.cycle2.pt")
    torch.save({"epoch": 2}, spent)  # what the kill left between the two steps of finish()
    again = _run(splits, config, ck, resume=True)
    _assert_same(again, first)
    assert sorted(p.name for p in ck.parent.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "train-checkpoint"])
def test_damaged_checkpoint_is_one_clear_error(splits, started: Path, damage: str) -> None:
    blob = started.read_bytes()
    if damage == "truncate":
        started.write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage":
        started.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    elif damage == "empty":
        started.write_bytes(b"")
    else:
        fit(_model(), *splits, TrainConfig(epochs=1, progress=False), checkpoint=started)
    with pytest.raises(SparseCNNError, match="delete it to start over") as err:
        _run(splits, CONFIGS["magnitude-iterative"], started, resume=True)
    want = "not a sparsecnn pruning checkpoint" if damage == "train-checkpoint" else "damaged"
    assert want in str(err.value)


def test_resume_without_a_checkpoint(splits, tmp_path: Path) -> None:
    with pytest.raises(SparseCNNError, match=r"no pruning checkpoint at .* run without --resume"):
        _run(splits, CONFIGS["magnitude-iterative"], tmp_path / "none.pt", resume=True)
    with pytest.raises(SparseCNNError, match="resume needs the checkpoint path"):
        _run(splits, CONFIGS["magnitude-iterative"], None, resume=True)


def test_cli_refuses_a_mismatched_checkpoint_in_one_line(tmp_path: Path, capsys) -> None:
    from sparsecnn.cli import main

    torch.save(_model().state_dict(), tmp_path / "w.pt")
    args = ["prune", str(tmp_path / "w.pt"), "--model", "lenet5", "--data", "digits", "--method", "magnitude",
            "--schedule", "oneshot", "--retrain-epochs", "0", "--quiet", "--out", str(tmp_path / "p")]
    assert main([*args, "--target", "0.5"]) == 0
    capsys.readouterr()
    assert main([*args, "--target", "0.8", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "target=0.5 but this run asks for 0.8" in err and "--resume" in err
