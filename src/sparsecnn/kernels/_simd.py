"""Register-tiled sparse micro-kernel written as LLVM vector IR (``numba.extending.intrinsic``).

Why IR: the inner loop of a sparse kernel wants a tile of outputs held in vector registers across
all nonzeros of one output row (one load and one FMA per vector of multiply-adds, no stores), as in XNNPACK's
sparse inference kernels and SparseRT. Written in plain numba, LLVM neither keeps such a tile in
registers (an accumulator array lives in memory) nor vectorises 32 or 64 scalar accumulators (the
loop vectoriser sees no loop over them, the SLP vectoriser gives up on numba's index arithmetic), so
the kernel stays bound by a load and a store of the output per multiply-add group. Here the tile is
``nvec`` values of ``<VW x float>``: allocas that LLVM's SROA turns into registers, updated with
``llvm.fmuladd`` (one ``vfmadd231ps reg, reg, [mem]`` per vector). The vector width ``VW`` and the
tile size ``NV_MAX`` are chosen at import from the CPU numba compiles for (its name and features are
also numba's cache key, so a cached kernel always matches them):

- AVX-512F at full rate (Intel's server cores, e.g. Emerald Rapids: two 512-bit FMA ports): 16-wide
  zmm vectors, 12 per tile. Measured on an Emerald Rapids VM (2 threads, batch 1, each step timed
  alone, two runs per width): AlexNet conv2-5 at Deep Compression's 62-65% 1.33-1.45 / 0.89-1.12 /
  0.69-0.92 / 0.52-0.67 ms against 1.84-2.13 / 1.35-1.55 / 1.08-1.21 / 0.78-0.89 ms with 8-wide
  tiles (oneDNN itself uses zmm there, and ran 1.8 / 1.6 / 1.3 / 0.9 ms); ResNet-18 at 90% all conv
  layers 7.2-7.3 against 8.4-8.8 ms. 24 zmm per tile was no better than 12 (mixed, within noise).
- AVX-512VL at half rate (Zen 4 executes a zmm FMA as two 256-bit halves): 8-wide ymm vectors, 24
  per tile (ymm16-31 through EVEX encodings; 16-wide measured 10-25% slower there).
- AVX2: 8-wide ymm vectors, 12 per tile (16 registers).

The stores can apply a ReLU (``relu``; compare-select, NaN kept) so a layer's activation costs no
extra pass. The call compiles inline into the numba kernel that calls it, so ``cache=True`` caches
it with that kernel. The gathering row kernels (:func:`row_dot`, :func:`code_row_dot`) keep ``RW``
(8) lanes whatever the CPU: their sums run in eight chains, an order the tests hold them to bit for
bit (not re-measured at 16 lanes); :func:`scatter_blocks` also works in blocks of ``RW`` entries.

The sum over nonzeros runs in their stored order, one rounding per fused multiply-add: no
reassociation, so no ``fastmath`` is needed.
"""

from __future__ import annotations

from fractions import Fraction

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from sparsecnn.kernels._numba import jit

__all__ = ["CHAN_BLOCK", "CHAN_NP", "CHAN_OB", "DWB_NT", "DW_NV", "DW_ROWS", "ELL_ROWS", "ELL_SLAB",
           "GEMM_MR", "GEMM_NV", "GROUP_F", "GROUP_NV", "GROUP_PATTERNS", "HAS_TABLE32", "NV_MAX", "NV_MAX8",
           "NV_PAIR", "RW", "SPLIT_MAX", "TABLE", "VW", "WINO_AT", "WINO_BT", "WINO_POINTS", "add_vec_act",
           "chan_tile", "clamp_vec", "code_ell_block", "code_ell_block2", "code_ell_block2_finite",
           "code_ell_block4", "code_ell_block4_finite", "code_row_dot", "code_row_dot32", "copy_even",
           "copy_every3", "copy_every4", "copy_quad", "copy_vec", "copy_vec_act", "copy_vec_add",
           "dw_tile_3x3_s1", "dw_tile_3x3_s2", "dw_tile_3x3_s2_plain", "dwb_tile", "dwb_tile3", "dwb_tile3s2",
           "fetch_add", "fmadd", "gemm_tile", "group_tile", "max3_cols2", "max3_rows", "max_taps",
           "packed_words", "pair_tile", "prefetch", "prefetch_l2", "row_dot", "scatter_blocks", "span_tile",
           "span_tile8", "tile_split", "toom_cook", "wino4_in_tile", "wino4_out_plain_tile", "wino4_out_tile",
           "wino4r5_in_tile", "wino4r5_out_plain_tile", "wino4r5_out_tile", "wino_in_tile", "wino_out_tile"]

RW = 8  # lanes of the gathering row kernels (row_dot, code_row_dot: sums in 8 chains), scatter_blocks


def _target() -> tuple[str, list[str]]:
    """The CPU name and features numba compiles for (``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` when
    set, else the host's): what numba keys its disk cache by, so a cached kernel's vector width and
    tile size always match the machine it was compiled for. A named target without features, or a
    platform with no feature query, gives no features (the baseline: AVX2-class tiles)."""
    from numba.core import config

    name, feats = config.CPU_NAME, config.CPU_FEATURES
    try:
        import llvmlite.binding as llvm

        if name is None:
            name = llvm.get_host_cpu_name()
        if feats is None and config.CPU_NAME is None:
            feats = llvm.get_host_cpu_features().flatten()
    except Exception:  # no host query on this platform: the safe default
        pass
    return str(name or ""), [f for f in (feats or "").split(",") if f]


def _vector_registers() -> int:
    """Vector registers of the CPU numba compiles for: 32 with AVX-512VL, else 16."""
    return 32 if "+avx512vl" in _target()[1] else 16


# CPUs that execute a 512-bit FMA as two 256-bit halves: there a zmm tile adds no FMA throughput and
# most of its unaligned 64-byte loads split across two cache lines, so the tiles stay 8 lanes wide
# (Zen 4: 16-wide tiles measured 10-25% slower, see the conv module docstring).
_HALF_RATE_512 = ("znver4",)


def _vector_width() -> int:
    """Floats per vector of the register tiles: 16 (zmm) where the CPU has AVX-512F at full rate
    (Intel's server cores: two 512-bit FMA ports, against two 256-bit ones for ymm), else 8 (ymm)."""
    name, feats = _target()
    return 16 if "+avx512f" in feats and name not in _HALF_RATE_512 else 8


VW = _vector_width()  # floats per vector of the register tiles


# Vectors per register tile: accumulators + 1 broadcast of the vector registers, a few left for the
# address arithmetic. 16 ymm (AVX2): 12 (measured on Zen 3 with the input in L1 and aligned: 8
# vectors 62, 10-12 vectors 80 GFLOP/s; 8 leaves the 4-cycle FMA chains no slack for a late load).
# 32 (AVX-512VL, e.g. Zen 4; ymm16-31 through EVEX encodings): 24, which halves the weight
# broadcast, offset load and loop step per vector and holds a whole 13x13 plane in one tile
# (measured on Zen 4, 2 threads, interleaved: AlexNet conv2-5 at 65% +9-20%, ResNet 3x3/1x1 at 90%
# -9% to +13%, see the conv module docstring). With 16-wide vectors: 12 zmm, the same 192 floats
# per tile (24 zmm measured no better, see the conv module docstring).
NV_MAX8 = 24 if _vector_registers() >= 32 else 12  # ymm tiles: also span_tile8's bound where VW is 16
NV_MAX = 12 if VW == 16 else NV_MAX8
NV_PAIR = NV_MAX // 2  # vectors per filter when two filters share the accumulators (pair_tile)
# gemm_tile: GEMM_MR filters x GEMM_NV vectors of accumulators, the GEMM_NV input vectors of a column
# loaded once for all GEMM_MR filters, plus GEMM_MR weight broadcasts: 24 + 4 + 1 registers of 32
# with AVX-512VL, 8 + 4 + 1 of 16 with AVX2.
GEMM_MR = 4
GEMM_NV = 6 if _vector_registers() >= 32 else 2

_F32 = ir.FloatType()
_I1 = ir.IntType(1)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_VEC = ir.VectorType(_F32, VW)
_RVEC = ir.VectorType(_F32, RW)


def _data_ptr(context, builder, aryty, val):
    return context.make_array(aryty)(context, builder, val).data


def _splat(builder, s, width=None):
    vec = ir.VectorType(_F32, width or VW)
    v = builder.insert_element(ir.Constant(vec, ir.Undefined), s, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, vec.count), [0] * vec.count)
    return builder.shuffle_vector(v, ir.Constant(vec, ir.Undefined), mask)


def _fma_vec(builder, width=None):
    """``llvm.fmuladd.v{width}f32`` (``VW`` lanes by default): one ``vfmadd`` per vector on an FMA CPU."""
    vec = ir.VectorType(_F32, width or VW)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                          f"llvm.fmuladd.v{vec.count}f32")


def _fma_scalar(builder):
    """``llvm.fmuladd.f32``: one scalar ``vfmadd`` on an FMA CPU."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, _F32, _F32]),
                                          "llvm.fmuladd.f32")


def _array_ptrs(context, builder, signature, args, count):
    """The data pointers of the first ``count`` arguments (arrays) of an intrinsic call."""
    return [_data_ptr(context, builder, signature.args[i], args[i]) for i in range(count)]


def _for_each_nvec(builder, nvec, nmax, name, emit):
    """A switch on the runtime vector count: ``emit(nv)`` builds the tile for each ``1 <= nv <= nmax``
    (a register tile needs its size at compile time); any other ``nvec`` does nothing."""
    done = builder.append_basic_block(f"{name}.done")
    switch = builder.switch(nvec, done)
    for nv in range(1, nmax + 1):
        block = builder.append_basic_block(f"{name}.nv{nv}")
        switch.add_case(ir.Constant(_I64, nv), block)
        builder.position_at_end(block)
        emit(nv)
        builder.branch(done)
    builder.position_at_end(done)


# Tiles of at most this many vectors keep two accumulators per vector (even and odd nonzeros, added at
# the end): with fewer than 8 vectors the FMA chains (4 cycles latency, 2 FMAs a cycle on Zen 3/4)
# bound the loop, not the loads. AVX2's 16 registers leave room for 2 x 4 accumulators.
SPLIT_MAX = 7 if _vector_registers() >= 32 else 4


def _emit_tile(builder, fma, nv, xbase, optr, signed, dptr, k0, k1, wp, init, accumulate, nvalid, ostride,
               relu, width=None):
    """One register tile of ``nv`` vectors of ``width`` (default ``VW``) floats: the loop over nonzeros
    ``k0 <= k < k1``. With ``nv <= SPLIT_MAX`` the nonzeros alternate between two sets of
    accumulators, summed as the tile ends."""
    width = width or VW
    vec = ir.VectorType(_F32, width)
    accs = [cgutils.alloca_once(builder, vec) for _ in range(nv)]
    wvecs = [builder.bitcast(builder.gep(wp, [ir.Constant(_I64, i * width)], inbounds=True), vec.as_pointer())
             for i in range(nv)]
    start = _splat(builder, init, width)
    with builder.if_else(accumulate) as (then, otherwise):
        with then:
            for a, q in zip(accs, wvecs, strict=True):
                builder.store(builder.load(q, align=4), a)
        with otherwise:
            for a in accs:
                builder.store(start, a)

    def add_nonzero(k, into):
        off = builder.load(builder.gep(optr, [k], inbounds=True))
        if off.type.width < 64:
            off = builder.sext(off, _I64) if signed else builder.zext(off, _I64)
        if ostride is not None:
            off = builder.mul(off, ostride)
        vb = _splat(builder, builder.load(builder.gep(dptr, [k], inbounds=True)), width)
        p = builder.gep(xbase, [off], inbounds=True)
        for i in range(nv):
            q = builder.bitcast(builder.gep(p, [ir.Constant(_I64, i * width)], inbounds=True),
                                vec.as_pointer())
            xv = builder.load(q, align=4)
            builder.store(builder.call(fma, [vb, xv, builder.load(into[i])]), into[i])

    if nv > SPLIT_MAX:
        with cgutils.for_range_slice(builder, k0, k1, ir.Constant(_I64, 1), inc=True) as (k, _):
            add_nonzero(k, accs)
    else:
        odd = [cgutils.alloca_once(builder, vec) for _ in range(nv)]
        zero = ir.Constant(vec, [0.0] * width)
        for a in odd:
            builder.store(zero, a)
        npair = builder.sdiv(builder.sub(k1, k0), ir.Constant(_I64, 2))
        with cgutils.for_range(builder, npair) as loop:
            k = builder.add(k0, builder.mul(loop.index, ir.Constant(_I64, 2)))
            add_nonzero(k, accs)
            add_nonzero(builder.add(k, ir.Constant(_I64, 1)), odd)
        kl = builder.add(k0, builder.mul(npair, ir.Constant(_I64, 2)))
        with builder.if_then(builder.icmp_signed("<", kl, k1)):
            add_nonzero(kl, accs)
        for a, b in zip(accs, odd, strict=True):
            builder.store(builder.fadd(builder.load(a), builder.load(b)), a)
    _store_tile(builder, accs, wp, nvalid, relu, width)


def _span_tile(width: int, nmax: int):
    def typer(typingctx, x, offs, data, k0, k1, base, w, wpos, nvec, nvalid, init, accumulate, ostride, relu):
        sig = types.void(x, offs, data, types.intp, types.intp, types.intp, w, types.intp, types.intp,
                         types.intp, types.float32, types.boolean, types.intp, types.boolean)

        def codegen(context, builder, signature, args):
            x_, offs_, data_, k0_, k1_, base_, w_, wpos_, nvec_, nvalid_, init_, acc_, ostride_, relu_ = args
            aty = signature.args
            xbase = builder.gep(_data_ptr(context, builder, aty[0], x_), [base_], inbounds=True)
            optr = _data_ptr(context, builder, aty[1], offs_)
            dptr = _data_ptr(context, builder, aty[2], data_)
            wp = builder.gep(_data_ptr(context, builder, aty[6], w_), [wpos_], inbounds=True)
            accumulate = _as_i1(context, builder, acc_, aty[11])
            relu = _as_i1(context, builder, relu_, aty[13])
            fma = _fma_vec(builder, width)
            signed = getattr(aty[1].dtype, "signed", True)
            ostride = None if isinstance(ostride_, ir.Constant) and ostride_.constant == 1 else ostride_
            _for_each_nvec(builder, nvec_, nmax, "span_tile", lambda nv: _emit_tile(
                builder, fma, nv, xbase, optr, signed, dptr, k0_, k1_, wp, init_, accumulate, nvalid_,
                ostride, relu, width))
            return context.get_dummy_value()

        return sig, codegen

    return typer


span_tile = intrinsic(_span_tile(VW, NV_MAX))
span_tile.__doc__ = """``w[wpos + j] = (w[wpos + j] if accumulate else init) + sum_k data[k] *
x[base + s * offs[k] + j]``, then ``max(w[wpos + j], 0)`` (NaN kept, as torch.relu) when ``relu``.

For ``k0 <= k < k1`` and ``0 <= j < min(nvalid, nvec * VW)`` (the tile computes ``nvec * VW``
values and stores the first ``nvalid``), with ``1 <= nvec <= NV_MAX`` (any other nvec does nothing)
and ``nvalid > (nvec - 1) * VW``. x, offs, data and w are 1-D arrays (float32, any integer dtype,
float32, float32). ``s = ostride``: 1 when offs are element offsets, the row length when they
are row indices of a row-major matrix (CSR times dense).
NOTE: no bounds checks: x holds ``base + s * offs[k] + nvec * VW`` elements for every k, and w
holds ``wpos + min(nvalid, nvec * VW)`` (``wpos + nvec * VW`` when accumulating).
"""
# 8-lane tiles where VW is 16: for rows of 8 floats (a batch of at most 8 in the CSR spmm), which a
# 16-wide tile would compute twice over. Up to NV_MAX8 ymm.
span_tile8 = intrinsic(_span_tile(RW, NV_MAX8))
span_tile8.__doc__ = """:func:`span_tile` with ``RW`` (8) floats per vector, ``1 <= nvec <= NV_MAX8``."""


def _emit_gemm(builder, fma, nv, xbase, optr, signed, wptr, k0, k1, outp, ostride, inits, nvalid, accumulate):
    """A ``GEMM_MR`` x ``nv`` register tile: per column, ``nv`` input vectors loaded once and
    ``GEMM_MR`` broadcast weights, ``GEMM_MR * nv`` FMAs. With ``accumulate`` (an i1) the tile starts
    from ``outp``'s values instead of the inits."""
    accs = [[cgutils.alloca_once(builder, _VEC) for _ in range(nv)] for _ in range(GEMM_MR)]
    with builder.if_else(accumulate) as (then, otherwise):
        with then:
            for f in range(GEMM_MR):
                row = builder.gep(outp, [builder.mul(ostride, ir.Constant(_I64, f))], inbounds=True)
                for i, a in enumerate(accs[f]):
                    q = builder.gep(row, [ir.Constant(_I64, i * VW)], inbounds=True)
                    builder.store(builder.load(builder.bitcast(q, _VEC.as_pointer()), align=4), a)
        with otherwise:
            for f in range(GEMM_MR):
                start = _splat(builder, inits[f])
                for a in accs[f]:
                    builder.store(start, a)
    with cgutils.for_range_slice(builder, k0, k1, ir.Constant(_I64, 1), inc=True) as (k, _):
        off = builder.load(builder.gep(optr, [k], inbounds=True))
        if off.type.width < 64:
            off = builder.sext(off, _I64) if signed else builder.zext(off, _I64)
        p = builder.gep(xbase, [off], inbounds=True)
        wk = builder.gep(wptr, [builder.mul(k, ir.Constant(_I64, GEMM_MR))], inbounds=True)
        wbs = [_splat(builder, builder.load(builder.gep(wk, [ir.Constant(_I64, f)], inbounds=True)))
               for f in range(GEMM_MR)]
        for i in range(nv):
            q = builder.bitcast(builder.gep(p, [ir.Constant(_I64, i * VW)], inbounds=True), _VEC.as_pointer())
            xv = builder.load(q, align=4)
            for f in range(GEMM_MR):
                builder.store(builder.call(fma, [wbs[f], xv, builder.load(accs[f][i])]), accs[f][i])
    for f in range(GEMM_MR):
        _store_tile(builder, accs[f], builder.gep(outp, [builder.mul(ostride, ir.Constant(_I64, f))],
                                                  inbounds=True), nvalid)


