"""Straight 1x1 layers' items ordered position group first against filter block first (A/B)."""

from __future__ import annotations

from benchmarks.end_to_end import ab_run, ab_setup
from sparsecnn.kernels import implicit_gemm


def main(argv: list[str] | None = None) -> int:
    args, cases = ab_setup(argv, "python -m benchmarks.positions_first", __doc__.split("\n")[0],
                           "resnet50-dense", 5, ("before", "now"))
    ab_run(args, cases, [(implicit_gemm, "STRAIGHT_POSITIONS_FIRST", False)], layout="blocked")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
