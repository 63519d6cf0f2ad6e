"""Sparse x sparse convolution where the zeros of the input skip work (strategy ``spconv-act``).

For every output pixel the kernel first gathers the nonzero inputs under its receptive field (the
nonzeros of one column of Caffe's lowered input), keeping only the lowered rows ``k = (c, i, j)``
whose weight column is not all zero, then accumulates

.. math::

    y[p, :] = \\sum_{k : X[k, p] \\neq 0,\\; W_{:, k} \\neq 0} X[k, p] \\, W^T[k, :]

with the output channels of the pixel held in vector registers (the register tiles of
:mod:`sparsecnn.kernels._simd`): one broadcast input and one FMA per 8 output channels. The work
is (input density) x (kept columns) x Cout per pixel: ReLU zeros in the input and SSL's removed
columns are skipped; zero weights inside a kept column are not (a column is dense over Cout, which
is what keeps the inner loop a vector FMA). This is the output-stationary form of the
input-stationary scheme the seed study's sparse x sparse claim rests on; cf. Park et al., ICLR 2017
(direct sparse convolution) for the weight side.

Storage (``SpconvPrep``): the kept columns of the lowered weight, transposed and padded,
``wt (groups, Kr, Mp)`` float32 with ``Mp`` = Cout/groups rounded up to 8, and the map from
lowered row to kept column ``col_map (groups, K)`` int32 (-1: removed column).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from sparsecnn.kernels._numba import pjit
from sparsecnn.kernels._simd import VW, span_tile, tile_split

__all__ = ["SpconvPrep", "prepare_spconv", "spconv_input"]


@dataclass(frozen=True, eq=False)
class SpconvPrep:
    """Kept weight columns, transposed: what :func:`spconv_input` reads.

    Attributes
    ----------
    wt : ndarray, shape (groups, Kr, Mp), float32
        ``wt[g, r, m]`` is the weight of output channel ``g * Cout/g + m`` on the lowered row kept
        as column ``r``; lanes ``m >= Cout/g`` are zero.
    col_map : ndarray, shape (groups, K), int32
        Lowered row ``k = (c, i, j)`` of group ``g`` -> its kept column, or -1 when the column is all zero.
    weight_shape : tuple of int
        ``(Cout, Cin/groups, kh, kw)``.
    """

    wt: np.ndarray
    col_map: np.ndarray
    weight_shape: tuple[int, int, int, int]

    @property
    def nbytes(self) -> int:
        """Exact bytes held: the padded kept columns and the column map."""
        return int(self.wt.nbytes + self.col_map.nbytes)

    def check_format(self) -> None:
        cout, cin_g, kh, kw = self.weight_shape
        g, kr, mp = self.wt.shape
        assert self.col_map.shape == (g, cin_g * kh * kw) and mp % VW == 0 and mp >= cout // g
        for gi in range(g):
            kept = self.col_map[gi][self.col_map[gi] >= 0]
            assert (np.sort(kept) == np.arange(kept.size)).all() and kept.size <= kr


def prepare_spconv(weight: np.ndarray, groups: int) -> SpconvPrep:
    """Build the kept, transposed columns of a dense float32 weight ``(Cout, Cin/g, kh, kw)``."""
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    cout = weight.shape[0]
    mg = cout // groups
    low = weight.reshape(groups, mg, -1)  # (g, Mg, K)
    k = low.shape[2]
    keep = (low != 0).any(axis=1)  # (g, K)
    kr = int(keep.sum(axis=1).max()) if keep.size else 0
    mp = -(-mg // VW) * VW
    wt = np.zeros((groups, kr, mp), np.float32)
    col_map = np.full((groups, k), -1, np.int32)
    for gi in range(groups):
        cols = np.flatnonzero(keep[gi])
        col_map[gi, cols] = np.arange(cols.size, dtype=np.int32)
        wt[gi, : cols.size, :mg] = low[gi][:, cols].T
    return SpconvPrep(wt, col_map, tuple(int(v) for v in weight.shape))


# Output channels per register tile: 6 vectors (48 floats) keep one tile's slice of the weights
# (K x 48 floats, 442 KB for AlexNet conv3) in a 1 MB L2 while every pixel of the image reuses it;
# a full-width row per nonzero streamed the whole 3.5 MB weight from L3 for each pixel (2.5x slower).
_TILE_VECTORS = 6


@pjit
def _gather(x, col_map, kh, kw, sh, sw, ph, pw, dh, dw, hout, wout, offs, vals, counts):
    """Row ``t = (b, g, p)`` of ``offs/vals``: the kept columns and values of the nonzero inputs
    under output pixel p of group g (lowered-row order); ``counts[t]`` of them.
    NOTE: offs, vals are (B * groups * P, K)."""
    nb, cin, h, w = x.shape
    groups, k_all = col_map.shape
    cg = cin // groups
    npix = hout * wout
    for t in numba.prange(nb * groups * npix):
        b = t // (groups * npix)
        rem = t - b * groups * npix
        g = rem // npix
        p = rem - g * npix
        oh = p // wout
        ow = p - oh * wout
        o = offs[t]
        v = vals[t]
        n = 0
        cm = col_map[g]
        for c in range(cg):
            src = x[b, g * cg + c]
            for i in range(kh):
                ih = oh * sh - ph + i * dh
                if ih < 0 or ih >= h:
                    continue
                line = src[ih]
                for j in range(kw):
                    iw = ow * sw - pw + j * dw
                    if iw < 0 or iw >= w:
                        continue
                    # Branch-free compaction (ReLU inputs are about half zeros: a branch on the
                    # value mispredicts): write every entry, advance past the kept ones only.
                    val = line[iw]
                    col = cm[(c * kh + i) * kw + j]
                    if n < k_all:
                        o[n] = col
                        v[n] = val
                    n += (val != 0.0) & (col >= 0)
        counts[t] = n


@pjit
def _compute(wt, offs, vals, counts, npix, acc):
    """``acc[b, p, g*Mg + m] = sum_n vals[t, n] * wt[g, offs[t, n], m]`` for ``t = (b, g, p)``; one
    task per (image, group, channel tile), looping over the pixels.
    NOTE: acc is (B, P, Cout), Cout = groups * Mg, Mg <= Mp; counts from :func:`_gather`."""
    groups, kr, mp = wt.shape
    k_all = offs.shape[1]
    nb = acc.shape[0]
    cout = acc.shape[2]
    mg = cout // groups
    nvec = mp // VW
    ntiles = (nvec + _TILE_VECTORS - 1) // _TILE_VECTORS
    wflat = wt.reshape(wt.size)
    aflat = acc.reshape(acc.size)
    oflat = offs.reshape(offs.size)
    vflat = vals.reshape(vals.size)
    for task in numba.prange(nb * groups * ntiles):
        b = task // (groups * ntiles)
        rem = task - b * groups * ntiles
        g = rem // ntiles
        tile = rem - g * ntiles
        v0, nv = tile_split(nvec, tile, ntiles)
        nvalid = min(mg - v0 * VW, nv * VW)
        if nvalid <= 0:
            continue
        base = g * kr * mp + v0 * VW
        for p in range(npix):
            t = (b * groups + g) * npix + p
            k0 = t * k_all
            pos = (b * npix + p) * cout + g * mg + v0 * VW
            span_tile(wflat, oflat, vflat, k0, k0 + counts[t], base, aflat, pos, nv, nvalid,
                      np.float32(0.0), False, mp, False)


@pjit
def _to_nchw(acc, bias, has_bias, out):
    """``out[b, m, p] = acc[b, p, m] (+ bias[m])``. NOTE: out is (B, Cout, P)."""
    nb, npix, cout = acc.shape
    for t in numba.prange(nb * cout):
        b = t // cout
        m = t - b * cout
        bv = bias[m] if has_bias else np.float32(0.0)
        for p in range(npix):
            out[b, m, p] = acc[b, p, m] + bv


def spconv_input(prep: SpconvPrep, x: np.ndarray, geometry: tuple[int, ...], bias: np.ndarray | None,
                 out: np.ndarray, ws: dict) -> None:
    """The convolution of ``x`` skipping its zeros (and the removed weight columns).

    Parameters
    ----------
    prep : SpconvPrep
    x : ndarray, shape (B, Cin, H, W), float32, C-contiguous
    geometry : tuple of int
        ``(kh, kw, sh, sw, ph, pw, dh, dw)``.
    bias : ndarray, shape (Cout,), float32, or None
    out : ndarray, shape (B, Cout, Hout, Wout), float32
        Written in full.
    ws : dict
        Workspace for this input shape (filled on first use): the gathered lists and the
        channels-last accumulator.
    """
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    nb, cout, hout, wout = out.shape
    groups = prep.wt.shape[0]
    k_all = prep.col_map.shape[1]
    npix = hout * wout
    if "offs" not in ws:
        rows = nb * groups * npix
        ws["offs"] = np.empty((rows, max(k_all, 1)), np.int32)
        ws["vals"] = np.empty((rows, max(k_all, 1)), np.float32)
        ws["counts"] = np.empty(rows, np.int64)
        ws["acc"] = np.empty((nb, npix, cout), np.float32)
    has_bias = bias is not None
    b = bias if has_bias else np.zeros(0, np.float32)
    if prep.wt.shape[1] == 0:  # every weight column removed: the output is the bias
        out[...] = b.reshape(1, -1, 1, 1) if has_bias else np.float32(0.0)
        return
    _gather(x, prep.col_map, kh, kw, sh, sw, ph, pw, dh, dw, hout, wout, ws["offs"], ws["vals"],
            ws["counts"])
    _compute(prep.wt, ws["offs"], ws["vals"], ws["counts"], npix, ws["acc"])
    _to_nchw(ws["acc"], b, has_bias, out.reshape(nb, cout, npix))
