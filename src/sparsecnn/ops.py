"""Validated matrix-level entry points over the numba kernels.

Each function checks shapes and dtypes once, allocates what the caller did not pass, and dispatches to
a kernel in :mod:`sparsecnn.kernels`. They work in float32 (the dtype every kernel is compiled and
tested for); other real inputs are converted, with a copy. The sweep benchmark times these; the
layers in :mod:`sparsecnn.layers` call the kernels directly with workspaces they keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsecnn.errors import SparseCNNError
from sparsecnn.formats import BSRMatrix, CSRMatrix

__all__ = ["bsr_matmul", "conv_geometry", "csr_matmul", "csr_spgemm", "im2col"]


def _as_f32(a: Any, what: str, ndim: int) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # a torch tensor, without importing torch
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.ndim != ndim:
        raise SparseCNNError(f"{what} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise SparseCNNError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _out(out: np.ndarray | None, shape: tuple[int, ...], what: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.float32:
        got = (getattr(out, "shape", None), getattr(out, "dtype", type(out).__name__))
        raise SparseCNNError(f"{what}: out must be a float32 ndarray of shape {shape}, got {got}")
    if not out.flags.c_contiguous:
        raise SparseCNNError(f"{what}: out must be C-contiguous; pass np.empty({shape}, np.float32)")
    return out


def _check_inner(a_shape: tuple[int, int], b_shape: tuple[int, ...], what: str) -> None:
    if a_shape[1] != b_shape[0]:
        raise SparseCNNError(
            f"{what}: inner dimensions differ: A is {a_shape[0]} x {a_shape[1]}, B is "
            f"{b_shape[0]} x {b_shape[1]}; B needs {a_shape[1]} rows"
        )


def csr_matmul(a: CSRMatrix, b: Any, out: np.ndarray | None = None) -> np.ndarray:
    """Sparse times dense: ``A @ B`` with ``A`` in CSR (row-wise SpMM, the seed's CSRMM).

    Parameters
    ----------
    a : CSRMatrix, shape (M, K)
    b : array_like, shape (K, N)
        Converted to C-contiguous float32 (a copy when it is not already).
    out : ndarray of float32, shape (M, N), optional
        Preallocated, C-contiguous result; allocated when omitted.

    Returns
    -------
    ndarray of float32, shape (M, N)
    """
    from sparsecnn.kernels.spmm import csr_conv_matmul

    if not isinstance(a, CSRMatrix):
        raise SparseCNNError(f"csr_matmul: A must be a CSRMatrix, got {type(a).__name__}")
    b = _as_f32(b, "csr_matmul: B", 2)
    _check_inner(a.shape, b.shape, "csr_matmul")
    m, n = a.shape[0], b.shape[1]
    out = _out(out, (m, n), "csr_matmul")
    data = np.ascontiguousarray(a.data, dtype=np.float32)
    csr_conv_matmul(a.indptr, a.indices, data, b[None, None], np.zeros(m, np.float32), out[None])
    return out


def bsr_matmul(a: BSRMatrix, b: Any, out: np.ndarray | None = None) -> np.ndarray:
    """Block-sparse times dense: ``A @ B`` with ``A`` in BSR (``R x C`` blocks).

    Parameters
    ----------
    a : BSRMatrix, shape (M, K)
    b : array_like, shape (K, N)
    out : ndarray of float32, shape (M, N), optional

    Returns
    -------
    ndarray of float32, shape (M, N)
    """
    from sparsecnn.kernels.spmm import bsr_conv_matmul

    if not isinstance(a, BSRMatrix):
        raise SparseCNNError(f"bsr_matmul: A must be a BSRMatrix, got {type(a).__name__}")
    b = _as_f32(b, "bsr_matmul: B", 2)
    _check_inner(a.shape, b.shape, "bsr_matmul")
    m, k = a.shape
    n = b.shape[1]
    r = a.blocksize[0]
    out = _out(out, (m, n), "bsr_matmul")
    data = np.ascontiguousarray(a.data, dtype=np.float32)
    m_pad = -(-m // r) * r
    bsr_conv_matmul(a.indptr, a.indices, data, k, m, m_pad, b[None, None], np.zeros(m, np.float32), out[None])
    return out


def csr_spgemm(a: CSRMatrix, b: CSRMatrix) -> np.ndarray:
    """Sparse times sparse with a dense result: ``A @ B``, both in CSR (Gustavson's algorithm).

    Parameters
    ----------
    a : CSRMatrix, shape (M, K)
    b : CSRMatrix, shape (K, N)

    Returns
    -------
    ndarray of float32, shape (M, N)
    """
    from sparsecnn.kernels.spgemm import csr_spgemm_conv

    for name, m in (("A", a), ("B", b)):
        if not isinstance(m, CSRMatrix):
            raise SparseCNNError(f"csr_spgemm: {name} must be a CSRMatrix, got {type(m).__name__}")
    _check_inner(a.shape, b.shape, "csr_spgemm")
    m, k = a.shape
    n = b.shape[1]
    out = np.empty((m, n), dtype=np.float32)
    if k == 0:
        out[:] = 0.0
        return out
    csr_spgemm_conv(
        a.indptr, a.indices, np.ascontiguousarray(a.data, dtype=np.float32),
        b.indptr, b.indices, np.ascontiguousarray(b.data, dtype=np.float32),
        1, k, np.zeros(m, np.float32), out[None],
    )
    return out


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    else:
        try:
            a, b = value  # type: ignore[misc]
            pair = (int(a), int(b))
        except (TypeError, ValueError):
            raise SparseCNNError(f"{what} must be an int or a pair of ints, got {value!r}") from None
    return pair


def conv_geometry(
    x_shape: tuple[int, int, int, int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validate a convolution's parameters against an input shape.

    Returns
    -------
    (kernel_size, stride, padding, dilation, (Hout, Wout)) : pairs of int
    """
    from sparsecnn.kernels.lowering import conv_out_size

    ks = _pair(kernel_size, "kernel_size")
    st = _pair(stride, "stride")
    pd = _pair(padding, "padding")
    dl = _pair(dilation, "dilation")
    if min(ks) < 1 or min(st) < 1 or min(dl) < 1 or min(pd) < 0:
        raise SparseCNNError(
            f"kernel_size, stride and dilation must be >= 1 and padding >= 0; got kernel_size={ks}, "
            f"stride={st}, padding={pd}, dilation={dl}"
        )
    _, cin, h, w = x_shape
    if groups < 1 or cin % groups:
        raise SparseCNNError(f"groups={groups} must be >= 1 and divide the {cin} input channels")
    hout = conv_out_size(h, ks[0], st[0], pd[0], dl[0])
    wout = conv_out_size(w, ks[1], st[1], pd[1], dl[1])
    if hout < 1 or wout < 1:
        raise SparseCNNError(
            f"input {h}x{w} is too small for kernel {ks}, padding {pd}, dilation {dl}: output {hout}x{wout}"
        )
    return ks, st, pd, dl, (hout, wout)


def im2col(
    x: Any,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> np.ndarray:
    """Lower a convolution input (Caffe's im2col, per group).

    Parameters
    ----------
    x : array_like, shape (B, Cin, H, W)
    kernel_size, stride, padding, dilation : int or pair of int
    groups : int

    Returns
    -------
    ndarray of float32, shape (B, groups, Cin/groups * kh * kw, Hout * Wout)
        Row ``k = (c kh + i) kw + j`` of group ``g`` holds input channel ``g Cin/groups + c`` under
        kernel tap ``(i, j)`` for every output pixel, so that ``conv = W_g @ cols[b, g]`` with
        ``W_g = weight[g Cout/groups : (g+1) Cout/groups].reshape(Cout/groups, -1)``.
    """
    from sparsecnn.kernels.lowering import full_rows
    from sparsecnn.kernels.lowering import im2col as _im2col

    x = _as_f32(x, "im2col: x", 4)
    ks, st, pd, dl, (hout, wout) = conv_geometry(x.shape, kernel_size, stride, padding, dilation, groups)
    b, cin = x.shape[:2]
    k = cin // groups * ks[0] * ks[1]
    out = np.empty((b, groups, k, hout * wout), dtype=np.float32)
    _im2col(x, ks[0], ks[1], st[0], st[1], pd[0], pd[1], dl[0], dl[1], full_rows(groups, k), out)
    return out
