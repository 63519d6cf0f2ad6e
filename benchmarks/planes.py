"""Planes of whole vectors for 1x1 layers on 14x14 and 7x7 planes, against reading the plain planes in place.

``python -m benchmarks.planes [--cases resnet50-90,resnet50-80,resnet50-50] [--batch 1] [--turns 5]``
compiles each case twice with the same plan (``"auto"``, cached in ``--plans``): ``before``, every
value with planes of H * W floats and every stride-1 unpadded layer reading its input in place (the
executor's ``PAD_PLANES`` off and ``conv._ALIGN_MIN_READS`` out of reach: the sessions before), and
``now``, the library's rules (direct convs writing planes padded to whole vectors for readers that
take them, and layers that read each input channel often copying a plain input onto aligned planes
first). Both outputs are checked equal to the torch model first; each turn times both interleaved
(medians of 5 x 5 calls).
"""

from __future__ import annotations

from benchmarks.end_to_end import ab_run, ab_setup
from sparsecnn.engine import _lower
from sparsecnn.kernels import conv


def main(argv: list[str] | None = None) -> int:
    args, cases = ab_setup(argv, "python -m benchmarks.planes", __doc__.split("\n")[0],
                           "resnet50-90,resnet50-80,resnet50-50", 5, ("in place", "aligned"))
    ab_run(args, cases, [(conv, "_ALIGN_MIN_READS", 1 << 62), (_lower, "PAD_PLANES", False)], layout="plain",
           summary=lambda m, x: f"{len(m.program(tuple(x.shape)).padded)} values with padded planes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
