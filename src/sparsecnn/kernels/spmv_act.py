"""Activation-sparse fully connected layers: ``out = x @ W.T + bias`` that skips the zero inputs.

The input of a fully connected layer after a ReLU is often 50-90% exact zeros. A row-wise CSR spmv
(:mod:`sparsecnn.kernels.spmv`) reads every stored weight whatever the input; stored by *columns*
(CSC), the layer reads only the columns of the nonzero inputs:

.. math::

    y = b + \\sum_{j : x_j \\neq 0} x_j W_{:, j}

so at weight density ``d`` and input density ``a`` it streams about ``a d M K`` nonzeros instead of
``d M K`` (the "sparse x sparse" product of the seed study, with the input vector sparse; cf. the
EIE accelerator, Han et al. ISCA 2016, which walks the nonzero activations over CSC weights).

Storage: CSC with row indices in the narrowest dtype (uint16 for ``M <= 65536``), 6 bytes per nonzero;
above 2/3 weight density the columns are kept dense instead (4 bytes per weight, contiguous
vector loads), the same walk over nonzero inputs. Threads split the *rows* (outputs) in
nnz-balanced ranges; a per-thread table of where each column's rows enter the range lets each
thread walk only its part of a column, so no two threads write the same output.

At batch ``B > 1`` a column is skipped when its input is zero in the whole batch, and each of its
nonzeros updates the ``B`` outputs of its row from a transposed copy of the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from sparsecnn.kernels._numba import PerThread, balanced_bounds, jit, num_threads, pjit

__all__ = ["DENSE_COLUMNS_ABOVE", "ActLinearPrep", "act_sparse_linear", "prepare_act_linear"]

DENSE_COLUMNS_ABOVE = 2.0 / 3.0  # weight density above which dense columns (4 B) beat CSC (6 B)


@dataclass(eq=False)
class _Workspace:
    bounds: np.ndarray  # (nparts + 1,) row ranges, nnz-balanced
    split: np.ndarray  # (nparts + 1, K) where column j's entries of range t start (CSC mode)
    nz: np.ndarray  # (K,) the nonzero inputs' columns, filled per call
    xt: np.ndarray  # (K, B) transposed input (batch > 1)
    acc: np.ndarray  # (M, B) transposed outputs (batch > 1, CSC) or (nparts, M) rows (batch 1, dense)


@dataclass(eq=False)
class ActLinearPrep:
    """Column-stored weights for :func:`act_sparse_linear`.

    Attributes
    ----------
    shape : tuple of int
        ``(M, K)`` of the weight.
    indptr : ndarray, shape (K + 1,), int32 or int64
        CSC column pointers (CSC mode; shape (0,) in dense-column mode).
    indices : ndarray, shape (nnz,), uint16 when M <= 65536 else uint32
        Row indices, sorted within each column.
    data : ndarray, shape (nnz,), float32
    dense_t : ndarray, shape (K, M), float32
        ``W.T`` in dense-column mode; shape (0, M) in CSC mode.
    """

    shape: tuple[int, int]
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    dense_t: np.ndarray
    _workspaces: PerThread = field(default_factory=PerThread, repr=False)

    @property
    def dense_columns(self) -> bool:
        return self.dense_t.shape[0] > 0 or self.shape[1] == 0

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.dense_t)) if self.dense_columns else int(self.data.size)

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored weights (pointers, indices, values or dense columns)."""
        return int(self.indptr.nbytes + self.indices.nbytes + self.data.nbytes + self.dense_t.nbytes)

    def check_format(self) -> None:
        m, k = self.shape
        if self.dense_columns:
            assert self.dense_t.shape == (k, m) and self.dense_t.dtype == np.float32
            return
        assert self.indptr.shape == (k + 1,) and self.indptr[0] == 0 and self.indptr[-1] == self.data.size
        assert (np.diff(self.indptr.astype(np.int64)) >= 0).all()
        assert self.indices.size == self.data.size and self.data.dtype == np.float32
        if self.indices.size:
            assert int(self.indices.max()) < m
        for j in range(k):
            col = self.indices[self.indptr[j]:self.indptr[j + 1]].astype(np.int64)
            assert (np.diff(col) > 0).all()

    def workspace(self, batch: int) -> _Workspace:
        nparts = num_threads()
        key = (batch, nparts)
        ws = self._workspaces.get(key)
        if ws is None:
            m, k = self.shape
            if self.dense_columns:
                row_cost = np.full(m, 1, np.int64)
            else:
                row_cost = np.bincount(self.indices.astype(np.int64), minlength=m) + 1
            bounds = balanced_bounds(row_cost, nparts)
            split = np.zeros((nparts + 1, k if not self.dense_columns else 0), np.int64)
            if not self.dense_columns:
                _column_splits(self.indptr, self.indices, bounds, split)
            acc = np.empty((m, batch) if batch > 1 else (nparts, m), np.float32)
            ws = _Workspace(bounds=bounds, split=split, nz=np.empty(k, np.int64),
                            xt=np.empty((k, batch) if batch > 1 else (0, 1), np.float32), acc=acc)
            self._workspaces[key] = ws
        return ws


