"""``sparsecnn export``: write a (pruned, sparsified or imported) model as ONNX (docs/interchange.md)."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX for ONNX Runtime and other runtimes",
        description="Export MODEL (a zoo name, .prototxt, .onnx, .pt/.pth or sparse checkpoint), optionally "
        "pruned to a profile first, as ONNX with a dynamic batch dimension. Pruned zeros are kept; sparse "
        "layers are written as their dense equivalent (ONNX has no sparse convolution).",
    )
    p.add_argument("model", metavar="MODEL", help="zoo model name or model file")
    p.add_argument(
        "--weights", metavar="PATH", help="weights: state dict (zoo model) or .caffemodel (.prototxt)"
    )
    p.add_argument(
        "--model",
        dest="arch",
        metavar="NAME",
        help="zoo architecture of a .pt/.pth state dict given as MODEL",
    )
    p.add_argument(
        "--profile", metavar="P", help="prune first: deep-compression, ssl or uniform:S (S in [0, 1])"
    )
    p.add_argument("--onnx", required=True, metavar="OUT", help="output .onnx file")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default: 17)")
    p.add_argument(
        "--check",
        action="store_true",
        help="run the exported file in ONNX Runtime and compare with torch on a random batch",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from sparsecnn._paths import check_output_file
    from sparsecnn.errors import SparseCNNError
    from sparsecnn.io import export_onnx
    from sparsecnn.io.onnx import onnx_opsets
    from sparsecnn.models import apply_profile, input_shape, resolve

    lo, hi = onnx_opsets()
    if not lo <= args.opset <= hi:  # torch would print its IR on stderr before failing
        raise SparseCNNError(
            f"--opset {args.opset}: torch {torch.__version__.split('+')[0]} exports ONNX opsets "
            f"{lo}..{hi}; choose one of them (default 17)"
        )
    check_output_file("--onnx", args.onnx, "model.onnx")
    kw = {"model": args.arch} if args.arch else {}
    model = resolve(args.model, weights=args.weights, **kw)
    if args.profile:
        apply_profile(model, args.profile)
    shape = input_shape(model)
    path = export_onnx(model, args.onnx, input_shape=shape, opset=args.opset)
    print(
        f"wrote {path} ({os.path.getsize(path) / 2**20:.2f} MiB, input 1x{'x'.join(map(str, shape))}, "
        f"batch dynamic)"
    )
    if args.check:
        try:
            import onnxruntime as ort
        except ImportError:
            raise SparseCNNError("--check needs onnxruntime: pip install 'sparsecnn[onnx]'") from None
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, *shape), dtype=np.float32))
        with torch.no_grad():
            ref = model.eval()(x)
        ref = ref[0] if isinstance(ref, (tuple, list)) else ref
        got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[
            0
        ]
        err = float(np.abs(got - ref.numpy()).max())
        scale = float(np.abs(ref.numpy()).max()) or 1.0
        ok = err <= 1e-4 * scale + 1e-5
        print(
            f"ONNX Runtime vs torch on a batch of 2: max abs difference {err:.3g} "
            f"({'ok' if ok else 'MISMATCH'})"
        )
        if not ok:
            raise SparseCNNError(f"the exported model differs from torch by {err:.3g}; please report this")
    return 0
