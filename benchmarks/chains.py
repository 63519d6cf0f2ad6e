"""Dense conv chains, one layer shape each: the compiled executor against ONNX Runtime, paired.

``python -m benchmarks.chains [--chains 3x3-56,1x1-56] [--threads 1,2] [--pairs 30]`` builds, per
chain, a torch model of one dense layer shape repeated (conv + ReLU; the 1x1 chains alternate an
expansion and its reduction, as ResNet's bottlenecks), compiles it (``layout="blocked"``: the channel
form, as for dense ResNet-50) and exports it to ONNX. Both outputs are checked against torch first.
Then the two engines alternate blocks of 3 calls (no idle gap: after one, both ran 1.1-1.4x slower
for several calls on this project's VM), ``--pairs`` times, and the table gives each engine's
median and the median of the per-pair ratios (ONNX Runtime's time over ours: above 1 we are
faster), with its quartiles. On a VM whose speed swings within seconds, the paired ratio is the
figure to compare; the milliseconds move with the spells.

With ``--layers``, the same chains are also timed layer by layer inside the pass: each compiled step
between ``perf_counter`` marks, ONNX Runtime's Conv nodes from its profiler (as in
``benchmarks.ort_layers``), and the middle layers' medians are printed side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sparsecnn
from benchmarks.ort_layers import _ort_node_ms, _ort_session
from sparsecnn.bench.harness import check_close, set_threads

# name: (input channels, spatial size, kernel, repeats, expansion channels or None)
CHAINS = {
    "3x3-56": (64, 56, 3, 6, None),
    "3x3-28": (128, 28, 3, 6, None),
    "3x3-14": (256, 14, 3, 6, None),
    "3x3-7": (512, 7, 3, 4, None),
    "1x1-56": (64, 56, 1, 3, 256),
    "1x1-14": (256, 14, 1, 3, 1024),
}


def chain_model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The chain ``name`` of :data:`CHAINS` (seeded weights) and its input, batch 1."""
    cin, hw, k, reps, mid = CHAINS[name]
    gen = torch.Generator().manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(reps):
        if mid:
            layers += [torch.nn.Conv2d(cin, mid, 1), torch.nn.ReLU(),
                       torch.nn.Conv2d(mid, cin, 1), torch.nn.ReLU()]
        else:
            layers += [torch.nn.Conv2d(cin, cin, k, 1, k // 2), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=gen) / np.sqrt(p[0].numel()))
    return model, torch.randn(1, cin, hw, hw, generator=gen)


def paired(fa, fb, pairs: int, block: int = 3) -> tuple[float, float, np.ndarray]:
    """Medians of ``fa`` and ``fb`` (seconds a call) and the per-pair ratios ``a / b``: the two
    alternate blocks of ``block`` timed calls (after one untimed call), the first of each pair
    swapped every other pair."""
    ta, tb, ratios = [], [], []
    for r in range(pairs):
        got = {}
        for key, f in ((("a", fa), ("b", fb)) if r % 2 == 0 else (("b", fb), ("a", fa))):
            f()
            t = []
            for _ in range(block):
                t0 = time.perf_counter()
                f()
                t.append(time.perf_counter() - t0)
            got[key] = float(np.median(t))
        ta.append(got["a"])
        tb.append(got["b"])
        ratios.append(got["a"] / got["b"])
    return float(np.median(ta)), float(np.median(tb)), np.array(ratios)


def _layers(name: str, model, x, compiled, threads: int, turns: int) -> None:
    prog = compiled.program(tuple(x.shape))
    env, steps = prog.bind()
    xn = x.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        sess = _ort_session(model, x, threads, str(Path(tmp) / "ort"))
        marks_all = []
        for _ in range(turns + 3):
            env[prog.input_slot] = xn
            marks = [time.perf_counter()]
            for step in steps:
                step(env)
                marks.append(time.perf_counter())
            marks_all.append(np.diff(marks))
            sess.run(None, {"x": xn})
        nodes = _ort_node_ms(sess.end_profiling(), skip=3)
    ours = np.median(np.array(marks_all[3:]), axis=0) * 1e3
    theirs = [t for _, op, t in nodes if op == "Conv"]
    # the middle layers: the first reads and the last writes the plain layout (the chain's ends)
    mid = slice(1, len(ours) - 1)
    print(f"  {name}, {threads} thread(s), per layer inside the pass (ms), middle layers:")
    print("    ours " + " ".join(f"{v:6.3f}" for v in ours[mid]))
    if len(theirs) == len(ours):
        print("    ORT  " + " ".join(f"{v:6.3f}" for v in theirs[mid]))
        ratios = (a / b for a, b in zip(theirs[mid], ours[mid], strict=True))
        print("    ORT/ours " + " ".join(f"{v:5.2f}" for v in ratios))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.chains", description=__doc__.split("\n")[0])
    ap.add_argument("--chains", default=",".join(CHAINS), help=f"from: {', '.join(CHAINS)}")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--layers", action="store_true", help="also time each layer inside the pass")
    args = ap.parse_args(argv)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime is not installed: nothing to compare with")
        return 2
    names = args.chains.split(",")
    unknown = [n for n in names if n not in CHAINS]
    if unknown:
        ap.error(f"unknown chain(s) {', '.join(unknown)}; choose from {', '.join(CHAINS)}")
    print("batch 1, layout blocked; ms (medians of blocks of 3 calls); ORT/ours: median of per-pair "
          "ratios (above 1: we are faster) [quartiles]")
    print(f"{'chain':8s} {'threads':>7s} {'ORT':>8s} {'ours':>8s} {'ORT/ours':>9s}  quartiles")
    for threads in (int(t) for t in args.threads.split(",")):
        set_threads(threads)
        for name in names:
            model, x = chain_model(name)
            compiled = sparsecnn.compile(model, x, layout="blocked")
            sess = _ort_session(model, x, threads)
            xn = x.numpy()
            with torch.inference_mode():
                ref = model(x)
                check_close(compiled(x), ref, rtol=1e-4, what=f"{name} compiled")
                check_close(torch.from_numpy(sess.run(None, {"x": xn})[0]), ref, rtol=1e-4,
                            what=f"{name} ONNX Runtime")
                t_ort, t_ours, r = paired(lambda s=sess, v=xn: s.run(None, {"x": v}),
                                          lambda c=compiled, v=x: c(v), args.pairs)
            print(f"{name:8s} {threads:7d} {t_ort * 1e3:8.3f} {t_ours * 1e3:8.3f} {np.median(r):9.3f}  "
                  f"[{np.quantile(r, 0.25):.3f}, {np.quantile(r, 0.75):.3f}]", flush=True)
            if args.layers:
                _layers(name, model, x, compiled, threads, 20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