def prepare_act_linear(weight: np.ndarray, *, dense_above: float = DENSE_COLUMNS_ABOVE) -> ActLinearPrep:
    """Store a dense ``(M, K)`` weight by columns: CSC, or dense columns above ``dense_above`` density.

    Parameters
    ----------
    weight : ndarray, shape (M, K), float32
        Exact zeros are dropped (CSC mode).
    dense_above : float
        Weight density above which the columns are stored dense.
    """
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    m, k = weight.shape
    wt = np.ascontiguousarray(weight.T)
    nnz = int(np.count_nonzero(wt))
    if weight.size and nnz > dense_above * weight.size:
        empty = (np.zeros(0, np.int32), np.zeros(0, np.uint16), np.zeros(0, np.float32))
        return ActLinearPrep((m, k), *empty, wt)
    cols, rows = np.nonzero(wt)  # row-major over W.T: by column j, then row i (sorted)
    indptr = np.zeros(k + 1, dtype=np.int32 if nnz <= np.iinfo(np.int32).max else np.int64)
    np.cumsum(np.bincount(cols, minlength=k), out=indptr[1:])
    index_dtype = np.uint16 if m <= np.iinfo(np.uint16).max + 1 else np.uint32
    return ActLinearPrep((m, k), indptr, rows.astype(index_dtype), np.ascontiguousarray(wt[cols, rows]),
                         np.zeros((0, m), np.float32))


@jit
def _column_splits(indptr, indices, bounds, split):
    """``split[t, j]``: the first entry of column j whose row is >= bounds[t] (rows sorted per column)."""
    nparts = bounds.size - 1
    for j in range(indptr.size - 1):
        p = indptr[j]
        end = indptr[j + 1]
        split[0, j] = p
        for t in range(1, nparts + 1):
            lim = bounds[t]
            while p < end and indices[p] < lim:
                p += 1
            split[t, j] = p


@jit
def _nonzero_columns(x, nz):
    """Columns j with some nonzero x[:, j]; returns how many were written to nz."""
    nb, k = x.shape
    n = 0
    for j in range(k):
        for b in range(nb):
            if x[b, j] != 0.0:
                nz[n] = j
                n += 1
                break
    return n


@pjit
def _csc_vec(indices, data, split, bounds, x, nz, n_nz, bias, has_bias, y):
    """Batch 1, CSC: each thread owns rows [bounds[t], bounds[t+1]) and walks its part of every
    nonzero input's column. Each column part is sliced first and walked with a non-negative range
    index (no negative-index wraparound code, as in :mod:`sparsecnn.kernels.spmv`).
    NOTE: split was built for these bounds; nz[:n_nz] are valid columns; y has M elements."""
    nparts = bounds.size - 1
    for t in numba.prange(nparts):
        r0, r1 = bounds[t], bounds[t + 1]
        for i in range(r0, r1):
            y[i] = bias[i] if has_bias else np.float32(0.0)
        for q in range(n_nz):
            j = nz[q]
            v = x[j]
            p0 = split[t, j]
            n = split[t + 1, j] - p0
            d = data[p0:p0 + n]
            ix = indices[p0:p0 + n]
            for p in range(n):
                y[ix[p]] += v * d[p]


