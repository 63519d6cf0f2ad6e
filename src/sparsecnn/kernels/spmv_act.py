"""Activation-sparse fully connected layers: ``out = x @ W.T + bias`` that skips the zero inputs.

The input of a fully connected layer after a ReLU is often 50-90% exact zeros. A row-wise CSR spmv
(:mod:`sparsecnn.kernels.spmv`) reads every stored weight whatever the input; stored by *columns*
(CSC), the layer reads only the columns of the nonzero inputs:

.. math::

    y = b + \\sum_{j : x_j \\neq 0} x_j W_{:, j}

so at weight density ``d`` and input density ``a`` it streams about ``a d M K`` nonzeros instead of
``d M K`` (the "sparse x sparse" product of the seed study, with the input vector sparse; cf. the
EIE accelerator, Han et al. ISCA 2016, which walks the nonzero activations over CSC weights).

Storage (the **packed layout**): per column its nonzeros in blocks of eight (``RW``), each block
eight row indices (uint16 while ``M + 8 <= 65536``) then eight float32 values, 48 bytes, so a
column is one forward stream; a column's last block is padded with value-0 entries on scratch rows
past the outputs. Above 2/3 weight density the columns are kept dense instead (4 bytes per weight,
contiguous vector loads), the same walk over nonzero inputs. Per nonzero input, its column's blocks
are scattered into the outputs (:func:`sparsecnn.kernels._simd.scatter_blocks`: per four entries
the rows from one 64-bit load, four outputs loaded into one vector, one FMA, four stores). The
threads split the *nonzero inputs* (ranges of equal block count), each into its own full-length
sums, added up by rows at the end; the column eight inputs on is prefetched into L2.

Why so: in a forward pass the weights of a large FC layer come from DRAM (the other layers evict
them), and the columns of a random 40% of the inputs are runs of 1-2 KB with gaps that the
hardware prefetchers do not follow. The layout it replaced, a CSC whose rows were cut into one
block per thread (each thread walking its half of every column: two streams of 0.4 and 0.7 KB per
column and thread, prefetched into L1), read fc6 at 60% zero inputs cold at 10 GB/s and lost to the
weight-only spmv (0.75 against 0.62 ms). Measured against it in one process (``_interleaved`` and
``time_cold``, AlexNet's fc6 / fc7 / fc8 at 91 / 91 / 75% weights and 50-70% zero inputs, Zen 4, 2
threads, batch 1): cold 1.27-1.57x faster in a fast spell of the VM, 1.05-1.35x in a slow one;
warm 0.91-1.08x (full-length sums take twice the L1 of a row block's). Prefetching the old layout
into L2 alone gave cold 1.3x; whole columns and one stream the rest.

Dense columns at batch 1 are bound by DRAM: the kernel should stream ``4 a M K`` bytes once, with little
accumulator traffic. Each thread keeps tiles of up to ``8 * NV_MAX`` of its outputs in vector
registers (:func:`sparsecnn.kernels._simd.span_tile`) across a block of ``_BLOCK`` nonzero inputs,
then moves to the next tile of the same block: the first tile starts each column run's stream (the
hardware prefetcher runs along it), the others find it in cache. What skipping a zero input saves
depends on the layout: the rows of ``W.T`` give each thread contiguous runs of ``M / threads``
floats (8 KB on fc6/fc7), long enough that a skipped run is not fetched. Row tiles stored
contiguously per tile (768 B per input; 48 GB/s with no zeros) were tried and dropped: the
prefetchers fetch the skipped runs anyway, so 27% zero inputs ran slower than none. Measured on
Zen 4, 2 threads, batch 1, fc6 of the shrunk SSL AlexNet (4096 x 5904): no zero inputs 3.2 ms, 27%
2.0 ms, 50% 1.3 ms; torch's GEMV 4.7 ms whatever the input; the previous kernel here (``W.T`` rows
four at a time through an accumulator in L1) 3.2, 2.9 and 1.6 ms.

At batch ``B > 1`` a column is skipped when its input is zero in the whole batch, and each of its
nonzeros updates the ``B`` outputs of its row from a transposed copy of the input.

**The masked layout** (the default where AVX-512 FMAs run at full rate, ``MASKED_DEFAULT``). The
column walk scatters: per nonzero a load of the output, a lane insert and extract, and a store,
about 1.7 cycles per nonzero against spmv's one (Emerald Rapids, the row-block CSC), so at 60% zero
inputs it barely beat the weight-only spmv.
The masked layout keeps the outputs in registers instead: the rows are cut into tiles of
``MASK_ROWS`` (128), and per tile and column each 16-row group holds a 16-bit mask of its nonzero
rows, the values packed behind it. A thread holds a tile's rows in eight zmm accumulators and
walks the nonzero inputs: per input and group one ``vexpandps`` (the packed values into the lanes
the mask names, zeros elsewhere) and one FMA (:func:`sparsecnn.kernels._simd.masked_tile`). At 91%
a group holds 1.4 nonzeros, so the FMAs do a seventh of the work of a dense column, but no output
moves through memory. A stored mask costs 2 bytes per group and column: 4 + 1.4 bytes per nonzero
at 91% (the column layouts' 6), 4.6 at 75%. Interleaved with the row-block CSC and spmv (Emerald Rapids
VM, 2 threads, batch 1, warm, medians): fc6 (4096 x 9216, 91%) at 0 / 60 / 70 / 90% zero inputs
1.34 / 0.59 / 0.48 / 0.22 ms against the CSC's 1.77 / 0.79 / 0.59 / 0.18 and spmv's 0.63-0.66; fc7
(4096 x 4096) 0.63 / 0.28 / 0.26 / 0.13 against 0.82 / 0.34 / 0.28 / 0.11; fc8 (1000 x 4096, 75%)
0.21 / 0.11 / 0.10 / 0.035 against 0.87 / 0.33 / 0.26 / 0.09 (there a group holds 4 nonzeros).
Only at 90% zero inputs does the CSC stay ahead (0.8x), where few columns are walked and each
costs the masked layout eight groups whatever they hold. The expand is what bounds it: with plain
vector loads in its place (wrong sums, for timing) fc6 ran 1.5x faster. On Zen 4 the same form ran
0.4-0.6x the scatter (docs/engine.md), so the column walk (now the packed layout) stays the default
there and on AVX2 CPUs. The masked layout has not been timed against the packed layout, which
came later (on a Zen 4): on an AVX-512 Intel CPU, ``python -m benchmarks.act_fc --layout masked``
against ``--layout packed`` would tell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numba
import numpy as np

from sparsecnn.kernels._numba import (
    LINE_FLOATS,
    PerThread,
    aligned_zeros,
    as_aligned,
    balanced_bounds,
    jit,
    num_threads,
    pjit,
    serial_twin,
    thread_rows,
)
from sparsecnn.kernels._simd import (
    MASK_GROUPS,
    NV_MAX,
    RW,
    VW,
    masked_tile,
    packed_words,
    prefetch_l2,
    scatter_blocks,
    span_tile,
)
from sparsecnn.kernels.elementwise import relu_

__all__ = ["DENSE_COLUMNS_ABOVE", "MASKED_DEFAULT", "MASK_ROWS", "ActLinearPrep", "act_sparse_linear",
           "bind_act_sparse_linear", "masked_layout_problem", "masked_to_dense", "packed_layout_problem",
           "packed_to_dense", "prepare_act_linear"]

DENSE_COLUMNS_ABOVE = 2.0 / 3.0  # weight density above which dense columns (4 B) beat packed ones (6 B)

# Rows per tile of the masked layout (16-row groups, one zmm accumulator each).
MASK_ROWS = 16 * MASK_GROUPS
# The masked layout is the default where AVX-512 FMAs run at full rate (VW 16): there an expand load
# and an FMA per 16-row group beat the row-block CSC's scatter. Elsewhere (Zen 4, AVX2) the column
# walk is kept (the packed layout): on Zen 4 the expand form ran at 0.4-0.6x the scatter
# (docs/engine.md).
MASKED_DEFAULT = VW == 16


@dataclass(eq=False)
class _Workspace:
    bounds: np.ndarray  # (nparts + 1,) row ranges of the dense-column walk (whole vectors)
    nz: np.ndarray  # (K,) the nonzero inputs' columns, filled per call
    xv: np.ndarray  # (K,) their values (batch 1, dense columns)
    xt: np.ndarray  # (K, B) transposed input (batch > 1)
    tiles: np.ndarray  # (nparts + 1,) tile ranges of the masked layout (nnz-balanced), else (0,)
    nzb: np.ndarray  # (B, K) each image's nonzero inputs (masked layout), else (0, 0)
    counts: np.ndarray  # (B,) how many (masked layout)
    scratch: np.ndarray  # (nparts, MASK_ROWS) a last partial tile's rows (masked layout)
    cost: np.ndarray  # (K,) running cost of the nonzero inputs' columns (packed layout), else (0,)
    parts: np.ndarray  # (nparts + 1,) each thread's range of nonzero inputs (packed layout)
    sums: np.ndarray  # (nparts, >= M + RW) or (nparts, >= M + RW, B): each thread's own sums (packed layout)


@dataclass(eq=False)
class ActLinearPrep:
    """Column-stored weights for :func:`act_sparse_linear`.

    Four layouts; ``prepare_act_linear`` writes the first three.

    - **packed** (``layout == "packed"``, the default below 2/3 weight density where the masked layout
      is not): per column its nonzeros in blocks of ``RW`` (8) entries, each block ``RW`` row indices
      then ``RW`` values in one buffer (one forward stream per column), the last block of a column
      padded with value-0 entries on rows ``M + lane`` (scratch slots past the outputs).
    - **masked**: tiles of 16-row groups with a bit mask per column (see ``masks``).
    - **dense columns**: ``W.T`` (above 2/3 weight density).
    - **csc** (``layout == "csc"``, files written before the packed layout): a row-block-major CSC;
      it runs through a packed copy made on first use.

    Attributes
    ----------
    shape : tuple of int
        ``(M, K)`` of the weight.
    indptr : ndarray, int32 or int64
        Packed layout: shape (K + 1,), column j's blocks are ``indptr[j] : indptr[j + 1]``.
        CSC layout: shape (nblocks * K + 1,), the entries of column j in row block b are
        ``indptr[b * K + j] : indptr[b * K + j + 1]``. Shape (0,) in dense-column mode.
    indices : ndarray, shape (nnz,), uint16 when M <= 65536 else uint32
        CSC layout: row indices, sorted within each column part, inside the part's row block.
        Shape (0,) in the other layouts.
    data : ndarray, shape (nnz,), float32
        CSC and masked layouts: the nonzero values. Shape (0,) in the packed layout.
    dense_t : ndarray, shape (K, M), float32
        ``W.T`` in dense-column mode; shape (0, M) otherwise.
    row_blocks : ndarray, shape (nblocks + 1,), int64, or None
        CSC layout: row block bounds (``0 = rb[0] <= ... <= rb[-1] = M``); None: one block.
    masks : ndarray, shape (ntiles * K * MASK_GROUPS,), uint16
        Masked layout (``tile_ptr`` not empty; ``indptr`` and ``indices`` empty): the rows in tiles of
        ``MASK_ROWS`` (the last padded), and per tile ``t`` and column ``j`` one 16-bit mask per
        16-row group, ``masks[(t * K + j) * MASK_GROUPS + g]``, bit ``i`` set where row
        ``t * MASK_ROWS + 16 g + i`` has a nonzero. Shape (0,) in the other layouts.
    tile_ptr : ndarray, shape (ntiles * K + 1,), int32 or int64
        Masked layout: the values of tile ``t``, column ``j`` are ``data[tile_ptr[t * K + j] :
        tile_ptr[t * K + j + 1]]``, group after group and row after row. Shape (0,) otherwise.
    packed : ndarray, shape (nblocks * words,), uint32
        Packed layout: the blocks as raw 32-bit words (rows and float32 values; see
        ``packed_views``), ``words`` = :func:`sparsecnn.kernels._simd.packed_words` of the index dtype
        (12 for uint16 rows, ``M < 65536``; 16 for uint32). Shape (0,) otherwise.
    layout : str
        ``"packed"`` or ``"csc"`` (the masked and dense-column layouts are told by their arrays).
    """

    shape: tuple[int, int]
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    dense_t: np.ndarray
    row_blocks: np.ndarray | None = None
    masks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))
    tile_ptr: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    packed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    layout: str = "csc"
    _workspaces: PerThread = field(default_factory=PerThread, repr=False)
    # a csc layout's packed twin, made on first use (not copied by dataclasses.replace)
    _packed_copy: list = field(default_factory=list, repr=False, init=False)

    def __post_init__(self) -> None:
        # dense columns are loaded as whole vectors of W.T's rows, packed blocks as aligned vectors
        self.dense_t = as_aligned(self.dense_t)
        self.packed = as_aligned(self.packed)

    def __setstate__(self, state: dict) -> None:  # copies and unpickled preps too (no __post_init__)
        self.__dict__.update(state)
        self.__post_init__()

    @property
    def blocks(self) -> np.ndarray:
        """CSC layout: row block bounds, ``(nblocks + 1,)`` int64 (one block when ``row_blocks`` is
        None)."""
        if self.row_blocks is None:
            return np.array([0, self.shape[0]], np.int64)
        return self.row_blocks

    @property
    def dense_columns(self) -> bool:
        return self.dense_t.shape[0] > 0 or self.shape[1] == 0

    @property
    def masked(self) -> bool:
        """The masked layout (see ``masks``)."""
        return self.tile_ptr.size > 0 and not self.dense_columns

    @property
    def is_packed(self) -> bool:
        """The packed layout (see ``packed``)."""
        return self.layout == "packed" and not self.dense_columns

    @property
    def index_dtype(self) -> type:
        """The packed layout's row index dtype: uint16 while the padding slots (rows ``M`` to
        ``M + RW - 1``) fit."""
        return np.uint16 if self.shape[0] + RW <= 1 << 16 else np.uint32

    @property
    def ntiles(self) -> int:
        return -(-self.shape[0] // MASK_ROWS)

    @property
    def nnz(self) -> int:
        if self.dense_columns:
            return int(np.count_nonzero(self.dense_t))
        if self.is_packed:
            return int(np.count_nonzero(self.packed_values()))
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored weights (pointers, indices, masks, values, packed blocks or dense
        columns, row blocks)."""
        blocks = 0 if self.row_blocks is None else self.row_blocks.nbytes
        return int(self.indptr.nbytes + self.indices.nbytes + self.data.nbytes + self.dense_t.nbytes + blocks
                   + self.masks.nbytes + self.tile_ptr.nbytes + self.packed.nbytes)

    def packed_views(self) -> tuple[np.ndarray, np.ndarray]:
        """Packed layout: ``(rows, values)``, the blocks' row indices ``(nblocks, RW)`` (index dtype)
        and values ``(nblocks, RW)`` float32, views of ``packed``."""
        words = packed_words(np.dtype(self.index_dtype).itemsize)
        blocks = self.packed.reshape(-1, words)
        return blocks[:, :words - RW].view(self.index_dtype), blocks[:, words - RW:].view(np.float32)

    def packed_values(self) -> np.ndarray:
        return self.packed_views()[1]

    def packed_twin(self) -> ActLinearPrep:
        """This prep in the packed layout: itself, or for the csc layout a packed copy made once."""
        if self.is_packed:
            return self
        if self.masked or self.dense_columns:
            raise ValueError("packed_twin: the masked and dense-column layouts have no packed twin")
        if not self._packed_copy:
            m, k = self.shape
            counts = np.diff(self.indptr.astype(np.int64))
            cols = np.repeat(np.arange(self.indptr.size - 1), counts) % max(k, 1)
            order = np.lexsort((self.indices, cols))
            self._packed_copy.append(_pack_columns(self.indices.astype(np.int64)[order], cols[order],
                                                   self.data[order], m, k))
        return self._packed_copy[0]

    def check_format(self) -> None:
        m, k = self.shape
        if self.dense_columns:
            assert self.dense_t.shape == (k, m) and self.dense_t.dtype == np.float32
            return
        if self.masked:
            problem = masked_layout_problem(self)
            assert problem is None, problem
            return
        if self.is_packed:
            problem = packed_layout_problem(self)
            assert problem is None, problem
            return
        rb = self.blocks
        nb = rb.size - 1
        assert rb[0] == 0 and rb[-1] == m and (np.diff(rb) >= 0).all()
        assert self.indptr.shape == (nb * k + 1,)
        assert self.indptr[0] == 0 and self.indptr[-1] == self.data.size
        assert (np.diff(self.indptr.astype(np.int64)) >= 0).all()
        assert self.indices.size == self.data.size and self.data.dtype == np.float32
        for b in range(nb):
            for j in range(k):
                col = self.indices[self.indptr[b * k + j]:self.indptr[b * k + j + 1]].astype(np.int64)
                assert (np.diff(col) > 0).all() and ((col >= rb[b]) & (col < rb[b + 1])).all()

    def workspace(self, batch: int) -> _Workspace:
        nparts = num_threads()
        key = (batch, nparts)
        ws = self._workspaces.get(key)
        if ws is None:
            m, k = self.shape
            # dense columns: whole cache lines of rows per thread (its tiles stay inside its range, and
            # no line of y, rewritten after every block of inputs, is written by both threads)
            line = max(VW, LINE_FLOATS)
            bounds = np.minimum(np.arange(nparts + 1, dtype=np.int64) * (-(-m // (line * nparts)) * line), m)
            masked = self.masked
            packed = not (masked or self.dense_columns)
            tiles = np.zeros(0, np.int64)
            if masked:
                # nnz-balanced tile ranges, each column part counted as a few nonzeros of overhead
                ptr = self.tile_ptr.astype(np.int64)[:: max(k, 1)]
                tiles = balanced_bounds(np.diff(ptr) + 4 * k, nparts)
            # each thread's sums on cache lines of their own (rows past m + RW unused): a line shared at
            # the boundary of two threads' sums (their padding slots and the next one's first rows)
            # moved between the cores at every scatter into it
            rows = -(-(m + RW) // LINE_FLOATS) * LINE_FLOATS
            none = np.empty((0, 0), np.float32)
            sums = (thread_rows(nparts, m + RW) if batch == 1 else aligned_zeros((nparts, rows, batch))) \
                if packed else none
            ws = _Workspace(bounds=bounds, nz=np.empty(k, np.int64), xv=np.empty(k, np.float32),
                            xt=np.empty((k, batch) if batch > 1 and not masked else (0, 1), np.float32),
                            tiles=tiles, nzb=np.empty((batch, k) if masked else (0, 0), np.int64),
                            counts=np.zeros(batch if masked else 0, np.int64),
                            scratch=thread_rows(nparts, MASK_ROWS) if masked else none,
                            cost=np.empty(k if packed else 0, np.int64),
                            parts=np.zeros(nparts + 1, np.int64), sums=sums)
            self._workspaces[key] = ws
        return ws


def prepare_act_linear(weight: np.ndarray, *, dense_above: float = DENSE_COLUMNS_ABOVE,
                       masked: bool | None = None) -> ActLinearPrep:
    """Store a dense ``(M, K)`` weight by columns: the packed or the masked layout, or dense columns
    above ``dense_above`` density.

    Parameters
    ----------
    weight : ndarray, shape (M, K), float32
        Exact zeros are dropped (packed and masked layouts).
    dense_above : float
        Weight density above which the columns are stored dense.
    masked : bool, optional
        The masked layout (tiles of 16-row groups with a bit mask per column) instead of the packed
        one; default ``MASKED_DEFAULT`` (where AVX-512 runs at full rate).
    """
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    m, k = weight.shape
    nnz = int(np.count_nonzero(weight))
    if weight.size and nnz > dense_above * weight.size:
        empty = (np.zeros(0, np.int32), np.zeros(0, np.uint16), np.zeros(0, np.float32))
        return ActLinearPrep((m, k), *empty, np.ascontiguousarray(weight.T))
    if (MASKED_DEFAULT if masked is None else masked) and m and k:
        return _prepare_masked(weight, nnz)
    wt = np.ascontiguousarray(weight.T)
    cols, rows = np.nonzero(wt)  # row-major over W.T: by column j, then row i (sorted)
    return _pack_columns(rows, cols, wt[cols, rows], m, k)


def _pack_columns(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, m: int, k: int) -> ActLinearPrep:
    """The packed layout of the (M, K) weight with nonzeros ``vals`` at ``(rows, cols)``, sorted by
    column, then row."""
    counts = np.bincount(cols, minlength=k).astype(np.int64)
    nblk = -(-counts // RW)
    total = int(nblk.sum())
    ptr = np.zeros(k + 1, np.int32 if total <= np.iinfo(np.int32).max // 16 else np.int64)
    np.cumsum(nblk, out=ptr[1:])
    first = np.concatenate(([0], np.cumsum(counts)))  # each column's first entry, unpadded
    slot = ptr[cols].astype(np.int64) * RW + (np.arange(rows.size) - first[cols])
    prep = ActLinearPrep((m, k), ptr, np.zeros(0, np.uint16), np.zeros(0, np.float32),
                         np.zeros((0, m), np.float32), layout="packed")
    itype = prep.index_dtype
    words = packed_words(np.dtype(itype).itemsize)
    # padding entries: value 0 on row M + lane (distinct in a block: no lane waits for another's store)
    block_rows = (m + np.tile(np.arange(RW), total)).astype(itype)
    block_rows[slot] = rows
    block_vals = np.zeros(total * RW, np.float32)
    block_vals[slot] = vals
    packed = np.zeros((total, words), np.uint32)
    packed[:, :words - RW].view(itype)[...] = block_rows.reshape(total, RW)
    packed[:, words - RW:].view(np.float32)[...] = block_vals.reshape(total, RW)
    prep.packed = as_aligned(packed.reshape(-1))
    return prep


def _prepare_csc(weight: np.ndarray, nblocks: int) -> ActLinearPrep:
    """The csc layout (row-block-major, ``nblocks`` row blocks) that files written before the packed
    layout hold; for the tests of reading them."""
    m, k = weight.shape
    wt = np.ascontiguousarray(weight.T)
    cols, rows = np.nonzero(wt)
    nb = max(1, min(int(nblocks), max(m, 1)))
    rb = balanced_bounds(np.bincount(rows, minlength=m) + 1, nb)
    block = np.searchsorted(rb, rows, side="right") - 1
    order = np.argsort(block, kind="stable")  # by block, then column, then row
    cols, rows, block = cols[order], rows[order], block[order]
    indptr = np.zeros(nb * k + 1, dtype=np.int64)
    np.cumsum(np.bincount(block * k + cols, minlength=nb * k), out=indptr[1:])
    index_dtype = np.uint16 if m <= np.iinfo(np.uint16).max + 1 else np.uint32
    return ActLinearPrep((m, k), indptr, rows.astype(index_dtype), np.ascontiguousarray(wt[cols, rows]),
                         np.zeros((0, m), np.float32), rb)


def packed_layout_problem(prep: ActLinearPrep) -> str | None:
    """What is wrong with ``prep``'s packed layout arrays (dtypes, sizes, pointers, rows out of range
    or repeated in a column, padding entries that are not zero), or None."""
    m, k = prep.shape
    ptr = prep.indptr
    if ptr.dtype not in (np.int32, np.int64) or ptr.shape != (k + 1,):
        return f"indptr must be int32/int64 of shape {(k + 1,)}, got {ptr.dtype} {ptr.shape}"
    ptr64 = ptr.astype(np.int64)
    words = packed_words(np.dtype(prep.index_dtype).itemsize)
    if prep.packed.dtype != np.uint32 or prep.packed.ndim != 1:
        return f"packed must be a uint32 vector, got {prep.packed.dtype} {prep.packed.shape}"
    if ptr64[0] != 0 or (np.diff(ptr64) < 0).any() or ptr64[-1] * words != prep.packed.size:
        return f"indptr must rise from 0 to the {prep.packed.size // words} blocks of packed"
    rows, vals = prep.packed_views()
    rows = rows.astype(np.int64)
    if (rows >= m + RW).any():
        return f"row indices must be below {m + RW} (rows {m} to {m + RW - 1} are padding slots)"
    if (vals[rows >= m] != 0).any():
        return f"padding entries (rows {m} and up) must hold 0"
    if (rows[rows >= m] != m + np.nonzero(rows >= m)[1]).any():
        return f"a padding entry's row must be {m} + its lane"
    col = np.repeat(np.arange(k), np.diff(ptr64))
    real = rows < m
    key = np.repeat(col, RW)[real.reshape(-1)] * m + rows[real]
    if np.unique(key).size != key.size:
        return "a row index repeats within a column"
    return None


def packed_to_dense(prep: ActLinearPrep) -> np.ndarray:
    """The dense (M, K) weight of a packed-layout ``prep``."""
    m, k = prep.shape
    rows, vals = prep.packed_views()
    col = np.repeat(np.repeat(np.arange(k), np.diff(prep.indptr.astype(np.int64))), RW)
    w = np.zeros((m + RW, k), np.float32)
    w[rows.reshape(-1).astype(np.int64), col] = vals.reshape(-1)
    return w[:m]


def _prepare_masked(weight: np.ndarray, nnz: int) -> ActLinearPrep:
    """The masked layout of ``weight`` (M, K), one tile of ``MASK_ROWS`` rows at a time."""
    m, k = weight.shape
    nt = -(-m // MASK_ROWS)
    masks = np.empty((nt, k, MASK_GROUPS), np.uint16)
    counts = np.empty((nt, k), np.int64)
    vals = []
    for t in range(nt):
        rows = np.zeros((MASK_ROWS, k), np.float32)
        part = weight[t * MASK_ROWS:(t + 1) * MASK_ROWS]
        rows[:part.shape[0]] = part
        cols = np.ascontiguousarray(rows.T)  # (K, T): column j's rows of the tile, in order
        nonzero = cols != 0
        bits = np.packbits(nonzero.reshape(k, MASK_GROUPS, 16), axis=-1, bitorder="little")
        masks[t] = bits.view("<u2").reshape(k, MASK_GROUPS)
        counts[t] = nonzero.sum(axis=1)
        vals.append(cols[nonzero])
    tile_ptr = np.zeros(nt * k + 1, np.int32 if nnz <= np.iinfo(np.int32).max else np.int64)
    np.cumsum(counts.reshape(-1), out=tile_ptr[1:])
    data = np.concatenate(vals).astype(np.float32) if vals else np.zeros(0, np.float32)
    return ActLinearPrep((m, k), np.zeros(0, np.int32), np.zeros(0, np.uint16), data,
                         np.zeros((0, m), np.float32), None, masks.reshape(-1), tile_ptr)


def masked_layout_problem(prep: ActLinearPrep) -> str | None:
    """What is wrong with ``prep``'s masked layout arrays (dtypes, sizes, pointers against the masks'
    popcounts, bits set in the padding rows), or None."""
    m, k = prep.shape
    nt = prep.ntiles
    masks, ptr = prep.masks, prep.tile_ptr
    if masks.dtype != np.uint16 or masks.shape != (nt * k * MASK_GROUPS,):
        return f"masks must be uint16 of shape {(nt * k * MASK_GROUPS,)}, got {masks.dtype} {masks.shape}"
    if ptr.dtype not in (np.int32, np.int64) or ptr.shape != (nt * k + 1,):
        return f"tile_ptr must be int32/int64 of shape {(nt * k + 1,)}, got {ptr.dtype} {ptr.shape}"
    if prep.data.dtype != np.float32 or prep.data.ndim != 1:
        return f"data must be a float32 vector, got {prep.data.dtype} {prep.data.shape}"
    ptr64 = ptr.astype(np.int64)
    if ptr64[0] != 0 or ptr64[-1] != prep.data.size or (np.diff(ptr64) < 0).any():
        return f"tile_ptr must rise from 0 to {prep.data.size} (the values)"
    bits = np.unpackbits(masks.view(np.uint8).reshape(nt, k, MASK_GROUPS * 2), axis=-1, bitorder="little")
    if not np.array_equal(bits.reshape(nt * k, -1).sum(axis=1), np.diff(ptr64)):
        return "tile_ptr does not match the number of mask bits of each tile and column"
    pad = nt * MASK_ROWS - m
    if pad and bits[-1, :, MASK_ROWS - pad:].any():
        return f"mask bits are set for rows past the last ({m})"
    return None


def masked_to_dense(prep: ActLinearPrep) -> np.ndarray:
    """The dense (M, K) weight of a masked-layout ``prep``."""
    m, k = prep.shape
    nt = prep.ntiles
    bits = np.unpackbits(prep.masks.view(np.uint8).reshape(nt, k, MASK_GROUPS * 2), axis=-1,
                         bitorder="little").astype(bool)
    cols = np.zeros((nt, k, MASK_ROWS), np.float32)
    cols[bits] = prep.data  # in (tile, column, row) order, as stored
    return np.ascontiguousarray(cols.transpose(0, 2, 1).reshape(nt * MASK_ROWS, k)[:m])


@jit
def _nonzero_columns(x, nz):
    """Columns j with some nonzero x[:, j]; returns how many were written to nz."""
    nb, k = x.shape
    n = 0
    for j in range(k):
        for b in range(nb):
            if x[b, j] != 0.0:
                nz[n] = j
                n += 1
                break
    return n


# Nonzero inputs ahead whose packed columns _packed_vec / _packed_mat prefetch into L2. The columns are
# runs of 1-2 KB (AlexNet's fc6/fc7 at 91%) with gaps where inputs are zero, which the hardware
# prefetchers do not follow (and overshoot). Into L2 (prefetcht1) rather than L1: measured cold (caches
# flushed) on fc6 (4096 x 9216, 91%) at 60% zero inputs, Zen 4, 2 threads, batch 1 (scratch scripts,
# docs/engine.md, sixteenth session), the row-block CSC this layout replaced ran 0.75 ms with
# prefetches into L1 and 0.55-0.58 ms into L2; 4, 8 and 16 inputs ahead within 5%, in either layout.
_AHEAD = 8


@jit
def _nonzero_inputs(x, nz):
    """Batch 1: the columns j with x[j] != 0 into nz (NaN and inf are nonzero); returns how many.
    No branch on the input (a 60%-zero input mispredicts every other column): 2 us against 4 on
    fc6's 9216 inputs."""
    n = 0
    for j in range(x.size):
        nz[n] = j
        n += x[j] != 0.0
    return n


@jit
def _nonzero_split(x, ptr, nz, cost, parts):
    """Batch 1: :func:`_nonzero_inputs` then :func:`_split` (one call); returns how many."""
    n_nz = _nonzero_inputs(x, nz)
    _split(ptr, nz, n_nz, cost, parts)
    return n_nz


@jit
def _split(ptr, nz, n_nz, cost, parts):
    """parts[t] .. parts[t + 1]: thread t's range of the nonzero inputs nz[:n_nz], of about equal
    cost (each column's blocks plus two, its overhead); cost (K,) is scratch."""
    c = 0
    for q in range(n_nz):
        j = nz[q]
        c += ptr[j + 1] - ptr[j] + 2
        cost[q] = c
    nparts = parts.size - 1
    parts[0] = 0
    for t in range(1, nparts):
        parts[t] = np.searchsorted(cost[:n_nz], c * t // nparts, side="right")
    parts[nparts] = n_nz


@pjit
def _packed_vec(ix, vals, ptr, words, x, nz, parts, sums, bias, has_bias, y, relu):
    """Batch 1, packed layout: thread t walks its range of the nonzero inputs (whole columns, one
    forward stream each) into its own sums (M + RW: the last RW are padding slots), one
    :func:`sparsecnn.kernels._simd.scatter_blocks` per column; then the threads add up the sums by
    rows, with the bias and ReLU (NaN kept).
    NOTE: ix / vals are the index / float32 views of the packed buffer; nz and parts from
    _nonzero_inputs and _split; sums (nparts, M + RW); y has M elements."""
    nparts = parts.size - 1
    m = y.size
    for t in numba.prange(nparts):
        s = sums[t]
        s[:] = np.float32(0.0)
        q1 = parts[t + 1]
        for q in range(parts[t], q1):
            if q + _AHEAD < q1:  # the column _AHEAD inputs on: its lines into L2
                ja = nz[q + _AHEAD]
                for p in range(ptr[ja] * words, ptr[ja + 1] * words, 16):
                    prefetch_l2(vals, p)
            j = nz[q]
            scatter_blocks(s, ix, vals, ptr[j], ptr[j + 1] - ptr[j], x[j])
    for t in numba.prange(nparts):
        r0, r1 = t * m // nparts, (t + 1) * m // nparts
        for i in range(r0, r1):
            y[i] = bias[i] if has_bias else np.float32(0.0)
        for u in range(nparts):  # row by row within each thread's sums: vector adds
            su = sums[u]
            for i in range(r0, r1):
                y[i] += su[i]
        if relu:
            for i in range(r0, r1):
                v = y[i]
                if not v > 0.0 and v == v:
                    y[i] = np.float32(0.0)


@pjit
def _packed_mat(ix, vals, ptr, words, xt, nz, parts, sums, bias, has_bias, out, relu):
    """Batch B > 1, packed layout, over the transposed input xt (K, B): as _packed_vec, each entry
    updating the B sums of its row. Each thread's B sums of every row (64 KB at B = 4 on fc6) do not
    stay in L1: against the row-block CSC it replaced, fc6 / fc7 at batch 2 and 4 with 70% zero
    inputs (the same in every image) ran 0.75-0.93x warm and 0.94-1.07x cold (two scratch runs, 2 threads);
    the threads splitting the rows instead (each its part of every column, the split points
    precomputed) ran 0.6-0.9x, its entries no longer whole blocks. ``spmm`` wins most such cases.
    NOTE: sums (nparts, M + RW, B); out (B, M)."""
    nb = xt.shape[1]
    nparts = parts.size - 1
    m = out.shape[1]
    ixw = words * 4 // ix.itemsize
    for t in numba.prange(nparts):
        s = sums[t]
        for i in range(m + RW):
            for b in range(nb):
                s[i, b] = np.float32(0.0)
        q1 = parts[t + 1]
        for q in range(parts[t], q1):
            if q + _AHEAD < q1:
                ja = nz[q + _AHEAD]
                for p in range(ptr[ja] * words, ptr[ja + 1] * words, 16):
                    prefetch_l2(vals, p)
            j = nz[q]
            xj = xt[j]
            for blk in range(ptr[j], ptr[j + 1]):
                for e in range(RW):
                    w = vals[blk * words + words - RW + e]
                    r = ix[blk * ixw + e]
                    for b in range(nb):  # no row view per entry (a view costs more than the FMAs)
                        s[r, b] += xj[b] * w
    for t in numba.prange(nparts):
        for i in range(t * m // nparts, (t + 1) * m // nparts):
            for b in range(nb):
                v = bias[i] if has_bias else np.float32(0.0)
                for u in range(nparts):
                    v += sums[u, i, b]
                if relu and not v > 0.0 and v == v:
                    v = np.float32(0.0)
                out[b, i] = v


@jit
def _nonzeros_by_image(x, nz, xv, counts):
    """For each image b, its nonzero inputs' columns into nz[b] (:func:`_gather_nonzeros`, the values
    into the scratch xv), their number into counts[b]."""
    for b in range(x.shape[0]):
        counts[b] = _gather_nonzeros(x[b], nz[b], xv)


@pjit
def _masked(masks, tile_ptr, vals, x, nz, counts, init, tiles, out, scratch, relu):
    """The masked layout, any batch: thread ``part`` runs its range of tiles, each tile over every
    image in turn (the tile's masks and values of the columns the images use stay in cache), one
    :func:`sparsecnn.kernels._simd.masked_tile` per tile and image; a last partial tile goes through
    the thread's scratch rows.
    NOTE: x (B, K); nz (B, K) and counts (B,) from _nonzeros_by_image; init holds ntiles * MASK_ROWS
    floats (the bias, zero-padded); out (B, M) C-contiguous; scratch (nparts, MASK_ROWS)."""
    nb, k = x.shape
    m = out.shape[1]
    nparts = tiles.size - 1
    for part in numba.prange(nparts):
        s = scratch[part]
        for t in range(tiles[part], tiles[part + 1]):
            r0 = t * MASK_ROWS
            for b in range(nb):
                ob = out[b]
                if r0 + MASK_ROWS <= m:
                    masked_tile(x[b], nz[b], counts[b], masks, tile_ptr, vals, t * k, init, r0, ob, r0, relu)
                else:
                    masked_tile(x[b], nz[b], counts[b], masks, tile_ptr, vals, t * k, init, r0, s, 0, relu)
                    for i in range(m - r0):
                        ob[r0 + i] = s[i]


_masked_serial = serial_twin(_masked)


@jit
def _gather_nonzeros(x, nz, xv):
    """The nonzero entries of the vector x: their indices into nz and values into xv; returns how many.
    NaN and inf are nonzero, so they propagate as in torch."""
    n = 0
    for j in range(x.size):
        v = x[j]
        if v != 0.0:
            nz[n] = j
            xv[n] = v
            n += 1
    return n


# Nonzero inputs per block of the dense-column walk: a register tile is loaded and stored once per
# block. Measured (Zen 4, 2 threads, fc6 4096 x 5904): 8 is fastest; 4 pays the tile traffic, 16-32
# read too many column runs at once for the prefetchers (27% zero inputs: 2.0 ms at 8, 2.5-2.9 ms at
# 16-32); software prefetch of the spans ahead (4 or 8 inputs) was slower at every block size.
_BLOCK = 8


@pjit
def _dense_vec(wt, bounds, nz, xv, n_nz, bias, has_bias, y, relu):
    """Batch 1, dense columns: thread t owns rows [bounds[t], bounds[t+1]) (whole vectors but the
    last) and adds ``xv[q] * wt[nz[q], r0:r1]`` over the nonzero inputs, ``_BLOCK`` inputs at a
    time, each block in register tiles (:func:`span_tile`); a last partial vector of rows runs
    scalar. ReLU (NaN kept) when the sums are done.
    NOTE: wt is (K, M) C-contiguous; nz[:n_nz] are columns < K; y has M elements."""
    m = y.size
    flat = wt.reshape(-1)
    nparts = bounds.size - 1
    for t in numba.prange(nparts):
        r0, r1 = bounds[t], bounds[t + 1]
        for i in range(r0, r1):
            y[i] = bias[i] if has_bias else np.float32(0.0)
        whole = r0 + (r1 - r0) // VW * VW
        for q0 in range(0, n_nz, _BLOCK):
            q1 = min(q0 + _BLOCK, n_nz)
            i = r0
            while i < whole:
                nv = min(NV_MAX, (whole - i) // VW)
                span_tile(flat, nz, xv, q0, q1, i, y, i, nv, nv * VW, np.float32(0.0), True, m, False)
                i += nv * VW
            for r in range(whole, r1):
                s = y[r]
                for q in range(q0, q1):
                    s += xv[q] * wt[nz[q], r]
                y[r] = s
        if relu:
            for i in range(r0, r1):
                v = y[i]
                if not v > 0.0 and v == v:
                    y[i] = np.float32(0.0)


_dense_vec_serial = serial_twin(_dense_vec)


@pjit
def _dense_mat(wt, bounds, xt, nz, n_nz, bias, has_bias, out):
    """Batch B > 1, dense columns. NOTE: as _dense_vec; out is (B, M)."""
    nb = xt.shape[1]
    nparts = bounds.size - 1
    for t in numba.prange(nparts):
        r0, r1 = bounds[t], bounds[t + 1]
        n = r1 - r0
        for b in range(nb):
            row = out[b, r0:r1]
            for i in range(n):
                row[i] = bias[r0 + i] if has_bias else np.float32(0.0)
        for q in range(n_nz):
            j = nz[q]
            col = wt[j, r0:r1]
            for b in range(nb):
                v = xt[j, b]
                if v != 0.0:
                    row = out[b, r0:r1]
                    for i in range(n):
                        row[i] += v * col[i]


def act_sparse_linear(prep: ActLinearPrep, x: np.ndarray, bias: np.ndarray | None, out: np.ndarray,
                      relu: bool = False) -> None:
    """``out = x @ W.T + bias``, reading only the weight columns of nonzero inputs.

    Parameters
    ----------
    prep : ActLinearPrep
    x : ndarray, shape (B, K), float32, C-contiguous
    bias : ndarray, shape (M,), float32, or None
    out : ndarray, shape (B, M), float32, C-contiguous
        Written in full.
    relu : bool
        ``max(out, 0)`` (NaN kept, as torch.relu) on the result.
    """
    bind_act_sparse_linear(prep, x.shape[0], bias, out, relu)(x)


# Below this many stored weights x batch a bound layer runs the serial dense kernel.
_SERIAL_MACS = 1 << 15


def bind_act_sparse_linear(prep: ActLinearPrep, batch: int, bias: np.ndarray | None, out: np.ndarray,
                           relu: bool = False) -> Callable[[np.ndarray], None]:
    """``run(x)``: :func:`act_sparse_linear` ``(prep, x, bias, out, relu)`` for batches of ``batch``,
    every argument but ``x`` bound once (the whole-model executor's steps).

    The callable uses the calling thread's workspace of ``prep``, so it must be called from the
    thread that bound it (the executor binds per thread).

    Parameters
    ----------
    prep : ActLinearPrep
    batch : int
    bias : ndarray, shape (M,), float32, or None
    out : ndarray, shape (batch, M), float32, C-contiguous
    relu : bool

    Returns
    -------
    callable
        ``run(x)`` with ``x`` of shape ``(batch, K)``, float32, C-contiguous.
    """
    m = prep.shape[0]
    if not out.flags.c_contiguous or out.shape != (batch, m):
        raise ValueError(f"bind_act_sparse_linear: out must be C-contiguous of shape {(batch, m)}")
    ws = prep.workspace(batch)
    has_bias = bias is not None
    b = bias if has_bias else np.zeros(0, np.float32)
    relu = bool(relu)
    if prep.masked:
        init = np.zeros(prep.ntiles * MASK_ROWS, np.float32)
        if has_bias:
            init[:m] = bias
        kernel = _masked_serial if prep.nnz * batch < _SERIAL_MACS else _masked
        margs = (init, ws.tiles, out, ws.scratch, relu)

        def run_masked(x: np.ndarray) -> None:
            _nonzeros_by_image(x, ws.nzb, ws.xv, ws.counts)
            kernel(prep.masks, prep.tile_ptr, prep.data, x, ws.nzb, ws.counts, *margs)

        return run_masked
    if batch == 1 and prep.dense_columns:
        vec = _dense_vec_serial if prep.dense_t.size < _SERIAL_MACS else _dense_vec
        y = out[0]

        def run_dense(x: np.ndarray) -> None:
            n_nz = _gather_nonzeros(x[0], ws.nz, ws.xv)
            vec(prep.dense_t, ws.bounds, ws.nz, ws.xv, n_nz, b, has_bias, y, relu)

        return run_dense

    if batch > 1 and prep.dense_columns:
        def run_dense_mat(x: np.ndarray) -> None:
            n_nz = _nonzero_columns(x, ws.nz)
            np.copyto(ws.xt, x.T)
            _dense_mat(prep.dense_t, ws.bounds, ws.xt, ws.nz, n_nz, b, has_bias, out)
            if relu:
                relu_(out.reshape(-1))

        return run_dense_mat

    packed = prep.packed_twin()  # the csc layout of older files runs through a packed copy
    ix, vals = packed.packed.view(packed.index_dtype), packed.packed.view(np.float32)
    ptr = packed.indptr
    words = packed_words(np.dtype(packed.index_dtype).itemsize)

    def run(x: np.ndarray) -> None:
        if batch == 1:
            _nonzero_split(x[0], ptr, ws.nz, ws.cost, ws.parts)
            _packed_vec(ix, vals, ptr, words, x[0], ws.nz, ws.parts, ws.sums, b, has_bias, out[0], relu)
        else:
            _split(ptr, ws.nz, _nonzero_columns(x, ws.nz), ws.cost, ws.parts)
            np.copyto(ws.xt, x.T)
            _packed_mat(ix, vals, ptr, words, ws.xt, ws.nz, ws.parts, ws.sums, b, has_bias, out, relu)

    return run
