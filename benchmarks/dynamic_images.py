"""Batches split between the threads image by image from a shared counter, against a static share.

``python -m benchmarks.dynamic_images [--cases alexnet-dc,alexnet-ssl,resnet18-90] [--batch 32]
[--turns 5] [--threads 2]`` compiles each case twice with the same plan (``"auto"``, cached in
``--plans``, then fixed): ``static`` with ``kernels.conv.DYNAMIC_IMAGES`` off (thread ``t`` runs
images ``t, t + 2, ...`` of every direct conv whose threads split the batch) against ``dynamic`` (each
thread takes the next image no thread has taken, ``kernels.conv.next_image``). Both outputs are
checked equal (bit for bit: an image's arithmetic does not depend on its thread) first; each turn
times both models interleaved (medians of 5 x 5 calls) and prints the ratio, then the median over the
turns. docs/engine.md, "Session of 2026-12-07 (twenty-second)".
"""

from __future__ import annotations

import sys

from benchmarks.end_to_end import ab_run, ab_setup
from sparsecnn.kernels import conv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, chosen = ab_setup(["--batch", "32", *argv], "python -m benchmarks.dynamic_images",
                            __doc__.split("\n")[0], "alexnet-dc,alexnet-ssl,resnet18-90", 5,
                            ("static", "dynamic"))
    ab_run(args, chosen, [(conv, "DYNAMIC_IMAGES", False)], exact=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
