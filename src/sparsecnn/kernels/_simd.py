"""Register-tiled sparse micro-kernel written as LLVM vector IR (``numba.extending.intrinsic``).

Why IR: the inner loop of a sparse kernel wants a tile of outputs held in vector registers across
all nonzeros of one output row (one load and one FMA per 8 multiply-adds, no stores), as in XNNPACK's
sparse inference kernels and SparseRT. Written in plain numba, LLVM neither keeps such a tile in
registers (an accumulator array lives in memory) nor vectorises 32 or 64 scalar accumulators (the
loop vectoriser sees no loop over them, the SLP vectoriser gives up on numba's index arithmetic), so
the kernel stays bound by a load and a store of the output per multiply-add group. Here the tile is
``nvec`` values of ``<8 x float>``: allocas that LLVM's SROA turns into registers, updated with
``llvm.fmuladd`` (one ``vfmadd231ps ymm, ymm, [mem]`` per vector on an AVX2/FMA CPU; LLVM splits or
widens the 8-lane vectors on other targets). The call compiles inline into the numba kernel that
calls it, so ``cache=True`` caches it with that kernel.

The sum over nonzeros runs in their stored order, one rounding per fused multiply-add: no
reassociation, so no ``fastmath`` is needed.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["NV_MAX", "VW", "span_tile"]

VW = 8  # floats per vector (one ymm register)
# Vectors per register tile: 12 accumulators + 1 broadcast of the 16 ymm registers. Measured on a
# Zen 3 core with the input in L1 and aligned: 8 vectors 62, 10-12 vectors 80 GFLOP/s (8 leaves the
# 4-cycle FMA chains no slack for a late load).
NV_MAX = 12

_F32 = ir.FloatType()
_I1 = ir.IntType(1)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_VEC = ir.VectorType(_F32, VW)


def _data_ptr(context, builder, aryty, val):
    return context.make_array(aryty)(context, builder, val).data


def _splat(builder, s):
    v = builder.insert_element(ir.Constant(_VEC, ir.Undefined), s, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, VW), [0] * VW)
    return builder.shuffle_vector(v, ir.Constant(_VEC, ir.Undefined), mask)


def _emit_tile(builder, fma, nv, xbase, optr, dptr, k0, k1, wp, init, accumulate, nvalid):
    """One register tile of ``nv`` vectors: the loop over nonzeros ``k0 <= k < k1``."""
    accs = [cgutils.alloca_once(builder, _VEC) for _ in range(nv)]
    wvecs = [builder.bitcast(builder.gep(wp, [ir.Constant(_I64, i * VW)], inbounds=True), _VEC.as_pointer())
             for i in range(nv)]
    start = _splat(builder, init)
    with builder.if_else(accumulate) as (then, otherwise):
        with then:
            for a, q in zip(accs, wvecs, strict=True):
                builder.store(builder.load(q, align=4), a)
        with otherwise:
            for a in accs:
                builder.store(start, a)
    with cgutils.for_range_slice(builder, k0, k1, ir.Constant(_I64, 1), inc=True) as (k, _):
        off = builder.load(builder.gep(optr, [k], inbounds=True))
        if off.type.width < 64:
            off = builder.sext(off, _I64)
        vb = _splat(builder, builder.load(builder.gep(dptr, [k], inbounds=True)))
        p = builder.gep(xbase, [off], inbounds=True)
        for i in range(nv):
            q = builder.bitcast(builder.gep(p, [ir.Constant(_I64, i * VW)], inbounds=True), _VEC.as_pointer())
            xv = builder.load(q, align=4)
            builder.store(builder.call(fma, [vb, xv, builder.load(accs[i])]), accs[i])
    for a, q in zip(accs[:-1], wvecs[:-1], strict=True):
        builder.store(builder.load(a), q, align=4)
    # The last vector: whole, or only its first nvalid - (nv - 1) * VW lanes.
    last = builder.load(accs[-1])
    rem = builder.sub(nvalid, ir.Constant(_I64, (nv - 1) * VW))
    with builder.if_else(builder.icmp_signed(">=", rem, ir.Constant(_I64, VW))) as (whole, part):
        with whole:
            builder.store(last, wvecs[-1], align=4)
        with part:
            lp = builder.gep(wp, [ir.Constant(_I64, (nv - 1) * VW)], inbounds=True)
            for lane in range(VW - 1):
                with builder.if_then(builder.icmp_signed(">", rem, ir.Constant(_I64, lane))):
                    builder.store(builder.extract_element(last, ir.Constant(_I32, lane)),
                                  builder.gep(lp, [ir.Constant(_I64, lane)], inbounds=True))


@intrinsic
def span_tile(typingctx, x, offs, data, k0, k1, base, w, wpos, nvec, nvalid, init, accumulate):
    """``w[wpos + j] = (w[wpos + j] if accumulate else init) + sum_k data[k] * x[base + offs[k] + j]``.

    For ``k0 <= k < k1`` and ``0 <= j < min(nvalid, nvec * VW)`` (the tile computes ``nvec * VW``
    values and stores the first ``nvalid``), with ``1 <= nvec <= NV_MAX`` (any other nvec does nothing)
    and ``nvalid > (nvec - 1) * VW``. x, offs, data and w are 1-D arrays (float32, any integer dtype,
    float32, float32).
    NOTE: no bounds checks: x holds ``base + offs[k] + nvec * VW`` elements for every k, and w holds
    ``wpos + min(nvalid, nvec * VW)`` (``wpos + nvec * VW`` when accumulating).
    """
    sig = types.void(x, offs, data, types.intp, types.intp, types.intp, w, types.intp, types.intp,
                     types.intp, types.float32, types.boolean)

    def codegen(context, builder, signature, args):
        x_, offs_, data_, k0_, k1_, base_, w_, wpos_, nvec_, nvalid_, init_, acc_ = args
        aty = signature.args
        xbase = builder.gep(_data_ptr(context, builder, aty[0], x_), [base_], inbounds=True)
        optr = _data_ptr(context, builder, aty[1], offs_)
        dptr = _data_ptr(context, builder, aty[2], data_)
        wp = builder.gep(_data_ptr(context, builder, aty[6], w_), [wpos_], inbounds=True)
        accumulate = context.cast(builder, acc_, aty[11], types.boolean)
        if accumulate.type != _I1:
            accumulate = builder.trunc(accumulate, _I1)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC, _VEC, _VEC]), "llvm.fmuladd.v8f32")
        done = builder.append_basic_block("span_tile.done")
        switch = builder.switch(nvec_, done)
        for nv in range(1, NV_MAX + 1):
            block = builder.append_basic_block(f"span_tile.nv{nv}")
            switch.add_case(ir.Constant(_I64, nv), block)
            builder.position_at_end(block)
            _emit_tile(builder, fma, nv, xbase, optr, dptr, k0_, k1_, wp, init_, accumulate, nvalid_)
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def gather_dot(typingctx, x, indices, data, k0, k1):
    """``sum_{k0 <= k < k1} data[k] * x[indices[k]]`` as float32: a CSR row times a dense vector.

    Eight nonzeros per step: the indices are widened to ``<8 x i32>`` and the eight ``x`` values
    fetched with one ``vgatherdps`` (``llvm.x86.avx2.gather.d.ps.256``), then one FMA into one of two
    vector accumulators; the last ``(k1 - k0) % 8`` nonzeros are added one at a time.
    x is float32, indices an unsigned integer array of at most 32 bits, data float32 (all 1-D).
    NOTE: no bounds checks: every index is a valid position of x and below 2**31.
    """
    sig = types.float32(x, indices, data, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        x_, ix_, d_, k0, k1 = args
        aty = signature.args
        xptr = _data_ptr(context, builder, aty[0], x_)
        iptr = _data_ptr(context, builder, aty[1], ix_)
        dptr = _data_ptr(context, builder, aty[2], d_)
        iw = aty[1].dtype.bitwidth
        ity = ir.IntType(iw)
        ivec = ir.VectorType(ity, VW)
        i32vec = ir.VectorType(_I32, VW)
        i8p = ir.IntType(8).as_pointer()
        gather = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC, i8p, i32vec, _VEC, ir.IntType(8)]),
            "llvm.x86.avx2.gather.d.ps.256")
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC, _VEC, _VEC]), "llvm.fmuladd.v8f32")
        zero = ir.Constant(_VEC, [0.0] * VW)
        allmask = ir.Constant(_VEC, [float("nan")] * VW)  # sign bits set: gather every lane
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(2)]
        n = builder.sub(k1, k0)
        nsteps = builder.sdiv(n, ir.Constant(_I64, 2 * VW))
        xbase = builder.bitcast(xptr, i8p)
        with cgutils.for_range(builder, nsteps) as loop:
            k = builder.add(k0, builder.mul(loop.index, ir.Constant(_I64, 2 * VW)))
            for u in range(2):
                ku = builder.add(k, ir.Constant(_I64, u * VW))
                iv = builder.load(builder.bitcast(builder.gep(iptr, [ku], inbounds=True), ivec.as_pointer()),
                                  align=iw // 8)
                if iw < 32:
                    iv = builder.zext(iv, i32vec)
                g = builder.call(gather, [zero, xbase, iv, allmask, ir.Constant(ir.IntType(8), 4)])
                dv = builder.load(builder.bitcast(builder.gep(dptr, [ku], inbounds=True), _VEC.as_pointer()),
                                  align=4)
                builder.store(builder.call(fma, [dv, g, builder.load(accs[u])]), accs[u])
        acc = builder.fadd(builder.load(accs[0]), builder.load(accs[1]))
        # Horizontal sum of the 8 lanes, pairwise.
        for width in (4, 2, 1):
            hi = builder.shuffle_vector(acc, ir.Constant(_VEC, ir.Undefined),
                                        ir.Constant(i32vec, [i + width for i in range(VW)]
                                                    if False else [(i + width) % VW for i in range(VW)]))
            acc = builder.fadd(acc, hi)
        total = cgutils.alloca_once_value(builder, builder.extract_element(acc, ir.Constant(_I32, 0)))
        start = builder.add(k0, builder.mul(nsteps, ir.Constant(_I64, 2 * VW)))
        with cgutils.for_range_slice(builder, start, k1, ir.Constant(_I64, 1), inc=True) as (k, _):
            col = builder.load(builder.gep(iptr, [k], inbounds=True))
            col = builder.zext(col, _I64) if iw < 64 else col
            xv = builder.load(builder.gep(xptr, [col], inbounds=True))
            dv = builder.load(builder.gep(dptr, [k], inbounds=True))
            builder.store(builder.fadd(builder.load(total), builder.fmul(dv, xv)), total)
        return builder.load(total)

    return sig, codegen
