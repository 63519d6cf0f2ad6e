"""``sparsecnn run``: compile a model with the whole-model executor, run it, time it against dense."""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from sparsecnn.errors import SparseCNNError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="compile MODEL with the whole-model executor, run it and time it against torch / ONNX Runtime",
        description="Lower MODEL (a zoo name, model.onnx, deploy.prototxt, a .pt/.npz file) with "
        "sparsecnn.compile: BatchNorm folded, ReLU and residual adds fused, each conv/linear on the strategy "
        "that measures fastest; run it on the input, check it against the dense model, print the top "
        "classes of the first image and the latency of every engine (medians, interleaved).",
    )
    p.add_argument("model", metavar="MODEL", help="zoo model name or a .onnx/.prototxt/.pt/.npz file")
    p.add_argument("--weights", metavar="PATH", help="weights: a state dict (zoo) or a .caffemodel")
    p.add_argument("--model", dest="arch", metavar="NAME", help="zoo architecture of a .pt state dict")
    p.add_argument("--profile", metavar="P", help="prune first: deep-compression, ssl or uniform:S")
    p.add_argument("--input", default="random", metavar="random|digits|PATH",
                   help="random (seeded), digits (scikit-learn) or an image folder / .npy file "
                   "(default: random)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="images per call (default: 1)")
    p.add_argument("--strategy", default="auto", metavar="S",
                   help="auto (measure per layer; default) or one strategy for every layer (e.g. direct)")
    p.add_argument("--threads", type=int, metavar="N", help="torch, numba and ONNX Runtime threads")
    p.add_argument("--repeats", type=int, default=20, metavar="N",
                   help="timed turns per engine (0: run once, no timing; default: 20)")
    p.add_argument("--top", type=int, default=5, metavar="K", help="classes to print (default: 5)")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON to OUT")
    p.set_defaults(func=run)


def whole_model_times(engines: dict[str, Any], repeats: int, block: int = 5) -> dict[str, float]:
    """Median seconds per call of each engine, timed in interleaved turns (one untimed call, then
    ``block`` timed calls, with a short idle gap so one engine's threads do not slow the next)."""
    samples: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(repeats):
        for name, fn in engines.items():
            time.sleep(0.02)
            fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in samples.items()}


def run(args: argparse.Namespace) -> int:
    import torch

    import sparsecnn
    from sparsecnn._paths import check_output_file
    from sparsecnn.analysis._inputs import load_input
    from sparsecnn.analysis._model import dense_equivalent
    from sparsecnn.bench.harness import check_close, set_threads
    from sparsecnn.bench.peers import model_peers
    from sparsecnn.models import apply_profile, input_shape, resolve

    for flag, value in (("--batch", args.batch), ("--threads", args.threads), ("--top", args.top)):
        if value is not None and value < 1:
            raise SparseCNNError(f"{flag} must be >= 1, got {value}")
    if args.repeats < 0:
        raise SparseCNNError(f"--repeats must be >= 0, got {args.repeats}")
    if args.json:
        check_output_file("--json", args.json, "run.json")  # now, not after compiling and timing
    threads = set_threads(args.threads)
    kw = {"model": args.arch} if args.arch else {}
    model = dense_equivalent(resolve(args.model, weights=args.weights, **kw)).eval()
    if args.profile:
        apply_profile(model, args.profile)
    x = load_input(args.input, input_shape(model), batch=args.batch)
    t0 = time.perf_counter()
    compiled = sparsecnn.compile(model, x, args.strategy)
    compile_s = time.perf_counter() - t0
    with torch.inference_mode():
        y = compiled(x)
        ref = model(x)
    err = check_close(y, ref, rtol=1e-4, what=f"{args.model} compiled")
    print(f"{args.model}: compiled in {compile_s:.1f} s; {len(compiled.steps(tuple(x.shape)))} steps; "
          f"output {tuple(y.shape)}, max error {err:.2g} of the dense output's scale")
    plan = dict(compiled.plan)
    counts: dict[str, int] = {}
    for s in plan.values():
        counts[s] = counts.get(s, 0) + 1
    print("plan: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    result: dict[str, Any] = {"model": args.model, "profile": args.profile, "batch": int(x.shape[0]),
                              "threads": threads, "compile_s": compile_s, "max_rel_error": err, "plan": plan,
                              "steps": compiled.steps(tuple(x.shape))}
    if y.dim() == 2:
        top = torch.topk(y[0], min(args.top, y.shape[1]))
        print("top classes of image 0: " + ", ".join(f"{int(i)} ({float(v):.3g})"
                                                      for v, i in zip(top.values, top.indices, strict=True)))
        result["top"] = [int(i) for i in top.indices]
    if args.repeats:
        with torch.inference_mode():
            engines: dict[str, Any] = {"torch dense": lambda: model(x)}
            peer = model_peers(model, x, threads=threads).get("onnxruntime")
            if peer is not None:
                engines["onnxruntime dense"] = peer
            engines["sparsecnn compiled"] = lambda: compiled(x)
            times = whole_model_times(engines, args.repeats)
        base = times["torch dense"]
        print(f"latency, batch {x.shape[0]}, {threads} thread(s), median of {args.repeats} turns x 5:")
        for name, t in times.items():
            print(f"  {name:20s} {t * 1e3:9.3f} ms   {base / t:5.2f}x torch dense")
        result["times_ms"] = {k: v * 1e3 for k, v in times.items()}
    if args.json:
        from sparsecnn.cli.bench import write_json

        write_json(args.json, result)
    return 0
