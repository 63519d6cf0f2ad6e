"""Stage checkpoints of :func:`sparsecnn.prune.pipeline.prune_model` (``sparsecnn prune --resume``).

A pruning run is a short list of stages: ``start`` (accuracy before pruning), then for SSL ``lasso``,
``prune``, ``finetune``, and for magnitude/block/N:M ``probe`` (accuracy of the one-shot pruned
model), then ``retrain`` or ``cycle1`` .. ``cycleN``. After every finished stage the checkpoint is
replaced atomically (temp file, fsync, rename) with the model state (masks included), the pruner
state (masks, schedule position), the torch RNG state, the results gathered so far (accuracies, the
epoch history) and a fingerprint of the run: the config, the model's class and parameter shapes and
the SHA-256 of the starting weights. Inside a training stage :func:`sparsecnn.train.fit` writes its
own per-epoch checkpoint beside it (``checkpoint.cycle2.pt`` for ``checkpoint.pt``), which is
removed once the stage is done.

On resume each finished stage is skipped and the state saved after the last of them is loaded at the
point of the pipeline where that stage ended, so the module structure (masks attached or not) is
the one it was saved from; an unfinished training stage continues from its epoch checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsecnn.errors import SparseCNNError

FORMAT = "sparsecnn-prune-checkpoint"
VERSION = 1
# Settings that may differ between an interrupted run and its resume (as in train.fit).
_RESUME_FREE = {"progress", "device", "eval_batch_size"}
_STAGE_FILE = re.compile(r"^(lasso|finetune|retrain|cycle\d+)$")
_REMEDY = "delete it to start over, or run without --resume"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``model.state_dict()``."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fingerprint(config: Any, model: nn.Module) -> dict[str, Any]:
    cfg = asdict(config)
    cfg["retrain"] = {k: v for k, v in cfg["retrain"].items() if k not in _RESUME_FREE}
    return {
        "config": cfg,
        "model": type(model).__name__,
        "shapes": [[k, list(v.shape)] for k, v in model.state_dict().items()],
        "weights_sha256": weights_digest(model),
    }


def _mismatch(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first difference between two fingerprints, in words (``None``: they agree)."""
    if saved.get("model") != now["model"]:
        return f"model {saved.get('model')!r} but this run prunes {now['model']!r}"
    if saved.get("shapes") != now["shapes"]:
        return (f"a {now['model']} with other layers or shapes than this run's (another data set, "
                f"image size or class count?)")
    old, new = saved.get("config", {}), now["config"]
    for key in new:
        if key == "retrain":
            for k in new[key]:
                if old.get(key, {}).get(k) != new[key][k]:
                    return (f"retraining setting {k}={old.get(key, {}).get(k)!r} but this run asks for "
                            f"{new[key][k]!r}")
        elif _norm(old.get(key)) != _norm(new[key]):
            return f"{key}={old.get(key)!r} but this run asks for {new[key]!r}"
    if saved.get("weights_sha256") != now["weights_sha256"]:
        return "other starting weights (their SHA-256 differs) than this run's"
    return None


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (tuple, list)) else v


