"""Filter groups on wide planes (docs/engine.md, "Session of 2026-12-06 (tenth)") against the rule before.

``python -m benchmarks.grouped [--cases resnet18-80,resnet50-80] [--batch 1] [--turns 5] [--threads 2]``
compiles each case twice with the same plan (``"auto"``, cached in ``--plans``): ``before``, with
3x3 layers on wide planes held to the old filter-group rule (``conv._GROUPED_WIDE_SPAN`` out of
reach), and ``now``, the library's rule. Both outputs are checked equal to the torch model first;
each turn times both interleaved (medians of 5 x 5 calls).
"""

from __future__ import annotations

import numpy as np
import torch

import sparsecnn
from benchmarks.end_to_end import CASES, _interleaved, ab_setup
from sparsecnn import models
from sparsecnn.bench.harness import check_close
from sparsecnn.kernels import conv


def _compile(model, x, plan: dict, old_rule: bool):
    saved = conv._GROUPED_WIDE_SPAN
    if old_rule:
        conv._GROUPED_WIDE_SPAN = 1 << 62
    try:
        compiled = sparsecnn.compile(model, x, plan, tune=False)
        compiled(x)  # builds the program and the layers' workspaces under the setting
    finally:
        conv._GROUPED_WIDE_SPAN = saved
    return compiled


def main(argv: list[str] | None = None) -> int:
    args, cases = ab_setup(argv, "python -m benchmarks.grouped", __doc__.split("\n")[0],
                           "resnet18-80,resnet50-80", 5, ("before", "now"))
    for case in cases:
        name, profile, kwargs = CASES[case]
        model = models.build(name, **kwargs).eval()
        models.apply_profile(model, profile)
        x = torch.randn(args.batch, *models.input_shape(model), generator=torch.Generator().manual_seed(0))
        plan = dict(sparsecnn.compile(model, x, "auto", plan_path=args.plans).plan)
        before, now = _compile(model, x, plan, True), _compile(model, x, plan, False)
        gains = []
        with torch.inference_mode():
            ref = model(x)
            check_close(before(x), ref, what=f"{case} before")
            check_close(now(x), ref, what=f"{case} now")
            for _ in range(args.turns):
                fns = [lambda b=before, v=x: b(v), lambda n=now, v=x: n(v)]
                t_before, t_now = _interleaved(fns, 5, 5, 0.0)
                gains.append(t_before / t_now)
                print(f"{case:12s} b{args.batch:<3d} {'':9s} {t_before * 1e3:9.3f} {t_now * 1e3:9.3f} "
                      f"{t_before / t_now:6.3f}x", flush=True)
        print(f"  {case}: median gain {float(np.median(gains)):.3f}x over {len(gains)} turns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
