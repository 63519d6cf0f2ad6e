"""End-to-end latency of whole models: torch dense, ONNX Runtime, ``sparsify`` and the compiled executor.

``python -m benchmarks.end_to_end [--threads 2] [--batch 1,32] [--cases all] [--repeats 15]`` prints one
table and writes JSON. For each case (a zoo model pruned to a profile) and batch size, four engines run
the same input:

- ``torch``: the dense torch model (oneDNN / MKL);
- ``ort``: ONNX Runtime's CPU provider on the dense model exported to ONNX (intra-op thread spinning
  off, so it does not slow whatever runs after it on a small machine);
- ``sparsify``: :func:`sparsecnn.sparsify` with ``"auto"`` (sparse layers inside the torch model);
- ``compiled``: :func:`sparsecnn.compile` with ``"auto"`` (the whole-model executor).

``--steps`` also prints (and writes as ``step_ms``) the median time of every step of the compiled
model, each step timed on its own: where the time of a whole model goes. Next to each conv and linear
step it prints the same layer's median time inside torch's own forward pass (forward hooks on the
``Conv2d`` / ``Linear`` modules, written as ``torch_layer_ms``) and the ratio: the per-layer speedup as
the two engines meet the layer in a forward pass (weights as cold or warm as the model leaves them).
torch's time is the convolution alone; the step's includes its fused bias, BatchNorm and ReLU.

With ``--shrink`` both sparse engines first shrink the layers under the structured ``ssl`` profile
(``shrink=True``); ONNX Runtime and torch always run the unshrunk dense model.

Every output is checked against the dense torch model (max error / max magnitude <= 1e-4) before
anything is timed. The engines are timed interleaved in turns (one untimed call, then ``--block`` timed
calls of one engine, a ``--gap`` of idle time, then the next engine), and the medians are compared. The
planner's measurements and the JIT warm-up happen before timing starts; decisions are cached in
``--plans``, so a rerun times the same plans. Thread counts: torch, numba and ONNX Runtime all use
``--threads``. The ``cores`` column is :func:`sparsecnn.bench.placement.probe_cores` run before and
after each case's timing (``near``, ``far``, or ``near->far`` when it changed in between; the figures
go to the JSON): on a machine whose two cores the host may place near or far apart, the same build
runs ResNet-50 at 90% in 13 or 21 ms, so compare rows taken in the same placement. The LeNet-5 case
is the 8x8-digits geometry at uniform 92% (the sparsity README's ``prune --target 0.92`` reaches);
latency depends on the zero pattern's density, not on trained values. The ``mbv2-*`` cases are the
zoo's MobileNet-v2 dense and at uniform 70% (its depthwise layers pruned too, as a uniform profile
does; ``benchmarks.mobilenet`` keeps them dense).

At the end it prints issue 11's targets for the rows it ran (:data:`TARGETS`, :func:`verdicts`), each
PASS or FAIL: the absolute latencies are the issue's, for a 2-core Zen 4 VM; a slow spell of such a VM
fails them (compare the ratios, which come from one run).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sparsecnn
from sparsecnn import models
from sparsecnn.bench.harness import check_close, set_threads
from sparsecnn.bench.peers import model_peers
from sparsecnn.bench.placement import probe_cores, span_label

CASES: dict[str, tuple[str, str, dict]] = {
    "alexnet-dc": ("alexnet", "deep-compression", {}),
    "alexnet-ssl": ("alexnet", "ssl", {}),
    "alexnet-90": ("alexnet", "uniform:0.9", {}),
    "resnet18-80": ("resnet18", "uniform:0.8", {}),
    "resnet18-90": ("resnet18", "uniform:0.9", {}),
    "resnet50-80": ("resnet50", "uniform:0.8", {}),
    "resnet50-90": ("resnet50", "uniform:0.9", {}),
    "vgg16-90": ("vgg16", "uniform:0.9", {}),
    # Where sparse cannot win: the target is still "no slower than torch or ONNX Runtime by > 3%".
    "resnet18-50": ("resnet18", "uniform:0.5", {}),
    "resnet50-50": ("resnet50", "uniform:0.5", {}),
    "resnet50-dense": ("resnet50", "uniform:0.0", {}),
    "resnet18-dense": ("resnet18", "uniform:0.0", {}),
    "alexnet-dense": ("alexnet", "uniform:0.0", {}),
    "vgg16-dense": ("vgg16", "uniform:0.0", {}),
    "lenet5": ("lenet5", "uniform:0.92", {"in_channels": 1, "input_size": 8}),
    "mbv2-dense": ("mobilenet_v2", "uniform:0.0", {}),
    "mbv2-70": ("mobilenet_v2", "uniform:0.7", {}),
}
# Batch-32 runs of the big dense models take seconds per call: by default only these run at batch 32.
BATCH32 = ("alexnet-dc", "alexnet-ssl", "alexnet-90", "resnet18-90", "lenet5")


def _interleaved(fns: list, repeats: int, block: int, gap: float) -> list[float]:
    """Median seconds per call of each function, sampled round-robin so drift hits all alike.

    With ``block > 1`` each turn is one untimed call, then ``block`` timed calls back to back: each
    engine is timed as it runs in service, after itself (the dense AlexNet streams 240 MB of weights
    per call and evicts the sparse weights from L3; ``--block 1`` shows that case).
    """
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if gap:
                time.sleep(gap)
            if block > 1:
                fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                samples[i].append(time.perf_counter() - t0)
    return [float(np.median(s)) for s in samples]


def ab_setup(argv: list[str] | None, prog: str, description: str, cases: str, turns: int,
             columns: tuple[str, str]) -> tuple[argparse.Namespace, list[str]]:
    """The command line of an A/B over :data:`CASES` (``--cases --batch --turns --threads --plans
    --layout``; ``args.layout`` is None unless given):
    parsed and checked, the threads set and the table's header printed. Returns the arguments and the
    cases. A given ``--layout`` overrides the one the benchmark passes to :func:`ab_run`."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--cases", default=cases, help=f"from: {', '.join(CASES)}")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--turns", type=int, default=turns)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plans", type=Path, default=Path("bench-results/plans.json"))
    ap.add_argument("--layout", choices=["auto", "blocked", "plain"], default=None)
    args = ap.parse_args(argv)
    chosen = args.cases.split(",")
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    threads = set_threads(args.threads)
    args.plans.parent.mkdir(parents=True, exist_ok=True)
    print(f"{threads} threads (numba, torch); ms, medians of 5 x 5 interleaved calls per turn")
    print(f"{'case':12s} {'B':4s} {'cores':9s} {columns[0]:>9s} {columns[1]:>9s} {'gain':>7s}")
    return args, chosen


