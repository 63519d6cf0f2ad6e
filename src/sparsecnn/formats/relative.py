"""Deep Compression's relative-index sparse format (Han et al., ICLR 2016, Sec. 2 and Fig. 2).

Instead of an absolute column per value, each stored entry keeps the *gap* from the previous stored
entry of its row in ``index_bits`` = 4 or 8 bits. A gap wider than the span ``2**index_bits - 1``
is bridged by filler zeros, which are stored like any entry. With 4-bit gaps and float32 values an
entry costs 4.5 bytes against CSR's 6 (int16 columns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsecnn.errors import SparseCNNError
from sparsecnn.formats._common import (
    StoredArrays,
    as_dense_matrix,
    check_finite,
    check_indptr,
    check_shape,
    invalid,
    kernel_view,
    pointer_dtype,
)
from sparsecnn.kernels.convert import relative_columns, relative_fill, relative_row_entries, relative_scatter

__all__ = ["RelativeIndexMatrix", "pack_gaps", "unpack_gaps"]

INDEX_BITS: tuple[int, ...] = (4, 8)


def _check_index_bits(index_bits: Any, fmt: str) -> int:
    if isinstance(index_bits, bool) or index_bits not in INDEX_BITS:
        raise SparseCNNError(f"{fmt}: index_bits must be 4 or 8 (bits per gap, packed into bytes), "
                             f"got {index_bits!r}; pass index_bits=4 or index_bits=8")
    return int(index_bits)


def pack_gaps(gaps: np.ndarray, index_bits: int) -> np.ndarray:
    """Pack gap values into bytes.

    Parameters
    ----------
    gaps : ndarray, shape (n_entries,)
        Gaps, each in ``[0, 2**index_bits - 1]`` (not checked here).
    index_bits : int
        4 (two gaps per byte, entry ``2k`` in the low nibble of byte ``k``, entry ``2k + 1`` in the
        high nibble; a trailing unused nibble is 0) or 8 (one byte per gap).

    Returns
    -------
    ndarray, shape (ceil(n_entries * index_bits / 8),), dtype uint8
    """
    g = np.asarray(gaps).astype(np.uint8)
    if index_bits == 8:
        return g
    if len(g) % 2:
        g = np.append(g, np.uint8(0))
    return (g[0::2] | (g[1::2] << 4)).astype(np.uint8)


def unpack_gaps(packed: np.ndarray, n_entries: int, index_bits: int) -> np.ndarray:
    """Inverse of :func:`pack_gaps`: gaps, shape (n_entries,), dtype uint8."""
    if index_bits == 8:
        return packed[:n_entries]
    out = np.empty(2 * len(packed), dtype=np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:n_entries]


@dataclass(frozen=True, eq=False)
class RelativeIndexMatrix(StoredArrays):
    r"""A sparse matrix in Deep Compression's relative-index format.

    Row-wise: entry ``e`` of row ``i`` (``indptr[i] <= e < indptr[i+1]``) sits at column

    .. math::

        \text{col}_e = \text{col}_{e-1} + \text{gap}_e + 1, \qquad \text{col}_{-1} = -1,

    so the gap is the number of columns skipped since the previous entry of the row (or since the
    row start). A gap is at most the span :math:`2^b - 1` (15 or 255); a longer run of zeros is
    bridged by filler entries (value 0, gap = span), one per :math:`2^b` columns skipped. The paper
    counts the difference ``col_e - col_{e-1}`` (1 .. 2**b) rather than the gap (0 .. 2**b - 1);
    the two encodings need the same fillers and the same bits. Trailing zeros of a row need no
    filler: ``indptr`` ends the row.

    .. math::

        \text{nbytes} = n_e\,s_v + \lceil n_e\,b / 8 \rceil + (M + 1)\,s_p

    Reference: S. Han, H. Mao, W. J. Dally, "Deep Compression: Compressing Deep Neural Networks with
    Pruning, Trained Quantization and Huffman Coding", ICLR 2016, Sec. 2, Fig. 2.

    Parameters
    ----------
    indptr : ndarray, shape (M + 1,)
        Row pointers over entries (fillers included); ``pointer_dtype(n_entries)``.
    gaps : ndarray, shape (ceil(n_entries * index_bits / 8),), dtype uint8
        Packed gaps (see :func:`pack_gaps`); unpacked by :attr:`gap_values`.
    data : ndarray, shape (n_entries,)
        Values, fillers (zeros) included, in the dtype of the dense input.
    shape : tuple of int
        ``(M, N)``.
    index_bits : int
        Bits per gap, 4 or 8.

    Notes
    -----
    The fields follow scipy's order (``indptr``, then the index array, then ``data``); pass them by
    keyword.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros((1, 40), np.float32); a[0, 0] = 1; a[0, 39] = 2
    >>> m = RelativeIndexMatrix.from_dense(a, index_bits=4)
    >>> m.gap_values.tolist(), m.n_fillers  # columns 0, 16 (filler), 32 (filler), 39
    ([0, 15, 15, 6], 2)
    """

    _ARRAYS = ("data", "gaps", "indptr")

    indptr: np.ndarray
    gaps: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]
    # 4: the narrowest width that packs into bytes; Deep Compression itself used 8 bits for conv
    # and 5 for FC layers (Sec. 2), which our 8-bit variant covers from above.
    index_bits: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", check_shape(self.shape, "RelativeIndexMatrix"))
        object.__setattr__(self, "index_bits", _check_index_bits(self.index_bits, "RelativeIndexMatrix"))
        self.check_format()

    @classmethod
    def from_dense(cls, a: Any, index_bits: int = 4) -> RelativeIndexMatrix:
        """Encode the nonzeros of a dense matrix with relative indices and filler zeros.

        Parameters
        ----------
        a : array_like, shape (M, N)
            Real-valued, finite matrix (a torch tensor is accepted and copied to the CPU).
        index_bits : int
            4 or 8 bits per gap (span 15 or 255).

        Returns
        -------
        RelativeIndexMatrix

        Raises
        ------
        SparseCNNError
            If ``a`` is not 2-D, not real-valued, holds NaN/Inf, or ``index_bits`` is not 4 or 8.
        """
        bits = _check_index_bits(index_bits, "RelativeIndexMatrix.from_dense")
        a = np.ascontiguousarray(as_dense_matrix(a, "RelativeIndexMatrix"))
        m, n = a.shape
        period = 1 << bits  # a filler advances the column by span + 1 = 2**bits
        work = kernel_view(a, for_encoding=True)
        row_entries = np.empty(m, dtype=np.int64)
        relative_row_entries(work, period, row_entries)
        n_entries = int(row_entries.sum())
        indptr = np.zeros(m + 1, dtype=pointer_dtype(n_entries))
        np.cumsum(row_entries, out=indptr[1:])
        gaps = np.empty(n_entries, dtype=np.uint8)
        data = np.empty(n_entries, dtype=a.dtype)
        relative_fill(work, period, indptr, gaps, kernel_view(data))
        return cls(indptr=indptr, gaps=pack_gaps(gaps, bits), data=data, shape=(m, n), index_bits=bits)

    @property
    def gap_values(self) -> np.ndarray:
        """Unpacked gaps, shape (n_entries,), dtype uint8."""
        return unpack_gaps(self.gaps, len(self.data), self.index_bits)

    def to_dense(self) -> np.ndarray:
        """The dense matrix, shape (M, N), in the dtype of ``data``."""
        out = np.zeros(self.shape, dtype=self.data.dtype)
        relative_scatter(self.indptr, self.gap_values, kernel_view(self.data), kernel_view(out))
        return out

    def check_format(self) -> None:
        """Check every invariant of the format.

        Raises
        ------
        SparseCNNError
            Naming the violated invariant: ``index_bits`` 4 or 8; ``gaps`` uint8 of the packed
            length with a zero trailing nibble; ``indptr`` over entries (starting at 0,
            non-decreasing, ending at ``n_entries``); every column inside ``[0, N)``; a stored zero
            only as a filler (gap = span, not the last entry of its row); finite values.
        """
        fmt = "RelativeIndexMatrix"
        m, n = check_shape(self.shape, fmt)
        bits = self.index_bits
        if isinstance(bits, bool) or bits not in INDEX_BITS:
            invalid(fmt, "index_bits must be 4 or 8", f"got {bits!r}")
        data = self.data
        if not isinstance(data, np.ndarray) or data.ndim != 1:
            invalid(fmt, "data must be a 1-D numpy array", f"got {getattr(data, 'shape', data)!r}")
        n_entries = len(data)
        gaps = self.gaps
        if not isinstance(gaps, np.ndarray) or gaps.ndim != 1 or gaps.dtype != np.uint8:
            invalid(fmt, "gaps must be a 1-D uint8 array",
                    f"got {type(gaps).__name__} {getattr(gaps, 'dtype', '')} {getattr(gaps, 'shape', '')}")
        n_packed = -(-n_entries * bits // 8)
        if len(gaps) != n_packed:
            invalid(fmt, f"gaps must hold {bits}-bit gaps for every entry, packed",
                    f"len(gaps) = {len(gaps)}, expected {n_packed} for {n_entries} entries")
        if bits == 4 and n_entries % 2 and gaps[-1] >> 4:
            invalid(fmt, "the unused high nibble of the last gap byte must be 0", f"got {gaps[-1]:#04x}")
        check_indptr(self.indptr, m, n_entries, fmt, "entries")
        check_finite(data, "RelativeIndexMatrix.data")
        if n_entries == 0:
            return
        gap_values = self.gap_values
        cols = np.empty(n_entries, dtype=np.int64)
        relative_columns(self.indptr, gap_values, cols)
        ptr = self.indptr.astype(np.int64)
        row_last = ptr[1:][ptr[1:] > ptr[:-1]] - 1
        if cols[row_last].max() >= n:
            e = int(row_last[np.argmax(cols[row_last])])
            row = int(np.searchsorted(ptr, e, side="right")) - 1
            invalid(fmt, f"the gaps of a row must stay inside its {n} columns",
                    f"row {row} reaches column {cols[e]}")
        fillers = np.flatnonzero(data == 0)
        span = (1 << bits) - 1
        if len(fillers):
            if (gap_values[fillers] != span).any():
                e = int(fillers[np.argmax(gap_values[fillers] != span)])
                invalid(fmt, f"a stored zero must be a filler with gap {span}",
                        f"entry {e} is 0 with gap {gap_values[e]}")
        if (data[row_last] == 0).any():
            e = int(row_last[np.argmax(data[row_last] == 0)])
            invalid(fmt, "a row must not end with a filler zero", f"entry {e}")

    @property
    def n_entries(self) -> int:
        """Number of stored entries, fillers included."""
        return len(self.data)

    @property
    def nnz(self) -> int:
        """Number of true nonzeros (fillers excluded)."""
        return int(np.count_nonzero(self.data))

    @property
    def n_fillers(self) -> int:
        """Number of filler zeros."""
        return self.n_entries - self.nnz


    def __repr__(self) -> str:
        return (f"RelativeIndexMatrix(shape={self.shape}, index_bits={self.index_bits}, nnz={self.nnz}, "
                f"n_fillers={self.n_fillers}, dtype={self.data.dtype}, nbytes={self.nbytes})")
