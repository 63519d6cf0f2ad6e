"""``sparsecnn prune WEIGHTS --model M --data D --method magnitude|ssl|block|nm --out DIR``.

Prunes a trained model, retrains it with its masks held at zero and writes DIR/model.pt (plain
weights with exact zeros, loadable like the input) and DIR/summary.json (per-layer sparsity, removed
rows/columns, accuracy before pruning, after pruning and after retraining). DIR/checkpoint.pt is
written after every stage (and DIR/checkpoint.<stage>.pt after every epoch of a training stage);
``--resume`` continues an interrupted run from them with the same result as an uninterrupted one.
Works under ``torchrun --nproc_per_node=N``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsecnn.cli.train import _add_data_args, _add_training_args, train_config
from sparsecnn.errors import SparseCNNError


def register(subparsers: argparse._SubParsersAction) -> None:
    from sparsecnn.prune.pipeline import METHODS, SCHEDULES

    p = subparsers.add_parser("prune", help="prune a trained model and retrain it",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="state dict of the trained model (e.g. DIR/model.pt from sparsecnn train)")
    p.add_argument("--model", default=None,
                   help="zoo model name (default: the 'model' in summary.json beside WEIGHTS)")
    _add_data_args(p)
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--target", type=float, default=None,
                   help="magnitude/block: fraction of weights to prune; ssl: fraction of each group kind to "
                        "remove; nm: implied by N:M")
    p.add_argument("--schedule", choices=SCHEDULES, default="iterative",
                   help="magnitude/block: oneshot, iterative (Han et al.) or agp (Zhu & Gupta); "
                        "default iterative")
    p.add_argument("--cycles", type=int, default=3, help="iterative: prune -> retrain cycles (default 3)")
    p.add_argument("--policy", default="global",
                   help="magnitude: global, layer or std; block: global or layer")
    p.add_argument("--groups", default="filter,channel,shape",
                   help="ssl: comma-separated kinds from filter, channel, shape, depth")
    p.add_argument("--ssl-strength", type=float, default=2e-4, help="ssl: group-lasso lambda (default 2e-4)")
    p.add_argument("--ssl-epochs", type=int, default=None, help="ssl: group-lasso epochs (default: retrain)")
    p.add_argument("--threshold", type=float, default=None, help="ssl: remove groups with RMS below this")
    p.add_argument("--block", default="4x4", help="block: R x C (default 4x4)")
    p.add_argument("--nm", default="2:4", help="nm: N:M (default 2:4)")
    p.add_argument("--layers", default=None, help="comma-separated layers to prune (default: all)")
    _add_training_args(p, epochs=10, lr=0.01, epochs_flag="--retrain-epochs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT/checkpoint.pt (same arguments and weights)")
    p.set_defaults(func=run)


def _model_name(args: argparse.Namespace) -> str:
    if not Path(args.weights).is_file():  # named first: a missing file has no summary beside it either
        what = "is a directory" if Path(args.weights).is_dir() else "does not exist"
        raise SparseCNNError(f"WEIGHTS {args.weights} {what}; pass the model.pt that sparsecnn train wrote")
    if args.model:
        return args.model
    summary = Path(args.weights).parent / "summary.json"
    try:
        return str(json.loads(summary.read_text())["model"])
    except (OSError, ValueError, KeyError):
        raise SparseCNNError(
            f"pass --model (no readable summary.json with a 'model' entry beside {args.weights})"
        ) from None


def run(args: argparse.Namespace) -> int:

    from sparsecnn import data, models, train
    from sparsecnn._paths import check_output_dir
    from sparsecnn.prune.patterns import parse_blocksize, parse_nm
    from sparsecnn.prune.pipeline import PruneConfig, prune_model

    out = check_output_dir("--out", args.out)  # before loading data: a bad path is found at once
    layers = None if args.layers is None else tuple(x.strip() for x in args.layers.split(",") if x.strip())
    config = PruneConfig(
        method=args.method, target=args.target, schedule=args.schedule, cycles=args.cycles,
        policy=args.policy,
        groups=tuple(g.strip() for g in args.groups.split(",") if g.strip()), ssl_strength=args.ssl_strength,
        ssl_epochs=args.ssl_epochs, threshold=args.threshold, blocksize=parse_blocksize(args.block),
        nm=parse_nm(args.nm), layers=layers, retrain=train_config(args),
    )
    name = _model_name(args)
    splits = data.load(args.data, args.size, args.channels)
    info = splits.info
    model = models.build(name, num_classes=info.num_classes, in_channels=info.in_channels,
                         input_size=info.input_size)
    models.load_weights(model, args.weights)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model, result = prune_model(model, splits.train, splits.test, config,
                                    checkpoint=out / "checkpoint.pt", resume=args.resume)
        if train.is_main_process():
            from sparsecnn._atomic import torch_save, write_text

            torch_save({k: v.cpu() for k, v in model.state_dict().items()}, out / "model.pt")
            build = {"num_classes": info.num_classes, "in_channels": info.in_channels,
                     "input_size": info.input_size}  # read back by models.resolve(name, weights=...)
            summary = {"model": name, "data": info.name, "build": build, "weights": str(args.weights),
                       **result.to_json()}
            write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
            acc = result.to_json()["accuracy"]
            print(
                f"{config.method}: {result.overall_sparsity:.2%} of conv+fc weights zero, "
                f"conv filters removed {result.conv_filters_removed:.1%}, "
                f"lowered columns removed {result.conv_columns_removed:.1%}; "
                f"accuracy {acc['before_pruning']:.2%} -> {acc['after_pruning']:.2%} (pruned) -> "
                f"{acc['after_retraining']:.2%} (retrained); wrote {out / 'model.pt'}"
            )
    finally:
        train.shutdown_distributed()
    return 0
