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

__all__ = ["GemmDims", "StorageBytes", "gemm_dims", "layer_flops", "weight_nbytes"]


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
