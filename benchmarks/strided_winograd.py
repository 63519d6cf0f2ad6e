"""AlexNet's Winograd layers against ``direct``: conv1 over its space-to-depth input
(``kernels/space_to_depth.py``), conv2 as F(4x4, 5x5) (``kernels/winograd.py``).

``python -m benchmarks.strided_winograd [--threads 2] [--batches 1,32] [--profiles deep-compression,ssl]
[--layers conv1,conv2] [--turns 7] [--no-by-image]`` prints, per batch, profile and layer:

- the layer alone: AlexNet's layer with the profile's zeros, as ``lowered`` (the Winograd form where
  the rule gives it one), ``direct`` and torch dense, modules called on the same input (the layer's
  input in the dense model's forward pass);
- the whole model: :func:`sparsecnn.compile` of AlexNet with the auto plan, the layer forced to
  ``lowered`` or to ``direct`` (every other layer as planned), each built twice in the order lowered,
  direct, direct, lowered (at batch 32 the model built first ran up to 1.12x faster than the same
  model built second), the ratio of the geometric means, and torch dense.

Every output is checked against torch dense first; the engines are timed in interleaved turns
(medians), so the ratios are within one process and one spell of the machine. ``--no-by-image`` turns
off ``implicit_gemm.S2D_BY_IMAGE`` (conv1's form also where the threads split the images: batch 32; on
by default): the A/B that decided it.
"""

from __future__ import annotations

import argparse
import functools
import math

import torch

import sparsecnn
from benchmarks.end_to_end import _interleaved
from sparsecnn import models
from sparsecnn.bench.harness import check_close, set_threads
from sparsecnn.kernels import implicit_gemm
from sparsecnn.layers import SparseConv2d


def _timed(fns: dict, x: torch.Tensor, ref: torch.Tensor, what: str, turns: int,
           block: int) -> dict[str, float]:
    """Each ``fns[name](x)`` checked against ``ref``, then median seconds per call, interleaved."""
    with torch.inference_mode():
        for name, f in fns.items():
            check_close(f(x), ref, rtol=1e-4, what=f"{what} {name}")
        calls = [functools.partial(f, x) for f in fns.values()]
        return dict(zip(fns, _interleaved(calls, turns, block, 0.0), strict=True))


def layer_input(model: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The input of submodule ``name`` in ``model``'s forward pass on ``x``."""
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        hook.remove()
    return seen[0].clone()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.strided_winograd",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--profiles", default="deep-compression,ssl")
    ap.add_argument("--layers", default="conv1,conv2")
    ap.add_argument("--turns", type=int, default=7, help="interleaved turns at batch 1 (a third above)")
    ap.add_argument("--no-by-image", dest="by_image", action="store_false",
                    help="not conv1's form where the threads split the images (S2D_BY_IMAGE off)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    implicit_gemm.S2D_BY_IMAGE = args.by_image
    print(f"{args.threads} threads; ms (medians of interleaved turns); S2D_BY_IMAGE {args.by_image}")
    for batch in (int(b) for b in args.batches.split(",")):
        turns, block = (args.turns, 5) if batch == 1 else (max(3, args.turns // 3), 2)
        for profile in args.profiles.split(","):
            model = models.build("alexnet").eval()
            models.apply_profile(model, profile)
            x = torch.randn(batch, 3, 227, 227, generator=torch.Generator().manual_seed(0))
            plan = dict(sparsecnn.compile(model, x, "auto").plan)
            for name in args.layers.split(","):
                conv = model.get_submodule(name)
                xl = layer_input(model, name, x)
                layers = {s: SparseConv2d.from_dense(conv, s) for s in ("lowered", "direct")}
                with torch.inference_mode():
                    ref = conv(xl)
                t = _timed({**layers, "torch": conv}, xl, ref, name, turns, block)
                form = "winograd" if implicit_gemm._use_winograd(layers["lowered"].engine.implicit,
                                                                   tuple(xl.shape)) else "implicit GEMM"
                print(f"b{batch:<3d} {profile:17s} {name} alone  lowered ({form}) "
                      f"{t['lowered'] * 1e3:8.3f}  direct {t['direct'] * 1e3:8.3f}  "
                      f"torch {t['torch'] * 1e3:8.3f}  "
                      f"lowered vs direct {t['direct'] / t['lowered']:5.2f}x  "
                      f"vs torch {t['torch'] / t['lowered']:5.2f}x", flush=True)
                # each form built twice, in the orders A B B A: at batch 32 the model built first ran up
                # to 1.12x faster than the same one built second whichever form it held
                builds = [("lowered", 1), ("direct", 1), ("direct", 2), ("lowered", 2)]
                compiled = {f"{s}{i}": sparsecnn.compile(model, x, {**plan, name: s}, tune=False)
                            for s, i in builds}
                with torch.inference_mode():
                    ref = model(x)
                t = _timed({**compiled, "torch": model}, x, ref, f"compiled, {name}", turns, block)
                low = math.sqrt(t["lowered1"] * t["lowered2"])
                dire = math.sqrt(t["direct1"] * t["direct2"])
                print(f"b{batch:<3d} {profile:17s} whole model  {name} lowered {low * 1e3:8.2f}  "
                      f"{name} direct {dire * 1e3:8.2f}  torch {t['torch'] * 1e3:8.2f}  lowered vs direct "
                      f"{dire / low:5.3f}x (built first / second: {t['direct1'] / t['lowered1']:5.3f}x / "
                      f"{t['direct2'] / t['lowered2']:5.3f}x; auto plan: {name} {plan.get(name)})",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
