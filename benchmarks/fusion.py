"""The residual add in the direct conv's epilogue against the add as a step of its own.

``python -m benchmarks.fusion [--cases resnet18-90,resnet50-90] [--batch 1] [--turns 5] [--threads 2]``
compiles each case twice with the same plan (``"auto"``, cached in ``--plans``, then fixed):
``separate`` with ``engine._lower.FUSE_RESIDUAL`` off (``conv:direct`` then ``add+relu``) and
``fused`` (``conv:direct+add+relu``). Both outputs are checked equal first; each turn times both
models interleaved (medians of 5 x 5 calls) and prints the ratio, then the median over the turns.
See docs/engine.md, "Session of 2026-12-06 (eighth)".
"""

from __future__ import annotations

from benchmarks.end_to_end import ab_run, ab_setup
from sparsecnn.engine import _lower


def main(argv: list[str] | None = None) -> int:
    args, cases = ab_setup(argv, "python -m benchmarks.fusion", __doc__.split("\n")[0],
                           "resnet18-90,resnet50-90", 5, ("separate", "fused"))
    ab_run(args, cases, [(_lower, "FUSE_RESIDUAL", False)], exact=True,
           summary=lambda m, x: f"{sum('+add' in s for s in m.steps(tuple(x.shape)))} adds fused")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
