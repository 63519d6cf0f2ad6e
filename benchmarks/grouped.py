"""Filter groups on wide planes (docs/engine.md, "Session of 2026-12-06 (tenth)") against the rule before.

``python -m benchmarks.grouped [--cases resnet18-80,resnet50-80] [--batch 1] [--turns 5] [--threads 2]``
compiles each case twice with the same plan (``"auto"``, cached in ``--plans``): ``before``, with
3x3 layers on wide planes held to the old filter-group rule (``conv._GROUPED_WIDE_SPAN`` out of
reach), and ``now``, the library's rule. Both outputs are checked equal to the torch model first;
each turn times both interleaved (medians of 5 x 5 calls).
"""

from __future__ import annotations

from benchmarks.end_to_end import ab_run, ab_setup
from sparsecnn.kernels import conv


def main(argv: list[str] | None = None) -> int:
    args, cases = ab_setup(argv, "python -m benchmarks.grouped", __doc__.split("\n")[0],
                           "resnet18-80,resnet50-80", 5, ("before", "now"))
    ab_run(args, cases, [(conv, "_GROUPED_WIDE_SPAN", 1 << 62)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
