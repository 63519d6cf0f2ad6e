"""Conv weights as matrices (Caffe's lowering) and the bytes of a layer in each format.

Caffe computes a convolution as a GEMM of the weight matrix, one per group, with the im2col-lowered
input (Jia et al., "Caffe", 2014; Chellapilla et al., "High Performance Convolutional Neural
Networks for Document Processing", 2006). The weight of group ``g`` is the ``(Cout/g) x
(Cin/g kh kw)`` matrix whose columns run over ``(c, i, j)`` in row-major order; a sparse format
stores that matrix, so a layer's bytes are the sum over its groups.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsecnn.errors import SparseCNNError
from sparsecnn.formats._common import as_dense_matrix, to_numpy
from sparsecnn.formats.bsr import BSRMatrix
from sparsecnn.formats.csr import CSRMatrix
from sparsecnn.formats.relative import RelativeIndexMatrix

__all__ = ["FORMATS", "conv_weight_nbytes", "lower_conv_weight", "matrix_nbytes", "unlower_conv_weight"]

# Names accepted by matrix_nbytes/conv_weight_nbytes. "relative" is the cheaper of the 4- and 8-bit
# relative-index variants for the whole matrix/layer (a decoder uses one width per layer).
FORMATS: tuple[str, ...] = ("dense", "csr", "bsr", "relative", "relative4", "relative8")


def _check_groups(groups: Any) -> int:
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise SparseCNNError(f"groups must be a positive integer, got {groups!r}")
    return int(groups)


def lower_conv_weight(weight: Any, groups: int = 1) -> np.ndarray:
    """Lower a conv weight to one matrix per group (Caffe's layout).

    Parameters
    ----------
    weight : ndarray or torch.Tensor, shape (Cout, Cin/g, kh, kw)
        Conv weight as PyTorch and Caffe store it (a tensor is detached and copied to the CPU).
    groups : int
        Number of groups ``g``; ``Cout`` must be divisible by it (depthwise: ``g = Cin = Cout``).

    Returns
    -------
    ndarray, shape (g, Cout/g, Cin/g * kh * kw)
        A new array: ``lowered[k, o, (c * kh + i) * kw + j] = weight[k * Cout/g + o, c, i, j]``.

    Raises
    ------
    SparseCNNError
        If ``weight`` is not 4-D or ``Cout`` is not a multiple of ``groups``.
    """
    g = _check_groups(groups)
    w = to_numpy(weight)
    if w.ndim != 4:
        raise SparseCNNError(
            f"a conv weight must be 4-D (Cout, Cin/groups, kh, kw), got shape {w.shape}; "
            "a Linear weight is already a matrix"
        )
    c_out = w.shape[0]
    if c_out % g:
        raise SparseCNNError(f"Cout = {c_out} is not divisible by groups = {g}; pass the layer's groups")
    return w.reshape(g, c_out // g, -1).copy()


def unlower_conv_weight(lowered: Any, kernel_size: int | tuple[int, int]) -> np.ndarray:
    """Invert :func:`lower_conv_weight`.

    Parameters
    ----------
    lowered : ndarray or torch.Tensor, shape (g, Cout/g, Cin/g * kh * kw)
        One weight matrix per group.
    kernel_size : int or tuple of int
        ``(kh, kw)``; an int means a square kernel.

    Returns
    -------
    ndarray, shape (Cout, Cin/g, kh, kw)
        A new array.

    Raises
    ------
    SparseCNNError
        If ``lowered`` is not 3-D or its last dimension is not a multiple of ``kh * kw``.
    """
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, (int, np.integer)) else tuple(kernel_size)
    if len(ks) != 2 or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise SparseCNNError(f"kernel_size must be a positive int or a pair (kh, kw), got {kernel_size!r}")
    kh, kw = int(ks[0]), int(ks[1])
    low = to_numpy(lowered)
    if low.ndim != 3:
        raise SparseCNNError(
            f"a lowered conv weight must be 3-D (groups, Cout/groups, Cin/groups*kh*kw), "
            f"got shape {low.shape}"
        )
    g, rows, k = low.shape
    if k % (kh * kw):
        raise SparseCNNError(
            f"the lowered weight has {k} columns, not a multiple of kh*kw = {kh * kw}; check kernel_size"
        )
    return low.reshape(g * rows, k // (kh * kw), kh, kw).copy()


def matrix_nbytes(a: Any, fmt: str, blocksize: tuple[int, int] = (4, 4)) -> int:
    """Exact bytes of one matrix stored in a format.

    Parameters
    ----------
    a : array_like, shape (M, N)
        Real-valued, finite matrix.
    fmt : str
        One of :data:`FORMATS`: ``"dense"`` (``M N`` values), ``"csr"``, ``"bsr"`` (at
        ``blocksize``), ``"relative4"``, ``"relative8"``, or ``"relative"`` (the smaller of the two).
    blocksize : tuple of int
        ``(R, C)`` for ``"bsr"``.

    Returns
    -------
    int
    """
    return _nbytes([to_numpy(a)], fmt, blocksize)


def conv_weight_nbytes(weight: Any, groups: int, fmt: str, blocksize: tuple[int, int] = (4, 4)) -> int:
    """Exact bytes of a layer's weight stored as one matrix per group (summed over the groups).

    Parameters
    ----------
    weight : ndarray or torch.Tensor, shape (Cout, Cin/g, kh, kw) or (Cout, Cin)
        Conv weight, lowered with :func:`lower_conv_weight`; a 2-D (Linear) weight is one matrix
        and needs ``groups = 1``.
    groups : int
        Number of groups of the conv.
    fmt : str
        One of :data:`FORMATS`. ``"relative"`` picks, for the whole layer, the 4- or 8-bit variant
        with fewer bytes (4-bit needs a filler per 16 skipped columns, 8-bit one per 256 but twice
        the index bits); ties go to 4 bits.
    blocksize : tuple of int
        ``(R, C)`` for ``"bsr"``; 4 x 4 by default.

    Returns
    -------
    int
        Bytes of values, indices and pointers (``"dense"``: ``weight.size * itemsize``).

    Raises
    ------
    SparseCNNError
        On an unknown ``fmt``, a bad shape or groups, or NaN/Inf weights.
    """
    w = to_numpy(weight)
    if w.ndim == 2:
        if _check_groups(groups) != 1:
            raise SparseCNNError(f"a 2-D (Linear) weight has no groups; pass groups=1, got {groups}")
        mats = [w]
    else:
        mats = list(lower_conv_weight(w, groups))
    return _nbytes(mats, fmt, blocksize)


def _nbytes(mats: list[np.ndarray], fmt: str, blocksize: tuple[int, int]) -> int:
    if fmt not in FORMATS:
        raise SparseCNNError(f"unknown storage format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "dense":
        return sum(int(as_dense_matrix(mat, "dense").nbytes) for mat in mats)
    if fmt == "csr":
        return sum(CSRMatrix.from_dense(mat).nbytes for mat in mats)
    if fmt == "bsr":
        return sum(BSRMatrix.from_dense(mat, blocksize).nbytes for mat in mats)
    if fmt == "relative":
        return min(_nbytes(mats, "relative4", blocksize), _nbytes(mats, "relative8", blocksize))
    bits = int(fmt[len("relative"):])
    return sum(RelativeIndexMatrix.from_dense(mat, bits).nbytes for mat in mats)
