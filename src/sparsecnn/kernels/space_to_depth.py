"""Strided convolutions as 3x3 stride-1 ones over a space-to-depth input, for Winograd.

A ``kh x kw`` convolution with stride ``(sh, sw)`` reads input row ``sh * y + i`` for output row ``y``
and tap ``i``. Writing ``i = sh * a + b`` (``0 <= b < sh``), that is row ``y + a`` of the phase plane
``X_b[j] = x[sh * j + b]``; so the layer is a stride-1 convolution with ``ceil(kh / sh)`` taps over
``Cin * sh * sw`` channels (one per input channel and phase pair), its taps ``(a, b)`` past the kernel
zero:

.. math:: y[f, p, q] = \\sum_{c, b, d} \\sum_{a, e} x_{c,b,d}[p + a, q + e] \\, w[f, c, s_h a + b, s_w e + d]

Where both sides give 3 taps (AlexNet's conv1: 11x11 stride 4, as 3x3 over 48 channels of 57x57 phase
planes; 5x5 stride 2; 9x9 stride 3) the ``lowered`` strategy runs the layer as Winograd F(m x m, 3x3)
(:mod:`sparsecnn.kernels.winograd`): the rearranged layer has 144 / 121 of conv1's multiply-adds (the
zero taps), and F(4 x 4) does 36 of every 144 of those. Measured (Zen 4, 2 threads, AlexNet's conv1 with
Deep Compression's 16% zeros, interleaved, ``python -m benchmarks.strided_winograd``): alone at batch 1
1.23-1.43x the ``direct`` kernel (0.99 against 1.32 ms, torch 1.06); the whole compiled AlexNet with
conv1 so against the same plan with conv1 ``direct``: 0.96-1.04x over nine runs of both profiles, no
reliable gain. At batch 32 (each thread its own images) the layer alone first ran 1.01-1.45x ``direct``
but the compiled model 0.96-0.99x as fast with it; once the Winograd kernel stored whole tiles into a
plain output through in-register transposes (scalar stores had cost 9 of the layer's 31 ms) the layer
alone ran 1.33x and the compiled model 1.082x (``implicit_gemm.S2D_BY_IMAGE``, the A/B switch, now on).

:func:`rearrange_block` writes the rearranged input straight into the channel-blocked layout
(:mod:`sparsecnn.kernels.blocked`) that the Winograd kernel reads, so the rearrangement replaces the
plain-to-blocked copy a plain input needs anyway: the Winograd workspace carries the geometry
(``WinoWorkspace.s2d``) and its kernel rearranges each plain image where it would copy it. Only
ungrouped layers without dilation.
"""

from __future__ import annotations

import numba
import numpy as np

from sparsecnn.kernels._numba import jit, pjit
from sparsecnn.kernels._simd import VW, copy_quad

__all__ = ["rearrange_block", "rearrange_image", "s2d_channels", "s2d_geometry", "s2d_stride", "s2d_weight",
           "space_to_depth_blocked"]

# The taps per side of the rearranged layer that Winograd F(m x m, 3x3) takes.
_TAPS = 3