def _main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class StageCheckpoint:
    """The checkpoint of one pruning run; with ``path=None`` every method is a no-op.

    Parameters
    ----------
    path : path or None
        The stage checkpoint file.
    config : PruneConfig
    model : torch.nn.Module
        The dense model as given to ``prune_model`` (fingerprinted before anything changes it).
    resume : bool
        Load ``path`` (it must exist, be whole and have been written by a run with the same
        config, model and starting weights); otherwise start over and remove stale stage files.
    """

    def __init__(self, path: str | os.PathLike[str] | None, config: Any, model: nn.Module, resume: bool):
        self.path = None if path is None else Path(path)
        self.done: list[str] = []
        self.results: dict[str, Any] = {}
        self._state: dict[str, Any] | None = None
        if self.path is None:
            if resume:
                raise SparseCNNError("resume needs the checkpoint path (checkpoint=...)")
            return
        self._fingerprint = _fingerprint(config, model)
        if resume:
            self._state = self._load()
            self.done = list(self._state["done"])
            self.results = dict(self._state["results"])
            if _main():
                # A kill between a stage's checkpoint and the removal of its epoch checkpoint leaves
                # the spent epoch file behind; the resumed run skips that stage, so remove it here.
                for stage in self.done:
                    f = self.stage_file(stage)
                    if f is not None:
                        with contextlib.suppress(FileNotFoundError):
                            f.unlink()
        elif _main():
            self._remove_stage_files()
        _barrier()

    # -- reading -----------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        assert self.path is not None
        path = self.path
        if not path.is_file():
            raise SparseCNNError(
                f"no pruning checkpoint at {path} to resume from; run without --resume to start fresh"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a torn or foreign file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise SparseCNNError(f"pruning checkpoint {path} is damaged or not a checkpoint ({first}); "
                                 f"{_REMEDY}") from None
        keys = {"format", "version", "fingerprint", "done", "results", "model", "pruner", "rng"}
        if not isinstance(state, dict) or state.get("format") != FORMAT or not keys <= set(state):
            raise SparseCNNError(
                f"{path} is not a sparsecnn pruning checkpoint (a train checkpoint or another file?); "
                f"{_REMEDY}"
            )
        if state["version"] != VERSION:
            raise SparseCNNError(f"pruning checkpoint {path} has version {state['version']!r}, this "
                                 f"sparsecnn reads version {VERSION}; {_REMEDY}")
        why = _mismatch(state["fingerprint"], self._fingerprint)
        if why is not None:
            raise SparseCNNError(f"pruning checkpoint {path} was written for {why}; {_REMEDY}")
        return state

    def is_done(self, stage: str) -> bool:
        return stage in self.done

    def restore(self, stage: str, model: nn.Module, pruner: Any = None) -> None:
        """Load the saved state if ``stage`` is the last finished one (else nothing: a later stage
        holds the state). Call it where ``stage`` ends, with the same masks attached."""
        if self._state is None or not self.done or self.done[-1] != stage:
            return
        state = self._state
        try:
            model.load_state_dict(state["model"])
            if pruner is not None:
                pruner.load_state_dict(state["pruner"])
            torch.set_rng_state(state["rng"])
        except (RuntimeError, KeyError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise SparseCNNError(
                f"pruning checkpoint {self.path} does not fit the model after stage {stage!r} ({first}); "
                f"{_REMEDY}"
            ) from None
        self._state = None  # restored once; the tensors are no longer needed

    # -- writing -----------------------------------------------------------------------------------
    def stage_file(self, stage: str) -> Path | None:
        """Where ``fit`` keeps its per-epoch checkpoint during training stage ``stage``."""
        if self.path is None:
            return None
        return self.path.with_name(f"{self.path.stem}.{stage}{self.path.suffix}")

    def fit_args(self, stage: str) -> dict[str, Any]:
        """``checkpoint=``/``resume=`` for the ``fit`` call of training stage ``stage``."""
        f = self.stage_file(stage)
        return {"checkpoint": f, "resume": f is not None and f.is_file()}

    def finish(self, stage: str, model: nn.Module, pruner: Any = None, **results: Any) -> None:
        """Record ``stage`` as done with ``results`` (merged into those gathered so far)."""
        self.done.append(stage)
        self.results.update(results)
        if self.path is None:
            return
        if _main():
            from sparsecnn._atomic import torch_save

            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch_save({
                "format": FORMAT,
                "version": VERSION,
                "fingerprint": self._fingerprint,
                "done": list(self.done),
                "results": dict(self.results),
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "pruner": pruner.state_dict() if pruner is not None else None,
                "rng": torch.get_rng_state(),
            }, self.path)
            f = self.stage_file(stage)
            if f is not None:  # the stage is in the checkpoint: its epoch checkpoint is spent
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
        _barrier()

    def _remove_stage_files(self) -> None:
        assert self.path is not None
        stem, suffix = self.path.stem, self.path.suffix
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.path.parent):
                name = entry.name
                if name.startswith(stem + ".") and name.endswith(suffix) and _STAGE_FILE.match(
                        name[len(stem) + 1:len(name) - len(suffix)] if suffix else name[len(stem) + 1:]):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

