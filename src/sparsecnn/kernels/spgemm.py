"""Sparse x sparse: CSR weights times a CSR-stored lowered input, dense output.

The seed's CUSP experiment, on the CPU: after a ReLU most of a layer's input is zero, so the lowered
input is stored sparse too and the product only touches pairs of nonzeros (Gustavson's row-wise
SpGEMM, Gustavson 1978, with the dense output row as the accumulator):

.. math::

    \\text{out}[b, o, n] = \\text{bias}[o] + \\sum_{k \\in W[o]} W[o, k]
        \\sum_{n \\in X_{b,g}[k]} X_{b,g}[k, n]

The lowered input is compressed straight from ``x`` (no dense im2col matrix): a counting pass sizes
every row, an exclusive scan turns the counts into ``indptr``, and a filling pass writes the values.
"""

from __future__ import annotations

from numba import prange, uintp

from sparsecnn.kernels._numba import jit, pjit
from sparsecnn.kernels.lowering import out_span

__all__ = ["csr_spgemm_conv", "exclusive_scan", "im2col_csr_count", "im2col_csr_fill"]


@pjit
def im2col_csr_count(x, kh, kw, sh, sw, ph, pw, dh, dw, groups, hout, wout, counts):
    """Nonzeros of every lowered row: ``counts[(b * groups + g) * K + k]``.

    Parameters
    ----------
    x : ndarray of float32, shape (B, Cin, H, W), C-contiguous
    counts : ndarray of int64, shape (B * groups * K,); written in full.

    NOTE: rows are Caffe's lowered rows (see :mod:`sparsecnn.kernels.lowering`). Parallel over rows.
    """
    B, cin, H, W = x.shape
    cg = cin // groups
    khw = kh * kw
    K = cg * khw
    for t in prange(B * groups * K):
        b = t // (groups * K)
        rem = t - b * (groups * K)
        gi = rem // K
        k = rem - gi * K
        c = gi * cg + k // khw
        i = (k // kw) % kh
        j = k % kw
        off_w = j * dw - pw
        lo, hi = out_span(wout, W, off_w, sw)
        src = x[b, c]
        cnt = 0
        for oh in range(hout):
            ih = oh * sh - ph + i * dh
            if ih >= 0 and ih < H:
                line = src[ih]
                for ow in range(lo, hi):
                    if line[ow * sw + off_w] != 0.0:
                        cnt += 1
        counts[t] = cnt


@jit
def exclusive_scan(counts, indptr):
    """``indptr[0] = 0``, ``indptr[i + 1] = indptr[i] + counts[i]``; returns the total."""
    acc = 0
    indptr[0] = 0
    for i in range(counts.shape[0]):
        acc += counts[i]
        indptr[i + 1] = acc
    return acc


@pjit
def im2col_csr_fill(x, kh, kw, sh, sw, ph, pw, dh, dw, groups, hout, wout, indptr, indices, data):
    """Write the lowered input's nonzeros as CSR rows (columns ``n = oh * Wout + ow`` ascending).

    NOTE: ``indptr`` comes from :func:`exclusive_scan` of :func:`im2col_csr_count` on the same ``x``;
    ``indices`` and ``data`` hold at least ``indptr[-1]`` entries.
    """
    B, cin, H, W = x.shape
    cg = cin // groups
    khw = kh * kw
    K = cg * khw
    for t in prange(B * groups * K):
        b = t // (groups * K)
        rem = t - b * (groups * K)
        gi = rem // K
        k = rem - gi * K
        c = gi * cg + k // khw
        i = (k // kw) % kh
        j = k % kw
        off_w = j * dw - pw
        lo, hi = out_span(wout, W, off_w, sw)
        src = x[b, c]
        p = indptr[t]
        end = indptr[t + 1]
        for oh in range(hout):
            ih = oh * sh - ph + i * dh
            if ih >= 0 and ih < H:
                line = src[ih]
                base = oh * wout
                # Branch-free compaction: write every value, advance past the nonzeros only. The
                # test "v != 0" would mispredict on ReLU inputs (about half zeros); "p < end" keeps
                # the writes inside this row (the next row belongs to another thread).
                for ow in range(lo, hi):
                    v = line[ow * sw + off_w]
                    if p < end:
                        indices[p] = base + ow
                        data[p] = v
                    p += v != 0.0


@pjit
def csr_spgemm_conv(a_indptr, a_indices, a_data, b_indptr, b_indices, b_data, groups, k_total, bias, out):
    """``out[b, o] = bias[o] + A[o] @ X[b, g]`` with both ``A`` (weights) and ``X`` (input) in CSR.

    Parameters
    ----------
    a_indptr, a_indices, a_data : CSR arrays of the lowered weight, shape (Cout, K)
    b_indptr, b_indices, b_data : CSR arrays of the stacked lowered inputs, shape (B * groups * K, N):
        row ``(b * groups + g) * K + k`` is row ``k`` of batch item ``b``, group ``g``
    groups, k_total : int
        Groups, and ``K``, the lowered rows per group.
    bias : ndarray of float32, shape (Cout,)
    out : ndarray of float32, shape (B, Cout, N), C-contiguous; written in full.

    NOTE: Cout % groups == 0; column indices of X in [0, N). A plain ``A @ X`` is batch 1, groups 1,
    zero bias.
    Parallel over (batch, output channel); each output row is its own dense accumulator.
    """
    B, cout, n = out.shape
    mg = cout // groups
    for t in prange(B * cout):
        b = t // cout
        o = t - b * cout
        gi = o // mg
        row = out[b, o]
        v0 = bias[o]
        for q in range(n):
            row[q] = v0
        base = (b * groups + gi) * k_total
        for p in range(a_indptr[o], a_indptr[o + 1]):
            v = a_data[p]
            r = base + a_indices[p]
            q0 = b_indptr[r]
            cnt = b_indptr[r + 1] - q0
            ix = b_indices[q0 : q0 + cnt]
            vals = b_data[q0 : q0 + cnt]
            for q in range(cnt):  # uintp: no wraparound test on the scattered index
                row[uintp(ix[q])] += v * vals[q]
