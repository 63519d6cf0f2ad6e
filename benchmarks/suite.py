"""Layer sweep: every sparse strategy against torch's dense op, same input, same run.

Rules (issue 7): a fixed thread count for torch and numba (default 2), the same input for every
candidate, JIT warm-up excluded, every output verified against the dense reference before it is timed
(a mismatch is recorded as an error and not timed), median of repeats. Candidates are timed
*interleaved* (round r times every candidate once) so that load from other processes on a shared
machine hits all of them alike and the ratios stay meaningful.

Candidates
----------
``torch-dense``     torch ``F.conv2d`` (oneDNN) / ``F.linear`` (MKL): the baseline every ratio divides.
``kernel``          this package's fast kernel called directly on numpy arrays: ``direct_conv2d``
                    (conv) or ``sparse_linear`` (linear; spmv at batch 1, spmm above).
``<strategy>``      ``SparseConv2d/SparseLinear.from_dense(layer, strategy)`` for each of
                    ``sparsecnn.strategies(kind)`` except ``torch`` (the layer wrapper, torch in/out).
``torch-csr``       peer: the lowered weight as torch CSR (MKL) x the im2col input.
``scipy-csr``       peer: scipy.sparse CSR x the im2col input.

Output
------
``<out>/kernels.jsonl``: one ``env`` line per run, then one ``measurement`` line per (layer, batch,
sparsity) with every candidate's median/min seconds, samples, its ratio to torch dense (> 1 is faster)
and its fraction of the limit ``ratio * (1 - s)`` (1.0 = the FLOP-proportional ideal); written as each
is measured, so an interrupted run keeps its results and ``--resume`` continues it.
``<out>/summary.json``: break-even sparsity per layer and batch, the geomeans and each target's
pass/fail, over every measurement in the JSONL file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch

from benchmarks.layers import LAYERS, QUICK_LAYERS, LayerSpec, select
from sparsecnn.bench.harness import capture_environment, check_close, set_threads
from sparsecnn.bench.peers import conv_peers, linear_peers
from sparsecnn.kernels.conv import direct_conv2d, prepare_direct
from sparsecnn.kernels.spmv import prepare_linear, sparse_linear

SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
QUICK_SPARSITIES = (0.5, 0.6, 0.7, 0.9, 0.95)
PEERS = ("torch-csr", "scipy-csr")
# Candidates that are dense (never "the best sparse strategy") besides the baseline.
DENSE_NAMES = ("torch-dense", "dense", "onnxruntime")

# The targets.
TARGETS = {
    "alexnet_breakeven_geomean_max": 0.60,
    "resnet_vgg_3x3_breakeven_geomean_max": 0.70,
    "alexnet_ratio_at_0.9_min": 5.0,
    "alexnet_ratio_at_0.95_min": 8.0,
    "fc_ratio_at_0.9_min": 4.0,
}
ALEXNET_HEADLINE = ("alexnet.conv2", "alexnet.conv3", "alexnet.conv4", "alexnet.conv5")


def _engine_strategies(kind: str) -> tuple[str, ...]:
    try:
        from sparsecnn.layers import strategies
    except ImportError:
        return ()
    return tuple(s for s in strategies(kind) if s != "torch")


def _sparse_layer(spec: LayerSpec, batch: int, sparsity: float,
                  seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The layer with exactly ``round(s * n)`` zero weights at random positions, and a random input."""
    torch.manual_seed(seed)
    layer = spec.build().eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        w = layer.weight.detach().numpy().reshape(-1)
        w[rng.permutation(w.size)[: round(sparsity * w.size)]] = 0.0
        layer.bias.uniform_(-0.1, 0.1)
    x = torch.from_numpy(rng.standard_normal(spec.input_shape(batch)).astype(np.float32))
    return layer, x


