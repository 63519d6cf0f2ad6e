"""Fully connected layers at batch 2-32: the ``direct`` linear form against ``spmm`` and torch dense.

``python -m benchmarks.batch_fc [--threads 2] [--repeats 7] [--batches 2,4,8,16,32]`` prints one table:
AlexNet's fc6, fc7 and fc8 at Deep Compression's weight sparsity (91%, 91%, 75%) and dense (SSL
leaves AlexNet's FC layers dense), at each batch, ReLU inputs (about half zeros). Each layer's three
forms are bound as the executor binds them (``bind_direct_linear``, ``bind_sparse_linear``; torch's
``F.linear``), their outputs checked against torch dense first, then timed in interleaved turns of
five calls (medians): the ratios are within one process and one spell of the machine.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.end_to_end import _interleaved
from sparsecnn.bench.harness import check_close, set_threads
from sparsecnn.kernels.direct_linear import bind_direct_linear, prepare_direct_linear
from sparsecnn.kernels.spmv import bind_sparse_linear, prepare_linear

CASES = (("fc6", 9216, 4096, 0.91), ("fc7", 4096, 4096, 0.91), ("fc8", 4096, 1000, 0.75),
         ("fc6 dense", 9216, 4096, 0.0), ("fc7 dense", 4096, 4096, 0.0), ("fc8 dense", 4096, 1000, 0.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.batch_fc", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", default="2,4,8,16,32")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    print(f"{args.threads} threads (torch and numba); medians of {args.repeats} turns x 5, ms")
    print(f"{'layer':10s} {'w sp':>5s} {'batch':>5s} {'torch':>8s} {'spmm':>8s} {'direct':>8s} "
          f"{'direct/torch':>12s} {'direct/spmm':>11s}")
    for name, k, m, ws in CASES:
        w = (rng.standard_normal((m, k)) / np.sqrt(k)).astype(np.float32)
        w[rng.random(w.shape) < ws] = 0.0
        bias = rng.standard_normal(m).astype(np.float32)
        csr, lanes = prepare_linear(w), prepare_direct_linear(w)
        wt, bt = torch.from_numpy(w), torch.from_numpy(bias)
        for batch in batches:
            x = np.maximum(rng.standard_normal((batch, k)), 0).astype(np.float32)
            xt = torch.from_numpy(x)
            ref = F.linear(xt, wt, bt).numpy()
            outs = {s: np.empty((batch, m), np.float32) for s in ("spmm", "direct")}
            run_spmm = bind_sparse_linear(csr, batch, bias, outs["spmm"])
            run_direct = bind_direct_linear(lanes, batch, bias, outs["direct"])
            for label, run in (("spmm", run_spmm), ("direct", run_direct)):
                run(x)
                check_close(outs[label], ref, rtol=1e-4, what=f"{name} batch {batch} {label}")
            fns = [functools.partial(F.linear, xt, wt, bt), functools.partial(run_spmm, x),
                   functools.partial(run_direct, x)]
            with torch.inference_mode():
                t = _interleaved(fns, args.repeats, 5, 0.0)
            print(f"{name:10s} {ws:5.2f} {batch:5d} {t[0] * 1e3:8.3f} {t[1] * 1e3:8.3f} {t[2] * 1e3:8.3f} "
                  f"{t[0] / t[2]:11.2f}x {t[1] / t[2]:10.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
