"""The channel form's tiles over output positions only, prefetching weights, against whole wide rows.

``python -m benchmarks.positions [--cases resnet50-dense,resnet50-50] [--batch 1] [--turns 12]
[--layout blocked]`` compiles each case twice with the same plan (``"auto"``, cached in ``--plans``):
``before``, the channel form's register tiles walking every position of the wide rows (padding
columns included, cropped afterwards) and no software prefetch (``implicit_gemm.VALID_POSITIONS``
and ``CHAN_PREFETCH`` off: the sessions before), and ``now``, tiles of output positions alone, each
position reading its input at its own offset, each channel block's tiles prefetching the next
block's weights into L2. Both outputs are checked against the torch model first; each turn times
both interleaved (medians of 5 x 5 calls).
"""

from __future__ import annotations

from benchmarks.end_to_end import ab_run, ab_setup
from sparsecnn.kernels import implicit_gemm


def main(argv: list[str] | None = None) -> int:
    args, cases = ab_setup(argv, "python -m benchmarks.positions", __doc__.split("\n")[0],
                           "resnet50-dense,resnet50-50", 12, ("wide rows", "positions"))
    ab_run(args, cases, [(implicit_gemm, "VALID_POSITIONS", False), (implicit_gemm, "CHAN_PREFETCH", False)],
           layout="blocked")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