@intrinsic
def gemm_tile(typingctx, x, offs, w, k0, k1, base, out, opos, ostride, nvec, nvalid, accumulate, i0, i1, i2,
              i3):
    """``out[opos + f * ostride + j] = init_f + sum_k w[k * GEMM_MR + f] * x[base + offs[k] + j]`` for
    the ``GEMM_MR`` (4) filters ``f`` of a tile of dense weights, ``k0 <= k < k1`` and
    ``0 <= j < min(nvalid, nvec * VW)``, ``1 <= nvec <= GEMM_NV`` (any other nvec does nothing); with
    ``accumulate``, ``out[...]``'s own value in place of ``init_f`` (partial sums over channel blocks;
    ``nvec * VW`` floats are read per filter).

    The micro-kernel of an implicit GEMM (:mod:`sparsecnn.kernels.implicit_gemm`): the columns are
    input spans at offsets, as in :func:`span_tile`, but each loaded input vector serves
    ``GEMM_MR`` filters, so a column costs ``GEMM_NV`` loads and ``GEMM_MR`` broadcasts for
    ``GEMM_MR * GEMM_NV`` FMAs (10 loads for 24 FMAs) instead of one load per FMA: FMA-bound, not
    load-bound, where the weights of a tile's filters share their columns (SSL's compact GEMM).
    x, offs, w and out are 1-D arrays (float32, any integer dtype, float32, float32); the sum over
    k runs in order, one rounding per FMA.
    NOTE: no bounds checks: x holds ``base + offs[k] + nvec * VW`` elements for every k, w holds
    ``k1 * GEMM_MR``, and out ``opos + 3 * ostride + min(nvalid, nvec * VW)``.
    """
    sig = types.void(x, offs, w, types.intp, types.intp, types.intp, out, types.intp, types.intp, types.intp,
                     types.intp, types.boolean, types.float32, types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        x_, offs_, w_, k0_, k1_, base_, out_, opos_, ostride_, nvec_, nvalid_, acc_, *inits = args
        aty = signature.args
        xbase = builder.gep(_data_ptr(context, builder, aty[0], x_), [base_], inbounds=True)
        optr = _data_ptr(context, builder, aty[1], offs_)
        wptr = _data_ptr(context, builder, aty[2], w_)
        outp = builder.gep(_data_ptr(context, builder, aty[6], out_), [opos_], inbounds=True)
        signed = getattr(aty[1].dtype, "signed", True)
        fma = _fma_vec(builder)
        accumulate = _as_i1(context, builder, acc_, aty[11])
        _for_each_nvec(builder, nvec_, GEMM_NV, "gemm_tile", lambda nv: _emit_gemm(
            builder, fma, nv, xbase, optr, signed, wptr, k0_, k1_, outp, ostride_, inits, nvalid_,
            accumulate))
        return context.get_dummy_value()

    return sig, codegen


# chan_tile: CHAN_OB vectors of output channels (a block of CHAN_OB * VW filters) x CHAN_NP output
# positions of accumulators, plus CHAN_OB weight vectors and one broadcast input: 24 + 4 + 1 registers
# of 32 with AVX-512VL, 8 + 2 + 1 of 16 with AVX2.
CHAN_OB = 4 if _vector_registers() >= 32 else 2
CHAN_NP = 6 if _vector_registers() >= 32 else 4
CHAN_BLOCK = CHAN_OB * VW


def _emit_chan(builder, fma, npx, xbase, optr, signed, wptr, k0, k1, bufp, initp, accumulate, pptr,
               jstride, ostride, nout, resp, has_res, relu):
    """A ``CHAN_OB`` x ``npx`` register tile of :func:`chan_tile`: per column, ``CHAN_OB`` weight
    vectors loaded once and ``npx`` broadcast inputs, ``CHAN_OB * npx`` FMAs. The positions' input
    bases (``xbase + pos[j]``) are computed once, before the column loop: each broadcast is then one
    base + index address, as with evenly spaced positions."""
    vp = _VEC.as_pointer()
    bases = []
    for j in range(npx):
        pj = builder.load(builder.gep(pptr, [ir.Constant(_I64, j)], inbounds=True))
        if pj.type.width < 64:
            pj = builder.sext(pj, _I64)
        bases.append(builder.gep(xbase, [pj], inbounds=True))
    accs = [[cgutils.alloca_once(builder, _VEC) for _ in range(CHAN_OB)] for _ in range(npx)]

    def at(j, o):  # the tile's vector (j, o) in buf
        idx = builder.add(builder.mul(jstride, ir.Constant(_I64, j)),
                          builder.mul(ostride, ir.Constant(_I64, o)))
        return builder.bitcast(builder.gep(bufp, [idx], inbounds=True), vp)

    def kept(o):  # vectors o >= nout lie outside buf: neither read nor written
        return builder.icmp_signed(">", nout, ir.Constant(_I64, o))

    with builder.if_else(accumulate) as (then, otherwise):
        with then:
            for o in range(CHAN_OB):
                with builder.if_then(kept(o)):
                    for j in range(npx):
                        builder.store(builder.load(at(j, o), align=4), accs[j][o])
        with otherwise:
            starts = [builder.load(builder.bitcast(builder.gep(initp, [ir.Constant(_I64, o * VW)],
                                                               inbounds=True), vp), align=4)
                      for o in range(CHAN_OB)]
            for j in range(npx):
                for o, a in enumerate(accs[j]):
                    builder.store(starts[o], a)
    with cgutils.for_range_slice(builder, k0, k1, ir.Constant(_I64, 1), inc=True) as (k, _):
        off = builder.load(builder.gep(optr, [k], inbounds=True))
        if off.type.width < 64:
            off = builder.sext(off, _I64) if signed else builder.zext(off, _I64)
        wk = builder.gep(wptr, [builder.mul(k, ir.Constant(_I64, CHAN_BLOCK))], inbounds=True)
        wv = [builder.load(builder.bitcast(builder.gep(wk, [ir.Constant(_I64, o * VW)], inbounds=True), vp),
                           align=4) for o in range(CHAN_OB)]
        for j in range(npx):
            xs = _splat(builder, builder.load(builder.gep(bases[j], [off], inbounds=True)))
            for o in range(CHAN_OB):
                builder.store(builder.call(fma, [wv[o], xs, builder.load(accs[j][o])]), accs[j][o])
    def store(with_res):  # the residual read only where there is one (else the store would wait on it)
        for o in range(CHAN_OB):
            with builder.if_then(kept(o)):
                for j in range(npx):
                    v = builder.load(accs[j][o])
                    if with_res:
                        idx = builder.add(builder.mul(jstride, ir.Constant(_I64, j)),
                                          builder.mul(ostride, ir.Constant(_I64, o)))
                        r = builder.gep(resp, [idx], inbounds=True)
                        v = builder.fadd(v, builder.load(builder.bitcast(r, vp), align=4))
                    builder.store(_relu(builder, v, relu), at(j, o), align=4)

    with builder.if_else(has_res) as (then, otherwise):
        with then:
            store(True)
        with otherwise:
            store(False)


@intrinsic
def chan_tile(typingctx, x, offs, w, k0, k1, base, pos, ppos, buf, bpos, jstride, ostride, nout, npx,
              accumulate, init, ipos, res, has_res, relu):
    """``buf[bpos + j * jstride + o * ostride + l] = init[ipos + f] + sum_k w[k * CHAN_BLOCK + f] *
    x[base + offs[k] + pos[ppos + j]]`` for the ``CHAN_BLOCK`` filters ``f = o * VW + l`` of a block
    (``o < nout``; ``1 <= nout <= CHAN_OB``), ``k0 <= k < k1`` and ``0 <= j < npx``, ``1 <= npx <=
    CHAN_NP`` (any other npx does nothing); with ``accumulate``, ``buf``'s own value in place of
    ``init`` (partial sums over channel blocks). ``jstride = CHAN_BLOCK, ostride = VW`` lays the
    tile out position-major; ``jstride = VW, ostride = plane * VW`` stores it straight into a
    channel-blocked output (:mod:`sparsecnn.kernels.blocked`). Each stored vector has
    ``res[bpos + j * jstride + o * ostride : ... + VW]`` added with ``has_res`` (a residual laid out
    as ``buf``; pass ``buf`` itself for none) and then ``max(v, 0)`` (NaN kept) with ``relu``: the
    epilogue of a last channel block, on the registers, not a second pass over the stored tile
    (1x1 64 -> 256 on 56x56, one thread: 7-8% of the layer).

    The micro-kernel of the channel-vector implicit GEMM (:mod:`sparsecnn.kernels.implicit_gemm`):
    :func:`gemm_tile` with the roles turned, output channels in the vector lanes and output positions
    in broadcasts, as oneDNN's and MLAS's NCHWc direct convolutions hold them. A column costs
    ``CHAN_OB`` aligned weight loads and ``npx`` broadcasts for ``CHAN_OB * npx`` FMAs, and no input
    vector load crosses a cache line, whatever the plane's width; the tile lands position-major in
    ``buf``.
    x, offs, w, pos, buf and init are 1-D arrays (float32, any integer dtype, float32, signed integers,
    float32, float32); the sum over k runs in order, one rounding per FMA.
    ``pos[ppos + j]`` is the input offset of the tile's position ``j``: the executor gives the valid
    output positions of a wide-row layout (row ``r``, column ``c`` at ``(r * wph + c) * pstride``), so no
    register tile computes a padding column; ``pstride`` is 1 for planes of floats, ``VW`` for
    channel-blocked planes (``VW`` channels side by side per position).
    NOTE: no bounds checks: x holds ``base + offs[k] + pos[ppos + j] + 1`` elements for every k and j < npx,
    pos ``ppos + npx``, w ``k1 * CHAN_BLOCK``, buf and res ``bpos + npx * CHAN_BLOCK`` and init
    ``ipos + CHAN_BLOCK``.
    """
    i = types.intp
    sig = types.void(x, offs, w, i, i, i, pos, i, buf, i, i, i, i, i, types.boolean, init, i, res,
                     types.boolean, types.boolean)

    def codegen(context, builder, signature, args):
        (x_, offs_, w_, k0_, k1_, base_, pos_, ppos_, buf_, bpos_, jst_, ost_, nout_, npx_, acc_, init_,
         ipos_, res_, hres_, relu_) = args
        aty = signature.args
        xbase = builder.gep(_data_ptr(context, builder, aty[0], x_), [base_], inbounds=True)
        optr = _data_ptr(context, builder, aty[1], offs_)
        wptr = _data_ptr(context, builder, aty[2], w_)
        pptr = builder.gep(_data_ptr(context, builder, aty[6], pos_), [ppos_], inbounds=True)
        bufp = builder.gep(_data_ptr(context, builder, aty[8], buf_), [bpos_], inbounds=True)
        initp = builder.gep(_data_ptr(context, builder, aty[15], init_), [ipos_], inbounds=True)
        signed = getattr(aty[1].dtype, "signed", True)
        fma = _fma_vec(builder)
        accumulate = _as_i1(context, builder, acc_, aty[14])
        resp = builder.gep(_data_ptr(context, builder, aty[17], res_), [bpos_], inbounds=True)
        has_res = _as_i1(context, builder, hres_, aty[18])
        relu = _as_i1(context, builder, relu_, aty[19])
        _for_each_nvec(builder, npx_, CHAN_NP, "chan_tile", lambda n: _emit_chan(
            builder, fma, n, xbase, optr, signed, wptr, k0_, k1_, bufp, initp, accumulate, pptr, jst_,
            ost_, nout_, resp, has_res, relu))
        return context.get_dummy_value()

    return sig, codegen


# group_tile: filters per tile (a 4-bit pattern says which of them have a column) and vectors per filter.
GROUP_F = GEMM_MR
GROUP_NV = GEMM_NV
GROUP_PATTERNS = (1 << GROUP_F) - 1  # the non-empty subsets of the GROUP_F filters
# Patterns walked together (disjoint member sets, so their FMA chains are independent), then alone.
_GROUP_LOCKSTEP = ((1, 2, 4, 8), (3, 12), (5, 10), (6, 9), (7,), (11,), (13,), (14,), (15,))
assert sorted(p for ps in _GROUP_LOCKSTEP for p in ps) == list(range(1, GROUP_PATTERNS + 1))


def _emit_group(builder, fma, nv, xbase, optr, signed, wptr, cp, wp, outp, wstride, accumulate, inits,
                nvalid):
    """A ``GROUP_F`` x ``nv`` register tile over the columns of every filter pattern (see
    :func:`group_tile`)."""
    accs = [[cgutils.alloca_once(builder, _VEC) for _ in range(nv)] for _ in range(GROUP_F)]
    fptrs = [builder.gep(outp, [builder.mul(wstride, ir.Constant(_I64, f))], inbounds=True)
             for f in range(GROUP_F)]
    with builder.if_else(accumulate) as (then, otherwise):
        with then:
            for f in range(GROUP_F):
                for i, a in enumerate(accs[f]):
                    q = builder.bitcast(builder.gep(fptrs[f], [ir.Constant(_I64, i * VW)], inbounds=True),
                                        _VEC.as_pointer())
                    builder.store(builder.load(q, align=4), a)
        with otherwise:
            for f in range(GROUP_F):
                start = _splat(builder, inits[f])
                for a in accs[f]:
                    builder.store(start, a)
    def column(pat, k, k0, w0):
        members = [f for f in range(GROUP_F) if pat >> f & 1]
        off = builder.load(builder.gep(optr, [k], inbounds=True))
        if off.type.width < 64:
            off = builder.sext(off, _I64) if signed else builder.zext(off, _I64)
        p = builder.gep(xbase, [off], inbounds=True)
        wk = builder.add(w0, builder.mul(builder.sub(k, k0), ir.Constant(_I64, len(members))))
        wbs = [_splat(builder, builder.load(builder.gep(wptr, [builder.add(wk, ir.Constant(_I64, j))],
                                                        inbounds=True)))
               for j in range(len(members))]
        for i in range(nv):
            q = builder.bitcast(builder.gep(p, [ir.Constant(_I64, i * VW)], inbounds=True), _VEC.as_pointer())
            xv = builder.load(q, align=4)
            for j, f in enumerate(members):
                builder.store(builder.call(fma, [wbs[j], xv, builder.load(accs[f][i])]), accs[f][i])

    def bounds(pat):
        k0 = builder.load(builder.gep(cp, [ir.Constant(_I64, pat - 1)], inbounds=True))
        k1 = builder.load(builder.gep(cp, [ir.Constant(_I64, pat)], inbounds=True))
        w0 = builder.load(builder.gep(wp, [ir.Constant(_I64, pat - 1)], inbounds=True))
        return k0, k1, w0

    for pats in _GROUP_LOCKSTEP:
        # Disjoint patterns walk their columns in lockstep: a pattern alone updates only its members'
        # nv accumulators per column, a chain the FMA latency (4 cycles) would bound at nv / 4 a cycle.
        b = [bounds(pat) for pat in pats]
        n = b[0][1]
        lens = [builder.sub(k1, k0) for k0, k1, _ in b]
        n = lens[0]
        for ln in lens[1:]:
            n = builder.select(builder.icmp_signed("<", ln, n), ln, n)
        if len(pats) > 1:
            with cgutils.for_range(builder, n) as loop:
                for pat, (k0, _, w0) in zip(pats, b, strict=True):
                    column(pat, builder.add(k0, loop.index), k0, w0)
        for pat, (k0, k1, w0) in zip(pats, b, strict=True):
            start = builder.add(k0, n) if len(pats) > 1 else k0
            with cgutils.for_range_slice(builder, start, k1, ir.Constant(_I64, 1), inc=True) as (k, _):
                column(pat, k, k0, w0)
    for f in range(GROUP_F):
        _store_tile(builder, accs[f], fptrs[f], nvalid)


@intrinsic
def group_tile(typingctx, x, offs, wts, cptr, wptr, pbase, base, w, wpos, wstride, nvec, nvalid, accumulate,
               i0, i1, i2, i3):
    """Direct convolution tile of ``GROUP_F`` (4) filters x ``nvec`` vectors whose loaded input vectors
    serve every filter of the group that has the column (input-stationary within the tile).

    The sparse columns (input channel, tap) of a group of four filters are sorted by *pattern*, the
    4-bit set of the filters whose weight there is nonzero: per column, ``nvec`` input vectors are
    loaded once and each member filter adds a broadcast weight times them (one FMA per vector). At
    Deep Compression's conv density (~37% nonzero) a column has 1.5 nonzero filters on average, so
    the tile makes ~0.8 loads per FMA instead of :func:`span_tile`'s one (which bounds it at ~1.2 FMA
    a cycle on Zen 4, where the FMA units do 2); the register mapping of each pattern is fixed at
    compile time, so the 15 patterns are 15 loops.

    For each pattern ``q`` (1..15) the columns ``cptr[pbase + q - 1] <= k < cptr[pbase + q]``, with
    weights ``wts[wptr[pbase + q - 1] + (k - k0) * |q| + j]`` for the ``j``-th member filter (in
    filter order), add ``wts[.] * x[base + offs[k] + t]`` into filter ``f``'s outputs
    ``w[wpos + f * wstride + t]``, ``0 <= t < min(nvalid, nvec * VW)``, which start from their stored
    values (``accumulate``) or ``i_f``. ``1 <= nvec <= GROUP_NV`` (any other nvec does nothing).
    NOTE: no bounds checks: x holds ``base + offs[k] + nvec * VW`` elements for every k; w holds
    ``wpos + 3 * wstride + nvec * VW``; cptr holds ``pbase + 16`` and wptr ``pbase + 15`` entries.
    """
    sig = types.void(x, offs, wts, cptr, wptr, types.intp, types.intp, w, types.intp, types.intp, types.intp,
                     types.intp, types.boolean, types.float32, types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        (x_, offs_, wts_, cptr_, wptr_, pbase_, base_, w_, wpos_, wstride_, nvec_, nvalid_, acc_,
         *inits) = args
        aty = signature.args
        xbase = builder.gep(_data_ptr(context, builder, aty[0], x_), [base_], inbounds=True)
        optr = _data_ptr(context, builder, aty[1], offs_)
        wtp = _data_ptr(context, builder, aty[2], wts_)
        cp = builder.gep(_data_ptr(context, builder, aty[3], cptr_), [pbase_], inbounds=True)
        wp = builder.gep(_data_ptr(context, builder, aty[4], wptr_), [pbase_], inbounds=True)
        outp = builder.gep(_data_ptr(context, builder, aty[7], w_), [wpos_], inbounds=True)
        accumulate = _as_i1(context, builder, acc_, aty[12])
        signed = getattr(aty[1].dtype, "signed", True)
        fma = _fma_vec(builder)
        _for_each_nvec(builder, nvec_, GROUP_NV, "group_tile", lambda nv: _emit_group(
            builder, fma, nv, xbase, optr, signed, wtp, cp, wp, outp, wstride_, accumulate, inits, nvalid_))
        return context.get_dummy_value()

    return sig, codegen


def _prefetch_intrinsic(name: str, locality: int, doc: str):
    """An intrinsic ``name(a, i)`` prefetching the line of ``a[i]`` with ``llvm.prefetch``'s
    ``locality`` (3: all levels, 2: L2 and below)."""

    def impl(typingctx, a, i):
        sig = types.void(a, types.intp)

        def codegen(context, builder, signature, args):
            a_, i_ = args
            ptr = builder.gep(_data_ptr(context, builder, signature.args[0], a_), [i_])
            i8p = ir.IntType(8).as_pointer()
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]), "llvm.prefetch.p0")
            builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(_I32, 0), ir.Constant(_I32, locality),
                              ir.Constant(_I32, 1)])
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = impl.__qualname__ = name
    impl.__doc__ = doc
    return intrinsic(impl)


