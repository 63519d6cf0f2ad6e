"""``sparsecnn bench``: per-layer time of every strategy vs dense for one model (docs/report.md)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import Any

from sparsecnn.errors import SparseCNNError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="per-layer time of every sparse strategy and peer vs torch dense",
        description="Time every conv/linear layer of MODEL with every strategy of the engine and the peers "
        "(torch dense, torch.sparse CSR, scipy.sparse, ONNX Runtime) on the layer's real input; each output "
        "is checked against torch's dense layer before it is timed. Prints one table per layer kind.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="zoo model name (sparsecnn.models.names()) or a .prototxt/.onnx/.pt/.npz file")
    p.add_argument("--profile", metavar="P", help="prune first: deep-compression, ssl or uniform:S")
    p.add_argument("--weights", metavar="PATH", help="state dict file to load into the model")
    p.add_argument("--model", dest="arch", metavar="NAME",
                   help="zoo architecture of a .pt/.pth state dict given as MODEL (e.g. runs/mag/model.pt)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="images per call (default: 1)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default: cpu)")
    p.add_argument("--threads", type=int, metavar="N", help="torch and numba threads (default: all cores)")
    p.add_argument(
        "--repeats", type=int, default=7, metavar="N", help="timed samples per measurement (default: 7)"
    )
    p.add_argument("--json", metavar="OUT", help="also write the measurement records as JSON to OUT")
    p.add_argument("--whole", action="store_true",
                   help="time the whole model instead: torch dense, ONNX Runtime and the compiled executor "
                   "(sparsecnn run MODEL does the same and prints the plan and top classes)")
    add_results_args(p, "bench.jsonl")
    p.set_defaults(func=run)


def add_results_args(p: argparse.ArgumentParser, default: str) -> None:
    """``--results`` (JSONL written as it goes) and ``--resume``, shared by bench and sweep."""
    p.add_argument(
        "--results",
        default=default,
        metavar="JSONL",
        help=f"append every measurement to this file as it is made, so an interrupted run keeps them "
        f"(default: {default}; replaced unless --resume)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the --results file and skip the measurements already in it (after an interrupted run)",
    )


def interrupted(verb: str, path: str) -> int:
    """After Ctrl-C: one line on stderr saying where the measurements so far are kept; exit code 130."""
    from sparsecnn.bench.harness import read_records

    try:
        n = sum(r.get("type") == "measurement" for r in read_records(path))
    except SparseCNNError:
        n = 0
    print(
        f"sparsecnn {verb}: interrupted; {n} measurement(s) are kept in {path}: run the same command "
        f"with --resume to continue",
        file=sys.stderr,
    )
    return 130


def print_tables(tables: Iterable[Any]) -> None:
    """Print :class:`sparsecnn.report.tables.Table` objects with rich."""
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the columns into 80 characters
        console = Console(width=max(console.width, 200))
    for t in tables:
        rt = RichTable(title=t.title, caption=t.note or None, title_justify="left")
        for i, col in enumerate(t.columns):
            rt.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
        for row in t.rows:
            rt.add_row(*map(str, row))
        console.print(rt)


def write_json(path: str, payload: Any) -> None:
    try:
        from sparsecnn._atomic import write_text

        write_text(path, json.dumps(payload, indent=1) + "\n")
    except OSError as exc:
        raise SparseCNNError(f"cannot write {path} ({exc.strerror}); choose a writable path") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from sparsecnn._paths import check_output_file
    from sparsecnn.analysis._model import dense_equivalent
    from sparsecnn.bench.experiments import bench_model
    from sparsecnn.bench.harness import capture_environment
    from sparsecnn.models import apply_profile, resolve
    from sparsecnn.report.tables import bytes_table, conversion_table, layer_time_table

    for flag, value in (("--batch", args.batch), ("--repeats", args.repeats), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise SparseCNNError(f"{flag} must be >= 1, got {value}")
    if args.json:
        check_output_file("--json", args.json, "bench.json")  # now, not after the measurements
    if args.whole:
        from sparsecnn.cli.run import run as run_whole

        whole = argparse.Namespace(model=args.model, weights=args.weights, arch=args.arch,
                                   profile=args.profile, input="random", batch=args.batch, strategy="auto",
                                   threads=args.threads, repeats=args.repeats, top=5, json=args.json)
        return run_whole(whole)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SparseCNNError("--device cuda: torch sees no CUDA device here; use --device cpu")
    kw = {"model": args.arch} if args.arch else {}
    # A sparse checkpoint is timed from its weights, zeros included: every strategy vs torch dense.
    model = dense_equivalent(resolve(args.model, weights=args.weights, **kw))
    if args.profile:
        apply_profile(model, args.profile)
    try:
        records = bench_model(
            model, args.model, batch=args.batch, device=args.device, threads=args.threads,
            repeats=args.repeats, results=args.results, resume=args.resume,
        )
    except KeyboardInterrupt:
        return interrupted("bench", args.results)
    label = args.profile or "as loaded"
    for r in records:  # name the profile in the tables and the JSON
        r["params"]["profile"] = label
    conv = [r for r in records if "conv" in _kind(model, r)]
    lin = [r for r in records if "linear" in _kind(model, r)]
    tables = []
    for recs, what in ((conv, "conv"), (lin, "linear")):
        if recs:
            tables += [
                bytes_table(recs, args.model, label),
                layer_time_table(
                    recs, args.model, label, f"{args.model} / {label}: {what} layers, batch {args.batch}"
                ),
                conversion_table(recs, args.model, label),
            ]
    print_tables(tables)
    errors = [r for r in records if r["status"] == "error"]
    for r in errors:
        print(f"error: {r['params']['layer']} {r['params']['impl']}: {r['error']}")
    if args.json:
        write_json(args.json, {"environment": capture_environment(args.device), "records": records})
    return 0


def _kind(model: Any, rec: dict[str, Any]) -> str:
    from torch import nn

    m = model.get_submodule(rec["params"]["layer"])
    return "linear" if isinstance(m, nn.Linear) else "conv"
