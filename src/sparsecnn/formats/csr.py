"""Compressed sparse row (CSR) storage with exact byte accounting.

The layout is scipy's (``indptr, indices, data``); the integer arrays use the smallest signed width
that holds them (:func:`~sparsecnn.formats.index_dtype`, :func:`~sparsecnn.formats.pointer_dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsecnn.formats._common import (
    StoredArrays,
    as_dense_matrix,
    check_finite,
    check_indptr,
    check_int_array,
    check_shape,
    check_sorted_rows,
    index_dtype,
    invalid,
    kernel_view,
    pointer_dtype,
)
from sparsecnn.kernels.convert import csr_fill, csr_row_counts, csr_scatter

__all__ = ["CSRMatrix"]


@dataclass(frozen=True, eq=False)
class CSRMatrix(StoredArrays):
    r"""A sparse matrix in compressed sparse row format.

    Row ``i`` holds ``data[indptr[i]:indptr[i+1]]`` at columns ``indices[indptr[i]:indptr[i+1]]``.
    The arrays are validated on construction (:meth:`check_format`).

    .. math::

        \text{nbytes} = \text{nnz}\,(s_v + s_i) + (M + 1)\,s_p

    with :math:`s_v` the value size, :math:`s_i` the column-index size and :math:`s_p` the
    pointer size in bytes. The seed analysis (AlexNet in Caffe with MKL/cuSPARSE CSRMM) uses this
    format; see also Han et al., "Deep Compression", ICLR 2016, Sec. 2 for why the index overhead
    matters.

    Parameters
    ----------
    indptr : ndarray, shape (M + 1,)
        Row pointers into ``indices``/``data``; ``pointer_dtype(nnz)`` when built by :meth:`from_dense`.
    indices : ndarray, shape (nnz,)
        Column of each stored value, strictly increasing within each row; ``index_dtype(N)``.
    data : ndarray, shape (nnz,)
        Stored values, in the dtype of the dense input.
    shape : tuple of int
        ``(M, N)``.

    Examples
    --------
    >>> import numpy as np
    >>> m = CSRMatrix.from_dense(np.array([[0, 1.5, 0, 0], [0, 0, 0, 0], [2, 0, 0, 3]], np.float32))
    >>> m.nnz, m.nbytes  # 3 * 4 (values) + 3 * 2 (int16 columns) + 4 * 2 (int16 pointers)
    (3, 26)
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", check_shape(self.shape, "CSRMatrix"))
        self.check_format()

    @classmethod
    def from_dense(cls, a: Any) -> CSRMatrix:
        """Store exactly the nonzeros of a dense matrix.

        Parameters
        ----------
        a : array_like, shape (M, N)
            Real-valued, finite matrix (a torch tensor is accepted and copied to the CPU).

        Returns
        -------
        CSRMatrix

        Raises
        ------
        SparseCNNError
            If ``a`` is not 2-D, not real-valued, or holds NaN/Inf.
        """
        a = np.ascontiguousarray(as_dense_matrix(a, "CSRMatrix"))
        m, n = a.shape
        work = kernel_view(a, for_encoding=True)
        row_counts = np.empty(m, dtype=np.int64)
        csr_row_counts(work, row_counts)
        nnz = int(row_counts.sum())
        indptr = np.zeros(m + 1, dtype=pointer_dtype(nnz))
        np.cumsum(row_counts, out=indptr[1:])
        indices = np.empty(nnz, dtype=index_dtype(n))
        data = np.empty(nnz, dtype=a.dtype)
        csr_fill(work, indptr, indices, kernel_view(data))
        return cls(indptr=indptr, indices=indices, data=data, shape=(m, n))

    def to_dense(self) -> np.ndarray:
        """The dense matrix, shape (M, N), in the dtype of ``data``."""
        out = np.zeros(self.shape, dtype=self.data.dtype)
        csr_scatter(self.indptr, self.indices, kernel_view(self.data), kernel_view(out))
        return out

    def check_format(self) -> None:
        """Check every invariant of the format.

        Raises
        ------
        SparseCNNError
            Naming the violated invariant: array kinds and lengths, ``indptr`` starting at 0,
            non-decreasing and ending at ``nnz``, column indices in ``[0, N)`` and strictly
            increasing within each row, finite values.
        """
        fmt = "CSRMatrix"
        m, n = check_shape(self.shape, fmt)
        check_int_array(self.indices, "indices", fmt)
        if not isinstance(self.data, np.ndarray) or self.data.ndim != 1:
            invalid(fmt, "data must be a 1-D numpy array", f"got {getattr(self.data, 'shape', self.data)!r}")
        if len(self.indices) != len(self.data):
            invalid(fmt, "indices and data must have the same length",
                    f"{len(self.indices)} indices, {len(self.data)} values")
        check_indptr(self.indptr, m, len(self.data), fmt, "values")
        if len(self.indices):
            lo, hi = int(self.indices.min()), int(self.indices.max())
            if lo < 0 or hi >= n:
                invalid(fmt, f"column indices must lie in [0, {n})", f"found {lo if lo < 0 else hi}")
        check_sorted_rows(self.indices, self.indptr, fmt, "column indices")
        check_finite(self.data, "CSRMatrix.data")

    @property
    def nnz(self) -> int:
        """Number of stored values (scipy's meaning; equals the nonzeros when built by from_dense)."""
        return len(self.data)


    def __repr__(self) -> str:
        return (f"CSRMatrix(shape={self.shape}, nnz={self.nnz}, dtype={self.data.dtype}, "
                f"index={self.indices.dtype}, pointer={self.indptr.dtype}, nbytes={self.nbytes})")
