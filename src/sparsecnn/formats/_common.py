"""Shared pieces of the sparse formats: dtype choice, input checks, invariant errors.

Every format stores its integer arrays at the smallest signed width that holds their values
(:func:`index_dtype`, :func:`pointer_dtype`), so that ``nbytes`` is the honest size a compact
implementation would ship, not the int32/int64 that scipy or MKL default to.
"""

from __future__ import annotations

from typing import Any, NoReturn

import numpy as np

from sparsecnn.errors import SparseCNNError
from sparsecnn.kernels.convert import first_unsorted

__all__ = ["index_dtype", "pointer_dtype"]

# Signed widths in the order they are tried; signed because MKL, cuSPARSE and numba all index with
# signed integers, and the one bit lost only matters at exactly 2**15, 2**31 columns.
_INT_DTYPES: tuple[np.dtype, ...] = (np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64))


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SparseCNNError(f"{what} must be an integer, got {value!r}")
    if value < 0:
        raise SparseCNNError(f"{what} must be >= 0, got {value}")
    return int(value)


def _smallest_int(max_value: int, what: str) -> np.dtype:
    for dt in _INT_DTYPES:
        if max_value <= np.iinfo(dt).max:
            return dt
    raise SparseCNNError(f"{what} = {max_value} does not fit in int64; the matrix is too large to store")


def index_dtype(n_cols: int) -> np.dtype:
    """Smallest of int16/int32/int64 that holds every column index ``0 .. n_cols - 1``.

    Parameters
    ----------
    n_cols : int
        Number of columns (block columns for BSR), ``>= 0``.

    Returns
    -------
    numpy.dtype
        ``int16`` up to 32768 columns, ``int32`` up to 2**31 columns, else ``int64``.
    """
    n = _count(n_cols, "number of columns")
    return _smallest_int(max(n - 1, 0), "number of columns")


def pointer_dtype(nnz: int) -> np.dtype:
    """Smallest of int16/int32/int64 that holds every row pointer ``0 .. nnz``.

    Parameters
    ----------
    nnz : int
        Number of stored items the pointers run over (nonzeros, blocks or entries), ``>= 0``.

    Returns
    -------
    numpy.dtype
        ``int16`` up to 32767 items, ``int32`` up to 2**31 - 1, else ``int64``.
    """
    return _smallest_int(_count(nnz, "number of stored items"), "number of stored items")


