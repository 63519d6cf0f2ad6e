"""The pruning stage as one function: :func:`prune_model` (the ``sparsecnn prune`` verb calls it).

Prune a trained model with one method, retrain it with its masks held at zero, and return a
:class:`PruneResult` that records per-layer sparsity, removed rows/columns and the accuracy before
pruning, right after pruning and after retraining.

"Right after pruning" means: for magnitude and block pruning, the dense model pruned to the final
target in one shot with no retraining (what pruning alone costs, whatever the schedule); for N:M, the
same; for SSL, the model after group-lasso training with its weak groups removed, before fine-tuning.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from sparsecnn.errors import SparseCNNError
from sparsecnn.prune._checkpoint import StageCheckpoint
from sparsecnn.prune.base import Pruner
from sparsecnn.prune.magnitude import POLICIES, MagnitudePruner
from sparsecnn.prune.masks import LayerSparsity, prunable_layers, sparsity_report
from sparsecnn.prune.patterns import BlockPruner, NMPruner
from sparsecnn.prune.schedules import AGP, Constant, Iterative, Schedule, check_target
from sparsecnn.prune.ssl import GROUP_KINDS, GroupLasso, SSLPruner
from sparsecnn.train import EpochRecord, TrainConfig, check_model_and_data, evaluate, fit

__all__ = ["METHODS", "SCHEDULES", "PruneConfig", "PruneResult", "prune_model"]

METHODS: tuple[str, ...] = ("magnitude", "ssl", "block", "nm")
SCHEDULES: tuple[str, ...] = ("oneshot", "iterative", "agp")


@dataclass(frozen=True)
class PruneConfig:
    """How to prune and retrain (defaults reach the LeNet-5-on-digits targets)."""

    method: str = "magnitude"  # one of METHODS
    target: float | None = None  # magnitude/block: weights; ssl: groups of each kind; nm: 1 - N/M
    schedule: str = "iterative"  # magnitude/block: "oneshot", "iterative" (Han) or "agp" (Zhu & Gupta)
    cycles: int = 3  # "iterative": prune -> retrain cycles; retrain epochs are split across them
    policy: str = "global"  # magnitude: "global", "layer" or "std"; block: "global" or "layer"
    groups: tuple[str, ...] = ("filter", "channel", "shape")  # ssl group kinds
    ssl_strength: float = 2e-4  # ssl: group-lasso lambda, the same for every kind
    ssl_epochs: int | None = None  # ssl: epochs of group-lasso training (default: retrain.epochs)
    threshold: float | None = None  # ssl: remove groups with RMS below this instead of a target
    blocksize: tuple[int, int] = (4, 4)  # block: R x C
    nm: tuple[int, int] = (2, 4)  # nm: keep N of every M along the input dimension
    layers: tuple[str, ...] | None = None  # layers to prune (default: all conv/fc; ssl: all conv)
    retrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=0.01))  # fine-tuning

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SparseCNNError(
                f"unknown pruning method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        if self.schedule not in SCHEDULES:
            raise SparseCNNError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.target is not None:
            check_target(self.target)
        if self.method == "nm":
            n, m = self.nm
            if not 0 < n < m:
                raise SparseCNNError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
            if self.target is not None and abs(self.target - (1 - n / m)) > 1e-9:
                raise SparseCNNError(
                    f"--target {self.target} contradicts {n}:{m}, whose sparsity is {1 - n / m:g}; "
                    "drop --target"
                )
        elif self.method == "ssl":
            if (self.target is None) == (self.threshold is None):
                raise SparseCNNError("ssl needs exactly one of a target (fraction of groups) or a threshold")
            bad = [g for g in self.groups if g not in GROUP_KINDS]
            if bad or not self.groups:
                raise SparseCNNError(f"unknown SSL group kind(s) {bad or '(none given)'}; choose from "
                                     f"{', '.join(GROUP_KINDS)}")
        elif self.target is None:
            raise SparseCNNError(f"--method {self.method} needs --target (the fraction of weights to prune)")
        if self.method == "magnitude" and self.policy not in POLICIES:
            raise SparseCNNError(
                f"unknown magnitude policy {self.policy!r}; choose one of {', '.join(POLICIES)}"
            )
        if self.method == "block" and self.policy not in ("global", "layer"):
            raise SparseCNNError(f"unknown block policy {self.policy!r}; choose global or layer")
        if self.method == "block" and not (
            len(self.blocksize) == 2 and all(isinstance(v, int) and v > 0 for v in self.blocksize)
        ):
            raise SparseCNNError(f"block size must be two positive integers (R, C), got {self.blocksize!r}")
        if self.cycles < 1:
            raise SparseCNNError(f"cycles must be >= 1, got {self.cycles}")
        if self.ssl_epochs is not None and (
            isinstance(self.ssl_epochs, bool) or not isinstance(self.ssl_epochs, int) or self.ssl_epochs < 0
        ):
            raise SparseCNNError(
                f"ssl_epochs (--ssl-epochs) must be an integer >= 0, got {self.ssl_epochs!r}"
            )
        if not (isinstance(self.ssl_strength, (int, float)) and math.isfinite(self.ssl_strength)
                and self.ssl_strength >= 0):
            raise SparseCNNError(
                f"ssl_strength (--ssl-strength) must be a number >= 0, e.g. 2e-4, got {self.ssl_strength!r}"
            )


@dataclass(frozen=True)
class PruneResult:
    """What pruning did to the model (a documented JSON record via :meth:`to_json`)."""

    method: str
    target: float | None
    accuracy_before: float
    accuracy_after_pruning: float
    accuracy_after_retraining: float
    layers: tuple[LayerSparsity, ...]
    history: tuple[EpochRecord, ...]  # every (re)training epoch, in order
    mask_digests: tuple[str, ...]  # one per DDP rank; all equal means identical masks everywhere
    config: PruneConfig

    @property
    def overall_sparsity(self) -> float:
        """Fraction of all conv+fc weights that are zero."""
        return 1.0 - sum(ly.nnz for ly in self.layers) / sum(ly.numel for ly in self.layers)

    def _conv_fraction(self, removed: str, total: str) -> float:
        conv = [ly for ly in self.layers if ly.kind == "conv"]
        denom = sum(getattr(ly, total) for ly in conv)
        return sum(getattr(ly, removed) for ly in conv) / denom if denom else 0.0

    @property
    def conv_filters_removed(self) -> float:
        """Fraction of conv filters (lowered rows) that are all zero."""
        return self._conv_fraction("removed_rows", "rows")

    @property
    def conv_columns_removed(self) -> float:
        """Fraction of conv lowered columns that are all zero."""
        return self._conv_fraction("removed_columns", "columns")

    def to_json(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        return {
            "method": self.method,
            "target": self.target,
            "accuracy": {
                "before_pruning": self.accuracy_before,
                "after_pruning": self.accuracy_after_pruning,
                "after_retraining": self.accuracy_after_retraining,
                "loss_pp": 100.0 * (self.accuracy_before - self.accuracy_after_retraining),
            },
            "overall_sparsity": self.overall_sparsity,
            "conv_filters_removed": self.conv_filters_removed,
            "conv_columns_removed": self.conv_columns_removed,
            "layers": [ly.to_json() for ly in self.layers],
            "world_size": len(self.mask_digests),
            "mask_digests": list(self.mask_digests),
            "history": [asdict(r) for r in self.history],
            "config": cfg,
        }


def _schedule(config: PruneConfig, target: float, epochs: int) -> Schedule:
    if config.schedule == "oneshot":
        return Constant(target)
    if config.schedule == "iterative":
        return Iterative(target, config.cycles)
    # AGP over the first two thirds of retraining, mask updates every epoch, then recovery.
    return AGP(final=target, begin=0, end=max(1, math.ceil(2 * epochs / 3)))


def _pruner(config: PruneConfig, schedule: Schedule | None) -> Pruner:
    layers = config.layers
    if config.method == "magnitude":
        return MagnitudePruner(schedule=schedule, policy=config.policy, layers=layers)
    if config.method == "block":
        return BlockPruner(schedule=schedule, blocksize=config.blocksize, policy=config.policy, layers=layers)
    if config.method == "nm":
        return NMPruner(*config.nm, layers=layers)
    return SSLPruner(config.target, threshold=config.threshold, groups=config.groups, layers=layers)


def _gather_digest(pruner: Pruner) -> tuple[str, ...]:
    import torch.distributed as dist

    digest = pruner.digest()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, digest)
        return tuple(out)
    return (digest,)


def prune_model(
    model: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    config: PruneConfig = PruneConfig(target=0.92),
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> tuple[nn.Module, PruneResult]:
    """Prune ``model`` (trained, dense) with ``config.method`` and retrain it.

    Parameters
    ----------
    model : torch.nn.Module
        The trained dense model; pruned and retrained in place.
    train_set, test_set : Dataset
        ``(image, label)`` pairs.
    config : PruneConfig
    checkpoint : path, optional
        Written atomically after every stage (model, masks, pruner state and schedule position, RNG
        state, the results so far); during a training stage ``fit`` also keeps a per-epoch checkpoint
        beside it (``<stem>.<stage><suffix>``, removed when the stage ends).
    resume : bool
        Continue from ``checkpoint`` after an interruption: pass the same dense ``model`` (same
        starting weights) and ``config``; a checkpoint of another run is refused. The result equals
        an uninterrupted run's (every epoch is reseeded).

    Returns
    -------
    model : torch.nn.Module
        The same module, squashed: plain weights with exact zeros, no mask buffers or hooks.
    result : PruneResult
    """
    check_model_and_data(model, train_set)  # not a module, NaN weights, data it cannot run on
    if config.layers is not None:
        prunable_layers(model, config.layers)  # unknown layer -> SparseCNNError before any work
    rt = config.retrain
    ck = StageCheckpoint(checkpoint, config, model, resume)
    history: list[EpochRecord] = []

    def train_stage(stage: str, cfg: TrainConfig, **kwargs: Any) -> None:
        history.extend(fit(model, train_set, test_set, cfg, **ck.fit_args(stage), **kwargs).history)
        ck.finish(stage, model, kwargs.get("pruner"), history=[asdict(r) for r in history])

    def skip(stage: str, pruner: Pruner | None = None) -> bool:
        """True if ``stage`` is in the checkpoint (and its saved state, if it is the last, loaded)."""
        if not ck.is_done(stage):
            return False
        ck.restore(stage, model, pruner)
        history[:] = [EpochRecord(**r) for r in ck.results.get("history", [])]
        return True

    if not skip("start"):
        ck.finish("start", model, acc_before=evaluate(model, test_set, rt.eval_batch_size))

    if config.method == "ssl":
        lasso = GroupLasso(model, config.groups, config.ssl_strength, layers=config.layers)
        ssl_epochs = rt.epochs if config.ssl_epochs is None else config.ssl_epochs
        if ssl_epochs > 0 and not skip("lasso"):
            train_stage("lasso", replace(rt, epochs=ssl_epochs), regularizer=lasso)
        pruner = _pruner(config, None)
        pruner.prepare(model)  # structural only: reads no weight, so a skipped stage's weights do not matter
        if not skip("prune", pruner):
            pruner.step()
            ck.finish("prune", model, pruner, acc_pruned=evaluate(model, test_set, rt.eval_batch_size))
        if rt.epochs > 0 and not skip("finetune", pruner):
            train_stage("finetune", rt, pruner=pruner)
    else:
        target = config.target if config.method != "nm" else 1 - config.nm[0] / config.nm[1]
        if not skip("probe"):
            # What pruning alone costs: the dense model pruned to the final target in one shot.
            oneshot = copy.deepcopy(model)
            probe = _pruner(config, Constant(target) if config.method != "nm" else None)
            probe.prepare(oneshot)
            probe.step()
            acc = evaluate(oneshot, test_set, rt.eval_batch_size)
            del oneshot, probe
            ck.finish("probe", model, acc_pruned=acc)

        schedule = None if config.method == "nm" else _schedule(config, target, rt.epochs)
        pruner = _pruner(config, schedule)
        # On the dense weights, as in an uninterrupted run ("start" and "probe" leave them alone):
        # the magnitude "std" policy reads them here.
        pruner.prepare(model)
        if config.method != "nm" and config.schedule == "agp":
            if not skip("retrain", pruner):
                train_stage("retrain", rt, pruner=pruner, step_pruner=True)
        elif config.method != "nm" and config.schedule == "iterative":
            per_cycle = max(1, rt.epochs // config.cycles) if rt.epochs > 0 else 0
            for cycle in range(1, config.cycles + 1):
                stage = f"cycle{cycle}"
                if skip(stage, pruner):
                    continue
                pruner.step()
                if per_cycle:
                    train_stage(stage, replace(rt, epochs=per_cycle), pruner=pruner)
                else:
                    ck.finish(stage, model, pruner)
        elif not skip("retrain", pruner):
            pruner.step()
            if rt.epochs > 0:
                train_stage("retrain", rt, pruner=pruner)
            else:
                ck.finish("retrain", model, pruner)
    acc_before = float(ck.results["acc_before"])
    acc_pruned = float(ck.results["acc_pruned"])

    acc_final = evaluate(model, test_set, rt.eval_batch_size)
    digests = _gather_digest(pruner)
    pruner.squash()
    layers = tuple(sparsity_report(model))
    result = PruneResult(
        method=config.method,
        target=config.target,
        accuracy_before=acc_before,
        accuracy_after_pruning=acc_pruned,
        accuracy_after_retraining=acc_final,
        layers=layers,
        history=tuple(history),
        mask_digests=digests,
        config=config,
    )
    return model, result

