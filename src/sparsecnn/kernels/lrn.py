r"""Local response normalisation across channels (Krizhevsky et al. 2012; Caffe's ``ACROSS_CHANNELS``)
in one pass over (B, C, H, W) float32, exactly torch's ``local_response_norm`` up to rounding.

.. math:: b_c = a_c \left(k + \frac{\alpha}{n}
          \sum_{c'=c-\lfloor n/2 \rfloor}^{c+\lfloor (n-1)/2 \rfloor} a_{c'}^2\right)^{-\beta}

Why a kernel: composed of torch ops (pad, ``n`` shifted adds, scale, power, product) the layer makes
about ten passes over the tensor, 0.9 ms for AlexNet's norm1 at batch 1 on 2 cores; here each output
channel sums its window of squares for a run of pixels in registers and writes once. The window sum
is recomputed per channel (no running sum, which would drift), in the order torch adds.
"""

from __future__ import annotations

import numba
import numpy as np

from sparsecnn.kernels._numba import num_threads, pjit

__all__ = ["lrn_across_channels"]

_RUN = 512  # most pixels per work item: the item's window sums stay in L1


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
    b, c, h, w = x.shape
    # Enough work items for every thread to get about four (27x27 planes are only 729 pixels).
    items = 4 * num_threads()
    run = min(_RUN, max(64, -(-(b * h * w) // items) + 15) // 16 * 16)
    _lrn_kernel(x.reshape(b, c, h * w), out.reshape(b, c, h * w), size, np.float32(alpha / size),
                np.float32(beta), np.float32(k), beta == 0.75, run)


@pjit
def _lrn_kernel(x, out, size, scale, beta, k, three_quarters, run):
    """Parallel over runs of ``run`` pixels of one image.
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
            # Slices walked with range indices: numba then drops its negative-index check, which
            # otherwise keeps LLVM from vectorising these loops (2x slower).
            acc[:] = 0.0
            for cc in range(max(c - front, 0), min(c - front + size, nc)):
                src = x[b, cc, p0:p1]
                for j in range(n):
                    acc[j] += src[j] * src[j]
            src = x[b, c, p0:p1]
            dst = out[b, c, p0:p1]
            if three_quarters:
                for j in range(n):
                    r = np.float32(1.0) / np.sqrt(acc[j] * scale + k)
                    dst[j] = src[j] * r * np.sqrt(r)
            else:
                for j in range(n):
                    dst[j] = src[j] * (acc[j] * scale + k) ** -beta
