"""Sparse x sparse convolution (issue 12): ``spconv-act`` on AlexNet conv3-5 at Deep Compression's
weight sparsity, with the seed's ReLU input sparsities and more.

``python -m benchmarks.spxsp [--threads 2] [--repeats 11]`` prints one row per (layer, input zeros):
torch dense (oneDNN), the best weight-only strategy (direct, lowered, csrmm, bsr), the old
``spgemm`` and ``spconv-act``, with the bytes each sparse operand really holds. Inputs are ReLU-like
(half-normal nonzeros at random positions); every output is checked against torch dense first.
Targets: spconv-act beats torch dense on conv3-5 at the seed's sparsities, and beats the best
weight-only strategy where the input is >= 70% zeros (the target column). The engines are timed in
interleaved turns (``--repeats`` turns of five calls each, medians), so a slow spell of the machine
hits all of them alike: timed one after the other, the verdicts flipped from run to run.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from benchmarks.end_to_end import _interleaved
from sparsecnn.bench.harness import check_close, set_threads
from sparsecnn.layers import SparseConv2d

# name, Cin, Cout, groups, Deep Compression weight sparsity, the seed's ReLU input sparsity
LAYERS = (("conv3", 256, 384, 1, 0.65, 0.565), ("conv4", 384, 384, 2, 0.63, 0.647),
          ("conv5", 384, 256, 2, 0.63, 0.685))
WEIGHT_ONLY = ("direct", "lowered", "csrmm", "bsr")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.spxsp", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"AlexNet 13x13, batch 1, {args.threads} threads; ms (medians); bytes of the stored operands")
    print(f"{'layer':6s} {'x0':>5s} {'torch':>7s} {'best w-only':>17s} {'spgemm':>7s} {'spconv-act':>10s} "
          f"{'vs torch':>8s} {'vs w-only':>9s}  {'bytes w-only':>12s} {'bytes spconv':>12s}  target")
    for name, cin, cout, groups, ws, seed_x in LAYERS:
        conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
        with torch.no_grad():
            w = conv.weight.numpy()
            w[rng.random(w.shape) < ws] = 0.0
        layers = {s: SparseConv2d.from_dense(conv, s) for s in (*WEIGHT_ONLY, "spgemm", "spconv-act")}
        for zeros in (seed_x, 0.7, 0.8, 0.9):
            x = np.abs(rng.standard_normal((1, cin, 13, 13))).astype(np.float32)
            x[rng.random(x.shape) < zeros] = 0.0
            xt = torch.from_numpy(x)
            with torch.inference_mode():
                ref = conv(xt)
                fns = {"torch": lambda c=conv, v=xt: c(v)}
                for s, layer in layers.items():
                    check_close(layer(xt), ref, what=f"{name} {s}")
                    fns[s] = lambda f=layer, v=xt: f(v)
                # interleaved turns of five calls each (after an untimed one): drift hits all alike
                t = dict(zip(fns, _interleaved(list(fns.values()), args.repeats, 5, 0.0), strict=True))
            best = min(WEIGHT_ONLY, key=t.get)
            sx = t["spconv-act"]
            # targets: beat torch at the seed's input sparsity; beat the best weight-only from 70% zeros
            if zeros == seed_x:
                verdict = "PASS" if sx < t["torch"] else "FAIL"
            else:
                verdict = ("PASS" if sx < t[best] else "FAIL") if zeros >= 0.7 else ""
            print(f"{name:6s} {zeros:5.2f} {t['torch'] * 1e3:7.3f} {best:>8s} {t[best] * 1e3:8.3f} "
                  f"{t['spgemm'] * 1e3:7.3f} {sx * 1e3:10.3f} {t['torch'] / sx:8.2f} {t[best] / sx:9.2f}  "
                  f"{layers[best].weight_nbytes:12,d} {layers['spconv-act'].weight_nbytes:12,d}  {verdict}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