prefetch = _prefetch_intrinsic("prefetch", 3, """Hint the cache line holding ``a[i]`` into all cache levels
    (``llvm.prefetch``, read; no fault on any address, so ``i`` need not be in bounds). a is a 1-D array.""")
prefetch_l2 = _prefetch_intrinsic("prefetch_l2", 2, """:func:`prefetch` into L2 and below (``prefetcht1``),
    leaving L1 to the data in use.""")


@intrinsic
def fetch_add(typingctx, a, i, v):
    """``old = a[i]; a[i] += v; return old`` as one atomic step (``atomicrmw add``, monotonic order):
    threads that take work items from a shared counter each get a different one. a is a 1-D int64
    array. NOTE: no bounds check."""
    sig = types.int64(a, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        a_, i_, v_ = args
        ptr = builder.gep(_data_ptr(context, builder, signature.args[0], a_), [i_])
        return builder.atomic_rmw("add", ptr, v_, "monotonic")

    return sig, codegen


@jit
def tile_split(nvec, t, ntiles):
    """First vector and vector count of tile ``t`` when ``nvec`` vectors split evenly into ``ntiles``."""
    q = nvec // ntiles
    e = nvec - q * ntiles
    return t * q + min(t, e), q + (1 if t < e else 0)


def _relu(builder, v, relu):
    """``v if relu else max(v, 0)`` lane by lane, NaN kept as torch.relu keeps it: ``fcmp ugt`` (greater
    or unordered) selects ``v`` for NaN and positive lanes, 0 for the rest (-0.0 becomes 0). ``relu``
    is an i1 value, or None for no activation."""
    if relu is None:
        return v
    zero = ir.Constant(v.type, None)
    act = builder.select(builder.fcmp_unordered(">", v, zero), v, zero)
    return builder.select(relu, act, v)


def _as_i1(context, builder, val, ty):
    v = context.cast(builder, val, ty, types.boolean)
    return builder.trunc(v, _I1) if v.type != _I1 else v


def _store_tile(builder, accs, wp, nvalid, relu=None, width=None):
    """Store the register tile ``accs`` at ``wp``: whole, or only the last vector's first lanes; with
    ``relu`` (an i1 value) true, ``max(acc, 0)`` (see :func:`_relu`)."""
    width = width or VW
    vec = ir.VectorType(_F32, width)
    nv = len(accs)
    for i, a in enumerate(accs[:-1]):
        q = builder.bitcast(builder.gep(wp, [ir.Constant(_I64, i * width)], inbounds=True), vec.as_pointer())
        builder.store(_relu(builder, builder.load(a), relu), q, align=4)
    last = _relu(builder, builder.load(accs[-1]), relu)
    lp = builder.gep(wp, [ir.Constant(_I64, (nv - 1) * width)], inbounds=True)
    rem = builder.sub(nvalid, ir.Constant(_I64, (nv - 1) * width))
    with builder.if_else(builder.icmp_signed(">=", rem, ir.Constant(_I64, width))) as (whole, part):
        with whole:
            builder.store(last, builder.bitcast(lp, vec.as_pointer()), align=4)
        with part:
            for lane in range(width - 1):
                with builder.if_then(builder.icmp_signed(">", rem, ir.Constant(_I64, lane))):
                    builder.store(builder.extract_element(last, ir.Constant(_I32, lane)),
                                  builder.gep(lp, [ir.Constant(_I64, lane)], inbounds=True))


def _emit_pair(builder, fma, nv, xbase, optr, signed, dptr, k0s, ns, w0, w1, inits, nvalid, relu):
    """Register tiles of ``nv`` vectors for two filters whose nonzeros run in lockstep."""
    accs = [[cgutils.alloca_once(builder, _VEC) for _ in range(nv)] for _ in range(2)]
    for f in range(2):
        start = _splat(builder, inits[f])
        for a in accs[f]:
            builder.store(start, a)

    def step(f, k):
        off = builder.load(builder.gep(optr, [k], inbounds=True))
        if off.type.width < 64:
            off = builder.sext(off, _I64) if signed else builder.zext(off, _I64)
        vb = _splat(builder, builder.load(builder.gep(dptr, [k], inbounds=True)))
        p = builder.gep(xbase, [off], inbounds=True)
        for i in range(nv):
            q = builder.bitcast(builder.gep(p, [ir.Constant(_I64, i * VW)], inbounds=True), _VEC.as_pointer())
            xv = builder.load(q, align=4)
            builder.store(builder.call(fma, [vb, xv, builder.load(accs[f][i])]), accs[f][i])

    nmin = builder.select(builder.icmp_signed("<", ns[0], ns[1]), ns[0], ns[1])
    with cgutils.for_range(builder, nmin) as loop:
        step(0, builder.add(k0s[0], loop.index))
        step(1, builder.add(k0s[1], loop.index))
    for f in range(2):
        with cgutils.for_range_slice(builder, builder.add(k0s[f], nmin), builder.add(k0s[f], ns[f]),
                                     ir.Constant(_I64, 1), inc=True) as (k, _):
            step(f, k)
    _store_tile(builder, accs[0], w0, nvalid, relu)
    _store_tile(builder, accs[1], w1, nvalid, relu)


@intrinsic
def pair_tile(typingctx, x, offs, data, k0a, k1a, k0b, k1b, base, w, wpos, wstride, nvec, nvalid, inita,
              initb, relu):
    """:func:`span_tile` for two filters at once, their nonzeros interleaved one for one.

    ``w[wpos + j] = inita + sum_{k0a <= k < k1a} data[k] * x[base + offs[k] + j]``, and the same at
    ``wpos + wstride + j`` for ``[k0b, k1b)`` and ``initb``, for ``j < min(nvalid, nvec * VW)`` and
    ``1 <= nvec <= NV_PAIR`` (any other nvec does nothing); ``max(., 0)`` on store when ``relu``.
    Why: both filters' nonzeros are sorted by input channel, so in lockstep they read about the same
    channels at about the same time and the second filter's spans mostly hit the L1 lines the first one
    just brought in; the single-filter tile is bound by L2 -> L1 traffic. Measured (Zen 3, 1 thread, 3x3
    and 5x5 layers at 90-95%): 15-40% more GFLOP/s than one filter x 12 vectors; 3 x 4 about the same as 2
    x 6, 4 x 3 worse.
    NOTE: no bounds checks, as for :func:`span_tile`.
    """
    sig = types.void(x, offs, data, types.intp, types.intp, types.intp, types.intp, types.intp, w,
                     types.intp, types.intp, types.intp, types.intp, types.float32, types.float32,
                     types.boolean)

    def codegen(context, builder, signature, args):
        x_, offs_, data_, k0a, k1a, k0b, k1b, base_, w_, wpos_, wstride_, nvec_, nvalid_, ia, ib, relu_ = args
        aty = signature.args
        xbase = builder.gep(_data_ptr(context, builder, aty[0], x_), [base_], inbounds=True)
        optr = _data_ptr(context, builder, aty[1], offs_)
        dptr = _data_ptr(context, builder, aty[2], data_)
        wptr = _data_ptr(context, builder, aty[8], w_)
        w0 = builder.gep(wptr, [wpos_], inbounds=True)
        w1 = builder.gep(wptr, [builder.add(wpos_, wstride_)], inbounds=True)
        signed = getattr(aty[1].dtype, "signed", True)
        fma = _fma_vec(builder)
        ns = [builder.sub(k1a, k0a), builder.sub(k1b, k0b)]
        relu = _as_i1(context, builder, relu_, aty[15])
        _for_each_nvec(builder, nvec_, NV_PAIR, "pair_tile", lambda nv: _emit_pair(
            builder, fma, nv, xbase, optr, signed, dptr, [k0a, k0b], ns, w0, w1, [ia, ib], nvalid_, relu))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fmadd(typingctx, a, b, c):
    """``a * b + c`` in float32 with one rounding (``llvm.fmuladd``: one ``vfmadd`` where the CPU has
    FMA); numba without ``fastmath`` never contracts a multiply and an add."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.call(_fma_scalar(builder), list(args))

    return sig, codegen


def _copy_ptrs(context, builder, aty, src, spos, dst, dpos):
    """``&src[spos]`` and ``&dst[dpos]`` as float pointers (the copy intrinsics' first four args)."""
    sp = builder.gep(_data_ptr(context, builder, aty[0], src), [spos], inbounds=True)
    dp = builder.gep(_data_ptr(context, builder, aty[2], dst), [dpos], inbounds=True)
    return sp, dp


@intrinsic
def copy_vec_act(typingctx, src, spos, dst, dpos, relu):
    """:func:`copy_vec`, with ``max(v, 0)`` per lane (NaN kept, as torch.relu) when ``relu``: the
    activation fused into the crop of wide output rows.
    NOTE: no bounds checks, as for :func:`copy_vec`."""
    sig = types.void(src, types.intp, dst, types.intp, types.boolean)

    def codegen(context, builder, signature, args):
        src_, spos_, dst_, dpos_, relu_ = args
        aty = signature.args
        sp, dp = _copy_ptrs(context, builder, aty, src_, spos_, dst_, dpos_)
        v = builder.load(builder.bitcast(sp, _VEC.as_pointer()), align=4)
        v = _relu(builder, v, _as_i1(context, builder, relu_, aty[4]))
        builder.store(v, builder.bitcast(dp, _VEC.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def add_vec_act(typingctx, src, spos, res, rpos, dst, dpos, relu):
    """``dst[dpos : dpos + VW] = act(src[spos : spos + VW] + res[rpos : rpos + VW])`` with ``act`` the
    ReLU of :func:`copy_vec_act` when ``relu``, else the identity: a residual connection (and its
    ReLU) fused into the crop of a convolution's wide output rows, one pass instead of the crop and
    a separate add over the whole output.
    NOTE: no bounds checks: every array holds ``pos + VW`` elements; dst is src itself (``spos == dpos``)
    or overlaps neither src nor res."""
    sig = types.void(src, types.intp, res, types.intp, dst, types.intp, types.boolean)

    def codegen(context, builder, signature, args):
        src_, spos_, res_, rpos_, dst_, dpos_, relu_ = args
        aty = signature.args
        sp = builder.gep(_data_ptr(context, builder, aty[0], src_), [spos_], inbounds=True)
        rp = builder.gep(_data_ptr(context, builder, aty[2], res_), [rpos_], inbounds=True)
        dp = builder.gep(_data_ptr(context, builder, aty[4], dst_), [dpos_], inbounds=True)
        v = builder.fadd(builder.load(builder.bitcast(sp, _VEC.as_pointer()), align=4),
                         builder.load(builder.bitcast(rp, _VEC.as_pointer()), align=4))
        v = _relu(builder, v, _as_i1(context, builder, relu_, aty[6]))
        builder.store(v, builder.bitcast(dp, _VEC.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def clamp_vec(typingctx, src, spos, res, rpos, has_res, dst, dpos, lo, hi):
    """``dst[dpos : dpos + VW] = clamp(src[spos : spos + VW] (+ res[rpos : rpos + VW] with has_res),
    lo, hi)`` lane by lane, NaN kept (``fcmp olt`` / ``ogt`` are false for NaN, as ``torch.clamp``
    keeps it): a ReLU6 fused into the crop of a depthwise conv's wide rows
    (:mod:`sparsecnn.kernels.depthwise`).
    NOTE: no bounds checks, as for :func:`add_vec_act`; ``res`` holds ``rpos + VW`` elements even
    without ``has_res`` (it is read, then ignored)."""
    sig = types.void(src, types.intp, res, types.intp, types.boolean, dst, types.intp, types.float32,
                     types.float32)

    def codegen(context, builder, signature, args):
        src_, spos_, res_, rpos_, has_res_, dst_, dpos_, lo_, hi_ = args
        aty = signature.args
        sp = builder.gep(_data_ptr(context, builder, aty[0], src_), [spos_], inbounds=True)
        rp = builder.gep(_data_ptr(context, builder, aty[2], res_), [rpos_], inbounds=True)
        dp = builder.gep(_data_ptr(context, builder, aty[5], dst_), [dpos_], inbounds=True)
        v = builder.load(builder.bitcast(sp, _VEC.as_pointer()), align=4)
        r = builder.load(builder.bitcast(rp, _VEC.as_pointer()), align=4)  # read either way: res holds it
        v = builder.select(_as_i1(context, builder, has_res_, aty[4]), builder.fadd(v, r), v)
        low, high = _splat(builder, lo_), _splat(builder, hi_)
        v = builder.select(builder.fcmp_ordered("<", v, low), low, v)
        v = builder.select(builder.fcmp_ordered(">", v, high), high, v)
        builder.store(v, builder.bitcast(dp, _VEC.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def max_taps(typingctx, src, base, taps, ntaps, dst, dpos):
    """``dst[dpos : dpos + VW] = max_t src[base + taps[t] : ... + VW]`` over ``0 <= t < ntaps`` lane by
    lane (-inf for no taps), NaN winning as in torch's max pooling: one pooling window of vectors of
    channels side by side (:func:`sparsecnn.kernels.blocked.max_pool_blocked`), the running max in a
    register (a max through memory waits on the store before it: 3x slower).
    NOTE: no bounds checks: src holds ``base + taps[t] + VW`` elements, dst ``dpos + VW``."""
    sig = types.void(src, types.intp, taps, types.intp, dst, types.intp)

    def codegen(context, builder, signature, args):
        src_, base_, taps_, ntaps_, dst_, dpos_ = args
        aty = signature.args
        sp = builder.gep(_data_ptr(context, builder, aty[0], src_), [base_], inbounds=True)
        tp = _data_ptr(context, builder, aty[2], taps_)
        dp = builder.gep(_data_ptr(context, builder, aty[4], dst_), [dpos_], inbounds=True)
        acc = cgutils.alloca_once(builder, _VEC)
        builder.store(ir.Constant(_VEC, [float("-inf")] * VW), acc)
        with cgutils.for_range(builder, ntaps_) as loop:
            off = builder.load(builder.gep(tp, [loop.index], inbounds=True))
            if off.type.width < 64:
                off = builder.sext(off, _I64)
            q = builder.gep(sp, [off], inbounds=True)
            a = builder.load(builder.bitcast(q, _VEC.as_pointer()), align=4)
            d = builder.load(acc)
            take = builder.or_(builder.fcmp_ordered(">", a, d), builder.fcmp_unordered("uno", a, a))
            builder.store(builder.select(take, a, d), acc)
        builder.store(builder.load(acc), builder.bitcast(dp, _VEC.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _nan_max(builder, a, b):
    """``b if (b > a) | (b != b) else a``: the max with NaN winning, as torch's max pooling (and the
    pool kernels' scalar loops, so vector and scalar lanes agree bit for bit)."""
    take = builder.or_(builder.fcmp_ordered(">", b, a), builder.fcmp_unordered("uno", b, b))
    return builder.select(take, b, a)


def _vector_then_scalar(builder, n, body):
    """``body(i, width)`` for the whole vectors ``i = 0, VW, ...`` below ``n`` (width VW), then for each
    remaining element (width 1)."""
    nvec = builder.sdiv(n, ir.Constant(_I64, VW))
    with cgutils.for_range(builder, nvec) as loop:
        body(builder.mul(loop.index, ir.Constant(_I64, VW)), VW)
    start = builder.mul(nvec, ir.Constant(_I64, VW))
    with cgutils.for_range_slice(builder, start, n, ir.Constant(_I64, 1), inc=True) as (j, _):
        body(j, 1)


def _load(builder, ptr, i, width):
    q = builder.gep(ptr, [i], inbounds=True)
    return builder.load(builder.bitcast(q, ir.VectorType(_F32, width).as_pointer()), align=4) if width > 1 \
        else builder.load(q)


def _store(builder, v, ptr, i, width):
    q = builder.gep(ptr, [i], inbounds=True)
    builder.store(v, builder.bitcast(q, ir.VectorType(_F32, width).as_pointer()) if width > 1 else q,
                  align=4)


@intrinsic
def max3_rows(typingctx, src, spos, step, dst, dpos, n):
    """``dst[dpos + j]`` = the NaN-winning max of ``src[spos + j]``, ``src[spos + step + j]`` and
    ``src[spos + 2 * step + j]`` for ``0 <= j < n``: a 3-row pooling window's row pass, whole vectors
    then a scalar tail (the loop numba compiled from a prange body stayed scalar).
    NOTE: no bounds checks; dst does not overlap the rows."""
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        src_, spos_, step_, dst_, dpos_, n_ = args
        aty = signature.args
        sp = builder.gep(_data_ptr(context, builder, aty[0], src_), [spos_], inbounds=True)
        dp = builder.gep(_data_ptr(context, builder, aty[3], dst_), [dpos_], inbounds=True)
        rows = [sp, builder.gep(sp, [step_], inbounds=True),
                builder.gep(sp, [builder.mul(step_, ir.Constant(_I64, 2))], inbounds=True)]

        def body(i, width):
            a, b, c = (_load(builder, r, i, width) for r in rows)
            _store(builder, _nan_max(builder, _nan_max(builder, a, b), c), dp, i, width)

        _vector_then_scalar(builder, n_, body)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def max3_cols2(typingctx, src, spos, dst, dpos, n):
    """``dst[dpos + t]`` = the NaN-winning max of ``src[spos + 2t]``, ``src[spos + 2t + 1]`` and
    ``src[spos + 2t + 2]`` for ``0 <= t < n``: a 3-wide, stride-2 pooling window's column pass. Per
    VW outputs two vector loads split into even and odd lanes, and the even lanes moved one lane on
    with the next float (reads ``src`` up to ``spos + 2n``, not past it).
    NOTE: no bounds checks; dst does not overlap src."""
    sig = types.void(src, types.intp, dst, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        src_, spos_, dst_, dpos_, n_ = args
        sp, dp = _copy_ptrs(context, builder, signature.args, src_, spos_, dst_, dpos_)
        even = ir.Constant(ir.VectorType(_I32, VW), [2 * i for i in range(VW)])
        odd = ir.Constant(ir.VectorType(_I32, VW), [2 * i + 1 for i in range(VW)])
        shift = ir.Constant(ir.VectorType(_I32, VW), list(range(1, VW + 1)))

        def body(t, width):
            i = builder.mul(t, ir.Constant(_I64, 2))
            if width == 1:
                a, b, c = (_load(builder, sp, builder.add(i, ir.Constant(_I64, k)), 1) for k in range(3))
            else:
                lo = _load(builder, sp, i, VW)
                hi = _load(builder, sp, builder.add(i, ir.Constant(_I64, VW)), VW)
                a = builder.shuffle_vector(lo, hi, even)
                b = builder.shuffle_vector(lo, hi, odd)
                nxt = _load(builder, sp, builder.add(i, ir.Constant(_I64, 2 * VW)), 1)
                c = builder.shuffle_vector(a, _splat(builder, nxt), shift)
            _store(builder, _nan_max(builder, _nan_max(builder, a, b), c), dp, t, width)

        _vector_then_scalar(builder, n_, body)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def copy_vec(typingctx, src, spos, dst, dpos):
    """``dst[dpos : dpos + VW] = src[spos : spos + VW]`` as one unaligned vector load and store.

    Why: numba compiles a copy of a short row (a slice assignment, or a loop of 13-27 floats) into a
    call or a scalar loop with alias checks; the crop of wide output rows is a few such copies per
    row, and with them it cost 12-25% of the direct convolution's time.
    NOTE: no bounds checks: both arrays hold ``pos + VW`` elements; src and dst do not overlap.
    """
    sig = types.void(src, types.intp, dst, types.intp)

    def codegen(context, builder, signature, args):
        src_, spos_, dst_, dpos_ = args
        aty = signature.args
        sp, dp = _copy_ptrs(context, builder, aty, src_, spos_, dst_, dpos_)
        v = builder.load(builder.bitcast(sp, _VEC.as_pointer()), align=4)
        builder.store(v, builder.bitcast(dp, _VEC.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def copy_quad(typingctx, src, spos, dst, dpos):
    """``dst[dpos : dpos + 4] = src[spos : spos + 4]`` as one unaligned 4-float load and store (the
    runs of 4 lanes that a stride-4 space-to-depth rearrangement takes from one input row,
    :func:`sparsecnn.kernels.space_to_depth.rearrange_block`).
    NOTE: no bounds checks: both arrays hold ``pos + 4`` elements; src and dst do not overlap."""
    sig = types.void(src, types.intp, dst, types.intp)

    def codegen(context, builder, signature, args):
        src_, spos_, dst_, dpos_ = args
        aty = signature.args
        sp, dp = _copy_ptrs(context, builder, aty, src_, spos_, dst_, dpos_)
        quad = ir.VectorType(_F32, 4).as_pointer()
        builder.store(builder.load(builder.bitcast(sp, quad), align=4), builder.bitcast(dp, quad), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def copy_vec_add(typingctx, src, spos, dst, dpos, add):
    """``dst[dpos : dpos + VW] = src[spos : spos + VW] + add`` for int32 arrays: one vector load, add and
    store (the merge of short index lists, each shifted to its own block of rows, in
    :mod:`sparsecnn.kernels.spconv_input`; as a numba loop it ran scalar with alias checks).
    NOTE: no bounds checks: both arrays hold ``pos + VW`` elements; src and dst do not overlap."""
    sig = types.void(src, types.intp, dst, types.intp, types.int32)

    def codegen(context, builder, signature, args):
        src_, spos_, dst_, dpos_, add_ = args
        sp, dp = _copy_ptrs(context, builder, signature.args, src_, spos_, dst_, dpos_)
        ivec = ir.VectorType(_I32, VW)
        v = builder.load(builder.bitcast(sp, ivec.as_pointer()), align=4)
        a = builder.insert_element(ir.Constant(ivec, ir.Undefined), add_, ir.Constant(_I32, 0))
        a = builder.shuffle_vector(a, ir.Constant(ivec, ir.Undefined), ir.Constant(ivec, [0] * VW))
        builder.store(builder.add(v, a), builder.bitcast(dp, ivec.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen

# dw_tile_*: a register tile of DW_ROWS output rows x up to DW_NV vectors of a depthwise layer (plus
# its kh * kw weight broadcasts and the input vectors in flight): 3 x 4 + 9 + 6 of 32 registers with
# AVX-512VL, 2 x 4 + 9 of 16 with AVX2 (the weights then reloaded from L1 as needed).
DW_ROWS = 4
DW_NV = 3 if _vector_registers() >= 32 else 2


def _splat_i64(builder, s):
    vec = ir.VectorType(_I64, VW)
    v = builder.insert_element(ir.Constant(vec, ir.Undefined), s, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, VW), [0] * VW)
    return builder.shuffle_vector(v, ir.Constant(vec, ir.Undefined), zeros)


def _masked_load(builder, ptr, mask):
    """``llvm.masked.load``: the lanes of ``mask`` (i1 x VW) from ``ptr`` (a float pointer), 0 elsewhere;
    no lane outside the mask is read (a masked ``vmovups`` with AVX-512, ``vmaskmovps`` with AVX2)."""
    vp = _VEC.as_pointer()
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_VEC, [vp, _I32, mask.type, _VEC]), f"llvm.masked.load.v{VW}f32.p0")
    return builder.call(fn, [builder.bitcast(ptr, vp), ir.Constant(_I32, 4), mask, ir.Constant(_VEC, None)])


def _masked_store(builder, v, ptr, mask):
    """``llvm.masked.store``: the lanes of ``mask`` of ``v`` to ``ptr``; nothing written elsewhere."""
    vp = _VEC.as_pointer()
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_VEC, vp, _I32, mask.type]),
        f"llvm.masked.store.v{VW}f32.p0")
    builder.call(fn, [v, builder.bitcast(ptr, vp), ir.Constant(_I32, 4), mask])


def _plus_res(builder, a, has_res, load):
    """``a + load()`` where ``has_res`` (an i1) holds, else ``a``: the residual read only when there is one
    (read either way, the output's old contents cost a pass over memory)."""
    before = builder.basic_block
    with builder.if_then(has_res):
        added = builder.fadd(a, load())
        then = builder.basic_block
    phi = builder.phi(a.type)
    phi.add_incoming(a, before)
    phi.add_incoming(added, then)
    return phi


def _act(builder, v, relu, clamp, lo, hi):
    """``v`` with the ReLU (``relu``, an i1) or the clamp to ``[lo, hi]`` (``clamp``, an i1; NaN kept,
    as :func:`clamp_vec`), for a vector or a scalar ``v``."""
    v = _relu(builder, v, relu)
    vec = isinstance(v.type, ir.VectorType)
    low, high = (_splat(builder, lo, v.type.count), _splat(builder, hi, v.type.count)) if vec else (lo, hi)
    c = builder.select(builder.fcmp_ordered("<", v, low), low, v)
    c = builder.select(builder.fcmp_ordered(">", c, high), high, c)
    return builder.select(clamp, c, v)


def _dw_taps(kh: int, kw: int, sh: int, sw: int) -> list[tuple[int, int, int]]:
    """(phase, row, column) of each tap ``r * kw + s`` of a ``kh x kw`` layer of stride ``(sh, sw)``
    (dilation 1) in the phase planes of :func:`sparsecnn.kernels.conv.phase_layout`: the tap reads
    ``phase * plane + row * wph + column`` past the output's wide position."""
    used = sorted({(r % sh) * sw + s % sw for r in range(kh) for s in range(kw)})
    compact = {q: i for i, q in enumerate(used)}
    return [(compact[(r % sh) * sw + s % sw], r // sh, s // sw) for r in range(kh) for s in range(kw)]


def _dw_tile_intrinsic(kh: int, kw: int, sh: int, sw: int):
    """A :func:`dw_tile_3x3_s1`-like intrinsic for ``kh x kw`` taps at stride ``(sh, sw)``."""
    taps = _dw_taps(kh, kw, sh, sw)

    @intrinsic
    def dw_tile(typingctx, src, base, wph, plane, wts, wpos, init, dst, dpos, dstride, res, has_res, nr,
                nvalid, relu, clamp, lo, hi):
        sig = types.void(src, types.intp, types.intp, types.intp, wts, types.intp, types.float32, dst,
                         types.intp, types.intp, res, types.boolean, types.intp, types.intp, types.boolean,
                         types.boolean, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            (src_, base_, wph_, plane_, wts_, wpos_, init_, dst_, dpos_, dstride_, res_, has_res_, nr_,
             nvalid_, relu_, clamp_, lo_, hi_) = args
            aty = signature.args
            sp = builder.gep(_data_ptr(context, builder, aty[0], src_), [base_], inbounds=True)
            wp = builder.gep(_data_ptr(context, builder, aty[4], wts_), [wpos_], inbounds=True)
            dp = builder.gep(_data_ptr(context, builder, aty[7], dst_), [dpos_], inbounds=True)
            rp = builder.gep(_data_ptr(context, builder, aty[10], res_), [dpos_], inbounds=True)
            has_res = _as_i1(context, builder, has_res_, aty[11])
            relu = _as_i1(context, builder, relu_, aty[14])
            clamp = _as_i1(context, builder, clamp_, aty[15])
            fma = _fma_vec(builder)
            nvec = builder.sdiv(builder.add(nvalid_, ir.Constant(_I64, VW - 1)), ir.Constant(_I64, VW))

            def emit(nrows, nv):
                wv = [_splat(builder, builder.load(builder.gep(wp, [ir.Constant(_I64, k)], inbounds=True)))
                      for k in range(len(taps))]
                start = _splat(builder, init_)
                accs = [[start] * nv for _ in range(nrows)]
                # input row by input row, each vector loaded once and added into every (row, tap) that
                # reads it right away: one loaded vector live at a time (taps in order of first use left
                # all of them live, and spilled)
                users: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
                for k, (q, oy, ox) in enumerate(taps):
                    for rr in range(nrows):
                        users.setdefault((q, rr + oy, ox), []).append((k, rr))
                for (q, row, col), uses in sorted(users.items()):
                    for v in range(nv):
                        off = builder.add(builder.add(builder.mul(ir.Constant(_I64, q), plane_),
                                                      builder.mul(ir.Constant(_I64, row), wph_)),
                                          ir.Constant(_I64, col + v * VW))
                        xv = builder.load(builder.bitcast(builder.gep(sp, [off], inbounds=True),
                                                          _VEC.as_pointer()), align=4)
                        for k, rr in uses:
                            accs[rr][v] = builder.call(fma, [wv[k], xv, accs[rr][v]])
                _dw_epilogue(builder, accs, dp, rp, dstride_, nvalid_, has_res, relu, clamp, lo_, hi_)

            _switch_tiles(builder, nr_, nvec, "dw_tile", emit)
            return context.get_dummy_value()

        return sig, codegen

    return dw_tile


dw_tile_3x3_s1 = _dw_tile_intrinsic(3, 3, 1, 1)
dw_tile_3x3_s1.__doc__ = """Rows ``i < nr`` and columns ``j < nvalid`` of a 3x3 stride-1 depthwise layer's
    output tile: ``dst[dpos + i * dstride + j] = act(init + sum_{r, s} wts[wpos + 3r + s] *
    src[base + (i + r) * wph + j + s] (+ res[dpos + i * dstride + j]))``, with ``act`` the ReLU
    (``relu``) or the clamp to ``[lo, hi]`` (``clamp``) or none, for ``1 <= nr <= DW_ROWS`` and
    ``1 <= nvalid <= DW_NV * VW`` (any other size does nothing). ``src`` is one channel's padded input
    (:func:`sparsecnn.kernels.conv.phase_layout`'s plane, ``wph`` floats a row; ``plane`` unused).

    Why: each input vector is loaded once and feeds the (up to) three output rows of the tile that
    read it, a third of a load per multiply-add, where :func:`span_tile` loads one per multiply-add;
    and the results go to ``dst`` with the bias, the residual and the activation, with no wide rows
    to crop. A tile reads up to ``VW - 1`` floats past a row's last column (the plane's slack).
    NOTE: no bounds checks; ``res`` is read only with ``has_res`` (pass any float array without)."""
dw_tile_3x3_s2 = _dw_tile_intrinsic(3, 3, 2, 2)
dw_tile_3x3_s2.__doc__ = """:func:`dw_tile_3x3_s1` at stride 2: ``src`` holds the four phase planes
    (even / odd rows x even / odd columns, ``plane`` floats apart, :func:`sparsecnn.kernels.conv.
    phase_layout`); tap ``(r, s)`` reads phase ``(r % 2) * 2 + s % 2`` at row ``i + r // 2`` and column
    ``j + s // 2``, so an input vector feeds up to two output rows."""


def _dw_epilogue(builder, accs, dp, rp, dstride, nvalid, has_res, relu, clamp, lo, hi):
    """Store the tile ``accs[row][vector]`` at ``dp`` (rows ``dstride`` floats apart) with the residual
    at ``rp`` (where ``has_res``) and the activation (:func:`_act`); the vectors past ``nvalid``
    columns in masked loads and stores (nothing read or written past them)."""
    vp = _VEC.as_pointer()
    for rr, row_accs in enumerate(accs):
        row = builder.mul(ir.Constant(_I64, rr), dstride)
        for v, a in enumerate(row_accs):
            at = builder.add(row, ir.Constant(_I64, v * VW))
            d = builder.gep(dp, [at], inbounds=True)
            r = builder.gep(rp, [at], inbounds=True)
            rem = builder.sub(nvalid, ir.Constant(_I64, v * VW))
            with builder.if_else(builder.icmp_signed(">=", rem, ir.Constant(_I64, VW))) as (full, part):
                with full:
                    x = _plus_res(builder, a, has_res,
                                  lambda r=r: builder.load(builder.bitcast(r, vp), align=4))
                    builder.store(_act(builder, x, relu, clamp, lo, hi), builder.bitcast(d, vp), align=4)
                with part:
                    lanes = ir.Constant(ir.VectorType(_I64, VW), list(range(VW)))
                    mask = builder.icmp_signed("<", lanes, _splat_i64(builder, rem))
                    x = _plus_res(builder, a, has_res, lambda r=r, m=mask: _masked_load(builder, r, m))
                    _masked_store(builder, _act(builder, x, relu, clamp, lo, hi), d, mask)


def _switch_tiles(builder, nr, nvec, name, emit):
    """A switch on the runtime tile size: ``emit(nrows, nv)`` for ``1 <= nrows <= DW_ROWS`` and
    ``1 <= nv <= DW_NV``; any other size does nothing."""
    done = builder.append_basic_block(f"{name}.done")
    switch = builder.switch(builder.add(builder.mul(nr, ir.Constant(_I64, DW_NV + 1)), nvec), done)
    for nrows in range(1, DW_ROWS + 1):
        for nv in range(1, DW_NV + 1):
            block = builder.append_basic_block(f"{name}.r{nrows}v{nv}")
            switch.add_case(ir.Constant(_I64, nrows * (DW_NV + 1) + nv), block)
            builder.position_at_end(block)
            emit(nrows, nv)
            builder.branch(done)
    builder.position_at_end(done)


def _dw_plain_intrinsic(stride: int):
    """The tile of :func:`dw_tile_3x3_s1_plain` (``stride`` 1) or :func:`dw_tile_3x3_s2_plain` (2)."""

    @intrinsic
    def dw_tile_plain(typingctx, src, base, h, w, y0, c0, wts, wpos, init, dst, dpos, dstride, res, has_res,
                      nr, nvalid, relu, clamp, lo, hi, in_clamp, ilo, ihi):
        sig = types.void(src, types.intp, types.intp, types.intp, types.intp, types.intp, wts, types.intp,
                         types.float32, dst, types.intp, types.intp, res, types.boolean, types.intp,
                         types.intp, types.boolean, types.boolean, types.float32, types.float32,
                         types.boolean, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            (src_, base_, h_, w_, y0_, c0_, wts_, wpos_, init_, dst_, dpos_, dstride_, res_, has_res_, nr_,
             nvalid_, relu_, clamp_, lo_, hi_, in_clamp_, ilo_, ihi_) = args
            aty = signature.args
            sp = builder.gep(_data_ptr(context, builder, aty[0], src_), [base_], inbounds=True)
            wp = builder.gep(_data_ptr(context, builder, aty[6], wts_), [wpos_], inbounds=True)
            dp = builder.gep(_data_ptr(context, builder, aty[9], dst_), [dpos_], inbounds=True)
            rp = builder.gep(_data_ptr(context, builder, aty[12], res_), [dpos_], inbounds=True)
            has_res = _as_i1(context, builder, has_res_, aty[13])
            relu = _as_i1(context, builder, relu_, aty[16])
            clamp = _as_i1(context, builder, clamp_, aty[17])
            in_clamp = _as_i1(context, builder, in_clamp_, aty[20])
            fma = _fma_vec(builder)
            nvec = builder.sdiv(builder.add(nvalid_, ir.Constant(_I64, VW - 1)), ir.Constant(_I64, VW))
            lanes = ir.Constant(ir.VectorType(_I64, VW), list(range(VW)))
            zero_i = ir.Constant(ir.VectorType(_I64, VW), [0] * VW)
            w_vec = _splat_i64(builder, w_)
            no = ir.Constant(ir.VectorType(_I1, VW), [0] * VW)

            def const(v):
                return ir.Constant(_I64, v)

            def cols_mask(c):  # lanes l with 0 <= c + l < w
                at = builder.add(lanes, _splat_i64(builder, c))
                return builder.and_(builder.icmp_signed(">=", at, zero_i),
                                    builder.icmp_signed("<", at, w_vec))

            def clamp_in(v):
                return builder.select(in_clamp, _act(builder, v, None, ir.Constant(_I1, 1), ilo_, ihi_), v)

            def load(rowp, c, mask, inside):
                m = builder.select(inside, mask, no)
                return clamp_in(_masked_load(builder, builder.gep(rowp, [c]), m))

            def columns_s1(rowp, inside, cols):
                # the three taps' vectors: columns c, c + 1, c + 2 (three masked loads)
                return [load(rowp, c, m, inside) for c, m in cols]

            def columns_s2(rowp, inside, cols):
                # even columns c + 2l, odd ones c + 2l + 1, and c + 2l + 2: two vector loads and the float
                # after them, split in registers (as max3_cols2)
                (ca, ma), (cb, mb), (cn, last) = cols
                a, b = load(rowp, ca, ma, inside), load(rowp, cb, mb, inside)
                before = builder.basic_block
                with builder.if_then(builder.and_(inside, last)):
                    got = builder.load(builder.gep(rowp, [cn]))
                    then = builder.basic_block
                nxt = builder.phi(_F32)
                nxt.add_incoming(ir.Constant(_F32, 0.0), before)
                nxt.add_incoming(got, then)
                nxt = clamp_in(_splat(builder, nxt))
                ivec = ir.VectorType(_I32, VW)
                ev = builder.shuffle_vector(a, b, ir.Constant(ivec, [2 * i for i in range(VW)]))
                od = builder.shuffle_vector(a, b, ir.Constant(ivec, [2 * i + 1 for i in range(VW)]))
                e2 = builder.shuffle_vector(ev, nxt, ir.Constant(ivec, list(range(1, VW + 1))))
                return [ev, od, e2]

            def emit(nrows, nv):
                wv = [_splat(builder, builder.load(builder.gep(wp, [const(k)], inbounds=True)))
                      for k in range(9)]
                start = _splat(builder, init_)
                accs = [[start] * nv for _ in range(nrows)]
                cols = []  # per output vector: its loads' columns and masks (the same in every row)
                for v in range(nv):
                    c = builder.add(c0_, const(stride * v * VW))
                    if stride == 1:
                        cols.append([(builder.add(c, const(s_)), cols_mask(builder.add(c, const(s_))))
                                     for s_ in range(3)])
                    else:
                        cb, cn = builder.add(c, const(VW)), builder.add(c, const(2 * VW))
                        last = builder.and_(builder.icmp_signed(">=", cn, const(0)),
                                            builder.icmp_signed("<", cn, w_))
                        cols.append([(c, cols_mask(c)), (cb, cols_mask(cb)), (cn, last)])
                for t in range(stride * (nrows - 1) + 3):  # input rows, each read once
                    y = builder.add(y0_, const(t))
                    inside = builder.and_(builder.icmp_signed(">=", y, const(0)),
                                          builder.icmp_signed("<", y, h_))
                    rowp = builder.gep(sp, [builder.mul(y, w_)])  # not dereferenced outside the masks
                    uses = [(rr, t - stride * rr) for rr in range(nrows) if 0 <= t - stride * rr <= 2]
                    for v in range(nv):
                        xs = (columns_s1 if stride == 1 else columns_s2)(rowp, inside, cols[v])
                        for rr, r in uses:
                            for s_, xv in enumerate(xs):
                                accs[rr][v] = builder.call(fma, [wv[r * 3 + s_], xv, accs[rr][v]])
                _dw_epilogue(builder, accs, dp, rp, dstride_, nvalid_, has_res, relu, clamp, lo_, hi_)

            _switch_tiles(builder, nr_, nvec, f"dw_tile_s{stride}p", emit)
            return context.get_dummy_value()

        return sig, codegen

    return dw_tile_plain


dw_tile_3x3_s2_plain = _dw_plain_intrinsic(2)
dw_tile_3x3_s2_plain.__doc__ = """:func:`dw_tile_3x3_s2` reading the input plane itself
    (``src[base + y * w + c]``, ``h x w``), no phase copy: output row ``i < nr`` and column
    ``j < nvalid`` of the tile read input row ``y0 + 2i + r`` and column ``c0 + 2j + s`` for tap
    ``(r, s)``, a row or column outside the plane reading 0 (the zero padding). Per input row and
    output vector two vector loads and one float, split into the even columns, the odd ones and the
    even ones one on (as :func:`max3_cols2`), each loaded once for the (up to) two output rows that
    read it; with ``in_clamp`` each loaded vector clamped to ``[ilo, ihi]`` first (``ilo <= 0 <= ihi``:
    the padding stays 0). Arguments after ``wts`` as :func:`dw_tile_3x3_s1`'s.

    Why: at stride 2 the phase copy was most of a large plane's time (MobileNet-v2's 96 x 112 x 112
    layer, one thread: 2.1 of 3.3 us a channel).
    NOTE: loads are masked to the plane (nothing read outside it); ``res`` read only with ``has_res``."""
dw_tile_3x3_s1_plain = _dw_plain_intrinsic(1)
dw_tile_3x3_s1_plain.__doc__ = """:func:`dw_tile_3x3_s2_plain` at stride 1: input row ``y0 + i + r``
    and column ``c0 + j + s``; per input row and output vector three masked loads (columns on by 0,
    1 and 2), each added into the (up to) three output rows that read it."""


# dwb_tile: output pixels of a depthwise layer in the channel-blocked layout per register tile (VW
# channels each, side by side in one vector), plus the tap's weight vector and the loaded input.
DWB_NT = 8


def _dwb_accumulators(builder, n, bp):
    """``n`` vector accumulators (allocas, kept in registers by LLVM) set to the bias vector at ``bp``."""
    init = builder.load(builder.bitcast(bp, _VEC.as_pointer()), align=4)
    accs = [cgutils.alloca_once(builder, _VEC) for _ in range(n)]
    for a in accs:
        builder.store(init, a)
    return accs


def _dwb_store(builder, accs, dp, rp, has_res, relu, clamp, lo, hi):
    """Pixel ``j`` of the tile (``accs[j]``) to ``dp + j * VW`` with the residual at ``rp + j * VW``
    (where ``has_res``) and the activation (:func:`_act`)."""
    vp = _VEC.as_pointer()
    for j, acc in enumerate(accs):
        at = ir.Constant(_I64, j * VW)
        x = _plus_res(builder, builder.load(acc), has_res, lambda at=at: builder.load(
            builder.bitcast(builder.gep(rp, [at], inbounds=True), vp), align=4))
        q = builder.bitcast(builder.gep(dp, [at], inbounds=True), vp)
        builder.store(_act(builder, x, relu, clamp, lo, hi), q, align=4)


@intrinsic
def dwb_tile(typingctx, src, base, offs, widx, ntaps, xstep, wts, wbase, bias, bpos, dst, dpos, res, has_res,
             nt, relu, clamp, lo, hi, in_clamp, ilo, ihi):
    """``nt`` output pixels (``1 <= nt <= DWB_NT``; other counts do nothing) of a depthwise layer in
    the channel-blocked layout (:mod:`sparsecnn.kernels.blocked`: ``VW`` channels a pixel, one vector):
    ``dst[dpos + j * VW : ... + VW] = act(bias[bpos : bpos + VW] + sum_{t < ntaps} wts[wbase + widx[t] * VW
    : ... + VW] * clampin(src[base + offs[t] + j * xstep : ... + VW]) (+ res[same]))`` for ``j < nt``,
    ``act`` the ReLU (``relu``) or the clamp to ``[lo, hi]`` (``clamp``) or none, ``clampin`` the clamp
    to ``[ilo, ihi]`` with ``in_clamp``. The taps' input vectors are whole vectors (no shuffle: the
    channels are the lanes), each tap's weight vector loaded once for the ``nt`` pixels.
    NOTE: no bounds checks; every tap read is inside the plane (the caller lists the valid taps);
    ``res`` read only with ``has_res``."""
    sig = types.void(src, types.intp, offs, widx, types.intp, types.intp, wts, types.intp, bias, types.intp,
                     dst, types.intp, res, types.boolean, types.intp, types.boolean, types.boolean,
                     types.float32, types.float32, types.boolean, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        (src_, base_, offs_, widx_, ntaps_, xstep_, wts_, wbase_, bias_, bpos_, dst_, dpos_, res_, has_res_,
         nt_, relu_, clamp_, lo_, hi_, in_clamp_, ilo_, ihi_) = args
        aty = signature.args
        vp = _VEC.as_pointer()
        sp = builder.gep(_data_ptr(context, builder, aty[0], src_), [base_], inbounds=True)
        op = _data_ptr(context, builder, aty[2], offs_)
        ip = _data_ptr(context, builder, aty[3], widx_)
        wp = builder.gep(_data_ptr(context, builder, aty[6], wts_), [wbase_], inbounds=True)
        bp = builder.gep(_data_ptr(context, builder, aty[8], bias_), [bpos_], inbounds=True)
        dp = builder.gep(_data_ptr(context, builder, aty[10], dst_), [dpos_], inbounds=True)
        rp = builder.gep(_data_ptr(context, builder, aty[12], res_), [dpos_], inbounds=True)
        has_res = _as_i1(context, builder, has_res_, aty[13])
        relu = _as_i1(context, builder, relu_, aty[15])
        clamp = _as_i1(context, builder, clamp_, aty[16])
        in_clamp = _as_i1(context, builder, in_clamp_, aty[19])
        fma = _fma_vec(builder)

        def emit(n):
            accs = _dwb_accumulators(builder, n, bp)
            with cgutils.for_range(builder, ntaps_) as loop:
                t = loop.index
                off = builder.load(builder.gep(op, [t], inbounds=True))
                k = builder.load(builder.gep(ip, [t], inbounds=True))
                wv = builder.load(builder.bitcast(builder.gep(wp, [builder.mul(k, ir.Constant(_I64, VW))],
                                                              inbounds=True), vp), align=4)
                p = builder.gep(sp, [off], inbounds=True)
                for j in range(n):
                    q = builder.gep(p, [builder.mul(xstep_, ir.Constant(_I64, j))], inbounds=True)
                    xv = builder.load(builder.bitcast(q, vp), align=4)
                    cl = _act(builder, xv, None, ir.Constant(_I1, 1), ilo_, ihi_)
                    xv = builder.select(in_clamp, cl, xv)
                    builder.store(builder.call(fma, [wv, xv, builder.load(accs[j])]), accs[j])
            _dwb_store(builder, accs, dp, rp, has_res, relu, clamp, lo_, hi_)

        _for_each_nvec(builder, nt_, DWB_NT, "dwb_tile", emit)
        return context.get_dummy_value()

    return sig, codegen


def _dwb_row3(stride: int):
    """The intrinsic :func:`dwb_tile` for a 1 x 3-wide row of taps at stride ``stride`` (1 or 2)."""
    def typer(typingctx, src, base, offs, widx, nrows, wts, wbase, bias, bpos, dst, dpos, res, has_res, nt,
              relu, clamp, lo, hi, in_clamp, ilo, ihi):
        sig = types.void(src, types.intp, offs, widx, types.intp, wts, types.intp, bias, types.intp, dst,
                         types.intp, res, types.boolean, types.intp, types.boolean, types.boolean,
                         types.float32, types.float32, types.boolean, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            (src_, base_, offs_, widx_, nrows_, wts_, wbase_, bias_, bpos_, dst_, dpos_, res_, has_res_, nt_,
             relu_, clamp_, lo_, hi_, in_clamp_, ilo_, ihi_) = args
            aty = signature.args
            vp = _VEC.as_pointer()
            sp = builder.gep(_data_ptr(context, builder, aty[0], src_), [base_], inbounds=True)
            op = _data_ptr(context, builder, aty[2], offs_)
            ip = _data_ptr(context, builder, aty[3], widx_)
            wp = builder.gep(_data_ptr(context, builder, aty[5], wts_), [wbase_], inbounds=True)
            bp = builder.gep(_data_ptr(context, builder, aty[7], bias_), [bpos_], inbounds=True)
            dp = builder.gep(_data_ptr(context, builder, aty[9], dst_), [dpos_], inbounds=True)
            rp = builder.gep(_data_ptr(context, builder, aty[11], res_), [dpos_], inbounds=True)
            has_res = _as_i1(context, builder, has_res_, aty[12])
            relu = _as_i1(context, builder, relu_, aty[14])
            clamp = _as_i1(context, builder, clamp_, aty[15])
            in_clamp = _as_i1(context, builder, in_clamp_, aty[18])
            fma = _fma_vec(builder)

            def vload(p, i):
                q = builder.gep(p, [ir.Constant(_I64, i * VW)], inbounds=True)
                return builder.load(builder.bitcast(q, vp), align=4)

            def emit(n):
                accs = _dwb_accumulators(builder, n, bp)
                with cgutils.for_range(builder, nrows_) as loop:
                    t = loop.index
                    p = builder.gep(sp, [builder.load(builder.gep(op, [t], inbounds=True))], inbounds=True)
                    k = builder.load(builder.gep(ip, [t], inbounds=True))
                    wrow = builder.gep(wp, [builder.mul(k, ir.Constant(_I64, VW))], inbounds=True)
                    wv = [vload(wrow, s_) for s_ in range(3)]
                    for c in range((n - 1) * stride + 3):  # input pixel c feeds pixels j: c = j * stride + s_
                        xv = vload(p, c)
                        cl = _act(builder, xv, None, ir.Constant(_I1, 1), ilo_, ihi_)
                        xv = builder.select(in_clamp, cl, xv)
                        for s_ in range(3):
                            j, r = divmod(c - s_, stride)
                            if r == 0 and 0 <= j < n:
                                builder.store(builder.call(fma, [wv[s_], xv, builder.load(accs[j])]), accs[j])
                _dwb_store(builder, accs, dp, rp, has_res, relu, clamp, lo_, hi_)

            _for_each_nvec(builder, nt_, DWB_NT, typer.__name__, emit)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = "dwb_tile3" if stride == 1 else f"dwb_tile3s{stride}"
    typer.__doc__ = (f""":func:`dwb_tile` for ``nt`` pixels of a 1 x 3-wide row of taps at stride {stride}
    (dilation 1), every pixel's three taps inside the row: for each of ``nrows`` input rows (``offs[t]``:
    the row's first tap of pixel 0, ``widx[t]``: its weight index ``r * 3``) the ``(nt - 1) * {stride} + 3``
    input vectors are loaded once and each added into every pixel that reads it (at stride 1 a third of
    a load per FMA, at stride 2 two thirds, where :func:`dwb_tile` loads one).
    NOTE: no bounds checks, as for :func:`dwb_tile`.""")
    return intrinsic(typer)


dwb_tile3 = _dwb_row3(1)
dwb_tile3s2 = _dwb_row3(2)


# Winograd F(m x m, r x r) (Lavin & Gray, CVPR 2016), keyed by (m, r): the input transform B^T (rows of an
# (m + r - 1)-point tile) and the output transform A^T (m outputs from m + r - 1 points). For 3 x 3 filters
# the paper's, points 0, +-1 (m = 2) and 0, +-1, +-2 (m = 4); for 5 x 5 ones (AlexNet's conv2) built by
# toom_cook from the points of WINO_POINTS. The filters' G is sparsecnn.kernels.winograd's.
WINO_BT: dict[tuple[int, int], tuple[tuple[float, ...], ...]] = {
    (2, 3): ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    (4, 3): ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
             (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
}
WINO_AT: dict[tuple[int, int], tuple[tuple[float, ...], ...]] = {
    (2, 3): ((1, 1, 1, 0), (0, 1, -1, -1)),
    (4, 3): ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
}
# The finite points of each 5 x 5 form (the last point is infinity). Relative errors of one float32 tile
# against float64 over 48 channels (random normal data, 200 tiles): median 3.5e-6 / max 1.2e-5 for
# F(4x4, 5x5) (F(4x4, 3x3): 2.0e-6 / 1.0e-5 on the same test). Every entry of its B^T and A^T is a small
# multiple of a power of two, exact in float32. F(3x3, 5x5) (points 0, +-1, +-1/2, 2: 2.7e-6 / 1.1e-5)
# ran AlexNet's conv2 0.84x / 0.81x as fast as F(4x4, 5x5) at batch 1 / 32 and is not built.
WINO_POINTS: dict[tuple[int, int], tuple[Fraction, ...]] = {
    (4, 5): tuple(map(Fraction, (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2)))),
}


def toom_cook(points: tuple[Fraction, ...], m: int, r: int) -> tuple[list[list[Fraction]], ...]:
    """``(A^T, G, B^T)`` of Winograd F(m, r) over the finite ``points`` (``m + r - 2`` of them) and
    infinity, exact: ``A^T[i][j] = a_j^i`` (and 1 for the last output at infinity), ``G[j][k] = a_j^k /
    prod_{l != j} (a_j - a_l)``, and ``B^T``'s row ``j`` the coefficients (lowest power first) of
    ``prod_{l != j} (x - a_l)``, its last row those of ``prod_l (x - a_l)``. It reproduces the paper's F(4,
    3) from 0, 1, -1, 2, -2; the tests check every form against a direct convolution."""
    n = m + r - 1
    a = list(points)
    if len(a) != n - 1 or len(set(a)) != len(a):
        raise ValueError(f"F({m}, {r}) needs {n - 1} distinct finite points, got {points}")

    def poly(roots: list[Fraction]) -> list[Fraction]:
        c = [Fraction(1)]
        for x in roots:  # c(t) * (t - x)
            c = [(c[i - 1] if i else 0) - x * (c[i] if i < len(c) else 0) for i in range(len(c) + 1)]
        return c

    at = [[a[j] ** i for j in range(n - 1)] + [Fraction(int(i == m - 1))] for i in range(m)]
    g = []
    bt = []
    for j in range(n - 1):
        others = a[:j] + a[j + 1:]
        f = Fraction(1)
        for x in others:
            f *= a[j] - x
        g.append([a[j] ** k / f for k in range(r)])
        bt.append([*poly(others), Fraction(0)])
    g.append([Fraction(int(k == r - 1)) for k in range(r)])
    bt.append(poly(a))
    return at, g, bt


for _key, _pts in WINO_POINTS.items():
    _at, _, _bt = toom_cook(_pts, *_key)
    WINO_AT[_key] = tuple(tuple(float(c) for c in row) for row in _at)
    WINO_BT[_key] = tuple(tuple(float(c) for c in row) for row in _bt)


def _vec_at(builder, base, off):
    """The ``VW``-float vector pointer ``base + off`` (``off`` an i64 value)."""
    return builder.bitcast(builder.gep(base, [off], inbounds=True), _VEC.as_pointer())


def _lincomb(builder, coefs, vecs):
    """``sum_j coefs[j] * vecs[j]`` in order: +-1 as an add or subtract, other integers as an FMA with
    the constant (exact small integers: one rounding per term, as the adds)."""
    acc = None
    for c, v in zip(coefs, vecs, strict=True):
        if c == 0:
            continue
        if acc is None:
            if c in (1, -1):
                acc = v if c == 1 else builder.fneg(v)
            else:
                acc = builder.fmul(v, _splat(builder, ir.Constant(_F32, c)))
        elif c in (1, -1):
            acc = builder.fadd(acc, v) if c == 1 else builder.fsub(acc, v)
        else:
            acc = builder.call(_fma_vec(builder), [v, _splat(builder, ir.Constant(_F32, c)), acc])
    return acc if acc is not None else ir.Constant(_VEC, [0.0] * VW)


def _wino_name(m: int, r: int, what: str) -> str:
    return {(2, 3): f"wino_{what}_tile", (4, 3): f"wino4_{what}_tile"}.get((m, r), f"wino{m}r{r}_{what}_tile")


def _wino_in(m: int, r: int = 3):
    bt = WINO_BT[m, r]
    p = m + r - 1

    def typer(typingctx, src, spos, rstride, dst, dpos, dstride):
        sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            src_, spos_, rs_, dst_, dpos_, ds_ = args
            aty = signature.args
            sp = builder.gep(_data_ptr(context, builder, aty[0], src_), [spos_], inbounds=True)
            dp = builder.gep(_data_ptr(context, builder, aty[3], dst_), [dpos_], inbounds=True)
            d = [[builder.load(_vec_at(builder, sp, builder.add(builder.mul(rs_, ir.Constant(_I64, i)),
                                                               ir.Constant(_I64, j * VW))), align=4)
                  for j in range(p)] for i in range(p)]
            t = [[_lincomb(builder, row, [d[k][j] for k in range(p)]) for j in range(p)] for row in bt]
            for i in range(p):
                for j, row in enumerate(bt):
                    at = _vec_at(builder, dp, builder.mul(ds_, ir.Constant(_I64, p * i + j)))
                    builder.store(_lincomb(builder, row, t[i]), at, align=4)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = typer.__qualname__ = _wino_name(m, r, "in")
    return intrinsic(typer)


def _wino_out(m: int, r: int = 3):
    at_ = WINO_AT[m, r]
    p = m + r - 1

    def typer(typingctx, mm, mpos, mstride, bias, bpos, res, has_res, relu, dst, dpos, rowstride, nx, ny):
        sig = types.void(mm, types.intp, types.intp, bias, types.intp, res, types.boolean, types.boolean, dst,
                         types.intp, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            m_, mpos_, ms_, b_, bpos_, r_, hres_, relu_, d_, dpos_, rows_, nx_, ny_ = args
            aty = signature.args
            mp = builder.gep(_data_ptr(context, builder, aty[0], m_), [mpos_], inbounds=True)
            bp = builder.gep(_data_ptr(context, builder, aty[3], b_), [bpos_], inbounds=True)
            rp = builder.gep(_data_ptr(context, builder, aty[5], r_), [dpos_], inbounds=True)
            dp = builder.gep(_data_ptr(context, builder, aty[8], d_), [dpos_], inbounds=True)
            has_res = _as_i1(context, builder, hres_, aty[6])
            relu = _as_i1(context, builder, relu_, aty[7])
            pts = [[builder.load(_vec_at(builder, mp, builder.mul(ms_, ir.Constant(_I64, p * i + j))),
                                 align=4) for j in range(p)] for i in range(p)]
            s = [[_lincomb(builder, row, [pts[k][j] for k in range(p)]) for j in range(p)] for row in at_]
            bv = builder.load(_vec_at(builder, bp, ir.Constant(_I64, 0)), align=4)
            for dy in range(m):
                for dx, row in enumerate(at_):
                    off = builder.add(builder.mul(rows_, ir.Constant(_I64, dy)), ir.Constant(_I64, dx * VW))
                    inside = builder.and_(builder.icmp_signed(">", nx_, ir.Constant(_I64, dx)),
                                          builder.icmp_signed(">", ny_, ir.Constant(_I64, dy)))
                    with builder.if_then(inside):
                        v = builder.fadd(_lincomb(builder, row, s[dy]), bv)
                        with builder.if_else(has_res) as (then, otherwise):
                            with then:
                                with_res = builder.fadd(v, builder.load(_vec_at(builder, rp, off), align=4))
                                from_then = builder.block
                            with otherwise:
                                from_else = builder.block
                        phi = builder.phi(v.type)
                        phi.add_incoming(with_res, from_then)
                        phi.add_incoming(v, from_else)
                        builder.store(_relu(builder, phi, relu), _vec_at(builder, dp, off), align=4)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = typer.__qualname__ = _wino_name(m, r, "out")
    return intrinsic(typer)


def _transpose(builder, vecs):
    """The ``n x n`` transpose of ``n`` vectors of ``n`` lanes (``n`` a power of two): lane ``j`` of
    result ``i`` is lane ``i`` of ``vecs[j]``. log2(n) stages of block swaps, each a two-source shuffle
    per vector (24 for 8 x 8)."""
    n = len(vecs)
    v = list(vecs)
    h = n // 2
    while h:
        lo = [j if not j & h else n + j - h for j in range(n)]
        hi = [j + h if not j & h else n + j for j in range(n)]
        for i in range(n):
            if not i & h:
                a, b = v[i], v[i + h]
                v[i] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, n), lo))
                v[i + h] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, n), hi))
        h //= 2
    return v


# The row pieces of a partial tile's store: output columns dx < nx as (first lane, width) runs of 4, 2
# and 1 floats (no masked stores: AVX2's vmaskmovps is slow on AMD cores).
_ROW_PIECES = {1: ((0, 1),), 2: ((0, 2),), 3: ((0, 2), (2, 1)), 4: ((0, 4),)}


def _plain_rows_whole(builder, ys, relu, dp, plane, rows, nl, m):
    """A whole ``m x m`` tile's ``ys`` (a filter per lane) into a plain output: the ReLU on the
    vectors, ``VW x VW`` transposes, each filter's rows stored as ``m``-float vectors."""
    rowty = ir.VectorType(_F32, m).as_pointer()
    ys = [_relu(builder, y, relu) for y in ys]
    for blk in range(m * m // VW):  # VW positions (VW / m rows of the tile) at a time
        per_f = _transpose(builder, ys[blk * VW:(blk + 1) * VW])  # VW positions per filter
        for f in range(VW):
            with builder.if_then(builder.icmp_signed(">", nl, ir.Constant(_I64, f))):
                for q in range(VW // m):
                    row = builder.shuffle_vector(per_f[f], per_f[f], ir.Constant(
                        ir.VectorType(_I32, m), list(range(q * m, q * m + m))))
                    off = builder.add(builder.mul(plane, ir.Constant(_I64, f)),
                                      builder.mul(rows, ir.Constant(_I64, blk * (VW // m) + q)))
                    builder.store(row, builder.bitcast(builder.gep(dp, [off], inbounds=True), rowty), align=4)


def _plain_row_part(builder, src, d, rs, nx, has_res, relu):
    """The first ``nx`` (a constant) floats of a row at ``src`` (+ the residual's at ``rs`` where
    ``has_res``), the ReLU, stored at ``d``: runs of 4, 2 and 1 floats."""
    for o, w in _ROW_PIECES[nx]:
        vty = ir.VectorType(_F32, w).as_pointer()
        at = ir.Constant(_I64, o)
        v = builder.load(builder.bitcast(builder.gep(src, [at], inbounds=True), vty), align=4)
        before = builder.block
        with builder.if_then(has_res):
            vr = builder.fadd(v, builder.load(builder.bitcast(builder.gep(rs, [at], inbounds=True), vty),
                                              align=4))
            added = builder.block
        phi = builder.phi(v.type)
        phi.add_incoming(vr, added)
        phi.add_incoming(v, before)
        builder.store(_relu(builder, phi, relu), builder.bitcast(builder.gep(d, [at], inbounds=True), vty),
                      align=4)


def _plain_rows_partial(builder, ys, relu, has_res, dp, rp, plane, rows, nl, nx, ny, m):
    """An ``m x m`` tile's ``ys`` into a plain output where only ``nx x ny`` of it is inside the plane
    or a residual is added: the transposed rows into a stack scratch, then each filter's ``ny`` rows
    through :func:`_plain_row_part` (a switch on ``nx``)."""
    tp = builder.bitcast(cgutils.alloca_once(builder, ir.ArrayType(_F32, VW * m * m)), _F32.as_pointer())
    for blk in range(m * m // VW):
        per_f = _transpose(builder, ys[blk * VW:(blk + 1) * VW])
        for f in range(VW):
            builder.store(per_f[f], _vec_at(builder, tp, ir.Constant(_I64, f * m * m + blk * VW)), align=4)
    with cgutils.for_range(builder, nl) as floop, cgutils.for_range(builder, ny) as yloop:
        f, dy = floop.index, yloop.index
        src = builder.gep(tp, [builder.add(builder.mul(f, ir.Constant(_I64, m * m)),
                                           builder.mul(dy, ir.Constant(_I64, m)))], inbounds=True)
        off = builder.add(builder.mul(plane, f), builder.mul(rows, dy))
        d, rs = builder.gep(dp, [off], inbounds=True), builder.gep(rp, [off], inbounds=True)
        done = builder.append_basic_block("wino_out_plain.row_done")
        switch = builder.switch(nx, done)
        for n in range(1, m + 1):
            block = builder.append_basic_block(f"wino_out_plain.nx{n}")
            switch.add_case(ir.Constant(_I64, n), block)
            builder.position_at_end(block)
            _plain_row_part(builder, src, d, rs, n, has_res, relu)
            builder.branch(done)
        builder.position_at_end(done)


def _wino_out_plain(m: int, r: int):
    at_ = WINO_AT[m, r]
    p = m + r - 1
    assert (m * m) % VW == 0 and VW % m == 0 and m in _ROW_PIECES

    def typer(typingctx, mm, mpos, mstride, bias, bpos, relu, dst, dpos, rowstride, plane, nl, nx, ny, res,
              has_res):
        sig = types.void(mm, types.intp, types.intp, bias, types.intp, types.boolean, dst, types.intp,
                         types.intp, types.intp, types.intp, types.intp, types.intp, res, types.boolean)

        def codegen(context, builder, signature, args):
            m_, mpos_, ms_, b_, bpos_, relu_, d_, dpos_, rows_, plane_, nl_, nx_, ny_, r_, hres_ = args
            aty = signature.args
            mp = builder.gep(_data_ptr(context, builder, aty[0], m_), [mpos_], inbounds=True)
            bp = builder.gep(_data_ptr(context, builder, aty[3], b_), [bpos_], inbounds=True)
            dp = builder.gep(_data_ptr(context, builder, aty[6], d_), [dpos_], inbounds=True)
            rp = builder.gep(_data_ptr(context, builder, aty[13], r_), [dpos_], inbounds=True)
            relu = _as_i1(context, builder, relu_, aty[5])
            has_res = _as_i1(context, builder, hres_, aty[14])
            pts = [[builder.load(_vec_at(builder, mp, builder.mul(ms_, ir.Constant(_I64, p * i + j))),
                                 align=4) for j in range(p)] for i in range(p)]
            s = [[_lincomb(builder, row, [pts[k][j] for k in range(p)]) for j in range(p)] for row in at_]
            bv = builder.load(_vec_at(builder, bp, ir.Constant(_I64, 0)), align=4)
            ys = [builder.fadd(_lincomb(builder, row, s[dy]), bv)
                  for dy in range(m) for row in at_]  # position dy * m + dx, a filter per lane
            whole = builder.and_(builder.and_(builder.icmp_signed("==", nx_, ir.Constant(_I64, m)),
                                              builder.icmp_signed("==", ny_, ir.Constant(_I64, m))),
                                 builder.not_(has_res))
            with builder.if_else(whole, likely=True) as (then, otherwise):
                with then:
                    _plain_rows_whole(builder, ys, relu, dp, plane_, rows_, nl_, m)
                with otherwise:
                    _plain_rows_partial(builder, ys, relu, has_res, dp, rp, plane_, rows_, nl_, nx_, ny_, m)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = typer.__qualname__ = _wino_name(m, r, "out_plain")
    return intrinsic(typer)


wino_in_tile = _wino_in(2)
wino_in_tile.__doc__ = """The input transform of Winograd F(2x2, 3x3) for one 4 x 4 tile of ``VW``-channel
vectors: ``V = B^T d B`` (``WINO_BT[2, 3]``) with ``d[i][j] = src[spos + i * rstride + j * VW : ... + VW]``
and
``V[k]`` (``k = 4 r + c``) stored at ``dst[dpos + k * dstride]`` (:mod:`sparsecnn.kernels.winograd`):
16 vector loads, 32 adds and 16 stores, the channels in the lanes. numba's loops over the lanes do
not vectorise here (16 loads and 16 stores through arrays that may alias: too many pairs for LLVM's
runtime checks) and ran 5x slower.
NOTE: no bounds checks: src holds ``spos + 3 * rstride + 4 * VW`` floats, dst ``dpos + 15 * dstride +
VW``."""
wino_out_tile = _wino_out(2)
wino_out_tile.__doc__ = """The output transform of Winograd F(2x2, 3x3) for one tile of ``VW`` filters: ``Y =
A^T M A + bias`` (``WINO_AT[2, 3]``) with ``M[k] = m[mpos + k * mstride : ... + VW]`` (``k = 4 r + c``) and
``bias[bpos : bpos + VW]``; then ``res`` at the same place added with ``has_res`` and ``max(v, 0)``
(NaN kept) with ``relu``; ``Y[dy][dx]`` stored at ``dst[dpos + dy * rowstride + dx * VW]`` for ``dx <
nx`` and ``dy < ny`` (a tile at the last odd row or column).
NOTE: no bounds checks: m holds ``mpos + 15 * mstride + VW`` floats; dst (and res) every position
written."""
wino4_in_tile = _wino_in(4)
wino4_in_tile.__doc__ = """:func:`wino_in_tile` for F(4x4, 3x3): 6 x 6 tiles (``WINO_BT[4, 3]``), 36 points
(``k = 6 r + c``)."""
wino4_out_tile = _wino_out(4)
wino4_out_tile.__doc__ = """:func:`wino_out_tile` for F(4x4, 3x3): 36 points into 4 x 4 outputs
(``WINO_AT[4, 3]``), ``nx, ny <= 4``."""
wino4r5_in_tile = _wino_in(4, 5)
wino4r5_in_tile.__doc__ = """:func:`wino_in_tile` for F(4x4, 5x5): 8 x 8 tiles (``WINO_BT[4, 5]``), 64 points
(``k = 8 r + c``)."""
wino4r5_out_tile = _wino_out(4, 5)
wino4r5_out_tile.__doc__ = """:func:`wino_out_tile` for F(4x4, 5x5): 64 points into 4 x 4 outputs
(``WINO_AT[4, 5]``), ``nx, ny <= 4``."""
wino4_out_plain_tile = _wino_out_plain(4, 3)
wino4_out_plain_tile.__doc__ = """:func:`wino4_out_tile` for a 4 x 4 tile into a plain output: ``Y = A^T M A +
bias`` (+ ``res`` at the same place with ``has_res``; ``max(Y, 0)``, NaN kept, with ``relu``), the 16 position
vectors turned into the filters' rows by in-register transposes of ``VW x VW`` (:func:`_transpose`), then
filter ``f < nl`` of the vector's ``VW``, row ``dy < ny``, stored as ``nx`` floats at ``dst[dpos + f * plane +
dy * rowstride]`` (``nx, ny <= 4``). A whole tile without a residual stores its rows straight from the
registers; a partial one (the plane's last row and column of tiles) or one with a residual goes through a
stack scratch of the transposed rows, each row as runs of 4, 2 and 1 floats (``_ROW_PIECES``). Replaces 16
x VW scalar stores through a scratch tile: AlexNet's conv1 at batch 32 (96 filters on 55x55 planes, scratch
timing, 2 threads) 31.2 -> 24.6 ms with whole tiles only (into a blocked output 22.0); the partial tiles
too (10% of conv1's outputs, 21% of conv2's), in-process A/B: conv1 1.02-1.03x at batch 1, 1.00-1.02x at
32, conv2 0.99-1.00x / 1.03x.
NOTE: no bounds checks, as for :func:`wino_out_tile`; ``res`` (``dst`` itself for none) is read only with
``has_res``."""
wino4r5_out_plain_tile = _wino_out_plain(4, 5)
wino4r5_out_plain_tile.__doc__ = """:func:`wino4_out_plain_tile` for F(4x4, 5x5) (``WINO_AT[4, 5]``)."""



def _copy_every(k: int):
    def typer(typingctx, src, spos, dst, dpos):
        sig = types.void(src, types.intp, dst, types.intp)

        def codegen(context, builder, signature, args):
            src_, spos_, dst_, dpos_ = args
            sp, dp = _copy_ptrs(context, builder, signature.args, src_, spos_, dst_, dpos_)
            vecs = [builder.load(builder.bitcast(builder.gep(sp, [ir.Constant(_I64, i * VW)], inbounds=True),
                                                 _VEC.as_pointer()), align=4) for i in range(k)]
            while len(vecs) > 1:  # concatenate pairwise (an odd last one with undefined lanes)
                if len(vecs) % 2:
                    vecs.append(ir.Constant(vecs[-1].type, ir.Undefined))
                n = vecs[0].type.count
                cat = ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n)))
                vecs = [builder.shuffle_vector(a, b, cat) for a, b in zip(vecs[::2], vecs[1::2], strict=True)]
            every = ir.Constant(ir.VectorType(_I32, VW), [k * i for i in range(VW)])
            out = builder.shuffle_vector(vecs[0], ir.Constant(vecs[0].type, ir.Undefined), every)
            builder.store(out, builder.bitcast(dp, _VEC.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = f"copy_every{k}"
    typer.__doc__ = (f"``dst[dpos : dpos + VW] = src[spos : spos + {k} * VW : {k}]``: {k} vector loads, "
                     f"shuffles keeping every {k}th lane, one store (a stride-{k} row of a phase plane).\n"
                     f"    NOTE: no bounds checks: src holds ``spos + {k} * VW`` elements, dst "
                     "``dpos + VW``; no overlap.")
    return intrinsic(typer)


# Stride-2, -3 and -4 rows of phase planes (ResNet's stride-2 layers, AlexNet's conv1 at stride 4): the
# scalar strided copy took 31% of ResNet's 3x3 stride-2 layer at 90%, and 10% of AlexNet's conv1 at
# batch 32 (3.4 of 35.7 ms, 5 cycles a float).
copy_even = _copy_every(2)
copy_every3 = _copy_every(3)
copy_every4 = _copy_every(4)


# --------------------------------------------------------------------------------------------------
# sparse row . dense vector (spmv at batch 1)

# A codebook of at most 32 floats is looked up in registers (two zmm halves, one ``vpermi2ps`` per
# eight codes) where the CPU has AVX-512; elsewhere each code's value is one load from the codebook.
HAS_TABLE32 = _vector_registers() >= 32
TABLE = 32  # entries of the padded codebook the register lookup reads


def _block_columns(builder, ip, k, words):
    """The eight columns ``ix[k : k + 8]`` of one block as i64 values. With ``words``, uint16 / uint32
    columns are read as two / four 64-bit words split by shifts (little-endian), not as eight loads:
    the float spmv then issues 11 loads per eight nonzeros instead of 17 on Zen 4's three load ports.
    Measured (2 threads, batch 1, AlexNet-sized 91% CSR with 32 distinct values, old and new kernels
    interleaved in one process, two runs): float spmv fc6 / fc7 with the weights cached 1.06-1.09x /
    1.10-1.11x, cold 1.01-1.07x / 0.95-0.96x (DRAM-bound); the codebook kernel 0.96-0.99x (its
    register lookup already keeps the shuffle ports busy, and the shifts add ALU work), so it keeps
    the eight loads."""
    width = ip.type.pointee.width
    if not words or width not in (16, 32):
        cols = [builder.load(builder.gep(ip, [builder.add(k, ir.Constant(_I64, j))], inbounds=True))
                for j in range(RW)]
        return [c if c.type.width == 64 else builder.zext(c, _I64) for c in cols]
    per_word = 64 // width
    mask = ir.Constant(_I64, (1 << width) - 1)
    cols = []
    for w in range(RW // per_word):
        at = builder.gep(ip, [builder.add(k, ir.Constant(_I64, w * per_word))], inbounds=True)
        word = builder.load(builder.bitcast(at, _I64.as_pointer()), align=width // 8)
        for j in range(per_word):
            shifted = builder.lshr(word, ir.Constant(_I64, j * width)) if j else word
            cols.append(builder.and_(shifted, mask) if j < per_word - 1 else shifted)
    return cols


def _emit_row_dot(builder, xp, ip, k0, n, weights_at, weight_at, words=False):
    """``sum_e w[e] * x[ix[e]]`` over ``k0 <= e < k0 + n`` in the order of eight chains: chain ``j``
    (one lane of one ``<8 x float>`` accumulator) sums the entries ``j mod 8`` of the whole blocks of
    eight, the rest go into chain 0, and the result is ``((s0 + s1) + (s2 + s3)) + ((s4 + s5) +
    (s6 + s7))``. ``weights_at(k)`` gives the vector of the eight weights from entry ``k``,
    ``weight_at(k)`` one weight; ``words``: read a block's columns as 64-bit words
    (:func:`_block_columns`)."""
    fma = _fma_vec(builder, RW)
    fma1 = _fma_scalar(builder)
    acc = cgutils.alloca_once(builder, _RVEC)
    builder.store(ir.Constant(_RVEC, [0.0] * RW), acc)
    nblk = builder.udiv(n, ir.Constant(_I64, RW))

    def x_at(k):
        col = builder.load(builder.gep(ip, [k], inbounds=True))
        if col.type.width < 64:
            col = builder.zext(col, _I64)
        return builder.load(builder.gep(xp, [col], inbounds=True))

    with cgutils.for_range(builder, nblk) as loop:
        k = builder.add(k0, builder.mul(loop.index, ir.Constant(_I64, RW)))
        xv = ir.Constant(_RVEC, ir.Undefined)
        # Eight scalar loads inserted into one vector: no gather (slower on Zen 4, and no faster on
        # Emerald Rapids: fc6 / fc7 / fc8 at 91 / 91 / 75%, warm, 0.55-0.79 / 0.34-0.37 / 0.20-0.25
        # ms with vgatherdps against 0.60-0.62 / 0.30-0.31 / 0.19-0.20 ms).
        for j, col in enumerate(_block_columns(builder, ip, k, words)):
            x = builder.load(builder.gep(xp, [col], inbounds=True))
            xv = builder.insert_element(xv, x, ir.Constant(_I32, j))
        builder.store(builder.call(fma, [weights_at(k), xv, builder.load(acc)]), acc)
    a = builder.load(acc)
    s = [builder.extract_element(a, ir.Constant(_I32, j)) for j in range(RW)]
    s0 = cgutils.alloca_once(builder, _F32)
    builder.store(s[0], s0)
    with cgutils.for_range_slice(builder, builder.mul(nblk, ir.Constant(_I64, RW)), n, ir.Constant(_I64, 1),
                                 inc=True) as (t, _):
        k = builder.add(k0, t)
        builder.store(builder.call(fma1, [weight_at(k), x_at(k), builder.load(s0)]), s0)
    s[0] = builder.load(s0)
    return builder.fadd(builder.fadd(builder.fadd(s[0], s[1]), builder.fadd(s[2], s[3])),
                        builder.fadd(builder.fadd(s[4], s[5]), builder.fadd(s[6], s[7])))


@intrinsic
def row_dot(typingctx, x, ix, data, k0, n):
    """``sum_e data[e] * x[ix[e]]`` for ``k0 <= e < k0 + n`` (one CSR row times a dense vector), in
    the order of eight chains of fused multiply-adds (see :func:`_emit_row_dot`; the same sums, bit
    for bit, as eight scalar ``fmadd`` chains).

    Why: the scalar loop costs three loads per nonzero (column, value, x); here eight values are one
    vector load and the eight x values are loaded into one vector for one vector FMA (scalar loads
    inserted into lanes: Zen 4's gather instruction was measured 1.7x slower than the scalar loop).
    Measured in :func:`sparsecnn.kernels.spmv._spmv` on AlexNet's fc6/fc7/fc8 at Deep Compression's
    sparsity, batch 1, 2 threads: 1.10-1.38x the scalar loop with the weights cached.
    NOTE: no bounds checks: ``ix[k0 : k0 + n]`` are valid unsigned indices of x.
    """
    sig = types.float32(x, ix, data, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        xp, ip, dp = _array_ptrs(context, builder, signature, args, 3)
        k0_, n_ = args[3], args[4]

        def weights_at(k):
            q = builder.bitcast(builder.gep(dp, [k], inbounds=True), _RVEC.as_pointer())
            return builder.load(q, align=4)

        return _emit_row_dot(builder, xp, ip, k0_, n_, weights_at,
                             lambda k: builder.load(builder.gep(dp, [k], inbounds=True)), words=True)

    return sig, codegen


def _code_row_dot(table32: bool):
    def typer(typingctx, x, ix, codes, codebook, k0, n):
        sig = types.float32(x, ix, codes, codebook, types.intp, types.intp)
        table = table32 and HAS_TABLE32 and getattr(codes.dtype, "bitwidth", 0) == 8

        def codegen(context, builder, signature, args):
            xp, ip, cp, cbp = _array_ptrs(context, builder, signature, args, 4)
            k0_, n_ = args[4], args[5]

            def weight_at(k):
                code = builder.load(builder.gep(cp, [k], inbounds=True))
                if code.type.width < 64:
                    code = builder.zext(code, _I64)
                return builder.load(builder.gep(cbp, [code], inbounds=True))

            if table:
                v16 = ir.VectorType(_F32, 16)
                i16 = ir.VectorType(_I32, 16)
                perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, i16, v16]),
                                                      "llvm.x86.avx512.vpermi2var.ps.512")
                lo = builder.load(builder.bitcast(cbp, v16.as_pointer()), align=4)
                hp = builder.gep(cbp, [ir.Constant(_I64, 16)])
                hi = builder.load(builder.bitcast(hp, v16.as_pointer()), align=4)
                v8i8 = ir.VectorType(ir.IntType(8), RW)

                def weights_at(k):
                    cv = builder.load(builder.bitcast(builder.gep(cp, [k], inbounds=True), v8i8.as_pointer()),
                                      align=1)
                    wide = ir.Constant(ir.VectorType(_I32, 16), [*range(RW), *[0] * RW])
                    c16 = builder.shuffle_vector(cv, ir.Constant(v8i8, ir.Undefined), wide)
                    w16 = builder.call(perm, [lo, builder.zext(c16, i16), hi])
                    return builder.shuffle_vector(w16, ir.Constant(v16, ir.Undefined),
                                                  ir.Constant(ir.VectorType(_I32, RW), list(range(RW))))
            else:
                def weights_at(k):
                    v = ir.Constant(_RVEC, ir.Undefined)
                    for j in range(RW):
                        v = builder.insert_element(v, weight_at(builder.add(k, ir.Constant(_I64, j))),
                                                   ir.Constant(_I32, j))
                    return v

            return _emit_row_dot(builder, xp, ip, k0_, n_, weights_at, weight_at)

        return sig, codegen

    return typer


code_row_dot = intrinsic(_code_row_dot(False))
code_row_dot.__doc__ = """``sum_e codebook[codes[e]] * x[ix[e]]`` for ``k0 <= e < k0 + n``, in
:func:`row_dot`'s order: each block's eight weights are eight codebook loads inserted into one
vector. Any codebook size and unsigned code dtype.
NOTE: no bounds checks: indices valid for x, codes valid for codebook."""
code_row_dot32 = intrinsic(_code_row_dot(True))
code_row_dot32.__doc__ = """:func:`code_row_dot` for uint8 codes below 32 and a codebook of exactly
``TABLE`` (32) floats (zero-padded): with ``HAS_TABLE32`` (AVX-512) each block's eight weights come
from one register lookup (``vpermi2ps`` over the codebook held in two 16-float halves, loaded once
per row), without it from codebook loads as :func:`code_row_dot`.
NOTE: no bounds checks: indices valid for x, codes < 32, codebook holds 32 floats."""


def packed_words(index_itemsize: int) -> int:
    """32-bit words per block of :func:`scatter_blocks`'s packed column layout: ``RW`` row indices of
    ``index_itemsize`` bytes (2 or 4), then ``RW`` float32 values."""
    return RW * index_itemsize // 4 + RW


@intrinsic
def scatter_blocks(typingctx, y, ix, vals, blk0, nblk, v):
    """``y[row] += v * value`` for every entry of the packed blocks ``blk0 <= b < blk0 + nblk``: one
    column of the packed column layout (:mod:`sparsecnn.kernels.spmv_act`) times one input.

    A block is :func:`packed_words` ``(ix.itemsize)`` words: ``RW`` row indices (uint16 or uint32),
    then ``RW`` float32 values, so a column is one forward stream (the hardware and software
    prefetches follow one run, not an index run and a value run). ``ix`` and ``vals`` are the uint and
    float32 views of the same buffer. Per block, in quarters of four entries: the four rows from one
    64-bit load (uint16; two for uint32) split by shifts in general registers, the four outputs loaded
    into an xmm vector (a scalar load and three ``vinsertps`` from memory), one 4-lane FMA with the
    values (an aligned memory operand), four scalar stores (``vmovss`` and three ``vextractps``).
    A scatter is bound by its memory operations and lane moves: the 8-lane form (a 16-bit load per
    row, eight inserts into a ymm and eight extracts, with the 128-bit half moves) made 25 memory
    operations and 14 shuffles a block, this one 20 and 12 (uint16). Measured on the Zen 4 (one
    thread, everything in L1) 1.09-1.20 against 1.21-1.32 cycles an entry; the whole kernel on
    AlexNet's fc6 / fc7 / fc8 at 50-70% zero inputs (2 threads, batch 1, interleaved in one process)
    1.03-1.09x warm, 1.00-1.05x with the caches flushed (then the memory bounds it). A scalar loop
    (load, FMA, store per entry, the rows shared the same way) ran 0.95-0.97x the 8-lane form.
    Same sums bit for bit in every form (one fused multiply-add per entry, in the stored order).
    NOTE: no bounds checks; the rows of one block are distinct (two lanes on one row would lose an
    update: both load it before either stores); the buffer starts on a 16-byte boundary.
    """
    sig = types.void(y, ix, vals, types.intp, types.intp, types.float32)
    isz = ix.dtype.bitwidth // 8
    words = packed_words(isz)
    idx_words = words - RW
    per_word = 8 // isz  # row indices per 64-bit word
    vec4 = ir.VectorType(_F32, 4)
    irow = ir.IntType(8 * isz)

    def codegen(context, builder, signature, args):
        yp, ip, dp = _array_ptrs(context, builder, signature, args, 3)
        ip64 = builder.bitcast(ip, _I64.as_pointer())
        blk0_, nblk_, v_ = args[3], args[4], args[5]
        fma = _fma_vec(builder, 4)
        vv = _splat(builder, v_, 4)
        with cgutils.for_range(builder, nblk_) as loop:
            b = builder.add(blk0_, loop.index)
            q0 = builder.mul(b, ir.Constant(_I64, words // 2))  # the block's first 64-bit word
            d0 = builder.add(builder.mul(b, ir.Constant(_I64, words)), ir.Constant(_I64, idx_words))
            for h in range(RW // 4):
                ptrs = []
                for j in range(4):
                    e = 4 * h + j
                    if e % per_word == 0:
                        at = builder.add(q0, ir.Constant(_I64, e // per_word))
                        word = builder.load(builder.gep(ip64, [at], inbounds=True))
                    sh = 8 * isz * (e % per_word)
                    row = builder.trunc(builder.lshr(word, ir.Constant(_I64, sh)) if sh else word, irow)
                    ptrs.append(builder.gep(yp, [builder.zext(row, _I64)], inbounds=True))
                yv = ir.Constant(vec4, ir.Undefined)
                for j in range(4):
                    yv = builder.insert_element(yv, builder.load(ptrs[j]), ir.Constant(_I32, j))
                q = builder.gep(dp, [builder.add(d0, ir.Constant(_I64, 4 * h))], inbounds=True)
                r = builder.call(fma, [vv, builder.load(builder.bitcast(q, vec4.as_pointer()), align=16), yv])
                for j in range(4):
                    builder.store(builder.extract_element(r, ir.Constant(_I32, j)), ptrs[j])
        return context.get_dummy_value()

    return sig, codegen


# masked_tile: 16-row groups per register tile of the masked column layout (kernels.spmv_act).
MASK_GROUPS = 8
_V16 = ir.VectorType(_F32, 16)
_M16 = ir.VectorType(_I1, 16)


def _masked_tile_codegen(groups: int, ahead: int):
    def codegen(context, builder, signature, args):
        x_, nz_, n_, m_, tp_, v_, col0_, init_, r0_, dst_, dpos_, relu_ = args
        at = signature.args
        xp = _data_ptr(context, builder, at[0], x_)
        nzp = _data_ptr(context, builder, at[1], nz_)
        mp0 = _data_ptr(context, builder, at[3], m_)
        tpp = _data_ptr(context, builder, at[4], tp_)
        vp0 = _data_ptr(context, builder, at[5], v_)
        ip = builder.gep(_data_ptr(context, builder, at[7], init_), [r0_], inbounds=True)
        dp = builder.gep(_data_ptr(context, builder, at[9], dst_), [dpos_], inbounds=True)
        relu = _as_i1(context, builder, relu_, at[11])
        fma = _fma_vec(builder, 16)
        expand = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            _V16, [_F32.as_pointer(), _M16, _V16]), "llvm.masked.expandload.v16f32")
        i16 = ir.IntType(16)
        pop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i16, [i16]), "llvm.ctpop.i16")
        i8p = ir.IntType(8).as_pointer()
        pf = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]), "llvm.prefetch.p0")
        zero = ir.Constant(_V16, None)

        def at64(ptr, i):
            v = builder.load(builder.gep(ptr, [i], inbounds=True))
            return builder.sext(v, _I64) if v.type.width < 64 else v

        accs = []
        for g in range(groups):
            a = cgutils.alloca_once(builder, _V16)
            q = builder.gep(ip, [ir.Constant(_I64, 16 * g)], inbounds=True)
            builder.store(builder.load(builder.bitcast(q, _V16.as_pointer()), align=4), a)
            accs.append(a)
        last = builder.sub(n_, ir.Constant(_I64, 1))
        with cgutils.for_range(builder, n_) as loop:
            if ahead:
                # the masks and values of the nonzero input `ahead` on (their lines into cache): the
                # column parts are short runs with gaps, which the hardware prefetchers do not follow
                qa = builder.add(loop.index, ir.Constant(_I64, ahead))
                qa = builder.select(builder.icmp_signed("<", qa, n_), qa, last)
                ca = builder.add(col0_, at64(nzp, qa))
                for ptr in (builder.gep(vp0, [at64(tpp, ca)]),
                            builder.gep(mp0, [builder.mul(ca, ir.Constant(_I64, groups))])):
                    builder.call(pf, [builder.bitcast(ptr, i8p), ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                                      ir.Constant(_I32, 1)])
            j = at64(nzp, loop.index)
            xv = builder.load(builder.gep(xp, [j], inbounds=True))
            xs = _splat(builder, xv, 16)
            col = builder.add(col0_, j)
            vp = builder.gep(vp0, [at64(tpp, col)], inbounds=True)
            mp = builder.gep(mp0, [builder.mul(col, ir.Constant(_I64, groups))], inbounds=True)
            for g in range(groups):
                m = builder.load(builder.gep(mp, [ir.Constant(_I64, g)], inbounds=True))
                w = builder.call(expand, [vp, builder.bitcast(m, _M16), zero])
                builder.store(builder.call(fma, [w, xs, builder.load(accs[g])]), accs[g])
                if g + 1 < groups:
                    vp = builder.gep(vp, [builder.zext(builder.call(pop, [m]), _I64)], inbounds=True)
        for g in range(groups):
            q = builder.gep(dp, [ir.Constant(_I64, 16 * g)], inbounds=True)
            builder.store(_relu(builder, builder.load(accs[g]), relu), builder.bitcast(q, _V16.as_pointer()),
                          align=4)
        return context.get_dummy_value()

    return codegen


def _masked_tile(groups: int, ahead: int):
    @intrinsic
    def masked_tile(typingctx, x, nz, n, masks, tile_ptr, vals, col0, init, r0, dst, dpos, relu):
        """One tile of ``T = 16 * MASK_GROUPS`` output rows of the masked column layout
        (:mod:`sparsecnn.kernels.spmv_act`) over the nonzero inputs ``nz[:n]``: the tile's rows stay in
        ``MASK_GROUPS`` zmm accumulators while, per input ``j``, each 16-row group adds ``x[j]`` times
        its column's values there, expanded from the packed ``vals`` by the group's 16-bit mask (one
        ``vexpandps`` and one FMA; the rows a mask leaves out get weight 0, so a NaN or inf input
        spreads to every row, as in a dense product).

        Column ``c = col0 + j``: masks ``masks[c * MASK_GROUPS + g]`` (bit ``i`` of group ``g`` is row
        ``16 g + i`` of the tile); values from ``vals[tile_ptr[c]]`` on, group after group, each
        group's count its mask's popcount. The tile starts from ``init[r0 : r0 + T]`` and is stored to
        ``dst[dpos : dpos + T]``, ``max(., 0)`` with NaN kept when ``relu``. The masks and values of
        the input four on are prefetched.
        NOTE: no bounds checks: ``nz[:n]`` are valid columns; init and dst hold ``T`` floats from
        their positions."""
        sig = types.void(x, nz, types.intp, masks, tile_ptr, vals, types.intp, init, types.intp, dst,
                         types.intp, types.boolean)
        return sig, _masked_tile_codegen(groups, ahead)

    return masked_tile


masked_tile = _masked_tile(MASK_GROUPS, 4)


# code_ell_block: rows per block (the lanes of one zmm accumulator), columns per slab (the entries one
# vpermi2ps looks up from two zmm registers), independent accumulators (FMA latency 4 cycles).
ELL_ROWS = 16
ELL_SLAB = 32
_ELL_ACC = 4
ELL_COL_BITS = 5  # an entry: column in the slab (bits 0-4), code (bits 5-9), valid (bit 10)
ELL_VALID = 1 << 10
# Entries ahead (2 KiB) whose line each round prefetches: a block's entries are one forward stream,
# but with the weights coming from memory the kernel read them at 29 GB/s against float CSR's 38.
# Measured (fc6 / fc7 at 91%, caches flushed before each call, 2 threads): 0.494 / 0.232 ms without,
# 0.469 / 0.263 at 512 entries ahead, 0.425 / 0.217 at 1024, 0.438 / 0.232 at 2048 (float CSR
# 0.53-0.60 / 0.23-0.27 in the same runs); warm, no change.
ELL_AHEAD = 1024


def _ell_codegen(nb: int, masked: bool):
    """The codegen of :func:`code_ell_block` for ``nb`` images (1, 2 or 4): each image has its two
    zmm registers of a slab's inputs and its accumulators; one entry load, zero-extension and codebook
    lookup per round serve all images. Accumulator sets rotate so that about four FMA chains are in
    flight (four sets for one image, two for two, one for four).

    Padding lanes must add nothing. ``masked``: each image's FMA is masked by the valid bits, so a
    padding lane never multiplies, whatever its input (inf or NaN included). Otherwise the padding
    lanes' weight is zeroed once per round and the FMAs run unmasked, which is right only when every
    input is finite (``0 * inf`` is NaN). Four images masked ran 20-35% slower (fc6 at 91%, batch 4:
    0.81 against 0.62 ms)."""

    def codegen(context, builder, signature, args):
        xp, ep, cp, tp, op = (_data_ptr(context, builder, signature.args[i], args[i])
                              for i in (0, 1, 2, 3, 7))
        nslab_, cbase_, ebase_, opos_, xstride_ = args[4], args[5], args[6], args[8], args[9]
        v16 = ir.VectorType(_F32, 16)
        i16 = ir.VectorType(_I32, 16)
        e16 = ir.VectorType(ir.IntType(16), 16)
        perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, i16, v16]),
                                              "llvm.x86.avx512.vpermi2var.ps.512")
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16, v16]),
                                             "llvm.fma.v16f32")
        i8p = ir.IntType(8).as_pointer()
        pf = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]), "llvm.prefetch.p0")

        def load16(ptr, at):
            at_ptr = builder.gep(ptr, [at], inbounds=True)
            return builder.load(builder.bitcast(at_ptr, v16.as_pointer()), align=4)

        lo_book, hi_book = load16(tp, ir.Constant(_I64, 0)), load16(tp, ir.Constant(_I64, 16))
        sets = max(1, _ELL_ACC // nb)
        accs = [[cgutils.alloca_once(builder, v16) for _ in range(nb)] for _ in range(sets)]
        for row in accs:
            for a in row:
                builder.store(ir.Constant(v16, [0.0] * 16), a)
        epos = cgutils.alloca_once(builder, _I64)
        builder.store(ebase_, epos)
        low5 = ir.Constant(i16, [ELL_SLAB - 1] * 16)
        shift = ir.Constant(i16, [ELL_COL_BITS] * 16)
        valid_bit = ir.Constant(i16, [ELL_VALID] * 16)
        zero = ir.Constant(i16, [0] * 16)
        with cgutils.for_range(builder, nslab_) as slab:
            at_cnt = builder.gep(cp, [builder.add(cbase_, slab.index)], inbounds=True)
            n = builder.zext(builder.load(at_cnt), _I64)
            xo = builder.mul(slab.index, ir.Constant(_I64, ELL_SLAB))
            xs = []
            for b in range(nb):
                base = builder.add(xo, builder.mul(xstride_, ir.Constant(_I64, b))) if b else xo
                xs.append((load16(xp, base), load16(xp, builder.add(base, ir.Constant(_I64, 16)))))

            def round_into(row):
                e0 = builder.load(epos)
                if ELL_AHEAD:
                    ahead = builder.gep(ep, [builder.add(e0, ir.Constant(_I64, ELL_AHEAD))])
                    builder.call(pf, [builder.bitcast(ahead, i8p), ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                                      ir.Constant(_I32, 1)])
                at_e = builder.gep(ep, [e0], inbounds=True)
                v = builder.zext(builder.load(builder.bitcast(at_e, e16.as_pointer()), align=2), i16)
                col = builder.and_(v, low5)
                wv = builder.call(perm, [lo_book, builder.and_(builder.lshr(v, shift), low5), hi_book])
                valid = builder.icmp_unsigned("!=", builder.and_(v, valid_bit), zero)
                if not masked:
                    wv = builder.select(valid, wv, ir.Constant(v16, [0.0] * 16))
                for b in range(nb):
                    xv = builder.call(perm, [xs[b][0], col, xs[b][1]])
                    a = builder.load(row[b])
                    if masked:
                        builder.store(builder.select(valid, builder.call(fma, [xv, wv, a]), a), row[b])
                    else:
                        builder.store(builder.call(fma, [xv, wv, a]), row[b])
                builder.store(builder.add(e0, ir.Constant(_I64, 16)), epos)

            with cgutils.for_range(builder, builder.udiv(n, ir.Constant(_I64, sets))):
                for row in accs:
                    round_into(row)
            with cgutils.for_range(builder, builder.urem(n, ir.Constant(_I64, sets))):
                round_into(accs[0])
        for b in range(nb):
            parts = [builder.load(row[b]) for row in accs]
            while len(parts) > 1:
                parts = [builder.fadd(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
            at_out = builder.gep(op, [builder.add(opos_, ir.Constant(_I64, 16 * b))], inbounds=True)
            builder.store(parts[0], builder.bitcast(at_out, v16.as_pointer()), align=4)
        return builder.load(epos)

    return codegen


def _ell_typer(nb: int, masked: bool = True):
    def typer(typingctx, x, ent, cnt, table, nslab, cbase, ebase, out, opos, xstride):
        sig = types.intp(x, ent, cnt, table, types.intp, types.intp, types.intp, out, types.intp, types.intp)
        return sig, _ell_codegen(nb, masked)

    return typer


code_ell_block = intrinsic(_ell_typer(1))
code_ell_block.__doc__ = """One block of ``ELL_ROWS`` (16) output rows of a quantized layer in the
sliced-ELL form of :mod:`sparsecnn.kernels.qspmv`: ``out[opos + r] = sum over slabs s, entries j of
row r's list in slab s of table[code] * x[32 s + column]``; returns the entry index after the block's
last. ``xstride`` is
unused (the batch variants' distance between images).

Layout: the block's entries are slab after slab (``nslab`` slabs of ``ELL_SLAB`` = 32 columns),
``cnt[cbase + s]`` rounds of 16 uint16 entries each (lane r: row r's next nonzero in the slab,
``column | code << 5 | ELL_VALID``, or 0 where row r has no more), starting at ``ent[ebase]``. Per
slab the 32 inputs are two zmm registers and the 32-entry codebook two more, so a round is one 16-lane
load of entries, a zero-extension, two ``vpermi2ps`` lookups (inputs and weights) and one FMA masked by
the valid bits: about six instructions for 16 lanes, where the row-wise kernel (:func:`code_row_dot32`)
spends 28 per 8 nonzeros, most of them the scalar loads and inserts of the gathered inputs. Four
accumulators take the rounds in turn (one chain of dependent FMAs ran at 7 cycles a round).

Measured (Zen 4, 2 threads, batch 1, AlexNet fc6 / fc7 shapes at 91% with 5-bit codes, weights warm,
interleaved): 0.326 / 0.131 ms against 0.453 / 0.187 ms for the row-wise kernel and 0.476 / 0.182 ms
for float CSR (one accumulator: 0.43 / 0.177 ms). Padding: on random 91% sparsity a slab's longest
row list in a block holds 2.1 entries per nonzero (4.2 bytes per nonzero, against float CSR's 6 and
the row-wise codes' 3).
NOTE: AVX-512 only (``HAS_TABLE32``); no bounds checks: x holds ``32 * nslab`` floats, table 32, out
``opos + 16``; the sums run in lane order per round, accumulators added at the end (not float CSR's
order)."""
code_ell_block2 = intrinsic(_ell_typer(2))
code_ell_block2.__doc__ = """:func:`code_ell_block` for two images: x holds image i's padded inputs at
``i * xstride``, out their 16 sums at ``opos + 16 i``. One entry load and codebook lookup per round
serve both."""
code_ell_block4 = intrinsic(_ell_typer(4))
code_ell_block4.__doc__ = """:func:`code_ell_block` for four images (see :func:`code_ell_block2`)."""
code_ell_block2_finite = intrinsic(_ell_typer(2, masked=False))
code_ell_block2_finite.__doc__ = """:func:`code_ell_block2` for inputs that are all finite: padding lanes
get a zero weight and the FMAs run unmasked (see :func:`_ell_codegen`)."""
code_ell_block4_finite = intrinsic(_ell_typer(4, masked=False))
code_ell_block4_finite.__doc__ = """:func:`code_ell_block4` for inputs that are all finite. Measured (fc6
at 91%, 5-bit, 2 threads, weights warm, as the qspmm kernel runs it): 2 images 0.41 ms, 4 images 0.62
ms, 8 images in two passes 1.22 ms, against the float spmm's 1.15 / 1.51 / 1.56 ms; 8 images in one
pass (16 zmm of inputs, a prototype) 1.18 ms, no better than two passes of four."""