def to_numpy(a: Any) -> np.ndarray:
    """An ndarray view of ``a``; torch tensors are detached and copied to the CPU (duck-typed, so
    that ``formats`` does not import torch)."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def as_dense_matrix(a: Any, fmt: str) -> np.ndarray:
    """Validate the input of ``from_dense``: a 2-D array of real numbers with no NaN or Inf."""
    arr = to_numpy(a)
    if arr.ndim != 2:
        raise SparseCNNError(
            f"{fmt}.from_dense needs a 2-D matrix, got an array of shape {arr.shape}; "
            "reshape it first (conv weights: sparsecnn.formats.lower_conv_weight)"
        )
    if arr.dtype.kind not in "iuf":
        raise SparseCNNError(
            f"{fmt}.from_dense needs real numbers (float or integer), got dtype {arr.dtype}; "
            "convert it with .astype(np.float32)"
        )
    check_finite(arr, f"{fmt}.from_dense input")
    return arr


def check_finite(values: np.ndarray, what: str) -> None:
    """Raise if a float array holds NaN or Inf (integers are always finite)."""
    if values.dtype.kind != "f" or values.size == 0:
        return
    finite = np.isfinite(values)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        raise SparseCNNError(
            f"{what} contains {len(bad)} NaN/Inf value(s) (first at index {first}); "
            "fix the weights (e.g. torch.nan_to_num, or retrain with a lower learning rate) before converting"
        )


def invalid(fmt: str, invariant: str, detail: str) -> NoReturn:
    """Raise the error ``check_format`` uses: it names the format, the invariant and the evidence."""
    raise SparseCNNError(
        f"invalid {fmt}: {invariant} ({detail}); rebuild it with {fmt}.from_dense or fix the arrays"
    )


def check_shape(shape: Any, fmt: str) -> tuple[int, int]:
    try:
        m, n = shape
        if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in (m, n)):
            raise TypeError
    except (TypeError, ValueError):
        invalid(fmt, "shape must be a pair of integers (M, N)", f"got {shape!r}")
    if m < 0 or n < 0:
        invalid(fmt, "shape must be non-negative", f"got {shape!r}")
    return int(m), int(n)


def check_int_array(arr: Any, name: str, fmt: str) -> None:
    if not isinstance(arr, np.ndarray):
        invalid(fmt, f"{name} must be a numpy array", f"got {type(arr).__name__}")
    if arr.ndim != 1:
        invalid(fmt, f"{name} must be 1-D", f"got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        invalid(fmt, f"{name} must hold integers", f"got dtype {arr.dtype}")


def check_indptr(indptr: Any, n_rows: int, n_items: int, fmt: str, items: str) -> None:
    """``indptr`` has ``n_rows + 1`` entries, starts at 0, never decreases and ends at ``n_items``."""
    check_int_array(indptr, "indptr", fmt)
    if len(indptr) != n_rows + 1:
        invalid(fmt, "indptr must have one entry per row plus one",
                f"len(indptr) = {len(indptr)}, expected {n_rows + 1}")
    if indptr[0] != 0:
        invalid(fmt, "indptr must start at 0", f"indptr[0] = {indptr[0]}")
    steps = np.diff(indptr.astype(np.int64))
    if (steps < 0).any():
        row = int(np.flatnonzero(steps < 0)[0])
        invalid(fmt, "indptr must be non-decreasing",
                f"indptr[{row + 1}] = {indptr[row + 1]} < indptr[{row}] = {indptr[row]}")
    if indptr[-1] != n_items:
        invalid(fmt, f"indptr[-1] must equal the number of stored {items}",
                f"indptr[-1] = {indptr[-1]}, but there are {n_items}")


def check_sorted_rows(indices: np.ndarray, indptr: np.ndarray, fmt: str, what: str) -> None:
    """Within each row the (already range-checked) indices strictly increase."""
    k = first_unsorted(indptr, indices)
    if k >= 0:
        row = int(np.searchsorted(indptr, k, side="right")) - 1
        invalid(fmt, f"{what} must be sorted and unique within each row",
                f"row {row}: index {indices[k - 1]} followed by {indices[k]}")


def sparsity_of(nnz: int, m: int, n: int) -> float:
    """``1 - nnz / (M N)``; an empty matrix has no zeros to skip, so its sparsity is 0."""
    size = m * n
    return 0.0 if size == 0 else 1.0 - nnz / size


def kernel_view(arr: np.ndarray, for_encoding: bool = False) -> np.ndarray:
    """``arr`` as numba can type it: float16, which numba lacks, is reinterpreted as uint16 bits.

    Copying the bits is exact. For encoding, -0.0 (bits 0x8000) is first mapped to +0.0 so that
    "bits != 0" means "value != 0"; the kernels test ``!= 0``.
    """
    if arr.dtype != np.float16:
        return arr
    if for_encoding:
        arr = np.where(arr == 0, np.float16(0), arr)
    return arr.view(np.uint16)


class StoredArrays:
    """Byte accounting shared by the formats (a mixin for their frozen dataclasses).

    ``nbytes`` is exact: the sum of the stored arrays named in ``_ARRAYS`` at their real dtypes.
    Subclasses provide ``shape``, ``data`` and ``nnz``.
    """

    _ARRAYS: tuple[str, ...] = ("data", "indices", "indptr")

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored arrays (values, indices or gaps, pointers)."""
        return int(sum(getattr(self, name).nbytes for name in self._ARRAYS))

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the same matrix stored dense: ``M * N * data.itemsize`` (no block padding)."""
        m, n = self.shape  # type: ignore[attr-defined]
        return m * n * self.data.itemsize  # type: ignore[attr-defined]

    @property
    def sparsity(self) -> float:
        """Fraction of zeros in the logical matrix, ``1 - nnz / (M N)``; 0.0 when it has no elements."""
        return sparsity_of(self.nnz, *self.shape)  # type: ignore[attr-defined]
