"""Block sparse row (BSR) storage with exact byte accounting.

The matrix is cut into ``R x C`` blocks and CSR is applied to the blocks: one column index per
stored block instead of one per value, at the price of storing the zeros inside each block. This is
the format that structured (block) pruning targets; cf. Narang et al., "Block-Sparse Recurrent
Neural Networks", 2017, and Wen et al., "Learning Structured Sparsity in Deep Neural Networks"
(SSL), NeurIPS 2016.
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
    check_int_array,
    check_shape,
    check_sorted_rows,
    index_dtype,
    invalid,
    pointer_dtype,
)

__all__ = ["BSRMatrix"]


def _check_blocksize(blocksize: Any, fmt: str) -> tuple[int, int]:
    try:
        r, c = blocksize
        ok = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1 for x in (r, c))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SparseCNNError(
            f"{fmt}: blocksize must be a pair of positive integers (R, C), got {blocksize!r}; "
            "use e.g. blocksize=(4, 4)"
        )
    return int(r), int(c)


def _n_blocks(size: int, block: int) -> int:
    return -(-size // block)


@dataclass(frozen=True, eq=False)
class BSRMatrix(StoredArrays):
    r"""A sparse matrix in block sparse row format.

    The logical ``(M, N)`` matrix is padded with zeros to ``(MB R, NB C)``, with
    :math:`MB = \lceil M/R \rceil` block rows and :math:`NB = \lceil N/C \rceil` block columns;
    block row ``i`` holds the blocks ``data[indptr[i]:indptr[i+1]]`` at block columns
    ``indices[indptr[i]:indptr[i+1]]``. A block is stored iff it holds a nonzero.

    .. math::

        \text{nbytes} = n_b\,(R\,C\,s_v + s_i) + (MB + 1)\,s_p

    Parameters
    ----------
    indptr : ndarray, shape (MB + 1,)
        Block-row pointers into ``indices``/``data``; ``pointer_dtype(nblocks)``.
    indices : ndarray, shape (nblocks,)
        Block column of each stored block, strictly increasing within a block row; ``index_dtype(NB)``.
    data : ndarray, shape (nblocks, R, C)
        Stored blocks, in the dtype of the dense input; entries that fall outside the logical
        shape (padding of the edge blocks) are zero.
    shape : tuple of int
        Logical ``(M, N)``; :meth:`to_dense` crops the padding.
    blocksize : tuple of int
        ``(R, C)``.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros((4, 6), np.float32); a[0, 0] = 1; a[3, 5] = 2
    >>> m = BSRMatrix.from_dense(a, blocksize=(2, 2))
    >>> m.nblocks, m.nbytes  # 2 blocks * 16 B + 2 int16 block columns + 3 int16 pointers
    (2, 42)
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]
    blocksize: tuple[int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", check_shape(self.shape, "BSRMatrix"))
        object.__setattr__(self, "blocksize", _check_blocksize(self.blocksize, "BSRMatrix"))
        self.check_format()

    @classmethod
    def from_dense(cls, a: Any, blocksize: tuple[int, int] = (4, 4)) -> BSRMatrix:
        """Store every ``R x C`` block of a dense matrix that holds a nonzero.

        Parameters
        ----------
        a : array_like, shape (M, N)
            Real-valued, finite matrix (a torch tensor is accepted and copied to the CPU).
        blocksize : tuple of int
            ``(R, C)``; 4 x 4 by default, the block size block pruning usually targets. ``M`` and
            ``N`` need not be multiples: the edge blocks are padded with zeros.

        Returns
        -------
        BSRMatrix

        Raises
        ------
        SparseCNNError
            If ``a`` is not 2-D, not real-valued, holds NaN/Inf, or ``blocksize`` is not positive.
        """
        r, c = _check_blocksize(blocksize, "BSRMatrix.from_dense")
        a = as_dense_matrix(a, "BSRMatrix")
        m, n = a.shape
        mb, nb = _n_blocks(m, r), _n_blocks(n, c)
        if (mb * r, nb * c) != (m, n):
            padded = np.zeros((mb * r, nb * c), dtype=a.dtype)
            padded[:m, :n] = a
        else:
            padded = np.ascontiguousarray(a)
        blocks = padded.reshape(mb, r, nb, c)
        stored = (blocks != 0).any(axis=(1, 3))
        block_rows, block_cols = np.nonzero(stored)
        nblocks = len(block_rows)
        indptr = np.zeros(mb + 1, dtype=pointer_dtype(nblocks))
        np.cumsum(np.count_nonzero(stored, axis=1), out=indptr[1:])
        # Advanced indices split by a slice move to the front: (nblocks, R, C).
        data = blocks[block_rows, :, block_cols, :]
        indices = block_cols.astype(index_dtype(nb))
        return cls(indptr=indptr, indices=indices, data=data, shape=(m, n), blocksize=(r, c))

    def to_dense(self) -> np.ndarray:
        """The dense matrix, shape (M, N), in the dtype of ``data`` (the padding is cropped)."""
        m, n = self.shape
        r, c = self.blocksize
        mb, nb = _n_blocks(m, r), _n_blocks(n, c)
        padded = np.zeros((mb * r, nb * c), dtype=self.data.dtype)
        block_rows = np.repeat(np.arange(mb), np.diff(self.indptr.astype(np.int64)))
        padded.reshape(mb, r, nb, c)[block_rows, :, self.indices, :] = self.data
        return padded if (mb * r, nb * c) == (m, n) else np.ascontiguousarray(padded[:m, :n])

    def check_format(self) -> None:
        """Check every invariant of the format.

        Raises
        ------
        SparseCNNError
            Naming the violated invariant: ``data`` of shape ``(nblocks, R, C)``, ``indptr`` over
            block rows (starting at 0, non-decreasing, ending at ``nblocks``), block columns in
            ``[0, NB)`` and strictly increasing within a block row, zero padding in edge blocks,
            finite values.
        """
        fmt = "BSRMatrix"
        m, n = check_shape(self.shape, fmt)
        r, c = _check_blocksize(self.blocksize, fmt)
        mb, nb = _n_blocks(m, r), _n_blocks(n, c)
        check_int_array(self.indices, "indices", fmt)
        data = self.data
        if not isinstance(data, np.ndarray) or data.ndim != 3 or data.shape[1:] != (r, c):
            invalid(fmt, f"data must be an array of shape (nblocks, {r}, {c})",
                    f"got {getattr(data, 'shape', data)!r}")
        if len(self.indices) != len(data):
            invalid(fmt, "indices and data must have one entry per block",
                    f"{len(self.indices)} indices, {len(data)} blocks")
        check_indptr(self.indptr, mb, len(data), fmt, "blocks")
        if len(self.indices):
            lo, hi = int(self.indices.min()), int(self.indices.max())
            if lo < 0 or hi >= nb:
                invalid(fmt, f"block column indices must lie in [0, {nb})", f"found {lo if lo < 0 else hi}")
        check_sorted_rows(self.indices, self.indptr, fmt, "block column indices")
        check_finite(data, "BSRMatrix.data")
        if m % r and len(data):
            last_row = data[int(self.indptr[mb - 1]):, m % r:, :]
            if last_row.any():
                invalid(fmt, "padding rows of the last block row must be zero",
                        f"rows {m}..{mb * r - 1} hold nonzeros")
        if n % c and len(data):
            if data[self.indices == nb - 1][:, :, n % c:].any():
                invalid(fmt, "padding columns of the last block column must be zero",
                        f"columns {n}..{nb * c - 1} hold nonzeros")

    @property
    def nblocks(self) -> int:
        """Number of stored blocks."""
        return len(self.data)

    @property
    def nnz(self) -> int:
        """Number of nonzero values (the zeros stored inside blocks are not counted)."""
        return int(np.count_nonzero(self.data))


    def __repr__(self) -> str:
        return (f"BSRMatrix(shape={self.shape}, blocksize={self.blocksize}, nblocks={self.nblocks}, "
                f"nnz={self.nnz}, dtype={self.data.dtype}, nbytes={self.nbytes})")
