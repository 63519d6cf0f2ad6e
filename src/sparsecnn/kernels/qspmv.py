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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from sparsecnn.kernels._numba import PerThread, balanced_bounds, num_threads, pjit
from sparsecnn.kernels._simd import fmadd

__all__ = ["QuantLinearPrep", "prepare_quant_linear", "quant_linear", "quant_prep_from_codes"]


@dataclass(eq=False)
class _Workspace:
    xt: np.ndarray  # (K, B) transposed input (batch > 1 only)
    bounds: np.ndarray  # (nparts + 1,) row ranges with balanced nonzero counts


@dataclass(eq=False)
class QuantLinearPrep:
    """Codebook-index CSR weights ready for :func:`quant_linear`: ``W[i, indices[e]] = codebook[codes[e]]``.

    Attributes
    ----------
    shape : tuple of int
        ``(M, K)``.
    indptr : ndarray, shape (M + 1,), int32 (int64 when nnz does not fit int32)
    indices : ndarray, shape (nnz,), uint16 when K <= 65536 else uint32; columns, sorted per row
    codes : ndarray, shape (nnz,), uint8 for codebooks of <= 256 entries, else uint16 / uint32
    codebook : ndarray, shape (n_codes,), float32
    """

    shape: tuple[int, int]
    indptr: np.ndarray
    indices: np.ndarray
    codes: np.ndarray
    codebook: np.ndarray
    _workspaces: PerThread = field(default_factory=PerThread, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.codes.size)

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored weights: codes, columns, pointers and the codebook at their dtypes."""
        return int(self.indptr.nbytes + self.indices.nbytes + self.codes.nbytes + self.codebook.nbytes)

    def to_dense(self) -> np.ndarray:
        """The dense weight, shape (M, K), float32."""
        m, k = self.shape
        out = np.zeros((m, k), dtype=np.float32)
        rows = np.repeat(np.arange(m), np.diff(self.indptr.astype(np.int64)))
        out[rows, self.indices.astype(np.int64)] = self.codebook[self.codes.astype(np.int64)]
        return out

    def workspace(self, batch: int) -> _Workspace:
        nparts = num_threads()
        key = (batch, nparts)
        ws = self._workspaces.get(key)
        if ws is None:
            _, k = self.shape
            cost = np.diff(self.indptr).astype(np.int64) + 4  # a row also costs its store and setup
            bounds = balanced_bounds(cost, nparts)
            ws = _Workspace(xt=np.zeros((k, batch) if batch > 1 else (0, 1), dtype=np.float32),
                            bounds=bounds)
            self._workspaces[key] = ws
        return ws


def _code_dtype(n_codes: int) -> type:
    if n_codes <= 256:
        return np.uint8
    return np.uint16 if n_codes <= 65536 else np.uint32


def _index_dtype(k: int) -> type:
    # Unsigned: numba skips the negative-index check on unsigned indices.
    return np.uint16 if k <= 65536 else np.uint32


def quant_prep_from_codes(shape: tuple[int, int], indptr: np.ndarray, indices: np.ndarray,
                          codes: np.ndarray, codebook: np.ndarray) -> QuantLinearPrep:
    """A :class:`QuantLinearPrep` from CSR arrays whose values are codebook indices (cast to the
    narrowest dtypes; the caller has checked them)."""
    m, k = int(shape[0]), int(shape[1])
    nnz = int(indices.size)
    ptr_dtype = np.int32 if nnz <= np.iinfo(np.int32).max else np.int64
    return QuantLinearPrep(
        shape=(m, k),
        indptr=np.ascontiguousarray(indptr, dtype=ptr_dtype),
        indices=np.ascontiguousarray(indices, dtype=_index_dtype(k)),
        codes=np.ascontiguousarray(codes, dtype=_code_dtype(int(codebook.size))),
        codebook=np.ascontiguousarray(codebook, dtype=np.float32),
    )


def prepare_quant_linear(weight: np.ndarray) -> QuantLinearPrep:
    """Convert a dense ``(M, K)`` weight to codebook-index CSR, exactly.

    Parameters
    ----------
    weight : ndarray, shape (M, K), float32
        Exact zeros are dropped; the codebook is the sorted distinct nonzero values (``2**b - 1`` of
        them or fewer for a ``b``-bit quantized layer, so uint8 codes).
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
    return quant_prep_from_codes((m, k), indptr, cols, codes.reshape(-1), codebook)


