"""``sparsecnn train MODEL --data DATA --epochs E --out DIR``: train a zoo model on real data.

Writes DIR/model.pt (a plain state dict), DIR/summary.json and DIR/checkpoint.pt (after every
epoch; ``--resume`` continues from it). Works under ``torchrun --nproc_per_node=N`` as well.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def _add_training_args(p: argparse.ArgumentParser, *, epochs: int, lr: float, epochs_flag: str) -> None:
    from sparsecnn.train import LR_SCHEDULES, OPTIMIZERS

    p.add_argument(epochs_flag, type=int, default=epochs, dest="epochs", metavar="E",
                   help=f"training epochs (default {epochs})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="sgd (momentum) or adam")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine", help="default cosine")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split across torchrun ranks")
    p.add_argument("--seed", type=int, default=0, help="data order and RNG seed (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="'digits' or an image folder (one sub-folder per class)")
    p.add_argument("--size", type=int, default=None, help="image folders: resize to SIZE x SIZE")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="image folders: 1 grey, 3 RGB")


def train_config(args: argparse.Namespace):
    from sparsecnn.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, lr_schedule=args.lr_schedule,
        seed=args.seed, progress=not args.quiet, device=args.device,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a zoo model on digits or an image folder",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="zoo model name, e.g. lenet5")
    _add_data_args(p)
    _add_training_args(p, epochs=20, lr=0.05, epochs_flag="--epochs")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the initial weights")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    from sparsecnn import data, models, train
    from sparsecnn._paths import check_output_dir

    out = check_output_dir("--out", args.out)  # before loading data: a bad path is found at once
    config = train_config(args)
    splits = data.load(args.data, args.size, args.channels)
    info = splits.info
    build = {"num_classes": info.num_classes, "in_channels": info.in_channels, "input_size": info.input_size}
    model = models.build(args.model, seed=args.model_seed, **build)
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = train.fit(model, splits.train, splits.test, config,
                           checkpoint=out / "checkpoint.pt", resume=args.resume)
        if train.is_main_process():
            from sparsecnn._atomic import torch_save, write_text

            torch_save({k: v.cpu() for k, v in model.state_dict().items()}, out / "model.pt")
            summary = {
                "model": args.model,
                "data": info.name,
                "build": build,
                "model_seed": args.model_seed,
                "train": asdict(config),
                "result": result.to_json(),
            }
            write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
            print(f"test accuracy {result.test_accuracy:.2%} after {len(result.history)} epochs"
                  f" ({result.world_size} process{'es' if result.world_size > 1 else ''});"
                  f" wrote {out / 'model.pt'}")
    finally:
        train.shutdown_distributed()
    return 0
