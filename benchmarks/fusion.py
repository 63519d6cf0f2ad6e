"""The residual add in the direct conv's epilogue against the add as a step of its own.

``python -m benchmarks.fusion [--cases resnet18-90,resnet50-90] [--batch 1] [--turns 5] [--threads 2]``
compiles each case twice with the same plan (``"auto"``, cached in ``--plans``, then fixed):
``separate`` with ``engine._lower.FUSE_RESIDUAL`` off (``conv:direct`` then ``add+relu``) and
``fused`` (``conv:direct+add+relu``). Both outputs are checked equal first; each turn times both
models interleaved (medians of 5 x 5 calls) and prints the ratio, then the median over the turns.
See docs/engine.md, "Session of 2026-12-06 (eighth)".
"""

from __future__ import annotations

import numpy as np
import torch

import sparsecnn
from benchmarks.end_to_end import CASES, _interleaved, ab_setup
from sparsecnn import models
from sparsecnn.bench.placement import probe_cores, span_label
from sparsecnn.engine import _lower


def _compile(model, x, plan: dict, fuse: bool):
    saved = _lower.FUSE_RESIDUAL
    _lower.FUSE_RESIDUAL = fuse
    try:
        compiled = sparsecnn.compile(model, x, plan, tune=False)
        compiled(x)  # builds the program (and binds this thread's buffers) under the setting
    finally:
        _lower.FUSE_RESIDUAL = saved
    return compiled


def main(argv: list[str] | None = None) -> int:
    args, cases = ab_setup(argv, "python -m benchmarks.fusion", __doc__.split("\n")[0],
                           "resnet18-90,resnet50-90", 5, ("separate", "fused"))
    for case in cases:
        name, profile, kwargs = CASES[case]
        model = models.build(name, **kwargs).eval()
        models.apply_profile(model, profile)
        x = torch.randn(args.batch, *models.input_shape(model), generator=torch.Generator().manual_seed(0))
        plan = dict(sparsecnn.compile(model, x, "auto", plan_path=args.plans).plan)
        separate, fused = _compile(model, x, plan, False), _compile(model, x, plan, True)
        gains = []
        with torch.inference_mode():
            torch.testing.assert_close(fused(x), separate(x), rtol=0, atol=0)
            for _ in range(args.turns):
                before = probe_cores()
                t_sep, t_fused = _interleaved([lambda m=separate, v=x: m(v), lambda m=fused, v=x: m(v)], 5, 5,
                                              0.0)
                gains.append(t_sep / t_fused)
                cores = span_label(before, probe_cores())
                print(f"{case:12s} b{args.batch:<3d} {cores:9s} {t_sep * 1e3:9.3f} {t_fused * 1e3:9.3f} "
                      f"{gains[-1]:6.3f}x", flush=True)
        steps = fused.steps(tuple(x.shape))
        print(f"  {case}: median {float(np.median(gains)):.3f}x over {args.turns} turns; "
              f"{sum('+add' in s for s in steps)} adds fused")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
