"""``sparsecnn sweep``: speedup of each strategy over dense vs sparsity, with break-even points."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from sparsecnn.cli.bench import add_results_args, interrupted
from sparsecnn.errors import SparseCNNError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="speedup of each strategy over dense vs sparsity, with the break-even sparsity",
        description="Put uniformly random zeros into one layer's weights (or a random M x K matrix times a "
        "dense K x N one) at each sparsity, time every strategy and peer against torch dense, and "
        "interpolate where each one starts to be faster ('never' / 'always' when it does not cross).",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--layer",
        metavar="MODEL.LAYER",
        help="a zoo layer, e.g. alexnet.conv3 (default: AlexNet's largest conv, conv3)",
    )
    where.add_argument(
        "--shape", metavar="MxKxN", help="a matrix product instead of a layer, e.g. 384x2304x169"
    )
    p.add_argument(
        "--sparsity",
        default="0.5:0.995:8",
        metavar="LO:HI:N | S1,S2,...",
        help="N evenly spaced sparsities from LO to HI, or a comma list (default: 0.5:0.995:8)",
    )
    p.add_argument("--batch", type=int, default=1, metavar="B", help="layer batch size (default: 1)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default: cpu)")
    p.add_argument("--threads", type=int, metavar="N", help="torch and numba threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="timed samples per point (default: 5)")
    p.add_argument("--json", metavar="OUT", help="also write the records and break-even points as JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw speedup vs sparsity to this PNG")
    add_results_args(p, "sweep.jsonl")
    # "-0.1:0.5:3" and "-1x3x3" are values (refused by the range checks), not unknown options
    p._negative_number_matcher = re.compile(r"^-\.?\d")
    p.set_defaults(func=run)


def parse_sparsities(text: str) -> list[float]:
    """``"0.5:0.99:5"`` -> 5 evenly spaced values; ``"0.5,0.9"`` -> that list. Each in [0, 1]."""
    try:
        if ":" in text:
            lo, hi, n = text.split(":")
            count = int(n)
            if count < 1:
                raise ValueError
            vals = (
                [float(lo)]
                if count == 1
                else [float(lo) + (float(hi) - float(lo)) * i / (count - 1) for i in range(count)]
            )
        else:
            vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SparseCNNError(
            f"--sparsity {text!r}: give LO:HI:N (e.g. 0.5:0.995:8) or a comma list (e.g. 0.5,0.9,0.99)"
        ) from None
    if not vals or any(not math.isfinite(v) or not 0.0 <= v <= 1.0 for v in vals):
        raise SparseCNNError(f"--sparsity {text!r}: every sparsity must be a number in [0, 1]")
    return [round(v, 6) for v in vals]


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        m, k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SparseCNNError(
            f"--shape {text!r}: give MxKxN with positive integers, e.g. 384x2304x169"
        ) from None
    if min(m, k, n) < 1:
        raise SparseCNNError(f"--shape {text!r}: M, K and N must be >= 1")
    return m, k, n


def run(args: argparse.Namespace) -> int:
    import torch

    from sparsecnn._paths import check_output_file
    from sparsecnn.bench.experiments import run_sweep
    from sparsecnn.cli.bench import print_tables, write_json
    from sparsecnn.report.tables import break_even, sweep_curves, sweep_tables

    for flag, value in (("--batch", args.batch), ("--repeats", args.repeats), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise SparseCNNError(f"{flag} must be >= 1, got {value}")
    sparsities = parse_sparsities(args.sparsity)
    shape = parse_shape(args.shape) if args.shape else None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SparseCNNError("--device cuda: torch sees no CUDA device here; use --device cpu")
    for flag, path, ext in (("--plot", args.plot, ".png"), ("--json", args.json, ".json")):
        if path:
            check_output_file(flag, path, "sweep" + ext)  # now, not after the measurements
    try:
        records = run_sweep(
            layer=args.layer,
            shape=shape,
            sparsities=sparsities,
            batch=args.batch,
            device=args.device,
            threads=args.threads,
            repeats=args.repeats,
            results=args.results,
            resume=args.resume,
        )
    except KeyboardInterrupt:
        return interrupted("sweep", args.results)
    print_tables(sweep_tables(records))
    for r in records:
        if r["status"] == "error":
            print(f"error: s={r['params']['sparsity']} {r['params']['impl']}: {r['error']}")
    curves = sweep_curves(records)
    points = {impl: break_even([s for s, _ in pts], [x for _, x in pts]) for impl, pts in curves.items()}
    if args.plot:
        from sparsecnn.report.plots import plot_sweep
        from sparsecnn.report.tables import Results

        plot_sweep(Results({}, records), Path(args.plot), "sweep", records)
        print(f"plot: {args.plot}")
    if args.json:
        write_json(
            args.json,
            {
                "records": records,
                "break_even": {k: {"status": v.status, "sparsity": v.sparsity} for k, v in points.items()},
            },
        )
    return 0
