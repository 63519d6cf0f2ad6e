"""Direct sparse convolution (Park et al., "Faster CNNs with Direct Sparse Convolutions and Guided
Pruning", ICLR 2017; SkimCaffe): no im2col. Every nonzero weight ``W[co, ci, r, s]`` adds one
contiguous span of the (padded, phase-decomposed) input plane, scaled by the weight, into the output
plane of ``co``.

Layout
------
The padded input of every channel is split into ``sh * sw`` *phase planes* (Hph, Wph)::

    P[c, (ph, pw)][i, j] = xpad[c, i * sh + ph, j * sw + pw]

so an output ``(oh, ow)`` of a stride-``(sh, sw)`` convolution reads, for tap ``(r, s)``,
``P[c, ((r*dh) % sh, (s*dw) % sw)][oh + (r*dh)//sh, ow + (s*dw)//sw]``: a stride-1 access. Flattening a
phase plane row-major, the output computed in "wide" rows of width ``Wph`` (``Wout`` valid columns, the
rest discarded) is, for each nonzero, one contiguous span of length ``(Hout - 1) * Wph + Wout`` starting
at a precomputed offset. For stride 1 the phase plane is the padded plane itself. The offsets depend on
the input shape and live in a per-shape workspace inside the prep object, with the phase-decomposed
input buffer, so a call allocates nothing after the first one for a shape.

The inner loop adds eight nonzeros per pass over an output tile
(``acc[j] += v0*s0[j] + ... + v7*s7[j]``): one load and one store of the output per eight multiply-adds
instead of per one, which is what makes the loop compute-bound rather than store-bound.

Input-channel blocking (SkimCaffe's loop order: a block of input channels kept in L1 and used by every
output channel before the next block) was measured here and lost: on a Zen 3 core, conv3 of AlexNet
at 90% took 1.30 ms blocked (18 channels x the whole 13x13 plane per block) against 1.11 ms unblocked,
single thread, same process, interleaved. A block holds only ~16 nonzeros per filter, so the passes
over the output tile get short and their tails (groups of 4, 2, 1) and per-pass setup cost more than
the L2 -> L1 traffic they save. The loop below therefore runs all nonzeros of one output channel over
one L1-resident output tile of up to ``_TILE`` floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from sparsecnn.kernels._numba import pjit
from sparsecnn.kernels._simd import NV_MAX, VW, span_tile_acc, span_tiles

__all__ = ["DirectConvPrep", "direct_conv2d", "prepare_direct"]

# Input bytes a group of output rows may read: half of a Zen 3 core's 512 KiB L2, so the rows stay
# there while every output channel of the thread streams its spans from them.
_L2_BYTES = 256 * 1024
_L1_BYTES = 16 * 1024
_TILE = NV_MAX * VW
BLOCKED = True


def _index_dtype(n: int) -> np.dtype:
    """The narrowest signed integer dtype that holds ``0 .. n - 1``."""
    if n <= np.iinfo(np.int16).max + 1:
        return np.dtype(np.int16)
    if n <= np.iinfo(np.int32).max + 1:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


@dataclass(eq=False)
class _Workspace:
    """Per-input-shape state: span offsets, the phase-decomposed input and the output tiles."""

    offsets: np.ndarray  # (nnz,) offset of each nonzero's span inside one image's phase planes
    xt: np.ndarray  # (B, Cin * sh * sw * Hph * Wph + VW) phase-decomposed padded input
    wide: np.ndarray  # (nparts, group * wph + VW) one wide output buffer per thread
    bounds: np.ndarray  # (nparts + 1,) output-channel ranges with balanced nonzero counts
    hph: int
    wph: int
    hout: int
    wout: int
    span: int  # (hout - 1) * wph + wout
    group: int  # output rows per pass over the output channels
    bptr: np.ndarray  # (Cout, nblk + 1) nonzeros of output channel co in channel block j
    tiles: np.ndarray  # (nparts, max part size, TILE) register-tile accumulators per thread


@dataclass(eq=False)
class DirectConvPrep:
    """Sparse filters in per-output-channel CSR form, ready for :func:`direct_conv2d`.

    Attributes
    ----------
    indptr : ndarray, shape (Cout + 1,), int32
        Nonzeros of output channel ``co`` are ``indptr[co]:indptr[co + 1]``.
    indices : ndarray, shape (nnz,), int16 or int32
        Flat tap index ``(ci * kh + r) * kw + s`` inside the filter (narrowest dtype that fits),
        sorted by input channel within a filter.
    data : ndarray, shape (nnz,), float32
        The nonzero weights.
    """

    weight_shape: tuple[int, int, int, int]
    groups: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    _workspaces: dict = field(default_factory=dict, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored sparse weights: values, indices and pointers at their dtypes."""
        return int(self.indptr.nbytes + self.indices.nbytes + self.data.nbytes)

    def output_shape(self, x_shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """``(B, Cout, Hout, Wout)`` for an input of shape ``(B, Cin, H, W)``."""
        b, _, h, w = x_shape
        cout, _, kh, kw = self.weight_shape
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        hout = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wout = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return b, cout, hout, wout

    def workspace(self, x_shape: tuple[int, int, int, int]) -> _Workspace:
        nparts = numba.get_num_threads()
        key = (*x_shape, nparts)
        ws = self._workspaces.get(key)
        if ws is None:
            ws = self._build_workspace(x_shape, nparts)
            self._workspaces[key] = ws
        return ws

    def _build_workspace(self, x_shape: tuple[int, int, int, int], nparts: int) -> _Workspace:
        b, cin, h, w = x_shape
        cout, cin_g, kh, kw = self.weight_shape
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        _, _, hout, wout = self.output_shape(x_shape)
        hp, wp = h + 2 * ph, w + 2 * pw
        hph, wph = -(-hp // sh), -(-wp // sw)
        plane = hph * wph
        nph = sh * sw
        # Decode the flat tap index of every nonzero and turn it into a span offset.
        idx = self.indices.astype(np.int64)
        ci, rs = np.divmod(idx, kh * kw)
        r, s = np.divmod(rs, kw)
        co = np.repeat(np.arange(cout), np.diff(self.indptr))
        c = (co // (cout // self.groups)) * cin_g + ci
        phase = ((r * dh) % sh) * sw + (s * dw) % sw
        off = (c * nph + phase) * plane + ((r * dh) // sh) * wph + (s * dw) // sw
        per_image = cin * nph * plane
        off_dtype = np.int32 if per_image <= np.iinfo(np.int32).max else np.int64
        span = (hout - 1) * wph + wout
        # Output rows per group: the input rows they read (all channels, all phases) fit in L2.
        halo = ((kh - 1) * dh) // sh + 1
        group = max(1, min(hout, _L2_BYTES // (4 * cin * nph * wph) - halo))
        counts = np.diff(self.indptr).astype(np.int64) + 1  # +1: an empty filter still costs a bias fill
        bounds = _balanced_bounds(counts, nparts)
        # Channel blocks: the input one tile of TILE outputs reads from a block stays in L1.
        taps_h = ((kh - 1) * dh) // sh + 1
        taps_w = ((kw - 1) * dw) // sw + 1
        phases = len({((rr * dh) % sh, (ss * dw) % sw) for rr in range(kh) for ss in range(kw)})
        foot = phases * min(_TILE + (taps_h - 1) * wph + taps_w - 1, taps_h * (_TILE + taps_w - 1))
        cb = max(1, min(cin_g, _L1_BYTES // (4 * foot)))
        nblk = -(-cin_g // cb)
        cnt = np.bincount(co * nblk + ci // cb, minlength=cout * nblk).reshape(cout, nblk)
        bptr = np.zeros((cout, nblk + 1), dtype=np.int64)
        bptr[:, 0] = self.indptr[:-1]
        np.cumsum(cnt, axis=1, out=bptr[:, 1:])
        bptr[:, 1:] += bptr[:, :1]
        maxpart = int(np.diff(bounds).max()) if nparts else 0
        return _Workspace(
            offsets=np.ascontiguousarray(off, dtype=off_dtype),
            xt=np.zeros((b, per_image + VW), dtype=np.float32),
            wide=np.zeros((nparts, group * wph + VW), dtype=np.float32),
            bounds=bounds,
            hph=hph,
            wph=wph,
            hout=hout,
            wout=wout,
            span=span,
            group=group,
            bptr=bptr,
            tiles=np.zeros((nparts, max(maxpart, 1), _TILE), dtype=np.float32),
        )


def _balanced_bounds(cost: np.ndarray, nparts: int) -> np.ndarray:
    """Split ``range(len(cost))`` into ``nparts`` contiguous ranges of about equal total cost."""
    cum = np.concatenate(([0], np.cumsum(cost)))
    targets = cum[-1] * np.arange(nparts + 1) / nparts
    bounds = np.searchsorted(cum, targets, side="left").astype(np.int64)
    bounds[0], bounds[-1] = 0, cost.size
    return np.maximum.accumulate(bounds)


def prepare_direct(
    weight: np.ndarray,
    groups: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> DirectConvPrep:
    """Convert dense filters to the direct-convolution format.

    Parameters
    ----------
    weight : ndarray, shape (Cout, Cin // groups, kh, kw), float32
        Dense filters; exact zeros are dropped.
    groups : int
    stride, padding, dilation : tuple of int, (h, w)

    Returns
    -------
    DirectConvPrep
    """
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    cout, cin_g, kh, kw = weight.shape
    flat = weight.reshape(cout, -1)
    rows, cols = np.nonzero(flat)  # row-major: sorted by co, then by (ci, r, s)
    indptr = np.zeros(cout + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=cout), out=indptr[1:])
    return DirectConvPrep(
        weight_shape=(cout, cin_g, kh, kw),
        groups=int(groups),
        stride=(int(stride[0]), int(stride[1])),
        padding=(int(padding[0]), int(padding[1])),
        dilation=(int(dilation[0]), int(dilation[1])),
        indptr=indptr,
        indices=cols.astype(_index_dtype(cin_g * kh * kw)),
        data=np.ascontiguousarray(flat[rows, cols], dtype=np.float32),
    )


def direct_conv2d(prep: DirectConvPrep, x: np.ndarray, bias: np.ndarray | None, out: np.ndarray) -> None:
    """``out = conv2d(x, W) + bias`` by direct sparse convolution.

    Parameters
    ----------
    prep : DirectConvPrep
    x : ndarray, shape (B, Cin, H, W), float32, C-contiguous
    bias : ndarray, shape (Cout,), float32, or None
    out : ndarray, shape (B, Cout, Hout, Wout), float32
        Written in full.
    """
    ws = prep.workspace(x.shape)
    sh, sw = prep.stride
    ph, pw = prep.padding
    _phase_decompose(x, ws.xt, sh, sw, ph, pw, ws.hph, ws.wph)
    has_bias = bias is not None
    b = bias if has_bias else prep.data[:0]
    if BLOCKED:
        _blocked_kernel(ws.xt, ws.offsets, prep.data, ws.bptr, b, has_bias, out, ws.tiles, ws.bounds, ws.wph,
                        ws.span)
        return
    _direct_kernel(
        ws.xt, ws.offsets, prep.data, prep.indptr, b, has_bias, out, ws.wide, ws.bounds, ws.wph, ws.span,
        ws.group,
    )


@pjit
def _phase_decompose(x, xt, sh, sw, ph, pw, hph, wph):
    """Zero-padded, phase-decomposed copy of ``x`` into ``xt`` (see the module docstring).

    NOTE: xt has shape (B, Cin * sh * sw * hph * wph); every element is written.
    """
    nb, cin, h, w = x.shape
    nph = sh * sw
    plane = hph * wph
    for bc in numba.prange(nb * cin):
        b = bc // cin
        c = bc - b * cin
        for q in range(nph):
            qh = q // sw
            qw = q - qh * sw
            base = (c * nph + q) * plane
            for i in range(hph):
                row = base + i * wph
                hi = i * sh + qh - ph
                if hi < 0 or hi >= h:
                    for j in range(wph):
                        xt[b, row + j] = 0.0
                    continue
                if sw == 1:
                    # Contiguous row: left pad, copy, right pad.
                    lo = min(max(pw, 0), wph)
                    n = min(w, wph - lo)
                    for j in range(lo):
                        xt[b, row + j] = 0.0
                    for j in range(n):
                        xt[b, row + lo + j] = x[b, c, hi, j]
                    for j in range(lo + n, wph):
                        xt[b, row + j] = 0.0
                else:
                    for j in range(wph):
                        wi = j * sw + qw - pw
                        xt[b, row + j] = x[b, c, hi, wi] if 0 <= wi < w else 0.0


@pjit
def _direct_kernel(xt, offs, data, indptr, bias, has_bias, out, wide, bounds, wph, span, group):
    """Direct sparse convolution over prepared spans, parallel over balanced output-channel ranges.

    For each image and each group of ``group`` wide output rows (sized so that the input rows they
    read stay in L2), every output channel of the thread's range computes the group in register
    tiles (:func:`sparsecnn.kernels._simd.span_tiles`: all of the channel's nonzeros per tile, no
    stores in the inner loop) into its wide buffer, then copies the ``Wout`` valid columns of each row.
    NOTE: offs/xt come from the same workspace (xt rows padded by VW floats past the last span);
    out is (B, Cout, Hout, Wout) with Wout <= wph; wide rows hold group * wph + VW floats.
    """
    nb, _, hout, wout = out.shape
    nparts = bounds.size - 1
    for part in numba.prange(nparts):
        w = wide[part]
        for b in range(nb):
            xb = xt[b]
            for row0 in range(0, hout, group):
                nrows = min(group, hout - row0)
                p0 = row0 * wph
                n = min(nrows * wph, span - p0)
                for co in range(bounds[part], bounds[part + 1]):
                    bv = bias[co] if has_bias else np.float32(0.0)
                    span_tiles(xb, offs, data, indptr[co], indptr[co + 1], p0, w, 0, n, bv)
                    for i in range(nrows):
                        src = i * wph
                        for j in range(wout):
                            out[b, co, row0 + i, j] = w[src + j]


@pjit
def _blocked_kernel(xt, offs, data, bptr, bias, has_bias, out, tiles, bounds, wph, span):
    """Direct sparse convolution, register tiles of TILE outputs, input channels in L1-sized blocks.

    NOTE: bptr[co, j] .. bptr[co, j + 1] are the nonzeros of co in channel block j; tiles[part] has a
    TILE-float row per output channel of the part.
    """
    nb, _, hout, wout = out.shape
    nparts = bounds.size - 1
    nblk = bptr.shape[1] - 1
    tile = tiles.shape[2]
    for part in numba.prange(nparts):
        acc = tiles[part]
        c0 = bounds[part]
        c1 = bounds[part + 1]
        for b in range(nb):
            xb = xt[b]
            for p0 in range(0, span, tile):
                n = min(tile, span - p0)
                nvec = (n + VW - 1) // VW
                for co in range(c0, c1):
                    bv = bias[co] if has_bias else np.float32(0.0)
                    a = acc[co - c0]
                    for j in range(tile):
                        a[j] = bv
                for blk in range(nblk):
                    for co in range(c0, c1):
                        k0 = bptr[co, blk]
                        k1 = bptr[co, blk + 1]
                        if k1 > k0:
                            span_tile_acc(xb, offs, data, k0, k1, p0, acc[co - c0], 0, nvec)
                # Crop the tile's wide rows into the output.
                r = p0 // wph
                c = p0 - r * wph
                j = 0
                while j < n:
                    m = min(wph - c, n - j)
                    if c < wout:
                        q = min(wout - c, m)
                        for co in range(c0, c1):
                            a = acc[co - c0]
                            for t in range(q):
                                out[b, co, r, c + t] = a[j + t]
                    j += m
                    r += 1
                    c = 0
