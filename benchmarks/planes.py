"""1x1 layers copied onto planes of whole vectors (``conv._ALIGN_MIN_READS``) against reading in place.

``python -m benchmarks.planes [--cases resnet50-90,resnet50-80,resnet50-50] [--batch 1] [--turns 5]``
compiles each case twice with the same plan (``"auto"``, cached in ``--plans``): ``before``, with
every stride-1 unpadded layer reading its input in place (``conv._ALIGN_MIN_READS`` out of reach, the
rule of the sessions before), and ``now``, the library's rule (layers whose planes are not whole
vectors, 14x14 and 7x7, and that read each input channel often copy it onto aligned planes first).
Both outputs are checked equal to the torch model first; each turn times both interleaved (medians
of 5 x 5 calls).
"""

from __future__ import annotations

import sparsecnn
from benchmarks.end_to_end import ab_run, ab_setup
from sparsecnn.kernels import conv


def _compile(model, x, plan: dict, in_place: bool):
    saved = conv._ALIGN_MIN_READS
    if in_place:
        conv._ALIGN_MIN_READS = 1 << 62
    try:
        compiled = sparsecnn.compile(model, x, plan, tune=False)
        compiled(x)  # builds the program and the layers' workspaces under the setting
    finally:
        conv._ALIGN_MIN_READS = saved
    return compiled


def main(argv: list[str] | None = None) -> int:
    args, cases = ab_setup(argv, "python -m benchmarks.planes", __doc__.split("\n")[0],
                           "resnet50-90,resnet50-80,resnet50-50", 5, ("in place", "aligned"))
    ab_run(args, cases, _compile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
