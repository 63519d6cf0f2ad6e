"""A fully connected layer at batch >= 2 as a 1x1 direct convolution: the batch's items in the lanes.

``out = x @ W.T + bias`` for ``x`` of shape (B, K) is the 1x1 convolution of the one-row image
``x.T`` (K channels of B pixels) with ``W`` as (M, K, 1, 1) filters. Run through the direct kernel
(:mod:`sparsecnn.kernels.conv`), each input channel ``k`` is the row ``x[:, k]``: a register tile
loads a vector of batch items once and, in the filter-group tiles, every filter of the group that has
column ``k`` adds a broadcast weight times it. The weights stream once per call, in the
tiles' order, whatever the batch.

Why it exists: at batch 2-32 on this project's Zen 4 VM (2 threads), torch's GEMM ran AlexNet's
dense fc6 (9216 -> 4096) at 15-17 ms for batch 4-8 and 26-30 ms for 32, and the CSR ``spmm`` (one
row of batch items per nonzero, no reuse across filters) about as slowly; this form ran them in
6.8 / 7.6 / 13.6 ms (the weights stream at ~22 GB/s at batch 4). At 91% sparsity it is within
0.8-1.2x of ``spmm`` (ahead at batch 32), at 75% 1.4-1.8x ahead (``python -m benchmarks.batch_fc``).
At batch 1 it fills one lane in ``VW`` (fc6 at 91%: 3x ``spmv``'s time), so the planner offers it
from batch 2.

The batch is padded to whole vectors (``lanes``, zero columns), so every channel's row starts on a
vector and is read in place; the output comes back through a transposed buffer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sparsecnn.kernels._numba import aligned_zeros
from sparsecnn.kernels._simd import VW
from sparsecnn.kernels.conv import SLACK, DirectConvPrep, bind_direct_conv2d, prepare_direct
from sparsecnn.kernels.spmv import _transpose, _transpose_serial

__all__ = ["bind_direct_linear", "direct_linear", "lanes", "prepare_direct_linear"]


def prepare_direct_linear(weight: np.ndarray) -> DirectConvPrep:
    """The direct-convolution format of a dense ``(M, K)`` weight: ``(M, K, 1, 1)`` filters.

    Parameters
    ----------
    weight : ndarray, shape (M, K), float32
        Exact zeros are dropped.
    """
    w = np.ascontiguousarray(weight, dtype=np.float32)
    return prepare_direct(w.reshape(*w.shape, 1, 1), 1, (1, 1), (0, 0), (1, 1))


def lanes(batch: int) -> int:
    """Pixels of the one-row image that holds a batch of ``batch``: rounded up to whole vectors."""
    return max(1, -(-int(batch) // VW)) * VW


# Below this many floats moved (input and output, batch rows) the transposes run serially: a parallel
# launch costs more than they do.
_SERIAL_FLOATS = 1 << 14


def _buffers(prep: DirectConvPrep, nl: int) -> tuple[np.ndarray, np.ndarray]:
    """The calling thread's transposed input ``(K, nl)`` (followed by ``SLACK`` readable floats, so the
    kernel reads it in place; the pad lanes stay zero) and transposed output ``(M, nl)``: one pair per
    thread and lane count, shared by every call and binding of the thread (they run one at a time)."""
    m, k = prep.weight_shape[:2]

    def build() -> tuple[np.ndarray, np.ndarray]:
        flat = aligned_zeros(k * nl + SLACK)
        return flat[:k * nl].reshape(k, nl), aligned_zeros((m, nl))

    return prep.cached(("direct_linear", nl), build)


def bind_direct_linear(prep: DirectConvPrep, batch: int, bias: np.ndarray | None, out: np.ndarray,
                       relu: bool = False) -> Callable[[np.ndarray], None]:
    """``run(x)``: ``out = x @ W.T + bias`` (``relu`` of it with ``relu``) for ``x`` of shape
    ``(batch, K)``, the buffers and the conv kernel bound once (the whole-model executor's steps).

    The callable uses the calling thread's workspace and buffers of ``prep`` (:func:`bind_direct_conv2d`,
    :func:`_buffers`), so it must be called from the thread that bound it (the executor binds per
    thread).

    Parameters
    ----------
    prep : DirectConvPrep
        Of weight shape ``(M, K, 1, 1)`` (:func:`prepare_direct_linear`).
    batch : int
    bias : ndarray, shape (M,), float32, or None
    out : ndarray, shape (batch, M), float32, C-contiguous
    relu : bool

    Returns
    -------
    callable
        ``run(x)`` with ``x`` of shape ``(batch, K)``, float32, C-contiguous.
    """
    m, k = prep.weight_shape[:2]
    if not out.flags.c_contiguous or out.shape != (batch, m):
        raise ValueError(f"bind_direct_linear: out must be C-contiguous of shape {(batch, m)}")
    nl = lanes(batch)
    xt, yt = _buffers(prep, nl)
    conv = bind_direct_conv2d(prep, (1, k, 1, nl), bias, yt.reshape(1, m, 1, nl), relu, slack=SLACK)
    small = (k + m) * batch < _SERIAL_FLOATS
    # spmm's transpose: into the lanes it writes xt[k, b] for b < B (the pad lanes keep their zeros),
    # out of them it reads the first B lanes of yt
    transpose = _transpose_serial if small else _transpose
    lanes_out = yt[:, :batch]
    image = xt.reshape(1, k, 1, nl)

    def run(x: np.ndarray) -> None:
        transpose(x, xt)
        conv(image)
        transpose(lanes_out, out)

    return run


def direct_linear(prep: DirectConvPrep, x: np.ndarray, bias: np.ndarray | None, out: np.ndarray,
                  relu: bool = False) -> None:
    """``out = x @ W.T + bias`` (``relu`` of it with ``relu``) through :func:`bind_direct_linear`.

    Parameters
    ----------
    prep : DirectConvPrep
        Of weight shape ``(M, K, 1, 1)``.
    x : ndarray, shape (B, K), float32, C-contiguous
    bias : ndarray, shape (M,), float32, or None
    out : ndarray, shape (B, M), float32, C-contiguous
        Written in full.
    relu : bool
    """
    bind_direct_linear(prep, x.shape[0], bias, out, relu)(x)
