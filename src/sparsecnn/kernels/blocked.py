"""The channel-blocked activation layout (NCHWc with c = ``VW``) and its conversions.

An activation ``(B, C, H, W)`` is stored as ``(B, C / VW, H, W, VW)``: ``VW`` channels side by side
per pixel, as oneDNN's ``nChw16c`` and ONNX Runtime's (MLAS) NCHWc layouts hold them. The
channel-vector implicit GEMM (:func:`sparsecnn.kernels.implicit_gemm._chan_kernel`) keeps output
channels in the vector lanes, so in this layout it stores each register of results with one vector
store, where the plain layout needs a transpose into ``VW`` planes; and the ``VW`` input channels
that one broadcast after another reads lie in one cache line instead of ``VW`` planes apart. The
compiled executor keeps chains of such layers in this layout (see :mod:`sparsecnn.engine._lower`)
and converts at the chain's ends; elementwise steps (ReLU, residual adds) do not care which
layout they see. Only channel counts that are a multiple of ``VW`` are blocked, so a blocked value
takes exactly the bytes of the plain one.

The phase planes of a blocked input (:func:`blocked_phase_copy`) are the plain layout's
(:func:`sparsecnn.kernels.conv.phase_layout`) with each float widened to ``VW`` channels:
``xt[((cb * nph + q) * plane + i * wph + j) * VW + l]`` holds channel ``cb * VW + l``.
"""

from __future__ import annotations

import numba
import numpy as np

from sparsecnn.kernels._numba import jit, pjit, serial_twin
from sparsecnn.kernels._simd import VW, copy_vec, max_taps

__all__ = ["BLOCK", "blockable", "blocked_phase_copy", "blocked_shape", "from_blocked", "from_blocked_array",
           "global_avg_pool_blocked", "image_input_blocked", "max_pool_blocked", "to_blocked",
           "to_blocked_array"]

BLOCK = VW  # channels per pixel of a block


@pjit
def to_blocked(x, out):
    """``out[b, cb, p, l] = x[b, cb * BLOCK + l, p]``: x (B, C, P), out (B, C / BLOCK, P, BLOCK),
    C a multiple of BLOCK, (image, channel block) pairs in parallel."""
    nb, c, p = x.shape
    ncb = c // BLOCK
    for bc in numba.prange(nb * ncb):
        b = bc // ncb
        cb = bc - b * ncb
        for l in range(BLOCK):
            src = x[b, cb * BLOCK + l]
            dst = out[b, cb]
            for q in range(p):
                dst[q, l] = src[q]


@pjit
def from_blocked(x, out):
    """``out[b, cb * BLOCK + l, p] = x[b, cb, p, l]``: the inverse of :func:`to_blocked`."""
    nb, ncb, p, _ = x.shape
    for bc in numba.prange(nb * ncb):
        b = bc // ncb
        cb = bc - b * ncb
        for l in range(BLOCK):
            src = x[b, cb]
            dst = out[b, cb * BLOCK + l]
            for q in range(p):
                dst[q] = src[q, l]


@jit
def _copy_blocks(src, dst, copies, geo, cb0, cb1):
    """Channel blocks ``cb0 <= cb < cb1`` of one blocked image ``src`` (Cin * h * w floats) into its
    blocked phase planes ``dst`` (the plain copy's rows, see
    :func:`sparsecnn.kernels.conv.image_input`, each float a vector of ``BLOCK`` channels), one
    vector load and store per position (:func:`sparsecnn.kernels._simd.copy_vec`)."""
    h, w, chan, plane, wph, sh, sw = geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7]
    for cb in range(cb0, cb1):
        for q in range(copies.shape[0]):
            base = cb * chan + copies[q, 0] * plane
            i0, i1, j0, j1 = copies[q, 1], copies[q, 2], copies[q, 3], copies[q, 4]
            hi0, wi0 = copies[q, 5], copies[q, 6]
            for i in range(i0, i1):
                si = (cb * h + hi0 + (i - i0) * sh) * w + wi0
                o = base + i * wph + j0
                for j in range(j1 - j0):
                    copy_vec(src, (si + j * sw) * BLOCK, dst, (o + j) * BLOCK)


@pjit
def blocked_phase_copy(x, xt, copies, geo):
    """Every blocked image of ``x`` (B, Cin * h * w) into its blocked phase planes ``xt[b]``,
    (image, channel block) pairs in parallel. ``geo`` as the plain copy's, with ``geo[3]`` the
    positions per channel block (``nph * plane``)."""
    ncb = geo[0] // BLOCK
    for bc in numba.prange(x.shape[0] * ncb):
        b = bc // ncb
        cb = bc - b * ncb
        _copy_blocks(x[b], xt[b], copies, geo, cb, cb + 1)


