"""Drop-in sparse layers and ``sparsify``: run a pruned model's convolutions and linears sparse.

A :class:`SparseConv2d` or :class:`SparseLinear` is built from a dense layer and a *strategy*, the way
the layer is executed (see :func:`strategies`). It keeps the weights in that strategy's format, the
conversion time and the workspaces its kernels need (cached per input shape, so a steady stream of
same-shaped inputs allocates nothing but the output). The layers are for inference: no autograd.

Convolution strategies (each supports batch >= 1, stride, padding, dilation, groups and bias):

``torch``    keep torch's own ``F.conv2d`` (oneDNN on the CPU): the baseline and the fallback.
``dense``    im2col lowering + dense GEMM through ``torch.matmul`` (Caffe's GEMM path).
``csrmm``    CSR weights x dense lowered input (Caffe's sparse branch, the seed's CSRMM).
``direct``   direct sparse convolution without im2col (Park et al., ICLR 2017).
``lowered``  SSL lowering: drop all-zero filters and all-zero lowered columns, compact dense GEMM,
             scatter back (Wen et al., NIPS 2016).
``bsr``      block-sparse (R x C) weights x dense lowered input.
``spgemm``   CSR weights x the lowered input stored as CSR (zeros from ReLU), dense output.

Linear strategies: ``torch`` (``F.linear``), ``dense`` (``torch.addmm``), ``spmv`` and ``spmm``
(CSR weights; both run :func:`sparsecnn.kernels.spmv.sparse_linear`, which is a sparse matrix-vector
product at batch 1 and a sparse x dense product at batch > 1; the names tell the planner which case
a layer was chosen for).

A layer a strategy cannot run (``padding_mode`` other than zeros, weights that are not float32, a
``padding="same"`` that needs asymmetric padding) falls back to ``torch`` with a warning naming the
layer and the reason. NaN or Inf weights are rejected at conversion.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsecnn.errors import SparseCNNError

__all__ = ["LoweredWeight", "SparseConv2d", "SparseLinear", "sparsify", "strategies"]

_CONV_STRATEGIES: tuple[str, ...] = ("torch", "dense", "csrmm", "direct", "lowered", "bsr", "spgemm")
_LINEAR_STRATEGIES: tuple[str, ...] = ("torch", "dense", "spmv", "spmm")

# A strategy named for one kind of layer, applied to the other kind by sparsify(model, name): every
# sparse convolution strategy runs the model's linears as CSR (spmm covers batch 1 too), and the
# sparse linear strategies run convolutions as CSR x lowered input, the same format.
_LINEAR_FOR_CONV = {"torch": "torch", "dense": "dense", "csrmm": "spmm", "direct": "spmm",
                    "lowered": "spmm", "bsr": "spmm", "spgemm": "spmm"}
_CONV_FOR_LINEAR = {"torch": "torch", "dense": "dense", "spmv": "csrmm", "spmm": "csrmm"}

# Workspaces (im2col buffers, sparse input storage) are kept for this many distinct input shapes.
_WORKSPACE_SHAPES = 4


def strategies(kind: str = "conv") -> tuple[str, ...]:
    """Names of the execution strategies for ``"conv"`` (Conv2d) or ``"linear"`` (Linear) layers.

    Returns
    -------
    tuple of str
        conv: ``("torch", "dense", "csrmm", "direct", "lowered", "bsr", "spgemm")``;
        linear: ``("torch", "dense", "spmv", "spmm")``.
    """
    if kind == "conv":
        return _CONV_STRATEGIES
    if kind == "linear":
        return _LINEAR_STRATEGIES
    raise SparseCNNError(f"unknown layer kind {kind!r}; use 'conv' or 'linear'")


# --------------------------------------------------------------------------------------------------
# shared helpers


def _label(name: str, layer: nn.Module) -> str:
    return f"layer {name!r}" if name else f"{type(layer).__name__} layer"


def _check_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise SparseCNNError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SparseCNNError("device='cuda' was asked for, but torch sees no CUDA device; use device='cpu'")
    return dev


def _weights_np(layer: nn.Module, label: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Float32 C-contiguous copies of the layer's weight and bias; NaN/Inf rejected."""
    w = layer.weight.detach()
    b = None if layer.bias is None else layer.bias.detach()
    for what, t in (("weight", w), ("bias", b)):
        if t is not None and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise SparseCNNError(
                f"{label}: {what} holds {n_bad} NaN/Inf value(s); fix the weights (e.g. torch.nan_to_num, "
                f"or retrain with a lower learning rate) before converting"
            )
    w_np = np.ascontiguousarray(w.cpu().numpy(), dtype=np.float32)
    b_np = None if b is None else np.ascontiguousarray(b.cpu().numpy(), dtype=np.float32)
    return w_np, b_np


