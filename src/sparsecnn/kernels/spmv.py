"""Sparse fully connected layers: ``out = x @ W.T + bias`` with ``W`` (M, K) stored as CSR.

At batch 1 the layer is a sparse matrix-vector product (spmv) and is bound by the bytes of the weights
streamed from memory: 4 bytes of value plus the index per nonzero, against 4 bytes per dense weight.
The column indices are therefore stored in the narrowest dtype that fits ``K`` (uint16 for ``K <= 65536``,
which covers AlexNet's fc6 with ``K = 9216``), halving the index bytes of a plain int32 CSR
(the point of Deep Compression's relative indices, Han et al. ICLR 2016, without its 4-bit
padding entries).

Column slabs: at batch 1 the kernel gathers one ``x[indices[k]]`` per nonzero, and once ``x`` is larger
than the L1 data cache (fc6's 9216 inputs are 36 KB, VGG-16's 25088 are 98 KB) every gather is an
L2 access and the kernel runs at half the speed it has with ``x`` in L1 (fc7's 4096 inputs). A layer
with ``K`` above ``SLAB`` columns therefore stores its nonzeros *slab-major*: the columns are cut
into ``S`` equal slabs of at most ``SLAB`` (16 KB of ``x``), and the nonzeros of slab 0 (row by row),
then of slab 1, ... form one stacked CSR of ``S * M`` rows; the kernel adds slab after slab into ``y``.
The copy must be physical: the same CSR walked in place slab by slab (split pointers into each
row) ran 2x *slower*, its 1 KB runs with 2 KB gaps defeating the hardware prefetchers.
Measured on AlexNet's fc6 at 91% (2 threads, batch 1, interleaved, weights cold / cached): 1.31 ->
0.70 ms / 1.21 -> 0.54 ms (2.0-2.2x); VGG-16's fc6 4.0 -> 1.8 ms; fc7 (K = 4096, one slab) unchanged.
At batch > 1 the same CSR drives a sparse x dense product (spmm) on a transposed copy
of the input, so every nonzero multiplies one contiguous row of ``B`` inputs, held in vector
registers across a whole output row (the register tiles of :mod:`sparsecnn.kernels._simd`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numba
import numpy as np

from sparsecnn.kernels._numba import (
    PerThread,
    aligned_zeros,
    balanced_bounds,
    num_threads,
    pjit,
    serial_twin,
    thread_rows,
)
from sparsecnn.kernels._simd import NV_MAX, NV_MAX8, RW, VW, row_dot, span_tile, span_tile8, tile_split

__all__ = ["SLAB", "LinearPrep", "bind_sparse_linear", "prepare_linear", "slab_order", "slab_row_ids",
           "slab_width", "sparse_linear"]


def _padded_batch(batch: int) -> int:
    """Columns of the transposed input of the spmm: the batch rounded up to whole vectors, of ``RW``
    (8) floats up to a batch of 8, of ``VW`` above. Where ``VW`` is 16, a zmm row at batch 2-8
    computes 8 or more lanes for nothing and doubles the transposed input's bytes. On Emerald Rapids,
    at 2 threads and 91% sparsity, the two were interleaved in one process over two runs. fc6 at batch
    2 / 4 / 8 took 2.3-3.6 / 2.1-2.8 / 2.2-2.9 ms with 8-lane rows, against 3.9-5.8 / 3.5-4.5 /
    1.5-4.7 ms with 16-lane rows. fc7 took 0.85-1.01 / 0.74-0.84 / 1.18-1.32 ms, against
    2.2 / 0.92-1.72 / 0.95-1.74 ms. One sample of twelve (batch 8, first run) favoured the
    16-lane rows."""
    return RW if batch <= RW else -(-batch // VW) * VW


@dataclass(eq=False)
class _Workspace:
    xt: np.ndarray  # (K, Bp) transposed input, Bp = B rounded up to VW (batch > 1 only; pad lanes 0)
    acc: np.ndarray  # (M, Bp) every output row's sums with slabs, else (nparts, Bp) (batch > 1 only)
    bounds: np.ndarray  # (nparts + 1,) row ranges with balanced nonzero counts


@dataclass(eq=False)
class LinearPrep:
    """CSR weights ready for :func:`sparse_linear`, stored slab-major when ``slab`` is set.

    Attributes
    ----------
    shape : tuple of int, (M, K)
    indptr : ndarray, shape (S * M + 1,), int32 (int64 when nnz does not fit int32)
        Row ``m`` of slab ``s`` is ``indptr[s * M + m]:indptr[s * M + m + 1]``; ``S = 1`` (a plain CSR)
        when ``slab`` is 0.
    indices : ndarray, shape (nnz,), uint16 when K <= 65536 else uint32
        Column indices (absolute), sorted within each row of each slab; slab ``s`` holds the columns
        ``s * slab <= j < (s + 1) * slab``.
    data : ndarray, shape (nnz,), float32
    slab : int
        Columns per slab (see the module docstring), 0 for no slabs.
    """

    shape: tuple[int, int]
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    slab: int = 0
    _workspaces: PerThread = field(default_factory=PerThread, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.data.size)

    @property
    def nslabs(self) -> int:
        """``S``: column slabs the nonzeros are stored in (1 without slabs)."""
        return -(-self.shape[1] // self.slab) if self.slab else 1

    def row_ids(self) -> np.ndarray:
        """The output row ``m`` of every stored nonzero, int64, shape (nnz,)."""
        return slab_row_ids(self.indptr, self.shape[0])

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored sparse weights: values, indices and pointers at their dtypes."""
        return int(self.indptr.nbytes + self.indices.nbytes + self.data.nbytes)

    def workspace(self, batch: int) -> _Workspace:
        nparts = num_threads()
        key = (batch, nparts)
        ws = self._workspaces.get(key)
        if ws is None:
            m, k = self.shape
            per_row = np.diff(self.indptr).astype(np.int64).reshape(self.nslabs, m).sum(axis=0)
            cost = per_row + 4 * self.nslabs  # a row also costs its store and setup, per slab
            bounds = balanced_bounds(cost, nparts)
            bp = _padded_batch(batch)
            ws = _Workspace(
                xt=aligned_zeros((k, bp) if batch > 1 else (0, VW)),
                # per-thread sums (without slabs) on a cache line each: rows of 8 floats side by side
                # put both threads' sums in one line, rewritten at every output row
                acc=aligned_zeros((m if batch > 1 else 0, bp)) if self.slab else
                thread_rows(nparts if batch > 1 else 0, bp),
                bounds=bounds,
            )
            self._workspaces[key] = ws
        return ws


