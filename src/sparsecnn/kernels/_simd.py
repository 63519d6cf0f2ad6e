"""Register-tiled sparse micro-kernels written as LLVM vector IR (``numba.extending.intrinsic``).

Why IR: the inner loop of a sparse kernel wants a tile of outputs held in vector registers across
*all* nonzeros of one output row (one load and one FMA per 8 multiply-adds, no stores), as in
XNNPACK's sparse inference kernels and SparseRT. Written in plain numba, LLVM neither keeps such a
tile in registers (an accumulator array lives in memory) nor vectorises 32 or 64 scalar accumulators
(the loop vectoriser sees no loop over them, the SLP vectoriser gives up on numba's index arithmetic),
so the kernel stays bound by a load and a store of the output per multiply-add group. Here the tile
is ``nv`` values of ``<8 x float>``: allocas that LLVM's SROA turns into registers, updated with
``llvm.fmuladd`` (one ``vfmadd231ps ymm, ymm, [mem]`` per vector on an AVX2/FMA CPU; LLVM splits or
widens the 8-lane vectors for other targets). Each call compiles inline into the numba kernel that
calls it, so ``cache=True`` caches it with that kernel.

The sum over nonzeros runs in their stored order, one rounding per fused multiply-add: no
reassociation, so no ``fastmath`` is needed.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from sparsecnn.kernels._numba import jit

__all__ = ["VW", "span_tiles"]

VW = 8  # floats per vector (one ymm register)
NV_MAX = 8  # vectors per register tile: 8 accumulators + 1 broadcast of the 16 ymm registers

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_VEC = ir.VectorType(_F32, VW)


def _data_ptr(context, builder, aryty, val):
    return context.make_array(aryty)(context, builder, val).data


def _splat(builder, s):
    v = builder.insert_element(ir.Constant(_VEC, ir.Undefined), s, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, VW), [0] * VW)
    return builder.shuffle_vector(v, ir.Constant(_VEC, ir.Undefined), mask)


def _make_span_tile(nv: int, accumulate: bool):
    """``w[wpos + j] = init + sum_k data[k] * x[base + offs[k] + j]`` for ``j < nv * VW``, k in [k0, k1)."""

    @intrinsic
    def span_tile(typingctx, x, offs, data, k0, k1, base, w, wpos, init):
        sig = types.void(x, offs, data, types.intp, types.intp, types.intp, w, types.intp, types.float32)

        def codegen(context, builder, signature, args):
            x_, offs_, data_, k0_, k1_, base_, w_, wpos_, init_ = args
            xptr = _data_ptr(context, builder, signature.args[0], x_)
            optr = _data_ptr(context, builder, signature.args[1], offs_)
            dptr = _data_ptr(context, builder, signature.args[2], data_)
            wptr = _data_ptr(context, builder, signature.args[6], w_)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_VEC, [_VEC, _VEC, _VEC]), "llvm.fmuladd.v8f32")
            accs = [cgutils.alloca_once(builder, _VEC) for _ in range(nv)]
            wp = builder.gep(wptr, [wpos_], inbounds=True)
            wvecs = [builder.bitcast(builder.gep(wp, [ir.Constant(_I64, i * VW)], inbounds=True),
                                     _VEC.as_pointer()) for i in range(nv)]
            if accumulate:
                for a, q in zip(accs, wvecs, strict=True):
                    builder.store(builder.load(q, align=4), a)
            else:
                start = _splat(builder, init_)
                for a in accs:
                    builder.store(start, a)
            xbase = builder.gep(xptr, [base_], inbounds=True)
            with cgutils.for_range_slice(builder, k0_, k1_, ir.Constant(_I64, 1), inc=True) as (k, _):
                off = builder.load(builder.gep(optr, [k], inbounds=True))
                if off.type.width < 64:
                    off = builder.sext(off, _I64)
                vb = _splat(builder, builder.load(builder.gep(dptr, [k], inbounds=True)))
                p = builder.gep(xbase, [off], inbounds=True)
                for i in range(nv):
                    q = builder.bitcast(builder.gep(p, [ir.Constant(_I64, i * VW)], inbounds=True),
                                        _VEC.as_pointer())
                    xv = builder.load(q, align=4)
                    builder.store(builder.call(fma, [vb, xv, builder.load(accs[i])]), accs[i])
            for a, q in zip(accs, wvecs, strict=True):
                builder.store(builder.load(a), q, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return span_tile


_t1, _t2, _t3, _t4, _t5, _t6, _t7, _t8 = (_make_span_tile(n, False) for n in range(1, NV_MAX + 1))
_a1, _a2, _a3, _a4, _a5, _a6, _a7, _a8 = (_make_span_tile(n, True) for n in range(1, NV_MAX + 1))


@jit
def span_tile_acc(x, offs, data, k0, k1, base, w, wpos, nvec):
    """``w[wpos + j] += sum_{k0 <= k < k1} data[k] * x[base + offs[k] + j]`` for ``j < nvec * VW``.

    One register tile of ``nvec <= NV_MAX`` vectors, loaded from ``w`` and stored back once.
    NOTE: x holds ``base + offs[k] + nvec * VW`` elements for every k, w holds ``wpos + nvec * VW``.
    """
    if nvec == 8:
        _a8(x, offs, data, k0, k1, base, w, wpos, np.float32(0.0))
    elif nvec == 7:
        _a7(x, offs, data, k0, k1, base, w, wpos, np.float32(0.0))
    elif nvec == 6:
        _a6(x, offs, data, k0, k1, base, w, wpos, np.float32(0.0))
    elif nvec == 5:
        _a5(x, offs, data, k0, k1, base, w, wpos, np.float32(0.0))
    elif nvec == 4:
        _a4(x, offs, data, k0, k1, base, w, wpos, np.float32(0.0))
    elif nvec == 3:
        _a3(x, offs, data, k0, k1, base, w, wpos, np.float32(0.0))
    elif nvec == 2:
        _a2(x, offs, data, k0, k1, base, w, wpos, np.float32(0.0))
    elif nvec == 1:
        _a1(x, offs, data, k0, k1, base, w, wpos, np.float32(0.0))


@jit
def span_tiles(x, offs, data, k0, k1, base, w, wpos, n, init):
    """``w[wpos + j] = init + sum_{k0 <= k < k1} data[k] * x[base + offs[k] + j]`` for ``0 <= j < n``.

    Computed in register tiles of 64 floats, then one tile of the remaining vectors; the last vector
    is computed in full, so up to ``VW - 1`` values past ``n`` are written to ``w`` and read from ``x``.
    NOTE: x holds ``base + offs[k] + ceil(n / VW) * VW`` elements for every k, w holds
    ``wpos + ceil(n / VW) * VW``.
    """
    nvec = (n + VW - 1) // VW
    full = nvec // NV_MAX
    for t in range(full):
        d = t * (NV_MAX * VW)
        _t8(x, offs, data, k0, k1, base + d, w, wpos + d, init)
    r = nvec - full * NV_MAX
    d = full * (NV_MAX * VW)
    if r == 0:
        return
    if r == 1:
        _t1(x, offs, data, k0, k1, base + d, w, wpos + d, init)
    elif r == 2:
        _t2(x, offs, data, k0, k1, base + d, w, wpos + d, init)
    elif r == 3:
        _t3(x, offs, data, k0, k1, base + d, w, wpos + d, init)
    elif r == 4:
        _t4(x, offs, data, k0, k1, base + d, w, wpos + d, init)
    elif r == 5:
        _t5(x, offs, data, k0, k1, base + d, w, wpos + d, init)
    elif r == 6:
        _t6(x, offs, data, k0, k1, base + d, w, wpos + d, init)
    else:
        _t7(x, offs, data, k0, k1, base + d, w, wpos + d, init)
