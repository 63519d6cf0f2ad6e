"""``sparsecnn analyze``: per-layer sparsity, storage and FLOPs of a model (docs/analyze.md)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from sparsecnn.errors import SparseCNNError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="per-layer weight/activation sparsity, bytes per format and FLOPs of a model",
        description="Print one row per conv/linear layer and a totals row: GEMM dims, sparsity at four "
        "granularities, bytes dense/CSR/BSR/relative-index, FLOPs and input activation sparsity.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="zoo model name (sparsecnn.models.names()) or a .prototxt/.onnx/.pt/.npz file")
    p.add_argument("--weights", metavar="PATH", help="state dict file to load into the model")
    p.add_argument("--model", dest="arch", metavar="NAME",
                   help="zoo architecture of a .pt/.pth state dict given as MODEL (e.g. runs/mag/model.pt)")
    p.add_argument("--profile", metavar="P",
                   help="prune first: deep-compression, ssl or uniform:S (S in [0, 1])")
    p.add_argument("--input", default="random", metavar="random|digits|PATH",
                   help="batch for activation sparsity: seeded N(0,1) noise, scikit-learn digits, or an "
                   "image file, folder of images or .npy array (N,C,H,W) (default: random)")
    p.add_argument("--batch", type=int, default=8, metavar="N", help="images per batch (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init and random input (default: 0)")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON to OUT")
    p.add_argument("--compression", action="store_true",
                   help="also the Deep Compression storage per layer: dense, pruned (CSR, relative index), "
                        "+ quantized (8-bit conv / 5-bit FC k-means), + Huffman, beside the paper's rates")
    p.add_argument("--index-bits", type=int, default=4, help="--compression: bits per gap (default 4)")
    p.set_defaults(func=run)


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _flops(n: int) -> str:
    return f"{n / 1e6:.1f}"


def _ratio(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sparsecnn.analysis import analyze_model
    from sparsecnn.models import names, resolve

    # options checked before any work (the compression table comes after the whole analysis)
    if args.compression and not 1 <= args.index_bits <= 8:
        raise SparseCNNError(f"--index-bits must be 1..8, got {args.index_bits}")
    if args.index_bits != 4 and not args.compression:
        raise SparseCNNError("--index-bits sets the gaps of the --compression table; add --compression")
    if args.arch and args.model in names():
        raise SparseCNNError(f"--model {args.arch} names the architecture of a weights file given as MODEL; "
                             f"MODEL is already the zoo model {args.model!r}: drop --model")
    if args.weights and Path(str(args.model)).suffix.lower() in (".pt", ".pth", ".npz"):
        raise SparseCNNError(f"MODEL {args.model} is already a weights file; drop --weights {args.weights} "
                             f"or pass a zoo name as MODEL (e.g. lenet5 --weights {args.weights})")
    kw = {"model": args.arch} if args.arch else {}
    model = resolve(args.model, weights=args.weights, seed=args.seed, **kw)
    result = analyze_model(model, input=args.input, batch=args.batch, seed=args.seed, profile=args.profile,
                           name=args.model)
    if args.json:
        try:
            Path(args.json).write_text(result.to_json() + "\n")
        except OSError as exc:
            raise SparseCNNError(
                f"cannot write {args.json} ({exc.strerror}); choose a writable path"
            ) from None

    c, h, w = result.input_shape
    title = (f"{result.model} {c}x{h}x{w}, profile {result.profile or 'none'}, input {result.input} "
             f"(batch {result.batch})")
    table = Table(title=title, caption="M, K, N per group (g = groups); sparsities and act0 in %; "
                  "FLOPs in MFLOP per image; save = dense/CSR bytes")
    for col in ("layer", "kind", "weight", "M", "K", "N", "params", "nnz", "elem", "filter", "chan",
                "kshape", "dense", "CSR", "BSR", "rel", "save", "MFLOP", "nz MFLOP", "act0"):
        table.add_column(col, justify="left" if col in ("layer", "kind", "weight") else "right", no_wrap=True)
    for r in result.layers:
        shape = "x".join(map(str, r.weight_shape)) + (f" g{r.groups}" if r.groups > 1 else "")
        table.add_row(
            r.name, r.kind, shape, str(r.m), str(r.k), str(r.n), f"{r.params:,}", f"{r.nnz:,}",
            _pct(r.sparsity), _pct(r.filter_sparsity), _pct(r.channel_sparsity),
            _pct(r.kernel_shape_sparsity),
            _bytes(r.dense_bytes), _bytes(r.csr_bytes), _bytes(r.bsr_bytes), _bytes(r.relative_bytes),
            _ratio(r.csr_saving), _flops(r.dense_flops), _flops(r.nonzero_flops), _pct(r.activation_sparsity),
        )
    t = result.total
    table.add_section()
    table.add_row(
        f"total ({t.layers})", "", "", "", "", "", f"{t.params:,}", f"{t.nnz:,}", _pct(t.sparsity),
        "", "", "", _bytes(t.dense_bytes), _bytes(t.csr_bytes), _bytes(t.bsr_bytes), _bytes(t.relative_bytes),
        _ratio(t.csr_saving), _flops(t.dense_flops), _flops(t.nonzero_flops), _pct(t.activation_sparsity),
        style="bold",
    )
    console = Console()
    if not console.is_terminal:
        console = Console(width=240)  # piped output: keep every column readable instead of squeezing
    console.print(table)
    if args.compression:
        _compression(model, args)
    return 0


def _compression(model, args: argparse.Namespace) -> None:
    """Quantize a copy of the (profile-pruned) model and print its storage at each stage."""
    import copy

    from sparsecnn.cli.compress import paper_for, print_table
    from sparsecnn.compress import compression_report
    from sparsecnn.models import apply_profile

    work = copy.deepcopy(model)
    if args.profile:
        apply_profile(work, args.profile)
    report, _ = compression_report(work, args.index_bits, paper_for(model, str(args.model)))
    print_table(report, f"{args.model}: Deep Compression storage (profile {args.profile or 'none'}, "
                        f"{args.index_bits}-bit gaps)")
