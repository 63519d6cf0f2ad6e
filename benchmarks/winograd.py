"""Dense layers in the blocked layout, A/B: Winograd F(m x m, 3x3) (``kernels/winograd.py``) or the straight
1x1 tiles' position-first item order, against the library without it.

``python -m benchmarks.winograd [--switch winograd|positions-first] [--cases resnet50-dense,resnet18-50]
[--batch 1] [--turns 5] [--threads 2]`` compiles each case twice with the same plan (``"auto"``, cached
in ``--plans``), both in the blocked layout (``--layout`` to change it), where the dense layers run the
implicit GEMM: ``before`` with the switch off (``winograd``: ``implicit_gemm.WINOGRAD`` off, so 3x3
layers run the channel-vector form; ``positions-first``: ``implicit_gemm.STRAIGHT_POSITIONS_FIRST``
off, so straight 1x1 layers split their filter blocks between the threads), and ``now``, the
library's rule. Both outputs are checked against the torch model first; each turn times both
interleaved (medians of 5 x 5 calls).
"""

from __future__ import annotations

import argparse

from benchmarks.end_to_end import ab_run, ab_setup
from sparsecnn.kernels import implicit_gemm

SWITCHES = {"winograd": "WINOGRAD", "positions-first": "STRAIGHT_POSITIONS_FIRST"}


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--switch", choices=sorted(SWITCHES), default="winograd")
    known, rest = pre.parse_known_args(argv)
    args, cases = ab_setup(rest, "python -m benchmarks.winograd", __doc__.split("\n")[0],
                           "resnet50-dense,resnet18-50,resnet50-50", 5, ("before", "now"))
    ab_run(args, cases, [(implicit_gemm, SWITCHES[known.switch], False)], layout="blocked")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
