"""Dense layers in the blocked layout, A/B: Winograd F(m x m, 3x3) (``kernels/winograd.py``) or the straight
1x1 tiles' position-first item order, against the library without it; or single layers, the three forms.

``python -m benchmarks.winograd [--switch winograd|positions-first] [--cases resnet50-dense,resnet18-50]
[--batch 1] [--turns 5] [--threads 2]`` compiles each case twice with the same plan (``"auto"``, cached
in ``--plans``), both in the blocked layout (``--layout`` to change it), where the dense layers run the
implicit GEMM: ``before`` with the switch off (``winograd``: ``implicit_gemm.WINOGRAD`` off, so 3x3
layers run the channel-vector form; ``positions-first``: ``implicit_gemm.STRAIGHT_POSITIONS_FIRST``
off, so straight 1x1 layers split their filter blocks between the threads), and ``now``, the
library's rule. Both outputs are checked against the torch model first; each turn times both
interleaved (medians of 5 x 5 calls).

``python -m benchmarks.winograd --layers [--threads 2]`` times single dense 3x3 layers (ResNet's and
AlexNet's shapes, batch 1, blocked in and out, L2 flushed before each call as in a forward pass): the
channel-vector form, F(2x2, 3x3) and F(4x4, 3x3), interleaved, each checked against torch first.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.end_to_end import ab_run, ab_setup
from sparsecnn.bench.harness import check_close, set_threads
from sparsecnn.kernels import implicit_gemm, winograd
from sparsecnn.kernels._numba import aligned_zeros, num_threads
from sparsecnn.kernels.blocked import BLOCK, from_blocked_array, to_blocked_array

SWITCHES = {"winograd": "WINOGRAD", "positions-first": "STRAIGHT_POSITIONS_FIRST"}
# (Cin, Cout, H): ResNet's 3x3 stride-1 layers and AlexNet's conv3
LAYERS = [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7), (256, 384, 13)]


def _layer_forms(cin: int, cout: int, hw: int) -> dict:
    """``name -> run()`` for one dense layer: the channel form and both Winograd tile sizes."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    x = np.maximum(rng.standard_normal((1, cin, hw, hw)), 0).astype(np.float32)
    ref = torch.relu(F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias), padding=1))
    xb = to_blocked_array(x)
    forms = {}
    saved = implicit_gemm.WINOGRAD
    try:
        implicit_gemm.WINOGRAD = False
        prep = implicit_gemm.prepare_implicit_gemm(w.reshape(1, cout, -1), np.arange(cout)[None],
                                                   np.arange(cin * 9)[None], w.shape, 1, (1, 1), (1, 1),
                                                   (1, 1))
        out = aligned_zeros((1, cout, hw, hw))
        run = implicit_gemm.bind_implicit_gemm_conv2d(prep, x.shape, bias, out, True, 0, True, True)
        forms["channel form"] = (lambda run=run: run(xb), out)
    finally:
        implicit_gemm.WINOGRAD = saved
    for m in (2, 4):
        u = winograd.winograd_weights(w, 1, m)
        ws = winograd.winograd_workspace(x.shape, w.shape, 1, (1, 1), num_threads(), False, True, True,
                                         m=m)
        out = aligned_zeros((1, cout, hw, hw))
        b = winograd.padded_bias(bias, cout, 1)
        forms[f"F({m}x{m})"] = (lambda u=u, ws=ws, out=out, b=b: winograd.winograd_conv2d(
            u, ws, xb.reshape(1, -1), b, out.reshape(1, -1), True), out)
    for name, (fn, out) in forms.items():
        fn()
        check_close(torch.from_numpy(from_blocked_array(out.reshape(1, cout // BLOCK, hw, hw, BLOCK))), ref,
                    what=f"{name} {cin}->{cout} at {hw}x{hw}")
    return {k: v[0] for k, v in forms.items()}


def layers(threads: int, turns: int = 5, calls: int = 20) -> None:
    """The single-layer table (see the module docstring)."""
    threads = set_threads(threads)
    flush = np.ones(8 << 20, np.float32)  # 32 MB: more than both L2s
    print(f"{threads} threads; ms, medians of {turns} x {calls} interleaved calls, L2 flushed before each")
    print(f"{'layer':18s} {'channel form':>12s} {'F(2x2)':>8s} {'F(4x4)':>8s} {'gain F2':>8s} "
          f"{'gain F4':>8s}")
    for cin, cout, hw in LAYERS:
        forms = _layer_forms(cin, cout, hw)
        samples: dict[str, list[float]] = {k: [] for k in forms}
        for _ in range(turns):
            for name, fn in forms.items():
                for _ in range(calls):
                    flush.sum()
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - t0)
        ms = {k: float(np.median(v)) * 1e3 for k, v in samples.items()}
        base = ms["channel form"]
        print(f"{cin}->{cout} at {hw}x{hw}".ljust(18) + f" {base:12.3f} {ms['F(2x2)']:8.3f} "
              f"{ms['F(4x4)']:8.3f} {base / ms['F(2x2)']:7.2f}x {base / ms['F(4x4)']:7.2f}x")


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--switch", choices=sorted(SWITCHES), default="winograd")
    pre.add_argument("--layers", action="store_true")
    known, rest = pre.parse_known_args(argv)
    if known.layers:
        ap = argparse.ArgumentParser(prog="python -m benchmarks.winograd --layers")
        ap.add_argument("--threads", type=int, default=2)
        layers(ap.parse_args(rest).threads)
        return 0
    args, cases = ab_setup(rest, "python -m benchmarks.winograd", __doc__.split("\n")[0],
                           "resnet50-dense,resnet18-50,resnet50-50", 5, ("before", "now"))
    ab_run(args, cases, [(implicit_gemm, SWITCHES[known.switch], False)], layout="blocked")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
