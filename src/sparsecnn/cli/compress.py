"""``sparsecnn compress MODEL [--profile P] [--data D --finetune-epochs E] --out model.sparsecnn``.

Deep Compression's last two stages on a pruned model (Han et al., ICLR 2016): per-layer k-means weight
sharing (8 bits conv / 5 bits FC by default, ``--bits conv1=6,fc6=4`` per layer), optional centroid
fine-tuning on real data (works under ``torchrun --nproc_per_node=N``), Huffman coding of the codes
and the relative-index gaps, and the compressed file (load it with ``sparsecnn.load``). Prints the
bytes of every stage per layer next to the paper's published rates (AlexNet, LeNet-5).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from sparsecnn.errors import SparseCNNError


def register(subparsers: argparse._SubParsersAction) -> None:
    from sparsecnn.cli.train import _add_training_args

    p = subparsers.add_parser("compress", help="quantize, Huffman-code and write a compressed model file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="zoo name (e.g. alexnet, lenet5) or a model file")
    p.add_argument("--weights", metavar="PATH",
                   help="state dict to load (e.g. DIR/model.pt from sparsecnn prune)")
    p.add_argument("--model", dest="arch", metavar="NAME", help="zoo architecture of a .pt/.pth state dict")
    p.add_argument("--profile", metavar="P",
                   help="prune first, without retraining: deep-compression, ssl or uniform:S")
    p.add_argument("--conv-bits", type=int, default=8,
                   help="code bits of conv layers (default 8, the paper's)")
    p.add_argument("--fc-bits", type=int, default=5, help="code bits of FC layers (default 5, the paper's)")
    p.add_argument("--bits", default=None, metavar="L=B,...",
                   help="per-layer code bits 1..8, e.g. conv1=6,fc6=4")
    p.add_argument("--split-empty", action="store_true",
                   help="re-seed k-means clusters left empty in the pruned gap, so every code is used: "
                        "lower quantization error, more bits after Huffman (default: the paper's k-means, "
                        "empty codes unused)")
    p.add_argument("--index-bits", type=int, default=4,
                   help="bits per relative-index gap, 1..8 (default 4, the paper's AlexNet width)")
    p.add_argument("--data", default=None,
                   help="fine-tune the centroids on this data: 'digits' or an image folder")
    p.add_argument("--size", type=int, default=None, help="image folders: resize to SIZE x SIZE")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="image folders: 1 grey, 3 RGB")
    _add_training_args(p, epochs=0, lr=0.01, epochs_flag="--finetune-epochs")
    p.add_argument("--model-seed", type=int, default=0, help="seed of a zoo model's random init (default 0)")
    p.add_argument("--json", metavar="OUT", help="also write the storage table as JSON to OUT")
    p.add_argument("--out", required=True, help="the compressed file to write (*.sparsecnn)")
    p.set_defaults(func=run)


def parse_bits(spec: str | None) -> dict[str, int]:
    """``"conv1=6,fc6=4"`` -> ``{"conv1": 6, "fc6": 4}``."""
    out: dict[str, int] = {}
    if not spec:
        return out
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        try:
            if not sep or not name:
                raise ValueError
            bits = int(value)
        except ValueError:
            raise SparseCNNError(f"--bits takes LAYER=BITS pairs separated by commas (e.g. conv1=6,fc6=4), "
                                 f"got {part!r}") from None
        name = name.strip()
        if name in out:
            raise SparseCNNError(f"--bits gives layer {name!r} twice ({out[name]} and {bits}); keep one")
        out[name] = bits
    return out


def paper_for(model: Any, name: str) -> str | None:
    """Which published table to compare against: the zoo name (or MODEL) when the paper has one."""
    from sparsecnn.compress.storage import PAPER

    zoo = getattr(model, "zoo_name", None) or name
    return zoo if zoo in PAPER else None


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}" if n >= 1e5 else f"{n / 1e3:.2f}K"


def print_table(report: Any, title: str) -> None:
    """The per-layer storage table: dense, CSR, relative index, + quantized, + Huffman, ratio, paper."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption="bytes in MB (K: kB); rate = compressed / dense; P = pruned, Q = "
                  "quantized, H = Huffman; paper: Han et al. ICLR 2016 (Table 4 AlexNet, Table 3 LeNet-5)")
    for col in ("layer", "kept", "dense", "P CSR", "P rel", "P+Q", "P+Q+H", "w bits H", "i bits H",
                "rate P+Q", "rate P+Q+H", "ratio", "paper P+Q", "paper P+Q+H", "paper ratio"):
        table.add_column(col, justify="left" if col == "layer" else "right", no_wrap=True)
    rows = report.rows()
    for i, r in enumerate(rows):
        if i == len(rows) - 1:
            table.add_section()

        def pct(v: float | None) -> str:
            return "" if v is None else f"{100 * v:.2f}%"

        table.add_row(
            r["layer"], f"{100 * r['kept']:.0f}%", _mb(r["dense_bytes"]), _mb(r["csr_bytes"]),
            _mb(r["relative_bytes"]), _mb(r["quantized_bytes"]), _mb(r["huffman_bytes"]),
            f"{r['weight_bits_huffman']:.2f}", f"{r['index_bits_huffman']:.2f}", pct(r["rate_pq"]),
            pct(r["rate_pqh"]), f"{r['ratio']:.1f}x", pct(r["paper_rate_pq"]), pct(r["paper_rate_pqh"]),
            "" if r["paper_ratio"] is None else f"{r['paper_ratio']:.1f}x",
            style="bold" if r["layer"] == "total" else None,
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)


