"""The executor's buffer plan against plain reuse, per placement of the two cores.

``python -m benchmarks.buffers [--cases resnet50-90,resnet18-90] [--batch 1] [--turns 10] [--threads 2]``
compiles each case twice with the same plan (``"auto"``, cached in ``--plans``):

- ``reused``: every dead value's buffer reused by a later value (best fit), the plan before
  2026-12-05 (``engine._lower.KEEP_SHARED`` off, ``OWN_BUFFERS_MAX_BYTES`` 0);
- ``planned``: the executor's plan: buffers that every thread reads whole are kept (batch 1), and
  each value has its own buffer where the threads split the images (batch >= threads).

Both outputs are checked equal first. Each turn probes where the two worker threads' cores sit
(:func:`sparsecnn.bench.placement.probe_cores`: ``near`` or ``far``) and times both models
interleaved (medians of 5 x 5 calls); the table prints each turn, then the median per placement.
The gain is in the far placement (a core rewriting lines the other core holds waits for them to be
invalidated); near, the reused plan keeps more in cache. See docs/engine.md, "Session of 2026-12-05
(fourth)".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import sparsecnn
from benchmarks.end_to_end import CASES, _interleaved, ab_setup
from sparsecnn import models
from sparsecnn.bench.placement import probe_cores, span_label
from sparsecnn.engine import _lower


def _compile(model, x, plan: dict, reuse_all: bool):
    saved = _lower.KEEP_SHARED, _lower.OWN_BUFFERS_MAX_BYTES
    if reuse_all:
        _lower.KEEP_SHARED, _lower.OWN_BUFFERS_MAX_BYTES = False, 0
    try:
        compiled = sparsecnn.compile(model, x, plan, tune=False)
        compiled(x)  # builds the program (and binds this thread's buffers) under the setting
    finally:
        _lower.KEEP_SHARED, _lower.OWN_BUFFERS_MAX_BYTES = saved
    return compiled


def run_case(case: str, batch: int, turns: int, plans: Path) -> list[dict]:
    name, profile, kwargs = CASES[case]
    model = models.build(name, **kwargs).eval()
    models.apply_profile(model, profile)
    x = torch.randn(batch, *models.input_shape(model), generator=torch.Generator().manual_seed(0))
    plan = dict(sparsecnn.compile(model, x, "auto", plan_path=plans).plan)
    reused, planned = _compile(model, x, plan, True), _compile(model, x, plan, False)
    mb = [4 * sum(m.program(tuple(x.shape)).buffers) / 2**20 for m in (reused, planned)]
    rows = []
    with torch.inference_mode():
        torch.testing.assert_close(planned(x), reused(x), rtol=0, atol=0)
        for _ in range(turns):
            before = probe_cores()
            t_reused, t_planned = _interleaved([lambda: reused(x), lambda: planned(x)], 5, 5, 0.0)
            cores = span_label(before, probe_cores())
            rows.append({"case": case, "batch": batch, "cores": cores, "reused_ms": t_reused * 1e3,
                         "planned_ms": t_planned * 1e3, "reused_mb": mb[0], "planned_mb": mb[1]})
            print(f"{case:12s} b{batch:<3d} {cores:9s} {t_reused * 1e3:9.3f} {t_planned * 1e3:9.3f} "
                  f"{t_reused / t_planned:6.3f}x   ({mb[0]:.1f} / {mb[1]:.1f} MB)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args, cases = ab_setup(argv, "python -m benchmarks.buffers", __doc__.split("\n")[0],
                           "resnet50-90,resnet18-90", 10, ("reused", "planned"))
    rows = [r for case in cases for r in run_case(case, args.batch, args.turns, args.plans)]
    print("medians per placement:")
    for case in cases:
        for cores in sorted({r["cores"] for r in rows if r["case"] == case}):
            sel = [r for r in rows if r["case"] == case and r["cores"] == cores]
            a, b = (float(np.median([r[k] for r in sel])) for k in ("reused_ms", "planned_ms"))
            print(f"  {case:12s} {cores:9s} {len(sel):3d} turns  reused {a:9.3f}  planned {b:9.3f}  "
                  f"{a / b:6.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
