"""Quantized SpMV (issue 13): codebook-index CSR against float CSR on AlexNet's FC layers at batch 1.

``python -m benchmarks.qspmv [--threads 2] [--repeats 30] [--sparsity 0.91] [--bits 5]`` prints a table.

Each layer (fc6 9216 -> 4096, fc7 4096 -> 4096, fc8 4096 -> 1000) gets a random Gaussian weight,
magnitude-pruned to the sparsity (Deep Compression's 91% for fc6/fc7) and quantized to ``bits``-bit
shared weights by :func:`sparsecnn.compress.quantize_model`. Then, on the same quantized weight: torch dense
(``F.linear``, the baseline), float CSR :func:`sparsecnn.kernels.spmv.sparse_linear` (float32 values +
uint16 columns: 6 bytes per nonzero) and :func:`sparsecnn.kernels.qspmv.quant_linear` (at batch 1 its
sliced-ELL form, 16-bit entries with a column and a code each, about 4.2 bytes per nonzero with the
padding; also the row-wise kernel over the stored uint8 codes + uint16 columns, 3 bytes per nonzero),
all timed as the compiled executor calls them (their ``bind_*``
callables: the arguments bound once, so a cold call times the kernel more than Python's argument
handling). Outputs are checked against dense first; times are medians of
interleaved samples after warm-up (CSR and qspmv interleaved; torch dense
timed in its own block). Target: qspmv >= 1.2x float CSR on fc6 and fc7.

Two regimes. *Warm*: each kernel is timed right after itself, so a layer whose CSR fits the last-level
cache (fc7: 9 MB against this machine kind's 32 MB L3) is read from there, and the kernel is bound
by its instructions, not by bytes. *Cold* (``bench.harness.time_cold``): before every timed call a 96 MB
buffer is read (untimed),
which evicts the weights, as happens to a layer in a forward pass whose other layers stream more than
the L3 holds (AlexNet's three FC layers are 35 MB of float CSR at Deep Compression's sparsity, 18 MB
as codes). Bytes moved, the point of the codebook form, count in the cold regime.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsecnn.bench.harness import check_close, set_threads, time_cold
from sparsecnn.compress import QuantizeConfig, quantize_model
from sparsecnn.kernels.qspmv import bind_quant_linear, prepare_quant_linear, quant_linear
from sparsecnn.kernels.spmv import bind_sparse_linear, prepare_linear, sparse_linear
from sparsecnn.models.profiles import apply_profile

LAYERS = {"fc6": (4096, 9216), "fc7": (4096, 4096), "fc8": (1000, 4096)}


def _interleaved(fns: list, repeats: int, inner: int) -> list[float]:
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            fn()  # one untimed call: each kernel timed after itself, its weights as warm as they get
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[i].append((time.perf_counter() - t0) / inner)
    return [float(np.median(s)) for s in samples]


def quantized_layer(name: str, sparsity: float, bits: int, seed: int) -> nn.Linear:
    """Layer ``name`` of :data:`LAYERS` with a bell-shaped random weight (as trained layers and the
    zoo's init are), magnitude-pruned to ``sparsity`` and quantized to ``bits``-bit shared weights."""
    m, k = LAYERS[name]
    torch.manual_seed(seed)
    lin = nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.normal_(0.0, 1.0 / np.sqrt(3.0 * k))
    holder = nn.Sequential()
    holder.add_module(name, lin)
    apply_profile(holder, {name: sparsity})
    quantize_model(holder, QuantizeConfig(fc_bits=bits))
    return lin


def run_layer(name: str, sparsity: float, bits: int, repeats: int, seed: int) -> dict:
    m, k = LAYERS[name]
    lin = quantized_layer(name, sparsity, bits, seed)
    w = lin.weight.detach().numpy().copy()
    bias = lin.bias.detach().numpy().copy()
    x = torch.randn(1, k)
    xn = x.numpy()
    ref = F.linear(x, lin.weight, lin.bias).detach().numpy()
    csr, q = prepare_linear(w), prepare_quant_linear(w)
    y_csr = np.empty((1, m), np.float32)
    y_q = np.empty((1, m), np.float32)
    sparse_linear(csr, xn, bias, y_csr)
    quant_linear(q, xn, bias, y_q)
    check_close(y_csr, ref, what=f"{name} float CSR")
    check_close(y_q, ref, what=f"{name} qspmv")
    weight_t = lin.weight.detach()
    bias_t = lin.bias.detach()

    def dense() -> None:
        with torch.no_grad():
            F.linear(x, weight_t, bias_t)

    # torch dense is timed on its own: its OpenMP threads spin for a while after each call and would
    # steal the two cores from the numba kernels timed right after it.
    (t_dense,) = _interleaved([dense], repeats, inner=10)
    time.sleep(0.5)
    run_csr = bind_sparse_linear(csr, 1, bias, y_csr)
    run_q = bind_quant_linear(q, 1, bias, y_q)
    y_rows = np.empty((1, m), np.float32)
    run_rows = bind_quant_linear(q, 1, bias, y_rows, ell=False)  # the row-wise codes kernel
    run_rows(xn)
    check_close(y_rows, ref, what=f"{name} qspmv, row-wise")
    t_csr, t_q, t_rows = _interleaved([lambda: run_csr(xn), lambda: run_q(xn), lambda: run_rows(xn)], repeats,
                                      inner=10)
    c_csr, c_q = time_cold([lambda: run_csr(xn), lambda: run_q(xn)], repeats=repeats)
    ell = q.ell()
    return {"layer": name, "shape": [m, k], "sparsity": sparsity, "bits": bits, "nnz": q.nnz,
            "codebook": int(q.codebook.size), "csr_bytes": csr.nbytes, "qspmv_bytes": q.stored_nbytes,
            "ell_bytes": None if ell is None else ell.nbytes, "rows_ms": t_rows * 1e3,
            "dense_ms": t_dense * 1e3, "csr_ms": t_csr * 1e3, "qspmv_ms": t_q * 1e3,
            "qspmv_vs_csr": t_csr / t_q, "qspmv_vs_dense": t_dense / t_q, "csr_vs_dense": t_dense / t_csr,
            "cold_csr_ms": c_csr * 1e3, "cold_qspmv_ms": c_q * 1e3, "cold_qspmv_vs_csr": c_csr / c_q}


def run_batches(name: str, sparsity: float, bits: int, repeats: int, seed: int,
                batches: tuple[int, ...] = (2, 8, 32)) -> list[dict]:
    """Batches above 1 on the same quantized layer: qspmv as it runs there (the sliced-ELL form in
    passes of four images up to batch 8, above it the float spmm on the dequantized values), the codes
    kernel of before (``ell=False, spmm=False``) and float CSR spmm, checked against each other, then
    timed with the caches flushed before each call."""
    m, k = LAYERS[name]
    lin = quantized_layer(name, sparsity, bits, seed)
    w = lin.weight.detach().numpy().copy()
    bias = lin.bias.detach().numpy().copy()
    csr, q = prepare_linear(w), prepare_quant_linear(w)
    rows = []
    for b in batches:
        x = torch.relu(torch.randn(b, k)).numpy()
        ref = x @ w.T + bias
        outs = [np.empty((b, m), np.float32) for _ in range(3)]
        runs = [bind_quant_linear(q, b, bias, outs[0]),
                bind_quant_linear(q, b, bias, outs[1], ell=False, spmm=False),
                bind_sparse_linear(csr, b, bias, outs[2])]
        for run, out, what in zip(runs, outs, ("qspmv", "qspmv codes kernel", "float CSR spmm"), strict=True):
            run(x)
            check_close(out, ref, what=f"{name} batch {b} {what}")
        # caches flushed before each call: three 10-20 MB working sets interleaved warm evict each other
        # in an order-dependent way (fc6 warm measured 0.73x one way and 1.45x for fc7 the other)
        t_q, t_codes, t_csr = time_cold([lambda r=r, x=x: r(x) for r in runs], repeats=repeats)
        rows.append({"layer": name, "batch": b, "qspmv_ms": t_q * 1e3, "codes_ms": t_codes * 1e3,
                     "csr_ms": t_csr * 1e3, "qspmv_vs_csr": t_csr / t_q})
    return rows


def whole_model(repeats: int) -> dict:
    """AlexNet at the deep-compression profile, quantized (8-bit conv, 5-bit FC codebooks), compiled
    twice: the FC layers through float CSR spmv and through qspmv (conv layers as planned, the same
    in both). Checked against torch dense; the two timed interleaved, medians."""
    import sparsecnn
    from sparsecnn import models

    model = models.build("alexnet").eval()
    apply_profile(model, "deep-compression")
    quantize_model(model, QuantizeConfig())
    x = torch.randn(1, *models.input_shape(model), generator=torch.Generator().manual_seed(0))
    convs = {"conv1": "torch", **{f"conv{i}": "direct" for i in range(2, 6)}}
    engines = {fc: sparsecnn.compile(model, x, {**convs, "fc6": fc, "fc7": fc, "fc8": fc}, tune=False)
               for fc in ("spmv", "qspmv")}
    with torch.inference_mode():
        ref = model(x)
        for fc, cm in engines.items():
            check_close(cm(x), ref, what=f"alexnet-dc compiled, fc {fc}")
        t_csr, t_q = _interleaved([lambda: engines["spmv"](x), lambda: engines["qspmv"](x)], repeats, inner=3)
    return {"model": "alexnet", "profile": "deep-compression", "csr_ms": t_csr * 1e3, "qspmv_ms": t_q * 1e3,
            "qspmv_vs_csr": t_csr / t_q}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--sparsity", type=float, default=0.91)
    ap.add_argument("--bits", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows as JSON lines here")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    print(f"qspmv vs float CSR spmv, batch 1, {threads} threads (torch and numba), "
          f"sparsity {args.sparsity:.0%}, {args.bits}-bit codes; medians of {args.repeats} "
          f"interleaved samples")
    print(f"{'layer':6s} {'M x K':>11s} {'nnz':>9s} {'CSR MB':>7s} {'Q MB':>6s} {'ELL MB':>6s} "
          f"{'dense ms':>9s} {'CSR ms':>8s} {'rows ms':>8s} {'qspmv ms':>9s} {'Q/CSR':>6s} {'Q/dense':>8s} | "
          f"{'cold CSR':>8s} {'cold Q':>7s} {'Q/CSR':>6s}")
    rows = []
    for name in LAYERS:
        r = run_layer(name, args.sparsity if name != "fc8" else 0.75, args.bits, args.repeats, args.seed)
        rows.append(r)
        print(f"{name:6s} {r['shape'][0]:>5d}x{r['shape'][1]:<5d} {r['nnz']:>9,d} "
              f"{r['csr_bytes'] / 1e6:7.2f} {r['qspmv_bytes'] / 1e6:6.2f} "
              f"{(r['ell_bytes'] or 0) / 1e6:6.2f} {r['dense_ms']:9.3f} "
              f"{r['csr_ms']:8.3f} {r['rows_ms']:8.3f} {r['qspmv_ms']:9.3f} "
              f"{r['qspmv_vs_csr']:5.2f}x {r['qspmv_vs_dense']:7.2f}x | {r['cold_csr_ms']:8.3f} "
              f"{r['cold_qspmv_ms']:7.3f} {r['cold_qspmv_vs_csr']:5.2f}x", flush=True)
    print("fc8 at 75% (Deep Compression's fc8 sparsity); target: Q/CSR >= 1.2x on fc6 and fc7. Left: warm "
          "(weights as cached as they get); right of |: cold (caches flushed before each call). Q MB: the "
          "codebook-index CSR (stored); ELL MB: the sliced-ELL form batch 1 runs (built from it, held "
          "beside it); rows ms: the row-wise codes kernel (bind_quant_linear(ell=False))")
    print(f"\n{'layer':6s} {'batch':>5s} {'CSR spmm ms':>11s} {'qspmv ms':>9s} {'codes kernel ms':>15s} "
          f"{'Q/CSR':>6s}")
    for name in ("fc6", "fc7"):
        for r in run_batches(name, args.sparsity, args.bits, max(5, args.repeats // 3), args.seed):
            rows.append(r)
            print(f"{name:6s} {r['batch']:5d} {r['csr_ms']:11.3f} {r['qspmv_ms']:9.3f} {r['codes_ms']:15.3f} "
                  f"{r['qspmv_vs_csr']:5.2f}x", flush=True)
    print("batches above 1, caches flushed before each call: qspmv runs the sliced-ELL form in passes of 4 "
          "images up to batch 8, the float spmm on codebook[codes] above (QuantLinearPrep.float_values); "
          "codes kernel: the scalar loop over the codes that ran before")
    w = whole_model(max(5, args.repeats // 3))
    rows.append(w)
    print(f"whole AlexNet (deep-compression, quantized), compiled, batch 1: FC as float CSR "
          f"{w['csr_ms']:.2f} ms, as qspmv {w['qspmv_ms']:.2f} ms ({w['qspmv_vs_csr']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps({**r, "threads": threads}) + "\n")


if __name__ == "__main__":
    main()