def run(args: argparse.Namespace) -> int:
    from sparsecnn import train
    from sparsecnn._paths import check_output_file
    from sparsecnn.analysis._model import dense_equivalent
    from sparsecnn.cli.train import train_config
    from sparsecnn.compress import QuantizeConfig, finetune_centroids, quantize_model, storage_report
    from sparsecnn.io.compressed import save_compressed
    from sparsecnn.models import apply_profile, resolve

    out = os.fspath(args.out)
    if not out.endswith(".sparsecnn"):
        raise SparseCNNError(f"--out {out} must end in .sparsecnn")
    check_output_file("--out", out, "model.sparsecnn")  # before any work
    if args.json:
        check_output_file("--json", args.json, "compress.json")
    if isinstance(args.index_bits, bool) or not 1 <= args.index_bits <= 8:
        raise SparseCNNError(f"--index-bits must be 1..8, got {args.index_bits}")
    config = QuantizeConfig(conv_bits=args.conv_bits, fc_bits=args.fc_bits, bits=parse_bits(args.bits),
                            empty="split" if args.split_empty else "keep")
    kw: dict[str, Any] = {"model": args.arch} if args.arch else {}
    splits = None
    if args.data is not None:
        from sparsecnn import data

        splits = data.load(args.data, args.size, args.channels)
        info = splits.info
        if not os.path.splitext(str(args.model))[1]:
            kw.update(num_classes=info.num_classes, in_channels=info.in_channels, input_size=info.input_size)
    elif args.epochs:
        raise SparseCNNError("--finetune-epochs needs --data (the centroids are fine-tuned on real data)")
    # a sparse checkpoint or a compressed file is quantized as its dense equivalent (its layers stored
    # sparse or as codebooks are Conv2d / Linear again)
    model = dense_equivalent(resolve(args.model, weights=args.weights, seed=args.model_seed, **kw))
    if args.profile:
        apply_profile(model, args.profile)
    books = quantize_model(model, config)
    try:
        note = ""
        if args.epochs and splits is not None:
            before = train.evaluate(model, splits.test)
            books, result = finetune_centroids(model, books, splits.train, splits.test, train_config(args))
            note = f"; accuracy {before:.2%} quantized -> {result.test_accuracy:.2%} fine-tuned"
        elif splits is not None:
            note = f"; accuracy {train.evaluate(model, splits.test):.2%} quantized"
        if not train.is_main_process():
            return 0
        report = storage_report(books, args.index_bits, paper_for(model, str(args.model)))
        save_compressed(model.cpu(), books, out, index_bits=args.index_bits)
    finally:
        train.shutdown_distributed()
    print_table(report, f"{args.model}: Deep Compression storage")
    size = os.path.getsize(out)
    dense = report.total("dense_bytes")
    print(f"wrote {out}: {size:,} bytes ({dense / size:.1f}x smaller than the {dense:,.0f} bytes of dense "
          f"float32 conv+fc weights){note}")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump({"file": out, "file_bytes": size, **report.to_json()}, f, indent=2)
        except OSError as exc:
            raise SparseCNNError(f"cannot write {args.json} ({exc.strerror}); "
                                 f"choose a writable path") from None
    return 0
