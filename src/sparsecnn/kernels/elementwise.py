"""Elementwise and pooling kernels of the whole-model executor (:mod:`sparsecnn.engine`).

What runs between the convolutions and linears of a CNN: ReLU, the residual add (with its ReLU
fused, one pass over the activation instead of two), max pooling and global average pooling. Each is
one numba pass over raw C-contiguous float32 arrays with the output passed in, so the executor calls
compiled code with preallocated buffers and allocates nothing per call.

NaN propagates as in torch: ``relu(NaN) = NaN`` (``v > 0`` is false for NaN, so the select keeps
``v`` whenever ``not v <= 0``), and a NaN in a pooling window makes the window's maximum NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

from sparsecnn.kernels._numba import jit, num_threads, pjit, serial_twin
from sparsecnn.kernels._simd import max3_cols2, max3_rows

__all__ = ["add_relu", "bind_global_avg_pool", "bind_max_pool2d", "bind_pad2d", "clamp_", "global_avg_pool",
           "max_pool2d", "relu_"]

# Below this many elements a parallel launch (~2 us) costs more than the pass itself.
_PARALLEL_MIN = 1 << 15


@jit
def _relu_serial(a):
    for i in range(a.size):
        if a[i] <= np.float32(0.0):  # NaN compares false and is kept
            a[i] = np.float32(0.0)


@pjit
def _relu_parallel(a, chunk):
    """NOTE: each chunk is a slice handed to the serial loop: a loop indexed by the prange body itself
    stays scalar (numba's parallel body gives LLVM no alias facts), measured 8-15x slower."""
    n = a.size
    for c in numba.prange((n + chunk - 1) // chunk):
        lo = c * chunk
        _relu_serial(a[lo : min(n, lo + chunk)])


@jit
def _clamp_serial(a, lo, hi):
    for i in range(a.size):
        v = a[i]
        if v < lo:  # NaN compares false both ways and is kept, as torch.clamp keeps it
            a[i] = lo
        elif v > hi:
            a[i] = hi


@pjit
def _clamp_parallel(a, lo, hi, chunk):
    """Chunks handed to the serial loop (see :func:`_relu_parallel`)."""
    n = a.size
    for c in numba.prange((n + chunk - 1) // chunk):
        lo_ = c * chunk
        _clamp_serial(a[lo_ : min(n, lo_ + chunk)], lo, hi)


def clamp_(a: np.ndarray, lo: float, hi: float) -> None:
    """``a = min(max(a, lo), hi)`` in place, NaN kept (``torch.clamp``, ``nn.ReLU6``, ``nn.Hardtanh``).

    Parameters
    ----------
    a : ndarray, shape (n,), float32, C-contiguous
    lo, hi : float
        Bounds, ``lo <= hi``; -inf / inf for none.
    """
    if a.size >= _PARALLEL_MIN:
        _clamp_parallel(a, np.float32(lo), np.float32(hi), 1 << 14)
    else:
        _clamp_serial(a, np.float32(lo), np.float32(hi))


def relu_(a: np.ndarray) -> None:
    """``a = max(a, 0)`` in place, NaN kept.

    Parameters
    ----------
    a : ndarray, shape (n,), float32, C-contiguous
    """
    if a.size >= _PARALLEL_MIN:
        _relu_parallel(a, 1 << 14)
    else:
        _relu_serial(a)


@jit
def _add_serial(a, b, out, relu):
    if relu:
        for i in range(out.size):
            v = a[i] + b[i]
            out[i] = np.float32(0.0) if v <= np.float32(0.0) else v  # NaN kept
    else:
        for i in range(out.size):
            out[i] = a[i] + b[i]


@pjit
def _add_parallel(a, b, out, relu, chunk):
    """NOTE: chunks go to the serial loop as slices (see _relu_parallel: 8-15x faster than a loop
    indexed inside the prange body)."""
    n = out.size
    for c in numba.prange((n + chunk - 1) // chunk):
        lo = c * chunk
        hi = min(n, lo + chunk)
        _add_serial(a[lo:hi], b[lo:hi], out[lo:hi], relu)


def add_relu(a: np.ndarray, b: np.ndarray, out: np.ndarray, relu: bool) -> None:
    """``out = a + b``, then ``max(out, 0)`` when ``relu`` (a residual connection and its ReLU).

    Parameters
    ----------
    a, b, out : ndarray, shape (n,), float32, C-contiguous
        ``out`` may be ``a`` or ``b`` (each element is read before it is written).
    relu : bool
    """
    if out.size >= _PARALLEL_MIN:
        _add_parallel(a, b, out, relu, 1 << 14)
    else:
        _add_serial(a, b, out, relu)


@jit
def _pool_row(vm, orow, kw, sw, pw, dw, lo, hi):
    """``orow[ow]`` = max over the window of ``vm`` (NaN wins, padding skipped) for ``ow`` outside
    ``[lo, hi)``, the outputs whose window lies wholly inside, which the caller does."""
    w = vm.size
    nout = orow.size
    for q in range(lo + nout - hi):
        ow = q if q < lo else hi + q - lo
        w0 = ow * sw - pw
        m = np.float32(-np.inf)
        for t in range(kw):
            wi = w0 + t * dw
            if wi >= 0 and wi < w:
                v = vm[wi]
                m = v if (v > m) | (v != v) else m
        orow[ow] = m


@jit(inline="always")  # a call per output row doubled the tiny-plane pool's time (4x4 planes)
def _rows_max(xp, vm, h0, kh, dh):
    """``vm[:]`` = the max, NaN winning, over the rows ``h0 + r * dh`` (``0 <= r < kh``) of the plane
    ``xp`` that lie inside it, column by column (whole rows: vectorised); -inf where none does (a
    window in the padding: torch gives -inf)."""
    h, w = xp.shape
    first = True
    for r in range(kh):
        hr = h0 + r * dh
        if hr < 0 or hr >= h:
            continue
        row = xp[hr]
        if first:
            for j in range(w):
                vm[j] = row[j]
            first = False
        else:
            for j in range(w):
                v = row[j]
                m = vm[j]
                vm[j] = v if (v > m) | (v != v) else m
    if first:
        for j in range(w):
            vm[j] = -np.inf


@jit
def _pool_plane(xp, op, vm, kh, kw, sh, sw, ph, pw, dh, dw):
    """One plane of :func:`_max_pool_kernel`. A serial function of its own, called once per plane:
    inside a ``prange`` body numba leaves these index loops scalar; here the row pass vectorises
    (docs/engine.md, the prange trap). The column pass runs the outputs whose window lies inside the
    row without bounds tests, unrolled for 2- and 3-wide windows (a runtime-length tap loop with a
    bounds test per tap cost 3.5x), and for strides 1 and 2 with the stride a constant and
    non-negative range indices, which LLVM vectorises: ResNet-18's 3x3/2 pool of 64 x 112 x 112 on
    one thread went from 0.85 to 0.29 ms, of which 0.46 ms was :func:`_pool_row` walking every output
    of each row to find the few edge ones. NaN wins a comparison, as in torch."""
    w = xp.shape[1]
    hout, wout = op.shape
    span = (kw - 1) * dw
    lo = min(wout, (pw + sw - 1) // sw)  # first output whose window starts inside the row
    hi = max(lo, min(wout, (w - 1 - span + pw) // sw + 1)) if w - 1 - span + pw >= 0 else lo
    h = xp.shape[0]
    for oh in range(hout):
        h0 = oh * sh - ph
        if kh == 3 and dh == 1 and h0 >= 0 and h0 + 2 < h:
            max3_rows(xp, h0 * w, w, vm, 0, w)  # three whole rows, vectors (AlexNet's and ResNet's pools)
        else:
            _rows_max(xp, vm, h0, kh, dh)
        n = hi - lo
        if kw == 3 and dw == 1 and sw == 2:
            # Even and odd lanes of vector pairs (see max3_cols2); the loop LLVM vectorised with a
            # constant stride here (6x the runtime stride) ran AlexNet's pool1 at batch 32 at ~2
            # cycles an input pixel, with this row pass.
            max3_cols2(vm, max(lo * sw - pw, 0), op, oh * wout + lo, n)
            if lo > 0 or hi < wout:
                _pool_row(vm, op[oh], kw, sw, pw, dw, lo, hi)
            continue
        orow = op[oh]
        seg = vm[max(lo * sw - pw, 0):]  # the first inside window starts here (lo * sw >= pw)
        dst = orow[lo:hi]
        if kw == 3 and dw == 1 and sw == 1:
            for t in range(n):
                a, b, c = seg[t], seg[t + 1], seg[t + 2]
                m = b if (b > a) | (b != b) else a
                dst[t] = c if (c > m) | (c != c) else m
        elif kw == 2 and dw == 1 and sw == 2:
            for t in range(n):
                a, b = seg[2 * t], seg[2 * t + 1]
                dst[t] = b if (b > a) | (b != b) else a
        elif kw == 3 and dw == 1:
            for ow in range(lo, hi):
                w0 = ow * sw - pw
                a, b, c = vm[w0], vm[w0 + 1], vm[w0 + 2]
                m = b if (b > a) | (b != b) else a
                orow[ow] = c if (c > m) | (c != c) else m
        elif kw == 2 and dw == 1:
            for ow in range(lo, hi):
                w0 = ow * sw - pw
                a, b = vm[w0], vm[w0 + 1]
                orow[ow] = b if (b > a) | (b != b) else a
        else:
            for ow in range(lo, hi):
                w0 = ow * sw - pw
                m = vm[w0]
                for t in range(1, kw):
                    v = vm[w0 + t * dw]
                    m = v if (v > m) | (v != v) else m
                orow[ow] = m
        if lo > 0 or hi < wout:
            _pool_row(vm, orow, kw, sw, pw, dw, lo, hi)


@pjit
def _max_pool_kernel(x, out, kh, kw, sh, sw, ph, pw, dh, dw, tmp):
    """Separable max pooling: per output row, the max over the window's rows inside x (whole
    contiguous rows: vectorised), then per output column the max over that row's window columns
    inside x. Padding counts as -inf, i.e. is skipped. One plane per task (:func:`_pool_plane`).
    NOTE: x (P, H, W), out (P, Hout, Wout) and tmp (P, W) C-contiguous, P = B * C; out's size from
    torch's formula (no window lies wholly in the padding)."""
    for p in numba.prange(x.shape[0]):
        _pool_plane(x[p], out[p], tmp[p], kh, kw, sh, sw, ph, pw, dh, dw)


# Planes of at most this many pixels take the direct per-output loop (:func:`_max_pool_small`).
_SMALL_PLANE = 64


@pjit
def _max_pool_small(x, out, kh, kw, sh, sw, ph, pw, dh, dw, tmp):
    """:func:`_max_pool_kernel` for tiny planes whose windows do not tile them (padding, overlapping
    windows; :func:`_max_pool_tiled` takes the rest), with no row views or helper
    calls per plane (those cost about 0.5 us a plane: LeNet-5's second pool, 32 x 16 planes of 4x4
    at batch 32, took 0.25 ms, more than both conv layers). Per output row, the max over the
    window's rows inside the plane goes to the plane's scratch row ``tmp[p]`` (independent lanes),
    then each output is the max over its window's columns of that row. The per-output loop over the
    whole window it replaced (each compare waiting on the one before), serial, interleaved: 20 planes
    of 8x8 (2 x 2, stride 2) 2.9 -> 1.8 us, 64 planes of 8x8 (3 x 3) 9.0 -> 5.6 us; on 4x4 planes
    only 8% (50 planes 2.0 -> 1.8 us). NaN wins a comparison, as in torch. NOTE: as
    :func:`_max_pool_kernel`."""
    w = x.shape[2]
    hout, wout = out.shape[1], out.shape[2]
    for p in numba.prange(x.shape[0]):
        row = tmp[p]
        for oh in range(hout):
            _rows_max(x[p], row, oh * sh - ph, kh, dh)
            for ow in range(wout):
                w0 = ow * sw - pw
                m = np.float32(-np.inf)
                for t in range(kw):
                    wc = w0 + t * dw
                    if wc < 0 or wc >= w:
                        continue
                    v = row[wc]
                    m = v if (v > m) | (v != v) else m
                out[p, oh, ow] = m


@jit
def _pool_tiles(xf, of, vf, w, kh, kw, i0, i1):
    """Rows ``i0 <= i < i1`` of :func:`_max_pool_tiled` (flat arrays, no views: a view per row costs
    two reference-count updates). First each output row's max over its ``kh`` input rows into ``vf``
    (rows of ``w``), then the max over every ``kw`` consecutive floats of those rows, one long loop
    with a constant stride, which LLVM vectorises."""
    for i in range(i0, i1):
        s0 = i * kh * w
        d0 = i * w
        if kh == 2:  # one pass, no read-back of vf (2x faster on LeNet-5's 8-float rows)
            for j in range(w):
                a = xf[s0 + j]
                b = xf[s0 + w + j]
                vf[d0 + j] = b if (b > a) | (b != b) else a
            continue
        for j in range(w):
            vf[d0 + j] = xf[s0 + j]
        for r in range(1, kh):
            sr = s0 + r * w
            for j in range(w):
                a = vf[d0 + j]
                b = xf[sr + j]
                vf[d0 + j] = b if (b > a) | (b != b) else a
    wout = w // kw
    seg = vf[i0 * w:i1 * w]
    dst = of[i0 * wout:i1 * wout]
    if kw == 2:
        for t in range(dst.size):
            a, b = seg[2 * t], seg[2 * t + 1]
            dst[t] = b if (b > a) | (b != b) else a
    elif kw == 3:
        for t in range(dst.size):
            a, b, c = seg[3 * t], seg[3 * t + 1], seg[3 * t + 2]
            m = b if (b > a) | (b != b) else a
            dst[t] = c if (c > m) | (c != c) else m
    else:
        for t in range(dst.size):
            m = seg[t * kw]
            for q in range(1, kw):
                v = seg[t * kw + q]
                m = v if (v > m) | (v != v) else m
            dst[t] = m


@pjit
def _max_pool_tiled(x, out, kh, kw, v, bounds):
    """Max pooling whose windows tile the planes: stride = window, no padding, dilation 1, and the
    planes' height and width multiples of the window (LeNet-5's 2 x 2 / 2), on planes of at most
    ``_SMALL_PLANE`` pixels (on larger ones the separable kernel is faster). A window then
    never crosses a plane, so the batch is one tall image of ``P * H`` rows, pooled in long loops
    (:func:`_pool_tiles`) rather than plane by plane; threads take ranges of output rows
    (``bounds``). Plane by plane (:func:`_max_pool_small`) each output cost about 20 cycles (a compare
    and select chain per window in scalar code): LeNet-5's pools took 0.068 / 0.061 ms of its 0.39 ms
    at batch 32. NaN wins a comparison, as in torch.
    NOTE: x (P * H * W,), out (P * Hout * Wout,) and v (P * Hout * W,) C-contiguous; bounds rise from
    0 to P * Hout."""
    w = v.size // max(bounds[bounds.size - 1], 1)
    for part in numba.prange(bounds.size - 1):
        _pool_tiles(x, out, v, w, kh, kw, bounds[part], bounds[part + 1])


_max_pool_tiled_serial = serial_twin(_max_pool_tiled)
_max_pool_small_serial = serial_twin(_max_pool_small)


def max_pool2d(x: np.ndarray, out: np.ndarray, kernel_size: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int], dilation: tuple[int, int]) -> None:
    """Max pooling of every plane, padding counted as -inf (torch's ``max_pool2d``, ``ceil_mode`` given
    by ``out``'s size).

    Parameters
    ----------
    x : ndarray, shape (B, C, H, W), float32, C-contiguous
    out : ndarray, shape (B, C, Hout, Wout), float32, C-contiguous
    kernel_size, stride, padding, dilation : tuple of int, (h, w)
    """
    bind_max_pool2d(x.shape, out, kernel_size, stride, padding, dilation)(x)


@jit
def _mean(row):
    """Eight partial sums (a single running sum is one dependent add per element: 3-4x slower)."""
    n = row.size
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    for q in range(n // 8):
        k = q * 8
        s0 += row[k]
        s1 += row[k + 1]
        s2 += row[k + 2]
        s3 += row[k + 3]
        s4 += row[k + 4]
        s5 += row[k + 5]
        s6 += row[k + 6]
        s7 += row[k + 7]
    for k in range(n - n % 8, n):
        s0 += row[k]
    return (((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))) / np.float32(n)


@pjit
def _gap_kernel(x, out):
    npl = x.shape[0]
    for p in numba.prange(npl):
        out[p] = _mean(x[p])


def global_avg_pool(x: np.ndarray, out: np.ndarray) -> None:
    """The mean of every plane: ``out[b, c] = mean(x[b, c])`` (adaptive average pooling to 1 x 1).

    Parameters
    ----------
    x : ndarray, shape (B, C, H, W), float32, C-contiguous
    out : ndarray, shape (B, C) or (B, C, 1, 1), float32, C-contiguous
    """
    bind_global_avg_pool(x.shape, out)(x)


_max_pool_serial = serial_twin(_max_pool_kernel)
_gap_serial = serial_twin(_gap_kernel)


def bind_max_pool2d(x_shape: tuple[int, int, int, int], out: np.ndarray, kernel_size: tuple[int, int],
                    stride: tuple[int, int], padding: tuple[int, int],
                    dilation: tuple[int, int]) -> Callable[[np.ndarray], None]:
    """``run(x)``: :func:`max_pool2d` ``(x, out, ...)`` for inputs of ``x_shape``, with the scratch rows
    and views made once and the serial kernel below ``_PARALLEL_MIN`` input elements (the
    executor's steps; one thread calls it at a time).

    Parameters
    ----------
    x_shape : tuple of int, (B, C, H, W)
    out : ndarray, shape (B, C, Hout, Wout), float32, C-contiguous
    kernel_size, stride, padding, dilation : tuple of int, (h, w)
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    b, c, h, w = (int(v) for v in x_shape)
    serial = b * c * h * w < _PARALLEL_MIN
    if (h * w <= _SMALL_PLANE and (kh, kw) == (sh, sw) and (ph, pw, dh, dw) == (0, 0, 1, 1) and h % kh == 0
            and w % kw == 0):
        rows = b * c * (h // kh)
        v = np.empty(rows * w, dtype=np.float32)
        parallel = not (serial and b < 2)  # parallel from two images, as the plane-by-plane kernel
        tiled = _max_pool_tiled if parallel else _max_pool_tiled_serial
        nparts = num_threads() if parallel else 1
        bounds = np.minimum(np.arange(nparts + 1) * -(-rows // nparts), rows)
        flat = out.reshape(-1)

        def run_tiled(x: np.ndarray) -> None:
            tiled(x.reshape(-1), flat, kh, kw, v, bounds)

        return run_tiled
    op = out.reshape(b * c, out.shape[2], out.shape[3])
    tmp = np.empty((b * c, w), dtype=np.float32)  # a scratch row per plane: planes run in any order
    if h * w <= _SMALL_PLANE:
        # Parallel from two images: the layer before split the batch's images between the threads,
        # and each thread then reads the planes it wrote (a serial pass read the other core's half:
        # LeNet-5's second pool at batch 32 took 0.071 ms serial).
        kernel = _max_pool_small_serial if serial and b < 2 else _max_pool_small
    else:
        kernel = _max_pool_serial if serial else _max_pool_kernel
    args = (op, kh, kw, sh, sw, ph, pw, dh, dw, tmp)

    def run(x: np.ndarray) -> None:
        kernel(x.reshape(b * c, h, w), *args)

    return run


def bind_global_avg_pool(x_shape: tuple[int, int, int, int], out: np.ndarray,
                         in_stride: int = 0) -> Callable[[np.ndarray], None]:
    """``run(x)``: :func:`global_avg_pool` ``(x, out)`` for inputs of ``x_shape`` (views made once,
    the serial kernel below ``_PARALLEL_MIN`` elements).

    Parameters
    ----------
    x_shape : tuple of int, (B, C, H, W)
    out : ndarray, shape (B, C) or (B, C, 1, 1), float32, C-contiguous
    in_stride : int
        Where given, ``x`` is (B, C, in_stride) with each plane's H * W floats first (planes padded to
        whole vectors, :func:`sparsecnn.kernels.conv.padded_plane`).
    """
    b, c, h, w = (int(v) for v in x_shape)
    o = out.reshape(b * c)
    kernel = _gap_serial if b * c * h * w < _PARALLEL_MIN else _gap_kernel
    if in_stride:
        def run_padded(x: np.ndarray) -> None:
            kernel(x.reshape(b * c, in_stride)[:, :h * w], o)

        return run_padded

    def run(x: np.ndarray) -> None:
        kernel(x.reshape(b * c, h * w), o)

    return run


# ---- padding (ONNX Pad, and the asymmetric / SAME padding of imported layers: io._graph.Pad2d)


@pjit
def _pad_planes(x, out, rows, cols, left, value):
    """``out[p, i, j] = x[p, rows[i], cols[j]]``, or ``value`` where ``rows[i]`` or ``cols[j]`` is
    negative; the columns ``left <= j < left + W`` map to ``j - left`` (copied as one slice)."""
    w = x.shape[2]
    wo = out.shape[2]
    for p in numba.prange(x.shape[0]):
        for i in range(out.shape[1]):
            r = rows[i]
            if r < 0:
                out[p, i, :] = value
                continue
            src = x[p, r]
            dst = out[p, i]
            for j in range(left):
                c = cols[j]
                dst[j] = src[c] if c >= 0 else value
            dst[left : left + w] = src
            for j in range(left + w, wo):
                c = cols[j]
                dst[j] = src[c] if c >= 0 else value


_pad_planes_serial = serial_twin(_pad_planes)


def _pad_sources(n: int, before: int, after: int, mode: str) -> np.ndarray:
    """Source index of every padded position along an axis of ``n``: -1 for the constant, the edge
    for ``"replicate"``, the mirror without the edge for ``"reflect"``."""
    j = np.arange(-before, n + after)
    if mode == "constant":
        return np.where((j >= 0) & (j < n), j, -1).astype(np.int64)
    if mode == "replicate":
        return np.clip(j, 0, n - 1).astype(np.int64)
    period = 2 * (n - 1)
    if period == 0:
        return np.zeros(j.size, np.int64)
    j = np.abs(j) % period
    return np.where(j < n, j, period - j).astype(np.int64)


def bind_pad2d(x_shape: tuple[int, int, int, int], out: np.ndarray, pads: tuple[int, int, int, int],
               mode: str = "constant", value: float = 0.0) -> Callable[[np.ndarray], None]:
    """``run(x)``: ``out = torch.nn.functional.pad(x, pads, mode, value)`` for inputs of ``x_shape``
    (the executor's padding steps; serial below ``_PARALLEL_MIN`` output elements).

    Parameters
    ----------
    x_shape : tuple of int, (B, C, H, W)
    out : ndarray, shape (B, C, H + top + bottom, W + left + right), float32, C-contiguous
        Written in full by every call.
    pads : tuple of int, (left, right, top, bottom), each >= 0
    mode : {"constant", "reflect", "replicate"}
        ``"reflect"`` needs every pad below the size it pads.
    value : float
        The constant of ``"constant"`` (-inf included).
    """
    b, c, h, w = (int(v) for v in x_shape)
    left, right, top, bottom = (int(p) for p in pads)
    want = (b, c, h + top + bottom, w + left + right)
    if min(pads) < 0 or mode not in ("constant", "reflect", "replicate"):
        raise ValueError(f"bind_pad2d: bad pads {pads} or mode {mode!r}")
    if mode == "reflect" and (max(left, right) >= w or max(top, bottom) >= h):
        raise ValueError(f"bind_pad2d: reflect pads {pads} must be below the input's size {(h, w)}")
    if out.shape != want or not out.flags.c_contiguous or out.dtype != np.float32:
        raise ValueError(f"bind_pad2d: out must be C-contiguous float32 of shape {want}")
    rows = _pad_sources(h, top, bottom, mode)
    cols = _pad_sources(w, left, right, mode)
    kernel = _pad_planes_serial if out.size < _PARALLEL_MIN else _pad_planes
    planes = out.reshape(b * c, *want[2:])
    v = np.float32(value)

    def run(x: np.ndarray) -> None:
        kernel(x.reshape(b * c, h, w), planes, rows, cols, left, v)

    return run
