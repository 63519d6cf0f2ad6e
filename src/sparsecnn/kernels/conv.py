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
at a precomputed offset. For stride 1 the phase plane is the padded plane itself. The offsets depend on
the input shape and live in a per-shape workspace inside the prep object, with the phase-decomposed
input buffer, so a call allocates nothing after the first one for a shape.

The inner loop adds eight nonzeros per pass over an output tile
(``acc[j] += v0*s0[j] + ... + v7*s7[j]``): one load and one store of the output per eight multiply-adds
instead of per one, which is what makes the loop compute-bound rather than store-bound.

Input-channel blocking (SkimCaffe's loop order: a block of input channels kept in L1 and used by every
output channel before the next block) was measured here and lost: on a Zen 3 core, conv3 of AlexNet
at 90% took 1.30 ms blocked (18 channels x the whole 13x13 plane per block) against 1.11 ms unblocked,
single thread, same process, interleaved. A block holds only ~16 nonzeros per filter, so the passes
over the output tile get short and their tails (groups of 4, 2, 1) and per-pass setup cost more than
the L2 -> L1 traffic they save. The loop below therefore runs all nonzeros of one output channel over
one L1-resident output tile of up to ``_TILE`` floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np

from sparsecnn.kernels._numba import jit, pjit

__all__ = ["DirectConvPrep", "direct_conv2d", "prepare_direct"]

# Output tile width in floats (whole wide rows): the tile of one output channel stays in L1 while all
# of its nonzeros stream their input spans through it; 16 KiB leaves L1 room for the spans.
_TILE = 4096


def _index_dtype(n: int) -> np.dtype:
    """The narrowest signed integer dtype that holds ``0 .. n - 1``."""
    if n <= np.iinfo(np.int16).max + 1:
        return np.dtype(np.int16)
    if n <= np.iinfo(np.int32).max + 1:
        return np.dtype(np.int32)
    return np.dtype(np.int64)


@dataclass(eq=False)
class _Workspace:
    """Per-input-shape state: span offsets, the phase-decomposed input and the output tiles."""

    offsets: np.ndarray  # (nnz,) offset of each nonzero's span inside one image's phase planes
    xt: np.ndarray  # (B, Cin * sh * sw * Hph * Wph) phase-decomposed padded input
    acc: np.ndarray  # (nparts, tile + 8) one output tile per thread
    bounds: np.ndarray  # (nparts + 1,) output-channel ranges with balanced nonzero counts
    hph: int
    wph: int
    hout: int
    wout: int
    span: int  # (hout - 1) * wph + wout
    tile: int


