r"""Local response normalisation across channels (Krizhevsky et al. 2012; Caffe's ``ACROSS_CHANNELS``)
in one pass over (B, C, H, W) float32, exactly torch's ``local_response_norm`` up to rounding.

.. math:: b_c = a_c \left(k + \frac{\alpha}{n}
          \sum_{c'=c-\lfloor n/2 \rfloor}^{c+\lfloor (n-1)/2 \rfloor} a_{c'}^2\right)^{-\beta}

Why a kernel: composed of torch ops (pad, ``n`` shifted adds, scale, power, product) the layer makes
about ten passes over the tensor, 0.9 ms for AlexNet's norm1 at batch 1 on 2 cores; here each output
channel sums its window of squares for a run of pixels in registers and writes once. The window sum
is recomputed per channel (no running sum, which would drift), in the order torch adds: with the
window of five inside the tensor straight from the five input rows (one pass, no buffer: the buffer's
load and store per window row bounded the kernel before), elsewhere through a per-run buffer.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

from sparsecnn.kernels._numba import num_threads, pjit

__all__ = ["bind_lrn", "lrn_across_channels"]

_RUN = 512  # most pixels per work item: the item's window sums stay in L1
# Fast-math flags of the kernel: approximate functions, reciprocals and FMA contraction (LLVM then
# computes 1 / sqrt by the rsqrt estimate and a Newton step, off the divider). Not ``nnan``/``ninf``:
# a NaN or infinite input still gives NaN, as torch's. Measured with the window in registers (2
# threads, interleaved): AlexNet's norm1 / norm2 at batch 1 0.126 / 0.092 ms before, 0.077 / 0.057
# with the window in registers, 0.058 / 0.045 with these flags; at batch 32 4.96 / 3.38 -> 3.44 /
# 2.34 -> 3.16 / 2.18 ms. Largest difference to torch over those inputs: 2.4e-7 relative.
_FAST = {"afn", "arcp", "contract"}


def lrn_across_channels(x: np.ndarray, size: int, alpha: float, beta: float, k: float,
                        out: np.ndarray) -> None:
    """``out = local_response_norm(x, size, alpha, beta, k)``.

    Parameters
    ----------
    x : ndarray, shape (B, C, H, W), float32, C-contiguous
    size : int
        Channels in the window (``size // 2`` before, ``(size - 1) // 2`` after).
    alpha, beta, k : float
        As torch's (``alpha`` is divided by ``size``).
    out : ndarray, shape (B, C, H, W), float32, C-contiguous
    """
    bind_lrn(x.shape, size, alpha, beta, k, out)(x)


def bind_lrn(x_shape: tuple[int, ...], size: int, alpha: float, beta: float, k: float,
             out: np.ndarray) -> Callable[[np.ndarray], None]:
    """``run(x)``: :func:`lrn_across_channels` for inputs of ``x_shape`` into ``out``, every argument
    but ``x`` prepared once (the whole-model executor's step; the preparation is ~5 us a call)."""
    b, c, h, w = x_shape
    # Enough work items for every thread to get about four (27x27 planes are only 729 pixels).
    items = 4 * num_threads()
    run = min(_RUN, max(64, -(-(b * h * w) // items) + 15) // 16 * 16)
    flat_out = out.reshape(b, c, h * w)
    args = (size, np.float32(alpha / size), np.float32(beta), np.float32(k), beta == 0.75, run)

    def run_lrn(x: np.ndarray) -> None:
        _lrn_kernel(x.reshape(b, c, h * w), flat_out, *args)

    return run_lrn


@pjit(fastmath=_FAST)
def _lrn_kernel(x, out, size, scale, beta, k, three_quarters, run):
    """Parallel over runs of ``run`` pixels of one image. A channel whose window of five lies inside
    the tensor (AlexNet's and GoogLeNet's size, with their power 0.75) sums its five squares in
    registers, one pass; other sizes and powers, and the channels at the edges, sum the window into a
    per-run buffer first.
    NOTE: x and out (B, C, P) C-contiguous float32, not overlapping."""
    nb, nc, npix = x.shape
    front = size // 2
    nrun = (npix + run - 1) // run
    for item in numba.prange(nb * nrun):
        b = item // nrun
        p0 = (item - b * nrun) * run
        p1 = min(p0 + run, npix)
        n = p1 - p0
        acc = np.empty(n, dtype=np.float32)
        for c in range(nc):
            lo = c - front
            src = x[b, c, p0:p1]
            dst = out[b, c, p0:p1]
            # Slices walked with range indices: numba then drops its negative-index check, which
            # otherwise keeps LLVM from vectorising these loops (2x slower).
            if size == 5 and three_quarters and lo >= 0 and lo + 5 <= nc:
                a0 = x[b, lo, p0:p1]
                a1 = x[b, lo + 1, p0:p1]
                a2 = x[b, lo + 2, p0:p1]
                a3 = x[b, lo + 3, p0:p1]
                a4 = x[b, lo + 4, p0:p1]
                for j in range(n):
                    s = a0[j] * a0[j] + a1[j] * a1[j] + a2[j] * a2[j] + a3[j] * a3[j] + a4[j] * a4[j]
                    r = np.float32(1.0) / np.sqrt(s * scale + k)
                    dst[j] = src[j] * r * np.sqrt(r)
                continue
            acc[:] = 0.0
            for cc in range(max(lo, 0), min(lo + size, nc)):
                sq = x[b, cc, p0:p1]
                for j in range(n):
                    acc[j] += sq[j] * sq[j]
            # The branch outside the loops: a loop holding the power call does not vectorise.
            if three_quarters:
                for j in range(n):
                    r = np.float32(1.0) / np.sqrt(acc[j] * scale + k)
                    dst[j] = src[j] * r * np.sqrt(r)
            else:
                for j in range(n):
                    dst[j] = src[j] * (acc[j] * scale + k) ** -beta
