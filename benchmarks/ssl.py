"""Structured sparsity that pays (issue 12): AlexNet under the structured ``ssl`` profile, shrunk.

``python -m benchmarks.ssl [--threads 2] [--repeats 15]`` prints two tables.

Per conv layer: oneDNN dense (torch ``F.conv2d`` on the unpruned layer, the baseline), then the
shrunk layer (:func:`sparsecnn.shrink.shrink`: removed filters and unread input channels gone) run by
each CPU strategy on its real input, and the best of them. *ideal* is dense FLOPs / remaining FLOPs,
the remaining FLOPs being the compact GEMM left after shrinking (kept filters x kept lowered columns
per group x output pixels); the target is best speedup >= 75% of ideal.

End to end: the dense AlexNet in torch, ONNX Runtime on the same pruned (unshrunk) model when
installed, ``sparsify(model, "auto")`` of the ssl model with and without ``shrink=True``, of the
``ssl-unstructured`` model (the same zero count per layer, not structured), and the whole-model
executor on the shrunk ssl model (``sparsecnn.compile(model, x, shrink=True)``); target: shrunk SSL
>= 2x torch dense and faster than ONNX Runtime, judged for both engines a user can run. Every output
is checked against dense first.
Batch 1; medians after warm-up; interleaved turns as in :mod:`benchmarks.end_to_end`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

import sparsecnn
from benchmarks.end_to_end import _interleaved
from sparsecnn import models
from sparsecnn.analysis.costs import compact_gemm
from sparsecnn.bench.harness import check_close, set_threads, time_call
from sparsecnn.bench.peers import model_peers
from sparsecnn.layers import SparseConv2d
from sparsecnn.plan import _capture
from sparsecnn.shrink import shrink

CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")
STRATEGIES = ("torch", "lowered", "dense", "direct", "csrmm")


def layer_table(model: nn.Module, dense: nn.Module, small: nn.Module, x: torch.Tensor,
                repeats: int) -> list[dict]:
    targets = {n: getattr(small, n) for n in CONVS}
    inputs = _capture(small, targets, x)
    dense_inputs = _capture(dense, {n: getattr(dense, n) for n in CONVS}, x)
    rows = []
    for name in CONVS:
        conv_dense, conv_small, xin = getattr(dense, name), getattr(small, name), inputs[name]
        xd = dense_inputs[name]
        with torch.inference_mode():
            ref = conv_small(xin)
            t_dense = time_call(lambda c=conv_dense, v=xd: c(v), repeats=repeats).median_s
            times = {}
            for s in STRATEGIES:
                layer = SparseConv2d.from_dense(conv_small, s, name=name)
                check_close(layer(xin), ref, rtol=1e-4, what=f"{name} {s}")
                times[s] = time_call(lambda f=layer, v=xin: f(v), repeats=repeats).median_s
        # dense FLOPs of the unpruned layer over the compact GEMM left in the shrunk one
        dense_flops = compact_gemm(conv_dense, tuple(ref.shape)).dense_flops
        ideal = compact_gemm(conv_small, tuple(ref.shape), dense_flops).ideal
        best = min(times, key=times.get)
        speedup = t_dense / times[best]
        rows.append({"layer": name, "shape": f"{conv_small.in_channels}->{conv_small.out_channels}",
                     "dense_ms": t_dense * 1e3, "times_ms": {k: v * 1e3 for k, v in times.items()},
                     "best": best, "speedup": speedup, "ideal": ideal, "of_ideal": speedup / ideal})
        verdict = "PASS" if speedup >= 0.75 * ideal else "FAIL"
        print(f"{name}  {conv_dense.in_channels:3d}->{conv_dense.out_channels:3d} shrunk "
              f"{conv_small.in_channels:3d}->{conv_small.out_channels:3d}  oneDNN dense "
              f"{t_dense * 1e3:6.3f} ms  " + "  ".join(f"{k} {v * 1e3:6.3f}" for k, v in times.items())
              + f"  best {best:7s} {speedup:5.2f}x  ideal {ideal:5.2f}x  "
              f"{100 * speedup / ideal:5.1f}% of ideal  {verdict}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ssl", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--skip-layers", action="store_true", help="only the end-to-end table")
    ap.add_argument("--plans", type=Path, default=Path("bench-results/plans.json"))
    ap.add_argument("--out", type=Path, default=Path("bench-results/ssl.json"))
    args = ap.parse_args(argv)
    set_threads(args.threads)
    print(f"AlexNet, structured ssl profile, batch 1, {args.threads} threads (torch and numba)")
    dense = models.build("alexnet").eval()
    model = models.build("alexnet").eval()
    models.apply_profile(model, "ssl")
    unstructured = models.build("alexnet").eval()
    models.apply_profile(unstructured, "ssl-unstructured")
    x = torch.randn(1, *models.input_shape(model), generator=torch.Generator().manual_seed(0))
    small = shrink(model, x).model
    rows = layer_table(model, dense, small, x, args.repeats) if not args.skip_layers else []

    runs = {
        "ssl shrunk": sparsecnn.sparsify(model, "auto", example_input=x, plan_path=args.plans, shrink=True),
        "ssl unshrunk": sparsecnn.sparsify(model, "auto", example_input=x, plan_path=args.plans),
        "ssl-unstructured": sparsecnn.sparsify(unstructured, "auto", example_input=x, plan_path=args.plans),
    }
    compiled = sparsecnn.compile(model, x, plan_path=args.plans, shrink=True)
    runs["ssl shrunk, compiled"] = compiled
    fns = {"torch dense": lambda: dense(x)}
    with torch.inference_mode():
        ref_ssl, ref_un = model(x), unstructured(x)
        for label, m in runs.items():
            check_close(m(x), ref_un if label == "ssl-unstructured" else ref_ssl, rtol=1e-4, what=label)
            fns[label] = (lambda m=m: m(x))
        for label, fn in model_peers(model, x, threads=args.threads).items():
            check_close(torch.from_numpy(np.asarray(fn())), ref_ssl, rtol=1e-4, what=label)
            fns[f"{label} (ssl, unshrunk)"] = fn
        for fn in fns.values():
            fn()
        times = dict(zip(fns, _interleaved(list(fns.values()), args.repeats, args.block, 0.0), strict=True))
    base = times["torch dense"]
    print("\nend to end (batch 1)")
    e2e = []
    for label, t in times.items():
        m = runs.get(label)
        plan = {} if m is None else dict(m.plan if m is compiled else m.sparsecnn_plan)
        print(f"  {label:28s} {t * 1e3:8.2f} ms  {base / t:5.2f}x torch dense"
              + (f"  plan {plan}" if plan else ""), flush=True)
        e2e.append({"run": label, "ms": t * 1e3, "speedup": base / t, "plan": plan})
    ort = [t for k, t in times.items() if k.startswith("onnxruntime")]
    for label in ("ssl shrunk", "ssl shrunk, compiled"):
        shrunk = times[label]
        vs_ort = (f"; faster than ONNX Runtime: {'PASS' if shrunk < ort[0] else 'FAIL'} "
                  f"({ort[0] / shrunk:.2f}x)" if ort else "")
        print(f"  {label}: target >= 2x torch dense: {'PASS' if base / shrunk >= 2 else 'FAIL'} "
              f"({base / shrunk:.2f}x){vs_ort}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "layers": rows, "end_to_end": e2e}, indent=2))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
