"""Fused steps against the same work as steps of their own: the residual add in the direct conv's
epilogue, and an LRN computed by the max pool after it.

``python -m benchmarks.fusion [--what residual|lrn-pool] [--cases ...] [--batch 1] [--turns 5]
[--threads 2]`` compiles each case twice with the same plan (``"auto"``, cached in ``--plans``, then
fixed). ``--what residual`` (default cases resnet18-90,resnet50-90): ``separate`` with
``engine._lower.FUSE_RESIDUAL`` off (``conv:direct`` then ``add+relu``) against ``fused``
(``conv:direct+add+relu``); docs/engine.md, "Session of 2026-12-06 (eighth)". ``--what lrn-pool``
(default case alexnet-dc): ``FUSE_LRN_POOL`` off (``lrn`` then ``maxpool``) against ``lrn+maxpool``;
docs/engine.md, "Session of 2026-12-07 (seventeenth)". Both outputs are checked equal (bit for bit)
first; each turn times both models interleaved (medians of 5 x 5 calls) and prints the ratio, then
the median over the turns.
"""

from __future__ import annotations

import argparse

from benchmarks.end_to_end import ab_run, ab_setup
from sparsecnn.engine import _lower

WHAT = {  # --what: (default cases, the attribute that turns the fusion off, the step it makes)
    "residual": ("resnet18-90,resnet50-90", "FUSE_RESIDUAL", "+add"),
    "lrn-pool": ("alexnet-dc", "FUSE_LRN_POOL", "lrn+maxpool"),
}


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(prog="python -m benchmarks.fusion", add_help=False)  # picks the defaults
    pre.add_argument("--what", choices=list(WHAT), default="residual")
    known, rest = pre.parse_known_args(argv)
    cases, flag, step = WHAT[known.what]
    args, chosen = ab_setup(rest, "python -m benchmarks.fusion", __doc__.split("\n")[0], cases, 5,
                            ("separate", "fused"))
    ab_run(args, chosen, [(_lower, flag, False)], exact=True,
           summary=lambda m, x: f"{sum(step in s for s in m.steps(tuple(x.shape)))} {step} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
