"""Sparse weights (CSR or BSR) times a dense lowered input: the seed's Caffe sparse branch (CSRMM).

Both kernels compute, for every batch item ``b`` and output channel ``o`` of group ``g``,

.. math::

    \\text{out}[b, o, :] = \\text{bias}[o] + \\sum_{k} W[o, k]\\, \\text{cols}[b, g, k, :]

row by row (Gustavson's row-wise SpMM): each stored weight adds a scaled, contiguous row of the
lowered input into the output row, which stays in cache while its nonzeros stream past. A plain
matrix product ``A @ B`` is the special case ``B = 1``, ``groups = 1``, zero bias.

Index arrays may be int16, int32 or int64 (the formats store the smallest width); numba compiles one
specialisation per combination. Indices are cast to ``uintp`` before indexing: numba then drops the
negative-index wraparound test from the inner loops.

Stores are the first wall: adding one nonzero's row into the output costs a load, a store and an FMA
per element (at most half the FMA peak). The CSR kernel therefore adds eight (then four, two, one)
nonzeros per pass over the output row, ``out[q] += v0 s0[q] + ... + v7 s7[q]``; the BSR kernel keeps the
four inputs of a 4 x 4 block in registers and updates the block's four output rows in one pass.
"""

from __future__ import annotations

from numba import prange, uintp

from sparsecnn.kernels._numba import jit, pjit

__all__ = ["bsr_conv_matmul", "csr_conv_matmul"]


@jit
def _csr_row(row, n, src, indices, data, p0, p1):
    """``row[:n] += sum_p data[p] * src[indices[p], :n]`` for ``p0 <= p < p1``, eight at a time.

    The row's nonzeros are sliced and walked with a non-negative loop index, and the column indices
    are cast to ``uintp``, so no index needs the negative wraparound test. Mixing unsigned and signed
    integers would make numba compute in float64, hence the casts only at the indexing.
    NOTE: indices in range of src's rows; row and src rows hold at least n elements.
    """
    d = data[p0:p1]
    ix = indices[p0:p1]
    nnz = p1 - p0
    for blk in range(nnz // 8):
        k = blk * 8
        s0, s1 = src[uintp(ix[k])], src[uintp(ix[k + 1])]
        s2, s3 = src[uintp(ix[k + 2])], src[uintp(ix[k + 3])]
        s4, s5 = src[uintp(ix[k + 4])], src[uintp(ix[k + 5])]
        s6, s7 = src[uintp(ix[k + 6])], src[uintp(ix[k + 7])]
        v0, v1, v2, v3 = d[k], d[k + 1], d[k + 2], d[k + 3]
        v4, v5, v6, v7 = d[k + 4], d[k + 5], d[k + 6], d[k + 7]
        for q in range(n):
            row[q] += ((v0 * s0[q] + v1 * s1[q]) + (v2 * s2[q] + v3 * s3[q])) + (
                (v4 * s4[q] + v5 * s5[q]) + (v6 * s6[q] + v7 * s7[q]))
    k = nnz - nnz % 8
    if k + 4 <= nnz:
        s0, s1 = src[uintp(ix[k])], src[uintp(ix[k + 1])]
        s2, s3 = src[uintp(ix[k + 2])], src[uintp(ix[k + 3])]
        v0, v1, v2, v3 = d[k], d[k + 1], d[k + 2], d[k + 3]
        for q in range(n):
            row[q] += (v0 * s0[q] + v1 * s1[q]) + (v2 * s2[q] + v3 * s3[q])
        k += 4
    if k + 2 <= nnz:
        s0, s1 = src[uintp(ix[k])], src[uintp(ix[k + 1])]
        v0, v1 = d[k], d[k + 1]
        for q in range(n):
            row[q] += v0 * s0[q] + v1 * s1[q]
        k += 2
    if k < nnz:
        s0 = src[uintp(ix[k])]
        v0 = d[k]
        for q in range(n):
            row[q] += v0 * s0[q]


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

    NOTE: Cout % groups == 0; indices in [0, K) (sorted is not required). Parallel over
    (batch, output channel).
    """
    B, g, _, n = cols.shape
    cout = out.shape[1]
    mg = cout // g
    for t in prange(B * cout):
        b = t // cout
        o = t - b * cout
        row = out[b, o]
        bv = bias[o]
        for q in range(n):
            row[q] = bv
        _csr_row(row, n, cols[b, o // mg], indices, data, indptr[o], indptr[o + 1])


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

    NOTE: m_pad % R == 0 and m_pad >= m_group; block columns in range. Parallel over
    (batch, block row): the R output rows of a block row are owned by one thread. A full 4 x 4 block
    runs the register-blocked path: per output column, four inputs feed two output rows per pass
    (8 FMAs per 4 input loads and 2 output loads/stores, no register spills).
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
        o0 = gi * m_group + local0
        src = cols[b, gi]
        for i in range(nrows):
            row = out[b, o0 + i]
            bv = bias[o0 + i]
            for q in range(n):
                row[q] = bv
        for p in range(indptr[br], indptr[br + 1]):
            k0 = indices[p] * C
            ncols = min(C, k_total - k0)
            blk = data[p]
            if R == 4 and C == 4 and nrows == 4 and ncols == 4:
                d0, d1, d2, d3 = out[b, o0], out[b, o0 + 1], out[b, o0 + 2], out[b, o0 + 3]
                s0, s1 = src[uintp(k0)], src[uintp(k0 + 1)]
                s2, s3 = src[uintp(k0 + 2)], src[uintp(k0 + 3)]
                a00, a01, a02, a03 = blk[0, 0], blk[0, 1], blk[0, 2], blk[0, 3]
                a10, a11, a12, a13 = blk[1, 0], blk[1, 1], blk[1, 2], blk[1, 3]
                a20, a21, a22, a23 = blk[2, 0], blk[2, 1], blk[2, 2], blk[2, 3]
                a30, a31, a32, a33 = blk[3, 0], blk[3, 1], blk[3, 2], blk[3, 3]
                # Two rows per pass: 8 weights + 4 inputs + 2 outputs fit AVX2's 16 vector
                # registers (all four rows at once would spill the weights).
                for q in range(n):
                    x0, x1, x2, x3 = s0[q], s1[q], s2[q], s3[q]
                    d0[q] += (a00 * x0 + a01 * x1) + (a02 * x2 + a03 * x3)
                    d1[q] += (a10 * x0 + a11 * x1) + (a12 * x2 + a13 * x3)
                for q in range(n):
                    x0, x1, x2, x3 = s0[q], s1[q], s2[q], s3[q]
                    d2[q] += (a20 * x0 + a21 * x1) + (a22 * x2 + a23 * x3)
                    d3[q] += (a30 * x0 + a31 * x1) + (a32 * x2 + a33 * x3)
            else:
                for i in range(nrows):
                    row = out[b, o0 + i]
                    c = 0
                    while c + 4 <= ncols:
                        v0, v1, v2, v3 = blk[i, c], blk[i, c + 1], blk[i, c + 2], blk[i, c + 3]
                        s0, s1 = src[uintp(k0 + c)], src[uintp(k0 + c + 1)]
                        s2, s3 = src[uintp(k0 + c + 2)], src[uintp(k0 + c + 3)]
                        for q in range(n):
                            row[q] += (v0 * s0[q] + v1 * s1[q]) + (v2 * s2[q] + v3 * s3[q])
                        c += 4
                    while c < ncols:
                        v0 = blk[i, c]
                        s0 = src[uintp(k0 + c)]
                        for q in range(n):
                            row[q] += v0 * s0[q]
                        c += 1
