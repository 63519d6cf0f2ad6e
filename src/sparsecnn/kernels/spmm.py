"""Sparse weights (CSR or BSR) times a dense lowered input: the seed's Caffe sparse branch (CSRMM).

Both kernels compute, for every batch item ``b`` and output channel ``o`` of group ``g``,

.. math::

    \\text{out}[b, o, :] = \\text{bias}[o] + \\sum_{k} W[o, k]\\, \\text{cols}[b, g, k, :]

row by row (Gustavson's row-wise SpMM): each stored weight adds a scaled, contiguous row of the
lowered input into the output row, which stays in cache while its nonzeros stream past. A plain
matrix product ``A @ B`` is the special case ``B = 1``, ``groups = 1``, zero bias.

Index arrays may be int16, int32 or int64 (the formats store the smallest width); numba compiles one
specialisation per combination.
"""

from __future__ import annotations

from numba import prange

from sparsecnn.kernels._numba import pjit

__all__ = ["bsr_conv_matmul", "csr_conv_matmul"]


@pjit
def csr_conv_matmul(indptr, indices, data, cols, bias, out):
    """``out[b, o] = bias[o] + W[o] @ cols[b, o // (Cout / groups)]`` with ``W`` in CSR.

    Parameters
    ----------
    indptr : ndarray, shape (Cout + 1,)
    indices : ndarray, shape (nnz,)
        Lowered column ``k`` in ``[0, K)`` of each nonzero.
    data : ndarray of float32, shape (nnz,)
    cols : ndarray of float32, shape (B, groups, K, N), C-contiguous
    bias : ndarray of float32, shape (Cout,)
        Zeros for a layer without bias.
    out : ndarray of float32, shape (B, Cout, N), C-contiguous; written in full.

    NOTE: Cout % groups == 0; indices sorted is not required. Parallel over (batch, output channel).
    """
    B, g, _, n = cols.shape
    cout = out.shape[1]
    mg = cout // g
    for t in prange(B * cout):
        b = t // cout
        o = t - b * cout
        gi = o // mg
        row = out[b, o]
        v0 = bias[o]
        for q in range(n):
            row[q] = v0
        for p in range(indptr[o], indptr[o + 1]):
            v = data[p]
            src = cols[b, gi, indices[p]]
            for q in range(n):
                row[q] += v * src[q]


@pjit
def bsr_conv_matmul(indptr, indices, data, k_total, m_group, m_pad, cols, bias, out):
    """``out = bias + W @ cols`` with ``W`` in BSR, grouped.

    The BSR matrix stacks the groups' lowered weights, each padded with zero rows from ``m_group``
    to ``m_pad`` rows (a multiple of ``R``) so that no block straddles two groups: shape
    ``(groups * m_pad, K)``. Edge blocks past column ``k_total`` are zero padding and skipped.

    Parameters
    ----------
    indptr : ndarray, shape (groups * m_pad / R + 1,)
    indices : ndarray, shape (nblocks,)
        Block column of each block.
    data : ndarray of float32, shape (nblocks, R, C)
    k_total : int
        Lowered columns ``K`` (the logical width).
    m_group, m_pad : int
        Output channels per group, and the padded rows per group.
    cols : ndarray of float32, shape (B, groups, K, N), C-contiguous
    bias : ndarray of float32, shape (Cout,)
    out : ndarray of float32, shape (B, Cout, N), C-contiguous; written in full.

    NOTE: m_pad % R == 0 and m_pad >= m_group. Parallel over (batch, block row): the R output rows of
    a block row are owned by one thread.
    """
    B = cols.shape[0]
    n = cols.shape[3]
    nbr = indptr.shape[0] - 1
    R = data.shape[1]
    C = data.shape[2]
    for t in prange(B * nbr):
        b = t // nbr
        br = t - b * nbr
        r0 = br * R
        gi = r0 // m_pad
        local0 = r0 - gi * m_pad
        nrows = min(R, m_group - local0)
        for i in range(nrows):
            o = gi * m_group + local0 + i
            row = out[b, o]
            v0 = bias[o]
            for q in range(n):
                row[q] = v0
        for p in range(indptr[br], indptr[br + 1]):
            k0 = indices[p] * C
            ncols = min(C, k_total - k0)
            blk = data[p]
            for i in range(nrows):
                row = out[b, gi * m_group + local0 + i]
                for c in range(ncols):
                    v = blk[i, c]
                    src = cols[b, gi, k0 + c]
                    for q in range(n):
                        row[q] += v * src[q]
