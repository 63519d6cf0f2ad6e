"""(Re)training loop: one process, or many under ``torchrun`` with DistributedDataParallel.

:func:`fit` trains a model with SGD+momentum or Adam and an LR schedule, evaluates on the test set
after every epoch, shows a rich progress bar, writes a checkpoint after every epoch, and resumes an
interrupted run from that checkpoint without losing or repeating an epoch. Pass a prepared pruner
and its masks stay applied (and, with ``step_pruner=True``, its schedule advances each epoch); pass
a regulariser (e.g. :class:`sparsecnn.prune.ssl.GroupLasso`) and it is added to the loss.

Distributed: under ``torchrun --nproc_per_node=N`` (environment ``WORLD_SIZE > 1``) the process
group is initialised with gloo on CPU or nccl on GPU, each rank reads its share of every epoch
through a ``DistributedSampler`` with ``batch_size / N`` samples per step (so the global batch, and
the result, match the one-process run), metrics are all-reduced and rank 0 writes the checkpoints.

Deterministic under a seed: the data order of epoch ``e`` depends only on ``(seed, e)`` (the
sampler) and the global RNG is reseeded with ``seed + e`` at the start of each epoch, so a resumed
run sees the same batches and dropout draws as an uninterrupted one.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from sparsecnn.errors import SparseCNNError

__all__ = [
    "EpochRecord",
    "TrainConfig",
    "TrainResult",
    "check_model_and_data",
    "evaluate",
    "fit",
    "init_distributed",
    "is_main_process",
    "shutdown_distributed",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
LR_SCHEDULES: tuple[str, ...] = ("cosine", "step", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (defaults train LeNet-5 on digits to ~98-99% in seconds)."""

    epochs: int = 20  # LeNet-5 on digits has converged by then
    batch_size: int = 32  # global batch; each of N ranks takes batch_size // N
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam"
    lr: float = 0.05  # a good SGD rate for LeNet-5 on digits; use ~1e-3 for Adam
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4  # L2 on every parameter
    lr_schedule: str = "cosine"  # "cosine" (to 0 over the epochs), "step" or "constant"
    step_size: int = 10  # "step" schedule: multiply the LR by gamma every step_size epochs
    gamma: float = 0.1  # "step" schedule factor
    seed: int = 0  # data order and RNG; the model's init has its own seed (models.build)
    progress: bool = True  # rich progress bar on rank 0
    eval_batch_size: int = 1024  # evaluation needs no gradients, so large batches are cheap
    device: str = "auto"  # "auto" (CUDA if present), "cpu" or "cuda"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "step_size", "eval_batch_size"):
            value = getattr(self, name)
            least = 0 if name == "epochs" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "a non-negative" if least == 0 else "a positive"
                raise SparseCNNError(f"{name} must be {kind} integer, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise SparseCNNError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise SparseCNNError(
                f"unknown LR schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SparseCNNError(f"learning rate must be positive, got {self.lr!r}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise SparseCNNError(f"momentum must be in [0, 1), e.g. 0.9, got {self.momentum!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SparseCNNError(f"weight decay must be a number >= 0, e.g. 1e-4, got {self.weight_decay!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SparseCNNError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    loss: float  # mean training loss (cross-entropy plus any regulariser)
    train_accuracy: float
    test_accuracy: float
    lr: float  # the learning rate used during the epoch
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    history: tuple[EpochRecord, ...]  # every epoch of the run, including those before a resume
    test_accuracy: float  # after the last epoch
    resumed_from: int  # epochs already done when this call started (0: fresh run)
    world_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "test_accuracy": self.test_accuracy,
            "resumed_from": self.resumed_from,
            "world_size": self.world_size,
            "history": [asdict(r) for r in self.history],
        }


# -- distributed -----------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group if there is one; returns ``(rank, world_size)``.

    gloo on CPU, nccl when CUDA is available. Idempotent; ``(0, 1)`` outside torchrun.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_available():
        raise SparseCNNError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Leave the process group (no-op outside one), after a barrier.

    Why the barrier: a rank that destroys its group while a peer still has gloo work in flight (its
    last all-reduce, or a peer still evaluating and about to sync) closes the TCP pairs under that
    work, and gloo's worker threads then throw from a thread no one joins: the peer is killed with
    SIGABRT ("terminate called after throwing an instance of 'gloo::IoException'"). With the barrier
    no rank tears down before every rank is done communicating. The garbage collection first frees
    DistributedDataParallel wrappers caught in reference cycles, whose reducers hold the group: a
    group released only at interpreter exit destroys its worker threads unjoined ("terminate called
    without an active exception", seen once in the test suite's torchrun run).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SparseCNNError("device 'cuda' asked for but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if _world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# -- evaluation ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, batch_size: int = 1024, device: str | torch.device | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``dataset``, in [0, 1].

    In a process group each rank scores a disjoint share and the counts are all-reduced.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world = _world()
    part = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in DataLoader(part, batch_size=batch_size, shuffle=False):
        pred = model(x.to(dev)).argmax(dim=1)
        correct += int((pred.cpu() == y).sum())
        total += len(y)
    model.train(was_training)
    correct, total = _all_sum([correct, total], dev)
    if total == 0:
        raise SparseCNNError("the test set is empty")
    return correct / total


def check_model_and_data(model: nn.Module, dataset: Dataset, what: str = "training set") -> None:
    """Refuse, with a message, a model that cannot learn from ``dataset``: not a module, NaN/Inf
    weights, an empty set, or images it cannot run on (run once on the first image, no gradients)."""
    from sparsecnn.models.zoo import check_finite

    if not isinstance(model, nn.Module):
        raise SparseCNNError(f"training needs a torch.nn.Module, got {type(model).__name__}")
    check_finite(model.state_dict().items(), f"cannot train {type(model).__name__}")
    if len(dataset) == 0:
        raise SparseCNNError(f"the {what} is empty; give a data set with images in it")
    x = dataset[0][0]
    param = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[None].to(param.device if param is not None else "cpu"))
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SparseCNNError(
            f"the model cannot run on the {what}'s images of shape {tuple(x.shape)} ({first}); build it "
            f"for this data (models.build(..., in_channels=C, input_size=S))"
        ) from None
    finally:
        model.train(was_training)
    if out.dim() != 2:
        raise SparseCNNError(
            f"the model outputs shape {tuple(out.shape)} per batch; a classifier gives (N, classes)"
        )


# -- training --------------------------------------------------------------------------------------
def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(config.epochs, 1))
    if config.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


# Fields that may differ between an interrupted run and its resume.
_RESUME_FREE = {"progress", "device", "eval_batch_size"}
# What fit writes into every checkpoint (and reads back on resume).
_CHECKPOINT_KEYS = {"epoch", "model", "optimizer", "scheduler", "history", "config"}


def _load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    if not path.is_file():
        raise SparseCNNError(f"no checkpoint at {path} to resume from; run without --resume to start fresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SparseCNNError(
            f"checkpoint {path} is not readable ({first}); delete it to start over, or run without --resume"
        ) from None
    if not (isinstance(state, dict) and _CHECKPOINT_KEYS <= set(state) and isinstance(state["config"], dict)):
        raise SparseCNNError(
            f"{path} is not a sparsecnn training checkpoint (a state dict or another file?); delete it to "
            f"start over, or run without --resume"
        )
    saved = state["config"]
    for f in fields(config):
        if f.name not in _RESUME_FREE and f.name in saved and saved[f.name] != getattr(config, f.name):
            raise SparseCNNError(
                f"checkpoint {path} was written with {f.name}={saved[f.name]!r} but this run asks for "
                f"{getattr(config, f.name)!r}; resume with the same settings"
            )
    return state


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    from sparsecnn._atomic import torch_save

    path.parent.mkdir(parents=True, exist_ok=True)
    torch_save(state, path)  # atomic and fsynced: an interruption never leaves a half-written checkpoint


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def fit(
    model: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    config: TrainConfig = TrainConfig(),
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    pruner: Any = None,
    step_pruner: bool = False,
    regularizer: Callable[[], torch.Tensor] | None = None,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place and evaluate it after every epoch.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place (moved to the device). Prepare any pruner on it *before* calling.
    train_set, test_set : Dataset
        ``(image, label)`` pairs.
    config : TrainConfig
    checkpoint : path, optional
        Written (atomically, by rank 0) after every epoch: model (with masks), optimizer, LR
        scheduler, pruner state, history.
    resume : bool
        Continue from ``checkpoint`` (it must exist and have been written with the same config).
    pruner : Pruner, optional
        Its masks are re-applied after every optimizer step; its state goes into the checkpoint.
    step_pruner : bool
        Call ``pruner.step()`` at the start of every epoch (gradual schedules such as AGP).
    regularizer : callable, optional
        ``regularizer() -> scalar tensor`` added to the loss (SSL's group lasso).
    on_epoch_end : callable, optional
        Called with each epoch's record after its checkpoint is written.

    Returns
    -------
    TrainResult
    """
    if resume and checkpoint is None:
        raise SparseCNNError("resume needs the checkpoint path")
    rank, world = init_distributed()
    device = _device(config)
    if not isinstance(model, nn.Module):
        raise SparseCNNError(f"training needs a torch.nn.Module, got {type(model).__name__}")
    model.to(device)
    check_model_and_data(model, train_set)
    net: nn.Module = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    loader = DataLoader(train_set, batch_size=max(1, config.batch_size // world), sampler=sampler)
    opt = _optimizer(model, config)
    sched = _scheduler(opt, config)
    history: list[EpochRecord] = []
    start = 0
    ckpt = None if checkpoint is None else Path(checkpoint)
    if resume:
        assert ckpt is not None
        state = _load_checkpoint(ckpt, config)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if pruner is not None and state.get("pruner") is not None:
                pruner.load_state_dict(state["pruner"])
            history = [EpochRecord(**r) for r in state["history"]]
            start = int(state["epoch"])
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise SparseCNNError(
                f"checkpoint {ckpt} does not fit the model ({first}); "
                "resume with the same model and pruning method"
            ) from None
    resumed_from = start
    hook = pruner.attach(opt) if pruner is not None else None
    try:
        with _progress(config.progress and rank == 0) as bar:
            for epoch in range(start, config.epochs):
                t0 = time.perf_counter()
                torch.manual_seed(config.seed + epoch)
                if pruner is not None and step_pruner:
                    pruner.step()
                sampler.set_epoch(epoch)
                lr = opt.param_groups[0]["lr"]
                task = bar.add_task(
                    "train", total=len(loader), epoch=f"{epoch + 1}/{config.epochs}", loss=0.0
                )
                net.train()
                loss_sum = correct = count = 0.0
                for x, y in loader:
                    lo, hi = int(y.min()), int(y.max())  # on the CPU: no device sync
                    x, y = x.to(device), y.to(device)
                    opt.zero_grad(set_to_none=True)
                    out = net(x)
                    if lo < 0 or hi >= out.shape[1]:  # cross_entropy would raise an IndexError
                        raise SparseCNNError(
                            f"label {hi if lo >= 0 else lo} is outside the model's {out.shape[1]} "
                            f"classes; build the model with num_classes = the number of classes in the data"
                        )
                    loss = F.cross_entropy(out, y)
                    if regularizer is not None:
                        loss = loss + regularizer()
                    loss.backward()
                    opt.step()
                    loss_sum += float(loss.detach()) * len(y)
                    correct += float((out.argmax(dim=1) == y).sum())
                    count += len(y)
                    bar.update(task, advance=1, loss=loss_sum / count)
                sched.step()
                loss_sum, correct, count = _all_sum([loss_sum, correct, count], device)
                if not math.isfinite(loss_sum):  # every rank sees the same sum, so all stop together
                    raise SparseCNNError(
                        f"training diverged in epoch {epoch + 1} (the loss is {loss_sum / max(count, 1)}); "
                        f"nothing of this epoch was saved: use a smaller learning rate than {lr:g}"
                    )
                test_acc = evaluate(model, test_set, config.eval_batch_size, device)
                record = EpochRecord(
                    epoch=epoch + 1,
                    loss=loss_sum / max(count, 1),
                    train_accuracy=correct / max(count, 1),
                    test_accuracy=test_acc,
                    lr=lr,
                    seconds=time.perf_counter() - t0,
                )
                history.append(record)
                bar.update(task, description="done")
                if rank == 0 and config.progress:
                    bar.console.print(
                        f"epoch {record.epoch}/{config.epochs}: loss {record.loss:.4f}  train "
                        f"{record.train_accuracy:.2%}  test {record.test_accuracy:.2%}  lr {lr:.4g}"
                    )
                if ckpt is not None:
                    if rank == 0:
                        _save_checkpoint(ckpt, {
                            "epoch": epoch + 1,
                            "model": model.state_dict(),
                            "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(),
                            "pruner": pruner.state_dict() if pruner is not None else None,
                            "history": [asdict(r) for r in history],
                            "config": asdict(config),
                            "world_size": world,
                        })
                    if world > 1:
                        dist.barrier()
                if on_epoch_end is not None:
                    on_epoch_end(record)
    finally:
        if hook is not None:
            hook.remove()
    if history:
        final = history[-1].test_accuracy
    else:
        final = evaluate(model, test_set, config.eval_batch_size, device)
    return TrainResult(tuple(history), final, resumed_from, world)