def compile_under(model, x: torch.Tensor, plan: dict, settings: list[tuple[Any, str, Any]], **kw: Any):
    """``sparsecnn.compile(model, x, plan, tune=False, **kw)`` with the module attributes in ``settings``
    (``(module, name, value)``) set while it compiles and builds the program for ``x`` (the layers'
    workspaces included), then restored: one side of an A/B."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in settings]
    for obj, name, value in settings:
        setattr(obj, name, value)
    try:
        compiled = sparsecnn.compile(model, x, plan, tune=False, **kw)
        compiled(x)
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    return compiled


def ab_run(args: argparse.Namespace, cases: list[str], before: list[tuple[Any, str, Any]], *,
           exact: bool = False, summary: Callable[[Any, torch.Tensor], str] | None = None,
           **kw: Any) -> None:
    """Each case compiled twice with the same plan (``"auto"``, cached in ``args.plans``):
    :func:`compile_under` the ``before`` settings, and as the library stands (``kw`` to both); both
    outputs checked against the torch model (``exact``: equal to each other, bit for bit), then
    ``args.turns`` turns timing both interleaved: a row per turn (with the cores' placement) and the
    median gain (before / now), followed by ``summary(now, x)`` when given."""
    if args.layout is not None:  # --layout overrides the benchmark's own
        kw["layout"] = args.layout
    for case in cases:
        name, profile, kwargs = CASES[case]
        model = models.build(name, **kwargs).eval()
        models.apply_profile(model, profile)
        x = torch.randn(args.batch, *models.input_shape(model), generator=torch.Generator().manual_seed(0))
        plan = dict(sparsecnn.compile(model, x, "auto", plan_path=args.plans).plan)
        old, now = compile_under(model, x, plan, before, **kw), compile_under(model, x, plan, [], **kw)
        gains = []
        with torch.inference_mode():
            if exact:
                torch.testing.assert_close(now(x), old(x), rtol=0, atol=0)
            else:
                ref = model(x)
                check_close(old(x), ref, what=f"{case} before")
                check_close(now(x), ref, what=f"{case} now")
            for _ in range(args.turns):
                cores = probe_cores()
                fns = [lambda b=old, v=x: b(v), lambda n=now, v=x: n(v)]
                t_before, t_now = _interleaved(fns, 5, 5, 0.0)
                gains.append(t_before / t_now)
                print(f"{case:12s} b{args.batch:<3d} {span_label(cores, probe_cores()):9s} "
                      f"{t_before * 1e3:9.3f} {t_now * 1e3:9.3f} {t_before / t_now:6.3f}x", flush=True)
        extra = f"; {summary(now, x)}" if summary is not None else ""
        print(f"  {case}: median gain {float(np.median(gains)):.3f}x over {len(gains)} turns{extra}")


def step_times(compiled, x: torch.Tensor, repeats: int) -> list[tuple[str, float]]:
    """Median ms of each step of ``compiled``'s program for ``x``, the steps run in order as a forward
    pass runs them (after one untimed pass): where a whole-model time goes. Each step is timed on
    its own, so the sum runs above the whole pass's time (on this project's VM by up to 1.5x: the
    threads idle between timed steps); compare steps with each other, not with the pass."""
    prog = compiled.program(tuple(x.shape))
    env, steps = prog.bind()
    env[prog.input_slot] = np.ascontiguousarray(x.numpy())
    for step in steps:
        step(env)
    samples = np.zeros((repeats, len(steps)))
    for r in range(repeats):
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            step(env)
            samples[r, i] = time.perf_counter() - t0
    return list(zip(prog.kinds, (float(v) * 1e3 for v in np.median(samples, axis=0)), strict=True))


def torch_layer_times(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> list[tuple[str, float]]:
    """Median ms of each ``Conv2d`` / ``Linear`` module inside ``model``'s own forward pass, in the order
    the forward pass runs them (forward hooks; after two untimed passes)."""
    order: list[str] = []
    samples: dict[str, list[float]] = {}
    start: dict[str, float] = {}

    def pre(name: str):
        def hook(_module, _args) -> None:
            start[name] = time.perf_counter()
        return hook

    def post(name: str):
        def hook(_module, _args, _out) -> None:
            t = time.perf_counter() - start[name]
            if name not in samples:
                order.append(name)
                samples[name] = []
            samples[name].append(t)
        return hook

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
    try:
        with torch.inference_mode():
            for _ in range(2):
                model(x)
            samples.clear()
            order.clear()
            for _ in range(repeats):
                model(x)
    finally:
        for h in handles:
            h.remove()
    return [(name, float(np.median(samples[name])) * 1e3) for name in order]


def run_case(case: str, batch: int, threads: int, repeats: int, block: int, gap: float, plans: Path,
             shrink: bool = False, steps: bool = False) -> dict:
    name, profile, kwargs = CASES[case]
    model = models.build(name, **kwargs).eval()
    models.apply_profile(model, profile)
    x = torch.randn(batch, *models.input_shape(model), generator=torch.Generator().manual_seed(0))
    # --shrink: remove structured (SSL) zeros physically first (sparsecnn.shrink) in both sparse engines
    structured = shrink and profile == "ssl"
    sparse = sparsecnn.sparsify(model, "auto", example_input=x, plan_path=plans, shrink=structured)
    compiled = sparsecnn.compile(model, x, "auto", plan_path=plans, shrink=structured)
    engines: dict = {}
    with torch.inference_mode():
        ref = model(x)
        engines["torch"] = lambda: model(x)
        peer = model_peers(model, x, threads=threads).get("onnxruntime")
        if peer is not None:
            engines["ort"] = peer
        engines["sparsify"] = lambda: sparse(x)
        engines["compiled"] = lambda: compiled(x)
        for label, fn in engines.items():
            check_close(fn(), ref, rtol=1e-4, what=f"{case} batch {batch} {label}")
        before = probe_cores()
        times = dict(zip(engines, _interleaved(list(engines.values()), repeats, block, gap), strict=True))
        after = probe_cores()
    row = {"case": case, "model": name, "profile": profile, "batch": batch, "threads": threads,
           "block": block, **{f"{k}_ms": v * 1e3 for k, v in times.items()},
           "compiled_vs_torch": times["torch"] / times["compiled"],
           "compiled_vs_ort": times["ort"] / times["compiled"] if "ort" in times else None,
           "sparsify_vs_torch": times["torch"] / times["sparsify"],
           "plan": dict(Counter(dict(compiled.plan).values())), "layout": compiled.layout,
           "steps": compiled.steps(tuple(x.shape)),
           "cores_before": asdict(before), "cores_after": asdict(after)}
    cores = span_label(before, after)
    if steps:
        with torch.inference_mode():
            row["step_ms"] = step_times(compiled, x, max(repeats, 15))
        row["torch_layer_ms"] = torch_layer_times(model, x, max(repeats, 15))
    ort = f"{times['ort'] * 1e3:9.3f}" if "ort" in times else "        -"
    vs_ort = f"{row['compiled_vs_ort']:6.2f}x" if row["compiled_vs_ort"] else "      -"
    print(f"{case:12s} b{batch:<3d} {times['torch'] * 1e3:9.3f} {ort} {times['sparsify'] * 1e3:9.3f} "
          f"{times['compiled'] * 1e3:9.3f} {row['compiled_vs_torch']:6.2f}x {vs_ort}  {cores:9s}  "
          f"{compiled.layout:7s}  {row['plan']}", flush=True)
    # The conv / linear steps run in the forward pass's order; pair them with torch's layers in order
    # (only when the counts agree: a model whose layers the executor merged or split is not paired).
    step_ms = row.get("step_ms", [])
    layer_steps = [i for i, (kind, _) in enumerate(step_ms) if kind.startswith(("conv", "linear"))]
    torch_layers = row.get("torch_layer_ms", [])
    same = len(layer_steps) == len(torch_layers)
    paired = dict(zip(layer_steps, torch_layers, strict=True)) if same else {}
    for i, (kind, ms) in enumerate(row.get("step_ms", [])):
        if i in paired:
            name, tms = paired[i]
            print(f"    {ms:8.3f} ms  {kind:24s} torch {tms:8.3f} ms  {tms / ms:5.2f}x  {name}")
        else:
            print(f"    {ms:8.3f} ms  {kind}")
    if steps:
        print(f"    {sum(ms for _, ms in row['step_ms']):8.3f} ms  sum of the steps (medians)")
    return row


# Issue 11's targets (2 threads, batch 1 unless named; the absolute times are for its machine kind, a
# 2-core Zen 4 VM): (case, batch, what, test of a result row). Every row also meets "no slower than
# torch dense or ONNX Runtime (dense) by more than 3%".
TARGETS: tuple[tuple[str, int, str, Callable[[dict], bool]], ...] = (
    ("alexnet-dc", 1, "compiled <= 6.8 ms", lambda r: r["compiled_ms"] <= 6.8),
    ("alexnet-90", 1, "compiled <= 5.0 ms", lambda r: r["compiled_ms"] <= 5.0),
    ("resnet18-90", 1, "compiled <= 5.9 ms", lambda r: r["compiled_ms"] <= 5.9),
    ("resnet50-90", 1, "compiled >= 3x torch dense", lambda r: r["compiled_vs_torch"] >= 3.0),
    ("lenet5", 1, "compiled faster than ONNX Runtime", lambda r: (r["compiled_vs_ort"] or 0.0) > 1.0),
    ("alexnet-dc", 32, "compiled >= 2x torch dense", lambda r: r["compiled_vs_torch"] >= 2.0),
)
_SLOWER_BY = 0.97  # "not slower than ... by more than 3%"


def verdicts(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """Issue 11's targets met by ``rows`` (:func:`run_case`'s results): ``(row, target, passed)`` for
    each target whose case and batch were run, then for every row whether the compiled model is within
    3% of torch dense and of ONNX Runtime (where it ran)."""
    out = []
    for case, batch, what, test in TARGETS:
        out.extend((f"{case} b{batch}", what, bool(test(r)))
                   for r in rows if r["case"] == case and r["batch"] == batch)
    for r in rows:
        floor = min(r["compiled_vs_torch"], r["compiled_vs_ort"] or np.inf)
        out.append((f"{r['case']} b{r['batch']}", "not below torch / ONNX Runtime by > 3%",
                    bool(floor >= _SLOWER_BY)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.end_to_end", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--cases", default="all", help=f"comma-separated, from: {', '.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--block", type=int, default=5,
                    help="timed calls per turn, after one untimed call (1: strictly alternating calls)")
    ap.add_argument("--gap", type=float, default=0.05, help="idle seconds before each engine's turn")
    ap.add_argument("--shrink", action="store_true", help="shrink the structured ssl case first")
    ap.add_argument("--steps", action="store_true",
                    help="also print the median time of every step of the compiled model (each timed "
                         "alone: compare steps with each other)")
    ap.add_argument("--plans", type=Path, default=Path("bench-results/plans.json"))
    ap.add_argument("--out", type=Path, default=Path("bench-results/end_to_end.json"))
    args = ap.parse_args(argv)
    cases = list(CASES) if args.cases == "all" else args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    set_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"threads {args.threads} (torch, numba, ONNX Runtime); medians of {args.repeats} turns "
          f"x {args.block}")
    print(f"{'case':12s} {'batch':4s} {'torch ms':>9s} {'ort ms':>9s} {'sparsify':>9s} {'compiled':>9s} "
          f"{'vs torch':>7s} {'vs ort':>7s}  {'cores':9s}  layout   plan")
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        for case in cases:
            if batch > 8 and args.cases == "all" and case not in BATCH32:
                continue
            repeats = args.repeats if batch < 8 else max(3, args.repeats // 3)
            rows.append(run_case(case, batch, args.threads, repeats, args.block if batch < 8 else 2, args.gap,
                                 args.plans, args.shrink, args.steps))
            args.out.write_text(json.dumps(rows, indent=2))  # as it goes: an interrupted run keeps its rows
    print("issue 11's targets (the absolute times for a 2-core Zen 4 VM; one run, noisy: see README)")
    for row, what, passed in verdicts(rows):
        print(f"  {row:18s} {what:42s} {'PASS' if passed else 'FAIL'}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
