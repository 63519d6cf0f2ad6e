"""GEMM dimensions, FLOPs and storage bytes of conv and linear layers.

A conv is counted the way Caffe computes it (im2col + one GEMM per group): group ``k`` multiplies the
``M x K`` weight matrix, ``M = Cout/g`` and ``K = Cin/g kh kw``, by the ``K x N`` lowered input,
``N = Hout Wout``, per image. A Linear layer is one ``M x K`` weight (``M = out``, ``K = in``) times
the ``K x N`` batch, ``N`` = batch size.

FLOPs count a multiply and an add as two. Dense FLOPs are ``2 g M K N`` per image; the nonzero FLOPs
a sparse kernel cannot avoid are ``2 nnz N``, the best case a sparse kernel can reach (seed study:
"a sparse kernel at sparsity s can at best run in (1 - s) of the dense time").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsecnn.errors import SparseCNNError
from sparsecnn.formats import conv_weight_nbytes

__all__ = [
    "CompactGemm",
    "GemmDims",
    "StorageBytes",
    "compact_gemm",
    "gemm_dims",
    "layer_flops",
    "weight_nbytes",
]


@dataclass(frozen=True)
class GemmDims:
    """The lowered GEMM ``C (M x N) = A (M x K) B (K x N)`` of a layer, per group."""

    groups: int  # g: number of independent GEMMs (1 for Linear)
    m: int  # rows of the weight matrix per group: Cout/g, or out_features
    k: int  # reduction length: Cin/g * kh * kw, or in_features
    n: int  # conv: Hout * Wout (one image); linear: batch size


def gemm_dims(module: nn.Module, output_shape: tuple[int, ...]) -> GemmDims:
    """GEMM dimensions of a Conv2d or Linear given the shape of its output.

    Parameters
    ----------
    module : Conv2d or Linear
    output_shape : tuple of int
        ``(N, Cout, Hout, Wout)`` for a conv; ``(batch, out)`` for a Linear (any leading dims are
        folded into the batch).
    """
    if isinstance(module, nn.Conv2d):
        if len(output_shape) != 4:
            raise SparseCNNError(f"a Conv2d output must be (N, C, H, W), got {output_shape}")
        g = module.groups
        c_out, c_in_g, kh, kw = module.weight.shape
        return GemmDims(groups=g, m=c_out // g, k=c_in_g * kh * kw, n=output_shape[2] * output_shape[3])
    if isinstance(module, nn.Linear):
        batch = 1
        for d in output_shape[:-1]:
            batch *= d
        return GemmDims(groups=1, m=module.out_features, k=module.in_features, n=batch)
    raise SparseCNNError(f"gemm_dims supports Conv2d and Linear, got {type(module).__name__}")


def layer_flops(dims: GemmDims, nnz: int, linear: bool) -> tuple[int, int]:
    """``(dense, nonzero)`` FLOPs of a layer for one image.

    Dense: ``2 g M K N``; nonzero: ``2 nnz N``, where ``N`` is ``Hout Wout`` for a conv and 1 for
    a Linear layer (one image is one column of the batch).
    """
    n = 1 if linear else dims.n
    return 2 * dims.groups * dims.m * dims.k * n, 2 * nnz * n


@dataclass(frozen=True)
class CompactGemm:
    """The dense GEMM left of a layer once its all-zero rows and columns are dropped (SSL's lowering,
    Wen et al., NIPS 2016): structured zeros shrink it, scattered zeros leave it as large as dense."""

    rows: int  # kept weight rows (filters with a nonzero), summed over groups
    cols: int  # kept lowered columns (Cin/g kh kw positions with a nonzero), summed over groups
    total_rows: int  # g M
    total_cols: int  # g K
    dense_flops: int  # 2 g M K N
    compact_flops: int  # 2 sum_g rows_g cols_g N
    nonzero_flops: int  # 2 nnz N: what an index-based kernel cannot avoid

    @property
    def ideal(self) -> float:
        """Dense FLOPs over the compact GEMM's: the speedup shrinking can reach at best."""
        return self.dense_flops / max(self.compact_flops, 1)

    @property
    def nonzero_ideal(self) -> float:
        """Dense FLOPs over the nonzero FLOPs: ``1 / (1 - s)`` at sparsity ``s``."""
        return self.dense_flops / max(self.nonzero_flops, 1)


def compact_gemm(module: nn.Conv2d | nn.Linear, output_shape: tuple[int, ...],
                 dense_flops: int | None = None) -> CompactGemm:
    """Kept rows, kept columns and FLOPs of ``module``'s compact GEMM for one image.

    Parameters
    ----------
    module : Conv2d or Linear
    output_shape : tuple of int
        The module's output shape, as for :func:`gemm_dims`.
    dense_flops : int, optional
        The dense FLOPs to compare with (default: ``module``'s own). Pass the unshrunk layer's when
        ``module`` is a layer already shrunk by :func:`sparsecnn.shrink.shrink`.
    """
    dims = gemm_dims(module, output_shape)
    n = 1 if isinstance(module, nn.Linear) else dims.n
    w = module.weight.detach().to("cpu").reshape(dims.groups, dims.m, dims.k) != 0
    rows = w.any(dim=2).sum(dim=1)  # (g,)
    cols = w.any(dim=1).sum(dim=1)  # (g,)
    own, nonzero = layer_flops(dims, int(w.sum()), isinstance(module, nn.Linear))
    return CompactGemm(
        rows=int(rows.sum()),
        cols=int(cols.sum()),
        total_rows=dims.groups * dims.m,
        total_cols=dims.groups * dims.k,
        dense_flops=own if dense_flops is None else int(dense_flops),
        compact_flops=2 * int((rows * cols).sum()) * n,
        nonzero_flops=nonzero,
    )


@dataclass(frozen=True)
class StorageBytes:
    """Exact bytes of a layer's weight (float32 values) in each format; biases are not included."""

    dense: int  # M K values per group
    csr: int  # values + column indices + row pointers, per group (sparsecnn.formats.CSRMatrix)
    bsr: int  # 4x4 blocks: block values + block column indices + block row pointers
    relative: int  # Deep Compression relative indices, the cheaper of 4- and 8-bit gaps for the layer


def weight_nbytes(module: nn.Conv2d | nn.Linear) -> StorageBytes:
    """Bytes of ``module.weight`` stored dense, CSR, BSR (4x4) and with relative indices.

    A conv weight is stored as one matrix per group (Caffe's lowering) and the groups' bytes are
    summed. Values are counted as float32 whatever the module's dtype.
    """
    groups = module.groups if isinstance(module, nn.Conv2d) else 1
    w = module.weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    return StorageBytes(
        dense=conv_weight_nbytes(w, groups, "dense"),
        csr=conv_weight_nbytes(w, groups, "csr"),
        bsr=conv_weight_nbytes(w, groups, "bsr", (4, 4)),
        relative=conv_weight_nbytes(w, groups, "relative"),
    )
