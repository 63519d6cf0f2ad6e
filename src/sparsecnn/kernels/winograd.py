r"""Winograd F(m x m, r x r): dense 3x3 and 5x5 stride-1 convolutions as small GEMMs (Lavin & Gray, 2016).

An m x m block of outputs of an r x r filter reads an (m + r - 1) x (m + r - 1) block of inputs ``d``;
in the transformed domain the block is one elementwise product per (input channel, filter),

.. math:: Y = A^T \Big[ \sum_c (G g_c G^T) \odot (B^T d_c B) \Big] A

so the r^2 m^2 multiply-adds of the direct form per channel pair become (m + r - 1)^2 (3x3 filters:
16 for 4 outputs with m = 2, 36 for 16 with m = 4; 5x5 filters: 64 for 16 outputs with m = 4, against
400), and the sum over input channels is one GEMM per point ``xi`` of the transformed tile:
``M[xi][t][f] = sum_c V[xi][c][t] U[xi][c][f]`` with ``U = G g G^T`` (the weights, transformed once)
and ``V = B^T d B`` (the input, transformed per call). The 3x3 matrices are Lavin and Gray's (points
0, +-1 for m = 2; 0, +-1, +-2 for m = 4: ``_simd.WINO_BT`` / ``WINO_AT`` and ``_G`` here); F(4x4,
5x5)'s come from :func:`sparsecnn.kernels._simd.toom_cook` over 0, +-1, +-2, +-1/2 (the points of the
usual F(6x6, 3x3)). Rounding: relative differences to torch's direct convolution of 2e-7 to 1e-6
with m = 2 and 3e-6 to 1.1e-5 with m = 4 on the tests' 3x3 layers, up to about 1e-5 on the 5x5 ones
(the project's tolerance is 1e-4). A NaN or infinite input spreads to the whole output tile of every
tile that reads it (the direct form: to the outputs whose window holds it), and an infinite one may
come out NaN.

**5x5 layers.** AlexNet's conv2 (96 -> 256 in two groups, 27x27) keeps 38% of its weights under
Deep Compression, so the sparse ``direct`` kernel does 0.38 of the dense multiply-adds, at about
two thirds of the FMA rate (docs/engine.md); F(4x4, 5x5) does 0.17 of them (64 / 400, the 27x27
plane as 7 x 7 tiles of 4 x 4) in dense GEMMs. Measured (``python -m benchmarks.strided_winograd
--layers conv2``, 2 threads, the layer alone, interleaved, medians): batch 1 0.655 ms against
`direct`'s 1.073 and torch's 1.912 (2.92x torch), batch 32 22.2 ms against 34.9 and 62.0 (2.79x);
F(3x3, 5x5) (7 x 7 tiles, 49 points per 9 outputs; a scratch A/B before the plain stores were
transposed) 0.84x / 0.81x as fast.
Under the ``ssl`` profile (0.46 of its columns x filters kept, structured) the same form ran 0.74 /
22.0 ms against the compact GEMM's 1.30 / 40.6 and `direct`'s 1.11 / 34.8, so the rule
(:func:`sparsecnn.kernels.implicit_gemm.winograd_tile`) asks 5x5 layers to keep less than 3x3 ones.

Layouts and loops (``VW`` channels in the vector lanes, as in :mod:`sparsecnn.kernels.blocked`):

- a plain input is first copied into the channel-blocked layout (channels past a group's zero); a
  blocked one is read as it is;
- work items are (group, chunk of up to ``WINO_TILES`` tiles, block of ``CHAN_BLOCK`` filters), in
  that order, the tiles spread evenly over the chunks (so the threads, which split the items evenly,
  get as many tiles each); a thread transforms a chunk when its first item needs it, into its own buffer
  (``(npt, Cg / VW, tg, VW)``, at most ``_CHUNK_BYTES``: it stays in the thread's L2): per channel
  block and row of tiles, the tile row's m + r - 1 input rows with their zero padding into a scratch,
  then :func:`sparsecnn.kernels._simd.wino_in_tile` (``wino4_in_tile``) per tile. A first version
  transformed the whole input up front, shared by the threads: the transformed input (4x the
  input's bytes with m = 2) went to L3 and back, and inside a ResNet pass the layers gained
  1.15-1.3x instead of the 1.35-1.45x they gained alone;
- the GEMMs run on :func:`sparsecnn.kernels._simd.chan_tile`, the channel form's micro-kernel
  (:mod:`sparsecnn.kernels.implicit_gemm`): ``CHAN_BLOCK`` filters in the lanes, up to ``CHAN_NP``
  tiles broadcast, the input channels as its columns (``U`` is ``(groups, nfb, npt, Cg,
  CHAN_BLOCK)``: an item's weights contiguous), in channel blocks of ``_CBLK`` whose weights stay in
  L1 while the chunk's tiles pass, each block's tiles prefetching the next block's weights into L2
  (in a forward pass they come from L3: 16/9 of the layer's weights with m = 2, 4x with m = 4);
- the item's results gather in a thread buffer (``M``, in L2), then
  :func:`sparsecnn.kernels._simd.wino_out_tile` (``wino4_out_tile``) turns each tile back into its
  outputs with the bias, the residual and the ReLU: whole-vector stores into a channel-blocked
  output; into a plain one, an F(4x4) tile as rows of up to 4 floats per filter
  (:func:`sparsecnn.kernels._simd.wino4_out_plain_tile`: the tile's vectors transposed in registers;
  partial tiles at the plane's edges and residuals too), an F(2x2) tile one scalar store per output.
  On AlexNet's conv1 at batch 32 the scalar stores had cost 9 of 31 ms.

Threads split the work items at small batches; with at least as many images as threads, each
thread runs its own images (:func:`sparsecnn.kernels.conv.split_by_image`). At batch 32 each thread
then reads a layer's transformed weights from L3 once per image (AlexNet's 256 -> 384 at 13x13:
6.3 MB per image): a GEMM blocked for L2 across images is not built.

Measured (``python -m benchmarks.winograd --layers``: Emerald Rapids, 2 threads, batch 1, dense layers,
blocked in and out, L2 flushed before each call, interleaved; two runs), against the channel form:
m = 2 at 56x56 / 28x28 / 14x14 1.35-1.87x, AlexNet's 13x13 1.41-1.47x, 7x7 1.11-1.16x; m = 4 at
56x56 / 28x28 1.76-2.38x, at 14x14 and 13x13 no better than m = 2 (1.27-1.67x), at 7x7 0.97-1.02x (16
tiles: too few to pay for 4x the weights). On the Zen 4 VM (8-wide vectors, 1 MiB L2), after the
chunks were made equal, two runs: m = 2 1.52-1.99x at 56x56 to 13x13 and 1.19-1.33x at 7x7; m = 4
2.31-2.78x at 56x56 / 28x28. Which m a layer gets:
:func:`sparsecnn.kernels.implicit_gemm.winograd_tile`. Whole models: docs/engine.md,
"fourteenth".
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from sparsecnn.kernels._numba import (
    aligned_empty,
    aligned_zeros,
    balanced_bounds,
    jit,
    pjit,
    serial_twin,
    thread_rows,
)
from sparsecnn.kernels._simd import (
    CHAN_BLOCK,
    CHAN_NP,
    VW,
    WINO_POINTS,
    chan_tile,
    copy_vec,
    prefetch_l2,
    tile_split,
    toom_cook,
    wino4_in_tile,
    wino4_out_plain_tile,
    wino4_out_tile,
    wino4r5_in_tile,
    wino4r5_out_plain_tile,
    wino4r5_out_tile,
    wino_in_tile,
    wino_out_tile,
)
from sparsecnn.kernels.conv import image_counter, next_image
from sparsecnn.kernels.space_to_depth import rearrange_image, space_to_depth_blocked

__all__ = ["FORMS", "WINO_TILES", "WinoWorkspace", "padded_bias", "winograd_conv2d", "winograd_weights",
           "winograd_workspace"]

# Tiles per work item: the item's results, one per point (16 or 36 x WINO_TILES x CHAN_BLOCK floats: 256
# or 576 KB), stay in L2 until its output transform.
WINO_TILES = 64
# Input channels per GEMM block: a 64-filter block's transformed weights (_CBLK x CHAN_BLOCK floats,
# 32 KB) stay in L1 while the item's tiles pass.
_CBLK = 128

# G of F(m x m, r x r), keyed by (m, r): U = G g G^T ((m + r - 1) x (m + r - 1) per filter and channel),
# the points of sparsecnn.kernels._simd.WINO_BT / WINO_AT.
_G = {
    (2, 3): np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]]),
    (4, 3): np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
}
_G.update({key: np.array(toom_cook(pts, *key)[1], dtype=np.float64) for key, pts in WINO_POINTS.items()})
# The (m, r) forms the kernel runs.
FORMS = tuple(_G)


def winograd_weights(weight: np.ndarray, groups: int, m: int = 2) -> np.ndarray:
    """The transformed filters ``U = G g G^T`` of F(m x m, r x r) in the GEMMs' layout.

    Parameters
    ----------
    weight : ndarray, shape (Cout, Cin / groups, r, r), float32
        ``r`` 3 or 5.
    groups : int
    m : int
        Outputs per tile side (``FORMS``): 2 (16 points) or 4 (36 points) for 3x3 filters, 4 (64
        points) for 5x5 ones.

    Returns
    -------
    ndarray, shape (groups, nfb, (m + r - 1) ** 2, cgp, CHAN_BLOCK), float32
        ``U[g, fb, xi, c, f]``: point ``xi`` of filter ``g * Cout / groups + fb * CHAN_BLOCK + f`` on
        input channel ``c`` of its group; zero past the filters and channels (``cgp``: ``Cin /
        groups`` rounded up to whole vectors, ``nfb`` blocks of ``CHAN_BLOCK`` filters per group).
        On cache lines (the GEMMs load whole-line weight vectors); a work item's weights (one filter
        block) are contiguous, in the order it reads them.
    """
    cout, cg = weight.shape[:2]
    fg = cout // groups
    nfb = -(-fg // CHAN_BLOCK)
    cgp = -(-cg // VW) * VW
    r = weight.shape[2]
    g_ = _G[m, r]
    npt = (m + r - 1) ** 2
    u = np.einsum("ai,fcij,bj->abfc", g_, weight.astype(np.float64), g_).reshape(npt, groups, fg, cg)
    full = np.zeros((groups, npt, nfb * CHAN_BLOCK, cgp), np.float32)
    full[:, :, :fg, :cg] = u.transpose(1, 0, 2, 3)
    out = aligned_empty((groups, nfb, npt, cgp, CHAN_BLOCK))
    out[...] = full.reshape(groups, npt, nfb, CHAN_BLOCK, cgp).transpose(0, 2, 1, 4, 3)
    return out


def padded_bias(bias: np.ndarray | None, cout: int, groups: int) -> np.ndarray:
    """``(groups * nfb * CHAN_BLOCK,)`` float32: each group's bias padded to whole filter blocks (the
    output transform adds one vector of it per ``VW`` filters); zeros without a bias."""
    fg = cout // groups
    nfb = -(-fg // CHAN_BLOCK)
    out = np.zeros((groups, nfb * CHAN_BLOCK), np.float32)
    if bias is not None:
        out[:, :fg] = np.asarray(bias, np.float32).reshape(groups, fg)
    return out.reshape(-1)


@dataclass(eq=False)
class WinoWorkspace:
    """Per input shape (and layouts): buffers and geometry of :func:`winograd_conv2d`."""

    geo: np.ndarray  # int64, indexed by the _H ... _CBLKF constants
    offs: np.ndarray  # (cgp,) int32: V offset of input channel c inside one point's GEMM input
    tpos: np.ndarray  # (tg + CHAN_NP,) int32: V offset of a chunk's tile j (j * VW)
    V: np.ndarray  # (nparts, npt * cgp * tg + VW): each thread's transformed chunk of tiles
    xb: np.ndarray  # (nbuf, groups * ncbk * H * W * VW + VW): a plain input in blocks (else (nbuf, 0))
    scratch: np.ndarray  # (nparts, (m + r - 1) * L * VW + VW): a tile row's padded input rows
    mbuf: np.ndarray  # (nparts, npt * S + VW): an item's GEMM results, one per point
    tmp: np.ndarray  # (nparts, m * m * VW): one tile's outputs on their way into a plain output
    zeros: np.ndarray  # (VW,)
    init: np.ndarray  # (CHAN_BLOCK,) zeros: the GEMMs start from zero (the bias comes at the end)
    bounds: np.ndarray  # (nparts + 1,) item ranges of the threads
    by_image: bool
    counter: np.ndarray  # conv.image_counter: where the threads take the images one at a time
    in_blocked: bool
    out_blocked: bool
    serial: bool  # one thread (a layer too small for a parallel launch)
    m: int  # outputs per tile side: F(m x m, r x r)
    r: int  # filter side
    zero_bias: np.ndarray  # (groups * nfb * CHAN_BLOCK,) zeros: the padded bias of a layer without one
    # space_to_depth.s2d_geometry of a strided layer's plain input, which the kernel rearranges into the
    # blocks of the 3x3 stride-1 layer this workspace is shaped for; (0,): an ordinary plain input
    s2d: np.ndarray


# geo fields
(_H, _W, _PH, _PW, _HO, _WO, _TH, _TW, _T, _L, _GROUPS, _CG, _NCBK, _CGP, _FG, _NFB, _TG, _NCHUNK, _S,
 _CBLKF, _M, _R) = range(22)

# Most bytes of one thread's transformed chunk (npt x cgp x tiles floats): it stays in L2 while the
# chunk's filter blocks run (1 MB: a 14x14 plane of 256 channels in one chunk with m = 2).
_CHUNK_BYTES = 1 << 20


def winograd_workspace(x_shape: tuple[int, int, int, int], weight_shape: tuple[int, int, int, int],
                       groups: int, padding: tuple[int, int], nparts: int, by_image: bool,
                       in_blocked: bool = False, out_blocked: bool = False,
                       serial: bool = False, m: int = 2, s2d: np.ndarray | None = None) -> WinoWorkspace:
    """The workspace of :func:`winograd_conv2d` for inputs of (plain) shape ``x_shape`` and F(m x m,
    r x r) (``r`` the filters' side; ``(m, r)`` one of ``FORMS``): threads split the images with
    ``by_image`` (else the work items of each image), one thread with ``serial``; ``in_blocked`` /
    ``out_blocked``: the input / output is channel-blocked. With ``s2d``
    (:func:`sparsecnn.kernels.space_to_depth.s2d_geometry` of a strided layer's plain input), ``x_shape``
    and ``weight_shape`` are the rearranged layer's (``padding`` (0, 0)) and the kernel rearranges each
    plain image of the strided layer into its blocks."""
    if serial:  # one thread running every image (and copying each plain one into its blocks)
        by_image, nparts = True, 1
    _, _, h, w = x_shape
    cout, cg, r = weight_shape[:3]
    if (m, r) not in _G or weight_shape[3] != r:
        raise ValueError(f"no Winograd F({m}x{m}, {r}x{weight_shape[3]}) form (FORMS: {FORMS})")
    ph, pw = padding
    ho, wo = h + 2 * ph - r + 1, w + 2 * pw - r + 1
    th, tw = -(-ho // m), -(-wo // m)
    npt = (m + r - 1) ** 2
    t = th * tw
    fg = cout // groups
    nfb = -(-fg // CHAN_BLOCK)
    ncbk = -(-cg // VW)
    cgp = ncbk * VW
    tg = max(1, min(t, WINO_TILES, _CHUNK_BYTES // (4 * npt * cgp)))
    nchunk = -(-t // tg)
    if not by_image and (groups * nfb * nchunk) % nparts:
        # as many chunks per thread (else one thread runs a whole item more)
        nchunk += nparts - nchunk % nparts
    # chunks of equal size: 196 tiles in chunks of at most 64 as 64 + 64 + 64 + 4 left one thread 128
    # tiles and the other 68 (ResNet's 56x56 layer with m = 4 ran 1.30x slower than as 4 x 49)
    tg = -(-t // nchunk)
    nchunk = -(-t // tg)
    s = tg * CHAN_BLOCK + VW  # one point's results, a vector apart from the next (no cache-set conflicts)
    el = m * tw + r - 1
    geo = np.array([h, w, ph, pw, ho, wo, th, tw, t, el, groups, cg, ncbk, cgp, fg, nfb, tg, nchunk, s,
                    min(_CBLK, cgp), m, r], dtype=np.int64)
    nbuf = nparts if by_image else 1
    c = np.arange(cgp)
    return WinoWorkspace(
        geo=geo,
        offs=((c // VW) * tg * VW + c % VW).astype(np.int32),
        tpos=(np.arange(tg + CHAN_NP) * VW).astype(np.int32),
        V=thread_rows(nparts, npt * cgp * tg + VW),
        xb=aligned_zeros((nbuf, 0 if in_blocked else groups * ncbk * h * w * VW + VW)),
        scratch=thread_rows(nparts, (m + r - 1) * el * VW + VW),
        mbuf=thread_rows(nparts, npt * s + VW),
        tmp=thread_rows(nparts, m * m * VW),
        zeros=np.zeros(VW, np.float32),
        init=np.zeros(CHAN_BLOCK, np.float32),
        bounds=balanced_bounds(np.ones(groups * nfb * nchunk, dtype=np.int64), nparts),
        by_image=by_image,
        counter=image_counter(by_image, nparts),
        in_blocked=in_blocked,
        out_blocked=out_blocked,
        serial=serial,
        m=m,
        r=r,
        zero_bias=np.zeros(groups * nfb * CHAN_BLOCK, np.float32),
        s2d=np.zeros(0, np.int64) if s2d is None else np.asarray(s2d, np.int64),
    )


@jit
def _to_blocks(x, xb, geo, gc):
    """Channel block ``gc`` (group ``gc // ncbk``) of one plain image ``x`` into ``xb``, blocked
    (channels past the group's zero)."""
    hw = geo[_H] * geo[_W]
    cg, ncbk = geo[_CG], geo[_NCBK]
    g = gc // ncbk
    cbk = gc - g * ncbk
    xoff = gc * hw * VW
    first = g * cg + cbk * VW
    nl = min(VW, cg - cbk * VW)
    zero = np.float32(0.0)
    for lane in range(VW):
        if lane < nl:
            plane = x[(first + lane) * hw:(first + lane + 1) * hw]
            for q in range(hw):
                xb[xoff + q * VW + lane] = plane[q]
        else:
            for q in range(hw):
                xb[xoff + q * VW + lane] = zero


@jit
def _transform_chunk(src, vb, sc, zeros, geo, g, c0, n):
    """Tiles ``c0 <= t < c0 + n`` of group ``g`` of one blocked image ``src``: per channel block and row
    of tiles, the ``m + r - 1`` padded input rows into ``sc``, then each tile's ``B^T d B`` into ``vb``
    (``(npt, ncbk, tg, VW)``: point, channel block, tile of the chunk, lane)."""
    h, w, ph, pw, tw, el, m, r = geo[_H], geo[_W], geo[_PH], geo[_PW], geo[_TW], geo[_L], geo[_M], geo[_R]
    ncbk, tg = geo[_NCBK], geo[_TG]
    row = el * VW
    vstride = ncbk * tg * VW
    for cbk in range(ncbk):
        xoff = (g * ncbk + cbk) * h * w * VW
        for ty in range(c0 // tw, (c0 + n - 1) // tw + 1):
            for i in range(m + r - 1):
                y = m * ty + i - ph
                so = i * row
                for c in range(el):
                    col = c - pw
                    if 0 <= y < h and 0 <= col < w:
                        copy_vec(src, xoff + (y * w + col) * VW, sc, so + c * VW)
                    else:
                        copy_vec(zeros, 0, sc, so + c * VW)
            for tx in range(max(0, c0 - ty * tw), min(tw, c0 + n - ty * tw)):
                dpos = (cbk * tg + ty * tw + tx - c0) * VW
                if r == 5:
                    wino4r5_in_tile(sc, 4 * tx * VW, row, vb, dpos, vstride)
                elif m == 4:
                    wino4_in_tile(sc, 4 * tx * VW, row, vb, dpos, vstride)
                else:
                    wino_in_tile(sc, 2 * tx * VW, row, vb, dpos, vstride)


@jit
def _out_tile(bf, mpos, s, bias, bpos, rb, has_res, relu, ob, dpos, rowstride, nx, ny, m, r):
    """The output transform of F(m x m, r x r) (:func:`sparsecnn.kernels._simd.wino_out_tile` and its
    siblings) for one tile of ``VW`` filters."""
    if r == 5:
        wino4r5_out_tile(bf, mpos, s, bias, bpos, rb, has_res, relu, ob, dpos, rowstride, nx, ny)
    elif m == 4:
        wino4_out_tile(bf, mpos, s, bias, bpos, rb, has_res, relu, ob, dpos, rowstride, nx, ny)
    else:
        wino_out_tile(bf, mpos, s, bias, bpos, rb, has_res, relu, ob, dpos, rowstride, nx, ny)


@jit
def _run_items(src, vb, u, offs, tpos, bias, ob, rb, has_res, relu, sc, zeros, bf, tmp, ini, geo, i0, i1,
               out_blocked):
    """Work items ``i0 <= item < i1`` (group, chunk of tiles, filter block; in that order) of one blocked
    image ``src``: a chunk's transform into ``vb`` when the items reach it, then per item its npt GEMMs
    into ``bf`` and each tile's output transform into ``ob`` (+ ``rb`` with ``has_res``; ReLU with
    ``relu``)."""
    ho, wo, tw, t, m, r = geo[_HO], geo[_WO], geo[_TW], geo[_T], geo[_M], geo[_R]
    npt = (m + r - 1) * (m + r - 1)
    fg, nfb, tg, nchunk, s, cblk, cgp = geo[_FG], geo[_NFB], geo[_TG], geo[_NCHUNK], geo[_S], geo[_CBLKF], \
        geo[_CGP]
    plane = ho * wo
    last = -1
    for item in range(i0, i1):
        gch = item // nfb
        fb = item - gch * nfb
        g = gch // nchunk
        c0 = (gch - g * nchunk) * tg
        n = min(tg, t - c0)
        if gch != last:
            _transform_chunk(src, vb, sc, zeros, geo, g, c0, n)
            last = gch
        nst = (n + CHAN_NP - 1) // CHAN_NP
        nf = min(CHAN_BLOCK, fg - fb * CHAN_BLOCK)
        nout = (nf + VW - 1) // VW
        wf = u[g, fb].reshape(-1)  # the item's weights, (npt, cgp, CHAN_BLOCK), in the order read
        for xi in range(npt):
            wx = wf[xi * cgp * CHAN_BLOCK:(xi + 1) * cgp * CHAN_BLOCK]
            base = xi * cgp * tg
            for k0 in range(0, cgp, cblk):
                k1 = min(cgp, k0 + cblk)
                # the next block's weights (the next ones in memory) into L2, a share before each tile
                pf0 = (xi * cgp + k1) * CHAN_BLOCK
                pfn = min((k1 - k0) * CHAN_BLOCK, wf.size - pf0)
                pstep = ((pfn + nst - 1) // nst + 15) // 16 * 16
                for st in range(nst):
                    for e in range(st * pstep, min((st + 1) * pstep, pfn), 16):
                        prefetch_l2(wf, pf0 + e)
                    j0, npx = tile_split(n, st, nst)
                    chan_tile(vb, offs, wx, k0, k1, base, tpos, j0, bf, xi * s + j0 * CHAN_BLOCK, CHAN_BLOCK,
                              VW, nout, npx, k0 > 0, ini, 0, bf, False, False)
        for j in range(n):
            tt = c0 + j
            ty = tt // tw
            oy = m * ty
            ox = m * (tt - ty * tw)
            nx = min(m, wo - ox)
            ny = min(m, ho - oy)
            for o in range(nout):
                bpos = (g * nfb + fb) * CHAN_BLOCK + o * VW
                first = g * fg + fb * CHAN_BLOCK + o * VW  # the vector's first output channel
                mpos = j * CHAN_BLOCK + o * VW
                if out_blocked:
                    _out_tile(bf, mpos, s, bias, bpos, rb, has_res, relu, ob,
                              ((first // VW * ho + oy) * wo + ox) * VW, wo * VW, nx, ny, m, r)
                elif m == 4:  # transposed in registers: rows of up to 4 floats per filter
                    d = first * plane + oy * wo + ox
                    nl = nf - o * VW
                    if r == 5:
                        wino4r5_out_plain_tile(bf, mpos, s, bias, bpos, relu, ob, d, wo, plane, nl, nx, ny,
                                               rb, has_res)
                    else:
                        wino4_out_plain_tile(bf, mpos, s, bias, bpos, relu, ob, d, wo, plane, nl, nx, ny, rb,
                                             has_res)
                else:  # F(2x2): through a scratch tile, one scalar store per output
                    _out_tile(bf, mpos, s, bias, bpos, tmp, False, False, tmp, 0, m * VW, m, m, m, r)
                    nl = min(VW, nf - o * VW)
                    for dy in range(ny):
                        for dx in range(nx):
                            d = first * plane + (oy + dy) * wo + ox + dx
                            src_ = (m * dy + dx) * VW
                            for lane in range(nl):
                                v = tmp[src_ + lane]
                                if has_res:
                                    v += rb[d + lane * plane]
                                # NaN kept, as torch.relu keeps it
                                ob[d + lane * plane] = v if not relu or not v <= 0 else np.float32(0.0)


@pjit
def _to_blocks_image(x, xb, geo, nparts):
    """Every channel block of one plain image ``x`` into ``xb``, thread ``part`` taking blocks ``part,
    part + nparts, ...``."""
    nblk = geo[_GROUPS] * geo[_NCBK]
    for part in numba.prange(nparts):
        for gc in range(part, nblk, nparts):
            _to_blocks(x, xb, geo, gc)


@pjit
def _wino_kernel(x, xb, v, u, offs, tpos, bias, out, res, has_res, relu, scratch, zeros, mbuf, tmp, ini, geo,
                 bounds, by_image, counter, in_blocked, out_blocked, s2d):
    """The work items of every image, parallel over balanced ranges of them (``bounds``); with
    ``by_image`` each thread runs every item of an image at a time instead (the next one free with a
    one-element ``counter``, else images ``part, part + nparts, ...``:
    :func:`sparsecnn.kernels.conv.next_image`), a plain image first copied into its own blocks
    (rearranged, with ``s2d``: :func:`sparsecnn.kernels.space_to_depth.rearrange_image`).
    Without it, a plain ``x`` is already in ``xb``
    (:func:`_to_blocks_image`, one image: ``x`` holds one)."""
    nb = out.shape[0]
    nparts = bounds.size - 1
    nblk = geo[_GROUPS] * geo[_NCBK]
    if counter.size:
        counter[0] = 0
    for part in numba.prange(nparts):
        i0 = bounds[0] if by_image else bounds[part]
        i1 = bounds[nparts] if by_image else bounds[part + 1]
        b = next_image(counter, -1, part, nparts, by_image)
        while b < nb:
            if in_blocked:
                src = x[b]
            elif by_image:
                src = xb[part]
                if s2d.size:
                    rearrange_image(x[b], src, s2d)
                else:
                    for gc in range(nblk):
                        _to_blocks(x[b], src, geo, gc)
            else:
                src = xb[0]
            _run_items(src, v[part], u, offs, tpos, bias, out[b], res[b], has_res, relu, scratch[part], zeros,
                       mbuf[part], tmp[part], ini, geo, i0, i1, out_blocked)
            b = next_image(counter, b, part, nparts, by_image)


_wino_kernel_serial = serial_twin(_wino_kernel)


def winograd_conv2d(u: np.ndarray, ws: WinoWorkspace, x: np.ndarray, bias: np.ndarray, out: np.ndarray,
                    relu: bool, res: np.ndarray | None = None) -> None:
    """``out = conv2d(x, W) + bias (+ res)`` (``relu(...)`` with ``relu``) for a 3x3 or 5x5 stride-1 layer.

    Parameters
    ----------
    u : ndarray
        :func:`winograd_weights` of the layer.
    ws : WinoWorkspace
        :func:`winograd_workspace` of ``x``'s shape and layouts.
    x : ndarray, shape (B, Cin * H * W), float32, C-contiguous
        Plain, or channel-blocked with ``ws.in_blocked``; with ``ws.s2d`` the strided layer's plain
        input (its shape, not the rearranged one's).
    bias : ndarray
        :func:`padded_bias` of the layer's bias.
    out : ndarray, shape (B, Cout * Hout * Wout), float32, C-contiguous
        Plain, or channel-blocked with ``ws.out_blocked``; written in full.
    relu : bool
    res : ndarray, shape of ``out``, optional
        Added before the ReLU (a residual connection), in ``out``'s layout; must not share memory with
        ``out``.
    """
    has_res = res is not None
    r = out if res is None else res
    kernel = _wino_kernel_serial if ws.serial else _wino_kernel
    args = (ws.V, u, ws.offs, ws.tpos, bias)
    tail = (has_res, relu, ws.scratch, ws.zeros, ws.mbuf, ws.tmp, ws.init, ws.geo, ws.bounds, ws.by_image,
            ws.counter, ws.in_blocked, ws.out_blocked, ws.s2d)
    if ws.in_blocked or ws.by_image:
        kernel(x, ws.xb, *args, out, r, *tail)
        return
    for b in range(out.shape[0]):  # a plain image into blocks (rearranged with s2d), then its items
        if ws.s2d.size:
            space_to_depth_blocked(x[b:b + 1], ws.xb[:1], ws.s2d)
        else:
            _to_blocks_image(x[b], ws.xb[0], ws.geo, ws.bounds.size - 1)
        kernel(x[b:b + 1], ws.xb, *args, out[b:b + 1], r[b:b + 1], *tail)
