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
at a precomputed offset. For stride 1 the phase plane is the padded plane itself, except that rows
share their padding gap: a row holds ``W + pw`` floats, the right padding of one row being the left
padding of the next, which cuts the wide positions (wasted lanes) by 7-8% on AlexNet's 13x13 and
27x27 layers. The offsets depend on the input shape and live in a per-shape workspace inside the prep
object, with the phase-decomposed input buffers (one per image, copied in parallel before the kernel;
or, where the threads split a batch's images, one image per thread, each copying its own images inside
the kernel: :func:`image_input`), so a call allocates nothing after the first one for a shape.

Loop
----
Register tiles (XNNPACK's sparse inference kernels, SparseRT): ``NV_MAX`` vectors of ``VW`` floats
(16-wide zmm x 12 where the CPU runs AVX-512 FMAs at full rate, e.g. Intel's Emerald Rapids; 8-wide
ymm x 24 where numba's target has AVX-512VL at half rate, Zen 4; ymm x 12 with AVX2's 16 registers;
see :mod:`sparsecnn.kernels._simd`) stay in registers across the nonzeros of the output channels
they belong to, one broadcast weight and one ``vfmadd231ps reg, reg, [mem]`` per vector, no stores
in the inner loop (LLVM IR from :mod:`sparsecnn.kernels._simd`;
plain numba leaves such a tile in memory). Two output channels share the registers (``NV_PAIR`` = 12 or
6 vectors each) and walk their nonzeros in lockstep (``pair_tile``): both lists are sorted by input
channel, so the second channel's spans mostly hit the L1 lines the first one just fetched. The wide
positions are walked in groups of whole rows whose input (the channels a thread reads, all phases, the
tap rows below) fits in half of L2. Inside a group, the input channels are cut into blocks whose part of
one register tile's input (at most the whole wide plane) fits in L1 (24 KiB); for each tile and each
block, every filter of the thread adds the block's nonzeros into its own ``NV_MAX``-vector tile
(``span_tile``; loaded and stored in a per-thread wide buffer between blocks), so a block's input is
fetched from L2 once and then read from L1 by all filters. The nonzeros are stored block-major in the
workspace (block kb of filter co is ``bptr[kb, co]:bptr[kb, co + 1]``), so such a pass streams the
weights in order; filter-major, it walked every filter's list a few lines at a time and, with the
weights cold as in a forward pass, ran ResNet-18's 7x7 layers at 90% 3x slower. With the input in L1 the
pair's shared lines no longer matter, and one filter per tile loads its weight and offset once per 12
vectors instead of 6 (+8% over pairs with blocks). Blocks are only made while a filter keeps about 24
nonzeros per block (else the tile's load and store cost more than L1 saves). The valid columns go to
``out`` by whole-vector row copies; with one block and wide rows equal to the output rows (1x1 without
padding), tiles are stored straight into ``out``. A fused ReLU (``relu=True``, the whole-model
executor's conv + bias + ReLU) is a compare-select on those final stores and copies (``fcmp ugt``: NaN
kept, as ``torch.relu``), never a second pass over ``out``; a residual connection (``residual=``, the
executor's ``conv:direct+add+relu``) is added in the same copies, or, where tiles go straight into
``out``, to each tile just stored (still in L1).

Zen 4 (this project's machine until 2026-12-05: AMD EPYC family 25 model 17, AVX-512 F/BW/VL/VNNI/BF16;
earlier sessions took it for Zen 3 with AVX2, and the Zen 3 numbers below are from then; the
Emerald Rapids measurements behind the 16-wide tiles are in docs/engine.md, "Session of 2026-12-05
(sixth)"). Measured at 2 threads, each
layer's variants interleaved in one process (medians of 21 x 5 calls, under load from other processes,
so +-5%): 24-vector tiles (12 per filter of a pair) against 12 (6) on AlexNet conv2/3/4/5 at 65%:
1.59/1.60/2.09/1.71x torch against 1.44/1.37/1.74/1.49x (+9-20%; conv3 at 55% +16%); ResNet at 90%:
3x3@56 +4%, 3x3@28 +2%, 3x3@14 -9%, 3x3s2@56 +5%, 1x1 +5-14%. 16-wide ``<16 x float>`` zmm tiles (12
vectors, LLVM legalising the same IR) measured 10-25% slower than 8-wide with 12 (ratios to torch
1.27-1.45x against 1.38-1.48x at 65%; one run, loaded machine); likely why: Zen 4 executes a zmm FMA as
two 256-bit halves, so wider vectors add no FMA throughput, and an unaligned 64-byte load (most span
starts) always splits across two cache lines. An L2 budget of half of Zen 4's 1 MiB L2 instead of
a quarter was 0-5% faster (``_L2_BYTES`` follows the L2 size the OS reports). Tiles sharing a
loaded vector: see "Filter groups" below.

Filter groups (moderate sparsity)
---------------------------------
One load per FMA caps the per-filter tiles at ~1.2 FMA a cycle on Zen 4 (micro-kernel alone, input in
L1: 70 GFLOP/s on one core, where :func:`sparsecnn.kernels._simd.gemm_tile`, which reuses each loaded
vector for four filters, reaches 116). At the 55-70% sparsity that Deep Compression and SSL leave in
conv layers, a column (input channel, tap) is nonzero in 1.5 of every 4 filters, so a tile of four
filters x 6 vectors (:func:`sparsecnn.kernels._simd.group_tile`) loads each column's input once for
every filter that has it: the columns of a group of four filters are sorted by their 4-bit pattern of
member filters (15 loops with the register mapping fixed per pattern; disjoint patterns walk in
lockstep so single-filter columns do not serialise on one filter's FMA chains). ``_grouped_plan``
estimates the vector loads per output vector of both forms from the actual nonzeros and keeps the
filter groups where they load less than ``_GROUPED_BELOW`` (0.85) of the per-filter tiles and a pass
has enough columns (``_GROUPED_MIN_COLUMNS``); at 90% sparsity a column rarely has two filters and
the per-filter tiles stay. Channel blocks are sized so one tile's input window of a block fits L1, and
the loop runs block, tile, filter group, so the window is read from L1 by every filter group and the
block's columns stay in L2 across the tiles. Tried and dropped on the way: vertical runs (taps
``(c, r, s)`` and ``(c, r + 1, s)`` of one filter share a loaded vector when wide rows are a whole
number of vectors): at ~37% density only 12% fewer loads, eaten by the 10-14% more lanes of rows
rounded up to 16 or 32 floats (1.0-1.05x in the micro-kernel); blocks of ~26 channels per pass and the
tile loop outermost (the 15 pattern loops' exits then cost more than the loads saved: 0.94-1.09x).

What bounds it (Zen 3, AVX2, one core, measured with the micro-kernel alone): vector loads. Each FMA
takes its input vector from memory, and this core sustains about 1.1 such FMAs a cycle (57 GFLOP/s)
with the input hot in L1, aligned or not; the same loop with each loaded vector used by two FMAs
reaches 100 GFLOP/s, the FMA peak. With the input streaming from L2 it drops to 33-38 GFLOP/s, hence
the L1 channel blocks (+10% geomean over the suite's conv layers, +15-20% on AlexNet conv3..5 at 95%).
Random sparsity gives no second use of a loaded vector (two filters rarely share a tap: 1% of taps at
90%), so ~57 GFLOP/s per core, against torch's ~68 on these small layers, is the ceiling of this
design. Measured and dropped (same process, interleaved): software prefetch of the span 2-8
nonzeros ahead (10-18% slower: the prefetches take load slots); without channel blocks, one channel
x 12 vectors is 15-40% slower than the lockstep pair (kept for layers left with one block), 3
channels x 4 vectors about the same, 4 x 3 worse; copying rows
with numba slices or scalar loops (the crop alone cost 12-25% of the layer; whole-vector copies with
an overrun into the next row, rewritten afterwards, cost a few percent).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np

from sparsecnn.kernels._numba import (
    PerThread,
    aligned_zeros,
    balanced_bounds,
    jit,
    num_threads,
    pjit,
    serial_twin,
    thread_rows,
)
from sparsecnn.kernels._simd import (
    GROUP_F,
    GROUP_NV,
    NV_MAX,
    NV_PAIR,
    VW,
    add_vec_act,
    copy_even,
    copy_every3,
    copy_every4,
    copy_vec,
    copy_vec_act,
    fetch_add,
    group_tile,
    pair_tile,
    span_tile,
    tile_split,
)

__all__ = ["SLACK", "DirectConvPrep", "bind_direct_conv2d", "direct_conv2d", "prepare_direct"]



def cache_bytes_per_core(index: int, default: int) -> int:
    """The size of cache ``index`` of CPU 0 from sysfs (Linux: 0 the L1 data cache, 2 the L2), else
    ``default``."""
    try:
        with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
            text = f.read().strip().upper()
        scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1:], 1)
        value = int(text.rstrip("KM")) * scale
        return value if 16 * 1024 <= value <= 64 * 1024 * 1024 else default
    except (OSError, ValueError):
        return default


# Input bytes a group of output rows may read: half of the core's L2 (read from sysfs; 256 KiB on Zen
# 3, 512 KiB on Zen 4), so the rows stay there while every output channel of the thread streams its
# spans from them. Measured on Zen 4 (2 threads, interleaved, two runs): half of its 1 MiB against
# the quarter used before, 0-5% faster on ResNet-18's 56x56 and 28x28 layers and VGG's 112x112 at 90%.
_L2_BYTES = cache_bytes_per_core(2, 512 * 1024) // 2
# Input bytes a channel block may read per register tile: three quarters of the L1d (24 KiB of Zen
# 4's 32; 36 of Emerald Rapids' 48, where AlexNet conv2 at 62% ran 1.25-1.3x faster than with 24 KiB
# and the other AlexNet and ResNet layers measured the same, 2 threads, interleaved, two runs).
_L1_BYTES = cache_bytes_per_core(0, 32 * 1024) * 3 // 4
# Fewest nonzeros per filter and channel block on average (below, the tile's load and store per block
# cost more than L1 saves: measured on ResNet-50 1x1 layers at 90%).
_MIN_BLOCK_NNZ = 24
_TILE = NV_MAX * VW
# Filter-group tiles (``group_tile``) replace the per-filter ones when their estimated vector loads per
# output vector are below this fraction of the per-filter tiles' (~0.8 at Deep Compression's ~37%
# density, ~1.1 at 90% sparsity: see _grouped_plan).
_GROUPED_BELOW = 0.85
# Filter groups are tried whatever the number of register tiles per row group. Until 2026-12-05 they
# were not where one per-filter tile covers a row group at batch < 4 (AlexNet's 13x13 layers): measured
# then at 0.99-1.04x, 0.82-0.86x cold. Re-measured after the later kernel changes (2 threads, batch 1,
# AlexNet conv3 / conv4 / conv5 at 65 / 63 / 63%, interleaved in one process, two runs each): alone
# 1.15-1.23x the per-filter tiles (1.72-1.84x torch against 1.43-1.52x), with every cache flushed
# 1.00x, and as steps of the compiled AlexNet DC forward pass 1.02-1.09x.
# Fewest columns per filter-group pass on average (its 15 pattern loops per tile need columns to run),
# unless a pass saves at least _GROUPED_MIN_SAVED vector loads per output vector (est_flat -
# est_grouped in _grouped_plan): AlexNet's conv1 (3 channels of 11x11 taps, 16% sparse) has 121
# columns a pass but saves ~230 loads, 1x1 layers at 65% save ~40.
_GROUPED_MIN_COLUMNS = 256
_GROUPED_MIN_SAVED = 128
# Layers with taps around the pixel and at least _GROUPED_WIDE_SPAN wide positions per output plane
# (many register tiles per pass, so the 15 pattern loops' exits cost little) take filter groups
# whatever their column count, when they load less than _GROUPED_WIDE_FACTOR x _GROUPED_BELOW (0.95)
# of the per-filter tiles (~0.88 at 80% sparsity, ~1.0 at 90%; _GROUPED_BELOW 0 still forces the
# per-filter tiles everywhere, as the tests and benchmarks.forms do). Measured (Emerald Rapids, 2
# threads, interleaved): 3x3 at 56x56 and 28x28 and 3x3 stride 2 at 70% 1.20-1.26x, at 80% 1.08-1.17x;
# whole models ResNet-18 at 70% / 80% 1.10x / 1.02-1.04x, ResNet-50 at 70% / 80% 1.00x / 1.01-1.03x,
# at 90% unchanged. 1x1 layers are left out: alone 0.89-1.89x, in ResNet-50 at 70-80% 0.86-0.91x.
_GROUPED_WIDE_SPAN = 512
_GROUPED_WIDE_FACTOR = 0.95 / 0.85


# A layer that could read its input in place (stride 1, no padding: 1x1 layers) but whose planes are
# not whole vectors copies it onto planes of whole vectors where it has at least this many nonzeros
# per input channel (each reads the channel's span once, and an aligned span costs one line a vector,
# not two). Measured (Emerald Rapids, 2 threads, batch 1, copy vs in place, interleaved): 256 -> 1024
# at 14x14 1.19-1.24x and 512 -> 2048 at 7x7 1.15-1.58x (102-1024 nonzeros per channel); 1024 -> 256
# 1.02-1.05x and 2048 -> 512 1.04-1.12x at 51-256; 0.81-0.85x at 26-51, where the copy costs more
# than it saves.
_ALIGN_MIN_READS = 96


def split_by_image(batch: int, nparts: int) -> bool:
    """Whether the threads split a batch's images (each thread every filter of its images) rather than
    the filters (each thread its filters for every image): when the images divide evenly, or there are
    enough of them that the last uneven round costs little.

    Why: split by filters, every thread reads every input channel of every image, half of them
    copied (and, in a forward pass, written) by the other core; split by images, a thread copies and
    reads only its own images and writes only their outputs. Whole compiled models, the two interleaved
    in one process (2 threads): AlexNet DC at batch 32 1.02x, ResNet-18 at 90% at batch 8 1.06x
    (docs/engine.md, "Session of 2026-12-05 (second)").

    Split by filters (batch 1), the input gets one copy per image made by all threads in parallel
    before the kernel (:func:`phase_copy`). A copy per thread there (each thread copying the whole
    image for itself) ran single layers 1.05-1.35x faster with an input freshly written by two threads,
    but whole compiled models 0.95-0.99x (ResNet-18 / ResNet-50 at 90%, AlexNet DC) and VGG-16's
    224x224 layers 0.81x (the image leaves the L2 before it is read)."""
    return nparts > 1 and batch >= nparts and (batch % nparts == 0 or batch >= 4 * nparts)


# Off: depthwise layers run the direct kernel's general path, not kernels.depthwise (the A/B baseline).
DEPTHWISE = True

# Below this many multiply-adds per call (nonzeros x span x batch) a bound layer runs the serial twins
# of the kernels: a parallel launch (~2.5 us) costs more than a second thread saves (LeNet-5's layers).
_SERIAL_MACS = 1 << 16
# Where the threads split a batch's images, they take them one at a time from a shared counter
# (next_image) rather than a static share each; read when a workspace is built.
DYNAMIC_IMAGES = True


def _index_dtype(n: int) -> np.dtype:
    """The narrowest signed integer dtype that holds ``0 .. n - 1``."""
    if n <= np.iinfo(np.int16).max + 1:
        return np.dtype(np.int16)
    if n <= np.iinfo(np.int32).max + 1:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


@dataclass(eq=False)
class _Grouped:
    """The filter-group form of one input shape (see :func:`sparsecnn.kernels._simd.group_tile`):
    filters in groups of ``GROUP_F`` (within a conv group), and per pass (channel block ``kb``, filter
    group ``g``: pass ``kb * ngroups + g``) the sparse columns sorted by the pattern of filters that
    have them."""

    offsets: np.ndarray  # (ncols,) span offset of each column inside one image's phase planes
    weights: np.ndarray  # (nnz,) the member filters' weights, column after column, in filter order
    cptr: np.ndarray  # (npass * 16,) int64: pattern q of pass P is cptr[16 P + q - 1]:cptr[16 P + q]
    wptr: np.ndarray  # (npass * 16,) int64: weight index of the first column of pattern q of pass P
    filters: np.ndarray  # (ngroups, GROUP_F) int64: the filter in each slot, -1 for an empty slot
    bounds: np.ndarray  # (nparts + 1,) filter-group ranges with balanced nonzero counts
    nblk: int  # channel blocks
    group: int  # wide-row positions per pass (whole rows)
    wide: np.ndarray  # (nparts, slots * gstride) wide output rows of the thread's filter slots
    gstride: int


@dataclass(eq=False)
class _Workspace:
    """Per-input-shape state: span offsets, the phase-decomposed input and the output tiles."""

    offsets: np.ndarray  # (nnz,) offset of each nonzero's span inside one image's phase planes
    data: np.ndarray  # (nnz,) the weights in the order of offsets (block-major, see bptr)
    phases: np.ndarray  # (nph,) the phases (ph * sw + pw) materialised, in storage order
    copies: np.ndarray  # (ncopies, 7) int64: where the input pixels go in each plane (_phase_copies)
    in_place: bool  # the layout is x itself (stride 1, no padding): in place given SLACK floats after x
    xt: np.ndarray  # (B, Cin * nph * Hph * Wph + 2 * VW + pw): each image's phase planes; (nparts, ...)
    # with by_image: each thread's copy of the image it is on
    geo: np.ndarray  # PhaseLayout.geometry of the input shape
    wide: np.ndarray  # (nparts, nco * gstride) wide output rows of the thread's nco filters
    gstride: int  # floats per filter in wide: group + 2 * VW
    bptr: np.ndarray  # (nblk, Cout + 1): block kb of filter co is bptr[kb, co]:bptr[kb, co + 1]
    bounds: np.ndarray  # (nparts + 1,) output-channel ranges with balanced nonzero counts
    hph: int
    wph: int
    hout: int
    wout: int
    span: int  # (hout - 1) * wph + wout
    group: int  # wide-row positions per pass over the output channels (whole rows of wph)
    tile: int  # vectors per register tile: per filter of a pair (one block), or of one filter (blocks)
    by_image: bool  # threads split the batch's images (split_by_image), not the filters
    # (1,) int64 where the threads take the images one at a time from this counter (next_image), else
    # (0,): each thread images part, part + nparts, ...
    counter: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    grouped: _Grouped | None = None  # the filter-group form, when it is the one that runs

    @property
    def identity(self) -> bool:
        """The layout is x itself and its planes are whole vectors: x is read in place, always."""
        return self.in_place and self.span % VW == 0


@dataclass(frozen=True, eq=False)
class PhaseLayout:
    """Where a convolution's input goes in the phase planes, and the wide-row output geometry, for one
    input shape (see the module docstring); shared with :mod:`sparsecnn.kernels.implicit_gemm`."""

    hph: int
    wph: int
    nph: int  # phases materialised (only those some tap reads)
    plane: int  # hph * wph (rounded up to whole vectors where aligned): one phase plane's floats
    hout: int
    wout: int
    span: int  # (hout - 1) * wph + wout: wide positions of one output plane
    halo: int  # the farthest tap's offset inside one phase plane
    phases: np.ndarray  # (nph,) the phases materialised, in storage order
    copies: np.ndarray  # (ncopies, 7) int64, see _phase_copies
    in_place: bool  # the layout is x itself: readable in place when SLACK floats follow x
    stride: tuple[int, int]
    dilation: tuple[int, int]
    compact: np.ndarray  # phase (ph * sw + pw) -> its storage index, -1 if not materialised

    def offsets(self, c: np.ndarray, r: np.ndarray, s: np.ndarray) -> np.ndarray:
        """int64 offset, inside one image's phase planes, of the span that tap ``(r, s)`` of input
        channel ``c`` adds into the wide output rows."""
        (sh, sw), (dh, dw) = self.stride, self.dilation
        phase = ((r * dh) % sh) * sw + (s * dw) % sw
        return ((c * self.nph + self.compact[phase]) * self.plane + ((r * dh) // sh) * self.wph
                + (s * dw) // sw)

    def xt_shape(self, nbuf: int, cin: int, pad_w: int) -> tuple[int, int]:
        """Shape of ``nbuf`` phase-decomposed input buffers of one image each (one per thread): every
        span may read VW floats past its end."""
        return nbuf, cin * self.nph * self.plane + 2 * VW + pad_w

    def geometry(self, x_shape: tuple[int, int, int, int], in_stride: int = 0) -> np.ndarray:
        """int64 ``(Cin, H, W, floats per channel, plane, Wph, sh, sw, input channel stride)``: what
        :func:`image_input` needs besides ``copies`` to phase-copy one image whose channels lie
        ``in_stride`` floats apart (default ``H * W``; more for planes padded to whole vectors)."""
        _, cin, h, w = x_shape
        return np.array([cin, h, w, self.nph * self.plane, self.plane, self.wph, *self.stride,
                         in_stride or h * w], dtype=np.int64)


def phase_layout(x_shape: tuple[int, int, int, int], kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], align: bool = False,
                 in_stride: int = 0) -> PhaseLayout:
    """The :class:`PhaseLayout` of a convolution with these taps over inputs of ``x_shape``; with
    ``align``, planes of whole vectors (``plane`` rounded up to ``VW``: the layout is then a copy).
    ``in_stride``: the input's channels lie that many floats apart (planes padded to whole vectors
    by their producer, :func:`padded_plane`); a layout that is the input itself then takes it as its
    plane."""
    _, _, h, w = x_shape
    kh, kw = kernel
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    hout = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wout = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    hp, wp = h + 2 * ph, w + 2 * pw
    hph, wph = -(-hp // sh), -(-wp // sw)
    if sw == 1 and pw <= dw * (kw - 1):
        # Rows share one padding gap: the right padding of a row is the left padding of the next,
        # so a row holds w + pw floats, not w + 2 * pw (8% fewer wide positions on 13x13 3x3).
        wph = w + pw
    # Only the phases some tap reads are materialised (a 1x1 stride-2 conv reads one of four).
    used = sorted({((rr * dh) % sh) * sw + (ss * dw) % sw for rr in range(kh) for ss in range(kw)})
    compact = np.full(sh * sw, -1, dtype=np.int64)
    compact[used] = np.arange(len(used))
    span = (hout - 1) * wph + wout
    halo = (((kh - 1) * dh) // sh) * wph + ((kw - 1) * dw) // sw
    plane = hph * wph
    in_place = sh == sw == 1 and ph == pw == 0
    if in_place and in_stride:
        plane = in_stride  # the input itself, its planes padded by the producer
    elif align:  # planes of whole vectors: every channel's span starts on a cache line
        plane = -(-plane // VW) * VW
    return PhaseLayout(hph=hph, wph=wph, nph=len(used), plane=plane, hout=hout, wout=wout, span=span,
                       halo=halo, phases=np.asarray(used, dtype=np.int64),
                       copies=_phase_copies(h, w, sh, sw, ph, pw, hph, wph, used),
                       in_place=in_place and plane == (in_stride or hph * wph),
                       stride=(sh, sw), dilation=(dh, dw), compact=compact)


@dataclass(eq=False)
class ConvPrepBase:
    """What a convolution's prepared weights share: the layer's geometry, the output shape, and the
    calling thread's per-input-shape workspace (built by the subclass's ``_build_workspace``, cached
    in ``_workspaces``). Subclasses are dataclasses that add their weight arrays."""

    weight_shape: tuple[int, int, int, int]
    groups: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    _workspaces: PerThread = field(default_factory=PerThread, repr=False, kw_only=True)

    def output_shape(self, x_shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """``(B, Cout, Hout, Wout)`` for an input of shape ``(B, Cin, H, W)``."""
        b, _, h, w = x_shape
        cout, _, kh, kw = self.weight_shape
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        hout = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wout = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return b, cout, hout, wout

    def workspace(self, x_shape: tuple[int, int, int, int], *variant: Any) -> Any:
        """The calling thread's workspace for inputs of ``x_shape`` (and the subclass's ``variant``,
        e.g. the implicit GEMM's layouts), built on first use."""
        nparts = num_threads()
        key = (*x_shape, nparts, *variant)
        return self.cached(key, lambda: self._build_workspace(x_shape, nparts, *variant))

    def cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The calling thread's value for ``key``, ``build()`` on first use (the per-thread workspace
        cache, for other kernels of the same weights: :mod:`sparsecnn.kernels.depthwise`)."""
        ws = self._workspaces.get(key)
        if ws is None:
            ws = build()
            self._workspaces[key] = ws
        return ws

    def _build_workspace(self, x_shape: tuple[int, int, int, int], nparts: int, *variant: Any) -> Any:
        raise NotImplementedError


@dataclass(eq=False)
class DirectConvPrep(ConvPrepBase):
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

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray

    @property
    def nnz(self) -> int:
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored sparse weights: values, indices and pointers at their dtypes."""
        return int(self.indptr.nbytes + self.indices.nbytes + self.data.nbytes)

    def _build_workspace(self, x_shape: tuple[int, int, int, int], nparts: int,
                         in_stride: int = 0) -> _Workspace:
        """The workspace for inputs of ``x_shape``; ``workspace(x_shape, in_stride)`` for inputs whose
        channels lie ``in_stride`` floats apart (planes padded to whole vectors, :func:`padded_plane`)."""
        cin = x_shape[1]
        cout, cin_g, kh, kw = self.weight_shape
        lay = phase_layout(x_shape, (kh, kw), self.stride, self.padding, self.dilation, in_stride=in_stride)
        if lay.in_place and lay.plane % VW and self.nnz >= _ALIGN_MIN_READS * cin:
            # Planes that are not whole vectors (14x14, 7x7) start their channels inside a line, and
            # every span load then reads two. Where each channel is read by many nonzeros, copy the
            # input onto planes of whole vectors first (see _ALIGN_MIN_READS).
            lay = phase_layout(x_shape, (kh, kw), self.stride, self.padding, self.dilation, align=True)
        hph, wph, nph, plane = lay.hph, lay.wph, lay.nph, lay.plane
        hout, wout, span, halo = lay.hout, lay.wout, lay.span, lay.halo
        pw = self.padding[1]
        # Decode the flat tap index of every nonzero and turn it into a span offset.
        idx = self.indices.astype(np.int64)
        ci, rs = np.divmod(idx, kh * kw)
        r, s = np.divmod(rs, kw)
        co = np.repeat(np.arange(cout), np.diff(self.indptr))
        c = (co // (cout // self.groups)) * cin_g + ci
        off = lay.offsets(c, r, s)
        per_image = cin * nph * plane
        off_dtype = np.int32 if per_image <= np.iinfo(np.int32).max else np.int64
        # Positions per group: whole wide rows whose input (all channels and phases, with the rows of
        # the taps below) fits in L2; at least one full register tile.
        # A thread's output channels read the input channels of about groups / nparts groups.
        cin_read = cin_g * -(-self.groups // nparts)
        rows = max((_L2_BYTES // (4 * cin_read * nph) - halo) // wph, -(-_TILE // wph), 1)
        group = min(rows, hout) * wph
        counts = np.diff(self.indptr).astype(np.int64) + 1  # +1: an empty filter still costs a bias fill
        bounds = balanced_bounds(counts, nparts, cout // self.groups)  # on group edges where near
        # Input-channel blocks whose part of a register tile's input (its span plus the taps' halo,
        # in every phase) fits in L1: every filter of the thread adds a block into its tile before
        # the next block, so the block's input is read from L1 by all of them.
        # A tile spans at most the whole wide plane (7 vectors on ResNet's 7x7 layers, not NV_MAX).
        tile_floats = min(NV_MAX, -(-span // VW)) * VW
        window = 4 * nph * (tile_floats + halo + VW)
        nblk = -(-cin_g // max(1, _L1_BYTES // window))
        # A (filter, block) pass costs a load and a store of the tile: keep >= ~24 nonzeros in it.
        nblk = max(1, min(nblk, self.nnz // max(cout, 1) // _MIN_BLOCK_NNZ))
        cb = -(-cin_g // nblk)  # blocks of equal size
        # Block-major storage: the nonzeros of block kb, filter after filter, are one contiguous run,
        # so a pass over a block streams the weights in order. Kept filter-major, each pass read a
        # few lines of every filter's list (a strided walk the prefetchers miss): ResNet's 7x7 layer
        # at 90% ran 2x slower with its weights cold, as in a forward pass.
        key = (ci // cb) * cout + co
        order = np.argsort(key, kind="stable")
        per_block = np.bincount(key, minlength=cout * nblk).reshape(nblk, cout)
        bptr = np.zeros((nblk, cout + 1), dtype=np.int64)
        np.cumsum(per_block, axis=1, out=bptr[:, 1:])
        bptr[1:] += np.cumsum(bptr[:-1, -1])[:, None]
        gstride = group + 2 * VW
        # A serial layer (see bind_direct_conv2d) copies its input inside the kernel, as the threads do
        # when they split the images: one numba call instead of two.
        by_image = split_by_image(x_shape[0], nparts) or self.nnz * span * x_shape[0] < _SERIAL_MACS
        nco = cout if by_image else int(np.diff(bounds).max(initial=0))
        grouped = _grouped_plan(self, lay, c, ci, r, s, co, off_dtype, cin_g, nparts, by_image)
        if grouped is not None:  # the per-filter form is not kept beside it (the weights once per thread)
            order, bptr, nco = order[:0], np.zeros((1, cout + 1), dtype=np.int64), 0
        return _Workspace(
            offsets=np.ascontiguousarray(off[order], dtype=off_dtype),
            data=np.ascontiguousarray(self.data[order]),
            phases=lay.phases,
            copies=lay.copies,
            in_place=lay.in_place,
            xt=aligned_zeros(lay.xt_shape(nparts if by_image else x_shape[0], cin, pw)),
            geo=lay.geometry(x_shape, in_stride),
            wide=thread_rows(nparts, max(nco, 1) * gstride if grouped is None else 0),
            gstride=gstride,
            bptr=bptr,
            bounds=bounds,
            hph=hph,
            wph=wph,
            hout=hout,
            wout=wout,
            span=span,
            group=group,
            tile=NV_MAX if nblk > 1 else NV_PAIR,
            by_image=by_image,
            counter=image_counter(by_image, nparts),
            grouped=grouped,
        )


def _grouped_plan(prep: DirectConvPrep, lay: PhaseLayout, c: np.ndarray, ci: np.ndarray, r: np.ndarray,
                  s: np.ndarray, co: np.ndarray, off_dtype: type, cin_g: int, nparts: int,
                  by_image: bool = False) -> _Grouped | None:
    """The filter-group form of ``prep`` for one input shape, or None where the per-filter tiles are
    estimated to load less (high sparsity: a column then rarely has two filters) or a pass would
    have too few columns (1x1 layers).

    The estimate counts vector loads per output vector: per-filter tiles make one per nonzero (plus
    a weight and an offset per ``NV_MAX`` vectors); group tiles one per column and vector, plus a
    weight broadcast and an offset per column every ``GROUP_NV`` vectors.
    """
    cout, _, kh, kw = prep.weight_shape
    nnz = prep.nnz
    if nnz == 0 or _GROUPED_BELOW <= 0:
        return None
    nph, wph, halo = lay.nph, lay.wph, lay.halo
    # Rows per group: the input of every channel of the thread for them fits in half of L2 (as the
    # per-filter kernel's); channel blocks: one tile's input window of a block fits L1, so it is read
    # from L1 by every filter group of the thread.
    cin_read = cin_g * -(-prep.groups // nparts)
    rows = max((_L2_BYTES // (4 * cin_read * nph) - halo) // wph, -(-GROUP_NV * VW // wph), 1)
    group = min(rows, lay.hout) * wph
    cb = max(1, _L1_BYTES // (4 * nph * (GROUP_NV * VW + halo + VW)))
    nblk = -(-cin_g // cb)
    cb = -(-cin_g // nblk)
    mg = cout // prep.groups
    per_conv = -(-mg // GROUP_F)  # filter groups per conv group
    ngroups = prep.groups * per_conv
    cg, j = np.divmod(co, mg)
    fgroup = cg * per_conv + j // GROUP_F
    slot = j % GROUP_F
    kb = ci // cb
    tap = (ci * kh + r) * kw + s
    ntap = cin_g * kh * kw
    npass = nblk * ngroups
    col_key = (kb * ngroups + fgroup) * ntap + tap
    cols, inverse = np.unique(col_key, return_inverse=True)
    pattern = np.zeros(cols.size, dtype=np.int64)
    np.bitwise_or.at(pattern, inverse, 1 << slot)
    ncols = cols.size
    est_grouped = ncols * (1 + 1 / GROUP_NV) + nnz / GROUP_NV
    est_flat = nnz * (1 + 2 / NV_MAX)
    # A pass runs 15 pattern loops per tile: with few columns each, their exits cost more than the
    # loads saved (1x1 layers: one tap per channel), unless the pass saves many loads (dense conv1).
    few = ncols < _GROUPED_MIN_COLUMNS * npass and est_flat - est_grouped < _GROUPED_MIN_SAVED * npass
    below = _GROUPED_BELOW
    if lay.span >= _GROUPED_WIDE_SPAN and kh * kw > 1:  # many tiles a pass: the loops' exits cost little
        few, below = False, _GROUPED_BELOW * _GROUPED_WIDE_FACTOR
    if est_grouped >= below * est_flat or few:
        return None
    passes = cols // ntap
    order = np.lexsort((cols % ntap, pattern, passes))  # by pass, then pattern, then tap
    rank = np.empty(ncols, dtype=np.int64)
    rank[order] = np.arange(ncols)
    members = np.array([bin(q).count("1") for q in range(1 << GROUP_F)], dtype=np.int64)
    wstart = np.zeros(ncols + 1, dtype=np.int64)
    np.cumsum(members[pattern[order]], out=wstart[1:])
    below = np.array([[bin(q & ((1 << f) - 1)).count("1") for f in range(GROUP_F)]
                      for q in range(1 << GROUP_F)], dtype=np.int64)
    weights = np.empty(nnz, dtype=np.float32)
    weights[wstart[rank[inverse]] + below[pattern[inverse], slot]] = prep.data
    counts = np.zeros((npass, 16), dtype=np.int64)
    np.add.at(counts, (passes, pattern), 1)
    cptr = np.zeros((npass, 16), dtype=np.int64)
    cptr[:, 0] = np.concatenate(([0], np.cumsum(counts.sum(axis=1))[:-1]))
    cptr[:, 1:] = cptr[:, :1] + np.cumsum(counts[:, 1:], axis=1)
    wptr = np.zeros((npass, 16), dtype=np.int64)
    wptr[:, :15] = wstart[cptr[:, :15]]
    # The column's tap (of the conv group's channels) and that group's first channel give its span.
    cci, crs = np.divmod(cols[order] % ntap, kh * kw)
    cr, cs = np.divmod(crs, kw)
    cgroup = (passes[order] % ngroups) // per_conv
    offsets = lay.offsets(cgroup * cin_g + cci, cr, cs)
    filters = np.full((ngroups, GROUP_F), -1, dtype=np.int64)
    every = np.arange(cout)  # all-zero filters too: their outputs are the bias
    every_cg, every_j = np.divmod(every, mg)
    filters[every_cg * per_conv + every_j // GROUP_F, every_j % GROUP_F] = every
    cost = np.bincount(fgroup, minlength=ngroups).astype(np.int64) + 1
    bounds = balanced_bounds(cost, nparts, per_conv)  # on conv-group edges where near
    gstride = group + 2 * VW
    slots = GROUP_F * max(ngroups if by_image else int(np.diff(bounds).max(initial=0)), 1)
    return _Grouped(offsets=np.ascontiguousarray(offsets, dtype=off_dtype), weights=weights,
                    cptr=cptr.reshape(-1), wptr=wptr.reshape(-1), filters=filters, bounds=bounds, nblk=nblk,
                    group=group, wide=thread_rows(nparts, slots * gstride), gstride=gstride)


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


def direct_conv2d(prep: DirectConvPrep, x: np.ndarray, bias: np.ndarray | None, out: np.ndarray,
                  relu: bool = False, residual: np.ndarray | None = None) -> None:
    """``out = conv2d(x, W) + bias`` by direct sparse convolution; ``relu(conv2d(x, W) + bias)`` with
    ``relu``, applied as the tiles are stored or cropped (no second pass over ``out``; NaN stays NaN,
    as with ``torch.relu``). With ``residual``, ``relu(conv2d(x, W) + bias + residual)``: a residual
    connection added as the output is written.

    Parameters
    ----------
    prep : DirectConvPrep
    x : ndarray, shape (B, Cin, H, W), float32, C-contiguous
    bias : ndarray, shape (Cout,), float32, or None
    out : ndarray, shape (B, Cout, Hout, Wout), float32
        Written in full.
    relu : bool
        Fuse a ReLU into the output.
    residual : ndarray, shape (B, Cout, Hout, Wout), float32, optional
        Added to the convolution before the ReLU; must not share memory with ``out``.
    """
    if DEPTHWISE:
        from sparsecnn.kernels.depthwise import bind_depthwise_conv2d, is_depthwise

        if is_depthwise(prep):
            dst = out if out.flags.c_contiguous else np.empty(out.shape, dtype=np.float32)
            res = None if residual is None else _residual(residual, out, "direct_conv2d")
            bind_depthwise_conv2d(prep, tuple(x.shape), bias, dst, relu)(x, res)
            if dst is not out:
                out[...] = dst
            return
    ws = prep.workspace(x.shape)
    copy = not _reads_in_place(ws, x, 0)  # else the layout is x itself (stride 1, no padding)
    xc = x if x.flags.c_contiguous else np.ascontiguousarray(x)
    if copy and not ws.by_image:
        phase_copy(xc.reshape(x.shape[0], -1), ws.xt, ws.copies, ws.geo)
        xc, copy = ws.xt, False
    has_bias = bias is not None
    b = bias if has_bias else prep.data[:0]
    nb, cout = out.shape[:2]
    # The kernel writes planes of C-contiguous rows; any other out goes through a temporary.
    dst = out if out.flags.c_contiguous else np.empty(out.shape, dtype=np.float32)
    flat = dst.reshape(nb, cout * ws.hout * ws.wout)
    res = flat if residual is None else _residual(residual, out, "direct_conv2d")
    inp = (xc.reshape(nb, -1), ws.xt, ws.copies, ws.geo, copy)
    if ws.grouped is not None:
        g = ws.grouped
        _grouped_kernel(*inp, *_grouped_args(ws), b, has_bias, flat, ws.hout, ws.wout, g.wide, g.gstride,
                        g.bounds, ws.wph, ws.span, g.group, g.nblk, bool(relu), ws.by_image, ws.counter, res,
                        residual is not None, ws.hout * ws.wout)
    else:
        _direct_kernel(*inp, ws.offsets, ws.data, ws.bptr, b, has_bias, flat, ws.hout, ws.wout, ws.wide,
                       ws.gstride, ws.bounds, ws.wph, ws.span, ws.group, ws.tile, bool(relu), ws.by_image,
                       ws.counter, res, residual is not None, ws.hout * ws.wout)
    if dst is not out:
        out[...] = dst


def _residual(residual: np.ndarray, out: np.ndarray, what: str) -> np.ndarray:
    """``residual`` as the kernels read it: C-contiguous float32 ``(B, Cout * Hout * Wout)``, checked
    against ``out`` (same shape, no shared memory: the crop's whole-vector rows overrun)."""
    if not isinstance(residual, np.ndarray) or residual.shape != out.shape or residual.dtype != np.float32:
        raise ValueError(f"{what}: residual must be a float32 array of the output's shape {out.shape}")
    if np.shares_memory(residual, out):
        raise ValueError(f"{what}: residual must not share memory with out")
    return np.ascontiguousarray(residual).reshape(out.shape[0], -1)


def _grouped_args(ws: _Workspace) -> tuple[np.ndarray, ...]:
    g = ws.grouped
    return g.offsets, g.weights, g.cptr, g.wptr, g.filters


# Floats that must be readable after an input for the kernel to read it in place when its wide
# positions are not a whole number of vectors (the last vector of a plane reads up to VW - 1 floats
# past the plane: into the next channel, or past the array for the last one).
SLACK = 2 * VW
_PAGE = 4096  # bytes; memory is mapped (readable) in whole pages of at least this size


def _reads_in_place(ws: _Workspace, x: np.ndarray, slack: int) -> bool:
    """Whether the kernel may read ``x`` itself as its phase planes: the layout is ``x`` (stride 1, no
    padding), ``x`` is C-contiguous, and any lanes read past the end of ``x`` are readable: none are
    read (``ws.identity``), ``slack`` floats are known to follow ``x``, or the ``SLACK`` floats after
    ``x`` lie in the memory page of its last byte (a mapped page is readable in full; the values
    read there fall in lanes that are discarded)."""
    if not x.flags.c_contiguous or not ws.in_place:
        return False
    if ws.identity or slack >= SLACK:
        return True
    end = x.ctypes.data + x.nbytes
    return (end - 1) // _PAGE == (end + 4 * SLACK - 1) // _PAGE


def padded_plane(h: int, w: int) -> int:
    """Floats per channel of an activation whose ``h x w`` planes are padded to whole vectors: where a
    1x1 layer reads such a plane in place, every span starts on a cache line (ResNet-50's 14x14 and
    7x7 planes hold 196 and 49 floats, so their channels start inside a vector). The padding's lanes
    are read and discarded, never used."""
    return -(-(h * w) // VW) * VW


def bind_direct_conv2d(prep: DirectConvPrep, x_shape: tuple[int, int, int, int], bias: np.ndarray | None,
                       out: np.ndarray, relu: bool = False, slack: int = 0, in_stride: int = 0,
                       out_stride: int = 0, clamp: tuple[float, float] | None = None,
                       in_clamp: tuple[float, float] | None = None) -> Callable[..., None]:
    """``run(x)``: :func:`direct_conv2d` ``(prep, x, bias, out, relu)`` for inputs of ``x_shape``, with
    every argument but ``x`` bound once (the whole-model executor's steps). ``run(x, res)`` adds the
    residual connection ``res`` as :func:`direct_conv2d`'s ``residual`` does (C-contiguous float32 of
    the output's shape, not sharing memory with ``out``: not checked per call).

    The callable uses the calling thread's workspace of ``prep`` (the one :func:`direct_conv2d` uses),
    so it must be called from the thread that bound it: the executor binds per thread. Layers with fewer than
    ``_SERIAL_MACS`` multiply-adds run the serial twins of the kernels (no parallel launch), which copy
    the input inside the kernel (one call); the
    Python work of :func:`direct_conv2d` per call (workspace lookup, argument unpacking, reshapes:
    ~8 us) is done here once.

    Parameters
    ----------
    prep : DirectConvPrep
    x_shape : tuple of int, (B, Cin, H, W)
    bias : ndarray, shape (Cout,), float32, or None
    out : ndarray, shape (B, Cout, Hout, Wout), float32, C-contiguous
        Written in full by every call (with ``out_stride``: shape (B, Cout, out_stride), each plane's
        first Hout * Wout floats written, the rest of each channel left as it was).
    relu : bool
    in_stride, out_stride : int
        Where given, ``x`` (shape (B, Cin, in_stride)) and ``out`` (and ``res``) hold planes padded to
        whole vectors (:func:`padded_plane`): channel ``c`` at ``c * stride``. The executor gives them
        to chains of direct layers on 14x14 and 7x7 planes.
    clamp, in_clamp : tuple of float, (lo, hi), optional
        Depthwise layers only (:mod:`sparsecnn.kernels.depthwise`): the output clamped to ``[lo, hi]``
        as it is written, in place of ``relu``, and the input as it is copied (the executor's fused
        ReLU6 after or before the layer).
    slack : int
        Float32 elements that every ``x`` given to the callable is followed by in memory (the
        executor's buffers have ``SLACK``). A stride-1 layer without padding reads ``x`` in place, even
        where its planes are not a whole number of vectors (the lanes read past a plane are
        discarded), when ``SLACK`` floats after ``x`` are readable: given by ``slack``, else when they
        lie in the memory page of ``x``'s last byte (checked per call; about 99% of inputs). Copying
        it first cost more than the kernel on ResNet-50's 1x1 layers at 14x14 (1024 -> 256, 90%:
        0.36 ms with the copy, 0.16 ms in place).

    Returns
    -------
    callable
        ``run(x)`` with ``x`` of shape ``x_shape``, float32.
    """
    x_shape = tuple(int(v) for v in x_shape)
    if DEPTHWISE:
        from sparsecnn.kernels.depthwise import bind_depthwise_conv2d, is_depthwise

        if is_depthwise(prep):
            return bind_depthwise_conv2d(prep, x_shape, bias, out, relu, in_stride, out_stride, clamp,
                                         in_clamp)
    if clamp is not None or in_clamp is not None:
        raise ValueError("bind_direct_conv2d: clamp is fused into depthwise layers only")
    want = prep.output_shape(x_shape)
    if out_stride:
        if out_stride != padded_plane(*want[2:]):
            raise ValueError(f"bind_direct_conv2d: out_stride {out_stride} is not the padded plane of {want}")
        want = (*want[:2], out_stride)
    if not out.flags.c_contiguous or out.shape != want:
        raise ValueError(f"bind_direct_conv2d: out must be C-contiguous of shape {want}")
    if in_stride and in_stride != padded_plane(*x_shape[2:]):
        raise ValueError(f"bind_direct_conv2d: in_stride {in_stride} is not the padded plane of {x_shape}")
    # this thread's (the executor binds per thread and calls in turn)
    ws = prep.workspace(x_shape, in_stride) if in_stride else prep.workspace(x_shape)
    nb = x_shape[0]
    small = prep.nnz * ws.span * nb < _SERIAL_MACS
    has_bias = bias is not None
    b = bias if has_bias else prep.data[:0]
    flat = out.reshape(nb, -1)
    g = ws.grouped
    if g is not None:
        kernel = _grouped_kernel_serial if small else _grouped_kernel
        kargs = (*_grouped_args(ws), b, has_bias, flat, ws.hout, ws.wout, g.wide, g.gstride,
                 g.bounds, ws.wph, ws.span, g.group, g.nblk, bool(relu), ws.by_image, ws.counter)
    else:
        kernel = _direct_kernel_serial if small else _direct_kernel
        kargs = (ws.offsets, ws.data, ws.bptr, b, has_bias, flat, ws.hout, ws.wout, ws.wide,
                 ws.gstride, ws.bounds, ws.wph, ws.span, ws.group, ws.tile, bool(relu), ws.by_image,
                 ws.counter)
    ostride = out_stride or ws.hout * ws.wout
    xt, copies, geo = ws.xt, ws.copies, ws.geo
    pcopy = phase_copy_serial if small else phase_copy

    def run(x: np.ndarray, res: np.ndarray | None = None) -> None:
        copy = not _reads_in_place(ws, x, slack)
        xc = x if x.flags.c_contiguous else np.ascontiguousarray(x)
        tail = (flat, False) if res is None else (res.reshape(nb, -1), True)
        if copy and not ws.by_image:
            pcopy(xc.reshape(nb, -1), xt, copies, geo)
            kernel(xt, xt, copies, geo, False, *kargs, *tail, ostride)
        else:
            kernel(xc.reshape(nb, -1), xt, copies, geo, copy, *kargs, *tail, ostride)

    return run


def _phase_copies(h, w, sh, sw, ph, pw, hph, wph, phases):
    """For each materialised phase, a row ``(qi, i0, i1, j0, j1, hi0, wi0)``: the block of its plane
    that holds input pixels and where they start in ``x`` (the rest of the plane is padding)."""

    def span(q, p, s, n, nph_):
        lo = max(0, -((q - p) // s))  # first i with i * s + q - p >= 0
        hi = min(nph_, -(-(n + p - q) // s))  # first i with i * s + q - p >= n
        return lo, max(lo, hi)

    copies = []
    for qi, q in enumerate(phases):
        qh, qw = divmod(int(q), sw)
        (i0, i1), (j0, j1) = span(qh, ph, sh, h, hph), span(qw, pw, sw, w, wph)
        if i1 > i0 and j1 > j0:
            copies.append((qi, i0, i1, j0, j1, i0 * sh + qh - ph, j0 * sw + qw - pw))
    return np.array(copies, dtype=np.int64).reshape(-1, 7)


@jit
def image_input(x, b, xt, part, copies, geo, copy):
    """The phase planes that thread ``part`` reads for image ``b``: ``x[b]`` itself when not ``copy``
    (the layout is the input: stride 1, no padding), else its own buffer ``xt[part % len(xt)]``, into
    which image ``b`` is copied here:
    ``xt[., c * chan + qi * plane + i * wph + j] = x[b, c, hi0 + (i - i0) * sh, wi0 + (j - j0) * sw]``
    (x as (B, Cin * cstride), pixel ``(c, y, x)`` at ``c * cstride + y * w + x``, ``geo = (Cin, h, w,
    chan, plane, wph, sh, sw, cstride)``) for each row
    ``(qi, i0, i1, j0, j1, hi0, wi0)`` of ``copies``, ``i0 <= i < i1`` and ``j0 <= j < j1``. The
    padding around the pixels is zero from the allocation and never written.

    Used where the threads split a batch's images (:func:`split_by_image`): each thread copies its own
    images, inside the kernel, and reads only lines it wrote; and in layers small enough to run on one
    thread (one numba call instead of two: LeNet-5's conv2 12.7 -> 10.2 us a call). Where they split
    the filters (batch 1), the kernel gets the shared copy that :func:`phase_copy` made with
    ``copy=False`` (see :func:`split_by_image` for the per-thread copy measured there). Stride-1 rows
    of VW or more move as whole vectors, stride-2 rows as the even lanes of two
    (:func:`sparsecnn.kernels._simd.copy_even`; the scalar strided copy took 31% of ResNet's 3x3
    stride-2 layer at 90%), other rows through range-indexed slices (no negative-index check per
    element: 3x).
    NOTE: copies and geo come from the PhaseLayout of this x shape; xt rows hold its phase planes."""
    src = x[b]
    if not copy:
        return src
    dst = xt[part % xt.shape[0]]
    _copy_channels(src, dst, copies, geo, 0, geo[0])
    return dst


def image_counter(by_image: bool, nparts: int) -> np.ndarray:
    """The shared counter that :func:`next_image` takes images from: one int64 where the ``nparts``
    threads split the images and :data:`DYNAMIC_IMAGES` is on, else none (a static share each). One
    per workspace or bound layer (the executor binds per calling thread)."""
    return np.zeros(1 if by_image and DYNAMIC_IMAGES and nparts > 1 else 0, dtype=np.int64)


@jit(inline="always")
def next_image(counter, b, part, nparts, by_image):
    """The image a thread runs after image ``b`` (``b = -1``: its first). Split by filters every thread
    runs every image in turn. Split by images, with a one-element ``counter`` (reset to 0 before the
    parallel loop) the next one no thread has taken yet (:func:`sparsecnn.kernels._simd.fetch_add`),
    else ``part, part + nparts, ...`` (a static share).

    Why taken one at a time: the two vCPUs of this project's VM ran at different speeds from one
    moment to the next (a one-thread GEMM pinned to each in turn: 91 / 100, 102 / 87, 83 / 95
    GFLOP/s), and with a static share a batch waits for the slower thread's half (AlexNet DC at batch
    32: 1.02-1.10x faster taken one at a time, ``benchmarks.dynamic_images``)."""
    if not by_image:
        return np.int64(b + 1)
    if counter.size:
        return fetch_add(counter, 0, 1)
    return np.int64(part) if b < 0 else np.int64(b + nparts)


@jit
def _copy_wide_strides(src, dst, copies, geo, c0, c1):
    """:func:`_copy_channels` for strides of 3 and more across (AlexNet's conv1 at stride 4): rows
    outermost, phases inside, so the ``sw`` phases that read an input row read it in a row, from L1
    (phase by phase, each pass over the channel, 200 KB for conv1, read it from L2 or L3 again); and
    rows of at least VW outputs as every sw-th lane of sw vectors (3 and 4). AlexNet's conv1 at
    batch 32 spent 3.0-4.0 ms in these copies (5 cycles a float), 10% of the layer; now 0.8-1.2 ms
    (the two copies interleaved in one process, 2 threads). The same order and a lane-keeping copy
    of each stride in :func:`_copy_channels` ran 5-10% slower on stride-1 and stride-2 layers."""
    w, chan, plane, wph, sh, sw, cstride = geo[2], geo[3], geo[4], geo[5], geo[6], geo[7], geo[8]
    end = src.size
    nq = copies.shape[0]
    if nq == 0:
        return
    ilo, ihi = copies[0, 1], copies[0, 2]
    for q in range(1, nq):
        ilo, ihi = min(ilo, copies[q, 1]), max(ihi, copies[q, 2])
    for c in range(c0, c1):
        for i in range(ilo, ihi):
            for q in range(nq):
                i0 = copies[q, 1]
                if i < i0 or i >= copies[q, 2]:
                    continue
                si = c * cstride + (copies[q, 5] + (i - i0) * sh) * w + copies[q, 6]
                o = c * chan + copies[q, 0] * plane + i * wph + copies[q, 3]
                n = copies[q, 4] - copies[q, 3]
                # Whole vectors, the last one ending at the row's end (overlapping the one before);
                # its sw vectors read up to sw - 1 floats past the row (hence the test against the end
                # of x).
                if sw == 3 and n >= VW and si + 3 * n <= end:
                    for v in range(0, n - VW, VW):
                        copy_every3(src, si + 3 * v, dst, o + v)
                    copy_every3(src, si + 3 * (n - VW), dst, o + n - VW)
                elif sw == 4 and n >= VW and si + 4 * n <= end:
                    for v in range(0, n - VW, VW):
                        copy_every4(src, si + 4 * v, dst, o + v)
                    copy_every4(src, si + 4 * (n - VW), dst, o + n - VW)
                else:
                    srow = src[si : si + (n - 1) * sw + 1 : sw]
                    drow = dst[o : o + n]
                    for t in range(n):
                        drow[t] = srow[t]


@jit
def _copy_channels(src, dst, copies, geo, c0, c1):
    """Channels ``c0 <= c < c1`` of one image ``src`` (Cin * cstride floats) into its phase planes
    ``dst`` (see :func:`image_input`); strides of 3 and more across through :func:`_copy_wide_strides`."""
    w, chan, plane, wph, sh, sw, cstride = geo[2], geo[3], geo[4], geo[5], geo[6], geo[7], geo[8]
    end = src.size
    if sw > 2:
        _copy_wide_strides(src, dst, copies, geo, c0, c1)
        return
    for c in range(c0, c1):
        for q in range(copies.shape[0]):
            base = c * chan + copies[q, 0] * plane
            i0, i1, j0, j1 = copies[q, 1], copies[q, 2], copies[q, 3], copies[q, 4]
            hi0, wi0 = copies[q, 5], copies[q, 6]
            n = j1 - j0
            if sh == 1 and sw == 1 and n == w and n == wph and (i1 - i0) * n >= VW:
                # Whole rows on both sides: one run of (i1 - i0) * w floats (an in-place layout copied
                # onto planes of whole vectors, see phase_layout's align).
                si = c * cstride + hi0 * w
                o = base + i0 * wph
                m = (i1 - i0) * n
                for v in range(0, m - VW, VW):
                    copy_vec(src, si + v, dst, o + v)
                copy_vec(src, si + m - VW, dst, o + m - VW)
                continue
            for i in range(i0, i1):
                si = c * cstride + (hi0 + (i - i0) * sh) * w + wi0
                o = base + i * wph + j0
                if sw == 1 and n >= VW:
                    # Whole vectors; the last one ends at the row's end (overlapping the one before).
                    for v in range(0, n - VW, VW):
                        copy_vec(src, si + v, dst, o + v)
                    copy_vec(src, si + n - VW, dst, o + n - VW)
                elif sw == 2 and n >= VW and si + 2 * n <= end:
                    # The even lanes of two vectors per VW outputs; the last group ends at the row's end
                    # and reads one float past it (hence the test against the end of x).
                    for v in range(0, n - VW, VW):
                        copy_even(src, si + 2 * v, dst, o + v)
                    copy_even(src, si + 2 * (n - VW), dst, o + n - VW)
                else:
                    # Slices walked with a range index: no negative-index check per element (3x).
                    srow = src[si : si + (n - 1) * sw + 1 : sw]
                    drow = dst[o : o + n]
                    for t in range(n):
                        drow[t] = srow[t]


@pjit
def phase_copy(x, xt, copies, geo):
    """Every image of ``x`` (B, Cin * h * w) into its phase planes ``xt[b]``, (image, channel) pairs in
    parallel: the shared copy where the threads split the filters (:func:`split_by_image`), made
    before the kernel reads it with
    ``copy=False``."""
    cin = geo[0]
    for bc in numba.prange(x.shape[0] * cin):
        b = bc // cin
        c = bc - b * cin
        _copy_channels(x[b], xt[b], copies, geo, c, c + 1)


phase_copy_serial = serial_twin(phase_copy)


@jit
def _crop(w, n, dst, pos, r0, wph, wout, hout, relu, res, has_res):
    """Copy the valid columns of ``n`` wide-row positions, starting at the first column of row r0,
    to the output plane that starts at ``dst[pos]`` (rows of ``wout``); with ``has_res`` the
    residual at the same place in ``res`` (an array shaped as ``dst``) is added; then ``max(v, 0)``
    (NaN kept) when ``relu``.

    Each row is copied as whole vectors: the last one runs up to VW - 1 floats past the row into the
    next rows of the same plane, which are copied afterwards (later in this loop or in a later group
    of the same thread) and overwrite them. Rows whose overrun would leave the plane are copied
    exactly.
    """
    nrows = (n + wph - 1) // wph
    nfull = wout // VW
    nv = (wout + VW - 1) // VW
    over = nv * VW - wout
    for i in range(nrows):
        s = i * wph
        d = pos + (r0 + i) * wout
        exact = (hout - 1 - r0 - i) * wout < over
        for v in range(nfull if exact else nv):
            if has_res:
                add_vec_act(w, s + v * VW, res, d + v * VW, dst, d + v * VW, relu)
            else:
                copy_vec_act(w, s + v * VW, dst, d + v * VW, relu)
        if exact:
            for t in range(nfull * VW, wout):
                a = w[s + t] + res[d + t] if has_res else w[s + t]
                dst[d + t] = a if not relu or not a <= 0 else np.float32(0.0)  # NaN kept


@jit(inline="always")
def _add_residual(dst, res, pos, n, relu):
    """``dst[pos:pos + n] += res[pos:pos + n]``, then ``max(v, 0)`` (NaN kept) when ``relu``: whole
    vectors, the last partial one lane by lane (the floats after it are another plane's)."""
    nfull = n // VW
    for v in range(nfull):
        add_vec_act(dst, pos + v * VW, res, pos + v * VW, dst, pos + v * VW, relu)
    for t in range(pos + nfull * VW, pos + n):
        a = dst[t] + res[t]
        dst[t] = a if not relu or not a <= 0 else np.float32(0.0)  # NaN kept


@jit(inline="always")  # a call per tile costs more than a tile of a 1x1 layer at 90% (measured 1.6x)
def _pair_tiles(xb, offs, data, bptr, bias, has_bias, co, c1, p, target, wpos, wstride, nv, nvalid, relu):
    """Tiles of filters ``co`` and ``co + 1`` (``co`` alone when ``co + 1 == c1``) over all their
    nonzeros (one channel block): :func:`pair_tile` or :func:`span_tile`, ReLU on store if ``relu``."""
    ba = bias[co] if has_bias else np.float32(0.0)
    if co + 1 < c1:
        bb = bias[co + 1] if has_bias else np.float32(0.0)
        pair_tile(xb, offs, data, bptr[0, co], bptr[0, co + 1], bptr[0, co + 1], bptr[0, co + 2], p, target,
                  wpos, wstride, nv, nvalid, ba, bb, relu)
    else:
        span_tile(xb, offs, data, bptr[0, co], bptr[0, co + 1], p, target, wpos, nv, nvalid, ba, False, 1,
                  relu)


@pjit
def _direct_kernel(x, xt, copies, geo, copy, offs, data, bptr, bias, has_bias, out, hout, wout, wide, gstride,
                   bounds, wph, span, group, tile, relu, by_image, counter, res, has_res, ostride):
    """Direct sparse convolution over prepared spans, parallel over balanced output-channel ranges.

    For each image and each group of ``group`` wide-row positions (whole rows), the output channels
    of the thread's range compute the group two at a time in register tiles
    (:func:`sparsecnn.kernels._simd.pair_tile`; a last odd channel with ``span_tile``) into the
    thread's wide buffer, and the valid columns go to ``out`` (straight into ``out`` when the wide rows
    are the output rows, ``wph == wout``). With several input-channel blocks the loops turn: for each
    register tile and each block, every filter adds the block's nonzeros into its own 12-vector tile,
    so the block's input is read from L1 by all of them. With ``relu``, ``max(., 0)`` as the final
    values are stored (the direct tiles' store, else the crop).
    With ``copy`` each thread phase-copies image ``b`` into its own buffer (:func:`image_input`);
    without, ``x`` holds the phase planes (the input read in place, or the shared copy). With
    ``by_image`` the threads split the images instead (each runs every filter on an image at a time;
    wide holds every filter): the next image free (:func:`next_image`) with a one-element ``counter``,
    else thread ``part`` images ``part, part + nparts, ...``.
    NOTE: offs/xt/copies/geo come from the same workspace (xt rows padded past the last span); out is
    (B, Cout * ostride) C-contiguous, output channel ``co``'s plane (hout * wout floats) at ``co *
    ostride`` (``ostride = hout * wout``, or that rounded up to whole vectors: a padded plane), res
    the same; wout <= wph; wide holds gstride >= group + 2 * VW floats per output channel of the
    largest range; group is a multiple of wph.
    """
    nb = out.shape[0]
    plane = ostride
    nparts = bounds.size - 1
    nblk = bptr.shape[0]
    direct = wph == wout and nblk == 1
    if counter.size:
        counter[0] = 0
    for part in numba.prange(nparts):
        w = wide[part]
        c0 = bounds[0] if by_image else bounds[part]
        c1 = bounds[nparts] if by_image else bounds[part + 1]
        b = next_image(counter, -1, part, nparts, by_image)
        while b < nb:
            xb = image_input(x, b, xt, part, copies, geo, copy)
            dst = out[b]
            rb = res[b]
            for p0 in range(0, span, group):
                n = min(group, span - p0)
                nvec = (n + VW - 1) // VW
                ntiles = (nvec + tile - 1) // tile
                r0 = p0 // wph  # groups are whole rows
                if nblk == 1:
                    # One block: a filter pair's nonzeros stay in L1 across the tiles of the group.
                    for co in range(c0, c1, 2):
                        for t in range(ntiles):
                            v0, nv = tile_split(nvec, t, ntiles)
                            p = p0 + v0 * VW
                            if direct:
                                _pair_tiles(xb, offs, data, bptr, bias, has_bias, co, c1, p, dst,
                                            co * plane + p, plane, nv, span - p, relu and not has_res)
                                if has_res:  # the tiles just stored, still in L1
                                    for f in range(co, min(co + 2, c1)):
                                        _add_residual(dst, rb, f * plane + p, min(nv * VW, span - p), relu)
                            else:
                                _pair_tiles(xb, offs, data, bptr, bias, has_bias, co, c1, p, w,
                                            v0 * VW, gstride, nv, nv * VW, False)
                        if not direct:
                            for f in range(co, min(co + 2, c1)):
                                _crop(w[(f - co) * gstride:], n, dst, f * plane, r0, wph, wout, hout, relu,
                                      rb, has_res)
                else:
                    ntiles = (nvec + tile - 1) // tile
                    for t in range(ntiles):
                        v0, nv = tile_split(nvec, t, ntiles)
                        p = p0 + v0 * VW
                        for kb in range(nblk):
                            acc = kb > 0
                            for co in range(c0, c1):
                                ba = bias[co] if has_bias else np.float32(0.0)
                                span_tile(xb, offs, data, bptr[kb, co], bptr[kb, co + 1], p, w,
                                          (co - c0) * gstride + v0 * VW, nv, nv * VW, ba, acc, 1, False)
                    for co in range(c0, c1):
                        _crop(w[(co - c0) * gstride:], n, dst, co * plane, r0, wph, wout, hout, relu, rb,
                              has_res)
            b = next_image(counter, b, part, nparts, by_image)


@pjit
def _grouped_kernel(x, xt, copies, geo, copy, offs, wts, cptr, wptr, filters, bias, has_bias, out, hout, wout,
                    wide, gstride, bounds, wph, span, group, nblk, relu, by_image, counter, res, has_res,
                    ostride):
    """Direct sparse convolution in filter-group tiles (:func:`sparsecnn.kernels._simd.group_tile`),
    parallel over balanced ranges of filter groups.

    For each image and each group of ``group`` wide-row positions (whole rows whose input is in L2):
    channel block after block, tile after tile along the rows, every filter group of the thread adds
    the block's columns into its ``GROUP_F`` x ``GROUP_NV``-vector tile (accumulated across blocks in
    ``wide``), so a tile's input window of the block (sized for L1) is read from L1 by all of them and
    the block's columns stay in L2 across the tiles; then the valid columns of every filter go to
    ``out`` (ReLU on the copy with ``relu``). Blocks are as large as L1 allows: each pass runs 15
    pattern loops per tile, whose exits cost where a pattern has few columns.
    With ``copy`` each thread phase-copies image ``b`` itself (:func:`image_input`), without it ``x``
    holds the phase planes; with ``by_image`` the threads split the images, each running every filter
    group on its own (taken as :func:`_direct_kernel` takes them, by ``counter``).
    NOTE: offs/xt/copies/geo from the same workspace; out (B, Cout * ostride) C-contiguous (as
    :func:`_direct_kernel`'s); wide holds GROUP_F * gstride floats per filter group of the largest
    range; group is a multiple of wph.
    """
    nb = out.shape[0]
    plane = ostride
    nparts = bounds.size - 1
    ngroups = filters.shape[0]
    zero = np.float32(0.0)
    if counter.size:
        counter[0] = 0
    for part in numba.prange(nparts):
        w = wide[part]
        g0 = bounds[0] if by_image else bounds[part]
        g1 = bounds[nparts] if by_image else bounds[part + 1]
        b = next_image(counter, -1, part, nparts, by_image)
        while b < nb:
            xb = image_input(x, b, xt, part, copies, geo, copy)
            dst = out[b]
            rb = res[b]
            for p0 in range(0, span, group):
                n = min(group, span - p0)
                nvec = (n + VW - 1) // VW
                ntiles = (nvec + GROUP_NV - 1) // GROUP_NV
                r0 = p0 // wph
                for kb in range(nblk):
                    for t in range(ntiles):
                        v0, nv = tile_split(nvec, t, ntiles)
                        for g in range(g0, g1):
                            i0 = bias[filters[g, 0]] if has_bias and filters[g, 0] >= 0 else zero
                            i1 = bias[filters[g, 1]] if has_bias and filters[g, 1] >= 0 else zero
                            i2 = bias[filters[g, 2]] if has_bias and filters[g, 2] >= 0 else zero
                            i3 = bias[filters[g, 3]] if has_bias and filters[g, 3] >= 0 else zero
                            wpos = (g - g0) * GROUP_F * gstride + v0 * VW
                            group_tile(xb, offs, wts, cptr, wptr, (kb * ngroups + g) * 16, p0 + v0 * VW, w,
                                       wpos, gstride, nv, nv * VW, kb > 0, i0, i1, i2, i3)
                for g in range(g0, g1):
                    for f in range(GROUP_F):
                        co = filters[g, f]
                        if co >= 0:
                            slot = (g - g0) * GROUP_F + f
                            _crop(w[slot * gstride:], n, dst, co * plane, r0, wph, wout, hout, relu, rb,
                                  has_res)
            b = next_image(counter, b, part, nparts, by_image)


_direct_kernel_serial = serial_twin(_direct_kernel)
_grouped_kernel_serial = serial_twin(_grouped_kernel)
