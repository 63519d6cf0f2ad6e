"""Activation-sparse FC (issue 12): ``spmv-act`` against the weight-only ``spmv`` and torch dense.

``python -m benchmarks.act_fc [--threads 2] [--repeats 21] [--layout default|packed|masked]`` prints one
table: AlexNet's fc6 and fc7 (and fc8) at Deep Compression's weight sparsity (91%, 91%, 75%),
batch 1, inputs with 0%, 60%, 70% and 90% exact zeros (ReLU output: half-normal nonzeros), plus the
dense (unpruned) layers, where ``spmv-act`` keeps dense columns. Every output is checked against
torch dense first; the three are timed interleaved (medians). Target: fc6/fc7 at 91% weights and
>= 60% zero inputs >= 1.8x spmv.

Two regimes, as in :mod:`benchmarks.qspmv`: *warm* (each layer timed back to back, so a weight that
fits the L3, such as fc7's 9 MB of CSR, is read from there) and *cold* (``bench.harness.time_cold``:
caches flushed before each call, as for a layer in a forward pass whose weights were evicted by the
others). The cold columns time the bound kernels (no torch glue), the warm ones the torch modules,
in interleaved turns (``--repeats`` turns of five calls each).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from benchmarks.end_to_end import _interleaved
from sparsecnn.bench.harness import check_close, set_threads, time_cold
from sparsecnn.kernels.spmv import bind_sparse_linear
from sparsecnn.kernels.spmv_act import bind_act_sparse_linear, prepare_act_linear
from sparsecnn.layers import SparseLinear

CASES = (("fc6", 9216, 4096, 0.91), ("fc7", 4096, 4096, 0.91), ("fc8", 4096, 1000, 0.75),
         ("fc6 dense", 9216, 4096, 0.0), ("fc7 dense", 4096, 4096, 0.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.act_fc", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layout", choices=("default", "packed", "masked"), default="default",
                    help="spmv-act's column layout (default: the masked one where AVX-512 runs at full "
                         "rate, else packed)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"batch {args.batch}, {args.threads} threads (torch and numba), spmv-act layout {args.layout}; "
          "times in ms (medians)")
    print(f"{'layer':10s} {'w sp':>5s} {'x zeros':>7s} {'torch':>8s} {'spmv':>8s} {'spmv-act':>8s} "
          f"{'act/spmv':>8s} {'act/torch':>9s}  target | {'cold spmv':>9s} {'cold act':>8s} "
          f"{'act/spmv':>8s}  target")
    for name, k, m, ws in CASES:
        lin = nn.Linear(k, m)
        with torch.no_grad():
            w = lin.weight.numpy()
            w[rng.random(w.shape) < ws] = 0.0
        spmv = SparseLinear.from_dense(lin, "spmv")
        masked = None if args.layout == "default" else args.layout == "masked"
        act = SparseLinear.from_format(prepare_act_linear(w, masked=masked), "spmv-act", in_features=k,
                                       out_features=m, bias=lin.bias.detach().numpy())
        for zeros in (0.0, 0.6, 0.7, 0.9):
            x = np.abs(rng.standard_normal((args.batch, k))).astype(np.float32)
            x[rng.random(x.shape) < zeros] = 0.0
            xt = torch.from_numpy(x)
            with torch.inference_mode():
                ref = lin(xt)
                check_close(spmv(xt), ref, what=f"{name} spmv")
                check_close(act(xt), ref, what=f"{name} spmv-act")
                # interleaved turns of five calls each: a slow spell of the machine hits all alike
                labels = ("torch", "spmv", "act")
                fns = [lambda f=f, v=xt: f(v) for f in (lin, spmv, act)]
                t = dict(zip(labels, _interleaved(fns, args.repeats, 5, 0.0), strict=True))
            out = np.empty((args.batch, m), np.float32)
            cold = time_cold([lambda f=f, v=x: f(v) for f in (
                bind_sparse_linear(spmv.engine.format, args.batch, spmv.engine.bias, out),
                bind_act_sparse_linear(act.engine.format, args.batch, act.engine.bias, out))],
                repeats=args.repeats)
            target = ws >= 0.9 and zeros >= 0.6

            def goal(ratio: float, target: bool = target) -> str:
                return ("PASS" if ratio >= 1.8 else "FAIL") if target else ""
            print(f"{name:10s} {ws:5.2f} {zeros:7.2f} {t['torch'] * 1e3:8.3f} {t['spmv'] * 1e3:8.3f} "
                  f"{t['act'] * 1e3:8.3f} {t['spmv'] / t['act']:8.2f} {t['torch'] / t['act']:9.2f}  "
                  f"{goal(t['spmv'] / t['act']):4s}   | {cold[0] * 1e3:9.3f} {cold[1] * 1e3:8.3f} "
                  f"{cold[0] / cold[1]:8.2f}  {goal(cold[0] / cold[1])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
