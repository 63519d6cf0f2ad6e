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

from sparsecnn.kernels._numba import num_threads, pjit, thread_rows
from sparsecnn.kernels._simd import max3_cols2, max3_rows

__all__ = ["bind_lrn", "bind_lrn_max_pool", "fuses_with_lrn", "lrn_across_channels"]

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


def fuses_with_lrn(kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                   dilation: tuple[int, int], x_shape: tuple[int, ...]) -> bool:
    """Whether a max pool with these parameters after an LRN on ``x_shape`` (B, C, H, W) runs fused
    into it (:func:`bind_lrn_max_pool`): AlexNet's and CaffeNet's 3x3 / 2 windows without padding, on
    planes of at least 3 x 3."""
    window = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    return window == ((3, 3), (2, 2), (0, 0), (1, 1)) and len(x_shape) == 4 and min(x_shape[2:]) >= 3


def bind_lrn_max_pool(x_shape: tuple[int, ...], size: int, alpha: float, beta: float, k: float,
                      out: np.ndarray) -> Callable[[np.ndarray], None]:
    """``run(x)``: ``max_pool2d(local_response_norm(x, size, alpha, beta, k), 3, 2)`` into ``out``, the
    normalised planes never written to memory (AlexNet's norm1 -> pool1 and norm2 -> pool2: the
    whole-model executor's ``lrn+maxpool`` step, where :func:`fuses_with_lrn`).

    Each thread takes a range of (image, channel) planes; per plane it normalises the channel into
    a scratch plane of its own (:func:`lrn_across_channels`'s arithmetic and, like it, always the
    parallel kernel, so the values are the same bit for bit) and
    max-pools that, three rows at a time (:func:`sparsecnn.kernels._simd.max3_rows`, ``max3_cols2``:
    the same values as :func:`sparsecnn.kernels.elementwise.max_pool2d`, NaN winning). Apart, the two
    passes write the normalised tensor and read it back (at batch 32, 37 MB each way for norm1).

    Parameters
    ----------
    x_shape : tuple of int, (B, C, H, W)
    size, alpha, beta, k : as :func:`lrn_across_channels`
    out : ndarray, shape (B, C, (H - 3) // 2 + 1, (W - 3) // 2 + 1), float32, C-contiguous
    """
    b, c, h, w = (int(v) for v in x_shape)
    hout, wout = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    if out.shape != (b, c, hout, wout) or not out.flags.c_contiguous:
        raise ValueError(f"bind_lrn_max_pool: out must be C-contiguous of shape {(b, c, hout, wout)}")
    nparts = max(1, min(num_threads(), b * c))
    bounds = np.array([i * (b * c) // nparts for i in range(nparts + 1)], dtype=np.int64)
    plane = thread_rows(nparts, h * w)  # each thread's rows on cache lines of its own
    acc = thread_rows(nparts, h * w)
    row = thread_rows(nparts, w)
    flat = out.reshape(-1)
    args = (flat, size, np.float32(alpha / size), np.float32(beta), np.float32(k), beta == 0.75, bounds,
            plane, acc, row, h, w, hout, wout)

    def run(x: np.ndarray) -> None:
        _lrn_pool_kernel(x.reshape(b, c, h * w), *args)

    return run


@pjit(fastmath=_FAST)
def _lrn_pool_kernel(x, out, size, scale, beta, k, three_quarters, bounds, plane, acc, row, h, w, hout, wout):
    """:func:`bind_lrn_max_pool`'s pass: thread ``t`` normalises and pools planes ``bounds[t]`` to
    ``bounds[t + 1]`` (plane ``p`` is image ``p // C``, channel ``p % C``) through its scratch plane.
    The normalisation is :func:`_lrn_kernel`'s arithmetic, in the ``prange`` body as there (in a
    serial helper LLVM leaves these loops scalar, 5x slower); the pool runs on vector intrinsics.
    NOTE: x (B, C, H * W); out (B * C * hout * wout,); plane and acc (parts, H * W), row (parts, W)."""
    nc, n = x.shape[1], x.shape[2]
    front = size // 2
    for t in numba.prange(bounds.size - 1):
        dst = plane[t, 0:n]
        sums = acc[t, 0:n]
        vm = row[t]
        for p in range(bounds[t], bounds[t + 1]):
            b = p // nc
            c = p - b * nc
            lo = c - front
            src = x[b, c, 0:n]
            if size == 5 and three_quarters and lo >= 0 and lo + 5 <= nc:
                a0 = x[b, lo, 0:n]
                a1 = x[b, lo + 1, 0:n]
                a2 = x[b, lo + 2, 0:n]
                a3 = x[b, lo + 3, 0:n]
                a4 = x[b, lo + 4, 0:n]
                for j in range(n):
                    s = a0[j] * a0[j] + a1[j] * a1[j] + a2[j] * a2[j] + a3[j] * a3[j] + a4[j] * a4[j]
                    r = np.float32(1.0) / np.sqrt(s * scale + k)
                    dst[j] = src[j] * r * np.sqrt(r)
            else:
                sums[:] = 0.0
                for cc in range(max(lo, 0), min(lo + size, nc)):
                    sq = x[b, cc, 0:n]
                    for j in range(n):
                        sums[j] += sq[j] * sq[j]
                if three_quarters:
                    for j in range(n):
                        r = np.float32(1.0) / np.sqrt(sums[j] * scale + k)
                        dst[j] = src[j] * r * np.sqrt(r)
                else:
                    for j in range(n):
                        dst[j] = src[j] * (sums[j] * scale + k) ** -beta
            for oh in range(hout):
                max3_rows(dst, 2 * oh * w, w, vm, 0, w)
                max3_cols2(vm, 0, out, (p * hout + oh) * wout, wout)

