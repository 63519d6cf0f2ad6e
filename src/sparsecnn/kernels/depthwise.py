"""Depthwise convolution (one filter per input channel, ``groups == Cin == Cout``: MobileNet's 3x3
layers) for the ``direct`` strategy: each channel phase-copied into a small buffer of the thread's
and convolved from there at once.

The direct kernel (:mod:`sparsecnn.kernels.conv`) phase-copies the whole input before it starts, all
threads together, and then reads it back: right for a layer whose every filter reads every channel,
but a depthwise filter reads one channel and at most ``kh * kw`` taps of it. On such layers the copy,
the read back and the crop move 2-3x the bytes of one pass, and the whole copy leaves the cache
before it is read (a MobileNet-v2-shaped model's 96-channel 112 x 112 stride-2 layer at batch 1, two
threads: 0.39 ms as a step of the forward pass, 0.20 ms called in a loop). Here a thread takes a
range of (image, channel) planes; for each it copies the plane into its own phase planes (the padding
stays zero: every plane of the layer writes the same pixel region), runs the filter's nonzero taps
over the wide rows in register tiles (:func:`sparsecnn.kernels._simd.span_tile`, as the direct
kernel's per-filter tiles) into a wide buffer of its own, and crops the valid columns into ``out``
with the bias, the residual and the ReLU (:func:`sparsecnn.kernels.conv._crop`), or a clamp (a fused
ReLU6, which can also be applied to the copy: the ReLU6 before the layer). The copied plane and the
wide rows stay in L1 or L2 from the copy to the crop.

3x3 layers of stride 1 or 2 (MobileNet's) skip the wide rows: after the same copy, row tiles
(:func:`sparsecnn.kernels._simd.dw_tile_3x3_s1` / ``_s2``, ``DW_ROWS`` output rows x up to ``DW_NV``
vectors) load each input vector once for every output row of the tile that reads it (stride 1: a
third of a load per multiply-add on the tile's middle rows, against one in the span tiles) and write
``out`` directly with the bias, the residual and the ReLU or clamp (the row's last columns in masked
stores). In L1 (one thread, a scratch loop) the 4 x 3 tile ran 5.7-6.1 G vector multiply-adds a
second against the span tile's 4.6-4.7 G. ``ROW_TILES`` off is the A/B baseline.

At stride 2 there is no copy at all (``S2_PLAIN``): the tiles read each plane where it lies
(:func:`sparsecnn.kernels._simd.dw_tile_3x3_s2_plain`), masked loads standing for the padding and
the even and odd columns split in registers, and the input clamp applied to what they load. The
phase copy was most of such a layer's time: one thread, MobileNet-v2's 96 x 112 x 112 layer 309 ->
264 us, its 576 x 14 x 14 layer 227 -> 43 us (scratch script, the layer alone). At stride 1 the same
(``dw_tile_3x3_s1_plain``, ``S1_PLAIN``) pays only on planes no wider than a vector (see there).

In the channel-blocked layout (:mod:`sparsecnn.kernels.blocked`, ``VW`` channels a pixel) a depthwise
layer needs no shuffles and no copy: :func:`bind_depthwise_blocked` runs, per output row, the
columns whose taps all lie inside the row in tiles of ``DWB_NT`` pixels (each tap's weight vector
loaded once a tile; with three taps a row, :func:`sparsecnn.kernels._simd.dwb_tile3` loads each input
vector once for the three pixels that read it at stride 1, ``dwb_tile3s2`` once for the two at
stride 2: 1.07-1.18x on MobileNet-v2's stride-2 layers alone, ``ROW3_S2``) and the border columns one
by one with their own taps. It is what lets the executor's blocked chains (:mod:`sparsecnn.engine._layout`)
run through MobileNet's depthwise layers, so that its dense 1x1 layers run the channel-vector GEMM.
The tap lists (per output row, per border pixel) are built once per input shape: built per row and
channel block they made it 0.56-0.90x the plain kernel at stride 1; now it runs 1.35-2.07x the plain
kernel alone on MobileNet-v2's shapes (2 threads). The executor times the whole model both ways and
keeps the faster layout. The threads split a blocked layer's output rows (``BY_ROWS``: the rows of
every channel block to one thread) as the channel-vector GEMM around it splits its positions, so each
reads the rows the expanding 1x1 layer wrote on its own core and writes those the projecting one
reads there; split by channel blocks, half of each came from the other core. Alone it makes no
difference (0.97-1.00x); dense MobileNet-v2 whole, interleaved in one process: 1.05-1.11x where
the two vCPUs sat far apart, 1.00-1.01x near (scratch A/B, docs/engine.md, twentieth session).
Between two blocked 1x1 layers (MobileNet-v2's inverted residual block) the executor runs the
depthwise rows (:func:`dwb_row`) inside :mod:`sparsecnn.kernels.expand_depthwise` instead, with the
1x1 layers in the same pass.

Measured (Zen 4, 2 threads, batch 1; ``python -m benchmarks.mobilenet``): docs/engine.md, "Session
of 2026-12-07 (eighteenth)".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np

from sparsecnn.kernels._numba import jit, num_threads, pjit, serial_twin, thread_rows
from sparsecnn.kernels._simd import (
    DW_NV,
    DW_ROWS,
    DWB_NT,
    NV_MAX,
    VW,
    clamp_vec,
    dw_tile_3x3_s1,
    dw_tile_3x3_s1_plain,
    dw_tile_3x3_s2,
    dw_tile_3x3_s2_plain,
    dwb_tile,
    dwb_tile3,
    dwb_tile3s2,
    span_tile,
    tile_split,
)
from sparsecnn.kernels.conv import (
    DirectConvPrep,
    _copy_channels,
    _crop,
    image_counter,
    next_image,
    padded_plane,
    phase_layout,
    split_by_image,
)

__all__ = ["bind_depthwise_blocked", "bind_depthwise_conv2d", "is_depthwise"]

# Below this many multiply-adds per call the serial twin runs (no parallel launch), as in conv.py.
_SERIAL_MACS = 1 << 16
# Off: 3x3 layers (stride 1 or 2) run the nonzero taps' span tiles and the crop too (the A/B baseline of
# the row tiles, _depthwise3_kernel).
ROW_TILES = True
# Off: 3x3 stride-2 layers phase-copy each plane before the row tiles (the A/B baseline of
# _depthwise3s2_kernel, which reads the plane itself).
S2_PLAIN = True
# Off: 3x3 stride-1 layers on planes no wider than a vector copy each plane (with its padding) before
# the row tiles too (the A/B baseline of the stride-1 plain tiles there). On wider planes the copy
# stays: its three loads per input row and vector are unmasked, and the plain tiles' masked ones ran
# 0.61-0.89x (MobileNet-v2's 32 x 112 x 112 to 384 x 14 x 14 layers, 1-2 threads), against 1.65x on
# its 960 x 7 x 7 layers (in the forward pass).
S1_PLAIN = True
# Off: the blocked depthwise kernel's threads split each image's (channel block, row) items, not its
# rows (the A/B baseline of the row split); rows only where each thread gets BY_ROWS_MIN of them.
BY_ROWS = True
BY_ROWS_MIN = 8
# Off: 3x3 stride-2 blocked depthwise layers run the general pixel tiles (dwb_tile: a load per tap),
# not the row tiles (dwb_tile3s2: the column two pixels share loaded once; the A/B baseline).
ROW3_S2 = True


def is_depthwise(prep: DirectConvPrep) -> bool:
    """Whether ``prep`` is a depthwise convolution: one filter per group, each reading one channel."""
    cout, cin_g, _, _ = prep.weight_shape
    return cin_g == 1 and prep.groups == cout and cout > 1


def clamp_bounds(what: str, relu: bool, clamp: tuple[float, float] | None,
                 in_clamp: tuple[float, float] | None) -> tuple[np.float32, ...]:
    """``(lo, hi, ilo, ihi)`` as float32 for a depthwise binder's output ``clamp`` and input
    ``in_clamp`` (zeros where none), checked: the output clamp an interval and not with ``relu``, the
    input clamp holding 0 (the value of the padding it is applied to)."""
    if clamp is not None and (relu or not clamp[0] <= clamp[1]):
        raise ValueError(f"{what}: clamp {clamp} must be an interval, and not with relu")
    if in_clamp is not None and not in_clamp[0] <= 0.0 <= in_clamp[1]:
        raise ValueError(f"{what}: in_clamp {in_clamp} must hold 0 (the padding)")
    lo, hi = (np.float32(v) for v in clamp) if clamp is not None else (np.float32(0.0),) * 2
    ilo, ihi = (np.float32(v) for v in in_clamp) if in_clamp is not None else (np.float32(0.0),) * 2
    return lo, hi, ilo, ihi


@dataclass(eq=False)
class _DepthwiseWorkspace:
    """One calling thread's buffers for inputs of one shape: per numba thread a channel's phase planes
    (zero padding, slack for the tiles' last vectors) and the wide output rows."""

    planes: np.ndarray  # (nparts, nph * plane + slack)
    wide: np.ndarray  # (nparts, whole vectors of span + 2 * VW)
    copies: np.ndarray
    geo: np.ndarray
    offsets: np.ndarray  # (nnz,) int64: each tap's span offset inside one channel's phase planes
    ptr: np.ndarray  # (C + 1,) int64: the taps of channel c are ptr[c]:ptr[c + 1]
    span: int
    plane: int  # floats between two phase planes
    nfloats: int  # nph * plane: one channel's phase planes
    wph: int
    hout: int
    wout: int


def _workspace(prep: DirectConvPrep, x_shape: tuple[int, int, int, int],
               in_stride: int) -> _DepthwiseWorkspace:
    nparts = num_threads()

    def build() -> _DepthwiseWorkspace:
        _, _, kh, kw = prep.weight_shape
        lay = phase_layout(x_shape, (kh, kw), prep.stride, prep.padding, prep.dilation)
        idx = prep.indices.astype(np.int64)  # (ci * kh + r) * kw + s with ci = 0
        r, s = np.divmod(idx, kw)
        offsets = lay.offsets(np.zeros_like(r), r, s)
        nvec = -(-lay.span // VW)
        return _DepthwiseWorkspace(
            planes=thread_rows(nparts, lay.nph * lay.plane + 2 * VW + prep.padding[1]),
            wide=thread_rows(nparts, (nvec + 2) * VW),
            copies=lay.copies,
            geo=lay.geometry((1, *x_shape[1:]), in_stride),
            offsets=np.ascontiguousarray(offsets, dtype=np.int64),
            ptr=prep.indptr.astype(np.int64),
            span=lay.span, plane=lay.plane, nfloats=lay.nph * lay.plane, wph=lay.wph, hout=lay.hout,
            wout=lay.wout)

    return prep.cached(("depthwise", *x_shape, nparts, in_stride), build)


@jit
def _crop_clamp(w, dst, pos, wph, wout, hout, lo, hi, res, has_res):
    """:func:`sparsecnn.kernels.conv._crop` of a whole plane with a clamp to ``[lo, hi]`` in place of
    the ReLU (:func:`sparsecnn.kernels._simd.clamp_vec`, NaN kept): a fused ReLU6. Rows go as whole
    vectors, the last one running into the next row, which is written after it; the rows whose
    overrun would leave the plane end lane by lane."""
    nfull = wout // VW
    nv = (wout + VW - 1) // VW
    over = nv * VW - wout
    for i in range(hout):
        s = i * wph
        d = pos + i * wout
        exact = (hout - 1 - i) * wout < over
        for v in range(nfull if exact else nv):
            clamp_vec(w, s + v * VW, res, d + v * VW, has_res, dst, d + v * VW, lo, hi)
        if exact:
            for t in range(nfull * VW, wout):
                a = w[s + t] + res[d + t] if has_res else w[s + t]
                if a < lo:
                    a = lo
                elif a > hi:
                    a = hi
                dst[d + t] = a


@pjit
def _depthwise_kernel(x, cstride, planes, wide, copies, geo, offs, data, ptr, bias, has_bias, out, ostride,
                      hout, wout, wph, span, relu, clamp, lo, hi, in_clamp, ilo, ihi, nfloats, res, has_res):
    """Planes ``(b, c)`` in contiguous ranges per thread: copy, tiles, crop (see the module docstring).
    NOTE: x (B, C * cstride), out and res (B, C * ostride) C-contiguous; offs/copies/geo from the
    workspace of this shape; planes and wide rows per part as the workspace sizes them."""
    nb = x.shape[0]
    c = ptr.size - 1
    nparts = planes.shape[0]
    items = nb * c
    nvec = (span + VW - 1) // VW
    ntiles = (nvec + NV_MAX - 1) // NV_MAX
    for part in numba.prange(nparts):
        p = planes[part]
        w = wide[part]
        for item in range(part * items // nparts, (part + 1) * items // nparts):
            b = item // c
            ch = item - b * c
            _copy_channels(x[b, ch * cstride : (ch + 1) * cstride], p, copies, geo, 0, 1)
            if in_clamp:  # the clamp (ReLU6) before the layer, on the copy in L1 (padding stays 0)
                for v in range(0, nfloats, VW):
                    clamp_vec(p, v, p, v, False, p, v, ilo, ihi)
            init = bias[ch] if has_bias else np.float32(0.0)
            for t in range(ntiles):
                v0, nv = tile_split(nvec, t, ntiles)
                span_tile(p, offs, data, ptr[ch], ptr[ch + 1], v0 * VW, w, v0 * VW, nv, nv * VW, init,
                          False, 1, False)
            if clamp:
                _crop_clamp(w, out[b], ch * ostride, wph, wout, hout, lo, hi, res[b], has_res)
            else:
                _crop(w, span, out[b], ch * ostride, 0, wph, wout, hout, relu, res[b], has_res)


_depthwise_kernel_serial = serial_twin(_depthwise_kernel)


@pjit
def _depthwise3_kernel(x, cstride, planes, copies, geo, wts, bias, has_bias, out, ostride, hout, wout, wph,
                       plane, s2, relu, clamp, lo, hi, in_clamp, ilo, ihi, nfloats, res, has_res):
    """A 3x3 layer of stride 1 or 2 (``s2``): per plane the copy of :func:`_depthwise_kernel`, then
    row tiles (:func:`sparsecnn.kernels._simd.dw_tile_3x3_s1` / ``_s2``: ``DW_ROWS`` output rows x up
    to ``DW_NV`` vectors, each input vector loaded once for the rows it feeds) that write ``out``
    with the bias, the residual and the ReLU or clamp: no wide rows, no crop. ``wts`` (C, 9) holds
    every tap, zeros included."""
    nb = x.shape[0]
    c = wts.shape[0]
    nparts = planes.shape[0]
    items = nb * c
    seg = DW_NV * VW
    for part in numba.prange(nparts):
        p = planes[part]
        for item in range(part * items // nparts, (part + 1) * items // nparts):
            b = item // c
            ch = item - b * c
            _copy_channels(x[b, ch * cstride : (ch + 1) * cstride], p, copies, geo, 0, 1)
            if in_clamp:
                for v in range(0, nfloats, VW):
                    clamp_vec(p, v, p, v, False, p, v, ilo, ihi)
            init = bias[ch] if has_bias else np.float32(0.0)
            ob = out[b]
            rb = res[b]
            for i0 in range(0, hout, DW_ROWS):
                nr = min(DW_ROWS, hout - i0)
                for j0 in range(0, wout, seg):
                    nvalid = min(seg, wout - j0)
                    dpos = ch * ostride + i0 * wout + j0
                    if s2:
                        dw_tile_3x3_s2(p, i0 * wph + j0, wph, plane, wts, ch * 9, init, ob, dpos, wout, rb,
                                       has_res, nr, nvalid, relu, clamp, lo, hi)
                    else:
                        dw_tile_3x3_s1(p, i0 * wph + j0, wph, plane, wts, ch * 9, init, ob, dpos, wout, rb,
                                       has_res, nr, nvalid, relu, clamp, lo, hi)


_depthwise3_kernel_serial = serial_twin(_depthwise3_kernel)


@pjit
def _depthwise3_plain_kernel(x, cstride, h, w, wts, bias, has_bias, out, ostride, hout, wout, ph, pw, s2,
                             relu, clamp, lo, hi, in_clamp, ilo, ihi, nparts, res, has_res):
    """A 3x3 layer of stride 1 or 2 (``s2``) with no copy: row tiles that read each plane where it
    lies (:func:`sparsecnn.kernels._simd.dw_tile_3x3_s1_plain` / ``_s2_plain``: masked loads for the
    padding; at stride 2 the even and odd columns split in registers), the input clamp applied as
    they load."""
    nb = x.shape[0]
    c = wts.shape[0]
    items = nb * c
    seg = DW_NV * VW
    for part in numba.prange(nparts):
        for item in range(part * items // nparts, (part + 1) * items // nparts):
            b = item // c
            ch = item - b * c
            init = bias[ch] if has_bias else np.float32(0.0)
            xb = x[b]
            ob = out[b]
            rb = res[b]
            for i0 in range(0, hout, DW_ROWS):
                nr = min(DW_ROWS, hout - i0)
                for j0 in range(0, wout, seg):
                    dpos = ch * ostride + i0 * wout + j0
                    nvalid = min(seg, wout - j0)
                    if s2:
                        dw_tile_3x3_s2_plain(xb, ch * cstride, h, w, 2 * i0 - ph, 2 * j0 - pw, wts, ch * 9,
                                             init, ob, dpos, wout, rb, has_res, nr, nvalid, relu, clamp, lo,
                                             hi, in_clamp, ilo, ihi)
                    else:
                        dw_tile_3x3_s1_plain(xb, ch * cstride, h, w, i0 - ph, j0 - pw, wts, ch * 9, init, ob,
                                             dpos, wout, rb, has_res, nr, nvalid, relu, clamp, lo, hi,
                                             in_clamp, ilo, ihi)


_depthwise3_plain_kernel_serial = serial_twin(_depthwise3_plain_kernel)


def _row_tiles(prep: DirectConvPrep) -> bool:
    """Whether ``prep`` runs :func:`_depthwise3_kernel`: 3x3, stride 1 or 2 both ways, dilation 1."""
    _, _, kh, kw = prep.weight_shape
    return ROW_TILES and (kh, kw) == (3, 3) and prep.dilation == (1, 1) and prep.stride in ((1, 1), (2, 2))


def _dense_taps(prep: DirectConvPrep) -> np.ndarray:
    """(C, kh * kw) float32: every tap of each channel's filter, zeros included."""
    cout, _, kh, kw = prep.weight_shape
    dense = np.zeros((cout, kh * kw), dtype=np.float32)
    rows = np.repeat(np.arange(cout), np.diff(prep.indptr))
    dense[rows, prep.indices.astype(np.int64)] = prep.data
    return dense


def bind_depthwise_conv2d(prep: DirectConvPrep, x_shape: tuple[int, int, int, int], bias: np.ndarray | None,
                          out: np.ndarray, relu: bool = False, in_stride: int = 0, out_stride: int = 0,
                          clamp: tuple[float, float] | None = None,
                          in_clamp: tuple[float, float] | None = None) -> Callable[..., None]:
    """``run(x)`` / ``run(x, res)``: the depthwise ``prep`` as :func:`sparsecnn.kernels.conv.
    bind_direct_conv2d` binds a direct conv (same arguments and strides; ``x`` read in place, never
    past its planes). Uses the calling thread's buffers: call it from the thread that bound it.

    Parameters
    ----------
    prep : DirectConvPrep
        A depthwise layer (:func:`is_depthwise`).
    x_shape : tuple of int, (B, C, H, W)
    bias : ndarray, shape (C,), float32, or None
    out : ndarray, shape (B, C, Hout, Wout) (or (B, C, out_stride)), float32, C-contiguous
    relu : bool
    in_stride, out_stride : int
        Channel strides of planes padded to whole vectors (:func:`sparsecnn.kernels.conv.padded_plane`),
        or 0.
    clamp : tuple of float, (lo, hi), optional
        Clamp the output to ``[lo, hi]`` as it is written (after the residual; a fused ``nn.ReLU6``),
        in place of ``relu``.
    in_clamp : tuple of float, (lo, hi), optional
        Clamp the *input* to ``[lo, hi]`` first (``lo <= 0 <= hi``, so the zero padding stays zero), on
        each channel's copy: a ReLU6 between the layer before and this one, whose output nothing else
        reads (``x`` itself is not changed).
    """
    if not is_depthwise(prep):
        raise ValueError("bind_depthwise_conv2d: the layer is not depthwise")
    x_shape = tuple(int(v) for v in x_shape)
    nb, _, h, w = x_shape
    want = prep.output_shape(x_shape)
    if out_stride:
        if out_stride != padded_plane(*want[2:]):
            raise ValueError(f"bind_depthwise_conv2d: out_stride {out_stride} is not the padded plane of "
                             f"{want}")
        want = (*want[:2], out_stride)
    if not out.flags.c_contiguous or out.shape != want:
        raise ValueError(f"bind_depthwise_conv2d: out must be C-contiguous of shape {want}")
    cstride = in_stride or h * w
    if in_stride and in_stride != padded_plane(h, w):
        raise ValueError(f"bind_depthwise_conv2d: in_stride {in_stride} is not the padded plane of {x_shape}")
    ws = _workspace(prep, x_shape, in_stride)
    ostride = out_stride or ws.hout * ws.wout
    flat = out.reshape(nb, -1)
    has_bias = bias is not None
    b = bias if has_bias else prep.data[:0]
    small = prep.nnz * ws.span * nb < _SERIAL_MACS
    kernel = _depthwise_kernel_serial if small else _depthwise_kernel
    lo, hi, ilo, ihi = clamp_bounds("bind_depthwise_conv2d", relu, clamp, in_clamp)
    s2 = prep.stride == (2, 2)
    rows = _row_tiles(prep)
    wts = prep.cached(("depthwise-taps",), lambda: _dense_taps(prep)) if rows else None
    if rows and (S2_PLAIN if s2 else S1_PLAIN and w <= VW):
        kernel = _depthwise3_plain_kernel_serial if small else _depthwise3_plain_kernel
        args = (cstride, h, w, wts, b, has_bias, flat, ostride, ws.hout, ws.wout, *prep.padding, s2,
                bool(relu), clamp is not None, lo, hi, in_clamp is not None, ilo, ihi, ws.planes.shape[0])
    elif rows:
        kernel = _depthwise3_kernel_serial if small else _depthwise3_kernel
        args = (cstride, ws.planes, ws.copies, ws.geo, wts, b, has_bias, flat, ostride, ws.hout, ws.wout,
                ws.wph, ws.plane, s2, bool(relu), clamp is not None, lo, hi, in_clamp is not None, ilo, ihi,
                ws.nfloats)
    else:
        args = (cstride, ws.planes, ws.wide, ws.copies, ws.geo, ws.offsets, prep.data, ws.ptr, b, has_bias,
                flat, ostride, ws.hout, ws.wout, ws.wph, ws.span, bool(relu), clamp is not None, lo, hi,
                in_clamp is not None, ilo, ihi, ws.nfloats)

    def run(x: np.ndarray, res: np.ndarray | None = None) -> None:
        xc = x if x.flags.c_contiguous else np.ascontiguousarray(x)
        tail = (flat, False) if res is None else (res.reshape(nb, -1), True)
        kernel(xc.reshape(nb, -1), *args, *tail)

    return run


@pjit
def _depthwise_blocked_kernel(x, out, wts, bias, h, w, hout, wout, sw, jl, jh, row3, rtab, rn, btab, bn,
                              bcols, relu, clamp, lo, hi, in_clamp, ilo, ihi, nparts, by_image, counter,
                              by_rows, res, has_res):
    """A depthwise layer on channel-blocked planes (``x`` (B, C/VW * H * W * VW), ``out`` and ``res``
    (B, C/VW * Hout * Wout * VW)). With ``by_image`` the threads split the images (as
    :func:`sparsecnn.kernels.conv.next_image` hands them out); else,
    per image, with ``by_rows`` the output rows (every channel block of its rows to a thread), else
    contiguous ranges of the (channel block, row) items. Per output row the columns ``[jl, jh)``, whose
    taps all lie inside the row, run in tiles of ``DWB_NT`` pixels
    (:func:`sparsecnn.kernels._simd.dwb_tile`, or with ``row3``, the stride, the row tiles of
    ``dwb_tile3`` / ``dwb_tile3s2``), the border columns ``bcols`` one by one with their own taps. The
    tap tables come from :func:`blocked_taps` (offsets inside a channel block's planes and weight
    indices, per output row and per border pixel): nothing is worked out per item."""
    nb = x.shape[0]
    k = rtab.shape[2]
    ncb = wts.size // (k * VW)
    per = hout * ncb
    if counter.size:
        counter[0] = 0
    for part in numba.prange(nparts):
        first, last = part_range(part, nparts, per, by_image)
        r0, r1 = part_range(part, nparts, hout, by_image)
        b = next_image(counter, -1, part, nparts, by_image)
        while b < nb:
            xb, ob, rb = x[b], out[b], res[b]
            for cb in range(ncb):
                ia = r0 if by_rows else max(0, first - cb * hout)
                ib = r1 if by_rows else min(hout, last - cb * hout)
                base = cb * h * w * VW
                wb = cb * k * VW
                for i in range(ia, ib):
                    dwb_row(xb, base, i, cb, wts, wb, bias, ob, ((cb * hout + i) * wout) * VW, rb, has_res,
                            jl, jh, sw, row3, rtab, rn, btab, bn, bcols, relu, clamp, lo, hi, in_clamp, ilo,
                            ihi)
            b = next_image(counter, b, part, nparts, by_image)


@jit(inline="always")
def part_range(part, nparts, n, by_image):
    """The items ``[first, last)`` of ``n`` that thread ``part`` of ``nparts`` takes in each image: all
    of them where the threads split the images (``by_image``), else its contiguous share."""
    if by_image:
        return 0, n
    return part * n // nparts, (part + 1) * n // nparts


@jit(inline="always")
def dwb_row(xb, base, i, cb, wts, wb, bias, ob, orow, rb, has_res, jl, jh, sw, row3, rtab, rn, btab, bn,
            bcols, relu, clamp, lo, hi, in_clamp, ilo, ihi):
    """Output row ``i`` of channel block ``cb`` of a blocked depthwise layer (see
    :func:`_depthwise_blocked_kernel`): the block's input plane at ``xb[base:]`` (the tap tables'
    offsets from there), its weights at ``wts[wb:]``, the row written at ``ob[orow:]``."""
    for j in range(jl, jh, DWB_NT):
        nt = min(DWB_NT, jh - j)
        if row3 == 1:
            dwb_tile3(xb, base + j * VW, rtab[i, 0], rtab[i, 1], rn[i], wts, wb, bias, cb * VW, ob,
                      orow + j * VW, rb, has_res, nt, relu, clamp, lo, hi, in_clamp, ilo, ihi)
        elif row3 == 2:
            dwb_tile3s2(xb, base + j * 2 * VW, rtab[i, 0], rtab[i, 1], rn[i], wts, wb, bias, cb * VW, ob,
                        orow + j * VW, rb, has_res, nt, relu, clamp, lo, hi, in_clamp, ilo, ihi)
        else:
            dwb_tile(xb, base + j * sw * VW, rtab[i, 0], rtab[i, 1], rn[i], sw * VW, wts, wb, bias, cb * VW,
                     ob, orow + j * VW, rb, has_res, nt, relu, clamp, lo, hi, in_clamp, ilo, ihi)
    for q in range(bcols.size):
        j = bcols[q]
        dwb_tile(xb, base + j * sw * VW, btab[i, q, 0], btab[i, q, 1], bn[i, q], sw * VW, wts, wb, bias,
                 cb * VW, ob, orow + j * VW, rb, has_res, 1, relu, clamp, lo, hi, in_clamp, ilo, ihi)


def blocked_taps(prep: DirectConvPrep, h: int, w: int, ring: int = 0) -> tuple:
    """The tap tables of :func:`_depthwise_blocked_kernel` for ``h x w`` planes: ``(jl, jh, row3, rtab,
    rn, btab, bn, bcols)``. ``rtab[i]`` (2, kh * kw): offsets (floats, from output column 0's first
    input column) and weight indices of row ``i``'s valid taps, ``rn[i]`` of them (with ``row3``, one
    entry per valid input row: its first tap); ``btab[i, q]`` / ``bn[i, q]`` the same for border column
    ``bcols[q]``, offsets from that column. With ``ring`` the input rows live in a ring of that many
    rows (row ``r`` in row ``r % ring`` of each channel block's plane)."""
    _, _, kh, kw = prep.weight_shape
    (sh, sw), (ph, pw), (dh, dw) = prep.stride, prep.padding, prep.dilation
    _, _, hout, wout = prep.output_shape((1, 1, h, w))
    jl = min(wout, -(-pw // sw))
    jh = max(jl, min(wout, (w - 1 + pw - (kw - 1) * dw) // sw + 1))
    # the stride of the 1 x 3 row tiles (dwb_tile3 / dwb_tile3s2), 0 for none
    row3 = sw if kw == 3 and dw == 1 and (sw == 1 or (sw == 2 and ROW3_S2)) else 0
    k = kh * kw
    bcols = np.array([j for j in range(wout) if not jl <= j < jh], dtype=np.int64)
    rtab = np.zeros((hout, 2, k), np.int64)
    rn = np.zeros(hout, np.int64)
    btab = np.zeros((hout, max(1, bcols.size), 2, k), np.int64)
    bn = np.zeros((hout, max(1, bcols.size)), np.int64)
    for i in range(hout):
        rows = [r for r in range(kh) if 0 <= i * sh - ph + r * dh < h]

        def at(r: int, i: int = i) -> int:  # where input row i * sh - ph + r * dh lies
            v = i * sh - ph + r * dh
            return v % ring if ring else v

        taps = [((at(r) * w - pw + s * dw) * VW, r * kw + s) for r in rows
                for s in range(1 if row3 else kw)]
        rn[i] = len(taps)
        rtab[i, :, : len(taps)] = np.array(taps, dtype=np.int64).T.reshape(2, -1) if taps else 0
        for q, j in enumerate(bcols):
            t = [((at(r) * w + j * sw - pw + s * dw) * VW - j * sw * VW, r * kw + s)
                 for r in rows for s in range(kw) if 0 <= j * sw - pw + s * dw < w]
            bn[i, q] = len(t)
            btab[i, q, :, : len(t)] = np.array(t, dtype=np.int64).T.reshape(2, -1) if t else 0
    return jl, jh, row3, rtab, rn, btab, bn, bcols


def blocked_tables(prep: DirectConvPrep, h: int, w: int, ring: int = 0) -> tuple:
    """:func:`blocked_taps` for ``prep`` on ``h x w`` planes (or a ring of ``ring`` rows), built once per
    shape and kept with ``prep``."""
    key = ("depthwise-blocked-taps", h, w, ring, ROW3_S2)
    return prep.cached(key, lambda: blocked_taps(prep, h, w, ring))


_depthwise_blocked_kernel_serial = serial_twin(_depthwise_blocked_kernel)


def blocked_weights(prep: DirectConvPrep) -> np.ndarray:
    """The depthwise weights as :func:`dwb_row` reads them: (C / VW, kh * kw, VW), flat, built once."""
    c, _, kh, kw = prep.weight_shape

    def build() -> np.ndarray:
        taps = _dense_taps(prep).reshape(c // VW, VW, kh * kw)
        return np.ascontiguousarray(taps.transpose(0, 2, 1)).reshape(-1)

    return prep.cached(("depthwise-blocked",), build)


def bind_depthwise_blocked(prep: DirectConvPrep, x_shape: tuple[int, int, int, int], bias: np.ndarray | None,
                           out: np.ndarray, relu: bool = False, clamp: tuple[float, float] | None = None,
                           in_clamp: tuple[float, float] | None = None) -> Callable[..., None]:
    """``run(x)`` / ``run(x, res)``: the depthwise ``prep`` on channel-blocked arrays
    (:mod:`sparsecnn.kernels.blocked`; ``x`` of the plain shape ``x_shape``, ``out`` and ``res`` of the
    output's, each held as (B, C / VW, H, W, VW) in any array of that many floats), with the bias, the
    residual and the ReLU or a clamp written with the output, and a clamp of the input as it is read
    (``in_clamp``, bounds holding 0). The channel count must be a multiple of ``VW``.

    Parameters
    ----------
    prep : DirectConvPrep
        A depthwise layer (:func:`is_depthwise`).
    x_shape : tuple of int, (B, C, H, W)
    bias : ndarray, shape (C,), float32, or None
    out : ndarray, B * C * Hout * Wout float32, C-contiguous
    relu : bool
    clamp, in_clamp : tuple of float, (lo, hi), optional
    """
    if not is_depthwise(prep):
        raise ValueError("bind_depthwise_blocked: the layer is not depthwise")
    nb, c, h, w = (int(v) for v in x_shape)
    if c % VW:
        raise ValueError(f"bind_depthwise_blocked: {c} channels are not a multiple of {VW}")
    _, _, hout, wout = prep.output_shape((nb, c, h, w))
    if not out.flags.c_contiguous or out.size != nb * c * hout * wout:
        raise ValueError(f"bind_depthwise_blocked: out must be C-contiguous with {nb * c * hout * wout} "
                         f"floats")
    lo, hi, ilo, ihi = clamp_bounds("bind_depthwise_blocked", relu, clamp, in_clamp)
    wts = blocked_weights(prep)
    b = np.zeros(c, np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    nparts = num_threads()
    tables = blocked_tables(prep, h, w)
    small = prep.nnz * hout * wout * nb < _SERIAL_MACS
    kernel = _depthwise_blocked_kernel_serial if small else _depthwise_blocked_kernel
    flat = out.reshape(nb, -1)
    by_rows = BY_ROWS and hout >= BY_ROWS_MIN * nparts and (wout * VW * 4) % 64 == 0
    args = (wts, b, h, w, hout, wout, prep.stride[1], *tables, bool(relu), clamp is not None, lo, hi,
            in_clamp is not None, ilo, ihi, nparts, split_by_image(nb, nparts),
            image_counter(split_by_image(nb, nparts), nparts), by_rows)

    def run(x: np.ndarray, res: np.ndarray | None = None) -> None:
        tail = (flat, False) if res is None else (res.reshape(nb, -1), True)
        kernel(x.reshape(nb, -1), flat, *args, *tail)

    return run