class _Workspaces:
    """Per-input-shape buffers, least recently used dropped beyond ``_WORKSPACE_SHAPES`` shapes."""

    def __init__(self) -> None:
        self._by_shape: OrderedDict[tuple[int, ...], dict[str, Any]] = OrderedDict()

    def get(self, shape: tuple[int, ...]) -> tuple[dict[str, Any], bool]:
        ws = self._by_shape.get(shape)
        if ws is not None:
            self._by_shape.move_to_end(shape)
            return ws, False
        ws = {}
        self._by_shape[shape] = ws
        while len(self._by_shape) > _WORKSPACE_SHAPES:
            self._by_shape.popitem(last=False)
        return ws, True


# --------------------------------------------------------------------------------------------------
# convolution engines: each holds the weights in its format and runs (B, Cin, H, W) -> (B, Cout, ...)


@dataclass(frozen=True)
class _ConvSpec:
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @property
    def k(self) -> int:
        """Lowered rows per group: Cin/groups * kh * kw."""
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    @property
    def m_group(self) -> int:
        return self.out_channels // self.groups

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        from sparsecnn.kernels.lowering import conv_out_size

        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)

    @property
    def is_pointwise(self) -> bool:
        """1x1, stride 1, no padding: the lowered input is the input itself, no im2col needed."""
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def signature(self) -> str:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (f"conv{self.out_channels}x{self.in_channels // self.groups}x{kh}x{kw}"
                f"/s{sh},{sw}/p{ph},{pw}/d{dh},{dw}/g{self.groups}")