def quant_linear(prep: QuantLinearPrep, x: np.ndarray, bias: np.ndarray | None, out: np.ndarray) -> None:
    """``out = x @ W.T + bias`` with ``W`` in codebook-index CSR.

    Parameters
    ----------
    prep : QuantLinearPrep
    x : ndarray, shape (B, K), float32, C-contiguous
    bias : ndarray, shape (M,), float32, or None
    out : ndarray, shape (B, M), float32
        Written in full.
    """
    batch = x.shape[0]
    ws = prep.workspace(batch)
    has_bias = bias is not None
    b = bias if has_bias else prep.codebook[:0]
    if batch == 1 and prep.codes.dtype == np.uint8 and prep.indices.dtype == np.uint16:
        nnz = prep.codes.size
        # Whole 64-bit words over the arrays' first entries: eight codes, four columns a load.
        c64 = prep.codes[: nnz // 8 * 8].view(np.uint64)
        i64 = prep.indices[: nnz // 4 * 4].view(np.uint64)
        _qspmv_wide(prep.indptr, prep.indices, prep.codes, c64, i64, prep.codebook, x[0], b, has_bias, out[0],
                    ws.bounds)
    elif batch == 1:
        _qspmv(prep.indptr, prep.indices, prep.codes, prep.codebook, x[0], b, has_bias, out[0], ws.bounds)
    else:
        ws.xt[:] = x.T
        _qspmm(prep.indptr, prep.indices, prep.codes, prep.codebook, ws.xt, b, has_bias, out, ws.bounds)


@pjit
def _qspmv(indptr, indices, codes, codebook, x, bias, has_bias, y, bounds):
    """Quantized CSR spmv (Deep Compression's weight sharing, Han et al. ICLR 2016, run in place):
    ``y[m] = sum_e codebook[codes[e]] * x[indices[e]]``, rows split in nnz-balanced ranges, one per
    thread. As :func:`sparsecnn.kernels.spmv._spmv`: eight independent FMA chains per row, each row
    sliced and walked with a non-negative index. The codebook (<= 1 KiB for uint8 codes) stays in L1.
    NOTE: indices are valid columns of x; codes are valid entries of codebook; y has M elements.
    """
    nparts = bounds.size - 1
    cb = codebook
    for part in numba.prange(nparts):
        for m in range(bounds[part], bounds[part + 1]):
            k0 = indptr[m]
            n = indptr[m + 1] - k0
            c = codes[k0 : k0 + n]
            ix = indices[k0 : k0 + n]
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
            for q in range(n // 8):
                k = q * 8
                s0 = fmadd(cb[c[k]], x[ix[k]], s0)
                s1 = fmadd(cb[c[k + 1]], x[ix[k + 1]], s1)
                s2 = fmadd(cb[c[k + 2]], x[ix[k + 2]], s2)
                s3 = fmadd(cb[c[k + 3]], x[ix[k + 3]], s3)
                s4 = fmadd(cb[c[k + 4]], x[ix[k + 4]], s4)
                s5 = fmadd(cb[c[k + 5]], x[ix[k + 5]], s5)
                s6 = fmadd(cb[c[k + 6]], x[ix[k + 6]], s6)
                s7 = fmadd(cb[c[k + 7]], x[ix[k + 7]], s7)
            for k in range(n - n % 8, n):
                s0 = fmadd(cb[c[k]], x[ix[k]], s0)
            s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
            y[m] = s + bias[m] if has_bias else s


@pjit
def _qspmv_wide(indptr, indices, codes, codes64, indices64, codebook, x, bias, has_bias, y, bounds):
    """:func:`_qspmv` for uint8 codes and uint16 columns with fewer loads per nonzero: the 8-aligned
    blocks of a row are read as one 64-bit word of eight codes and two words of four columns each, the
    fields taken out by shift and mask (ALU work, which the loop has to spare), so a nonzero costs two
    loads (its codebook entry and its x) instead of four. The few entries before a row's first
    aligned block and after its last are walked one by one, in two chains. Measured on AlexNet's
    fc6/fc7 at 91% (5-bit codes, 2 threads): 1.18x and 1.25x the one-entry-at-a-time loop; sixteen
    entries a step was slower.
    NOTE: codes64 / indices64 are uint64 views of the first nnz // 8 * 8 codes / nnz // 4 * 4 columns;
    indices are valid columns of x; codes are valid entries of codebook; y has M elements.
    """
    nparts = bounds.size - 1
    cb = codebook
    for part in numba.prange(nparts):
        for m in range(bounds[part], bounds[part + 1]):
            k0 = indptr[m]
            k1 = indptr[m + 1]
            head = min(k1, (k0 + 7) // 8 * 8)
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
            for e in range(k0, head - 1, 2):  # the head (< 8 entries) in two chains
                s0 = fmadd(cb[codes[e]], x[indices[e]], s0)
                s1 = fmadd(cb[codes[e + 1]], x[indices[e + 1]], s1)
            if (head - k0) % 2:
                s2 = fmadd(cb[codes[head - 1]], x[indices[head - 1]], s2)
            for blk in range(head // 8, k1 // 8):
                c = codes64[blk]
                i0 = indices64[2 * blk]
                i1 = indices64[2 * blk + 1]
                s0 = fmadd(cb[c & 0xFF], x[i0 & 0xFFFF], s0)
                s1 = fmadd(cb[(c >> 8) & 0xFF], x[(i0 >> 16) & 0xFFFF], s1)
                s2 = fmadd(cb[(c >> 16) & 0xFF], x[(i0 >> 32) & 0xFFFF], s2)
                s3 = fmadd(cb[(c >> 24) & 0xFF], x[i0 >> 48], s3)
                s4 = fmadd(cb[(c >> 32) & 0xFF], x[i1 & 0xFFFF], s4)
                s5 = fmadd(cb[(c >> 40) & 0xFF], x[(i1 >> 16) & 0xFFFF], s5)
                s6 = fmadd(cb[(c >> 48) & 0xFF], x[(i1 >> 32) & 0xFFFF], s6)
                s7 = fmadd(cb[c >> 56], x[i1 >> 48], s7)
            t = max(head, k1 // 8 * 8)
            for e in range(t, k1 - 1, 2):  # and the tail
                s4 = fmadd(cb[codes[e]], x[indices[e]], s4)
                s5 = fmadd(cb[codes[e + 1]], x[indices[e + 1]], s5)
            if (k1 - t) % 2:
                s6 = fmadd(cb[codes[k1 - 1]], x[indices[k1 - 1]], s6)
            s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
            y[m] = s + bias[m] if has_bias else s


@pjit
def _qspmm(indptr, indices, codes, codebook, xt, bias, has_bias, out, bounds):
    """Quantized CSR x dense: ``out[:, m] = sum_e codebook[codes[e]] * xt[indices[e], :]`` (+ bias),
    accumulated into the output's column per row (a strided store per batch entry at the row's end).
    NOTE: xt is (K, B) C-contiguous; out is (B, M).
    """
    nb = xt.shape[1]
    nparts = bounds.size - 1
    for part in numba.prange(nparts):
        acc = np.empty(nb, dtype=np.float32)
        for m in range(bounds[part], bounds[part + 1]):
            bv = bias[m] if has_bias else np.float32(0.0)
            for j in range(nb):
                acc[j] = 0.0
            for e in range(indptr[m], indptr[m + 1]):
                w = codebook[codes[e]]
                row = xt[indices[e]]
                for j in range(nb):
                    acc[j] = fmadd(w, row[j], acc[j])
            for j in range(nb):
                out[j, m] = acc[j] + bv
