"""Sparse x sparse convolution where the zeros of the input skip work (strategy ``spconv-act``).

Output-stationary over the output channels, input-sparse over the receptive field:

.. math::

    y[p, :] = \\sum_{(i, j)} \\sum_{c : x[c, q_{ij}(p)] \\neq 0} x[c, q_{ij}(p)] \\, W[:, c, i, j]

with ``q_ij(p)`` the input position under tap ``(i, j)`` of output pixel ``p``. The kept input
channels are cut into chunks of ``cc``; three passes:

1. **Lists per input position** (:func:`_position_lists`): for every input position ``q``, image,
   group and chunk, the channels with ``x[c, q] != 0`` and their values. Each input is read once,
   not once per tap as a lowered (im2col) gather reads it (9x on a 3x3 layer: the previous kernel's
   gather alone took 0.55 ms on AlexNet conv3).
2. **Lists per output pixel** (:func:`_pixel_lists`): per pixel and chunk, the position lists
   under its taps concatenated, each entry's weight row ``tap * cc + c`` (vector copies, no branch on the
   data). A 1x1 stride-1 layer skips this pass (its pixels are its positions).
3. **Register tiles over output channels** (:func:`_compute`): per tile of ``tile_width`` output
   channels, chunk by chunk, every pixel's list runs through one register tile
   (:func:`sparsecnn.kernels._simd.span_tile`): per nonzero input, one broadcast and one vector FMA
   per 8 channels against a contiguous weight row.

The work is (input density) x (kept channels) x taps x Cout per pixel: ReLU zeros and SSL's removed
input channels skip work; zero weights inside a kept row do not (a row is dense over the tile's
channels, which is what keeps the inner loop a vector FMA). So it beats a weight-sparse kernel
(:mod:`sparsecnn.kernels.conv`, work x weight density) only where the input has more zeros than
the weights have, and the report says so.

What bounds it: each nonzero input reads a weight row of ``tile_width`` floats once, so the rows must
come from L1: a chunk's rows (``taps * cc * tile_width`` floats, ~28 KB) are reused by every pixel
of the image before the next chunk. Streamed from L2 (one tile's rows for all channels, the first
version of this layout) the same loop ran at 0.7 FMA a cycle, and the per-pixel lists of the
previous kernel, built by an im2col-like gather, cost as much as the arithmetic. Measured (Zen 4,
2 threads, batch 1, AlexNet conv3-5 at Deep Compression's 63-65% weight sparsity, 70% input zeros):
0.85 / 0.70 / 0.56 ms against the weight-only direct kernel's 0.90 / 0.72 / 0.51 ms and torch's
1.34 / 1.05 / 0.72 ms (the previous kernel: 2.39 / 1.55 / 1.47 ms). Passes 1-2 and the channels-last
to NCHW copy take 0.15-0.24 ms of that; the FMA loop runs at about the direct kernel's rate.

The lists are sized for a dense input (taps x kept channels per output pixel and chunk): a batch
whose lists would pass ``_WORKSPACE_BUDGET`` (256 MB) runs a slice of images at a time.

Storage (``SpconvPrep``): ``wt (groups, ntiles, nchunks, taps, cc, tile_width)`` float32 and
``chan_map (groups, Cg)`` int32 (input channel -> kept index, -1 where the channel's weights are
all zero).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np

from sparsecnn.kernels._numba import as_aligned, num_threads, pjit
from sparsecnn.kernels._simd import NV_MAX, VW, copy_vec, copy_vec_add, span_tile

__all__ = ["SpconvPrep", "bind_spconv_input", "images_per_pass", "input_list_nbytes", "prepare_spconv",
           "spconv_input"]

# Output channels per register tile (vectors), and bytes of one chunk's weight rows (cc channels x
# taps x tile width): the rows every pixel of the image reuses, so they should stay in a 32 KB L1.
# Measured (Zen 4, 2 threads, AlexNet conv3-5 at 70% input zeros, interleaved, two runs): 6 vectors
# and 28 KB (cc = 16 on a 3x3 layer) 0.79 / 0.61 / 0.48 ms; 8 vectors and 20 KB (cc = 8) 0.84 /
# 0.82 / 0.64 ms (half the chunk: twice the list merges, shorter lists per tile); 4-5 vectors and
# 7 vectors at 32 KB were no better than 6. Six vectors also keep two accumulator sets (SPLIT_MAX).
# Kept at 48 floats with 16-wide vectors (three zmm): 96-float tiles (cc = 8) ran AlexNet conv3-5
# 1.2-1.7x slower on Emerald Rapids (2 threads, 70% input zeros, interleaved).
_TILE_FLOATS = 48
_CHUNK_BYTES = 28 * 1024


def _layout(taps: int, ck: int, mg: int) -> tuple[int, int, int]:
    """``(tile_width, ntiles, cc)`` for ``taps`` taps, ``ck`` kept channels, ``mg`` channels per group:
    tiles of whole vectors, about equal, at most ``_TILE_FLOATS`` wide; chunks of ``cc`` channels whose
    rows fit ``_CHUNK_BYTES``."""
    mp = -(-max(mg, 1) // VW) * VW
    ntiles = -(-mp // (min(max(_TILE_FLOATS // VW, 1), NV_MAX) * VW))
    tw = -(-mp // (ntiles * VW)) * VW
    cc = max(1, min(max(ck, 1), _CHUNK_BYTES // (4 * taps * tw)))
    if cc >= VW:  # whole vectors: the list merge copies a chunk's slots as vectors
        cc = cc // VW * VW
    return tw, ntiles, cc


@dataclass(frozen=True, eq=False)
class SpconvPrep:
    """Weight rows per output-channel tile and input-channel chunk: what :func:`spconv_input` reads.

    Attributes
    ----------
    wt : ndarray, shape (groups, ntiles, nchunks, taps, cc, tile_width), float32
        ``wt[g, t, h, tap, r, m]`` is the weight of output channel ``g * Mg + t * tile_width + m`` on
        kept input channel ``h * cc + r`` of group g at tap ``i * kw + j``; zero past ``Mg`` and past
        the kept channels.
    chan_map : ndarray, shape (groups, Cg), int32
        Input channel of group g -> its kept index, or -1 when all its weights are zero.
    weight_shape : tuple of int
        ``(Cout, Cin/groups, kh, kw)``.
    """

    wt: np.ndarray
    chan_map: np.ndarray
    weight_shape: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        # the kernel loads whole weight rows (tile_width floats, whole vectors): on cache lines
        object.__setattr__(self, "wt", as_aligned(self.wt))

    def __setstate__(self, state: dict) -> None:  # copies and unpickled preps too (no __post_init__)
        self.__dict__.update(state)
        self.__post_init__()

    @functools.cached_property
    def chan_of(self) -> np.ndarray:
        """``(groups, kept)`` int32: the input channel of each kept index (the inverse of chan_map)."""
        out = np.zeros((self.chan_map.shape[0], max(self.wt.shape[2] * self.wt.shape[4], 1)), np.int32)
        for g, row in enumerate(self.chan_map):
            chans = np.flatnonzero(row >= 0)
            out[g, row[chans]] = chans
        return out

    @functools.cached_property
    def nkept(self) -> np.ndarray:
        """``(groups,)`` int64: kept input channels per group."""
        return (self.chan_map >= 0).sum(axis=1).astype(np.int64)

    @property
    def nbytes(self) -> int:
        """Exact bytes held: the padded weight rows, the channel map and its inverse (``chan_of``)."""
        groups, _, nchunks, _, cc, _ = self.wt.shape
        return int(self.wt.nbytes + self.chan_map.nbytes + 4 * groups * max(nchunks * cc, 1))

    def to_dense(self) -> np.ndarray:
        """The dense weight ``(Cout, Cin/groups, kh, kw)``."""
        cout, cg, kh, kw = self.weight_shape
        groups, ntiles, nchunks, taps, cc, tw = self.wt.shape
        mg = cout // groups
        rows = self.wt.transpose(0, 1, 5, 2, 4, 3).reshape(groups, ntiles * tw, nchunks * cc, taps)[:, :mg]
        w = np.zeros((groups, mg, cg, taps), np.float32)
        for g in range(groups):
            chans = np.flatnonzero(self.chan_map[g] >= 0)
            w[g][:, chans] = rows[g][:, self.chan_map[g][chans]]
        return w.reshape(cout, cg, kh, kw)

    def check_format(self) -> None:
        cout, cg, kh, kw = self.weight_shape
        groups, ntiles, nchunks, taps, cc, tw = self.wt.shape
        assert self.wt.dtype == np.float32 and self.chan_map.dtype == np.int32
        assert self.chan_map.shape == (groups, cg) and taps == kh * kw
        assert tw % VW == 0 and ntiles * tw >= cout // groups
        for g in range(groups):
            kept = self.chan_map[g][self.chan_map[g] >= 0]
            assert (kept == np.arange(kept.size)).all() and kept.size <= nchunks * cc


def prepare_spconv(weight: np.ndarray, groups: int) -> SpconvPrep:
    """Build the tiled, chunked weight rows of a dense float32 weight ``(Cout, Cin/g, kh, kw)``."""
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    cout, cg, kh, kw = weight.shape
    mg = cout // groups
    taps = kh * kw
    w = weight.reshape(groups, mg, cg, taps)
    keep = (w != 0).any(axis=(1, 3))  # (g, Cg): input channels with a nonzero weight
    ck = int(keep.sum(axis=1).max()) if keep.size else 0
    tw, ntiles, cc = _layout(taps, ck, mg)
    nchunks = -(-ck // cc)
    wt = np.zeros((groups, ntiles, nchunks, taps, cc, tw), np.float32)
    chan_map = np.full((groups, cg), -1, np.int32)
    for g in range(groups):
        chans = np.flatnonzero(keep[g])
        chan_map[g, chans] = np.arange(chans.size, dtype=np.int32)
        rows = np.zeros((ntiles * tw, nchunks * cc, taps), np.float32)
        rows[:mg, : chans.size] = w[g][:, chans]
        wt[g] = rows.reshape(ntiles, tw, nchunks, cc, taps).transpose(0, 2, 4, 3, 1)
    return SpconvPrep(wt, chan_map, (cout, cg, kh, kw))


def _pixels_are_positions(geometry: tuple[int, ...], in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """Whether output pixel p reads input position p alone (a 1x1 kernel, stride 1, no padding): then
    the position lists are the pixel lists."""
    kh, kw, sh, sw, ph, pw = geometry[:6]
    return (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0) and tuple(in_hw) == tuple(out_hw)


# Most bytes the lists and the accumulator of one pass may hold: a batch that needs more runs in slices
# of images (the lists are sized for a dense input, taps x channels per output pixel: VGG-16's 224x224
# layers at batch 32 would hold 8 GB at once).
_WORKSPACE_BUDGET = 256 << 20


def _per_image_nbytes(prep: SpconvPrep, in_hw: tuple[int, int], out_hw: tuple[int, int],
                      geometry: tuple[int, ...]) -> tuple[int, int]:
    """``(list bytes, accumulator bytes)`` of one image."""
    groups, _, nchunks, taps, cc, _ = prep.wt.shape
    lists = groups * nchunks
    npos = in_hw[0] * in_hw[1]
    npix = out_hw[0] * out_hw[1]
    positions = lists * npos * (8 * cc + 8)
    if _pixels_are_positions(geometry, in_hw, out_hw):  # no merged lists: a start per position list
        merged = lists * npos * 8
    else:
        merged = lists * (8 * (npix * taps * cc + cc) + 16 * npix)
    return positions + merged, 4 * npix * prep.weight_shape[0]


def images_per_pass(prep: SpconvPrep, batch: int, in_hw: tuple[int, int], out_hw: tuple[int, int],
                    geometry: tuple[int, ...]) -> int:
    """Images :func:`spconv_input` runs at once: the whole batch, or as many as fit
    ``_WORKSPACE_BUDGET`` (at least one)."""
    per = sum(_per_image_nbytes(prep, in_hw, out_hw, geometry))
    return max(1, min(batch, _WORKSPACE_BUDGET // max(per, 1)))


def input_list_nbytes(prep: SpconvPrep, batch: int, in_hw: tuple[int, int], out_hw: tuple[int, int],
                      geometry: tuple[int, ...]) -> int:
    """Bytes of the input side as :func:`spconv_input` holds it for one input shape: the position lists
    (channel index and value per slot, a count per list) and the merged lists per output pixel, for
    the images of one pass (:func:`images_per_pass`)."""
    return int(images_per_pass(prep, batch, in_hw, out_hw, geometry)
               * _per_image_nbytes(prep, in_hw, out_hw, geometry)[0])


@pjit
def _position_lists(x, chan_of, nkept, stride, offs, vals, counts):
    """``offs/vals[bg, h, q, :counts[bg, h, q]]``: the nonzero inputs of image b, group g (``bg = b *
    groups + g``) at input position q among kept channels ``h * cc <= r < (h + 1) * cc``, as
    ``(r - h * cc) * stride`` (``stride``: the tile width, so the entry is where the channel's weight
    row starts) and value, channel-ordered. One task per (image, group, block of 16 positions):
    the block's inputs of every channel (one cache line each) stay in L1 while each position walks
    its channels with the count in a register; every slot is written and the count advances past
    the nonzeros only (ReLU inputs are about half zeros: a branch on the value mispredicts).
    NOTE: offs, vals are (B * groups, nchunks, H * W, cc); counts (B * groups, nchunks, H * W);
    chan_of[g, r] is the channel of kept index r < nkept[g]."""
    nb, cin = x.shape[:2]
    groups = chan_of.shape[0]
    cg = cin // groups
    nchunks, npos, cc = offs.shape[1:]
    nblk = -(-npos // 16)
    xf = x.reshape(nb, cin, npos)
    for task in numba.prange(nb * groups * nblk):
        bg = task // nblk
        q0 = (task - bg * nblk) * 16
        b = bg // groups
        g = bg - b * groups
        src = xf[b, g * cg:(g + 1) * cg]
        kept = nkept[g]
        for q in range(q0, min(q0 + 16, npos)):
            for hc in range(nchunks):
                o = offs[bg, hc, q]
                v_ = vals[bg, hc, q]
                r0 = hc * cc
                n = 0
                for r in range(min(cc, kept - r0)):
                    v = src[chan_of[g, r0 + r], q]
                    o[n] = r * stride
                    v_[n] = v
                    n += v != 0.0
                counts[bg, hc, q] = n


@pjit
def _pixel_lists(offs, vals, counts, geom, h, w, wout, tw, loffs, lvals, lstart, lcounts):
    """The merged list of output pixel p in chunk hc: the position lists under its taps, each entry's
    offset ``(tap * cc + r) * tw`` (where its weight row starts in the chunk), at
    ``loffs/lvals[lstart[bg, hc, p]:]``, ``lcounts[bg, hc, p]`` long. The lists of one (image, group,
    chunk) are packed back to back in its region of ``P * taps * cc + cc`` slots (a sparse input
    touches few cache lines). Every tap copies all ``cc`` slots (whole vectors when cc is a multiple
    of 8) and advances by its count: no branch on the data; the region's last ``cc`` slots take what
    the last copy writes past its list.
    NOTE: loffs, lvals are flat, (B * groups * nchunks) regions; lstart, lcounts (B * groups, nchunks, P)."""
    nbg, nchunks, _, cc = offs.shape
    kh, kw, sh, sw, ph, pw, dh, dw = geom[0], geom[1], geom[2], geom[3], geom[4], geom[5], geom[6], geom[7]
    npix = lcounts.shape[2]
    region = npix * kh * kw * cc + cc
    vec = cc % VW == 0
    for task in numba.prange(nbg * nchunks):
        bg = task // nchunks
        hc = task - bg * nchunks
        o = offs[bg, hc]
        v = vals[bg, hc]
        of = o.reshape(o.size)
        vf = v.reshape(v.size)
        cnt = counts[bg, hc]
        n = task * region
        for p in range(npix):
            n0 = n
            oh = p // wout
            ow = p - oh * wout
            for i in range(kh):
                ih = oh * sh - ph + i * dh
                if ih < 0 or ih >= h:
                    continue
                for j in range(kw):
                    iw = ow * sw - pw + j * dw
                    if iw < 0 or iw >= w:
                        continue
                    q = ih * w + iw
                    add = np.int32((i * kw + j) * cc * tw)
                    if vec:
                        for r in range(0, cc, VW):
                            copy_vec_add(of, q * cc + r, loffs, n + r, add)
                            copy_vec(vf, q * cc + r, lvals, n + r)
                    else:
                        for r in range(cc):
                            loffs[n + r] = o[q, r] + add
                            lvals[n + r] = v[q, r]
                    n += cnt[q]
            lstart[bg, hc, p] = n0
            lcounts[bg, hc, p] = n - n0


@pjit
def _compute(wt, loffs, lvals, lstart, lcounts, nblk, acc):
    """``acc[b, p, g*Mg + m] = sum_chunks sum_n lvals[n] * wt[g, tile, chunk, loffs[n], m]`` over the
    list of each output pixel and chunk (``lstart``, ``lcounts``); one task per (image, group, tile,
    pixel block), chunk by chunk, each chunk's weight rows reused by the block's pixels from L1.
    NOTE: acc is (B, P, Cout) with Cout = groups * Mg."""
    groups, ntiles, nchunks, taps, cc, tw = wt.shape
    nb, npix, cout = acc.shape
    mg = cout // groups
    blk = -(-npix // nblk)
    rows = taps * cc * tw  # floats of one chunk's rows
    wflat = wt.reshape(wt.size)
    aflat = acc.reshape(acc.size)
    for task in numba.prange(nb * groups * ntiles * nblk):
        pb = task % nblk
        rest = task // nblk
        tile = rest % ntiles
        bg = rest // ntiles
        b = bg // groups
        g = bg - b * groups
        nvalid = min(mg - tile * tw, tw)
        nvt = -(-nvalid // VW)  # the last tile may need fewer vectors (its others hold no channel)
        for hc in range(nchunks):
            wbase = ((g * ntiles + tile) * nchunks + hc) * rows
            for p in range(pb * blk, min(npix, (pb + 1) * blk)):
                k0 = lstart[bg, hc, p]
                pos = (b * npix + p) * cout + g * mg + tile * tw
                span_tile(wflat, loffs, lvals, k0, k0 + lcounts[bg, hc, p], wbase, aflat, pos, nvt, nvalid,
                          np.float32(0.0), hc > 0, 1, False)


@pjit
def _to_nchw(acc, bias, has_bias, relu, out):
    """``out[b, m, p] = acc[b, p, m] (+ bias[m])``, then ReLU (NaN kept) when ``relu``.
    NOTE: out is (B, Cout, P)."""
    nb, npix, cout = acc.shape
    for t in numba.prange(nb * cout):
        b = t // cout
        m = t - b * cout
        bv = bias[m] if has_bias else np.float32(0.0)
        for p in range(npix):
            v = acc[b, p, m] + bv
            if relu and not v > 0.0 and v == v:
                v = np.float32(0.0)
            out[b, m, p] = v


def spconv_input(prep: SpconvPrep, x: np.ndarray, geometry: tuple[int, ...], bias: np.ndarray | None,
                 out: np.ndarray, ws: dict, relu: bool = False) -> None:
    """The convolution of ``x`` skipping its zeros (and the removed input channels).

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
        Workspace for this input shape (filled on first use): the position lists and the
        channels-last accumulator.
    relu : bool
        ``max(out, 0)`` (NaN kept, as torch.relu) on the result.
    """
    nb, cout, hout, wout = out.shape
    _, _, h, w = x.shape
    groups, ntiles, nchunks, _, cc, _ = prep.wt.shape
    npix = hout * wout
    if "offs" not in ws:
        sub = images_per_pass(prep, nb, (h, w), (hout, wout), geometry)
        ws["sub"] = sub
        lists = (sub * groups, nchunks, h * w, cc)
        ws["offs"] = np.empty(lists, np.int32)
        ws["vals"] = np.empty(lists, np.float32)
        ws["counts"] = np.empty(lists[:3], np.int64)
        nlists = sub * groups * nchunks
        if _pixels_are_positions(geometry, (h, w), (hout, wout)):  # 1x1, stride 1: no merge needed
            ws["loffs"], ws["lvals"] = ws["offs"].reshape(-1), ws["vals"].reshape(-1)
            ws["lcounts"] = ws["counts"]
            ws["lstart"] = (np.arange(nlists * h * w, dtype=np.int64) * cc).reshape(lists[:3])
        else:
            taps = prep.wt.shape[3]
            ws["loffs"] = np.empty(nlists * (npix * taps * cc + cc), np.int32)
            ws["lvals"] = np.empty(nlists * (npix * taps * cc + cc), np.float32)
            ws["lstart"] = np.empty((sub * groups, nchunks, npix), np.int64)
            ws["lcounts"] = np.empty((sub * groups, nchunks, npix), np.int64)
        # a tile past the group's last channel loads (and stores back) lanes past the end
        ws["acc"] = np.empty(sub * npix * cout + prep.wt.shape[5], np.float32)[: sub * npix * cout].reshape(
            sub, npix, cout)
        ws["geom"] = np.asarray(geometry, np.int64)
        # pixel blocks: at least two tasks per thread, so a slow tile does not leave a thread idle
        ws["nblk"] = max(1, min(npix, -(-2 * num_threads() // max(sub * groups * ntiles, 1))))
    has_bias = bias is not None
    b = bias if has_bias else np.zeros(0, np.float32)
    sub = ws["sub"]
    tw = prep.wt.shape[5]
    out3 = out.reshape(nb, cout, npix)
    for b0 in range(0, nb, sub):
        b1 = min(nb, b0 + sub)
        acc = ws["acc"][: b1 - b0]
        if nchunks == 0 or ntiles == 0:  # every weight zero: the output is the bias
            acc.fill(0.0)
        else:
            xs = x[b0:b1]
            n = (b1 - b0) * groups  # lists of a short last slice: the first rows of the workspace
            _position_lists(xs, prep.chan_of, prep.nkept, tw, ws["offs"][:n], ws["vals"][:n],
                            ws["counts"][:n])
            if ws["lcounts"] is not ws["counts"]:
                _pixel_lists(ws["offs"][:n], ws["vals"][:n], ws["counts"][:n], ws["geom"], h, w, wout, tw,
                             ws["loffs"], ws["lvals"], ws["lstart"][:n], ws["lcounts"][:n])
            _compute(prep.wt, ws["loffs"], ws["lvals"], ws["lstart"][:n], ws["lcounts"][:n], ws["nblk"], acc)
        _to_nchw(acc, b, has_bias, bool(relu), out3[b0:b1])


def bind_spconv_input(prep: SpconvPrep, x_shape: tuple[int, ...], bias: np.ndarray | None, out: np.ndarray,
                      relu: bool = False, *, geometry: tuple[int, ...]) -> Callable[[np.ndarray], None]:
    """``run(x)``: :func:`spconv_input` ``(prep, x, geometry, bias, out, ws, relu)`` for inputs of
    ``x_shape``, every argument but ``x`` bound once (the whole-model executor's steps), with its own
    workspace: call it from the thread that bound it (the executor binds per thread).

    Parameters
    ----------
    prep : SpconvPrep
    x_shape : tuple of int
        ``(B, Cin, H, W)``.
    bias : ndarray, shape (Cout,), float32, or None
    out : ndarray, shape (B, Cout, Hout, Wout), float32, C-contiguous
    relu : bool
    geometry : tuple of int
        ``(kh, kw, sh, sw, ph, pw, dh, dw)``.
    """
    if not out.flags.c_contiguous or out.ndim != 4 or out.shape[:2] != (x_shape[0], prep.weight_shape[0]):
        raise ValueError(f"bind_spconv_input: out must be C-contiguous (B, Cout, Hout, Wout) for {x_shape}, "
                         f"got {out.shape}")
    ws: dict = {}
    relu = bool(relu)

    def run(x: np.ndarray) -> None:
        spconv_input(prep, x, geometry, bias, out, ws, relu)

    return run
