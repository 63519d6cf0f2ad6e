"""Winograd F(2x2, 3x3) for dense 3x3 stride-1 layers (``kernels/winograd.py``) against the forms before.

``python -m benchmarks.winograd [--cases resnet50-dense,resnet18-50,resnet50-50] [--batch 1] [--turns 5]
[--threads 2]`` compiles each case twice with the same plan (``"auto"``, cached in ``--plans``):
``before``, with ``implicit_gemm.WINOGRAD`` off (3x3 layers run the channel-vector or spatial
implicit GEMM), and ``now``, the library's rule. Both outputs are checked against the torch model
first; each turn times both interleaved (medians of 5 x 5 calls). Both run the blocked layout (``--layout``
to change it), where the dense 3x3 layers run the implicit GEMM.
"""

from __future__ import annotations

from benchmarks.end_to_end import ab_run, ab_setup
from sparsecnn.kernels import implicit_gemm


def main(argv: list[str] | None = None) -> int:
    args, cases = ab_setup(argv, "python -m benchmarks.winograd", __doc__.split("\n")[0],
                           "resnet50-dense,resnet18-50,resnet50-50", 5, ("before", "now"))
    ab_run(args, cases, [(implicit_gemm, "WINOGRAD", False)], layout="blocked")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