@pjit
def _dense_vec(wt, bounds, x, nz, n_nz, bias, has_bias, y, acc):
    """Batch 1, dense columns: ``acc += x_j * wt[j, r0:r1]`` over the nonzero inputs j, four
    columns per pass (a quarter of the accumulator loads and stores).
    NOTE: wt is (K, M) C-contiguous; y has M elements; acc is (nparts, M) scratch."""
    nparts = bounds.size - 1
    for t in numba.prange(nparts):
        r0, r1 = bounds[t], bounds[t + 1]
        n = r1 - r0
        a = acc[t, :n]
        for i in range(n):
            a[i] = bias[r0 + i] if has_bias else np.float32(0.0)
        q = 0
        while q + 4 <= n_nz:
            j0, j1, j2, j3 = nz[q], nz[q + 1], nz[q + 2], nz[q + 3]
            v0, v1, v2, v3 = x[j0], x[j1], x[j2], x[j3]
            c0 = wt[j0, r0:r1]
            c1 = wt[j1, r0:r1]
            c2 = wt[j2, r0:r1]
            c3 = wt[j3, r0:r1]
            for i in range(n):
                a[i] += (v0 * c0[i] + v1 * c1[i]) + (v2 * c2[i] + v3 * c3[i])
            q += 4
        while q < n_nz:
            j = nz[q]
            v = x[j]
            c = wt[j, r0:r1]
            for i in range(n):
                a[i] += v * c[i]
            q += 1
        for i in range(n):
            y[r0 + i] = a[i]


@pjit
def _csc_mat(indices, data, split, bounds, xt, nz, n_nz, bias, has_bias, out, acc):
    """Batch B > 1, CSC, over the transposed input xt (K, B) into a transposed accumulator.
    NOTE: as _csc_vec; out is (B, M); acc is (M, B) scratch."""
    nb = xt.shape[1]
    nparts = bounds.size - 1
    for t in numba.prange(nparts):
        r0, r1 = bounds[t], bounds[t + 1]
        for i in range(r0, r1):
            for b in range(nb):
                acc[i, b] = bias[i] if has_bias else np.float32(0.0)
        for q in range(n_nz):
            j = nz[q]
            xj = xt[j]
            p0 = split[t, j]
            n = split[t + 1, j] - p0
            d = data[p0:p0 + n]
            ix = indices[p0:p0 + n]
            for p in range(n):
                i = ix[p]
                w = d[p]
                for b in range(nb):
                    acc[i, b] += xj[b] * w
        for b in range(nb):
            for i in range(r0, r1):
                out[b, i] = acc[i, b]


@pjit
def _dense_mat(wt, bounds, xt, nz, n_nz, bias, has_bias, out):
    """Batch B > 1, dense columns. NOTE: as _dense_vec; out is (B, M)."""
    nb = xt.shape[1]
    nparts = bounds.size - 1
    for t in numba.prange(nparts):
        r0, r1 = bounds[t], bounds[t + 1]
        n = r1 - r0
        for b in range(nb):
            row = out[b, r0:r1]
            for i in range(n):
                row[i] = bias[r0 + i] if has_bias else np.float32(0.0)
        for q in range(n_nz):
            j = nz[q]
            col = wt[j, r0:r1]
            for b in range(nb):
                v = xt[j, b]
                if v != 0.0:
                    row = out[b, r0:r1]
                    for i in range(n):
                        row[i] += v * col[i]


def act_sparse_linear(prep: ActLinearPrep, x: np.ndarray, bias: np.ndarray | None, out: np.ndarray) -> None:
    """``out = x @ W.T + bias``, reading only the weight columns of nonzero inputs.

    Parameters
    ----------
    prep : ActLinearPrep
    x : ndarray, shape (B, K), float32, C-contiguous
    bias : ndarray, shape (M,), float32, or None
    out : ndarray, shape (B, M), float32
        Written in full.
    """
    batch = x.shape[0]
    ws = prep.workspace(batch)
    has_bias = bias is not None
    b = bias if has_bias else np.zeros(0, np.float32)
    n_nz = _nonzero_columns(x, ws.nz)
    if batch == 1:
        if prep.dense_columns:
            _dense_vec(prep.dense_t, ws.bounds, x[0], ws.nz, n_nz, b, has_bias, out[0], ws.acc)
        else:
            _csc_vec(prep.indices, prep.data, ws.split, ws.bounds, x[0], ws.nz, n_nz, b, has_bias, out[0])
        return
    np.copyto(ws.xt, x.T)
    if prep.dense_columns:
        _dense_mat(prep.dense_t, ws.bounds, ws.xt, ws.nz, n_nz, b, has_bias, out)
    else:
        _csc_mat(prep.indices, prep.data, ws.split, ws.bounds, ws.xt, ws.nz, n_nz, b, has_bias, out, ws.acc)