def _candidates(spec: LayerSpec, layer: torch.nn.Module, x: torch.Tensor, strategies: tuple[str, ...],
                peers: tuple[str, ...], threads: int) -> dict[str, Callable[[], Any]]:
    """name -> zero-argument callable returning the layer output (any array-like)."""
    w = layer.weight.detach().numpy()
    b = layer.bias.detach().numpy()
    xn = np.ascontiguousarray(x.numpy())
    if spec.is_conv:
        all_peers = conv_peers(layer, x, threads=threads, onnx="onnxruntime" in peers)
    else:
        all_peers = linear_peers(layer, x, threads=threads, onnx="onnxruntime" in peers)
    cands: dict[str, Callable[[], Any]] = {"torch-dense": all_peers["torch-dense"]}
    if spec.is_conv:
        prep = prepare_direct(w, spec.groups, (spec.stride,) * 2, (spec.padding,) * 2, (1, 1))
        out = np.empty(prep.output_shape(xn.shape), dtype=np.float32)

        def kernel() -> np.ndarray:
            direct_conv2d(prep, xn, b, out)
            return out
    else:
        lprep = prepare_linear(w)
        lout = np.empty((xn.shape[0], spec.cout), dtype=np.float32)

        def kernel() -> np.ndarray:
            sparse_linear(lprep, xn, b, lout)
            return lout

    cands["kernel"] = kernel
    if strategies:
        from sparsecnn.layers import SparseConv2d, SparseLinear

        cls = SparseConv2d if spec.is_conv else SparseLinear
        for s in strategies:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mod = cls.from_dense(layer, s)
            except Exception as exc:  # a strategy that cannot convert is recorded, not fatal
                cands[s] = _raiser(f"conversion failed: {type(exc).__name__}: {exc}")
                continue
            cands[s] = (lambda m: lambda: m(x))(mod)
    for p in peers:
        if p in all_peers:
            cands[p] = all_peers[p]
    return cands


def _raiser(msg: str) -> Callable[[], Any]:
    def fail() -> Any:
        raise RuntimeError(msg)

    return fail