@dataclass(frozen=True, eq=False)
class LoweredWeight:
    """The SSL-compacted lowered weight of the ``lowered`` strategy.

    Parameters
    ----------
    data : ndarray of float32, shape (groups, Mr, Kr)
        The kept filters x kept lowered columns of every group, zero-padded to the longest group.
    row_map : ndarray of int16/32/64, shape (groups, Mr)
        Output channel of each kept row, -1 for padding (smallest signed dtype that holds Cout - 1).
    col_index : ndarray of int16/32/64, shape (groups, Kr)
        Lowered column (Caffe order ``(c, i, j)`` within the group) of each kept column, -1 for padding.
    shape : tuple of int
        The full lowered weight's ``(Cout, Cin/groups * kh * kw)``.
    """

    data: np.ndarray
    row_map: np.ndarray
    col_index: np.ndarray
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Exact bytes of the three arrays."""
        return int(self.data.nbytes + self.row_map.nbytes + self.col_index.nbytes)

    def check_format(self) -> None:
        """Check the invariants: matching shapes, channels in range and used once, columns in range."""
        g, mr, kr = self.data.shape
        m, k = self.shape
        if self.row_map.shape != (g, mr) or self.col_index.shape != (g, kr):
            raise SparseCNNError(
                f"invalid LoweredWeight: row_map {self.row_map.shape} / col_index {self.col_index.shape} "
                f"do not match data {self.data.shape}")
        rows = self.row_map[self.row_map >= 0]
        if rows.size and (rows.max() >= m or len(np.unique(rows)) != rows.size):
            raise SparseCNNError("invalid LoweredWeight: row_map holds a channel out of range or twice")
        if (self.col_index >= k).any() or (self.col_index < -1).any():
            raise SparseCNNError(f"invalid LoweredWeight: col_index outside [-1, {k})")


class _ConvEngine:
    """Base of the numba-backed CPU engines: validates nothing (the layer did), allocates the output,
    hands raw arrays to :meth:`compute`."""

    format: Any = None
    nbytes: int = 0

    def __init__(self, spec: _ConvSpec, bias: np.ndarray | None) -> None:
        self.spec = spec
        self.has_bias = bias is not None
        self.bias = bias if bias is not None else np.zeros(spec.out_channels, np.float32)
        self.workspaces = _Workspaces()

    def run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().contiguous()
        b, _, h, w = x.shape
        hout, wout = self.spec.out_hw(h, w)
        out = torch.empty((b, self.spec.out_channels, hout, wout), dtype=torch.float32)
        if b == 0:
            return out
        ws, fresh = self.workspaces.get(tuple(x.shape))
        if fresh:
            self.setup(ws, x.shape, hout, wout)
        self.compute(x, x.numpy(), out, out.numpy(), ws)
        return out

    def setup(self, ws: dict[str, Any], shape: torch.Size, hout: int, wout: int) -> None:
        """Allocate the workspaces for one input shape."""

    def compute(self, x: torch.Tensor, x_np: np.ndarray, out: torch.Tensor, out_np: np.ndarray,
                ws: dict[str, Any]) -> None:
        raise NotImplementedError

    # im2col into a cached buffer (or a view of x for a pointwise convolution)
    def _setup_cols(self, ws: dict[str, Any], shape: torch.Size, hout: int, wout: int,
                    rows: np.ndarray | None = None) -> None:
        from sparsecnn.kernels.lowering import full_rows

        s = self.spec
        if rows is None:
            if s.is_pointwise:
                return
            rows = full_rows(s.groups, s.k)
        cols = np.empty((shape[0], s.groups, rows.shape[1], hout * wout), dtype=np.float32)
        ws["rows"] = rows
        ws["cols"] = cols
        ws["cols_t"] = torch.from_numpy(cols)

    def _lower(self, x: torch.Tensor, x_np: np.ndarray,
               ws: dict[str, Any]) -> tuple[np.ndarray, torch.Tensor]:
        from sparsecnn.kernels.lowering import im2col

        if "cols" not in ws:  # pointwise: the input already is the lowered matrix
            b, c, h, w = x.shape
            return x_np.reshape(b, self.spec.groups, c // self.spec.groups, h * w), x.view(
                b, self.spec.groups, c // self.spec.groups, h * w)
        s = self.spec
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.kernel_size, s.stride, s.padding, s.dilation
        im2col(x_np, kh, kw, sh, sw, ph, pw, dh, dw, ws["rows"], ws["cols"])
        return ws["cols"], ws["cols_t"]


class _DenseConv(_ConvEngine):
    """im2col + one batched dense GEMM per group through torch.matmul (Caffe's GEMM path)."""

    def __init__(self, spec: _ConvSpec, weight: np.ndarray, bias: np.ndarray | None, **_: Any) -> None:
        super().__init__(spec, bias)
        self.format = np.ascontiguousarray(weight.reshape(spec.groups, spec.m_group, spec.k))
        self.nbytes = int(self.format.nbytes)
        self.weight_t = torch.from_numpy(self.format)
        self.bias_t = torch.from_numpy(self.bias).view(1, -1, 1, 1)

    def setup(self, ws, shape, hout, wout):
        self._setup_cols(ws, shape, hout, wout)

    def compute(self, x, x_np, out, out_np, ws):
        _, cols_t = self._lower(x, x_np, ws)
        b = x.shape[0]
        torch.matmul(self.weight_t, cols_t, out=out.view(b, self.spec.groups, self.spec.m_group, -1))
        if self.has_bias:
            out += self.bias_t


class _CsrConv(_ConvEngine):
    """CSR weights x dense lowered input (row-wise SpMM)."""

    def __init__(self, spec: _ConvSpec, weight: np.ndarray, bias: np.ndarray | None, **_: Any) -> None:
        from sparsecnn.formats import CSRMatrix

        super().__init__(spec, bias)
        self.format = CSRMatrix.from_dense(weight.reshape(spec.out_channels, spec.k))
        self.nbytes = self.format.nbytes

    def setup(self, ws, shape, hout, wout):
        self._setup_cols(ws, shape, hout, wout)

    def compute(self, x, x_np, out, out_np, ws):
        from sparsecnn.kernels.spmm import csr_conv_matmul

        cols, _ = self._lower(x, x_np, ws)
        f = self.format
        csr_conv_matmul(f.indptr, f.indices, f.data, cols, self.bias,
                        out_np.reshape(out_np.shape[0], out_np.shape[1], -1))


class _BsrConv(_ConvEngine):
    """Block-sparse (R x C) weights x dense lowered input.

    With groups > 1 and Cout/groups not a multiple of R, every group's rows are padded with zero rows
    to a multiple of R, so that no block straddles two groups (the format's shape shows the padding).
    """

    def __init__(self, spec: _ConvSpec, weight: np.ndarray, bias: np.ndarray | None, *,
                 blocksize: tuple[int, int] = (4, 4), **_: Any) -> None:
        from sparsecnn.formats import BSRMatrix

        super().__init__(spec, bias)
        r = int(blocksize[0])
        lowered = weight.reshape(spec.groups, spec.m_group, spec.k)
        if spec.groups > 1 and spec.m_group % r:
            self.m_pad = -(-spec.m_group // r) * r
            padded = np.zeros((spec.groups, self.m_pad, spec.k), np.float32)
            padded[:, : spec.m_group] = lowered
            lowered = padded
        else:
            self.m_pad = -(-spec.m_group // r) * r
        self.format = BSRMatrix.from_dense(lowered.reshape(-1, spec.k), blocksize=blocksize)
        self.nbytes = self.format.nbytes

    def setup(self, ws, shape, hout, wout):
        self._setup_cols(ws, shape, hout, wout)

    def compute(self, x, x_np, out, out_np, ws):
        from sparsecnn.kernels.spmm import bsr_conv_matmul

        cols, _ = self._lower(x, x_np, ws)
        f, s = self.format, self.spec
        bsr_conv_matmul(f.indptr, f.indices, f.data, s.k, s.m_group, self.m_pad, cols, self.bias,
                        out_np.reshape(out_np.shape[0], out_np.shape[1], -1))


class _LoweredConv(_ConvEngine):
    """SSL lowering (Wen et al., NIPS 2016): the GEMM shrinks to the kept filters x kept columns."""

    def __init__(self, spec: _ConvSpec, weight: np.ndarray, bias: np.ndarray | None, **_: Any) -> None:
        from sparsecnn.formats import index_dtype, lower_conv_weight

        super().__init__(spec, bias)
        g, mg, k = spec.groups, spec.m_group, spec.k
        lowered = lower_conv_weight(weight, g)
        nz = lowered != 0
        rows = [np.flatnonzero(nz[i].any(axis=1)) for i in range(g)]
        cols = [np.flatnonzero(nz[i].any(axis=0)) for i in range(g)]
        mr = max(len(r) for r in rows)
        kr = max(len(c) for c in cols)
        data = np.zeros((g, mr, kr), np.float32)
        row_map = np.full((g, mr), -1, index_dtype(spec.out_channels))
        col_index = np.full((g, kr), -1, index_dtype(k))
        for i in range(g):
            data[i, : len(rows[i]), : len(cols[i])] = lowered[i][np.ix_(rows[i], cols[i])]
            row_map[i, : len(rows[i])] = rows[i] + i * mg
            col_index[i, : len(cols[i])] = cols[i]
        self.format = LoweredWeight(data, row_map, col_index, (spec.out_channels, k))
        self.nbytes = self.format.nbytes
        self.empty = mr == 0 or kr == 0
        # Every filter kept in every group: the GEMM writes straight into the output.
        self.all_rows = mr == mg and bool((row_map >= 0).all())
        self.weight_t = torch.from_numpy(data)
        self.bias_t = torch.from_numpy(self.bias).view(1, -1, 1, 1)

    def setup(self, ws, shape, hout, wout):
        if self.empty:
            return
        s = self.spec
        if s.is_pointwise and self.format.data.shape[2] == s.k:
            pass  # all columns kept: the input is the lowered matrix
        else:
            self._setup_cols(ws, shape, hout, wout, rows=self.format.col_index)
        if not self.all_rows:
            tmp = np.empty((shape[0], s.groups, self.format.data.shape[1], hout * wout), np.float32)
            ws["tmp"], ws["tmp_t"] = tmp, torch.from_numpy(tmp)

    def compute(self, x, x_np, out, out_np, ws):
        from sparsecnn.kernels.lowering import scatter_rows

        b = x.shape[0]
        if self.empty:
            out.copy_(self.bias_t.expand_as(out))
            return
        _, cols_t = self._lower(x, x_np, ws)
        if self.all_rows:
            torch.matmul(self.weight_t, cols_t, out=out.view(b, self.spec.groups, self.spec.m_group, -1))
            if self.has_bias:
                out += self.bias_t
        else:
            torch.matmul(self.weight_t, cols_t, out=ws["tmp_t"])
            scatter_rows(ws["tmp"], self.format.row_map, self.bias, out_np.reshape(b, out_np.shape[1], -1))


class _SpgemmConv(_ConvEngine):
    """CSR weights x CSR lowered input (compressed straight from x), dense output."""

    def __init__(self, spec: _ConvSpec, weight: np.ndarray, bias: np.ndarray | None, **_: Any) -> None:
        from sparsecnn.formats import CSRMatrix

        super().__init__(spec, bias)
        self.format = CSRMatrix.from_dense(weight.reshape(spec.out_channels, spec.k))
        self.nbytes = self.format.nbytes

    def setup(self, ws, shape, hout, wout):
        n_rows = shape[0] * self.spec.groups * self.spec.k
        ws["counts"] = np.empty(n_rows, np.int64)
        ws["indptr"] = np.empty(n_rows + 1, np.int64)
        ws["capacity"] = 1024
        ws["indices"] = np.empty(1024, np.int32)
        ws["data"] = np.empty(1024, np.float32)

    def compute(self, x, x_np, out, out_np, ws):
        from sparsecnn.kernels.spgemm import (
            csr_spgemm_conv,
            exclusive_scan,
            im2col_csr_count,
            im2col_csr_fill,
        )

        s = self.spec
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.kernel_size, s.stride, s.padding, s.dilation
        hout, wout = out.shape[2], out.shape[3]
        geom = (kh, kw, sh, sw, ph, pw, dh, dw, s.groups, hout, wout)
        im2col_csr_count(x_np, *geom, ws["counts"])
        nnz = exclusive_scan(ws["counts"], ws["indptr"])
        if nnz > ws["capacity"]:  # grow with headroom; steady state allocates nothing
            cap = int(nnz * 1.25)
            ws["indices"] = np.empty(cap, np.int32)
            ws["data"] = np.empty(cap, np.float32)
            ws["capacity"] = cap
        if nnz:
            im2col_csr_fill(x_np, *geom, ws["indptr"], ws["indices"], ws["data"])
        f = self.format
        csr_spgemm_conv(f.indptr, f.indices, f.data, ws["indptr"], ws["indices"], ws["data"], s.groups, s.k,
                        self.bias,
                        out_np.reshape(out_np.shape[0], out_np.shape[1], -1))


class _DirectConv(_ConvEngine):
    """Direct sparse convolution (Park et al., ICLR 2017), kernel in :mod:`sparsecnn.kernels.conv`."""

    def __init__(self, spec: _ConvSpec, weight: np.ndarray, bias: np.ndarray | None, **_: Any) -> None:
        from sparsecnn.kernels.conv import prepare_direct

        super().__init__(spec, bias)
        self.format = prepare_direct(weight, spec.groups, spec.stride, spec.padding, spec.dilation)
        self.nbytes = int(self.format.nbytes)

    def compute(self, x, x_np, out, out_np, ws):
        from sparsecnn.kernels.conv import direct_conv2d

        direct_conv2d(self.format, x_np, self.bias if self.has_bias else None, out_np)


class _TorchConv:
    """torch's own convolution (oneDNN on the CPU, cuDNN on CUDA): baseline and fallback."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv
        self.format = None
        self.nbytes = int(conv.weight.numel() * conv.weight.element_size())

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


_CONV_ENGINES: dict[str, type[_ConvEngine]] = {
    "dense": _DenseConv,
    "csrmm": _CsrConv,
    "direct": _DirectConv,
    "lowered": _LoweredConv,
    "bsr": _BsrConv,
    "spgemm": _SpgemmConv,
}


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int] | str:
    """The conv's padding as a pair, or the reason it has none (asymmetric 'same')."""
    pad = conv.padding
    if pad == "valid":
        return (0, 0)
    if pad == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            return "padding='same' with an even effective kernel needs asymmetric padding"
        return (total[0] // 2, total[1] // 2)
    return (int(pad[0]), int(pad[1]))


def _conv_unsupported(conv: nn.Module) -> str | None:
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not a Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' runs sparse)"
    if conv.weight.dtype != torch.float32:
        return f"weights are {conv.weight.dtype} (the sparse kernels run float32)"
    pad = _explicit_padding(conv)
    if isinstance(pad, str):
        return pad
    return None


class SparseConv2d(nn.Module):
    """A Conv2d executed by one strategy (inference only). Build it with :meth:`from_dense`.

    Attributes
    ----------
    strategy : str
        The strategy actually running (``torch`` after a fallback).
    name : str
        The layer's name in its model ('' when built alone).
    conversion_seconds : float
        Wall time of building the format from the dense weights.
    weight_nbytes : int
        Exact bytes of the stored weights in the strategy's format (bias excluded).
    format : object
        The format: CSRMatrix (csrmm, spgemm), BSRMatrix (bsr), LoweredWeight (lowered), the
        direct kernel's prepared weights (direct), the lowered dense ndarray (dense), None (torch).
    """

    def __init__(self, engine: Any, spec: _ConvSpec, strategy: str, name: str, device: torch.device,
                 conversion_seconds: float) -> None:
        super().__init__()
        self.engine = engine
        if isinstance(engine, _TorchConv):
            self.conv = engine.conv  # registered, so .to() and state_dict see the dense weights
        self.spec = spec
        self.strategy = strategy
        self.name = name
        self.device = device
        self.conversion_seconds = conversion_seconds
        self.in_channels = spec.in_channels
        self.out_channels = spec.out_channels

    @property
    def format(self) -> Any:
        return self.engine.format

    @property
    def weight_nbytes(self) -> int:
        return int(self.engine.nbytes)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, strategy: str, *, name: str = "",
                   blocksize: tuple[int, int] = (4, 4),
                   device: str | torch.device = "cpu") -> SparseConv2d:
        """Convert a dense Conv2d to run with ``strategy``.

        Parameters
        ----------
        conv : torch.nn.Conv2d
        strategy : str
            One of ``strategies("conv")``.
        name : str
            The layer's name, used in warnings and errors.
        blocksize : tuple of int
            ``(R, C)`` of the ``bsr`` strategy.
        device : str
            ``"cpu"`` (numba kernels) or ``"cuda"`` (torch: cuBLAS, cuSPARSE).

        Raises
        ------
        SparseCNNError
            Unknown strategy, or NaN/Inf weights.

        Warns
        -----
        UserWarning
            When the layer cannot run ``strategy`` and falls back to ``torch``.
        """
        if strategy not in _CONV_STRATEGIES:
            raise SparseCNNError(
                f"unknown conv strategy {strategy!r}; choose one of {', '.join(_CONV_STRATEGIES)}")
        dev = _check_device(device)
        label = _label(name, conv)
        t0 = time.perf_counter()
        weight, bias = _weights_np(conv, label)
        reason = _conv_unsupported(conv)
        if reason is not None and strategy != "torch":
            warnings.warn(f"{label}: strategy {strategy!r} cannot run it ({reason}); falling back to torch",
                          stacklevel=2)
            strategy = "torch"
        pad = _explicit_padding(conv)
        spec = _ConvSpec(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                         pad if isinstance(pad, tuple) else (0, 0), tuple(conv.dilation), conv.groups)
        if strategy == "torch":
            engine: Any = _TorchConv(copy.deepcopy(conv).to(dev).eval())
        elif dev.type == "cuda":
            if strategy == "direct":
                warnings.warn(f"{label}: strategy 'direct' has no CUDA kernel; falling back to torch",
                              stacklevel=2)
                strategy = "torch"
                engine = _TorchConv(copy.deepcopy(conv).to(dev).eval())
            else:
                engine = _CudaConv(spec, weight, bias, strategy, dev, blocksize=blocksize)
        else:
            engine = _CONV_ENGINES[strategy](spec, weight, bias, blocksize=blocksize)
        seconds = time.perf_counter() - t0
        return cls(engine, spec, strategy, name, dev, seconds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strategy == "torch":
            return self.engine.run(x)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise SparseCNNError(
                f"{_label(self.name, self)}: expected input (B, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise SparseCNNError(
                f"{_label(self.name, self)}: runs float32, got {x.dtype} input; call model.float()")
        if x.device.type != self.device.type:
            raise SparseCNNError(
                f"{_label(self.name, self)}: was converted for {self.device.type}, "
                f"got an input on {x.device}")
        h, w = x.shape[2:]
        hout, wout = self.spec.out_hw(h, w)
        if hout < 1 or wout < 1:
            raise SparseCNNError(f"{_label(self.name, self)}: input {h}x{w} is too small for the kernel")
        with torch.no_grad():
            y = self.engine.run(x)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{s.in_channels}, {s.out_channels}, kernel_size={s.kernel_size}, stride={s.stride}, "
                f"padding={s.padding}, dilation={s.dilation}, groups={s.groups}, strategy={self.strategy!r}, "
                f"weight_nbytes={self.weight_nbytes}")


# --------------------------------------------------------------------------------------------------
# linear


class _TorchLinear:
    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        self.format = None
        self.nbytes = int(linear.weight.numel() * linear.weight.element_size())

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class _DenseLinear:
    """``x @ W.T + b`` as one GEMM through torch.addmm (BLAS)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, **_: Any) -> None:
        self.format = weight
        self.nbytes = int(weight.nbytes)
        self.weight_t = torch.from_numpy(weight).t()
        self.bias_t = None if bias is None else torch.from_numpy(bias)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias_t is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias_t, x, self.weight_t)


class _SparseLinear:
    """CSR weights through :func:`sparsecnn.kernels.spmv.sparse_linear` (SpMV at batch 1, SpMM above)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, **_: Any) -> None:
        from sparsecnn.kernels.spmv import prepare_linear

        self.format = prepare_linear(weight)
        self.nbytes = int(self.format.nbytes)
        self.bias = bias
        self.m = weight.shape[0]

    def run(self, x: torch.Tensor) -> torch.Tensor:
        from sparsecnn.kernels.spmv import sparse_linear

        x = x.detach().contiguous()
        out = torch.empty((x.shape[0], self.m), dtype=torch.float32)
        if x.shape[0]:
            sparse_linear(self.format, x.numpy(), self.bias, out.numpy())
        return out


_LINEAR_ENGINES: dict[str, type] = {"dense": _DenseLinear, "spmv": _SparseLinear, "spmm": _SparseLinear}


class SparseLinear(nn.Module):
    """A Linear executed by one strategy (inference only). Build it with :meth:`from_dense`.

    Same attributes as :class:`SparseConv2d`; ``format`` is the sparse kernel's prepared CSR weights
    (spmv, spmm), the dense ndarray (dense) or None (torch).
    """

    def __init__(self, engine: Any, in_features: int, out_features: int, strategy: str, name: str,
                 device: torch.device, conversion_seconds: float) -> None:
        super().__init__()
        self.engine = engine
        if isinstance(engine, _TorchLinear):
            self.linear = engine.linear
        self.in_features = in_features
        self.out_features = out_features
        self.strategy = strategy
        self.name = name
        self.device = device
        self.conversion_seconds = conversion_seconds

    @property
    def format(self) -> Any:
        return self.engine.format

    @property
    def weight_nbytes(self) -> int:
        return int(self.engine.nbytes)

    @classmethod
    def from_dense(cls, linear: nn.Linear, strategy: str, *, name: str = "",
                   device: str | torch.device = "cpu") -> SparseLinear:
        """Convert a dense Linear to run with ``strategy`` (one of ``strategies("linear")``).

        Raises and warns like :meth:`SparseConv2d.from_dense`.
        """
        if strategy not in _LINEAR_STRATEGIES:
            raise SparseCNNError(
                f"unknown linear strategy {strategy!r}; choose one of {', '.join(_LINEAR_STRATEGIES)}")
        dev = _check_device(device)
        label = _label(name, linear)
        t0 = time.perf_counter()
        weight, bias = _weights_np(linear, label)
        if strategy != "torch" and linear.weight.dtype != torch.float32:
            warnings.warn(f"{label}: strategy {strategy!r} cannot run it (weights are {linear.weight.dtype}; "
                          f"the sparse kernels run float32); falling back to torch", stacklevel=2)
            strategy = "torch"
        if strategy == "torch":
            engine: Any = _TorchLinear(copy.deepcopy(linear).to(dev).eval())
        elif dev.type == "cuda":
            engine = _CudaLinear(weight, bias, strategy, dev)
        else:
            engine = _LINEAR_ENGINES[strategy](weight, bias)
        seconds = time.perf_counter() - t0
        return cls(engine, linear.in_features, linear.out_features, strategy, name, dev, seconds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strategy == "torch":
            return self.engine.run(x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise SparseCNNError(
                f"{_label(self.name, self)}: expected input (..., {self.in_features}), got {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise SparseCNNError(
                f"{_label(self.name, self)}: runs float32, got {x.dtype} input; call model.float()")
        if x.device.type != self.device.type:
            raise SparseCNNError(
                f"{_label(self.name, self)}: was converted for {self.device.type}, "
                f"got an input on {x.device}")
        lead = x.shape[:-1]
        with torch.no_grad():
            y = self.engine.run(x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"strategy={self.strategy!r}, weight_nbytes={self.weight_nbytes}")



# --------------------------------------------------------------------------------------------------
# CUDA: the same strategies through torch (cuBLAS dense, cuSPARSE CSR/BSR, sparse @ sparse)


class _CudaConv:
    """Convolution strategies on CUDA: ``F.unfold`` lowering, then per group a dense GEMM (dense,
    lowered: cuBLAS), a CSR or BSR x dense product (csrmm, bsr: cuSPARSE) or a CSR x CSR product of
    the weights with the lowered input made sparse (spgemm: cuSPARSE SpGEMM)."""

    def __init__(self, spec: _ConvSpec, weight: np.ndarray, bias: np.ndarray | None, strategy: str,
                 device: torch.device, *, blocksize: tuple[int, int] = (4, 4)) -> None:
        self.spec, self.strategy, self.device = spec, strategy, device
        g, mg, k = spec.groups, spec.m_group, spec.k
        lowered = torch.from_numpy(weight.reshape(g, mg, k).copy())
        self.bias = None if bias is None else torch.from_numpy(bias).to(device).view(1, -1, 1)
        self.col_index = None
        if strategy == "dense":
            self.mats = [lowered.to(device)]
        elif strategy == "lowered":
            eng = _LoweredConv(spec, weight, bias)
            self.lowered = eng.format
            self.mats = [torch.from_numpy(eng.format.data).to(device)]
            # torch indexes with int64; the format stores the smallest width
            self.col_index = torch.from_numpy(eng.format.col_index.astype(np.int64)).to(device)
            self.row_map = torch.from_numpy(eng.format.row_map.astype(np.int64)).to(device)
        elif strategy in ("csrmm", "spgemm"):
            self.mats = [lowered[i].to(device).to_sparse_csr() for i in range(g)]
        elif strategy == "bsr":
            r, c = blocksize
            self.mats = []
            for i in range(g):
                w = lowered[i]
                mp, kp = -(-mg // r) * r, -(-k // c) * c
                padded = torch.zeros(mp, kp)
                padded[:mg, :k] = w
                self.mats.append(padded.to(device).to_sparse_bsr((r, c)))
            self.kp = -(-k // c) * c
        else:
            raise SparseCNNError(f"strategy {strategy!r} has no CUDA implementation")
        self.format = self.mats[0] if len(self.mats) == 1 else self.mats
        self.nbytes = int(sum(_torch_nbytes(m) for m in self.mats))

    def run(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        b, _, h, w = x.shape
        hout, wout = s.out_hw(h, w)
        n = hout * wout
        cols = F.unfold(x, s.kernel_size, dilation=s.dilation, padding=s.padding, stride=s.stride)
        cols = cols.view(b, s.groups, s.k, n)
        if self.strategy == "dense":
            out = torch.matmul(self.mats[0], cols).reshape(b, s.out_channels, n)
        elif self.strategy == "lowered":
            idx = self.col_index.clamp(min=0)
            sel = torch.gather(cols, 2, idx.view(1, s.groups, -1, 1).expand(b, -1, -1, n))
            sel = sel * (self.col_index >= 0).view(1, s.groups, -1, 1)
            tmp = torch.matmul(self.mats[0], sel)  # (b, g, Mr, n)
            out = torch.zeros(b, s.out_channels, n, device=x.device)
            keep = self.row_map >= 0
            out[:, self.row_map[keep]] = tmp[:, keep]
        else:
            # (g, K, b * n): the batch joins the columns, one sparse product per group
            stacked = cols.permute(1, 2, 0, 3).reshape(s.groups, s.k, b * n)
            parts = []
            for gi, mat in enumerate(self.mats):
                rhs = stacked[gi]
                if self.strategy == "bsr" and self.kp != s.k:
                    rhs = F.pad(rhs, (0, 0, 0, self.kp - s.k))
                if self.strategy == "spgemm":
                    prod = (mat @ rhs.to_sparse_csr()).to_dense()
                else:
                    prod = mat @ rhs
                parts.append(prod[: s.m_group])
            out = torch.stack(parts).reshape(s.groups, s.m_group, b, n).permute(2, 0, 1, 3)
            out = out.reshape(b, s.out_channels, n)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(b, s.out_channels, hout, wout).contiguous()


class _CudaLinear:
    """Linear strategies on CUDA: cuBLAS GEMM (dense) or cuSPARSE CSR x dense (spmv, spmm)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, strategy: str,
                 device: torch.device) -> None:
        w = torch.from_numpy(weight).to(device)
        self.weight = w if strategy == "dense" else w.to_sparse_csr()
        self.strategy = strategy
        self.bias = None if bias is None else torch.from_numpy(bias).to(device)
        self.format = self.weight
        self.nbytes = _torch_nbytes(self.weight)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.weight @ x.t()).t() if self.strategy != "dense" else x @ self.weight.t()
        return y if self.bias is None else y + self.bias


def _torch_nbytes(t: torch.Tensor) -> int:
    if t.layout == torch.strided:
        return t.numel() * t.element_size()
    parts = (t.crow_indices(), t.col_indices(), t.values())  # sparse_csr and sparse_bsr alike
    return int(sum(p.numel() * p.element_size() for p in parts))

# --------------------------------------------------------------------------------------------------
# sparsify


def _convert(module: nn.Module, strategy: str, name: str, device: str | torch.device,
             blocksize: tuple[int, int]) -> nn.Module:
    if isinstance(module, nn.Linear):
        return SparseLinear.from_dense(module, strategy, name=name, device=device)
    return SparseConv2d.from_dense(module, strategy, name=name, device=device, blocksize=blocksize)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear layers by name; other convolutions are reported and left to torch."""
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out[name] = m
        elif isinstance(m, nn.modules.conv._ConvNd):
            warnings.warn(f"layer {name!r}: {type(m).__name__} has no sparse kernel; kept as torch",
                          stacklevel=3)
    return out


def _for_layer(strategy: str, layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return strategy if strategy in _LINEAR_STRATEGIES else _LINEAR_FOR_CONV[strategy]
    return strategy if strategy in _CONV_STRATEGIES else _CONV_FOR_LINEAR[strategy]


def sparsify(
    model: nn.Module,
    strategy: str | Mapping[str, str] = "auto",
    *,
    measure: bool = True,
    example_input: torch.Tensor | None = None,
    plan_path: Any = None,
    device: str | torch.device = "cpu",
    blocksize: tuple[int, int] = (4, 4),
) -> nn.Module:
    """A copy of ``model`` whose Conv2d and Linear layers run sparse; the rest stays torch.

    Parameters
    ----------
    model : torch.nn.Module
        Not modified.
    strategy : str or mapping
        A strategy name for every layer (a conv name runs the linears as ``spmm``, a linear name runs
        the convolutions as ``csrmm``; ``torch`` and ``dense`` apply to both), ``"auto"`` to choose
        per layer, or a :class:`~sparsecnn.plan.Plan` / mapping layer name -> strategy (layers it does
        not name stay torch).
    measure : bool
        ``"auto"`` only: True times every candidate on the layer's real input and keeps the fastest
        (``torch`` is always a candidate); False picks by the cost model in :mod:`sparsecnn.plan`.
    example_input : torch.Tensor, optional
        ``"auto"`` only: the input the layer shapes are captured with; by default a random batch of 1
        of ``sparsecnn.models.input_shape(model)``. Its batch size is the batch the plan is for.
    plan_path : path, optional
        ``"auto"`` only: the JSON decision cache; default ``$SPARSECNN_CACHE_DIR/plans.json`` or
        ``~/.cache/sparsecnn/plans.json``.
    device : str
        ``"cpu"`` or ``"cuda"``.
    blocksize : tuple of int
        ``(R, C)`` of the ``bsr`` strategy.

    Returns
    -------
    torch.nn.Module
        The copy, in eval mode, with attribute ``sparsecnn_plan`` (the :class:`~sparsecnn.plan.Plan`
        that was applied, with per-layer sources and timings).
    """
    from sparsecnn.plan import LayerChoice, Plan, auto_plan

    if not isinstance(model, nn.Module):
        raise SparseCNNError(f"sparsify needs a torch.nn.Module, got {type(model).__name__}")
    _check_device(device)
    copy_ = copy.deepcopy(model).eval()
    targets = _targets(copy_)
    built: dict[str, nn.Module] = {}
    if isinstance(strategy, str) and strategy == "auto":
        plan, built = auto_plan(copy_, targets, measure=measure, example_input=example_input,
                                plan_path=plan_path, device=device, blocksize=blocksize)
    elif isinstance(strategy, str):
        if strategy not in _CONV_STRATEGIES and strategy not in _LINEAR_STRATEGIES:
            raise SparseCNNError(
                f"unknown strategy {strategy!r}; choose 'auto' or one of "
                f"{', '.join(dict.fromkeys(_CONV_STRATEGIES + _LINEAR_STRATEGIES))}")
        plan = Plan({n: LayerChoice(_for_layer(strategy, m), "given") for n, m in targets.items()})
    elif isinstance(strategy, Mapping):
        unknown = [n for n in strategy if n not in targets]
        if unknown:
            raise SparseCNNError(
                f"the plan names layer(s) {', '.join(map(repr, unknown))} that the model lacks "
                f"(its conv/linear "
                f"layers: {', '.join(targets) or 'none'})")
        layers = strategy.layers if isinstance(strategy, Plan) else {
            n: LayerChoice(s, "given") for n, s in strategy.items()}
        plan = Plan(layers)
    else:
        raise SparseCNNError(f"strategy must be a name, 'auto' or a plan, got {type(strategy).__name__}")
    applied: dict[str, Any] = {}
    for name, choice in plan.layers.items():
        layer = built.get(name)
        if layer is None:
            layer = _convert(targets[name], choice.strategy, name, device, blocksize)
        _set_submodule(copy_, name, layer)
        same = layer.strategy == choice.strategy
        applied[name] = choice if same else LayerChoice(layer.strategy, "fallback")
    copy_.sparsecnn_plan = Plan(applied)
    return copy_
