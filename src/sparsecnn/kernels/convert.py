"""Dense <-> sparse conversion kernels (CSR and Deep Compression relative indices).

Free functions on raw arrays with the outputs passed in (DESIGN rule 1); ``sparsecnn.formats``
validates, picks the dtypes and allocates. Two passes over the dense matrix (count, then fill), as
scipy's ``csr_count``/``csr_tocsr`` style sparsetools routines do, so no intermediate index array
of the size of the matrix is built.
"""

from __future__ import annotations

import numpy as np

from sparsecnn.kernels._numba import jit

__all__ = [
    "csr_fill",
    "csr_row_counts",
    "csr_scatter",
    "first_unsorted",
    "relative_columns",
    "relative_fill",
    "relative_row_entries",
    "relative_scatter",
]


@jit
def csr_row_counts(a: np.ndarray, counts: np.ndarray) -> None:
    """``counts[i]`` = number of nonzeros in row ``i`` of ``a``.

    NOTE: a is 2-D (M, N); counts has length M.
    """
    m, n = a.shape
    for i in range(m):
        c = 0
        for j in range(n):
            if a[i, j] != 0:
                c += 1
        counts[i] = c


@jit
def csr_fill(a: np.ndarray, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
    """Write the nonzeros of ``a`` row by row, columns ascending.

    NOTE: indptr is the cumulative sum of csr_row_counts(a); indices/data have length indptr[-1]
    and indices' dtype holds N - 1.
    """
    m, n = a.shape
    for i in range(m):
        k = indptr[i]
        for j in range(n):
            v = a[i, j]
            if v != 0:
                indices[k] = j
                data[k] = v
                k += 1


@jit
def csr_scatter(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, out: np.ndarray) -> None:
    """``out[i, indices[k]] = data[k]`` for the entries ``k`` of row ``i``.

    NOTE: out is zero-filled, shape (M, N); the CSR arrays passed check_format.
    """
    m = out.shape[0]
    for i in range(m):
        for k in range(indptr[i], indptr[i + 1]):
            out[i, indices[k]] = data[k]


# Relative indices: Han et al., "Deep Compression", ICLR 2016, Sec. 2 / Fig. 2. The gap of an entry
# is the number of columns skipped since the previous entry of its row (the row start counts as
# column -1); a skip of s columns needs s // period fillers (value 0, gap period - 1), period = 2**bits.


@jit
def relative_row_entries(a: np.ndarray, period: int, counts: np.ndarray) -> None:
    """``counts[i]`` = entries (nonzeros plus fillers) of row ``i`` of ``a``.

    NOTE: a is 2-D (M, N); counts has length M; period >= 1.
    """
    m, n = a.shape
    for i in range(m):
        c = 0
        prev = -1
        for j in range(n):
            if a[i, j] != 0:
                c += (j - prev - 1) // period + 1
                prev = j
        counts[i] = c


@jit
def relative_fill(a: np.ndarray, period: int, indptr: np.ndarray, gaps: np.ndarray, data: np.ndarray) -> None:
    """Write the entries of ``a``: per nonzero its fillers, then the value with the remaining gap.

    NOTE: indptr is the cumulative sum of relative_row_entries(a, period); gaps (unpacked, uint8)
    and data have length indptr[-1].
    """
    m, n = a.shape
    for i in range(m):
        k = indptr[i]
        prev = -1
        for j in range(n):
            v = a[i, j]
            if v != 0:
                skipped = j - prev - 1
                while skipped >= period:
                    gaps[k] = period - 1
                    data[k] = 0
                    k += 1
                    skipped -= period
                gaps[k] = skipped
                data[k] = v
                k += 1
                prev = j


@jit
def relative_columns(indptr: np.ndarray, gaps: np.ndarray, cols: np.ndarray) -> None:
    """``cols[e]`` = absolute column of entry ``e`` (may reach past N in a corrupt matrix).

    NOTE: gaps are unpacked; cols is int64 of length indptr[-1]; indptr is monotone.
    """
    m = len(indptr) - 1
    for i in range(m):
        col = -1
        for e in range(indptr[i], indptr[i + 1]):
            col += np.int64(gaps[e]) + 1
            cols[e] = col


@jit
def relative_scatter(indptr: np.ndarray, gaps: np.ndarray, data: np.ndarray, out: np.ndarray) -> None:
    """Decode into a zero-filled ``out`` of shape (M, N).

    NOTE: the matrix passed check_format (every column < N).
    """
    m = out.shape[0]
    for i in range(m):
        col = -1
        for e in range(indptr[i], indptr[i + 1]):
            col += np.int64(gaps[e]) + 1
            out[i, col] = data[e]


@jit
def first_unsorted(indptr: np.ndarray, indices: np.ndarray) -> int:
    """Position ``k`` of the first index not greater than its predecessor in the same row, or -1.

    A scan for ``check_format`` (one pass, no temporaries: a numpy diff over the nonzeros of a
    4096 x 9216 layer allocates and takes ~0.5 s).
    NOTE: indptr is monotone and ends at len(indices).
    """
    m = len(indptr) - 1
    for i in range(m):
        for k in range(indptr[i] + 1, indptr[i + 1]):
            if indices[k] <= indices[k - 1]:
                return k
    return -1
