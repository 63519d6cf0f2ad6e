"""A pruned MobileNet-v2 end to end: depthwise layers (``kernels.depthwise``) and ReLU6 clamp steps.

``python -m benchmarks.mobilenet [--sparsity 0.7] [--batch 1] [--turns 5] [--threads 2]`` builds
MobileNet-v2 (the zoo's ``mobilenet_v2``: Sandler et al. 2018, 17 inverted-residual blocks, width
1.0, 224 x 224, ReLU6), prunes its first conv, 1x1 layers and classifier by magnitude to ``--sparsity``
(the depthwise layers stay dense, as pruning them saves little), and times, interleaved in turns:
torch dense, ONNX Runtime on the same model (when installed; thread spinning off), and the compiled
model with the same ``"auto"`` plan and layout twice: ``general`` with ``kernels.conv.DEPTHWISE`` off
(depthwise layers through the direct kernel's general path, each ReLU6 a ``clamp`` step of its own,
no blocked depthwise layers) and
``depthwise`` as the library stands (``kernels.depthwise``, the ReLU6 after it fused:
``conv:direct+clamp``; in the blocked layout, each inverted residual block one step where each thread
gets enough rows: ``kernels.expand_depthwise``). Outputs are checked against torch first. ``--layers``
times MobileNet-v2's depthwise layer shapes alone instead (the general path, the depthwise kernel and
torch's conv, batch ``--batch``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import sparsecnn
from benchmarks.end_to_end import _interleaved, compile_under
from sparsecnn import models
from sparsecnn.bench.harness import check_close, set_threads
from sparsecnn.bench.peers import model_peers
from sparsecnn.bench.placement import probe_cores
from sparsecnn.kernels import conv
from sparsecnn.models import zoo
from sparsecnn.models.profiles import prunable_layers

SETTINGS = zoo._MOBILENET_V2  # (expansion t, output channels c, repeats n, first stride s)


def pruned(sparsity: float, seed: int = 0) -> nn.Module:
    """The zoo's MobileNet-v2 (seeded weights) with BatchNorm statistics away from the identity, and the
    first conv, the 1x1 layers and the classifier pruned by magnitude (per layer, ``models.apply_profile``) to
    ``sparsity``."""
    model = models.build("mobilenet_v2", seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    models.apply_profile(model, {name: sparsity for name, m in prunable_layers(model).items()
                                 if not (isinstance(m, nn.Conv2d) and m.groups > 1)})
    return model


def _layers(batch: int, turns: int) -> None:
    from sparsecnn.kernels.conv import bind_direct_conv2d, prepare_direct

    rng = np.random.default_rng(0)
    print(f"{'layer':22s} {'general':>9s} {'depthwise':>9s} {'torch':>9s} {'gain':>7s}")
    shapes, hw, cin = [], 112, 32
    for t, c, n, s in SETTINGS:
        for i in range(n):
            stride = s if i == 0 else 1
            shapes.append((cin * t, hw, stride))
            hw //= stride
            cin = c
    for c, hw, s in sorted(set(shapes), key=lambda v: (-v[1], v[0])):
        w = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
        x = rng.standard_normal((batch, c, hw, hw)).astype(np.float32)
        bias = rng.standard_normal(c).astype(np.float32)
        prep = prepare_direct(w, c, (s, s), (1, 1), (1, 1))
        ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias), s, 1, 1, c)
        outs = [np.empty(tuple(ref.shape), np.float32) for _ in range(2)]
        runs = []
        for flag, out in zip((False, True), outs, strict=True):
            conv.DEPTHWISE = flag
            runs.append(bind_direct_conv2d(prep, x.shape, bias, out))
        conv.DEPTHWISE = True
        for run, out in zip(runs, outs, strict=True):
            run(x)
            check_close(torch.from_numpy(out), ref, what=f"depthwise {c}@{hw} s{s}")
        xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias)
        fns = [lambda r=run, v=x: r(v) for run in runs]
        fns.append(lambda a=(xt, wt, bt, s, 1, 1, c): F.conv2d(*a))
        t = _interleaved(fns, turns * 3, 5, 0.0)
        print(f"{c:4d} x {hw:3d}x{hw:<3d} s{s}       {t[0] * 1e3:9.3f} {t[1] * 1e3:9.3f} {t[2] * 1e3:9.3f} "
              f"{t[0] / t[1]:6.2f}x", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mobilenet", description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", action="store_true", help="the depthwise layer shapes alone")
    ap.add_argument("--plans", default="bench-results/plans.json")
    args = ap.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        ap.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    threads = set_threads(args.threads)
    print(f"MobileNet-v2, batch {args.batch}, {threads} threads (torch, numba, ONNX Runtime); ms, medians")
    if args.layers:
        _layers(args.batch, args.turns)
        return 0
    model = pruned(args.sparsity)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    auto = sparsecnn.compile(model, x, "auto", plan_path=args.plans)
    plan, layout = dict(auto.plan), auto.layout  # the layout compile chose (blocked where it ran faster)
    general = compile_under(model, x, plan, [(conv, "DEPTHWISE", False)], layout=layout)
    now = compile_under(model, x, plan, [], layout=layout)
    fns = {"torch": lambda: model(x), "general": lambda: general(x), "depthwise": lambda: now(x)}
    with torch.inference_mode():
        ref = model(x)
        peer = model_peers(model, x, threads=threads).get("onnxruntime")
        if peer is not None:
            fns = {"torch": fns["torch"], "ort": peer, **{k: v for k, v in fns.items() if k != "torch"}}
        for name, fn in fns.items():
            check_close(fn(), ref, rtol=1e-4, what=f"mobilenet-v2 {name}")
        steps = now.steps(tuple(x.shape))
        fused, dwb = sum("+clamp" in k for k in steps), sum("blocked-dw" in k for k in steps)
        blocks = sum("expand+blocked-dw" in k for k in steps)
        print(f"plan: {sorted(set(plan.values()))}; layout {layout}; steps: {fused} fused ReLU6, "
              f"{steps.count('clamp')} clamp, {dwb} blocked depthwise ({blocks} computing the 1x1 layer "
              f"before them, {sum('+project' in k for k in steps)} the one after them)")
        print(f"{'cores':6s} " + " ".join(f"{k:>9s}" for k in fns) + f" {'dw gain':>8s} {'vs torch':>8s}"
              + (f" {'vs ort':>7s}" if "ort" in fns else ""))
        gains = []
        for _ in range(args.turns):
            cores = probe_cores().label
            t = dict(zip(fns, _interleaved(list(fns.values()), 5, 5, 0.05), strict=True))
            gains.append(t["general"] / t["depthwise"])
            vs_ort = f" {t['ort'] / t['depthwise']:6.2f}x" if "ort" in t else ""
            print(f"{cores:6s} " + " ".join(f"{v * 1e3:9.3f}" for v in t.values())
                  + f" {gains[-1]:7.3f}x {t['torch'] / t['depthwise']:7.2f}x{vs_ort}", flush=True)
    print(f"median depthwise-kernel gain over the general path: {float(np.median(gains)):.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