def _time_interleaved(cands: dict[str, Callable[[], Any]], repeats: int, min_sample_s: float,
                      budget_s: float) -> dict[str, dict[str, Any]]:
    """Median/min seconds per call for each candidate, sampling all of them round-robin."""
    inner: dict[str, int] = {}
    for name, fn in cands.items():
        t0 = time.perf_counter()
        fn()
        one = time.perf_counter() - t0
        inner[name] = 1 if one >= min_sample_s else min(1000, math.ceil(min_sample_s / max(one, 1e-7)))
    samples: dict[str, list[float]] = {n: [] for n in cands}
    spent: dict[str, float] = dict.fromkeys(cands, 0.0)
    names = list(cands)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if len(samples[name]) >= 3 and spent[name] > budget_s:
                continue  # a slow peer: enough samples for a median within its budget
            fn, n = cands[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            dt = time.perf_counter() - t0
            spent[name] += dt
            samples[name].append(dt / n)
    return {n: {"median_s": float(np.median(s)), "min_s": float(min(s)), "samples": len(s),
                "inner": inner[n]} for n, s in samples.items()}


def measure(spec: LayerSpec, batch: int, sparsity: float, *, strategies: tuple[str, ...],
            peers: tuple[str, ...], threads: int, repeats: int, seed: int, budget_s: float) -> dict[str, Any]:
    layer, x = _sparse_layer(spec, batch, sparsity, seed)
    with torch.no_grad():
        ref = layer(x).numpy()
        cands = _candidates(spec, layer, x, strategies, peers, threads)
        results: dict[str, dict[str, Any]] = {}
        good: dict[str, Callable[[], Any]] = {}
        for name, fn in cands.items():
            try:
                fn()  # warm-up: JIT compile, workspaces, first touch
                err = check_close(fn(), ref, what=name)
            except Exception as exc:
                results[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
                continue
            results[name] = {"max_rel_error": err}
            good[name] = fn
        timed = _time_interleaved(good, repeats, min_sample_s=3e-3, budget_s=budget_s)
    dense = timed.get("torch-dense")
    for name, t in timed.items():
        results[name].update(t)
        if dense:
            ratio = dense["median_s"] / t["median_s"]
            results[name]["ratio"] = ratio
            results[name]["limit_fraction"] = ratio * (1.0 - sparsity)
    sparse = {n: r for n, r in results.items() if "ratio" in r and n not in DENSE_NAMES and n not in PEERS}
    best = max(sparse, key=lambda n: sparse[n]["ratio"]) if sparse else None
    return {
        "type": "measurement",
        "key": f"{spec.name}|b{batch}|s{sparsity:g}|t{threads}",
        "layer": spec.name,
        "family": spec.family,
        "batch": batch,
        "sparsity": sparsity,
        "threads": threads,
        "numba_threads": numba.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "dense_gflop": spec.dense_flops(batch) / 1e9,
        "nnz": int(np.count_nonzero(layer.weight.detach().numpy())),
        "results": results,
        "best_sparse": best,
        "best_ratio": sparse[best]["ratio"] if best else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# ---------------------------------------------------------------------------------------------------
# summary


def _breakeven(points: list[tuple[float, float]]) -> tuple[float | None, str]:
    """Lowest sparsity where the ratio reaches 1, interpolated linearly in log(ratio).

    Returns (value, note): note is '' for an interpolated value, '<=' when the lowest sparsity measured
    already wins, '>' when no measured sparsity wins (value = the highest measured).
    """
    pts = sorted(points)
    if not pts:
        return None, ""
    if pts[0][1] >= 1.0:
        return pts[0][0], "<="
    for (s0, r0), (s1, r1) in itertools.pairwise(pts):
        if r1 >= 1.0 > r0:
            a, b = math.log(r0), math.log(r1)
            return s0 + (s1 - s0) * (0.0 - a) / (b - a), ""
    return pts[-1][0], ">"


def _geomean(xs: list[float]) -> float | None:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    latest: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.get("type") == "measurement":
            latest[rec["key"]] = rec
    recs = list(latest.values())
    by_lb: dict[tuple[str, int], list[tuple[float, float]]] = {}
    ratio_at: dict[tuple[str, int, float], float] = {}
    for r in recs:
        if r["best_ratio"] is not None:
            by_lb.setdefault((r["layer"], r["batch"]), []).append((r["sparsity"], r["best_ratio"]))
            ratio_at[(r["layer"], r["batch"], round(r["sparsity"], 4))] = r["best_ratio"]
    breakeven = {}
    for (layer, batch), pts in sorted(by_lb.items()):
        v, note = _breakeven(pts)
        breakeven[f"{layer}|b{batch}"] = {"layer": layer, "batch": batch, "breakeven": v, "bound": note}
    fam = {s.name: s.family for s in LAYERS}

    def be_values(names: list[str]) -> list[float]:
        # A layer that never breaks even counts at 1.0 (it would need a fully sparse layer).
        out = []
        for n in names:
            e = breakeven.get(f"{n}|b1")
            if e is not None and e["breakeven"] is not None:
                out.append(1.0 if e["bound"] == ">" else e["breakeven"])
        return out

    targets: dict[str, dict[str, Any]] = {}
    alex = [n for n in ALEXNET_HEADLINE if f"{n}|b1" in breakeven]
    if alex:
        g = _geomean(be_values(alex))
        targets["conv break-even <= 60% (geomean AlexNet conv2..5, batch 1)"] = {
            "value": g, "pass": g <= TARGETS["alexnet_breakeven_geomean_max"], "layers": alex}
    rv = sorted({layer for (layer, b) in by_lb if b == 1 and fam.get(layer) in ("resnet3x3", "vgg3x3")})
    if rv:
        g = _geomean(be_values(rv))
        targets["3x3 break-even <= 70% (geomean ResNet/VGG 3x3, batch 1)"] = {
            "value": g, "pass": g <= TARGETS["resnet_vgg_3x3_breakeven_geomean_max"], "layers": rv}
    for s, key, name in ((0.9, "alexnet_ratio_at_0.9_min", ">= 5x at 90%"),
                         (0.95, "alexnet_ratio_at_0.95_min", ">= 8x at 95%")):
        vals = [ratio_at[(n, 1, s)] for n in ALEXNET_HEADLINE if (n, 1, s) in ratio_at]
        if vals:
            g = _geomean(vals)
            targets[f"{name} (geomean AlexNet conv2..5, batch 1)"] = {
                "value": g, "pass": g >= TARGETS[key] and len(vals) == 4, "n_layers": len(vals)}
    for fc in ("alexnet.fc6", "alexnet.fc7"):
        if (fc, 1, 0.9) in ratio_at:
            v = ratio_at[(fc, 1, 0.9)]
            targets[f"{fc} >= 4x at 90% (batch 1)"] = {
                "value": v, "pass": v >= TARGETS["fc_ratio_at_0.9_min"]}
    worst = [(r["best_ratio"], r["key"]) for r in recs
             if r["batch"] in (8, 32) and r["sparsity"] >= 0.8 - 1e-9 and r["best_ratio"] is not None]
    if worst:
        v, key = min(worst)
        targets["batch 8/32: sparse not slower than dense at >= 80% (worst case)"] = {
            "value": v, "pass": v >= 1.0, "where": key}
    return {"breakeven": breakeven, "targets": targets, "n_measurements": len(recs)}


# ---------------------------------------------------------------------------------------------------
# output


def _print_table(records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(160, Console().width))
    names: list[str] = []
    for r in records:
        for n in r["results"]:
            if n != "torch-dense" and n not in names:
                names.append(n)
    table = Table(title="sparse / torch dense: speedup (x, > 1 is faster), same input, interleaved medians",
                  show_lines=False)
    for col in ("layer", "B", "s", "dense ms", *names, "best", "% limit"):
        table.add_column(col, justify="left" if col in ("layer", "best") else "right")
    for r in sorted(records, key=lambda r: (r["batch"], [s.name for s in LAYERS].index(r["layer"])
                                            if r["layer"] in [s.name for s in LAYERS] else 0, r["sparsity"])):
        d = r["results"].get("torch-dense", {})
        row = [r["layer"], str(r["batch"]), f"{r['sparsity']:g}",
               f"{d['median_s'] * 1e3:.3f}" if "median_s" in d else "err"]
        for n in names:
            c = r["results"].get(n)
            cell = "" if c is None else ("err" if "error" in c else f"{c.get('ratio', float('nan')):.2f}")
            row.append(cell)
        best = r["best_sparse"]
        row.append(best or "-")
        lim = r["results"][best]["limit_fraction"] if best else None
        row.append(f"{lim * 100:.0f}" if lim is not None else "")
        table.add_row(*row)
    console.print(table)
    be = Table(title="break-even sparsity (best sparse strategy vs torch dense; interpolated)")
    for col in ("layer", "batch", "break-even"):
        be.add_column(col)
    for e in summary["breakeven"].values():
        v = e["breakeven"]
        be.add_row(e["layer"], str(e["batch"]), "-" if v is None else f"{e['bound']}{v:.2f}")
    console.print(be)
    tt = Table(title="issue 7 targets")
    for col in ("target", "value", "result"):
        tt.add_column(col)
    for name, t in summary["targets"].items():
        v = t["value"]
        tt.add_row(name, "-" if v is None else f"{v:.3g}", "[green]PASS" if t["pass"] else "[red]FAIL")
    console.print(tt)
    errors = [(r["key"], n, c["error"]) for r in records for n, c in r["results"].items() if "error" in c]
    for key, n, msg in errors[:20]:
        console.print(f"[yellow]error[/] {key} {n}: {msg}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"batch 1, sparsity {QUICK_SPARSITIES}, layers {', '.join(QUICK_LAYERS)}")
    p.add_argument("--layers", nargs="+", help="layer names, families or prefixes (default: all)")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--sparsity", default=None, help="comma-separated sparsities (default 0.5..0.98)")
    p.add_argument("--strategies", default=None,
                   help="comma-separated engine strategies to include (default: all; 'none' for none)")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated peers: torch-csr, scipy-csr, onnxruntime ('none' for none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--budget", type=float, default=2.0, help="seconds of samples per candidate, at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results", help="directory for kernels.jsonl and summary.json")
    p.add_argument("--resume", action="store_true", help="keep kernels.jsonl and skip what it holds")
    p.add_argument("--summary-only", action="store_true",
                   help="print the table of kernels.jsonl; measure nothing")
    args = p.parse_args(argv)

    specs = select(args.layers or (list(QUICK_LAYERS) if args.quick else None))
    batches = [int(b) for b in (args.batch or ("1" if args.quick else "1,8,32")).split(",")]
    sparsities = [float(s) for s in args.sparsity.split(",")] if args.sparsity else list(
        QUICK_SPARSITIES if args.quick else SPARSITIES)
    peers = () if args.peers == "none" else tuple(x for x in args.peers.split(",") if x)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "kernels.jsonl"

    threads = set_threads(args.threads)
    done: set[str] = set()
    if (args.resume or args.summary_only) and log.exists():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run
            if rec.get("type") == "measurement":
                done.add(rec["key"])
    elif log.exists():
        log.unlink()
    if not args.summary_only:
        with log.open("a") as f:
            env = capture_environment()
            env.pop("cpu_flags", None)
            f.write(json.dumps({"type": "env", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "argv": argv if argv is not None else os.sys.argv[1:], **env}) + "\n")
        from rich.progress import Progress

        jobs = [(s, b, sp) for b in batches for s in specs for sp in sparsities]
        with Progress(transient=True) as progress:
            task = progress.add_task("measuring", total=len(jobs))
            for spec, b, sp in jobs:
                key = f"{spec.name}|b{b}|s{sp:g}|t{threads}"
                progress.update(task, description=key)
                if key not in done:
                    kind = "conv" if spec.is_conv else "linear"
                    strat = _engine_strategies(kind) if args.strategies is None else tuple(
                        x for x in args.strategies.split(",") if x and x != "none"
                        and x in _engine_strategies(kind))
                    rec = measure(spec, b, sp, strategies=strat, peers=peers, threads=threads,
                                  repeats=args.repeats, seed=args.seed, budget_s=args.budget)
                    with log.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                        f.flush()
                        os.fsync(f.fileno())
                progress.advance(task)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    latest: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("type") == "measurement":
            latest[r["key"]] = r
    summary = summarize(list(latest.values()))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    _print_table(list(latest.values()), summary)
    print(f"results: {log}  summary: {out_dir / 'summary.json'}  threads: {threads}")
    return 0
