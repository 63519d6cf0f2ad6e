"""A depthwise conv with the 1x1 convs before and after it in one pass (MobileNet-v2's inverted residual
block), on channel-blocked activations: the wide tensors inside the block are never written.

MobileNet-v2 widens each block's input six times with a 1x1 conv, runs a 3x3 depthwise conv on the
wide tensor and narrows it again with a second 1x1 conv (plus the block's input where the shape is
kept). Run as three layers, each wide tensor (96 x 112 x 112 floats, 4.8 MB, in the second block) is
written by one layer and read back by the next from the L3 or the other core's cache: within a
forward pass, at batch 1 on two threads, the depthwise and projecting layers took 1.5-2.5x their
time alone. Here each thread computes its output rows of the depthwise layer, and before each row the
wide rows it reads that are not yet computed: the first 1x1 layer's rows go into a ring of three rows
per channel block (the thread's own, ``3 * W * Cexp`` floats: 130 KB at 96 x 112), the depthwise row
reads them from there. A thread's first row recomputes the wide row its neighbour also computes (one
of 28-56 at stride 1). With a projecting layer, the depthwise row goes to a buffer of one row (the
thread's own) and the projecting layer writes its row of the block's output from there, the residual
added. Either 1x1 layer may be absent (MobileNet-v2's first block has no expanding one).

The 1x1 rows are the channel-vector GEMM's register tiles (:func:`sparsecnn.kernels._simd.chan_tile`:
``CHAN_BLOCK`` output channels x ``CHAN_NP`` positions, the weights of a block of filters kept in L1
along a row); the depthwise rows are :func:`sparsecnn.kernels.depthwise.dwb_row`'s, reading the ring
through tap tables built for it (:func:`sparsecnn.kernels.depthwise.blocked_taps` with ``ring=3``),
with the input clamp (the ReLU6 between the layers), the bias and the output ReLU or clamp. The sums
are those of the separate layers, in the same order: the outputs are equal bit for bit. The executor
fuses a block where its 1x1 layers run the channel-vector GEMM blocked in and out, no value inside it
has another reader, and each thread gets at least ``engine._lower.FUSE_EXPAND_ROWS`` output rows or
whole images (:mod:`sparsecnn.engine._lower`, ``FUSE_EXPAND`` / ``FUSE_PROJECT``).

Measured (Zen 4, 2 threads, batch 1; docs/engine.md, twentieth session): the 1x1 + depthwise pair
alone against the two steps 1.04-1.33x on MobileNet-v2's blocks down to 14 x 14, 0.74x at 7 x 7 (3.5
rows a thread: hence the row threshold); the whole dense model with the blocks fused against none
1.18-1.21x (paired, near).
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

from sparsecnn.kernels._numba import aligned_zeros, jit, num_threads, pjit, serial_twin
from sparsecnn.kernels._simd import CHAN_BLOCK, CHAN_NP, VW, chan_tile
from sparsecnn.kernels.conv import DirectConvPrep, image_counter, next_image, split_by_image
from sparsecnn.kernels.depthwise import (
    blocked_tables,
    blocked_weights,
    clamp_bounds,
    dwb_row,
    is_depthwise,
    part_range,
)

__all__ = ["RING", "bind_expand_depthwise_blocked", "fusable_expand", "fusable_project"]

RING = 3  # wide rows kept per channel block: a 3-row depthwise filter's, at stride 1 or 2

# Below this many multiply-adds per call the serial twin runs (no parallel launch), as in conv.py.
_SERIAL_MACS = 1 << 16


def fusable_expand(eprep, dprep: DirectConvPrep) -> bool:
    """Whether the channel-vector GEMM layer ``eprep`` (:class:`sparsecnn.kernels.implicit_gemm.
    ImplicitGemmPrep`) and the depthwise layer ``dprep`` after it run as one
    (:func:`bind_expand_depthwise_blocked`): a 1x1 stride-1 unpadded layer writing every filter in
    order, blocked in and out, and a depthwise layer of at most ``RING`` rows of taps on its output."""
    cout, _, kh, kw = eprep.weight_shape
    dc, _, dkh, _ = dprep.weight_shape
    return ((kh, kw) == (1, 1) and eprep.stride == (1, 1) and eprep.padding == (0, 0) and eprep.groups == 1
            and eprep.blockable(False) and eprep.blockable(True) and is_depthwise(dprep) and dc == cout
            and (dkh - 1) * dprep.dilation[0] + 1 <= RING and dprep.stride[0] <= RING)


@jit(inline="always")
def _gemm_row(src, offs, qpos, p0, wch, ncols, init, dst, dpos, plane, nchan, npos, res, has_res, relu):
    """Positions ``p0 .. p0 + npos`` of a blocked 1x1 layer (weights ``wch`` (nob, Kr * CHAN_BLOCK), its
    ``ncols`` columns at ``src[offs[k] + qpos[p]]``) into the blocked ``dst`` at ``dpos`` (``plane``
    floats a channel block), every block of filters in register tiles of ``CHAN_NP`` positions."""
    per = CHAN_BLOCK // VW
    for o in range(wch.shape[0]):
        nout = min(per, nchan // VW - o * per)
        for t0 in range(0, npos, CHAN_NP):
            pos = dpos + o * per * plane + t0 * VW
            chan_tile(src, offs, wch[o], 0, ncols, 0, qpos, p0 + t0, dst, pos, VW, plane, nout,
                      min(CHAN_NP, npos - t0), False, init, o * CHAN_BLOCK, res, has_res, relu)


def fusable_project(pprep, cexp: int) -> bool:
    """Whether the channel-vector GEMM layer ``pprep`` can run as the projecting 1x1 layer of
    :func:`bind_expand_depthwise_blocked` on ``cexp`` channels: 1x1, stride 1, unpadded, one group,
    blocked in and out."""
    _, cin, kh, kw = pprep.weight_shape
    return ((kh, kw) == (1, 1) and pprep.stride == (1, 1) and pprep.padding == (0, 0) and pprep.groups == 1
            and cin == cexp and pprep.blockable(False) and pprep.blockable(True))


@pjit
def _expand_depthwise_kernel(x, out, has_expand, ring, offs, qpos, wch, ncols, init, relu_e, w, dwts, dbias,
                             h, hout, wout, sh, ph, kh, dh, sw, jl, jh, row3, rtab, rn, btab, bn, bcols, relu,
                             clamp, lo, hi, in_clamp, ilo, ihi, nparts, by_image, counter, has_proj, rowbuf,
                             pwch,
                             pncols, pinit, poffs, pqpos, pchan, prelu, res, has_res):
    """The fused pair on blocked ``x`` (B, Cin/VW * H * W * VW) into blocked ``out``
    (B, C/VW * Hout * Wout * VW): per thread (whole images with ``by_image``, else its output rows of
    each image), output row by output row, the wide rows ``r`` it reads first (those past the last
    one computed) into ``ring[part]`` (C/VW, RING, W, VW) at row ``r % RING``, then the row of every
    channel block. With ``has_proj`` that row goes to ``rowbuf[part]`` (C/VW, Wout, VW) instead and
    the projecting 1x1 layer (``pwch``, ``pchan`` filters) writes its row of ``out``
    (B, pchan/VW * Hout * Wout * VW) from there, adding ``res`` (``out``'s layout) with ``has_res``.
    Without ``has_expand`` ``x`` is the depthwise layer's input (B, C/VW * H * W * VW), read where it
    lies (the tap tables for its planes)."""
    nb = x.shape[0]
    ncb = dbias.size // VW
    k = rtab.shape[2]
    plane = RING * w * VW if has_expand else h * w * VW
    if counter.size:
        counter[0] = 0
    for part in numba.prange(nparts):
        rg = ring[part]
        rw = rowbuf[part]
        r0, r1 = part_range(part, nparts, hout, by_image)
        b = next_image(counter, -1, part, nparts, by_image)
        while b < nb:
            xb, ob, rb = x[b], out[b], res[b]
            done = -1  # the last wide row computed for this image
            for i in range(r0, r1):
                if has_expand:  # the 1x1 layer's rows row i reads, past those computed
                    top = max(i * sh - ph, done + 1, 0)
                    bottom = min(i * sh - ph + (kh - 1) * dh, h - 1)
                    for r in range(top, bottom + 1):
                        _gemm_row(xb, offs, qpos, r * w, wch, ncols, init, rg, (r % RING) * w * VW, plane,
                                  ncb * VW, w, rg, False, relu_e)
                    done = max(done, bottom)
                src = rg if has_expand else xb
                for cb in range(ncb):  # into the row buffer for the projection, else into out
                    dst = rw if has_proj else ob
                    at = cb * wout * VW if has_proj else ((cb * hout + i) * wout) * VW
                    dwb_row(src, cb * plane, i, cb, dwts, cb * k * VW, dbias, dst, at, dst, False, jl, jh, sw,
                            row3, rtab, rn, btab, bn, bcols, relu, clamp, lo, hi, in_clamp, ilo, ihi)
                if has_proj:
                    _gemm_row(rw, poffs, pqpos, 0, pwch, pncols, pinit, ob, i * wout * VW, hout * wout * VW,
                              pchan, wout, rb, has_res, prelu)
            b = next_image(counter, b, part, nparts, by_image)


_expand_depthwise_kernel_serial = serial_twin(_expand_depthwise_kernel)


def _gemm_operands(prep, bias: np.ndarray | None, h: int, w: int) -> tuple:
    """The channel-vector GEMM operands of blocked 1x1 layer ``prep`` on (C/VW, h, w, VW) planes:
    ``(weights (nob, Kr * CHAN_BLOCK), kept columns, column offsets, position offsets, initial sums)``;
    for ``prep`` None, empty ones of the same types."""
    if prep is None:
        return (np.zeros((1, 0), np.float32), 0, np.zeros(0, np.int64), np.zeros(0, np.int64),
                np.zeros(CHAN_BLOCK, np.float32))
    wch, _ = prep._chan_weights()  # (1, nob, Kr, CHAN_BLOCK)
    nob = wch.shape[1]
    ncols = int(prep.ncols[0])
    chans = prep.cols[0, :ncols].astype(np.int64)  # 1x1: a column is an input channel
    offs = np.ascontiguousarray(chans // VW * (h * w * VW) + chans % VW, dtype=np.int64)
    qpos = np.ascontiguousarray(np.arange(h * w, dtype=np.int64) * VW)
    init = np.zeros(nob * CHAN_BLOCK, np.float32)
    if bias is not None:
        init[: prep.weight_shape[0]] = bias
    return np.ascontiguousarray(wch[0].reshape(nob, -1)), ncols, offs, qpos, init


def bind_expand_depthwise_blocked(eprep, ebias: np.ndarray | None, dprep: DirectConvPrep,
                                  x_shape: tuple[int, int, int, int], bias: np.ndarray | None,
                                  out: np.ndarray, relu: bool = False,
                                  clamp: tuple[float, float] | None = None,
                                  in_clamp: tuple[float, float] | None = None,
                                  expand_relu: bool = False, project: tuple | None = None,
                                  project_relu: bool = False) -> Callable[..., None]:
    """``run(x)`` / ``run(x, res)``: the 1x1 layer ``eprep`` (with bias ``ebias`` and, with
    ``expand_relu``, a ReLU) and then the depthwise layer ``dprep`` (its input clamped to ``in_clamp``
    as it is read, its bias, its ReLU or clamp) on channel-blocked arrays
    (:mod:`sparsecnn.kernels.blocked`): ``x`` of the plain shape ``x_shape`` (the 1x1 layer's input),
    ``out`` the depthwise layer's output, each held as (B, C / VW, H, W, VW) in any array of that many
    floats. With ``eprep`` None, no 1x1 layer: ``x`` is the depthwise layer's input. With ``project``
    (``(pprep, pbias)``: a 1x1 layer on the depthwise layer's output, :func:`fusable_project`) that layer
    too, row by row from a buffer of one depthwise row: ``out`` is its output, with the residual ``res``
    (laid out as ``out``) added and then, with ``project_relu``, a ReLU.

    Parameters
    ----------
    eprep : ImplicitGemmPrep or None
        The 1x1 layer (:func:`fusable_expand` with ``dprep``), or none.
    ebias : ndarray, shape (Cexp,), float32, or None
    dprep : DirectConvPrep
        The depthwise layer on the 1x1 layer's output.
    x_shape : tuple of int, (B, Cin, H, W)
    bias : ndarray, shape (Cexp,), float32, or None
        The depthwise layer's bias.
    out : ndarray, B * Cexp * Hout * Wout (or B * Cout * Hout * Wout with ``project``) float32,
        C-contiguous
    relu : bool
    clamp, in_clamp : tuple of float, (lo, hi), optional
    expand_relu : bool
    project : tuple (ImplicitGemmPrep, ndarray of shape (Cout,) or None), optional
    project_relu : bool
    """
    if not (is_depthwise(dprep) if eprep is None else fusable_expand(eprep, dprep)):
        raise ValueError("bind_expand_depthwise_blocked: not a 1x1 layer and a depthwise layer on its output")
    nb, cin, h, w = (int(v) for v in x_shape)
    cexp = dprep.weight_shape[0]
    takes = cexp if eprep is None else eprep.weight_shape[1]
    if cin != takes:
        raise ValueError(f"bind_expand_depthwise_blocked: {cin} input channels, the first layer takes "
                         f"{takes}")
    if project is not None and not fusable_project(project[0], cexp):
        raise ValueError(f"bind_expand_depthwise_blocked: the projecting layer is not a blocked 1x1 layer on "
                         f"{cexp} channels")
    _, _, hout, wout = dprep.output_shape((nb, cexp, h, w))
    cout = cexp if project is None else project[0].weight_shape[0]
    if not out.flags.c_contiguous or out.size != nb * cout * hout * wout:
        raise ValueError(f"bind_expand_depthwise_blocked: out must be C-contiguous with "
                         f"{nb * cout * hout * wout} floats")
    lo, hi, ilo, ihi = clamp_bounds("bind_expand_depthwise_blocked", relu, clamp, in_clamp)
    nparts = num_threads()
    tables = blocked_tables(dprep, h, w, 0 if eprep is None else RING)  # the plain layer's, without a ring
    db = np.zeros(cexp, np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    if eprep is None:
        ring = aligned_zeros((nparts, VW))
        wflat, ncols, offs, qpos, init = _gemm_operands(None, None, 0, 0)
    else:
        ring = aligned_zeros((nparts, cexp * RING * w))
        wflat, ncols, offs, qpos, init = _gemm_operands(eprep, ebias, h, w)
    macs = (ncols + dprep.nnz // cexp) * cexp * h * w * nb
    if project is None:
        proj = (aligned_zeros((nparts, VW)), wflat[:, :0], 0, init, offs, qpos, 0, False)
    else:
        pw, pncols, poffs, pqpos, pinit = _gemm_operands(project[0], project[1], 1, wout)
        proj = (aligned_zeros((nparts, cexp * wout)), pw, pncols, pinit, poffs, pqpos, cout,
                bool(project_relu))
        macs += pncols * cout * hout * wout * nb
    kernel = _expand_depthwise_kernel_serial if macs < _SERIAL_MACS else _expand_depthwise_kernel
    (sh, sw), (ph, _), (dh, _) = dprep.stride, dprep.padding, dprep.dilation
    dkh = dprep.weight_shape[2]
    flat = out.reshape(nb, -1)
    args = (eprep is not None, ring, offs, qpos, wflat, ncols, init, bool(expand_relu), w,
            blocked_weights(dprep), db, h, hout, wout, sh, ph, dkh, dh, sw, *tables, bool(relu),
            clamp is not None, lo, hi, in_clamp is not None, ilo, ihi, nparts, split_by_image(nb, nparts),
            image_counter(split_by_image(nb, nparts), nparts),
            project is not None, *proj)

    def run(x: np.ndarray, res: np.ndarray | None = None) -> None:
        if res is not None and project is None:
            raise ValueError("bind_expand_depthwise_blocked: a residual needs the projecting layer")
        tail = (flat, False) if res is None else (res.reshape(nb, -1), True)
        kernel(x.reshape(nb, -1), flat, *args, *tail)

    return run
