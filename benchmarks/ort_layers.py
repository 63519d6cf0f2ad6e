"""Conv layer by conv layer inside a forward pass: the compiled executor against ONNX Runtime's profiler.

``python -m benchmarks.ort_layers [--case resnet50-dense] [--layout auto] [--turns 12]`` compiles one
``benchmarks.end_to_end`` case, exports the dense model to ONNX, and runs the two engines in turns
(batch 1, ``--threads`` for numba and ONNX Runtime, ONNX Runtime's thread spinning off and an idle gap
before each pass). Each step of the compiled program is timed inside the pass (``perf_counter``
between steps); ONNX Runtime's per-node times come from its own profiler. The conv steps and ONNX
Runtime's Conv nodes (BatchNorm, ReLU and residual adds fused into both) are paired in execution
order and printed with their ratio, then the totals: where a whole-model gap to ONNX Runtime comes
from. The first passes of each engine (warm-up, and the profiler's first runs) are left out; the
medians over the turns are shown. Every output is checked against the dense torch model first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import sparsecnn
from benchmarks.end_to_end import CASES
from sparsecnn import models
from sparsecnn.bench.harness import check_close, set_threads


def _ort_session(model: torch.nn.Module, x: torch.Tensor, threads: int, prefix: str | None = None):
    """An ONNX Runtime session on ``model``'s ONNX export (``threads`` intra-op, spinning off), with
    its profiler writing to ``prefix`` when given."""
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = prefix
    return ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])


def _ort_node_ms(profile: str, skip: int) -> list[tuple[str, str, float]]:
    """(node, op, median ms) of every node in execution order, the first ``skip`` runs left out."""
    times: dict[str, list[float]] = defaultdict(list)
    order: list[tuple[str, str]] = []
    for e in json.loads(Path(profile).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            if name not in times:
                order.append((name, e["args"].get("op_name", "")))
            times[name].append(e["dur"] / 1e3)
    return [(n, op, float(np.median(times[n][skip:] or times[n]))) for n, op in order]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ort_layers", description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="resnet50-dense", help=f"one of: {', '.join(CASES)}")
    ap.add_argument("--layout", default="auto", choices=["auto", "blocked", "plain"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--plans", type=Path, default=Path("bench-results/plans.json"))
    args = ap.parse_args(argv)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime is not installed: nothing to compare with")
        return 2
    if args.case not in CASES:
        ap.error(f"unknown case {args.case!r}; choose from {', '.join(CASES)}")
    set_threads(args.threads)
    name, profile, kwargs = CASES[args.case]
    model = models.build(name, **kwargs).eval()
    models.apply_profile(model, profile)
    x = torch.randn(1, *models.input_shape(model), generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    args.plans.parent.mkdir(parents=True, exist_ok=True)
    compiled = sparsecnn.compile(model, x, "auto", plan_path=args.plans, layout=args.layout)
    prog = compiled.program(tuple(x.shape))
    env, steps = prog.bind()
    kinds = prog.kinds
    with tempfile.TemporaryDirectory() as tmp:
        sess = _ort_session(model, x, args.threads, str(Path(tmp) / "ort"))
        with torch.inference_mode():
            ref = model(x)
            check_close(compiled(x), ref, rtol=1e-4, what=f"{args.case} compiled")
            y = torch.from_numpy(sess.run(None, {"x": xn})[0])
            check_close(y, ref, rtol=1e-4, what=f"{args.case} ONNX Runtime")
        ours, tot_ours, tot_ort = [], [], []
        for _ in range(args.turns + 2):
            env[prog.input_slot] = xn
            time.sleep(0.05)
            marks = [time.perf_counter()]
            for step in steps:
                step(env)
                marks.append(time.perf_counter())
            ours.append(np.diff(marks))
            tot_ours.append(marks[-1] - marks[0])
            time.sleep(0.05)
            t0 = time.perf_counter()
            sess.run(None, {"x": xn})
            tot_ort.append(time.perf_counter() - t0)
        nodes = _ort_node_ms(sess.end_profiling(), skip=3)
    step_ms = np.median(np.array(ours[2:]), axis=0) * 1e3
    convs = [(k, t) for k, t in zip(kinds, step_ms, strict=True) if k.startswith("conv")]
    ort_convs = [(n, t) for n, op, t in nodes if op == "Conv"]
    print(f"{args.case}, batch 1, {args.threads} threads, layout {compiled.layout}; median ms of "
          f"{args.turns} turns")
    print(f"{'ours':>8s} {'ORT':>8s} {'ORT/ours':>8s}  {'step':26s} ONNX Runtime node")
    if len(convs) == len(ort_convs):
        for (kind, t), (node, ot) in zip(convs, ort_convs, strict=True):
            print(f"{t:8.3f} {ot:8.3f} {ot / t:8.2f}  {kind:26s} {node[-48:]}")
    else:
        print(f"({len(convs)} conv steps against {len(ort_convs)} Conv nodes: not paired)")
    conv_ours, conv_ort = sum(t for _, t in convs), sum(t for _, t in ort_convs)
    other_ort = sum(t for _, op, t in nodes if op != "Conv")
    print(f"convs: ours {conv_ours:.2f}, ONNX Runtime {conv_ort:.2f} ms; other steps: ours "
          f"{float(step_ms.sum()) - conv_ours:.2f}, ONNX Runtime {other_ort:.2f} ms")
    print(f"whole pass: ours {np.median(tot_ours[2:]) * 1e3:.2f}, ONNX Runtime "
          f"{np.median(tot_ort[2:]) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
