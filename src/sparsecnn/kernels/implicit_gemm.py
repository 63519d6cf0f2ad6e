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
input in L1); a whole layer 70-77% of that on one thread. A 1x1 stride-1 layer keeping every
filter, whose planes are whole vectors, stores its tiles straight into the output (``straight``: no
wide rows, no crop; the residual and ReLU applied to the tile just finished).

**The channel-vector form** (:func:`_chan_kernel`, :func:`sparsecnn.kernels._simd.chan_tile`) turns
the roles: ``CHAN_BLOCK`` (64) output channels in ``CHAN_OB`` (4) vectors, ``CHAN_NP`` (6) output
positions broadcast, as oneDNN's and ONNX Runtime's (MLAS) NCHWc convolutions hold them. Each column
costs four aligned weight loads and six broadcasts for 24 FMAs, and no load crosses a cache line
whatever the plane's width; channel blocks of ``_CHAN_WBYTES`` of weights (16 channels of a 3x3
layer) stay in L1 for a group of up to ``_CHAN_POSITIONS`` positions. The tiles hold output positions
only: each broadcast reads its position's own input offset (``_tile_positions``; a base register per
position, set before the column loop, so the loop is unchanged), where tiles of consecutive wide-row
positions computed the padding columns too (7x7 planes of ResNet-50's 3x3 layers: 11 tiles of 63
wide positions against 9 of 49; 14x14: 12.5% fewer). While a channel block's tiles run, each
prefetches its share of the next block's weights into L2 (``prefetch_l2``): a layer whose weights
come from memory (ResNet-50's layer4: 9.4 MB per 3x3 layer) otherwise stalls on the first tile of
every block. Measured (single dense layers, blocked in and out, 2 threads, interleaved): 512 at 7x7
1.15-1.20x, 256 at 14x14 1.07-1.09x, 128 at 28x28 1.03-1.07x, 56x56 and 1x1 layers within noise;
whole models in ``benchmarks.positions``. Where the threads split the items and the filter blocks
do not divide evenly between them, each gets as many position groups (56x56 on 2 threads: 34 groups
of 93 positions, not 16 and 17 of 96). Its results are position-major:
into the plain layout they are transposed (a scalar store per output), into the channel-blocked
layout (:mod:`sparsecnn.kernels.blocked`) they are whole-vector stores, straight from the registers
where the wide rows have no padding columns (1x1 stride 1; the others go through the buffer: straight
for every layer measured 0.987x on dense ResNet-50). It reads either layout too (the blocked input's 16
channels of a position in one cache line). Plain in and out it is used for stride-1 layers with
taps around the pixel and at least 64 kept filters per group (3x3 layers 1.03-1.33x the spatial
form; 1x1 layers 0.6-0.8x: their short columns do not pay for the transpose); the executor runs
it blocked for chains of dense layers (:mod:`sparsecnn.engine._layout`). Measured (dense ResNet-50
shapes, 2 threads, interleaved, plain in and out / blocked in and out, ms): 1x1 256 -> 64 at 56x56
0.473 / 0.391, 1024 -> 256 at 14x14 0.479 / 0.358, 3x3 stride 2 from 56x56 1.55 / 1.22, 1x1 stride 2
1.43 / 1.13, 3x3 layers 3-7% apart. Channel blocks of 36 KB against 16 KB: 1.04-1.09x on one thread.

**Winograd** (:mod:`sparsecnn.kernels.winograd`): a 3x3 or 5x5 stride-1 layer that kept at least
``_WINO_MIN_WORK`` of its filters x columns and has planes of at least ``_WINO_MIN_TILES`` output
tiles runs F(m x m, r x r) on its dense weight instead (:func:`winograd_tile`: 3x3 filters m = 4 on
56x56 and 28x28 planes, 2 on 14x14 and 13x13, none on 7x7; 5x5 filters m = 4 from about 21x21), in
either layout: 1.4-1.8x the channel form on dense ResNet layers (the measurements are in that module
and docs/engine.md, "fourteenth"). A 5x5 layer that Deep Compression left 38% dense (AlexNet's conv2)
does fewer multiply-adds this way (64 / 400) than the sparse kernels (0.38), so `lowered` is the
planner's choice there (the layer alone 1.6x `direct`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numba
import numpy as np

from sparsecnn.kernels._numba import (
    aligned_empty,
    aligned_zeros,
    balanced_bounds,
    jit,
    num_threads,
    pjit,
    serial_twin,
    thread_rows,
)
from sparsecnn.kernels._simd import (
    CHAN_BLOCK,
    CHAN_NP,
    GEMM_MR,
    GEMM_NV,
    VW,
    add_vec_act,
    chan_tile,
    copy_vec_act,
    gemm_tile,
    prefetch_l2,
    tile_split,
)
from sparsecnn.kernels.blocked import (
    BLOCK,
    blocked_phase_copy,
    blocked_phase_copy_serial,
    image_input_blocked,
)
from sparsecnn.kernels.conv import (
    _L1_BYTES,
    _L2_BYTES,
    ConvPrepBase,
    _add_residual,
    _crop,
    _reads_in_place,
    _residual,
    image_counter,
    image_input,
    next_image,
    phase_copy,
    phase_copy_serial,
    phase_layout,
    split_by_image,
)
from sparsecnn.kernels.space_to_depth import s2d_geometry, s2d_stride, s2d_weight
from sparsecnn.kernels.winograd import (
    WinoWorkspace,
    padded_bias,
    winograd_conv2d,
    winograd_weights,
    winograd_workspace,
)

__all__ = ["ImplicitGemmPrep", "bind_implicit_gemm_conv2d", "implicit_gemm_conv2d", "prepare_implicit_gemm",
           "strided_winograd_tile", "winograd_tile"]

# Below this many multiply-adds per call a bound layer runs the serial twin (no parallel launch).
_SERIAL_MACS = 1 << 16
# Strided layers through Winograd over their space-to-depth input (kernels.space_to_depth) also where the
# threads split the images (the A/B switch). AlexNet DC at batch 32, conv1 so against `direct`, same plan,
# interleaved (`python -m benchmarks.strided_winograd --batches 32`, builds balanced; `--no-by-image` turns
# it off): first the layer alone 1.01-1.45x but the compiled model 0.987x (off); once Winograd stored
# whole tiles into a plain output by in-register transposes (9 of conv1's 31 ms had been scalar stores)
# the layer alone 1.20-1.33x and the compiled model 1.082-1.090x in three runs (on).
S2D_BY_IMAGE = True
# Off: every layer walks all its columns per register tile (the A/B baseline of the channel blocks).
BLOCKS = True
# Register tiles per plane from which a stride-1 layer runs in channel blocks (see _build_workspace).
_BLOCK_MIN_TILES = 16
# The channel-vector form (_chan_kernel): None picks it by the rule in _use_channel_form, True / False
# force it on / off (the A/B switch).
CHANNEL_FORM: bool | None = None
# Winograd F(m x m, r x r) (:mod:`sparsecnn.kernels.winograd`) for 3x3 and 5x5 stride-1 layers: None picks
# it by the rule in winograd_tile, True / False force it on (where the layer is 3x3 or 5x5, stride 1) / off
# (the A/B switch).
WINOGRAD: bool | None = None
# The rule: Winograd where the implicit GEMM would do at least this fraction of the dense layer's
# multiply-adds (its kept columns x kept filters): Winograd does 16 / 36 (m = 2) or 36 / 144 (m = 4) of
# them, in GEMMs about as fast per multiply-add as the channel form's, plus the transforms.
_WINO_MIN_WORK = 0.55
# ... and for 5x5 layers, where F(4x4, 5x5) does 64 / 400 of the dense multiply-adds: AlexNet's conv2
# under the ssl profile keeps 0.46 (its compact GEMM 1.30 / 40.6 ms at batch 1 / 32, `direct` 1.11 /
# 34.8, Winograd 0.74 / 22.0; 2 threads, interleaved).
_WINO5_MIN_WORK = 0.3
# ... and where a plane has at least this many output tiles (m = 4 where it has as many 4x4 tiles, else
# 2x2): each transformed weight (16/9 of the layer's weights with m = 2, 4x with m = 4, from L3 in a
# forward pass) serves every tile of a plane. On 7x7 planes (16 2x2 tiles) F(2x2) ran 0.8x the channel
# form inside ResNet-18 (1.0-1.2x alone, its weights warm); on 14x14 (16 4x4 tiles) F(4x4) ran 0.94-0.97x
# F(2x2).
_WINO_MIN_TILES = 32
# Channel-vector form: bytes of one channel block's weights (read from L1 by every register tile of a
# position group; 36 KB: 16 channels of a 3x3 layer, measured 1.04-1.09x 16 KB) and the most output positions
# per group.
_CHAN_WBYTES = 36 << 10
_CHAN_POSITIONS = 96
# Off: stride-1 layers without padding crop wide rows into the output as the others (the A/B baseline).
STRAIGHT = True
# Channel form: tiles of output positions only (on) or of every wide-row position, padding columns
# included (off: the A/B baseline).
VALID_POSITIONS = True
# Channel form, straight 1x1 layers: items ordered (position group, filter block), so the threads split
# the positions and each reads only its share of the input (split by filters, each read all of it, half
# written by the other core: 1.17x slower inside a pass than alone, docs/engine.md "thirteenth").
# Dense ResNet-50, blocked, paired (python -m benchmarks.winograd --switch positions-first): 1.033x,
# after Winograd made layer1's 3x3 layers split their positions too. Off: the A/B baseline (filter
# block first).
STRAIGHT_POSITIONS_FIRST = True
# Channel form: each channel block's tiles prefetch the next block's weights into L2 (off: the A/B baseline).
CHAN_PREFETCH = True


@dataclass(eq=False)
class _Workspace:
    offsets: np.ndarray  # (groups, Kr) span offset of each kept column in one image's phase planes
    xt: np.ndarray  # (B, ...) each image's phase planes; (nparts, ...) with by_image: each thread's copy
    geo: np.ndarray  # PhaseLayout.geometry of the input shape
    wide: np.ndarray  # (nparts, GEMM_MR * gstride) wide output rows of the thread's current tile
    gstride: int
    bounds: np.ndarray  # (nparts + 1,) ranges of (group, tile) items
    by_image: bool  # threads split the batch's images (conv.split_by_image), each running every item
    counter: np.ndarray  # conv.image_counter: where the threads take the images one at a time
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
    in_place: bool = False  # the layout is x itself (stride 1, no padding): see conv._reads_in_place
    straight: bool = False  # _blocked_kernel writes the tiles straight into the output (see there)
    identity: bool = False  # in place, no lane read past the last plane
    init: np.ndarray | None = None  # (nparts, CHAN_BLOCK) the channel form's bias of the current block
    pstride: int = 1  # channel form: floats between positions of the input (BLOCK: blocked layout)
    qpos: np.ndarray | None = None  # channel form: input offset of each tile position (_tile_positions)
    wrow: int = 0  # channel form: positions per row of qpos (wout: output positions; wph: wide rows)
    prefetch: bool = False  # channel form: tiles prefetch the next channel block's weights (CHAN_PREFETCH)
    out_blocked: bool = False  # channel form: writes the channel-blocked layout
    posfirst: bool = False  # channel form: items ordered position group first (STRAIGHT_POSITIONS_FIRST)


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
    _chan: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)
    _wino: dict[int, np.ndarray] | None = field(default=None, init=False, repr=False)

    def __setstate__(self, state: dict) -> None:
        # copies and unpickled preps rebuild the channel form's and Winograd's weights on first use, on
        # cache lines
        self.__dict__.update(state)
        self._chan = None
        self._wino = None

    def _build_workspace(self, x_shape: tuple[int, int, int, int], nparts: int, in_blocked: bool = False,
                         out_blocked: bool = False) -> _Workspace | WinoWorkspace:
        """The workspace for inputs of (plain) shape ``x_shape``; with ``in_blocked`` / ``out_blocked``
        (``workspace(x_shape, in_blocked, out_blocked)``) the channel form's, reading / writing the
        channel-blocked layout (:mod:`sparsecnn.kernels.blocked`)."""
        b, cin = x_shape[:2]
        _, cin_g, kh, kw = self.weight_shape
        lay = phase_layout(x_shape, (kh, kw), self.stride, self.padding, self.dilation)
        off, macs = self._column_offsets(lay, cin)
        macs *= b
        m = _use_winograd(self, x_shape, nparts)
        if m and _s2d(self) is not None:
            if not in_blocked:  # (a blocked input is a 3x3 stride-1 layer's: never one of these)
                return self._s2d_workspace(x_shape, nparts, out_blocked, m, macs < _SERIAL_MACS)
            m = 0
        if m:
            return winograd_workspace(x_shape, self.weight_shape, self.groups, self.padding, nparts,
                                      split_by_image(b, nparts), in_blocked, out_blocked,
                                      serial=macs < _SERIAL_MACS, m=m)
        ntiles = self.data.shape[1]
        cost = np.repeat(self.ncols + 1, ntiles)  # an item's cost: its columns (+1: the crop)
        bounds = balanced_bounds(cost, nparts, ntiles)  # on group edges where near
        nvec = -(-lay.span // VW)
        # A serial layer copies its input inside the kernel, as the threads do when they split the
        # images: one numba call instead of two (each ~2 us of dispatch on LeNet-5's layers).
        by_image = split_by_image(b, nparts) or macs < _SERIAL_MACS
        if in_blocked or out_blocked or _use_channel_form(self, lay.span):
            return self._chan_workspace(x_shape, nparts, lay, off, by_image, macs, in_blocked, out_blocked)
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
        # straight: wide rows that are the output rows (1x1: an unpadded kxk layer read in place has
        # rows of W > Wout floats, and its tiles would overrun the output), spans of whole vectors
        straight = (STRAIGHT and lay.in_place and lay.wph == lay.wout and lay.span % VW == 0
                    and _consecutive_tiles(self.rows))
        nblk = -(-cin_g // cb) if BLOCKS and (lay.nph > 1 or many_tiles or straight) else 1
        cb = -(-cin_g // nblk)
        kchan = self.cols // (kh * kw)
        kblk = np.zeros((self.groups, nblk + 1), dtype=np.int64)
        for gi in range(self.groups):
            kblk[gi] = np.searchsorted(kchan[gi, : self.ncols[gi]], np.arange(nblk + 1) * cb)
        if straight:
            # whole register tiles of positions whose input (all channels) fits half of L2
            tile = GEMM_NV * VW
            group = max(tile, _L2_BYTES // (4 * cin) // tile * tile)
            gstride = 0
            wide = np.zeros((nparts, 1), dtype=np.float32)
            kernel = _blocked_kernel_serial if macs < _SERIAL_MACS else _blocked_kernel
        elif nblk > 1:
            rows = max((_L2_BYTES // (4 * cin * lay.nph) - lay.halo) // lay.wph,
                       -(-GEMM_NV * VW // lay.wph), 1)
            group = min(rows, lay.hout) * lay.wph
            gstride = group + 2 * VW
            items = ntiles * self.groups if by_image else int(np.diff(bounds).max(initial=0))
            wide = thread_rows(nparts, GEMM_MR * max(items, 1) * gstride)
            kernel = _blocked_kernel_serial if macs < _SERIAL_MACS else _blocked_kernel
        else:
            group = lay.span
            gstride = nvec * VW + 2 * VW
            wide = thread_rows(nparts, GEMM_MR * gstride)
            kernel = _implicit_kernel_serial if macs < _SERIAL_MACS else _implicit_kernel
        return _Workspace(
            offsets=off,
            xt=aligned_zeros(lay.xt_shape(nparts if by_image else b, cin, self.padding[1])),
            wide=wide,
            gstride=gstride,
            bounds=bounds,
            by_image=by_image,
            counter=image_counter(by_image, nparts),
            **self._layout_fields(lay, x_shape),
            kernel=kernel,
            kblk=kblk,
            group=group,
            identity=lay.in_place and lay.span % VW == 0,
            straight=straight,
        )


    def _chan_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The channel form's weights ``(groups, nblocks, Kr, CHAN_BLOCK)`` (``[g, ob, k, f]``: filter
        ``ob * CHAN_BLOCK + f`` of group ``g`` on kept column ``k``, zero for padding) and their output
        channels ``(groups, nblocks * CHAN_BLOCK)`` (-1 for padding); built once, on first use."""
        if self._chan is None:
            g, ntiles, kr, _ = self.data.shape
            nf = ntiles * GEMM_MR
            nob = -(-nf // CHAN_BLOCK)
            by_filter = np.zeros((g, nob * CHAN_BLOCK, kr), dtype=np.float32)
            by_filter[:, :nf] = self.data.transpose(0, 1, 3, 2).reshape(g, nf, kr)
            rows = np.full((g, nob * CHAN_BLOCK), -1, dtype=np.int64)
            rows[:, :nf] = self.rows
            packed = by_filter.reshape(g, nob, CHAN_BLOCK, kr).transpose(0, 1, 3, 2)
            wch = aligned_empty(packed.shape)  # whole-line weight loads (see the module docstring)
            wch[...] = packed
            self._chan = (wch, rows)
        return self._chan

    def _s2d_workspace(self, x_shape: tuple[int, int, int, int], nparts: int, out_blocked: bool, m: int,
                       serial: bool) -> WinoWorkspace:
        """The Winograd workspace of a strided layer run as the 3x3 stride-1 layer over its space-to-depth
        input (:mod:`sparsecnn.kernels.space_to_depth`; the kernel rearranges each plain image)."""
        b = x_shape[0]
        geo = s2d_geometry(x_shape, self.weight_shape[2:], self.stride, self.padding)
        c2, hs, ws_ = int(geo[9]), int(geo[7]), int(geo[8])
        return winograd_workspace((b, c2, hs, ws_), (self.weight_shape[0], c2, 3, 3), 1, (0, 0), nparts,
                                  split_by_image(b, nparts), False, out_blocked, serial=serial, m=m, s2d=geo)

    def _wino_weights(self, m: int) -> np.ndarray:
        """The layer's filters transformed for Winograd F(m x m, r x r)
        (:func:`sparsecnn.kernels.winograd.winograd_weights`), from the dense weight these tiles hold
        (zero where a filter or column was dropped), rearranged first for a strided layer that runs
        over its space-to-depth input (:func:`sparsecnn.kernels.space_to_depth.s2d_weight`); built
        once per ``m``, on first use."""
        cache = self._wino if self._wino is not None else {}
        if m not in cache:
            stride = _s2d(self)
            w = self.to_dense() if stride is None else s2d_weight(self.to_dense(), stride)
            # a new dict, assigned whole: a thread reading self._wino meanwhile sees the old one, complete
            cache = {**cache, m: winograd_weights(w, self.groups, m)}
            self._wino = cache
        return cache[m]

    def to_dense(self) -> np.ndarray:
        """The dense weight ``(Cout, Cin / groups, kh, kw)`` these tiles hold (zeros where a filter or a
        column was dropped)."""
        cout, cin_g, kh, kw = self.weight_shape
        g, ntiles, kr, _ = self.data.shape
        mg = cout // g
        dense = np.zeros((g, mg, cin_g * kh * kw), np.float32)
        rows = self.data.transpose(0, 1, 3, 2).reshape(g, ntiles * GEMM_MR, kr)
        for gi in range(g):
            keep = np.flatnonzero(self.rows[gi] >= 0)
            k = self.ncols[gi]
            filters = self.rows[gi, keep] - gi * mg
            dense[gi][np.ix_(filters, self.cols[gi, :k])] = rows[gi][np.ix_(keep, np.arange(k))]
        return dense.reshape(cout, cin_g, kh, kw)

    def blockable(self, out: bool) -> bool:
        """Whether this layer can read (``out`` False) or write (``out`` True) the channel-blocked
        layout: one group; channel counts a multiple of ``BLOCK``; to write it, every filter kept
        in order (no output channel left to its bias)."""
        cout, cin_g, _, _ = self.weight_shape
        if self.groups != 1:
            return False
        if not out:
            return cin_g % BLOCK == 0
        return cout % BLOCK == 0 and self.fill.size == 0 and _consecutive_tiles(self.rows)

    def _layout_fields(self, lay, x_shape: tuple[int, int, int, int]) -> dict:
        """The workspace fields that come from the input's phase layout."""
        return dict(geo=lay.geometry(x_shape), copies=lay.copies, phases=lay.phases, hph=lay.hph, wph=lay.wph,
                    hout=lay.hout, wout=lay.wout, span=lay.span,
                    zero_bias=np.zeros(self.weight_shape[0], np.float32), in_place=lay.in_place)

    def _column_offsets(self, lay, cin: int) -> tuple[np.ndarray, int]:
        """The span offset of every kept column in one image's phase planes (int32 where it fits,
        also blocked) and the multiply-adds per image."""
        _, cin_g, kh, kw = self.weight_shape
        ci, rs = np.divmod(self.cols, kh * kw)
        r, s = np.divmod(rs, kw)
        c = np.arange(self.groups)[:, None] * cin_g + ci
        off = lay.offsets(c, r, s)
        off[np.arange(self.cols.shape[1])[None, :] >= self.ncols[:, None]] = 0
        per_image = cin * lay.nph * lay.plane * BLOCK
        off_dtype = np.int32 if per_image <= np.iinfo(np.int32).max else np.int64
        macs = int(self.ncols.sum()) * self.data.shape[1] * GEMM_MR * lay.span
        return np.ascontiguousarray(off, dtype=off_dtype), macs

    def _chan_workspace(self, x_shape: tuple[int, int, int, int], nparts: int, lay, offsets: np.ndarray,
                        by_image: bool, macs: int, in_blocked: bool = False,
                        out_blocked: bool = False) -> _Workspace:
        """The workspace of :func:`_chan_kernel`: items are (group, filter block, position group); channel
        blocks of ``_CHAN_WBYTES`` of weights, position groups of at most ``_CHAN_POSITIONS``. With
        ``in_blocked`` the offsets address blocked phase planes (:mod:`sparsecnn.kernels.blocked`)."""
        b, cin = x_shape[:2]
        _, cin_g, kh, kw = self.weight_shape
        if in_blocked:
            # plain c * nph * plane + rest  ->  ((c // BLOCK) * nph * plane + rest) * BLOCK + c % BLOCK
            chan = lay.nph * lay.plane
            c = self.cols // (kh * kw)
            rest = offsets.astype(np.int64) - c * chan
            blk = (c // BLOCK * chan + rest) * BLOCK + c % BLOCK
            blk[np.arange(self.cols.shape[1])[None, :] >= self.ncols[:, None]] = 0
            offsets = np.ascontiguousarray(blk, dtype=offsets.dtype)
        wch, _ = self._chan_weights()
        nob = wch.shape[1]
        qpos = _tile_positions(lay, BLOCK if in_blocked else 1)
        ngrp = -(-qpos.size // _CHAN_POSITIONS)
        if not by_image and (self.groups * nob) % nparts and ngrp % nparts:
            # the threads split the items: as many position groups per thread (else one does a whole
            # group more: 17 of 96 positions against 16 and a part at 56x56 on 2 threads)
            ngrp += nparts - ngrp % nparts
        group = -(-qpos.size // ngrp)
        ngrp = -(-qpos.size // group)
        cb = max(1, _CHAN_WBYTES // (4 * CHAN_BLOCK * kh * kw))
        if cb >= BLOCK:  # whole blocks of channels: a blocked input's block is one line per position
            cb -= cb % BLOCK
        nblk = -(-cin_g // cb)
        kchan = self.cols // (kh * kw)
        kblk = np.zeros((self.groups, nblk + 1), dtype=np.int64)
        for gi in range(self.groups):
            kblk[gi] = np.searchsorted(kchan[gi, : self.ncols[gi]], np.arange(nblk + 1) * cb)
        npos = np.minimum(group, qpos.size - np.arange(ngrp) * group)  # positions of each group
        straight = out_blocked and lay.wph == lay.wout
        posfirst = straight and STRAIGHT_POSITIONS_FIRST
        if posfirst:  # items (group, position group, filter block)
            cost = ((self.ncols + 1)[:, None, None] * npos[None, :, None]).repeat(nob, axis=2).reshape(-1)
        else:  # items (group, filter block, position group)
            cost = ((self.ncols + 1)[:, None, None] * npos[None, None, :]).repeat(nob, axis=1).reshape(-1)
        bounds = balanced_bounds(cost, nparts, cost.size // self.groups)  # on group edges where near
        nbuf, size = lay.xt_shape(nparts if by_image else b, cin, self.padding[1])
        return _Workspace(
            offsets=offsets,
            xt=aligned_zeros((nbuf, size * BLOCK if in_blocked else size)),
            wide=thread_rows(nparts, (group + CHAN_NP) * CHAN_BLOCK),
            gstride=0,
            bounds=bounds,
            by_image=by_image,
            counter=image_counter(by_image, nparts),
            **self._layout_fields(lay, x_shape),
            kernel=_chan_kernel_serial if macs < _SERIAL_MACS else _chan_kernel,
            kblk=kblk,
            group=group,
            identity=lay.in_place,  # chan_tile reads no position past the span
            init=thread_rows(nparts, CHAN_BLOCK),  # written per item: a cache line per thread
            pstride=BLOCK if in_blocked else 1,
            qpos=qpos,
            wrow=lay.wout if VALID_POSITIONS else lay.wph,
            out_blocked=out_blocked,
            straight=straight,
            prefetch=CHAN_PREFETCH,
            posfirst=posfirst,
        )


def _consecutive_tiles(rows: np.ndarray) -> bool:
    """Whether every 4-filter tile of ``rows`` (groups, ntiles * GEMM_MR) writes four consecutive output
    channels (a dense layer's tiles, not SSL's kept subsets or padding rows)."""
    r = rows.reshape(rows.shape[0], -1, GEMM_MR)
    return bool((r[..., 0] >= 0).all() and (r == r[..., :1] + np.arange(GEMM_MR)).all())


def winograd_tile(kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int], cin_g: int,
                  out_hw: tuple[int, int], kept_fraction: float) -> int:
    """The output tile side ``m`` of the Winograd F(m x m, r x r) form a ``lowered`` layer runs
    (:mod:`sparsecnn.kernels.winograd`), or 0 for none. Only 3x3 and 5x5, stride 1, no dilation;
    forced by ``WINOGRAD`` (True: 3x3 filters 4 where an output plane has at least ``_WINO_MIN_TILES``
    4x4 tiles, else 2; 5x5 filters 4), else where each group has at least a vector of input channels,
    the kept columns x kept filters are at least ``_WINO_MIN_WORK`` (5x5 layers: ``_WINO5_MIN_WORK``)
    of the dense layer's (``kept_fraction``: SSL's compact layers with fewer run the implicit GEMM on
    what they kept), and
    an output plane has at least ``_WINO_MIN_TILES`` tiles: 3x3 filters 4 where it has as many 4x4
    tiles (56x56 and 28x28 planes), else 2; 5x5 filters 4 where it has as many 4x4 tiles (AlexNet's
    27x27: 49), else none. The planner's cost model asks it too."""
    if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1) or WINOGRAD is False:
        return 0
    ho, wo = out_hw
    if tuple(kernel) == (5, 5):  # F(4x4, 5x5)
        m = 4
        if not WINOGRAD and -(-ho // 4) * -(-wo // 4) < _WINO_MIN_TILES:
            return 0
    elif tuple(kernel) != (3, 3):
        return 0
    elif -(-ho // 4) * -(-wo // 4) >= _WINO_MIN_TILES:
        m = 4
    elif WINOGRAD or -(-ho // 2) * -(-wo // 2) >= _WINO_MIN_TILES:
        m = 2
    else:
        return 0
    least = _WINO5_MIN_WORK if tuple(kernel) == (5, 5) else _WINO_MIN_WORK
    return m if WINOGRAD or (cin_g >= VW and kept_fraction >= least) else 0


def _s2d(prep: ImplicitGemmPrep) -> tuple[int, int] | None:
    """The stride of a strided layer that rearranges into a 3x3 stride-1 one over its space-to-depth
    input (:func:`sparsecnn.kernels.space_to_depth.s2d_stride`), else None."""
    return s2d_stride(prep.weight_shape[2:], prep.stride, prep.dilation, prep.groups)


def strided_winograd_tile(kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                          groups: int, cin_g: int, out_hw: tuple[int, int], kept_fraction: float, batch: int,
                          nparts: int) -> int:
    """The Winograd tile side ``m`` of a strided layer that rearranges into a 3x3 stride-1 one over its
    space-to-depth input (:mod:`sparsecnn.kernels.space_to_depth`), or 0: :func:`winograd_tile` of that
    layer (``Cin * sh * sw`` channels); where the ``nparts`` threads split the ``batch``'s images only
    with ``S2D_BY_IMAGE`` (on: AlexNet's conv1 at batch 32 1.33x ``direct`` alone, the compiled model
    1.08x). The planner's cost model asks it too."""
    s = s2d_stride(kernel, stride, dilation, groups)
    if s is None or (not S2D_BY_IMAGE and split_by_image(batch, nparts)):
        return 0
    return winograd_tile((3, 3), (1, 1), (1, 1), cin_g * s[0] * s[1], out_hw, kept_fraction)


def _use_winograd(prep: ImplicitGemmPrep, x_shape: tuple[int, int, int, int],
                  nparts: int | None = None) -> int:
    """:func:`winograd_tile` of ``prep`` on inputs of ``x_shape`` (``nparts`` threads, default numba's
    count); for a strided layer that rearranges into a 3x3 stride-1 one (:func:`_s2d`),
    :func:`strided_winograd_tile`."""
    cout, cin_g, kh, kw = prep.weight_shape
    kept = int(((prep.rows >= 0).sum(axis=1) * prep.ncols).sum()) / (cout * cin_g * kh * kw)
    out_hw = prep.output_shape(x_shape)[2:]
    if _s2d(prep) is not None:
        return strided_winograd_tile((kh, kw), prep.stride, prep.dilation, prep.groups, cin_g, out_hw, kept,
                                     x_shape[0], num_threads() if nparts is None else nparts)
    return winograd_tile((kh, kw), prep.stride, prep.dilation, cin_g, out_hw, kept)


def _use_channel_form(prep: ImplicitGemmPrep, span: int) -> bool:
    """Whether a layer runs in the channel-vector form (:func:`_chan_kernel`): forced by
    ``CHANNEL_FORM``, else for stride-1 layers with more than one tap where every group keeps at
    least one whole block of ``CHAN_BLOCK`` filters (fewer would leave lanes empty). The 1x1 layers
    keep the spatial form (their short columns do not pay for the transpose into the output planes),
    as do stride-2 layers (the phase planes' broadcasts; measured mixed, see the module docstring)."""
    if CHANNEL_FORM is not None:
        return CHANNEL_FORM
    _, _, kh, kw = prep.weight_shape
    kept = (prep.rows >= 0).sum(axis=1)
    return kh * kw > 1 and prep.stride == (1, 1) and bool(kept.min() >= CHAN_BLOCK)


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
                         relu: bool = False, residual: np.ndarray | None = None) -> None:
    """``out = conv2d(x, W) + bias (+ residual)`` (``relu(...)`` with ``relu``) by implicit GEMM over the
    kept columns.

    Parameters
    ----------
    prep : ImplicitGemmPrep
    x : ndarray, shape (B, Cin, H, W), float32
    bias : ndarray, shape (Cout,), float32, or None
    out : ndarray, shape (B, Cout, Hout, Wout), float32, C-contiguous
        Written in full.
    relu : bool
    residual : ndarray, shape (B, Cout, Hout, Wout), float32, optional
        Added to the convolution before the ReLU (a residual connection); must not share memory with
        ``out``.
    """
    _check_out(prep, x.shape, out)
    ws = prep.workspace(x.shape)
    res = None if residual is None else _residual(residual, out, "implicit_gemm_conv2d")
    _launch(prep, ws, x, _bias_for(prep, ws, bias), out.reshape(x.shape[0], -1), bool(relu), res=res)


def bind_implicit_gemm_conv2d(prep: ImplicitGemmPrep, x_shape: tuple[int, int, int, int],
                              bias: np.ndarray | None, out: np.ndarray, relu: bool = False,
                              slack: int = 0, in_blocked: bool = False,
                              out_blocked: bool = False) -> Callable[..., None]:
    """``run(x)``: :func:`implicit_gemm_conv2d` for inputs of ``x_shape`` with every other argument bound
    once (the whole-model executor's steps); ``run(x, res)`` adds the residual ``res`` as its
    ``residual`` does (C-contiguous float32 of the output's shape, not sharing memory with ``out``: not
    checked per call). Uses the calling thread's workspace of ``prep``, so it must be called from the
    thread that bound it.

    Parameters
    ----------
    prep : ImplicitGemmPrep
    x_shape : tuple of int, (B, Cin, H, W)
    bias : ndarray, shape (Cout,), float32, or None
    out : ndarray, shape (B, Cout, Hout, Wout), float32, C-contiguous
    relu : bool
    slack : int
        Float32 elements that every ``x`` is followed by in memory (the executor's buffers have
        ``SLACK``): a stride-1 layer without padding then reads ``x`` in place, as
        :func:`sparsecnn.kernels.conv.bind_direct_conv2d` does.
    in_blocked, out_blocked : bool
        ``x`` (and ``res``), ``out`` hold the channel-blocked layout of their shapes
        (:mod:`sparsecnn.kernels.blocked`; the layer must be :meth:`ImplicitGemmPrep.blockable`).
        Either runs the channel-vector form.

    Returns
    -------
    callable
        ``run(x)`` with ``x`` of shape ``x_shape``, float32.
    """
    x_shape = tuple(int(v) for v in x_shape)
    _check_out(prep, x_shape, out)
    if (in_blocked and not prep.blockable(False)) or (out_blocked and not prep.blockable(True)):
        raise ValueError("bind_implicit_gemm_conv2d: this layer cannot read or write the channel-blocked "
                         "layout (see ImplicitGemmPrep.blockable)")
    variant = (in_blocked, out_blocked) if in_blocked or out_blocked else ()  # plain: the unbound call's
    ws = prep.workspace(x_shape, *variant)
    b = _bias_for(prep, ws, bias)
    flat = out.reshape(x_shape[0], -1)
    relu = bool(relu)

    nb = x_shape[0]

    def run(x: np.ndarray, res: np.ndarray | None = None) -> None:
        _launch(prep, ws, x, b, flat, relu, slack, None if res is None else res.reshape(nb, -1))

    return run


def _bias_for(prep: ImplicitGemmPrep, ws: _Workspace | WinoWorkspace, bias: np.ndarray | None) -> np.ndarray:
    """The bias as the workspace's kernel reads it: float32 (Cout,), padded to whole filter blocks per
    group for Winograd; zeros for none."""
    if bias is None:
        return ws.zero_bias
    if isinstance(ws, WinoWorkspace):
        return padded_bias(bias, prep.weight_shape[0], prep.groups)
    return np.ascontiguousarray(bias, dtype=np.float32)


def _check_out(prep: ImplicitGemmPrep, x_shape: tuple[int, ...], out: np.ndarray) -> None:
    want = prep.output_shape(tuple(x_shape))
    if not out.flags.c_contiguous or out.shape != want:
        raise ValueError(f"implicit_gemm_conv2d: out must be C-contiguous of shape {want}")


def _launch(prep: ImplicitGemmPrep, ws: _Workspace | WinoWorkspace, x: np.ndarray, bias: np.ndarray,
            flat: np.ndarray, relu: bool, slack: int = 0, res: np.ndarray | None = None) -> None:
    """The kernel (serial twin below a work threshold). A stride-1 layer without padding reads ``x``
    in place where it may (:func:`sparsecnn.kernels.conv._reads_in_place`, ``slack`` floats known to
    follow it). Else, where the threads split the items, one parallel phase copy of the batch comes
    first; where they split the images, each thread phase-copies its own inside the kernel. ``res``
    (B, Cout * Hout * Wout), when given, is added before the ReLU."""
    xc = x if x.flags.c_contiguous else np.ascontiguousarray(x)
    xc = xc.reshape(xc.shape[0], -1)
    if isinstance(ws, WinoWorkspace):  # bias padded to whole filter blocks (padded_bias)
        winograd_conv2d(prep._wino_weights(ws.m), ws, xc, bias, flat, relu, res)
        return
    copy = ws.by_image
    if _reads_in_place(ws, xc, slack):
        copy = False
    elif not ws.by_image:
        serial = ws.kernel in (_implicit_kernel_serial, _blocked_kernel_serial, _chan_kernel_serial)
        if ws.pstride > 1:
            (blocked_phase_copy_serial if serial else blocked_phase_copy)(xc, ws.xt, ws.copies, ws.geo)
        else:
            (phase_copy_serial if serial else phase_copy)(xc, ws.xt, ws.copies, ws.geo)
        xc = ws.xt
    tail = (relu, ws.by_image, ws.counter, flat, False) if res is None else (relu, ws.by_image, ws.counter,
                                                                              res, True)
    if ws.init is not None:
        wch, rows = prep._chan_weights()
        ws.kernel(xc, ws.xt, ws.copies, ws.geo, copy, ws.offsets, wch, ws.kblk, rows, prep.fill, bias,
                  flat, ws.hout, ws.wout, ws.wide, ws.init, ws.bounds, ws.qpos, ws.wrow, ws.group, *tail,
                  ws.pstride, ws.out_blocked, ws.straight, ws.prefetch, ws.posfirst)
    elif ws.kernel is _blocked_kernel or ws.kernel is _blocked_kernel_serial:
        ws.kernel(xc, ws.xt, ws.copies, ws.geo, copy, ws.offsets, prep.data, ws.kblk, prep.rows, prep.fill,
                  bias, flat, ws.hout, ws.wout, ws.wide, ws.gstride, ws.bounds, ws.wph, ws.span, ws.group,
                  *tail, ws.straight)
    else:
        ws.kernel(xc, ws.xt, ws.copies, ws.geo, copy, ws.offsets, prep.data, prep.ncols, prep.rows,
                  prep.fill, bias, flat, ws.hout, ws.wout, ws.wide, ws.gstride, ws.bounds, ws.wph, ws.span,
                  *tail)


@jit
def _fill_bias(dst, fill, bias, plane, relu, res, has_res):
    """The planes of the output channels ``fill`` that no kept filter writes: their bias, plus the
    residual at the same place with ``has_res`` (a filter pruned whole still passes the residual
    connection through), then ``max(v, 0)`` (NaN kept, as torch.relu) with ``relu``."""
    for q in range(fill.size):
        b = bias[fill[q]]
        base = fill[q] * plane
        for j in range(plane):
            v = b + res[base + j] if has_res else b
            dst[base + j] = v if not relu or not v <= 0 else np.float32(0.0)


@jit(inline="always")
def _tile_bias(bias, rr):
    """The bias of each of a tile's ``GEMM_MR`` (4) output channels ``rr`` (0 for a padding row, -1)."""
    zero = np.float32(0.0)
    return (bias[rr[0]] if rr[0] >= 0 else zero, bias[rr[1]] if rr[1] >= 0 else zero,
            bias[rr[2]] if rr[2] >= 0 else zero, bias[rr[3]] if rr[3] >= 0 else zero)


@pjit
def _implicit_kernel(x, xt, copies, geo, copy, offs, data, ncols, rows, fill, bias, out, hout, wout, wide,
                     gstride, bounds, wph, span, relu, by_image, counter, res, has_res):
    """Implicit GEMM, parallel over balanced ranges of (group, 4-filter tile) items: image after image,
    item after item walks its register tiles over all kept columns (the item's weights stay in L1)
    and crops. With ``by_image`` the threads split the images instead, each running every item on an
    image at a time (:func:`sparsecnn.kernels.conv.next_image`). With ``copy`` each thread
    phase-copies its image into its own planes (:func:`sparsecnn.kernels.conv.image_input`); without,
    ``x`` holds the phase planes (the shared copy).
    NOTE: offs/xt/copies/geo come from the same workspace (xt rows padded past the last span); out is
    (B, Cout * hout * wout) C-contiguous; data is (groups, ntiles, Kr, 4)."""
    nb = out.shape[0]
    plane = hout * wout
    nparts = bounds.size - 1
    ntiles = data.shape[1]
    nvec = (span + VW - 1) // VW
    nst = (nvec + GEMM_NV - 1) // GEMM_NV
    if counter.size:
        counter[0] = 0
    for part in numba.prange(nparts):
        w = wide[part]
        first = bounds[0] if by_image else bounds[part]
        last = bounds[nparts] if by_image else bounds[part + 1]
        b = next_image(counter, -1, part, nparts, by_image)
        while b < nb:
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
                        _crop(w[f * gstride:], span, dst, rr[f] * plane, 0, wph, wout, hout, relu, res[b],
                              has_res)
            if part == 0 or by_image:
                _fill_bias(dst, fill, bias, plane, relu, res[b], has_res)
            b = next_image(counter, b, part, nparts, by_image)


_implicit_kernel_serial = serial_twin(_implicit_kernel)


@pjit
def _blocked_kernel(x, xt, copies, geo, copy, offs, data, kblk, rows, fill, bias, out, hout, wout, wide,
                    gstride, bounds, wph, span, group, relu, by_image, counter, res, has_res, straight):
    """:func:`_implicit_kernel` in channel blocks, for layers whose register tile's input window of all
    channels does not fit L1 (the direct kernel's loop, :func:`sparsecnn.kernels.conv._grouped_kernel`):
    per image and group of ``group`` wide-row positions, block after block, register tile after tile,
    every 4-filter item of the thread adds the block's columns into its tile of ``wide`` (from the
    bias at the first block), so the block's window is read from L1 by all the items; then the valid
    columns of every item's filters go to ``out``.
    With ``straight`` (a layout that is the output's: stride 1, no padding, planes of whole vectors,
    every tile four consecutive output channels) the tiles go straight into ``out``, the blocks
    adding into them there, and the last block applies the residual and ReLU to the L1-hot tile:
    no ``wide`` rows and no crop.
    NOTE: as _implicit_kernel; kblk (groups, nblk + 1) column bounds of the channel blocks; wide holds
    GEMM_MR * gstride floats per item of the largest range; group is a multiple of wph (of VW when
    straight)."""
    nb = out.shape[0]
    plane = hout * wout
    nparts = bounds.size - 1
    ntiles = data.shape[1]
    nblk = kblk.shape[1] - 1
    if counter.size:
        counter[0] = 0
    for part in numba.prange(nparts):
        w = wide[part]
        first = bounds[0] if by_image else bounds[part]
        last = bounds[nparts] if by_image else bounds[part + 1]
        b = next_image(counter, -1, part, nparts, by_image)
        while b < nb:
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
                            if straight:
                                pos = rows[g, t * GEMM_MR] * plane + p0 + v0 * VW
                                gemm_tile(xb, offs[g], data[g, t].reshape(-1), k0, k1, p0 + v0 * VW, dst, pos,
                                          plane, nv, nv * VW, kb > 0, i0, i1, i2, i3)
                                if kb == nblk - 1 and (relu or has_res):
                                    for f in range(GEMM_MR):
                                        _act_in_place(dst, res[b], has_res, pos + f * plane, nv * VW, relu)
                            else:
                                gemm_tile(xb, offs[g], data[g, t].reshape(-1), k0, k1, p0 + v0 * VW, w,
                                          (item - first) * GEMM_MR * gstride + v0 * VW, gstride, nv, nv * VW,
                                          kb > 0, i0, i1, i2, i3)
                if straight:
                    continue
                r0 = p0 // wph
                for item in range(first, last):
                    g = item // ntiles
                    t = item - g * ntiles
                    for f in range(GEMM_MR):
                        co = rows[g, t * GEMM_MR + f]
                        if co >= 0:
                            _crop(w[((item - first) * GEMM_MR + f) * gstride:], n, dst, co * plane, r0, wph,
                                  wout, hout, relu, res[b], has_res)
            if part == 0 or by_image:
                _fill_bias(dst, fill, bias, plane, relu, res[b], has_res)
            b = next_image(counter, b, part, nparts, by_image)


_blocked_kernel_serial = serial_twin(_blocked_kernel)


@jit(inline="always")
def _act_in_place(dst, res, has_res, pos, n, relu):
    """``dst[pos:pos + n] (+= res[pos:pos + n] with has_res)``, then ``max(v, 0)`` (NaN kept) when
    ``relu``; ``n`` is a whole number of vectors."""
    if has_res:
        _add_residual(dst, res, pos, n, relu)
    elif relu:
        for v in range(n // VW):
            copy_vec_act(dst, pos + v * VW, dst, pos + v * VW, True)


@pjit
def _chan_kernel(x, xt, copies, geo, copy, offs, wch, kblk, rows, fill, bias, out, hout, wout, buf, init,
                 bounds, qpos, wrow, group, relu, by_image, counter, res, has_res, pstride, out_blocked,
                 straight, prefetch_weights, posfirst):
    """Implicit GEMM with output channels in the vector lanes (:func:`sparsecnn.kernels._simd.chan_tile`),
    parallel over balanced ranges of (group, block of ``CHAN_BLOCK`` filters, position group) items.
    Positions are the output's own (``hout * wout``, in row order), read from the wide-row input at
    ``qpos[q]`` (:func:`_tile_positions`), so no tile computes a padding column. Per item, channel
    block after channel block, every ``CHAN_NP``-position register tile of the position group adds the
    block's columns into its tile (from the bias at the first block). With ``straight`` (a
    channel-blocked output whose wide rows are its rows: 1x1 stride-1 layers) the tiles go straight
    from the registers into the output, the blocks adding into them there and the last one applying
    the residual and ReLU on its registers before the store (``chan_tile``'s epilogue). Otherwise
    they land position-major in ``buf`` and are then stored into the channel-blocked output
    (:mod:`sparsecnn.kernels.blocked`) or transposed into the filters' planes (with ReLU when
    ``relu``); ``wrow`` is the positions per row of ``qpos``'s walk (``wout``; the wide rows'
    ``wph`` with ``VALID_POSITIONS`` off). ``pstride`` is
    ``BLOCK`` where the input is channel-blocked (``x``, ``xt``, ``offs`` and ``qpos`` in that layout),
    else 1.
    NOTE: as _implicit_kernel; wch (groups, nob, Kr, CHAN_BLOCK), rows (groups, nob * CHAN_BLOCK);
    buf holds (group + CHAN_NP) * CHAN_BLOCK floats per thread, init CHAN_BLOCK."""
    nb = out.shape[0]
    plane = hout * wout
    nparts = bounds.size - 1
    nob = wch.shape[1]
    nblk = kblk.shape[1] - 1
    npos = qpos.size
    ngrp = (npos + group - 1) // group
    wflat = wch.reshape(-1)
    if counter.size:
        counter[0] = 0
    for part in numba.prange(nparts):
        bf = buf[part]
        ini = init[part]
        first = bounds[0] if by_image else bounds[part]
        last = bounds[nparts] if by_image else bounds[part + 1]
        b = next_image(counter, -1, part, nparts, by_image)
        while b < nb:
            if pstride > 1:
                xb = image_input_blocked(x, b, xt, part, copies, geo, copy)
            else:
                xb = image_input(x, b, xt, part, copies, geo, copy)
            dst = out[b]
            for item in range(first, last):
                g = item // (nob * ngrp)
                rem = item - g * nob * ngrp
                if posfirst:
                    pg = rem // nob
                    ob = rem - pg * nob
                else:
                    ob = rem // ngrp
                    pg = rem - ob * ngrp
                p0 = pg * group
                n = min(group, npos - p0)
                rr = rows[g, ob * CHAN_BLOCK:(ob + 1) * CHAN_BLOCK]
                for f in range(CHAN_BLOCK):
                    ini[f] = bias[rr[f]] if rr[f] >= 0 else np.float32(0.0)
                wt = wch[g, ob].reshape(-1)
                nout = 0
                while nout < CHAN_BLOCK // BLOCK and rr[nout * BLOCK] >= 0:
                    nout += 1
                cbo = rr[0] // BLOCK
                wbase = (g * nob + ob) * wch.shape[2] * CHAN_BLOCK
                ntl = (n + CHAN_NP - 1) // CHAN_NP
                for kb in range(nblk):
                    k0, k1 = kblk[g, kb], kblk[g, kb + 1]
                    if kb > 0 and k1 == k0:
                        continue
                    # the next block's weights (as long as this one, on in memory: the next filter
                    # block's first after the last) into L2, a share with each tile
                    pf0 = wbase + k1 * CHAN_BLOCK
                    pfn = min((k1 - k0) * CHAN_BLOCK, wflat.size - pf0) if prefetch_weights else 0
                    pstep = ((pfn + ntl - 1) // ntl + 15) // 16 * 16
                    for t0 in range(0, n, CHAN_NP):
                        npx = min(CHAN_NP, n - t0)
                        e1 = min(pstep * (t0 // CHAN_NP + 1), pfn)
                        for e in range(pstep * (t0 // CHAN_NP), e1, 16):
                            prefetch_l2(wflat, pf0 + e)
                        if straight:
                            # the residual and ReLU on the last block's registers
                            pos = (cbo * plane + p0 + t0) * BLOCK
                            fin = kb == nblk - 1
                            chan_tile(xb, offs[g], wt, k0, k1, 0, qpos, p0 + t0, dst, pos, BLOCK,
                                      plane * BLOCK, nout, npx, kb > 0, ini, 0, res[b],
                                      fin and has_res, fin and relu)
                        else:
                            chan_tile(xb, offs[g], wt, k0, k1, 0, qpos, p0 + t0, bf, t0 * CHAN_BLOCK,
                                      CHAN_BLOCK, BLOCK, CHAN_BLOCK // BLOCK, npx, kb > 0, ini, 0, bf, False,
                                      False)
                if straight:
                    continue
                if out_blocked:
                    _store_chan_blocked(bf, p0, n, dst, rr, plane, wrow, wout, relu, res[b], has_res)
                else:
                    _crop_chan(bf, p0, n, dst, rr, plane, wrow, wout, relu, res[b], has_res)
            if (part == 0 or by_image) and not out_blocked:
                _fill_bias(dst, fill, bias, plane, relu, res[b], has_res)
            b = next_image(counter, b, part, nparts, by_image)


_chan_kernel_serial = serial_twin(_chan_kernel)


def _tile_positions(lay, pstride: int) -> np.ndarray:
    """The input offset of every position the channel form's tiles compute (:func:`_chan_kernel`): each
    output position ``q = r * wout + c`` of the wide-row layout ``lay`` (rows ``wph >= wout``
    positions wide) at ``(r * wph + c) * pstride``; with ``VALID_POSITIONS`` off, the ``span`` wide-row
    positions, padding columns included. int32 where it fits."""
    if VALID_POSITIONS:
        r, c = np.divmod(np.arange(lay.hout * lay.wout, dtype=np.int64), lay.wout)
        q = (r * lay.wph + c) * pstride
    else:
        q = np.arange(lay.span, dtype=np.int64) * pstride
    small = q.size == 0 or q[-1] <= np.iinfo(np.int32).max
    return np.ascontiguousarray(q, dtype=np.int32 if small else np.int64)


@jit(inline="always")
def _store_chan_blocked(bf, p0, n, dst, rr, plane, wph, wout, relu, res, has_res):
    """:func:`_crop_chan` into the channel-blocked output: position ``q`` (column ``q % wph`` of row
    ``q // wph``, valid below ``wout``) of the ``BLOCK`` filters from ``rr[o * BLOCK]`` on is one
    vector at ``((rr[o * BLOCK] // BLOCK) * plane + row * wout + col) * BLOCK``."""
    r0 = p0 // wph
    r1 = (p0 + n - 1) // wph
    for r in range(r0, r1 + 1):
        c0 = max(0, p0 - r * wph)
        c1 = min(wout, p0 + n - r * wph)
        for c in range(c0, c1):
            s = (r * wph + c - p0) * CHAN_BLOCK
            for o in range(CHAN_BLOCK // BLOCK):
                co = rr[o * BLOCK]
                if co < 0:
                    continue
                d = ((co // BLOCK) * plane + r * wout + c) * BLOCK
                if has_res:
                    add_vec_act(bf, s + o * BLOCK, res, d, dst, d, relu)
                else:
                    copy_vec_act(bf, s + o * BLOCK, dst, d, relu)


@jit(inline="always")
def _crop_chan(bf, p0, n, dst, rr, plane, wph, wout, relu, res, has_res):
    """The valid ones of wide-row positions ``p0 <= q < p0 + n`` (in ``bf`` position-major from ``p0``,
    ``CHAN_BLOCK`` floats each) into the planes of output channels ``rr`` (-1: none): position ``q``
    is column ``q % wph`` of row ``q // wph``, valid below ``wout``. With ``has_res`` plus ``res`` at
    the same place (shaped as ``dst``), then ``max(v, 0)`` (NaN kept) when ``relu``."""
    r0 = p0 // wph
    r1 = (p0 + n - 1) // wph
    for f in range(CHAN_BLOCK):
        co = rr[f]
        if co < 0:
            continue
        for r in range(r0, r1 + 1):
            c0 = max(0, p0 - r * wph)
            c1 = min(wout, p0 + n - r * wph)
            d = co * plane + r * wout
            s = r * wph - p0
            for c in range(c0, c1):
                v = bf[(s + c) * CHAN_BLOCK + f]
                if has_res:
                    v += res[d + c]
                dst[d + c] = v if not relu or not v <= 0 else np.float32(0.0)  # NaN kept
