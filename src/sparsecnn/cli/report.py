"""``sparsecnn report``: run the seed study's seven experiments and Deep Compression's storage here and
write report.html."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="run all eight experiments and write report.html, results.jsonl and plots",
        description="Run the seed study's experiments on this machine (AlexNet with the deep-compression "
        "and ssl profiles, LeNet-5 trained and pruned on digits) and Deep Compression's storage, "
        "appending every measurement to "
        "OUT/results.jsonl as it is made, then write OUT/report.html (self-contained) and OUT/*.png. "
        "Prints the path of report.html.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats and points, no 25600x24000 matrix (about 3 minutes on 2 cores)",
    )
    p.add_argument("--size", choices=("full", "quick", "tiny"), help=argparse.SUPPRESS)  # tiny: tests only
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default: cpu)")
    p.add_argument("--out", default="report", metavar="DIR", help="output folder (default: ./report)")
    p.add_argument(
        "--resume", action="store_true", help="keep DIR/results.jsonl and skip the measurements already in it"
    )
    p.add_argument("--threads", type=int, metavar="N", help="torch and numba threads (default: all cores)")
    p.add_argument(
        "--only",
        metavar="NAMES",
        help="comma list of experiments to run (weight_sparsity, conv_layers, fc_layers, sparsity_sweep, "
        "memory_scaling, sparse_x_sparse, end_to_end, compression; default: all)",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rebuild report.html and the plots from DIR/results.jsonl",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.render_only:
        from sparsecnn.bench.harness import read_records
        from sparsecnn.errors import SparseCNNError
        from sparsecnn.report.html import write_report

        results = Path(args.out) / "results.jsonl"
        if not any(r.get("type") == "measurement" for r in read_records(results)):
            raise SparseCNNError(
                f"{results} holds no measurements (a run stopped before the first one?); run "
                f"`sparsecnn report --out {args.out} --resume` to measure"
            )
        print(write_report(args.out).resolve())
        return 0
    from sparsecnn._paths import check_output_dir
    from sparsecnn.bench.experiments import EXPERIMENTS, ReportConfig, run_report
    from sparsecnn.errors import SparseCNNError

    only = None
    if args.only is not None:  # '' or ',' names nothing: an error, not "all" nor an empty report
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        known = [n for n, _ in EXPERIMENTS]
        bad = [n for n in only if n not in known]
        if bad or not only:
            what = f"unknown experiment(s) {', '.join(bad)}" if bad else f"no experiment in {args.only!r}"
            raise SparseCNNError(f"--only: {what}; choose from {', '.join(known)}")
    if args.threads is not None and args.threads < 1:
        raise SparseCNNError(f"--threads must be >= 1, got {args.threads}")
    check_output_dir("--out", args.out)
    size = args.size or ("quick" if args.quick else "full")
    cfg = ReportConfig.preset(size, device=args.device, threads=args.threads)
    summary = run_report(cfg, Path(args.out), resume=args.resume, only=only)
    note = f" ({summary.errors} failed, see the report)" if summary.errors else ""
    print(
        f"{summary.measured} measured, {summary.skipped} already in results.jsonl{note}, "
        f"{summary.seconds:.0f} s"
    )
    print(summary.report.resolve())
    return 0
