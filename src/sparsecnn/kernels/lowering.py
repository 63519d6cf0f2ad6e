"""im2col lowering of a convolution input, and the scatter that undoes row compaction.

Convolution as matrix multiplication (Chellapilla et al., 2006; Caffe's ``im2col_cpu``): for every
group, the input patch under each output pixel becomes a column of the lowered matrix

.. math::

    \\text{cols}[b, g, k, n] = x[b,\\; g C_g + c,\\; o_h s_h - p_h + i d_h,\\; o_w s_w - p_w + j d_w]

with ``k = (c kh + i) kw + j`` (Caffe's column order, the same as ``weight.reshape(Cout, -1)``),
``n = o_h Wout + o_w`` and zero outside the input. A convolution is then ``W_g @ cols[b, g]``.

The kernels take a table ``rows`` of the lowered rows ``k`` to produce, per group: the identity
``arange(K)`` for the full matrix, or only the kernel-shape columns that survive structured pruning
(the SSL lowering, Wen et al., NIPS 2016); ``-1`` produces a zero row (padding to a common length).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from sparsecnn.kernels._numba import jit, pjit

__all__ = ["conv_out_size", "full_rows", "im2col", "out_span", "scatter_rows"]


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis (torch's and Caffe's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def full_rows(groups: int, k: int) -> np.ndarray:
    """The ``rows`` table of the full lowering: ``arange(k)`` for every group, shape (groups, k), in the
    smallest signed dtype that holds ``k - 1`` (the dtype the SSL tables use, so both share one
    compiled specialisation)."""
    dt = next(d for d in (np.int16, np.int32, np.int64) if k - 1 <= np.iinfo(d).max)
    return np.ascontiguousarray(np.broadcast_to(np.arange(k, dtype=dt), (groups, k)))


@jit
def out_span(n_out: int, size: int, offset: int, stride: int) -> tuple[int, int]:
    """Range ``[lo, hi)`` of outputs ``o`` whose input ``o * stride + offset`` lies in ``[0, size)``."""
    lo = 0
    if offset < 0:
        lo = (-offset + stride - 1) // stride
    last = size - 1 - offset
    hi = 0
    if last >= 0:
        hi = last // stride + 1
    if hi > n_out:
        hi = n_out
    if lo > hi:
        lo = hi
    return lo, hi


@pjit
def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, rows, out):
    """Lower ``x`` into ``out`` (Caffe im2col, grouped, with a table of rows).

    Parameters
    ----------
    x : ndarray, shape (B, Cin, H, W), C-contiguous
    kh, kw, sh, sw, ph, pw, dh, dw : int
        Kernel size, stride, padding and dilation.
    rows : ndarray of int16/int32/int64, shape (groups, Kr)
        Lowered row ``k`` in ``[0, Cin/groups * kh * kw)`` to write at each position, or -1 for zeros.
    out : ndarray, shape (B, groups, Kr, Hout * Wout), C-contiguous
        Written in full.

    NOTE: assumes Cin % groups == 0, out sized by :func:`conv_out_size`, row entries in range.
    Parallel over (batch, group, row): every row is an independent strided gather.
    """
    B, cin, H, W = x.shape
    g, kr = rows.shape
    cg = cin // g
    n_out = out.shape[3]
    hout = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wout = n_out // hout if hout > 0 else 0
    khw = kh * kw
    for t in prange(B * g * kr):
        b = t // (g * kr)
        rem = t - b * (g * kr)
        gi = rem // kr
        r = rem - gi * kr
        dst = out[b, gi, r]
        k = rows[gi, r]
        if k < 0:
            dst[:] = 0.0
            continue
        c = gi * cg + k // khw
        i = (k // kw) % kh
        j = k % kw
        off_w = j * dw - pw
        lo, hi = out_span(wout, W, off_w, sw)
        src = x[b, c]
        for oh in range(hout):
            ih = oh * sh - ph + i * dh
            base = oh * wout
            if ih < 0 or ih >= H:
                for ow in range(wout):
                    dst[base + ow] = 0.0
                continue
            line = src[ih]
            for ow in range(lo):
                dst[base + ow] = 0.0
            if sw == 1:  # a contiguous slice copy (memcpy-like); the index loop does not vectorise
                dst[base + lo : base + hi] = line[lo + off_w : hi + off_w]
            else:
                for ow in range(lo, hi):
                    dst[base + ow] = line[ow * sw + off_w]
            for ow in range(hi, wout):
                dst[base + ow] = 0.0


@pjit
def scatter_rows(tmp, row_map, bias, out):
    """Scatter the compact GEMM result back to the output channels, adding the bias.

    Parameters
    ----------
    tmp : ndarray, shape (B, groups, Mr, N)
        Result of the compacted GEMM; row ``m`` of group ``g`` belongs to channel ``row_map[g, m]``.
    row_map : ndarray of int16/int32/int64, shape (groups, Mr)
        Output channel of each compact row, -1 for padding rows (ignored).
    bias : ndarray, shape (Cout,)
        Zeros when the layer has none; the only value of a dropped (all-zero) filter's output.
    out : ndarray, shape (B, Cout, N)
        Written in full.

    NOTE: every channel appears at most once in ``row_map``.
    """
    B, cout, n = out.shape
    g, mr = row_map.shape
    for t in prange(B * cout):
        b = t // cout
        o = t - b * cout
        v = bias[o]
        row = out[b, o]
        for q in range(n):
            row[q] = v
    for t in prange(B * g * mr):
        b = t // (g * mr)
        rem = t - b * (g * mr)
        gi = rem // mr
        m = rem - gi * mr
        o = row_map[gi, m]
        if o >= 0:
            v = bias[o]
            row = out[b, o]
            src = tmp[b, gi, m]
            for q in range(n):
                row[q] = src[q] + v