def s2d_stride(kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
               groups: int) -> tuple[int, int] | None:
    """``stride`` where a layer of ``kernel`` rearranges into a 3x3 stride-1 layer (see the module
    docstring), else None: strided, ungrouped, no dilation, ``ceil(k / s) == 3`` on both sides."""
    (kh, kw), (sh, sw) = kernel, stride
    if groups != 1 or tuple(dilation) != (1, 1) or (sh, sw) == (1, 1) or min(sh, sw) < 1:
        return None
    if -(-kh // sh) != _TAPS or -(-kw // sw) != _TAPS:
        return None
    return int(sh), int(sw)


def s2d_channels(cin: int, stride: tuple[int, int]) -> int:
    """Channels of the rearranged input: ``cin * sh * sw`` rounded up to whole vectors (``VW``; the
    blocked layout holds whole vectors of channels, the extra ones zero)."""
    n = cin * stride[0] * stride[1]
    return -(-n // VW) * VW


def s2d_weight(weight: np.ndarray, stride: tuple[int, int]) -> np.ndarray:
    """The 3x3 filters of the rearranged layer.

    Parameters
    ----------
    weight : ndarray, shape (Cout, Cin, kh, kw), float32
    stride : tuple of int
        ``(sh, sw)`` with ``ceil(kh / sh) == ceil(kw / sw) == 3``.

    Returns
    -------
    ndarray, shape (Cout, s2d_channels(Cin, stride), 3, 3), float32
        ``w2[f, (c * sh + b) * sw + d, a, e] = weight[f, c, sh * a + b, sw * e + d]``, zero where that
        tap lies past the kernel and for the padding channels.
    """
    cout, cin, kh, kw = weight.shape
    sh, sw = stride
    padded = np.zeros((cout, cin, _TAPS * sh, _TAPS * sw), np.float32)
    padded[:, :, :kh, :kw] = weight
    # [f, c, a, b, e, d] -> [f, c, b, d, a, e]
    w2 = padded.reshape(cout, cin, _TAPS, sh, _TAPS, sw).transpose(0, 1, 3, 5, 2, 4)
    out = np.zeros((cout, s2d_channels(cin, stride), _TAPS, _TAPS), np.float32)
    out[:, :cin * sh * sw] = w2.reshape(cout, cin * sh * sw, _TAPS, _TAPS)
    return out


def s2d_geometry(x_shape: tuple[int, int, int, int], kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int]) -> np.ndarray:
    """``[C, H, W, sh, sw, ph, pw, Hs, Ws, C2]`` (int64) for :func:`space_to_depth_blocked`: the
    phase planes are ``Hs x Ws = (Hout + 2) x (Wout + 2)`` (a 3x3 stride-1 layer without padding
    over them gives the output), ``C2`` = :func:`s2d_channels`."""
    _, c, h, w = x_shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (w + 2 * pw - kw) // sw + 1
    return np.array([c, h, w, sh, sw, ph, pw, ho + _TAPS - 1, wo + _TAPS - 1, s2d_channels(c, stride)],
                    dtype=np.int64)


@jit
def _lane_value(src, ci, bi, di, j, k, h, w, sh, sw, ph, pw):
    """One rearranged input: channel ``ci``'s ``x[sh * j + bi - ph, sw * k + di - pw]`` (0 outside)."""
    iy = sh * j + bi - ph
    ix = sw * k + di - pw
    if iy < 0 or iy >= h or ix < 0 or ix >= w:
        return np.float32(0.0)
    return src[(ci * h + iy) * w + ix]


@jit
def rearrange_block(src, dst, geo, cb):
    """Channel block ``cb`` of one image's rearranged input into ``dst`` (that block's ``Hs * Ws * VW``
    floats): lane ``l`` of position ``(j, k)`` is ``src[c, sh * j + bi - ph, sw * k + di - pw]`` for
    channel ``q = cb * VW + l = (c * sh + bi) * sw + di`` (zero outside the image and past the
    channels). Each position is one vector of ``VW`` lanes; where every lane's input lies inside the
    image (all but the border rows and columns) the lanes are plain loads at fixed offsets from the
    position's (``sw`` consecutive floats of ``VW / sw`` rows on AlexNet's conv1): AlexNet's conv1
    input in 0.1 ms an image with a per-lane loop, 0.05 ms so (2 threads); at stride 4 across, each
    run of 4 lanes is one 4-float copy (:func:`sparsecnn.kernels._simd.copy_quad`).
    NOTE: src (C * H * W) one plain image; geo from :func:`s2d_geometry`."""
    c, h, w, sh, sw, ph, pw, hs, ws = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7], geo[8]
    nq = c * sh * sw
    ci = np.empty(VW, np.int64)
    bi = np.empty(VW, np.int64)
    di = np.empty(VW, np.int64)
    off = np.empty(VW, np.int64)
    full = True  # every lane a real channel
    bmin, bmax, dmin, dmax = sh, -1, sw, -1
    for lane in range(VW):
        q = cb * VW + lane
        if q >= nq:
            full = False
            ci[lane], bi[lane], di[lane], off[lane] = -1, 0, 0, 0
            continue
        ci[lane] = q // (sh * sw)
        bi[lane] = (q // sw) % sh
        di[lane] = q % sw
        off[lane] = (ci[lane] * h + bi[lane] - ph) * w + di[lane] - pw
        bmin, bmax = min(bmin, bi[lane]), max(bmax, bi[lane])
        dmin, dmax = min(dmin, di[lane]), max(dmax, di[lane])
    # runs of 4 lanes from 4 consecutive floats of one input row (stride 4 across, AlexNet's conv1): a
    # position of such a block is VW / 4 four-float copies (copy_quad) instead of VW scalar ones
    quads = full and sw == 4 and VW % 4 == 0
    for lane in range(VW):
        if quads and lane % 4 and off[lane] != off[lane - 1] + 1:
            quads = False
    # output columns k0 <= k < k1 (rows j0 <= j < j1) read inside the image in every lane
    k0 = min(max(0, -(-(pw - dmin) // sw)), ws)
    k1 = max(min(ws, (w - 1 + pw - dmax) // sw + 1), k0)
    j0 = min(max(0, -(-(ph - bmin) // sh)), hs)
    j1 = max(min(hs, (h - 1 + ph - bmax) // sh + 1), j0)
    for j in range(hs):
        row = j * ws * VW
        inner = full and j0 <= j < j1
        for k in range(ws):
            o = row + k * VW
            if inner and k0 <= k < k1:
                at = sh * j * w + sw * k
                if quads:
                    for lane in range(0, VW, 4):
                        copy_quad(src, off[lane] + at, dst, o + lane)
                else:
                    for lane in range(VW):
                        dst[o + lane] = src[off[lane] + at]
            else:
                for lane in range(VW):
                    v = np.float32(0.0)
                    if ci[lane] >= 0:
                        v = _lane_value(src, ci[lane], bi[lane], di[lane], j, k, h, w, sh, sw, ph, pw)
                    dst[o + lane] = v


@jit
def rearrange_image(src, dst, geo):
    """Every channel block of one image's rearranged input (:func:`rearrange_block`) into ``dst``."""
    plane = geo[7] * geo[8] * VW
    for cb in range(geo[9] // VW):
        rearrange_block(src, dst[cb * plane:(cb + 1) * plane], geo, cb)


@pjit
def space_to_depth_blocked(x, xb, geo):
    """The rearranged input of every image in the channel-blocked layout, (image, channel block) pairs
    in parallel (:func:`rearrange_block`): ``xb[b, q // VW, j, k, q % VW] = x[b, c, sh * j + bi - ph,
    sw * k + di - pw]`` for channel ``q = (c * sh + bi) * sw + di``.
    NOTE: x (B, C * H * W) plain; xb (B, >= C2 * Hs * Ws) (:func:`s2d_geometry` ``geo``)."""
    ncb = geo[9] // VW
    plane = geo[7] * geo[8] * VW
    for pair in numba.prange(x.shape[0] * ncb):
        b = pair // ncb
        cb = pair - b * ncb
        rearrange_block(x[b], xb[b, cb * plane:(cb + 1) * plane], geo, cb)

