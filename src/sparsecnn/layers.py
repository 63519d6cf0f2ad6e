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
``spconv-act`` sparse x sparse: per output pixel, only the nonzero inputs over kept (not all-zero)
             weight columns, each times its weight column vectorised over Cout
             (:mod:`sparsecnn.kernels.spconv_input`).

Linear strategies: ``torch`` (``F.linear``), ``dense`` (``torch.addmm``), ``spmv`` and ``spmm``
(CSR weights; both run :func:`sparsecnn.kernels.spmv.sparse_linear`, which is a sparse matrix-vector
product at batch 1 and a sparse x dense product at batch > 1; the names tell the planner which case
a layer was chosen for). ``spmv-act`` stores the weights by columns (a masked layout of 16-row groups
where AVX-512 runs at full rate, else packed columns of row-and-value blocks; dense columns above 2/3
density) and walks only the nonzero inputs (:mod:`sparsecnn.kernels.spmv_act`): for the ReLU-sparse
input of a fully connected layer at batch 1 or a small batch. ``qspmv`` runs CSR whose values are
codebook indices (Deep Compression's weight sharing, :mod:`sparsecnn.kernels.qspmv`): one byte per
nonzero instead of four, for quantized weights (:mod:`sparsecnn.compress`).

A layer a strategy cannot run (``padding_mode`` other than zeros, weights that are not float32, a
``padding="same"`` that needs asymmetric padding) falls back to ``torch`` with a warning naming the
layer and the reason. NaN or Inf weights are rejected at conversion.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
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
from sparsecnn.formats._common import check_finite, check_indptr, check_int_array, check_sorted_rows

__all__ = ["LoweredWeight", "SparseConv2d", "SparseLinear", "sparsify", "strategies"]

_CONV_STRATEGIES: tuple[str, ...] = ("torch", "dense", "csrmm", "direct", "lowered", "bsr", "spgemm",
                                     "spconv-act")
_LINEAR_STRATEGIES: tuple[str, ...] = ("torch", "dense", "spmv", "spmm", "spmv-act", "qspmv", "direct")

# A strategy named for one kind of layer, applied to the other kind by sparsify(model, name): every
# sparse convolution strategy runs the model's linears as CSR (spmm covers batch 1 too), and the
# sparse linear strategies run convolutions as CSR x lowered input, the same format. "direct" names
# both a conv and a linear strategy; given for a whole model it runs the linears as spmm, since the
# linear form (the batch in the vector lanes) fills one lane in VW at batch 1.
_LINEAR_FOR_CONV = {"torch": "torch", "dense": "dense", "csrmm": "spmm", "direct": "spmm",
                    "lowered": "spmm", "bsr": "spmm", "spgemm": "spmm", "spconv-act": "spmm"}
_CONV_FOR_LINEAR = {"torch": "torch", "dense": "dense", "spmv": "csrmm", "spmm": "csrmm", "spmv-act": "csrmm",
                    "qspmv": "csrmm"}

# Workspaces (im2col buffers, sparse input storage) are kept for this many distinct input shapes.
_WORKSPACE_SHAPES = 4


def strategies(kind: str = "conv") -> tuple[str, ...]:
    """Names of the execution strategies for ``"conv"`` (Conv2d) or ``"linear"`` (Linear) layers.

    Returns
    -------
    tuple of str
        conv: ``("torch", "dense", "csrmm", "direct", "lowered", "bsr", "spgemm", "spconv-act")``;
        linear: ``("torch", "dense", "spmv", "spmm", "spmv-act", "qspmv", "direct")``.
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
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SparseCNNError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise SparseCNNError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SparseCNNError("device='cuda' was asked for, but torch sees no CUDA device; use device='cpu'")
    return dev


def check_finite_parameters(layer: nn.Module, label: str) -> None:
    """Raise :class:`SparseCNNError` naming ``label`` if the layer's weight or bias holds NaN or Inf."""
    for what in ("weight", "bias"):
        t = getattr(layer, what, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise SparseCNNError(
                f"{label}: {what} holds {n_bad} NaN/Inf value(s); fix the weights (e.g. torch.nan_to_num, "
                f"or retrain with a lower learning rate) before converting"
            )


def _weights_np(layer: nn.Module, label: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Float32 C-contiguous copies of the layer's weight and bias; NaN/Inf rejected."""
    check_finite_parameters(layer, label)
    w = layer.weight.detach()
    b = None if layer.bias is None else layer.bias.detach()
    w_np = np.ascontiguousarray(w.cpu().numpy(), dtype=np.float32)
    b_np = None if b is None else np.ascontiguousarray(b.cpu().numpy(), dtype=np.float32)
    return w_np, b_np


class _Workspaces:
    """Per-input-shape buffers of the calling thread, least recently used dropped beyond
    ``_WORKSPACE_SHAPES`` shapes. Each thread has its own (the kernels write them), so one layer can
    run in several threads at once."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, shape: tuple[int, ...]) -> tuple[dict[str, Any], bool]:
        by_shape = getattr(self._local, "by_shape", None)
        if by_shape is None:
            by_shape = self._local.by_shape = OrderedDict()
        ws = by_shape.get(shape)
        if ws is not None:
            by_shape.move_to_end(shape)
            return ws, False
        ws = {}
        by_shape[shape] = ws
        while len(by_shape) > _WORKSPACE_SHAPES:
            by_shape.popitem(last=False)
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

    @functools.lru_cache(maxsize=256)  # noqa: B019 (specs are few, frozen and live as long as layers)
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
    """Base of the numba-backed CPU engines.

    An engine is built from its *format* (``__init__(spec, fmt, bias)`` derives everything else), so
    a layer converted from dense weights (:meth:`convert`), one loaded from a checkpoint and one
    unpickled or deep-copied (``__reduce__``: spec, format, bias) are the same object. :meth:`check`
    states what a format must satisfy for the kernels, which index without bounds checks.
    """

    def __init__(self, spec: _ConvSpec, fmt: Any, bias: np.ndarray | None) -> None:
        self.spec = spec
        self.format = fmt
        self.nbytes = int(fmt.nbytes)
        self.has_bias = bias is not None
        self.bias = bias if bias is not None else np.zeros(spec.out_channels, np.float32)
        self.workspaces = _Workspaces()
        self._derive()

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.spec, _without_caches(self.format), self.bias if self.has_bias else None)

    def _derive(self) -> None:
        """Set up what the kernels need beside the format (tensor views, flags)."""

    @staticmethod
    def convert(spec: _ConvSpec, weight: np.ndarray, *, blocksize: tuple[int, int]) -> Any:
        """The format of dense float32 filters ``weight`` (Cout, Cin/g, kh, kw)."""
        raise NotImplementedError

    @staticmethod
    def check(spec: _ConvSpec, fmt: Any) -> None:
        """Raise :class:`SparseCNNError` (naming the problem) unless the kernels can run ``fmt``."""
        raise NotImplementedError

    def to_dense(self) -> np.ndarray:
        """The lowered dense weight (Cout, K) this engine computes with."""
        raise NotImplementedError

    def run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().contiguous()
        b, _, h, w = x.shape
        hout, wout = self.spec.out_hw(h, w)
        # numpy allocates and wraps faster than torch.empty + .numpy() (~3 us of a ~100 us layer).
        out_np = np.empty((b, self.spec.out_channels, hout, wout), dtype=np.float32)
        out = torch.from_numpy(out_np)
        if b == 0:
            return out
        ws, fresh = self.workspaces.get(tuple(x.shape))
        if fresh:
            self.setup(ws, x.shape, hout, wout)
        self.compute(x, x.numpy(), out, out_np, ws)
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


def _without_caches(fmt: Any) -> Any:
    """The format without its caches (the kernels' prepared forms keep per-shape workspaces and derived
    layouts in fields named ``_...``): what a pickle or deep copy should carry."""
    if not dataclasses.is_dataclass(fmt):
        return fmt
    fresh: dict[str, Any] = {}
    for f in dataclasses.fields(fmt):
        if f.name.startswith("_") and f.init:
            if f.default_factory is not dataclasses.MISSING:
                fresh[f.name] = f.default_factory()
            elif f.default is not dataclasses.MISSING:
                fresh[f.name] = f.default
    return dataclasses.replace(fmt, **fresh) if fresh else fmt


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise SparseCNNError(what)


def _check_f32(arr: Any, what: str, shape: tuple[int, ...] | None = None) -> None:
    _need(isinstance(arr, np.ndarray), f"{what} must be a numpy array, got {type(arr).__name__}")
    _need(arr.dtype == np.float32, f"{what} must be float32, got {arr.dtype}")
    if shape is not None:
        _need(arr.shape == shape, f"{what} must have shape {shape}, got {arr.shape}")
    _need(arr.flags.c_contiguous, f"{what} must be C-contiguous")
    check_finite(arr, what)


def _check_csr_arrays(what: str, indptr: Any, indices: Any, data: Any, rows: int, cols: int) -> None:
    """CSR invariants of a kernel's prepared form (which has no ``check_format`` of its own)."""
    _check_f32(data, f"{what}.data")
    check_int_array(indices, "indices", what)
    _need(data.ndim == 1 and len(indices) == len(data),
          f"{what}: indices and data must be 1-D of one length, got {len(indices)} and {data.shape}")
    check_indptr(indptr, rows, len(data), what, "values")
    if len(indices):
        lo, hi = int(indices.min()), int(indices.max())
        _need(lo >= 0 and hi < cols, f"{what}: column indices must lie in [0, {cols}), found "
                                     f"{lo if lo < 0 else hi}")
        check_sorted_rows(indices, indptr, what, "column indices")


def _check_slab(what: str, slab: Any, shape: tuple[int, int]) -> None:
    """``slab`` of a linear kernel's stacked slab-major CSR: columns per slab, 0 for none."""
    _need(isinstance(slab, (int, np.integer)) and not isinstance(slab, bool) and 0 <= slab < max(shape[1], 1),
          f"{what}.slab must be an int in [0, {shape[1]}) (columns per slab, 0 for none), got {slab!r}")


def _check_slab_columns(what: str, fmt: Any, shape: tuple[int, int]) -> None:
    """Every stored column lies in the slab of its stacked row (after :func:`_check_csr_arrays`)."""
    if not fmt.slab or not len(fmt.indices):
        return
    slab_of = np.repeat(np.arange(fmt.nslabs), np.diff(fmt.indptr[:: max(shape[0], 1)].astype(np.int64)))
    wrong = fmt.indices.astype(np.int64) // fmt.slab != slab_of
    _need(not wrong.any(), f"{what}: {int(wrong.sum())} column indices lie outside their slab "
                           f"(slab s holds columns [s * {fmt.slab}, (s + 1) * {fmt.slab}))")


class _DenseConv(_ConvEngine):
    """im2col + one batched dense GEMM per group through torch.matmul (Caffe's GEMM path).
    Format: the lowered weight, ndarray (groups, Cout/groups, K)."""

    @staticmethod
    def convert(spec, weight, *, blocksize):
        return np.ascontiguousarray(weight.reshape(spec.groups, spec.m_group, spec.k))

    @staticmethod
    def check(spec, fmt):
        _check_f32(fmt, "the lowered dense weight", (spec.groups, spec.m_group, spec.k))

    def to_dense(self):
        return self.format.reshape(self.spec.out_channels, self.spec.k)

    def _derive(self):
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
    """CSR weights x dense lowered input (row-wise SpMM). Format: CSRMatrix (Cout, K)."""

    @staticmethod
    def convert(spec, weight, *, blocksize):
        from sparsecnn.formats import CSRMatrix

        return CSRMatrix.from_dense(weight.reshape(spec.out_channels, spec.k))

    @staticmethod
    def check(spec, fmt):
        from sparsecnn.formats import CSRMatrix

        _need(isinstance(fmt, CSRMatrix), f"expected a CSRMatrix, got {type(fmt).__name__}")
        _need(tuple(fmt.shape) == (spec.out_channels, spec.k),
              f"expected a CSRMatrix of shape {(spec.out_channels, spec.k)}, got {tuple(fmt.shape)}")
        fmt.check_format()
        _need(fmt.data.dtype == np.float32, f"expected float32 CSRMatrix values, got {fmt.data.dtype}")

    def to_dense(self):
        return self.format.to_dense()

    def setup(self, ws, shape, hout, wout):
        self._setup_cols(ws, shape, hout, wout)

    def compute(self, x, x_np, out, out_np, ws):
        from sparsecnn.kernels.spmm import csr_conv_matmul

        cols, _ = self._lower(x, x_np, ws)
        f = self.format
        csr_conv_matmul(f.indptr, f.indices, f.data, cols, self.bias,
                        out_np.reshape(out_np.shape[0], out_np.shape[1], -1))


def _bsr_rows(spec: _ConvSpec, r: int) -> tuple[int, int]:
    """``(rows of the BSR matrix, padded rows per group)``: with groups > 1 and Cout/groups not a
    multiple of R every group's rows are padded to a multiple of R, so no block straddles two groups."""
    m_pad = -(-spec.m_group // r) * r
    rows = spec.groups * m_pad if spec.groups > 1 and spec.m_group % r else spec.out_channels
    return rows, m_pad


class _BsrConv(_ConvEngine):
    """Block-sparse (R x C) weights x dense lowered input. Format: BSRMatrix (Cout, K), or
    (groups * m_pad, K) when groups > 1 and Cout/groups is not a multiple of R (rows padded per group;
    the format's shape shows the padding)."""

    @staticmethod
    def convert(spec, weight, *, blocksize):
        from sparsecnn.formats import BSRMatrix

        rows, m_pad = _bsr_rows(spec, int(blocksize[0]))
        lowered = weight.reshape(spec.groups, spec.m_group, spec.k)
        if rows != spec.out_channels:
            padded = np.zeros((spec.groups, m_pad, spec.k), np.float32)
            padded[:, : spec.m_group] = lowered
            lowered = padded
        return BSRMatrix.from_dense(lowered.reshape(-1, spec.k), blocksize=blocksize)

    @staticmethod
    def check(spec, fmt):
        from sparsecnn.formats import BSRMatrix

        _need(isinstance(fmt, BSRMatrix), f"expected a BSRMatrix, got {type(fmt).__name__}")
        fmt.check_format()
        rows, _ = _bsr_rows(spec, int(fmt.blocksize[0]))
        _need(tuple(fmt.shape) == (rows, spec.k),
              f"expected a BSRMatrix of shape {(rows, spec.k)} for blocksize {tuple(fmt.blocksize)}, "
              f"got {tuple(fmt.shape)}")
        _need(fmt.data.dtype == np.float32, f"expected float32 BSRMatrix blocks, got {fmt.data.dtype}")

    def to_dense(self):
        s = self.spec
        w = self.format.to_dense()
        if w.shape[0] != s.out_channels:  # rows padded per group to a multiple of R
            w = w.reshape(s.groups, -1, s.k)[:, : s.m_group].reshape(s.out_channels, s.k)
        return w

    def _derive(self):
        self.m_pad = _bsr_rows(self.spec, int(self.format.blocksize[0]))[1]

    def setup(self, ws, shape, hout, wout):
        self._setup_cols(ws, shape, hout, wout)

    def compute(self, x, x_np, out, out_np, ws):
        from sparsecnn.kernels.spmm import bsr_conv_matmul

        cols, _ = self._lower(x, x_np, ws)
        f, s = self.format, self.spec
        bsr_conv_matmul(f.indptr, f.indices, f.data, s.k, s.m_group, self.m_pad, cols, self.bias,
                        out_np.reshape(out_np.shape[0], out_np.shape[1], -1))


class _LoweredConv(_ConvEngine):
    """SSL lowering (Wen et al., NIPS 2016): the GEMM shrinks to the kept filters x kept columns.
    Format: LoweredWeight.

    On the CPU the compact GEMM runs as an implicit GEMM over the kept columns, read in place from
    the padded input (:mod:`sparsecnn.kernels.implicit_gemm`), not as im2col + ``torch.matmul``
    (AlexNet's shrunk ssl conv2-5, 2 threads, two runs: 1.25-2.7x faster than that, whose im2col alone
    was 20-30% of the layer). A pointwise layer that keeps every column multiplies the input itself by
    GEMM.
    """

    @staticmethod
    def convert(spec, weight, *, blocksize):
        from sparsecnn.formats import index_dtype, lower_conv_weight

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
        return LoweredWeight(data, row_map, col_index, (spec.out_channels, k))

    @staticmethod
    def check(spec, fmt):
        _need(isinstance(fmt, LoweredWeight), f"expected a LoweredWeight, got {type(fmt).__name__}")
        _need(tuple(fmt.shape) == (spec.out_channels, spec.k),
              f"expected a LoweredWeight of shape {(spec.out_channels, spec.k)}, got {tuple(fmt.shape)}")
        _need(isinstance(fmt.data, np.ndarray) and fmt.data.ndim == 3 and fmt.data.shape[0] == spec.groups,
              f"expected a LoweredWeight with {spec.groups} group(s), got data of shape "
              f"{getattr(fmt.data, 'shape', None)}")
        for arr, what in ((fmt.row_map, "row_map"), (fmt.col_index, "col_index")):
            _need(isinstance(arr, np.ndarray) and arr.dtype.kind == "i",
                  f"LoweredWeight.{what} must be a signed integer array")
        _check_f32(fmt.data, "LoweredWeight.data")
        fmt.check_format()
        lo = (np.arange(spec.groups) * spec.m_group)[:, None]
        inside = (fmt.row_map == -1) | ((fmt.row_map >= lo) & (fmt.row_map < lo + spec.m_group))
        _need(bool(inside.all()), "LoweredWeight.row_map maps a row outside its group's output channels")

    def to_dense(self):
        s, fmt = self.spec, self.format
        w = np.zeros((s.out_channels, s.k), np.float32)
        for i in range(s.groups):
            rows = fmt.row_map[i] >= 0
            cols = fmt.col_index[i] >= 0
            w[np.ix_(fmt.row_map[i][rows], fmt.col_index[i][cols])] = fmt.data[i][np.ix_(rows, cols)]
        return w

    def _derive(self):
        s, fmt = self.spec, self.format
        _, mr, kr = fmt.data.shape
        self.empty = mr == 0 or kr == 0
        # Every filter kept, in order, in every group: the GEMM writes straight into the output.
        ident = np.arange(s.out_channels).reshape(s.groups, s.m_group)
        self.all_rows = mr == s.m_group and bool((fmt.row_map == ident).all())
        self.weight_t = torch.from_numpy(fmt.data)
        self.bias_t = torch.from_numpy(self.bias).view(1, -1, 1, 1)
        full = fmt.data.shape[2] == s.k and bool((fmt.col_index == np.arange(s.k)).all())
        # A pointwise layer keeping every column: the input is the lowered matrix, one GEMM.
        self.gemm_only = s.is_pointwise and full
        self.implicit = None
        if not self.empty and not self.gemm_only:
            from sparsecnn.kernels.implicit_gemm import prepare_implicit_gemm

            shape = (s.out_channels, s.in_channels // s.groups, *s.kernel_size)
            self.implicit = prepare_implicit_gemm(fmt.data, fmt.row_map, fmt.col_index, shape, s.groups,
                                                  s.stride, s.padding, s.dilation)

    def setup(self, ws, shape, hout, wout):
        if self.empty or self.implicit is not None:
            return
        if not self.all_rows:
            tmp = np.empty((shape[0], self.spec.groups, self.format.data.shape[1], hout * wout), np.float32)
            ws["tmp"], ws["tmp_t"] = tmp, torch.from_numpy(tmp)

    def compute(self, x, x_np, out, out_np, ws):
        from sparsecnn.kernels.lowering import scatter_rows

        b = x.shape[0]
        if self.empty:
            out.copy_(self.bias_t.expand_as(out))
            return
        if self.implicit is not None:
            from sparsecnn.kernels.implicit_gemm import implicit_gemm_conv2d

            implicit_gemm_conv2d(self.implicit, x_np, self.bias if self.has_bias else None, out_np)
            return
        _, cols_t = self._lower(x, x_np, ws)
        if self.all_rows:
            torch.matmul(self.weight_t, cols_t, out=out.view(b, self.spec.groups, self.spec.m_group, -1))
            if self.has_bias:
                out += self.bias_t
        else:
            torch.matmul(self.weight_t, cols_t, out=ws["tmp_t"])
            scatter_rows(ws["tmp"], self.format.row_map, self.bias, out_np.reshape(b, out_np.shape[1], -1))


class _SpgemmConv(_CsrConv):
    """CSR weights x CSR lowered input (compressed straight from x), dense output.
    Format: CSRMatrix (Cout, K)."""

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


class _SpconvActConv(_ConvEngine):
    """Sparse x sparse: input zeros and removed input channels skip work. Format: SpconvPrep."""

    @staticmethod
    def convert(spec, weight, *, blocksize):
        from sparsecnn.kernels.spconv_input import prepare_spconv

        return prepare_spconv(weight, spec.groups)

    @staticmethod
    def check(spec, fmt):
        from sparsecnn.kernels._simd import VW
        from sparsecnn.kernels.spconv_input import SpconvPrep

        _need(isinstance(fmt, SpconvPrep), f"expected a SpconvPrep, got {type(fmt).__name__}")
        wshape = (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel_size)
        _need(tuple(fmt.weight_shape) == wshape,
              f"expected a SpconvPrep of weight shape {wshape}, got {tuple(fmt.weight_shape)}")
        _check_f32(fmt.wt, "SpconvPrep.wt")
        taps = spec.kernel_size[0] * spec.kernel_size[1]
        _need(fmt.wt.ndim == 6 and fmt.wt.shape[0] == spec.groups and fmt.wt.shape[3] == taps
              and fmt.wt.shape[5] % VW == 0 and fmt.wt.shape[1] * fmt.wt.shape[5] >= spec.m_group,
              f"SpconvPrep.wt must be (groups, ntiles, nchunks, {taps}, cc, tile_width) covering "
              f"{spec.m_group} channels per group, got {fmt.wt.shape}")
        _need(isinstance(fmt.chan_map, np.ndarray) and fmt.chan_map.dtype == np.int32
              and fmt.chan_map.shape == (spec.groups, spec.in_channels // spec.groups),
              f"SpconvPrep.chan_map must be int32 of shape {(spec.groups, spec.in_channels // spec.groups)}")
        kept = fmt.wt.shape[2] * fmt.wt.shape[4]
        _need(bool(((fmt.chan_map >= -1) & (fmt.chan_map < kept)).all()),
              "SpconvPrep.chan_map points outside the kept channels")
        for g in range(spec.groups):
            idx = fmt.chan_map[g][fmt.chan_map[g] >= 0]
            _need(bool((idx == np.arange(idx.size)).all()),
                  "SpconvPrep.chan_map must number the kept channels 0, 1, 2, ... in order")

    def to_dense(self):
        return self.format.to_dense().reshape(self.spec.out_channels, self.spec.k)

    def compute(self, x, x_np, out, out_np, ws):
        from sparsecnn.kernels.spconv_input import spconv_input

        s = self.spec
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.kernel_size, s.stride, s.padding, s.dilation
        spconv_input(self.format, x_np, (kh, kw, sh, sw, ph, pw, dh, dw),
                     self.bias if self.has_bias else None, out_np, ws)


class _DirectConv(_ConvEngine):
    """Direct sparse convolution (Park et al., ICLR 2017), kernel in :mod:`sparsecnn.kernels.conv`.
    Format: DirectConvPrep."""

    @staticmethod
    def convert(spec, weight, *, blocksize):
        from sparsecnn.kernels.conv import prepare_direct

        return prepare_direct(weight, spec.groups, spec.stride, spec.padding, spec.dilation)

    @staticmethod
    def check(spec, fmt):
        from sparsecnn.kernels.conv import DirectConvPrep

        _need(isinstance(fmt, DirectConvPrep), f"expected a DirectConvPrep, got {type(fmt).__name__}")
        wshape = (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel_size)
        _need(tuple(fmt.weight_shape) == wshape,
              f"expected a DirectConvPrep of weight shape {wshape}, got {tuple(fmt.weight_shape)}")
        geom = (spec.groups, spec.stride, spec.padding, spec.dilation)
        got = (fmt.groups, tuple(fmt.stride), tuple(fmt.padding), tuple(fmt.dilation))
        _need(got == geom,
              f"expected a DirectConvPrep of (groups, stride, padding, dilation) {geom}, got {got}")
        _check_csr_arrays("DirectConvPrep", fmt.indptr, fmt.indices, fmt.data, spec.out_channels, spec.k)

    def to_dense(self):
        return _csr_dense(self.format.indptr, self.format.indices, self.format.data,
                          (self.spec.out_channels, self.spec.k))

    def compute(self, x, x_np, out, out_np, ws):
        from sparsecnn.kernels.conv import direct_conv2d

        direct_conv2d(self.format, x_np, self.bias if self.has_bias else None, out_np)


def _csr_dense(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
               shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    rows = np.repeat(np.arange(shape[0]), np.diff(indptr.astype(np.int64)))
    out[rows, indices.astype(np.int64)] = data
    return out


class _TorchConv:
    """torch's own convolution (oneDNN on the CPU, cuDNN on CUDA): baseline and fallback."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv
        self.format = None
        self.nbytes = int(conv.weight.numel() * conv.weight.element_size())

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


_CONV_ENGINES: dict[str, type[_ConvEngine]] = {
    "spconv-act": _SpconvActConv,
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


def _pair_arg(value: Any, what: str, label: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    else:
        try:
            a, b = value
            if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (a, b)):
                raise TypeError
            pair = (int(a), int(b))
        except (TypeError, ValueError):
            raise SparseCNNError(f"{label}: {what} must be an int or a pair of ints, got {value!r}") from None
    if min(pair) < minimum:
        raise SparseCNNError(f"{label}: {what} must be >= {minimum}, got {value!r}")
    return pair


def _count_arg(value: Any, what: str, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SparseCNNError(f"{label}: {what} must be a positive int, got {value!r}")
    return int(value)


def _bias_arg(bias: Any, n: int, label: str) -> np.ndarray | None:
    if bias is None:
        return None
    if isinstance(bias, torch.Tensor):
        bias = bias.detach().cpu().numpy()
    b = np.asarray(bias)
    if b.shape != (n,) or b.dtype.kind != "f":
        raise SparseCNNError(f"{label}: bias must be a float array of shape ({n},), got {b.dtype} {b.shape}")
    b = np.ascontiguousarray(b, dtype=np.float32)
    if not np.isfinite(b).all():
        raise SparseCNNError(f"{label}: bias holds NaN/Inf value(s)")
    return b


def _dense_weight_arg(fmt: Any, shape: tuple[int, ...], label: str) -> torch.Tensor:
    """The dense weight a ``torch`` layer is built from (its 'format'): ndarray or tensor of ``shape``."""
    w = fmt.detach().cpu() if isinstance(fmt, torch.Tensor) else (
        torch.from_numpy(np.asarray(fmt)) if isinstance(fmt, np.ndarray) else None)
    if w is None or tuple(w.shape) != shape or not w.is_floating_point():
        raise SparseCNNError(f"{label}: strategy 'torch' takes the dense float weight of shape {shape}, got "
                             f"{type(fmt).__name__} {tuple(getattr(fmt, 'shape', ()))}")
    if not bool(torch.isfinite(w).all()):
        raise SparseCNNError(f"{label}: weight holds NaN/Inf value(s)")
    return w


def _run_check(check: Any, spec: Any, fmt: Any, strategy: str, label: str) -> None:
    try:
        check(spec, fmt)
    except SparseCNNError as exc:
        raise SparseCNNError(f"{label}: the format does not fit strategy {strategy!r}: {exc}") from None


class _SparseLayer(nn.Module):
    """What SparseConv2d and SparseLinear share: an engine that holds the stored format."""

    engine: Any

    @property
    def format(self) -> Any:
        """The stored weight format (CSRMatrix, BSRMatrix, a kernel prep, ...), None for ``torch``."""
        return self.engine.format

    @property
    def weight_nbytes(self) -> int:
        """Exact bytes of the stored weights in that format."""
        return int(self.engine.nbytes)


class SparseConv2d(_SparseLayer):
    """A Conv2d executed by one strategy (inference only).

    Build it with :meth:`from_dense` (convert a dense ``nn.Conv2d``) or :meth:`from_format` (from a
    stored format, e.g. a checkpoint). Deep-copyable and picklable (``torch.save`` of a whole model):
    the format, geometry and bias travel, the per-shape workspaces are rebuilt on use.

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
    in_channels, out_channels, kernel_size, stride, padding, dilation, groups
        The convolution's geometry (padding as an explicit pair).
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
        self.kernel_size = spec.kernel_size
        self.stride = spec.stride
        self.padding = spec.padding
        self.dilation = spec.dilation
        self.groups = spec.groups

    @property
    def has_bias(self) -> bool:
        if isinstance(self.engine, _TorchConv):
            return self.engine.conv.bias is not None
        return self.engine.bias is not None if isinstance(self.engine, _CudaConv) else self.engine.has_bias

    def dense_bias(self) -> np.ndarray | None:
        """The bias ``(Cout,)`` as a float32 numpy copy, or None (CPU layers)."""
        if isinstance(self.engine, _ConvEngine):
            return self.engine.bias.copy() if self.engine.has_bias else None
        return self.dense_parameters()[1]

    def dense_parameters(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The dense weight ``(Cout, Cin/groups, kh, kw)`` and bias ``(Cout,)`` (or None) this layer
        computes with, as float32 numpy copies (CPU layers)."""
        s = self.spec
        wshape = (s.out_channels, s.in_channels // s.groups, *s.kernel_size)
        if isinstance(self.engine, _TorchConv):
            c = self.engine.conv
            return (c.weight.detach().cpu().float().numpy().copy(),
                    None if c.bias is None else c.bias.detach().cpu().float().numpy().copy())
        if not isinstance(self.engine, _ConvEngine):
            raise SparseCNNError(f"{_label(self.name, self)}: runs on {self.device}; only CPU sparse layers "
                                 f"can give their dense parameters")
        w = np.ascontiguousarray(self.engine.to_dense().reshape(wshape), dtype=np.float32)
        return w, (self.engine.bias.copy() if self.engine.has_bias else None)

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
        if not isinstance(conv, nn.Conv2d):
            hint = " (use SparseLinear.from_dense for a Linear)" if isinstance(conv, nn.Linear) else ""
            raise SparseCNNError(
                f"SparseConv2d.from_dense needs a torch.nn.Conv2d, got {type(conv).__name__}{hint}")
        if strategy not in _CONV_STRATEGIES:
            raise SparseCNNError(
                f"unknown conv strategy {strategy!r}; choose one of {', '.join(_CONV_STRATEGIES)}")
        if (len(blocksize) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in blocksize)):
            raise SparseCNNError(f"blocksize must be two positive integers (R, C), got {blocksize!r}")
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
            if strategy in ("direct", "spconv-act"):
                warnings.warn(f"{label}: strategy {strategy!r} has no CUDA kernel; falling back to torch",
                              stacklevel=2)
                strategy = "torch"
                engine = _TorchConv(copy.deepcopy(conv).to(dev).eval())
            else:
                engine = _CudaConv(spec, weight, bias, strategy, dev, blocksize=blocksize)
        else:
            eng_cls = _CONV_ENGINES[strategy]
            engine = eng_cls(spec, eng_cls.convert(spec, weight, blocksize=blocksize), bias)
        seconds = time.perf_counter() - t0
        return cls(engine, spec, strategy, name, dev, seconds)

    @classmethod
    def from_format(cls, fmt: Any, strategy: str, *, in_channels: int, out_channels: int,
                    kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1,
                    padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                    groups: int = 1, bias: Any = None, name: str = "",
                    conversion_seconds: float = 0.0) -> SparseConv2d:
        """A CPU layer from a format built earlier (what ``layer.format`` holds), without conversion.

        Parameters
        ----------
        fmt : object
            The strategy's format (see the class docstring): a CSRMatrix for csrmm/spgemm, a
            BSRMatrix for bsr, a LoweredWeight for lowered, a DirectConvPrep for direct, the lowered
            dense ndarray (groups, Cout/groups, K) for dense; for ``torch`` the dense weight
            (Cout, Cin/groups, kh, kw), ndarray or tensor.
        strategy : str
            One of ``strategies("conv")``.
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups
            The convolution's geometry, as ``nn.Conv2d`` takes it (padding explicit: no "same").
        bias : array_like of float, shape (Cout,), optional
        name : str
            The layer's name, used in errors.
        conversion_seconds : float
            Recorded as the layer's conversion time (e.g. the original conversion's).

        Raises
        ------
        SparseCNNError
            Unknown strategy, bad geometry, or a format that does not fit the strategy and geometry
            (wrong type, shape, dtype, broken invariants, NaN/Inf): checked here, so the kernels,
            which index without bounds checks, never see a bad format.
        """
        label = f"layer {name!r}" if name else "SparseConv2d.from_format"
        if strategy not in _CONV_STRATEGIES:
            raise SparseCNNError(
                f"{label}: unknown conv strategy {strategy!r}; choose one of {', '.join(_CONV_STRATEGIES)}")
        cin = _count_arg(in_channels, "in_channels", label)
        cout = _count_arg(out_channels, "out_channels", label)
        g = _count_arg(groups, "groups", label)
        if cin % g or cout % g:
            raise SparseCNNError(f"{label}: groups={g} must divide in_channels={cin} and out_channels={cout}")
        spec = _ConvSpec(cin, cout, _pair_arg(kernel_size, "kernel_size", label, 1),
                         _pair_arg(stride, "stride", label, 1), _pair_arg(padding, "padding", label, 0),
                         _pair_arg(dilation, "dilation", label, 1), g)
        b = _bias_arg(bias, cout, label)
        if strategy == "torch":
            w = _dense_weight_arg(fmt, (cout, cin // g, *spec.kernel_size), label)
            conv = nn.utils.skip_init(nn.Conv2d, cin, cout, spec.kernel_size, stride=spec.stride,
                                      padding=spec.padding, dilation=spec.dilation, groups=g,
                                      bias=b is not None, dtype=w.dtype)
            with torch.no_grad():
                conv.weight.copy_(w)
                if b is not None:
                    conv.bias.copy_(torch.from_numpy(b))
            engine: Any = _TorchConv(conv.eval())
        else:
            eng_cls = _CONV_ENGINES[strategy]
            _run_check(eng_cls.check, spec, fmt, strategy, label)
            engine = eng_cls(spec, fmt, b)
        return cls(engine, spec, strategy, name, torch.device("cpu"), float(conversion_seconds))

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
        if torch.is_grad_enabled():
            with torch.no_grad():
                y = self.engine.run(x)
        else:
            y = self.engine.run(x)  # inference: skip the context manager (~4 us a call)
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
    """``x @ W.T + b`` as one GEMM through torch.addmm (BLAS). Format: the weight ndarray (M, K)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None) -> None:
        self.format = weight
        self.nbytes = int(weight.nbytes)
        self.bias = bias
        self.weight_t = torch.from_numpy(weight).t()
        self.bias_t = None if bias is None else torch.from_numpy(bias)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.format, self.bias)

    @staticmethod
    def convert(weight: np.ndarray) -> np.ndarray:
        return weight

    @staticmethod
    def check(shape: tuple[int, int], fmt: Any) -> None:
        _check_f32(fmt, "the dense weight", shape)

    def to_dense(self) -> np.ndarray:
        return self.format

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias_t is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias_t, x, self.weight_t)


class _SparseLinear:
    """CSR weights through :func:`sparsecnn.kernels.spmv.sparse_linear` (SpMV at batch 1, SpMM above).
    Format: LinearPrep."""

    def __init__(self, prep: Any, bias: np.ndarray | None) -> None:
        self.format = prep
        self.bias = bias
        self.m = int(prep.shape[0])

    @property
    def nbytes(self) -> int:
        """The format's bytes, read when asked (qspmv's counts its sliced-ELL form once built)."""
        return int(self.format.nbytes)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (_without_caches(self.format), self.bias)

    @staticmethod
    def convert(weight: np.ndarray) -> Any:
        from sparsecnn.kernels.spmv import prepare_linear

        return prepare_linear(weight)

    @staticmethod
    def check(shape: tuple[int, int], fmt: Any) -> None:
        from sparsecnn.kernels.spmv import LinearPrep

        _need(isinstance(fmt, LinearPrep), f"expected a LinearPrep, got {type(fmt).__name__}")
        _need(tuple(fmt.shape) == shape, f"expected a LinearPrep of shape {shape}, got {tuple(fmt.shape)}")
        _check_slab("LinearPrep", fmt.slab, shape)
        _check_csr_arrays("LinearPrep", fmt.indptr, fmt.indices, fmt.data, fmt.nslabs * shape[0], shape[1])
        _check_slab_columns("LinearPrep", fmt, shape)

    def to_dense(self) -> np.ndarray:
        fmt = self.format
        out = np.zeros(tuple(fmt.shape), np.float32)
        out[fmt.row_ids(), fmt.indices.astype(np.int64)] = fmt.data
        return out

    def run(self, x: torch.Tensor) -> torch.Tensor:
        from sparsecnn.kernels.spmv import sparse_linear

        x = x.detach().contiguous()
        out_np = np.empty((x.shape[0], self.m), dtype=np.float32)
        if x.shape[0]:
            sparse_linear(self.format, x.numpy(), self.bias, out_np)
        return torch.from_numpy(out_np)


class _ActSparseLinear(_SparseLinear):
    """Column-stored weights through :func:`sparsecnn.kernels.spmv_act.act_sparse_linear`, which
    skips the zero inputs. Format: ActLinearPrep."""

    @staticmethod
    def convert(weight: np.ndarray) -> Any:
        from sparsecnn.kernels.spmv_act import prepare_act_linear

        return prepare_act_linear(weight)

    @staticmethod
    def check(shape: tuple[int, int], fmt: Any) -> None:
        from sparsecnn.kernels.spmv_act import ActLinearPrep

        _need(isinstance(fmt, ActLinearPrep), f"expected an ActLinearPrep, got {type(fmt).__name__}")
        _need(tuple(fmt.shape) == shape,
              f"expected an ActLinearPrep of shape {shape}, got {tuple(fmt.shape)}")
        if fmt.dense_columns:
            _check_f32(fmt.dense_t, "ActLinearPrep.dense_t", (shape[1], shape[0]))
            return
        if fmt.masked:
            from sparsecnn.kernels.spmv_act import masked_layout_problem

            problem = masked_layout_problem(fmt)
            _need(problem is None, f"ActLinearPrep (masked layout): {problem}")
            _check_f32(fmt.data, "ActLinearPrep.data")
            return
        _need(fmt.layout in ("packed", "csc"),
              f"ActLinearPrep.layout must be 'packed' or 'csc', got {fmt.layout!r}")
        if fmt.is_packed:
            from sparsecnn.kernels.spmv_act import packed_layout_problem

            problem = packed_layout_problem(fmt)
            _need(problem is None, f"ActLinearPrep (packed layout): {problem}")
            check_finite(fmt.packed_values(), "ActLinearPrep.packed values")
            return
        rb = fmt.row_blocks
        if rb is not None:
            check_int_array(rb, "row_blocks", "ActLinearPrep")
            _need(rb.ndim == 1 and rb.size >= 2 and int(rb[0]) == 0 and int(rb[-1]) == shape[0]
                  and bool((np.diff(rb.astype(np.int64)) >= 0).all()),
                  f"ActLinearPrep.row_blocks must rise from 0 to {shape[0]}, got {rb!r}")
        nb = fmt.blocks.size - 1
        # the row-block-major CSC of W is the CSR of the nblocks stacked copies of W.T
        _check_csr_arrays("ActLinearPrep", fmt.indptr, fmt.indices, fmt.data, nb * shape[1], shape[0])
        if nb > 1 and len(fmt.indices):
            block_of = np.repeat(np.arange(nb), np.diff(fmt.indptr[:: max(shape[1], 1)].astype(np.int64)))
            rows = fmt.indices.astype(np.int64)
            blocks = fmt.blocks.astype(np.int64)
            wrong = (rows < blocks[block_of]) | (rows >= blocks[block_of + 1])
            _need(not wrong.any(),
                  f"ActLinearPrep: {int(wrong.sum())} row indices lie outside their row block")

    def to_dense(self) -> np.ndarray:
        f = self.format
        if f.dense_columns:
            return np.ascontiguousarray(f.dense_t.T)
        if f.masked:
            from sparsecnn.kernels.spmv_act import masked_to_dense

            return masked_to_dense(f)
        if f.is_packed:
            from sparsecnn.kernels.spmv_act import packed_to_dense

            return packed_to_dense(f)
        k = f.shape[1]
        # stacked column b * K + j is column j of W (its part in row block b): fold the blocks
        cols = np.repeat(np.arange(f.indptr.size - 1), np.diff(f.indptr.astype(np.int64))) % max(k, 1)
        w = np.zeros(f.shape, np.float32)
        w[f.indices.astype(np.int64), cols] = f.data
        return w

    def run(self, x: torch.Tensor) -> torch.Tensor:
        from sparsecnn.kernels.spmv_act import act_sparse_linear

        x = x.detach().contiguous()
        out_np = np.empty((x.shape[0], self.m), dtype=np.float32)
        if x.shape[0]:
            act_sparse_linear(self.format, x.numpy(), self.bias, out_np)
        return torch.from_numpy(out_np)


class _QuantSparseLinear(_SparseLinear):
    """Codebook-index CSR (Deep Compression's shared weights) through
    :func:`sparsecnn.kernels.qspmv.quant_linear`: one byte of code per nonzero instead of four of
    float. Exact for any weight (the codebook holds its distinct values). Format: QuantLinearPrep."""

    @staticmethod
    def convert(weight: np.ndarray) -> Any:
        from sparsecnn.kernels.qspmv import prepare_quant_linear

        return prepare_quant_linear(weight)

    @staticmethod
    def check(shape: tuple[int, int], fmt: Any) -> None:
        from sparsecnn.kernels.qspmv import QuantLinearPrep

        _need(isinstance(fmt, QuantLinearPrep), f"expected a QuantLinearPrep, got {type(fmt).__name__}")
        _need(tuple(fmt.shape) == shape,
              f"expected a QuantLinearPrep of shape {shape}, got {tuple(fmt.shape)}")
        _check_f32(fmt.codebook, "QuantLinearPrep.codebook")
        _need(fmt.codebook.ndim == 1 and fmt.codebook.size >= 1, "the codebook must be 1-D and not empty")
        codes = fmt.codes
        _need(isinstance(codes, np.ndarray) and codes.ndim == 1 and codes.dtype.kind == "u",
              "codes must be a 1-D unsigned integer array")
        _need(codes.size == 0 or int(codes.max()) < fmt.codebook.size, "a code points outside the codebook")
        _check_slab("QuantLinearPrep", fmt.slab, shape)
        _check_csr_arrays("QuantLinearPrep", fmt.indptr, fmt.indices, codes.astype(np.float32),
                          fmt.nslabs * shape[0], shape[1])
        _check_slab_columns("QuantLinearPrep", fmt, shape)

    def to_dense(self) -> np.ndarray:
        return self.format.to_dense()

    def run(self, x: torch.Tensor) -> torch.Tensor:
        from sparsecnn.kernels.qspmv import quant_linear

        x = x.detach().contiguous()
        out_np = np.empty((x.shape[0], self.m), dtype=np.float32)
        if x.shape[0]:
            quant_linear(self.format, x.numpy(), self.bias, out_np)
        return torch.from_numpy(out_np)


class _DirectLinear(_SparseLinear):
    """The linear layer as a 1x1 direct convolution over the batch (the items in the vector lanes),
    :func:`sparsecnn.kernels.direct_linear.direct_linear`: each loaded vector of batch items serves
    every filter of a tile's group that has the column. For batch >= 2 (at batch 1 it fills one lane
    in VW). Format: DirectConvPrep of weight shape (M, K, 1, 1)."""

    def __init__(self, prep: Any, bias: np.ndarray | None) -> None:
        self.format = prep
        self.bias = bias
        self.m = int(prep.weight_shape[0])

    @staticmethod
    def convert(weight: np.ndarray) -> Any:
        from sparsecnn.kernels.direct_linear import prepare_direct_linear

        return prepare_direct_linear(weight)

    @staticmethod
    def check(shape: tuple[int, int], fmt: Any) -> None:
        from sparsecnn.kernels.conv import DirectConvPrep

        _need(isinstance(fmt, DirectConvPrep), f"expected a DirectConvPrep, got {type(fmt).__name__}")
        _need(tuple(fmt.weight_shape) == (*shape, 1, 1),
              f"expected a DirectConvPrep of weight shape {(*shape, 1, 1)}, got {tuple(fmt.weight_shape)}")
        geom = (fmt.groups, tuple(fmt.stride), tuple(fmt.padding), tuple(fmt.dilation))
        _need(geom == (1, (1, 1), (0, 0), (1, 1)),
              f"expected a DirectConvPrep of (groups, stride, padding, dilation) "
              f"(1, (1, 1), (0, 0), (1, 1)), got {geom}")
        _check_csr_arrays("DirectConvPrep", fmt.indptr, fmt.indices, fmt.data, shape[0], shape[1])

    def to_dense(self) -> np.ndarray:
        f = self.format
        return _csr_dense(f.indptr, f.indices, f.data, (self.m, int(f.weight_shape[1])))

    def run(self, x: torch.Tensor) -> torch.Tensor:
        from sparsecnn.kernels.direct_linear import direct_linear

        x = x.detach().contiguous()
        out_np = np.empty((x.shape[0], self.m), dtype=np.float32)
        if x.shape[0]:
            direct_linear(self.format, x.numpy(), self.bias, out_np)
        return torch.from_numpy(out_np)


_LINEAR_ENGINES: dict[str, type] = {"dense": _DenseLinear, "spmv": _SparseLinear, "spmm": _SparseLinear,
                                    "spmv-act": _ActSparseLinear, "qspmv": _QuantSparseLinear,
                                    "direct": _DirectLinear}


class SparseLinear(_SparseLayer):
    """A Linear executed by one strategy (inference only). Build it with :meth:`from_dense` or
    :meth:`from_format`.

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
    def has_bias(self) -> bool:
        if isinstance(self.engine, _TorchLinear):
            return self.engine.linear.bias is not None
        return self.engine.bias is not None

    def dense_bias(self) -> np.ndarray | None:
        """The bias ``(out_features,)`` as a float32 numpy copy, or None (CPU layers)."""
        eng = self.engine
        if isinstance(eng, (_DenseLinear, _SparseLinear)):
            return None if eng.bias is None else np.array(eng.bias, np.float32)
        return self.dense_parameters()[1]

    def dense_parameters(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The dense weight ``(out_features, in_features)`` and bias (or None) this layer computes
        with, as float32 numpy copies (CPU layers)."""
        eng = self.engine
        if isinstance(eng, _TorchLinear):
            lin = eng.linear
            return (lin.weight.detach().cpu().float().numpy().copy(),
                    None if lin.bias is None else lin.bias.detach().cpu().float().numpy().copy())
        if not isinstance(eng, (_DenseLinear, _SparseLinear)):
            raise SparseCNNError(f"{_label(self.name, self)}: runs on {self.device}; only CPU sparse layers "
                                 f"can give their dense parameters")
        return (np.array(eng.to_dense(), np.float32),
                None if eng.bias is None else np.array(eng.bias, np.float32))

    @classmethod
    def from_dense(cls, linear: nn.Linear, strategy: str, *, name: str = "",
                   device: str | torch.device = "cpu") -> SparseLinear:
        """Convert a dense Linear to run with ``strategy`` (one of ``strategies("linear")``).

        Raises and warns like :meth:`SparseConv2d.from_dense`.
        """
        if not isinstance(linear, nn.Linear):
            hint = " (use SparseConv2d.from_dense for a Conv2d)" if isinstance(linear, nn.Conv2d) else ""
            raise SparseCNNError(
                f"SparseLinear.from_dense needs a torch.nn.Linear, got {type(linear).__name__}{hint}")
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
            eng_cls = _LINEAR_ENGINES[strategy]
            engine = eng_cls(eng_cls.convert(weight), bias)
        seconds = time.perf_counter() - t0
        return cls(engine, linear.in_features, linear.out_features, strategy, name, dev, seconds)

    @classmethod
    def from_format(cls, fmt: Any, strategy: str, *, in_features: int, out_features: int, bias: Any = None,
                    name: str = "", conversion_seconds: float = 0.0) -> SparseLinear:
        """A CPU layer from a format built earlier (what ``layer.format`` holds), without conversion.

        ``fmt``: a LinearPrep for spmv/spmm, the float32 weight ndarray (out_features, in_features) for
        dense, the dense weight (ndarray or tensor) for torch. Other parameters and errors as in
        :meth:`SparseConv2d.from_format`.
        """
        label = f"layer {name!r}" if name else "SparseLinear.from_format"
        if strategy not in _LINEAR_STRATEGIES:
            raise SparseCNNError(f"{label}: unknown linear strategy {strategy!r}; choose one of "
                                 f"{', '.join(_LINEAR_STRATEGIES)}")
        k = _count_arg(in_features, "in_features", label)
        m = _count_arg(out_features, "out_features", label)
        b = _bias_arg(bias, m, label)
        if strategy == "torch":
            w = _dense_weight_arg(fmt, (m, k), label)
            lin = nn.utils.skip_init(nn.Linear, k, m, bias=b is not None, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(torch.from_numpy(b))
            engine: Any = _TorchLinear(lin.eval())
        else:
            eng_cls = _LINEAR_ENGINES[strategy]
            _run_check(eng_cls.check, (m, k), fmt, strategy, label)
            engine = eng_cls(fmt, b)
        return cls(engine, k, m, strategy, name, torch.device("cpu"), float(conversion_seconds))

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
        if torch.is_grad_enabled():
            with torch.no_grad():
                y = self.engine.run(x.reshape(-1, self.in_features))
        else:
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
            eng = _LoweredConv(spec, _LoweredConv.convert(spec, weight, blocksize=blocksize), bias)
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
        return _LINEAR_FOR_CONV.get(strategy, strategy)
    return strategy if strategy in _CONV_STRATEGIES else _CONV_FOR_LINEAR[strategy]


def _numba_pools(model: nn.Module) -> None:
    """Turn ``model``'s torch ``MaxPool2d`` and ``LocalResponseNorm`` modules into the zoo's subclasses
    (same parameters and hooks; :class:`sparsecnn.models.zoo.MaxPool2d`), which run the executor's
    numba passes in CPU inference. Why: torch's CPU max pool takes 1.5-1.9 ms for AlexNet's pool1 at
    batch 1 (the numba pass 0.1-0.15 ms; 2 threads), and its LRN is a 3-D average pool of squares."""
    from sparsecnn.models.zoo import LocalResponseNorm, MaxPool2d

    for m in model.modules():
        if type(m) is nn.MaxPool2d:
            m.__class__ = MaxPool2d
        elif type(m) is nn.LocalResponseNorm:
            m.__class__ = LocalResponseNorm


def sparsify(
    model: nn.Module,
    strategy: str | Mapping[str, str] = "auto",
    *,
    measure: bool = True,
    example_input: torch.Tensor | None = None,
    plan_path: Any = None,
    device: str | torch.device = "cpu",
    blocksize: tuple[int, int] = (4, 4),
    cost_model: Any = None,
    shrink: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose Conv2d and Linear layers run sparse; the rest stays torch, but for
    max pooling and LRN, which run numba passes in CPU inference (max pooling bit for bit, LRN within
    3e-7 relative).

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
        ``"auto"`` only: True times every candidate on the layer's real input (interleaved rounds,
        medians) and keeps the fastest sparse one if it beats ``torch`` by at least
        ``sparsecnn.plan.DEFAULT_MARGIN`` (4%), else ``torch``; False decides the same way from the
        cost model in :mod:`sparsecnn.plan`.
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
    cost_model : sparsecnn.plan.CostModel, optional
        ``"auto"`` with ``measure=False`` only: the constants to estimate with (default: the ones
        calibrated on the project's machine; :func:`sparsecnn.plan.calibrate` fits them to this one).
    shrink : bool
        First remove the all-zero filters and unread input channels that structured pruning (SSL)
        left, physically (:func:`sparsecnn.shrink.shrink`, checked on ``example_input``), so the
        compact layers run fewer FLOPs. Off by default: the shrunk layers have fewer channels than
        the original architecture (a plan or checkpoint made for it no longer fits them).

    Returns
    -------
    torch.nn.Module
        The copy, in eval mode, with attribute ``sparsecnn_plan`` (the :class:`~sparsecnn.plan.Plan`
        that was applied, with per-layer sources and timings) and, with ``shrink=True``, attribute
        ``sparsecnn_shrink`` (the :class:`~sparsecnn.shrink.ShrinkResult`, without its model).
    """
    from sparsecnn.plan import LayerChoice, Plan, auto_plan

    if not isinstance(model, nn.Module):
        raise SparseCNNError(f"sparsify needs a torch.nn.Module, got {type(model).__name__}")
    _check_device(device)
    shrunk = None
    if shrink:
        from sparsecnn.plan import _example_input
        from sparsecnn.shrink import shrink as _shrink

        shrunk = _shrink(model, _example_input(model) if example_input is None else example_input)
        copy_ = shrunk.model
    else:
        copy_ = copy.deepcopy(model).eval()
    targets = _targets(copy_)
    built: dict[str, nn.Module] = {}
    if isinstance(strategy, str) and strategy == "auto":
        plan, built = auto_plan(copy_, targets, measure=measure, example_input=example_input,
                                plan_path=plan_path, device=device, blocksize=blocksize,
                                cost_model=cost_model)
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
    if torch.device(device).type == "cpu":
        _numba_pools(copy_)
    applied: dict[str, Any] = {}
    for name, choice in plan.layers.items():
        layer = built.get(name)
        if layer is None:
            layer = _convert(targets[name], choice.strategy, name, device, blocksize)
        _set_submodule(copy_, name, layer)
        same = layer.strategy == choice.strategy
        applied[name] = choice if same else LayerChoice(layer.strategy, "fallback")
    copy_.sparsecnn_plan = Plan(applied)
    if shrunk is not None:
        copy_.sparsecnn_shrink = dataclasses.replace(shrunk, model=None)
    return copy_
