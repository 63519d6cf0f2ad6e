"""Per-thread scratch on cache lines of its own (``kernels._numba.thread_rows``), A/B on the step that
showed it: AlexNet's LRN + max-pool (``kernels.lrn.bind_lrn_max_pool``).

``python -m benchmarks.thread_lines [--threads 2] [--batches 1,32] [--turns 15]`` runs the step's kernel
on norm1's and norm2's output shapes (96 x 55 x 55 and 256 x 27 x 27, ReLU'd random input) twice per
shape: with the per-thread scratch planes and rows the library allocates (every thread's rows starting
on a cache line of its own), and with the same scratch as plain ``(nparts, n)`` arrays, whose rows share
a cache line at each boundary (the rows of 55 and 27 floats: every line of them). Both outputs are
checked equal first (the kernel is the same; only where its scratch lies differs); then the two run in
interleaved turns (medians), and the table gives each and the ratio, with each layout on one thread
too (the scaling the shared lines cost). The other per-thread arrays the change moved (``spmv-act``'s
and ``spmm``'s sums, the conv wides) were measured with scratch scripts: docs/engine.md, "twenty-sixth".
"""

from __future__ import annotations

import argparse

import numba
import numpy as np

from benchmarks.end_to_end import _interleaved
from sparsecnn.bench.harness import set_threads
from sparsecnn.kernels._numba import num_threads, thread_rows
from sparsecnn.kernels.lrn import _lrn_pool_kernel

# (channels, side): AlexNet's norm1 -> pool1 and norm2 -> pool2 inputs
SHAPES = [(96, 55), (256, 27)]


def _runs(x: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """``{"own lines": run, "shared lines": run}`` of the LRN + pool kernel on ``x`` and their outputs."""
    b, c, h, w = x.shape
    hout = (h - 3) // 2 + 1
    nparts = max(1, min(num_threads(), b * c))
    bounds = np.array([i * (b * c) // nparts for i in range(nparts + 1)], dtype=np.int64)
    xf = x.reshape(b, c, h * w)
    outs, runs = [], {}
    for name, alloc in (("own lines", thread_rows),
                        ("shared lines", lambda n_, m_: np.zeros((n_, m_), np.float32))):
        out = np.empty(b * c * hout * hout, np.float32)
        args = (out, 5, np.float32(1e-4 / 5), np.float32(0.75), np.float32(1.0), True, bounds,
                alloc(nparts, h * w), alloc(nparts, h * w), alloc(nparts, w), h, w, hout, hout)
        runs[name] = lambda args=args: _lrn_pool_kernel(xf, *args)
        runs[name]()
        outs.append(out)
    return runs, outs[0], outs[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.thread_lines", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--turns", type=int, default=15)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"LRN + max-pool step, ms (medians of interleaved turns); {args.threads} threads, and 1")
    print(f"{'batch':>5} {'shape':>12} {'own lines':>10} {'shared':>9} {'ratio':>6}   "
          f"{'own, 1 thr':>10} {'shared, 1 thr':>13}")
    for batch in (int(v) for v in args.batches.split(",")):
        for c, side in SHAPES:
            x = np.maximum(rng.standard_normal((batch, c, side, side)), 0).astype(np.float32)
            runs, a, b = _runs(x)
            if not np.array_equal(a, b):
                raise SystemExit("thread_lines: the two scratch layouts gave different outputs")
            turns, block = (args.turns, 10) if batch == 1 else (max(3, args.turns // 3), 3)
            t2 = _interleaved(list(runs.values()), turns, block, 0.0)
            numba.set_num_threads(1)
            t1 = _interleaved(list(runs.values()), turns, block, 0.0)
            set_threads(args.threads)
            print(f"{batch:>5} {f'{c}x{side}x{side}':>12} {t2[0] * 1e3:10.3f} {t2[1] * 1e3:9.3f} "
                  f"{t2[1] / t2[0]:5.2f}x   {t1[0] * 1e3:10.3f} {t1[1] * 1e3:13.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