def slab_row_ids(indptr: np.ndarray, m: int) -> np.ndarray:
    """The output row of every nonzero of a stacked slab-major CSR (``indptr`` of ``S * m + 1``)."""
    stacked = np.arange(indptr.size - 1, dtype=np.int64) % max(m, 1)
    return np.repeat(stacked, np.diff(indptr.astype(np.int64)))


# Most columns per slab: 16 KB of x, half of a 32 KB L1 data cache (Zen 3/4 and most x86 cores), the
# rest left to the streamed weights. Slabs are equal: fc6's 9216 columns are 3 of 3072.
SLAB = 4096


def slab_width(k: int, slab: int | None = None) -> int:
    """Columns per slab for ``K = k`` inputs: 0 (no slabs) when ``k <= slab`` (default ``SLAB``), else
    ``ceil(k / S)`` for the fewest ``S`` slabs of at most ``slab`` columns."""
    limit = SLAB if slab is None else int(slab)
    if limit <= 0 or k <= limit:
        return 0
    n = -(-k // limit)
    return -(-k // n)


def slab_order(rows: np.ndarray, cols: np.ndarray, m: int, k: int,
               width: int) -> tuple[np.ndarray, np.ndarray]:
    """The stacked slab-major CSR of nonzeros given in row-major order (sorted by row, then column).

    Parameters
    ----------
    rows, cols : ndarray, shape (nnz,), int
        Row and column of every nonzero, row-major.
    m, k : int
        The matrix shape.
    width : int
        Columns per slab (:func:`slab_width`), 0 for one slab.

    Returns
    -------
    indptr : ndarray, shape (S * m + 1,), int32 (int64 when nnz does not fit int32)
    order : ndarray, shape (nnz,), int64
        The nonzeros in stored order: ``cols[order]`` are the stored column indices.
    """
    nslabs = -(-k // width) if width else 1
    rows = np.asarray(rows, dtype=np.int64)
    stacked = rows if not width else (np.asarray(cols, dtype=np.int64) // width) * m + rows
    order = np.argsort(stacked, kind="stable") if width else np.arange(rows.size)
    indptr = np.zeros(nslabs * m + 1, dtype=np.int32 if rows.size <= np.iinfo(np.int32).max else np.int64)
    np.cumsum(np.bincount(stacked, minlength=nslabs * m), out=indptr[1:])
    return indptr, order


def prepare_linear(weight: np.ndarray, slab: int | None = None) -> LinearPrep:
    """Convert a dense ``(M, K)`` weight matrix to (slab-major) CSR with the narrowest index dtype.

    Parameters
    ----------
    weight : ndarray, shape (M, K), float32
        Exact zeros are dropped.
    slab : int, optional
        Most columns per slab (default ``SLAB``; 0 for a plain CSR), see the module docstring.
    """
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    m, k = weight.shape
    width = slab_width(k, slab)
    rows, cols = np.nonzero(weight)  # row-major: sorted by row, then column
    indptr, order = slab_order(rows, cols, m, k, width)
    # Unsigned: numba skips the negative-index check on unsigned indices (see _spmv).
    index_dtype = np.uint16 if k <= np.iinfo(np.uint16).max + 1 else np.uint32
    return LinearPrep(
        shape=(m, k),
        indptr=indptr,
        indices=np.ascontiguousarray(cols[order].astype(index_dtype)),
        data=np.ascontiguousarray(weight[rows[order], cols[order]]),
        slab=width,
    )


def sparse_linear(prep: LinearPrep, x: np.ndarray, bias: np.ndarray | None, out: np.ndarray,
                  relu: bool = False) -> None:
    """``out = x @ W.T + bias``; ``relu(x @ W.T + bias)`` with ``relu``, applied as each output is
    written (NaN stays NaN, as with ``torch.relu``).

    Parameters
    ----------
    prep : LinearPrep
    x : ndarray, shape (B, K), float32, C-contiguous
    bias : ndarray, shape (M,), float32, or None
    out : ndarray, shape (B, M), float32
        Written in full.
    relu : bool
        Fuse a ReLU into the output.
    """
    batch = x.shape[0]
    ws = prep.workspace(batch)
    has_bias = bias is not None
    b = bias if has_bias else prep.data[:0]
    if batch == 1:
        _spmv(prep.indptr, prep.indices, prep.data, x[0], b, has_bias, out[0], ws.bounds, bool(relu))
    else:
        _transpose(x, ws.xt)
        _spmm(prep.indptr, prep.indices, prep.data, ws.xt, b, has_bias, out, ws.acc, ws.bounds, bool(relu))


# Below this many nonzeros x batch a bound layer runs the serial kernels (see bind_sparse_linear).
_SERIAL_MACS = 1 << 15


def bind_sparse_linear(prep: LinearPrep, batch: int, bias: np.ndarray | None, out: np.ndarray,
                       relu: bool = False) -> Callable[[np.ndarray], None]:
    """``run(x)``: :func:`sparse_linear` ``(prep, x, bias, out, relu)`` for batches of ``batch``, every
    argument but ``x`` bound once (the whole-model executor's steps).

    The callable uses the calling thread's workspace of ``prep`` (as :func:`sparse_linear` does), so
    it must be called from the thread that bound it (the executor binds per thread). Below
    ``_SERIAL_MACS`` multiply-adds the serial twins run (no parallel launch).

    Parameters
    ----------
    prep : LinearPrep
    batch : int
    bias : ndarray, shape (M,), float32, or None
    out : ndarray, shape (batch, M), float32, C-contiguous
    relu : bool

    Returns
    -------
    callable
        ``run(x)`` with ``x`` of shape ``(batch, K)``, float32.
    """
    m = prep.shape[0]
    if not out.flags.c_contiguous or out.shape != (batch, m):
        raise ValueError(f"bind_sparse_linear: out must be C-contiguous of shape {(batch, m)}")
    ws = prep.workspace(batch)  # this thread's (the executor binds per thread and calls in turn)
    has_bias = bias is not None
    b = bias if has_bias else prep.data[:0]
    small = prep.nnz * batch < _SERIAL_MACS
    if batch == 1:
        spmv = _spmv_serial if small else _spmv
        y = out[0]
        args = (b, has_bias, y, ws.bounds, bool(relu))

        def run_spmv(x: np.ndarray) -> None:
            spmv(prep.indptr, prep.indices, prep.data, x[0], *args)

        return run_spmv
    xt = ws.xt
    transpose = _transpose_serial if small else _transpose
    spmm = _spmm_serial if small else _spmm
    sargs = (b, has_bias, out, ws.acc, ws.bounds, bool(relu))

    def run_spmm(x: np.ndarray) -> None:
        transpose(x, xt)
        spmm(prep.indptr, prep.indices, prep.data, xt, *sargs)

    return run_spmm


@pjit
def _spmv(indptr, indices, data, x, bias, has_bias, y, bounds, relu):
    """CSR spmv, rows split in nnz-balanced ranges, one per thread; slab after slab (``indptr`` of
    ``S * M + 1`` entries, see the module docstring), each adding into ``y``.

    Each row is one :func:`sparsecnn.kernels._simd.row_dot`: eight independent partial sums (lanes
    of one vector accumulator) hide the FMA latency, and each block of eight nonzeros is one vector
    load of values, eight scalar loads of x into one vector and one vector FMA. The scalar loop it
    replaced (eight ``fmadd`` chains, the same sums bit for bit) cost three loads per nonzero. On
    AlexNet's FC layers at Deep Compression's sparsity, batch 1, 2 threads, interleaved with it: fc6
    / fc7 / fc8 1.10x / 1.38x / 1.26x with the weights as cached as they get, 1.01x / 1.34x / 1.10x
    with them evicted before each call (fc6's 20 MB then stream from memory, where the bytes bound
    both). With ``relu``, ``max(y, 0)`` with NaN kept, as each row is written.
    NOTE: indices are valid columns of x; indptr.size - 1 is a multiple of y.size.
    """
    nparts = bounds.size - 1
    nrow = y.size
    nslabs = (indptr.size - 1) // max(nrow, 1)
    for part in numba.prange(nparts):
        for sl in range(nslabs):
            last = sl == nslabs - 1
            for m in range(bounds[part], bounds[part + 1]):
                r = sl * nrow + m
                k0 = indptr[r]
                s = row_dot(x, indices, data, k0, indptr[r + 1] - k0)
                if sl == 0:
                    v = s + bias[m] if has_bias else s
                else:
                    v = y[m] + s
                y[m] = v if not last or not relu or not v <= 0 else np.float32(0.0)  # NaN kept, as torch.relu


@pjit
def _transpose(x, xt):
    """``xt[k, b] = x[b, k]`` for every element of ``x`` (B, K) (``xt`` may have more columns: they are
    left as they are), in blocks of 64 along the longer axis, in parallel, so both sides stay in
    cache: the inputs of a batch (K long) for spmm, the outputs of ``direct_linear`` (B = M long)."""
    nb, nk = x.shape
    if nk >= nb:
        for blk in numba.prange((nk + 63) // 64):
            k0 = blk * 64
            k1 = min(nk, k0 + 64)
            for b in range(nb):
                for k in range(k0, k1):
                    xt[k, b] = x[b, k]
    else:
        for blk in numba.prange((nb + 63) // 64):
            b0 = blk * 64
            b1 = min(nb, b0 + 64)
            for k in range(nk):
                for b in range(b0, b1):
                    xt[k, b] = x[b, k]


@pjit
def _spmm(indptr, indices, data, xt, bias, has_bias, out, acc, bounds, relu):
    """CSR x dense: ``out[:, m] = sum_k data[k] * xt[indices[k], :]`` (+ bias).

    Each output row's batch-wide values stay in vector registers across all of the row's nonzeros of
    one slab (:func:`sparsecnn.kernels._simd.span_tile` with the row length of ``xt`` as the offset
    stride): one broadcast weight and one FMA per 8 batch entries, no stores in the inner loop; with
    ``relu`` the last slab's tile store applies ``max(., 0)`` (NaN kept).

    With column slabs (``indptr`` of ``S * M + 1`` entries) the loop runs slab by slab over all the
    thread's rows, each row's sums kept in ``acc[m]`` between slabs, so the rows of ``xt`` a slab
    reads (3072 x 128 bytes for fc6 at batch 32) stay in L2 while the thread's rows pass over them.
    Row by row, with every slab inside (the order before), each row read from all of ``xt``, which
    for fc6 at batch 32 (1.2 MB) and VGG-16's fc6 (3.2 MB) is more than L2 holds. Measured at 2
    threads, 91% sparse, old and new interleaved: fc6 at batch 8 1.18x, at batch 32 1.01-1.43x over
    four runs (the machine's noise is +-15% there), VGG-16's fc6 (7 slabs) 1.51x / 1.33x at batch 8
    / 32. Without slabs (fc7) one row of ``acc`` per thread serves every row, as before: kept in
    ``acc[m]``, fc7 at batch 32 ran 0.85x with the weights cold (512 KB more written).
    NOTE: xt is (K, Bp) C-contiguous with Bp a multiple of VW, or RW (:func:`_padded_batch`); acc is
    (M, Bp) with slabs, else at least (nparts, Bp); indptr.size - 1 is a multiple of out.shape[1].
    """
    nb, nrow = out.shape
    bp = xt.shape[1]
    x = xt.reshape(xt.size)
    narrow = bp % VW != 0  # rows of RW floats (a batch of at most 8 where VW is 16): span_tile8
    lw, nmax = (RW, NV_MAX8) if narrow else (VW, NV_MAX)
    nvec = bp // lw
    ntiles = (nvec + nmax - 1) // nmax
    nparts = bounds.size - 1
    nslabs = (indptr.size - 1) // max(nrow, 1)
    for part in numba.prange(nparts):
        for sl in range(nslabs):
            last = relu and sl == nslabs - 1
            for m in range(bounds[part], bounds[part + 1]):
                a = acc[m] if nslabs > 1 else acc[part]
                bv = bias[m] if has_bias else np.float32(0.0)
                r = sl * nrow + m
                for t in range(ntiles):
                    v0, nv = tile_split(nvec, t, ntiles)
                    k0, k1, p = indptr[r], indptr[r + 1], v0 * lw
                    if narrow:
                        span_tile8(x, indices, data, k0, k1, p, a, p, nv, nv * lw, bv, sl > 0, bp, last)
                    else:
                        span_tile(x, indices, data, k0, k1, p, a, p, nv, nv * lw, bv, sl > 0, bp, last)
                if nslabs == 1:
                    for j in range(nb):
                        out[j, m] = a[j]
        if nslabs > 1:
            for m in range(bounds[part], bounds[part + 1]):
                for j in range(nb):
                    out[j, m] = acc[m, j]


_spmv_serial = serial_twin(_spmv)
_transpose_serial = serial_twin(_transpose)
_spmm_serial = serial_twin(_spmm)
