"""Implicit-GEMM convolution over the kept lowered columns: SSL's compact GEMM without im2col.

Structured sparsity (SSL, Wen et al. 2016) leaves a lowered weight whose kept filters share their
kept columns ``(c, i, j)``; the ``lowered`` strategy multiplies that compact matrix by an im2col
copy of just those columns. Here the copy is not made: column ``k`` of the lowered input is a
contiguous span of the phase-decomposed, padded input (the direct kernel's layout, see
:mod:`sparsecnn.kernels.conv`) at offset ``offs[k]``, so the GEMM reads it in place:

.. math:: \\text{wide}[f, p] = b_f + \\sum_k W[f, k]\\, x_t[\\text{offs}[k] + p]

over wide output rows, cropped into the output afterwards (the direct kernel's ``_crop``).

Why: at the sizes SSL leaves in AlexNet (86-210 kept filters, 535-1220 kept columns, 169-729
pixels) im2col costs 20-30% of the layer, and the direct kernel, which needs no copy either, makes
one vector load per FMA (it cannot know that filters share columns). The micro-kernel
(:func:`sparsecnn.kernels._simd.gemm_tile`) holds ``GEMM_MR`` (4) filters x ``GEMM_NV`` (6)
vectors in registers and loads each input vector once for the four filters: 10 loads per 24 FMAs,
so it is bound by the FMA units. Filters are padded to a multiple of 4 with zero rows (cropped to
nowhere); channels no kept filter writes are set to the bias.

Threads split the (group, 4-filter tile) items; each walks, per image, its tile's wide rows in
register tiles of up to ``GEMM_NV`` vectors over all kept columns (the tile's weights, ``4 Kr``
floats, stay in L1; the input is read from L2). With ``relu`` the crop stores ``max(v, 0)``.
Where the input has phase planes (stride > 1) or a plane has many register tiles, and one tile's
input window of all channels does not fit L1, the loop turns as the direct kernel's does
(:func:`_blocked_kernel`): channel blocks whose window fits L1, and for each block and tile every item
of the thread adds the block's columns into its tile (``gemm_tile``'s ``accumulate``). Measured on
dense ResNet-50 shapes (2 threads, interleaved): 3x3 stride 2 from 56x56 1.13-1.75x, 3x3 on 56x56
1.08-1.12x; on 14x14, 7x7 and AlexNet's planes the blocked loop was 0.91-1.02x, so they keep this
one. The micro-kernel itself runs 5.3-5.5 G 16-wide FMAs a second on one thread (Emerald Rapids,
input in L1); a whole layer 70-77% of that on one thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np

from sparsecnn.kernels._numba import balanced_bounds, jit, pjit, serial_twin
from sparsecnn.kernels._simd import GEMM_MR, GEMM_NV, VW, gemm_tile, tile_split
from sparsecnn.kernels.conv import (
    _L1_BYTES,
    _L2_BYTES,
    ConvPrepBase,
    _crop,
    image_input,
    phase_copy,
    phase_copy_serial,
    phase_layout,
    split_by_image,
)

__all__ = ["ImplicitGemmPrep", "bind_implicit_gemm_conv2d", "implicit_gemm_conv2d", "prepare_implicit_gemm"]

# Below this many multiply-adds per call a bound layer runs the serial twin (no parallel launch).
_SERIAL_MACS = 1 << 16
# Off: every layer walks all its columns per register tile (the A/B baseline of the channel blocks).
BLOCKS = True
# Register tiles per plane from which a stride-1 layer runs in channel blocks (see _build_workspace).
_BLOCK_MIN_TILES = 16


@dataclass(eq=False)
class _Workspace:
    offsets: np.ndarray  # (groups, Kr) span offset of each kept column in one image's phase planes
    xt: np.ndarray  # (B, ...) each image's phase planes; (nparts, ...) with by_image: each thread's copy
    geo: np.ndarray  # PhaseLayout.geometry of the input shape
    wide: np.ndarray  # (nparts, GEMM_MR * gstride) wide output rows of the thread's current tile
    gstride: int
    bounds: np.ndarray  # (nparts + 1,) ranges of (group, tile) items
    by_image: bool  # threads split the batch's images (conv.split_by_image), each running every item
    copies: np.ndarray
    phases: np.ndarray
    hph: int
    wph: int
    hout: int
    wout: int
    span: int
    zero_bias: np.ndarray  # (Cout,) zeros, the bias of a layer without one
    kernel: Callable  # _implicit_kernel or _blocked_kernel, or a serial twin below _SERIAL_MACS
    kblk: np.ndarray  # (groups, nblk + 1) int64: channel block kb of group g is columns kblk[g, kb:kb + 2]
    group: int  # wide-row positions per pass of the blocked kernel (whole rows; span without blocks)


@dataclass(eq=False)
class ImplicitGemmPrep(ConvPrepBase):
    """Kept filters x kept lowered columns, in 4-filter tiles, ready for :func:`implicit_gemm_conv2d`.

    Attributes
    ----------
    data : ndarray, shape (groups, ntiles, Kr, GEMM_MR), float32
        ``data[g, t, k, f]``: weight of kept filter ``t * GEMM_MR + f`` of group ``g`` on its kept
        column ``k`` (zero for padding rows and columns).
    rows : ndarray, shape (groups, ntiles * GEMM_MR), int64
        Output channel of each tile row, -1 for padding.
    cols : ndarray, shape (groups, Kr), int64
        Lowered column ``(c * kh + i) * kw + j`` inside the group of each kept column (0 for padding).
    ncols : ndarray, shape (groups,), int64
        Kept columns of each group (the first ``ncols[g]`` of ``cols[g]``).
    fill : ndarray, shape (n,), int64
        Output channels no kept filter writes (their output is the bias).
    """

    data: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    ncols: np.ndarray
    fill: np.ndarray

    def _build_workspace(self, x_shape: tuple[int, int, int, int], nparts: int) -> _Workspace:
        b, cin = x_shape[:2]
        _, cin_g, kh, kw = self.weight_shape
        lay = phase_layout(x_shape, (kh, kw), self.stride, self.padding, self.dilation)
        ci, rs = np.divmod(self.cols, kh * kw)
        r, s = np.divmod(rs, kw)
        c = np.arange(self.groups)[:, None] * cin_g + ci
        off = lay.offsets(c, r, s)
        off[np.arange(self.cols.shape[1])[None, :] >= self.ncols[:, None]] = 0
        per_image = cin * lay.nph * lay.plane
        off_dtype = np.int32 if per_image <= np.iinfo(np.int32).max else np.int64
        ntiles = self.data.shape[1]
        cost = np.repeat(self.ncols + 1, ntiles)  # an item's cost: its columns (+1: the crop)
        bounds = balanced_bounds(cost, nparts)
        nvec = -(-lay.span // VW)
        macs = int(self.ncols.sum()) * ntiles * GEMM_MR * lay.span * b
        # A serial layer copies its input inside the kernel, as the threads do when they split the
        # images: one numba call instead of two (each ~2 us of dispatch on LeNet-5's layers).
        by_image = split_by_image(b, nparts) or macs < _SERIAL_MACS
        # Channel blocks whose part of one register tile's input window fits L1 (as the direct
        # kernel's): where the whole window does not, each block's window is read from L1 by every
        # 4-filter item of the thread, in row groups whose input fits half of L2.
        # Measured (dense ResNet-50 shapes, 2 threads, interleaved against the unblocked loop): stride
        # 2 from 56x56 1.75x (four phase planes per channel: the window is 8x L1), 3x3 on 56x56 1.08x
        # (33 register tiles per plane); but 3x3 on 14x14 0.91x, 7x7 and AlexNet's 13x13 / 27x27 layers
        # 0.98-1.01x (few tiles: the unblocked loop keeps an item's weights in L1 across them). So
        # blocks where the input has phases or a plane has many tiles.
        cb = max(1, _L1_BYTES // (4 * lay.nph * (GEMM_NV * VW + lay.halo + VW)))
        many_tiles = -(-nvec // GEMM_NV) >= _BLOCK_MIN_TILES
        nblk = -(-cin_g // cb) if BLOCKS and (lay.nph > 1 or many_tiles) else 1
        cb = -(-cin_g // nblk)
        kchan = self.cols // (kh * kw)
        kblk = np.zeros((self.groups, nblk + 1), dtype=np.int64)
        for gi in range(self.groups):
            kblk[gi] = np.searchsorted(kchan[gi, : self.ncols[gi]], np.arange(nblk + 1) * cb)
        if nblk > 1:
            rows = max((_L2_BYTES // (4 * cin * lay.nph) - lay.halo) // lay.wph,
                       -(-GEMM_NV * VW // lay.wph), 1)
            group = min(rows, lay.hout) * lay.wph
            gstride = group + 2 * VW
            items = ntiles * self.groups if by_image else int(np.diff(bounds).max(initial=0))
            wide = np.zeros((nparts, GEMM_MR * max(items, 1) * gstride), dtype=np.float32)
            kernel = _blocked_kernel_serial if macs < _SERIAL_MACS else _blocked_kernel
        else:
            group = lay.span
            gstride = nvec * VW + 2 * VW
            wide = np.zeros((nparts, GEMM_MR * gstride), dtype=np.float32)
            kernel = _implicit_kernel_serial if macs < _SERIAL_MACS else _implicit_kernel
        return _Workspace(
            offsets=np.ascontiguousarray(off, dtype=off_dtype),
            xt=np.zeros(lay.xt_shape(nparts if by_image else b, cin, self.padding[1]), dtype=np.float32),
            geo=lay.geometry(x_shape),
            wide=wide,
            gstride=gstride,
            bounds=bounds,
            by_image=by_image,
            copies=lay.copies,
            phases=lay.phases,
            hph=lay.hph,
            wph=lay.wph,
            hout=lay.hout,
            wout=lay.wout,
            span=lay.span,
            zero_bias=np.zeros(self.weight_shape[0], np.float32),
            kernel=kernel,
            kblk=kblk,
            group=group,
        )


def prepare_implicit_gemm(data: np.ndarray, row_map: np.ndarray, col_index: np.ndarray,
                          weight_shape: tuple[int, int, int, int], groups: int, stride: tuple[int, int],
                          padding: tuple[int, int], dilation: tuple[int, int]) -> ImplicitGemmPrep:
    """Tile a compact lowered weight (the ``lowered`` strategy's :class:`~sparsecnn.layers.LoweredWeight`
    arrays) for :func:`implicit_gemm_conv2d`.

    Parameters
    ----------
    data : ndarray, shape (groups, Mr, Kr), float32
        Kept filters x kept columns of every group, zero-padded.
    row_map : ndarray, shape (groups, Mr), int
        Output channel of each kept row, -1 for padding.
    col_index : ndarray, shape (groups, Kr), int
        Lowered column of each kept column inside its group, -1 for padding.
    weight_shape : tuple of int
        ``(Cout, Cin // groups, kh, kw)`` of the dense layer.
    groups : int
    stride, padding, dilation : tuple of int, (h, w)

    Returns
    -------
    ImplicitGemmPrep
    """
    g, mr, kr = data.shape
    cout = weight_shape[0]
    row_map = np.asarray(row_map, dtype=np.int64)
    col_index = np.asarray(col_index, dtype=np.int64)
    ntiles = -(-mr // GEMM_MR)
    rows = np.full((g, ntiles * GEMM_MR), -1, dtype=np.int64)
    cols = np.zeros((g, kr), dtype=np.int64)
    ncols = np.zeros(g, dtype=np.int64)
    tiled = np.zeros((g, ntiles * GEMM_MR, kr), dtype=np.float32)
    for i in range(g):
        keep_r = np.flatnonzero(row_map[i] >= 0)
        keep_c = np.flatnonzero(col_index[i] >= 0)
        rows[i, : keep_r.size] = row_map[i, keep_r]
        cols[i, : keep_c.size] = col_index[i, keep_c]
        ncols[i] = keep_c.size
        tiled[i, : keep_r.size, : keep_c.size] = data[i][np.ix_(keep_r, keep_c)]
    # (g, ntiles, MR, Kr) -> (g, ntiles, Kr, MR): a column's four weights side by side
    packed = np.ascontiguousarray(tiled.reshape(g, ntiles, GEMM_MR, kr).transpose(0, 1, 3, 2))
    written = np.zeros(cout, dtype=bool)
    written[rows[rows >= 0]] = True
    return ImplicitGemmPrep(
        weight_shape=tuple(int(v) for v in weight_shape),
        groups=int(groups),
        stride=(int(stride[0]), int(stride[1])),
        padding=(int(padding[0]), int(padding[1])),
        dilation=(int(dilation[0]), int(dilation[1])),
        data=packed,
        rows=rows,
        cols=cols,
        ncols=ncols,
        fill=np.flatnonzero(~written).astype(np.int64),
    )


def implicit_gemm_conv2d(prep: ImplicitGemmPrep, x: np.ndarray, bias: np.ndarray | None, out: np.ndarray,
                         relu: bool = False) -> None:
    """``out = conv2d(x, W) + bias`` (``relu(...)`` with ``relu``) by implicit GEMM over the kept columns.

    Parameters
    ----------
    prep : ImplicitGemmPrep
    x : ndarray, shape (B, Cin, H, W), float32
    bias : ndarray, shape (Cout,), float32, or None
    out : ndarray, shape (B, Cout, Hout, Wout), float32, C-contiguous
        Written in full.
    relu : bool
    """
    _check_out(prep, x.shape, out)
    ws = prep.workspace(x.shape)
    _launch(prep, ws, x, ws.zero_bias if bias is None else bias, out.reshape(x.shape[0], -1), bool(relu))


def bind_implicit_gemm_conv2d(prep: ImplicitGemmPrep, x_shape: tuple[int, int, int, int],
                              bias: np.ndarray | None, out: np.ndarray,
                              relu: bool = False) -> Callable[[np.ndarray], None]:
    """``run(x)``: :func:`implicit_gemm_conv2d` for inputs of ``x_shape`` with every other argument bound
    once (the whole-model executor's steps). Uses the calling thread's workspace of ``prep``, so it must
    be called from the thread that bound it.

    Parameters
    ----------
    prep : ImplicitGemmPrep
    x_shape : tuple of int, (B, Cin, H, W)
    bias : ndarray, shape (Cout,), float32, or None
    out : ndarray, shape (B, Cout, Hout, Wout), float32, C-contiguous
    relu : bool

    Returns
    -------
    callable
        ``run(x)`` with ``x`` of shape ``x_shape``, float32.
    """
    x_shape = tuple(int(v) for v in x_shape)
    _check_out(prep, x_shape, out)
    ws = prep.workspace(x_shape)
    b = ws.zero_bias if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    flat = out.reshape(x_shape[0], -1)
    relu = bool(relu)

    def run(x: np.ndarray) -> None:
        _launch(prep, ws, x, b, flat, relu)

    return run


def _check_out(prep: ImplicitGemmPrep, x_shape: tuple[int, ...], out: np.ndarray) -> None:
    want = prep.output_shape(tuple(x_shape))
    if not out.flags.c_contiguous or out.shape != want:
        raise ValueError(f"implicit_gemm_conv2d: out must be C-contiguous of shape {want}")


def _launch(prep: ImplicitGemmPrep, ws: _Workspace, x: np.ndarray, bias: np.ndarray, flat: np.ndarray,
            relu: bool) -> None:
    """The kernel (serial twin below a work threshold). Where the threads split the items, one
    parallel phase copy of the batch comes first; where they split the images, each thread
    phase-copies its own inside the kernel."""
    xc = x if x.flags.c_contiguous else np.ascontiguousarray(x)
    xc = xc.reshape(xc.shape[0], -1)
    if not ws.by_image:
        serial = ws.kernel is _implicit_kernel_serial or ws.kernel is _blocked_kernel_serial
        copy = phase_copy_serial if serial else phase_copy
        copy(xc, ws.xt, ws.copies, ws.geo)
        xc = ws.xt
    if ws.kernel is _blocked_kernel or ws.kernel is _blocked_kernel_serial:
        ws.kernel(xc, ws.xt, ws.copies, ws.geo, ws.by_image, ws.offsets, prep.data, ws.kblk,
                  prep.rows, prep.fill, bias, flat, ws.hout, ws.wout,
                  ws.wide, ws.gstride, ws.bounds, ws.wph, ws.span, ws.group, relu, ws.by_image)
        return
    ws.kernel(xc, ws.xt, ws.copies, ws.geo, ws.by_image, ws.offsets, prep.data, prep.ncols,
              prep.rows, prep.fill, bias, flat, ws.hout, ws.wout,
              ws.wide, ws.gstride, ws.bounds, ws.wph, ws.span, relu, ws.by_image)


@jit
def _fill_bias(dst, fill, bias, plane, relu):
    for q in range(fill.size):
        v = bias[fill[q]]
        if relu and v <= 0:  # NaN kept, as torch.relu
            v = np.float32(0.0)
        base = fill[q] * plane
        for j in range(plane):
            dst[base + j] = v


@jit(inline="always")
def _tile_bias(bias, rr):
    """The bias of each of a tile's ``GEMM_MR`` (4) output channels ``rr`` (0 for a padding row, -1)."""
    zero = np.float32(0.0)
    return (bias[rr[0]] if rr[0] >= 0 else zero, bias[rr[1]] if rr[1] >= 0 else zero,
            bias[rr[2]] if rr[2] >= 0 else zero, bias[rr[3]] if rr[3] >= 0 else zero)


@pjit
def _implicit_kernel(x, xt, copies, geo, copy, offs, data, ncols, rows, fill, bias, out, hout, wout, wide,
                     gstride, bounds, wph, span, relu, by_image):
    """Implicit GEMM, parallel over balanced ranges of (group, 4-filter tile) items: image after image,
    item after item walks its register tiles over all kept columns (the item's weights stay in L1)
    and crops. With ``by_image`` the threads split the images instead, each running every item on its
    own images. With ``copy`` each thread phase-copies its image into its own planes
    (:func:`sparsecnn.kernels.conv.image_input`); without, ``x`` holds the phase planes (the shared
    copy).
    NOTE: offs/xt/copies/geo come from the same workspace (xt rows padded past the last span); out is
    (B, Cout * hout * wout) C-contiguous; data is (groups, ntiles, Kr, 4)."""
    nb = out.shape[0]
    plane = hout * wout
    nparts = bounds.size - 1
    ntiles = data.shape[1]
    nvec = (span + VW - 1) // VW
    nst = (nvec + GEMM_NV - 1) // GEMM_NV
    for part in numba.prange(nparts):
        w = wide[part]
        first = bounds[0] if by_image else bounds[part]
        last = bounds[nparts] if by_image else bounds[part + 1]
        for b in range(part if by_image else 0, nb, nparts if by_image else 1):
            xb = image_input(x, b, xt, part, copies, geo, copy)
            dst = out[b]
            for item in range(first, last):
                g = item // ntiles
                t = item - g * ntiles
                wt = data[g, t].reshape(-1)
                rr = rows[g, t * GEMM_MR:(t + 1) * GEMM_MR]
                i0, i1, i2, i3 = _tile_bias(bias, rr)
                for st in range(nst):
                    v0, nv = tile_split(nvec, st, nst)
                    p = v0 * VW
                    gemm_tile(xb, offs[g], wt, 0, ncols[g], p, w, p, gstride, nv, nv * VW, False, i0, i1, i2,
                              i3)
                for f in range(GEMM_MR):
                    if rr[f] >= 0:
                        _crop(w[f * gstride:], span, dst, rr[f] * plane, 0, wph, wout, hout, relu, dst, False)
            if part == 0 or by_image:
                _fill_bias(dst, fill, bias, plane, relu)


_implicit_kernel_serial = serial_twin(_implicit_kernel)


@pjit
def _blocked_kernel(x, xt, copies, geo, copy, offs, data, kblk, rows, fill, bias, out, hout, wout, wide,
                    gstride, bounds, wph, span, group, relu, by_image):
    """:func:`_implicit_kernel` in channel blocks, for layers whose register tile's input window of all
    channels does not fit L1 (the direct kernel's loop, :func:`sparsecnn.kernels.conv._grouped_kernel`):
    per image and group of ``group`` wide-row positions, block after block, register tile after tile,
    every 4-filter item of the thread adds the block's columns into its tile of ``wide`` (from the
    bias at the first block), so the block's window is read from L1 by all the items; then the valid
    columns of every item's filters go to ``out``.
    NOTE: as _implicit_kernel; kblk (groups, nblk + 1) column bounds of the channel blocks; wide holds
    GEMM_MR * gstride floats per item of the largest range; group is a multiple of wph."""
    nb = out.shape[0]
    plane = hout * wout
    nparts = bounds.size - 1
    ntiles = data.shape[1]
    nblk = kblk.shape[1] - 1
    for part in numba.prange(nparts):
        w = wide[part]
        first = bounds[0] if by_image else bounds[part]
        last = bounds[nparts] if by_image else bounds[part + 1]
        for b in range(part if by_image else 0, nb, nparts if by_image else 1):
            xb = image_input(x, b, xt, part, copies, geo, copy)
            dst = out[b]
            for p0 in range(0, span, group):
                n = min(group, span - p0)
                nvec = (n + VW - 1) // VW
                nst = (nvec + GEMM_NV - 1) // GEMM_NV
                for kb in range(nblk):
                    for st in range(nst):
                        v0, nv = tile_split(nvec, st, nst)
                        for item in range(first, last):
                            g = item // ntiles
                            k0, k1 = kblk[g, kb], kblk[g, kb + 1]
                            if kb > 0 and k1 == k0:
                                continue
                            t = item - g * ntiles
                            i0, i1, i2, i3 = _tile_bias(bias, rows[g, t * GEMM_MR:(t + 1) * GEMM_MR])
                            gemm_tile(xb, offs[g], data[g, t].reshape(-1), k0, k1, p0 + v0 * VW, w,
                                      (item - first) * GEMM_MR * gstride + v0 * VW, gstride, nv, nv * VW,
                                      kb > 0, i0, i1, i2, i3)
                r0 = p0 // wph
                for item in range(first, last):
                    g = item // ntiles
                    t = item - g * ntiles
                    for f in range(GEMM_MR):
                        co = rows[g, t * GEMM_MR + f]
                        if co >= 0:
                            _crop(w[((item - first) * GEMM_MR + f) * gstride:], n, dst, co * plane, r0, wph,
                                  wout, hout, relu, dst, False)
            if part == 0 or by_image:
                _fill_bias(dst, fill, bias, plane, relu)


_blocked_kernel_serial = serial_twin(_blocked_kernel)