@dataclass(eq=False)
class DirectConvPrep:
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

    weight_shape: tuple[int, int, int, int]
    groups: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    _workspaces: dict = field(default_factory=dict, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored sparse weights: values, indices and pointers at their dtypes."""
        return int(self.indptr.nbytes + self.indices.nbytes + self.data.nbytes)

    def output_shape(self, x_shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """``(B, Cout, Hout, Wout)`` for an input of shape ``(B, Cin, H, W)``."""
        b, _, h, w = x_shape
        cout, _, kh, kw = self.weight_shape
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        hout = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wout = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return b, cout, hout, wout

    def workspace(self, x_shape: tuple[int, int, int, int]) -> _Workspace:
        nparts = numba.get_num_threads()
        key = (*x_shape, nparts)
        ws = self._workspaces.get(key)
        if ws is None:
            ws = self._build_workspace(x_shape, nparts)
            self._workspaces[key] = ws
        return ws

    def _build_workspace(self, x_shape: tuple[int, int, int, int], nparts: int) -> _Workspace:
        b, cin, h, w = x_shape
        cout, cin_g, kh, kw = self.weight_shape
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        _, _, hout, wout = self.output_shape(x_shape)
        hp, wp = h + 2 * ph, w + 2 * pw
        hph, wph = -(-hp // sh), -(-wp // sw)
        plane = hph * wph
        nph = sh * sw
        # Decode the flat tap index of every nonzero and turn it into a span offset.
        idx = self.indices.astype(np.int64)
        ci, rs = np.divmod(idx, kh * kw)
        r, s = np.divmod(rs, kw)
        co = np.repeat(np.arange(cout), np.diff(self.indptr))
        c = (co // (cout // self.groups)) * cin_g + ci
        phase = ((r * dh) % sh) * sw + (s * dw) % sw
        off = (c * nph + phase) * plane + ((r * dh) // sh) * wph + (s * dw) // sw
        per_image = cin * nph * plane
        off_dtype = np.int32 if per_image <= np.iinfo(np.int32).max else np.int64
        span = (hout - 1) * wph + wout
        # Whole wide rows per tile, so cropping a tile into the output is a row copy.
        rows = max(1, min(hout, _TILE // wph))
        tile = rows * wph
        counts = np.diff(self.indptr).astype(np.int64) + 1  # +1: an empty filter still costs a bias fill
        bounds = _balanced_bounds(counts, nparts)
        return _Workspace(
            offsets=np.ascontiguousarray(off, dtype=off_dtype),
            xt=np.zeros((b, per_image), dtype=np.float32),
            acc=np.zeros((nparts, tile + 8), dtype=np.float32),
            bounds=bounds,
            hph=hph,
            wph=wph,
            hout=hout,
            wout=wout,
            span=span,
            tile=tile,
        )


def _balanced_bounds(cost: np.ndarray, nparts: int) -> np.ndarray:
    """Split ``range(len(cost))`` into ``nparts`` contiguous ranges of about equal total cost."""
    cum = np.concatenate(([0], np.cumsum(cost)))
    targets = cum[-1] * np.arange(nparts + 1) / nparts
    bounds = np.searchsorted(cum, targets, side="left").astype(np.int64)
    bounds[0], bounds[-1] = 0, cost.size
    return np.maximum.accumulate(bounds)


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


def direct_conv2d(prep: DirectConvPrep, x: np.ndarray, bias: np.ndarray | None, out: np.ndarray) -> None:
    """``out = conv2d(x, W) + bias`` by direct sparse convolution.

    Parameters
    ----------
    prep : DirectConvPrep
    x : ndarray, shape (B, Cin, H, W), float32, C-contiguous
    bias : ndarray, shape (Cout,), float32, or None
    out : ndarray, shape (B, Cout, Hout, Wout), float32
        Written in full.
    """
    ws = prep.workspace(x.shape)
    sh, sw = prep.stride
    ph, pw = prep.padding
    _phase_decompose(x, ws.xt, sh, sw, ph, pw, ws.hph, ws.wph)
    has_bias = bias is not None
    b = bias if has_bias else prep.data[:0]
    _direct_kernel(
        ws.xt, ws.offsets, prep.data, prep.indptr, b, has_bias, out, ws.acc, ws.bounds, ws.wph, ws.span,
        ws.tile,
    )


@pjit
def _phase_decompose(x, xt, sh, sw, ph, pw, hph, wph):
    """Zero-padded, phase-decomposed copy of ``x`` into ``xt`` (see the module docstring).

    NOTE: xt has shape (B, Cin * sh * sw * hph * wph); every element is written.
    """
    nb, cin, h, w = x.shape
    nph = sh * sw
    plane = hph * wph
    for bc in numba.prange(nb * cin):
        b = bc // cin
        c = bc - b * cin
        for q in range(nph):
            qh = q // sw
            qw = q - qh * sw
            base = (c * nph + q) * plane
            for i in range(hph):
                row = base + i * wph
                hi = i * sh + qh - ph
                if hi < 0 or hi >= h:
                    for j in range(wph):
                        xt[b, row + j] = 0.0
                    continue
                if sw == 1:
                    # Contiguous row: left pad, copy, right pad.
                    lo = min(max(pw, 0), wph)
                    n = min(w, wph - lo)
                    for j in range(lo):
                        xt[b, row + j] = 0.0
                    for j in range(n):
                        xt[b, row + lo + j] = x[b, c, hi, j]
                    for j in range(lo + n, wph):
                        xt[b, row + j] = 0.0
                else:
                    for j in range(wph):
                        wi = j * sw + qw - pw
                        xt[b, row + j] = x[b, c, hi, wi] if 0 <= wi < w else 0.0


@jit
def _accumulate(acc, n, xb, offs, data, k0, k1, p0):
    """``acc[:n] += sum_k data[k] * xb[offs[k] + p0 : offs[k] + p0 + n]`` for ``k0 <= k < k1``.

    Eight nonzeros per pass over ``acc`` (then four, then one), so the output tile is loaded and
    stored once per eight multiply-adds.
    NOTE: every span lies inside xb (guaranteed by the layout); acc has at least n elements.
    """
    a = acc[:n]
    k = k0
    while k + 8 <= k1:
        o0 = offs[k] + p0
        o1 = offs[k + 1] + p0
        o2 = offs[k + 2] + p0
        o3 = offs[k + 3] + p0
        o4 = offs[k + 4] + p0
        o5 = offs[k + 5] + p0
        o6 = offs[k + 6] + p0
        o7 = offs[k + 7] + p0
        v0, v1, v2, v3 = data[k], data[k + 1], data[k + 2], data[k + 3]
        v4, v5, v6, v7 = data[k + 4], data[k + 5], data[k + 6], data[k + 7]
        s0, s1, s2, s3 = xb[o0 : o0 + n], xb[o1 : o1 + n], xb[o2 : o2 + n], xb[o3 : o3 + n]
        s4, s5, s6, s7 = xb[o4 : o4 + n], xb[o5 : o5 + n], xb[o6 : o6 + n], xb[o7 : o7 + n]
        for j in range(n):
            a[j] += ((v0 * s0[j] + v1 * s1[j]) + (v2 * s2[j] + v3 * s3[j])) + (
                (v4 * s4[j] + v5 * s5[j]) + (v6 * s6[j] + v7 * s7[j])
            )
        k += 8
    if k + 4 <= k1:
        o0 = offs[k] + p0
        o1 = offs[k + 1] + p0
        o2 = offs[k + 2] + p0
        o3 = offs[k + 3] + p0
        v0, v1, v2, v3 = data[k], data[k + 1], data[k + 2], data[k + 3]
        s0, s1, s2, s3 = xb[o0 : o0 + n], xb[o1 : o1 + n], xb[o2 : o2 + n], xb[o3 : o3 + n]
        for j in range(n):
            a[j] += (v0 * s0[j] + v1 * s1[j]) + (v2 * s2[j] + v3 * s3[j])
        k += 4
    if k + 2 <= k1:
        o0 = offs[k] + p0
        o1 = offs[k + 1] + p0
        v0, v1 = data[k], data[k + 1]
        s0, s1 = xb[o0 : o0 + n], xb[o1 : o1 + n]
        for j in range(n):
            a[j] += v0 * s0[j] + v1 * s1[j]
        k += 2
    if k < k1:
        o0 = offs[k] + p0
        v0 = data[k]
        s0 = xb[o0 : o0 + n]
        for j in range(n):
            a[j] += v0 * s0[j]


@pjit
def _direct_kernel(xt, offs, data, indptr, bias, has_bias, out, acc, bounds, wph, span, tile):
    """Direct sparse convolution over prepared spans, parallel over balanced output-channel ranges.

    NOTE: offs/xt come from the same workspace; tile is a whole number of wide rows (wph each);
    out is (B, Cout, Hout, Wout) with Wout <= wph.
    """
    nb, _, hout, wout = out.shape
    nparts = bounds.size - 1
    for part in numba.prange(nparts):
        a = acc[part]
        for co in range(bounds[part], bounds[part + 1]):
            k0 = indptr[co]
            k1 = indptr[co + 1]
            bv = bias[co] if has_bias else np.float32(0.0)
            for b in range(nb):
                xb = xt[b]
                for p0 in range(0, span, tile):
                    n = min(tile, span - p0)
                    for j in range(n):
                        a[j] = bv
                    _accumulate(a, n, xb, offs, data, k0, k1, p0)
                    row0 = p0 // wph
                    nrows = min(hout - row0, tile // wph)
                    for i in range(nrows):
                        src = i * wph
                        for j in range(wout):
                            out[b, co, row0 + i, j] = a[src + j]
