"""The kernel forms of 2026-12-04, each against the form it replaced, on the same weights and input.

``python -m benchmarks.forms [--threads 2] [--repeats 15] [--batch 1,32] [--json out.json]`` prints two
tables (times in ms, medians of interleaved samples after one warm-up call each; every output is
checked against torch's dense op first):

- **direct conv**: per-filter tiles (``flat``) against filter-group tiles (``grouped``,
  :func:`sparsecnn.kernels._simd.group_tile`) and torch's oneDNN convolution, on AlexNet's conv2-5 at
  Deep Compression's sparsity and ResNet 3x3 layers at 65%, each layer alone (warm weights). ``auto``
  says which form the library picks for that shape and batch.
- **FC spmv**: the plain CSR (``slab=0``) against the column slabs (:data:`sparsecnn.kernels.spmv.SLAB`)
  on AlexNet's fc6/fc7 and VGG-16's fc6 at 91%, batch 1, warm (each kernel right after itself) and
  cold (``bench.harness.time_cold``: caches flushed before each call).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from sparsecnn.bench.harness import check_close, set_threads, time_cold
from sparsecnn.kernels import conv
from sparsecnn.kernels.conv import bind_direct_conv2d, prepare_direct
from sparsecnn.kernels.spmv import prepare_linear, sparse_linear

# name, cin, cout, hw, kernel, padding, groups, sparsity
CONVS = [
    ("alexnet.conv2", 96, 256, 27, 5, 2, 2, 0.62),
    ("alexnet.conv3", 256, 384, 13, 3, 1, 1, 0.65),
    ("alexnet.conv4", 384, 384, 13, 3, 1, 2, 0.63),
    ("alexnet.conv5", 384, 256, 13, 3, 1, 2, 0.63),
    ("resnet.3x3.28", 128, 128, 28, 3, 1, 1, 0.65),
    ("resnet.3x3.14", 256, 256, 14, 3, 1, 1, 0.65),
]
# name, out, in
FCS = [("alexnet.fc6", 4096, 9216), ("alexnet.fc7", 4096, 4096), ("vgg16.fc6", 4096, 25088)]


def _interleaved(fns: list, repeats: int, inner: int) -> list[float]:
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            fn()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[i].append((time.perf_counter() - t0) / inner)
    return [float(np.median(s)) for s in samples]


def _direct(w: np.ndarray, groups: int, padding: int, x: np.ndarray, bias: np.ndarray, out: np.ndarray,
            form: str):
    """A bound direct conv in one form (``flat``, ``grouped`` or the library's ``auto`` choice)."""
    saved = conv._GROUPED_BELOW, conv._GROUPED_MIN_COLUMNS
    if form == "flat":
        conv._GROUPED_BELOW = 0.0
    elif form == "grouped":
        conv._GROUPED_BELOW, conv._GROUPED_MIN_COLUMNS = 1e9, 0
    try:
        prep = prepare_direct(w, groups, (1, 1), (padding, padding), (1, 1))
        run = bind_direct_conv2d(prep, x.shape, bias, out, False)  # builds the workspace in this form
        grouped = prep.workspace(x.shape).grouped is not None
    finally:
        conv._GROUPED_BELOW, conv._GROUPED_MIN_COLUMNS = saved
    return run, grouped


def run_conv(spec: tuple, batch: int, repeats: int, rng: np.random.Generator) -> dict:
    name, cin, cout, hw, k, pad, groups, sparsity = spec
    w = rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0.0
    x = np.maximum(rng.standard_normal((batch, cin, hw, hw)), 0).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    wt, xt, bt = torch.from_numpy(w), torch.from_numpy(x), torch.from_numpy(b)
    with torch.no_grad():
        ref = F.conv2d(xt, wt, bt, padding=pad, groups=groups).numpy()
    fns, picked = [lambda: F.conv2d(xt, wt, bt, padding=pad, groups=groups)], None
    for form in ("flat", "grouped", "auto"):
        out = np.zeros(ref.shape, np.float32)
        run, grouped = _direct(w, groups, pad, x, b, out, form)
        run(x)
        check_close(out, ref, what=f"{name} {form}")
        if form == "auto":
            picked = "grouped" if grouped else "flat"
        else:
            fns.append(lambda run=run: run(x))
    with torch.no_grad():
        t_torch, t_flat, t_grouped = _interleaved(fns, repeats, 3 if batch > 1 else 10)
    return {"layer": name, "batch": batch, "sparsity": sparsity, "torch_ms": t_torch * 1e3,
            "flat_ms": t_flat * 1e3, "grouped_ms": t_grouped * 1e3, "auto": picked}


def run_fc(spec: tuple, repeats: int, rng: np.random.Generator, sparsity: float = 0.91) -> dict:
    name, m, k = spec
    w = (rng.standard_normal((m, k)) / np.sqrt(3.0 * k)).astype(np.float32)
    w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0
    x = np.maximum(rng.standard_normal((1, k)), 0).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    ref = x @ w.T + b
    outs = {}
    fns = []
    for label, slab in (("plain", 0), ("slabs", None)):
        prep = prepare_linear(w, slab=slab)
        out = outs[label] = np.zeros((1, m), np.float32)
        sparse_linear(prep, x, b, out)
        check_close(out, ref, what=f"{name} {label}")
        fns.append(lambda prep=prep, out=out: sparse_linear(prep, x, b, out))
    warm = _interleaved(fns, repeats, 10)
    cold = time_cold(fns, repeats=repeats)
    return {"layer": name, "sparsity": sparsity, "slabs": -(-k // 4096) if k > 4096 else 1,
            "plain_warm_ms": warm[0] * 1e3, "slabs_warm_ms": warm[1] * 1e3,
            "plain_cold_ms": cold[0] * 1e3, "slabs_cold_ms": cold[1] * 1e3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", default="1,32", help="comma-separated batch sizes for the conv table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    rows: dict[str, list] = {"conv": [], "fc": []}
    print(f"direct conv, {threads} threads (torch and numba); ms, medians of {args.repeats} "
          "interleaved samples (fewer at batch > 1)")
    print(f"{'layer':15s} {'B':>3s} {'s':>5s} {'torch':>8s} {'flat':>8s} {'grouped':>8s} "
          f"{'flat x':>7s} {'grp x':>7s} {'grp/flat':>8s}  auto")
    for batch in (int(v) for v in args.batch.split(",")):
        for spec in CONVS:
            r = run_conv(spec, batch, args.repeats if batch == 1 else max(3, args.repeats // 3), rng)
            rows["conv"].append(r)
            t, fl, gr = r["torch_ms"], r["flat_ms"], r["grouped_ms"]
            print(f"{r['layer']:15s} {batch:3d} {r['sparsity']:5.2f} {t:8.3f} {fl:8.3f} {gr:8.3f} "
                  f"{t / fl:6.2f}x {t / gr:6.2f}x {fl / gr:7.2f}x  {r['auto']}")
    print(f"\nFC spmv at batch 1, 91% sparse, {threads} threads: plain CSR against column slabs (ms)")
    print(f"{'layer':12s} {'slabs':>5s} {'plain':>8s} {'slabs':>8s} {'x':>6s} | {'cold plain':>10s} "
          f"{'cold slabs':>10s} {'x':>6s}")
    for spec in FCS:
        r = run_fc(spec, args.repeats, rng)
        rows["fc"].append(r)
        print(f"{r['layer']:12s} {r['slabs']:5d} {r['plain_warm_ms']:8.3f} {r['slabs_warm_ms']:8.3f} "
              f"{r['plain_warm_ms'] / r['slabs_warm_ms']:5.2f}x | {r['plain_cold_ms']:10.3f} "
              f"{r['slabs_cold_ms']:10.3f} {r['plain_cold_ms'] / r['slabs_cold_ms']:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": threads, **rows}, f, indent=1)
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
