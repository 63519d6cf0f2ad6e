"""Quantized sparse fully connected layers: CSR whose values are codebook indices (Deep Compression).

Deep Compression (Han, Mao & Dally, ICLR 2016, Sec. 3) shares the weights of a layer through a small
codebook: each stored weight is a ``b``-bit index into ``2**b`` centroids. Run in that form, a nonzero
costs one byte of code (uint8 for codebooks up to 256 entries) plus its column (uint16 for ``K <= 65536``)
instead of four bytes of float32 plus the column, so an FC layer at batch 1, bound by the bytes streamed
from memory, moves half as many (3 bytes against 6 per nonzero). The codebook itself (at most 256 floats,
1 KiB) stays in L1, so the lookup ``codebook[code]`` costs a load from L1 per nonzero.

The format is exact for any float32 weight: its codebook holds the distinct nonzero values (uint16 codes
above 256 of them, uint32 above 65536), so it runs every linear layer, but it only moves fewer bytes than
float CSR when the weights are quantized.

Above ``SLAB`` inputs the nonzeros are stored in column slabs, slab-major, as the float CSR of
:mod:`sparsecnn.kernels.spmv` (so ``x``'s gathered part stays in L1; the row-wise kernel's sums are
the same as float CSR's, bit for bit).

Batch 1 with a codebook of at most 32 entries (Deep Compression's 5-bit FC layers) on a CPU with
AVX-512 runs a second layout built from the CSR, :class:`EllForm` (sliced ELL: blocks of 16 rows,
slabs of 32 columns; :func:`sparsecnn.kernels._simd.code_ell_block`). The row-wise kernel is bound by
gathering ``x``: eight scalar loads and inserts per eight nonzeros, the same work as float CSR's, so
its half-size codes bought nothing once the weights were cached (0.88-0.89x float CSR warm, 1.04x
cold on fc6). In the ELL form both the inputs (32 per slab) and the codebook (32) sit in registers,
and 16 nonzeros cost one ``vpermi2ps`` each for inputs and weights and one FMA. It pads each slab's
row lists to the block's longest (2.1 entries per nonzero at 91% random sparsity, 4.2 bytes) and is
used where that stays under ``ELL_MAX_PADDING`` entries per nonzero. Measured (Zen 4, 2 threads,
batch 1, 91%, 5-bit, ``python -m benchmarks.qspmv``): fc6 / fc7 1.46-1.52x / 1.33-1.36x float CSR
warm, 1.25x / 1.21x cold (one run; cold runs vary +-10%). Its sums run in another order than float
CSR's (lanes of 16 rows, four accumulators): equal to rounding, not bit for bit.

Batches of 2 to ``ELL_MAX_BATCH`` (8) run the same form in passes of up to ``ELL_PASS`` (4) images,
one entry load and codebook lookup per round serving all of them (:func:`_qspmm_ell`): fc6 at batch
2 / 8 0.56 / 1.36 ms against the float spmm's 1.72 / 1.43 ms (caches flushed). Larger batches, and
layers without the ELL form, run the float spmm on the dequantized values
(:meth:`QuantLinearPrep.float_values`); the scalar loop over the codes that ran every batch above 1
before (6.2-8.3 ms on fc6) is left for ``spmm=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numba
import numpy as np

from sparsecnn.kernels._numba import (
    PerThread,
    balanced_bounds,
    jit,
    num_threads,
    pjit,
    serial_twin,
    thread_rows,
)
from sparsecnn.kernels._simd import (
    ELL_COL_BITS,
    ELL_ROWS,
    ELL_SLAB,
    ELL_VALID,
    HAS_TABLE32,
    TABLE,
    code_ell_block,
    code_ell_block2,
    code_ell_block2_finite,
    code_ell_block4,
    code_ell_block4_finite,
    code_row_dot,
    code_row_dot32,
    fmadd,
)
from sparsecnn.kernels.spmv import LinearPrep, bind_sparse_linear, slab_order, slab_row_ids, slab_width

__all__ = ["QuantLinearPrep", "bind_quant_linear", "prepare_quant_linear", "quant_linear",
           "quant_prep_from_codes"]


@dataclass(eq=False)
class _Workspace:
    xt: np.ndarray  # (K, B) transposed input (batch > 1 only)
    bounds: np.ndarray  # (nparts + 1,) row ranges with balanced nonzero counts
    # batch 1 in the sliced-ELL form (else empty): each thread's zero-padded copy of x, (nparts, 32 S);
    # its range of row blocks (balanced entry counts); the blocks' sums before bias, (nblk * 16,)
    xpad: np.ndarray | None = None
    blocks: np.ndarray | None = None
    sums: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class EllForm:
    """The sliced-ELL layout of a quantized layer for batch 1 (:func:`sparsecnn.kernels._simd.
    code_ell_block`): rows in blocks of ``ELL_ROWS`` (16), columns in slabs of ``ELL_SLAB`` (32); per
    block and slab, ``cnt`` rounds of 16 uint16 entries, lane r holding row r's next nonzero of the
    slab as ``column - 32 s | code << 5 | ELL_VALID`` (0: none).

    Attributes
    ----------
    entries : ndarray, shape (16 * rounds,), uint16
    cnt : ndarray, shape (nblk * nslab,), uint8
        Rounds per (block, slab): the longest row list of the block in the slab (<= 32).
    eptr : ndarray, shape (nblk + 1,), int64
        Block b's entries start at ``eptr[b]``.
    nslab : int
    """

    entries: np.ndarray
    cnt: np.ndarray
    eptr: np.ndarray
    nslab: int

    @property
    def nbytes(self) -> int:
        return int(self.entries.nbytes + self.cnt.nbytes + self.eptr.nbytes)


# The sliced-ELL form runs batch 1 where it holds at most this many entries per nonzero (padding:
# 2.1 on random 91% sparsity; a block whose rows differ much in length pads more).
ELL_MAX_PADDING = 3.0
# Off: batch 1 always runs the row-wise kernel (benchmarks/qspmv.py's comparison).
USE_ELL = True


@dataclass(eq=False)
class QuantLinearPrep:
    """Codebook-index CSR weights ready for :func:`quant_linear`: ``W[i, indices[e]] = codebook[codes[e]]``.

    Attributes
    ----------
    shape : tuple of int
        ``(M, K)``.
    indptr : ndarray, shape (S * M + 1,), int32 (int64 when nnz does not fit int32)
        Row ``m`` of slab ``s`` is ``indptr[s * M + m]:indptr[s * M + m + 1]`` (``S = 1`` without slabs).
    indices : ndarray, shape (nnz,), uint16 when K <= 65536 else uint32; columns, sorted per row of a slab
    codes : ndarray, shape (nnz,), uint8 for codebooks of <= 256 entries, else uint16 / uint32
    codebook : ndarray, shape (n_codes,), float32
    slab : int
        Columns per slab, 0 for none (as :class:`sparsecnn.kernels.spmv.LinearPrep`).
    """

    shape: tuple[int, int]
    indptr: np.ndarray
    indices: np.ndarray
    codes: np.ndarray
    codebook: np.ndarray
    slab: int = 0
    _workspaces: PerThread = field(default_factory=PerThread, repr=False)
    _table: np.ndarray | None = field(default=None, repr=False)
    _ell: EllForm | None = field(default=None, repr=False)
    _ell_checked: bool = field(default=False, repr=False)
    _float: LinearPrep | None = field(default=None, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.codes.size)

    @property
    def nbytes(self) -> int:
        """Exact bytes of the weights held: codes, columns, pointers and the codebook at their dtypes
        (the codebook as the 32-float table the batch-1 kernel reads, where it uses one), plus the
        sliced-ELL form once batch 1 has built it (:meth:`ell`)."""
        book = TABLE * 4 if self.uses_table else self.codebook.nbytes
        return int(self.indptr.nbytes + self.indices.nbytes + self.codes.nbytes + book + self._derived_nbytes)

    @property
    def _derived_nbytes(self) -> int:
        ell = self._ell.nbytes if self._ell is not None else 0
        return ell + (self._float.data.nbytes if self._float is not None else 0)

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the codebook-index CSR alone (what a file stores), without the run-time forms
        (:meth:`ell`, :meth:`float_values`)."""
        return self.nbytes - self._derived_nbytes

    @property
    def nslabs(self) -> int:
        """``S``: column slabs the nonzeros are stored in (1 without slabs)."""
        return -(-self.shape[1] // self.slab) if self.slab else 1

    @property
    def uses_table(self) -> bool:
        """Whether batch 1 looks codes up in registers (:func:`_qspmv` with ``table``: uint8 codes of
        at most ``TABLE`` entries)."""
        return self.codes.dtype == np.uint8 and self.codebook.size <= TABLE

    def table(self) -> np.ndarray:
        """The codebook zero-padded to ``TABLE`` (32) floats, for the register lookup of
        :func:`_qspmv` with ``table`` (codebooks of at most 32 entries); built once."""
        t = self._table
        if t is None:
            t = np.zeros(TABLE, dtype=np.float32)
            t[: self.codebook.size] = self.codebook[:TABLE]
            self._table = t
        return t

    def ell(self) -> EllForm | None:
        """The sliced-ELL form that batch 1 runs (:class:`EllForm`), built on first use and kept beside
        the CSR; None where it does not apply: no AVX-512 (``HAS_TABLE32``), a codebook of more than
        32 entries, or more than ``ELL_MAX_PADDING`` entries per nonzero."""
        if not self._ell_checked:
            ell = None
            if USE_ELL and HAS_TABLE32 and self.uses_table and self.nnz:
                ell = _build_ell(self)
                if ell.entries.size > ELL_MAX_PADDING * self.nnz:
                    ell = None
            self._ell, self._ell_checked = ell, True
        return self._ell

    def float_values(self) -> LinearPrep:
        """The float CSR that batches above 1 run (:func:`sparsecnn.kernels.spmv.bind_sparse_linear`'s
        spmm): this CSR's pointers and columns (shared, not copied) with ``codebook[codes]`` as float32
        values (4 bytes per nonzero more), built on first use. The row-wise codes kernel it replaces
        there looked each weight up per batch column in a scalar loop: fc6 at 91%, batch 2 / 8 / 32,
        6.2 / 6.7 / 7.9 ms against the float spmm's 1.6 / 1.3 / 4.1 ms (2 threads)."""
        fl = self._float
        if fl is None:
            values = np.ascontiguousarray(self.codebook[self.codes], dtype=np.float32)
            fl = LinearPrep(self.shape, self.indptr, self.indices, values, self.slab)
            self._float = fl
        return fl

    def to_dense(self) -> np.ndarray:
        """The dense weight, shape (M, K), float32."""
        m, k = self.shape
        out = np.zeros((m, k), dtype=np.float32)
        rows = slab_row_ids(self.indptr, m)
        out[rows, self.indices.astype(np.int64)] = self.codebook[self.codes.astype(np.int64)]
        return out

    def workspace(self, batch: int) -> _Workspace:
        nparts = num_threads()
        key = (batch, nparts)
        ws = self._workspaces.get(key)
        if ws is None:
            m, k = self.shape
            per_row = np.diff(self.indptr).astype(np.int64).reshape(self.nslabs, m).sum(axis=0)
            cost = per_row + 4 * self.nslabs  # a row also costs its store and setup, per slab
            bounds = balanced_bounds(cost, nparts)
            ws = _Workspace(xt=np.zeros((k, batch) if batch > 1 else (0, 1), dtype=np.float32),
                            bounds=bounds)
            ell = self.ell() if batch <= ELL_MAX_BATCH else None
            if ell is not None:
                # a block costs its rounds and, per slab, its count and input loads
                ws.blocks = balanced_bounds(np.diff(ell.eptr) // ELL_ROWS + 2 * ell.nslab, nparts)
                if batch == 1:
                    ws.xpad = np.zeros((nparts, ell.nslab * ELL_SLAB), dtype=np.float32)
                    ws.sums = np.zeros((ell.eptr.size - 1) * ELL_ROWS, dtype=np.float32)
                else:
                    ws.xpad = np.zeros((nparts, ELL_PASS, ell.nslab * ELL_SLAB), dtype=np.float32)
                    ws.sums = thread_rows(nparts, ELL_PASS * ELL_ROWS)  # a cache line per thread's sums
            self._workspaces[key] = ws
        return ws


def _build_ell(prep: QuantLinearPrep, chunk_nnz: int = 1 << 20) -> EllForm:
    """The :class:`EllForm` of ``prep``, vectorised over the nonzeros of about ``chunk_nnz`` at a time
    (whole row blocks), so building it holds a few arrays of one chunk, not of the whole layer."""
    m, k = prep.shape
    nslab = -(-k // ELL_SLAB)
    nblk = -(-m // ELL_ROWS)
    ptr = prep.indptr.astype(np.int64)
    nslabs = prep.nslabs  # the stacked CSR's column slabs (not the ELL's)
    per_row = (ptr[1:] - ptr[:-1]).reshape(nslabs, m).sum(axis=0)
    per_block = np.bincount(np.arange(m) // ELL_ROWS, weights=per_row, minlength=nblk).astype(np.int64)
    done = np.concatenate(([0], np.cumsum(per_block)))
    cnt = np.zeros(nblk * nslab, dtype=np.uint8)
    eptr = np.zeros(nblk + 1, dtype=np.int64)
    parts: list[np.ndarray] = []
    b0 = 0
    while b0 < nblk:
        b1 = max(b0 + 1, int(np.searchsorted(done, done[b0] + chunk_nnz, side="right")) - 1)
        b1 = min(b1, nblk)
        lo, hi = b0 * ELL_ROWS, min(m, b1 * ELL_ROWS)
        # this chunk's nonzeros: one contiguous run per stacked slab, rows lo..hi
        runs = [(ptr[sl * m + lo], ptr[sl * m + hi]) for sl in range(nslabs)]
        sel = np.concatenate([np.arange(a, z, dtype=np.int64) for a, z in runs])
        rows = np.concatenate([np.repeat(np.arange(lo, hi, dtype=np.int64) - lo,
                                         ptr[sl * m + lo + 1:sl * m + hi + 1] - ptr[sl * m + lo:sl * m + hi])
                               for sl in range(nslabs)])
        cols = prep.indices[sel].astype(np.int64)
        codes = prep.codes[sel].astype(np.int64)
        order = np.lexsort((cols, rows))  # (row, slab) groups in order; rank inside the group
        rows, cols, codes = rows[order], cols[order], codes[order]
        slab = cols // ELL_SLAB
        group = rows * nslab + slab
        rank = np.arange(group.size) - np.searchsorted(group, group, side="left")
        block, lane = np.divmod(rows, ELL_ROWS)
        nb = b1 - b0
        c = np.zeros(nb * nslab, dtype=np.int64)
        np.maximum.at(c, block * nslab + slab, rank + 1)
        before = np.concatenate(([0], np.cumsum(c)))  # rounds before each (block, slab)
        entries = np.zeros(int(before[-1]) * ELL_ROWS, dtype=np.uint16)
        at = (before[block * nslab + slab] + rank) * ELL_ROWS + lane
        entries[at] = (cols - slab * ELL_SLAB) | (codes << ELL_COL_BITS) | ELL_VALID
        cnt[b0 * nslab:b1 * nslab] = c
        eptr[b0 + 1:b1 + 1] = eptr[b0] + before[nslab::nslab] * ELL_ROWS
        parts.append(entries)
        b0 = b1
    entries = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    return EllForm(entries=entries, cnt=cnt, eptr=eptr, nslab=nslab)


def _code_dtype(n_codes: int) -> type:
    if n_codes <= 256:
        return np.uint8
    return np.uint16 if n_codes <= 65536 else np.uint32


def _index_dtype(k: int) -> type:
    # Unsigned: numba skips the negative-index check on unsigned indices.
    return np.uint16 if k <= 65536 else np.uint32


def quant_prep_from_codes(shape: tuple[int, int], indptr: np.ndarray, indices: np.ndarray,
                          codes: np.ndarray, codebook: np.ndarray,
                          slab: int | None = None) -> QuantLinearPrep:
    """A :class:`QuantLinearPrep` from a plain CSR (``indptr`` of ``M + 1``) whose values are codebook
    indices, cast to the narrowest dtypes and stored in column slabs of at most ``slab`` (default
    ``SLAB``; 0 for none); the caller has checked the arrays."""
    m, k = int(shape[0]), int(shape[1])
    rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(np.asarray(indptr, dtype=np.int64)))
    width = slab_width(k, slab)
    ptr, order = slab_order(rows, indices, m, k, width)
    return QuantLinearPrep(
        shape=(m, k),
        indptr=ptr,
        indices=np.ascontiguousarray(np.asarray(indices)[order], dtype=_index_dtype(k)),
        codes=np.ascontiguousarray(np.asarray(codes)[order], dtype=_code_dtype(int(codebook.size))),
        codebook=np.ascontiguousarray(codebook, dtype=np.float32),
        slab=width,
    )


def prepare_quant_linear(weight: np.ndarray, slab: int | None = None) -> QuantLinearPrep:
    """Convert a dense ``(M, K)`` weight to codebook-index CSR, exactly.

    Parameters
    ----------
    weight : ndarray, shape (M, K), float32
        Exact zeros are dropped; the codebook is the sorted distinct nonzero values (``2**b - 1`` of
        them or fewer for a ``b``-bit quantized layer, so uint8 codes).
    slab : int, optional
        Most columns per slab (default ``SLAB``; 0 for a plain CSR).
    """
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    m, k = weight.shape
    rows, cols = np.nonzero(weight)
    values = weight[rows, cols]
    codebook, codes = np.unique(values, return_inverse=True)
    indptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    if codebook.size == 0:
        codebook = np.zeros(1, dtype=np.float32)
    return quant_prep_from_codes((m, k), indptr, cols, codes.reshape(-1), codebook, slab)


def quant_linear(prep: QuantLinearPrep, x: np.ndarray, bias: np.ndarray | None, out: np.ndarray,
                 relu: bool = False) -> None:
    """``out = x @ W.T + bias`` with ``W`` in codebook-index CSR; ``relu(x @ W.T + bias)`` with ``relu``,
    applied as each output is written (NaN stays NaN, as with ``torch.relu``).

    Parameters
    ----------
    prep : QuantLinearPrep
    x : ndarray, shape (B, K), float32, C-contiguous
    bias : ndarray, shape (M,), float32, or None
    out : ndarray, shape (B, M), float32
        Written in full.
    relu : bool
        Fuse a ReLU into the output.
    """
    bind_quant_linear(prep, x.shape[0], bias, out, relu, check=False)(x)


# Below this many nonzeros x batch a bound layer runs the serial kernels (no parallel launch).
_SERIAL_MACS = 1 << 15


def bind_quant_linear(prep: QuantLinearPrep, batch: int, bias: np.ndarray | None, out: np.ndarray,
                      relu: bool = False, *, check: bool = True, ell: bool = True,
                      spmm: bool = True) -> Callable[[np.ndarray], None]:
    """``run(x)``: :func:`quant_linear` ``(prep, x, bias, out, relu)`` for batches of ``batch``, every
    argument but ``x`` bound once (the whole-model executor's steps; before, a quantized layer in a
    compiled model ran through torch tensors and a separate ReLU pass).

    The callable uses the calling thread's workspace of ``prep``, so it must be called from the thread
    that bound it (the executor binds per thread). Below ``_SERIAL_MACS`` multiply-adds the serial
    twins run.

    Parameters
    ----------
    prep : QuantLinearPrep
    batch : int
    bias : ndarray, shape (M,), float32, or None
    out : ndarray, shape (batch, M), float32, C-contiguous
    relu : bool
    check : bool
        Check ``out``'s shape and layout (:func:`quant_linear` writes any (B, M) array).
    ell : bool
        Batches up to ``ELL_MAX_BATCH`` (8) run the sliced-ELL form where it applies
        (:meth:`QuantLinearPrep.ell`); False: the row-wise kernel at batch 1, the float spmm above.
    spmm : bool
        Larger batches (or any above 1 without the ELL form) run the float spmm on the dequantized
        values (:meth:`QuantLinearPrep.float_values`); False: the codes kernel (a scalar loop, 4-5x
        slower on fc6).

    Returns
    -------
    callable
        ``run(x)`` with ``x`` of shape ``(batch, K)``, float32, C-contiguous.
    """
    m = prep.shape[0]
    if check and (not out.flags.c_contiguous or out.shape != (batch, m)):
        raise ValueError(f"bind_quant_linear: out must be C-contiguous of shape {(batch, m)}")
    form = prep.ell() if 1 < batch <= ELL_MAX_BATCH and ell else None
    if form is not None:
        ws = prep.workspace(batch)
        small = prep.nnz * batch < _SERIAL_MACS
        kernel = _qspmm_ell_serial if small else _qspmm_ell
        has_bias = bias is not None
        b = bias if has_bias else prep.codebook[:0]
        dst = out if out.flags.c_contiguous else np.empty((batch, m), dtype=np.float32)
        eargs = (form.entries, form.cnt, form.eptr, prep.table(), form.nslab, ws.blocks, ws.xpad, ws.sums, b,
                 has_bias, dst, bool(relu))

        def run_ell_batch(x: np.ndarray) -> None:
            kernel(x, *eargs)
            if dst is not out:
                out[...] = dst

        return run_ell_batch
    if batch > 1 and spmm:
        if out.flags.c_contiguous:
            return bind_sparse_linear(prep.float_values(), batch, bias, out, relu)
        tmp = np.empty((batch, m), dtype=np.float32)
        run_tmp = bind_sparse_linear(prep.float_values(), batch, bias, tmp, relu)

        def run_copy(x: np.ndarray) -> None:
            run_tmp(x)
            out[...] = tmp

        return run_copy
    ws = prep.workspace(batch)
    has_bias = bias is not None
    b = bias if has_bias else prep.codebook[:0]
    small = prep.nnz * batch < _SERIAL_MACS
    arrays = (prep.indptr, prep.indices, prep.codes)
    form = prep.ell() if batch == 1 and ell else None
    if form is not None:
        kernel = _qspmv_ell_serial if small else _qspmv_ell
        y = out[0]
        eargs = (form.entries, form.cnt, form.eptr, prep.table(), form.nslab, ws.blocks, ws.xpad, ws.sums, b,
                 has_bias, y, bool(relu))

        def run_ell(x: np.ndarray) -> None:
            kernel(x[0], *eargs)

        return run_ell
    if batch == 1:
        table = prep.uses_table
        book = prep.table() if table else prep.codebook
        qspmv = _qspmv_serial if small else _qspmv
        y = out[0]
        args = (b, has_bias, y, ws.bounds, table, bool(relu))

        def run_qspmv(x: np.ndarray) -> None:
            qspmv(*arrays, book, x[0], *args)

        return run_qspmv
    qspmm = _qspmm_serial if small else _qspmm
    xt = ws.xt
    margs = (b, has_bias, out, ws.bounds, bool(relu))

    def run_qspmm(x: np.ndarray) -> None:
        xt[:] = x.T
        qspmm(*arrays, prep.codebook, xt, *margs)

    return run_qspmm


@jit(inline="always")
def _add_slab(y, m, sl, s, bias, has_bias, relu, last):
    """``y[m] = s + bias[m]`` for the first slab, ``y[m] += s`` for the others; ``max(., 0)`` (NaN
    kept) on the last slab's store with ``relu``."""
    if sl == 0:
        v = s + bias[m] if has_bias else s
    else:
        v = y[m] + s
    y[m] = v if not last or not relu or not v <= 0 else np.float32(0.0)


@pjit
def _qspmv(indptr, indices, codes, codebook, x, bias, has_bias, y, bounds, table, relu):
    """Quantized CSR spmv (Deep Compression's weight sharing, Han et al. ICLR 2016, run in place):
    ``y[m] = sum_e codebook[codes[e]] * x[indices[e]]``, rows split in nnz-balanced ranges, one per
    thread, slab after slab. Each row is one :func:`sparsecnn.kernels._simd.code_row_dot` (eight
    chains in the lanes of one vector; per block of eight nonzeros, eight codebook and eight x loads
    into two vectors and one vector FMA; any code dtype), or with ``table`` (uint8 codes of a
    codebook of at most 32 entries, Deep Compression's 5-bit FC width, ``codebook`` zero-padded to
    32 floats) :func:`sparsecnn.kernels._simd.code_row_dot32`: with AVX-512 the eight weights of a
    block are one register lookup (``vpermi2ps``), so a nonzero costs two loads (its column and its
    x) against float CSR's three, and one byte of code against four of float.
    NOTE: indices are valid columns of x; codes are valid entries of codebook (< 32 and 32 floats
    with ``table``); y has M elements.
    """
    nparts = bounds.size - 1
    nrow = y.size
    nslabs = (indptr.size - 1) // max(nrow, 1)
    for part in numba.prange(nparts):
        for sl in range(nslabs):
            for m in range(bounds[part], bounds[part + 1]):
                r = sl * nrow + m
                k0 = indptr[r]
                if table:
                    s = code_row_dot32(x, indices, codes, codebook, k0, indptr[r + 1] - k0)
                else:
                    s = code_row_dot(x, indices, codes, codebook, k0, indptr[r + 1] - k0)
                _add_slab(y, m, sl, s, bias, has_bias, relu, sl == nslabs - 1)


@pjit
def _qspmm(indptr, indices, codes, codebook, xt, bias, has_bias, out, bounds, relu):
    """Quantized CSR x dense: ``out[:, m] = sum_e codebook[codes[e]] * xt[indices[e], :]`` (+ bias),
    accumulated into the output's column per row (a strided store per batch entry at the row's end);
    ``max(., 0)`` (NaN kept) on that store with ``relu``.
    NOTE: xt is (K, B) C-contiguous; out is (B, M); indptr.size - 1 is a multiple of M.
    """
    nb = xt.shape[1]
    nrow = out.shape[1]
    nslabs = (indptr.size - 1) // max(nrow, 1)
    nparts = bounds.size - 1
    for part in numba.prange(nparts):
        acc = np.empty(nb, dtype=np.float32)
        for m in range(bounds[part], bounds[part + 1]):
            bv = bias[m] if has_bias else np.float32(0.0)
            for j in range(nb):
                acc[j] = 0.0
            for sl in range(nslabs):
                r = sl * nrow + m
                for e in range(indptr[r], indptr[r + 1]):
                    w = codebook[codes[e]]
                    row = xt[indices[e]]
                    for j in range(nb):
                        acc[j] = fmadd(w, row[j], acc[j])
            for j in range(nb):
                v = acc[j] + bv
                out[j, m] = v if not relu or not v <= 0 else np.float32(0.0)


@pjit
def _qspmv_ell(x, entries, cnt, eptr, table, nslab, blocks, xpad, sums, bias, has_bias, y, relu):
    """Batch 1 in the sliced-ELL form: thread ``t`` copies x into its own zero-padded row of ``xpad``
    and runs row blocks ``blocks[t]:blocks[t + 1]``, each one :func:`sparsecnn.kernels._simd.
    code_ell_block` (16 rows; inputs and weights looked up from registers per 32-column slab), then
    adds the bias (ReLU with ``relu``, NaN kept) as it stores the block's rows.
    NOTE: xpad is (nparts, 32 * nslab) with zeros past K; table holds 32 floats; sums 16 per block."""
    m = y.size
    k = x.size
    for t in numba.prange(blocks.size - 1):
        xp = xpad[t]
        for j in range(k):
            xp[j] = x[j]
        for blk in range(blocks[t], blocks[t + 1]):
            code_ell_block(xp, entries, cnt, table, nslab, blk * nslab, eptr[blk], sums, blk * ELL_ROWS, 0)
            for r in range(blk * ELL_ROWS, min(m, (blk + 1) * ELL_ROWS)):
                v = sums[r] + bias[r] if has_bias else sums[r]
                y[r] = v if not relu or not v <= 0 else np.float32(0.0)


# Images per pass of the batched sliced-ELL kernel, and the largest batch it runs (above, the float
# spmm on the dequantized values: at batch 32, eight passes each reading the entries again lost to it).
ELL_PASS = 4
ELL_MAX_BATCH = 8


@jit
def _ell_batch_part(x, entries, cnt, eptr, table, nslab, b0, b1, xp, acc, bias, has_bias, out, relu):
    """One thread's part of :func:`_qspmm_ell`: row blocks ``b0:b1`` for every pass of images. A serial
    function of its own, so that its copy and store loops vectorise (inside a ``prange`` body numba
    leaves them scalar: the batch kernel ran 20-35% slower with them there)."""
    nb, m = out.shape
    k = x.shape[1]
    width = xp.shape[1]
    flat = xp.reshape(xp.size)
    for p0 in range(0, nb, ELL_PASS):
        n = min(ELL_PASS, nb - p0)
        probe = np.float32(0.0)  # stays 0 when every input of the pass is finite, else NaN
        for i in range(n):
            row = xp[i]
            src = x[p0 + i]
            for j in range(k):
                v = src[j]
                row[j] = v
                probe += v * np.float32(0.0)
        finite = probe == 0.0
        for blk in range(b0, b1):
            c0, e0 = blk * nslab, eptr[blk]
            if n <= 2:
                if finite:
                    code_ell_block2_finite(flat, entries, cnt, table, nslab, c0, e0, acc, 0, width)
                else:
                    code_ell_block2(flat, entries, cnt, table, nslab, c0, e0, acc, 0, width)
            elif finite:
                code_ell_block4_finite(flat, entries, cnt, table, nslab, c0, e0, acc, 0, width)
            else:
                code_ell_block4(flat, entries, cnt, table, nslab, c0, e0, acc, 0, width)
            r0 = blk * ELL_ROWS
            nr = min(m, r0 + ELL_ROWS) - r0
            for i in range(n):
                src = acc[i * ELL_ROWS:i * ELL_ROWS + nr]
                dst = out[p0 + i, r0:r0 + nr]
                for r in range(nr):
                    v = src[r] + bias[r0 + r] if has_bias else src[r]
                    dst[r] = v if not relu or not v <= 0 else np.float32(0.0)


@pjit
def _qspmm_ell(x, entries, cnt, eptr, table, nslab, blocks, xpad, sums, bias, has_bias, out, relu):
    """Batches of 2 to ``ELL_MAX_BATCH`` in the sliced-ELL form: the images in passes of up to
    ``ELL_PASS`` (:func:`sparsecnn.kernels._simd.code_ell_block4`, or ``code_ell_block2`` for a pass
    of two or fewer), thread ``t`` copying the pass's images into its own zero-padded rows of ``xpad``
    and running row blocks ``blocks[t]:blocks[t + 1]`` (:func:`_ell_batch_part`); bias and ReLU (NaN
    kept) on the stores. Rows of ``xpad`` past the pass's images hold stale inputs whose sums are
    discarded. A pass whose inputs are all finite runs the unmasked variants (``*_finite``: 20-35%
    faster); one with an inf or NaN input the masked ones, so a padding lane never turns it into NaN
    in a row that does not weigh it.
    NOTE: xpad is (nparts, ELL_PASS, 32 * nslab) with zeros past K; sums (nparts, 16 * ELL_PASS)."""
    for t in numba.prange(blocks.size - 1):
        _ell_batch_part(x, entries, cnt, eptr, table, nslab, blocks[t], blocks[t + 1], xpad[t], sums[t], bias,
                        has_bias, out, relu)


_qspmv_serial = serial_twin(_qspmv)
_qspmv_ell_serial = serial_twin(_qspmv_ell)
_qspmm_ell_serial = serial_twin(_qspmm_ell)
_qspmm_serial = serial_twin(_qspmm)
