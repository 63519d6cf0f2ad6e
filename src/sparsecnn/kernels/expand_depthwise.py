"""An expanding 1x1 conv and the depthwise conv after it in one pass (MobileNet-v2's inverted residual),
on channel-blocked activations: the expanded tensor is never written.

MobileNet-v2 widens each block's input six times with a 1x1 conv, runs a 3x3 depthwise conv on the
wide tensor and narrows it again. Run as two layers, the wide tensor (96 x 112 x 112 floats, 4.8 MB,
in the second block) is written by the 1x1 layer and read back by the depthwise one, from the L3:
within a forward pass, at batch 1 on two threads, those two layers took 1.4-2x their time alone.
Here each thread computes its output rows of the depthwise layer, and before each row the wide rows
it reads that are not yet computed: the 1x1 layer's rows go into a ring of three rows per channel
block (the thread's own, ``3 * W * Cexp`` floats: 130 KB at 96 x 112), the depthwise row reads them
from there. A thread's first row recomputes the wide row its neighbour also computes (one of 28-56 at
stride 1).

The 1x1 rows are the channel-vector GEMM's register tiles
(:func:`sparsecnn.kernels._simd.chan_tile`: ``CHAN_BLOCK`` output channels x ``CHAN_NP`` positions,
its weights per block of filters kept in L1 along a row); the depthwise rows are
:func:`sparsecnn.kernels.depthwise.dwb_row`'s, reading the ring through tap tables built for it
(:func:`sparsecnn.kernels.depthwise.blocked_taps` with ``ring=3``), with the input clamp (the ReLU6
between the two layers), the bias and the output ReLU or clamp. The executor fuses such a pair where
the 1x1 layer runs the channel-vector GEMM blocked in and out and its output (through a clamp or
ReLU) has no other reader (:mod:`sparsecnn.engine._lower`, ``FUSE_EXPAND``).
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

from sparsecnn.kernels._numba import aligned_zeros, num_threads, pjit, serial_twin
from sparsecnn.kernels._simd import CHAN_BLOCK, CHAN_NP, VW, chan_tile
from sparsecnn.kernels.conv import DirectConvPrep, split_by_image
from sparsecnn.kernels.depthwise import blocked_taps, blocked_weights, dwb_row, is_depthwise

__all__ = ["RING", "bind_expand_depthwise_blocked", "fusable_expand"]

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


@pjit
def _expand_depthwise_kernel(x, out, ring, offs, qpos, wch, ncols, init, relu_e, w, dwts, dbias, h,
                             hout, wout, sh, ph, kh, dh, sw, jl, jh, row3, rtab, rn, btab, bn, bcols, relu,
                             clamp, lo, hi, in_clamp, ilo, ihi, nparts, by_image):
    """The fused pair on blocked ``x`` (B, Cin/VW * H * W * VW) into blocked ``out``
    (B, C/VW * Hout * Wout * VW): per thread (whole images with ``by_image``, else its output rows of
    each image), output row by output row, the wide rows ``r`` it reads first (those past the last
    one computed) into ``ring[part]`` (C/VW, RING, W, VW) at row ``r % RING``, then the row of every
    channel block."""
    nb = x.shape[0]
    ncb = dbias.size // VW
    nob = wch.shape[0]
    k = rtab.shape[2]
    plane = RING * w * VW
    for part in numba.prange(nparts):
        rg = ring[part]
        r0 = 0 if by_image else part * hout // nparts
        r1 = hout if by_image else (part + 1) * hout // nparts
        for b in range(part if by_image else 0, nb, nparts if by_image else 1):
            xb = x[b]
            ob = out[b]
            done = -1  # the last wide row computed for this image
            for i in range(r0, r1):
                top = max(i * sh - ph, done + 1, 0)
                bottom = min(i * sh - ph + (kh - 1) * dh, h - 1)
                for r in range(top, bottom + 1):
                    slot = r % RING
                    for o in range(nob):
                        wt = wch[o]
                        nout = min(CHAN_BLOCK // VW, ncb - o * (CHAN_BLOCK // VW))
                        for t0 in range(0, w, CHAN_NP):
                            chan_tile(xb, offs, wt, 0, ncols, 0, qpos, r * w + t0, rg,
                                      ((o * (CHAN_BLOCK // VW) * RING + slot) * w + t0) * VW, VW, plane, nout,
                                      min(CHAN_NP, w - t0), False, init, o * CHAN_BLOCK, rg, False, relu_e)
                done = max(done, bottom)
                for cb in range(ncb):
                    orow = ((cb * hout + i) * wout) * VW
                    dwb_row(rg, cb * plane, i, cb, dwts, cb * k * VW, dbias, ob, orow, ob, False, jl, jh, sw,
                            row3, rtab, rn, btab, bn, bcols, relu, clamp, lo, hi, in_clamp, ilo, ihi)


_expand_depthwise_kernel_serial = serial_twin(_expand_depthwise_kernel)


def bind_expand_depthwise_blocked(eprep, ebias: np.ndarray | None, dprep: DirectConvPrep,
                                  x_shape: tuple[int, int, int, int], bias: np.ndarray | None,
                                  out: np.ndarray, relu: bool = False,
                                  clamp: tuple[float, float] | None = None,
                                  in_clamp: tuple[float, float] | None = None,
                                  expand_relu: bool = False) -> Callable[[np.ndarray], None]:
    """``run(x)``: the 1x1 layer ``eprep`` (with bias ``ebias`` and, with ``expand_relu``, a ReLU) and
    then the depthwise layer ``dprep`` (its input clamped to ``in_clamp`` as it is read, its bias, its
    ReLU or clamp) on channel-blocked arrays (:mod:`sparsecnn.kernels.blocked`): ``x`` of the plain
    shape ``x_shape`` (the 1x1 layer's input), ``out`` the depthwise layer's output, each held as
    (B, C / VW, H, W, VW) in any array of that many floats.

    Parameters
    ----------
    eprep : ImplicitGemmPrep
        The 1x1 layer (:func:`fusable_expand` with ``dprep``).
    ebias : ndarray, shape (Cexp,), float32, or None
    dprep : DirectConvPrep
        The depthwise layer on the 1x1 layer's output.
    x_shape : tuple of int, (B, Cin, H, W)
    bias : ndarray, shape (Cexp,), float32, or None
        The depthwise layer's bias.
    out : ndarray, B * Cexp * Hout * Wout float32, C-contiguous
    relu : bool
    clamp, in_clamp : tuple of float, (lo, hi), optional
    expand_relu : bool
    """
    if not fusable_expand(eprep, dprep):
        raise ValueError("bind_expand_depthwise_blocked: not a 1x1 layer and a depthwise layer on its output")
    nb, cin, h, w = (int(v) for v in x_shape)
    cexp = eprep.weight_shape[0]
    if cin != eprep.weight_shape[1]:
        raise ValueError(f"bind_expand_depthwise_blocked: {cin} input channels, the 1x1 layer takes "
                         f"{eprep.weight_shape[1]}")
    _, _, hout, wout = dprep.output_shape((nb, cexp, h, w))
    if not out.flags.c_contiguous or out.size != nb * cexp * hout * wout:
        raise ValueError(f"bind_expand_depthwise_blocked: out must be C-contiguous with "
                         f"{nb * cexp * hout * wout} floats")
    if clamp is not None and (relu or not clamp[0] <= clamp[1]):
        raise ValueError(f"bind_expand_depthwise_blocked: clamp {clamp} must be an interval, and not with "
                         f"relu")
    if in_clamp is not None and not in_clamp[0] <= 0.0 <= in_clamp[1]:
        raise ValueError(f"bind_expand_depthwise_blocked: in_clamp {in_clamp} must hold 0 (the padding)")
    wch, _ = eprep._chan_weights()  # (1, nob, Kr, CHAN_BLOCK)
    nob = wch.shape[1]
    ncols = int(eprep.ncols[0])
    chans = eprep.cols[0, :ncols].astype(np.int64)  # 1x1: a column is an input channel
    offs = np.ascontiguousarray(chans // VW * (h * w * VW) + chans % VW, dtype=np.int64)
    qpos = np.ascontiguousarray(np.arange(h * w, dtype=np.int64) * VW)
    init = np.zeros(nob * CHAN_BLOCK, np.float32)
    if ebias is not None:
        init[:cexp] = ebias
    nparts = num_threads()
    tables = dprep.cached(("depthwise-blocked-ring", h, w, RING), lambda: blocked_taps(dprep, h, w, RING))
    db = np.zeros(cexp, np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    lo, hi = (np.float32(v) for v in clamp) if clamp is not None else (np.float32(0.0),) * 2
    ilo, ihi = (np.float32(v) for v in in_clamp) if in_clamp is not None else (np.float32(0.0),) * 2
    ring = aligned_zeros((nparts, cexp * RING * w))
    small = (ncols + dprep.nnz // cexp) * cexp * h * w * nb < _SERIAL_MACS
    kernel = _expand_depthwise_kernel_serial if small else _expand_depthwise_kernel
    wflat = np.ascontiguousarray(wch[0].reshape(nob, -1))
    (sh, sw), (ph, _), (dh, _) = dprep.stride, dprep.padding, dprep.dilation
    dkh = dprep.weight_shape[2]
    flat = out.reshape(nb, -1)
    args = (ring, offs, qpos, wflat, ncols, init, bool(expand_relu), w, blocked_weights(dprep), db, h,
            hout, wout, sh, ph, dkh, dh, sw, *tables, bool(relu), clamp is not None, lo, hi,
            in_clamp is not None, ilo, ihi, nparts, split_by_image(nb, nparts))

    def run(x: np.ndarray) -> None:
        kernel(x.reshape(nb, -1), flat, *args)

    return run