blocked_phase_copy_serial = serial_twin(blocked_phase_copy)


@jit
def image_input_blocked(x, b, xt, part, copies, geo, copy):
    """:func:`sparsecnn.kernels.conv.image_input` for a blocked input: ``x[b]`` itself when not
    ``copy``, else image ``b`` copied into thread ``part``'s own blocked phase planes."""
    src = x[b]
    if not copy:
        return src
    dst = xt[part % xt.shape[0]]
    _copy_blocks(src, dst, copies, geo, 0, geo[0] // BLOCK)
    return dst


@pjit
def max_pool_blocked(x, out, kh, kw, sh, sw, ph, pw, dh, dw):
    """Max pooling in the blocked layout: x (B, CB, H, W, BLOCK), out (B, CB, Hout, Wout, BLOCK);
    padding counts as -inf (skipped), NaN wins a comparison as in torch, out's size from torch's
    formula. Each output is the lane-wise max of its window's vectors (``BLOCK`` channels at once,
    :func:`sparsecnn.kernels._simd.max_taps`); (image, channel block, output row) items in parallel."""
    nb, ncb, h, w, _ = x.shape
    hout, wout = out.shape[2], out.shape[3]
    for item in numba.prange(nb * ncb * hout):
        bc = item // hout
        oh = item - bc * hout
        b = bc // ncb
        flat = x[b, bc - b * ncb].reshape(-1)
        row = out[b, bc - b * ncb, oh].reshape(-1)
        taps = np.empty(kh * kw, dtype=np.int64)
        h0 = oh * sh - ph
        for ow in range(wout):
            w0 = ow * sw - pw
            n = 0
            for i in range(kh):
                hi = h0 + i * dh
                if 0 <= hi < h:
                    for j in range(kw):
                        wi = w0 + j * dw
                        if 0 <= wi < w:
                            taps[n] = (hi * w + wi) * BLOCK
                            n += 1
            max_taps(flat, 0, taps, n, row, ow * BLOCK)


@pjit
def global_avg_pool_blocked(x, out):
    """``out[b, cb * BLOCK + l] = mean_p x[b, cb, p, l]``: x (B, CB, P, BLOCK), out (B, CB * BLOCK)
    (which is also the blocked layout of a 1 x 1 output); (image, channel block) pairs in parallel."""
    nb, ncb, p, _ = x.shape
    for bc in numba.prange(nb * ncb):
        b = bc // ncb
        cb = bc - b * ncb
        src = x[b, cb]
        acc = np.zeros(BLOCK, dtype=np.float32)
        for q in range(p):
            for lane in range(BLOCK):
                acc[lane] += src[q, lane]
        for lane in range(BLOCK):
            out[b, cb * BLOCK + lane] = acc[lane] / np.float32(p)


def blocked_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``(B, C / BLOCK, H, W, BLOCK)`` of a plain ``(B, C, H, W)``."""
    b, c, h, w = shape
    return b, c // BLOCK, h, w, BLOCK


def blockable(shape: tuple[int, ...]) -> bool:
    """Whether a plain activation of ``shape`` can be blocked: 4-D with a channel count that is a
    multiple of ``BLOCK``."""
    return len(shape) == 4 and shape[1] % BLOCK == 0 and shape[1] > 0


def to_blocked_array(x: np.ndarray) -> np.ndarray:
    """A blocked copy of the plain float32 array ``x`` (B, C, H, W)."""
    b, c, h, w = x.shape
    out = np.empty(blocked_shape(x.shape), dtype=np.float32)
    src = np.ascontiguousarray(x, dtype=np.float32).reshape(b, c, h * w)
    to_blocked(src, out.reshape(b, c // BLOCK, h * w, BLOCK))
    return out


def from_blocked_array(x: np.ndarray) -> np.ndarray:
    """The plain array (B, C, H, W) of a blocked one (B, C / BLOCK, H, W, BLOCK)."""
    b, ncb, h, w, _ = x.shape
    out = np.empty((b, ncb * BLOCK, h, w), dtype=np.float32)
    from_blocked(np.ascontiguousarray(x).reshape(b, ncb, h * w, BLOCK), out.reshape(b, ncb * BLOCK, h * w))
    return out
